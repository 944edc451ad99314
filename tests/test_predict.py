"""`cpcsam predict` end to end: prompts JSON, automatic mode, S3, bad inputs.

On the real TrashCan images when ../shared/data is there, else on a generated COCO set (the
synthetic source's images as JPEG, its masks as RLE): the tests run wherever CI runs.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "export"))
from export_helpers import export_small_model  # noqa: E402

from cpcsam.cli import main as cli_main  # noqa: E402
from cpcsam.errors import DataError  # noqa: E402
from cpcsam.evaluation.metrics import iou  # noqa: E402
from cpcsam.predict import expand_images, predict  # noqa: E402

NUM_IMAGES = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The exported graphs and the model file of one small calibrated CPC-SAM."""
    return export_small_model(tmp_path_factory.mktemp("predict_models"))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """A COCO folder (annotations.json + images/): TrashCan when present, else generated."""
    import os

    # the root conftest's rule (not importable by name: tests/training has a conftest too)
    shared = Path(os.environ.get("CPCSAM_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
    if (shared / "data" / "trashcan").is_dir():
        return shared / "data" / "trashcan"
    from cpcsam.data.records import Quarantine
    from cpcsam.data.sources.synthetic import SyntheticSource

    root = tmp_path_factory.mktemp("generated_coco")
    source = SyntheticSource({"num_images": 12, "width": 320, "height": 240, "min_entities": 2, "max_entities": 4,
                              "seed": 3}, root / "png")
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(source.classes())]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    (root / "images").mkdir()
    for i, rec in enumerate(source.records(Quarantine()), start=1):
        name = Path(rec.image_uri).with_suffix(".jpg").name
        Image.open(rec.image_uri).convert("RGB").save(root / "images" / name, quality=95)
        images.append({"id": i, "file_name": name, "width": rec.width, "height": rec.height})
        for ent in rec.entities:
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": cat_id[ent.class_name],
                                "segmentation": {"size": [rec.height, rec.width], "counts": ent.rle_counts},
                                "area": ent.area, "bbox": list(ent.bbox), "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))
    return root


@pytest.fixture(scope="module")
def real_images(coco_dir, tmp_path_factory):
    """A few images (copied: the shared folder is read-only) and a prompts JSON of their GT boxes."""
    coco = json.loads((coco_dir / "annotations.json").read_text())
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    chosen = [im for im in coco["images"] if len(by_image.get(im["id"], [])) >= 2][:NUM_IMAGES]
    folder = tmp_path_factory.mktemp("real") / "images"
    folder.mkdir()
    prompts = {}
    for im in chosen:
        shutil.copy(coco_dir / "images" / im["file_name"], folder / im["file_name"])
        entities = []
        for k, ann in enumerate(by_image[im["id"]]):
            x, y, w, h = ann["bbox"]
            ent = {"class": names[ann["category_id"]], "box": [x, y, x + w, y + h]}
            if k == 0:  # one entity with points too (a positive at the box centre, a negative corner)
                ent["points"], ent["labels"] = [[x + w / 2, y + h / 2], [0, 0]], [1, 0]
            entities.append(ent)
        prompts[im["file_name"]] = entities
    path = folder.parent / "prompts.json"
    path.write_text(json.dumps(prompts))
    return folder, path, prompts


def test_predict_end_to_end_onnx_and_torch(models, real_images, tmp_path):
    folder, prompts_path, prompts = real_images
    onnx_out = predict(str(folder), tmp_path / "onnx", prompts=prompts_path, onnx_dir=models / "onnx", device="cpu")
    assert not onnx_out.failures and len(onnx_out.processed) == NUM_IMAGES
    n_entities = sum(len(v) for v in prompts.values())
    assert onnx_out.num_masks == n_entities

    coco = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert len(coco["images"]) == NUM_IMAGES and len(coco["annotations"]) == n_entities
    from pycocotools import mask as mask_utils

    for ann in coco["annotations"][:3]:
        image = next(i for i in coco["images"] if i["id"] == ann["image_id"])
        decoded = mask_utils.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
        assert decoded.shape == (image["height"], image["width"])
        stem = Path(image["file_name"]).stem
        pngs = sorted((tmp_path / "onnx" / "masks" / stem).glob("*.png"))
        k = [a["id"] for a in coco["annotations"] if a["image_id"] == ann["image_id"]].index(ann["id"])
        png = np.asarray(Image.open(pngs[k])) > 0
        assert np.array_equal(png, decoded.astype(bool)), "the PNG and the RLE are the same mask"
    assert len(list((tmp_path / "onnx" / "overlays").glob("*.png"))) == NUM_IMAGES

    # PyTorch on request: the same masks (the ONNX graph is the traced PyTorch wrapper).
    torch_out = predict(str(folder), tmp_path / "torch", prompts=prompts_path, backend="torch",
                        model_path=models / "model.pt")
    assert not torch_out.failures
    torch_coco = json.loads((tmp_path / "torch" / "predictions.json").read_text())
    for a, b in zip(coco["annotations"], torch_coco["annotations"]):
        ma = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        mb = mask_utils.decode({"size": b["segmentation"]["size"], "counts": b["segmentation"]["counts"].encode()})
        assert iou(ma, mb) >= 0.999 and abs(a["score"] - b["score"]) < 1e-4


def _two_classes(coco_dir: Path) -> list[str]:
    """Two classes of the data set (TrashCan's rov and trash_clothing when it is the data)."""
    names = sorted(c["name"] for c in json.loads((coco_dir / "annotations.json").read_text())["categories"])
    return ["trash_clothing", "rov"] if "rov" in names else names[:2]


def test_automatic_mode_with_support_set(models, real_images, coco_dir, tmp_path):
    folder, _, _ = real_images
    classes = _two_classes(coco_dir)
    summary = predict(str(folder / "*.jpg"), tmp_path / "auto", support=coco_dir / "annotations.json",
                      classes=classes, onnx_dir=models / "onnx", support_per_class=1)
    assert not summary.failures and summary.num_masks == 2 * NUM_IMAGES
    coco = json.loads((tmp_path / "auto" / "predictions.json").read_text())
    assert {c["name"] for c in coco["categories"]} == set(classes)
    assert all(a["prompt"] == "auto" for a in coco["annotations"])
    # Per image, a class-only entity asks for an automatic prompt; an unknown one fails only its image.
    first, second = sorted(p.name for p in folder.glob("*.jpg"))[:2]
    mixed = predict([str(folder / first), str(folder / second)], tmp_path / "mixed",
                    prompts={first: [{"class": classes[1]}], second: [{"class": "sea_dragon"}]},
                    support=coco_dir / "annotations.json", onnx_dir=models / "onnx", support_per_class=1)
    assert mixed.processed == [str(folder / first)]
    assert "class 'sea_dragon' has no geometry and no support prototype" in mixed.failures[0]["error"]
    with pytest.raises(DataError, match="unknown class.*'dragon'"):
        predict(str(folder), tmp_path / "x", support=coco_dir / "annotations.json", classes=["dragon"],
                onnx_dir=models / "onnx", support_per_class=1)


def test_bad_inputs_fail_their_image_and_the_rest_go_on(models, real_images, tmp_path, capsys):
    folder, _, prompts = real_images
    work = tmp_path / "imgs"
    shutil.copytree(folder, work)
    (work / "broken.jpg").write_bytes(b"not a jpeg")
    names = sorted(prompts)
    bad = {
        names[0]: prompts[names[0]],  # fine
        names[1]: [{"class": "trash_bag", "box": [0, 0, 5000, 10]}],  # outside the image
        names[2]: [{"class": "rov", "box": [3, 4, 1]}],  # malformed box
        "broken.jpg": [{"class": "rov", "box": [1, 1, 5, 5]}],  # unreadable image
    }
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code = cli_main(["predict", str(work), "--prompts", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o"),
                     "--onnx-dir", str(models / "onnx")])
    assert code == 2
    out = capsys.readouterr().out
    assert "1 image(s) done" in out and "3 image(s) FAILED" in out
    width = Image.open(work / names[1]).width
    assert f"{names[1]}: entity 0 (trash_bag): prompt [5000.0, 10.0] lies outside the {width}x" in out
    assert f"{names[2]}: entity 0: box must be [x0, y0, x1, y1]" in out
    assert "broken.jpg: unreadable image" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert len(summary["processed"]) == 1 and len(summary["failures"]) == 3
    # Problems with the inputs as a whole: one clear line, exit 2.
    (tmp_path / "malformed.json").write_text("{not json")
    code = cli_main(["predict", str(work), "--prompts", str(tmp_path / "malformed.json"), "--out", str(tmp_path / "o2"),
                     "--onnx-dir", str(models / "onnx")])
    assert code == 2
    assert "malformed.json: prompts file is not valid JSON" in capsys.readouterr().err
    with pytest.raises(DataError, match="nowhere"):
        expand_images(str(tmp_path / "nowhere"))
    assert cli_main(["predict", str(work), "--prompts", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o3"),
                     "--onnx-dir", str(tmp_path / "no_models")]) == 2
    assert "image_encoder.onnx: ONNX model not found" in capsys.readouterr().err


def test_images_from_an_s3_prefix(models, real_images, s3_bucket, tmp_path):
    from cpcsam.data import storage

    folder, prompts_path, prompts = real_images
    name = sorted(prompts)[0]
    storage.write_bytes(f"s3://{s3_bucket}/dive/{name}", (folder / name).read_bytes())
    storage.write_bytes(f"s3://{s3_bucket}/dive/notes.txt", b"not an image")
    assert expand_images(f"s3://{s3_bucket}/dive/") == [f"s3://{s3_bucket}/dive/{name}"]
    summary = predict(f"s3://{s3_bucket}/dive/", tmp_path / "s3", prompts={name: prompts[name]},
                      onnx_dir=models / "onnx")
    assert summary.processed == [f"s3://{s3_bucket}/dive/{name}"] and not summary.failures


def test_only_the_pytorch_backend_asks_for_large_blocks_from_the_heap(monkeypatch) -> None:
    """onnxruntime keeps its own arena; the PyTorch backend's attention blocks come from glibc."""
    from cpcsam.predict import configure_predict_process
    from cpcsam.training import device

    calls: list[bool] = []
    monkeypatch.setattr(device, "keep_freed_memory", lambda large_blocks_from_heap=False: calls.append(large_blocks_from_heap))
    configure_predict_process("onnx")
    assert calls == []
    configure_predict_process("torch")
    assert calls == [True]
