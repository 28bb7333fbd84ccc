"""Triton kernels vs their eager references (issue 4).

On a CPU host the kernels run in Triton's interpreter (tiny shapes keep this file fast); on a CUDA host the
same tests run the compiled kernels, and the ``gpu`` tests add full-size, determinism and poisoned-buffer
checks. Inputs are fresh random draws; "integer" inputs (small integers, weights in quarters) make every
conv sum exact in any order and in fp16/bf16/tf32, so values and switches must match bit for bit and ties
(ReLU zeros, repeated sums) are frequent.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before anything imports triton (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from zfserve.errors import InvalidArgumentError  # noqa: E402
from zfserve.kernels import (  # noqa: E402
    conv1_relu_pool,
    conv1_relu_pool_reference,
    max_pool_with_switches,
    ops,
    pooled_size,
    switches_from_indices,
    unpool_sum,
    unpool_sum_reference,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32,) + HALF
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
TF32_TOL = 3e-3

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="triton is not installed")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _integer_conv_inputs(shape, c_out=96, seed=0, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randint(-2, 3, shape, generator=g).float()
    x[..., : shape[-2] // 2, :] = x[..., :1, :1]  # a flat top half: equal positive sums tie too
    w = torch.randint(-2, 3, (c_out, shape[1], 7, 7), generator=g).float() / 4
    b = torch.randint(-4, 5, (c_out,), generator=g).float() / 4
    return [t.to(dtype).to(DEVICE) for t in (x, w, b)]


def _random_conv_inputs(shape, c_out=96, seed=0, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(shape, generator=g)
    w = torch.randn(c_out, shape[1], 7, 7, generator=g) * 0.1
    b = torch.randn(c_out, generator=g) * 0.1
    return [t.to(dtype).to(DEVICE) for t in (x, w, b)]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def _fp32_tol() -> float:
    return TF32_TOL if CUDA and torch.backends.cudnn.allow_tf32 else REL_TOL[torch.float32]


def _assert_switches_pick_a_max(switches, ref_conv, ref_pooled, tol):
    """Where rounding may reorder near-ties, the chosen position must hold a maximum of the reference."""
    chosen = ref_conv_at_switches(ref_conv, switches)
    gap = (ref_pooled.double() - chosen).abs()
    assert gap.max().item() <= tol * ref_pooled.double().abs().max().item()


def ref_conv_at_switches(conv: torch.Tensor, switches: torch.Tensor) -> torch.Tensor:
    """conv values at the positions the switches point to (via the int64 indices they stand for)."""
    from zfserve.kernels import indices_from_switches
    conv = conv.double().cpu()
    padded = F.pad(conv, (0, 2, 0, 2))  # ceil-mode windows may not point past the map, but stay in bounds
    idx = indices_from_switches(switches.cpu(), padded.shape[-1])
    return padded.flatten(-2).gather(-1, idx.flatten(-2)).view(switches.shape)


# ------------------------------------------------------------------------------- GPU constraints, statically
def test_configs_meet_gpu_constraints():
    """The interpreter accepts what the GPU rejects: check dot sizes and power-of-two ranges ourselves."""
    from zfserve.kernels import triton_conv1, triton_unpool

    def pow2(v):
        return v > 0 and v & (v - 1) == 0

    assert triton_conv1.packed_rows(3 * 7 * 7) == 256
    for interpret in (False, True):
        confs = triton_conv1.configs(interpret)
        assert len(confs) == 1 if interpret else len(confs) > 1  # one config under the interpreter
        for conf in confs:
            kw = conf.kwargs
            assert pow2(kw["BLOCK_W"]) and kw["BLOCK_W"] >= 16  # the dot's M
            assert pow2(kw["BLOCK_N"]) and kw["BLOCK_N"] >= 16  # the dot's N
            assert pow2(kw["BLOCK_K"]) and 16 <= kw["BLOCK_K"] <= 128  # the dot's K; packed rows cover it
            assert triton_conv1.CHANNEL_PAD % kw["BLOCK_N"] == 0  # packed weights need no mask
            assert kw["ROWS"] >= 1
        for conf in triton_unpool.configs(interpret):
            assert pow2(conf.kwargs["BLOCK_H"])
    assert any(-(-147 // c.kwargs["BLOCK_K"]) * c.kwargs["BLOCK_K"] == 160 for c in triton_conv1.configs(False))
    for out_w in (3, 13, 26, 55, 110, 111, 300):
        assert pow2(triton_unpool.block_width(out_w))
    packed = triton_conv1.pack_weight(torch.randn(96, 3, 7, 7, generator=_gen(1)), torch.float16)
    assert packed.shape == (256, 128) and packed.dtype == torch.float16
    assert not packed[147:].any() and not packed[:, 96:].any()


# ------------------------------------------------------------------------------------------- fused conv1
# (N, C, H, W): conv outputs 10x13 (even height: the last window overhangs) in every dtype; then batch 2
# with 11x8, and a width whose 17 pooled columns need two 16-wide strips in the interpreter's config.
CONV_CASES = [((1, 3, 23, 29), dtype) for dtype in ALL_DTYPES] + [
    ((2, 3, 25, 19), torch.float32), ((1, 3, 11, 70), torch.float32)]


@pytest.mark.parametrize("shape, dtype", CONV_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v).replace("torch.", ""))
def test_conv1_exact_on_integer_inputs_with_ties(shape, dtype):
    x, w, b = _integer_conv_inputs(shape, seed=sum(shape), dtype=dtype)
    pooled, switches, conv = conv1_relu_pool(x, w, b, return_conv=True, backend="triton")
    ref_pooled, ref_switches, ref_conv = conv1_relu_pool_reference(x.cpu(), w.cpu(), b.cpu(), return_conv=True)
    assert pooled.dtype == dtype and switches.dtype == torch.int8 and conv.dtype == dtype
    assert torch.equal(conv.cpu(), ref_conv)
    assert torch.equal(pooled.cpu(), ref_pooled)
    assert torch.equal(switches.cpu(), ref_switches)
    # The test must exercise the tie rule: windows whose max occurs more than once.
    windows = F.unfold(ref_conv.float().flatten(0, 1)[:, None], 3, stride=2)  # complete windows only
    ties = (windows == windows.max(dim=1, keepdim=True).values).sum(dim=1) > 1
    assert ties.float().mean() > 0.05
    if shape[0] == 2:  # the pooled-only mode computes the same thing
        p2, s2 = conv1_relu_pool(x, w, b, backend="triton")
        assert torch.equal(p2, pooled) and torch.equal(s2, switches)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_conv1_random_inputs_against_fp64(dtype):
    x, w, b = _random_conv_inputs((1, 3, 17, 21), seed=7, dtype=dtype)
    pooled, switches, conv = conv1_relu_pool(x, w, b, return_conv=True, backend="triton")
    ref_pooled, _, ref_conv = conv1_relu_pool_reference(x.cpu().double(), w.cpu().double(), b.cpu().double(),
                                                        return_conv=True)
    tol = _fp32_tol() if dtype == torch.float32 else REL_TOL[dtype]
    assert _rel_err(conv, ref_conv) < tol
    assert _rel_err(pooled, ref_pooled) < tol
    assert switches.min() >= 0 and switches.max() <= 8
    _assert_switches_pick_a_max(switches, ref_conv, ref_pooled, 4 * tol)
    # Exactly consistent with its own conv output: the pool part adds no error of its own.
    own_pooled, own_switches = max_pool_with_switches(conv.float())
    assert torch.equal(own_pooled.to(dtype), pooled) and torch.equal(own_switches, switches)


def _conv_candidates():
    """Every autotune candidate (the autotuner may pick any); under the interpreter, its single config
    (used by every other test here) with the GPU candidates' K chunking instead: 32 (K padded to 160), and
    the dot's minimum, 16, with two channel blocks of 64 (the second one masked past 96)."""
    import triton

    from zfserve.kernels import triton_conv1
    if not triton_conv1.INTERPRET:
        return triton_conv1.CONFIGS
    (conf,) = triton_conv1.CONFIGS
    return [triton.Config({**conf.kwargs, "BLOCK_K": block_k, "BLOCK_N": block_n}, num_warps=conf.num_warps,
                          num_stages=1) for block_k, block_n in ((32, 128), (16, 64))]


@pytest.mark.parametrize("index", range(len(_conv_candidates())))
def test_conv1_every_config_is_exact(index):
    from zfserve.kernels import triton_conv1
    config = _conv_candidates()[index]
    x, w, b = _integer_conv_inputs((1, 3, 23, 29), seed=17, dtype=torch.float16)
    pooled, switches, conv = triton_conv1.conv1_relu_pool_triton(x, w, b, return_conv=True, config=config)
    ref_pooled, ref_switches, ref_conv = conv1_relu_pool_reference(x.cpu(), w.cpu(), b.cpu(), return_conv=True)
    assert torch.equal(conv.cpu(), ref_conv), config
    assert torch.equal(pooled.cpu(), ref_pooled) and torch.equal(switches.cpu(), ref_switches), config


def test_conv1_nan_propagates_like_pytorch():
    x, w, b = _integer_conv_inputs((1, 3, 23, 29), seed=3)
    x[0, 1, 9, 13] = float("nan")
    pooled, switches = conv1_relu_pool(x, w, b, backend="triton")
    ref_pooled, ref_switches = conv1_relu_pool_reference(x.cpu(), w.cpu(), b.cpu())
    assert torch.isnan(ref_pooled).any()
    assert torch.equal(torch.isnan(pooled.cpu()), torch.isnan(ref_pooled))
    assert torch.equal(pooled.cpu().nan_to_num(-1.0), ref_pooled.nan_to_num(-1.0))
    assert torch.equal(switches.cpu(), ref_switches)


def test_conv1_weight_cache_follows_in_place_updates():
    x, w, b = _integer_conv_inputs((1, 3, 15, 15), seed=11)
    first, _ = conv1_relu_pool(x, w, b, backend="triton")
    with torch.no_grad():
        w.mul_(-1)  # same tensor, new version: the packed copy must be rebuilt
    second, _ = conv1_relu_pool(x, w, b, backend="triton")
    assert torch.equal(second.cpu(), conv1_relu_pool_reference(x.cpu(), w.cpu(), b.cpu())[0])
    assert not torch.equal(first, second)


# ------------------------------------------------------------------------------------------- unpool
def _random_switches(ph, pw, out_h, out_w, planes, g):
    """Random window offsets that stay inside the output, plus one position chosen by all four windows."""
    dy = torch.randint(0, 3, (planes, ph, pw), generator=g)
    dx = torch.randint(0, 3, (planes, ph, pw), generator=g)
    dy = torch.minimum(dy, out_h - 1 - 2 * torch.arange(ph).view(ph, 1))
    dx = torch.minimum(dx, out_w - 1 - 2 * torch.arange(pw).view(1, pw))
    sw = (3 * dy + dx).to(torch.int8)
    sw[:, 0, 0], sw[:, 0, 1], sw[:, 1, 0], sw[:, 1, 1] = 8, 6, 2, 0  # all at output (2, 2)
    sw[:, -1, -2], sw[:, -1, -1] = 2, 0  # two windows at (2 * (ph - 1), 2 * (pw - 1))
    return sw


def _shared_counts(switches, out_size):
    ones = torch.ones(switches.shape, dtype=torch.float64)
    return unpool_sum_reference(ones, switches.cpu(), out_size)


# output sizes of pool1 (110), a 55 map, pool2 (26) and pool5 (13), and odd/even mixes
UNPOOL_SIZES = [(110, 110), (55, 55), (26, 26), (13, 13), (26, 13), (7, 10)]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("out_size", UNPOOL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_unpool_equals_aten_backward_exactly(out_size, relu):
    out_h, out_w = out_size
    ph, pw = pooled_size(out_h), pooled_size(out_w)
    g = _gen(out_h * 1000 + out_w)
    pooled = torch.randn(1, 2, ph, pw, generator=g)
    switches = _random_switches(ph, pw, out_h, out_w, 2, g).view(1, 2, ph, pw)
    counts = _shared_counts(switches, out_size)
    assert (counts == 4).any() and (counts == 2).any()  # positions shared by 2 and by 4 windows
    dense = unpool_sum(pooled.to(DEVICE), switches.to(DEVICE), out_size, relu=relu, backend="triton")
    ref = unpool_sum_reference(pooled, switches, out_size, relu=relu)
    assert dense.shape == (1, 2, out_h, out_w)
    assert torch.equal(dense.cpu(), ref)


def test_unpool_is_the_adjoint_of_max_pool():
    """Independent oracle: autograd through max_pool2d, with ties, on switches from a real pool."""
    g = _gen(5)
    x = torch.randint(0, 3, (1, 3, 26, 27), generator=g).double().requires_grad_()
    pooled, indices = F.max_pool2d(x, 3, 2, ceil_mode=True, return_indices=True)
    grad_out = torch.randn(pooled.shape, generator=g, dtype=torch.float64)
    (grad_in,) = torch.autograd.grad(pooled, x, grad_out)
    switches = switches_from_indices(indices, x.shape[-1])
    assert (_shared_counts(switches, (26, 27)) >= 2).any()
    dense = unpool_sum(grad_out.float().to(DEVICE), switches.to(DEVICE), (26, 27), backend="triton")
    assert torch.allclose(dense.cpu().double(), grad_in, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_unpool_half_precision(dtype):
    """Half inputs accumulate in fp32 and round once: equal to the fp32 reference rounded."""
    g = _gen(9)
    pooled = torch.randn(1, 2, 13, 13, generator=g).to(dtype)
    switches = _random_switches(13, 13, 26, 26, 2, g).view(1, 2, 13, 13)
    dense = unpool_sum(pooled.to(DEVICE), switches.to(DEVICE), (26, 26), relu=True, backend="triton")
    ref = unpool_sum_reference(pooled.float(), switches, (26, 26), relu=True).to(dtype)
    assert dense.dtype == dtype
    assert torch.equal(dense.cpu(), ref)


def test_unpool_any_leading_shape():
    g = _gen(13)
    pooled = torch.randn(3, 6, 6, generator=g)  # (C, PH, PW): pool5-like, no batch axis
    switches = _random_switches(6, 6, 13, 13, 3, g)
    dense = unpool_sum(pooled.to(DEVICE), switches.to(DEVICE), (13, 13), backend="triton")
    assert torch.equal(dense.cpu(), unpool_sum(pooled, switches, (13, 13), backend="torch"))


# ------------------------------------------------------------------------------------------- dispatch
def test_auto_uses_reference_on_cpu(monkeypatch):
    def no_kernel(name):
        raise AssertionError(f"auto on CPU must not load {name}")

    monkeypatch.setattr(ops, "_kernel_module", no_kernel)
    x, w, b = _random_conv_inputs((1, 3, 15, 15), seed=2)
    x, w, b = x.cpu(), w.cpu(), b.cpu()
    pooled, switches = conv1_relu_pool(x, w, b)
    ref_pooled, ref_switches = conv1_relu_pool_reference(x, w, b)
    assert torch.equal(pooled, ref_pooled) and torch.equal(switches, ref_switches)
    dense = unpool_sum(pooled, switches, (6, 6), relu=True)
    assert torch.equal(dense, unpool_sum_reference(pooled, switches, (6, 6), relu=True))


def test_forced_backends_route(monkeypatch):
    calls = []
    real = ops._kernel_module

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(ops, "_kernel_module", spy)
    x, w, b = _integer_conv_inputs((1, 3, 15, 15), seed=4)
    conv1_relu_pool(x, w, b, backend="torch")
    assert calls == []
    pooled, switches = conv1_relu_pool(x, w, b, backend="triton")
    assert calls == ["triton_conv1"]
    unpool_sum(pooled[:, :2], switches[:, :2], (6, 6), backend="triton")
    assert calls == ["triton_conv1", "triton_unpool"]


def test_backend_errors(monkeypatch):
    x, w, b = _random_conv_inputs((1, 3, 15, 15), seed=2)
    with pytest.raises(InvalidArgumentError) as err:
        conv1_relu_pool(x, w, b, backend="cuda")
    assert err.value.field == "backend" and "auto" in str(err.value)
    with pytest.raises(InvalidArgumentError) as err:
        conv1_relu_pool(x.double(), w.double(), b.double(), backend="triton")
    assert err.value.field == "dtype"
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    with pytest.raises(InvalidArgumentError, match="needs the triton package") as err:
        conv1_relu_pool(x, w, b, backend="triton")
    assert err.value.field == "backend"
    pooled, switches = conv1_relu_pool(x, w, b)  # auto still works: the reference, on x's device
    assert torch.equal(pooled, conv1_relu_pool_reference(x, w, b)[0])


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    x, w, b = _random_conv_inputs((1, 3, 15, 15), seed=2)
    with pytest.raises(InvalidArgumentError, match="TRITON_INTERPRET") as err:
        conv1_relu_pool(x.cpu(), w.cpu(), b.cpu(), backend="triton")
    assert err.value.field == "backend"


@pytest.mark.parametrize("call, field", [
    (lambda x, w, b: conv1_relu_pool(x[0], w, b), "x"),
    (lambda x, w, b: conv1_relu_pool(x[:, :2], w, b), "x"),
    (lambda x, w, b: conv1_relu_pool(x[..., :8, :8], w, b), "x"),
    (lambda x, w, b: conv1_relu_pool(x, w, b[:5]), "bias"),
    (lambda x, w, b: conv1_relu_pool(x, w[..., :5], b), "weight"),
    (lambda x, w, b: unpool_sum(x, x.to(torch.int64), (30, 30)), "switches"),
    (lambda x, w, b: unpool_sum(x, x.to(torch.int8), (40, 30)), "output_size"),
    (lambda x, w, b: unpool_sum(x, x.to(torch.int8), "big"), "output_size"),
])
def test_invalid_arguments_name_the_field(call, field):
    x, w, b = _random_conv_inputs((1, 3, 15, 15), seed=2)
    with pytest.raises(InvalidArgumentError) as err:
        call(x, w, b)
    assert err.value.field == field


def test_import_without_triton():
    """A CPU-only install (extras ``cpu``) has no triton: importing and the reference path must work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from zfserve.errors import InvalidArgumentError\n"
        "import zfserve.kernels as k, zfserve.model\n"
        "x = torch.randn(1, 3, 15, 15); w = torch.randn(96, 3, 7, 7); b = torch.randn(96)\n"
        "p, s = k.conv1_relu_pool(x, w, b)\n"
        "assert not k.triton_available()\n"
        "try:\n"
        "    k.conv1_relu_pool(x, w, b, backend='triton')\n"
        "except InvalidArgumentError as e:\n"
        "    print('refused', e.field)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused backend"


# ------------------------------------------------------------------------------------------- GPU only
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype, tf32", [(torch.float32, False), (torch.float32, True), (torch.float16, False),
                                         (torch.bfloat16, False)], ids=["fp32", "tf32", "fp16", "bf16"])
def test_gpu_conv1_full_size_against_fp64(dtype, tf32, monkeypatch):
    from zfserve.kernels import triton_conv1
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    x, w, b = _random_conv_inputs((4, 3, 224, 224), seed=21, dtype=dtype)
    poison = (torch.full((4, 96, 55, 55), float("nan"), dtype=dtype, device="cuda"),
              torch.full((4, 96, 55, 55), 127, dtype=torch.int8, device="cuda"),
              torch.full((4, 96, 110, 110), float("nan"), dtype=dtype, device="cuda"))
    pooled, switches, conv = triton_conv1.conv1_relu_pool_triton(x, w, b, return_conv=True, out=poison)
    assert not torch.isnan(pooled).any() and not torch.isnan(conv).any()
    assert switches.min() >= 0 and switches.max() <= 8
    ref_pooled, _, ref_conv = conv1_relu_pool_reference(x.cpu().double(), w.cpu().double(), b.cpu().double(),
                                                        return_conv=True)
    tol = TF32_TOL if tf32 else REL_TOL[dtype]
    assert _rel_err(conv, ref_conv) < tol
    assert _rel_err(pooled, ref_pooled) < tol
    _assert_switches_pick_a_max(switches, ref_conv, ref_pooled, 4 * tol)
    own_pooled, own_switches = max_pool_with_switches(conv)
    assert torch.equal(own_pooled, pooled) and torch.equal(own_switches, switches)
    again = conv1_relu_pool(x, w, b, backend="triton")
    assert torch.equal(again[0], pooled) and torch.equal(again[1], switches)


@gpu
def test_gpu_conv1_exact_on_integer_inputs_full_size():
    x, w, b = _integer_conv_inputs((3, 3, 224, 224), seed=22, dtype=torch.float16)
    pooled, switches = conv1_relu_pool(x, w, b)  # auto -> Triton on CUDA
    ref_pooled, ref_switches = conv1_relu_pool_reference(x.cpu(), w.cpu(), b.cpu())
    assert torch.equal(pooled.cpu(), ref_pooled) and torch.equal(switches.cpu(), ref_switches)


@gpu
@pytest.mark.parametrize("out_size", [(110, 110), (26, 26), (13, 13)], ids=str)
def test_gpu_unpool_full_size_deterministic_and_complete(out_size):
    from zfserve.kernels import triton_unpool
    out_h, out_w = out_size
    ph, pw = pooled_size(out_h), pooled_size(out_w)
    g = _gen(31)
    x = torch.randn(8, 96, out_h, out_w, generator=g, device="cpu").cuda()
    pooled, switches = max_pool_with_switches(x)
    poisoned = torch.full((8, 96, out_h, out_w), float("nan"), device="cuda")
    dense = triton_unpool.unpool_sum_triton(pooled, switches, out_size, relu=True, out=poisoned)
    assert not torch.isnan(dense).any()
    ref = unpool_sum_reference(pooled, switches, out_size, relu=True)  # aten's backward, on the GPU
    assert torch.equal(dense, ref)
    assert torch.equal(dense.cpu(), unpool_sum_reference(pooled.cpu(), switches.cpu(), out_size, relu=True))
    for _ in range(5):  # bit-identical run to run (no atomics)
        assert torch.equal(unpool_sum(pooled, switches, out_size, relu=True), dense)
    for config in triton_unpool.CONFIGS:  # the autotuner may pick any candidate
        poisoned.fill_(float("nan"))
        again = triton_unpool.unpool_sum_triton(pooled, switches, out_size, relu=True, out=poisoned, config=config)
        assert torch.equal(again, ref), config
    assert (ph, pw) == pooled.shape[-2:]


@gpu
def test_gpu_auto_and_torch_backends_on_cuda(monkeypatch):
    x, w, b = _integer_conv_inputs((1, 3, 31, 31), seed=23)
    calls = []
    real = ops._kernel_module
    monkeypatch.setattr(ops, "_kernel_module", lambda name: calls.append(name) or real(name))
    conv1_relu_pool(x, w, b, backend="torch")
    assert calls == []
    conv1_relu_pool(x, w, b)
    assert calls == ["triton_conv1"]


@gpu
def test_gpu_model_trace_uses_fused_conv1():
    from zfserve.model import ZFNet
    model = ZFNet(num_classes=10, fc_width=64).eval()
    x = torch.randn(2, 3, 224, 224, generator=_gen(41))
    with torch.no_grad():
        cpu = model.trace(x, layers=("conv1", "pool1", "fc8"), switches=True)
        model.cuda()
        calls = []
        real = ops._kernel_module
        ops._kernel_module = lambda name: calls.append(name) or real(name)
        try:
            gpu_trace = model.trace(x.cuda(), layers=("conv1", "pool1", "fc8"), switches=True)
        finally:
            ops._kernel_module = real
    assert "triton_conv1" in calls
    assert _rel_err(gpu_trace.activations["pool1"], cpu.activations["pool1"]) < TF32_TOL
    assert _rel_err(gpu_trace.activations["conv1"], cpu.activations["conv1"]) < TF32_TOL
    _assert_switches_pick_a_max(gpu_trace.switches["pool1"], cpu.activations["conv1"], cpu.activations["pool1"],
                                4 * TF32_TOL)
