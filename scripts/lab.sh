#!/usr/bin/env bash
# The embedded lab: a private containerd + a private registry, both on this machine only.
#
#   scripts/lab.sh start DIR [--cri MODE]     start containerd (root DIR/root, state DIR/state) and a registry;
#                                             writes DIR/env (KEY=VALUE lines, sourceable). --cri: with the CRI
#                                             plugin, configured as a Kubernetes node's (below), its sandbox
#                                             ("pause") image served by the lab registry
#                                               MODE default: containerd's CRI defaults, certs.d config_path
#                                               MODE kind:    kind's and EKS AL2023's settings: also
#                                                             discard_unpacked_layers = true
#   scripts/lab.sh base-image DIR NAME [--docker] [--namespace NS] [--no-pull]
#                                             build the two-layer busybox base image offline (cached in DIR/cache),
#                                             push it as REGISTRY/NAME:1 (OCI, or Docker schema2 with --docker),
#                                             pull it into containerd (not with --no-pull); prints the image
#                                             reference on stdout
#   scripts/lab.sh stop DIR                   kill every task, delete every container, stop containerd and the
#                                             registry, kill this lab's shims, unmount everything under DIR.
#                                             Safe twice and after a partial start.
#   scripts/lab.sh fetch-containerd-1.7 DIR   download Debian trixie's containerd .deb with apt (private apt state
#                                             in DIR/apt), extract it; prints the bin dir to use as
#                                             COMMITTER_CONTAINERD_BIN_DIR
#   scripts/lab.sh fetch-containerd-2 DIR     the same with Debian unstable's containerd 2.x
#   scripts/lab.sh fetch-docker SUITE DIR     SUITE's docker.io .deb (bookworm: 20.10, sid: 28.x) extracted; prints
#                                             its bin dir (dockerd, docker)
#
# Environment:
#   COMMITTER_CONTAINERD_BIN_DIR   take containerd, ctr and containerd-shim-runc-v2 from here (default: PATH)
#   CONTAINERD_NAMESPACE           namespace base-image pulls into (default: the lab's, "committer-test")
#   COMMITTER_LAB_XFS=SIZE         start: containerd's root and the spool on an XFS with reflink (mkfs.xfs -m reflink=1
#                                  on a sparse file DIR/xfs.img of SIZE, e.g. 2G, loop-mounted at DIR/xfs); `stop`
#                                  unmounts it, detaches the loop device and deletes the file. DIR/env gets
#                                  LAB_SPOOL_DIR (DIR/xfs/spool; DIR/spool without XFS) and LAB_XFS=1.
#
# Containers run by the test fixture use `--runc-root DIR/runc` and `--cgroup $LAB_CGROUP_PARENT/ID` so that two
# labs on one machine never share runc state or a cgroup (a shared freezer cgroup would pause both).
set -euo pipefail

LAB_NAMESPACE_DEFAULT=committer-test
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "lab.sh: $*" >&2; exit 1; }
log() { echo "lab.sh: $*" >&2; }

usage() {
  sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# abs_dir DIR: absolute, symlink-free path of DIR (created if missing).
abs_dir() {
  mkdir -p "$1"
  (cd "$1" && pwd -P)
}

# The socket lives in DIR unless the path would be too long for sockaddr_un (108 bytes incl. NUL; the ttrpc
# socket adds ".ttrpc"); then in /run/committer-lab/<hash of DIR>/.
sock_dir_for() {
  local dir=$1 suffix=/containerd.sock.ttrpc
  if [ $((${#dir} + ${#suffix})) -le 100 ]; then
    echo "$dir"
  else
    echo "/run/committer-lab/$(dir_hash "$dir")"
  fi
}

dir_hash() { printf '%s' "$1" | sha256sum | cut -c1-12; }

need() {
  local b
  for b in "$@"; do
    command -v "$b" >/dev/null 2>&1 || die "'$b' not found on PATH (run scripts/test.sh once as root to install the lab's packages)"
  done
}

containerd_bin_dir() {
  if [ -n "${COMMITTER_CONTAINERD_BIN_DIR:-}" ]; then
    local d
    d=$(cd "$COMMITTER_CONTAINERD_BIN_DIR" 2>/dev/null && pwd -P) ||
      die "COMMITTER_CONTAINERD_BIN_DIR=$COMMITTER_CONTAINERD_BIN_DIR is not a directory"
    echo "$d"
  else
    need containerd
    dirname "$(command -v containerd)"
  fi
}

# pids_with_args ARG...: pids whose command line contains every ARG as a whole argument.
pids_with_args() {
  local p f want found
  for f in /proc/[0-9]*/cmdline; do
    p=${f#/proc/}; p=${p%/cmdline}
    [ "$p" = "$$" ] && continue
    local -a argv=()
    mapfile -d "" -t argv 2>/dev/null <"$f" || continue
    [ ${#argv[@]} -gt 0 ] || continue
    found=1
    for want in "$@"; do
      local a hit=0
      for a in "${argv[@]}"; do [ "$a" = "$want" ] && { hit=1; break; }; done
      [ $hit = 1 ] || { found=0; break; }
    done
    [ $found = 1 ] && echo "$p"
  done
  return 0
}

# alive PID: the process exists and is not a zombie (kill -0 succeeds on zombies, and here an orphan's zombie
# can wait a while for PID 1 to reap it).
alive() {
  local s
  [ -n "${1:-}" ] || return 1
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  [ "${s%% *}" != Z ]
}

# ---------------------------------------------------------------------------------------------------------------
cmd_start() {
  local dir sockdir sock bindir cri=""
  dir=$(abs_dir "$1")
  if [ $# -ge 3 ] && [ "$2" = --cri ]; then cri=$3; fi
  case "$cri" in "" | default | kind) ;; *) die "start: --cri default|kind, not $cri" ;; esac
  case "$dir" in *[[:space:]\'\"\$\\]*) die "DIR must not contain spaces, quotes, \$ or backslashes: $dir" ;; esac
  need runc docker-registry curl python3 sha256sum
  bindir=$(containerd_bin_dir)
  local b
  for b in containerd ctr containerd-shim-runc-v2; do
    [ -x "$bindir/$b" ] || die "$bindir/$b is missing (containerd binaries are taken from ${COMMITTER_CONTAINERD_BIN_DIR:+COMMITTER_CONTAINERD_BIN_DIR=}$bindir)"
  done

  if [ -f "$dir/env" ]; then
    # shellcheck disable=SC1091
    . "$dir/env"
    if alive "${CONTAINERD_PID:-}" && "$CTR" -a "$CONTAINERD_ADDRESS" version >/dev/null 2>&1; then
      log "lab already running in $dir"
      return 0
    fi
    die "$dir holds a lab that is not running; run 'scripts/lab.sh stop $dir' first"
  fi

  sockdir=$(sock_dir_for "$dir")
  LAB_ROOT=$dir/root LAB_SPOOL=$dir/spool
  if [ -n "${COMMITTER_LAB_XFS:-}" ]; then
    mount_xfs "$dir" "$COMMITTER_LAB_XFS"
    LAB_ROOT=$dir/xfs/root LAB_SPOOL=$dir/xfs/spool
  fi
  mkdir -p "$sockdir" "$LAB_ROOT" "$LAB_SPOOL" "$dir/state" "$dir/opt" "$dir/runc" "$dir/logs"
  sock=$sockdir/containerd.sock
  rm -f "$sock" "$sock.ttrpc"

  # The registry first: a CRI config names its pause image on it.
  "$here/registry.sh" start "$dir/registry" || die "registry did not start (log: $dir/registry/registry.log)"
  local REGISTRY_ADDR REGISTRY_PID
  # shellcheck disable=SC1091
  . "$dir/registry/env"
  write_containerd_config "$dir" "$sock" "$cri" "$REGISTRY_ADDR"

  local cgparent
  cgparent="/committer-lab-$(dir_hash "$dir")"
  # containerd finds containerd-shim-runc-v2 on its PATH; put the chosen bin dir first. setsid: the daemon must not
  # get the caller's terminal signals; its output goes to a file so that callers capturing our stdout don't hang.
  PATH="$bindir:$PATH" setsid "$bindir/containerd" --config "$dir/config.toml" \
    </dev/null >"$dir/containerd.log" 2>&1 &
  local pid=$!
  # env is written before waiting, so that `stop` after a failed start finds the pid.
  write_env "$dir" "$sock" "$pid" "$bindir" "$REGISTRY_ADDR" "$REGISTRY_PID" "$cgparent"

  local ok=0
  for _ in $(seq 1 200); do
    if "$bindir/ctr" -a "$sock" version >/dev/null 2>&1; then ok=1; break; fi
    alive "$pid" || { tail -n 30 "$dir/containerd.log" >&2; die "containerd exited during start (log: $dir/containerd.log)"; }
    sleep 0.05
  done
  [ $ok = 1 ] || { tail -n 30 "$dir/containerd.log" >&2; die "containerd did not answer on $sock within 10 s"; }

  write_env "$dir" "$sock" "$pid" "$bindir" "$REGISTRY_ADDR" "$REGISTRY_PID" "$cgparent"
  if [ -n "$cri" ]; then
    push_pause_image "$dir" "$REGISTRY_ADDR/pause:1"
    echo "LAB_CRI=$cri" >>"$dir/env"
  fi
  log "containerd $("$bindir/ctr" -a "$sock" version 2>/dev/null | awk '/Server:/ {s = 1} s && /Version:/ && v == "" {v = $2} END {print v}') on $sock, registry on $REGISTRY_ADDR"
}

# mount_xfs DIR SIZE: a sparse DIR/xfs.img of SIZE formatted XFS with reflink, on a loop device (recorded in
# DIR/xfs.loop for `stop`), mounted at DIR/xfs.
mount_xfs() {
  local dir=$1 size=$2 img=$1/xfs.img loop
  need mkfs.xfs losetup truncate
  truncate -s "$size" "$img" || die "cannot create $img of $size"
  mkfs.xfs -q -f -m reflink=1 "$img" >&2 || die "mkfs.xfs -m reflink=1 $img failed"
  loop=$(losetup -f --show "$img") || die "losetup $img failed"
  echo "$loop" >"$dir/xfs.loop"
  mkdir -p "$dir/xfs"
  mount -t xfs "$loop" "$dir/xfs" || die "mounting $loop ($img) on $dir/xfs failed"
  log "containerd's root and the spool on XFS (reflink) $dir/xfs, $loop, $size sparse"
}

# unmount_xfs DIR: after every mount under DIR is gone, the loop device is detached (when it still holds our
# image) and the image deleted.
unmount_xfs() {
  local dir=$1 loop back
  [ -f "$dir/xfs.loop" ] || { rm -f "$dir/xfs.img"; return 0; }
  loop=$(cat "$dir/xfs.loop")
  back=$(losetup -n -O BACK-FILE "$loop" 2>/dev/null || true)
  case "$back" in "$dir/xfs.img"*) losetup -d "$loop" 2>/dev/null || log "could not detach $loop" ;; esac
  rm -f "$dir/xfs.img" "$dir/xfs.loop"
}

write_containerd_config() {
  local dir=$1 sock=$2 cri=$3 registry=$4 disabled='"io.containerd.grpc.v1.cri",'
  [ -z "$cri" ] || disabled=""
  cat >"$dir/config.toml" <<TOML
version = 2
root = "$LAB_ROOT"
state = "$dir/state"
disabled_plugins = [
  $disabled
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.blockfile",
]

[grpc]
  address = "$sock"

[ttrpc]
  address = "$sock.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
TOML
  [ -n "$cri" ] || return 0
  local discard=false
  [ "$cri" = kind ] && discard=true
  mkdir -p "$dir/certs.d/$registry" "$dir/cni/bin" "$dir/cni/conf"
  # The lab registry speaks plain HTTP; the CRI reads that from certs.d, as kind's and EKS's nodes configure it.
  cat >"$dir/certs.d/$registry/hosts.toml" <<TOML
server = "http://$registry"
[host."http://$registry"]
  capabilities = ["pull", "resolve", "push"]
TOML
  # Like kind's node config (kind images/base/files/etc/containerd/config.toml) and EKS AL2023's
  # (amazon-eks-ami templates/al2023/runtime/config.template.toml), except where this machine differs:
  # restrict_oom_score_adj (no CAP_SYS_RESOURCE here: runc fails on the pause container's -998), cgroupfs (no
  # systemd), the lab's own runc root, and a stream server on a free port (10010 would collide between labs).
  # NRI is disabled above: its socket is machine-wide.
  cat >>"$dir/config.toml" <<TOML

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$registry/pause:1"
  restrict_oom_score_adj = true
  tolerate_missing_hugetlb_controller = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    discard_unpacked_layers = $discard
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$dir/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$dir/certs.d"
TOML
}

# push_pause_image DIR REF: the base image with an entrypoint that blocks, as the CRI's sandbox image.
push_pause_image() {
  local dir=$1 ref=$2
  ensure_layout "$dir"
  skopeo copy --quiet --dest-tls-verify=false "oci:$dir/cache/base-oci:pause" "docker://$ref" >&2 ||
    die "skopeo could not push $ref"
}

write_env() {
  local dir=$1 sock=$2 pid=$3 bindir=$4 reg=$5 regpid=$6 cgparent=$7
  cat >"$dir/env.tmp" <<ENV
LAB_DIR=$dir
CONTAINERD_ADDRESS=$sock
CONTAINERD_PID=$pid
CONTAINERD_NAMESPACE=$LAB_NAMESPACE_DEFAULT
CONTAINERD_BIN_DIR=$bindir
CTR=$bindir/ctr
REGISTRY=$reg
REGISTRY_PID=$regpid
LAB_RUNC_ROOT=$dir/runc
LAB_CGROUP_PARENT=$cgparent
LAB_SPOOL_DIR=$LAB_SPOOL
LAB_XFS=${COMMITTER_LAB_XFS:+1}
ENV
  mv "$dir/env.tmp" "$dir/env"
}

load_env() {
  local dir=$1
  [ -f "$dir/env" ] || die "$dir/env not found: run 'scripts/lab.sh start $dir' first"
  # shellcheck disable=SC1091
  . "$dir/env"
  [ -n "${REGISTRY:-}" ] || die "$dir/env has no REGISTRY: the lab did not finish starting"
}

# ---------------------------------------------------------------------------------------------------------------
# base image

# build_layout LAYOUT: the two-layer OCI layout, tag "1". Every mtime is fixed so that the layers (and digests)
# are the same on every build with the same busybox.
build_layout() {
  local layout=$1 work
  need umoci
  [ -x /bin/busybox ] || die "/bin/busybox not found (install busybox-static)"
  file_is_static /bin/busybox || die "/bin/busybox is not statically linked (install busybox-static, not busybox)"
  work=$(mktemp -d "$(dirname "$layout")/build.XXXXXX")
  local epoch=1700000000 created=2023-11-14T22:13:20Z
  umoci init --layout "$work/oci" >&2
  umoci new --image "$work/oci:1" >&2
  umoci config --image "$work/oci:1" --no-history --created "$created" \
    --config.cmd /bin/sh --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.workingdir / --architecture amd64 --os linux >&2
  umoci unpack --image "$work/oci:1" "$work/bundle" >&2
  local r=$work/bundle/rootfs

  # layer 1: busybox and the usual directories
  mkdir -p "$r"/{bin,sbin,etc,tmp,root,var/tmp,var/log,usr/bin,usr/sbin,usr/local/bin,data,home,proc,sys,dev,run,mnt,opt,srv}
  chmod 0755 "$r"
  chmod 1777 "$r/tmp" "$r/var/tmp"
  chmod 0700 "$r/root"
  cp /bin/busybox "$r/bin/busybox"
  chmod 0755 "$r/bin/busybox"
  local a applets
  applets=$(/bin/busybox --list)
  for a in sh ash ls cat echo mkdir rmdir rm mv ln chmod chown chgrp sleep touch cp find stat sync head tail wc \
    grep sed tr test true false id env printf readlink realpath dd du df mknod mkfifo truncate kill ps uname \
    whoami xargs sort uniq md5sum sha256sum tar gzip date basename dirname hostname diff cmp od hexdump yes \
    seq awk which setfattr getfattr; do
    if grep -qx -- "$a" <<<"$applets"; then ln -s busybox "$r/bin/$a"; fi
  done
  ln -s ../../bin/busybox "$r/usr/bin/env"
  echo "layer one" >"$r/etc/layer1-only"
  echo "removed by layer two" >"$r/etc/removed-in-layer2"
  echo "lab" >"$r/etc/hostname"
  fix_mtimes "$r" "$epoch"
  umoci repack --image "$work/oci:1" --refresh-bundle --history.created "$created" \
    --history.created_by "lab.sh base-image: busybox" "$work/bundle" >&2

  # layer 2: files that tests modify, delete and replace
  rm "$r/etc/removed-in-layer2"
  printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$r/etc/passwd"
  printf 'root:x:0:\napp:x:1000:\nnogroup:x:65534:\n' >"$r/etc/group"
  mkdir -p "$r/home/app" "$r/data/dir-to-delete" "$r/data/dir-to-replace" "$r/data/sub/deep"
  chown 1000:1000 "$r/home/app"
  echo "keep me" >"$r/data/keep.txt"
  echo "modify me" >"$r/data/modify.txt"
  echo "delete me" >"$r/data/delete.txt"
  echo a >"$r/data/dir-to-delete/a"
  echo b >"$r/data/dir-to-delete/b"
  echo x >"$r/data/dir-to-replace/x"
  echo y >"$r/data/dir-to-replace/y"
  echo "deep" >"$r/data/sub/deep/file"
  echo "owned by app" >"$r/data/owned.txt"
  chown 1000:1000 "$r/data/owned.txt"
  chmod 0640 "$r/data/owned.txt"
  printf '#!/bin/sh\necho hello\n' >"$r/data/exec.sh"
  chmod 0755 "$r/data/exec.sh"
  echo "hardlinked" >"$r/data/hardlink-a"
  ln "$r/data/hardlink-a" "$r/data/hardlink-b"
  ln -s keep.txt "$r/data/symlink-to-keep"
  { yes "committer lab data 0123456789" || true; } | head -c 262144 >"$r/data/256k.bin"
  # Layer 2's paths, and the directories it changes, get a later mtime: then the layer holds their directory
  # entries (etc/, home/) as a docker build's would, and every unpacker gives them the same mtime.
  fix_mtimes "$r" "$epoch"
  fix_mtimes "$r/data" "$((epoch + 3600))"
  fix_mtimes "$r/home" "$((epoch + 3600))"
  touch -h -d "@$((epoch + 3600))" "$r/etc" "$r/etc/passwd" "$r/etc/group"
  umoci repack --image "$work/oci:1" --refresh-bundle --history.created "$created" \
    --history.created_by "lab.sh base-image: test files" "$work/bundle" >&2
  umoci gc --layout "$work/oci" >&2
  umoci config --image "$work/oci:1" --tag pause --no-history --created "$created" \
    --config.entrypoint /bin/sleep --config.cmd 1000000000 >&2
  rm -rf "$layout"
  mv "$work/oci" "$layout"
  rm -rf "$work"
}

ensure_layout() {
  local dir=$1
  need skopeo flock
  mkdir -p "$dir/cache"
  (
    flock 9
    [ -f "$dir/cache/base-oci/index.json" ] || build_layout "$dir/cache/base-oci"
  ) 9>"$dir/cache/lock"
}

fix_mtimes() { find "$1" -exec touch -h -d "@$2" {} +; }

file_is_static() {
  # ldd says "not a dynamic executable" (and fails) for a static binary
  command -v ldd >/dev/null 2>&1 || return 0
  ! ldd "$1" >/dev/null 2>&1
}

cmd_base_image() {
  local dir=$1 name=$2; shift 2
  local docker=0 ns=${CONTAINERD_NAMESPACE:-} pull=1
  while [ $# -gt 0 ]; do
    case "$1" in
    --docker) docker=1 ;;
    --no-pull) pull=0 ;;
    --namespace) ns=${2:?--namespace needs a value}; shift ;;
    *) die "base-image: unknown argument $1" ;;
    esac
    shift
  done
  dir=$(cd "$dir" 2>/dev/null && pwd -P) || die "no lab in $dir"
  load_env "$dir"
  ns=${ns:-$CONTAINERD_NAMESPACE}
  need skopeo flock

  ensure_layout "$dir"
  local layout=$dir/cache/base-oci

  local ref=$REGISTRY/$name:1 fmt=()
  [ $docker = 1 ] && fmt=(--format v2s2)
  skopeo copy --quiet --dest-tls-verify=false "${fmt[@]}" "oci:$layout:1" "docker://$ref" >&2 ||
    die "skopeo could not push $ref"
  [ $pull = 1 ] || { echo "$ref"; return 0; }
  "$CTR" -a "$CONTAINERD_ADDRESS" -n "$ns" images pull --plain-http "$ref" >"$dir/logs/pull-${name//\//_}.log" 2>&1 ||
    { cat "$dir/logs/pull-${name//\//_}.log" >&2; die "ctr could not pull $ref"; }
  echo "$ref"
}

# ---------------------------------------------------------------------------------------------------------------
# stop: every step tolerates what an earlier, partial start did not create.

cmd_stop() {
  local dir=$1
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd -P)
  local CONTAINERD_ADDRESS="" CONTAINERD_PID="" CTR="" LAB_CGROUP_PARENT="" REGISTRY="" REGISTRY_PID=""
  # shellcheck disable=SC1091
  [ -f "$dir/env" ] && . "$dir/env"
  local sock=${CONTAINERD_ADDRESS:-$(sock_dir_for "$dir")/containerd.sock}
  local cgparent=${LAB_CGROUP_PARENT:-/committer-lab-$(dir_hash "$dir")}

  # the pid is checked against our config file: pids get reused
  local pids p
  pids=$(pids_with_args --config "$dir/config.toml")

  # 1. tasks and containers, through containerd while it still answers (ctr waits for a dead socket: ask only a
  #    live containerd)
  if [ -n "$pids" ] && [ -n "$CTR" ] && [ -x "$CTR" ] && timeout 5 "$CTR" -a "$sock" version >/dev/null 2>&1; then
    local ns id st
    for ns in $(timeout 10 "$CTR" -a "$sock" namespaces ls -q 2>/dev/null); do
      local c=("$CTR" -a "$sock" -n "$ns")
      while read -r id _ st; do
        [ -n "$id" ] || continue
        # a frozen process does not die of SIGKILL until thawed
        if [ "$st" = PAUSED ] || [ "$st" = PAUSING ]; then
          timeout 10 "${c[@]}" tasks resume "$id" >/dev/null 2>&1 || true
        fi
        timeout 10 "${c[@]}" tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
      done < <(timeout 10 "${c[@]}" tasks ls 2>/dev/null | tail -n +2)
      for id in $(timeout 10 "${c[@]}" tasks ls -q 2>/dev/null); do
        timeout 20 "${c[@]}" tasks delete -f "$id" >/dev/null 2>&1 || log "could not delete task $ns/$id"
      done
      for id in $(timeout 10 "${c[@]}" containers ls -q 2>/dev/null); do
        timeout 20 "${c[@]}" containers delete "$id" >/dev/null 2>&1 || log "could not delete container $ns/$id"
      done
    done
  fi

  # 2. containerd itself
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $pids; do
    for _ in $(seq 1 100); do alive "$p" || break; sleep 0.05; done
    alive "$p" && { log "containerd $p ignored SIGTERM; killing"; kill -KILL "$p" 2>/dev/null || true; }
  done

  # 3. shims of this lab (left when a task could not be deleted) and their containers' processes
  for p in $(pids_with_args -address "$sock"); do kill -KILL "$p" 2>/dev/null || true; done
  kill_cgroup_procs "$cgparent"

  # 4. the registry: its data is thrown away with DIR, so it gets no graceful shutdown (that takes 2 s)
  if alive "${REGISTRY_PID:-}" && [ "$(cat "/proc/$REGISTRY_PID/comm" 2>/dev/null)" = docker-registry ]; then
    kill -KILL "$REGISTRY_PID" 2>/dev/null || true
    for _ in $(seq 1 40); do alive "$REGISTRY_PID" || break; sleep 0.05; done
  fi
  "$here/registry.sh" stop "$dir/registry" >/dev/null 2>&1 || true

  # 5. mounts under DIR (and the socket dir), deepest first, lazily
  local sockdir
  sockdir=$(dirname "$sock")
  unmount_under "$dir"
  [ "$sockdir" != "$dir" ] && unmount_under "$sockdir"
  unmount_xfs "$dir"

  # 6. cgroups and the short socket dir
  remove_cgroups "$cgparent"
  rm -f "$sock" "$sock.ttrpc"
  case "$sockdir" in /run/committer-lab/*) rmdir "$sockdir" /run/committer-lab 2>/dev/null || true ;; esac
  rm -f "$dir/env"
  return 0
}

# mounts_under DIR: mount points at or below DIR, deepest first.
mounts_under() {
  local dir=$1
  awk -v d="$dir" '
    function unescape(s,   out, i, c) {
      out = ""
      for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (c == "\\" && substr(s, i + 1, 3) ~ /^[0-7][0-7][0-7]$/) {
          out = out sprintf("%c", (substr(s, i + 1, 1) * 64) + (substr(s, i + 2, 1) * 8) + substr(s, i + 3, 1))
          i += 3
        } else out = out c
      }
      return out
    }
    { m = unescape($5); if (m == d || index(m, d "/") == 1) { n = gsub("/", "/", m); print n "\t" m } }
  ' /proc/self/mountinfo | sort -rn -k1,1 | cut -f2-
}

unmount_under() {
  local dir=$1 m
  for _ in 1 2 3 4 5; do
    local any=0
    while IFS= read -r m; do
      [ -n "$m" ] || continue
      any=1
      umount -l "$m" 2>/dev/null || log "could not unmount $m"
    done < <(mounts_under "$dir")
    [ $any = 1 ] || return 0
  done
  mounts_under "$dir" | sed 's/^/lab.sh: still mounted: /' >&2
}

cgroup_dirs() {
  local parent=$1 h
  for h in /sys/fs/cgroup /sys/fs/cgroup/*; do
    [ -d "$h$parent" ] && echo "$h$parent"
  done
  return 0
}

# Every cgroup below PARENT, deepest first: CRI pods nest their containers one level below the pod's cgroup.
cgroup_tree() {
  local d
  for d in $(cgroup_dirs "$1"); do find "$d" -mindepth 1 -depth -type d 2>/dev/null || true; done
  return 0
}

kill_cgroup_procs() {
  local parent=$1 d f p
  for d in $(cgroup_tree "$parent"); do
    f=$d/freezer.state; if [ -f "$f" ]; then echo THAWED >"$f" 2>/dev/null || true; fi
    f=$d/cgroup.freeze; if [ -f "$f" ]; then echo 0 >"$f" 2>/dev/null || true; fi
  done
  for d in $(cgroup_dirs "$parent") $(cgroup_tree "$parent"); do
    [ -f "$d/cgroup.procs" ] || continue
    for p in $(cat "$d/cgroup.procs" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  return 0
}

remove_cgroups() {
  local parent=$1 d sub
  for d in $(cgroup_dirs "$parent"); do
    for _ in $(seq 1 50); do
      for sub in $(cgroup_tree "$parent"); do rmdir "$sub" 2>/dev/null || true; done
      rmdir "$d" 2>/dev/null && break
      sleep 0.1
    done
    if [ -d "$d" ]; then log "could not remove cgroup $d"; fi
  done
  return 0
}

# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------
[ $# -ge 2 ] || usage
cmd=$1; shift
case "$cmd" in
start) cmd_start "$@" ;;
stop) cmd_stop "$1" ;;
base-image) [ $# -ge 2 ] || usage; cmd_base_image "$@" ;;
fetch-containerd-1.7 | fetch-containerd-2 | fetch-docker) exec "$here/debian-fetch.sh" "$cmd" "$@" ;;
*) usage ;;
esac
