//! One job's whole lifecycle, as the leader tracks it. Pure: the state's owner feeds it events (`JobRun::on`)
//! and asks what to queue next and what the status says (`JobRun::status`, the one status builder).
//!
//! ```text
//!            Start                PlanLeased            Planned                  last Encoded          Stitched
//! Queued ───────────▶ Queued ─────────────▶ Planning ─────────▶ Encoding ──────────────▶ Stitching ──────────▶ Succeeded
//!   │  ▲ PoolMissing / Start        (Planned also from Queued; a published job's plan goes straight to Succeeded)
//!   ▼  │
//! PoolMissing      any running stage ──Suspend──▶ Suspended ──Resume──▶ Queued (re-plan from the ledger)
//! any unfinished stage ──Failed{reason}──▶ Failed (invalid spec, pool not allowed, a task failed for good)
//! any stage ──Delete──▶ Deleting (the owner cancels the tasks and runs the cleanup)
//! Stitching ──Missing{chunks}──▶ Encoding (results collected from the store are encoded again)
//! ```
//! A restarted or new leader starts every unfinished job at Queued; the plan task reads the ledger and
//! reports the chunks already recorded, so only the rest is queued.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use tessera_crds::work::{ChunkResult, MissingResults, PlanResult, StitchResult, Work, WorkKind};
use tessera_crds::{Phase, Progress, RenditionStatus, TranscodeJobSpec, TranscodeJobStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Admitted; its plan task waits for a worker.
    Queued,
    Planning,
    Encoding,
    Stitching,
    /// `spec.suspend`: nothing handed out.
    Suspended,
    /// Its pool does not exist (yet) in its own namespace: it waits.
    PoolMissing,
    /// Deleted: its tasks cancelled, its ledger being cleaned up.
    Deleting,
    Succeeded,
    Failed,
}

impl Stage {
    /// Every stage, in the order a job goes through them.
    pub const ALL: [Stage; 9] = [
        Self::Queued,
        Self::Planning,
        Self::Encoding,
        Self::Stitching,
        Self::Suspended,
        Self::PoolMissing,
        Self::Deleting,
        Self::Succeeded,
        Self::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "Queued",
            Self::Planning => "Planning",
            Self::Encoding => "Encoding",
            Self::Stitching => "Stitching",
            Self::Suspended => "Suspended",
            Self::PoolMissing => "PoolMissing",
            Self::Deleting => "Deleting",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }
}

/// What happens to a job.
#[derive(Debug, Clone)]
pub enum Event {
    /// Admitted, with its pool: plan (from the ledger).
    Start,
    /// Its plan task was handed to a worker.
    PlanLeased,
    Planned(PlanResult),
    Encoded {
        kind: WorkKind,
        chunk: Option<u32>,
        result: ChunkResult,
        seconds: f64,
    },
    Stitched {
        result: StitchResult,
        seconds: f64,
    },
    /// The stitch found these results gone from the store: encode them again.
    Missing(MissingResults),
    /// It cannot go on, for good: an invalid spec, a pool it may not use, a task that failed for good.
    Failed {
        reason: String,
        message: String,
    },
    Suspend,
    Resume,
    /// The pool it names does not exist in its own namespace.
    PoolMissing {
        message: String,
    },
    Delete,
}

#[derive(Debug, Clone)]
pub struct JobRun {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub spec: TranscodeJobSpec,
    /// `ns/name` of the WorkerPool.
    pub pool: String,
    pub ledger: String,
    pub stage: Stage,
    pub plan: Option<tessera_crds::work::PlanRecord>,
    /// The pool's result store for this job (its namespace filled in), where results are filed by content.
    pub results: Option<tessera_crds::work::ResultStore>,
    pub done: BTreeSet<u32>,
    pub audio_done: bool,
    /// Chunks found already encoded in the ledger (not encoded again).
    pub reused: u32,
    pub encoded_frames: u64,
    pub worker_seconds: f64,
    pub result: Option<StitchResult>,
    pub failure: Option<(String, String)>,
    /// Why it waits for its pool (`PoolMissing`).
    pub waiting: Option<String>,
    pub start_time: Option<Time>,
    pub completion_time: Option<Time>,
}

impl JobRun {
    pub fn new(
        namespace: &str,
        name: &str,
        uid: &str,
        generation: i64,
        spec: TranscodeJobSpec,
        pool: String,
    ) -> Self {
        let ledger = tessera_crds::work::ledger_prefix(&spec.output.uri, uid);
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            generation,
            stage: if spec.suspend {
                Stage::Suspended
            } else {
                Stage::Queued
            },
            spec,
            pool,
            ledger,
            plan: None,
            done: BTreeSet::new(),
            audio_done: false,
            reused: 0,
            results: None,
            encoded_frames: 0,
            worker_seconds: 0.0,
            result: None,
            failure: None,
            waiting: None,
            start_time: None,
            completion_time: None,
        }
    }

    pub fn finished(&self) -> bool {
        matches!(self.stage, Stage::Succeeded | Stage::Failed)
    }

    /// The spec as the job's tasks run it: after the plan, with its ladder's rungs as renditions.
    fn applied_spec(&self) -> std::borrow::Cow<'_, TranscodeJobSpec> {
        match &self.plan {
            Some(p) => p.applied(&self.spec),
            None => std::borrow::Cow::Borrowed(&self.spec),
        }
    }

    fn work(&self, kind: WorkKind, chunk: Option<u32>) -> Work {
        Work {
            kind,
            namespace: self.namespace.clone(),
            job: self.name.clone(),
            uid: self.uid.clone(),
            spec: self.applied_spec().into_owned(),
            ledger: self.ledger.clone(),
            plan: self.plan.as_ref().map(|p| p.for_task(kind, chunk)),
            chunk,
            results: self.results.as_ref().map(|r| r.uri.clone()),
            retention_seconds: self.results.as_ref().map(|r| r.retention_seconds),
            collect: None,
        }
    }

    /// A collection of this job's result store (the addresses to keep are filled in when it is leased).
    pub fn collection(&self) -> Option<Work> {
        self.results.as_ref()?;
        Some(Work {
            collect: Some(tessera_crds::work::Collect::default()),
            ..self.work(WorkKind::Collect, None)
        })
    }

    /// Every content address this job needs from its result store, while it runs.
    pub fn needed_results(&self) -> Vec<String> {
        match (&self.plan, self.finished()) {
            (Some(p), false) => tessera_crds::work::needed_addresses(&p.applied(&self.spec), p),
            _ => Vec::new(),
        }
    }

    /// The one way a job changes: an event in, the tasks to queue out. Events that do not apply to the
    /// stage (a late result of a cancelled task, a second suspend) change nothing.
    pub fn on(&mut self, ev: Event, now: Time) -> Vec<Work> {
        use Stage::*;
        match (self.stage, ev) {
            (Deleting, _) => Vec::new(),
            (_, Event::Delete) => {
                self.stage = Deleting;
                Vec::new()
            }
            (Succeeded | Failed, _) => Vec::new(),
            (_, Event::Failed { reason, message }) => {
                self.failure = Some((reason, message));
                self.stage = Failed;
                self.completion_time = Some(now);
                Vec::new()
            }
            (Queued | PoolMissing, Event::Start) | (Suspended, Event::Resume) => {
                self.waiting = None;
                self.start(now)
            }
            (Queued | PoolMissing, Event::PoolMissing { message }) => {
                self.stage = PoolMissing;
                self.waiting = Some(message);
                Vec::new()
            }
            (Queued, Event::PlanLeased) => {
                self.stage = Planning;
                Vec::new()
            }
            (Queued | Planning, Event::Planned(r)) => self.on_plan(r, now),
            (
                Encoding,
                Event::Encoded {
                    kind,
                    chunk,
                    result,
                    seconds,
                },
            ) => self.on_encoded(kind, chunk, &result, seconds),
            (Stitching, Event::Stitched { result, seconds }) => {
                self.on_stitched(result, seconds, now);
                Vec::new()
            }
            (Stitching, Event::Missing(m)) => self.on_missing(m),
            (Queued | Planning | Encoding | Stitching | PoolMissing, Event::Suspend) => {
                self.stage = Suspended;
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// The tasks to queue when the job (re)starts: the plan.
    fn start(&mut self, now: Time) -> Vec<Work> {
        self.stage = Stage::Queued;
        if self.start_time.is_none() {
            self.start_time = Some(now);
        }
        vec![self.work(WorkKind::Plan, None)]
    }

    /// The cleanup task of a deleted job: its ledger goes.
    pub fn cleanup(&self) -> Work {
        self.work(WorkKind::Cleanup, None)
    }

    fn remaining(&self) -> Vec<Work> {
        let Some(p) = &self.plan else {
            return Vec::new();
        };
        let mut out: Vec<Work> = (0..p.chunk_count())
            .filter(|c| !self.done.contains(c))
            .map(|c| self.work(WorkKind::Chunk, Some(c)))
            .collect();
        if p.audio && !self.audio_done {
            out.push(self.work(WorkKind::Audio, None));
        }
        out
    }

    fn all_encoded(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| {
            self.done.len() as u32 >= p.chunk_count() && (!p.audio || self.audio_done)
        })
    }

    /// The plan task answered: queue what the ledger does not have yet (or the stitch, or nothing when the
    /// job was published already).
    fn on_plan(&mut self, mut r: PlanResult, now: Time) -> Vec<Work> {
        if let Some(fin) = r.finished.take() {
            self.done = (0..r.plan.chunk_count()).collect();
            self.reused = r.plan.chunk_count();
            self.audio_done = true;
            self.plan = Some(r.plan);
            self.on_stitched(fin, 0.0, now);
            return Vec::new();
        }
        self.reused = r.done.len() as u32;
        self.done = r
            .done
            .into_iter()
            .filter(|c| *c < r.plan.chunk_count())
            .collect();
        self.audio_done = r.audio_done;
        self.plan = Some(r.plan);
        self.stage = Stage::Encoding;
        if self.all_encoded() {
            self.stage = Stage::Stitching;
            return vec![self.work(WorkKind::Stitch, None)];
        }
        self.remaining()
    }

    /// A chunk or the audio is recorded; the last one queues the stitch.
    fn on_encoded(
        &mut self,
        kind: WorkKind,
        chunk: Option<u32>,
        r: &ChunkResult,
        seconds: f64,
    ) -> Vec<Work> {
        if self.stage != Stage::Encoding {
            return Vec::new();
        }
        match (kind, chunk) {
            (WorkKind::Chunk, Some(c)) if self.done.insert(c) => {
                if r.reused {
                    self.reused += 1;
                } else {
                    self.encoded_frames += r.frames;
                }
            }
            (WorkKind::Audio, _) => self.audio_done = true,
            _ => {}
        }
        self.worker_seconds += seconds;
        if self.all_encoded() {
            self.stage = Stage::Stitching;
            return vec![self.work(WorkKind::Stitch, None)];
        }
        Vec::new()
    }

    /// Results the stitch needed were gone: back to encoding, for those only.
    fn on_missing(&mut self, m: MissingResults) -> Vec<Work> {
        for c in &m.chunks {
            self.done.remove(c);
        }
        if m.audio {
            self.audio_done = false;
        }
        self.stage = Stage::Encoding;
        let again = self.remaining();
        if again.is_empty() {
            // Nothing named that this job has: stitching again is all that is left.
            self.stage = Stage::Stitching;
            return vec![self.work(WorkKind::Stitch, None)];
        }
        again
    }

    fn on_stitched(&mut self, r: StitchResult, seconds: f64, now: Time) {
        self.worker_seconds += seconds;
        self.result = Some(r);
        self.stage = Stage::Succeeded;
        self.completion_time = Some(now);
    }

    pub fn phase(&self) -> Phase {
        match self.stage {
            Stage::Succeeded => Phase::Succeeded,
            Stage::Failed => Phase::Failed,
            Stage::PoolMissing => Phase::Pending,
            _ if self.start_time.is_none() => Phase::Pending,
            _ => Phase::Running,
        }
    }

    /// The status to write. `elapsed` is the time since the job started running (for fps and ETA);
    /// `in_flight_frames` counts frames of chunks still encoding (from heartbeats).
    pub fn status(
        &self,
        elapsed: Duration,
        in_flight_frames: u64,
        now: &Time,
    ) -> TranscodeJobStatus {
        let total = self.plan.as_ref().map_or(0, |p| p.chunk_count());
        let done = self.done.len() as u32;
        let mut progress = Progress::new(done, total);
        progress.reused = self.reused;
        let frames = self.encoded_frames + in_flight_frames;
        if elapsed.as_secs_f64() > 0.0 && frames > 0 {
            progress.fps = Some((frames as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0);
        }
        let fresh = done.saturating_sub(self.reused);
        let left = total.saturating_sub(done);
        progress.eta_seconds = match self.stage {
            Stage::Encoding => {
                crate::status::eta_seconds(u64::from(fresh), u64::from(fresh + left), elapsed)
            }
            Stage::Stitching | Stage::Succeeded => Some(0),
            _ => None,
        };
        let cond = |type_: &str, status: bool, reason: &str, message: String| Condition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            observed_generation: Some(self.generation),
            last_transition_time: now.clone(),
        };
        let mut conditions = Vec::new();
        match self.stage {
            Stage::Succeeded => {
                conditions.push(cond(
                    "Complete",
                    true,
                    "Completed",
                    format!(
                        "{} renditions published",
                        self.applied_spec().renditions.len()
                    ),
                ));
                conditions.push(cond("Progressing", false, "Completed", String::new()));
            }
            Stage::Failed => {
                let (reason, message) = self.failure.clone().unwrap_or_default();
                conditions.push(cond("Failed", true, &reason, message));
                conditions.push(cond("Progressing", false, &reason, String::new()));
            }
            Stage::Suspended => conditions.push(cond(
                "Progressing",
                false,
                "Suspended",
                "spec.suspend is true: no work is handed out".into(),
            )),
            Stage::PoolMissing => conditions.push(cond(
                "Progressing",
                false,
                "PoolNotFound",
                self.waiting.clone().unwrap_or_default(),
            )),
            s => {
                let (reason, msg) = match s {
                    Stage::Queued => (
                        "Queued",
                        format!("waiting for a worker of pool {}", self.pool),
                    ),
                    Stage::Planning => (
                        "Planning",
                        "probing the input and planning chunks".to_string(),
                    ),
                    Stage::Encoding => ("Encoding", format!("{done}/{total} chunks encoded")),
                    Stage::Deleting => (
                        "Deleting",
                        "deleted: its temporary objects are being removed".to_string(),
                    ),
                    _ => (
                        "Stitching",
                        "joining chunks and publishing outputs".to_string(),
                    ),
                };
                conditions.push(cond("Progressing", true, reason, msg));
            }
        }
        // What kstatus (Flux, `kubectl wait`) and Argo CD read, with the reason and message of the condition
        // above that says most (Complete, Failed, or Progressing): Ready once complete; Stalled where only a
        // person moves it on (a failure, a missing pool); Reconciling while work goes on.
        let (reason, message) = (conditions[0].reason.clone(), conditions[0].message.clone());
        let working = conditions
            .iter()
            .any(|c| c.type_ == "Progressing" && c.status == "True");
        let stalled = matches!(self.stage, Stage::Failed | Stage::PoolMissing);
        conditions.push(cond(
            "Ready",
            self.stage == Stage::Succeeded,
            &reason,
            message.clone(),
        ));
        if stalled {
            conditions.push(cond("Stalled", true, &reason, message));
        } else if working {
            conditions.push(cond("Reconciling", true, &reason, message));
        }
        let renditions: Vec<RenditionStatus> = self
            .result
            .as_ref()
            .map(|r| r.renditions.clone())
            .unwrap_or_default();
        let encoder = self.plan.as_ref().map(|p| {
            let mut e = p.encoders.clone();
            e.dedup();
            e.join(",")
        });
        TranscodeJobStatus {
            phase: Some(self.phase()),
            conditions,
            observed_generation: Some(self.generation),
            progress: (total > 0).then_some(progress),
            renditions,
            master_playlist: self.result.as_ref().and_then(|r| r.master_playlist.clone()),
            manifest: self.result.as_ref().and_then(|r| r.manifest.clone()),
            thumbnails: self.result.as_ref().and_then(|r| r.thumbnails.clone()),
            ladder: self
                .plan
                .as_ref()
                .and_then(|p| p.ladder.as_deref().cloned()),
            encoder,
            gpu_seconds: (self.worker_seconds > 0.0)
                .then(|| (self.worker_seconds * 10.0).round() / 10.0),
            start_time: self.start_time.clone(),
            completion_time: self.completion_time.clone(),
        }
    }
}

/// Carry a condition's last transition time over when its status did not change (as Kubernetes expects).
pub fn keep_transition_times(new: &mut [Condition], old: &[Condition]) {
    for c in new {
        if let Some(o) = old
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_crds::work::PlanRecord;

    fn spec() -> TranscodeJobSpec {
        tessera_crds::parse_job_yaml(
            "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {name: j}\nspec:\n  input: {uri: \
             s3://b/in.mp4}\n  output: {uri: s3://b/out/}\n  renditions: [{name: a, video: {codec: h264}}]\n",
        )
        .unwrap()
        .spec
    }

    fn plan(chunks: u32, audio: bool) -> PlanRecord {
        PlanRecord {
            input_etag: Some("\"e\"".into()),
            target_seconds: 2.0,
            chunks: tessera_crds::work::ChunkPlan::uniform(chunks, 2.0, 25.0),
            vfr: false,
            frames: 100,
            duration_seconds: 4.0,
            fps: 25.0,
            encoders: vec!["libx264".into()],
            encoder_reasons: vec![],
            audio,
            hdr: None,
            captions: false,
            ladder: None,
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())
    }

    #[test]
    fn plan_then_chunks_then_stitch() {
        let mut j = JobRun::new("ns", "j", "u1", 1, spec(), "ns/p".into());
        assert_eq!(j.ledger, "s3://b/out/.tessera/u1/");
        let w = j.on(Event::Start, now());
        assert_eq!((w.len(), w[0].kind), (1, WorkKind::Plan));
        let w = j.on(
            Event::Planned(PlanResult {
                plan: plan(3, true),
                done: vec![],
                audio_done: false,
                finished: None,
            }),
            now(),
        );
        let kinds: Vec<_> = w.iter().map(|w| (w.kind, w.chunk)).collect();
        assert_eq!(
            kinds,
            [
                (WorkKind::Chunk, Some(0)),
                (WorkKind::Chunk, Some(1)),
                (WorkKind::Chunk, Some(2)),
                (WorkKind::Audio, None)
            ]
        );
        assert!(
            w.iter().all(|w| w.plan.is_some()),
            "later tasks carry the plan"
        );
        let r = ChunkResult {
            frames: 30,
            reused: false,
            seconds: 1.0,
            renditions: vec![],
        };
        let enc = |kind, chunk| Event::Encoded {
            kind,
            chunk,
            result: r.clone(),
            seconds: 1.0,
        };
        assert!(j.on(enc(WorkKind::Chunk, Some(0)), now()).is_empty());
        assert!(
            j.on(enc(WorkKind::Chunk, Some(0)), now()).is_empty(),
            "a duplicate report changes nothing"
        );
        assert!(j.on(enc(WorkKind::Audio, None), now()).is_empty());
        assert!(j.on(enc(WorkKind::Chunk, Some(2)), now()).is_empty());
        let st = j.status(Duration::from_secs(3), 0, &now());
        assert_eq!(st.progress.as_ref().unwrap().display, "2/3 (66%)");
        assert_eq!(st.encoded_or_default(), 60);
        let w = j.on(enc(WorkKind::Chunk, Some(1)), now());
        assert_eq!((w.len(), w[0].kind), (1, WorkKind::Stitch));
        // The stitch finds chunk 2's result and the audio collected from the store: those two again.
        let w = j.on(
            Event::Missing(MissingResults {
                chunks: vec![2],
                audio: true,
            }),
            now(),
        );
        let kinds: Vec<_> = w.iter().map(|w| (w.kind, w.chunk)).collect();
        assert_eq!(kinds, [(WorkKind::Chunk, Some(2)), (WorkKind::Audio, None)]);
        assert_eq!(j.stage, Stage::Encoding);
        assert!(j.on(enc(WorkKind::Chunk, Some(2)), now()).is_empty());
        let w = j.on(enc(WorkKind::Audio, None), now());
        assert_eq!((w.len(), w[0].kind), (1, WorkKind::Stitch));
        j.on(
            Event::Stitched {
                result: StitchResult::default(),
                seconds: 2.0,
            },
            now(),
        );
        let st = j.status(Duration::from_secs(5), 0, &now());
        assert_eq!(st.phase, Some(Phase::Succeeded));
        assert!(st
            .conditions
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True"));
        assert_eq!(st.gpu_seconds, Some(9.0));
    }

    #[test]
    fn a_replan_queues_only_what_the_ledger_lacks() {
        let mut j = JobRun::new("ns", "j", "u1", 1, spec(), "ns/p".into());
        j.on(Event::Start, now());
        let w = j.on(
            Event::Planned(PlanResult {
                plan: plan(4, true),
                done: vec![0, 2],
                audio_done: true,
                finished: None,
            }),
            now(),
        );
        let chunks: Vec<_> = w.iter().map(|w| w.chunk).collect();
        assert_eq!(chunks, [Some(1), Some(3)]);
        assert_eq!(j.reused, 2);
        // Everything recorded: straight to the stitch.
        let mut k = JobRun::new("ns", "k", "u2", 1, spec(), "ns/p".into());
        let w = k.on(
            Event::Planned(PlanResult {
                plan: plan(2, false),
                done: vec![0, 1],
                audio_done: false,
                finished: None,
            }),
            now(),
        );
        assert_eq!(w[0].kind, WorkKind::Stitch);
    }

    #[test]
    fn failure_is_terminal_and_named() {
        let mut j = JobRun::new("ns", "j", "u1", 3, spec(), "ns/p".into());
        j.on(Event::Start, now());
        let failed = |reason: &str, message: &str| Event::Failed {
            reason: reason.into(),
            message: message.into(),
        };
        j.on(failed("InputNotFound", "s3://b/in.mp4: not found"), now());
        j.on(failed("Other", "later"), now());
        let st = j.status(Duration::ZERO, 0, &now());
        let f = st.conditions.iter().find(|c| c.type_ == "Failed").unwrap();
        assert_eq!(
            (f.reason.as_str(), f.observed_generation),
            ("InputNotFound", Some(3))
        );
        assert_eq!(st.phase, Some(Phase::Failed));
    }

    /// What kstatus (Flux, `kubectl wait`) and Argo CD read: `Ready` always, `Reconciling` while work goes on,
    /// `Stalled` where only a person can move it on; one condition per type.
    #[test]
    fn ready_reconciling_and_stalled_follow_the_stage() {
        use Stage::*;
        let cases = [
            (Queued, "False", Some("Queued"), None),
            (Planning, "False", Some("Planning"), None),
            (Encoding, "False", Some("Encoding"), None),
            (Stitching, "False", Some("Stitching"), None),
            (Succeeded, "True", None, None),
            (Failed, "False", None, Some("InputNotFound")),
            (Suspended, "False", None, None),
            (PoolMissing, "False", None, Some("PoolNotFound")),
        ];
        for (stage, ready, reconciling, stalled) in cases {
            let mut j = JobRun::new("ns", "j", "u1", 1, spec(), "ns/p".into());
            j.stage = stage;
            j.failure = Some(("InputNotFound".into(), "s3://b/in.mp4: not found".into()));
            let st = j.status(Duration::ZERO, 0, &now());
            let get = |t: &str| st.conditions.iter().find(|c| c.type_ == t);
            assert_eq!(
                get("Ready").map(|c| c.status.as_str()),
                Some(ready),
                "{stage:?}"
            );
            assert_eq!(
                get("Reconciling").map(|c| c.reason.as_str()),
                reconciling,
                "{stage:?}"
            );
            assert_eq!(
                get("Stalled").map(|c| c.reason.as_str()),
                stalled,
                "{stage:?}"
            );
            let mut types: Vec<_> = st.conditions.iter().map(|c| &c.type_).collect();
            types.sort();
            types.dedup();
            assert_eq!(types.len(), st.conditions.len(), "{stage:?}: one per type");
        }
    }

    /// Every stage × every event: the stage it leads to and how many tasks it queues. Anything not listed
    /// leaves the stage as it was and queues nothing.
    #[test]
    fn lifecycle_table() {
        use Stage::*;
        let events: Vec<(&str, Event)> = vec![
            ("Start", Event::Start),
            ("PlanLeased", Event::PlanLeased),
            (
                "Planned",
                Event::Planned(PlanResult {
                    plan: plan(2, false),
                    done: vec![],
                    audio_done: false,
                    finished: None,
                }),
            ),
            (
                "Encoded",
                Event::Encoded {
                    kind: WorkKind::Chunk,
                    chunk: Some(0),
                    result: ChunkResult::default(),
                    seconds: 1.0,
                },
            ),
            (
                "Stitched",
                Event::Stitched {
                    result: StitchResult::default(),
                    seconds: 1.0,
                },
            ),
            (
                "Failed",
                Event::Failed {
                    reason: "InvalidSpec".into(),
                    message: "m".into(),
                },
            ),
            ("Suspend", Event::Suspend),
            ("Resume", Event::Resume),
            (
                "PoolMissing",
                Event::PoolMissing {
                    message: "no pool".into(),
                },
            ),
            ("Delete", Event::Delete),
        ];
        // (from, event) → (to, tasks queued)
        let moves: &[(Stage, &str, Stage, usize)] = &[
            (Queued, "Start", Queued, 1),
            (Queued, "PlanLeased", Planning, 0),
            (Queued, "Planned", Encoding, 2),
            (Queued, "Suspend", Suspended, 0),
            (Queued, "PoolMissing", PoolMissing, 0),
            (Planning, "Planned", Encoding, 2),
            (Planning, "Suspend", Suspended, 0),
            (Encoding, "Encoded", Encoding, 0),
            (Encoding, "Suspend", Suspended, 0),
            (Stitching, "Stitched", Succeeded, 0),
            (Stitching, "Suspend", Suspended, 0),
            (Suspended, "Resume", Queued, 1),
            (PoolMissing, "Start", Queued, 1),
            (PoolMissing, "PoolMissing", PoolMissing, 0),
            (PoolMissing, "Suspend", Suspended, 0),
        ];
        let all = [Queued, Planning, Encoding, Stitching, Suspended]
            .into_iter()
            .chain([PoolMissing, Deleting, Succeeded, Failed]);
        for from in all {
            for (name, ev) in &events {
                let mut j = JobRun::new("ns", "j", "u", 1, spec(), "ns/p".into());
                j.stage = from;
                if matches!(from, Encoding | Stitching) {
                    j.plan = Some(plan(2, false));
                    j.done = [1].into_iter().collect();
                }
                let w = j.on(ev.clone(), now());
                let (to, n) = match (from, *name) {
                    (Deleting, _) => (Deleting, 0),
                    (_, "Delete") => (Deleting, 0),
                    (Succeeded | Failed, _) => (from, 0),
                    (_, "Failed") => (Failed, 0),
                    _ => moves
                        .iter()
                        .find(|m| m.0 == from && m.1 == *name)
                        .map_or((from, 0), |m| (m.2, m.3)),
                };
                // The last chunk of an encoding job queues the stitch.
                let (to, n) = match (from, *name) {
                    (Encoding, "Encoded") => (Stitching, 1),
                    _ => (to, n),
                };
                assert_eq!((j.stage, w.len()), (to, n), "{from:?} --{name}-->");
                let st = j.status(Duration::ZERO, 0, &now());
                let pending = matches!(to, PoolMissing) || j.start_time.is_none();
                assert_eq!(
                    st.phase == Some(Phase::Pending),
                    pending && !j.finished(),
                    "{from:?} --{name}--> {to:?}: phase {:?}",
                    st.phase
                );
                if to == Failed && *name == "Failed" && from != Failed {
                    assert!(st
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Failed" && c.reason == "InvalidSpec"));
                }
                if to == PoolMissing && *name == "PoolMissing" {
                    assert!(st
                        .conditions
                        .iter()
                        .any(|c| c.reason == "PoolNotFound" && c.message == "no pool"));
                }
            }
        }
    }

    trait Encoded {
        fn encoded_or_default(&self) -> u64;
    }
    impl Encoded for TranscodeJobStatus {
        fn encoded_or_default(&self) -> u64 {
            // fps × elapsed = frames encoded (3 s, 20 fps → 60 frames)
            self.progress
                .as_ref()
                .and_then(|p| p.fps)
                .map_or(0, |f| (f * 3.0).round() as u64)
        }
    }
}
