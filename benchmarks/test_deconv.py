"""Deconvnet projection: ours (one forward per image, all units in one batched pass) vs Captum's
``NeuronDeconvolution`` (one call per unit, as its API requires), same model, same images, same units.

Model: paper conv widths with a tiny classifier (``ZFNet(num_classes=10, fc_width=64)``; the classifier
plays no part in a conv projection, and keeping it small keeps Captum's full forward from being charged for
fc6), He-scaled random weights so conv5 is alive. Workload: the top-9 maps of conv5 (and of conv3) for a
batch of 8 images = 72 units. Ratio = Captum median / ours median, printed and stored in ``extra_info``.

    .venv/bin/pytest benchmarks/test_deconv.py -q -s
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from zfserve.engine.deconv import DeconvEngine, captum_model
from zfserve.model import ZFNet

captum_attr = pytest.importorskip("captum.attr")

N_IMAGES, TOP_K = 8, 9
CUDA = torch.cuda.is_available()


def _model(device):
    torch.manual_seed(0)
    model = ZFNet(num_classes=10, fc_width=64).eval()
    with torch.no_grad():
        for name in model.conv_layers:
            conv = getattr(model, name)
            conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)
            conv.bias.normal_(0.0, 0.1)
    return model.to(device)


def _median_seconds(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compare(benchmark, layer, device, rounds):
    model = _model(device)
    images = torch.randn(N_IMAGES, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 50
    images = images.to(device)
    engine = DeconvEngine(model, device)
    units = engine.project(images, layer, top_k=TOP_K, seed="one")
    twin = captum_model(model)
    deconv = captum_attr.NeuronDeconvolution(twin, getattr(twin, layer))

    def ours():
        return engine.project(images, layer, top_k=TOP_K, seed="one")

    def captum():
        return [deconv.attribute(images[u.image_index:u.image_index + 1], neuron_selector=(u.channel, u.y, u.x))
                for u in units]

    # Same work: the two agree before either is timed.
    theirs = torch.cat(captum()).cpu()
    mine = torch.stack([torch.from_numpy(u.projection) for u in ours()])
    assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))

    captum_s = _median_seconds(captum, rounds)
    benchmark.pedantic(ours, rounds=rounds, warmup_rounds=1)
    ours_s = benchmark.stats.stats.median
    ratio = captum_s / ours_s
    benchmark.extra_info.update(layer=layer, device=str(device), units=len(units), captum_median_s=captum_s,
                                ours_median_s=ours_s, speedup=ratio)
    print(f"\n[deconv {layer} {device}] {len(units)} units: ours {ours_s * 1e3:.1f} ms, "
          f"Captum NeuronDeconvolution {captum_s * 1e3:.1f} ms, speedup {ratio:.1f}x (medians)")


@pytest.mark.parametrize("layer", ["conv5", "conv3"])
def test_deconv_cpu_vs_captum(benchmark, layer):
    _compare(benchmark, layer, "cpu", rounds=3)


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("layer", ["conv5", "conv3"])
def test_deconv_cuda_vs_captum(benchmark, layer):
    _compare(benchmark, layer, "cuda", rounds=10)
