"""How good is a starting SAM? box@σ Dice against the prompt-only references, per data set.

    python benchmarks/bench_starting_sam.py --sam checkpoints/sam_small_generalist.pth [--sam other.pth ...]
        [--profiles oceancoco,trashcan] [--split test] [--sigmas 0,0.2] [-S key=value ...]

`-S model.crop.context=2` scores with focus crops, `-S evaluate.threshold=-2` at that logit threshold.

Ingests each `data.profiles` entry of params.yaml into `.bench/ingest/<profile>` (once), then
scores each checkpoint (a segment-anything state dict of `model.type`) and the filled box and
GrabCut rows on the split's base and target classes; prints one table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def manifest_for(params: dict, profile: str) -> tuple:
    from cpcsam.data import load_classes, load_manifest
    from cpcsam.data.ingest import run_ingest

    out = ROOT / ".bench" / "ingest" / profile
    if not (out / "manifest.parquet").exists():
        run_ingest(params.data.model_copy(update={"profile": profile, "progress": False}), out)
    return load_manifest(out / "manifest.parquet"), load_classes(out / "classes.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam", action="append", default=[], help="checkpoint (repeatable)")
    parser.add_argument("--profiles", default="oceancoco,trashcan")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sigmas", default="0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-grabcut", action="store_true")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="params override, e.g. -S model.sizes.small.mask_refine_stages=1 (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cpcsam.config import load_config
    from cpcsam.data import read_image
    from cpcsam.inference import Predictor
    from cpcsam.evaluation.protocols import EvalConfig, Protocol, evaluate_models, image_records
    from cpcsam.evaluation.references import FilledBox, GrabCut
    from cpcsam.modeling import CPCSAM, build_sam

    params = load_config(ROOT / "params.yaml", args.overrides)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    if params.evaluate.threshold == "auto":
        raise SystemExit("bench_starting_sam: give a number for evaluate.threshold (auto needs trained models)")
    cfg = EvalConfig(protocols=[Protocol.parse(f"box@{s:g}") for s in sigmas], seed=0,
                     threshold=float(params.evaluate.threshold))
    rows = []
    for profile in args.profiles.split(","):
        if profile == "trashcan" and not Path(params.data.profiles["trashcan"].root).is_dir():
            print(f"skip trashcan: {params.data.profiles['trashcan'].root} is absent", file=sys.stderr)
            continue
        manifest, classes = manifest_for(params, profile)
        images = image_records(manifest, [args.split])
        engines: dict = {"filled_box": FilledBox()}
        if not args.no_grabcut:
            engines["grabcut"] = GrabCut()
        for path in args.sam:
            sam = build_sam(params.model.model_copy(update={"checkpoint": path}))
            engines[Path(path).name] = Predictor.from_model(CPCSAM(sam, {"mode": "fixed"}), crop=params.model.crop)
        started = time.perf_counter()
        metrics, _ = evaluate_models(engines, images, classes["base"], classes["target"], cfg,
                                     lambda im: np.array(read_image(im.uri)), headline_model="filled_box",
                                     headline_protocol=cfg.protocols[0].name)
        for name, entry in metrics["models"].items():
            for protocol, s in entry["protocols"].items():
                rows.append((profile, len(images), name, protocol, s["base"]["dice"], s["target"]["dice"]))
        print(f"{profile}: {len(images)} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print("| data | images | model | protocol | base Dice | target Dice |")
    print("| --- | ---: | --- | --- | ---: | ---: |")
    for profile, n, name, protocol, b, t in rows:
        print(f"| {profile} | {n} | {name} | {protocol} | {fmt(b)} | {fmt(t)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
