"""``zfserve deconv`` and ``occlude``: deconvnet projections and occlusion maps of one image, computed locally or
on a server, written by ``zfserve.render`` into the same output directory either way."""

from __future__ import annotations

import json
import sys

from .. import _checks as checks
from ..engine.results import DECONV_INTERPRETATION, DEFAULT_STRIDE, DEFAULT_WINDOW
from .common import (CommandError, add_occlusion_mode_options, add_server_option, model_help,
                     occlusion_mode_arguments, progress_bar, remote_client)


# ---------------------------------------------------------------------------------------------------- deconv
def add_deconv(sub) -> None:
    p = sub.add_parser("deconv", help=f"deconvnet projections of a layer's strongest (or given) units to pixels: a "
                                      f"{DECONV_INTERPRETATION}",
                       description=f"{cmd_deconv.__doc__} A projection is a {DECONV_INTERPRETATION}: what drives a "
                                   f"unit, not evidence of what the class depends on (occlusion gives that).")
    p.add_argument("image", metavar="IMAGE", help="JPEG, PNG or WebP file")
    p.add_argument("--layer", default=None,
                   help="a conv or pool layer of the model, by its own name (ZFNet, AlexNet: conv1..conv5, pool1, "
                        "pool2, pool5; VGG: conv1_1..conv5_3, pool1..pool5; default: the last conv layer)")
    p.add_argument("--top-k", type=int, default=None,
                   help="strongest units, at most one per feature map (1..maps in the layer; default 9 "
                        "unless --units is given)")
    p.add_argument("--units", nargs="+", default=None, metavar="C,Y,X",
                   help="units to project (channel,row,column), after the top-k if --top-k is also given")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--json", action="store_true", help="also print deconv.json to stdout")
    add_server_option(p)
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
    """Project units of one layer back to input pixels (Zeiler & Fergus 2014). Writes one PNG per unit, grid.png
    (projection, its receptive field, the input patch), deconv.json and projections.npz (K x 3 x 224 x 224
    float32)."""
    units = _parse_units(args.units) if args.units else None
    if args.top_k is not None:
        checks.integer(args.top_k, "top_k", 1, label="--top-k", what="the layer's feature maps")
    if args.server:
        with remote_client(args) as client:
            model_name = args.model or client.list_models().default_model
            results = client.deconv([args.image], args.layer or "", top_k=args.top_k, units=units,
                                    model=model_name, return_patches=True, return_tensor=True)
        config, version = None, ""
        layer = results[0].layer if results else args.layer
    else:
        from ..engine.deconv import DeconvEngine
        from ..preprocess import load_image
        from ..weights import read_snapshot
        snapshot = read_snapshot(args.model)
        layer = checks.layer(args.layer or snapshot.config.last_conv, snapshot.config.spatial_layers)
        model = snapshot.model()
        model_name, config, version = model.config.name, model.config, snapshot.version
        image = load_image(args.image, config, field="image")
        results = DeconvEngine(model, args.device).project(image, layer, top_k=args.top_k, units=units)
    from ..render import write_deconv
    doc = write_deconv(args.out, results, layer=layer, model=model_name, image=args.image, config=config,
                       model_version=version)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"wrote {len(results)} projections of {layer} ({doc['model']} {doc['model_version']}) to "
              f"{args.out}: {doc['interpretation']}, not evidence of what the class decision used (see "
              f"`zfserve faithfulness`)")
    return 0


# ---------------------------------------------------------------------------------------------------- occlude
def add_occlude(sub) -> None:
    p = sub.add_parser("occlude", help="occlusion-sensitivity maps (paper Fig. 7) and Captum-style attribution",
                       description=cmd_occlude.__doc__)
    p.add_argument("image", metavar="IMAGE", help="JPEG, PNG or WebP file")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"side of the square in input pixels (1..224, default {DEFAULT_WINDOW})")
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                   help=f"step between windows (1..window, default {DEFAULT_STRIDE})")
    p.add_argument("--target", type=int, default=None,
                   help="class whose probability is mapped (default: the unoccluded top-1)")
    p.add_argument("--fill", default="mean",
                   help="occluder value: 'mean' (default, 0 after normalization), V or R,G,B in --fill-units")
    p.add_argument("--fill-units", choices=("input", "pixel"), default="input",
                   help="'input': network-input units (normalized, as the model's preprocessing makes them); "
                        "'pixel': 0..255 values")
    p.add_argument("--layer", default=None,
                   help="layer of the activity map, by the model's own names (default: the last conv layer)")
    p.add_argument("--channel", type=int, default=None,
                   help="feature map (unit for fc layers) of the activity map (default: the strongest unoccluded)")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="window positions per batch (>= 1; default 128 on cpu, 1024 on cuda; 32 occluded images on "
                        "the other engines)")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--json", action="store_true", help="also print occlusion.json to stdout")
    add_occlusion_mode_options(p, "None given: exact (fp32, every position, the incremental engine). Given: "
                               "occluded copies of the image run through the classifier on that engine and precision "
                               "(the others default to the model's config.json, else onnxruntime fp32), every "
                               "position or an approximation")
    add_server_option(p)
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


def cmd_occlude(args) -> int:
    """Slide a square over the image and map, per window position, the target class's probability, the most
    probable class and a feature map's total activation; plus per-pixel attribution (Captum Occlusion's
    definition). Writes PNGs, occlusion.npz (probability, argmax, activity, attribution) and occlusion.json."""
    fill = _parse_fill(args.fill)
    progress = progress_bar if sys.stderr.isatty() else None
    common = dict(fill=fill, target=args.target, layer=args.layer, channel=args.channel)
    if args.server:
        with remote_client(args) as client:
            model_name = args.model or client.list_models().default_model
            names = list(client.model_info(model_name).class_names)
            result = client.occlude(args.image, window=args.window, stride=args.stride, return_png=True,
                                    model=model_name, fill_in_pixels=args.fill_units == "pixel", progress=progress,
                                    mode=occlusion_mode_arguments(args), **common)
        picture = None
    else:
        from ..engine.occlusion_modes import OcclusionEngines, mode_from
        from ..preprocess import load_image, to_display
        from ..weights import read_snapshot
        snapshot = read_snapshot(args.model)
        config = snapshot.config
        mode = mode_from(**occlusion_mode_arguments(args), defaults=(config.engine, config.precision))
        image = load_image(args.image, config, field="image")
        engines = OcclusionEngines(snapshot, device=args.device, batch_size=args.batch_size)
        result = engines.sweep(image, mode, window=args.window, stride=args.stride, fill_units=args.fill_units,
                               progress=progress, **common)
        result.model_version = snapshot.version
        model_name, names, picture = config.name, config.class_names, to_display(image, config)
    from ..render import write_occlusion
    doc = write_occlusion(args.out, result, model=model_name, image=args.image, class_names=names, picture=picture)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['positions'][0]}x{doc['positions'][1]} windows in {doc['seconds']} s: p({doc['target_name']}) "
              f"{doc['unoccluded_probability']:.4f} unoccluded, {doc['min_probability']:.4f} at worst; wrote "
              f"{args.out}")
        print(f"settings: model {doc['model']} {doc['model_version']}, window {doc['window']}, stride "
              f"{doc['stride']}, fill {doc['fill']} ({doc['fill_units']} units), target {doc['target']} "
              f"({doc['target_name']}), attribution = drop of the {doc['attribution_on']}")
        print(f"mode: {doc['mode']} ({doc['engine']} {doc['precision']}"
              + (f", {doc['evaluated']} of {doc['positions'][0] * doc['positions'][1]} positions evaluated, the "
                 f"others filled in from their neighbours)" if doc.get("evaluated") is not None else ")"))
    return 0


# ---------------------------------------------------------------------------------------------------- faithfulness
def add_faithfulness(sub) -> None:
    from ..paper.report import Settings
    d = Settings()
    p = sub.add_parser("faithfulness", help="can the heatmaps be trusted? pointing game, deletion/insertion, "
                       "MPRT and RandomLogit for occlusion, deconvnet, gradient, Grad-CAM and two baselines",
                       description=cmd_faithfulness.__doc__)
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--out", required=True, help="output directory (created; its report.html gains the section)")
    p.add_argument("--data", default=d.data, help="'synthetic' (default, held-out seed) or a directory with "
                   "annotations.json (object masks), as `zfserve data synth` writes")
    p.add_argument("--seed", type=int, default=d.seed, help=f"synthetic seed (default {d.seed}, held out)")
    p.add_argument("--images", type=int, default=FAITHFULNESS_IMAGES,
                   help=f"images for the pointing game and deletion/insertion (default {FAITHFULNESS_IMAGES}, two "
                        f"per class: a few minutes on 2 cores; the report uses {d.faithfulness_images})")
    p.add_argument("--sanity-images", type=int, default=FAITHFULNESS_SANITY_IMAGES,
                   help=f"the first images, for MPRT and RandomLogit (default {FAITHFULNESS_SANITY_IMAGES})")
    p.add_argument("--window", type=int, default=d.window, help=f"occluder side in pixels (default {d.window})")
    p.add_argument("--stride", type=int, default=d.faithfulness_stride,
                   help=f"occluder stride, 1..window (default {d.faithfulness_stride})")
    p.add_argument("--steps", type=int, default=d.deletion_steps,
                   help=f"deletion / insertion steps (default {d.deletion_steps})")
    p.add_argument("--json", action="store_true", help="print the table as JSON instead of text")
    p.set_defaults(func=cmd_faithfulness)


FAITHFULNESS_IMAGES = 22
FAITHFULNESS_SANITY_IMAGES = 4


def cmd_faithfulness(args) -> int:
    """Compare occlusion (probability drop), the deconvnet (top-class conv5 units), the vanilla gradient, Grad-CAM
    (conv5), a random map and the centre baseline on held-out images with object masks: the pointing game (15 px,
    plain and per class, all and difficult images), deletion / insertion AUC, the model-parameter randomisation
    test (fc8 down to conv1) and RandomLogit. Writes faithfulness.json/.csv, the figures and report.html into
    --out and prints the table."""
    from pathlib import Path

    from ..paper import faithfulness
    from ..paper.report import Settings, build
    from ..weights import read_snapshot
    for name, low, high in (("images", 1, 100_000), ("sanity_images", 1, 1000), ("seed", 0, 2 ** 31 - 1),
                            ("window", 1, 224), ("stride", 1, args.window), ("steps", 1, 1000)):
        checks.integer(getattr(args, name), name, low, high, label="--" + name.replace("_", "-"))
    settings = Settings(n=args.images, seed=args.seed, data=args.data, window=args.window,
                        faithfulness_images=args.images, sanity_images=args.sanity_images,
                        faithfulness_stride=args.stride, deletion_steps=args.steps)
    snapshot = read_snapshot(args.model)
    if snapshot.onnx_bytes is not None:   # an ONNX model: forward-pass maps, randomisation of the graph itself
        from ..paper.dataset import AnalysisData
        from ..paper.faithfulness_graph import faithfulness_graph, write_graph_result
        checks.integer(args.window, "window", 1, snapshot.config.input_size, label="--window")
        result = faithfulness_graph(snapshot, AnalysisData(args.data, seed=args.seed, n=args.images), settings)
        write_graph_result(args.out, result)
        metrics = {"table": result["table"], "verdict": faithfulness.verdict(result["table"])}
    else:
        build(snapshot.model(), args.out, ("faithfulness",), settings)
        metrics = json.loads((Path(args.out) / "section-faithfulness.json").read_text())["metrics"]
    if args.json:
        print(json.dumps({"table": metrics["table"], "verdict": metrics["verdict"]}, indent=2))
        return 0
    header = faithfulness.TABLE_HEADER
    rows = faithfulness.table_rows(metrics["table"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))
    print(f"Verdict: {metrics['verdict']}")
    written = "" if snapshot.onnx_bytes is not None else f" and {Path(args.out) / 'report.html'}"
    print(f"wrote {Path(args.out) / 'faithfulness.json'}{written}")
    return 0
