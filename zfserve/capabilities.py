"""What runs on which kind of model: the one table every refusal, the README and the explorer read.

Two kinds share the model directory format (``config.json`` says which, ``kind``):
- ``layered``: a CNN of ZFNet's family (ZFNet, AlexNet, VGG) built from its architecture description, whose
  layers zfserve knows (weights.safetensors);
- ``onnx``: any ONNX image classifier with one NCHW float input (model.onnx), an opaque graph: everything that
  needs only forward passes runs on it; what needs the network's layers (projections back through them,
  gradients, per-layer statistics) cannot, and is refused naming the kind.
"""

from __future__ import annotations

from .errors import ModelKindError

LAYERED, ONNX = "layered", "onnx"
KINDS = (LAYERED, ONNX)
KIND_NAMES = {LAYERED: "a layered CNN of ZFNet's family", ONNX: "an ONNX model (an opaque graph)"}
# Why an ONNX model cannot do what needs the layers (one sentence, shown to users).
NO_LAYERS = ("its layers are not known to zfserve (no layer table, no backward pass through the graph); it runs "
             "what needs only forward passes: classify, occlusion, audit, faithfulness by perturbation")

# capability -> (what it is, for the README's table; the kinds it runs on)
CAPABILITIES = {
    "classify": ("classify: ONNX Runtime fp32, OpenVINO, int8 calibrated with the accuracy gate", KINDS),
    "ood": ("out-of-distribution score (fitted on held-out images with --calibration)", KINDS),
    "occlusion": ("occlusion maps, exact (= brute force) and the fast batched modes with the gate", KINDS),
    "incremental_occlusion": ("incremental occlusion engine and the activity map of a layer", (LAYERED,)),
    "server": ("server: zfserve.v1 Classify and OcclusionSweep, both OIP models, statistics, reload", KINDS),
    "audit": ("zfserve audit (local, --server, --ray)", KINDS),
    "faithfulness": ("faithfulness: occlusion, random map, centre baseline, pointing game, deletion/insertion, "
                     "model randomisation", KINDS),
    "explorer": ("explorer page: upload, top-5, occlusion map", KINDS),
    "layers": ("deconv, the unit index, the explorer's units panel, gradient maps (Grad-CAM, saliency), the "
               "paper's analyses (zfserve report), zfserve info's layer table", (LAYERED,)),
    "train": ("zfserve train", (LAYERED,)),
}


def supports(kind: str, capability: str) -> bool:
    return kind in CAPABILITIES[capability][1]


def refusal(kind: str, what: str) -> str:
    """The one-line reason ``what`` does not run on a model of ``kind``."""
    return f"{what}: not available for {KIND_NAMES.get(kind, kind)}: {NO_LAYERS if kind == ONNX else 'not supported'}"


def require(config, capability: str, what: str | None = None) -> None:
    """Raise :class:`~zfserve.errors.ModelKindError` unless ``config``'s kind has ``capability``; the message names
    the model, its kind and ``what`` was asked (default: the capability's description)."""
    kind = getattr(config, "kind", LAYERED)
    if not supports(kind, capability):
        name = getattr(config, "name", "model")
        raise ModelKindError(f"model {name}: " + refusal(kind, what or CAPABILITIES[capability][0]), field="model")


def table_markdown() -> str:
    """The README's table of what runs on which kind of model."""
    rows = ["| capability | ZFNet's family (ZFNet, AlexNet, VGG) | ONNX model |", "|---|---|---|"]
    for description, kinds in CAPABILITIES.values():
        rows.append(f"| {description} | {'yes' if LAYERED in kinds else '-'} | {'yes' if ONNX in kinds else '-'} |")
    return "\n".join(rows)


__all__ = ["CAPABILITIES", "KINDS", "KIND_NAMES", "LAYERED", "ONNX", "refusal", "require", "supports",
           "table_markdown"]
