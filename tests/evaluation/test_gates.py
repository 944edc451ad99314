"""The promotion gate: pass and each way to fail."""

from __future__ import annotations

import pytest

from cpcsam.errors import ConfigError
from cpcsam.evaluation.gates import check_gate

# The reference check has its own tests below; here the other checks alone.
CFG = {"min_target_dice": 0.5, "max_base_regression": 0.02, "require_onnx_parity": True, "beat_reference": None}
PARITY_OK = {"passed": True, "max_abs_logit_diff": 2e-6, "min_mask_iou": 1.0}


def _by_name(result):
    return {r["check"]: r for r in result["reasons"]}


def test_gate_passes_without_champion():
    out = check_gate({"target_dice": 0.6, "base_dice": 0.7}, CFG, None, PARITY_OK)
    assert out["passed"] is True
    checks = _by_name(out)
    assert checks["min_target_dice"]["value"] == 0.6 and checks["min_target_dice"]["threshold"] == 0.5
    assert "skipped" in checks["max_base_regression"]["detail"]


def test_gate_fails_on_low_target_dice():
    out = check_gate({"target_dice": 0.49, "base_dice": 0.7}, CFG, None, PARITY_OK)
    assert out["passed"] is False
    assert _by_name(out)["min_target_dice"]["passed"] is False


def test_gate_base_regression_vs_champion():
    champion = {"target_dice": 0.55, "base_dice": 0.80}
    ok = check_gate({"target_dice": 0.6, "base_dice": 0.79}, CFG, champion, PARITY_OK)
    assert ok["passed"] is True
    assert _by_name(ok)["max_base_regression"]["value"] == pytest.approx(0.01)
    bad = check_gate({"target_dice": 0.6, "base_dice": 0.75}, CFG, champion, PARITY_OK)
    assert bad["passed"] is False
    assert _by_name(bad)["max_base_regression"]["value"] == pytest.approx(0.05)


def test_gate_parity_required_and_missing_numbers_fail():
    assert check_gate({"target_dice": 0.9, "base_dice": 0.9}, CFG, None, None)["passed"] is False
    failed = {"passed": False, "max_abs_logit_diff": 0.3, "min_mask_iou": 0.9}
    assert check_gate({"target_dice": 0.9, "base_dice": 0.9}, CFG, None, failed)["passed"] is False
    relaxed = dict(CFG, require_onnx_parity=False)
    assert check_gate({"target_dice": 0.9, "base_dice": 0.9}, relaxed, None, None)["passed"] is True
    # A gate never passes on absent evidence.
    assert check_gate({"target_dice": None, "base_dice": 0.9}, relaxed)["passed"] is False
    assert check_gate({"target_dice": 0.9, "base_dice": None}, relaxed, {"base_dice": 0.8})["passed"] is False


def test_gate_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="gate.min_target_dice"):
        check_gate({"target_dice": 0.9}, {"min_target_dice": "high"})
    with pytest.raises(ConfigError, match="did you mean 'gate.min_target_dice'"):
        check_gate({"target_dice": 0.9}, dict(CFG, min_target_dise=0.4))


def _with_box(target: float, box: float) -> dict:
    return {"target_dice": target, "base_dice": 0.9, "references": {"filled_box": {"target_dice": box, "base_dice": 0.5}}}


def test_a_model_that_loses_to_its_own_prompt_is_rejected():
    cfg = dict(CFG, beat_reference="filled_box")
    rejected = check_gate(_with_box(0.60, 0.635), cfg, None, PARITY_OK)
    assert rejected["passed"] is False
    check = _by_name(rejected)["beats_reference"]
    assert check["passed"] is False and check["value"] == 0.60 and check["threshold"] == 0.635
    assert check_gate(_with_box(0.70, 0.635), cfg, None, PARITY_OK)["passed"] is True
    assert check_gate(_with_box(0.635, 0.635), cfg, None, PARITY_OK)["passed"] is False  # a tie is no gain


def test_the_reference_check_fails_without_the_reference_row():
    cfg = dict(CFG, beat_reference="filled_box")
    out = check_gate({"target_dice": 0.9, "base_dice": 0.9}, cfg, None, PARITY_OK)
    assert out["passed"] is False and "no target Dice" in _by_name(out)["beats_reference"]["detail"]
