"""csrc/fa_mask.cuh's integer logic, which every CUDA kernel runs, against brute force on the host
(tests/c/mask_host.cpp, built with g++ and UndefinedBehaviorSanitizer; no GPU needed):
fa_window::tiles, the key tiles a Q tile's rows see (exhaustively on small sequences: the first
and last tile with a seen key, nothing seen in a skipped tile; sampled on lengths up to 2^31 - 1),
fa_window::covers (every row of a warp sees every key of a tile, by brute force), fa_window::seen
(the key range a row sees in an edge tile, with which the tensor-core kernels and decoding mask:
score by score against sees(), decoding's warps that start past nk included), and fa_block::of,
the causal order of the grid (a bijection onto (Q tile, head, batch) with the heaviest Q tiles
first, on small grids exhaustively and sampled on grids of CUDA's largest dimensions)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mask_logic_matches_brute_force(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed: the host build of csrc/fa_mask.cuh needs it")
    exe = tmp_path / "mask_host"
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-fsanitize=undefined", "-fno-sanitize-recover=all",
                            "-I", str(ROOT / "csrc"), str(ROOT / "tests/c/mask_host.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), "20000"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and " 0 failures" in run.stdout, run.stdout + run.stderr
