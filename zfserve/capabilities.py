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

# capability -> (what it is, for the README's table; {kind: what runs on it}); a kind absent from the dict lacks it
CAPABILITIES = {
    "classify": ("classify: ONNX Runtime fp32, OpenVINO fp32/bf16, int8 calibrated on held-out images with the "
                 "accuracy gate", {LAYERED: "yes", ONNX: "yes"}),
    "ood": ("out-of-distribution score on every answer (fitted with --calibration)",
            {LAYERED: "yes: ViM, KNN (penultimate layer), Gaussian (a low-level layer)",
             ONNX: "yes: ViM, KNN (the input of the last Gemm/MatMul)"}),
    "occlusion": ("occlusion maps (probability, argmax class, attribution): exact, and the fast modes with the "
                  "agreement gate", {LAYERED: "yes; exact: the incremental engine",
                                     ONNX: "yes; exact: every position, batched, the graph split at its local "
                                           "beginning"}),
    "incremental_occlusion": ("the activity map of a layer during occlusion", {LAYERED: "yes"}),
    "server": ("server: zfserve.v1 Classify and OcclusionSweep (streaming, cancel), both OIP models, statistics, "
               "reload", {LAYERED: "yes", ONNX: "yes"}),
    "explanation_models": ("explanations through the standard clients: OIP models NAME-occlusion[-bytes] and "
                           "NAME-deconv[-bytes], KServe v1 :predict and :explain",
                           {LAYERED: "yes: NAME-occlusion, NAME-deconv, :explain",
                            ONNX: "NAME-occlusion and :explain (NAME-deconv needs the layers)"}),
    "audit": ("zfserve audit (local, --server, --ray)", {LAYERED: "yes", ONNX: "yes"}),
    "faithfulness": ("zfserve faithfulness: pointing game, deletion/insertion, model randomisation, RandomLogit",
                     {LAYERED: "yes: occlusion, deconvnet, gradient, Grad-CAM, random map, centre baseline",
                      ONNX: "yes: occlusion, random map, centre baseline; randomisation of the graph's initializers"}),
    "explorer": ("explorer page: upload, top-5, occlusion map", {LAYERED: "yes", ONNX: "yes"}),
    "layers": ("deconv, the unit index and the explorer's units panel, gradient maps, the paper's analyses "
               "(zfserve report), the layer table of zfserve info and ModelInfo", {LAYERED: "yes"}),
    "train": ("zfserve train", {LAYERED: "yes (ZFNet)"}),
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
    """The README's table of what runs on which kind of model (refused where it says "-")."""
    rows = ["| capability | ZFNet's family (ZFNet, AlexNet, VGG) | ONNX model |", "|---|---|---|"]
    for description, kinds in CAPABILITIES.values():
        rows.append(f"| {description} | {kinds.get(LAYERED, '-')} | {kinds.get(ONNX, '-')} |")
    return "\n".join(rows)


__all__ = ["CAPABILITIES", "KINDS", "KIND_NAMES", "LAYERED", "ONNX", "refusal", "require", "supports",
           "table_markdown"]
