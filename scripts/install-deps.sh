#!/usr/bin/env bash
# Installs the Debian packages the lab and the tests use, when any is missing. Idempotent.
set -euo pipefail

# command -> package
declare -A want=(
  [containerd]=containerd [runc]=runc [docker-registry]=docker-registry [skopeo]=skopeo [umoci]=umoci
  [busybox]=busybox-static [protoc]=protobuf-compiler [curl]=curl [python3]=python3 [openssl]=openssl
  [htpasswd]=apache2-utils
)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
# busybox from another package is dynamically linked; the base image needs the static one.
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "install-deps.sh: missing ${missing[*]}; run as root to install them" >&2; exit 1; }
  echo "install-deps.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
