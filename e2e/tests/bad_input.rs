//! Bad input on the local cluster (chart installed with helm): every case ends in a clear rejection — at
//! `kubectl apply` by the CRD schema where a schema can say it, else a `Failed` condition whose reason
//! names the cause, with a Warning Event — and nothing is lost or left half-written, the operator keeps
//! running without restarts, and no secret appears in any log, event or status. The outcomes are written to
//! RELIABILITY.md (between the `bad-input` markers) by this test.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_e2e::cluster::{env_file, json, kubectl, kubectl_ok, pod_logs, root};
use tessera_e2e::jobs::upload;

fn cluster() -> std::sync::MutexGuard<'static, Option<tessera_e2e::cluster::Cluster>> {
    tessera_e2e::cluster::cluster(&[("TESSERA_POOL_MAX", "4"), ("TESSERA_POOL_COOLDOWN", "8")])
}

fn ffmpeg(args: &[&str], out: &Path) {
    let st = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(args)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "ffmpeg {args:?}");
}

fn job(name: &str, input: &str, output: &str, renditions: &str, extra: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
         input: {{uri: \"{input}\"}}\n  output: {{uri: \"{output}\"}}\n  renditions: {renditions}\n{extra}"
    )
}

const R1: &str = "[{name: a, video: {codec: h264, height: 144, preset: ultrafast}}]";

struct Outcome {
    case: String,
    rejected_at: &'static str,
    reason: String,
    message: String,
}

fn status_of(name: &str) -> Option<Value> {
    let out = kubectl(&["get", "tj", name, "-n", "default", "-o", "json"], None);
    out.status
        .success()
        .then(|| serde_json::from_slice::<Value>(&out.stdout).unwrap()["status"].clone())
}

fn failed(st: &Value) -> Option<(String, String)> {
    st["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Failed" && c["status"] == "True")
        .map(|c| {
            (
                c["reason"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

/// The local cluster's S3 endpoint (`cluster.sh up` wrote it).
fn s3_endpoint() -> String {
    env_file()
        .into_iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .expect("AWS_ENDPOINT_URL in target/e2e/env")
        .1
}

fn s3_dir() -> std::path::PathBuf {
    tessera_e2e::cluster::e2e_dir().join("cluster/s3")
}

#[test]
fn bad_input_is_rejected_with_the_cause_named_and_nothing_is_lost() {
    let _c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = env_file()
        .into_iter()
        .find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY")
        .unwrap()
        .1;

    // Media that reaches a worker.
    let good = d.join("good.mp4");
    ffmpeg(
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x180:rate=25:duration=4",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
        ],
        &good,
    );
    let bytes = std::fs::read(&good).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let empty = write("empty.mp4", b"");
    let noise = write(
        "noise.mp4",
        &(0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect::<Vec<_>>(),
    );
    let text = write("text.mp4", "this is not a video\n".repeat(2000).as_bytes());
    let truncated = write("truncated.mp4", &bytes[..bytes.len() / 2]);
    // moov at the end (ffmpeg's default): everything before it, so the index is missing entirely.
    let moov = bytes.windows(4).rposition(|w| w == b"moov").unwrap() - 4;
    let no_moov = write("no-moov.mp4", &bytes[..moov]);
    let audio_only = d.join("audio-only.m4a");
    ffmpeg(
        &["-f", "lavfi", "-i", "sine=d=2", "-c:a", "aac"],
        &audio_only,
    );
    let srt = write("subs.srt", b"1\n00:00:00,000 --> 00:00:01,000\nhello\n\n");
    let subs_only = d.join("subtitle-only.mkv");
    ffmpeg(&["-i", srt.to_str().unwrap(), "-c:s", "srt"], &subs_only);
    let mut y4m = b"YUV4MPEG2 W17000 H16 F25:1 Ip A1:1 C420jpeg\nFRAME\n".to_vec();
    y4m.extend(vec![128u8; 17000 * 16 * 3 / 2]);
    let huge = write("absurd-dimensions.y4m", &y4m);
    let good_uri = upload(&good, "bad/good.mp4");

    let mut media: Vec<(&str, String, String, &str)> = Vec::new(); // case, input, output, expected reason
    for (case, file, reason) in [
        ("zero-byte file", &empty, "InvalidMedia"),
        ("random bytes", &noise, "InvalidMedia"),
        ("text, not a video", &text, "InvalidMedia"),
        ("truncated MP4", &truncated, "InvalidMedia"),
        ("MP4 without moov", &no_moov, "InvalidMedia"),
        ("audio only", &audio_only, "NoVideoStream"),
        ("subtitle only", &subs_only, "NoVideoStream"),
        (
            "absurd declared dimensions (17000x16)",
            &huge,
            "InvalidMedia",
        ),
    ] {
        let key = format!("bad/{}", file.file_name().unwrap().to_string_lossy());
        media.push((case, upload(file, &key), String::new(), reason));
    }
    media.push((
        "missing object",
        "s3://tessera/bad/does-not-exist.mp4".into(),
        String::new(),
        "InputNotFound",
    ));
    media.push((
        "missing input bucket",
        "s3://no-such-bucket/in.mp4".into(),
        String::new(),
        "BucketNotFound",
    ));

    // Wrong credentials: a pool whose Secret holds a wrong secret key.
    let wrong = "wrong-secret-0123456789";
    kubectl_ok(
        &[
            "-n",
            "tessera-system",
            "create",
            "secret",
            "generic",
            "bad-s3",
            "--from-literal=AWS_ACCESS_KEY_ID=tessera",
            &format!("--from-literal=AWS_SECRET_ACCESS_KEY={wrong}"),
        ],
        None,
    );
    let endpoint = s3_endpoint();
    kubectl_ok(&["apply", "-f", "-"], Some(&format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: badcreds, namespace: tessera-system}}\nspec:\n  allowedNamespaces: {{from: All}}\n  \
         maxWorkers: 1\n  cooldownSeconds: 5\n  image: ghcr.io/tessera-dev/tessera-worker:0.1.0\n  \
         s3: {{endpoint: \"{endpoint}\", region: us-east-1, credentialsSecret: bad-s3}}\n")));

    // Specs the operator rejects (a schema cannot say these).
    let mut spec_cases: Vec<(&str, String)> = vec![
        (
            "crf and bitrate together",
            job(
                "spec-crf-bitrate",
                &good_uri,
                "s3://tessera/outputs/x/",
                "[{name: a, video: {codec: h264, crf: 20, bitrate: 1M}}]",
                "",
            ),
        ),
        (
            "opus audio in HLS",
            job(
                "spec-opus-hls",
                &good_uri,
                "s3://tessera/outputs/x/",
                "[{name: a, video: {codec: h264}, audio: {codec: opus}}]",
                "",
            )
            .replace(
                "output: {uri: \"s3://tessera/outputs/x/\"}",
                "output: {uri: \"s3://tessera/outputs/x/\", container: hls}",
            ),
        ),
        (
            "file:// input in a cluster",
            job(
                "spec-file-input",
                "file:///etc/passwd",
                "s3://tessera/outputs/x/",
                R1,
                "",
            ),
        ),
        (
            "output is a bucket root",
            job("spec-bucket-root", &good_uri, "s3://tessera/", R1, ""),
        ),
        (
            "'..' in the output key",
            job(
                "spec-dotdot",
                &good_uri,
                "s3://tessera/outputs/../../x/",
                R1,
                "",
            ),
        ),
        (
            "maxrate below bitrate",
            job(
                "spec-maxrate",
                &good_uri,
                "s3://tessera/outputs/x/",
                "[{name: a, video: {codec: h264, bitrate: 2M, maxrate: 1M}}]",
                "",
            ),
        ),
    ];
    // Specs the schema rejects at apply.
    let thousands: String = format!(
        "[{}]",
        (0..2000)
            .map(|i| format!("{{name: r{i}, video: {{codec: h264}}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let schema_cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown codec",
            job(
                "s1",
                &good_uri,
                "s3://tessera/o/",
                "[{name: a, video: {codec: h265}}]",
                "",
            ),
            "codec",
        ),
        (
            "negative CRF",
            job(
                "s2",
                &good_uri,
                "s3://tessera/o/",
                "[{name: a, video: {codec: h264, crf: -1}}]",
                "",
            ),
            "crf",
        ),
        (
            "empty renditions",
            job("s3", &good_uri, "s3://tessera/o/", "[]", ""),
            "spec.renditions",
        ),
        (
            "duplicate rendition names",
            job(
                "s4",
                &good_uri,
                "s3://tessera/o/",
                "[{name: a, video: {codec: h264}}, {name: a, video: {codec: h264}}]",
                "",
            ),
            "Duplicate",
        ),
        (
            "path traversal in a rendition name",
            job(
                "s5",
                &good_uri,
                "s3://tessera/o/",
                "[{name: ../../etc, video: {codec: h264}}]",
                "",
            ),
            "name",
        ),
        (
            "thousands of renditions",
            job("s6", &good_uri, "s3://tessera/o/", &thousands, ""),
            "spec.renditions",
        ),
        (
            "enormous targetSeconds",
            job(
                "s7",
                &good_uri,
                "s3://tessera/o/",
                R1,
                "  chunking: {targetSeconds: 1e9}\n",
            ),
            "targetSeconds",
        ),
        (
            "zero-size scaling",
            job(
                "s8",
                &good_uri,
                "s3://tessera/o/",
                "[{name: a, video: {codec: h264, height: 0}}]",
                "",
            ),
            "height",
        ),
        (
            "bitrate that is not a number",
            job(
                "s9",
                &good_uri,
                "s3://tessera/o/",
                "[{name: a, video: {codec: h264, bitrate: fast}}]",
                "",
            ),
            "bitrate",
        ),
        (
            "empty input URI",
            job("s10", "", "s3://tessera/o/", R1, ""),
            "spec.input.uri",
        ),
        (
            "output bucket name S3 rejects",
            job("s11", &good_uri, "s3://Bad_Bucket/o/", R1, ""),
            "spec.output.uri",
        ),
        (
            "unsupported URI scheme",
            job(
                "s12",
                "http://example.com/in.mp4",
                "s3://tessera/o/",
                R1,
                "",
            ),
            "spec.input.uri",
        ),
    ];

    let mut outcomes = Vec::new();
    for (case, yaml, field) in &schema_cases {
        let out = kubectl(&["apply", "-f", "-"], Some(yaml));
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert!(!out.status.success(), "{case}: accepted");
        assert!(
            err.contains(field),
            "{case}: the error names {field}: {err}"
        );
        outcomes.push(Outcome {
            case: case.to_string(),
            rejected_at: "kubectl apply (CRD schema)",
            reason: "Invalid".into(),
            message: err.chars().take(160).collect(),
        });
    }

    let mut names = BTreeMap::new();
    let mut all = String::new();
    for (i, (case, input, output, reason)) in media.iter().enumerate() {
        let name = format!("bad-{i:02}");
        let out = if output.is_empty() {
            format!("s3://tessera/outputs/{name}/")
        } else {
            output.clone()
        };
        all.push_str(&job(
            &name,
            input,
            &out,
            R1,
            "  chunking: {targetSeconds: 1}\n",
        ));
        all.push_str("---\n");
        names.insert(name, (case.to_string(), reason.to_string()));
    }
    let name = "bad-creds".to_string();
    all.push_str(&job(
        &name,
        &good_uri,
        "s3://tessera/outputs/bad-creds/",
        R1,
        "  pool: tessera-system/badcreds\n",
    ));
    all.push_str("---\n");
    names.insert(
        name,
        (
            "wrong S3 credentials".to_string(),
            "InvalidCredentials".to_string(),
        ),
    );
    for (case, yaml) in spec_cases.drain(..) {
        let name = yaml
            .split("name: ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string();
        all.push_str(&yaml);
        all.push_str("---\n");
        names.insert(name, (case.to_string(), "InvalidSpec".to_string()));
    }
    kubectl_ok(&["apply", "-f", "-"], Some(&all));
    let t0 = Instant::now();
    let mut done: BTreeMap<String, (String, String)> = BTreeMap::new();
    while done.len() < names.len() {
        for name in names.keys() {
            if done.contains_key(name) {
                continue;
            }
            let st = status_of(name).unwrap_or(Value::Null);
            assert!(
                st["phase"] != "Succeeded",
                "{name} ({}) succeeded",
                names[name].0
            );
            if let Some(f) = failed(&st) {
                // Argo CD shows the failed job Degraded, with the operator's reason and message.
                let (health, message) =
                    tessera_e2e::argocd::health("TranscodeJob", &serde_json::json!({"status": st}));
                assert_eq!(health, "Degraded", "{name}: {message}");
                assert!(message.starts_with(&f.0), "{name}: {message}");
                // Flux: Failed at once, not after the Kustomization's timeout.
                assert_eq!(
                    tessera_e2e::flux::health("TranscodeJob", &serde_json::json!({"status": st})),
                    "Failed",
                    "{name}"
                );
                done.insert(name.clone(), f);
            }
        }
        let missing: Vec<_> = names.keys().filter(|n| !done.contains_key(*n)).collect();
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "not failed after 180 s: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let events = kubectl_ok(&["get", "events", "-n", "default", "-o", "json"], None);
    let events: Value = serde_json::from_str(&events).unwrap();
    for (name, (case, want)) in &names {
        let (reason, message) = &done[name];
        assert_eq!(reason, want, "{case}: {message}");
        assert!(!message.is_empty(), "{case}: a message");
        assert!(
            events["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["involvedObject"]["name"] == name.as_str()
                    && e["type"] == "Warning"
                    && (e["reason"] == want.as_str()
                        || e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains(want.as_str())))),
            "{case}: a Warning event naming {want}"
        );
        // Nothing half-written where outputs go.
        let outs = s3_dir().join(format!("tessera/outputs/{name}"));
        let visible: Vec<_> = std::fs::read_dir(&outs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != ".tessera")
            .collect();
        assert!(visible.is_empty(), "{case}: outputs visible: {visible:?}");
        outcomes.push(Outcome {
            case: case.clone(),
            rejected_at: "Failed condition + Warning event",
            reason: reason.clone(),
            message: message.chars().take(160).collect(),
        });
    }

    // Deleting the failed jobs removes their temporary objects; no upload stays open.
    for name in names.keys() {
        kubectl_ok(
            &["delete", "tj", name, "-n", "default", "--wait=false"],
            None,
        );
    }
    tessera_e2e::faultproxy::wait_until(
        "the failed jobs to be deleted",
        Duration::from_secs(60),
        || names.keys().all(|n| status_of(n).is_none()),
    );
    let leftovers: Vec<String> = std::fs::read_dir(s3_dir().join("tessera/outputs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("bad-"))
        .filter(|p| {
            std::fs::read_dir(p.join(".tessera"))
                .into_iter()
                .flatten()
                .flatten()
                .next()
                .is_some()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(leftovers.is_empty(), "ledgers left: {leftovers:?}");
    let uploads = std::fs::read_dir(s3_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload"))
        .count();
    assert_eq!(uploads, 0, "open multipart uploads");

    // A healthy operator: both replicas running, never restarted.
    let ops = json(&[
        "get",
        "pods",
        "-n",
        "tessera-system",
        "-l",
        "app.kubernetes.io/name=tessera-operator",
    ]);
    for p in ops["items"].as_array().unwrap() {
        assert_eq!(p["status"]["phase"], "Running");
        assert_eq!(
            p["status"]["containerStatuses"][0]["restartCount"], 0,
            "operator restarted"
        );
    }

    // The S3 secret appears in no log, event or status.
    let mut haystack = String::new();
    for (_, l) in pod_logs("") {
        haystack.push_str(&l);
    }
    haystack.push_str(&kubectl_ok(&["get", "events", "-A", "-o", "json"], None));
    haystack.push_str(&kubectl_ok(&["get", "tj,wp", "-A", "-o", "json"], None));
    for f in [
        "kube-apiserver.log",
        "kube-controller-manager.log",
        "fake-kubelet.log",
        "s3.log",
    ] {
        haystack.push_str(
            &std::fs::read_to_string(tessera_e2e::cluster::e2e_dir().join("cluster").join(f))
                .unwrap_or_default(),
        );
    }
    assert!(!haystack.contains(&secret), "the S3 secret leaked");
    assert!(!haystack.contains(wrong), "the wrong secret leaked");
    kubectl_ok(&["delete", "wp", "badcreds", "-n", "tessera-system"], None);

    write_table(&outcomes);
}

fn write_table(rows: &[Outcome]) {
    let mut md = String::from(
        "<!-- bad-input:begin -->\n## Bad input (`e2e/tests/bad_input.rs`, written by the test)\n\n| case | rejected at | reason | message (start) | data lost |\n|---|---|---|---|---|\n",
    );
    for o in rows {
        let msg = o.message.replace('|', "\\|").replace('\n', " ");
        md.push_str(&format!(
            "| {} | {} | `{}` | {} | 0 |\n",
            o.case, o.rejected_at, o.reason, msg
        ));
    }
    md.push_str(&format!(
        "\n{} cases. For every one: no output visible, no multipart upload left open, the operator's replicas \
         running without a restart, and the S3 secret found in no pod log, component log, event or status.\n<!-- bad-input:end -->",
        rows.len()
    ));
    let p = root().join("RELIABILITY.md");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|_| "# Reliability\n".into());
    let text = match (
        text.find("<!-- bad-input:begin -->"),
        text.find("<!-- bad-input:end -->"),
    ) {
        (Some(a), Some(b)) => format!(
            "{}{}{}",
            &text[..a],
            md,
            &text[b + "<!-- bad-input:end -->".len()..]
        ),
        _ => format!("{}\n\n{}\n", text.trim_end(), md),
    };
    std::fs::write(p, text).unwrap();
}

/// The cluster's rows of the newcomer-mistakes table (the local ones come from worker/tests/mistakes.rs), and
/// `tessera doctor --cluster` on the running cluster: operator, pools and the fake GPU nodes found.
#[test]
fn cluster_mistakes_are_answered_at_once_and_doctor_sees_the_cluster() {
    let _c = cluster();
    let header = "| mistake | exit | seconds | first line of the message |\n|---|---|---|---|";
    let doctor = |args: &[&str]| {
        let t0 = Instant::now();
        let out = Command::new(root().join("target/release/tessera"))
            .arg("doctor")
            .args(args)
            .env(
                "KUBECONFIG",
                tessera_e2e::cluster::e2e_dir().join("kubeconfig"),
            )
            .output()
            .expect("tessera doctor runs");
        (out, t0.elapsed().as_secs_f64())
    };

    // The whole cluster, as a user would check it after `make cluster-up`.
    let (out, secs) = doctor(&["--cluster", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor --json");
    let checks = report["checks"].as_array().unwrap();
    let find = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name)))
            .unwrap_or_else(|| panic!("no {name} check: {report:#}"))
    };
    for name in [
        "API server",
        "CRD transcodejobs.tessera.dev",
        "CRD workerpools.tessera.dev",
        "operator",
        "queue",
        "GPU nodes",
    ] {
        assert_eq!(find(name)["status"], "ok", "{name}: {report:#}");
    }
    assert!(
        find("GPU nodes")["message"]
            .as_str()
            .unwrap()
            .contains("nvidia.com/gpu="),
        "{report:#}"
    );
    assert!(find("WorkerPool tessera-system/default")["message"]
        .as_str()
        .unwrap()
        .contains("desired"));
    assert!(secs < 10.0, "doctor --cluster took {secs:.1}s");

    // The operator not installed where doctor looks.
    let (out, secs) = doctor(&["--cluster", "--namespace", "tessera-absent"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("FAIL"))
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        line.contains("no Tessera operator in namespace tessera-absent"),
        "{text}"
    );
    assert!(
        text.contains("helm install tessera charts/tessera"),
        "{text}"
    );
    assert!(secs < 5.0, "{secs}");
    tessera_e2e::jobs::reliability_row(
        "mistakes",
        header,
        "operator not installed (cluster: tessera doctor --cluster)",
        &format!("1 | {secs:.2} | {}", line.replace('|', "\\|")),
    );

    // A job naming a pool that does not exist in another namespace: failed at once, in the same words as a
    // pool that exists there and does not serve the job's namespace (the answer does not tell which).
    let t0 = Instant::now();
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&job(
            "no-pool",
            "s3://tessera/in.mp4",
            "s3://tessera/outputs/no-pool/",
            R1,
            "  pool: tessera-system/nope\n",
        )),
    );
    let msg = loop {
        if let Some((reason, msg)) = failed(&status_of("no-pool").unwrap_or(Value::Null)) {
            assert_eq!(reason, "PoolNotAllowed", "{msg}");
            break msg;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no-pool did not fail"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        msg.starts_with(
            "WorkerPool tessera-system/nope does not exist or does not serve namespace default"
        ),
        "{msg}"
    );
    assert!(secs < 5.0, "{secs}");
    tessera_e2e::jobs::reliability_row(
        "mistakes",
        header,
        "job names a pool in another namespace that does not exist (cluster)",
        &format!("Failed: PoolNotAllowed | {secs:.2} | {msg}"),
    );
    kubectl_ok(
        &["delete", "tj", "no-pool", "-n", "default", "--wait=false"],
        None,
    );
}

fn tenant_job(ns: &str, name: &str, input: &str, output: &str, pool: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  \
         input: {{uri: \"{input}\"}}\n  output: {{uri: \"{output}\"}}\n  renditions: {R1}\n  pool: {pool}\n"
    )
}

fn status_in(ns: &str, name: &str) -> Value {
    let out = kubectl(&["get", "tj", name, "-n", ns, "-o", "json"], None);
    if out.status.success() {
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["status"].clone()
    } else {
        Value::Null
    }
}

/// Wait until the job has Succeeded or Failed; returns the phase and the Failed condition, if any.
fn settle(ns: &str, name: &str, bound: Duration) -> (String, Option<(String, String)>) {
    let t0 = Instant::now();
    loop {
        let st = status_in(ns, name);
        let phase = st["phase"].as_str().unwrap_or_default().to_string();
        if phase == "Succeeded" || phase == "Failed" {
            return (phase, failed(&st));
        }
        assert!(
            t0.elapsed() < bound,
            "{ns}/{name} not finished after {bound:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Tenancy on the local cluster: a shared pool serves the namespaces labelled as tenants and scopes each to its
/// own prefix. Each tenant's job inside its prefix completes; reading or writing the other tenant's prefix (or a
/// sibling prefix that only starts with the same letters) fails with AccessNotAllowed at admission, before any
/// task: nothing is written there and no worker names the other tenant's key. A namespace the pool does not
/// serve gets PoolNotAllowed, in the same words as for a pool that does not exist; labelled as a tenant, its job
/// completes. The rows go to RELIABILITY.md's tenancy table.
#[test]
fn tenants_reach_only_the_pools_and_prefixes_they_are_allowed() {
    let _c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.mp4");
    ffmpeg(
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=256x144:rate=25:duration=2",
            "-c:v",
            "libx264",
            "-g",
            "25",
        ],
        &clip,
    );
    for ns in ["tenant-a", "tenant-b", "outsider"] {
        let _ = kubectl(&["create", "namespace", ns], None);
    }
    for ns in ["tenant-a", "tenant-b"] {
        kubectl_ok(
            &[
                "label",
                "namespace",
                ns,
                "tessera.dev/tenant=yes",
                "--overwrite",
            ],
            None,
        );
    }
    // The shared pool reaches the store through a proxy that logs every request: a forbidden job's keys must
    // never be asked for.
    let upstream: std::net::SocketAddr = s3_endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("the cluster's S3 address");
    let proxy = tessera_e2e::faultproxy::FaultProxy::start(upstream);
    let endpoint = proxy.url();
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: shared, namespace: tessera-system}}\nspec:\n  \
             maxWorkers: 2\n  cooldownSeconds: 5\n  image: ghcr.io/tessera-dev/tessera-worker:0.1.0\n  \
             s3: {{endpoint: \"{endpoint}\", region: us-east-1, credentialsSecret: tessera-s3}}\n  \
             allowedNamespaces: {{from: Selector, selector: {{matchLabels: {{tessera.dev/tenant: \"yes\"}}}}}}\n  \
             access:\n  - {{namespaces: {{from: All}}, read: [\"s3://tessera/{{namespace}}/\"], write: [\"s3://tessera/{{namespace}}/out/\"]}}\n",
        )),
    );
    let a_in = upload(&clip, "tenant-a/in.mp4");
    let b_in = upload(&clip, "tenant-b/in.mp4");
    // Only the forbidden job names it: no request may ever reach it.
    let b_private = upload(&clip, "tenant-b/private.mp4");
    let pool = "tessera-system/shared";
    let cases: Vec<(&str, &str, String, String, &str)> = vec![
        (
            "tenant-a",
            "own",
            a_in.clone(),
            "s3://tessera/tenant-a/out/own/".into(),
            "Succeeded",
        ),
        (
            "tenant-b",
            "own",
            b_in.clone(),
            "s3://tessera/tenant-b/out/own/".into(),
            "Succeeded",
        ),
        (
            "tenant-a",
            "read-other",
            b_private.clone(),
            "s3://tessera/tenant-a/out/x/".into(),
            "AccessNotAllowed",
        ),
        (
            "tenant-a",
            "write-other",
            a_in.clone(),
            "s3://tessera/tenant-b/out/stolen/".into(),
            "AccessNotAllowed",
        ),
        (
            "tenant-a",
            "sibling-prefix",
            "s3://tessera/tenant-ab/in.mp4".into(),
            "s3://tessera/tenant-a/out/z/".into(),
            "AccessNotAllowed",
        ),
        (
            "outsider",
            "not-served",
            a_in.clone(),
            "s3://tessera/outsider/out/x/".into(),
            "PoolNotAllowed",
        ),
    ];
    for (ns, name, input, output, _) in &cases {
        kubectl_ok(
            &["apply", "-f", "-"],
            Some(&tenant_job(ns, name, input, output, pool)),
        );
    }
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&tenant_job(
            "outsider",
            "no-such-pool",
            &a_in,
            "s3://tessera/outsider/out/y/",
            "tessera-system/nope",
        )),
    );
    let mut rows = Vec::new();
    for (ns, name, input, output, want) in &cases {
        let (phase, f) = settle(ns, name, Duration::from_secs(180));
        match (*want, &f) {
            ("Succeeded", _) => assert_eq!(phase, "Succeeded", "{ns}/{name}: {f:?}"),
            (reason, Some((r, m))) => {
                assert_eq!(r, reason, "{ns}/{name}: {m}");
                let st = status_in(ns, name);
                assert!(
                    st["progress"]["chunksDone"].as_u64().unwrap_or(0) == 0,
                    "{ns}/{name} did work: {st}"
                );
                rows.push((
                    format!("{ns} job: {name} ({input} → {output})"),
                    r.clone(),
                    m.clone(),
                ));
            }
            (reason, None) => panic!("{ns}/{name}: {phase}, expected {reason}"),
        }
    }
    let (_, f) = settle("outsider", "no-such-pool", Duration::from_secs(30));
    let (r, missing) = f.expect("a Failed condition");
    assert_eq!(r, "PoolNotAllowed");
    let forbidden = failed(&status_in("outsider", "not-served")).unwrap().1;
    assert_eq!(
        missing.replace("tessera-system/nope", "P"),
        forbidden.replace(pool, "P"),
        "a missing pool reads as a forbidden one"
    );
    rows.push((
        "outsider job: names a pool that does not exist".into(),
        r,
        missing,
    ));
    // The store never saw a request for what the refused jobs named (the proxy logs every request, and it
    // did see the admitted jobs' work).
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|r| r.path.contains("/tenant-a/in.mp4")),
        "the proxy saw the admitted jobs: {seen:?}"
    );
    for forbidden in ["tenant-b/private.mp4", "tenant-b/out/stolen", "tenant-ab/"] {
        let hits: Vec<_> = seen
            .iter()
            .filter(|r| r.path.replace("%2F", "/").contains(forbidden))
            .collect();
        assert!(hits.is_empty(), "requests for {forbidden}: {hits:?}");
    }
    // Nothing was written outside the prefixes, and no worker named the other tenant's input for tenant-a.
    let written = walk(&s3_dir().join("tessera/tenant-b/out"));
    assert!(written.iter().all(|k| k.contains("/own/")), "{written:?}");
    // A task's log lines carry its job (the task span): none of them names another tenant's objects.
    let mut attributed = 0;
    for (pod, log) in pod_logs("tessera-system_shared-worker-") {
        assert!(
            !log.contains("tenant-b/private.mp4"),
            "{pod} named a refused job's input"
        );
        for line in log.lines() {
            for (me, other) in [("tenant-a", "tenant-b"), ("tenant-b", "tenant-a")] {
                if line.contains(&format!("job={me}/")) {
                    attributed += 1;
                    assert!(
                        !line.contains(&format!("tessera/{other}/")),
                        "{pod}: a {me} task logged {other}'s objects: {line}"
                    );
                }
            }
        }
    }
    assert!(attributed > 0, "the workers' task lines name their jobs");
    // Labelled as a tenant, the outsider's namespace is served.
    kubectl_ok(
        &[
            "label",
            "namespace",
            "outsider",
            "tessera.dev/tenant=yes",
            "--overwrite",
        ],
        None,
    );
    let outsider_in = upload(&clip, "outsider/in.mp4");
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&tenant_job(
            "outsider",
            "admitted",
            &outsider_in,
            "s3://tessera/outsider/out/ok/",
            pool,
        )),
    );
    assert_eq!(
        settle("outsider", "admitted", Duration::from_secs(180)).0,
        "Succeeded"
    );
    for (case, reason, msg) in rows {
        tessera_e2e::jobs::reliability_row(
            "tenancy",
            "| case | reason | message |\n|---|---|---|",
            &case,
            &format!("`{reason}` | {}", msg.replace('|', "\\|")),
        );
    }
    for ns in ["tenant-a", "tenant-b", "outsider"] {
        kubectl_ok(&["delete", "tj", "--all", "-n", ns, "--wait=false"], None);
    }
    kubectl_ok(
        &[
            "delete",
            "wp",
            "shared",
            "-n",
            "tessera-system",
            "--wait=false",
        ],
        None,
    );
}
