"""Export of CaPL + prompt encoder + mask decoder (one graph, dynamic N and P) and its parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cpcsam.export.onnx import DecoderOnnxModel, describe_graph
from cpcsam.export.parity import ParityCase, check_parity
from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
from cpcsam.modeling.transforms import postprocess_masks, preprocess_image
from export_helpers import calibrated_small_model, saturate_entity_gates


def _prompts(n: int, p: int, seed: int, image_size: int = 256):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(n, p, 2, generator=gen) * image_size
    # Every kind of slot: padding, negative, positive, box corners.
    labels = torch.tensor([[(-1, 0, 1, 2, 3)[(i + j) % 5] for j in range(p)] for i in range(n)], dtype=torch.float32)
    return coords, labels


@pytest.fixture(scope="module")
def decoder(exported):
    return OnnxDecoder(exported[2], device="cpu")


def _keys(model, emb) -> np.ndarray:
    """What the encoder graph computes beside the embedding: the decoder graph's `entity_keys`."""
    with torch.no_grad():
        return model.entity_keys(emb).contiguous().numpy()


def _run_torch(model, emb, coords, labels, size, mask=None):
    n = coords.shape[0]
    has = torch.zeros(n) if mask is None else torch.ones(n)
    mask = torch.zeros(n, 1, 64, 64) if mask is None else mask
    with torch.no_grad():
        return [t.numpy() for t in DecoderOnnxModel(model)(emb, coords, labels, mask, has, torch.tensor(size, dtype=torch.float32))]


def _run_trained_form(model, emb, coords, labels) -> np.ndarray:
    """Low-res logits of `CPCSAM.decode` (PEFT adapters may be live), without mask prompts."""
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels.long())
        index = torch.zeros(coords.shape[0], dtype=torch.long)
        sparse = model.calibrate_prompts(sparse[:, None], labels.long()[:, None], coords[:, None], emb, index)[:, 0]
        return model.decode(emb, index, sparse).low_res_logits.numpy()


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
    out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), size, entity_keys=_keys(model, emb))
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
    out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (200, 300), entity_keys=_keys(merged, emb))["low_res_masks"]
    # Unmerged model (PEFT adapters live) gives the same numbers: merging kept LoRA's effect.
    with_adapters = _run_trained_form(calibrated_model, emb, coords, labels)
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
    keys = _keys(model, emb)
    without = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100), entity_keys=keys)["low_res_masks"]
    with_mask = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100), mask_input=mask.numpy(),
                        entity_keys=keys)["low_res_masks"]
    assert np.abs(with_mask - _run_torch(model, emb, coords, labels, (100, 100), mask)[2]).max() <= 1e-4
    assert np.abs(with_mask - without).max() > 1e-3
    # has_mask_input = 0 is exactly the no-mask path of CPCSAM.decode.
    plain = _run_trained_form(model, emb, coords, labels)
    assert np.abs(without - plain).max() <= 1e-4


def test_mask_prompts_on_some_entities_only(exported, decoder):
    """Entities with a mask prompt get their own image tokens; the others still share image 0's."""
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(8))
    keys = _keys(exported[0], emb)
    coords, labels = _prompts(4, 3, seed=8)
    mask = torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(9)) * 5
    feeds = {"image_embeddings": emb.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy(),
             "mask_input": mask.numpy(), "has_mask_input": np.array([0, 1, 0, 1], np.float32),
             "orig_im_size": np.array([100, 100], np.float32), "entity_keys": keys}
    mixed = dict(zip(decoder.output_names, decoder.session.run(None, feeds)))["low_res_masks"]
    without = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100), entity_keys=keys)["low_res_masks"]
    with_mask = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100), mask_input=mask.numpy(),
                        entity_keys=keys)["low_res_masks"]
    assert np.abs(mixed[[0, 2]] - without[[0, 2]]).max() <= 1e-5
    assert np.abs(mixed[[1, 3]] - with_mask[[1, 3]]).max() <= 1e-5


def _branches_run(path, feeds: dict, tmp_path) -> set[str]:
    """The `If` branches whose nodes onnxruntime ran in one call (its profile's node names)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return {e["name"].split("/")[0] for e in events if e.get("cat") == "Node" and "/" in e["name"]} & {
        "mask_prompts", "no_mask_prompt"}


def test_calls_without_mask_prompts_run_the_branch_without_them(exported, tmp_path):
    """The graph holds two traces, joined by an `If` on `has_mask_input`: a call without any mask
    prompt runs the one that reads no mask input (and selects no image tokens per entity)."""
    import onnx

    from cpcsam.export.branches import all_nodes

    model, _, path = exported
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(10))
    coords, labels = _prompts(3, 3, seed=10)
    feeds = {"image_embeddings": emb.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy(),
             "mask_input": np.ones((3, 1, 64, 64), np.float32), "has_mask_input": np.zeros(3, np.float32),
             "orig_im_size": np.array([100, 100], np.float32), "entity_keys": _keys(model, emb)}
    assert _branches_run(path, feeds, tmp_path) == {"no_mask_prompt"}
    assert _branches_run(path, {**feeds, "has_mask_input": np.array([0, 0, 1], np.float32)}, tmp_path) == {"mask_prompts"}
    (branch,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "If"]
    without = next(a.g for a in branch.attribute if a.name == "else_branch")
    read = {name for node in all_nodes(without) for name in node.input}
    assert "mask_input" not in read and "image_embeddings" in read
    assert not any(node.op_type == "NonZero" for node in all_nodes(without))


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


@pytest.mark.parametrize("dim", [2, 3])
def test_gated_softmax_is_exact_in_onnxruntime(tmp_path, dim):
    """The exported softmax(logits + log σ(s)) is torch's down to float32 rounding, for every gate s.

    Rows where every gate is saturated are decided by the gates' differences (e^(−100 − (−200)));
    onnxruntime's Sigmoid is 0 below s ≈ −18 and coarse above, so an export through
    Log(Sigmoid(s)), floored or not, loses them (−inf rows are NaN; a floor makes them equal).
    """
    import onnxruntime as ort
    import torch.nn.functional as F

    from cpcsam.export.onnx import _export
    from cpcsam.modeling.decoder import _softmax

    class GatedSoftmax(torch.nn.Module):
        def forward(self, logits, gate):
            return _softmax(logits, gate, dim), _softmax(logits, None, dim)

    gen = torch.Generator().manual_seed(0)
    shape = (2, 3, 7, 40)  # N, H, T, HW
    logits = torch.randn(shape, generator=gen) * 4
    special = torch.tensor([-3e38, -1e4, -300.0, -200.0, -104.0, -100.0, -69.0, -40.0, -18.5, -18.0, -17.0,
                            -10.0, -3.0, -1e-30, 0.0, 2.0, 18.0, 50.0, 1e4, 3e38])
    gate = special[torch.randint(len(special), shape, generator=gen)]
    gate[0] = torch.randn(shape[1:], generator=gen) * 3  # ordinary gates
    gate[1, 0] = -100.0 - 100.0 * torch.rand(shape[2:], generator=gen)  # every gate saturated
    _export(GatedSoftmax(), (logits, gate), tmp_path / "sm.onnx", ["logits", "gate"], ["p", "plain"], {}, 17)
    session = ort.InferenceSession(str(tmp_path / "sm.onnx"), providers=["CPUExecutionProvider"])
    p, plain = session.run(None, {"logits": logits.numpy(), "gate": gate.numpy()})
    assert np.isfinite(p).all()
    ref = torch.softmax(logits.double() + F.logsigmoid(gate.double()), dim=dim).numpy()
    torch32 = torch.softmax(logits + F.logsigmoid(gate), dim=dim).numpy()  # what training computes
    assert np.abs(p - ref).max() <= 2 * np.abs(torch32 - ref).max() + 1e-7  # float32 rounding, as torch's
    saturated = ref[1, 0]  # the gates' differences decide it: far from uniform
    assert saturated.max() > 0.99
    assert np.abs(p[1, 0] - saturated).max() <= 2 * np.abs(torch32[1, 0] - saturated).max() + 1e-7
    assert np.abs(plain - torch.softmax(logits.double(), dim=dim).numpy()).max() <= 1e-6


def _box_prompts(n: int, seed: int, image_size: int = 256):
    """n boxes (top-left, bottom-right) of 8–64 model pixels, anywhere in the frame."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * (image_size - 64)
    wh = torch.rand(n, 2, generator=gen) * 56 + 8
    return torch.stack([xy, xy + wh], dim=1), torch.tensor([[2.0, 3.0]]).repeat(n, 1)


def _fully_saturated_rows(model, emb, coords, labels) -> float:
    """Fraction of image→token attention rows whose every gate log σ(s) is below −69."""
    import math

    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels.long())
        biases = model.entity_calibration(emb, torch.zeros(coords.shape[0], dtype=torch.long), sparse)
    rows = [(b - math.log(2.0)).amax(dim=-1) < -69 for path, b in biases.items() if "image_to_token" in path]
    return float(torch.cat([r.flatten() for r in rows]).float().mean())


def test_extreme_calibration_keeps_parity(calibrated_model, tmp_path):
    """A CaPL with huge entity gates (biases far below −69) still exports finite and faithful."""
    from cpcsam.export.onnx import export_decoder, prepare_for_export

    model = saturate_entity_gates(prepare_for_export(calibrated_model))
    path = export_decoder(model, tmp_path / "extreme.onnx")
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(9))
    coords, labels = _prompts(3, 3, seed=9)
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels.long())
        biases = model.entity_calibration(emb, torch.zeros(3, dtype=torch.long), sparse)
    assert min(float(b.min()) for b in biases.values()) < -1000  # far beyond any floor
    out = OnnxDecoder(path, device="cpu")(emb.numpy(), coords.numpy(), labels.numpy(), (200, 300),
                                          entity_keys=_keys(model, emb))
    ref = _run_torch(model, emb, coords, labels, (200, 300))
    assert np.isfinite(out["masks"]).all()
    assert np.abs(out["masks"] - ref[0]).max() <= 1e-4
    assert np.abs(out["low_res_masks"] - ref[2]).max() <= 1e-4


@pytest.mark.parametrize("n", [12, 16])
def test_saturated_entity_gates_keep_parity_with_many_entities(exported, calibrated_model, tmp_path, n):
    """The issue's case: saturated entity gates, many entities per image, judged end to end.

    With gates saturated, whole image→token attention rows (one image position, all T tokens)
    have every log σ(s) below −69; their softmax weights follow the gates' differences. The
    floored export (Log(Max(Sigmoid, 1e−30))) flattened those rows: here max |Δlogit| 0.04 on
    logits of ±0.2 (160–190× the tolerance), min mask IoU 0.84–0.86, decoder-only low-res logits
    off by 0.05; with the exact log σ: 9e−6, IoU 1.0, 3e−6.
    """
    from cpcsam.export.onnx import export_decoder, prepare_for_export

    model = saturate_entity_gates(prepare_for_export(calibrated_model))
    decoder = OnnxDecoder(export_decoder(model, tmp_path / "saturated.onnx"), device="cpu")
    encoder = OnnxImageEncoder(exported[1], "cpu")  # saturating the gates leaves the encoder as it was
    rng = np.random.default_rng(n)
    cases = []
    for i, (h, w) in enumerate([(480, 640), (600, 400)]):
        coords, labels = _box_prompts(n, seed=10 * n + i)
        cases.append(ParityCase(f"street{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                                coords.numpy(), labels.numpy()))
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(n))
    assert _fully_saturated_rows(model, emb, torch.from_numpy(cases[0].point_coords),
                                 torch.from_numpy(cases[0].point_labels)) > 0.05  # the regime is reached
    report = check_parity(model, encoder, decoder, cases)
    assert report["passed"], report["failures"]
    assert report["max_logit_error_ratio"] <= 0.2 and report["decoder_only_max_logit_error_ratio"] <= 0.2
    for case in report["cases"]:  # the image-side path itself, not only the full-size masks
        assert case["decoder_only"]["max_abs_low_res_diff"] <= 1e-4
        assert case["decoder_only"]["max_abs_iou_pred_diff"] <= 1e-5
        assert case["num_entities"] == n


def test_large_logits_pass_the_scale_aware_check(exported, calibrated_model, tmp_path):
    """A healthy model with logits of ±200: the absolute 1e−4 bound alone would fail it.

    Scaling the hypernetworks' last layer scales every mask logit (and float32's rounding of it);
    the masks stay the same.
    """
    from cpcsam.export.onnx import export_decoder, prepare_for_export

    model = prepare_for_export(calibrated_model)
    with torch.no_grad():
        for mlp in model.sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(1000.0)
            mlp.layers[-1].bias.mul_(1000.0)
    decoder = OnnxDecoder(export_decoder(model, tmp_path / "large.onnx"), device="cpu")
    encoder = OnnxImageEncoder(exported[1], "cpu")
    rng = np.random.default_rng(3)
    cases = []
    for i, (h, w) in enumerate([(900, 1200), (700, 500)]):
        coords, labels = _box_prompts(16, seed=30 + i)
        cases.append(ParityCase(f"big{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                                coords.numpy(), labels.numpy()))
    report = check_parity(model, encoder, decoder, cases)
    assert report["passed"], report["failures"]
    assert report["max_abs_logit_diff"] > 1e-4  # what the absolute bound alone would have failed on
    assert max(abs(c["end_to_end"]["worst_logit"]["entity_scale"]) for c in report["cases"]) > 50
    assert report["max_logit_error_ratio"] < 0.1  # a wide margin, not a lucky pass
    # rtol = 0 is the old absolute check: it fails this healthy model, and says why.
    absolute = check_parity(model, encoder, decoder, cases[:1], logit_rtol=0.0)
    assert not absolute["passed"] and absolute["failures"][0].startswith("big0: logits:")


def test_entity_keys_come_from_the_encoder_graph_and_the_graphs_are_paired(exported, decoder, tmp_path):
    """The entity module's keys are per-image work: the encoder graph outputs them, the decoder graph
    requires them, and graphs of a model without the entity module have neither side of them."""
    import copy

    from cpcsam.errors import CheckpointError, ConfigError
    from cpcsam.export.onnx import export_decoder, export_image_encoder
    from cpcsam.inference import OnnxBackend

    model, enc_path, _ = exported
    encoder = OnnxImageEncoder(enc_path, "cpu")
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(11))
    out = encoder(image.numpy())
    with torch.no_grad():
        emb = model.encode_images(image)
    assert sorted(out) == ["entity_keys", "image_embeddings"]
    assert np.abs(out["entity_keys"] - _keys(model, emb)).max() <= 1e-4
    coords, labels = _prompts(2, 3, seed=11)
    with pytest.raises(ConfigError, match=f"{decoder.info.path}: .* needs the image's 'entity_keys'"):
        decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100))

    task_only = copy.deepcopy(model)
    task_only.capl.entity = None  # the `task` ablation's graphs
    plain_encoder = OnnxImageEncoder(export_image_encoder(task_only, tmp_path / "enc.onnx"), "cpu")
    plain_decoder = OnnxDecoder(export_decoder(task_only, tmp_path / "dec.onnx"), "cpu")
    assert not plain_encoder.has_entity_keys and not plain_decoder.needs_entity_keys
    assert sorted(plain_encoder(image.numpy())) == ["image_embeddings"]
    plain = plain_decoder(emb.numpy(), coords.numpy(), labels.numpy(), (100, 100))["low_res_masks"]
    assert np.abs(plain - _run_torch(task_only, emb, coords, labels, (100, 100))[2]).max() <= 1e-4
    # Graphs of the two exports do not mix: refused, naming both files.
    for enc, dec in ((encoder, plain_decoder), (plain_encoder, decoder)):
        with pytest.raises(CheckpointError, match="come from different exports") as info:
            OnnxBackend(enc, dec)
        assert enc.info.path in str(info.value) and dec.info.path in str(info.value)


def test_a_task_module_that_reads_the_image_exports_exactly(tmp_path):
    """`model.capl.task_image_features`: the prompts' image features are sampled inside the
    decoder graph (row gathers, no GridSample), and the graph matches the trained form."""
    from cpcsam.export.onnx import export_decoder, prepare_for_export

    model = prepare_for_export(calibrated_small_model(task_image_features=True))
    decoder = OnnxDecoder(export_decoder(model, tmp_path / "decoder.onnx"), device="cpu")
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(2))
    coords, labels = _prompts(5, 4, seed=3)
    out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (300, 400), entity_keys=_keys(model, emb))
    expected = _run_trained_form(model, emb, coords, labels)
    assert np.abs(out["low_res_masks"] - expected).max() <= 1e-4
    moved = _run_trained_form(model, emb.flip(-1), coords, labels)  # the image matters to the prompts
    other = decoder(emb.flip(-1).numpy(), coords.numpy(), labels.numpy(), (300, 400), entity_keys=_keys(model, emb.flip(-1)))
    assert np.abs(other["low_res_masks"] - moved).max() <= 1e-4


def test_the_entity_ablation_exports_with_entity_keys_and_no_task_module(tmp_path):
    """`model.capl.mode: entity` (the entity module alone): its graphs carry `entity_keys` and match
    the trained form; prompts reach the decoder uncalibrated."""
    from cpcsam.export.onnx import export_decoder, prepare_for_export

    model = prepare_for_export(calibrated_small_model(mode="entity"))
    assert model.capl.task is None and model.capl.entity is not None
    decoder = OnnxDecoder(export_decoder(model, tmp_path / "decoder.onnx"), device="cpu")
    assert decoder.needs_entity_keys
    emb = torch.randn(1, 64, 16, 16, generator=torch.Generator().manual_seed(4))
    coords, labels = _prompts(6, 4, seed=5)
    out = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (300, 400), entity_keys=_keys(model, emb))
    assert np.abs(out["low_res_masks"] - _run_trained_form(model, emb, coords, labels)).max() <= 1e-4
