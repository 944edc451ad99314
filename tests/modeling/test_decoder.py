"""The rearranged decoder (`CPCSAM.decode`) against SAM's order (`sam_order=True`): outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from modeling_helpers import randomize

from cpcsam.modeling import build_cpcsam


def _model(arch: str = "small", mode: str = "causal", lora: bool = True, seed: int = 0):
    """`arch` with LoRA adapters live (PEFT) and CaPL moved off its identity init: every term matters."""
    torch.manual_seed(seed)
    model = build_cpcsam({"type": arch, "capl": {"mode": mode}}, with_lora=lora)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("capl.") or "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _inputs(model, images: int, entities: int, points: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    c = model.sam.prompt_encoder.embed_dim
    h, w = model.embedding_size
    embeddings = torch.randn(images, c, h, w, generator=gen)
    index = torch.randint(0, images, (entities,), generator=gen)
    coords = torch.rand(entities, points, 2, generator=gen) * model.image_size
    labels = torch.tensor([[(-1, 0, 1, 2, 3)[(i + j) % 5] for j in range(points)] for i in range(entities)])
    return embeddings, index, model.embed_prompts(coords, labels)


def _both_orders(model, embeddings, index, sparse):
    """{sam_order: (outputs, parameter gradients)} for a loss that reads every output."""
    results = {}
    for sam_order in (True, False):
        model.zero_grad()
        out = model.decode(embeddings, index, sparse, sam_order=sam_order)
        loss = out.low_res_logits.sigmoid().mean() + out.iou_pred.sum() + out.attn_map.square().mean() + out.calibration_l1
        loss.backward()
        results[sam_order] = out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return results


def _assert_same_function(model, embeddings, index, sparse):
    (ref, ref_grads), (out, grads) = _both_orders(model, embeddings, index, sparse).values()
    scale = float(ref.low_res_logits.abs().max())
    torch.testing.assert_close(out.low_res_logits, ref.low_res_logits, rtol=0, atol=2e-5 * max(1.0, scale))
    torch.testing.assert_close(out.iou_pred, ref.iou_pred, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.attn_map, ref.attn_map, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.calibration_l1, ref.calibration_l1, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()), msg=name)
    return ref, ref_grads


@pytest.mark.parametrize(
    "arch,mode,images,entities,points",
    [
        ("small", "causal", 1, 5, 3),  # a refinement stage after SAM's ×4 upscaling
        ("small", "causal", 3, 7, 1),  # entities of several images
        ("small", "causal", 1, 2, 14),  # T = 19 tokens: past the point where folding saves work
        ("small", "fixed", 2, 4, 6),  # no entity module: no gates, no L1
        ("small", "fixed", 1, 3, 2),  # the same, one image: its side of the first block heads first
        ("base_small", "causal", 1, 3, 4),  # SAM's own upscaling only, 8 heads
    ],
)
def test_same_outputs_and_gradients_as_sams_order(arch, mode, images, entities, points):
    model = _model(arch, mode)
    ref, grads = _assert_same_function(model, *_inputs(model, images, entities, points, seed=entities))
    assert any("lora_A" in name for name in grads)  # the adapters are trained through the folded weights
    assert (ref.calibration_l1 > 0) == (mode == "causal")


def test_same_function_with_saturated_gates():
    """Gates far in log σ's linear tail (s ≈ −1e4) decide whole image→token rows: they must agree too."""
    model = _model()
    with torch.no_grad():  # s scales with the entity module's queries
        model.capl.entity.query_head.weight.mul_(300.0)
        model.capl.entity.query_head.bias.mul_(300.0)
    embeddings, index, sparse = _inputs(model, 1, 6, 3, seed=4)
    gates = model.entity_calibration(embeddings, index, sparse)
    assert min(float(g.min()) for g in gates.values()) < -1000
    _assert_same_function(model, embeddings, index, sparse)


def test_merged_and_live_adapters_decode_alike():
    from cpcsam.modeling import merge_lora

    model = _model().eval()
    embeddings, index, sparse = _inputs(model, 1, 3, 3, seed=2)
    with torch.no_grad():
        live = model.decode(embeddings, index, sparse)
        merge_lora(model)
        merged = model.decode(embeddings, index, sparse)
    torch.testing.assert_close(merged.low_res_logits, live.low_res_logits, rtol=0, atol=1e-5)


def test_adapter_dropout_in_training_is_refused():
    """Dropout on an adapter's input cannot be folded into a weight: say so rather than train another model."""
    torch.manual_seed(0)
    model = build_cpcsam({"type": "small", "capl": {"mode": "causal"}, "lora": {"dropout": 0.1}}, with_lora=True)
    randomize(model.capl, std=0.1)
    embeddings, index, sparse = _inputs(model, 1, 2, 3, seed=0)
    with pytest.raises(ValueError, match="dropout"):
        model.train().decode(embeddings, index, sparse)
    model.eval().decode(embeddings, index, sparse)  # dropout is off in eval mode


def test_attention_map_is_the_single_mask_tokens_row_max_scaled():
    """A_j (Eq. 2) reads mask token 0 (token 1 after the IoU token), mean over heads, max 1 per entity."""
    from cpcsam.modeling.decoder import attention_map

    final = torch.rand(2, 4, 7, 12, generator=torch.Generator().manual_seed(0))  # N x H x T x HW
    row = final[:, :, 1].mean(dim=1)
    expected = (row / row.amax(dim=-1, keepdim=True)).reshape(2, 3, 4)
    torch.testing.assert_close(attention_map(final, (3, 4)), expected)


def test_the_hypernetwork_products_own_gradients_are_exact():
    """`_HyperProductFunction`'s backward, written out for speed, against finite differences in
    float64 (tolerances far below any slip of a factor or a transpose), for both inputs and each
    alone; the plain product where no gradient is wanted."""
    from cpcsam.modeling.decoder import _hyper_product

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 40, 5, dtype=torch.float64, generator=gen)
    hyper = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    for wants in ((True, True), (True, False), (False, True)):
        p, h = pixels.clone().requires_grad_(wants[0]), hyper.clone().requires_grad_(wants[1])
        out = _hyper_product(p, h)
        assert type(out.grad_fn).__name__ == "_HyperProductFunctionBackward"
        assert torch.autograd.gradcheck(_hyper_product, (p, h), atol=1e-9, rtol=1e-7)
    with torch.no_grad():
        out = _hyper_product(pixels.requires_grad_(), hyper)
    assert out.grad_fn is None
    torch.testing.assert_close(out, pixels @ hyper.unsqueeze(-1), rtol=0, atol=0)


def test_the_transposed_products_gradients_are_autograds_bits_in_the_inputs_layout():
    """`_TransposedProductFunction` (the token→image logits, a @ xᵀ): the same bits as autograd's
    own backward for both inputs, x's gradient made contiguous like x where autograd's is a
    transposed view (whose sum with x's other gradients ran 4× slower), finite differences in
    float64, and the plain product where no gradient is wanted or one x is broadcast over a's rows."""
    from cpcsam.modeling.decoder import _product_with_transposed

    gen = torch.Generator().manual_seed(0)
    a, x = torch.randn(3, 13, 32, generator=gen), torch.randn(3, 64, 32, generator=gen)
    grad = torch.randn(3, 13, 64, generator=gen)

    def gradients(product) -> tuple[Tensor, Tensor, Tensor]:
        """(a's gradient, x's, x's as the product's backward made it, before autograd stores it)."""
        leaves = [t.clone().requires_grad_() for t in (a, x)]
        made = []
        x_inner = leaves[1] * 1.0  # not a leaf: its hook sees the gradient as made
        x_inner.register_hook(made.append)
        product(leaves[0], x_inner).backward(grad)
        return leaves[0].grad, leaves[1].grad, made[0]

    ours = gradients(_product_with_transposed)
    theirs = gradients(lambda u, v: u @ v.transpose(1, 2))
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    assert ours[2].is_contiguous() and not theirs[2].is_contiguous()

    def under_autocast(product) -> list[Tensor]:  # bfloat16 training on the CPU (`train.amp`)
        leaves = [t.clone().requires_grad_() for t in (a, x)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = product(*leaves)
        out.float().sum().backward()
        return [out, leaves[0].grad, leaves[1].grad]

    for mine, reference in zip(under_autocast(_product_with_transposed), under_autocast(lambda u, v: u @ v.transpose(1, 2))):
        assert mine.dtype == reference.dtype
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    doubles = (a[:2, :3, :4].double().requires_grad_(), x[:2, :5, :4].double().requires_grad_())
    assert type(_product_with_transposed(*doubles).grad_fn).__name__ == "_TransposedProductFunctionBackward"
    assert torch.autograd.gradcheck(_product_with_transposed, doubles, atol=1e-9, rtol=1e-7)
    with torch.no_grad():
        assert _product_with_transposed(*doubles).grad_fn is None
    one_x = _product_with_transposed(doubles[0], doubles[1][:1])  # broadcast: autograd's own backward
    assert type(one_x.grad_fn).__name__ != "_TransposedProductFunctionBackward"


def test_the_dense_positional_encoding_is_sams_kept_once_and_renewed_when_its_matrix_changes():
    """`dense_positional_encoding`: SAM's `get_dense_pe`, the same bits; one tensor while the
    Gaussian matrix stands, a new one after `load_state_dict` changes it in place or another tensor
    replaces it (as `to()` does); under autocast SAM's own reduced-precision values, not the kept
    ones; and, first made under `inference_mode`, still usable by a training step."""
    from cpcsam.modeling.decoder import dense_positional_encoding

    model = _model(lora=False)
    encoder = model.sam.prompt_encoder

    def sams() -> Tensor:
        return encoder.get_dense_pe()

    with torch.inference_mode():
        first = dense_positional_encoding(encoder)
    assert not first.is_inference()
    torch.testing.assert_close(first, sams(), rtol=0, atol=0)
    assert dense_positional_encoding(encoder) is first

    matrix = encoder.pe_layer.positional_encoding_gaussian_matrix
    replacement = 3.0 * matrix  # another tensor at the same version, as `to()` makes
    assert replacement._version == matrix._version
    encoder.pe_layer.register_buffer("positional_encoding_gaussian_matrix", replacement)
    torch.testing.assert_close(dense_positional_encoding(encoder), sams(), rtol=0, atol=0)
    assert not torch.equal(dense_positional_encoding(encoder), first)
    first = dense_positional_encoding(encoder)

    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    state["pe_layer.positional_encoding_gaussian_matrix"].mul_(2.0)
    encoder.load_state_dict(state)
    renewed = dense_positional_encoding(encoder)
    assert renewed is not first
    torch.testing.assert_close(renewed, sams(), rtol=0, atol=0)
    assert not torch.equal(renewed, first)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(dense_positional_encoding(encoder), sams(), rtol=0, atol=0)
        assert not torch.equal(sams(), renewed)  # autocast's values differ: none kept under it
    assert dense_positional_encoding(encoder) is renewed

    embeddings, index, sparse = _inputs(model, 1, 2, 3, seed=0)
    model.decode(embeddings, index, sparse).low_res_logits.sum().backward()  # a kept tensor in autograd
