#!/usr/bin/env bash
# Installs the Debian packages the lab, the demo and the tests use, when any is missing (apt-get update only
# then). Idempotent; needs root only when something is missing. Used by scripts/test.sh and scripts/demo.sh.
set -euo pipefail

PACKAGES=(containerd runc docker-registry skopeo umoci busybox-static protobuf-compiler curl python3 python3-venv openssl
  apache2-utils ca-certificates util-linux musl-tools binutils xfsprogs)
missing=()
for p in "${PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "install-deps.sh: missing ${missing[*]}; run as root to install them" >&2; exit 1; }
  echo "install-deps.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null || { echo "install-deps.sh: apt-get update failed" >&2; exit 1; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null ||
    { echo "install-deps.sh: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi
for b in containerd ctr containerd-shim-runc-v2 runc docker-registry skopeo umoci protoc curl python3 flock; do
  command -v "$b" >/dev/null 2>&1 || { echo "install-deps.sh: '$b' is not on PATH after installing packages" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "install-deps.sh: /bin/busybox missing after installing busybox-static" >&2; exit 1; }
command -v cargo >/dev/null 2>&1 ||
  { echo "install-deps.sh: cargo not found: install a Rust toolchain (1.88 or newer, see rust-version in Cargo.toml)" >&2; exit 1; }
