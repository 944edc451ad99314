"""Stage processes pin the CPU's kernel paths (components.cli.pin_cpu_kernels) before any torch work."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from components import cli

ROOT = Path(__file__).resolve().parents[1]
AVX2_CPU = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in cli.PINNED_CPU_KERNELS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_an_avx2_cpu_gets_every_variable_but_one_the_user_set(clean_env, tmp_path: Path) -> None:
    clean_env.setattr(platform, "machine", lambda: "x86_64")
    clean_env.setenv("MKL_CBWR", "COMPATIBLE")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(AVX2_CPU)
    assert cli.pin_cpu_kernels(cpuinfo) == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"


@pytest.mark.parametrize("machine, flags", [("x86_64", "fpu sse sse2 avx"), ("aarch64", "fp asimd sve")])
def test_nothing_is_pinned_without_avx2(clean_env, tmp_path: Path, machine: str, flags: str) -> None:
    """ATen would run AVX2 code on a CPU without it: such CPUs, and other architectures, keep
    their own kernels."""
    clean_env.setattr(platform, "machine", lambda: machine)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {flags}\n")
    assert cli.pin_cpu_kernels(cpuinfo) == {}
    assert cli.pin_cpu_kernels(tmp_path / "missing") == {}
    assert not any(key in os.environ for key in cli.PINNED_CPU_KERNELS)


STAGE = """
import json, os, sys
from components.cli import stage_main

def work(params, args, run):
    import torch
    torch.ones(8, 8) @ torch.ones(8, 8)
    return json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                       **{k: os.environ.get(k) for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}})
sys.exit(stage_main("probe", None, lambda parser: None, work))
"""


def test_a_stage_process_runs_its_torch_work_on_the_pinned_kernels(tmp_path: Path) -> None:
    if not Path("/proc/cpuinfo").is_file() or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("pinning applies to x86-64 Linux only")
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2: nothing is pinned")
    (tmp_path / "params.yaml").write_text(json.dumps({"tracking": {"enabled": False}}))
    (tmp_path / "stage.py").write_text(STAGE)
    env = {k: v for k, v in os.environ.items() if k not in cli.PINNED_CPU_KERNELS}
    done = subprocess.run([sys.executable, "stage.py", "--params", "params.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # AVX2 even on an AVX-512 CPU, where torch would pick AVX512 by itself
    assert seen == {"capability": "AVX2", **cli.PINNED_CPU_KERNELS}
