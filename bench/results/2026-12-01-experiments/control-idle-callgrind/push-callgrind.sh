#!/bin/bash
# usage: cgp.sh BIN LABEL  -- push path: 2000 idle websockets, 4 rounds of pushes to each over 16 HTTP/1.1 connections
BIN=$1; L=$2; D=/tmp/cgp/$L; mkdir -p $D
cd /work/main
target/release/mock-api --listen 127.0.0.1:18080 --threads 1 > $D/mock.log 2>&1 &
MP=$!
sleep 0.5
valgrind --tool=callgrind --callgrind-out-file=$D/cg.out $BIN --listen 127.0.0.1:17001 --control-listen 127.0.0.1:17002 --api http://127.0.0.1:18080/ --worker-threads 1 > $D/gw.log 2>&1 &
GP=$!
for i in $(seq 1 60); do curl -s http://127.0.0.1:17002/healthz >/dev/null && break; sleep 0.5; done
target/release/load --url ws://127.0.0.1:17001/ --mode idle --conns 2000 --duration 40 --quiet > $D/load.json &
LP=$!
sleep 15
target/release/push --control http://127.0.0.1:17002/ --count 2000 --rounds 4 --concurrency 16 --quiet > $D/push.json 2>&1
wait $LP
kill -INT $GP; wait $GP
kill $MP; wait $MP 2>/dev/null
callgrind_annotate $D/cg.out 2>/dev/null | grep "PROGRAM TOTALS"
cat $D/push.json | head -c 600; echo
