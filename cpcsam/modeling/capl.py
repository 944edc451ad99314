"""The Causal Prompt Learner (CaPL): task causal module, entity causal module, soft prompt.

CaPL is the small network φ of CPC-SAM (docs/METHOD.md §2). Every part of it starts as the identity
(its last layers are zero-initialised), so a fresh CPC-SAM reproduces the SAM it calibrates: bit
for bit in SAM's order of operations (`CPCSAM.decode(sam_order=True)`), to float32 rounding in the
rearranged decoder that it runs by default (`cpcsam.modeling.decoder`).

- `TaskCausalModule` g_φ reweights each sparse prompt token channel-wise from the token and its
  context ē (the mean over the K prompt groups and over the entity's non-padding tokens):
  ẽ = e ⊙ (1 + tanh(g_φ([e, ē]))); optionally also from the image embedding where the token
  points (`image_features`, see the class).
- `EntityCausalModule` h_φ calibrates the cross attention of the mask decoder's two-way
  transformer (token→image and image→token in every layer, and the final token→image), per
  layer and head, in a low-rank form: s_{t,p} = q_t · k_p / √r with q_t = h_φ^{(l)}(token_t)
  and k_p = W^{(l)}(image embedding + positional encoding at p). The gate C = 2σ(s) multiplies
  the attention probabilities (renormalised), i.e. log C is added to the logits before the
  softmax. At init q = 0, so s = 0, C = 1 and log C = 0: the identity. Token self-attention
  (prompt↔prompt) gets no calibration at all.
- `SoftPrompt` is the `learnable` ablation: one learnable additive embedding per prompt label
  type (negative, positive, box corners), zero-initialised.

`CalibratedAttention` replaces segment-anything's decoder `Attention` at run time: it takes over
the original projections under the same names (`q_proj`, `k_proj`, `v_proj`, `out_proj`), so the
state-dict keys of SAM do not change (official checkpoints still load, PEFT can target them) and
it computes exactly what `Attention` computes, plus an optional additive logit bias.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import torch
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import Tensor, nn
from torch.nn import functional as F

_LOG2 = math.log(2.0)

CAPL_MODES = ("fixed", "learnable", "task", "entity", "causal")



class CalibratedAttention(nn.Module):
    """segment-anything's `Attention`, plus an optional additive bias on the attention logits.

    Holds the original module's projections (not copies), so wrapping changes no parameter and
    no state-dict key. With no bias set, `forward` performs exactly the operations of
    `Attention.forward`, in the same order: the outputs are bit-for-bit identical.

    The bias is set per call by the owner (`CPCSAM.decode(sam_order=True)`) through `logit_bias` and cleared
    afterwards; the last attention probabilities are kept in `last_attn` when `keep_attn` is on
    (used for the attention map A_j of Eq. 2). Both are plain tensor attributes, so tracing for
    ONNX records them as ordinary graph values.
    """

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.embedding_dim = attention.embedding_dim
        self.internal_dim = attention.internal_dim
        self.num_heads = attention.num_heads
        self.q_proj = attention.q_proj
        self.k_proj = attention.k_proj
        self.v_proj = attention.v_proj
        self.out_proj = attention.out_proj
        self.logit_bias: Tensor | None = None
        self.keep_attn = False
        self.last_attn: Tensor | None = None

    def _separate_heads(self, x: Tensor, num_heads: int) -> Tensor:
        b, n, c = x.shape
        x = x.reshape(b, n, num_heads, c // num_heads)
        return x.transpose(1, 2)  # B x N_heads x N_tokens x C_per_head

    def _recombine_heads(self, x: Tensor) -> Tensor:
        b, n_heads, n_tokens, c_per_head = x.shape
        x = x.transpose(1, 2)
        return x.reshape(b, n_tokens, n_heads * c_per_head)  # B x N_tokens x C

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self.q_proj(q)
        k = self.k_proj(k)
        v = self.v_proj(v)

        q = self._separate_heads(q, self.num_heads)
        k = self._separate_heads(k, self.num_heads)
        v = self._separate_heads(v, self.num_heads)

        _, _, _, c_per_head = q.shape
        attn = q @ k.permute(0, 1, 3, 2)  # B x N_heads x N_queries x N_keys
        attn = attn / math.sqrt(c_per_head)
        if self.logit_bias is not None:
            attn = attn + self.logit_bias  # log of the entity gate C: a multiplicative gate after softmax
        attn = torch.softmax(attn, dim=-1)
        if self.keep_attn:
            self.last_attn = attn

        out = attn @ v
        out = self._recombine_heads(out)
        out = self.out_proj(out)
        return out


# The cross-attention sites of a two-way transformer, by module path inside the transformer.
# "t2i" = tokens are the queries, image positions the keys; "i2t" = the reverse.
def cross_attention_sites(transformer: TwoWayTransformer) -> dict[str, str]:
    """{module path relative to the transformer: direction} for every cross attention."""
    sites: dict[str, str] = {}
    for i in range(len(transformer.layers)):
        sites[f"layers.{i}.cross_attn_token_to_image"] = "t2i"
        sites[f"layers.{i}.cross_attn_image_to_token"] = "i2t"
    sites["final_attn_token_to_image"] = "t2i"
    return sites


FINAL_SITE = "final_attn_token_to_image"


def wrap_cross_attention(transformer: TwoWayTransformer) -> dict[str, CalibratedAttention]:
    """Replace each cross `Attention` of the transformer by a `CalibratedAttention` (in place).

    Idempotent. Self-attention modules are left as they are: prompt↔prompt attention is never
    calibrated.
    """
    wrapped: dict[str, CalibratedAttention] = {}
    for path in cross_attention_sites(transformer):
        parent_path, _, name = path.rpartition(".")
        parent = transformer.get_submodule(parent_path) if parent_path else transformer
        module = getattr(parent, name)
        if not isinstance(module, CalibratedAttention):
            module = CalibratedAttention(module)
            setattr(parent, name, module)
        wrapped[path] = module
    return wrapped


def _zero_init(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class TaskCausalModule(nn.Module):
    """g_φ: channel-wise reweighting of sparse prompt tokens from the token and its context.

    ẽ = e ⊙ (1 + tanh(g_φ([e, ē]))), with ē the mean of non-padding tokens, either

    - `all_groups`: of the entity's K groups and P slots (METHOD.md's example), or
    - `own_group`: of the token's own group's P slots only.

    Both are independent of the order of the groups and defined for K = 1. They differ in what
    inference sees: one prompt per entity, so under `all_groups` g_φ meets at inference a context
    it never met in training (the mean of K jittered prompts, often of mixed kinds, has other
    statistics than one prompt's), while under `own_group` each training group is calibrated
    exactly as that prompt alone would be at inference. Padding tokens (label −1, SAM's
    not-a-point embedding) are passed through unchanged, as SAM itself treats them as "no prompt
    here".

    `image_features` (*ours*, off by default): g_φ also reads f, the image embedding at the
    token's position (`sample_prompt_features`), ẽ = e ⊙ (1 + tanh(g_φ([e, ē, LN(f)]))). From
    the prompt alone the noise of an annotation cannot be seen, so a prompt-only g_φ can only
    learn one reweighting for the training noise on average: it softens clean prompts as much
    as noisy ones (measured: it costs 2–5 Dice on clean boxes and on points, while it gains under
    heavy box noise). What the image shows where a corner or a click lands (object, edge or
    background) is the one cue that can tell them apart. f is normalised (LayerNorm) because
    encoder embeddings have another scale than the prompt's Fourier features. On TrashCan it did
    not learn to use that cue at the default budget (reports/study/tuning_trashcan.md): off.
    """

    def __init__(self, dim: int, hidden: int, context: str = "all_groups", image_features: bool = False) -> None:
        super().__init__()
        if context not in ("all_groups", "own_group"):
            raise ValueError(f"task context {context!r} is not 'all_groups' or 'own_group'")
        self.context = context
        self.image_norm = nn.LayerNorm(dim) if image_features else None
        self.fc1 = nn.Linear((3 if image_features else 2) * dim, hidden)
        self.act = nn.GELU()
        self.fc2 = _zero_init(nn.Linear(hidden, dim))  # identity at init: tanh(0) = 0

    @property
    def reads_image(self) -> bool:
        return self.image_norm is not None

    def forward(self, sparse: Tensor, labels: Tensor, features: Tensor | None = None) -> Tensor:
        """sparse [N, K, P, C], labels [N, K, P] (, features [N, K, P, C] when it reads the
        image) → calibrated sparse [N, K, P, C]."""
        valid = (labels != -1).to(sparse.dtype).unsqueeze(-1)  # N x K x P x 1
        dims = (1, 2) if self.context == "all_groups" else (2,)
        count = valid.sum(dim=dims, keepdim=True).clamp_min(1.0)  # N x 1 x 1 x 1 | N x K x 1 x 1
        context = ((sparse * valid).sum(dim=dims, keepdim=True) / count).expand_as(sparse)
        inputs = [sparse, context]
        if self.image_norm is not None:
            if features is None:
                raise ValueError("this task causal module reads the image: pass the prompts' image features")
            inputs.append(self.image_norm(features))
        gate = torch.tanh(self.fc2(self.act(self.fc1(torch.cat(inputs, dim=-1)))))
        return sparse * (1 + gate * valid)


def sample_prompt_features(image_embeddings: Tensor, image_index: Tensor, coords: Tensor, image_size: int) -> Tensor:
    """The image embedding at each prompt position, bilinear: [B, C, h, w], [N], [N, K, P, 2]
    (model frame, x y, pixel centres at +0.5) → [N, K, P, C].

    Written with row gathers from one [B·h·w, C] table instead of `grid_sample`, so that the
    exported decoder graph needs no GridSample and every entity reads its own image without a
    per-entity copy of the embedding. Positions outside the frame read the nearest border cell
    (padding slots hold arbitrary coordinates; their features are ignored downstream).
    """
    b, c, h, w = image_embeddings.shape
    table = image_embeddings.flatten(2).transpose(1, 2).reshape(b * h * w, c)
    # pixel → embedding-grid coordinate, cell centres at integers (align_corners=False convention)
    x = ((coords[..., 0] + 0.5) * (w / image_size) - 0.5).clamp(0, w - 1)
    y = ((coords[..., 1] + 0.5) * (h / image_size) - 0.5).clamp(0, h - 1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = (x - x0).unsqueeze(-1), (y - y0).unsqueeze(-1)
    x0, y0 = x0.to(torch.int64), y0.to(torch.int64)
    x1, y1 = (x0 + 1).clamp_max(w - 1), (y0 + 1).clamp_max(h - 1)
    base = (image_index.to(torch.int64) * (h * w)).reshape(-1, *([1] * (coords.dim() - 2)))

    def cell(yi: Tensor, xi: Tensor) -> Tensor:
        return table[base + yi * w + xi]

    top = cell(y0, x0) * (1 - wx) + cell(y0, x1) * wx
    bottom = cell(y1, x0) * (1 - wx) + cell(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


class SoftPrompt(nn.Module):
    """The `learnable` ablation: e + u[label] with one zero-initialised vector per label type."""

    def __init__(self, dim: int, num_label_types: int = 4) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(num_label_types, dim))

    def forward(self, sparse: Tensor, labels: Tensor) -> Tensor:
        valid = (labels != -1).to(sparse.dtype).unsqueeze(-1)
        offsets = self.embeddings[labels.clamp_min(0)] * valid
        return sparse + offsets


class EntityCalibration(NamedTuple):
    """What the entity causal module produces for one decoder call."""

    biases: dict[str, Tensor]  # site path → log C, [N, H, T, HW] (token→image) or [N, H, HW, T] (image→token)
    l1: Tensor  # scalar: mean |C − 1| over sites, entities, heads and positions


class EntityCausalModule(nn.Module):
    """h_φ and W: a low-rank logit bias for each cross-attention site of the decoder.

    For site l with H heads and rank r: q^{(l)} = h_φ^{(l)}(tokens) ∈ R^{T×H×r} and
    k^{(l)} = W^{(l)}(image + pe) ∈ R^{HW×H×r}; s = q·k/√r per head; the bias is log C with
    C = 2σ(s) ∈ (0, 2): a gate that can suppress a token↔position pair or at most double it.
    h_φ^{(l)} is a 2-layer MLP whose hidden layer is shared by all sites and whose last layer is
    per site (zero-initialised); all sites are computed in one batched product (S·H "heads"),
    which costs a few large kernels instead of many small ones.

    `l1` measures ‖C − 1‖₁ (mean) — the L1 term of Eq. 2 put on the *calibration* rather than on
    C itself: C = 1 means "as SAM had it", so a sparse calibration changes few positions, whereas
    ‖C‖₁ would push every gate towards 0 and starve the attention. |2σ(s) − 1| = |tanh(s/2)|.
    """

    def __init__(self, dim: int, num_heads: int, rank: int, hidden: int, sites: Mapping[str, str]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.rank = rank
        self.sites = dict(sites)
        width = len(self.sites) * num_heads * rank
        self.query_trunk = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.query_head = _zero_init(nn.Linear(hidden, width))  # q = 0 at init → C = 1
        self.key_proj = nn.Linear(dim, width, bias=False)

    @property
    def groups(self) -> int:
        """S·H: one low-rank key/query pair per cross-attention site and head."""
        return len(self.sites) * self.num_heads

    def image_keys(self, image_with_pe: Tensor) -> Tensor:
        """k for every site and head: image_with_pe [B, HW, C] → [B, S·H, r, HW].

        The keys depend on the image alone, so they are computed once per image; the exported
        encoder graph computes them beside the embedding (`cpcsam.export.onnx`), as SAM puts all
        per-image work in the encoder. The layout is the right operand of q·k, so that no decoder
        call transposes them.
        """
        b, hw, _ = image_with_pe.shape
        return self.key_proj(image_with_pe).reshape(b, hw, self.groups, self.rank).permute(0, 2, 3, 1)

    def forward(self, tokens: Tensor, keys: Tensor, image_index: Tensor) -> EntityCalibration:
        """tokens [N, T, C] (as they enter the transformer), keys [B, S·H, r, HW] (`image_keys`),
        image_index [N]. With one image (B = 1) its keys serve every entity by broadcasting: no
        per-entity copy (the exported decoder always gets one image's keys)."""
        n, t, _ = tokens.shape
        hw = keys.shape[-1]
        q = self.query_head(self.query_trunk(tokens)).reshape(n, t, self.groups, self.rank).transpose(1, 2)
        k = keys if keys.shape[0] == 1 else keys[image_index]
        s = (q @ k) * (1.0 / math.sqrt(self.rank))  # N x S·H x T x HW
        # log(2σ(s)) written as log 2 + logσ(s): finite for any s (log(2·sigmoid) hits −inf below
        # s ≈ −104 in float32, and a row of −inf makes the softmax NaN); exactly 0 at s = 0.
        log_gate = (F.logsigmoid(s) + _LOG2).reshape(n, len(self.sites), self.num_heads, t, hw)
        l1 = torch.tanh(0.5 * s).abs().mean()
        biases: dict[str, Tensor] = {}
        for i, (path, direction) in enumerate(self.sites.items()):
            biases[path] = log_gate[:, i] if direction == "t2i" else log_gate[:, i].transpose(-1, -2)
        return EntityCalibration(biases, l1)


class CaPL(nn.Module):
    """The Causal Prompt Learner for one ablation `mode` (see `CAPL_MODES`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sites: Mapping[str, str],
        mode: str = "causal",
        task_hidden: int = 128,
        task_context: str = "all_groups",
        task_image_features: bool = False,
        entity_hidden: int = 64,
        entity_rank: int = 8,
    ) -> None:
        super().__init__()
        if mode not in CAPL_MODES:
            raise ValueError(f"CaPL mode {mode!r} is not one of {CAPL_MODES}")
        self.mode = mode
        self.soft_prompt = SoftPrompt(dim) if mode == "learnable" else None
        self.task = (
            TaskCausalModule(dim, task_hidden, task_context, task_image_features) if mode in ("task", "causal") else None
        )
        self.entity = (
            EntityCausalModule(dim, num_heads, entity_rank, entity_hidden, sites) if mode in ("entity", "causal") else None
        )

    @property
    def reads_image(self) -> bool:
        """Whether `calibrate_prompts` needs the prompts' image features."""
        return self.task is not None and self.task.reads_image

    def calibrate_prompts(self, sparse: Tensor, labels: Tensor, features: Tensor | None = None) -> Tensor:
        if self.task is not None:
            return self.task(sparse, labels, features)
        if self.soft_prompt is not None:
            return self.soft_prompt(sparse, labels)
        return sparse
