#!/usr/bin/env python3
"""Plots scripts/bench.sh's raw measurements: commit time against diff size, one line per tool.

    bench_plot.py [--title TITLE] OUT.png RESULTS.tsv...

RESULTS.tsv is the bench's raw TSV (several: their rows together, e.g. the tiny workloads of one run and the mixed
of another) (see scripts/bench/report.py for its columns). The x axis is the workload's diff
size (the uncompressed tar committer read: contentBytes of its result, shared by every tool on that workload), the
y axis the median wall time of each tool there; both logarithmic. The physical-limit probes (tar | cat, tar | zstd,
tar | pigz) are drawn dashed. Needs matplotlib (Debian: python3-matplotlib; bench.sh installs it when missing).
"""
import csv
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {
    # tool: (label, colour, line style, marker)
    "committer-gzip": ("committer commit+push, gzip", "tab:blue", "-", "o"),
    "committer-zstd": ("committer commit+push, zstd", "tab:green", "-", "o"),
    "committer-none": ("committer commit+push, uncompressed", "tab:olive", "-", "o"),
    "buildah": ("buildah commit (gzip)", "tab:red", "-", "s"),
    "ctr-diff+push": ("containerd walking differ + push (gzip)", "tab:purple", "-", "^"),
    "tar|cat": ("probe: tar | cat", "grey", "--", "x"),
    "tar|zstd": ("probe: tar | zstd -3 -T(nproc)", "tab:green", "--", "x"),
    "tar|zstd|push": ("probe: tar | zstd, streamed to the registry", "tab:cyan", ":", "x"),
    "tar|pigz": ("probe: tar | pigz -6 -p(nproc)", "tab:blue", "--", "x"),
}


def num(v):
    return None if v in ("", "-", None) else float(v)


def main():
    args = sys.argv[1:]
    title = "commit time against diff size"
    if args[:1] == ["--title"] and len(args) > 1:
        title, args = args[1], args[2:]
    if len(args) < 2:
        sys.exit("usage: bench_plot.py [--title TITLE] OUT.png RESULTS.tsv...")
    out, tsvs = args[0], args[1:]
    rows = [r for t in tsvs for r in csv.DictReader(open(t, newline=""), delimiter="\t")]
    size = {}  # workload -> diff bytes, from committer's own result
    for r in rows:
        b = num(r["content_bytes"])
        if r["tool"].startswith("committer-") and b:
            size.setdefault(r["workload"], []).append(b)
    size = {wl: statistics.median(bs) for wl, bs in size.items()}
    walls = {}  # tool -> workload -> [wall]
    for r in rows:
        w = num(r["wall_s"])
        if r["workload"] in size and w is not None and r["tool"] in STYLE:
            walls.setdefault(r["tool"], {}).setdefault(r["workload"], []).append(w)

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for tool, (label, colour, ls, marker) in STYLE.items():
        pts = sorted((size[wl], statistics.median(ws)) for wl, ws in walls.get(tool, {}).items())
        if not pts:
            continue
        ax.plot([p[0] / 2**20 for p in pts], [p[1] for p in pts], ls, marker=marker, color=colour, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    labels = {}
    for wl, b in size.items():
        labels.setdefault(b, []).append(wl)
    for b, wls in labels.items():  # the workloads' names at the bottom, in axes coordinates
        ax.text(b / 2**20, 0.02, " ".join(sorted(wls)), transform=ax.get_xaxis_transform(), fontsize=8,
                color="dimgrey", rotation=90, ha="right", va="bottom")
    ax.set_xlabel("diff size (uncompressed tar, MiB)")
    ax.set_ylabel("wall time, s (median of the runs)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    print(f"bench_plot.py: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
