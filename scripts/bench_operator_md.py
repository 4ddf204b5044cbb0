#!/usr/bin/env python3
"""Write the operator section of BENCHMARKS.md from bench/results/operator.json (make bench-operator)."""
import json
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
r = json.loads((root / "bench/results/operator.json").read_text())
a, b, q = r["applyToFirstLeaseMs"], r["burst200"], r["queueApi"]
s100 = next(s for s in r["statusWrites"] if s["chunks"] == 100)
s1000 = next(s for s in r["statusWrites"] if s["chunks"] == 1000)
met = lambda ok: "met" if ok else "**missed**"
md = f"""<!-- operator:begin -->
## Operator (`make bench-operator` → bench/results/operator.json)

{r["machine"]}. A WorkerPool with `maxWorkers: 0` gets no pods; the benchmark is its worker, with a real
ServiceAccount token, so every figure goes through the API server, the controller, the queue and HTTP.

| | measured | goal | |
|---|---|---|---|
| `kubectl apply` → first task leased, p50 / p95 (50 jobs) | {a["p50"]:.0} / {a["p95"]:.0} ms | p50 ≤ 300 ms | {met(a["p50"] <= 300)} |
| 200 jobs created at once → all planned and queued | {b["allQueuedSeconds"]:.2} s (creates took {b["createSeconds"]:.2} s) | | |
| API-server requests per job (burst, including the create) | {b["apiRequestsPerJob"]:.1} | | |
| queue API, {q["workers"]} concurrent workers: leases/s | {q["leasesPerSecond"]:,.0} (each followed by a complete) | ≥ 10,000 | {met(q["leasesPerSecond"] >= 10000)} |
| queue API p50 / p99 lease latency | {q["latencyMs"]["p50"]:.2} / {q["latencyMs"]["p99"]:.2} ms | p99 ≤ 10 ms | {met(q["latencyMs"]["p99"] <= 10)} |
| status writes while 100 chunks complete | {s100["statusWrites"]:.0} in {s100["jobSeconds"]:.1} s = {s100["writesPerSecond"]:.2}/s | O(1) per job per second | |
| status writes while 1,000 chunks complete | {s1000["statusWrites"]:.0} in {s1000["jobSeconds"]:.1} s = {s1000["writesPerSecond"]:.2}/s | independent of chunk count | {met(s1000["writesPerSecond"] <= 3)} |
<!-- operator:end -->"""
p = root / "BENCHMARKS.md"
text = p.read_text() if p.exists() else "# Benchmarks\n"
if "<!-- operator:begin -->" in text:
    text = re.sub(r"<!-- operator:begin -->.*<!-- operator:end -->", md, text, flags=re.S)
else:
    text = text.rstrip() + "\n\n" + md + "\n"
p.write_text(text)
print(md)
