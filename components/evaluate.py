"""Pipeline step `evaluate`: every model × every prompt protocol → metrics, table, plots, overlays.

    python -m components.evaluate [--params params.yaml] [--out artifacts/eval] [-S key=value ...]

Models, in one table: `sam` — the SAM the run started from (no CaPL, no fine-tuning) — every
variant of `variants` (`artifacts/train/<variant>/model.pt`: CPC-SAM, its baselines and
ablations, all DVC deps of this stage) and, with `evaluate.references`, the prompt-only rows
`filled_box` and `grabcut` that every model must beat, as the `references` stage scored them
(`--references`: they need no model, so they are not recomputed for new weights).

Writes under `--out`: `metrics.json` (all numbers + the `headline` the gate reads), `scores.json`
(the compact numbers `dvc metrics` shows: headline, base/target Dice per model and protocol), `table.md`,
`dice_vs_noise.csv` (for `dvc plots`), `plots/class_dice.png`, `plots/dice_vs_noise.png`, and
`overlays/<image>.png` (ground truth next to each model's prediction). Exits 2 with one line on
bad input.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.cli import stage_main
from cpcsam.errors import CheckpointError
from cpcsam.files import write_json_atomic

MANIFEST = "data/ingest/manifest.parquet"
CLASSES = "data/ingest/classes.json"
PRETRAINED_SAM = "artifacts/pretrain/sam.pth"
TRAINED = "artifacts/train"
REFERENCES = "artifacts/references/results.json"

logger = logging.getLogger(__name__)


def trained_model_path(variant: str, trained: str | Path = TRAINED) -> Path:
    return Path(trained) / variant / "model.pt"


def load_models(params, trained: str | Path = TRAINED, sam_path: str = PRETRAINED_SAM) -> dict[str, Any]:
    """{name: model} to evaluate: the starting SAM and every trained variant."""
    from cpcsam.inference import Predictor
    from cpcsam.modeling import CPCSAM, build_sam, load_cpcsam

    cfg = params.evaluate
    sam = build_sam(params.model.model_copy(update={"checkpoint": sam_path}))
    engines: dict[str, Any] = {"sam": Predictor.from_model(CPCSAM(sam, {"mode": "fixed"}).eval(), cfg.batch_entities,
                                                           crop=params.model.crop)}
    for variant in params.variants:
        path = trained_model_path(variant, trained)
        if not path.is_file():
            raise CheckpointError(f"{path}: the trained {variant!r} model is missing; run its train stage (dvc repro)")
        engines[variant] = Predictor.from_model(load_cpcsam(str(path), fold_lora=True), cfg.batch_entities, crop=params.model.crop)
    return engines


def calibrate_thresholds(params, engines: dict[str, Any], manifest, base: list[str], seed: int,
                         load_image) -> tuple[dict[str, float], dict[str, Any]]:
    """`evaluate.threshold: auto`: every model's own threshold on `evaluate.calibration.split`
    (cpcsam.evaluation.calibration); the prompt-only references answer hard masks and keep theirs."""
    from cpcsam.errors import ConfigError
    from cpcsam.evaluation.calibration import calibrate_threshold
    from cpcsam.evaluation.protocols import image_records

    cal = params.evaluate.calibration
    if not (manifest["split"] == cal.split).any():
        raise ConfigError(f"evaluate.calibration.split: the manifest has no {cal.split!r} image to calibrate on")
    images = image_records(manifest, [cal.split], 0, seed)
    thresholds, report = {}, {}
    for name, engine in engines.items():
        try:
            found = calibrate_threshold(engine, images, base, cal.grid, seed, load_image, name)
        except ValueError as err:
            raise ConfigError(f"evaluate.calibration.split {cal.split!r}: {err}") from None
        thresholds[name] = found.threshold
        report[name] = found.as_dict()
        logger.info("%s: threshold %g (base Dice on %s at box@0: %s)", name, found.threshold, cal.split,
                    {t: None if d is None else round(d, 4) for t, d in found.base_dice.items()})
    return thresholds, {"split": cal.split, "grid": list(cal.grid), "models": report}


def write_outputs(out: Path, metrics: dict[str, Any], overlays: dict[str, dict[str, list[np.ndarray]]],
                  images: list, load_image) -> list[Path]:
    """metrics.json, table.md, the noise curve, plots and overlays; returns the files written."""
    from cpcsam.files import write_text_atomic
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
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "scores.json", scores(metrics))
    write_text_atomic(out / "table.md", markdown_table(metrics))
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


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--classes", default=CLASSES)
    parser.add_argument("--sam", default=PRETRAINED_SAM, help="the starting SAM (the pretrain stage adopts model.checkpoint)")
    parser.add_argument("--trained", default=TRAINED, help="folder of <variant>/model.pt")
    parser.add_argument("--references", default=REFERENCES, help="the references stage's results.json")
    parser.add_argument("--out", default="artifacts/eval")


def work(params, args, run) -> str:
    import torch

    from cpcsam.data import load_classes, load_manifest, read_image
    from cpcsam.evaluation.protocols import EvalConfig, evaluate_models, flat_metrics, image_records
    from cpcsam.evaluation.stored_results import read_results, result_scope
    from cpcsam.training.device import configure_process

    cfg = params.evaluate
    seed = params.stage_seed("evaluate")
    eval_cfg = EvalConfig.from_section(cfg, seed)  # checks the protocols before any work
    torch.manual_seed(seed)
    configure_process(cfg.threads, large_blocks_from_heap=True)  # no gradients here
    classes = load_classes(args.classes)
    engines = load_models(params, args.trained, args.sam)
    started = time.perf_counter()

    def load_image(im):
        return np.array(read_image(im.uri))  # a writable copy (torch warns on read-only arrays)

    manifest = load_manifest(args.manifest)
    images = image_records(manifest, cfg.splits, cfg.max_images, seed)
    references = {}
    if cfg.references:
        references = read_results(args.references, result_scope(args.manifest, images, eval_cfg, True), "references")
    thresholds, calibration = None, None
    if cfg.threshold == "auto":
        thresholds, calibration = calibrate_thresholds(params, engines, manifest, classes["base"], seed, load_image)
    metrics, overlays = evaluate_models(engines, images, classes["base"], classes["target"], eval_cfg, load_image,
                                        headline_model=cfg.headline.model, headline_protocol=cfg.headline.protocol,
                                        thresholds=thresholds, scored_elsewhere=references)
    if calibration is not None:
        metrics["calibration"] = calibration
    metrics["sources"] = {"sam": args.sam, **{v: str(trained_model_path(v, args.trained)) for v in params.variants},
                          **{name: args.references for name in references}}
    out = Path(args.out)
    seconds = time.perf_counter() - started
    written = write_outputs(out, metrics, overlays, images, load_image)
    # Wall time differs run to run: beside the outs, never in one (DVC outs must be reproducible).
    write_json_atomic(out / "timing.json", {"seconds": seconds, "images": len(images), "models": len(engines),
                                            "references_read": len(references)})
    run.log_params({"evaluate.images": len(images), "evaluate.protocols": ",".join(metrics["protocols"]),
                    "evaluate.models": ",".join(metrics["models"])})
    run.log_metrics(flat_metrics(metrics))
    for path in written:
        rel = path.relative_to(out).parent.as_posix()
        run.log_artifact(str(path), "eval" if rel == "." else f"eval/{rel}")
    head = metrics["headline"]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    return (f"evaluate: {len(images)} images, models {', '.join(metrics['models'])}; {head['model']} {head['protocol']}: "
            f"target Dice {fmt(head['target_dice'])}, base Dice {fmt(head['base_dice'])} -> {out / 'table.md'}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, add_arguments, work, argv)


if __name__ == "__main__":
    sys.exit(main())
