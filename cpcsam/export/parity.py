"""Parity of the exported graphs with PyTorch: the numbers the export stage stands or falls on.

For each case (one image, its entities' prompts) both paths run end to end, image → full-size
logits: PyTorch (`ImageEncoderOnnxModel` + `DecoderOnnxModel`, eager) and onnxruntime (the two
exported graphs). Reported per case and overall: the largest absolute logit difference (on the
full-size masks and on the low-resolution ones) and the smallest per-entity IoU of the binary
masks (logit > 0). The decoder alone is also compared on the *same* embedding, so a failure can be
told apart: encoder drift versus a decoder/CaPL export problem.

Thresholds (fp32): max |Δlogit| ≤ 1e-4 and mask IoU ≥ 0.999, on the end-to-end path (what users run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cpcsam.evaluation.metrics import iou
from cpcsam.export.onnx import DecoderOnnxModel, ImageEncoderOnnxModel
from cpcsam.export.runtime import OnnxDecoder, OnnxImageEncoder
from cpcsam.modeling import CPCSAM
from cpcsam.modeling.transforms import preprocess_image

MAX_ABS_LOGIT_DIFF = 1e-4
MIN_MASK_IOU = 0.999


@dataclass
class ParityCase:
    name: str
    image: np.ndarray  # H x W x 3 uint8
    point_coords: np.ndarray  # N x P x 2, model frame
    point_labels: np.ndarray  # N x P


def _compare(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> dict[str, float]:
    masks_ref, _, low_ref = ref
    masks_out, _, low_out = out
    ious = [iou(a > 0, b > 0) for a, b in zip(masks_ref[:, 0], masks_out[:, 0])]
    return {
        "max_abs_logit_diff": float(np.abs(masks_ref - masks_out).max()),
        "max_abs_low_res_diff": float(np.abs(low_ref - low_out).max()),
        "max_abs_iou_pred_diff": float(np.abs(ref[1] - out[1]).max()),
        "min_mask_iou": float(min(ious)),
    }


def check_parity(
    model: CPCSAM,
    encoder: OnnxImageEncoder,
    decoder: OnnxDecoder,
    cases: Sequence[ParityCase],
    max_abs_logit_diff: float = MAX_ABS_LOGIT_DIFF,
    min_mask_iou: float = MIN_MASK_IOU,
) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch on `cases`; `model` must be the exported (LoRA-merged) one."""
    if not cases:
        raise ValueError("check_parity: no cases")
    torch_encoder = ImageEncoderOnnxModel(model).eval()
    torch_decoder = DecoderOnnxModel(model).eval()
    rows = []
    for case in cases:
        h, w = case.image.shape[:2]
        x = preprocess_image(case.image, model.image_size)[None]
        coords = torch.from_numpy(np.asarray(case.point_coords, np.float32))
        labels = torch.from_numpy(np.asarray(case.point_labels, np.float32))
        n = coords.shape[0]
        mask_in = torch.zeros(n, 1, *[4 * s for s in model.embedding_size])
        has_mask = torch.zeros(n)
        size = torch.tensor([h, w], dtype=torch.float32)
        with torch.no_grad():
            emb = torch_encoder(x)
            ref = [t.numpy() for t in torch_decoder(emb, coords, labels, mask_in, has_mask, size)]
        onnx_emb = encoder(x.numpy())
        outputs = decoder(onnx_emb, coords.numpy(), labels.numpy(), (h, w))
        end_to_end = [outputs["masks"], outputs["iou_predictions"], outputs["low_res_masks"]]
        same_emb = decoder(emb.numpy(), coords.numpy(), labels.numpy(), (h, w))
        decoder_only = [same_emb["masks"], same_emb["iou_predictions"], same_emb["low_res_masks"]]
        rows.append({
            "case": case.name,
            "image_size": [h, w],
            "num_entities": int(n),
            "num_points": int(coords.shape[1]),
            "max_abs_embedding_diff": float(np.abs(onnx_emb - emb.numpy()).max()),
            "end_to_end": _compare(ref, end_to_end),
            "decoder_only": _compare(ref, decoder_only),
        })
    worst_diff = max(r["end_to_end"]["max_abs_logit_diff"] for r in rows)
    worst_iou = min(r["end_to_end"]["min_mask_iou"] for r in rows)
    passed = worst_diff <= max_abs_logit_diff and worst_iou >= min_mask_iou
    return {
        "passed": bool(passed),
        "max_abs_logit_diff": worst_diff,
        "max_abs_logit_diff_threshold": max_abs_logit_diff,
        "min_mask_iou": worst_iou,
        "min_mask_iou_threshold": min_mask_iou,
        "decoder_only_max_abs_logit_diff": max(r["decoder_only"]["max_abs_logit_diff"] for r in rows),
        "decoder_only_min_mask_iou": min(r["decoder_only"]["min_mask_iou"] for r in rows),
        "max_abs_embedding_diff": max(r["max_abs_embedding_diff"] for r in rows),
        "providers": {"image_encoder": encoder.info.providers, "decoder": decoder.info.providers},
        "cases": rows,
    }
