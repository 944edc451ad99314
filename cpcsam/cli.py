"""The `cpcsam` console command.

`cpcsam run` runs the DVC pipeline (its stages via `dvc repro`) and prints where the results are.
Other subcommands register themselves in `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from cpcsam.errors import CpcSamError

RESULTS = {
    "manifest": "data/ingest/manifest.parquet",
    "quarantine report": "data/ingest/quarantine.json",
    "trained model": "artifacts/train/cpcsam/model.pt",
    "evaluation": "artifacts/eval/table.md",
    "gate": "artifacts/eval/gate.json",
    "ONNX models": "artifacts/export/",
}


def _run(args: argparse.Namespace) -> int:
    """Run the DVC graph (or the part a target needs) and list the results.

    Stages that do not depend on each other run side by side (`flows.stages.parallel_jobs`;
    the same scheduler as the `train` flow): each one's output is printed as it ends and kept in
    `logs/<stage>.log`. With one job at a time this is plain `dvc repro`, live output and all.
    """
    from cpcsam.config import load_config
    from flows import stages

    root = Path.cwd()
    jobs = stages.parallel_jobs(load_config(root / "params.yaml"))  # a bad params.yaml fails here, in one line
    # dvc.yaml's stage commands call `python`; make it (and `dvc`) this interpreter's even
    # when the virtualenv is not activated.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if jobs == 1:
        cmd = ["dvc", "repro", *([args.target] if args.target else [])]
        print("$ " + " ".join(cmd), flush=True)
        code = subprocess.call(cmd, env=env)
        if code != 0:
            print(f"cpcsam run: `{' '.join(cmd)}` failed with exit code {code}", file=sys.stderr)
            return code
    else:
        order, edges = stages.stage_graph(root)
        if args.target:
            order = stages.upstream_closure(args.target, order, edges)
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        print(f"$ dvc repro --single-item <stage>: {len(order)} stages, up to {jobs} at once "
              f"(flow.stage_jobs); each stage's output when it ends, and in {logs}/<stage>.log", flush=True)
        finished: list[str] = []

        def run_one(stage: str) -> dict:
            log = logs / f"{stage}.log"
            log.unlink(missing_ok=True)
            try:
                result = stages.repro_stage(root, stage, env=env, log_file=log)
            except stages.StageFailed as exc:
                print(f"\n== {stage}: FAILED (log: {log})\n{exc}", flush=True)
                raise
            finished.append(stage)
            verb = "ran" if result["ran"] else "up to date"
            text = log.read_text() if log.is_file() else ""
            body = "\n".join(line.split("\r")[-1] for line in text.splitlines()[1:] if line.split("\r")[-1].strip())
            print(f"\n== [{len(finished)}/{len(order)}] {stage}: {verb} in {result['seconds']:.0f} s\n{body}", flush=True)
            return result

        def on_start(stage: str, running: list[str]) -> None:
            print(f"-- started {stage} (running: {', '.join(running)})", flush=True)

        try:
            stages.run_graph(order, edges, run_one, jobs, on_start=on_start)
        except stages.StageFailed:
            print("cpcsam run: a stage failed (above); the stages running beside it finished, no other stage started",
                  file=sys.stderr)
            return 1
    print("\nResults:")
    for label, rel in RESULTS.items():
        path = Path(rel)
        if path.exists():
            print(f"  {label:18s} {path.resolve()}")
    print("  MLflow runs        mlflow ui --backend-store-uri sqlite:///mlflow.db")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the pipeline (dvc repro) and print where the results are")
    p.add_argument("target", nargs="?", help="a dvc.yaml stage to run up to (default: all)")
    p.set_defaults(func=_run)


def _predict(args: argparse.Namespace) -> int:
    """Segment images with the exported (or PyTorch) model; exit 2 when any image failed."""
    import logging

    from cpcsam.predict import configure_predict_process, predict
    from cpcsam.redact import install_log_redaction

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    configure_predict_process(args.backend)
    summary = predict(
        args.images, args.out, prompts=args.prompts, support=args.support,
        classes=[c for c in (args.classes or "").split(",") if c], backend=args.backend,
        onnx_dir=args.onnx_dir, model_path=args.model, device=args.device, threshold=args.threshold,
        overlays=not args.no_overlays, support_per_class=args.support_per_class,
    )
    print(summary.report())
    return 2 if summary.failures else 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment images from prompts (JSON) or a support set (automatic prompts)",
                       description="Writes masks/<image>/<k>_<class>.png, predictions.json (COCO RLE), "
                                   "overlays/<image>.png and summary.json under --out. See cpcsam/predict.py.")
    p.add_argument("images", nargs="+", help="image file(s), folder(s), glob(s) or s3:// prefix(es)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prompts", help='JSON {"<image>": [{"class", "box": [x0,y0,x1,y1], "points": [[x,y]], "labels"}]}')
    p.add_argument("--support", help="COCO instances JSON of annotated support images (automatic mode)")
    p.add_argument("--classes", help="automatic mode: comma-separated classes to find in every image")
    p.add_argument("--support-per-class", type=int, default=5, help="support instances pooled per class")
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx")
    p.add_argument("--onnx-dir", default="artifacts/export", help="folder with image_encoder.onnx + decoder_capl.onnx")
    p.add_argument("--model", default="artifacts/train/cpcsam/model.pt", help="trained model for --backend torch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threshold", type=float, default=0.0, help="mask logit threshold")
    p.add_argument("--no-overlays", action="store_true")
    p.set_defaults(func=_predict)


# Each entry adds one subparser; later modules (predict, ...) append theirs here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_run, _add_predict]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpcsam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CpcSamError as exc:
        from cpcsam.redact import redact

        print(f"cpcsam {args.command}: {redact(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
