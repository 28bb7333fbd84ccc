"""What the engines return: plain dataclasses of numpy arrays, with no torch or ONNX Runtime behind them, so the
client (``zfserve.client``) returns the very same types from a server, and the renderer draws both alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# The maps an occlusion sweep can compute.
OUTPUTS = ("probability", "argmax", "activity", "attribution")
# Defaults shared by the engines, the server (for unset request fields), the client and the CLI.
DEFAULT_TOP_K = 5              # classes per image
DEFAULT_DECONV_TOP_K = 9       # units per image when none are named (the paper's top-9)
DEFAULT_WINDOW = 32            # occluder side, input pixels
DEFAULT_STRIDE = 8             # occluder step, input pixels
# What a deconvnet projection is, wherever one is shown (API, CLI, report): it shows the input pattern that drives
# a unit, and `zfserve faithfulness` finds the deconvnet map nearly the same when another class is explained
# (RandomLogit), so it is not evidence of what the class decision used.
DECONV_INTERPRETATION = "feature visualisation (class-insensitive)"


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k list: its index, name and probability."""

    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class OodScore:
    """How far one image lies from the data its model was fitted on (``zfserve.engine.ood``): ``score`` (higher:
    further), the model's ``threshold``, and ``out_of_distribution`` (score above it: the image is unlike what the
    model knows, and its prediction means little)."""

    score: float
    threshold: float
    out_of_distribution: bool

    def to_json(self) -> dict:
        return {"score": self.score, "threshold": self.threshold, "out_of_distribution": self.out_of_distribution}


class TopK(list):
    """The top-k :class:`Prediction` of one image, most probable first (a plain list), and ``ood``: its
    :class:`OodScore`, or None when the model has no out-of-distribution statistics."""

    def __init__(self, predictions=(), ood: OodScore | None = None):
        super().__init__(predictions)
        self.ood = ood


@dataclass
class ScoredBatch:
    """One classification pass over a batch: float32 (N, C) ``probabilities`` and each image's :class:`OodScore`
    (``ood`` None when the model has no statistics). Sliced by rows, as the server's batcher hands rows back."""

    probabilities: np.ndarray
    ood: list[OodScore] | None = None

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, rows: slice) -> "ScoredBatch":
        return ScoredBatch(self.probabilities[rows], None if self.ood is None else self.ood[rows])

    @staticmethod
    def concatenate(parts: list["ScoredBatch"]) -> "ScoredBatch":
        """The rows of ``parts`` in order (a request the batcher computed in several batches)."""
        ood = None if any(p.ood is None for p in parts) else [v for p in parts for v in p.ood]
        return ScoredBatch(np.concatenate([p.probabilities for p in parts]), ood)


@dataclass
class UnitProjection:
    """One projected unit.

    ``projection`` is unnormalized, in input units per unit of seed (the activation by default);
    ``box`` is the receptive field ``(x0, y0, x1, y1)`` in input pixels, clipped to the image, exclusive end;
    ``patch`` is the input under the box, ``(3, y1 - y0, x1 - x0)``, in network-input units. From a server
    (``zfserve.client``) ``projection`` is there with ``return_tensor`` (else None), ``patch`` is always None,
    and ``png`` / ``patch_png`` hold the rendered projection and input patch when those were asked for;
    ``model_version`` is the served version that computed it (from a server; empty from a local engine).
    A projection is a :data:`DECONV_INTERPRETATION`, not an attribution of the class decision.
    """

    image_index: int
    layer: str
    channel: int
    y: int
    x: int
    activation: float
    box: tuple[int, int, int, int]
    projection: np.ndarray | None
    patch: np.ndarray | None
    png: bytes = b""
    patch_png: bytes = b""
    model_version: str = ""
    ood: OodScore | None = None         # its image's out-of-distribution verdict (from a server; None without)

    def to_json(self) -> dict:
        return {"image_index": self.image_index, "layer": self.layer, "channel": self.channel, "y": self.y,
                "x": self.x, "activation": self.activation, "box": list(self.box)}


@dataclass
class OcclusionResult:
    """What :meth:`OcclusionEngine.sweep` returns. Maps over positions are (ny, nx), row-major by window
    start; ``attribution`` is (H, W) in input pixels. Maps not asked for are ``None``."""

    window: int
    stride: int
    starts: np.ndarray                  # window starts along each axis (the same for rows and columns)
    fill: np.ndarray                    # (3,) fill values as given, in ``fill_units``
    fill_units: str                     # "input" (normalized network units) or "pixel" (0..255)
    target: int
    layer: str
    channel: int
    attribution_on: str
    base_logits: np.ndarray | None      # (num_classes,) of the unoccluded image (None from a server)
    base_probability: float             # probability of ``target`` on the unoccluded image
    base_activity: float                # total activation of ``layer``/``channel`` on the unoccluded image
    probability: np.ndarray | None = None
    argmax: np.ndarray | None = None
    activity: np.ndarray | None = None
    attribution: np.ndarray | None = None
    timings: dict = field(default_factory=dict)
    backend: str = ""                   # the stages that computed it: "onnxruntime" or "torch"
    png: dict = field(default_factory=dict)   # map name -> PNG bytes, when a server rendered them
    # The served version that computed it (config version + weights hash; from a server, or set by the caller):
    # with window, stride, fill, target and attribution_on, what reproduces the maps.
    model_version: str = ""
    # The unoccluded image's out-of-distribution verdict (None: not scored, or the model has no statistics).
    ood: OodScore | None = None
    # What drew it (:mod:`zfserve.engine.occlusion_modes`): the runtime that ran the forward passes ("onnxruntime",
    # "openvino" or "torch"; default: ``backend``), its precision, and the mode: "exact" or the batched engine
    # with its approximation, e.g. "openvino-int8+drilldown(coarse 2, refine 3)".
    engine: str = ""
    precision: str = "fp32"
    mode: str = "exact"
    # (ny, nx) bool: the positions whose occluded image was evaluated; None when all were. An approximation
    # evaluates fewer and fills the others from evaluated neighbours (see :mod:`zfserve.engine.occlusion_plans`).
    evaluated: np.ndarray | None = None
    # Why this mode was used, when it was chosen for the caller (an audit's or the explorer's gate verdict).
    gate: str = ""

    def __post_init__(self):
        self.engine = self.engine or self.backend

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.starts), len(self.starts))

    @property
    def seconds(self) -> float:
        """Wall time of the unoccluded pass and the sweep."""
        return float(self.timings.get("base_s", 0.0) + self.timings.get("sweep_s", 0.0))

    def per_pixel(self, values: np.ndarray, size: int) -> np.ndarray:
        """A map over this sweep's positions -> (size, size), each pixel the mean over the windows covering it."""
        return per_pixel(values, self.starts, self.window, size)

    def arrays(self) -> dict[str, np.ndarray]:
        """The maps that were computed, by name (what the CLI writes to ``occlusion.npz``)."""
        return {name: getattr(self, name) for name in OUTPUTS if getattr(self, name) is not None}


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Captum's positions along one axis: ``ceil((size - window) / stride) + 1`` starts at ``i * stride``."""
    return np.arange(math.ceil((size - window) / stride) + 1, dtype=np.int64) * stride


def per_pixel(values: np.ndarray, starts: np.ndarray, window: int, size: int) -> np.ndarray:
    """A map over window positions -> (size, size): each pixel gets the mean of the values of the windows that
    covered it (Captum Occlusion's attribution when ``values`` are the drops)."""
    pixels = np.arange(size)
    cover = ((pixels[None, :] >= starts[:, None]) & (pixels[None, :] < starts[:, None] + window)).astype(np.float64)
    values = np.asarray(values, dtype=np.float64)
    total = cover.T @ values @ cover
    count = cover.T @ np.ones_like(values) @ cover
    return (total / count).astype(np.float32)
