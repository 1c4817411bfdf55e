#!/usr/bin/env bash
# Build the committer image without a container engine: a static binary, then umoci.
#
#   scripts/build-image.sh [OUT_DIR]            build the static binary and the image (OUT_DIR default: target/image)
#   scripts/build-image.sh --binary-only        build the static binary only; print its path on stdout
#   scripts/build-image.sh --binary PATH [OUT]  package PATH (a static binary built elsewhere) instead of building
#
# Writes OUT_DIR/oci (an OCI image layout, tagged with the version), OUT_DIR/committer-VERSION.oci.tar (the same
# layout as an OCI archive: `skopeo copy oci-archive:FILE docker://…`), OUT_DIR/committer (the binary packaged),
# OUT_DIR/build.env (DIGEST, TAG, LIBC and the inputs below: `set -a; . OUT_DIR/build.env; set +a` then
# `--binary OUT_DIR/committer` rebuilds the same digest) and OUT_DIR/digest; prints the manifest digest (sha256:…) on
# stdout. Progress goes to stderr.
#
# The image is what the Containerfile builds: FROM scratch with /committer (static, rustls with bundled web roots,
# so no CA file) and an empty /tmp (1777, for the layer spool and the walk fallback's mount points), ENTRYPOINT
# ["/committer"], user 0, no shell, OCI labels. The same binary and inputs (Environment, below) give the same digest.
#
# Static binary: x86_64-unknown-linux-musl (needs the rustup target and musl-gcc from musl-tools: ring and
# zstd-sys compile C). When the musl target cannot be had, falls back to x86_64-unknown-linux-gnu with
# `-C target-feature=+crt-static`, and says so on stderr and in the label dev.committer.libc.
#
# Environment:
#   SOURCE_DATE_EPOCH          mtimes, `created`, history (default: the HEAD commit's time, else 0)
#   COMMITTER_STATIC_LIBC      auto (default) | musl | glibc: force one; `musl` fails instead of falling back
#   COMMITTER_IMAGE_VERSION    label + tag (default: Cargo.toml's version)
#   COMMITTER_IMAGE_REVISION   label (default: git HEAD, with "-dirty" when the work tree has changes)
#   COMMITTER_IMAGE_SOURCE     label (default: Cargo.toml's repository)
#   CARGO                      cargo to use (default: cargo)
# Needs: cargo, umoci, tar, sha256sum; readelf (binutils) to prove the binary static, else ldd.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
CARGO=${CARGO:-cargo}

die() { echo "build-image.sh: $*" >&2; exit 1; }
say() { echo "build-image.sh: $*" >&2; }
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}" >&2; exit 2; }

need() {
  local b
  for b in "$@"; do command -v "$b" >/dev/null 2>&1 || die "'$b' not found on PATH"; done
}

# ---- the static binary ------------------------------------------------------------------------------------------

# rust_arch: the Rust target arch of this machine (x86_64, aarch64…).
rust_arch() { uname -m; }

# oci_arch: the OCI architecture name for the same machine.
oci_arch() {
  case "$(uname -m)" in
  x86_64) echo amd64 ;;
  aarch64) echo arm64 ;;
  *) uname -m ;;
  esac
}

target_installed() { [ -d "$(rustc --print sysroot)/lib/rustlib/$1/lib" ]; }

# use_musl_cc TRIPLE: makes sure cc-rs finds a C compiler for a musl target; fails if there is none. CC_<triple>
# wins; cc-rs looks for musl-gcc on x86_64 and ARCH-linux-musl-gcc elsewhere; Debian's musl-gcc (musl-tools) is
# for the machine's own arch, so it is named explicitly when the prefixed one is missing.
use_musl_cc() {
  local var="CC_${1//-/_}"
  if [ -n "${!var:-}" ]; then
    command -v "${!var}" >/dev/null
  elif [ "$(rust_arch)" = x86_64 ] && command -v musl-gcc >/dev/null; then
    return 0
  elif command -v "$(rust_arch)-linux-musl-gcc" >/dev/null; then
    return 0
  elif command -v musl-gcc >/dev/null; then
    export "$var=musl-gcc"
  else
    return 1
  fi
}

# is_static BIN: no program interpreter and no NEEDED libraries.
is_static() {
  if command -v readelf >/dev/null 2>&1; then
    ! readelf -lW "$1" | grep -q 'program interpreter' && ! readelf -dW "$1" | grep -q '(NEEDED)'
  else
    local o
    o=$(ldd "$1" 2>&1 || true)
    [[ "$o" == *"statically linked"* || "$o" == *"not a dynamic executable"* ]]
  fi
}

# libc_of BIN: glibc-static when the binary carries glibc's ABI note, else musl (Rust's musl binaries have none).
libc_of() {
  if command -v readelf >/dev/null 2>&1 && readelf -nW "$1" | grep -q NT_GNU_ABI_TAG; then
    echo glibc-static
  elif command -v readelf >/dev/null 2>&1; then
    echo musl
  else
    echo unknown
  fi
}

# cargo_build TRIPLE: a release build of the committer binary; prints its path (cargo's own report, so that
# CARGO_TARGET_DIR and build.target-dir are honoured).
cargo_build() {
  local json exe
  json=$(cd "$root" && "$CARGO" build --release --locked --target "$1" --bin committer \
    --message-format=json-render-diagnostics) || die "cargo build --target $1 failed"
  exe=$(printf '%s\n' "$json" | sed -n 's/.*"executable":"\([^"]*\/committer\)".*/\1/p' | tail -n1)
  [ -n "$exe" ] || die "cargo build --target $1 reported no committer executable"
  echo "$exe"
}

# build_static_binary: builds; sets BIN (path) and LIBC (musl | glibc-static).
build_static_binary() {
  need "$CARGO" rustc
  local arch want musl gnu reason=""
  arch=$(rust_arch)
  want=${COMMITTER_STATIC_LIBC:-auto}
  musl=$arch-unknown-linux-musl
  gnu=$arch-unknown-linux-gnu
  case "$want" in auto | musl | glibc) ;; *) die "COMMITTER_STATIC_LIBC must be auto, musl or glibc, not $want" ;; esac

  if [ "$want" != glibc ]; then
    if ! target_installed "$musl" && command -v rustup >/dev/null 2>&1; then
      say "adding the rustup target $musl"
      rustup target add "$musl" >&2 || say "rustup target add $musl failed"
    fi
    if ! target_installed "$musl"; then
      reason="the Rust target $musl is not installed (rustup target add $musl)"
    elif ! use_musl_cc "$musl"; then
      reason="no musl C compiler for $musl (apt-get install musl-tools, or set CC_${musl//-/_})"
    fi
    if [ -z "$reason" ]; then
      say "building a static binary for $musl (musl)"
      BIN=$(cargo_build "$musl")
      LIBC=musl
    elif [ "$want" = musl ]; then
      die "COMMITTER_STATIC_LIBC=musl, but $reason"
    else
      say "falling back to a static glibc build: $reason"
    fi
  fi
  if [ -z "${LIBC:-}" ]; then
    # With an explicit --target, these flags reach only the target's crates: build scripts and proc macros stay
    # dynamic (a proc macro cannot be linked statically).
    say "building a static binary for $gnu (glibc, -C target-feature=+crt-static)"
    local var="CARGO_TARGET_${gnu//-/_}_RUSTFLAGS"
    var=${var^^}
    if [ -n "${RUSTFLAGS:-}" ]; then
      export RUSTFLAGS="$RUSTFLAGS -C target-feature=+crt-static"
    else
      export "$var=${!var:+${!var} }-C target-feature=+crt-static"
    fi
    BIN=$(cargo_build "$gnu")
    LIBC=glibc-static
  fi
  [ -x "$BIN" ] || die "cargo did not produce $BIN"
  is_static "$BIN" || die "$BIN is not statically linked"
  say "static binary ($LIBC): $BIN"
}

# ---- arguments --------------------------------------------------------------------------------------------------
binary_only=0 BIN="" LIBC="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
  --binary-only) binary_only=1 ;;
  --binary)
    BIN=${2:?--binary needs a path}
    shift
    ;;
  -h | --help) usage ;;
  -*) die "unknown option $1" ;;
  *)
    [ -z "$out" ] || die "one OUT_DIR only"
    out=$1
    ;;
  esac
  shift
done

if [ $binary_only = 1 ]; then
  [ -z "$BIN" ] || die "--binary and --binary-only together make no sense"
  build_static_binary
  echo "$BIN"
  exit 0
fi

if [ -n "$BIN" ]; then
  [ -x "$BIN" ] || die "--binary $BIN is not an executable file"
  is_static "$BIN" || die "--binary $BIN is not statically linked (it must run in an image with nothing else)"
  LIBC=$(libc_of "$BIN")
else
  build_static_binary
fi

# ---- metadata ---------------------------------------------------------------------------------------------------
need umoci tar sha256sum
cargo_field() { sed -n "/^\[package\]/,/^\[/ s/^$1 *= *\"\(.*\)\"/\1/p" "$root/Cargo.toml" | head -n1; }

version=${COMMITTER_IMAGE_VERSION:-$(cargo_field version)}
source_url=${COMMITTER_IMAGE_SOURCE:-$(cargo_field repository)}
license=$(cargo_field license)
if [ -z "${COMMITTER_IMAGE_REVISION:-}" ] && git -C "$root" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  revision=$(git -C "$root" rev-parse HEAD)
  [ -z "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] || revision=$revision-dirty
else
  revision=${COMMITTER_IMAGE_REVISION:-unknown}
fi
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)
fi
[[ "$SOURCE_DATE_EPOCH" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be a Unix time, not $SOURCE_DATE_EPOCH"
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
[ -n "$version" ] || die "no version (Cargo.toml unreadable?)"
tag=$version

# ---- the image --------------------------------------------------------------------------------------------------
out=${out:-$root/target/image}
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
layout=$work/oci

say "image $tag: version $version, revision $revision, created $created"
umoci init --layout "$layout" >&2
umoci new --image "$layout:$tag" >&2
umoci unpack --image "$layout:$tag" "$work/bundle" >&2
rootfs=$work/bundle/rootfs
# Only the binary and an empty /tmp: no shell, no libc, no CA file.
install -m 0755 "$BIN" "$rootfs/committer"
mkdir -m 1777 "$rootfs/tmp"
chmod 0755 "$rootfs"
chown -R 0:0 "$rootfs"
find "$rootfs" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
umoci repack --image "$layout:$tag" --history.created "$created" \
  --history.created_by "scripts/build-image.sh: /committer ($LIBC), /tmp" "$work/bundle" >&2

labels=(
  "org.opencontainers.image.title=committer"
  "org.opencontainers.image.description=Commit a running containerd container's filesystem to an OCI registry"
  "org.opencontainers.image.source=$source_url"
  "org.opencontainers.image.revision=$revision"
  "org.opencontainers.image.version=$version"
  "org.opencontainers.image.created=$created"
  "org.opencontainers.image.licenses=$license"
  "dev.committer.libc=$LIBC"
)
args=()
for l in "${labels[@]}"; do args+=(--config.label "$l" --manifest.annotation "$l"); done
# `--clear` first: umoci new leaves no Env/Cmd today, but the image must not depend on that.
umoci config --image "$layout:$tag" --no-history --clear config.env --clear config.cmd \
  --created "$created" --author "committer build-image.sh" \
  --architecture "$(oci_arch)" --os linux \
  --config.entrypoint /committer --config.user 0 --config.workingdir / \
  "${args[@]}" >&2
umoci gc --layout "$layout" >&2

# the digest of the tagged manifest, from index.json
digest=$(sed -n 's/.*"digest":"\(sha256:[0-9a-f]\{64\}\)".*/\1/p' "$layout/index.json" | head -n1)
[ -n "$digest" ] || die "no manifest digest in $layout/index.json"

# The archive: the same layout, as a tar with fixed order, owners and times.
find "$layout" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
archive=$work/committer-$version.oci.tar
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner --format=posix \
  --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
  -cf "$archive" -C "$layout" .

rm -rf "$out/oci" "$out/committer-$version.oci.tar"
mv "$layout" "$out/oci"
mv "$archive" "$out/committer-$version.oci.tar"
if ! [ "$BIN" -ef "$out/committer" ]; then
  install -m 0755 "$BIN" "$work/committer"
  mv "$work/committer" "$out/committer"
fi
# What went into the digest, under the names this script reads (values are single-quoted for sourcing).
{
  printf "DIGEST='%s'\nTAG='%s'\nLIBC='%s'\nSOURCE_DATE_EPOCH='%s'\n" "$digest" "$tag" "$LIBC" "$SOURCE_DATE_EPOCH"
  printf "COMMITTER_IMAGE_VERSION='%s'\nCOMMITTER_IMAGE_REVISION='%s'\nCOMMITTER_IMAGE_SOURCE='%s'\n" \
    "$version" "$revision" "$source_url"
} >"$out/build.env"
echo "$digest" >"$out/digest"
say "OCI layout $out/oci (tag $tag), archive $out/committer-$version.oci.tar"
say "push: skopeo copy oci:$out/oci:$tag docker://REGISTRY/REPO:$tag"
echo "$digest"
