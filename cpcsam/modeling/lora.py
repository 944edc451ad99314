"""LoRA adapters on SAM through PEFT, and merging them back for export.

Adapters go on the image encoder's fused `qkv` projections and on the mask decoder transformer's
attention projections (`q_proj`, `k_proj`, `v_proj`, `out_proj` of the self and cross
attentions); every other SAM weight is frozen. PEFT's `inject_adapter_in_model` modifies SAM in
place (no `PeftModel` wrapper, so module paths and SAM's own state-dict keys keep their shape,
apart from PEFT's `base_layer.` level). CaPL lives outside `sam` and is never touched.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping

from torch import nn

from cpcsam.config import LoraConfig, coerce
from cpcsam.errors import ConfigError
from cpcsam.modeling.cpcsam import _unwrap

logger = logging.getLogger(__name__)

# Named target groups (params.yaml `model.lora.targets`) → regex on module paths inside `Sam`.
LORA_TARGETS: dict[str, str] = {
    "image_encoder_qkv": r"image_encoder\.blocks\.\d+\.attn\.qkv",
    "decoder_attention": r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj)",
}


def _adapter_layer_type() -> type | None:
    """PEFT's adapter layer base class, or None if PEFT was never imported in this process.

    Importing PEFT takes over a second (it imports transformers), in every stage process. A model
    can only hold PEFT layers once `apply_lora` has imported PEFT, so until then there is none to
    look for: stages that never build LoRA (pretraining, the embedding cache) never pay for it.
    """
    module = sys.modules.get("peft.tuners.tuners_utils")
    return None if module is None else module.BaseTunerLayer


def _adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layer_type = _adapter_layer_type()
    if layer_type is None:
        return []
    return [(name, m) for name, m in _unwrap(model).named_modules() if isinstance(m, layer_type)]


def has_lora(model: nn.Module) -> bool:
    return bool(_adapter_layers(model))


def apply_lora(model: nn.Module, cfg: LoraConfig | Mapping[str, Any] | None = None) -> nn.Module:
    """Inject LoRA adapters into SAM (a `Sam` or the `sam` of a `CPCSAM`) and freeze the rest of SAM.

    Returns `model` (modified in place). CaPL's parameters keep their `requires_grad`.
    """
    cfg = coerce(LoraConfig, cfg, "model.lora")
    sam = _unwrap(model)
    if has_lora(sam):
        raise ConfigError("apply_lora: the model already carries LoRA adapters")
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    pattern = "|".join(f"(?:{LORA_TARGETS[t]})" for t in cfg.targets)
    config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=float(cfg.dropout),
        target_modules=f"^(?:{pattern})$",
        bias="none",
    )
    inject_adapter_in_model(config, sam)
    for name, param in sam.named_parameters():
        param.requires_grad_("lora_" in name)
    n_layers = len(_adapter_layers(sam))
    logger.info("LoRA rank %d on %d layers (%s)", cfg.rank, n_layers, ", ".join(cfg.targets))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base `nn.Linear` and remove the adapter (in place).

    Afterwards SAM holds plain `nn.Linear` layers again and `model.sam.state_dict()` (or the
    `Sam`'s) loads into a plain segment-anything `Sam` with strict keys. Returns `model`.
    """
    sam = _unwrap(model)
    for path, _ in _adapter_layers(sam):
        parent_path, _, child = path.rpartition(".")
        parent = sam.get_submodule(parent_path) if parent_path else sam
        layer = getattr(parent, child)
        layer.merge()
        setattr(parent, child, layer.get_base_layer())
    if hasattr(sam, "peft_config"):
        del sam.peft_config
    return model


_ADAPTER = "default"  # the adapter name `inject_adapter_in_model` gives


def fold_lora_state(state: Mapping[str, Any], cfg: LoraConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A state dict with PEFT LoRA keys → the plain state dict of the merged model, without PEFT.

    What `apply_lora` + `load_state_dict` + `merge_lora` give, to the bit: PEFT merges a layer as
    W + (B @ A) · (alpha / rank) (`LoraLayer.get_delta_weight`, no rsLoRA, float32). Inference
    stages load models this way, because importing PEFT costs 1.3-4 s per process (it imports
    transformers) and they never train.
    """
    cfg = coerce(LoraConfig, cfg, "model.lora")
    scaling = cfg.alpha / cfg.rank
    suffix_a = f".lora_A.{_ADAPTER}.weight"
    out: dict[str, Any] = {}
    layers = {key[: -len(suffix_a)] for key in state if key.endswith(suffix_a)}
    for key, value in state.items():
        if ".lora_" in key:
            continue  # folded below
        head, sep, tail = key.rpartition(".base_layer.")  # an adapted Linear's own weight and bias
        out[f"{head}.{tail}" if sep and head in layers else key] = value
    for layer in sorted(layers):
        a, b = state[f"{layer}{suffix_a}"], state[f"{layer}.lora_B.{_ADAPTER}.weight"]
        out[f"{layer}.weight"] = out[f"{layer}.weight"] + (b @ a) * scaling
    return out


__all__ = ["apply_lora", "merge_lora", "has_lora", "fold_lora_state", "LORA_TARGETS"]
