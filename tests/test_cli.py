"""The ``zfserve`` entry point: --version, info figures, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import zfserve
from zfserve.cli import main
from zfserve.weights import save_model
from zfserve.weights import WEIGHTS_FILE


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "zfserve.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"zfserve {zfserve.__version__}"


def test_parser_and_version_do_not_load_torch():
    """`zfserve --version` and `--help` stay fast: building the parser imports no torch (or matplotlib)."""
    code = ("import sys, zfserve.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_info_json_reports_the_papers_figures():
    result = run_cli("info", "--model", "zfnet-paper", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == 62_357_608
    assert info["model"] == "zfnet-paper" and info["num_classes"] == 1000 and info["input"] == [3, 224, 224]
    spatial = [layer["shape"][1] for layer in info["layers"] if len(layer["shape"]) == 3]
    assert spatial == [110, 55, 26, 13, 13, 13, 13, 6]
    assert sum(layer["parameters"] for layer in info["layers"]) == 62_357_608
    fields = {layer["name"]: layer["receptive_field"] for layer in info["layers"]}
    assert (fields["conv1"], fields["pool5"], fields["fc6"]) == (7, 171, None)


def test_bad_model_is_one_line_and_exit_2():
    result = run_cli("info", "--model", "no-such-model")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0] and "zfnet-paper" in lines[0]
    assert "Traceback" not in result.stderr


def test_info_table_for_a_model_directory(tmp_path, tiny_model, capsys):
    directory = save_model(tiny_model, tmp_path / "tiny", name="tiny")
    assert main(["info", "--model", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "model tiny" in out and "10 classes" in out
    total = sum(p.numel() for p in tiny_model.parameters())
    assert out.strip().splitlines()[-1].split()[-1] == f"{total:,}"


def test_broken_model_directory_is_one_line_and_exit_2(tmp_path, tiny_model, capsys):
    directory = save_model(tiny_model, tmp_path / "broken")
    (directory / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    assert main(["info", "--model", str(directory)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and WEIGHTS_FILE in err


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["info", "--no-such-flag"]])
def test_usage_errors_exit_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits on its own for bad flags
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    if argv:
        assert len(captured.err.strip().splitlines()) == 1


def test_every_subcommand_has_working_help(capsys):
    from zfserve.cli import build_parser
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert "info" in subparsers.choices
    for name in subparsers.choices:
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0, name
        assert name in capsys.readouterr().out


def test_deconv_says_what_its_projections_are(capsys):
    """The label the page, the API and the report give a projection, in the command's own help too."""
    from zfserve.engine.results import DECONV_INTERPRETATION
    for argv in (["deconv", "--help"], ["--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert DECONV_INTERPRETATION in " ".join(capsys.readouterr().out.split()), argv


def test_every_package_directory_is_listed_in_pyproject():
    """A sub-package missing from [tool.setuptools] packages works in an editable install but not in a wheel."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "zfserve").rglob("__init__.py")}
    found |= {"zfserve.kernels" + "".join("." + part for part in p.parent.relative_to(root / "kernels").parts)
              for p in (root / "kernels").rglob("__init__.py")}
    assert sorted(found - listed) == []
    assert config["package-dir"]["zfserve.kernels"] == "kernels"


def test_gpu_marker_skips_with_a_reason_on_cpu_hosts(pytester):
    """The suite's own conftest: `@pytest.mark.gpu` tests are skipped, not failed, where CUDA is missing."""
    import torch
    from pathlib import Path
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n\n"
                        "def test_anywhere():\n    pass\n")
    result = pytester.runpytest_inprocess("-rs")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["*no CUDA device*"])
