"""Small datasets written by the tests themselves (COCO, mask folders), locally or to S3."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cpcsam.data import storage

CLASSES = ["fish", "crab", "bottle"]


def image_bytes(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rect_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((height, width), bool)
    m[y0:y1, x0:x1] = True
    return m


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major flattening, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def make_coco(root: str, n_images: int = 6, width: int = 64, height: int = 48, prefix: str = "vid_{v:06d}_frame{f:07d}.jpg",
              frames_per_video: int = 2) -> dict[str, Any]:
    """A COCO folder (annotations.json + images/) under `root` (local or s3://).

    Each image holds 3 entities, one per class, as a polygon, an uncompressed RLE and a
    compressed RLE. Returns the COCO dict and the expected masks by annotation id.
    """
    images, annotations, expected = [], [], {}
    aid = 1
    for i in range(n_images):
        name = prefix.format(v=i // frames_per_video, f=i % frames_per_video)
        storage.write_bytes(storage.join(root, "images", name), image_bytes(width, height, seed=i))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        # polygon: a rectangle (pycocotools rasterises a polygon's interior, edges included by rule)
        x0, y0 = 2 + i, 3
        poly = [x0, y0, x0 + 10, y0, x0 + 10, y0 + 8, x0, y0 + 8]
        rle = mask_utils.frPyObjects([poly], height, width)
        expected[aid] = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        annotations.append({"id": aid, "image_id": i + 1, "category_id": 1, "segmentation": [poly],
                            "bbox": [x0, y0, 10, 8], "area": 80, "iscrowd": 0})
        aid += 1
        m = rect_mask(height, width, 30, 10 + (i % 3), 40, 30)
        expected[aid] = m
        annotations.append({"id": aid, "image_id": i + 1, "category_id": 2, "segmentation": uncompressed_rle(m),
                            "bbox": [30, 10, 10, 20], "area": int(m.sum()), "iscrowd": 1})
        aid += 1
        m = rect_mask(height, width, 45, 30, 60, 44)
        m[35:38, 50:52] = False  # a hole: RLE keeps it, a box would not
        enc = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        expected[aid] = m
        annotations.append({"id": aid, "image_id": i + 1, "category_id": 3,
                            "segmentation": {"size": [height, width], "counts": enc["counts"].decode()},
                            "bbox": [45, 30, 15, 14], "area": int(m.sum()), "iscrowd": 0})
        aid += 1
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)],
    }
    storage.write_bytes(storage.join(root, "annotations.json"), json.dumps(coco).encode())
    return {"coco": coco, "expected": expected}


def coco_data_cfg(root: str, **source: Any) -> dict[str, Any]:
    """A `data` params section with one COCO profile; each video its own group."""
    return {
        "profile": "t",
        "progress": False,
        "max_quarantine_fraction": 0.5,
        "eval_splits": ["test"],
        "split": {"seed": 0, "ratios": {"train": 0.5, "val": 0.0, "test": 0.5}},
        "roles": {"target": ["bottle"]},
        "profiles": {"t": {"source": "coco", "root": root, "group_pattern": r"^(vid_\d+)_frame", **source}},
    }
