"""`benchmarks/study.py`: studies of several data splits pooled into one paired estimate (`--pool`),
and a held-out profile scored whole, with intervals that resample its videos (`--holdout`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[2]


study = load_script("cpcsam_study_script", "benchmarks/study.py")
PROTOCOLS = ["box@0", "box@0.5", "points@0.5"]


def _write_study(folder: Path, split_seed: int, ours: np.ndarray, theirs: np.ndarray,
                 overrides: tuple[str, ...] = ("evaluate.threshold=-2",)) -> Path:
    """A finished one-profile study whose CPC-SAM and LoRA-only per-image target Dice (per seed:
    rows) are `ours` and `theirs` at every protocol; one image without a target class (None)."""

    def runs(scores: np.ndarray, protocols: list[str]) -> dict:
        return {str(seed): {p: [*map(float, row), None] for p in protocols} for seed, row in enumerate(scores)}

    images = ours.shape[1] + 1
    result = {
        "profile": "trashcan", "split": "test", "images": images, "target": ["fish"], "protocols": PROTOCOLS,
        "overrides": [*overrides, f"data.split.seed={split_seed}"],
        "models": {"filled_box": {"-": {p: [0.5] * (images - 1) + [None] for p in PROTOCOLS if p.startswith("box")}},
                   "cpcsam": runs(ours, PROTOCOLS), "lora_only": runs(theirs, PROTOCOLS)},
    }
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"results": [result], "summaries": []}))
    return folder


def test_pooled_difference_weighs_every_image_alike_and_narrows_the_interval(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # split 1: 40 images, CPC-SAM +4 points on average; split 2: 10 images, -2 points
    a_theirs, b_theirs = rng.uniform(0.3, 0.8, (2, 40)), rng.uniform(0.3, 0.8, (2, 10))
    a_ours = a_theirs + 0.04 + rng.normal(0, 0.05, (2, 40))
    b_ours = b_theirs - 0.02 + rng.normal(0, 0.05, (2, 10))
    dirs = [_write_study(tmp_path / "s1", 1, a_ours, a_theirs), _write_study(tmp_path / "s6", 6, b_ours, b_theirs)]

    text, pooled = study.pool_report(study.load_for_pooling(dirs), np.random.default_rng(0))

    row = next(iv for iv in pooled["intervals"] if iv["protocol"] == "box@0.5" and iv["versus"] == "lora_only")
    per_image = np.concatenate([(a_ours - a_theirs).mean(axis=0), (b_ours - b_theirs).mean(axis=0)])
    assert row["pooled"]["mean"] == pytest.approx(per_image.mean())  # 50 images alike, not the two splits' means
    assert row["pooled"]["mean"] != pytest.approx((row["splits"]["1"]["mean"] + row["splits"]["6"]["mean"]) / 2)
    assert row["pooled"]["low"] < row["pooled"]["mean"] < row["pooled"]["high"]
    width = row["pooled"]["high"] - row["pooled"]["low"]
    assert width < row["splits"]["1"]["high"] - row["splits"]["1"]["low"]
    assert row["splits"]["6"]["mean"] == pytest.approx((b_ours - b_theirs).mean())
    # the filled box has no points rows; CPC-SAM is the lead model
    assert not any(iv["versus"] == "filled_box" and iv["protocol"].startswith("points") for iv in pooled["intervals"])
    assert pooled["lead"] == "cpcsam" and pooled["split_seeds"] == ["1", "6"]
    assert "| box@0.5 | lora_only |" in text and "split 1" in text and "split 6" in text


def test_studies_that_differ_in_more_than_the_split_are_refused(tmp_path: Path) -> None:
    ours, theirs = np.full((2, 5), 0.6), np.full((2, 5), 0.5)
    first = _write_study(tmp_path / "a", 1, ours, theirs)
    other_setting = _write_study(tmp_path / "b", 6, ours, theirs, overrides=("evaluate.threshold=0",))
    with pytest.raises(SystemExit, match=r"b/study.json differs .* in overrides"):
        study.load_for_pooling([first, other_setting])
    same_split = _write_study(tmp_path / "c", 1, ours, theirs)
    with pytest.raises(SystemExit, match="share a data.split.seed"):
        study.load_for_pooling([first, same_split])
    with pytest.raises(SystemExit, match=r"missing/study.json: not a finished study"):
        study.load_for_pooling([first, tmp_path / "missing"])


def test_held_out_intervals_resample_whole_videos() -> None:
    """12 videos of 30 near-identical frames: the frames tell little more than the 12 videos do, so
    the videos-resampled interval is the bootstrap of the 12 video means, far wider than the images'."""
    rng = np.random.default_rng(5)
    video_effect = rng.normal(0.03, 0.05, 12)
    groups = [f"vid_{v:02d}" for v in range(12) for _ in range(30)]
    theirs = rng.uniform(0.3, 0.8, (3, 360))
    ours = theirs + np.repeat(video_effect, 30) + rng.normal(0, 0.002, (3, 360))
    runs = lambda scores: {str(k): {"points@0.8": list(map(float, row))} for k, row in enumerate(scores)}  # noqa: E731
    result = {"profile": "trashcan models on new", "split": "every", "images": 360, "target": ["fish"],
              "protocols": ["points@0.8"], "groups": groups, "budget": {}, "seconds": {},
              "models": {"cpcsam": runs(ours), "lora_only": runs(theirs)}}

    (iv,) = study.summarise(result, np.random.default_rng(0))["intervals"]

    means = (ours - theirs).mean(axis=0).reshape(12, 30).mean(axis=1)
    boot = means[np.random.default_rng(1).integers(0, 12, (10_000, 12))].mean(axis=1)
    assert iv["groups"] == 12
    assert iv["group_low"] == pytest.approx(np.percentile(boot, 2.5), abs=0.003)
    assert iv["group_high"] == pytest.approx(np.percentile(boot, 97.5), abs=0.003)
    assert iv["group_high"] - iv["group_low"] > 3 * (iv["high"] - iv["low"])
    text = study.report([result], [{"lead": "cpcsam", "rows": [], "intervals": [iv]}])
    assert "over the 12 videos" in text and f"[{100 * iv['group_low']:+.1f}, {100 * iv['group_high']:+.1f}] |" in text


def test_a_held_out_profile_is_scored_whole_and_must_be_held_out_with_the_same_targets(tmp_path: Path) -> None:
    from cpcsam.config import load_config

    builders = load_script("cpcsam_test_data_builders", "tests/data/data_builders.py")
    builders.make_coco(str(tmp_path / "coco"), n_images=6, frames_per_video=2)
    profile = (f"data.profiles.new={{source: coco, root: {tmp_path / 'coco'}, group_pattern: '^(vid_\\d+)_frame', "
               "roles: {target: [bottle]}}")
    params = load_config(ROOT / "params.yaml", [profile])

    held, groups = study.holdout_images(params, "new", {"bottle"}, {"vid_000009"}, tmp_path / "out")

    # every image, none of its entities withheld (the profile's own split would put half in train)
    assert len(held) == 6 and all(len(im.entities) == 3 for im, _ in held)
    assert groups == ["vid_000000"] * 2 + ["vid_000001"] * 2 + ["vid_000002"] * 2
    assert all(pixels.shape[:2] == (48, 64) for _, pixels in held)
    with pytest.raises(SystemExit, match=r"'new' has target classes \['bottle'\], the study's profile \['fish'\]"):
        study.holdout_images(params, "new", {"fish"}, set(), tmp_path / "out2")
    with pytest.raises(SystemExit, match="no data profile 'absent'"):
        study.holdout_images(params, "absent", {"bottle"}, set(), tmp_path / "out3")
    with pytest.raises(SystemExit, match=r"'new' shares 1 group\(s\) with the study's profile \(vid_000001\): not held"):
        study.holdout_images(params, "new", {"bottle"}, {"vid_000001", "vid_000042"}, tmp_path / "out4")
