"""Pipeline step `evaluate`: every model × every prompt protocol → metrics, table, plots, overlays.

    python -m components.evaluate [--params params.yaml] [--out artifacts/eval] [-S key=value ...]

Models, in one table: `sam` — the SAM the run started from (`model.checkpoint`, else the
pretrain stage's `artifacts/pretrain/sam.pth`; no CaPL, no fine-tuning) — and every entry of
`evaluate.models` (`cpcsam` is required; baselines such as `lora_only` and the ablation rows are
evaluated when their file exists and listed as skipped otherwise).

Writes under `--out`: `metrics.json` (all numbers + the `headline` the gate reads), `scores.json`
(the compact numbers `dvc metrics` shows: headline, base/target Dice per model and protocol), `table.md`,
`dice_vs_noise.csv` (for `dvc plots`), `plots/class_dice.png`, `plots/dice_vs_noise.png`, and
`overlays/<image>.png` (ground truth next to each model's prediction). Exits 2 with one line on
bad input.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params, section
from cpcsam.errors import CheckpointError, CpcSamError

log = logging.getLogger("components.evaluate")

MANIFEST = "data/ingest/manifest.parquet"
CLASSES = "data/ingest/classes.json"
PRETRAINED_SAM = "artifacts/pretrain/sam.pth"


def starting_sam_checkpoint(params: dict[str, Any]) -> str:
    """`model.checkpoint` when set, else the pretrain stage's weights."""
    return str((params.get("model") or {}).get("checkpoint") or PRETRAINED_SAM)


def load_models(params: dict[str, Any], cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """{name: CPCSAM} to evaluate (the starting SAM first) and {name: why skipped}."""
    from cpcsam.modeling import CPCSAM, build_sam, load_cpcsam

    model_cfg = dict(params.get("model") or {})
    model_cfg["checkpoint"] = starting_sam_checkpoint(params)
    models: dict[str, Any] = {"sam": CPCSAM(build_sam(model_cfg), {"mode": "fixed"}).eval()}
    skipped: dict[str, str] = {}
    for name, path in (cfg.get("models") or {}).items():
        if not path or not Path(str(path)).is_file() and not str(path).startswith("s3://"):
            if name == "cpcsam":
                raise CheckpointError(f"{path}: the trained CPC-SAM (evaluate.models.cpcsam) is missing; run the train stage")
            skipped[name] = f"{path or '(no path)'}: not found"
            log.info("evaluate: skipping %s (%s not found)", name, path)
            continue
        models[name] = load_cpcsam(str(path))
    return models, skipped


def write_outputs(out: Path, metrics: dict[str, Any], overlays: dict[str, dict[str, list[np.ndarray]]],
                  images: list, load_image) -> list[Path]:
    """metrics.json, table.md, the noise curve, plots and overlays; returns the files written."""
    from cpcsam.evaluation.report import (
        markdown_table,
        overlay_masks,
        plot_class_dice,
        plot_dice_vs_noise,
        save_png,
        scores,
        side_by_side,
        write_noise_curve,
    )

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    (out / "scores.json").write_text(json.dumps(scores(metrics), indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(metrics))
    write_noise_curve(metrics, out / "dice_vs_noise.csv")
    plot_class_dice(metrics, metrics["headline"]["protocol"], out / "plots" / "class_dice.png")
    plot_dice_vs_noise(metrics, out / "plots" / "dice_vs_noise.png")
    written = [out / "metrics.json", out / "scores.json", out / "table.md", out / "dice_vs_noise.csv",
               out / "plots" / "class_dice.png", out / "plots" / "dice_vs_noise.png"]
    by_id = {im.image_id: im for im in images}
    first_model = next(iter(overlays.values()), {})
    for image_id in first_model:
        im = by_id[image_id]
        pixels = load_image(im)
        names = [e.class_name for e in im.entities]
        panels = [overlay_masks(pixels, [e.mask for e in im.entities], names)]
        titles = ["ground truth"]
        for model, per_image in overlays.items():
            if image_id in per_image:
                panels.append(overlay_masks(pixels, per_image[image_id], names))
                titles.append(model)
        path = out / "overlays" / f"{image_id.replace('/', '_')}.png"
        save_png(side_by_side(panels, titles), path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", __doc__)
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--classes", default=CLASSES)
    parser.add_argument("--out", default="artifacts/eval")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        import torch

        from cpcsam.data import load_classes, load_manifest, read_image
        from cpcsam.evaluation.engine import TorchEngine
        from cpcsam.evaluation.protocols import EvalConfig, evaluate_models, flat_metrics, image_records

        params = load_params(args.params, args.overrides)
        cfg = section(params, "evaluate")
        seed = int(cfg.get("seed", params.get("seed", 0)))
        eval_cfg = EvalConfig.from_params(cfg, seed)  # checks the section before any work
        torch.manual_seed(seed)
        if int(cfg.get("threads", 0)) > 0:  # 0 = torch's default (all cores)
            torch.set_num_threads(int(cfg["threads"]))
        classes = load_classes(args.classes)
        images = image_records(load_manifest(args.manifest), cfg.get("splits", ["test"]),
                               int(cfg.get("max_images", 0)), seed)
        models, skipped = load_models(params, cfg)
        engines = {name: TorchEngine(m, int(cfg.get("batch_entities", 32))) for name, m in models.items()}
        headline = cfg.get("headline") or {}

        def load_image(im):
            return np.array(read_image(im.uri))  # a writable copy (torch warns on read-only arrays)

        metrics, overlays = evaluate_models(
            engines, images, classes["base"], classes["target"], eval_cfg, load_image,
            headline_model=str(headline.get("model", "cpcsam")),
            headline_protocol=str(headline.get("protocol", "box@0.1")),
        )
        metrics["skipped_models"] = skipped
        metrics["sources"] = {"sam": starting_sam_checkpoint(params),
                              **{k: str(v) for k, v in (cfg.get("models") or {}).items() if k in models}}
        out = Path(args.out)
        written = write_outputs(out, metrics, overlays, images, load_image)

        from components.tracking import stage_run

        with stage_run("evaluate", params) as run:
            run.log_params({"evaluate.images": len(images), "evaluate.protocols": ",".join(metrics["protocols"]),
                            "evaluate.models": ",".join(metrics["models"])})
            run.log_metrics(flat_metrics(metrics))
            for path in written:
                rel = path.relative_to(out).parent.as_posix()
                run.log_artifact(str(path), "eval" if rel == "." else f"eval/{rel}")
    except CpcSamError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    head = metrics["headline"]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(f"evaluate: {len(images)} images, models {', '.join(metrics['models'])}; {head['model']} {head['protocol']}: "
          f"target Dice {fmt(head['target_dice'])}, base Dice {fmt(head['base_dice'])} -> {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
