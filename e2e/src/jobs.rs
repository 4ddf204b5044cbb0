//! Helpers for tests that run TranscodeJobs on the local cluster: inputs generated with ffmpeg and uploaded
//! with `tessera-cp`, jobs as YAML, waiting on conditions, reading what the S3 server stores, counting
//! encodes in worker logs, and rows of RELIABILITY.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{env_file, json, kubectl, kubectl_ok, pod_logs, root};

pub fn s3_dir() -> PathBuf {
    crate::cluster::e2e_dir().join("cluster/s3")
}

/// Objects under a key prefix of the `tessera` bucket, as the S3 server stores them (a folder per bucket).
pub fn objects(prefix: &str) -> Vec<String> {
    fn walk(d: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                out.push(
                    p.strip_prefix(base)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let base = s3_dir().join("tessera");
    let mut out = Vec::new();
    walk(&base.join(prefix), &base, &mut out);
    out.sort();
    out
}

/// Multipart uploads the S3 server still holds open (s3s-fs keeps each as `.upload-*` in its root).
pub fn open_uploads() -> usize {
    std::fs::read_dir(s3_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload"))
        .count()
}

/// A generated input (640x360, 25 fps, a keyframe every second, with audio), uploaded once per name.
pub fn input(name: &str, seconds: u32) -> String {
    static MADE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let made = MADE.get_or_init(Default::default);
    if let Some(u) = made.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
        return u.clone();
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(format!("{name}.mp4"));
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=size=640x360:rate=25:duration={seconds}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=440:duration={seconds}"))
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-pix_fmt",
            "yuv420p",
        ])
        .args(["-c:a", "aac", "-shortest"])
        .arg(&file)
        .status()
        .expect("ffmpeg runs");
    assert!(st.success(), "ffmpeg made the input");
    let uri = upload(&file, &format!("inputs/{name}.mp4"));
    made.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.into(), uri.clone());
    uri
}

/// Upload a file to `s3://tessera/KEY` with `tessera-cp`; returns the URI.
pub fn upload(file: &Path, key: &str) -> String {
    upload_with(file, &format!("s3://tessera/{key}"), env_file())
}

/// Upload a file to `uri` with `tessera-cp` and the store settings in `env` (another store than the
/// cluster's); returns the URI.
pub fn upload_with(file: &Path, uri: &str, env: Vec<(String, String)>) -> String {
    let uri = uri.to_string();
    let out = Command::new(root().join("target/release/tessera-cp"))
        .arg(file)
        .arg(&uri)
        .envs(env)
        .output()
        .expect("tessera-cp runs");
    assert!(
        out.status.success(),
        "upload {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    uri
}

/// A job in namespace `default` with one small rendition, 1 s chunks; `extra` is appended to the spec.
pub fn job_yaml(name: &str, input: &str, extra: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         input: {{uri: \"{input}\"}}\n  output: {{uri: \"s3://tessera/outputs/{name}/\"}}\n  renditions:\n    - \
         {{name: small, video: {{codec: h264, height: 180, crf: 30, preset: ultrafast}}}}\n  chunking: \
         {{targetSeconds: 1}}\n{extra}"
    )
}

/// The same with a slower encode (360p, `preset`), so faults land while chunks are encoding.
pub fn slow_job_yaml(name: &str, input: &str, preset: &str) -> String {
    job_yaml(name, input, "")
        .replace("preset: ultrafast", &format!("preset: {preset}"))
        .replace("height: 180", "height: 360")
}

pub fn get_job(name: &str) -> Option<Value> {
    let out = kubectl(&["get", "tj", name, "-n", "default", "-o", "json"], None);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("JSON"))
}

pub fn condition(job: &Value, type_: &str) -> bool {
    job["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == type_ && c["status"] == "True")
}

pub fn chunks_done(name: &str) -> u64 {
    get_job(name).map_or(0, |j| {
        j["status"]["progress"]["chunksDone"].as_u64().unwrap_or(0)
    })
}

pub fn wait_complete(name: &str, bound: Duration) -> Value {
    let mut last = Value::Null;
    let t0 = Instant::now();
    while t0.elapsed() < bound {
        if let Some(j) = get_job(name) {
            assert!(
                !condition(&j, "Failed"),
                "job {name} failed: {}",
                j["status"]
            );
            if condition(&j, "Complete") {
                return j;
            }
            last = j;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "job {name} not Complete within {bound:?}: {}",
        last["status"]
    );
}

pub fn ffprobe(path: &Path) -> Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
        ])
        .arg("stream=codec_name,width,height,nb_read_frames:format=duration")
        .args(["-of", "json"])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Frames of a job's `small` rendition, counted by ffprobe on the stored object.
pub fn output_frames(job: &str) -> u64 {
    let v = ffprobe(&s3_dir().join(format!("tessera/outputs/{job}/small.mp4")));
    v["streams"][0]["nb_read_frames"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub fn worker_pods(pool: &str) -> Vec<Value> {
    json(&[
        "get",
        "pods",
        "-n",
        "tessera-system",
        "-l",
        &format!("tessera.dev/pool={pool}"),
    ])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn live_workers(pool: &str) -> usize {
    worker_pods(pool)
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .count()
}

pub fn delete_job(name: &str) {
    kubectl_ok(
        &["delete", "tj", name, "-n", "default", "--wait=false"],
        None,
    );
    crate::faultproxy::wait_until("the job to be gone", Duration::from_secs(60), || {
        get_job(name).is_none()
    });
}

/// Rendition encodes of `job`'s chunks that workers finished (a chunk task logs how many renditions it
/// encoded, and how many it took from the pool's result store).
pub fn rendition_encodes(job: &str) -> usize {
    let tag = format!("job=default/{job}");
    pod_logs("-worker-")
        .iter()
        .flat_map(|(_, log)| log.lines())
        .filter(|l| l.contains(" chunk encoded ") && l.split_whitespace().any(|w| w == tag))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("encoded="))
                .and_then(|n| n.parse::<usize>().ok())
        })
        .sum()
}

/// Full probes of `job`'s input by workers (keyframe index or packet scan, logged as "planned"): the plan
/// task's only, as chunk, audio and stitch tasks read the plan and the container header.
pub fn input_probes(job: &str) -> usize {
    let span = format!("job=default/{job}}}");
    pod_logs("-worker-")
        .iter()
        .flat_map(|(_, log)| log.lines())
        .filter(|l| l.contains(&span) && l.contains(" planned "))
        .count()
}

/// Chunk encodes of `job` started by workers (finished or not: a worker killed mid-chunk counts), from
/// every worker's log: chunk tasks leased, less those that found the chunk in the ledger.
pub fn encodes(job: &str) -> usize {
    let tag = format!("job=default/{job}");
    let mut leased = 0;
    let mut reused = 0;
    for (_, log) in pod_logs("-worker-") {
        for l in log
            .lines()
            .filter(|l| l.split_whitespace().any(|w| w == tag))
        {
            if l.contains("task leased") && l.contains("kind=Chunk") {
                leased += 1;
            } else if l.contains("chunk already in the ledger") {
                reused += 1;
            }
        }
    }
    leased - reused.min(leased)
}

/// What a finished job leaves in its ledger until it is deleted: its plan and its result.
pub fn ledger_after_success(job: &str) -> Vec<String> {
    objects(&format!("outputs/{job}/.tessera"))
        .into_iter()
        .filter(|o| !o.ends_with("/manifest.json") && !o.ends_with("/result.json"))
        .collect()
}

/// A pod of the pool in the middle of a task of `job` (more tasks leased than finished in its log).
pub fn busy_worker(job: &str) -> Option<String> {
    let tag = format!("job=default/{job}");
    pod_logs("-worker-").into_iter().find_map(|(file, l)| {
        let busy = l.matches("task leased").count()
            > l.matches("task done").count() + l.matches("task failed").count();
        (busy && l.contains(&tag)).then(|| {
            file.trim_start_matches("tessera-system_")
                .trim_end_matches(".log")
                .to_string()
        })
    })
}

/// Wait for a worker busy with a task of `job`, and name it.
pub fn wait_busy_worker(job: &str) -> String {
    crate::faultproxy::wait_until(
        "a worker busy with the job",
        Duration::from_secs(60),
        || busy_worker(job).is_some(),
    );
    busy_worker(job).expect("busy a moment ago")
}

/// Put a row into a table of RELIABILITY.md: the table between `<!-- SECTION:begin -->` and
/// `<!-- SECTION:end -->` (created with `header` if absent); a row whose first cell is `key` is replaced.
pub fn reliability_row(section: &str, header: &str, key: &str, row: &str) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let p = root().join("RELIABILITY.md");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|_| "# Reliability\n".into());
    let (b, e) = (
        format!("<!-- {section}:begin -->"),
        format!("<!-- {section}:end -->"),
    );
    let (before, body, after) = match (text.find(&b), text.find(&e)) {
        (Some(x), Some(y)) => (
            text[..x].to_string(),
            text[x + b.len()..y].to_string(),
            text[y + e.len()..].to_string(),
        ),
        _ => (
            format!("{}\n\n", text.trim_end()),
            format!("\n{header}\n"),
            "\n".to_string(),
        ),
    };
    let cell = format!("| {key} |");
    let mut lines: Vec<String> = body
        .lines()
        .filter(|l| !l.starts_with(&cell))
        .map(str::to_string)
        .collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines.push(format!("| {key} | {row} |"));
    std::fs::write(
        &p,
        format!(
            "{before}{b}\n{}\n{e}{after}",
            lines.join("\n").trim_start_matches('\n')
        ),
    )
    .expect("RELIABILITY.md written");
}
