"""Splits by group, base/target roles, withheld target entities, and the schema's rules."""

from __future__ import annotations

import pandas as pd
import pytest

from cpcsam.data.ingest import run_ingest
from cpcsam.data.manifest import assign_roles, assign_splits, load_classes, load_manifest
from cpcsam.data.schema import failure_message, validate_manifest
from cpcsam.errors import ConfigError, DataError

TINY = {
    "profile": "tiny",
    "progress": False,
    "split": {"seed": 0, "ratios": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "roles": {"seed": 0, "target_ratio": 0.34},
    "profiles": {"tiny": {"source": "synthetic", "seed": 0, "num_images": 24, "width": 96, "height": 72,
                          "frames_per_dive": 2, "min_entities": 2, "max_entities": 4,
                          "classes": ["fish", "jellyfish", "starfish", "crab", "sea_urchin", "bottle"]}},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    summary = run_ingest(TINY, out)
    return summary, load_manifest(out / "manifest.parquet"), load_classes(out / "classes.json")


def test_assign_splits_keeps_groups_whole_and_follows_ratios() -> None:
    sizes = {f"g{i}": 1 + i % 4 for i in range(40)}
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    a = assign_splits(sizes, ratios, seed=1)
    assert a == assign_splits(sizes, ratios, seed=1) and a != assign_splits(sizes, ratios, seed=2)
    total = sum(sizes.values())
    for split, r in ratios.items():
        n = sum(sizes[g] for g, s in a.items() if s == split)
        assert abs(n - r * total) <= 4  # within one group of the target


def test_assign_roles_lists_and_ratio() -> None:
    names = ["a", "b", "c", "d", "e", "f"]
    counts = {n: {"train": 3, "val": 1, "test": 1} for n in names}
    counts["f"] = {"train": 5}  # never in evaluation: cannot be drawn as target
    roles = assign_roles(names, counts, {"target": ["b", "c"]}, ["val", "test"])
    assert [n for n, r in roles.items() if r == "target"] == ["b", "c"]
    drawn = assign_roles(names, counts, {"target_ratio": 0.34, "seed": 0}, ["val", "test"])
    targets = [n for n, r in drawn.items() if r == "target"]
    assert len(targets) == 2 and "f" not in targets
    with pytest.raises(ConfigError, match="both base and target"):
        assign_roles(names, counts, {"target": ["a"], "base": ["a"]}, ["val"])
    with pytest.raises(ConfigError, match="unknown class"):
        assign_roles(names, counts, {"target": ["zebra"]}, ["val"])


def test_tiny_manifest_follows_the_contract(tiny) -> None:
    summary, df, classes = tiny
    assert validate_manifest(df, classes)["valid"]
    assert set(df.split) == {"train", "val", "test"}
    assert df.groupby("group_id").split.nunique().max() == 1
    assert not ((df.split == "train") & (df.role == "target")).any()
    assert classes["target"] and set(classes["base"]).isdisjoint(classes["target"])
    # every withheld entity is accounted for: ids reported, class is target, image is in train
    withheld = summary["withheld_target_in_train"]
    assert withheld["count"] == len(withheld["entities"]) > 0
    train_images = set(df.loc[df.split == "train", "image_id"]) | set(
        summary["train_images_left_without_entities"]["image_ids"])
    for ent in withheld["entities"]:
        assert ent["class_name"] in classes["target"] and ent["image_id"] in train_images
        assert ent["entity_id"] not in set(df.entity_id)


def test_leakage_manifest_fails_naming_rows_and_rules(tiny) -> None:
    _, df, classes = tiny
    bad = df.copy()
    leak = bad.index[(bad.role == "target")][0]
    bad.loc[leak, "split"] = "train"
    bad.loc[0, "bbox_w"] = float(bad.loc[0, "width"]) + 5
    report = validate_manifest(bad, classes)
    assert not report["valid"]
    rules = {f["rule"]: f for f in report["failures"]}
    assert rules["no_target_in_train"]["rows"] == [leak]
    assert rules["no_target_in_train"]["entity_ids"] == [df.entity_id[leak]]
    assert "group_in_one_split" in rules and leak in rules["group_in_one_split"]["rows"]
    assert rules["bbox_inside_image"]["rows"] == [0]
    msg = failure_message(report)
    assert "no_target_in_train" in msg and str(df.entity_id[leak]) in msg


def test_class_table_rules(tiny) -> None:
    _, df, classes = tiny
    target = classes["target"][0]
    overlapping = {**classes, "base": classes["base"] + [target]}
    rules = {f["rule"] for f in validate_manifest(df, overlapping)["failures"]}
    assert "base_target_disjoint" in rules
    no_target = {**classes, "target": []}
    assert "target_classes_nonempty" in {f["rule"] for f in validate_manifest(df, no_target)["failures"]}
    missing = df[~((df.class_name == target) & (df.split == "test"))]
    report = validate_manifest(missing, classes)
    assert any(f["rule"] == "target_in_evaluation_splits" and target in f["classes"] for f in report["failures"])


def test_wrong_types_and_values_fail(tiny) -> None:
    _, df, classes = tiny
    bad = df.copy()
    bad.loc[1, "split"] = "holdout"
    bad.loc[2, "area"] = 0
    bad.loc[3, "entity_id"] = bad.loc[4, "entity_id"]
    bad.loc[5, "rle_counts"] = "0"
    rules = " ".join(f["rule"] for f in validate_manifest(bad, classes)["failures"])
    for expected in ("split", "area", "entity_id", "rle_matches_image_size"):
        assert expected in rules
    assert "column_in_dataframe" in " ".join(
        f["rule"] for f in validate_manifest(df.drop(columns=["group_id"]), classes)["failures"])


def test_empty_evaluation_split_fails_ingestion(tmp_path) -> None:
    cfg = {**TINY, "split": {"seed": 0, "ratios": {"train": 0.98, "val": 0.01, "test": 0.01}}}
    cfg["profiles"] = {"tiny": {**TINY["profiles"]["tiny"], "num_images": 4, "frames_per_dive": 2}}
    with pytest.raises(DataError, match="cannot draw|is empty|no entity"):
        run_ingest(cfg, tmp_path)


def test_the_manifest_is_the_same_bytes_anywhere_and_follows_its_folder(tmp_path) -> None:
    """Generated images are referenced relative to the manifest: ingest in two places gives the same
    bytes (so every clone gets the same dvc.lock), and a copy of the out elsewhere (DVC restoring it
    into another worktree) reads its own images after the original is gone."""
    import shutil

    from cpcsam.data import read_image

    first, second = tmp_path / "a" / "ingest", tmp_path / "b" / "deeper" / "ingest"
    run_ingest(TINY, first)
    run_ingest(TINY, second)
    assert (first / "manifest.parquet").read_bytes() == (second / "manifest.parquet").read_bytes()
    moved = tmp_path / "c" / "ingest"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    df = load_manifest(moved / "manifest.parquet")
    assert all(uri.startswith(str(moved)) for uri in df["image_uri"])
    assert read_image(df["image_uri"].iloc[0]).shape[:2] == (int(df["height"].iloc[0]), int(df["width"].iloc[0]))
