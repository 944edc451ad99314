"""Export of CaPL + prompt encoder + mask decoder (one graph, dynamic N and P) and its parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpcsam.export.onnx import DecoderOnnxModel, describe_graph
from cpcsam.export.parity import ParityCase, check_parity
from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
from cpcsam.modeling.transforms import postprocess_masks, preprocess_image


def _prompts(n: int, p: int, seed: int, image_size: int = 256):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, p, 2, generator=gen) * image_size
    # Every kind of slot: padding, negative, positive, box corners.
    labels = torch.tensor([[(-1, 0, 1, 2, 3)[(i + j) % 5] for j in range(p)] for i in range(n)], dtype=torch.float32)
    return coords, labels


@pytest.fixture(scope="module")
def decoder(exported):
    return OnnxDecoder(exported[2], device="cpu")


def _run_torch(model, emb, coords, labels, size, mask=None):
    n = coords.shape[0]
    has = torch.zeros(n) if mask is None else torch.ones(n)
    mask = torch.zeros(n, 1, 64, 64) if mask is None else mask
    with torch.no_grad():
        return [t.numpy() for t in DecoderOnnxModel(model)(emb, coords, labels, mask, has, torch.tensor(size, dtype=torch.float32))]


def test_graph_has_dynamic_entities_and_points(exported):
    _, enc_path, dec_path = exported
    desc = describe_graph(dec_path)
    assert desc["opset"] >= 17
    assert desc["inputs"]["point_coords"][:2] == ["num_entities", "num_points"]
    assert desc["inputs"]["point_labels"] == ["num_entities", "num_points"]
    masks = desc["outputs"]["masks"]
    assert masks[0] == "num_entities" and masks[2:] == ["height", "width"]
    assert describe_graph(enc_path)["inputs"]["image"] == [1, 3, 256, 256]


@pytest.mark.parametrize(
    "n,p,size",
    [(1, 1, (270, 480)), (3, 4, (480, 270)), (7, 6, (1200, 1800)), (3, 2, (256, 256)), (1, 5, (33, 1000)), (7, 1, (999, 97))],
)
def test_one_graph_matches_pytorch_for_many_shapes(exported, decoder, n, p, size):
    """1/3/7 entities, 1–6 points, several aspect ratios, all through the same exported graph."""
    model = exported[0]
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(n * 10 + p))
    coords, labels = _prompts(n, p, seed=p)
    ref = _run_torch(model, emb, coords, labels, size)
    out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), size)
    assert out["masks"].shape == (n, 1, *size)
    assert np.abs(out["masks"] - ref[0]).max() <= 1e-4
    assert np.abs(out["low_res_masks"] - ref[2]).max() <= 1e-4
    assert np.abs(out["iou_predictions"] - ref[1]).max() <= 1e-4
    # The full-size masks are SAM's postprocessing of the low-res ones at THIS size (not the
    # example's: the official export bakes the export example's crop into the graph).
    expected = postprocess_masks(torch.from_numpy(ref[2]), size, 256).numpy()
    assert np.abs(out["masks"] - expected).max() <= 1e-4
    assert ((out["masks"] > 0) == (ref[0] > 0)).mean() >= 0.999


def test_graph_contains_calibration_and_merged_lora(exported, decoder, calibrated_model):
    """The exported outputs are those of the LoRA model with CaPL, not of SAM without them."""
    merged = exported[0]
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(5))
    coords, labels = _prompts(3, 4, seed=3)
    out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (200, 300))["low_res_masks"]
    # Unmerged model (PEFT adapters live) gives the same numbers: merging kept LoRA's effect.
    with_adapters = _run_torch(calibrated_model, emb, coords, labels, (200, 300))[2]
    assert np.abs(out - with_adapters).max() <= 1e-4
    # Switching CaPL off changes them: the calibration is in the graph.
    saved = merged.capl.task, merged.capl.entity
    try:
        merged.capl.task, merged.capl.entity = None, None
        uncalibrated = _run_torch(merged, emb, coords, labels, (200, 300))[2]
    finally:
        merged.capl.task, merged.capl.entity = saved
    assert np.abs(out - uncalibrated).max() > 1e-2


def test_mask_input_flag(exported, decoder):
    model = exported[0]
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(6))
    coords, labels = _prompts(2, 3, seed=6)
    mask = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(7)) * 5
    without = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100))["low_res_masks"]
    with_mask = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100), mask_input=mask.numpy())["low_res_masks"]
    assert np.abs(with_mask - _run_torch(model, emb, coords, labels, (100, 100), mask)[2]).max() <= 1e-4
    assert np.abs(with_mask - without).max() > 1e-3
    # has_mask_input = 0 is exactly the no-mask path of CPCSAM.decode.
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels.long())
        sparse = model.calibrate_prompts(sparse[:, None], labels.long()[:, None])[:, 0]
        plain = model.decode(emb, torch.zeros(2, dtype=torch.long), sparse).low_res_logits.numpy()
    assert np.abs(without - plain).max() <= 1e-4


def test_parity_report_end_to_end(exported, decoder):
    model, enc_path, _ = exported
    rng = np.random.default_rng(0)
    cases = []
    for i, (h, w) in enumerate([(270, 480), (360, 480), (500, 200)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        coords, labels = _prompts(i + 1, 3, seed=i)
        cases.append(ParityCase(f"img{i}", image, coords.numpy(), labels.numpy()))
    encoder = OnnxImageEncoder(enc_path, "cpu")
    report = check_parity(model, encoder, decoder, cases)
    assert report["passed"], report
    assert report["max_abs_logit_diff"] <= 1e-4 and report["min_mask_iou"] >= 0.999
    assert [c["num_entities"] for c in report["cases"]] == [1, 2, 3]
    # A threshold the numbers cannot meet fails the check (and says so).
    strict = check_parity(model, encoder, decoder, cases[:1],
                          max_abs_logit_diff=0.0, min_mask_iou=1.01)
    assert strict["passed"] is False


def test_log_sigmoid_stays_finite_in_onnxruntime(tmp_path):
    """The entity gates' log σ(s) must not become −inf (a fully −inf attention row is NaN)."""
    import onnxruntime as ort
    import torch.nn.functional as F

    from cpcsam.export.onnx import _export

    class LogSigmoid(torch.nn.Module):
        def forward(self, x):
            return F.logsigmoid(x)

    x = torch.tensor([-300.0, -104.0, -40.0, -15.0, -3.0, 0.0, 2.0, 50.0])
    _export(LogSigmoid(), (x,), tmp_path / "ls.onnx", ["x"], ["y"], {}, 17)
    y = ort.InferenceSession(str(tmp_path / "ls.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.isfinite(y).all()
    ref = F.logsigmoid(x).numpy()
    assert np.allclose(y[4:], ref[4:], atol=1e-5)  # exact where the gate matters
    # In the tail onnxruntime's Sigmoid is approximate (and 0 below about −18): ~zero weights stay ~zero.
    assert abs(y[3] - ref[3]) < 0.5 and (y[:3] <= -15).all()


def test_extreme_calibration_keeps_parity(calibrated_model, tmp_path):
    """A CaPL with huge entity gates (biases far below −18) still exports finite and faithful."""
    from cpcsam.export.onnx import export_decoder, prepare_for_export

    model = prepare_for_export(calibrated_model)
    with torch.no_grad():
        for name, p in model.capl.entity.named_parameters():
            if "query_mlps" in name and name.endswith("2.weight"):
                p.mul_(300)
    path = export_decoder(model, tmp_path / "extreme.onnx")
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(9))
    coords, labels = _prompts(3, 3, seed=9)
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels.long())
        biases = model.entity_calibration(emb, torch.zeros(3, dtype=torch.long), sparse)
    assert min(float(b.min()) for b in biases.values()) < -20  # where onnxruntime's Sigmoid saturates to 0
    out = OnnxDecoder(path, device="cpu")(emb.numpy(), coords.numpy(), labels.numpy(), (200, 300))
    ref = _run_torch(model, emb, coords, labels, (200, 300))
    assert np.isfinite(out["masks"]).all()
    assert np.abs(out["masks"] - ref[0]).max() <= 1e-4
