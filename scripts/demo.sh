#!/usr/bin/env bash
# Runs the chat demo: the PHP example API under `php -S` and one ws2http gateway in
# front of it, then prints the demo page's URL. Ctrl-C stops both.
#
# `make demo` installs php and builds the gateway first. Settings (environment):
#   DEMO_HOST     IP address both listen on          (default 127.0.0.1; IPv6 too, e.g. ::1)
#   PHP_PORT      the PHP example and the page       (default 8000)
#   WS_PORT       the gateway's public websockets    (default 7001)
#   CONTROL_PORT  the gateway's control API (pushes; always on 127.0.0.1) (default 7002)
#   WS2HTTP_BIN   gateway binary                     (default target/debug/ws2http)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
host="${DEMO_HOST:-127.0.0.1}"
host="${host#[}" host="${host%]}"
php_port="${PHP_PORT:-8000}"
ws_port="${WS_PORT:-7001}"
control_port="${CONTROL_PORT:-7002}"
bin="${WS2HTTP_BIN:-$root/target/debug/ws2http}"

# An IP address, not a name (the gateway's --listen takes none); an IPv6 one goes in
# brackets in URLs and listen addresses. The gateway calls the API, and the port checks
# below look, at the address PHP listens on (at loopback when that is 0.0.0.0 or ::).
if [[ "$host" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
  addr="$host" reach="$host"
  [ "$host" != 0.0.0.0 ] || reach=127.0.0.1
elif [[ "$host" == *:* && "$host" =~ ^[0-9A-Fa-f:.]+$ ]]; then
  addr="[$host]" reach="$host"
  [ "$host" != :: ] || reach=::1
else
  echo "demo: DEMO_HOST must be an IPv4 or IPv6 address (not a name): $host" >&2
  exit 1
fi
reach_addr="$reach"
[[ "$reach" != *:* ]] || reach_addr="[$reach]"

command -v php >/dev/null || { echo "demo: php is missing (scripts/install-deps.sh demo)" >&2; exit 1; }
[ -x "$bin" ] || { echo "demo: $bin is missing (cargo build -p ws2http)" >&2; exit 1; }
for hp in "$reach/$php_port" "$reach/$ws_port" "127.0.0.1/$control_port"; do
  if (exec 3<>"/dev/tcp/$hp") 2>/dev/null; then
    echo "demo: port ${hp##*/} is already in use on ${hp%/*}; set PHP_PORT / WS_PORT / CONTROL_PORT" >&2
    exit 1
  fi
done

state="$(mktemp -d -t ws2http-demo.XXXXXX)"
# Job control puts php and the gateway in process groups of their own: Ctrl-C then
# reaches only this script, whose cleanup sends each of them one SIGTERM (a second
# signal would make the gateway skip its drain).
set -m
php_pid="" gw_pid=""
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "demo: stopping"
  # The gateway drains on SIGTERM: every socket gets close 1001 and the API its DELETE.
  [ -n "$gw_pid" ] && kill -TERM "$gw_pid" 2>/dev/null && wait "$gw_pid" 2>/dev/null || true
  if [ -n "$php_pid" ]; then
    kill -TERM -- "-$php_pid" 2>/dev/null || true # php -S and its worker processes
    wait "$php_pid" 2>/dev/null || true
  fi
  rm -rf "$state"
}
trap cleanup INT TERM EXIT

# The PHP example takes its three calls on /<ClientId> only from a caller with this secret,
# and the gateway sends it with each (both read WS2HTTP_API_TOKEN).
export WS2HTTP_API_TOKEN="${WS2HTTP_API_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"

echo "demo: PHP example on http://$addr:$php_port/ (log: $state/php.log)"
(
  cd "$root/php-api-example"
  WS2HTTP_PUSH_URL="http://127.0.0.1:$control_port/" \
  WS2HTTP_DB="$state/chat.sqlite" \
  PHP_CLI_SERVER_WORKERS=4 \
    exec php -S "$addr:$php_port" router.php
) >"$state/php.log" 2>&1 &
php_pid=$!

echo "demo: ws2http on ws://$addr:$ws_port/ (control 127.0.0.1:$control_port)"
"$bin" --listen "$addr:$ws_port" --control-listen "127.0.0.1:$control_port" \
  --api "http://$reach_addr:$php_port/" &
gw_pid=$!

for _ in $(seq 1 100); do
  if curl -fsS "http://$reach_addr:$ws_port/healthz" >/dev/null 2>&1 \
     && curl -fsS "http://$reach_addr:$php_port/healthz" >/dev/null 2>&1; then
    break
  fi
  kill -0 "$gw_pid" 2>/dev/null || { echo "demo: the gateway exited" >&2; exit 1; }
  kill -0 "$php_pid" 2>/dev/null || { echo "demo: php exited:" >&2; cat "$state/php.log" >&2; exit 1; }
  sleep 0.1
done

url="http://$addr:$php_port/"
[ "$ws_port" = 7001 ] || url="$url?ws=ws://$addr:$ws_port/"
cat <<MSG

  Demo page:  $url

  Open it in two browser tabs, pick a different name in each, and chat.
  Press Ctrl-C to stop.

MSG

# Until Ctrl-C, or until one of the two exits on its own.
wait -n "$php_pid" "$gw_pid" || true
