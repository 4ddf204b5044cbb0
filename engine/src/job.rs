//! Running a whole job on this machine: probe, plan, encode chunks and audio in parallel, stitch, measure,
//! and only then make the outputs visible.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ffmpeg_next::{self as ff, ffi, Rational};
use serde::Serialize;
use tessera_crds::work::{pool_vmaf, target_outcome, ChunkEncode, ChunkVmaf};
use tessera_crds::{Container, QualityMetric, RenditionStatus, TranscodeJob, TranscodeJobSpec};

use crate::audio::{encode_audio, AudioJob, TrackJob};
use crate::chunk::{self, encode_chunk, rescale, ChunkInput, ChunkOutput, Clock};
use crate::encode::{self, EncoderChoice, VideoTarget};
use crate::error::{Error, Result};
use crate::hwdec;
use crate::plan::{self, AudioPlan, Chunk};
use crate::probe::{self, open_input, ProbeInfo};
use crate::quality;
use crate::s3::{self, S3Uri};
use crate::stitch::{self, AudioIn, HlsMedia, MediaRendition, StitchInput, SubtitleIn, Variant};
use crate::streams::{self, StreamPlan};
use crate::vmaf;

/// Live counters a progress display reads from another thread.
#[derive(Debug, Default)]
pub struct Progress {
    pub frames_done: AtomicU64,
    pub frames_total: AtomicU64,
    pub chunks_done: AtomicU32,
    pub chunks_total: AtomicU32,
    pub stage: Mutex<String>,
}

impl Progress {
    pub fn stage(&self, s: &str) {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = s.to_string();
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub workers: usize,
    pub progress: Arc<Progress>,
    pub cancel: Arc<AtomicBool>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            progress: Arc::default(),
            cancel: Arc::default(),
        }
    }
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// What `tessera run --json` prints.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub job: String,
    pub input: String,
    pub output: String,
    pub container: Container,
    pub workers: usize,
    pub chunks: usize,
    pub target_seconds: f64,
    pub elapsed_seconds: f64,
    pub source: SourceSummary,
    /// How the video was decoded (`cuda`, `vaapi` or `software`) and why.
    pub decoder: hwdec::DecodeChoice,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_playlist: Option<String>,
    /// The DASH MPD (`container: cmaf`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The WebVTT thumbnail track (`spec.thumbnails`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbnails: Option<String>,
    pub renditions: Vec<RenditionStatus>,
    /// The ladder `spec.ladder` built: rungs, measured points and what was left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ladder: Option<tessera_crds::Ladder>,
    /// Per chunk, per rendition: the encoder, the setting a quality target chose and the chunk's mean VMAF
    /// (when the job measures VMAF or targets a quality).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chunk_records: Vec<Vec<ChunkNote>>,
}

/// One rendition of one chunk, as `tessera run --json` reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkNote {
    pub encoder: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crf: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmaf: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSummary {
    pub frames: u64,
    pub duration_seconds: f64,
    pub fps: f64,
    pub vfr: bool,
    pub width: u32,
    pub height: u32,
    pub rotation: f64,
    pub keyframes: usize,
}

/// `file:///abs/path` → `/abs/path`; `s3://bucket/key` is kept as it is (the engine opens such names through
/// the S3 reader); other schemes are named in the error.
pub fn source_path(field: &str, uri: &str) -> Result<PathBuf> {
    match uri.strip_prefix("file://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ if uri.starts_with("s3://") && S3Uri::parse(uri).is_some_and(|u| !u.key.is_empty()) => {
            Ok(PathBuf::from(uri))
        }
        _ if uri.starts_with("s3://") => Err(Error::Field {
            field: field.into(),
            message: format!("{uri:?}: expected s3://bucket/key"),
        }),
        _ => Err(Error::Field {
            field: field.into(),
            message: format!("{uri:?}: expected file:///absolute/path or s3://bucket/key"),
        }),
    }
}

/// Where outputs go: a folder, or an S3 prefix (written in scratch, then uploaded).
enum Destination {
    Dir(PathBuf),
    S3(S3Uri),
}

fn destination(uri: &str) -> Result<Destination> {
    if uri.starts_with("s3://") {
        return S3Uri::parse(uri)
            .map(Destination::S3)
            .ok_or_else(|| Error::Field {
                field: "spec.output.uri".into(),
                message: format!("{uri:?}: expected s3://bucket/prefix/"),
            });
    }
    source_path("spec.output.uri", uri).map(Destination::Dir)
}

/// A `file://` input must be a file that exists (an S3 input is checked by its first request).
fn check_local_input(uri: &str) -> Result<()> {
    let Some(p) = uri.strip_prefix("file://").map(Path::new) else {
        return Ok(());
    };
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Err(Error::Field {
            field: "spec.input.uri".into(),
            message: format!("{uri:?} is a folder; name the video file inside it"),
        }),
        Ok(_) => Ok(()),
        Err(source) => Err(Error::Read {
            path: p.to_path_buf(),
            source,
        }),
    }
}

/// The output folder, or the nearest folder above it that exists, must be a folder this process may write:
/// answered before any encoding, and without creating anything (a failed run leaves nothing behind).
fn check_writable_dir(dir: &Path) -> Result<()> {
    let mut p = dir;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::Field {
                    field: "spec.output.uri".into(),
                    message: format!(
                        "{} is a file, not a folder, so {} cannot be created; choose another output folder",
                        p.display(),
                        dir.display()
                    ),
                })
            }
            Ok(_) => {
                let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| Error::Field {
                    field: "spec.output.uri".into(),
                    message: "the path holds a NUL byte".into(),
                })?;
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
                    return Err(Error::Write {
                        path: p.to_path_buf(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                return Ok(());
            }
            Err(_) => match p.parent() {
                Some(up) => p = up,
                None => return Ok(()),
            },
        }
    }
}

/// Find each planned boundary keyframe's presentation timestamp (one packet read per boundary): (seek
/// timestamp, pts, seconds from the start).
fn resolve_boundaries(info: &ProbeInfo, starts: &[usize]) -> Result<Vec<(i64, i64, f64)>> {
    let mut ictx = None;
    let mut out: Vec<(i64, i64, f64)> = Vec::with_capacity(starts.len());
    for (n, &i) in starts.iter().enumerate() {
        let k = info.keyframes[i];
        if n == 0 {
            out.push((k.seek_ts, i64::MIN, k.time));
            continue;
        }
        let pts = match k.pts {
            Some(p) => p,
            None => {
                let ictx = match ictx.as_mut() {
                    Some(c) => c,
                    None => ictx.insert(open_input(&info.path)?),
                };
                // SAFETY: seeking an open input.
                let ret = unsafe {
                    ffi::av_seek_frame(
                        ictx.as_mut_ptr(),
                        info.video.index as i32,
                        k.seek_ts,
                        ffi::AVSEEK_FLAG_BACKWARD,
                    )
                };
                if ret < 0 {
                    return Err(Error::media(
                        &info.path,
                        "seek to a keyframe",
                        ff::Error::from(ret),
                    ));
                }
                let found = ictx
                    .packets()
                    // The seek may land on an earlier keyframe: the boundary is the first keyframe at or
                    // after the index timestamp (DTS for MP4, PTS for Matroska cues).
                    .filter(|(s, p)| {
                        s.index() == info.video.index
                            && p.is_key()
                            && p.dts().or(p.pts()).is_some_and(|t| t >= k.seek_ts)
                    })
                    .find_map(|(_, p)| p.pts().or(p.dts()));
                ictx.check()?;
                match found {
                    Some(p) => p,
                    None => continue,
                }
            }
        };
        // Strictly increasing, and after the first frame.
        if out.len() > 1 && pts <= out.last().expect("non-empty").1 {
            continue;
        }
        out.push((k.seek_ts, pts, k.time));
    }
    Ok(out)
}

struct RenditionPlan {
    target: VideoTarget,
    encoder: EncoderChoice,
    audio: Option<AudioPlan>,
    /// `PQ` or `HLG` where the rendition stays HDR.
    range: Option<&'static str>,
    /// What of the source's picture metadata this rendition does not carry, and why.
    left_out: Vec<tessera_crds::LeftOutStream>,
    /// The source's CEA-608/708 captions are carried.
    captions: bool,
}

/// Check a spec as `tessera run` and workers do: every problem, the first one's field named.
pub fn validate(spec: &TranscodeJobSpec) -> Result<()> {
    tessera_crds::validate_spec(spec).map_err(|errs| Error::Field {
        field: errs[0].field.clone(),
        message: errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
            .replacen(&format!("{}: ", errs[0].field), "", 1),
    })
}

/// A job probed and planned: everything needed to encode any of its chunks, its audio, or to stitch it.
/// Local mode makes one and runs all of it; in a cluster the plan task makes one and writes it down as a
/// `PlanRecord`, and every later task makes one from that record (`prepare_planned`).
pub struct Prepared {
    pub info: ProbeInfo,
    pub input: PathBuf,
    pub chunks: Vec<Chunk>,
    /// Each chunk's start and end, in seconds from the input's start.
    pub spans: Vec<(f64, f64)>,
    pub target_seconds: f64,
    pub decode: hwdec::DecodeChoice,
    clock: Clock,
    fps: Rational,
    plans: Vec<RenditionPlan>,
    /// Distinct audio encodes (renditions asking for the same settings share one), of every kept track.
    audio: Vec<AudioPlan>,
    /// Which source tracks the outputs keep, and which they leave out.
    pub streams: StreamPlan,
    decoder_threads: usize,
    /// The ladder `spec.ladder` built (its rungs are among the renditions this was assembled for).
    pub ladder: Option<tessera_crds::Ladder>,
}

/// Probe the input, cut it into chunks, choose the decoder and each rendition's encoder. `workers` is how
/// many chunks run at once here (it sizes automatic chunks and thread counts); `target_seconds`, where
/// given, is the chunk length to cut at (an earlier plan's), before the spec's and the automatic one.
pub fn prepare(
    spec: &TranscodeJobSpec,
    workers: usize,
    target_seconds: Option<f64>,
    progress: &Progress,
) -> Result<Prepared> {
    validate(spec)?;
    let input = source_path("spec.input.uri", &spec.input.uri)?;
    progress.stage("probing");
    let info = probe::probe(&input)?;
    let target_seconds = target_seconds
        .or(spec.chunking.as_ref().and_then(|c| c.target_seconds))
        .unwrap_or_else(|| plan::auto_target_seconds(info.duration, workers));
    let starts = plan::plan_boundaries(&info.keyframes, info.duration, target_seconds);
    let bounds = resolve_boundaries(&info, &starts)?;
    let pairs: Vec<(i64, i64)> = bounds.iter().map(|b| (b.0, b.1)).collect();
    let chunks = plan::chunks_from_boundaries(&pairs);
    let mut spans: Vec<(f64, f64)> = Vec::with_capacity(chunks.len());
    for (i, _) in chunks.iter().enumerate() {
        let from = if i == 0 { 0.0 } else { bounds[i].2 };
        let to = bounds.get(i + 1).map_or(info.duration, |b| b.2);
        spans.push((from, to.max(from)));
    }
    tracing::debug!(?chunks, "chunks");
    tracing::info!(
        input = %input.display(), frames = info.video.frames, duration = info.duration, keyframes = info.keyframes.len(),
        keyframe_source = info.keyframe_source, chunks = chunks.len(), target_seconds, vfr = info.video.vfr,
        "planned"
    );
    let active = workers.max(1).min(chunks.len()).max(1);
    let cut = Cut {
        input,
        info,
        chunks,
        spans,
        target_seconds,
        active,
    };
    let ladder = match &spec.ladder {
        Some(l) => Some(measure_ladder(spec, l, &cut, progress)?),
        None => None,
    };
    let applied = tessera_crds::ladder::apply(spec, ladder.as_ref());
    let mut p = assemble(&applied, cut, None, progress)?;
    p.ladder = ladder;
    Ok(p)
}

/// Encodes that refine the top rung's setting, at most.
const REFINE: usize = 2;

/// Build `spec.ladder`: sample chunks encoded at each candidate size and setting, scored with VMAF at the
/// top size (`chunk::ladder_point`), the top rung's setting refined by encodes interpolated on its size's
/// curve, and the rungs chosen on the frontier of undominated points (`ladder::choose`).
fn measure_ladder(
    spec: &TranscodeJobSpec,
    l: &tessera_crds::LadderSpec,
    cut: &Cut,
    progress: &Progress,
) -> Result<tessera_crds::Ladder> {
    use tessera_crds::ladder::{DEFAULT_MAX_RUNGS, DEFAULT_MIN_HEIGHT};
    use tessera_crds::{LadderPoint, Rendition, VideoSpec};
    progress.stage("measuring the ladder");
    let started = Instant::now();
    let v = &cut.info.video;
    let quarter_turn = ((v.rotation.abs().round() as i64) % 180) == 90;
    let source_height = if quarter_turn { v.width } else { v.height };
    let top = crate::ladder::top_height(source_height, l.max_height);
    let heights = crate::ladder::candidate_heights(top, l.min_height.unwrap_or(DEFAULT_MIN_HEIGHT));
    // The sizes as renditions, so they get encoders and targets as any rendition does.
    let sizes_spec = TranscodeJobSpec {
        renditions: heights
            .iter()
            .map(|&h| Rendition {
                name: format!("ladder-{h}p"),
                video: VideoSpec {
                    codec: l.codec,
                    width: None,
                    height: Some(h),
                    crf: None,
                    bitrate: None,
                    maxrate: None,
                    preset: l.preset.clone(),
                    target_quality: None,
                },
                audio: None,
            })
            .collect(),
        ladder: None,
        quality: None,
        ..spec.clone()
    };
    let sizes = assemble(&sizes_spec, cut.clone(), None, &Progress::default())?;
    let picks = crate::ladder::sample_chunks(sizes.chunks.len());
    let inputs: Vec<ChunkInput<'_>> = picks
        .iter()
        .map(|&i| sizes.chunk_input(&sizes.chunks[i]))
        .collect();
    let all: Vec<usize> = (0..heights.len()).collect();
    let outputs = sizes.chunk_outputs(&sizes_spec, &sizes.chunks[0], &all, &[], Path::new(""));
    let cancel = AtomicBool::new(false);
    let samples = chunk::ladder_sample(&inputs, &outputs, &cancel)?;
    let frames = samples[0].len() as u64;
    if frames == 0 {
        return Err(Error::Field {
            field: "spec.ladder".into(),
            message: "no frames could be sampled from the input to measure a ladder".into(),
        });
    }
    let seconds = frames as f64 / sizes.fps().max(1e-9);
    let top_target = &sizes.plans[0].target;
    let encoder = sizes.plans[0].encoder.name.clone();
    let scale = crate::target::bounded(&encoder, &l.target_quality);
    let measure = |o: usize, crf: u8| -> Result<LadderPoint> {
        let (vmaf, bytes) = chunk::ladder_point(
            &inputs[0],
            &outputs[o],
            crf,
            &samples[o],
            &samples[0],
            top_target,
        )?;
        Ok(LadderPoint {
            width: if quarter_turn {
                outputs[o].target.height
            } else {
                outputs[o].target.width
            },
            height: heights[o],
            crf,
            kbps: bytes as f64 * 8.0 / seconds / 1000.0,
            vmaf,
            dominated: false,
            on_hull: false,
        })
    };
    let mut points = Vec::new();
    for o in 0..outputs.len() {
        for crf in crate::ladder::settings(&scale) {
            points.push(measure(o, crf)?);
        }
    }
    crate::ladder::mark_hull(&mut points);
    // The top rung: interpolate its size's curve to the target and measure that setting too (twice at
    // most, as the top's size may change with what the first one shows).
    let goal = l.target_quality.vmaf;
    for _ in 0..REFINE {
        let Some(t) = crate::ladder::top_point(&points, goal).filter(|t| t.vmaf >= goal) else {
            break;
        };
        let o = heights.iter().position(|&h| h == t.height).unwrap_or(0);
        let probes: Vec<crate::target::Probe> = points
            .iter()
            .filter(|p| p.height == t.height)
            .map(|p| crate::target::Probe {
                crf: p.crf,
                vmaf: p.vmaf,
            })
            .collect();
        let mut crf = crate::target::choose(&probes, goal, &scale);
        // The interpolation may round onto a measured setting just short of the target: one step better.
        if let Some(p) = probes.iter().find(|p| p.crf == crf) {
            let better = crf.saturating_sub(1);
            if p.vmaf >= goal || crf <= scale.lo || probes.iter().any(|p| p.crf == better) {
                break;
            }
            crf = better;
        }
        points.push(measure(o, crf)?);
        crate::ladder::mark_hull(&mut points);
    }
    let taken: Vec<String> = spec.renditions.iter().map(|r| r.name.clone()).collect();
    let (rungs, notes) = crate::ladder::choose(
        &points,
        goal,
        l.max_rungs.unwrap_or(DEFAULT_MAX_RUNGS) as usize,
        &taken,
    );
    tracing::info!(
        encoder = %encoder, sizes = ?heights, points = points.len(), sample_frames = frames,
        rungs = ?rungs.iter().map(|r| format!("{}@crf{} {:.0}kb/s vmaf {:.1}", r.name, r.crf, r.kbps, r.vmaf)).collect::<Vec<_>>(),
        seconds = started.elapsed().as_secs_f64(), "ladder chosen"
    );
    for n in &notes {
        tracing::info!(note = %n, "ladder");
    }
    Ok(tessera_crds::Ladder {
        display: format!("{}x{}", top_target.width, top_target.height),
        model: vmaf::model_for(top_target.width, top_target.height).to_string(),
        target_vmaf: goal,
        sample_chunks: picks
            .iter()
            .map(|&i| sizes.chunks[i].index as u32)
            .collect(),
        sample_frames: frames,
        rungs,
        points,
        notes,
    })
}

/// A task of a planned job: the plan's chunks, timing and encoders, and of the input only its container
/// header (what seeking and decoding need). Nothing is planned again, so every worker encodes alike.
pub fn prepare_planned(
    spec: &TranscodeJobSpec,
    plan: &tessera_crds::work::PlanRecord,
    slots: usize,
) -> Result<Prepared> {
    let spec = &*plan.applied(spec);
    validate(spec)?;
    let input = source_path("spec.input.uri", &spec.input.uri)?;
    let mut info = probe::header(&input)?;
    info.video.frames = plan.frames;
    info.video.vfr = plan.vfr;
    info.video.hdr = plan.hdr.as_deref().copied();
    info.video.captions = plan.captions;
    let chunks = plan
        .chunks
        .iter()
        .map(|c| Chunk {
            index: c.index as usize,
            seek_ts: c.seek_ts,
            start_pts: c.start_pts,
            end_pts: c.end_pts,
        })
        .collect();
    let spans = plan
        .chunks
        .iter()
        .map(|c| (c.start_seconds, c.end_seconds))
        .collect();
    let mut p = assemble(
        spec,
        Cut {
            input,
            info,
            chunks,
            spans,
            target_seconds: plan.target_seconds,
            active: slots.max(1),
        },
        Some(&plan.encoders),
        &Progress::default(),
    )?;
    p.ladder = plan.ladder.as_deref().cloned();
    Ok(p)
}

/// An input cut into chunks (all of them, or the ones a task was sent).
#[derive(Clone)]
struct Cut {
    input: PathBuf,
    info: ProbeInfo,
    chunks: Vec<Chunk>,
    spans: Vec<(f64, f64)>,
    target_seconds: f64,
    /// Chunks that run at once here: `workers`, or fewer when the job has fewer chunks.
    active: usize,
}

/// Timing, threads, decoder and encoders for a cut input.
fn assemble(
    spec: &TranscodeJobSpec,
    cut: Cut,
    encoders: Option<&[String]>,
    progress: &Progress,
) -> Result<Prepared> {
    let Cut {
        input,
        info,
        chunks,
        spans,
        target_seconds,
        active,
    } = cut;
    // Output timing: CFR sources get a 1/fps time base (as ffmpeg does), VFR ones keep their own.
    let v = &info.video;
    let src_tb = Rational::new(v.time_base.0, v.time_base.1);
    let fps = Rational::new(v.fps.0.max(1), v.fps.1.max(1));
    let origin = rescale(
        (info.start_time * 1e6).round() as i64,
        Rational::new(1, 1_000_000),
        src_tb,
    );
    let clock = if !v.vfr && v.fps.0 > 0 && v.fps.1 > 0 {
        Clock {
            src_tb,
            origin,
            enc_tb: fps.invert(),
            default_duration: 1,
        }
    } else {
        Clock {
            src_tb,
            origin,
            enc_tb: src_tb,
            default_duration: rescale(1, fps.invert(), src_tb).max(1),
        }
    };
    // Threads per task. Encoders get twice a slot's share of the cores (at most all of them): a task that
    // runs alone at the tail of a job then still uses every core, at the price of mild oversubscription
    // while all slots are busy (measured faster on the engine benchmark). Decoders get one slot's share.
    let cores = default_workers();
    let decoder_threads = (cores / active).max(1);
    let encoder_threads = std::env::var("TESSERA_ENCODER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| (2 * cores).div_ceil(active).min(cores).max(1));

    // Decode on a GPU where one opens (bit-identical frames, less CPU); chosen once per job.
    let decode = hwdec::choose(v.codec_id, spec.hardware);
    let streams = streams::plan(&info.tracks, spec.streams.as_ref());
    tracing::info!(
        audio = streams.audio.len(),
        subtitles = streams.subtitles.len(),
        left_out = streams.left_out.len(),
        "streams"
    );
    for l in &streams.left_out {
        tracing::info!(index = l.source_index, kind = %l.kind, codec = %l.codec, reason = %l.reason, "stream left out");
    }
    tracing::info!(method = %decode.method, reason = %decode.reason, "video decoding");

    // Per rendition: size, encoder (chosen once by opening it), audio settings.
    progress.stage("choosing encoders");
    let mut plans = Vec::with_capacity(spec.renditions.len());
    for (ri, r) in spec.renditions.iter().enumerate() {
        let (w, h) =
            plan::output_size(v.width, v.height, v.rotation, r.video.width, r.video.height);
        let target = VideoTarget {
            width: w,
            height: h,
            pix_fmt: ff::format::Pixel::YUV420P,
            time_base: clock.enc_tb,
            frame_rate: fps,
            sar: scaled_sar(v.sar, v.width, v.height, w, h),
            color: v.color,
            threads: encoder_threads,
            hdr: None,
            tone_map_from: None,
        };
        // HDR sources: HEVC and AV1 keep HDR and its metadata; 8-bit H.264 is tone-mapped to SDR BT.709.
        let hdr_transfer = match v.color.2 {
            ff::color::TransferCharacteristic::SMPTE2084 => Some("smpte2084"),
            ff::color::TransferCharacteristic::ARIB_STD_B67 => Some("arib-std-b67"),
            _ => None,
        };
        let range = match v.color.2 {
            _ if r.video.codec == tessera_crds::VideoCodec::H264 => None,
            ff::color::TransferCharacteristic::SMPTE2084 => Some("PQ"),
            ff::color::TransferCharacteristic::ARIB_STD_B67 => Some("HLG"),
            _ => None,
        };
        let mut left_out = Vec::new();
        let video_note = |reason: String| tessera_crds::LeftOutStream {
            source_index: v.index as u32,
            kind: "video".into(),
            codec: v.codec.clone(),
            language: None,
            reason,
        };
        if hdr_transfer.is_some() && range.is_none() {
            left_out.push(video_note(format!(
                "HDR ({}) is tone-mapped to SDR BT.709: an 8-bit H.264 rendition cannot carry it; its HDR \
                 metadata is not carried",
                if v.color.2 == ff::color::TransferCharacteristic::SMPTE2084 { "PQ" } else { "HLG" }
            )));
        }
        for d in &v.dynamic_hdr {
            left_out.push(video_note(match *d {
                "Dolby Vision" => "Dolby Vision metadata is not carried: its RPU describes the source's pictures \
                    and would be wrong after re-encoding (the HDR10 base layer and its static metadata are kept)"
                    .into(),
                other => format!(
                    "{other} dynamic metadata is not carried: this FFmpeg's encoders cannot write it per frame \
                     (the HDR10 static metadata is kept)"
                ),
            }));
        }
        let target = match (r.video.codec, hdr_transfer) {
            (tessera_crds::VideoCodec::H264, Some(tin)) => VideoTarget {
                color: (
                    ff::color::Range::MPEG,
                    ff::color::Primaries::BT709,
                    ff::color::TransferCharacteristic::BT709,
                    ff::color::Space::BT709,
                ),
                tone_map_from: Some(tin),
                ..target
            },
            (_, Some(_)) => VideoTarget {
                hdr: v.hdr,
                ..target
            },
            _ => target,
        };
        let only = encoders.and_then(|e| e.get(ri)).map(String::as_str);
        let encoder = encode::select(r, spec.hardware, &target, v.bit_depth, only)?;
        let audio = (!streams.audio.is_empty())
            .then(|| plan::audio_plan(r.audio.as_ref()))
            .flatten();
        let captions = v.captions && encode::carries_captions(&encoder.name);
        if v.captions && !captions {
            left_out.push(video_note(format!(
                "CEA-608/708 captions (in the source video's SEI) are not carried: {} in this FFmpeg has no \
                 caption path; an H.264 rendition keeps them",
                encoder.name
            )));
        }
        plans.push(RenditionPlan {
            target: VideoTarget {
                pix_fmt: encoder.pix_fmt,
                ..target
            },
            encoder,
            audio,
            range,
            left_out,
            captions,
        });
    }
    let mut audio: Vec<AudioPlan> = Vec::new();
    for a in plans.iter().filter_map(|p| p.audio) {
        if !audio.contains(&a) {
            audio.push(a);
        }
    }
    Ok(Prepared {
        info,
        input,
        chunks,
        spans,
        target_seconds,
        decode,
        clock,
        fps,
        plans,
        audio,
        streams,
        decoder_threads,
        ladder: None,
    })
}

/// The outputs of a stitch: each rendition's status and, for hls, the master playlist.
pub struct Finished {
    pub renditions: Vec<RenditionStatus>,
    pub master_playlist: Option<String>,
    /// The DASH MPD (cmaf).
    pub manifest: Option<String>,
    /// The WebVTT thumbnail track.
    pub thumbnails: Option<String>,
}

impl Prepared {
    /// The encoded chunk `c` of rendition `r`, as a file name inside a job's scratch (or ledger) folder.
    pub fn chunk_file(r: usize, c: usize) -> String {
        format!("r{r}-c{c:05}.tpk")
    }

    /// The audio task's files: each kept audio track once per distinct setting, then each kept subtitle
    /// track's packets.
    pub fn audio_files(&self) -> Vec<String> {
        let mut names = Vec::new();
        for t in &self.streams.audio {
            for s in 0..self.audio.len() {
                names.push(Self::audio_file(t.index, s));
            }
        }
        names.extend(
            self.streams
                .subtitles
                .iter()
                .map(|t| Self::subtitle_file(t.index)),
        );
        names
    }

    /// Audio of source stream `stream` in distinct setting `setting`.
    fn audio_file(stream: usize, setting: usize) -> String {
        format!("audio-{stream}-{setting}.tpk")
    }

    fn subtitle_file(stream: usize) -> String {
        format!("subtitles-{stream}.tpk")
    }

    fn setting(&self, a: &AudioPlan) -> usize {
        self.audio.iter().position(|u| u == a).unwrap_or(0)
    }

    /// The chunks as the plan records them, with their spans and (estimated) frame counts; the counts add
    /// up to the input's frames.
    pub fn plan_chunks(&self) -> Vec<tessera_crds::work::ChunkPlan> {
        let frames = plan::frames_per_chunk(&self.spans, self.fps(), self.info.video.frames);
        self.chunks
            .iter()
            .zip(&self.spans)
            .zip(frames)
            .map(|((c, &(from, to)), frames)| tessera_crds::work::ChunkPlan {
                index: c.index as u32,
                seek_ts: c.seek_ts,
                start_pts: c.start_pts,
                end_pts: c.end_pts,
                start_seconds: from,
                end_seconds: to,
                frames,
            })
            .collect()
    }

    /// Video encoder names, per rendition.
    pub fn encoders(&self) -> Vec<String> {
        self.plans.iter().map(|p| p.encoder.name.clone()).collect()
    }

    /// Why each rendition's encoder was chosen.
    pub fn encoder_reasons(&self) -> Vec<String> {
        self.plans
            .iter()
            .map(|p| p.encoder.reason.clone())
            .collect()
    }

    /// Whether the job has an audio task: audio to encode or subtitles to extract.
    pub fn has_audio(&self) -> bool {
        (!self.streams.audio.is_empty() && !self.audio.is_empty())
            || !self.streams.subtitles.is_empty()
    }

    pub fn fps(&self) -> f64 {
        f64::from(self.fps)
    }

    /// The chunk's outputs for the renditions `wanted` (spec indices), with their settings (spec order).
    fn chunk_outputs<'a>(
        &'a self,
        spec: &'a TranscodeJobSpec,
        c: &Chunk,
        wanted: &[usize],
        settings: &[Option<u8>],
        dir: &Path,
    ) -> Vec<ChunkOutput<'a>> {
        spec.renditions
            .iter()
            .zip(&self.plans)
            .enumerate()
            .filter(|(ri, _)| wanted.contains(ri))
            .map(|(ri, (r, p))| ChunkOutput {
                rendition: r,
                target: &p.target,
                encoder: &p.encoder,
                path: dir.join(Self::chunk_file(ri, c.index)),
                crf: settings.get(ri).copied().flatten(),
                measure: spec.measures_vmaf(r),
            })
            .collect()
    }

    fn chunk_input(&self, c: &Chunk) -> ChunkInput<'_> {
        // From the chunk's span: a worker that did not plan the job has no frame count of the input (and
        // a chunk task's plan holds only its own chunk).
        let expected = self
            .chunks
            .iter()
            .position(|x| x.index == c.index)
            .and_then(|i| self.spans.get(i))
            .map_or(0, |(from, to)| {
                ((to - from) * self.fps()).round().max(1.0) as u64
            });
        ChunkInput {
            path: &self.input,
            stream: self.info.video.index,
            chunk: *c,
            clock: self.clock,
            decoder_threads: self.decoder_threads,
            hw_device: self.decode.device,
            expected_frames: expected,
        }
    }

    /// The setting each `targetQuality` rendition of `wanted` gets in chunk `c` (spec order; `None` for
    /// the others): `known` ones (recorded by an earlier try) as they are, the rest found by probe encodes
    /// (`chunk::search`).
    pub fn search_chunk(
        &self,
        spec: &TranscodeJobSpec,
        c: &Chunk,
        wanted: &[usize],
        known: &[Option<u8>],
        cancel: &AtomicBool,
    ) -> Result<Vec<Option<u8>>> {
        let mut settings: Vec<Option<u8>> = (0..spec.renditions.len())
            .map(|ri| known.get(ri).copied().flatten())
            .collect();
        let outputs = self.chunk_outputs(spec, c, wanted, &settings, Path::new(""));
        let found = chunk::search(&self.chunk_input(c), &outputs, cancel)?;
        let idx: Vec<usize> = (0..spec.renditions.len())
            .filter(|ri| wanted.contains(ri))
            .collect();
        for (ri, f) in idx.into_iter().zip(found) {
            if f.is_some() {
                settings[ri] = f;
            }
        }
        Ok(settings)
    }

    /// Encode chunk `c` for the renditions `wanted` (spec indices) into `dir` with `settings` (from
    /// `search_chunk`), decoding it once; returns the frames encoded and each wanted rendition's record.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_chunk(
        &self,
        spec: &TranscodeJobSpec,
        c: &Chunk,
        wanted: &[usize],
        settings: &[Option<u8>],
        dir: &Path,
        cancel: &AtomicBool,
        on_frame: &(dyn Fn() + Sync),
    ) -> Result<(u64, Vec<ChunkEncode>)> {
        let outputs = self.chunk_outputs(spec, c, wanted, settings, dir);
        let done = encode_chunk(&self.chunk_input(c), &outputs, cancel, &on_frame)?;
        let records = outputs
            .iter()
            .zip(done.vmaf)
            .map(|(o, v)| ChunkEncode {
                encoder: o.encoder.name.clone(),
                frames: done.frames,
                reused: false,
                crf: o.crf,
                at_bound: o
                    .crf
                    .zip(o.rendition.video.target_quality.as_ref())
                    .is_some_and(|(c, goal)| {
                        crate::target::at_bound(c, &crate::target::bounded(&o.encoder.name, goal))
                    }),
                vmaf: v
                    .map(|s| ChunkVmaf::new(vmaf::model_for(o.target.width, o.target.height), &s)),
            })
            .collect();
        Ok((done.frames, records))
    }

    /// Encode every kept audio track once per distinct setting into `dir`, and copy out the kept subtitle
    /// tracks' packets, in one pass over the input.
    pub fn encode_audio(&self, dir: &Path, cancel: &AtomicBool) -> Result<u64> {
        if !self.has_audio() {
            return Ok(0);
        }
        let job = AudioJob {
            path: &self.input,
            start_time: self.info.start_time,
            tracks: self
                .streams
                .audio
                .iter()
                .map(|t| TrackJob {
                    stream: t.index,
                    outputs: self
                        .audio
                        .iter()
                        .enumerate()
                        .map(|(s, p)| (*p, dir.join(Self::audio_file(t.index, s))))
                        .collect(),
                })
                .collect(),
            subtitles: self
                .streams
                .subtitles
                .iter()
                .map(|t| (t.index, dir.join(Self::subtitle_file(t.index))))
                .collect(),
        };
        encode_audio(&job, cancel)
    }

    /// The stitch input of rendition `ri`: its chunks, its audio tracks, the subtitle tracks.
    fn stitch_input<'a>(&'a self, ri: usize, dir: &Path, files: &'a [PathBuf]) -> StitchInput<'a> {
        let audio = match self.plans[ri].audio {
            Some(a) => {
                let s = self.setting(&a);
                self.streams
                    .audio
                    .iter()
                    .enumerate()
                    .map(|(i, t)| AudioIn {
                        path: dir.join(Self::audio_file(t.index, s)),
                        track: t,
                        default: self.streams.audio_default(i),
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        StitchInput {
            chunks: files,
            audio,
            subtitles: self
                .streams
                .subtitles
                .iter()
                .map(|t| SubtitleIn {
                    path: dir.join(Self::subtitle_file(t.index)),
                    track: t,
                })
                .collect(),
            display_matrix: self.info.video.display_matrix,
            video_index: self.info.video.index,
        }
    }

    /// HLS with audio renditions of their own: more than one audio track, or subtitles beside it.
    fn hls_renditions(&self) -> bool {
        self.streams.audio.len() > 1 || !self.streams.subtitles.is_empty()
    }

    /// Stitch every rendition from the chunk and audio files in `dir`, measure quality, and publish to the
    /// spec's output (a folder, or an S3 prefix through scratch). Nothing is visible until all is complete.
    pub fn finish(
        &self,
        spec: &TranscodeJobSpec,
        dir: &Path,
        records: &[Vec<ChunkEncode>],
        cancel: &AtomicBool,
        progress: &Progress,
    ) -> Result<Finished> {
        let dest = destination(&spec.output.uri)?;
        let out_dir = match &dest {
            Destination::Dir(d) => d.clone(),
            Destination::S3(_) => dir.join("out"),
        };
        std::fs::create_dir_all(&out_dir).map_err(|source| Error::Write {
            path: out_dir.clone(),
            source,
        })?;
        let v = &self.info.video;
        // Stitch every rendition under temporary names.
        progress.stage("stitching");
        let cmaf = spec.output.container == Container::Cmaf;
        let separate = cmaf || (spec.output.container == Container::Hls && self.hls_renditions());
        let mut timelines = Vec::new();
        let mut staged = Vec::new();
        let mut media_staged = Vec::new();
        let mut statuses = Vec::new();
        let mut variants = Vec::new();
        let mut media: Vec<MediaRendition> = Vec::new();
        for (ri, (r, p)) in spec.renditions.iter().zip(&self.plans).enumerate() {
            let files: Vec<PathBuf> = self
                .chunks
                .iter()
                .map(|c| dir.join(Self::chunk_file(ri, c.index)))
                .collect();
            let sin = self.stitch_input(ri, dir, &files);
            let (mut st, stg) = match spec.output.container {
                Container::Mp4 => stitch::stitch_mp4(&sin, &out_dir, &r.name)?,
                _ if separate => {
                    stitch::stitch_hls(&sin, &out_dir, &r.name, HlsMedia::VideoOnly, cmaf)?
                }
                _ => stitch::stitch_hls(&sin, &out_dir, &r.name, HlsMedia::Muxed, false)?,
            };
            if cmaf {
                let t = crate::cmaf::finish_folder(stg.folder(), true)?;
                st.peak_bandwidth = t.peak_bandwidth();
                if st.codecs.is_none() {
                    st.codecs.clone_from(&t.codecs);
                }
                timelines.push(t);
            }
            let mut streams = st.streams.clone();
            if p.captions {
                streams.insert(
                    1,
                    tessera_crds::OutputStream {
                        kind: "captions".into(),
                        codec: "eia_608".into(),
                        source_index: v.index as u32,
                        ..Default::default()
                    },
                );
            }
            let mut audio_group = None;
            if separate {
                // Audio renditions, one group per distinct audio setting, shared by the variants using it.
                if let Some(a) = p.audio {
                    let group = format!("audio{}", self.setting(&a));
                    if !media.iter().any(|m| m.group == group) {
                        for (i, ain) in sin.audio.iter().enumerate() {
                            let name = format!("_{group}-{}", ain.track.index);
                            let (mut ast, astg) = stitch::stitch_hls(
                                &sin,
                                &out_dir,
                                &name,
                                HlsMedia::Audio {
                                    track: i,
                                    seconds: self.target_seconds,
                                },
                                cmaf,
                            )?;
                            let timeline = if cmaf {
                                let t = crate::cmaf::finish_folder(astg.folder(), false)?;
                                ast.peak_bandwidth = t.peak_bandwidth();
                                ast.duration = t.duration();
                                Some(t)
                            } else {
                                None
                            };
                            media.push(MediaRendition {
                                audio: true,
                                group: group.clone(),
                                dir: name,
                                stats: ast,
                                timeline,
                            });
                            media_staged.push(astg);
                        }
                    }
                    streams.extend(
                        media
                            .iter()
                            .filter(|m| m.group == group)
                            .flat_map(|m| m.stats.streams.clone()),
                    );
                    audio_group = Some(group);
                }
                // Subtitle renditions, segmented as the video is.
                if !sin.subtitles.is_empty() && !media.iter().any(|m| !m.audio) {
                    let first = st.segment_starts.first().copied().unwrap_or(0.0);
                    let mpegts = stitch::timestamp_map(&stg.staged_path(), first)?;
                    for sub in &sin.subtitles {
                        let name = format!("_subtitles-{}", sub.track.index);
                        let (sst, sstg) = stitch::write_vtt(
                            sub,
                            &out_dir,
                            &name,
                            &st.segment_starts,
                            mpegts,
                            cmaf,
                        )?;
                        media.push(MediaRendition {
                            audio: false,
                            group: "subs".into(),
                            dir: name,
                            stats: sst,
                            timeline: None,
                        });
                        media_staged.push(sstg);
                    }
                }
                streams.extend(
                    media
                        .iter()
                        .filter(|m| !m.audio)
                        .flat_map(|m| m.stats.streams.clone()),
                );
            }
            statuses.push(RenditionStatus {
                name: r.name.clone(),
                uri: format!("file://{}", st.path.display()),
                frames: st.frames,
                duration_seconds: (st.duration * 1000.0).round() / 1000.0,
                bytes: st.bytes,
                width: st.width,
                height: st.height,
                encoder: p.encoder.name.clone(),
                encoder_reason: p.encoder.reason.clone(),
                psnr: None,
                ssim: None,
                vmaf: None,
                quality: None,
                streams,
                left_out: {
                    let mut l = self.streams.left_out_of(p.audio.is_some());
                    l.extend(p.left_out.iter().cloned());
                    l
                },
            });
            variants.push(Variant {
                name: r.name.clone(),
                stats: st,
                fps: f64::from(self.fps),
                audio_group,
                subtitles: separate && !self.streams.subtitles.is_empty(),
                iframes: timelines
                    .last()
                    .filter(|_| cmaf)
                    .map(|t| t.iframe_bandwidth()),
                video_range: p.range,
                captions: p.captions,
            });
            staged.push(stg);
        }

        // Thumbnails: sprite sheets and their WebVTT track, staged like the renditions.
        let thumbs = match &spec.thumbnails {
            Some(t) => {
                progress.stage("thumbnails");
                let stg = stitch::staged_folder(&out_dir, THUMBNAILS_DIR)?;
                let th =
                    crate::thumbnails::make(&self.info, t.interval_seconds, t.width, stg.folder())?;
                let vtt = stg.folder().join("thumbnails.vtt");
                std::fs::write(&vtt, th.vtt(self.info.duration)).map_err(|source| {
                    Error::Write {
                        path: vtt.clone(),
                        source,
                    }
                })?;
                media_staged.push(stg);
                Some(th)
            }
            None => None,
        };

        // Quality, measured on the staged outputs before they are published.
        let metrics: Vec<QualityMetric> = spec
            .quality
            .as_ref()
            .map(|q| q.metrics.clone())
            .unwrap_or_default();
        if !metrics.is_empty() {
            progress.stage("measuring quality");
            let outs: Vec<(PathBuf, u32, u32)> = staged
                .iter()
                .zip(&statuses)
                .map(|(s, st)| (s.staged_path(), st.width, st.height))
                .collect();
            let scores = quality::measure(&self.input, v.index, &outs, cancel)?;
            for (st, q) in statuses.iter_mut().zip(scores) {
                if metrics.contains(&QualityMetric::Psnr) {
                    st.psnr = Some((q.psnr * 1000.0).round() / 1000.0);
                }
                if metrics.contains(&QualityMetric::Ssim) {
                    st.ssim = Some((q.ssim * 100000.0).round() / 100000.0);
                }
            }
        }

        // VMAF and quality targets, from the chunks' records (measured as each chunk was encoded).
        for (ri, st) in statuses.iter_mut().enumerate() {
            let r = &spec.renditions[ri];
            let recs: Vec<(u32, &ChunkEncode)> = records
                .iter()
                .enumerate()
                .filter_map(|(c, rs)| rs.get(ri).map(|e| (c as u32, e)))
                .collect();
            let measured: Vec<&ChunkVmaf> =
                recs.iter().filter_map(|(_, e)| e.vmaf.as_ref()).collect();
            if measured.is_empty() {
                continue;
            }
            if measured.len() < self.chunks.len() {
                return Err(Error::Chunk {
                    chunk: recs
                        .iter()
                        .find(|(_, e)| e.vmaf.is_none())
                        .map_or(0, |(c, _)| *c as usize),
                    detail: format!(
                        "rendition {}: VMAF was measured on {} of {} chunks",
                        r.name,
                        measured.len(),
                        self.chunks.len()
                    ),
                });
            }
            st.vmaf = pool_vmaf(measured);
            if let Some(t) = &r.video.target_quality {
                st.quality = target_outcome(t.vmaf, recs);
            }
        }

        progress.stage("publishing");
        for s in staged.into_iter().chain(media_staged) {
            s.commit()?;
        }
        let master = if spec.output.container != Container::Mp4 {
            Some(stitch::write_master(&out_dir, &variants, &media)?)
        } else {
            None
        };
        let manifest = if cmaf {
            Some(self.write_mpd(&out_dir, &variants, &timelines, &media, thumbs.as_ref())?)
        } else {
            None
        };
        let thumbnails = thumbs
            .as_ref()
            .map(|_| out_dir.join(THUMBNAILS_DIR).join("thumbnails.vtt"));
        // Name each output by where it ends up.
        let published = |p: &Path| -> String {
            match &dest {
                Destination::Dir(_) => format!("file://{}", p.display()),
                Destination::S3(prefix) => prefix
                    .join(&p.strip_prefix(&out_dir).unwrap_or(p).to_string_lossy())
                    .to_string(),
            }
        };
        if let Destination::S3(prefix) = &dest {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let entry_points: Vec<String> = master
                .iter()
                .chain(&manifest)
                .map(|m| {
                    m.strip_prefix(&out_dir)
                        .unwrap_or(m)
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            let s3 = s3::global();
            let written = s3::block_on(s3::cp::upload_tree(&s3, &out_dir, prefix, &entry_points))?;
            tracing::info!(objects = written.len(), bytes = written.iter().map(|w| w.bytes).sum::<u64>(),
                prefix = %prefix, "outputs published");
        }
        for st in &mut statuses {
            if let Some(p) = st.uri.strip_prefix("file://") {
                st.uri = published(Path::new(p));
            }
        }
        Ok(Finished {
            renditions: statuses,
            master_playlist: master.map(|m| published(&m)),
            manifest: manifest.map(|m| published(&m)),
            thumbnails: thumbnails.map(|t| published(&t)),
        })
    }

    /// The DASH MPD of a CMAF output: video renditions grouped by codec, one audio adaptation set per
    /// source track (a representation per audio setting), one text set per subtitle track.
    fn write_mpd(
        &self,
        out_dir: &Path,
        variants: &[Variant],
        timelines: &[crate::cmaf::Timeline],
        media: &[MediaRendition],
        thumbs: Option<&crate::thumbnails::Thumbnails>,
    ) -> Result<PathBuf> {
        use crate::cmaf::{AdaptationSet, Representation};
        use tessera_crds::streams::{bcp47, language};
        let (n, d) = self.info.video.fps;
        let frame_rate = if d == 1 {
            format!("{n}")
        } else {
            format!("{n}/{d}")
        };
        let mut sets: Vec<AdaptationSet> = Vec::new();
        let mut families: Vec<String> = Vec::new();
        for (v, t) in variants.iter().zip(timelines) {
            let codec = v
                .stats
                .codecs
                .as_deref()
                .and_then(|c| c.split(',').next())
                .map(str::to_string);
            let family = format!(
                "{}/{}/{}",
                codec
                    .as_deref()
                    .and_then(|c| c.split('.').next())
                    .unwrap_or(""),
                v.video_range.unwrap_or("SDR"),
                v.captions
            );
            // HDR: the colour of the set, as DASH-IF signals it (CICP code points).
            let mut properties = match v.video_range {
                Some(range) => vec![
                    "<SupplementalProperty schemeIdUri=\"urn:mpeg:mpegB:cicp:ColourPrimaries\" value=\"9\"/>".into(),
                    format!(
                        "<EssentialProperty schemeIdUri=\"urn:mpeg:mpegB:cicp:TransferCharacteristics\" value=\"{}\"/>",
                        if range == "PQ" { 16 } else { 18 }
                    ),
                    "<SupplementalProperty schemeIdUri=\"urn:mpeg:mpegB:cicp:MatrixCoefficients\" value=\"9\"/>".into(),
                ],
                None => Vec::new(),
            };
            if v.captions {
                properties.push(
                    "<Accessibility schemeIdUri=\"urn:scte:dash:cc:cea-608:2015\" value=\"CC1\"/>"
                        .into(),
                );
            }
            let at = match families.iter().position(|f| *f == family) {
                Some(i) => i,
                None => {
                    families.push(family);
                    sets.push(AdaptationSet {
                        content: "video",
                        lang: None,
                        label: None,
                        role: "main",
                        representations: Vec::new(),
                        vtt: None,
                        properties,
                        image: None,
                    });
                    sets.len() - 1
                }
            };
            sets[at].representations.push(Representation {
                id: v.name.clone(),
                dir: v.name.clone(),
                bandwidth: t.peak_bandwidth(),
                codecs: codec,
                width: v.stats.width,
                height: v.stats.height,
                frame_rate: Some(frame_rate.clone()),
                channels: None,
                timeline: t.clone(),
            });
        }
        let label = |s: &tessera_crds::OutputStream| {
            s.title.clone().or_else(|| {
                s.language
                    .as_deref()
                    .and_then(language)
                    .map(|l| l.to_name().to_string())
            })
        };
        for (i, t) in self.streams.audio.iter().enumerate() {
            let reps: Vec<Representation> = media
                .iter()
                .filter(|m| m.audio)
                .filter(|m| {
                    m.stats.streams.first().map(|s| s.source_index as usize) == Some(t.index)
                })
                .filter_map(|m| {
                    Some(Representation {
                        id: m.dir.clone(),
                        dir: m.dir.clone(),
                        bandwidth: m.stats.peak_bandwidth,
                        codecs: m.stats.codecs.clone(),
                        width: 0,
                        height: 0,
                        frame_rate: None,
                        channels: m.stats.streams.first().and_then(|s| s.channels),
                        timeline: m.timeline.clone()?,
                    })
                })
                .collect();
            let Some(first) = media
                .iter()
                .find(|m| m.audio && m.dir.ends_with(&format!("-{}", t.index)))
            else {
                continue;
            };
            sets.push(AdaptationSet {
                content: "audio",
                lang: t.language.as_deref().and_then(bcp47),
                label: first.stats.streams.first().and_then(label),
                role: if self.streams.audio_default(i) {
                    "main"
                } else {
                    "alternate"
                },
                representations: reps,
                vtt: None,
                properties: Vec::new(),
                image: None,
            });
        }
        for m in media.iter().filter(|m| !m.audio) {
            let Some(s) = m.stats.streams.first() else {
                continue;
            };
            sets.push(AdaptationSet {
                content: "text",
                lang: s.language.as_deref().and_then(bcp47),
                label: label(s),
                role: if s.forced {
                    "forced-subtitle"
                } else {
                    "subtitle"
                },
                representations: Vec::new(),
                vtt: Some(format!("{}/all.vtt", m.dir)),
                properties: Vec::new(),
                image: None,
            });
        }
        let duration = timelines.iter().map(|t| t.duration()).fold(0.0, f64::max);
        if let Some(t) = thumbs {
            use crate::thumbnails::{COLUMNS, ROWS};
            let dir = out_dir.join(THUMBNAILS_DIR);
            let bytes: u64 = t
                .sheets
                .iter()
                .map(|s| std::fs::metadata(dir.join(s)).map(|m| m.len()).unwrap_or(0))
                .max()
                .unwrap_or(0);
            let seconds = t.interval * f64::from(COLUMNS * ROWS);
            sets.push(AdaptationSet {
                content: "image",
                lang: None,
                label: None,
                role: "main",
                representations: Vec::new(),
                vtt: None,
                properties: Vec::new(),
                image: Some(crate::cmaf::ImageTiles {
                    dir: THUMBNAILS_DIR.into(),
                    columns: COLUMNS,
                    rows: ROWS,
                    width: t.tile_width * COLUMNS,
                    height: t.tile_height * ROWS,
                    seconds_per_sheet: seconds,
                    bandwidth: (bytes as f64 * 8.0 / seconds).ceil() as u64,
                }),
            });
        }
        stitch::write_atomically(out_dir, "manifest.mpd", &crate::cmaf::mpd(duration, &sets))
    }
}

/// The output folder of the thumbnails (a rendition name cannot start with `_`).
const THUMBNAILS_DIR: &str = "_thumbnails";

/// Run a job here. Outputs become visible only when every rendition is complete.
pub fn run_job(job: &TranscodeJob, opts: &RunOptions) -> Result<Summary> {
    let started = Instant::now();
    let spec = &job.spec;
    validate(spec)?;
    // The input and the destination are checked before any work.
    check_local_input(&spec.input.uri)?;
    if let Destination::Dir(d) = destination(&spec.output.uri)? {
        check_writable_dir(&d)?;
    }
    let workers = opts.workers.max(1);
    let progress = &opts.progress;
    let prep = prepare(spec, workers, None, progress)?;
    // With a ladder, its rungs are renditions from here on.
    let applied = tessera_crds::ladder::apply(spec, prep.ladder.as_ref());
    let spec = &*applied;
    let v = &prep.info.video;
    let chunks = &prep.chunks;

    let scratch = tempfile::Builder::new()
        .prefix("tessera-")
        .tempdir()
        .map_err(|source| Error::Write {
            path: std::env::temp_dir(),
            source,
        })?;
    let dir = scratch.path();

    // Encode: chunk tasks on `workers` threads; the audio track on a thread of its own beside them (it is
    // light, and in a worker slot it would delay the video or unbalance the tail).
    progress.frames_total.store(v.frames, Ordering::Relaxed);
    progress
        .chunks_total
        .store(chunks.len() as u32, Ordering::Relaxed);
    progress.stage("encoding");
    let next = AtomicUsize::new(0);
    let records: Mutex<Vec<Vec<ChunkEncode>>> = Mutex::new(vec![Vec::new(); chunks.len()]);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let frames_emitted = AtomicU64::new(0);
    let cancel = &opts.cancel;
    let on_frame = || {
        progress.frames_done.fetch_add(1, Ordering::Relaxed);
    };
    let fail = |e: Error| {
        cancel.store(true, Ordering::Relaxed);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() || matches!(slot.as_ref(), Some(Error::Cancelled)) {
            *slot = Some(e);
        }
    };
    std::thread::scope(|s| {
        if prep.has_audio() {
            let (fail, prep) = (&fail, &prep);
            s.spawn(move || {
                if let Err(e) = prep.encode_audio(dir, cancel) {
                    fail(e);
                }
            });
        }
        for _ in 0..workers.min(chunks.len()) {
            s.spawn(|| {
                while let Some(c) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let all: Vec<usize> = (0..spec.renditions.len()).collect();
                    let done = prep
                        .search_chunk(spec, c, &all, &[], cancel)
                        .and_then(|settings| {
                            prep.encode_chunk(spec, c, &all, &settings, dir, cancel, &on_frame)
                        });
                    match done {
                        Ok((n, recs)) => {
                            records.lock().unwrap_or_else(|p| p.into_inner())[c.index] = recs;
                            frames_emitted.fetch_add(n, Ordering::Relaxed);
                            progress.chunks_done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            fail(e);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    // Interrupted between chunks: some were never started, so there is nothing to stitch.
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let frames = frames_emitted.load(Ordering::Relaxed);
    if v.frames_exact && frames != v.frames {
        tracing::warn!(
            expected = v.frames,
            encoded = frames,
            "frame count differs from the container index (damaged input?)"
        );
    }
    let records = records.into_inner().unwrap_or_else(|p| p.into_inner());
    let fin = prep.finish(spec, dir, &records, cancel, progress)?;
    let measured = records
        .iter()
        .flatten()
        .any(|e| e.vmaf.is_some() || e.crf.is_some());
    Ok(Summary {
        job: job.metadata.name.clone().unwrap_or_default(),
        input: spec.input.uri.clone(),
        output: spec.output.uri.clone(),
        container: spec.output.container,
        workers,
        chunks: chunks.len(),
        target_seconds: prep.target_seconds,
        elapsed_seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        source: SourceSummary {
            frames,
            duration_seconds: prep.info.duration,
            fps: prep.fps(),
            vfr: v.vfr,
            width: v.width,
            height: v.height,
            rotation: v.rotation,
            keyframes: prep.info.keyframes.len(),
        },
        decoder: prep.decode.clone(),
        master_playlist: fin.master_playlist,
        manifest: fin.manifest,
        thumbnails: fin.thumbnails,
        renditions: fin.renditions,
        ladder: prep.ladder.clone(),
        chunk_records: if measured {
            records
                .iter()
                .map(|rs| {
                    rs.iter()
                        .map(|e| ChunkNote {
                            encoder: e.encoder.clone(),
                            crf: e.crf,
                            vmaf: e.vmaf.as_ref().map(|v| v.mean),
                        })
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        },
    })
}

/// Keep the display aspect ratio when scaling changes the storage aspect ratio.
fn scaled_sar(sar: Rational, sw: u32, sh: u32, w: u32, h: u32) -> Rational {
    let num = i64::from(sar.numerator()) * i64::from(sw) * i64::from(h);
    let den = i64::from(sar.denominator()) * i64::from(sh) * i64::from(w);
    let (mut n, mut d) = (0i32, 0i32);
    // SAFETY: pure arithmetic into locals.
    unsafe { ffi::av_reduce(&mut n, &mut d, num, den, 65535) };
    if n <= 0 || d <= 0 {
        Rational::new(1, 1)
    } else {
        Rational::new(n, d)
    }
}

/// Path of the job file, for error messages.
pub fn read_job(path: &Path) -> Result<TranscodeJob> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    tessera_crds::parse_job_yaml(&text).map_err(|message| Error::Spec {
        path: path.into(),
        message,
    })
}
