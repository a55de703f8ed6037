#!/usr/bin/env python3
"""One line per S4 run in this folder: label, errors, latency, rate, waiting requests."""
import glob
import json
import os

here = os.path.dirname(os.path.abspath(__file__))
for path in sorted(glob.glob(os.path.join(here, "*.json")), key=lambda p: p[-22:]):
    run = json.load(open(path))
    s4 = next(s for s in run["scenarios"] if s["id"] == "S4")
    load, most = s4["load"], s4["gateway_gauges"]["max"]
    lat = load["latency"]
    print(
        f"{run['started_utc']} {run['label']:<13} errors {load['errors_total']:>5}"
        f"  p50/p99/max {lat['p50_ms']:.0f}/{lat['p99_ms']:.0f}/{lat['max_ms']:.0f} ms"
        f"  {load['replies_per_s']:.0f} replies/s"
        f"  {load['gateway']['cpu_us_per_msg']:.1f} us/msg"
        f"  waiting <= {most['upstream_requests_waiting']}"
        f"  loopback {run['loopback']['echo_cpu_us']:.1f} us"
    )
