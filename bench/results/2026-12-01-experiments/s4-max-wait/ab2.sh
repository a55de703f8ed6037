#!/bin/bash
# S4 alternated: the new default (wait at most 5 s, no count bound below what the clients can
# have outstanding) against the old one given as flags (4096 waiting places, the wait bounded
# only by --upstream-timeout's 30 s). OUT: a folder for the results.
set -e
cd "$(dirname "$0")/../../../.."
OUT=${OUT:?set OUT to a folder}
for r in 1 2; do
  ./target/release/scenarios --no-build --only S4 --label maxwait5s-r$r --out "$OUT"
  ./target/release/scenarios --no-build --only S4 --gateway-arg --upstream-max-waiting \
      --gateway-arg 4096 --gateway-arg --upstream-max-wait --gateway-arg 30s \
      --label old4096-r$r --out "$OUT"
done
