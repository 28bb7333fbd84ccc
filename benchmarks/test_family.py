"""Full-size VGG16 (imported from a torchvision-layout state dict, random He-scaled weights): deconv and exact
occlusion, ours vs Captum in the same process, on the same inputs, correctness checked before any timing.

- deconv: for the last conv of every block (conv1_2, conv2_2, conv3_3, conv4_3, conv5_3), the 9 strongest units
  of one image. Each projection is checked against autograd's deconvnet rule on the independent reference
  network of ``tests/torchvision_reference.py`` (relative error <= 1e-5); then ours (all 9 in one pass,
  ``DeconvEngine.project``) against Captum ``NeuronDeconvolution`` called once per unit (as Captum is used),
  5 rounds each, alternating (so load from other work falls on both alike), medians of wall-clock time and of
  the process's CPU time (the latter moves less with other work on the machine). Also the arithmetic both sides
  do, in multiply-adds (load-free): ours one forward to the layer plus each unit's transposed convolutions on its
  window; Captum per unit a forward through the network plus the input gradient from the layer down. Their ratio
  bounds what an exact dense walk can gain at equal efficiency.
- occlusion: window 32, stride 16 (13 x 13 = 169 positions), the mean fill (0), probability of the unoccluded
  top-1. Ours (``OcclusionEngine``, exact incremental) against Captum ``Occlusion(softmax(model))`` at each of
  ``perturbations_per_eval`` 16 / 32 / 64 on the whole sweep (its best is the baseline); ours runs before, between
  and after (median). Captum's attribution is occlude-and-forward, i.e. brute force: ours must equal it within
  1e-5 before the figures are printed.

    .venv/bin/pytest benchmarks/test_family.py -q -s --benchmark-json out.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # the tests' reference networks
from torchvision_reference import deconv_reference, named_slots, randomize, reference  # noqa: E402

from zfserve.engine.deconv import DeconvEngine, captum_model  # noqa: E402
from zfserve.engine.occlusion import OcclusionEngine  # noqa: E402
from zfserve.import_torchvision import import_torchvision  # noqa: E402
from zfserve.weights import load_model  # noqa: E402

captum_attr = pytest.importorskip("captum.attr")

BLOCK_LAYERS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
WINDOW, STRIDE = 32, 16
ROUNDS = 5
PPE = (16, 32, 64)


@pytest.fixture(scope="module")
def vgg16(tmp_path_factory):
    """(reference network, our imported model, one image in torchvision's units)."""
    root = tmp_path_factory.mktemp("vgg16")
    net = randomize(reference("vgg16", 1000), seed=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "vgg16.safetensors"))
    (root / "classes.txt").write_text("".join(f"class {i}\n" for i in range(1000)))
    model = load_model(import_torchvision(root / "vgg16.safetensors", "vgg16", root / "classes.txt", root / "m"))
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return net, model, image


def multiply_adds(model, layer: str, units: int) -> tuple[float, float]:
    """(ours, Captum's) multiply-adds for ``units`` units of ``layer``: see the module's note."""
    chain = model.layer_chain()
    top = [g.name for g in chain].index(layer)
    conv = lambda g: g.out_size ** 2 * g.in_channels * g.out_channels * g.kernel ** 2  # noqa: E731
    forward_to_layer = sum(conv(g) for g in chain[:top + 1] if g.kind == "conv")
    walk, width = 0, 1
    for g in reversed(chain[:top + 1]):
        if g.kind == "conv":   # the transposed conv reads the window (width x width) and writes the one below
            walk += width ** 2 * g.in_channels * g.out_channels * g.kernel ** 2
        width = (width - 1) * g.stride + g.kernel
    fc = sum(p.numel() for name, p in model.named_parameters() if name.startswith("fc") and name.endswith("weight"))
    whole_forward = sum(conv(g) for g in chain if g.kind == "conv") + fc
    return forward_to_layer + units * walk, units * (whole_forward + forward_to_layer)


def _median(fn, rounds: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@pytest.mark.parametrize("layer", BLOCK_LAYERS)
def test_vgg16_deconv_vs_captum(benchmark, vgg16, layer):
    net, model, image = vgg16
    engine = DeconvEngine(model)
    ours = lambda: engine.project(image, layer, top_k=9, seed="one")   # noqa: E731
    units = ours()
    ref, _ = deconv_reference(net, image, named_slots(net)[layer], [(0, u.channel, u.y, u.x) for u in units])
    errors = [float((torch.from_numpy(u.projection) - ref[i]).norm() / ref[i].norm()) for i, u in enumerate(units)]
    assert max(errors) <= 1e-5, errors
    twin = captum_model(model)
    deconv = captum_attr.NeuronDeconvolution(twin, getattr(twin, layer))
    captum = lambda: [deconv.attribute(image, neuron_selector=(u.channel, u.y, u.x)) for u in units]  # noqa: E731
    theirs = torch.cat(captum())
    mine = torch.stack([torch.from_numpy(u.projection) for u in units])
    captum_error = float(((mine - theirs).flatten(1).norm(dim=1) / theirs.flatten(1).norm(dim=1)).max())
    assert captum_error <= 1e-5
    ours_runs, captum_runs, ours_cpu, captum_cpu = [], [], [], []
    for _ in range(ROUNDS):   # alternating, so that a burst of load from elsewhere falls on both
        for fn, wall, cpu in ((captum, captum_runs, captum_cpu), (ours, ours_runs, ours_cpu)):
            started = time.process_time()
            wall.append(_median(fn, 1)[0])
            cpu.append(time.process_time() - started)
    captum_s, ours_s = statistics.median(captum_runs), statistics.median(ours_runs)
    cpu_ratio = statistics.median(captum_cpu) / statistics.median(ours_cpu)
    ours_macs, captum_macs = multiply_adds(model, layer, len(units))
    benchmark.pedantic(ours, rounds=1, iterations=1)   # the JSON record of one more run of ours
    benchmark.extra_info.update(layer=layer, units=len(units), max_relative_error_vs_autograd=max(errors),
                                max_relative_error_vs_captum=captum_error, captum_median_s=captum_s,
                                ours_median_s=ours_s, speedup=captum_s / ours_s, captum_runs_s=captum_runs,
                                ours_runs_s=ours_runs, captum_cpu_s=captum_cpu, ours_cpu_s=ours_cpu,
                                speedup_cpu_time=cpu_ratio, ours_gmac=ours_macs / 1e9,
                                captum_gmac=captum_macs / 1e9, arithmetic_ratio=captum_macs / ours_macs)
    print(f"\n[vgg16 deconv {layer}] 9 units: ours {ours_s:.3f} s (one pass), Captum NeuronDeconvolution "
          f"{captum_s:.3f} s (9 calls) -> {captum_s / ours_s:.1f}x (CPU time {cpu_ratio:.1f}x; arithmetic "
          f"{ours_macs / 1e9:.1f} vs {captum_macs / 1e9:.1f} GMAC, {captum_macs / ours_macs:.1f}x); largest error "
          f"vs autograd {max(errors):.1e}, vs Captum {captum_error:.1e}")


def _captum_occlusion(model, image, ppe: int, target: int):
    occlusion = captum_attr.Occlusion(lambda x: torch.softmax(model(x), dim=1))
    with torch.no_grad():
        return occlusion.attribute(image, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, STRIDE, STRIDE),
                                   baselines=0.0, target=target, perturbations_per_eval=ppe)


def test_vgg16_occlusion_vs_captum(benchmark, vgg16):
    _, model, image = vgg16
    engine = OcclusionEngine(model)
    ours = lambda: engine.sweep(image[0], WINDOW, STRIDE)   # noqa: E731
    ours_s = [_median(ours, 1)[0]]
    result = ours()
    captum_s, theirs = {}, None
    for ppe in PPE:
        captum_s[ppe], attribution = _median(lambda: _captum_occlusion(model, image, ppe, result.target), 1)
        theirs = attribution if theirs is None else theirs
        ours_s.append(_median(ours, 1)[0])
    best = min(captum_s, key=captum_s.get)
    difference = float(np.abs(result.attribution - theirs[0, 0].numpy()).max())
    assert difference <= 1e-5   # equal to brute force (occlude and forward) before any figure is reported
    benchmark.pedantic(ours, rounds=1, iterations=1)
    ours_s.append(float(benchmark.stats.stats.median))
    median = statistics.median(ours_s)
    stages = {k: round(v, 3) for k, v in result.timings["stages_s"].items()}
    benchmark.extra_info.update(positions=len(result.starts) ** 2, ours_s=ours_s, ours_median_s=median,
                                captum_s={str(k): v for k, v in captum_s.items()}, captum_best_ppe=best,
                                speedup_vs_captum=captum_s[best] / median, max_abs_difference=difference,
                                backend=engine.backend, stages_s=stages)
    print(f"\n[vgg16 occlusion] {len(result.starts) ** 2} positions, window {WINDOW}, stride {STRIDE}, backend "
          f"{engine.backend}: ours median {median:.2f} s (runs {', '.join(f'{t:.2f}' for t in ours_s)}); Captum "
          f"Occlusion {', '.join(f'ppe {k}: {v:.2f} s' for k, v in captum_s.items())} -> best ppe {best}: "
          f"{captum_s[best] / median:.2f}x; largest attribution difference {difference:.1e}")
    print(f"  our stages (s, one run): {stages}")
