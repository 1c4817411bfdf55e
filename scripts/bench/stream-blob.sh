#!/usr/bin/env bash
# Streams stdin to a plain-HTTP registry as one blob, the shape committer and docker use: POST an upload session,
# one PATCH whose body is the stream (chunked transfer encoding, no Content-Range), then PUT ?digest= with no body.
# The digest is hashed while the bytes go out (tee to sha256sum), so the probe pays what committer pays: compress,
# hash and upload at once, with the registry's own work on the same machine.
#
#   … | stream-blob.sh REGISTRY REPO SPOOL_DIR      prints the blob's digest and size
set -euo pipefail
reg=$1 repo=$2 spool=$3
sum=$(mktemp -p "$spool" stream-sum.XXXXXX)
hdr=$(mktemp -p "$spool" stream-hdr.XXXXXX)
trap 'rm -f "$sum" "$hdr"' EXIT

absolute() { case "$1" in /*) echo "http://$reg$1" ;; *) echo "$1" ;; esac; }
location() { awk 'tolower($1) == "location:" { sub(/\r$/, "", $2); print $2 }' "$1"; }

curl -sfS -X POST -D "$hdr" -o /dev/null "http://$reg/v2/$repo/blobs/uploads/"
loc=$(absolute "$(location "$hdr")")
[ -n "$loc" ] || { echo "stream-blob.sh: no upload location from $reg for $repo" >&2; exit 1; }
# -T - sends stdin with chunked encoding as it arrives; sha256sum and wc read the same bytes through tee
tee >(sha256sum | cut -d' ' -f1 >"$sum") |
  curl -sfS -X PATCH -D "$hdr" -o /dev/null -H 'Content-Type: application/octet-stream' -T - "$loc"
loc=$(absolute "$(location "$hdr")")
for _ in $(seq 1 50); do [ -s "$sum" ] && break; sleep 0.02; done
digest=sha256:$(cat "$sum")
case "$loc" in *\?*) loc="$loc&digest=$digest" ;; *) loc="$loc?digest=$digest" ;; esac
curl -sfS -X PUT -o /dev/null "$loc"
size=$(curl -sfS -I "http://$reg/v2/$repo/blobs/$digest" | awk 'tolower($1) == "content-length:" { sub(/\r$/, "", $2); print $2 }')
echo "$digest $size"
