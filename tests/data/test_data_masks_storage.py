"""RLE parsing/validation and the storage helpers (local side; S3 in test_data_s3.py)."""

from __future__ import annotations

import numpy as np
import pytest
from data_builders import image_bytes, uncompressed_rle
from pycocotools import mask as mask_utils

from cpcsam.data import decode_mask, encode_mask, read_image
from cpcsam.data.masks import parse_compressed_counts, rle_from_annotation
from cpcsam.data.storage import resolve_under
from cpcsam.errors import DataError


def test_parse_compressed_counts_matches_pycocotools_runs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        m = rng.random((23, 31)) < rng.random()
        counts = encode_mask(m)
        assert parse_compressed_counts(counts) == uncompressed_rle(m)["counts"]
        assert np.array_equal(decode_mask(counts, 23, 31), m)


def test_rle_from_annotation_accepts_the_three_coco_forms() -> None:
    m = np.zeros((20, 30), bool)
    m[5:15, 8:20] = True
    compressed = {"size": [20, 30], "counts": encode_mask(m)}
    for seg in (uncompressed_rle(m), compressed):
        assert np.array_equal(mask_utils.decode(rle_from_annotation(seg, 20, 30)).astype(bool), m)
    poly = rle_from_annotation([[8, 5, 19, 5, 19, 14, 8, 14]], 20, 30)
    assert mask_utils.area(poly) > 0.8 * m.sum()


@pytest.mark.parametrize(
    "seg, expected",
    [
        ({"size": [20, 30], "counts": [10, 5]}, "covers 15 pixels"),  # runs do not fill the mask
        ({"size": [21, 30], "counts": [630]}, "size mismatch"),
        ({"size": [20, 30], "counts": "!!!"}, "invalid character"),
        ([[1, 2, 3]], "even number"),
        ([["a", 1, 2, 3, 4, 5]], "non-numeric"),
        ("nonsense", "neither polygons nor RLE"),
    ],
)
def test_rle_from_annotation_refuses_bad_segmentations(seg, expected) -> None:
    with pytest.raises(DataError, match=expected):
        rle_from_annotation(seg, 20, 30)


def test_compressed_rle_that_overruns_the_mask_is_refused_before_decoding() -> None:
    big = encode_mask(np.ones((40, 40), bool))  # 1600 pixels of foreground
    with pytest.raises(DataError, match="needs 600"):
        rle_from_annotation({"size": [20, 30], "counts": big}, 20, 30)


def test_resolve_under_refuses_escapes(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    assert resolve_under(tmp_path, "images/a.jpg") == str(tmp_path.resolve() / "images" / "a.jpg")
    for bad in ("../secret.jpg", "images/../../x.jpg", "/etc/passwd"):
        with pytest.raises(DataError, match="escapes|absolute"):
            resolve_under(tmp_path, bad)
    (tmp_path / "images" / "link.jpg").symlink_to("/etc/hostname")
    with pytest.raises(DataError, match="escapes"):
        resolve_under(tmp_path, "images/link.jpg")
    with pytest.raises(DataError, match="escapes"):
        resolve_under("s3://b/root", "../other/key")


def test_read_image_returns_rgb_uint8(tmp_path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(image_bytes(17, 11, seed=1, fmt="PNG"))
    img = read_image(path)
    assert img.shape == (11, 17, 3) and img.dtype == np.uint8
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")
