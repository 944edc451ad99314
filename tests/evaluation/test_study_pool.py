"""`benchmarks/study.py --pool`: studies of several data splits pooled into one paired estimate."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _study_module():
    spec = importlib.util.spec_from_file_location("cpcsam_study_script", ROOT / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


study = _study_module()
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
