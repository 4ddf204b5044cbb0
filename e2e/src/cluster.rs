//! The local cluster as a test fixture: `scripts/cluster.sh up` once per test binary (real etcd,
//! kube-apiserver, scheduler, controller-manager, fake GPU nodes, an S3 server, the chart installed with
//! helm), `down` when the process exits. Tests hold the returned guard, so they run one at a time and see
//! the cluster quiet.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Where `cluster.sh` keeps the cluster's state: `target/e2e`, or `TESSERA_E2E_DIR` (a second cluster beside
/// the first, e.g. a soak while tests run).
pub fn e2e_dir() -> PathBuf {
    std::env::var_os("TESSERA_E2E_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/e2e"))
}

pub struct Cluster;

static LOCK: Mutex<Option<Cluster>> = Mutex::new(None);

extern "C" {
    #[link_name = "atexit"]
    fn libc_atexit(f: extern "C" fn()) -> i32;
}

extern "C" fn stop() {
    let _ = Command::new(root().join("scripts/cluster.sh"))
        .arg("down")
        .status();
}

/// Start the cluster (first caller) and hold it for the caller's test. `env` is passed to `cluster.sh up`.
pub fn cluster(env: &[(&str, &str)]) -> MutexGuard<'static, Option<Cluster>> {
    let mut g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        let out = Command::new(root().join("scripts/cluster.sh"))
            .arg("up")
            .envs(env.iter().copied())
            .output()
            .expect("cluster.sh runs");
        assert!(
            out.status.success(),
            "cluster up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        *g = Some(Cluster);
        // SAFETY: registering a plain function to run at exit.
        unsafe { libc_atexit(stop) };
    }
    g
}

/// The settings `cluster.sh up` wrote (`target/e2e/env`), e.g. `AWS_ENDPOINT_URL`.
pub fn env_file() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(e2e_dir().join("env")).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut c = Command::new(crate::kubectl_bin());
    c.env("KUBECONFIG", e2e_dir().join("kubeconfig")).args(args);
    if stdin.is_some() {
        c.stdin(std::process::Stdio::piped());
    }
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("kubectl runs");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(s.as_bytes())
            .expect("stdin written");
    }
    child.wait_with_output().expect("kubectl finishes")
}

pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl(args, stdin);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    serde_json::from_str(&kubectl_ok(&a, None)).expect("kubectl prints JSON")
}

/// Logs of every pod the fake kubelet ran whose file name contains `filter`.
pub fn pod_logs(filter: &str) -> Vec<(String, String)> {
    let dir = e2e_dir().join("cluster/kubelet/pods");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".log") && name.contains(filter) {
            out.push((
                name,
                strip_ansi(&std::fs::read_to_string(e.path()).unwrap_or_default()),
            ));
        }
    }
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
