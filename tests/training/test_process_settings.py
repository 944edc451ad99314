"""`configure_process`'s reuse of freed memory and its subnormal flush, in fresh processes (the
settings are process-wide, and the heap's state depends on what the process did before)."""

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
    # A tenth of what mapping these blocks afresh costs. The heap's count is 1,280 (the blocks'
    # growth) in most processes and 9,376 in some: small allocations made between the large ones
    # (a tensor's bookkeeping, the list holding them) can pin gaps in the freed heap, so the next
    # step's slightly larger blocks extend it instead. Mapped afresh they are ~670,000.
    assert heap < 8 * FAULTED_AGAIN / 10, f"{heap} page faults in 5 steps with large_blocks_from_heap (mapped: {mapped})"


@pytest.mark.parametrize("large_blocks_from_heap", [False, True])
def test_trimming_is_off_and_large_blocks_come_from_the_heap_only_when_asked(monkeypatch, large_blocks_from_heap) -> None:
    """The calls `keep_freed_memory` makes to glibc (a recording stand-in for libc: the heap's state
    decides page faults too unevenly from one process to the next for a probe of the trim). The trim
    threshold is -1, off (mallopt(3)): 2**31 - 1 let glibc return the heap's top after each of the
    ViT-B encoder's global-attention blocks, 9.7 GB faulted in again per pass."""
    import ctypes

    from cpcsam.training import device

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    device.keep_freed_memory(large_blocks_from_heap)
    settings = dict(calls)
    assert settings[device._M_TRIM_THRESHOLD] == -1
    assert settings[device._M_MMAP_THRESHOLD] == 32 * 2**20
    assert (settings.get(device._M_MMAP_MAX) == 0) is large_blocks_from_heap


# A product whose every term is subnormal (1e-39 · 0.5) and a sum of such terms, on two threads:
# prints the product and the matrix product's entries, which are subnormal (not 0) under IEEE rules.
SUBNORMALS = """
import sys, torch
torch.set_num_threads(2)
if sys.argv[1] != "plain":
    from cpcsam.training.device import configure_process
    configure_process(2)
a, b = torch.full((256, 256), 1e-39), torch.full((256, 256), 0.5)
print(float((a * b).abs().max()), float((a @ b).abs().max()))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="flush-to-zero is x86's MXCSR")
def test_subnormals_are_flushed_to_zero_in_the_stages_processes() -> None:
    """On Intel cores a multiply touching a subnormal takes a slow microcode path (a training step's
    backward makes them); the stages' processes flush them, on torch's worker threads too."""
    def run(mode: str) -> list[float]:
        out = subprocess.run([sys.executable, "-c", SUBNORMALS, mode], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin"}).stdout
        return [float(v) for v in out.split()]

    assert all(v > 0 for v in run("plain")), "the probe no longer makes subnormals"
    assert run("configure") == [0.0, 0.0]


@pytest.mark.parametrize(("mode", "targets", "context", "heap"), [
    ("lora-only", ["decoder_attention"], 0, True),          # cached embeddings: no encoder pass at all
    ("bilevel", ["decoder_attention"], 2, True),            # focus crops: the frozen encoder, without gradients
    ("lora-only", ["image_encoder_qkv", "decoder_attention"], 0, False),  # gradients through the encoder
    ("full-finetune", ["decoder_attention"], 0, False),
])
def test_training_takes_large_blocks_from_the_heap_only_with_a_frozen_encoder(monkeypatch, mode, targets, context,
                                                                               heap) -> None:
    """With gradients through the ViT-B encoder a kept heap doubled the peak RSS; without them it
    made an uncached step 1.6× faster (`configure_training_process`)."""
    from cpcsam.config import ModelConfig, TrainConfig
    from cpcsam.training import device
    from cpcsam.training.run import configure_training_process

    calls: list[tuple[int, bool]] = []
    monkeypatch.setattr(device, "configure_process",
                        lambda threads, large_blocks_from_heap=False: calls.append((threads, large_blocks_from_heap)))
    model = ModelConfig.from_params({"lora": {"targets": targets}, "crop": {"context": context}})
    configure_training_process(model, TrainConfig.from_params({"mode": mode, "threads": 1}))
    assert calls == [(1, heap)]
