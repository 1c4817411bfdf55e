#!/usr/bin/env bash
# Commit a pod of a local kind cluster, from inside the kind node that runs it.
#
#   scripts/kind-commit.sh NS/POD --image REF [--container-name C] [--kind-cluster NAME] [--plain-http]
#                          [--registry-config FILE] [--binary PATH] [--node NODE] [-- MORE COMMITTER ARGS…]
#   scripts/kind-commit.sh --node NODE --container ID --image REF [same options]
#
# Builds the static committer binary (scripts/build-image.sh --binary-only, unless --binary), finds the node the
# pod runs on (kubectl, context kind-NAME), `docker cp`s the binary (and FILE) into a fresh private directory
# (mktemp -d, 0700) in that node's container, runs
#   committer commit --pod NS/POD [--container-name C] --image REF
#                    --address /run/containerd/containerd.sock --namespace k8s.io …
# there with `docker exec`, prints the result JSON on stdout, removes that directory and exits with committer's
# exit code (README.md, "Exit codes").
#
#   --kind-cluster NAME     the kind cluster (default: $KIND_CLUSTER_NAME, else "kind")
#   --plain-http            HTTP to the registry (a local registry such as kind's "kind-registry:5000")
#   --registry-config FILE  a docker config.json with push credentials, copied into the node for the run
#   --binary PATH           use this static binary instead of building one
#   --node NODE             the node's docker container, named directly: no kind label lookup, no kubectl (a node
#                           without an API server, or a cluster kubectl cannot reach)
#   --container ID          commit this containerd container (namespace k8s.io) instead of a pod (needs --node)
#
# REF is pushed to from the node container, so it must be reachable from there, not only from this machine: the
# local registry of kind's docs (a "kind-registry" container on the "kind" docker network, REF
# kind-registry:5000/snaps/NAME:TAG with --plain-http), or a real registry with --registry-config.
#
# Needs: docker, kubectl (or a single-node cluster), and what build-image.sh needs to build (cargo, musl-tools).
# tests/it/kind.rs runs it against a kind-style node: a privileged Docker container running containerd with kind's
# CRI settings (--node, no API server).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "kind-commit.sh: $*" >&2; exit 2; }
say() { echo "kind-commit.sh: $*" >&2; }
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}" >&2; exit 2; }

pod="" image="" container_name="" cluster=${KIND_CLUSTER_NAME:-kind} plain_http=0 registry_config="" binary=""
node="" container=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
  --image) image=${2:?--image needs a reference}; shift ;;
  --container-name) container_name=${2:?--container-name needs a name}; shift ;;
  --kind-cluster) cluster=${2:?--kind-cluster needs a name}; shift ;;
  --plain-http) plain_http=1 ;;
  --registry-config) registry_config=${2:?--registry-config needs a file}; shift ;;
  --binary) binary=${2:?--binary needs a path}; shift ;;
  --node) node=${2:?--node needs a container name}; shift ;;
  --container) container=${2:?--container needs an ID}; shift ;;
  -h | --help) usage ;;
  --) shift; extra=("$@"); break ;;
  -*) die "unknown option $1 (committer's own flags go after --)" ;;
  *)
    [ -z "$pod" ] || die "one NS/POD only (got $pod and $1)"
    pod=$1
    ;;
  esac
  shift
done
if [ -n "$container" ]; then
  [ -z "$pod" ] || die "give NS/POD or --container ID, not both"
  [ -n "$node" ] || die "--container needs --node (the node's docker container)"
  [[ "$container" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--container $container is not a containerd container ID"
else
  [ -n "$pod" ] || usage
  [[ "$pod" == */* && "$pod" != */*/* ]] || die "the pod must be NAMESPACE/NAME, not $pod"
fi
[ -n "$image" ] || die "--image REGISTRY/REPO[:TAG] is required"
[ -z "$registry_config" ] || [ -f "$registry_config" ] || die "--registry-config $registry_config is not a file"
command -v docker >/dev/null 2>&1 || die "docker not found: kind runs its nodes as docker containers"

# ---- the node ---------------------------------------------------------------------------------------------------
if [ -n "$node" ]; then
  [ "$(docker inspect -f '{{.State.Running}}' "$node" 2>/dev/null)" = true ] ||
    die "--node $node is not a running docker container (docker ps)"
else
  listed=$(docker ps --filter "label=io.x-k8s.kind.cluster=$cluster" --format '{{.Names}}') ||
    die "docker ps failed: is the Docker engine running?"
  mapfile -t nodes < <(printf '%s\n' "$listed" | sed '/^$/d')
  [ ${#nodes[@]} -gt 0 ] || die "no running kind cluster named $cluster (kind get clusters; --kind-cluster NAME)"

  if command -v kubectl >/dev/null 2>&1; then
    ns=${pod%%/*} name=${pod#*/}
    node=$(kubectl --context "kind-$cluster" -n "$ns" get pod "$name" -o jsonpath='{.spec.nodeName}') ||
      die "kubectl could not read pod $pod in cluster kind-$cluster"
    [ -n "$node" ] || die "pod $pod is not scheduled on a node yet"
    printf '%s\n' "${nodes[@]}" | grep -qx -- "$node" ||
      die "pod $pod runs on $node, which is not a node container of kind cluster $cluster (${nodes[*]})"
  elif [ ${#nodes[@]} = 1 ]; then
    node=${nodes[0]}
    say "kubectl not found; the cluster has one node: $node"
  else
    die "kubectl not found, and cluster $cluster has ${#nodes[@]} nodes: cannot tell which runs $pod"
  fi
fi

# ---- the binary -------------------------------------------------------------------------------------------------
if [ -z "$binary" ]; then
  binary=$("$here/build-image.sh" --binary-only) || die "building the static binary failed"
fi
[ -x "$binary" ] || die "$binary is not an executable file"
node_arch=$(docker exec "$node" uname -m) || die "docker exec into $node failed"
if command -v readelf >/dev/null 2>&1; then
  bin_arch=$(readelf -hW "$binary" | sed -n 's/^ *Machine: *//p')
  case "$node_arch:$bin_arch" in
  x86_64:*X86-64* | aarch64:*AArch64*) ;;
  *) die "$binary is built for '$bin_arch', the node $node is $node_arch (build on a $node_arch machine)" ;;
  esac
fi

# ---- copy, run, clean up ----------------------------------------------------------------------------------------
# A fresh 0700 directory from mktemp on the node: no predictable path another process there could pre-create or
# link, and nothing in it readable by anyone but root.
dst=$(docker exec "$node" mktemp -d /tmp/committer-kind.XXXXXXXXXX) || die "mktemp -d in $node failed"
[[ "$dst" =~ ^/tmp/committer-kind\.[A-Za-z0-9]{10}$ ]] || die "mktemp in $node printed an unexpected path: $dst"
# shellcheck disable=SC2317 # called by the trap
cleanup() { docker exec "$node" rm -rf "$dst" >/dev/null 2>&1 || true; }
trap cleanup EXIT
docker exec "$node" chmod 0700 "$dst" || die "chmod of $dst in $node failed"
docker cp "$binary" "$node:$dst/committer" >/dev/null || die "docker cp to $node failed"

args=(commit --image "$image" --address /run/containerd/containerd.sock --namespace k8s.io)
if [ -n "$container" ]; then args+=(--container "$container"); else args+=(--pod "$pod"); fi
[ -z "$container_name" ] || args+=(--container-name "$container_name")
[ $plain_http = 0 ] || args+=(--plain-http)
if [ -n "$registry_config" ]; then
  # Written through a umask-077 shell, so the credentials are 0600 from their first byte (docker cp would keep
  # the source file's mode until a later chmod).
  docker exec -i "$node" sh -c 'umask 077 && cat >"$1"' sh "$dst/config.json" <"$registry_config" ||
    die "copying the registry config into $node failed"
  args+=(--registry-config "$dst/config.json")
fi
args+=("${extra[@]}")

say "committing ${pod:-container $container} on node $node to $image"
rc=0
docker exec "$node" "$dst/committer" "${args[@]}" || rc=$?
exit "$rc"
