"""`python -m flashattn_cupy` runs, prints the seed-style samples, and exits 0."""
import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flashattn_cupy import _device, planner

NUMBERS = r"\[(-?\d+\.\d{4}, ){4}-?\d+\.\d{4}\]"


def _demo(*args):
    result = subprocess.run([sys.executable, "-m", "flashattn_cupy", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_c_part():
    out = _demo("--backend", "c")
    tiles = planner.plan(256, 256, 64, backend="c")   # the demo shows the planner's choice
    assert f"N=256, d=64, Br={tiles.Br}, Bc={tiles.Bc}" in out
    assert re.search(r"O\[0\]\[0:5\] = " + NUMBERS, out)
    assert re.search(r"L\[0:5\] = " + NUMBERS, out)
    error = float(re.search(r"Max error vs float64 reference: O (\S+),", out).group(1))
    assert error < 1e-5


def test_demo_options():
    out = _demo("--backend", "c", "--n", "100", "--d", "40", "--causal", "--dtype", "float64", "--seed", "3")
    assert "N=100, d=40" in out and "causal=True, float64" in out
    assert "--causal" in _demo("--help")


def test_demo_whole():
    out = _demo()
    if _device.gpu_unavailable_reason():
        assert "skipped: no usable GPU" in out
    else:
        assert "Device:" in out and "Shared mem:" in out and out.count("O[0][0:5]") == 2


def test_demo_rejects_bad_options():
    result = subprocess.run([sys.executable, "-m", "flashattn_cupy", "--d", "300"], capture_output=True, text=True)
    assert result.returncode == 2 and "--d must be in 1..256" in result.stderr


def _example(name):
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "examples" / name)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_numpy_example():
    out = _example("numpy_attention.py")
    assert float(re.search(r"max \|O - reference\| = (\S+),", out).group(1)) < 1e-5


def test_transformer_layer_example():
    out = _example("transformer_layer.py")
    errors = re.search(r"max \|attention - naive float64\| = (\S+), max \|layer - naive float64 layer\| = (\S+)", out)
    # float32 rounding of the projections and the attention (~1e-6 here); a wrong mask, head or
    # layout moves the attention by O(1) and the layer with it
    assert float(errors.group(1)) < 1e-5 and float(errors.group(2)) < 1e-4


@pytest.mark.gpu
def test_cupy_example():
    out = _example("cupy_attention.py")
    assert float(re.search(r"on head 0 = (\S+)", out).group(1)) < 1e-2   # fp16 output rounding


def test_cpu_benchmark_command_runs(tmp_path):
    plot = importlib.util.find_spec("matplotlib") is not None
    out = _demo("bench", "--device", "cpu", "--quick", "--no-memory", "--csv", str(tmp_path / "cpu.csv"),
                "--json", str(tmp_path / "cpu.json"), *(("--plot", str(tmp_path / "cpu.png")) if plot else ()))
    rows = [line for line in out.splitlines() if line.startswith("| 64 |") or line.startswith("| 128 |")]
    assert len(rows) == 4 and all(float(row.split("|")[4]) > 0 for row in rows)
    with open(tmp_path / "cpu.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:4] == ["d", "N", "causal", "C twin"]
    assert table[1:] == [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    doc = json.loads((tmp_path / "cpu.json").read_text(encoding="utf-8"))
    assert doc["title"].startswith("C twin vs naive NumPy")
    assert [[r["d"], r["N"], r["causal"]] for r in doc["rows"]] == [[64, 1024, False], [64, 1024, True],
                                                                   [128, 1024, False], [128, 1024, True]]
    assert all(r["C twin"] == float(row.split("|")[4]) for r, row in zip(doc["rows"], rows))
    if plot:
        assert (tmp_path / "cpu.png").read_bytes().startswith(b"\x89PNG")


def test_speed_plot_example(tmp_path):
    """examples/plot_benchmarks.py redraws the README's plot from the CSV, and says so when the
    size asked for is not in it."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the notebook extra)")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "plot.png"
    result = subprocess.run([sys.executable, str(root / "examples" / "plot_benchmarks.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    result = subprocess.run([sys.executable, str(root / "examples" / "plot_benchmarks.py"), "--shape", "9×9×9",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "no rows" in result.stderr


def test_shipped_gpu_csv_reads():
    """The notebook's speed plot reads this file: a header naming ours and the rivals, numbers below."""
    root = Path(__file__).resolve().parent.parent
    with open(root / "examples" / "bench_gpu.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"dtype", "d", "B×H×N", "causal", "ours", "sdpa-flash"} <= set(rows[0])
    assert all(float(row["ours"]) > 0 for row in rows)


@pytest.mark.parametrize("args, device", [((), "cpu"), (("--decode",), "gpu"), (("--extras",), "gpu"),
                                          (("--features",), "gpu"), (("--dtypes", "float16"), "gpu"),
                                          (("--device", "gpu"), "gpu")])
def test_bench_flags_pick_the_device(monkeypatch, args, device):
    """The GPU-only tables (--decode, --features, --extras, --dtypes) measure the GPU without
    --device gpu (they once ran the CPU table instead, silently)."""
    from flashattn_cupy import bench
    ran = []
    monkeypatch.setattr(bench, "bench_cpu", lambda *a: ran.append("cpu") or [])
    monkeypatch.setattr(bench, "bench_gpu", lambda *a: ran.append("gpu") or [])
    for module, name in (("bench_decode", "bench_decode"), ("bench_extras", "bench_extras"),
                         ("bench_features", "bench_features")):
        monkeypatch.setattr(importlib.import_module(f"flashattn_cupy.{module}"), name,
                            lambda *a: ran.append("gpu") or [])
    assert bench.main(list(args)) == 0 and ran == [device]


def test_bench_refuses_gpu_tables_on_the_cpu(capsys):
    from flashattn_cupy import bench
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--decode"])
    assert "--decode measures the GPU: drop --device cpu" in capsys.readouterr().err
