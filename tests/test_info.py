"""`python -m flashattn_cupy info`: versions, backends and why not, devices, cache, sample plans."""
import subprocess
import sys

import pytest

import flashattn_cupy
from flashattn_cupy import _device, info, kernel_cache, planner


def _info(*args):
    result = subprocess.run([sys.executable, "-m", "flashattn_cupy", "info", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_command():
    out = _info()
    assert out.startswith(f"flashattn_cupy {flashattn_cupy.__version__} (")
    assert "  c: available" in out and "  reference: available" in out
    why = _device.gpu_unavailable_reason()
    assert ("  cuda: available" in out) if not why else (f"  cuda: unavailable: {why}" in out)
    assert f"Kernel cache: {kernel_cache.cache_dir()}" in out
    assert f"C twin (float32): {planner.plan(4096, 4096, 64, backend='c')}" in out
    assert "Plans for Nq = Nk = 4096, d = 64, causal = False:" in out


def test_info_plans_the_asked_shape():
    out = _info("--n", "100", "--d", "40", "--dtype", "float32", "--causal")
    assert "Plans for Nq = Nk = 100, d = 40, causal = True:" in out
    assert "d=40, causal=True" in out
    result = subprocess.run([sys.executable, "-m", "flashattn_cupy", "info", "--d", "300"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--d in 1..256" in result.stderr


def test_without_a_gpu_the_reference_devices_are_planned(monkeypatch):
    monkeypatch.setattr(_device, "_probe", lambda: (None, "CuPy found no CUDA GPU"))
    out = info.report(N=512, d=64, dtype="float32")
    assert "  cuda: unavailable: CuPy found no CUDA GPU" in out
    # the seed's configuration on its 48 KB device, and what the planner picks for an H100
    assert "planned for sm_75, 48 KB (the seed's budget): cuda flash_fwd_simt<float, 32, 32, 64, 256, 0>" in out
    h100 = planner.plan(512, 512, 64, dtype="float32", smem_limit=227 * 1024, arch=90)
    assert f"planned for sm_90, 227 KB (H100): {h100}" in out
    assert "CUDA: takes float32, float16, bfloat16, not float64" in info.report(dtype="float64")


def test_kernel_cache_is_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    assert "not created yet" in info.report()
    (tmp_path / "cache").mkdir()
    assert f"Kernel cache: {tmp_path / 'cache'} (empty)" in info.report()
    (tmp_path / "cache" / "a.cubin").write_bytes(b"x" * 2**20)
    assert f"Kernel cache: {tmp_path / 'cache'} (1 files, 1.0 MB)\n  none of them is flashattn_cupy's" in info.report()


@pytest.mark.gpu
def test_info_on_a_gpu(cp):
    out = _info()
    assert "  cuda: available" in out and f"CuPy {cp.__version__}" in out and "NVRTC" in out
    assert f"GPU 0: {_device.describe(0)}, shared memory per block" in out
    assert "CUDA (float16) on GPU 0: cuda flash_fwd_" in out
