"""SAM's mask decoder with CaPL's entity calibration, rearranged for N entities: what `CPCSAM.decode` runs.

segment-anything runs its decoder once per prompt on a copy of the image embedding. Written in
SAM's order (`CPCSAM.decode(sam_order=True)`, SAM's own modules on per-entity copies) that costs,
per entity at the ViT-B decoder's sizes (C = 256 channels, HW = 4096 image positions, H = 8 heads
of d = 16 in the cross attentions, T = 5 + P tokens), ten [HW, C] × [C, H·d] projections and an
image-sized upscaling. Here the same function is computed with less work per entity:

- **The first block's image side once per image.** Until the first block's image→token attention
  writes into the image tokens they are the same for every entity of an image (no mask prompt:
  the dense embedding is `no_mask_embed` everywhere), so that block's token→image keys and values
  and its image→token queries are projected once per image. With one image, its keys' products
  with the entities' queries (and the entity gates' keys' with theirs) run heads first, as one
  [H, N·T, d] × [H, d, HW] product each (`_image_side_product`), without copying the image's side
  for each entity. The image→token logits still broadcast it: heads first there, their softmax's
  output would have to be copied into the entities' layout instead, which measured no faster.
- **Projections folded into the attention.** In a later cross attention between an entity's T
  tokens and its HW positions, the projection can act on the token side because T is small:
  token→image logits are q_h W_k,hᵀ · xᵀ (the key bias adds a constant to each softmax row, which
  the softmax ignores) and its values (P_h x) W_v,hᵀ + b_v (P's rows sum to 1); image→token
  logits are x · (k_h W_q,h)ᵀ + b_q,h · k_hᵀ and its output Σ_h P_h (v_h W_o,hᵀ) + b_o. Each is
  one [HW, C] × [C, H·T] product: 64 columns for a box and a point against H·d = 128, about half
  the multiply-adds while T < 16 tokens (11 prompt points; more are slower, never wrong). LoRA
  adapters (PEFT) are folded into the weights they adapt (W + scaling·B·A), so gradients reach
  them as through PEFT's own forward.
- **The entity gates where they are used.** log C = log 2 + log σ(s): the log 2 is the same for
  every key of a softmax row and is dropped from the logits (not from the L1 term); the 1/√r
  scale is applied to the [N, H, T, r] queries rather than the [N, H, T, HW] scores; each site's
  gates are computed next to its attention. Both directions keep logits as [N, H, T, HW]: the
  image→token softmax runs over dimension 2 (the T tokens), because torch's softmax over a last
  dimension this short is some 30× slower than along the HW positions.
- **The final attention for the two tokens read after it.** The single-mask output reads only
  the iou token and mask token 0 once the final token→image attention has run, and each token's
  row of that attention (and its residual and LayerNorm) depends on that token alone; the other
  T − 2 rows (in training, T = 13: 88 of the H·T = 104 score rows per position) are not computed.
  The entity gates' L1 term still counts that site's every row.
- **onnxruntime's kernels in the exported graph.** Traced for export, the gated softmax and the
  image→token output bias take forms that onnxruntime's CPU kernels run faster (no Log, no
  Softmax over a dimension other than the last, no bias pass over [N, HW, C]): the same function
  to float32 rounding (`_softmax_for_onnxruntime`); PyTorch runs the forms above.
- **Upscaling in the tokens' layout.** SAM's 2×2 stride-2 transposed convolutions are matrix
  products per position, LayerNorm2d a LayerNorm over the last axis, and mask token 0's
  hypernetwork reads the features where they are made; only the one-channel mask is arranged as
  an image (SAM's layout transposes the [N, C, HW] tokens and the [N, C', 16·HW] features).

The result equals SAM's order to float32 rounding (tests/modeling/test_decoder.py), and gradients
too. The exported graph gains more than training does, whose prompts have P = 8 slots (T = 13,
H·T = 104 columns against 128); the measured times are in the README (Performance), from
benchmarks/bench_decoder.py and bench_train.py.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import torch
from segment_anything.modeling import PromptEncoder, Sam
from torch import Tensor, nn
from torch.nn import functional as F

from cpcsam.modeling.capl import FINAL_SITE, EntityCausalModule, cross_attention_sites

# In SAM's decoder the output tokens are [iou token, mask token 0 (single mask), mask tokens 1..3];
# the single-mask output reads the first two.
SINGLE_MASK_TOKEN = 1
OUTPUT_TOKENS_USED = SINGLE_MASK_TOKEN + 1


# prompt encoder → (its Gaussian matrix when computed, that matrix's version, grid, encoding)
_POSITIONAL_ENCODINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dense_positional_encoding(prompt_encoder: PromptEncoder) -> Tensor:
    """SAM's `prompt_encoder.get_dense_pe()`, the positional encoding of the embedding grid [1, C, h, w].

    It depends only on the prompt encoder's random Gaussian matrix, a buffer that no optimiser
    updates, yet `get_dense_pe` computes its sines and cosines on every call (a training step made
    two, 1.1 ms each at ViT-B's 64² grid: about 1 % of a cached step). So it is computed once per
    matrix and grid and kept here. It is recomputed when the matrix is another tensor (`to()`) or
    changed in place (`load_state_dict`). Computed as before on every call: in a trace for export
    (the exported graphs keep their nodes), under autocast (whose reduced-precision product gives
    other values), and where the matrix requires gradients. Nothing may modify the returned tensor
    in place.
    """
    matrix = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    device = matrix.device.type  # autocast has no state for some devices (meta): never enabled there
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or matrix.requires_grad or autocast:
        return prompt_encoder.get_dense_pe()
    grid = tuple(prompt_encoder.image_embedding_size)
    kept = _POSITIONAL_ENCODINGS.get(prompt_encoder)
    if kept is not None and kept[0]() is matrix and kept[1] == matrix._version and kept[2] == grid:
        return kept[3]
    # a normal tensor even when first asked for under inference_mode, so that training can use it
    with torch.inference_mode(False), torch.no_grad():
        encoding = prompt_encoder.get_dense_pe()
    _POSITIONAL_ENCODINGS[prompt_encoder] = (weakref.ref(matrix), matrix._version, grid, encoding)
    return encoding


class DecoderOutput(NamedTuple):
    """What `CPCSAM.decode` returns (single-mask output), one row per entity."""

    low_res_logits: Tensor  # N x 1 x m x m (m = CPCSAM.mask_size, 4h for SAM), logits in the padded model frame
    iou_pred: Tensor  # N x 1, predicted IoU of that mask
    attn_map: Tensor  # N x h x w, final token→image attention of the mask token, head mean, max-scaled to [0, 1]
    calibration_l1: Tensor  # scalar, mean |C − 1| of the entity calibration (0 without it)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """[N, L, H·d] → [N, H, L, d]."""
    n, length, width = x.shape
    return x.reshape(n, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[N, H, L, d] → [N, L, H·d]."""
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)


def _weight_and_bias(linear: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W [out, in], b) of a projection: an `nn.Linear`, or PEFT's LoRA `Linear` with its active
    adapters folded in (W + scaling·B·A, differentiable in A and B)."""
    if isinstance(linear, nn.Linear):
        return linear.weight, linear.bias
    base = getattr(linear, "base_layer", None)
    if not isinstance(base, nn.Linear) or not hasattr(linear, "get_delta_weight"):
        raise TypeError(f"a decoder projection must be nn.Linear or PEFT's LoRA Linear, got {type(linear).__name__}")
    weight = base.weight
    if linear.merged or linear.disable_adapters:  # merged: the base weight holds the adapters already
        return weight, base.bias
    for name in linear.active_adapters:
        if name not in linear.lora_A:
            continue
        if linear.use_dora.get(name, False):
            raise TypeError(f"LoRA adapter {name!r} uses DoRA, which this decoder cannot fold into its weight")
        dropout = linear.lora_dropout[name]
        if linear.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError(f"LoRA adapter {name!r} has dropout {dropout.p}: the decoder folds adapters into "
                             "their weights, which dropout on the adapter's input does not allow (model.lora.dropout: 0)")
        weight = weight + linear.get_delta_weight(name)
    return weight, base.bias


def _per_head(weight: Tensor, num_heads: int) -> Tensor:
    """A projection's weight C → H·d as [H, d, C]."""
    out_features, in_features = weight.shape
    return weight.reshape(num_heads, out_features // num_heads, in_features)


class _Gates:
    """The entity module's log-gates log σ(s) of each cross-attention site, computed one site at a
    time, and the L1 term mean |C − 1| = mean |tanh(s/2)| over all of them (zero without the module)."""

    def __init__(self, entity: EntityCausalModule | None, sites: list[str], tokens: Tensor,
                 entity_keys: Tensor, image_index: Tensor) -> None:
        self.sites = sites
        self.l1_parts: list[Tensor] = []
        self.zero = tokens.new_zeros(())
        self.q = None
        if entity is None:
            return
        n, t, _ = tokens.shape
        self.heads = entity.num_heads
        q = entity.query_head(entity.query_trunk(tokens)).reshape(n, t, entity.groups, entity.rank)
        self.q = q.transpose(1, 2) * (1.0 / math.sqrt(entity.rank))  # [N, S·H, T, r]
        self.keys = _per_entity(entity_keys, image_index)  # [1 | N, S·H, r, HW]

    def site(self, path: str, tokens: int | None = None) -> Tensor | None:
        """The gate logits s of one site, log C = log 2 + log σ(s) (`_softmax` takes the log σ):
        [N, H, T, HW] (for both directions of attention), or its first `tokens` rows only; the L1
        term counts every row either way."""
        if self.q is None:
            return None
        i = self.sites.index(path)
        q = self.q[:, i * self.heads : (i + 1) * self.heads]
        k = self.keys[:, i * self.heads : (i + 1) * self.heads]
        s = _image_side_product(q, k)
        self.l1_parts.append(torch.tanh(0.5 * s).abs().mean())  # every site has N·H·T·HW gates
        return s if tokens is None else s[:, :, :tokens]

    def l1(self) -> Tensor:
        return torch.stack(self.l1_parts).mean() if self.l1_parts else self.zero


def _per_entity(per_image: Tensor, image_index: Tensor) -> Tensor:
    """Rows of a per-image tensor for each entity; one image serves all by broadcasting (no copy)."""
    return per_image if per_image.shape[0] == 1 else per_image[image_index]


def _heads_first(image_side: Tensor) -> bool:
    """Whether products with a per-image tensor of B images run heads first (`_image_side_product`):
    in PyTorch for one image. onnxruntime broadcasts one image to all entities without copying, and
    in an exported graph the heads-first layout would only add Transpose nodes."""
    return image_side.shape[0] == 1 and not torch.onnx.is_in_onnx_export()


def _image_side_product(x: Tensor, image_side: Tensor) -> Tensor:
    """x [N, H, T, a] @ image_side [1 | N, H, a, L] → [N, H, T, L].

    Heads first (`_heads_first`): one [H, N·T, a] × [H, a, L] product, whose result is a view of
    [H, N, T, L] memory. `x @ image_side` broadcasts one image's [1, H, a, L] to [N, H, a, L] by
    copying it, and sums its gradient back over N: the first block's keys and the entity gates'
    keys at the ViT-B decoder's sizes ([N, 8, 16, 4096]). Without those copies (and with the
    output bias folded, `_image_to_token_output`) a LoRA-only training step there (N ≤ 4, 2
    threads, cached embeddings) took 0.94× the time.
    """
    if not _heads_first(image_side):
        return x @ image_side
    n, h, t, a = x.shape
    return (x.transpose(0, 1).reshape(h, n * t, a) @ image_side[0]).reshape(h, n, t, -1).transpose(0, 1)


def _softmax(logits: Tensor, gate: Tensor | None, dim: int) -> Tensor:
    """softmax(logits + log σ(gate)) along `dim`; gate: an entity gate site's logits s, or None."""
    if torch.onnx.is_in_onnx_export():
        return _softmax_for_onnxruntime(logits, gate, dim)
    return torch.softmax(logits if gate is None else logits + F.logsigmoid(gate), dim=dim)


def _softmax_for_onnxruntime(logits: Tensor, gate: Tensor | None, dim: int) -> Tensor:
    """`_softmax` written for onnxruntime's CPU kernels, which the exported decoder runs.

    With a gate: exp(u − max u) · σ(|s|) / Σ(…) along `dim`, u = logits + min(s, 0). It is
    softmax(logits + log σ(s)) by log σ(s) = min(s, 0) + log σ(|s|) and exp(log σ(|s|)) = σ(|s|),
    the max taken over u instead of over the whole exponent (they differ by log σ(|s|) ∈
    [−log 2, 0], so nothing overflows). Why not the plain form: onnxruntime's Log is some 5×
    slower than its Sigmoid on these [N, H, T, HW] tensors, and its Softmax over a dimension other
    than the last (the image→token attention's, dimension 2) transposes to the last and back:
    measured at 16 entities of the ViT-B decoder (H = 8, T = 8, HW = 4096, 2 threads), one
    image→token site 22.9 → 10.4 ms, one token→image site 12.6 → 9.4 ms.

    Saturated gates keep their exact value: min(s, 0) is s itself below 0, and a row whose gates
    are all saturated is decided by their differences (e.g. e^(−100 − (−200))), as in PyTorch's
    logsigmoid(s) ≈ s. σ is only evaluated on |s|, where it lies in [0.5, 1]: onnxruntime's Sigmoid
    is a rational approximation whose negative tail is coarse (σ(−17) = 8.9e−8) and exactly 0 from
    s ≈ −18 down, so Log(Sigmoid(s)) would be −inf there and any floor would give every saturated
    gate the same value. The row's max term has weight ≥ 1/2: the sum is never 0.
    """
    if gate is None:
        if dim in (-1, logits.dim() - 1):
            return torch.softmax(logits, dim=dim)
        e = torch.exp(logits - logits.amax(dim=dim, keepdim=True))  # not onnxruntime's transposing Softmax
        return e / e.sum(dim=dim, keepdim=True)
    u = logits + torch.clamp(gate, max=0.0)
    e = torch.exp(u - u.amax(dim=dim, keepdim=True)) * torch.sigmoid(gate.abs())
    return e / e.sum(dim=dim, keepdim=True)


def _token_to_image(attn: nn.Module, tokens: Tensor, image_with_pe: Tensor, image: Tensor,
                    gate: Tensor | None) -> tuple[Tensor, Tensor]:
    """SAM's `Attention(q=tokens, k=image_with_pe, v=image)` with the projections folded (tokens
    [N, T, C], image tensors [N, HW, C]; gate [N, H, T, HW]). Returns (output, probabilities)."""
    heads = attn.num_heads
    n, t, c = tokens.shape
    q = _heads(attn.q_proj(tokens), heads)  # N x H x T x d
    w_k, _ = _weight_and_bias(attn.k_proj)  # the key bias shifts whole softmax rows: no effect
    a = (q * (1.0 / math.sqrt(q.shape[-1]))) @ _per_head(w_k, heads)  # N x H x T x C
    logits = _product_with_transposed(a.reshape(n, heads * t, c), image_with_pe).reshape(n, heads, t, -1)
    p = _softmax(logits, gate, dim=-1)
    pooled = (p.reshape(n, heads * t, -1) @ image).reshape(n, heads, t, c)  # N x H x T x C
    w_v, b_v = _weight_and_bias(attn.v_proj)
    values = pooled @ _per_head(w_v, heads).transpose(1, 2)  # N x H x T x d
    if b_v is not None:  # P's rows sum to 1: the value bias passes through unchanged
        values = values + b_v.reshape(heads, 1, -1)
    return attn.out_proj(_merge_heads(values)), p


def _image_to_token_output(attn: nn.Module, p: Tensor, tokens_v: Tensor) -> Tensor:
    """Σ_h P_hᵀ (v_h W_o,hᵀ) + b_o: p [N, H, T, HW] (softmax over T), tokens_v [N, T, C] → [N, HW, C].

    The probabilities stay in the keys-by-positions layout: torch's softmax over a short last
    dimension (T ≈ 7–13 tokens) is some 30× slower than over dimension 2 of this layout, where it
    runs along the HW positions (ViT-B: 7 ms against 0.3 ms per call, N = 4, 2 threads).
    """
    heads = attn.num_heads
    n, _, t, hw = p.shape
    v = _heads(attn.v_proj(tokens_v), heads)  # N x H x T x d
    w_o, b_o = _weight_and_bias(attn.out_proj)  # C x H·d
    e = (v @ w_o.reshape(w_o.shape[0], heads, -1).permute(1, 2, 0)).reshape(n, heads * t, -1)  # N x H·T x C
    p_t = p.reshape(n, heads * t, hw).transpose(1, 2)
    if b_o is None:
        return p_t @ e
    # Each position's probabilities sum to 1 per head, to H over the H·T rows of e: b_o / H on each
    # row adds b_o, inside the product. A bias added to the [N, HW, C] output would be a pass of its
    # own over it: in onnxruntime, which has no batched product with a bias (4 ms at N = 16,
    # ViT-B), and in torch's `baddbmm` too, which first copies the bias into every row of it.
    return p_t @ (e + b_o / heads)


def _image_to_token(attn: nn.Module, image_with_pe: Tensor, tokens_k: Tensor, tokens_v: Tensor,
                    gate: Tensor | None) -> Tensor:
    """SAM's `Attention(q=image_with_pe, k=tokens_k, v=tokens_v)` with the projections folded
    (image_with_pe [N, HW, C], tokens [N, T, C]; gate [N, H, T, HW])."""
    heads = attn.num_heads
    n, t, c = tokens_k.shape
    k = _heads(attn.k_proj(tokens_k), heads)  # N x H x T x d
    k = k * (1.0 / math.sqrt(k.shape[-1]))
    w_q, b_q = _weight_and_bias(attn.q_proj)
    b = k @ _per_head(w_q, heads)  # N x H x T x C
    logits = (b.reshape(n, heads * t, c) @ image_with_pe.transpose(1, 2)).reshape(n, heads, t, -1)
    if b_q is not None:  # b_q · k varies along the softmax (over the keys): kept
        logits = logits + k @ b_q.reshape(heads, -1, 1)
    return _image_to_token_output(attn, _softmax(logits, gate, dim=2), tokens_v)


def _first_token_to_image(attn: nn.Module, tokens: Tensor, image_with_pe: Tensor, image: Tensor,
                          image_index: Tensor, gate: Tensor | None) -> Tensor:
    """The first block's token→image attention: keys and values projected once per image
    (image tensors [B, HW, C]), as SAM computes them."""
    heads = attn.num_heads
    q = _heads(attn.q_proj(tokens), heads)  # N x H x T x d
    k = _per_entity(_heads(attn.k_proj(image_with_pe), heads), image_index)  # (1 | N) x H x HW x d
    v = _per_entity(_heads(attn.v_proj(image), heads), image_index)
    logits = _image_side_product(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))  # N x H x T x HW
    if _heads_first(k):  # softmax and values in the logits' [H, N, T, HW] memory: no copies
        n, t = q.shape[0], q.shape[2]
        p = _softmax(logits.transpose(0, 1), None if gate is None else gate.transpose(0, 1), dim=-1)
        out = (p.reshape(heads, n * t, -1) @ v[0]).reshape(heads, n, t, -1).transpose(0, 1)  # N x H x T x d
    else:
        out = _softmax(logits, gate, dim=-1) @ v
    return attn.out_proj(_merge_heads(out))


def _first_image_to_token(attn: nn.Module, image_with_pe: Tensor, image_index: Tensor,
                          tokens_k: Tensor, tokens_v: Tensor, gate: Tensor | None) -> Tensor:
    """The first block's image→token attention: its queries are the unchanged image tokens, so they
    are projected once per image (image_with_pe [B, HW, C]) and only the output is folded."""
    heads = attn.num_heads
    q = _per_entity(_heads(attn.q_proj(image_with_pe), heads), image_index)  # (1 | N) x H x HW x d
    k = _heads(attn.k_proj(tokens_k), heads)  # N x H x T x d
    logits = (k * (1.0 / math.sqrt(k.shape[-1]))) @ q.transpose(-1, -2)  # N x H x T x HW
    return _image_to_token_output(attn, _softmax(logits, gate, dim=2), tokens_v)


def _sub_pixel_weight(conv: nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """A 2×2, stride-2 transposed convolution as a per-position linear map C_in → 2·2·C_out, ordered
    (row offset, column offset, channel): (weight [C_in, 4·C_out], bias [4·C_out])."""
    if tuple(conv.kernel_size) != (2, 2) or tuple(conv.stride) != (2, 2) or tuple(conv.padding) != (0, 0):
        raise ValueError(f"expected SAM's 2×2 stride-2 upscaling, got {conv}")
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)
    bias = conv.bias.repeat(4) if conv.bias is not None else torch.zeros_like(weight[0])
    return weight, bias


class _TransposedProductFunction(torch.autograd.Function):
    """a [N, R, C] @ x [N, L, C]ᵀ → [N, R, L], with x's gradient made in x's layout.

    bmm's own backward forms the gradient of xᵀ as aᵀ @ grad ([N, C, L]); x's gradient is then its
    transposed view, and autograd adds it to x's other gradients across their rows: in the cached
    ViT-B step (4 entities), each such sum of two [4, 4096, 256] gradients took 6.0–7.5 ms against
    1.4–1.7 ms for contiguous ones (benchmarks/roofline.py found them). gradᵀ @ a is the same
    products with the same sums, the same bits, written as [N, L, C].
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(a, x)
        return a @ x.transpose(1, 2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, x = ctx.saved_tensors
        # Under autocast the forward's product ran in its lower precision and `grad` comes in it:
        # the products in that precision, as autocast's own casts and bmm's backward would compute
        # them, and each gradient in its input's dtype (a no-op in float32).
        low = grad.dtype
        grad_a = (grad @ x.to(low)).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_x = (grad.transpose(1, 2) @ a.to(low)).to(x.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_x


def _gradients_wanted(*inputs: Tensor) -> bool:
    """Whether autograd will ask for gradients of any of `inputs`: where the decoder's own backward
    functions replace autograd's. Never in an exported graph, which has no backward and no Python
    functions."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
            and not torch.onnx.is_in_onnx_export())


def _product_with_transposed(a: Tensor, x: Tensor) -> Tensor:
    """a [N, R, C] @ x [N, L, C]ᵀ; with `_TransposedProductFunction`'s gradients where they are
    wanted (`_gradients_wanted`)."""
    if _gradients_wanted(a, x) and a.shape[0] == x.shape[0]:  # (one x broadcast to N would need its gradient summed)
        return _TransposedProductFunction.apply(a, x)
    return a @ x.transpose(1, 2)


class _HyperProductFunction(torch.autograd.Function):
    """pixels [N, P, C] @ hyper [N, C, 1] → [N, P, 1], with its gradients in the layouts that are
    cheap to make: bmm's own backward forms the pixels' gradient as a product over a dimension of
    one ([N, P, 1] @ [N, 1, C]) and the hypernetwork's by reading the pixels across their rows
    ([N, C, P] @ [N, P, 1]). Here they are a broadcast multiplication (the same products, the
    same bits) and grad [N, 1, P] @ pixels [N, P, C], which reads the pixels along their rows
    (ViT-B sizes, 4 entities, one thread: 19 → 2.4 ms; the sums in another order, so other
    rounding)."""

    @staticmethod
    def forward(ctx: Any, pixels: Tensor, hyper: Tensor) -> Tensor:
        ctx.save_for_backward(pixels, hyper)
        return pixels @ hyper

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        pixels, hyper = ctx.saved_tensors
        grad_pixels = grad * hyper.transpose(1, 2) if ctx.needs_input_grad[0] else None
        grad_hyper = (grad.transpose(1, 2) @ pixels).transpose(1, 2) if ctx.needs_input_grad[1] else None
        return grad_pixels, grad_hyper


def _hyper_product(pixels: Tensor, hyper: Tensor) -> Tensor:
    """The hypernetwork's mask, pixels [N, P, C] · hyper [N, C] → [N, P, 1]: the same forward either
    way; the gradients of `_HyperProductFunction` where they are wanted (`_gradients_wanted`)."""
    hyper = hyper.unsqueeze(-1)
    if _gradients_wanted(pixels, hyper):
        return _HyperProductFunction.apply(pixels, hyper)
    return pixels @ hyper


def _upscaled_mask(upscaling: nn.Sequential, keys: Tensor, grid: tuple[int, int], hyper: Tensor) -> Tensor:
    """hyper · upscaling(keys) in the tokens' layout: keys [N, HW, C], hyper [N, C'] → [N, 1, m, m].

    SAM's ×4 upscaling is (transposed conv, LayerNorm2d, GELU, transposed conv, GELU); refinement
    stages after it (`refine`, spatial convolutions) get the features as an image.
    """
    first, norm, act1, second, act2, *stages = upscaling
    n, hw, _ = keys.shape
    h, w = grid
    w1, b1 = _sub_pixel_weight(first)
    # addmm: each bias is added inside its product, not in a pass of its own over the features;
    # y: position, (row, col) offset, channel
    y = torch.addmm(b1, keys.reshape(n * hw, -1), w1).reshape(n, hw, 4, first.out_channels)
    y = act1(F.layer_norm(y, (first.out_channels,), norm.weight, norm.bias, norm.eps))
    w2, b2 = _sub_pixel_weight(second)
    z = act2(torch.addmm(b2, y.reshape(-1, first.out_channels), w2))
    z = z.reshape(n, h, w, 2, 2, 2, 2, second.out_channels)  # i, j, a, b, a', b', channel
    if stages:  # pixel (4i + 2a + a', 4j + 2b + b')
        # Channels last: an [N, C', 4h, 4w] view of [N, 4h, 4w, C'] memory, which the stages keep.
        # oneDNN's 3×3 convolutions over these few channels (8 in the embedded default) ran 2.2×
        # faster forward and backward in it (a stage at 8 entities, 64² → 128²: 54 → 24 ms, one
        # thread), and the hypernetwork's product then reads each pixel's channels contiguously.
        # An exported graph has no memory layouts, only transposes: it is traced in NCHW.
        channels_last = not torch.onnx.is_in_onnx_export()
        if channels_last:
            image = z.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(n, 4 * h, 4 * w, -1).permute(0, 3, 1, 2)
        else:
            image = z.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(n, second.out_channels, 4 * h, 4 * w)
        for stage in stages:
            image = stage(image)
        if not channels_last:
            return (hyper.unsqueeze(1) @ image.flatten(2)).reshape(n, 1, *image.shape[-2:])
        _, channels, height, width = image.shape
        pixels = image.permute(0, 2, 3, 1).reshape(n, height * width, channels)  # a view: no copy
        return _hyper_product(pixels, hyper).reshape(n, 1, height, width)
    mask = _hyper_product(z.reshape(n, hw * 16, -1), hyper).reshape(n, h, w, 2, 2, 2, 2)
    return mask.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 1, 4 * h, 4 * w)


def decode_entities(sam: Sam, entity: EntityCausalModule | None, images: Tensor, dense: Tensor, image_index: Tensor,
                    tokens: Tensor, entity_keys: Tensor | None) -> DecoderOutput:
    """images [B, C, h, w] (embeddings), dense [1, C, 1, 1] (the dense prompt, added to every image
    position), image_index [N], tokens [N, T, C] (iou, mask and prompt tokens), entity_keys
    [1 | B, S·H, r, HW] (with the entity module; made from the image tokens when None) → `DecoderOutput`."""
    decoder = sam.mask_decoder
    transformer = decoder.transformer
    n = tokens.shape[0]
    _, c, h, w = images.shape
    # Contiguous once per image: as a transposed view, every per-entity sum with it came out in its
    # channel-first layout, which each LayerNorm then copied, forward and backward ([N, HW, C] each).
    # The dense prompt is added in this layout, not before the transpose: the first block's value
    # projection then reads an Add's output. Reading the Transpose's, onnxruntime folded the transpose
    # into that MatMul (a FusedMatMul with transA), 1.85 against 1.53 ms at the ViT-B decoder's sizes.
    image = images.flatten(2).transpose(1, 2).contiguous() + dense.reshape(1, 1, -1)  # B x HW x C
    image_pe = dense_positional_encoding(sam.prompt_encoder).flatten(2).transpose(1, 2)  # 1 x HW x C
    image_with_pe = image + image_pe
    if entity is not None and entity_keys is None:
        entity_keys = entity.image_keys(image_with_pe)
    gates = _Gates(entity, list(cross_attention_sites(transformer)), tokens, entity_keys, image_index)

    # Block 0 (skip_first_layer_pe): the image side is per image until its image→token update.
    first = transformer.layers[0]
    if not first.skip_first_layer_pe:
        raise ValueError("the first two-way block must skip the positional encoding (skip_first_layer_pe)")
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    attn_out = _first_token_to_image(first.cross_attn_token_to_image, queries + tokens, image_with_pe, image,
                                     image_index, gates.site("layers.0.cross_attn_token_to_image"))
    queries = first.norm2(queries + attn_out)
    queries = first.norm3(queries + first.mlp(queries))
    attn_out = _first_image_to_token(first.cross_attn_image_to_token, image_with_pe, image_index,
                                     queries + tokens, queries,
                                     gates.site("layers.0.cross_attn_image_to_token"))
    keys = first.norm4(_per_entity(image, image_index) + attn_out)

    for i, layer in enumerate(transformer.layers[1:], start=1):
        q = queries + tokens
        queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        keys_with_pe = keys + image_pe  # both cross attentions of the block read it: made once
        attn_out, _ = _token_to_image(layer.cross_attn_token_to_image, queries + tokens, keys_with_pe, keys,
                                      gates.site(f"layers.{i}.cross_attn_token_to_image"))
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        attn_out = _image_to_token(layer.cross_attn_image_to_token, keys_with_pe, queries + tokens, queries,
                                   gates.site(f"layers.{i}.cross_attn_image_to_token"))
        keys = layer.norm4(keys + attn_out)

    # The final attention only for the tokens read after it: each token's row of a token→image
    # attention, its residual and its LayerNorm depend on that token alone.
    used = OUTPUT_TOKENS_USED
    attn_out, final_attn = _token_to_image(transformer.final_attn_token_to_image, (queries + tokens)[:, :used],
                                           keys + image_pe, keys, gates.site(FINAL_SITE, tokens=used))
    queries = transformer.norm_final_attn(queries[:, :used] + attn_out)

    hyper = decoder.output_hypernetworks_mlps[0](queries[:, SINGLE_MASK_TOKEN])  # N x C'
    masks = _upscaled_mask(decoder.output_upscaling, keys, (h, w), hyper)
    iou_pred = decoder.iou_prediction_head(queries[:, 0])[:, 0:1]
    return DecoderOutput(masks, iou_pred, attention_map(final_attn, (h, w)), gates.l1())


def attention_map(final_attn: Tensor, grid: tuple[int, int]) -> Tensor:
    """A_j of Eq. 2 from the final token→image attention [N, H, T, HW]: the mask token's row, mean
    over heads, divided by its max so that each map spans [0, 1] whatever its spread (a softmax
    over HW positions sums to 1, so its raw values shrink with the grid size)."""
    attn_map = final_attn[:, :, SINGLE_MASK_TOKEN, :].mean(dim=1)
    attn_map = attn_map / attn_map.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return attn_map.reshape(final_attn.shape[0], *grid)
