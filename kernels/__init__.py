"""zfserve.kernels: the hot spots of the deconvnet path, with their eager PyTorch references.

Installed from the top-level ``kernels/`` folder as the import package ``zfserve.kernels``.

Public operations (``backend="auto"``: Triton for CUDA tensors, the eager reference for CPU tensors):

* :func:`conv1_relu_pool` -- conv1 + bias + ReLU + 3x3/2 ceil-mode max-pool with int8 switches;
* :func:`unpool_sum` -- max-unpool from int8 switches, summing where windows share a position.

Triton is optional: it is imported on the first Triton call, not here.
"""

from .ops import BACKENDS, conv1_relu_pool, triton_available, unpool_sum
from .reference import (
    conv1_relu_pool_reference,
    indices_from_switches,
    max_pool_with_switches,
    pooled_size,
    switches_from_indices,
    unpool_sum_reference,
)

__all__ = [
    "BACKENDS",
    "conv1_relu_pool",
    "triton_available",
    "unpool_sum",
    "conv1_relu_pool_reference",
    "indices_from_switches",
    "max_pool_with_switches",
    "pooled_size",
    "switches_from_indices",
    "unpool_sum_reference",
]
