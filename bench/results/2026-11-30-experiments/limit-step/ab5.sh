#!/bin/sh
# Alternated S3,S4 runs: 6013ec7 (cautious) against 70b63ba (an answer timed from when its request went out).
cd /tmp/ablim
for round in 1 2; do
  for v in sentat cautious; do
    ./scenarios --no-build --only S3,S4 --gateway-bin ./ws2http-$v --label limit-$v --out /tmp/ablim/out5 >> /tmp/ablim/ab5.log 2>&1
  done
done
echo done > /tmp/ablim/ab5.done
