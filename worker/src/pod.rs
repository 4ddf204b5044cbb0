//! `tessera worker`: the worker pod's loop. Lease a task from the operator's queue, run it with the engine,
//! stream results to S3, heartbeat with progress, complete or report the failure; on SIGTERM stop leasing,
//! let running tasks finish within the drain time, then cancel them and give their leases back.
//!
//! ```text
//!  queue (operator leader) ──lease──▶ slot ──spawn_blocking──▶ task::execute (engine, S3 ledger)
//!          ▲                           │ every second: heartbeat {frames}
//!          └──complete {result} / fail {reason} / release
//! ```
//!
//! The queue is found at the address the leader writes on its Lease (`TESSERA_QUEUE_LEASE=ns/name`; no
//! cluster DNS needed), then through the operator's Service (`TESSERA_QUEUE_SERVICE=ns/name:port`); a standby
//! answers 503 and the worker moves on. `TESSERA_QUEUE_URL` names a fixed endpoint instead. Requests carry
//! the pod's ServiceAccount token.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tessera_crds::protocol::{
    decode, lease_path, task_path, CompleteRequest, ErrorReply, FailRequest, HeartbeatRequest,
    LeaseReply, LeaseRequest, ReleaseRequest, TaskOp,
};
use tessera_crds::work::{TaskFailure, TaskProgress, Work, WorkKind};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Outcome, WorkerMetrics};
use crate::task;
use tessera_engine::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Config {
    /// `namespace/name` of the WorkerPool.
    pub pool: String,
    /// This pod's name: the lease holder's identity.
    pub worker: String,
    pub slots: usize,
    pub queue_url: Option<String>,
    /// `namespace/service:port`
    pub queue_service: Option<String>,
    /// `namespace/name` of the leader Lease.
    pub queue_lease: Option<String>,
    pub drain: Duration,
    pub heartbeat: Duration,
    /// A worker whose scratch space (`TMPDIR`) has less free than this takes no new task.
    pub scratch_min_free_mb: u64,
    /// Where `/metrics` is served (`TESSERA_METRICS_ADDR`; default the pod's IP, port 9090; `off`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Config {
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let need = |k: &str| {
            var(k).ok_or_else(|| Error::Field {
                field: k.into(),
                message: "must be set for `tessera worker` (the operator's pod spec sets it)"
                    .into(),
            })
        };
        let queue_url = var("TESSERA_QUEUE_URL");
        let queue_service = var("TESSERA_QUEUE_SERVICE");
        let queue_lease = var("TESSERA_QUEUE_LEASE");
        if queue_url.is_none() && queue_service.is_none() && queue_lease.is_none() {
            return Err(Error::Field {
                field: "TESSERA_QUEUE_SERVICE".into(),
                message: "set it (namespace/service:port) or TESSERA_QUEUE_URL".into(),
            });
        }
        let num = |k: &str, d: u64| var(k).and_then(|v| v.parse().ok()).unwrap_or(d);
        Ok(Self {
            pool: need("TESSERA_POOL")?,
            worker: var("POD_NAME")
                .or_else(|| var("HOSTNAME"))
                .unwrap_or_else(|| "worker".into()),
            slots: num("TESSERA_TASKS_PER_WORKER", 1).max(1) as usize,
            queue_url,
            queue_service,
            queue_lease,
            drain: Duration::from_secs(num("TESSERA_DRAIN_SECONDS", 90)),
            heartbeat: Duration::from_millis(num("TESSERA_HEARTBEAT_MS", 1000)),
            scratch_min_free_mb: num("TESSERA_SCRATCH_MIN_FREE_MB", 256),
            metrics_addr: metrics_addr(var("TESSERA_METRICS_ADDR"), var("POD_IP"))?,
        })
    }
}

/// `/metrics`'s address: `TESSERA_METRICS_ADDR` (`host:port`, or `off`), else the pod's IP on 9090 (each pod
/// of a node has its own), else all interfaces.
fn metrics_addr(
    set: Option<String>,
    pod_ip: Option<String>,
) -> Result<Option<std::net::SocketAddr>> {
    let bad = |v: &str, e: String| Error::Field {
        field: "TESSERA_METRICS_ADDR".into(),
        message: format!("{v:?}: {e} (host:port, or off)"),
    };
    match set.as_deref() {
        Some("off") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|e| bad(v, format!("{e}"))),
        None => {
            let ip: std::net::IpAddr = pod_ip
                .and_then(|ip| ip.parse().ok())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            Ok(Some((ip, 9090).into()))
        }
    }
}

/// Serve `/metrics` until the process ends (a failure to bind is logged, not fatal: the work matters more).
async fn serve_metrics(addr: std::net::SocketAddr, metrics: WorkerMetrics) {
    use hyper::service::service_fn;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot serve /metrics");
            return;
        }
    };
    tracing::info!(%addr, "serving /metrics");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        let s3 = tessera_engine::s3::global_if_made().map(|s| s.stats.snapshot());
                        hyper::Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render(s3))))
                    } else {
                        hyper::Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, std::convert::Infallible>(resp.expect("a valid response"))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// Where the bearer token comes from: the mounted ServiceAccount token (re-read, it rotates) or the
/// kubeconfig's user.
enum Token {
    File(std::path::PathBuf),
    Static(String),
}

impl Token {
    fn discover() -> Result<Self> {
        let sa = std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token");
        if let Some(f) = std::env::var_os("TESSERA_QUEUE_TOKEN_FILE") {
            return Ok(Self::File(f.into()));
        }
        if sa.exists() {
            return Ok(Self::File(sa.into()));
        }
        let kc = kube::config::Kubeconfig::read().map_err(|e| Error::Field {
            field: "KUBECONFIG".into(),
            message: format!("no ServiceAccount token mounted and no usable kubeconfig: {e}"),
        })?;
        let current = kc.current_context.clone().unwrap_or_default();
        let user = kc
            .contexts
            .iter()
            .find(|c| c.name == current)
            .and_then(|c| c.context.as_ref())
            .and_then(|c| c.user.clone());
        let token = kc
            .auth_infos
            .iter()
            .find(|a| Some(&a.name) == user.as_ref())
            .and_then(|a| a.auth_info.as_ref())
            .and_then(|a| a.token.as_ref())
            .map(|t| secrecy::ExposeSecret::expose_secret(t).to_string());
        token.map(Self::Static).ok_or_else(|| Error::Field {
            field: "KUBECONFIG".into(),
            message: "the current user has no token".into(),
        })
    }

    fn get(&self) -> Result<String> {
        match self {
            Self::Static(t) => Ok(t.clone()),
            Self::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|source| Error::Read {
                    path: p.clone(),
                    source,
                }),
        }
    }
}

/// How a queue call ended.
#[derive(Debug)]
enum Reply {
    /// 200, with the reply's bytes (read into the call's reply type by the caller).
    Ok(Bytes),
    NoContent,
    /// The task was cancelled (its job deleted or suspended): stop.
    Gone,
    /// Someone else holds the lease now (ours expired): stop.
    Conflict,
    /// The queue does not know the task (a new leader): keep going; the ledger is what counts.
    Unknown,
    Other(StatusCode, String),
}

struct Queue {
    metrics: WorkerMetrics,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    kube: Option<kube::Client>,
    cfg: Config,
    token: Token,
    base: Mutex<Option<String>>,
}

fn queue_err(what: impl Into<String>) -> Error {
    Error::Queue(what.into())
}

impl Queue {
    async fn new(cfg: Config) -> Result<Self> {
        let kube = match (&cfg.queue_url, &cfg.queue_lease) {
            (Some(_), _) | (None, None) => None,
            (None, Some(_)) => Some(
                kube::Client::try_default()
                    .await
                    .map_err(|e| queue_err(format!("cannot reach the Kubernetes API: {e}")))?,
            ),
        };
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        conn.set_nodelay(true);
        Ok(Self {
            metrics: WorkerMetrics::new(cfg.slots),
            http: HttpClient::builder(TokioExecutor::new()).build(conn),
            kube,
            token: Token::discover()?,
            base: Mutex::new(cfg.queue_url.clone()),
            cfg,
        })
    }

    /// Where the queue may be: the address the leader wrote on its Lease, then the Service's DNS name.
    async fn candidates(&self) -> Result<Vec<String>> {
        if let Some(u) = &self.cfg.queue_url {
            return Ok(vec![u.trim_end_matches('/').to_string()]);
        }
        let mut out = Vec::new();
        let mut why = String::new();
        if let (Some(lease), Some(kube)) = (&self.cfg.queue_lease, &self.kube) {
            let (ns, name) = lease.split_once('/').unwrap_or(("default", lease));
            let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
                kube::Api::namespaced(kube.clone(), ns);
            match api.get(name).await {
                Ok(l) => match l
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(tessera_crds::QUEUE_URL_ANNOTATION))
                {
                    Some(u) => out.push(u.trim_end_matches('/').to_string()),
                    None => why = format!("lease {lease} names no leader yet"),
                },
                Err(e) => why = format!("lease {lease}: {e}"),
            }
        }
        if let Some(svc) = &self.cfg.queue_service {
            let (ns, rest) = svc.split_once('/').unwrap_or(("default", svc));
            let (name, port) = rest.split_once(':').unwrap_or((rest, "8080"));
            out.push(format!("http://{name}.{ns}.svc:{port}"));
        }
        if out.is_empty() {
            return Err(queue_err(why));
        }
        Ok(out)
    }

    async fn post_to(
        &self,
        base: &str,
        path: &str,
        body: &Bytes,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes)> {
        let req = hyper::Request::post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", self.token.get()?))
            .body(Full::new(body.clone()))
            .map_err(|e| queue_err(e.to_string()))?;
        let resp = tokio::time::timeout(timeout, self.http.request(req))
            .await
            .map_err(|_| queue_err(format!("{base}: no answer in {timeout:?}")))?
            .map_err(|e| queue_err(format!("{base}: {e}")))?;
        let status = resp.status();
        let bytes = tokio::time::timeout(timeout, resp.into_body().collect())
            .await
            .map_err(|_| queue_err(format!("{base}: body timed out")))?
            .map_err(|e| queue_err(format!("{base}: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// POST to the leader, finding it first where needed.
    /// POST a protocol message to the leader, finding it first where needed.
    async fn post<T: serde::Serialize>(
        &self,
        path: &str,
        msg: &T,
        timeout: Duration,
    ) -> Result<Reply> {
        let body = Bytes::from(
            serde_json::to_vec(msg).map_err(|e| queue_err(format!("encode {path}: {e}")))?,
        );
        self.post_bytes(path, body, timeout).await
    }

    async fn post_bytes(&self, path: &str, body: Bytes, timeout: Duration) -> Result<Reply> {
        let known = self.base.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut tried = Vec::new();
        if let Some(b) = known {
            tried.push(b);
        }
        let mut last = String::from("no queue endpoints");
        for round in 0..2 {
            if round == 1 {
                match self.candidates().await {
                    Ok(c) => tried = c.into_iter().filter(|c| !tried.contains(c)).collect(),
                    Err(e) => return Err(e),
                }
            }
            for base in &tried {
                match self.post_to(base, path, &body, timeout).await {
                    Ok((StatusCode::SERVICE_UNAVAILABLE, v)) => {
                        last = format!("{base}: {}", error_text(&v));
                    }
                    Ok((status, v)) => {
                        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = Some(base.clone());
                        return Ok(match status {
                            StatusCode::OK => Reply::Ok(v),
                            StatusCode::NO_CONTENT => Reply::NoContent,
                            StatusCode::GONE => Reply::Gone,
                            StatusCode::CONFLICT => Reply::Conflict,
                            StatusCode::NOT_FOUND => Reply::Unknown,
                            s => Reply::Other(s, error_text(&v)),
                        });
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            *self.base.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        Err(queue_err(format!("no queue leader answered: {last}")))
    }
}

/// The words of an error reply (or its raw text, if it is not one).
fn error_text(body: &[u8]) -> String {
    match decode::<ErrorReply>("error reply", body) {
        Ok(e) => e.error,
        Err(_) => String::from_utf8_lossy(body).chars().take(200).collect(),
    }
}

/// Run the worker until SIGTERM/SIGINT and drained.
pub fn run(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tessera-worker")
        .enable_all()
        .build()
        .map_err(|e| queue_err(format!("runtime: {e}")))?;
    rt.block_on(async move {
        let stop = CancellationToken::new();
        {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                tracing::info!("shutting down: no new tasks; running ones finish or are released");
                stop.cancel();
            });
        }
        let q = Arc::new(Queue::new(cfg.clone()).await?);
        if let Some(addr) = cfg.metrics_addr {
            tokio::spawn(serve_metrics(addr, q.metrics.clone()));
        }
        tracing::info!(pool = %cfg.pool, worker = %cfg.worker, slots = cfg.slots, "worker started");
        let mut slots = Vec::new();
        for n in 0..cfg.slots {
            slots.push(tokio::spawn(slot(q.clone(), stop.clone(), n)));
        }
        for s in slots {
            let _ = s.await;
        }
        tracing::info!("worker stopped");
        Ok(())
    })
}

async fn slot(q: Arc<Queue>, stop: CancellationToken, n: usize) {
    let (ns, name) = q
        .cfg
        .pool
        .split_once('/')
        .unwrap_or(("default", &q.cfg.pool));
    let path = lease_path(&format!("{ns}/{name}"));
    let mut backoff = Duration::from_millis(200);
    let mut full = false;
    while !stop.is_cancelled() {
        // A full scratch disk would fail every task leased now (and spend its attempts): wait for space.
        if let Some(free) = scratch_free_mb() {
            if free < q.cfg.scratch_min_free_mb {
                if !full {
                    tracing::warn!(slot = n, free_mb = free, need_mb = q.cfg.scratch_min_free_mb,
                        dir = %std::env::temp_dir().display(), "scratch space full: taking no task until space is freed");
                    full = true;
                }
                sleep_or(&stop, Duration::from_secs(1)).await;
                continue;
            }
            if full {
                tracing::info!(
                    slot = n,
                    free_mb = free,
                    "scratch space freed: taking tasks again"
                );
                full = false;
            }
        }
        let body = LeaseRequest {
            worker: q.cfg.worker.clone(),
            wait_ms: 20_000,
        };
        let reply = tokio::select! {
            r = q.post(&path, &body, Duration::from_secs(30)) => r,
            () = stop.cancelled() => break,
        };
        match reply {
            Ok(Reply::Ok(v)) => {
                backoff = Duration::from_millis(200);
                match decode::<LeaseReply>("lease reply", &v) {
                    Ok(lease) => run_task(&q, &stop, lease.task.id, lease.task.work).await,
                    Err(e) => {
                        // Instructions this worker cannot read (an operator of another version): fail the
                        // task for good, with the reason, rather than leave it to be leased again and again.
                        tracing::error!(slot = n, error = %e, "cannot read a leased task");
                        if let Ok(t) = decode::<tessera_crds::protocol::LeasedId>("lease reply", &v)
                        {
                            let f = FailRequest {
                                worker: q.cfg.worker.clone(),
                                failure: TaskFailure {
                                    reason: "WorkerIncompatible".into(),
                                    message: format!("task {}: {e}", t.task.id),
                                    retryable: false,
                                },
                                seconds: 0.0,
                            };
                            let _ = q
                                .post(
                                    &task_path(t.task.id, TaskOp::Fail),
                                    &f,
                                    Duration::from_secs(10),
                                )
                                .await;
                        }
                    }
                }
            }
            Ok(Reply::NoContent) => {}
            Ok(other) => {
                tracing::warn!(slot = n, reply = ?other, "lease refused");
                sleep_or(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(slot = n, error = %e, "queue unreachable; retrying");
                sleep_or(&stop, backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Free space in the scratch folder (`TMPDIR`), in MiB, for an unprivileged writer.
fn scratch_free_mb() -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::ffi::CString::new(std::env::temp_dir().as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills a zeroed struct from a NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(dir.as_ptr(), &mut st) == 0)
            .then(|| st.f_bavail as u64 * st.f_frsize as u64 / 1_048_576)
    }
}

async fn sleep_or(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = stop.cancelled() => {}
    }
}

/// Run one task: the engine on a blocking thread, heartbeats beside it, then the verdict.
async fn run_task(q: &Arc<Queue>, stop: &CancellationToken, id: u64, work: Work) {
    let started = Instant::now();
    let cancel = Arc::new(AtomicBool::new(false));
    let frames = Arc::new(AtomicU64::new(0));
    q.metrics.started();
    // Every line the engine logs for this task names its job (a worker runs several tasks at once, of
    // different jobs and tenants): the span is entered on the blocking thread that runs it.
    let span = tracing::info_span!("task", id, job = %format!("{}/{}", work.namespace, work.job));
    tracing::info!(task = id, kind = ?work.kind, job = %format!("{}/{}", work.namespace, work.job),
        chunk = ?work.chunk, "task leased");
    let mut handle = {
        let (cancel, frames, work, span) = (cancel.clone(), frames.clone(), work.clone(), span);
        let slots = q.cfg.slots;
        tokio::task::spawn_blocking(move || {
            let _in = span.enter();
            task::execute(&work, slots, &cancel, &frames)
        })
    };
    let me = q.cfg.worker.clone();
    let mut tick = tokio::time::interval(q.cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut drain_until: Option<tokio::time::Instant> = None;
    // The task was stopped early (cancelled, lease lost, or drain time over): it is released, not reported.
    let mut abandoned = false;
    let outcome = loop {
        let drain = async {
            match drain_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = &mut handle => break res.unwrap_or_else(|e| Err(Error::Queue(format!("task panicked: {e}")))),
            _ = tick.tick() => {
                let body = HeartbeatRequest {
                    worker: me.clone(),
                    progress: Some(TaskProgress { frames: frames.load(Ordering::Relaxed) }),
                };
                match q.post(&task_path(id, TaskOp::Heartbeat), &body, Duration::from_secs(5)).await {
                    Ok(Reply::Gone) => {
                        tracing::info!(task = id, "task cancelled by the operator; stopping it");
                        abandoned = true;
                        cancel.store(true, Ordering::Relaxed);
                    }
                    Ok(Reply::Conflict) => {
                        tracing::warn!(task = id, "lease lost to another worker; stopping the task");
                        abandoned = true;
                        cancel.store(true, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(task = id, error = %e, "heartbeat failed; the task goes on"),
                }
            }
            () = stop.cancelled(), if drain_until.is_none() => {
                drain_until = Some(tokio::time::Instant::now() + q.cfg.drain);
                tracing::info!(task = id, drain_seconds = q.cfg.drain.as_secs(), "draining: letting the task finish");
            }
            () = drain => {
                tracing::warn!(task = id, "drain time over: cancelling the task and releasing its lease");
                abandoned = true;
                cancel.store(true, Ordering::Relaxed);
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let kind = serde_json::to_value(work.kind)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let outcome_class = match (&outcome, abandoned) {
        (_, true) | (Err(Error::Cancelled), false) => Outcome::Released,
        (Ok(_), false) => Outcome::Completed,
        (Err(_), false) => Outcome::Failed,
    };
    let encoded_frames = match (&outcome, work.kind) {
        (Ok(_), WorkKind::Chunk) => frames.load(Ordering::Relaxed),
        _ => 0,
    };
    q.metrics
        .finished(&kind, outcome_class, secs, encoded_frames);
    let worker = me.clone();
    let encoded = |v: serde_json::Result<Vec<u8>>| v.map(Bytes::from);
    let (path, body) = match (outcome, abandoned) {
        // Stopped early: release, which also tells the operator this worker has stopped it.
        (_, true) | (Err(Error::Cancelled), false) => (
            task_path(id, TaskOp::Release),
            encoded(serde_json::to_vec(&ReleaseRequest { worker })),
        ),
        (Ok(result), false) => {
            tracing::info!(task = id, kind = ?work.kind, chunk = ?work.chunk, seconds = secs, "task done");
            (
                task_path(id, TaskOp::Complete),
                encoded(serde_json::to_vec(&CompleteRequest {
                    worker,
                    result,
                    seconds: secs,
                })),
            )
        }
        (Err(e), false) => {
            let failure = task::failure(&e);
            tracing::warn!(task = id, kind = ?work.kind, reason = %failure.reason, error = %failure.message, "task failed");
            (
                task_path(id, TaskOp::Fail),
                encoded(serde_json::to_vec(&FailRequest {
                    worker,
                    failure,
                    seconds: secs,
                })),
            )
        }
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(task = id, error = %e, "cannot encode the task's verdict; its lease will expire");
            return;
        }
    };
    // The verdict must reach the queue: retry through a failover for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match q
            .post_bytes(&path, body.clone(), Duration::from_secs(10))
            .await
        {
            Ok(Reply::Other(s, e)) if s.is_server_error() && Instant::now() < deadline => {
                tracing::warn!(task = id, status = %s, error = %e, "queue error; retrying the verdict")
            }
            Ok(Reply::Gone) => {
                // It finished before its next heartbeat could learn of the cancellation.
                tracing::info!(task = id, "task cancelled by the operator before its verdict arrived (its job was deleted or suspended); the verdict is dropped");
                return;
            }
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(task = id, error = %e, "queue unreachable; retrying the verdict")
            }
            Err(e) => {
                tracing::warn!(task = id, error = %e, "gave up reporting the task; its lease will expire");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
