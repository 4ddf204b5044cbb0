//! `make bench-operator`: the operator's speed, against the local cluster (`scripts/cluster.sh up`, chart
//! installed). A WorkerPool with `maxWorkers: 0` gets no pods; this program is its worker instead, with a
//! real ServiceAccount token, so the figures are the operator's own: API server → controller → queue → HTTP.
//!
//! 1. `kubectl apply` → first task leased, p50/p95 over 50 jobs (a worker long-polling, as real ones do);
//! 2. 200 jobs created at once → all planned and queued: seconds, and API-server requests per job;
//! 3. the queue API alone (in this process, over loopback HTTP) with 500 concurrent workers: leases per
//!    second and p99 latency;
//! 4. status writes per job per second while 100 (and 1,000) chunks complete.
//!
//! Writes `bench/results/operator.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{json, Value};
use tessera_crds::protocol::{
    Call, CompleteRequest, FailRequest, LeaseRequest, LeasedTask, TaskResult,
};
use tessera_crds::work::{ChunkResult, StitchResult, TaskFailure, WorkKind};
use tessera_e2e::cluster::{kubectl_ok, root};

use tessera_e2e::load::{http, pct, sample_plan, sample_work, Client};

/// A queue call with its protocol types; the benchmark stops on an unreachable queue or unreadable reply.
async fn post<T: Call>(c: &Client, url: &str, token: &str, msg: &T) -> (u16, Option<T::Reply>) {
    tessera_e2e::load::call(c, url, token, msg)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

fn lease(wait_ms: u64) -> LeaseRequest {
    LeaseRequest {
        worker: "bench".into(),
        wait_ms,
    }
}

/// End a task this benchmark does not run.
fn benchmark_failure(message: &str) -> FailRequest {
    FailRequest {
        worker: "bench".into(),
        failure: TaskFailure {
            reason: "Benchmark".into(),
            message: message.into(),
            retryable: false,
        },
        seconds: 0.0,
    }
}

fn completion(result: TaskResult) -> CompleteRequest {
    CompleteRequest {
        worker: "bench".into(),
        result,
        seconds: 0.01,
    }
}

fn job(name: &str) -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "TranscodeJob",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "input": {"uri": "s3://tessera/inputs/none.mp4"},
            "output": {"uri": format!("s3://tessera/bench/{name}/")},
            "renditions": [{"name": "a", "video": {"codec": "h264"}}],
            "pool": "tessera-system/bench"
        }
    })
}

async fn queue_url(client: &kube::Client) -> String {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "tessera-system");
    let l = leases
        .get("tessera-operator-leader")
        .await
        .expect("leader lease");
    l.metadata.annotations.unwrap()["tessera.dev/queue-url"].clone()
}

async fn metric(base: &str, name: &str, filter: &str) -> f64 {
    tessera_e2e::load::metric(&tessera_e2e::load::metrics(base).await, name, filter).unwrap_or(0.0)
}

async fn apiserver_requests(client: &kube::Client) -> f64 {
    let req = hyper::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.expect("apiserver metrics");
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let kc =
        kube::config::Kubeconfig::read_from(tessera_e2e::cluster::e2e_dir().join("kubeconfig"))
            .expect("cluster is up");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(cfg).unwrap();
    let _ = tessera_e2e::cluster::kubectl(&["create", "namespace", "bench"], None);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: bench, namespace: tessera-system}\nspec:\n  allowedNamespaces: {from: All}\n  \
             minWorkers: 0\n  maxWorkers: 0\n  serviceAccountName: tessera-worker\n",
        ),
    );
    let token = kubectl_ok(
        &[
            "create",
            "token",
            "tessera-worker",
            "-n",
            "tessera-system",
            &format!("--audience={}", tessera_crds::protocol::QUEUE_AUDIENCE),
        ],
        None,
    )
    .trim()
    .to_string();
    let base = queue_url(&client).await;
    let c = http();
    let lease_url = format!("{base}/v1/pools/tessera-system/bench/lease");
    // The pool is known to the queue API after the operator's next pool pass.
    let t = Instant::now();
    loop {
        let (s, _) = post(&c, &lease_url, &token, &lease(0)).await;
        if s == 204 || s == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "queue API refuses the bench pool: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let jobs = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        "bench",
        &kube::api::ApiResource {
            group: "tessera.dev".into(),
            version: "v1alpha1".into(),
            api_version: "tessera.dev/v1alpha1".into(),
            kind: "TranscodeJob".into(),
            plural: "transcodejobs".into(),
        },
    );
    let create = |name: String| {
        let jobs = jobs.clone();
        async move {
            let obj: kube::api::DynamicObject = serde_json::from_value(job(&name)).unwrap();
            jobs.create(&PostParams::default(), &obj)
                .await
                .expect("job created");
        }
    };
    let delete_all = || async {
        let _ = jobs
            .delete_collection(&DeleteParams::default(), &Default::default())
            .await;
        let t = Instant::now();
        while !jobs
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
        {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "bench jobs not deleted"
            );
            // This program is the pool's only worker: it runs the deleted jobs' cleanup tasks (their
            // ledgers hold nothing here) and ends anything else.
            let (_, reply) = post(&c, &lease_url, &token, &lease(200)).await;
            if let Some(r) = reply {
                let url = format!("{base}/v1/tasks/{}", r.task.id);
                if r.task.work.kind == WorkKind::Cleanup {
                    let done = TaskResult::Cleanup(Default::default());
                    post(&c, &format!("{url}/complete"), &token, &completion(done)).await;
                } else {
                    let end = benchmark_failure("left over");
                    post(&c, &format!("{url}/fail"), &token, &end).await;
                }
            }
        }
    };

    // 1. apply → first lease.
    let mut lat = Vec::new();
    for i in 0..50 {
        let c2 = c.clone();
        let (u, t2) = (lease_url.clone(), token.clone());
        let waiter = tokio::spawn(async move { post(&c2, &u, &t2, &lease(20_000)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        create(format!("lat-{i:02}")).await;
        let (s, body) = waiter.await.unwrap();
        let dt = t0.elapsed().as_secs_f64() * 1000.0;
        let task = body.unwrap_or_else(|| panic!("lease answered {s}")).task;
        assert_eq!(task.job, format!("lat-{i:02}"));
        lat.push(dt);
        // Nothing to plan here: end the job so its task is not handed out again.
        post(
            &c,
            &format!("{base}/v1/tasks/{}/fail", task.id),
            &token,
            &benchmark_failure("benchmark job"),
        )
        .await;
    }
    let (p50, p95) = (pct(&mut lat, 0.5), pct(&mut lat, 0.95));
    eprintln!("apply → first lease: p50 {p50:.0} ms, p95 {p95:.0} ms");
    delete_all().await;

    // 2. 200 at once → all planned and queued.
    let before = apiserver_requests(&client).await;
    let queued_before = metric(&base, "tessera_queue_queued_tasks", "tessera-system/bench").await;
    let t0 = Instant::now();
    stream::iter((0..200).map(|i| create(format!("burst-{i:03}"))))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let created = t0.elapsed().as_secs_f64();
    loop {
        let q = metric(&base, "tessera_queue_queued_tasks", "tessera-system/bench").await;
        if q - queued_before >= 200.0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "only {q} queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let burst = t0.elapsed().as_secs_f64();
    let requests = apiserver_requests(&client).await - before;
    eprintln!("200 jobs: created in {created:.2} s, all queued in {burst:.2} s, {requests} API requests ({:.1}/job)", requests / 200.0);
    delete_all().await;

    // 4. status writes while chunks complete.
    let mut status = Vec::new();
    for chunks in [100u32, 1000] {
        let name = format!("status-{chunks}");
        let writes0 = metric(&base, "tessera_status_writes_total", "").await;
        create(name.clone()).await;
        // Lease the next task of this job (anything else left over is ended).
        let next = |kind: WorkKind| {
            let (c, lease_url, token, base, name) = (
                c.clone(),
                lease_url.clone(),
                token.clone(),
                base.clone(),
                name.clone(),
            );
            async move {
                loop {
                    let (s, body) = post(&c, &lease_url, &token, &lease(20_000)).await;
                    let task: LeasedTask = body
                        .unwrap_or_else(|| panic!("a {kind:?} task for {name}: {s}"))
                        .task;
                    if task.job == name && task.work.kind == kind {
                        return task.id;
                    }
                    post(
                        &c,
                        &format!("{base}/v1/tasks/{}/fail", task.id),
                        &token,
                        &benchmark_failure("not this benchmark's task"),
                    )
                    .await;
                }
            }
        };
        let id = next(WorkKind::Plan).await;
        post(
            &c,
            &format!("{base}/v1/tasks/{id}/complete"),
            &token,
            &completion(sample_plan(chunks, false)),
        )
        .await;
        // Chunks complete evenly over about 5 s, as they would on a busy pool.
        let t0 = Instant::now();
        let pace = Duration::from_secs(5) / chunks;
        for i in 0..chunks {
            tokio::time::sleep_until((t0 + pace * i).into()).await;
            let id = next(WorkKind::Chunk).await;
            let encoded = ChunkResult {
                frames: 25,
                reused: false,
                seconds: 0.01,
                renditions: vec![],
            };
            post(
                &c,
                &format!("{base}/v1/tasks/{id}/complete"),
                &token,
                &completion(TaskResult::Chunk(encoded)),
            )
            .await;
        }
        let encode_secs = t0.elapsed().as_secs_f64();
        let id = next(WorkKind::Stitch).await;
        post(
            &c,
            &format!("{base}/v1/tasks/{id}/complete"),
            &token,
            &completion(TaskResult::Stitch(StitchResult::default())),
        )
        .await;
        let t = Instant::now();
        loop {
            let j = jobs.get(&name).await.unwrap();
            if j.data["status"]["phase"] == "Succeeded" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let total = t0.elapsed().as_secs_f64();
        let writes = metric(&base, "tessera_status_writes_total", "").await - writes0;
        eprintln!("{chunks} chunks completed in {encode_secs:.2} s: {writes} status writes in {total:.2} s ({:.2}/s)", writes / total);
        status.push(json!({"chunks": chunks, "chunkSeconds": encode_secs, "jobSeconds": total, "statusWrites": writes,
            "writesPerSecond": writes / total}));
    }
    delete_all().await;

    // 3. the queue API alone.
    let queue = queue_api_bench().await;

    let out = json!({
        "machine": "2-core shared VM, local cluster (Kubernetes 1.20.2 built from Debian's source, fake kubelet)",
        "applyToFirstLeaseMs": {"p50": p50, "p95": p95, "n": 50, "goalP50": 300},
        "burst200": {"createSeconds": created, "allQueuedSeconds": burst, "apiRequests": requests,
            "apiRequestsPerJob": requests / 200.0,
            "note": "requests counted by kube-apiserver (apiserver_request_total), including this program's 200 creates"},
        "queueApi": queue,
        "statusWrites": status,
    });
    let dir = root().join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("operator.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}

/// Accepts one fixed token as the pool's account (the TokenReview answer is cached per token in
/// production, so this measures the queue API itself).
struct Fixed;
impl tessera_operator::api::Authenticator for Fixed {
    fn authenticate<'a>(&'a self, token: &'a str) -> tessera_operator::api::AuthFuture<'a> {
        Box::pin(async move {
            (token == "bench-token")
                .then(|| tessera_operator::api::Identity {
                    username: "system:serviceaccount:ns:w".into(),
                })
                .ok_or_else(|| "bad token".to_string())
        })
    }
}

async fn queue_api_bench() -> Value {
    use tessera_operator::api::{router, PoolAccess, QueueApi};
    use tessera_operator::core::{Cmd, Core};
    use tessera_operator::queue::{QueueConfig, Task};
    let mut core = Core::new(QueueConfig::default());
    let n_tasks = 400_000u64;
    let work = sample_work(WorkKind::Chunk, "j", Some(1));
    for id in 1..=n_tasks {
        core.queue_mut().enqueue(
            Task {
                id,
                pool: "ns/p".into(),
                namespace: format!("ns{}", id % 7),
                job: format!("j{}", id % 1000),
                priority: (id % 3) as i32,
                coalesce: None,
                work: work.clone(),
            },
            0,
        );
    }
    let mut access = PoolAccess::default();
    access
        .pools
        .insert("ns/p".into(), ("ns".into(), "w".into()));
    core.apply(Cmd::SetAccess(access));
    let core = core.spawn();
    core.shared
        .leader
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let app = router(Arc::new(QueueApi {
        core,
        auth: Box::new(Fixed),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let c = http();
    let workers = 500;
    // Two runs: flat out (each worker leases again as soon as it completed), and paced so the 500 workers
    // together ask for 10,000 leases a second (the goal's rate), where latency is what a worker sees.
    let flat = run_workers(&c, addr, workers, Duration::from_secs(8), None).await;
    let paced = run_workers(
        &c,
        addr,
        workers,
        Duration::from_secs(10),
        Some(Duration::from_millis(50)),
    )
    .await;
    json!({"workers": workers, "flatOut": flat, "paced10k": paced,
        "goal": {"leasesPerSecond": 10000, "p99Ms": 10},
        "note": "in-process axum server over loopback HTTP/1.1 with keep-alive; every lease is followed by a complete; the 500 client tasks share the 2 cores with the server"})
}

async fn run_workers(
    c: &Client,
    addr: std::net::SocketAddr,
    workers: usize,
    dur: Duration,
    every: Option<Duration>,
) -> Value {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let name = format!("w{w}");
                let lease = format!("http://{addr}/v1/pools/ns/p/lease");
                // Spread the paced workers' starts over one period.
                let mut due = tokio::time::Instant::now()
                    + every.map_or(Duration::ZERO, |e| e.mul_f64(w as f64 / 500.0));
                while t0.elapsed() < dur {
                    if let Some(e) = every {
                        tokio::time::sleep_until(due).await;
                        due += e;
                    }
                    let t = Instant::now();
                    let ask = LeaseRequest {
                        worker: name.clone(),
                        wait_ms: 0,
                    };
                    let (s, body) = post(&c, &lease, "bench-token", &ask).await;
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    let Some(reply) = body.filter(|_| s == 200) else {
                        break;
                    };
                    let done = CompleteRequest {
                        worker: name.clone(),
                        result: TaskResult::Chunk(ChunkResult::default()),
                        seconds: 0.0,
                    };
                    post(
                        &c,
                        &format!("http://{addr}/v1/tasks/{}/complete", reply.task.id),
                        "bench-token",
                        &done,
                    )
                    .await;
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    let leases = lat.len() as f64;
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    eprintln!(
        "queue API, {workers} workers{}: {:.0} leases/s, p50 {p50:.2} ms, p99 {p99:.2} ms",
        if every.is_some() {
            " paced"
        } else {
            " flat out"
        },
        leases / secs
    );
    json!({"seconds": secs, "leases": leases, "leasesPerSecond": leases / secs,
        "requestsPerSecond": 2.0 * leases / secs, "latencyMs": {"p50": p50, "p99": p99}})
}
