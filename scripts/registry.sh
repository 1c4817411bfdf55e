#!/usr/bin/env bash
# Start or stop a private distribution registry (Debian `docker-registry`) on a free loopback port.
#
#   scripts/registry.sh start DIR   -> writes DIR/env with REGISTRY_ADDR=127.0.0.1:PORT and REGISTRY_PID=N
#   scripts/registry.sh stop DIR    -> stops it (DIR is kept; the caller removes it)
set -euo pipefail

cmd=${1:?usage: registry.sh start|stop DIR}
dir=${2:?usage: registry.sh start|stop DIR}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

case "$cmd" in
start)
  mkdir -p "$dir/data"
  dir=$(cd "$dir" && pwd)
  port=$(free_port)
  cat >"$dir/config.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YAML
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1; then
      printf 'REGISTRY_ADDR=127.0.0.1:%s\nREGISTRY_PID=%s\n' "$port" "$pid" >"$dir/env"
      exit 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$dir/registry.log" >&2; echo "registry.sh: docker-registry exited" >&2; exit 1; }
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  echo "registry.sh: registry did not answer on 127.0.0.1:$port within 10 s (log: $dir/registry.log)" >&2
  exit 1
  ;;
stop)
  if [ -f "$dir/env" ]; then
    # shellcheck disable=SC1091
    . "$dir/env"
    kill "$REGISTRY_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$REGISTRY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$REGISTRY_PID" 2>/dev/null || true
  fi
  ;;
*) echo "usage: registry.sh start|stop DIR" >&2; exit 2 ;;
esac
