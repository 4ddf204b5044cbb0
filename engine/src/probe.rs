//! Probe: what is in an input, read from the container's headers and index without decoding it.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ffmpeg_next::{self as ff, ffi, format, media, Rational};
use serde::Serialize;

use crate::avlog;
use crate::error::{Error, Result};
use crate::s3::{self, reader::S3Reader, S3Uri};

/// Everything the planner and the encoders need to know about an input.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeInfo {
    pub path: PathBuf,
    pub format: String,
    pub bytes: u64,
    /// Container duration in seconds.
    pub duration: f64,
    /// Earliest timestamp of any stream, seconds: the origin of every output timestamp.
    pub start_time: f64,
    pub video: VideoInfo,
    /// Every stream but the transcoded video, in source order: what the outputs keep or report as left out.
    pub tracks: Vec<TrackInfo>,
    /// Keyframes of the video stream in decode order, from the container index where it has one.
    pub keyframes: Vec<Keyframe>,
    /// `container index` or `packet scan`.
    pub keyframe_source: &'static str,
    pub streams: Vec<StreamSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VideoInfo {
    pub index: usize,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub pix_fmt: String,
    pub bit_depth: u8,
    pub time_base: (i32, i32),
    /// Average frame rate (num, den).
    pub fps: (i32, i32),
    /// Number of frames: exact where the container index lists every sample, else estimated.
    pub frames: u64,
    pub frames_exact: bool,
    pub vfr: bool,
    /// Display rotation in degrees, counter-clockwise, as the display matrix says (0 when none).
    pub rotation: f64,
    /// Raw display matrix, kept so outputs carry it unchanged.
    #[serde(skip)]
    pub display_matrix: Option<[i32; 9]>,
    pub has_b_frames: bool,
    /// Codec, colour description and sample aspect ratio, copied to every rendition.
    #[serde(skip)]
    pub codec_id: ff::codec::Id,
    #[serde(skip)]
    pub color: (
        ff::color::Range,
        ff::color::Primaries,
        ff::color::TransferCharacteristic,
        ff::color::Space,
    ),
    #[serde(skip)]
    pub sar: Rational,
    /// HDR10 static metadata (mastering display, content light level), from the container or the first
    /// frame's SEI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hdr: Option<tessera_crds::work::HdrStatic>,
    /// Dynamic HDR metadata the source carries (`Dolby Vision`, `HDR10+`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dynamic_hdr: Vec<&'static str>,
    /// CEA-608/708 captions ride in the video's SEI (ATSC A/53), as found in its first packets.
    pub captions: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackKind {
    Video,
    Audio,
    Subtitle,
    Data,
    Attachment,
}

impl TrackKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Video => "video",
            Self::Audio => "audio",
            Self::Subtitle => "subtitle",
            Self::Data => "data",
            Self::Attachment => "attachment",
        }
    }
}

/// A source stream other than the video being transcoded.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackInfo {
    pub index: usize,
    pub kind: TrackKind,
    pub codec: String,
    /// The language tag as the source has it (`eng`, `fre`...); `None` when absent or `und`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub default: bool,
    pub forced: bool,
    /// This FFmpeg has a decoder for it.
    pub decodable: bool,
    /// Subtitles: text (SRT, ASS, mov_text, WebVTT) rather than bitmaps (PGS, DVB, VobSub).
    pub text: bool,
    /// A cover image or thumbnail stored as a video stream.
    pub attached_picture: bool,
    pub channels: u32,
    pub sample_rate: u32,
    pub time_base: (i32, i32),
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Keyframe {
    /// Timestamp to seek to (the container index's own timestamp, in the stream time base).
    pub seek_ts: i64,
    /// Presentation timestamp, where known without reading the packet.
    pub pts: Option<i64>,
    /// Seconds from the input's start (approximate; for planning).
    pub time: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    pub index: usize,
    pub kind: String,
    pub codec: String,
}

pub(crate) fn rat(r: Rational) -> (i32, i32) {
    (r.numerator(), r.denominator())
}

pub(crate) fn secs(ts: i64, tb: (i32, i32)) -> f64 {
    ts as f64 * tb.0 as f64 / tb.1 as f64
}

/// An open input: a local file, or an S3 object read through ranged GETs (named by its `s3://` URI, which the
/// engine carries in the same `Path` as a file name). Derefs to FFmpeg's input context.
pub struct Input {
    ctx: format::context::Input,
    /// Where the S3 reader leaves the error that stopped it (FFmpeg only sees "I/O error").
    io_error: Option<Arc<Mutex<Option<Error>>>>,
    pub size: u64,
}

impl std::ops::Deref for Input {
    type Target = format::context::Input;
    fn deref(&self) -> &Self::Target {
        &self.ctx
    }
}

impl std::ops::DerefMut for Input {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.ctx
    }
}

impl Input {
    /// The storage error that ended reading early, if one did. Demuxing stops at such an error as if at the
    /// end of the input: callers check here after their packet loop so it is never mistaken for the end.
    pub fn check(&self) -> Result<()> {
        match self
            .io_error
            .as_ref()
            .and_then(|s| s.lock().unwrap_or_else(|p| p.into_inner()).take())
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// An S3 reader that keeps its first error where the engine can find it.
struct TrackedReader {
    inner: S3Reader,
    slot: Arc<Mutex<Option<Error>>>,
}

impl Read for TrackedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| {
            if let Some(e) = self.inner.take_error() {
                self.slot
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
        })
    }
}

impl Seek for TrackedReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(to)
    }
}

/// Open an input for demuxing, with errors that name the file or object.
pub fn open_input(path: &Path) -> Result<Input> {
    avlog::init();
    let name = path.to_string_lossy();
    if s3::is_s3(&name) {
        return open_s3(&name);
    }
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    if meta.is_dir() {
        return Err(Error::media(path, "cannot open", "is a directory"));
    }
    if meta.len() == 0 {
        return Err(Error::media(path, "cannot open", "file is empty (0 bytes)"));
    }
    let (res, lines) = avlog::capture(|| format::input(&path));
    let ctx = res
        .map_err(|e| Error::media(path, "not a readable media file", avlog::explain(e, &lines)))?;
    Ok(Input {
        ctx,
        io_error: None,
        size: meta.len(),
    })
}

fn open_s3(name: &str) -> Result<Input> {
    let uri = S3Uri::parse(name).ok_or_else(|| Error::Field {
        field: "spec.input.uri".into(),
        message: format!("{name:?}: expected s3://bucket/key"),
    })?;
    let reader = S3Reader::open(s3::global(), uri)?;
    let size = reader.size();
    if size == 0 {
        return Err(Error::media(
            name,
            "cannot open",
            "object is empty (0 bytes)",
        ));
    }
    let slot = Arc::new(Mutex::new(None));
    let io = format::context::StreamIo::from_read_seek_with_capacity(
        TrackedReader {
            inner: reader,
            slot: slot.clone(),
        },
        64 << 10,
    )
    .map_err(|e| Error::media(name, "custom I/O", e))?;
    let (res, lines) = avlog::capture(|| format::input_from_stream(io, Some(name), None));
    match res {
        Ok(ctx) => Ok(Input {
            ctx,
            io_error: Some(slot),
            size,
        }),
        Err(e) => Err(slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| {
                Error::media(name, "not a readable media file", avlog::explain(e, &lines))
            })),
    }
}

/// Probe an input file.
/// What the container header says (streams, sizes, time bases, colour, duration), without the keyframe index
/// or a packet scan: what a task of a planned job needs to seek and decode. `frames` is the header's count
/// (or duration × frame rate), `vfr` false and `keyframes` empty: the plan has the real ones.
pub fn header(path: &Path) -> Result<ProbeInfo> {
    Ok(read_header(path)?.1)
}

/// The input's keyframes, exact frame count and timing, from the container index or, without one, a scan of
/// its packets (demux only): what planning needs.
pub fn probe(path: &Path) -> Result<ProbeInfo> {
    let (mut ictx, mut info, nb_frames) = read_header(path)?;
    let (vindex, vtb, start_time, format) = (
        info.video.index,
        info.video.time_base,
        info.start_time,
        info.format.clone(),
    );
    // Keyframes and per-sample timing from the container index. Matroska reads its cues lazily, on the
    // first seek: seeking to the start loads them without reading the clusters.
    let (mut keyframes, mut samples) = index_entries(&ictx, vindex, vtb, start_time);
    if keyframes.len() < 2 && format.contains("matroska") && rewind(&mut ictx, vindex) {
        (keyframes, samples) = index_entries(&ictx, vindex, vtb, start_time);
    }
    let mut keyframe_source = "container index";
    let mut frames_exact = false;
    let mut frames = 0u64;
    let mut sample_ts: Vec<i64> = Vec::new();
    // A full sample table (MP4) has non-keyframe entries, or as many entries as the stream has frames;
    // Matroska cues list keyframes only.
    let full_table =
        samples.len() > keyframes.len() || (nb_frames > 0 && samples.len() as i64 == nb_frames);
    if samples.len() > 1 && full_table && (nb_frames == 0 || samples.len() as i64 == nb_frames) {
        // The index lists every sample (MP4/MOV): exact frame count and timing without reading packets.
        frames = samples.len() as u64;
        frames_exact = true;
        sample_ts = samples;
    } else if keyframes.len() < 2 {
        // No usable index (MPEG-TS, raw streams, MKV without cues): scan packets, demuxing only.
        let scan = scan_packets(&mut ictx, vindex, vtb, start_time, path)?;
        ictx.check()?;
        keyframes = scan.keyframes;
        frames = scan.pts.len() as u64;
        frames_exact = true;
        sample_ts = scan.pts;
        keyframe_source = "packet scan";
    }
    // A damaged index can list keyframes out of order or with nonsense times; the planner needs them in time
    // order (found by fuzzing: an unordered index made the planner loop).
    keyframes.retain(|k| k.time.is_finite());
    keyframes.sort_by(|a, b| a.time.total_cmp(&b.time));
    keyframes.dedup_by_key(|k| k.seek_ts);
    if sample_ts.is_empty() {
        // The index lists keyframes only (Matroska cues): frame timing from the first packets, demux only.
        rewind(&mut ictx, vindex);
        sample_ts = ictx
            .packets()
            .filter(|(s, _)| s.index() == vindex)
            .filter_map(|(_, p)| p.pts().or(p.dts()))
            .take(600)
            .collect();
        ictx.check()?;
    }
    if frames == 0 {
        frames = info.video.frames;
    }
    let vfr = if sample_ts.len() > 2 {
        is_vfr(&mut sample_ts)
    } else {
        false
    };

    // HDR metadata carried only in the bitstream (SEI): the first frame tells, for PQ sources.
    if info.video.color.2 == ff::color::TransferCharacteristic::SMPTE2084
        && info.video.hdr.is_none_or(|h| h.mastering.is_none())
    {
        let (hdr, plus) = first_frame_hdr(&mut ictx, vindex, path)?;
        if hdr.mastering.is_some() || hdr.content_light.is_some() {
            info.video.hdr = Some(hdr);
        }
        if plus {
            info.video.dynamic_hdr.push("HDR10+");
        }
    }
    info.video.captions = has_a53_captions(&mut ictx, vindex, info.video.codec_id)?;
    info.video.frames = frames;
    info.video.frames_exact = frames_exact;
    info.video.vfr = vfr;
    info.keyframes = keyframes;
    info.keyframe_source = keyframe_source;
    Ok(info)
}

/// The open input, what its header says, and the header's frame count (0 when it has none).
fn read_header(path: &Path) -> Result<(Input, ProbeInfo, i64)> {
    let ictx = open_input(path)?;
    let bytes = ictx.size;
    let streams: Vec<StreamSummary> = ictx
        .streams()
        .map(|s| {
            let p = s.parameters();
            StreamSummary {
                index: s.index(),
                kind: format!("{:?}", p.medium()).to_lowercase(),
                codec: p.id().name().to_string(),
            }
        })
        .collect();

    let vstream = ictx
        .streams()
        .filter(|s| s.parameters().medium() == media::Type::Video)
        // SAFETY: reading a plain field of a stream owned by the open context.
        .find(|s| unsafe { (*s.as_ptr()).disposition } & ffi::AV_DISPOSITION_ATTACHED_PIC == 0)
        .ok_or_else(|| Error::NoVideo {
            path: path.into(),
            found: if streams.is_empty() {
                "none".into()
            } else {
                streams
                    .iter()
                    .map(|s| format!("#{} {} {}", s.index, s.kind, s.codec))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let vindex = vstream.index();
    let vtb = rat(vstream.time_base());
    let par = vstream.parameters();
    // SAFETY: codecpar is valid for the lifetime of the stream.
    let (width, height, fmt_raw) = unsafe {
        let p = &*par.as_ptr();
        (p.width.max(0) as u32, p.height.max(0) as u32, p.format)
    };
    if par.id() == ff::codec::Id::None || ff::decoder::find(par.id()).is_none() {
        return Err(Error::media(
            path,
            "unsupported video codec",
            format!("stream #{vindex}: {}", par.id().name()),
        ));
    }
    if width == 0 || height == 0 || width > 16384 || height > 16384 {
        return Err(Error::media(
            path,
            "implausible video dimensions",
            format!("{width}x{height}"),
        ));
    }
    let pix = ff::format::Pixel::from(
        // SAFETY: the value came from FFmpeg as an AVPixelFormat.
        unsafe { std::mem::transmute::<i32, ffi::AVPixelFormat>(fmt_raw) },
    );
    // SAFETY: descriptors are static tables in libavutil.
    let bit_depth = pix
        .descriptor()
        .map(|d| unsafe { (*d.as_ptr()).comp[0].depth as u8 })
        .unwrap_or(8);
    let pix_fmt = pix
        .descriptor()
        .map(|d| d.name().to_string())
        .unwrap_or_else(|| "unknown".into());

    let mut fps = rat(vstream.avg_frame_rate());
    if fps.0 <= 0 || fps.1 <= 0 {
        fps = rat(vstream.rate());
    }
    // SAFETY: side data lookups on a valid stream; the matrix is 9 i32s when present.
    let display_matrix = unsafe {
        let mut size: usize = 0;
        let p = ffi::av_stream_get_side_data(
            vstream.as_ptr(),
            ffi::AVPacketSideDataType::AV_PKT_DATA_DISPLAYMATRIX,
            &mut size,
        );
        (!p.is_null() && size >= 36).then(|| {
            let mut m = [0i32; 9];
            std::ptr::copy_nonoverlapping(p as *const i32, m.as_mut_ptr(), 9);
            m
        })
    };
    let rotation = display_matrix
        // SAFETY: m is a 3x3 matrix as FFmpeg expects.
        .map(|m| unsafe { ffi::av_display_rotation_get(m.as_ptr()) })
        .filter(|r| r.is_finite())
        .map(|r| if r == 0.0 { 0.0 } else { r })
        .unwrap_or(0.0);
    // SAFETY: plain codecpar fields of an open stream.
    let (color, sar) = unsafe {
        let p = &*par.as_ptr();
        (
            (
                p.color_range.into(),
                p.color_primaries.into(),
                p.color_trc.into(),
                p.color_space.into(),
            ),
            Rational::from(p.sample_aspect_ratio),
        )
    };
    let sar = if sar.numerator() > 0 && sar.denominator() > 0 {
        sar
    } else {
        Rational::new(1, 1)
    };
    // SAFETY: reading plain fields.
    let (has_b_frames, nb_frames) = unsafe {
        (
            (*par.as_ptr()).video_delay > 0,
            (*vstream.as_ptr()).nb_frames,
        )
    };

    let tracks: Vec<TrackInfo> = ictx
        .streams()
        .filter(|s| s.index() != vindex)
        .map(track_info)
        .collect();

    // SAFETY: plain field of the open context.
    let raw_start = unsafe { (*ictx.as_ptr()).start_time };
    let start_time = if raw_start == ffi::AV_NOPTS_VALUE {
        0.0
    } else {
        raw_start as f64 / 1e6
    };
    let duration = if ictx.duration() > 0 {
        ictx.duration() as f64 / 1e6
    } else {
        0.0
    };
    let format = ictx.format().name().to_string();

    let frames = if nb_frames > 0 {
        nb_frames as u64
    } else {
        (duration * fps.0 as f64 / fps.1 as f64).round() as u64
    };
    let info = ProbeInfo {
        path: path.into(),
        format,
        bytes,
        duration,
        start_time,
        video: VideoInfo {
            index: vindex,
            codec: par.id().name().to_string(),
            width,
            height,
            pix_fmt,
            bit_depth,
            time_base: vtb,
            fps,
            frames,
            frames_exact: false,
            vfr: false,
            rotation,
            display_matrix,
            has_b_frames,
            codec_id: par.id(),
            color,
            sar,
            // SAFETY: the stream belongs to the open context.
            hdr: unsafe { stream_hdr(vstream.as_ptr()) },
            dynamic_hdr: {
                // SAFETY: side data lookup on a valid stream.
                let dovi = unsafe {
                    let mut size = 0usize;
                    !ffi::av_stream_get_side_data(
                        vstream.as_ptr(),
                        ffi::AVPacketSideDataType::AV_PKT_DATA_DOVI_CONF,
                        &mut size,
                    )
                    .is_null()
                };
                if dovi {
                    vec!["Dolby Vision"]
                } else {
                    Vec::new()
                }
            },
            captions: false,
        },
        tracks,
        keyframes: Vec::new(),
        keyframe_source: "container header",
        streams,
    };
    Ok((ictx, info, nb_frames))
}

fn track_info(s: ff::format::stream::Stream<'_>) -> TrackInfo {
    let p = s.parameters();
    let meta = s.metadata();
    let tag = |k: &str| {
        meta.get(k)
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    // SAFETY: plain fields of a stream and its parameters, owned by the open context; the descriptor is a
    // static table.
    let (disposition, channels, sample_rate, props) = unsafe {
        let d = ffi::avcodec_descriptor_get((*p.as_ptr()).codec_id);
        (
            (*s.as_ptr()).disposition,
            (*p.as_ptr()).ch_layout.nb_channels,
            (*p.as_ptr()).sample_rate,
            if d.is_null() { 0 } else { (*d).props },
        )
    };
    let kind = match p.medium() {
        media::Type::Video => TrackKind::Video,
        media::Type::Audio => TrackKind::Audio,
        media::Type::Subtitle => TrackKind::Subtitle,
        media::Type::Attachment => TrackKind::Attachment,
        _ => TrackKind::Data,
    };
    TrackInfo {
        index: s.index(),
        kind,
        codec: p.id().name().to_string(),
        language: tag("language").filter(|l| !l.eq_ignore_ascii_case("und")),
        title: tag("title"),
        default: disposition & ffi::AV_DISPOSITION_DEFAULT != 0,
        forced: disposition & ffi::AV_DISPOSITION_FORCED != 0,
        decodable: p.id() != ff::codec::Id::None && ff::decoder::find(p.id()).is_some(),
        text: props & ffi::AV_CODEC_PROP_TEXT_SUB != 0,
        attached_picture: disposition & ffi::AV_DISPOSITION_ATTACHED_PIC != 0,
        channels: channels.max(0) as u32,
        sample_rate: sample_rate.max(0) as u32,
        time_base: rat(s.time_base()),
    }
}

/// libavutil's `AVMasteringDisplayMetadata` (mastering_display_metadata.h, which the bindings leave out).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawMastering {
    /// R, G, B; x then y.
    pub display_primaries: [[ffi::AVRational; 2]; 3],
    pub white_point: [ffi::AVRational; 2],
    pub min_luminance: ffi::AVRational,
    pub max_luminance: ffi::AVRational,
    pub has_primaries: i32,
    pub has_luminance: i32,
}

/// libavutil's `AVContentLightMetadata`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawContentLight {
    pub max_cll: u32,
    pub max_fall: u32,
}

fn ratio(r: ffi::AVRational) -> f64 {
    if r.den == 0 {
        0.0
    } else {
        f64::from(r.num) / f64::from(r.den)
    }
}

/// # Safety
/// `m` must point to valid mastering display metadata.
unsafe fn mastering(m: *const RawMastering) -> Option<tessera_crds::work::MasteringDisplay> {
    // SAFETY: the caller guarantees `m` is valid.
    let m = unsafe { &*m };
    (m.has_primaries != 0 && m.has_luminance != 0).then(|| tessera_crds::work::MasteringDisplay {
        primaries: [0, 1, 2].map(|i| {
            [
                ratio(m.display_primaries[i][0]),
                ratio(m.display_primaries[i][1]),
            ]
        }),
        white_point: [ratio(m.white_point[0]), ratio(m.white_point[1])],
        max_luminance: ratio(m.max_luminance),
        min_luminance: ratio(m.min_luminance),
    })
}

/// # Safety
/// `c` must point to valid content light metadata.
unsafe fn content_light(c: *const RawContentLight) -> Option<tessera_crds::work::ContentLight> {
    // SAFETY: the caller guarantees `c` is valid.
    let c = unsafe { &*c };
    (c.max_cll > 0 || c.max_fall > 0).then_some(tessera_crds::work::ContentLight {
        max_cll: c.max_cll,
        max_fall: c.max_fall,
    })
}

/// HDR10 metadata the container carries for a stream (Matroska's colour elements, MP4's mdcv/clli).
///
/// # Safety
/// `st` must be a stream of an open input.
unsafe fn stream_hdr(st: *const ffi::AVStream) -> Option<tessera_crds::work::HdrStatic> {
    /// The stream's side data of `kind` when it holds at least a `T`.
    unsafe fn get<T>(
        st: *const ffi::AVStream,
        kind: ffi::AVPacketSideDataType,
    ) -> Option<*const T> {
        let mut size = 0usize;
        // SAFETY: a side data lookup on a valid stream (the caller's guarantee).
        let p = unsafe { ffi::av_stream_get_side_data(st, kind, &mut size) };
        (!p.is_null() && size >= std::mem::size_of::<T>()).then_some(p as *const T)
    }
    // SAFETY: the pointers come from `get`, which checked their sizes.
    unsafe {
        let mastering = get::<RawMastering>(
            st,
            ffi::AVPacketSideDataType::AV_PKT_DATA_MASTERING_DISPLAY_METADATA,
        )
        .and_then(|m| mastering(m));
        let content_light = get::<RawContentLight>(
            st,
            ffi::AVPacketSideDataType::AV_PKT_DATA_CONTENT_LIGHT_LEVEL,
        )
        .and_then(|c| content_light(c));
        (mastering.is_some() || content_light.is_some()).then_some(tessera_crds::work::HdrStatic {
            mastering,
            content_light,
        })
    }
}

/// Seek back to the start of the video stream (loading Matroska's cues on the way); false if it failed.
fn rewind(ictx: &mut Input, vindex: usize) -> bool {
    // SAFETY: seeking an open input context.
    unsafe {
        ffi::av_seek_frame(
            ictx.as_mut_ptr(),
            vindex as i32,
            i64::MIN + 1,
            ffi::AVSEEK_FLAG_BACKWARD,
        ) >= 0
    }
}

/// How many of the first video packets, and at most how many of their bytes, are searched for captions: A/53
/// data rides in (nearly) every frame where a programme has it, and the probe must stay a small read of a
/// large object (the S3 tests hold it under 1 % of a 2 GiB input).
const CAPTION_SCAN_PACKETS: usize = 300;
const CAPTION_SCAN_BYTES: usize = 2 << 20;

/// Whether the first video packets carry ATSC A/53 caption data: the ITU-T T.35 prefix of a
/// `user_data_registered` SEI (country 0xB5, provider 0x0031) followed by `GA94`. Demux only; codecs that
/// carry A/53 in SEI or user data (H.264, HEVC, MPEG-2) are searched.
fn has_a53_captions(ictx: &mut Input, vindex: usize, codec: ff::codec::Id) -> Result<bool> {
    use ff::codec::Id;
    if !matches!(codec, Id::H264 | Id::HEVC | Id::MPEG2VIDEO) {
        return Ok(false);
    }
    rewind(ictx, vindex);
    let mut read = 0usize;
    let found = ictx
        .packets()
        .filter(|(s, _)| s.index() == vindex)
        .take(CAPTION_SCAN_PACKETS)
        .take_while(|(_, p)| {
            read += p.size();
            read <= CAPTION_SCAN_BYTES
        })
        .any(|(_, p)| p.data().is_some_and(a53_marker));
    ictx.check()?;
    Ok(found)
}

/// The A/53 marker in a packet: `B5 00 31 'G' 'A' '9' '4'` (H.264/HEVC SEI) or `00 00 01 B2 'G' 'A' '9' '4'
/// 03` (MPEG-2 user data).
pub(crate) fn a53_marker(data: &[u8]) -> bool {
    data.windows(7)
        .any(|w| w == [0xB5, 0x00, 0x31, b'G', b'A', b'9', b'4'])
        || data
            .windows(9)
            .any(|w| w[..4] == [0, 0, 1, 0xB2] && w[4..8] == *b"GA94" && w[8] == 3)
}

/// Decode the first video frame for the HDR metadata its SEI carries: (static metadata, HDR10+ present).
fn first_frame_hdr(
    ictx: &mut Input,
    vindex: usize,
    path: &Path,
) -> Result<(tessera_crds::work::HdrStatic, bool)> {
    rewind(ictx, vindex);
    let par = ictx
        .stream(vindex)
        .ok_or_else(|| Error::media(path, "stream vanished", vindex))?
        .parameters();
    let mut dec = ff::codec::context::Context::from_parameters(par)
        .and_then(|c| c.decoder().video())
        .map_err(|e| Error::media(path, "cannot open the video decoder", e))?;
    let mut frame = ff::frame::Video::empty();
    let mut out = (tessera_crds::work::HdrStatic::default(), false);
    let mut sent = 0;
    for (s, p) in ictx.packets() {
        if s.index() != vindex {
            continue;
        }
        sent += 1;
        if dec.send_packet(&p).is_err() && sent > 50 {
            break;
        }
        if dec.receive_frame(&mut frame).is_ok() {
            // SAFETY: side data lookups on a decoded frame we own.
            unsafe {
                let f = frame.as_ptr();
                let m = ffi::av_frame_get_side_data(
                    f,
                    ffi::AVFrameSideDataType::AV_FRAME_DATA_MASTERING_DISPLAY_METADATA,
                );
                if !m.is_null() {
                    out.0.mastering = mastering((*m).data as *const _);
                }
                let c = ffi::av_frame_get_side_data(
                    f,
                    ffi::AVFrameSideDataType::AV_FRAME_DATA_CONTENT_LIGHT_LEVEL,
                );
                if !c.is_null() {
                    out.0.content_light = content_light((*c).data as *const _);
                }
                out.1 = !ffi::av_frame_get_side_data(
                    f,
                    ffi::AVFrameSideDataType::AV_FRAME_DATA_DYNAMIC_HDR_PLUS,
                )
                .is_null();
            }
            break;
        }
        if sent > 50 {
            break;
        }
    }
    ictx.check()?;
    Ok(out)
}

/// (keyframes, timestamps of every non-discarded sample) from the stream's index.
fn index_entries(
    ictx: &format::context::Input,
    vindex: usize,
    tb: (i32, i32),
    start: f64,
) -> (Vec<Keyframe>, Vec<i64>) {
    let mut keys = Vec::new();
    let mut all = Vec::new();
    // SAFETY: the index belongs to the stream of the open context; entries are read, never kept.
    unsafe {
        let st = *(*ictx.as_ptr()).streams.add(vindex);
        let n = ffi::avformat_index_get_entries_count(st);
        for i in 0..n {
            let e = ffi::avformat_index_get_entry(st, i);
            if e.is_null() {
                continue;
            }
            let e = &*e;
            let flags = e.flags();
            if flags & ffi::AVINDEX_DISCARD_FRAME != 0 {
                continue;
            }
            all.push(e.timestamp);
            if flags & ffi::AVINDEX_KEYFRAME != 0 {
                keys.push(Keyframe {
                    seek_ts: e.timestamp,
                    pts: None,
                    time: secs(e.timestamp, tb) - start,
                });
            }
        }
    }
    (keys, all)
}

struct Scan {
    keyframes: Vec<Keyframe>,
    pts: Vec<i64>,
}

fn scan_packets(
    ictx: &mut Input,
    vindex: usize,
    tb: (i32, i32),
    start: f64,
    path: &Path,
) -> Result<Scan> {
    let mut keyframes = Vec::new();
    let mut pts = Vec::new();
    for (stream, packet) in ictx.packets() {
        if stream.index() != vindex {
            continue;
        }
        let Some(p) = packet.pts().or(packet.dts()) else {
            continue;
        };
        pts.push(p);
        if packet.is_key() {
            keyframes.push(Keyframe {
                seek_ts: packet.dts().unwrap_or(p),
                pts: Some(p),
                time: secs(p, tb) - start,
            });
        }
    }
    ictx.check()?;
    if pts.is_empty() {
        return Err(Error::media(
            path,
            "no video packets",
            "the video stream holds no data (truncated or corrupt file?)",
        ));
    }
    Ok(Scan { keyframes, pts })
}

/// Variable frame rate: frame intervals that differ by more than rounding allows.
pub(crate) fn is_vfr(ts: &mut [i64]) -> bool {
    ts.sort_unstable();
    let deltas: Vec<i64> = ts
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 0)
        .collect();
    let (Some(min), Some(max)) = (deltas.iter().min(), deltas.iter().max()) else {
        return false;
    };
    // Timestamps rounded to a coarse time base (e.g. 1 ms in Matroska) jitter by one tick.
    max - min > 1 && (max - min) as f64 > 0.02 * *min as f64
}

#[cfg(test)]
mod tests {
    use super::is_vfr;

    #[test]
    fn cfr_and_rounded_cfr_are_not_vfr() {
        let mut cfr: Vec<i64> = (0..100).map(|i| i * 512).collect();
        assert!(!is_vfr(&mut cfr));
        // 29.97 fps in a 1 ms time base: 33 and 34 ms intervals.
        let mut ms: Vec<i64> = (0..100)
            .map(|i| (i as f64 * 1001.0 / 30.0).round() as i64)
            .collect();
        assert!(!is_vfr(&mut ms));
    }

    #[test]
    fn mixed_intervals_are_vfr_even_when_out_of_order() {
        let mut v: Vec<i64> = (0..50)
            .map(|i| i * 40)
            .chain((0..50).map(|i| 2000 + i * 20))
            .collect();
        v.reverse();
        assert!(is_vfr(&mut v));
    }
}
