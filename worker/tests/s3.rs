//! S3 streaming I/O, end to end: the `tessera` binary against a real S3 server process (s3s-fs over HTTP on
//! loopback), directly and through a fault-injecting proxy. Every test checks that no multipart upload is
//! left open on the server, whether it passed or failed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::Value;
use tessera_e2e::faultproxy::{wait_until, Fault, FaultProxy};
use tessera_e2e::s3server::S3Server;

const BUCKET: &str = "media";

/// A server with the `media` bucket that asserts, when the test ends, that no upload is left open.
struct Store {
    server: S3Server,
}

impl Store {
    fn new() -> Self {
        Self {
            server: S3Server::start(&[BUCKET]),
        }
    }
}

impl std::ops::Deref for Store {
    type Target = S3Server;
    fn deref(&self) -> &S3Server {
        &self.server
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let open = self.server.open_uploads();
        if !std::thread::panicking() {
            assert!(open.is_empty(), "multipart uploads left open: {open:?}");
        }
    }
}

fn tessera(store: &S3Server, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.args(args);
    for (k, v) in store.env(endpoint) {
        c.env(k, v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(store: &S3Server, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    tessera(store, endpoint, args, env)
        .output()
        .expect("tessera runs")
}

fn ok(store: &S3Server, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = run(store, endpoint, args, env);
    assert!(
        out.status.success(),
        "tessera {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `tessera cp --json`, returning its summary.
fn cp(store: &S3Server, endpoint: &str, src: &str, dst: &str, env: &[(&str, &str)]) -> Value {
    let out = ok(store, endpoint, &["cp", src, dst, "--json"], env);
    serde_json::from_slice(&out.stdout).expect("cp --json prints JSON")
}

/// A spawned tessera whose stderr is collected as it arrives.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tessera starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait(mut self) -> (std::process::ExitStatus, String, String) {
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .unwrap();
        let status = self.child.wait().unwrap();
        // The reader thread finishes when the pipe closes.
        wait_until("stderr to close", Duration::from_secs(5), || {
            Arc::strong_count(&self.stderr) == 1
        });
        let err = self.stderr();
        (status, out, err)
    }
}

/// Deterministic pseudo-random bytes (incompressible, different per seed).
fn random_file(path: &Path, size: u64, seed: u64) -> PathBuf {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    path.to_path_buf()
}

fn same_bytes(a: &Path, b: &Path) {
    let (ma, mb) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    assert_eq!(
        ma.len(),
        mb.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    let (mut fa, mut fb) = (
        BufReader::with_capacity(1 << 20, std::fs::File::open(a).unwrap()),
        BufReader::with_capacity(1 << 20, std::fs::File::open(b).unwrap()),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        assert!(
            ba[..n] == bb[..n],
            "{} and {} differ near byte {off}",
            a.display(),
            b.display()
        );
        off += n as u64;
    }
}

fn scratch(test: &str) -> PathBuf {
    let d = out_dir(&format!("s3-{test}"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cp_round_trips_objects_of_edge_sizes() {
    let store = Store::new();
    let dir = scratch("sizes");
    let url = store.url();
    // 5 MiB parts, so 5 MiB - 1, 5 MiB and 5 MiB + 1 are one PUT, one full part, and two parts.
    let env = [("TESSERA_S3_PART_MIB", "5")];
    let mib = 1u64 << 20;
    for (i, size) in [0, 1, 5 * mib - 1, 5 * mib, 5 * mib + 1, 23 * mib + 7]
        .into_iter()
        .enumerate()
    {
        let src = random_file(&dir.join(format!("src-{size}")), size, i as u64);
        let key = format!("s3://{BUCKET}/sizes/{size}.bin");
        let up = cp(&store, &url, src.to_str().unwrap(), &key, &env);
        assert_eq!(up["bytes"], size);
        same_bytes(
            &src,
            &store.object_path(BUCKET, &format!("sizes/{size}.bin")),
        );
        // s3 → s3, then s3 → file.
        let key2 = format!("s3://{BUCKET}/copies/{size}.bin");
        cp(&store, &url, &key, &key2, &env);
        let back = dir.join(format!("back-{size}"));
        let _ = std::fs::remove_file(&back);
        let down = cp(&store, &url, &key2, back.to_str().unwrap(), &env);
        assert_eq!(down["bytes"], size);
        same_bytes(&src, &back);
    }
    // Nothing but the finished objects, and no temporary files beside the downloads.
    assert_eq!(store.keys(BUCKET).len(), 12);
    assert!(
        listing(&dir).iter().all(|n| !n.contains(".partial")),
        "{:?}",
        listing(&dir)
    );
}

/// A 2 GiB MP4 whose index (moov) sits at the end, made by looping a lossless 1080p clip (cached).
fn big_mp4() -> PathBuf {
    let base = fixture(
        "big-base-1080p-qp0.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=1920x1080:rate=30",
            "-t",
            "4",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-qp",
            "0",
            "-g",
            "30",
        ],
    );
    fixture(
        "big-2gib-moov-at-end.mp4",
        &[
            "-stream_loop",
            "127",
            "-i",
            base.to_str().unwrap(),
            "-c",
            "copy",
        ],
    )
}

#[test]
fn gibibytes_round_trip_and_probe_reads_only_the_index() {
    let store = Store::new();
    let big = big_mp4();
    let size = std::fs::metadata(&big).unwrap().len();
    assert!(size >= 2 << 30, "fixture is {size} bytes");
    let url = store.url();
    let key = format!("s3://{BUCKET}/big/input.mp4");
    cp(&store, &url, big.to_str().unwrap(), &key, &[]);
    let dir = scratch("big");
    let back = dir.join("input.mp4");
    let _ = std::fs::remove_file(&back);
    cp(&store, &url, &key, dir.to_str().unwrap(), &[]);
    same_bytes(&big, &back);
    std::fs::remove_file(&back).unwrap();

    // Probe through the proxy, which counts every byte of every GET body.
    let proxy = FaultProxy::start(store.addr);
    let out = ok(&store, &proxy.url(), &["probe", &key, "--json"], &[]);
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fetched = proxy
        .counters()
        .get_body_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let local: Value = serde_json::from_slice(
        &ok(
            &store,
            &url,
            &["probe", big.to_str().unwrap(), "--json"],
            &[],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(info["video"]["frames"], local["video"]["frames"]);
    assert_eq!(info["keyframes"], local["keyframes"]);
    assert_eq!(info["bytes"], size);
    let share = fetched as f64 / size as f64;
    eprintln!(
        "probe of a {size}-byte object fetched {fetched} bytes ({:.4} %)",
        share * 100.0
    );
    assert!(share < 0.01, "probe fetched {fetched} of {size} bytes");
}

fn lossless_job(input: &str, output: &str, container: &str) -> String {
    format!(
        r#"apiVersion: tessera.dev/v1alpha1
kind: TranscodeJob
metadata: {{name: s3job}}
spec:
  input: {{uri: "{input}"}}
  output: {{uri: "{output}", container: {container}}}
  renditions:
    - name: full
      video: {{codec: h264, crf: 0, preset: ultrafast}}
      audio: {{codec: aac, bitrate: 96k}}
    - name: small
      video: {{codec: h264, height: 120, crf: 0, preset: ultrafast}}
      audio: {{codec: aac, bitrate: 96k}}
  chunking: {{targetSeconds: 2}}
"#
    )
}

fn source_clip() -> PathBuf {
    fixture(
        "s3-src-320x240.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=48000",
            "-t",
            "8",
            "-c:v",
            "libx264",
            "-g",
            "50",
            "-preset",
            "veryfast",
            "-c:a",
            "aac",
            "-shortest",
        ],
    )
}

/// Frames and audio of a file-to-file run and of an S3-to-S3 run through `endpoint` must be identical.
fn job_matches_file_run(
    store: &S3Server,
    endpoint: &str,
    test: &str,
    env: &[(&str, &str)],
    container: &str,
) {
    let src = source_clip();
    let dir = scratch(test);
    let key = format!("s3://{BUCKET}/{test}/in.mp4");
    cp(store, &store.url(), src.to_str().unwrap(), &key, &[]);
    // Files.
    let files_out = dir.join("files");
    let _ = std::fs::remove_dir_all(&files_out);
    let job = dir.join("files.yaml");
    std::fs::write(
        &job,
        lossless_job(
            &format!("file://{}", src.display()),
            &format!("file://{}/", files_out.display()),
            container,
        ),
    )
    .unwrap();
    ok(store, endpoint, &["run", job.to_str().unwrap()], &[]);
    // S3.
    let prefix = format!("s3://{BUCKET}/{test}/out/");
    let job = dir.join("s3.yaml");
    std::fs::write(&job, lossless_job(&key, &prefix, container)).unwrap();
    let out = ok(
        store,
        endpoint,
        &["run", job.to_str().unwrap(), "--json"],
        env,
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let renditions = summary["renditions"].as_array().unwrap();
    assert_eq!(renditions.len(), 2);
    for r in renditions {
        let uri = r["uri"].as_str().unwrap();
        assert!(uri.starts_with(&prefix), "{uri}");
        let rel = uri.strip_prefix(&format!("s3://{BUCKET}/")).unwrap();
        let name = r["name"].as_str().unwrap();
        let via_s3 = store.object_path(BUCKET, rel);
        let via_files = match container {
            "hls" => files_out.join(name).join("index.m3u8"),
            _ => files_out.join(format!("{name}.mp4")),
        };
        assert!(via_files.exists(), "{}", via_files.display());
        assert_eq!(
            frame_md5s(&via_s3),
            frame_md5s(&via_files),
            "{name}: frames differ"
        );
        assert_eq!(
            audio_md5(&via_s3),
            audio_md5(&via_files),
            "{name}: audio differs"
        );
    }
}

/// Start `tessera run JOB` through the proxy and return once it has read `min_bytes` of its input.
fn start_reading_job(store: &S3Server, proxy: &FaultProxy, job: &Path, min_bytes: u64) -> Running {
    let r = Running::spawn(tessera(
        store,
        &proxy.url(),
        &["run", job.to_str().unwrap()],
        &[],
    ));
    wait_until("the job to be reading", Duration::from_secs(60), || {
        proxy
            .counters()
            .get_body_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > min_bytes
    });
    r
}

fn audio_md5(path: &Path) -> String {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args(["-map", "0:a", "-f", "md5", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn job_on_s3_produces_the_same_frames_as_on_files() {
    let store = Store::new();
    job_matches_file_run(&store, &store.url(), "plain", &[], "mp4");
}

#[test]
fn job_through_faults_produces_the_same_frames() {
    let store = Store::new();
    let proxy = FaultProxy::start(store.addr);
    // 10 % of requests answered 503 SlowDown or 500, three GETs cut mid-body, one 503 burst on uploads, a
    // bandwidth limit, and HLS output (many objects).
    proxy.set_storm(0.10);
    proxy.set_bandwidth(16 << 20);
    proxy.arm(Some(Method::GET), Fault::Reset { after: 40_000 }, 3);
    proxy.arm(Some(Method::PUT), Fault::Status(503), 4);
    job_matches_file_run(&store, &proxy.url(), "faults", &[], "hls");
    let c = proxy.counters();
    assert!(c.faults.load(std::sync::atomic::Ordering::Relaxed) >= 7);
    assert_eq!(proxy.pending(), 0, "every armed fault fired");
}

#[test]
fn copies_survive_resets_stalls_throttling_and_5xx_bursts() {
    let store = Store::new();
    let proxy = FaultProxy::start(store.addr);
    let dir = scratch("faults-cp");
    let src = random_file(&dir.join("src.bin"), 24 << 20, 7);
    let env = [("TESSERA_S3_PART_MIB", "5")];
    let key = format!("s3://{BUCKET}/faults/obj.bin");
    // Upload: a burst of 503 SlowDown and 500s on part uploads, under a bandwidth limit.
    proxy.arm(Some(Method::PUT), Fault::Status(503), 4);
    proxy.arm(Some(Method::PUT), Fault::Status(500), 2);
    proxy.set_bandwidth(32 << 20);
    let up = cp(&store, &proxy.url(), src.to_str().unwrap(), &key, &env);
    assert!(up["s3"]["retries"].as_u64().unwrap() >= 6, "{up}");
    same_bytes(&src, &store.object_path(BUCKET, "faults/obj.bin"));
    // Download: connections reset mid-body, and one stall longer than the SDK's 20 s stalled-stream grace.
    proxy.arm(Some(Method::GET), Fault::Reset { after: 1 << 20 }, 3);
    proxy.arm(
        Some(Method::GET),
        Fault::Stall {
            after: 256 << 10,
            for_: Duration::from_secs(21),
        },
        1,
    );
    let back = dir.join("back.bin");
    let _ = std::fs::remove_file(&back);
    let t = Instant::now();
    let down = cp(
        &store,
        &proxy.url(),
        &key,
        back.to_str().unwrap(),
        &[("TESSERA_S3_BODY_TIMEOUT_SECONDS", "3")],
    );
    same_bytes(&src, &back);
    assert!(down["s3"]["retries"].as_u64().unwrap() >= 4, "{down}");
    // The stall was cut short by the body timeout and resumed, not waited out.
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    // s3 → s3 in a storm.
    proxy.set_storm(0.25);
    cp(
        &store,
        &proxy.url(),
        &key,
        &format!("s3://{BUCKET}/faults/copy.bin"),
        &env,
    );
    proxy.set_storm(0.0);
    same_bytes(&src, &store.object_path(BUCKET, "faults/copy.bin"));
    assert_eq!(proxy.pending(), 0);
}

#[test]
fn a_failed_upload_is_aborted_and_leaves_no_object() {
    let store = Store::new();
    let proxy = FaultProxy::start(store.addr);
    let dir = scratch("abort");
    let src = random_file(&dir.join("src.bin"), 20 << 20, 9);
    // Every part upload fails; the retry budget is short.
    proxy.arm(Some(Method::PUT), Fault::Status(503), 10_000);
    let out = run(
        &store,
        &proxy.url(),
        &[
            "cp",
            src.to_str().unwrap(),
            &format!("s3://{BUCKET}/abort/obj.bin"),
        ],
        &[
            ("TESSERA_S3_PART_MIB", "5"),
            ("TESSERA_S3_MAX_ATTEMPTS", "3"),
            ("TESSERA_S3_BREAKER_THRESHOLD", "1000"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("s3://media/abort/obj.bin") && err.contains("SlowDown"),
        "{err}"
    );
    assert!(err.contains("multipart upload aborted") || store.open_uploads().is_empty());
    assert!(store.keys(BUCKET).is_empty(), "{:?}", store.keys(BUCKET));
    // Store's Drop asserts no upload is left open.
}

#[test]
fn an_interrupted_copy_stops_promptly_and_aborts_its_upload() {
    let store = Store::new();
    let proxy = FaultProxy::start(store.addr);
    let dir = scratch("interrupt");
    let src = random_file(&dir.join("src.bin"), 30 << 20, 11);
    // The store hangs on part uploads: the copy is stuck in flight when it is interrupted.
    proxy.arm(
        Some(Method::PUT),
        Fault::Delay(Duration::from_secs(60)),
        10_000,
    );
    let r = Running::spawn(tessera(
        &store,
        &proxy.url(),
        &[
            "-v",
            "cp",
            src.to_str().unwrap(),
            &format!("s3://{BUCKET}/int/obj.bin"),
        ],
        &[("TESSERA_S3_PART_MIB", "5")],
    ));
    wait_until("part uploads in flight", Duration::from_secs(20), || {
        proxy
            .counters()
            .puts
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    });
    let t = Instant::now();
    // SAFETY-free: plain kill(2) through the kill command.
    Command::new("kill")
        .args(["-INT", &r.child.id().to_string()])
        .status()
        .unwrap();
    let (status, _, err) = r.wait();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?} to stop",
        t.elapsed()
    );
    assert!(err.contains("multipart upload aborted"), "{err}");
    assert!(store.keys(BUCKET).is_empty());
}

#[test]
fn circuit_breaker_opens_during_an_outage_and_closes_after_it() {
    let store = Store::new();
    let proxy = FaultProxy::start(store.addr);
    let dir = scratch("breaker");
    let src = random_file(&dir.join("src.bin"), 12 << 20, 13);
    let key = format!("s3://{BUCKET}/breaker/obj.bin");
    cp(&store, &store.url(), src.to_str().unwrap(), &key, &[]);
    proxy.set_outage(true);
    let back = dir.join("back.bin");
    let _ = std::fs::remove_file(&back);
    let r = Running::spawn(tessera(
        &store,
        &proxy.url(),
        &["cp", &key, back.to_str().unwrap(), "--json"],
        &[
            ("TESSERA_S3_BREAKER_OPEN_SECONDS", "0.5"),
            ("TESSERA_S3_MAX_ATTEMPTS", "100"),
        ],
    ));
    wait_until("the breaker to open", Duration::from_secs(30), || {
        r.stderr().contains("circuit breaker opened")
    });
    // While open, requests fail fast without reaching the endpoint: few requests for the time spent.
    proxy.set_outage(false);
    let (status, out, err) = r.wait();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("circuit breaker closed: endpoint recovered"),
        "{err}"
    );
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert!(summary["s3"]["breakerOpened"].as_u64().unwrap() >= 1);
    assert!(summary["s3"]["breakerClosed"].as_u64().unwrap() >= 1);
    same_bytes(&src, &back);
}

#[test]
fn an_object_overwritten_during_a_job_fails_it_clearly() {
    let store = Store::new();
    let proxy = FaultProxy::start(store.addr);
    let src = fixture(
        "s3-overwrite-640x360.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=640x360:rate=25",
            "-t",
            "20",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-qp",
            "10",
            "-g",
            "25",
        ],
    );
    let key = format!("s3://{BUCKET}/ow/in.mp4");
    cp(&store, &store.url(), src.to_str().unwrap(), &key, &[]);
    let dir = scratch("overwrite");
    let job = dir.join("job.yaml");
    let prefix = format!("s3://{BUCKET}/ow/out/");
    std::fs::write(&job, lossless_job(&key, &prefix, "mp4")).unwrap();
    // Slow reads, so the job is mid-read when the object changes.
    proxy.set_bandwidth(1 << 20);
    let r = start_reading_job(&store, &proxy, &job, 256 << 10);
    // Same size, other bytes: only the ETag tells them apart.
    let size = std::fs::metadata(&src).unwrap().len();
    let other = random_file(&dir.join("other.bin"), size, 17);
    cp(&store, &store.url(), other.to_str().unwrap(), &key, &[]);
    let (status, _, err) = r.wait();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("s3://media/ow/in.mp4: object changed while it was being read"),
        "{err}"
    );
    let keys = store.keys(BUCKET);
    assert_eq!(
        keys,
        vec!["ow/in.mp4".to_string()],
        "no output may be published"
    );
}

#[test]
fn missing_objects_buckets_and_bad_credentials_are_named() {
    let store = Store::new();
    let url = store.url();
    let dir = scratch("bad");
    let out = run(&store, &url, &["probe", "s3://media/nope.mp4"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("s3://media/nope.mp4") && err.contains("404"),
        "{err}"
    );

    let out = run(
        &store,
        &url,
        &["cp", "s3://no-such-bucket/x", dir.to_str().unwrap()],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("s3://no-such-bucket/x"), "{err}");

    let f = random_file(&dir.join("f.bin"), 1000, 1);
    let out = run(
        &store,
        &url,
        &["cp", f.to_str().unwrap(), "s3://media/f.bin"],
        &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("SignatureDoesNotMatch")
            || err.contains("AccessDenied")
            || err.contains("403"),
        "{err}"
    );
    // Secrets never reach the output.
    assert!(
        !err.contains("wrong-secret-value") && !err.contains(&store.secret_key),
        "{err}"
    );
    assert!(store.keys(BUCKET).is_empty());
}

#[test]
fn an_interrupted_job_on_s3_stops_promptly_and_publishes_nothing() {
    let store = Store::new();
    let proxy = FaultProxy::start(store.addr);
    let src = source_clip();
    let key = format!("s3://{BUCKET}/intjob/in.mp4");
    cp(&store, &store.url(), src.to_str().unwrap(), &key, &[]);
    let dir = scratch("interrupt-job");
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        lossless_job(&key, &format!("s3://{BUCKET}/intjob/out/"), "mp4"),
    )
    .unwrap();
    // Reads crawl, so the job is waiting on the store when it is interrupted.
    proxy.set_bandwidth(64 << 10);
    let r = start_reading_job(&store, &proxy, &job, 64 << 10);
    let t = Instant::now();
    Command::new("kill")
        .args(["-INT", &r.child.id().to_string()])
        .status()
        .unwrap();
    let (status, _, err) = r.wait();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?} to stop",
        t.elapsed()
    );
    assert_eq!(store.keys(BUCKET), vec!["intjob/in.mp4".to_string()]);
}
