"""Each adapter against data the test writes: COCO (polygon + both RLEs), semantic and binary mask folders."""

from __future__ import annotations

import numpy as np
import pytest
from data_builders import CLASSES, coco_data_cfg, image_bytes, make_coco, png_bytes

from cpcsam.data import decode_mask, load_manifest
from cpcsam.data.ingest import run_ingest
from cpcsam.data.records import Quarantine
from cpcsam.data.sources.coco import CocoSource
from cpcsam.data.sources.folders import BinaryMaskSource, SemanticMaskSource


def test_coco_polygon_and_rles_round_trip(tmp_path) -> None:
    built = make_coco(str(tmp_path / "coco"), n_images=4)
    src = CocoSource({"root": str(tmp_path / "coco"), "group_pattern": r"^(vid_\d+)_frame", "progress": False})
    assert src.classes() == CLASSES
    q = Quarantine()
    recs = list(src.records(q))
    assert q.items == [] and len(recs) == 4
    assert [r.group_id for r in recs] == ["vid_000000", "vid_000000", "vid_000001", "vid_000001"]
    for rec in recs:
        assert rec.image_uri.startswith(str(tmp_path.resolve())) and (rec.width, rec.height) == (64, 48)
        assert [e.class_name for e in rec.entities] == CLASSES
        for ent in rec.entities:
            mask = decode_mask(ent.rle_counts, rec.height, rec.width)
            assert np.array_equal(mask, built["expected"][int(ent.entity_id)])
            assert ent.area == mask.sum()


def test_coco_ingest_writes_manifest_with_group_splits(tmp_path) -> None:
    make_coco(str(tmp_path / "coco"), n_images=8, frames_per_video=2)
    summary = run_ingest(coco_data_cfg(str(tmp_path / "coco")), tmp_path / "out")
    df = load_manifest(tmp_path / "out" / "manifest.parquet")
    assert df.groupby("group_id").split.nunique().max() == 1
    assert summary["n_images"] == 8 and summary["withheld_target_in_train"]["count"] == 4  # bottle in 4 train images
    assert set(df.loc[df.split == "train", "class_name"]) == {"fish", "crab"}
    assert not list((tmp_path / "out" / "images").iterdir())  # a file source copies no image


def _semantic_folder(root, class_file: str = "classes.txt") -> np.ndarray:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / "a.jpg").write_bytes(image_bytes(40, 30, seed=0))
    index = np.zeros((30, 40), np.uint8)
    index[2:8, 2:8] = 1  # two separate blobs of class 1
    index[20:28, 30:38] = 1
    index[10:20, 10:25] = 2
    index[0, 39] = 255  # ignore label
    (root / "masks" / "a.png").write_bytes(png_bytes(index))
    (root / class_file).write_text("background\nsea_urchin\nsponge\n")
    return index


def test_semantic_masks_per_class_and_components(tmp_path) -> None:
    index = _semantic_folder(tmp_path)
    q = Quarantine()
    per_class = list(SemanticMaskSource({"root": str(tmp_path), "progress": False}).records(q))
    assert q.items == []
    ents = {e.class_name: e for e in per_class[0].entities}
    assert set(ents) == {"sea_urchin", "sponge"}  # background and 255 are not entities
    assert np.array_equal(decode_mask(ents["sea_urchin"].rle_counts, 30, 40), index == 1)
    comps = list(SemanticMaskSource({"root": str(tmp_path), "entities": "components", "progress": False}).records(q))
    urchins = [e for e in comps[0].entities if e.class_name == "sea_urchin"]
    assert sorted(e.area for e in urchins) == [36, 64]


def test_semantic_unknown_index_and_size_mismatch_are_quarantined(tmp_path) -> None:
    index = _semantic_folder(tmp_path)
    index[25:29, 0:4] = 7  # not in the class map
    (tmp_path / "masks" / "a.png").write_bytes(png_bytes(index))
    (tmp_path / "images" / "b.jpg").write_bytes(image_bytes(40, 30, seed=1))
    (tmp_path / "masks" / "b.png").write_bytes(png_bytes(np.ones((31, 40), np.uint8)))
    (tmp_path / "masks" / "orphan.png").write_bytes(png_bytes(np.ones((30, 40), np.uint8)))
    q = Quarantine()
    recs = list(SemanticMaskSource({"root": str(tmp_path), "progress": False}).records(q))
    assert [r.image_id for r in recs] == ["a"] and len(recs[0].entities) == 2
    assert sorted(i.reason for i in q.items) == ["mask_size_mismatch", "missing_image", "unknown_class"]


@pytest.mark.parametrize("layout", ["class_dirs", "suffix"])
def test_binary_mask_folders(tmp_path, layout) -> None:
    (tmp_path / "images").mkdir()
    for stem in ("00000", "00001"):
        (tmp_path / "images" / f"{stem}.jpg").write_bytes(image_bytes(32, 32, seed=int(stem)))
    hair = np.zeros((32, 32), np.uint8)
    hair[:8] = 255
    l_eye = np.zeros((32, 32), np.uint8)
    l_eye[12:15, 8:12] = 255
    files = {("00000", "hair"): hair, ("00000", "l_eye"): l_eye, ("00001", "hair"): hair,
             ("00001", "l_eye"): np.zeros((32, 32), np.uint8)}  # empty -> quarantined
    for (stem, cls), arr in files.items():
        rel = f"{cls}/{stem}.png" if layout == "class_dirs" else f"{stem}_{cls}.png"
        path = tmp_path / "masks" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(arr))
    cfg = {"root": str(tmp_path), "layout": layout, "progress": False}
    if layout == "suffix":
        cfg["classes"] = ["hair", "l_eye"]
    src = BinaryMaskSource(cfg)
    assert src.classes() == ["hair", "l_eye"]
    q = Quarantine()
    recs = {r.image_id: r for r in src.records(q)}
    assert [e.class_name for e in recs["00000"].entities] == ["hair", "l_eye"]
    assert [e.class_name for e in recs["00001"].entities] == ["hair"]
    assert recs["00000"].entities[1].area == 12
    assert [(i.reason, i.item_id) for i in q.items] == [("empty_mask", "00001:l_eye")]
