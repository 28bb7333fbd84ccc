"""``zfserve audit`` of an ONNX model: a mixed folder (good images, a truncated JPEG, a text file, an image over the
pixel limit) gives one row per file, failures with their reasons, the same rows locally, from a server and on
Ray, and predictions equal to eager PyTorch's."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import onnx_models as om
from test_audit import _png_header_only, _same_rows
from zfserve.preprocess import load_image
from zfserve.weights import read_snapshot

FAST = (80, 80)


def _encoded(seed: int, fmt: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (190, 230, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from zfserve.import_onnx import import_onnx
    root = tmp_path_factory.mktemp("onnx-audit")
    model, path = om.export_named("small160", root)
    directory = import_onnx(path, om.classes_file(root, 7), root / "small160", preprocess={"resize": 182})
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"good{i}.{'jpg' if i % 2 else 'png'}").write_bytes(_encoded(i, "JPEG" if i % 2 else "PNG"))
    jpeg = _encoded(9, "JPEG")
    (corpus / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (corpus / "notes.txt").write_text("not an image\n")
    (corpus / "huge.png").write_bytes(_png_header_only(9000, 9000))
    return model, directory, corpus


def _rows(out) -> list[dict]:
    return sorted(pq.read_table(out / "results.parquet").to_pylist(), key=lambda r: r["path"])


@pytest.fixture(scope="module")
def local(setup, tmp_path_factory):
    _, directory, corpus = setup
    out = tmp_path_factory.mktemp("audit-local")
    done = subprocess.run([sys.executable, "-m", "zfserve.cli", "audit", str(corpus), "--out", str(out), "--model",
                           str(directory), "--occlusion", f"{FAST[0]},{FAST[1]}", "--exact"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out, _rows(out)


def test_one_row_per_file_failures_with_reasons_predictions_equal_pytorch(setup, local):
    model, directory, corpus = setup
    _, rows = local
    assert [r["path"] for r in rows] == sorted(str(p) for p in corpus.iterdir())
    reasons = {os.path.basename(r["path"]): r["error"] for r in rows if r["status"] == "failed"}
    assert set(reasons) == {"truncated.jpg", "notes.txt", "huge.png"}
    assert "81000000 pixels" in reasons["huge.png"] and "truncated or corrupt" in reasons["truncated.jpg"]
    assert "not a decodable" in reasons["notes.txt"]
    config = read_snapshot(directory).config
    for row in (r for r in rows if r["status"] == "ok"):
        x = load_image(open(row["path"], "rb").read(), config)[None]
        with torch.no_grad():
            p = torch.softmax(model(torch.from_numpy(x)), dim=1)[0].numpy()
        assert row["predicted"] == f"class{int(p.argmax())}" and abs(row["probability"] - float(p.max())) <= 1e-5
        assert row["occlusion_mode"] == "exact" and row["evidence_drop"] is not None


def test_a_server_gives_the_same_rows(setup, local, tmp_path):
    from zfserve import audit
    from zfserve.client import Client, RemoteAuditBackend
    from zfserve.server import BackgroundServer, ServerOptions
    _, directory, corpus = setup
    with BackgroundServer(ServerOptions(port=0, model=str(directory))) as server, \
            Client(server.target, timeout=120) as client:
        audit.run(str(corpus), tmp_path, backend=RemoteAuditBackend(client), occlusion=FAST, quiet=True, exact=True)
    _same_rows(_rows(tmp_path), local[1])


def test_ray_gives_the_same_rows(setup, local, tmp_path):
    import ray
    from zfserve import audit
    _, directory, corpus = setup
    try:
        summary = audit.run(str(corpus), tmp_path, model=str(directory), occlusion=FAST, quiet=True, exact=True,
                            ray=True, workers=1, batch_size=4)
    finally:
        ray.shutdown()
    assert summary["rows"] == 7 and summary["this_run"]["runner"].startswith("ray")
    _same_rows(_rows(tmp_path), local[1])
