"""Two graphs joined by an `If` (`cpcsam.export.branches`), on models small enough to read."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cpcsam.export.branches import all_nodes, join_on_any_positive

WEIGHT = np.arange(300, dtype=np.float32)


def _model(op: str, weight_name: str, scale: float, inputs: tuple[str, ...] = ("x", "flag"),
           outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    """y = op(x, weight) · scale; `flag` is read by no node (as the no-mask trace reads no mask)."""
    values = {"x": [300], "flag": ["n"], "other": [300]}
    nodes = [helper.make_node(op, ["x", weight_name], ["t"], name="/op"),
             helper.make_node("Mul", ["t", "scale"], [outputs[0]], name="/scale")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, values[name]) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [300]) for name in outputs],
        initializer=[numpy_helper.from_array(WEIGHT, weight_name),
                     numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # what torch writes


def _run(model: onnx.ModelProto, flag: list[float]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.linspace(-1, 1, 300, dtype=np.float32)
    return session.run(None, {"x": x, "flag": np.asarray(flag, np.float32)})[0]


@pytest.fixture()
def joined() -> onnx.ModelProto:
    # Equal weights under different names; equal names ("scale") with different values.
    model = join_on_any_positive("flag", _model("Mul", "w_then", 2.0), _model("Add", "w_else", 3.0), "with", "without")
    onnx.checker.check_model(model, full_check=True)
    return model


def test_the_branch_follows_the_flag(joined):
    x = np.linspace(-1, 1, 300, dtype=np.float32)
    then, other = x * WEIGHT * 2.0, (x + WEIGHT) * 3.0
    np.testing.assert_allclose(_run(joined, [0.0, 1.0, 0.0]), then, rtol=1e-6)
    np.testing.assert_allclose(_run(joined, [0.5]), then, rtol=1e-6)
    np.testing.assert_allclose(_run(joined, [0.0, 0.0, -1.0]), other, rtol=1e-6)
    np.testing.assert_allclose(_run(joined, []), other, rtol=1e-6)  # no entities: nothing is > 0


def test_equal_weights_are_stored_once_and_equal_names_kept_apart(joined):
    outer = {t.name: float(numpy_helper.to_array(t).ravel()[-1]) for t in joined.graph.initializer}
    assert {name: value for name, value in outer.items() if name != "flag/zero"} == {
        "w_then": 299.0, "scale": 2.0, "without/scale": 3.0}
    (branch,) = [n for n in joined.graph.node if n.op_type == "If"]
    for attribute in branch.attribute:
        assert not attribute.g.initializer and not attribute.g.input
        assert [n.input[1] for n in attribute.g.node if n.name.endswith("/op")] == ["w_then"]
    names = [n.name for n in all_nodes(joined.graph)]
    assert len(names) == len(set(names)) and {"with//op", "without//op"} <= set(names)


def test_joined_graphs_must_agree(tmp_path):
    with pytest.raises(ValueError, match="'other'"):
        join_on_any_positive("flag", _model("Mul", "w", 2.0), _model("Add", "w", 3.0, inputs=("x", "flag", "other")),
                             "with", "without")
    with pytest.raises(ValueError, match="outputs differ"):
        join_on_any_positive("flag", _model("Mul", "w", 2.0), _model("Add", "w", 3.0, outputs=("z",)), "with", "without")
    with pytest.raises(ValueError, match="'mask'"):
        join_on_any_positive("mask", _model("Mul", "w", 2.0), _model("Add", "w", 3.0), "with", "without")
