"""Our kernels on disk, on a temporary CUPY_CACHE_DIR: `info` and `clear-cache`, and how
kernels.get stores, reads back and recovers its files.

The files `info` reads are real: cubins NVRTC compiles here for sm_80 (no GPU needed, as in
test_compile), stored in the two layouts CuPy 14's cache wrote our kernels in before we kept our
own files (a SHA-1 of the payload in hex, then the cubin; from CuPy 14.2, for modules built with
name_expressions, a header with the mangled names before the cubin), beside another library's
kernels and files that are not cubins at all.

kernels.get runs here on a stand-in for CuPy whose NVRTC is the real one (the test extra's
wheels): stored once, read back without NVRTC, a damaged file compiled again and replaced, a
file or directory that cannot be written costing a compile and one KernelCacheWarning, and a
directory that cannot be created (before CuPy's import). test_kernel_cache_damage does it to
real files in fresh processes on the GPU.
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
SIMT = planner.plan(100, 100, 40, dtype="float32", smem_limit=64 * KB, arch=75).kernel   # flash_fwd_simt.cu
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
def test_the_variant_that_ran_is_stored(tmp_path):
    # a real process on a real device: the variant that ran is on disk, and nothing else of ours
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


class _NVRTC:
    """CuPy's NVRTC binding (cupy.cuda.nvrtc) over the real NVRTC of the test extra's wheels, so
    the stand-in below compiles with exactly the options kernels.py passes; records each compile."""

    class NVRTCError(RuntimeError):
        pass

    def __init__(self):
        from cuda.bindings import nvrtc
        self.lib, self.compiles = nvrtc, []

    def _check(self, result):
        if result[0] != self.lib.nvrtcResult.NVRTC_SUCCESS:
            raise self.NVRTCError(str(result[0]))
        return result[1] if len(result) > 1 else None

    def createProgram(self, src, name, headers, include_names):
        return self._check(self.lib.nvrtcCreateProgram(src.encode(), name.encode(), 0, [], []))

    def addNameExpression(self, program, name):
        self._check(self.lib.nvrtcAddNameExpression(program, name.encode()))

    def compileProgram(self, program, options):
        self.compiles.append(tuple(options))
        self._check(self.lib.nvrtcCompileProgram(program, len(options), [o.encode() for o in options]))

    def getProgramLog(self, program):
        log = b" " * self._check(self.lib.nvrtcGetProgramLogSize(program))
        self._check(self.lib.nvrtcGetProgramLog(program, log))
        return log.rstrip(b"\0 ").decode()

    def getLoweredName(self, program, name):
        return self._check(self.lib.nvrtcGetLoweredName(program, name.encode())).decode()

    def getCUBIN(self, program):
        cubin = b" " * self._check(self.lib.nvrtcGetCUBINSize(program))
        self._check(self.lib.nvrtcGetCUBIN(program, cubin))
        return cubin

    def destroyProgram(self, program):
        self._check(self.lib.nvrtcDestroyProgram(program))


class _FakeCupy:
    """What kernels.get touches of CuPy, on an sm_80 "device" whose driver takes any ELF file
    (a cubin) and refuses anything else, as cuModuleLoadData does."""

    __version__ = "14.9.9"

    def __init__(self):
        fake = self
        self.loads, self.attributes = [], []

        class driver:
            class CUDADriverError(RuntimeError):
                pass

            @staticmethod
            def funcSetAttribute(function, attribute, value):
                fake.attributes.append((function, attribute, value))

        class Module:
            def load(self, cubin):
                fake.loads.append(cubin)
                if not cubin.startswith(b"\x7fELF"):
                    raise driver.CUDADriverError("CUDA_ERROR_INVALID_IMAGE: device kernel image is invalid")

            def get_function(self, name):
                return types.SimpleNamespace(name=name, ptr=id(self))

        class Device(contextlib.nullcontext):
            compute_capability = "80"

        self.cuda = types.SimpleNamespace(
            Device=Device, driver=driver, nvrtc=_NVRTC(), function=types.SimpleNamespace(Module=Module),
            runtime=types.SimpleNamespace(runtimeGetVersion=lambda: 12090))


@pytest.fixture
def fake_cupy(monkeypatch, tmp_path):
    """A stand-in CuPy with an empty cache directory: tmp_path/cache."""
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is missing: install the test extra")
    monkeypatch.setattr(kernels, "_kernels", {})
    monkeypatch.setattr(kernels, "_store_warned", False)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    fake = _FakeCupy()
    monkeypatch.setattr(_device, "cupy", lambda: fake)
    _device._compute_capability.cache_clear()           # it is read from the stand-in
    yield fake
    _device._compute_capability.cache_clear()


SMALL = planner.plan(100, 100, 64, dtype="float16", smem_limit=48 * KB, arch=80)
OTHER = planner.plan(100, 100, 32, dtype="float16", smem_limit=48 * KB, arch=80)


def _fresh_process():
    kernels._kernels.clear()    # what a new process starts with; the file stays


def _stored(cache):
    files = [p for p, found in kernel_cache.scan(cache).items() if found]
    assert len(files) == 1 and files[0].name.startswith("flashattn_cupy_"), files
    return files[0]


def test_a_kernel_is_compiled_once_and_read_back_without_nvrtc(fake_cupy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.get(SMALL, 0).name.startswith("_Z13flash_fwd_mma")
        assert fake_cupy.cuda.nvrtc.compiles == [("-std=c++17", "-ftz=true", "-arch=sm_80")]
        path = _stored(tmp_path / "cache")
        assert kernel_cache.scan(tmp_path / "cache")[path] == [SMALL.kernel]     # what info and clear-cache see
        assert kernels.get(SMALL, 0) is kernels.get(SMALL, 0)                    # memoized in the process
        _fresh_process()
        assert kernels.get(SMALL, 0).name.startswith("_Z13flash_fwd_mma")
    assert len(fake_cupy.cuda.nvrtc.compiles) == 1 and fake_cupy.loads[0] == fake_cupy.loads[1]
    assert kernels.get(OTHER, 0) and len(fake_cupy.cuda.nvrtc.compiles) == 2   # another variant, another file
    assert len([p for p, found in kernel_cache.scan(tmp_path / "cache").items() if found]) == 2


def test_a_plan_past_48_kb_gets_the_shared_memory_it_asks_for(fake_cupy):
    big = planner.plan(100, 100, 128, dtype="float16", smem_limit=163 * KB, arch=80)
    assert big.smem_bytes > 48 * KB
    kernel = kernels.get(big, 0)
    kernels.get(SMALL, 0)
    # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, once, for the big plan alone
    assert fake_cupy.attributes == [(kernel.ptr, 8, big.smem_bytes)]


def test_the_file_name_follows_everything_the_cubin_depends_on(fake_cupy, tmp_path, monkeypatch):
    kernels.get(SMALL, 0)
    first = _stored(tmp_path / "cache")
    for change in (lambda: monkeypatch.setattr(type(fake_cupy), "__version__", "15.0.0"),
                   lambda: monkeypatch.setattr(fake_cupy.cuda.runtime, "runtimeGetVersion", lambda: 13000),
                   lambda: monkeypatch.setattr(fake_cupy.cuda.Device, "compute_capability", "86")):
        change()
        _device._compute_capability.cache_clear()       # a process on another device
        _fresh_process()
        kernels.get(SMALL, 0)
    names = {p.name for p, found in kernel_cache.scan(tmp_path / "cache").items() if found}
    assert first.name in names and len(names) == 4 and len(fake_cupy.cuda.nvrtc.compiles) == 4
    assert fake_cupy.cuda.nvrtc.compiles[-1][-1] == "-arch=sm_86"


def _refused(data):
    mangled, cubin = kernel_cache.unpack(data)
    return kernel_cache.pack(mangled, b"\0" * len(cubin))     # the hash holds, the driver refuses it


@pytest.mark.parametrize("damage", [
    lambda data: data[:len(data) // 2],                          # truncated
    lambda data: data[:-100] + bytes(100),                       # garbled
    lambda data: b"",
    _refused,
], ids=["truncated", "garbled", "empty", "refused-by-the-driver"])
def test_a_damaged_file_is_compiled_again_and_replaced(fake_cupy, tmp_path, damage):
    kernels.get(SMALL, 0)
    path = _stored(tmp_path / "cache")
    good = path.read_bytes()
    path.write_bytes(damage(good))
    _fresh_process()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.get(SMALL, 0).name == kernel_cache.unpack(good)[0]
    assert len(fake_cupy.cuda.nvrtc.compiles) == 2 and path.read_bytes() == good   # NVRTC is deterministic


def test_a_file_that_cannot_be_read_or_written_costs_a_compile_and_one_warning(fake_cupy, tmp_path):
    kernels.get(SMALL, 0)
    path = _stored(tmp_path / "cache")
    path.unlink()
    path.mkdir()                                        # a directory in the file's place: for root too
    _fresh_process()
    with pytest.warns(kernel_cache.KernelCacheWarning) as caught:
        assert kernels.get(SMALL, 0).name.startswith("_Z13flash_fwd_mma")
    message = str(caught[0].message)
    assert len(caught) == 1 and f"could not store the compiled kernel {SMALL.kernel} in {path.parent}" in message
    assert "(IsADirectoryError" in message and f"make {path.parent} writable or point CUPY_CACHE_DIR" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once a process
        _fresh_process()
        kernels.get(SMALL, 0)
    assert len(fake_cupy.cuda.nvrtc.compiles) == 3 and not list(path.parent.glob(".flashattn_cupy_*"))


def test_a_directory_that_is_missing_or_cannot_be(fake_cupy, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "new" / "cache"))   # set after CuPy's import made one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.get(SMALL, 0)
    assert _stored(tmp_path / "new" / "cache")                             # created, as CuPy would
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "file" / "cache"))  # a file in the way
    _fresh_process()
    with pytest.warns(kernel_cache.KernelCacheWarning, match=r"\((FileExistsError|NotADirectoryError)"):
        kernels.get(SMALL, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.get(OTHER, 0)


def test_an_nvrtc_error_says_what_failed(fake_cupy, monkeypatch):
    monkeypatch.setattr(kernels, "source", lambda filename: "this is not CUDA;")
    with pytest.raises(RuntimeError, match=r"NVRTC could not compile flash_fwd_mma<.*-arch=sm_80 .*\n.*error"):
        kernels.get(SMALL, 0)
    assert kernels._kernels == {}
