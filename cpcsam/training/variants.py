"""The models the pipeline trains side by side: CPC-SAM, its baselines and its CaPL ablations.

Every variant runs through the same trainer with the same budget (`train.steps`, images per step,
data, prompts; see `variant_sections`); they differ only in what is trained:

| variant        | trainer mode   | CaPL mode | trains                                      |
| cpcsam         | bilevel        | causal    | CaPL (task + entity) ↔ LoRA, bi-level       |
| task           | bilevel        | task      | task causal module only ↔ LoRA              |
| entity         | bilevel        | entity    | entity causal module only ↔ LoRA (*ours*)   |
| learnable      | bilevel        | learnable | a soft prompt per label type ↔ LoRA         |
| fixed          | bilevel        | fixed     | LoRA only, through the bi-level data split  |
| lora_only      | lora-only      | fixed     | LoRA on all training images (SAMed-style)   |
| full_finetune  | full-finetune  | fixed     | every SAM weight but the prompt encoder     |
"""

from __future__ import annotations

from typing import NamedTuple

from cpcsam.config import VARIANT_NAMES, ModelConfig, TrainConfig


class Variant(NamedTuple):
    mode: str  # trainer mode (cpcsam.training.bilevel)
    capl: str  # CaPL mode (cpcsam.modeling.capl)


VARIANTS: dict[str, Variant] = {
    "cpcsam": Variant("bilevel", "causal"),
    "task": Variant("bilevel", "task"),
    "entity": Variant("bilevel", "entity"),
    "learnable": Variant("bilevel", "learnable"),
    "fixed": Variant("bilevel", "fixed"),
    "lora_only": Variant("lora-only", "fixed"),
    "full_finetune": Variant("full-finetune", "fixed"),
}
assert tuple(VARIANTS) == VARIANT_NAMES


def variant_sections(name: str, train: TrainConfig, model: ModelConfig) -> tuple[TrainConfig, ModelConfig]:
    """The `train` and `model` sections of one variant (its trainer mode and CaPL mode set).

    Same images per step for all: a bi-level step reads `batch_images` images for CaPL and as
    many (from the other half of the data) for LoRA; a variant without CaPL has one level only,
    which reads both shares, `2 × batch_images`, from all the training images.
    """
    variant = VARIANTS[name]
    capl = model.capl.model_copy(update={"mode": variant.capl})
    update: dict = {"mode": variant.mode}
    if variant.capl == "fixed":
        update["batch_images"] = 2 * train.batch_images
    return train.model_copy(update=update), model.model_copy(update={"capl": capl})
