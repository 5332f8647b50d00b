"""Arrays of other libraries, zero-copy: PyTorch tensors, JAX arrays, and anything else that
speaks DLPack (`__dlpack__`) or `__cuda_array_interface__`.

`caller_arrays` views such inputs as NumPy arrays (CPU memory) or CuPy arrays (CUDA memory)
without copying, and hands results back as the caller's kind: torch in, torch out (through
`torch.from_dlpack`); JAX in, JAX out; any other producer gets the NumPy or CuPy array.
No library is imported unless the caller's arrays already come from it.

Streams: a CUDA torch tensor's call runs on torch's current stream of that device (as
flash-attn does), so work queued there before the call is seen and work queued after it
waits for it, with no host synchronization. Other producers exchange through DLPack's stream
handshake with CuPy's current stream.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np

from . import _device

# DLPack device types (dlpack.h, DLDeviceType)
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13
_NATIVE_ON = {_DL_CPU: "numpy", _DL_CUDA_HOST: "numpy", _DL_CUDA: "cupy", _DL_CUDA_MANAGED: "cupy"}


def _library(x) -> str:
    return type(x).__module__.split(".")[0]


def _is_native(x) -> bool:
    return isinstance(x, np.ndarray) or _device.is_cupy_array(x)


def _is_foreign(x) -> bool:
    return not _is_native(x) and (hasattr(x, "__dlpack__") or hasattr(x, "__cuda_array_interface__"))


def _describe(x) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def small_array(name: str, x, what: str):
    """An index or offset argument as a NumPy or CuPy array: a list or tuple becomes NumPy, a
    torch/JAX/DLPack array its native kind (no copy); anything else is a TypeError saying that
    `name` must be `what`."""
    if _is_foreign(x):
        x = _native(name, x)
    if isinstance(x, (list, tuple)):
        x = np.asarray(x)
    if not (isinstance(x, np.ndarray) or _device.is_cupy_array(x)):
        raise TypeError(f"{name} must be {what}, got {_describe(x)}")
    return x


def _native(name: str, x):
    """x as a NumPy or CuPy array over the same memory."""
    if getattr(x, "requires_grad", False):
        raise TypeError(f"{name} requires grad, and flashattn_cupy computes the forward pass only "
                        "(no autograd): run the model under torch.no_grad() or torch.inference_mode(), "
                        f"or pass {name}.detach()")
    if not hasattr(x, "__dlpack__"):
        if hasattr(x, "__cuda_array_interface__"):   # e.g. Numba device arrays
            return _device.cupy().asarray(x)
        raise TypeError(f"{name} must be a NumPy or CuPy array, or an array with __dlpack__ or "
                        f"__cuda_array_interface__ (torch, JAX), got {_describe(x)}")
    device_type = int(x.__dlpack_device__()[0])
    target = _NATIVE_ON.get(device_type)
    if target is None:
        raise TypeError(f"{name} ({_describe(x)}) lives on DLPack device type {device_type}; "
                        "flashattn_cupy reads CPU memory (through NumPy) and CUDA memory (through CuPy)")
    from_dlpack = np.from_dlpack if target == "numpy" else _device.cupy().from_dlpack
    try:
        return from_dlpack(x)
    except (BufferError, TypeError, ValueError, RuntimeError) as exc:
        dtype = getattr(x, "dtype", "?")
        hint = (" NumPy has no bfloat16: move the tensor to the GPU, or convert it to float32"
                if "bfloat16" in str(dtype) and target == "numpy" else "")
        raise TypeError(f"{name} ({_describe(x)}, dtype {dtype}) cannot be viewed as a "
                        f"{'NumPy' if target == 'numpy' else 'CuPy'} array through DLPack: {str(exc).rstrip('.')}.{hint}") from exc


def _exporter(library: str):
    """How results go back to the caller's library (None: hand back NumPy/CuPy arrays)."""
    if library == "torch":
        return sys.modules["torch"].from_dlpack
    if library in ("jax", "jaxlib"):
        import jax.numpy   # already imported: the caller made a JAX array
        return jax.numpy.from_dlpack
    return None


def _torch_stream(x) -> tuple:
    """For a CUDA torch tensor, the contexts that make torch's current stream on its device
    CuPy's current stream; () for anything else."""
    if _library(x) != "torch" or not x.is_cuda:
        return ()
    cp = _device.cupy()
    device_id = x.device.index
    stream = sys.modules["torch"].cuda.current_stream(device_id)
    return cp.cuda.Device(device_id), cp.cuda.ExternalStream(stream.cuda_stream, device_id)


@contextlib.contextmanager
def caller_arrays(q, k, v):
    """Yields (q, k, v, export): the inputs as NumPy/CuPy arrays, and export(result) turning a
    NumPy/CuPy result into the caller's kind. NumPy and CuPy inputs pass through untouched."""
    if not any(_is_foreign(x) for x in (q, k, v)):
        yield q, k, v, _identity
        return
    libraries = {name: _library(x) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(libraries.values())) > 1:
        got = ", ".join(f"{n} is {_describe(x)}" for n, x in (("q", q), ("k", k), ("v", v)))
        raise TypeError(f"q, k and v must be arrays of one library ({got}); convert them to one kind first")
    exporter = _exporter(libraries["q"])
    export = _identity if exporter is None else exporter
    with contextlib.ExitStack() as stack:
        for context in _torch_stream(q):
            stack.enter_context(context)
        yield _native("q", q), _native("k", k), _native("v", v), export


def _identity(x):
    return x
