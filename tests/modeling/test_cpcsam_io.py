"""save_cpcsam / load_cpcsam: SAM + LoRA + CaPL + config, strict keys, local and S3."""

from __future__ import annotations

import boto3
import pytest
import torch

from cpcsam.errors import CheckpointError
from cpcsam.modeling import apply_lora, build_cpcsam, has_lora, load_cpcsam, lora_parameters, merge_lora, save_cpcsam
from modeling_helpers import random_prompts, randomize

CFG = {
    "type": "small",
    "checkpoint": None,
    "sizes": {"small": {"encoder_depth": 2, "encoder_global_attn_indexes": [1]}},
    "capl": {"mode": "causal", "entity_rank": 4},
    "lora": {"rank": 2, "alpha": 4},
}


def _trained_like_model():
    torch.manual_seed(0)
    model = build_cpcsam(CFG, with_lora=True).eval()
    randomize(model.capl, std=0.1, seed=3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def _outputs(model):
    gen = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 256, 256, generator=gen)
    coords, labels = random_prompts(3, 4, 256, gen)
    with torch.no_grad():
        emb = model.encode_images(images)
        sparse = model.calibrate_prompts(model.embed_prompts(coords, labels)[:, None], labels[:, None])[:, 0]
        return model.decode(emb, torch.tensor([1, 0, 1]), sparse)


def test_round_trip_restores_architecture_lora_and_capl(tmp_path):
    model = _trained_like_model()
    path = tmp_path / "model.pt"
    save_cpcsam(path, model, CFG)
    loaded = load_cpcsam(path)
    assert has_lora(loaded) and loaded.mode == "causal" and len(loaded.sam.image_encoder.blocks) == 2
    assert loaded.capl_cfg.entity_rank == 4
    for a, b in zip(_outputs(loaded), _outputs(model)):
        assert torch.equal(a, b)


def test_round_trip_without_lora_through_s3(s3_bucket):
    torch.manual_seed(1)
    model = build_cpcsam({**CFG, "capl": {"mode": "task"}}).eval()
    randomize(model.capl, std=0.1)
    save_cpcsam(f"s3://{s3_bucket}/runs/model.pt", model, {**CFG, "capl": {"mode": "task"}})
    assert boto3.client("s3").head_object(Bucket=s3_bucket, Key="runs/model.pt")["ContentLength"] > 0
    loaded = load_cpcsam(f"s3://{s3_bucket}/runs/model.pt")
    assert not has_lora(loaded) and loaded.mode == "task"
    for a, b in zip(_outputs(loaded), _outputs(model)):
        assert torch.equal(a, b)


def test_tampered_file_fails_with_the_key_named(tmp_path):
    model = _trained_like_model()
    path = tmp_path / "model.pt"
    save_cpcsam(path, model, CFG)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop("capl.task.fc2.weight")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"model\.pt.*missing keys: capl\.task\.fc2\.weight"):
        load_cpcsam(path)
    # A file saved with LoRA but claiming none: the adapter keys are unexpected.
    payload = torch.load(path, weights_only=True)
    payload["lora"] = None
    payload["state_dict"]["capl.task.fc2.weight"] = model.state_dict()["capl.task.fc2.weight"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="unexpected keys: .*lora_A"):
        load_cpcsam(path)


def test_a_plain_sam_state_dict_is_not_a_cpcsam_file(tmp_path):
    path = tmp_path / "sam.pth"
    torch.save(build_cpcsam(CFG).sam.state_dict(), path)
    with pytest.raises(CheckpointError, match="format"):
        load_cpcsam(path)


def test_lora_can_be_added_after_build_and_saved(tmp_path):
    model = apply_lora(build_cpcsam(CFG), CFG["lora"])
    save_cpcsam(tmp_path / "m.pt", model, CFG)
    assert has_lora(load_cpcsam(tmp_path / "m.pt"))


def test_folded_load_gives_the_bits_of_peft_merge(tmp_path):
    """Inference loads fold LoRA without PEFT: the same weights, to the bit, as PEFT's own merge."""
    model = _trained_like_model()
    path = tmp_path / "model.pt"
    save_cpcsam(path, model, CFG)
    merged = merge_lora(load_cpcsam(path))
    folded = load_cpcsam(path, fold_lora=True)
    assert not has_lora(folded)
    a, b = merged.state_dict(), folded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the adapters are really in there: folding with another scale gives other weights
    payload = torch.load(path, weights_only=True)
    payload["lora"]["alpha"] = 2 * payload["lora"]["alpha"]
    torch.save(payload, path)
    doubled = load_cpcsam(path, fold_lora=True).state_dict()
    assert any(not torch.equal(a[k], doubled[k]) for k in a)


def test_inference_loading_never_imports_peft(tmp_path):
    import subprocess
    import sys

    model = _trained_like_model()
    save_cpcsam(tmp_path / "model.pt", model, CFG)
    code = ("import sys; from cpcsam.inference import TorchBackend; "
            f"TorchBackend.from_file({str(tmp_path / 'model.pt')!r}); "
            "assert 'peft' not in sys.modules, 'peft was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
