"""LoRA through PEFT: targets, freezing, parameter groups, merge parity and plain-Sam loading."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from cpcsam.errors import ConfigError
from cpcsam.modeling import (
    CPCSAM,
    apply_lora,
    build_sam,
    capl_parameters,
    has_lora,
    lora_parameters,
    merge_lora,
    sam_parameters,
)
from cpcsam.modeling.build import check_state_dict
from modeling_helpers import random_prompts, randomize


def _lora_layer_paths(model: CPCSAM) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def test_lora_targets_encoder_qkv_and_decoder_attention(small_sam):
    model = apply_lora(CPCSAM(small_sam, {"mode": "causal"}), {"rank": 4})
    paths = _lora_layer_paths(model)
    encoder = [p for p in paths if p.startswith("sam.image_encoder.")]
    decoder = [p for p in paths if p.startswith("sam.mask_decoder.transformer.")]
    assert encoder == [f"sam.image_encoder.blocks.{i}.attn.qkv" for i in range(4)]
    # 2 layers × (self, token→image, image→token) + final token→image, 4 projections each.
    assert len(decoder) == (2 * 3 + 1) * 4
    assert {p.rsplit(".", 1)[1] for p in decoder} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert len(paths) == len(encoder) + len(decoder)  # nothing else (prompt encoder, heads, CaPL)
    assert not any(p.startswith("capl.") for p in paths)
    assert model.sam.image_encoder.blocks[0].attn.qkv.lora_A["default"].weight.shape == (4, 128)


def test_parameter_groups_are_disjoint_and_frozen_as_intended(small_sam):
    model = apply_lora(CPCSAM(small_sam, {"mode": "causal"}))
    capl, lora, sam = (set(map(id, g)) for g in (capl_parameters(model), lora_parameters(model), sam_parameters(model)))
    everything = set(map(id, model.parameters()))
    assert capl and lora and sam
    assert not (capl & lora) and not (capl & sam) and not (lora & sam)
    assert capl | lora | sam == everything
    assert all(p.requires_grad for p in lora_parameters(model))
    assert not any(p.requires_grad for p in sam_parameters(model))  # everything else in SAM frozen
    assert all(p.requires_grad for p in capl_parameters(model))  # CaPL untouched by LoRA


def test_a_lora_step_changes_only_lora(small_sam):
    model = apply_lora(CPCSAM(small_sam, {"mode": "causal"}))
    gen = torch.Generator().manual_seed(0)
    coords, labels = random_prompts(3, 4, 256, gen)
    images = torch.randn(1, 3, 256, 256, generator=gen)
    for p in capl_parameters(model):
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(lora_parameters(model), lr=1e-2)
    for _ in range(2):  # LoRA B starts at zero: the second step moves A as well
        out = model.decode(model.encode_images(images), torch.zeros(3, dtype=torch.long), model.embed_prompts(coords, labels))
        loss = out.low_res_logits.sigmoid().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("image_encoder" in k for k in changed) and any("mask_decoder" in k for k in changed)


def test_merge_keeps_outputs_and_yields_a_plain_sam(small_sam):
    model = apply_lora(CPCSAM(small_sam, {"mode": "causal"}), {"rank": 4, "alpha": 8, "dropout": 0.1}).eval()
    randomize(model.capl, std=0.05)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 256, 256, generator=gen)
    coords, labels = random_prompts(4, 4, 256, gen)
    index = torch.tensor([0, 1, 1, 0])

    def run():
        with torch.no_grad():
            emb = model.encode_images(images)
            return emb, model.decode(emb, index, model.embed_prompts(coords, labels))

    _, base = run()  # LoRA B is zero-initialised: the adapters do nothing yet
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.05)
    emb, unmerged = run()
    assert not torch.allclose(unmerged.low_res_logits, base.low_res_logits, atol=1e-3)  # the adapters act
    merge_lora(model)
    emb_merged, merged = run()
    assert not has_lora(model) and not _lora_layer_paths(model)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.sam.modules())
    torch.testing.assert_close(emb_merged, emb, atol=1e-5, rtol=0)
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # The merged SAM's state dict loads into a plain segment-anything Sam with strict keys.
    plain = build_sam({"type": "small"})
    check_state_dict(plain, model.sam.state_dict(), source="merged")
    plain.load_state_dict(model.sam.state_dict(), strict=True)


def test_bad_lora_config_is_a_config_error(small_sam):
    with pytest.raises(ConfigError, match="targets"):
        apply_lora(CPCSAM(copy.deepcopy(small_sam)), {"targets": ["prompt_encoder"]})
    with pytest.raises(ConfigError, match="rank"):
        apply_lora(CPCSAM(copy.deepcopy(small_sam)), {"rank": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        apply_lora(CPCSAM(copy.deepcopy(small_sam)), {"r": 4})
    model = apply_lora(CPCSAM(copy.deepcopy(small_sam)))
    with pytest.raises(ConfigError, match="already"):
        apply_lora(model)


def test_lora_on_a_plain_sam_and_encoder_only(small_sam):
    apply_lora(small_sam, {"targets": ["image_encoder_qkv"]})
    names = [n for n, m in small_sam.named_modules() if isinstance(m, BaseTunerLayer)]
    assert names and all(n.startswith("image_encoder.") for n in names)


def test_models_without_lora_never_import_peft():
    """PEFT (which imports transformers) costs a stage process over a second: pretraining and the
    embedding cache build SAM without adapters and must not pay for it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cpcsam.modeling import build_cpcsam, has_lora, merge_lora\n"
        "model = build_cpcsam({'type': 'small', 'capl': {'mode': 'fixed'}}, with_lora=False)\n"
        "assert not has_lora(model) and merge_lora(model) is model\n"
        "assert 'peft' not in sys.modules, 'peft was imported'\n"
        "model = build_cpcsam({'type': 'small', 'capl': {'mode': 'fixed'}}, with_lora=True)\n"
        "assert has_lora(model) and 'peft' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
