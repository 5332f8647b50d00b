"""Our variants in CuPy's kernel cache (`info`) and `clear-cache`, on a temporary CUPY_CACHE_DIR.

The cache files are real: cubins NVRTC compiles here for sm_80 (no GPU needed, as in
test_compile), stored in the two layouts CuPy 14 writes (cupy/cuda/_compiler_cache.py and
compiler.py: a SHA-1 of the payload in hex, then the cubin; from CuPy 14.2, for modules built
with name_expressions, a header with the mangled names before the cubin), beside another
library's kernels and files that are not cubins at all.

And the recovery from a cache that cannot be used, on the CPU: a directory that cannot be
created (before CuPy's import), and, with a stand-in for CuPy, every failure kernels.get falls
back from (compiling in memory, with a KernelCacheWarning). test_kernel_cache_damage does it to
real cache files on the GPU.
"""
import contextlib
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import types
import warnings

import pytest

from flashattn_cupy import _device, info, kernel_cache, kernels, planner

KB = 1024
MMA = planner.plan(100, 100, 64, dtype="float16", causal=True, smem_limit=163 * KB, arch=80).kernel
SIMT = planner.plan(100, 100, 40, dtype="float32", smem_limit=163 * KB, arch=80, fp32="simt").kernel
OTHER_SOURCE = """
template <int N> __global__ void other_scale(float* x) { x[threadIdx.x] *= N; }
extern "C" __global__ void other_plain(float* x) { x[threadIdx.x] += 1.0f; }
"""


def _compile(source: str, names: list[str]):
    from cuda.core import Program, ProgramOptions
    program = Program(source, "c++", ProgramOptions(arch="sm_80", std="c++17"))
    return program.compile("cubin", name_expressions=names)


def _cupy_file(cubin: bytes, mangled: list[bytes] | None = None) -> bytes:
    payload = cubin
    if mangled is not None:   # CuPy >= 14.2 with name_expressions
        payload = b"\x93CUPYNE\x00" + struct.pack("<I", len(mangled))
        payload += b"".join(struct.pack("<I", len(m)) + m for m in mangled) + cubin
    return hashlib.sha1(payload).hexdigest().encode() + payload


@pytest.fixture(scope="module")
def cubins():
    pytest.importorskip("cuda.core", reason="cuda.core is missing: install the test extra")
    mma = _compile(kernels.source(kernels.SOURCES["flash_fwd_mma"]), [MMA])
    simt = _compile(kernels.source(kernels.SOURCES["flash_fwd_simt"]), [SIMT])
    other = _compile(OTHER_SOURCE, ["other_scale<3>"])
    return mma, simt, other


@pytest.fixture
def cache(tmp_path, monkeypatch, cubins):
    mma, simt, other = cubins
    path = tmp_path / "kernel_cache"
    path.mkdir()
    files = {
        "a" * 40 + ".cubin": _cupy_file(mma.code),                                        # CuPy 14.1
        "b" * 40 + ".cubin": _cupy_file(mma.code, [mma.symbol_mapping[MMA]]),             # the same, 14.2
        "c" * 40 + ".cubin": _cupy_file(simt.code, [simt.symbol_mapping[SIMT]]),
        "c" * 40 + ".cubin.cu": kernels.source(kernels.SOURCES["flash_fwd_simt"]).encode(),  # CUPY_CACHE_SAVE_CUDA_SOURCE
        "d" * 40 + ".cubin": _cupy_file(other.code, [other.symbol_mapping["other_scale<3>"]]),
        "notes.txt": b"not a cubin: flash_fwd_mma<float, 64> _Z13flash_fwd_mmaIxE",
    }
    for name, data in files.items():
        (path / name).write_bytes(data)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(path))
    return path


def _command(*args):
    result = subprocess.run([sys.executable, "-m", "flashattn_cupy", "clear-cache", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_variants_are_read_from_the_files(cache):
    found = {p.name: v for p, v in kernel_cache.scan().items()}
    assert found == {"a" * 40 + ".cubin": [MMA], "b" * 40 + ".cubin": [MMA], "c" * 40 + ".cubin": [SIMT],
                     "c" * 40 + ".cubin.cu": [], "d" * 40 + ".cubin": [], "notes.txt": []}
    assert sorted(p.name for p in kernel_cache.ours(kernel_cache.scan())) == sorted(
        ["a" * 40 + ".cubin", "b" * 40 + ".cubin", "c" * 40 + ".cubin", "c" * 40 + ".cubin.cu"])


def test_info_lists_the_variants(cache):
    out = info.report()
    assert f"Kernel cache: {cache} (6 files, " in out
    assert "  flashattn_cupy's: 2 variants in 4 files (" in out
    assert f"\n    {MMA} (2 files: compiled for 2 devices, compilers or CuPy versions)\n" in out
    assert f"\n    {SIMT}\n" in out
    assert "other_scale" not in out


def test_clear_cache_removes_only_ours(cache):
    before = sorted(p.name for p in cache.iterdir())
    out = _command("--dry-run")
    assert out.startswith(f"Would remove 4 files of flashattn_cupy's kernels from {cache} (")
    assert f"  {'c' * 40}.cubin: {SIMT}\n" in out and "2 other files would stay" in out
    assert sorted(p.name for p in cache.iterdir()) == before
    out = _command()
    assert out.startswith(f"Removed 4 files of flashattn_cupy's kernels from {cache} (")
    assert "2 other files left (other kernels); --all removes those too" in out
    assert sorted(p.name for p in cache.iterdir()) == ["d" * 40 + ".cubin", "notes.txt"]
    assert _command().startswith(f"Removed 0 files of flashattn_cupy's kernels from {cache}")


def test_clear_cache_all(cache):
    out = _command("--all")
    assert out == f"Removed 6 files (CuPy's whole kernel cache) from {cache} ({out.split('(')[-1]}"
    assert list(cache.iterdir()) == []
    assert _command() == f"{cache}: empty; nothing to remove\n"


def test_clear_cache_without_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "none"))
    assert _command() == f"{tmp_path / 'none'}: no such directory; nothing to remove\n"
    assert "--all" in _command("--help")


@pytest.mark.gpu
def test_cupy_caches_what_the_planner_named(tmp_path):
    # CuPy itself writes the cache: the variant that ran, and nothing else of ours
    script = ("import cupy as cp, flashattn_cupy as fa\n"
              "q = cp.ones((2, 100, 64), cp.float16)\n"
              "fa.flash_attention(q, q, q)\n"
              "print(fa.plan_for(q, q, q).kernel)\n")
    env = {**__import__("os").environ, "CUPY_CACHE_DIR": str(tmp_path)}
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    kernel = ran.stdout.strip()
    assert [v for v in kernel_cache.scan(tmp_path).values() if v] == [[kernel]]


def test_a_cache_dir_that_cannot_be_created_gives_way_to_a_temporary_one(tmp_path, monkeypatch):
    """CuPy 14.2's import creates CUPY_CACHE_DIR and fails if it cannot (here a file is in the
    way, which stops root too); flashattn_cupy checks first, before it imports CuPy."""
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    assert kernel_cache.ensure_cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "cache"
    monkeypatch.setenv("CUPY_CACHE_DIR", str(blocked))
    with pytest.warns(kernel_cache.KernelCacheWarning) as caught:
        temporary = kernel_cache.ensure_cache_dir()
    try:
        assert temporary.is_dir() and os.environ["CUPY_CACHE_DIR"] == str(temporary) != str(blocked)
        message = str(caught[0].message)
        assert f"CuPy's kernel cache directory {blocked} cannot be created (NotADirectoryError" in message
        assert f"caches compiled kernels in {temporary} instead" in message and "Point CUPY_CACHE_DIR" in message
    finally:
        shutil.rmtree(temporary)


class _FakeCupy:
    """What kernels.get touches of CuPy, with a cache that fails until compiling in memory:
    RawModule.get_function raises `failure` unless CUPY_CACHE_IN_MEMORY=1 (or always)."""

    class cuda:
        class Device(contextlib.nullcontext):
            pass

        class driver:
            class CUDADriverError(RuntimeError):
                pass

    def __init__(self, failure, always=False):
        self.failure, self.always, self.compiles = failure, always, []

    def RawModule(self, code, options, name_expressions):
        fake = self

        class Module:
            def get_function(self, name):
                in_memory = os.environ.get("CUPY_CACHE_IN_MEMORY") == "1"
                fake.compiles.append((name, in_memory))
                if fake.always or not in_memory:
                    raise fake.failure
                return types.SimpleNamespace(name=name)
        return Module()


@pytest.fixture
def fake_cupy(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_kernels", {})
    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))

    def install(failure, always=False):
        fake = _FakeCupy(failure, always)
        monkeypatch.setattr(_device, "cupy", lambda: fake)
        return fake
    return install


SMALL = planner.plan(100, 100, 64, dtype="float16", smem_limit=48 * KB, arch=80)
OTHER = planner.plan(100, 100, 32, dtype="float16", smem_limit=48 * KB, arch=80)


@pytest.mark.parametrize("failure", [
    PermissionError(13, "Permission denied", "cache/tmpx1y2"),        # a read-only directory
    IsADirectoryError(21, "Is a directory", "cache/abc.cubin"),      # a file it cannot read
    _FakeCupy.cuda.driver.CUDADriverError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid"),
], ids=["read-only", "unreadable", "refused-by-the-driver"])
def test_a_cache_failure_compiles_in_memory_with_a_warning(fake_cupy, tmp_path, failure):
    fake = fake_cupy(failure)
    with pytest.warns(kernel_cache.KernelCacheWarning) as caught:
        kernel = kernels.get(SMALL, 0)
    assert kernel.name == SMALL.kernel and fake.compiles == [(SMALL.kernel, False), (SMALL.kernel, True)]
    message = str(caught[0].message)
    assert f"CuPy's kernel cache {tmp_path} could not be used for {SMALL.kernel} ({type(failure).__name__}" in message
    assert f"make {tmp_path} writable or point CUPY_CACHE_DIR" in message and "clear-cache" in message
    assert os.environ["CUPY_CACHE_IN_MEMORY"] == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the rest of the process: in memory, no warning
        assert kernels.get(OTHER, 0).name == OTHER.kernel
    assert fake.compiles[2:] == [(OTHER.kernel, True)]


def test_an_error_compiling_in_memory_meets_too_is_raised(fake_cupy):
    fake = fake_cupy(_FakeCupy.cuda.driver.CUDADriverError("CUDA_ERROR_OUT_OF_MEMORY"), always=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(_FakeCupy.cuda.driver.CUDADriverError, match="OUT_OF_MEMORY"):
            kernels.get(SMALL, 0)
    assert len(fake.compiles) == 2 and "CUPY_CACHE_IN_MEMORY" not in os.environ   # restored
    assert kernels._kernels == {}


def test_other_errors_are_not_taken_for_the_cache(fake_cupy):
    fake = fake_cupy(ValueError("an NVRTC compile error, say"))
    with pytest.raises(ValueError, match="NVRTC"):
        kernels.get(SMALL, 0)
    assert fake.compiles == [(SMALL.kernel, False)]
