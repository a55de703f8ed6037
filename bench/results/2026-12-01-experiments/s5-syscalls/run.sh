#!/bin/bash
cd "$(git rev-parse --show-toplevel)" || exit 1
pkill -f "mock-api --listen 127.0.0.1:18080" 2>/dev/null
target/release/mock-api --listen 127.0.0.1:18080 --threads 1 > /tmp/s5m.log 2>&1 &
MP=$!
target/release/ws2http --listen 127.0.0.1:17001 --control-listen 127.0.0.1:17002 --api http://127.0.0.1:18080/ > /tmp/s5g.log 2>&1 &
GP=$!
sleep 1
target/release/load --url ws://127.0.0.1:17001/ --mode idle --conns 5000 --duration 25 --quiet > /tmp/s5load.json 2>/dev/null &
LP=$!
sleep 6
timeout 30 strace -f -c -p $GP -o strace-c.txt &
SP=$!
sleep 1
target/release/push --control http://127.0.0.1:17002/ --count 5000 --rounds 4 --concurrency 64 --quiet > /tmp/s5push.json 2>&1
sleep 0.5
kill -INT $SP; wait $SP
wait $LP
kill -INT $GP; wait $GP
kill $MP
