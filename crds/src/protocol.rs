//! The queue protocol between the operator's leader (server) and the workers (clients): one type per request
//! and per reply, used by the operator, the worker, the load test and the benchmark. Nothing on either side
//! indexes JSON by hand; a message that does not fit its type is an error naming what did not fit, never a
//! default.
//!
//! ```text
//! POST /v1/pools/{ns}/{pool}/lease   LeaseRequest      → 200 LeaseReply | 204 nothing queued
//! POST /v1/tasks/{id}/heartbeat      HeartbeatRequest  → 200 HeartbeatReply | 409 not the holder
//! POST /v1/tasks/{id}/complete       CompleteRequest   → 200 CompleteReply | 400 unreadable (task failed)
//! POST /v1/tasks/{id}/fail           FailRequest       → 200 FailReply
//! POST /v1/tasks/{id}/release        ReleaseRequest    → 200 ReleaseReply
//! Authorization: Bearer <a ServiceAccount token for QUEUE_AUDIENCE> (workers read it from QUEUE_TOKEN_FILE, a
//! projected volume; the API server refuses it, and the queue refuses API-server tokens).
//! errors: ErrorReply. 401 no or bad token · 403 another pool's task · 404 unknown task · 410 task cancelled
//! (job deleted or suspended): stop it · 503 not the leader
//! ```

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::work::{
    ChunkResult, CollectResult, MissingResults, PlanResult, StitchResult, TaskFailure,
    TaskProgress, Work, WorkKind,
};

/// The audience of the tokens the queue accepts: a worker's projected ServiceAccount token is issued for it
/// alone, so the token a worker sends to the queue is useless against the API server (and the other way).
pub const QUEUE_AUDIENCE: &str = "tessera.dev/queue";

/// Where a worker pod finds its queue token (the projected volume the operator's pod spec mounts; the kubelet
/// refreshes it before it expires). `TESSERA_QUEUE_TOKEN_FILE` names it.
pub const QUEUE_TOKEN_FILE: &str = "/var/run/secrets/tessera.dev/queue/token";

/// A task's id: unique across leaders (an epoch in the high bits).
pub type TaskId = u64;

/// A request, and the reply it gets when it succeeds.
pub trait Call: Serialize + DeserializeOwned {
    type Reply: Serialize + DeserializeOwned;
}

/// `POST /v1/pools/{ns}/{pool}/lease`
pub fn lease_path(pool: &str) -> String {
    format!("/v1/pools/{pool}/lease")
}

/// `POST /v1/tasks/{id}/{op}`
pub fn task_path(id: TaskId, op: TaskOp) -> String {
    format!("/v1/tasks/{id}/{}", op.as_str())
}

/// What a worker does with a task it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOp {
    Heartbeat,
    Complete,
    Fail,
    Release,
}

impl TaskOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Heartbeat => "heartbeat",
            Self::Complete => "complete",
            Self::Fail => "fail",
            Self::Release => "release",
        }
    }
}

/// Ask for a task of the pool, waiting up to `wait_ms` (long poll, at most 25 s) for one to be queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseRequest {
    pub worker: String,
    #[serde(default)]
    pub wait_ms: u64,
}

/// A task handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeasedTask {
    pub id: TaskId,
    /// `namespace/name` of the pool.
    pub pool: String,
    pub namespace: String,
    pub job: String,
    pub priority: i32,
    pub work: Work,
}

/// The lease on it: renew with heartbeats before `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseGrant {
    pub task: TaskId,
    pub worker: String,
    /// Milliseconds on the leader's clock.
    pub expires_at: u64,
    /// 1 for the first lease of the task, then one more for each time it was given out again.
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseReply {
    pub task: LeasedTask,
    pub lease: LeaseGrant,
}

impl Call for LeaseRequest {
    type Reply = LeaseReply;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub worker: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TaskProgress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReply {
    pub expires_at: u64,
}

impl Call for HeartbeatRequest {
    type Reply = HeartbeatReply;
}

/// A task's answer, tagged with the kind of work it answers: the operator checks it against the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TaskResult {
    Plan(PlanResult),
    Chunk(ChunkResult),
    Audio(ChunkResult),
    Stitch(StitchResult),
    /// The stitch found results gone from the store: encode these again, then stitch.
    Missing(MissingResults),
    Cleanup(CleanupResult),
    Collect(CollectResult),
}

impl TaskResult {
    pub fn kind(&self) -> WorkKind {
        match self {
            Self::Plan(_) => WorkKind::Plan,
            Self::Chunk(_) => WorkKind::Chunk,
            Self::Audio(_) => WorkKind::Audio,
            Self::Stitch(_) | Self::Missing(_) => WorkKind::Stitch,
            Self::Cleanup(_) => WorkKind::Cleanup,
            Self::Collect(_) => WorkKind::Collect,
        }
    }
}

/// A cleanup task's answer: the ledger objects it deleted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupResult {
    pub deleted: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteRequest {
    pub worker: String,
    pub result: TaskResult,
    /// Seconds the worker spent on the task.
    #[serde(default)]
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompleteReply {
    /// The task and any coalesced onto it.
    pub completed: Vec<TaskId>,
}

impl Call for CompleteRequest {
    type Reply = CompleteReply;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailRequest {
    pub worker: String,
    pub failure: TaskFailure,
    #[serde(default)]
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailReply {
    /// Queued again (a retryable failure with attempts left); otherwise the job failed.
    pub requeued: bool,
}

impl Call for FailRequest {
    type Reply = FailReply;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseRequest {
    pub worker: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleaseReply {}

impl Call for ReleaseRequest {
    type Reply = ReleaseReply;
}

/// Every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// Only the worker's name, read from a request whose other fields did not fit (so the server can tell the
/// task's holder that its message was unreadable, and fail the task rather than let it be tried forever).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WorkerOnly {
    pub worker: String,
}

/// Only the task id of a lease reply whose instructions did not fit (so the worker can fail that task).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LeasedId {
    pub task: TaskIdOnly,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TaskIdOnly {
    pub id: TaskId,
}

/// Read a message, or say which field did not fit and why.
pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            format!("unreadable {what}: {inner}")
        } else {
            format!("unreadable {what}: at {path}: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::work::{ChunkPlan, PlanRecord};

    fn work(kind: WorkKind) -> Work {
        serde_json::from_value(serde_json::json!({
            "kind": kind, "namespace": "ns", "job": "j", "uid": "u", "ledger": "s3://b/o/.tessera/u/",
            "spec": {"input": {"uri": "s3://b/in.mp4"}, "output": {"uri": "s3://b/o/"},
                     "renditions": [{"name": "a", "video": {"codec": "h264"}}]},
        }))
        .unwrap()
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(decode::<T>("message", &bytes).unwrap(), v);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(LeaseRequest {
            worker: "w".into(),
            wait_ms: 20_000,
        });
        round_trip(LeaseReply {
            task: LeasedTask {
                id: 7 << 32 | 1,
                pool: "ns/gpu".into(),
                namespace: "ns".into(),
                job: "j".into(),
                priority: -3,
                work: work(WorkKind::Chunk),
            },
            lease: LeaseGrant {
                task: 7 << 32 | 1,
                worker: "w".into(),
                expires_at: 30_000,
                attempt: 2,
            },
        });
        round_trip(HeartbeatRequest {
            worker: "w".into(),
            progress: Some(TaskProgress { frames: 12 }),
        });
        round_trip(HeartbeatReply { expires_at: 1 });
        for result in [
            TaskResult::Plan(PlanResult {
                plan: PlanRecord {
                    input_etag: Some("\"e\"".into()),
                    target_seconds: 2.0,
                    chunks: ChunkPlan::uniform(3, 2.0, 25.0),
                    vfr: false,
                    frames: 150,
                    duration_seconds: 6.0,
                    fps: 25.0,
                    encoders: vec!["libx264".into()],
                    encoder_reasons: vec![],
                    audio: true,
                    hdr: None,
                    captions: false,
                    ladder: None,
                },
                done: vec![1],
                audio_done: false,
                finished: None,
            }),
            TaskResult::Chunk(ChunkResult {
                frames: 50,
                reused: false,
                seconds: 0.5,
                renditions: vec![],
            }),
            TaskResult::Audio(ChunkResult::default()),
            TaskResult::Stitch(StitchResult::default()),
            TaskResult::Missing(MissingResults {
                chunks: vec![0, 2],
                audio: true,
            }),
            TaskResult::Cleanup(CleanupResult { deleted: 4 }),
            TaskResult::Collect(CollectResult {
                listed: 9,
                deleted: 3,
                bytes_deleted: 1 << 20,
                kept_needed: 2,
                stopped_early: false,
            }),
        ] {
            let kind = result.kind();
            let req = CompleteRequest {
                worker: "w".into(),
                result,
                seconds: 1.5,
            };
            let v = serde_json::to_value(&req).unwrap();
            if !matches!(req.result, TaskResult::Missing(_)) {
                assert_eq!(v["result"]["kind"], serde_json::to_value(kind).unwrap());
            }
            round_trip(req);
        }
        round_trip(CompleteReply {
            completed: vec![1, 2],
        });
        round_trip(FailRequest {
            worker: "w".into(),
            failure: TaskFailure {
                reason: "InputUnreadable".into(),
                message: "m".into(),
                retryable: false,
            },
            seconds: 0.0,
        });
        round_trip(FailReply { requeued: true });
        round_trip(ReleaseRequest { worker: "w".into() });
        round_trip(ReleaseReply {});
        round_trip(ErrorReply { error: "e".into() });
        assert_eq!(task_path(5, TaskOp::Complete), "/v1/tasks/5/complete");
        assert_eq!(lease_path("ns/gpu"), "/v1/pools/ns/gpu/lease");
    }

    #[test]
    fn a_malformed_message_is_an_error_naming_the_field() {
        // A stitch result whose renditions are not a list: the path says where (down to the tagged result).
        let e = decode::<CompleteRequest>(
            "complete request",
            br#"{"worker":"w","result":{"kind":"stitch","renditions":7,"seconds":1}}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("at result") && e.contains("expected a sequence"),
            "{e}"
        );
        // No result at all is not a default.
        let e = decode::<CompleteRequest>("complete request", br#"{"worker":"w"}"#).unwrap_err();
        assert!(e.contains("missing field `result`"), "{e}");
        // A kind this build does not know.
        let e = decode::<CompleteRequest>(
            "complete request",
            br#"{"worker":"w","result":{"kind":"transmogrify"}}"#,
        )
        .unwrap_err();
        assert!(e.contains("transmogrify"), "{e}");
        // An unknown field in a request (a newer worker's?) is named rather than ignored.
        let e =
            decode::<LeaseRequest>("lease request", br#"{"worker":"w","waitMS":5}"#).unwrap_err();
        assert!(e.contains("waitMS"), "{e}");
        assert_eq!(
            decode::<WorkerOnly>("x", br#"{"worker":"w","result":1}"#)
                .unwrap()
                .worker,
            "w"
        );
    }
}
