"""build_sam: official and small configurations, strict checkpoint loading (local and S3)."""

from __future__ import annotations

import argparse
import io

import boto3
import pytest
import torch
from segment_anything import sam_model_registry

from cpcsam.errors import CheckpointError, ConfigError
from cpcsam.modeling import build_sam
from cpcsam.modeling.build import count_parameters


@pytest.mark.parametrize(
    "sam_type, image_size, grid, channels", [("small", 256, 16, 64), ("base_small", 384, 24, 128)]
)
def test_small_configs_encode_to_their_grid(sam_type, image_size, grid, channels):
    sam = build_sam({"type": sam_type})
    assert sam.image_encoder.img_size == image_size
    with torch.no_grad():
        emb = sam.image_encoder(torch.randn(1, 3, image_size, image_size))
    assert emb.shape == (1, channels, grid, grid)
    assert tuple(sam.prompt_encoder.get_dense_pe().shape) == (1, channels, grid, grid)


def test_small_config_size_is_as_documented():
    assert 1.0e6 < count_parameters(build_sam({"type": "small"})) < 1.4e6


def test_sizes_override_applies_to_small_types_only():
    sam = build_sam({"type": "small", "sizes": {"small": {"encoder_depth": 2, "encoder_global_attn_indexes": [1]}}})
    assert len(sam.image_encoder.blocks) == 2
    with pytest.raises(ConfigError, match="vit_b"):
        build_sam({"type": "vit_b", "sizes": {"vit_b": {"encoder_depth": 2}}})
    with pytest.raises(ConfigError, match="unknown key"):
        build_sam({"type": "small", "sizes": {"small": {"depth": 2}}})
    with pytest.raises(ConfigError, match="model.type"):
        build_sam({"type": "vit_x"})
    with pytest.raises(ConfigError, match="patch_size"):
        build_sam({"type": "small", "sizes": {"small": {"image_size": 250}}})


def test_vit_b_official_format_checkpoint_round_trip(tmp_path):
    """A random vit_b from segment-anything's own registry, saved as the official files are, loads strictly."""
    torch.manual_seed(0)
    official = sam_model_registry["vit_b"]()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(official.state_dict(), path)
    sam = build_sam({"type": "vit_b", "checkpoint": str(path)})
    assert sam.image_encoder.img_size == 1024
    ours, theirs = sam.state_dict(), official.state_dict()
    assert set(ours) == set(theirs)
    assert "image_encoder.patch_embed.proj.weight" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _small_state(tmp_path, edit) -> str:
    state = build_sam({"type": "small"}).state_dict()
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    return str(path)


def test_checkpoint_with_missing_key_fails_loudly(tmp_path):
    path = _small_state(tmp_path, lambda s: s.pop("mask_decoder.iou_token.weight"))
    with pytest.raises(CheckpointError, match=r"bad\.pth.*1 missing keys: mask_decoder\.iou_token\.weight"):
        build_sam({"type": "small", "checkpoint": path})


def test_checkpoint_with_unexpected_key_fails_loudly(tmp_path):
    path = _small_state(tmp_path, lambda s: s.__setitem__("extra.head.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: extra\.head\.weight"):
        build_sam({"type": "small", "checkpoint": path})


def test_checkpoint_with_wrong_shape_fails_loudly(tmp_path):
    path = _small_state(tmp_path, lambda s: s.__setitem__("mask_decoder.iou_token.weight", torch.zeros(1, 32)))
    with pytest.raises(CheckpointError, match=r"mask_decoder\.iou_token\.weight: checkpoint \(1, 32\) vs model \(1, 64\)"):
        build_sam({"type": "small", "checkpoint": path})


def test_checkpoint_of_another_config_names_the_mismatches(tmp_path):
    path = tmp_path / "base_small.pth"
    torch.save(build_sam({"type": "base_small"}).state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_sam({"type": "small", "checkpoint": str(path)})


def test_unsafe_unreadable_or_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, path)  # arbitrary pickled objects are refused
    with pytest.raises(CheckpointError, match=r"pickle\.pth.*weights_only"):
        build_sam({"type": "small", "checkpoint": str(path)})
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        build_sam({"type": "small", "checkpoint": str(garbage)})
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        build_sam({"type": "small", "checkpoint": str(listed)})
    with pytest.raises(CheckpointError, match="not found"):
        build_sam({"type": "small", "checkpoint": str(tmp_path / "absent.pth")})


def test_checkpoint_from_s3(s3_bucket):
    torch.manual_seed(3)
    sam = build_sam({"type": "small"})
    buf = io.BytesIO()
    torch.save(sam.state_dict(), buf)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="models/sam_small.pth", Body=buf.getvalue())
    loaded = build_sam({"type": "small", "checkpoint": f"s3://{s3_bucket}/models/sam_small.pth"})
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sam.state_dict().items())
    with pytest.raises(CheckpointError, match="not found"):
        build_sam({"type": "small", "checkpoint": f"s3://{s3_bucket}/models/absent.pth"})


def test_checkpoint_of_another_input_size_is_resized_to_the_grid(tmp_path, caplog):
    """A 256² checkpoint (16² grid) runs at 384² (24² grid): the position tables are interpolated
    along the right axes, everything else is loaded as saved."""
    state = build_sam({"type": "small"}).state_dict()
    ramp = torch.linspace(-1.0, 1.0, 16)
    state["image_encoder.pos_embed"] = ramp[None, None, :, None].expand(1, 16, 16, 128).clone()  # varies along x only
    global_table = "image_encoder.blocks.1.attn.rel_pos_h"  # block 1 is global; block 0 uses 8² windows
    state[global_table] = torch.linspace(0.0, 3.0, 31)[:, None].expand(31, 32).clone()
    path = tmp_path / "sam256.pth"
    torch.save(state, path)

    with caplog.at_level("WARNING"):
        sam = build_sam({"type": "small", "checkpoint": str(path), "sizes": {"small": {"image_size": 384}}})
    assert "16x16 embedding grid, resized to 24x24" in caplog.text
    resized = sam.state_dict()
    pos = resized["image_encoder.pos_embed"]
    assert pos.shape == (1, 24, 24, 128)
    assert torch.allclose(pos, pos[:, :1], atol=1e-6)  # still constant along y
    assert bool((pos[0, 0, 1:, 0] > pos[0, 0, :-1, 0]).all())  # still increasing along x
    table = resized[global_table]
    assert table.shape == (47, 32)
    assert bool((table[1:, 0] > table[:-1, 0]).all()) and 0.0 <= float(table[0, 0]) < float(table[-1, 0]) <= 3.0
    assert torch.equal(resized["image_encoder.blocks.0.attn.rel_pos_h"], state["image_encoder.blocks.0.attn.rel_pos_h"])
    assert torch.equal(resized["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"])
    assert sam.image_encoder(torch.zeros(1, 3, 384, 384)).shape == (1, 64, 24, 24)
