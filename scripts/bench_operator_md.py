#!/usr/bin/env python3
"""Write the operator section of BENCHMARKS.md from bench/results/operator.json (make bench-operator)."""
import json
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent
r = json.loads((root / "bench/results/operator.json").read_text())
a, b, q = r["applyToFirstLeaseMs"], r["burst200"], r["queueApi"]
flat, paced = q["flatOut"], q["paced10k"]
s100 = next(s for s in r["statusWrites"] if s["chunks"] == 100)
s1000 = next(s for s in r["statusWrites"] if s["chunks"] == 1000)
met = lambda ok: "met" if ok else "**missed**"
md = f"""<!-- operator:begin -->
## Operator (`make bench-operator` → bench/results/operator.json)

{r["machine"]}. A WorkerPool with `maxWorkers: 0` gets no pods; the benchmark is its worker, with a real
ServiceAccount token, so every figure goes through the API server, the controller, the queue and HTTP.

| | measured | goal | |
|---|---|---|---|
| `kubectl apply` → first task leased, p50 / p95 (50 jobs) | {a["p50"]:.0f} / {a["p95"]:.0f} ms | p50 ≤ 300 ms | {met(a["p50"] <= 300)} |
| 200 jobs created at once → all planned and queued | {b["allQueuedSeconds"]:.2f} s (the creates alone: {b["createSeconds"]:.2f} s) | | |
| API-server requests per job in that burst (the create included) | {b["apiRequestsPerJob"]:.1f} | | |
| queue API, {q["workers"]} workers flat out: leases/s (each followed by a complete) | {flat["leasesPerSecond"]:,.0f} | ≥ 10,000 | {met(flat["leasesPerSecond"] >= 10000)} |
| … their lease latency p50 / p99 (closed loop, CPU saturated) | {flat["latencyMs"]["p50"]:.2f} / {flat["latencyMs"]["p99"]:.2f} ms | | |
| queue API, {q["workers"]} workers paced to 10,000 leases/s: achieved, p50 / p99 | {paced["leasesPerSecond"]:,.0f}/s, {paced["latencyMs"]["p50"]:.2f} / {paced["latencyMs"]["p99"]:.2f} ms | p99 ≤ 10 ms | {met(paced["latencyMs"]["p99"] <= 10 and paced["leasesPerSecond"] >= 9500)} |
| status writes while 100 chunks complete over ~5 s | {s100["statusWrites"]:.0f} in {s100["jobSeconds"]:.1f} s = {s100["writesPerSecond"]:.2f}/s | O(1) per job per second | {met(s100["writesPerSecond"] <= 2)} |
| status writes while 1,000 chunks complete over ~5 s | {s1000["statusWrites"]:.0f} in {s1000["jobSeconds"]:.1f} s = {s1000["writesPerSecond"]:.2f}/s | independent of chunk count | {met(s1000["writesPerSecond"] <= 2)} |
<!-- operator:end -->"""
p = root / "BENCHMARKS.md"
text = p.read_text() if p.exists() else "# Benchmarks\n"
if "<!-- operator:begin -->" in text:
    text = re.sub(r"<!-- operator:begin -->.*<!-- operator:end -->", md, text, flags=re.S)
else:
    text = text.rstrip() + "\n\n" + md + "\n"
p.write_text(text)
print(md)
