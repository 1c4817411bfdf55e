#!/usr/bin/env python3
"""Turns scripts/bench.sh's raw measurements (TSV) into the markdown tables it prints.

    report.py RESULTS.tsv

RESULTS.tsv columns (one row per measured run, header line first):
    workload  tool  run  wall_s  cpu_s  rss_kib  paused_ms  content_bytes  entries  layer_bytes  note  registry_cpu_s
(registry_cpu_s: the CPU the lab's registry spent during the run; absent in older files)

`tool` is one of: committer-gzip, committer-zstd, committer-none, ctr-diff (containerd's walking differ, the diff
step alone), ctr-diff+push (that diff plus uploading its output), buildah, and the physical-limit probes on the same
upperdir: tar|cat, tar>spool, tar|zstd, tar|zstd|push (the same, streamed to the registry), tar|pigz. Empty cells are "-".

Every figure in a table is the median over the runs (with 2 runs: their mean); wall time also shows min-max.
Then come the ratios of committer to each peer, and the performance targets with pass/fail.
"""
import csv
import statistics
import sys

TOOLS = ["committer-gzip", "committer-zstd", "committer-none", "ctr-diff", "ctr-diff+push", "buildah",
         "tar|cat", "tar>spool", "tar|zstd", "tar|zstd|push", "tar|pigz"]
TOOL_NAMES = {
    "committer-gzip": "committer commit+push, gzip",
    "committer-zstd": "committer commit+push, zstd",
    "committer-none": "committer commit+push, uncompressed",
    "ctr-diff": "containerd walking differ: `ctr snapshots diff` (diff step alone, gzip)",
    "ctr-diff+push": "containerd walking differ: diff + push of its blob",
    "buildah": "`buildah commit` to the registry (gzip)",
    # (a `|` in a markdown table cell is written `\|`, even inside backticks)
    "tar|cat": "probe: `tar -cf - UPPER \\| cat >/dev/null` (read + tar)",
    "tar>spool": "probe: `tar -cf SPOOL/x.tar UPPER` (the raw copy)",
    "tar|zstd": "probe: `tar \\| zstd -3 -T$(nproc)`",
    "tar|zstd|push": "probe: `tar \\| zstd -3 -T$(nproc)` streamed to the registry (hash + PATCH + PUT)",
    "tar|pigz": "probe: `tar \\| pigz -6 -p$(nproc)`",
}
WORKLOADS = ["tiny-small", "tiny-big", "many", "mixed", "upload"]
WORKLOAD_NAMES = {
    "tiny-small": "tiny, busybox base",
    "tiny-big": "tiny, big base",
    "many": "many small files",
    "mixed": "mixed",
    "upload": "big upload",
}
MIB = 1024 * 1024
GIB = 1024 * MIB


def num(v):
    return None if v in ("", "-", None) else float(v)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def load(path):
    rows = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            rows.setdefault((r["workload"], r["tool"]), []).append(r)
    return rows


def summary(runs):
    walls = [num(r["wall_s"]) for r in runs]
    return {
        "runs": len(runs),
        "wall": med(walls),
        "wall_min": min(w for w in walls if w is not None),
        "wall_max": max(w for w in walls if w is not None),
        "cpu": med([num(r["cpu_s"]) for r in runs]),
        "rss_mib": med([num(r["rss_kib"]) / 1024 if num(r["rss_kib"]) is not None else None for r in runs]),
        "rss_max_mib": max((num(r["rss_kib"]) or 0) / 1024 for r in runs),
        "paused_ms": med([num(r["paused_ms"]) for r in runs]),
        "content_bytes": med([num(r["content_bytes"]) for r in runs]),
        "entries": med([num(r["entries"]) for r in runs]),
        "layer_bytes": med([num(r["layer_bytes"]) for r in runs]),
        "reg_cpu": med([num(r.get("registry_cpu_s")) for r in runs]),
        "note": "; ".join(sorted({r["note"] for r in runs if r["note"] not in ("", "-")})),
    }


def f(v, fmt, dash="–"):
    return dash if v is None else format(v, fmt)


def human_bytes(b):
    if b is None:
        return "–"
    if b >= GIB:
        return f"{b / GIB:.2f} GiB"
    if b >= MIB:
        return f"{b / MIB:.0f} MiB"
    if b >= 1024:
        return f"{b / 1024:.0f} KiB"
    return f"{b:.0f} B"


def describe_workload(wl, s):
    """'mixed (1.31 GiB, 52,110 entries)' from committer's result."""
    src = s.get(("committer-gzip")) or s.get("committer-none") or s.get("committer-zstd")
    name = WORKLOAD_NAMES.get(wl, wl)
    if not src or src["content_bytes"] is None:
        return name
    return f"{name} ({human_bytes(src['content_bytes'])}, {src['entries']:,.0f} entries)"


def main():
    rows = load(sys.argv[1])
    by_wl = {}
    for (wl, tool), runs in rows.items():
        by_wl.setdefault(wl, {})[tool] = summary(runs)
    order = [w for w in WORKLOADS if w in by_wl] + sorted(w for w in by_wl if w not in WORKLOADS)

    print("| workload (diff) | tool | runs | wall s (min–max) | CPU s (user+sys) | registry CPU s | peak RSS MiB | pause ms | layer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for wl in order:
        s = by_wl[wl]
        first = True
        for tool in [t for t in TOOLS if t in s] + sorted(t for t in s if t not in TOOLS):
            x = s[tool]
            wl_cell = describe_workload(wl, s) if first else ""
            first = False
            wall = f"{x['wall']:.2f}"
            if x["runs"] > 1:
                wall += f" ({x['wall_min']:.2f}–{x['wall_max']:.2f})"
            name = TOOL_NAMES.get(tool, tool)
            if x["note"]:
                name += f" ({x['note']})"
            reg = f(x["reg_cpu"], ".2f") if x["reg_cpu"] else "–"
            print(f"| {wl_cell} | {name} | {x['runs']} | {wall} | {f(x['cpu'], '.2f')} | {reg} | "
                  f"{f(x['rss_mib'], '.1f')} | {f(x['paused_ms'], '.0f')} | {human_bytes(x['layer_bytes'])} |")

    print()
    print("Ratios, committer ÷ peer (below 1: committer is faster / uses less):")
    print()
    print("| workload | peer | gzip wall | zstd wall | gzip CPU | zstd CPU | gzip peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for wl in order:
        s = by_wl[wl]
        g, z = s.get("committer-gzip"), s.get("committer-zstd")
        for peer in ("ctr-diff", "ctr-diff+push", "buildah", "tar|zstd", "tar|zstd|push", "tar|pigz"):
            p = s.get(peer)
            if not p or not (g or z):
                continue

            def ratio(a, key):
                return f"{a[key] / p[key]:.2f}" if a and a[key] and p[key] else "–"

            print(f"| {WORKLOAD_NAMES.get(wl, wl)} | {TOOL_NAMES[peer].split(':')[0] if peer == 'buildah' else peer.replace('|', chr(92) + '|')} | "
                  f"{ratio(g, 'wall')} | {ratio(z, 'wall')} | {ratio(g, 'cpu')} | {ratio(z, 'cpu')} | "
                  f"{ratio(g, 'rss_mib')} |")

    print()
    print("Targets (2 cores):")
    print()
    print("| target | measured | met |")
    print("|---|---|---|")
    for line in targets(by_wl):
        print(line)


def targets(by_wl):
    out = []

    def row(name, measured, ok):
        out.append(f"| {name} | {measured} | {'–' if ok is None else ('yes' if ok else '**no**')} |")

    def get(wl, tool, key="wall"):
        x = by_wl.get(wl, {}).get(tool)
        return x[key] if x else None

    g, z, b, d = (get("mixed", t) for t in ("committer-gzip", "committer-zstd", "buildah", "ctr-diff"))
    gl, bl = get("mixed", "committer-gzip", "layer_bytes"), get("mixed", "buildah", "layer_bytes")
    if g and b:
        size = f"; layer {human_bytes(gl)} vs {human_bytes(bl)}" if gl and bl else ""
        row("mixed: gzip commit+push ≤ 0.5× buildah's wall, layer no larger than buildah's",
            f"{g / b:.2f}× ({g:.1f} s vs {b:.1f} s{size})", g / b <= 0.5 and (not gl or not bl or gl <= bl))
    pz, pg, pc = (get("mixed", t) for t in ("tar|zstd", "tar|pigz", "tar|cat"))
    if z and pz:
        row("mixed: zstd commit+push ≤ 1.3× `tar \\| zstd -3 -T$(nproc)` on the same upperdir",
            f"{z / pz:.2f}× ({z:.1f} s vs {pz:.1f} s)", z / pz <= 1.3)
    pzp = get("mixed", "tar|zstd|push")
    if z and pzp:
        row("mixed: zstd commit+push ÷ `tar \\| zstd` streamed to the same registry (the floor with the upload; for reference)",
            f"{z / pzp:.2f}× ({z:.1f} s vs {pzp:.1f} s)", None)
    if g and pg:
        row("mixed: gzip commit+push ÷ `tar \\| pigz -6 -p$(nproc)` (for reference)", f"{g / pg:.2f}× ({g:.1f} s vs {pg:.1f} s)",
            None)
    if pc and (g or z):
        row("mixed: `tar \\| cat` (reading and tarring the upperdir, the floor of any tool)", f"{pc:.1f} s", None)
    if d and g:
        zs = f"; zstd: {d / z:.1f}×" if z else ""
        row("mixed: ≥ 6× faster than containerd's walking differ's diff step (committer gzip, end to end)",
            f"{d / g:.1f}× ({d:.1f} s vs {g:.1f} s{zs})", d / g >= 6)
    ts, tb = get("tiny-small", "committer-gzip"), get("tiny-big", "committer-gzip")
    for wl, t in (("tiny-small", ts), ("tiny-big", tb)):
        if t is not None:
            row(f"{WORKLOAD_NAMES[wl]}: one-file change ≤ 0.1 s end to end (gzip)", f"{t:.3f} s", t <= 0.1)
    if ts and tb:
        row("tiny: big base ÷ busybox base ≤ 1.2×", f"{tb / ts:.2f}×", tb / ts <= 1.2)
    for tool in ("committer-gzip", "committer-zstd", "committer-none"):
        worst = max(((x["rss_max_mib"], wl) for wl, s in by_wl.items() for t, x in s.items() if t == tool),
                    default=None)
        if worst:
            row(f"{tool}: peak RSS ≤ 64 MiB everywhere", f"max {worst[0]:.1f} MiB ({WORKLOAD_NAMES.get(worst[1], worst[1])})",
                worst[0] <= 64)
    for wl in ("mixed", "upload", "many"):
        for tool in ("committer-gzip", "committer-zstd", "committer-none"):
            x = by_wl.get(wl, {}).get(tool)
            if not x or x["paused_ms"] is None or not x["content_bytes"]:
                continue
            gib = x["content_bytes"] / GIB
            per = x["paused_ms"] / 1000 / gib
            measured = f"{x['paused_ms'] / 1000:.2f} s for {human_bytes(x['content_bytes'])} = {per:.2f} s/GiB"
            if wl == "many":
                # 100-byte files: the pause is a cost per file, which a per-GiB target does not describe
                measured += f" ({x['paused_ms'] * 1000 / x['entries']:.0f} µs per entry)"
                row(f"{WORKLOAD_NAMES[wl]}, {tool}: pause (per-file cost; not judged per GiB)", measured, None)
            else:
                row(f"{WORKLOAD_NAMES[wl]}, {tool}: pause ≤ 1.5 s per GiB of diff", measured, per <= 1.5)
    return out


if __name__ == "__main__":
    main()
