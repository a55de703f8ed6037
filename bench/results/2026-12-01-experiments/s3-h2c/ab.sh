#!/bin/bash
# S3 alternated: the API over pooled HTTP/1.1 (the default) against h2c (--upstream-http2),
# three pairs, each run's JSON and table written here. Build first, nothing else running:
#   cargo build --release --workspace
cd "$(git rev-parse --show-toplevel)" || exit 1
O=bench/results/2026-12-01-experiments/s3-h2c
for i in 1 2 3; do
  ./target/release/scenarios --no-build --only S3 --label http1 --out $O
  ./target/release/scenarios --no-build --only S3 --gateway-arg --upstream-http2 --label h2c --out $O
done
