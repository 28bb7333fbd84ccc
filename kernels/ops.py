"""The public kernel entry points: validate, then dispatch to the Triton kernel or the eager reference.

``backend="auto"`` runs Triton on CUDA tensors and the reference on CPU tensors (production CPU paths never
go through the interpreter); ``"triton"`` forces the kernel (the interpreter for CPU tensors, which needs
``TRITON_INTERPRET=1`` before the first use); ``"torch"`` forces the reference. Triton is imported lazily so
that a CPU-only install without it still imports ``zfserve.kernels``.
"""

from __future__ import annotations

import importlib
import os

import torch

from zfserve.errors import InvalidArgumentError

from .reference import conv1_relu_pool_reference, unpool_sum_reference

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONV1_STRIDE = 2   # ZFNet's conv1 geometry (zfserve.architecture), fixed by the public API
CONV1_PADDING = 1

_triton_modules: dict[str, object] = {}


def triton_available() -> bool:
    """Whether the triton package can be imported (it is an optional dependency)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _kernel_module(name: str):
    """Import ``zfserve.kernels.<name>`` (which imports triton) on first use."""
    if name not in _triton_modules:
        _triton_modules[name] = importlib.import_module(f"{__package__}.{name}")
    return _triton_modules[name]


def interpreting() -> bool:
    """Whether the Triton kernels run in the interpreter (decided when they are first imported)."""
    if "triton_conv1" in _triton_modules:
        return _triton_modules["triton_conv1"].INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _resolve(backend: str, tensor: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {list(BACKENDS)}, got {backend!r}", field="backend")
    if backend == "torch":
        return "torch"
    usable = tensor.dtype in KERNEL_DTYPES and triton_available()
    if backend == "auto":
        return "triton" if tensor.is_cuda and usable else "torch"
    if not triton_available():
        raise InvalidArgumentError("backend='triton' needs the triton package (install zfserve[gpu]); "
                                   "accepted without it: 'auto', 'torch'", field="backend")
    if tensor.dtype not in KERNEL_DTYPES:
        raise InvalidArgumentError(f"backend='triton' supports dtypes float32, float16, bfloat16, got "
                                   f"{tensor.dtype}", field="dtype")
    if not tensor.is_cuda and not interpreting():
        raise InvalidArgumentError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the "
                                   "first kernel call; accepted otherwise: CUDA tensors or backend='torch'",
                                   field="backend")
    return "triton"


def _check_float(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}", field=name)
    if t.dim() != dims:
        raise InvalidArgumentError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}", field=name)
    if not t.is_floating_point():
        raise InvalidArgumentError(f"{name} must be a floating-point tensor, got {t.dtype}", field=name)


def conv1_relu_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, return_conv: bool = False,
                    backend: str = "auto"):
    """conv1 (stride 2, padding 1) + bias + ReLU + 3x3/2 ceil-mode max-pool with int8 switches.

    ``x``: (N, C_in, H, W) float32/float16/bfloat16; ``weight``: (C_out, C_in, k, k); ``bias``: (C_out,).
    Returns ``(pooled, switches)`` or, with ``return_conv``, ``(pooled, switches, conv)`` where ``conv`` is
    the post-ReLU activation. Outputs have ``x``'s dtype; the Triton kernel casts the weights to it and
    accumulates in fp32 (fp32 inputs use TF32 when ``torch.backends.cudnn.allow_tf32`` is set, as PyTorch's
    own conv does).
    """
    _check_float("x", x, 4)
    _check_float("weight", weight, 4)
    _check_float("bias", bias, 1)
    c_out, c_in, kh, kw = weight.shape
    if kh != kw:
        raise InvalidArgumentError(f"weight must hold square kernels, got {kh}x{kw}", field="weight")
    if x.shape[1] != c_in:
        raise InvalidArgumentError(f"x has {x.shape[1]} channels, weight expects {c_in}", field="x")
    if bias.shape[0] != c_out:
        raise InvalidArgumentError(f"bias has {bias.shape[0]} entries, weight has {c_out} filters", field="bias")
    if weight.device != x.device or bias.device != x.device:
        raise InvalidArgumentError(f"x, weight and bias must be on one device, got {x.device}, {weight.device}, "
                                   f"{bias.device}", field="device")
    min_size = 2 * CONV1_STRIDE + kh - 2 * CONV1_PADDING  # conv output of 3, the pool's window
    if min(x.shape[-2:]) < min_size:
        raise InvalidArgumentError(f"x's height and width must be >= {min_size}, got {tuple(x.shape[-2:])}",
                                   field="x")
    if _resolve(backend, x) == "torch":
        return conv1_relu_pool_reference(x, weight, bias, stride=CONV1_STRIDE, padding=CONV1_PADDING,
                                         return_conv=return_conv)
    kernel = _kernel_module("triton_conv1")
    return kernel.conv1_relu_pool_triton(x.contiguous(), weight, bias, stride=CONV1_STRIDE,
                                         padding=CONV1_PADDING, return_conv=return_conv)


def unpool_sum(pooled: torch.Tensor, switches: torch.Tensor, output_size, *, relu: bool = False,
               kernel: int = 3, stride: int = 2, backend: str = "auto") -> torch.Tensor:
    """Max-unpool of a ``kernel`` x ``kernel`` / ``stride`` pool from int8 switches, **summing** where windows
    share a position.

    ``pooled``: (..., PH, PW) float; ``switches``: int8 window offsets (0..kernel^2-1) of the same shape;
    ``output_size``: (H, W) of the map that was pooled (pass it: 2*PH and 2*PH+1 both pool to PH).
    ``relu`` fuses the deconvnet's rectification. Switches that point outside the output are dropped.
    The Triton kernel serves the 3x3/2 pool (ZFNet's, AlexNet's); other geometries (VGG's 2x2/2) run the
    eager reference under ``backend="auto"`` on every device, and ``backend="triton"`` refuses them.
    """
    if not isinstance(pooled, torch.Tensor) or not pooled.is_floating_point() or pooled.dim() < 2:
        raise InvalidArgumentError("pooled must be a floating-point tensor (..., PH, PW)", field="pooled")
    if not isinstance(switches, torch.Tensor) or switches.dtype != torch.int8:
        raise InvalidArgumentError(f"switches must be an int8 tensor of window offsets 0..{kernel * kernel - 1}",
                                   field="switches")
    if switches.shape != pooled.shape or switches.device != pooled.device:
        raise InvalidArgumentError(f"switches must match pooled's shape {tuple(pooled.shape)} and device, got "
                                   f"{tuple(switches.shape)} on {switches.device}", field="switches")
    if not (isinstance(kernel, int) and isinstance(stride, int) and 1 <= stride <= kernel <= 11):
        raise InvalidArgumentError(f"kernel and stride must be integers with 1 <= stride <= kernel <= 11, got "
                                   f"kernel={kernel!r}, stride={stride!r}", field="kernel")
    try:
        oh, ow = (int(s) for s in output_size)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"output_size must be (height, width), got {output_size!r}",
                                   field="output_size") from None
    ph, pw = pooled.shape[-2:]
    # A k/s pool (ceil or floor mode) of an n-long axis has P windows for n in [(P-1)s + 1, (P-1)s + k + s - 1].
    for name, out_len, p in (("height", oh, ph), ("width", ow, pw)):
        low, high = (p - 1) * stride + 1, (p - 1) * stride + kernel + stride - 1
        if not low <= out_len <= high:
            raise InvalidArgumentError(f"output_size {name} must be in [{low}, {high}] for {p} pooled positions of "
                                       f"a {kernel}x{kernel}/{stride} pool, got {out_len}", field="output_size")
    triton_geometry = (kernel, stride) == (3, 2)
    if backend == "triton" and not triton_geometry:
        raise InvalidArgumentError(f"backend='triton' unpools 3x3/2 pools only, got {kernel}x{kernel}/{stride}; "
                                   f"accepted otherwise: 'auto', 'torch'", field="backend")
    if not triton_geometry and backend not in BACKENDS:
        _resolve(backend, pooled)   # the one message for an unknown backend
    if not triton_geometry or _resolve(backend, pooled) == "torch":
        flat = (-1, ph, pw)  # aten's backward takes 3-D or 4-D maps
        dense = unpool_sum_reference(pooled.reshape(flat), switches.reshape(flat), (oh, ow), relu=relu,
                                     kernel=kernel, stride=stride)
        return dense.reshape(*pooled.shape[:-2], oh, ow)
    kernel_module = _kernel_module("triton_unpool")
    return kernel_module.unpool_sum_triton(pooled.contiguous(), switches.contiguous(), (oh, ow), relu=relu)
