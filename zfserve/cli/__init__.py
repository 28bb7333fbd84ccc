"""The ``zfserve`` command: argument parsing and printing only, the work lives in the layers below. Each
subcommand is an ``add_<name>`` function (in :mod:`.inference`, :mod:`.visualize`, :mod:`.training`) that
registers its parser and sets ``func``; bad arguments or inputs print one line and exit 2, never a traceback.
Building the parser loads no torch, so ``zfserve --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import ZFServeError
from .audit import add_audit, add_occlusion_gate
from .common import EXIT_USAGE, Parser
from .explore import add_index
from .importing import add_import
from .inference import add_classify, add_export, add_health, add_info, add_serve
from .training import add_data, add_eval, add_evolution, add_filters, add_report, add_train
from .visualize import add_deconv, add_faithfulness, add_occlude

COMMANDS = [add_info, add_export, add_classify, add_serve, add_health, add_data, add_train, add_evolution, add_eval,
            add_filters, add_report, add_deconv, add_occlude, add_faithfulness, add_audit, add_occlusion_gate,
            add_index, add_import]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="zfserve", description="ZFNet inference and visualization service")
    parser.add_argument("--version", action="version", version=f"zfserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
