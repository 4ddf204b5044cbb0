//! The queue API workers call: lease, heartbeat, complete, release. Every request carries the worker pod's
//! ServiceAccount token (`Authorization: Bearer`), checked with the Kubernetes TokenReview API; a worker may
//! act only on its own pool's tasks (the pool's namespace and worker ServiceAccount).
//!
//! ```text
//! POST /v1/pools/{pool}/lease        {"worker": "<pod>"}  → 200 {task, lease} | 204 nothing queued
//! POST /v1/tasks/{id}/heartbeat      {"worker": "<pod>"}  → 200 {expiresAt} | 409 not the holder
//! POST /v1/tasks/{id}/complete       {"worker": "<pod>"}  → 200 {completed: [ids]}
//! POST /v1/tasks/{id}/release        {"worker": "<pod>"}  → 200
//! 401 no or bad token · 403 another pool's task · 404 unknown task or pool
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::queue::{Queue, QueueError, TaskId};

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

/// Tokens checked by the API server (TokenReview).
pub struct TokenReviewer {
    pub client: kube::Client,
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
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
            Ok(Identity {
                username: status.user.and_then(|u| u.username).unwrap_or_default(),
            })
        })
    }
}

/// The ServiceAccount allowed to work for each pool.
#[derive(Debug, Clone, Default)]
pub struct PoolAccess {
    /// pool → (namespace, service account)
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

pub struct ApiState {
    pub queue: Mutex<Queue>,
    pub access: Mutex<PoolAccess>,
    pub auth: Box<dyn Authenticator>,
    pub started: Instant,
}

impl ApiState {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

#[derive(Debug, Deserialize)]
pub struct WorkerBody {
    pub worker: String,
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({"error": msg.into()}))).into_response()
}

async fn identify(state: &ApiState, headers: &HeaderMap) -> Result<Identity, Response> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| err(StatusCode::UNAUTHORIZED, "missing bearer token"))?;
    state.auth.authenticate(token).await.map_err(|why| {
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

async fn lease(
    State(st): State<Arc<ApiState>>,
    Path(pool): Path<String>,
    headers: HeaderMap,
    Json(body): Json<WorkerBody>,
) -> Response {
    let who = match identify(&st, &headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    if !st
        .access
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allows(&who, &pool)
    {
        return err(
            StatusCode::FORBIDDEN,
            format!("{} may not work for pool {pool}", who.username),
        );
    }
    let now = st.now_ms();
    let got = st
        .queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .lease(&pool, &body.worker, now);
    match got {
        Some((task, lease)) => Json(json!({"task": task, "lease": lease})).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// Check the caller may act on task `id` (its pool's ServiceAccount), then run `f` on the queue.
async fn on_task(
    st: &ApiState,
    headers: &HeaderMap,
    id: TaskId,
    f: impl FnOnce(&mut Queue, u64) -> Result<serde_json::Value, QueueError>,
) -> Response {
    let who = match identify(st, headers).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let now = st.now_ms();
    let mut q = st.queue.lock().unwrap_or_else(|p| p.into_inner());
    let Some(pool) = q.task(id).map(|t| t.pool.clone()) else {
        return queue_error(QueueError::UnknownTask(id));
    };
    if !st
        .access
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allows(&who, &pool)
    {
        return err(
            StatusCode::FORBIDDEN,
            format!("{} may not act on pool {pool}", who.username),
        );
    }
    match f(&mut q, now) {
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
    on_task(&st, &headers, id, |q, now| {
        q.heartbeat(id, &b.worker, now)
            .map(|exp| json!({"expiresAt": exp}))
    })
    .await
}

async fn complete(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    Json(b): Json<WorkerBody>,
) -> Response {
    on_task(&st, &headers, id, |q, _| {
        q.complete(id, &b.worker)
            .map(|c| json!({"completed": c.tasks.iter().map(|t| t.id).collect::<Vec<_>>()}))
    })
    .await
}

async fn release(
    State(st): State<Arc<ApiState>>,
    Path(id): Path<TaskId>,
    headers: HeaderMap,
    Json(b): Json<WorkerBody>,
) -> Response {
    on_task(&st, &headers, id, |q, _| {
        q.release(id, &b.worker).map(|()| json!({}))
    })
    .await
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/pools/{pool}/lease", post(lease))
        .route("/v1/tasks/{id}/heartbeat", post(heartbeat))
        .route("/v1/tasks/{id}/complete", post(complete))
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
        for (id, pool) in [(1, "gpu"), (2, "cpu")] {
            q.enqueue(
                Task {
                    id,
                    pool: pool.into(),
                    namespace: "media".into(),
                    job: "j".into(),
                    priority: 0,
                    coalesce: None,
                },
                0,
            );
        }
        let mut access = PoolAccess::default();
        access
            .pools
            .insert("gpu".into(), ("media".into(), "gpu-worker".into()));
        access
            .pools
            .insert("cpu".into(), ("media".into(), "cpu-worker".into()));
        Arc::new(ApiState {
            queue: Mutex::new(q),
            access: Mutex::new(access),
            auth: Box::new(Static),
            started: Instant::now(),
        })
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
            call(&st, "/v1/pools/gpu/lease", None, "w").await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&st, "/v1/pools/gpu/lease", Some("bogus"), "w").await.0,
            StatusCode::UNAUTHORIZED
        );
        // The CPU pool's account cannot lease GPU work, nor touch a GPU task.
        assert_eq!(
            call(&st, "/v1/pools/gpu/lease", Some("sa:media:cpu-worker"), "w")
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        // Same name in another namespace is another account.
        assert_eq!(
            call(&st, "/v1/pools/gpu/lease", Some("sa:other:gpu-worker"), "w")
                .await
                .0,
            StatusCode::FORBIDDEN
        );
        let (s, _) = call(
            &st,
            "/v1/pools/gpu/lease",
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
        let (s, body) = call(&st, "/v1/pools/gpu/lease", tok, "w1").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["task"]["id"], 1);
        assert_eq!(body["lease"]["worker"], "w1");
        // Nothing else queued for this pool.
        assert_eq!(
            call(&st, "/v1/pools/gpu/lease", tok, "w2").await.0,
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
