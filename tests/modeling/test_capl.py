"""CaPL: identity at init (bit for bit in SAM's order, every mode), calibration shapes and zeros, learning moves it."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling.transformer import Attention

from cpcsam.errors import ConfigError
from cpcsam.modeling import CAPL_MODES, CPCSAM, CalibratedAttention, capl_parameters, sam_parameters
from cpcsam.modeling.capl import cross_attention_sites
from modeling_helpers import random_prompts, randomize



def _inputs(model: CPCSAM, n: int = 5, p: int = 4, b: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = model.embedding_size
    emb = torch.randn(b, model.sam.prompt_encoder.embed_dim, h, w, generator=gen)
    index = torch.randint(0, b, (n,), generator=gen)
    coords, labels = random_prompts(n, p, model.image_size, gen)
    return emb, index, coords, labels


@pytest.mark.parametrize("mode", CAPL_MODES)
def test_cpcsam_at_init_is_plain_sam_bit_for_bit(small_sam, mode):
    plain = copy.deepcopy(small_sam)
    model = CPCSAM(small_sam, {"mode": mode}).eval()
    emb, _, coords, labels = _inputs(model, n=5, p=4)
    index = torch.zeros(5, dtype=torch.long)  # SAM's decoder takes one image and repeats it per prompt
    k_groups = 3
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels)
        # The same prompts as SAM's own prompt encoder makes them: box corners first here, then points.
        grouped = sparse[:, None].expand(-1, k_groups, -1, -1).contiguous()
        grouped[:, 1] = sparse.flip(0)  # other groups hold other prompts: the context differs from e
        calibrated = model.calibrate_prompts(grouped, labels[:, None].expand(-1, k_groups, -1))
        assert torch.equal(calibrated[:, 0], sparse)
        out = model.decode(emb, index, calibrated[:, 0], sam_order=True)
        rearranged = model.decode(emb, index, calibrated[:, 0])  # the default: SAM to float32 rounding
        dense = plain.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(5, -1, *model.embedding_size)
        ref_masks, ref_iou = plain.mask_decoder(
            image_embeddings=emb,
            image_pe=plain.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
    assert torch.equal(out.low_res_logits, ref_masks)
    assert torch.equal(out.iou_pred, ref_iou)
    assert out.calibration_l1.item() == 0.0
    torch.testing.assert_close(rearranged.low_res_logits, ref_masks, rtol=0, atol=1e-5)
    torch.testing.assert_close(rearranged.iou_pred, ref_iou, rtol=0, atol=1e-5)
    assert rearranged.calibration_l1.item() == 0.0


def test_embed_prompts_equals_sam_prompt_encoder(small_sam):
    model = CPCSAM(small_sam)
    gen = torch.Generator().manual_seed(0)
    points, box = torch.rand(3, 2, 2, generator=gen) * 256, torch.rand(3, 4, generator=gen) * 256
    with torch.no_grad():
        ref, _ = small_sam.prompt_encoder(points=(points, torch.tensor([[1, 0]] * 3)), boxes=box, masks=None)
        ours = model.embed_prompts(torch.cat([points, box.reshape(3, 2, 2)], 1), torch.tensor([[1, 0, 2, 3]] * 3))
        # Points only: SAM appends one padding point (label −1), which is our padding slot.
        ref_pad, _ = small_sam.prompt_encoder(points=(points, torch.tensor([[1, 1]] * 3)), boxes=None, masks=None)
        ours_pad = model.embed_prompts(torch.cat([points, torch.zeros(3, 1, 2)], 1), torch.tensor([[1, 1, -1]] * 3))
    assert torch.equal(ours, ref) and torch.equal(ours_pad, ref_pad)
    # Leading dims are free: [N, K, P, 2] embeds each group.
    assert model.embed_prompts(torch.rand(2, 3, 4, 2), torch.ones(2, 3, 4, dtype=torch.long)).shape == (2, 3, 4, 64)


def test_calibration_covers_cross_attention_only(small_sam):
    model = CPCSAM(small_sam, {"mode": "causal", "entity_rank": 4})
    transformer = model.sam.mask_decoder.transformer
    emb, index, coords, labels = _inputs(model, n=3, p=4, b=2)
    with torch.no_grad():
        biases = model.entity_calibration(emb, index, model.embed_prompts(coords, labels))
    heads, tokens, hw = transformer.num_heads, 1 + 4 + 4, 16 * 16
    assert set(biases) == set(cross_attention_sites(transformer))
    assert len(biases) == 2 * len(transformer.layers) + 1
    for path, bias in biases.items():
        expected = (3, heads, tokens, hw) if "token_to_image" in path else (3, heads, hw, tokens)
        assert bias.shape == expected, path
        assert torch.equal(bias, torch.zeros_like(bias))  # identity gate at init
    # Token self-attention (prompt↔prompt) is untouched: still SAM's module, never given a bias.
    for layer in transformer.layers:
        assert type(layer.self_attn) is Attention
        assert isinstance(layer.cross_attn_token_to_image, CalibratedAttention)
        assert isinstance(layer.cross_attn_image_to_token, CalibratedAttention)
    # Wrapping keeps SAM's parameter names: official checkpoints and PEFT targets still apply.
    assert set(model.sam.state_dict()) == set(copy.deepcopy(small_sam).state_dict())
    assert "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight" in model.sam.state_dict()


def test_entity_mode_calibrates_attention_and_leaves_prompts_alone(small_sam):
    """`entity`: the entity causal module without the task module (the 2 × 2 ablation's missing cell)."""
    model = CPCSAM(small_sam, {"mode": "entity"})
    assert model.capl.task is None and model.capl.entity is not None
    randomize(model.capl)
    emb, index, coords, labels = _inputs(model)
    sparse = model.embed_prompts(coords, labels)
    assert torch.equal(model.calibrate_prompts(sparse[:, None], labels[:, None])[:, 0], sparse)
    assert model.entity_calibration(emb, index, sparse)


def test_other_modes_have_no_calibration(small_sam):
    for mode in ("fixed", "learnable", "task"):
        model = CPCSAM(copy.deepcopy(small_sam), {"mode": mode})
        emb, index, coords, labels = _inputs(model)
        assert model.entity_calibration(emb, index, model.embed_prompts(coords, labels)) == {}
    assert capl_parameters(CPCSAM(copy.deepcopy(small_sam), {"mode": "fixed"})) == []
    with pytest.raises(ConfigError, match="mode"):
        CPCSAM(copy.deepcopy(small_sam), {"mode": "oracle"})
    with pytest.raises(ConfigError, match="unknown key"):
        CPCSAM(copy.deepcopy(small_sam), {"rank": 3})


def _capl_step(model: CPCSAM, emb, index, coords, labels, lr: float = 0.05) -> None:
    """One Adam step on CaPL only, SAM frozen, on a mask + attention-map loss."""
    for param in sam_parameters(model):
        param.requires_grad_(False)
    opt = torch.optim.Adam(capl_parameters(model), lr=lr)
    m = model.mask_size
    target = torch.zeros(index.shape[0], 1, m, m)
    target[..., m // 4 : m * 5 // 8, m * 5 // 16 : m * 25 // 32] = 1
    k = 2
    sparse = model.embed_prompts(coords, labels)[:, None].expand(-1, k, -1, -1)
    calibrated = model.calibrate_prompts(sparse, labels[:, None].expand(-1, k, -1))
    out = model.decode(emb, index, calibrated[:, 0])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out.low_res_logits, target)
    step = m // model.embedding_size[0]
    loss = loss + torch.nn.functional.mse_loss(out.attn_map, target[:, 0, ::step, ::step]) + 0.1 * out.calibration_l1
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_a_capl_step_moves_the_calibration_and_only_capl(small_sam):
    model = CPCSAM(small_sam, {"mode": "causal"})
    emb, index, coords, labels = _inputs(model, n=4, p=4, b=2)
    sam_before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    with torch.no_grad():
        before = model.decode(emb, index, model.embed_prompts(coords, labels))
    _capl_step(model, emb, index, coords, labels)
    _capl_step(model, emb, index, coords, labels)  # the zero-init last layer needs a step before q ≠ 0
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels)
        biases = model.entity_calibration(emb, index, sparse)
        after = model.decode(emb, index, sparse)
        task = model.calibrate_prompts(sparse[:, None], labels[:, None])[:, 0]
    assert all(b.abs().max() > 0 for b in biases.values())
    assert after.calibration_l1 > 0
    assert not torch.equal(task, sparse)
    assert not torch.allclose(after.low_res_logits, before.low_res_logits)
    assert all(torch.equal(v, model.sam.state_dict()[k]) for k, v in sam_before.items())


@pytest.mark.parametrize("mode", ["learnable", "task"])
def test_prompt_modes_learn_too(small_sam, mode):
    model = CPCSAM(small_sam, {"mode": mode})
    emb, index, coords, labels = _inputs(model, n=3, p=4, b=1)
    before = [p.clone() for p in capl_parameters(model)]
    _capl_step(model, emb, index, coords, labels)
    _capl_step(model, emb, index, coords, labels)
    assert any(not torch.equal(a, b) for a, b in zip(before, capl_parameters(model)))
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels)
        calibrated = model.calibrate_prompts(sparse[:, None], labels[:, None])[:, 0]
    real = labels != -1
    assert not torch.equal(calibrated[real], sparse[real])
    assert torch.equal(calibrated[~real], sparse[~real])  # padding slots stay SAM's not-a-point


def test_task_context_is_order_invariant_over_groups(small_sam):
    model = CPCSAM(small_sam, {"mode": "task"})
    randomize(model.capl)
    gen = torch.Generator().manual_seed(5)
    sparse = torch.randn(2, 4, 3, 64, generator=gen)
    labels = torch.randint(-1, 4, (2, 4, 3), generator=gen)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = model.calibrate_prompts(sparse, labels)
        out_perm = model.calibrate_prompts(sparse[:, perm], labels[:, perm])
        single = model.calibrate_prompts(sparse[:, :1], labels[:, :1])  # K = 1 (inference) is defined
    torch.testing.assert_close(out_perm, out[:, perm])
    assert single.shape == (2, 1, 3, 64) and torch.isfinite(single).all()



@pytest.mark.parametrize("context", ["all_groups", "own_group"])
def test_own_group_context_calibrates_each_group_as_inference_would_alone(small_sam, context):
    """Under `own_group` a training group among K is calibrated exactly as that one prompt at
    inference (K = 1); under `all_groups` the other groups change it (the mismatch the option
    removes)."""
    model = CPCSAM(small_sam, {"mode": "task", "task_context": context})
    randomize(model.capl)
    gen = torch.Generator().manual_seed(6)
    sparse = torch.randn(2, 4, 3, 64, generator=gen)
    labels = torch.randint(0, 4, (2, 4, 3), generator=gen)
    labels[:, :, -1] = -1  # a padding slot in every group
    with torch.no_grad():
        together = model.calibrate_prompts(sparse, labels)
        alone = torch.cat([model.calibrate_prompts(sparse[:, k : k + 1], labels[:, k : k + 1]) for k in range(4)], 1)
    if context == "own_group":
        torch.testing.assert_close(together, alone)
    else:
        assert not torch.allclose(together, alone)
    assert torch.equal(together[labels == -1], sparse[labels == -1])


def test_an_unknown_task_context_is_refused(project_root):
    from cpcsam.config import load_config

    with pytest.raises(ConfigError, match="task_context"):
        load_config(project_root / "params.yaml", ["model.capl.task_context=mean"])

def test_decode_n_entities_from_b_images_matches_one_at_a_time(small_sam):
    model = CPCSAM(small_sam, {"mode": "causal"}).eval()
    randomize(model.capl, std=0.1)
    emb, _, coords, labels = _inputs(model, n=6, p=4, b=3)
    index = torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad():
        sparse = model.embed_prompts(coords, labels)
        out = model.decode(emb, index, sparse)
        singles = [model.decode(emb[i : i + 1], torch.zeros(1, dtype=torch.long), sparse[j : j + 1]) for j, i in enumerate(index.tolist())]
    assert out.low_res_logits.shape == (6, 1, model.mask_size, model.mask_size) == (6, 1, 128, 128)
    assert out.iou_pred.shape == (6, 1)
    assert out.attn_map.shape == (6, 16, 16)
    assert out.calibration_l1.shape == () and out.calibration_l1 > 0
    for j, single in enumerate(singles):
        torch.testing.assert_close(out.low_res_logits[j], single.low_res_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.iou_pred[j], single.iou_pred[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.attn_map[j], single.attn_map[0], atol=1e-5, rtol=1e-5)
    # A_j is a max-scaled attention map.
    assert out.attn_map.min() >= 0
    torch.testing.assert_close(out.attn_map.flatten(1).amax(1), torch.ones(6))


def test_decode_leaves_no_state_behind(small_sam):
    """In SAM's order the bias and the kept attention are module state: cleared after each call
    (also when the call fails)."""
    model = CPCSAM(small_sam, {"mode": "causal"})
    randomize(model.capl, std=0.1)
    emb, index, coords, labels = _inputs(model)
    model.decode(emb, index, model.embed_prompts(coords, labels), sam_order=True)
    with pytest.raises(RuntimeError):
        model.decode(emb, index, torch.zeros(5, 4, 7), sam_order=True)  # wrong channel count
    for module in model.sam.mask_decoder.transformer.modules():
        if isinstance(module, CalibratedAttention):
            assert module.logit_bias is None and module.last_attn is None and not module.keep_attn


def test_decode_traces_with_dynamic_entity_and_image_counts(small_sam):
    """No data-dependent Python control flow: a trace at one (B, N) reproduces eager at another."""
    model = CPCSAM(small_sam, {"mode": "causal"}).eval()
    randomize(model.capl, std=0.1)
    emb, index, coords, labels = _inputs(model, n=3, p=4, b=2)
    with torch.no_grad():
        traced = torch.jit.trace(model, (emb, index, model.embed_prompts(coords, labels)), check_trace=False)
        emb2, index2, coords2, labels2 = _inputs(model, n=5, p=4, b=3, seed=9)
        sparse2 = model.embed_prompts(coords2, labels2)
        for got, want in zip(traced(emb2, index2, sparse2), model(emb2, index2, sparse2)):
            torch.testing.assert_close(got, want)


def test_nothing_is_pinned_to_a_device(small_sam):
    """On the meta device every tensor decode creates must follow the module (no hard-coded CPU)."""
    model = CPCSAM(small_sam, {"mode": "causal"}).to("meta")
    emb, index, coords, labels = _inputs(model)
    out = model.decode(emb.to("meta"), index.to("meta"), model.embed_prompts(coords.to("meta"), labels.to("meta")))
    assert all(t.device.type == "meta" for t in out)


def test_one_images_entity_keys_serve_all_entities_as_per_entity_copies_would(small_sam):
    """With one image (B = 1) the entity module broadcasts its keys instead of copying them per
    entity; the gates are the same bits as with the keys gathered per entity."""
    model = CPCSAM(small_sam, {"mode": "causal"})
    randomize(model.capl, std=0.1)
    gen = torch.Generator().manual_seed(4)
    emb = torch.randn(1, 64, 16, 16, generator=gen)
    coords = torch.rand(5, 3, 2, generator=gen) * 256
    labels = torch.tensor([[2, 3, 1]] * 5)
    index = torch.zeros(5, dtype=torch.long)
    with torch.no_grad():
        tokens = model._tokens(model.embed_prompts(coords, labels))
        keys = model.entity_keys(emb)
        broadcast = model.capl.entity(tokens, keys, index)
        gathered = model.capl.entity(tokens, torch.cat([keys, torch.zeros_like(keys)]), index)  # B = 2: gathered
    assert broadcast.biases.keys() == gathered.biases.keys()
    for path, bias in broadcast.biases.items():
        assert torch.equal(bias, gathered.biases[path]), path
    assert torch.equal(broadcast.l1, gathered.l1)


def test_prompt_features_are_the_embedding_at_the_prompt_and_bilinear_between_cells(small_sam):
    from cpcsam.modeling.capl import sample_prompt_features

    model = CPCSAM(small_sam, {"mode": "task"})
    size, (h, w) = model.image_size, model.embedding_size
    cell = size / w
    emb = torch.randn(2, 8, h, w, generator=torch.Generator().manual_seed(3))
    # the centre of cell (row 3, col 5) of image 1, and a quarter of the way to col 6 of image 0
    centre = torch.tensor([(5 + 0.5) * cell - 0.5, (3 + 0.5) * cell - 0.5])
    between = centre + torch.tensor([cell / 4, 0.0])
    coords = torch.stack([centre, between]).reshape(2, 1, 1, 2)
    out = sample_prompt_features(emb, torch.tensor([1, 0]), coords, size)
    torch.testing.assert_close(out[0, 0, 0], emb[1, :, 3, 5])
    torch.testing.assert_close(out[1, 0, 0], 0.75 * emb[0, :, 3, 5] + 0.25 * emb[0, :, 3, 6])
    far = sample_prompt_features(emb, torch.tensor([0]), torch.tensor([[[[1e4, -1e4]]]]), size)
    torch.testing.assert_close(far[0, 0, 0], emb[0, :, 0, w - 1])  # outside the frame: the border cell


def test_a_task_module_that_reads_the_image_starts_as_identity_and_then_depends_on_the_image(small_sam):
    """`model.capl.task_image_features`: the same prompt is calibrated differently on two images
    once g_φ has learnt anything, and not at all at init; without the image it refuses to run."""
    model = CPCSAM(small_sam, {"mode": "causal", "task_image_features": True})
    emb, index, coords, labels = _inputs(model, n=3, p=4, b=2)
    sparse = model.embed_prompts(coords, labels)[:, None]
    coords, labels = coords[:, None], labels[:, None]
    with torch.no_grad():
        assert torch.equal(model.calibrate_prompts(sparse, labels, coords, emb, index), sparse)
        randomize(model.capl)
        one = model.calibrate_prompts(sparse, labels, coords, emb, index)
        other = model.calibrate_prompts(sparse, labels, coords, emb.flip(0), index)
    real = labels != -1
    assert not torch.allclose(one[real], other[real])
    assert torch.equal(one[~real], sparse[~real])
    with pytest.raises(ValueError, match="task_image_features"):
        model.calibrate_prompts(sparse, labels)
