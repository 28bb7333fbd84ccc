"""ONNX models (``kind: onnx``): reading the user's graph, the checks an import makes, and the graph zfserve serves.

The user's ``model.onnx`` is kept byte for byte (its SHA-256 is the model's version, as the weights' is for a
layered model). What is served is a wrapped copy (:func:`served_graph`) with zfserve's names: the input
``image`` (float32 N x 3 x S x S, dynamic N), the outputs ``logits``, ``probabilities`` (a softmax added when the
graph gives logits; when it ends in a Softmax, its input is the logits) and ``features`` (the input of the last
Gemm/MatMul: the penultimate features the out-of-distribution score reads). Every name of the user's graph gets
a prefix, so none of its tensors can collide with these.

Also here: the last layer's weights (:func:`head`, for ViM) and the re-drawing of initializers from the output end
(:func:`redraw`, the model-randomisation sanity check on the graph itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgumentError, ModelLoadError

INPUT_NAME = "image"          # zfserve.export's graph names (that module imports torch; this one must not)
LOGITS, PROBABILITIES, FEATURES = "logits", "probabilities", "features"
SERVED_FILE = "served.onnx"   # the wrapped graph, beside model.onnx (or in the cache)
PREFIX = "model/"             # put before every tensor name of the user's graph
LINEAR_OPS = ("Gemm", "MatMul")
PARAMETRISED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")
_FLOAT = 1                    # onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class GraphFacts:
    """What an import reads from a graph: its one image input (name, side), and its class output."""

    input: str
    size: int | None          # None: the graph leaves the side dynamic
    output: str


def load(data: bytes, source: str):
    """The ModelProto of ``data``; anything that is not an ONNX model is a one-line error naming ``source``."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"{source}: not an ONNX file ({type(exc).__name__})", field="model") from None
    if not proto.graph.node or not proto.graph.output or proto.ir_version < 3:
        raise InvalidArgumentError(f"{source}: not an ONNX file (no graph with nodes and outputs)", field="model")
    return proto


def image_inputs(proto) -> list:
    """The graph inputs that are not initializers (what a caller must feed)."""
    constants = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in constants]


def inspect(proto, source: str) -> GraphFacts:
    """The graph's facts, or the refusal (one line) of a graph zfserve cannot serve as an image classifier."""
    inputs = image_inputs(proto)
    if len(inputs) != 1:
        raise InvalidArgumentError(f"{source}: {len(inputs)} inputs ({', '.join(i.name for i in inputs) or 'none'}); "
                                   f"accepted: exactly one image input (float, N x 3 x H x W)", field="model")
    tensor = inputs[0].type.tensor_type
    if not inputs[0].type.HasField("tensor_type") or tensor.elem_type != _FLOAT:
        raise InvalidArgumentError(f"{source}: input {inputs[0].name!r} is not float32 (element type "
                                   f"{tensor.elem_type}); accepted: a float32 N x 3 x H x W image input",
                                   field="model")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if len(dims) != 4:
        raise InvalidArgumentError(f"{source}: input {inputs[0].name!r} has {len(dims)} dimensions; accepted: 4 "
                                   f"(N x 3 x H x W, layout NCHW)", field="model")
    if dims[1] not in (3, None) or (dims[2] is not None and dims[3] is not None and dims[2] != dims[3]):
        raise InvalidArgumentError(f"{source}: input {inputs[0].name!r} has shape {dims}; accepted: N x 3 x S x S "
                                   f"(NCHW, 3 colour channels, square)", field="model")
    return GraphFacts(inputs[0].name, dims[2] if dims[2] is not None else dims[3], proto.graph.output[0].name)


# ---------------------------------------------------------------------------------------------------- wrapping
def _rename(graph, mapping) -> None:
    """Rename every tensor of ``graph`` (and of its subgraphs) with ``mapping`` (empty names stay empty)."""
    from onnx import AttributeProto
    rename = lambda name: mapping(name) if name else name  # noqa: E731
    for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in collection:
            item.name = rename(item.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = rename(sparse.values.name)
    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                _rename(attribute.g, mapping)
            elif attribute.type == AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    _rename(sub, mapping)


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def last_linear(graph):
    """The last Gemm or MatMul node (graph order is topological): the layer that makes the logits."""
    return next((node for node in reversed(graph.node) if node.op_type in LINEAR_OPS), None)


def served_graph(data: bytes, config, metadata: dict) -> bytes:
    """The graph zfserve serves for an ONNX model's bytes (see the module's note), with ``metadata``."""
    from onnx import TensorProto, helper
    proto = load(data, "model.onnx")
    facts = inspect(proto, "model.onnx")
    graph = proto.graph
    _rename(graph, lambda name: INPUT_NAME if name == facts.input else PREFIX + name)
    output = PREFIX + facts.output
    del graph.value_info[:]      # shapes with a fixed batch would contradict the dynamic one
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = "batch"
    nodes = []
    flat = lambda src, dst: helper.make_node("Flatten", [src], [dst], axis=1, name=f"zfserve/{dst}")  # noqa: E731
    producer = _producers(graph).get(output)
    if config.onnx["output"] == "logits":
        nodes += [flat(output, LOGITS),
                  helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=1, name="zfserve/softmax")]
    elif producer is not None and producer.op_type == "Softmax":
        nodes += [flat(producer.input[0], LOGITS), flat(output, PROBABILITIES)]
    else:   # probabilities from elsewhere: their logarithm is logits up to a constant, which softmax ignores
        floor = helper.make_tensor("zfserve/floor", TensorProto.FLOAT, [], [1e-30])
        graph.initializer.append(floor)
        nodes += [flat(output, PROBABILITIES),
                  helper.make_node("Max", [PROBABILITIES, "zfserve/floor"], ["zfserve/clipped"], name="zfserve/max"),
                  helper.make_node("Log", ["zfserve/clipped"], [LOGITS], name="zfserve/log")]
    outputs = [LOGITS, PROBABILITIES]
    linear = last_linear(graph)
    if linear is not None:
        nodes.append(flat(linear.input[0], FEATURES))
        outputs.append(FEATURES)
    graph.node.extend(nodes)
    del graph.output[:]
    classes = config.num_classes
    graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", classes if name != FEATURES
                                                                                  else None]) for name in outputs)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


# ---------------------------------------------------------------------------------------------------- weights
def _constants(graph) -> dict:
    """Initializers and Constant nodes' values, by name, as numpy arrays."""
    from onnx import numpy_helper
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def head(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C)) of the layer that makes the logits (the last Gemm, or MatMul + Add); a
    ModelLoadError when they are not constants of the graph."""
    from onnx import helper
    graph = load(data, "model.onnx").graph
    node, values = last_linear(graph), _constants(graph)
    if node is None or node.input[1] not in values:
        raise ModelLoadError("model.onnx: the last Gemm/MatMul's weights are not constants of the graph")
    weight = values[node.input[1]].astype(np.float32)
    if node.op_type == "Gemm":
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = weight if attributes.get("transB", 0) else weight.T
        if attributes.get("transA", 0):
            raise ModelLoadError("model.onnx: the last Gemm transposes its input (transA); not supported")
        weight = weight * np.float32(attributes.get("alpha", 1.0))
        bias = values.get(node.input[2]) if len(node.input) > 2 else None
        bias = None if bias is None else bias * np.float32(attributes.get("beta", 1.0))
    else:
        weight = weight.T
        add = next((n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input), None)
        other = None if add is None else next((v for v in add.input if v != node.output[0]), None)
        bias = values.get(other)
    bias = np.zeros(weight.shape[0], np.float32) if bias is None else np.broadcast_to(bias, weight.shape[:1])
    return np.ascontiguousarray(weight, np.float32), np.ascontiguousarray(bias, np.float32)


def parametrised_layers(proto) -> list:
    """The nodes with constant weights (Conv, Gemm, MatMul, BatchNormalization), output end first."""
    values = {i.name for i in proto.graph.initializer}
    return [node for node in reversed(proto.graph.node)
            if node.op_type in PARAMETRISED_OPS and any(name in values for name in node.input[1:])]


def redraw(data: bytes, layers: int, seed: int = 0) -> bytes:
    """A copy of the graph whose ``layers`` parametrised layers nearest the output have their initializers re-drawn
    (cascading randomisation, Adebayo et al. 2018): each weight from a normal distribution with its own mean and
    standard deviation, so the scale of the activations is kept while what they learnt is gone."""
    from onnx import numpy_helper
    proto = load(data, "model.onnx")
    rng = np.random.default_rng(seed)
    initializers = {i.name: i for i in proto.graph.initializer}
    for node in parametrised_layers(proto)[:layers]:
        for name in node.input[1:]:
            if name in initializers:
                old = numpy_helper.to_array(initializers[name])
                if old.dtype.kind != "f":
                    continue
                if node.op_type == "BatchNormalization" and name == node.input[4]:   # the variance stays positive
                    continue
                new = rng.normal(float(old.mean()), float(old.std()) or 1e-3, old.shape).astype(old.dtype)
                initializers[name].CopyFrom(numpy_helper.from_array(new, name))
    return proto.SerializeToString()


__all__ = ["FEATURES", "GraphFacts", "INPUT_NAME", "LOGITS", "PROBABILITIES", "SERVED_FILE", "head", "image_inputs",
           "inspect", "last_linear", "load", "parametrised_layers", "redraw", "served_graph"]
