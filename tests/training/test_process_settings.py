"""`configure_process`'s reuse of freed memory, in fresh processes (the setting is process-wide, and
the heap's state depends on what the process did before)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A step's pattern: sixteen tensors of 4 MiB alive at once, then freed, each step's 64 KiB larger
# than the last (as activations vary with the entities per image). After ten steps, prints the page
# faults of five more: ~19,500 per step if freed memory went back to the kernel and is faulted in
# again, the growth alone (256 per step) if it was kept for reuse. The same with 32 MiB tensors:
# eight times the faults if they are mapped afresh.
PROBE = """
import resource, sys, torch
torch.set_num_threads(2)
if sys.argv[1] != "plain":
    from cpcsam.training.device import configure_process
    configure_process(2, large_blocks_from_heap=sys.argv[1] == "heap")
size = 2**20 if sys.argv[2] == "4MiB" else 2**23  # floats: 4 or 32 MiB
def step(i):
    return sum(float(t.sum()) for t in [torch.ones(size + i * 2**14) for _ in range(16)])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
    step(i)
before = faults()
for i in range(10, 15):
    step(i)
print(faults() - before)
"""
FAULTED_AGAIN = 5 * 16 * 1_024 * 0.9  # at least 4 MiB per tensor


def _page_faults(mode: str, size: str = "4MiB") -> int:
    return int(subprocess.run([sys.executable, "-c", PROBE, mode, size], capture_output=True, text=True,
                              check=True, env={"PATH": "/usr/bin:/bin"}).stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the freed-memory setting is glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    plain, kept = _page_faults("plain"), _page_faults("configure")
    assert plain > FAULTED_AGAIN, f"the probe no longer shows the faults ({plain})"
    assert kept < FAULTED_AGAIN / 10, f"{kept} page faults in 5 steps after configure_process (plain glibc: {plain})"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the freed-memory setting is glibc's mallopt")
def test_blocks_above_the_largest_mmap_threshold_come_from_the_heap_for_training() -> None:
    """32 MiB blocks (a cached ViT-B step's upscaled features at 4 entities) are mapped afresh each
    step even at glibc's largest threshold; the training stage's setting serves them from the heap."""
    mapped, heap = _page_faults("configure", "32MiB"), _page_faults("heap", "32MiB")
    assert mapped > 8 * FAULTED_AGAIN, f"the probe no longer shows the faults ({mapped})"
    assert heap < FAULTED_AGAIN / 10, f"{heap} page faults in 5 steps with large_blocks_from_heap (mapped: {mapped})"
