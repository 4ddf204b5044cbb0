//! What the operator hands to workers through the queue, and what they send back. Shared by both sides so
//! the wire format has one definition.
//!
//! A job runs as tasks: `plan` (probe the input, cut it into chunks, choose encoders; writes the manifest to
//! the job's ledger), then one `chunk` task per chunk and one `audio` task, in parallel, then `stitch` (join,
//! measure, publish the outputs, delete the chunk objects). `cleanup` deletes a deleted job's ledger.
//!
//! The plan is data: the plan task alone probes the input and cuts it; every later task carries the
//! [`PlanRecord`] (chunk boundaries, encoders) and reads only the input's container header, so all workers
//! encode the same chunks alike and none plans again. Boundaries depend only on the input and the job's
//! `chunking` spec, never on the pool's size, so the same work always has the same chunks.
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
    /// The chunks, in order: together they hold every frame once.
    pub chunks: Vec<ChunkPlan>,
    pub frames: u64,
    pub duration_seconds: f64,
    pub fps: f64,
    /// Frame durations vary (timestamps are kept as they are rather than made constant).
    #[serde(default)]
    pub vfr: bool,
    /// Video encoder per rendition, in spec order. Every chunk of a rendition uses the same one.
    pub encoders: Vec<String>,
    /// Why each encoder was chosen (hardware encoders that failed to open, in the planning worker's words).
    #[serde(default)]
    pub encoder_reasons: Vec<String>,
    /// An audio task is needed.
    pub audio: bool,
}

impl PlanRecord {
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }
}

/// One chunk of a plan: the video frames whose presentation timestamps lie in `[start_pts, end_pts)`, in the
/// video stream's time base.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChunkPlan {
    pub index: u32,
    /// Where to seek before decoding (a keyframe's index timestamp); `None` decodes from the beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seek_ts: Option<i64>,
    /// `None`: from the first frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_pts: Option<i64>,
    /// `None`: to the last frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_pts: Option<i64>,
    /// Where the chunk starts and ends, in seconds from the input's start.
    pub start_seconds: f64,
    pub end_seconds: f64,
    /// Frames in the chunk, from its length and the frame rate (the chunk's result counts them exactly).
    pub frames: u64,
}

impl ChunkPlan {
    /// `count` chunks of `seconds` each at `fps` (pts in a 1/1000 time base): what simulated workers (load
    /// tests, benchmarks) plan.
    pub fn uniform(count: u32, seconds: f64, fps: f64) -> Vec<ChunkPlan> {
        let ms = |i: u32| (f64::from(i) * seconds * 1000.0).round() as i64;
        (0..count)
            .map(|i| ChunkPlan {
                index: i,
                seek_ts: (i > 0).then(|| ms(i)),
                start_pts: (i > 0).then(|| ms(i)),
                end_pts: (i + 1 < count).then(|| ms(i + 1)),
                start_seconds: f64::from(i) * seconds,
                end_seconds: f64::from(i + 1) * seconds,
                frames: (seconds * fps).round() as u64,
            })
            .collect()
    }
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

/// A chunk or audio task's answer, and its completion record in the ledger.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChunkResult {
    pub frames: u64,
    /// The completion record existed: nothing was encoded.
    pub reused: bool,
    pub seconds: f64,
    /// Per rendition, in spec order: how this chunk was encoded (empty for audio).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renditions: Vec<ChunkEncode>,
}

/// How one rendition of one chunk was encoded: the per-chunk record of the plan.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChunkEncode {
    pub encoder: String,
    pub frames: u64,
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
