"""COCO instances JSON: polygons, uncompressed and compressed RLE (via pycocotools).

Layout under `root` (a folder or an `s3://` prefix): the annotation file (`annotations`,
default `annotations.json`) and the images under `images_dir` (default `images`), each
image's `file_name` relative to it. Group ids come from `group_pattern` applied to the file
name (TrashCan: `^(vid_\\d+)_frame` keeps each video's frames together).

What is refused, per item (the rest goes on): an image file that escapes the root (`../`, an
absolute path, a symbolic link pointing outside `root` unless `follow_symlinks: true`), is
missing, unreadable, truncated, over the pixel limit or of another size than declared; an
annotation for an image id not in `images`, of an unknown category, an invalid polygon/RLE, an
RLE of another size than the image, an empty mask or a bbox outside the image.

Ids are compared as the manifest writes them (`str(id)`: `5` and `"5"` are one id). An id
listed again with the same content (an image: same `file_name`, `width`, `height`; an
annotation: same `image_id`, `category_id`, `segmentation`, `bbox`) is read once, with a
`duplicate_id` note. An id listed with different contents is a conflict nothing can settle
(order says nothing about which entry is right): every entry of it is quarantined as
`conflicting_id`, naming all of them, and so are the annotations of a conflicting image id.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator, Mapping

from tqdm import tqdm

from cpcsam.data import masks, storage
from cpcsam.data.records import EntityRecord, ImageRecord, Quarantine
from cpcsam.config import CocoProfile
from cpcsam.data.sources.common import as_profile, bbox_inside, group_of, load_image_info, progress_of
from cpcsam.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class CocoSource:
    name = "coco"

    def __init__(self, cfg: CocoProfile | Mapping[str, Any], max_pixels: int | None = None) -> None:
        cfg = as_profile(CocoProfile, cfg)
        if not cfg.root:
            raise ConfigError("params data coco source: `root` (folder or s3:// prefix) is required")
        self.root = cfg.root
        self.ann_uri = storage.join(self.root, cfg.annotations)
        self.images_root = storage.join(self.root, cfg.images_dir)
        self.group_pattern = cfg.group_pattern
        self.max_pixels = max_pixels
        self.progress = progress_of(cfg)
        self.follow_symlinks = cfg.follow_symlinks
        try:
            self.coco = json.loads(storage.read_text(self.ann_uri))
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.ann_uri}: not valid JSON: {exc}") from exc
        if not isinstance(self.coco, dict) or not isinstance(self.coco.get("images"), list):
            raise DataError(f"{self.ann_uri}: not a COCO instances file (no `images` list)")
        if not isinstance(self.coco.get("categories"), list) or not self.coco["categories"]:
            raise DataError(f"{self.ann_uri}: no `categories`")
        self.category_names: dict[Any, str] = {}
        for cat in sorted(self.coco["categories"], key=lambda c: c.get("id", 0)):
            if cat.get("id") in self.category_names:
                raise DataError(f"{self.ann_uri}: category id {cat.get('id')} appears twice")
            self.category_names[cat.get("id")] = str(cat.get("name"))
        if len(set(self.category_names.values())) != len(self.category_names):
            raise DataError(f"{self.ann_uri}: two categories share a name")

    def classes(self) -> list[str]:
        return list(self.category_names.values())

    def __len__(self) -> int:
        return len(self.coco["images"])

    def records(self, quarantine: Quarantine) -> Iterator[ImageRecord]:
        images, conflicted = self._images(quarantine)
        by_image: dict[str, list[dict]] = {}
        dependants: dict[str, list[str]] = {}  # conflicting image id -> its annotation ids
        for aid, ann in self._annotations(quarantine):
            img_id = str(ann.get("image_id"))
            if img_id in conflicted:
                dependants.setdefault(img_id, []).append(aid)
                continue
            if img_id not in images:
                quarantine.add(self.ann_uri, "missing_image",
                               f"annotation {aid} refers to image id {ann.get('image_id')}, not in `images`",
                               "annotation", aid)
                continue
            if ann.get("category_id") not in self.category_names:
                quarantine.add(self.ann_uri, "unknown_class",
                               f"annotation {aid} has category id {ann.get('category_id')}, not in `categories`",
                               "annotation", aid)
                continue
            by_image.setdefault(img_id, []).append(ann)
        for img_id, entries in conflicted.items():
            anns = dependants.get(img_id, [])
            files = " and ".join(repr(str(e.get("file_name", ""))) + _size_text(e) for e in _distinct(entries, IMAGE_FIELDS))
            dropped = (f"; its {len(anns)} annotation(s) {_id_list(anns)} are quarantined with them (nothing says "
                       "which file they belong to)") if anns else ""
            for k, entry in enumerate(entries):
                quarantine.add(self._image_file(entry), "conflicting_id",
                               f"image id {img_id} is declared {len(entries)} times with different contents: {files}; "
                               f"every entry is quarantined{dropped}", "image", img_id, len(anns) if k == 0 else 0)

        for image_id, img in tqdm(images.items(), desc=f"ingest {self.root}", unit="img", disable=not self.progress):
            file_name = str(img.get("file_name", ""))
            anns = by_image.get(image_id, [])
            info = load_image_info(self.images_root, file_name, quarantine, self.max_pixels, image_id, len(anns),
                                   self.follow_symlinks, self.root)
            if info is None:
                continue
            uri, width, height, _ = info
            declared = (img.get("width"), img.get("height"))
            if declared != (None, None) and declared != (width, height):
                quarantine.add(uri, "image_size_mismatch",
                               f"declared {declared[0]}x{declared[1]}, file is {width}x{height}", "image", image_id,
                               len(anns))
                continue
            rec = ImageRecord(image_id, uri, width, height, group_of(file_name, image_id, self.group_pattern))
            for ann in anns:
                entity = self._entity(ann, uri, width, height, quarantine)
                if entity is not None:
                    rec.entities.append(entity)
            yield rec

    def _image_file(self, entry: dict) -> str:
        name = str(entry.get("file_name", "") or "")
        return storage.join(self.images_root, name) if name else self.ann_uri

    def _images(self, quarantine: Quarantine) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """(usable image entries by id, conflicting ids -> all their entries)."""
        entries: dict[str, list[dict]] = {}
        for img in self.coco["images"]:
            quarantine.saw("image")
            entries.setdefault(str(img.get("id")), []).append(img)
        images: dict[str, dict] = {}
        conflicted: dict[str, list[dict]] = {}
        for img_id, listed in entries.items():
            if len(listed) > 1 and len(_distinct(listed, IMAGE_FIELDS)) > 1:
                conflicted[img_id] = listed  # every entry is a party, the repeated ones too
                continue
            images[img_id] = listed[0]
            if len(listed) > 1:
                quarantine.note(self.ann_uri, "duplicate_id",
                                f"image id {img_id} is listed {len(listed)} times with the same file "
                                f"{str(listed[0].get('file_name', ''))!r} and size; read once", "image", img_id)
        return images, conflicted

    def _annotations(self, quarantine: Quarantine) -> Iterator[tuple[str, dict]]:
        """(id, annotation) for every annotation id with one content; conflicts are quarantined."""
        entries: dict[str, list[dict]] = {}
        for ann in self.coco.get("annotations", []):
            quarantine.saw("annotation")
            entries.setdefault(str(ann.get("id")), []).append(ann)
        for aid, listed in entries.items():
            distinct = _distinct(listed, ANNOTATION_FIELDS) if len(listed) > 1 else listed
            if len(distinct) > 1:
                parties = " and ".join(self._describe(a) for a in distinct)
                differ = [f for f in ANNOTATION_FIELDS if len({_canonical(a.get(f)) for a in distinct}) > 1]
                for _ in listed:  # every entry is a party, the repeated ones too
                    quarantine.add(self.ann_uri, "conflicting_id",
                                   f"annotation id {aid} is declared {len(listed)} times with different contents "
                                   f"(differing in {', '.join(differ)}): {parties}; every entry is quarantined",
                                   "annotation", aid)
                continue
            if len(listed) > 1:
                quarantine.note(self.ann_uri, "duplicate_id",
                                f"annotation id {aid} is listed {len(listed)} times with the same content; read once",
                                "annotation", aid)
            yield aid, listed[0]

    def _describe(self, ann: dict) -> str:
        cat = ann.get("category_id")
        name = self.category_names.get(cat)
        label = f"class {name!r}" if name is not None else f"unknown category id {cat!r}"
        return f"[image {ann.get('image_id')!r}, {label}]"

    def _entity(self, ann: dict, uri: str, width: int, height: int, quarantine: Quarantine) -> EntityRecord | None:
        aid = str(ann.get("id"))
        if "bbox" in ann and not bbox_inside(ann["bbox"], width, height):
            quarantine.add(uri, "bbox_outside_image", f"annotation {aid}: bbox {ann['bbox']} outside {width}x{height}",
                           "annotation", aid)
            return None
        try:
            rle = masks.rle_from_annotation(ann.get("segmentation"), height, width)
        except DataError as exc:
            reason = "mask_size_mismatch" if str(exc).startswith("size mismatch") else "invalid_segmentation"
            quarantine.add(uri, reason, f"annotation {aid}: {exc}", "annotation", aid)
            return None
        area = masks.rle_area(rle)
        if area == 0:
            quarantine.add(uri, "empty_mask", f"annotation {aid}: the mask has no pixel", "annotation", aid)
            return None
        name = self.category_names[ann["category_id"]]
        return EntityRecord(aid, name, masks.rle_counts_str(rle), masks.rle_bbox(rle), area)


# What ingestion reads of an entry: two entries of one id that agree on these are one entry.
IMAGE_FIELDS = ("file_name", "width", "height")
ANNOTATION_FIELDS = ("image_id", "category_id", "segmentation", "bbox")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _distinct(entries: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """The entries that differ in `fields`, first occurrence of each, in order."""
    seen: dict[str, dict] = {}
    for entry in entries:
        seen.setdefault(_canonical({f: entry.get(f) for f in fields}), entry)
    return list(seen.values())


def _size_text(entry: dict) -> str:
    w, h = entry.get("width"), entry.get("height")
    return "" if (w, h) == (None, None) else f" ({w}x{h})"


def _id_list(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"
