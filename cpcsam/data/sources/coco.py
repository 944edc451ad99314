"""COCO instances JSON: polygons, uncompressed and compressed RLE (via pycocotools).

Layout under `root` (a folder or an `s3://` prefix): the annotation file (`annotations`,
default `annotations.json`) and the images under `images_dir` (default `images`), each
image's `file_name` relative to it. Group ids come from `group_pattern` applied to the file
name (TrashCan: `^(vid_\\d+)_frame` keeps each video's frames together).

What is refused, per item (the rest goes on): an image file that escapes the root, is missing,
unreadable, truncated, over the pixel limit or of another size than declared; an annotation
for an image id not in `images`, of an unknown category, with a duplicate id, an invalid
polygon/RLE, an RLE of another size than the image, an empty mask or a bbox outside the image.
A duplicate image id quarantines the later entry; annotations go with the first.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from tqdm import tqdm

from cpcsam.data import masks, storage
from cpcsam.data.records import EntityRecord, ImageRecord, Quarantine
from cpcsam.data.sources.common import bbox_inside, group_of, load_image_info
from cpcsam.errors import DataError

log = logging.getLogger(__name__)


class CocoSource:
    name = "coco"

    def __init__(self, cfg: dict[str, Any], max_pixels: int | None = None) -> None:
        if not cfg.get("root"):
            raise DataError("params data coco source: `root` (folder or s3:// prefix) is required")
        self.root = str(cfg["root"])
        self.ann_uri = storage.join(self.root, str(cfg.get("annotations", "annotations.json")))
        self.images_root = storage.join(self.root, str(cfg.get("images_dir", "images")))
        self.group_pattern = cfg.get("group_pattern")
        self.max_pixels = max_pixels
        self.progress = bool(cfg.get("progress", True))
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
        images: dict[Any, dict] = {}
        for img in self.coco["images"]:
            quarantine.saw("image")
            if img.get("id") in images:
                quarantine.add(self.ann_uri, "duplicate_id", f"image id {img.get('id')} appears again "
                               f"({img.get('file_name')}); the first entry is kept", "image", str(img.get("id")))
                continue
            images[img.get("id")] = img
        by_image: dict[Any, list[dict]] = {}
        seen_ann: set[Any] = set()
        for ann in self.coco.get("annotations", []):
            quarantine.saw("annotation")
            aid = ann.get("id")
            if aid in seen_ann:
                quarantine.add(self.ann_uri, "duplicate_id", f"annotation id {aid} appears again", "annotation", str(aid))
                continue
            seen_ann.add(aid)
            if ann.get("image_id") not in images:
                quarantine.add(self.ann_uri, "missing_image",
                               f"annotation {aid} refers to image id {ann.get('image_id')}, not in `images`",
                               "annotation", str(aid))
                continue
            if ann.get("category_id") not in self.category_names:
                quarantine.add(self.ann_uri, "unknown_class",
                               f"annotation {aid} has category id {ann.get('category_id')}, not in `categories`",
                               "annotation", str(aid))
                continue
            by_image.setdefault(ann["image_id"], []).append(ann)

        for img_id, img in tqdm(images.items(), desc=f"ingest {self.root}", unit="img", disable=not self.progress):
            image_id = str(img_id)
            file_name = str(img.get("file_name", ""))
            anns = by_image.get(img_id, [])
            info = load_image_info(self.images_root, file_name, quarantine, self.max_pixels, image_id, len(anns))
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
