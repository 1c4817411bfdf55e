#!/usr/bin/env bash
# The main job on an embedded lab: a private containerd and registry, a sandbox container whose
# files change, `committer commit` pushing it, and the pushed image pulled back and run to show
# that the change survived. Cleans up after itself. Needs root (containerd, mounts).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (it starts a private containerd and mounts overlays)" >&2; exit 1; }

# The lab's packages; scripts/test.sh installs the same set.
"$here/install-deps.sh"

echo "== building committer"
cargo build --release --quiet --manifest-path "$top/Cargo.toml"
bin="$top/target/release/committer"

lab=$(mktemp -d /tmp/committer-demo.XXXXXX)
cleanup() { "$here/lab.sh" stop "$lab" >/dev/null 2>&1 || true; rm -rf "$lab"; }
trap cleanup EXIT INT TERM

echo "== starting the lab (private containerd + registry) in $lab"
"$here/lab.sh" start "$lab" >/dev/null
# shellcheck disable=SC1091
. "$lab/env"
export CONTAINERD_ADDRESS CONTAINERD_NAMESPACE=committer-test
ctr() { command ctr -a "$CONTAINERD_ADDRESS" -n "$CONTAINERD_NAMESPACE" "$@"; }

base=$("$here/lab.sh" base-image "$lab" demo/base)
echo "== base image: $base"

echo "== running sandbox 'agent-1' (pod team-a/agent-1) and changing its files"
ctr run -d --runc-root "$LAB_RUNC_ROOT" --cgroup "$LAB_CGROUP_PARENT/agent-1" --label io.kubernetes.pod.namespace=team-a --label io.kubernetes.pod.name=agent-1 \
  --label io.kubernetes.container.name=work "$base" agent-1 sleep 100000 >/dev/null
ctr tasks exec --exec-id change agent-1 sh -c '
  echo "notes written in the cloud sandbox" > /root/notes.txt
  rm -r /data/dir-to-delete
  ln -s /root/notes.txt /data/notes-link'

echo "== committer commit --pod team-a/agent-1 --image $REGISTRY/demo/agent-1:snap1"
result=$("$bin" commit --pod team-a/agent-1 --image "$REGISTRY/demo/agent-1:snap1" --plain-http --log-format text)
echo "$result"
image=$(printf '%s' "$result" | python3 -c 'import json,sys; print(json.load(sys.stdin)["image"])')

echo "== pulling $image back and running it as a new sandbox"
ctr images pull --plain-http "$image" >/dev/null
ctr run --rm --runc-root "$LAB_RUNC_ROOT" --cgroup "$LAB_CGROUP_PARENT/restored" "$image" restored sh -c 'cat /root/notes.txt; ls /data; test ! -e /data/dir-to-delete && echo "dir-to-delete: gone"'
echo "== done: the change survived the round trip"
