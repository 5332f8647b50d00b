"""The walkthrough notebook runs top to bottom (GPU cells skip with a message without a GPU), so
it cannot rot. nbclient and ipykernel come with the test extra (through the notebook extra)."""
import re
from pathlib import Path

import pytest

from flashattn_cupy import _device

# in the test extra (so CI and `pip install -e ".[test]"` have them); a machine whose environment
# cannot be installed into (a GPU image, say) skips this test, saying why
nbformat = pytest.importorskip("nbformat", reason="nbformat is missing: pip install -e '.[test]'")
NotebookClient = pytest.importorskip("nbclient", reason="nbclient is missing: pip install -e '.[test]'").NotebookClient
pytest.importorskip("ipykernel", reason="ipykernel is missing: pip install -e '.[test]'")
pytest.importorskip("matplotlib", reason="matplotlib is missing: pip install -e '.[test]'")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def test_walkthrough_runs_and_plots():
    nb = nbformat.read(EXAMPLES / "flash_attention_walkthrough.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()   # raises on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    out = "\n".join(_text(c) for c in code)
    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3                                   # memory, weights from L, TFLOP/s
    # the NumPy tiles agree with the N x N formula to float64 rounding; the C twin to float32's
    tiled = re.search(r"max \|dO\| = (\S+), max \|dL\| = (\S+)", out)
    assert max(float(tiled.group(1)), float(tiled.group(2).rstrip(","))) < 1e-12
    assert "shared memory 36.62 KB of 48.00 KB" in out        # the seed's configuration, planned
    c_twin = re.search(r"max \|O - O_ref\| = (\S+), max \|L - L_ref\| = (\S+)", out)
    assert float(c_twin.group(1).rstrip(";")) < 1e-5
    why = _device.gpu_unavailable_reason()
    assert ("skipped: no usable GPU" in out) == bool(why)
    naive = [float(x) for x in re.findall(r"naive +(\S+) MB", out)]
    flash = [float(x) for x in re.findall(r"flash +(\S+) MB", out)]
    assert naive[-1] > 1000 and flash[len(naive) - 1] < 3     # N = 8192: the N x N matrix vs O and L
