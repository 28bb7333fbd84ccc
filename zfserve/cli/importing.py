"""``zfserve import``: turn weights from elsewhere into a model directory. ``import torchvision``: a
torchvision-layout AlexNet or VGG state dict (:mod:`zfserve.import_torchvision`); ``import onnx``: any ONNX image
classifier (:mod:`zfserve.import_onnx`)."""

from __future__ import annotations

import sys

from .common import CommandError


def add_import(sub) -> None:
    p = sub.add_parser("import", help="turn weights from elsewhere into a model directory (torchvision AlexNet, "
                                      "VGG; any ONNX image classifier)",
                       description="Turn weights from elsewhere into a model directory.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=type(p))
    add_torchvision(kinds)
    add_onnx(kinds)
    p.set_defaults(func=lambda args: p.error("give a KIND: torchvision or onnx"))


def add_torchvision(kinds) -> None:
    from ..import_torchvision import ARCHS, TORCHVISION_PREPROCESS as TV
    p = kinds.add_parser("torchvision", help="a torchvision-layout AlexNet / VGG state dict (.safetensors or .pth)",
                         description=cmd_torchvision.__doc__)
    p.add_argument("weights", metavar="WEIGHTS",
                   help="the state dict: .safetensors, or .pth/.pt (read with torch.load(weights_only=True))")
    p.add_argument("--arch", required=True, choices=ARCHS, metavar="ARCH",
                   help=f"torchvision's architecture name: {', '.join(ARCHS)} (the _bn variants are folded into "
                        f"their plain architecture)")
    p.add_argument("--classes", required=True, help="text file: one class name per line, in the order of the "
                                                    "last layer's outputs")
    p.add_argument("--out", required=True, help="the model directory to write (new, or empty)")
    p.add_argument("--name", default=None, help="model name (default: the --out directory's name)")
    p.add_argument("--version", default="1", help="model version recorded in config.json (default 1)")
    _preprocess_options(p, f"centre crop = input size (default {TV['crop']}; the classifier needs 224)", TV["resize"],
                        TV["crop"])
    from .inference import add_held_out_options, add_ood_options
    add_held_out_options(p.add_argument_group("held-out images (the out-of-distribution fit)"), int8=False)
    add_ood_options(p)
    p.set_defaults(func=cmd_torchvision)


def _preprocess_options(p, crop_help: str, resize_default, crop_default) -> None:
    from ..import_torchvision import TORCHVISION_PREPROCESS as TV
    p.add_argument("--resize", type=int, default=resize_default, help="short side before the crop (default "
                                                                      f"{resize_default or 'crop x 256/224'})")
    p.add_argument("--crop", type=int, default=crop_default, help=crop_help)
    p.add_argument("--scale", default="1/255", help="pixel scale before mean and std: a number or A/B (default "
                                                    "1/255, torchvision's 0..1 pixels)")
    p.add_argument("--mean", default=",".join(f"{v:g}" for v in TV["mean"]),
                   help="per-channel mean R,G,B in scaled units (default torchvision's %(default)s)")
    p.add_argument("--std", default=",".join(f"{v:g}" for v in TV["std"]),
                   help="per-channel std R,G,B in scaled units (default torchvision's %(default)s)")


def add_onnx(kinds) -> None:
    p = kinds.add_parser("onnx", help="any ONNX image classifier (one N x 3 x S x S float input, one class output)",
                         description=cmd_onnx.__doc__)
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX file (weights inside it)")
    p.add_argument("--classes", required=True, help="text file: one class name per line, in the order of the "
                                                    "graph's outputs")
    p.add_argument("--out", required=True, help="the model directory to write (new, or empty)")
    p.add_argument("--name", default=None, help="model name (default: the --out directory's name)")
    p.add_argument("--version", default="1", help="model version recorded in config.json (default 1)")
    _preprocess_options(p, "centre crop = input side (default: the graph's; needed when the graph leaves it "
                           "dynamic)", None, None)
    p.add_argument("--output", default="logits", choices=("logits", "probabilities"),
                   help="what the graph's output holds (default logits; probabilities: it ends in a softmax)")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="an ImageFolder of held-out images of the model's own data: fits the out-of-distribution "
                        "score (without it, answers say there is none and how to fit it)")
    p.set_defaults(func=cmd_onnx)


def cmd_onnx(args) -> int:
    """Import an ONNX image classifier as a model directory (model.onnx + config.json): the ONNX checker, one run
    in ONNX Runtime, one classification of a test image. Refused in one line, exit status 2, nothing written: a
    file that is not ONNX, more than one input, a non-float or non-4-D input, an output whose size is not the
    class count, operators ONNX Runtime cannot run."""
    from ..import_onnx import import_onnx
    from ..weights import read_snapshot
    preprocess = dict(scale=_number(args.scale, "--scale"), mean=_three(args.mean, "--mean"),
                      std=_three(args.std, "--std"))
    preprocess.update({key: value for key, value in (("resize", args.resize), ("crop", args.crop)) if value})
    out = import_onnx(args.model, args.classes, args.out, name=args.name, version=args.version,
                      preprocess=preprocess, output=args.output, calibration=args.calibration,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    snap = read_snapshot(out)
    config = snap.config
    ood = "fitted" if args.calibration else ("none: fit it with zfserve export --model DIR --calibration "
                                             "HELD-OUT-IMAGEFOLDER")
    print(f"imported {args.model} as {config.name} {snap.version} (ONNX model, input {config.onnx['input']!r} "
          f"3x{config.input_size}x{config.input_size}, {config.num_classes} classes, output "
          f"{config.onnx['output']}; out-of-distribution score: {ood}) into {out}")
    return 0


def _number(text: str, flag: str) -> float:
    try:
        if "/" in text:
            top, bottom = text.split("/")
            return float(top) / float(bottom)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise CommandError(f"{flag}: {text!r} is not a number or A/B", field=flag.lstrip("-")) from None


def _three(text: str, flag: str) -> tuple[float, float, float]:
    parts = text.split(",")
    if len(parts) != 3:
        raise CommandError(f"{flag}: {text!r}; give three numbers R,G,B", field=flag.lstrip("-"))
    return tuple(_number(part, flag) for part in parts)


def cmd_torchvision(args) -> int:
    """Import a torchvision-layout AlexNet or VGG state dict (features.N.* / classifier.N.*) as a model directory:
    the weights in zfserve's layout (BatchNorm folded into the convs), the class names and the preprocessing
    (torchvision's by default: resize 256, centre crop 224, pixels / 255, ImageNet mean and std). Conv widths,
    fc width and classes are read from the tensors. A wrong shape, a missing or extra key or an architecture that
    does not fit the tensors is one line naming the key and the expected shape, exit status 2, nothing written.

    With --calibration DIR (an ImageFolder of held-out images of the model's own data) the out-of-distribution
    statistics are fitted too, on that graph (ONNX export written into the directory); a fit that fails leaves
    nothing either. Without it the model serves, and every answer says it has no out-of-distribution score and
    names the command that fits it."""
    import shutil

    from ..errors import ZFServeError
    from ..import_torchvision import import_torchvision
    from ..weights import read_snapshot
    from .inference import _ensure_ood, ood_settings
    preprocess = dict(resize=args.resize, crop=args.crop, scale=_number(args.scale, "--scale"),
                      mean=_three(args.mean, "--mean"), std=_three(args.std, "--std"))
    ood_settings(args)   # bad OOD flags: refused before anything is written
    out = import_torchvision(args.weights, args.arch, args.classes, args.out, model_name=args.name,
                             version=args.version, preprocess=preprocess)
    snap = read_snapshot(out)
    config = snap.config
    print(f"imported {args.arch} as {config.name} {snap.version} ({config.architecture}, widths "
          f"{','.join(map(str, config.widths))}, fc {config.fc_width}, {config.num_classes} classes) into {out}")
    try:
        _ensure_ood(args, snap)
    except (ZFServeError, OSError) as exc:
        shutil.rmtree(out, ignore_errors=True)   # the import and its statistics are one step: nothing is left
        raise CommandError(f"{exc} (the import is undone: nothing written)", field=getattr(exc, "field", None) or "calibration") from None
    return 0
