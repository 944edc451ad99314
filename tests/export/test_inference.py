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


def test_crop_window_is_a_square_around_the_box_clipped_to_the_image() -> None:
    from cpcsam.config import CropConfig
    from cpcsam.modeling.transforms import crop_window

    crop = CropConfig(context=2.0, min_side=32)
    assert crop_window(np.array([100, 100, 140, 120]), crop, 400, 300) == (80, 70, 160, 150)  # 2 × 40, centred
    assert crop_window(np.array([100, 100, 104, 102]), crop, 400, 300) == (86, 85, 118, 117)  # min_side
    assert crop_window(np.array([0, 10, 40, 50]), crop, 400, 300) == (0, 0, 60, 70)  # clipped, not moved
    assert crop_window(np.array([380, 280, 400, 300]), crop, 400, 300) == (370, 270, 400, 300)


def test_crop_context_below_one_is_refused() -> None:
    from cpcsam.config import CropConfig
    from cpcsam.errors import ConfigError

    with pytest.raises(ConfigError, match="context.*cut the box"):
        CropConfig.from_params({"context": 0.5})
    with pytest.raises(ConfigError, match="contxt"):
        CropConfig.from_params({"contxt": 2})


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_focus_crop_segments_each_boxed_entity_in_its_own_crop(predictors, backend) -> None:
    """A boxed entity's logits are the model's answer on its crop, with the prompt moved into the
    crop, pasted back; everything outside is background. A points-only entity keeps the whole image."""
    from cpcsam.config import CropConfig
    from cpcsam.inference import OUTSIDE_CROP_LOGIT
    from cpcsam.modeling.transforms import crop_window

    whole = predictors[0 if backend == "torch" else 1]
    crop = CropConfig(context=1.5, min_side=32)
    cropped = Predictor(whole.backend, crop)
    image, prompts = _image_and_prompts()
    click = [Prompt("points", np.array([[200.0, 150.0]]), np.array([1]))]
    prompts = prompts + [click]
    out = cropped.predict(cropped.encode(image), prompts)
    assert out.shape == (4, 180, 240)
    for i, variants in enumerate(prompts[:3]):
        x0, y0, x1, y1 = crop_window(variants[0].box(), crop, 240, 180)
        assert (x1 - x0, y1 - y0) != (240, 180)
        shifted = [Prompt(q.kind, q.coords - np.array([x0, y0]), q.labels) for q in variants]
        inside = whole.predict(whole.encode(image[y0:y1, x0:x1]), [shifted])[0]
        np.testing.assert_array_equal(out[i, y0:y1, x0:x1], inside)
        outside = np.ones((180, 240), bool)
        outside[y0:y1, x0:x1] = False
        assert (out[i][outside] == OUTSIDE_CROP_LOGIT).all()
    np.testing.assert_array_equal(out[3], whole.predict(whole.encode(image), [click])[0])


def test_focus_crops_encode_the_whole_image_only_for_an_entity_that_needs_it(predictors) -> None:
    """Boxed entities are segmented in their crops: an image with boxes only costs one encoder pass
    per entity; a points-only entity adds the whole image's pass, once."""
    from cpcsam.config import CropConfig

    class CountingBackend:
        def __init__(self, inner) -> None:
            self.inner, self.sizes = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, x):
            self.sizes.append(tuple(x.shape))
            return self.inner.encode(x)

    counting = CountingBackend(predictors[0].backend)
    cropped = Predictor(counting, CropConfig(context=1.5, min_side=32))
    image, boxed = _image_and_prompts()
    encoded = cropped.encode(image)
    cropped.predict(encoded, boxed)
    assert len(counting.sizes) == len(boxed) and not encoded.encoded
    click = [Prompt("points", np.array([[200.0, 150.0]]), np.array([1]))]
    cropped.predict(encoded, boxed + [click, click])
    assert len(counting.sizes) == 2 * len(boxed) + 1 and encoded.encoded


def test_a_crop_predictor_needs_its_own_encoding(predictors) -> None:
    from cpcsam.config import CropConfig

    whole = predictors[0]
    image, prompts = _image_and_prompts()
    with pytest.raises(ValueError, match="focus crops need the image"):
        Predictor(whole.backend, CropConfig(context=2.0)).predict(whole.encode(image), prompts)


def test_the_served_model_crops_as_it_was_trained(calibrated_model, tmp_path) -> None:
    """`model.crop` travels with the model: saved in its file, written into the exported decoder,
    and both `cpcsam predict` backends build their Predictor with it."""
    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export
    from cpcsam.modeling import load_cpcsam, save_cpcsam
    from cpcsam.predict import make_backend

    cfg = {"type": "small", "capl": {"mode": "causal"}, "crop": {"context": 2.5, "min_side": 24}}
    save_cpcsam(tmp_path / "model.pt", calibrated_model, cfg)
    loaded = load_cpcsam(tmp_path / "model.pt", fold_lora=True)
    assert (loaded.crop.context, loaded.crop.min_side) == (2.5, 24)
    merged = prepare_for_export(loaded)
    export_image_encoder(merged, tmp_path / "image_encoder.onnx")
    export_decoder(merged, tmp_path / "decoder_capl.onnx")
    for backend in ("onnx", "torch"):
        predictor = make_backend(backend, tmp_path, tmp_path / "model.pt", "cpu")
        assert predictor.crop == loaded.crop, backend
    save_cpcsam(tmp_path / "plain.pt", calibrated_model, {"type": "small", "capl": {"mode": "causal"}})
    assert make_backend("torch", tmp_path, tmp_path / "plain.pt", "cpu").crop is None  # context 0: whole images
