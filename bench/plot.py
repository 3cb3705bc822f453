"""Draw achieved GB/s against size for each implementation, from `snr-triton bench --json`.

Usage: python bench/plot.py results.json out.png
"""

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    with open(src) as f:
        report = json.load(f)
    devices = report["devices"]
    fig, axes = plt.subplots(1, len(devices), figsize=(6.5 * len(devices), 4.5), squeeze=False)
    for ax, (device, entry) in zip(axes[0], devices.items()):
        series = defaultdict(list)
        for row in entry["rows"]:
            series[(row["impl"], row["dtype"])].append((row["numel"], row["gbps"]))
        copy = sorted({(row["numel"], row["copy_gbps"]) for row in entry["rows"]})
        for (impl, dtype), points in sorted(series.items()):
            points.sort()
            style = "--" if impl.startswith("AdamW") else "-"
            ax.plot([n for n, _ in points], [g for _, g in points], style, marker="o", label=f"{impl} ({dtype})")
        ax.plot([n for n, _ in copy], [g for _, g in copy], ":", color="gray", label="copy, same size")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parameters")
        ax.set_ylabel("achieved GB/s (ALGORITHM.md byte model)")
        ax.set_title(f"{device}: {entry['name']} ({report['date']})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
