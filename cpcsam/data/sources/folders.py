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

Ids: an image's id is its path under `images/` without the extension. Two image files with
one id (`a.jpg` and `a.png`), or two mask files for one image (and class), leave nothing to say
which belongs to which: every party is quarantined as conflicting_id, naming all of them (an
image's masks go with it).

Symbolic links are treated as by the COCO source: files are listed as written under
`images/` and `masks/` (linked folders are entered), and a file whose link points outside
`root` is quarantined as path_escapes_root — unless `follow_symlinks: true`, for data sets
symlinked on purpose, which reads links wherever they point.
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import Any, Iterator, Mapping

import numpy as np
from tqdm import tqdm

from cpcsam.config import BinaryMasksProfile, SemanticMasksProfile
from cpcsam.data import storage
from cpcsam.data.records import ImageRecord, Quarantine
from cpcsam.data.sources.common import (
    IMAGE_SUFFIXES,
    entity_from_mask,
    group_of,
    load_image_info,
    as_profile,
    progress_of,
)
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
        raise DataError(f"{uri}: mask file is not a readable image: {exc.problem}") from exc
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


def _names(files: list[str]) -> str:
    return " and ".join(repr(f) for f in files)


class _FolderSource:
    def __init__(self, cfg: Any, max_pixels: int | None) -> None:
        if not cfg.root:
            raise ConfigError(f"params data {self.name} source: `root` (folder or s3:// prefix) is required")
        self.root = cfg.root
        self.images_root = storage.join(self.root, cfg.images_dir)
        self.masks_root = storage.join(self.root, cfg.masks_dir)
        self.group_pattern = cfg.group_pattern
        self.max_pixels = max_pixels
        self.progress = progress_of(cfg)
        self.follow_symlinks = cfg.follow_symlinks
        # image id (path without extension) -> its files; more than one file is a conflict
        self.image_files: dict[str, list[str]] = {}
        for f in storage.list_files(self.images_root, IMAGE_SUFFIXES, through_links=True):
            rel = storage.relative_to(self.images_root, f)
            self.image_files.setdefault(_stem(rel), []).append(rel)
        if not self.image_files:
            raise DataError(f"{self.images_root}: no image files found")
        self.image_rels = {stem: rels[0] for stem, rels in self.image_files.items() if len(rels) == 1}

    def __len__(self) -> int:
        return sum(len(rels) for rels in self.image_files.values())

    def _list_masks(self) -> list[str]:
        """Mask files, relative to the masks folder (linked files and folders included)."""
        return [storage.relative_to(self.masks_root, f)
                for f in storage.list_files(self.masks_root, (self.mask_suffix,), through_links=True)]

    def _mask_uri(self, rel: str, quarantine: Quarantine, item_id: str) -> str | None:
        """The mask's path, or None (quarantined as path_escapes_root) when it leaves the masks folder."""
        try:
            return storage.resolve_under(self.masks_root, rel, self.follow_symlinks, self.root)
        except DataError as exc:
            quarantine.add(storage.join(self.masks_root, rel), "path_escapes_root", str(exc), "annotation", item_id)
            return None

    def _image_conflict(self, stem: str, quarantine: Quarantine, mask_files: list[str]) -> None:
        """Quarantine every file of an image id held by several files, and the id's masks with them."""
        rels = self.image_files[stem]
        dropped = (f"; its mask(s) {_names(mask_files)} are quarantined with them (nothing says which image "
                   "they belong to)") if mask_files else ""
        for k, rel in enumerate(rels):
            quarantine.add(storage.join(self.images_root, rel), "conflicting_id",
                           f"image id {stem!r} is held by {len(rels)} files: {_names(rels)}; every one is "
                           f"quarantined{dropped}", "image", stem, len(mask_files) if k == 0 else 0)

    def _mask_conflict(self, what: str, files: list[str], quarantine: Quarantine, item_id: str) -> None:
        for f in files:
            quarantine.add(f, "conflicting_id",
                           f"{what} has {len(files)} mask files: {_names(files)}; nothing says which one is right, "
                           "every one is quarantined", "annotation", item_id)

    def _load(self, stem: str, quarantine: Quarantine, n_masks: int) -> tuple[str, int, int] | None:
        info = load_image_info(self.images_root, self.image_rels[stem], quarantine, self.max_pixels, stem, n_masks,
                               self.follow_symlinks, self.root)
        return None if info is None else info[:3]


class SemanticMaskSource(_FolderSource):
    name = "semantic_masks"

    def __init__(self, cfg: SemanticMasksProfile | Mapping[str, Any], max_pixels: int | None = None) -> None:
        cfg = as_profile(SemanticMasksProfile, cfg)
        super().__init__(cfg, max_pixels)
        self.class_map = read_class_map(storage.join(self.root, cfg.class_map))
        ignore = set(cfg.ignore_classes)
        self.ignore_indices = {i for i, n in self.class_map.items() if n in ignore} | {cfg.ignore_index}
        self.mode = cfg.entities
        if self.mode not in ("per_class", "components"):
            raise ConfigError(f"params data semantic_masks entities={self.mode!r}: use per_class or components")
        self.min_component_area = cfg.min_component_area
        self.mask_suffix = cfg.mask_suffix

    def classes(self) -> list[str]:
        return [n for i, n in sorted(self.class_map.items()) if i not in self.ignore_indices]

    def records(self, quarantine: Quarantine) -> Iterator[ImageRecord]:
        masks_by_stem: dict[str, list[str]] = {}  # image id -> its mask files (relative)
        for rel in self._list_masks():
            masks_by_stem.setdefault(rel[: -len(self.mask_suffix)], []).append(rel)
        for stem in sorted(set(masks_by_stem) - set(self.image_files)):
            for rel in masks_by_stem[stem]:
                quarantine.saw("annotation")
                quarantine.add(storage.join(self.masks_root, rel), "missing_image",
                               f"mask {stem} has no image in {self.images_root}", "annotation", stem)
        for stem in tqdm(sorted(self.image_files), desc=f"ingest {self.root}", unit="img", disable=not self.progress):
            quarantine.saw("image", len(self.image_files[stem]))
            mask_rels = masks_by_stem.get(stem, [])
            quarantine.saw("annotation", len(mask_rels))
            if stem not in self.image_rels:
                self._image_conflict(stem, quarantine, [storage.join(self.masks_root, r) for r in mask_rels])
                continue
            if not mask_rels:  # an image without a mask has no entity: counted, not quarantined
                continue
            if len(mask_rels) > 1:
                self._mask_conflict(f"image {stem!r}", [storage.join(self.masks_root, r) for r in mask_rels],
                                    quarantine, stem)
                continue
            info = self._load(stem, quarantine, 1)
            if info is None:
                continue
            uri, width, height = info
            mask_uri = self._mask_uri(mask_rels[0], quarantine, stem)
            if mask_uri is None:
                continue
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

    def __init__(self, cfg: BinaryMasksProfile | Mapping[str, Any], max_pixels: int | None = None) -> None:
        cfg = as_profile(BinaryMasksProfile, cfg)
        super().__init__(cfg, max_pixels)
        self.layout = cfg.layout
        self.mask_suffix = cfg.mask_suffix
        self.mask_files = self._list_masks()
        given = cfg.classes
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
        by_stem: dict[str, dict[str, list[str]]] = {}  # image id -> class -> mask files (relative)
        for rel in self.mask_files:
            quarantine.saw("annotation")
            uri = storage.join(self.masks_root, rel)
            parsed = self._parse(rel)
            if parsed is None or parsed[1] not in self.class_names:
                quarantine.add(uri, "unknown_class", f"mask {rel}: class {parsed[1] if parsed else '?'!r} is not in "
                               f"{self.class_names}", "annotation", rel)
                continue
            stem, cls = parsed
            if stem not in self.image_files:
                quarantine.add(uri, "missing_image", f"mask {rel} has no image {stem} in {self.images_root}",
                               "annotation", rel)
                continue
            by_stem.setdefault(stem, {}).setdefault(cls, []).append(rel)
        for stem in tqdm(sorted(self.image_files), desc=f"ingest {self.root}", unit="img", disable=not self.progress):
            quarantine.saw("image", len(self.image_files[stem]))
            by_class = by_stem.get(stem, {})
            if stem not in self.image_rels:
                self._image_conflict(stem, quarantine, [storage.join(self.masks_root, r)
                                                        for cls in sorted(by_class) for r in by_class[cls]])
                continue
            masks: list[tuple[str, str]] = []  # (class, relative mask file)
            for cls in sorted(by_class):
                if len(by_class[cls]) > 1:
                    self._mask_conflict(f"class {cls!r} of image {stem!r}",
                                        [storage.join(self.masks_root, r) for r in by_class[cls]],
                                        quarantine, f"{stem}:{cls}")
                    continue
                masks.append((cls, by_class[cls][0]))
            if not masks:
                continue
            info = self._load(stem, quarantine, len(masks))
            if info is None:
                continue
            uri, width, height = info
            rec = ImageRecord(stem, uri, width, height, group_of(self.image_rels[stem], stem, self.group_pattern))
            for cls, rel in masks:
                mask_uri = self._mask_uri(rel, quarantine, f"{stem}:{cls}")
                if mask_uri is None:
                    continue
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
