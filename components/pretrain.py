"""Pipeline step `pretrain`: the SAM weights that training starts from.

    python -m components.pretrain [--params params.yaml] [--out artifacts/pretrain]

- `model.checkpoint` set (a segment-anything checkpoint, local path or `s3://`; the embedded
  default names the shipped `checkpoints/sam_small_generalist.pth`): the checkpoint is loaded with
  strict key checks (so a wrong file fails here, not mid-training) and placed at `sam.pth`.
- `model.checkpoint: null`: SAM is pretrained from scratch on the procedural corpus
  (`cpcsam.training.pretrain`, `pretrain:` section), resumable from `<out>/checkpoints`; with
  `pretrain.distributed.nproc_per_node` > 1 on that many processes under torchrun.
Writes `sam.pth` (segment-anything state-dict format) and `metrics.json`; wall time goes to
`timing.json`, which is not a DVC out, so the outs are byte-reproducible.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from components.cli import stage_main


def adopt_checkpoint(uri: str, model_section, out: Path) -> dict:
    """Validate an official checkpoint against `model.type` and place it at `out/sam.pth`."""
    from cpcsam.files import atomic_path, sha256_file
    from cpcsam.modeling import build_sam
    from cpcsam.modeling.build import count_parameters, read_uri_bytes

    sam = build_sam(model_section)  # strict key/shape check against the configured type
    target = out / "sam.pth"
    with atomic_path(target) as tmp:
        if uri.startswith("s3://"):
            tmp.write_bytes(read_uri_bytes(uri))
        else:
            tmp.unlink()
            try:
                os.link(uri, tmp)  # same filesystem: no copy of a 0.4-2.5 GB file
            except OSError:
                shutil.copyfile(uri, tmp)
    return {"source": "checkpoint", "checkpoint": uri, "sha256": sha256_file(target), "type": model_section.type,
            "parameters": count_parameters(sam)}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="artifacts/pretrain")


def work(params, args, run) -> str:
    from cpcsam.files import write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if params.model.checkpoint:
        metrics = adopt_checkpoint(str(params.model.checkpoint), params.model, out)
        message = f"pretrain: using checkpoint {metrics['checkpoint']} ({metrics['type']}) -> {out / 'sam.pth'}"
    else:
        from cpcsam.training.device import configure_process, resolve_device
        from cpcsam.training.distributed import process_group
        from cpcsam.training.pretrain import pretrain_sam

        cfg = params.seeded("pretrain")
        configure_process(cfg.threads)
        with process_group(cfg.distributed.backend, resolve_device(cfg.device)) as world:
            run.log_params({"pretrain.effective_seed": cfg.seed, "pretrain.processes": world.size})
            _, metrics = pretrain_sam(params.model, cfg, out / "sam.pth", metric_logger=run,
                                      checkpoint_dir=out / "checkpoints")
            if not world.is_main:
                return "pretrain: done (rank 0 writes the outputs)"
        run.log_metrics({f"final_{k}": v for k, v in metrics["final"].items()})
        message = (f"pretrain: {metrics['steps']} steps, mask IoU {metrics['first']['mask_iou']:.2f} -> "
                   f"{metrics['final']['mask_iou']:.2f}, held-out box@0 IoU {metrics['val_box_iou']} -> {out / 'sam.pth'}")
    write_json_atomic(out / "metrics.json", metrics)
    run.log_dict(metrics, "pretrain/metrics.json")
    return message


def processes(params) -> int:
    """torchrun workers for the stage: `pretrain.distributed` when it pretrains, one to adopt a checkpoint."""
    return 1 if params.model.checkpoint else params.pretrain.distributed.nproc_per_node


def resume_hint(args) -> str:
    return f"Running the stage again resumes from the latest checkpoint in {Path(args.out) / 'checkpoints'}"


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain", __doc__, add_arguments, work, argv, processes=processes, failure_hint=resume_hint)


if __name__ == "__main__":
    sys.exit(main())
