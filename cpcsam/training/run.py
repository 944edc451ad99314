"""Putting a training run together from params.yaml sections and files (what the components call).

    trainer = prepare_training(params, manifest, prompts, sam_checkpoint, out_dir, embeddings_dir)
    summary = trainer.run()
    save_cpcsam(out_dir / "model.pt", trainer.model, training_model_cfg(params["model"], ...))

Library code: no MLflow/DVC here; the metric logger is passed in.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from cpcsam.errors import ConfigError, DataError
from cpcsam.training.bilevel import Trainer, run_fingerprint
from cpcsam.training.config import TrainConfig
from cpcsam.training.data import TablePrompts, TrainingImages
from cpcsam.training.logging import MetricLogger

logger = logging.getLogger(__name__)

ENCODER_LORA_TARGET = "image_encoder_qkv"


def training_model_cfg(model_section: Mapping[str, Any], mode: str, sam_checkpoint: str | Path | None) -> dict[str, Any]:
    """The `model` section as used by a training mode: baselines get `capl.mode = fixed`."""
    cfg = dict(model_section)
    cfg["checkpoint"] = str(sam_checkpoint) if sam_checkpoint else None
    capl = dict(cfg.get("capl") or {})
    if mode != "bilevel":
        capl["mode"] = "fixed"  # lora-only / full-finetune: plain SAM prompts, no CaPL
    cfg["capl"] = capl
    return cfg


def build_training_model(model_section: Mapping[str, Any], mode: str, sam_checkpoint: str | Path | None):
    """SAM (from `sam_checkpoint`) + CaPL, with LoRA adapters in the bilevel and lora-only modes."""
    from cpcsam.modeling import build_cpcsam

    cfg = training_model_cfg(model_section, mode, sam_checkpoint)
    return build_cpcsam(cfg, with_lora=mode in ("bilevel", "lora-only"))


def encoder_is_frozen(model_section: Mapping[str, Any], mode: str) -> bool:
    """True when training never changes the image encoder, so its embeddings can be cached."""
    if mode == "full-finetune":
        return False
    targets = (model_section.get("lora") or {}).get("targets")
    if targets is None:
        from cpcsam.modeling.lora import DEFAULT_LORA_CFG

        targets = DEFAULT_LORA_CFG["targets"]
    return ENCODER_LORA_TARGET not in targets


def use_embedding_cache(model_section: Mapping[str, Any], train_cfg: TrainConfig) -> bool:
    """Whether training reads `data/embeddings/` (`train.embedding_cache`: auto | on | off)."""
    frozen = encoder_is_frozen(model_section, train_cfg.mode)
    if train_cfg.embedding_cache == "on" and not frozen:
        raise ConfigError(
            "train.embedding_cache: on needs a frozen image encoder; remove "
            f"{ENCODER_LORA_TARGET!r} from model.lora.targets or use mode lora-only/bilevel (not full-finetune)"
        )
    return train_cfg.embedding_cache == "on" or (train_cfg.embedding_cache == "auto" and frozen)


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a local file (the SAM weights a run starts from), None for no file."""
    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        return str(path)  # e.g. an s3:// URI: its name identifies it
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_training(
    params: Mapping[str, Any],
    manifest: Any,
    prompts_table: Any,
    sam_checkpoint: str | Path | None,
    out_dir: str | Path | None,
    embeddings_dir: str | Path | None = None,
    metric_logger: MetricLogger | None = None,
    train_overrides: Mapping[str, Any] | None = None,
) -> Trainer:
    """A ready `Trainer` for the `train` section of `params` (with optional overrides)."""
    from cpcsam.prompts.perturb import PerturbConfig
    from cpcsam.training.embeddings import EmbeddingStore, encoder_fingerprint

    train_section = {**(params.get("train") or {}), **(train_overrides or {})}
    cfg = TrainConfig.from_params(train_section)
    model_section = params.get("model") or {}
    perturb = PerturbConfig.from_params(params.get("perturb") or {})
    # LoRA's A matrices (and SAM itself without a checkpoint) are randomly initialised.
    torch.manual_seed(cfg.seed)
    model = build_training_model(model_section, cfg.mode, sam_checkpoint)
    cached = use_embedding_cache(model_section, cfg)
    store = None
    if cached:
        if embeddings_dir is None:
            raise ConfigError("train: the embedding cache is in use but no embeddings folder was given")
        store = EmbeddingStore(embeddings_dir, encoder_fingerprint(model.sam.image_encoder))
    grid = model.embedding_size[0]
    data = TrainingImages(manifest, model.image_size, 4 * grid, cache_mb=cfg.cache_mb, embeddings=store)
    if store is not None:
        missing = store.covers(data.image_ids)
        if missing:
            raise DataError(f"{embeddings_dir}: no cached embeddings for {len(missing)} training images (e.g. {missing[:3]}); re-run the embed stage")
    prompts = TablePrompts(prompts_table, perturb.k, perturb.prompt_slots)
    prompts.check_covers(data)
    fingerprint = run_fingerprint(
        cfg.as_dict(),
        training_model_cfg(model_section, cfg.mode, None),
        {"k": perturb.k, "slots": perturb.prompt_slots},
        sorted((e.entity_id, row.image_id) for row in data.images.values() for e in row.entities),
        prompts_digest(prompts_table),
        file_digest(sam_checkpoint),
        cached,
    )
    return Trainer(model, cfg, data, prompts, out_dir, metric_logger, fingerprint=fingerprint)


def prompts_digest(table: Any) -> str:
    """A hash of the prompt table's content (a changed perturb stage invalidates checkpoints)."""
    import pandas as pd

    hashed = pd.util.hash_pandas_object(table[["entity_id", "k", "kind"]].astype(str), index=False)
    digest = hashlib.sha256(hashed.values.tobytes())
    for coords in table["coords"]:
        digest.update(repr(list(coords)).encode())
    return digest.hexdigest()


def build_embedding_cache(
    params: Mapping[str, Any],
    manifest: Any,
    sam_checkpoint: str | Path | None,
    out_dir: str | Path,
    batch_size: int = 4,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """The `embed` stage: cache the training images' embeddings when training can use them.

    The encoder is built exactly as `prepare_training` builds it (same seed, same checkpoint),
    so the fingerprint matches. When the cache does not apply (the encoder trains), an index
    saying so is written instead. Returns a small summary.
    """
    from cpcsam.training.config import resolve_device
    from cpcsam.training.embeddings import encoder_fingerprint, write_disabled_index, write_embeddings

    cfg = TrainConfig.from_params(params.get("train") or {})
    model_section = params.get("model") or {}
    if not use_embedding_cache(model_section, cfg):
        reason = (
            f"train.embedding_cache={cfg.embedding_cache}, mode={cfg.mode}, "
            f"encoder LoRA={'yes' if not encoder_is_frozen(model_section, cfg.mode) else 'no'}"
        )
        write_disabled_index(out_dir, reason)
        logger.info("embed: no cache (%s)", reason)
        return {"enabled": False, "reason": reason, "images": 0}
    torch.manual_seed(cfg.seed)
    model = build_training_model(model_section, cfg.mode, sam_checkpoint)
    target = resolve_device(device)
    model.to(target).eval()
    data = TrainingImages(manifest, model.image_size, 4 * model.embedding_size[0], cache_mb=0)
    write_embeddings(
        model.encode_images,
        data.preprocessed_image,
        data.image_ids,
        out_dir,
        encoder_fingerprint(model.sam.image_encoder),
        batch_size=batch_size,
        device=target,
        progress=progress,
    )
    return {"enabled": True, "images": len(data.image_ids)}
