"""Pipeline step `pretrain`: the SAM weights that training starts from.

    python -m components.pretrain [--params params.yaml] [--manifest data/ingest/manifest.parquet] [--out artifacts/pretrain]

- `model.checkpoint` set (a segment-anything checkpoint, local path or `s3://`): the checkpoint is
  loaded with strict key checks (so a wrong file fails here, not mid-training) and copied to
  `sam.pth`; nothing is trained.
- `model.checkpoint: null` (no SA-1B weights offline): the small SAM is trained from scratch on
  the base classes of the training split with random GT-derived prompts (`pretrain:` section),
  standing in for SAM's pretraining.
Writes `sam.pth` (segment-anything state-dict format) and `metrics.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from components.cli import configure_logging, stage_parser
from cpcsam.config import load_params, section
from cpcsam.errors import CpcSamError

log = logging.getLogger("components.pretrain")


def adopt_checkpoint(uri: str, model_section: dict, out: Path) -> dict:
    """Validate an official checkpoint against `model.type` and place it at `out/sam.pth`."""
    from cpcsam.modeling import build_sam
    from cpcsam.modeling.build import count_parameters, read_uri_bytes

    sam = build_sam(model_section)  # strict key/shape check against the configured type
    target = out / "sam.pth"
    tmp = out / ".sam.pth.tmp"
    tmp.unlink(missing_ok=True)
    if uri.startswith("s3://"):
        tmp.write_bytes(read_uri_bytes(uri))
    else:
        try:
            os.link(uri, tmp)  # same filesystem: no copy of a 0.4-2.5 GB file
        except OSError:
            shutil.copyfile(uri, tmp)
    tmp.replace(target)
    digest = hashlib.sha256()
    with open(target, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return {
        "source": "checkpoint",
        "checkpoint": uri,
        "sha256": digest.hexdigest(),
        "type": model_section["type"],
        "parameters": count_parameters(sam),
    }


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("pretrain", __doc__)
    parser.add_argument("--manifest", default="data/ingest/manifest.parquet")
    parser.add_argument("--out", default="artifacts/pretrain")
    args = parser.parse_args(argv)
    configure_logging()
    out = Path(args.out)
    try:
        import dataclasses

        from cpcsam.training.config import PretrainConfig, apply_threads, stage_seed

        params = load_params(args.params, args.overrides)
        model_section = dict(section(params, "model"))
        out.mkdir(parents=True, exist_ok=True)
        from components.tracking import stage_run

        with stage_run("pretrain", params) as run:
            checkpoint = model_section.get("checkpoint")
            if checkpoint:
                metrics = adopt_checkpoint(str(checkpoint), model_section, out)
            else:
                from cpcsam.data import load_manifest
                from cpcsam.training.pretrain import pretrain_sam

                cfg = PretrainConfig.from_params(params.get("pretrain") or {})
                cfg = dataclasses.replace(cfg, seed=stage_seed(params, "pretrain"))
                apply_threads(cfg.threads)
                run.log_params({"pretrain.effective_seed": cfg.seed})
                _, metrics = pretrain_sam(model_section, cfg, load_manifest(args.manifest), out / "sam.pth",
                                          metric_logger=run)
                run.log_metrics({f"final_{k}": v for k, v in metrics["final"].items()})
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
            run.log_dict(metrics, "pretrain/metrics.json")
    except CpcSamError as exc:
        print(f"pretrain: {exc}", file=sys.stderr)
        return 2
    if metrics["source"] == "checkpoint":
        print(f"pretrain: using checkpoint {metrics['checkpoint']} ({metrics['type']}) -> {out / 'sam.pth'}")
    else:
        print(f"pretrain: {metrics['steps']} steps in {metrics['seconds']:.0f} s, mask IoU "
              f"{metrics['first']['mask_iou']:.2f} -> {metrics['final']['mask_iou']:.2f} -> {out / 'sam.pth'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
