"""The CUDA backend's host side, on the CPU: the typed scalar arguments of a launch and the
element strides it reads arrays with (NumPy arrays stand in for CuPy's: both have shape,
strides and itemsize)."""
import sys
import types

import numpy as np
import pytest

from flashattn_cupy import _cuda_backend
from flashattn_cupy._cuda_backend import _strides, packed


def test_packed_arguments_are_typed_reused_and_keep_the_sign_of_zero():
    """A launch's scalars as the kernels declare them (int, long long, float), made once per
    distinct tuple; -0.0 and 0.0 compare equal but are different arguments. With CuPy imported
    they are Values whose bytes (8 a slot) hold the numbers; without, NumPy scalars."""
    args = packed((3, -1), (2**40,), (0.125, 0.0))
    numbers = [getattr(a, "value", a) for a in args]
    assert [type(a) for a in numbers] == [np.int32, np.int32, np.int64, np.float32, np.float32]
    assert numbers == [3, -1, 2**40, 0.125, 0.0] and packed((3, -1), (2**40,), (0.125, 0.0)) is args
    negative = packed((3, -1), (2**40,), (0.125, -0.0))
    assert np.signbit(getattr(negative[-1], "value", negative[-1])) and not np.signbit(numbers[-1])
    if hasattr(args[0], "value"):   # the bytes the driver copies, at each Value's .ptr
        for a in args:
            at = a.ptr - a.block.ctypes.data
            assert a.block[at:at + a.value.itemsize].tobytes() == a.value.tobytes()


def test_values_address_their_bytes(monkeypatch):
    """The Values CuPy gets, here over a stand-in for its CPointer (so this runs without CuPy):
    each .ptr is the address of its number's bytes, in a block kept alive with it."""
    class CPointer:
        def __init__(self, ptr):
            self.ptr = ptr
    cupy = types.ModuleType("cupy")
    function = types.SimpleNamespace(CPointer=CPointer)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", types.SimpleNamespace(function=function))
    monkeypatch.setitem(sys.modules, "cupy.cuda.function", function)
    monkeypatch.setattr(_cuda_backend, "_VALUE", [])
    monkeypatch.setattr(_cuda_backend, "_PACKED", {})
    args = packed((3, -1, 7), (2**40, -5), (0.125, -0.0))
    assert all(isinstance(a, CPointer) for a in args)
    for a in args:
        at = a.ptr - a.block.ctypes.data
        assert at % 8 == 0 and a.block[at:at + a.value.itemsize].tobytes() == a.value.tobytes()
    assert [a.value for a in args] == [3, -1, 7, 2**40, -5, 0.125, 0.0] and np.signbit(args[-1].value)


@pytest.mark.parametrize("shape, view", [((2, 3, 5, 8), None), ((1, 3, 5, 8), None), ((3, 5, 8), None),
                                         ((5, 8), None), ((2, 5, 3, 8), "bnhd"), ((1, 5, 8), "broadcast"),
                                         ((4, 2, 3, 5, 8), None), ((2, 1, 3, 5, 8), "bnhd")])
def test_strides_address_every_element(shape, view):
    """(sb, sh, sn) put x[b, h, n, c] (b the flattened batch dims) where x's memory holds it,
    for the <= 4-d shortcut and the general walk over batch dims alike."""
    x = np.zeros(shape, np.float32)
    if view == "bnhd":
        x = np.zeros(shape[:-3] + (shape[-2], shape[-3], shape[-1]), np.float32).swapaxes(-2, -3)
    elif view == "broadcast":
        x = np.broadcast_to(x, (4,) + shape)
    same, (sb, sh, sn) = _strides(x, np)
    assert same is x   # no copy for any of these layouts
    heads = (x.shape[-3],) if x.ndim > 2 else ()
    for b, index in enumerate(np.ndindex(*x.shape[:-3])):   # b: the flattened batch index
        for hn in np.ndindex(*heads, x.shape[-2]):
            h, n = hn if heads else (0, hn[0])
            offset = sum(i * s for i, s in zip(index + hn + (1,), x.strides))   # of x[..., h, n, 1]
            assert offset == (sb * b + sh * h + sn * n + 1) * x.itemsize, (b, h, n)
