"""The benchmark's file outputs (CSV, JSON, plot) read back what the terminal table showed, and its
sampled error against float64 sees a wrong row. The timings themselves are the benchmark's job."""
import csv
import json

import numpy as np
import pytest

from flashattn_cupy import flash_attention, reference
from flashattn_cupy.bench_output import plot, sampled_error, table_rows, write_csv, write_json

LINES = ["A title line", "",
         "| dtype | d | B×H×N | causal | ours | sdpa-flash | ours / target | ours max err | kernel |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
         "| float16 | 64 | 16×16×1024 | False | 141.15 | 223.35 | 0.632 | 3.9e-04 | `k<1>` |",
         "| float16 | 64 | 4×16×4096 | True | 155.06 |  | 0.664 | 2.0e-04 | `k<2>` |",
         "", "Other head dims:", "",
         "| dtype | d | N = 4096 | kernel |", "| --- | --- | --- | --- |",
         "| float32 | 40 | 26.2 | `k<3>`, 4 splits |"]


def test_table_rows_keys_each_table_by_its_header():
    rows = table_rows(LINES)
    assert [r["kernel"] for r in rows] == ["k<1>", "k<2>", "k<3>, 4 splits"]   # no Markdown code marks left
    assert rows[1]["sdpa-flash"] == "" and rows[2]["N = 4096"] == "26.2"


def test_csv_and_json_hold_the_table(tmp_path):
    write_csv(LINES, tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0][:5] == ["dtype", "d", "B×H×N", "causal", "ours"] and table[3] == ["dtype", "d", "N = 4096", "kernel"]
    write_json(LINES, tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    assert doc["title"] == "A title line"
    first = doc["rows"][0]
    assert first["d"] == 64 and first["ours"] == 141.15 and first["causal"] is False and first["kernel"] == "k<1>"
    assert doc["rows"][1]["sdpa-flash"] is None


def test_plot_draws_speed_against_n(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the notebook extra)")
    plot(LINES[:6], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no table"):
        plot(["nothing here"], tmp_path / "q.png")


@pytest.mark.parametrize("causal", [False, True])
def test_sampled_error_measures_against_float64(causal):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 3, n, 16)).astype(np.float32) for n in (37, 53, 53))
    O = flash_attention(q, k, v, causal=causal)
    exact = reference.attention(q, k, v, causal=causal)[0]
    err = sampled_error(O, q, k, v, causal, rows=37)
    # every row of the first and last head is sampled: the error is the C twin's on those heads
    heads = (exact - O.astype(np.float64)).reshape(6, 37, 16)[[0, 5]]
    assert err == pytest.approx(float(np.abs(heads).max()), rel=1e-6, abs=1e-12) and err < 1e-5
    wrong = O.copy()
    wrong[1, 2, 36, 0] += 0.5          # the last head's last row, always sampled
    assert sampled_error(wrong, q, k, v, causal) >= 0.5 - 1e-5
