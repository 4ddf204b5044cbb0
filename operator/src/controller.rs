//! The leader's controllers: the I/O around the state's owner (`core`). Fetch, ask the owner (which calls
//! the pure parts: `jobrun`, `queue`, `status`), apply what it answers, report.
//!
//! ```text
//!  TranscodeJob watch ──▶ reconcile: finalizer, validate, pool, admit ──Observe/Accept(Run|Wait|Refuse)──▶ core
//!  queue API ───────────▶ Complete/Fail ──▶ core: JobRun::on(Planned / Encoded / Stitched / Failed) (next tasks)
//!  every 200 ms ────────▶ status writer ──Statuses──▶ core: Throttle ──▶ PATCH status, Events
//!  WorkerPool watch, its pods' watch (reflector), every second ──▶ pool controller: PoolLoad ──▶ autoscale::plan
//!                       ──▶ create / Drain+delete pods, pool status
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::json;
use tessera_crds::{Phase, TranscodeJob, TranscodeJobStatus, WorkerPool};

use crate::api::PoolAccess;
use crate::autoscale::{self, Load, PoolShape, WorkerState};
use crate::core::{now_time, Admit, Cmd, CoreHandle, FinalizeStep, Observation, Observed};
use crate::jobrun::JobRun;
use crate::podspec::{self, WorkerPodInput, POOL_LABEL};
use crate::status::Throttle;
use crate::Error;

pub const FINALIZER: &str = "tessera.dev/cleanup";
/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "tessera-operator";

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
    /// Which pools (and so which jobs) this operator serves, when several releases share a cluster.
    pub ownership: Ownership,
}

/// The label by which a WorkerPool names the operator (Helm release) that serves it.
pub const OPERATOR_LABEL: &str = "tessera.dev/operator";

/// Which WorkerPools an operator serves: those labelled with its instance, and the unlabelled ones only
/// where it is the cluster's primary. The primary also takes the jobs that name no pool or a pool that does
/// not exist (to say so in their status), so with any number of releases each job has exactly one operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// This operator's instance (the Helm release's full name): pools labelled `tessera.dev/operator` with
    /// it are served here.
    pub instance: String,
    /// Serve pools without the label, and jobs without a pool (one operator per cluster does).
    pub primary: bool,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            instance: "tessera".into(),
            primary: true,
        }
    }
}

impl Ownership {
    /// Whether a pool with these labels is served by this operator.
    pub fn serves_pool(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        match labels.get(OPERATOR_LABEL) {
            Some(instance) => *instance == self.instance,
            None => self.primary,
        }
    }

    /// Whether a job is served here: `pool` is the job's pool as found (`None`: no such pool), `names_pool`
    /// whether the job names one (the default pool is the primary's).
    pub fn serves_job(
        &self,
        names_pool: bool,
        pool: Option<&std::collections::BTreeMap<String, String>>,
    ) -> bool {
        match pool {
            Some(labels) if names_pool => self.serves_pool(labels),
            _ => self.primary,
        }
    }
}

/// What the controllers share: the API client, the way to the state's owner, and counters.
/// Latency buckets (seconds), with a bound at the 100 ms reconcile goal.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Start a finalizer write beside the reconcile, which returns at once: the write's own watch event (or,
/// should it fail, the requeue the reconcile asked for) brings the job back. A reconcile therefore never
/// waits on the API server, however many jobs arrive or leave at once; `then` runs after a write that
/// succeeded (or found the job gone).
fn spawn_finalizer_write(
    ctx: &Arc<Ctx>,
    api: Api<TranscodeJob>,
    (ns, name): (String, String),
    patch: serde_json::Value,
    then: Option<Cmd>,
) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        for attempt in 1..=4 {
            let t0 = Instant::now();
            let r = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            ctx.api_write_seconds.observe(t0.elapsed().as_secs_f64());
            match r {
                Ok(_) => break,
                Err(e) if is_404(&e) => break,
                // The job changed under the write: its watch event brings it back with what it is now.
                Err(kube::Error::Api(s)) if s.code == 409 => return,
                Err(e) if attempt == 4 => {
                    tracing::warn!(job = %format!("{ns}/{name}"), error = %e, "finalizer write failed; the job's requeue tries again");
                    return;
                }
                Err(e) => {
                    tracing::debug!(job = %format!("{ns}/{name}"), error = %e, attempt, "finalizer write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
        if let Some(cmd) = then {
            ctx.core.tell(cmd).await;
        }
    });
}

pub struct Ctx {
    pub client: Client,
    pub core: CoreHandle,
    pub cfg: Config,
    recorder: Recorder,
    /// The WorkerPool controller's watched cache, once it runs.
    pools: std::sync::OnceLock<Store<WorkerPool>>,
    pub status_writes: AtomicU64,
    pub reconciles: AtomicU64,
    /// How long each TranscodeJob reconcile took (its decisions and the owner's answers; the finalizer
    /// writes it starts run beside it, in `api_write_seconds`).
    pub reconcile_seconds: Histogram,
    /// How long each finalizer write to the API server took.
    pub api_write_seconds: Histogram,
}

impl Ctx {
    pub fn new(client: Client, core: CoreHandle, cfg: Config) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "tessera-operator".into(),
                instance: Some(cfg.identity.clone()),
            },
        );
        Self {
            client,
            core,
            cfg,
            recorder,
            pools: std::sync::OnceLock::new(),
            status_writes: AtomicU64::new(0),
            reconciles: AtomicU64::new(0),
            reconcile_seconds: Histogram::new(LATENCY_BUCKETS.iter().copied()),
            api_write_seconds: Histogram::new(LATENCY_BUCKETS.iter().copied()),
        }
    }

    /// Ask the state's owner; it is gone only when the process is ending.
    async fn ask<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, Error> {
        self.core.ask(make).await.map_err(|_| Error::Stopped)
    }
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
/// Whether `job` has not started and runs on `pool` (`namespace/name`): what a pool's appearance may admit.
fn waits_for(job: &TranscodeJob, pool: &str, default: &str) -> bool {
    let pending = job
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_none_or(|p| p == Phase::Pending);
    pending
        && job.metadata.deletion_timestamp.is_none()
        && resolve_pool(
            job.spec.pool.as_deref(),
            &job.namespace().unwrap_or_default(),
            default,
        ) == pool
}

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
    /// With the pool's result store for the job, where it has one.
    Admitted {
        results: Option<tessera_crds::work::ResultStore>,
    },
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
    use tessera_crds::tenancy::{check_access, namespaces_admit, result_store_for};
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
        )
        .and_then(|()| {
            result_store_for(
                &p.access,
                p.result_store.as_deref(),
                pool,
                pool_ns,
                job_ns,
                labels,
            )
        }) {
            Ok(results) => Admission::Admitted {
                results: results.map(|uri| tessera_crds::work::ResultStore {
                    uri,
                    retention_seconds: p.result_retention(),
                }),
            },
            Err(m) => Admission::AccessNotAllowed(m),
        },
    }
}

fn is_404(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
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

/// The one way a job's status is written: server-side apply of the whole status under the operator's field
/// manager, so a field the new status no longer has (an ETA, a condition) is removed, never left stale as
/// a merge patch would leave it.
async fn apply_status(
    ctx: &Ctx,
    ns: &str,
    name: &str,
    status: &TranscodeJobStatus,
) -> Result<(), Error> {
    let api: Api<TranscodeJob> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({
        "apiVersion": format!("{}/v1alpha1", tessera_crds::GROUP),
        "kind": "TranscodeJob",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|e| Error::kube(format!("status of {ns}/{name}"), e))?;
    ctx.status_writes.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn reconcile(job: Arc<TranscodeJob>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.reconciles.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let r = reconcile_job(job, ctx.clone()).await;
    ctx.reconcile_seconds.observe(t0.elapsed().as_secs_f64());
    r
}

/// The job as the state's owner needs to see it.
fn observed(job: &TranscodeJob) -> Observed {
    let (namespace, name) = key(job);
    Observed {
        namespace,
        name,
        uid: job.uid().unwrap_or_default(),
        generation: job.metadata.generation.unwrap_or(0),
        spec: job.spec.clone(),
        terminal: matches!(
            job.status.as_ref().and_then(|s| s.phase),
            Some(Phase::Succeeded | Phase::Failed)
        ),
    }
}

async fn reconcile_job(job: Arc<TranscodeJob>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let (ns, name) = key(&job);
    let pool = resolve_pool(job.spec.pool.as_deref(), &ns, &ctx.cfg.default_pool);
    if !serves(&ctx, job.spec.pool.is_some(), &pool).await? {
        // Another release's operator serves this job's pool: not a field of it is touched here.
        return Ok(Action::await_change());
    }
    let api: Api<TranscodeJob> = Api::namespaced(ctx.client.clone(), &ns);
    if job.metadata.deletion_timestamp.is_some() {
        return finalize(&job, &ctx, api).await;
    }
    if !job.finalizers().iter().any(|f| f == FINALIZER) {
        // Nothing is queued before the finalizer is there (admission waits for the write's watch event),
        // so nothing a deletion must clean up can exist without it.
        let mut f = job.finalizers().to_vec();
        f.push(FINALIZER.into());
        let patch = json!({"metadata": {"finalizers": f}});
        spawn_finalizer_write(&ctx, api, (ns, name), patch, None);
        // The write's watch event is what normally comes next; this only covers a write that failed.
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let status = job.status.clone().unwrap_or_default();
    let seen = observed(&job);
    match ctx.ask(|reply| Cmd::Observe { job: seen, reply }).await? {
        Observation::Finished => return ttl(&job, &api, &status).await,
        Observation::Following => return Ok(Action::requeue(Duration::from_secs(60))),
        Observation::Replaced => return Ok(Action::requeue(Duration::from_millis(10))),
        Observation::Unknown => {}
    }
    let uid = job.uid().unwrap_or_default();
    let generation = job.metadata.generation.unwrap_or(0);
    let admission = match cluster_validate(&job.spec) {
        Err(message) => Admit::Refuse {
            reason: "InvalidSpec",
            message,
        },
        Ok(()) => admission(&ctx, &pool, &ns, &job.spec).await?,
    };
    let action = match &admission {
        Admit::Run { .. } => Action::requeue(Duration::from_secs(60)),
        // The pool's creation wakes the job (the pool watch); this is a safety net.
        Admit::Wait(_) => Action::requeue(Duration::from_secs(30)),
        Admit::Refuse { .. } => Action::await_change(),
    };
    let mut run = JobRun::new(&ns, &name, &uid, generation, job.spec.clone(), pool);
    // A job already running before a restart or failover keeps its start time.
    run.start_time = status.start_time.clone();
    let status = job.status.clone();
    ctx.ask(|reply| Cmd::Accept {
        run: Box::new(run),
        status,
        admit: admission,
        reply,
    })
    .await?;
    Ok(action)
}

/// May the job run on `pool`? Reads the pool (cache) and, where a selector needs them, the namespace's
/// labels; the decision itself is `admit`'s.
async fn admission(
    ctx: &Ctx,
    pool: &str,
    ns: &str,
    spec: &tessera_crds::TranscodeJobSpec,
) -> Result<Admit, Error> {
    let (pns, pname) = pool.split_once('/').unwrap_or(("", pool));
    let found = find_pool(ctx, pns, pname).await?;
    // The job namespace's labels, only where a selector needs them.
    let labels = match &found {
        Some(p) if tenancy_needs_labels(&p.spec) => {
            let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
            nss.get_opt(ns)
                .await
                .map_err(|e| Error::kube(format!("namespace {ns}"), e))?
                .and_then(|n| n.metadata.labels)
                .unwrap_or_default()
        }
        _ => Default::default(),
    };
    Ok(
        match admit(pool, pns, ns, found.as_ref().map(|p| &p.spec), &labels, spec) {
            Admission::Admitted { results } => Admit::Run { results },
            Admission::PoolNotAllowed(message) => Admit::Refuse {
                reason: "PoolNotAllowed",
                message,
            },
            Admission::AccessNotAllowed(message) => Admit::Refuse {
                reason: "AccessNotAllowed",
                message,
            },
            Admission::PoolMissing => Admit::Wait(format!(
                "WorkerPool {pool} does not exist; the job waits for it: create it, or name an existing pool in \
                 spec.pool (kubectl get workerpools -n {ns})"
            )),
        },
    )
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

/// A deleted job: its tasks are cancelled, its ledger deleted by a cleanup task (the owner decides the
/// steps), then the finalizer goes. kube-runtime's `finalizer` helper is not used: it runs the cleanup
/// inline in one reconcile, where this one waits across reconciles for workers to acknowledge and for a
/// cleanup task to run on the job's pool.
async fn finalize(
    job: &TranscodeJob,
    ctx: &Arc<Ctx>,
    api: Api<TranscodeJob>,
) -> Result<Action, Error> {
    let (ns, name) = key(job);
    let seen = observed(job);
    let step = ctx
        .ask(|reply| Cmd::Finalize {
            job: seen,
            pool: resolve_pool(job.spec.pool.as_deref(), &ns, &ctx.cfg.default_pool),
            ours: job.finalizers().iter().any(|f| f == FINALIZER),
            valid: cluster_validate(&job.spec).is_ok(),
            reply,
        })
        .await?;
    match step {
        FinalizeStep::Forget => return Ok(Action::await_change()),
        FinalizeStep::Wait(d) => return Ok(Action::requeue(d)),
        FinalizeStep::RemoveFinalizer => {}
    }
    let left: Vec<String> = job
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch =
        json!({"metadata": {"finalizers": left, "resourceVersion": job.resource_version()}});
    let done = Cmd::Finalized {
        namespace: ns.clone(),
        name: name.clone(),
        uid: job.uid().unwrap_or_default(),
    };
    spawn_finalizer_write(ctx, api, (ns.clone(), name.clone()), patch, Some(done));
    tracing::info!(job = %format!("{ns}/{name}"), "job deleted; its temporary objects are gone");
    // Gone once the write lands; should it fail, the owner answers `RemoveFinalizer` again then.
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn error_policy(_job: Arc<TranscodeJob>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Write the statuses the owner says changed (a phase change at once, progress at most once per interval),
/// and publish their events.
async fn write_statuses(ctx: &Ctx) -> Result<(), Error> {
    let throttle = Throttle {
        interval: ctx.cfg.status_interval,
    };
    let writes = ctx.ask(|reply| Cmd::Statuses { throttle, reply }).await?;
    for w in writes {
        let (ns, name) = (w.namespace, w.name);
        if let Some(st) = w.status {
            match apply_status(ctx, &ns, &name, &st).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(job = %format!("{ns}/{name}"), error = %e, "status write failed; retrying");
                    ctx.core
                        .tell(Cmd::StatusFailed {
                            namespace: ns.clone(),
                            name: name.clone(),
                        })
                        .await;
                }
            }
        }
        if !w.events.is_empty() {
            let r = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(format!("{}/v1alpha1", tessera_crds::GROUP)),
                kind: Some("TranscodeJob".into()),
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                uid: Some(w.uid),
                ..Default::default()
            };
            for (t, reason, note) in w.events {
                publish_ref(ctx, &r, t, reason, note).await;
            }
        }
    }
    Ok(())
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

/// What the WorkerPool controller reads: the controllers' context, and the watched caches of pools and of
/// worker pods (labelled with their pool).
struct PoolCtx {
    ctx: Arc<Ctx>,
    pools: Store<WorkerPool>,
    pods: Store<Pod>,
}

/// One pool: the queue API's access rules from every pool, then scale this one from its queue depth and
/// its pods (both from caches), and write its status when it changed.
async fn reconcile_pool(pool: Arc<WorkerPool>, p: Arc<PoolCtx>) -> Result<Action, Error> {
    let ctx = &p.ctx;
    let owner = &ctx.cfg.ownership;
    if !owner.serves_pool(pool.labels()) {
        // Another release's pool: its operator scales it and writes its status.
        return Ok(Action::await_change());
    }
    let access = PoolAccess {
        pools: p
            .pools
            .state()
            .iter()
            .filter(|wp| owner.serves_pool(wp.labels()))
            .map(|wp| {
                let ns = wp.namespace().unwrap_or_default();
                (
                    format!("{ns}/{}", wp.name_any()),
                    (ns, wp.spec.service_account_name.clone()),
                )
            })
            .collect(),
    };
    ctx.core.tell(Cmd::SetAccess(access)).await;
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let key = format!("{ns}/{name}");
    let pods: Vec<(String, WorkerState)> = p
        .pods
        .state()
        .iter()
        .filter(|pod| {
            pod.namespace().as_deref() == Some(ns.as_str())
                && pod.labels().get(POOL_LABEL) == Some(&name)
        })
        .map(|pod| (pod.name_any(), pod_state(pod)))
        .collect();
    let (depth, workers) = ctx
        .ask(|reply| Cmd::PoolLoad {
            pool: key.clone(),
            pods,
            reply,
        })
        .await?;
    let shape = PoolShape {
        min: pool.spec.min_workers,
        max: pool.spec.max_workers,
        tasks_per_worker: pool.spec.tasks_per_worker,
        cooldown: Duration::from_secs(u64::from(pool.spec.cooldown_seconds)),
    };
    let plan = autoscale::plan(
        Load {
            queued: depth.queued,
            leased: depth.leased,
        },
        shape,
        &workers,
    );
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
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
        // No new lease for it from here on, unless it took one meanwhile (then it stays).
        let idle_now = ctx
            .ask(|reply| Cmd::Drain {
                pool: key.clone(),
                worker: victim.clone(),
                reply,
            })
            .await?;
        if !idle_now {
            continue;
        }
        match pods_api.delete(victim, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(pool = %key, pod = %victim, desired = plan.desired, "idle worker removed")
            }
            Err(e) if is_404(&e) => {}
            Err(e) => {
                ctx.core
                    .tell(Cmd::Undrain {
                        worker: victim.clone(),
                    })
                    .await;
                return Err(Error::kube(format!("delete worker {victim}"), e));
            }
        }
    }
    // Busy workers carry the do-not-disrupt annotations, idle ones lose them (within a tick of the change).
    for w in workers
        .iter()
        .filter(|w| w.state != WorkerState::Terminating)
    {
        let Some(pod) = p.pods.get(&ObjectRef::new(&w.name).within(&ns)) else {
            continue;
        };
        if plan.delete.contains(&w.name) {
            continue;
        }
        let Some(patch) =
            podspec::disruption_patch(pod.annotations(), w.busy, &pool.spec.pod_annotations)
        else {
            continue;
        };
        match pods_api
            .patch(&w.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::debug!(pool = %key, pod = %w.name, busy = w.busy, "disruption annotations updated")
            }
            Err(e) if is_404(&e) => {}
            Err(e) => return Err(Error::kube(format!("annotate worker {}", w.name), e)),
        }
    }
    let mut status = autoscale::pool_status(&plan, pool.metadata.generation, &now_time());
    let old = pool.status.clone().unwrap_or_default();
    crate::jobrun::keep_transition_times(&mut status.conditions, &old.conditions);
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
    Ok(Action::await_change())
}

fn pool_error_policy(pool: Arc<WorkerPool>, err: &Error, _p: Arc<PoolCtx>) -> Action {
    tracing::warn!(pool = %pool.name_any(), error = %err, "scaling failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// Every second, and whenever tasks are queued: the queue's depth changes without any watch event.
fn pool_ticks(core: CoreHandle) -> impl futures_util::Stream<Item = ()> + Send {
    futures_util::stream::unfold(core, |core| async move {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = core.shared.queued.notified() => {}
        }
        Some(((), core))
    })
}

/// Whether this operator serves a job whose pool is `pool` (`ns/name`; `names_pool`: the job named it).
async fn serves(ctx: &Ctx, names_pool: bool, pool: &str) -> Result<bool, Error> {
    let (pns, pname) = pool.split_once('/').unwrap_or(("", pool));
    let found = find_pool(ctx, pns, pname).await?;
    Ok(ctx
        .cfg
        .ownership
        .serves_job(names_pool, found.as_ref().map(|p| p.labels())))
}

/// A job's pool: from the watched cache, or (not there yet: created a moment ago) from the API server.
async fn find_pool(ctx: &Ctx, ns: &str, name: &str) -> Result<Option<WorkerPool>, Error> {
    if let Some(store) = ctx.pools.get() {
        if let Some(p) = store.get(&ObjectRef::new(name).within(ns)) {
            return Ok(Some((*p).clone()));
        }
    }
    let pools: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), ns);
    pools
        .get_opt(name)
        .await
        .map_err(|e| Error::kube(format!("pool {ns}/{name}"), e))
}

/// Run every controller until the process ends (called once this replica leads).
pub async fn run(ctx: Arc<Ctx>) {
    let c = ctx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = write_statuses(&c).await {
                tracing::warn!(error = %e, "status pass failed");
            }
        }
    });
    // WorkerPools, watched, with the worker pods they own (a reflector cache of the labelled pods).
    let (pods, pods_writer) = reflector::store::<Pod>();
    let pod_events = watcher(
        Api::<Pod>::all(ctx.client.clone()),
        watcher::Config::default().labels(POOL_LABEL),
    )
    .default_backoff()
    .reflect(pods_writer)
    .touched_objects();
    let pools_ctl = Controller::new(
        Api::<WorkerPool>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .owns_stream(pod_events)
    .reconcile_all_on(pool_ticks(ctx.core.clone()));
    let pools = pools_ctl.store();
    let _ = ctx.pools.set(pools.clone());
    let pctx = Arc::new(PoolCtx {
        ctx: ctx.clone(),
        pools: pools.clone(),
        pods,
    });
    tokio::spawn(
        pools_ctl
            .run(reconcile_pool, pool_error_policy, pctx)
            .for_each(|_| async {}),
    );
    // The jobs' cache holds every TranscodeJob; their managedFields (one entry per writer, listing every
    // field it set) are never read here, so they are not kept.
    let (jobs_cache, jobs_writer) = reflector::store::<TranscodeJob>();
    let job_events = watcher(
        Api::<TranscodeJob>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|j| j.managed_fields_mut().clear())
    .reflect(jobs_writer)
    .applied_objects();
    let jobs_ctl = Controller::for_stream(job_events, jobs_cache);
    // A job waiting for its pool (Pending, PoolNotFound) is admitted when the pool appears, not at its
    // next periodic look.
    let (job_store, default_pool) = (jobs_ctl.store(), ctx.cfg.default_pool.clone());
    jobs_ctl
        .watches(
            Api::<WorkerPool>::all(ctx.client.clone()),
            watcher::Config::default(),
            move |pool: WorkerPool| {
                let key = format!(
                    "{}/{}",
                    pool.namespace().unwrap_or_default(),
                    pool.name_any()
                );
                job_store
                    .state()
                    .into_iter()
                    .filter(|j| waits_for(j, &key, &default_pool))
                    .map(|j| ObjectRef::from_obj(&*j))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pool_and_job_has_exactly_one_operator_among_releases() {
        let primary = Ownership::default();
        let second = Ownership {
            instance: "tessera-b".into(),
            primary: false,
        };
        let labelled = |v: &str| [(OPERATOR_LABEL.to_string(), v.to_string())].into();
        let none = std::collections::BTreeMap::new();
        for labels in [labelled("tessera"), labelled("tessera-b"), none.clone()] {
            assert_eq!(
                primary.serves_pool(&labels) as u8 + second.serves_pool(&labels) as u8,
                1,
                "{labels:?}"
            );
        }
        assert!(second.serves_pool(&labelled("tessera-b")));
        assert!(
            !primary.serves_pool(&labelled("tessera-c"))
                && !second.serves_pool(&labelled("tessera-c"))
        );
        // Jobs: by their pool's label; without a pool, or naming a missing one, the primary's.
        let cases = [
            (true, Some(labelled("tessera-b")), false),
            (true, Some(none.clone()), true),
            (true, None, true),
            (false, None, true),
            (false, Some(labelled("tessera-b")), true),
        ];
        for (names, pool, want_primary) in cases {
            assert_eq!(primary.serves_job(names, pool.as_ref()), want_primary);
            assert_eq!(second.serves_job(names, pool.as_ref()), !want_primary);
        }
    }
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
    fn a_pool_wakes_only_the_jobs_waiting_for_it() {
        let tj = |ns: &str, pool: Option<&str>, phase: Option<Phase>| {
            let mut spec = job("s3://m/in.mp4", "s3://m/out/");
            spec.pool = pool.map(String::from);
            let mut j = TranscodeJob::new("j", spec);
            j.metadata.namespace = Some(ns.into());
            j.status = phase.map(|p| TranscodeJobStatus {
                phase: Some(p),
                ..Default::default()
            });
            j
        };
        let d = "tessera-system/default";
        assert!(waits_for(&tj("a", Some("gpu"), None), "a/gpu", d));
        assert!(waits_for(
            &tj("a", Some("gpu"), Some(Phase::Pending)),
            "a/gpu",
            d
        ));
        assert!(waits_for(&tj("a", None, Some(Phase::Pending)), d, d));
        assert!(!waits_for(
            &tj("a", Some("gpu"), Some(Phase::Running)),
            "a/gpu",
            d
        ));
        assert!(!waits_for(
            &tj("a", Some("gpu"), Some(Phase::Failed)),
            "a/gpu",
            d
        ));
        assert!(!waits_for(&tj("b", Some("gpu"), None), "a/gpu", d));
        assert!(waits_for(&tj("b", Some("a/gpu"), None), "a/gpu", d));
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
            Admission::Admitted { results: None }
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
            Admission::Admitted { results: None }
        );
        assert_eq!(
            admit("b/p", "b", "a", Some(&scoped), &l, &j),
            Admission::Admitted { results: None }
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
