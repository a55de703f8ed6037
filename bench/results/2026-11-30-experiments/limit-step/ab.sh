#!/bin/sh
# Alternated S2,S3,S4 runs: the gateway before (33c4699) and after (99ab47a) the limit change.
cd /tmp/ablim
for round in 1 2 3; do
  for v in old new; do
    ./scenarios --no-build --only S2,S3,S4 --gateway-bin ./ws2http-$v --label limit-$v --out /tmp/ablim/out >> /tmp/ablim/ab.log 2>&1
  done
done
echo done > /tmp/ablim/ab.done
