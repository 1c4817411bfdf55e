#!/usr/bin/env bash
# Commit a pod of a local kind cluster, from inside the kind node that runs it.
#
#   scripts/kind-commit.sh NS/POD --image REF [--container-name C] [--kind-cluster NAME] [--plain-http]
#                          [--registry-config FILE] [--binary PATH] [-- MORE COMMITTER ARGS…]
#
# Builds the static committer binary (scripts/build-image.sh --binary-only, unless --binary), finds the node the
# pod runs on (kubectl, context kind-NAME), `docker cp`s the binary (and FILE) into that node's container, runs
#   committer commit --pod NS/POD [--container-name C] --image REF
#                    --address /run/containerd/containerd.sock --namespace k8s.io …
# there with `docker exec`, prints the result JSON on stdout, removes what it copied and exits with committer's
# exit code (README.md, "Exit codes").
#
#   --kind-cluster NAME     the kind cluster (default: $KIND_CLUSTER_NAME, else "kind")
#   --plain-http            HTTP to the registry (a local registry such as kind's "kind-registry:5000")
#   --registry-config FILE  a docker config.json with push credentials, copied into the node for the run
#   --binary PATH           use this static binary instead of building one
#
# REF is pushed to from the node container, so it must be reachable from there, not only from this machine: the
# local registry of kind's docs (a "kind-registry" container on the "kind" docker network, REF
# kind-registry:5000/snaps/NAME:TAG with --plain-http), or a real registry with --registry-config.
#
# Needs: docker, kubectl (or a single-node cluster), and what build-image.sh needs to build (cargo, musl-tools).
# Not run by the test suite (no Docker there): `bash -n` and shellcheck only.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "kind-commit.sh: $*" >&2; exit 2; }
say() { echo "kind-commit.sh: $*" >&2; }
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}" >&2; exit 2; }

pod="" image="" container_name="" cluster=${KIND_CLUSTER_NAME:-kind} plain_http=0 registry_config="" binary=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
  --image) image=${2:?--image needs a reference}; shift ;;
  --container-name) container_name=${2:?--container-name needs a name}; shift ;;
  --kind-cluster) cluster=${2:?--kind-cluster needs a name}; shift ;;
  --plain-http) plain_http=1 ;;
  --registry-config) registry_config=${2:?--registry-config needs a file}; shift ;;
  --binary) binary=${2:?--binary needs a path}; shift ;;
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
[ -n "$pod" ] || usage
[[ "$pod" == */* && "$pod" != */*/* ]] || die "the pod must be NAMESPACE/NAME, not $pod"
[ -n "$image" ] || die "--image REGISTRY/REPO[:TAG] is required"
[ -z "$registry_config" ] || [ -f "$registry_config" ] || die "--registry-config $registry_config is not a file"
command -v docker >/dev/null 2>&1 || die "docker not found: kind runs its nodes as docker containers"

# ---- the node ---------------------------------------------------------------------------------------------------
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
dst=/tmp/committer-kind-$$
# shellcheck disable=SC2317 # called by the trap
cleanup() { docker exec "$node" rm -f "$dst" "$dst.json" >/dev/null 2>&1 || true; }
trap cleanup EXIT
docker cp "$binary" "$node:$dst" >/dev/null || die "docker cp to $node failed"

args=(commit --pod "$pod" --image "$image" --address /run/containerd/containerd.sock --namespace k8s.io)
[ -z "$container_name" ] || args+=(--container-name "$container_name")
[ $plain_http = 0 ] || args+=(--plain-http)
if [ -n "$registry_config" ]; then
  docker cp "$registry_config" "$node:$dst.json" >/dev/null || die "docker cp of the registry config failed"
  docker exec "$node" chmod 0600 "$dst.json"
  args+=(--registry-config "$dst.json")
fi
args+=("${extra[@]}")

say "committing $pod on node $node of kind cluster $cluster to $image"
rc=0
docker exec "$node" "$dst" "${args[@]}" || rc=$?
exit "$rc"
