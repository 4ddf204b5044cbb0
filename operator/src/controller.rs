//! The leader's controllers. Fetch, call the pure parts (`jobrun`, `scale`, `podspec`, `status`), apply,
//! report.
//!
//! ```text
//!  TranscodeJob watch ──▶ reconcile: finalizer, validate, pool, JobRun::start ──▶ queue (plan task)
//!  queue API events ───▶ on_event: JobRun::on_plan / on_encoded / on_stitched ──▶ queue (next tasks)
//!  every 200 ms ───────▶ status writer: Throttle (phase at once, progress ≤ 1/s) ──▶ PATCH status, Events
//!  every second ───────▶ pools: depth + pods ──▶ scale::plan ──▶ create / delete worker pods, pool status
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde_json::json;
use tessera_crds::work::{ChunkResult, PlanResult, StitchResult, Work, WorkKind};
use tessera_crds::{Phase, TranscodeJob, TranscodeJobStatus, WorkerPool, WorkerPoolStatus};
use tokio::sync::mpsc;

use crate::api::{lock, ApiState, TaskEvent};
use crate::jobrun::{keep_transition_times, JobRun, Stage};
use crate::podspec::{self, WorkerPodInput, POOL_LABEL};
use crate::queue::{Task, TaskId};
use crate::scale::{self, Load, PoolShape, Worker, WorkerState};
use crate::status::{Decision, Throttle};
use crate::Error;

pub const FINALIZER: &str = "tessera.dev/cleanup";
/// How long a deleted job waits for a worker to delete its temporary objects before it goes anyway.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct Config {
    /// The operator's namespace.
    pub namespace: String,
    /// `ns/name` of the pool jobs use when they name none.
    pub default_pool: String,
    /// `ns/service:port`: the queue Service (workers' fallback through cluster DNS).
    pub queue_service: String,
    /// `ns/name` of the leader Lease, whose annotation tells workers where the queue is.
    pub lease: String,
    pub status_interval: Duration,
    pub identity: String,
}

struct Entry {
    run: JobRun,
    tasks: HashSet<TaskId>,
    started: Instant,
    dirty: bool,
    written: Option<TranscodeJobStatus>,
    last_write: Option<Instant>,
    cleanup: Option<TaskId>,
    cleanup_done: bool,
    /// Some task was handed to a worker (so the ledger may hold objects).
    touched: bool,
    cleanup_since: Option<Instant>,
    events: Vec<(EventType, &'static str, String)>,
}

pub struct Ctx {
    pub client: Client,
    pub api: Arc<ApiState>,
    pub cfg: Config,
    jobs: Mutex<HashMap<(String, String), Entry>>,
    recorder: Recorder,
    epoch: u64,
    seq: AtomicU64,
    idle_since: Mutex<HashMap<String, Instant>>,
    /// Jobs (by uid) whose finalizer this leader removed, for a few minutes: the watch cache may still show
    /// them with the finalizer, and finalizing them again would queue a second cleanup and leave an entry
    /// behind for an object that is gone.
    finalized: Mutex<HashMap<String, Instant>>,
    pub status_writes: AtomicU64,
    pub reconciles: AtomicU64,
    /// How long each TranscodeJob reconcile took, API calls included.
    pub reconcile_seconds: Histogram,
}

impl Ctx {
    pub fn new(client: Client, api: Arc<ApiState>, cfg: Config) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "tessera-operator".into(),
                instance: Some(cfg.identity.clone()),
            },
        );
        Self {
            client,
            api,
            cfg,
            jobs: Mutex::default(),
            recorder,
            // Task ids of different leaders never collide: a worker still holding an old leader's task gets
            // 404 from the new one (keep going), never another task's answer.
            epoch: fastrand::u64(1..(1 << 20)) << 32,
            seq: AtomicU64::new(0),
            idle_since: Mutex::default(),
            finalized: Mutex::default(),
            status_writes: AtomicU64::new(0),
            reconciles: AtomicU64::new(0),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }

    pub fn jobs_by_phase(&self) -> HashMap<&'static str, u64> {
        let mut out = HashMap::new();
        for e in lock(&self.jobs).values() {
            let p = match e.run.stage {
                Stage::Planning => "Planning",
                Stage::Encoding => "Encoding",
                Stage::Stitching => "Stitching",
                Stage::Succeeded => "Succeeded",
                Stage::Failed => "Failed",
            };
            *out.entry(p).or_default() += 1;
        }
        out
    }

    fn enqueue(&self, e: &mut Entry, works: Vec<Work>) {
        if works.is_empty() {
            return;
        }
        let now = self.api.now_ms();
        {
            let mut q = lock(&self.api.queue);
            for w in works {
                let id = self.epoch | self.seq.fetch_add(1, Ordering::Relaxed);
                let cleanup = w.kind == WorkKind::Cleanup;
                let task = Task {
                    id,
                    pool: e.run.pool.clone(),
                    namespace: e.run.namespace.clone(),
                    job: e.run.name.clone(),
                    priority: e.run.spec.priority,
                    coalesce: None,
                    work: serde_json::to_value(&w).unwrap_or_default(),
                };
                q.enqueue(task, now);
                if cleanup {
                    e.cleanup = Some(id);
                } else {
                    e.tasks.insert(id);
                }
            }
        }
        self.api.queued.notify_waiters();
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn key(job: &TranscodeJob) -> (String, String) {
    (job.namespace().unwrap_or_default(), job.name_any())
}

/// Checks beyond the schema for jobs run by the cluster: the spec's own rules, and S3 for input and output
/// (workers have no shared file system).
pub fn cluster_validate(spec: &tessera_crds::TranscodeJobSpec) -> Result<(), String> {
    if let Err(errs) = tessera_crds::validate_spec(spec) {
        return Err(errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; "));
    }
    for (f, u) in [
        ("spec.input.uri", &spec.input.uri),
        ("spec.output.uri", &spec.output.uri),
    ] {
        if let Some(problem) = tessera_crds::cluster_uri_problem(f, u) {
            return Err(problem);
        }
    }
    if spec.output.uri.trim_end_matches('/').matches('/').count() < 3 {
        return Err(format!(
            "spec.output.uri: {:?}: name a prefix inside the bucket (s3://bucket/prefix/), not the bucket itself",
            spec.output.uri
        ));
    }
    Ok(())
}

/// `spec.pool` → `ns/name`.
pub fn resolve_pool(spec_pool: Option<&str>, job_ns: &str, default: &str) -> String {
    match spec_pool {
        Some(p) if p.contains('/') => p.to_string(),
        Some(p) => format!("{job_ns}/{p}"),
        None => default.to_string(),
    }
}

/// What a job may do with the pool it names: the tenancy rules, decided before anything is queued or read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// The pool does not exist in the job's own namespace: the job waits for it (the namespace is the
    /// user's own, so saying so leaks nothing).
    PoolMissing,
    /// Missing in another namespace, or not serving the job's: the same words either way.
    PoolNotAllowed(String),
    AccessNotAllowed(String),
}

/// Whether deciding needs the job namespace's labels (a `Selector` somewhere in the pool's rules).
pub fn tenancy_needs_labels(pool: &tessera_crds::WorkerPoolSpec) -> bool {
    use tessera_crds::tenancy::NamespacesFrom::Selector;
    pool.allowed_namespaces.from == Selector
        || pool.access.iter().any(|r| r.namespaces.from == Selector)
}

/// Decide a job's admission to `pool` (`namespace/name`); `spec` is the pool's, `None` when it does not exist.
pub fn admit(
    pool: &str,
    pool_ns: &str,
    job_ns: &str,
    spec: Option<&tessera_crds::WorkerPoolSpec>,
    labels: &std::collections::BTreeMap<String, String>,
    job: &tessera_crds::TranscodeJobSpec,
) -> Admission {
    use tessera_crds::tenancy::{check_access, namespaces_admit};
    let not_allowed = || {
        Admission::PoolNotAllowed(format!(
            "WorkerPool {pool} does not exist or does not serve namespace {job_ns}: name a pool in {job_ns}, or one \
             whose allowedNamespaces admit it (ask the cluster's administrator)"
        ))
    };
    match spec {
        None if pool_ns == job_ns => Admission::PoolMissing,
        None => not_allowed(),
        Some(p) if !namespaces_admit(&p.allowed_namespaces, pool_ns, job_ns, labels) => {
            not_allowed()
        }
        Some(p) => match check_access(
            &p.access,
            pool,
            pool_ns,
            job_ns,
            labels,
            &job.input.uri,
            &job.output.uri,
        ) {
            Ok(()) => Admission::Admitted,
            Err(m) => Admission::AccessNotAllowed(m),
        },
    }
}

fn is_404(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn publish(ctx: &Ctx, job: &TranscodeJob, type_: EventType, reason: &str, note: String) {
    publish_ref(ctx, &job.object_ref(&()), type_, reason, note).await;
}

async fn publish_ref(
    ctx: &Ctx,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = KEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, reference).await {
        tracing::warn!(error = %e, "could not record an event");
    }
}

async fn write_failed_now(
    ctx: &Ctx,
    job: &TranscodeJob,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let (ns, name) = key(job);
    let api: Api<TranscodeJob> = Api::namespaced(ctx.client.clone(), &ns);
    let mut run = JobRun::new(
        &ns,
        &name,
        &job.uid().unwrap_or_default(),
        job.metadata.generation.unwrap_or(0),
        job.spec.clone(),
        String::new(),
    );
    run.on_failed(reason, message, now());
    let st = run.status(Duration::ZERO, 0, &now());
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": st})),
    )
    .await
    .map_err(|e| Error::kube(format!("status of {ns}/{name}"), e))?;
    ctx.status_writes.fetch_add(1, Ordering::Relaxed);
    publish(ctx, job, EventType::Warning, reason, message.to_string()).await;
    Ok(())
}

async fn reconcile(job: Arc<TranscodeJob>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.reconciles.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let r = reconcile_job(job, ctx.clone()).await;
    ctx.reconcile_seconds.observe(t0.elapsed().as_secs_f64());
    r
}

async fn reconcile_job(job: Arc<TranscodeJob>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (ns, name) = key(&job);
    let api: Api<TranscodeJob> = Api::namespaced(ctx.client.clone(), &ns);
    if job.metadata.deletion_timestamp.is_some() {
        return finalize(&job, &ctx, &api).await;
    }
    if !job.finalizers().iter().any(|f| f == FINALIZER) {
        let mut f = job.finalizers().to_vec();
        f.push(FINALIZER.into());
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": f}})),
        )
        .await
        .map_err(|e| Error::kube(format!("finalizer of {ns}/{name}"), e))?;
        return Ok(Action::await_change());
    }
    let status = job.status.clone().unwrap_or_default();
    let terminal = matches!(status.phase, Some(Phase::Succeeded | Phase::Failed));
    let known = lock(&ctx.jobs).contains_key(&(ns.clone(), name.clone()));
    if terminal && !known
        || lock(&ctx.jobs)
            .get(&(ns.clone(), name.clone()))
            .is_some_and(|e| e.run.finished() && !e.dirty)
    {
        return ttl(&job, &api, &status).await;
    }
    let uid = job.uid().unwrap_or_default();
    let generation = job.metadata.generation.unwrap_or(0);
    if !known {
        if let Err(msg) = cluster_validate(&job.spec) {
            write_failed_now(&ctx, &job, "InvalidSpec", &msg).await?;
            return Ok(Action::await_change());
        }
        let pool = resolve_pool(job.spec.pool.as_deref(), &ns, &ctx.cfg.default_pool);
        let (pns, pname) = pool.split_once('/').unwrap_or(("", &pool));
        let pools: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), pns);
        let found = pools
            .get_opt(pname)
            .await
            .map_err(|e| Error::kube(format!("pool {pool}"), e))?;
        // The job namespace's labels, only where a selector needs them.
        let labels = match &found {
            Some(p) if tenancy_needs_labels(&p.spec) => {
                let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
                nss.get_opt(&ns)
                    .await
                    .map_err(|e| Error::kube(format!("namespace {ns}"), e))?
                    .and_then(|n| n.metadata.labels)
                    .unwrap_or_default()
            }
            _ => Default::default(),
        };
        match admit(
            &pool,
            pns,
            &ns,
            found.as_ref().map(|p| &p.spec),
            &labels,
            &job.spec,
        ) {
            Admission::Admitted => {}
            Admission::PoolNotAllowed(msg) => {
                write_failed_now(&ctx, &job, "PoolNotAllowed", &msg).await?;
                return Ok(Action::await_change());
            }
            Admission::AccessNotAllowed(msg) => {
                write_failed_now(&ctx, &job, "AccessNotAllowed", &msg).await?;
                return Ok(Action::await_change());
            }
            Admission::PoolMissing => {
                let msg = format!(
                    "WorkerPool {pool} does not exist; the job waits for it: create it, or name an existing pool in \
                     spec.pool (kubectl get workerpools -n {ns})"
                );
                if status.conditions.iter().all(|c| c.reason != "PoolNotFound") {
                    let st = json!({"status": {"phase": "Pending", "observedGeneration": generation, "conditions": [{
                        "type": "Progressing", "status": "False", "reason": "PoolNotFound", "message": msg,
                        "lastTransitionTime": now(), "observedGeneration": generation}]}});
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(st))
                        .await
                        .map_err(|e| Error::kube(format!("status of {ns}/{name}"), e))?;
                    publish(&ctx, &job, EventType::Warning, "PoolNotFound", msg).await;
                }
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
        }
        let mut run = JobRun::new(&ns, &name, &uid, generation, job.spec.clone(), pool.clone());
        // A job already running before a restart or failover keeps its start time.
        run.start_time = status.start_time.clone();
        let mut e = Entry {
            run,
            tasks: HashSet::new(),
            started: Instant::now(),
            dirty: true,
            written: job.status.clone(),
            last_write: None,
            cleanup: None,
            cleanup_done: false,
            touched: false,
            cleanup_since: None,
            events: Vec::new(),
        };
        if !job.spec.suspend {
            if e.run.start_time.is_none() {
                e.run.start_time = Some(now());
            }
            let w = e.run.start();
            ctx.enqueue(&mut e, w);
            e.events.push((
                EventType::Normal,
                "Queued",
                format!("planning on pool {pool}"),
            ));
        }
        tracing::info!(job = %format!("{ns}/{name}"), %pool, suspended = job.spec.suspend, "job accepted");
        lock(&ctx.jobs).insert((ns, name), e);
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    // Known: follow spec changes that matter while running.
    let mut jobs = lock(&ctx.jobs);
    let e = jobs.get_mut(&(ns.clone(), name.clone())).expect("known");
    if e.run.uid != uid {
        // Deleted and re-created under the same name while we looked away.
        jobs.remove(&(ns, name));
        return Ok(Action::requeue(Duration::from_millis(10)));
    }
    if e.run.generation != generation {
        e.run.generation = generation;
        if e.run.spec.priority != job.spec.priority {
            e.run.spec.priority = job.spec.priority;
            lock(&ctx.api.queue).set_priority(&ns, &name, job.spec.priority);
        }
        if job.spec.suspend != e.run.suspended && !e.run.finished() {
            e.run.suspended = job.spec.suspend;
            e.run.spec.suspend = job.spec.suspend;
            if job.spec.suspend {
                let n = ctx.api.cancel_job(&ns, &name);
                e.tasks.clear();
                e.events.push((
                    EventType::Normal,
                    "Suspended",
                    format!("{n} running tasks given back"),
                ));
            } else {
                if e.run.start_time.is_none() {
                    e.run.start_time = Some(now());
                }
                let w = e.run.start();
                ctx.enqueue(e, w);
                e.events.push((
                    EventType::Normal,
                    "Resumed",
                    "re-planning from the ledger".into(),
                ));
            }
        }
        e.dirty = true;
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}

async fn ttl(
    job: &TranscodeJob,
    api: &Api<TranscodeJob>,
    status: &TranscodeJobStatus,
) -> Result<Action, Error> {
    let Some(ttl) = job.spec.ttl_seconds_after_finished else {
        return Ok(Action::await_change());
    };
    let Some(done) = &status.completion_time else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    let age = k8s_openapi::jiff::Timestamp::now()
        .duration_since(done.0)
        .as_secs_f64();
    let left = ttl as f64 - age;
    if left > 0.0 {
        return Ok(Action::requeue(Duration::from_secs_f64(left.min(3600.0))));
    }
    let (ns, name) = key(job);
    tracing::info!(job = %format!("{ns}/{name}"), ttl, "deleting a finished job (ttlSecondsAfterFinished)");
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => Ok(Action::await_change()),
        Err(e) if is_404(&e) => Ok(Action::await_change()),
        Err(e) => Err(Error::kube(format!("delete {ns}/{name}"), e)),
    }
}

/// How long a finalized job's uid is remembered (far longer than a watch cache lags).
const FINALIZED_MEMORY: Duration = Duration::from_secs(600);

async fn finalize(job: &TranscodeJob, ctx: &Ctx, api: &Api<TranscodeJob>) -> Result<Action, Error> {
    let (ns, name) = key(job);
    let uid = job.uid().unwrap_or_default();
    if !job.finalizers().iter().any(|f| f == FINALIZER) || lock(&ctx.finalized).contains_key(&uid) {
        lock(&ctx.jobs).remove(&(ns, name));
        return Ok(Action::await_change());
    }
    // Whether a worker may have written to the ledger: the plan came back, or some task was handed out.
    let touched = lock(&ctx.api.queue).ever_leased(&ns, &name)
        || lock(&ctx.jobs)
            .get(&(ns.clone(), name.clone()))
            .is_none_or(|e| e.run.plan.is_some() || e.touched);
    if let Some(e) = lock(&ctx.jobs).get_mut(&(ns.clone(), name.clone())) {
        e.touched |= touched;
    }
    // Cancel the job's work, once: the cleanup task queued below belongs to the job too.
    let cleanup_queued = lock(&ctx.jobs)
        .get(&(ns.clone(), name.clone()))
        .is_some_and(|e| e.cleanup.is_some());
    let stopped = if cleanup_queued {
        0
    } else {
        ctx.api.cancel_job(&ns, &name)
    };
    if stopped > 0 {
        tracing::info!(job = %format!("{ns}/{name}"), tasks = stopped, "job deleted: running tasks cancelled");
    }
    // Wait until the cancelled tasks' workers say they stopped (or their leases would have run out): a
    // worker still uploading a chunk would otherwise leave it behind after the cleanup.
    if ctx.api.unacknowledged(&ns, &name) > 0 {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    // The ledger outlives the stitch (its plan and result stay, so a lost report is recovered): it goes
    // with the job.
    let needs_cleanup = touched && cluster_validate(&job.spec).is_ok();
    if needs_cleanup {
        let pool = resolve_pool(job.spec.pool.as_deref(), &ns, &ctx.cfg.default_pool);
        let mut jobs = lock(&ctx.jobs);
        let e = jobs
            .entry((ns.clone(), name.clone()))
            .or_insert_with(|| Entry {
                run: JobRun::new(
                    &ns,
                    &name,
                    &job.uid().unwrap_or_default(),
                    0,
                    job.spec.clone(),
                    pool,
                ),
                tasks: HashSet::new(),
                started: Instant::now(),
                dirty: false,
                written: None,
                last_write: None,
                cleanup: None,
                cleanup_done: false,
                touched: false,
                cleanup_since: None,
                events: Vec::new(),
            });
        e.tasks.clear();
        e.dirty = false;
        e.touched = true;
        let waited = e.cleanup_since.get_or_insert_with(Instant::now).elapsed();
        if !e.cleanup_done && waited > CLEANUP_PATIENCE {
            // No worker ran the cleanup (the pool cannot schedule any): let the job go rather than hang.
            tracing::warn!(job = %format!("{ns}/{name}"), ledger = %e.run.ledger,
                "no worker cleaned the job's temporary objects in time; deleting the job anyway");
            e.cleanup_done = true;
            e.events.push((
                EventType::Warning,
                "CleanupAbandoned",
                format!(
                    "no worker of pool {} ran the cleanup within {} s; objects under {} may remain",
                    e.run.pool,
                    CLEANUP_PATIENCE.as_secs(),
                    e.run.ledger
                ),
            ));
        }
        if !e.cleanup_done {
            if e.cleanup.is_none() {
                let w = Work {
                    kind: WorkKind::Cleanup,
                    ..e.run.start().remove(0)
                };
                ctx.enqueue(e, vec![w]);
            }
            return Ok(Action::requeue(Duration::from_millis(200)));
        }
    }
    let left: Vec<String> = job
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch =
        json!({"metadata": {"finalizers": left, "resourceVersion": job.resource_version()}});
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        Err(e) if is_404(&e) => {}
        Err(e) => return Err(Error::kube(format!("finalizer of {ns}/{name}"), e)),
    }
    lock(&ctx.jobs).remove(&(ns.clone(), name.clone()));
    {
        let mut done = lock(&ctx.finalized);
        done.retain(|_, t| t.elapsed() < FINALIZED_MEMORY);
        done.insert(uid, Instant::now());
    }
    tracing::info!(job = %format!("{ns}/{name}"), "job deleted; its temporary objects are gone");
    Ok(Action::await_change())
}

fn error_policy(_job: Arc<TranscodeJob>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Apply a task event to its job.
fn on_event(ctx: &Ctx, ev: TaskEvent) {
    let mut jobs = lock(&ctx.jobs);
    let (tasks, outcome) = match ev {
        TaskEvent::Completed {
            tasks,
            result,
            worker_seconds,
        } => (tasks, Ok((result, worker_seconds))),
        TaskEvent::Failed { tasks, failure, .. } => (tasks, Err(failure)),
    };
    for t in tasks {
        let Ok(work) = serde_json::from_value::<Work>(t.work.clone()) else {
            continue;
        };
        let Some(e) = jobs.get_mut(&(t.namespace.clone(), t.job.clone())) else {
            continue;
        };
        if e.run.uid != work.uid {
            continue;
        }
        e.tasks.remove(&t.id);
        e.dirty = true;
        match &outcome {
            Ok((result, secs)) => match work.kind {
                WorkKind::Plan => match serde_json::from_value::<PlanResult>(result.clone()) {
                    Ok(r) => {
                        let note = format!(
                            "{} chunks of {:.1} s, encoders {}; {} already in the ledger",
                            r.plan.chunks,
                            r.plan.target_seconds,
                            r.plan.encoders.join(","),
                            r.done.len()
                        );
                        e.run.worker_seconds += secs;
                        let next = e.run.on_plan(r);
                        ctx.enqueue(e, next);
                        e.events.push((EventType::Normal, "Planned", note));
                    }
                    Err(err) => {
                        e.run.on_failed(
                            "WorkerIncompatible",
                            &format!("plan result unreadable: {err}"),
                            now(),
                        );
                    }
                },
                WorkKind::Chunk | WorkKind::Audio => {
                    let r: ChunkResult = serde_json::from_value(result.clone()).unwrap_or_default();
                    let next = e.run.on_encoded(work.kind, work.chunk, &r, *secs);
                    if !next.is_empty() {
                        e.events.push((
                            EventType::Normal,
                            "Encoded",
                            format!(
                                "all chunks encoded ({} reused from the ledger)",
                                e.run.reused
                            ),
                        ));
                    }
                    ctx.enqueue(e, next);
                }
                WorkKind::Stitch => {
                    let r: StitchResult =
                        serde_json::from_value(result.clone()).unwrap_or_default();
                    let n = r.renditions.len();
                    e.run.on_stitched(r, *secs, now());
                    e.events.push((
                        EventType::Normal,
                        "Completed",
                        format!("{n} renditions published to {}", e.run.spec.output.uri),
                    ));
                }
                WorkKind::Cleanup => e.cleanup_done = true,
            },
            Err(f) => {
                if work.kind == WorkKind::Cleanup {
                    // Nothing more can be done about a ledger that cannot be deleted: say so and let go.
                    tracing::warn!(ledger = %work.ledger, error = %f.message, "could not delete a job's temporary objects");
                    e.cleanup_done = true;
                    continue;
                }
                let what = match work.chunk {
                    Some(c) => format!("chunk {c}: {}", f.message),
                    None => format!(
                        "{} task: {}",
                        format!("{:?}", work.kind).to_lowercase(),
                        f.message
                    ),
                };
                e.run.on_failed(&f.reason, &what, now());
                e.events.push((
                    EventType::Warning,
                    "Failed",
                    format!("{}: {what}", f.reason),
                ));
                let (ns, job) = (t.namespace.clone(), t.job.clone());
                drop(jobs);
                ctx.api.cancel_job(&ns, &job);
                jobs = lock(&ctx.jobs);
            }
        }
    }
}

/// Write statuses that changed, coalesced: a phase change at once, progress at most once per interval.
async fn write_statuses(ctx: &Ctx) {
    let throttle = Throttle {
        interval: ctx.cfg.status_interval,
    };
    let mut writes = Vec::new();
    {
        let progress = lock(&ctx.api.progress);
        let mut jobs = lock(&ctx.jobs);
        for (k, e) in jobs.iter_mut() {
            if !e.dirty && e.events.is_empty() {
                continue;
            }
            let in_flight: u64 = e.tasks.iter().filter_map(|t| progress.get(t)).sum();
            let t = now();
            let mut st = e.run.status(e.started.elapsed(), in_flight, &t);
            let old = e.written.clone().unwrap_or_default();
            keep_transition_times(&mut st.conditions, &old.conditions);
            let phase_changed = old.phase != st.phase
                || old
                    .conditions
                    .iter()
                    .map(|c| (&c.type_, &c.status, &c.reason))
                    .ne(st
                        .conditions
                        .iter()
                        .map(|c| (&c.type_, &c.status, &c.reason)));
            let d = throttle.decide(e.dirty, phase_changed, e.last_write.map(|w| w.elapsed()));
            let events = std::mem::take(&mut e.events);
            if d == Decision::WriteNow {
                e.dirty = false;
                e.last_write = Some(Instant::now());
                e.written = Some(st.clone());
                writes.push((k.clone(), Some(st), events));
            } else if !events.is_empty() {
                writes.push((k.clone(), None, events));
            }
        }
    }
    for ((ns, name), st, events) in writes {
        let api: Api<TranscodeJob> = Api::namespaced(ctx.client.clone(), &ns);
        if let Some(st) = st {
            match api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": st})),
                )
                .await
            {
                Ok(_) => {
                    ctx.status_writes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(job = %format!("{ns}/{name}"), error = %e, "status write failed; retrying");
                    if let Some(en) = lock(&ctx.jobs).get_mut(&(ns.clone(), name.clone())) {
                        en.dirty = true;
                    }
                }
            }
        }
        if !events.is_empty() {
            let uid = lock(&ctx.jobs)
                .get(&(ns.clone(), name.clone()))
                .map(|e| e.run.uid.clone());
            let r = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(format!("{}/v1alpha1", tessera_crds::GROUP)),
                kind: Some("TranscodeJob".into()),
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                uid,
                ..Default::default()
            };
            for (t, reason, note) in events {
                publish_ref(ctx, &r, t, reason, note).await;
            }
        }
    }
}

fn pod_state(p: &Pod) -> WorkerState {
    if p.metadata.deletion_timestamp.is_some() {
        return WorkerState::Terminating;
    }
    let status = p.status.clone().unwrap_or_default();
    match status.phase.as_deref() {
        Some("Failed" | "Succeeded") => WorkerState::Terminating,
        Some("Running")
            if status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True") =>
        {
            WorkerState::Ready
        }
        _ => WorkerState::Pending,
    }
}

/// One pass over every WorkerPool: access for the queue API, then scale.
async fn reconcile_pools(ctx: &Ctx) -> Result<(), Error> {
    let pools: Api<WorkerPool> = Api::all(ctx.client.clone());
    let list = pools
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list WorkerPools".into(), e))?;
    {
        let mut access = lock(&ctx.api.access);
        access.pools = list
            .items
            .iter()
            .map(|p| {
                let ns = p.namespace().unwrap_or_default();
                (
                    format!("{ns}/{}", p.name_any()),
                    (ns, p.spec.service_account_name.clone()),
                )
            })
            .collect();
    }
    for pool in list.items {
        if let Err(e) = scale_pool(ctx, &pool).await {
            tracing::warn!(pool = %pool.name_any(), error = %e, "scaling failed; retrying");
        }
    }
    Ok(())
}

async fn scale_pool(ctx: &Ctx, pool: &WorkerPool) -> Result<(), Error> {
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let key = format!("{ns}/{name}");
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("{POOL_LABEL}={name}")))
        .await
        .map_err(|e| Error::kube(format!("pods of pool {key}"), e))?;
    let (depth, leases) = {
        let q = lock(&ctx.api.queue);
        (q.depth(&key), q.leases_by_worker(&key))
    };
    let t = Instant::now();
    let workers: Vec<Worker> = {
        let mut idle = lock(&ctx.idle_since);
        pods.items
            .iter()
            .map(|p| {
                let pname = p.name_any();
                let busy = leases.get(&pname).copied().unwrap_or(0) > 0;
                let state = pod_state(p);
                let idle_for = if busy || state != WorkerState::Ready {
                    idle.remove(&pname);
                    Duration::ZERO
                } else {
                    t - *idle.entry(pname.clone()).or_insert(t)
                };
                Worker {
                    name: pname,
                    state,
                    busy,
                    idle_for,
                }
            })
            .collect()
    };
    let shape = PoolShape {
        min: pool.spec.min_workers,
        max: pool.spec.max_workers,
        tasks_per_worker: pool.spec.tasks_per_worker,
        cooldown: Duration::from_secs(u64::from(pool.spec.cooldown_seconds)),
    };
    let plan = scale::plan(
        Load {
            queued: depth.queued,
            leased: depth.leased,
        },
        shape,
        &workers,
    );
    for _ in 0..plan.create {
        let suffix: String = (0..5)
            .map(|_| fastrand::alphanumeric().to_ascii_lowercase())
            .collect();
        let pod = podspec::worker_pod(&WorkerPodInput {
            pool: &name,
            namespace: &ns,
            pool_uid: &pool.uid().unwrap_or_default(),
            spec: &pool.spec,
            suffix: &suffix,
            service_account: &pool.spec.service_account_name,
            queue_service: &ctx.cfg.queue_service,
            queue_lease: &ctx.cfg.lease,
        });
        pods_api
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| Error::kube(format!("create a worker of pool {key}"), e))?;
        tracing::info!(pool = %key, pod = %pod.name_any(), desired = plan.desired, "worker created");
    }
    for victim in &plan.delete {
        // No new lease for it from here on; then make sure it did not take one meanwhile.
        lock(&ctx.api.draining).insert(victim.clone());
        let busy = lock(&ctx.api.queue)
            .leases_by_worker(&key)
            .contains_key(victim);
        if busy {
            lock(&ctx.api.draining).remove(victim);
            continue;
        }
        match pods_api.delete(victim, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(pool = %key, pod = %victim, desired = plan.desired, "idle worker removed")
            }
            Err(e) if is_404(&e) => {}
            Err(e) => {
                lock(&ctx.api.draining).remove(victim);
                return Err(Error::kube(format!("delete worker {victim}"), e));
            }
        }
        lock(&ctx.idle_since).remove(victim);
    }
    // Forget draining marks of pods that are gone.
    {
        let live: HashSet<String> = pods.items.iter().map(|p| p.name_any()).collect();
        lock(&ctx.api.draining).retain(|w| live.contains(w));
    }
    let status = WorkerPoolStatus {
        desired: plan.desired,
        pending: plan.pending + plan.create,
        ready: plan.ready,
        busy: plan.busy,
        idle: plan.idle,
    };
    if pool.status.as_ref() != Some(&status) {
        let api: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(|e| Error::kube(format!("status of pool {key}"), e))?;
    }
    Ok(())
}

/// Run every controller until the process ends (called once this replica leads).
pub async fn run(ctx: Arc<Ctx>, mut events: mpsc::UnboundedReceiver<TaskEvent>) {
    let c = ctx.clone();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            on_event(&c, ev);
        }
    });
    let c = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            write_statuses(&c).await;
        }
    });
    let c = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            c.api.expire();
        }
    });
    let c = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = c.api.queued.notified() => {}
            }
            if let Err(e) = reconcile_pools(&c).await {
                tracing::warn!(error = %e, "pool pass failed");
            }
        }
    });
    let jobs: Api<TranscodeJob> = Api::all(ctx.client.clone());
    Controller::new(jobs, watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_crds::tenancy::{AccessRule, Namespaces, NamespacesFrom};

    fn pool(allowed: NamespacesFrom, access: Vec<AccessRule>) -> tessera_crds::WorkerPoolSpec {
        let mut p: tessera_crds::WorkerPoolSpec = serde_json::from_value(json!({})).unwrap();
        p.allowed_namespaces = Namespaces {
            from: allowed,
            selector: None,
        };
        p.access = access;
        p
    }

    fn job(input: &str, output: &str) -> tessera_crds::TranscodeJobSpec {
        serde_json::from_value(json!({
            "input": {"uri": input}, "output": {"uri": output},
            "renditions": [{"name": "a", "video": {"codec": "h264"}}]
        }))
        .unwrap()
    }

    #[test]
    fn admission_table() {
        let l = Default::default();
        let j = job("s3://m/a/in.mp4", "s3://m/a/out/");
        let same = pool(NamespacesFrom::Same, vec![]);
        let all = pool(NamespacesFrom::All, vec![]);
        let scoped = pool(
            NamespacesFrom::All,
            vec![AccessRule {
                namespaces: Namespaces {
                    from: NamespacesFrom::All,
                    selector: None,
                },
                read: vec!["s3://m/{namespace}/".into()],
                write: vec!["s3://m/{namespace}/out/".into()],
            }],
        );
        // Own namespace: a missing pool is waited for; an existing one admits.
        assert_eq!(admit("a/p", "a", "a", None, &l, &j), Admission::PoolMissing);
        assert_eq!(
            admit("a/p", "a", "a", Some(&same), &l, &j),
            Admission::Admitted
        );
        // Another namespace: missing and forbidden read the same.
        let missing = admit("b/p", "b", "a", None, &l, &j);
        let forbidden = admit("b/p", "b", "a", Some(&same), &l, &j);
        assert_eq!(missing, forbidden);
        assert!(
            matches!(&missing, Admission::PoolNotAllowed(m) if m.starts_with("WorkerPool b/p does not exist or does not serve namespace a"))
        );
        assert_eq!(
            admit("b/p", "b", "a", Some(&all), &l, &j),
            Admission::Admitted
        );
        assert_eq!(
            admit("b/p", "b", "a", Some(&scoped), &l, &j),
            Admission::Admitted
        );
        let other = job("s3://m/c/in.mp4", "s3://m/a/out/");
        assert!(
            matches!(admit("b/p", "b", "a", Some(&scoped), &l, &other), Admission::AccessNotAllowed(m) if m.contains("s3://m/c/in.mp4") && m.contains("WorkerPool b/p"))
        );
        assert!(!tenancy_needs_labels(&scoped));
        assert!(tenancy_needs_labels(&pool(
            NamespacesFrom::Selector,
            vec![]
        )));
    }
}
