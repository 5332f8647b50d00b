"""fa_window::seen (csrc/fa_mask.cuh), the key range a row sees in a tile, with which the tensor-core
kernels and split-KV decoding mask their edge tiles, gives the same mask as the per-score rule
(sees() and the nk bound) on every score of 400,000 random tiles: lengths up to int's limit
(64-bit diagonals), causal, windows of every width, tiles of 16 to 128 keys, and decoding warps
whose keys start past nk. The header is compiled for the host (tests/c/mask_ranges.cpp) with
UndefinedBehaviorSanitizer, so an overflow in the range's arithmetic fails too. No GPU needed."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_seen_matches_sees_on_every_score(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: the host build of csrc/fa_mask.cuh needs it")
    exe = tmp_path / "mask_ranges"
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-fsanitize=undefined", "-fno-sanitize-recover=all",
                            "-I", str(ROOT / "csrc"), str(ROOT / "tests/c/mask_ranges.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), "400000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and " 0 mismatches" in run.stdout, run.stdout + run.stderr
