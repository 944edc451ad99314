"""The embedded synthetic deep-sea generator: deterministic, varied, confounders independent of class."""

from __future__ import annotations

import numpy as np

from cpcsam.data import decode_mask
from cpcsam.data.records import Quarantine
from cpcsam.data.sources.synthetic import CLASSES, SyntheticSource

CFG = {"num_images": 8, "width": 96, "height": 72, "frames_per_dive": 4, "seed": 3}


def _generate(tmp_path, name: str, **over):
    src = SyntheticSource({**CFG, **over}, tmp_path / name)
    recs = list(src.records(Quarantine()))
    files = {r.image_id: open(r.image_uri, "rb").read() for r in recs}
    return recs, files


def test_same_seed_gives_identical_bytes_and_masks(tmp_path) -> None:
    recs_a, files_a = _generate(tmp_path, "a")
    recs_b, files_b = _generate(tmp_path, "b")
    assert files_a == files_b
    assert [[e.rle_counts for e in r.entities] for r in recs_a] == [[e.rle_counts for e in r.entities] for r in recs_b]


def test_different_seed_gives_different_images(tmp_path) -> None:
    _, files_a = _generate(tmp_path, "a")
    _, files_b = _generate(tmp_path, "b", seed=4)
    assert all(files_a[k] != files_b[k] for k in files_a)


def test_classes_entities_and_groups(tmp_path) -> None:
    assert len(CLASSES) >= 12
    recs, _ = _generate(tmp_path, "a", num_images=28, frames_per_dive=4)
    counts = [len(r.entities) for r in recs]
    assert min(counts) >= 1 and max(counts) <= 5
    seen = {e.class_name for r in recs for e in r.entities}
    assert len(seen) >= 12  # the class deck spreads classes evenly
    assert len({r.group_id for r in recs}) == 7
    for r in recs:
        for e in r.entities:
            m = decode_mask(e.rle_counts, r.height, r.width)
            assert m.sum() == e.area > 0
            x, y, w, h = e.bbox
            assert m[int(y) : int(y + h), int(x) : int(x + w)].sum() == e.area  # tight box holds the mask


def test_confounder_strength_changes_pixels_not_classes_or_masks(tmp_path) -> None:
    clear, files_clear = _generate(tmp_path, "clear", confounder_strength=0.0)
    murky, files_murky = _generate(tmp_path, "murky", confounder_strength=1.0)
    assert [[(e.class_name, e.rle_counts) for e in r.entities] for r in clear] == [
        [(e.class_name, e.rle_counts) for e in r.entities] for r in murky
    ]
    assert all(files_clear[k] != files_murky[k] for k in files_clear)


def test_frames_of_a_dive_share_their_water(tmp_path) -> None:
    from PIL import Image

    recs, _ = _generate(tmp_path, "a", confounder_strength=1.0, num_images=8, frames_per_dive=4)
    means = [np.asarray(Image.open(r.image_uri), dtype=float)[:8].mean(axis=(0, 1)) for r in recs]  # top rows: water
    within = np.mean([np.abs(means[i] - means[j]).sum() for i, j in [(0, 1), (1, 2), (4, 5), (6, 7)]])
    across = np.mean([np.abs(means[i] - means[j]).sum() for i, j in [(0, 4), (1, 5), (2, 6), (3, 7)]])
    assert within < across
