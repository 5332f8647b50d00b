"""Arrays of other libraries in, the same kind out, with no copies: torch (CPU here, CUDA on a
GPU machine), JAX, and any DLPack producer. CI installs the CPU builds of torch and JAX
(.ci/run); elsewhere the tests needing them skip, saying which package is missing."""
import os
import subprocess
import sys

import numpy as np
import pytest

from cases import inputs
from flashattn_cupy import _interop, flash_attention, plan_for
from tolerances import assert_attention_close

# JAX would take 75% of a GPU's memory when it first starts, starving CuPy and torch in this process
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _torch():
    return pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0, CPU)")


def _np(t):
    return t.detach().cpu().numpy()


def test_torch_cpu_in_torch_out(rng):
    torch = _torch()
    for dtype in (np.float32, np.float64):
        q, k, v = inputs(rng, (2, 3), 45, 70, 24, dtype=dtype)
        O, L = flash_attention(*map(torch.from_numpy, (q, k, v)), causal=True, return_lse=True)
        assert isinstance(O, torch.Tensor) and isinstance(L, torch.Tensor)
        assert O.dtype == torch.from_numpy(q).dtype and L.dtype == torch.float32 and O.device.type == "cpu"
        assert_attention_close(_np(O), _np(L), q, k, v, causal=True)


def test_torch_views_are_read_in_place(rng):
    torch = _torch()
    q, k, v = (torch.from_numpy(x) for x in inputs(rng, (2, 3), 33, 33, 16))
    with _interop.caller_arrays(q, k, v) as (nq, nk, nv, export):
        assert all(isinstance(x, np.ndarray) for x in (nq, nk, nv))
        assert nq.ctypes.data == q.data_ptr() and nk.ctypes.data == k.data_ptr()
        out = np.ones((2, 2), np.float32)
        assert export(out).data_ptr() == out.ctypes.data     # results go back without a copy too
    qt = torch.from_numpy(rng.standard_normal((2, 33, 3, 16), dtype=np.float32)).transpose(1, 2)  # (B, H, N, d)
    with _interop.caller_arrays(qt, qt, qt) as (nq, _, _, _):
        assert nq.ctypes.data == qt.data_ptr() and nq.strides == tuple(4 * s for s in qt.stride())
    O, L = flash_attention(qt, qt, qt, return_lse=True)
    assert_attention_close(_np(O), _np(L), *(_np(qt),) * 3)


def test_torch_plan_for_and_inference_mode(rng):
    torch = _torch()
    q, k, v = (torch.from_numpy(x) for x in inputs(rng, (2,), 64, 64, 64))
    assert plan_for(q, k, v).backend == "c"
    with torch.inference_mode():
        O, L = flash_attention(q * 1.0, k, v, return_lse=True)   # an inference tensor goes in too
    assert_attention_close(_np(O), _np(L), _np(q), _np(k), _np(v))


def test_torch_errors_say_what_to_do(rng):
    torch = _torch()
    q, k, v = (torch.from_numpy(x) for x in inputs(rng, (2,), 8, 8, 16))
    with pytest.raises(TypeError, match=r"q requires grad.*torch.no_grad\(\).*q.detach\(\)"):
        flash_attention(q.clone().requires_grad_(), k, v)
    with pytest.raises(TypeError, match="NumPy has no bfloat16"):
        flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    with pytest.raises(TypeError, match="arrays of one library"):
        flash_attention(q, k.numpy(), v)
    with pytest.raises(TypeError, match="float32 or float64, got float16"):
        flash_attention(q.half(), k.half(), v.half())


def test_jax_in_jax_out(rng):
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed (CI installs its CPU build)")
    q, k, v = inputs(rng, (2,), 30, 41, 32)
    O, L = flash_attention(*map(jnp.asarray, (q, k, v)), causal=True, return_lse=True)
    assert type(O) is type(jnp.asarray(q)) and O.dtype == jnp.float32
    assert_attention_close(np.asarray(O), np.asarray(L), q, k, v, causal=True)


class _Producer:
    """A minimal DLPack producer from no known library: results come back as NumPy arrays."""

    def __init__(self, array, device_type=1):
        self.array, self.device_type = array, device_type

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (self.device_type, 0)


class _NotAnArray:
    pass


def test_any_dlpack_producer(rng):
    q, k, v = inputs(rng, (3,), 20, 9, 8)
    O = flash_attention(_Producer(q), _Producer(k), _Producer(v))
    assert type(O) is np.ndarray
    np.testing.assert_array_equal(O, flash_attention(q, k, v))
    with pytest.raises(TypeError, match="DLPack device type 8"):
        flash_attention(_Producer(q, 8), _Producer(k, 8), _Producer(v, 8))
    with pytest.raises(TypeError, match="k must be a NumPy or CuPy array, or an array with __dlpack__"):
        flash_attention(_Producer(q), _NotAnArray(), _Producer(v))   # same library, no protocol


def test_numpy_callers_never_import_torch():
    code = ("import sys, numpy as np\n"
            "from flashattn_cupy import flash_attention\n"
            "x = np.ones((4, 8), np.float32)\n"
            "flash_attention(x, x, x)\n"
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# The GPU: CUDA torch tensors go through cupy.from_dlpack and back with no copies, on torch's stream.

def _cuda_torch():
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA device (a CPU build, or no GPU)")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cuda_in_torch_out(rng, cp, dtype):
    torch = _cuda_torch()
    q, k, v = inputs(rng, (2, 3), 77, 130, 64)
    tq, tk, tv = (torch.from_numpy(x).cuda().to(getattr(torch, dtype)) for x in (q, k, v))
    O, L = flash_attention(tq, tk, tv, causal=True, return_lse=True)
    assert O.is_cuda and O.dtype == tq.dtype and O.device == tq.device and L.dtype == torch.float32
    ref = [_np(x.float()) for x in (tq, tk, tv)]   # the values the kernel saw, exactly
    assert_attention_close(_np(O.float()), _np(L), *ref, causal=True, out=dtype)


@pytest.mark.gpu
def test_torch_cuda_is_zero_copy(rng, cp):
    torch = _cuda_torch()
    from flashattn_cupy import _cuda_backend
    x = torch.randn(2, 50, 3, 32, device="cuda")            # (batch, seq, heads, d)
    view = x.transpose(1, 2)                                # (batch, heads, seq, d): strided
    with _interop.caller_arrays(view, view, view) as (nq, _, _, export):
        assert isinstance(nq, cp.ndarray) and nq.data.ptr == x.data_ptr()
        assert _cuda_backend._strides(nq, cp)[0] is nq        # the kernel reads it in place
        out = cp.ones((3, 4), cp.float32)
        assert export(out).data_ptr() == out.data.ptr
    O = flash_attention(view, view, view)
    assert O.shape == view.shape and O.is_cuda


@pytest.mark.gpu
def test_torch_cuda_runs_on_torchs_current_stream(rng, cp, monkeypatch):
    torch = _cuda_torch()
    from flashattn_cupy import api
    seen = []
    run = api._run
    monkeypatch.setattr(api, "_run", lambda problem: (seen.append(cp.cuda.get_current_stream().ptr), run(problem))[1])
    q, k, v = inputs(rng, (2, 2), 300, 300, 64)
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)       # keep the stream busy, so a missed dependency would show
        tq.mul_(2.0)                        # queued on `stream` before the call: the kernel must see it
        O, L = flash_attention(tq, tk, tv, return_lse=True)
    assert seen == [stream.cuda_stream]
    stream.synchronize()
    assert_attention_close(_np(O), _np(L), 2 * q, k, v)


@pytest.mark.gpu
def test_jax_cuda_in_jax_out(rng, cp):
    jax = pytest.importorskip("jax", reason="JAX is not installed")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("this JAX has no GPU backend")
    q, k, v = inputs(rng, (2,), 64, 80, 64)
    jq, jk, jv = (jax.device_put(x, gpu) for x in (q, k, v))
    O, L = flash_attention(jq, jk, jv, causal=True, return_lse=True)
    assert type(O) is type(jq) and O.devices() == {gpu}
    assert_attention_close(np.asarray(O), np.asarray(L), q, k, v, causal=True)
