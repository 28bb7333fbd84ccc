"""Training: the loss goes down, filters stay within the RMS radius, resume is bit-identical, DDP (2 gloo
processes) computes the same updates as one process, eval reports accuracy, the CLI rejects bad values.

Tiny configurations: paper conv widths, fc width 32, synthetic images downsampled to 72 with 64 crops.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zfserve.errors import InvalidArgumentError
from zfserve.weights import load_model
from zfserve.evaluate import accuracy_report, predict_logits
from zfserve.train import TrainConfig, train
from zfserve.train.recipe import (conv1_lr_factor, crop_batch, init_weights, input_rms, load_data,
                                  scaled_evolution_epochs)
from zfserve.train.trainee import TrainingNet

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")   # ZFNet's, written out

TINY = dict(fc_width=32, resize=72, crop=64, train_n=44, val_n=22, batch_size=22, train_seed=5, val_seed=6)


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    return TrainConfig(out=str(tmp_path / name), **{**TINY, **kw})


def _weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "checkpoint" / "model.safetensors"))


def _max_rms(model) -> dict:
    return {name: float(getattr(model, name).weight.detach().pow(2).mean(dim=(1, 2, 3)).sqrt().max())
            for name in CONV_LAYERS}


@pytest.mark.parametrize("device, amp", [("cpu", "none"),
                                         pytest.param("cuda", "bf16", marks=pytest.mark.gpu, id="cuda-bf16")])
def test_steps_lower_the_loss(tmp_path, device, amp):
    # Adam + scaled init (the demo run's deviation) on a small set it can fit; dropout off for a clean signal.
    # On CUDA: the GPU-resident data, bf16 autocast and device-side running statistics.
    cfg = _cfg(tmp_path, epochs=8, train_n=22, batch_size=11, init="scaled", optimizer="adam", lr=1e-3,
               dropout=0.0, plateau_patience=100, cache_dir=str(tmp_path / "cache"), device=device, amp=amp)
    images, labels, _, _, classes = load_data(cfg)
    state = train(cfg, progress=False)
    model = load_model(cfg.out)
    # The same images through the model at init (rebuilt with the run's seed and input RMS) and after training.
    fresh = load_model(cfg.out)
    init_weights(fresh, "scaled", torch.Generator().manual_seed(cfg.seed),
                 input_rms(images, fresh.config.preprocess.mean_image))
    fresh.clip_filter_rms_(cfg.clip_radius)
    before = accuracy_report(predict_logits(fresh, images, fresh.config), labels, classes)["loss"]
    after = accuracy_report(predict_logits(model, images, model.config), labels, classes)["loss"]
    assert after < before * 0.9, (before, after)
    assert [h["epoch"] for h in state["history"]] == list(range(1, 9))
    assert max(_max_rms(model).values()) <= 0.1 + 1e-6
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["preprocess"]["mean"] == "image" and config["provenance"]["epochs"] == 8
    assert config["provenance"]["recipe"]["optimizer"] == "adam"
    mean = model.config.preprocess.mean_image
    assert mean.shape == (3, 72, 72)
    np.testing.assert_allclose(mean, images.astype(np.float64).mean(axis=0).transpose(2, 0, 1), atol=1e-4)


def test_clipping_keeps_filters_within_radius(tmp_path):
    # One Adam step of lr 5 moves every weight by ~5 (Adam's first step is lr * sign(gradient)), far past the
    # radius: the clipping is exercised, not vacuous, and no conv filter ends above 0.1.
    cfg = _cfg(tmp_path, epochs=1, init="paper", optimizer="adam", lr=5.0, max_steps_per_epoch=1,
               cache_dir=str(tmp_path / "cache"))
    train(cfg, progress=False)
    model = load_model(cfg.out)
    rms = _max_rms(model)
    assert max(rms.values()) <= 0.1 + 1e-6, rms
    assert rms["conv1"] > 0.1 - 1e-4, rms


def test_paper_init_and_clipping_rule():
    from zfserve.model import ZFNet
    model = ZFNet(num_classes=10, fc_width=64)
    init_weights(model, "paper", torch.Generator().manual_seed(0))
    for name in CONV_LAYERS + ("fc6", "fc7", "fc8"):
        layer = getattr(model, name)
        assert abs(float(layer.weight.detach().std()) - 0.01) < 0.001 and not layer.bias.any()
    with torch.no_grad():
        model.conv1.weight.mul_(50)     # RMS ~0.5 -> clipped back to 0.1, direction kept
    before = model.conv1.weight.detach().clone()
    model.clip_filter_rms_(0.1)
    rms = model.conv1.weight.detach().pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.1))
    cos = torch.nn.functional.cosine_similarity(before.flatten(1), model.conv1.weight.detach().flatten(1))
    assert float(cos.min()) > 1 - 1e-6


@pytest.mark.parametrize("fold", [{}, {"batchnorm": True, "tied_fc6": True}], ids=["plain", "batchnorm-tied-fc6"])
def test_resume_is_bit_identical(tmp_path, fold):
    cache = str(tmp_path / "cache")
    straight = _cfg(tmp_path, "straight", epochs=2, cache_dir=cache, **fold)
    train(straight, progress=False)
    split = _cfg(tmp_path, "split", epochs=1, cache_dir=cache, **fold)
    train(split, progress=False)
    split.epochs = 2
    state = train(split, resume=True, progress=False)
    assert state["epoch"] == 2
    a, b = _weights(straight.out), _weights(split.out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma = load_file(str(Path(straight.out) / "checkpoint" / "optimizer.safetensors"))
    mb = load_file(str(Path(split.out) / "checkpoint" / "optimizer.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    # The snapshots of the scaled paper epochs are kept for feature evolution.
    assert sorted(p.name for p in (Path(straight.out) / "snapshots").iterdir()) == \
        ["epoch_001.safetensors", "epoch_002.safetensors"]


def _spread_training_net(batchnorm: bool, tied_fc6: bool, seed: int = 0) -> TrainingNet:
    """A TrainingNet with He-scaled weights and random BN statistics and affines (so the fold is not trivial)."""
    from zfserve.model import ZFNet
    g = torch.Generator().manual_seed(seed)
    model = ZFNet(num_classes=11, fc_width=32)
    net = TrainingNet(model, batchnorm=batchnorm, tied_fc6=tied_fc6)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=g)
                module.bias.normal_(0.0, 0.1, generator=g)
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 3.0, generator=g)
                module.running_var.uniform_(0.5, 20.0, generator=g)
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.normal_(0.0, 0.5, generator=g)
        model.conv1.weight.div_(50.0)   # raw-pixel inputs
    return net.eval()


@pytest.mark.parametrize("batchnorm, tied_fc6", [(True, False), (False, True), (True, True)])
def test_training_net_exports_the_same_function_as_a_plain_zfnet(batchnorm, tied_fc6, generator):
    """BN folded into the convs and the tied fc6 expanded give a plain ZFNet equal to the training network."""
    from zfserve.model import ZFNet
    net = _spread_training_net(batchnorm, tied_fc6)
    exported = net.export()
    assert type(exported) is ZFNet and set(exported.state_dict()) == set(ZFNet(11, 32).state_dict())
    x = torch.randn(4, 3, 224, 224, generator=generator) * 60
    with torch.no_grad():
        want, got = net(x), exported(x)
    assert want.std() > 0.1   # logits that differ: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if tied_fc6:   # the expanded fc6 is the shared weight / positions, the same at every position
        w = exported.fc6.weight.view(32, 256, 36)
        torch.testing.assert_close(w, net.fc6.weight[:, :, None].expand(-1, -1, 36) / 36, rtol=0, atol=0)


def test_recalibrated_batchnorm_statistics_are_the_exact_averages(generator):
    from zfserve.train.trainee import recalibrate_batchnorm
    net = _spread_training_net(batchnorm=True, tied_fc6=False).train()
    batches = [torch.randn(3, 3, 224, 224, generator=generator) * 60 for _ in range(3)]
    recalibrate_batchnorm(net, batches)
    assert net.training and net.bn["conv1"].momentum == 0.1
    with torch.no_grad():
        outs = [net.model.conv1(x) for x in batches]
    want_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    want_var = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(net.bn["conv1"].running_mean, want_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(net.bn["conv1"].running_var, want_var, rtol=1e-4, atol=1e-4)


def test_training_with_batchnorm_and_tied_fc6_saves_the_folded_model(tmp_path):
    cfg = _cfg(tmp_path, epochs=2, batchnorm=True, tied_fc6=True, optimizer="adam", lr=1e-3, init="scaled",
               cache_dir=str(tmp_path / "cache"), snapshot_epochs=[2])
    state = train(cfg, progress=False)
    saved = load_model(cfg.out)                      # the model directory: a plain ZFNet
    ckpt = load_file(str(Path(cfg.out) / "checkpoint" / "model.safetensors"))
    assert "bn.conv1.running_var" in ckpt and "fc6.weight" in ckpt and ckpt["fc6.weight"].shape == (32, 256)
    net = TrainingNet(load_model(cfg.out), batchnorm=True, tied_fc6=True)
    net.load_state_dict({k: v for k, v in ckpt.items() if k != "mean_image"})
    _, _, val_images, val_labels, _ = load_data(cfg)
    want = predict_logits(net, val_images, saved.config)
    got = predict_logits(saved, val_images, saved.config)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # The validation numbers the run recorded are the saved model's.
    assert accuracy_report(got, val_labels, saved.config.class_names)["top1"] == \
        pytest.approx(state["history"][-1]["val_top1"])
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["provenance"]["recipe"]["batchnorm"] is True and config["provenance"]["recipe"]["tied_fc6"]
    snapshot = load_file(str(Path(cfg.out) / "snapshots" / "epoch_002.safetensors"))
    assert set(snapshot) == set(saved.state_dict())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    cache = str(tmp_path / "cache")
    single = _cfg(tmp_path, "single", epochs=1, dropout=0.0, cache_dir=cache)
    train(single, progress=False)
    args = ["--data", "synthetic", "--out", str(tmp_path / "ddp"), "--epochs", "1", "--dropout", "0",
            "--cache-dir", cache, "--quiet"]
    for key, value in TINY.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "zfserve.cli", "train", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _weights(single.out), _weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    history = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())["history"]
    assert history[0]["epoch"] == 1 and 0 <= history[0]["val_top1"] <= 1


def test_accuracy_report_matches_brute_force(generator):
    logits = torch.randn(40, 7, generator=generator)
    labels = torch.randint(0, 7, (40,), generator=generator).numpy()
    names = [f"c{i}" for i in range(7)]
    report = accuracy_report(logits, labels, names)
    order = np.argsort(-logits.numpy(), axis=1)
    assert report["top1"] == pytest.approx(np.mean(order[:, 0] == labels))
    assert report["top5"] == pytest.approx(np.mean([labels[i] in order[i, :5] for i in range(40)]))
    for c, name in enumerate(names):
        sel = labels == c
        if sel.any():
            assert report["per_class"][name] == pytest.approx(np.mean(order[sel, 0] == c))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_crop_batch_matches_slicing(generator, as_tensor):
    """The one-gather crop equals subtract-mean, slice, flip done image by image."""
    n, size, crop = 9, 40, 31
    images = torch.randint(0, 256, (n, size, size, 3), generator=generator, dtype=torch.uint8)
    mean = torch.rand(3, size, size, generator=generator) * 255
    offsets = torch.randint(0, size - crop + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    indices = torch.tensor([7, 2, 2, 0, 8, 5])
    source = images if as_tensor else images.numpy()
    got = crop_batch(source, indices, offsets, flips, mean, crop)
    for row, i in enumerate(indices.tolist()):
        oy, ox = offsets[i].tolist()
        want = (images[i].permute(2, 0, 1).float() - mean)[:, oy:oy + crop, ox:ox + crop]
        torch.testing.assert_close(got[row], want.flip(-1) if flips[i] else want, rtol=0, atol=0)


@pytest.mark.gpu
def test_crop_batch_on_cuda_equals_cpu(generator):
    images = torch.randint(0, 256, (6, 40, 40, 3), generator=generator, dtype=torch.uint8)
    mean = torch.rand(3, 40, 40, generator=generator) * 255
    offsets = torch.randint(0, 10, (6, 2), generator=generator)
    flips = torch.rand(6, generator=generator) < 0.5
    indices = torch.tensor([5, 0, 3])
    want = crop_batch(images.numpy(), indices, offsets, flips, mean, 31)
    got = crop_batch(images.cuda(), indices, offsets, flips, mean.cuda(), 31)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_erase_squares_zeroes_exactly_the_boxes(generator):
    from zfserve.train.recipe import erase_squares
    x = torch.randn(3, 3, 20, 20, generator=generator) + 5
    boxes = torch.tensor([[2, 3, 4], [0, 0, 0], [15, 10, 5]])
    got = erase_squares(x, boxes)
    want = x.clone()
    want[0, :, 2:6, 3:7] = 0
    want[2, :, 15:20, 10:15] = 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_erase_trains_and_is_recorded(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, erase=1.0, max_steps_per_epoch=1, cache_dir=str(tmp_path / "cache"))
    train(cfg, progress=False)
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["provenance"]["recipe"]["erase"] == 1.0


def test_conv1_lr_factor_is_the_unit_input_equivalent():
    """Scaled init: conv1 moves like a unit-RMS-input network's conv1 (SGD lr/r^2, Adam lr/r); paper init: 1."""
    assert conv1_lr_factor(TrainConfig(out="x", init="paper"), 64.0) == 1.0
    assert conv1_lr_factor(TrainConfig(out="x", init="scaled", optimizer="sgd"), 64.0) == pytest.approx(1 / 64 ** 2)
    assert conv1_lr_factor(TrainConfig(out="x", init="scaled", optimizer="adam"), 64.0) == pytest.approx(1 / 64)
    # SGD on raw inputs with lr/r^2 for conv1 == SGD on unit inputs (x / r) with conv1 weights r * w.
    g = torch.Generator().manual_seed(1)
    r, lr = 50.0, 0.1
    x = torch.randn(4, 3, 9, 9, generator=g) * r
    w = torch.randn(5, 3, 7, 7, generator=g) / r
    target = torch.randn(4, 5, 3, 3, generator=g)
    w_raw, w_unit = w.clone().requires_grad_(), (w * r).clone().requires_grad_()
    torch.nn.functional.mse_loss(torch.nn.functional.conv2d(x, w_raw), target).backward()
    torch.nn.functional.mse_loss(torch.nn.functional.conv2d(x / r, w_unit), target).backward()
    stepped_raw = w_raw - lr * conv1_lr_factor(TrainConfig(out="x", init="scaled", optimizer="sgd"), r) * w_raw.grad
    stepped_unit = w_unit - lr * w_unit.grad
    torch.testing.assert_close(stepped_raw * r, stepped_unit, rtol=1e-4, atol=1e-6)


def test_time_budget_stops_after_an_epoch_and_keeps_it(tmp_path):
    cfg = _cfg(tmp_path, epochs=3, max_minutes=1e-6, max_steps_per_epoch=1, snapshot_epochs=[3],
               cache_dir=str(tmp_path / "cache"))
    state = train(cfg, progress=False)
    assert state["epoch"] == 1 and "after epoch 1 of 3" in state["stopped"]
    assert (Path(cfg.out) / "snapshots" / "epoch_001.safetensors").is_file()
    config = json.loads((Path(cfg.out) / "config.json").read_text())
    assert config["provenance"]["stopped"] == state["stopped"]


def test_scaled_evolution_epochs():
    assert scaled_evolution_epochs(64) == [1, 2, 5, 10, 20, 30, 40, 64]
    assert scaled_evolution_epochs(6) == [1, 2, 3, 4, 6]
    assert scaled_evolution_epochs(1) == [1]


def test_cli_rejects_bad_values(tmp_path, capsys):
    from zfserve.cli import main
    assert main(["train", "--out", str(tmp_path / "x"), "--lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "lr" in err and "accepted" in err and "Traceback" not in err
    assert main(["eval", "--n", "0"]) == 2
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "0"]) == 2


def test_evolution_data_from_snapshots(tmp_path):
    from zfserve.paper.evolution import EVOLUTION_FILE, probe_inputs, write_evolution
    from zfserve.train.checkpoint import load_snapshot, snapshot_paths
    cfg = _cfg(tmp_path, epochs=2, snapshot_epochs=[1, 2], cache_dir=str(tmp_path / "cache"))
    train(cfg, progress=False)
    path = write_evolution(cfg.out, tmp_path / "model", probe_seed=7, probe_n=6, maps_per_layer=2, seed=3)
    assert path == tmp_path / "model" / EVOLUTION_FILE
    with np.load(path, allow_pickle=False) as npz:
        ev = {k: npz[k] for k in npz.files}
    assert ev["renders"].shape == (5, 2, 2, 64, 64, 3) and ev["renders"].dtype == np.uint8
    assert list(ev["epochs"]) == [1, 2] and list(ev["layers"]) == list(CONV_LAYERS)
    assert ev["maps"].shape == (5, 2) and ev["position"].shape == (5, 2, 2, 2)
    # Brute force: each recorded unit is its map's strongest activation over all probes and positions.
    model = load_model(cfg.out)
    probes = torch.from_numpy(probe_inputs(model.config, seed=7, n=6))
    for e, epoch in enumerate(ev["epochs"]):
        snap = load_snapshot(snapshot_paths(cfg.out)[int(epoch)], model.config)
        with torch.no_grad():
            acts = snap.trace(probes, layers=CONV_LAYERS, switches=False).activations
        for li, layer in enumerate(CONV_LAYERS):
            for mi, channel in enumerate(ev["maps"][li]):
                a = acts[layer][:, channel]
                n, (y, x) = ev["image_index"][li, mi, e], ev["position"][li, mi, e]
                assert float(a[n, y, x]) == pytest.approx(float(a.max()), rel=1e-5)
                assert ev["activation"][li, mi, e] == pytest.approx(float(a.max()), rel=1e-4, abs=1e-6)
    assert ev["renders"].std() > 0   # projections, not blank tiles


def test_conv1_weight_decay_shrinks_conv1_alone(tmp_path):
    """One step with the decay == the same step without it, then conv1 times (1 - lr x decay); nothing else moves."""
    common = dict(epochs=1, max_steps_per_epoch=1, batchnorm=True, optimizer="adam", lr=1e-3, warmup_steps=0,
                  cache_dir=str(tmp_path / "cache"))
    plain, decayed = _cfg(tmp_path, "plain", **common), _cfg(tmp_path, "decayed", conv1_weight_decay=400.0, **common)
    train(plain, progress=False)
    train(decayed, progress=False)
    a, b = _weights(plain.out), _weights(decayed.out)
    torch.testing.assert_close(b["model.conv1.weight"], a["model.conv1.weight"] * (1 - 1e-3 * 400.0))
    for key in a:
        if key != "model.conv1.weight" and "running_" not in key:   # BN statistics see the smaller conv1
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    config = json.loads((Path(decayed.out) / "config.json").read_text())
    assert config["provenance"]["recipe"]["conv1_weight_decay"] == 400.0


@pytest.mark.parametrize("value", [-0.1, 1000.0])
def test_conv1_weight_decay_range_is_checked(value):
    with pytest.raises(InvalidArgumentError, match="conv1_weight_decay"):
        TrainConfig(out="x", lr=1e-3, conv1_weight_decay=value).validate()
