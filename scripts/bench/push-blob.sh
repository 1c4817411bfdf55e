#!/usr/bin/env bash
# Uploads one blob to a plain-HTTP registry the way a simple pusher would: POST an upload session, then one
# streaming monolithic PUT with ?digest=. scripts/bench.sh times this to push the output of containerd's walking
# differ (`ctr snapshots diff` writes the layer to stdout; ctr has no command to push a lone blob).
#
#   push-blob.sh REGISTRY REPO FILE DIGEST      e.g. push-blob.sh 127.0.0.1:5000 bench/x layer.tgz sha256:…
set -euo pipefail
reg=$1 repo=$2 file=$3 digest=$4

loc=$(curl -sfS -X POST -D - -o /dev/null "http://$reg/v2/$repo/blobs/uploads/" |
  awk 'tolower($1) == "location:" { sub(/\r$/, "", $2); print $2 }')
[ -n "$loc" ] || { echo "push-blob.sh: no upload location from $reg for $repo" >&2; exit 1; }
case "$loc" in /*) loc="http://$reg$loc" ;; esac
case "$loc" in *\?*) loc="$loc&digest=$digest" ;; *) loc="$loc?digest=$digest" ;; esac
# -T streams the file (a --data-binary @file would read it all into memory first)
curl -sfS -o /dev/null -H 'Content-Type: application/octet-stream' -T "$file" "$loc"
