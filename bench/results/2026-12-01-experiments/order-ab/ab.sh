#!/bin/bash
cd /work/main
O=/tmp/ab-order
mkdir -p $O
for i in 1 2 3; do
  ./target/release/scenarios --no-build --only S3,S5 --gateway-bin /tmp/ws2http-old --label 10d7f98 --out $O > /dev/null 2>&1
  ./target/release/scenarios --no-build --only S3,S5 --gateway-bin /tmp/ws2http-new --label order --out $O > /dev/null 2>&1
done
touch /tmp/ab-order.done
