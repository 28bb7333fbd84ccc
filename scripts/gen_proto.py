#!/usr/bin/env python
"""Regenerate the committed Python stubs in ``zfserve/_proto/`` from ``proto/`` with grpc_tools.protoc.

    python scripts/gen_proto.py           # rewrite the stubs
    python scripts/gen_proto.py --check   # exit 1 when the committed stubs differ from freshly generated ones

protoc names modules after the proto paths (``zfserve/v1/zfserve.proto`` -> ``zfserve.v1.zfserve_pb2``), which
would clash with the ``zfserve`` package itself, so the generated imports are rewritten to live under
``zfserve._proto`` (``zfserve._proto.v1``, ``zfserve._proto.inference``). The check ignores the lines that only
record the generator's version, so a newer grpcio-tools does not count as stale; everything else must match.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "zfserve" / "_proto"
# proto directory -> sub-package of zfserve._proto
PACKAGES = {"zfserve/v1": "v1", "inference": "inference"}
INIT_TEXT = '"""Generated gRPC stubs (scripts/gen_proto.py); do not edit."""\n'
# The stubs register their descriptors in a private pool, not protobuf's default one: tritonclient registers
# its own copy of the `inference` package there, and two files defining the same symbols cannot share a pool.
# With a private pool, zfserve and tritonclient import side by side in one process.
ROOT_INIT_TEXT = (
    '"""Generated gRPC stubs (scripts/gen_proto.py); do not edit the modules below this package.\n\n'
    'POOL holds every zfserve descriptor (a private pool, so tritonclient\'s own `inference` protos can be\n'
    'imported in the same process)."""\n'
    "from google.protobuf import descriptor_pool as _descriptor_pool\n\n"
    "POOL = _descriptor_pool.DescriptorPool()\n")
VERSION_LINE = re.compile(r"^(# Protobuf Python Version:.*|GRPC_GENERATED_VERSION = .*|\s+\d+,\s*$|"
                          r"\s*_runtime_version\.Domain\.PUBLIC,\s*$)", re.M)


def proto_files() -> list[Path]:
    return sorted(p for d in PACKAGES for p in (PROTO_ROOT / d).glob("*.proto"))


def _rewrite_imports(text: str) -> str:
    for proto_dir, sub in PACKAGES.items():
        dotted = proto_dir.replace("/", ".")
        text = re.sub(rf"^from {re.escape(dotted)} import ", f"from zfserve._proto.{sub} import ", text,
                      flags=re.M)
        text = re.sub(rf"^import {re.escape(dotted)}\.(\w+)", rf"import zfserve._proto.{sub}.\1", text, flags=re.M)
    if "_descriptor_pool.Default().AddSerializedFile(" in text:
        text = text.replace("_descriptor_pool.Default().AddSerializedFile(", "_POOL.AddSerializedFile(")
        text = text.replace("# @@protoc_insertion_point(imports)",
                            "from zfserve._proto import POOL as _POOL\n# @@protoc_insertion_point(imports)", 1)
    return text


def generate() -> dict[str, str]:
    """Relative output path -> file text, for every stub."""
    from grpc_tools import protoc
    import grpc_tools
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    out: dict[str, str] = {"__init__.py": ROOT_INIT_TEXT}
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}"] + [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for proto_dir, sub in PACKAGES.items():
            out[f"{sub}/__init__.py"] = INIT_TEXT
            for path in sorted((Path(tmp) / proto_dir).glob("*.py*")):
                out[f"{sub}/{path.name}"] = _rewrite_imports(path.read_text())
    return out


def _normalize(text: str) -> str:
    return VERSION_LINE.sub("", text)


def check(generated: dict[str, str]) -> list[str]:
    """Paths (relative to zfserve/_proto) whose committed text is missing, stale or extra."""
    problems = []
    for rel, text in generated.items():
        path = OUT_ROOT / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif _normalize(path.read_text()) != _normalize(text):
            diff = difflib.unified_diff(_normalize(path.read_text()).splitlines(),
                                        _normalize(text).splitlines(), lineterm="", n=0)
            problems.append(f"{rel}: stale\n" + "\n".join(line[:160] for line in list(diff)[:12]))
    for path in OUT_ROOT.rglob("*.py*"):
        rel = path.relative_to(OUT_ROOT).as_posix()
        if "__pycache__" not in rel and rel not in generated:
            problems.append(f"{rel}: not generated from proto/ (delete it)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the stubs are stale")
    args = parser.parse_args(argv)
    generated = generate()
    if args.check:
        problems = check(generated)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("stubs are stale: run python scripts/gen_proto.py", file=sys.stderr)
        return 1 if problems else 0
    for rel, text in generated.items():
        path = OUT_ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(generated)} files under {OUT_ROOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
