#!/usr/bin/env python3
"""Quality targeting against fixed CRF, measured in one run on one mixed-complexity input (a still slide, a
mandelbrot zoom, a real clip; 4 s each, 720p, keyframes every second):

- size at equal worst-case quality: Tessera with `targetQuality: {vmaf: T}` against the single fixed CRF
  (ffmpeg CLI, libx264, same preset) whose lowest 2-second VMAF is at least Tessera's lowest. Goal: >= 25 %
  smaller;
- size at equal mean quality: against the fixed CRF whose mean VMAF is at least Tessera's (reported);
- cost: wall time of the targeted job against the fixed-CRF Tessera job (same CRF as above, same chunking),
  with and without that job measuring VMAF. Goal: <= 1.5x;
- VMAF throughput at 1080p: Tessera's in-loop VMAF (one worker, the extra time of a job that measures it)
  against libvmaf's `vmaf` tool on the same frames, one thread each.

Every VMAF figure of an output (Tessera's or ffmpeg's) is computed the same way: libvmaf's `vmaf` tool on the
decoded output against the source (y4m), model vmaf_v0.6.1. Writes bench/results/quality.json and its section
of BENCHMARKS.md.
"""
import json, os, statistics, subprocess, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

TARGET = float(os.environ.get("BENCH_TARGET_VMAF", "93"))
PRESET = "fast"
CACHE = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache/tessera"))
VMAF = CACHE / "libvmaf-2.3.1" / "bin" / "vmaf"
WINDOW = 50  # frames: 2 s at 25 fps
SIZE_GOAL, COST_GOAL = 0.25, 1.5


def mixed():
    out = bench.WORK / "mixed-720p-12s.mp4"
    if not out.exists():
        bench.WORK.mkdir(parents=True, exist_ok=True)
        bbb = bench.SAMPLES / "bigbuckbunny.mp4"
        bench.ffmpeg(
            "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25,trim=end_frame=1,loop=loop=99:size=1,setpts=N/25/TB",
            "-f", "lavfi", "-i", "mandelbrot=size=1280x720:rate=25,trim=duration=4",
            "-i", bbb,
            "-filter_complex",
            "[2:v]fps=25,trim=duration=4,setpts=PTS-STARTPTS,format=yuv420p[c];[0:v]format=yuv420p[a];"
            "[1:v]format=yuv420p[b];[a][b][c]concat=n=3:v=1:a=0[v]",
            "-map", "[v]", "-c:v", "libx264", "-crf", "8", "-g", "25", bench.WORK / "tmp-mixed.mp4")
        (bench.WORK / "tmp-mixed.mp4").rename(out)
    return out


def y4m(src, dst):
    if not dst.exists():
        bench.ffmpeg("-i", src, "-pix_fmt", "yuv420p", "-strict", "-1", dst)
    return dst


def vmaf_frames(ref_y4m, mp4, threads=bench.CORES):
    """Per-frame VMAF of `mp4` against the reference, by libvmaf's tool; and the tool's own seconds."""
    dis = mp4.with_suffix(".y4m")
    bench.ffmpeg("-i", mp4, "-pix_fmt", "yuv420p", "-strict", "-1", dis)
    js = mp4.with_suffix(".vmaf.json")
    t0 = time.perf_counter()
    subprocess.run([VMAF, "-r", ref_y4m, "-d", dis, "-m", "version=vmaf_v0.6.1", "--threads", str(threads),
                    "--json", "-q", "-o", js], check=True, stdout=subprocess.DEVNULL)
    took = time.perf_counter() - t0
    frames = [f["metrics"]["vmaf"] for f in json.loads(js.read_text())["frames"]]
    dis.unlink()
    return frames, took


def stats(frames):
    windows = [statistics.mean(frames[i:i + WINDOW]) for i in range(0, len(frames), WINDOW)]
    return {"mean": round(statistics.mean(frames), 3), "lowest_2s": round(min(windows), 3),
            "windows_2s": [round(w, 2) for w in windows]}


def timed(cmd):
    t0 = time.perf_counter()
    p = subprocess.run(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{p.stderr.decode(errors='replace')}")
    return time.perf_counter() - t0, p.stdout


def tessera_job(src, outdir, video, extra="", workers=bench.CORES):
    outdir.mkdir(parents=True, exist_ok=True)
    job = outdir.with_suffix(".yaml")
    job.write_text(
        "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {name: q}\nspec:\n"
        f"  input: {{uri: \"file://{src}\"}}\n  output: {{uri: \"file://{outdir}/\", container: mp4}}\n"
        f"  renditions:\n    - {{name: v, video: {{codec: h264, preset: {PRESET}, {video}}}}}\n"
        f"  chunking: {{targetSeconds: 2}}\n{extra}")
    wall, out = timed([bench.TESSERA, "run", job, "--json", "--workers", str(workers)])
    return wall, json.loads(out), outdir / "v.mp4"


def main():
    if not bench.TESSERA.exists():
        sys.exit("bench: build first (make build)")
    if not VMAF.exists():
        sys.exit(f"bench: {VMAF} is missing: run make setup")
    src = mixed()
    ref = y4m(src, bench.WORK / "mixed-720p-12s.y4m")
    print(f"quality: {src.name}, libx264 {PRESET}, target VMAF {TARGET}", flush=True)

    # Tessera, targeted (its own per-chunk records also give its chosen settings).
    wall_t, summary, out_t = tessera_job(src, bench.WORK / "q-target", f"targetQuality: {{vmaf: {TARGET}}}")
    t_frames, _ = vmaf_frames(ref, out_t)
    t = stats(t_frames)
    t["bytes"] = out_t.stat().st_size
    t["crf_per_chunk"] = [c[0]["crf"] for c in summary["chunkRecords"]]
    t["status_quality"] = summary["renditions"][0]["quality"]
    print(f"  tessera target {TARGET}: {t['bytes']} bytes, mean {t['mean']}, lowest 2 s {t['lowest_2s']}, "
          f"CRFs {t['crf_per_chunk']}, {wall_t:.1f} s", flush=True)

    # The fixed-CRF sweep, from high CRF (small) down, until both bars are met.
    sweep, worst_crf, mean_crf = [], None, None
    for crf in range(40, 9, -1):
        out = bench.WORK / f"q-ffmpeg-crf{crf}.mp4"
        bench.ffmpeg("-i", src, "-c:v", "libx264", "-preset", PRESET, "-crf", crf, "-an", out)
        f, _ = vmaf_frames(ref, out)
        s = stats(f)
        s.update(crf=crf, bytes=out.stat().st_size)
        sweep.append(s)
        print(f"  ffmpeg crf {crf}: {s['bytes']} bytes, mean {s['mean']}, lowest 2 s {s['lowest_2s']}", flush=True)
        if worst_crf is None and s["lowest_2s"] >= t["lowest_2s"]:
            worst_crf = s
        if mean_crf is None and s["mean"] >= t["mean"]:
            mean_crf = s
        if worst_crf and mean_crf:
            break
    smaller_worst = round(1 - t["bytes"] / worst_crf["bytes"], 3)
    smaller_mean = round(1 - t["bytes"] / mean_crf["bytes"], 3)

    # Cost: the targeted job against the fixed-CRF Tessera job at the equal-worst-case CRF, with and without
    # VMAF measured, alternating (the machine's speed drifts), medians of the pairs' ratios.
    fixed = f"crf: {worst_crf['crf']}"
    walls = {"target": [], "fixed_vmaf": [], "fixed": []}
    for i in range(bench.REPEAT):
        walls["target"].append(wall_t if i == 0 else tessera_job(
            src, bench.WORK / f"q-target-{i}", f"targetQuality: {{vmaf: {TARGET}}}")[0])
        walls["fixed_vmaf"].append(tessera_job(src, bench.WORK / f"q-fixedv-{i}", fixed,
                                               "  quality: {metrics: [vmaf]}\n")[0])
        walls["fixed"].append(tessera_job(src, bench.WORK / f"q-fixed-{i}", fixed)[0])
        print(f"  cost run {i + 1}/{bench.REPEAT}: target {walls['target'][-1]:.1f} s, fixed+vmaf "
              f"{walls['fixed_vmaf'][-1]:.1f} s, fixed {walls['fixed'][-1]:.1f} s", flush=True)
    ratio_v = round(statistics.median(a / b for a, b in zip(walls["target"], walls["fixed_vmaf"])), 3)
    ratio_p = round(statistics.median(a / b for a, b in zip(walls["target"], walls["fixed"])), 3)

    # VMAF throughput at 1080p, one thread each.
    hd = bench.WORK / "vmaf-1080p-100f.mp4"
    if not hd.exists():
        bench.ffmpeg("-i", bench.SAMPLES / "bigbuckbunny.mp4", "-vf", "scale=1920:1080:flags=bicubic", "-frames:v",
                     "100", "-an", "-c:v", "libx264", "-crf", "10", "-g", "100", hd)
    hd_ref = y4m(hd, bench.WORK / "vmaf-1080p-100f.y4m")
    one = {"TESSERA_ENCODER_THREADS": "1"}
    os.environ.update(one)
    plain, with_v = [], []
    for i in range(bench.REPEAT):
        plain.append(tessera_job(hd, bench.WORK / f"v-plain-{i}", "crf: 23", "", 1)[0])
        w, s, out_hd = tessera_job(hd, bench.WORK / f"v-vmaf-{i}", "crf: 23", "  quality: {metrics: [vmaf]}\n", 1)
        with_v.append(w)
    for k in one:
        del os.environ[k]
    frames_hd = s["renditions"][0]["frames"]
    tessera_fps = round(frames_hd / max(statistics.median(with_v) - statistics.median(plain), 1e-3), 1)
    tool_s = statistics.median(vmaf_frames(hd_ref, out_hd, threads=1)[1] for _ in range(bench.REPEAT))
    tool_fps = round(frames_hd / tool_s, 1)
    print(f"  VMAF 1080p: tessera {tessera_fps} fps, vmaf tool {tool_fps} fps", flush=True)

    res = {"input": src.name, "encoder": f"libx264 {PRESET}", "target_vmaf": TARGET, "tessera": t,
           "fixed_crf_equal_worst": worst_crf, "fixed_crf_equal_mean": mean_crf,
           "smaller_at_equal_worst": smaller_worst, "smaller_at_equal_mean": smaller_mean,
           "walls_s": {k: [round(x, 2) for x in v] for k, v in walls.items()},
           "cost_vs_fixed_with_vmaf": ratio_v, "cost_vs_fixed_without_vmaf": ratio_p,
           "vmaf_1080p_fps": {"tessera": tessera_fps, "vmaf_tool": tool_fps},
           "sweep": sweep, "cores": bench.CORES, "repeat": bench.REPEAT}
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / "quality.json").write_text(json.dumps(res, indent=2) + "\n")
    ok = lambda good: "met" if good else "**missed**"
    section = "\n".join([
        "<!-- quality:begin -->",
        "## Quality targeting against fixed CRF",
        "",
        f"Produced by `make bench-quality` (scripts/bench_quality.py) on {bench.CORES} cores, everything in one run. "
        f"The input, {src.name}, is 4 s of a still slide, then 4 s of a mandelbrot zoom, then 4 s of Big Buck Bunny. "
        f"It is 1280x720 at 25 fps. Every encode is libx264 `{PRESET}`. Tessera uses 2 s chunks and `targetQuality: {{vmaf: {TARGET:g}}}`. "
        "Every VMAF below comes from libvmaf's `vmaf` tool on the decoded output against the source. "
        "Raw figures: `bench/results/quality.json`.",
        "",
        "| | bytes | mean VMAF | lowest 2 s VMAF | CRF |",
        "|---|---|---|---|---|",
        f"| Tessera, target {TARGET:g} | {t['bytes']:,} | {t['mean']:.2f} | {t['lowest_2s']:.2f} | "
        f"{', '.join(map(str, t['crf_per_chunk']))} (per chunk) |",
        f"| ffmpeg, fixed CRF, lowest 2 s ≥ Tessera's | {worst_crf['bytes']:,} | {worst_crf['mean']:.2f} | "
        f"{worst_crf['lowest_2s']:.2f} | {worst_crf['crf']} |",
        f"| ffmpeg, fixed CRF, mean ≥ Tessera's | {mean_crf['bytes']:,} | {mean_crf['mean']:.2f} | "
        f"{mean_crf['lowest_2s']:.2f} | {mean_crf['crf']} |",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        f"| ≥ 25 % smaller at equal worst-case (2 s) VMAF | {smaller_worst * 100:.1f} % smaller | {ok(smaller_worst >= SIZE_GOAL)} |",
        f"| at equal mean VMAF (reported) | {abs(smaller_mean) * 100:.1f} % {'smaller' if smaller_mean >= 0 else 'larger'} | |",
        f"| targeted job ≤ {COST_GOAL}× the fixed-CRF Tessera job (CRF {worst_crf['crf']}), both measuring VMAF | "
        f"{ratio_v:.2f}× | {ok(ratio_v <= COST_GOAL)} |",
        f"| the same against a fixed-CRF job that measures nothing | {ratio_p:.2f}× | {ok(ratio_p <= COST_GOAL)} |",
        f"| VMAF throughput at 1080p, one thread: Tessera (in the chunk loop) vs libvmaf's `vmaf` tool | "
        f"{tessera_fps} vs {tool_fps} frames/s | |",
        "",
        "Wall times are medians of back-to-back pairs' ratios over "
        f"{bench.REPEAT} runs: targeted {', '.join(f'{x:.1f}' for x in walls['target'])} s; fixed with VMAF "
        f"{', '.join(f'{x:.1f}' for x in walls['fixed_vmaf'])} s; fixed {', '.join(f'{x:.1f}' for x in walls['fixed'])} s. "
        "Tessera's VMAF throughput is the frames over the extra time a one-worker job needs to measure them. "
        "That time includes decoding the encoder's packets.",
        "<!-- quality:end -->",
    ])
    path = bench.ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else ""
    if "<!-- quality:begin -->" in text:
        head, rest = text.split("<!-- quality:begin -->", 1)
        tail = rest.split("<!-- quality:end -->", 1)[1] if "<!-- quality:end -->" in rest else ""
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"quality: {smaller_worst * 100:.1f} % smaller at equal worst case, cost {ratio_v}x (with VMAF) / "
          f"{ratio_p}x; wrote {bench.RESULTS / 'quality.json'} and BENCHMARKS.md")


if __name__ == "__main__":
    main()
