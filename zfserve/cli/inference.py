"""``zfserve info``, ``export``, ``classify``, ``serve`` and ``health``: a model's facts, its ONNX export,
classification (locally or on a server), the server itself and its health probe."""

from __future__ import annotations

import json
import re
import sys

from .. import _checks as checks
from ..config import ENGINES, PRECISIONS
from ..engine.results import DEFAULT_TOP_K
from ..errors import ZFServeError
from .common import CommandError, EXIT_USAGE, add_server_option, model_help, remote_client


# ---------------------------------------------------------------------------------------------------- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="what a model knows (classes, training data, out-of-distribution score) and its "
                                    "layers, shapes, parameter counts and receptive fields")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from ..config import training_data
    from ..engine import ood
    from ..weights import read_snapshot
    snapshot = read_snapshot(args.model)
    if snapshot.onnx_bytes is not None:
        return _info_onnx(args, snapshot)
    model = snapshot.model()
    layers = model.layer_info()
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    detector, note = ood.find(snapshot)
    if args.json:
        print(json.dumps({
            "model": cfg.name, "version": cfg.version, "architecture": cfg.architecture,
            "num_classes": cfg.num_classes,
            "class_names": list(cfg.class_names), "training_data": training_data(cfg),
            "ood": {"available": True, **detector.describe()} if detector else {"available": False, "note": note},
            "input": [3, cfg.input_size, cfg.input_size], "parameters": total,
            "layers": [{"name": li.name, "shape": list(li.shape), "parameters": li.params,
                        "receptive_field": li.receptive_field, "stride": li.jump} for li in layers],
            "preprocess": cfg.preprocess.to_json(),
        }, indent=2))
        return 0
    print(f"model {cfg.name} (version {cfg.version}), {cfg.architecture}, {cfg.num_classes} classes, input "
          f"3x{cfg.input_size}x{cfg.input_size}")
    print(f"preprocessing: {cfg.preprocess.describe()}")
    print(f"classes: {', '.join(cfg.class_names)}")
    print(f"trained on: {training_data(cfg)}")
    print(f"out-of-distribution score: {_ood_line(detector, note)}")
    print(f"{'layer':<8}{'output':>16}{'params':>14}{'receptive field':>17}{'stride':>8}")
    for li in layers:
        shape = "x".join(str(s) for s in li.shape)
        rf = f"{li.receptive_field}px" if li.receptive_field else "-"
        print(f"{li.name:<8}{shape:>16}{li.params:>14,}{rf:>17}{li.jump or '-':>8}")
    print(f"{'total':<8}{'':>16}{total:>14,}")
    return 0


def _info_onnx(args, snapshot) -> int:
    """``info`` of an ONNX model: what it knows and how it reads images; it has no layer table."""
    from ..capabilities import KIND_NAMES, NO_LAYERS
    from ..config import training_data
    from ..engine import ood
    cfg = snapshot.config
    detector, note = ood.find(snapshot)
    facts = {"model": cfg.name, "version": snapshot.version, "kind": cfg.kind, "num_classes": cfg.num_classes,
             "class_names": list(cfg.class_names), "training_data": training_data(cfg),
             "ood": {"available": True, **detector.describe()} if detector else {"available": False, "note": note},
             "input": [3, cfg.input_size, cfg.input_size], "onnx": cfg.onnx, "preprocess": cfg.preprocess.to_json(),
             "layers": None, "layers_note": NO_LAYERS}
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"model {cfg.name} (version {snapshot.version}), {KIND_NAMES[cfg.kind]}, {cfg.num_classes} classes, input "
          f"{cfg.onnx['input']!r} 3x{cfg.input_size}x{cfg.input_size} ({cfg.onnx['layout']}), output "
          f"{cfg.onnx['output']}")
    print(f"preprocessing: {cfg.preprocess.describe()}")
    print(f"classes: {', '.join(cfg.class_names)}")
    print(f"trained on: {training_data(cfg)}")
    print(f"out-of-distribution score: {_ood_line(detector, note)}")
    print(f"layers: none listed: {NO_LAYERS}")
    return 0


def _ood_line(detector, note: str) -> str:
    if detector is None:
        return f"none ({note})"
    d = detector.describe()
    return (f"{d['method']}; images scoring above {d['threshold']:.4g} are flagged out of distribution "
            f"({d['acceptance']:.0%} of held-out images pass: {d['data']})")


# ---------------------------------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (checked by onnx.checker and against PyTorch)")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file (default: the cached model.onnx in the model directory or the user cache, "
                        "re-exported only when the weights changed)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17..20 (with --out)")
    p.add_argument("--extra-outputs", default="", metavar="LAYERS",
                   help="comma-separated layer names to add as outputs, e.g. conv5,pool5 (with --out)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default); int8: a calibrated static quantization, model.int8.onnx beside model.onnx "
                        "(re-made only when the weights or the calibration settings change); bf16: runs model.onnx "
                        "on OpenVINO, nothing more to write")
    add_int8_options(p)
    add_ood_options(p)
    p.set_defaults(func=cmd_export)


def add_ood_options(p) -> None:
    from ..engine.ood import DEFAULT_ACCEPTANCE
    g = p.add_argument_group("the out-of-distribution score (fitted on the --calibration images)")
    g.add_argument("--ood-acceptance", type=float, default=None, metavar="SHARE",
                   help=f"share of held-out in-distribution images the threshold accepts (default "
                        f"{DEFAULT_ACCEPTANCE}); fits the statistics again")
    g.add_argument("--no-ood", action="store_true",
                   help="do not fit the out-of-distribution statistics (answers then carry no score)")


def add_int8_options(p) -> None:
    from ..engine.quantize import (CALIBRATION_METHODS, DEFAULT_ACCURACY_IMAGES, DEFAULT_CALIBRATION_IMAGES,
                                   DEFAULT_CALIBRATION_METHOD, DEFAULT_MAX_ACCURACY_DROP)
    g = p.add_argument_group("held-out images (int8 calibration with --precision int8, and the out-of-distribution "
                             "fit)")
    add_held_out_options(g, int8=True)
    g.add_argument("--calibration-method", default=None, choices=CALIBRATION_METHODS,
                   help=f"activation ranges from min-max, entropy or percentile (default {DEFAULT_CALIBRATION_METHOD})")
    g.add_argument("--max-accuracy-drop", type=float, default=DEFAULT_MAX_ACCURACY_DROP, metavar="PT",
                   help=f"refuse an int8 model whose top-1 on held-out images is more than PT percentage points "
                        f"below fp32's (default {DEFAULT_MAX_ACCURACY_DROP})")
    g.add_argument("--accuracy-images", type=int, default=DEFAULT_ACCURACY_IMAGES, metavar="N",
                   help=f"held-out images of the accuracy gate (default {DEFAULT_ACCURACY_IMAGES}; synthetic seed 3, "
                        f"or the ImageFolder's images not used for calibration)")


def add_held_out_options(g, *, int8: bool) -> None:
    """``--calibration`` and ``--calibration-images``: the held-out images of the model's own data that int8's
    calibration (``int8``) and the out-of-distribution fit read (:func:`_ensure_ood`)."""
    from ..engine.quantize import DEFAULT_CALIBRATION_IMAGES
    int8_use = "int8: an evenly spaced subset, the rest is the accuracy gate's; " if int8 else ""
    g.add_argument("--calibration", default=None, metavar="SOURCE",
                   help=f"held-out images of the model's own data: synthetic (seed 5; the embedded model trained on "
                        f"1), synthetic:SEED, or an ImageFolder directory ({int8_use}out of distribution: alternate "
                        f"images fit and threshold). Default: synthetic for a model trained on it; a model trained "
                        f"on other data needs its own")
    g.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help=(f"calibration images (int8 default {DEFAULT_CALIBRATION_IMAGES}; out of distribution: "
                         if int8 else "images of the out-of-distribution fit (") +
                        "both halves together, default 4,400 synthetic or every image of the folder up to 20,000)")


def int8_settings(args):
    """The Int8Settings the flags ask for, and whether any calibration flag was given."""
    from ..engine.quantize import Int8Settings
    given = {key: value for key, value in (("calibration", args.calibration),
                                           ("calibration_images", args.calibration_images),
                                           ("method", args.calibration_method)) if value is not None}
    settings = Int8Settings(**given, max_accuracy_drop=args.max_accuracy_drop, accuracy_images=args.accuracy_images)
    return settings.validate(), bool(given)


def cmd_export(args) -> int:
    from pathlib import Path

    from ..export import META_OUTPUTS, META_WEIGHTS_HASH, ensure_onnx, export_onnx, read_metadata
    from ..weights import WEIGHTS_FILE, read_snapshot

    extra = tuple(name.strip() for name in args.extra_outputs.split(",") if name.strip())
    if args.precision != "fp32":
        return _export_precision(args, extra)
    if args.out is None:
        if extra or args.opset != 17:
            raise CommandError("--opset and --extra-outputs need --out FILE (the cached model.onnx is opset 17 "
                               "with logits, probabilities and the out-of-distribution features)", field="out")
        path = ensure_onnx(args.model)
    else:
        path = Path(args.out)
        if path.is_dir():
            raise CommandError(f"--out: {path} is a directory; give a file name such as {path / 'model.onnx'}",
                               field="out")
        snapshot = read_snapshot(args.model)
        source = dict(weights_sha256=snapshot.sha256, weights_source=WEIGHTS_FILE) if snapshot.directory else {}
        path = export_onnx(snapshot.model(), path, extra_outputs=extra, opset=args.opset, **source)
    meta = read_metadata(path)
    reference = "model.onnx" if read_snapshot(args.model).onnx_bytes is not None else "PyTorch"
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, outputs {', '.join(json.loads(meta[META_OUTPUTS]))}, "
          f"weights sha256 {meta[META_WEIGHTS_HASH][:16]}, checked against {reference}")
    _ensure_ood(args, read_snapshot(args.model))
    return 0


def ood_settings(args):
    """The OodSettings the flags ask for, or None when no flag asks for a fit (validated before any work)."""
    from ..engine import ood, ood_fit
    explicit = any(v is not None for v in (args.calibration, args.calibration_images, args.ood_acceptance))
    return ood_fit.OodSettings(calibration=args.calibration or "synthetic", images=args.calibration_images,
                               acceptance=ood.DEFAULT_ACCEPTANCE if args.ood_acceptance is None
                               else args.ood_acceptance).validate() if explicit and not args.no_ood else None


def _ensure_ood(args, snapshot) -> None:
    """After an export or an import: make sure the model has out-of-distribution statistics (fit them on the
    --calibration images when it has none, or when calibration flags ask for another fit), and say where they are."""
    from ..engine import ood, ood_fit
    if args.no_ood:
        return
    settings = ood_settings(args)
    explicit = settings is not None
    outcome, folder = ood_fit.ensure(snapshot, settings, refit=explicit,
                                     log=lambda line: print(line, file=sys.stderr, flush=True))
    if folder is None:
        print(f"out-of-distribution statistics: {outcome}; answers carry no score until they are fitted")
        return
    detector, _ = ood.find(snapshot)
    print(f"{folder / ood.OOD_META}: out-of-distribution statistics ({outcome}): {_ood_line(detector, '')}")


def _export_precision(args, extra) -> int:
    """``export --precision int8|bf16``: the int8 file (made from the fp32 export), or the bf16 check."""
    from pathlib import Path

    from ..engine.quantize import META_ACCURACY, META_CALIBRATION, META_FP32_SHA256, ensure_int8, quantize_int8
    from ..export import ensure_onnx, read_metadata
    from ..weights import read_snapshot
    if extra or args.opset != 17:
        raise CommandError(f"--opset and --extra-outputs: fp32 only (the {args.precision} graph is made from the "
                           f"cached opset 17 model.onnx)", field="precision")
    snapshot = read_snapshot(args.model)
    fp32 = ensure_onnx(snapshot)
    if args.precision == "bf16":
        from ..engine.backends import OpenVinoBackend
        OpenVinoBackend(fp32.read_bytes(), threads=1, precision="bf16")   # refuses without openvino or bf16
        print(f"{fp32}: bf16 runs this fp32 export on OpenVINO (inference precision bf16, converted when loaded: "
              f"--precision bf16 --engine openvino); nothing more to write")
        _ensure_ood(args, snapshot)
        return 0
    settings, explicit = int8_settings(args)
    if args.out is not None:
        path = Path(args.out)
        if path.is_dir():
            raise CommandError(f"--out: {path} is a directory; give a file name such as {path / 'model.int8.onnx'}",
                               field="out")
        quantize_int8(fp32, path, snapshot.config, settings)
    else:   # no calibration flag: any current int8 file will do; with one, it must have been made that way
        path = ensure_int8(fp32, snapshot.config, settings if explicit else None)
    meta = read_metadata(path)
    calibration, accuracy = json.loads(meta[META_CALIBRATION]), json.loads(meta[META_ACCURACY])
    gate = (f"top-1 {100 * accuracy['reference_top1']:.2f}% -> {100 * accuracy['top1']:.2f}%, " if "top1" in accuracy
            else "") + f"agreement with fp32 {100 * accuracy['agreement']:.2f}% on {accuracy['data']}"
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, int8 ({calibration['method']} calibration on "
          f"{calibration['data']}; {gate}), made from {fp32.name} sha256 {meta[META_FP32_SHA256][:16]}")
    _ensure_ood(args, snapshot)
    return 0


# ---------------------------------------------------------------------------------------------------- classify
MAX_CLI_BATCH = 1024


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify images with ONNX Runtime: top-k classes per image",
                       description=cmd_classify.__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or WebP files")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"classes per image (1..number of classes; default {DEFAULT_TOP_K})")
    p.add_argument("--batch-size", type=int, default=32, help=f"images per run (1..{MAX_CLI_BATCH}; default 32)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    add_precision_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON array instead of one line per image")
    add_server_option(p)
    p.set_defaults(func=cmd_classify)


def add_precision_options(p, serving: bool = False) -> None:
    where = "for models whose config.json names none" if serving else "default: the model's config.json, else"
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help=f"classification precision ({where} fp32): int8 is made on first use from held-out "
                        f"calibration images (see `zfserve export --precision int8`); bf16 needs --engine openvino")
    p.add_argument("--engine", default=None, choices=ENGINES,
                   help=f"classification engine ({where} onnxruntime); openvino needs pip install "
                        f"'zfserve[openvino]'")


def cmd_classify(args) -> int:
    """Classify images locally. A file that cannot be read is reported on stderr (one line per file) and
    skipped; the others are still classified; the exit status is then 2."""
    import numpy as np

    from ..engine.classifier import Classifier
    from ..preprocess import load_image

    checks.integer(args.batch_size, "batch_size", 1, MAX_CLI_BATCH, label="--batch-size")
    checks.integer(args.top_k, "top_k", 1, label="--top-k", what="the model's classes")
    if args.threads is not None:
        checks.integer(args.threads, "threads", 1, label="--threads")
    output = _ClassifyOutput(args)
    if args.server:
        if args.precision or args.engine:
            raise CommandError("--precision/--engine choose the local engine; a server classifies with what it "
                               "serves (see ListModels)", field="precision")
        return _classify_remote(args, output)
    classifier = Classifier(args.model, max_batch_size=args.batch_size, threads=args.threads,
                            precision=args.precision, engine=args.engine)
    checks.integer(args.top_k, "top_k", 1, classifier.num_classes, label="--top-k", what="the model's classes")
    output.model, output.note = classifier.name, classifier.ood_note
    for start in range(0, len(args.images), args.batch_size):
        arrays, good = [], []
        for index in range(start, min(len(args.images), start + args.batch_size)):
            try:
                arrays.append(load_image(args.images[index], classifier.config, field="image"))
                good.append(index)
            except ZFServeError as exc:
                output.fail(index, str(exc))
        for index, preds in zip(good, classifier.classify(np.stack(arrays), args.top_k) if arrays else []):
            output.done(index, preds)
    return output.finish()


class _ClassifyOutput:
    """What ``classify`` prints, whether it ran here or on a server: a line per image as its batch is done (or
    one JSON array, in the order given, at the end); a line on stderr per image that could not be read."""

    def __init__(self, args):
        self.args, self.records, self.failed = args, [], 0
        self.model, self.note = args.model or "the model", ""   # the note: why answers carry no ood score

    def fail(self, index: int, message: str) -> None:
        self.failed += 1
        print(f"zfserve classify: error: {self.args.images[index]}: {message}", file=sys.stderr)
        self.records.append((index, {"image": self.args.images[index], "error": message}))

    def done(self, index: int, preds) -> None:
        path, ood = self.args.images[index], getattr(preds, "ood", None)
        if self.args.json:
            self.records.append((index, {"image": path, "predictions": [
                {"index": p.index, "name": p.name, "probability": p.probability} for p in preds],
                "ood": ood.to_json() if ood else None, **({} if ood else {"ood_note": self.note})}))
            return
        print(f"{path}: " + "; ".join(f"{p.name} ({p.probability:.4f})" for p in preds), flush=True)
        if ood is not None and ood.out_of_distribution:
            print(f"{path}: out of distribution: unlike the images {self.model} knows (score {ood.score:.2f} > "
                  f"threshold {ood.threshold:.2f}); the classes above mean little for it", flush=True)

    def finish(self) -> int:
        if self.note and not self.args.json:
            print(f"zfserve classify: note: {self.note}", file=sys.stderr)
        if self.args.json:
            print(json.dumps([record for _, record in sorted(self.records, key=lambda r: r[0])], indent=2))
        return EXIT_USAGE if self.failed else 0


def _classify_remote(args, output: _ClassifyOutput) -> int:
    """``classify --server``: the server decodes and classifies; same output as the local run. An image the
    server refuses is reported like a local decode error (its batch is resent without it)."""
    with remote_client(args) as client:
        info = client.model_info(args.model or "")
        output.model, output.note = info.name, "" if info.ood.available else info.ood.note
        for start in range(0, len(args.images), args.batch_size):
            chunk = []
            for index in range(start, min(len(args.images), start + args.batch_size)):
                try:
                    with open(args.images[index], "rb") as fh:
                        chunk.append((index, fh.read()))
                except OSError:  # worded as the local decoder words it
                    output.fail(index, f"image: no such file: {args.images[index]}")
            while chunk:
                try:
                    predictions = client.classify([data for _, data in chunk], top_k=args.top_k,
                                                  model=args.model or "")
                except ZFServeError as exc:
                    bad = re.search(r"images\.encoded\[(\d+)\]", getattr(exc, "details", ""))
                    if bad is None or int(bad.group(1)) >= len(chunk):
                        raise
                    index, _ = chunk.pop(int(bad.group(1)))
                    output.fail(index, exc.details.replace(f"images.encoded[{bad.group(1)}]", "image"))
                    continue
                for (index, _), preds in zip(chunk, predictions):
                    output.done(index, preds)
                break
    return output.finish()


# ---------------------------------------------------------------------------------------------------- serve
def add_serve(sub) -> None:
    from ..server.batcher import CPU_MAX_BATCH_SIZE, GPU_MAX_BATCH_SIZE
    from ..server.options import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT, MODEL_CONTROL_MODES, ServerOptions

    o = ServerOptions()
    b = o.batching
    p = sub.add_parser("serve", help="run the gRPC server (zfserve.v1 API + Open Inference Protocol)",
                       description=cmd_serve.__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = a free one)")
    p.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve every model sub-directory of DIR (named after it), as in Triton")
    p.add_argument("--model", default=None, help=model_help() + "; ignored with --model-repository")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="engine device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    add_precision_options(p, serving=True)
    g = p.add_argument_group("dynamic batching (Triton's knobs; shared by Classify and ModelInfer)")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help=f"most images per engine call (so, what a request may wait for behind the batch running); 1 "
                        f"turns batching off (default {CPU_MAX_BATCH_SIZE}, {GPU_MAX_BATCH_SIZE} with "
                        f"--device cuda)")
    g.add_argument("--max-queue-delay-us", type=int, default=b.max_queue_delay_us,
                   help="longest wait after the oldest queued request before a partial batch leaves "
                        f"(default {b.max_queue_delay_us})")
    g.add_argument("--max-queue-size", type=int, default=b.max_queue_size,
                   help=f"most waiting requests; more are rejected with UNAVAILABLE (0 = unbounded; default "
                        f"{b.max_queue_size})")
    g.add_argument("--max-queue-images", type=int, default=b.max_queue_images,
                   help=f"most images waiting; a request past it takes room from the client with the most images "
                        f"waiting, or is rejected with UNAVAILABLE (0 = unbounded; default {b.max_queue_images})")
    g.add_argument("--default-timeout-us", type=int, default=b.default_timeout_us,
                   help="longest queue wait before UNAVAILABLE (0 = none; requests may lower it; default 0)")
    g.add_argument("--max-images-per-request", type=int, default=64, help="images per request (default 64)")
    g.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help=f"gRPC receive and send limit (default {DEFAULT_MAX_MESSAGE_BYTES})")
    d = p.add_argument_group("decoding uploaded images (a budgeted stage of its own)")
    d.add_argument("--max-request-pixels", type=int, default=o.max_request_pixels,
                   help=f"most decoded pixels in one request's images, counted from their headers before any "
                        f"decode (default {o.max_request_pixels:,}: ten 40 MP images)")
    d.add_argument("--decode-workers", type=int, default=o.decode_workers,
                   help=f"threads decoding requests that hold large images (default {o.decode_workers}); small "
                        f"images have a lane of their own")
    d.add_argument("--decode-queue-size", type=int, default=o.decode_queue_size,
                   help=f"more such requests that may wait; beyond, UNAVAILABLE (default {o.decode_queue_size})")
    h = p.add_argument_group("deconv and occlusion (run apart from classification)")
    h.add_argument("--heavy-workers", type=int, default=1, help="concurrent deconv/occlusion computations "
                   "(default 1)")
    h.add_argument("--heavy-queue-size", type=int, default=4, help="more that may wait; beyond, UNAVAILABLE "
                   "(default 4)")
    h.add_argument("--heavy-threads", type=int, default=1, help="PyTorch threads for them, so classification keeps "
                                                                "the other cores (default 1)")
    h.add_argument("--max-occlusion-positions", type=int, default=o.max_occlusion_positions,
                   help=f"most occluder positions in one sweep (default {o.max_occlusion_positions})")
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    s.add_argument("--tls-key", default=None, help="PEM private key")
    s.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mTLS)")
    s.add_argument("--auth-token-file", default=None,
                   help="require 'authorization: Bearer <token>' (token read from this file; health exempt)")
    g = p.add_argument_group("operations (SIGHUP reloads the models' files; SIGTERM shuts down)")
    g.add_argument("--http-port", type=int, default=None,
                   help="also serve HTTP on this port (0 = a free one): the Open Inference Protocol's REST API (/v2), "
                        "KServe's v1 protocol (/v1: predict, explain), "
                        "the explorer page (/) and its API; same auth and TLS; default off")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (with --auth-token-file it needs the token too; the "
                        "HTTP limits below apply)")
    g.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM, how long accepted requests may take to finish (default 30)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug logs one line per request (default info)")
    g.add_argument("--strict", action="store_true",
                   help="a model that fails to load stops the start (default: it is listed as not ready, with "
                        "its reason, and the others are served)")
    g.add_argument("--model-control", default=o.model_control, choices=MODEL_CONTROL_MODES,
                   help="explicit: clients may unload and load models (OIP RepositoryModelUnload/Load; protect "
                        "the server with --auth-token-file); none (default): only SIGHUP reloads them")
    add_http_limits(p)
    p.set_defaults(func=cmd_serve)


def add_http_limits(p) -> None:
    from ..server.http_listener import HttpLimits
    h = HttpLimits()
    g = p.add_argument_group("the HTTP side's limits (--http-port and --metrics-port)")
    g.add_argument("--allowed-hosts", default="", metavar="NAMES",
                   help="comma-separated host names the server answers to besides IP addresses, localhost and "
                        "--host (a Host header naming another is refused: DNS rebinding); '*' for any")
    for flag, default, unit, what in (
            ("max-connections", h.max_connections, "", "open connections; one more closes the one idle longest"),
            ("max-header-bytes", h.max_header_bytes, " bytes", "request line and headers"),
            ("max-headers", h.max_headers, "", "header lines per request"),
            ("header-timeout-s", h.header_timeout_s, " s", "for a request's line and headers to arrive"),
            ("body-timeout-s", h.body_timeout_s, " s", "for a request's body to arrive"),
            ("keepalive-timeout-s", h.keepalive_timeout_s, " s", "an idle connection stays open"),
            ("max-buffered-bytes", h.max_buffered_bytes, " bytes", "request bodies held at once, over every "
                                                                  "connection; more: 503"),
            ("max-json-values", h.max_json_values, "", "numbers in one JSON body (binary tensors for more)")):
        g.add_argument(f"--http-{flag}", type=type(default), default=default, metavar=unit.strip().upper() or "N",
                       help=f"{what} (default {default}{unit})")


def http_limits(args):
    from ..server.http_listener import HttpLimits
    hosts = tuple(name.strip() for name in args.allowed_hosts.split(",") if name.strip())
    return HttpLimits(max_header_bytes=args.http_max_header_bytes, max_headers=args.http_max_headers,
                      header_timeout_s=args.http_header_timeout_s, body_timeout_s=args.http_body_timeout_s,
                      keepalive_timeout_s=args.http_keepalive_timeout_s, max_connections=args.http_max_connections,
                      max_buffered_bytes=args.http_max_buffered_bytes, max_json_values=args.http_max_json_values,
                      allowed_hosts=hosts)


def cmd_serve(args) -> int:
    """Serve classification, deconv projections and occlusion maps over gRPC, plus the Open Inference Protocol
    (tritonclient works unmodified), on one port. SIGTERM: health NOT_SERVING, finish accepted requests, exit 0.
    Overload (queue full, queue timeout) answers UNAVAILABLE."""
    import asyncio

    from ..server.app import ServerOptions, configure_logging, serve
    from ..server.batcher import CPU_MAX_BATCH_SIZE, GPU_MAX_BATCH_SIZE, BatcherConfig

    configure_logging(args.log_level)
    if args.max_batch_size is None:
        args.max_batch_size = GPU_MAX_BATCH_SIZE if args.device == "cuda" else CPU_MAX_BATCH_SIZE
    options = ServerOptions(
        host=args.host, port=args.port, model_repository=args.model_repository, model=args.model,
        device=args.device, threads=args.threads, precision=args.precision, engine=args.engine,
        batching=BatcherConfig(max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                               max_queue_size=args.max_queue_size, max_queue_images=args.max_queue_images,
                               default_timeout_us=args.default_timeout_us),
        max_images_per_request=args.max_images_per_request, max_message_bytes=args.max_message_bytes,
        heavy_workers=args.heavy_workers, heavy_queue_size=args.heavy_queue_size, heavy_threads=args.heavy_threads,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file, metrics_port=args.metrics_port, http_port=args.http_port,
        shutdown_grace_s=args.shutdown_grace_s, max_request_pixels=args.max_request_pixels,
        decode_workers=args.decode_workers, decode_queue_size=args.decode_queue_size,
        max_occlusion_positions=args.max_occlusion_positions, strict=args.strict, model_control=args.model_control,
        http=http_limits(args))
    options.validate()
    return asyncio.run(serve(options))


# ---------------------------------------------------------------------------------------------------- health
def add_health(sub) -> None:
    p = sub.add_parser("health", help="ask a server's gRPC health service; exit 0 when SERVING (for probes)",
                       description=cmd_health.__doc__)
    p.add_argument("--server", default="127.0.0.1:8001", metavar="HOST:PORT",
                   help="the server (default 127.0.0.1:8001; token from $ZFSERVE_TOKEN, TLS CA from "
                        "$ZFSERVE_TLS_CA when set)")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    p.set_defaults(func=cmd_health)


def cmd_health(args) -> int:
    """Print the server's health status (SERVING, NOT_SERVING, ...). Exit 0 when SERVING, 1 otherwise or when
    the server cannot be reached (a container HEALTHCHECK or a probe script can use it as is)."""
    from ..client import ServerError
    if not 0 < args.timeout <= 600:
        raise CommandError(f"--timeout: {args.timeout} s; accepted 0 < timeout <= 600", field="timeout")
    try:
        with remote_client(args) as client:
            client.timeout = args.timeout
            status = client.health(args.service)
    except ServerError as exc:
        print(f"zfserve health: {args.server}: {exc.code.name}: {exc.details}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1
