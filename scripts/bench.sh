#!/usr/bin/env bash
# Benchmark: committer against containerd's walking differ and `buildah commit`, on the embedded lab.
#
#   scripts/bench.sh                 the full run (tens of minutes on 2 cores)
#   BENCH_QUICK=1 scripts/bench.sh   a smoke version with small workloads (a few minutes)
#
# Starts a private containerd + registry (scripts/lab.sh), builds each workload inside a real sandbox container
# and, identically, inside a buildah working container, then times in alternating runs:
#   committer gzip / zstd   `committer commit --plain-http` (the whole job: locate, pause, diff, compress, push)
#   ctr-diff                containerd's walking differ on the container's snapshot (`ctr snapshots diff`, the diff
#                           step of `nerdctl commit` alone; its CPU and peak RSS are containerd's, where it runs)
#   ctr-diff+push           the same plus uploading its gzip blob to the registry
#   buildah                 `buildah commit … docker://REGISTRY/…` (Debian's buildah, private storage root)
#   probes (many, mixed)    the physical limits on the same sandbox upperdir, with standard tools:
#                           `tar -C UPPER -cf - . | cat >/dev/null` (reading + tarring alone), `tar … -cf SPOOL/x.tar`
#                           (the raw copy a paused capture makes), `tar | zstd -3 -T$(nproc)`, `tar | pigz -6 -p$(nproc)`
# Workloads:
#   tiny    one file changed, on the busybox base and on a big base (busybox + a copy of host /usr/share,
#           ~650 MB / ~50k files; built offline with umoci and cached in BENCH_CACHE)
#   many    200k files of 100 bytes
#   mixed   copies of host /usr/share and /usr/bin (bind-mounted read-only at /host-usr) + 300 MiB of random data
#   upload  2 GiB of random data, committer only (--compression none and zstd): its peak RSS while uploading
#   scaling pause, wall, spool peak and RSS against diff size, on ext4 and a loop-mounted XFS with reflink
#           (scripts/bench/scaling.sh; not in the default set; BENCH_SCALING_GIB, BENCH_SCALING_FS)
# Wall time (ms), CPU (user+sys) and peak RSS from /usr/bin/time, pause from committer's result (paused.ms; pausedMs before result schema 1).
# Prints markdown tables (medians, ratios, the performance targets) on stdout and saves them with the raw TSV in
# BENCH_RESULTS_DIR, with a plot of commit time against diff size (bench-STAMP.png, scripts/bench_plot.py).
# Progress goes to stderr. Needs root, the lab's packages (scripts/install-deps.sh), buildah,
# /usr/bin/time, cargo. Everything it starts or mounts is removed on exit, failure or Ctrl-C; kernel parameters
# and the page cache are left alone (runs are warm-cache).
#
# Environment:
#   BENCH_QUICK=1            small workloads (mixed = /usr/share/doc + 30 MiB, 20k files, big base = /usr/share/man,
#                            256 MiB upload), 2 tiny runs and 1 of the others
#   BENCH_RUNS_TINY=N        runs per tool on the tiny workloads (default 3)
#   BENCH_RUNS_BIG=N         runs per tool on many and mixed (default 2)
#   BENCH_WORKLOADS="…"      a subset of: tiny many mixed upload (default: all, in this order)
#   BENCH_MIXED_PATHS="…"    what mixed copies from host /usr (default "share bin"; quick: "share/doc")
#   BENCH_MIXED_RANDOM_MIB=N the random data mixed adds (default 300; quick: 30)
#   BENCH_CACHE=DIR          where the big base's OCI layout is kept between runs (default /var/cache/committer-bench)
#   BENCH_RESULTS_DIR=DIR    where the report and raw TSV go (default target/bench)
#   BENCH_TMPDIR=DIR         parent of the work dir (default /var/tmp; needs ~15 GB free for the full run)
#   BENCH_KEEP=1             keep the work dir (logs, results) after a run; the lab is stopped either way
#   BENCH_PROFILE=1          one more committer run per compression on many/mixed, under `perf record` (cpu-clock),
#                            summarised by thread and function in BENCH_RESULTS_DIR/profile-*.txt (needs perf)
#   COMMITTER_BIN=PATH       the committer to measure (default: `cargo build --release`, target/release/committer)
#   COMMITTER_REV=TEXT       with COMMITTER_BIN: the revision to name in the report
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
NS=committer-test

die() { echo "bench.sh: $*" >&2; exit 1; }
say() { echo "bench.sh: $(date +%T) $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (containerd, runc, overlay mounts)"
"$root/scripts/install-deps.sh"
# probe_peers (the deflate lane's probes): adds the probes' tools (and the plot's matplotlib) to `peers` when missing
probe_peers() {
  command -v zstd >/dev/null 2>&1 || peers+=(zstd)
  command -v pigz >/dev/null 2>&1 || peers+=(pigz)
  /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1 || peers+=(python3-matplotlib)
}

# The peers and the timer, beyond the lab's packages: installed when missing, as the lab's are.
peers=()
command -v buildah >/dev/null 2>&1 || peers+=(buildah)
[ -x /usr/bin/time ] || peers+=(time)
if [ "${BENCH_PROFILE:-0}" = 1 ] && ! command -v perf >/dev/null 2>&1; then peers+=(linux-perf); fi
probe_peers
if [ ${#peers[@]} -gt 0 ]; then
  say "installing ${peers[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${peers[@]}" </dev/null >/dev/null ||
    { apt-get update -qq </dev/null && apt-get install -y -qq --no-install-recommends "${peers[@]}" </dev/null >/dev/null; } ||
    die "apt-get install ${peers[*]} failed"
fi
for b in buildah umoci skopeo curl python3 sha256sum unshare tar /usr/bin/time zstd pigz; do
  command -v "$b" >/dev/null 2>&1 || die "'$b' not found after installing"
done

if [ "${BENCH_QUICK:-0}" = 1 ]; then
  RUNS_TINY=${BENCH_RUNS_TINY:-2} RUNS_BIG=${BENCH_RUNS_BIG:-1}
  MIXED_PATHS=${BENCH_MIXED_PATHS:-share/doc} MIXED_RANDOM_MIB=${BENCH_MIXED_RANDOM_MIB:-30} MANY_FILES=20000
  BIG_BASE_PATHS="share/man" UPLOAD_MIB=256
else
  RUNS_TINY=${BENCH_RUNS_TINY:-3} RUNS_BIG=${BENCH_RUNS_BIG:-2}
  MIXED_PATHS=${BENCH_MIXED_PATHS:-share bin} MIXED_RANDOM_MIB=${BENCH_MIXED_RANDOM_MIB:-300} MANY_FILES=200000
  BIG_BASE_PATHS="share" UPLOAD_MIB=2048
fi
WORKLOADS=${BENCH_WORKLOADS:-tiny many mixed upload}
CACHE=${BENCH_CACHE:-/var/cache/committer-bench}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$root/target/bench}
CLK_TCK=$(getconf CLK_TCK)

# ---- cleanup: everything below registers what it creates here ------------------------------------------------
work="" build_tmp="" bic_created=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ $rc != 0 ] && [ -d "$work/logs" ]; then
      local kept
      kept=$RESULTS_DIR/bench-failed-$(date +%Y%m%d-%H%M%S)
      mkdir -p "$kept" && cp -a "$work/logs" "$work/results.tsv" "$kept/" 2>/dev/null
      say "logs of the failed run kept in $kept"
    fi
    say "cleaning up (buildah storage, lab, $work)"
    [ -x "$work/bin/bah" ] && buildah_cleanup
    "$here/lab.sh" stop "$work/lab" >/dev/null 2>&1 || say "lab.sh stop failed"
    [ -d "$work/lab-xfs" ] && { "$here/lab.sh" stop "$work/lab-xfs" >/dev/null 2>&1 || say "lab.sh stop (xfs) failed"; }
    local m left=""
    for m in $(awk -v d="$work" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
      umount -l "$m" 2>/dev/null || left="$left $m"
    done
    if [ -n "$left" ]; then
      say "still mounted, leaving $work:$left"
    elif [ "${BENCH_KEEP:-0}" = 1 ]; then
      say "BENCH_KEEP=1: left $work"
    else
      rm -rf "$work"
    fi
  fi
  [ -n "$build_tmp" ] && rm -rf "$build_tmp"
  if [ -n "$bic_created" ]; then rmdir /var/lib/containers/cache /var/lib/containers 2>/dev/null; fi
  [ $rc = 0 ] || say "failed (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the committer binary --------------------------------------------------------------------------------------
if [ -n "${COMMITTER_BIN:-}" ]; then
  BIN=$COMMITTER_BIN
else
  say "building committer (cargo build --release)"
  cargo build --release --locked --quiet --manifest-path "$root/Cargo.toml" >&2
  BIN=$root/target/release/committer
fi
[ -x "$BIN" ] || die "no committer binary at $BIN"

work=$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/committer-bench.XXXXXX")
lab=$work/lab
mkdir -p "$work/logs" "$work/spool" "$RESULTS_DIR"
tsv=$work/results.tsv
printf 'workload\ttool\trun\twall_s\tcpu_s\trss_kib\tpaused_ms\tcontent_bytes\tentries\tlayer_bytes\tnote\tregistry_cpu_s\n' >"$tsv"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
t_start=$(date +%s)
t_stamp=$(date +%Y%m%d-%H%M%S)

# shellcheck source=scripts/bench/scaling.sh
. "$here/bench/scaling.sh"

# ---- measuring -------------------------------------------------------------------------------------------------
now_ns() { date +%s%N; }

# measure LOG CMD…: runs CMD with stdout to $work/out and stderr to LOG, under /usr/bin/time.
# Sets T_WALL (s, from our own clock: /usr/bin/time rounds to 10 ms), T_CPU (user+sys, s), T_RSS (peak, KiB) and
# T_REG (the CPU the lab's registry spent meanwhile, s: it shares the machine with whatever uploads to it).
measure() {
  local log=$1 rc=0 t0 t1 u s r0 r1
  shift
  r0=$(reg_ticks)
  t0=$(now_ns)
  /usr/bin/time -f '%e %U %S %M' -o "$work/time" "$@" >"$work/out" 2>"$log" || rc=$?
  t1=$(now_ns)
  r1=$(reg_ticks)
  T_REG=$(awk -v t="$((r1 - r0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
  if [ $rc != 0 ]; then
    tail -n 20 "$log" >&2
    die "exit $rc from: $* (log: $log)"
  fi
  read -r _ u s T_RSS < <(tail -n 1 "$work/time")
  T_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
  T_CPU=$(awk -v u="$u" -v s="$s" 'BEGIN { printf "%.2f", u + s }')
}

# record WORKLOAD TOOL RUN WALL CPU RSS_KIB [PAUSED_MS CONTENT_BYTES ENTRIES LAYER_BYTES NOTE]
record() {
  local IFS=$'\t'
  local a=("$1" "$2" "$3" "$4" "$5" "$6" "${7:--}" "${8:--}" "${9:--}" "${10:--}" "${11:--}" "${T_REG:--}")
  echo "${a[*]}" >>"$tsv"
  say "  $2 run $3: wall ${4}s cpu ${5}s rss $(($6 / 1024))MiB${7:+ paused ${7}ms}"
}

# ---- the lab ---------------------------------------------------------------------------------------------------
say "starting the lab in $lab"
"$here/lab.sh" start "$lab" >&2
# shellcheck disable=SC1091
. "$lab/env"
ctr_() { "$CTR" -a "$CONTAINERD_ADDRESS" -n "$NS" "$@"; }
cd_ticks() { awk '{ print $14 + $15 }' "/proc/$CONTAINERD_PID/stat"; }
reg_ticks() { awk '{ print $14 + $15 }' "/proc/$REGISTRY_PID/stat" 2>/dev/null || echo 0; }
cd_hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$CONTAINERD_PID/status"; }

small_base=$("$here/lab.sh" base-image "$lab" benchbase --namespace "$NS")

# run_sandbox ID IMAGE: a sandbox as the lab's tests run one (own runc root and cgroup), host /usr at /host-usr.
run_sandbox() {
  ctr_ run -d --runc-root "$LAB_RUNC_ROOT" --cgroup "$LAB_CGROUP_PARENT/$1" --log-uri "file://$lab/logs/$1.log" \
    --mount type=bind,src=/usr,dst=/host-usr,options=rbind:ro "$2" "$1" sleep 1000000 >/dev/null
  local i
  for i in $(seq 1 200); do
    ctr_ tasks ls | awk -v id="$1" '$1 == id && $3 == "RUNNING" { ok = 1 } END { exit !ok }' && return 0
    sleep 0.05
  done
  die "sandbox $1 did not start"
}
exec_in() { ctr_ tasks exec --exec-id "bench-$RANDOM$RANDOM" "$1" sh -c "$2"; }
remove_sandbox() {
  ctr_ tasks delete -f "$1" >/dev/null 2>&1 || true
  ctr_ containers delete "$1" >/dev/null 2>&1 || true
}

# ---- buildah: private storage root, and a private blob-info cache --------------------------------------------
# c/image remembers, in /var/lib/containers/cache, where it has seen each blob, and mounts it from there instead of
# uploading it again. Every buildah call gets its own copy of that directory, bind-mounted in a private mount
# namespace: the base image's blobs are known (as after a real `buildah from`), the layers of earlier commits are
# not (each commit uploads its layer, as the first one would).
bah_dir=$work/buildah
mkdir -p "$bah_dir/bic" "$bah_dir/bic.base"
if [ ! -d /var/lib/containers/cache ]; then
  mkdir -p /var/lib/containers/cache
  bic_created=1
fi
# bah / skopeo_: wrapper scripts (not functions: /usr/bin/time runs them)
mkdir -p "$work/bin"
cat >"$work/bin/bah" <<SH
#!/bin/sh
exec unshare -m --propagation private -- sh -c 'mount --bind "$bah_dir/bic" /var/lib/containers/cache && exec buildah --root "$bah_dir/root" --runroot "$bah_dir/runroot" --storage-driver overlay "\$@"' buildah "\$@"
SH
# skopeo in the same private cache, so that the bench leaves the machine's cache as it found it
cat >"$work/bin/skopeo_" <<SH
#!/bin/sh
exec unshare -m --propagation private -- sh -c 'mount --bind "$bah_dir/bic" /var/lib/containers/cache && exec skopeo "\$@"' skopeo "\$@"
SH
chmod +x "$work/bin/bah" "$work/bin/skopeo_"
bah() { "$work/bin/bah" "$@"; }
skopeo_() { "$work/bin/skopeo_" "$@"; }
bic_save() { rm -rf "$bah_dir/bic.base" && cp -a "$bah_dir/bic" "$bah_dir/bic.base"; }
bic_restore() { rm -rf "$bah_dir/bic" && cp -a "$bah_dir/bic.base" "$bah_dir/bic"; }
buildah_from() {
  bic_restore
  bah from -q --tls-verify=false --name "$1" "$2" >/dev/null
  bic_save
}
buildah_exec() { bah run --network none -v /usr:/host-usr:ro "$1" sh -c "$2"; }
buildah_cleanup() {
  bah rm --all >/dev/null 2>&1
  bah rmi --all --force >/dev/null 2>&1
  # c/storage's overlay mounts live in the namespaces of the buildah calls; nothing should be left on the host
  local m
  for m in $(awk -v d="$bah_dir" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  rm -rf "$bah_dir"
}

# ---- the big base: busybox base + one layer holding a copy of host /usr/{BIG_BASE_PATHS}, cached -------------------
big_base_layout() {
  local key layout p paths=()
  key=$(printf '%s' "$BIG_BASE_PATHS" | tr ' /' '_-')
  layout=$CACHE/bigbase-$key
  if [ ! -f "$layout/index.json" ]; then
    say "building the big base (busybox + host /usr/{${BIG_BASE_PATHS// /,}}) into $layout (cached for next time)"
    mkdir -p "$CACHE"
    build_tmp=$(mktemp -d "$CACHE/build.XXXXXX")
    cp -a "$lab/cache/base-oci" "$build_tmp/oci"
    for p in $BIG_BASE_PATHS; do paths+=("usr/$p"); done
    # exit 1 = "file changed as we read it" (a package being installed meanwhile): the copy is still a fine base
    tar -C / --numeric-owner --warning=no-file-ignored -cf "$build_tmp/layer.tar" "${paths[@]}" || [ $? = 1 ]
    umoci raw add-layer --image "$build_tmp/oci:1" --history.created_by "bench.sh: host /usr/{${BIG_BASE_PATHS// /,}}" \
      "$build_tmp/layer.tar" >&2
    umoci gc --layout "$build_tmp/oci" >&2
    rm -rf "$layout"
    mv "$build_tmp/oci" "$layout"
    rm -rf "$build_tmp"
    build_tmp=""
  fi
  BIG_LAYOUT=$layout
}

# ---- one run of each tool --------------------------------------------------------------------------------------
# committer_run WORKLOAD COMPRESSION RUN SANDBOX
committer_run() {
  local wl=$1 comp=$2 run=$3 id=$4
  measure "$work/logs/committer-$wl-$comp-$run.log" \
    env CONTAINERD_ADDRESS="$CONTAINERD_ADDRESS" CONTAINERD_NAMESPACE="$NS" \
    "$BIN" commit --container "$id" --image "$REGISTRY/bench/$wl-committer-$comp-$run:1" --plain-http \
    --compression "$comp" --spool-dir "$work/spool" --log-format json
  cp "$work/out" "$work/logs/committer-$wl-$comp-$run.json"
  local paused content entries lsize note
  IFS=$'\t' read -r paused content entries lsize note < <(python3 - "$work/out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
layer = d.get("layer") or {}
src = d.get("diffSource", "?")
print("\t".join(str(x) for x in ((d.get("paused") or {}).get("ms", d.get("pausedMs", "-")), d.get("contentBytes", "-"), d.get("entries", "-"),
                                  layer.get("size", "-"), "-" if src == "upperdir" else "diff from " + src)))
PY
  )
  record "$wl" "committer-$comp" "$run" "$T_WALL" "$T_CPU" "$T_RSS" "$paused" "$content" "$entries" "$lsize" "$note"
}

# profile_run WORKLOAD COMPRESSION SANDBOX (BENCH_PROFILE=1): one more committer run, untimed, under `perf record`
# (software cpu-clock sampling: VMs rarely expose hardware counters), summarised by thread and by function into
# RESULTS_DIR/profile-STAMP-WORKLOAD-COMPRESSION.txt, with the registry's CPU over the same run.
profile_run() {
  local wl=$1 comp=$2 id=$3 data out r0 r1
  data=$work/logs/perf-$wl-$comp.data out=$RESULTS_DIR/profile-$t_stamp-$wl-$comp.txt
  r0=$(reg_ticks)
  env CONTAINERD_ADDRESS="$CONTAINERD_ADDRESS" CONTAINERD_NAMESPACE="$NS" \
    perf record -q -e cpu-clock -F 999 -o "$data" -- \
    "$BIN" commit --container "$id" --image "$REGISTRY/bench/$wl-profile-$comp:1" --plain-http \
    --compression "$comp" --spool-dir "$work/spool" --log-format json >"$work/out" 2>"$work/logs/profile-$wl-$comp.log" ||
    die "exit $? from the profiled committer run (log: $work/logs/profile-$wl-$comp.log)"
  r1=$(reg_ticks)
  (
    set +o pipefail # head closes the pipe early on purpose
    echo "committer $comp on $wl under perf record -e cpu-clock -F 999 (one run, not timed)"
    echo "registry CPU during the run: $(awk -v t="$((r1 - r0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }') s"
    echo "result: $(cat "$work/out")"
    echo
    echo "== by thread (comm) =="
    perf report -i "$data" --stdio --sort comm 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 20
    echo
    echo "== by thread and function, top 40 =="
    perf report -i "$data" --stdio --sort comm,dso,sym 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n 40
  ) >"$out"
  rm -f "$data"
  say "  profile: $out"
}

# ctrdiff_run WORKLOAD RUN SANDBOX: the walking differ runs inside containerd, so its CPU and peak RSS are read from
# /proc/CONTAINERD_PID (peak reset through clear_refs before the run; it includes containerd's ~40 MiB baseline).
ctrdiff_run() {
  local wl=$1 run=$2 id=$3 key c0 c1 cpu rss digest size dwall dcpu drss
  key=$(ctr_ containers info "$id" | python3 -c 'import json, sys; print(json.load(sys.stdin)["SnapshotKey"])')
  echo 5 >"/proc/$CONTAINERD_PID/clear_refs"
  c0=$(cd_ticks)
  measure "$work/logs/ctrdiff-$wl-$run.log" "$CTR" -a "$CONTAINERD_ADDRESS" -n "$NS" snapshots --snapshotter overlayfs diff --keep "$key"
  c1=$(cd_ticks)
  rss=$(cd_hwm_kib)
  cpu=$(awk -v a="$T_CPU" -v t="$((c1 - c0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", a + t / hz }')
  size=$(stat -c %s "$work/out")
  record "$wl" ctr-diff "$run" "$T_WALL" "$cpu" "$rss" - - - "$size"
  dwall=$T_WALL dcpu=$cpu drss=$rss
  digest=sha256:$(sha256sum "$work/out" | cut -d' ' -f1)
  mv "$work/out" "$work/ctrdiff.blob"
  measure "$work/logs/ctrpush-$wl-$run.log" "$here/bench/push-blob.sh" "$REGISTRY" "bench/$wl-ctrdiff-$run" \
    "$work/ctrdiff.blob" "$digest"
  record "$wl" ctr-diff+push "$run" "$(awk -v a="$dwall" -v b="$T_WALL" 'BEGIN { printf "%.3f", a + b }')" \
    "$(awk -v a="$dcpu" -v b="$T_CPU" 'BEGIN { printf "%.2f", a + b }')" "$((drss > T_RSS ? drss : T_RSS))" \
    - - - "$size"
  rm -f "$work/ctrdiff.blob"
  ctr_ content rm "$digest" >/dev/null 2>&1 || true
}

# buildah_run WORKLOAD RUN WORKING_CONTAINER
buildah_run() {
  local wl=$1 run=$2 wc=$3 repo size
  repo=bench/$wl-buildah-$run
  bic_restore
  measure "$work/logs/buildah-$wl-$run.log" "$work/bin/bah" commit -q --tls-verify=false "$wc" "docker://$REGISTRY/$repo:1"
  size=$(curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' "http://$REGISTRY/v2/$repo/manifests/1" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["layers"][-1]["size"])') || size=-
  record "$wl" buildah "$run" "$T_WALL" "$T_CPU" "$T_RSS" - - - "$size"
}

# ---- physical-limit probes (deflate lane): standard tools on the sandbox's own upperdir --------------------------
# upperdir_of SANDBOX: the overlay upperdir of the sandbox's rootfs snapshot (what committer reads)
upperdir_of() {
  local key
  key=$(ctr_ containers info "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["SnapshotKey"])')
  ctr_ snapshots --snapshotter overlayfs mounts /probe "$key" | grep -o 'upperdir=[^,[:space:]]*' | head -n 1 | cut -d= -f2
}

# probe_one WORKLOAD TOOL RUN OUTPUT SHELL-PIPELINE: times the pipeline (stdout of measure is unused), records the
# size of OUTPUT as the layer ("-": none) and removes it
probe_one() {
  local wl=$1 tool=$2 run=$3 out=$4 size=-
  measure "$work/logs/$tool-$wl-$run.log" sh -c "$5"
  if [ "$out" != - ]; then
    size=$(stat -c %s "$out")
    rm -f "$out"
  fi
  record "$wl" "$tool" "$run" "$T_WALL" "$T_CPU" "$T_RSS" - - - "$size"
}

# probes_run WORKLOAD RUN SANDBOX: one run of each probe, on the upperdir committer reads (the sandbox keeps running:
# these tools do not pause it, so their time is the floor of the work, not of a consistent capture)
probes_run() {
  local wl=$1 run=$2 upper n
  upper=$(upperdir_of "$3")
  [ -n "$upper" ] && [ -d "$upper" ] || die "no upperdir for sandbox $3"
  n=$(nproc)
  probe_one "$wl" "tar|cat" "$run" - "tar -C '$upper' -cf - . | cat >/dev/null"
  probe_one "$wl" "tar>spool" "$run" "$work/spool/probe.tar" "tar -C '$upper' -cf '$work/spool/probe.tar' ."
  probe_one "$wl" "tar|zstd" "$run" "$work/spool/probe.zst" "tar -C '$upper' -cf - . | zstd -q -3 -T$n >'$work/spool/probe.zst'"
  probe_one "$wl" "tar|pigz" "$run" "$work/spool/probe.gz" "tar -C '$upper' -cf - . | pigz -6 -p$n >'$work/spool/probe.gz'"
  # the zstd probe again, streamed to the registry on this machine as committer uploads (hash + PATCH + PUT)
  measure "$work/logs/tar-zstd-push-$wl-$run.log" sh -c "tar -C '$upper' -cf - . | zstd -q -3 -T$n |
    '$here/bench/stream-blob.sh' '$REGISTRY' 'bench/$wl-probe-$run' '$work/spool'"
  record "$wl" "tar|zstd|push" "$run" "$T_WALL" "$T_CPU" "$T_RSS" - - - "$(cut -d' ' -f2 "$work/out")"
}

# ---- workloads -------------------------------------------------------------------------------------------------
# setup WORKLOAD IMAGE SCRIPT: the same script in a containerd sandbox and in a buildah working container, both
# named bench-WORKLOAD.
setup() {
  local wl=$1 image=$2 script=$3 t0
  say "$wl: building the workload in sandbox bench-$wl"
  run_sandbox "bench-$wl" "$image"
  t0=$(date +%s)
  exec_in "bench-$wl" "$script" >&2
  say "$wl: built in the sandbox in $(($(date +%s) - t0)) s; now in buildah working container bench-$wl"
  buildah_from "bench-$wl" "$image"
  t0=$(date +%s)
  buildah_exec "bench-$wl" "$script" >&2
  say "$wl: built in buildah in $(($(date +%s) - t0)) s"
}
teardown() {
  remove_sandbox "bench-$1"
  bah rm "bench-$1" >/dev/null 2>&1 || true
}

# all_tools WORKLOAD RUN: one run of each tool, in this order (the runs alternate between tools); the probes on the
# big workloads only (on the tiny ones they measure process start-up)
all_tools() {
  committer_run "$1" gzip "$2" "bench-$1"
  committer_run "$1" zstd "$2" "bench-$1"
  ctrdiff_run "$1" "$2" "bench-$1"
  buildah_run "$1" "$2" "bench-$1"
  case "$1" in many | mixed) probes_run "$1" "$2" "bench-$1" ;; esac
  if [ "${BENCH_PROFILE:-0}" = 1 ] && [ "$2" = 1 ]; then
    case "$1" in many | mixed)
      profile_run "$1" gzip "bench-$1"
      profile_run "$1" zstd "bench-$1"
      ;;
    esac
  fi
}

TINY_SCRIPT='echo "changed by bench.sh" > /data/modify.txt'
# 200 directories of 100-byte files (hex of random bytes: busybox has no split)
MANY_SCRIPT="mkdir /many && cd /many && seq 0 199 | xargs mkdir &&
  head -c $((MANY_FILES * 50)) /dev/urandom | xxd -p -c 50 |
  awk '{ f = (NR % 200) \"/f\" NR; printf \"%s\", \$0 > f; close(f) }'"
mixed_script() {
  local p s="mkdir /bench" left=$MIXED_RANDOM_MIB i=0 n
  for p in $MIXED_PATHS; do s="$s && cp -a /host-usr/$p /bench/${p//\//-}"; done
  while [ "$left" -gt 0 ]; do
    n=$((left > 100 ? 100 : left))
    s="$s && head -c $((n * 1048576)) /dev/urandom > /bench/random-$i"
    left=$((left - n)) i=$((i + 1))
  done
  echo "$s"
}

for wl in $WORKLOADS; do
  case "$wl" in
  tiny)
    big_base_layout
    layout=$BIG_LAYOUT
    say "pushing the big base ($(du -sh "$layout" | cut -f1) compressed) and pulling it into containerd"
    skopeo_ copy --quiet --dest-tls-verify=false "oci:$layout:1" "docker://$REGISTRY/benchbig:1" >&2
    ctr_ images pull --plain-http "$REGISTRY/benchbig:1" >"$lab/logs/pull-benchbig.log" 2>&1 ||
      { cat "$lab/logs/pull-benchbig.log" >&2; die "ctr could not pull the big base"; }
    setup tiny-small "$small_base" "$TINY_SCRIPT"
    setup tiny-big "$REGISTRY/benchbig:1" "$TINY_SCRIPT"
    for run in $(seq 1 "$RUNS_TINY"); do
      say "tiny: run $run of $RUNS_TINY"
      all_tools tiny-small "$run"
      all_tools tiny-big "$run"
    done
    teardown tiny-small
    teardown tiny-big
    ;;
  many | mixed)
    if [ "$wl" = many ]; then script=$MANY_SCRIPT; else script=$(mixed_script); fi
    setup "$wl" "$small_base" "$script"
    for run in $(seq 1 "$RUNS_BIG"); do
      say "$wl: run $run of $RUNS_BIG"
      all_tools "$wl" "$run"
    done
    teardown "$wl"
    ;;
  upload)
    say "upload: $UPLOAD_MIB MiB of random data in sandbox bench-upload"
    run_sandbox bench-upload "$small_base"
    exec_in bench-upload "head -c $((UPLOAD_MIB * 1048576)) /dev/urandom > /random.bin"
    committer_run upload none 1 bench-upload
    committer_run upload zstd 1 bench-upload
    remove_sandbox bench-upload
    ;;
  scaling) scaling_run ;;
  *) die "unknown workload $wl (BENCH_WORKLOADS: tiny many mixed upload scaling)" ;;
  esac
done

# ---- report ----------------------------------------------------------------------------------------------------
elapsed=$(($(date +%s) - t_start))
stamp=$(date +%Y%m%d-%H%M%S)
if [ -n "${COMMITTER_BIN:-}" ]; then
  rev=${COMMITTER_REV:-"(revision unknown: COMMITTER_BIN)"}
else
  rev=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "?")
  git -C "$root" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || rev="$rev+uncommitted changes"
fi
report=$RESULTS_DIR/bench-$stamp.md
{
  echo "committer benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')$([ "${BENCH_QUICK:-0}" = 1 ] && echo ", BENCH_QUICK=1")"
  echo
  echo "- machine: $(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)"
  echo "- committer $rev ($BIN); containerd $("$CTR" -a "$CONTAINERD_ADDRESS" version 2>/dev/null | awk '/Server:/ { s = 1 } s && /Version:/ { print $2; exit }'); $(buildah --version)"
  echo "- workloads run: $WORKLOADS; runs: tiny $RUNS_TINY, many/mixed $RUNS_BIG, upload 1; mixed = host /usr/{${MIXED_PATHS// /,}} + $MIXED_RANDOM_MIB MiB random; many = $MANY_FILES files; big base = busybox + host /usr/{${BIG_BASE_PATHS// /,}}; upload = $UPLOAD_MIB MiB random"
  echo "- load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg); lab start to report $((elapsed / 60)) min $((elapsed % 60)) s (teardown adds 1-2 min)"
  echo
  python3 "$here/bench/report.py" "$tsv"
  scaling_report "$RESULTS_DIR" "$stamp"
} >"$report"
cp "$tsv" "$RESULTS_DIR/bench-$stamp.tsv"
cat "$report"
plot=$RESULTS_DIR/bench-$stamp.png
/usr/bin/python3 "$here/bench_plot.py" --title "committer $rev, $(nproc) cores$([ "${BENCH_QUICK:-0}" = 1 ] && echo ", BENCH_QUICK=1")" \
  "$plot" "$RESULTS_DIR/bench-$stamp.tsv" >&2 ||
  { say "the plot failed (the report above stands)"; plot=""; }
say "report: $report (raw: $RESULTS_DIR/bench-$stamp.tsv${plot:+, plot: $plot}); took $((elapsed / 60)) min $((elapsed % 60)) s"
