"""Exact occlusion with less work on an opaque ONNX graph: run its spatially local beginning only where a window
changes it.

An occluding window changes the input in a small square; through the first layers of a CNN (convolutions,
pools, pointwise ops, residual additions) it changes only the positions whose receptive field meets that square.
So the graph is split at a tensor ``T`` that everything later reads through (a cut), where everything before
is local:

    prefix:  image (N, 3, H, W) -> T (N, C, h, w)       run on the clean image once, and per window on a crop
    suffix:  T -> probabilities                           run per window on the clean T with the changed part pasted

Geometry, per axis, of a local tensor: index ``j`` reads input pixels ``[j*s - p, j*s - p + rf)`` (stride ``s``,
offset ``p``, receptive field ``rf``; a convolution of kernel ``k``, stride ``t``, pad ``b`` and dilation ``d``
makes ``s*t``, ``p + b*s``, ``rf + d*(k-1)*s``; an addition of two branches takes the union of their fields). A
window ``[y0, y1)`` changes the ``j`` whose field meets it; those are computed exactly from a crop of the occluded
image holding all their fields, as long as the crop starts at a multiple of ``s`` (so every layer's grid lands on
the full image's) and ends where their fields end or at the image's edge (where the crop's padding is the
image's). Every crop of one sweep has one length (clamped inside the image), so the prefix runs batched.

Which cut: every tensor meeting the rule is a candidate; the one with the fewest multiply-adds per window
(prefix on the crop + suffix, from the graph's shapes) wins, if it saves at least a tenth. Before a split is used
it is checked on an image against full forward passes (fp32: 1e-5 on probabilities); a graph it does not fit
runs full passes, as before. On ResNet-18 at 224 with windows of 32 the cut is the output of layer1 (stride 4,
field 43): about 1.3 times fewer multiply-adds per window than a full pass. The int8 graph (QDQ) splits the same way
at the quantized tensor, so its suffix still starts with a DequantizeLinear that ONNX Runtime fuses into int8
convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..onnx_graph import INPUT_NAME, PROBABILITIES

# Ops whose output position reads only its own input position (extra inputs: constants without spatial extent).
POINTWISE = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity", "Elu", "Selu",
             "Softplus", "Mish", "Gelu", "Erf", "PRelu", "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min"}
PER_CHANNEL = {"BatchNormalization", "QuantizeLinear", "DequantizeLinear"}   # extra inputs per channel, by definition
WINDOWED = {"Conv", "MaxPool", "AveragePool"}
MIN_SAVING = 0.9          # a split must need at most this share of a full pass's multiply-adds per window


@dataclass(frozen=True)
class Field:
    """Per axis (rows, columns): stride, offset and receptive field of a tensor's positions in input pixels."""

    stride: tuple[int, int]
    offset: tuple[int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class Cut:
    """A split of a graph: the cut tensor, its field and shape (C, h, w), and the multiply-adds of the prefix and
    of the whole graph per image."""

    tensor: str
    op: str                   # the op making it (a QuantizeLinear's output: an int8 graph's quantized tensor)
    field: Field
    shape: tuple[int, int, int]
    prefix_nodes: tuple[int, ...]
    prefix_macs: float
    total_macs: float


# ---------------------------------------------------------------------------------------------------- geometry
def _attributes(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _window(node, shapes) -> tuple | None:
    """(kernel, strides, pads at the start, dilations) per axis of a 2-D Conv/MaxPool/AveragePool, or None."""
    a = _attributes(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return None
    kernel = a.get("kernel_shape")
    if kernel is None and node.op_type == "Conv":
        weight = shapes.get(node.input[1])
        kernel = None if weight is None or len(weight) != 4 else weight[2:]
    if kernel is None or len(kernel) != 2 or len(node.output) > 1 and node.output[1]:
        return None          # not 2-D, or MaxPool's indices (positions in the whole tensor)
    strides = a.get("strides", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0]) if a.get("auto_pad", "NOTSET") in (b"NOTSET", "NOTSET") else [0, 0, 0, 0]
    dilations = a.get("dilations", [1, 1])
    return tuple(kernel), tuple(strides), tuple(pads[:2]), tuple(dilations)


def _flat_constant(name, shapes, constants) -> bool:
    """A constant that broadcasts over the spatial axes without varying along them (a scalar or (..., 1, 1))."""
    if name not in constants:
        return False
    shape = shapes.get(name)
    if shape is None:
        return False
    return int(np.prod(shape)) == 1 or (len(shape) >= 2 and shape[-1] == 1 and shape[-2] == 1)


def _field(node, fields: dict, shapes: dict, constants: set) -> Field | None:
    """The field of ``node``'s output, or None when the node is not spatially local."""
    moving = [name for name in node.input if name and name not in constants]
    if not moving or any(name not in fields for name in moving):
        return None
    if node.op_type in WINDOWED:
        window = _window(node, shapes)
        if window is None or len(moving) != 1 or node.input[0] != moving[0]:
            return None
        f, (kernel, strides, pads, dilations) = fields[moving[0]], window
        return Field(tuple(s * t for s, t in zip(f.stride, strides)),
                     tuple(p + b * s for p, b, s in zip(f.offset, pads, f.stride)),
                     tuple(r + d * (k - 1) * s for r, d, k, s in zip(f.size, dilations, kernel, f.stride)))
    if node.op_type in PER_CHANNEL:
        return fields[node.input[0]] if moving == [node.input[0]] else None
    if node.op_type not in POINTWISE:
        return None
    if any(name not in fields and not _flat_constant(name, shapes, constants) for name in node.input if name):
        return None
    parts = [fields[name] for name in moving]
    if len({f.stride for f in parts}) != 1:
        return None
    offset = tuple(max(f.offset[i] for f in parts) for i in range(2))
    end = tuple(max(f.size[i] - f.offset[i] for f in parts) for i in range(2))
    return Field(parts[0].stride, offset, tuple(e + o for e, o in zip(end, offset)))


def _macs(node, shapes: dict) -> float:
    """Multiply-adds of one Conv/Gemm/MatMul per image (0 for the rest, which cost little beside them)."""
    out = shapes.get(node.output[0])
    if not out:
        return 0.0
    if node.op_type == "Conv" and shapes.get(node.input[1]) and len(shapes[node.input[1]]) == 4:
        _, per_group, kh, kw = shapes[node.input[1]]
        return float(np.prod(out[1:])) * per_group * kh * kw
    if node.op_type in ("Gemm", "MatMul") and shapes.get(node.input[0]):
        inner = shapes[node.input[0]][-1]
        return float(np.prod(out[1:])) * inner
    return 0.0


def _shapes(proto, size: int) -> dict:
    """Every tensor's shape (batch 1) from ONNX shape inference; initializers' own shapes."""
    import onnx
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (1, 3, size, size)):
        dim.Clear()
        dim.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {i.name: list(i.dims) for i in proto.graph.initializer}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            value = _attributes(node).get("value")
            if value is not None:
                shapes[node.output[0]] = list(value.dims)
    return shapes


def _types(proto) -> dict:
    """Every tensor's element type (ONNX shape inference), initializers' included."""
    import onnx
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {i.name: i.data_type for i in proto.graph.initializer}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    return types


# ---------------------------------------------------------------------------------------------------- cuts
def _constants(graph) -> set:
    """Initializers and what nodes make from constants only (Constant nodes, the int8 graph's dequantized
    weights)."""
    constants = {i.name for i in graph.initializer}
    for node in graph.node:
        if all(not name or name in constants for name in node.input):
            constants.update(out for out in node.output if out)
    return constants


def _ancestors(index: int, nodes, producer: dict, constants: set) -> set:
    """The nodes ``nodes[index]`` reads from, itself included (constants' producers left out)."""
    seen, todo = set(), [index]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(producer[name] for name in nodes[i].input if name in producer and name not in constants)
    return seen


def find_cuts(proto, size: int) -> list[Cut]:
    """Every tensor that cuts ``proto`` (served graph: input ``image``) after a spatially local beginning."""
    graph, nodes = proto.graph, list(proto.graph.node)
    shapes = _shapes(proto, size)
    constants = _constants(graph)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    fields = {INPUT_NAME: Field((1, 1), (0, 0), (1, 1))}
    for node in nodes:           # ONNX graphs are in topological order
        if node.op_type != "Constant" and node.output[0] not in constants:
            field = _field(node, fields, shapes, constants)
            if field is not None:
                fields[node.output[0]] = field
    macs = [_macs(node, shapes) for node in nodes]
    outputs = {o.name for o in graph.output}
    cuts = []
    for tensor, field in fields.items():
        if tensor == INPUT_NAME or tensor in outputs or len(shapes.get(tensor, ())) != 4:
            continue
        inside = _ancestors(producer[tensor], nodes, producer, constants)
        made = {INPUT_NAME} | {out for i in inside for out in nodes[i].output}
        leaks = any(name in made and name != tensor for i, node in enumerate(nodes)
                    if i not in inside for name in node.input)
        if not leaks and not (made - {tensor}) & outputs:
            cuts.append(Cut(tensor, nodes[producer[tensor]].op_type, field, tuple(shapes[tensor][1:]), tuple(sorted(inside)),
                            sum(macs[i] for i in inside), sum(macs)))
    return cuts


@dataclass(frozen=True)
class Crops:
    """One axis of a sweep through a cut: per window start, the first input pixel of its crop, and the cut's
    changed positions ``[first, stop)``; ``length``: every crop's length."""

    crop_start: np.ndarray
    first: np.ndarray
    stop: np.ndarray
    length: int


def crops(starts, window: int, size: int, stride: int, offset: int, field: int, positions: int) -> Crops:
    """The crops of one axis (see the module's note): a crop holds the fields of every position a window changes,
    starts at a multiple of the cut's stride, and all have the length of the longest (clamped inside the image;
    ``length`` is congruent to ``size`` modulo the stride so that a crop ending at the edge still starts on the
    grid)."""
    starts = np.asarray(starts, np.int64)
    ends = np.minimum(size, starts + window)
    first = np.maximum(0, (starts + offset - field) // stride + 1)
    stop = np.minimum(positions, -((-(ends + offset)) // stride))
    need_start = np.maximum(0, first * stride - offset)
    need_end = np.minimum(size, (stop - 1) * stride - offset + field)
    crop_start = need_start // stride * stride
    length = int((need_end - crop_start).max())
    length = min(size, length + (size - length) % stride)
    crop_start = np.minimum(crop_start, size - length)
    return Crops(crop_start, first, stop, length)


def choose(cuts: list[Cut], size: int, window: int, stride: int):
    """(the cut with the fewest multiply-adds per window, its row/column crops), or None when no cut saves at
    least ``1 - MIN_SAVING`` of a full pass."""
    from .results import window_starts
    starts = window_starts(size, window, stride)
    best = None
    for cut in cuts:
        axes = [crops(starts, window, size, cut.field.stride[a], cut.field.offset[a], cut.field.size[a],
                      cut.shape[1 + a]) for a in range(2)]
        share = axes[0].length * axes[1].length / float(size * size)
        cost = cut.prefix_macs * share + cut.total_macs - cut.prefix_macs
        # Of cuts costing the same (a tensor, its activation, its quantized copy), an int8 graph's quantized one:
        # a quarter of the bytes to paste, and the suffix starts with a DequantizeLinear fused into int8 convs.
        key = (round(cost), cut.op != "QuantizeLinear")
        if best is None or key < best[0]:
            best = (key, cut, axes)
    if best is None or best[0][0] > MIN_SAVING * best[1].total_macs:
        return None
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------------- graphs
def _extract(proto, keep: list[int], inputs: list, output):
    """A copy of ``proto`` with the nodes ``keep`` (and the Constant nodes they read), ``inputs`` as its inputs and
    one output, pruned to what that output needs."""
    import onnx
    graph = proto.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    wanted, needed, todo, constants = set(keep), set(), [output.name], _constants(graph)
    given = {i.name for i in inputs}
    while todo:
        name = todo.pop()
        i = producer.get(name)
        if name in given or i is None or i in needed:
            continue
        if i not in wanted and not all(not n or n in constants for n in graph.node[i].input):
            continue
        needed.add(i)
        todo.extend(n for n in graph.node[i].input if n)
    names = {n for i in needed for n in graph.node[i].input}
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    new = model.graph
    del new.node[:], new.input[:], new.output[:], new.value_info[:], new.initializer[:]
    new.node.extend(graph.node[i] for i in sorted(needed))
    new.input.extend(inputs)
    new.output.append(output)
    new.initializer.extend(i for i in graph.initializer if i.name in names)
    del model.metadata_props[:]
    return model


def split_graphs(proto, cut: Cut) -> tuple[bytes, bytes]:
    """(prefix, suffix) serialized: image (N, 3, H, W dynamic) -> cut tensor; cut tensor -> probabilities."""
    from onnx import helper
    types = _types(proto)
    image = helper.make_tensor_value_info(INPUT_NAME, types[INPUT_NAME], ["batch", 3, "height", "width"])
    middle = helper.make_tensor_value_info(cut.tensor, types[cut.tensor], ["batch", cut.shape[0], None, None])
    prefix = _extract(proto, list(cut.prefix_nodes), [image], middle)
    rest = [i for i in range(len(proto.graph.node)) if i not in set(cut.prefix_nodes)]
    probabilities = next(o for o in proto.graph.output if o.name == PROBABILITIES)
    middle = helper.make_tensor_value_info(cut.tensor, types[cut.tensor], ["batch", *cut.shape])
    suffix = _extract(proto, rest, [middle], probabilities)
    return prefix.SerializeToString(), suffix.SerializeToString()


# ---------------------------------------------------------------------------------------------------- running
class SplitPlan:
    """A split in use for one (window, stride): its cut, row and column crops, and the two sessions."""

    def __init__(self, cut: Cut, rows: Crops, cols: Crops, window: int, prefix, suffix):
        self.cut, self.rows, self.cols, self.window = cut, rows, cols, window
        self.prefix, self.suffix = prefix, suffix
        self.stride = cut.field.stride

    def clean(self, images: np.ndarray) -> np.ndarray:
        """The cut tensor of whole (N, 3, H, W) images."""
        return self.prefix.run(None, {INPUT_NAME: np.ascontiguousarray(images, np.float32)})[0]

    def probabilities(self, items, starts, fill: np.ndarray) -> np.ndarray:
        """Probabilities of occluded copies: ``items`` are (image, its clean cut tensor, row, column) with the
        window at (``starts[row]``, ``starts[column]``) filled with ``fill`` (3, H, W)."""
        (lh, lw), size = (self.rows.length, self.cols.length), fill.shape[-1]
        crops = np.empty((len(items), 3, lh, lw), np.float32)
        for i, (x, _, r, c) in enumerate(items):
            y0, x0 = self.rows.crop_start[r], self.cols.crop_start[c]
            crops[i] = x[:, y0:y0 + lh, x0:x0 + lw]
            top, left = int(starts[r]), int(starts[c])
            bottom, right = min(size, top + self.window), min(size, left + self.window)
            crops[i, :, top - y0:bottom - y0, left - x0:right - x0] = fill[:, top:bottom, left:right]
        changed = self.clean(crops)
        batch = np.empty((len(items), *items[0][1].shape), items[0][1].dtype)
        for i, (_, clean, r, c) in enumerate(items):
            rows = slice(int(self.rows.first[r]), int(self.rows.stop[r]))
            cols = slice(int(self.cols.first[c]), int(self.cols.stop[c]))
            dy, dx = self.rows.crop_start[r] // self.stride[0], self.cols.crop_start[c] // self.stride[1]
            batch[i] = clean
            batch[i, :, rows, cols] = changed[i, :, rows.start - dy:rows.stop - dy, cols.start - dx:cols.stop - dx]
        return self.suffix.run([PROBABILITIES], {self.cut.tensor: batch})[0]


class Splitter:
    """The cuts of one served graph (ONNX Runtime, CPU) and the sessions of the splits built so far."""

    def __init__(self, onnx_bytes: bytes, size: int, threads: int | None):
        import onnx
        self.size, self.threads = int(size), threads      # threads None: ONNX Runtime's default (all cores)
        self._proto = onnx.load_from_string(onnx_bytes)
        self.cuts = find_cuts(self._proto, self.size)
        self._sessions: dict[str, tuple] = {}

    def plan(self, window: int, stride: int) -> SplitPlan | None:
        """The split for sweeps of ``window`` at ``stride``, or None when no cut saves enough."""
        from ..export import ort_session
        chosen = choose(self.cuts, self.size, window, stride)
        if chosen is None:
            return None
        cut, (rows, cols) = chosen
        if cut.tensor not in self._sessions:
            prefix, suffix = split_graphs(self._proto, cut)
            self._sessions[cut.tensor] = (ort_session(prefix, threads=self.threads),
                                          ort_session(suffix, threads=self.threads))
        return SplitPlan(cut, rows, cols, window, *self._sessions[cut.tensor])


def verify(plan: SplitPlan, full, starts, size: int, tolerance: float, seed: int = 0) -> float:
    """Compare ``plan`` with full forward passes (``full``: a batch of images -> probabilities) on a random image
    occluded (fill 0) at the corners, the edges' middles and the middle; returns the largest probability
    difference, or raises ValueError when it exceeds ``tolerance``."""
    x = np.random.default_rng(seed).standard_normal((3, size, size), dtype=np.float32)
    fill = np.zeros_like(x)
    picks = sorted({0, len(starts) // 2, len(starts) - 1})
    positions = [(r, c) for r in picks for c in picks]
    clean = plan.clean(x[None])[0]
    got = plan.probabilities([(x, clean, r, c) for r, c in positions], starts, fill)
    copies = np.repeat(x[None], len(positions), axis=0)
    for copy, (r, c) in zip(copies, positions):
        top, left = int(starts[r]), int(starts[c])
        copy[:, top:top + plan.window, left:left + plan.window] = 0.0
    diff = float(np.abs(got - full(copies)).max())
    if not diff <= tolerance:
        raise ValueError(f"split at {plan.cut.tensor} differs from full passes by {diff:.3g} (> {tolerance:g})")
    return diff


__all__ = ["Crops", "Cut", "Field", "SplitPlan", "Splitter", "choose", "crops", "find_cuts", "split_graphs",
           "verify"]
