"""The pretraining loop's second phase: `pretrain.init` and `pretrain.mask_loss`."""

from __future__ import annotations

import copy

import torch

from cpcsam.config import PretrainConfig
from cpcsam.training.pretrain import pretrain_sam


def _cfg(tiny_project, **update) -> PretrainConfig:
    params = copy.deepcopy(tiny_project["params"])
    base = {**params["pretrain"], "steps": 1, "corpus_scenes": 2, "val_every": 0, "optim": {"lr": 1e-6, "warmup_steps": 0}}
    return PretrainConfig.from_params({**base, **update})


def test_init_starts_from_the_given_weights(tiny_project) -> None:
    init = torch.load(tiny_project["sam_checkpoint"], weights_only=True)
    model = tiny_project["params"]["model"]
    warm, _ = pretrain_sam(model, _cfg(tiny_project, init=str(tiny_project["sam_checkpoint"])), None, progress=False)
    cold, _ = pretrain_sam(model, _cfg(tiny_project), None, progress=False)
    key = "mask_decoder.output_upscaling.0.weight"
    # One step at lr 1e-6 moves no weight by more than ~1e-6: warm is the init, cold is random.
    assert torch.allclose(warm.state_dict()[key], init[key], atol=1e-4)
    assert not torch.allclose(cold.state_dict()[key], init[key], atol=1e-2)


def test_mask_loss_switches_the_loss(tiny_project) -> None:
    model, init = tiny_project["params"]["model"], str(tiny_project["sam_checkpoint"])
    _, balanced = pretrain_sam(model, _cfg(tiny_project, init=init), None, progress=False)
    _, plain = pretrain_sam(model, _cfg(tiny_project, init=init, mask_loss="bce_dice"), None, progress=False)
    assert (balanced["mask_loss"], plain["mask_loss"]) == ("balanced", "bce_dice")
    # Same weights, same batch: only the loss function differs.
    assert plain["first"]["mask_iou"] == balanced["first"]["mask_iou"]
    assert abs(plain["first"]["mask_loss"] - balanced["first"]["mask_loss"]) > 1e-3


def test_without_a_progress_bar_every_log_every_steps_logs_a_line(tiny_project, caplog) -> None:
    """A long run writing to a file (`make generalist`) says how far it is between validations."""
    cfg = _cfg(tiny_project, steps=4, log_every=2)
    with caplog.at_level("INFO", logger="cpcsam.training.pretrain"):
        pretrain_sam(tiny_project["params"]["model"], cfg, None, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain step ")]
    assert [line.split(":")[0] for line in lines] == ["pretrain step 2/4", "pretrain step 4/4"]
    assert all("s/step" in line and "min left" in line for line in lines)


def test_a_checkpoint_is_resumed_only_by_the_run_that_wrote_it(tiny_project, tmp_path, caplog) -> None:
    """The checkpoint folder outlives a run (it is not a DVC out): a run with other params must
    start over, not continue from the previous run's last step and write its model."""
    model, folder = tiny_project["params"]["model"], tmp_path / "checkpoints"
    cfg = _cfg(tiny_project, steps=2, checkpoint_every=1)
    first, _ = pretrain_sam(model, cfg, None, progress=False, checkpoint_dir=folder)
    with caplog.at_level("INFO", logger="cpcsam.training.pretrain"):
        again, _ = pretrain_sam(model, cfg, None, progress=False, checkpoint_dir=folder)
    assert any("resumed from" in r.getMessage() and "step 2" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in first.state_dict().items())

    caplog.clear()
    other = _cfg(tiny_project, steps=2, checkpoint_every=1, optim={"lr": 1e-3, "warmup_steps": 0})
    with caplog.at_level("INFO", logger="cpcsam.training"):
        retrained, _ = pretrain_sam(model, other, None, progress=False, checkpoint_dir=folder)
    assert not any("resumed from" in r.getMessage() for r in caplog.records)
    assert any("another configuration" in r.getMessage() for r in caplog.records)
    fresh, _ = pretrain_sam(model, other, None, progress=False)  # no checkpoints at all
    assert all(torch.equal(retrained.state_dict()[k], v) for k, v in fresh.state_dict().items())
