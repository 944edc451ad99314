"""The bi-level trainer: gradient isolation, modes and ablations, overfitting, NaN stop."""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch
from torch import nn

from cpcsam.errors import ConfigError
from cpcsam.training.bilevel import NonFiniteLossError
from cpcsam.training.checkpoint import list_checkpoints, load_checkpoint
from cpcsam.training.metric_logger import MemoryLogger
from training_helpers import trainer_from_dicts as prepare_training


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
        ("bilevel", "entity", "first-order"),
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
        assert ("entity_attention" in summary["final"]) == (capl_mode in ("entity", "causal"))
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
    with pytest.raises(ConfigError, match="unknown key"):
        _trainer(tiny_project, tiny_params, step=3)
    with pytest.raises(ConfigError, match="embedding_cache: on"):
        _trainer(tiny_project, tiny_params, embedding_cache="on")


@pytest.mark.parametrize("amp, hypergradient", [(True, "first-order"), (True, "unrolled"), (False, "first-order")])
def test_mixed_precision_runs_on_cpu(tiny_project, tiny_params, amp, hypergradient) -> None:
    """With `amp`, both levels' forwards really run under bfloat16 autocast (seen by hooks on the
    linear layers); the unrolled CaPL step stays in float32 (its second-order terms); weights stay fp32."""
    trainer = _trainer(tiny_project, tiny_params, amp=amp, hypergradient=hypergradient, steps=2)
    assert trainer.device.type == "cpu" and trainer.amp_dtype == torch.bfloat16
    model = trainer.model
    current: list[str | None] = [None]
    seen: dict[tuple[str | None, str], set[torch.dtype]] = collections.defaultdict(set)
    for name in ("upper_step", "upper_step_unrolled", "lower_step"):

        def entered(*args, _method=getattr(trainer, name), _name=name, **kwargs):
            current[0] = _name
            try:
                return _method(*args, **kwargs)
            finally:
                current[0] = None

        setattr(trainer, name, entered)

    def recorder(part: str):
        def record(module, args, output) -> None:
            seen[current[0], part].add(output.dtype)

        return record

    parts = {"encoder": model.sam.image_encoder, "decoder": model.sam.mask_decoder}
    handles = [
        module.register_forward_hook(recorder(part))
        for part, root in parts.items()
        for module in root.modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        trainer.run(resume=False, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    low = torch.bfloat16 if amp else torch.float32
    upper = "upper_step" if hypergradient == "first-order" else "upper_step_unrolled"
    expected = {
        (upper, "decoder"): {low if hypergradient == "first-order" else torch.float32},
        ("lower_step", "encoder"): {low},
        ("lower_step", "decoder"): {low},
    }
    assert {key: seen[key] for key in expected} == expected
    assert all(math.isfinite(row["loss_upper"]) and math.isfinite(row["loss_lower"]) for row in trainer.curve)
    assert all(p.dtype == torch.float32 for _, p in trainer.lower_params + trainer.upper_params)  # weights stay fp32


# ---- the unrolled hypergradient against finite differences (float64) ----------------------------


def _float64_batch(batch):
    """The batch with float64 images and targets (coordinates and labels are constants of the losses)."""
    return dataclasses.replace(batch, inputs=batch.inputs.double(), targets=batch.targets.double())


def _keep_float64_in_losses(monkeypatch) -> None:
    """`Tensor.float()` leaves float64 as it is (the losses upcast bfloat16 logits with `.float()`,
    which would otherwise round a float64 model's logits to float32 and ruin finite differences)."""
    original = torch.Tensor.float

    def float_(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "float", float_)


def _theta_prime(trainer, lower_batch, step: int, eta: float) -> list[torch.Tensor]:
    """θ − η ∇θ L_lower(φ, θ) at the model's current φ and θ (the trainer's loss, not its unrolling)."""
    theta = [p for _, p in trainer.lower_params]
    with torch.enable_grad():
        grads = torch.autograd.grad(trainer.lower_loss(lower_batch, step), theta, allow_unused=True)
    return [p.detach() - eta * g if g is not None else p.detach().clone() for p, g in zip(theta, grads)]


def _upper_at(trainer, upper_batch, theta_values: list[torch.Tensor]) -> float:
    """L_upper(φ, θ_values) with θ_values written into the LoRA weights in place (then restored)."""
    theta = [p for _, p in trainer.lower_params]
    saved = [p.detach().clone() for p in theta]
    try:
        with torch.no_grad():
            for p, value in zip(theta, theta_values):
                p.copy_(value)
            upper, _ = trainer.upper_loss(upper_batch)
    finally:
        with torch.no_grad():
            for p, value in zip(theta, saved):
                p.copy_(value)
    return float(upper)


def _set_flat(params, flat: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_unrolled_hypergradient_matches_finite_differences(tiny_project, tiny_params, monkeypatch) -> None:
    """The CaPL gradient of `hypergradient: unrolled`, taken from a real `train_step`, equals central
    finite differences of φ ↦ L_upper(φ, θ − η ∇θ L_lower(φ, θ)) in float64: the LoRA step's
    learning rate of that step as η, the upper level on the half-A batch and the lower level on
    the half-B batch (with that step's choice of prompt per entity), LoRA dropout off."""
    trainer = _trainer(
        tiny_project,
        tiny_params,
        hypergradient="unrolled",
        capl_optim={"lr": 0.003, "warmup_steps": 0, "grad_clip": None},  # record the raw hypergradient
        # warmup: step 1's LoRA learning rate is half the base one (η must be the live one); a large
        # η makes the second-order term (through θ'(φ)) a sizeable part of the gradient
        sam_optim={"lr": 1.0, "warmup_steps": 2},
    )
    cfg = trainer.cfg
    eta = cfg.sam_optim.lr * cfg.sam_optim.lr_factor(0, cfg.steps)
    assert eta == 0.5 != cfg.capl_optim.lr
    model = trainer.model.double()
    model.sam.prompt_encoder.pe_layer.float()  # SAM builds its PE grid in float32; frozen constants
    _keep_float64_in_losses(monkeypatch)
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    phi = [p for _, p in trainer.upper_params]
    theta = [p for _, p in trainer.lower_params]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from CaPL's identity init and LoRA's B = 0: every term carries signal
        for p in phi:
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for p in theta:
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    phi0 = torch.cat([p.detach().flatten() for p in phi])
    theta0 = [p.detach().clone() for p in theta]

    batches = {}

    def to_float64(step, level, batch):
        batches[level] = _float64_batch(batch)
        return batches[level]

    recorded = []
    optimizer_step = trainer.opt_upper.step

    def recording_step(*args, **kwargs):
        recorded.append([p.grad.detach().clone() for p in phi])
        return optimizer_step(*args, **kwargs)

    trainer.batch_hook = to_float64
    trainer.opt_upper.step = recording_step
    metrics = trainer.train_step()  # step 1: the unrolled CaPL step, then the LoRA step
    assert len(recorded) == 1 and all(g.dtype == torch.float64 for g in recorded[0])
    hypergradient = torch.cat([g.flatten() for g in recorded[0]])
    _set_flat(phi, phi0)  # back to the point where the hypergradient was taken
    _set_flat(theta, torch.cat([t.flatten() for t in theta0]))
    upper, lower, step = batches["upper"], batches["lower"], 1
    theta_prime0 = _theta_prime(trainer, lower, step, eta)

    def objective(flat: torch.Tensor, through_theta: bool = True) -> float:
        """L_upper(φ, θ'(φ)) at φ = flat; through_theta=False keeps θ' at θ'(φ0) (the path cut)."""
        _set_flat(phi, flat)
        try:
            return _upper_at(trainer, upper, _theta_prime(trainer, lower, step, eta) if through_theta else theta_prime0)
        finally:
            _set_flat(phi, phi0)

    def derivative(direction: torch.Tensor, through_theta: bool = True, eps: float = 1e-6) -> float:
        plus = objective(phi0 + eps * direction, through_theta)
        minus = objective(phi0 - eps * direction, through_theta)
        return (plus - minus) / (2 * eps)

    value = objective(phi0)
    assert objective(phi0) == value  # deterministic
    # the trainer's upper loss is this objective's value: same batches, prompt choice, η and θ'
    assert metrics["loss_upper"] == pytest.approx(value, rel=1e-12, abs=0)

    tolerance = 1e-5
    # along the hypergradient itself and along two random directions of the whole of φ ...
    directions = [hypergradient / hypergradient.norm()]
    directions += [d / d.norm() for d in torch.randn(2, phi0.numel(), generator=gen, dtype=torch.float64)]
    for direction in directions:
        numeric, analytic = derivative(direction), float(hypergradient @ direction)
        assert abs(numeric - analytic) <= tolerance * abs(numeric), (numeric, analytic)
    # ... and coordinate by coordinate on a random subset of φ's scalars
    coords = torch.randperm(phi0.numel(), generator=gen)[:12]
    units = torch.nn.functional.one_hot(coords, phi0.numel()).to(torch.float64)
    numeric = torch.tensor([derivative(u) for u in units], dtype=torch.float64)
    error = float((numeric - hypergradient[coords]).norm() / numeric.norm())
    assert error <= tolerance, (numeric, hypergradient[coords])
    # the check has teeth: the path through θ'(φ) moves these derivatives far beyond the tolerance
    cut = torch.tensor([derivative(u, through_theta=False) for u in units], dtype=torch.float64)
    assert float((numeric - cut).norm() / numeric.norm()) > 100 * tolerance


def test_the_fixed_ablation_is_lora_only_to_the_last_bit(tiny_project, tiny_params, tmp_path) -> None:
    """`fixed` (bi-level trainer, no CaPL) and `lora_only`, both as `variant_sections` sets them up:
    with no CaPL parameters the bi-level step is the LoRA step on the same images (same budget),
    so the two train the same weights, bit for bit (the pipeline's dvc.lock shows the same
    `model.pt` md5 for both at the default params)."""
    from cpcsam.config import ModelConfig, PerturbConfig, TrainConfig
    from cpcsam.training.run import prepare_training as prepare
    from cpcsam.training.variants import variant_sections

    trained = {}
    for variant in ("fixed", "lora_only"):
        train, model = variant_sections(variant, TrainConfig.from_params({**tiny_params["train"], "steps": 3}),
                                        ModelConfig.from_params(tiny_params["model"]))
        trainer = prepare(train, model, PerturbConfig.from_params(tiny_params["perturb"]), tiny_project["manifest"],
                          tiny_project["prompts"], tiny_project["sam_checkpoint"], tmp_path / variant)
        trainer.run(progress=False)
        trained[variant] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trained["fixed"].keys() == trained["lora_only"].keys()
    lora = [k for k in trained["fixed"] if "lora_" in k]
    assert lora and any(not torch.equal(trained["fixed"][k], torch.zeros_like(trained["fixed"][k])) for k in lora)
    assert all(torch.equal(trained["fixed"][k], trained["lora_only"][k]) for k in trained["fixed"])
