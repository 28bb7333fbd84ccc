"""What the ``zfserve`` subcommands share: the one-line error, the parser class, the --model help, and the
--server option with its client."""

from __future__ import annotations

import argparse
import re
import sys

from ..errors import ZFServeError

EXIT_USAGE = 2


class CommandError(ZFServeError):
    """A bad argument detected by a subcommand: printed as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def model_help() -> str:
    from ..weights import default_model_name
    return f"model name or directory (default: {default_model_name()}; built-in: zfnet-paper)"


def add_server_option(p) -> None:
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="run on a zfserve server instead of locally (token from $ZFSERVE_TOKEN, TLS CA from "
                        "$ZFSERVE_TLS_CA when set); same output")


def remote_client(args):
    import os

    from ..client import Client
    if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", args.server):
        raise CommandError(f"--server: {args.server!r} is not HOST:PORT", field="server")
    return Client(args.server, token=os.environ.get("ZFSERVE_TOKEN") or None,
                  tls_ca=os.environ.get("ZFSERVE_TLS_CA") or None)


def progress_bar(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} positions")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def add_occlusion_mode_options(p, description: str) -> None:
    """--engine / --precision / --approximation and its knobs (README "Fast occlusion"); ``description`` says
    what they do for the command."""
    from ..config import ENGINES, PRECISIONS
    from ..engine.occlusion_plans import APPROXIMATIONS, DEFAULT_COARSE, DEFAULT_MARGIN, DEFAULT_REFINE
    g = p.add_argument_group("occlusion mode", description)
    g.add_argument("--engine", default=None, choices=ENGINES, help="onnxruntime or openvino (pip install "
                   "'zfserve[openvino]')")
    g.add_argument("--precision", default=None, choices=PRECISIONS, help="fp32, int8 (made on first use) or bf16 "
                   "(openvino only)")
    g.add_argument("--approximation", default=None, choices=APPROXIMATIONS,
                   help="none (every position), drilldown (coarse lattice, then around the largest drops) or "
                        "early-stop (coarse lattice, then refine until the largest drop is decided)")
    g.add_argument("--coarse", type=int, default=None,
                   help=f"approximations: the lattice takes every COARSE-th position per axis (1..16, default "
                        f"{DEFAULT_COARSE})")
    g.add_argument("--refine", type=int, default=None,
                   help=f"drilldown: neighbourhoods of the REFINE largest coarse drops (default {DEFAULT_REFINE})")
    g.add_argument("--margin", type=float, default=None,
                   help=f"early-stop: refine next to a drop of at least (1 - MARGIN) x the largest (0..1, default "
                        f"{DEFAULT_MARGIN})")


def occlusion_mode_arguments(args) -> dict:
    """The mode options given, as keyword arguments of ``zfserve.engine.occlusion_modes.mode_from``."""
    return {k: getattr(args, k) for k in ("engine", "precision", "approximation", "coarse", "refine", "margin")}
