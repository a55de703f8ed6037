#!/bin/bash
# S4 alternated: the default of the time (4096 waiting places) against every request allowed
# to wait (--upstream-max-waiting 18400), gateway f730fb7. OUT: a folder for the results.
set -e
cd "$(dirname "$0")/../../../.."
OUT=${OUT:?set OUT to a folder}
for r in 1 2; do
  ./target/release/scenarios --no-build --only S4 --label default-r$r --out "$OUT"
  ./target/release/scenarios --no-build --only S4 --gateway-arg --upstream-max-waiting \
      --gateway-arg 18400 --label wait18k-r$r --out "$OUT"
done
