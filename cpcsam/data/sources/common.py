"""Checks every file-based source shares: image loading, entity building, group ids."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cpcsam.data import masks, storage
from cpcsam.data.records import EntityRecord, Quarantine
from cpcsam.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def as_profile(cls: Any, cfg: Any) -> Any:
    """A source's typed profile (`cpcsam.config`): itself, or a mapping validated (its `source` implied)."""
    if isinstance(cfg, cls):
        return cfg
    source = cls.model_fields["source"].annotation.__args__[0]
    return cls.from_params({"source": source, **dict(cfg)}, f"data.profiles.<{source}>")


def progress_of(profile: Any) -> bool:
    return True if profile.progress is None else bool(profile.progress)


def load_image_info(
    root: str,
    relative: str,
    quarantine: Quarantine,
    max_pixels: int | None,
    image_id: str,
    n_annotations: int = 0,
    follow_symlinks: bool = False,
    data_root: str | None = None,
) -> tuple[str, int, int, Any] | None:
    """Resolve, read and fully decode one image; None (and quarantined) when it is unusable.

    Returns (uri, width, height, PIL image). Reasons: path_escapes_root (`../`, absolute, or a
    symbolic link leaving `root` and the data set's `data_root` unless `follow_symlinks`),
    missing_image, image_too_large, truncated_image, unreadable_image. The image's
    `n_annotations` are dropped with it and counted in its quarantine entry.
    """
    note = f" ({n_annotations} annotation(s) dropped with it)" if n_annotations else ""
    try:
        uri = storage.resolve_under(root, relative, follow_symlinks, data_root)
    except DataError as exc:
        quarantine.add(relative, "path_escapes_root", str(exc) + note, "image", image_id, n_annotations)
        return None
    try:
        data = storage.read_bytes(uri)
    except DataError as exc:
        quarantine.add(uri, "missing_image", str(exc) + note, "image", image_id, n_annotations)
        return None
    try:
        img = storage.open_image(data, uri, max_pixels)
    except storage.ImageError as exc:
        quarantine.add(uri, exc.reason, str(exc) + note, "image", image_id, n_annotations)
        return None
    return uri, img.width, img.height, img


def entity_from_mask(entity_id: str, class_name: str, mask: np.ndarray) -> EntityRecord:
    rle_counts = masks.encode_mask(mask)
    return EntityRecord(entity_id, class_name, rle_counts, masks.mask_bbox(mask), int(mask.sum()))


def group_of(image_name: str, image_id: str, pattern: str | None) -> str:
    """Group id from the file name with `pattern` (its first group, else the whole match)."""
    if not pattern:
        return image_id
    try:
        match = re.search(pattern, PurePosixPath(image_name).name)
    except re.error as exc:
        raise ConfigError(f"params data group_pattern {pattern!r}: not a valid regex: {exc}") from exc
    if not match:
        return image_id
    return match.group(1) if match.groups() else match.group(0)


def bbox_inside(bbox: Any, width: int, height: int, tolerance: float = 1.0) -> bool:
    """A COCO xywh box lies inside the image (one pixel of rounding allowed)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return False
    if not all(np.isfinite([x, y, w, h])) or w < 0 or h < 0:
        return False
    return x >= -tolerance and y >= -tolerance and x + w <= width + tolerance and y + h <= height + tolerance
