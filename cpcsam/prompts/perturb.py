"""Prompt geometry: perturbed training prompts (docs/METHOD.md §1) and ground-truth prompts with noise.

This module is the one home of prompt geometry in the project. A prompt is a small set of
points in *original image pixels* with ONNX-style labels (SAM's `utils/onnx.py` convention):

    1 positive point, 0 negative point, 2 box top-left corner, 3 box bottom-right corner,
    -1 padding ("not a point"), added only when prompts are batched to a fixed number of slots.

Conventions: a point is a pixel index `(x=column, y=row)` (SAM's prompt encoder adds the
half-pixel shift itself); a box is `(x0, y0, x1, y1)` in pixel *edges*, so the tight box of a
mask equals the manifest's `bbox_x, bbox_y, bbox_x + bbox_w, bbox_y + bbox_h`.

Training prompts (`perturb_entity`) are a pure function of `(seed, image_id, entity_id, k)`:
the random generator is derived from a cryptographic hash of those four values, never from
Python's salted `hash`, so the `perturb` stage gives the same bytes in every process.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from cpcsam.config import PROMPT_KINDS, PerturbConfig
from cpcsam.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

LABEL_PAD = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3

# PROMPT_KINDS (box | points | box+points) is defined with the params that name them, in cpcsam.config.


@dataclass(frozen=True)
class Prompt:
    """One prompt for one entity: points in original image pixels plus their labels."""

    kind: str
    coords: np.ndarray  # float64 [n, 2], (x, y)
    labels: np.ndarray  # int64 [n]

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"prompt kind {self.kind!r} not in {PROMPT_KINDS}")
        if self.coords.shape != (len(self.labels), 2):
            raise ValueError(f"prompt coords shape {self.coords.shape} does not match {len(self.labels)} labels")

    @property
    def num_points(self) -> int:
        return int(len(self.labels))

    def flat_coords(self) -> list[float]:
        """`[x0, y0, x1, y1, ...]` as stored in `prompts.parquet`."""
        return [float(v) for v in self.coords.reshape(-1)]

    @classmethod
    def from_flat(cls, kind: str, coords: Sequence[float], labels: Sequence[int]) -> "Prompt":
        return cls(
            kind=kind,
            coords=np.asarray(coords, dtype=np.float64).reshape(-1, 2),
            labels=np.asarray(labels, dtype=np.int64),
        )

    def box(self) -> np.ndarray | None:
        """The box `(x0, y0, x1, y1)` when the prompt has one, else None."""
        tl = self.coords[self.labels == LABEL_BOX_TOP_LEFT]
        br = self.coords[self.labels == LABEL_BOX_BOTTOM_RIGHT]
        if len(tl) == 0 or len(br) == 0:
            return None
        return np.concatenate([tl[0], br[0]])


# ---------------------------------------------------------------------------------------------
# Random generators
# ---------------------------------------------------------------------------------------------


def entity_rng(seed: int, image_id: str, entity_id: str, k: int) -> np.random.Generator:
    """A numpy Generator that depends only on `(seed, image_id, entity_id, k)`.

    BLAKE2b of an unambiguous encoding of the four values seeds PCG64; Python's `hash` is
    salted per process and would break reproducibility.
    """
    key = "\x1f".join(["cpcsam.perturb.v1", str(int(seed)), str(image_id), str(entity_id), str(int(k))])
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"entity mask must be 2-D [H, W], got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise DataError(f"entity mask of shape {mask.shape} is empty: cannot place a prompt on it")
    return mask


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box `(x0, y0, x1, y1)` of a non-empty mask, in pixel edges (x1 = last column + 1)."""
    mask = _check_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def jitter_box(box: np.ndarray, sigma: float, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Move each side by `u * side`, `u ~ U(-sigma, sigma)`, then clip to the image.

    `side` is the box width for the left/right sides and its height for the top/bottom ones.
    The result keeps at least one pixel of extent so that it is always a valid box.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    if sigma > 0:
        u = rng.uniform(-sigma, sigma, size=4)
        x0, y0, x1, y1 = x0 + u[0] * w, y0 + u[1] * h, x1 + u[2] * w, y1 + u[3] * h
    x0, x1 = np.clip([x0, x1], 0.0, float(width))
    y0, y1 = np.clip([y0, y1], 0.0, float(height))
    # Keep a valid box after clipping (a degenerate one would encode as two equal corners).
    if x1 - x0 < 1.0:
        x0, x1 = _widen(x0, x1, float(width))
    if y1 - y0 < 1.0:
        y0, y1 = _widen(y0, y1, float(height))
    return np.array([x0, y0, x1, y1], dtype=np.float64)


def _widen(lo: float, hi: float, limit: float) -> tuple[float, float]:
    mid = min(max((lo + hi) / 2.0, 0.5), limit - 0.5)
    return mid - 0.5, mid + 0.5


def _crop_bounds(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = mask_box(mask).astype(int)
    h, w = mask.shape
    return slice(max(0, y0 - margin), min(h, y1 + margin)), slice(max(0, x0 - margin), min(w, x1 + margin))


def sample_positive_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct pixels drawn uniformly from the mask (repeats only if it has fewer pixels)."""
    mask = _check_mask(mask)
    rows, cols = _crop_bounds(mask, 0)
    ys, xs = np.nonzero(mask[rows, cols])
    idx = rng.choice(len(xs), size=n, replace=len(xs) < n)
    return np.stack([xs[idx] + cols.start, ys[idx] + rows.start], axis=1).astype(np.float64)


def negative_band(mask: np.ndarray, band_fraction: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Pixels outside the mask within `band` pixels of it (a crop around the entity, and its offset).

    `band = max(2, round(band_fraction * longer side of the tight box))`.
    """
    mask = _check_mask(mask)
    x0, y0, x1, y1 = mask_box(mask)
    band = max(2, int(round(band_fraction * max(x1 - x0, y1 - y0))))
    rows, cols = _crop_bounds(mask, band)
    crop = mask[rows, cols]
    # Distance of every outside pixel to the nearest mask pixel (the crop holds the whole mask).
    distance = ndimage.distance_transform_edt(~crop)
    return (distance > 0) & (distance <= band), (rows, cols)


def sample_negative_points(
    mask: np.ndarray, n: int, rng: np.random.Generator, band_fraction: float
) -> np.ndarray:
    """Up to `n` distinct pixels from the band just outside the mask (fewer if the band is small)."""
    if n <= 0:
        return np.zeros((0, 2), dtype=np.float64)
    band, (rows, cols) = negative_band(mask, band_fraction)
    ys, xs = np.nonzero(band)
    if len(xs) == 0:  # the mask fills its surroundings (e.g. the whole image): no negatives
        return np.zeros((0, 2), dtype=np.float64)
    idx = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
    return np.stack([xs[idx] + cols.start, ys[idx] + rows.start], axis=1).astype(np.float64)


def displace_points(
    points: np.ndarray, box: np.ndarray, sigma: float, rng: np.random.Generator, width: int, height: int
) -> np.ndarray:
    """Move every point by `u * (box w, box h)`, `u ~ U(-sigma, sigma)` per axis, rounded and clipped
    to the image: a careless click, which may miss the object (sigma = 0: unchanged, no draw)."""
    if sigma <= 0:
        return points
    side = np.array([box[2] - box[0], box[3] - box[1]])
    moved = points + rng.uniform(-sigma, sigma, size=points.shape) * side
    return np.clip(np.round(moved), 0, [width - 1, height - 1])


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from the background (first such pixel in row-major order).

    The standard deterministic click of interactive-segmentation evaluation.
    """
    mask = _check_mask(mask)
    rows, cols = _crop_bounds(mask, 1)
    distance = ndimage.distance_transform_edt(np.pad(mask[rows, cols], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([[x + cols.start, y + rows.start]], dtype=np.float64)


def _assemble(kind: str, box: np.ndarray | None, positives: np.ndarray, negatives: np.ndarray) -> Prompt:
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if box is not None:
        coords.append(box.reshape(2, 2))
        labels.append(np.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], dtype=np.int64))
    if kind != "box":
        coords += [positives, negatives]
        labels += [
            np.full(len(positives), LABEL_POSITIVE, dtype=np.int64),
            np.full(len(negatives), LABEL_NEGATIVE, dtype=np.int64),
        ]
    return Prompt(kind=kind, coords=np.concatenate(coords).astype(np.float64), labels=np.concatenate(labels))


def prompt_from_mask(
    mask: np.ndarray,
    kind: str,
    sigma: float,
    rng: np.random.Generator,
    num_positive: int = 1,
    num_negative: int = 0,
    band_fraction: float = 0.2,
) -> Prompt:
    """A prompt from a ground-truth mask with noise level `sigma` (evaluation and pretraining).

    - box: the tight box, each side moved by `u * side`, `u ~ U(-sigma, sigma)` (sigma = 0: exact);
    - points: the first positive is the most interior pixel, further positives are uniform in
      the mask; with sigma > 0 every positive is displaced by `u * (box w, box h)` with
      `u ~ U(-sigma, sigma)` per axis and clipped to the image (a careless click may miss);
      negatives come from the band outside the mask;
    - box+points: both.
    """
    if kind not in PROMPT_KINDS:
        raise ConfigError(f"prompt kind {kind!r} not in {PROMPT_KINDS}")
    mask = _check_mask(mask)
    height, width = mask.shape
    tight = mask_box(mask)
    box = jitter_box(tight, sigma, rng, width, height) if kind != "points" else None
    positives = np.zeros((0, 2))
    negatives = np.zeros((0, 2))
    if kind != "box":
        positives = interior_point(mask)
        if num_positive > 1:
            positives = np.concatenate([positives, sample_positive_points(mask, num_positive - 1, rng)])
        positives = displace_points(positives, tight, sigma, rng, width, height)
        negatives = sample_negative_points(mask, num_negative, rng, band_fraction)
    return _assemble(kind, box, positives, negatives)


def perturb_entity(
    seed: int, image_id: str, entity_id: str, k: int, mask: np.ndarray, cfg: PerturbConfig
) -> Prompt:
    """The k-th perturbed training prompt of an entity (docs/METHOD.md §1), a pure function of its inputs.

    Kind drawn from `cfg.kind_probs`; box = tight box with side jitter `sigma_box`; points =
    U{positives} positives uniform inside the mask, each displaced by `sigma_points` of the box
    (`displace_points`, the evaluation's click noise), and U{negatives} negatives from the band
    outside it (fewer when the band is too small). The first `clean_groups` of the K prompts
    carry no geometric noise (exact box, points where they were drawn): an anchor in the task
    loss, whose mean and variance then rise if the calibration hurts an exact prompt.
    """
    mask = _check_mask(mask)
    rng = entity_rng(seed, image_id, entity_id, k)
    kinds = [kind for kind, _ in cfg.kind_probs]
    kind = kinds[int(rng.choice(len(kinds), p=[p for _, p in cfg.kind_probs]))]
    clean = k < cfg.clean_groups
    height, width = mask.shape
    tight = mask_box(mask)
    box = jitter_box(tight, 0.0 if clean else cfg.sigma_box, rng, width, height) if kind != "points" else None
    positives = np.zeros((0, 2))
    negatives = np.zeros((0, 2))
    if kind != "box":
        n_pos = int(rng.integers(cfg.positives[0], cfg.positives[1] + 1))
        n_neg = int(rng.integers(cfg.negatives[0], cfg.negatives[1] + 1))
        positives = sample_positive_points(mask, n_pos, rng)
        negatives = sample_negative_points(mask, n_neg, rng, cfg.negative_band)
        # Drawn after everything else, so sigma_points = 0 leaves every other draw as it was.
        positives = displace_points(positives, tight, 0.0 if clean else cfg.sigma_points, rng, width, height)
    return _assemble(kind, box, positives, negatives)


def pad_points(
    coords: Sequence[np.ndarray], labels: Sequence[np.ndarray], slots: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The one home of prompt padding: N point lists → coords `[N, P, 2]` float32, labels `[N, P]` int64.

    `P` = `slots`, or the longest list when None; shorter lists are padded with label −1
    (`LABEL_PAD`, not-a-point: SAM's prompt encoder gives it the not-a-point embedding).
    """
    if len(coords) != len(labels):
        raise ValueError(f"{len(coords)} coordinate lists for {len(labels)} label lists")
    longest = max((len(lab) for lab in labels), default=0)
    p = longest if slots is None else slots
    if longest > p:
        raise ConfigError(f"a prompt with {longest} points does not fit in {p} prompt slots")
    out_c = np.zeros((len(coords), p, 2), dtype=np.float32)
    out_l = np.full((len(coords), p), LABEL_PAD, dtype=np.int64)
    for i, (c, lab) in enumerate(zip(coords, labels)):
        out_c[i, : len(lab)] = np.asarray(c, dtype=np.float32).reshape(-1, 2)
        out_l[i, : len(lab)] = lab
    return out_c, out_l


def pad_prompt(prompt: Prompt, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """One prompt as coordinates `[slots, 2]` (float32) and labels `[slots]` (int64), see `pad_points`."""
    if prompt.num_points > slots:
        raise ConfigError(f"a {prompt.kind!r} prompt with {prompt.num_points} points does not fit in {slots} prompt slots")
    coords, labels = pad_points([prompt.coords], [prompt.labels], slots)
    return coords[0], labels[0]


# ---------------------------------------------------------------------------------------------
# The perturb stage's table
# ---------------------------------------------------------------------------------------------

PROMPT_COLUMNS = ["entity_id", "image_id", "k", "kind", "coords", "labels"]


def training_entities(manifest: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """Entities that training sees: the train split, base classes only, in a stable order."""
    rows = manifest[(manifest["split"] == "train") & (manifest["role"] == "base")]
    return rows.sort_values(["image_id", "entity_id"], kind="stable").reset_index(drop=True)


def perturb_manifest(
    manifest: "pd.DataFrame",  # noqa: F821
    cfg: PerturbConfig,
    seed: int,
    decode: Callable[[str, int, int], np.ndarray] | None = None,
    progress: bool = True,
) -> "pd.DataFrame":  # noqa: F821
    """K prompts for every training entity of the manifest, one row per (entity, k)."""
    import pandas as pd
    from tqdm import tqdm

    if decode is None:
        from cpcsam.data import decode_mask as decode
    entities = training_entities(manifest)
    if entities.empty:
        raise DataError("manifest has no training entities (split == 'train' and role == 'base')")
    records: list[dict[str, Any]] = []
    for row in tqdm(entities.itertuples(index=False), total=len(entities), desc="perturb", disable=not progress):
        mask = decode(row.rle_counts, int(row.height), int(row.width))
        if not np.asarray(mask).any():
            raise DataError(f"manifest entity {row.entity_id!r} (image {row.image_id!r}) has an empty mask")
        for k in range(cfg.k):
            prompt = perturb_entity(seed, str(row.image_id), str(row.entity_id), k, mask, cfg)
            records.append(
                {
                    "entity_id": str(row.entity_id),
                    "image_id": str(row.image_id),
                    "k": k,
                    "kind": prompt.kind,
                    "coords": prompt.flat_coords(),
                    "labels": [int(v) for v in prompt.labels],
                }
            )
    logger.info("perturb: %d prompts for %d entities (K=%d)", len(records), len(entities), cfg.k)
    return pd.DataFrame.from_records(records, columns=PROMPT_COLUMNS)


def load_prompts(path: "str | Any") -> "pd.DataFrame":  # noqa: F821
    """Read `prompts.parquet`, checking the columns this module writes."""
    from pathlib import Path

    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found (run the perturb stage)")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc
    missing = [c for c in PROMPT_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing prompt columns {missing}")
    return frame
