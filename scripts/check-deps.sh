#!/usr/bin/env bash
# Fail if the normal (non-dev, non-build) dependency tree, for any target, holds OpenSSL or native-tls.
#
#   scripts/check-deps.sh
#
# committer ships as one static binary in a FROM scratch image: TLS is rustls with bundled web roots. A crate
# that links OpenSSL (openssl, openssl-sys) or uses the platform TLS (native-tls, hyper-tls, tokio-native-tls…)
# would need a system library and CA files that the image does not have, and breaks the musl build. Any crate
# whose name contains "openssl" or "native-tls" fails the check; the output shows who pulls it in.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "check-deps.sh: $*" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 || die "cargo not found"

tree=$(cargo tree --locked -e normal --target all --prefix none --format '{p}' 2>&1) ||
  die "cargo tree failed: $tree"
bad=$(printf '%s\n' "$tree" | awk '{print $1}' | grep -iE 'openssl|native-tls' | sort -u || true)
if [ -n "$bad" ]; then
  echo "check-deps.sh: forbidden TLS crates in the dependency tree (use rustls features instead):" >&2
  for c in $bad; do
    echo "--- $c, pulled in by:" >&2
    cargo tree --locked -e normal --target all -i "$c" >&2 || true
  done
  exit 1
fi
echo "check-deps.sh: no openssl or native-tls in $(printf '%s\n' "$tree" | sort -u | wc -l) normal dependencies (all targets)" >&2
