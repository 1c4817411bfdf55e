#!/usr/bin/env bash
# Debian .debs for the field passes, fetched with apt under a private state dir and extracted with dpkg -x (no
# package is installed; the machine's apt sources and lists are not touched). Called by scripts/lab.sh:
#
#   scripts/lab.sh fetch-containerd-1.7 DIR   Debian trixie's containerd 1.7; prints its bin dir
#   scripts/lab.sh fetch-containerd-2 DIR     Debian unstable's containerd 2.x; prints its bin dir
#   scripts/lab.sh fetch-docker SUITE DIR     SUITE's docker.io (bookworm: 20.10, sid: 28.x); prints its bin dir
#
# Exit 75 when Debian's archive cannot be reached; 1 for anything else (a version that no longer matches its glob).
set -euo pipefail

die() { echo "lab.sh: $*" >&2; exit 1; }
# Exit 75 (EX_TEMPFAIL) says "Debian's archive could not be reached": the one failure scripts/test.sh skips a pass for.
unreachable() { echo "lab.sh: $*" >&2; exit 75; }
need() {
  local b
  for b in "$@"; do command -v "$b" >/dev/null 2>&1 || die "'$b' not found on PATH"; done
}
abs_dir() {
  mkdir -p "$1"
  (cd "$1" && pwd -P)
}

# fetch-debs SUITE DIR PKG[=VERSION-GLOB]...: Debian SUITE's .debs through apt with a private state dir (the
# machine's own apt sources and lists are not touched), each extracted with `dpkg -x` into DIR/root. The mirror is
# the one this machine already uses for bookworm. A package whose version does not match its glob is refused.
# Re-runs reuse DIR/root when DIR/root/.fetched lists the same request.
fetch_debs() {
  local suite=$1 dir=$2; shift 2
  dir=$(abs_dir "$dir")
  local want="$suite $*"
  if [ -f "$dir/root/.fetched" ] && [ "$(cat "$dir/root/.fetched")" = "$want" ]; then return 0; fi
  need apt-get apt-cache dpkg
  local uri
  uri=$(debian_mirror) || die "no Debian mirror found in /etc/apt/sources.list{,.d/*}"
  local apt=$dir/apt
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/etc/sources.list.d" "$apt/etc/preferences.d"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$keyring" ] || die "$keyring not found (install debian-archive-keyring)"
  echo "deb [signed-by=$keyring] $uri $suite main" >"$apt/etc/sources.list"
  local o=(-o "Dir::Etc::SourceList=$apt/etc/sources.list" -o "Dir::Etc::SourceParts=$apt/etc/sources.list.d"
    -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d" -o "Dir::State::Lists=$apt/lists"
    -o "Dir::Cache=$apt/cache" -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
  apt-get "${o[@]}" -qq update >&2 || unreachable "apt-get update of $suite's package list from $uri failed: Debian's archive cannot be reached"
  rm -rf "$dir/root" "$apt"/*.deb
  local spec pkg glob ver
  for spec in "$@"; do
    pkg=${spec%%=*} glob=*
    [ "$spec" = "$pkg" ] || glob=${spec#*=}
    # (awk reads to the end: an early exit would SIGPIPE apt-cache, and pipefail would end the script silently)
    ver=$(apt-cache "${o[@]}" show "$pkg" 2>/dev/null | awk '/^Version:/ && v == "" {v = $2} END {print v}')
    # shellcheck disable=SC2053 # glob match on purpose
    [[ -n "$ver" && "$ver" == $glob ]] || die "$suite's $pkg is '$ver', not $glob"
    (cd "$apt" && apt-get "${o[@]}" -qq download "$pkg=$ver" >&2) || unreachable "apt-get download $pkg=$ver failed"
  done
  local deb
  for deb in "$apt"/*.deb; do dpkg -x "$deb" "$dir/root"; done
  echo "$want" >"$dir/root/.fetched"
}

# fetch-containerd-1.7 / fetch-containerd-2 DIR: Debian trixie's containerd 1.7 / unstable's containerd 2.x (its
# containerd, ctr and containerd-shim-runc-v2; runc stays Debian 12's: unstable's needs a newer glibc). Prints the
# bin dir to use as COMMITTER_CONTAINERD_BIN_DIR.
cmd_fetch_containerd() {
  local suite=$1 glob=$2 dir
  dir=$(abs_dir "$3")
  fetch_debs "$suite" "$dir" "containerd=$glob"
  [ -x "$dir/root/usr/bin/containerd" ] || die "the .deb has no usr/bin/containerd"
  "$dir/root/usr/bin/containerd" --version >&2
  echo "$dir/root/usr/bin"
}

# fetch-docker SUITE DIR: SUITE's docker.io (dockerd, docker, docker-init) extracted into DIR/root. Unstable's
# dockerd runs on Debian 12 with Debian 12's containerd and runc on PATH. Prints the bin dir.
cmd_fetch_docker() {
  local suite=$1 dir
  dir=$(abs_dir "$2")
  # Pinned to the major version the README's compatibility table reports: unstable moving on to 29.x fails the fetch
  # (and test.sh) instead of silently testing another Docker under the name docker-28. Since 26.x Debian ships the
  # client in its own package.
  local pkgs=('docker.io=20.10.*')
  [ "$suite" = bookworm ] || pkgs=('docker.io=28.*' 'docker-cli=28.*')
  fetch_debs "$suite" "$dir" "${pkgs[@]}"
  [ -x "$dir/root/usr/sbin/dockerd" ] || die "the .deb has no usr/sbin/dockerd"
  ln -sf ../sbin/dockerd "$dir/root/usr/bin/dockerd"
  "$dir/root/usr/sbin/dockerd" --version >&2
  echo "$dir/root/usr/bin"
}

debian_mirror() {
  # deb822 stanzas first (the URIs of one whose Suites include bookworm), then one-line sources. Everything is
  # read to the end and the first line picked in bash: no early-exiting reader in a pipeline (pipefail).
  local found
  found=$(awk '
      FNR == 1 || /^[[:space:]]*$/ { if (u != "" && s ~ / bookworm /) print u; u = ""; s = "" }
      /^URIs:/ { u = $2 }
      /^Suites:/ { $1 = ""; s = $0 " " }
      END { if (u != "" && s ~ / bookworm /) print u }' /dev/null /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [ -z "$found" ]; then
    found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { if ($(i + 1) == "bookworm") print $i; break } }' || true)
  fi
  [ -n "$found" ] || return 1
  echo "${found%%$'\n'*}"
}


cmd=${1:-}; shift || true
case "$cmd" in
fetch-containerd-1.7) [ $# = 1 ] || die "usage: fetch-containerd-1.7 DIR"; cmd_fetch_containerd trixie '1.7.*' "$1" ;;
fetch-containerd-2) [ $# = 1 ] || die "usage: fetch-containerd-2 DIR"; cmd_fetch_containerd sid '2.*' "$1" ;;
fetch-docker) [ $# = 2 ] || die "usage: fetch-docker SUITE DIR"; cmd_fetch_docker "$1" "$2" ;;
*) die "unknown fetch command $cmd" ;;
esac
