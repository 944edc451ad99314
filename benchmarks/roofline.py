"""How fast a measured piece of work could run on this machine: a roofline floor.

`bench_train.py --roofline` uses it on the cached ViT-B training step (PyTorch's profiler), the
numerator of the issue's cached / uncached target; `bench_decoder.py --roofline` on our ONNX
decoder at 4 entities (onnxruntime's profile), the denominator of eager / ONNX. A profile splits
the operators' time into matrix products (their multiply-adds counted from the shapes) and
everything else; the floor is what the step would take if

- every matrix product ran at this machine's large-matrix speed (a [2048, 2048]² product measured
  in the same process), and
- every other operator touched only its largest operand, once, at this machine's copy bandwidth
  (a 256 MB copy), with no dispatch or autograd time at all.

Both assumptions flatter the step: operators read several operands and write one, and shapes like
the step's [4, 104, 4096] products run below the square product's speed. So a ratio computed with
the floor is an upper bound on what faster kernels could give without changing the work itself
(fusing operators, which `torch.compile` did not do profitably here, is another matter). A second,
nearer floor lets each operator read all its operands and write a result the size of the largest:
what the same operators, one pass each, cost at copy bandwidth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# operators whose work is counted in multiply-adds (the profiler's `flops`), not in bytes
MATRIX_PRODUCTS = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"})
# operators that only make a view or allocate: they move no tensor data
NO_DATA = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::transpose", "aten::t", "aten::permute",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::alias",
    "aten::detach", "aten::empty", "aten::empty_strided", "aten::resize_", "aten::unbind", "aten::split",
    "aten::narrow", "aten::lift_fresh", "aten::_reshape_alias", "aten::set_", "aten::diagonal", "aten::unflatten",
    "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous", "aten::clone", "aten::to",
    "aten::reshape", "aten::flatten", "aten::chunk", "aten::split_with_sizes", "aten::numpy_T", "aten::movedim",
})  # (the ones that can copy do it in an `aten::copy_` beneath them, which counts)


@dataclass(frozen=True)
class MachineSpeeds:
    gemm_gflops: float  # a large float32 matrix product, multiply-adds counted as 2 FLOPs
    copy_gbytes: float  # bytes read + written per second by a large tensor copy


@dataclass(frozen=True)
class StepProfile:
    seconds: float  # one step, timed without the profiler
    product_seconds: float  # per step: the matrix products' own time in the profile (`floor_seconds` caps it)
    product_gflop: float  # per step
    elementwise_gbytes: float  # per step: each other operator's largest operand, once
    operand_gbytes: float  # per step: each other operator's operands read and a result written
    operators: int  # operator calls per step


def machine_speeds(repeats: int = 5) -> MachineSpeeds:
    """The best of `repeats` timings of each probe, in this process, with its thread setting."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    src, dst = torch.randn(64 * 2**20), torch.empty(64 * 2**20)  # 256 MB each
    gemm = copy = float("inf")
    a @ b, dst.copy_(src)  # first touch of every page
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        gemm = min(gemm, time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        copy = min(copy, time.perf_counter() - t)
    return MachineSpeeds(gemm_gflops=2 * 2048**3 / gemm / 1e9, copy_gbytes=2 * src.numel() * 4 / copy / 1e9)


def _operand_bytes(shapes: list, element_bytes: int = 4) -> tuple[int, int]:
    """(largest operand, all operands + a result the size of the largest), in bytes. A scalar
    argument (alpha, a dim) is listed with the shape []; so is a tensor list (`cat`'s), whose sizes
    the profiler does not record: both count nothing, which only lowers the floor."""
    sizes = [_numel(s) for s in shapes if isinstance(s, list | tuple) and s and all(isinstance(d, int) for d in s)]
    largest = max(sizes, default=0)
    return largest * element_bytes, (sum(sizes) + largest) * element_bytes


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def profile_step(step: Callable[[], object], steps: int) -> StepProfile:
    """Time `steps` calls of `step` plainly, then profile as many more twice: once for the products'
    time (shapes recorded), once to count FLOPs. The step's tensors are float32 (the trainer's
    default); views and allocations count no bytes.

    Two profiles, because counting FLOPs costs time inside every operator's own interval: a cached
    ViT-B step (275 ms plainly) took 955 ms profiled with FLOPs, its products 322 ms of self time,
    and 371 ms without, its products 178 ms.
    """
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, record_shapes=True) as timed:
        for _ in range(steps):
            step()
    with torch.profiler.profile(activities=cpu, record_shapes=True, with_flops=True) as counted:
        for _ in range(steps):
            step()
    product_us = sum(e.self_cpu_time_total for e in _operator_events(timed) if e.name in MATRIX_PRODUCTS)
    flops = elementwise = operands = calls = 0
    for event in _operator_events(counted):
        calls += 1
        if event.name in MATRIX_PRODUCTS:
            flops += event.flops or 0
        # an aten operator does its own data's work when all it calls is allocations and views
        # (native_layer_norm); one that calls others (layer_norm) leaves it to them, and
        # autograd's nodes are records around the operators they call
        elif (event.name.startswith("aten::") and event.name not in NO_DATA
                and all(child.name in NO_DATA for child in event.cpu_children)):
            largest, every = _operand_bytes(event.input_shapes or [])
            elementwise, operands = elementwise + largest, operands + every
    return StepProfile(seconds=seconds, product_seconds=product_us / steps / 1e6,
                       product_gflop=flops / steps / 1e9, elementwise_gbytes=elementwise / steps / 1e9,
                       operand_gbytes=operands / steps / 1e9, operators=calls // steps)


def _operator_events(prof: torch.profiler.profile) -> list:
    """The profile's CPU operator events, without autograd's and the optimizer's records."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU
            and not e.name.startswith(("autograd::", "Optimizer."))]


ONNX_PRODUCTS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})
_ELEMENT_BYTES = {"float": 4, "float32": 4, "int64": 8, "int32": 4, "bool": 1, "float16": 2, "double": 8, "uint8": 1,
                  "int8": 1}


def _onnx_tensors(shapes: list) -> list[tuple[int, list[int]]]:
    """onnxruntime's profile lists each operand as {dtype: shape}: (bytes per element, shape)."""
    out = []
    for entry in shapes or []:
        for dtype, shape in entry.items():
            out.append((_ELEMENT_BYTES.get(dtype, 4), [int(d) for d in shape]))
    return out


def _product_flops(inputs: list[tuple[int, list[int]]], outputs: list[tuple[int, list[int]]]) -> int:
    """2·(output elements)·K for a matrix product, K the first operand's contracted dimension
    (whichever of its last two is not the output's rows)."""
    a, out = inputs[0][1], outputs[0][1]
    rows = out[-2] if len(out) >= 2 else 1
    k = a[-1] if len(a) < 2 or a[-2] == rows else a[-2]
    return 2 * _numel(out) * k


def onnx_profile(events: list[dict], seconds: float) -> StepProfile:
    """A `StepProfile` of onnxruntime runs from its profile (`SessionOptions.enable_profiling`):
    every `model_run` in `events` counts; `seconds`: one run timed without profiling."""
    runs = [e for e in events if e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and e["args"].get("op_name") != "If"]  # an If's time is its branch's nodes'
    product_us = 0.0
    flops = elementwise = operands = 0
    for e in nodes:
        inputs, outputs = _onnx_tensors(e["args"].get("input_type_shape")), _onnx_tensors(e["args"].get("output_type_shape"))
        if e["args"]["op_name"] in ONNX_PRODUCTS:
            product_us += e["dur"]
            flops += _product_flops(inputs, outputs)
        else:
            sizes = [b * _numel(s) for b, s in inputs + outputs]
            elementwise += max(sizes, default=0)
            operands += sum(sizes)
    n = max(len(runs), 1)
    return StepProfile(seconds=seconds, product_seconds=product_us / n / 1e6,
                       product_gflop=flops / n / 1e9, elementwise_gbytes=elementwise / n / 1e9,
                       operand_gbytes=operands / n / 1e9, operators=len(nodes) // n)


def floor_seconds(profile: StepProfile, speeds: MachineSpeeds) -> dict[str, float]:
    """The step's time with its products at the large-product speed (the rest as measured), and
    the roofline floor (products at that speed, each other operator one pass over its largest
    operand at copy bandwidth, nothing else).

    The products' time is their own time in the profile, and the rest is the unprofiled step's
    remainder: profiling costs time in every one of a cached ViT-B step's 8,581 operator calls, and
    split by the shares of profiled self time, that step's 22.4 GFLOP of products read as 201
    GFLOP/s, above the 189 of a large square product measured beside it.
    """
    products = min(profile.product_seconds, profile.seconds)
    products_at_peak = profile.product_gflop / speeds.gemm_gflops
    elementwise_floor = profile.elementwise_gbytes / speeds.copy_gbytes
    operand_floor = profile.operand_gbytes / speeds.copy_gbytes
    return {
        "products_measured": products,
        "products_at_peak": products_at_peak,
        "rest_measured": profile.seconds - products,
        "rest_floor": elementwise_floor,
        "rest_operands": operand_floor,
        "peak_products": products_at_peak + profile.seconds - products,
        "floor": products_at_peak + elementwise_floor,
        "operand_floor": products_at_peak + operand_floor,
    }


def markdown(baseline_seconds: float, baseline: str, profile: StepProfile, speeds: MachineSpeeds,
             unit: str = "step") -> str:
    """The measured `unit` (a training step, a decoder call) and its floors, each as
    `baseline_seconds` / its time."""
    f = floor_seconds(profile, speeds)
    rows = [
        (baseline, baseline_seconds),
        (f"this {unit}, measured", profile.seconds),
        # what faster or fused element-wise kernels alone could give, however good: nothing but products
        ("the products alone, as measured (every other operator free)", f["products_measured"]),
        ("products at the large-product speed, the rest as measured", f["peak_products"]),
        ("products so, each other operator reading its operands and writing once", f["operand_floor"]),
        ("roofline floor: that, and each other operator one pass over its largest operand", f["floor"]),
    ]
    lines = [f"| {unit} | ms/{unit} | ratio |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {seconds * 1e3:.1f} | {baseline_seconds / seconds:.2f}× |" for name, seconds in rows]
    lines += [
        "",
        f"- matrix products: {profile.product_gflop:.2f} GFLOP/{unit} in {f['products_measured'] * 1e3:.1f} ms "
        f"({profile.product_gflop / max(f['products_measured'], 1e-9):.0f} GFLOP/s; a [2048, 2048]² product "
        f"here: {speeds.gemm_gflops:.0f} GFLOP/s)",
        f"- the other operators: {f['rest_measured'] * 1e3:.1f} ms; their largest operands "
        f"{profile.elementwise_gbytes:.3f} GB/{unit}, {f['rest_floor'] * 1e3:.1f} ms at the copy bandwidth "
        f"(all operands and results {profile.operand_gbytes:.3f} GB/{unit}, {f['rest_operands'] * 1e3:.1f} ms; "
        f"{speeds.copy_gbytes:.1f} GB/s read + written); {profile.operators} operator calls/{unit}",
    ]
    return "\n".join(lines)
