"""``zfserve data``, ``train``, ``evolution``, ``eval``, ``filters`` and ``report``: the synthetic set, the paper's
training recipe, accuracy, and the paper's analyses."""

from __future__ import annotations

import json
import sys

from .. import _checks as checks
from ..config import ENGINES, PRECISIONS
from .common import CommandError, EXIT_USAGE, Parser, model_help


# ---------------------------------------------------------------------------------------------------- data
def add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets: write the synthetic set with masks and part boxes")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser)
    s = dsub.add_parser("synth", help="write N synthetic images as an ImageFolder tree + annotations.json")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--n", type=int, default=1100, help="number of images (default 1100; labels cycle classes)")
    s.add_argument("--seed", type=int, default=1, help="dataset seed (default 1)")
    s.set_defaults(func=cmd_data_synth)
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])


def cmd_data_synth(args) -> int:
    from ..data import write_synthetic
    checks.integer(args.n, "n", 1, label="--n")
    checks.integer(args.seed, "seed", 0, label="--seed")
    out = write_synthetic(args.out, args.n, args.seed)
    print(f"wrote {args.n} images, masks and {out / 'annotations.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------- train
def add_train(sub) -> None:
    from ..config import TrainConfig
    d = TrainConfig(out="")
    what = "train a ZFNet with the paper's recipe (torchrun for DDP)"
    p = sub.add_parser("train", help=what, description=(
        what + ". It trains the ZFNet architecture only; AlexNet and VGG models come in through "
        "`zfserve import torchvision`."))
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
            ("init", str, "'paper' N(0,0.01^2) or 'scaled' (see zfserve.train.recipe.init_weights)"),
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
    import os

    from ..train import TrainConfig, train
    own = {"snapshot_epochs", "channels_last", "command"}   # set below, not plain copies
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and k not in own}
    try:
        snapshots = [int(e) for e in args.snapshot_epochs.split(",") if e.strip()]
    except ValueError:
        raise CommandError(f"--snapshot-epochs must be comma-separated integers, got {args.snapshot_epochs!r}")
    cfg = TrainConfig(**fields, snapshot_epochs=snapshots, channels_last=not args.no_channels_last,
                      command="zfserve " + " ".join(sys.argv[1:]))
    state = train(cfg, resume=args.resume, progress=not args.quiet)
    if args.evolution and int(os.environ.get("RANK", "0")) == 0:   # one process of a DDP run writes it
        from ..paper.evolution import write_evolution
        print(f"feature evolution -> {write_evolution(cfg.out)}", file=sys.stderr, flush=True)
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
    from ..paper.evolution import write_evolution
    checks.integer(args.maps, "maps", 1, 96, label="--maps")
    checks.integer(args.probe_n, "probe_n", 1, label="--probe-n")
    written = write_evolution(args.run, args.out, probe_seed=args.probe_seed, probe_n=args.probe_n,
                              maps_per_layer=args.maps)
    print(f"wrote {written}")
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1, top-5 and per-class accuracy on synthetic or ImageFolder data")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--data", default="synthetic", help="ImageFolder directory or 'synthetic' (default)")
    p.add_argument("--seed", type=int, default=3, help="synthetic seed (default 3, held out from training)")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering synthetic images")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="evaluate the classifier in this precision (int8: made on first use, see `zfserve export "
                        "--precision int8`) against eager fp32: top-1/top-5 of both and their top-1 agreement")
    p.add_argument("--engine", default=None, choices=ENGINES, help="... on this engine (default onnxruntime)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from ..evaluate import evaluate
    from ..weights import read_snapshot
    checks.integer(args.n, "n", 1, label="--n")
    checks.integer(args.batch, "batch", 1, label="--batch")
    checks.integer(args.seed, "seed", 0, label="--seed")
    snapshot = read_snapshot(args.model)
    report = evaluate(snapshot.model(), args.data, seed=args.seed, n=args.n, batch=args.batch,
                      workers=args.workers, precision=args.precision, engine=args.engine, source=snapshot)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    how = f" ({report['precision']} on {report['engine']})" if "precision" in report else ""
    print(f"model {report['model']}{how} on {report['data']}: {report['n']} images, top-1 {report['top1']:.4f}, "
          f"top-{report['top5_k']} {report['top5']:.4f}, loss {report['loss']:.4f} "
          f"({report['eval_seconds']}s, {report['hardware']})")
    if "precision" in report:
        ref = report["reference"]
        print(f"  fp32 (eager): top-1 {ref['top1']:.4f}, top-5 {ref['top5']:.4f}; top-1 agreement "
              f"{report['agreement']:.4f}, top-1 drop {report['top1_drop_pt']:.2f} pt, largest probability "
              f"difference {report['max_abs_probability_diff']:.4f}")
    for name, acc in report["per_class"].items():
        print(f"  {name:<10} {acc:.4f}")
    return 0


# ---------------------------------------------------------------------------------------------------- filters
def add_filters(sub) -> None:
    p = sub.add_parser("filters", help="render a model's conv1 filters as a grid PNG")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--scale", type=int, default=4, help="pixels per filter tap (default 4, 1..32)")
    p.set_defaults(func=cmd_filters)


def cmd_filters(args) -> int:
    from ..render import write_filter_grid
    from ..weights import load_model
    checks.integer(args.scale, "scale", 1, 32, label="--scale")
    path = write_filter_grid(load_model(args.model), args.out, scale=args.scale)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------- report
def add_report(sub) -> None:
    from ..paper.report import SECTIONS, Settings
    d = Settings()
    p = sub.add_parser("report", help="the paper's analyses as figures + JSON/CSV and one offline report.html",
                       description=cmd_report.__doc__)
    p.add_argument("section", choices=(*SECTIONS, "all"), metavar="SECTION",
                   help=f"one of {', '.join(SECTIONS)}, or all")
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--data", default=d.data, help="'synthetic' (default) or an ImageFolder directory "
                   "(with annotations.json from `zfserve data synth` for masks and face parts)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"synthetic seed (default {d.seed}, held out from training)")
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
    """Write the figures of Zeiler & Fergus §3-4 (top-9, feature evolution, invariance, architecture, occlusion,
    correspondence, filters) into --out and rebuild --out/report.html from every section there. 'all' skips (and
    notes) sections that cannot run on this model or data; a single section fails instead."""
    from pathlib import Path

    from ..paper.report import SECTIONS, Settings, build
    from ..weights import load_model
    for name, low, high in (("n", 1, 1_000_000), ("seed", 0, 2 ** 31 - 1), ("window", 1, 224),
                            ("stride", 1, args.window), ("pointing_stride", 1, args.window), ("maps", 1, 64),
                            ("arch_steps", 1, 10_000)):
        checks.integer(getattr(args, name), name, low, high, label="--" + name.replace("_", "-"))
    settings = Settings(n=args.n, seed=args.seed, data=args.data, window=args.window, stride=args.stride,
                        pointing_stride=args.pointing_stride,
                        maps_per_layer=args.maps, arch_steps=args.arch_steps)
    sections = SECTIONS if args.section == "all" else (args.section,)
    meta = build(load_model(args.model), args.out, sections, settings, strict=args.section != "all")
    print(f"wrote {Path(args.out) / 'report.html'} ({', '.join(f'{k} {v}s' for k, v in meta['timings_s'].items())})")
    return 0
