//! The queue API workers call: lease, heartbeat, complete, fail, release (the messages are
//! `tessera_crds::protocol`'s). Every request carries the worker pod's ServiceAccount token
//! (`Authorization: Bearer`), checked here with the Kubernetes TokenReview API; then the handler reads the
//! body into its type and sends the state's owner (`core`) a command, which checks the worker may act on
//! its own pool's tasks only (the pool's namespace and worker ServiceAccount). Only the elected leader
//! serves it; a standby answers 503 and the worker moves on to the leader.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use tessera_crds::protocol::{
    decode, ErrorReply, FailRequest, HeartbeatRequest, LeaseRequest, ReleaseRequest, TaskId,
    WorkerOnly,
};

use crate::core::{ApiError, Cmd, CoreHandle, Stopped};

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
    /// The audience a token must be issued for ([`QUEUE_AUDIENCE`]).
    pub audience: String,
}

impl TokenReviewer {
    /// A reviewer that accepts only tokens issued for the queue's audience.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
            audience: tessera_crds::protocol::QUEUE_AUDIENCE.to_string(),
        }
    }
}

/// Whether a review's answer admits the token for `audience`: authenticated, and for that audience (the API
/// server lists the audiences it checked that the token is valid for).
pub fn review_admits(
    status: &k8s_openapi::api::authentication::v1::TokenReviewStatus,
    audience: &str,
) -> Result<(), String> {
    let hint = || {
        format!(
            "the queue accepts only ServiceAccount tokens issued for its audience {audience} (a worker's \
             projected queue token, {}), not API-server tokens",
            tessera_crds::protocol::QUEUE_TOKEN_FILE
        )
    };
    if status.authenticated != Some(true) {
        // The API server's reason never includes the token itself.
        let why = status.error.as_deref().unwrap_or("token not authenticated");
        return Err(format!("{why}: {}", hint()));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(hint());
    }
    Ok(())
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
                    audiences: Some(vec![self.audience.clone()]),
                },
                ..TokenReview::default()
            };
            let out = api
                .create(&kube::api::PostParams::default(), &review)
                .await
                .map_err(|e| format!("token review failed: {e}"))?;
            let status = out.status.unwrap_or_default();
            review_admits(&status, &self.audience)?;
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
    pub fn allows(&self, who: &Identity, pool: &str) -> bool {
        match (self.pools.get(pool), who.service_account()) {
            (Some((ns, sa)), Some((wns, wsa))) => ns == wns && sa == wsa,
            _ => false,
        }
    }
}

/// What the queue API's handlers hold: the way to the state's owner, and the token checker.
pub struct QueueApi {
    pub core: CoreHandle,
    pub auth: Box<dyn Authenticator>,
}

/// The guard of the token cache (the one lock left: a leaf, held for a map lookup, never across an await).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorReply { error: msg.into() })).into_response()
}

fn answer<T: Serialize>(r: Result<Result<T, ApiError>, Stopped>) -> Response {
    match r {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => err(e.status, e.message),
        Err(s) => err(StatusCode::SERVICE_UNAVAILABLE, s.to_string()),
    }
}

async fn identify(api: &QueueApi, headers: &HeaderMap) -> Result<Identity, Response> {
    if !api.core.is_leader() {
        return Err(err(StatusCode::SERVICE_UNAVAILABLE, "not the leader"));
    }
    let rejected = || {
        api.core
            .shared
            .counters
            .rejected
            .fetch_add(1, Ordering::Relaxed)
    };
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            rejected();
            err(StatusCode::UNAUTHORIZED, "missing bearer token")
        })?;
    api.auth.authenticate(token).await.map_err(|why| {
        rejected();
        tracing::info!(%why, "queue request with a rejected token");
        // The same words for every rejected token (the reason is logged here, never sent).
        err(
            StatusCode::UNAUTHORIZED,
            format!(
                "invalid token: the queue accepts only ServiceAccount tokens issued for audience {}",
                tessera_crds::protocol::QUEUE_AUDIENCE
            ),
        )
    })
}

/// Authenticate, then read the body as `T` (400 naming what did not fit).
async fn open<T: serde::de::DeserializeOwned>(
    api: &QueueApi,
    headers: &HeaderMap,
    what: &str,
    body: &[u8],
) -> Result<(Identity, T), Response> {
    let who = identify(api, headers).await?;
    let req = decode::<T>(what, body).map_err(|e| err(StatusCode::BAD_REQUEST, e))?;
    Ok((who, req))
}

/// A call about a task the worker holds: authenticate, read the body as `T`, ask the owner, answer.
async fn task_call<T: serde::de::DeserializeOwned, R: Serialize>(
    api: &QueueApi,
    headers: &HeaderMap,
    what: &str,
    body: &[u8],
    make: impl FnOnce(Identity, T, tokio::sync::oneshot::Sender<Result<R, ApiError>>) -> Cmd,
) -> Response {
    match open::<T>(api, headers, what, body).await {
        Ok((who, req)) => answer(api.core.ask(|reply| make(who, req, reply)).await),
        Err(r) => r,
    }
}

/// Longest a lease request waits for work.
const MAX_WAIT: Duration = Duration::from_secs(25);

async fn lease(
    State(api): State<Arc<QueueApi>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (who, req) = match open::<LeaseRequest>(&api, &headers, "lease request", &body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let pool = format!("{ns}/{name}");
    let wait = Duration::from_millis(req.wait_ms).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before asking, so a task queued in between is not missed.
        let notified = api.core.shared.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !api.core.is_leader() {
            return err(StatusCode::SERVICE_UNAVAILABLE, "not the leader");
        }
        let r = api
            .core
            .ask(|reply| Cmd::Lease {
                pool: pool.clone(),
                worker: req.worker.clone(),
                who: who.clone(),
                reply,
            })
            .await;
        match r {
            Ok(Ok(Some(lease))) => return Json(lease).into_response(),
            Ok(Ok(None)) => {}
            other => return answer(other.map(|r| r.map(|_| ()))),
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return StatusCode::NO_CONTENT.into_response();
        }
    }
}

async fn heartbeat(
    State(api): State<Arc<QueueApi>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    task_call(
        &api,
        &headers,
        "heartbeat",
        &body,
        |who, req: HeartbeatRequest, reply| Cmd::Heartbeat {
            id,
            who,
            req,
            reply,
        },
    )
    .await
}

/// A completion whose result is unreadable still names its worker: the task fails (`WorkerIncompatible`)
/// instead of being tried again and again, and the worker gets 400 with the reason.
async fn complete(
    State(api): State<Arc<QueueApi>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let who = match identify(&api, &headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let req = decode::<tessera_crds::protocol::CompleteRequest>("complete request", &body);
    let worker = match (&req, decode::<WorkerOnly>("complete request", &body)) {
        (Ok(r), _) => r.worker.clone(),
        (Err(_), Ok(w)) => w.worker,
        (Err(e), Err(_)) => return err(StatusCode::BAD_REQUEST, e.clone()),
    };
    answer(
        api.core
            .ask(|reply| Cmd::Complete {
                id,
                who,
                worker,
                req,
                reply,
            })
            .await,
    )
}

async fn fail(
    State(api): State<Arc<QueueApi>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    task_call(
        &api,
        &headers,
        "fail request",
        &body,
        |who, req: FailRequest, reply| Cmd::Fail {
            id,
            who,
            req,
            reply,
        },
    )
    .await
}

async fn release(
    State(api): State<Arc<QueueApi>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    task_call(
        &api,
        &headers,
        "release request",
        &body,
        |who, req: ReleaseRequest, reply| Cmd::Release {
            id,
            who,
            req,
            reply,
        },
    )
    .await
}

pub fn router(api: Arc<QueueApi>) -> Router {
    Router::new()
        .route("/v1/pools/{ns}/{pool}/lease", post(lease))
        .route("/v1/tasks/{id}/heartbeat", post(heartbeat))
        .route("/v1/tasks/{id}/complete", post(complete))
        .route("/v1/tasks/{id}/fail", post(fail))
        .route("/v1/tasks/{id}/release", post(release))
        .with_state(api)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Core;
    use crate::queue::{QueueConfig, Task};
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use tessera_crds::work::{Work, WorkKind};
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

    pub(crate) fn work(kind: WorkKind) -> Work {
        serde_json::from_value(json!({
            "kind": kind, "namespace": "media", "job": "j", "uid": "u", "ledger": "s3://b/o/.tessera/u/",
            "spec": {"input": {"uri": "s3://b/in.mp4"}, "output": {"uri": "s3://b/o/"},
                     "renditions": [{"name": "a", "video": {"codec": "h264"}}]},
        }))
        .unwrap()
    }

    fn state() -> Arc<QueueApi> {
        let mut core = Core::new(QueueConfig::default());
        for (id, pool, kind) in [
            (1, "media/gpu", WorkKind::Chunk),
            (2, "media/cpu", WorkKind::Chunk),
            (3, "media/gpu", WorkKind::Stitch),
        ] {
            core.queue_mut().enqueue(
                Task {
                    id,
                    pool: pool.into(),
                    namespace: "media".into(),
                    job: "j".into(),
                    priority: 3 - id as i32,
                    coalesce: None,
                    work: work(kind),
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
        core.apply(crate::core::Cmd::SetAccess(access));
        let core = core.spawn();
        core.shared.leader.store(true, Ordering::Relaxed);
        Arc::new(QueueApi {
            core,
            auth: Box::new(Static),
        })
    }

    async fn send(
        st: &Arc<QueueApi>,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut req = Request::post(path).header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Body::from(body.to_string())).unwrap();
        let resp = router(st.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(json!(null)),
        )
    }

    async fn call(
        st: &Arc<QueueApi>,
        path: &str,
        token: Option<&str>,
        worker: &str,
    ) -> (StatusCode, Value) {
        send(st, path, token, json!({"worker": worker})).await
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
        let lease: tessera_crds::protocol::LeaseReply = serde_json::from_value(body).unwrap();
        assert_eq!((lease.task.id, lease.lease.worker.as_str()), (1, "w1"));
        assert_eq!(lease.task.work.kind, WorkKind::Chunk);
        // Only the holder may heartbeat or complete.
        assert_eq!(
            call(&st, "/v1/tasks/1/heartbeat", tok, "w2").await.0,
            StatusCode::CONFLICT
        );
        let (s, body) = call(&st, "/v1/tasks/1/heartbeat", tok, "w1").await;
        assert_eq!(s, StatusCode::OK);
        assert!(body["expiresAt"].as_u64().unwrap() >= 30_000);
        let result = json!({"kind": "chunk", "frames": 25, "reused": false, "seconds": 0.5});
        let (s, body) = send(
            &st,
            "/v1/tasks/1/complete",
            tok,
            json!({"worker": "w1", "result": result}),
        )
        .await;
        assert_eq!((s, body), (StatusCode::OK, json!({"completed": [1]})));
        assert_eq!(
            send(
                &st,
                "/v1/tasks/1/complete",
                tok,
                json!({"worker": "w1", "result": result})
            )
            .await
            .0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(&st, "/v1/tasks/99/release", tok, "w1").await.0,
            StatusCode::NOT_FOUND
        );
    }

    /// A malformed message is an error with a reason, never a default: a request that does not fit its
    /// type gets 400 naming the field, and an unreadable or mismatched result fails the task for good
    /// (`WorkerIncompatible`) rather than marking it done with nothing in it.
    #[tokio::test]
    async fn malformed_messages_are_refused_with_the_reason() {
        let st = state();
        let tok = Some("sa:media:gpu-worker");
        let (s, body) = send(
            &st,
            "/v1/pools/media/gpu/lease",
            tok,
            json!({"worker": "w1", "waitMS": 10}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("waitMS"), "{body}");
        assert_eq!(
            call(&st, "/v1/pools/media/gpu/lease", tok, "w1").await.0,
            StatusCode::OK
        );
        // No result: refused, and the task fails rather than succeeding empty.
        let (s, body) = call(&st, "/v1/tasks/1/complete", tok, "w1").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("missing field `result`"),
            "{body}"
        );
        assert_eq!(
            call(&st, "/v1/tasks/1/heartbeat", tok, "w1").await.0,
            StatusCode::NOT_FOUND,
            "the task is over"
        );
        // A stitch result for a chunk task is the wrong protocol, too.
        let (s, _) = call(&st, "/v1/pools/media/gpu/lease", tok, "w2").await;
        assert_eq!(s, StatusCode::OK);
        let (s, body) = send(
            &st,
            "/v1/tasks/3/complete",
            tok,
            json!({"worker": "w2", "result": {"kind": "chunk", "frames": 1, "reused": false, "seconds": 0}}),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("a chunk result for a stitch task"),
            "{body}"
        );
        // Not even a worker name: 400, nothing else happens.
        assert_eq!(
            send(&st, "/v1/tasks/2/fail", tok, json!([1, 2])).await.0,
            StatusCode::BAD_REQUEST
        );
    }
}
