"""The pipeline's configuration: one typed tree for `params.yaml`, parsed once.

Every section is a pydantic model that refuses unknown keys (`extra="forbid"`) and holds its
defaults here and nowhere else; `load_config` reads the file, applies `key.sub=value` overrides
and validates the whole tree before any stage does work, so a typo anywhere (`model.checkpont`)
fails at once with one message that names the key and the closest valid one. Components hand each
library function its own typed section. Seeds follow one rule, `Params.stage_seed`.

Models are frozen: a stage cannot quietly patch a section another stage reads; a changed copy is
made explicitly with `model_copy(update=...)`.
"""

from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cpcsam.errors import ConfigError

DEFAULT_PARAMS = "params.yaml"

PromptKind = Literal["box", "points", "box+points"]
PROMPT_KINDS: tuple[str, ...] = ("box", "points", "box+points")
SplitName = Literal["train", "val", "test"]
Device = str  # "auto" | "cpu" | "cuda[:N]": checked where a device is made (`resolve_device`)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)
    SECTION: ClassVar[str] = ""  # where the section sits in params.yaml, for messages
    # How a run executes, not what it computes: left out of `as_dict`, the part of a run's
    # fingerprint a checkpoint must match to be resumed.
    EXECUTION_KEYS: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.EXECUTION_KEYS))

    @classmethod
    def from_params(cls, section: Any, where: str | None = None) -> Any:
        """Validate one section (a mapping; None = all defaults), ConfigError naming each bad key."""
        try:
            return cls.model_validate(section or {})
        except ValidationError as exc:
            prefix = where if where is not None else cls.SECTION or cls.__name__
            raise ConfigError("params: " + "; ".join(_describe(err, top=cls, prefix=prefix) for err in exc.errors())) from None


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


class OptimConfig(Section):
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 1e-3  # inf is accepted on purpose: how a diverging run is provoked (the trainer stops it)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = 1.0  # max global grad norm; null = no clipping

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        if value < 0 or math.isnan(value):
            raise ValueError(f"must be >= 0, got {value}")
        return value

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of `lr` at optimiser step `step` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _kind_probs(kinds: dict[str, float]) -> dict[str, float]:
    if not kinds or any(v < 0 for v in kinds.values()) or sum(kinds.values()) <= 0:
        raise ValueError(f"expected kind -> probability (>= 0) with a positive sum, got {kinds!r}")
    return kinds


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class SplitConfig(Section):
    """By group (dive / video), whole groups only; images follow their group."""

    seed: int = Field(0, ge=0)
    ratios: dict[SplitName, float] = {"train": 0.7, "val": 0.15, "test": 0.15}


class RolesConfig(Section):
    """Base/target by class: explicit lists win, else a seeded ratio."""

    seed: int = Field(0, ge=0)
    target: list[str] = []
    base: list[str] = []  # optional; with it, classes in neither list are left out
    target_ratio: float = Field(0.34, ge=0, le=1)


class SplitOverride(Section):
    seed: int | None = None
    ratios: dict[SplitName, float] | None = None


class RolesOverride(Section):
    seed: int | None = None
    target: list[str] | None = None
    base: list[str] | None = None
    target_ratio: float | None = None


class _Profile(Section):
    split: SplitOverride | None = None  # overrides data.split key by key
    roles: RolesOverride | None = None  # overrides data.roles key by key
    progress: bool | None = None  # None: data.progress


class SyntheticProfile(_Profile):
    """The embedded default: synthetic deep-sea dives (`cpcsam.data.sources.synthetic`)."""

    source: Literal["synthetic"]
    seed: int = Field(0, ge=0)
    num_images: int = Field(240, ge=1)
    width: int = Field(320, ge=32)
    height: int = Field(240, ge=32)
    frames_per_dive: int = Field(4, ge=1)
    min_entities: int = Field(1, ge=1)
    max_entities: int = Field(5, ge=1)
    confounder_strength: float = Field(0.6, ge=0, le=1)
    min_entity_area: int | None = None  # None: max(12, width * height // 2000)
    classes: list[str] | None = None  # None: every class of the generator

    @model_validator(mode="after")
    def _entities(self) -> "SyntheticProfile":
        if self.min_entities > self.max_entities:
            raise ValueError("need min_entities <= max_entities")
        return self


class _FileProfile(_Profile):
    root: str  # a local folder or s3://bucket/prefix
    images_dir: str = "images"
    group_pattern: str | None = None  # regex whose group 1 is the split group of a file name
    follow_symlinks: bool = False  # links leaving `root` are quarantined unless this is set
    data_version: str | None = None  # a tag of the raw data's version: a new one re-runs ingest (flows/retrain.py)


class CocoProfile(_FileProfile):
    source: Literal["coco"]
    annotations: str = "annotations.json"


class SemanticMasksProfile(_FileProfile):
    source: Literal["semantic_masks"]
    masks_dir: str = "masks"
    class_map: str = "classes.txt"
    ignore_classes: list[str] = ["background"]
    ignore_index: int = 255
    entities: Literal["per_class", "components"] = "per_class"
    min_component_area: int = Field(1, ge=1)
    mask_suffix: str = ".png"


class BinaryMasksProfile(_FileProfile):
    source: Literal["binary_masks"]
    masks_dir: str = "masks"
    layout: Literal["class_dirs", "suffix"] = "class_dirs"
    mask_suffix: str = ".png"
    classes: list[str] | None = None


Profile = Annotated[
    Union[SyntheticProfile, CocoProfile, SemanticMasksProfile, BinaryMasksProfile], Field(discriminator="source")
]


class DataConfig(Section):
    SECTION: ClassVar[str] = "data"

    profile: str = "oceancoco"
    max_pixels: int = Field(40_000_000, ge=1)  # an image over this many pixels is quarantined
    max_quarantine_fraction: float = Field(0.1, ge=0, le=1)
    eval_splits: list[SplitName] = ["val", "test"]
    progress: bool = True
    split: SplitConfig = SplitConfig()
    roles: RolesConfig = RolesConfig()
    profiles: dict[str, Profile] = {}

    @model_validator(mode="after")
    def _profile_exists(self) -> "DataConfig":
        if self.profile not in self.profiles:
            near = difflib.get_close_matches(self.profile, list(self.profiles), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"profile {self.profile!r} is not an entry of data.profiles {sorted(self.profiles)}{hint}")
        return self

    @property
    def selected(self) -> Any:
        return self.profiles[self.profile]

    def resolved_split(self) -> SplitConfig:
        over = self.selected.split
        return self.split if over is None else self.split.model_copy(update=over.model_dump(exclude_none=True))

    def resolved_roles(self) -> RolesConfig:
        over = self.selected.roles
        return self.roles if over is None else self.roles.model_copy(update=over.model_dump(exclude_none=True))

    def progress_bars(self) -> bool:
        return self.progress if self.selected.progress is None else self.selected.progress


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

SamType = Literal["small", "base_small", "vit_b", "vit_l", "vit_h"]
CaplMode = Literal["fixed", "learnable", "task", "entity", "causal"]
TaskContext = Literal["all_groups", "own_group"]
LoraTarget = Literal["image_encoder_qkv", "decoder_attention"]


class ArchOverrides(Section):
    """Overrides of a CPU configuration's sizes (`cpcsam.modeling.build.ARCHS`); unset = built-in."""

    image_size: int | None = None
    patch_size: int | None = None
    encoder_embed_dim: int | None = None
    encoder_depth: int | None = None
    encoder_num_heads: int | None = None
    encoder_window_size: int | None = None
    encoder_global_attn_indexes: tuple[int, ...] | None = None
    prompt_embed_dim: int | None = None
    mask_in_chans: int | None = None
    decoder_depth: int | None = None
    decoder_mlp_dim: int | None = None
    decoder_num_heads: int | None = None
    iou_head_hidden_dim: int | None = None
    mask_refine_stages: int | None = None  # extra ×2 mask upsampling stages (cpcsam.modeling.refine)
    mask_refine_hidden: int | None = None


class CaplConfig(Section):
    """Causal Prompt Learner (`cpcsam.modeling.capl`)."""

    SECTION: ClassVar[str] = "model.capl"

    mode: CaplMode = "causal"  # prompt-embedding ablation
    task_hidden: int = Field(128, ge=1)  # hidden width of the task causal MLP g_φ
    task_context: TaskContext = "all_groups"  # ē of g_φ: mean over the entity's K groups | its own group only
    task_image_features: bool = False  # g_φ also reads the image embedding where each prompt token points
    entity_hidden: int = Field(64, ge=1)  # hidden width of h_φ (one per cross-attention site)
    entity_rank: int = Field(8, ge=1)  # rank r of the entity calibration s = q·k/√r


class LoraConfig(Section):
    """PEFT LoRA on SAM (`cpcsam.modeling.lora`)."""

    SECTION: ClassVar[str] = "model.lora"

    rank: int = Field(4, ge=1)
    alpha: float = 4
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[LoraTarget] = Field(default_factory=lambda: ["image_encoder_qkv", "decoder_attention"], min_length=1)


class CropConfig(Section):
    """Focus crop: each entity with a box is segmented, and trained, in a square crop around its box
    instead of in the whole image (`cpcsam.inference`, `cpcsam.training.data`). context 0 = off."""

    SECTION: ClassVar[str] = "model.crop"

    context: float = Field(0.0, ge=0)  # crop side = context × the box's longer side (0 = whole image)
    min_side: int = Field(32, ge=1)  # pixels: a tiny box still gets this much of its surroundings

    @model_validator(mode="after")
    def _context_holds_the_box(self) -> "CropConfig":
        if 0 < self.context < 1:
            raise ValueError(f"context: {self.context} would cut the box itself; use 0 (off) or ≥ 1")
        return self


class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"

    type: SamType = "small"
    checkpoint: str | None = None  # segment-anything state dict, local path or s3://; null = pretrain
    sizes: dict[str, ArchOverrides] = {}
    capl: CaplConfig = CaplConfig()
    lora: LoraConfig = LoraConfig()
    crop: CropConfig = CropConfig()

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: dict[str, ArchOverrides]) -> dict[str, ArchOverrides]:
        for name, over in value.items():
            if name in ("vit_b", "vit_l", "vit_h") and over.model_dump(exclude_none=True):
                raise ValueError(f"{name}: the official sizes cannot be overridden")
            if name not in ("small", "base_small", "vit_b", "vit_l", "vit_h"):
                raise ValueError(f"{name!r} is not a model type")
        return value


# ---------------------------------------------------------------------------------------------
# pretrain / perturb / embed / train
# ---------------------------------------------------------------------------------------------


class DistributedConfig(Section):
    """Data-parallel training over several processes (`cpcsam.training.distributed`).

    `nproc_per_node` > 1: the stage (`components.train`, `components.pretrain`) re-launches itself
    under torchrun with that many processes on this machine (one per GPU on CUDA); 1 is a plain process with no
    process group. `backend`: auto = nccl on CUDA, gloo on the CPU. Neither changes what is
    learned (the global batch is the single-process one), so neither is in the run fingerprint:
    a run resumes with another number of processes.
    """

    SECTION: ClassVar[str] = "train.distributed"

    nproc_per_node: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class PretrainDistributedConfig(DistributedConfig):
    SECTION: ClassVar[str] = "pretrain.distributed"


class PretrainConfig(Section):
    """SAM trained from scratch on the procedural corpus (SA-1B stand-in, `cpcsam.training.pretrain`)."""

    SECTION: ClassVar[str] = "pretrain"
    EXECUTION_KEYS: ClassVar[tuple[str, ...]] = ("distributed",)  # resumes with any number of processes

    seed: int = Field(0, ge=0)
    steps: int = Field(500, ge=1)
    batch_images: int = Field(8, ge=1)  # corpus scenes per step
    max_entities: int = Field(8, ge=1)  # objects per scene per step (random subset beyond)
    corpus_scenes: int = Field(0, ge=0)  # 0 = an endless stream of new scenes; N = cycle over N (overfit checks)
    # Object radius as a fraction of the scene's long side, drawn log-uniformly.
    object_radius: tuple[float, float] = (0.04, 0.38)
    optim: OptimConfig = OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=50)
    sigma_max: float = Field(0.2, ge=0, lt=0.5)  # each object's prompt noise ~ U(0, sigma_max)
    kinds: dict[PromptKind, float] = {"box": 0.5, "points": 0.25, "box+points": 0.25}
    corrective_clicks: int = Field(1, ge=0)  # SAM's iterative sampling: extra passes with a click in the error
    iou_loss_weight: float = Field(1.0, ge=0)  # SAM's IoU-head MSE
    # balanced: class-balanced BCE + Dice (escapes the all-background plateau from scratch, but
    # over-segments: masks ~2x the object's area); bce_dice: the fine-tuning's L_seg, calibrated
    # at logit 0, for a second phase that starts from `init`.
    mask_loss: Literal["balanced", "bce_dice"] = "balanced"
    init: str | None = None  # a segment-anything state dict to start from (fresh optimiser); null = random
    prompt_slots: int = 8  # box 2 + up to 3 positives + 2 negatives + the clicks
    device: Device = "auto"
    amp: bool = False
    log_every: int = Field(10, ge=1)
    val_every: int = Field(100, ge=0)  # box@0 IoU on held-out corpus scenes; 0 = never
    val_images: int = Field(64, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    threads: int = Field(1, ge=0)  # torch intra-op threads (0 = torch default); see `configure_process`
    distributed: PretrainDistributedConfig = PretrainDistributedConfig()

    _kinds = field_validator("kinds")(classmethod(lambda cls, v: _kind_probs(v)))

    @model_validator(mode="after")
    def _slots(self) -> "PretrainConfig":
        low, high = self.object_radius
        if not 0 < low <= high < 0.5:
            raise ValueError(f"object_radius: need 0 < low ≤ high < 0.5, got {list(self.object_radius)}")
        if self.prompt_slots < 7 + self.corrective_clicks:
            raise ValueError(
                f"prompt_slots: a box, 5 points and {self.corrective_clicks} clicks need "
                f"{7 + self.corrective_clicks} slots, got {self.prompt_slots}"
            )
        return self


class PerturbConfig(Section):
    """K prompts per training entity (docs/METHOD.md §1, `cpcsam.prompts.perturb`)."""

    SECTION: ClassVar[str] = "perturb"

    seed: int = Field(0, ge=0)
    k: int = Field(4, ge=1)  # K simulated prompt distributions
    sigma_box: float = Field(0.1, ge=0, lt=0.5)  # box sides move by u*side, u ~ U(-sigma, sigma)
    sigma_points: float = Field(0.0, ge=0, le=1)  # positives move by u*(box w, h), as evaluate's points@σ
    clean_groups: int = Field(0, ge=0)  # the first K' of the K prompts carry no geometric noise
    kinds: dict[PromptKind, float] = {"box": 0.4, "points": 0.3, "box+points": 0.3}
    positives: tuple[int, int] = (1, 3)  # positive points inside the mask (min, max)
    negatives: tuple[int, int] = (0, 2)  # negative points from the band outside it
    # Width of the band outside the mask that negatives come from, as a fraction of the tight
    # box's longer side (at least 2 px): close enough to the object to be informative.
    negative_band: float = Field(0.2, gt=0)
    prompt_slots: int = 8  # fixed point slots per prompt when batched (ONNX-style, padded with -1)

    _kinds = field_validator("kinds")(classmethod(lambda cls, v: _kind_probs(v)))

    @model_validator(mode="after")
    def _ranges(self) -> "PerturbConfig":
        if not 1 <= self.positives[0] <= self.positives[1]:
            raise ValueError(f"positives: expected [min, max] with 1 <= min <= max, got {list(self.positives)}")
        if not 0 <= self.negatives[0] <= self.negatives[1]:
            raise ValueError(f"negatives: expected [min, max] with 0 <= min <= max, got {list(self.negatives)}")
        if self.clean_groups >= self.k:
            raise ValueError(f"clean_groups: {self.clean_groups} of k = {self.k} prompts would leave none perturbed")
        if self.prompt_slots < self.max_points:
            raise ValueError(
                f"prompt_slots: {self.prompt_slots} slots cannot hold a box and {self.positives[1]} + "
                f"{self.negatives[1]} points ({self.max_points} needed)"
            )
        return self

    @property
    def kind_probs(self) -> tuple[tuple[str, float], ...]:
        """(kind, probability) in `PROMPT_KINDS` order, normalised."""
        total = sum(self.kinds.values())
        return tuple((kind, self.kinds.get(kind, 0.0) / total) for kind in PROMPT_KINDS)

    @property
    def max_points(self) -> int:
        """The most points one prompt can hold: 2 box corners + positives + negatives."""
        return 2 + self.positives[1] + self.negatives[1]


class EmbedConfig(Section):
    """Image-embedding cache, used when the encoder has no LoRA (`cpcsam.training.embeddings`)."""

    SECTION: ClassVar[str] = "embed"

    batch_size: int = Field(4, ge=1)
    device: Device = "auto"


TrainMode = Literal["bilevel", "lora-only", "full-finetune"]
VARIANT_NAMES = ("cpcsam", "task", "entity", "learnable", "fixed", "lora_only", "full_finetune")
VariantName = Literal["cpcsam", "task", "entity", "learnable", "fixed", "lora_only", "full_finetune"]


class TrainConfig(Section):
    """The bi-level trainer and its baselines (docs/METHOD.md §4, `cpcsam.training.bilevel`)."""

    SECTION: ClassVar[str] = "train"

    seed: int = Field(0, ge=0)
    mode: TrainMode = "bilevel"  # set per variant (top-level `variants`), never in params.yaml
    hypergradient: Literal["first-order", "unrolled"] = "first-order"
    steps: int = Field(200, ge=1)
    batch_images: int = Field(2, ge=1)  # images per batch, per level
    max_entities: int = Field(4, ge=1)  # entities per image per batch (a random subset when more)
    # Entities per image in the CaPL (upper) batch; None = max_entities. The CaPL step decodes
    # every entity K times (Eq. 1), so 1 entity x K prompts per image gives it the decoder work
    # of a LoRA step with max_entities = K entities per image.
    upper_max_entities: int | None = Field(1, ge=1)
    lambda_entity: float = Field(0.6, ge=0)  # λ between Eq. 1 and Eq. 2
    beta_variance: float = Field(0.1, ge=0)  # β of the variance term of Eq. 1
    lambda_l1: float = Field(0.01, ge=0)  # λ₁ of the calibration L1 penalty in Eq. 2
    capl_optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=10)
    sam_optim: OptimConfig = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=10)
    checkpoint_every: int = Field(50, ge=1)  # a restarted stage continues from the latest checkpoint
    keep_checkpoints: int = Field(2, ge=1)
    device: Device = "auto"
    amp: bool = False  # autocast: bfloat16 on CPU, float16 + GradScaler on CUDA
    embedding_cache: Literal["auto", "on", "off"] = "auto"  # auto: when the encoder carries no LoRA
    cache_mb: float = Field(512.0, ge=0)  # in-memory cache of preprocessed images / embeddings
    log_every: int = Field(5, ge=1)
    threads: int = Field(1, ge=0)  # torch intra-op threads (0 = torch default); see `configure_process`
    # Recompute the image encoder's blocks in the backward pass instead of keeping their
    # activations (torch.utils.checkpoint): less memory when the encoder trains, same gradients.
    grad_checkpointing: bool = False
    distributed: DistributedConfig = DistributedConfig()

    # A checkpoint resumes with another number of processes or with activation checkpointing on.
    EXECUTION_KEYS: ClassVar[tuple[str, ...]] = ("grad_checkpointing", "distributed")


# ---------------------------------------------------------------------------------------------
# evaluate / gate / export
# ---------------------------------------------------------------------------------------------


class TtaConfig(Section):
    """Test-time calibration: K' perturbations, calibrated together, logits averaged."""

    k: int = Field(4, ge=1)  # 1 = off
    sigma: float = Field(0.1, ge=0)  # jitter of the K'-1 extra copies (box sides, relative)
    protocols: list[str] = ["box@0.2"]  # which protocols get a +ttaK row (need a box)


class ThresholdCalibration(Section):
    """`evaluate.threshold: auto`: each model's logit threshold, chosen on `split` among `grid`
    as the one that gives the best base-class Dice under exact box prompts (box@0). Base classes
    only: the target classes stay unseen. (`cpcsam.evaluation.calibration`)"""

    SECTION: ClassVar[str] = "evaluate.calibration"

    split: SplitName = "val"
    grid: list[float] = [-4.0, -3.0, -2.0, -1.0, 0.0, 1.0]

    @field_validator("grid")
    @classmethod
    def _grid_not_empty(cls, grid: list[float]) -> list[float]:
        if not grid:
            raise ValueError("needs at least one threshold")
        return sorted(set(grid))


class AutoConfig(Section):
    """Automatic prompts for target classes (`cpcsam.prompts.auto`)."""

    SECTION: ClassVar[str] = "evaluate.auto"

    enabled: bool = True
    num_positive: int = Field(2, ge=1)
    num_negative: int = Field(1, ge=0)
    box_threshold: float = 0.5  # relative similarity threshold of the box region
    use_box: bool = True


class HeadlineConfig(Section):
    model: str = "cpcsam"
    protocol: str = "box@0.2"


class EvaluateConfig(Section):
    SECTION: ClassVar[str] = "evaluate"

    seed: int = Field(0, ge=0)  # prompt noise, support subset and image sample draw from it
    splits: list[SplitName] = ["test"]
    max_images: int = Field(0, ge=0)  # 0 = every image of the splits; N = a seeded sample
    references: bool = True  # prompt-only rows: the filled box and GrabCut (cpcsam.evaluation.references)
    kinds: list[PromptKind] = ["box", "points"]
    sigmas: list[float] = [0.0, 0.1, 0.2, 0.3, 0.5]
    num_positive: int = Field(1, ge=1)
    num_negative: int = Field(0, ge=0)
    tta: TtaConfig = TtaConfig()
    auto: AutoConfig = AutoConfig()
    support_fraction: float = Field(0.1, ge=0, le=1)
    threshold: float | Literal["auto"] = 0.0  # logit threshold of a mask; auto: per model, see calibration
    calibration: ThresholdCalibration = ThresholdCalibration()
    batch_entities: int = Field(32, ge=1)
    threads: int = Field(1, ge=0)
    overlays: int = Field(4, ge=0)
    overlay_protocol: str = "box@0"
    headline: HeadlineConfig = HeadlineConfig()

    @model_validator(mode="after")
    def _named_protocols_exist(self) -> "EvaluateConfig":
        """The headline, overlay and TTA protocols must be protocols of the run (checked before any work)."""
        plain = {f"{kind}@{float(s):g}" for kind in self.kinds for s in self.sigmas}
        runs = plain | ({f"{p}+tta{self.tta.k}" for p in self.tta.protocols} if self.tta.k > 1 else set())
        runs |= {"auto"} if self.auto.enabled else set()
        checks = [("headline.protocol", self.headline.protocol, runs), ("overlay_protocol", self.overlay_protocol, runs)]
        checks += [("tta.protocols", p, plain) for p in (self.tta.protocols if self.tta.k > 1 else [])]
        for key, name, allowed in checks:
            if name not in allowed:
                raise ValueError(f"{key}: {name!r} is not a protocol of this run ({sorted(allowed)}; see kinds, sigmas)")
        if self.threshold == "auto" and self.calibration.split in self.splits:
            raise ValueError(f"calibration.split: {self.calibration.split!r} is also evaluated (splits: {self.splits}); "
                             "a threshold chosen on the images it is judged on is tuned on test")
        return self


class ChampionHeadline(Section):
    """The registered champion's headline numbers (written here by a flow from the registry)."""

    target_dice: float | None = None
    base_dice: float | None = None
    version: str | None = None  # the registry version they came from (for the report)


class GateConfig(Section):
    SECTION: ClassVar[str] = "gate"

    min_target_dice: float = 0.30  # candidate's target-class Dice (headline protocol) must reach this
    max_base_regression: float = 0.02  # champion base Dice - candidate base Dice must not exceed this
    beat_reference: Literal["filled_box", "grabcut"] | None = "filled_box"  # must beat this row; null = off
    # The champion to compare with: a param, not a registry lookup inside the stage, so that DVC
    # sees a new champion as a changed param and `dvc status` stays clean otherwise. The flows
    # fill it from the MLflow registry (`-S gate.champion=...`); null = no champion.
    champion: ChampionHeadline | None = None
    require_onnx_parity: bool = True  # the export stage's parity.json must say passed


class ExportConfig(Section):
    SECTION: ClassVar[str] = "export"

    opset: int = Field(17, ge=11)
    device: Device = "cpu"  # onnxruntime provider of the parity run
    parity_splits: list[SplitName] = ["test"]
    parity_images: int = Field(8, ge=1)
    parity_max_entities: int = Field(16, ge=1)
    threads: int = Field(1, ge=0)  # torch and onnxruntime intra-op threads of the parity run (0 = their defaults)
    # Parity is judged at the scale of the logits: per entity, max |Δ| <= max_abs_logit_diff +
    # logit_rtol * (its largest |logit|); probabilities within max_abs_prob_diff; masks by IoU.
    max_abs_logit_diff: float = Field(1e-4, gt=0)
    logit_rtol: float = Field(1e-3, ge=0)
    max_abs_prob_diff: float = Field(1e-3, gt=0)
    min_mask_iou: float = Field(0.999, ge=0, le=1)


# ---------------------------------------------------------------------------------------------
# tracking
# ---------------------------------------------------------------------------------------------


class RegistryConfig(Section):
    model_name: str = "cpcsam-{profile}"  # registered model per dataset profile
    champion_alias: str = "champion"  # moved only when the gate passed


class FlowConfig(Section):
    """Prefect policy of the `train` flow."""

    stage_retries: int = Field(1, ge=0)
    stage_retry_delay_s: float = Field(5, ge=0)
    stage_timeout_s: float = Field(3600, gt=0)
    # stages run at once where the graph allows (`cpcsam run` and the `train` flow); 0 = auto:
    # the cores this process may use over the cores one stage uses (`flows.stages.parallel_jobs`)
    stage_jobs: int = Field(0, ge=0)


class TrackingConfig(Section):
    SECTION: ClassVar[str] = "tracking"

    enabled: bool = True  # env CPCSAM_TRACKING=off wins
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI wins
    experiment: str = "cpcsam"
    artifact_location: str = "mlruns"  # local stores only; a server keeps its own artifact root
    data_stages: list[str] = ["ingest", "validate"]  # their dvc.lock outs hash is tagged on every run
    retries: int = Field(3, ge=0)
    retry_wait_s: float = Field(0.5, ge=0)
    max_consecutive_failures: int = Field(5, ge=1)
    preflight_timeout_s: float = Field(5.0, gt=0)
    registry: RegistryConfig = RegistryConfig()
    flow: FlowConfig = FlowConfig()


# ---------------------------------------------------------------------------------------------
# the tree
# ---------------------------------------------------------------------------------------------

SEEDED_STAGES = ("pretrain", "perturb", "train", "evaluate")


class Params(Section):
    seed: int = Field(0, ge=0)  # mixed into every stage's own seed (`stage_seed`)
    # The models trained side by side with one budget (`cpcsam.training.variants`), one DVC
    # `train@<variant>` stage each; they set `train.mode` and `model.capl.mode`.
    variants: list[VariantName] = Field(default_factory=lambda: list(VARIANT_NAMES), min_length=1)
    data: DataConfig = DataConfig(profiles={"oceancoco": SyntheticProfile(source="synthetic")})
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    perturb: PerturbConfig = PerturbConfig()
    embed: EmbedConfig = EmbedConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _variant_owned_keys(self) -> "Params":
        if "mode" in self.train.model_fields_set or "mode" in self.model.capl.model_fields_set:
            raise ValueError("train.mode and model.capl.mode are set per variant; list the models in `variants`")
        if "cpcsam" not in self.variants:
            raise ValueError("variants: must include 'cpcsam' (the candidate the gate judges)")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: listed twice: {self.variants}")
        return self

    def stage_seed(self, stage: str) -> int:
        """The one seed rule: the stage's own `<stage>.seed` mixed with the top-level `seed`.

        Changing the top-level seed re-draws every stage; changing one stage's seed re-draws only
        it. Stages without a seed of their own (export's parity sample) use `evaluate`'s.
        """
        import numpy as np

        if stage not in SEEDED_STAGES:
            raise ConfigError(f"stage_seed: {stage!r} has no seed; seeded stages are {list(SEEDED_STAGES)}")
        own = getattr(self, stage).seed
        return int(np.random.SeedSequence([self.seed, own]).generate_state(1)[0])

    def seeded(self, stage: str) -> Any:
        """The stage's section with its effective seed (`stage_seed`) in place of its own."""
        return getattr(self, stage).model_copy(update={"seed": self.stage_seed(stage)})

    def with_overrides(self, overrides: Iterable[str]) -> "Params":
        """A validated copy with `key.sub=value` overrides applied."""
        raw = self.model_dump(mode="json", exclude_unset=False)
        apply_overrides(raw, overrides)
        return validate_params(raw, "overrides")


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


def coerce(cls: Any, value: Any, where: str) -> Any:
    """`value` as the section model `cls`: itself when it is one, else validated (a mapping or None)."""
    return value if isinstance(value, cls) else cls.from_params(value, where)


def read_params_file(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The raw mapping of a params file (no validation), with clear errors for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage sections")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides in place (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        set_dotted(raw, key, yaml.safe_load(value))
    return raw


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> Params:
    """Read, override and validate the whole params tree (ConfigError naming every bad key)."""
    raw = apply_overrides(read_params_file(path), overrides)
    return validate_params(raw, str(path))


def validate_params(raw: dict[str, Any], where: str) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + "; ".join(_describe(err) for err in exc.errors())) from None


def _describe(err: dict[str, Any], top: Any = None, prefix: str = "") -> str:
    loc = ([prefix] if prefix else []) + [str(p) for p in err["loc"] if not _is_union_tag(p) and p != "[key]"]
    key = ".".join(loc) or "params"
    if err["type"] == "extra_forbidden":
        known = _known_keys(err["loc"][:-1], top or Params)
        near = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join(loc[:-1] + [near[0]])!r}?" if near else f"; known keys: {sorted(known)}"
        return f"unknown key {key!r}{hint}"
    message = err["msg"].removeprefix("Value error, ")
    field, sep, rest = message.partition(": ")
    if sep and field.replace(".", "_").isidentifier():  # a model-level rule about one field: name it in the key
        key, message = f"{key}.{field}", rest
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    given = err.get("input")
    if given is None or isinstance(given, (dict, list)) or err["type"] == "union_tag_invalid":
        return f"{key}: {message}"
    return f"{key}: {message} (got {given!r})"


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in ("synthetic", "coco", "semantic_masks", "binary_masks")


def _known_keys(loc: tuple[Any, ...], top: Any) -> list[str]:
    """Field names of the model at `loc` (a path from `top`), for "did you mean"."""
    model: Any = top
    for part in loc:
        if _is_union_tag(part):
            model = {"synthetic": SyntheticProfile, "coco": CocoProfile, "semantic_masks": SemanticMasksProfile,
                     "binary_masks": BinaryMasksProfile}[part]
            continue
        fields = getattr(model, "model_fields", {})
        if part in fields:
            model = _model_of(fields[part].annotation)
        elif model in (DataConfig,) or not fields:
            continue
        else:  # a key of a dict[str, Model]: stay on the value model
            continue
    return list(getattr(model, "model_fields", {}))


def _model_of(annotation: Any) -> Any:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = params
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"params: cannot set {key!r}: {part!r} is not a mapping")
    node[parts[-1]] = copy.deepcopy(value)


def get_dotted(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params: key {key!r} not found")
        node = node[part]
    return node
