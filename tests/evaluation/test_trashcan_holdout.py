"""`benchmarks/trashcan_holdout.py`: TrashCan's per-image annotations to COCO, and the held-out videos."""

from __future__ import annotations

import base64
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from script_modules import load_script

holdout = load_script("cpcsam_trashcan_holdout", "benchmarks/trashcan_holdout.py")


def _obj(oid: int, title: str, tags: dict[str, object], mask: np.ndarray, origin: tuple[int, int], **extra) -> dict:
    """One Supervisely bitmap object: the mask as the alpha of an RGBA PNG, zlib'd, base64'd."""
    rgba = np.zeros((*mask.shape, 4), np.uint8)
    rgba[..., 3] = mask * 255
    png = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(png, format="PNG")
    data = base64.b64encode(zlib.compress(png.getvalue())).decode()
    return {"id": oid, "classTitle": title, "geometryType": "bitmap", "bitmap": {"data": data, "origin": list(origin)},
            "tags": [{"name": k, "value": v} for k, v in tags.items()], **extra}


@pytest.mark.parametrize(("title", "tags", "expected"), [
    ("rov", {}, "rov"),
    ("bio", {"plant": None}, "plant"),
    ("bio", {"animal": "0"}, "animal_crab"),        # numbers index the release's list, offset by one
    ("bio", {"animal": "satrfish"}, "animal_starfish"),
    ("bio", {"animal": "turtle"}, "animal_etc"),
    ("bio", {"material": "etc"}, None),             # neither plant nor animal: left out
    ("trash", {"instance": "3"}, "trash_snack_wrapper"),
    ("trash", {"instance": "bags"}, "trash_bag"),
    ("trash", {"instance": "tire"}, "trash_unknown_instance"),
    ("trash", {"material": "plastic"}, "trash_unknown_instance"),
    ("trash", {}, None),                            # no tag at all: the release leaves it out
    ("unknown", {}, "trash_unknown_instance"),
])
def test_class_names_follow_the_release(title: str, tags: dict, expected: str | None) -> None:
    assert holdout.class_name(_obj(1, title, tags, np.ones((2, 2), bool), (0, 0))) == expected


def test_parts_of_one_instance_are_one_entity_placed_at_their_origins() -> None:
    square = np.ones((3, 3), bool)
    annotation = {"size": {"height": 10, "width": 12}, "objects": [
        _obj(1, "trash", {"instance": "can"}, square, (1, 2), instance="a"),
        _obj(2, "rov", {}, np.ones((4, 5), bool), (9, 8)),  # runs over the right and bottom edges
        _obj(3, "trash", {"instance": "can"}, square, (6, 6), instance="a"),
    ]}
    (can, can_mask), (rov, rov_mask) = holdout.entities(annotation)
    expected = np.zeros((10, 12), bool)
    expected[2:5, 1:4] = expected[6:9, 6:9] = True
    assert can == "trash_can" and np.array_equal(can_mask, expected)
    assert rov == "rov" and rov_mask.sum() == 2 * 3 and rov_mask[8:, 9:].all()


def _checkout(root: Path, frames: dict[str, list[tuple[str, dict]]]) -> Path:
    """A TrashCan-like `original_data/` with one annotation file and image per frame."""
    for sub in ("annotations", "images"):
        (root / "original_data" / sub).mkdir(parents=True, exist_ok=True)
    for name, objects in frames.items():
        objs = [_obj(i + 1, title, tags, np.ones((4, 4), bool), (2 * i, 2)) for i, (title, tags) in enumerate(objects)]
        (root / "original_data" / "annotations" / f"{name}.json").write_text(
            json.dumps({"size": {"height": 16, "width": 20}, "objects": objs}))
        Image.new("RGB", (20, 16)).save(root / "original_data" / "images" / name)
    return root


def test_only_unseen_videos_with_a_target_class_are_kept_and_check_compares_masks(tmp_path: Path) -> None:
    fish, rov = ("bio", {"animal": "fish"}), ("rov", {})
    frames = {f"vid_000001_frame{f:07d}.jpg": [fish] for f in range(3)}           # in the shared folder
    frames |= {f"vid_000002_frame{f:07d}.jpg": [rov, fish] for f in range(9)}    # unseen, a target class
    frames |= {"vid_000003_frame0000001.jpg": [rov]}                              # unseen, base class only
    trashcan = _checkout(tmp_path / "TrashCan", frames)
    shared = tmp_path / "shared"
    shared.mkdir()
    seen = holdout.to_coco(trashcan, [n for n in frames if n.startswith("vid_000001")])
    (shared / "annotations.json").write_text(json.dumps(seen))

    assert holdout.main(["--trashcan", str(trashcan), "--shared", str(shared), "--out", str(tmp_path / "out"),
                         "--per-video", "4"]) == 0
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    names = [im["file_name"] for im in coco["images"]]
    assert len(names) == 4 and all(n.startswith("vid_000002") for n in names)
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == sorted(names)
    assert len(coco["annotations"]) == 8  # both entities of each kept frame

    assert holdout.main(["--trashcan", str(trashcan), "--shared", str(shared), "--check"]) == 0
    seen["annotations"][0]["segmentation"] = holdout.to_coco(trashcan, ["vid_000002_frame0000000.jpg"])[
        "annotations"][1]["segmentation"]  # another mask under the same class
    (shared / "annotations.json").write_text(json.dumps(seen))
    assert holdout.main(["--trashcan", str(trashcan), "--shared", str(shared), "--check"]) == 1
