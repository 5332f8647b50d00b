"""CuPy, imported lazily: NumPy users never pay for it, and its absence is a clear error."""
from __future__ import annotations

import functools
import importlib.util
import sys

INSTALL_HINT = ("install CuPy for your CUDA version with the package's extra: "
                "pip install 'flashattn_cupy[cuda12]' (CUDA 12) or "
                "pip install 'flashattn_cupy[cuda13]' (CUDA 13)")


class BackendUnavailableError(ValueError):
    """backend='cuda' was asked for (or implied) but CuPy or a usable GPU is missing."""


def is_cupy_array(x) -> bool:
    """True for cupy.ndarray, decided without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "data") and hasattr(x, "device")


def ndarray_type():
    """cupy.ndarray once CuPy is imported (by the caller or by us), else None (without importing it)."""
    module = sys.modules.get("cupy")
    return getattr(module, "ndarray", None)


@functools.cache
def _probe():
    if "cupy" not in sys.modules and importlib.util.find_spec("cupy") is not None:
        from .kernel_cache import ensure_cache_dir
        ensure_cache_dir()        # CuPy's import fails where it cannot create this directory
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return None, f"CuPy is not importable ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy found no usable CUDA GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "CuPy found no CUDA GPU"
    return cupy, ""


def gpu_unavailable_reason() -> str:
    """'' when CuPy and a GPU are usable, else why not."""
    return _probe()[1]


def cupy():
    """The cupy module, or BackendUnavailableError saying how to get it."""
    module, why = _probe()
    if module is None:
        raise BackendUnavailableError(f"backend='cuda' needs CuPy and a CUDA GPU: {why}")
    return module


@functools.cache
def _attributes(device_id: int) -> dict:
    return cupy().cuda.Device(device_id).attributes


def current_device() -> int:
    return cupy().cuda.Device().id


def smem_limit(device_id: int | None = None) -> int:
    """Largest dynamic shared memory a block may opt in to on this device, in bytes."""
    device_id = current_device() if device_id is None else device_id
    return _attributes(device_id)["MaxSharedMemoryPerBlockOptin"]


def sm_count(device_id: int | None = None) -> int:
    """The device's streaming multiprocessors (the planner fills them when decoding)."""
    device_id = current_device() if device_id is None else device_id
    return _attributes(device_id)["MultiProcessorCount"]


def compute_capability(device_id: int | None = None) -> int:
    """The device's compute capability as an int: 75 for sm_75, 90 for sm_90."""
    return _compute_capability(current_device() if device_id is None else device_id)


@functools.cache
def _compute_capability(device_id: int) -> int:
    return int(cupy().cuda.Device(device_id).compute_capability)   # CuPy gives "90"


@functools.cache
def describe(device_id: int) -> str:
    cp = cupy()
    props = cp.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name} (sm_{props['major']}{props['minor']})"
