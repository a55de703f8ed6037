#!/bin/bash
# usage: cgc.sh BIN LABEL  -- connect path: 2000 connections, idle, closed
BIN=$1; L=$2; D=/tmp/cgc/$L; mkdir -p $D
cd /work/main
target/release/mock-api --listen 127.0.0.1:18080 --threads 1 > $D/mock.log 2>&1 &
MP=$!
sleep 0.5
valgrind --tool=callgrind --callgrind-out-file=$D/cg.out $BIN --listen 127.0.0.1:17001 --control-listen 127.0.0.1:17002 --api http://127.0.0.1:18080/ --worker-threads 1 > $D/gw.log 2>&1 &
GP=$!
for i in $(seq 1 60); do curl -s http://127.0.0.1:17002/healthz >/dev/null && break; sleep 0.5; done
target/release/load --url ws://127.0.0.1:17001/ --mode idle --conns 2000 --duration 1 --connect-concurrency 64 --quiet > $D/load.json
sleep 2
kill -INT $GP; wait $GP
kill $MP; wait $MP 2>/dev/null
callgrind_annotate $D/cg.out 2>/dev/null | grep "PROGRAM TOTALS"
python3 -c "import json;d=json.load(open('$D/load.json'));print('established',d.get('established'),'errors',d.get('errors_total'))"
