#!/bin/bash
# S4's load by hand with the machine's CPU split by process: ./run.sh LABEL CONNS SECONDS
# [gateway flags]; LOADBIN names the `load` binary to run (the build before the change and after
# it, copied aside). Writes load.LABEL.json and the /proc snapshots that summary.py reads.
L=$1; N=$2; D=$3; shift 3
T=/work/main/target/release
$T/mock-api --listen 127.0.0.1:18080 --threads 1 > mock.$L.log 2>&1 &
MP=$!
sleep 0.5
$T/ws2http --listen 127.0.0.1:17001 --control-listen 127.0.0.1:17002 --api http://127.0.0.1:18080/ "$@" > gw.$L.log 2>&1 &
GP=$!
sleep 1
$LOADBIN --url ws://127.0.0.1:17001/ --mode rate --interval-ms 1000 --processes 2 --conns $N --duration $D --gateway-pid $GP > load.$L.json 2> load.$L.err &
LP=$!
sleep 8
# sample all processes' CPU over 10 s
snap() { for p in $(pgrep -f "target/release/(mock-api|ws2http)|/load\\.(old|new)"); do echo "$p $(cut -d' ' -f14,15 /proc/$p/stat) $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-60)"; done; }
snap > cpu0.$L; head -1 /proc/stat > st0.$L; sleep 10; snap > cpu1.$L; head -1 /proc/stat > st1.$L
wait $LP
kill -TERM $GP; wait $GP; kill -TERM $MP; wait $MP
