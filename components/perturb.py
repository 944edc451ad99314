"""Pipeline step `perturb`: K perturbed prompts per training entity (docs/METHOD.md §1).

    python -m components.perturb [--params params.yaml] [--manifest data/ingest/manifest.parquet] [--out data/prompts]

Reads `seed` and `perturb:`; writes `prompts.parquet` (docs/CONTRACTS.md "Prompts"). Every
prompt is a pure function of (seed, image id, entity id, k), so the file is byte-reproducible.
"""

from __future__ import annotations

import sys
from pathlib import Path

from components.cli import stage_main

PROMPTS = "prompts.parquet"


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--out", default="data/prompts")


def work(params, args, run) -> str:
    from cpcsam.data import load_manifest
    from cpcsam.prompts.perturb import perturb_manifest
    from cpcsam.files import atomic_path

    cfg = params.seeded("perturb")
    table = perturb_manifest(load_manifest(args.manifest), cfg, cfg.seed)
    out = Path(args.out) / PROMPTS
    with atomic_path(out) as tmp:
        table.to_parquet(tmp, index=False)
    kinds = table["kind"].value_counts(normalize=True).to_dict()
    run.log_params({"perturb.effective_seed": cfg.seed})
    run.log_metrics({"prompts": len(table), "entities": table["entity_id"].nunique(),
                     **{f"fraction_{k.replace('+', '_')}": float(v) for k, v in kinds.items()}})
    return f"perturb: {len(table)} prompts for {table['entity_id'].nunique()} training entities (K={cfg.k}) -> {out}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("perturb", __doc__, add_arguments, work, argv)


if __name__ == "__main__":
    sys.exit(main())
