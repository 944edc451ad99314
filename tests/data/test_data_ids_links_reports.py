"""Ambiguous ids, symbolic links, reports on every exit path, messages that name the file.

Each case is built by the test: a conflict quarantines every party (nothing is settled by
order), a symlinked data set is treated the same by every source, a failed ingestion still
leaves its reports, and no message shows a library's in-memory buffer instead of the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_builders import coco_data_cfg, image_bytes, make_coco, png_bytes

from cpcsam.data import storage
from cpcsam.data.ingest import run_ingest
from cpcsam.data.manifest import load_manifest
from cpcsam.data.records import Quarantine
from cpcsam.data.sources.coco import CocoSource
from cpcsam.data.sources.folders import BinaryMaskSource, SemanticMaskSource
from cpcsam.errors import ConfigError, DataError

NO_PROGRESS = {"progress": False}


def _coco(root: Path, **cfg) -> CocoSource:
    return CocoSource({"root": str(root), **NO_PROGRESS, **cfg})


def _rewrite(root: Path, edit) -> dict:
    coco = json.loads((root / "annotations.json").read_text())
    edit(coco)
    (root / "annotations.json").write_text(json.dumps(coco))
    return coco


def _read(source) -> tuple[dict, Quarantine]:
    q = Quarantine()
    return {r.image_id: r for r in source.records(q)}, q


# --- 1. ambiguous ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("same_id", [2, "2"], ids=["int", "str"])
def test_coco_one_image_id_for_two_files_quarantines_both_and_their_annotations(tmp_path, same_id) -> None:
    """Image id 2 names two files: neither wins, and its annotations go with both."""
    root = tmp_path / "coco"
    make_coco(str(root), n_images=4)
    (root / "images" / "other.jpg").write_bytes(image_bytes(64, 48, seed=99))
    _rewrite(root, lambda c: c["images"].append({"id": same_id, "file_name": "other.jpg", "width": 64, "height": 48}))
    recs, q = _read(_coco(root))
    assert sorted(recs) == ["1", "3", "4"]
    parties = [i for i in q.items if i.reason == "conflicting_id"]
    assert [(i.kind, i.item_id) for i in parties] == [("image", "2"), ("image", "2")]
    assert {Path(i.file).name for i in parties} == {"vid_000000_frame0000001.jpg", "other.jpg"}
    for item in parties:  # each entry names both files
        assert "vid_000000_frame0000001.jpg" in item.detail and "other.jpg" in item.detail
        assert "annotation(s) [4, 5, 6]" in item.detail
    assert sum(i.dropped_annotations for i in parties) == 3  # counted once
    assert q.items == parties  # nothing else refused
    assert q.fraction() == pytest.approx((2 + 3) / (5 + 12))


def test_coco_one_annotation_id_with_two_classes_quarantines_both(tmp_path) -> None:
    root = tmp_path / "coco"
    make_coco(str(root), n_images=2)
    # annotation 1 (a fish on image 1) declared again as a crab
    _rewrite(root, lambda c: c["annotations"].append({**c["annotations"][0], "category_id": 2}))
    recs, q = _read(_coco(root))
    assert [e.entity_id for e in recs["1"].entities] == ["2", "3"]  # neither label won
    assert [(i.reason, i.kind, i.item_id) for i in q.items] == [("conflicting_id", "annotation", "1")] * 2
    for item in q.items:
        assert "'fish'" in item.detail and "'crab'" in item.detail and "category_id" in item.detail


def test_coco_exact_duplicates_are_read_once_with_a_note(tmp_path) -> None:
    root = tmp_path / "coco"
    make_coco(str(root), n_images=4)

    def repeat(c: dict) -> None:
        c["images"].append(dict(c["images"][1]))
        c["annotations"].append(dict(c["annotations"][0]))

    _rewrite(root, repeat)
    recs, q = _read(_coco(root))
    assert q.items == [] and sorted(recs) == ["1", "2", "3", "4"]
    assert [e.entity_id for e in recs["1"].entities] == ["1", "2", "3"]  # annotation 1 once
    assert [(n.reason, n.kind, n.item_id) for n in q.notes] == [("duplicate_id", "image", "2"),
                                                                 ("duplicate_id", "annotation", "1")]
    summary = run_ingest(coco_data_cfg(str(root)), tmp_path / "out")
    assert summary["quarantine"]["n_items"] == 0 and summary["quarantine"]["n_notes"] == 2
    report = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    assert report["n_notes"] == 2 and report["notes"][0]["reason"] == "duplicate_id"


def _semantic(root: Path, stems: tuple[str, ...] = ("a", "b")) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nsponge\n")
    for k, stem in enumerate(stems):
        (root / "images" / f"{stem}.jpg").write_bytes(image_bytes(20, 16, seed=k))
        index = np.zeros((16, 20), np.uint8)
        index[2:9, 3:12] = 1
        (root / "masks" / f"{stem}.png").write_bytes(png_bytes(index))


def test_semantic_two_image_files_for_one_id_quarantine_both_and_the_mask(tmp_path) -> None:
    _semantic(tmp_path)
    (tmp_path / "images" / "a.png").write_bytes(png_bytes(np.zeros((16, 20, 3), np.uint8)))
    recs, q = _read(SemanticMaskSource({"root": str(tmp_path), **NO_PROGRESS}))
    assert sorted(recs) == ["b"]
    assert [(i.reason, i.kind, i.item_id, Path(i.file).name) for i in q.items] == [
        ("conflicting_id", "image", "a", "a.jpg"), ("conflicting_id", "image", "a", "a.png")]
    assert all("'a.jpg' and 'a.png'" in i.detail and "masks/a.png" in i.detail for i in q.items)  # all parties named
    assert sum(i.dropped_annotations for i in q.items) == 1


def test_binary_two_masks_for_one_image_and_class_quarantine_both(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.jpg").write_bytes(image_bytes(16, 16, seed=0))
    hair = np.zeros((16, 16), np.uint8)
    hair[:4] = 255
    for rel in ("hair/0.png", "hair/0.PNG", "eye/0.png"):
        (tmp_path / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "masks" / rel).write_bytes(png_bytes(hair if rel.startswith("hair") else 255 - hair))
    recs, q = _read(BinaryMaskSource({"root": str(tmp_path), **NO_PROGRESS}))
    assert [e.class_name for e in recs["0"].entities] == ["eye"]
    assert [(i.reason, i.item_id, Path(i.file).name) for i in q.items] == [
        ("conflicting_id", "0:hair", "0.PNG"), ("conflicting_id", "0:hair", "0.png")]
    assert all("0.png" in i.detail and "0.PNG" in i.detail for i in q.items)


# --- 2. reports on every exit path --------------------------------------------------------------


def _only_fish_everywhere(root: Path) -> None:
    """8 images in 4 videos; crab and bottle only in video 0, image 5's file missing."""

    def edit(c: dict) -> None:
        c["annotations"] = [a for a in c["annotations"] if a["category_id"] == 1 or a["image_id"] in (1, 2)]
        c["images"][4]["file_name"] = "gone.jpg"

    _rewrite(root, edit)


def test_reports_are_written_when_the_roles_rule_stops_ingestion(tmp_path) -> None:
    root = tmp_path / "coco"
    make_coco(str(root), n_images=8)
    _only_fish_everywhere(root)
    cfg = coco_data_cfg(str(root))
    cfg["eval_splits"] = ["train", "test"]
    cfg["roles"] = {"target_ratio": 0.6}
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"only 1 class\(es\) have entities in every evaluation split") as err:
        run_ingest(cfg, out)
    report = json.loads((out / "quarantine.json").read_text())
    assert [(i["reason"], i["item_id"]) for i in report["items"]] == [("missing_image", "5")]
    assert str(out) in str(err.value)  # the message says where the reports are
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_at"] == "manifest"
    assert summary["images_read"] == 7 and summary["quarantine"]["counts_by_reason"] == {"missing_image": 1}
    assert len(summary["problems"]) == 1 and "only 1 class(es)" in summary["problems"][0]
    assert not (out / "manifest.parquet").exists()


def test_a_failed_run_replaces_the_reports_of_the_last_one_with_the_same_keys(tmp_path) -> None:
    root = tmp_path / "coco"
    make_coco(str(root), n_images=8)
    out = tmp_path / "out"
    ok = run_ingest(coco_data_cfg(str(root)), out)
    (root / "annotations.json").write_text("{ not json")
    with pytest.raises(DataError, match="not valid JSON"):
        run_ingest(coco_data_cfg(str(root)), out)
    failed = json.loads((out / "summary.json").read_text())
    assert failed["problems"] and "not valid JSON" in failed["problems"][0]  # this run's summary, not the last one's
    assert failed["status"] == "failed" and failed["failed_at"] == "source"
    assert ok["status"] == "ok" and ok["failed_at"] is None
    # readers need no branch; the wall time is returned, never written (summary.json is a DVC out)
    assert set(failed) == set(ok) - {"seconds"} and set(failed["quarantine"]) == set(ok["quarantine"])
    assert json.loads((out / "quarantine.json").read_text())["n_quarantined"] == 0
    assert not (out / "manifest.parquet").exists() and not (out / "classes.json").exists()  # no stale outputs


def test_reports_are_written_for_a_config_error(tmp_path) -> None:
    root = tmp_path / "coco"
    make_coco(str(root), n_images=4)
    cfg = coco_data_cfg(str(root))
    cfg["roles"] = {"target": ["whale"]}
    with pytest.raises(ConfigError, match="unknown class"):
        run_ingest(cfg, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed_at"] == "manifest" and summary["images_read"] == 4


# --- 3. symbolic links --------------------------------------------------------------------------


def _dataset(kind: str, root: Path) -> tuple[dict, str]:
    """(source config, image id of the first image) of a 2-image data set of `kind` under `root`."""
    if kind == "coco":
        make_coco(str(root), n_images=2)
        return {"source": "coco", "root": str(root)}, "1"
    if kind == "semantic_masks":
        _semantic(root)
        return {"source": "semantic_masks", "root": str(root)}, "a"
    (root / "images").mkdir(parents=True)
    for k, stem in enumerate(("a", "b")):
        (root / "images" / f"{stem}.jpg").write_bytes(image_bytes(16, 16, seed=k))
        mask = np.zeros((16, 16), np.uint8)
        mask[3:9, 2:7] = 255
        (root / "masks" / "hair").mkdir(parents=True, exist_ok=True)
        (root / "masks" / "hair" / f"{stem}.png").write_bytes(png_bytes(mask))
    return {"source": "binary_masks", "root": str(root)}, "a"


def _first_image(root: Path) -> Path:
    return sorted((root / "images").iterdir())[0]


def _link_out(path: Path, elsewhere: Path) -> Path:
    """Move `path` to `elsewhere` and leave a symbolic link to it in its place."""
    elsewhere.mkdir(parents=True, exist_ok=True)
    target = elsewhere / path.name
    shutil.move(str(path), target)
    path.symlink_to(target)
    return target


def _source(cfg: dict):
    from cpcsam.data.sources import build_source

    return build_source({**cfg, **NO_PROGRESS}, "unused")


@pytest.mark.parametrize("kind", ["coco", "semantic_masks", "binary_masks"])
def test_every_source_quarantines_an_image_linked_out_of_the_root_unless_told_to_follow(tmp_path, kind) -> None:
    cfg, first = _dataset(kind, tmp_path / "ds")
    link = _first_image(tmp_path / "ds")
    _link_out(link, tmp_path / "elsewhere")
    recs, q = _read(_source(cfg))
    assert first not in recs and len(recs) == 1
    assert [(i.reason, i.kind, i.item_id) for i in q.items] == [("path_escapes_root", "image", first)]
    detail = q.items[0].detail
    assert "symbolic link" in detail and str((tmp_path / "elsewhere").resolve()) in detail
    assert "follow_symlinks: true" in detail
    recs, q = _read(_source({**cfg, "follow_symlinks": True}))
    assert q.items == [] and len(recs) == 2 and recs[first].entities
    assert recs[first].image_uri == str((tmp_path / "ds").resolve() / "images" / link.name)  # the path as listed


def test_semantic_masks_symlinked_into_another_folder_are_quarantined_not_a_traceback(tmp_path) -> None:
    """The issue's layout: images/ and masks/ hold links into another folder."""
    ds = tmp_path / "ds"
    _semantic(ds, ("a", "b", "c"))
    for folder in ("images", "masks"):
        for path in sorted((ds / folder).iterdir())[:2]:  # a and b linked out, c stays a plain file
            _link_out(path, tmp_path / "pool" / folder)
    cfg = {"profile": "t", "progress": False, "eval_splits": ["test"], "max_quarantine_fraction": 1.0,
           "split": {"seed": 0, "ratios": {"train": 0.0, "val": 0.0, "test": 1.0}}, "roles": {"target": ["sponge"]},
           "profiles": {"t": {"source": "semantic_masks", "root": str(ds)}}}
    summary = run_ingest(cfg, tmp_path / "out")
    assert summary["n_images"] == 1 and summary["quarantine"]["counts_by_reason"] == {"path_escapes_root": 2}
    cfg["profiles"]["t"]["follow_symlinks"] = True
    summary = run_ingest(cfg, tmp_path / "out")
    assert summary["n_images"] == 3 and summary["quarantine"]["n_items"] == 0


def test_a_mask_linked_out_of_the_root_is_quarantined(tmp_path) -> None:
    _semantic(tmp_path / "ds")
    _link_out(tmp_path / "ds" / "masks" / "a.png", tmp_path / "elsewhere")
    recs, q = _read(SemanticMaskSource({"root": str(tmp_path / "ds"), **NO_PROGRESS}))
    assert sorted(recs) == ["b"]
    assert [(i.reason, i.kind, i.item_id) for i in q.items] == [("path_escapes_root", "annotation", "a")]
    assert "symbolic link" in q.items[0].detail


def test_a_linked_folder_is_seen_not_silently_skipped(tmp_path) -> None:
    _semantic(tmp_path / "ds", ("a",))
    pool = tmp_path / "pool"
    (pool / "sub").mkdir(parents=True)
    (pool / "sub" / "x.jpg").write_bytes(image_bytes(20, 16, seed=5))
    (tmp_path / "ds" / "images" / "sub").symlink_to(pool / "sub")
    (tmp_path / "ds" / "images" / "loop").symlink_to(tmp_path / "ds" / "images")  # a cycle: not entered again
    src = SemanticMaskSource({"root": str(tmp_path / "ds"), **NO_PROGRESS})
    assert len(src) == 2  # a and sub/x
    recs, q = _read(src)
    assert sorted(recs) == ["a"] and q.items == []  # sub/x has no mask: no entity, nothing to refuse
    (tmp_path / "ds" / "masks" / "sub").mkdir()
    (tmp_path / "ds" / "masks" / "sub" / "x.png").write_bytes((tmp_path / "ds" / "masks" / "a.png").read_bytes())
    recs, q = _read(SemanticMaskSource({"root": str(tmp_path / "ds"), **NO_PROGRESS}))
    assert [(i.reason, i.item_id) for i in q.items] == [("path_escapes_root", "sub/x")]


def test_a_link_that_stays_inside_the_data_set_is_read(tmp_path) -> None:
    _semantic(tmp_path / "ds")
    _link_out(tmp_path / "ds" / "images" / "a.jpg", tmp_path / "ds" / "all_frames")
    recs, q = _read(SemanticMaskSource({"root": str(tmp_path / "ds"), **NO_PROGRESS}))
    assert q.items == [] and sorted(recs) == ["a", "b"]


def test_an_images_folder_that_is_itself_a_link_is_read(tmp_path) -> None:
    """Linking the whole images/ folder names the folder to read: nothing in it escapes."""
    _semantic(tmp_path / "ds")
    shutil.move(str(tmp_path / "ds" / "images"), tmp_path / "big_disk")
    (tmp_path / "ds" / "images").symlink_to(tmp_path / "big_disk")
    recs, q = _read(SemanticMaskSource({"root": str(tmp_path / "ds"), **NO_PROGRESS}))
    assert q.items == [] and sorted(recs) == ["a", "b"]


def test_follow_symlinks_must_be_a_boolean(tmp_path) -> None:
    _semantic(tmp_path)
    with pytest.raises(ConfigError, match="follow_symlinks"):
        SemanticMaskSource({"root": str(tmp_path), "follow_symlinks": "sometimes"})


# --- 4. messages name the file ------------------------------------------------------------------


def test_an_unreadable_image_message_names_the_file_not_a_buffer(tmp_path) -> None:
    with pytest.raises(storage.ImageError) as err:
        storage.open_image(b"this is not an image", "some/dir/frame_07.jpg")
    msg = str(err.value)
    assert "BytesIO" not in msg and " at 0x" not in msg
    assert "cannot identify image file 'frame_07.jpg'" in msg and msg.startswith("some/dir/frame_07.jpg: ")

    _semantic(tmp_path)
    (tmp_path / "images" / "a.jpg").write_bytes(b"garbage")
    (tmp_path / "masks" / "b.png").write_bytes(b"garbage")
    recs, q = _read(SemanticMaskSource({"root": str(tmp_path), **NO_PROGRESS}))
    assert recs == {} and [i.reason for i in q.items] == ["unreadable_image", "invalid_segmentation"]
    for item, name in zip(q.items, ("a.jpg", "b.png")):
        assert "<_io" not in item.detail and " at 0x" not in item.detail
        assert f"'{name}'" in item.detail and item.detail.count(str(tmp_path)) == 1  # the file once, not twice


def test_an_unreadable_manifest_message_names_the_file(tmp_path) -> None:
    (tmp_path / "manifest.parquet").write_bytes(b"nope")
    with pytest.raises(DataError) as err:
        load_manifest(tmp_path / "manifest.parquet")
    assert "<Buffer>" not in str(err.value) and "'manifest.parquet'" in str(err.value)
