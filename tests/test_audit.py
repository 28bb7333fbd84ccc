"""zfserve audit: rows = inputs with every failure's reason, predictions equal to `zfserve classify`, evidence
equal to `zfserve occlude`, resuming after a kill or Ctrl-C, the same rows from a server, from Ray on a real
two-node cluster on loopback, and the page in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from zfserve.data import CLASSES, render
from zfserve.errors import InvalidArgumentError

FAST = (112, 112)     # occlusion window, stride: 2 x 2 positions keeps the tests quick
FLOAT_COLUMNS = ("probability", "evidence_x", "evidence_y", "evidence_drop", "evidence_in_mask", "pointing_distance")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spread_model):
    from zfserve.weights import save_model
    model = spread_model(seed=5, num_classes=len(CLASSES))
    return save_model(model, tmp_path_factory.mktemp("model") / "audit-tiny", class_names=list(CLASSES),
                      name="audit-tiny")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def _encoded(pixels, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """An ImageFolder tree of synthetic images (labels = their classes; one folder the model does not know),
    plus a truncated JPEG, a text file, a 0-byte file and an image over the pixel limit."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        sample = render(4, i)
        folder = root / CLASSES[sample.label]
        folder.mkdir(exist_ok=True)
        fmt = "JPEG" if i % 2 else "PNG"
        (folder / f"img{i}.{fmt.lower()}").write_bytes(_encoded(sample.image, fmt))
    (root / "unknown-class").mkdir()
    (root / "unknown-class" / "x.png").write_bytes(_encoded(render(4, 7).image, "PNG"))
    jpeg = _encoded(render(4, 8).image, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / "huge.png").write_bytes(_png_header_only(9000, 9000))
    return root


def _rows(out) -> list[dict]:
    return sorted(pq.read_table(out / "results.parquet").to_pylist(), key=lambda r: r["path"])


@pytest.fixture(scope="module")
def audited(corpus, model_dir, tmp_path_factory):
    from zfserve import audit
    out = tmp_path_factory.mktemp("audit")
    summary = audit.run(str(corpus), out, model=str(model_dir), occlusion=FAST, low_confidence=0.9, quiet=True,
                        exact=True)
    return out, summary, _rows(out)


def test_rows_equal_files_and_every_failure_has_its_reason(corpus, audited):
    out, summary, rows = audited
    files = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    assert [r["path"] for r in rows] == files and summary["rows"] == summary["inputs"] == len(files)
    assert summary["missing"] == 0
    reasons = {os.path.basename(r["path"]): r["error"] for r in rows if r["status"] == "failed"}
    assert set(reasons) == {"truncated.jpg", "notes.txt", "empty.png", "huge.png"}
    assert "0 bytes" in reasons["empty.png"] and "81000000 pixels" in reasons["huge.png"]
    assert "not a decodable" in reasons["notes.txt"] and "truncated or corrupt" in reasons["truncated.jpg"]
    assert all(r["failed"] and r["predicted"] is None for r in rows if r["status"] == "failed")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 7 and all(r["sha256"] and r["width"] == 256 for r in ok)
    assert [r["correct"] is None for r in ok].count(True) == 1   # the unknown class: no correctness
    assert summary["status"] == {"ok": 7, "failed": 4} and summary["flags"]["failed"] == 4
    assert summary["labelled"] == 6


def test_predictions_equal_zfserve_classify(corpus, audited, model_dir, capsys):
    from zfserve.cli import main
    _, _, rows = audited
    ok = [r for r in rows if r["status"] == "ok"]
    assert main(["classify", *(r["path"] for r in ok), "--model", str(model_dir), "--json"]) == 0
    listed = {item["image"]: item["predictions"] for item in json.loads(capsys.readouterr().out)}
    for r in ok:
        expected = listed[r["path"]]
        assert r["top_k_indices"] == [p["index"] for p in expected]
        np.testing.assert_allclose(r["top_k_probabilities"], [p["probability"] for p in expected], atol=1e-5)
        assert r["misclassified"] == (r["correct"] is False)
        assert r["low_confidence"] == (r["probability"] < 0.9)


def test_evidence_equals_zfserve_occlude(audited, model_dir, tmp_path, capsys):
    from zfserve.cli import main
    from zfserve.config import ModelConfig
    from zfserve.paper.localization import drop_point
    from zfserve.preprocess import input_frame
    _, _, rows = audited
    config = ModelConfig.from_json(json.loads((model_dir / "config.json").read_text()))
    for r in [r for r in rows if r["status"] == "ok"][:3]:
        target = CLASSES.index(r["target"])
        out = tmp_path / os.path.basename(r["path"])
        assert main(["occlude", r["path"], "--model", str(model_dir), "--window", "112", "--stride", "112",
                     "--target", str(target), "--out", str(out)]) == 0
        capsys.readouterr()
        doc = json.loads((out / "occlusion.json").read_text())
        assert doc["target"] == target
        assert r["evidence_drop"] == pytest.approx(doc["unoccluded_probability"] - doc["min_probability"], abs=1e-5)
        maps = np.load(out / "occlusion.npz")

        class Sweep:   # what drop_point reads, from the occlude command's own files
            probability, starts, window = maps["probability"], maps["starts"], 112
        cx, cy = drop_point(Sweep, 224)
        sx, sy, left, top = input_frame((r["height"], r["width"]), config.preprocess)
        assert (r["evidence_x"], r["evidence_y"]) == pytest.approx(((cx + left) / sx, (cy + top) / sy))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A CSV manifest with relative image paths, mask paths and one file:// URI."""
    root = tmp_path_factory.mktemp("manifest")
    lines = ["path,label,mask_path"]
    for i in range(4):
        sample = render(6, i)
        (root / f"m{i}.png").write_bytes(_encoded(sample.image, "PNG"))
        (root / f"m{i}-mask.png").write_bytes(_encoded(sample.mask.astype(np.uint8) * 255, "PNG"))
        path = (root / f"m{i}.png").as_uri() if i == 0 else f"m{i}.png"
        lines.append(f"{path},{CLASSES[sample.label]},m{i}-mask.png")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root


def test_manifest_with_masks_gives_evidence_on_the_mask(manifest, model_dir, tmp_path):
    from zfserve import audit
    from zfserve.engine.occlusion import OcclusionEngine
    from zfserve.paper.localization import distance_to_mask, drop_point
    from zfserve.preprocess import load_image, mask_to_input
    from zfserve.weights import load_model
    summary = audit.run(str(manifest / "list.csv"), tmp_path, model=str(model_dir), occlusion=FAST, quiet=True,
                        exact=True)
    rows = _rows(tmp_path)
    assert summary["rows"] == 4 and summary["status"]["ok"] == 4
    assert sum(r["path"].startswith("file://") for r in rows) == 1   # read through pyarrow's filesystem
    model = load_model(str(model_dir))
    engine = OcclusionEngine(model)
    for r in rows:
        index = int(os.path.basename(r["path"])[1])
        sample = render(6, index)
        result = engine.sweep(load_image(_encoded(sample.image, "PNG"), model.config), *FAST,
                              target=sample.label, outputs=("probability", "attribution"))
        mask = mask_to_input(sample.mask, model.config)
        positive = np.maximum(result.attribution, 0)
        assert r["evidence_in_mask"] == pytest.approx(positive[mask].sum() / positive.sum(), abs=1e-5)
        distance = distance_to_mask(mask, *drop_point(result, 224))
        assert r["pointing_distance"] == pytest.approx(distance, abs=1e-4)
        assert r["pointing_hit"] == (distance <= 15) and r["evidence_off_object"] == (not r["pointing_hit"])
    assert summary["pointing_game"]["images"] == 4


def test_synthetic_summary_agrees_with_the_report(model_dir, tmp_path):
    """synthetic:N is the report's image set: the same pointing game (window 48, stride 32, label target) and
    the same accuracy as zfserve.paper computes."""
    from zfserve import audit
    from zfserve.engine.classifier import Classifier
    from zfserve.paper.dataset import AnalysisData
    from zfserve.paper.localization import pointing_game
    from zfserve.weights import load_model
    n = 6
    summary = audit.run(f"synthetic:{n}", tmp_path, model=str(model_dir), quiet=True, exact=True)
    data = AnalysisData("synthetic", seed=3, n=n)
    report = pointing_game(load_model(str(model_dir)), data, range(n), window=48, stride=32)
    assert summary["pointing_game"]["hit_rate"] == report["hit_rate"] and summary["pointing_game"]["images"] == n
    config = load_model(str(model_dir)).config
    probs = Classifier(str(model_dir), warmup=False).probabilities(data.inputs(range(n), config))
    assert summary["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == data.labels())))
    hits = {r["path"]: r["pointing_hit"] for r in _rows(tmp_path)}
    assert [hits[f"synthetic://3/{i}"] for i in range(n)] == [rec["hit"] for rec in report["images"]]


def _audit_command(source, out, model_dir, *extra):
    return [sys.executable, "-m", "zfserve.cli", "audit", source, "--out", str(out), "--model", str(model_dir),
            "--occlusion", "112,112", "--batch-size", "2", "--quiet", "--exact", *extra]


def _stop_after_first_parts(cmd, sig, parts_dir, minimum=2, timeout=180):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(parts_dir.glob("part-*.parquet"))) >= minimum:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_audit_resumes_to_one_row_per_input(model_dir, tmp_path, sig):
    from zfserve import audit
    rc, _, err = _stop_after_first_parts(_audit_command("synthetic:12", tmp_path, model_dir), sig,
                                         tmp_path / "results.parquet")
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    if sig == signal.SIGINT:
        assert "interrupted" in err and "run the same command again" in err and len(err.strip().splitlines()) == 1
    before = pq.read_table(tmp_path / "results.parquet").to_pylist()   # readable after the interruption
    assert 2 <= len(before) < 12
    summary = audit.run("synthetic:12", tmp_path, model=str(model_dir), occlusion=FAST, batch_size=2, quiet=True,
                        exact=True)
    rows = _rows(tmp_path)
    assert len(rows) == 12 and len({r["path"] for r in rows}) == 12 and summary["missing"] == 0
    assert summary["this_run"]["skipped_done"] == len(before)
    assert summary["this_run"]["rows_written"] == 12 - len(before)   # finished images are not redone


def test_changed_file_is_redone_and_stays_one_row(corpus, model_dir, tmp_path):
    from zfserve import audit
    folder = tmp_path / "corpus"
    shutil.copytree(corpus, folder)
    out = tmp_path / "out"
    audit.run(str(folder), out, model=str(model_dir), occlusion=FAST, quiet=True, exact=True)
    changed = folder / "unknown-class" / "x.png"
    changed.write_bytes(_encoded(render(4, 9).image, "PNG"))
    summary = audit.run(str(folder), out, model=str(model_dir), occlusion=FAST, quiet=True, exact=True)
    assert summary["this_run"]["rows_written"] == 1 and summary["rows"] == summary["inputs"] == 11
    (row,) = [r for r in _rows(out) if r["path"] == str(changed)]
    import hashlib
    assert row["sha256"] == hashlib.sha256(changed.read_bytes()).hexdigest()


def test_the_page_loads_in_headless_chromium(audited, page_images):
    out, summary, rows = audited
    images, dom = page_images(out / "index.html")
    flagged = [r for r in rows if r["status"] == "ok" and (r["misclassified"] or r["low_confidence"]
                                                           or r["evidence_off_object"])]
    assert flagged and len(images) == len([r for r in flagged if r["heatmap"]]) > 0
    assert all(complete and width > 0 for _, complete, width in images), images
    assert all((out / r["heatmap"]).is_file() for r in flagged if r["heatmap"])
    assert dom.count("<div class=\"card\">") == len(flagged)
    assert all(os.path.basename(r["path"]) in dom for r in rows if r["status"] == "failed")


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for x, y in zip(a, b):
        for key in x:
            if key in FLOAT_COLUMNS or key == "top_k_probabilities":
                np.testing.assert_allclose(np.asarray(x[key] if x[key] is not None else np.nan, dtype=float),
                                           np.asarray(y[key] if y[key] is not None else np.nan, dtype=float),
                                           atol=1e-5, err_msg=f"{x['path']} {key}")
            else:
                assert x[key] == y[key], (x["path"], key, x[key], y[key])


def test_a_server_gives_the_same_rows(corpus, audited, model_dir, tmp_path):
    from zfserve import audit
    from zfserve.client import Client, RemoteAuditBackend
    from zfserve.server import BackgroundServer, ServerOptions
    _, _, local = audited
    with BackgroundServer(ServerOptions(port=0, model=str(model_dir))) as server, \
            Client(server.target, timeout=120) as client:
        audit.run(str(corpus), tmp_path, backend=RemoteAuditBackend(client), occlusion=FAST, low_confidence=0.9,
                  quiet=True)
    _same_rows(_rows(tmp_path), local)


def _ray(*args, env=None, timeout=120):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray_bin, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _free_ports(n: int) -> list[int]:
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _processes_of(marker: str) -> list[int]:
    """The processes of the cluster this test started: those whose environment holds ``marker`` (every process
    `ray start` launches inherits it; this test's own process does not), and their descendants."""
    parents, marked = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker.encode() in fh.read().split(b"\0"):
                    marked.add(int(entry))
        except (OSError, ValueError):
            continue
    found = set(marked)
    while True:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        if not children:
            return sorted(found - {os.getpid()})
        found |= children


def _stop_cluster(marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM to the cluster's own processes (by id), SIGKILL to those still there after ``grace_s``. Never
    ``ray stop``: it stops every Ray process of the machine, a cluster of the user's included."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _processes_of(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        give_up = time.monotonic() + wait_s
        while _processes_of(marker) and time.monotonic() < give_up:
            time.sleep(0.2)


def _forget_ray_auth() -> None:
    """Drop what this process's Ray cached of the cluster's token authentication (its config and the token
    loader's cache), so a later local ``ray.init`` in the same process (another test's) starts and joins its own
    instance with the environment's settings, not this cluster's token."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:     # a Ray without token authentication caches nothing
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def two_node_cluster():
    """A real Ray cluster on loopback, this test's own: a head and a second node, one CPU each, separate custom
    resources, its own temporary directory and ports (none of Ray's fixed defaults, so a cluster of the user's
    on this machine is neither reached nor disturbed), token authentication (Ray's default for local clusters
    since 2.59) with a token the nodes and this test's driver share through the environment. Stopped by
    :func:`_stop_cluster`, which ends only the processes this cluster started."""
    import secrets
    import tempfile
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    _forget_ray_auth()     # a local instance of an earlier test may have left its own token cached
    marker = f"ZFSERVE_TEST_RAY_CLUSTER={secrets.token_hex(8)}"
    env = dict(os.environ, **dict([marker.split("=")]))
    temp = tempfile.mkdtemp(prefix="zfray-", dir="/tmp")   # short: Ray's socket paths live under it
    head_port, *ports = _free_ports(15)
    address = f"127.0.0.1:{head_port}"

    def node(*args, own):
        agent, grpc_agent, runtime_env, metrics, manager, objects = own
        return _ray("start", *args, "--temp-dir", temp, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                    "--disable-usage-stats", "--dashboard-agent-listen-port", str(agent),
                    "--dashboard-agent-grpc-port", str(grpc_agent), "--runtime-env-agent-port", str(runtime_env),
                    "--metrics-export-port", str(metrics), "--node-manager-port", str(manager),
                    "--object-manager-port", str(objects), env=env)
    try:
        head = node("--head", "--port", str(head_port), "--include-dashboard", "false", "--dashboard-port",
                    str(ports[0]), "--ray-client-server-port", str(ports[1]), "--resources", '{"node_a": 1}',
                    own=ports[2:8])
        assert head.returncode == 0, head.stderr[-3000:]
        worker = node("--address", address, "--resources", '{"node_b": 1}', own=ports[8:14])
        assert worker.returncode == 0, worker.stderr[-3000:]
        yield address
    finally:
        _stop_cluster(marker)
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _forget_ray_auth()


def test_ray_on_a_two_node_cluster_gives_the_same_rows(two_node_cluster, model_dir, tmp_path):
    """The same engines on Ray: the driver's gate chooses a batched mode and every actor sweeps in it."""
    import ray
    from zfserve import audit
    from zfserve.engine.occlusion_modes import mode_from
    local = tmp_path / "local"
    fast = dict(candidates=[mode_from(engine="onnxruntime", approximation="drilldown")], gate={"images": 4})
    audit.run("synthetic:6", local, model=str(model_dir), occlusion=(48, 32), batch_size=2, quiet=True, **fast)
    try:
        summary = audit.run("synthetic:6", tmp_path / "ray", model=str(model_dir), occlusion=(48, 32), batch_size=2,
                            workers=2, ray=two_node_cluster, quiet=True, **fast)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and {"node_a", "node_b"} <= {k for n in nodes for k in n["Resources"]}
    finally:
        ray.shutdown()
    assert summary["rows"] == 6 and summary["this_run"]["runner"].startswith("ray")
    rows = _rows(tmp_path / "ray")
    assert {r["occlusion_mode"] for r in rows} == {summary["occlusion_mode"]["mode"]}
    _same_rows(rows, _rows(local))


def test_bad_options_and_mixed_resumes_are_refused(model_dir, corpus, tmp_path, capsys):
    from zfserve import audit
    from zfserve.cli import main
    assert main(["audit", str(corpus), "--out", str(tmp_path), "--occlusion", "48"]) == 2
    assert "--occlusion" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    assert "source" in capsys.readouterr().err
    with pytest.raises(InvalidArgumentError, match="--batch-size"):
        audit.run(str(corpus), tmp_path, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="synthetic:N"):
        audit.run("synthetic:zero", tmp_path)
    (tmp_path / "bad.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(InvalidArgumentError, match="'path' column"):
        audit.run(str(tmp_path / "bad.csv"), tmp_path / "o1")
    (tmp_path / "dup.csv").write_text("path\na.png\na.png\n")
    with pytest.raises(InvalidArgumentError, match="twice"):
        audit.run(str(tmp_path / "dup.csv"), tmp_path / "o2")
    out = tmp_path / "o3"
    audit.run("synthetic:2", out, model=str(model_dir), occlusion=FAST, quiet=True, exact=True)
    with pytest.raises(InvalidArgumentError, match="another --out"):
        audit.run("synthetic:2", out, occlusion=FAST, quiet=True, exact=True)    # the embedded model: other rows
    with pytest.raises(InvalidArgumentError, match="another --out"):
        audit.run("synthetic:2", out, model=str(model_dir), occlusion=(56, 56), quiet=True, exact=True)


# ---------------------------------------------------------------------------------------------------- the gate
def test_a_gated_mode_draws_every_row_and_says_so(model_dir, tmp_path, capsys):
    """A mode that agrees with exact (brute force on ONNX Runtime) passes the gate: every row and the summary
    name it, and the evidence equals the exact audit's."""
    from zfserve import audit
    from zfserve.cli import main
    from zfserve.engine.occlusion_modes import mode_from
    exact = audit.run("synthetic:4", tmp_path / "exact", model=str(model_dir), occlusion=(56, 48), quiet=True,
                      exact=True)
    assert exact["occlusion_mode"]["mode"] == "exact" and exact["occlusion_mode"]["note"] == "exact (--exact)"
    batched = mode_from(engine="onnxruntime")
    lines = []
    fast = audit.run("synthetic:4", tmp_path / "fast", model=str(model_dir), occlusion=(56, 48), quiet=True,
                     candidates=[batched], gate={"images": 4}, log=lines.append)
    assert fast["occlusion_mode"]["mode"] == batched.name and fast["occlusion_mode"]["gate"]["images"] == 4
    assert fast["occlusion_mode"]["rows_by_mode"] == {batched.name: 4}
    assert any(line.startswith(f"occlusion: {batched.name} (gate passed") for line in lines)
    assert set(fast["setup_s"]) >= {"load", "gate", "run"} and set(fast["seconds"]) >= {"read", "classify", "occlusion"}
    rows = _rows(tmp_path / "fast")
    assert {r["occlusion_mode"] for r in rows} == {batched.name}
    _same_rows([{**r, "occlusion_mode": None} for r in rows],
               [{**r, "occlusion_mode": None} for r in _rows(tmp_path / "exact")])
    # The CLI prints which mode it used, from the stored gate (measured above for the same settings).
    assert main(["audit", "synthetic:4", "--out", str(tmp_path / "cli"), "--model", str(model_dir), "--occlusion",
                 "56,48", "--engine", "onnxruntime", "--precision", "fp32", "--approximation", "none",
                 "--gate-images", "4", "--quiet"]) == 0
    assert f"occlusion: {batched.name} (gate passed" in capsys.readouterr().out


def test_a_mode_that_disagrees_is_refused_and_the_audit_falls_back_to_exact(model_dir, tmp_path, capsys):
    from zfserve.cli import main
    # An absurd approximation: on the 7 x 7 grid of window 48 / stride 32, a lattice of every 16th position is
    # the four corners alone, so the largest drop is found in the wrong place.
    assert main(["audit", "synthetic:3", "--out", str(tmp_path), "--model", str(model_dir), "--engine", "onnxruntime",
                 "--approximation", "drilldown", "--coarse", "16", "--refine", "0", "--gate-images", "12"]) == 0
    captured = capsys.readouterr()
    assert "refused: location agreement" in captured.err
    assert "occlusion: exact (fallback: no fast mode passed the gate" in captured.out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["occlusion_mode"]["mode"] == "exact" and "fallback" in summary["occlusion_mode"]["note"]
    assert {r["occlusion_mode"] for r in _rows(tmp_path)} == {"exact"}
    assert main(["audit", "synthetic:3", "--out", str(tmp_path), "--exact", "--approximation", "drilldown"]) == 2
    assert "--exact and the mode options" in capsys.readouterr().err
