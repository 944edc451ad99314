"""Activation checkpointing of SAM's image encoder (`train.grad_checkpointing`).

The ViT blocks dominate training memory when the encoder trains (encoder LoRA, full
fine-tuning): autograd keeps every block's attention and MLP activations for the backward pass,
~B × (S/16)² tokens × width × depth. With checkpointing only each block's input is kept and the
block is run again during the backward pass (`torch.utils.checkpoint`, non-reentrant): about one
extra encoder forward per step for activation memory of one block. Gradients are the same; on
the CPU they are bit-identical, since the recomputation runs the same kernels on the same inputs.

`checkpointed_encoder` is `ImageEncoderViT.forward` (segment-anything 1.0) with each block wrapped;
it leaves the module untouched (no patched methods, no renamed parameters), so checkpoints,
LoRA names and exports are unaffected, and the trainer uses it only where the recomputation is
safe (not inside `torch.func.functional_call`, whose substituted weights are gone by the time the
backward pass recomputes).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def checkpointed_encoder(encoder: nn.Module, images: Tensor) -> Tensor:
    """`encoder(images)` with every ViT block recomputed in the backward pass."""
    for part in ("patch_embed", "pos_embed", "blocks", "neck"):
        if not hasattr(encoder, part):
            raise TypeError(f"checkpointed_encoder: {type(encoder).__name__} is not a segment-anything ImageEncoderViT")
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        if torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return encoder.neck(x.permute(0, 3, 1, 2))
