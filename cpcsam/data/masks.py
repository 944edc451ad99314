"""Entity masks: COCO RLE encode/decode, polygon rasterisation, boxes — with validation.

pycocotools' C decoder writes past its buffer when the run lengths of an RLE add up to more
than height*width, so every RLE coming from user data is checked here first (the compressed
counts string is parsed in Python, cheaply) and only then handed to pycocotools.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from cpcsam.errors import DataError


def parse_compressed_counts(counts: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> run lengths (the inverse of pycocotools' rleToString).

    Each count is written as 5-bit groups in chars offset by 48, with a continuation bit
    (0x20) and a sign bit in the last group; counts after the second are stored as deltas
    from the count two places before.
    """
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs: list[int] = []
    pos = 0
    n = len(counts)
    while pos < n:
        value = 0
        shift = 0
        more = True
        while more:
            if pos >= n:
                raise DataError("compressed RLE ends in the middle of a number")
            c = ord(counts[pos]) - 48
            if c < 0 or c > 63:
                raise DataError(f"compressed RLE holds an invalid character {counts[pos]!r}")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def check_runs(runs: Sequence[int], height: int, width: int) -> None:
    """Run lengths must be non-negative and add up to exactly height*width."""
    if any(r < 0 for r in runs):
        raise DataError("RLE holds a negative run length")
    total = int(sum(runs))
    if total != height * width:
        raise DataError(f"RLE covers {total} pixels, the mask size {height}x{width} needs {height * width}")


def rle_from_annotation(segmentation: Any, height: int, width: int) -> dict:
    """A COCO `segmentation` (polygons, uncompressed or compressed RLE) -> compressed RLE dict.

    `height`/`width` are the image's true size. Raises DataError with reason text for an
    invalid polygon/RLE or a size mismatch (the message starts with `size mismatch` then).
    """
    if isinstance(segmentation, list):
        polys = segmentation
        if not polys:
            raise DataError("polygon list is empty")
        clean = []
        for poly in polys:
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                raise DataError("polygon needs an even number (>= 6) of coordinates")
            try:
                arr = np.asarray(poly, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise DataError(f"polygon holds a non-numeric coordinate: {exc}") from exc
            if not np.all(np.isfinite(arr)):
                raise DataError("polygon holds a non-finite coordinate")
            clean.append(arr.tolist())
        rles = mask_utils.frPyObjects(clean, height, width)
        return mask_utils.merge(rles)
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2) or counts is None:
            raise DataError("RLE needs `size` [h, w] and `counts`")
        try:
            h, w = int(size[0]), int(size[1])
        except (TypeError, ValueError) as exc:
            raise DataError(f"RLE size {size!r} is not two integers") from exc
        if (h, w) != (height, width):
            raise DataError(f"size mismatch: RLE is {h}x{w}, image is {height}x{width}")
        if isinstance(counts, list):  # uncompressed RLE
            try:
                runs = [int(c) for c in counts]
            except (TypeError, ValueError) as exc:
                raise DataError(f"uncompressed RLE holds a non-integer count: {exc}") from exc
            check_runs(runs, h, w)
            return mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
        if isinstance(counts, (str, bytes)):
            runs = parse_compressed_counts(counts)
            check_runs(runs, h, w)
            raw = counts.encode("ascii") if isinstance(counts, str) else counts
            return {"size": [h, w], "counts": raw}
        raise DataError(f"RLE counts of type {type(counts).__name__} is neither a list nor a string")
    raise DataError(f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE")


def encode_mask(mask: np.ndarray) -> str:
    """Boolean mask [H, W] -> compressed RLE counts (ascii str), size (H, W)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii")


def decode_mask(rle_counts: str | bytes, height: int, width: int) -> np.ndarray:
    """Compressed RLE counts (the manifest's `rle_counts`) -> boolean mask [height, width]."""
    raw = rle_counts.encode("ascii") if isinstance(rle_counts, str) else rle_counts
    return mask_utils.decode({"size": [int(height), int(width)], "counts": raw}).astype(bool)


def rle_area(rle: dict) -> int:
    return int(mask_utils.area(rle))


def rle_bbox(rle: dict) -> tuple[float, float, float, float]:
    """Tight xywh box of an RLE mask (pixel units, inside the image by construction)."""
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return float(x), float(y), float(w), float(h)


def rle_counts_str(rle: dict) -> str:
    counts = rle["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else str(counts)


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0, 0.0, 0.0, 0.0
    return float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)
