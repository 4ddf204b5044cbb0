//! One queue task, run on this worker: plan, encode a chunk or the audio, stitch, or clean up. Each writes
//! what it made to S3 (the job's ledger, or the pool's result store for encoded pieces) and its completion
//! record to the ledger before it reports, so a report lost in a failover loses nothing: the next plan finds
//! the completion records. With a result store, pieces are filed by content address and a chunk task encodes
//! only the renditions the store does not have.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use tessera_crds::protocol::{CleanupResult, TaskResult};
use tessera_crds::work::{
    ChunkEncode, ChunkResult, CollectResult, MissingResults, PlanRecord, PlanResult, StitchResult,
    StoredResult, TaskFailure, Work, WorkKind,
};

use tessera_engine::error::{Error, Result, StorageKind};
use tessera_engine::job::{self, Prepared, Progress};
use tessera_engine::plan;
use tessera_engine::s3::{self, cp::CopyProgress, S3Uri, S3};

fn field(f: &str, m: impl Into<String>) -> Error {
    Error::Field {
        field: f.into(),
        message: m.into(),
    }
}

/// The failure to report for an error: its reason, its message (URIs and fields, never credentials), and
/// whether another attempt could succeed.
pub fn failure(e: &Error) -> TaskFailure {
    // Another attempt (on another worker, perhaps another GPU) can succeed after a storage outage, a clock
    // skewed past what S3 accepts, a full scratch disk, or an encoder that failed mid-stream (a hardware encoder losing its session).
    let retryable = matches!(
        e,
        Error::Storage {
            kind: StorageKind::Unavailable
                | StorageKind::ClockSkew
                // Past the worker's grace period: the endpoint may be back by the next attempt.
                | StorageKind::Refused
                | StorageKind::EndpointUnresolvable,
            ..
        } | Error::Queue(_)
            | Error::Write { .. }
            | Error::Encoder { .. }
            | Error::Chunk { .. }
    );
    TaskFailure {
        reason: e.reason().to_string(),
        message: e.to_string(),
        retryable,
    }
}

/// Run `work`; `frames` counts encoded frames for heartbeats. Returns the task's result for the queue.
/// `slots` is how many tasks this worker runs at once (it sizes thread counts).
pub fn execute(
    work: &Work,
    slots: usize,
    cancel: &AtomicBool,
    frames: &AtomicU64,
) -> Result<TaskResult> {
    let s3 = s3::global();
    let ledger = S3Uri::parse(&work.ledger)
        .ok_or_else(|| field("ledger", format!("{:?} is not an s3:// URI", work.ledger)))?;
    let started = Instant::now();
    // After the plan, a ladder's rungs are renditions like any other (the operator sends them so; an
    // older operator's spec is applied here).
    let applied;
    let work = match &work.plan {
        Some(p) if work.spec.ladder.is_some() && work.kind != WorkKind::Plan => {
            applied = Work {
                spec: p.applied(&work.spec).into_owned(),
                ..work.clone()
            };
            &applied
        }
        _ => work,
    };
    let out = match work.kind {
        WorkKind::Plan => plan(work, &s3, &ledger).map(TaskResult::Plan),
        WorkKind::Chunk => {
            chunk(work, &s3, &ledger, slots, cancel, frames, started).map(TaskResult::Chunk)
        }
        WorkKind::Audio => audio(work, &s3, &ledger, slots, cancel, started).map(TaskResult::Audio),
        WorkKind::Stitch => stitch(work, &s3, &ledger, slots, cancel, started),
        WorkKind::Collect => collect(work, &s3, cancel).map(TaskResult::Collect),
        WorkKind::Cleanup => s3::block_on(s3.delete_prefix(&ledger)).map(|n| {
            tracing::info!(ledger = %ledger, objects = n, "ledger deleted");
            TaskResult::Cleanup(CleanupResult { deleted: n as u64 })
        }),
    };
    s3.unpin_prefix(&ledger);
    if let Some(store) = work.results.as_deref().and_then(S3Uri::parse) {
        s3.unpin_prefix(&store);
    }
    out
}

fn input_uri(work: &Work) -> Option<S3Uri> {
    S3Uri::parse(&work.spec.input.uri)
}

/// The input's ETag now, checked against the plan's.
fn check_input(work: &Work, s3: &S3, expected: Option<&str>) -> Result<Option<String>> {
    let Some(uri) = input_uri(work) else {
        return Ok(None);
    };
    let meta = s3::block_on(s3.pin(&uri))?;
    if let Some(e) = expected.filter(|e| *e != meta.etag) {
        return Err(Error::Storage {
            uri: uri.to_string(),
            what: "object changed while it was being read".into(),
            kind: StorageKind::Changed,
            detail: format!(
                "ETag was {e} when the job was planned, is now {}; re-run the job",
                meta.etag
            ),
        });
    }
    Ok(Some(meta.etag))
}

/// This task's view of its job: the plan's chunks and encoders, and the input's container header (checked
/// to be the object the plan was made from). No worker plans again.
fn prepared(work: &Work, s3: &S3, slots: usize) -> Result<Prepared> {
    let rec = work
        .plan
        .as_ref()
        .ok_or_else(|| field("plan", "the task carries no plan"))?;
    check_input(work, s3, rec.input_etag.as_deref())?;
    job::prepare_planned(&work.spec, rec, slots)
}

/// A manifest as found in a ledger: this version's plan, or an older worker's, which recorded only the chunk
/// count. An older one is planned again with its chunk length, so its completion records still match.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Manifest {
    Plan(PlanRecord),
    CountOnly {
        #[serde(rename = "inputEtag", default)]
        input_etag: Option<String>,
        #[serde(rename = "targetSeconds")]
        target_seconds: f64,
        chunks: u32,
    },
}

/// Probe and cut the input (the one full probe of a job), choose encoders, and write the plan down.
fn make_plan(
    work: &Work,
    s3: &Arc<S3>,
    manifest: &S3Uri,
    target_seconds: Option<f64>,
    etag: Option<&str>,
) -> Result<PlanRecord> {
    let etag = check_input(work, s3, etag)?;
    let p = job::prepare(
        &work.spec,
        plan::CLUSTER_PARALLELISM,
        target_seconds,
        &Progress::default(),
    )?;
    let rec = PlanRecord {
        input_etag: etag,
        target_seconds: p.target_seconds,
        chunks: p.plan_chunks(),
        frames: p.info.video.frames,
        duration_seconds: p.info.duration,
        fps: p.fps(),
        vfr: p.info.video.vfr,
        encoders: p.encoders(),
        encoder_reasons: p.encoder_reasons(),
        audio: p.has_audio(),
        hdr: p.info.video.hdr.map(Box::new),
        captions: p.info.video.captions,
        ladder: p.ladder.clone().map(Box::new),
    };
    let body = serde_json::to_vec(&rec).map_err(|e| Error::Queue(e.to_string()))?;
    s3::block_on(s3.put_small(manifest, Bytes::from(body)))?;
    Ok(rec)
}

fn plan(work: &Work, s3: &Arc<S3>, ledger: &S3Uri) -> Result<PlanResult> {
    if let Some(u) = input_uri(work) {
        // A new job reads the input as it is now, not as an earlier job on this worker saw it.
        s3.unpin_prefix(&u);
    }
    let manifest = ledger.join("manifest.json");
    let found = match s3::block_on(s3.get_small(&manifest))? {
        Some(b) => Some(
            serde_json::from_slice::<Manifest>(&b)
                .map_err(|e| Error::media(manifest.to_string(), "unreadable job manifest", e))?,
        ),
        None => None,
    };
    let record = match found {
        Some(Manifest::Plan(rec)) => {
            check_input(work, s3, rec.input_etag.as_deref())?;
            tracing::info!(ledger = %ledger, chunks = rec.chunks.len(), "plan found in the ledger");
            rec
        }
        Some(Manifest::CountOnly {
            input_etag,
            target_seconds,
            chunks,
        }) => {
            let rec = make_plan(
                work,
                s3,
                &manifest,
                Some(target_seconds),
                input_etag.as_deref(),
            )?;
            if rec.chunk_count() != chunks {
                return Err(Error::Chunk {
                    chunk: rec.chunks.len(),
                    detail: format!(
                        "the ledger's plan (from an older worker) has {chunks} chunks; cut again, the input has {}",
                        rec.chunks.len()
                    ),
                });
            }
            tracing::info!(ledger = %ledger, chunks, "an older worker's plan, recorded again with its boundaries");
            rec
        }
        None => make_plan(work, s3, &manifest, None, None)?,
    };
    let finished = match s3::block_on(s3.get_small(&ledger.join("result.json")))? {
        Some(b) => Some(serde_json::from_slice::<StitchResult>(&b).map_err(|e| {
            Error::media(
                ledger.join("result.json").to_string(),
                "unreadable job result",
                e,
            )
        })?),
        None => None,
    };
    if finished.is_some() {
        tracing::info!(ledger = %ledger, "the job was published already; its result is in the ledger");
        return Ok(PlanResult {
            done: (0..record.chunk_count()).collect(),
            audio_done: true,
            plan: record,
            finished,
        });
    }
    let (done, audio_done) = done_records(s3, ledger)?;
    Ok(PlanResult {
        plan: record,
        done,
        audio_done,
        finished: None,
    })
}

/// Chunks (and audio) with a completion record.
fn done_records(s3: &S3, ledger: &S3Uri) -> Result<(Vec<u32>, bool)> {
    let prefix = ledger.join("done/");
    let mut done = Vec::new();
    let mut audio = false;
    for o in s3::block_on(s3.list(&prefix))? {
        let name = o.key.rsplit('/').next().unwrap_or_default();
        if name == "audio.json" {
            audio = true;
        } else if let Some(n) = name
            .strip_prefix('c')
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse().ok())
        {
            done.push(n);
        }
    }
    done.sort_unstable();
    Ok((done, audio))
}

fn scratch() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("tessera-task-")
        .tempdir()
        .map_err(|source| Error::Write {
            path: std::env::temp_dir(),
            source,
        })
}

fn record(s3: &Arc<S3>, uri: &S3Uri, r: &ChunkResult) -> Result<()> {
    let body = serde_json::to_vec(r).map_err(|e| Error::Queue(e.to_string()))?;
    s3::block_on(s3.put_small(uri, Bytes::from(body)))
}

fn existing(s3: &S3, uri: &S3Uri) -> Result<Option<ChunkResult>> {
    Ok(s3::block_on(s3.get_small(uri))?
        .and_then(|b| serde_json::from_slice::<ChunkResult>(&b).ok()))
}

/// Where a job's encoded pieces live: its ledger's `chunks/` folder, or, for a pool with a result store and
/// an input with an ETag, the store, filed by content address (so other jobs find them).
struct Pieces<'a> {
    work: &'a Work,
    ledger: &'a S3Uri,
    /// The store, where pieces are filed by content.
    store: Option<S3Uri>,
    /// Each address's use already judged and marked by this task (the audio files share one address).
    judged: std::cell::RefCell<std::collections::HashMap<String, bool>>,
}

impl<'a> Pieces<'a> {
    fn new(work: &'a Work, ledger: &'a S3Uri) -> Result<Self> {
        let store = match &work.results {
            Some(u) => Some(S3Uri::parse(u).ok_or_else(|| {
                field(
                    "results",
                    format!("the result store {u:?} is not an s3:// URI"),
                )
            })?),
            None => None,
        };
        let shared = work.plan.as_ref().is_some_and(|p| p.input_etag.is_some());
        Ok(Pieces {
            work,
            ledger,
            store: store.filter(|_| shared),
            judged: Default::default(),
        })
    }

    /// Filed by content: another job's identical work can be found.
    fn shared(&self) -> bool {
        self.store.is_some()
    }

    /// Whether `uri` is one of the store's results (not the ledger's).
    fn in_store(&self, uri: &S3Uri) -> bool {
        self.store
            .as_ref()
            .is_some_and(|s| uri.bucket == s.bucket && uri.key.starts_with(&s.key))
    }

    /// Whether a result found in the store may be taken: it exists, and it was made or used recently
    /// enough that no collection can delete it before this job's stitch reads it
    /// ([`tessera_crds::work::fresh_enough`], on the store's clock). Taking it marks it used
    /// (`used/<address>`), which keeps it for another retention period. A result near expiry is
    /// encoded again (and written over).
    fn reusable(&self, s3: &Arc<S3>, uri: &S3Uri) -> Result<bool> {
        let (Some(store), true) = (&self.store, self.in_store(uri)) else {
            return Ok(false);
        };
        let Some(piece) = s3::block_on(s3.head_opt(uri))? else {
            return Ok(false);
        };
        let rel = &uri.key[store.key.len()..];
        let Some(addr) = tessera_crds::work::address_of(rel) else {
            return Ok(false);
        };
        if let Some(&fresh) = self.judged.borrow().get(addr) {
            return Ok(fresh);
        }
        let marker = store.join(&format!("used/{addr}"));
        let before = s3::block_on(s3.head_opt(&marker))?.and_then(|m| m.last_modified);
        let now = s3::block_on(s3.stamp(&marker))?;
        let last = piece.last_modified.unwrap_or(0).max(before.unwrap_or(0));
        let fresh = self
            .work
            .retention_seconds
            .is_none_or(|r| tessera_crds::work::fresh_enough(last, now, r));
        if !fresh {
            tracing::info!(result = %uri, age_seconds = now - last, "a result in the store is close to its expiry; encoding it again");
        }
        self.judged.borrow_mut().insert(addr.to_string(), fresh);
        Ok(fresh)
    }

    /// Each rendition's encode of chunk `c`, in spec order.
    fn chunk(&self, c: usize) -> Vec<S3Uri> {
        let keys = self
            .store
            .as_ref()
            .zip(self.work.plan.as_ref())
            .and_then(|(s, p)| {
                tessera_crds::work::chunk_keys(&self.work.spec, p, c as u32).map(|k| (s, k))
            });
        match keys {
            Some((store, keys)) => keys
                .iter()
                .map(|k| store.join(&format!("chunks/{k}.tpk")))
                .collect(),
            None => (0..self.work.spec.renditions.len())
                .map(|r| {
                    self.ledger
                        .join("chunks/")
                        .join(&Prepared::chunk_file(r, c))
                })
                .collect(),
        }
    }

    /// The audio encodes named `names` (`Prepared::audio_files`).
    fn audio(&self, names: &[String]) -> Vec<S3Uri> {
        let key = self
            .store
            .as_ref()
            .zip(self.work.plan.as_ref())
            .and_then(|(s, p)| tessera_crds::work::audio_key(&self.work.spec, p).map(|k| (s, k)));
        names
            .iter()
            .map(|name| match &key {
                Some((store, key)) => store.join(&format!("audio/{key}-{name}")),
                None => self.ledger.join("chunks/").join(name),
            })
            .collect()
    }
}

fn upload_to(s3: &Arc<S3>, files: &[(std::path::PathBuf, S3Uri)]) -> Result<()> {
    s3::block_on(async {
        stream::iter(files.iter().map(|(src, dst)| async move {
            s3::cp::upload_file(s3, src, dst, &CopyProgress::default())
                .await
                .map(drop)
        }))
        .buffer_unordered(4)
        .try_collect::<Vec<()>>()
        .await
    })
    .map(drop)
}

fn chunk(
    work: &Work,
    s3: &Arc<S3>,
    ledger: &S3Uri,
    slots: usize,
    cancel: &AtomicBool,
    frames: &AtomicU64,
    started: Instant,
) -> Result<ChunkResult> {
    let n = work
        .chunk
        .ok_or_else(|| field("chunk", "a chunk task names no chunk"))? as usize;
    let rec_uri = ledger.join(&format!("done/c{n}.json"));
    if let Some(r) = existing(s3, &rec_uri)? {
        tracing::info!(
            chunk = n,
            "chunk already in the ledger; not encoding it again"
        );
        return Ok(ChunkResult { reused: true, ..r });
    }
    let plan = work
        .plan
        .as_ref()
        .ok_or_else(|| field("plan", "the task carries no plan"))?;
    let pieces = Pieces::new(work, ledger)?;
    let uris = pieces.chunk(n);
    let renditions = uris.len();
    let spec = &work.spec;
    // Renditions another job encoded already, with the same input, boundaries, settings and encoder (and,
    // where this job measures quality, that encode's record: its setting and VMAF).
    let mut found: Vec<Option<ChunkEncode>> = vec![None; renditions];
    if pieces.shared() {
        for (i, uri) in uris.iter().enumerate() {
            if !pieces.reusable(s3, uri)? {
                continue;
            }
            found[i] = if spec.measures_vmaf(&spec.renditions[i]) {
                side_record(s3, uri)?.filter(|rec| rec.vmaf.is_some())
            } else {
                Some(ChunkEncode::default())
            };
        }
    }
    let wanted: Vec<usize> = (0..renditions).filter(|r| found[*r].is_none()).collect();
    let mut count = plan.chunk(n as u32).map_or(0, |c| c.frames);
    let mut encoded: Vec<ChunkEncode> = Vec::new();
    if !wanted.is_empty() {
        let prep = prepared(work, s3, slots)?;
        let c = prep
            .chunks
            .iter()
            .find(|c| c.index == n)
            .ok_or_else(|| field("chunk", format!("chunk {n} is not in the plan")))?;
        // Quality targets: the settings an earlier try of this chunk chose are kept (a retry encodes
        // exactly what it would have); new ones are written down before the encode starts.
        let settings_uri = ledger.join(&format!("settings/c{n}.json"));
        // (Read only where a rendition has a target: other chunks cost no request for it.)
        let has_target = wanted
            .iter()
            .any(|&r| spec.renditions[r].video.target_quality.is_some());
        let known: Vec<Option<u8>> = if has_target {
            s3::block_on(s3.get_small(&settings_uri))?
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let settings = prep.search_chunk(&work.spec, c, &wanted, &known, cancel)?;
        let targeted = settings.iter().any(Option::is_some);
        if targeted && settings != known {
            let body = serde_json::to_vec(&settings).map_err(|e| Error::Queue(e.to_string()))?;
            s3::block_on(s3.put_small(&settings_uri, Bytes::from(body)))?;
        } else if targeted {
            tracing::info!(
                chunk = n,
                ?settings,
                "quality target: encoding with the settings recorded by an earlier try"
            );
        }
        injected_encoder_failure(n)?;
        let dir = scratch()?;
        let (frames_done, recs) = prep.encode_chunk(
            &work.spec,
            c,
            &wanted,
            &settings,
            dir.path(),
            cancel,
            &|| {
                frames.fetch_add(1, Ordering::Relaxed);
            },
        )?;
        count = frames_done;
        encoded = recs;
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let files: Vec<_> = wanted
            .iter()
            .map(|&r| (dir.path().join(Prepared::chunk_file(r, n)), uris[r].clone()))
            .collect();
        upload_to(s3, &files)?;
        // In a store, each piece's record goes beside it, for the jobs that take it.
        for (&r, rec) in wanted.iter().zip(&encoded) {
            // (A targeted rendition is always measured: its record has VMAF whenever it has a setting.)
            if pieces.in_store(&uris[r]) && rec.vmaf.is_some() {
                let body = serde_json::to_vec(rec).map_err(|e| Error::Queue(e.to_string()))?;
                s3::block_on(s3.put_small(&side_uri(&uris[r]), Bytes::from(body)))?;
            }
        }
    }
    let mut fresh = encoded.into_iter();
    let r = ChunkResult {
        frames: count,
        reused: wanted.is_empty(),
        seconds: started.elapsed().as_secs_f64(),
        renditions: plan
            .encoders
            .iter()
            .zip(found)
            .map(|(encoder, f)| match f {
                Some(rec) => ChunkEncode {
                    encoder: encoder.clone(),
                    frames: count,
                    reused: true,
                    ..rec
                },
                None => fresh.next().unwrap_or_else(|| ChunkEncode {
                    encoder: encoder.clone(),
                    frames: count,
                    ..Default::default()
                }),
            })
            .collect(),
    };
    record(s3, &rec_uri, &r)?;
    tracing::info!(chunk = n, frames = count, seconds = r.seconds, job = %format!("{}/{}", work.namespace, work.job),
        encoded = wanted.len(), reused = renditions - wanted.len(), "chunk encoded");
    Ok(r)
}

/// The record filed beside a piece in a result store: `chunks/<address>.json`.
fn side_uri(piece: &S3Uri) -> S3Uri {
    let key = piece.key.strip_suffix(".tpk").unwrap_or(&piece.key);
    S3Uri {
        bucket: piece.bucket.clone(),
        key: format!("{key}.json"),
    }
}

fn side_record(s3: &S3, piece: &S3Uri) -> Result<Option<ChunkEncode>> {
    Ok(s3::block_on(s3.get_small(&side_uri(piece)))?
        .and_then(|b| serde_json::from_slice::<ChunkEncode>(&b).ok()))
}

/// Fault injection for tests: `TESSERA_FAULT_ENCODER_FAILURES=N` makes this worker's next N chunk encodes
/// fail as a hardware encoder does when it loses its session mid-job. Unset in production.
fn injected_encoder_failure(chunk: usize) -> Result<()> {
    use std::sync::atomic::AtomicI64;
    static LEFT: AtomicI64 = AtomicI64::new(-1);
    if LEFT.load(Ordering::Relaxed) < 0 {
        let n = std::env::var("TESSERA_FAULT_ENCODER_FAILURES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let _ = LEFT.compare_exchange(-1, n, Ordering::Relaxed, Ordering::Relaxed);
    }
    if LEFT
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n > 0).then(|| n - 1)
        })
        .is_ok()
    {
        return Err(Error::Encoder {
            encoder: format!("chunk {chunk}"),
            detail: "the encoder failed mid-stream (injected by TESSERA_FAULT_ENCODER_FAILURES)"
                .into(),
        });
    }
    Ok(())
}

fn audio(
    work: &Work,
    s3: &Arc<S3>,
    ledger: &S3Uri,
    slots: usize,
    cancel: &AtomicBool,
    started: Instant,
) -> Result<ChunkResult> {
    let rec_uri = ledger.join("done/audio.json");
    if let Some(r) = existing(s3, &rec_uri)? {
        return Ok(ChunkResult { reused: true, ..r });
    }
    let prep = prepared(work, s3, slots)?;
    let pieces = Pieces::new(work, ledger)?;
    let names = prep.audio_files();
    let uris = pieces.audio(&names);
    let mut reused = pieces.shared() && !names.is_empty();
    for uri in &uris {
        if !reused {
            break;
        }
        reused = pieces.reusable(s3, uri)?;
    }
    let mut n = 0;
    if !reused {
        let dir = scratch()?;
        n = prep.encode_audio(dir.path(), cancel)?;
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let files: Vec<_> = names
            .iter()
            .zip(uris)
            .map(|(name, uri)| (dir.path().join(name), uri))
            .collect();
        upload_to(s3, &files)?;
    }
    let r = ChunkResult {
        frames: n,
        reused,
        seconds: started.elapsed().as_secs_f64(),
        renditions: vec![],
    };
    record(s3, &rec_uri, &r)?;
    tracing::info!(frames = n, seconds = r.seconds, reused, "audio encoded");
    Ok(r)
}

fn stitch(
    work: &Work,
    s3: &Arc<S3>,
    ledger: &S3Uri,
    slots: usize,
    cancel: &AtomicBool,
    started: Instant,
) -> Result<TaskResult> {
    let prep = prepared(work, s3, slots)?;
    let dir = scratch()?;
    let pieces = Pieces::new(work, ledger)?;
    // Each file and the chunk it belongs to (`None`: the audio).
    let mut files: Vec<(S3Uri, String, Option<u32>)> = Vec::new();
    for c in &prep.chunks {
        files.extend(
            pieces
                .chunk(c.index)
                .into_iter()
                .enumerate()
                .map(|(r, uri)| (uri, Prepared::chunk_file(r, c.index), Some(c.index as u32))),
        );
    }
    let names = prep.audio_files();
    files.extend(
        pieces
            .audio(&names)
            .into_iter()
            .zip(names)
            .map(|(u, n)| (u, n, None)),
    );
    let fetched: Vec<Result<()>> = s3::block_on(async {
        stream::iter(files.iter().map(|(src, n, _)| {
            let dst = dir.path().join(n);
            async move {
                s3::cp::download_file(s3, src, &dst, &CopyProgress::default())
                    .await
                    .map(drop)
            }
        }))
        .buffered(6)
        .collect()
        .await
    });
    // A result gone from the store (collected while the job waited, or deleted by hand) is encoded again;
    // any other failure is the stitch's.
    let mut missing = MissingResults::default();
    for ((uri, _, owner), r) in files.iter().zip(fetched) {
        match r {
            Err(Error::Storage {
                kind: StorageKind::NotFound,
                ..
            }) if pieces.in_store(uri) => match owner {
                Some(c) if !missing.chunks.contains(c) => missing.chunks.push(*c),
                Some(_) => {}
                None => missing.audio = true,
            },
            r => r?,
        }
    }
    if !missing.chunks.is_empty() || missing.audio {
        let mut records: Vec<S3Uri> = missing
            .chunks
            .iter()
            .map(|c| ledger.join(&format!("done/c{c}.json")))
            .collect();
        if missing.audio {
            records.push(ledger.join("done/audio.json"));
        }
        for r in &records {
            s3::block_on(s3.delete(r))?;
        }
        tracing::warn!(chunks = ?missing.chunks, audio = missing.audio, "results are gone from the store; they will be encoded again");
        return Ok(TaskResult::Missing(missing));
    }
    // The chunks' quality records (VMAF, chosen settings), when the job has any.
    let records: Vec<Vec<ChunkEncode>> = if work
        .spec
        .renditions
        .iter()
        .any(|r| work.spec.measures_vmaf(r))
    {
        let uris: Vec<S3Uri> = prep
            .chunks
            .iter()
            .map(|c| ledger.join(&format!("done/c{}.json", c.index)))
            .collect();
        let got: Vec<Result<Option<ChunkResult>>> = s3::block_on(async {
            stream::iter(uris.iter().map(|u| async move {
                let b = s3.get_small(u).await?;
                Ok(b.and_then(|b| serde_json::from_slice::<ChunkResult>(&b).ok()))
            }))
            .buffered(8)
            .collect()
            .await
        });
        got.into_iter()
            .map(|r| r.map(|o| o.map(|c| c.renditions).unwrap_or_default()))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let mut fin = prep.finish(
        &work.spec,
        dir.path(),
        &records,
        cancel,
        &Progress::default(),
    )?;
    if let Some(rec) = &work.plan {
        // The plan's reasons name the hardware encoders that failed; this worker only opened the chosen one.
        for (st, why) in fin.renditions.iter_mut().zip(&rec.encoder_reasons) {
            st.encoder_reason = why.clone();
        }
    }
    let result = StitchResult {
        renditions: fin.renditions,
        master_playlist: fin.master_playlist,
        manifest: fin.manifest,
        thumbnails: fin.thumbnails,
        seconds: started.elapsed().as_secs_f64(),
    };
    // The result goes into the ledger before the chunks go: a report lost in a failover is then found by
    // the next plan, and the job is not made again.
    let body = serde_json::to_vec(&result).map_err(|e| Error::Queue(e.to_string()))?;
    s3::block_on(s3.put_small(&ledger.join("result.json"), Bytes::from(body)))?;
    let mut n = 0;
    for sub in ["chunks/", "done/", "settings/"] {
        n += s3::block_on(s3.delete_prefix(&ledger.join(sub)))?;
    }
    tracing::info!(ledger = %ledger, objects = n, "outputs published; chunks deleted");
    Ok(TaskResult::Stitch(result))
}

/// Collect the result store: delete results not made or used for the retention time, except those running
/// jobs need (`work.collect.keep`). Times are the store's own (a marker's LastModified), never this
/// machine's; deleting stops when the grace period runs out, so a chunk task that took a result after this
/// began is never undercut ([`tessera_crds::work::fresh_enough`]).
fn collect(work: &Work, s3: &Arc<S3>, cancel: &AtomicBool) -> Result<CollectResult> {
    let store = work
        .results
        .as_deref()
        .and_then(S3Uri::parse)
        .ok_or_else(|| field("results", "a collection names no s3:// result store"))?;
    let retention = work
        .retention_seconds
        .ok_or_else(|| field("retentionSeconds", "a collection names no retention"))?;
    let keep: std::collections::HashSet<&str> = work
        .collect
        .iter()
        .flat_map(|c| c.keep.iter().map(String::as_str))
        .collect();
    let began = Instant::now();
    let now = s3::block_on(s3.stamp(&store.join("collected.json")))?;
    let grace = std::time::Duration::from_secs(tessera_crds::work::grace_seconds(retention));
    let rel = |u: &S3Uri| u.key[store.key.len()..].to_string();
    let mut used: std::collections::HashMap<String, (i64, S3Uri)> = Default::default();
    for m in s3::block_on(s3.list_objects(&store.join("used/")))? {
        let r = rel(&m.uri);
        let addr = r.trim_start_matches("used/").to_string();
        used.insert(addr, (m.last_modified, m.uri));
    }
    let mut objects = Vec::new();
    let mut uris = Vec::new();
    for sub in ["chunks/", "audio/"] {
        for o in s3::block_on(s3.list_objects(&store.join(sub)))? {
            let key = rel(&o.uri);
            let marked = tessera_crds::work::address_of(&key)
                .and_then(|a| used.get(a))
                .map_or(0, |(t, _)| *t);
            objects.push(StoredResult {
                key,
                last_used: o.last_modified.max(marked),
                size: o.size,
            });
            uris.push(o.uri);
        }
    }
    let (delete, kept_needed) = tessera_crds::work::collectable(&objects, now, retention, &keep);
    let mut out = CollectResult {
        listed: objects.len() as u64,
        kept_needed,
        ..Default::default()
    };
    let mut gone = std::collections::HashSet::new();
    for i in delete {
        if began.elapsed() >= grace || cancel.load(Ordering::Relaxed) {
            out.stopped_early = true;
            break;
        }
        s3::block_on(s3.delete(&uris[i]))?;
        out.deleted += 1;
        out.bytes_deleted += objects[i].size;
        gone.insert(i);
    }
    // A use marker goes with the last of its address's results.
    let live: std::collections::HashSet<&str> = objects
        .iter()
        .enumerate()
        .filter(|(i, _)| !gone.contains(i))
        .filter_map(|(_, o)| tessera_crds::work::address_of(&o.key))
        .collect();
    let cutoff = now - retention as i64;
    for (addr, (t, uri)) in &used {
        if !live.contains(addr.as_str()) && *t < cutoff && began.elapsed() < grace {
            s3::block_on(s3.delete(uri))?;
        }
    }
    tracing::info!(store = %store, listed = out.listed, deleted = out.deleted, bytes = out.bytes_deleted,
        kept_needed = out.kept_needed, stopped_early = out.stopped_early, "result store collected");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_is_this_versions_plan_or_an_older_count_only_one() {
        let rec = PlanRecord {
            input_etag: Some("\"e\"".into()),
            target_seconds: 10.0,
            chunks: tessera_crds::work::ChunkPlan::uniform(3, 10.0, 25.0),
            frames: 750,
            duration_seconds: 30.0,
            fps: 25.0,
            vfr: false,
            encoders: vec!["libx264".into()],
            encoder_reasons: vec![],
            audio: true,
            hdr: None,
            captions: false,
            ladder: None,
        };
        let json = serde_json::to_vec(&rec).unwrap();
        match serde_json::from_slice::<Manifest>(&json).unwrap() {
            Manifest::Plan(back) => assert_eq!(back, rec),
            Manifest::CountOnly { .. } => panic!("read as an older manifest"),
        }
        let old = br#"{"inputEtag":"\"e\"","targetSeconds":10.0,"chunks":3,"frames":750,"durationSeconds":30.0,
            "fps":25.0,"encoders":["libx264"],"encoderReasons":[],"audio":true}"#;
        match serde_json::from_slice::<Manifest>(old).unwrap() {
            Manifest::CountOnly {
                input_etag,
                target_seconds,
                chunks,
            } => {
                assert_eq!(input_etag.as_deref(), Some("\"e\""));
                assert_eq!((target_seconds, chunks), (10.0, 3));
            }
            Manifest::Plan(_) => panic!("an older manifest read as a plan"),
        }
        assert!(serde_json::from_slice::<Manifest>(br#"{"chunks":"x"}"#).is_err());
    }
}
