"""Pipeline step `perturb`: K perturbed prompts per training entity (METHOD.md §1).

    python -m components.perturb [--params params.yaml] [--manifest data/ingest/manifest.parquet] [--out data/prompts]

Reads `seed` and `perturb:`; writes `prompts.parquet` (docs/CONTRACTS.md "Prompts"). Every
prompt is a pure function of (seed, image id, entity id, k), so the file is byte-reproducible.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params
from cpcsam.errors import CpcSamError

log = logging.getLogger("components.perturb")

PROMPTS = "prompts.parquet"


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("perturb", __doc__)
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--out", default="data/prompts")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        from cpcsam.data import load_manifest
        from cpcsam.prompts.perturb import PerturbConfig, perturb_manifest
        from cpcsam.training.config import stage_seed

        params = load_params(args.params, args.overrides)
        cfg = PerturbConfig.from_params(params.get("perturb") or {})
        seed = stage_seed(params, "perturb")
        manifest = load_manifest(args.manifest)
        table = perturb_manifest(manifest, cfg, seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{PROMPTS}.tmp"
        table.to_parquet(tmp, index=False)
        tmp.replace(out / PROMPTS)
        kinds = table["kind"].value_counts(normalize=True).to_dict()
        from components.tracking import stage_run

        with stage_run("perturb", params) as run:
            run.log_params({"perturb.effective_seed": seed})
            run.log_metrics(
                {"prompts": len(table), "entities": table["entity_id"].nunique(),
                 **{f"fraction_{k.replace('+', '_')}": float(v) for k, v in kinds.items()}}
            )
    except CpcSamError as exc:
        print(f"perturb: {exc}", file=sys.stderr)
        return 2
    print(f"perturb: {len(table)} prompts for {table['entity_id'].nunique()} training entities (K={cfg.k}) -> {out / PROMPTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
