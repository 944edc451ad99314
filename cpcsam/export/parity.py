"""Parity of the exported graphs with PyTorch: the numbers the export stage stands or falls on.

For each case (one image, its entities' prompts) both paths run end to end, image → full-size
logits, through the one inference object (`cpcsam.inference.Predictor`): PyTorch (the path the
evaluation scores) and onnxruntime (the two exported graphs). The decoder alone is also compared on the *same* embedding, so a failure can be
told apart: encoder drift versus a decoder/CaPL export problem.

The verdict is scale-aware, on the end-to-end full-size masks (what users run), fp32, per entity:

- logits: max |Δ| ≤ atol + rtol·scale, scale = the entity's max |reference logit| (atol =
  `max_abs_logit_diff`, 1e−4; rtol = `logit_rtol`, 1e−3). float32 rounding grows with the size of
  the numbers, so a purely absolute bound fails healthy models whose logits are large (1e−3 on
  logits of ±200 is 5e−6 of them, and no mask changes), while an export bug is large relative to
  the logits (the saturated-gate bug: 0.03 on logits of ±0.2, 0.8 on ±30). `compare_logits` says
  why the scale is the entity's and not the pixel's. Reported as `max_logit_error_ratio` (passes
  at ≤ 1), `max_rel_logit_diff` (max |Δ| / scale) and the worst entity's numbers (`worst_logit`).
- probabilities: max |σ(out) − σ(ref)| ≤ `max_abs_prob_diff` (1e−3): what a soft-mask user sees,
  and the strict check near the 0.5 threshold, where the logit tolerance is loosest relative to
  the logit.
- binary masks (logit > 0): per-entity IoU ≥ `min_mask_iou` (0.999), pixels whose reference
  probability is within `max_abs_prob_diff` of 0.5 counting as agreeing (`compare_masks`).

`max_abs_logit_diff` is still reported as the plain maximum |Δ| (its threshold field is atol);
with rtol = 0 the logit check is the old absolute one. Low-resolution logits and IoU predictions
are reported, not judged. The verdict is deterministic for a given model and cases: a failure
does not go away on a retry (`components.export` exits with its own code for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cpcsam.errors import ConfigError
from cpcsam.evaluation.metrics import iou
from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
from cpcsam.inference import Decoded, OnnxBackend, Predictor, TorchBackend
from cpcsam.modeling import CPCSAM

MAX_ABS_LOGIT_DIFF = 1e-4  # atol of the logit check
LOGIT_RTOL = 1e-3
MAX_ABS_PROB_DIFF = 1e-3
MIN_MASK_IOU = 0.999


@dataclass
class ParityCase:
    name: str
    image: np.ndarray  # H x W x 3 uint8
    point_coords: np.ndarray  # N x P x 2, model frame
    point_labels: np.ndarray  # N x P


@dataclass(frozen=True)
class Tolerances:
    """What `check_parity` accepts (see the module docstring); names as in params.yaml `export`."""

    max_abs_logit_diff: float = MAX_ABS_LOGIT_DIFF  # atol
    logit_rtol: float = LOGIT_RTOL
    max_abs_prob_diff: float = MAX_ABS_PROB_DIFF
    min_mask_iou: float = MIN_MASK_IOU

    def __post_init__(self) -> None:
        for name in ("max_abs_logit_diff", "logit_rtol", "max_abs_prob_diff", "min_mask_iou"):
            value = getattr(self, name)
            try:
                ok = math.isfinite(float(value)) and float(value) >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"params export.{name} = {value!r}: expected a finite number ≥ 0")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for any logit


def compare_logits(ref: np.ndarray, out: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    """Scale-aware comparison of the logits of N entities ([N, ...] arrays of the same shape).

    Entity e passes when max |Δ| ≤ atol + rtol·scale_e, scale_e = max |ref| of that entity. The
    scale is the entity's, not the pixel's: float32 rounding grows with the terms a logit is made
    of, and a pixel on the mask boundary (logit ≈ 0) is the sum of the same large terms as the
    rest, cancelling. With a per-pixel rtol·|ref| a healthy model with logits of ±200 fails at its
    boundary pixels (|Δ| 1e−3 at a logit of 0.01: 10× a per-pixel tolerance, 0.01× this one).
    Near the 0.5 threshold the probability check is the strict one.

    float32, one entity at a time: full-size masks of 16 entities at 1200×1800 are 35 M values.
    A NaN or inf difference never passes; a zero difference always does.
    """
    if ref.shape != out.shape:
        raise ValueError(f"compare_logits: shapes {ref.shape} and {out.shape} differ")
    best: dict[str, Any] = {"max_abs_logit_diff": 0.0, "max_rel_logit_diff": 0.0, "max_logit_error_ratio": 0.0,
                            "worst_logit": None, "max_abs_prob_diff": 0.0}
    for e, (r, o) in enumerate(zip(np.asarray(ref, np.float32), np.asarray(out, np.float32))):
        diff = np.abs(o - r)
        diff[~np.isfinite(diff)] = np.inf
        i = np.unravel_index(int(np.argmax(diff)), diff.shape)
        d, scale = float(diff[i]), float(np.abs(r).max())
        bound = tol.max_abs_logit_diff + tol.logit_rtol * scale
        ratio = 0.0 if d == 0 else (d / bound if bound > 0 else math.inf)
        prob = np.abs(_sigmoid(o) - _sigmoid(r))
        prob[np.isnan(prob)] = 1.0
        best["max_abs_logit_diff"] = max(best["max_abs_logit_diff"], d)
        best["max_rel_logit_diff"] = max(best["max_rel_logit_diff"], 0.0 if d == 0 else d / scale if scale else math.inf)
        best["max_abs_prob_diff"] = max(best["max_abs_prob_diff"], float(prob.max()))
        if best["worst_logit"] is None or ratio > best["max_logit_error_ratio"]:
            best["max_logit_error_ratio"] = ratio
            best["worst_logit"] = {"entity": e, "ref": float(r[i]), "out": float(o[i]), "abs_diff": d,
                                   "entity_scale": scale, "tolerance": bound}
    return best


def compare_masks(ref: np.ndarray, out: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    """Binary masks (logit > 0) of N entities' logits ([N, ...]): the smallest per-entity IoU, and the flips.

    A pixel whose reference probability is within `max_abs_prob_diff` of 0.5 counts as agreeing
    whichever side onnxruntime puts it: the probabilities may differ that much, so either side
    is right. Healthy float32 runs flip a few such pixels (|logit| ~1e−3), and on a small mask one
    flip would cost more than 0.001 of IoU. `mask_pixels_flipped` counts every flip, those too.
    """
    min_iou, flipped = 1.0, 0
    band = 2.0 * tol.max_abs_prob_diff  # |σ(x) − 0.5| = |tanh(x/2)| / 2
    n = len(ref)
    for r, o in zip(np.asarray(ref, np.float32).reshape(n, -1), np.asarray(out, np.float32).reshape(n, -1)):
        ref_pos, out_pos = r > 0, o > 0
        undecided = np.abs(np.tanh(0.5 * r)) <= band
        min_iou = min(min_iou, iou(ref_pos, np.where(undecided, ref_pos, out_pos)))
        flipped += int((ref_pos != out_pos).sum())
    return {"min_mask_iou": float(min_iou), "mask_pixels_flipped": flipped}


def _compare(ref: Sequence[np.ndarray], out: Sequence[np.ndarray], tol: Tolerances) -> dict[str, Any]:
    masks_ref, iou_ref, low_ref = ref
    masks_out, iou_out, low_out = out
    full = compare_logits(masks_ref, masks_out, tol)
    low = compare_logits(low_ref, low_out, tol)
    return {
        **full,
        "max_abs_low_res_diff": low["max_abs_logit_diff"],
        "max_rel_low_res_diff": low["max_rel_logit_diff"],
        "max_low_res_error_ratio": low["max_logit_error_ratio"],
        "max_abs_iou_pred_diff": float(np.abs(iou_ref - iou_out).max()),
        **compare_masks(masks_ref, masks_out, tol),
    }


def verdict(numbers: dict[str, Any], tol: Tolerances) -> list[str]:
    """The failed checks of one `_compare` result (empty: passed), one sentence each."""
    failures = []
    if not numbers["max_logit_error_ratio"] <= 1.0:
        w = numbers["worst_logit"]
        failures.append(
            f"logits: entity {w['entity']}: |Δ| {w['abs_diff']:.3g} (reference {w['ref']:.4g}) exceeds "
            f"{tol.max_abs_logit_diff:.0e} + {tol.logit_rtol:.0e}·{w['entity_scale']:.4g} (its max |logit|) = "
            f"{w['tolerance']:.3g}, {numbers['max_logit_error_ratio']:.3g}× the tolerance"
        )
    if not numbers["max_abs_prob_diff"] <= tol.max_abs_prob_diff:
        failures.append(f"probabilities: max |Δσ| {numbers['max_abs_prob_diff']:.3g} > {tol.max_abs_prob_diff:.0e}")
    if not numbers["min_mask_iou"] >= tol.min_mask_iou:
        failures.append(f"masks: min IoU {numbers['min_mask_iou']:.5f} < {tol.min_mask_iou}")
    return failures


def _outputs(decoded: Decoded) -> list[np.ndarray]:
    return [decoded.masks, decoded.iou_predictions, decoded.low_res_masks]


def check_parity(
    model: CPCSAM,
    encoder: OnnxImageEncoder,
    decoder: OnnxDecoder,
    cases: Sequence[ParityCase],
    max_abs_logit_diff: float = MAX_ABS_LOGIT_DIFF,
    min_mask_iou: float = MIN_MASK_IOU,
    logit_rtol: float = LOGIT_RTOL,
    max_abs_prob_diff: float = MAX_ABS_PROB_DIFF,
) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch on `cases`; `model` must be the exported (LoRA-merged) one.

    `max_abs_logit_diff` is the absolute part (atol) of the logit tolerance atol + rtol·|ref|.
    """
    if not cases:
        raise ValueError("check_parity: no cases")
    tol = Tolerances(max_abs_logit_diff, logit_rtol, max_abs_prob_diff, min_mask_iou)
    # Both sides are `Predictor`s: the PyTorch one is the code path the evaluation scores.
    reference = Predictor(TorchBackend(model))
    exported = Predictor(OnnxBackend(encoder, decoder))
    rows = []
    for case in cases:
        h, w = case.image.shape[:2]
        coords = torch.from_numpy(np.asarray(case.point_coords, np.float32))[:, None]  # K' = 1
        labels = torch.from_numpy(np.asarray(case.point_labels, np.int64))[:, None]
        n = coords.shape[0]
        torch_image = reference.encode(case.image)
        onnx_image = exported.encode(case.image)
        ref = _outputs(reference.decode(torch_image, coords, labels))
        end_to_end = _outputs(exported.decode(onnx_image, coords, labels))
        decoder_only = _outputs(exported.decode(torch_image, coords, labels))  # the same embedding
        emb, onnx_emb = torch_image.embedding.cpu().numpy(), onnx_image.embedding.numpy()
        e2e = _compare(ref, end_to_end, tol)
        rows.append({
            "case": case.name,
            "image_size": [h, w],
            "num_entities": int(n),
            "num_points": int(coords.shape[2]),
            "max_abs_embedding_diff": float(np.abs(onnx_emb - emb).max()),
            "end_to_end": e2e,
            "decoder_only": _compare(ref, decoder_only, tol),
            "failures": verdict(e2e, tol),
        })

    def worst(key: str, path: str = "end_to_end", pick=max) -> float:
        return pick(r[path][key] for r in rows)

    worst_row = max(rows, key=lambda r: r["end_to_end"]["max_logit_error_ratio"])
    failures = [f"{r['case']}: {f}" for r in rows for f in r["failures"]]
    return {
        "passed": not failures,
        "failures": failures,
        "max_abs_logit_diff": worst("max_abs_logit_diff"),
        "max_abs_logit_diff_threshold": tol.max_abs_logit_diff,
        "logit_rtol": tol.logit_rtol,
        "max_rel_logit_diff": worst("max_rel_logit_diff"),
        "max_logit_error_ratio": worst("max_logit_error_ratio"),
        "worst_logit": {"case": worst_row["case"], **worst_row["end_to_end"]["worst_logit"]},
        "max_abs_prob_diff": worst("max_abs_prob_diff"),
        "max_abs_prob_diff_threshold": tol.max_abs_prob_diff,
        "min_mask_iou": worst("min_mask_iou", pick=min),
        "min_mask_iou_threshold": tol.min_mask_iou,
        "mask_pixels_flipped": sum(r["end_to_end"]["mask_pixels_flipped"] for r in rows),
        "decoder_only_max_abs_logit_diff": worst("max_abs_logit_diff", "decoder_only"),
        "decoder_only_max_rel_logit_diff": worst("max_rel_logit_diff", "decoder_only"),
        "decoder_only_max_logit_error_ratio": worst("max_logit_error_ratio", "decoder_only"),
        "decoder_only_max_abs_prob_diff": worst("max_abs_prob_diff", "decoder_only"),
        "decoder_only_min_mask_iou": worst("min_mask_iou", "decoder_only", pick=min),
        "max_abs_embedding_diff": max(r["max_abs_embedding_diff"] for r in rows),
        "providers": {"image_encoder": encoder.info.providers, "decoder": decoder.info.providers},
        "cases": rows,
    }
