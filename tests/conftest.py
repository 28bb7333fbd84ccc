"""Shared test set-up: Triton's interpreter on CPU hosts, the ``gpu`` marker, small seeded fixtures."""

from __future__ import annotations

import os

import torch

# Must happen before anything imports triton: on a host without CUDA, kernels run under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The tests' own helper modules (torchvision_reference: AlexNet / VGG written from the published tables) import by
# name; under --import-mode=importlib the tests folder is not on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))

HAS_CUDA = torch.cuda.is_available()

# pytester lets a test run the hooks below on a throw-away test file.
pytest_plugins = ("pytester",)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded torch generator: fresh random inputs that are the same on every run."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def np_rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def make_model():
    """Factory for small ZFNets (paper conv widths, tiny classifier) in eval mode, seeded."""
    from zfserve.model import ZFNet

    def make(num_classes: int = 10, fc_width: int = 64, widths=(96, 256, 384, 384, 256), seed: int = 0):
        torch.manual_seed(seed)
        return ZFNet(num_classes=num_classes, fc_width=fc_width, widths=tuple(widths)).eval()

    return make


@pytest.fixture(scope="session")
def spread_model():
    """Factory: a ZFNet with He-scaled random weights and biases, fc8 scaled so the logits spread over a few
    units. Its probabilities are far from uniform and far from one-hot, so a 1e-5 comparison means something."""
    from zfserve.model import ZFNet

    def make(seed: int = 0, widths=(96, 256, 384, 384, 256), num_classes: int = 10, fc_width: int = 64):
        torch.manual_seed(seed)
        model = ZFNet(num_classes=num_classes, fc_width=fc_width, widths=tuple(widths)).eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                    module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=gen)
                    module.bias.normal_(0.0, 0.1, generator=gen)
            logits = model(torch.randn(4, 3, 224, 224, generator=gen) * 50)
            model.fc8.weight.mul_(3.0 / logits.std())
        return model

    return make


@pytest.fixture
def tiny_model(make_model):
    return make_model()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Injected into a copy of a page: after load, list every image with whether it loaded and its decoded width.
IMAGE_PROBE = ("<script>window.addEventListener('load',()=>{const r=[...document.images].map(i=>[i.getAttribute("
               "'src'),i.complete,i.naturalWidth]);const p=document.createElement('pre');p.id='zf-result';"
               "p.textContent=JSON.stringify(r);document.body.appendChild(p);});</script>")


@pytest.fixture
def page_images(tmp_path):
    """``page_images(path)``: open an offline HTML page in headless Chromium (Debian's package) and return its
    images as [src, complete, naturalWidth] after load, plus the rendered DOM. Skips without Chromium (fails with
    ZFSERVE_REQUIRE_BROWSER=1, as in CI)."""
    import html
    import json
    import re
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        reason = "chromium is not installed (Debian package 'chromium'); CI installs it"
        if os.environ.get("ZFSERVE_REQUIRE_BROWSER"):   # CI: the page tests must run
            pytest.fail(reason)
        pytest.skip(reason)

    def load(path):
        check = path.with_name(f".check-{path.name}")
        check.write_text(path.read_text().replace("</body>", IMAGE_PROBE + "</body>"))
        run = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                              "--virtual-time-budget=10000", "--dump-dom", check.as_uri()],
                             capture_output=True, text=True, timeout=120)
        check.unlink()
        found = re.search(r'<pre id="zf-result">(.*?)</pre>', run.stdout, re.S)
        assert found, f"no result from chromium (rc {run.returncode}): {run.stderr[-2000:]}"
        return json.loads(html.unescape(found.group(1))), run.stdout

    return load
