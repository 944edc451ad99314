"""Embedding cache: same losses as the uncached run; stale or missing caches are refused."""

from __future__ import annotations

import json

import pytest
import torch

from cpcsam.errors import DataError
from cpcsam.training.embeddings import EmbeddingStore
from training_helpers import cache_from_dicts as build_embedding_cache, trainer_from_dicts as prepare_training


@pytest.fixture
def frozen_encoder_params(tiny_params):
    tiny_params["model"]["lora"]["targets"] = ["decoder_attention"]  # no LoRA in the image encoder
    tiny_params["train"]["embedding_cache"] = "auto"
    return tiny_params


def _run(project, params, embeddings_dir, cache: str, steps: int = 5):
    trainer = prepare_training(
        params,
        project["manifest"],
        project["prompts"],
        project["sam_checkpoint"],
        None,
        embeddings_dir=embeddings_dir,
        train_overrides={"embedding_cache": cache, "steps": steps},
    )
    trainer.run(resume=False, progress=False)
    return trainer


def test_cached_training_matches_uncached(tiny_project, frozen_encoder_params, tmp_path) -> None:
    summary = build_embedding_cache(
        frozen_encoder_params, tiny_project["manifest"], tiny_project["sam_checkpoint"], tmp_path, batch_size=3, progress=False
    )
    assert summary == {"enabled": True, "images": 5}
    cached = _run(tiny_project, frozen_encoder_params, tmp_path, "auto")
    uncached = _run(tiny_project, frozen_encoder_params, None, "off")
    assert cached.data.uses_embeddings and not uncached.data.uses_embeddings
    for a, b in zip(cached.curve, uncached.curve, strict=True):
        for key in ("loss_upper", "loss_lower", "task_mean", "entity_attention"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for (name, p), (_, q) in zip(cached.model.named_parameters(), uncached.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_cache_is_not_written_when_the_encoder_trains(tiny_project, tiny_params, tmp_path) -> None:
    tiny_params["train"]["embedding_cache"] = "auto"
    summary = build_embedding_cache(tiny_params, tiny_project["manifest"], tiny_project["sam_checkpoint"], tmp_path)
    assert summary["enabled"] is False and "encoder LoRA=yes" in summary["reason"]
    assert json.loads((tmp_path / "index.json").read_text())["enabled"] is False
    with pytest.raises(DataError, match="wrote no embeddings"):
        EmbeddingStore(tmp_path)


def test_stale_cache_is_refused(tiny_project, frozen_encoder_params, tmp_path) -> None:
    build_embedding_cache(frozen_encoder_params, tiny_project["manifest"], None, tmp_path, progress=False)  # random SAM
    with pytest.raises(DataError, match="another image encoder"):
        _run(tiny_project, frozen_encoder_params, tmp_path, "auto", steps=1)
