"""Our variants in CuPy's kernel cache (`info`) and `clear-cache`, on a temporary CUPY_CACHE_DIR.

The cache files are real: cubins NVRTC compiles here for sm_80 (no GPU needed, as in
test_compile), stored in the two layouts CuPy 14 writes (cupy/cuda/_compiler_cache.py and
compiler.py: a SHA-1 of the payload in hex, then the cubin; from CuPy 14.2, for modules built
with name_expressions, a header with the mangled names before the cubin), beside another
library's kernels and files that are not cubins at all.
"""
import hashlib
import struct
import subprocess
import sys

import pytest

from flashattn_cupy import info, kernel_cache, kernels, planner

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
