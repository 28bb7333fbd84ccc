"""Raw tensors on the wire: bytes + dtype + shape, checked before anything is decoded.

Every check names the field: dtype in the accepted set, shape non-negative, byte length = product(shape) x
itemsize, and for images the (N, 3, S, S) shape, the request's image limit and finite values.
"""

from __future__ import annotations

import struct

import numpy as np

from ..errors import InvalidArgumentError

# zfserve.v1 Tensor dtypes (little-endian on the wire).
DTYPES = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "int64": "<i8", "int32": "<i4", "int8": "i1", "uint8": "u1"}
# Open Inference Protocol datatypes (BYTES is handled separately).
OIP_DTYPES = {"BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
              "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def _count(shape, field: str) -> int:
    shape = [int(s) for s in shape]
    if any(s < 0 for s in shape):
        raise InvalidArgumentError(f"{field}.shape: dimensions must be >= 0, got {shape}", field=f"{field}.shape")
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def from_raw(data: bytes, dtype: str, shape, field: str) -> np.ndarray:
    """Bytes of a row-major little-endian array -> a read-only numpy view with that dtype and shape."""
    np_dtype = np.dtype(dtype)
    count = _count(shape, field)
    expected = count * np_dtype.itemsize
    if len(data) != expected:
        raise InvalidArgumentError(
            f"{field}: {len(data)} bytes for shape {list(shape)} of {np_dtype.name}; expected {expected} "
            f"(product of the shape x {np_dtype.itemsize})", field=field)
    # A writable copy: the engines (PyTorch) warn on read-only buffers, and the copy is cheap next to compute.
    return np.frombuffer(bytearray(data), dtype=np_dtype).reshape([int(s) for s in shape])


def tensor_to_array(tensor, field: str) -> np.ndarray:
    """A zfserve.v1.Tensor -> numpy (native byte order)."""
    if tensor.dtype not in DTYPES:
        raise InvalidArgumentError(f"{field}.dtype: {tensor.dtype!r} is not accepted; accepted: "
                                   f"{sorted(DTYPES)}", field=f"{field}.dtype")
    arr = from_raw(tensor.data, DTYPES[tensor.dtype], tensor.shape, f"{field}.data")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def array_to_tensor(arr: np.ndarray, message_type):
    """numpy -> a zfserve.v1.Tensor (raw little-endian bytes)."""
    arr = np.asarray(arr)
    name = arr.dtype.name
    if name not in DTYPES:
        raise TypeError(f"cannot send dtype {name}")
    data = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[name])).tobytes()
    return message_type(dtype=name, shape=list(arr.shape), data=data)


def check_images(arr: np.ndarray, field: str, input_size: int, max_images: int) -> np.ndarray:
    """A preprocessed batch: float32 (N, 3, S, S), 1 <= N <= max_images, finite. Returns a float32 array."""
    expected = f"(N, 3, {input_size}, {input_size}) with 1 <= N <= {max_images}"
    if arr.dtype != np.float32:
        raise InvalidArgumentError(f"{field}.dtype: must be float32, got {arr.dtype.name}", field=f"{field}.dtype")
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (3, input_size, input_size):
        raise InvalidArgumentError(f"{field}: shape must be {expected}, got {list(arr.shape)}", field=field)
    if not 1 <= arr.shape[0] <= max_images:
        raise InvalidArgumentError(f"{field}: {arr.shape[0]} images; shape must be {expected}", field=field)
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{field}: holds NaN or infinite values; preprocessed images must be finite",
                                   field=field)
    return arr


def decode_bytes_elements(data: bytes, count: int, field: str) -> list[bytes]:
    """OIP BYTES raw contents: ``count`` elements, each a 4-byte little-endian length then that many bytes."""
    out, pos = [], 0
    for i in range(count):
        if pos + 4 > len(data):
            raise InvalidArgumentError(f"{field}: element {i} has no 4-byte length prefix ({len(data)} bytes, "
                                       f"{count} elements expected)", field=field)
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise InvalidArgumentError(f"{field}: element {i} claims {length} bytes, only {len(data) - pos} "
                                       f"remain", field=field)
        out.append(bytes(data[pos:pos + length]))
        pos += length
    if pos != len(data):
        raise InvalidArgumentError(f"{field}: {len(data) - pos} bytes after the last of {count} elements",
                                   field=field)
    return out


def encode_bytes_elements(items: list[bytes]) -> bytes:
    """The inverse of :func:`decode_bytes_elements` (for clients and tests)."""
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)
