"""The ``zfserve`` command. Each subcommand is an ``add_<name>`` function that registers its parser and sets
``func``; bad arguments or inputs print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
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


# ---------------------------------------------------------------------------------------------------- main
COMMANDS = [add_info]


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
