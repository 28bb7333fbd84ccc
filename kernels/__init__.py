"""zfserve.kernels: the hot spots of the deconvnet path, with their eager PyTorch references.

Installed from the top-level ``kernels/`` folder as the import package ``zfserve.kernels``.
"""

from .reference import (
    conv1_relu_pool_reference,
    indices_from_switches,
    max_pool_with_switches,
    pooled_size,
    switches_from_indices,
    unpool_sum_reference,
)

__all__ = [
    "conv1_relu_pool_reference",
    "indices_from_switches",
    "max_pool_with_switches",
    "pooled_size",
    "switches_from_indices",
    "unpool_sum_reference",
]
