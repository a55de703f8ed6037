#!/bin/sh
# Alternated S2,S3,S4 runs: before the limit change (old, 33c4699), one step per answer
# (new, 99ab47a), and one step per round after a slow answer (cautious).
cd /tmp/ablim
for round in 1 2; do
  for v in cautious old new; do
    ./scenarios --no-build --only S2,S3,S4 --gateway-bin ./ws2http-$v --label limit-$v --out /tmp/ablim/out3 >> /tmp/ablim/ab3.log 2>&1
  done
done
echo done > /tmp/ablim/ab3.done
