"""Prompt perturbation: purity, geometry (inside/outside the mask, bounds) and the stage's table."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from cpcsam.errors import ConfigError, DataError
from cpcsam.prompts import (
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_NEGATIVE,
    LABEL_PAD,
    LABEL_POSITIVE,
    PerturbConfig,
    Prompt,
    entity_rng,
    mask_box,
    pad_prompt,
    perturb_entity,
    perturb_manifest,
    prompt_from_mask,
)
from cpcsam.prompts.perturb import negative_band


def _ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


@pytest.fixture
def mask() -> np.ndarray:
    return _ellipse(60, 80, 30, 45, 12, 20)


@pytest.fixture
def cfg() -> PerturbConfig:
    return PerturbConfig.from_params({"k": 4, "sigma_box": 0.1, "kinds": {"box": 1, "points": 1, "box+points": 1}})


def _same(a: Prompt, b: Prompt) -> bool:
    return a.kind == b.kind and np.array_equal(a.coords, b.coords) and np.array_equal(a.labels, b.labels)


def test_same_inputs_give_identical_prompts(mask: np.ndarray, cfg: PerturbConfig) -> None:
    for k in range(cfg.k):
        a = perturb_entity(7, "img-1", "ent-1", k, mask, cfg)
        b = perturb_entity(7, "img-1", "ent-1", k, mask.copy(), cfg)
        assert _same(a, b)


def test_generator_is_stable_across_processes() -> None:
    """Python's `hash` is salted per process; the derived generator must not be."""
    code = "from cpcsam.prompts import entity_rng; print(entity_rng(3, 'img', 'ent', 2).integers(0, 2**62))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": s}).stdout
        for s in ("1", "2")
    }
    assert outs == {f"{entity_rng(3, 'img', 'ent', 2).integers(0, 2**62)}\n"}


def test_each_input_changes_the_prompt(mask: np.ndarray, cfg: PerturbConfig) -> None:
    base = perturb_entity(7, "img-1", "ent-1", 0, mask, cfg)
    variants = [
        perturb_entity(7, "img-1", "ent-1", 1, mask, cfg),  # another k
        perturb_entity(8, "img-1", "ent-1", 0, mask, cfg),  # another seed
        perturb_entity(7, "img-2", "ent-1", 0, mask, cfg),  # another image
        perturb_entity(7, "img-1", "ent-2", 0, mask, cfg),  # another entity
    ]
    for variant in variants:
        assert not _same(base, variant)
    # the K prompts of one entity are pairwise different
    prompts = [perturb_entity(7, "img-1", "ent-1", k, mask, cfg) for k in range(8)]
    assert all(not _same(p, q) for i, p in enumerate(prompts) for q in prompts[i + 1 :])


def test_geometry_points_inside_negatives_in_band_boxes_in_bounds(mask: np.ndarray, cfg: PerturbConfig) -> None:
    height, width = mask.shape
    tight = mask_box(mask)
    band, (rows, cols) = negative_band(mask, cfg.negative_band)
    band_full = np.zeros_like(mask)
    band_full[rows, cols] = band
    kinds = set()
    for k in range(64):
        p = perturb_entity(0, "img", "ent", k, mask, cfg)
        kinds.add(p.kind)
        pos = p.coords[p.labels == LABEL_POSITIVE].astype(int)
        neg = p.coords[p.labels == LABEL_NEGATIVE].astype(int)
        assert mask[pos[:, 1], pos[:, 0]].all()
        assert not mask[neg[:, 1], neg[:, 0]].any()
        assert band_full[neg[:, 1], neg[:, 0]].all()
        if p.kind == "box":
            assert len(pos) == 0 and len(neg) == 0
        else:
            assert cfg.positives[0] <= len(pos) <= cfg.positives[1]
            assert len(neg) <= cfg.negatives[1]
        box = p.box()
        assert (box is None) == (p.kind == "points")
        if box is not None:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            w, h = tight[2] - tight[0], tight[3] - tight[1]
            # each side moves by at most sigma * side
            assert np.all(np.abs(box - tight) <= cfg.sigma_box * np.array([w, h, w, h]) + 1e-9)
        assert p.num_points <= cfg.prompt_slots
    assert kinds == {"box", "points", "box+points"}


def test_kind_probabilities_are_respected(mask: np.ndarray) -> None:
    only_box = PerturbConfig.from_params({"kinds": {"box": 1.0, "points": 0.0}})
    assert {perturb_entity(0, "i", "e", k, mask, only_box).kind for k in range(20)} == {"box"}


def test_clean_groups_are_exact_and_the_rest_stay_perturbed(mask: np.ndarray) -> None:
    """`clean_groups`: the first K' prompts of every entity have the tight box and unmoved points."""
    noisy = {"k": 6, "sigma_box": 0.4, "sigma_points": 0.5, "kinds": {"box": 1, "box+points": 1}}
    cfg = PerturbConfig.from_params({**noisy, "clean_groups": 2})
    plain = PerturbConfig.from_params(noisy)
    tight = mask_box(mask)
    for entity in ("e1", "e2", "e3"):
        prompts = [perturb_entity(0, "i", entity, k, mask, cfg) for k in range(cfg.k)]
        for p in prompts[:2]:
            assert np.array_equal(p.box(), tight)
            pos = p.coords[p.labels == LABEL_POSITIVE].astype(int)
            assert mask[pos[:, 1], pos[:, 0]].all()
        assert all(not np.array_equal(p.box(), tight) for p in prompts[2:])
        # the perturbed groups are those of the same config without clean groups
        assert all(_same(p, perturb_entity(0, "i", entity, k, mask, plain)) for k, p in enumerate(prompts) if k >= 2)


def test_sigma_points_moves_only_the_positives_and_by_at_most_sigma(mask: np.ndarray) -> None:
    """`sigma_points` displaces each positive by u·(box w, h), |u| <= sigma, and changes nothing else."""
    base = {"k": 4, "kinds": {"points": 1}, "positives": [3, 3], "negatives": [2, 2]}
    still = PerturbConfig.from_params(base)
    moved = PerturbConfig.from_params({**base, "sigma_points": 0.5})
    x0, y0, x1, y1 = mask_box(mask)
    limit = 0.5 * np.array([x1 - x0, y1 - y0]) + 0.5  # + rounding to the pixel grid
    outside = 0
    for k in range(40):
        a = perturb_entity(3, "i", "e", k, mask, still)
        b = perturb_entity(3, "i", "e", k, mask, moved)
        assert np.array_equal(a.labels, b.labels)
        neg = a.labels == LABEL_NEGATIVE
        assert np.array_equal(a.coords[neg], b.coords[neg])
        pos = a.labels == LABEL_POSITIVE
        assert np.all(np.abs(b.coords[pos] - a.coords[pos]) <= limit)
        assert not np.array_equal(a.coords[pos], b.coords[pos])
        p = b.coords[pos].astype(int)
        outside += int((~mask[p[:, 1], p[:, 0]]).sum())
    assert outside > 0  # a careless click may miss the object, as in the points@σ protocol


def test_clean_groups_must_leave_a_perturbed_group() -> None:
    with pytest.raises(ConfigError, match="perturb.clean_groups: 2 of k = 2"):
        PerturbConfig.from_params({"k": 2, "clean_groups": 2})


def test_box_clipped_at_image_border() -> None:
    mask = np.zeros((20, 30), bool)
    mask[0:10, 20:30] = True  # touches the top and right borders
    cfg = PerturbConfig.from_params({"sigma_box": 0.4, "kinds": {"box": 1}})
    for k in range(30):
        x0, y0, x1, y1 = perturb_entity(1, "i", "e", k, mask, cfg).box()
        assert 0 <= x0 < x1 <= 30 and 0 <= y0 < y1 <= 20


def test_full_image_mask_has_no_negatives() -> None:
    mask = np.ones((16, 16), bool)
    cfg = PerturbConfig.from_params({"kinds": {"points": 1}, "negatives": [2, 2]})
    p = perturb_entity(0, "i", "e", 0, mask, cfg)
    assert (p.labels == LABEL_NEGATIVE).sum() == 0 and (p.labels == LABEL_POSITIVE).sum() >= 1


def test_prompt_from_mask_noise_levels(mask: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    exact = prompt_from_mask(mask, "box", 0.0, rng)
    assert np.array_equal(exact.box(), mask_box(mask))
    assert list(exact.labels) == [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]
    point = prompt_from_mask(mask, "points", 0.0, rng)
    # the deterministic click is the most interior pixel: the ellipse centre
    assert np.allclose(point.coords, [[45, 30]], atol=1) and list(point.labels) == [LABEL_POSITIVE]
    noisy = [prompt_from_mask(mask, "box", 0.2, np.random.default_rng(s)).box() for s in range(20)]
    tight = mask_box(mask)
    w, h = tight[2] - tight[0], tight[3] - tight[1]
    deltas = np.abs(np.stack(noisy) - tight)
    assert deltas.max() > 0.05 * min(w, h)  # noise is there
    assert np.all(deltas <= 0.2 * np.array([w, h, w, h]) + 1e-9)  # and bounded by sigma
    both = prompt_from_mask(mask, "box+points", 0.1, rng, num_positive=2, num_negative=1)
    assert sorted(both.labels.tolist()) == [0, 1, 1, 2, 3]


def test_pad_prompt_uses_label_minus_one(mask: np.ndarray) -> None:
    p = prompt_from_mask(mask, "box+points", 0.0, np.random.default_rng(0))
    coords, labels = pad_prompt(p, 8)
    assert coords.shape == (8, 2) and labels.shape == (8,)
    assert (labels[p.num_points :] == LABEL_PAD).all() and np.array_equal(labels[: p.num_points], p.labels)
    with pytest.raises(ConfigError, match="does not fit"):
        pad_prompt(p, 2)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="perturb.kinds"):
        PerturbConfig.from_params({"kinds": {"lasso": 1}})
    with pytest.raises(ConfigError, match="perturb.prompt_slots"):
        PerturbConfig.from_params({"prompt_slots": 4})
    with pytest.raises(ConfigError, match="unknown key"):
        PerturbConfig.from_params({"sigma": 0.1})
    with pytest.raises(DataError, match="empty"):
        perturb_entity(0, "i", "e", 0, np.zeros((4, 4), bool), PerturbConfig())


def _manifest(masks: dict[tuple[str, str], np.ndarray], splits: dict[str, str], roles: dict[str, str]) -> pd.DataFrame:
    rows = []
    for (image_id, entity_id), m in masks.items():
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        x, y, w, h = mask_utils.toBbox(rle)
        cls = "fish" if entity_id.endswith("a") else "crab"
        rows.append(
            dict(image_id=image_id, image_uri=f"/nowhere/{image_id}.png", width=m.shape[1], height=m.shape[0],
                 entity_id=entity_id, class_name=cls, rle_counts=rle["counts"].decode("ascii"),
                 bbox_x=x, bbox_y=y, bbox_w=w, bbox_h=h, area=int(m.sum()), split=splits[image_id],
                 role=roles[cls], group_id=image_id)
        )
    return pd.DataFrame(rows)


def test_perturb_manifest_keeps_train_base_entities_and_is_reproducible(tmp_path) -> None:
    def decode(counts: str, height: int, width: int) -> np.ndarray:
        return mask_utils.decode({"size": [height, width], "counts": counts.encode("ascii")}).astype(bool)

    masks = {
        ("i1", "e1a"): _ellipse(40, 50, 20, 20, 8, 10),
        ("i1", "e1b"): _ellipse(40, 50, 25, 35, 6, 6),
        ("i2", "e2a"): _ellipse(40, 50, 15, 25, 10, 15),
        ("i3", "e3a"): _ellipse(40, 50, 15, 25, 10, 15),
    }
    manifest = _manifest(masks, {"i1": "train", "i2": "train", "i3": "val"}, {"fish": "base", "crab": "target"})
    cfg = PerturbConfig.from_params({"k": 3})
    table = perturb_manifest(manifest, cfg, seed=5, decode=decode, progress=False)
    assert sorted(set(table["entity_id"])) == ["e1a", "e2a"]  # crab is a target class, i3 is val
    assert len(table) == 2 * 3 and sorted(set(table["k"])) == [0, 1, 2]
    path = tmp_path / "prompts.parquet"
    table.to_parquet(path)
    again = pd.read_parquet(path)
    row = again.iloc[4]
    expected = perturb_entity(5, row.image_id, row.entity_id, int(row.k), masks[(row.image_id, row.entity_id)], cfg)
    assert _same(Prompt.from_flat(row.kind, row.coords, row.labels), expected)
    assert perturb_manifest(manifest, cfg, seed=5, decode=decode, progress=False).equals(table)
