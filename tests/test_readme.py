"""The README's examples for the gRPC server run as written against a plain ``zfserve serve --http-port``
(the embedded model, default settings): every Python block of that section, each in a process of its own, and
every ``--server`` command line. Only the addresses are replaced (the test server's ports are free ones), and
``photo.jpg`` is a real JPEG in the working directory.
"""

from __future__ import annotations

import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ADDRESS = "127.0.0.1:8001"
HTTP_ADDRESS = "127.0.0.1:8000"   # the examples' `zfserve serve --http-port 8000`


def _section(title: str) -> str:
    start = README.index(f"### {title}")
    end = README.find("\n### ", start + 4)
    return README[start:end if end >= 0 else None]


SERVER_SECTION = _section("The gRPC server")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", SERVER_SECTION, re.S)
COMMANDS = [line.split("#")[0].strip() for block in re.findall(r"```\n(.*?)```", SERVER_SECTION, re.S)
            for line in block.splitlines() if f"--server {ADDRESS}" in line]


def _sweep():
    spec = importlib.util.spec_from_file_location("perf_analyzer_sweep", ROOT / "benchmarks" / "perf_analyzer_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plain_server():
    sweep = _sweep()
    proc, target = sweep.start_server("--http-port", "0")
    yield target, proc.http_target
    assert sweep.stop_server(proc) == 0


@pytest.fixture
def workdir(tmp_path):
    from PIL import Image

    from zfserve.data import render_images
    buf = io.BytesIO()
    Image.fromarray(render_images(5, [3])[0]).resize((320, 240)).save(buf, format="JPEG", quality=90)
    (tmp_path / "photo.jpg").write_bytes(buf.getvalue())
    return tmp_path


def test_the_section_has_examples():
    assert len(PYTHON_BLOCKS) >= 3 and len(COMMANDS) >= 3   # the client, tritonclient, kserve; classify, ...


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs(index, plain_server, workdir):
    code = PYTHON_BLOCKS[index]
    assert ADDRESS in code or HTTP_ADDRESS in code
    target, http_target = plain_server
    (workdir / "example.py").write_text(code.replace(ADDRESS, target).replace(HTTP_ADDRESS, http_target))
    done = subprocess.run([sys.executable, "example.py"], cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"README example {index}:\n{code}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("command", COMMANDS)
def test_server_command_runs(command, plain_server, workdir):
    args = shlex.split(command.replace(ADDRESS, plain_server[0]))
    assert args[0] == "zfserve"
    done = subprocess.run([sys.executable, "-m", "zfserve.cli", *args[1:]], cwd=workdir, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    if args[1] == "classify":
        assert done.stdout.startswith("photo.jpg: ")
    elif args[1] == "health":
        assert done.stdout.strip() == "SERVING"
    else:   # deconv / occlude write their pictures into --out
        out = workdir / args[args.index("--out") + 1]
        assert any(out.glob("*.png")), sorted(out.iterdir())
