//! The queue API workers call: lease, heartbeat, complete, fail, release. Every request carries the worker
//! pod's ServiceAccount token (`Authorization: Bearer`), checked with the Kubernetes TokenReview API; a worker
//! may act only on its own pool's tasks (the pool's namespace and worker ServiceAccount). Only the elected
//! leader serves it; a standby answers 503 and the worker moves on to the leader.
//!
//! ```text
//! POST /v1/pools/{ns}/{pool}/lease   {"worker", "waitMs"?}       → 200 {task, lease} | 204 nothing queued
//! POST /v1/tasks/{id}/heartbeat      {"worker", "progress"?}     → 200 {expiresAt} | 409 not the holder
//! POST /v1/tasks/{id}/complete       {"worker", "result"?}       → 200 {completed: [ids]}
//! POST /v1/tasks/{id}/fail           {"worker", "failure"}       → 200 {requeued: bool}
//! POST /v1/tasks/{id}/release        {"worker"}                  → 200
//! 401 no or bad token · 403 another pool's task · 404 unknown task · 410 task cancelled (job deleted or
//! suspended): stop it · 503 not the leader
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_crds::work::TaskFailure;
use tokio::sync::{mpsc, Notify};

use crate::queue::{Queue, QueueError, Task, TaskId};

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
}

impl Identity {
    /// `system:serviceaccount:NS:NAME` → (NS, NAME).
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
    }
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, String>> + Send + 'a>>;

pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Tokens checked by the API server (TokenReview). Answers are cached for a minute (by a hash of the token,
/// never the token itself), so a heartbeat is not an API-server request.
pub struct TokenReviewer {
    pub client: kube::Client,
    pub cache: Mutex<HashMap<u64, (Identity, Instant)>>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
        }
    }
}

fn token_key(token: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = SEED.get_or_init(Default::default).build_hasher();
    h.write(token.as_bytes());
    h.finish()
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
            let key = token_key(token);
            if let Some((who, at)) = lock(&self.cache).get(&key) {
                if at.elapsed() < Duration::from_secs(60) {
                    return Ok(who.clone());
                }
            }
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    ..TokenReviewSpec::default()
                },
                ..TokenReview::default()
            };
            let out = api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .map_err(|e| format!("token review failed: {e}"))?;
            let status = out.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                // The API server's reason never includes the token itself.
                return Err(status
                    .error
                    .unwrap_or_else(|| "token not authenticated".into()));
            }
            let who = Identity {
                username: status.user.and_then(|u| u.username).unwrap_or_default(),
            };
            let mut c = lock(&self.cache);
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(key, (who.clone(), Instant::now()));
            Ok(who)
        })
    }
}

/// The ServiceAccount allowed to work for each pool.
#[derive(Debug, Clone, Default)]
pub struct PoolAccess {
    /// pool (`ns/name`) → (namespace, service account)
    pub pools: HashMap<String, (String, String)>,
}

impl PoolAccess {
    fn allows(&self, who: &Identity, pool: &str) -> bool {
        match (self.pools.get(pool), who.service_account()) {
            (Some((ns, sa)), Some((wns, wsa))) => ns == wns && sa == wsa,
            _ => false,
        }
    }
}

/// What happened to tasks, for the job controller.
#[derive(Debug, Clone)]
pub enum TaskEvent {
    /// The task and those coalesced onto it are done; `result` is the worker's answer.
    Completed {
        tasks: Vec<Task>,
        result: Value,
        worker_seconds: f64,
    },
    /// The task failed for good (or ran out of attempts).
    Failed {
        tasks: Vec<Task>,
        failure: TaskFailure,
        worker_seconds: f64,
    },
}

/// A cancelled task whose worker has not yet acknowledged (by release) that it stopped.
#[derive(Debug, Clone)]
pub struct Cancelled {
    pub namespace: String,
    pub job: String,
    pub until: Instant,
}

pub struct ApiState {
    pub queue: Mutex<Queue>,
    pub access: Mutex<PoolAccess>,
    pub auth: Box<dyn Authenticator>,
    pub started: Instant,
    /// Serving only while this replica leads.
    pub leader: AtomicBool,
    /// Woken when tasks are queued (long-polling lease requests wait on it).
    pub queued: Notify,
    pub cancelled: Mutex<HashMap<TaskId, Cancelled>>,
    /// Frames encoded so far by each leased task (from heartbeats).
    pub progress: Mutex<HashMap<TaskId, u64>>,
    /// Workers about to be deleted: they get no new task.
    pub draining: Mutex<std::collections::HashSet<String>>,
    pub events: Option<mpsc::UnboundedSender<TaskEvent>>,
    /// Attempts before a retryable failure fails the job.
    pub max_attempts: u32,
    pub counters: Counters,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub leases: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub expired: AtomicU64,
    pub rejected: AtomicU64,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ApiState {
    pub fn new(
        queue: Queue,
        auth: Box<dyn Authenticator>,
        events: Option<mpsc::UnboundedSender<TaskEvent>>,
    ) -> Self {
        Self {
            queue: Mutex::new(queue),
            access: Mutex::default(),
            auth,
            started: Instant::now(),
            leader: AtomicBool::new(true),
            queued: Notify::new(),
            cancelled: Mutex::default(),
            progress: Mutex::default(),
            draining: Mutex::default(),
            events,
            max_attempts: 3,
            counters: Counters::default(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn emit(&self, ev: TaskEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(ev);
        }
    }

    /// Re-queue tasks whose lease ran out, and forget cancellations nobody acknowledged. Returns how many
    /// leases expired.
    pub fn expire(&self) -> usize {
        let now = self.now_ms();
        let gone = lock(&self.queue).expire(now);
        if !gone.is_empty() {
            let mut p = lock(&self.progress);
            for id in &gone {
                p.remove(id);
            }
            self.counters
                .expired
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            tracing::warn!(tasks = ?gone, "leases expired; tasks queued again");
            self.queued.notify_waiters();
        }
        let t = Instant::now();
        lock(&self.cancelled).retain(|_, c| c.until > t);
        gone.len()
    }

    /// Cancel every task of a job: queued ones vanish, leased ones are remembered until their workers
    /// acknowledge (their next heartbeat gets 410) or the lease would have expired.
    pub fn cancel_job(&self, namespace: &str, job: &str) -> usize {
        let leases = lock(&self.queue).cancel_job(namespace, job);
        let until = Instant::now() + Duration::from_millis(lock(&self.queue).lease_ms());
        let mut c = lock(&self.cancelled);
        let mut p = lock(&self.progress);
        for l in &leases {
            p.remove(&l.task);
            c.insert(
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

    /// Cancelled tasks of a job whose workers may still be running them.
    pub fn unacknowledged(&self, namespace: &str, job: &str) -> usize {
        lock(&self.cancelled)
            .values()
            .filter(|c| c.namespace == namespace && c.job == job)
            .count()
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerBody {
    pub worker: String,
    #[serde(default)]
    pub wait_ms: Option<u64>,
    #[serde(default)]
    pub progress: Option<tessera_crds::work::TaskProgress>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub failure: Option<TaskFailure>,
    #[serde(default)]
    pub seconds: Option<f64>,
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({"error": msg.into()}))).into_response()
}

async fn identify(state: &ApiState, headers: &HeaderMap) -> Result<Identity, Response> {
    if !state.leader.load(Ordering::Relaxed) {
        return Err(err(StatusCode::SERVICE_UNAVAILABLE, "not the leader"));
    }
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            state.counters.rejected.fetch_add(1, Ordering::Relaxed);
            err(StatusCode::UNAUTHORIZED, "missing bearer token")
        })?;
    state.auth.authenticate(token).await.map_err(|why| {
        state.counters.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%why, "queue request with a rejected token");
        err(StatusCode::UNAUTHORIZED, "invalid token")
    })
}

fn queue_error(e: QueueError) -> Response {
    match e {
        QueueError::UnknownTask(_) => err(StatusCode::NOT_FOUND, e.to_string()),
        QueueError::NotHolder { .. } => err(StatusCode::CONFLICT, e.to_string()),
    }
}

/// Longest a lease request waits for work.
const MAX_WAIT: Duration = Duration::from_secs(25);

async fn lease(
    State(st): State<Arc<ApiState>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<WorkerBody>,
) -> Response {
    let who = match identify(&st, &headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let pool = format!("{ns}/{name}");
    if !lock(&st.access).allows(&who, &pool) {
        st.counters.rejected.fetch_add(1, Ordering::Relaxed);
        return err(
            StatusCode::FORBIDDEN,
            format!("{} may not work for pool {pool}", who.username),
        );
    }
    let wait = Duration::from_millis(body.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before looking, so a task queued in between is not missed.
        let notified = st.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !st.leader.load(Ordering::Relaxed) {
            return err(StatusCode::SERVICE_UNAVAILABLE, "not the leader");
        }
        if !lock(&st.draining).contains(&body.worker) {
            let now = st.now_ms();
            if let Some((task, lease)) = lock(&st.queue).lease(&pool, &body.worker, now) {
                st.counters.leases.fetch_add(1, Ordering::Relaxed);
                return Json(json!({"task": task, "lease": lease})).into_response();
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

/// Check the caller may act on task `id` (its pool's ServiceAccount), then run `f` on the queue. `ack`:
/// this call (release, complete, fail) acknowledges a cancellation; a heartbeat only learns of it.
async fn on_task(
    st: &ApiState,
    headers: &HeaderMap,
    id: TaskId,
    ack: bool,
    f: impl FnOnce(&ApiState, &mut Queue, u64) -> Result<Value, QueueError>,
) -> Response {
    let who = match identify(st, headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let now = st.now_ms();
    let mut q = lock(&st.queue);
    let Some(pool) = q.task(id).map(|t| t.pool.clone()) else {
        drop(q);
        // A cancelled task: tell the worker to stop (heartbeat), or take its acknowledgement (release,
        // complete, fail). Only the pool's account may learn even that much.
        let c = lock(&st.cancelled).get(&id).cloned();
        return match c {
            Some(_) => {
                if ack {
                    lock(&st.cancelled).remove(&id);
                }
                err(StatusCode::GONE, format!("task {id} was cancelled"))
            }
            None => queue_error(QueueError::UnknownTask(id)),
        };
    };
    if !lock(&st.access).allows(&who, &pool) {
        st.counters.rejected.fetch_add(1, Ordering::Relaxed);
        return err(
            StatusCode::FORBIDDEN,
            format!("{} may not act on pool {pool}", who.username),
        );
    }
    match f(st, &mut q, now) {
        Ok(v) => Json(v).into_response(),
        Err(e) => queue_error(e),
    }
}

async fn heartbeat(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    Json(b): Json<WorkerBody>,
) -> Response {
    on_task(&st, &headers, id, false, |st, q, now| {
        let exp = q.heartbeat(id, &b.worker, now)?;
        if let Some(p) = &b.progress {
            lock(&st.progress).insert(id, p.frames);
        }
        Ok(json!({"expiresAt": exp}))
    })
    .await
}

async fn complete(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    Json(b): Json<WorkerBody>,
) -> Response {
    on_task(&st, &headers, id, true, |st, q, _| {
        let c = q.complete(id, &b.worker)?;
        lock(&st.progress).remove(&id);
        st.counters.completed.fetch_add(1, Ordering::Relaxed);
        let ids: Vec<TaskId> = c.tasks.iter().map(|t| t.id).collect();
        st.emit(TaskEvent::Completed {
            tasks: c.tasks,
            result: b.result.unwrap_or(Value::Null),
            worker_seconds: b.seconds.unwrap_or(0.0),
        });
        Ok(json!({"completed": ids}))
    })
    .await
}

async fn fail(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    Json(b): Json<WorkerBody>,
) -> Response {
    on_task(&st, &headers, id, true, |st, q, _| {
        let failure = b.failure.clone().unwrap_or(TaskFailure {
            reason: "WorkerError".into(),
            message: "the worker reported a failure without details".into(),
            retryable: true,
        });
        let attempt = q.attempts(id);
        lock(&st.progress).remove(&id);
        if failure.retryable && attempt < st.max_attempts {
            q.release(id, &b.worker)?;
            tracing::warn!(task = id, attempt, reason = %failure.reason, message = %failure.message,
                "task failed; queued again");
            st.queued.notify_waiters();
            return Ok(json!({"requeued": true}));
        }
        let c = q.complete(id, &b.worker)?;
        st.counters.failed.fetch_add(1, Ordering::Relaxed);
        st.emit(TaskEvent::Failed {
            tasks: c.tasks,
            failure,
            worker_seconds: b.seconds.unwrap_or(0.0),
        });
        Ok(json!({"requeued": false}))
    })
    .await
}

async fn release(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    Json(b): Json<WorkerBody>,
) -> Response {
    on_task(&st, &headers, id, true, |st, q, _| {
        q.release(id, &b.worker)?;
        lock(&st.progress).remove(&id);
        st.queued.notify_waiters();
        Ok(json!({}))
    })
    .await
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/pools/{ns}/{pool}/lease", post(lease))
        .route("/v1/tasks/{id}/heartbeat", post(heartbeat))
        .route("/v1/tasks/{id}/complete", post(complete))
        .route("/v1/tasks/{id}/fail", post(fail))
        .route("/v1/tasks/{id}/release", post(release))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{QueueConfig, Task};
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// Tokens of the form `sa:NS:NAME` stand for that ServiceAccount (unit tests only; the e2e tests use
    /// real tokens and TokenReview).
    struct Static;
    impl Authenticator for Static {
        fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
            Box::pin(async move {
                token
                    .strip_prefix("sa:")
                    .map(|s| Identity {
                        username: format!("system:serviceaccount:{s}"),
                    })
                    .ok_or_else(|| "unknown token".to_string())
            })
        }
    }

    fn state() -> Arc<ApiState> {
        let mut q = Queue::new(QueueConfig::default());
        for (id, pool) in [(1, "media/gpu"), (2, "media/cpu")] {
            q.enqueue(
                Task {
                    id,
                    pool: pool.into(),
                    namespace: "media".into(),
                    job: "j".into(),
                    priority: 0,
                    coalesce: None,
                    work: Value::Null,
                },
                0,
            );
        }
        let mut access = PoolAccess::default();
        access
            .pools
            .insert("media/gpu".into(), ("media".into(), "gpu-worker".into()));
        access
            .pools
            .insert("media/cpu".into(), ("media".into(), "cpu-worker".into()));
        let st = ApiState::new(q, Box::new(Static), None);
        *lock(&st.access) = access;
        Arc::new(st)
    }

    async fn call(
        st: &Arc<ApiState>,
        path: &str,
        token: Option<&str>,
        worker: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::post(path).header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Body::from(json!({"worker": worker}).to_string()))
            .unwrap();
        let resp = router(st.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(json!(null)),
        )
    }

    #[tokio::test]
    async fn unauthenticated_and_cross_pool_requests_are_rejected() {
        let st = state();
        assert_eq!(
            call(&st, "/v1/pools/media/gpu/lease", None, "w").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&st, "/v1/pools/media/gpu/lease", Some("bogus"), "w")
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        // The CPU pool's account cannot lease GPU work, nor touch a GPU task.
        assert_eq!(
            call(
                &st,
                "/v1/pools/media/gpu/lease",
                Some("sa:media:cpu-worker"),
                "w"
            )
            .await
            .0,
            StatusCode::FORBIDDEN
        );
        // Same name in another namespace is another account.
        assert_eq!(
            call(
                &st,
                "/v1/pools/media/gpu/lease",
                Some("sa:other:gpu-worker"),
                "w"
            )
            .await
            .0,
            StatusCode::FORBIDDEN
        );
        let (s, _) = call(
            &st,
            "/v1/pools/media/gpu/lease",
            Some("sa:media:gpu-worker"),
            "w1",
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            call(
                &st,
                "/v1/tasks/1/complete",
                Some("sa:media:cpu-worker"),
                "w1"
            )
            .await
            .0,
            StatusCode::FORBIDDEN
        );
    }

    #[tokio::test]
    async fn lease_heartbeat_complete() {
        let st = state();
        let tok = Some("sa:media:gpu-worker");
        let (s, body) = call(&st, "/v1/pools/media/gpu/lease", tok, "w1").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["task"]["id"], 1);
        assert_eq!(body["lease"]["worker"], "w1");
        // Nothing else queued for this pool.
        assert_eq!(
            call(&st, "/v1/pools/media/gpu/lease", tok, "w2").await.0,
            StatusCode::NO_CONTENT
        );
        // Only the holder may heartbeat or complete.
        assert_eq!(
            call(&st, "/v1/tasks/1/heartbeat", tok, "w2").await.0,
            StatusCode::CONFLICT
        );
        let (s, body) = call(&st, "/v1/tasks/1/heartbeat", tok, "w1").await;
        assert_eq!(s, StatusCode::OK);
        assert!(body["expiresAt"].as_u64().unwrap() >= 30_000);
        let (s, body) = call(&st, "/v1/tasks/1/complete", tok, "w1").await;
        assert_eq!((s, body), (StatusCode::OK, json!({"completed": [1]})));
        assert_eq!(
            call(&st, "/v1/tasks/1/complete", tok, "w1").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(&st, "/v1/tasks/99/release", tok, "w1").await.0,
            StatusCode::NOT_FOUND
        );
    }
}
