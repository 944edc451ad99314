"""Execution-provider choice: CUDA only when it really loads, a loud fallback otherwise."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cpcsam.errors import CheckpointError, ConfigError
from cpcsam.export import runtime
from cpcsam.export.runtime import CPU, CUDA, create_session, requested_providers


def test_requested_providers():
    assert requested_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert requested_providers("auto", [CPU]) == [CPU]
    assert requested_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        requested_providers("cuda", [CPU])
    with pytest.raises(ConfigError, match="'tpu'"):
        requested_providers("tpu", [CPU])


class _FakeOrt:
    """onnxruntime-gpu on a machine without CUDA: lists CUDA, silently runs on CPU."""

    GraphOptimizationLevel = type("G", (), {"ORT_ENABLE_ALL": 99})

    class SessionOptions:
        def add_session_config_entry(self, key, value):
            pass

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None):
            self.asked = providers

        def get_providers(self):
            return [CPU]

    @staticmethod
    def get_available_providers():
        return [CUDA, CPU]


def test_cuda_fallback_is_reported(monkeypatch, tmp_path, caplog):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    monkeypatch.setattr(runtime, "_ort", lambda: _FakeOrt)
    with caplog.at_level(logging.WARNING, logger="cpcsam.export.runtime"):
        session, info = create_session(model, "auto")
    assert session.asked == [(CUDA, {"use_tf32": "0"}), CPU]  # CUDA was asked for (float32, no TF32)...
    assert info.providers == [CPU] and info.fell_back and not info.on_cuda  # ...and did not load
    assert "FELL BACK TO CPU" in caplog.text
    with pytest.raises(ConfigError, match="did not load"):
        create_session(model, "cuda")


def test_real_cpu_session(exported):
    _, enc_path, _ = exported
    session, info = create_session(enc_path, "cpu")
    assert info.providers[0] == CPU and not info.fell_back
    # its threads spin within a run only: the cores are free for the next graph or Python step at once
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    out = session.run(None, {"image": np.zeros((1, 3, 256, 256), np.float32)})[0]
    assert out.shape == (1, 64, 16, 16)


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.onnx"):
        create_session(tmp_path / "nothere.onnx")


def test_a_profiled_session_writes_every_run_with_its_nodes_shapes(exported, tmp_path):
    """`profile_prefix` is what benchmarks/roofline.py reads: onnxruntime's profile, whose node
    records carry the operands' shapes it counts multiply-adds and bytes from."""
    import json

    _, enc_path, _ = exported
    session, _ = create_session(enc_path, "cpu", 1, profile_prefix=str(tmp_path / "enc"))
    for _ in range(2):
        session.run(None, {"image": np.zeros((1, 3, 256, 256), np.float32)})
    path = session.end_profiling()
    assert path.startswith(str(tmp_path / "enc"))
    events = json.loads(open(path).read())
    assert sum(e.get("name") == "model_run" for e in events) == 2
    matmuls = [e for e in events if e.get("cat") == "Node" and e["args"].get("op_name") == "MatMul"]
    assert matmuls and all(e["args"]["input_type_shape"] and e["args"]["output_type_shape"] for e in matmuls)
    plain, _ = create_session(enc_path, "cpu", 1)
    assert not plain.get_session_options().enable_profiling
