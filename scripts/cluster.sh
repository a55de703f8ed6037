#!/usr/bin/env bash
# A local scale-out stack: 3 ws2http gateway nodes behind one hashing proxy (HAProxy by
# default, nginx with --nginx), plus an API: the PHP example (php -S) or yours.
#
#   scripts/cluster.sh                 HAProxy + PHP example        (make cluster)
#   scripts/cluster.sh --nginx         nginx instead of HAProxy
#   scripts/cluster.sh --release       use target/release/ws2http
#   WS2HTTP_BIN=/usr/local/bin/ws2http scripts/cluster.sh   that binary, no cargo build
#   WS2HTTP_API_URL=http://127.0.0.1:9000/ scripts/cluster.sh
#                                      your API instead of the PHP example; it pushes
#                                      through the proxy's internal entry (printed below)
#
# Only one proxy at a time: HAProxy and nginx hash differently, so a client that came
# in through one and a push sent through the other could pick different nodes.
#
# Addresses (the defaults of haproxy/haproxy.cfg and nginx/nginx.conf):
#   node n (1..3)   --listen 127.0.0.1:7n01  --control-listen 127.0.0.1:7n02
#   public          ws://127.0.0.1:8080/<ClientId>
#   internal push   http://127.0.0.1:8081/<ClientId>
#   HAProxy stats   http://127.0.0.1:8404/
#   PHP example     http://127.0.0.1:${PHP_PORT:-8000}/
#
# Logs go to target/cluster/. Ctrl-C stops every process this script started.
set -euo pipefail

root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
proxy=haproxy
profile=debug
for arg in "$@"; do
  case "$arg" in
    --nginx) proxy=nginx ;;
    --haproxy) proxy=haproxy ;;
    --release) profile=release ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cluster.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

# HAProxy's connection limits (haproxy/haproxy.cfg): the public and push entries' shares
# and the stats page's 10 must fit in the global one, or websockets can take every
# connection and leave pushes none. The file's .if cannot add, so the sum is checked here:
# the variables as set, else the file's presetenv defaults.
if [ "$proxy" = haproxy ]; then
  limits=()
  for name in WS2HTTP_MAXCONN WS2HTTP_PUBLIC_MAXCONN WS2HTTP_PUSH_MAXCONN; do
    value="${!name:-$(awk -v n="$name" '$1 == "presetenv" && $2 == n { print $3 }' \
      "$root_dir/haproxy/haproxy.cfg")}"
    if ! [[ "$value" =~ ^[0-9]+$ ]]; then
      echo "cluster.sh: $name must be a number of connections, not '$value'" >&2
      exit 1
    fi
    limits+=("$((10#$value))")
  done
  if ((limits[1] + limits[2] + 10 > limits[0])); then
    echo "cluster.sh: WS2HTTP_PUBLIC_MAXCONN (${limits[1]}) + WS2HTTP_PUSH_MAXCONN (${limits[2]}) + 10 must not exceed WS2HTTP_MAXCONN (${limits[0]}); see haproxy/haproxy.cfg" >&2
    exit 1
  fi
fi

php_port="${PHP_PORT:-8000}"
run_dir="$root_dir/target/cluster"
mkdir -p "$run_dir"

find_tool() {
  command -v "$1" 2>/dev/null && return 0
  for d in /usr/sbin /usr/local/sbin /sbin; do
    [ -x "$d/$1" ] && { echo "$d/$1"; return 0; }
  done
  echo "cluster.sh: $1 is not installed (Debian: apt-get install $1, or scripts/install-deps.sh cluster)" >&2
  return 1
}

proxy_bin="$(find_tool "$proxy")"
if [ -z "${WS2HTTP_API_URL:-}" ]; then
  php_bin="$(find_tool php)"
fi

# Every port this stack listens on must be free (a port already taken would look
# "ready" below while our process failed to bind it).
ports=(7101 7102 7201 7202 7301 7302 8080 8081)
if [ "$proxy" = haproxy ]; then ports+=(8404); else ports+=(7191 7192 7193); fi
[ -z "${WS2HTTP_API_URL:-}" ] && ports+=("$php_port")
for port in "${ports[@]}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "cluster.sh: port $port is already in use (another cluster.sh or make demo?)" >&2
    exit 1
  fi
done

if [ -n "${WS2HTTP_BIN:-}" ]; then
  gateway_bin="$WS2HTTP_BIN"
else
  echo "cluster.sh: building ws2http ($profile)"
  if [ "$profile" = release ]; then
    (cd "$root_dir" && cargo build --release -p ws2http)
  else
    (cd "$root_dir" && cargo build -p ws2http)
  fi
  gateway_bin="$root_dir/target/$profile/ws2http"
fi

# Job control gives every process started below a process group of its own: Ctrl-C
# reaches only this script, which then sends each group exactly one SIGTERM (a second
# signal would make a gateway skip its drain; php -S has worker processes).
set -m
pids=()
names=()
stop_group() { # index
  kill -TERM -- "-${pids[$1]}" 2>/dev/null || true
  wait "${pids[$1]}" 2>/dev/null || true
}
stop_all() {
  trap - INT TERM EXIT
  echo
  echo "cluster.sh: stopping"
  # Gateways first (they drain: close 1001 to every socket, DELETE to the API, which
  # must still be up), then the proxy, then the API.
  for i in "${!pids[@]}"; do
    case "${names[$i]}" in gw*) kill -TERM -- "-${pids[$i]}" 2>/dev/null || true ;; esac
  done
  for i in "${!pids[@]}"; do
    case "${names[$i]}" in gw*) wait "${pids[$i]}" 2>/dev/null || true ;; esac
  done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    case "${names[$i]}" in gw*) ;; *) stop_group "$i" ;; esac
  done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

start() { # name logfile command...
  local name="$1" log="$2"
  shift 2
  "$@" >"$log" 2>&1 &
  pids+=("$!")
  names+=("$name")
}

wait_port() { # host port name log
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "cluster.sh: $3 does not listen on $1:$2; see $4" >&2
  tail -n 20 "$4" >&2 || true
  exit 1
}

# The gateways send this secret with every API call (X-Ws2http-Token), and the PHP example
# takes its three calls on /<ClientId> only with it (both read WS2HTTP_API_TOKEN).
export WS2HTTP_API_TOKEN="${WS2HTTP_API_TOKEN:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}"

# The API.
if [ -n "${WS2HTTP_API_URL:-}" ]; then
  api_url="$WS2HTTP_API_URL"
else
  api_url="http://127.0.0.1:$php_port/"
  echo "cluster.sh: starting the PHP example on 127.0.0.1:$php_port"
  (
    cd "$root_dir/php-api-example"
    export WS2HTTP_PUSH_URL="http://127.0.0.1:8081/"
    export WS2HTTP_DB="${WS2HTTP_DB:-$run_dir/chat.sqlite}"
    export PHP_CLI_SERVER_WORKERS="${PHP_CLI_SERVER_WORKERS:-4}"
    exec "$php_bin" -S "127.0.0.1:$php_port" router.php
  ) >"$run_dir/php.log" 2>&1 &
  pids+=("$!")
  names+=("php")
  wait_port 127.0.0.1 "$php_port" php "$run_dir/php.log"
fi

# The gateway nodes.
for n in 1 2 3; do
  start "gw$n" "$run_dir/gw$n.log" "$gateway_bin" \
    --listen "127.0.0.1:7${n}01" --control-listen "127.0.0.1:7${n}02" --api "$api_url"
done
for n in 1 2 3; do
  wait_port 127.0.0.1 "7${n}01" "gw$n" "$run_dir/gw$n.log"
  wait_port 127.0.0.1 "7${n}02" "gw$n" "$run_dir/gw$n.log"
done

# The proxy, with its shipped configuration.
if [ "$proxy" = haproxy ]; then
  start haproxy "$run_dir/haproxy.log" "$proxy_bin" -db -f "$root_dir/haproxy/haproxy.cfg"
else
  mkdir -p "$run_dir/nginx"
  cp "$root_dir/nginx/nginx.conf" "$run_dir/nginx/nginx.conf"
  start nginx "$run_dir/nginx.log" "$proxy_bin" -p "$run_dir/nginx/" -c nginx.conf \
    -e stderr -g 'daemon off;'
fi
wait_port 127.0.0.1 8080 "$proxy" "$run_dir/$proxy.log"
wait_port 127.0.0.1 8081 "$proxy" "$run_dir/$proxy.log"

cat <<EOF

  3 ws2http nodes behind $proxy, API $api_url
EOF
if [ -z "${WS2HTTP_API_URL:-}" ]; then
  echo "  Demo page:      http://127.0.0.1:$php_port/?ws=ws://127.0.0.1:8080/"
fi
cat <<EOF
  Websockets:     ws://127.0.0.1:8080/<ClientId>?token=...
  Pushes (API):   POST http://127.0.0.1:8081/<ClientId>
EOF
if [ "$proxy" = haproxy ]; then
  echo "  HAProxy stats:  http://127.0.0.1:8404/"
fi
cat <<EOF
  Nodes:          127.0.0.1:7101 / 7201 / 7301 (control 7102 / 7202 / 7302)
  Logs:           $run_dir/
  Try a failover: kill one node (its pid is in the list below) and watch its
                  clients reconnect to the others.

EOF
for i in "${!pids[@]}"; do echo "  ${names[$i]}: pid ${pids[$i]}"; done
echo
echo "  Ctrl-C stops everything."

# Run until Ctrl-C; report any process that exits on its own, but keep the rest up
# (a killed node is the point of the exercise).
alive=("${!pids[@]}")
while ((${#alive[@]})); do
  sleep 1
  still=()
  for i in "${alive[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
    else
      echo "cluster.sh: ${names[$i]} (pid ${pids[$i]}) exited; see $run_dir/${names[$i]}.log"
    fi
  done
  alive=("${still[@]+"${still[@]}"}")
done
