"""The CUDA backend's host side, on the CPU: the typed scalar arguments of a launch and the
element strides it reads arrays with (NumPy arrays stand in for CuPy's: both have shape,
strides and itemsize)."""
import numpy as np
import pytest

from flashattn_cupy._cuda_backend import _batch_stride, _strides, packed


def test_packed_arguments_are_typed_reused_and_keep_the_sign_of_zero():
    """A launch's scalars as the kernels declare them (int, long long, float), made once per
    distinct tuple; -0.0 and 0.0 compare equal but are different arguments."""
    args = packed((3, -1), (2**40,), (0.125, 0.0))
    assert [type(a) for a in args] == [np.int32, np.int32, np.int64, np.float32, np.float32]
    assert args == (3, -1, 2**40, 0.125, 0.0) and packed((3, -1), (2**40,), (0.125, 0.0)) is args
    negative = packed((3, -1), (2**40,), (0.125, -0.0))
    assert np.signbit(negative[-1]) and not np.signbit(args[-1])


@pytest.mark.parametrize("shape, view", [((2, 3, 5, 8), None), ((1, 3, 5, 8), None), ((3, 5, 8), None),
                                         ((5, 8), None), ((2, 5, 3, 8), "bnhd"), ((1, 5, 8), "broadcast"),
                                         ((4, 2, 3, 5, 8), None), ((2, 1, 3, 5, 8), "bnhd")])
def test_strides_fast_path_agrees_with_the_general_one(shape, view):
    """_strides' shortcut for arrays of at most 4 dims gives the strides the general walk over
    the batch dims gives."""
    x = np.zeros(shape, np.float32)
    if view == "bnhd":
        x = np.zeros(shape[:-3] + (shape[-2], shape[-3], shape[-1]), np.float32).swapaxes(-2, -3)
    elif view == "broadcast":
        x = np.broadcast_to(x, (4,) + shape)
    got = _strides(x, np)[1]
    item = x.itemsize
    general = (_batch_stride(x), x.strides[-3] // item if x.ndim > 2 else 0, x.strides[-2] // item)
    assert got == general
