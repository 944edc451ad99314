"""The one inference object: the PyTorch and ONNX backends of `cpcsam.inference.Predictor` agree, and
test-time calibration (K' prompt variants) is PyTorch-only and says so on ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpcsam.errors import ConfigError
from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
from cpcsam.inference import OnnxBackend, Predictor, TorchBackend
from cpcsam.prompts.perturb import Prompt


def _image_and_prompts(seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
    boxes = [(20, 30, 120, 140), (100, 10, 230, 90), (60, 60, 90, 170)]
    prompts = [[Prompt("box", np.array([[x0, y0], [x1, y1]], np.float32), np.array([2, 3]))] for x0, y0, x1, y1 in boxes]
    return image, prompts


@pytest.fixture(scope="module")
def predictors(exported):
    merged, encoder_path, decoder_path = exported
    torch_side = Predictor(TorchBackend(merged))
    onnx_side = Predictor(OnnxBackend(OnnxImageEncoder(encoder_path, "cpu"), OnnxDecoder(decoder_path, "cpu")))
    return torch_side, onnx_side


def test_both_backends_give_the_same_masks_and_scores(predictors) -> None:
    image, prompts = _image_and_prompts()
    (torch_side, onnx_side) = predictors
    a, b = (p.encode(image) for p in predictors)
    assert a.orig_size == b.orig_size == (180, 240) and a.input_size == b.input_size
    coords, labels = _padded(torch_side, prompts, a.orig_size)
    ref, out = torch_side.decode(a, coords, labels), onnx_side.decode(b, coords, labels)
    assert ref.masks.shape == out.masks.shape == (3, 180, 240) and ref.iou_predictions.shape == (3,)
    scale = float(np.abs(ref.masks).max())
    assert np.abs(ref.masks - out.masks).max() <= 1e-3 * max(1.0, scale)
    assert np.abs(ref.iou_predictions - out.iou_predictions).max() <= 1e-4
    assert ((ref.masks > 0) == (out.masks > 0)).mean() >= 0.999
    np.testing.assert_array_equal(torch_side.predict(a, prompts), ref.masks)  # `predict` = `decode`'s masks


def _padded(predictor, prompts, size):
    from cpcsam.inference import pad_prompts

    return pad_prompts(prompts, size, predictor.image_size)


def test_test_time_calibration_is_pytorch_only(predictors) -> None:
    image, prompts = _image_and_prompts()
    torch_side, onnx_side = predictors
    twice = [variants * 2 for variants in prompts]  # K' = 2 identical variants: the same context ē
    a = torch_side.encode(image)
    np.testing.assert_allclose(torch_side.predict(a, twice), torch_side.predict(a, prompts), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="one prompt per entity; got 2 variants"):
        onnx_side.predict(onnx_side.encode(image), twice)


def test_no_entities_give_empty_outputs(predictors) -> None:
    image, _ = _image_and_prompts()
    for predictor in predictors:
        encoded = predictor.encode(image)
        assert predictor.predict(encoded, []).shape == (0, 180, 240)
        empty = predictor.decode(encoded, torch.zeros(0, 1, 2, 2), torch.zeros(0, 1, 2, dtype=torch.long))
        assert empty.masks.shape == (0, 180, 240) and empty.iou_predictions.shape == (0,)
