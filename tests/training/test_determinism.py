"""Same params and code → the same bytes in every out, across fresh processes (on the CPU).

Runs the pipeline steps that learn (`pretrain` from scratch on the corpus, `train` of a
variant) twice each, in new processes, on the `tiny` profile with a tiny SAM, and compares the
SHA-256 of their outs. Wall times go to files that are not outs (`timing.json`), so they may
differ; nothing DVC caches may.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cpcsam.config import read_params_file

ROOT = Path(__file__).resolve().parents[2]

TINY_SIZES = {
    "image_size": 128, "patch_size": 16, "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
    "encoder_window_size": 4, "encoder_global_attn_indexes": [1], "prompt_embed_dim": 32, "decoder_depth": 2,
    "decoder_mlp_dim": 64, "decoder_num_heads": 2, "iou_head_hidden_dim": 32,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _step(cwd: Path, *args: str, omp_threads: int = 1) -> None:
    env = {**os.environ, "CPCSAM_TRACKING": "off", "OMP_NUM_THREADS": str(omp_threads)}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("determinism")
    raw = read_params_file(ROOT / "params.yaml")
    raw["data"]["profile"] = "tiny"
    raw["data"]["progress"] = False
    raw["model"].update(type="small", checkpoint=None, sizes={"small": TINY_SIZES})
    raw["pretrain"].update(steps=6, batch_images=2, max_entities=3, val_every=3, val_images=2, checkpoint_every=3)
    raw["train"].update(steps=3, batch_images=2, max_entities=2, checkpoint_every=2, device="cpu")
    raw["tracking"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _step(root, "components.ingest", "--out", "data/ingest")
    _step(root, "components.perturb", "--out", "data/prompts")
    return root


def test_pretrain_and_train_give_the_same_bytes_twice(project: Path) -> None:
    """The second run has another OMP_NUM_THREADS (the machine's setting, as `make run` leaves it):
    each stage pins its own threads, so no out may depend on it. (Export's parity report once did:
    tests/export/test_export_component.py checks it with a model large enough to show it.)"""
    hashes = []
    for attempt, omp in enumerate((1, 2)):
        out = "run"  # the same paths both times: reports name their inputs
        _step(project, "components.pretrain", "--out", f"{out}/pretrain", omp_threads=omp)
        _step(project, "components.embed", "--sam", f"{out}/pretrain/sam.pth", "--out", f"{out}/embeddings",
              omp_threads=omp)
        _step(project, "components.train", "--variant", "cpcsam", "--sam", f"{out}/pretrain/sam.pth",
              "--embeddings", f"{out}/embeddings", "--out", f"{out}/train", "--checkpoints", f"{out}/checkpoints",
              omp_threads=omp)
        files = ["pretrain/sam.pth", "pretrain/metrics.json", "pretrain/curve.json",
                 "train/model.pt", "train/metrics.json", "train/curve.csv"]
        hashes.append({f: _sha(project / out / f) for f in files})
        shutil.move(project / out, project / f"{out}{attempt}")
    differ = {f: (hashes[0][f][:8], hashes[1][f][:8]) for f in hashes[0] if hashes[0][f] != hashes[1][f]}
    assert not differ, f"outs that differ between the two runs: {differ}"
