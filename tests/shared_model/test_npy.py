"""A tensor off the wire is exactly the array it declares: the fast path for what np.save writes, np.load (never
unpickling) for anything else, and a refusal naming the tensor for bytes that are not what they declare."""

import io

import numpy as np
import pytest

from shared_model.npy import ArrayDataError, decode_array, decode_npy


def saved(values, **kwargs) -> bytes:
    out = io.BytesIO()
    np.save(out, values, **kwargs)
    return out.getvalue()


ARRAYS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(2.5, dtype=np.float64),
          np.zeros((0, 5), dtype=np.float16), np.array([1, -2], dtype=np.int64), np.array([True, False]),
          np.arange(6, dtype=np.uint16).reshape(1, 2, 3)]


@pytest.mark.parametrize("values", ARRAYS, ids=lambda v: f"{v.dtype}{v.shape}")
def test_what_np_save_writes_decodes_without_np_load_to_a_writable_copy(values, monkeypatch):
    data = saved(values)
    monkeypatch.setattr(np, "load", lambda *_a, **_k: pytest.fail("np.load on the fast path"))
    decoded = decode_npy(data, str(values.dtype), values.shape, "t")
    assert decoded.dtype == values.dtype and decoded.shape == values.shape and np.array_equal(decoded, values)
    decoded[...] = 0  # its own memory: the message's bytes are untouched
    assert np.array_equal(decode_npy(data, str(values.dtype), values.shape, "t"), values)


def test_other_valid_npy_bytes_go_through_np_load():
    values = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.array_equal(decode_npy(saved(values), "float32", (2, 3), "t"), values)


@pytest.mark.parametrize(("data", "dtype", "shape", "says"), [
    (saved(np.zeros((3, 3), np.float32)), "float32", (3,), "declared (3,) float32, but its bytes hold (3, 3) float32"),
    (saved(np.zeros(3, np.float64)), "float32", (3,), "but its bytes hold (3,) float64"),
    (saved(np.zeros(3, np.float32))[:-4], "float32", (3,), "its bytes are not a NumPy array"),
    (b"garbage", "float32", (3,), "its bytes are not a NumPy array"),
    (saved(np.array([{"x": 1}], dtype=object), allow_pickle=True), "float32", (1,), "its bytes are not a NumPy array"),
    (saved(np.zeros(1, np.float32)), "object", (1,), "declares dtype 'object', which holds Python objects"),
    (saved(np.zeros(1, np.float32)), "no-such-type", (1,), "declares dtype 'no-such-type'"),
])
def test_bytes_that_are_not_what_they_declare_are_refused_naming_the_tensor(data, dtype, shape, says):
    with pytest.raises(ArrayDataError, match=r"^tensor w: ") as refused:
        decode_npy(data, dtype, shape, "w")
    assert says in str(refused.value)


def test_an_npz_archive_is_refused():
    out = io.BytesIO()
    np.savez(out, w=np.zeros(3, np.float32))
    with pytest.raises(ArrayDataError, match="its bytes hold NpzFile"):
        decode_npy(out.getvalue(), "float32", (3,), "w")


def test_an_array_serialized_as_anything_but_numpy_is_refused():
    class Sent:  # what a Flower Array carries
        dtype, shape, stype, data = "float32", (3,), "torch.tensor", saved(np.zeros(3, np.float32))

    with pytest.raises(ArrayDataError, match=r"tensor w: serialized as 'torch\.tensor', not numpy\.ndarray"):
        decode_array(Sent(), "w")
    Sent.stype = "numpy.ndarray"
    assert np.array_equal(decode_array(Sent(), "w"), np.zeros(3, np.float32))
