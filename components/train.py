"""Pipeline step `train`: one variant (CPC-SAM, a baseline or an ablation), resumable.

    python -m components.train --variant cpcsam [--params params.yaml] [--manifest data/ingest/manifest.parquet]
                               [--prompts data/prompts/prompts.parquet] [--sam artifacts/pretrain/sam.pth]
                               [--embeddings data/embeddings] [--out artifacts/train/<variant>]

Reads `seed`, `train:`, `model:` and `perturb:`; the variant (`cpcsam.training.variants`) sets the
trainer mode and the CaPL mode. Writes under `--out` the DVC outs `curve.csv`, `metrics.json`
(with its budget: steps, images per step, trainable parameters) and `model.pt` (`save_cpcsam`);
checkpoints (every `train.checkpoint_every` steps; a restarted run resumes from the latest
compatible one) and `timing.json` (wall time: kept out of the outs, whose bytes must be
reproducible) go to `--checkpoints`.

`train.distributed.nproc_per_node` > 1: the stage re-launches itself under torchrun with that
many processes (`components.cli.launch_under_torchrun`); each one joins the process group here,
trains its slice of every global batch, and rank 0 alone writes the outs, checkpoints and MLflow
logs. Launched by torchrun yourself (`torchrun --nproc-per-node N -m components.train ...`), the
stage runs on the processes torchrun gives it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from components.cli import stage_main


def add_arguments(parser) -> None:
    parser.add_argument("--variant", default="cpcsam", help="an entry of variants")
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--prompts", default="data/prompts/prompts.parquet")
    parser.add_argument("--sam", default="artifacts/pretrain/sam.pth", help="SAM weights to start from")
    parser.add_argument("--embeddings", default="data/embeddings")
    parser.add_argument("--out", default=None, help="output folder (default: artifacts/train/<variant>)")
    parser.add_argument("--checkpoints", default=None, help="resumable checkpoints (default: artifacts/checkpoints/<variant>)")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")


def work(params, args, run) -> str:
    from cpcsam.data import load_manifest
    from cpcsam.errors import ConfigError
    from cpcsam.modeling import save_cpcsam
    from cpcsam.prompts.perturb import load_prompts
    from cpcsam.training.device import resolve_device
    from cpcsam.training.distributed import process_group
    from cpcsam.training.run import configure_training_process, prepare_training, training_model_cfg
    from cpcsam.training.variants import variant_sections

    if args.variant not in params.variants:
        raise ConfigError(f"--variant {args.variant!r} is not in variants {params.variants}")
    out = Path(args.out or f"artifacts/train/{args.variant}")
    train, model = variant_sections(args.variant, params.seeded("train"), params.model)
    configure_training_process(model, train)
    with process_group(train.distributed.backend, resolve_device(train.device)) as world:
        trainer = prepare_training(train, model, params.perturb, load_manifest(args.manifest),
                                   load_prompts(args.prompts), args.sam, out, embeddings_dir=args.embeddings,
                                   metric_logger=run, checkpoint_dir=checkpoint_dir(args))
        if world.is_main:
            run.set_tags({"cpcsam.variant": args.variant})
            run.log_params({"train.effective_seed": train.seed, "train.variant": args.variant,
                            "train.cached_embeddings": trainer.data.uses_embeddings,
                            "train.images": len(trainer.data.image_ids), "train.processes": world.size})
        summary = trainer.run(resume=not args.no_resume)
        if world.is_main:
            save_cpcsam(out / "model.pt", trainer.model, training_model_cfg(model, train.mode, None))
            run.log_metrics({f"final_{k}": v for k, v in summary["final"].items()}, step=trainer.step)
            run.log_artifact(out / "curve.csv")
            run.log_artifact(out / "metrics.json")
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items() if k.startswith("loss"))
    return f"train[{args.variant}: {summary['mode']}]: {summary['steps']} steps, {final} -> {out / 'model.pt'}"


def checkpoint_dir(args) -> Path:
    return Path(args.checkpoints or f"artifacts/checkpoints/{args.variant}")


def resume_hint(args) -> str:
    """Where a failed run left its checkpoints (for the launcher's failure message)."""
    from cpcsam.training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(checkpoint_dir(args))
    if latest is None:
        return f"No checkpoint in {checkpoint_dir(args)} yet; running the stage again starts over"
    return f"Running the stage again resumes from {latest} (any number of processes)"


def main(argv: list[str] | None = None) -> int:
    # one MLflow run per variant, named as its DVC stage
    return stage_main("train", __doc__, add_arguments, work, argv, run_name=lambda args: f"train@{args.variant}",
                      processes=lambda params: params.train.distributed.nproc_per_node, failure_hint=resume_hint)


if __name__ == "__main__":
    sys.exit(main())
