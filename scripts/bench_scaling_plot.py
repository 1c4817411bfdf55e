#!/usr/bin/env python3
"""Plots the scaling workload of scripts/bench.sh: pause against diff size, one line per filesystem/capture,
with the dd of the same bytes to the spool as the disk's limit (dashed) and the pause targets (dotted:
1.5 s/GiB copying, 0.1 s/GiB with reflink).

    bench_scaling_plot.py SCALING.tsv OUT.png

SCALING.tsv columns: fs diff_mib paused_ms wall_s spool_peak_kib rss_kib dd_s capture entries
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(tsv, out):
    rows = list(csv.DictReader(open(tsv), delimiter="\t"))
    by_fs = {}
    for r in rows:
        by_fs.setdefault(r["fs"], []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fs, rs in by_fs.items():
        rs.sort(key=lambda r: int(r["diff_mib"]))
        x = [int(r["diff_mib"]) / 1024 for r in rs]
        line, = ax.plot(x, [int(r["paused_ms"]) / 1000 for r in rs], marker="o",
                        label=f'{fs}: pause ({rs[0]["capture"]})')
        ax.plot(x, [float(r["dd_s"]) for r in rs], linestyle="--", color=line.get_color(), alpha=0.6,
                label=f"{fs}: dd of the same bytes to the spool")
    xs = sorted({int(r["diff_mib"]) / 1024 for r in rows})
    if xs:
        ax.plot(xs, [1.5 * g for g in xs], linestyle=":", color="grey", label="target, copy: 1.5 s/GiB")
        ax.plot(xs, [0.1 * g for g in xs], linestyle=":", color="black", label="target, reflink: 0.1 s/GiB")
    ax.set_xlabel("diff (GiB)")
    ax.set_ylabel("sandbox paused (s)")
    ax.set_title("committer: pause against diff size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
