"""Building SAM from a config and loading its weights with strict key checks.

`segment_anything.build_sam._build_sam` fixes the input at 1024² and loads checkpoints with
a bare `torch.load`; here the same modules (`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`,
`TwoWayTransformer`) are composed from a `SamArch`, so that the official ViT-B/L/H and the small
CPU configurations come from one code path, and checkpoints load with `weights_only=True` and
fail loudly when keys or shapes do not match.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from cpcsam.config import ModelConfig, coerce
from cpcsam.errors import CheckpointError, ConfigError
from cpcsam.modeling.refine import ResidualUpsample

logger = logging.getLogger(__name__)

# SAM's pixel statistics (ImageNet, 0..255 scale); `cpcsam.modeling.transforms` uses the same.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArch:
    """Every size that defines a SAM model; the official values are SAM's ViT-B."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_window_size: int = 14
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    # Extra ×2 mask upsampling stages after SAM's ×4 (`cpcsam.modeling.refine`); 0 = SAM's decoder.
    mask_refine_stages: int = 0
    mask_refine_hidden: int = 8  # width of its residual convolutions (run per entity at the mask resolution)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.image_size // self.patch_size


ARCHS: dict[str, SamArch] = {
    "vit_b": SamArch(),
    "vit_l": SamArch(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamArch(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
    # CPU configurations (no SA-1B weights here): ~1.2 M parameters, 16×16 embedding grid, 128² masks.
    "small": SamArch(
        image_size=256,
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_window_size=8,
        encoder_global_attn_indexes=(1, 3),
        prompt_embed_dim=64,
        decoder_depth=2,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
        mask_refine_stages=1,  # 128² masks: at 64² small objects cannot be drawn (cpcsam.modeling.refine)
    ),
    # A somewhat larger CPU configuration: 384² input, 24×24 grid (windows of 12 tile it).
    "base_small": SamArch(
        image_size=384,
        encoder_embed_dim=256,
        encoder_depth=6,
        encoder_num_heads=8,
        encoder_window_size=12,
        encoder_global_attn_indexes=(2, 5),
        prompt_embed_dim=128,
        decoder_depth=2,
        decoder_mlp_dim=512,
        decoder_num_heads=8,
        iou_head_hidden_dim=128,
    ),
}
OFFICIAL_TYPES = ("vit_b", "vit_l", "vit_h")


def resolve_arch(cfg: ModelConfig | Mapping[str, Any]) -> SamArch:
    """The architecture named by `model.type`, with `model.sizes[type]` overrides for small types.

    The official types take no overrides (`ModelConfig` refuses them): their sizes are fixed by
    the released checkpoints.
    """
    cfg = coerce(ModelConfig, cfg, "model")
    sam_type = cfg.type
    over = cfg.sizes.get(sam_type)
    overrides = over.model_dump(exclude_none=True) if over is not None else {}
    arch = dataclasses.replace(ARCHS[sam_type], **overrides)
    _check_arch(arch, f"model.sizes.{sam_type}")
    return arch


def _check_arch(arch: SamArch, where: str) -> None:
    if arch.image_size % arch.patch_size:
        raise ConfigError(f"{where}: image_size {arch.image_size} is not a multiple of patch_size {arch.patch_size}")
    if arch.encoder_embed_dim % arch.encoder_num_heads:
        raise ConfigError(f"{where}: encoder_num_heads must divide encoder_embed_dim")
    # The decoder's cross attention halves the dimension before splitting heads.
    if (arch.prompt_embed_dim // 2) % arch.decoder_num_heads or arch.prompt_embed_dim % 8:
        raise ConfigError(f"{where}: prompt_embed_dim must be a multiple of 8 and of 2·decoder_num_heads")
    if not 0 <= arch.mask_refine_stages <= 2 or arch.mask_refine_hidden < 1:
        raise ConfigError(f"{where}: mask_refine_stages must be 0, 1 or 2 and mask_refine_hidden ≥ 1")
    if any(not 0 <= i < arch.encoder_depth for i in arch.encoder_global_attn_indexes):
        raise ConfigError(f"{where}: encoder_global_attn_indexes must lie in [0, encoder_depth)")


def build_sam_from_arch(arch: SamArch) -> Sam:
    """A randomly initialised `Sam` of the given sizes (same composition as segment-anything's)."""
    grid = arch.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.encoder_window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    if arch.mask_refine_stages:
        channels = arch.prompt_embed_dim // 8  # what SAM's ×4 upscaling ends with
        stages = [ResidualUpsample(channels, arch.mask_refine_hidden) for _ in range(arch.mask_refine_stages)]
        # Appended to SAM's Sequential: the decoder's forward and its hypernetworks stay as they are.
        sam.mask_decoder.output_upscaling = torch.nn.Sequential(*sam.mask_decoder.output_upscaling, *stages)
    return sam


def build_sam(cfg: ModelConfig | Mapping[str, Any]) -> Sam:
    """Build SAM from the `model` section (`cpcsam.config.ModelConfig`, or a mapping of it).

    `type`: `small | base_small | vit_b | vit_l | vit_h`; `sizes[type]` overrides the small
    configurations; `checkpoint` (optional, local path or `s3://bucket/key`) is a segment-anything
    state dict loaded with strict key and shape checks. The model is returned in eval mode on the
    CPU; move it with `.to(device)`.
    """
    cfg = coerce(ModelConfig, cfg, "model")
    sam = build_sam_from_arch(resolve_arch(cfg))
    if cfg.checkpoint:
        state = read_state_dict(str(cfg.checkpoint))
        state = adapt_input_size(state, sam, source=str(cfg.checkpoint))
        load_state_dict_strict(sam, state, source=str(cfg.checkpoint))
        logger.info("loaded SAM %s weights from %s", cfg.type, cfg.checkpoint)
    sam.eval()
    return sam


def adapt_input_size(state: Mapping[str, Any], sam: Sam, source: str) -> dict[str, Any]:
    """A checkpoint trained at another input size, resized to `sam`'s embedding grid.

    Only two kinds of tensors depend on the grid: the encoder's absolute position embedding
    [1, G, G, C] and the relative position tables [2G − 1, C/heads] of its global-attention
    blocks (window blocks depend on the window, not the grid). They are interpolated as
    segment-anything and ViTDet do at run time (bicubic for the embedding, linear for the tables),
    so a model pretrained at 256² can be fine-tuned and run at 384² where small objects need the
    finer grid. Everything else still has to match exactly (`check_state_dict`).
    """
    expected = sam.state_dict()
    key = "image_encoder.pos_embed"
    old, new = state.get(key), expected[key]
    if not isinstance(old, torch.Tensor) or old.dim() != 4 or old.shape == new.shape or old.shape[3] != new.shape[3]:
        return dict(state)  # same grid, or a mismatch `check_state_dict` reports
    out = dict(state)
    grid = tuple(new.shape[1:3])
    out[key] = F.interpolate(old.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False
                             ).permute(0, 2, 3, 1).to(old.dtype)
    for name, table in expected.items():
        if not name.endswith(("attn.rel_pos_h", "attn.rel_pos_w")):
            continue
        given = state.get(name)
        if isinstance(given, torch.Tensor) and given.dim() == 2 and given.shape[1] == table.shape[1] \
                and given.shape[0] != table.shape[0]:
            out[name] = F.interpolate(given.T[None].float(), size=table.shape[0], mode="linear"
                                      )[0].T.to(given.dtype)
    logger.warning("%s: trained on a %dx%d embedding grid, resized to %dx%d (position embedding and "
                   "global attention tables interpolated)", source, old.shape[1], old.shape[2], *grid)
    return out


def read_uri_bytes(uri: str) -> bytes:
    """The bytes of a local file or an `s3://bucket/key` object (through `cpcsam.data.storage`)."""
    from cpcsam.data import storage  # the project's one file/S3 access layer
    from cpcsam.errors import DataError

    try:
        return storage.read_bytes(uri)
    except DataError as exc:  # same message (it names the file), checkpoint-specific type
        raise CheckpointError(f"checkpoint {exc}") from exc


def read_state_dict(uri: str) -> dict[str, Any]:
    """Load a checkpoint file with `torch.load(weights_only=True)` onto the CPU (a pickle with code is refused)."""
    from cpcsam.files import torch_load_weights

    obj = torch_load_weights(read_uri_bytes(uri), uri, "torch checkpoint")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Raise `CheckpointError` naming every missing, unexpected and wrongly shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {_shape(state[k])} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError(f"{source}: checkpoint does not match the model: " + "; ".join(parts))


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}, not a tensor"


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """`check_state_dict`, then `load_state_dict(strict=True)`."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
