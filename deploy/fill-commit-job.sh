#!/usr/bin/env bash
# Fill deploy/commit-job.yaml from the environment and print the Job on stdout, refusing any value that is not
# strictly what its field allows.
#
#   JOB_NAME=… JOB_NAMESPACE=… NODE=… POD_NAMESPACE=… POD_NAME=… CONTAINER_NAME=… TARGET=… \
#   COMMITTER_IMAGE=… IMAGE_DIGEST=… PUSH_SECRET=… deploy/fill-commit-job.sh [TEMPLATE] | kubectl apply -f -
#
# The template is filled textually and becomes a privileged Job, so a value that could change the YAML's
# structure (a newline, ": ", a quote, "#", "{") would let whoever chose it (a pod name, a target reference from a
# user) add fields such as `command:` or hostPath volumes. Every value must therefore match its grammar in full:
#   JOB_NAME, JOB_NAMESPACE, POD_NAMESPACE, CONTAINER_NAME   DNS-1123 label (a-z 0-9 -, at most 63)
#   NODE, POD_NAME, PUSH_SECRET                              DNS-1123 subdomain (labels joined by ".", at most 253)
#   TARGET                                                   REGISTRY/REPO[:TAG] (distribution's reference grammar,
#                                                            a registry host required, no digest; at most 255)
#   COMMITTER_IMAGE                                          REGISTRY/REPO (no tag, no digest)
#   IMAGE_DIGEST                                             sha256: and 64 lowercase hex digits
# A missing or invalid value: one line on stderr naming it, nothing on stdout, exit 2.
set -euo pipefail
export LC_ALL=C

die() { echo "fill-commit-job.sh: $*" >&2; exit 2; }

template=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/commit-job.yaml}
[ -f "$template" ] || die "template $template not found"

label='[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?'
subdomain="$label(\\.$label)*"
host_part='[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?'
# a registry: a dotted host, or any host with a port, or localhost (as docker tells a registry from a path)
registry="($host_part(\\.$host_part)+|$host_part:[0-9]{1,5}|$host_part(\\.$host_part)+:[0-9]{1,5}|localhost)"
path_part='[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*'
repo="$registry(/$path_part)+"
tag='[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}'

# check NAME REGEX MAXLEN WHAT: the variable NAME is set and matches REGEX in full (bash's =~ is POSIX ERE
# without REG_NEWLINE: ^ and $ anchor the whole string, so a value with a newline cannot match a class without one).
check() {
  local name=$1 re=$2 max=$3 what=$4 v
  [ -n "${!name+x}" ] || die "$name is not set ($what)"
  v=${!name}
  [ -n "$v" ] || die "$name is empty ($what)"
  [ ${#v} -le "$max" ] || die "$name is ${#v} characters long, more than $max ($what)"
  [[ "$v" =~ ^($re)$ ]] || die "$name=$(printf '%q' "$v") is not $what"
}

check JOB_NAME "$label" 63 "a DNS-1123 label"
check JOB_NAMESPACE "$label" 63 "a DNS-1123 label"
check POD_NAMESPACE "$label" 63 "a DNS-1123 label"
check CONTAINER_NAME "$label" 63 "a DNS-1123 label"
check NODE "$subdomain" 253 "a DNS-1123 subdomain"
check POD_NAME "$subdomain" 253 "a DNS-1123 subdomain"
check PUSH_SECRET "$subdomain" 253 "a DNS-1123 subdomain"
check TARGET "$repo(:$tag)?" 255 "a reference REGISTRY/REPO[:TAG]"
check COMMITTER_IMAGE "$repo" 255 "a repository REGISTRY/REPO (the digest goes in IMAGE_DIGEST)"
check IMAGE_DIGEST 'sha256:[a-f0-9]{64}' 71 "a digest sha256:<64 lowercase hex digits>"

vars=(JOB_NAME JOB_NAMESPACE NODE POD_NAMESPACE POD_NAME CONTAINER_NAME TARGET COMMITTER_IMAGE IMAGE_DIGEST
  PUSH_SECRET)
out=$(cat "$template")
for v in "${vars[@]}"; do
  out=${out//"\${$v}"/${!v}}
done
# Every placeholder the template has must be one of ours: an unknown ${X} left in would reach kubectl.
left=$(grep -v '^[[:space:]]*#' <<<"$out" | grep -o '\${[A-Za-z_]*}' | sort -u | tr '\n' ' ' || true)
[ -z "$left" ] || die "the template has placeholders this script does not fill: $left"
printf '%s\n' "$out"
