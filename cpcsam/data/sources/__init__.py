"""Data sources behind one interface (`cpcsam.data.records.DataSource`), chosen by params.

`build_source(cfg, images_dir, max_pixels)` maps a profile's `source:` name to its class:
`synthetic` (the embedded default), `coco`, `semantic_masks`, `binary_masks`. File-based
sources take a `root` that is a local folder or an `s3://bucket/prefix`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from cpcsam.data.records import DataSource
from cpcsam.errors import ConfigError

SOURCE_KINDS = ("synthetic", "coco", "semantic_masks", "binary_masks")


def build_source(cfg: Any, images_dir: str | Path, max_pixels: int | None = None) -> DataSource:
    """The source of a profile (a typed `cpcsam.config` profile, or a mapping with its `source`)."""
    kind = cfg.get("source") if isinstance(cfg, Mapping) else cfg.source
    if kind == "synthetic":
        from cpcsam.data.sources.synthetic import SyntheticSource

        return SyntheticSource(cfg, images_dir)
    if kind == "coco":
        from cpcsam.data.sources.coco import CocoSource

        return CocoSource(cfg, max_pixels)
    if kind == "semantic_masks":
        from cpcsam.data.sources.folders import SemanticMaskSource

        return SemanticMaskSource(cfg, max_pixels)
    if kind == "binary_masks":
        from cpcsam.data.sources.folders import BinaryMaskSource

        return BinaryMaskSource(cfg, max_pixels)
    raise ConfigError(f"params data profile: source {kind!r} is not one of {list(SOURCE_KINDS)}")
