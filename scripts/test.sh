#!/usr/bin/env bash
# Run every test: unit tests and the `it` integration binary (a real containerd + registry per test), on
# containerd 1.6, 1.7 and 2.x, with Docker 20.10 and 28 reading what committer pushes.
#
# On a fresh Debian 12 machine, as root: installs the packages the lab needs (apt-get update only when something is
# missing), checks that overlayfs mounts work where the tests make their tempdirs, then `cargo test --locked`.
# Works with CI=true and no stdin.
#
# Environment:
#   RUST_TEST_THREADS                 tests run at once (default 2: one lab each, on a 2-core machine)
#   COMMITTER_TEST_FIELD              the field: containerd 1.7 (trixie) and 2.x (unstable) passes of the `it` tests,
#                                     and Docker 20.10 (bookworm) and 28 (unstable) as readers, all from Debian's
#                                     .debs: auto = each whose archive can be reached (default; a skip says so;
#                                     any other fetch failure stops the run), 1 = all
#                                     required, 0 = none
#   COMMITTER_CACHE_DIR               where the extracted .debs and the pass logs are kept
#                                     (default /var/cache/committer; reused when present)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "test.sh: $*" >&2; exit 1; }
say() { echo "test.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root: containerd, runc and overlay mounts need it"
export DEBIAN_FRONTEND=noninteractive

# ---- packages -------------------------------------------------------------------------------------------------
scripts/install-deps.sh
# A static musl build needs the musl target; a machine that cannot fetch it builds static glibc instead
# (scripts/build-image.sh says which).
rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl ||
  rustup target add x86_64-unknown-linux-musl </dev/null >/dev/null 2>&1 ||
  say "the musl target could not be installed: the image test uses a static glibc build"
# No OpenSSL or native-tls may enter the dependency tree (the binary ships FROM scratch with rustls).
scripts/check-deps.sh

# ---- kernel features ------------------------------------------------------------------------------------------
# overlayfs must mount where the tests put their labs (tempfile uses TMPDIR): an overlay upperdir cannot live on
# another overlay, for example.
check_overlay() {
  local t err
  t=$(mktemp -d "${TMPDIR:-/tmp}/committer-overlay-check.XXXXXX")
  mkdir -p "$t/lower" "$t/upper" "$t/work" "$t/merged"
  echo lower >"$t/lower/f"
  if ! err=$(mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/upper,workdir=$t/work" "$t/merged" 2>&1); then
    modprobe overlay 2>/dev/null || true
    err=$(mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/upper,workdir=$t/work" "$t/merged" 2>&1) || {
      rm -rf "$t"
      die "overlayfs does not mount in ${TMPDIR:-/tmp}: $err (set TMPDIR to a directory on ext4/xfs)"
    }
  fi
  local ok=0
  [ "$(cat "$t/merged/f")" = lower ] && ok=1
  umount "$t/merged"
  rm -rf "$t"
  [ $ok = 1 ] || die "overlayfs mounted but the lower file is not visible"
}
check_overlay
case "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" in
cgroup2fs) say "cgroup v2 (unified)" ;;
tmpfs) say "cgroup v1 (hybrid: $(ls /sys/fs/cgroup | tr '\n' ' '))" ;;
*) say "warning: no cgroup filesystem at /sys/fs/cgroup; pausing containers will fail" ;;
esac
say "$(containerd --version); $(runc --version | head -n1); overlay redirect_dir=$(cat /sys/module/overlay/parameters/redirect_dir 2>/dev/null || echo ?) metacopy=$(cat /sys/module/overlay/parameters/metacopy 2>/dev/null || echo ?)"

# ---- tests ----------------------------------------------------------------------------------------------------
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-2}
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
cache=${COMMITTER_CACHE_DIR:-/var/cache/committer}

# fetch VAR KIND ARGS...: runs `scripts/lab.sh fetch-KIND ARGS` and sets VAR to its bin dir. When Debian's archive
# cannot be reached (exit 75) it says SKIP and why, and VAR stays empty (COMMITTER_TEST_FIELD=1 then stops below).
# Any other failure stops here: a version that no longer matches its glob is a change to look at, not a skip.
fetch() {
  local var=$1 what=$2; shift 2
  local out rc=0
  out=$(scripts/lab.sh "fetch-$what" "$@") || rc=$?
  case $rc in
  0) printf -v "$var" %s "$out" ;;
  75) say "SKIP: $what $1: Debian's archive could not be reached (its error is above): its pass/tests are skipped" ;;
  *) die "fetching $what $1 failed (exit $rc; its error is above), not because the archive is unreachable (COMMITTER_TEST_FIELD=0 runs without the field)" ;;
  esac
}

field=${COMMITTER_TEST_FIELD:-auto}
bin17="" bin2="" docker20="" docker28=""
if [ "$field" != 0 ]; then
  fetch bin17 containerd-1.7 "${COMMITTER_CONTAINERD_17_DIR:-$cache/containerd-1.7}"
  fetch bin2 containerd-2 "$cache/containerd-2"
  fetch docker20 docker bookworm "$cache/docker-bookworm"
  fetch docker28 docker sid "$cache/docker-sid"
fi
if [ "$field" = 1 ] && { [ -z "$bin17" ] || [ -z "$bin2" ] || [ -z "$docker20" ] || [ -z "$docker28" ]; }; then
  die "a field pass could not be fetched from Debian's archive (COMMITTER_TEST_FIELD=1)"
fi
# (the kind-style node runs containerd 2.x from here, as kind's current node images do)
[ -z "$bin2" ] || export COMMITTER_CONTAINERD_2_BIN_DIR=$bin2
[ -z "$docker20" ] || export COMMITTER_DOCKER_20_BIN_DIR=$docker20
[ -z "$docker28" ] || export COMMITTER_DOCKER_28_BIN_DIR=$docker28

# The admission policy's CEL on sample pods and on deploy/commit-job.yaml (deploy/check-admission-policy.py), with
# cel-python in a venv kept in the cache dir: run when cel-python can be had (a SKIP says when not), required with
# COMMITTER_TEST_FIELD=1.
policy_py=$cache/celvenv/bin/python
if ! "$policy_py" -c 'import celpy, yaml' 2>/dev/null; then
  { python3 -m venv "$cache/celvenv" && "$cache/celvenv/bin/pip" install -q 'cel-python==0.5.0' pyyaml; } </dev/null >/dev/null 2>&1 || true
fi
if "$policy_py" -c 'import celpy, yaml' 2>/dev/null; then
  "$policy_py" deploy/check-admission-policy.py >"$cache/admission-policy.log" 2>&1 ||
    { cat "$cache/admission-policy.log" >&2; die "deploy/check-admission-policy.py: a case disagrees with the policy"; }
  say "admission policy: $(tail -n1 "$cache/admission-policy.log")"
elif [ "$field" = 1 ]; then
  die "cel-python could not be installed from PyPI for deploy/check-admission-policy.py (COMMITTER_TEST_FIELD=1)"
else
  say "SKIP: cel-python could not be installed from PyPI: deploy/check-admission-policy.py not run"
fi

# Build once; every pass below runs the same test binary.
t0=$SECONDS
cargo test --locked --features lab --no-run
say "build: $((SECONDS - t0)) s"

# Pass 0: the fast tier (the unit tests of the library and the binary, without `lab`) as an unprivileged user
# (nobody), from copies of their binaries in a temp dir, so a unit test that needs root or this checkout without
# being gated by `lab` fails here.
t0=$SECONDS
mapfile -t fast < <(cargo test --locked --lib --bins --no-run --message-format=json |
  grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
[ "${#fast[@]}" = 2 ] || die "cargo named ${#fast[@]} unit-test binaries, not the library's and the binary's"
say "build (fast tier): $((SECONDS - t0)) s"
fast_dir=$(mktemp -d) && chmod 0777 "$fast_dir"
t0=$SECONDS
rc=0
for i in "${!fast[@]}"; do
  cp "${fast[$i]}" "$fast_dir/unit-tests-$i"
  (cd "$fast_dir" && HOME=$fast_dir setpriv --reuid=65534 --regid=65534 --clear-groups "./unit-tests-$i") || rc=$?
done
rm -rf "$fast_dir"
[ $rc = 0 ] || die "the fast tier failed as an unprivileged user (cargo test --lib --bins as nobody)"
say "pass fast tier as nobody (cargo test --lib --bins): $((SECONDS - t0)) s"

# Pass 1: unit tests (`--features lab` adds those against real overlay mounts and the registry to the fast tier
# that plain `cargo test` runs without root) and every `it` test on Debian 12's containerd 1.6, Docker included.
t0=$SECONDS
cargo test --locked --features lab
say "pass containerd 1.6 (unit + it, Docker): $((SECONDS - t0)) s"

# Passes 2 and 3: the `it` tests on containerd 1.7 (trixie) and 2.x (unstable), extracted from their .debs (runc
# stays Debian 12's), run at the same time. Their tests mostly wait (containerd and registry start-up, pauses,
# pushes), so two at once on 2 cores take far less than one after the other (scripts/test.sh's timings in the
# README). Left out of these passes, because nothing in them depends on containerd's version: the Docker engines
# (they run their own containerd) and the template filler.
skip=(--skip docker::docker_engines --skip kind::)
pids=() names=()
t0=$SECONDS
for pass in "1.7:$bin17" "2:$bin2"; do
  name=${pass%%:*} bindir=${pass#*:}
  [ -n "$bindir" ] || continue
  say "pass containerd $name: it tests with containerd from $bindir"
  (
    s=$SECONDS
    COMMITTER_CONTAINERD_BIN_DIR=$bindir cargo test --locked --features lab --test it -- "${skip[@]}" >"$cache/pass-$name.log" 2>&1
    rc=$?
    echo "test.sh: pass containerd $name: $((SECONDS - s)) s, exit $rc" >>"$cache/pass-$name.log"
    exit $rc
  ) &
  pids+=($!) names+=("$name")
done
failed=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  cat "$cache/pass-${names[$i]}.log"
  [ $rc = 0 ] || { say "pass containerd ${names[$i]} FAILED"; failed=1; }
done
say "passes containerd 1.7 + 2 in parallel: $((SECONDS - t0)) s"
[ $failed = 0 ] || die "a containerd pass failed (its log is above)"
