"""The README's speed plot: TFLOP/s of ours and of PyTorch's SDPA backends, from the benchmark's CSV.

    python examples/plot_benchmarks.py            # examples/bench_gpu.csv -> examples/bench_gpu.png

The CSV is `python -m flashattn_cupy bench --device gpu --csv PATH` (the GPU table of
BENCHMARKS.md); rerun this script whenever that file is refreshed. One panel per dtype row of
the table at one problem size, one group of bars per (d, causal), and above our bar its ratio
to the fastest SDPA backend in the same run. Needs matplotlib (the `notebook` extra).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PANELS = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32 (3xTF32, the default)",
          "float32-simt": "float32 on the CUDA cores", "tf32": "float32, allow_tf32=True"}
BARS = ("ours", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn")


def plot(rows: list[dict[str, str]], shape: str, out: Path, gpu: str = "H100") -> None:
    rows = [r for r in rows if r["B×H×N"] == shape and r["dtype"] in PANELS]
    if not rows:
        raise SystemExit(f"no rows of {sorted(PANELS)} at B×H×N = {shape} in the CSV")
    panels = [p for p in PANELS if any(r["dtype"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    width = 0.8 / len(BARS)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in rows if r["dtype"] == panel]
        for n, name in enumerate(BARS):
            xs = [x + n * width for x, r in enumerate(mine) if r[name]]   # blank: that backend cannot run it
            ax.bar(xs, [float(r[name]) for r in mine if r[name]], width, color=f"C{n}", label=name)
        for x, r in enumerate(mine):
            ax.text(x, float(r["ours"]), f"{float(r['ours / best SDPA']):.2f}×", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(mine))],
                      [f"d={r['d']}{', causal' if r['causal'] == 'True' else ''}" for r in mine],
                      fontsize=7, rotation=20)
        ax.set_title(PANELS[panel], fontsize=9)
        ax.set_ylabel("TFLOP/s", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.12)   # room for the labels
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"{gpu}, B×H×N = {shape}: TFLOP/s of ours (its label: ours ÷ the fastest SDPA backend) "
                 "and of PyTorch's SDPA backends, measured in one run", y=0.99, fontsize=9)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=len(BARS), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(out, dpi=110, metadata={"Software": None})   # no version stamp: reruns give the same file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=HERE / "bench_gpu.csv", help="the benchmark's CSV")
    parser.add_argument("--out", type=Path, default=HERE / "bench_gpu.png", help="the PNG to write")
    parser.add_argument("--shape", default="4×16×4096", help="the B×H×N column to plot (default 4×16×4096)")
    parser.add_argument("--gpu", default="H100", help="the GPU the CSV was measured on, for the title")
    args = parser.parse_args(argv)
    with args.csv.open(encoding="utf-8", newline="") as f:
        plot(list(csv.DictReader(f)), args.shape, args.out, args.gpu)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
