"""The explorer page in a real browser: Selenium 4 driving Debian's chromium headless against a real
``zfserve serve --http-port`` process serving two tiny models (one with a unit index built by ``zfserve index``,
one without).

What the page shows is checked against references computed here, independently of the server: predictions
against the PyTorch model, the layer's units against the deconv engine, the top-9 against the index read from
disk, hostile uploads against the errors the gRPC API gives for the same bytes, versions against the weights'
SHA-256.

The same module takes the README's screenshot of the real page with the embedded model::

    .venv/bin/python tests/test_explorer_page.py --screenshot docs/explorer.png
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                else None)
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

MISSING = ("the explorer page test needs Debian's chromium and chromium-driver (/usr/bin/chromedriver) and the "
           "selenium package (the dev extra); CI installs them")
if not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM) and os.environ.get("ZFSERVE_REQUIRE_BROWSER"):
    raise RuntimeError(MISSING)    # CI (ZFSERVE_REQUIRE_BROWSER=1): a collection error, never a skip
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM), reason=MISSING)

WIDTHS = (16, 16, 16, 16, 16)
INDEX_IMAGES = 12
SWEEP_POSITIONS = 10_000           # lets a window 32 / stride 2 sweep (97 x 97 positions) run long enough to cancel
TOKEN = "explorer-test-token"
BROWSER_WAIT_S = 90                # an upper bound for the page to get an answer, not a measurement


# ---------------------------------------------------------------------------------------------------- servers
class ExplorerServer:
    """``zfserve serve --port 0 --http-port 0 ...`` as a subprocess; its addresses come from its stdout."""

    def __init__(self, args, env=None, metrics: bool = False):
        self.metrics_port = _free_port() if metrics else None
        extra = ["--metrics-port", str(self.metrics_port)] if metrics else []
        self.proc = subprocess.Popen([sys.executable, "-m", "zfserve.cli", "serve", "--port", "0", "--http-port", "0",
                                      *extra, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.grpc = self.http = None
        while True:
            try:
                line = self.lines.get(timeout=180)
            except queue.Empty:
                self.stop()
                raise RuntimeError("zfserve serve did not start:\n" + "".join(self.output)) from None
            if line is None:
                raise RuntimeError("zfserve serve exited:\n" + "".join(self.output))
            if m := re.match(r"zfserve: listening on (\S+)", line):
                self.grpc = m.group(1)
            elif m := re.match(r"zfserve: http on (\S+)", line):
                self.http = m.group(1)
            elif line.startswith("zfserve: ready"):
                break
        assert self.grpc and self.http, "".join(self.output)
        self.url = f"http://{self.http}/"

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def api(self, path: str, data: bytes | None = None, token: str | None = None):
        """(status, JSON body) of an /api/v1 call made outside the browser."""
        request = urllib.request.Request(f"http://{self.http}/api/v1/{path}", data=data,
                                         method="POST" if data is not None else "GET")
        if data is not None:   # urllib's default (a form's type) is refused on routes that change state
            request.add_header("Content-Type", "application/octet-stream")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def metric(self, name: str, **labels) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if m := re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line):
                found = ",".join(sorted(m.group(1).split(","))) if m.group(1) else ""
                if found == wanted:
                    return float(m.group(2))
        return 0.0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _browser(profile: Path, width: int = 1400, height: int = 1600):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={width},{height}", f"--user-data-dir={profile}", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# ---------------------------------------------------------------------------------------------------- page helpers
def wait(driver, condition, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, BROWSER_WAIT_S, poll_frequency=0.1).until(condition, message)


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def text_of(driver, element_id: str) -> str:
    return by_id(driver, element_id).text


def open_page(driver, url: str):
    """A fresh load (not a same-document hash change) that waits until the models are listed."""
    driver.get("about:blank")
    driver.get(url)
    wait(driver, lambda d: text_of(d, "model-name") or by_id(d, "error").is_displayed()
         or by_id(d, "token-form").is_displayed(), "the page did not start")


def dismiss_error(driver):
    """Close the error banner if it is shown (its close button is hidden with it)."""
    if by_id(driver, "error").is_displayed():
        by_id(driver, "error-close").click()
        wait(driver, lambda d: not by_id(d, "error").is_displayed(), "the error banner did not close")


def canvas_pixels(driver, element_id: str) -> dict:
    """How many distinct RGBA values a canvas holds (up to 4096) and its largest alpha."""
    return driver.execute_script("""
        const c = document.getElementById(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set(); let alpha = 0;
        for (let i = 0; i < d.length && seen.size < 4096; i += 4) {
            seen.add((d[i] << 24 | d[i + 1] << 16 | d[i + 2] << 8 | d[i + 3]) >>> 0);
            alpha = Math.max(alpha, d[i + 3]);
        }
        return {distinct: seen.size, alpha};""", element_id)


def predictions(driver) -> list[tuple[int, str, str]]:
    return [(int(li.get_attribute("data-index")), li.find_element("css selector", ".name").text,
             li.find_element("css selector", ".probability").text)
            for li in driver.find_elements("css selector", "#predictions li.prediction")]


def hash_params(driver) -> dict:
    from urllib.parse import parse_qsl
    return dict(parse_qsl(driver.current_url.partition("#")[2]))


def script_errors(driver) -> list[str]:
    """Uncaught JavaScript errors in the browser log (failed 4xx fetches are expected and left out)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("source") == "javascript"
            or "Uncaught" in e["message"]]


def upload(driver, path: Path):
    by_id(driver, "file-input").send_keys(str(path))


def drop_file(driver, data: bytes, name: str):
    """A file dropped on the drop zone, as a user's drag and drop delivers it (a DataTransfer with a File)."""
    driver.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], arguments[1], {type: 'image/jpeg'}));
        const zone = document.getElementById('drop-zone');
        for (const type of ['dragenter', 'dragover', 'drop']) {
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""", base64.b64encode(data).decode(), name)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory, spread_model):
    """A model repository: ``tiny`` with a unit index (``zfserve index`` over 12 synthetic images) and ``bare``
    without one."""
    from zfserve.cli import main
    from zfserve.data import CLASSES
    from zfserve.weights import save_model
    repo = tmp_path_factory.mktemp("explorer-models")
    for name, seed in (("tiny", 3), ("bare", 4)):
        model = spread_model(seed=seed, widths=WIDTHS, num_classes=len(CLASSES), fc_width=32)
        save_model(model, repo / name, name=name, class_names=list(CLASSES))
    assert main(["index", "--model", str(repo / "tiny"), "--data", "synthetic", "--n", str(INDEX_IMAGES),
                 "--batch-size", "6", "--quiet"]) == 0
    return repo


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    cache = tmp_path_factory.mktemp("explorer-cache")
    srv = ExplorerServer(["--model-repository", str(models), "--max-occlusion-positions", str(SWEEP_POSITIONS),
                          "--max-message-bytes", str(4 << 20)], env={"ZFSERVE_CACHE_DIR": str(cache)}, metrics=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = _browser(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A JPEG the models have never seen (synthetic seed 11, not the index's seed 3)."""
    from PIL import Image

    from zfserve.data import render
    path = tmp_path_factory.mktemp("photos") / "photo.jpg"
    Image.fromarray(render(11, 3).image).save(path, format="JPEG", quality=90)
    return path


@pytest.fixture(scope="module")
def tiny(models):
    from zfserve.weights import read_snapshot
    return read_snapshot(models / "tiny").model()


def _reference_top5(model, path: Path):
    import torch

    from zfserve.preprocess import load_image
    x = torch.from_numpy(load_image(path.read_bytes(), model.config))[None]
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=1)[0]
    order = torch.argsort(p, descending=True, stable=True)[:5].tolist()
    return [(i, model.config.class_names[i], float(p[i])) for i in order]


def _reference_units(model, path: Path, layer: str) -> list[int]:
    from zfserve.engine.deconv import DeconvEngine
    from zfserve.preprocess import load_image
    return [u.channel for u in DeconvEngine(model).project(load_image(path.read_bytes(), model.config), layer,
                                                           top_k=9)]


def _page_with_photo(browser, server, photo, model: str = "tiny"):
    open_page(browser, f"{server.url}#model={model}")
    upload(browser, photo)
    wait(browser, lambda d: len(predictions(d)) == 5, "no predictions")
    wait(browser, lambda d: d.find_elements("css selector", "#units .unit"), "no units")


# ---------------------------------------------------------------------------------------------------- tests
def test_upload_shows_predictions_and_the_occlusion_map(browser, server, photo, tiny):
    open_page(browser, f"{server.url}#model=tiny")
    assert text_of(browser, "model-name") == "tiny"
    upload(browser, photo)
    wait(browser, lambda d: len(predictions(d)) == 5, "no predictions")
    shown = predictions(browser)
    expected = _reference_top5(tiny, photo)
    assert [(i, name) for i, name, _ in shown] == [(i, name) for i, name, _ in expected]
    for (_, _, text), (_, _, p) in zip(shown, expected):
        assert abs(float(text.rstrip("%")) - 100 * p) <= 0.051 + 1e-3, (text, p)
    assert hash_params(browser)["image"] == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert canvas_pixels(browser, "image-canvas")["distinct"] > 100
    # The sweep starts by itself after the projections; the map is drawn over the image.
    wait(browser, lambda d: text_of(d, "sweep-status") == "done", "the sweep did not finish")
    heat = canvas_pixels(browser, "heatmap")
    assert heat["distinct"] > 10 and heat["alpha"] > 0, heat
    assert "window 32 px, stride 8 px, 25×25 positions" in text_of(browser, "occlusion-summary")
    assert text_of(browser, "occlusion-label") == "Map: occlusion sensitivity: drop of the target class's probability."
    # No agreement gate measured for the tiny model: the exact mode, named beside the map with the reason.
    assert text_of(browser, "occlusion-mode") == ("Mode: exact (onnxruntime fp32, every position evaluated). Why: no "
                                                  "gate measured for window 32, stride 8: zfserve occlusion-gate.")
    assert hash_params(browser)["occlusion"] == "1"
    by_id(browser, "map-kind").send_keys("per-pixel attribution")
    wait(browser, lambda d: hash_params(d).get("map") == "attribution")
    assert canvas_pixels(browser, "heatmap")["distinct"] > 10
    assert not by_id(browser, "error").is_displayed()
    assert script_errors(browser) == []


def test_a_gated_fast_mode_draws_the_map_and_the_page_says_so(browser, server, photo, models):
    """Once `zfserve occlusion-gate` has passed a fast mode for the page's window and stride, the page's sweeps
    run in it and name it; the map equals that mode's sweep computed here."""
    from zfserve.audit import gate
    from zfserve.engine.occlusion_modes import OcclusionEngines, mode_from
    from zfserve.preprocess import load_image
    from zfserve.weights import read_snapshot
    snapshot = read_snapshot(models / "tiny")
    engines = OcclusionEngines(snapshot)
    # On a 3 x 3 grid the lattice and three refined neighbourhoods cover every position: it agrees with exact.
    drill = mode_from(engine="onnxruntime", approximation="drilldown")
    assert gate.choose(snapshot, gate.GateSettings(112, 56), engines, modes=[drill]).mode == drill
    _page_with_photo(browser, server, photo)
    wait(browser, lambda d: text_of(d, "sweep-status") in ("done", "failed"), "the first sweep did not end")
    for field, value in (("window", "112"), ("stride", "56")):
        by_id(browser, field).clear()
        by_id(browser, field).send_keys(value)
    by_id(browser, "run-sweep").click()
    wait(browser, lambda d: "3×3 positions" in text_of(d, "occlusion-summary"), "the 112/56 sweep did not finish")
    shown = text_of(browser, "occlusion-mode")
    assert shown.startswith(f"Mode: {drill.name} (onnxruntime fp32, every position evaluated). Why: gate passed: "
                            f"location 100.0%"), shown
    expected = engines.sweep(load_image(photo.read_bytes(), snapshot.config), drill, window=112, stride=56)
    assert f"{expected.probability.min():.3f} at the worst" in text_of(browser, "occlusion-summary")
    assert script_errors(browser) == []


def test_a_layer_and_a_unit_with_its_top9(browser, server, photo, tiny, models):
    from zfserve.paper.unit_index import find_index
    open_page(browser, f"{server.url}#model=tiny")
    drop_file(browser, photo.read_bytes(), "dropped.jpg")            # drag and drop, not the file input
    wait(browser, lambda d: len(predictions(d)) == 5, "the dropped file was not classified")
    by_id(browser, "tab-conv3").click()
    wait(browser, lambda d: by_id(d, "tab-conv3").get_attribute("aria-selected") == "true")
    wait(browser, lambda d: len(d.find_elements("css selector", "#units .unit")) == 9, "no conv3 units")
    cards = browser.find_elements("css selector", "#units .unit")
    channels = [int(card.get_attribute("data-channel")) for card in cards]
    assert channels == _reference_units(tiny, photo, "conv3")
    assert "feature visualisation (class-insensitive)" in text_of(browser, "deconv-label")
    cards[1].click()
    wait(browser, lambda d: len(d.find_elements("css selector", "#unit-top9 img.top9-patch")) == 9, "no top-9")
    assert text_of(browser, "unit-title") == f"conv3, feature map {channels[1]}"
    index_units = find_index(models / "tiny").units("conv3", channels[1])
    captions = [f.text for f in browser.find_elements("css selector", "#unit-top9 figcaption")]
    assert [int(c.split()[0].lstrip("#")) for c in captions] == [u["image"] for u in index_units]
    assert f"synthetic seed 3, {INDEX_IMAGES} images" in text_of(browser, "unit-data")
    loaded = browser.execute_script(
        "return [...document.querySelectorAll('#unit-top9 img')].map((i) => i.complete && i.naturalWidth > 0)")
    assert all(loaded)
    assert (hash_params(browser)["layer"], hash_params(browser)["unit"]) == ("conv3", str(channels[1]))
    assert "selected" in cards[1].get_attribute("class")
    assert script_errors(browser) == []


def test_cancelling_a_sweep_stops_it_on_the_server(browser, server, photo):
    _page_with_photo(browser, server, photo)
    wait(browser, lambda d: text_of(d, "sweep-status") == "done", "the first sweep did not finish")
    rpc = {"rpc": "OcclusionSweepStream"}
    finished_before = server.metric("zfserve_requests_total", code="OK", **rpc)
    for element_id, value in (("window", "32"), ("stride", "2")):
        by_id(browser, element_id).clear()
        by_id(browser, element_id).send_keys(value)
    by_id(browser, "run-sweep").click()
    wait(browser, lambda d: re.fullmatch(r"running: [1-9]\d*/9409 positions", text_of(d, "sweep-status")),
         "no progress from the long sweep")
    assert by_id(browser, "cancel-sweep").is_enabled()
    by_id(browser, "cancel-sweep").click()
    assert text_of(browser, "sweep-status") == "cancelled"
    # The server ends the sweep: nothing heavy is left running, and it did not finish.
    wait(browser, lambda d: server.metric("zfserve_heavy_requests") == 0, "the server kept the sweep running")
    assert server.metric("zfserve_requests_total", code="OK", **rpc) == finished_before
    # ... and the next requests are answered: a layer (same worker as sweeps) and a new sweep.
    by_id(browser, "tab-conv5").click()
    wait(browser, lambda d: len(d.find_elements("css selector", "#units .unit")) == 9, "no conv5 units")
    by_id(browser, "stride").clear()
    by_id(browser, "stride").send_keys("16")
    by_id(browser, "run-sweep").click()
    wait(browser, lambda d: text_of(d, "sweep-status") == "done", "the new sweep did not finish")
    assert "stride 16 px, 13×13 positions" in text_of(browser, "occlusion-summary")
    assert server.metric("zfserve_requests_total", code="OK", **rpc) == finished_before + 1
    assert (hash_params(browser)["window"], hash_params(browser)["stride"]) == ("32", "16")
    assert not by_id(browser, "error").is_displayed()


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


def test_hostile_uploads_get_the_errors_grpc_gives(browser, server, photo, tmp_path):
    from zfserve.client import Client, ServerError
    jpeg = photo.read_bytes()
    samples = {"corrupt.jpg": b"GIF89a? no, just some bytes that are not an image",
               "truncated.jpg": jpeg[:len(jpeg) // 3],
               "bomb.png": _png_claiming(60_000, 60_000)}
    open_page(browser, f"{server.url}#model=tiny")
    with Client(server.grpc) as client:
        for name, data in samples.items():
            with pytest.raises(ServerError) as refused:
                client.classify([data], model="tiny")
            assert refused.value.code.name == "INVALID_ARGUMENT"
            expected = re.sub(r"^images\.encoded\[0\]", "image", refused.value.details)
            dismiss_error(browser)
            path = tmp_path / name
            path.write_bytes(data)
            upload(browser, path)
            wait(browser, lambda d: by_id(d, "error").is_displayed(), f"no error for {name}")
            wait(browser, lambda d: text_of(d, "error-text") == expected, f"{name}: {text_of(browser, 'error-text')}")
    # Bodies past the server's byte limit: 413, with the limit named.
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg + os.urandom((4 << 20) + 1 - len(jpeg)))
    dismiss_error(browser)
    upload(browser, big)
    wait(browser, lambda d: by_id(d, "error").is_displayed(), "no error for the large upload")
    assert re.fullmatch(r"body: \d+ bytes; at most 4194304 are accepted \(--max-message-bytes\)",
                        text_of(browser, "error-text")), text_of(browser, "error-text")
    # The page still works afterwards.
    dismiss_error(browser)
    upload(browser, photo)
    wait(browser, lambda d: len(predictions(d)) == 5, "no predictions after the refusals")
    assert not by_id(browser, "error").is_displayed()


def test_a_url_restores_the_view(browser, server, photo, tiny):
    status, stored = server.api("images", photo.read_bytes())
    assert status == 200
    channel = _reference_units(tiny, photo, "conv2")[2]
    open_page(browser, f"{server.url}#image={stored['id']}&model=tiny&layer=conv2&unit={channel}&window=48&stride=16"
                       f"&occlusion=1")
    wait(browser, lambda d: len(predictions(d)) == 5, "no predictions")
    assert by_id(browser, "tab-conv2").get_attribute("aria-selected") == "true"
    assert (by_id(browser, "window").get_attribute("value"), by_id(browser, "stride").get_attribute("value")) == \
        ("48", "16")
    wait(browser, lambda d: d.find_elements("css selector", f'#units .unit.selected[data-channel="{channel}"]'),
         "the unit is not selected")
    assert text_of(browser, "unit-title") == f"conv2, feature map {channel}"
    wait(browser, lambda d: len(d.find_elements("css selector", "#unit-top9 img.top9-patch")) == 9, "no top-9")
    wait(browser, lambda d: text_of(d, "sweep-status") == "done", "the sweep was not restored")
    assert "window 48 px, stride 16 px" in text_of(browser, "occlusion-summary")
    # An id the server does not hold (expired, or another server's): said so, and the file asked for again.
    open_page(browser, f"{server.url}#image={'0' * 64}&model=tiny&layer=conv2")
    wait(browser, lambda d: by_id(d, "error").is_displayed(), "no error for an unknown image")
    assert text_of(browser, "error-text") == server.api(f"images/{'0' * 64}")[1]["error"]
    assert "upload the file again" in text_of(browser, "image-status")
    assert "image" not in hash_params(browser)
    assert script_errors(browser) == []


def test_a_model_without_an_index_says_so(browser, server, photo, models):
    _page_with_photo(browser, server, photo, model="bare")
    weights = (models / "bare" / "weights.safetensors").read_bytes()
    assert text_of(browser, "model-name") == "bare"
    assert text_of(browser, "model-version") == f"version 0+{hashlib.sha256(weights).hexdigest()[:12]}"
    assert text_of(browser, "index-status") == "no unit index (zfserve index --model bare)"
    browser.find_elements("css selector", "#units .unit")[0].click()
    wait(browser, lambda d: by_id(d, "unit-message").is_displayed(), "no message")
    status, body = server.api("index/bare/conv1/0")
    assert status == 404 and text_of(browser, "unit-message") == body["error"]
    assert "zfserve index --model bare" in body["error"]
    assert not browser.find_elements("css selector", "#unit-top9 img")
    # The model with an index, chosen in the page, lists it.
    from selenium.webdriver.support.ui import Select
    Select(by_id(browser, "model-select")).select_by_value("tiny")
    wait(browser, lambda d: text_of(d, "index-status") == f"unit index: synthetic seed 3, {INDEX_IMAGES} images")
    assert hash_params(browser)["model"] == "tiny"


@pytest.fixture(scope="module")
def secured_server(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explorer-secured")
    token_file = folder / "token.txt"
    token_file.write_text(TOKEN + "\n")
    srv = ExplorerServer(["--model", str(models / "bare"), "--auth-token-file", str(token_file)],
                         env={"ZFSERVE_CACHE_DIR": str(folder / "cache")})
    yield srv
    srv.stop()


def test_a_server_with_a_token_asks_for_it(browser, secured_server):
    open_page(browser, secured_server.url)
    wait(browser, lambda d: by_id(d, "token-form").is_displayed(), "no token prompt")
    assert text_of(browser, "model-name") == ""
    by_id(browser, "token-input").send_keys("not-the-token")
    by_id(browser, "token-submit").click()
    wait(browser, lambda d: "refused" in text_of(d, "token-message"), "a wrong token was not refused")
    by_id(browser, "token-input").send_keys(TOKEN)
    by_id(browser, "token-submit").click()
    wait(browser, lambda d: text_of(d, "model-name") == "bare", "the models did not load with the token")
    assert not by_id(browser, "token-form").is_displayed()
    wait(browser, lambda d: len(d.find_elements("css selector", "#examples .example")) >= 4, "no examples")
    browser.find_elements("css selector", "#examples .example")[0].click()
    wait(browser, lambda d: len(predictions(d)) == 5, "no predictions with the token")
    assert secured_server.api("models")[0] == 401 and secured_server.api("models", token=TOKEN)[0] == 200


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """The embedded model, whose out-of-distribution statistics ship beside it."""
    srv = ExplorerServer(["--model", "zfnet-demo"],
                         env={"ZFSERVE_CACHE_DIR": str(tmp_path_factory.mktemp("explorer-demo-cache"))})
    yield srv
    srv.stop()


def test_the_page_says_when_an_image_is_outside_the_model(browser, demo_server):
    """A photo shipped inside matplotlib gets the notice above its predictions; a bundled synthetic example does
    not. The page says what the model was trained on."""
    from zfserve.data.probes import photo_files
    photo = next(p for p in photo_files() if p.name == "grace_hopper.jpg")
    open_page(browser, demo_server.url)
    assert text_of(browser, "model-name") == "zfnet-demo"
    assert text_of(browser, "model-data").startswith("zfnet-demo was trained on synthetic images of 11 shapes")
    assert "real photos need a model trained on them" in text_of(browser, "model-data")
    upload(browser, photo)
    wait(browser, lambda d: len(predictions(d)) == 5, "no predictions for the photo")
    wait(browser, lambda d: by_id(d, "ood-notice").is_displayed(), "no out-of-distribution notice for the photo")
    notice = by_id(browser, "ood-notice")
    assert "This image is unlike anything zfnet-demo was fitted on" in notice.text
    assert notice.location["y"] < by_id(browser, "predictions").location["y"]     # above the predictions
    _, body = demo_server.api("models")
    threshold = body["models"][0]["ood"]["threshold"]
    score = float(re.search(r"score (\S+) > threshold", notice.text).group(1))
    assert score > threshold
    browser.find_element("css selector", '#examples .example[data-name="star"]').click()
    wait(browser, lambda d: "like the images this model knows" in text_of(d, "ood-status"),
         "no in-distribution score for the synthetic example")
    assert not by_id(browser, "ood-notice").is_displayed()
    assert [name for _, name, _ in predictions(browser)][0] == "star"
    assert script_errors(browser) == []


# ---------------------------------------------------------------------------------------------------- screenshot
def take_screenshot(out: Path, model: str | None = None, example: str = "crescent", layer: str = "conv5") -> Path:
    """A screenshot of the real page served by ``zfserve serve`` (default: the embedded model, whose unit index
    ``zfserve index --model zfnet-demo`` builds), after an example, its sweep and one unit's top-9."""
    import tempfile
    srv = ExplorerServer(["--model", model] if model else [])
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = _browser(Path(profile), width=1400, height=1200)
            try:
                open_page(driver, srv.url)
                wait(driver, lambda d: d.find_elements("css selector", f'#examples .example[data-name="{example}"]'))
                driver.find_element("css selector", f'#examples .example[data-name="{example}"]').click()
                wait(driver, lambda d: text_of(d, "sweep-status") == "done")
                by_id(driver, f"tab-{layer}").click()
                wait(driver, lambda d: d.find_elements("css selector", "#units .unit"))
                driver.find_elements("css selector", "#units .unit")[0].click()
                wait(driver, lambda d: d.find_elements("css selector", "#unit-top9 img.top9-patch")
                     or by_id(d, "unit-message").is_displayed())
                driver.execute_script("return Promise.all([...document.images].map((i) => i.decode()))")
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1400, height + 20)
                driver.execute_script("window.scrollTo(0, 0)")
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
            finally:
                driver.quit()
    finally:
        srv.stop()
    return out


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="screenshot of the explorer page with a real server")
    parser.add_argument("--screenshot", required=True, metavar="PNG", help="where to write it (e.g. docs/explorer.png)")
    parser.add_argument("--model", default=None, help="model name or directory (default: the embedded default)")
    parser.add_argument("--example", default="crescent", help="bundled example to open (default crescent)")
    parser.add_argument("--layer", default="conv5", help="layer tab to open (default conv5)")
    args = parser.parse_args()
    from PIL import Image
    path = take_screenshot(Path(args.screenshot), args.model, args.example, args.layer)
    with Image.open(path) as shot:
        print(f"wrote {path} ({shot.width}x{shot.height})")
    sys.exit(0)
