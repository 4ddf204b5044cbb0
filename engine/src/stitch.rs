//! The stitcher: chunk bitstreams and the audio track, concatenated losslessly into the final container.
//! Outputs are written under a hidden temporary name and renamed into place only when complete.

use std::path::{Path, PathBuf};

use ffmpeg_next::{self as ff, ffi, format, Dictionary, Rational};
use serde::Serialize;

use crate::avlog;
use crate::error::{Error, Result};
use crate::packets::{PacketReader, StoredPacket, StreamParams};
use crate::probe::TrackInfo;
use crate::subtitles::{self, TextCodec};
use tessera_crds::OutputStream;

pub struct StitchInput<'a> {
    pub chunks: &'a [PathBuf],
    /// The audio tracks, in output order.
    pub audio: Vec<AudioIn<'a>>,
    /// The text subtitle tracks (packet files of the source's subtitles), in output order.
    pub subtitles: Vec<SubtitleIn<'a>>,
    pub display_matrix: Option<[i32; 9]>,
    /// The source's video stream.
    pub video_index: usize,
}

/// An encoded audio track and the source track it came from.
pub struct AudioIn<'a> {
    pub path: PathBuf,
    pub track: &'a TrackInfo,
    pub default: bool,
}

/// A source subtitle track's packets.
pub struct SubtitleIn<'a> {
    pub path: PathBuf,
    pub track: &'a TrackInfo,
}

/// How an output stream is labelled.
#[derive(Debug, Clone, Default)]
struct Label {
    /// The source stream it was made from.
    source: usize,
    language: Option<String>,
    title: Option<String>,
    default: bool,
    forced: bool,
}

impl Label {
    fn of(t: &TrackInfo, default: bool) -> Self {
        Self {
            source: t.index,
            language: t.language.clone(),
            title: t.title.clone(),
            default,
            forced: t.forced,
        }
    }
}

/// Where a stream's packets come from.
enum Source<'a> {
    Video(ChunkSequence<'a>),
    File(PacketReader),
    Memory(std::vec::IntoIter<StoredPacket>),
}

impl Source<'_> {
    /// The next packet and whether it starts a chunk.
    fn next(&mut self) -> Result<Option<(StoredPacket, bool)>> {
        match self {
            Self::Video(v) => v.next(),
            Self::File(r) => Ok(r.next_packet()?.map(|p| (p, false))),
            Self::Memory(it) => Ok(it.next().map(|p| (p, false))),
        }
    }
}

/// One output stream: parameters, label, packets.
struct Track<'a> {
    params: StreamParams,
    label: Label,
    source: Source<'a>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Stitched {
    /// The mp4 file, or the media playlist for hls.
    pub path: PathBuf,
    pub frames: u64,
    pub duration: f64,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    /// RFC 6381 codec string where known (`avc1.64001f,mp4a.40.2`).
    pub codecs: Option<String>,
    pub peak_bandwidth: u64,
    /// Every stream in the output.
    #[serde(skip)]
    pub streams: Vec<OutputStream>,
    /// Segment start times in seconds (segmented outputs), and the end of the last.
    #[serde(skip)]
    pub segment_starts: Vec<f64>,
}

/// Removes a path on drop unless disarmed: failed runs leave nothing half-written.
pub(crate) struct Cleanup(pub Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Video packets of all chunks in order, checking that every chunk was encoded with identical parameters.
struct ChunkSequence<'a> {
    files: &'a [PathBuf],
    next: usize,
    cur: Option<PacketReader>,
    params: StreamParams,
    chunk_start: bool,
}

impl<'a> ChunkSequence<'a> {
    fn open(files: &'a [PathBuf]) -> Result<Self> {
        let first = files.first().ok_or_else(|| Error::Chunk {
            chunk: 0,
            detail: "no chunks to stitch".into(),
        })?;
        let r = PacketReader::open(first)?;
        let params = r.params.clone();
        Ok(Self {
            files,
            next: 1,
            cur: Some(r),
            params,
            chunk_start: true,
        })
    }

    /// The next packet and whether it starts a chunk.
    fn next(&mut self) -> Result<Option<(StoredPacket, bool)>> {
        loop {
            let Some(r) = self.cur.as_mut() else {
                return Ok(None);
            };
            if let Some(p) = r.next_packet()? {
                let start = std::mem::replace(&mut self.chunk_start, false);
                if start && !p.key {
                    return Err(Error::Chunk {
                        chunk: self.next - 1,
                        detail: "does not start with a keyframe".into(),
                    });
                }
                return Ok(Some((p, start)));
            }
            self.cur = None;
            if let Some(f) = self.files.get(self.next) {
                let r = PacketReader::open(f)?;
                if r.params.extradata != self.params.extradata
                    || r.params.width != self.params.width
                {
                    return Err(Error::Chunk {
                        chunk: self.next,
                        detail: "was encoded with different codec parameters than chunk 0; chunks cannot be joined".into(),
                    });
                }
                self.cur = Some(r);
                self.next += 1;
                self.chunk_start = true;
            }
        }
    }
}

fn tb(r: (i32, i32)) -> Rational {
    Rational::new(r.0, r.1)
}

fn mux_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::media(path, what, e)
}

/// The output streams of a stitch: the video, then `audio` and `subtitles` as the container carries them.
fn tracks<'a>(
    input: &'a StitchInput<'a>,
    with_video: bool,
    audio: &[usize],
    subtitles: Option<TextCodec>,
) -> Result<Vec<Track<'a>>> {
    let mut out = Vec::new();
    if with_video {
        let video = ChunkSequence::open(input.chunks)?;
        out.push(Track {
            params: video.params.clone(),
            label: Label {
                source: input.video_index,
                ..Label::default()
            },
            source: Source::Video(video),
        });
    }
    for &i in audio {
        let a = &input.audio[i];
        let r = PacketReader::open(&a.path)?;
        out.push(Track {
            params: r.params.clone(),
            label: Label::of(a.track, a.default),
            source: Source::File(r),
        });
    }
    if let Some(codec) = subtitles {
        for s in &input.subtitles {
            let c = subtitles::convert(&s.path, codec)?;
            out.push(Track {
                params: c.params,
                label: Label::of(s.track, false),
                source: Source::Memory(c.cues.into_iter()),
            });
        }
    }
    Ok(out)
}

/// Codec name for reports.
fn codec_name(p: &StreamParams) -> String {
    // SAFETY: codec ids were read from FFmpeg.
    unsafe {
        let id = std::mem::transmute::<u32, ffi::AVCodecID>(p.codec_id);
        std::ffi::CStr::from_ptr(ffi::avcodec_get_name(id))
            .to_string_lossy()
            .into_owned()
    }
}

/// Mux `tracks` into `octx` (already created). With `cut_at_chunks`, only chunk starts are marked as
/// keyframes so segmenting muxers cut exactly at chunk boundaries, and only the video's (or, without video,
/// the first stream's) packets decide where segments start.
fn mux(
    mut tracks: Vec<Track<'_>>,
    octx: &mut format::context::Output,
    out_path: &Path,
    opts: Dictionary,
    cut_at_chunks: bool,
    display_matrix: Option<[i32; 9]>,
) -> Result<Stitched> {
    let mp4_language = octx.format().name().contains("mp4");
    // SAFETY: streams are created on the output context we own and filled before the header is written.
    unsafe {
        for (i, t) in tracks.iter().enumerate() {
            let st = ffi::avformat_new_stream(octx.as_mut_ptr(), std::ptr::null());
            if st.is_null() {
                return Err(mux_err(out_path, "cannot add stream", i));
            }
            t.params.to_raw((*st).codecpar);
            (*st).time_base = tb(t.params.time_base).into();
            let l = &t.label;
            let set = |k: &str, v: &str| {
                let (k, v) = (
                    std::ffi::CString::new(k).expect("key"),
                    std::ffi::CString::new(v.replace('\0', "")).expect("no NUL"),
                );
                ffi::av_dict_set(&mut (*st).metadata, k.as_ptr(), v.as_ptr(), 0);
            };
            if let Some(lang) = &l.language {
                // MP4 stores ISO 639-2/T; others take the tag as the source has it.
                let tag = if mp4_language {
                    tessera_crds::streams::iso639_2(lang).unwrap_or_else(|| lang.clone())
                } else {
                    lang.clone()
                };
                set("language", &tag);
            }
            if let Some(title) = &l.title {
                set("title", title);
                set("handler_name", title);
            }
            if l.default {
                (*st).disposition |= ffi::AV_DISPOSITION_DEFAULT;
            }
            if l.forced {
                (*st).disposition |= ffi::AV_DISPOSITION_FORCED;
            }
            if i == 0 && t.params.codec_type == ffi::AVMediaType::AVMEDIA_TYPE_VIDEO as i32 {
                if let Some(m) = display_matrix {
                    let sd = ffi::av_stream_new_side_data(
                        st,
                        ffi::AVPacketSideDataType::AV_PKT_DATA_DISPLAYMATRIX,
                        36,
                    );
                    if !sd.is_null() {
                        std::ptr::copy_nonoverlapping(m.as_ptr() as *const u8, sd, 36);
                    }
                }
            }
        }
    }
    let (res, lines) = avlog::capture(|| octx.write_header_with(opts));
    res.map_err(|e| mux_err(out_path, "cannot write header", avlog::explain(e, &lines)))?;
    let out_tb: Vec<Rational> = octx.streams().map(|s| s.time_base()).collect();
    let in_tb: Vec<Rational> = tracks.iter().map(|t| tb(t.params.time_base)).collect();
    let n = tracks.len();
    let video = tracks
        .first()
        .is_some_and(|t| t.params.codec_type == ffi::AVMediaType::AVMEDIA_TYPE_VIDEO as i32);

    let mut last_dts = vec![i64::MIN; n];
    let first = tracks.first().map(|t| t.params.clone());
    let mut stats = Stitched {
        width: first.as_ref().map_or(0, |p| p.width.max(0) as u32),
        height: first.as_ref().map_or(0, |p| p.height.max(0) as u32),
        ..Default::default()
    };
    let (mut first_pts, mut end_pts) = (i64::MAX, i64::MIN);
    let mut heads: Vec<Option<(StoredPacket, bool)>> = Vec::with_capacity(n);
    for t in &mut tracks {
        heads.push(t.source.next()?);
    }
    // Audio-only segmenting: a segment starts at the first packet at or after each chunk start.
    loop {
        // Interleave by DTS so the muxer never buffers much.
        let mut pick: Option<usize> = None;
        for (i, h) in heads.iter().enumerate() {
            let Some((p, _)) = h else { continue };
            pick = match pick {
                None => Some(i),
                Some(j) => {
                    let (q, _) = heads[j].as_ref().expect("picked head");
                    // SAFETY: pure arithmetic.
                    let earlier = unsafe {
                        ffi::av_compare_ts(p.dts, in_tb[i].into(), q.dts, in_tb[j].into()) < 0
                    };
                    Some(if earlier { i } else { j })
                }
            };
        }
        let Some(idx) = pick else { break };
        let (sp, start) = heads[idx].take().expect("picked head");
        heads[idx] = tracks[idx].source.next()?;
        let key = if idx == 0 && video {
            stats.frames += 1;
            first_pts = first_pts.min(sp.pts);
            end_pts = end_pts.max(sp.pts + sp.duration);
            if start {
                stats
                    .segment_starts
                    .push(sp.pts as f64 * f64::from(in_tb[0]));
            }
            if cut_at_chunks {
                start
            } else {
                sp.key
            }
        } else {
            sp.key
        };
        let mut pkt = sp.to_packet();
        pkt.set_flags(if key {
            ff::packet::Flags::KEY
        } else {
            ff::packet::Flags::empty()
        });
        pkt.set_stream(idx);
        pkt.rescale_ts(in_tb[idx], out_tb[idx]);
        // Seams must keep DTS strictly increasing; encoders with reordering delay can meet at one tick.
        let dts = pkt.dts().unwrap_or(0);
        if dts <= last_dts[idx] {
            let fixed = last_dts[idx] + 1;
            tracing::debug!(stream = idx, dts, fixed, "dts adjusted at a seam");
            pkt.set_dts(Some(fixed));
            if pkt.pts().is_some_and(|p| p < fixed) {
                return Err(Error::Chunk {
                    chunk: 0,
                    detail: format!(
                        "timestamps overlap at a seam (pts {:?} < dts {fixed})",
                        pkt.pts()
                    ),
                });
            }
        }
        last_dts[idx] = pkt.dts().unwrap_or(0);
        let (res, lines) = avlog::capture(|| pkt.write_interleaved(octx));
        res.map_err(|e| mux_err(out_path, "cannot write packet", avlog::explain(e, &lines)))?;
    }
    let (res, lines) = avlog::capture(|| octx.write_trailer());
    res.map_err(|e| mux_err(out_path, "cannot finish", avlog::explain(e, &lines)))?;
    if stats.frames > 0 {
        stats.duration = (end_pts - first_pts) as f64 * f64::from(in_tb[0]);
        stats
            .segment_starts
            .push(end_pts as f64 * f64::from(in_tb[0]));
    }
    if video {
        let audio = tracks
            .iter()
            .find(|t| t.params.codec_type == ffi::AVMediaType::AVMEDIA_TYPE_AUDIO as i32)
            .map(|t| &t.params);
        stats.codecs = codecs_string(&tracks[0].params, audio);
    } else if let Some(t) = tracks.first() {
        stats.codecs = audio_codec_string(&t.params);
    }
    stats.streams = tracks
        .iter()
        .map(|t| OutputStream {
            kind: match t.params.codec_type {
                x if x == ffi::AVMediaType::AVMEDIA_TYPE_VIDEO as i32 => "video",
                x if x == ffi::AVMediaType::AVMEDIA_TYPE_AUDIO as i32 => "audio",
                _ => "subtitle",
            }
            .into(),
            codec: codec_name(&t.params),
            source_index: t.label.source as u32,
            language: t.label.language.clone(),
            title: t.label.title.clone(),
            default: t.label.default,
            forced: t.label.forced,
            channels: (t.params.codec_type == ffi::AVMediaType::AVMEDIA_TYPE_AUDIO as i32)
                .then_some(t.params.channels.max(0) as u32),
        })
        .collect();
    Ok(stats)
}

/// The RFC 6381 string of an audio-only rendition.
fn audio_codec_string(a: &StreamParams) -> Option<String> {
    (a.codec_id == ffi::AVCodecID::AV_CODEC_ID_AAC as u32).then(|| "mp4a.40.2".to_string())
}

/// RFC 6381 codec string for the master playlist, where it can be derived from the parameters.
fn codecs_string(v: &StreamParams, a: Option<&StreamParams>) -> Option<String> {
    let video = if v.codec_id == ffi::AVCodecID::AV_CODEC_ID_H264 as u32 {
        format!("avc1.{}", h264_profile_level(&v.extradata)?)
    } else if v.codec_id == ffi::AVCodecID::AV_CODEC_ID_HEVC as u32 {
        format!("hvc1.{}", hevc_codec_suffix(&v.extradata)?)
    } else {
        return None;
    };
    match a {
        None => Some(video),
        Some(a) if a.codec_id == ffi::AVCodecID::AV_CODEC_ID_AAC as u32 => {
            Some(format!("{video},mp4a.40.2"))
        }
        Some(_) => None,
    }
}

/// `PPCCLL` (profile, constraint flags, level) from H.264 extradata in avcC or Annex B form.
fn h264_profile_level(ed: &[u8]) -> Option<String> {
    let sps: &[u8] = if ed.first() == Some(&1) {
        ed.get(1..4)?
    } else {
        // Annex B: the byte after a start code whose NAL type is 7 (SPS), then three bytes.
        let i = ed
            .windows(4)
            .position(|w| w[..3] == [0, 0, 1] && w[3] & 0x1f == 7)?;
        ed.get(i + 4..i + 7)?
    };
    Some(format!("{:02x}{:02x}{:02x}", sps[0], sps[1], sps[2]))
}

/// A finished output under its temporary name; `commit` makes it visible under the final name.
pub struct Staged {
    tmp: PathBuf,
    final_path: PathBuf,
    guard: Cleanup,
}

impl Staged {
    /// The folder being written (for folder outputs).
    pub fn folder(&self) -> &Path {
        &self.tmp
    }

    /// Where the finished output can be read before it is committed.
    pub fn staged_path(&self) -> PathBuf {
        if self.tmp.is_dir() {
            self.tmp.join("index.m3u8")
        } else {
            self.tmp.clone()
        }
    }

    pub fn commit(mut self) -> Result<()> {
        let werr = |source, path: &Path| Error::Write {
            path: path.into(),
            source,
        };
        if self.tmp.is_dir() {
            // Replace a previous output of the same name in as few steps as the filesystem allows.
            let old = self.final_path.with_file_name(format!(
                ".{}.old-{}",
                self.final_path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy(),
                std::process::id()
            ));
            if self.final_path.exists() {
                std::fs::rename(&self.final_path, &old).map_err(|e| werr(e, &self.final_path))?;
            }
            std::fs::rename(&self.tmp, &self.final_path).map_err(|e| werr(e, &self.final_path))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.final_path).map_err(|e| werr(e, &self.final_path))?;
        }
        self.guard.0 = None;
        Ok(())
    }
}

/// A folder output `<dir>/<name>` being written under a temporary name (created empty here).
pub fn staged_folder(dir: &Path, name: &str) -> Result<Staged> {
    let final_path = dir.join(name);
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|source| Error::Write {
        path: tmp.clone(),
        source,
    })?;
    Ok(Staged {
        guard: Cleanup(Some(tmp.clone())),
        tmp,
        final_path,
    })
}

/// Stitch into `<dir>/<name>.mp4` with the index at the front: the video, every audio track and every text
/// subtitle track (as `mov_text`).
pub fn stitch_mp4(input: &StitchInput<'_>, dir: &Path, name: &str) -> Result<(Stitched, Staged)> {
    let final_path = dir.join(format!("{name}.mp4"));
    let tmp = dir.join(format!(".{name}.mp4.partial-{}", std::process::id()));
    let guard = Cleanup(Some(tmp.clone()));
    let mut octx = format::output_as(&tmp, "mp4")
        .map_err(|e| Error::media(&tmp, "cannot create output", e))?;
    let mut opts = Dictionary::new();
    opts.set("movflags", "+faststart");
    let all: Vec<usize> = (0..input.audio.len()).collect();
    let tracks = tracks(input, true, &all, Some(TextCodec::MovText))?;
    let mut stats = mux(
        tracks,
        &mut octx,
        &final_path,
        opts,
        false,
        input.display_matrix,
    )?;
    drop(octx);
    stats.bytes = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
    stats.path = final_path.clone();
    Ok((
        stats,
        Staged {
            tmp,
            final_path,
            guard,
        },
    ))
}

/// Whether segments are MPEG-TS (H.264, plays everywhere) rather than fragmented MP4 (HEVC, AV1).
pub fn hls_uses_ts(input: &StitchInput<'_>) -> Result<bool> {
    Ok(PacketReader::open(&input.chunks[0])?.params.codec_id
        == ffi::AVCodecID::AV_CODEC_ID_H264 as u32)
}

/// What goes into one HLS media playlist.
pub enum HlsMedia {
    /// The video with the first audio track muxed in (one audio track, no subtitles: as before).
    Muxed,
    /// The video alone; audio and subtitles are renditions of their own.
    VideoOnly,
    /// Audio track `i` alone, segments of about `seconds`.
    Audio { track: usize, seconds: f64 },
}

/// Stitch into `<dir>/<name>/index.m3u8`; video playlists get one segment per chunk.
pub fn stitch_hls(
    input: &StitchInput<'_>,
    dir: &Path,
    name: &str,
    media: HlsMedia,
    cmaf: bool,
) -> Result<(Stitched, Staged)> {
    let staged = staged_folder(dir, name)?;
    let (tmp_dir, final_dir) = (staged.tmp.clone(), staged.final_path.clone());
    let ts = !cmaf && hls_uses_ts(input)?;
    let (seg_type, ext) = if ts {
        ("mpegts", "ts")
    } else {
        ("fmp4", "m4s")
    };
    let playlist = tmp_dir.join("index.m3u8");
    let mut octx = format::output_as(&playlist, "hls")
        .map_err(|e| Error::media(&playlist, "cannot create output", e))?;
    let mut opts = Dictionary::new();
    let (tracks, hls_time) = match media {
        // Cut at every keyframe; only chunk starts are marked as keyframes, so segments are the chunks.
        HlsMedia::Muxed => {
            let first: Vec<usize> = (0..input.audio.len().min(1)).collect();
            (tracks(input, true, &first, None)?, 0.001)
        }
        HlsMedia::VideoOnly => (tracks(input, true, &[], None)?, 0.001),
        HlsMedia::Audio { track, seconds } => (tracks(input, false, &[track], None)?, seconds),
    };
    opts.set("hls_time", &format!("{hls_time}"));
    opts.set("hls_list_size", "0");
    opts.set("hls_playlist_type", "vod");
    opts.set("hls_segment_type", seg_type);
    opts.set("hls_flags", "independent_segments");
    opts.set(
        "hls_segment_filename",
        &tmp_dir.join(format!("seg_%05d.{ext}")).to_string_lossy(),
    );
    if !ts {
        opts.set("hls_fmp4_init_filename", "init.mp4");
    }
    let mut stats = mux(
        tracks,
        &mut octx,
        &final_dir.join("index.m3u8"),
        opts,
        true,
        input.display_matrix,
    )?;
    drop(octx);
    let text = std::fs::read_to_string(&playlist).map_err(|source| Error::Read {
        path: playlist.clone(),
        source,
    })?;
    let mut pending_dur = None;
    let mut total = 0.0;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("#EXTINF:") {
            pending_dur = d
                .trim_end_matches(',')
                .split(',')
                .next()
                .and_then(|v| v.parse::<f64>().ok());
        } else if !line.starts_with('#') && !line.is_empty() {
            let size = std::fs::metadata(tmp_dir.join(line))
                .map(|m| m.len())
                .unwrap_or(0);
            if let Some(d) = pending_dur.take().filter(|d| *d > 0.0) {
                total += d;
                stats.peak_bandwidth = stats
                    .peak_bandwidth
                    .max((size as f64 * 8.0 / d).ceil() as u64);
            }
        }
    }
    if let HlsMedia::Audio { .. } = media {
        stats.duration = total;
    }
    stats.bytes = dir_size(&tmp_dir);
    stats.path = final_dir.join("index.m3u8");
    Ok((stats, staged))
}

/// Where media time zero lies on the 90 kHz clock of a video playlist's segments (WebVTT's
/// `X-TIMESTAMP-MAP`): the first packet's timestamp as the segments carry it, less its media time
/// (`first_seconds`). Measured, since muxers may shift timestamps.
pub fn timestamp_map(playlist: &Path, first_seconds: f64) -> Result<i64> {
    Ok(first_pts_90k(playlist)? - (first_seconds * 90_000.0).round() as i64)
}

fn first_pts_90k(segment: &Path) -> Result<i64> {
    let mut ictx = crate::probe::open_input(segment)?;
    let found = ictx
        .packets()
        .find_map(|(s, p)| p.pts().map(|pts| (s.time_base(), pts)));
    Ok(found.map_or(0, |(tb, pts)| {
        crate::chunk::rescale(pts, tb, Rational::new(1, 90_000))
    }))
}

/// Write `<dir>/<name>/index.m3u8`: subtitle track `sub` as WebVTT segments, one per video segment
/// (`starts`: segment start times, then the end), mapped onto the video's clock at `mpegts`.
pub fn write_vtt(
    sub: &SubtitleIn<'_>,
    dir: &Path,
    name: &str,
    starts: &[f64],
    mpegts: i64,
    whole: bool,
) -> Result<(Stitched, Staged)> {
    let staged = staged_folder(dir, name)?;
    let (tmp_dir, final_dir) = (staged.tmp.clone(), staged.final_path.clone());
    let werr = |path: &Path, source| Error::Write {
        path: path.into(),
        source,
    };
    let c = subtitles::convert(&sub.path, TextCodec::WebVtt)?;
    let target = starts
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(1.0f64, f64::max)
        .ceil();
    let mut list = format!(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{target}\n#EXT-X-MEDIA-SEQUENCE:0\n#EXT-X-PLAYLIST-TYPE:VOD\n"
    );
    for (i, w) in starts.windows(2).enumerate() {
        let seg = format!("seg_{i:05}.vtt");
        // The first segment also holds cues before the first frame; the last, cues after the last one.
        let from = if i == 0 {
            i64::MIN
        } else {
            (w[0] * 1000.0).round() as i64
        };
        let to = if i + 2 == starts.len() {
            i64::MAX
        } else {
            (w[1] * 1000.0).round() as i64
        };
        let body = subtitles::vtt_segment(&c.cues, from, to, mpegts);
        std::fs::write(tmp_dir.join(&seg), body).map_err(|e| werr(&tmp_dir.join(&seg), e))?;
        list.push_str(&format!("#EXTINF:{:.6},\n{seg}\n", w[1] - w[0]));
    }
    list.push_str("#EXT-X-ENDLIST\n");
    if whole {
        // DASH reads one WebVTT file for the whole presentation.
        let all = tmp_dir.join("all.vtt");
        let body = subtitles::vtt_segment(&c.cues, i64::MIN, i64::MAX, 0);
        let body = body.replacen("X-TIMESTAMP-MAP=MPEGTS:0,LOCAL:00:00:00.000\n", "", 1);
        std::fs::write(&all, body).map_err(|e| werr(&all, e))?;
    }
    let playlist = tmp_dir.join("index.m3u8");
    std::fs::write(&playlist, list).map_err(|e| werr(&playlist, e))?;
    let stats = Stitched {
        path: final_dir.join("index.m3u8"),
        bytes: dir_size(&tmp_dir),
        duration: starts.last().copied().unwrap_or(0.0) - starts.first().copied().unwrap_or(0.0),
        streams: vec![crate::streams::output_stream(
            sub.track, "webvtt", false, None,
        )],
        ..Default::default()
    };
    Ok((stats, staged))
}

fn dir_size(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A video variant of the master playlist.
pub struct Variant {
    pub name: String,
    pub stats: Stitched,
    pub fps: f64,
    /// The `EXT-X-MEDIA` audio group it plays with (audio in renditions of its own).
    pub audio_group: Option<String>,
    /// Whether it plays with the `subs` subtitle group.
    pub subtitles: bool,
    /// Its I-frame playlist's peak bandwidth, where it has one (`iframes.m3u8`).
    pub iframes: Option<u64>,
    /// `PQ` or `HLG` for HDR video (SDR when absent).
    pub video_range: Option<&'static str>,
    /// Carries CEA-608 captions in its video (`CLOSED-CAPTIONS`).
    pub captions: bool,
}

/// An `EXT-X-MEDIA` rendition: an audio track or a subtitle track of its own.
pub struct MediaRendition {
    pub audio: bool,
    pub group: String,
    /// Folder of its media playlist.
    pub dir: String,
    pub stats: Stitched,
    /// Its segments as read back (CMAF).
    pub timeline: Option<crate::cmaf::Timeline>,
}

fn avg_bandwidth(st: &Stitched) -> u64 {
    if st.duration > 0.0 {
        (st.bytes as f64 * 8.0 / st.duration).ceil() as u64
    } else {
        0
    }
}

/// Quoted-string attribute values may not hold a double quote or a line break (RFC 8216 4.2).
fn quoted(v: &str) -> String {
    v.replace(['"', '\n', '\r'], "'")
}

/// The `EXT-X-MEDIA` line of a rendition: NAME unique in its group (title, else the language's name).
fn media_line(m: &MediaRendition, taken: &mut Vec<(String, String)>) -> Option<String> {
    let st = m.stats.streams.first()?;
    let lang = st
        .language
        .as_deref()
        .and_then(tessera_crds::streams::bcp47);
    let base = st
        .title
        .clone()
        .or_else(|| {
            st.language
                .as_deref()
                .and_then(tessera_crds::streams::language)
                .map(|l| l.to_name().to_string())
        })
        .unwrap_or_else(|| format!("Track {}", st.source_index));
    let mut name = quoted(&base);
    let mut n = 2;
    while taken.iter().any(|(g, t)| *g == m.group && *t == name) {
        name = format!("{} ({n})", quoted(&base));
        n += 1;
    }
    taken.push((m.group.clone(), name.clone()));
    let mut s = format!(
        "#EXT-X-MEDIA:TYPE={},GROUP-ID=\"{}\",NAME=\"{name}\"",
        if m.audio { "AUDIO" } else { "SUBTITLES" },
        m.group
    );
    if let Some(l) = lang {
        s.push_str(&format!(",LANGUAGE=\"{l}\""));
    }
    let yes = |b: bool| if b { "YES" } else { "NO" };
    s.push_str(&format!(",DEFAULT={},AUTOSELECT=YES", yes(st.default)));
    if !m.audio {
        s.push_str(&format!(",FORCED={}", yes(st.forced)));
    }
    if let Some(c) = st.channels.filter(|_| m.audio) {
        s.push_str(&format!(",CHANNELS=\"{c}\""));
    }
    s.push_str(&format!(",URI=\"{}/index.m3u8\"", m.dir));
    Some(s)
}

/// The master playlist text: the media renditions, then each variant with the bandwidth and codecs of what
/// it plays (its video plus the largest audio rendition of its group).
pub fn master_text(variants: &[Variant], media: &[MediaRendition]) -> String {
    let mut s = String::from("#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    let mut taken = Vec::new();
    if variants.iter().any(|v| v.captions) {
        s.push_str("#EXT-X-MEDIA:TYPE=CLOSED-CAPTIONS,GROUP-ID=\"cc\",NAME=\"Captions\",INSTREAM-ID=\"CC1\",DEFAULT=NO,AUTOSELECT=YES\n");
    }
    for m in media {
        if let Some(line) = media_line(m, &mut taken) {
            s.push_str(&line);
            s.push('\n');
        }
    }
    for v in variants {
        let st = &v.stats;
        let group: Vec<&MediaRendition> = media
            .iter()
            .filter(|m| m.audio && Some(&m.group) == v.audio_group.as_ref())
            .collect();
        let audio_peak = group
            .iter()
            .map(|m| m.stats.peak_bandwidth)
            .max()
            .unwrap_or(0);
        let audio_avg = group
            .iter()
            .map(|m| avg_bandwidth(&m.stats))
            .max()
            .unwrap_or(0);
        let avg = avg_bandwidth(st) + audio_avg;
        s.push_str(&format!(
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={avg},RESOLUTION={}x{},FRAME-RATE={:.3}",
            (st.peak_bandwidth + audio_peak).max(avg),
            st.width,
            st.height,
            v.fps
        ));
        let audio_codec = group.iter().find_map(|m| m.stats.codecs.clone());
        let codecs = match (&st.codecs, audio_codec) {
            (Some(c), Some(a)) if !c.contains(',') => Some(format!("{c},{a}")),
            (c, _) => c.clone(),
        };
        if let Some(c) = codecs {
            s.push_str(&format!(",CODECS=\"{c}\""));
        }
        if let Some(r) = v.video_range {
            s.push_str(&format!(",VIDEO-RANGE={r}"));
        }
        if let Some(g) = &v.audio_group {
            s.push_str(&format!(",AUDIO=\"{g}\""));
        }
        if v.subtitles {
            s.push_str(",SUBTITLES=\"subs\"");
        }
        if v.captions {
            s.push_str(",CLOSED-CAPTIONS=\"cc\"");
        }
        s.push_str(&format!("\n{}/index.m3u8\n", v.name));
    }
    for v in variants {
        if let Some(bw) = v.iframes {
            s.push_str(&format!(
                "#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH={bw},RESOLUTION={}x{}",
                v.stats.width, v.stats.height
            ));
            if let Some(c) = v.stats.codecs.as_deref().and_then(|c| c.split(',').next()) {
                s.push_str(&format!(",CODECS=\"{c}\""));
            }
            s.push_str(&format!(",URI=\"{}/iframes.m3u8\"\n", v.name));
        }
    }
    s
}

/// The master playlist, written atomically after every rendition's playlist exists.
pub fn write_master(dir: &Path, variants: &[Variant], media: &[MediaRendition]) -> Result<PathBuf> {
    write_atomically(dir, "master.m3u8", &master_text(variants, media))
}

/// Write `<dir>/<name>` under a temporary name and rename it into place: readers see all of it or nothing.
pub fn write_atomically(dir: &Path, name: &str, s: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let mut guard = Cleanup(Some(tmp.clone()));
    std::fs::write(&tmp, s).map_err(|source| Error::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    guard.0 = None;
    Ok(path)
}

/// The HEVC part of an RFC 6381 / ISO 14496-15 codec string (`1.6.L93.B0`) from extradata in hvcC or
/// Annex B form: profile space and idc, reversed compatibility flags, tier and level, constraint bytes.
fn hevc_codec_suffix(ed: &[u8]) -> Option<String> {
    // profile_tier_level: 1 byte space/tier/idc, 4 bytes compatibility, 6 bytes constraints, 1 byte level.
    let ptl: Vec<u8> = if ed.first() == Some(&1) {
        ed.get(1..13)?.to_vec()
    } else {
        // Annex B: the SPS (NAL type 33); two header bytes and one byte of ids precede profile_tier_level.
        let start = ed
            .windows(5)
            .position(|w| w[..3] == [0, 0, 1] && (w[3] >> 1) & 0x3f == 33)?
            + 3;
        let end = ed[start..]
            .windows(3)
            .position(|w| w[..3] == [0, 0, 1])
            .map_or(ed.len(), |e| start + e);
        let mut rbsp = Vec::new();
        let mut zeros = 0;
        for &b in &ed[start..end] {
            if zeros >= 2 && b == 3 {
                zeros = 0;
                continue; // emulation prevention byte
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            rbsp.push(b);
        }
        rbsp.get(3..15)?.to_vec()
    };
    let space = ["", "A", "B", "C"][(ptl[0] >> 6) as usize];
    let tier = if ptl[0] & 0x20 != 0 { 'H' } else { 'L' };
    let compat = u32::from_be_bytes([ptl[1], ptl[2], ptl[3], ptl[4]]).reverse_bits();
    let mut constraints: Vec<u8> = ptl[5..11].to_vec();
    while constraints.last() == Some(&0) {
        constraints.pop();
    }
    let mut s = format!("{space}{}.{compat:X}.{tier}{}", ptl[0] & 0x1f, ptl[11]);
    for c in constraints {
        s.push_str(&format!(".{c:X}"));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hevc_codec_strings_from_annex_b_with_emulation_prevention() {
        // x265 Main, level 3 (90), progressive-source constraint: compat flags 0x60000000 need an
        // emulation-prevention byte after the two zero bytes.
        let sps = [
            0, 0, 0, 1, 0x42, 0x01, 0x01, 0x01, 0x60, 0x00, 0x00, 0x03, 0x00, 0xb0, 0, 0, 0, 0, 0,
            0x5a, 0xa0,
        ];
        assert_eq!(
            super::hevc_codec_suffix(&sps).as_deref(),
            Some("1.6.L90.B0")
        );
        let vps_then_sps = [&[0u8, 0, 0, 1, 0x40, 0x01, 0x0c][..], &sps[..]].concat();
        assert_eq!(
            super::hevc_codec_suffix(&vps_then_sps).as_deref(),
            Some("1.6.L90.B0")
        );
    }

    #[test]
    fn h264_codec_strings_from_either_extradata_form() {
        assert_eq!(
            super::h264_profile_level(&[1, 0x64, 0x00, 0x1f, 0xff]).as_deref(),
            Some("64001f")
        );
        assert_eq!(
            super::h264_profile_level(&[0, 0, 0, 1, 0x67, 0x4d, 0x40, 0x1e, 0xaa]).as_deref(),
            Some("4d401e")
        );
        assert_eq!(super::h264_profile_level(&[0, 0, 1, 0x68, 1]), None);
    }
}
