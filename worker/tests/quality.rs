//! VMAF and quality targeting, end to end: the `tessera` binary on real files, checked against libvmaf's
//! own `vmaf` tool (built by `make setup`) and ffprobe.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// libvmaf's reference tool, built with the library by `make setup`.
fn vmaf_tool() -> PathBuf {
    let cache = std::env::var("TESSERA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tessera")
        });
    let p = cache.join("libvmaf-2.3.1/bin/vmaf");
    assert!(p.exists(), "{} is missing: run `make setup`", p.display());
    p
}

/// The mean VMAF libvmaf's tool gives `out` against `src` scaled to the output's size (bicubic, as the
/// ffmpeg CLI scales), both as y4m in `pix_fmt`.
fn tool_vmaf(src: &Path, out: &Path, w: u32, h: u32, pix_fmt: &str, dir: &Path) -> f64 {
    let (r, d, j) = (
        dir.join("ref.y4m"),
        dir.join("dis.y4m"),
        dir.join("vmaf.json"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ffmpeg(&[
        "-i",
        &s(src),
        "-vf",
        &format!("scale={w}:{h}:flags=bicubic"),
        "-pix_fmt",
        pix_fmt,
        "-strict",
        "-1",
        &s(&r),
    ]);
    ffmpeg(&["-i", &s(out), "-pix_fmt", pix_fmt, "-strict", "-1", &s(&d)]);
    let o = Command::new(vmaf_tool())
        .args([
            "-r",
            &s(&r),
            "-d",
            &s(&d),
            "-m",
            "version=vmaf_v0.6.1",
            "--json",
            "-q",
            "-o",
            &s(&j),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "vmaf: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    v["pooled_metrics"]["vmaf"]["mean"].as_f64().unwrap()
}

#[test]
fn vmaf_matches_libvmafs_own_tool_on_a_scaled_and_a_10_bit_rendition() {
    // A real clip scaled down (8-bit; given a keyframe every second, so it has chunks), and a 10-bit
    // source into a 10-bit HEVC rendition.
    let bbb = fixture(
        "quality-bbb.mp4",
        &[
            "-i",
            sample("bigbuckbunny.mp4").to_str().unwrap(),
            "-an",
            "-c:v",
            "libx264",
            "-crf",
            "12",
            "-g",
            "25",
        ],
    );
    let ten = fixture(
        "quality-10bit.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=25:duration=3,noise=alls=12:allf=t",
            "-pix_fmt",
            "yuv420p10le",
            "-c:v",
            "libx265",
            "-x265-params",
            "log-level=error:keyint=25",
        ],
    );
    for (name, src, rendition, pix) in [
        (
            "vmaf-scaled",
            &bbb,
            "    - {name: q, video: {codec: h264, height: 360, crf: 32, preset: veryfast}}\n",
            "yuv420p",
        ),
        (
            "vmaf-10bit",
            &ten,
            "    - {name: q, video: {codec: hevc, crf: 30, preset: ultrafast}}\n",
            "yuv420p10le",
        ),
    ] {
        let out = out_dir(name);
        let yaml = job_yaml(
            src,
            &out,
            "mp4",
            rendition,
            "  chunking: {targetSeconds: 1}\n  quality: {metrics: [vmaf]}\n",
        );
        let s = tessera_ok(&out, &yaml, &[]);
        assert!(s["chunks"].as_u64().unwrap() >= 3, "several chunks: {s}");
        let r = &s["renditions"][0];
        let v = &r["vmaf"];
        let (w, h) = (
            r["width"].as_u64().unwrap() as u32,
            r["height"].as_u64().unwrap() as u32,
        );
        let file = output(&s, 0);
        assert_eq!(video(&file)["pix_fmt"], pix);
        let tool = tool_vmaf(src, &file, w, h, pix, &out);
        let mean = v["mean"].as_f64().unwrap();
        assert!(
            (mean - tool).abs() <= 0.1,
            "{name}: Tessera {mean} vs libvmaf's tool {tool}"
        );
        assert_eq!(v["model"], "vmaf_v0.6.1");
        assert_eq!(v["frames"].as_u64(), r["frames"].as_u64());
        let (hm, min, p5) = (
            v["harmonicMean"].as_f64().unwrap(),
            v["min"].as_f64().unwrap(),
            v["p5"].as_f64().unwrap(),
        );
        assert!(min <= p5 && p5 <= mean && hm <= mean && mean < 100.0, "{v}");
        // A measured job reports each chunk's VMAF; no setting was searched.
        let chunks = s["chunkRecords"].as_array().unwrap();
        assert_eq!(chunks.len() as u64, s["chunks"].as_u64().unwrap());
        assert!(chunks
            .iter()
            .all(|c| c[0]["vmaf"].is_f64() && c[0]["crf"].is_null()));
    }
}

/// 12 s at 640x360: 4 s of a still slide, 4 s of a mandelbrot zoom, 4 s of a real clip. Hard cuts
/// between them fall on chunk boundaries (2 s chunks, keyframes every second).
fn mixed() -> PathBuf {
    let bbb = sample("bigbuckbunny.mp4");
    fixture(
        "quality-mixed.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=25,trim=end_frame=1,loop=loop=99:size=1,setpts=N/25/TB",
            "-f",
            "lavfi",
            "-i",
            "mandelbrot=size=640x360:rate=25,trim=duration=4",
            "-i",
            bbb.to_str().unwrap(),
            "-filter_complex",
            "[2:v]scale=640:360,fps=25,trim=duration=4,setpts=PTS-STARTPTS,format=yuv420p[c];\
             [0:v]format=yuv420p[a];[1:v]format=yuv420p[b];[a][b][c]concat=n=3:v=1:a=0[v]",
            "-map",
            "[v]",
            "-c:v",
            "libx264",
            "-crf",
            "8",
            "-g",
            "25",
        ],
    )
}

#[test]
fn a_quality_target_lands_on_its_mean_and_gives_hard_chunks_a_lower_crf() {
    let src = mixed();
    let out = out_dir("target-quality");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: avc, video: {codec: h264, targetQuality: {vmaf: 93}, preset: veryfast}}\n    \
         - {name: hevc, video: {codec: hevc, height: 240, targetQuality: {vmaf: 90}, preset: ultrafast}}\n    \
         - {name: av1, video: {codec: av1, height: 240, targetQuality: {vmaf: 94, minCrf: 20}, preset: '10'}}\n",
        "  chunking: {targetSeconds: 2}\n",
    );
    // (SVT-AV1 keeps a still slide above VMAF 92 even at its highest CRF, 63: its target is set where
    // every chunk can reach it.)
    let s = tessera_ok(&out, &yaml, &[]);
    assert_eq!(s["chunks"], 6, "{s}");
    let chunks = s["chunkRecords"].as_array().unwrap();
    for (ri, target) in [(0, 93.0), (1, 90.0), (2, 94.0)] {
        let r = &s["renditions"][ri];
        let q = &r["quality"];
        let mean = q["achievedMean"].as_f64().unwrap();
        assert_eq!(q["target"].as_f64(), Some(target));
        assert!(
            (mean - target).abs() <= 1.0,
            "{}: mean {mean} for {target}: {q}",
            r["name"]
        );
        assert_eq!(r["vmaf"]["mean"].as_f64(), Some(mean), "{r}");
        let crfs: Vec<u64> = chunks
            .iter()
            .map(|c| c[ri]["crf"].as_u64().unwrap())
            .collect();
        let vmafs: Vec<f64> = chunks
            .iter()
            .map(|c| c[ri]["vmaf"].as_f64().unwrap())
            .collect();
        for (c, v) in vmafs.iter().enumerate() {
            assert!(
                *v >= target - 3.0,
                "{}: chunk {c} at {v}: {vmafs:?}",
                r["name"]
            );
        }
        assert_eq!(
            q["minChunkVmaf"].as_f64(),
            vmafs.iter().copied().reduce(f64::min)
        );
        // The still slide (chunks 0-1) takes a higher CRF than the mandelbrot zoom (chunks 2-3).
        assert!(
            crfs[0] > crfs[2] && crfs[1] > crfs[3],
            "{}: {crfs:?}",
            r["name"]
        );
        assert_eq!(
            (q["minCrf"].as_u64(), q["maxCrf"].as_u64()),
            (crfs.iter().min().copied(), crfs.iter().max().copied())
        );
        // Chunks with different settings still join into one frame-exact stream.
        let v = video(&output(&s, ri));
        assert_eq!(num(&v, "nb_read_frames"), 300.0, "{v}");
    }
    assert!(chunks
        .iter()
        .all(|c| c[0]["encoder"] == "libx264" && c[2]["encoder"] == "libsvtav1"));
    // A bound that stops the still slide: its chunks are marked, and counted in the status.
    let out = out_dir("target-quality-bounded");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: avc, video: {codec: h264, height: 240, targetQuality: {vmaf: 93, maxCrf: 24}, preset: ultrafast}}\n",
        "  chunking: {targetSeconds: 2}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    let crfs: Vec<u64> = s["chunkRecords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0]["crf"].as_u64().unwrap())
        .collect();
    let q = &s["renditions"][0]["quality"];
    assert!(crfs.iter().all(|&c| c <= 24) && crfs[0] == 24, "{crfs:?}");
    assert!(q["chunksAtBound"].as_u64().unwrap() >= 2, "{q}");
    assert_eq!(q["maxCrf"], 24);
}

/// 6 s at 960x540 and 25 fps, keyframes every second: `source` (a lavfi graph) encoded near-losslessly.
fn ladder_input(name: &str, source: &str) -> PathBuf {
    fixture(
        name,
        &[
            "-f", "lavfi", "-i", source, "-pix_fmt", "yuv420p", "-c:v", "libx264", "-crf", "8",
            "-g", "25",
        ],
    )
}

/// Run a ladder job on `src`; check what any ladder must be, and return the summary.
fn ladder_job(name: &str, src: &Path) -> serde_json::Value {
    let out = out_dir(name);
    let yaml = job_yaml(
        src,
        &out,
        "hls",
        "    []\n",
        "  ladder: {codec: h264, targetQuality: {vmaf: 93}, preset: veryfast}\n  chunking: {targetSeconds: 2}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    let l = &s["ladder"];
    assert_eq!(l["display"], "960x540", "{l}");
    assert_eq!(l["sampleChunks"], serde_json::json!([0, 1, 2]), "{l}");
    let points = l["points"].as_array().unwrap();
    let rungs = l["rungs"].as_array().unwrap();
    // Three sizes (540p, 360p, 240p) at five settings each, and the top rung's refinements.
    assert!(points.len() >= 15, "{l}");
    assert!(!rungs.is_empty(), "{l}");
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    for r in rungs {
        let p = points
            .iter()
            .find(|p| p["height"] == r["height"] && p["crf"] == r["crf"])
            .unwrap_or_else(|| panic!("{r}: not a measured point"));
        assert_eq!((f(p, "kbps"), f(p, "vmaf")), (f(r, "kbps"), f(r, "vmaf")));
        // No measured point scores as high for as little.
        for q in points {
            let better = f(q, "kbps") <= f(p, "kbps")
                && f(q, "vmaf") >= f(p, "vmaf")
                && (f(q, "kbps") < f(p, "kbps") || f(q, "vmaf") > f(p, "vmaf"));
            assert!(!better, "rung {r} is dominated by {q}");
        }
        assert_eq!(p["dominated"], false, "{p}");
        assert!(r["why"].as_str().is_some_and(|w| w.len() > 20), "{r}");
    }
    assert!(
        f(&rungs[0], "vmaf") >= 93.0,
        "the top rung reaches the target: {l}"
    );
    for w in rungs.windows(2) {
        assert!(
            f(&w[1], "kbps") <= 0.55 * f(&w[0], "kbps") && f(&w[1], "vmaf") < f(&w[0], "vmaf"),
            "rungs are spaced: {w:?}"
        );
    }
    assert!(rungs.iter().all(|r| f(r, "vmaf") >= 40.0), "{l}");
    // Every rung is a rendition of the output, at its height and with every frame.
    let master = std::fs::read_to_string(out.join("master.m3u8")).unwrap();
    for (i, r) in rungs.iter().enumerate() {
        let rname = r["name"].as_str().unwrap();
        assert_eq!(s["renditions"][i]["name"], rname, "{s}");
        assert!(master.contains(&format!("{rname}/index.m3u8")), "{master}");
        let v = video(&out.join(rname).join("index.m3u8"));
        assert_eq!(num(&v, "height"), f(r, "height"), "{rname}");
        assert_eq!(num(&v, "nb_read_frames"), 150.0, "{rname}");
    }
    s
}

#[test]
fn a_ladder_follows_the_content_and_no_rung_is_dominated() {
    let still = ladder_input(
        "ladder-still.mp4",
        "testsrc2=size=960x540:rate=25,trim=end_frame=1,loop=loop=149:size=1,setpts=N/25/TB",
    );
    let zoom = ladder_input(
        "ladder-zoom.mp4",
        "mandelbrot=size=960x540:rate=25,trim=duration=6",
    );
    let easy = ladder_job("ladder-still", &still);
    let hard = ladder_job("ladder-zoom", &zoom);
    let top = |s: &serde_json::Value| s["ladder"]["rungs"][0]["kbps"].as_f64().unwrap();
    assert!(
        top(&hard) > 10.0 * top(&easy),
        "the zoom's top rung costs far more than the still slide's: {} and {}",
        hard["ladder"],
        easy["ladder"]
    );
    let shape = |s: &serde_json::Value| -> Vec<(u64, u64)> {
        s["ladder"]["rungs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["height"].as_u64().unwrap(), r["crf"].as_u64().unwrap()))
            .collect()
    };
    assert_ne!(shape(&easy), shape(&hard));
    eprintln!("still: {:?}\nzoom: {:?}", shape(&easy), shape(&hard));
}
