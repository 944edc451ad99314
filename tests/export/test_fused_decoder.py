"""The exported decoder's rearranged computation equals `CPCSAM.decode` (the trained form)."""

from __future__ import annotations

import pytest
import torch
from export_helpers import calibrated_small_model, saturate_entity_gates

from cpcsam.export.fused_decoder import decode_single_mask
from cpcsam.export.onnx import prepare_for_export
from cpcsam.modeling import build_cpcsam


def _calibrated(arch: str, mode: str = "causal", seed: int = 0):
    """`arch` with CaPL (and LoRA, merged) moved off identity: every term of the decoder matters."""
    if arch == "small" and mode == "causal":
        return prepare_for_export(calibrated_small_model(seed))
    torch.manual_seed(seed)
    model = build_cpcsam({"type": arch, "capl": {"mode": mode}})
    with torch.no_grad():
        for p in model.capl.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return prepare_for_export(model)


def _inputs(model, images: int, entities: int, points: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    c = model.sam.prompt_encoder.embed_dim
    h, w = model.embedding_size
    embeddings = torch.randn(images, c, h, w, generator=gen)
    index = torch.randint(0, images, (entities,), generator=gen)
    coords = torch.rand(entities, points, 2, generator=gen) * model.image_size
    labels = torch.tensor([[(-1, 0, 1, 2, 3)[(i + j) % 5] for j in range(points)] for i in range(entities)])
    return embeddings, index, model.embed_prompts(coords, labels)


def _assert_same(model, embeddings, index, sparse):
    keys = model.entity_keys(embeddings[:1])
    with torch.no_grad():
        ref = model.decode(embeddings, index, sparse, entity_keys=keys)
        low, iou = decode_single_mask(model, embeddings, index, sparse, keys)
    assert low.shape == ref.low_res_logits.shape and iou.shape == ref.iou_pred.shape
    scale = float(ref.low_res_logits.abs().max())
    torch.testing.assert_close(low, ref.low_res_logits, rtol=0, atol=2e-5 * max(1.0, scale))
    torch.testing.assert_close(iou, ref.iou_pred, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "arch,mode,images,entities,points",
    [
        ("small", "causal", 1, 5, 3),  # a refinement stage after SAM's ×4 upscaling
        ("small", "causal", 3, 7, 1),  # entities of several images (mask prompts give each its own)
        ("small", "fixed", 2, 4, 6),  # no entity module: no gates
        ("base_small", "causal", 1, 3, 4),  # SAM's own upscaling only, 8 heads
    ],
)
def test_matches_the_trained_form(arch, mode, images, entities, points):
    model = _calibrated(arch, mode)
    _assert_same(model, *_inputs(model, images, entities, points, seed=entities))


def test_matches_with_saturated_gates():
    """Gates far in log σ's linear tail (s ≈ −1e4) decide whole image→token rows: they must agree too."""
    model = saturate_entity_gates(_calibrated("small"))
    embeddings, index, sparse = _inputs(model, 1, 6, 3, seed=4)
    gates = model.entity_calibration(embeddings, index, sparse)
    assert min(float(g.min()) for g in gates.values()) < -1000
    _assert_same(model, embeddings, index, sparse)


def test_refuses_unmerged_lora():
    """With PEFT's wrappers the folded weights would miss the adapters: say so instead."""
    model = calibrated_small_model().eval()
    embeddings, index, sparse = _inputs(model, 1, 2, 3, seed=0)
    with pytest.raises(TypeError, match="prepare_for_export"):
        decode_single_mask(model, embeddings, index, sparse, model.entity_keys(embeddings))
