"""Our kernel files on the GPU: each run is a fresh process (CuPy reads CUPY_CACHE_DIR when
imported) that computes one attention on a temporary cache directory, damaged between runs. The
results must be right every time; a warm cache loads the kernel without NVRTC (libnvrtc never
mapped into the process); a damaged file is compiled again and replaced in silence; a file or
directory that refuses to be written gives one KernelCacheWarning (kernels._compile).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flashattn_cupy import _device, kernel_cache, plan_for
from tolerances import assert_attention_close, kernel_rounding

# One attention from NumPy inputs (the child imports CuPy only through flashattn_cupy, as a NumPy
# user's program does); the warnings it met and what ran, as JSON on stdout. With READ_ONLY set
# and run as root (whom chmod does not stop), the directory is bind-mounted read-only in a mount
# namespace of the child's own first; exit 77 if the system does not allow that.
CHILD = r"""
import ctypes, json, os, sys, warnings
import numpy as np
ro = os.environ.get("READ_ONLY")
if ro and os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
    for call in (lambda: libc.unshare(0x00020000),                                  # CLONE_NEWNS
                 lambda: libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None),  # nothing leaks out
                 lambda: libc.mount(ro.encode(), ro.encode(), None, MS_BIND, None),
                 lambda: libc.mount(None, ro.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)):
        if call() != 0:
            print(os.strerror(ctypes.get_errno()))
            sys.exit(77)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import flashattn_cupy as fa
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 100, 64)).astype(np.float16) for _ in range(3))
    O, L = fa.flash_attention(q, k, v, causal=True, return_lse=True, backend="cuda")
np.savez(sys.argv[1], q=q, k=k, v=v, O=O, L=L)
with open("/proc/self/maps") as maps:
    nvrtc = "libnvrtc" in maps.read()
print(json.dumps({"warnings": [str(w.message) for w in caught if w.category.__name__ == "KernelCacheWarning"],
                  "nvrtc": nvrtc, "dir": os.environ.get("CUPY_CACHE_DIR")}))
"""


def _run(tmp_path, cache, **env):
    out = tmp_path / "out.npz"
    ran = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CUPY_CACHE_DIR": str(cache), **env})
    if ran.returncode == 77:
        pytest.skip(f"cannot make a directory read-only for root here (mount namespace: {ran.stdout.strip()})")
    assert ran.returncode == 0, ran.stderr
    saved = np.load(out)
    cp = _device.cupy()
    plan = plan_for(*(cp.asarray(saved[x]) for x in "qkv"), causal=True)
    assert_attention_close(saved["O"], saved["L"], saved["q"], saved["k"], saved["v"], causal=True,
                           **kernel_rounding(plan))
    return json.loads(ran.stdout.strip().splitlines()[-1])


def _our_file(cache):
    files = [p for p, found in kernel_cache.scan(cache).items() if found]
    assert len(files) == 1 and files[0].name.startswith("flashattn_cupy_"), files
    return files[0]


@pytest.mark.gpu
def test_a_warm_cache_needs_no_nvrtc(tmp_path):
    cache = tmp_path / "cache"
    cold = _run(tmp_path, cache)
    assert cold["warnings"] == [] and cold["nvrtc"]
    warm = _run(tmp_path, cache)
    assert warm["warnings"] == [] and not warm["nvrtc"]


@pytest.mark.gpu
def test_damaged_files_are_compiled_again_and_replaced(tmp_path):
    """Truncated, garbled, empty, or whole but refused by the driver (a cubin of zeros)."""
    cache = tmp_path / "cache"
    _run(tmp_path, cache)
    path = _our_file(cache)
    good = path.read_bytes()
    mangled, cubin = kernel_cache.unpack(good)
    for damaged in (good[:len(good) // 2], good[:-100] + bytes(100), b"",
                    kernel_cache.pack(mangled, bytes(len(cubin)))):
        path.write_bytes(damaged)
        got = _run(tmp_path, cache)
        assert got["warnings"] == [] and got["nvrtc"]
        assert kernel_cache.unpack(path.read_bytes()) is not None


@pytest.mark.gpu
def test_an_unreadable_cache_file(tmp_path):
    """A directory where the file should be (open() fails for root too): compiled, one warning."""
    cache = tmp_path / "cache"
    _run(tmp_path, cache)
    path = _our_file(cache)
    path.unlink()
    path.mkdir()
    got = _run(tmp_path, cache)
    assert len(got["warnings"]) == 1 and "IsADirectoryError" in got["warnings"][0]


@pytest.mark.gpu
def test_a_read_only_cache_directory(tmp_path):
    """The kernel is compiled, the file cannot be written; one warning, nothing left behind."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if os.geteuid() != 0:
        cache.chmod(0o555)
    try:
        got = _run(tmp_path, cache, READ_ONLY=str(cache))
    finally:
        cache.chmod(0o755)
    assert len(got["warnings"]) == 1
    assert f"make {cache} writable or point CUPY_CACHE_DIR to a writable directory" in got["warnings"][0]
    assert list(cache.iterdir()) == []


@pytest.mark.gpu
def test_a_cache_directory_that_cannot_be_created(tmp_path):
    """A file in the way: CuPy 14.2 would fail at import; a temporary directory serves instead."""
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "cache"
    got = _run(tmp_path, blocked)
    assert len(got["warnings"]) == 1 and f"{blocked} cannot be created" in got["warnings"][0]
    assert got["dir"] != str(blocked)
    assert not os.path.exists(got["dir"])              # removed at exit
