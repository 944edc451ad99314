"""The exported decoder's computation: `CPCSAM.decode` rearranged for inference, one mask per entity.

`CPCSAM.decode` keeps SAM's operations in SAM's order, so that a fresh CPC-SAM is SAM bit for bit
and the training is reproducible to the byte. The exported graph only has to agree with it to
float32 rounding (the parity tolerances of `cpcsam.export.parity`), which leaves room to do less
work per entity at the ViT-B decoder's sizes (C = 256 channels, HW = 4096 image positions, H = 8
heads of d = 16 in the cross attentions, T = 5 + P tokens):

- **Projections folded into the attention.** In a cross attention between the T tokens and the
  HW positions of one entity, SAM projects all HW positions ([HW, C] → [HW, H·d]) for keys,
  values, queries or the output. Because T is small, the projection can act on the token side
  instead: token→image logits are q_h W_k,hᵀ · xᵀ (the key bias adds a constant to each row,
  which the softmax ignores) and the values are (P_h x) W_v,hᵀ + b_v (P's rows sum to 1);
  image→token logits are x · (k_h W_q,h)ᵀ + b_q,h · k_hᵀ and the output is Σ_h P_h (v_h W_o,hᵀ)
  + b_o. Each becomes one [HW, C] × [C, H·T] product: H·T = 64 columns for a box and a point
  against H·d = 128, about half the multiply-adds, and the gains hold while T < d·H/H = 16
  tokens (11 prompt points; more points make it slower, never wrong). The first block's image-side
  projections are shared by the entities of an image (`cpcsam.modeling.two_way`) and stay so.
- **The entity gates where they are used.** log C = log 2 + log σ(s): the log 2 is the same for
  every key of a softmax row and is dropped; the 1/√r scale is applied to the [N, H, T, r]
  queries rather than to the [N, H, T, HW] scores; each site's gates are computed next to its
  attention (in cache) in the layout its logits have, instead of all sites in one tensor that is
  sliced and transposed. log σ keeps the exact form of `_log_sigmoid_symbolic`.
- **One mask.** Only mask token 0's hypernetwork runs; the IoU head is SAM's.

The image tokens carry no mask prompt beyond what `images` holds (one image per mask prompt, as
`DecoderOnnxModel` arranges). Tested against `CPCSAM.decode` in tests/export/test_fused_decoder.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cpcsam.modeling import CPCSAM
from cpcsam.modeling.capl import CalibratedAttention, cross_attention_sites
from cpcsam.modeling.cpcsam import SINGLE_MASK_TOKEN


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[N, L, H·d] → [N, H, L, d]."""
    n, length, width = x.shape
    return x.reshape(n, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[N, H, L, d] → [N, L, H·d]."""
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)


def _per_head_weight(linear: torch.nn.Linear, num_heads: int) -> Tensor:
    """A projection C → H·d as [H, d, C]."""
    if not isinstance(linear, nn.Linear):  # e.g. PEFT's LoRA wrapper: its .weight lacks the adapter
        raise TypeError(f"the fused decoder reads plain nn.Linear weights, got {type(linear).__name__}: "
                        "merge LoRA first (cpcsam.export.onnx.prepare_for_export)")
    out_features, in_features = linear.weight.shape
    return linear.weight.reshape(num_heads, out_features // num_heads, in_features)


class _Gates:
    """The entity module's log-gates log σ(s) for each cross-attention site, one site at a time.

    Returns None for every site when the model has no entity module."""

    def __init__(self, model: CPCSAM, tokens: Tensor, entity_keys: Tensor | None, image_index: Tensor) -> None:
        entity = model.capl.entity
        self.sites = list(cross_attention_sites(model.sam.mask_decoder.transformer))
        if entity is None:
            self.q = None
            return
        if entity_keys is None:
            raise ValueError("a model with the entity module needs the images' entity keys")
        n, t, _ = tokens.shape
        self.heads = entity.num_heads
        q = entity.query_head(entity.query_trunk(tokens)).reshape(n, t, entity.groups, entity.rank)
        self.q = q.transpose(1, 2) * (1.0 / math.sqrt(entity.rank))  # [N, S·H, T, r]
        self.keys = entity_keys if entity_keys.shape[0] == 1 else entity_keys[image_index]  # [·, S·H, r, HW]

    def site(self, path: str, image_major: bool = False) -> Tensor | None:
        """log σ(s) of one site: [N, H, T, HW]; `image_major` [N, H, HW, T]."""
        if self.q is None:
            return None
        i = self.sites.index(path)
        q = self.q[:, i * self.heads : (i + 1) * self.heads]
        k = self.keys[:, i * self.heads : (i + 1) * self.heads]
        s = k.transpose(-1, -2) @ q.transpose(-1, -2) if image_major else q @ k
        return F.logsigmoid(s)


def _token_to_image(attn: CalibratedAttention, tokens: Tensor, image_with_pe: Tensor, image: Tensor,
                    gate: Tensor | None) -> Tensor:
    """SAM's `Attention(q=tokens, k=image_with_pe, v=image)`, projections folded (per entity:
    tokens [N, T, C], image tensors [N, HW, C]; gate [N, H, T, HW])."""
    heads = attn.num_heads
    n, t, c = tokens.shape
    q = _heads(attn.q_proj(tokens), heads)  # N x H x T x d
    scale = 1.0 / math.sqrt(q.shape[-1])
    a = (q * scale) @ _per_head_weight(attn.k_proj, heads)  # N x H x T x C
    logits = (a.reshape(n, heads * t, c) @ image_with_pe.transpose(1, 2)).reshape(n, heads, t, -1)
    if gate is not None:
        logits = logits + gate
    p = torch.softmax(logits, dim=-1)
    pooled = (p.reshape(n, heads * t, -1) @ image).reshape(n, heads, t, c)  # N x H x T x C
    values = pooled @ _per_head_weight(attn.v_proj, heads).transpose(1, 2)  # N x H x T x d
    if attn.v_proj.bias is not None:
        values = values + attn.v_proj.bias.reshape(heads, 1, -1)
    return attn.out_proj(_merge_heads(values))


def _image_to_token_output(attn: CalibratedAttention, p: Tensor, tokens_v: Tensor) -> Tensor:
    """Σ_h P_h (v_h W_o,hᵀ) + b_o: p [N, HW, H, T] (softmax over T), tokens_v [N, T, C] → [N, HW, C]."""
    heads = attn.num_heads
    n, hw, _, t = p.shape
    v = _heads(attn.v_proj(tokens_v), heads)  # N x H x T x d
    w_out = attn.out_proj.weight  # C x H·d
    e = v @ w_out.reshape(w_out.shape[0], heads, -1).permute(1, 2, 0)  # N x H x T x C
    out = p.reshape(n, hw, heads * t) @ e.reshape(n, heads * t, -1)
    return out if attn.out_proj.bias is None else out + attn.out_proj.bias


def _image_to_token(attn: CalibratedAttention, image_with_pe: Tensor, tokens_k: Tensor, tokens_v: Tensor,
                    gate: Tensor | None) -> Tensor:
    """SAM's `Attention(q=image_with_pe, k=tokens_k, v=tokens_v)`, projections folded (per entity:
    image_with_pe [N, HW, C], tokens [N, T, C]; gate [N, H, HW, T])."""
    heads = attn.num_heads
    n, t, c = tokens_k.shape
    k = _heads(attn.k_proj(tokens_k), heads)  # N x H x T x d
    scale = 1.0 / math.sqrt(k.shape[-1])
    w_q = _per_head_weight(attn.q_proj, heads)  # H x d x C
    b = (k * scale) @ w_q  # N x H x T x C
    logits = (image_with_pe @ b.reshape(n, heads * t, c).transpose(1, 2)).reshape(n, -1, heads, t)
    if attn.q_proj.bias is not None:  # b_q · k per key: varies along the softmax row, kept
        logits = logits + ((k * scale) @ attn.q_proj.bias.reshape(heads, -1, 1)).reshape(n, 1, heads, t)
    if gate is not None:
        logits = logits + gate.transpose(1, 2)
    return _image_to_token_output(attn, torch.softmax(logits, dim=-1), tokens_v)


def _per_entity(per_image: Tensor, image_index: Tensor) -> Tensor:
    """Rows of a per-image tensor for each entity; one image serves all by broadcasting (no copy)."""
    return per_image if per_image.shape[0] == 1 else per_image[image_index]


def _first_token_to_image(attn: CalibratedAttention, tokens: Tensor, image_with_pe: Tensor, image: Tensor,
                          image_index: Tensor, gate: Tensor | None) -> Tensor:
    """The first block's token→image attention: keys and values projected once per image
    (image tensors [B, HW, C]), as SAM computes them."""
    heads = attn.num_heads
    q = _heads(attn.q_proj(tokens), heads)  # N x H x T x d
    k = _per_entity(_heads(attn.k_proj(image_with_pe), heads), image_index)  # (1 | N) x H x HW x d
    v = _per_entity(_heads(attn.v_proj(image), heads), image_index)
    logits = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)  # N x H x T x HW
    if gate is not None:
        logits = logits + gate
    return attn.out_proj(_merge_heads(torch.softmax(logits, dim=-1) @ v))


def _first_image_to_token(attn: CalibratedAttention, image_with_pe: Tensor, image_index: Tensor,
                          tokens_k: Tensor, tokens_v: Tensor, gate: Tensor | None) -> Tensor:
    """The first block's image→token attention: its queries are the unchanged image tokens, so they
    are projected once per image (image_with_pe [B, HW, C]) and only the output is folded."""
    heads = attn.num_heads
    q = _heads(attn.q_proj(image_with_pe), heads)  # B x H x HW x d
    q = _per_entity(q, image_index)
    k = _heads(attn.k_proj(tokens_k), heads)  # N x H x T x d
    logits = q @ (k * (1.0 / math.sqrt(k.shape[-1]))).transpose(-1, -2)  # N x H x HW x T
    if gate is not None:
        logits = logits + gate
    p = torch.softmax(logits, dim=-1).transpose(1, 2)  # N x HW x H x T
    return _image_to_token_output(attn, p, tokens_v)


def _sub_pixel_weight(conv: nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """A 2×2, stride-2 transposed convolution as a per-pixel linear map C_in → 2·2·C_out, ordered
    (row offset, column offset, channel): (weight [C_in, 4·C_out], bias [4·C_out])."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (0, 0):
        raise ValueError(f"expected SAM's 2×2 stride-2 upscaling, got {conv}")
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)
    bias = conv.bias.repeat(4) if conv.bias is not None else torch.zeros_like(weight[0])
    return weight, bias


def _upscaled_mask(upscaling: nn.Sequential, keys: Tensor, grid: tuple[int, int], hyper: Tensor) -> Tensor:
    """hyper · upscaling(keys): keys [N, HW, C] (the transformer's image tokens), hyper [N, C'] →
    mask logits [N, 1, m, m].

    SAM's ×4 upscaling (transposed conv, LayerNorm2d, GELU, transposed conv, GELU) stays in the
    transformer's position-major layout: each 2×2 stride-2 transposed convolution is a matrix
    product per position, the norm a LayerNorm over the last axis, and the hypernetwork's dot
    product reads the 32-channel features where they are made. Only the one-channel mask is
    rearranged into an image (SAM's layout would transpose the [N, C, HW] tokens and the
    [N, C', 16·HW] features, the largest tensors of the call). Refinement stages (`refine`), which
    are spatial convolutions, get the features as an image.
    """
    first, norm, act1, second, act2, *stages = upscaling
    n, hw, _ = keys.shape
    h, w = grid
    w1, b1 = _sub_pixel_weight(first)
    y = (keys @ w1 + b1).reshape(n, hw, 4, first.out_channels)  # position, (row, col) offset, channel
    y = act1(F.layer_norm(y, (first.out_channels,), norm.weight, norm.bias, norm.eps))
    w2, b2 = _sub_pixel_weight(second)
    z = act2(y @ w2 + b2).reshape(n, h, w, 2, 2, 2, 2, second.out_channels)  # i, j, a, b, a', b', c
    if stages:  # pixel (4i + 2a + a', 4j + 2b + b')
        image = z.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(n, second.out_channels, 4 * h, 4 * w)
        for stage in stages:
            image = stage(image)
        return (hyper.unsqueeze(1) @ image.flatten(2)).reshape(n, 1, *image.shape[-2:])
    mask = (z.reshape(n, hw * 16, -1) @ hyper.unsqueeze(-1)).reshape(n, h, w, 2, 2, 2, 2)
    return mask.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 1, 4 * h, 4 * w)


def decode_single_mask(model: CPCSAM, images: Tensor, image_index: Tensor, sparse: Tensor,
                       entity_keys: Tensor | None) -> tuple[Tensor, Tensor]:
    """`CPCSAM.decode(images, image_index, sparse, entity_keys=entity_keys)`'s (low_res_logits
    [N, 1, m, m], iou_pred [N, 1]), to float32 rounding."""
    decoder = model.sam.mask_decoder
    transformer = decoder.transformer
    n = sparse.shape[0]
    _, c, h, w = images.shape
    tokens = model._tokens(sparse)
    dense, dense_pe = model._dense_prompt()
    image = (images + dense).flatten(2).transpose(1, 2)  # B x HW x C
    image_pe = dense_pe.flatten(2).transpose(1, 2)  # 1 x HW x C
    gates = _Gates(model, tokens, entity_keys, image_index)

    # Block 0 (skip_first_layer_pe): the image side is per image until its image→token update.
    first = transformer.layers[0]
    if not first.skip_first_layer_pe:
        raise ValueError("the first two-way block must skip the positional encoding (skip_first_layer_pe)")
    image_with_pe = image + image_pe
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    attn_out = _first_token_to_image(first.cross_attn_token_to_image, queries + tokens, image_with_pe, image,
                                     image_index, gates.site("layers.0.cross_attn_token_to_image"))
    queries = first.norm2(queries + attn_out)
    queries = first.norm3(queries + first.mlp(queries))
    attn_out = _first_image_to_token(first.cross_attn_image_to_token, image_with_pe, image_index,
                                     queries + tokens, queries,
                                     gates.site("layers.0.cross_attn_image_to_token", image_major=True))
    keys = first.norm4(_per_entity(image, image_index) + attn_out)

    for i, layer in enumerate(transformer.layers[1:], start=1):
        q = queries + tokens
        queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + tokens, keys + image_pe, keys,
                                   gates.site(f"layers.{i}.cross_attn_token_to_image"))
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        attn_out = _image_to_token(layer.cross_attn_image_to_token, keys + image_pe, queries + tokens, queries,
                                   gates.site(f"layers.{i}.cross_attn_image_to_token", image_major=True))
        keys = layer.norm4(keys + attn_out)

    attn_out = _token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + image_pe, keys,
                               gates.site("final_attn_token_to_image"))
    queries = transformer.norm_final_attn(queries + attn_out)

    hyper = decoder.output_hypernetworks_mlps[0](queries[:, SINGLE_MASK_TOKEN])  # N x C'
    masks = _upscaled_mask(decoder.output_upscaling, keys, (h, w), hyper)
    iou_pred = decoder.iou_prediction_head(queries[:, 0])[:, 0:1]
    return masks, iou_pred
