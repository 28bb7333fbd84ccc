#!/usr/bin/env python
"""Write a perf_analyzer ``--input-data`` file that sends real images to a ``NAME-bytes`` model.

    python scripts/perf_analyzer_input.py photo1.jpg photo2.png ... > images.json
    perf_analyzer -m zfnet-demo-bytes -i grpc -u 127.0.0.1:8001 --input-data images.json

perf_analyzer sends a ``b64`` value as the tensor's raw contents, so for a BYTES tensor it must already be in
the wire format (each element: a 4-byte little-endian length, then the bytes); a plain base64 JPEG would be
read as a length of ~3.7 GB and refused. One entry per image; perf_analyzer cycles through them.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from zfserve.wire import BYTES_INPUT, encode_bytes_elements


def input_data(images: list[bytes]) -> dict:
    """The JSON document (as a dict) that makes perf_analyzer send each of ``images`` in turn, one per request."""
    return {"data": [{BYTES_INPUT: {"b64": base64.b64encode(encode_bytes_elements([image])).decode("ascii")}}
                     for image in images]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or WebP files")
    args = parser.parse_args(argv)
    try:
        images = [Path(path).read_bytes() for path in args.images]
    except OSError as exc:
        print(f"perf_analyzer_input: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    json.dump(input_data(images), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
