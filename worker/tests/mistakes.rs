//! A newcomer's first mistakes, each made for real with the `tessera` binary (local mode, a real S3 server over
//! HTTP, the fault proxy where no local server can answer as AWS does): every permanent mistake is answered in
//! under 5 s, in at most 3 lines, with the cause and the fix in plain words and no `{ .. }` debug structure.
//! The outcomes are written to RELIABILITY.md (between the `mistakes` markers) by this test; the cluster's rows
//! come from e2e/tests/bad_input.rs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;
use tessera_e2e::faultproxy::{Fault, FaultProxy};
use tessera_e2e::jobs::reliability_row;
use tessera_e2e::s3server::{free_port, S3Server};

const HEADER: &str = "| mistake | exit | seconds | first line of the message |\n|---|---|---|---|";

struct Case {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Run in a network namespace of its own (no DNS server reachable: a name cannot resolve).
    netns: bool,
    code: i32,
    /// Words the message must hold: the cause or the fix.
    words: &'static str,
    emulated: bool,
    /// The message is on stdout (`tessera doctor`), not stderr.
    stdout: bool,
}

fn job(input: &str, output: &str, renditions: &str, extra: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: first-hour}}\nspec:\n  \
         input: {{uri: \"{input}\"}}\n  output: {{uri: \"{output}\"}}\n  renditions:\n{renditions}{extra}"
    )
}

const R: &str = "    - {name: small, video: {codec: h264, height: 144, preset: ultrafast}}\n";

/// A clean environment: none of the developer's AWS settings, no instance metadata (never reach for it from
/// a test), plus `extra`.
fn env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut e: Vec<(String, String)> = vec![
        ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ];
    e.extend(extra.iter().cloned());
    e
}

fn with(store_env: &[(String, String)], over: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e: Vec<(String, String)> = store_env
        .iter()
        .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
        .cloned()
        .collect();
    e.extend(over.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env(&e)
}

fn run_case(c: &Case) -> (i32, Vec<String>, f64) {
    let bin = env!("CARGO_BIN_EXE_tessera");
    let mut cmd = if c.netns {
        let mut u = Command::new("unshare");
        u.arg("-n").arg(bin);
        u
    } else {
        Command::new(bin)
    };
    cmd.args(&c.args).env_clear();
    for k in ["PATH", "HOME", "TMPDIR", "LANG"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd.output().expect("tessera runs");
    let secs = t0.elapsed().as_secs_f64();
    let text =
        String::from_utf8_lossy(if c.stdout { &out.stdout } else { &out.stderr }).into_owned();
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("tessera: note:"))
        .map(str::to_string)
        .collect();
    (out.status.code().unwrap_or(-1), lines, secs)
}

#[test]
fn newcomer_mistakes_are_answered_at_once_in_plain_words() {
    let store = S3Server::start(&["media"]);
    let proxy = FaultProxy::start(store.addr);
    let dir = out_dir("mistakes");
    let d = dir.as_path();
    let clip = fixture(
        "mistakes-clip.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=2",
            "-c:v",
            "libx264",
            "-g",
            "25",
        ],
    );
    let clip_uri = format!("file://{}", clip.display());
    let out_uri = format!("file://{}/out/", d.display());
    let s3env = store.env(&store.url());
    let write = |name: &str, text: &str| -> String {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let run_args = |file: String| vec!["run".to_string(), file];
    let s3job = |name: &str, input: &str| {
        run_args(write(
            name,
            &job(input, "s3://media/out/first-hour/", R, ""),
        ))
    };
    std::fs::write(d.join("plain-file"), b"not a folder").unwrap();
    std::fs::create_dir_all(d.join("a-folder")).unwrap();
    let closed = free_port();
    let kubeconfig = write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {{server: \"https://127.0.0.1:{closed}\", insecure-skip-tls-verify: true}}\n\
             users:\n- name: u\n  user: {{token: not-a-real-token}}\ncontexts:\n- name: c\n  context: {{cluster: gone, user: u}}\ncurrent-context: c\n"
        ),
    );
    let example = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/transcodejob.yaml")
        .display()
        .to_string();

    let case = |name, args: Vec<String>, env: Vec<(String, String)>, code, words| Case {
        name,
        args,
        env,
        netns: false,
        code,
        words,
        emulated: false,
        stdout: false,
    };
    let mut cases = vec![
        case(
            "no S3 credentials (cluster example run locally)",
            run_args(example),
            env(&[]),
            1,
            "no S3 credentials: set AWS_ACCESS_KEY_ID",
        ),
        case("no S3 credentials", s3job("nocreds.yaml", "s3://media/in.mp4"), env(&[]), 1, "no S3 credentials"),
        case(
            "wrong secret key",
            s3job("secret.yaml", "s3://media/in.mp4"),
            with(&s3env, &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")]),
            1,
            "AWS_SECRET_ACCESS_KEY",
        ),
        case(
            "unknown access key ID",
            s3job("keyid.yaml", "s3://media/in.mp4"),
            with(&s3env, &[("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY")]),
            1,
            "check AWS_ACCESS_KEY_ID",
        ),
        case("unknown bucket", s3job("bucket.yaml", "s3://no-such-bucket/in.mp4"), with(&s3env, &[]), 1, "does not exist"),
        case("missing input object", s3job("key.yaml", "s3://media/missing.mp4"), with(&s3env, &[]), 1, "no object with key"),
        case(
            "stray space after the S3 key",
            s3job("space-key.yaml", "s3://media/in.mp4 "),
            with(&s3env, &[]),
            1,
            "contains a space",
        ),
        case(
            "S3 URI with a space in the bucket",
            s3job("space-bucket.yaml", "s3://my bucket/in.mp4"),
            with(&s3env, &[]),
            2,
            "not a valid S3 bucket name",
        ),
        Case {
            emulated: true,
            ..case(
                "wrong region",
                s3job("region.yaml", "s3://media/in.mp4"),
                with(&s3env, &[("AWS_ENDPOINT_URL", &proxy.url())]),
                1,
                "set AWS_REGION=eu-west-1",
            )
        },
        Case {
            netns: true,
            ..case(
                "endpoint name does not resolve",
                s3job("dns.yaml", "s3://media/in.mp4"),
                with(&s3env, &[("AWS_ENDPOINT_URL", "http://s3.example.invalid:9000")]),
                1,
                "\"s3.example.invalid\" does not resolve",
            )
        },
        case(
            "endpoint refusing connections",
            s3job("refused.yaml", "s3://media/in.mp4"),
            with(&s3env, &[("AWS_ENDPOINT_URL", &format!("http://127.0.0.1:{closed}"))]),
            1,
            "nothing accepts connections",
        ),
        case(
            "https:// to a plain-HTTP S3 server",
            s3job("tls.yaml", "s3://media/in.mp4"),
            with(&s3env, &[("AWS_ENDPOINT_URL", &format!("https://{}", store.addr))]),
            1,
            "write http://",
        ),
        case(
            "file:// with a relative path",
            run_args(write("relative.yaml", &job("file://clip.mp4", &out_uri, R, ""))),
            env(&[]),
            2,
            "absolute path",
        ),
        case(
            "input file does not exist",
            run_args(write("nofile.yaml", &job("file:///nonexistent/clip.mp4", &out_uri, R, ""))),
            env(&[]),
            1,
            "No such file",
        ),
        case(
            "input is a folder",
            run_args(write("folder.yaml", &job(&format!("file://{}", d.join("a-folder").display()), &out_uri, R, ""))),
            env(&[]),
            2,
            "is a folder",
        ),
        case(
            "output folder not writable (a file in the way)",
            run_args(write(
                "outfile.yaml",
                &job(&clip_uri, &format!("file://{}/out/", d.join("plain-file").display()), R, ""),
            )),
            env(&[]),
            2,
            "is a file, not a folder",
        ),
        case(
            "typo in a field name",
            run_args(write("typo.yaml", &job(&clip_uri, &out_uri, R, "").replace("renditions:", "rendtions:"))),
            env(&[]),
            2,
            "did you mean `renditions`",
        ),
        case(
            "a List of jobs",
            run_args(write(
                "list.yaml",
                &format!("apiVersion: v1\nkind: List\nitems:\n- {}\n", job(&clip_uri, &out_uri, R, "").trim().replace('\n', "\n  ")),
            )),
            env(&[]),
            2,
            "one TranscodeJob per file",
        ),
        case(
            "two jobs in one file",
            run_args(write("multi.yaml", &format!("{}---\n{}", job(&clip_uri, &out_uri, R, ""), job(&clip_uri, &out_uri, R, "")))),
            env(&[]),
            2,
            "2 YAML documents",
        ),
        case(
            "kind is not TranscodeJob",
            run_args(write(
                "kind.yaml",
                "apiVersion: batch/v1\nkind: Job\nmetadata: {name: x}\nspec: {template: {spec: {containers: []}}}\n",
            )),
            env(&[]),
            2,
            "expected tessera.dev/v1alpha1 TranscodeJob, found batch/v1 Job",
        ),
        case(
            "hardware: nvidia without an NVIDIA GPU",
            run_args(write("nvidia.yaml", &job(&clip_uri, &out_uri, R, "  hardware: nvidia\n"))),
            env(&[]),
            1,
            "use hardware: auto",
        ),
        case(
            "codec: av1 with hardware: nvidia",
            run_args(write(
                "av1nv.yaml",
                &job(&clip_uri, &out_uri, "    - {name: small, video: {codec: av1, height: 144}}\n", "  hardware: nvidia\n"),
            )),
            env(&[]),
            1,
            "needs av1_nvenc, which this FFmpeg",
        ),
        case("job file does not exist", run_args("/nonexistent/job.yaml".into()), env(&[]), 1, "cannot read"),
        Case {
            stdout: true,
            ..case(
                "doctor with the S3 server down",
                vec!["doctor".into(), "s3://media/doctor/".into()],
                with(&s3env, &[("AWS_ENDPOINT_URL", &format!("http://127.0.0.1:{closed}"))]),
                1,
                "nothing accepts connections",
            )
        },
        Case {
            stdout: true,
            ..case(
                "doctor --cluster with no cluster running",
                vec!["doctor".into(), "--cluster".into()],
                env(&[("KUBECONFIG".into(), kubeconfig)]),
                1,
                "cannot reach the API server",
            )
        },
    ];
    // The wrong-region row: S3 redirects every request for the bucket.
    proxy.arm(None, Fault::WrongRegion("eu-west-1"), 1000);

    let mut failures = Vec::new();
    for c in cases.drain(..) {
        let (code, lines, secs) = run_case(&c);
        // For doctor, the line that failed; otherwise the first line.
        let first = if c.stdout {
            lines
                .iter()
                .find(|l| l.contains("FAIL"))
                .cloned()
                .unwrap_or_default()
        } else {
            lines.first().cloned().unwrap_or_default()
        };
        let all = lines.join("\n");
        let mut bad = Vec::new();
        if code != c.code {
            bad.push(format!("exit {code}, expected {}", c.code));
        }
        if !all.contains(c.words) {
            bad.push(format!("message lacks {:?}", c.words));
        }
        if secs >= 5.0 {
            bad.push(format!("took {secs:.1}s"));
        }
        if !c.stdout && lines.len() > 3 {
            bad.push(format!("{} lines", lines.len()));
        }
        if all.contains('{') || all.contains('}') {
            bad.push("debug structure in the message".into());
        }
        if all.contains("wrong-secret-value") || all.contains(&store.secret_key) {
            bad.push("a secret in the message".into());
        }
        if !bad.is_empty() {
            failures.push(format!("{}: {}\n{all}", c.name, bad.join(", ")));
        }
        let shown = first
            .replace('|', "\\|")
            .replace(&d.display().to_string(), "…");
        reliability_row(
            "mistakes",
            HEADER,
            &format!(
                "{}{}",
                c.name,
                if c.emulated {
                    " (emulated: fault proxy)"
                } else {
                    ""
                }
            ),
            &format!("{code} | {secs:.2} | {shown}"),
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        store.keys("media").is_empty(),
        "nothing was written: {:?}",
        store.keys("media")
    );
    assert!(!d.join("out").exists(), "no output folder was created");
}

/// A transient failure is retried, and at default verbosity exactly one line says what is being retried, for
/// how long at most, and how to stop it.
#[test]
fn a_transient_failure_says_once_that_it_is_being_retried() {
    let store = S3Server::start(&["media"]);
    let proxy = FaultProxy::start(store.addr);
    let dir = out_dir("mistakes-transient");
    let src = dir.join("obj.bin");
    std::fs::write(&src, vec![7u8; 100_000]).unwrap();
    proxy.arm(None, Fault::Status(503), 4);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.args(["cp", src.to_str().unwrap(), "s3://media/t/obj.bin"]);
    for (k, v) in env(&store.env(&proxy.url())) {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("retrying for up to"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("throttling") && lines[0].contains("Ctrl-C stops"),
        "{err}"
    );
    assert!(Path::new(&store.object_path("media", "t/obj.bin")).exists());
}

/// `--log-format json` (or `TESSERA_LOG_FORMAT=json`): every log line is one JSON object, with the level and
/// the event's fields (the retry warning above, as a log pipeline reads it).
#[test]
fn logs_can_be_json_lines() {
    let store = S3Server::start(&["media"]);
    let proxy = FaultProxy::start(store.addr);
    let dir = out_dir("mistakes-json-logs");
    let src = dir.join("obj.bin");
    std::fs::write(&src, vec![7u8; 10_000]).unwrap();
    for how in [&["--log-format", "json"][..], &[][..]] {
        proxy.arm(None, Fault::Status(503), 2);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.args(how)
            .args(["cp", src.to_str().unwrap(), "s3://media/t/j.bin"]);
        for (k, v) in env(&store.env(&proxy.url())) {
            cmd.env(k, v);
        }
        if how.is_empty() {
            cmd.env("TESSERA_LOG_FORMAT", "json");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let lines: Vec<serde_json::Value> = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let retry = lines
            .iter()
            .find(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("retrying"))
            })
            .unwrap_or_else(|| panic!("no retry line in {err}"));
        assert_eq!(retry["level"], "WARN", "{retry}");
        assert!(retry["timestamp"].is_string(), "{retry}");
    }
}

fn doctor(args: &[&str], env_vars: &[(String, String)]) -> (i32, serde_json::Value, f64) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.arg("doctor").args(args).arg("--json");
    for (k, v) in env(env_vars) {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd.output().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code().unwrap_or(-1), report, secs)
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} check: {report:#}"))
}

/// `tessera doctor` on this machine (no GPU) against a real S3 server: every hardware family reported
/// unavailable with FFmpeg's reason and the software fallback, storage read and written for real; then, with
/// the server stopped, the storage check fails with the reason in under 5 s.
#[test]
fn doctor_checks_this_machine_and_a_real_s3_server() {
    let store = S3Server::start(&["media"]);
    let s3env = store.env(&store.url());
    let (code, report, _) = doctor(&["s3://media/doctor/"], &s3env);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    for family in [
        "NVIDIA NVENC encoders",
        "Intel Quick Sync encoders",
        "VA-API encoders",
    ] {
        let c = check(&report, family);
        assert_eq!(c["status"], "warn", "{c}");
        assert!(
            c["message"].as_str().unwrap().starts_with("unavailable: "),
            "{c}"
        );
        assert!(c["fix"].as_str().unwrap().contains("libx264"), "{c}");
    }
    assert!(check(&report, "NVIDIA NVENC encoders")["message"]
        .as_str()
        .unwrap()
        .contains("h264_nvenc"));
    for c in [
        "software h264 encoder",
        "software hevc encoder",
        "software av1 encoder",
    ] {
        assert_eq!(check(&report, c)["status"], "ok", "{report:#}");
    }
    assert!(check(&report, "endpoint")["message"]
        .as_str()
        .unwrap()
        .contains(&store.url()));
    let creds = check(&report, "credentials");
    assert!(
        creds["message"]
            .as_str()
            .unwrap()
            .contains("the environment"),
        "{creds}"
    );
    for c in ["write", "read back", "delete"] {
        assert_eq!(check(&report, c)["status"], "ok", "{report:#}");
    }
    assert!(
        store.keys("media").is_empty(),
        "the test object was removed"
    );
    let text = report.to_string();
    assert!(!text.contains(&store.secret_key), "the secret leaked");

    drop(store);
    let (code, report, secs) = doctor(&["s3://media/doctor/"], &s3env);
    assert_eq!(code, 1, "{report:#}");
    let w = check(&report, "write");
    assert_eq!(w["status"], "fail", "{w}");
    assert!(
        w["message"]
            .as_str()
            .unwrap()
            .contains("nothing accepts connections"),
        "{w}"
    );
    assert!(secs < 5.0, "{secs:.1}s");
}
