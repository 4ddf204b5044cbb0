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
use crate::target::{self, Probe};
use crate::vmaf::Meter;

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
    /// Encode with this setting instead of the rendition's `crf`: what a `targetQuality` search chose.
    pub crf: Option<u8>,
    /// Score every frame of the encode with VMAF (decoding the encoder's packets as they come).
    pub measure: bool,
}

impl ChunkOutput<'_> {
    /// The rendition as this chunk encodes it: with the setting chosen for its quality target.
    fn settings(&self) -> std::borrow::Cow<'_, Rendition> {
        match self.crf {
            Some(c) => {
                // The target stays, telling the encoder its chunks will differ in setting.
                let mut r = self.rendition.clone();
                r.video.crf = Some(c);
                std::borrow::Cow::Owned(r)
            }
            None => std::borrow::Cow::Borrowed(self.rendition),
        }
    }

    fn converter(&self) -> Converter {
        let (t, pix) = (self.target, self.encoder.pix_fmt);
        match t.tone_map_from {
            Some(tin) => Converter::tone_mapping(pix, t.width, t.height, tin),
            None => Converter::new(pix, t.width, t.height),
        }
    }
}

/// What encoding a chunk gave: the source frames, and per output the VMAF of each frame (when measured).
#[derive(Debug, Default)]
pub struct Encoded {
    pub frames: u64,
    pub vmaf: Vec<Option<Vec<f64>>>,
}

pub struct ChunkInput<'a> {
    pub path: &'a Path,
    pub stream: usize,
    pub chunk: Chunk,
    pub clock: Clock,
    pub decoder_threads: usize,
    /// Hardware decode device type, when the job chose one.
    pub hw_device: Option<ffi::AVHWDeviceType>,
    /// Frames the plan expects in the chunk (where quality probes take their samples).
    pub expected_frames: u64,
}

/// Frames a decode pass delivered, and the last one's duration in the source time base.
struct Decoded {
    frames: u64,
    last_src_duration: i64,
}

/// A consumer of a chunk's decoded source frames (with their source pts), in presentation order.
type Sink<'s> = dyn FnMut(&frame::Video, i64) -> Result<()> + 's;

/// Decode the chunk's frames, each once, into `sink`.
fn decode_chunk(
    input: &ChunkInput<'_>,
    cancel: &AtomicBool,
    sink: &mut Sink<'_>,
) -> Result<Decoded> {
    let chunk = input.chunk;
    // Seek targets to try: the keyframe itself, then earlier, then the whole input. A container whose seek
    // lands after the keyframe would otherwise lose frames silently.
    let attempts: Vec<Option<i64>> = match chunk.seek_ts {
        None => vec![None],
        Some(ts) => {
            // MP4 seeks by presentation time (so the start PTS lands on the chunk's own keyframe), other
            // demuxers by the index timestamp; the guard in `decode_from` catches any overshoot.
            let ten_s = rescale(10, Rational::new(1, 1), input.clock.src_tb).max(1);
            let mut v = vec![chunk.start_pts, Some(ts), Some(ts - ten_s), None];
            v.dedup();
            v
        }
    };
    for seek in attempts {
        // An attempt gives up (Ok(None)) only before its first frame reached the sink.
        match decode_from(input, seek, cancel, sink)? {
            Some(d) => return Ok(d),
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

/// Encode one chunk for every output. `on_frame` is called once per source frame emitted.
pub fn encode_chunk(
    input: &ChunkInput<'_>,
    outputs: &[ChunkOutput<'_>],
    cancel: &AtomicBool,
    on_frame: &(dyn Fn() + Sync),
) -> Result<Encoded> {
    let index = input.chunk.index;
    let mut encs: Vec<RenditionEncoder> = Vec::with_capacity(outputs.len());
    let d = decode_chunk(input, cancel, &mut |f, pts| {
        if encs.is_empty() {
            encs = open_encoders(outputs, index)?;
        }
        let out_pts = input.clock.map(pts);
        for e in &mut encs {
            e.send(f, out_pts, index)?;
        }
        on_frame();
        Ok(())
    })?;
    let last_duration = match input.chunk.end_pts {
        Some(end) => input.clock.map(end) - encs[0].last_pts.unwrap_or(0),
        None if d.last_src_duration > 0 => {
            rescale(d.last_src_duration, input.clock.src_tb, input.clock.enc_tb)
        }
        None => input.clock.default_duration,
    };
    let mut vmaf = Vec::with_capacity(encs.len());
    for mut e in encs {
        e.finish(last_duration, index)?;
        e.writer.finish()?;
        vmaf.push(
            e.check
                .map(|c| c.finish())
                .transpose()
                .map_err(|detail| Error::Chunk {
                    chunk: index,
                    detail,
                })?,
        );
    }
    Ok(Encoded {
        frames: d.frames,
        vmaf,
    })
}

/// Find, for each output with a `targetQuality` and no setting yet, the setting to encode it with: one
/// decode pass keeps a sample of the chunk's frames (runs of consecutive frames, `target::sample_runs`),
/// converted as the encoder gets them; probe encodes of the sample at a few settings are scored with VMAF
/// and the setting is interpolated between them (`target::next_probe`, `target::choose`). Answers, per
/// output, the setting (`None`: nothing to search).
pub fn search(
    input: &ChunkInput<'_>,
    outputs: &[ChunkOutput<'_>],
    cancel: &AtomicBool,
) -> Result<Vec<Option<u8>>> {
    let index = input.chunk.index;
    let searched: Vec<usize> = (0..outputs.len())
        .filter(|&o| {
            outputs[o].crf.is_none() && outputs[o].rendition.video.target_quality.is_some()
        })
        .collect();
    let mut answer = vec![None; outputs.len()];
    if searched.is_empty() {
        return Ok(answer);
    }
    let runs = target::sample_runs(input.expected_frames);
    let mut convs: Vec<Converter> = searched.iter().map(|&o| outputs[o].converter()).collect();
    let mut samples: Vec<Vec<frame::Video>> = vec![Vec::new(); searched.len()];
    let n = keep_sample(input, &runs, &mut convs, &mut samples, cancel)?;
    for (&o, kept) in searched.iter().zip(&samples) {
        let out = &outputs[o];
        if kept.is_empty() {
            return Err(Error::Chunk {
                chunk: index,
                detail: format!(
                    "quality target of {}: no frames were sampled ({} decoded, {} expected)",
                    out.rendition.name, n, input.expected_frames
                ),
            });
        }
        let goal = out
            .rendition
            .video
            .target_quality
            .as_ref()
            .expect("searched outputs have a target");
        let name = &out.encoder.name;
        let sc = target::bounded(name, goal);
        let mut probes = Vec::new();
        while let Some(crf) = target::next_probe(&probes, goal.vmaf, &sc) {
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let vmaf = probe(input, out, crf, kept)?;
            probes.push(Probe { crf, vmaf });
        }
        let crf = target::choose(&probes, goal.vmaf, &sc);
        tracing::info!(chunk = index, rendition = %out.rendition.name, encoder = %name, crf,
            target = goal.vmaf, probes = ?probes.iter().map(|p| (p.crf, (p.vmaf * 100.0).round() / 100.0)).collect::<Vec<_>>(),
            sample = kept.len(), "quality target: setting chosen");
        answer[o] = Some(crf);
    }
    Ok(answer)
}

/// Probes score every this many frames of their sample.
const PROBE_SUBSAMPLE: u32 = 2;

/// Encode `samples` at `crf` and score the result: the mean VMAF.
fn probe(
    input: &ChunkInput<'_>,
    out: &ChunkOutput<'_>,
    crf: u8,
    samples: &[frame::Video],
) -> Result<f64> {
    score(input, out, crf, samples, None).map(|(vmaf, _)| vmaf)
}

/// A ladder's sample: for each of `outputs` (the ladder's sizes), the frames of `inputs` (sample chunks)
/// that `ladder::sample_runs` picks, converted as its encoder gets them. Each chunk is decoded once.
pub fn ladder_sample(
    inputs: &[ChunkInput<'_>],
    outputs: &[ChunkOutput<'_>],
    cancel: &AtomicBool,
) -> Result<Vec<Vec<frame::Video>>> {
    let mut convs: Vec<Converter> = outputs.iter().map(|o| o.converter()).collect();
    let mut kept: Vec<Vec<frame::Video>> = vec![Vec::new(); outputs.len()];
    for input in inputs {
        let runs = crate::ladder::sample_runs(input.expected_frames);
        keep_sample(input, &runs, &mut convs, &mut kept, cancel)?;
    }
    Ok(kept)
}

/// Decode the chunk once and append the frames in `runs` (indices in the chunk), converted by each of
/// `convs`, to the matching list of `kept`. Answers the frames decoded.
fn keep_sample(
    input: &ChunkInput<'_>,
    runs: &[std::ops::Range<u64>],
    convs: &mut [Converter],
    kept: &mut [Vec<frame::Video>],
    cancel: &AtomicBool,
) -> Result<u64> {
    let mut n = 0u64;
    decode_chunk(input, cancel, &mut |f, _| {
        if runs.iter().any(|r| r.contains(&n)) {
            for (conv, k) in convs.iter_mut().zip(kept.iter_mut()) {
                let c = conv.convert(f).map_err(|e| Error::Chunk {
                    chunk: input.chunk.index,
                    detail: format!("scaling the sample: {e}"),
                })?;
                k.push(c.unwrap_or_else(|| f.clone()));
            }
        }
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// One point of a ladder: `samples` (`out`'s size) encoded at `crf`, decoded, upscaled to `top`'s size and
/// scored against `top_samples` (the same frames at that size). The mean VMAF and the bytes encoded.
pub fn ladder_point(
    input: &ChunkInput<'_>,
    out: &ChunkOutput<'_>,
    crf: u8,
    samples: &[frame::Video],
    top_samples: &[frame::Video],
    top: &VideoTarget,
) -> Result<(f64, u64)> {
    score(input, out, crf, samples, Some((top_samples, top)))
}

/// Encode `samples` at `crf`, decode the encode and score it with VMAF (every [`PROBE_SUBSAMPLE`]th
/// frame): against the samples themselves, or, given `against`, upscaled to its size and scored against
/// its frames. The mean VMAF and the bytes the encoder wrote.
fn score(
    input: &ChunkInput<'_>,
    out: &ChunkOutput<'_>,
    crf: u8,
    samples: &[frame::Video],
    against: Option<(&[frame::Video], &VideoTarget)>,
) -> Result<(f64, u64)> {
    let index = input.chunk.index;
    let name = &out.encoder.name;
    let enc_err = |detail: String| Error::Encoder {
        encoder: name.clone(),
        detail: format!("chunk {index}, quality probe at {crf}: {detail}"),
    };
    let probe_out = ChunkOutput {
        crf: Some(crf),
        path: out.path.clone(),
        ..*out
    };
    let mut enc = encode::open_video(name, &probe_out.settings(), out.target, out.encoder.pix_fmt)
        .map_err(enc_err)?;
    // Probes score every other frame: VMAF costs more than the probe encode, and the search needs the
    // sample's mean, not each frame.
    let mut check = match against {
        Some((_, top)) => Check::new(&enc, top, PROBE_SUBSAMPLE)
            .map(|c| c.upscaled(Converter::new(top.pix_fmt, top.width, top.height))),
        None => Check::new(&enc, out.target, PROBE_SUBSAMPLE),
    }
    .map_err(enc_err)?;
    let mut p = Packet::empty();
    let mut bytes = 0u64;
    let mut drain = |enc: &mut encode::OpenEncoder, check: &mut Check| -> Result<()> {
        loop {
            match enc.receive_packet(&mut p) {
                Ok(()) => {
                    bytes += p.size() as u64;
                    check.packet(&p).map_err(enc_err)?
                }
                Err(ff::Error::Other {
                    errno: ff::error::EAGAIN,
                })
                | Err(ff::Error::Eof) => return Ok(()),
                Err(e) => return Err(enc_err(e.to_string())),
            }
        }
    };
    for (i, s) in samples.iter().enumerate() {
        let f = s.clone();
        // SAFETY: `f` is our own copy; only its pts and type are written.
        unsafe {
            let raw = f.as_ptr() as *mut ffi::AVFrame;
            (*raw).pts = i as i64 * input.clock.default_duration.max(1);
            (*raw).pict_type = ffi::AVPictureType::AV_PICTURE_TYPE_NONE;
        }
        match against {
            Some((refs, _)) => check.reference(refs.get(i).ok_or_else(|| {
                enc_err("the ladder's sizes were sampled to different frame counts".into())
            })?),
            None => check.reference(&f),
        }
        enc.fed = true;
        enc.send_frame(&f).map_err(|e| enc_err(e.to_string()))?;
        drain(&mut enc, &mut check)?;
    }
    enc.send_eof().map_err(|e| enc_err(e.to_string()))?;
    drain(&mut enc, &mut check)?;
    let scores = check.finish().map_err(enc_err)?;
    Ok((
        scores.iter().sum::<f64>() / scores.len().max(1) as f64,
        bytes,
    ))
}

/// Decodes an encoder's packets as they come and scores each decoded frame with VMAF against the frame
/// the encoder was given.
struct Check {
    dec: ff::decoder::Video,
    refs: VecDeque<frame::Video>,
    meter: Meter,
    decoded: frame::Video,
    /// Decoded frames are scaled to the meter's size first (a ladder's lower sizes, scored at its top).
    upscale: Option<Converter>,
}

impl Check {
    fn new(
        enc: &encode::OpenEncoder,
        t: &VideoTarget,
        subsample: u32,
    ) -> std::result::Result<Self, String> {
        let par = ff::codec::Parameters::from(&**enc);
        let dec = codec::context::Context::from_parameters(par)
            .and_then(|c| c.decoder().video())
            .map_err(|e| format!("no decoder to check the encode with: {e}"))?;
        Ok(Self {
            dec,
            refs: VecDeque::new(),
            meter: Meter::new(t.width, t.height, 0, subsample)?,
            decoded: frame::Video::empty(),
            upscale: None,
        })
    }

    fn upscaled(self, to: Converter) -> Self {
        Self {
            upscale: Some(to),
            ..self
        }
    }

    fn reference(&mut self, f: &frame::Video) {
        self.refs.push_back(f.clone());
    }

    fn packet(&mut self, p: &Packet) -> std::result::Result<(), String> {
        self.dec
            .send_packet(p)
            .map_err(|e| format!("decoding the encode to score it: {e}"))?;
        self.drain()
    }

    fn drain(&mut self) -> std::result::Result<(), String> {
        while self.dec.receive_frame(&mut self.decoded).is_ok() {
            let r = self
                .refs
                .pop_front()
                .ok_or("the encode decoded to more frames than were encoded")?;
            match &mut self.upscale {
                Some(conv) => {
                    let up = conv.convert(&self.decoded)?;
                    self.meter.push(&r, up.as_ref().unwrap_or(&self.decoded))?;
                }
                None => self.meter.push(&r, &self.decoded)?,
            }
        }
        Ok(())
    }

    fn finish(mut self) -> std::result::Result<Vec<f64>, String> {
        let _ = self.dec.send_eof();
        self.drain()?;
        if !self.refs.is_empty() {
            return Err(format!(
                "the encode decoded to {} frames fewer than were encoded",
                self.refs.len()
            ));
        }
        self.meter.finish()
    }
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
    /// VMAF of every frame, when the output is measured.
    check: Option<Check>,
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
        if let Some(c) = &mut self.check {
            c.reference(&f);
        }
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
            if let Some(c) = &mut self.check {
                c.packet(&pkt)
                    .map_err(|detail| Error::Chunk { chunk, detail })?;
            }
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

/// One decode pass from `seek`. `Ok(None)`: the seek overshot the chunk start (before any frame reached
/// the sink); try an earlier one.
fn decode_from(
    input: &ChunkInput<'_>,
    seek: Option<i64>,
    cancel: &AtomicBool,
    sink: &mut Sink<'_>,
) -> Result<Option<Decoded>> {
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
            sink(&decoded, pts)?;
            // SAFETY: plain field of a decoded frame.
            last_src_duration = unsafe { (*decoded.as_ptr()).pkt_duration };
            frames += 1;
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
    Ok(Some(Decoded {
        frames,
        last_src_duration,
    }))
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
                encode::open_video(&out.encoder.name, &out.settings(), t, pix).map_err(|d| {
                    Error::Encoder {
                        encoder: out.encoder.name.clone(),
                        detail: format!("chunk {chunk}: {d}"),
                    }
                })?;
            let scaler = out.converter();
            let check = if out.measure {
                Some(Check::new(&encoder, t, 1).map_err(|detail| Error::Chunk { chunk, detail })?)
            } else {
                None
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
                check,
            })
        })
        .collect()
}
