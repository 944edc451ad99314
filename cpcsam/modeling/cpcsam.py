"""CPC-SAM: SAM (optionally LoRA-tuned) + the Causal Prompt Learner, with one decoder pass.

`Sam.forward` runs under `torch.no_grad()` and loops over images in Python, so CPC-SAM calls
SAM's parts directly: `encode_images` (image encoder), `embed_prompts` (ONNX-style point
embedding with fixed slots), `calibrate_prompts` (task causal module) and `decode` (the mask
decoder's computation for N entities drawn from B images, with the entity causal module's
attention calibration). `decode` is a straight sequence of tensor operations, so it can be traced
for ONNX export, and it runs the decoder exactly once.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn

from cpcsam.config import CaplConfig, CropConfig, coerce
from cpcsam.modeling.refine import mask_upscale_factor
from cpcsam.modeling.capl import (
    FINAL_SITE,
    CaPL,
    CalibratedAttention,
    cross_attention_sites,
    sample_prompt_features,
    wrap_cross_attention,
)
from cpcsam.modeling.decoder import DecoderOutput, attention_map, decode_entities, dense_positional_encoding

class CPCSAM(nn.Module):
    """SAM + CaPL. `mode` (from `capl_cfg`) selects the prompt-embedding ablation:

    - `fixed`: plain SAM prompts, no CaPL parameters;
    - `learnable`: a zero-initialised soft prompt per label type;
    - `task`: the task causal module only;
    - `entity` (*ours*): the entity causal module only, the 2 × 2 ablation's missing cell;
    - `causal`: task + entity causal modules (CPC-SAM).

    Every mode is the identity at initialisation: outputs equal SAM's bit for bit in SAM's order
    (`decode(sam_order=True)`), to float32 rounding otherwise.
    `sam` is used in place: its decoder's cross attentions are swapped for `CalibratedAttention`
    (same parameters and keys, same outputs without a bias); deep-copy it first to keep a plain one.
    """

    def __init__(self, sam: Sam, capl_cfg: CaplConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.capl_cfg: CaplConfig = coerce(CaplConfig, capl_cfg, "model.capl")
        # How inference applies the model (`model.crop`; not a weight): set by `load_cpcsam` from
        # the saved config, so that the exported and served model crops as it was trained.
        self.crop = CropConfig()
        self.sam = sam
        transformer = sam.mask_decoder.transformer
        # Looked up by path at each call (`_cross_attention`), not cached: PEFT and deep copies
        # replace modules, and a cached reference would go stale.
        wrap_cross_attention(transformer)
        self.capl = CaPL(
            dim=transformer.embedding_dim,
            num_heads=transformer.num_heads,
            sites=cross_attention_sites(transformer),
            mode=self.capl_cfg.mode,
            task_hidden=self.capl_cfg.task_hidden,
            task_context=self.capl_cfg.task_context,
            task_image_features=self.capl_cfg.task_image_features,
            entity_hidden=self.capl_cfg.entity_hidden,
            entity_rank=self.capl_cfg.entity_rank,
        )

    @property
    def mode(self) -> str:
        return self.capl.mode

    @property
    def image_size(self) -> int:
        """Side of the square model frame (the encoder's input size)."""
        return self.sam.image_encoder.img_size

    @property
    def embedding_size(self) -> tuple[int, int]:
        return tuple(self.sam.prompt_encoder.image_embedding_size)

    @property
    def mask_size(self) -> int:
        """Side of `DecoderOutput.low_res_logits`: 4× the embedding grid, ×2 per refinement stage."""
        return self.embedding_size[0] * mask_upscale_factor(self.sam.mask_decoder)

    def _cross_attention(self) -> dict[str, CalibratedAttention]:
        transformer = self.sam.mask_decoder.transformer
        return {path: transformer.get_submodule(path) for path in cross_attention_sites(transformer)}

    # ---- the four steps -------------------------------------------------------------------------

    def encode_images(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] preprocessed images (see `cpcsam.modeling.transforms`) → [B, C, h, w]."""
        return self.sam.image_encoder(images)

    def embed_prompts(self, coords: Tensor, labels: Tensor) -> Tensor:
        """Sparse prompt tokens, ONNX-style: coords [..., P, 2] (model frame, x y), labels [..., P].

        Labels: −1 padding (SAM's not-a-point embedding, positional part zeroed), 0 negative point,
        1 positive point, 2 box top-left, 3 box bottom-right. Same numbers as SAM's `PromptEncoder`
        for the same points and box.
        """
        pe = self.sam.prompt_encoder
        coords = (coords + 0.5) / self.image_size  # the model frame is square
        embedding = pe.pe_layer._pe_encoding(coords.to(torch.float))
        labels = labels.unsqueeze(-1)
        embedding = embedding * (labels != -1)
        embedding = embedding + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            embedding = embedding + pe.point_embeddings[i].weight * (labels == i)
        return embedding

    def calibrate_prompts(self, sparse: Tensor, labels: Tensor, coords: Tensor | None = None,
                          image_embeddings: Tensor | None = None, image_index: Tensor | None = None) -> Tensor:
        """Task causal module (or soft prompt, or identity, by mode): [N, K, P, C] → [N, K, P, C].

        `coords` [N, K, P, 2] (model frame), `image_embeddings` [B, C, h, w] and `image_index`
        [N] are read only by a task module that reads the image (`model.capl.task_image_features`);
        callers pass them always, so that the option needs no other code path.
        """
        features = None
        if self.capl.reads_image:
            if coords is None or image_embeddings is None or image_index is None:
                raise ValueError("model.capl.task_image_features is on: calibrate_prompts needs coords, "
                                 "image_embeddings and image_index")
            features = sample_prompt_features(image_embeddings, image_index, coords, self.image_size)
        return self.capl.calibrate_prompts(sparse, labels, features)

    def decode(self, image_embeddings: Tensor, image_index: Tensor, sparse: Tensor,
               entity_keys: Tensor | None = None, sam_order: bool = False) -> DecoderOutput:
        """Masks for N entities: image_embeddings [B, C, h, w], image_index [N] (which image), sparse [N, P, C].

        The mask decoder's `predict_masks` with the entity calibration applied to the cross
        attention, no dense mask prompt (`no_mask_embed` everywhere), single-mask output. It runs
        `cpcsam.modeling.decoder`, which computes the same function as SAM's modules with less
        work per entity, equal to float32 rounding. `sam_order=True` runs SAM's own transformer
        and upscaling on per-entity copies of the images instead, every operation in SAM's order:
        a fresh CPC-SAM's outputs are then SAM's bit for bit, and the pretraining keeps it so that
        its shipped result stays reproducible to the byte (checkpoints/README.md). `entity_keys`:
        the images' `entity_keys`, when the caller has them already (the exported decoder gets
        them from the encoder graph); computed here otherwise.
        """
        tokens = self._tokens(sparse)
        dense = self._dense_prompt()
        entity = self.capl.entity
        if not sam_order:
            return decode_entities(self.sam, entity, image_embeddings, dense, image_index, tokens, entity_keys)

        decoder = self.sam.mask_decoder
        n = sparse.shape[0]
        _, c, h, w = image_embeddings.shape
        if entity is not None:
            keys = self.entity_keys(image_embeddings) if entity_keys is None else entity_keys
            biases, l1 = entity(tokens, keys, image_index)
        else:
            biases, l1 = {}, sparse.new_zeros(())
        attention = self._cross_attention()
        final = attention[FINAL_SITE]
        try:
            for path, module in attention.items():
                module.logit_bias = biases.get(path)
            final.keep_attn = True
            per_entity = image_embeddings[image_index] + dense
            dense_pe = dense_positional_encoding(self.sam.prompt_encoder)
            hs, src = decoder.transformer(per_entity, dense_pe.expand(n, -1, -1, -1), tokens)
            final_attn = final.last_attn  # N x heads x T x HW
        finally:  # never leave a bias behind for the next call
            for module in attention.values():
                module.logit_bias = None
            final.keep_attn = False
            final.last_attn = None

        src = src.transpose(1, 2).reshape(n, c, h, w)
        upscaled = decoder.output_upscaling(src)
        # All mask tokens go through their hypernetworks, as in SAM, so that the single-mask output
        # is bit-identical to SAM's (a 1-row matmul may round differently); the cost is tiny.
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]
        hyper_in = torch.stack(
            [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(decoder.num_mask_tokens)],
            dim=1,
        )
        b2, c2, h2, w2 = upscaled.shape
        masks = (hyper_in @ upscaled.view(b2, c2, h2 * w2)).view(b2, -1, h2, w2)
        iou_pred = decoder.iou_prediction_head(hs[:, 0, :])
        return DecoderOutput(masks[:, 0:1], iou_pred[:, 0:1], attention_map(final_attn, (h, w)), l1)

    def forward(self, image_embeddings: Tensor, image_index: Tensor, sparse: Tensor) -> DecoderOutput:
        """Same as `decode` (so that hooks and `torch.onnx.export` see a module call)."""
        return self.decode(image_embeddings, image_index, sparse)

    def entity_keys(self, image_embeddings: Tensor) -> Tensor | None:
        """The entity causal module's keys of each image, [B, S·H, r, HW] (None without an
        entity module): per-image work, which the exported encoder graph does beside the embedding."""
        if self.capl.entity is None:
            return None
        dense, dense_pe = self._dense_prompt(), dense_positional_encoding(self.sam.prompt_encoder)
        image, image_pe = _image_tokens(image_embeddings, dense, dense_pe)
        return self.capl.entity.image_keys(image + image_pe)

    def entity_calibration(self, image_embeddings: Tensor, image_index: Tensor, sparse: Tensor) -> dict[str, Tensor]:
        """The log-gates log C that `decode` adds to each cross attention (for tests and plots).

        Keys are the cross-attention paths inside the decoder transformer; self-attention never
        appears (prompt↔prompt positions are not calibrated). Empty without an entity module.
        """
        if self.capl.entity is None:
            return {}
        return self.capl.entity(self._tokens(sparse), self.entity_keys(image_embeddings), image_index).biases

    def _tokens(self, sparse: Tensor) -> Tensor:
        """The transformer's tokens [N, T, C] = [iou, mask tokens, prompts]."""
        decoder = self.sam.mask_decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        return torch.cat((output_tokens, sparse), dim=1)

    def _dense_prompt(self) -> Tensor:
        """The no-mask dense embedding [1, C, 1, 1], added to every image position."""
        return self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)


def _image_tokens(image_embeddings: Tensor, dense: Tensor, dense_pe: Tensor) -> tuple[Tensor, Tensor]:
    """[B, C, h, w] embeddings + dense prompt → image tokens [B, HW, C] (one per image); PE → [1, HW, C]."""
    return (image_embeddings + dense).flatten(2).transpose(1, 2), dense_pe.flatten(2).transpose(1, 2)


# ---- parameter groups (the bi-level trainer optimises them separately) -----------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.sam if isinstance(model, CPCSAM) else model


def capl_parameters(model: CPCSAM) -> list[nn.Parameter]:
    """CaPL's parameters (φ): empty in `fixed` mode."""
    return list(model.capl.parameters())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA adapter parameters injected by `apply_lora` (θ of the lower level)."""
    return [p for name, p in _unwrap(model).named_parameters() if "lora_" in name]


def sam_parameters(model: nn.Module) -> list[nn.Parameter]:
    """SAM's own weights (no LoRA, no CaPL): what `full-finetune` trains."""
    return [p for name, p in _unwrap(model).named_parameters() if "lora_" not in name]


def named_parameter_groups(model: CPCSAM) -> Iterator[tuple[str, str]]:
    """(group, parameter name) for every parameter: group in capl / lora / sam."""
    for name, _ in model.named_parameters():
        if name.startswith("capl."):
            yield "capl", name
        elif "lora_" in name:
            yield "lora", name
        else:
            yield "sam", name
