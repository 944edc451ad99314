"""Mask-folder sources: semantic class-index masks and per-class binary masks.

Semantic (CamVid / SUIM / Kvasir-SEG style), under `root`:
    images/<name>.<ext>      the images (any common format, subfolders allowed)
    masks/<name>.png         one class-index PNG per image (pixel value = class index)
    classes.txt              the class map: one name per line, line i = index i
                             (or classes.json: a list of names or {"index": "name"})
Entities: `entities: per_class` (default) makes one entity per class present in an image,
the usual semantic convention — a class-index map does not say where one instance ends and
the next begins, and connected components both split one occluded object into pieces and merge
touching ones. `entities: components` gives one entity per 8-connected component (with
`min_component_area`) when the classes are known to be well separated blobs.
Indices in `ignore_classes` (names, default `background`) and `ignore_index` (default 255) are
not entities. An index missing from the class map is quarantined as unknown_class.

Binary (CelebAMask-HQ style): one binary mask per class and image, either
    masks/<class>/<name>.png           (`layout: class_dirs`, classes = the folder names)
    masks/<name>_<class>.png           (`layout: suffix`, needs the `classes` list)
Each non-empty mask is one entity.

For both: an image without any mask has no entity (counted, not quarantined); a mask whose
image is absent is quarantined as missing_image; a mask of another size than its image as
mask_size_mismatch; an all-zero binary mask as empty_mask.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import PurePosixPath
from typing import Any, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from cpcsam.data import storage
from cpcsam.data.records import ImageRecord, Quarantine
from cpcsam.data.sources.common import IMAGE_SUFFIXES, entity_from_mask, group_of, load_image_info
from cpcsam.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _stem(rel: str) -> str:
    p = PurePosixPath(rel)
    return str(p.with_suffix(""))


def _read_mask(uri: str, max_pixels: int | None) -> np.ndarray:
    """A single-channel mask array; DataError (reason invalid_segmentation) when unreadable."""
    try:
        img = storage.open_image(storage.read_bytes(uri), uri, max_pixels)
    except storage.ImageError as exc:
        raise DataError(f"{uri}: mask file is not a readable image: {exc}") from exc
    if img.mode not in ("L", "P", "1", "I", "I;16"):
        img = img.convert("L")
    return np.asarray(img)


def read_class_map(uri: str) -> dict[int, str]:
    """classes.txt (line i = index i) or classes.json (list or {index: name})."""
    text = storage.read_text(uri)
    if uri.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{uri}: not valid JSON: {exc}") from exc
        if isinstance(data, list):
            return {i: str(n) for i, n in enumerate(data)}
        if isinstance(data, dict):
            try:
                return {int(k): str(v) for k, v in data.items()}
            except ValueError as exc:
                raise DataError(f"{uri}: class map keys must be integer indices: {exc}") from exc
        raise DataError(f"{uri}: class map must be a list of names or an {{index: name}} mapping")
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise DataError(f"{uri}: class map must hold one non-empty class name per line")
    return dict(enumerate(names))


class _FolderSource:
    def __init__(self, cfg: dict[str, Any], max_pixels: int | None) -> None:
        if not cfg.get("root"):
            raise ConfigError(f"params data {self.name} source: `root` (folder or s3:// prefix) is required")
        self.root = str(cfg["root"])
        self.images_root = storage.join(self.root, str(cfg.get("images_dir", "images")))
        self.masks_root = storage.join(self.root, str(cfg.get("masks_dir", "masks")))
        self.group_pattern = cfg.get("group_pattern")
        self.max_pixels = max_pixels
        self.progress = bool(cfg.get("progress", True))
        files = storage.list_files(self.images_root, IMAGE_SUFFIXES)
        self.image_rels = {_stem(storage.relative_to(self.images_root, f)): storage.relative_to(self.images_root, f)
                           for f in files}
        if not self.image_rels:
            raise DataError(f"{self.images_root}: no image files found")

    def __len__(self) -> int:
        return len(self.image_rels)

    def _load(self, stem: str, quarantine: Quarantine, n_masks: int) -> tuple[str, int, int] | None:
        info = load_image_info(self.images_root, self.image_rels[stem], quarantine, self.max_pixels, stem, n_masks)
        return None if info is None else info[:3]


class SemanticMaskSource(_FolderSource):
    name = "semantic_masks"

    def __init__(self, cfg: dict[str, Any], max_pixels: int | None = None) -> None:
        super().__init__(cfg, max_pixels)
        self.class_map = read_class_map(storage.join(self.root, str(cfg.get("class_map", "classes.txt"))))
        ignore = set(cfg.get("ignore_classes", ["background"]))
        self.ignore_indices = {i for i, n in self.class_map.items() if n in ignore} | {int(cfg.get("ignore_index", 255))}
        self.mode = str(cfg.get("entities", "per_class"))
        if self.mode not in ("per_class", "components"):
            raise ConfigError(f"params data semantic_masks entities={self.mode!r}: use per_class or components")
        self.min_component_area = int(cfg.get("min_component_area", 1))
        self.mask_suffix = str(cfg.get("mask_suffix", ".png"))

    def classes(self) -> list[str]:
        return [n for i, n in sorted(self.class_map.items()) if i not in self.ignore_indices]

    def records(self, quarantine: Quarantine) -> Iterator[ImageRecord]:
        mask_files = storage.list_files(self.masks_root, (self.mask_suffix,))
        masks_by_stem = {}
        for f in mask_files:
            rel = storage.relative_to(self.masks_root, f)
            masks_by_stem[rel[: -len(self.mask_suffix)]] = f
        for stem in sorted(set(masks_by_stem) - set(self.image_rels)):
            quarantine.saw("annotation")
            quarantine.add(masks_by_stem[stem], "missing_image", f"mask {stem} has no image in {self.images_root}",
                           "annotation", stem)
        for stem in tqdm(sorted(self.image_rels), desc=f"ingest {self.root}", unit="img", disable=not self.progress):
            quarantine.saw("image")
            mask_uri = masks_by_stem.get(stem)
            if mask_uri is None:  # an image without a mask has no entity: counted, not quarantined
                continue
            quarantine.saw("annotation")
            info = self._load(stem, quarantine, 1)
            if info is None:
                continue
            uri, width, height = info
            try:
                index_map = _read_mask(mask_uri, self.max_pixels)
            except DataError as exc:
                quarantine.add(mask_uri, "invalid_segmentation", str(exc), "annotation", stem)
                continue
            if index_map.shape[:2] != (height, width):
                quarantine.add(mask_uri, "mask_size_mismatch",
                               f"mask is {index_map.shape[1]}x{index_map.shape[0]}, image is {width}x{height}",
                               "annotation", stem)
                continue
            rec = ImageRecord(stem, uri, width, height, group_of(self.image_rels[stem], stem, self.group_pattern))
            for index in np.unique(index_map).tolist():
                if index in self.ignore_indices:
                    continue
                if index not in self.class_map:
                    quarantine.saw("annotation")
                    quarantine.add(mask_uri, "unknown_class", f"class index {index} is not in the class map",
                                   "annotation", f"{stem}:{index}")
                    continue
                name = self.class_map[index]
                region = index_map == index
                if self.mode == "per_class":
                    rec.entities.append(entity_from_mask(f"{stem}:{name}", name, region))
                else:
                    rec.entities.extend(self._components(stem, name, region))
            yield rec

    def _components(self, stem: str, name: str, region: np.ndarray):
        from scipy import ndimage

        labels, n = ndimage.label(region, structure=np.ones((3, 3), bool))
        for k in range(1, n + 1):
            comp = labels == k
            if comp.sum() >= self.min_component_area:
                yield entity_from_mask(f"{stem}:{name}:{k}", name, comp)


class BinaryMaskSource(_FolderSource):
    name = "binary_masks"

    def __init__(self, cfg: dict[str, Any], max_pixels: int | None = None) -> None:
        super().__init__(cfg, max_pixels)
        self.layout = str(cfg.get("layout", "class_dirs"))
        if self.layout not in ("class_dirs", "suffix"):
            raise ConfigError(f"params data binary_masks layout={self.layout!r}: use class_dirs or suffix")
        self.mask_suffix = str(cfg.get("mask_suffix", ".png"))
        self.mask_files = [storage.relative_to(self.masks_root, f)
                           for f in storage.list_files(self.masks_root, (self.mask_suffix,))]
        given = cfg.get("classes")
        if given:
            self.class_names = [str(c) for c in given]
        elif self.layout == "class_dirs":
            self.class_names = sorted({PurePosixPath(f).parts[0] for f in self.mask_files if len(PurePosixPath(f).parts) > 1})
        else:
            raise ConfigError("params data binary_masks layout=suffix: give the `classes` list")
        if not self.class_names:
            raise DataError(f"{self.masks_root}: no class folders found")

    def classes(self) -> list[str]:
        return list(self.class_names)

    def _parse(self, rel: str) -> tuple[str, str] | None:
        """mask path -> (image stem, class name); None when no class can be read from it."""
        body = rel[: -len(self.mask_suffix)]
        if self.layout == "class_dirs":
            parts = PurePosixPath(body).parts
            return (str(PurePosixPath(*parts[1:])), parts[0]) if len(parts) > 1 else None
        # longest class name first: `hair` must not shadow `l_hair`-style names
        for name in sorted(self.class_names, key=len, reverse=True):
            if body.endswith("_" + name):
                return body[: -len(name) - 1], name
        stem, _, cls = body.rpartition("_")
        return (stem, cls) if stem else None

    def records(self, quarantine: Quarantine) -> Iterator[ImageRecord]:
        by_stem: dict[str, list[tuple[str, str]]] = {}
        for rel in self.mask_files:
            quarantine.saw("annotation")
            uri = storage.join(self.masks_root, rel)
            parsed = self._parse(rel)
            if parsed is None or parsed[1] not in self.class_names:
                quarantine.add(uri, "unknown_class", f"mask {rel}: class {parsed[1] if parsed else '?'!r} is not in "
                               f"{self.class_names}", "annotation", rel)
                continue
            stem, cls = parsed
            if stem not in self.image_rels:
                quarantine.add(uri, "missing_image", f"mask {rel} has no image {stem} in {self.images_root}",
                               "annotation", rel)
                continue
            by_stem.setdefault(stem, []).append((cls, uri))
        for stem in tqdm(sorted(self.image_rels), desc=f"ingest {self.root}", unit="img", disable=not self.progress):
            quarantine.saw("image")
            masks = sorted(by_stem.get(stem, []))
            if not masks:
                continue
            info = self._load(stem, quarantine, len(masks))
            if info is None:
                continue
            uri, width, height = info
            rec = ImageRecord(stem, uri, width, height, group_of(self.image_rels[stem], stem, self.group_pattern))
            for cls, mask_uri in masks:
                try:
                    arr = _read_mask(mask_uri, self.max_pixels)
                except DataError as exc:
                    quarantine.add(mask_uri, "invalid_segmentation", str(exc), "annotation", f"{stem}:{cls}")
                    continue
                if arr.shape[:2] != (height, width):
                    quarantine.add(mask_uri, "mask_size_mismatch",
                                   f"mask is {arr.shape[1]}x{arr.shape[0]}, image is {width}x{height}",
                                   "annotation", f"{stem}:{cls}")
                    continue
                region = arr > (127 if arr.max() > 1 else 0)  # 0/255 PNGs, and tolerate JPEG noise
                if not region.any():
                    quarantine.add(mask_uri, "empty_mask", f"mask of {cls} for {stem} has no pixel", "annotation",
                                   f"{stem}:{cls}")
                    continue
                rec.entities.append(entity_from_mask(f"{stem}:{cls}", cls, region))
            yield rec
