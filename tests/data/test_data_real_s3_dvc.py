"""End to end: the real TrashCan folder, S3 ingestion on moto_server, `dvc repro` of the data stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from data_builders import CLASSES, coco_data_cfg, make_coco

from cpcsam.config import load_config, read_params_file
from cpcsam.data import decode_mask, load_classes, load_manifest, read_image
from cpcsam.data.ingest import run_ingest
from cpcsam.data.schema import validate_manifest


@pytest.mark.shared_data
def test_trashcan_folder(trashcan_dir, project_root, tmp_path) -> None:
    data = read_params_file(project_root / "params.yaml")["data"]
    data = {**data, "profile": "trashcan", "progress": False}
    data["profiles"] = {**data["profiles"], "trashcan": {**data["profiles"]["trashcan"], "root": str(trashcan_dir)}}
    summary = run_ingest(data, tmp_path)
    df = load_manifest(tmp_path / "manifest.parquet")
    classes = load_classes(tmp_path / "classes.json")
    assert len(classes["classes"]) == 22
    assert summary["quarantine"]["n_items"] == 0 and summary["images_read"] == 675
    videos = df.image_uri.map(lambda u: Path(u).name.split("_frame")[0])
    assert videos.groupby(videos).size().size > 10
    assert (df.groupby(videos).split.nunique() == 1).all()  # no video in two splits
    assert validate_manifest(df, classes)["valid"]
    row = df.iloc[0]
    img = read_image(row.image_uri)
    assert img.shape == (row.height, row.width, 3)
    assert decode_mask(row.rle_counts, row.height, row.width).sum() == row.area


@pytest.mark.slow
def test_ingest_from_s3(s3_bucket, tmp_path) -> None:
    root = f"s3://{s3_bucket}/datasets/coco-small"
    built = make_coco(root, n_images=6)
    summary = run_ingest(coco_data_cfg(root), tmp_path / "out")
    df = load_manifest(tmp_path / "out" / "manifest.parquet")
    assert summary["images_read"] == 6 and summary["quarantine"]["n_items"] == 0
    assert df.image_uri.str.startswith(f"s3://{s3_bucket}/datasets/coco-small/images/").all()
    row = df.iloc[0]
    assert read_image(row.image_uri).shape == (48, 64, 3)
    assert np.array_equal(decode_mask(row.rle_counts, 48, 64), built["expected"][int(row.entity_id)])
    assert set(df.class_name) <= set(CLASSES)


def test_profiles_in_params(project_root) -> None:
    data = load_config(project_root / "params.yaml").data
    for name in ("oceancoco", "tiny", "trashcan"):
        assert name in data.profiles
    assert data.selected.source == "synthetic"
    assert data.profiles["tiny"].num_images <= 32


def _copy_repo(project_root: Path, dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=project_root, capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        src = project_root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copytree(project_root / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"), dirs_exist_ok=True)
    (dest / "dvc.lock").unlink(missing_ok=True)


@pytest.mark.slow
def test_dvc_repro_data_stages_twice(project_root, tmp_path) -> None:
    repo = tmp_path / "repo"
    _copy_repo(project_root, repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["profile"] = "tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "CPCSAM_TRACKING": "off", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    first = subprocess.run([*dvc, "repro", "ingest", "validate"], cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'ingest'" in first.stdout and "Running stage 'validate'" in first.stdout
    report = json.loads((repo / "data" / "validate" / "report.json").read_text())
    assert report["valid"]
    summary = json.loads((repo / "data" / "ingest" / "summary.json").read_text())
    assert summary["profile"] == "tiny" and summary["n_images"] > 0
    second = subprocess.run([*dvc, "repro", "ingest", "validate"], cwd=repo, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout
