"""`zfserve serve` as a real process: SIGTERM under load finishes every accepted request and exits 0."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from zfserve._proto.v1 import zfserve_pb2 as pb
from zfserve._proto.v1 import zfserve_pb2_grpc as pb_grpc
from zfserve.wire import array_to_tensor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from zfserve.model import ZFNet
    from zfserve.weights import save_model
    torch.manual_seed(3)
    directory = tmp_path_factory.mktemp("proc") / "tiny"
    save_model(ZFNet(num_classes=10, fc_width=64).eval(), directory, name="tiny")
    return directory


def _start(model_dir, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "zfserve.cli", "serve", "--port", "0", "--model", str(model_dir),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 180
    port = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.match(r"zfserve: listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
        match = re.match(r"zfserve: http on 127\.0\.0\.1:(\d+)$", line)
        if match:
            proc.http_port = int(match.group(1))
        match = re.match(r"zfserve: explorer page at (\S+)$", line)
        if match:
            proc.page_url = match.group(1)
        if line.startswith("zfserve: ready"):
            return proc, port
    proc.kill()
    raise AssertionError(f"server did not start: {lines} {proc.stderr.read()}")


def test_sigterm_under_load_completes_every_accepted_request(model_dir):
    proc, port = _start(model_dir, "--max-batch-size", "8", "--max-queue-delay-us", "2000",
                        "--shutdown-grace-s", "60")
    x = np.random.default_rng(0).normal(0, 50, (1, 3, 224, 224)).astype(np.float32)
    request = pb.ClassifyRequest(images=pb.Images(tensor=array_to_tensor(x)), top_k=1)
    ok = threading.Semaphore(0)
    outcomes: list[str] = []
    lock = threading.Lock()

    def client(_):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.ZFServeStub(channel)
        for _ in range(200):  # bounded; stops at the first refusal once the server is going away
            try:
                stub.Classify(request, timeout=60)
                code = "OK"
                ok.release()
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                outcomes.append(code)
            if code != "OK":
                break
        channel.close()

    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(client, i) for i in range(12)]
        for _ in range(24):  # under load: some requests done, many in flight
            assert ok.acquire(timeout=120)
        proc.send_signal(signal.SIGTERM)
        for f in futures:
            f.result(180)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "zfserve: stopped" in out
    completed = int(re.search(r"model tiny: completed=(\d+)", out).group(1))
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert outcomes.count("OK") == completed, (outcomes.count("OK"), completed)
    assert "failed=0" in out


def test_serve_rejects_bad_options_with_one_line(model_dir, tmp_path, capsys):
    from zfserve.cli import main
    cases = [(["--max-queue-delay-us", "-1"], "--max-queue-delay-us"),
             (["--max-batch-size", "0"], "--max-batch-size"),
             (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", "k"], "--tls-cert"),
             (["--tls-client-ca", "ca.pem"], "--tls-client-ca"),
             (["--model-repository", str(tmp_path)], "--model-repository"),
             (["--model", "no-such-model"], "model")]
    for args, named in cases:
        assert main(["serve", "--port", "0", *args]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], (args, lines)


def test_model_control_explicit_from_the_command_line(model_dir):
    """`serve --model-control explicit` reaches the server: unload and load over gRPC and over REST; two SIGHUPs
    50 ms apart rebuild nothing twice (reloads run one at a time, the second finds the files unchanged)."""
    import httpx

    from zfserve._proto.inference import grpc_service_pb2 as oip
    from zfserve._proto.inference import grpc_service_pb2_grpc as oip_grpc
    proc, port = _start(model_dir, "--model-control", "explicit", "--http-port", "0")
    try:
        assert proc.page_url == f"http://127.0.0.1:{proc.http_port}/"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="tiny"))
            assert not stub.ModelReady(oip.ModelReadyRequest(name="tiny")).ready
            stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="tiny"))
            assert stub.ModelReady(oip.ModelReadyRequest(name="tiny")).ready
        with httpx.Client(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=60) as web:
            assert web.post("/v2/repository/models/tiny/unload").status_code == 200
            assert web.get("/v2/models/tiny/ready").status_code == 400
            assert web.post("/v2/repository/models/tiny/load").status_code == 200
            assert web.get("/v2/models/tiny/ready").status_code == 200
        from zfserve.model import ZFNet
        from zfserve.weights import read_snapshot, save_model
        before = read_snapshot(str(model_dir)).version
        torch.manual_seed(4)
        save_model(ZFNet(num_classes=10, fc_width=64).eval(), model_dir, name="tiny")   # new weights
        after = read_snapshot(str(model_dir)).version
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        reloads = []
        while len(reloads) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if line.startswith("zfserve: reloaded"):
                reloads.append(line.strip())
        assert reloads == [f"zfserve: reloaded (tiny: {before} -> {after})", "zfserve: reloaded (tiny: unchanged)"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_bad_http_options_are_one_line(model_dir, capsys):
    from zfserve.cli import main
    for args, named in ((["--http-header-timeout-s", "0"], "--http-header-timeout-s"),
                        (["--http-max-connections", "0"], "--http-max-connections"),
                        (["--http-max-buffered-bytes", "10"], "--http-max-buffered-bytes"),
                        (["--max-queue-images", "-1"], "--max-queue-images")):
        assert main(["serve", "--port", "0", "--model", str(model_dir), *args]) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], (args, lines)
