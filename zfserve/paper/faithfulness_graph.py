"""Faithfulness of an ONNX model's maps (``kind: onnx``), by forward passes only: occlusion (exact: every
position, ONNX Runtime fp32), the random map and the centre baseline, scored as :mod:`.faithfulness` scores a
layered model's (pointing game, deletion / insertion, RandomLogit), and the model-parameter randomisation test
done on the graph itself: its parametrised layers (Conv, Gemm, MatMul, BatchNormalization with constant weights)
have their initializers re-drawn from the output end, cascading (:func:`zfserve.onnx_graph.redraw`), and each map
is compared with the original graph's. The gradient maps and the deconvnet need the layers (not run).

``extra_methods`` adds maps computed by the caller (``f(x, target, index) -> (H, W)``): the randomisation test
must flag one that does not depend on the model.
"""

from __future__ import annotations

import time

import numpy as np

from ..engine.occlusion_runtime import RuntimeOcclusionEngine
from ..export import INPUT_NAME, PROBABILITIES, ort_session
from ..onnx_graph import parametrised_layers, redraw, served_graph, load
from . import saliency_metrics as sm
from .faithfulness import (INSENSITIVE_SPEARMAN, localise, ood_count, random_logit, randomisation_step,
                           summary_table)
from .figures import log, write_csv, write_json
from .saliency import centre_map

METHODS = ("occlusion", "random", "centre")
MPRT_STEPS = 5           # cascade cut points (evenly spaced over the graph's layers, the last: every layer)


class GraphRuntime:
    """A served graph's bytes on an ONNX Runtime session: what the batched occlusion engine needs of a
    classifier (probabilities of preprocessed batches, the model's facts), without a model directory."""

    engine, precision = "onnxruntime", "fp32"

    def __init__(self, served: bytes, config, threads: int | None = None, batch: int = 64):
        self.session = ort_session(served, threads=threads)
        self.onnx_bytes, self.threads = served, threads     # the occlusion engine splits the same graph
        self.config, self.batch = config, batch
        self.input_size, self.num_classes = config.input_size, config.num_classes

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        return np.concatenate([self.session.run([PROBABILITIES], {INPUT_NAME: x[i:i + self.batch]})[0]
                               for i in range(0, len(x), self.batch)])


class GraphMaps:
    """The maps of one graph: occlusion (probability drop per pixel, Captum's definition), random, centre and
    the caller's ``extra`` methods."""

    def __init__(self, runtime: GraphRuntime, s, extra: dict | None = None):
        self.runtime, self.extra = runtime, dict(extra or {})
        self.window, self.stride, self.seed = int(s.window), int(s.faithfulness_stride), int(s.seed)
        self.size = runtime.input_size
        self.occlusion = RuntimeOcclusionEngine(runtime, batch_size=32)

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS + tuple(self.extra)

    def maps(self, x: np.ndarray, target: int, index: int) -> dict[str, np.ndarray]:
        result = self.occlusion.sweep(x, window=self.window, stride=self.stride, target=int(target),
                                      outputs=("attribution",))
        out = {"occlusion": result.attribution.astype(np.float64),
               "random": np.random.default_rng([self.seed, int(index)]).random((self.size, self.size)),
               "centre": centre_map(self.size)}
        out.update({name: np.asarray(f(x, int(target), int(index)), np.float64) for name, f in self.extra.items()})
        return out


def _cuts(layers: int, steps: int = MPRT_STEPS) -> list[int]:
    return sorted({max(1, round(layers * k / steps)) for k in range(1, steps + 1)})


def mprt_graph(snapshot, kept: dict, s, extra: dict | None = None, *, progress=None) -> dict:
    """Cascading randomisation of the graph's initializers from the output end: per cut point and method, the
    Spearman (absolute values) and SSIM of each kept image's map against the original graph's."""
    count = len(parametrised_layers(load(snapshot.onnx_bytes, "model.onnx")))
    cuts = _cuts(count)
    methods = METHODS + tuple(extra or {})
    spearman, ssim = {m: [] for m in methods}, {m: [] for m in methods}
    for step, cut in enumerate(cuts, 1):
        graph = served_graph(redraw(snapshot.onnx_bytes, cut, seed=s.seed), snapshot.config, {})
        randomisation_step(kept, GraphMaps(GraphRuntime(graph, snapshot.config), s, extra).maps, methods, spearman,
                           ssim)
        if progress is not None:
            progress(step, len(cuts))
    return {"layers": [f"last {cut} of {count} layers" for cut in cuts], "spearman": spearman, "ssim": ssim,
            "example_index": next(iter(kept), None)}


def faithfulness_graph(snapshot, data, s, *, extra_methods: dict | None = None, progress=log) -> dict:
    """The analysis of :func:`zfserve.paper.faithfulness.faithfulness` for an ONNX model's snapshot (see the
    module's note): per-image records, the table and the randomisation figures."""
    from ..engine.classifier import Classifier
    from ..export import ensure_onnx
    classifier = Classifier(snapshot, warmup=False, max_batch_size=64)
    runtime = GraphRuntime(ensure_onnx(snapshot).read_bytes(), snapshot.config)
    maps = GraphMaps(runtime, s, extra_methods)
    scorer = ((lambda batch: classifier.scored(batch).ood) if classifier.ood_detector is not None else None,
              classifier.ood_note)
    n = min(len(data), s.faithfulness_images)
    keep = min(n, s.sanity_images)
    match = list(snapshot.config.class_names) == list(data.classes)
    t0 = time.perf_counter()
    local = localise(maps, runtime.probabilities, scorer, snapshot, match, data, range(n), s, keep=keep,
                     progress=lambda d, t: progress(f"faithfulness: maps and curves {d}/{t}")
                     if d % 10 == 0 or d == t else None)
    t1 = time.perf_counter()
    logit = random_logit(maps, local["maps"], snapshot.config.num_classes, s.seed, maps.methods)
    cascade = mprt_graph(snapshot, local["maps"], s, extra_methods,
                         progress=lambda d, t: progress(f"faithfulness: randomisation step {d}/{t}"))
    t2 = time.perf_counter()
    table = summary_table(local["images"], cascade, logit, maps.methods)
    return {"data": data.describe(), "n": n, "sanity_n": keep, "table": table, "images": local["images"],
            "out_of_distribution": ood_count(local["images"], local["ood_note"]), "mprt": cascade,
            "random_logit": logit,
            "settings": {"window": s.window, "stride": s.faithfulness_stride, "fill": "mean (0 in input units)",
                         "occlusion_on": "probability", "deletion_steps": s.deletion_steps,
                         "tolerance_px": sm.POINTING_TOLERANCE, "insensitive_spearman": INSENSITIVE_SPEARMAN,
                         "seed": s.seed, "randomisation": "cascading, the graph's initializers from the output end"},
            "seconds": {"localisation": round(t1 - t0, 1), "sanity": round(t2 - t1, 1)}}


def write_graph_result(out, result: dict) -> list:
    """faithfulness.json (everything but the maps) and faithfulness.csv (the table) in ``out``."""
    from pathlib import Path

    from .faithfulness import TABLE_HEADER, table_rows, verdict
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in result.items() if k != "maps"}
    doc["verdict"] = verdict(result["table"])
    return [write_json(out / "faithfulness.json", doc),
            write_csv(out / "faithfulness.csv", TABLE_HEADER, table_rows(result["table"]))]


__all__ = ["GraphMaps", "GraphRuntime", "METHODS", "faithfulness_graph", "mprt_graph", "write_graph_result"]
