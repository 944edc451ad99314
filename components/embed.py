"""Pipeline step `embed`: cache the training images' embeddings when the image encoder is frozen.

    python -m components.embed [--params params.yaml] [--manifest data/ingest/manifest.parquet]
                               [--sam artifacts/pretrain/sam.pth] [--out data/embeddings]

The cache applies when training never changes the encoder (`model.lora.targets` without
`image_encoder_qkv`, mode not `full-finetune`, `train.embedding_cache` not `off`). Otherwise the
stage writes only an `index.json` saying why, and training runs the encoder itself.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params
from cpcsam.errors import CpcSamError

log = logging.getLogger("components.embed")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("embed", __doc__)
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--sam", default="artifacts/pretrain/sam.pth", help="SAM weights training starts from")
    parser.add_argument("--out", default="data/embeddings")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        from cpcsam.data import load_manifest
        from cpcsam.training.config import stage_seed
        from cpcsam.training.run import build_embedding_cache

        params = load_params(args.params, args.overrides)
        embed = params.get("embed") or {}
        params["train"] = {**(params.get("train") or {}), "seed": stage_seed(params, "train")}
        summary = build_embedding_cache(
            params,
            load_manifest(args.manifest),
            args.sam,
            args.out,
            batch_size=int(embed.get("batch_size", 4)),
            device=str(embed.get("device", "auto")),
        )
        from components.tracking import stage_run

        with stage_run("embed", params) as run:
            run.log_metrics({"cached_images": summary["images"], "enabled": float(summary["enabled"])})
    except CpcSamError as exc:
        print(f"embed: {exc}", file=sys.stderr)
        return 2
    if summary["enabled"]:
        print(f"embed: {summary['images']} image embeddings -> {args.out}")
    else:
        print(f"embed: no cache needed ({summary['reason']}) -> {Path(args.out) / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
