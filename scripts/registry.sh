#!/usr/bin/env bash
# Start or stop a private distribution registry (Debian `docker-registry`) on a free loopback port.
#
#   scripts/registry.sh start DIR [OPTIONS]  -> writes DIR/env with REGISTRY_ADDR=127.0.0.1:PORT and REGISTRY_PID=N
#   scripts/registry.sh stop DIR             -> stops it (DIR is kept; the caller removes it)
#
# Options (combinable):
#   --tls                   serve HTTPS with a CA and a server certificate for 127.0.0.1/localhost made in DIR
#                           with openssl; DIR/env gets REGISTRY_CA=DIR/tls/ca.crt
#   --htpasswd USER:PASS    require basic auth (bcrypt htpasswd file in DIR, made with apache2-utils' htpasswd -B)
#   --token REALM_URL CERT  require bearer tokens (`auth: token`) issued by REALM_URL and signed by the key of
#                           CERT (PEM, also the rootcertbundle); DIR/env gets REGISTRY_TOKEN_SERVICE and
#                           REGISTRY_TOKEN_ISSUER, the `aud` and `iss` the tokens must carry
set -euo pipefail

usage() { echo "usage: registry.sh start DIR [--tls] [--htpasswd USER:PASS] [--token REALM_URL CERT] | stop DIR" >&2; exit 2; }

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || usage
shift 2

TOKEN_SERVICE=committer-test-registry
TOKEN_ISSUER=committer-test-issuer

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A throwaway CA and a server certificate for 127.0.0.1 and localhost signed by it.
make_tls() {
  local t=$1/tls
  mkdir -p "$t"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=committer test CA" \
    -keyout "$t/ca.key" -out "$t/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$t/server.key" -out "$t/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$t/ext.cnf"
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial -days 2 \
    -extfile "$t/ext.cnf" -out "$t/server.crt" 2>/dev/null
}

start() {
  local tls=0 htpasswd="" realm="" token_cert=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --tls) tls=1; shift ;;
      --htpasswd) htpasswd=${2:?--htpasswd needs USER:PASS}; shift 2 ;;
      --token) realm=${2:?--token needs REALM_URL CERT}; token_cert=${3:?--token needs REALM_URL CERT}; shift 3 ;;
      *) echo "registry.sh: unknown option $1" >&2; usage ;;
    esac
  done
  mkdir -p "$dir/data"
  dir=$(cd "$dir" && pwd)
  local port scheme=http curl_tls=() extra_env=""
  port=$(free_port)
  {
    cat <<YAML
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
  secret: committer-test-secret
YAML
    if [ "$tls" = 1 ]; then
      make_tls "$dir"
      printf '  tls:\n    certificate: %s\n    key: %s\n' "$dir/tls/server.crt" "$dir/tls/server.key"
    fi
    if [ -n "$htpasswd" ]; then
      htpasswd -Bbn "${htpasswd%%:*}" "${htpasswd#*:}" >"$dir/htpasswd"
      printf 'auth:\n  htpasswd:\n    realm: committer-test\n    path: %s\n' "$dir/htpasswd"
    elif [ -n "$realm" ]; then
      token_cert=$(cd "$(dirname "$token_cert")" && pwd)/$(basename "$token_cert")
      printf 'auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n' \
        "$realm" "$TOKEN_SERVICE" "$TOKEN_ISSUER" "$token_cert"
    fi
  } >"$dir/config.yml"
  if [ "$tls" = 1 ]; then
    scheme=https
    curl_tls=(--cacert "$dir/tls/ca.crt")
    extra_env+="REGISTRY_CA=$dir/tls/ca.crt"$'\n'
  fi
  if [ -n "$realm" ]; then
    extra_env+="REGISTRY_TOKEN_SERVICE=$TOKEN_SERVICE"$'\n'"REGISTRY_TOKEN_ISSUER=$TOKEN_ISSUER"$'\n'
  fi
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do
    # 401 counts as up: an auth-protected registry answers /v2/ with a challenge.
    code=$(curl -sS -o /dev/null -w '%{http_code}' "${curl_tls[@]}" "$scheme://127.0.0.1:$port/v2/" 2>/dev/null || true)
    if [ "$code" = 200 ] || [ "$code" = 401 ]; then
      printf 'REGISTRY_ADDR=127.0.0.1:%s\nREGISTRY_PID=%s\n%s' "$port" "$pid" "$extra_env" >"$dir/env"
      exit 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$dir/registry.log" >&2; echo "registry.sh: docker-registry exited" >&2; exit 1; }
    sleep 0.1
  done
  kill "$pid" 2>/dev/null || true
  echo "registry.sh: registry did not answer on 127.0.0.1:$port within 10 s (log: $dir/registry.log)" >&2
  exit 1
}

case "$cmd" in
start) start "$@" ;;
stop)
  if [ -f "$dir/env" ]; then
    # shellcheck disable=SC1091
    . "$dir/env"
    kill "$REGISTRY_PID" 2>/dev/null || true
    # docker-registry 2.8 takes ~1.8 s to leave after SIGTERM; a test registry's data is disposable.
    for _ in $(seq 1 5); do kill -0 "$REGISTRY_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$REGISTRY_PID" 2>/dev/null || true
  fi
  ;;
*) usage ;;
esac
