"""A tensor off the wire: the NumPy .npy bytes of a Flower Array, decoded against the dtype and shape it declares.

Flower's `Array.numpy()` runs `np.load` on every call (about 90 µs an array, mostly parsing the header: 4 ms for
the demo model's 43 tensors), and nothing checks that the bytes hold the array the Array's dtype and shape fields
declare. `decode_npy` compares the bytes with the header `np.save` writes for the declared dtype and shape and
copies the rest out (a few µs); any other bytes go through `np.load` (never unpickling) and must then decode to
exactly the declared dtype and shape.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Protocol

import numpy as np


class ArrayDataError(ValueError):
    """Bytes that are not the array their dtype and shape fields declare."""


class WireArray(Protocol):
    """What a Flower Array carries (flwr.app.Array; shared_model imports no Flower)."""

    dtype: str
    shape: tuple[int, ...]
    stype: str
    data: bytes


@lru_cache(maxsize=4096)
def npy_header(dtype: str, shape: tuple[int, ...]) -> tuple[bytes, np.dtype]:
    """The .npy header `np.save` writes for a C-ordered array of this dtype and shape (format 1.0), and the
    dtype; ArrayDataError for a dtype NumPy does not know or one holding Python objects."""
    try:
        kind = np.dtype(dtype)
    except TypeError as err:
        raise ArrayDataError(f"declares dtype {dtype!r}, which NumPy does not know") from err
    if kind.hasobject:
        raise ArrayDataError(f"declares dtype {dtype!r}, which holds Python objects")
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(kind), "fortran_order": False,
                                               "shape": shape})
    return out.getvalue(), kind


def decode_array(array: WireArray, name: str) -> np.ndarray:
    """A tensor another party sent, as a NumPy array (its own copy), once its bytes decode to exactly the dtype
    and shape it declares; ArrayDataError naming `name` otherwise. The server's checks once compared the declared
    fields while its average added the decoded bytes: a (3, 3) array declared (3,) turned the global tensor into
    (3, 3), or crashed the average when another reply came first, and bytes that were no array crashed it."""
    if array.stype != "numpy.ndarray":
        raise ArrayDataError(f"tensor {name}: serialized as {array.stype!r}, not numpy.ndarray")
    return decode_npy(array.data, array.dtype, tuple(array.shape), name)


def decode_npy(data: bytes, dtype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The array `data` holds (its own, writable copy), which must be exactly `dtype` and `shape`. Raises
    ArrayDataError naming `name`."""
    try:
        header, kind = npy_header(dtype, shape)
    except ArrayDataError as err:
        raise ArrayDataError(f"tensor {name}: {err}") from err
    if data[:len(header)] == header and len(data) == len(header) + kind.itemsize * math.prod(shape):
        return np.frombuffer(data, dtype=kind, offset=len(header)).reshape(shape).copy()
    try:
        values = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, TypeError, EOFError, OSError) as err:  # np.load's errors for bytes that are no .npy array
        raise ArrayDataError(f"tensor {name}: its bytes are not a NumPy array ({err})") from err
    if not isinstance(values, np.ndarray) or values.shape != shape or values.dtype != kind:
        found = f"{values.shape} {values.dtype}" if isinstance(values, np.ndarray) else type(values).__name__
        raise ArrayDataError(f"tensor {name}: declared {shape} {dtype}, but its bytes hold {found}")
    return values
