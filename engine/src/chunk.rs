//! The chunk encoder: decode one chunk of the input once and encode it for every rendition.
//!
//! A chunk is the frames whose presentation timestamps fall in `[start_pts, end_pts)`. Decoding starts at the
//! keyframe at or before `start_pts` (open-GOP leading pictures that belong to the previous chunk are dropped
//! here and emitted by that chunk, which decodes past its end keyframe until a frame at or after `end_pts`
//! comes out). Every rendition's encoder is opened fresh, so each chunk is one closed run starting with an IDR
//! frame, with the same settings in every chunk.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ffmpeg_next::{self as ff, codec, ffi, frame, Packet, Rational};
use tessera_crds::Rendition;

use crate::encode::{self, EncoderChoice, VideoTarget};
use crate::error::{Error, Result};
use crate::hwdec;
use crate::packets::{PacketWriter, StreamParams};
use crate::plan::Chunk;
use crate::probe::open_input;
use crate::scale::Converter;

/// How source timestamps become output timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub src_tb: Rational,
    /// Source timestamp of the output's zero (the input's start time).
    pub origin: i64,
    pub enc_tb: Rational,
    /// Nominal frame duration in the encoder time base, for the very last frame.
    pub default_duration: i64,
}

impl Clock {
    pub fn map(&self, src_pts: i64) -> i64 {
        rescale(src_pts - self.origin, self.src_tb, self.enc_tb)
    }
}

pub(crate) fn rescale(v: i64, from: Rational, to: Rational) -> i64 {
    // SAFETY: pure arithmetic.
    unsafe {
        ffi::av_rescale_q_rnd(
            v,
            from.into(),
            to.into(),
            ffi::AVRounding::AV_ROUND_NEAR_INF,
        )
    }
}

/// A rendition as the chunk worker sees it.
pub struct ChunkOutput<'a> {
    pub rendition: &'a Rendition,
    pub target: &'a VideoTarget,
    pub encoder: &'a EncoderChoice,
    pub path: PathBuf,
}

pub struct ChunkInput<'a> {
    pub path: &'a Path,
    pub stream: usize,
    pub chunk: Chunk,
    pub clock: Clock,
    pub decoder_threads: usize,
    /// Hardware decode device type, when the job chose one.
    pub hw_device: Option<ffi::AVHWDeviceType>,
}

/// Encode one chunk for every output. `on_frame` is called once per source frame emitted.
pub fn encode_chunk(
    input: &ChunkInput<'_>,
    outputs: &[ChunkOutput<'_>],
    cancel: &AtomicBool,
    on_frame: &(dyn Fn() + Sync),
) -> Result<u64> {
    let chunk = input.chunk;
    // Seek targets to try: the keyframe itself, then earlier, then the whole input. A container whose seek
    // lands after the keyframe would otherwise lose frames silently.
    let attempts: Vec<Option<i64>> = match chunk.seek_ts {
        None => vec![None],
        Some(ts) => {
            // MP4 seeks by presentation time (so the start PTS lands on the chunk's own keyframe), other
            // demuxers by the index timestamp; the guard in `run_chunk` catches any overshoot.
            let ten_s = rescale(10, Rational::new(1, 1), input.clock.src_tb).max(1);
            let mut v = vec![chunk.start_pts, Some(ts), Some(ts - ten_s), None];
            v.dedup();
            v
        }
    };
    for seek in attempts {
        match run_chunk(input, seek, outputs, cancel, on_frame)? {
            Some(frames) => return Ok(frames),
            None => tracing::warn!(
                chunk = chunk.index,
                ?seek,
                "seek landed after the chunk start; seeking earlier"
            ),
        }
    }
    Err(Error::Chunk {
        chunk: chunk.index,
        detail: format!(
            "the decoder never produced the frame at pts {:?}",
            chunk.start_pts
        ),
    })
}

struct RenditionEncoder<'a> {
    out: &'a ChunkOutput<'a>,
    encoder: encode::OpenEncoder,
    scaler: Converter,
    writer: PacketWriter,
    /// Output pts → duration, for packets whose frame duration is known.
    durations: HashMap<i64, i64>,
    /// Packets waiting for their frame's duration.
    pending: VecDeque<Packet>,
    last_pts: Option<i64>,
}

impl RenditionEncoder<'_> {
    fn send(&mut self, src: &frame::Video, pts: i64, chunk: usize) -> Result<()> {
        let converted = self.scaler.convert(src).map_err(|e| Error::Chunk {
            chunk,
            detail: format!("scaling: {e}"),
        })?;
        // The decoder's frame is shared by every rendition: pass-through frames are copied before their
        // timestamp and picture type are rewritten.
        let f = match converted {
            Some(f) => {
                keep_captions(src, &f);
                f
            }
            None => src.clone(),
        };
        // SAFETY: `f` is a frame we own; only its pts and type are written.
        unsafe {
            let raw = f.as_ptr() as *mut ffi::AVFrame;
            (*raw).pts = pts;
            (*raw).pict_type = ffi::AVPictureType::AV_PICTURE_TYPE_NONE;
        }
        if let Some(prev) = self.last_pts {
            self.durations.insert(prev, pts - prev);
        }
        self.last_pts = Some(pts);
        let name = &self.out.encoder.name;
        self.encoder.fed = true;
        self.encoder.send_frame(&f).map_err(|e| Error::Encoder {
            encoder: name.clone(),
            detail: format!("chunk {chunk}: {e}"),
        })?;
        self.drain(chunk)
    }

    fn finish(&mut self, last_duration: i64, chunk: usize) -> Result<()> {
        if let Some(prev) = self.last_pts {
            self.durations.insert(prev, last_duration.max(1));
        }
        let name = self.out.encoder.name.clone();
        self.encoder.send_eof().map_err(|e| Error::Encoder {
            encoder: name,
            detail: format!("chunk {chunk}: {e}"),
        })?;
        self.drain(chunk)?;
        if let Some(p) = self.pending.front() {
            return Err(Error::Chunk {
                chunk,
                detail: format!("no duration known for packet pts {:?}", p.pts()),
            });
        }
        Ok(())
    }

    fn drain(&mut self, chunk: usize) -> Result<()> {
        let mut p = Packet::empty();
        loop {
            match self.encoder.receive_packet(&mut p) {
                Ok(()) => {
                    self.pending
                        .push_back(std::mem::replace(&mut p, Packet::empty()));
                }
                Err(ff::Error::Other {
                    errno: ff::error::EAGAIN,
                })
                | Err(ff::Error::Eof) => break,
                Err(e) => {
                    return Err(Error::Encoder {
                        encoder: self.out.encoder.name.clone(),
                        detail: format!("chunk {chunk}: {e}"),
                    })
                }
            }
        }
        while let Some(front) = self.pending.front_mut() {
            let pts = front.pts().unwrap_or(0);
            let Some(d) = self.durations.remove(&pts) else {
                break;
            };
            front.set_duration(d);
            let pkt = self.pending.pop_front().expect("front exists");
            self.writer.write(&pkt)?;
        }
        Ok(())
    }
}

/// Carry a frame's CEA-608/708 caption data (A/53) over to its scaled copy, where encoders with a caption
/// path (libx264, NVENC H.264) write it back as SEI.
fn keep_captions(src: &frame::Video, dst: &frame::Video) {
    // SAFETY: side data is read from a decoded frame and copied into a new side data buffer of the frame we
    // own, of the same size.
    unsafe {
        let sd = ffi::av_frame_get_side_data(
            src.as_ptr(),
            ffi::AVFrameSideDataType::AV_FRAME_DATA_A53_CC,
        );
        if sd.is_null() {
            return;
        }
        let n = ffi::av_frame_new_side_data(
            dst.as_ptr() as *mut ffi::AVFrame,
            ffi::AVFrameSideDataType::AV_FRAME_DATA_A53_CC,
            (*sd).size,
        );
        if !n.is_null() {
            std::ptr::copy_nonoverlapping((*sd).data, (*n).data, (*sd).size);
        }
    }
}

/// One decode pass. `Ok(None)`: the seek overshot the chunk start; try an earlier one.
fn run_chunk(
    input: &ChunkInput<'_>,
    seek: Option<i64>,
    outputs: &[ChunkOutput<'_>],
    cancel: &AtomicBool,
    on_frame: &(dyn Fn() + Sync),
) -> Result<Option<u64>> {
    let chunk = input.chunk;
    let path = input.path;
    let mut ictx = open_input(path)?;
    let stream = ictx
        .stream(input.stream)
        .ok_or_else(|| Error::media(path, "stream vanished", input.stream))?;
    let mut dctx = codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| Error::media(path, "decoder setup", e))?;
    if input.decoder_threads > 0 {
        dctx.set_threading({
            let mut c = codec::threading::Config::kind(codec::threading::Type::Frame);
            c.count = input.decoder_threads;
            c
        });
    }
    // SAFETY: plain field; the packet time base lets the decoder compute durations.
    unsafe { (*dctx.as_mut_ptr()).pkt_timebase = input.clock.src_tb.into() };
    let hw_fmt = input.hw_device.and_then(|t| match hwdec::attach(&mut dctx, t) {
        Ok(f) => Some(f),
        Err(why) => {
            tracing::warn!(chunk = chunk.index, %why, "hardware decoding unavailable; decoding in software");
            None
        }
    });
    let mut decoder = dctx
        .decoder()
        .video()
        .map_err(|e| Error::media(path, "cannot open the video decoder", e))?;
    if let Some(ts) = seek {
        // SAFETY: seeking an open input context.
        let ret = unsafe {
            ffi::av_seek_frame(
                ictx.as_mut_ptr(),
                input.stream as i32,
                ts,
                ffi::AVSEEK_FLAG_BACKWARD,
            )
        };
        if ret < 0 {
            return Err(Error::media(
                path,
                format!("seek to chunk {}", chunk.index),
                ff::Error::from(ret),
            ));
        }
    }

    let mut encs: Vec<RenditionEncoder> = Vec::with_capacity(outputs.len());
    let mut frames = 0u64;
    let mut decoded = frame::Video::empty();
    let mut done = false;
    let mut last_src_duration = 0i64;
    let mut packets = ictx.packets();
    while !done {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let eof = match packets.next() {
            Some((s, p)) => {
                if s.index() != input.stream {
                    continue;
                }
                if let Err(e) = decoder.send_packet(&p) {
                    // Like ffmpeg: a damaged packet costs its frame, not the job.
                    tracing::warn!(chunk = chunk.index, error = %e, pts = ?p.pts(), "undecodable packet skipped");
                    continue;
                }
                false
            }
            None => {
                let _ = decoder.send_eof();
                true
            }
        };
        while decoder.receive_frame(&mut decoded).is_ok() {
            if hw_fmt.is_some_and(|f| decoded.format() == ff::format::Pixel::from(f)) {
                decoded = hwdec::download(&decoded).map_err(|detail| Error::Chunk {
                    chunk: chunk.index,
                    detail,
                })?;
            }
            let Some(pts) = decoded.timestamp() else {
                continue;
            };
            if chunk.start_pts.is_some_and(|s| pts < s) {
                continue;
            }
            if chunk.end_pts.is_some_and(|e| pts >= e) {
                if frames == 0 && chunk.start_pts.is_some() {
                    // The seek overshot the whole chunk: try an earlier one.
                    return Ok(None);
                }
                done = true;
                break;
            }
            if frames == 0 {
                if let Some(s) = chunk.start_pts {
                    if pts != s {
                        return Ok(None);
                    }
                }
            }
            if encs.is_empty() {
                encs = open_encoders(outputs, chunk.index)?;
            }
            let out_pts = input.clock.map(pts);
            for e in &mut encs {
                e.send(&decoded, out_pts, chunk.index)?;
            }
            // SAFETY: plain field of a decoded frame.
            last_src_duration = unsafe { (*decoded.as_ptr()).pkt_duration };
            frames += 1;
            on_frame();
        }
        if eof {
            break;
        }
    }
    // A storage error ends demuxing like the end of the input would: it must not pass for one.
    ictx.check()?;
    if frames == 0 && chunk.start_pts.is_some() && seek.is_some() {
        // The seek went past the chunk (to the end of the input): try an earlier one.
        return Ok(None);
    }
    if frames == 0 {
        return Err(Error::Chunk {
            chunk: chunk.index,
            detail: "no frames decoded (corrupt or truncated input?)".into(),
        });
    }
    let last_duration = match chunk.end_pts {
        Some(end) => input.clock.map(end) - encs[0].last_pts.unwrap_or(0),
        None if last_src_duration > 0 => {
            rescale(last_src_duration, input.clock.src_tb, input.clock.enc_tb)
        }
        None => input.clock.default_duration,
    };
    for mut e in encs {
        e.finish(last_duration, chunk.index)?;
        e.writer.finish()?;
    }
    Ok(Some(frames))
}

fn open_encoders<'a>(
    outputs: &'a [ChunkOutput<'a>],
    chunk: usize,
) -> Result<Vec<RenditionEncoder<'a>>> {
    outputs
        .iter()
        .map(|out| {
            let t = out.target;
            let pix = out.encoder.pix_fmt;
            let encoder =
                encode::open_video(&out.encoder.name, out.rendition, t, pix).map_err(|d| {
                    Error::Encoder {
                        encoder: out.encoder.name.clone(),
                        detail: format!("chunk {chunk}: {d}"),
                    }
                })?;
            let scaler = match t.tone_map_from {
                Some(tin) => Converter::tone_mapping(pix, t.width, t.height, tin),
                None => Converter::new(pix, t.width, t.height),
            };
            // SAFETY: the encoder is open; its codec parameters are copied out.
            let params = unsafe {
                let par = ff::codec::Parameters::from(&*encoder);
                StreamParams::from_raw(
                    par.as_ptr(),
                    (t.time_base.numerator(), t.time_base.denominator()),
                    &out.encoder.name,
                )
            };
            let writer = PacketWriter::create(&out.path, &params)?;
            Ok(RenditionEncoder {
                out,
                encoder,
                scaler,
                writer,
                durations: HashMap::new(),
                pending: VecDeque::new(),
                last_pts: None,
            })
        })
        .collect()
}
