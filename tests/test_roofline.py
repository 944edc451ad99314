"""`benchmarks/roofline.py`: the floors that say how far the cached step and the ONNX call could
still go on this machine count products' multiply-adds and the other operators' bytes rightly."""

from __future__ import annotations

import pytest
import torch
from script_modules import load_script

roofline = load_script("cpcsam_roofline_script", "benchmarks/roofline.py")


def test_a_pytorch_step_counts_its_products_flops_and_the_other_operators_bytes():
    a, b = torch.randn(64, 96), torch.randn(96, 32)
    x = torch.randn(4, 1000)  # 16 000 bytes
    y = torch.randn(1000)  # broadcast: the largest operand is x

    def step():
        a @ b  # one product: 2·64·32·96 FLOPs (its operands' `resolve_conj`s move nothing)
        x + y  # reads x and y, writes [4, 1000]
        torch.nn.functional.layer_norm(x, (1000,))  # its native_layer_norm reads x and writes as much
        x.view(2, 2000).transpose(0, 1)  # views move no data

    profile = roofline.profile_step(step, steps=3)
    assert profile.product_gflop == pytest.approx(2 * 64 * 32 * 96 / 1e9)
    assert profile.elementwise_gbytes == pytest.approx(2 * 16_000 / 1e9)
    assert profile.operand_gbytes == pytest.approx((16_000 + 4_000 + 16_000 + 2 * 16_000) / 1e9)
    assert 0 < profile.product_seconds < 0.01  # one small product's own time, not the step's


def _node(op: str, inputs: list[list[int]], outputs: list[list[int]], dur: int, dtype: str = "float") -> dict:
    return {"cat": "Node", "name": f"{op}_7_kernel_time", "dur": dur,
            "args": {"op_name": op, "input_type_shape": [{dtype: s} for s in inputs],
                     "output_type_shape": [{dtype: s} for s in outputs]}}


def test_an_onnx_profile_counts_products_whatever_side_is_transposed_and_leaves_out_if_nodes():
    events = [{"name": "model_run", "dur": 1000}, {"name": "model_run", "dur": 1000}]
    for _ in range(2):  # two runs, each the same nodes
        events += [
            _node("MatMul", [[4, 104, 4096], [4, 4096, 256]], [[4, 104, 256]], 300),
            _node("FusedMatMul", [[256, 512], [256, 128]], [[512, 128]], 100),  # transA: K = 256
            _node("Gelu", [[65536, 128]], [[65536, 128]], 500),
            _node("Where", [[10], [10], [10]], [[10]], 50, dtype="bool"),
            _node("If", [[1]], [[4, 1, 10, 10]], 5000),  # its branch's nodes are listed themselves
        ]
    profile = roofline.onnx_profile(events, seconds=0.001)
    assert profile.product_gflop == pytest.approx((2 * 4 * 104 * 256 * 4096 + 2 * 512 * 128 * 256) / 1e9)
    gelu = 65536 * 128 * 4
    assert profile.elementwise_gbytes == pytest.approx((gelu + 10) / 1e9)
    assert profile.operand_gbytes == pytest.approx((2 * gelu + 40) / 1e9)
    assert profile.product_seconds == pytest.approx(400e-6)  # per run
    assert profile.operators == 4


def test_the_floors_put_products_at_peak_and_the_rest_at_copy_bandwidth():
    profile = roofline.StepProfile(seconds=0.2, product_seconds=0.12, product_gflop=10.0, elementwise_gbytes=1.0,
                                   operand_gbytes=2.0, operators=100)
    speeds = roofline.MachineSpeeds(gemm_gflops=200.0, copy_gbytes=20.0)
    f = roofline.floor_seconds(profile, speeds)
    assert f["products_measured"] == pytest.approx(0.12)
    assert f["peak_products"] == pytest.approx(10 / 200 + 0.08)
    assert f["operand_floor"] == pytest.approx(10 / 200 + 2 / 20)
    assert f["floor"] == pytest.approx(10 / 200 + 1 / 20)
    table = roofline.markdown(8.0, "uncached step, measured", profile, speeds)
    assert "| this step, measured | 200.0 | 40.00× |" in table
    assert "| the products alone, as measured (every other operator free) | 120.0 | 66.67× |" in table
    assert "| roofline floor: that, and each other operator one pass over its largest operand | 100.0 | 80.00× |" in table


def test_products_timed_longer_than_the_unprofiled_step_count_as_the_whole_step():
    """The products' profiled time is capped at the step's: the rest never comes out negative."""
    profile = roofline.StepProfile(seconds=0.1, product_seconds=0.15, product_gflop=10.0, elementwise_gbytes=1.0,
                                   operand_gbytes=2.0, operators=100)
    f = roofline.floor_seconds(profile, roofline.MachineSpeeds(gemm_gflops=200.0, copy_gbytes=20.0))
    assert f["products_measured"] == pytest.approx(0.1)
    assert f["rest_measured"] == 0
    assert f["peak_products"] == pytest.approx(10 / 200)
