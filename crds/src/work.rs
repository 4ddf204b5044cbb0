//! What the operator hands to workers through the queue, and what they send back. Shared by both sides so
//! the wire format has one definition.
//!
//! A job runs as tasks: `plan` (probe the input, cut it into chunks, choose encoders; writes the manifest to
//! the job's ledger), then one `chunk` task per chunk and one `audio` task, in parallel, then `stitch` (join,
//! measure, publish the outputs, delete the chunk objects). `cleanup` deletes a deleted job's ledger.
//!
//! The ledger is a folder in S3 beside the outputs, `<output>/.tessera/<job uid>/`: `manifest.json` (the
//! plan), `chunks/…` (encoded chunks), `done/c<N>.json` and `done/audio.json` (one completion record per
//! task, written after its objects), and after the stitch `result.json` (the published outputs; chunks and
//! records are then deleted). A restarted or failed-over operator re-plans, reads the records and queues
//! only what is missing: no finished chunk is encoded twice, and a published job is not made again. The
//! job's deletion removes the ledger.

use serde::{Deserialize, Serialize};

use crate::{RenditionStatus, TranscodeJobSpec};

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum WorkKind {
    Plan,
    Chunk,
    Audio,
    Stitch,
    Cleanup,
}

/// One task's instructions.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Work {
    pub kind: WorkKind,
    pub namespace: String,
    pub job: String,
    pub uid: String,
    pub spec: TranscodeJobSpec,
    /// `s3://bucket/prefix/.tessera/<uid>/`
    pub ledger: String,
    /// What the plan task decided (every task after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u32>,
}

/// The job's plan: `manifest.json` in the ledger, and part of every later task.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanRecord {
    /// The input's ETag when it was planned: every later read is pinned to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_etag: Option<String>,
    pub target_seconds: f64,
    pub chunks: u32,
    pub frames: u64,
    pub duration_seconds: f64,
    pub fps: f64,
    /// Video encoder per rendition, in spec order. Every chunk of a rendition uses the same one.
    pub encoders: Vec<String>,
    /// Why each encoder was chosen (hardware encoders that failed to open, in the planning worker's words).
    #[serde(default)]
    pub encoder_reasons: Vec<String>,
    /// An audio task is needed.
    pub audio: bool,
}

/// The plan task's answer.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlanResult {
    pub plan: PlanRecord,
    /// Chunks with a completion record already (from before a restart or failover).
    pub done: Vec<u32>,
    pub audio_done: bool,
    /// The job was stitched and published already (its report was lost in a failover): the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<StitchResult>,
}

/// A chunk or audio task's answer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChunkResult {
    pub frames: u64,
    /// The completion record existed: nothing was encoded.
    pub reused: bool,
    pub seconds: f64,
}

/// The stitch task's answer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StitchResult {
    pub renditions: Vec<RenditionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_playlist: Option<String>,
    pub seconds: f64,
}

/// A task that failed. `retryable` failures go back to the queue (a few times); others fail the job.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskFailure {
    /// A CamelCase reason for the job's `Failed` condition, e.g. `InputUnreadable`.
    pub reason: String,
    pub message: String,
    pub retryable: bool,
}

/// Progress a worker reports with its heartbeats.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskProgress {
    pub frames: u64,
}

/// The ledger folder of a job writing to `output` (an `s3://bucket/prefix/` URI).
pub fn ledger_prefix(output: &str, uid: &str) -> String {
    let base = if output.ends_with('/') {
        output.to_string()
    } else {
        format!("{output}/")
    };
    format!("{base}.tessera/{uid}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_sits_beside_the_outputs() {
        assert_eq!(
            ledger_prefix("s3://b/out", "u-1"),
            "s3://b/out/.tessera/u-1/"
        );
        assert_eq!(ledger_prefix("s3://b/out/", "u"), "s3://b/out/.tessera/u/");
    }
}
