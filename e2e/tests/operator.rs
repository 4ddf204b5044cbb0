//! The operator end to end, on the local cluster with the chart installed by `helm install`
//! (`scripts/cluster.sh up`): real API server, scheduler and controller-manager, fake GPU nodes, worker pods
//! run as processes with their ServiceAccount tokens, a real S3 server, real FFmpeg.
//!
//! Bounds stated here are for a 2-core CI machine.

use serde_json::Value;
use std::time::{Duration, Instant};

use tessera_e2e::argocd;
use tessera_e2e::cluster::{json, kubectl, kubectl_ok, pod_logs, root};
use tessera_e2e::faultproxy::wait_until;
use tessera_e2e::jobs::{
    condition, delete_job, encodes, ffprobe, get_job, input, input_probes, job_yaml,
    ledger_after_success, live_workers, objects, open_uploads, rendition_encodes, s3_dir,
    slow_job_yaml, wait_busy_worker, wait_complete, worker_pods,
};

/// How long the example job may take from `kubectl apply` to `Complete`.
const EXAMPLE_BOUND: Duration = Duration::from_secs(120);

fn cluster() -> std::sync::MutexGuard<'static, Option<tessera_e2e::cluster::Cluster>> {
    tessera_e2e::cluster::cluster(&[
        ("TESSERA_GPU_NODES", "2"),
        ("TESSERA_GPUS_PER_NODE", "2"),
        ("TESSERA_CPU_NODES", "1"),
        ("TESSERA_POOL_MAX", "4"),
        ("TESSERA_POOL_COOLDOWN", "8"),
        ("TESSERA_LEASE_SECONDS", "6"),
    ])
}

#[test]
fn example_job_completes_on_gpu_workers_and_outputs_pass_ffprobe() {
    let _c = cluster();
    let t0 = Instant::now();
    kubectl_ok(
        &[
            "apply",
            "-n",
            "default",
            "-f",
            root().join("examples/transcodejob.yaml").to_str().unwrap(),
        ],
        None,
    );
    let job = wait_complete("example", EXAMPLE_BOUND);
    eprintln!(
        "example: apply → Complete in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let table = kubectl_ok(&["get", "tj", "example", "-n", "default"], None);
    assert!(
        table.contains("Succeeded") && table.contains("(100%)"),
        "{table}"
    );

    // The demo's input (setup.sh made it; cluster.sh uploaded it): several chunks on several workers.
    let src = tessera_e2e::s3server::cache_dir().join("demo-input-1/bigbuckbunny-2x.mp4");
    let source = ffprobe(&src);
    let frames = &source["streams"][0]["nb_read_frames"];
    let frame_count: u64 = frames.as_str().unwrap().parse().unwrap();
    let duration: f64 = source["format"]["duration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for (name, w, h) in [("720p", 1280, 720), ("360p", 640, 360)] {
        let out = ffprobe(&s3_dir().join(format!("tessera/outputs/example/{name}.mp4")));
        let s = &out["streams"][0];
        assert_eq!(
            (
                s["codec_name"].as_str(),
                s["width"].as_u64(),
                s["height"].as_u64()
            ),
            (Some("h264"), Some(w), Some(h))
        );
        assert_eq!(
            &s["nb_read_frames"], frames,
            "{name}: every source frame, once"
        );
        let d: f64 = out["format"]["duration"].as_str().unwrap().parse().unwrap();
        assert!(
            (d - duration).abs() < 0.1,
            "{name}: duration {d} vs source {duration}"
        );
        let st = job["status"]["renditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone();
        assert_eq!(
            st["uri"],
            format!("s3://tessera/outputs/example/{name}.mp4")
        );
        assert_eq!(st["frames"].as_u64(), Some(frame_count));
    }
    assert!(job["status"]["encoder"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    // The plan is data: one probe of the whole input (the plan task's); every chunk task read the plan.
    let chunks = job["status"]["progress"]["chunksTotal"].as_u64().unwrap() as usize;
    assert!(chunks >= 5, "the example is cut into chunks: {chunks}");
    assert_eq!(encodes("example"), chunks);
    assert_eq!(
        input_probes("example"),
        1,
        "the input was probed once, by the plan task"
    );
    assert!(
        ledger_after_success("example").is_empty(),
        "chunks and records are deleted after the stitch"
    );

    // The workers asked for a GPU and ran on GPU nodes only.
    let pods = worker_pods("default");
    assert!(!pods.is_empty(), "workers still there within the cooldown");
    for p in &pods {
        let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
        assert!(node.starts_with("gpu-"), "worker on {node}");
        assert_eq!(
            p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            "1"
        );
    }
    // Milestones are recorded as Events.
    let events = kubectl_ok(
        &[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=example",
        ],
        None,
    );
    assert!(
        events.contains("Planned") && events.contains("Completed"),
        "{events}"
    );
    delete_job("example");
    assert!(
        objects("outputs/example/.tessera").is_empty(),
        "the ledger goes with the job"
    );
    assert_eq!(open_uploads(), 0);
}

#[test]
fn invalid_specs_are_rejected_at_apply_with_the_field_named() {
    let _c = cluster();
    let base = |renditions: &str| {
        format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: bad}}\nspec:\n  input: {{uri: \
             \"s3://tessera/in.mp4\"}}\n  output: {{uri: \"s3://tessera/out/\"}}\n  renditions: {renditions}\n"
        )
    };
    for (renditions, field) in [
        // Kubernetes 1.20 names list items without their index (spec.renditions.video.codec); newer API
        // servers add it. The field is named either way.
        (
            "[{name: a, video: {codec: h265}}]",
            "spec.renditions.video.codec",
        ),
        (
            "[{name: a, video: {codec: h264, crf: -1}}]",
            "spec.renditions.video.crf",
        ),
        ("[]", "spec.renditions"),
        (
            "[{name: a, video: {codec: h264}}, {name: a, video: {codec: h264}}]",
            "spec.renditions[1]",
        ),
        (
            "[{name: ../x, video: {codec: h264}}]",
            "spec.renditions.name",
        ),
    ] {
        let out = kubectl(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&base(renditions)),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{renditions} was accepted");
        let unindexed = err
            .replace(|c: char| c.is_ascii_digit(), "")
            .replace("[]", "");
        assert!(
            err.contains(field)
                || unindexed.contains(
                    &field
                        .replace(|c: char| c.is_ascii_digit(), "")
                        .replace("[]", "")
                ),
            "{renditions}: the error names {field}: {err}"
        );
        eprintln!("rejected {renditions}: {}", err.trim());
    }
    let ladder = "  ladder: {codec: h264, targetQuality: {vmaf: 93}}\n";
    for good in [
        base("[{name: a, video: {codec: h264}}]"),
        // A ladder stands in for the renditions: empty, or left out.
        base("[]") + ladder,
        base("[]").replace("  renditions: []\n", "") + ladder,
    ] {
        let ok = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&good));
        assert!(
            ok.status.success(),
            "{good}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    }
}

#[test]
fn deleting_a_running_job_stops_its_tasks_and_leaves_nothing_behind() {
    let _c = cluster();
    let src = input("long", 40);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&slow_job_yaml("doomed", &src, "veryslow")),
    );
    wait_until(
        "chunks of the job to be encoding",
        Duration::from_secs(90),
        || {
            get_job("doomed")
                .is_some_and(|j| j["status"]["progress"]["chunksDone"].as_u64().unwrap_or(0) >= 1)
                && objects("outputs/doomed/.tessera")
                    .iter()
                    .any(|o| o.contains("/chunks/"))
        },
    );
    // Lines, not files: a worker that already stopped a task for an earlier test says so again. A task
    // learns of the cancellation at its next heartbeat, or, when it finished first, from its verdict's answer.
    let told = || -> usize {
        pod_logs("default-worker")
            .iter()
            .map(|(_, l)| l.matches("task cancelled by the operator").count())
            .sum()
    };
    let cancelled_before = told();
    let t0 = Instant::now();
    kubectl_ok(
        &["delete", "tj", "doomed", "-n", "default", "--wait=false"],
        None,
    );
    // The finalizer lets go only after every running task's worker said it stopped and the temporary
    // objects are deleted.
    wait_until("the job to be gone", Duration::from_secs(30), || {
        get_job("doomed").is_none()
    });
    let stopped = t0.elapsed();
    eprintln!(
        "deleting a running job: tasks stopped and ledger deleted in {:.2} s",
        stopped.as_secs_f64()
    );
    assert!(stopped < Duration::from_secs(5), "took {stopped:?}");
    let cancelled = told();
    assert!(
        cancelled > cancelled_before,
        "running tasks were told to stop"
    );
    assert!(
        objects("outputs/doomed").is_empty(),
        "left behind: {:?}",
        objects("outputs/doomed")
    );
    assert_eq!(open_uploads(), 0, "no multipart upload left open");
}

#[test]
fn backlog_scales_to_max_then_to_zero_and_priority_jumps_the_queue() {
    let _c = cluster();
    // Workers of earlier tests (one of them is stopped mid-task on purpose) are not this test's business.
    let earlier: Vec<String> = pod_logs("default-worker")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let src = input("short", 3);
    wait_until("an idle pool", Duration::from_secs(60), || {
        live_workers("default") == 0
    });
    let mut all = String::new();
    for i in 0..29 {
        all.push_str(&job_yaml(&format!("bulk-{i:02}"), &src, ""));
        all.push_str("---\n");
    }
    kubectl_ok(&["apply", "-f", "-"], Some(&all));
    // A job queued behind the backlog, with a higher priority.
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&job_yaml("urgent", &src, "  priority: 100\n")),
    );
    let mut peak = 0;
    let t0 = Instant::now();
    let names: Vec<String> = (0..29)
        .map(|i| format!("bulk-{i:02}"))
        .chain(["urgent".to_string()])
        .collect();
    loop {
        peak = peak.max(live_workers("default"));
        let done = json(&["get", "tj", "-n", "default"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| {
                names.iter().any(|n| j["metadata"]["name"] == n.as_str())
                    && condition(j, "Complete")
            })
            .count();
        if done == names.len() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{done}/{} jobs done after 300 s",
            names.len()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "30 jobs: done in {:.1} s, peak workers {peak}",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(peak, 4, "scaled to the pool's max and not beyond");
    let pool = json(&["get", "wp", "default", "-n", "tessera-system"]);
    assert!(pool["status"]["desired"].as_u64().unwrap() <= 4);

    // The urgent job finished before most of the bulk queued ahead of it.
    let finished = |n: &str| {
        get_job(n).unwrap()["status"]["completionTime"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let urgent = finished("urgent");
    let later = (0..29)
        .filter(|i| finished(&format!("bulk-{i:02}")) > urgent)
        .count();
    eprintln!("urgent finished before {later} of the 29 bulk jobs submitted ahead of it");
    assert!(
        later >= 15,
        "only {later} bulk jobs finished after the urgent one"
    );

    // Back to zero after the cooldown; no worker was stopped while it held a task.
    wait_until("the pool to scale to zero", Duration::from_secs(60), || {
        live_workers("default") == 0
    });
    for (name, log) in pod_logs("default-worker")
        .into_iter()
        .filter(|(n, _)| !earlier.contains(n))
    {
        assert!(
            !log.contains("draining: letting the task finish"),
            "{name} was stopped while busy"
        );
    }
    let t1 = Instant::now();
    for n in &names {
        kubectl_ok(&["delete", "tj", n, "-n", "default", "--wait=false"], None);
    }
    // Only this test's jobs: another test's job may be in the namespace too.
    wait_until("the jobs to be gone", Duration::from_secs(60), || {
        json(&["get", "tj", "-n", "default"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| !names.iter().any(|n| j["metadata"]["name"] == n.as_str()))
    });
    eprintln!("30 jobs deleted in {:.1} s", t1.elapsed().as_secs_f64());
}

#[test]
fn a_pool_asking_for_more_gpus_than_exist_stays_pending_without_runaway_creation() {
    let _c = cluster();
    let src = input("short", 3);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: greedy, namespace: tessera-system}\nspec:\n  allowedNamespaces: {from: All}\n  \
             resource: {name: nvidia.com/gpu, count: 3}\n  minWorkers: 0\n  maxWorkers: 3\n  tolerations: [{key: nvidia.com/gpu, \
             operator: Exists, effect: NoSchedule}]\n  image: ghcr.io/tessera-dev/tessera-worker:0.1.0\n",
        ),
    );
    let mut many = String::new();
    for i in 0..6 {
        many.push_str(&job_yaml(
            &format!("greedy-{i}"),
            &src,
            "  pool: tessera-system/greedy\n",
        ));
        many.push_str("---\n");
    }
    kubectl_ok(&["apply", "-f", "-"], Some(&many));
    let pods = || worker_pods("greedy");
    wait_until("the pool's pods", Duration::from_secs(30), || {
        pods().len() == 3
    });
    // For several scaling passes: still 3 pods, all Pending (no node has 3 GPUs), none created beyond.
    for _ in 0..12 {
        let p = pods();
        assert_eq!(p.len(), 3, "pods: {}", p.len());
        assert!(p.iter().all(|p| p["status"]["phase"] == "Pending"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = json(&["get", "wp", "greedy", "-n", "tessera-system"])["status"].clone();
    assert_eq!(
        (st["desired"].as_u64(), st["pending"].as_u64()),
        (Some(3), Some(3)),
        "{st}"
    );
    for i in 0..6 {
        kubectl_ok(
            &[
                "delete",
                "tj",
                &format!("greedy-{i}"),
                "-n",
                "default",
                "--wait=false",
            ],
            None,
        );
    }
    kubectl_ok(&["delete", "wp", "greedy", "-n", "tessera-system"], None);
    wait_until("the greedy pods to go", Duration::from_secs(60), || {
        pods().is_empty()
    });
    wait_until("the greedy jobs to go", Duration::from_secs(60), || {
        (0..6).all(|i| get_job(&format!("greedy-{i}")).is_none())
    });
}

#[test]
fn killing_the_leader_mid_job_loses_no_finished_chunk() {
    let _c = cluster();
    let src = input("failover", 30);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&slow_job_yaml("failover", &src, "slow")),
    );
    wait_until("a few chunks to be done", Duration::from_secs(120), || {
        get_job("failover")
            .is_some_and(|j| j["status"]["progress"]["chunksDone"].as_u64().unwrap_or(0) >= 4)
    });
    let lease = json(&[
        "get",
        "lease",
        "tessera-operator-leader",
        "-n",
        "tessera-system",
    ]);
    let leader = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    kubectl_ok(
        &[
            "delete",
            "pod",
            &leader,
            "-n",
            "tessera-system",
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    wait_until("another replica to lead", Duration::from_secs(60), || {
        let l = json(&[
            "get",
            "lease",
            "tessera-operator-leader",
            "-n",
            "tessera-system",
        ]);
        l["spec"]["holderIdentity"]
            .as_str()
            .is_some_and(|h| h != leader)
    });
    let job = wait_complete("failover", Duration::from_secs(240));
    let chunks = job["status"]["progress"]["chunksTotal"].as_u64().unwrap() as usize;
    let n = encodes("failover");
    eprintln!("leader killed mid-job: {chunks} chunks, {n} encodes");
    assert_eq!(chunks, 30);
    // At most the chunks in flight when the leader died (one per worker) are encoded twice.
    assert!(
        n >= chunks && n <= chunks + 4,
        "{n} encodes for {chunks} chunks"
    );
    let out = ffprobe(&s3_dir().join("tessera/outputs/failover/small.mp4"));
    assert_eq!(out["streams"][0]["nb_read_frames"], "750");
    delete_job("failover");
}

#[test]
fn suspend_holds_a_job_and_ttl_deletes_it_after_it_finished() {
    let _c = cluster();
    let src = input("short", 3);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&job_yaml(
            "held",
            &src,
            "  suspend: true\n  ttlSecondsAfterFinished: 2\n",
        )),
    );
    wait_until("the suspended condition", Duration::from_secs(30), || {
        get_job("held").is_some_and(|j| {
            j["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| {
                    c["type"] == "Progressing"
                        && c["status"] == "False"
                        && c["reason"] == "Suspended"
                })
        })
    });
    // Held: nothing planned, nothing written, for a while.
    std::thread::sleep(Duration::from_secs(3));
    let j = get_job("held").unwrap();
    // Argo CD: Suspended, and the one action it offers is resume, which clears spec.suspend.
    let (health, message) = argocd::health("TranscodeJob", &j);
    assert_eq!(health, "Suspended", "{message}");
    // Flux: as Git asks, so Current (a Kustomization waiting on it goes on).
    assert_eq!(tessera_e2e::flux::health("TranscodeJob", &j), "Current");
    assert_eq!(argocd::actions(&j), ["resume"]);
    assert!(!argocd::suspend_after("resume", &j));
    assert_eq!(j["status"]["phase"], "Pending", "{}", j["status"]);
    assert!(j["status"]["progress"].is_null());
    assert!(objects("outputs/held").is_empty());
    kubectl_ok(
        &[
            "patch",
            "tj",
            "held",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"spec":{"suspend":false}}"#,
        ],
        None,
    );
    let t0 = Instant::now();
    let done = wait_complete("held", Duration::from_secs(120));
    let (health, message) = argocd::health("TranscodeJob", &done);
    assert_eq!(health, "Healthy", "{message}");
    assert_eq!(tessera_e2e::flux::health("TranscodeJob", &done), "Current");
    assert!(
        argocd::actions(&done).is_empty(),
        "a finished job has no actions"
    );
    // Idle again: no worker keeps the annotations that would block scale-down.
    wait_until(
        "idle workers to lose do-not-disrupt",
        Duration::from_secs(10),
        || {
            worker_pods("default")
                .iter()
                .all(|p| p["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"].is_null())
        },
    );
    assert!(objects("outputs/held")
        .iter()
        .any(|o| o.ends_with("small.mp4")));
    // ttlSecondsAfterFinished: gone about 2 s after completion; the outputs stay.
    wait_until(
        "the finished job to be deleted by its TTL",
        Duration::from_secs(30),
        || get_job("held").is_none(),
    );
    eprintln!(
        "suspend → resume → complete → TTL deletion in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(objects("outputs/held")
        .iter()
        .any(|o| o.ends_with("small.mp4")));
}

#[test]
fn a_worker_stopped_mid_task_finishes_it_before_it_exits() {
    let _c = cluster();
    let src = input("failover", 30);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&slow_job_yaml("drain", &src, "slow")),
    );
    let pod = wait_busy_worker("drain");
    // Argo CD while it encodes: Progressing, with suspend on offer; the pool is Healthy or Progressing as
    // its Ready condition says.
    let running = get_job("drain").unwrap();
    let (health, message) = argocd::health("TranscodeJob", &running);
    assert_eq!(health, "Progressing", "{message}");
    assert_eq!(
        tessera_e2e::flux::health("TranscodeJob", &running),
        "InProgress"
    );
    assert_eq!(argocd::actions(&running), ["suspend"]);
    assert!(argocd::suspend_after("suspend", &running));
    let pool = json(&["get", "wp", "default", "-n", "tessera-system"]);
    let ready = pool["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"] == "True")
        .expect("the pool's Ready condition");
    let (health, message) = argocd::health("WorkerPool", &pool);
    assert_eq!(
        health,
        if ready { "Healthy" } else { "Progressing" },
        "{message}"
    );
    assert_eq!(
        tessera_e2e::flux::health("WorkerPool", &pool),
        if ready { "Current" } else { "InProgress" }
    );
    // The busy worker: Burstable with the pool's default requests, and marked not to be disrupted by
    // Karpenter or the Cluster Autoscaler while it holds its lease.
    let worker = json(&["get", "pod", &pod, "-n", "tessera-system"]);
    assert_eq!(
        worker["status"]["qosClass"], "Burstable",
        "{}",
        worker["status"]
    );
    let requests = &worker["spec"]["containers"][0]["resources"]["requests"];
    assert_eq!(
        (requests["cpu"].as_str(), requests["memory"].as_str()),
        (Some("2"), Some("1Gi"))
    );
    wait_until(
        "the busy worker's do-not-disrupt annotations",
        Duration::from_secs(10),
        || {
            let a = &json(&["get", "pod", &pod, "-n", "tessera-system"])["metadata"]["annotations"];
            a["karpenter.sh/do-not-disrupt"] == "true"
                && a["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
        },
    );
    kubectl_ok(
        &[
            "delete",
            "pod",
            &pod,
            "-n",
            "tessera-system",
            "--wait=false",
        ],
        None,
    );
    let log = || pod_logs(&pod).pop().map(|(_, l)| l).unwrap_or_default();
    wait_until(
        "the worker to finish its task and stop",
        Duration::from_secs(90),
        || log().contains("worker stopped"),
    );
    let l = log();
    let drain_at = l
        .find("draining: letting the task finish")
        .expect("the worker drained its task");
    assert!(
        l[drain_at..].contains("task done"),
        "the task finished after SIGTERM:\n{l}"
    );
    assert!(!l.contains("drain time over"), "{l}");
    let job = wait_complete("drain", Duration::from_secs(240));
    let chunks = job["status"]["progress"]["chunksTotal"].as_u64().unwrap() as usize;
    assert_eq!(encodes("drain"), chunks, "no chunk lost or encoded twice");
    delete_job("drain");
}

/// The leader's `/metrics` text (its queue address is on the leader Lease).
fn leader_metrics() -> String {
    let url = kubectl_ok(
        &[
            "get",
            "lease",
            "tessera-operator-leader",
            "-n",
            "tessera-system",
            "-o",
            "jsonpath={.metadata.annotations.tessera\\.dev/queue-url}",
        ],
        None,
    );
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(tessera_e2e::load::metrics(url.trim()))
}

#[test]
fn identical_work_is_done_once_across_jobs() {
    let _c = cluster();
    // A pool like the default one, with a result store: chunks are filed there by content.
    let mut spec = json(&["get", "workerpool", "default", "-n", "tessera-system"])["spec"].clone();
    spec["resultStore"] = "s3://tessera/results/{namespace}/".into();
    let pool = serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "WorkerPool",
        "metadata": {"name": "reuse", "namespace": "tessera-system"}, "spec": spec});
    kubectl_ok(&["apply", "-f", "-"], Some(&pool.to_string()));
    let src = input("reuse6", 6);
    let on_pool = "  pool: tessera-system/reuse\n";
    let job = |name: &str| job_yaml(name, &src, on_pool);
    let chunks_of = |name: &str| {
        get_job(name).unwrap()["status"]["progress"]["chunksTotal"]
            .as_u64()
            .unwrap() as usize
    };
    let reused_of = |name: &str| {
        get_job(name).unwrap()["status"]["progress"]["reused"]
            .as_u64()
            .unwrap_or(0) as usize
    };

    // Two identical jobs at once: each chunk is encoded once, and both get the same outputs.
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!("{}---\n{}", job("twin-a"), job("twin-b"))),
    );
    wait_complete("twin-a", Duration::from_secs(120));
    wait_complete("twin-b", Duration::from_secs(120));
    let chunks = chunks_of("twin-a");
    assert!(chunks > 1, "the input is cut into chunks ({chunks})");
    assert_eq!(
        chunks_of("twin-b"),
        chunks,
        "identical jobs, identical plans"
    );
    let (a, b) = (rendition_encodes("twin-a"), rendition_encodes("twin-b"));
    assert_eq!(a + b, chunks, "encodes of two identical jobs: {a} + {b}");
    assert_eq!(reused_of("twin-a") + reused_of("twin-b"), chunks);
    let out = |name: &str| {
        std::fs::read(s3_dir().join(format!("tessera/outputs/{name}/small.mp4"))).unwrap()
    };
    assert!(
        out("twin-a") == out("twin-b"),
        "identical jobs give identical outputs"
    );
    assert_eq!(
        ffprobe(&s3_dir().join("tessera/outputs/twin-b/small.mp4"))["streams"][0]["nb_read_frames"],
        "150"
    );

    // The same job re-created after its deletion (what a GitOps tool's self-heal does after the TTL):
    // nothing is encoded.
    delete_job("twin-a");
    kubectl_ok(&["apply", "-f", "-"], Some(&job("twin-a")));
    wait_complete("twin-a", Duration::from_secs(120));
    assert_eq!(rendition_encodes("twin-a"), a, "re-created: no encode");
    assert_eq!(reused_of("twin-a"), chunks);

    // The same input with one more rendition: only that rendition is encoded.
    let more = job("twin-c").replace(
        "  chunking:",
        "    - {name: tiny, video: {codec: h264, height: 90, crf: 30, preset: ultrafast}}\n  chunking:",
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&more));
    wait_complete("twin-c", Duration::from_secs(120));
    assert_eq!(
        rendition_encodes("twin-c"),
        chunks,
        "only the new rendition"
    );
    assert_eq!(
        out("twin-c"),
        out("twin-b"),
        "the shared rendition is the same"
    );
    // The leader counts what it did not have encoded again.
    let metrics = leader_metrics();
    let reused = tessera_e2e::load::metric(&metrics, "tessera_chunks_reused_total", "");
    assert!(
        reused.is_some_and(|n| n >= (2 * chunks) as f64),
        "tessera_chunks_reused_total {reused:?} for {chunks} chunks reused by the twins and {chunks} by the re-created job"
    );
    eprintln!("reuse: {chunks} chunks; twins encoded {a} + {b}; re-created 0; one more rendition {chunks}");
    for name in ["twin-a", "twin-b", "twin-c"] {
        delete_job(name);
    }
    kubectl_ok(
        &["delete", "workerpool", "reuse", "-n", "tessera-system"],
        None,
    );
}

/// A result store keeps results for the pool's retention after their last use: a result older than that
/// is encoded again rather than taken (it could be collected under the job), and a collection that runs
/// with a later job's stitch deletes what no job has used since, keeping what is still in use.
#[test]
fn a_result_store_is_collected_after_its_retention() {
    let _c = cluster();
    const RETENTION: u64 = 6;
    let mut spec = json(&["get", "workerpool", "default", "-n", "tessera-system"])["spec"].clone();
    spec["resultStore"] = "s3://tessera/collect/{namespace}/".into();
    spec["resultRetentionSeconds"] = RETENTION.into();
    let pool = serde_json::json!({"apiVersion": "tessera.dev/v1alpha1", "kind": "WorkerPool",
        "metadata": {"name": "collect", "namespace": "tessera-system"}, "spec": spec});
    kubectl_ok(&["apply", "-f", "-"], Some(&pool.to_string()));
    let src = input("collect4", 4);
    let on_pool = "  pool: tessera-system/collect\n";
    let job = |name: &str, crf: u32| {
        job_yaml(name, &src, on_pool).replace("crf: 30", &format!("crf: {crf}"))
    };
    let store = s3_dir().join("tessera/collect/default/chunks");
    let results = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(&store)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tpk"))
            .collect()
    };

    kubectl_ok(&["apply", "-f", "-"], Some(&job("gc-x", 30)));
    wait_complete("gc-x", Duration::from_secs(120));
    let x = results();
    let chunks = get_job("gc-x").unwrap()["status"]["progress"]["chunksTotal"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(x.len(), chunks, "one result per chunk: {x:?}");
    kubectl_ok(&["apply", "-f", "-"], Some(&job("gc-y", 31)));
    wait_complete("gc-y", Duration::from_secs(120));
    let y: std::collections::BTreeSet<String> = results().difference(&x).cloned().collect();
    assert_eq!(y.len(), chunks, "another crf, other results");

    // Let every result pass its retention (the store's times are its files' times here).
    let age = |n: &String| {
        std::fs::metadata(store.join(n))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default()
    };
    wait_until(
        "every result to pass its retention",
        Duration::from_secs(30),
        || {
            results()
                .iter()
                .all(|n| age(n) > Duration::from_secs(RETENTION + 1))
        },
    );

    // gc-y again: its results are past their retention, so they are encoded again, not taken; the
    // collection that runs with its stitch deletes gc-x's (used by no job since) and keeps gc-y's.
    let before = rendition_encodes("gc-y");
    delete_job("gc-y");
    kubectl_ok(&["apply", "-f", "-"], Some(&job("gc-y", 31)));
    wait_complete("gc-y", Duration::from_secs(120));
    assert_eq!(
        rendition_encodes("gc-y") - before,
        chunks,
        "results past their retention are encoded again"
    );
    wait_until(
        "the collection to delete gc-x's results",
        Duration::from_secs(60),
        || results().is_disjoint(&x),
    );
    assert_eq!(results(), y, "gc-y's results, just made again, are kept");
    assert_eq!(
        ffprobe(&s3_dir().join("tessera/outputs/gc-y/small.mp4"))["streams"][0]["nb_read_frames"],
        "100"
    );
    let metrics = leader_metrics();
    let collected = tessera_e2e::load::metric(&metrics, "tessera_results_collected_total", "");
    assert!(
        collected.is_some_and(|n| n >= chunks as f64),
        "tessera_results_collected_total {collected:?} after {chunks} results expired"
    );
    eprintln!("collect: {chunks} results of gc-x collected, {chunks} of gc-y encoded again after {RETENTION} s and kept");
    for name in ["gc-x", "gc-y"] {
        delete_job(name);
    }
    kubectl_ok(
        &["delete", "workerpool", "collect", "-n", "tessera-system"],
        None,
    );
}

/// A job with several audio tracks and subtitles, packaged as CMAF with thumbnails, runs through the plan,
/// chunk, audio and stitch tasks as it does in local mode: the status lists every stream, and dash.js plays
/// the published MPD from the bucket with every track.
#[test]
fn every_track_reaches_cmaf_outputs_on_the_cluster() {
    let _c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let srt = dir.path().join("en.srt");
    std::fs::write(
        &srt,
        "1\n00:00:00,500 --> 00:00:02,500\nHello\n\n2\n00:00:03,000 --> 00:00:03,800\nBye\n",
    )
    .unwrap();
    let file = dir.path().join("tracks.mkv");
    let st = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=4",
        ])
        .args(["-f", "lavfi", "-i", "sine=f=440:d=4:sample_rate=48000"])
        .args([
            "-f",
            "lavfi",
            "-i",
            "sine=f=220:d=4:sample_rate=48000,aformat=channel_layouts=5.1",
        ])
        .arg("-i")
        .arg(&srt)
        .args([
            "-map",
            "0",
            "-map",
            "1",
            "-map",
            "2",
            "-map",
            "3",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .args([
            "-g", "25", "-pix_fmt", "yuv420p", "-c:a", "aac", "-c:s", "srt",
        ])
        .args([
            "-metadata:s:a:0",
            "language=eng",
            "-metadata:s:a:1",
            "language=fre",
        ])
        .args(["-metadata:s:s:0", "language=eng"])
        .arg(&file)
        .status()
        .expect("ffmpeg runs");
    assert!(st.success());
    let src = tessera_e2e::jobs::upload(&file, "inputs/tracks.mkv");
    let yaml = job_yaml(
        "tracks",
        &src,
        "  thumbnails: {intervalSeconds: 1, width: 64}\n",
    )
    .replace(
        "output: {uri: \"s3://tessera/outputs/tracks/\"}",
        "output: {uri: \"s3://tessera/outputs/tracks/\", container: cmaf}",
    );
    assert!(yaml.contains("container: cmaf"), "{yaml}");
    kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
    let job = wait_complete("tracks", Duration::from_secs(120));
    let status = &job["status"];
    assert_eq!(
        status["manifest"], "s3://tessera/outputs/tracks/manifest.mpd",
        "{status}"
    );
    assert_eq!(
        status["masterPlaylist"], "s3://tessera/outputs/tracks/master.m3u8",
        "{status}"
    );
    assert_eq!(
        status["thumbnails"], "s3://tessera/outputs/tracks/_thumbnails/thumbnails.vtt",
        "{status}"
    );
    let streams: Vec<String> = status["renditions"][0]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {} {}",
                s["kind"].as_str().unwrap(),
                s["codec"].as_str().unwrap(),
                s["language"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        streams,
        [
            "video h264 -",
            "audio aac eng",
            "audio aac fre",
            "subtitle webvtt eng"
        ],
        "{status}"
    );
    let out = s3_dir().join("tessera/outputs/tracks");
    for f in [
        "master.m3u8",
        "manifest.mpd",
        "small/init.mp4",
        "small/iframes.m3u8",
        "_subtitles-3/all.vtt",
        "_thumbnails/sprite_001.jpg",
    ] {
        assert!(out.join(f).is_file(), "{f} published");
    }
    // dash.js plays what the bucket holds.
    let r = tessera_e2e::players::play("dash", &out, "manifest.mpd", &[]);
    assert_eq!(
        (r["ended"].as_bool(), r["frames"].as_u64()),
        (Some(true), Some(100)),
        "{r}"
    );
    let langs: Vec<&str> = r["audio"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["lang"].as_str())
        .collect();
    assert_eq!(langs, ["en", "fr"], "{r}");
    assert_eq!(r["text"][0]["lang"], "en", "{r}");
    delete_job("tracks");
}

/// A ladder on the cluster: the plan task measures it once and records it; the rungs are renditions the
/// chunk and stitch tasks run like the listed one; the status reports the ladder.
#[test]
fn a_ladder_is_measured_once_by_the_plan_and_its_rungs_run_on_the_cluster() {
    let _c = cluster();
    let src = input("ladder4", 4);
    let yaml = job_yaml(
        "laddered",
        &src,
        "  ladder: {codec: h264, targetQuality: {vmaf: 90}, preset: ultrafast, maxRungs: 3}\n",
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&yaml));
    let job = wait_complete("laddered", Duration::from_secs(180));
    let status = &job["status"];
    let rungs = status["ladder"]["rungs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!rungs.is_empty() && rungs.len() <= 3, "{status}");
    let names: Vec<&str> = status["renditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let mut expected = vec!["small"];
    expected.extend(rungs.iter().map(|r| r["name"].as_str().unwrap()));
    assert_eq!(
        names, expected,
        "the listed rendition, then the rungs: {status}"
    );
    for r in &rungs {
        let v = ffprobe(&s3_dir().join(format!(
            "tessera/outputs/laddered/{}.mp4",
            r["name"].as_str().unwrap()
        )));
        assert_eq!(v["streams"][0]["height"], r["height"], "{v}");
        assert_eq!(v["streams"][0]["nb_read_frames"], "100", "{v}");
    }
    // Measured once: by the plan task, never by a chunk or stitch task.
    let measured = pod_logs("-worker-")
        .iter()
        .flat_map(|(_, log)| log.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.contains("job=default/laddered") && l.contains(" ladder chosen "))
        .count();
    assert_eq!(measured, 1, "one ladder measurement");
    assert_eq!(input_probes("laddered"), 1);
    let ready = json(&["get", "tj", "laddered", "-n", "default"]);
    let msg = ready["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Complete")
        .map(|c| c["message"].clone());
    assert_eq!(
        msg,
        Some(Value::from(format!(
            "{} renditions published",
            expected.len()
        ))),
        "{ready}"
    );
    delete_job("laddered");
}

fn helm(args: &[&str]) -> std::process::Output {
    std::process::Command::new(
        tessera_e2e::s3server::cache_dir().join("kubectl-helm-2.2.2/bin/helm"),
    )
    .env(
        "KUBECONFIG",
        tessera_e2e::cluster::e2e_dir().join("kubeconfig"),
    )
    .args(args)
    .output()
    .expect("helm runs")
}

fn helm_ok(args: &[&str]) -> String {
    let out = helm(args);
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm upgrade` brings an older CRD up to this chart's (its pre-upgrade hook applies the CRDs the operator
/// was built with; Helm itself never updates crds/), then `helm test` runs a real job through the release.
#[test]
fn helm_upgrade_applies_the_new_crds_and_helm_test_runs_a_job() {
    let _c = cluster();
    // An older CRD in the cluster: another description, no Pool column.
    let crd = "transcodejobs.tessera.dev";
    let mut old = json(&["get", "crd", crd]);
    for k in [
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "generation",
    ] {
        old["metadata"].as_object_mut().unwrap().remove(k);
    }
    old.as_object_mut().unwrap().remove("status");
    let version = &mut old["spec"]["versions"][0];
    version["schema"]["openAPIV3Schema"]["description"] = "an older Tessera".into();
    version["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "Pool");
    kubectl_ok(&["replace", "-f", "-"], Some(&old.to_string()));
    let now = |crd: &str| json(&["get", "crd", crd])["spec"]["versions"][0].clone();
    assert_eq!(
        now(crd)["schema"]["openAPIV3Schema"]["description"],
        "an older Tessera"
    );

    let chart = root().join("charts/tessera");
    helm_ok(&[
        "upgrade",
        "tessera",
        chart.to_str().unwrap(),
        "-n",
        "tessera-system",
        "--reuse-values",
        "--set",
        "tests.location=s3://tessera/helm-test/",
    ]);
    let v = now(crd);
    let want: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("crds/pre-cel/transcodejob.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        v["schema"]["openAPIV3Schema"]["description"],
        want["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"],
        "the upgrade applied the chart's CRD"
    );
    assert!(
        v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "Pool"),
        "the Pool column is back: {}",
        v["additionalPrinterColumns"]
    );
    assert!(
        !v.to_string().contains("x-kubernetes-validations"),
        "a 1.20 server gets the CRD without CEL rules"
    );
    // The hook's Job went once it succeeded; the operator was not restarted by an unchanged upgrade.
    assert!(!kubectl(
        &["get", "job", "tessera-crds", "-n", "tessera-system"],
        None
    )
    .status
    .success());

    let out = helm(&["test", "tessera", "-n", "tessera-system", "--timeout", "5m"]);
    let logs: String = pod_logs("tessera-test")
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    assert!(
        out.status.success(),
        "helm test: {}{}\n{logs}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.contains("ok: WorkerPool tessera-system/default is Ready"),
        "{logs}"
    );
    assert!(logs.contains("Succeeded"), "{logs}");
    // The test left nothing: its job is gone, and so is every object under its prefix.
    let left = json(&[
        "get",
        "tj",
        "-n",
        "default",
        "-l",
        "app.kubernetes.io/name=tessera-helm-test",
    ]);
    assert_eq!(left["items"].as_array().unwrap().len(), 0, "{left}");
    assert!(
        objects("helm-test/").is_empty(),
        "{:?}",
        objects("helm-test/")
    );
}

/// A second release beside the first in the same namespace serves only its own pool: its job runs once,
/// on its workers, and the first release's operator never queues it.
#[test]
fn two_releases_side_by_side_each_serve_their_own_pools() {
    let _c = cluster();
    let env = tessera_e2e::cluster::env_file();
    let endpoint = env
        .iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .unwrap()
        .1
        .clone();
    let chart = root().join("charts/tessera");
    helm_ok(&[
        "install",
        "canary",
        chart.to_str().unwrap(),
        "-n",
        "tessera-system",
        "--skip-crds",
        "--set",
        "operator.primary=false",
        "--set",
        "operator.replicas=1",
        "--set",
        "defaultPool.name=canary",
        "--set",
        "defaultPool.cooldownSeconds=60",
        "--set",
        &format!("s3.endpoint={endpoint}"),
        "--set",
        "s3.credentialsSecret=tessera-s3",
        "--set-string",
        "defaultPool.nodeSelector.tessera\\.dev/gpu=true",
    ]);
    wait_until(
        "the canary operator to lead",
        Duration::from_secs(60),
        || {
            !kubectl(
                &[
                    "get",
                    "lease",
                    "canary-tessera-operator-leader",
                    "-n",
                    "tessera-system",
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ],
                None,
            )
            .stdout
            .is_empty()
        },
    );
    let src = input("canary4", 4);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&job_yaml("canary", &src, "  pool: tessera-system/canary\n")),
    );
    let job = wait_complete("canary", Duration::from_secs(120));
    let chunks = job["status"]["progress"]["chunksTotal"].as_u64().unwrap() as usize;
    assert!(chunks >= 2);
    assert_eq!(
        encodes("canary"),
        chunks,
        "every chunk encoded exactly once"
    );
    // The canary's workers ran it; the first release's operator neither queued it nor wrote its pool.
    assert!(!worker_pods("canary").is_empty());
    let primary = leader_metrics();
    assert!(
        !primary.contains("tessera-system/canary"),
        "the primary operator knows nothing of the canary's pool:\n{primary}"
    );
    // Each worker serves /metrics on its pod IP: the chunks it encoded are counted there.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut frames = 0.0;
    let mut worker_text = String::new();
    for pod in worker_pods("canary") {
        let ip = pod["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let text = rt.block_on(tessera_e2e::load::metrics(&format!("http://{ip}:9090")));
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("tessera_worker_frames_encoded_total ") {
                frames += v.trim().parse::<f64>().unwrap();
            }
        }
        worker_text.push_str(&text);
    }
    assert!(
        frames >= job["status"]["renditions"][0]["frames"].as_f64().unwrap(),
        "the canary's workers count the frames they encoded ({frames}):\n{worker_text}"
    );
    assert!(worker_text.contains(r#"tessera_worker_tasks_total{kind="chunk",outcome="completed"}"#));
    // Every metric the chart's alerts and dashboard query is one the operator or a worker really exports.
    let mut declared = tessera_e2e::monitoring::declared_names(&primary);
    declared.extend(tessera_e2e::monitoring::declared_names(&worker_text));
    let docs: Vec<Value> = helm_ok(&[
        "template",
        "tessera",
        chart.to_str().unwrap(),
        "-n",
        "tessera-system",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "podMonitor.enabled=true",
    ])
    .split("\n---")
    .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
    .filter(|v| !v.is_null())
    .collect();
    let queries = tessera_e2e::monitoring::chart_queries(&docs);
    assert!(queries.len() >= 10);
    for (at, q) in queries {
        for name in tessera_e2e::monitoring::promql_metric_names(&q) {
            assert!(
                declared.contains(&name),
                "{at}: {name} is not exported by the operator:\n{q}\nexported: {declared:?}\n{primary}"
            );
        }
    }
    let pool = json(&["get", "workerpool", "canary", "-n", "tessera-system"]);
    assert_eq!(
        pool["metadata"]["labels"]["tessera.dev/operator"],
        "canary-tessera"
    );
    assert!(pool["status"]["conditions"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    delete_job("canary");
    helm_ok(&["uninstall", "canary", "-n", "tessera-system", "--wait"]);
    wait_until(
        "the canary's workers to go",
        Duration::from_secs(60),
        || live_workers("canary") == 0,
    );
}
