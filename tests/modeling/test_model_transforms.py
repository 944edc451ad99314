"""Image/coordinate/mask geometry between the original image and SAM's square model frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from cpcsam.modeling import build_sam
from cpcsam.modeling.transforms import (
    boxes_to_model,
    coords_to_model,
    coords_to_original,
    mask_to_model,
    postprocess_masks,
    preprocess_image,
    preprocess_images,
    resized_shape,
)

SIZES = [(300, 200), (200, 300), (256, 256), (97, 411), (1200, 1800)]


@pytest.mark.parametrize("height, width", SIZES)
def test_resized_shape_matches_segment_anything(height, width):
    assert resized_shape(height, width, 256) == ResizeLongestSide.get_preprocess_shape(height, width, 256)


@pytest.mark.parametrize("height, width", SIZES)
def test_coords_round_trip_and_match_segment_anything(height, width):
    gen = np.random.default_rng(0)
    coords = gen.uniform(0, [width, height], size=(7, 3, 2))
    model = coords_to_model(coords, (height, width), 256)
    expected = ResizeLongestSide(256).apply_coords(coords, (height, width))
    np.testing.assert_allclose(model.numpy(), expected, rtol=1e-5, atol=1e-3)
    back = coords_to_original(model, (height, width), 256)
    np.testing.assert_allclose(back.numpy(), coords, rtol=1e-5, atol=1e-3)
    box = np.array([[0.0, 0.0, width, height]])
    new_h, new_w = resized_shape(height, width, 256)
    np.testing.assert_allclose(boxes_to_model(box, (height, width), 256).numpy(), [[0, 0, new_w, new_h]], atol=1e-3)


def test_preprocess_resizes_normalises_and_pads():
    gen = np.random.default_rng(1)
    image = gen.integers(0, 256, size=(120, 300, 3), dtype=np.uint8)
    x = preprocess_image(image, 256)
    new_h, new_w = resized_shape(120, 300, 256)
    assert x.shape == (3, 256, 256) and x.dtype == torch.float32
    assert torch.all(x[:, new_h:, :] == 0) and torch.all(x[:, :, new_w:] == 0)
    # Same frame as SAM's own pipeline (PIL resize of uint8 + Sam.preprocess) up to uint8 rounding.
    sam = build_sam({"type": "small"})
    resized = ResizeLongestSide(256).apply_image(image)
    ref = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1).float())
    assert (x - ref).abs().mean() < 0.02  # normalised units: ~1 grey level of 255
    # A tensor input (3×H×W, 0..255) gives the same frame; a batch stacks them.
    same = preprocess_image(torch.from_numpy(image).permute(2, 0, 1), 256)
    assert torch.equal(same, x)
    assert preprocess_images([image, image[:50]], 256).shape == (2, 3, 256, 256)


@pytest.mark.parametrize("height, width", SIZES)
def test_mask_goes_to_low_res_frame_and_back(height, width):
    """A mask → low-res model frame (decoder output frame) → postprocess → original size keeps its shape."""
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 5 : 3 * height // 5, width // 4 : 4 * width // 5] = True
    low = mask_to_model(mask, 256, out_size=64)
    assert low.shape == (64, 64)
    logits = (low * 20 - 10)[None, None]  # logit-like: positive inside
    back = postprocess_masks(logits, (height, width), 256)[0, 0] > 0
    assert back.shape == (height, width)
    iou = (back.numpy() & mask).sum() / (back.numpy() | mask).sum()
    assert iou > 0.9


@pytest.mark.parametrize("height, width", [(300, 200), (97, 411)])
def test_postprocess_matches_sam(height, width):
    sam = build_sam({"type": "small"})
    low = torch.randn(3, 1, 64, 64)
    ours = postprocess_masks(low, (height, width), 256)
    theirs = sam.postprocess_masks(low, resized_shape(height, width, 256), (height, width))
    assert torch.equal(ours, theirs)


# landscape and portrait, square, a prime side, an image smaller than the frame, a thin strip
OFFICIAL_FRAME_SIZES = [(1200, 1800), (1800, 1200), (1024, 1024), (1201, 640), (100, 150), (33, 2000)]


@pytest.mark.parametrize("height, width", OFFICIAL_FRAME_SIZES)
def test_upsampling_only_what_the_crop_keeps_is_bit_identical_to_sams_whole_frame(height, width):
    """`postprocess_masks` upsamples only the low-resolution rows/cols the crop keeps; SAM's own
    `Sam.postprocess_masks` (called here on a stand-in with the official 1024 frame) upsamples the
    whole square and crops afterwards."""
    from types import SimpleNamespace

    from segment_anything.modeling import Sam

    low = torch.nn.functional.interpolate(torch.randn(2, 1, 32, 32) * 20, size=(256, 256), mode="bilinear")
    official = SimpleNamespace(image_encoder=SimpleNamespace(img_size=1024))
    theirs = Sam.postprocess_masks(official, low, resized_shape(height, width, 1024), (height, width))
    assert torch.equal(postprocess_masks(low, (height, width), 1024), theirs)


def test_mask_in_model_frame_is_padded_with_background():
    mask = np.ones((100, 400), dtype=bool)
    full = mask_to_model(mask, 256)
    new_h, _ = resized_shape(100, 400, 256)
    assert full.shape == (256, 256)
    assert torch.all(full[: new_h - 1] > 0.99) and torch.all(full[new_h + 1 :] == 0)
