//! Load on the operator: many TranscodeJobs through the real API server and controller, served by many
//! simulated workers over the real queue API (with a real ServiceAccount token), so what is measured is the
//! operator's own cost: reconciles, status writes, queue, finalizers. The workers do no media work; each
//! task takes 20–100 ms, sends one heartbeat and completes with a result of the right shape.
//!
//! Used by `tests/load.rs` (500 jobs at once, 1,000 workers, in `make test`) and its soak (`make test-long`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Http;
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::{json, Value};
use tessera_crds::protocol::{
    decode, Call, CleanupResult, CompleteRequest, HeartbeatRequest, LeaseRequest, TaskResult,
};
use tessera_crds::work::{
    ChunkPlan, ChunkResult, PlanRecord, PlanResult, StitchResult, TaskProgress, Work, WorkKind,
};

use crate::cluster::{e2e_dir, kubectl, kubectl_ok};

pub const NAMESPACE: &str = "load";
pub const POOL: &str = "load";

pub type Client = Http<HttpConnector, Full<Bytes>>;

/// Raise this process's open-file limit to its hard limit: 1,000 workers hold 1,000 connections, and the
/// cluster's processes (started later by this process) inherit the limit.
pub fn raise_nofile() {
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// A keep-alive HTTP/1.1 client for the queue API (also used by `bench-operator`).
pub fn http() -> Client {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Http::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2048)
        .build(c)
}

/// One queue API call with its protocol types: the HTTP status, and on 200 the reply read into its type
/// (an unreadable reply is an error, never a default). Also used by `bench-operator`.
pub async fn call<T: Call>(
    c: &Client,
    url: &str,
    token: &str,
    msg: &T,
) -> Result<(u16, Option<T::Reply>), String> {
    let body = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = c.request(req).await.map_err(|e| e.to_string())?;
    let s = resp.status().as_u16();
    let b = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if s != 200 {
        return Ok((s, None));
    }
    decode::<T::Reply>("reply", &b).map(|r| (s, Some(r)))
}

/// A task's instructions for in-process queue benchmarks and tests (the queue does not look inside).
pub fn sample_work(kind: WorkKind, job: &str, chunk: Option<u32>) -> Work {
    serde_json::from_value(json!({
        "kind": kind, "namespace": "ns", "job": job, "uid": "u", "ledger": "s3://b/o/.tessera/u/",
        "chunk": chunk,
        "spec": {"input": {"uri": "s3://b/in.mp4"}, "output": {"uri": "s3://b/o/"},
                 "renditions": [{"name": "a", "video": {"codec": "h264"}}]},
    }))
    .expect("a sample Work")
}

/// A plan result for `chunks` chunks of 2 s at 25 fps, with audio when `audio`.
pub fn sample_plan(chunks: u32, audio: bool) -> TaskResult {
    TaskResult::Plan(PlanResult {
        plan: PlanRecord {
            input_etag: None,
            target_seconds: 2.0,
            chunks: ChunkPlan::uniform(chunks, 2.0, 25.0),
            vfr: false,
            frames: u64::from(chunks) * 50,
            duration_seconds: f64::from(chunks) * 2.0,
            fps: 25.0,
            encoders: vec!["libx264".into()],
            encoder_reasons: vec!["software".into()],
            audio,
            hdr: None,
            captions: false,
            ladder: None,
        },
        done: vec![],
        audio_done: false,
        finished: None,
    })
}

/// What a simulated worker answers for a task of `kind`.
pub fn sample_result(kind: WorkKind, chunks: u32) -> TaskResult {
    let encoded = ChunkResult {
        frames: 50,
        reused: false,
        seconds: 0.05,
        renditions: vec![],
    };
    match kind {
        WorkKind::Plan => sample_plan(chunks, true),
        WorkKind::Chunk => TaskResult::Chunk(encoded),
        WorkKind::Audio => TaskResult::Audio(encoded),
        WorkKind::Stitch => TaskResult::Stitch(StitchResult::default()),
        WorkKind::Cleanup => TaskResult::Cleanup(CleanupResult::default()),
        WorkKind::Collect => TaskResult::Collect(Default::default()),
    }
}

/// The operator's `/metrics` text.
pub async fn metrics(base: &str) -> String {
    let c = http();
    let Ok(req) = hyper::Request::get(format!("{base}/metrics")).body(Full::new(Bytes::new()))
    else {
        return String::new();
    };
    match c.request(req).await {
        Ok(r) => match r.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// The sum of a metric's samples whose line contains `filter`.
pub fn metric(text: &str, name: &str, filter: &str) -> Option<f64> {
    let v: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// A quantile of a Prometheus histogram (`name_bucket{le=..}` lines): the upper bound of the bucket that
/// holds it, as Prometheus' `histogram_quantile` would round up.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| *le)
}

pub async fn client() -> kube::Client {
    let kc =
        kube::config::Kubeconfig::read_from(e2e_dir().join("kubeconfig")).expect("cluster is up");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("kubeconfig");
    kube::Client::try_from(cfg).expect("client")
}

pub fn jobs_api(client: &kube::Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource {
            group: "tessera.dev".into(),
            version: "v1alpha1".into(),
            api_version: "tessera.dev/v1alpha1".into(),
            kind: "TranscodeJob".into(),
            plural: "transcodejobs".into(),
        },
    )
}

fn job(name: &str) -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "TranscodeJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "input": {"uri": "s3://tessera/inputs/load.mp4"},
            "output": {"uri": format!("s3://tessera/load/{name}/")},
            "renditions": [{"name": "a", "video": {"codec": "h264"}}],
            "pool": format!("tessera-system/{POOL}")
        }
    })
}

/// The pool the simulated workers serve (no pods: `maxWorkers: 0`), its namespace, and a worker token.
pub fn prepare() -> String {
    let _ = kubectl(&["create", "namespace", NAMESPACE], None);
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: {POOL}, namespace: tessera-system}}\nspec:\n  allowedNamespaces: {{from: All}}\n  \
             minWorkers: 0\n  maxWorkers: 0\n  serviceAccountName: tessera-worker\n"
        )),
    );
    kubectl_ok(
        &[
            "create",
            "token",
            "tessera-worker",
            "-n",
            "tessera-system",
            "--duration=2h",
            &format!("--audience={}", tessera_crds::protocol::QUEUE_AUDIENCE),
        ],
        None,
    )
    .trim()
    .to_string()
}

/// The queue address the leader wrote on its Lease.
async fn lease_queue_url(client: &kube::Client) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "tessera-system");
    let l = leases.get("tessera-operator-leader").await.ok()?;
    l.metadata
        .annotations?
        .get("tessera.dev/queue-url")
        .cloned()
}

/// The leader's queue address, from the leader Lease.
pub async fn queue_url(client: &kube::Client) -> String {
    let t = Instant::now();
    loop {
        if let Some(u) = lease_queue_url(client).await {
            return u;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader's queue address, kept current (read from the leader Lease every 500 ms), so simulated workers
/// follow a failover as real ones do.
#[derive(Clone)]
pub struct Leader(Arc<Mutex<String>>);

impl Leader {
    pub async fn follow(client: &kube::Client) -> Self {
        let l = Leader(Arc::new(Mutex::new(queue_url(client).await)));
        let (c, me) = (client.clone(), l.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(u) = lease_queue_url(&c).await {
                    *me.0.lock().unwrap() = u;
                }
            }
        });
        l
    }

    pub fn url(&self) -> String {
        self.0.lock().unwrap().clone()
    }
}

/// Wait until the queue API serves the pool (after the operator's next pool pass): a lease that does not
/// wait answers 204 (no task) instead of 403/404.
pub async fn wait_pool(base: &str, token: &str) {
    let c = http();
    let url = format!("{base}/v1/pools/tessera-system/{POOL}/lease");
    let t = Instant::now();
    loop {
        let probe = LeaseRequest {
            worker: "load-probe".into(),
            wait_ms: 0,
        };
        let r = call(&c, &url, token, &probe).await;
        match r {
            Ok((204, _)) => return,
            Ok((200, b)) => panic!("the load pool had a task before any job: {b:?}"),
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "queue API refuses the load pool: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A task by (job, kind, chunk).
pub type TaskKey = (String, String, u64);

/// Simulated workers, each long-polling the pool.
pub struct Fleet {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    pub completed: Arc<AtomicU64>,
    pub errors: Arc<AtomicU64>,
    /// When each job's plan task was first leased.
    pub planned: Arc<Mutex<HashMap<String, Instant>>>,
    /// Completed tasks by (job, kind, chunk): a count above 1 is work done twice.
    pub done: Arc<Mutex<HashMap<TaskKey, u32>>>,
}

impl Fleet {
    pub fn start(leader: &Leader, token: &str, workers: usize, chunks: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let completed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let planned = Arc::new(Mutex::new(HashMap::new()));
        let done = Arc::new(Mutex::new(HashMap::new()));
        let c = http();
        let handles = (0..workers)
            .map(|w| {
                let (c, leader, token) = (c.clone(), leader.clone(), token.to_string());
                let (stop, completed, errors, planned, done) = (
                    stop.clone(),
                    completed.clone(),
                    errors.clone(),
                    planned.clone(),
                    done.clone(),
                );
                tokio::spawn(async move {
                    let name = format!("load-worker-{w}");
                    while !stop.load(Ordering::Relaxed) {
                        let base = leader.url();
                        let lease = format!("{base}/v1/pools/tessera-system/{POOL}/lease");
                        let body = LeaseRequest {
                            worker: name.clone(),
                            wait_ms: 2000,
                        };
                        let task = match call(&c, &lease, &token, &body).await {
                            Ok((200, Some(b))) => b.task,
                            Ok((204, _)) => continue,
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        };
                        let (id, kind) = (task.id, task.work.kind);
                        if kind == WorkKind::Plan {
                            planned
                                .lock()
                                .unwrap()
                                .entry(task.job.clone())
                                .or_insert_with(Instant::now);
                        }
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..100))).await;
                        let hb = HeartbeatRequest {
                            worker: name.clone(),
                            progress: Some(TaskProgress { frames: 12 }),
                        };
                        let _ =
                            call(&c, &format!("{base}/v1/tasks/{id}/heartbeat"), &token, &hb).await;
                        let body = CompleteRequest {
                            worker: name.clone(),
                            result: sample_result(kind, chunks),
                            seconds: 0.05,
                        };
                        match call(&c, &format!("{base}/v1/tasks/{id}/complete"), &token, &body)
                            .await
                        {
                            Ok((200, _)) => {
                                completed.fetch_add(1, Ordering::Relaxed);
                                let key = (
                                    task.job.clone(),
                                    format!("{kind:?}").to_lowercase(),
                                    u64::from(task.work.chunk.unwrap_or(0)),
                                );
                                *done.lock().unwrap().entry(key).or_default() += 1;
                            }
                            // A cancelled task (its job deleted) answers 410: acknowledged, not an error.
                            Ok((410, _)) => {}
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            handles,
            completed,
            errors,
            planned,
            done,
        }
    }

    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.await;
        }
    }
}

/// Operator memory sampled from its `/metrics` every 250 ms.
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Vec<(f64, f64)>>,
}

impl MemorySampler {
    pub fn start(leader: &Leader, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, leader) = (stop.clone(), leader.clone());
        let handle = tokio::spawn(async move {
            let t0 = Instant::now();
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let text = metrics(&leader.url()).await;
                if let Some(rss) = metric(&text, "tessera_process_resident_memory_bytes", "") {
                    out.push((t0.elapsed().as_secs_f64(), rss / 1048576.0));
                }
                tokio::time::sleep(every).await;
            }
            out
        });
        Self { stop, handle }
    }

    /// (seconds since start, resident MiB) samples.
    pub async fn stop(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap_or_default()
    }
}

/// Create `names` at once (32 requests in flight); returns when each create was acknowledged.
pub async fn create_all(api: &Api<DynamicObject>, names: &[String]) -> HashMap<String, Instant> {
    stream::iter(names.iter().cloned())
        .map(|n| {
            let api = api.clone();
            async move {
                let obj: DynamicObject = serde_json::from_value(job(&n)).expect("job object");
                api.create(&PostParams::default(), &obj)
                    .await
                    .unwrap_or_else(|e| panic!("create {n}: {e}"));
                (n, Instant::now())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await
}

/// Phases of the jobs in the namespace.
pub async fn phases(api: &Api<DynamicObject>) -> HashMap<String, String> {
    match api.list(&ListParams::default()).await {
        Ok(l) => l
            .items
            .into_iter()
            .map(|o| {
                let phase = o.data["status"]["phase"].as_str().unwrap_or("").to_string();
                (o.metadata.name.unwrap_or_default(), phase)
            })
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// Wait until every job of `names` Succeeded, failing at once if one Failed, or when `bound` has passed since
/// `t0`; `context()` is added to the message (what the test was doing).
pub async fn wait_succeeded(
    api: &Api<DynamicObject>,
    names: &[String],
    t0: Instant,
    bound: Duration,
    every: Duration,
    context: impl Fn() -> String,
) {
    loop {
        let p = phases(api).await;
        let failed: Vec<_> = p.iter().filter(|(_, ph)| *ph == "Failed").collect();
        assert!(failed.is_empty(), "jobs failed ({}): {failed:?}", context());
        let done = names
            .iter()
            .filter(|n| p.get(*n).is_some_and(|ph| ph == "Succeeded"))
            .count();
        if done == names.len() {
            return;
        }
        assert!(
            t0.elapsed() < bound,
            "{done} of {} jobs Succeeded after {bound:?} ({}): {p:?}",
            names.len(),
            context()
        );
        tokio::time::sleep(every).await;
    }
}

/// Delete `names` and wait until they are gone (the finalizer's cleanup tasks served by the fleet).
pub async fn delete_all(api: &Api<DynamicObject>, names: &[String], bound: Duration) {
    stream::iter(names.iter().cloned())
        .map(|n| {
            let api = api.clone();
            async move {
                let _ = api.delete(&n, &DeleteParams::default()).await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let t = Instant::now();
    loop {
        let left = phases(api).await;
        if !names.iter().any(|n| left.contains_key(n)) {
            return;
        }
        assert!(
            t.elapsed() < bound,
            "{} jobs not deleted within {bound:?}",
            names.iter().filter(|n| left.contains_key(*n)).count()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}
