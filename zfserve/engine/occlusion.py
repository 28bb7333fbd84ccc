"""Occlusion sensitivity (paper §4, Fig. 7): slide a square over the image and watch the network's output.

Maps over window positions: the probability of a target class, the most probable class, and the total
activation of one feature map (by default the conv5 map strongest on the unoccluded image); plus a per-pixel
attribution with Captum ``Occlusion``'s definition (the average drop over the windows that covered a pixel).

Positions: per axis ``ceil((224 - window) / stride) + 1`` windows starting at ``i * stride``; the last one is
clipped at the border (Captum's rule). ``fill`` is in network-input units (mean subtracted): ``"mean"`` is 0,
the model's mean colour; ``fill_units="pixel"`` takes 0..255 values and subtracts the model's mean.

Why it is fast and still exact: an occluder changes every conv map only near itself. The unoccluded pass is
cached; for each window only the changed region of each layer is recomputed, as a fixed-size tile (placed
inside the map, so every tile of a batch has the same shape) whose input is cut from the zero-padded cached
map of the layer below with the freshly computed tile of that layer pasted in. Block 1 reads the occluded
image directly (conv1 + pool1 + LRN in one stage; a mask zeroes the conv1 row that ceil-mode pooling reads
past the end). Tiles of many positions run as one batch; conv5 tiles are pasted into copies of the cached
conv5 map for pool5 + fc6-8, batched across groups. Recomputed values are the same arithmetic as a full
forward pass, so the maps agree with brute force to float rounding. Optionally, positions are grouped per axis
by how large their changed regions are (windows near the border change less), each group with its own,
smaller tile shapes. Each stage is a small ONNX graph run by ONNX Runtime on CPUs (eager PyTorch's
ceil-mode max-pool and LRN are slow there; LRN itself is written as a banded 1x1 conv and square roots,
over 10x faster than ONNX Runtime's LRN kernel on these maps) and eager PyTorch elsewhere.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..model import CONV_GEOMETRY, LAYER_NAMES, LRN_PARAMS, POOL_GEOMETRY, ZFNet

OUTPUTS = ("probability", "argmax", "activity", "attribution")
BACKENDS = ("auto", "onnxruntime", "torch")
ATTRIBUTION_ON = ("probability", "logit")
FILL_UNITS = ("input", "pixel")
# The layers whose changed region is recomputed as a tile, in order; conv5 tiles go into full-map copies.
TILE_LAYERS = ("pool1", "conv2", "pool2", "conv3", "conv4", "conv5")
# Cached maps are padded by this many zeros on every side so that every crop is a plain slice.
MARGIN = 8


@dataclass
class OcclusionResult:
    """What :meth:`OcclusionEngine.sweep` returns. Maps over positions are (ny, nx), row-major by window
    start; ``attribution`` is (H, W) in input pixels. Maps not asked for are ``None``."""

    window: int
    stride: int
    starts: np.ndarray                  # window starts along each axis (the same for rows and columns)
    fill: np.ndarray                    # (3,) fill values as given, in ``fill_units``
    fill_units: str                     # "input" (mean subtracted) or "pixel" (0..255)
    target: int
    layer: str
    channel: int
    attribution_on: str
    base_logits: np.ndarray             # (num_classes,) of the unoccluded image
    base_probability: float             # probability of ``target`` on the unoccluded image
    base_activity: float                # total activation of ``layer``/``channel`` on the unoccluded image
    probability: np.ndarray | None = None
    argmax: np.ndarray | None = None
    activity: np.ndarray | None = None
    attribution: np.ndarray | None = None
    timings: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.starts), len(self.starts))

    def arrays(self) -> dict[str, np.ndarray]:
        """The maps that were computed, by name (what the CLI writes to ``occlusion.npz``)."""
        return {name: getattr(self, name) for name in OUTPUTS if getattr(self, name) is not None}


# ------------------------------------------------------------------------------------------------ geometry
def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Captum's positions along one axis: ``ceil((size - window) / stride) + 1`` starts at ``i * stride``."""
    return np.arange(math.ceil((size - window) / stride) + 1, dtype=np.int64) * stride


def _layer_chain(model: ZFNet):
    """(name, kernel, stride, padding, output size) for conv1 .. conv5 in forward order."""
    sizes = model.spatial_sizes()
    chain = []
    for name in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5"):
        k, s, p = CONV_GEOMETRY.get(name, POOL_GEOMETRY)
        chain.append((name, k, s, p, sizes[name]))
    return chain


def _changed(lo, hi, k, s, p, n):
    """Outputs [lo', hi') of a k/s/p layer (n outputs) whose input window touches input rows [lo, hi)."""
    first = np.maximum(0, -(-(lo + p - k + 1) // s))
    last = np.minimum(n - 1, (hi - 1 + p) // s)
    return first, last + 1


def _span(start, size, k, s, p):
    """The input rows [start', start' + size') that outputs [start, start + size) of a k/s/p layer read."""
    return s * start - p, s * (size - 1) + k


@dataclass
class _AxisPlan:
    """One axis of a group of positions: window rows and, per tile layer, tile starts and a fixed size."""

    lo: np.ndarray
    hi: np.ndarray
    tiles: dict          # layer -> (starts (n,), size)

    def take(self, index: np.ndarray) -> "_AxisPlan":
        return _AxisPlan(self.lo[index], self.hi[index], {k: (a[index], s) for k, (a, s) in self.tiles.items()})


def _axis_plan(model: ZFNet, starts: np.ndarray, window: int) -> _AxisPlan:
    size = model.input_size
    lo = starts.astype(np.int64)
    hi = np.minimum(lo + window, size)
    changed = {}
    a, b = lo, hi
    for name, k, s, p, n in _layer_chain(model):
        a, b = _changed(a, b, k, s, p, n)
        changed[name] = (a, b, n)
    tiles = {}
    for name in TILE_LAYERS:
        a, b, n = changed[name]
        tile = int((b - a).max())
        tiles[name] = (np.clip(a, 0, n - tile), tile)
    return _AxisPlan(lo, hi, tiles)


def _full_plan(model: ZFNet) -> _AxisPlan:
    """Tiles that cover every map: the unoccluded pass through the same code, with an empty window."""
    sizes = model.spatial_sizes()
    zero = np.zeros(1, dtype=np.int64)
    return _AxisPlan(zero, zero, {name: (zero, sizes[name]) for name in TILE_LAYERS})


def _groups(model: ZFNet, starts: np.ndarray, window: int, buckets: int) -> list[np.ndarray]:
    """Split one axis's positions into ``buckets`` groups of similar changed-region size (contiguous in size
    order), so border windows, which change less, run with smaller tiles."""
    sizes = np.array([sum(_axis_plan(model, starts[i:i + 1], window).tiles[name][1] for name in TILE_LAYERS)
                      for i in range(len(starts))])
    order = np.argsort(sizes, kind="stable")
    return [chunk for chunk in np.array_split(order, min(buckets, len(starts))) if len(chunk)]


# ------------------------------------------------------------------------------------------------ backends
# Arrays between stages are "native": numpy on the CPU (thousands of small slice copies cost microseconds
# there, while torch's small CPU ops pay thread-pool overhead each), torch tensors on a GPU.
class _TorchStages:
    """The tile stages as eager PyTorch (any device). Inputs arrive already padded, so convs use padding 0."""

    def __init__(self, model: ZFNet, device: torch.device):
        self.device = device
        self.numpy = False   # whether the current call came with numpy arrays (CPU glue) or tensors
        self.p = {name: (getattr(model, name).weight.detach().to(device),
                         getattr(model, name).bias.detach().to(device))
                  for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")}

    def _in(self, a, first: bool = False):
        if first:
            self.numpy = isinstance(a, np.ndarray)
        return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a

    def _out(self, t):
        return t.numpy() if self.numpy and t is not None else t

    def early(self, name: str, x, mask, want_pool: bool, want_conv: bool):
        """conv + ReLU (rows outside the real map zeroed by ``mask``) -> 3x3/2 max-pool -> LRN."""
        w, b = self.p[name]
        conv = F.relu(F.conv2d(self._in(x, True), w, b, stride=CONV_GEOMETRY[name][1])) * self._in(mask)
        pool = F.max_pool2d(conv, POOL_GEOMETRY[0], POOL_GEOMETRY[1])
        norm = F.local_response_norm(pool, **LRN_PARAMS)
        return self._out(norm), self._out(pool if want_pool else None), self._out(conv if want_conv else None)

    def conv(self, name: str, x):
        w, b = self.p[name]
        return self._out(F.relu(F.conv2d(self._in(x, True), w, b, stride=CONV_GEOMETRY[name][1])))

    def pool_norm(self, name: str, x, want_pool: bool):
        """3x3/2 max-pool (the crop holds exactly the rows it reads) -> LRN."""
        pool = F.max_pool2d(self._in(x, True), POOL_GEOMETRY[0], POOL_GEOMETRY[1])
        return self._out(F.local_response_norm(pool, **LRN_PARAMS)), self._out(pool if want_pool else None)

    def head(self, c5, want: Sequence[str]):
        out = {"pool5": F.max_pool2d(self._in(c5, True), POOL_GEOMETRY[0], POOL_GEOMETRY[1], ceil_mode=True)}
        x = torch.flatten(out["pool5"], 1)
        for name in ("fc6", "fc7"):
            x = out[name] = F.relu(F.linear(x, *self.p[name]))
        out["logits"] = F.linear(x, *self.p["fc8"])
        return {k: self._out(v) for k, v in out.items()}


class _OrtStages:
    """The same stages as small ONNX graphs (written node by node) run by ONNX Runtime on the CPU; spatial
    sizes are dynamic, so one session per stage serves every tile shape."""

    def __init__(self, model: ZFNet, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3

        def session(graph):
            return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])

        self.sessions = {"conv1": session(_early_graph(model, "conv1"))}
        self.sessions.update({name: session(_conv_graph(model, name))
                              for name in ("conv2", "conv3", "conv4", "conv5")})
        self.sessions["pool2"] = session(_pool_norm_graph(model, "pool2"))
        self.sessions["head"] = session(_head_graph(model))

    def early(self, name, x, mask, want_pool, want_conv):
        names = ["norm"] + (["pool"] if want_pool else []) + (["conv"] if want_conv else [])
        got = dict(zip(names, self.sessions[name].run(names, {"x": x, "mask": mask})))
        return got["norm"], got.get("pool"), got.get("conv")

    def conv(self, name, x):
        return self.sessions[name].run(["y"], {"x": x})[0]

    def pool_norm(self, name, x, want_pool):
        names = ["norm"] + (["pool"] if want_pool else [])
        got = self.sessions[name].run(names, {"x": x})
        return got[0], (got[1] if want_pool else None)

    def head(self, c5, want):
        names = ["logits"] + [n for n in ("pool5", "fc6", "fc7") if n in want]
        return dict(zip(names, self.sessions["head"].run(names, {"x": c5})))


def _onnx_parts(model: ZFNet, name: str):
    from onnx import numpy_helper
    w = getattr(model, name).weight.detach().cpu().numpy().astype(np.float32)
    b = getattr(model, name).bias.detach().cpu().numpy().astype(np.float32)
    return [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]


def _onnx_model(nodes, inputs, outputs, initializers):
    from onnx import helper
    graph = helper.make_graph(nodes, "zfserve_occlusion_stage", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tensor(name, shape):
    from onnx import TensorProto, helper
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _lrn_nodes(x: str, y: str, channels: int, prefix: str):
    """Local response normalization as Mul -> banded 1x1 Conv -> root -> Div: ONNX Runtime's own LRN kernel
    is over 10x slower on these small maps. y = x / (k + alpha/size * sum of x^2 over `size` maps)^beta."""
    from onnx import helper, numpy_helper
    size, alpha, beta, k = (LRN_PARAMS[key] for key in ("size", "alpha", "beta", "k"))
    band = np.zeros((channels, channels, 1, 1), np.float32)
    for c in range(channels):   # maps c - size//2 .. c + (size-1)//2, as PyTorch and ONNX LRN count them
        band[c, max(0, c - size // 2):min(channels, c + (size - 1) // 2 + 1)] = alpha / size
    inits = [numpy_helper.from_array(band, f"{prefix}.band"),
             numpy_helper.from_array(np.full(channels, k, np.float32), f"{prefix}.k")]
    nodes = [helper.make_node("Mul", [x, x], [f"{prefix}.sq"]),
             helper.make_node("Conv", [f"{prefix}.sq", f"{prefix}.band", f"{prefix}.k"], [f"{prefix}.t"])]
    if beta == 0.75:   # t^0.75 = sqrt(t) * sqrt(sqrt(t)): two square roots are far cheaper than Pow
        nodes += [helper.make_node("Sqrt", [f"{prefix}.t"], [f"{prefix}.r2"]),
                  helper.make_node("Sqrt", [f"{prefix}.r2"], [f"{prefix}.r4"]),
                  helper.make_node("Mul", [f"{prefix}.r2", f"{prefix}.r4"], [f"{prefix}.d"]),
                  helper.make_node("Div", [x, f"{prefix}.d"], [y])]
    else:
        inits.append(numpy_helper.from_array(np.array(-beta, np.float32), f"{prefix}.nb"))
        nodes += [helper.make_node("Pow", [f"{prefix}.t", f"{prefix}.nb"], [f"{prefix}.d"]),
                  helper.make_node("Mul", [x, f"{prefix}.d"], [y])]
    return nodes, inits


def _early_graph(model: ZFNet, name: str):
    from onnx import helper
    k, s, _ = CONV_GEOMETRY[name]
    pk, ps, _ = POOL_GEOMETRY
    channels = getattr(model, name).out_channels
    lrn, lrn_inits = _lrn_nodes("pool", "norm", channels, f"{name}.lrn")
    nodes = [
        helper.make_node("Conv", ["x", f"{name}.weight", f"{name}.bias"], ["pre"], kernel_shape=[k, k],
                         strides=[s, s], pads=[0, 0, 0, 0]),
        helper.make_node("Relu", ["pre"], ["act"]),
        helper.make_node("Mul", ["act", "mask"], ["conv"]),
        helper.make_node("MaxPool", ["conv"], ["pool"], kernel_shape=[pk, pk], strides=[ps, ps]),
        *lrn,
    ]
    inputs = [_tensor("x", ["n", getattr(model, name).in_channels, "h", "w"]), _tensor("mask", ["n", 1, "ch", "cw"])]
    outputs = [_tensor(o, None) for o in ("norm", "pool", "conv")]
    return _onnx_model(nodes, inputs, outputs, _onnx_parts(model, name) + lrn_inits)


def _pool_norm_graph(model: ZFNet, name: str):
    from onnx import helper
    pk, ps, _ = POOL_GEOMETRY
    channels = model.conv2.out_channels if name == "pool2" else model.conv1.out_channels
    lrn, inits = _lrn_nodes("pool", "norm", channels, f"{name}.lrn")
    nodes = [helper.make_node("MaxPool", ["x"], ["pool"], kernel_shape=[pk, pk], strides=[ps, ps]), *lrn]
    return _onnx_model(nodes, [_tensor("x", ["n", channels, "h", "w"])],
                       [_tensor(o, None) for o in ("norm", "pool")], inits)


def _conv_graph(model: ZFNet, name: str):
    from onnx import helper
    k, s, _ = CONV_GEOMETRY[name]
    nodes = [helper.make_node("Conv", ["x", f"{name}.weight", f"{name}.bias"], ["pre"], kernel_shape=[k, k],
                              strides=[s, s], pads=[0, 0, 0, 0]),
             helper.make_node("Relu", ["pre"], ["y"])]
    inputs = [_tensor("x", ["n", getattr(model, name).in_channels, "h", "w"])]
    return _onnx_model(nodes, inputs, [_tensor("y", None)], _onnx_parts(model, name))


def _head_graph(model: ZFNet):
    from onnx import helper
    pk, ps, _ = POOL_GEOMETRY
    nodes = [helper.make_node("MaxPool", ["x"], ["pool5"], kernel_shape=[pk, pk], strides=[ps, ps], ceil_mode=1),
             helper.make_node("Flatten", ["pool5"], ["flat"], axis=1)]
    previous, inits = "flat", []
    for name in ("fc6", "fc7", "fc8"):
        out = "logits" if name == "fc8" else f"{name}.pre"
        nodes.append(helper.make_node("Gemm", [previous, f"{name}.weight", f"{name}.bias"], [out], transB=1))
        if name != "fc8":
            nodes.append(helper.make_node("Relu", [out], [name]))
            previous = name
        inits += _onnx_parts(model, name)
    size = model.spatial_sizes()["conv5"]
    inputs = [_tensor("x", ["n", model.conv5.out_channels, size, size])]
    outputs = [_tensor(o, None) for o in ("logits", "pool5", "fc6", "fc7")]
    return _onnx_model(nodes, inputs, outputs, inits)


# ------------------------------------------------------------------------------------------------ glue
# Maps are (C, H, W) with MARGIN zeros on every side; corners are numpy int arrays in map coordinates.
def _pad(a):
    if isinstance(a, np.ndarray):
        return np.pad(a, ((0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN)))
    return F.pad(a, (MARGIN,) * 4)


def _crop(padded, row0: np.ndarray, col0: np.ndarray, h: int, w: int):
    """Per-position (h, w) crops of a padded map -> (B, C, h, w)."""
    rows, cols = row0 + MARGIN, col0 + MARGIN
    if isinstance(padded, np.ndarray):
        out = np.empty((len(rows), padded.shape[0], h, w), dtype=padded.dtype)
        for b, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            out[b] = padded[:, r:r + h, c:c + w]
        return out
    dev = padded.device
    rows = torch.as_tensor(rows, device=dev)[:, None] + torch.arange(h, device=dev)
    cols = torch.as_tensor(cols, device=dev)[:, None] + torch.arange(w, device=dev)
    return padded[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3).contiguous()


def _paste(dst, dst_row0: np.ndarray, dst_col0: np.ndarray, tile, tile_row0: np.ndarray, tile_col0: np.ndarray):
    """Write each position's tile into its crop ``dst`` (both placed by corners in the same map). The parts of
    a tile outside its crop are not read by that crop and are dropped."""
    b, c, h, w = dst.shape
    th, tw = tile.shape[-2:]
    off_r, off_c = tile_row0 - dst_row0, tile_col0 - dst_col0
    if isinstance(dst, np.ndarray):
        for i, (r, c) in enumerate(zip(off_r.tolist(), off_c.tolist())):
            r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + th, h), min(c + tw, w)
            if r1 > r0 and c1 > c0:
                dst[i, :, r0:r1, c0:c1] = tile[i, :, r0 - r:r1 - r, c0 - c:c1 - c]
        return dst
    dev = dst.device
    rows = torch.as_tensor(off_r, device=dev)[:, None] + torch.arange(th, device=dev)
    cols = torch.as_tensor(off_c, device=dev)[:, None] + torch.arange(tw, device=dev)
    # Parts that fall outside go to one spare row/column, cut off afterwards.
    spare = dst.new_empty(b, c, h + 1, w + 1)
    spare[:, :, :h, :w] = dst
    rows = torch.where((rows >= 0) & (rows < h), rows, h)
    cols = torch.where((cols >= 0) & (cols < w), cols, w)
    index_b = torch.arange(b, device=dev)[:, None, None]
    spare[index_b, :, rows[:, :, None], cols[:, None, :]] = tile.permute(0, 2, 3, 1)
    return spare[:, :, :h, :w].contiguous()


def _where(mask: np.ndarray, a, b):
    """``a`` where the (B, 1, h, w) boolean ``mask`` is set, else ``b``."""
    if isinstance(b, np.ndarray):
        return np.where(mask, a, b)
    return torch.where(torch.as_tensor(mask, device=b.device), a, b)


def _native(a: np.ndarray, like):
    return a if isinstance(like, np.ndarray) else torch.as_tensor(a, device=like.device)


def _channel_sums(a, channel: int) -> np.ndarray:
    """Per-position float64 sum of one channel of (B, C, ...) values."""
    if isinstance(a, np.ndarray):
        return a[:, channel].reshape(len(a), -1).sum(1, dtype=np.float64)
    return a[:, channel].reshape(len(a), -1).sum(1, dtype=torch.float64).cpu().numpy()


def _numpy(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table of a padded (C, H, W) map in float64, with a leading zero row and column."""
    table = np.zeros((a.shape[0], a.shape[1] + 1, a.shape[2] + 1))
    table[:, 1:, 1:] = a.astype(np.float64).cumsum(1).cumsum(2)
    return table


def _box_sums(table: np.ndarray, channel: int, row0: np.ndarray, col0: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums of one channel of a padded map over the boxes [row0, row0+h) x [col0, col0+w)."""
    r0, c0, t = row0 + MARGIN, col0 + MARGIN, table[channel]
    return t[r0 + h, c0 + w] - t[r0, c0 + w] - t[r0 + h, c0] + t[r0, c0]


# ------------------------------------------------------------------------------------------------ engine
class OcclusionEngine:
    """Occlusion sweeps over one image at a time; see the module docstring.

    ``backend``: ``"onnxruntime"`` (CPU only), ``"torch"`` (any device) or ``"auto"`` (ONNX Runtime on the CPU
    when it is installed, else PyTorch). ``batch_size``: window positions per tile batch (default 128 on CPUs,
    1024 on GPUs, where launches rather than FLOPs dominate). ``buckets``: groups of positions per axis, each
    with its own, smaller tile sizes (default 1: one tile shape for all; more buckets save ~10% of the FLOPs
    but measured slower with ONNX Runtime on CPUs, 625 positions: 1 bucket 8.2 s, 3: 8.9 s, 8: 15.8 s CPU).
    """

    def __init__(self, model: ZFNet, *, device: str | torch.device = "cpu", batch_size: int | None = None,
                 backend: str = "auto", buckets: int | None = None):
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidArgumentError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}", field="device") from None
        if self.device.type not in ("cpu", "cuda"):
            raise InvalidArgumentError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}", field="device")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError("device 'cuda' was asked for but no CUDA device is available; use 'cpu'",
                                       field="device")
        on_cpu = self.device.type == "cpu"
        batch_size = (128 if on_cpu else 1024) if batch_size is None else batch_size
        buckets = 1 if buckets is None else buckets
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an integer >= 1, got {batch_size!r}",
                                       field="batch_size")
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {list(BACKENDS)}, got {backend!r}",
                                       field="backend")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
            raise InvalidArgumentError(f"buckets must be an integer >= 1, got {buckets!r}", field="buckets")
        if backend == "auto":
            backend = "onnxruntime" if self.device.type == "cpu" and _has_onnxruntime() else "torch"
        if backend == "onnxruntime" and self.device.type != "cpu":
            raise InvalidArgumentError(f"backend 'onnxruntime' runs on device 'cpu' only; use backend 'torch' "
                                       f"for {self.device}", field="backend")
        self.backend = backend
        self.model = model.eval()
        self.batch_size = batch_size
        self.buckets = buckets
        self.sizes = model.spatial_sizes()
        self.num_classes = model.fc8.out_features
        widths = {name: getattr(model, name).out_channels for name in ("conv1", "conv2", "conv3", "conv4", "conv5")}
        self.channels = {**widths, "pool1": widths["conv1"], "pool2": widths["conv2"], "pool5": widths["conv5"],
                         "fc6": model.fc6.out_features, "fc7": model.fc7.out_features,
                         "fc8": model.fc8.out_features}
        with torch.no_grad():
            self.stages = _OrtStages(model) if backend == "onnxruntime" else _TorchStages(model, self.device)
        self.stage_s: dict[str, float] = {}
        # Glue between stages in torch tensors (GPU) or numpy (CPU); tests flip it to run the GPU path on a CPU.
        self.tensor_glue = self.device.type != "cpu"

    # -------------------------------------------------------------------------------------- validation
    def _check(self, window, stride, layer, channel, target, attribution_on, outputs):
        size = self.model.input_size
        for name, value in (("window", window), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InvalidArgumentError(f"{name} must be an integer, got {value!r}", field=name)
        if not 1 <= window <= size:
            raise InvalidArgumentError(f"window must be in 1..{size}, got {window}", field="window")
        if not 1 <= stride <= window:
            raise InvalidArgumentError(f"stride must be in 1..window ({window}), got {stride}", field="stride")
        if layer not in LAYER_NAMES:
            raise InvalidArgumentError(f"layer must be one of {list(LAYER_NAMES)}, got {layer!r}", field="layer")
        if channel is not None and (isinstance(channel, bool) or not isinstance(channel, (int, np.integer))
                                    or not 0 <= channel < self.channels[layer]):
            raise InvalidArgumentError(f"channel must be in 0..{self.channels[layer] - 1} for layer {layer}, got "
                                       f"{channel!r}", field="channel")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, np.integer))
                                   or not 0 <= target < self.num_classes):
            raise InvalidArgumentError(f"target must be a class index in 0..{self.num_classes - 1}, got "
                                       f"{target!r}", field="target")
        if attribution_on not in ATTRIBUTION_ON:
            raise InvalidArgumentError(f"attribution_on must be one of {list(ATTRIBUTION_ON)}, got "
                                       f"{attribution_on!r}", field="attribution_on")
        if not outputs or any(o not in OUTPUTS for o in outputs):
            raise InvalidArgumentError(f"outputs must be a non-empty subset of {list(OUTPUTS)}, got "
                                       f"{list(outputs)}", field="outputs")

    def _image(self, image) -> np.ndarray:
        size = self.model.input_size
        x = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if tuple(x.shape) != (3, size, size):
            raise InvalidArgumentError(f"image must be a (3, {size}, {size}) network input (see "
                                       f"zfserve.preprocess.load_image), got shape {tuple(x.shape)}", field="image")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise InvalidArgumentError("image contains NaN or infinite values", field="image")
        return x

    def _fill(self, fill, fill_units: str):
        """(the fill values as given, the occluder as a (3, 1, 1) or (3, H, W) float32 array in network-input
        units)."""
        if fill_units not in FILL_UNITS:
            raise InvalidArgumentError(f"fill_units must be one of {list(FILL_UNITS)}, got {fill_units!r}",
                                       field="fill_units")
        accepted = "'mean', a number or 3 numbers (r, g, b)"
        if isinstance(fill, str):
            if fill != "mean":
                raise InvalidArgumentError(f"fill must be {accepted}, got {fill!r}", field="fill")
            return np.zeros(3), np.zeros((3, 1, 1), np.float32)
        try:
            values = np.asarray(fill, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"fill must be {accepted}, got {fill!r}", field="fill") from None
        if values.size == 1:
            values = np.repeat(values, 3)
        if values.size != 3 or not np.isfinite(values).all():
            raise InvalidArgumentError(f"fill must be {accepted}, got {fill!r}", field="fill")
        if fill_units == "pixel":
            if not ((values >= 0) & (values <= 255)).all():
                raise InvalidArgumentError(f"fill in pixel units must be in 0..255, got {values.tolist()}",
                                           field="fill")
            return values, (values.reshape(3, 1, 1) - self.model.config.preprocess.mean_crop()).astype(np.float32)
        return values, values.reshape(3, 1, 1).astype(np.float32)

    def _native(self, a: np.ndarray):
        """numpy on the CPU, a torch tensor on other devices (see the note above the backends)."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        return torch.as_tensor(a, device=self.device) if self.tensor_glue else a

    # -------------------------------------------------------------------------------------- the sweep
    @torch.no_grad()
    def sweep(self, image, window: int = 32, stride: int = 8, fill="mean", target: int | None = None,
              outputs: Sequence[str] = OUTPUTS, layer: str = "conv5", channel: int | None = None,
              attribution_on: str = "probability", progress: Callable[[int, int], None] | None = None,
              fill_units: str = "input") -> OcclusionResult:
        """Slide a ``window`` square with ``stride`` over ``image`` (a (3, 224, 224) network input) and return
        the maps named in ``outputs``. ``fill``: ``"mean"`` (0 in input units), a number, or (r, g, b), in
        ``fill_units`` ("input": mean-subtracted network units; "pixel": 0..255, the mean is subtracted).
        ``target``: the class whose probability is mapped (default: the unoccluded top-1). ``layer`` /
        ``channel``: the feature map whose total activation is mapped (default: conv5, the channel strongest
        on the unoccluded image). ``progress(done, total)`` is called after each batch of positions."""
        outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        self._check(window, stride, layer, channel, target, attribution_on, outputs)
        window, stride = int(window), int(stride)
        x = self._image(image)
        size = self.model.input_size
        fill_values, fill_map = self._fill(fill, fill_units)
        timings = {}
        self.stage_s = {}
        t0 = time.perf_counter()

        # The unoccluded pass runs through the same tile code: one position with an empty window, tiles that
        # cover whole maps, and all-zero caches (so each crop is exactly the tile pasted into it).
        caches = {"image": _pad(self._native(x)),
                  "baseline": _pad(self._native(np.broadcast_to(fill_map, (3, size, size))))}
        for key, name in (("n1", "pool1"), ("c2", "conv2"), ("n2", "pool2"), ("c3", "conv3"), ("c4", "conv4")):
            caches[key] = _pad(self._native(np.zeros((self.channels[name], self.sizes[name], self.sizes[name]))))
        full = _full_plan(self.model)
        origin = np.zeros(1, np.int64)
        base = self._tiles(caches, full, full, origin, origin, layer, want_all=True)
        maps = base["maps"]
        base.update(self._head(base["c5"], None, 0, want_all=True))
        for key in ("n1", "c2", "n2", "c3", "c4"):
            caches[key] = _pad(maps[key][0])
        caches["c5"] = maps["conv5"][0]
        base_logits = _numpy(base["logits"])[0].astype(np.float64)
        values = _numpy(maps[layer] if layer in maps else base["head"][layer])[0].astype(np.float64)
        per_channel = values.reshape(self.channels[layer], -1).sum(1)
        channel = int(per_channel.argmax()) if channel is None else int(channel)
        target = int(base_logits.argmax()) if target is None else int(target)
        want_activity = "activity" in outputs
        if want_activity and layer in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4"):
            # Activity of a tile layer = base total - base sum under the tile + the tile's new sum.
            n = self.sizes[layer]
            caches["activity_table"] = _integral(np.pad(values[:, :n, :n],
                                                        ((0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN))))
        caches["activity_total"] = per_channel[channel]
        timings["base_s"] = time.perf_counter() - t0

        starts = window_starts(size, window, stride)
        count = len(starts)
        total = count * count
        logits = np.empty((count, count, self.num_classes), dtype=np.float32)
        activity = np.empty((count, count), dtype=np.float64) if want_activity else None
        groups = _groups(self.model, starts, window, self.buckets)
        plans = [_axis_plan(self.model, starts[g], window) for g in groups]
        queue, done = [], 0

        def run_head():
            nonlocal queue, done
            rows = np.concatenate([q[0] for q in queue])
            cols = np.concatenate([q[1] for q in queue])
            c5 = [q[2] for q in queue]
            c5 = np.concatenate(c5) if isinstance(c5[0], np.ndarray) else torch.cat(c5)
            got = self._head(c5, layer if want_activity else None, channel)
            logits[rows, cols] = _numpy(got["logits"])
            if want_activity:
                activity[rows, cols] = got["activity"] if "activity" in got else \
                    np.concatenate([q[3] for q in queue])
            done += len(rows)
            queue = []
            if progress is not None:
                progress(done, total)

        for gy, plan_y in zip(groups, plans):
            for gx, plan_x in zip(groups, plans):
                iy, ix = (a.reshape(-1) for a in np.meshgrid(np.arange(len(gy)), np.arange(len(gx)), indexing="ij"))
                # Even batches: a group of 72 runs as 36 + 36, not 64 + 8.
                for part in np.array_split(np.arange(len(iy)), -(-len(iy) // self.batch_size)):
                    by, bx = iy[part], ix[part]
                    got = self._tiles(caches, plan_y, plan_x, by, bx, layer if want_activity else None,
                                      channel=channel)
                    queue.append((gy[by], gx[bx], got["c5"], got.get("activity")))
                    if sum(len(q[0]) for q in queue) >= self.batch_size:
                        run_head()
        if queue:
            run_head()
        timings["sweep_s"] = time.perf_counter() - t0 - timings["base_s"]
        timings["stages_s"] = dict(self.stage_s)   # summed over the base pass and the sweep

        probs = _softmax(logits.astype(np.float64))
        base_probs = _softmax(base_logits)
        result = OcclusionResult(
            window=window, stride=stride, starts=starts, fill=fill_values, fill_units=fill_units, target=target,
            layer=layer, channel=channel, attribution_on=attribution_on, base_logits=base_logits.astype(np.float32),
            base_probability=float(base_probs[target]), base_activity=float(per_channel[channel]),
            timings=timings)
        if "probability" in outputs:
            result.probability = probs[..., target].astype(np.float32)
        if "argmax" in outputs:
            result.argmax = logits.argmax(-1)
        if want_activity:
            result.activity = activity.astype(np.float32)
        if "attribution" in outputs:
            if attribution_on == "probability":
                drop = base_probs[target] - probs[..., target]
            else:
                drop = base_logits[target] - logits[..., target].astype(np.float64)
            result.attribution = per_pixel(drop, starts, window, size)
        return result

    # -------------------------------------------------------------------------------------- one batch
    def _tiles(self, caches, plan_y: _AxisPlan, plan_x: _AxisPlan, by, bx, layer, *, channel=0, want_all=False):
        """Recompute the tiles of a batch of positions (``by``/``bx`` index the axis plans): full conv5 maps,
        the activity of ``layer``/``channel`` if it is below conv5 and, with ``want_all``, every map."""
        py, px = plan_y.take(by), plan_x.take(bx)
        out, maps = {}, {}
        if want_all:
            layer = None
        act_region = None   # (tile, row0, col0) holding the changed part of the activity layer

        # Block 1: the occluded input crop -> conv1 -> ReLU -> pool1 -> LRN.
        (p1y, s1y), (p1x, s1x) = py.tiles["pool1"], px.tiles["pool1"]
        r1y, h1 = _span(p1y, s1y, *POOL_GEOMETRY)
        r1x, w1 = _span(p1x, s1x, *POOL_GEOMETRY)
        iy0, ih = _span(r1y, h1, *CONV_GEOMETRY["conv1"])
        ix0, iw = _span(r1x, w1, *CONV_GEOMETRY["conv1"])
        rows = iy0[:, None] + np.arange(ih)
        cols = ix0[:, None] + np.arange(iw)
        inside = (((rows >= py.lo[:, None]) & (rows < py.hi[:, None]))[:, None, :, None]
                  & ((cols >= px.lo[:, None]) & (cols < px.hi[:, None]))[:, None, None, :])
        crop = _where(inside, _crop(caches["baseline"], iy0, ix0, ih, iw), _crop(caches["image"], iy0, ix0, ih, iw))
        mask = _native(self._exists(r1y, h1, r1x, w1, self.sizes["conv1"]), crop)
        n1, p1, c1 = self._stage("conv1", "early", "conv1", crop, mask, want_all or layer == "pool1",
                                 want_all or layer == "conv1")
        if layer == "conv1":
            act_region = (c1, r1y, r1x)
        elif layer == "pool1":
            act_region = (p1, p1y, p1x)

        # Block 2, split so that conv2 runs on its changed region only: the cached LRN1 map with the new pool1
        # tile -> conv2 -> ReLU; then the cached conv2 map with that tile -> pool2 -> LRN. (The zeros past the
        # end of the padded conv2 map are exact for ceil-mode pooling: ReLU outputs are >= 0.)
        (ay, sy), (ax, sx) = py.tiles["conv2"], px.tiles["conv2"]
        cy0, ch = _span(ay, sy, *CONV_GEOMETRY["conv2"])
        cx0, cw = _span(ax, sx, *CONV_GEOMETRY["conv2"])
        crop = _paste(_crop(caches["n1"], cy0, cx0, ch, cw), cy0, cx0, n1, p1y, p1x)
        c2 = self._stage("conv2", "conv", "conv2", crop)
        (p2y, s2y), (p2x, s2x) = py.tiles["pool2"], px.tiles["pool2"]
        qy0, qh = _span(p2y, s2y, *POOL_GEOMETRY)
        qx0, qw = _span(p2x, s2x, *POOL_GEOMETRY)
        crop = _paste(_crop(caches["c2"], qy0, qx0, qh, qw), qy0, qx0, c2, ay, ax)
        n2, p2 = self._stage("pool2", "pool_norm", "pool2", crop, want_all or layer == "pool2")
        if layer == "conv2":
            act_region = (c2, ay, ax)
        elif layer == "pool2":
            act_region = (p2, p2y, p2x)
        if want_all:
            maps.update(conv1=c1, pool1=p1, n1=n1, conv2=c2, c2=c2, pool2=p2, n2=n2)

        # Blocks 3-5: the cached map of the layer below with its new tile -> conv -> ReLU.
        below, below_y, below_x, cache = n2, p2y, p2x, "n2"
        for name, key in (("conv3", "c3"), ("conv4", "c4"), ("conv5", "c5")):
            (ay, sy), (ax, sx) = py.tiles[name], px.tiles[name]
            cy0, ch = _span(ay, sy, *CONV_GEOMETRY[name])
            cx0, cw = _span(ax, sx, *CONV_GEOMETRY[name])
            crop = _paste(_crop(caches[cache], cy0, cx0, ch, cw), cy0, cx0, below, below_y, below_x)
            below, below_y, below_x, cache = self._stage(name, "conv", name, crop), ay, ax, key
            if want_all:
                maps[name] = maps[key] = below
            if layer == name and name != "conv5":   # conv5 activity is summed over the full maps
                act_region = (below, ay, ax)

        # Into copies of the cached conv5 map (the head batches positions from several tile groups).
        if want_all:
            out["c5"] = below
            out["maps"] = maps
        else:
            c5 = caches["c5"][None].repeat(len(by), 1, 1, 1) if torch.is_tensor(caches["c5"]) else \
                np.repeat(caches["c5"][None], len(by), axis=0)
            zero = np.zeros(len(by), np.int64)
            out["c5"] = _paste(c5, zero, zero, below, below_y, below_x)
        if act_region is not None:
            tile, row0, col0 = act_region
            h, w = tile.shape[-2:]
            out["activity"] = caches["activity_total"] - _box_sums(caches["activity_table"], channel, row0, col0,
                                                                   h, w) + _channel_sums(tile, channel)
        return out

    def _head(self, c5, layer, channel: int, want_all: bool = False):
        """pool5 -> fc6 .. fc8 for full conv5 maps: logits, and the activity of ``layer`` if it is conv5 or
        above (with ``want_all``, every head output)."""
        head = self._stage("head", "head", c5, ("pool5", "fc6", "fc7") if want_all else (layer,))
        head["fc8"] = head["logits"]
        out = {"logits": head["logits"], "head": head}
        if layer == "conv5":
            out["activity"] = _channel_sums(c5, channel)
        elif layer in ("pool5", "fc6", "fc7", "fc8") and not want_all:
            values = head["logits"] if layer == "fc8" else head[layer]
            out["activity"] = _channel_sums(values if layer == "pool5" else values[:, :, None], channel)
        return out

    def _stage(self, key: str, method: str, *args):
        """Run one stage and add its wall time to ``stage_s`` (on a GPU: launch time, no synchronization)."""
        start = time.perf_counter()
        out = getattr(self.stages, method)(*args)
        self.stage_s[key] = self.stage_s.get(key, 0.0) + time.perf_counter() - start
        return out

    @staticmethod
    def _exists(row0: np.ndarray, h: int, col0: np.ndarray, w: int, n: int) -> np.ndarray:
        """(B, 1, h, w) float mask: 1 where a conv row and column of the tile exist in the real n x n map.
        Ceil-mode pooling reads one past the end; ReLU outputs are >= 0, so a zero there never wins a max."""
        rows = (row0[:, None] + np.arange(h)) < n
        cols = (col0[:, None] + np.arange(w)) < n
        return (rows[:, None, :, None] & cols[:, None, None, :]).astype(np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def per_pixel(values: np.ndarray, starts: np.ndarray, window: int, size: int) -> np.ndarray:
    """A map over window positions -> (size, size): each pixel gets the mean of the values of the windows that
    covered it (Captum Occlusion's attribution when ``values`` are the drops)."""
    pixels = np.arange(size)
    cover = ((pixels[None, :] >= starts[:, None]) & (pixels[None, :] < starts[:, None] + window)).astype(np.float64)
    values = np.asarray(values, dtype=np.float64)
    total = cover.T @ values @ cover
    count = cover.T @ np.ones_like(values) @ cover
    return (total / count).astype(np.float32)


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
