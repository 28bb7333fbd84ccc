"""The ``zfserve`` command. Each subcommand is an ``add_<name>`` function that registers its parser and sets
``func``; bad arguments or inputs print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from . import __version__
from .errors import ZFServeError

EXIT_USAGE = 2


class CommandError(ZFServeError):
    """A bad argument detected by a subcommand: printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _model_help() -> str:
    from .weights import default_model_name
    return f"model name or directory (default: {default_model_name()}; built-in: zfnet-paper)"


# ---------------------------------------------------------------------------------------------------- info
def add_info(sub) -> None:
    p = sub.add_parser("info", help="layers, shapes, parameter counts and receptive fields of a model")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .model import load
    model = load(args.model)
    layers = model.layer_info()
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    if args.json:
        print(json.dumps({
            "model": cfg.name, "version": cfg.version, "num_classes": cfg.num_classes,
            "input": [3, cfg.input_size, cfg.input_size], "parameters": total,
            "layers": [{"name": li.name, "shape": list(li.shape), "parameters": li.params,
                        "receptive_field": li.receptive_field, "stride": li.jump} for li in layers],
            "preprocess": cfg.preprocess.to_json(),
        }, indent=2))
        return 0
    print(f"model {cfg.name} (version {cfg.version}), {cfg.num_classes} classes, input 3x{cfg.input_size}x"
          f"{cfg.input_size}")
    print(f"{'layer':<7}{'output':>16}{'params':>14}{'receptive field':>17}{'stride':>8}")
    for li in layers:
        shape = "x".join(str(s) for s in li.shape)
        rf = f"{li.receptive_field}px" if li.receptive_field else "-"
        print(f"{li.name:<7}{shape:>16}{li.params:>14,}{rf:>17}{li.jump or '-':>8}")
    print(f"{'total':<7}{'':>16}{total:>14,}")
    return 0


# ---------------------------------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (checked by onnx.checker and against PyTorch)")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output file (default: the cached model.onnx in the model directory or the user cache, "
                        "re-exported only when the weights changed)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17..20 (with --out)")
    p.add_argument("--extra-outputs", default="", metavar="LAYERS",
                   help="comma-separated layer names to add as outputs, e.g. conv5,pool5 (with --out)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from pathlib import Path

    from .export import META_OUTPUTS, META_WEIGHTS_HASH, ensure_onnx, export_onnx, read_metadata
    from .model import load
    from .weights import WEIGHTS_FILE, default_model_name, resolve_model_dir, weights_hash

    extra = tuple(name.strip() for name in args.extra_outputs.split(",") if name.strip())
    if args.out is None:
        if extra or args.opset != 17:
            raise CommandError("--opset and --extra-outputs need --out FILE (the cached model.onnx is opset 17 "
                               "with logits and probabilities only)", field="out")
        path = ensure_onnx(args.model)
    else:
        path = Path(args.out)
        if path.is_dir():
            raise CommandError(f"--out: {path} is a directory; give a file name such as {path / 'model.onnx'}",
                               field="out")
        directory = resolve_model_dir(args.model or default_model_name())
        source = dict(weights_sha256=weights_hash(directory), weights_source=WEIGHTS_FILE) if directory else {}
        path = export_onnx(load(args.model), path, extra_outputs=extra, opset=args.opset, **source)
    meta = read_metadata(path)
    print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, outputs {', '.join(json.loads(meta[META_OUTPUTS]))}, "
          f"weights sha256 {meta[META_WEIGHTS_HASH][:16]}, checked against PyTorch")
    return 0


# ---------------------------------------------------------------------------------------------------- classify
MAX_CLI_BATCH = 1024


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify images with ONNX Runtime: top-k classes per image",
                       description="Classify images locally. A file that cannot be read is reported on stderr "
                                   "(one line per file) and skipped; the others are still classified; the exit "
                                   "status is then 2.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or WebP files")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--top-k", type=int, default=5, help="classes per image (1..number of classes; default 5)")
    p.add_argument("--batch-size", type=int, default=32, help=f"images per run (1..{MAX_CLI_BATCH}; default 32)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON array instead of one line per image")
    _add_server_option(p)
    p.set_defaults(func=cmd_classify)


def cmd_classify(args) -> int:
    import numpy as np

    from .engine.classifier import Classifier
    from .preprocess import load_image

    if not 1 <= args.batch_size <= MAX_CLI_BATCH:
        raise CommandError(f"--batch-size: {args.batch_size} is outside 1..{MAX_CLI_BATCH}", field="batch_size")
    if args.top_k < 1:
        raise CommandError(f"--top-k: {args.top_k} is outside 1..number of classes", field="top_k")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads: {args.threads} must be at least 1", field="threads")
    if args.server:
        return _classify_remote(args)
    classifier = Classifier(args.model, max_batch_size=args.batch_size, threads=args.threads)
    if args.top_k > classifier.num_classes:
        raise CommandError(f"--top-k: {args.top_k} is outside 1..{classifier.num_classes} (the model's classes)",
                           field="top_k")
    records, failed = [], 0
    for start in range(0, len(args.images), args.batch_size):
        arrays, good = [], []
        for index in range(start, min(len(args.images), start + args.batch_size)):
            path = args.images[index]
            try:
                arrays.append(load_image(path, classifier.config, field="image"))
                good.append(index)
            except ZFServeError as exc:
                failed += 1
                print(f"zfserve classify: error: {path}: {exc}", file=sys.stderr)
                records.append((index, {"image": path, "error": str(exc)}))
        predictions = classifier.classify(np.stack(arrays), args.top_k) if arrays else []
        for index, preds in zip(good, predictions):
            path = args.images[index]
            if args.json:
                records.append((index, _classify_record(path, preds)))
            else:
                print(_classify_line(path, preds), flush=True)
    if args.json:
        print(json.dumps([record for _, record in sorted(records, key=lambda r: r[0])], indent=2))
    return EXIT_USAGE if failed else 0


def _classify_record(path, preds) -> dict:
    return {"image": path, "predictions": [{"index": p.index, "name": p.name, "probability": p.probability}
                                           for p in preds]}


def _classify_line(path, preds) -> str:
    return f"{path}: " + "; ".join(f"{p.name} ({p.probability:.4f})" for p in preds)


def _classify_remote(args) -> int:
    """``classify --server``: the server decodes and classifies; same output as the local run. An image the
    server refuses is reported like a local decode error (its batch is resent without it)."""

    client = _remote_client(args)
    records, failed = [], 0

    def fail(index, message):
        nonlocal failed
        failed += 1
        print(f"zfserve classify: error: {args.images[index]}: {message}", file=sys.stderr)
        records.append((index, {"image": args.images[index], "error": message}))

    with client:
        for start in range(0, len(args.images), args.batch_size):
            chunk = []
            for index in range(start, min(len(args.images), start + args.batch_size)):
                try:
                    with open(args.images[index], "rb") as fh:
                        chunk.append((index, fh.read()))
                except OSError:  # worded as the local decoder words it
                    fail(index, f"image: no such file: {args.images[index]}")
            while chunk:
                try:
                    predictions = client.classify([data for _, data in chunk], top_k=args.top_k,
                                                  model=args.model or "")
                except ZFServeError as exc:
                    bad = re.search(r"images\.encoded\[(\d+)\]", getattr(exc, "details", ""))
                    if bad is None or int(bad.group(1)) >= len(chunk):
                        raise
                    index, _ = chunk.pop(int(bad.group(1)))
                    fail(index, exc.details.replace(f"images.encoded[{bad.group(1)}]", "image"))
                    continue
                for (index, _), preds in zip(chunk, predictions):
                    if args.json:
                        records.append((index, _classify_record(args.images[index], preds)))
                    else:
                        print(_classify_line(args.images[index], preds), flush=True)
                break
    if args.json:
        print(json.dumps([record for _, record in sorted(records, key=lambda r: r[0])], indent=2))
    return EXIT_USAGE if failed else 0


# ---------------------------------------------------------------------------------------------------- serve
def _add_server_option(p) -> None:
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="run on a zfserve server instead of locally (token from $ZFSERVE_TOKEN, TLS CA from "
                        "$ZFSERVE_TLS_CA when set); same output")


def _deconv_remote(args, units):
    """``deconv --server``: (model name, projections, input patches as RGB arrays) from the server."""
    import io

    import numpy as np
    from PIL import Image

    with _remote_client(args) as client:
        model = args.model or client.list_models().default_model
        results = client.deconv([args.image], args.layer, top_k=args.top_k or 0, units=units, model=model,
                                return_patches=True, return_tensor=True)
    patches = [np.asarray(Image.open(io.BytesIO(u.patch_png), formats=["PNG"]).convert("RGB")) for u in results]
    return model, results, patches


def _occlude_remote(args, fill):
    """``occlude --server``: (model name, class names, the sweep as the engine's result type, backend, PNGs)."""
    from .engine.occlusion import OcclusionResult

    with _remote_client(args) as client:
        model = args.model or client.list_models().default_model
        names = list(client.model_info(model).class_names)
        maps = client.occlude(args.image, window=args.window, stride=args.stride, fill=fill, target=args.target,
                              layer=args.layer, channel=args.channel, return_png=True, model=model,
                              fill_in_pixels=args.fill_units == "pixel",
                              progress=_progress_bar if sys.stderr.isatty() else None)
    result = OcclusionResult(
        window=maps.window, stride=maps.stride, starts=maps.starts, fill=maps.fill, fill_units=maps.fill_units,
        target=maps.target, layer=maps.layer, channel=maps.channel, attribution_on=maps.attribution_on,
        base_logits=None, base_probability=maps.base_probability, base_activity=maps.base_activity,
        probability=maps.probability, argmax=maps.argmax, activity=maps.activity, attribution=maps.attribution,
        timings={"base_s": 0.0, "sweep_s": maps.seconds})
    return model, names, result, maps.backend, maps.png


def _remote_client(args):
    import os

    from .client import Client
    if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", args.server):
        raise CommandError(f"--server: {args.server!r} is not HOST:PORT", field="server")
    return Client(args.server, token=os.environ.get("ZFSERVE_TOKEN") or None,
                  tls_ca=os.environ.get("ZFSERVE_TLS_CA") or None)


def add_serve(sub) -> None:
    from .server.app import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PORT
    from .server.batcher import BatcherConfig

    b = BatcherConfig()
    p = sub.add_parser("serve", help="run the gRPC server (zfserve.v1 API + Open Inference Protocol)",
                       description="Serve classification, deconv projections and occlusion maps over gRPC, plus "
                                   "the Open Inference Protocol (tritonclient works unmodified), on one port. "
                                   "SIGTERM: health NOT_SERVING, finish accepted requests, exit 0. Overload "
                                   "(queue full, queue timeout) answers UNAVAILABLE.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = a free one)")
    p.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve every model sub-directory of DIR (named after it), as in Triton")
    p.add_argument("--model", default=None, help=_model_help() + "; ignored with --model-repository")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="engine device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    g = p.add_argument_group("dynamic batching (Triton's knobs; shared by Classify and ModelInfer)")
    g.add_argument("--max-batch-size", type=int, default=b.max_batch_size,
                   help=f"most images per engine call; 1 turns batching off (default {b.max_batch_size})")
    g.add_argument("--max-queue-delay-us", type=int, default=b.max_queue_delay_us,
                   help="longest wait after the oldest queued request before a partial batch leaves "
                        f"(default {b.max_queue_delay_us})")
    g.add_argument("--max-queue-size", type=int, default=b.max_queue_size,
                   help=f"most waiting requests; more are rejected with UNAVAILABLE (0 = unbounded; default "
                        f"{b.max_queue_size})")
    g.add_argument("--default-timeout-us", type=int, default=b.default_timeout_us,
                   help="longest queue wait before UNAVAILABLE (0 = none; requests may lower it; default 0)")
    g.add_argument("--max-images-per-request", type=int, default=64, help="images per request (default 64)")
    g.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help=f"gRPC receive and send limit (default {DEFAULT_MAX_MESSAGE_BYTES})")
    h = p.add_argument_group("deconv and occlusion (run apart from classification)")
    h.add_argument("--heavy-workers", type=int, default=1, help="concurrent deconv/occlusion computations "
                                                                  "(default 1)")
    h.add_argument("--heavy-queue-size", type=int, default=4, help="more that may wait; beyond, UNAVAILABLE "
                                                                     "(default 4)")
    h.add_argument("--heavy-threads", type=int, default=1, help="PyTorch threads for them, so classification keeps "
                                                                "the other cores (default 1)")
    s = p.add_argument_group("security")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS)")
    s.add_argument("--tls-key", default=None, help="PEM private key")
    s.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mTLS)")
    s.add_argument("--auth-token-file", default=None,
                   help="require 'authorization: Bearer <token>' (token read from this file; health exempt)")
    o = p.add_argument_group("operations")
    o.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    o.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM, how long accepted requests may take to finish (default 30)")
    o.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="debug logs one line per request (default info)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import asyncio

    from .server.app import ServerOptions, configure_logging, serve
    from .server.batcher import BatcherConfig

    configure_logging(args.log_level)
    options = ServerOptions(
        host=args.host, port=args.port, model_repository=args.model_repository, model=args.model,
        device=args.device, threads=args.threads,
        batching=BatcherConfig(max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                               max_queue_size=args.max_queue_size, default_timeout_us=args.default_timeout_us),
        max_images_per_request=args.max_images_per_request, max_message_bytes=args.max_message_bytes,
        heavy_workers=args.heavy_workers, heavy_queue_size=args.heavy_queue_size, heavy_threads=args.heavy_threads,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file, metrics_port=args.metrics_port,
        shutdown_grace_s=args.shutdown_grace_s)
    options.validate()
    return asyncio.run(serve(options))


# ---------------------------------------------------------------------------------------------------- data
def add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets: write the synthetic set with masks and part boxes")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    s = dsub.add_parser("synth", help="write N synthetic images as an ImageFolder tree + annotations.json")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", type=int, default=1100, help="number of images (default 1100; labels cycle classes)")
    s.add_argument("--seed", type=int, default=1, help="dataset seed (default 1)")
    s.set_defaults(func=cmd_data_synth)
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])


def cmd_data_synth(args) -> int:
    from .data import write_synthetic
    if args.n < 1 or args.seed < 0:
        raise CommandError(f"--n must be >= 1 and --seed >= 0; got n={args.n}, seed={args.seed}")
    out = write_synthetic(args.out, args.n, args.seed)
    print(f"wrote {args.n} images, masks and {out / 'annotations.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------- train
def add_train(sub) -> None:
    from .config import TrainConfig
    d = TrainConfig(out="")
    p = sub.add_parser("train", help="train a ZFNet with the paper's recipe (torchrun for DDP)")
    p.add_argument("--data", default="synthetic", help="ImageFolder directory or 'synthetic' (default)")
    p.add_argument("--val-data", default=None, help="ImageFolder for validation (default: held-out seed / split)")
    p.add_argument("--out", required=True, help="model directory to write (checkpoints under OUT/checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    for name, kind, help_text in [
            ("epochs", int, "epochs"), ("batch_size", int, "global mini-batch (paper 128)"),
            ("lr", float, "learning rate (paper 1e-2)"), ("momentum", float, "SGD momentum / Adam beta1 (paper 0.9)"),
            ("optimizer", str, "'sgd' (paper) or 'adam'"),
            ("weight_decay", float, "weight decay (paper: not stated)"),
            ("conv1_weight_decay", float, "decoupled decay of conv1's weights: each step multiplies them by "
             "1 - lr x value; with --batchnorm it erases the random init the short run cannot outgrow"),
            ("dropout", float, "fc6/fc7 dropout"),
            ("init", str, "'paper' N(0,0.01^2) or 'scaled' (see zfserve.train.init_weights)"),
            ("clip_radius", float, "conv filter RMS clipping radius"), ("fc_width", int, "width of fc6/fc7"),
            ("resize", int, "image side before cropping"), ("crop", int, "crop side (the model's input)"),
            ("seed", int, "training seed"), ("train_seed", int, "synthetic training-set seed"),
            ("train_n", int, "synthetic training images"), ("val_seed", int, "synthetic validation seed"),
            ("val_n", int, "synthetic validation images"), ("plateau_patience", int, "epochs before lr /10"),
            ("warmup_steps", int, "linear lr warmup steps (paper: 0)"), ("amp", str, "'none' or 'bf16'"),
            ("device", str, "auto, cpu or cuda[:i]"), ("cache_dir", str, "keep rendered synthetic sets here"),
            ("workers", int, "processes rendering synthetic data"),
            ("max_steps_per_epoch", int, "cap steps per epoch (0: all)"),
            ("max_minutes", float, "training time budget: stop after the last epoch that fits (0: none)"),
            ("erase", float, "probability of one mean-filled square (16-64 px) per training crop, Cutout"),
            ("name", str, "model name")]:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=getattr(d, name),
                       help=f"{help_text} (default {getattr(d, name)})")
    p.add_argument("--snapshot-epochs", default="", help="comma-separated epochs to keep weights for feature "
                   "evolution (default: the paper's 1,2,5,10,20,30,40,64 scaled to --epochs)")
    p.add_argument("--evolution", action="store_true", help="when training ends, compute the feature-evolution "
                   "data (OUT/evolution.npz) from the snapshots")
    p.add_argument("--batchnorm", action="store_true", help="train with BatchNorm after each conv, folded into "
                   "the convs when saved (the saved model is the plain paper network; a deviation for short runs)")
    p.add_argument("--tied-fc6", action="store_true", help="train fc6 with one weight per channel shared by "
                   "pool5's positions, expanded into the full fc6 when saved (a deviation for short runs)")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .train import TrainConfig, train
    own = {"snapshot_epochs", "channels_last", "evolution", "command"}   # set below, not plain copies
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k not in own}
    try:
        snapshots = [int(e) for e in args.snapshot_epochs.split(",") if e.strip()]
    except ValueError:
        raise CommandError(f"--snapshot-epochs must be comma-separated integers, got {args.snapshot_epochs!r}")
    cfg = TrainConfig(**fields, snapshot_epochs=snapshots, channels_last=not args.no_channels_last,
                      evolution=args.evolution,
                      command="zfserve " + " ".join(sys.argv[1:]))
    state = train(cfg, resume=args.resume, progress=not args.quiet)
    if state["history"]:
        last = state["history"][-1]
        print(json.dumps({"out": cfg.out, "epochs": state["epoch"], "val_top1": last["val_top1"],
                          "val_loss": last["val_loss"], "wall_time_s": round(state["wall_time_s"], 1)}))
    return 0


# ---------------------------------------------------------------------------------------------------- evolution
def add_evolution(sub) -> None:
    p = sub.add_parser("evolution", help="feature evolution (paper Fig. 4) from a training run's epoch snapshots")
    p.add_argument("--run", required=True, help="training output directory (holds snapshots/ and checkpoint/)")
    p.add_argument("--out", default=None, help="model directory for evolution.npz (default: the run directory)")
    p.add_argument("--maps", type=int, default=6, help="feature maps per layer (default 6)")
    p.add_argument("--probe-seed", type=int, default=1, help="synthetic seed of the probe images (default 1)")
    p.add_argument("--probe-n", type=int, default=110, help="probe images (default 110)")
    p.set_defaults(func=cmd_evolution)


def cmd_evolution(args) -> int:
    from .train import write_evolution
    if not 1 <= args.maps <= 96 or args.probe_n < 1:
        raise CommandError(f"--maps must be in 1..96 and --probe-n >= 1; got {args.maps}, {args.probe_n}")
    written = write_evolution(args.run, args.out, probe_seed=args.probe_seed, probe_n=args.probe_n,
                              maps_per_layer=args.maps)
    print(f"wrote {written}")
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1, top-5 and per-class accuracy on synthetic or ImageFolder data")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--data", default="synthetic", help="ImageFolder directory or 'synthetic' (default)")
    p.add_argument("--seed", type=int, default=3, help="synthetic seed (default 3, held out from training)")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering synthetic images")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .model import load
    if args.n < 1 or args.batch < 1 or args.seed < 0:
        raise CommandError(f"--n and --batch must be >= 1, --seed >= 0; got n={args.n}, batch={args.batch}, "
                           f"seed={args.seed}")
    report = evaluate(load(args.model), args.data, seed=args.seed, n=args.n, batch=args.batch,
                      workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']} on {report['data']}: {report['n']} images, top-1 {report['top1']:.4f}, "
          f"top-{report['top5_k']} {report['top5']:.4f}, loss {report['loss']:.4f} "
          f"({report['eval_seconds']}s, {report['hardware']})")
    for name, acc in report["per_class"].items():
        print(f"  {name:<10} {acc:.4f}")
    return 0


# ---------------------------------------------------------------------------------------------------- filters
def add_filters(sub) -> None:
    p = sub.add_parser("filters", help="render a model's conv1 filters as a grid PNG")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--scale", type=int, default=4, help="pixels per filter tap (default 4, 1..32)")
    p.set_defaults(func=cmd_filters)


def cmd_filters(args) -> int:
    from .evaluate import write_filter_grid
    from .model import load
    if not 1 <= args.scale <= 32:
        raise CommandError(f"--scale must be in 1..32, got {args.scale}")
    path = write_filter_grid(load(args.model), args.out, scale=args.scale)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------- report
def add_report(sub) -> None:
    from .report import SECTIONS, Settings
    d = Settings()
    p = sub.add_parser("report", help="the paper's analyses as figures + JSON/CSV and one offline report.html",
                       description="Write the figures of Zeiler & Fergus §3-4 (top-9, feature evolution, invariance, "
                                   "architecture, occlusion, correspondence, filters) into --out and rebuild "
                                   "--out/report.html from every section there. 'all' skips (and notes) sections "
                                   "that cannot run on this model or data; a single section fails instead.")
    p.add_argument("section", choices=(*SECTIONS, "all"), metavar="SECTION",
                   help=f"one of {', '.join(SECTIONS)}, or all")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--data", default=d.data, help="'synthetic' (default) or an ImageFolder directory "
                   "(with annotations.json from `zfserve data synth` for masks and face parts)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"synthetic seed (default {d.seed}, held out from training)")
    p.add_argument("--n", type=int, default=d.n, help=f"images: top-9 search, pointing game, deconv energy "
                   f"(default {d.n})")
    p.add_argument("--window", type=int, default=d.window, help=f"occluder side in pixels (default {d.window})")
    p.add_argument("--stride", type=int, default=d.stride, help=f"occluder stride of the Fig. 7 examples "
                   f"(default {d.stride})")
    p.add_argument("--pointing-stride", type=int, default=d.pointing_stride, help=f"occluder stride of the "
                   f"pointing game over --n images (default {d.pointing_stride})")
    p.add_argument("--maps", type=int, default=d.maps_per_layer, help=f"feature maps per layer in top-9, 1..64 "
                   f"(default {d.maps_per_layer})")
    p.add_argument("--arch-steps", type=int, default=d.arch_steps, help=f"SGD steps of each architecture run, "
                   f"1..10000 (default {d.arch_steps}; cached in OUT/architecture-cache)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .model import load
    from .report import SECTIONS, Settings, build
    checks = [("--n", args.n, 1, 1_000_000), ("--seed", args.seed, 0, 2 ** 31 - 1), ("--window", args.window, 1, 224),
              ("--stride", args.stride, 1, args.window), ("--pointing-stride", args.pointing_stride, 1, args.window),
              ("--maps", args.maps, 1, 64),
              ("--arch-steps", args.arch_steps, 1, 10_000)]
    for name, value, low, high in checks:
        if not low <= value <= high:
            raise CommandError(f"{name}: {value} is outside {low}..{high}", field=name.lstrip("-").replace("-", "_"))
    settings = Settings(n=args.n, seed=args.seed, data=args.data, window=args.window, stride=args.stride,
                        pointing_stride=args.pointing_stride,
                        maps_per_layer=args.maps, arch_steps=args.arch_steps)
    sections = SECTIONS if args.section == "all" else (args.section,)
    meta = build(load(args.model), args.out, sections, settings, strict=args.section != "all")
    from pathlib import Path
    print(f"wrote {Path(args.out) / 'report.html'} ({', '.join(f'{k} {v}s' for k, v in meta['timings_s'].items())})")
    return 0


# ---------------------------------------------------------------------------------------------------- deconv
def add_deconv(sub) -> None:
    p = sub.add_parser("deconv", help="deconvnet projections of a layer's strongest (or given) units to pixels",
                       description="Project units of one layer back to input pixels (Zeiler & Fergus 2014). "
                                   "Writes one PNG per unit, grid.png (projection, its receptive field, the "
                                   "input patch), deconv.json and projections.npz (K x 3 x 224 x 224 float32).")
    p.add_argument("image", metavar="IMAGE", help="JPEG, PNG or WebP file")
    p.add_argument("--layer", default="conv5", help="conv1..conv5, pool1, pool2 or pool5 (default conv5)")
    p.add_argument("--top-k", type=int, default=None,
                   help="strongest units, at most one per feature map (1..maps in the layer; default 9 "
                        "unless --units is given)")
    p.add_argument("--units", nargs="+", default=None, metavar="C,Y,X",
                   help="units to project (channel,row,column), after the top-k if --top-k is also given")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--json", action="store_true", help="also print deconv.json to stdout")
    _add_server_option(p)
    p.set_defaults(func=cmd_deconv)


def _parse_units(texts) -> list[tuple[int, int, int]]:
    units = []
    for text in texts:
        try:
            c, y, x = (int(v) for v in text.split(","))
        except ValueError:
            raise CommandError(f"--units: {text!r} is not C,Y,X (three integers separated by commas)",
                               field="units") from None
        units.append((c, y, x))
    return units


def cmd_deconv(args) -> int:
    from pathlib import Path

    import numpy as np

    from . import render
    from .engine.deconv import DeconvEngine, check_layer
    from .model import load
    from .preprocess import load_image

    check_layer(args.layer)
    units = _parse_units(args.units) if args.units else None
    if args.top_k is not None and args.top_k < 1:
        raise CommandError(f"--top-k: {args.top_k} is outside 1..number of feature maps", field="top_k")
    if args.server:
        model_name, results, patches = _deconv_remote(args, units)
    else:
        model = load(args.model)
        model_name = model.config.name
        image = load_image(args.image, model.config, field="image")
        results = DeconvEngine(model, args.device).project(image, args.layer, top_k=args.top_k, units=units)
        patches = [render.patch_to_rgb(unit.patch, model.config, unit.box) for unit in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, rows, labels = [], [], []
    for i, unit in enumerate(results):
        picture = render.projection_to_rgb(unit.projection)
        name = f"unit_{i:02d}_{unit.layer}_c{unit.channel}_y{unit.y}_x{unit.x}.png"
        (out / name).write_bytes(render.png_bytes(picture))
        x0, y0, x1, y1 = unit.box
        rows.append([picture, picture[y0:y1, x0:x1], patches[i]])
        labels.append(f"{unit.layer} c{unit.channel} y{unit.y} x{unit.x}  activation {unit.activation:.4g}")
        record = unit.to_json()
        del record["image_index"]  # one image per call
        records.append({**record, "file": name})
    (out / "grid.png").write_bytes(render.png_bytes(render.grid(rows, labels)))
    np.savez(out / "projections.npz", projections=np.stack([u.projection for u in results]).astype(np.float32))
    doc = {"model": model_name, "image": str(args.image), "layer": args.layer, "units": records,
           "grid": "grid.png", "projections": "projections.npz"}
    (out / "deconv.json").write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"wrote {len(results)} projections of {args.layer} to {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- occlude
def add_occlude(sub) -> None:
    p = sub.add_parser("occlude", help="occlusion-sensitivity maps (paper Fig. 7) and Captum-style attribution",
                       description="Slide a square over the image and map, per window position, the target "
                                   "class's probability, the most probable class and a feature map's total "
                                   "activation; plus per-pixel attribution (Captum Occlusion's definition). "
                                   "Writes PNGs, occlusion.npz (probability, argmax, activity, attribution) "
                                   "and occlusion.json.")
    p.add_argument("image", metavar="IMAGE", help="JPEG, PNG or WebP file")
    p.add_argument("--window", type=int, default=32, help="side of the square in input pixels (1..224, default 32)")
    p.add_argument("--stride", type=int, default=8, help="step between windows (1..window, default 8)")
    p.add_argument("--target", type=int, default=None,
                   help="class whose probability is mapped (default: the unoccluded top-1)")
    p.add_argument("--fill", default="mean",
                   help="occluder value: 'mean' (default, 0 after mean subtraction), V or R,G,B in --fill-units")
    p.add_argument("--fill-units", choices=("input", "pixel"), default="input",
                   help="'input': network-input units (mean subtracted); 'pixel': 0..255 values")
    p.add_argument("--layer", default="conv5", help="layer of the activity map (default conv5)")
    p.add_argument("--channel", type=int, default=None,
                   help="feature map (unit for fc layers) of the activity map (default: the strongest unoccluded)")
    p.add_argument("--model", default=None, help=_model_help())
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="window positions per batch (>= 1; default 128 on cpu, 1024 on cuda)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--json", action="store_true", help="also print occlusion.json to stdout")
    _add_server_option(p)
    p.set_defaults(func=cmd_occlude)


def _parse_fill(text: str):
    if text == "mean":
        return "mean"
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 3):
        raise CommandError(f"--fill: {text!r} is not 'mean', a number or R,G,B", field="fill")
    return values[0] if len(values) == 1 else tuple(values)


def _progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} positions")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_occlude(args) -> int:
    from pathlib import Path

    import numpy as np

    from . import render
    from .engine.occlusion import OcclusionEngine
    from .model import load
    from .preprocess import load_image, to_display

    fill = _parse_fill(args.fill)
    if args.server:
        model_name, names, result, backend, pngs = _occlude_remote(args, fill)
    else:
        model = load(args.model, device="cpu")
        image = load_image(args.image, model.config, field="image")
        engine = OcclusionEngine(model, device=args.device, batch_size=args.batch_size)
        result = engine.sweep(image, args.window, args.stride, fill=fill, fill_units=args.fill_units,
                              target=args.target, layer=args.layer, channel=args.channel,
                              progress=_progress_bar if sys.stderr.isatty() else None)
        model_name, names, backend = model.config.name, model.config.class_names, engine.backend
        pictures = render.occlusion_pictures(result, to_display(image, model.config), names)
        pngs = {name: render.png_bytes(picture) for name, picture in pictures.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, png in pngs.items():
        files[name] = f"{name}.png"
        (out / files[name]).write_bytes(png)
    np.savez(out / "occlusion.npz", **result.arrays(), starts=result.starts)
    low = np.unravel_index(int(np.argmin(result.probability)), result.probability.shape)
    doc = {
        "model": model_name, "image": str(args.image), "window": result.window, "stride": result.stride,
        "positions": [len(result.starts), len(result.starts)], "fill": result.fill.tolist(),
        "fill_units": result.fill_units, "target": result.target, "target_name": names[result.target],
        "unoccluded_probability": result.base_probability,
        "min_probability": float(result.probability.min()),
        "min_probability_window": {"y": int(result.starts[low[0]]), "x": int(result.starts[low[1]])},
        "activity": {"layer": result.layer, "channel": result.channel, "unoccluded": result.base_activity,
                     "min": float(result.activity.min()), "max": float(result.activity.max())},
        "argmax_classes": sorted({names[int(c)] for c in np.unique(result.argmax)}),
        "backend": backend, "seconds": round(result.timings["base_s"] + result.timings["sweep_s"], 3),
        "files": {**files, "arrays": "occlusion.npz"},
    }
    (out / "occlusion.json").write_text(json.dumps(doc, indent=2))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['positions'][0]}x{doc['positions'][1]} windows in {doc['seconds']} s: p({doc['target_name']}) "
              f"{doc['unoccluded_probability']:.4f} unoccluded, {doc['min_probability']:.4f} at worst; wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- main
COMMANDS = [add_info, add_export, add_classify, add_serve, add_data, add_train, add_evolution, add_eval,
            add_filters, add_report, add_deconv, add_occlude]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zfserve", description="ZFNet inference and visualization service")
    parser.add_argument("--version", action="version", version=f"zfserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ZFServeError as exc:
        print(f"zfserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"zfserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"zfserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
