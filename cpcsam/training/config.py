"""Typed views of the `train:` and `pretrain:` sections of params.yaml, and device selection."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from cpcsam.errors import ConfigError

TRAIN_MODES = ("bilevel", "lora-only", "full-finetune")
HYPERGRADIENTS = ("first-order", "unrolled")
CACHE_CHOICES = ("auto", "on", "off")


def stage_seed(params: Mapping[str, Any], stage: str) -> int:
    """The seed a stage uses: its own `<stage>.seed` mixed with the top-level `seed`.

    Changing the top-level seed re-draws every stage; changing one stage's seed re-draws only it.
    """
    import numpy as np

    top = params.get("seed", 0)
    own = (params.get(stage) or {}).get("seed", 0)
    for name, value in (("seed", top), (f"{stage}.seed", own)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"params {name}: expected a non-negative integer, got {value!r}")
    return int(np.random.SeedSequence([top, own]).generate_state(1)[0])


def apply_threads(threads: int) -> None:
    """`torch.set_num_threads(threads)` when > 0 (called by components, which own the process)."""
    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when available, else cpu; anything else is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"params device: {name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"params device: {name!r} requested but CUDA is not available (use device: auto)")
    return device


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # max global grad norm; null = no clipping

    @classmethod
    def from_params(cls, section: Mapping[str, Any] | None, where: str) -> "OptimConfig":
        section = dict(section or {})
        _no_unknown(section, {f.name for f in dataclasses.fields(cls)}, where)
        try:
            cfg = cls(
                lr=float(section.get("lr", cls.lr)),
                weight_decay=float(section.get("weight_decay", cls.weight_decay)),
                betas=tuple(float(b) for b in section.get("betas", cls.betas)),  # type: ignore[arg-type]
                warmup_steps=int(section.get("warmup_steps", cls.warmup_steps)),
                min_lr_ratio=float(section.get("min_lr_ratio", cls.min_lr_ratio)),
                grad_clip=None if section.get("grad_clip", cls.grad_clip) is None else float(section.get("grad_clip", cls.grad_clip)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"params {where}: {exc}") from exc
        # lr = inf is accepted on purpose: it is how a diverging run is provoked (the trainer stops it).
        if cfg.lr < 0 or math.isnan(cfg.lr):
            raise ConfigError(f"params {where}.lr: must be >= 0, got {cfg.lr}")
        if cfg.warmup_steps < 0 or not 0 <= cfg.min_lr_ratio <= 1:
            raise ConfigError(f"params {where}: warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        return cfg

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of `lr` at optimiser step `step` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_unknown(section: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"params {where}: unknown keys {unknown}; known keys are {sorted(known)}")


@dataclass(frozen=True)
class TrainConfig:
    """The `train:` section: the bi-level trainer and its baselines."""

    seed: int = 0
    mode: str = "bilevel"  # bilevel | lora-only | full-finetune
    hypergradient: str = "first-order"  # first-order | unrolled
    steps: int = 100
    batch_images: int = 2  # images per batch (per level in bilevel mode)
    max_entities: int = 4  # entities per image per batch (a random subset when more)
    # Entities per image in the CaPL (upper) batch; None = max_entities. The CaPL step decodes
    # every entity K times (Eq. 1), so 1 entity x K prompts per image gives it the decoder work
    # of a LoRA step with max_entities = K entities per image.
    upper_max_entities: int | None = None
    lambda_entity: float = 0.6  # λ between Eq. 1 and Eq. 2
    beta_variance: float = 0.1  # β of the variance term of Eq. 1
    lambda_l1: float = 0.01  # λ₁ of the calibration L1 penalty in Eq. 2
    capl_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    sam_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.01))
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    device: str = "auto"
    amp: bool = False  # autocast (bfloat16 on CPU, float16 + GradScaler on CUDA)
    embedding_cache: str = "auto"  # auto: read data/embeddings when the encoder carries no LoRA
    cache_mb: float = 512.0  # in-memory cache of preprocessed images / embeddings
    log_every: int = 5
    threads: int = 0  # torch intra-op threads set by the component; 0 = torch's default

    @classmethod
    def from_params(cls, section: Mapping[str, Any] | None) -> "TrainConfig":
        section = dict(section or {})
        _no_unknown(section, {f.name for f in dataclasses.fields(cls)}, "train")
        plain = {k: v for k, v in section.items() if k not in ("capl_optim", "sam_optim")}
        try:
            cfg = dataclasses.replace(
                cls(),
                **plain,
                capl_optim=OptimConfig.from_params(section.get("capl_optim"), "train.capl_optim"),
                sam_optim=OptimConfig.from_params(section.get("sam_optim"), "train.sam_optim"),
            )
        except TypeError as exc:
            raise ConfigError(f"params train: {exc}") from exc
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ConfigError(f"params train.mode: {self.mode!r} is not one of {list(TRAIN_MODES)}")
        if self.hypergradient not in HYPERGRADIENTS:
            raise ConfigError(f"params train.hypergradient: {self.hypergradient!r} is not one of {list(HYPERGRADIENTS)}")
        if self.embedding_cache not in CACHE_CHOICES:
            raise ConfigError(f"params train.embedding_cache: {self.embedding_cache!r} is not one of {list(CACHE_CHOICES)}")
        for key in ("steps", "batch_images", "max_entities", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"params train.{key}: expected a positive integer, got {value!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"params train.threads: expected 0 (torch default) or a positive integer, got {self.threads!r}")
        if self.upper_max_entities is not None and (
            not isinstance(self.upper_max_entities, int) or self.upper_max_entities < 1
        ):
            raise ConfigError(f"params train.upper_max_entities: expected null or a positive integer, got {self.upper_max_entities!r}")
        for key in ("lambda_entity", "beta_variance", "lambda_l1"):
            if float(getattr(self, key)) < 0:
                raise ConfigError(f"params train.{key}: must be >= 0, got {getattr(self, key)!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PretrainConfig:
    """The `pretrain:` section: SAM trained from scratch on GT-derived prompts (SA-1B stand-in)."""

    seed: int = 0
    steps: int = 300
    batch_images: int = 4
    max_entities: int = 6
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.01, warmup_steps=20))
    sigma_box: float = 0.1  # box noise of the random prompts
    kinds: Mapping[str, float] = field(default_factory=lambda: {"box": 0.5, "points": 0.25, "box+points": 0.25})
    iou_loss_weight: float = 1.0
    prompt_slots: int = 8  # point slots per prompt (box 2 + up to 3 positives + 2 negatives fit)
    device: str = "auto"
    amp: bool = False
    cache_mb: float = 512.0
    log_every: int = 10
    threads: int = 0  # torch intra-op threads set by the component; 0 = torch's default

    @classmethod
    def from_params(cls, section: Mapping[str, Any] | None) -> "PretrainConfig":
        section = dict(section or {})
        _no_unknown(section, {f.name for f in dataclasses.fields(cls)}, "pretrain")
        plain = {k: v for k, v in section.items() if k != "optim"}
        try:
            cfg = dataclasses.replace(cls(), **plain, optim=OptimConfig.from_params(section.get("optim"), "pretrain.optim"))
        except TypeError as exc:
            raise ConfigError(f"params pretrain: {exc}") from exc
        for key in ("steps", "batch_images", "max_entities", "log_every"):
            value = getattr(cfg, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"params pretrain.{key}: expected a positive integer, got {value!r}")
        if not isinstance(cfg.threads, int) or cfg.threads < 0:
            raise ConfigError(f"params pretrain.threads: expected 0 (torch default) or a positive integer, got {cfg.threads!r}")
        if cfg.prompt_slots < 7:
            raise ConfigError(f"params pretrain.prompt_slots: a box and 5 points need 7 slots, got {cfg.prompt_slots}")
        if not cfg.kinds or any(float(v) < 0 for v in cfg.kinds.values()) or sum(map(float, cfg.kinds.values())) <= 0:
            raise ConfigError(f"params pretrain.kinds: expected kind -> probability with a positive sum, got {cfg.kinds!r}")
        return cfg
