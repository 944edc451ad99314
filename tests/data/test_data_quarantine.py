"""Bad input built by the test: each case is quarantined with file + reason, the rest goes on."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from data_builders import coco_data_cfg, make_coco
from PIL import Image

from cpcsam.data import load_manifest
from cpcsam.data.ingest import run_ingest
from cpcsam.data.masks import encode_mask
from cpcsam.errors import DataError


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _corrupt(root: Path) -> dict[str, tuple[str, str]]:
    """Damage a 12-image COCO set in every way the issue lists; returns {reason: (kind, id)} expected."""
    coco = json.loads((root / "annotations.json").read_text())
    images = root / "images"
    ims = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    # image 1: not an image at all; image 2: a JPEG cut in half
    (images / ims[1]["file_name"]).write_bytes(b"this is not a jpeg")
    data = (images / ims[2]["file_name"]).read_bytes()
    (images / ims[2]["file_name"]).write_bytes(data[: len(data) // 2])
    # image 3: a decompression bomb (tiny file, 4000x4000 pixels) replaces the image
    buf = io.BytesIO()
    Image.new("1", (4000, 4000)).save(buf, format="PNG")
    (images / "bomb.png").write_bytes(buf.getvalue())
    ims[3]["file_name"], ims[3]["width"], ims[3]["height"] = "bomb.png", 4000, 4000
    # image 4: a path escaping the data root; image 5: a file that does not exist
    ims[4]["file_name"] = "../../outside.jpg"
    ims[5]["file_name"] = "gone.jpg"
    # annotations on intact images (6..12; 3 annotations each, ids 3i-2 .. 3i)
    anns[18]["segmentation"] = {"size": [47, 64], "counts": anns[18]["segmentation"]["counts"]}  # image 6: size mismatch
    anns[19]["segmentation"] = [[1, 2, 3]]  # image 7: invalid polygon
    anns[22]["segmentation"] = {"size": [48, 64], "counts": [5, 7]}  # image 8: RLE covering 12 of 3072 pixels
    anns[25]["segmentation"] = {"size": [48, 64], "counts": encode_mask(np.zeros((48, 64), bool))}  # image 9: empty
    anns[28]["bbox"] = [60, 40, 30, 30]  # image 10: bbox outside
    anns[31]["category_id"] = 99  # image 11: unknown class
    coco["annotations"].append({**anns[34], "category_id": 2})  # image 12: annotation id 34 (a fish) again as a crab
    coco["annotations"].append({**anns[34], "id": 1000, "image_id": 777})  # annotation for a missing image
    (root / "annotations.json").write_text(json.dumps(coco))
    return {
        "unreadable_image": ("image", "1"),
        "truncated_image": ("image", "2"),
        "image_too_large": ("image", "3"),
        "path_escapes_root": ("image", "4"),
        "missing_image": ("image", "5"),
        "mask_size_mismatch": ("annotation", "18"),
        "invalid_segmentation": ("annotation", "19"),
        "empty_mask": ("annotation", "25"),
        "bbox_outside_image": ("annotation", "28"),
        "unknown_class": ("annotation", "31"),
        "conflicting_id": ("annotation", "34"),
    }


@pytest.fixture
def corrupted(tmp_path) -> Path:
    root = tmp_path / "raw"
    make_coco(str(root), n_images=12)
    return root


def test_every_bad_input_is_quarantined_and_the_rest_goes_on(corrupted, tmp_path) -> None:
    expected = _corrupt(corrupted)
    before = _tree_digest(corrupted)
    cfg = coco_data_cfg(str(corrupted))
    cfg["max_pixels"] = 1_000_000
    cfg["max_quarantine_fraction"] = 0.9
    summary = run_ingest(cfg, tmp_path / "out")
    assert _tree_digest(corrupted) == before  # raw data never modified

    report = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    items = report["items"]
    for reason, (kind, item_id) in expected.items():
        hits = [i for i in items if i["reason"] == reason and i["kind"] == kind and i["item_id"] == item_id]
        assert hits, f"{reason} for {kind} {item_id} not in the quarantine report"
        assert hits[0]["file"] and hits[0]["detail"]
    bad_rle = [i for i in items if i["item_id"] == "22"]
    assert bad_rle and bad_rle[0]["reason"] == "invalid_segmentation"
    orphan = [i for i in items if i["item_id"] == "1000"]
    assert orphan and orphan[0]["reason"] == "missing_image"
    escape = [i for i in items if i["reason"] == "path_escapes_root"][0]
    assert escape["file"] == "../../outside.jpg"
    assert summary["quarantine"]["counts_by_reason"]["missing_image"] == 2

    # the rest went on: images 6..12 are in the manifest, minus exactly the refused annotations
    df = load_manifest(tmp_path / "out" / "manifest.parquet")
    refused = {"18", "19", "22", "25", "28", "31", "34"}  # 34: both of its conflicting entries
    kept_ids = set(df.entity_id) | {e["entity_id"] for e in summary["withheld_target_in_train"]["entities"]}
    assert kept_ids == {str(a) for a in range(16, 37)} - refused
    assert summary["quarantine"]["n_items"] == len(items) == 14


def test_too_much_quarantine_fails_with_one_clear_message(corrupted, tmp_path) -> None:
    _corrupt(corrupted)
    cfg = coco_data_cfg(str(corrupted))
    cfg["max_pixels"] = 1_000_000
    cfg["max_quarantine_fraction"] = 0.05
    with pytest.raises(DataError, match=r"quarantined, over data.max_quarantine_fraction=0.05") as err:
        run_ingest(cfg, tmp_path / "out")
    assert "by reason" in str(err.value)
    # the reports are still written so the user can see why
    assert json.loads((tmp_path / "out" / "quarantine.json").read_text())["n_quarantined"] == 14


def test_pil_default_limit_does_not_hide_our_limit(tmp_path) -> None:
    """Over PIL's own bomb limit the image is still refused by ours, with our reason."""
    from cpcsam.data.storage import ImageError, open_image

    buf = io.BytesIO()
    Image.new("1", (20000, 10000)).save(buf, format="PNG")  # 200 Mpx: PIL alone would raise its own error
    with pytest.raises(ImageError, match="over the limit") as err:
        open_image(buf.getvalue(), "big.png", max_pixels=40_000_000)
    assert err.value.reason == "image_too_large"


def test_component_exits_2_with_one_line(corrupted, tmp_path, monkeypatch, capsys) -> None:
    import yaml

    from components import ingest

    _corrupt(corrupted)
    cfg = coco_data_cfg(str(corrupted))
    cfg["max_quarantine_fraction"] = 0.01
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": cfg, "tracking": {"enabled": False}}))
    monkeypatch.setenv("CPCSAM_TRACKING", "off")
    assert ingest.main(["--params", str(params), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ingest: ") and "max_quarantine_fraction" in err[0]
