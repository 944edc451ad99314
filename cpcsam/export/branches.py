"""Two traces of one module joined into one ONNX graph by an `If`: a graph with a fast path.

A traced graph has no control flow: it records the operations of the example it was traced with,
for every input. The decoder's mask prompts (`DecoderOnnxModel._images_with_mask_prompts`) give
each masked entity image tokens of its own, so the one traced graph selected every first-block
image-side tensor per entity (a `Gather` of [N, H, HW, d] each, the image tokens' [N, HW, C]), in
calls without a mask prompt too, where all of them are the one image's: at the ViT-B decoder's
sizes 2–5 % of a call at one and at four entities. Traced once with mask prompts and
once without them (one image, which broadcasts to every entity without a copy), the two graphs
become the branches of an `If` on whether any entity has one.

The branches read the outer graph's inputs and its initializers, which hold each weight once: the
two traces fold their constants alike, so equal tensors under different names are one tensor
(the ViT-B decoder's file grows by 2 %, its node protos). Each branch's nodes and intermediate
values get the branch's name as a prefix (ONNX names are global across a graph and its
subgraphs), which is also how a profile tells the branches apart.

onnxruntime optimizes a branch less than the same graph on its own: the no-mask branch keeps 653
nodes against 627 (shape arithmetic it does not fold, one `Slice` pattern it does not fuse into a
`Split`), whether the small constants sit in the branch or in the outer graph and with or without
the outer inputs' shapes declared in it. In time the joined graph and the no-mask trace alone were
within each other's noise (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper, numpy_helper


def _digest(tensor: TensorProto) -> tuple[int, tuple[int, ...], str]:
    """What makes two initializers the same tensor: type, shape and bytes (not the name)."""
    data = numpy_helper.to_array(tensor).tobytes()
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest()


class _Initializers:
    """The outer graph's initializers: each distinct tensor once, whichever trace it came from."""

    def __init__(self) -> None:
        self.tensors: list[TensorProto] = []
        self._by_digest: dict[tuple[int, tuple[int, ...], str], str] = {}
        self._names: set[str] = set()

    def add(self, tensor: TensorProto, prefix: str) -> str:
        """The outer name of `tensor`: an equal tensor's if there is one, else its own (prefixed
        if another tensor already has that name)."""
        key = _digest(tensor)
        if key in self._by_digest:
            return self._by_digest[key]
        name = tensor.name if tensor.name not in self._names else prefix + tensor.name
        copy = TensorProto()
        copy.CopyFrom(tensor)
        copy.name = name
        self.tensors.append(copy)
        self._names.add(name)
        self._by_digest[key] = name
        return name


def _branch(model: ModelProto, prefix: str, input_names: set[str], initializers: _Initializers) -> GraphProto:
    """`model`'s graph as an `If` branch: no inputs of its own (it reads the outer graph's inputs
    and initializers by name), every value it computes renamed `prefix + name`."""
    graph = model.graph
    outer = {t.name: initializers.add(t, prefix) for t in graph.initializer}
    produced = {name for node in graph.node for name in node.output if name}

    def rename(name: str) -> str:
        if not name or name in input_names and name not in produced:
            return name  # an optional input left out, or an input of the outer graph
        if name in produced:
            return prefix + name
        if name in outer:
            return outer[name]
        raise ValueError(f"branch {prefix!r}: value {name!r} is neither computed, an initializer nor an input")

    nodes = []
    for node in graph.node:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"branch {prefix!r}: node {node.name!r} ({node.op_type}) has a subgraph of its own")
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        renamed.name = prefix + node.name
        renamed.ClearField("input")
        renamed.ClearField("output")
        renamed.input.extend(rename(name) for name in node.input)
        renamed.output.extend(rename(name) for name in node.output)
        nodes.append(renamed)
    outputs = []
    for value in graph.output:
        if value.name not in produced:  # an output that is an input or a constant: passed through
            nodes.append(helper.make_node("Identity", [rename(value.name)], [prefix + value.name],
                                          name=f"{prefix}{value.name}/identity"))
        outputs.append(_renamed_value(value, prefix + value.name))
    value_info = [_renamed_value(v, prefix + v.name) for v in graph.value_info if v.name in produced]
    return helper.make_graph(nodes, prefix.rstrip("/"), [], outputs, value_info=value_info)


def _renamed_value(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    renamed = onnx.ValueInfoProto()
    renamed.CopyFrom(value)
    renamed.name = name
    return renamed


def join_on_any_positive(flag_input: str, then_model: ModelProto, else_model: ModelProto,
                         then_name: str, else_name: str) -> ModelProto:
    """One model that runs `then_model` when any element of the input `flag_input` is > 0 and
    `else_model` otherwise (also when it is empty).

    `then_model` gives the outer graph its inputs, outputs and opsets; `else_model` must read a
    subset of those inputs and have the same outputs, in the same order.
    """
    then_graph, else_graph = then_model.graph, else_model.graph
    inputs = {v.name for v in then_graph.input}
    if flag_input not in inputs:
        raise ValueError(f"{flag_input!r} is not an input of the graph ({sorted(inputs)})")
    missing = {v.name for v in else_graph.input} - inputs
    if missing:
        raise ValueError(f"the {else_name!r} branch reads inputs the graph does not have: {sorted(missing)}")
    then_outputs, else_outputs = [v.name for v in then_graph.output], [v.name for v in else_graph.output]
    if then_outputs != else_outputs:
        raise ValueError(f"the branches' outputs differ: {then_outputs} against {else_outputs}")

    initializers = _Initializers()
    then_branch = _branch(then_model, f"{then_name}/", inputs, initializers)
    else_branch = _branch(else_model, f"{else_name}/", inputs, initializers)
    zero = helper.make_tensor(f"{flag_input}/zero", TensorProto.FLOAT, [], [0.0])
    condition = [  # Σ [flag > 0] > 0: an empty flag (no entities) sums to 0
        helper.make_node("Greater", [flag_input, zero.name], [f"{flag_input}/positive"], name=f"{flag_input}/positive"),
        helper.make_node("Cast", [f"{flag_input}/positive"], [f"{flag_input}/positive_f"], to=TensorProto.FLOAT,
                         name=f"{flag_input}/cast"),
        helper.make_node("ReduceSum", [f"{flag_input}/positive_f"], [f"{flag_input}/count"], keepdims=0,
                         name=f"{flag_input}/count"),
        helper.make_node("Greater", [f"{flag_input}/count", zero.name], [f"{flag_input}/any"], name=f"{flag_input}/any"),
    ]
    branch = helper.make_node("If", [f"{flag_input}/any"], then_outputs, name=f"{then_name}_or_{else_name}",
                              then_branch=then_branch, else_branch=else_branch)
    graph = helper.make_graph(condition + [branch], then_graph.name, list(then_graph.input), list(then_graph.output),
                              initializer=[zero, *initializers.tensors])
    joined = helper.make_model(graph, opset_imports=list(then_model.opset_import), ir_version=then_model.ir_version,
                               producer_name=then_model.producer_name, producer_version=then_model.producer_version)
    joined.metadata_props.extend(then_model.metadata_props)
    return joined


def all_nodes(graph: GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node of `graph` and of its subgraphs (the branches of an `If`, ...), depth first."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from all_nodes(subgraph)
