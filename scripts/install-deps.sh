#!/usr/bin/env bash
# Installs what the demo and the test suite need, only where it is missing.
#
#   scripts/install-deps.sh demo     php-cli, php-sqlite3, curl
#   scripts/install-deps.sh cluster  the above + haproxy, nginx
#   scripts/install-deps.sh test     the above + chromium, node/npm,
#                                    and playwright-core in tests/browser/node_modules
#
# Idempotent: a package already installed is not touched, `apt-get update` runs at
# most once and only if something has to be installed. Needs root (or sudo) for
# apt-get; CI runs as root on a clean Debian with no standard input.
set -euo pipefail

what="${1:-test}"
root_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Each need is "check command|Debian package"; the package is installed only when the
# check fails (so a node/npm that came from elsewhere is left alone).
needs=(
  "command -v php|php-cli"
  "php -m 2>/dev/null | grep -qi '^pdo_sqlite\$'|php-sqlite3"
  "command -v curl|curl"
)
case "$what" in
  demo) ;;
  cluster) needs+=(
          "command -v haproxy || test -x /usr/sbin/haproxy|haproxy"
          "command -v nginx || test -x /usr/sbin/nginx|nginx"
        ) ;;
  test) needs+=(
          "command -v haproxy || test -x /usr/sbin/haproxy|haproxy"
          "command -v nginx || test -x /usr/sbin/nginx|nginx"
          "test -x /usr/bin/chromium|chromium"
          "command -v node|nodejs"
          "command -v npm|npm"
        ) ;;
  *) echo "usage: $0 [demo|cluster|test]" >&2; exit 2 ;;
esac

missing=()
for n in "${needs[@]}"; do
  check="${n%|*}" pkg="${n##*|}"
  if ! bash -c "$check" >/dev/null 2>&1; then missing+=("$pkg"); fi
done

if ((${#missing[@]})); then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo=(sudo); else
      echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1
    fi
  fi
  echo "install-deps: installing ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get -y -q install --no-install-recommends "${missing[@]}"
else
  echo "install-deps: all present"
fi

if [ "$what" = test ]; then
  # node itself may come from elsewhere (a non-Debian node counts as present).
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "install-deps: node/npm still missing" >&2; exit 1
  fi
  browser_dir="$root_dir/tests/browser"
  # playwright-core's start-up exits 1 on a node older than its "engines" (in the lock
  # file), which the browser test would only report as a failed script: say so now.
  need_node="$(grep -o '"node": *">= *[0-9]*' "$browser_dir/package-lock.json" \
    | grep -o '[0-9]*$' | sort -n | tail -n 1 || true)"
  have_node="$(node -p 'process.versions.node.split(".")[0]')"
  if [ -n "$need_node" ] && [ "$have_node" -lt "$need_node" ]; then
    echo "install-deps: node $(node --version) is too old: tests/browser's playwright-core needs Node.js $need_node or later (a distribution's nodejs that new, or nodesource's packages)" >&2
    exit 1
  fi
  # Installed when missing, and again when it is not the version the lock file pins.
  installed="$(cd "$browser_dir" && node -p "try { require('./node_modules/playwright-core/package.json').version } catch (e) { '' }")"
  if [ -f "$browser_dir/package-lock.json" ]; then
    pinned="$(cd "$browser_dir" && node -p "require('./package-lock.json').packages['node_modules/playwright-core'].version")"
    if [ "$installed" != "$pinned" ]; then
      echo "install-deps: npm ci in tests/browser (playwright-core ${installed:-missing}, pinned $pinned)"
      (cd "$browser_dir" && npm ci --no-audit --no-fund)
    fi
  elif [ -z "$installed" ]; then
    echo "install-deps: npm install in tests/browser"
    (cd "$browser_dir" && npm install --no-audit --no-fund)
  fi
fi
