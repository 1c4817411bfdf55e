#!/usr/bin/env bash
# Run every test: unit tests and the `it` integration binary (a real containerd + registry per test).
#
# On a fresh Debian 12 machine, as root: installs the packages the lab needs (apt-get update only when something is
# missing), checks that overlayfs mounts work where the tests make their tempdirs, then `cargo test --locked`.
# Works with CI=true and no stdin.
#
# Environment:
#   RUST_TEST_THREADS                 tests run at once (default 2: one lab each, on a 2-core machine)
#   COMMITTER_TEST_CONTAINERD_17      second pass of the `it` tests against Debian trixie's containerd 1.7:
#                                     auto = run it if the .deb can be fetched (default), 1 = required, 0 = skip
#   COMMITTER_CONTAINERD_17_DIR       where fetch-containerd-1.7 keeps the extracted .deb
#                                     (default /var/cache/committer/containerd-1.7; reused when present)
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
# `--features lab` adds the tests against the real parts (overlay mounts, containerd, the registry) to
# the fast tier that plain `cargo test` runs without root.
cargo test --locked --features lab

# ---- HOOK: containerd 1.7 pass ----------------------------------------------------------------------------------
# The same `it` tests against Debian trixie's containerd 1.7 (extracted from its .deb; runc stays Debian 12's).
# Fetching needs Debian's archive (apt, private state under $dir); when it cannot be reached the pass is skipped
# unless COMMITTER_TEST_CONTAINERD_17=1. The extracted binaries are cached, so later runs cost only the tests.
c17=${COMMITTER_TEST_CONTAINERD_17:-auto}
if [ "$c17" != 0 ]; then
  dir=${COMMITTER_CONTAINERD_17_DIR:-/var/cache/committer/containerd-1.7}
  if bindir=$(scripts/lab.sh fetch-containerd-1.7 "$dir"); then
    say "second pass: it tests with containerd from $bindir"
    COMMITTER_CONTAINERD_BIN_DIR=$bindir cargo test --locked --features lab --test it
  elif [ "$c17" = 1 ]; then
    die "containerd 1.7 could not be fetched (COMMITTER_TEST_CONTAINERD_17=1)"
  else
    say "containerd 1.7 could not be fetched: second pass skipped"
  fi
fi
