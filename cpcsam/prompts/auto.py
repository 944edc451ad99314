"""Automatic prompts for classes without user geometry (docs/METHOD.md §5, "automatic").

A few annotated support images give each class a prototype: the mask-average-pooled image
embedding. On a query image the cosine-similarity map between the embedding and the prototype
gives positive points at its peaks, negative points at its troughs and a box around the region
above a threshold. The result is one ONNX-style prompt (coords in the model-input frame,
labels 1 / 0 / 2 / 3) that goes through the same CaPL → decoder path as a user's prompt.

Everything here is tensor maths on embeddings, independent of which model made them; the caller
(evaluation, prediction) runs the image encoder.

Choices (ours): the region is the 4-connected component, around the strongest cell, of the
valid cells whose similarity is at least `min + box_threshold · (max − min)` (relative, so it
adapts to each model's similarity scale; connected, so stray background cells that happen to
look alike do not stretch the box). One prompt therefore targets one object, the most
prototype-like; a class with several instances in the image gets its strongest one. Positives
are the strongest cells of the region, preferring cells two apart (greedy suppression);
negatives are the lowest valid cells outside the box, so they stay off the object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cpcsam.config import AutoConfig


# The `evaluate.auto` section (num_positive, num_negative, box_threshold, use_box) lives in cpcsam.config.
AutoPromptConfig = AutoConfig


@dataclass
class AutoPrompt:
    """One prompt: `coords` [P, 2] (x, y) in the model-input frame, `labels` [P] (1, 0, 2, 3)."""

    coords: np.ndarray
    labels: np.ndarray
    score: float  # peak cosine similarity: how sure the prototype is that the class is here
    similarity: np.ndarray  # [h, w] map on the embedding grid (NaN outside the image), for overlays


def valid_grid_size(input_size: tuple[int, int], img_size: int, grid: tuple[int, int]) -> tuple[int, int]:
    """Rows/cols of the embedding grid covered by the resized image (the rest is padding)."""
    stride_y, stride_x = img_size / grid[0], img_size / grid[1]
    return (max(1, int(np.ceil(input_size[0] / stride_y))), max(1, int(np.ceil(input_size[1] / stride_x))))


def mask_to_grid(mask: np.ndarray | torch.Tensor, input_size: tuple[int, int], img_size: int,
                 grid: tuple[int, int]) -> torch.Tensor:
    """A full-size mask [H, W] → fraction of each embedding cell it covers, [h, w] in [0, 1].

    Follows the image's own path: resize to `input_size` (longest side = `img_size`), pad
    bottom/right to `img_size`², then area-average down to the embedding grid.
    """
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    m = F.interpolate(m, size=tuple(int(s) for s in input_size), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, img_size - int(input_size[1]), 0, img_size - int(input_size[0])))
    return F.adaptive_avg_pool2d(m, grid)[0, 0].clamp_(0.0, 1.0)


def masked_average(embedding: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """Mask-average pooling: Σ_p w_p f_p / Σ_p w_p for `embedding` [C, h, w]; None for an empty mask."""
    total = weights.sum()
    if float(total) <= 0.0:
        return None
    return (embedding * weights[None]).sum(dim=(1, 2)) / total


def class_prototypes(features: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Prototype μ_c per class = mean of its support features (each one instance/image's pooled vector)."""
    protos: dict[str, torch.Tensor] = {}
    for name, feats in features.items():
        feats = [f for f in feats if f is not None]
        if feats:
            protos[name] = torch.stack(feats).mean(dim=0)
    return protos


def similarity_map(embedding: torch.Tensor, prototype: torch.Tensor, valid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each cell of `embedding` [C, h, w] to `prototype` [C]; NaN outside `valid`."""
    sim = F.cosine_similarity(embedding, prototype[:, None, None].to(embedding.dtype), dim=0, eps=1e-8)
    out = torch.full_like(sim, float("nan"))
    out[: valid[0], : valid[1]] = sim[: valid[0], : valid[1]]
    return out


def _cell_centres(cells: torch.Tensor, stride: tuple[float, float]) -> np.ndarray:
    """(row, col) cells → (x, y) model-frame pixel centres."""
    rows, cols = cells[:, 0].double(), cells[:, 1].double()
    return torch.stack([(cols + 0.5) * stride[1], (rows + 0.5) * stride[0]], dim=1).numpy()


def _component(mask: torch.Tensor, seed: tuple[int, int]) -> torch.Tensor:
    """The 4-connected component of boolean `mask` [h, w] that contains `seed` (row, col)."""
    keep = mask.numpy()
    out = np.zeros_like(keep)
    stack = [seed]
    while stack:
        r, c = stack.pop()
        if 0 <= r < keep.shape[0] and 0 <= c < keep.shape[1] and keep[r, c] and not out[r, c]:
            out[r, c] = True
            stack.extend(((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)))
    return torch.from_numpy(out)


def _spread_peaks(filled: torch.Tensor, region: torch.Tensor, count: int) -> torch.Tensor:
    """Up to `count` cells of `region`, strongest first, preferring cells ≥ 2 apart (Chebyshev).

    Greedy non-maximum suppression keeps positives from bunching on one spot; when the region is
    too small for that, the next strongest cells of the region fill in. Never outside the region.
    """
    cells = region.nonzero()
    cells = cells[torch.argsort(filled[region], descending=True, stable=True)]
    chosen: list[int] = []
    for i in range(len(cells)):
        if len(chosen) == count:
            break
        if all(int((cells[i] - cells[j]).abs().max()) >= 2 for j in chosen):
            chosen.append(i)
    for i in range(len(cells)):
        if len(chosen) == count:
            break
        if i not in chosen:
            chosen.append(i)
    return cells[chosen]


def prompt_from_similarity(sim: torch.Tensor, img_size: int, input_size: tuple[int, int],
                           cfg: AutoPromptConfig = AutoPromptConfig()) -> AutoPrompt:
    """Points at peaks/troughs and a box around the thresholded region of a similarity map [h, w]."""
    h, w = sim.shape
    stride = (img_size / h, img_size / w)
    valid = ~torch.isnan(sim)
    if not bool(valid.any()):
        raise ValueError("prompt_from_similarity: the similarity map has no valid cell")
    filled = torch.where(valid, sim, torch.full_like(sim, -torch.inf))
    top, bottom = float(filled.max()), float(sim[valid].min())

    above = valid & (filled >= bottom + cfg.box_threshold * (top - bottom))
    region = _component(above, divmod(int(torch.argmax(filled)), w))
    rows, cols = region.any(dim=1).nonzero()[:, 0], region.any(dim=0).nonzero()[:, 0]
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    in_box = torch.zeros_like(valid)
    in_box[r0 : r1 + 1, c0 : c1 + 1] = True

    peak_cells = _spread_peaks(filled, region, max(1, cfg.num_positive))

    # Troughs: lowest valid cells outside the box (inside it when the box covers everything).
    candidates = valid & ~in_box if bool((valid & ~in_box).any()) else valid
    cand_cells = candidates.nonzero()
    trough_order = torch.argsort(filled[candidates], stable=True)
    trough_cells = cand_cells[trough_order][: max(0, cfg.num_negative)]

    coords = [_cell_centres(peak_cells, stride)]
    labels = [np.ones(len(peak_cells), np.int64)]
    if len(trough_cells):
        coords.append(_cell_centres(trough_cells, stride))
        labels.append(np.zeros(len(trough_cells), np.int64))
    if cfg.use_box:
        max_x, max_y = float(input_size[1]), float(input_size[0])
        box = np.array([[c0 * stride[1], r0 * stride[0]],
                        [min((c1 + 1) * stride[1], max_x), min((r1 + 1) * stride[0], max_y)]])
        coords.append(box)
        labels.append(np.array([2, 3], np.int64))
    coords_np = np.concatenate(coords).astype(np.float32)
    # Keep points inside the resized image (cell centres of the last row/col can overshoot it).
    coords_np[:, 0] = np.clip(coords_np[:, 0], 0, input_size[1] - 1e-3)
    coords_np[:, 1] = np.clip(coords_np[:, 1], 0, input_size[0] - 1e-3)
    return AutoPrompt(coords=coords_np, labels=np.concatenate(labels), score=top, similarity=sim.numpy())


def auto_prompt(embedding: torch.Tensor, prototype: torch.Tensor, img_size: int, input_size: tuple[int, int],
                cfg: AutoPromptConfig = AutoPromptConfig()) -> AutoPrompt:
    """The whole query-side path for one image embedding [C, h, w] and one class prototype [C]."""
    grid = (int(embedding.shape[-2]), int(embedding.shape[-1]))
    valid = valid_grid_size(input_size, img_size, grid)
    return prompt_from_similarity(similarity_map(embedding, prototype, valid), img_size, input_size, cfg)
