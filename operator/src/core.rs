//! The leader's state, with one owner: a task that holds the queue, the pools' access rules, the jobs it
//! runs and their bookkeeping, and applies one command at a time. The queue API's handlers (after
//! authenticating the caller), the job reconciler, the status writer, the pool scaler and `/metrics` send it
//! typed commands and await the answer on a reply channel; none of them holds any of this state, so there
//! is no lock to order and none to deadlock on.
//!
//! ```text
//!  queue API handlers ──Lease/Heartbeat/Complete/Fail/Release──┐
//!  job reconciler ──────Observe/Accept/Finalize/Finalized──────┤
//!  status writer ───────Statuses/StatusFailed──────────────────┼──▶ Core (one task) ──▶ replies
//!  pool controller ─────SetAccess/PoolLoad/Drain/Undrain────────┤        │ every 500 ms: expire leases
//!  /metrics ────────────Snapshot───────────────────────────────┘        └─▶ Shared: Notify (queued), counters
//! ```
//! Nothing here awaits I/O: the callers do the Kubernetes and HTTP calls with the answers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use tessera_crds::protocol::{
    CompleteReply, CompleteRequest, FailReply, FailRequest, HeartbeatReply, HeartbeatRequest,
    LeaseGrant, LeaseReply, LeasedTask, ReleaseReply, ReleaseRequest, TaskId, TaskResult,
};
use tessera_crds::work::{TaskFailure, Work, WorkKind};
use tessera_crds::{TranscodeJobSpec, TranscodeJobStatus};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::api::{Identity, PoolAccess};
use crate::autoscale::{Worker, WorkerState};
use crate::jobrun::{keep_transition_times, Event, JobRun, Stage};
use crate::queue::{Depth, Queue, QueueConfig, QueueError, Task};
use crate::status::{Decision, Throttle};

/// How long a deleted job waits for a worker to delete its temporary objects before it goes anyway.
pub const CLEANUP_PATIENCE: Duration = Duration::from_secs(300);
/// How long a finalized job's uid is remembered (far longer than a watch cache lags).
const FINALIZED_MEMORY: Duration = Duration::from_secs(600);

/// Signals and counters shared without locks: the lease long-poll's wake-up, leadership, and counts.
#[derive(Debug, Default)]
pub struct Shared {
    /// Woken when tasks are queued (long-polling lease requests wait on it, and the pool scaler).
    pub queued: Notify,
    /// Serving the queue only while this replica leads.
    pub leader: AtomicBool,
    pub counters: Counters,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub leases: AtomicU64,
    pub completed: AtomicU64,
    /// Encodes taken from earlier or concurrent identical work.
    pub chunks_reused: AtomicU64,
    /// Results deleted from result stores by collection tasks.
    pub results_collected: AtomicU64,
    /// Results a stitch found gone from the store (encoded again).
    pub results_missing: AtomicU64,
    pub failed: AtomicU64,
    pub expired: AtomicU64,
    pub rejected: AtomicU64,
}

/// An answer to a queue request that is not a success: its HTTP status and words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::UnknownTask(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        QueueError::NotHolder { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
    }
}

type Reply<T> = oneshot::Sender<T>;

/// A job as the watch saw it, for `Observe`.
#[derive(Debug, Clone)]
pub struct Observed {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub spec: TranscodeJobSpec,
    /// Its status says Succeeded or Failed.
    pub terminal: bool,
}

/// What the reconciler does next with an observed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Not run by this leader: validate and admit it, then `Accept`.
    Unknown,
    /// Finished and its status written: only the TTL is left.
    Finished,
    /// Running; spec changes (priority, suspend) applied.
    Following,
    /// Deleted and re-created under the same name: the old run is forgotten; look again.
    Replaced,
}

/// What admission decided for a job (the reconciler's checks: spec, pool, tenancy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Run, with the pool's result store for the job (where results are filed by content).
    Run {
        results: Option<tessera_crds::work::ResultStore>,
    },
    /// Its pool does not exist in its own namespace: it waits (the message says for what).
    Wait(String),
    /// It cannot run, for good (`InvalidSpec`, `PoolNotAllowed`, `AccessNotAllowed`).
    Refuse {
        reason: &'static str,
        message: String,
    },
}

/// What the finalizer does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalizeStep {
    /// The finalizer is gone already, or this leader removed it: nothing to do.
    Forget,
    /// Cancelled tasks not yet acknowledged, or the cleanup task still running: look again then.
    Wait(Duration),
    /// Remove the finalizer, then send `Finalized`.
    RemoveFinalizer,
}

/// One job's status to write and events to publish.
#[derive(Debug, Clone)]
pub struct StatusWrite {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub status: Option<TranscodeJobStatus>,
    pub events: Vec<(EventType, &'static str, String)>,
}

/// What `/metrics` shows of the state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Each pool the queue serves, and its depth.
    pub pools: Vec<(String, Depth)>,
    pub jobs_by_stage: HashMap<&'static str, u64>,
}

/// A request to the owner.
pub enum Cmd {
    Lease {
        pool: String,
        worker: String,
        who: Identity,
        reply: Reply<Result<Option<LeaseReply>, ApiError>>,
    },
    Heartbeat {
        id: TaskId,
        who: Identity,
        req: HeartbeatRequest,
        reply: Reply<Result<HeartbeatReply, ApiError>>,
    },
    /// `req` is the worker's name and either its readable request or why it is unreadable.
    Complete {
        id: TaskId,
        who: Identity,
        worker: String,
        req: Result<CompleteRequest, String>,
        reply: Reply<Result<CompleteReply, ApiError>>,
    },
    Fail {
        id: TaskId,
        who: Identity,
        req: FailRequest,
        reply: Reply<Result<FailReply, ApiError>>,
    },
    Release {
        id: TaskId,
        who: Identity,
        req: ReleaseRequest,
        reply: Reply<Result<ReleaseReply, ApiError>>,
    },
    Observe {
        job: Observed,
        reply: Reply<Observation>,
    },
    /// Admission decided: run it, let it wait for its pool, or fail it (`status` as the watch saw it).
    Accept {
        run: Box<JobRun>,
        status: Option<TranscodeJobStatus>,
        admit: Admit,
        reply: Reply<()>,
    },
    Finalize {
        job: Observed,
        /// The job's pool (`ns/name`), resolved by the reconciler.
        pool: String,
        /// The job has a finalizer of ours.
        ours: bool,
        /// Its spec passes the cluster's checks (else nothing can have been written for it).
        valid: bool,
        reply: Reply<FinalizeStep>,
    },
    Finalized {
        namespace: String,
        name: String,
        uid: String,
    },
    Statuses {
        throttle: Throttle,
        reply: Reply<Vec<StatusWrite>>,
    },
    StatusFailed {
        namespace: String,
        name: String,
    },
    SetAccess(PoolAccess),
    /// A pool's queue depth and its workers as the scaler sees them (busy from the leases, idle time
    /// from the owner's memory), given its pods' names and states. Drain marks and idle times of pods
    /// no longer listed are forgotten.
    PoolLoad {
        pool: String,
        pods: Vec<(String, WorkerState)>,
        reply: Reply<(Depth, Vec<Worker>)>,
    },
    /// Take no new lease for `worker` from here on; answers whether it is idle (may be deleted). A busy
    /// worker is not marked.
    Drain {
        pool: String,
        worker: String,
        reply: Reply<bool>,
    },
    Undrain {
        worker: String,
    },
    Snapshot {
        reply: Reply<Snapshot>,
    },
}

/// The handle every caller holds: sends commands, awaits answers.
#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Cmd>,
    pub shared: Arc<Shared>,
}

/// The owner has stopped (the process is ending).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the operator's state owner has stopped")
    }
}

impl CoreHandle {
    /// Send a command built around a fresh reply channel, and await the answer.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// Send a command that needs no answer.
    pub async fn tell(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd).await;
    }

    pub fn is_leader(&self) -> bool {
        self.shared.leader.load(Ordering::Relaxed)
    }
}

/// A cancelled task whose worker has not yet acknowledged (by release, complete or fail) that it stopped.
#[derive(Debug, Clone)]
struct Cancelled {
    namespace: String,
    job: String,
    until: Instant,
}

/// One job this leader runs.
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

impl Entry {
    fn new(run: JobRun, written: Option<TranscodeJobStatus>, dirty: bool) -> Self {
        Self {
            run,
            tasks: HashSet::new(),
            started: Instant::now(),
            dirty,
            written,
            last_write: None,
            cleanup: None,
            cleanup_done: false,
            touched: false,
            cleanup_since: None,
            events: Vec::new(),
        }
    }
}

type Key = (String, String);

/// The state. Only `run` touches it, one command at a time.
pub struct Core {
    shared: Arc<Shared>,
    started: Instant,
    queue: Queue<Work>,
    access: PoolAccess,
    cancelled: HashMap<TaskId, Cancelled>,
    /// Frames encoded so far by each leased task (from heartbeats).
    progress: HashMap<TaskId, u64>,
    /// Workers about to be deleted (worker → pool): they get no new task.
    draining: HashMap<String, String>,
    /// Since when each ready worker (pool, pod) has had nothing to do.
    idle_since: HashMap<(String, String), Instant>,
    jobs: HashMap<Key, Entry>,
    /// Jobs (by uid) whose finalizer this leader removed, for a few minutes: the watch cache may still show
    /// them with the finalizer, and finalizing them again would queue a second cleanup and leave an entry
    /// behind for an object that is gone.
    finalized: HashMap<String, Instant>,
    /// When a collection of each result store (by URI) was last queued.
    collections: HashMap<String, Instant>,
    /// Task ids of different leaders never collide: a worker still holding an old leader's task gets 404
    /// from the new one (keep going), never another task's answer.
    epoch: u64,
    seq: u64,
    /// Attempts before a retryable failure fails the job.
    pub max_attempts: u32,
}

pub(crate) fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl Core {
    pub fn new(cfg: QueueConfig) -> Self {
        Self {
            shared: Arc::new(Shared::default()),
            started: Instant::now(),
            queue: Queue::new(cfg),
            access: PoolAccess::default(),
            cancelled: HashMap::new(),
            progress: HashMap::new(),
            draining: HashMap::new(),
            idle_since: HashMap::new(),
            jobs: HashMap::new(),
            finalized: HashMap::new(),
            collections: HashMap::new(),
            epoch: fastrand::u64(1..(1 << 20)) << 32,
            seq: 0,
            max_attempts: 3,
        }
    }

    /// Start the owner task; the handle is how everyone else reaches the state.
    pub fn spawn(self) -> CoreHandle {
        let (tx, rx) = mpsc::channel(4096);
        let handle = CoreHandle {
            tx,
            shared: self.shared.clone(),
        };
        tokio::spawn(self.run(rx));
        handle
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut expire = tokio::time::interval(Duration::from_millis(500));
        expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.apply(cmd),
                    None => return,
                },
                _ = expire.tick() => self.expire(),
            }
        }
    }

    /// The queue, before the owner starts (tests and tools seed it).
    pub fn queue_mut(&mut self) -> &mut Queue<Work> {
        &mut self.queue
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// One command. A reply whose asker went away (a timed-out request) is dropped.
    pub fn apply(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Lease {
                pool,
                worker,
                who,
                reply,
            } => {
                let _ = reply.send(self.lease(&pool, &worker, &who));
            }
            Cmd::Heartbeat {
                id,
                who,
                req,
                reply,
            } => {
                let r = self.on_task(id, &who, false).and_then(|()| {
                    let exp = self
                        .queue
                        .heartbeat(id, &req.worker, self.now_ms())
                        .map_err(queue_error)?;
                    if let Some(p) = &req.progress {
                        self.progress.insert(id, p.frames);
                    }
                    Ok(HeartbeatReply { expires_at: exp })
                });
                let _ = reply.send(r);
            }
            Cmd::Complete {
                id,
                who,
                worker,
                req,
                reply,
            } => {
                let r = self
                    .on_task(id, &who, true)
                    .and_then(|()| self.complete(id, &worker, req));
                let _ = reply.send(r);
            }
            Cmd::Fail {
                id,
                who,
                req,
                reply,
            } => {
                let r = self
                    .on_task(id, &who, true)
                    .and_then(|()| self.fail(id, &req.worker, req.failure));
                let _ = reply.send(r);
            }
            Cmd::Release {
                id,
                who,
                req,
                reply,
            } => {
                let r = self.on_task(id, &who, true).and_then(|()| {
                    self.queue.release(id, &req.worker).map_err(queue_error)?;
                    self.progress.remove(&id);
                    self.shared.queued.notify_waiters();
                    Ok(ReleaseReply {})
                });
                let _ = reply.send(r);
            }
            Cmd::Observe { job, reply } => {
                let _ = reply.send(self.observe(job));
            }
            Cmd::Accept {
                run,
                status,
                admit,
                reply,
            } => {
                self.accept(*run, status, admit);
                let _ = reply.send(());
            }
            Cmd::Finalize {
                job,
                pool,
                ours,
                valid,
                reply,
            } => {
                let _ = reply.send(self.finalize(job, pool, ours, valid));
            }
            Cmd::Finalized {
                namespace,
                name,
                uid,
            } => {
                self.jobs.remove(&(namespace, name));
                self.finalized.retain(|_, t| t.elapsed() < FINALIZED_MEMORY);
                self.finalized.insert(uid, Instant::now());
            }
            Cmd::Statuses { throttle, reply } => {
                let _ = reply.send(self.statuses(throttle));
            }
            Cmd::StatusFailed { namespace, name } => {
                if let Some(e) = self.jobs.get_mut(&(namespace, name)) {
                    e.dirty = true;
                }
            }
            Cmd::SetAccess(access) => self.access = access,
            Cmd::PoolLoad { pool, pods, reply } => {
                let _ = reply.send(self.pool_load(&pool, pods));
            }
            Cmd::Drain {
                pool,
                worker,
                reply,
            } => {
                let busy = self
                    .queue
                    .leases_by_worker(&pool)
                    .get(&worker)
                    .is_some_and(|n| *n > 0);
                if !busy {
                    self.draining.insert(worker, pool);
                }
                let _ = reply.send(!busy);
            }
            Cmd::Undrain { worker } => {
                self.draining.remove(&worker);
            }
            Cmd::Snapshot { reply } => {
                let mut pools: Vec<String> = self.access.pools.keys().cloned().collect();
                pools.sort();
                let _ = reply.send(Snapshot {
                    pools: pools
                        .into_iter()
                        .map(|p| {
                            let d = self.queue.depth(&p);
                            (p, d)
                        })
                        .collect(),
                    jobs_by_stage: self.jobs_by_stage(),
                });
            }
        }
    }

    // ---- the queue API -------------------------------------------------------------------------------

    fn lease(
        &mut self,
        pool: &str,
        worker: &str,
        who: &Identity,
    ) -> Result<Option<LeaseReply>, ApiError> {
        self.check_pool(who, pool, "work for")?;
        if self.draining.contains_key(worker) {
            return Ok(None);
        }
        let now = self.now_ms();
        let Some((task, lease)) = self.queue.lease(pool, worker, now) else {
            return Ok(None);
        };
        self.shared.counters.leases.fetch_add(1, Ordering::Relaxed);
        let mut task = task;
        if let (Some(c), Some(store)) = (task.work.collect.as_mut(), task.work.results.as_deref()) {
            // What running jobs need from the store, as of now (a job planned later takes only results
            // that outlive this collection: `work::fresh_enough`).
            c.keep = self
                .jobs
                .values()
                .filter(|e| e.run.results.as_ref().is_some_and(|r| r.uri == store))
                .flat_map(|e| e.run.needed_results())
                .collect();
        }
        if task.work.kind == WorkKind::Plan {
            if let Some(e) = self
                .jobs
                .get_mut(&(task.namespace.clone(), task.job.clone()))
            {
                e.run.on(Event::PlanLeased, now_time());
                e.dirty = true;
            }
        }
        Ok(Some(LeaseReply {
            lease: LeaseGrant {
                task: lease.task,
                worker: lease.worker,
                expires_at: lease.expires_at,
                attempt: lease.attempt,
            },
            task: LeasedTask {
                id: task.id,
                pool: task.pool,
                namespace: task.namespace,
                job: task.job,
                priority: task.priority,
                work: task.work,
            },
        }))
    }

    /// May the caller act on task `id`? A cancelled task answers 410 (and `ack`, a release, complete or
    /// fail, takes the acknowledgement); only the task's pool's account may learn even that much.
    fn on_task(&mut self, id: TaskId, who: &Identity, ack: bool) -> Result<(), ApiError> {
        let Some(pool) = self.queue.task(id).map(|t| t.pool.clone()) else {
            return match self.cancelled.get(&id) {
                Some(_) => {
                    if ack {
                        self.cancelled.remove(&id);
                    }
                    Err(ApiError::new(
                        StatusCode::GONE,
                        format!("task {id} was cancelled"),
                    ))
                }
                None => Err(queue_error(QueueError::UnknownTask(id))),
            };
        };
        self.check_pool(who, &pool, "act on")
    }

    /// Only the pool's own ServiceAccount may lease its tasks or act on them.
    fn check_pool(&self, who: &Identity, pool: &str, verb: &str) -> Result<(), ApiError> {
        if self.access.allows(who, pool) {
            return Ok(());
        }
        self.shared
            .counters
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{} may not {verb} pool {pool}", who.username),
        ))
    }

    fn complete(
        &mut self,
        id: TaskId,
        worker: &str,
        req: Result<CompleteRequest, String>,
    ) -> Result<CompleteReply, ApiError> {
        let kind = self.queue.task(id).map(|t| t.work.kind);
        // The result must be readable and answer this task's kind of work; otherwise the worker and this
        // operator do not speak the same protocol, and trying again would not help.
        let req = req.and_then(|r| match Some(r.result.kind()) == kind {
            true => Ok(r),
            false => Err(format!(
                "a {:?} result for a {:?} task",
                r.result.kind(),
                kind.unwrap_or(WorkKind::Plan)
            )
            .to_lowercase()),
        });
        let req = match req {
            Ok(r) => r,
            Err(why) => {
                let failure = TaskFailure {
                    reason: "WorkerIncompatible".into(),
                    message: format!("the worker's result is unreadable: {why}"),
                    retryable: false,
                };
                tracing::warn!(task = id, %worker, error = %why, "unreadable task result; the task fails");
                self.fail(id, worker, failure)?;
                return Err(ApiError::new(StatusCode::BAD_REQUEST, why));
            }
        };
        let c = self.queue.complete(id, worker).map_err(queue_error)?;
        self.progress.remove(&id);
        self.shared
            .counters
            .completed
            .fetch_add(1, Ordering::Relaxed);
        let ids: Vec<TaskId> = c.tasks.iter().map(|t| t.id).collect();
        self.on_completed(c.tasks, req.result, req.seconds);
        Ok(CompleteReply { completed: ids })
    }

    fn fail(
        &mut self,
        id: TaskId,
        worker: &str,
        failure: TaskFailure,
    ) -> Result<FailReply, ApiError> {
        let attempt = self.queue.attempts(id);
        if failure.retryable && attempt < self.max_attempts {
            self.queue.release(id, worker).map_err(queue_error)?;
            self.progress.remove(&id);
            tracing::warn!(task = id, attempt, reason = %failure.reason, message = %failure.message,
                "task failed; queued again");
            self.shared.queued.notify_waiters();
            return Ok(FailReply { requeued: true });
        }
        let c = self.queue.complete(id, worker).map_err(queue_error)?;
        self.progress.remove(&id);
        self.shared.counters.failed.fetch_add(1, Ordering::Relaxed);
        self.on_failed(c.tasks, failure);
        Ok(FailReply { requeued: false })
    }

    /// Re-queue tasks whose lease ran out, and forget cancellations nobody acknowledged.
    fn expire(&mut self) {
        let gone = self.queue.expire(self.now_ms());
        if !gone.is_empty() {
            for id in &gone {
                self.progress.remove(id);
            }
            self.shared
                .counters
                .expired
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            tracing::warn!(tasks = ?gone, "leases expired; tasks queued again");
            self.shared.queued.notify_waiters();
        }
        let t = Instant::now();
        self.cancelled.retain(|_, c| c.until > t);
    }

    /// Cancel every task of a job: queued ones vanish, leased ones are remembered until their workers
    /// acknowledge (their next heartbeat gets 410) or the lease would have expired.
    fn cancel_job(&mut self, namespace: &str, job: &str) -> usize {
        let leases = self.queue.cancel_job(namespace, job);
        let until = Instant::now() + Duration::from_millis(self.queue.lease_ms());
        for l in &leases {
            self.progress.remove(&l.task);
            self.cancelled.insert(
                l.task,
                Cancelled {
                    namespace: namespace.into(),
                    job: job.into(),
                    until,
                },
            );
        }
        leases.len()
    }

    fn unacknowledged(&self, namespace: &str, job: &str) -> usize {
        self.cancelled
            .values()
            .filter(|c| c.namespace == namespace && c.job == job)
            .count()
    }

    fn pool_load(&mut self, pool: &str, pods: Vec<(String, WorkerState)>) -> (Depth, Vec<Worker>) {
        let leases = self.queue.leases_by_worker(pool);
        let live: HashSet<&str> = pods.iter().map(|(n, _)| n.as_str()).collect();
        self.draining
            .retain(|w, p| p != pool || live.contains(w.as_str()));
        self.idle_since
            .retain(|(p, w), _| p != pool || live.contains(w.as_str()));
        let t = Instant::now();
        let workers = pods
            .into_iter()
            .map(|(name, state)| {
                let busy = leases.get(&name).copied().unwrap_or(0) > 0;
                let key = (pool.to_string(), name.clone());
                let idle_for = if busy || state != WorkerState::Ready {
                    self.idle_since.remove(&key);
                    Duration::ZERO
                } else {
                    t - *self.idle_since.entry(key).or_insert(t)
                };
                Worker {
                    name,
                    state,
                    busy,
                    idle_for,
                }
            })
            .collect();
        (self.queue.depth(pool), workers)
    }

    // ---- jobs ----------------------------------------------------------------------------------------

    fn enqueue(&mut self, key: &Key, mut works: Vec<Work>) {
        if works.is_empty() {
            return;
        }
        if works.iter().any(|w| w.kind == WorkKind::Stitch) {
            works.extend(self.collection_due(key));
        }
        let now = self.now_ms();
        let Some(e) = self.jobs.get_mut(key) else {
            return;
        };
        for w in works {
            let id = self.epoch | self.seq;
            self.seq += 1;
            if w.kind == WorkKind::Cleanup {
                e.cleanup = Some(id);
            } else {
                e.tasks.insert(id);
            }
            self.queue.enqueue(
                Task {
                    id,
                    pool: e.run.pool.clone(),
                    namespace: e.run.namespace.clone(),
                    job: e.run.name.clone(),
                    priority: e.run.spec.priority,
                    coalesce: tessera_crds::work::coalesce_key(&w),
                    work: w,
                },
                now,
            );
        }
        self.shared.queued.notify_waiters();
    }

    /// A collection of the job's result store, when the last one was queued a quarter of the retention
    /// ago or more: stores are collected while they are in use, alongside a job's stitch.
    fn collection_due(&mut self, key: &Key) -> Option<Work> {
        let run = &self.jobs.get(key)?.run;
        let store = run.results.as_ref()?;
        let every = Duration::from_secs((store.retention_seconds / 4).max(1));
        if self
            .collections
            .get(&store.uri)
            .is_some_and(|t| t.elapsed() < every)
        {
            return None;
        }
        self.collections.insert(store.uri.clone(), Instant::now());
        run.collection()
    }

    fn observe(&mut self, job: Observed) -> Observation {
        let key = (job.namespace.clone(), job.name.clone());
        let Some(e) = self.jobs.get_mut(&key) else {
            return match job.terminal {
                true => Observation::Finished,
                false => Observation::Unknown,
            };
        };
        if e.run.finished() && !e.dirty {
            return Observation::Finished;
        }
        if e.run.uid != job.uid {
            self.jobs.remove(&key);
            return Observation::Replaced;
        }
        if e.run.stage == Stage::PoolMissing {
            // Admission again: the pool may exist now.
            return Observation::Unknown;
        }
        if e.run.generation == job.generation {
            return Observation::Following;
        }
        e.run.generation = job.generation;
        e.dirty = true;
        if e.run.spec.priority != job.spec.priority {
            e.run.spec.priority = job.spec.priority;
            self.queue
                .set_priority(&job.namespace, &job.name, job.spec.priority);
        }
        let e = self.jobs.get_mut(&key).expect("known");
        let suspended = e.run.stage == Stage::Suspended;
        if job.spec.suspend == suspended || e.run.finished() {
            return Observation::Following;
        }
        e.run.spec.suspend = job.spec.suspend;
        if job.spec.suspend {
            e.run.on(Event::Suspend, now_time());
            e.tasks.clear();
            let n = self.cancel_job(&job.namespace, &job.name);
            let e = self.jobs.get_mut(&key).expect("known");
            e.events.push((
                EventType::Normal,
                "Suspended",
                format!("{n} running tasks given back"),
            ));
        } else {
            let w = e.run.on(Event::Resume, now_time());
            e.events.push((
                EventType::Normal,
                "Resumed",
                "re-planning from the ledger".into(),
            ));
            self.enqueue(&key, w);
        }
        Observation::Following
    }

    fn accept(&mut self, run: JobRun, status: Option<TranscodeJobStatus>, admit: Admit) {
        let key = (run.namespace.clone(), run.name.clone());
        let pool = run.pool.clone();
        // A job that waited for its pool is admitted again: what was written for it stays known.
        let prev = self.jobs.remove(&key);
        let was_waiting = prev
            .as_ref()
            .is_some_and(|p| p.run.stage == Stage::PoolMissing);
        let written = prev.and_then(|p| p.written).or(status);
        let mut e = Entry::new(run, written, true);
        let mut first = Vec::new();
        match admit {
            Admit::Run { results } => {
                e.run.results = results;
                first = e.run.on(Event::Start, now_time());
                if !first.is_empty() {
                    e.events.push((
                        EventType::Normal,
                        "Queued",
                        format!("planning on pool {pool}"),
                    ));
                }
                tracing::info!(job = %format!("{}/{}", key.0, key.1), %pool, stage = e.run.stage.name(), "job accepted");
            }
            Admit::Wait(message) => {
                e.run.on(
                    Event::PoolMissing {
                        message: message.clone(),
                    },
                    now_time(),
                );
                if was_waiting {
                    // Still waiting: its status says so already.
                    e.dirty = false;
                } else {
                    e.events.push((EventType::Warning, "PoolNotFound", message));
                }
            }
            Admit::Refuse { reason, message } => {
                e.run.on(
                    Event::Failed {
                        reason: reason.into(),
                        message: message.clone(),
                    },
                    now_time(),
                );
                e.events.push((EventType::Warning, reason, message));
            }
        }
        self.jobs.insert(key.clone(), e);
        self.enqueue(&key, first);
    }

    fn finalize(&mut self, job: Observed, pool: String, ours: bool, valid: bool) -> FinalizeStep {
        let key = (job.namespace.clone(), job.name.clone());
        let (ns, name) = (&job.namespace, &job.name);
        if !ours || self.finalized.contains_key(&job.uid) {
            self.jobs.remove(&key);
            return FinalizeStep::Forget;
        }
        // Whether a worker may have written to the ledger: the plan came back, or some task was handed out.
        let touched = self.queue.ever_leased(ns, name)
            || self
                .jobs
                .get(&key)
                .is_none_or(|e| e.run.plan.is_some() || e.touched);
        if let Some(e) = self.jobs.get_mut(&key) {
            e.touched |= touched;
        }
        // Cancel the job's work, once: the cleanup task queued below belongs to the job too.
        let cleanup_queued = self.jobs.get(&key).is_some_and(|e| e.cleanup.is_some());
        if !cleanup_queued {
            let stopped = self.cancel_job(ns, name);
            if stopped > 0 {
                tracing::info!(job = %format!("{ns}/{name}"), tasks = stopped, "job deleted: running tasks cancelled");
            }
        }
        // Wait until the cancelled tasks' workers say they stopped (or their leases would have run out): a
        // worker still uploading a chunk would otherwise leave it behind after the cleanup.
        if self.unacknowledged(ns, name) > 0 {
            return FinalizeStep::Wait(Duration::from_millis(100));
        }
        // The ledger outlives the stitch (its plan and result stay, so a lost report is recovered): it goes
        // with the job.
        if !(touched && valid) {
            return FinalizeStep::RemoveFinalizer;
        }
        let e = self.jobs.entry(key.clone()).or_insert_with(|| {
            Entry::new(
                JobRun::new(ns, name, &job.uid, 0, job.spec.clone(), pool),
                None,
                false,
            )
        });
        e.run.on(Event::Delete, now_time());
        e.tasks.clear();
        e.dirty = false;
        e.touched = true;
        let waited = e.cleanup_since.get_or_insert_with(Instant::now).elapsed();
        if !e.cleanup_done && waited > CLEANUP_PATIENCE {
            // No worker ran the cleanup (the pool cannot schedule any): let the job go rather than hang.
            tracing::warn!(job = %format!("{ns}/{name}"), ledger = %e.run.ledger,
                "no worker cleaned the job's temporary objects in time; deleting the job anyway");
            e.cleanup_done = true;
            let note = format!(
                "no worker of pool {} ran the cleanup within {} s; objects under {} may remain",
                e.run.pool,
                CLEANUP_PATIENCE.as_secs(),
                e.run.ledger
            );
            e.events
                .push((EventType::Warning, "CleanupAbandoned", note));
        }
        if e.cleanup_done {
            return FinalizeStep::RemoveFinalizer;
        }
        if e.cleanup.is_none() {
            let w = e.run.cleanup();
            self.enqueue(&key, vec![w]);
        }
        FinalizeStep::Wait(Duration::from_millis(200))
    }

    /// The jobs of `tasks` whose uid matches the work's: (key, task id, work).
    fn owners(&self, tasks: Vec<Task<Work>>) -> Vec<(Key, TaskId, Work)> {
        tasks
            .into_iter()
            .filter_map(|t| {
                let key = (t.namespace, t.job);
                let e = self.jobs.get(&key)?;
                (e.run.uid == t.work.uid).then_some((key, t.id, t.work))
            })
            .collect()
    }

    fn on_completed(&mut self, tasks: Vec<Task<Work>>, result: TaskResult, secs: f64) {
        // The first task is the one a worker ran; those coalesced onto it take its result, and for them
        // nothing was encoded.
        let ran = tasks.first().map(|t| t.id);
        for (key, id, work) in self.owners(tasks) {
            let result = match result.clone() {
                TaskResult::Chunk(r) if Some(id) != ran => {
                    TaskResult::Chunk(tessera_crds::work::ChunkResult { reused: true, ..r })
                }
                TaskResult::Audio(r) if Some(id) != ran => {
                    TaskResult::Audio(tessera_crds::work::ChunkResult { reused: true, ..r })
                }
                r => r,
            };
            if let TaskResult::Chunk(r) | TaskResult::Audio(r) = &result {
                if r.reused {
                    self.shared
                        .counters
                        .chunks_reused
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            let Some(e) = self.jobs.get_mut(&key) else {
                continue;
            };
            e.tasks.remove(&id);
            e.dirty = true;
            let next = match result {
                TaskResult::Plan(r) => {
                    let note = format!(
                        "{} chunks of {:.1} s, encoders {}; {} already in the ledger",
                        r.plan.chunk_count(),
                        r.plan.target_seconds,
                        r.plan.encoders.join(","),
                        r.done.len()
                    );
                    e.run.worker_seconds += secs;
                    let next = e.run.on(Event::Planned(r), now_time());
                    e.events.push((EventType::Normal, "Planned", note));
                    next
                }
                TaskResult::Chunk(r) | TaskResult::Audio(r) => {
                    let next = e.run.on(
                        Event::Encoded {
                            kind: work.kind,
                            chunk: work.chunk,
                            result: r,
                            seconds: secs,
                        },
                        now_time(),
                    );
                    if !next.is_empty() {
                        let note = format!(
                            "all chunks encoded ({} not encoded again: from the ledger, the result store or an identical task)",
                            e.run.reused
                        );
                        e.events.push((EventType::Normal, "Encoded", note));
                    }
                    next
                }
                TaskResult::Stitch(r) => {
                    let n = r.renditions.len();
                    e.run.on(
                        Event::Stitched {
                            result: r,
                            seconds: secs,
                        },
                        now_time(),
                    );
                    if e.run.stage == Stage::Succeeded {
                        let note = format!("{n} renditions published to {}", e.run.spec.output.uri);
                        e.events.push((EventType::Normal, "Completed", note));
                    }
                    Vec::new()
                }
                TaskResult::Missing(m) => {
                    let n = m.chunks.len() + usize::from(m.audio);
                    self.shared
                        .counters
                        .results_missing
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let note = format!(
                        "{n} results were gone from the result store (collected or deleted); encoding chunks {:?}{} again",
                        m.chunks,
                        if m.audio { " and the audio" } else { "" }
                    );
                    tracing::warn!(job = %format!("{}/{}", key.0, key.1), chunks = ?m.chunks, audio = m.audio, "results missing from the store at the stitch");
                    e.events.push((EventType::Warning, "ResultsMissing", note));
                    e.run.on(Event::Missing(m), now_time())
                }
                TaskResult::Cleanup(_) => {
                    e.cleanup_done = true;
                    Vec::new()
                }
                TaskResult::Collect(r) => {
                    self.shared
                        .counters
                        .results_collected
                        .fetch_add(r.deleted, Ordering::Relaxed);
                    tracing::info!(
                        store = work.results.as_deref().unwrap_or(""),
                        listed = r.listed,
                        deleted = r.deleted,
                        bytes = r.bytes_deleted,
                        kept_needed = r.kept_needed,
                        stopped_early = r.stopped_early,
                        "result store collected"
                    );
                    Vec::new()
                }
            };
            self.enqueue(&key, next);
        }
    }

    fn on_failed(&mut self, tasks: Vec<Task<Work>>, f: TaskFailure) {
        for (key, id, work) in self.owners(tasks) {
            let Some(e) = self.jobs.get_mut(&key) else {
                continue;
            };
            e.tasks.remove(&id);
            e.dirty = true;
            if work.kind == WorkKind::Collect {
                // The job does not depend on it; the next collection tries again.
                tracing::warn!(store = work.results.as_deref().unwrap_or(""), error = %f.message, "could not collect the result store");
                continue;
            }
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
            e.run.on(
                Event::Failed {
                    reason: f.reason.clone(),
                    message: what.clone(),
                },
                now_time(),
            );
            e.events.push((
                EventType::Warning,
                "Failed",
                format!("{}: {what}", f.reason),
            ));
            self.cancel_job(&key.0, &key.1);
        }
    }

    /// Statuses that changed, coalesced: a phase change at once, progress at most once per interval.
    fn statuses(&mut self, throttle: Throttle) -> Vec<StatusWrite> {
        let mut writes = Vec::new();
        for ((ns, name), e) in self.jobs.iter_mut() {
            if !e.dirty && e.events.is_empty() {
                continue;
            }
            let in_flight: u64 = e.tasks.iter().filter_map(|t| self.progress.get(t)).sum();
            let t = now_time();
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
            let status = if d == Decision::WriteNow {
                e.dirty = false;
                e.last_write = Some(Instant::now());
                e.written = Some(st.clone());
                Some(st)
            } else {
                None
            };
            if status.is_some() || !events.is_empty() {
                writes.push(StatusWrite {
                    namespace: ns.clone(),
                    name: name.clone(),
                    uid: e.run.uid.clone(),
                    status,
                    events,
                });
            }
        }
        writes
    }

    /// Jobs per stage, every stage present (0 where none is), so the metric exists from the start.
    fn jobs_by_stage(&self) -> HashMap<&'static str, u64> {
        let mut out: HashMap<&'static str, u64> = crate::jobrun::Stage::ALL
            .iter()
            .map(|s| (s.name(), 0))
            .collect();
        for e in self.jobs.values() {
            *out.entry(e.run.stage.name()).or_default() += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_crds::protocol::CompleteRequest;
    use tessera_crds::work::{ChunkPlan, ChunkResult, PlanRecord, PlanResult, ResultStore};

    const POOL: &str = "media/gpu";
    const STORE: &str = "s3://b/results/media/";

    fn who() -> Identity {
        Identity {
            username: "system:serviceaccount:media:gpu-worker".into(),
        }
    }

    fn core() -> Core {
        let mut core = Core::new(QueueConfig::default());
        let mut access = PoolAccess::default();
        access
            .pools
            .insert(POOL.into(), ("media".into(), "gpu-worker".into()));
        core.apply(Cmd::SetAccess(access));
        core
    }

    fn accept(core: &mut Core, name: &str, crf: u32) {
        let spec: TranscodeJobSpec = serde_json::from_value(serde_json::json!({
            "input": {"uri": "s3://b/in.mp4"}, "output": {"uri": format!("s3://b/out/{name}/")},
            "renditions": [{"name": "a", "video": {"codec": "h264", "crf": crf}}]}))
        .unwrap();
        let run = JobRun::new("media", name, &format!("uid-{name}"), 1, spec, POOL.into());
        let (reply, _) = oneshot::channel();
        core.apply(Cmd::Accept {
            run: Box::new(run),
            status: None,
            admit: Admit::Run {
                results: Some(ResultStore {
                    uri: STORE.into(),
                    retention_seconds: 400,
                }),
            },
            reply,
        });
    }

    fn lease(core: &mut Core) -> Option<LeasedTask> {
        core.lease(POOL, "w", &who()).unwrap().map(|r| r.task)
    }

    fn complete(core: &mut Core, id: TaskId, result: TaskResult) {
        let req = CompleteRequest {
            worker: "w".into(),
            result,
            seconds: 1.0,
        };
        core.complete(id, "w", Ok(req)).unwrap();
    }

    fn plan() -> TaskResult {
        TaskResult::Plan(PlanResult {
            plan: PlanRecord {
                input_etag: Some("\"e\"".into()),
                target_seconds: 2.0,
                chunks: ChunkPlan::uniform(2, 2.0, 25.0),
                frames: 100,
                duration_seconds: 4.0,
                fps: 25.0,
                vfr: false,
                encoders: vec!["libx264".into()],
                encoder_reasons: vec![],
                audio: false,
                hdr: None,
                captions: false,
                ladder: None,
            },
            done: vec![],
            audio_done: false,
            finished: None,
        })
    }

    /// A collection of a result store is queued with a job's stitch, and when a worker leases it, it is
    /// told every address the jobs still running with that store need, and nothing of finished jobs.
    #[test]
    fn a_collection_keeps_what_running_jobs_need() {
        let mut core = core();
        accept(&mut core, "a", 20);
        accept(&mut core, "b", 30);
        for _ in 0..2 {
            let t = lease(&mut core).expect("a plan task");
            assert_eq!(t.work.kind, WorkKind::Plan);
            complete(&mut core, t.id, plan());
        }
        let needed = |core: &Core, name: &str| {
            core.jobs[&("media".to_string(), name.to_string())]
                .run
                .needed_results()
        };
        let (need_a, need_b) = (needed(&core, "a"), needed(&core, "b"));
        assert_eq!((need_a.len(), need_b.len()), (2, 2));
        assert!(
            need_a.iter().all(|a| !need_b.contains(a)),
            "other crf, other addresses"
        );
        // Encode job a's chunks: its stitch and a collection follow; job b is still encoding.
        let mut collect = None;
        let mut stitch = None;
        while let Some(t) = lease(&mut core) {
            match (t.work.kind, t.job.as_str()) {
                (WorkKind::Chunk, "a") => {
                    complete(&mut core, t.id, TaskResult::Chunk(ChunkResult::default()))
                }
                (WorkKind::Chunk, "b") => {}
                (WorkKind::Stitch, "a") => stitch = Some(t),
                (WorkKind::Collect, _) => collect = Some(t),
                other => panic!("unexpected task {other:?}"),
            }
        }
        let collect = collect.expect("a collection is queued with the stitch");
        assert!(stitch.is_some());
        assert_eq!(collect.work.results.as_deref(), Some(STORE));
        assert_eq!(collect.work.retention_seconds, Some(400));
        let mut keep = collect.work.collect.unwrap().keep;
        keep.sort();
        let mut want = [need_a.clone(), need_b.clone()].concat();
        want.sort();
        assert_eq!(keep, want, "both jobs run: everything of both is kept");
        // The collection's answer changes nothing about the job that carried it; a second stitch within
        // a quarter of the retention queues no second collection.
        complete(
            &mut core,
            collect.id,
            TaskResult::Collect(tessera_crds::work::CollectResult {
                deleted: 3,
                ..Default::default()
            }),
        );
        assert_eq!(
            core.shared
                .counters
                .results_collected
                .load(Ordering::Relaxed),
            3
        );
        complete(
            &mut core,
            stitch.unwrap().id,
            TaskResult::Stitch(Default::default()),
        );
        assert_eq!(
            core.jobs[&("media".to_string(), "a".to_string())].run.stage,
            Stage::Succeeded
        );
        assert!(
            needed(&core, "a").is_empty(),
            "a finished job needs nothing"
        );
        accept(&mut core, "c", 20);
        let t = lease(&mut core).unwrap();
        complete(&mut core, t.id, plan());
        while let Some(t) = lease(&mut core) {
            assert_ne!(t.work.kind, WorkKind::Collect, "collected a moment ago");
            if t.work.kind == WorkKind::Chunk && t.job == "c" {
                complete(&mut core, t.id, TaskResult::Chunk(ChunkResult::default()));
            }
        }
    }
}
