"""One line per run of the limit-step experiment: label, start time, loopback cost, and the
S2/S3/S4 figures with the API concurrency gauges. Usage: python3 summary.py 'DIR/*.json'"""
import glob
import json
import sys

runs = [json.load(open(f)) for f in glob.glob(sys.argv[1] if len(sys.argv) > 1 else "*.json")]
for d in sorted(runs, key=lambda d: d["started_utc"]):
    out = [d["label"], d["started_utc"][11:16], "loopback %.1f us" % d["loopback"]["echo_cpu_us"]]
    for s in d["scenarios"]:
        load, gw = s["load"], s["load"]["gateway"]
        most = (s.get("gateway_gauges") or {}).get("max", {})
        limit = most.get("upstream_concurrency_limit", 0)
        conns = most.get("upstream_connections_open", 0)
        if s["id"] == "S2":
            out.append("S2 %.0f us limit %d conns %d" % (gw["cpu_us_per_conn"], limit, conns))
        elif s["id"] in ("S3a", "S3b"):
            out.append("%s %.1fk/s %.1f us limit %d conns %d p99 %.0f ms" % (
                s["id"], load["replies_per_s"] / 1000, gw["cpu_us_per_msg"], limit, conns,
                load["latency"]["p99_ms"]))
        elif s["id"] == "S4":
            out.append("S4 errors %d p99 %.1f ms %.1f us limit %d conns %d waiting %d" % (
                load["errors_total"], load["latency"]["p99_ms"], gw["cpu_us_per_msg"], limit,
                conns, most.get("upstream_requests_waiting", 0)))
    print(" | ".join(out))
