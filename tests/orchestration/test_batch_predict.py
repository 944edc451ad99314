"""Batch inference over dives in S3 (`operations.batch_inference`, the `predict` flow's logic): a
registered model version (real sqlite registry, real ONNX) over a real S3 endpoint (moto_server).

The flow itself runs on the real stack in test_end_to_end.py; here each rule is checked directly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows import s3_watch
from operations import batch_inference as bi

from orchestration_helpers import register_small_champion

PREFIX = "dives/"
OUT = "predictions/"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    root = tmp_path_factory.mktemp("champion")
    mp = pytest.MonkeyPatch()
    mp.delenv("CPCSAM_TRACKING", raising=False)  # registration needs tracking on
    info = register_small_champion(root)
    mp.undo()
    info["name"] = "cpcsam-oceancoco"
    info["export_dir"] = bi.download_export(info["name"], info["version"], root / "cache", info["db"])
    return info


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (180, 240, 3), dtype=np.uint8)
    pixels[40:120, 60:170] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


PROMPTS = {"a.jpg": [{"class": "crab", "box": [60, 40, 170, 120]}, {"class": "rov", "points": [[30, 30]]}],
           "b.jpg": [{"class": "crab", "box": [50, 30, 180, 130]}],
           "broken.jpg": [{"class": "crab", "box": [10, 10, 50, 50]}]}


def _upload_dive(client, bucket: str) -> None:
    for name, seed in (("a.jpg", 1), ("b.jpg", 2)):
        client.put_object(Bucket=bucket, Key=f"{PREFIX}dive-1/images/{name}", Body=_jpeg(seed))
    client.put_object(Bucket=bucket, Key=f"{PREFIX}dive-1/images/broken.jpg", Body=_jpeg(3)[:200])  # truncated
    client.put_object(Bucket=bucket, Key=f"{PREFIX}dive-1/prompts.json", Body=json.dumps(PROMPTS).encode())
    client.put_object(Bucket=bucket, Key=f"{PREFIX}dive-2/images/c.jpg", Body=_jpeg(4))  # no prompts.json


def _run(client, bucket: str, champion, dive: str = "dive-1", **kwargs) -> bi.DiveReport:
    objects = s3_watch.batches_of(s3_watch.list_objects(client, bucket, PREFIX), PREFIX)[dive]
    out = bi.version_prefix(OUT, champion["name"], champion["version"])
    return bi.process_dive(client, bucket, PREFIX, dive, objects, out, champion["export_dir"], device="cpu", **kwargs)


def _get(client, bucket: str, key: str):
    return bi.read_json(client, bucket, key)


def test_download_finds_the_onnx_graphs_through_the_mlmodel_file(champion) -> None:
    export = Path(champion["export_dir"])
    assert (export / "image_encoder.onnx").is_file() and (export / "decoder_capl.onnx").is_file()
    again = bi.download_export(champion["name"], champion["version"], export.parents[2], champion["db"])
    assert again == export  # cached per version: not downloaded twice


def test_new_images_are_predicted_once_and_answers_match_cpcsam_predict(champion, s3_bucket, tmp_path) -> None:
    from cpcsam.predict import predict

    client = s3_watch.s3_client()
    _upload_dive(client, s3_bucket)
    out = bi.version_prefix(OUT, champion["name"], champion["version"]) + "dive-1/"

    first = _run(client, s3_bucket, champion)
    assert (first.images, first.new, first.processed) == (3, 3, 2)
    assert [f["image"].rsplit("/", 1)[1] for f in first.failed] == ["broken.jpg"]
    coco = _get(client, s3_bucket, out + "predictions.json")
    assert sorted(im["file_name"] for im in coco["images"]) == ["a.jpg", "b.jpg"]
    assert len(coco["annotations"]) == 3
    masks = s3_watch.list_objects(client, s3_bucket, out + "masks/")
    assert len(masks) == 3

    # The same answers as `cpcsam predict` on local copies of the images.
    local = tmp_path / "images"
    local.mkdir()
    for name, seed in (("a.jpg", 1), ("b.jpg", 2)):
        (local / name).write_bytes(_jpeg(seed))
    predict(str(local), tmp_path / "local", prompts=PROMPTS, onnx_dir=champion["export_dir"], device="cpu",
            overlays=False)
    expected = json.loads((tmp_path / "local" / "predictions.json").read_text())
    by_name = lambda c: {im["file_name"]: [a["segmentation"] for a in c["annotations"] if a["image_id"] == im["id"]]  # noqa: E731
                         for im in c["images"]}
    assert by_name(coco) == by_name(expected)
    assert any(a["area"] > 0 for a in coco["annotations"])

    state = _get(client, s3_bucket, out + "processed.json")
    assert set(state["images"]) == {f"{PREFIX}dive-1/images/{n}" for n in ("a.jpg", "b.jpg", "broken.jpg")}
    assert "error" in state["images"][f"{PREFIX}dive-1/images/broken.jpg"]

    # Second run: every (key, ETag) is done, nothing is predicted or rewritten.
    etag = client.head_object(Bucket=s3_bucket, Key=out + "predictions.json")["ETag"]
    second = _run(client, s3_bucket, champion)
    assert (second.new, second.processed) == (0, 0)
    assert client.head_object(Bucket=s3_bucket, Key=out + "predictions.json")["ETag"] == etag

    # b.jpg re-uploaded with other content: only b is redone, and its old entries are replaced.
    client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}dive-1/images/b.jpg", Body=_jpeg(22))
    third = _run(client, s3_bucket, champion)
    assert (third.new, third.processed) == (1, 1)
    coco3 = _get(client, s3_bucket, out + "predictions.json")
    assert sorted(im["file_name"] for im in coco3["images"]) == ["a.jpg", "b.jpg"]
    assert len(coco3["annotations"]) == 3
    assert by_name(coco3)["a.jpg"] == by_name(coco)["a.jpg"]

    # New prompts: every image of the dive is new again.
    client.put_object(Bucket=s3_bucket, Key=f"{PREFIX}dive-1/prompts.json",
                      Body=json.dumps({**PROMPTS, "a.jpg": PROMPTS["a.jpg"][:1]}).encode())
    fourth = _run(client, s3_bucket, champion)
    assert (fourth.new, fourth.processed) == (3, 2)
    assert len(_get(client, s3_bucket, out + "predictions.json")["annotations"]) == 2


def test_a_dive_without_prompts_or_support_is_skipped_with_the_reason(champion, s3_bucket) -> None:
    client = s3_watch.s3_client()
    _upload_dive(client, s3_bucket)
    report = _run(client, s3_bucket, champion, dive="dive-2")
    assert report.skipped_reason and "prompts.json" in report.skipped_reason and report.processed == 0
    out = bi.version_prefix(OUT, champion["name"], champion["version"]) + "dive-2/"
    assert _get(client, s3_bucket, out + "processed.json") is None  # nothing marked done


def test_merge_replaces_an_images_entries_and_joins_categories_by_name() -> None:
    old = {"images": [{"id": 1, "uri": "s3://b/x.jpg"}, {"id": 2, "uri": "s3://b/y.jpg"}],
           "categories": [{"id": 1, "name": "crab"}, {"id": 2, "name": "rov"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 2}, {"id": 2, "image_id": 2, "category_id": 1}]}
    new = {"images": [{"id": 1, "uri": "s3://b/y.jpg"}, {"id": 2, "uri": "s3://b/z.jpg"}],
           "categories": [{"id": 1, "name": "rov"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 2, "category_id": 1}]}
    merged = bi.merge_predictions(old, new)
    assert [im["uri"] for im in merged["images"]] == ["s3://b/x.jpg", "s3://b/y.jpg", "s3://b/z.jpg"]
    names = {c["id"]: c["name"] for c in merged["categories"]}
    uri = {im["id"]: im["uri"] for im in merged["images"]}
    assert sorted((uri[a["image_id"]], names[a["category_id"]]) for a in merged["annotations"]) == [
        ("s3://b/x.jpg", "rov"), ("s3://b/y.jpg", "rov"), ("s3://b/z.jpg", "rov")]
    assert [a["id"] for a in merged["annotations"]] == [1, 2, 3]


def test_an_outage_fails_the_dive_and_marks_nothing_done(champion, s3_bucket, monkeypatch) -> None:
    """A storage outage while images are read is not a bad image: the run fails, no state is written,
    so the next run does the images (here the outage is injected into the storage layer's reads)."""
    from cpcsam.data import storage

    client = s3_watch.s3_client()
    _upload_dive(client, s3_bucket)
    real = storage.read_bytes

    def flaky(uri, *args, **kwargs):
        if str(uri).endswith("b.jpg"):
            raise storage.StorageUnavailable(f"{uri}: S3 endpoint unreachable (injected)")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    with pytest.raises(storage.StorageUnavailable):
        _run(client, s3_bucket, champion)
    out = bi.version_prefix(OUT, champion["name"], champion["version"]) + "dive-1/"
    assert _get(client, s3_bucket, out + "processed.json") is None
    monkeypatch.setattr(storage, "read_bytes", real)
    report = _run(client, s3_bucket, champion)
    assert (report.new, report.processed) == (3, 2)
