"""Fixtures for the export tests: a small CPC-SAM whose CaPL and LoRA really change its output."""

from __future__ import annotations

import pytest
import torch

from cpcsam.modeling import build_cpcsam


def calibrated_small_model(seed: int = 0):
    """A `small` CPC-SAM with LoRA adapters and CaPL (causal mode), all moved off their identity init.

    LoRA's B matrices and CaPL's zero-initialised last layers start at zero, which would make an
    export that forgot either of them pass unnoticed; random non-zero values make them matter.
    """
    torch.manual_seed(seed)
    model = build_cpcsam({"type": "small", "capl": {"mode": "causal"}}, with_lora=True)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("capl.") or "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="session")
def calibrated_model():
    return calibrated_small_model()


@pytest.fixture(scope="session")
def exported(calibrated_model, tmp_path_factory):
    """The model exported once for the session: (LoRA-merged model, encoder path, decoder path)."""
    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export

    out = tmp_path_factory.mktemp("onnx")
    merged = prepare_for_export(calibrated_model)
    return merged, export_image_encoder(merged, out / "image_encoder.onnx"), export_decoder(merged, out / "decoder_capl.onnx")
