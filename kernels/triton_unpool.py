"""Max-unpool with int8 switches that **sums** where windows share a position, as a Triton gather.

The oracle is :func:`zfserve.kernels.reference.unpool_sum_reference` (autograd's max-pool backward). This
module imports triton at the top: import it only through :mod:`zfserve.kernels.ops`.

A 3x3/2 pool's windows overlap by one row and one column, so output pixel (h, w) lies in at most 2x2
windows: rows ``h // 2`` (at offset ``h % 2``) and, for even h, ``h // 2 - 1`` (at offset 2); columns
likewise. Each program owns a [BLOCK_H, BLOCK_W] tile of one (image, channel) plane and, for each pixel,
adds the pooled values of those windows whose switch points at it. Every output element is written exactly
once, with its final value: no memset of the output, no atomics, and a fixed summation order, so results
are deterministic. The order is the windows' row-major order, the same as aten's backward, which makes the
fp32 result bit-identical to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_conv1 import INTERPRET, on_device, round_to



def configs(interpret: bool):
    """Autotune candidates (BLOCK_H a power of two: tl.arange)."""
    if interpret:
        return [triton.Config({"BLOCK_H": 16}, num_warps=4)]  # one config: see triton_conv1.configs
    # Tiles of 1-4K pixels; a 110-wide plane is one 128-wide column strip.
    return [triton.Config({"BLOCK_H": bh}, num_warps=nw) for bh, nw in ((8, 4), (16, 4), (32, 8))]


CONFIGS = configs(INTERPRET)


@triton.jit
def _gather(acc, pooled_plane, switch_plane, ph, pw, row_ok, col_ok, code, PW):
    """Add pooled[ph, pw] where that window's switch equals ``code`` (3 * dy + dx)."""
    ok = row_ok[:, None] & col_ok[None, :]
    idx = ph[:, None] * PW + pw[None, :]
    s = tl.load(switch_plane + idx, mask=ok, other=-1).to(tl.int32)
    v = tl.load(pooled_plane + idx, mask=ok & (s == code), other=0.0)
    return acc + v.to(tl.float32)


@triton.autotune(configs=CONFIGS, key=["PH", "PW", "OH", "OW"])
@triton.jit(do_not_specialize=["PH", "PW", "OH", "OW"])  # one binary for every map size (see triton_conv1)
def unpool_sum_kernel(
    pooled_ptr, switch_ptr, out_ptr, PH, PW, OH, OW,
    RELU: tl.constexpr,
    INTERPRETED: tl.constexpr,  # the interpreter needs bf16 rounding done by hand (see round_to)
    BLOCK_H: tl.constexpr,  # output rows per program
    BLOCK_W: tl.constexpr,  # output columns per program: next power of two of the width, at most 128
):
    plane = tl.program_id(0).to(tl.int64)  # axis 0: (image, channel) planes, the one axis without a 65535 cap
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    w = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    pooled_plane = pooled_ptr + plane * PH * PW
    switch_plane = switch_ptr + plane * PH * PW

    # Window "a" starts at or one before the pixel (offset h % 2); window "b" is the one before it, which
    # reaches this pixel with offset 2 only on even rows. Same for columns.
    pha = h // 2
    dya = h - 2 * pha
    phb = pha - 1
    row_a = (h < OH) & (pha < PH)
    row_b = (h < OH) & (dya == 0) & (phb >= 0)
    pwa = w // 2
    dxa = w - 2 * pwa
    pwb = pwa - 1
    col_a = (w < OW) & (pwa < PW)
    col_b = (w < OW) & (dxa == 0) & (pwb >= 0)

    # Row-major window order (b before a, rows before columns): aten's accumulation order.
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    acc = _gather(acc, pooled_plane, switch_plane, phb, pwb, row_b, col_b, 8, PW)
    acc = _gather(acc, pooled_plane, switch_plane, phb, pwa, row_b, col_a, 6 + dxa[None, :], PW)
    acc = _gather(acc, pooled_plane, switch_plane, pha, pwb, row_a, col_b, 3 * dya[:, None] + 2, PW)
    acc = _gather(acc, pooled_plane, switch_plane, pha, pwa, row_a, col_a,
                  3 * dya[:, None] + dxa[None, :], PW)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out = out_ptr + plane * OH * OW + h[:, None] * OW + w[None, :]
    out_value = round_to(acc, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out, out_value, mask=(h < OH)[:, None] & (w < OW)[None, :])


def block_width(out_w: int) -> int:
    """Output columns per program: the whole row up to 128 (a power of two, for tl.arange)."""
    return min(128, triton.next_power_of_2(out_w))


def unpool_sum_triton(pooled: torch.Tensor, switches: torch.Tensor, output_size, *, relu: bool = False,
                      out: torch.Tensor | None = None, config: triton.Config | None = None,
                      warmup: bool = False) -> torch.Tensor:
    """Launch the gather unpool. Inputs are validated by :func:`zfserve.kernels.ops.unpool_sum`.

    ``out``, if given, is a preallocated output (tests poison it to catch unwritten elements); ``config``
    bypasses the autotuner; with ``warmup`` the kernel is only compiled into Triton's cache.
    """
    oh, ow = output_size
    lead = pooled.shape[:-2]
    ph, pw = pooled.shape[-2:]
    planes = pooled.numel() // (ph * pw)
    if out is None:
        out = torch.empty(*lead, oh, ow, dtype=pooled.dtype, device=pooled.device)
    block_w = block_width(ow)
    if planes == 0:
        return out

    def grid(meta):
        return planes, triton.cdiv(oh, meta["BLOCK_H"]), triton.cdiv(ow, block_w)

    args = (pooled, switches, out, ph, pw, oh, ow)
    meta = dict(RELU=relu, INTERPRETED=INTERPRET, BLOCK_W=block_w)
    with on_device(pooled):
        if config is None:
            unpool_sum_kernel[grid](*args, **meta)
        else:
            launch = dict(**meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            if warmup:
                unpool_sum_kernel.fn.warmup(*args, grid=grid(config.kwargs), **launch)
            else:
                unpool_sum_kernel.fn[grid(config.kwargs)](*args, **launch)
    return out
