"""Graph rewrites around the static int8 quantization of an exported model (:mod:`zfserve.engine.quantize`).

ONNX Runtime's QDQ quantizer turns Conv, MaxPool, Gemm and Mul into int8 kernels but leaves Sqrt and Div in
float, so the exported local response normalization (:func:`zfserve.export.lrn_to_onnx`: x / s^0.75 with
s = k + band(x^2), as two Sqrt and a Div) becomes a chain of dequantize -> float op -> quantize steps that cost
more than conv2 itself (measured on the embedded model: about a third of the int8 graph's time at batch 32).

:func:`linearize_lrns` rewrites it before quantization. In the int8 graph the LRN's input is clipped to its
quantized range [0, R] (R: the calibrated maximum), so s stays in [k, k + R^2 * (largest row sum of the band)],
a narrow interval for these networks (k = 2, alpha = 1e-4: [2, 2.07] on the embedded model). Over that interval
s^-beta is replaced by its minimax straight line a + b * s, whose largest relative error is computed (below
1e-4 on the embedded model, against the 8-bit step of 4e-3); the LRN becomes x * r with r = a + b * k +
b * band(x^2), i.e. Mul, a 1x1 Conv and Mul, all three int8 kernels. An LRN whose error would pass the tolerance
is left as it is (float). :func:`check_lrn_ranges` verifies on the quantized graph that each rewritten LRN's
input really is clipped at or below the R its line was fitted for.

:func:`float_outputs` removes the quantize/dequantize pair the quantizer puts on a graph output, so ``logits``
leaves the last Gemm in float (and the softmax, kept in float, reads them unrounded). The out-of-distribution
features' own branch (:func:`exclusive_branch`: the channel statistics) is kept out of quantization and its output
in float, so that the statistics fitted on the fp32 graph's features hold for the int8 graph's. (A feature the
classification path reads on, such as fc7, keeps its 8-bit output: the quantizer folds the ReLU before it into
that quantization, so removing it would expose the pre-ReLU values.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The largest relative error of the straight line that stands for s^-beta; beyond it the LRN stays float.
# 1e-3 is a quarter of the relative step of an 8-bit activation at the top of its range.
LRN_FIT_TOLERANCE = 1e-3


@dataclass
class LrnMatch:
    """One local response normalization as the exporter writes it."""

    x: str                       # its input tensor
    out: str                     # its output tensor
    nodes: list = field(repr=False)   # the nodes of the lowering
    band: np.ndarray = field(repr=False)   # (C, C, 1, 1): alpha / size inside the channel window, else 0
    k: float = 2.0
    beta: float = 0.75


def _graph_index(graph):
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    return producers, initializers


def _constant(name: str, producers, initializers) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output (None for anything computed)."""
    from onnx import numpy_helper
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _denominator(node, producers, initializers):
    """(s, beta, nodes) when ``node`` computes s^beta as the exporter writes it: Mul(Sqrt(s), Sqrt(Sqrt(s)))
    for beta = 0.75, Pow(s, beta) otherwise; None for anything else."""
    if node is None:
        return None
    if node.op_type == "Pow":
        beta = _constant(node.input[1], producers, initializers)
        return (node.input[0], float(beta), [node]) if beta is not None and beta.size == 1 else None
    if node.op_type != "Mul":
        return None
    a, b = (producers.get(name) for name in node.input)
    if a is None or b is None or a.op_type != "Sqrt" or b.op_type != "Sqrt":
        return None
    root, fourth = (a, b) if producers.get(b.input[0]) is a else (b, a)
    if producers.get(fourth.input[0]) is not root:
        return None
    return root.input[0], 0.75, [root, fourth, node]


def find_lrns(model) -> list[LrnMatch]:
    """Every LRN of the graph in the exporter's lowering: x / (Conv(x * x, band, k))^beta, the band conv 1x1."""
    from onnx import helper
    graph = model.graph
    producers, initializers = _graph_index(graph)
    found = []
    for div in graph.node:
        if div.op_type != "Div":
            continue
        x, denominator = div.input
        match = _denominator(producers.get(denominator), producers, initializers)
        if match is None:
            continue
        s, beta, power_nodes = match
        conv = producers.get(s)
        if conv is None or conv.op_type != "Conv" or len(conv.input) != 3:
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if attributes.get("group", 1) != 1 or any(attributes.get("pads", [0])) or \
                any(v != 1 for v in attributes.get("strides", [1])):
            continue
        square = producers.get(conv.input[0])
        band = _constant(conv.input[1], producers, initializers)
        k = _constant(conv.input[2], producers, initializers)
        if square is None or square.op_type != "Mul" or list(square.input) != [x, x] or band is None or k is None \
                or band.ndim != 4 or band.shape[2:] != (1, 1) or band.shape[0] != band.shape[1] \
                or np.any(band < 0) or not np.all(k == k.flat[0]):
            continue
        found.append(LrnMatch(x, div.output[0], [square, conv, *power_nodes, div], band, float(k.flat[0]), beta))
    return found


def linear_fit(s0: float, s1: float, beta: float) -> tuple[float, float, float]:
    """(slope, intercept, largest relative error) of the minimax straight line for f(s) = s^-beta on [s0, s1].

    f is convex and decreasing, so it lies below its secant; the best line is the secant moved down by half the
    largest gap, which is at the s where f' equals the secant's slope."""
    f = lambda s: s ** -beta  # noqa: E731
    if s1 <= s0 * (1 + 1e-12):
        return 0.0, f(s0), 0.0
    slope = (f(s1) - f(s0)) / (s1 - s0)
    touch = (slope / -beta) ** (1.0 / (-beta - 1.0))        # f'(touch) = slope
    gap = f(s0) + slope * (touch - s0) - f(touch)           # >= 0
    intercept = f(s0) - slope * s0 - gap / 2
    return slope, intercept, (gap / 2) / f(s1)


def linearize_lrns(model, input_max: dict[str, float], tolerance: float = LRN_FIT_TOLERANCE) -> list[dict]:
    """Rewrite (in place) every LRN whose input has a known maximum (``input_max``: tensor -> R) into x * r, r a
    straight line in band(x^2) (see the module doc). Returns one record per LRN found: its input, R, the range
    of s, the line's largest relative error and whether it was rewritten."""
    from onnx import helper, numpy_helper
    graph = model.graph
    records = []
    for lrn in find_lrns(model):
        if lrn.x not in input_max:
            continue
        limit = max(0.0, float(input_max[lrn.x]))
        band = lrn.band.astype(np.float64)
        s1 = lrn.k + limit * limit * float(band.sum(axis=1).max())
        slope, intercept, error = linear_fit(lrn.k, s1, lrn.beta)
        rewritten = error <= tolerance
        records.append({"input": lrn.x, "input_max": limit, "s": [lrn.k, s1], "max_relative_error": error,
                        "rewritten": rewritten})
        if not rewritten:
            continue
        position = min(list(graph.node).index(node) for node in lrn.nodes)
        for node in lrn.nodes:
            graph.node.remove(node)
        stem = lrn.out.strip("/").replace("/", "_")
        weight, bias, square, scale = (f"{stem}_lrnfit_{part}" for part in ("weight", "bias", "square", "scale"))
        channels = band.shape[0]
        graph.initializer.extend([
            numpy_helper.from_array((slope * band).astype(np.float32), weight),
            numpy_helper.from_array(np.full(channels, intercept + slope * lrn.k, np.float32), bias)])
        nodes = [helper.make_node("Mul", [lrn.x, lrn.x], [square], name=square),
                 helper.make_node("Conv", [square, weight, bias], [scale], name=scale, kernel_shape=[1, 1]),
                 helper.make_node("Mul", [lrn.x, scale], [lrn.out], name=f"{stem}_lrnfit_mul")]
        for offset, node in enumerate(nodes):
            graph.node.insert(position + offset, node)
    _drop_unused(graph)
    return records


def space_to_depth_first_conv(model, input_name: str) -> dict | None:
    """Rewrite (in place) a stride-2 Conv with odd padding that reads the graph input as SpaceToDepth(2) of the
    input and a stride-1 Conv of half the kernel on 4x the channels, padded by one block where the original pads
    (weights zero-padded at the front to an even kernel, so the products are the same ones plus zeros). ZFNet's
    conv1 (7x7/2, pads 1, 3 channels) becomes 4x4/1 on 12 channels: the int8 kernels run 3-channel inputs poorly
    (few values per pixel for their inner loop). The SpaceToDepth runs in float before the input is quantized
    (the caller keeps it out of quantization). Returns what was done (with the SpaceToDepth node's name), or
    None when the graph has no such conv."""
    from onnx import helper, numpy_helper
    graph = model.graph
    _, initializers = _graph_index(graph)
    conv = next((n for n in graph.node if n.op_type == "Conv" and n.input[0] == input_name), None)
    if conv is None or len(conv.input) < 2 or conv.input[1] not in initializers:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    weight = numpy_helper.to_array(initializers[conv.input[1]])
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    if attributes.get("strides") != [2, 2] or attributes.get("group", 1) != 1 or weight.ndim != 4 or \
            any(d != 1 for d in attributes.get("dilations", [1, 1])) or len(dims) != 4 or \
            any(d <= 0 or d % 2 for d in dims[2:]) or any(p not in (0, 1) for p in pads) or \
            attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    out, channels, kh, kw = weight.shape
    if (kh + pads[0]) % 2 or (kw + pads[1]) % 2:     # the front padding must complete the kernel to even
        return None
    half_h, half_w = (kh + pads[0]) // 2, (kw + pads[1]) // 2
    # An odd front pad of 1 is one zero tap in front of the kernel, i.e. one block of padding after folding.
    padded = np.zeros((out, channels, 2 * half_h, 2 * half_w), weight.dtype)
    padded[:, :, pads[0]:pads[0] + kh, pads[1]:pads[1] + kw] = weight
    # ONNX SpaceToDepth (DCR): output channel (dy * 2 + dx) * C + c holds input (c, 2y + dy, 2x + dx)
    folded = padded.reshape(out, channels, half_h, 2, half_w, 2).transpose(0, 3, 5, 1, 2, 4)
    folded = folded.reshape(out, 4 * channels, half_h, half_w)
    outputs = [(dims[2 + i] + pads[i] + pads[i + 2] - (kh, kw)[i]) // 2 + 1 for i in range(2)]
    # The folded conv's back padding: whatever makes its output the original's size.
    back = [outputs[i] - 1 + (half_h, half_w)[i] - dims[2 + i] // 2 - pads[i] for i in range(2)]
    if any(b < 0 or b > 1 for b in back):
        return None
    stem = conv.name.strip("/").replace("/", "_") or "conv"
    weight_name, folded_name = f"{stem}_s2d_weight", f"{stem}_s2d_input"
    graph.initializer.append(numpy_helper.from_array(folded, weight_name))
    position = list(graph.node).index(conv)
    s2d = helper.make_node("SpaceToDepth", [input_name], [folded_name], name=folded_name, blocksize=2)
    new_conv = helper.make_node("Conv", [folded_name, weight_name, *conv.input[2:]], list(conv.output),
                                name=conv.name, kernel_shape=[half_h, half_w], strides=[1, 1],
                                pads=[pads[0], pads[1], back[0], back[1]])
    graph.node.remove(conv)
    graph.node.insert(position, new_conv)
    graph.node.insert(position, s2d)
    _drop_unused(graph)
    return {"conv": conv.name, "kernel": [kh, kw], "channels": channels, "folded_kernel": [half_h, half_w],
            "space_to_depth": s2d.name}


def exclusive_branch(model, outputs) -> list[str]:
    """The names of the nodes whose results reach only the graph outputs ``outputs`` (a branch the rest of the
    graph does not read, such as the out-of-distribution features' reductions), producers first."""
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    wanted = set(outputs)
    other_outputs = {o.name for o in graph.output} - wanted
    branch: list = []
    inside: set[int] = set()
    for node in reversed(graph.node):   # the graph is in topological order: readers come after producers
        if not node.name or not any(o in wanted or o in readers for o in node.output):
            continue
        if any(o in other_outputs for o in node.output):
            continue
        if all(id(r) in inside for o in node.output for r in readers.get(o, [])):
            branch.append(node)
            inside.add(id(node))
    return [node.name for node in reversed(branch)]


def _drop_unused(graph) -> None:
    """Remove Constant nodes and initializers nothing reads any more (the replaced LRNs' band and k)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Constant" and not set(n.output) & used]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def quantized_range(model, tensor: str) -> tuple[float, float] | None:
    """The real interval a QuantizeLinear of ``tensor`` can represent in the quantized graph (None if none)."""
    graph = model.graph
    producers, initializers = _graph_index(graph)
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == tensor:
            scale = _constant(node.input[1], producers, initializers)
            zero = _constant(node.input[2], producers, initializers) if len(node.input) > 2 else np.uint8(0)
            info = np.iinfo(zero.dtype)
            z = float(np.asarray(zero).flat[0])
            s = float(np.asarray(scale).flat[0])
            return s * (info.min - z), s * (info.max - z)
    return None


def check_lrn_ranges(model, records: list[dict]) -> list[str]:
    """Problems (empty: none) with the rewritten LRNs of a quantized graph: each input must be quantized, never
    below 0 and never above the maximum its straight line was fitted for."""
    problems = []
    for record in records:
        if not record["rewritten"]:
            continue
        span = quantized_range(model, record["input"])
        if span is None:
            problems.append(f"{record['input']}: not quantized, so its range is not bounded")
        elif span[0] < -1e-6 * max(1.0, record["input_max"]) or span[1] > record["input_max"] * (1 + 1e-5) + 1e-6:
            problems.append(f"{record['input']}: quantized range [{span[0]:.4g}, {span[1]:.4g}] exceeds the fitted "
                            f"[0, {record['input_max']:.4g}]")
    return problems


def float_outputs(model, names) -> list[str]:
    """Remove, in place, the QuantizeLinear -> DequantizeLinear pair in front of each graph output in ``names``,
    so the producing op writes it in float. Returns the outputs changed."""
    graph = model.graph
    producers, _ = _graph_index(graph)
    changed = []
    for name in names:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        source = producers.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        readers = [n for n in graph.node if q is not None and q.output[0] in n.input]
        if source is None or readers != [dq]:
            continue
        graph.node.remove(q)
        graph.node.remove(dq)
        hidden = q.input[0]
        for node in graph.node:   # the source's output takes the output's name, and its readers follow
            node.output[:] = [name if out == hidden else out for out in node.output]
            node.input[:] = [name if inp == hidden else inp for inp in node.input]
        changed.append(name)
    _drop_unused(graph)
    return changed
