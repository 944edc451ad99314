"""flows.s3_watch against a real S3 endpoint (moto_server): new = unseen key or changed ETag."""

from __future__ import annotations

import boto3
import pytest

from flows import s3_watch


def _put(bucket: str, key: str, body: bytes) -> None:
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body)


def test_new_objects_are_found_by_key_and_etag_within_the_same_second(s3_bucket: str, tmp_path) -> None:
    client = s3_watch.s3_client()
    _put(s3_bucket, "deepsea/b1/annotations.json", b"{}")
    _put(s3_bucket, "deepsea/b1/images/a.png", b"a")
    _put(s3_bucket, "other/x.png", b"not watched")
    state = s3_watch.SeenState()
    first = state.new(s3_watch.list_objects(client, s3_bucket, "deepsea/"))
    assert [o.key for o in first] == ["deepsea/b1/annotations.json", "deepsea/b1/images/a.png"]
    state.mark(first)
    state.save(tmp_path / "state.json")

    # Same second as the first uploads: a time watermark would miss both of these.
    _put(s3_bucket, "deepsea/b1/images/a.png", b"a, fixed")  # new content, same key
    _put(s3_bucket, "deepsea/b2/annotations.json", b"{}")  # new key
    _put(s3_bucket, "deepsea/b1/annotations.json", b"{}")  # same content again: same ETag
    reloaded = s3_watch.SeenState.load(tmp_path / "state.json")
    listed = s3_watch.list_objects(client, s3_bucket, "deepsea/")
    times = {o.last_modified for o in listed}
    second = reloaded.new(listed)
    assert [o.key for o in second] == ["deepsea/b1/images/a.png", "deepsea/b2/annotations.json"]
    assert len(times) <= 2  # whole-second timestamps: the uploads are (nearly) indistinguishable by time

    reloaded.mark(second)
    assert reloaded.new(s3_watch.list_objects(client, s3_bucket, "deepsea/")) == []


def test_listing_pages_through_every_page(s3_bucket: str) -> None:
    client = boto3.client("s3")
    for i in range(7):
        client.put_object(Bucket=s3_bucket, Key=f"p/{i:05d}", Body=b"")
    listed = s3_watch.list_objects(s3_watch.s3_client(), s3_bucket, "p/", page_size=3)  # 3 pages
    assert [o.key for o in listed] == [f"p/{i:05d}" for i in range(7)]


def test_state_file_keeps_extra_fields_and_batches_group_by_folder(tmp_path) -> None:
    objs = [s3_watch.S3Object(k, "e", 1, "t") for k in ("in/b1/a.json", "in/b1/images/x.png", "in/b2/a.json", "in/top.json")]
    assert {k: [o.key for o in v] for k, v in s3_watch.batches_of(objs, "in/").items()} == {
        "": ["in/top.json"], "b1": ["in/b1/a.json", "in/b1/images/x.png"], "b2": ["in/b2/a.json"],
    }
    state = s3_watch.SeenState({"in/b1/a.json": "e"}, {"data_version": "abc"})
    state.save(tmp_path / "s.json")
    again = s3_watch.SeenState.load(tmp_path / "s.json")
    assert again.seen == {"in/b1/a.json": "e"} and again.extra == {"data_version": "abc"}
    assert [o.key for o in again.new(objs)] == ["in/b1/images/x.png", "in/b2/a.json", "in/top.json"]


def test_a_failed_state_save_keeps_the_previous_state_and_leaves_no_temp_file(tmp_path) -> None:
    path = tmp_path / "s.json"
    s3_watch.SeenState({"in/a.json": "e1"}, {"data_version": "v1"}).save(path)
    before = path.read_bytes()
    broken = s3_watch.SeenState({"in/a.json": "e1", "in/b.json": "e2"}, {"data_version": object()})
    with pytest.raises(TypeError):  # fails half-way through serialising
        broken.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"], "no temporary file left behind"
