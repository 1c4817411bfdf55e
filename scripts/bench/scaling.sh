# The scaling workload of scripts/bench.sh (BENCH_WORKLOADS=scaling), sourced by it: how the pause, the wall time,
# the spool's peak and the committer's RSS grow with the diff. A sandbox grows its diff in files of 256 MiB of
# random data to 0.5, 1, 2, 4, 8 GiB (BENCH_QUICK: 0.25, 0.5, 1; BENCH_SCALING_GIB="…" to choose) and is committed
# at each size (zstd, to keep the wall time about the capture), on:
#   ext4   the machine's filesystem: the main lab, spool $work/spool (per-file kernel copies, copy_file_range)
#   ext4-tar  the same with COMMITTER_CAPTURE=tar (the raw tar written and hashed while paused, as before)
#   xfs    a second lab on a sparse loop-mounted XFS with reflink (COMMITTER_LAB_XFS, at most 12 GiB), containerd's
#          root and the spool on it (the capture clones)
# and, as the disk's limit, a `dd` of the same files into the spool (bs=1M, no sync: the capture does not sync
# either). Spool peak: sampled every 0.1 s, from `du` on ext4, from the filesystem's used blocks on the private
# XFS (du counts shared clone blocks as if copied). Rows go to $work/scaling.tsv; scaling_report prints a table
# and plots pause against diff size (scripts/bench_scaling_plot.py, PNG next to the report).
# Uses bench.sh's say, die, measure, $work, $here, $BIN, $NS, $lab and $small_base.

SCALING_TSV=""

# scaling_sizes: the diff sizes in MiB.
scaling_sizes() {
  local g
  if [ -n "${BENCH_SCALING_GIB:-}" ]; then
    for g in $BENCH_SCALING_GIB; do awk -v g="$g" 'BEGIN { printf "%d\n", g * 1024 }'; done
  elif [ "${BENCH_QUICK:-0}" = 1 ]; then
    echo 256 512 1024 | tr ' ' '\n'
  else
    echo 512 1024 2048 4096 8192 | tr ' ' '\n'
  fi
}

# scaling_spool_sampler MODE DIR OUT: writes the peak spool usage (KiB) to OUT until killed.
scaling_spool_sampler() {
  local mode=$1 dir=$2 out=$3 base used peak=0
  base=$(df -k --output=used "$dir" | tail -n 1)
  while :; do
    if [ "$mode" = df ]; then
      used=$(($(df -k --output=used "$dir" | tail -n 1) - base))
    else
      used=$(du -sk "$dir" 2>/dev/null | cut -f1)
    fi
    [ "${used:-0}" -gt "$peak" ] && peak=$used && echo "$peak" >"$out"
    sleep 0.1
  done
}

# scaling_on LABEL LABDIR SPOOL SAMPLER CAPTURE_ENV: grows a sandbox's diff through the sizes, committing at each.
scaling_on() {
  local label=$1 ldir=$2 spool=$3 sampler=$4 capture=$5
  local addr ctrb runc cg id=scale-$1 have=0 mib n rootfs
  addr=$(. "$ldir/env" && echo "$CONTAINERD_ADDRESS")
  ctrb=$(. "$ldir/env" && echo "$CTR")
  runc=$(. "$ldir/env" && echo "$LAB_RUNC_ROOT")
  cg=$(. "$ldir/env" && echo "$LAB_CGROUP_PARENT")
  local c=("$ctrb" -a "$addr" -n "$NS")
  local image=$small_base
  [ "$ldir" = "$lab" ] || image=$("$here/lab.sh" base-image "$ldir" benchbase --namespace "$NS")
  "${c[@]}" run -d --runc-root "$runc" --cgroup "$cg/$id" "$image" "$id" sleep 1000000 >/dev/null
  rootfs=$ldir/state/io.containerd.runtime.v2.task/$NS/$id/rootfs
  for _ in $(seq 1 100); do [ -d "$rootfs/data" ] && break; sleep 0.1; done
  for mib in $(scaling_sizes); do
    while [ "$have" -lt "$mib" ]; do
      n=$((have / 256))
      "${c[@]}" tasks exec --exec-id "grow-$n" "$id" sh -c "mkdir -p /scale && head -c 1048576 /dev/urandom > /tmp/seed && for i in \$(seq 1 256); do cat /tmp/seed; done > /scale/f$n && rm /tmp/seed"
      have=$((have + 256))
    done
    sync
    # the disk's limit: the same bytes copied into the spool
    local t0 t1 dd_s
    t0=$(date +%s%N)
    for f in "$rootfs"/scale/f*; do dd if="$f" of="$spool/dd-limit" bs=1M oflag=append conv=notrunc status=none; done
    t1=$(date +%s%N)
    rm -f "$spool/dd-limit"
    dd_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
    sync
    rm -f "$work/spool-peak"
    scaling_spool_sampler "$sampler" "$spool" "$work/spool-peak" &
    local sp=$!
    measure "$work/logs/scaling-$label-$mib.log" env CONTAINERD_ADDRESS="$addr" CONTAINERD_NAMESPACE="$NS" $capture \
      "$BIN" commit --container "$id" --image "$REGISTRY/bench/scaling-$label-$mib:1" --plain-http \
      --compression zstd --spool-dir "$spool" --log-format json
    kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null || true
    cp "$work/out" "$work/logs/scaling-$label-$mib.json"
    scaling_drop_blob "$work/out"
    local paused cap files
    read -r paused cap files < <(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); p = d["paused"]; print(p["ms"], p.get("capture"), d["entries"])' "$work/out")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$mib" "$paused" "$T_WALL" "$(cat "$work/spool-peak" 2>/dev/null || echo 0)" \
      "$T_RSS" "$dd_s" "$cap" "$files" >>"$SCALING_TSV"
    say "scaling $label $mib MiB: paused ${paused} ms ($cap), wall ${T_WALL}s, spool peak $(($(cat "$work/spool-peak" 2>/dev/null || echo 0) / 1024)) MiB, rss $((T_RSS / 1024)) MiB, dd ${dd_s}s"
  done
  "${c[@]}" tasks delete -f "$id" >/dev/null 2>&1 || true
  "${c[@]}" containers delete "$id" >/dev/null 2>&1 || true
}

# scaling_drop_blob RESULT: deletes the pushed layer's blob from the main lab registry's storage (disk room).
scaling_drop_blob() {
  local d
  d=$(python3 -c 'import json, sys; l = json.load(open(sys.argv[1]))["layer"]; print(l["digest"].split(":")[1] if l else "")' "$1")
  [ -n "$d" ] || return 0
  find "$lab/registry" -type d -path "*/blobs/sha256/${d:0:2}/$d" -prune -exec rm -rf {} + 2>/dev/null || true
}

# scaling_python: a python3 that has matplotlib (a pyenv shim first on PATH may not), or nothing.
scaling_python() {
  local p
  for p in python3 /usr/bin/python3; do
    "$p" -c 'import matplotlib' 2>/dev/null && { echo "$p"; return 0; }
  done
  return 0
}

scaling_run() {
  if [ -z "$(scaling_python)" ]; then
    say "installing python3-matplotlib (the scaling plot)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-matplotlib </dev/null >/dev/null ||
      say "python3-matplotlib could not be installed: no plot"
  fi
  SCALING_TSV=$work/scaling.tsv
  printf 'fs\tdiff_mib\tpaused_ms\twall_s\tspool_peak_kib\trss_kib\tdd_s\tcapture\tentries\n' >"$SCALING_TSV"
  local fss=${BENCH_SCALING_FS:-ext4 ext4-tar xfs}
  local fs
  for fs in $fss; do
    case "$fs" in
    ext4) scaling_on ext4 "$lab" "$work/spool" du "" ;;
    ext4-tar) scaling_on ext4-tar "$lab" "$work/spool" du COMMITTER_CAPTURE=tar ;;
    xfs)
      say "scaling: starting a lab on a 12 GiB sparse XFS with reflink"
      COMMITTER_LAB_XFS=12G "$here/lab.sh" start "$work/lab-xfs" >&2
      scaling_on xfs "$work/lab-xfs" "$work/lab-xfs/xfs/spool" df ""
      "$here/lab.sh" stop "$work/lab-xfs" >&2
      ;;
    *) die "BENCH_SCALING_FS: ext4 ext4-tar xfs, not $fs" ;;
    esac
  done
}

# scaling_report DIR STAMP: the table (markdown, stdout) and the plot (DIR/bench-STAMP-scaling.png).
scaling_report() {
  [ -n "$SCALING_TSV" ] && [ -f "$SCALING_TSV" ] || return 0
  echo
  echo "### Scaling: pause against diff size (zstd; files of 256 MiB, 1 MiB of random data repeated)"
  echo
  python3 - "$SCALING_TSV" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("| fs | diff | capture | paused | s/GiB paused | dd to spool | paused/dd | wall | spool peak | peak/diff | RSS |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    gib = int(r["diff_mib"]) / 1024
    p = int(r["paused_ms"]) / 1000
    dd = float(r["dd_s"])
    peak = int(r["spool_peak_kib"]) / 1024
    print(f'| {r["fs"]} | {gib:g} GiB | {r["capture"]} | {p:.3f} s | {p / gib:.3f} | {dd:.2f} s | {p / dd if dd else 0:.2f} | '
          f'{float(r["wall_s"]):.1f} s | {peak:.0f} MiB | {peak / int(r["diff_mib"]):.2f} | {int(r["rss_kib"]) / 1024:.0f} MiB |')
PY
  cp "$SCALING_TSV" "$1/bench-$2-scaling.tsv"
  local py
  py=$(scaling_python)
  if [ -n "$py" ]; then
    "$py" "$here/bench_scaling_plot.py" "$SCALING_TSV" "$1/bench-$2-scaling.png" >&2 &&
      echo && echo "Plot: bench-$2-scaling.png"
  else
    say "python3-matplotlib missing: no scaling plot"
  fi
}
