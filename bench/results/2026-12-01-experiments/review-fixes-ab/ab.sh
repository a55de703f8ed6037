#!/bin/bash
# S3 and S4 alternated between two gateway binaries built beforehand (cp target/release/ws2http
# /tmp/ws2http-304fc7a at 304fc7a, /tmp/ws2http-head at b4c9a48), three pairs.
cd "$(git rev-parse --show-toplevel)" || exit 1
O=bench/results/2026-12-01-experiments/review-fixes-ab
mkdir -p $O
for i in 1 2 3; do
  ./target/release/scenarios --no-build --only S3,S4 --gateway-bin /tmp/ws2http-304fc7a --label 304fc7a --out $O
  ./target/release/scenarios --no-build --only S3,S4 --gateway-bin /tmp/ws2http-head --label head --out $O
done
