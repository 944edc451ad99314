"""Pipeline step `references`: the prompt-only rows of evaluate's table (`filled_box`, `grabcut`).

    python -m components.references [--params params.yaml] [--out artifacts/references]

Reads `seed` and `evaluate:` (the same images, protocols and seeded prompts as `evaluate`); writes
`results.json` (cpcsam.evaluation.stored_results), which `evaluate` adds to its table. With
`evaluate.references: false` the file holds no model. Exits 2 with one line on bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from components.cli import stage_main

MANIFEST = "data/ingest/manifest.parquet"
CLASSES = "data/ingest/classes.json"
RESULTS = "results.json"


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", default=MANIFEST)
    parser.add_argument("--classes", default=CLASSES)
    parser.add_argument("--out", default="artifacts/references")


def work(params, args, run) -> str:
    from cpcsam.data import load_classes, load_manifest, read_image
    from cpcsam.evaluation.protocols import EvalConfig, flat_metrics, image_records, score_models
    from cpcsam.evaluation.references import reference_engines
    from cpcsam.evaluation.stored_results import result_scope, write_results
    from cpcsam.training.device import configure_process

    cfg = params.evaluate
    seed = params.stage_seed("evaluate")  # evaluate's prompts, so evaluate's seed
    eval_cfg = EvalConfig.from_section(cfg, seed)
    configure_process(1)  # no torch work here; one thread beside the trainings
    classes = load_classes(args.classes)
    images = image_records(load_manifest(args.manifest), cfg.splits, cfg.max_images, seed)
    engines = reference_engines() if cfg.references else {}
    results = score_models(engines, images, classes["base"], classes["target"], eval_cfg,
                           lambda im: np.array(read_image(im.uri)))
    out = Path(args.out) / RESULTS
    write_results(out, results, result_scope(args.manifest, images, eval_cfg, cfg.references))
    run.log_params({"references.images": len(images), "references.models": ",".join(results) or "none"})
    run.log_metrics(flat_metrics({"models": {name: {"protocols": r.protocols} for name, r in results.items()}}))
    rows = ", ".join(results) if results else "none (evaluate.references is false)"
    return f"references: {len(images)} images, rows {rows} -> {out}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("references", __doc__, add_arguments, work, argv)


if __name__ == "__main__":
    sys.exit(main())
