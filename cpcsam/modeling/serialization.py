"""Saving and loading a trained CPC-SAM: SAM weights + LoRA + CaPL + the config to rebuild it.

File format (`torch.save` of a dict, loadable with `weights_only=True`):

    {"format": "cpcsam/1",
     "model_cfg": {...},          # the `model` section it was built from (checkpoint key dropped)
     "lora": {...} | None,        # resolved `model.lora` when adapters are present (unmerged)
     "state_dict": {...}}         # CPCSAM.state_dict(): `sam.*` (with PEFT keys) and `capl.*`

`load_cpcsam` rebuilds the architecture from `model_cfg` (random init, no SAM checkpoint read),
re-injects LoRA when the file has it, and loads the state dict with strict key and shape checks.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Mapping

import torch

from cpcsam.errors import CheckpointError
from cpcsam.modeling.build import build_sam, load_state_dict_strict, read_uri_bytes
from cpcsam.modeling.cpcsam import CPCSAM
from cpcsam.modeling.lora import apply_lora, has_lora, resolve_lora_cfg

FORMAT = "cpcsam/1"


def build_cpcsam(model_cfg: Mapping[str, Any], with_lora: bool = False) -> CPCSAM:
    """SAM from `model_cfg` (its checkpoint, when named) + CaPL from `model_cfg["capl"]`, LoRA optional."""
    model = CPCSAM(build_sam(model_cfg), model_cfg.get("capl"))
    if with_lora:
        apply_lora(model, model_cfg.get("lora"))
    return model


def save_cpcsam(path: str | Path, model: CPCSAM, model_cfg: Mapping[str, Any]) -> None:
    """Write `model` and the config that rebuilds it to a local file (atomically) or `s3://` URI."""
    cfg = copy.deepcopy(dict(model_cfg))
    cfg.pop("checkpoint", None)  # the weights are in this file; do not depend on the original
    cfg["capl"] = dict(model.capl_cfg)
    lora = resolve_lora_cfg(cfg.get("lora")) if has_lora(model) else None
    payload = {
        "format": FORMAT,
        "model_cfg": cfg,
        "lora": lora,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if str(path).startswith("s3://"):
        from cpcsam.data import storage

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        storage.write_bytes(str(path), buffer.getvalue())  # an S3 PUT is atomic already
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a killed save never leaves a truncated file behind
    torch.save(payload, tmp)
    tmp.replace(path)


def load_cpcsam(uri: str | Path, map_location: str | torch.device = "cpu") -> CPCSAM:
    """Rebuild a CPC-SAM saved by `save_cpcsam` (local path or `s3://`), strict keys. Eval mode."""
    uri = str(uri)
    try:
        payload = torch.load(io.BytesIO(read_uri_bytes(uri)), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{uri}: not a loadable CPC-SAM file (weights_only=True): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{uri}: not a CPC-SAM file of format {FORMAT!r} (found {found!r})")
    cfg = dict(payload["model_cfg"])
    cfg.pop("checkpoint", None)
    model = CPCSAM(build_sam(cfg), cfg.get("capl"))
    if payload.get("lora") is not None:
        apply_lora(model, payload["lora"])
    load_state_dict_strict(model, payload["state_dict"], source=uri)
    model.eval()
    return model.to(map_location)
