"""Pipeline step `train`: bi-level CaPL <-> LoRA-SAM training (or a baseline mode), resumable.

    python -m components.train [--params params.yaml] [--manifest data/ingest/manifest.parquet]
                               [--prompts data/prompts/prompts.parquet] [--sam artifacts/pretrain/sam.pth]
                               [--embeddings data/embeddings] [--out artifacts/train] [--model artifacts/train/model.pt]

Reads `seed`, `train:`, `model:` and `perturb.k/prompt_slots`. Writes `checkpoints/` (every
`train.checkpoint_every` steps; a restarted run resumes from the latest compatible one),
`curve.csv`, `metrics.json` under `--out` and the trained model (`save_cpcsam`) to `--model`.
Baselines for the evaluation: `-S train.mode=lora-only --out artifacts/baselines/lora_only
--model artifacts/baselines/lora_only.pt` (likewise `full-finetune`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params, section
from cpcsam.errors import CpcSamError

log = logging.getLogger("components.train")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", __doc__)
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--prompts", default="data/prompts/prompts.parquet")
    parser.add_argument("--sam", default="artifacts/pretrain/sam.pth", help="SAM weights to start from")
    parser.add_argument("--embeddings", default="data/embeddings")
    parser.add_argument("--out", default="artifacts/train")
    parser.add_argument("--model", default=None, help="trained model file (default: <out>/model.pt)")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out)
    model_path = Path(args.model) if args.model else out / "model.pt"
    try:
        from cpcsam.data import load_manifest
        from cpcsam.modeling import save_cpcsam
        from cpcsam.prompts.perturb import load_prompts
        from cpcsam.training.config import TrainConfig, apply_threads, stage_seed
        from cpcsam.training.run import prepare_training, training_model_cfg

        params = load_params(args.params, args.overrides)
        model_section = section(params, "model")
        seed = stage_seed(params, "train")
        apply_threads(TrainConfig.from_params(params.get("train") or {}).threads)
        from components.tracking import stage_run

        with stage_run("train", params) as run:
            trainer = prepare_training(
                params,
                load_manifest(args.manifest),
                load_prompts(args.prompts),
                args.sam,
                out,
                embeddings_dir=args.embeddings,
                metric_logger=run,
                train_overrides={"seed": seed},
            )
            run.log_params({"train.effective_seed": seed, "train.cached_embeddings": trainer.data.uses_embeddings,
                            "train.images": len(trainer.data.image_ids)})
            summary = trainer.run(resume=not args.no_resume)
            save_cpcsam(model_path, trainer.model, training_model_cfg(model_section, trainer.cfg.mode, None))
            run.log_metrics({f"final_{k}": v for k, v in summary["final"].items()}, step=trainer.step)
            run.log_artifact(out / "curve.csv")
            run.log_artifact(out / "metrics.json")
    except CpcSamError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items() if k.startswith("loss"))
    print(f"train[{summary['mode']}]: {summary['steps']} steps, {final} -> {model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
