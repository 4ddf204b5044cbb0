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
//!
//! A pool with a result store (`WorkerPool.spec.resultStore`) keeps the encoded pieces there instead of in
//! `chunks/`, under content addresses ([`chunk_keys`], [`audio_key`]): jobs with the same input and settings
//! find each other's work, and identical tasks queued at once are coalesced ([`coalesce_key`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{AudioSpec, RenditionStatus, TranscodeJobSpec, VideoSpec};

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum WorkKind {
    Plan,
    Chunk,
    Audio,
    Stitch,
    Cleanup,
    /// Delete results in the pool's result store that no one has made or used for its retention time.
    Collect,
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
    /// What the plan task decided (every task after it; a chunk task's holds its own chunk only, see
    /// [`PlanRecord::for_task`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u32>,
    /// The pool's result store for this job (`WorkerPool.spec.resultStore`, namespace filled in): encoded
    /// chunks and audio are filed there by [`chunk_keys`] and [`audio_key`] and taken from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<String>,
    /// How long results in that store are kept after their last use (`WorkerPool.spec.resultRetentionSeconds`):
    /// a chunk task takes only results that will outlive a collection running now ([`fresh_enough`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_seconds: Option<u64>,
    /// A collection task's instructions (`kind: collect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect: Option<Collect>,
}

/// A pool's result store as a job uses it: where (namespace filled in) and for how long results are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultStore {
    pub uri: String,
    pub retention_seconds: u64,
}

/// What a collection of the result store must not delete: the content addresses that jobs still running
/// with this store need (every chunk and audio address of their plans), as the leader knew them when it
/// handed the task out.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Collect {
    pub keep: Vec<String>,
}

/// A collection task's answer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CollectResult {
    /// Results found in the store.
    pub listed: u64,
    pub deleted: u64,
    pub bytes_deleted: u64,
    /// Past their retention but needed by a running job.
    pub kept_needed: u64,
    /// The time a collection may take ([`grace_seconds`]) ran out before every expired result was deleted
    /// (the next collection goes on).
    #[serde(default)]
    pub stopped_early: bool,
}

/// The stitch's answer when results it needs are no longer in the store (collected while the job waited,
/// or deleted by hand): these chunks (and the audio) must be encoded again. Their completion records were
/// removed from the ledger.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MissingResults {
    pub chunks: Vec<u32>,
    pub audio: bool,
}

/// How long a collection may go on deleting after it read the store's clock, and so how much younger than
/// the retention a result must be for a chunk task to take it: half the retention, at most 10 minutes.
pub fn grace_seconds(retention_seconds: u64) -> u64 {
    (retention_seconds / 2).min(600)
}

/// A result last made or used at `last_used` may be taken at `now` (both the store's clock, seconds): a
/// collection that started before `now` cannot delete it (its cutoff is older) and one that starts later
/// finds it refreshed by this use.
pub fn fresh_enough(last_used: i64, now: i64, retention_seconds: u64) -> bool {
    let margin = retention_seconds.saturating_sub(grace_seconds(retention_seconds));
    last_used > now.saturating_sub(margin as i64)
}

/// One object in a result store, as a collection lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResult {
    /// The key below the store's prefix (`chunks/<address>.tpk`, `audio/<address>-<name>`).
    pub key: String,
    /// Last made or used, the store's clock in seconds.
    pub last_used: i64,
    pub size: u64,
}

/// The content address a result store's key files its object under.
pub fn address_of(key: &str) -> Option<&str> {
    let rest = key
        .strip_prefix("chunks/")
        .or_else(|| key.strip_prefix("audio/"))?;
    let addr = rest.get(..64)?;
    addr.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then_some(addr)
        .filter(|_| matches!(rest.as_bytes().get(64), Some(b'.' | b'-')))
}

/// What a collection at `now` deletes: results not made or used for the retention time, unless a running
/// job needs their address. Keys that are not results (nothing Tessera wrote) are never touched. Answers
/// the indices to delete and how many expired ones were kept because a job needs them.
pub fn collectable(
    objects: &[StoredResult],
    now: i64,
    retention_seconds: u64,
    keep: &std::collections::HashSet<&str>,
) -> (Vec<usize>, u64) {
    let cutoff = now.saturating_sub(retention_seconds as i64);
    let mut kept = 0;
    let delete = objects
        .iter()
        .enumerate()
        .filter(|(_, o)| o.last_used < cutoff)
        .filter_map(|(i, o)| {
            let addr = address_of(&o.key)?;
            if keep.contains(addr) {
                kept += 1;
                None
            } else {
                Some(i)
            }
        })
        .collect();
    (delete, kept)
}

/// Every content address a job's plan uses in the store: each rendition of each chunk, and the audio.
pub fn needed_addresses(spec: &TranscodeJobSpec, plan: &PlanRecord) -> Vec<String> {
    let mut out: Vec<String> = plan
        .chunks
        .iter()
        .filter_map(|c| chunk_keys(spec, plan, c.index))
        .flatten()
        .collect();
    if plan.audio {
        out.extend(audio_key(spec, plan));
    }
    out
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
    /// Video encoder per rendition, in spec order (the ladder's rungs last, see [`PlanRecord::applied`]).
    /// Every chunk of a rendition uses the same one.
    pub encoders: Vec<String>,
    /// Why each encoder was chosen (hardware encoders that failed to open, in the planning worker's words).
    #[serde(default)]
    pub encoder_reasons: Vec<String>,
    /// An audio task is needed.
    pub audio: bool,
    /// The source's HDR10 static metadata, written into every chunk of every HEVC and AV1 rendition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdr: Option<Box<HdrStatic>>,
    /// The source's video carries CEA-608/708 captions (A/53), kept in renditions whose encoder can.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub captions: bool,
    /// The ladder `spec.ladder` built (its rungs follow the spec's renditions: see [`crate::ladder::apply`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ladder: Option<Box<crate::Ladder>>,
}

/// HDR10 static metadata as the source carries it: the mastering display's colour volume (SMPTE ST 2086)
/// and the content light levels (CTA-861.3).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HdrStatic {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mastering: Option<MasteringDisplay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_light: Option<ContentLight>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MasteringDisplay {
    /// CIE 1931 xy chromaticity of the red, green and blue primaries, in that order.
    pub primaries: [[f64; 2]; 3],
    pub white_point: [f64; 2],
    /// Luminance in cd/m².
    pub max_luminance: f64,
    pub min_luminance: f64,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContentLight {
    /// MaxCLL and MaxFALL, cd/m².
    pub max_cll: u32,
    pub max_fall: u32,
}

impl PlanRecord {
    /// The job's spec as its tasks run it: with the ladder's rungs as renditions ([`crate::ladder::apply`]).
    pub fn applied<'a>(
        &self,
        spec: &'a TranscodeJobSpec,
    ) -> std::borrow::Cow<'a, TranscodeJobSpec> {
        crate::ladder::apply(spec, self.ladder.as_deref())
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Chunk `index` of the plan.
    pub fn chunk(&self, index: u32) -> Option<&ChunkPlan> {
        self.chunks.iter().find(|c| c.index == index)
    }

    /// What a task of `kind` is sent: a chunk task gets its own chunk only and the audio task none (a long
    /// input has hundreds, and every task would carry them all); the stitch gets them all.
    pub fn for_task(&self, kind: WorkKind, chunk: Option<u32>) -> PlanRecord {
        let chunks = match (kind, chunk) {
            (WorkKind::Chunk, Some(c)) => self.chunk(c).into_iter().copied().collect(),
            (WorkKind::Audio, _) => Vec::new(),
            _ => self.chunks.clone(),
        };
        // Field by field: `..self.clone()` would copy every chunk for each task only to drop them.
        PlanRecord {
            input_etag: self.input_etag.clone(),
            target_seconds: self.target_seconds,
            chunks,
            frames: self.frames,
            duration_seconds: self.duration_seconds,
            fps: self.fps,
            vfr: self.vfr,
            encoders: self.encoders.clone(),
            encoder_reasons: self.encoder_reasons.clone(),
            audio: self.audio,
            hdr: self.hdr.clone(),
            captions: self.captions,
            ladder: self.ladder.clone(),
        }
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
    /// Taken from the result store (encoded for an earlier job), not encoded by this task.
    #[serde(default)]
    pub reused: bool,
    /// The setting a `targetQuality` search chose for this chunk (CRF; cq for NVENC). A retry encodes with it
    /// again, with the same encoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crf: Option<u8>,
    /// The setting sits on a bound of the search (`minCrf`/`maxCrf` or the encoder's own range): the target
    /// may have been out of reach for this chunk.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub at_bound: bool,
    /// VMAF of each frame of this chunk (when the job measures VMAF or targets a quality).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmaf: Option<ChunkVmaf>,
}

/// VMAF of one chunk of one rendition.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChunkVmaf {
    pub model: String,
    pub mean: f64,
    /// Per frame, in presentation order (to 0.01).
    pub frames: Vec<f32>,
}

impl ChunkVmaf {
    pub fn new(model: &str, scores: &[f64]) -> Self {
        let mean = if scores.is_empty() {
            0.0
        } else {
            scores.iter().sum::<f64>() / scores.len() as f64
        };
        ChunkVmaf {
            model: model.to_string(),
            mean: round3(mean),
            frames: scores
                .iter()
                .map(|s| ((s * 100.0).round() / 100.0) as f32)
                .collect(),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Pool a rendition's per-chunk VMAF (chunks in order) as libvmaf pools frames: mean, harmonic mean
/// (`n / Σ 1/(1+s) − 1`), min and the 5th percentile (linear between ranks).
pub fn pool_vmaf<'a>(
    chunks: impl IntoIterator<Item = &'a ChunkVmaf>,
) -> Option<crate::VmafSummary> {
    let mut model = String::new();
    let mut all: Vec<f64> = Vec::new();
    for c in chunks {
        model.clone_from(&c.model);
        all.extend(c.frames.iter().map(|&f| f64::from(f)));
    }
    if all.is_empty() {
        return None;
    }
    let n = all.len() as f64;
    let mean = all.iter().sum::<f64>() / n;
    let harmonic = n / all.iter().map(|s| 1.0 / (s + 1.0)).sum::<f64>() - 1.0;
    all.sort_by(f64::total_cmp);
    let rank = 0.05 * (n - 1.0);
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let p5 = all[lo] + (all[hi] - all[lo]) * (rank - lo as f64);
    Some(crate::VmafSummary {
        model,
        frames: all.len() as u64,
        mean: round3(mean),
        harmonic_mean: round3(harmonic),
        min: round3(all[0]),
        p5: round3(p5),
    })
}

/// What a `targetQuality` rendition achieved, from its chunks' records (chunk index, record).
pub fn target_outcome<'a>(
    target: f64,
    chunks: impl IntoIterator<Item = (u32, &'a ChunkEncode)>,
) -> Option<crate::TargetOutcome> {
    let mut out: Option<crate::TargetOutcome> = None;
    let (mut sum, mut n) = (0.0, 0usize);
    for (i, c) in chunks {
        let (Some(crf), Some(v)) = (c.crf, c.vmaf.as_ref()) else {
            return None;
        };
        sum += v.frames.iter().map(|&f| f64::from(f)).sum::<f64>();
        n += v.frames.len();
        let o = out.get_or_insert(crate::TargetOutcome {
            target,
            achieved_mean: 0.0,
            min_chunk: i,
            min_chunk_vmaf: v.mean,
            min_crf: crf,
            max_crf: crf,
            chunks_at_bound: 0,
        });
        o.chunks_at_bound += u32::from(c.at_bound);
        if v.mean < o.min_chunk_vmaf {
            o.min_chunk = i;
            o.min_chunk_vmaf = v.mean;
        }
        o.min_crf = o.min_crf.min(crf);
        o.max_crf = o.max_crf.max(crf);
    }
    let mut o = out?;
    o.achieved_mean = round3(if n > 0 { sum / n as f64 } else { 0.0 });
    Some(o)
}

/// The stitch task's answer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StitchResult {
    pub renditions: Vec<RenditionStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_playlist: Option<String>,
    /// The DASH MPD (`cmaf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The WebVTT thumbnail track.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnails: Option<String>,
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

/// What an encoded chunk of one rendition depends on, and so its content address: the engine's version, the
/// input object and its ETag, the chunk's boundaries and the timing the plan fixed, the rendition's video
/// settings and the encoder that makes them.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChunkAddress<'a> {
    engine: &'a str,
    input: &'a str,
    etag: &'a str,
    fps: f64,
    vfr: bool,
    seek_ts: Option<i64>,
    start_pts: Option<i64>,
    end_pts: Option<i64>,
    video: &'a VideoSpec,
    encoder: &'a str,
}

/// What a job's audio encodes depend on: the input and each distinct audio setting, in order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AudioAddress<'a> {
    engine: &'a str,
    input: &'a str,
    etag: &'a str,
    audio: Vec<Option<&'a AudioSpec>>,
    /// The audio task also extracts the kept subtitle tracks: the selection is part of what it makes.
    #[serde(skip_serializing_if = "Option::is_none")]
    streams: Option<&'a crate::StreamsSpec>,
}

fn address(what: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(what).expect("plain data serializes");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The content address of each rendition's encode of `chunk` (in spec order); `None` when the input has no
/// ETag (a local file) or the chunk is not in the plan.
pub fn chunk_keys(spec: &TranscodeJobSpec, plan: &PlanRecord, chunk: u32) -> Option<Vec<String>> {
    let etag = plan.input_etag.as_deref()?;
    let c = plan.chunk(chunk)?;
    let keys = spec
        .renditions
        .iter()
        .zip(&plan.encoders)
        .map(|(r, encoder)| {
            address(&ChunkAddress {
                engine: env!("CARGO_PKG_VERSION"),
                input: &spec.input.uri,
                etag,
                fps: plan.fps,
                vfr: plan.vfr,
                seek_ts: c.seek_ts,
                start_pts: c.start_pts,
                end_pts: c.end_pts,
                video: &r.video,
                encoder,
            })
        })
        .collect::<Vec<_>>();
    // A plan naming fewer encoders than the spec has renditions addresses nothing.
    (keys.len() == spec.renditions.len()).then_some(keys)
}

/// The content address of a job's audio encodes (all distinct settings together); `None` without an ETag.
pub fn audio_key(spec: &TranscodeJobSpec, plan: &PlanRecord) -> Option<String> {
    let etag = plan.input_etag.as_deref()?;
    let mut audio: Vec<Option<&AudioSpec>> = Vec::new();
    for a in spec.renditions.iter().map(|r| r.audio.as_ref()) {
        if !audio.contains(&a) {
            audio.push(a);
        }
    }
    Some(address(&AudioAddress {
        engine: env!("CARGO_PKG_VERSION"),
        input: &spec.input.uri,
        etag,
        audio,
        streams: spec.streams.as_ref(),
    }))
}

/// The key under which identical tasks are coalesced in the queue: same store, same results. `None` for
/// tasks whose results are not filed by content.
pub fn coalesce_key(work: &Work) -> Option<String> {
    let store = work.results.as_deref()?;
    let plan = work.plan.as_ref()?;
    let keys = match (work.kind, work.chunk) {
        (WorkKind::Chunk, Some(c)) => chunk_keys(&work.spec, plan, c)?,
        (WorkKind::Audio, _) => vec![audio_key(&work.spec, plan)?],
        _ => return None,
    };
    Some(format!("{store}|{}", keys.join(",")))
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

    #[test]
    fn vmaf_pools_over_every_frame_of_every_chunk() {
        let a = ChunkVmaf::new("vmaf_v0.6.1", &[90.0, 92.0, 94.0]);
        let b = ChunkVmaf::new("vmaf_v0.6.1", &[80.0]);
        assert_eq!(a.mean, 92.0);
        let p = pool_vmaf([&a, &b]).unwrap();
        assert_eq!((p.frames, p.mean, p.min), (4, 89.0, 80.0));
        // n / Σ 1/(1+s) − 1, by hand.
        let h = 4.0 / (1.0 / 91.0 + 1.0 / 93.0 + 1.0 / 95.0 + 1.0 / 81.0) - 1.0;
        assert!((p.harmonic_mean - h).abs() < 1e-3 && p.harmonic_mean < p.mean);
        // Rank 0.05·3 = 0.15 between 80 and 90.
        assert!((p.p5 - 81.5).abs() < 1e-9, "{}", p.p5);
        assert!(pool_vmaf([]).is_none());
    }

    #[test]
    fn a_target_outcome_names_the_worst_chunk_and_the_setting_range() {
        let rec = |crf, scores: &[f64]| ChunkEncode {
            encoder: "libx264".into(),
            frames: scores.len() as u64,
            crf: Some(crf),
            vmaf: Some(ChunkVmaf::new("vmaf_v0.6.1", scores)),
            ..Default::default()
        };
        let (a, b, mut c) = (
            rec(30, &[94.0, 94.0]),
            rec(18, &[91.0, 93.0]),
            rec(24, &[93.0, 93.0]),
        );
        c.at_bound = true;
        let o = target_outcome(93.0, [(0, &a), (1, &b), (2, &c)]).unwrap();
        assert_eq!(
            (o.min_chunk, o.min_chunk_vmaf, o.min_crf, o.max_crf),
            (1, 92.0, 18, 30)
        );
        assert!((o.achieved_mean - 93.0).abs() < 1e-9);
        assert_eq!(o.chunks_at_bound, 1);
        // A chunk without a setting (not a targeted encode) means no outcome.
        let plain = ChunkEncode::default();
        assert!(target_outcome(93.0, [(0, &a), (1, &plain)]).is_none());
    }

    use super::*;

    fn job(renditions: &str) -> TranscodeJobSpec {
        crate::parse_job_yaml(&format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: j}}\nspec:\n  \
             input: {{uri: \"s3://b/in.mp4\"}}\n  output: {{uri: \"s3://b/out/\"}}\n  renditions:\n{renditions}"
        ))
        .unwrap()
        .spec
    }

    fn plan(encoders: &[&str]) -> PlanRecord {
        PlanRecord {
            input_etag: Some("\"e1\"".into()),
            target_seconds: 2.0,
            chunks: ChunkPlan::uniform(3, 2.0, 25.0),
            frames: 150,
            duration_seconds: 6.0,
            fps: 25.0,
            vfr: false,
            encoders: encoders.iter().map(|e| e.to_string()).collect(),
            encoder_reasons: vec![],
            audio: true,
            hdr: None,
            captions: false,
            ladder: None,
        }
    }

    const HD: &str = "    - {name: hd, video: {codec: h264, height: 720, crf: 23}}\n";
    const SD: &str = "    - {name: sd, video: {codec: h264, height: 360, crf: 28}, audio: {codec: aac, bitrate: 96k}}\n";

    #[test]
    fn results_are_addressed_by_what_makes_them() {
        let one = job(HD);
        let two = job(&format!("{HD}{SD}"));
        let p1 = plan(&["libx264"]);
        let p2 = plan(&["libx264", "libx264"]);
        let k1 = chunk_keys(&one, &p1, 1).unwrap();
        // The same input, chunk and settings: the same address, whatever else the job asks for.
        assert_eq!(chunk_keys(&two, &p2, 1).unwrap()[0], k1[0]);
        // Another chunk, another ETag, another encoder or other settings: another address.
        assert_ne!(chunk_keys(&one, &p1, 2).unwrap(), k1);
        let mut changed = p1.clone();
        changed.input_etag = Some("\"e2\"".into());
        assert_ne!(chunk_keys(&one, &changed, 1).unwrap(), k1);
        assert_ne!(chunk_keys(&one, &plan(&["h264_nvenc"]), 1).unwrap(), k1);
        assert_ne!(
            chunk_keys(&job(&HD.replace("crf: 23", "crf: 24")), &p1, 1).unwrap(),
            k1
        );
        // The rendition's name is not part of what is made.
        assert_eq!(
            chunk_keys(&job(&HD.replace("hd,", "top,")), &p1, 1).unwrap(),
            k1
        );
        assert_eq!(k1[0].len(), 64);
        // No ETag (a local file) or a chunk outside the plan: nothing to address.
        let mut local = p1.clone();
        local.input_etag = None;
        assert!(chunk_keys(&one, &local, 1).is_none());
        assert!(chunk_keys(&one, &p1, 3).is_none());
        // Audio: by its distinct settings; a video-only change keeps it.
        assert_eq!(
            audio_key(&two, &p2),
            audio_key(
                &job(&format!("{}{SD}", HD.replace("crf: 23", "crf: 20"))),
                &p2
            )
        );
        assert_ne!(audio_key(&one, &p1), audio_key(&two, &p2));
    }

    #[test]
    fn a_collection_deletes_only_expired_results_no_running_job_needs() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let c = "c".repeat(64);
        let obj = |key: String, last_used: i64| StoredResult {
            key,
            last_used,
            size: 10,
        };
        let objects = vec![
            obj(format!("chunks/{a}.tpk"), 100),              // expired
            obj(format!("chunks/{b}.tpk"), 100),              // expired, but a running job needs it
            obj(format!("audio/{a}-audio-0.tpk"), 100),       // expired
            obj(format!("chunks/{c}.tpk"), 950),              // recent
            obj("notes/readme.txt".into(), 0),                // not ours
            obj(format!("chunks/{}.tpk", "z".repeat(64)), 0), // not an address
        ];
        let keep: std::collections::HashSet<&str> = [b.as_str()].into();
        let (delete, kept) = collectable(&objects, 1000, 600, &keep);
        assert_eq!(delete, vec![0, 2]);
        assert_eq!(kept, 1);
        // Exactly at the cutoff is kept.
        assert_eq!(
            collectable(&[obj(format!("chunks/{a}.tpk"), 400)], 1000, 600, &keep).0,
            Vec::<usize>::new()
        );
        assert_eq!(
            address_of(&format!("audio/{a}-audio-1-0.tpk")),
            Some(a.as_str())
        );
        assert_eq!(address_of(&format!("chunks/{a}")), None);
    }

    #[test]
    fn a_result_is_taken_only_if_it_outlives_a_collection_running_now() {
        // Retention 1 h: grace 10 min, so a result last used 50 min ago or earlier is encoded again.
        assert_eq!(grace_seconds(3600), 600);
        assert_eq!(grace_seconds(4), 2);
        assert!(fresh_enough(10_000 - 2_999, 10_000, 3600));
        assert!(!fresh_enough(10_000 - 3_000, 10_000, 3600));
        // A collection that read its clock at `t0 <= now` deletes only what was last used before
        // `t0 - retention`; whatever `fresh_enough` takes is younger than that.
        for t0 in [9_000, 9_999, 10_000] {
            let last = 10_000 - 2_999;
            assert!(last >= t0 - 3600);
        }
        let spec = job(HD);
        let p = plan(&["libx264"]);
        let needed = needed_addresses(&spec, &p);
        assert_eq!(needed.len(), 3 + 1, "three chunks and the audio");
        assert!(needed.contains(&chunk_keys(&spec, &p, 2).unwrap()[0]));
    }

    #[test]
    fn identical_tasks_coalesce_only_with_a_store() {
        let spec = job(HD);
        let work = |results: Option<&str>, chunk: u32| Work {
            kind: WorkKind::Chunk,
            namespace: "n".into(),
            job: "j".into(),
            uid: "u".into(),
            spec: spec.clone(),
            ledger: "s3://b/out/.tessera/u/".into(),
            plan: Some(plan(&["libx264"])),
            chunk: Some(chunk),
            results: results.map(String::from),
            retention_seconds: None,
            collect: None,
        };
        assert_eq!(coalesce_key(&work(None, 0)), None);
        let a = coalesce_key(&work(Some("s3://b/r/n/"), 0)).unwrap();
        let mut other_job = work(Some("s3://b/r/n/"), 0);
        other_job.job = "k".into();
        other_job.uid = "v".into();
        assert_eq!(coalesce_key(&other_job), Some(a.clone()));
        assert_ne!(coalesce_key(&work(Some("s3://b/r/n/"), 1)), Some(a.clone()));
        assert_ne!(coalesce_key(&work(Some("s3://b/r/other/"), 0)), Some(a));
    }

    #[test]
    fn a_chunk_task_carries_its_own_chunk_only() {
        let spec = job(HD);
        let full = plan(&["libx264"]);
        let one = full.for_task(WorkKind::Chunk, Some(2));
        assert_eq!(one.chunks, vec![full.chunks[2]]);
        // Its address is the same as from the whole plan.
        assert_eq!(chunk_keys(&spec, &one, 2), chunk_keys(&spec, &full, 2));
        assert!(chunk_keys(&spec, &one, 1).is_none());
        assert!(full.for_task(WorkKind::Audio, None).chunks.is_empty());
        assert_eq!(
            audio_key(&spec, &full.for_task(WorkKind::Audio, None)),
            audio_key(&spec, &full)
        );
        assert_eq!(full.for_task(WorkKind::Stitch, None), full);
    }

    #[test]
    fn ledger_sits_beside_the_outputs() {
        assert_eq!(
            ledger_prefix("s3://b/out", "u-1"),
            "s3://b/out/.tessera/u-1/"
        );
        assert_eq!(ledger_prefix("s3://b/out/", "u"), "s3://b/out/.tessera/u/");
    }
}
