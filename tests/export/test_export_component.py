"""`python -m components.export`: exit 3 with a fixed marker on a parity failure, which is deterministic.

The manifest and image sampling are replaced by synthetic cases (12 boxes per image); export,
onnxruntime and the parity check are real. The failure is the real one of the issue: saturated
entity gates exported through the old floored log σ (planted back here).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import SMALL_CFG, calibrated_small_model, saturate_entity_gates

from components import export as export_step
from cpcsam.export.parity import ParityCase
from cpcsam.modeling import save_cpcsam


def _floored_gated_softmax(logits, gate, dim):
    """The old export of the gated softmax: log σ as Log(Max(Sigmoid(s), 1e−30)), which flattens
    saturated gates (onnxruntime's Sigmoid is 0 below s ≈ −18)."""
    if gate is not None:
        logits = logits + torch.log(torch.clamp(torch.sigmoid(gate), min=1e-30))
    return torch.softmax(logits, dim=dim)


def _cases(n: int = 12):
    rng = np.random.default_rng(0)
    cases = []
    for i, (h, w) in enumerate([(480, 640), (600, 400)]):
        xy = rng.uniform(0, 192, (n, 2))
        boxes = np.stack([xy, xy + rng.uniform(8, 64, (n, 2))], axis=1).astype(np.float32)
        labels = np.tile(np.array([[2.0, 3.0]], np.float32), (n, 1))
        cases.append(ParityCase(f"street{i}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), boxes, labels))
    return cases


@pytest.fixture(scope="module")
def saturated_model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_cpcsam(path, saturate_entity_gates(calibrated_small_model()), SMALL_CFG)
    return path


@pytest.fixture
def stage(saturated_model_file, tmp_path, monkeypatch):
    """Run the export step on the saturated model with synthetic parity cases; returns (exit code, out dir)."""
    monkeypatch.setenv("CPCSAM_TRACKING", "off")
    monkeypatch.setattr("cpcsam.data.load_manifest", lambda path: None)
    monkeypatch.setattr("cpcsam.evaluation.protocols.image_records", lambda *args, **kwargs: ["image"])
    monkeypatch.setattr(export_step, "parity_cases", lambda images, image_size, max_entities: _cases())
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")  # every default

    def run(*extra: str) -> tuple[int, object]:
        out = tmp_path / "export"
        code = export_step.main(["--params", str(params), "--model", str(saturated_model_file), "--out", str(out),
                                 *extra])
        return code, out

    return run


def test_parity_failure_exits_3_with_the_marker(stage, monkeypatch, capsys):
    monkeypatch.setattr("cpcsam.modeling.decoder._softmax_for_onnxruntime", _floored_gated_softmax)
    code, out = stage()
    err = capsys.readouterr().err
    assert code == export_step.EXIT_PARITY_FAILED == 3
    line = err.strip().splitlines()[-1]
    assert line.startswith(export_step.PARITY_FAILED + " (exit 3, deterministic: do not retry)")
    assert "failed: street0: logits: entity" in line
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] is False and parity["failures"] and parity["max_logit_error_ratio"] > 1
    assert parity["min_mask_iou"] < 0.999 and (out / "decoder_capl.onnx").is_file()


def test_the_same_model_passes_with_the_exact_export(stage, capsys):
    code, out = stage()
    assert code == 0, capsys.readouterr().err
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["logit_rtol"] == 1e-3 and parity["max_abs_prob_diff_threshold"] == 1e-3
    assert [c["num_entities"] for c in parity["cases"]] == [12, 12]
    assert "parity ok" in capsys.readouterr().out


def test_bad_input_exits_2(stage, tmp_path, capsys):
    code, _ = stage("--model", str(tmp_path / "missing.pt"))
    assert code == 2
    assert "missing.pt" in capsys.readouterr().err


def test_the_parity_report_is_the_same_bytes_whatever_threads_the_caller_set(stage):
    """parity.json is a DVC out: its float differences must not depend on the machine's thread
    setting (they did, through torch's reference run, until the stage pinned `export.threads`)."""
    before = torch.get_num_threads()
    reports = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            code, out = stage()
            assert code == 0
            reports.append((out / "parity.json").read_bytes())
    finally:
        torch.set_num_threads(before)
    assert reports[0] == reports[1]
