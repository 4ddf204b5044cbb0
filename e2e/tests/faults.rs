//! Faults survived on the local cluster (chart installed with helm). Each test runs a job through a fault
//! and checks that it completes with every frame (ffprobe on the output), that no temporary object or
//! multipart upload is left, and how many chunks were encoded more than once (at most those in flight when
//! the fault hit). Each writes its row of RELIABILITY.md.

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_e2e::cluster::{json, kubectl_ok, root};
use tessera_e2e::faultproxy::{wait_until, FaultProxy};
use tessera_e2e::jobs::{
    chunks_done, delete_job, encodes, get_job, input, input_probes, job_yaml, ledger_after_success,
    objects, open_uploads, output_frames, reliability_row, slow_job_yaml, wait_busy_worker,
    wait_complete,
};

/// Task leases last 6 s here (30 s by default), so a lost worker's task is re-queued quickly.
fn cluster() -> std::sync::MutexGuard<'static, Option<tessera_e2e::cluster::Cluster>> {
    tessera_e2e::cluster::cluster(&[
        ("TESSERA_POOL_MAX", "4"),
        ("TESSERA_POOL_COOLDOWN", "8"),
        ("TESSERA_LEASE_SECONDS", "6"),
        ("TESSERA_HELM_ARGS", "--set operator.taskLeaseSeconds=6"),
    ])
}

const HEADER: &str = "| fault | outcome | chunks | encodes | encoded twice | in flight at the fault (bound) | frames | data lost |\n|---|---|---|---|---|---|---|---|";

fn cluster_sh(args: &[&str]) {
    let st = Command::new(root().join("scripts/cluster.sh"))
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "cluster.sh {args:?}");
}

/// Check a finished job and record it: every frame, nothing left behind, re-encodes within the bound.
fn finish(fault: &str, job: &str, seconds: u64, bound: usize, t0: Instant) {
    let j = wait_complete(job, Duration::from_secs(300));
    let took = t0.elapsed();
    let chunks = j["status"]["progress"]["chunksTotal"].as_u64().unwrap() as usize;
    let frames = output_frames(job);
    assert_eq!(frames, seconds * 25, "{fault}: every frame once");
    let n = encodes(job);
    let twice = n.saturating_sub(chunks);
    eprintln!(
        "{fault}: {chunks} chunks, {n} encodes, {frames} frames, {:.1} s",
        took.as_secs_f64()
    );
    assert!(
        n >= chunks && twice <= bound,
        "{fault}: {n} encodes for {chunks} chunks (bound {bound} extra)"
    );
    assert!(
        ledger_after_success(job).is_empty(),
        "{fault}: chunks left in the ledger"
    );
    assert_eq!(open_uploads(), 0, "{fault}: multipart upload left open");
    reliability_row(
        "faults",
        HEADER,
        fault,
        &format!(
            "Complete in {:.0} s | {chunks} | {n} | {twice} | ≤ {bound} | {frames} of {} | 0",
            took.as_secs_f64(),
            seconds * 25
        ),
    );
    delete_job(job);
    assert!(
        objects(&format!("outputs/{job}/.tessera")).is_empty(),
        "{fault}: the ledger goes with the job"
    );
}

fn start_slow(job: &str, seconds: u32, preset: &str) -> Instant {
    let src = input(&format!("src{seconds}"), seconds);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&slow_job_yaml(job, &src, preset)),
    );
    Instant::now()
}

#[test]
fn worker_killed_with_sigkill_mid_chunk() {
    let _c = cluster();
    let t0 = start_slow("sigkill", 20, "slow");
    let pod = wait_busy_worker("sigkill");
    // Grace period 0: the fake kubelet kills the process at once (SIGKILL), as a node's OOM killer would.
    kubectl_ok(
        &[
            "delete",
            "pod",
            &pod,
            "-n",
            "tessera-system",
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    finish("worker killed with SIGKILL mid-chunk", "sigkill", 20, 1, t0);
    // The plan is data: its chunks, the one the killed worker lost among them, ran on workers that read the
    // plan and never probed the input again.
    assert_eq!(
        input_probes("sigkill"),
        1,
        "the input was probed once, by the plan task"
    );
}

#[test]
fn worker_node_removed() {
    let _c = cluster();
    let t0 = start_slow("noderm", 20, "slow");
    let pod = wait_busy_worker("noderm");
    let node = json(&["get", "pod", &pod, "-n", "tessera-system"])["spec"]["nodeName"]
        .as_str()
        .unwrap()
        .to_string();
    let workers_on_node = json(&[
        "get",
        "pods",
        "-n",
        "tessera-system",
        "--field-selector",
        &format!("spec.nodeName={node}"),
    ])["items"]
        .as_array()
        .unwrap()
        .len();
    // The node goes away with its pods (what a cluster autoscaler or a preempted VM does), killed at once.
    kubectl_ok(
        &[
            "delete",
            "pods",
            "-n",
            "tessera-system",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    kubectl_ok(&["delete", "node", &node], None);
    finish(
        "worker's node removed (its pods killed)",
        "noderm",
        20,
        workers_on_node,
        t0,
    );
}

#[test]
fn kube_apiserver_restarted_mid_job() {
    let _c = cluster();
    let t0 = start_slow("apirestart", 20, "slow");
    wait_until("chunks to be done", Duration::from_secs(90), || {
        chunks_done("apirestart") >= 3
    });
    cluster_sh(&["stop", "kube-apiserver"]);
    std::thread::sleep(Duration::from_secs(5));
    cluster_sh(&["start", "kube-apiserver"]);
    wait_until("the API server to answer", Duration::from_secs(60), || {
        get_job("apirestart").is_some()
    });
    // Workers keep encoding through it (they talk to the operator and S3, not the API server); the leader
    // may step down if its Lease lapses, and the standby then re-plans from the ledger.
    finish(
        "kube-apiserver restarted mid-job (down 5 s)",
        "apirestart",
        20,
        4,
        t0,
    );
}

#[test]
fn s3_server_down_for_30_seconds() {
    let _c = cluster();
    let t0 = start_slow("s3down", 20, "medium");
    wait_until("chunks to be done", Duration::from_secs(90), || {
        chunks_done("s3down") >= 3
    });
    cluster_sh(&["stop", "s3"]);
    std::thread::sleep(Duration::from_secs(30));
    cluster_sh(&["start", "s3"]);
    finish("S3 server down for 30 s mid-job", "s3down", 20, 4, t0);
}

#[test]
fn both_operator_replicas_restarted_with_100_jobs_in_flight() {
    let _c = cluster();
    let src = input("tiny", 2);
    let mut all = String::new();
    for i in 0..100 {
        all.push_str(&job_yaml(&format!("many-{i:03}"), &src, ""));
        all.push_str("---\n");
    }
    let t0 = Instant::now();
    kubectl_ok(&["apply", "-f", "-"], Some(&all));
    // This test's jobs only: another test's job may be in the namespace too.
    let ours = || -> Vec<serde_json::Value> {
        json(&["get", "tj", "-n", "default"])["items"]
            .as_array()
            .cloned()
            .unwrap()
            .into_iter()
            .filter(|j| {
                j["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("many-"))
            })
            .collect()
    };
    wait_until("some jobs to finish", Duration::from_secs(120), || {
        ours()
            .iter()
            .filter(|j| j["status"]["phase"] == "Succeeded")
            .count()
            >= 10
    });
    kubectl_ok(
        &[
            "delete",
            "pods",
            "-n",
            "tessera-system",
            "-l",
            "app.kubernetes.io/name=tessera-operator",
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    let names: Vec<String> = (0..100).map(|i| format!("many-{i:03}")).collect();
    wait_until("all 100 jobs to complete", Duration::from_secs(400), || {
        let items = ours();
        for j in &items {
            assert!(
                j["status"]["phase"] != "Failed",
                "{}: {}",
                j["metadata"]["name"],
                j["status"]
            );
        }
        items
            .iter()
            .filter(|j| j["status"]["phase"] == "Succeeded")
            .count()
            >= names.len()
    });
    let took = t0.elapsed();
    let mut chunks = 0;
    let mut n = 0;
    for name in &names {
        assert_eq!(output_frames(name), 50, "{name}: every frame");
        chunks += get_job(name).unwrap()["status"]["progress"]["chunksTotal"]
            .as_u64()
            .unwrap() as usize;
        n += encodes(name);
    }
    eprintln!(
        "both operators restarted: {chunks} chunks, {n} encodes, {:.0} s",
        took.as_secs_f64()
    );
    assert!(
        n >= chunks && n - chunks <= 4,
        "{n} encodes for {chunks} chunks"
    );
    assert_eq!(open_uploads(), 0);
    reliability_row(
        "faults",
        HEADER,
        "both operator replicas killed with 100 jobs in flight",
        &format!(
            "all 100 Complete in {:.0} s | {chunks} | {n} | {} | ≤ 4 | 50 of 50 in each | 0",
            took.as_secs_f64(),
            n - chunks
        ),
    );
    for name in &names {
        kubectl_ok(
            &["delete", "tj", name, "-n", "default", "--wait=false"],
            None,
        );
    }
    wait_until("the jobs to be gone", Duration::from_secs(120), || {
        ours().is_empty()
    });
}

#[test]
fn s3_storms_resets_and_stalls_through_a_faulty_network() {
    let _c = cluster();
    // Workers of a pool of their own reach S3 through a fault-injecting proxy.
    let endpoint = tessera_e2e::cluster::env_file()
        .into_iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .unwrap()
        .1;
    let upstream: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start(upstream);
    proxy.set_storm(0.10);
    for _ in 0..3 {
        proxy.arm(
            Some(hyper::Method::GET),
            tessera_e2e::faultproxy::Fault::Reset { after: 20_000 },
            1,
        );
    }
    proxy.arm(
        Some(hyper::Method::GET),
        tessera_e2e::faultproxy::Fault::Stall {
            after: 10_000,
            for_: Duration::from_secs(15),
        },
        1,
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: flaky, namespace: tessera-system}}\nspec:\n  allowedNamespaces: {{from: All}}\n  \
         maxWorkers: 2\n  cooldownSeconds: 5\n  image: ghcr.io/tessera-dev/tessera-worker:0.1.0\n  env: [{{name: TESSERA_S3_BODY_TIMEOUT_SECONDS, value: \"3\"}}]\n  \
         s3: {{endpoint: \"{}\", region: us-east-1, credentialsSecret: tessera-s3}}\n", proxy.url())));
    let src = input("src12", 12);
    let t0 = Instant::now();
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&job_yaml("stormy", &src, "  pool: tessera-system/flaky\n")),
    );
    let bound = 2;
    finish(
        "S3 10 % 5xx/503 storm, 3 connections reset mid-body, a 15 s stall",
        "stormy",
        12,
        bound,
        t0,
    );
    let c = proxy.counters();
    eprintln!("proxy: {:?}", c);
    kubectl_ok(&["delete", "wp", "flaky", "-n", "tessera-system"], None);
}

#[test]
fn an_encoder_that_fails_mid_job_is_retried_elsewhere() {
    let _c = cluster();
    kubectl_ok(&["apply", "-f", "-"], Some(
        "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: brittle, namespace: tessera-system}\nspec:\n  allowedNamespaces: {from: All}\n  \
         maxWorkers: 2\n  cooldownSeconds: 5\n  image: ghcr.io/tessera-dev/tessera-worker:0.1.0\n  \
         env: [{name: TESSERA_FAULT_ENCODER_FAILURES, value: \"1\"}]\n  s3: {region: us-east-1, credentialsSecret: tessera-s3}\n",
    ));
    // The pool's S3 endpoint: the same as the default pool's.
    let endpoint = tessera_e2e::cluster::env_file()
        .into_iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .unwrap()
        .1;
    kubectl_ok(
        &[
            "patch",
            "wp",
            "brittle",
            "-n",
            "tessera-system",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"s3":{{"endpoint":"{endpoint}"}}}}}}"#),
        ],
        None,
    );
    // The job aims at a quality: the failure strikes after the chunk's setting was searched and recorded,
    // so the retry must encode with the recorded setting and encoder, not search again.
    let src = input("src8", 8);
    let targeted = |name: &str, pool: &str| {
        job_yaml(name, &src, pool).replace(
            "crf: 30, preset: ultrafast",
            "targetQuality: {vmaf: 90}, preset: ultrafast",
        )
    };
    let t0 = Instant::now();
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&targeted("brittle", "  pool: tessera-system/brittle\n")),
    );
    // Each worker's first chunk encode fails (as a hardware encoder losing its session); the failed chunk is
    // queued again and encoded on the next attempt: one failed attempt per worker, at most 2 workers.
    let done = wait_complete("brittle", Duration::from_secs(300));
    let quality = done["status"]["renditions"][0]["quality"].clone();
    finish(
        "encoder fails mid-job (once on each worker)",
        "brittle",
        8,
        2,
        t0,
    );
    let logs = tessera_e2e::cluster::pod_logs("brittle-worker");
    let count = |needle: &str| {
        logs.iter()
            .map(|(_, l)| l.matches(needle).count())
            .sum::<usize>()
    };
    let failed = count("injected by TESSERA_FAULT_ENCODER_FAILURES");
    assert!(failed >= 1, "the injected failure happened");
    assert_eq!(
        count("encoding with the settings recorded by an earlier try"),
        failed,
        "each failed chunk was encoded again with its recorded setting"
    );
    assert!(
        (quality["achievedMean"].as_f64().unwrap() - 90.0).abs() <= 1.5,
        "{quality}"
    );
    // The same job on a pool without the fault gives the same bytes: the retries encoded exactly what
    // the first tries would have.
    kubectl_ok(&["apply", "-f", "-"], Some(&targeted("steady", "")));
    let steady = wait_complete("steady", Duration::from_secs(300));
    assert_eq!(steady["status"]["renditions"][0]["quality"], quality);
    let video_md5 = |job: &str| {
        let o = Command::new("ffmpeg")
            .args(["-v", "error", "-i"])
            .arg(tessera_e2e::jobs::s3_dir().join(format!("tessera/outputs/{job}/small.mp4")))
            .args(["-map", "0:v", "-c", "copy", "-f", "md5", "-"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(video_md5("brittle"), video_md5("steady"));
    delete_job("steady");
    kubectl_ok(&["delete", "wp", "brittle", "-n", "tessera-system"], None);
}

/// A pool like the default one (same nodes, S3 access) with `changes` to its spec, and a slow 20 s job `job`
/// run by it.
fn start_in_pool(pool: &str, changes: serde_json::Value, job: &str) {
    let mut spec = json(&["get", "workerpool", "default", "-n", "tessera-system"])["spec"].clone();
    for (k, v) in changes.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let p = serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "WorkerPool",
        "metadata": {"name": pool, "namespace": "tessera-system"}, "spec": spec});
    kubectl_ok(&["apply", "-f", "-"], Some(&p.to_string()));
    let src = input("src20", 20);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "{}  pool: tessera-system/{pool}\n",
            slow_job_yaml(job, &src, "slow")
        )),
    );
}

/// The pid of a pod's process (the fake kubelet runs pods as local processes with `POD_NAME` set).
fn pod_pid(pod: &str) -> Option<u32> {
    let want = format!("POD_NAME={pod}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        env.split(|b| *b == 0)
            .any(|v| v == want.as_bytes())
            .then_some(pid)
    })
}

/// A command inside a pod's mount namespace (where its size-limited scratch tmpfs is mounted).
fn in_pod(pid: u32, script: &str) -> std::process::Output {
    Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-U",
            "-m",
            "--preserve-credentials",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("nsenter runs")
}

#[test]
fn worker_scratch_disk_full_mid_job() {
    let _c = cluster();
    // A pool like the default one (same nodes, S3 access), but whose workers' scratch is a 48 MiB emptyDir
    // (a tmpfs of that size here, in each pod's own mount namespace); a worker takes no task with less than
    // 8 MiB free.
    start_in_pool(
        "scratchy",
        serde_json::json!({"maxWorkers": 2, "scratchSizeLimit": "48Mi",
            "env": [{"name": "TESSERA_SCRATCH_MIN_FREE_MB", "value": "8"}]}),
        "diskfull",
    );
    let t0 = Instant::now();
    wait_until("chunks to be done", Duration::from_secs(90), || {
        chunks_done("diskfull") >= 2
    });
    let pod = wait_busy_worker("diskfull");
    let pid = pod_pid(&pod).expect("the busy worker's process");
    let scratch = tessera_e2e::cluster::e2e_dir()
        .join("cluster/kubelet/volumes")
        .join(format!("tessera-system_{pod}"))
        .join("scratch");
    // Something else on the node fills the worker's scratch to the last byte, mid-chunk.
    let out = in_pod(
        pid,
        &format!(
            "dd if=/dev/zero of={}/filler bs=1M 2>&1; df -m {}",
            scratch.display(),
            scratch.display()
        ),
    );
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        report.contains("No space left on device"),
        "the scratch did not fill up: {report}"
    );
    let log = || {
        tessera_e2e::cluster::pod_logs(&pod)
            .into_iter()
            .map(|(_, l)| l)
            .collect::<String>()
    };
    wait_until(
        "the worker to stop taking tasks",
        Duration::from_secs(60),
        || log().contains("scratch space full"),
    );
    let j = wait_complete("diskfull", Duration::from_secs(300));
    assert!(j["status"]["progress"]["chunksDone"].as_u64() > Some(0));
    // While full, the worker leased nothing (its chunk in flight, if it was writing, failed as retryable and
    // ran elsewhere; a worker left idle is then scaled away with its scratch).
    let l = log();
    let after_full = &l[l.find("scratch space full").unwrap()..];
    assert!(
        !after_full.contains("task leased"),
        "a worker with a full scratch took a task"
    );
    finish(
        "worker's scratch disk full mid-job (48 MiB emptyDir filled by another writer)",
        "diskfull",
        20,
        1,
        t0,
    );
    kubectl_ok(
        &["delete", "workerpool", "scratchy", "-n", "tessera-system"],
        None,
    );
}

#[test]
fn worker_clock_ten_minutes_ahead_and_running_at_half_speed() {
    let _c = cluster();
    // Leases are judged by the leader's monotonic clock alone and workers send no times, so a worker's
    // clock cannot shorten or stretch a lease. Shown with a pool whose workers' clocks (wall and monotonic,
    // by libfaketime) are 10 minutes ahead and run at half speed: their 1 s heartbeats come every 2 s,
    // within the 6 s task lease here, and nothing expires or is encoded twice. (10 minutes: S3 refuses
    // requests signed more than 15 minutes off, as RequestTimeTooSkewed, which workers report as
    // `ClockSkewed`, retryable on another worker.)
    let lib = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libfaketime (Debian's faketime package; make setup installs it)");
    start_in_pool(
        "skewed",
        serde_json::json!({"maxWorkers": 2, "env": [
            {"name": "LD_PRELOAD", "value": lib},
            {"name": "FAKETIME", "value": "+10m x0.5"},
            {"name": "FAKETIME_NO_CACHE", "value": "1"}]}),
        "skew",
    );
    let t0 = Instant::now();
    let pod = wait_busy_worker("skew");
    // The worker's own log is stamped with its clock: minutes ahead of this machine's.
    let log: String = tessera_e2e::cluster::pod_logs(&pod)
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let stamp = log.split_whitespace().next().unwrap_or("").to_string();
    let epoch = |args: &[&str]| -> i64 {
        let out = Command::new("date").args(args).output().unwrap().stdout;
        String::from_utf8_lossy(&out).trim().parse().unwrap_or(0)
    };
    let ahead = epoch(&["-u", "-d", &stamp, "+%s"]) - epoch(&["-u", "+%s"]);
    assert!(
        ahead > 300,
        "the worker's clock is not skewed: {stamp} ({ahead} s ahead)"
    );
    finish(
        "workers' clocks 10 min ahead and running at half speed (libfaketime)",
        "skew",
        20,
        0,
        t0,
    );
    kubectl_ok(
        &["delete", "workerpool", "skewed", "-n", "tessera-system"],
        None,
    );
}
