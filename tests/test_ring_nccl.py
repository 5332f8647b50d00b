"""Ring attention over real NCCL (NcclGroup, cupyx.distributed), each rank a process started by
the launcher running tests/ring_worker.py; this process unshards what the ranks saved and checks
it against the float64 reference (tolerances.ring_bounds, with the GPU kernel's rounding) and
against flash_attention on one GPU over the full sequence.

On one GPU: world size 1 (bit for bit flash_attention), the transfers themselves (every dtype,
strided inputs, agree), and the double buffering (a ring of W steps whose transfers go through
NCCL back to the same rank: no kernel reads the buffer being received into). On several GPUs
(marked multigpu): 2, 4 and 8 ranks, causal and not, contiguous and zigzag. And the example and
the scaling benchmark run.
"""
import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ring_worker
from flashattn_cupy import _device, flash_attention, plan_for, reference
from flashattn_cupy.distributed import unshard
from tolerances import bounds, kernel_rounding, ring_bounds

WORKER = Path(__file__).with_name("ring_worker.py")
CASES = [f"{mask}-{layout}-{dtype}" for dtype in ("float32", "float16")
         for mask in ("full", "causal") for layout in ("contiguous", "zigzag")]


@pytest.fixture
def nccl():
    from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("NCCL is not available to CuPy: pip install nvidia-nccl-cu12 or nvidia-nccl-cu13")


def _run(out, nproc, *args):
    """The worker on nproc ranks through the launcher; what each rank saved under args[0]'s name."""
    ran = subprocess.run([sys.executable, "-m", "flashattn_cupy.distributed", "--nproc", str(nproc), str(WORKER),
                          str(out), *args], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return [dict(np.load(p)) for r in range(nproc) if (p := out / f"rank{r}_{args[0]}.npz").exists()]


def _check_cases(out, world):
    cp = _device.cupy()
    for name in CASES:
        mask, layout, dtype = name.split("-")
        parts = [np.load(out / f"rank{r}_{name}.npz") for r in range(world)]
        O = unshard([p["O"] for p in parts], layout=layout)
        L = unshard([p["L"] for p in parts], layout=layout, axis=-1)
        q, k, v = ring_worker.inputs(world, dtype)
        assert O.dtype == q.dtype and O.shape == q.shape and L.dtype == np.float32
        causal = mask == "causal"
        gq, gk, gv = (cp.asarray(x) for x in (q, k, v))
        kernel = {**kernel_rounding(plan_for(gq, gk, gv, causal=causal)), "out": dtype}
        tol = ring_bounds(q, k, v, world * (2 if layout == "zigzag" else 1), out=dtype, kernel=kernel)
        _within(name, O, L, *reference.attention(q, k, v, causal=causal), tol)
        single = bounds(q, k, v, **{**kernel, "out": dtype})
        O1, L1 = flash_attention(gq, gk, gv, causal=causal, return_lse=True)
        _within(name + " vs one GPU", O, L, cp.asnumpy(O1), cp.asnumpy(L1), (tol[0] + single[0], tol[1] + single[1]))


def _within(name, O, L, O_ref, L_ref, tol):
    err_O = float(np.abs(O.astype(np.float64) - O_ref).max())
    err_L = float(np.abs(L.astype(np.float64) - L_ref).max())
    assert err_O <= tol[0] and err_L <= tol[1], (f"{name}: max |O - O_ref| = {err_O:.3e} (bound {tol[0]:.3e}), "
                                                 f"max |L - L_ref| = {err_L:.3e} (bound {tol[1]:.3e})")


@pytest.mark.gpu
def test_world_one_through_nccl_is_flash_attention(nccl, tmp_path):
    cp = _device.cupy()
    _run(tmp_path, 1, "cases", *CASES)
    _check_cases(tmp_path, 1)
    for name in CASES:                  # one contiguous slice: one kernel call, merged in exactly
        mask, layout, dtype = name.split("-")
        if layout == "contiguous":
            saved = np.load(tmp_path / f"rank0_{name}.npz")
            O1, L1 = flash_attention(*(cp.asarray(x) for x in ring_worker.inputs(1, dtype)), causal=mask == "causal",
                                     return_lse=True)
            assert saved["O"].tobytes() == cp.asnumpy(O1).tobytes() and saved["L"].tobytes() == cp.asnumpy(L1).tobytes()


def _check_exchange(ranks):
    world = len(ranks)
    for r, got in enumerate(ranks):
        assert list(got["agree"]) == [True, world == 1]
        keys = [key[len("sent-"):] for key in got if key.startswith("sent-")]
        assert len(keys) == 9          # float32, float16, bfloat16 x contiguous, strided, transposed
        for key in keys:               # rank r holds rank r - 1's arrays, byte for byte
            np.testing.assert_array_equal(got[f"received-{key}"], ranks[(r - 1) % world][f"sent-{key}"])


@pytest.mark.gpu
def test_transfers_through_nccl_to_oneself(nccl, tmp_path):
    _check_exchange(_run(tmp_path, 1, "exchange"))


@pytest.mark.gpu
@pytest.mark.parametrize("world", [3, 4])
def test_the_transfer_never_writes_what_the_kernels_read(nccl, tmp_path, world):
    """A ring of `world` steps on one GPU: every step's kernels run while the next K/V are in
    flight through NCCL (the overlap), none of their inputs reaches into the receive buffer,
    the receive buffers alternate between two, and the result is attention over `world` copies
    of the keys (rank 0 gets its own K/V back at each step) within the argued bound."""
    saved, = _run(tmp_path, 1, "overlap", str(world))
    calls = saved["calls"]             # per kernel call: (transfer in flight, inputs reach its buffer)
    assert len(calls) == world and calls[:-1, 0].all() and not calls[-1, 0]
    assert not calls[:, 1].any()
    spans = saved["received_into"]     # [start, array, (low, high)]
    for t in range(world - 2):
        assert all(b_hi <= a_lo or a_hi <= b_lo for a_lo, a_hi in spans[t] for b_lo, b_hi in spans[t + 1])
        if t + 2 < world - 1:
            assert (spans[t] == spans[t + 2]).all()
    q, k, v = ring_worker.inputs(world, "float32", chunks=world)
    k_all, v_all = (np.concatenate([x] * world, axis=-2) for x in (k, v))
    cp = _device.cupy()
    kernel = {**kernel_rounding(plan_for(cp.asarray(q), cp.asarray(k), cp.asarray(v))), "out": "float32"}
    tol = ring_bounds(q, k_all, v_all, world, kernel=kernel)
    _within(f"overlap {world}", saved["O"], saved["L"], *reference.attention(q, k_all, v_all), tol)


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_on_several_gpus_equal_one_gpu(nccl, tmp_path, world):
    count = _device.cupy().cuda.runtime.getDeviceCount()
    if count < world:
        pytest.skip(f"needs {world} GPUs, this machine has {count}")
    _run(tmp_path, world, "cases", *CASES)
    _check_cases(tmp_path, world)
    _check_exchange(_run(tmp_path, world, "exchange"))


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.multigpu)])
def test_the_example(nccl, world):
    root = Path(__file__).resolve().parent.parent
    ran = subprocess.run([sys.executable, "-m", "flashattn_cupy.distributed", "--nproc", str(world),
                          str(root / "examples" / "ring_attention.py"), "--n", "1000", "--causal",
                          "--layout", "zigzag"],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    found = re.search(r"max \|O_ring - O_one_gpu\| = (\S+), max \|L_ring - L_one_gpu\| = (\S+)", ran.stdout)
    # float16 outputs, |O| <= max|v| < 8 here: each side's rounding is at most 2^-11 * 8 = 4e-3 and
    # the kernels' own 1e-3; L is float32 (1e-5). A wrong chunk, mask or merge moves O by O(0.1).
    assert float(found.group(1)) < 1e-2 and float(found.group(2)) < 1e-3, ran.stdout


@pytest.mark.gpu
def test_the_scaling_benchmark_runs(nccl, tmp_path):
    """On one GPU, tiny: both rows come out, with times and TFLOP/s (their size is for the
    benchmark, not a test, to judge)."""
    ran = subprocess.run([sys.executable, "-m", "flashattn_cupy.distributed.bench", "--gpus", "1", "--tokens-per-gpu",
                          "2048", "--tokens", "4096", "--heads", "2", "--d", "64", "--repeats", "2",
                          "--csv", str(tmp_path / "scaling.csv")], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    rows = list(csv.reader(open(tmp_path / "scaling.csv")))
    assert rows[0][:4] == ["scaling", "GPUs", "tokens", "tokens per GPU"]
    assert [r[:4] for r in rows[1:]] == [["weak", "1", "2048", "2048"], ["strong", "1", "4096", "4096"]]
    assert all(float(x) > 0 for r in rows[1:] for x in r[4:8])
