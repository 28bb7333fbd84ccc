"""``zfserve index``: the unit index behind the explorer page's "top-9 over a data set" view
(:mod:`zfserve.paper.unit_index`), stored beside the model or in the cache, keyed to its weights."""

from __future__ import annotations

import sys
import time

from .common import CommandError, model_help


def add_index(sub) -> None:
    p = sub.add_parser("index", help="precompute each conv feature map's top-9 dataset patches for the explorer",
                       description=cmd_index.__doc__)
    p.add_argument("--model", default=None, help=model_help())
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (default) or an ImageFolder directory (one sub-directory per class)")
    p.add_argument("--n", type=int, default=None,
                   help="images to search: synthetic default 1000 (about 4 minutes on 2 CPU cores for the demo "
                        "model); a directory default all")
    p.add_argument("--seed", type=int, default=3, help="synthetic seed (default 3, held out from training)")
    p.add_argument("--layers", default=None,
                   help="comma-separated conv layers, by the model's own names (default: every conv layer, "
                        "conv1..conv5 for ZFNet and AlexNet, conv1_1..conv5_3 for VGG16)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass, 1..1024 (default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_index)


def _layers(text: str | None, conv_layers) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in conv_layers]
    if not names or unknown:
        raise CommandError(f"--layers: {text!r}; accepted: a comma-separated list of {', '.join(conv_layers)}",
                           field="layers")
    return names


def _progress_printer():
    started = time.monotonic()

    def show(stage: str, done: int, total: int) -> None:
        what = "images searched" if stage == "activations" else "images cut into patches"
        sys.stderr.write(f"\rindex: {done}/{total} {what} ({time.monotonic() - started:.0f} s)")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def cmd_index(args) -> int:
    """Search a data set for the top-9 activations of every feature map of the conv layers (Zeiler & Fergus 2014,
    Fig. 2) and store each one's input patch, for the explorer page's unit view. A writable model directory
    gets index/ beside its weights; embedded, built-in and read-only models use the cache
    ($ZFSERVE_CACHE_DIR, else ~/.cache/zfserve). The index is keyed to the weights' SHA-256: after retraining,
    build it again."""
    from .. import _checks as checks
    if args.n is not None:
        checks.integer(args.n, "n", 1, label="--n")
    checks.integer(args.batch_size, "batch_size", 1, 1024, label="--batch-size")
    checks.integer(args.seed, "seed", 0, label="--seed")
    from ..paper.unit_index import build_index
    from ..weights import read_snapshot
    from ..capabilities import require
    snapshot = read_snapshot(args.model)
    require(snapshot.config, "layers", "zfserve index (the top-9 of the layers' units)")
    layers = _layers(args.layers, snapshot.config.conv_layers)
    index = build_index(snapshot, args.data, n=args.n, seed=args.seed, layers=layers,
                        batch_size=args.batch_size, progress=None if args.quiet else _progress_printer())
    meta = index.meta
    print(f"wrote the unit index of {meta['model']} {meta['model_version']} ({', '.join(index.layers)}; top "
          f"{meta['k']} over {meta['data']}) to {index.path} in {meta['seconds']} s")
    return 0
