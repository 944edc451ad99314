"""Pipeline step `embed`: cache the training images' embeddings when the image encoder is frozen.

    python -m components.embed [--params params.yaml] [--manifest data/ingest/manifest.parquet]
                               [--sam artifacts/pretrain/sam.pth] [--out data/embeddings]

The cache applies when training never changes the encoder (`model.lora.targets` without
`image_encoder_qkv`, mode not `full-finetune`, `train.embedding_cache` not `off`). Otherwise the
stage writes only an `index.json` saying why, and training runs the encoder itself.
With `train.distributed.nproc_per_node` > 1 the images are encoded by that many processes
(torchrun, as the train stage), each writing its share; the files are the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

from components.cli import stage_main


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--sam", default="artifacts/pretrain/sam.pth", help="SAM weights training starts from")
    parser.add_argument("--out", default="data/embeddings")


def work(params, args, run) -> str:
    from cpcsam.data import load_manifest
    from cpcsam.training.device import configure_process, resolve_device
    from cpcsam.training.distributed import process_group
    from cpcsam.training.run import build_embedding_cache

    train = params.seeded("train")
    configure_process(train.threads, large_blocks_from_heap=True)  # no gradients here
    with process_group(train.distributed.backend, resolve_device(params.embed.device)):
        summary = build_embedding_cache(train, params.model, params.embed, load_manifest(args.manifest), args.sam,
                                        args.out)
    run.log_metrics({"cached_images": summary["images"], "enabled": float(summary["enabled"])})
    if summary["enabled"]:
        return f"embed: {summary['images']} image embeddings -> {args.out}"
    return f"embed: no cache needed ({summary['reason']}) -> {Path(args.out) / 'index.json'}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("embed", __doc__, add_arguments, work, argv,
                      processes=lambda params: params.train.distributed.nproc_per_node,
                      failure_hint=lambda args: "Running the stage again encodes the images again")


if __name__ == "__main__":
    sys.exit(main())
