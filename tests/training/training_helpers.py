"""The training tests' bridge from their dict params to the typed sections the library takes."""

from __future__ import annotations

from typing import Any, Mapping

from cpcsam.config import EmbedConfig, ModelConfig, PerturbConfig, TrainConfig
from cpcsam.training.run import build_embedding_cache, prepare_training


def trainer_from_dicts(params: Mapping[str, Any], manifest, prompts, sam, out_dir, train_overrides=None, **kwargs):
    """`prepare_training` from a params dict (the train section's own seed is used as is)."""
    train = TrainConfig.from_params({**params["train"], **(train_overrides or {})})
    return prepare_training(train, ModelConfig.from_params(params["model"]), PerturbConfig.from_params(params["perturb"]),
                            manifest, prompts, sam, out_dir, **kwargs)


def cache_from_dicts(params: Mapping[str, Any], manifest, sam, out_dir, batch_size: int = 4, progress: bool = True):
    return build_embedding_cache(TrainConfig.from_params(params["train"]), ModelConfig.from_params(params["model"]),
                                 EmbedConfig(batch_size=batch_size, device="cpu"), manifest, sam, out_dir, progress=progress)
