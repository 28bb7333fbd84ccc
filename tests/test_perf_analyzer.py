"""perf_analyzer (Triton's load generator, the unmodified binary from PyPI's tritonclient wheel) against a plain
``zfserve serve``: the tensor model with perf_analyzer's synthetic data and the bytes model with real JPEGs
both run to exit 0, report a throughput, and show the server-side statistics.

The binary comes from ``bash scripts/install_perf_analyzer.sh`` (CI runs it). Without it the tests skip, unless
$ZFSERVE_REQUIRE_PERF_ANALYZER is set (CI sets it), in which case they fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

SWEEP = Path(__file__).resolve().parent.parent / "benchmarks" / "perf_analyzer_sweep.py"
# These tests check that perf_analyzer runs and reads the server's statistics, not how fast: a wide stability
# band, so a busy CI host cannot make perf_analyzer give up ("Failed to obtain stable measurement").
STABILITY = 200


def _sweep_module():
    spec = importlib.util.spec_from_file_location("perf_analyzer_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _sweep_module()


@pytest.fixture(scope="module")
def perf_analyzer():
    binary = sweep.find_perf_analyzer()
    if binary is None:
        message = "perf_analyzer not installed (bash scripts/install_perf_analyzer.sh)"
        if os.environ.get("ZFSERVE_REQUIRE_PERF_ANALYZER"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def served():
    """`zfserve serve --http-port 0`: the embedded model, default settings, gRPC and HTTP."""
    proc, target = sweep.start_server("--http-port", "0")
    yield target, proc.http_target
    assert sweep.stop_server(proc) == 0


@pytest.fixture(scope="module")
def plain_server(served):
    return served[0]


def _run(cmd) -> list[dict]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = sweep.parse(done.stdout)
    assert [r["concurrency"] for r in rows] == [1, 2], done.stdout
    for row in rows:
        assert row["throughput"] > 0, done.stdout
        server = row["server"]   # present only when ModelStatistics answers
        assert server is not None and server["inference_count"] > 0, done.stdout
        assert server["compute_infer_us"] > 0 and server["request_us"] >= server["compute_infer_us"], done.stdout
    return rows


def test_tensor_model_with_synthetic_data(perf_analyzer, plain_server):
    _run(sweep.command(perf_analyzer, "zfnet-demo", plain_server, "1:2", request_count=40,
                       stability_percentage=STABILITY))


def test_tensor_model_over_http(perf_analyzer, served):
    """`perf_analyzer -m MODEL -i http -u HOST:PORT`: the REST API with the binary tensor extension."""
    _run(sweep.command(perf_analyzer, "zfnet-demo", served[1], "1:2", request_count=40,
                       stability_percentage=STABILITY, protocol="http"))


def test_bytes_model_with_real_jpegs(perf_analyzer, plain_server, tmp_path):
    data = sweep.write_jpeg_input_data(tmp_path / "jpegs.json", count=4)
    rows = _run(sweep.command(perf_analyzer, "zfnet-demo-bytes", plain_server, "1:2", data, request_count=40,
                              stability_percentage=STABILITY))
    assert all(r["server"]["compute_input_us"] > 0 for r in rows)   # decoding is the bytes model's input stage


def test_occlusion_models_with_real_images(perf_analyzer, plain_server, tmp_path):
    """NAME-occlusion (the preprocessed images as a tensor input data file) and NAME-occlusion-bytes (the JPEGs),
    with the sweep's settings as request parameters (9 positions: a short run)."""
    from zfserve.preprocess import load_images
    from zfserve.weights import read_snapshot
    jpegs = sweep.write_jpeg_input_data(tmp_path / "jpegs.json", count=2)
    images = load_images(sweep.synthetic_jpegs(count=2), read_snapshot("zfnet-demo").config)
    tensors = sweep.write_tensor_input_data(tmp_path / "tensors.json", images)
    settings = {"window": 112, "stride": 56}
    for model, data in (("zfnet-demo-occlusion", tensors), ("zfnet-demo-occlusion-bytes", jpegs)):
        _run(sweep.command(perf_analyzer, model, plain_server, "1:2", data, request_count=6,
                           stability_percentage=STABILITY, parameters=settings))


def test_parse_reads_perf_analyzer_output():
    """The parser on a fixed perf_analyzer 2.51 report (so a format change fails here, not silently)."""
    report = """Request concurrency: 3
  Client: 
    Request count: 373
    Throughput: 53.2239 infer/sec
    Avg latency: 18665 usec (standard deviation 4391 usec)
    p50 latency: 17303 usec
    p99 latency: 22911 usec
  Server: 
    Inference count: 370
    Execution count: 200
    Successful request count: 370
    Avg request latency: 17160 usec (overhead 56 usec + queue 5227 usec + compute input 323 usec + compute infer 11518 usec + compute output 34 usec)

Inferences/Second vs. Client Average Batch Latency
"""  # noqa: W291,E501
    (row,) = sweep.parse(report)
    assert row["concurrency"] == 3 and row["throughput"] == pytest.approx(53.2239)
    assert row["latency_p50_us"] == 17303 and row["latency_p99_us"] == 22911
    assert row["server"] == {"inference_count": 370, "execution_count": 200, "request_us": 17160, "overhead_us": 56,
                             "queue_us": 5227, "compute_input_us": 323, "compute_infer_us": 11518,
                             "compute_output_us": 34}
