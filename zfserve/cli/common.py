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
