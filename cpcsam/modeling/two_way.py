"""SAM's two-way transformer for N entities drawn from B images, the first block's image side shared.

segment-anything's decoder repeats the image embedding once per prompt and runs its
`TwoWayTransformer` on the copies. Until the first block's image→token attention writes into the
image tokens, they are the same for every entity of an image (no mask prompt: the dense
embedding is `no_mask_embed` everywhere), so the first block's three image-side projections —
the token→image keys and values and the image→token queries, each [HW, C] → [HW, C/2] — are
computed here once per image and gathered per entity. At ViT-B decoder sizes they are three of
the ten [HW]-row projections an entity costs in the transformer; everything after them is per
entity, as in SAM.

`two_way_transformer` performs the operations of `TwoWayTransformer.forward` and
`TwoWayAttentionBlock.forward` in their order; only where a projection runs differs. It needs the
cross attentions wrapped as `CalibratedAttention` (`wrap_cross_attention`), which does the
gathering.
"""

from __future__ import annotations

from segment_anything.modeling.transformer import TwoWayTransformer
from torch import Tensor


def two_way_transformer(transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor,
                        image_index: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """image [B, HW, C] (embedding + dense prompt), image_pe [1, HW, C], image_index [N], tokens [N, T, C].

    Returns SAM's (queries [N, T, C], keys [N, HW, C]).
    """
    first = transformer.layers[0]
    if not first.skip_first_layer_pe:  # SAM's first block never adds the PE to its self-attention
        raise ValueError("the first two-way block must skip the positional encoding (skip_first_layer_pe)")
    image_with_pe = image + image_pe

    # Block 0, as TwoWayAttentionBlock.forward with skip_first_layer_pe.
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    attn_out = first.cross_attn_token_to_image(q=queries + tokens, k=image_with_pe, v=image, kv_index=image_index)
    queries = first.norm2(queries + attn_out)
    queries = first.norm3(queries + first.mlp(queries))
    attn_out = first.cross_attn_image_to_token(q=image_with_pe, k=queries + tokens, v=queries, q_index=image_index)
    keys = first.norm4(image[image_index] + attn_out)

    key_pe = image_pe.expand(keys.shape[0], -1, -1)
    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)

    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    queries = transformer.norm_final_attn(queries + attn_out)
    return queries, keys
