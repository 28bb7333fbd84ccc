"""Fused conv1 + bias + ReLU + 3x3/2 ceil-mode max-pool with int8 switches, as one Triton kernel.

The oracle is :func:`zfserve.kernels.reference.conv1_relu_pool_reference`. This module imports triton at the
top: import it only through :mod:`zfserve.kernels.ops`, which guards the import.

Design (an implicit GEMM; its predicted costs and the offline sm_90 compile are in ``kernels/NOTES.md``):

* GEMM view of the convolution: M = output pixels, N = output channels (96), K = C_in * 7 * 7 = 147. With
  only 3 input channels, libraries that block K by channel waste most of the matrix unit; here K is
  flattened and reduced in BLOCK_K chunks (32: K padded 147 -> 160), each k decoded to (c, kh, kw) in
  registers, against weights pre-packed once as a zero-padded [K rounded up to 128, 128] matrix (96
  channels padded to 128 and masked at the store; rows past 147 zero).
* The input is zero-padded once on the host side (``F.pad``) far enough right and down that every read
  the kernel makes is in bounds: the im2col gather then needs no masks at all, which is most of its
  integer work.
* Pool fusion without shifting register tiles: one program owns one image, a strip of ``BLOCK_W`` pooled
  columns and ``ROWS`` consecutive pooled rows. For each pooled row it computes conv rows 2*ph+1 and 2*ph+2
  at columns 2*pw + {0, 1, 2} (the column dx=2 is recomputed: 1.5x the conv work) and carries the max of
  conv row 2*ph+2 in registers as the first row of the next window. Ties go to the first position in
  row-major order, NaN wins like in PyTorch, so switches are bit-identical to ``max_pool2d``'s.
* Values are rounded to the output dtype before they are compared: the reference pools the rounded
  activation, and comparing in fp32 could break ties differently.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import POOL_KERNEL, POOL_STRIDE, pooled_size

# The interpreter is chosen when @triton.jit runs, i.e. when this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

CHANNEL_PAD = 128  # packed weight columns: a multiple of every BLOCK_N below


def packed_rows(k_total: int) -> int:
    """Rows of the packed weight matrix: K rounded up to 128, so that every BLOCK_K <= 128 reads only
    packed (zero-padded) rows. The kernel reads ceil(K / BLOCK_K) * BLOCK_K of them: 160 for K = 147
    and BLOCK_K = 32."""
    return -(-k_total // 128) * 128


def configs(interpret: bool):
    """Autotune candidates; all BLOCK_* are powers of two >= 16 (tl.arange and tl.dot on the GPU)."""
    if interpret:
        # One config only: autotuning with several crashes on a CPU host. Small tiles and few K chunks keep
        # the interpreter (numpy, one program at a time, slow per op) fast, while the tests' shapes still
        # span several column strips and row blocks; tests run the GPU's K chunking separately.
        return [triton.Config({"BLOCK_W": 16, "BLOCK_N": 128, "BLOCK_K": 128, "ROWS": 4}, num_warps=4,
                              num_stages=1)]
    # 55 pooled columns at 224 input: BLOCK_W=64 is one strip (9 lanes idle), 32 is two. BLOCK_N=128
    # gathers the input once for all 96 channels; 64 gathers it twice with half the accumulator registers.
    # Four [BLOCK_W, BLOCK_N] fp32 tiles stay live across the K loop (window max/argmax, bottom-row
    # max/argmax) plus the accumulator: BLOCK_W*BLOCK_N/(32*num_warps) registers each. BLOCK_K=32 pads
    # K=147 to 160; num_stages pipelines the K loop's gathers.
    # Three candidates only: each is a compile on a fresh machine. Compiled offline for sm_90 (triton 3.6
    # and 3.9, fp16): 255 registers + ~0.5 KB spills, ~220 and no spills, 255 + ~0.5 KB (kernels/NOTES.md).
    shapes = [(64, 128, 32, 8, 8, 2), (32, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 2)]
    return [triton.Config({"BLOCK_W": bw, "BLOCK_N": bn, "BLOCK_K": bk, "ROWS": rows}, num_warps=warps,
                          num_stages=stages) for bw, bn, bk, rows, warps, stages in shapes]


CONFIGS = configs(INTERPRET)


@triton.jit
def round_to(v, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even like the GPU. The interpreter truncates fp32 -> bf16, so
    there the bits are rounded by hand."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(DTYPE)


@triton.jit
def _conv_value(x_img, r, dx: tl.constexpr, pw, pw_c, w_ptr, oc, bias, HWP, WP,
                conv_img, conv_oc, store_ok, OW, PW, OUT_DTYPE: tl.constexpr,
                STRIDE: tl.constexpr, KS: tl.constexpr, K_TOTAL: tl.constexpr, NPAD: tl.constexpr,
                BLOCK_K: tl.constexpr, RETURN_CONV: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """Conv + bias + ReLU at conv row ``r``, column 2*pw + dx of each window: a [BLOCK_W, BLOCK_N] fp32 tile
    holding values already rounded to the output dtype (the reference pools rounded values). With
    RETURN_CONV it is also written to the conv output (each conv pixel by exactly one (row, dx) visit)."""
    x_row = x_img + r * STRIDE * WP
    col_off = (2 * pw_c + dx) * STRIDE  # each lane's first input column
    acc = tl.zeros((pw.shape[0], oc.shape[0]), dtype=tl.float32)
    # Implicit im2col over K in BLOCK_K chunks: A[m, k] is the input under conv tap k for lane m, with
    # k -> (c, kh, kw) decoded in registers. Taps past K_TOTAL read element 0 of the image (finite
    # padding) against zero rows of the packed weights, and the input is pre-padded: no masks at all.
    for k0 in range(0, K_TOTAL, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_off = tl.where(k < K_TOTAL, (k // (KS * KS)) * HWP + ((k // KS) % KS) * WP + k % KS, 0)
        a = tl.load(x_row + (col_off[:, None] + k_off[None, :]))  # int32 offsets, one 64-bit base
        w = tl.load(w_ptr + k[:, None] * NPAD + oc[None, :])
        if UPCAST:  # the interpreter's half-precision dot is wrong (bf16) or slow: compute it in fp32
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    v = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    v = round_to(v, OUT_DTYPE, UPCAST).to(tl.float32)
    if RETURN_CONV:
        col = 2 * pw + dx
        if dx == 2:  # columns 2*pw and 2*pw+1 cover 0..2*PW-1; an odd width's last column comes from here
            col_ok = (pw == PW - 1) & (col < OW)
        else:
            col_ok = col < OW
        ptrs = conv_img + (conv_oc[None, :] + r * OW + col[:, None])
        tl.store(ptrs, v.to(OUT_DTYPE), mask=store_ok & col_ok[:, None])
    return v


@triton.jit
def _take(best, arg, v, ok, code):
    """Running max in scan order: strictly greater wins (ties stay with the first), NaN always wins."""
    # tl.where, not &: the interpreter turns (bool tensor & bool scalar) into int32, an invalid mask.
    take = tl.where(ok, (v > best) | (v != v), False)
    return tl.where(take, v, best), tl.where(take, code, arg)


# Sizes are not specialized on (divisibility by 16 or == 1): one binary per dtype and mode serves every
# batch and image size, which keeps compiles on a fresh GPU machine few; the gathers gain nothing from it.
SIZE_ARGS = ["BATCH", "C_OUT", "HP", "WP", "OH", "OW", "PH", "PW"]


@triton.autotune(configs=CONFIGS, key=["BATCH", "C_OUT", "PH", "PW", "RETURN_CONV"])
@triton.jit(do_not_specialize=SIZE_ARGS)
def conv1_relu_pool_kernel(
    x_ptr, w_ptr, b_ptr, pooled_ptr, switch_ptr, conv_ptr,
    BATCH, C_OUT, HP, WP, OH, OW, PH, PW,
    C_IN: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr,
    NPAD: tl.constexpr,         # columns of the packed weights (C_OUT rounded up to 128)
    RETURN_CONV: tl.constexpr,  # also write the un-pooled activation
    UPCAST: tl.constexpr,       # interpreter with half inputs: compute in fp32 and round bf16 by hand
    IEEE: tl.constexpr,         # fp32 dots in full precision instead of TF32
    BLOCK_W: tl.constexpr,      # pooled columns per program: the GEMM's M (power of two, >= 16 for tl.dot)
    BLOCK_N: tl.constexpr,      # output channels per program: the GEMM's N (masked past C_OUT)
    BLOCK_K: tl.constexpr,      # reduction chunk of each tl.dot (>= 16 on the GPU)
    ROWS: tl.constexpr,         # pooled rows per program: more rows amortize the first conv row's recompute
):
    K_TOTAL: tl.constexpr = C_IN * KS * KS
    OUT_DTYPE: tl.constexpr = pooled_ptr.dtype.element_ty

    # Program -> (image, pooled row block, pooled column strip); axis 1 -> channel block.
    n_col_blocks = (PW + BLOCK_W - 1) // BLOCK_W
    n_row_blocks = (PH + ROWS - 1) // ROWS
    pid = tl.program_id(0)
    col_block = pid % n_col_blocks
    rest = pid // n_col_blocks
    row_block = rest % n_row_blocks
    n = rest // n_row_blocks

    oc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    oc_ok = oc < C_OUT
    pw = col_block * BLOCK_W + tl.arange(0, BLOCK_W)
    pw_ok = pw < PW
    pw_c = tl.minimum(pw, PW - 1)  # lanes past the edge recompute the last window; their stores are masked
    col_ok1 = (2 * pw + 1 < OW)[:, None]  # ceil mode: the last window may hang over the conv output's edge
    col_ok2 = (2 * pw + 2 < OW)[:, None]

    bias = tl.load(b_ptr + oc, mask=oc_ok, other=0.0).to(tl.float32)

    # 64-bit image offsets: batch 2048 of 96x110x110 outputs passes 2**31 elements.
    n64 = n.to(tl.int64)
    HWP = HP * WP
    x_img = x_ptr + n64 * (C_IN * HWP)
    pooled_img = pooled_ptr + n64 * C_OUT * PH * PW  # scalar 64-bit bases, 32-bit tile offsets: fewer
    switch_img = switch_ptr + n64 * C_OUT * PH * PW  # registers than a tile of 64-bit pointers
    pool_off = oc[None, :] * (PH * PW) + pw[:, None]
    store_ok = pw_ok[:, None] & oc_ok[None, :]
    conv_img = conv_ptr + n64 * C_OUT * OH * OW
    conv_oc = oc * (OH * OW)

    ph0 = row_block * ROWS

    # Prologue: max over conv row 2*ph0, the top row of the first window. Only the first row block writes
    # that row to the conv output; for the others it is the previous block's last row.
    r = 2 * ph0
    ok = tl.where(ph0 == 0, store_ok, False)
    top = _conv_value(x_img, r, 0, pw, pw_c, w_ptr, oc, bias, HWP, WP, conv_img, conv_oc, ok, OW,
                      PW, OUT_DTYPE, STRIDE, KS, K_TOTAL, NPAD, BLOCK_K, RETURN_CONV, UPCAST,
                      IEEE)
    top_arg = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.int32)
    for dx in tl.static_range(1, 3):
        v = _conv_value(x_img, r, dx, pw, pw_c, w_ptr, oc, bias, HWP, WP, conv_img, conv_oc, ok,
                        OW, PW, OUT_DTYPE, STRIDE, KS, K_TOTAL, NPAD, BLOCK_K, RETURN_CONV,
                        UPCAST, IEEE)
        top, top_arg = _take(top, top_arg, v, col_ok1 if dx == 1 else col_ok2, dx)

    # Live tiles per iteration: the window's running max/argmax, the bottom row's max/argmax, one value.
    for i in range(ROWS):  # not range(ph0, ph_end): triton 3.6's interpreter cannot iterate tensors
        ph = ph0 + i
        if ph < PH:
            # Window (ph, pw) starts from its top row, carried over from the previous iteration.
            best = top
            arg = top_arg
            # Middle row 2*ph+1: scanned straight into the window, switch = 3 + dx.
            r = 2 * ph + 1
            ok = tl.where(r < OH, store_ok, False)
            for dx in tl.static_range(3):
                v = _conv_value(x_img, r, dx, pw, pw_c, w_ptr, oc, bias, HWP, WP, conv_img, conv_oc,
                                ok, OW, PW, OUT_DTYPE, STRIDE, KS, K_TOTAL, NPAD, BLOCK_K,
                                RETURN_CONV, UPCAST, IEEE)
                if dx == 0:
                    best, arg = _take(best, arg, v, r < OH, 3)
                else:
                    best, arg = _take(best, arg, v, tl.where(r < OH, col_ok1 if dx == 1 else col_ok2, False),
                                      3 + dx)
            # Bottom row 2*ph+2: its own max is the next window's top row; merged as a row (switch 6 + dx),
            # which picks the same element as scanning it (first max, last NaN).
            r = 2 * ph + 2
            ok = tl.where(r < OH, store_ok, False)
            top = _conv_value(x_img, r, 0, pw, pw_c, w_ptr, oc, bias, HWP, WP, conv_img, conv_oc,
                              ok, OW, PW, OUT_DTYPE, STRIDE, KS, K_TOTAL, NPAD, BLOCK_K,
                              RETURN_CONV, UPCAST, IEEE)
            top_arg = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.int32)
            for dx in tl.static_range(1, 3):
                v = _conv_value(x_img, r, dx, pw, pw_c, w_ptr, oc, bias, HWP, WP, conv_img, conv_oc,
                                ok, OW, PW, OUT_DTYPE, STRIDE, KS, K_TOTAL, NPAD, BLOCK_K,
                                RETURN_CONV, UPCAST, IEEE)
                top, top_arg = _take(top, top_arg, v, col_ok1 if dx == 1 else col_ok2, dx)
            best, arg = _take(best, arg, top, r < OH, top_arg + 6)

            tl.store(pooled_img + (pool_off + ph * PW), best.to(OUT_DTYPE), mask=store_ok)
            tl.store(switch_img + (pool_off + ph * PW), arg.to(tl.int8), mask=store_ok)


# ------------------------------------------------------------------------------------------- host side
def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (cuda:1 inputs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


_PACKED: dict[int, tuple] = {}  # id(weight) -> (weakref, version, dtype, packed)


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[C_out, C_in, k, k] -> zero-padded [packed_rows(K), ceil(C_out / 128) * 128] in ``dtype``, cached.

    The cache is keyed by the tensor object and its version counter, so in-place updates (optimizer steps,
    ``clip_filter_rms_``) repack, and a freed tensor whose address is reused never hits a stale entry.
    """
    entry = _PACKED.get(id(weight))
    if entry is not None:
        ref, version, cached_dtype, packed = entry
        if ref() is weight and version == weight._version and cached_dtype == dtype:
            return packed
    c_out = weight.shape[0]
    k_total = weight[0].numel()
    npad = -(-c_out // CHANNEL_PAD) * CHANNEL_PAD
    packed = torch.zeros(packed_rows(k_total), npad, dtype=dtype, device=weight.device)
    packed[:k_total, :c_out] = weight.detach().reshape(c_out, k_total).t().to(dtype)
    if len(_PACKED) > 16:
        _PACKED.clear()
    _PACKED[id(weight)] = (weakref.ref(weight), weight._version, dtype, packed)
    return packed


def padded_size(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int, int]:
    """(conv output, pooled output, padded input) lengths along one axis.

    The padded length covers every read of the kernel: windows up to pooled index P-1 read conv index
    2P at most (ceil-mode overhang included), i.e. input index 2P*stride + kernel - 1.
    """
    conv = (size + 2 * padding - kernel) // stride + 1
    pooled = pooled_size(conv)
    return conv, pooled, max(size + 2 * padding, 2 * pooled * stride + kernel)


def conv1_relu_pool_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, stride: int = 2,
                           padding: int = 1, return_conv: bool = False, out=None,
                           config: triton.Config | None = None, warmup: bool = False):
    """Launch the fused kernel. Inputs are validated by :func:`zfserve.kernels.ops.conv1_relu_pool`.

    ``out``, if given, is a tuple of preallocated (pooled, switches[, conv]) tensors (tests poison them);
    ``config`` bypasses the autotuner (tests run every candidate); with ``warmup`` the kernel is only
    compiled into Triton's cache, not run (benchmarks/gpu/warm_cache.py).
    """
    assert POOL_KERNEL == 3 and POOL_STRIDE == 2, "the kernel hard-codes the 3x3/2 pool"
    batch, c_in, h, w = x.shape
    c_out, _, ks, _ = weight.shape
    oh, ph, hp = padded_size(h, ks, stride, padding)
    ow, pw, wp = padded_size(w, ks, stride, padding)
    dtype = x.dtype
    xp = F.pad(x, (padding, wp - w - padding, padding, hp - h - padding))
    packed = pack_weight(weight, dtype)
    bias = bias.detach().contiguous()
    if out is None:
        pooled = torch.empty(batch, c_out, ph, pw, dtype=dtype, device=x.device)
        switches = torch.empty(batch, c_out, ph, pw, dtype=torch.int8, device=x.device)
        conv = torch.empty(batch, c_out, oh, ow, dtype=dtype, device=x.device) if return_conv else None
    else:
        pooled, switches = out[0], out[1]
        conv = out[2] if return_conv else None
    # fp32 follows PyTorch's own conv setting: TF32 on the matrix unit unless the user turned it off.
    ieee = dtype == torch.float32 and not torch.backends.cudnn.allow_tf32

    def grid(meta):
        rows = triton.cdiv(ph, meta["ROWS"])
        cols = triton.cdiv(pw, meta["BLOCK_W"])
        return batch * rows * cols, triton.cdiv(c_out, meta["BLOCK_N"])

    args = (xp, packed, bias, pooled, switches, conv if conv is not None else pooled,
            batch, c_out, hp, wp, oh, ow, ph, pw)
    meta = dict(C_IN=c_in, KS=ks, STRIDE=stride, NPAD=packed.shape[1], RETURN_CONV=return_conv,
                UPCAST=INTERPRET and dtype != torch.float32, IEEE=ieee)
    with on_device(x):
        if config is None:
            conv1_relu_pool_kernel[grid](*args, **meta)
        else:
            launch = dict(**meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            if warmup:
                conv1_relu_pool_kernel.fn.warmup(*args, grid=grid(config.kwargs), **launch)
            else:
                conv1_relu_pool_kernel.fn[grid(config.kwargs)](*args, **launch)
    return (pooled, switches, conv) if return_conv else (pooled, switches)
