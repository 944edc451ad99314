"""The perturb / pretrain / embed / train components end to end on the tiny project."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from components import embed, perturb, pretrain, train
from cpcsam.config import read_params_file
from cpcsam.modeling import build_sam, load_cpcsam
from cpcsam.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tiny_project, tiny_params, tmp_path) -> Path:
    """The project's params.yaml with the tiny model and budgets (a whole, valid params tree)."""
    tiny = copy.deepcopy(tiny_params)
    params = read_params_file(ROOT / "params.yaml")
    params["tracking"] = {"enabled": False}
    params["variants"] = ["cpcsam", "lora_only"]
    model = {k: v for k, v in tiny["model"].items() if k != "capl"}
    model["capl"] = {k: v for k, v in tiny["model"]["capl"].items() if k != "mode"}
    model["lora"]["targets"] = ["decoder_attention"]  # frozen encoder: embed writes a cache
    params["model"] = model
    params["perturb"] = tiny["perturb"]
    params["pretrain"] = {**tiny["pretrain"], "val_every": 0}
    train_section = {k: v for k, v in tiny["train"].items() if k != "mode"}
    params["train"] = {**train_section, "steps": 3, "embedding_cache": "auto", "checkpoint_every": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _args(workdir: Path, *extra: str) -> list[str]:
    return ["--params", str(workdir / "params.yaml"), *extra]


def test_stages_chain_end_to_end(tiny_project, workdir, capsys) -> None:
    manifest = str(tiny_project["root"] / "manifest.parquet")
    prompts, pre, emb, out = (workdir / d for d in ("prompts", "pretrain", "embeddings", "train"))

    assert perturb.main(_args(workdir, "--manifest", manifest, "--out", str(prompts))) == 0
    table = load_prompts(prompts / "prompts.parquet")
    assert len(table) == 3 * table["entity_id"].nunique()

    assert pretrain.main(_args(workdir, "--out", str(pre))) == 0
    metrics = json.loads((pre / "metrics.json").read_text())
    assert metrics["source"] == "pretrained-here" and metrics["steps"] == 4
    state = torch.load(pre / "sam.pth", weights_only=True)
    build_sam({**workdir_params(workdir)["model"], "checkpoint": str(pre / "sam.pth")})  # strict load
    assert all(not k.startswith("capl") and "lora_" not in k for k in state)

    sam = str(pre / "sam.pth")
    assert embed.main(_args(workdir, "--manifest", manifest, "--sam", sam, "--out", str(emb))) == 0
    assert json.loads((emb / "index.json").read_text())["enabled"] is True

    train_args = ["--manifest", manifest, "--prompts", str(prompts / "prompts.parquet"), "--sam", sam,
                  "--embeddings", str(emb), "--checkpoints", str(workdir / "checkpoints"), "--out", str(out)]
    assert train.main(_args(workdir, *train_args)) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 3 and summary["cached_embeddings"] is True
    curve = pd.read_csv(out / "curve.csv")
    assert list(curve["step"]) == [1, 2, 3] and curve["loss_upper"].notna().all()
    model = load_cpcsam(out / "model.pt")
    assert model.mode == "causal"
    capsys.readouterr()

    # a baseline variant: its own trainer mode, no CaPL
    base = workdir / "lora_only"
    assert train.main(_args(workdir, *train_args[:-2], "--variant", "lora_only", "--out", str(base))) == 0
    assert load_cpcsam(base / "model.pt").mode == "fixed"
    assert json.loads((base / "metrics.json").read_text())["mode"] == "lora-only"
    # a variant that is not in `variants` is refused
    assert train.main(_args(workdir, *train_args[:-2], "--variant", "task", "--out", str(workdir / "t"))) == 2


def workdir_params(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "params.yaml").read_text())


def test_pretrain_adopts_a_real_checkpoint(tiny_project, workdir, tmp_path) -> None:
    """`model.checkpoint` set: no training, the file is checked strictly and becomes sam.pth."""
    params = workdir_params(workdir)
    torch.manual_seed(5)
    official = tmp_path / "official_small.pth"
    torch.save(build_sam(params["model"]).state_dict(), official)
    out = tmp_path / "pretrain"
    args = _args(workdir, "--out", str(out), "-S", f"model.checkpoint={official}")
    assert pretrain.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"] == "checkpoint" and metrics["checkpoint"] == str(official)
    assert (out / "sam.pth").read_bytes() == official.read_bytes()

    broken = tmp_path / "broken.pth"
    state = torch.load(official, weights_only=True)
    state.pop(next(iter(state)))
    torch.save(state, broken)
    args[-1] = f"model.checkpoint={broken}"
    assert pretrain.main(args) == 2


def test_bad_input_is_one_line_and_exit_2(tiny_project, workdir, capsys) -> None:
    manifest = str(tiny_project["root"] / "manifest.parquet")
    assert perturb.main(_args(workdir, "--manifest", manifest, "--out", str(workdir / "p"), "-S", "perturb.k=0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("perturb: ") and "perturb.k: Input should be greater than or equal to 1" in err[0]
    assert train.main(_args(workdir, "--manifest", manifest, "--prompts", str(workdir / "missing.parquet"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.parquet" in err[0] and err[0].startswith("train: ")


def test_a_full_disk_leaves_no_partial_out_and_one_clear_line(tiny_project, workdir, capsys, monkeypatch) -> None:
    """The disk fills while an out is written (ENOSPC at the flush, where delayed allocation reports
    it): the stage exits 1 with one line saying so, and neither the out nor a temporary file remains."""
    import errno
    import os

    from cpcsam import files

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    out = workdir / "p"
    manifest = str(tiny_project["root"] / "manifest.parquet")
    assert perturb.main(_args(workdir, "--manifest", manifest, "--out", str(out))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: the progress bar)
    assert last.startswith("perturb: no space left on the device while writing") and "prompts.parquet" in last
    assert not out.exists() or list(out.iterdir()) == []  # no prompts.parquet, no temporary file
