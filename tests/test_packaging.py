"""The wheel carries csrc/, and an installed wheel finds its kernel source and runs the C twin."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("flashattn_cupy-*.whl")
    return path


def test_wheel_contains_the_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for source in sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".c", ".h")):
        assert f"flashattn_cupy/csrc/{source}" in names
    assert any(n.startswith("flashattn_cupy/_flash_c") and n.endswith(".so") for n in names)
    assert "flashattn_cupy/integrations/transformers.py" in names
    assert "flashattn_cupy/py.typed" in names


# A user's code, type-checked against the installed wheel: mypy reads the package's hints only
# because the wheel carries py.typed (PEP 561), and then catches a misspelled backend.
USER_CODE = """
import numpy as np
from flashattn_cupy import flash_attention, plan
q = np.zeros((2, 8, 100, 64), np.float32)
O, L = flash_attention(q, q, q, return_lse=True, backend="cdua")
reveal_type(plan(100, 100, 64).grid)
"""


def test_installed_wheel_is_typed(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    (tmp_path / "user.py").write_text(USER_CODE)
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "user.py"],
                            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)),
                            capture_output=True, text=True, timeout=300)
    assert "missing library stubs or py.typed marker" not in result.stdout, result.stdout
    assert 'user.py:5: error: Argument "backend" to "flash_attention" has incompatible type "Literal[\'cdua\']"' \
        in result.stdout, result.stdout
    assert 'Revealed type is "tuple[int, int, int]"' in result.stdout, result.stdout


def test_installed_wheel_finds_its_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    script = (
        "import numpy as np, flashattn_cupy, flashattn_cupy.kernels as k\n"
        "assert flashattn_cupy.__file__.startswith(%r), flashattn_cupy.__file__\n"
        "src = k.source('flash_fwd_simt.cu')\n"
        "assert 'flash_fwd_simt' in src and 'struct fa_half' in src  # the header is inlined\n"
        "q = np.ones((4, 8), np.float32)\n"
        "print(flashattn_cupy.flash_attention(q, q, q)[0, 0])\n" % str(target))
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.0"
