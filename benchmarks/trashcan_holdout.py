"""TrashCan videos no split of the study holds: a held-out COCO folder for `study.py --holdout`.

    python benchmarks/trashcan_holdout.py --trashcan TrashCan --shared ../shared/data/trashcan --out DIR
    python benchmarks/trashcan_holdout.py --trashcan TrashCan --shared ../shared/data/trashcan --check

`--trashcan` is a checkout of TrashCan 1.0 as released (https://github.com/xiehou1314/TrashCan, the
public re-upload the shared folder's SOURCE.md names; CC BY-NC-SA 2.0, research use, never copied into
this repository). Its `original_data/` holds every image with its per-image annotation file
(Supervisely JSON, one bitmap per object). The shared folder holds 675 of those images, from 68
videos; the study splits them by video. This script takes every other video whole, converts their
annotations to COCO with the class names of the shared folder's annotations.json, keeps the images
that hold a target-class entity, at most `--per-video` frames of each video (frames of one video
are near-duplicates: the budget goes to videos), drawn with numpy seed `--seed`, and writes
`DIR/annotations.json` and `DIR/images/`.

`--check` converts the shared folder's 675 images instead and compares them with its
annotations.json, entity by entity (class and mask): the conversion is the shared folder's own.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# The instance version's 22 classes, in its category-id order.
CATEGORIES = ("rov", "plant", "animal_fish", "animal_starfish", "animal_shells", "animal_crab", "animal_eel",
              "animal_etc", "trash_clothing", "trash_pipe", "trash_bottle", "trash_bag", "trash_snack_wrapper",
              "trash_can", "trash_cup", "trash_container", "trash_unknown_instance", "trash_branch",
              "trash_wreckage", "trash_tarp", "trash_rope", "trash_net")
# How the release's conversion (scripts/trash_can_coco.py there) reads the annotators' tags: tag
# values as typed (typos included), numbers as indices into a list offset by one.
ANIMAL_BY_NUMBER = ("fish", "crab", "eel", "shark", "squid", "starfish", "unknown", "shell", "shrimp", "stingray",
                    "jellyfish", "lobster", "crawfish", "octopus")
ANIMAL_OTHER = {"turtle", "squid", "lobster", "unknown", "jellyfish", "b", "stingray", "shrimp", "crawfish",
                "octopus", "shark"}
ANIMAL_SPELLING = {"satrfish": "animal_starfish", "shell": "animal_shells", "ee;": "animal_eel", " crab": "animal_crab"}
TRASH_BY_NUMBER = ("clothing", "pipe", "bottle", "bag", "snack_wrapper", "glove", "tire", "can", "cup", "container",
                   "unknown_instance", "branch", "wreakage", "tarp", "box", "hose", "rope", "hay", "net", "paper",
                   "bucket", "wire")
TRASH_UNKNOWN = {"unkonwn_instance", "cage", "uknwon_instance", "unknwon_instance", "unknown", "unkown_instance", "etc",
                 "unknown_instances", "unkonwn_instances", "eel", "hay", "tire", "hose", "wire", "glove", "box",
                 "bucket", "paper"}
TRASH_SPELLING = {"wreakage": "trash_wreckage", "trap": "trash_tarp", "bags": "trash_bag", "cab": "trash_can",
                  "network": "trash_net", "8\\": "trash_can"}
TARGET = ("plant", "animal_fish", "animal_crab", "trash_bag", "trash_can", "trash_container")  # params.yaml's
VIDEO = re.compile(r"^(vid_\d+)_frame")


def _indexed(value: str, names: tuple[str, ...]) -> str:
    return names[int(value) + 1] if value.isdigit() else value


def class_name(obj: dict[str, Any]) -> str | None:
    """The instance-version class of one annotated object; None: the release leaves it out."""
    if obj.get("geometryType") != "bitmap":
        return None
    title, tags = str(obj.get("classTitle")), obj.get("tags") or []
    if title == "rov":
        return "rov"
    if title == "unknown":
        return "trash_unknown_instance"
    if title == "bio":
        name = None
        for tag in tags:
            if tag["name"] == "plant":
                name = "plant"
            elif tag["name"] == "animal":
                value = _indexed(str(tag["value"]), ANIMAL_BY_NUMBER)
                name = "animal_etc" if value in ANIMAL_OTHER else ANIMAL_SPELLING.get(value, f"animal_{value}")
        return name
    if title == "trash":
        # The release names trash without an instance tag "unknown" while it loops over the tags,
        # so trash with no tags at all is left out: the shared annotations.json agrees (--check).
        name = "trash_unknown_instance" if tags else None
        for tag in tags:
            if tag["name"] == "instance":
                value = _indexed(str(tag["value"]), TRASH_BY_NUMBER)
                name = "trash_unknown_instance" if value in TRASH_UNKNOWN else TRASH_SPELLING.get(value, f"trash_{value}")
        return name
    return None


def bitmap(obj: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The object's mask on the whole image: a zlib-compressed base64 PNG (alpha: the mask) placed
    at its `origin` (x, y)."""
    from PIL import Image

    sub = np.array(Image.open(io.BytesIO(zlib.decompress(base64.b64decode(obj["bitmap"]["data"])))))
    sub = sub[..., -1] if sub.ndim == 3 else sub
    x, y = (int(v) for v in obj["bitmap"]["origin"])
    mask = np.zeros((height, width), bool)
    part = sub[: max(height - y, 0), : max(width - x, 0)] > 0
    mask[y:y + part.shape[0], x:x + part.shape[1]] = part
    return mask


def entities(annotation: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(class, mask) of every entity of one image. Objects that share an `instance` key are parts of
    one entity (an object seen in pieces behind another): their masks are merged."""
    height, width = int(annotation["size"]["height"]), int(annotation["size"]["width"])
    objects = annotation["objects"]
    out, merged = [], set()
    for obj in objects:
        name = class_name(obj)
        if obj["id"] in merged or name not in CATEGORIES:
            continue
        mask = bitmap(obj, height, width)
        for part in objects:
            if "instance" in obj and part is not obj and part.get("instance") == obj["instance"]:
                mask |= bitmap(part, height, width)
                merged.add(part["id"])
        if mask.any():
            out.append((name, mask))
    return out


def to_coco(trashcan: Path, names: Iterable[str]) -> dict[str, Any]:
    """COCO instances (compressed RLE) of the named images of `trashcan/original_data`."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for image_id, name in enumerate(names, start=1):
        path = trashcan / "original_data" / "annotations" / f"{name}.json"
        try:
            annotation = json.loads(path.read_text())
            found = entities(annotation)
        except (OSError, ValueError, KeyError, TypeError, zlib.error) as err:
            raise SystemExit(f"trashcan_holdout: {path}: cannot read ({err})") from None
        height, width = int(annotation["size"]["height"]), int(annotation["size"]["width"])
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for cls, mask in found:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORIES.index(cls) + 1,
                                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                                "area": int(mask.sum()), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n, "supercategory": n.split("_")[0]} for i, n in enumerate(CATEGORIES)]
    return {"info": {"description": "TrashCan 1.0 original_data converted to the instance version's classes"},
            "licenses": [], "categories": categories, "images": images, "annotations": annotations}


def _by_image(coco: dict[str, Any]) -> dict[str, list[tuple[str, dict]]]:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out: dict[str, list[tuple[str, dict]]] = collections.defaultdict(list)
    for ann in coco["annotations"]:
        seg = ann["segmentation"]
        out[files[ann["image_id"]]].append((names[ann["category_id"]], {"size": seg["size"],
                                                                       "counts": seg["counts"].encode()}))
    return out


def check(trashcan: Path, shared: Path) -> int:
    """Convert the shared folder's images; every entity must match one of its own (class, mask)."""
    from pycocotools import mask as mask_utils

    theirs = json.loads((shared / "annotations.json").read_text())
    ours = _by_image(to_coco(trashcan, sorted(im["file_name"] for im in theirs["images"])))
    problems = []
    for name, entries in _by_image(theirs).items():
        if sorted(c for c, _ in entries) != sorted(c for c, _ in ours.get(name, [])):
            problems.append(f"{name}: classes {sorted(c for c, _ in entries)} vs {sorted(c for c, _ in ours.get(name, []))}")
            continue
        for cls, rle in entries:
            same = [r for c, r in ours[name] if c == cls]
            if max(mask_utils.iou([rle], same, [0] * len(same))[0]) < 1.0:
                problems.append(f"{name}: a {cls} mask differs")
    n = sum(len(v) for v in ours.values())
    print(f"{len(ours)} images, {n} entities converted; {len(problems)} differ from {shared / 'annotations.json'}")
    for line in problems[:20]:
        print("  " + line)
    return 1 if problems else 0


def sample(coco: dict[str, Any], per_video: int, seed: int) -> dict[str, Any]:
    """The images holding a target-class entity, at most `per_video` frames per video, seeded."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    with_target = {a["image_id"] for a in coco["annotations"] if names[a["category_id"]] in TARGET}
    by_video: dict[str, list[dict]] = collections.defaultdict(list)
    for im in sorted(coco["images"], key=lambda i: i["file_name"]):
        if im["id"] in with_target:
            by_video[VIDEO.match(im["file_name"]).group(1)].append(im)
    rng = np.random.default_rng(seed)
    chosen = []
    for video in sorted(by_video):
        frames = by_video[video]
        chosen += [frames[k] for k in sorted(rng.choice(len(frames), size=min(per_video, len(frames)), replace=False))]
    kept = {im["id"] for im in chosen}
    return {**coco, "images": chosen, "annotations": [a for a in coco["annotations"] if a["image_id"] in kept]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trashcan", type=Path, required=True, help="a checkout of TrashCan 1.0 (original_data/)")
    parser.add_argument("--shared", type=Path, required=True, help="the study's TrashCan folder (annotations.json)")
    parser.add_argument("--out", type=Path, help="the held-out COCO folder to write")
    parser.add_argument("--per-video", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="convert the shared folder's images and compare")
    args = parser.parse_args(argv)
    for folder in (args.trashcan / "original_data" / "annotations", args.shared):
        if not folder.is_dir():
            parser.error(f"{folder}: no such folder")
    if args.check:
        return check(args.trashcan, args.shared)
    if args.out is None:
        parser.error("--out is required (or --check)")
    seen = {VIDEO.match(im["file_name"]).group(1)
            for im in json.loads((args.shared / "annotations.json").read_text())["images"]}
    frames = sorted(p.name[: -len(".json")] for p in (args.trashcan / "original_data" / "annotations").glob("*.json"))
    fresh = [f for f in frames if VIDEO.match(f) and VIDEO.match(f).group(1) not in seen]
    coco = sample(to_coco(args.trashcan, fresh), args.per_video, args.seed)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    for im in coco["images"]:
        source = args.trashcan / "original_data" / "images" / im["file_name"]
        try:
            shutil.copyfile(source, args.out / "images" / im["file_name"])
        except OSError as err:
            raise SystemExit(f"trashcan_holdout: {source}: cannot copy ({err.strerror or err})") from None
    (args.out / "annotations.json").write_text(json.dumps(coco))
    videos = {VIDEO.match(im["file_name"]).group(1) for im in coco["images"]}
    print(f"{len(fresh)} images of {len({VIDEO.match(f).group(1) for f in fresh})} videos absent from {args.shared}; "
          f"{len(coco['images'])} images of {len(videos)} videos with a target-class entity kept "
          f"(≤ {args.per_video} per video, seed {args.seed}), {len(coco['annotations'])} entities -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
