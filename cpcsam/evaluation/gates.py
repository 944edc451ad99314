"""The promotion gate: pure checks of evaluation numbers (and ONNX parity) against thresholds.

`check_gate` takes plain dicts and returns a plain dict, so it is unit-tested without files or
models; `components/gate.py` reads the files and writes `artifacts/eval/gate.json`.

Checks (each reported with value, threshold, passed and a sentence):
- `min_target_dice`: the candidate's target-class Dice under the gating protocol ≥ threshold.
- `max_base_regression`: champion base Dice − candidate base Dice ≤ threshold, when a champion's
  metrics are given; without a champion the check passes and says it was skipped.
- `beats_reference`: the candidate's target Dice must exceed that of the prompt-only reference row
  `beat_reference` (default the filled box) under the same protocol: a model that loses to the
  prompt it was given adds nothing and must never become champion.
- `onnx_parity`: when `require_onnx_parity`, the export stage's parity result must have passed.
A missing number fails its check (a gate must never pass on absent evidence).
"""

from __future__ import annotations

from typing import Any, Mapping

from cpcsam.config import GateConfig, coerce
from cpcsam.errors import ConfigError


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The gating numbers of an evaluation `metrics.json` (its `headline` section)."""
    head = metrics.get("headline")
    if not isinstance(head, Mapping):
        raise ConfigError("metrics: no 'headline' section (expected the output of the evaluate stage)")
    return dict(head)


def _check(name: str, value: float | None, threshold: float | None, passed: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "value": value, "threshold": threshold, "passed": bool(passed), "detail": detail}


def check_gate(
    candidate: Mapping[str, Any],
    cfg: GateConfig | Mapping[str, Any],
    champion: Mapping[str, Any] | None = None,
    parity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Decide promotion. `candidate`/`champion` are `headline` dicts (`target_dice`, `base_dice`, ...).

    Returns `{"passed": bool, "reasons": [check, ...], "candidate": ..., "champion": ...}`.
    """
    cfg = coerce(GateConfig, cfg, "gate")
    reasons: list[dict[str, Any]] = []

    min_target = float(cfg.min_target_dice)
    target = candidate.get("target_dice")
    if target is None:
        reasons.append(_check("min_target_dice", None, min_target, False, "no target-class Dice was measured"))
    else:
        ok = float(target) >= min_target
        reasons.append(
            _check("min_target_dice", float(target), min_target, ok,
                   f"target Dice {float(target):.4f} {'>=' if ok else '<'} minimum {min_target:.4f}")
        )

    if cfg.beat_reference:
        reasons.append(_reference_check(candidate, cfg.beat_reference))

    max_regression = float(cfg.max_base_regression)
    if champion is None:
        reasons.append(_check("max_base_regression", None, max_regression, True, "no champion: check skipped"))
    else:
        base, champ_base = candidate.get("base_dice"), champion.get("base_dice")
        if base is None or champ_base is None:
            which = "candidate" if base is None else "champion"
            reasons.append(_check("max_base_regression", None, max_regression, False, f"{which} has no base-class Dice"))
        else:
            regression = float(champ_base) - float(base)
            ok = regression <= max_regression
            reasons.append(
                _check("max_base_regression", regression, max_regression, ok,
                       f"base Dice {float(base):.4f} vs champion {float(champ_base):.4f}: regression "
                       f"{regression:+.4f} {'<=' if ok else '>'} allowed {max_regression:.4f}")
            )

    if cfg.require_onnx_parity:
        if parity is None:
            reasons.append(_check("onnx_parity", None, None, False, "parity result missing (export stage did not run?)"))
        else:
            ok = bool(parity.get("passed"))
            reasons.append(
                _check("onnx_parity", parity.get("max_abs_logit_diff"), parity.get("max_abs_logit_diff_threshold"), ok,
                       f"ONNX parity {'passed' if ok else 'FAILED'}: max |logit diff| {parity.get('max_abs_logit_diff')}, "
                       f"min mask IoU {parity.get('min_mask_iou')}")
            )
    else:
        reasons.append(_check("onnx_parity", None, None, True, "not required (gate.require_onnx_parity: false)"))

    return {
        "passed": all(r["passed"] for r in reasons),
        "reasons": reasons,
        "candidate": dict(candidate),
        "champion": dict(champion) if champion is not None else None,
    }


def _reference_check(candidate: Mapping[str, Any], name: str) -> dict[str, Any]:
    reference = (candidate.get("references") or {}).get(name) or {}
    target, ref = candidate.get("target_dice"), reference.get("target_dice")
    if target is None or ref is None:
        return _check("beats_reference", target, ref, False,
                      f"no target Dice of the candidate or of the reference {name!r} (evaluate.references off?)")
    ok = float(target) > float(ref)
    return _check("beats_reference", float(target), float(ref), ok,
                  f"target Dice {float(target):.4f} {'>' if ok else '<='} {name} {float(ref):.4f} (its own prompt)")
