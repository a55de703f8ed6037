#!/bin/bash
# 15,000 connections that each send one message and then sit idle: the gateway's RSS per
# connection at the end (the `load` JSON's gateway.kib_per_conn_end).
# Usage: once.sh GATEWAY_BINARY N   (run from the workspace root after `cargo build --release`;
# BINDIR overrides where mock-api and load are taken from)
BIN=$1
BINDIR=${BINDIR:-target/release}
OUT=once-$(basename "$BIN")-$2.json
"$BINDIR/mock-api" --listen 127.0.0.1:18000 > /dev/null 2>&1 & MP=$!
"$BIN" --listen 127.0.0.1:17001 --control-listen 127.0.0.1:17002 --api http://127.0.0.1:18000/ > /dev/null 2>&1 & GP=$!
sleep 1
"$BINDIR/load" --url ws://127.0.0.1:17001/ --mode rate --interval-ms 10000 --processes 2 \
    --conns 15000 --duration 12 --gateway-pid $GP --quiet > "$OUT" 2>&1
kill $GP $MP; wait
python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    g = d["gateway"]
    print(sys.argv[1], "sent", d["sent"], "replies", d["replies"], "errors", d["errors_total"],
          "KiB/conn connected", g["kib_per_conn"], "end", g["kib_per_conn_end"],
          "RSS end MiB", round(g["end"]["rss_kib"] / 1024, 1))
PY
