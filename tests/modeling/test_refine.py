"""Mask refinement stages: a ×2 finer mask grid that starts as the plain decoder's upsampled masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from cpcsam.errors import CheckpointError, ConfigError
from cpcsam.modeling import CPCSAM, build_sam
from cpcsam.modeling.refine import ResidualUpsample
from cpcsam.training.pretrain import load_init
from modeling_helpers import random_prompts, randomize

REFINED = {"type": "small", "sizes": {"small": {"mask_refine_stages": 1}}}
PLAIN = {"type": "small", "sizes": {"small": {"mask_refine_stages": 0}}}


def _decode(model: CPCSAM, emb: torch.Tensor, seed: int = 0):
    coords, labels = random_prompts(3, 4, model.image_size, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.decode(emb, torch.zeros(3, dtype=torch.long), model.embed_prompts(coords, labels))


def _saved_random_sam(cfg: dict, path):
    """A SAM of `cfg` with every weight random (SAM's zero inits moved too), saved as a state dict."""
    torch.manual_seed(0)
    sam = build_sam(cfg)
    randomize(sam)
    torch.save(sam.state_dict(), path)
    return sam, str(path)


@pytest.fixture
def plain_checkpoint(tmp_path):
    return _saved_random_sam(PLAIN, tmp_path / "plain.pth")


def test_a_grown_checkpoint_predicts_its_own_masks_upsampled(plain_checkpoint):
    plain_sam, path = plain_checkpoint
    refined_sam = build_sam(REFINED)
    load_init(refined_sam, path)
    plain, refined = CPCSAM(plain_sam, {"mode": "fixed"}).eval(), CPCSAM(refined_sam, {"mode": "fixed"}).eval()
    assert (plain.mask_size, refined.mask_size) == (64, 128)
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(1))
    a, b = _decode(plain, emb), _decode(refined, emb)
    assert b.low_res_logits.shape == (3, 1, 128, 128)
    upsampled = F.interpolate(a.low_res_logits, scale_factor=2.0, mode="bilinear", align_corners=False)
    assert torch.allclose(b.low_res_logits, upsampled, atol=1e-4)
    assert torch.equal(a.iou_pred, b.iou_pred)
    # Once the residual is trained (non-zero), the masks carry detail the upsampling cannot.
    randomize(refined_sam.mask_decoder.output_upscaling[-1], std=0.5)
    assert (_decode(refined, emb).low_res_logits - upsampled).abs().max() > 1e-2


def test_growing_adds_only_refinement_tensors(plain_checkpoint, tmp_path):
    plain_sam, plain_path = plain_checkpoint
    state = plain_sam.state_dict()
    del state["mask_decoder.iou_token.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="mask_decoder.iou_token.weight"):
        load_init(build_sam(REFINED), str(path))
    # The strict loader (downstream stages) never grows: a plain checkpoint does not load into a refined model.
    with pytest.raises(CheckpointError, match="output_upscaling.5"):
        build_sam({**REFINED, "checkpoint": plain_path})


def test_refined_checkpoint_round_trips_and_trains(tmp_path):
    sam, path = _saved_random_sam(REFINED, tmp_path / "refined.pth")
    again = build_sam({**REFINED, "checkpoint": path})
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sam.state_dict().items())
    # The stage sits on the path of the loss: its weights receive gradients.
    model = CPCSAM(again, {"mode": "fixed"})
    coords, labels = random_prompts(2, 3, 256, torch.Generator().manual_seed(0))
    out = model.decode(torch.randn(1, 64, 16, 16), torch.zeros(2, dtype=torch.long), model.embed_prompts(coords, labels))
    out.low_res_logits.sum().backward()
    stage = again.mask_decoder.output_upscaling[-1]
    assert isinstance(stage, ResidualUpsample)
    assert stage.conv2.weight.grad is not None and stage.conv2.weight.grad.abs().sum() > 0


def test_refine_stage_bounds_are_checked():
    with pytest.raises(ConfigError, match="mask_refine_stages"):
        build_sam({"type": "small", "sizes": {"small": {"mask_refine_stages": 3}}})
    assert not any(isinstance(m, ResidualUpsample) for m in build_sam(PLAIN).modules())
    assert not any(isinstance(m, ResidualUpsample) for m in build_sam({"type": "vit_b"}).mask_decoder.modules())


def test_refined_decoder_exports_with_parity(tmp_path):
    """The exported graph carries the stage: 128² low-res masks equal to PyTorch's."""
    from cpcsam.export.onnx import DecoderOnnxModel, export_decoder, prepare_for_export
    from cpcsam.export.runtime import OnnxDecoder
    from cpcsam.modeling import build_cpcsam

    torch.manual_seed(0)
    model = build_cpcsam({**REFINED, "capl": {"mode": "causal"}}, with_lora=False)
    randomize(model)
    model = prepare_for_export(model.eval())
    path = export_decoder(model, tmp_path / "decoder.onnx")
    decoder = OnnxDecoder(path, device="cpu")
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(2))
    coords, labels = random_prompts(3, 4, 256, torch.Generator().manual_seed(3))
    labels = labels.float()
    with torch.no_grad():
        keys = model.entity_keys(emb).contiguous().numpy()
    out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (270, 480), entity_keys=keys)
    with torch.no_grad():
        ref = DecoderOnnxModel(model)(
            emb, coords, labels, torch.zeros(3, 1, 64, 64), torch.zeros(3), torch.tensor([270.0, 480.0])
        )
    assert out["low_res_masks"].shape == (3, 1, 128, 128)
    assert np.abs(out["low_res_masks"] - ref[2].numpy()).max() <= 1e-4
    assert np.abs(out["masks"] - ref[0].numpy()).max() <= 1e-4
