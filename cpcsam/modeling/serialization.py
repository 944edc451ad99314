"""Saving and loading a trained CPC-SAM: SAM weights + LoRA + CaPL + the config to rebuild it.

File format (`torch.save` of a dict, loadable with `weights_only=True`):

    {"format": "cpcsam/1",
     "model_cfg": {...},          # the `model` section it was built from (checkpoint key dropped)
     "lora": {...} | None,        # resolved `model.lora` when adapters are present (unmerged)
     "state_dict": {...}}         # CPCSAM.state_dict(): `sam.*` (with PEFT keys) and `capl.*`

`load_cpcsam` rebuilds the architecture from `model_cfg` (random init, no SAM checkpoint read),
re-injects LoRA when the file has it, and loads the state dict with strict key and shape checks;
with `fold_lora=True` (inference) it folds the adapters into the weights instead, without PEFT.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch

from cpcsam.errors import CheckpointError
from cpcsam.modeling.build import build_sam, load_state_dict_strict, read_uri_bytes
from cpcsam.modeling.cpcsam import CPCSAM
from cpcsam.config import LoraConfig, ModelConfig, coerce
from cpcsam.files import torch_load_weights, torch_save_atomic
from cpcsam.modeling.lora import apply_lora, fold_lora_state, has_lora

FORMAT = "cpcsam/1"


def build_cpcsam(model_cfg: ModelConfig | Mapping[str, Any], with_lora: bool = False) -> CPCSAM:
    """SAM from `model_cfg` (its checkpoint, when named) + CaPL from `model_cfg.capl`, LoRA optional."""
    model_cfg = coerce(ModelConfig, model_cfg, "model")
    model = CPCSAM(build_sam(model_cfg), model_cfg.capl)
    if with_lora:
        apply_lora(model, model_cfg.lora)
    return model


def save_cpcsam(path: str | Path, model: CPCSAM, model_cfg: ModelConfig | Mapping[str, Any]) -> None:
    """Write `model` and the config that rebuilds it to a local file (atomically) or `s3://` URI."""
    # The weights are in this file: do not depend on the original checkpoint.
    cfg = coerce(ModelConfig, model_cfg, "model").model_copy(update={"checkpoint": None, "capl": model.capl_cfg})
    payload = {
        "format": FORMAT,
        "model_cfg": cfg.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json") if has_lora(model) else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if str(path).startswith("s3://"):
        from cpcsam.data import storage

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        storage.write_bytes(str(path), buffer.getvalue())  # an S3 PUT is atomic already
        return
    torch_save_atomic(payload, path)  # a killed save never leaves a truncated file behind


def load_cpcsam(uri: str | Path, map_location: str | torch.device = "cpu", fold_lora: bool = False) -> CPCSAM:
    """Rebuild a CPC-SAM saved by `save_cpcsam` (local path or `s3://`), strict keys. Eval mode.

    `fold_lora`: LoRA folded into plain weights (the bits `merge_lora` gives), for inference."""
    uri = str(uri)
    data = read_uri_bytes(uri)  # apart: an S3 outage must not read as a bad checkpoint
    payload = torch_load_weights(data, uri, "CPC-SAM file")  # a pickle with code is refused
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{uri}: not a CPC-SAM file of format {FORMAT!r} (found {found!r})")
    cfg = ModelConfig.from_params({**payload["model_cfg"], "checkpoint": None}, f"{uri} model_cfg")
    model = CPCSAM(build_sam(cfg), cfg.capl)
    state = payload["state_dict"]
    if payload.get("lora") is not None:
        lora = LoraConfig.from_params(payload["lora"], f"{uri} lora")
        if fold_lora:
            state = fold_lora_state(state, lora)
        else:
            apply_lora(model, lora)
    load_state_dict_strict(model, state, source=uri)
    model.crop = cfg.crop
    model.eval()
    return model.to(map_location)
