"""ONNX export at the official sizes: ViT-B's decoder (256 channels, 64² grid, 256² mask input,
1024² frame) and ViT-B's encoder shapes (width 768, 1024² input, windows of 14 padded over the 64²
grid, global attention with 127-entry relative positions).

The encoder keeps ViT-B's width and geometry but two of its twelve blocks (one windowed, one
global): every operator and shape of the full encoder is in the graph, at a sixth of the export
time. Weights are random (no SA-1B weights here), moved off SAM's zero inits where they matter.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cpcsam.export.onnx import DecoderOnnxModel, export_decoder, export_image_encoder, prepare_for_export
from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
from cpcsam.modeling import CPCSAM
from cpcsam.modeling.build import ARCHS, build_sam_from_arch


def _vit_b_sized(encoder_depth: int, global_attn: tuple[int, ...]) -> CPCSAM:
    torch.manual_seed(0)
    arch = dataclasses.replace(ARCHS["vit_b"], encoder_depth=encoder_depth, encoder_global_attn_indexes=global_attn)
    model = CPCSAM(build_sam_from_arch(arch), {"mode": "causal"})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # CaPL's last layers start at zero: make the calibration matter
        for p in model.capl.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return prepare_for_export(model.eval())


@pytest.fixture(scope="module")
def vit_b_model():
    return _vit_b_sized(encoder_depth=2, global_attn=(1,))


def test_vit_b_decoder_graph_matches_pytorch(vit_b_model, tmp_path):
    model = vit_b_model
    assert model.embedding_size == (64, 64) and model.sam.prompt_encoder.embed_dim == 256
    decoder = OnnxDecoder(export_decoder(model, tmp_path / "decoder.onnx"), device="cpu")
    assert decoder.low_res_size == 256
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 256, 64, 64, generator=gen)
    for n in (1, 16):
        boxes = torch.sort(torch.rand(n, 2, 2, generator=gen) * 1024, dim=1).values
        point = torch.rand(n, 1, 2, generator=gen) * 1024
        coords = torch.cat([boxes, point], dim=1)
        labels = torch.tensor([[2.0, 3.0, 1.0]]).repeat(n, 1)
        size = (1200, 1800)
        with torch.no_grad():
            keys = model.entity_keys(emb).contiguous().numpy()
        out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), size, entity_keys=keys)
        with torch.no_grad():
            ref = DecoderOnnxModel(model)(
                emb, coords, labels, torch.zeros(n, 1, 256, 256), torch.zeros(n), torch.tensor(size, dtype=torch.float32)
            )
        assert out["masks"].shape == (n, 1, *size) and out["low_res_masks"].shape == (n, 1, 256, 256)
        scale = float(np.abs(ref[2].numpy()).max())
        assert np.abs(out["low_res_masks"] - ref[2].numpy()).max() <= 1e-4 * max(1.0, scale)
        assert np.abs(out["iou_predictions"] - ref[1].numpy()).max() <= 1e-4
        agree = ((out["masks"] > 0) == (ref[0].numpy() > 0)).mean()
        assert agree >= 0.9999


def test_vit_b_encoder_graph_matches_pytorch(vit_b_model, tmp_path):
    model = vit_b_model
    encoder = OnnxImageEncoder(export_image_encoder(model, tmp_path / "encoder.onnx"), device="cpu")
    assert encoder.image_size == 1024
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    out = encoder(image.numpy())
    with torch.no_grad():
        ref = model.encode_images(image)
        ref_keys = model.entity_keys(ref).numpy()
        ref = ref.numpy()
    assert out["image_embeddings"].shape == ref.shape == (1, 256, 64, 64)
    assert np.abs(out["image_embeddings"] - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))
    # The entity module's keys (5 sites x 8 heads, rank 8, per position) come out of the encoder graph too.
    assert out["entity_keys"].shape == ref_keys.shape == (1, 40, 8, 4096)
    assert np.abs(out["entity_keys"] - ref_keys).max() <= 1e-3 * max(1.0, float(np.abs(ref_keys).max()))
