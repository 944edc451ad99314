"""A small CPC-SAM whose CaPL and LoRA really change its output (shared by the export, evaluation
and prediction tests; import with `tests/export` on `sys.path`)."""

from __future__ import annotations

import torch

from cpcsam.modeling import build_cpcsam

SMALL_CFG = {"type": "small", "capl": {"mode": "causal"}, "lora": {}}


def calibrated_small_model(seed: int = 0, **capl):
    """A `small` CPC-SAM with LoRA adapters and CaPL (causal mode, plus any other `capl` keys),
    all moved off their identity init.

    LoRA's B matrices and CaPL's zero-initialised last layers start at zero, which would make an
    export that forgot either of them pass unnoticed; random non-zero values make them matter.
    """
    torch.manual_seed(seed)
    model = build_cpcsam({"type": "small", "capl": {"mode": "causal", **capl}}, with_lora=True)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("capl.") or "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def saturate_entity_gates(model, factor: float = 300.0):
    """Scale the entity module's query head (the only source of q) by `factor`, in place.

    s = q·k/√r scales with it: at 300, s reaches about −1e4 and, in the image→token attention,
    whole rows (one image position, all T tokens) have every gate far below −69 — the regime
    a trained module reaches when it learns to shut positions off. Returns the model.
    """
    head = model.capl.entity.query_head
    with torch.no_grad():
        head.weight.mul_(factor)
        head.bias.mul_(factor)
    return model


def export_small_model(root, seed: int = 0):
    """`root/model.pt` and `root/onnx/{image_encoder,decoder_capl}.onnx` of one small calibrated CPC-SAM."""
    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export
    from cpcsam.modeling import save_cpcsam

    model = calibrated_small_model(seed)
    save_cpcsam(root / "model.pt", model, SMALL_CFG)
    merged = prepare_for_export(model)
    export_image_encoder(merged, root / "onnx" / "image_encoder.onnx")
    export_decoder(merged, root / "onnx" / "decoder_capl.onnx")
    return root
