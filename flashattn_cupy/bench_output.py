"""The benchmark's outputs beyond the terminal table: CSV, JSON, a plot, and the sampled error.

Every table the benchmark prints is Markdown; these read it back, so the files hold exactly
what the terminal showed. The plot needs matplotlib (the `notebook` extra)."""
from __future__ import annotations

import csv
import json
import re

import numpy as np


def table_rows(lines: list[str]) -> list[dict[str, str]]:
    """The Markdown tables among `lines` as one dict per row, each keyed by its table's header."""
    rows, header = [], None
    for line, after in zip(lines, lines[1:] + [""]):
        if not line.startswith("|") or line.startswith("| ---"):
            continue
        cells = [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]   # code marks: Markdown only
        if after.startswith("| ---"):
            header = cells
        elif header is not None and len(cells) == len(header):
            rows.append(dict(zip(header, cells)))
    return rows


def write_csv(lines: list[str], path: str) -> None:
    """The tables as CSV: a header line, then its rows (again for each table of another header)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer, header = csv.writer(f), None
        for row in table_rows(lines):
            if list(row) != header:
                header = list(row)
                writer.writerow(header)
            writer.writerow(row.values())


def write_json(lines: list[str], path: str) -> None:
    """{"title": the line above the table, "rows": [...]}, numbers as numbers, blanks as null."""
    def value(text: str):
        if text == "" or text == "-":
            return None
        if text in ("True", "False"):
            return text == "True"
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text
    title = next((line for line in lines if line and not line.startswith("|")), "")
    rows = [{key: value(cell) for key, cell in row.items()} for row in table_rows(lines)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"title": title, "rows": rows}, f, indent=1, ensure_ascii=False)
        f.write("\n")


# Columns that are not one implementation's speed
_NOT_SERIES = re.compile(r"^(dtype|d|N|B×H×N|causal|kernel|control)$|/|err")


def plot(lines: list[str], path: str) -> None:
    """TFLOP/s (GFLOP/s on the CPU) against N, one panel per (dtype, d), one line per
    implementation (dashed: causal)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = table_rows(lines)
    if not rows:
        raise ValueError("the benchmark printed no table to plot")
    series = [c for c in rows[0] if not _NOT_SERIES.search(c)]
    n_of = (lambda r: int(r["N"])) if "N" in rows[0] else (lambda r: int(r["B×H×N"].split("×")[-1]))
    panels = sorted({(r.get("dtype", "float32"), int(r["d"])) for r in rows}, key=lambda p: (p[0], p[1]))
    cols = min(len(panels), 4)
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(3.4 * cols, 2.9 * ((len(panels) + cols - 1) // cols)),
                             squeeze=False)
    unit = "TFLOP/s" if "B×H×N" in rows[0] else "GFLOP/s"
    for ax, (dtype, d) in zip(axes.flat, panels):
        mine = [r for r in rows if r.get("dtype", "float32") == dtype and int(r["d"]) == d]
        for n, name in enumerate(series):
            for causal, style in (("False", "-"), ("True", "--")):
                pts = sorted((n_of(r), float(r[name])) for r in mine if r["causal"] == causal and r[name] not in ("", "-"))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", markersize=3, color=f"C{n}",
                            label=name if causal == "False" else None)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype}, d = {d}", fontsize=9)
        ax.set_xlabel("N", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def sampled_error(O, q, k, v, causal: bool, rows: int = 16) -> float:
    """Max |O - O_ref| over `rows` query rows spread over N, of the first and the last head,
    with O_ref in float64 (host arrays (..., N, d); a full reference at N = 16k would not fit)."""
    O, q, k, v = (np.asarray(x).reshape(-1, *np.shape(x)[-2:]) for x in (O, q, k, v))
    Nq, Nk, d = q.shape[1], k.shape[1], q.shape[2]
    picks = np.unique(np.linspace(0, Nq - 1, rows).astype(np.int64))
    worst = 0.0
    for h in {0, q.shape[0] - 1}:
        qh, kh, vh = (x[h].astype(np.float64) for x in (q, k, v))
        S = qh[picks] @ kh.T / np.sqrt(d)
        if causal:
            S = np.where(np.arange(Nk)[None, :] > (picks + Nk - Nq)[:, None], -np.inf, S)
        P = np.exp(S - S.max(-1, keepdims=True))
        ref = (P / P.sum(-1, keepdims=True)) @ vh
        worst = max(worst, float(np.abs(O[h][picks].astype(np.float64) - ref).max()))
    return worst
