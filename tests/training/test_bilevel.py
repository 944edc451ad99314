"""The bi-level trainer: gradient isolation, modes and ablations, overfitting, NaN stop."""

from __future__ import annotations

import math

import pytest
import torch

from cpcsam.errors import ConfigError
from cpcsam.training.bilevel import NonFiniteLossError
from cpcsam.training.checkpoint import list_checkpoints, load_checkpoint
from cpcsam.training.logging import MemoryLogger
from cpcsam.training.run import prepare_training


def _trainer(project, params, out_dir=None, **overrides):
    return prepare_training(
        params, project["manifest"], project["prompts"], project["sam_checkpoint"], out_dir, train_overrides=overrides
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_gradient_isolation_capl_step_then_lora_step(tiny_project, tiny_params) -> None:
    trainer = _trainer(tiny_project, tiny_params)
    model = trainer.model
    capl = {n for n, _ in model.named_parameters() if n.startswith("capl.")}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert capl and lora

    before = _snapshot(model)
    trainer.upper_step(trainer.upper_stream.next().to(trainer.device))
    changed = _changed(before, model)
    assert changed and changed <= capl
    # structural isolation: autograd never computed a gradient for SAM or LoRA weights
    assert all(p.grad is None for n, p in model.named_parameters() if n not in capl)

    before = _snapshot(model)
    trainer.lower_step(trainer.lower_stream.next().to(trainer.device), step=1)
    changed = _changed(before, model)
    assert changed and changed <= lora
    assert {n for n in changed if "image_encoder" in n}, "the encoder's qkv LoRA must train"
    assert all(p.grad is None for n, p in model.named_parameters() if n not in lora)


def test_full_finetune_keeps_prompt_encoder_frozen(tiny_project, tiny_params) -> None:
    tiny_params["model"]["capl"]["mode"] = "causal"  # baselines switch CaPL off themselves
    trainer = _trainer(tiny_project, tiny_params, mode="full-finetune")
    assert trainer.model.mode == "fixed" and trainer.upper_stream is None
    before = _snapshot(trainer.model)
    trainer.lower_step(trainer.lower_stream.next(), step=1)
    changed = _changed(before, trainer.model)
    assert any(n.startswith("sam.image_encoder.") for n in changed)
    assert any(n.startswith("sam.mask_decoder.") for n in changed)
    assert not any(n.startswith("sam.prompt_encoder.") for n in changed)


def test_halves_are_disjoint_and_cover_the_training_images(tiny_project, tiny_params) -> None:
    trainer = _trainer(tiny_project, tiny_params, upper_max_entities=1, max_entities=3)
    a, b = set(trainer.upper_stream.image_ids), set(trainer.lower_stream.image_ids)
    assert a and b and not a & b and a | b == set(trainer.data.image_ids)
    for _ in range(4):  # the streams never leave their half
        upper, lower = trainer.upper_stream.next(), trainer.lower_stream.next()
        assert set(upper.image_ids) <= a and set(lower.image_ids) <= b
        # the CaPL batch holds 1 entity per image (each decoded K times), the LoRA batch up to 3
        assert torch.bincount(upper.image_index).max() == 1 and upper.k == 3
        assert torch.bincount(lower.image_index).max() > 1


def test_batch_stream_is_seeded_and_resumable(tiny_project, tiny_params) -> None:
    trainer = _trainer(tiny_project, tiny_params)
    stream = trainer.lower_stream
    for _ in range(3):
        stream.next()
    state = stream.state_dict()
    expected = [stream.next() for _ in range(4)]
    stream.load_state_dict(state)
    again = [stream.next() for _ in range(4)]
    for x, y in zip(expected, again):
        assert x.image_ids == y.image_ids and x.entity_ids == y.entity_ids
        assert torch.equal(x.coords, y.coords) and torch.equal(x.targets, y.targets)
    # an epoch visits every image of the stream exactly once, in a seeded order
    stream = trainer.upper_stream  # 3 images, batches of 2: epochs straddle batches
    n = len(stream.image_ids)
    orders = []
    for epoch in (5, 6):
        stream.load_state_dict({"epoch": epoch, "position": 0})
        drawn = [i for _ in range(n) for i in stream.next().image_ids][:n]
        assert sorted(drawn) == stream.image_ids
        orders.append(drawn)
    stream.load_state_dict({"epoch": 5, "position": 0})
    assert [i for _ in range(n) for i in stream.next().image_ids][:n] == orders[0]


@pytest.mark.parametrize(
    "mode, capl_mode, hypergradient",
    [
        ("bilevel", "fixed", "first-order"),
        ("bilevel", "learnable", "first-order"),
        ("bilevel", "task", "first-order"),
        ("bilevel", "causal", "first-order"),
        ("bilevel", "causal", "unrolled"),
        ("lora-only", "causal", "first-order"),
        ("full-finetune", "causal", "first-order"),
    ],
)
def test_every_mode_and_ablation_runs(tiny_project, tiny_params, tmp_path, mode, capl_mode, hypergradient) -> None:
    tiny_params["model"]["capl"]["mode"] = capl_mode
    log = MemoryLogger()
    trainer = prepare_training(
        tiny_params,
        tiny_project["manifest"],
        tiny_project["prompts"],
        tiny_project["sam_checkpoint"],
        tmp_path,
        metric_logger=log,
        train_overrides={"mode": mode, "hypergradient": hypergradient, "steps": 2},
    )
    before = _snapshot(trainer.model)
    summary = trainer.run(progress=False)
    assert summary["steps"] == 2 and [s for s, _ in log.metrics] == [1, 2]
    assert all(math.isfinite(v) for _, m in log.metrics for v in m.values())
    trained_capl = any(n.startswith("capl.") for n in _changed(before, trainer.model))
    assert trained_capl == (mode == "bilevel" and capl_mode != "fixed")
    if trained_capl:
        assert "loss_upper" in summary["final"]
        assert ("entity_attention" in summary["final"]) == (capl_mode == "causal")
    assert (tmp_path / "curve.csv").read_text().count("\n") == 3
    assert (tmp_path / "metrics.json").is_file() and list_checkpoints(tmp_path / "checkpoints")[-1][0] == 2


def test_unrolled_hypergradient_differs_from_first_order(tiny_project, tiny_params) -> None:
    grads = {}
    for hypergradient in ("first-order", "unrolled"):
        trainer = _trainer(tiny_project, tiny_params, hypergradient=hypergradient)
        trainer.train_step()  # CaPL leaves its identity init, so the θ path carries signal
        seen = []
        step = trainer.opt_upper.step

        def recording_step(*args, **kwargs):
            seen.append(torch.cat([p.grad.flatten() for _, p in trainer.upper_params if p.grad is not None]))
            return step(*args, **kwargs)

        trainer.opt_upper.step = recording_step
        trainer.train_step()
        grads[hypergradient] = seen[0]
    assert grads["first-order"].shape == grads["unrolled"].shape
    assert not torch.allclose(grads["first-order"], grads["unrolled"])


def test_loss_decreases_when_overfitting_a_tiny_set(tiny_project, tiny_params) -> None:
    trainer = _trainer(
        tiny_project,
        tiny_params,
        steps=40,
        max_entities=3,
        capl_optim={"lr": 0.01, "warmup_steps": 0},
        sam_optim={"lr": 0.01, "warmup_steps": 0},
    )
    trainer.run(resume=False, progress=False)
    lower = [row["loss_lower"] for row in trainer.curve]
    upper = [row["loss_upper"] for row in trainer.curve]
    # first 5 vs last 5 steps; both levels see the same few images over and over
    assert sum(lower[-5:]) < 0.95 * sum(lower[:5])
    assert sum(upper[-5:]) < 0.85 * sum(upper[:5])


def test_pretraining_learns(tiny_project) -> None:
    metrics = tiny_project["pretrain_metrics"]
    assert metrics["final"]["mask_loss"] < 0.6 * metrics["first"]["mask_loss"]
    assert metrics["final"]["mask_iou"] > metrics["first"]["mask_iou"] + 0.2


def test_nan_batch_stops_with_step_and_last_good_checkpoint(tiny_project, tiny_params, tmp_path) -> None:
    trainer = _trainer(tiny_project, tiny_params, tmp_path, steps=6, checkpoint_every=100)
    capl_before_step_3 = {}

    def poison(step, level, batch):
        if step == 3 and level == "upper":
            capl_before_step_3.update({n: p.detach().clone() for n, p in trainer.upper_params})
        if step == 3 and level == "lower":  # after CaPL's step 3 update: it must be rolled back
            batch.inputs = torch.full_like(batch.inputs, float("nan"))
        return batch

    trainer.batch_hook = poison
    with pytest.raises(NonFiniteLossError, match=r"^step 3: non-finite LoRA/SAM \(lower\) loss") as info:
        trainer.run(progress=False)
    steps = list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in steps] == [2] and str(steps[0][1]) in str(info.value)
    state = load_checkpoint(steps[0][1])
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    for name, value in capl_before_step_3.items():
        assert torch.equal(state["trainable"][name], value)
    assert len(state["curve"]) == 2


def test_infinite_lr_stops_at_the_first_bad_update(tiny_project, tiny_params, tmp_path) -> None:
    trainer = _trainer(
        tiny_project, tiny_params, tmp_path, steps=4, checkpoint_every=1, sam_optim={"lr": float("inf")}
    )
    with pytest.raises(NonFiniteLossError, match=r"^step 1: non-finite LoRA/SAM \(lower\) update"):
        trainer.run(progress=False)
    assert list_checkpoints(tmp_path / "checkpoints") == []  # no checkpoint ever holds non-finite weights


def test_bad_config_raises_config_error(tiny_project, tiny_params) -> None:
    with pytest.raises(ConfigError, match="train.mode"):
        _trainer(tiny_project, tiny_params, mode="bilevel-ish")
    with pytest.raises(ConfigError, match="unknown keys"):
        _trainer(tiny_project, tiny_params, step=3)
    with pytest.raises(ConfigError, match="embedding_cache: on"):
        _trainer(tiny_project, tiny_params, embedding_cache="on")


def test_mixed_precision_runs_on_cpu(tiny_project, tiny_params) -> None:
    trainer = _trainer(tiny_project, tiny_params, amp=True, steps=2)
    assert trainer.device.type == "cpu" and trainer.amp_dtype == torch.bfloat16
    trainer.run(resume=False, progress=False)
    assert all(math.isfinite(row["loss_upper"]) and math.isfinite(row["loss_lower"]) for row in trainer.curve)
    assert all(p.dtype == torch.float32 for _, p in trainer.lower_params)  # weights stay fp32
