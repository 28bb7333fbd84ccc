"""Eager PyTorch definitions of the two hot spots: the oracles the Triton kernels are tested against.

Switches are int8 offsets inside a k x k pooling window, row-major: ``offset = k * dy + dx`` (0..8 for ZFNet's
and AlexNet's 3x3 pools, 0..3 for VGG's 2x2). They carry the same information as
``max_pool2d(return_indices=True)``'s int64 flat indices at one eighth of the bytes, and they are independent of
the input width, so a switch map can be checked against the pooled map alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOL_KERNEL = 3
POOL_STRIDE = 2


def pooled_size(size: int, kernel: int = POOL_KERNEL, stride: int = POOL_STRIDE, ceil_mode: bool = True) -> int:
    """Output length of an unpadded max-pool (PyTorch's rule in ceil mode: the last window must start inside)."""
    if not ceil_mode:
        return (size - kernel) // stride + 1
    out = -(-(size - kernel) // stride) + 1
    if (out - 1) * stride >= size:
        out -= 1
    return out


def _window_starts(oh: int, ow: int, in_width: int, stride: int, device) -> torch.Tensor:
    """Flat input index of each window's top-left corner, shape (oh, ow)."""
    rows = torch.arange(oh, device=device) * (stride * in_width)
    cols = torch.arange(ow, device=device) * stride
    return rows.view(oh, 1) + cols.view(1, ow)


def switches_from_indices(indices: torch.Tensor, in_width: int, stride: int = POOL_STRIDE,
                          kernel: int = POOL_KERNEL) -> torch.Tensor:
    """Flat int64 argmax indices (``max_pool2d(return_indices=True)``) -> int8 window offsets 0..k*k-1."""
    oh, ow = indices.shape[-2:]
    offset = indices - _window_starts(oh, ow, in_width, stride, indices.device)  # dy * in_width + dx
    # dy by comparisons instead of an integer division (several times faster on CPUs)
    dy = sum((offset >= r * in_width).to(offset.dtype) for r in range(1, kernel))
    return (offset - dy * (in_width - kernel)).to(torch.int8)


def indices_from_switches(switches: torch.Tensor, in_width: int, stride: int = POOL_STRIDE,
                          kernel: int = POOL_KERNEL) -> torch.Tensor:
    """Inverse of :func:`switches_from_indices`: int8 window offsets -> flat int64 indices into the input."""
    oh, ow = switches.shape[-2:]
    table = torch.tensor([dy * in_width + dx for dy in range(kernel) for dx in range(kernel)],
                         device=switches.device)
    return _window_starts(oh, ow, in_width, stride, switches.device) + table[switches.long()]


def max_pool_with_switches(x: torch.Tensor, kernel: int = POOL_KERNEL, stride: int = POOL_STRIDE,
                           ceil_mode: bool = True):
    """Max-pool (ceil mode by default, ZFNet's) returning ``(pooled, int8 switches)``; ties go to the first
    position (row-major)."""
    pooled, indices = F.max_pool2d(x, kernel, stride, ceil_mode=ceil_mode, return_indices=True)
    return pooled, switches_from_indices(indices, x.shape[-1], stride, kernel)


def conv1_relu_pool_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                              stride: int = 2, padding: int = 1, return_conv: bool = False):
    """conv2d + bias + ReLU + 3x3/2 ceil-mode max-pool with switches, as eager PyTorch does it.

    Half-precision inputs are computed in fp32 (the kernels accumulate in fp32) and cast back.
    Returns ``(pooled, switches)`` or ``(pooled, switches, conv)`` with ``conv`` the post-ReLU activation.
    """
    dtype = x.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    conv = F.relu(F.conv2d(x.to(compute), weight.to(compute), bias.to(compute), stride=stride,
                           padding=padding)).to(dtype)
    pooled, switches = max_pool_with_switches(conv)
    return (pooled, switches, conv) if return_conv else (pooled, switches)


def unpool_sum_reference(pooled: torch.Tensor, switches: torch.Tensor, output_size, *,
                         relu: bool = False, kernel: int = POOL_KERNEL, stride: int = POOL_STRIDE) -> torch.Tensor:
    """Max-unpool that **sums** where windows share a position: the adjoint of max-pool.

    Defined through ``aten.max_pool2d_with_indices_backward``, i.e. autograd's own max-pool backward, which is
    exactly the deconvnet's unpooling when several overlapping windows picked the same input position.
    aten does not bounds-check its indices (an index past the output corrupts memory), so the backward runs
    on a ((PH-1)*stride + kernel, ...) map that holds every window and is then cropped (or zero-padded) to
    ``output_size``: switches that point outside the output are dropped.
    """
    out_h, out_w = output_size
    ph, pw = pooled.shape[-2:]
    # The map that holds every window whole (2P + 1 for 3x3/2: pooled_size(2P + 1) == P in either mode).
    full_h, full_w = (ph - 1) * stride + kernel, (pw - 1) * stride + kernel
    indices = indices_from_switches(switches, full_w, stride, kernel)
    template = pooled.new_empty(pooled.shape[:-2] + (full_h, full_w))
    dense = torch.ops.aten.max_pool2d_with_indices_backward(
        pooled, template, [kernel, kernel], [stride, stride], [0, 0], [1, 1], False, indices)
    if relu:
        dense.relu_()   # a fresh tensor of aten's; the padding added below is zero either way
    return F.pad(dense, (0, out_w - full_w, 0, out_h - full_h))  # negative pads crop
