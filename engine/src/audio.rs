//! Audio: each kept track decoded once for the whole input and encoded once per distinct setting (renditions asking for the
//! same codec, bitrate and channels share one encode), never per chunk, so there is no drift or gap at seams.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ffmpeg_next::{self as ff, codec, ffi, filter, frame, Packet, Rational};
use tessera_crds::AudioCodec;

use crate::avlog;
use crate::chunk::rescale;
use crate::error::{Error, Result};
use crate::packets::{PacketWriter, StreamParams};
use crate::plan::AudioPlan;
use crate::probe::open_input;

/// One pass over the input: every kept audio track decoded once and encoded per distinct setting, and every
/// kept subtitle track's packets copied out as they are (they are converted to the output's text format when
/// stitched).
pub struct AudioJob<'a> {
    pub path: &'a Path,
    /// Input start time in seconds: the origin of output timestamps.
    pub start_time: f64,
    pub tracks: Vec<TrackJob>,
    /// Subtitle streams and where their packets go.
    pub subtitles: Vec<(usize, PathBuf)>,
}

/// One audio track's encodes.
pub struct TrackJob {
    pub stream: usize,
    pub outputs: Vec<(AudioPlan, PathBuf)>,
}

struct Encoding {
    graph: filter::Graph,
    encoder: ff::encoder::Audio,
    writer: PacketWriter,
    sink_tb: Rational,
    enc_tb: Rational,
    name: String,
}

/// A track being read: its copies, its decoder and (once the first frame tells the format) its encodes.
struct TrackState<'a> {
    job: &'a TrackJob,
    tb: Rational,
    origin: i64,
    copies: Vec<PacketWriter>,
    decoder: Option<ff::decoder::Audio>,
    encodings: Vec<Encoding>,
    frames: u64,
}

/// Returns the number of audio frames decoded (all tracks).
pub fn encode_audio(job: &AudioJob<'_>, cancel: &AtomicBool) -> Result<u64> {
    let path = job.path;
    let mut ictx = open_input(path)?;
    let origin_in = |tb: Rational| {
        rescale(
            (job.start_time * 1e6).round() as i64,
            Rational::new(1, 1_000_000),
            tb,
        )
    };
    let mut tracks: Vec<TrackState<'_>> = Vec::with_capacity(job.tracks.len());
    for t in &job.tracks {
        let st = ictx
            .stream(t.stream)
            .ok_or_else(|| Error::media(path, "audio stream vanished", t.stream))?;
        let tb = st.time_base();
        let par = st.parameters();
        let mut copies = Vec::new();
        for (_, out) in t
            .outputs
            .iter()
            .filter(|(p, _)| p.codec == AudioCodec::Copy)
        {
            // SAFETY: the stream's parameters are valid while the input is open.
            let params = unsafe {
                StreamParams::from_raw(par.as_ptr(), (tb.numerator(), tb.denominator()), "copy")
            };
            copies.push(PacketWriter::create(out, &params)?);
        }
        let decoder = if t.outputs.iter().any(|(p, _)| p.codec != AudioCodec::Copy) {
            let mut ctx = codec::context::Context::from_parameters(par)
                .map_err(|e| Error::media(path, "audio decoder setup", e))?;
            // SAFETY: plain field.
            unsafe { (*ctx.as_mut_ptr()).pkt_timebase = tb.into() };
            Some(ctx.decoder().audio().map_err(|e| {
                Error::media(
                    path,
                    "cannot open the audio decoder",
                    format!("stream #{}: {e}", t.stream),
                )
            })?)
        } else {
            None
        };
        tracks.push(TrackState {
            job: t,
            tb,
            origin: origin_in(tb),
            copies,
            decoder,
            encodings: Vec::new(),
            frames: 0,
        });
    }
    let mut subs: Vec<(usize, i64, PacketWriter)> = Vec::with_capacity(job.subtitles.len());
    for (stream, out) in &job.subtitles {
        let st = ictx
            .stream(*stream)
            .ok_or_else(|| Error::media(path, "subtitle stream vanished", stream))?;
        let tb = st.time_base();
        // SAFETY: the stream's parameters are valid while the input is open.
        let params = unsafe {
            StreamParams::from_raw(
                st.parameters().as_ptr(),
                (tb.numerator(), tb.denominator()),
                "copy",
            )
        };
        subs.push((*stream, origin_in(tb), PacketWriter::create(out, &params)?));
    }

    let mut decoded = frame::Audio::empty();
    let mut packets = ictx.packets();
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let next = packets.next();
        let Some((s, p)) = next else {
            break;
        };
        if let Some((_, origin, w)) = subs.iter_mut().find(|(i, _, _)| *i == s.index()) {
            let mut c = p.clone();
            c.set_pts(p.pts().map(|v| v - *origin));
            c.set_dts(p.dts().or(p.pts()).map(|v| v - *origin));
            w.write(&c)?;
            continue;
        }
        let Some(t) = tracks.iter_mut().find(|t| t.job.stream == s.index()) else {
            continue;
        };
        for w in &mut t.copies {
            let mut c = p.clone();
            c.set_pts(p.pts().map(|v| v - t.origin));
            c.set_dts(p.dts().map(|v| v - t.origin));
            w.write(&c)?;
        }
        if let Some(d) = t.decoder.as_mut() {
            if let Err(e) = d.send_packet(&p) {
                tracing::warn!(error = %e, stream = t.job.stream, "undecodable audio packet skipped");
                continue;
            }
        }
        receive(t, &mut decoded)?;
    }
    ictx.check()?;
    let mut frames = 0u64;
    for mut t in tracks {
        if let Some(d) = t.decoder.as_mut() {
            let _ = d.send_eof();
        }
        receive(&mut t, &mut decoded)?;
        for mut e in t.encodings {
            e.graph
                .get("in")
                .expect("source")
                .source()
                .flush()
                .map_err(|err| audio_err(&e.name, err))?;
            pull(&mut e, true)?;
            e.writer.finish()?;
        }
        for w in t.copies {
            w.finish()?;
        }
        frames += t.frames;
    }
    for (_, _, w) in subs {
        w.finish()?;
    }
    Ok(frames)
}

/// Decoded frames of a track into its encodes (opened on the first frame, which tells the input format).
fn receive(t: &mut TrackState<'_>, decoded: &mut frame::Audio) -> Result<()> {
    let Some(d) = t.decoder.as_mut() else {
        return Ok(());
    };
    while d.receive_frame(decoded).is_ok() {
        if t.encodings.is_empty() {
            t.encodings = t
                .job
                .outputs
                .iter()
                .filter(|(p, _)| p.codec != AudioCodec::Copy)
                .map(|(plan, out)| open_encoding(plan, out, decoded, t.tb))
                .collect::<Result<_>>()?;
        }
        let ts = decoded.timestamp().map(|x| x - t.origin);
        decoded.set_pts(ts);
        for e in &mut t.encodings {
            // `Source::add` moves the frame's buffers into the graph: each encoding gets its own reference.
            let copy = decoded.clone();
            e.graph
                .get("in")
                .expect("source")
                .source()
                .add(&copy)
                .map_err(|err| audio_err(&e.name, err))?;
            pull(e, false)?;
        }
        t.frames += 1;
    }
    Ok(())
}

fn audio_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Encoder {
        encoder: name.to_string(),
        detail: format!("audio: {e}"),
    }
}

fn pull(e: &mut Encoding, flush: bool) -> Result<()> {
    let mut f = frame::Audio::empty();
    loop {
        match e.graph.get("out").expect("sink").sink().frame(&mut f) {
            Ok(()) => {
                let pts = f.pts().map(|p| rescale(p, e.sink_tb, e.enc_tb));
                f.set_pts(pts);
                e.encoder
                    .send_frame(&f)
                    .map_err(|err| audio_err(&e.name, err))?;
                drain(e)?;
            }
            Err(ff::Error::Other {
                errno: ff::error::EAGAIN,
            })
            | Err(ff::Error::Eof) => break,
            Err(err) => return Err(audio_err(&e.name, err)),
        }
    }
    if flush {
        e.encoder
            .send_eof()
            .map_err(|err| audio_err(&e.name, err))?;
        drain(e)?;
    }
    Ok(())
}

fn drain(e: &mut Encoding) -> Result<()> {
    let mut p = Packet::empty();
    while e.encoder.receive_packet(&mut p).is_ok() {
        e.writer.write(&p)?;
    }
    Ok(())
}

fn open_encoding(
    plan: &AudioPlan,
    out: &Path,
    first: &frame::Audio,
    in_tb: Rational,
) -> Result<Encoding> {
    let (name, fmt, rate, max_ch) = match plan.codec {
        AudioCodec::Opus if ff::encoder::find_by_name("libopus").is_some() => {
            ("libopus", "flt", 48_000, 2)
        }
        AudioCodec::Opus => ("opus", "flt", 48_000, 2),
        _ => ("aac", "fltp", first.rate().clamp(8_000, 48_000), 8),
    };
    let codec = ff::encoder::find_by_name(name)
        .ok_or_else(|| audio_err(name, "not built into this FFmpeg"))?;
    let in_ch = first.channels().max(1) as u32;
    let channels = plan.channels.unwrap_or(in_ch).min(max_ch).max(1);
    // SAFETY: builds a default layout for a channel count.
    let out_mask = unsafe {
        let mut l: ffi::AVChannelLayout = std::mem::zeroed();
        ffi::av_channel_layout_default(&mut l, channels as i32);
        l.u.mask
    };
    // SAFETY: reads the decoded frame's layout.
    let in_mask = unsafe {
        let l = &(*first.as_ptr()).ch_layout;
        if l.order == ffi::AVChannelOrder::AV_CHANNEL_ORDER_NATIVE {
            l.u.mask
        } else {
            let mut d: ffi::AVChannelLayout = std::mem::zeroed();
            ffi::av_channel_layout_default(&mut d, in_ch as i32);
            d.u.mask
        }
    };
    let mut graph = filter::Graph::new();
    let args = format!(
        "time_base={}/{}:sample_rate={}:sample_fmt={}:channel_layout=0x{:x}",
        in_tb.numerator(),
        in_tb.denominator(),
        first.rate(),
        first.format().name(),
        in_mask
    );
    let build = |graph: &mut filter::Graph| -> std::result::Result<(), ff::Error> {
        graph.add(
            &filter::find("abuffer").ok_or(ff::Error::FilterNotFound)?,
            "in",
            &args,
        )?;
        graph.add(
            &filter::find("abuffersink").ok_or(ff::Error::FilterNotFound)?,
            "out",
            "",
        )?;
        // `async=1`: output timestamps count samples (corrected only where the source really jumps), so
        // sources with coarse timestamps (Matroska's milliseconds) give packets of exact durations.
        graph
            .output("in", 0)?
            .input("out", 0)?
            .parse(&format!("aresample={rate}:async=1,aformat=sample_fmts={fmt}:sample_rates={rate}:channel_layouts=0x{out_mask:x}"))?;
        graph.validate()
    };
    let (res, lines) = avlog::capture(|| build(&mut graph));
    res.map_err(|e| audio_err(name, avlog::explain(e, &lines)))?;

    let mut enc = codec::context::Context::new_with_codec(codec)
        .encoder()
        .audio()
        .map_err(|e| audio_err(name, e))?;
    enc.set_rate(rate as i32);
    // SAFETY: configuring the encoder's channel layout and sample format before open.
    unsafe {
        let c = enc.as_mut_ptr();
        ffi::av_channel_layout_uninit(&mut (*c).ch_layout);
        ffi::av_channel_layout_from_mask(&mut (*c).ch_layout, out_mask);
        (*c).sample_fmt =
            ffi::av_get_sample_fmt(std::ffi::CString::new(fmt).expect("static").as_ptr());
    }
    enc.set_time_base(Rational::new(1, rate as i32));
    enc.set_bit_rate(plan.bitrate_for(channels) as usize);
    // OR the flag in: `set_flags` would replace codec defaults such as libx264's closed GOP (`+cgop`).
    // SAFETY: plain field of the context being configured.
    unsafe { (*enc.as_mut_ptr()).flags |= ffi::AV_CODEC_FLAG_GLOBAL_HEADER as i32 };
    let (opened, lines) = avlog::capture(|| enc.open());
    let encoder = opened.map_err(|e| audio_err(name, avlog::explain(e, &lines)))?;
    let frame_size = encoder.frame_size();
    if frame_size > 0 {
        graph
            .get("out")
            .expect("sink")
            .sink()
            .set_frame_size(frame_size);
    }
    let sink_tb = graph.get("out").expect("sink").sink().time_base();
    let enc_tb = Rational::new(1, rate as i32);
    // SAFETY: the encoder is open; its parameters are copied out.
    let params = unsafe {
        let par = ff::codec::Parameters::from(&*encoder);
        StreamParams::from_raw(par.as_ptr(), (1, rate as i32), name)
    };
    let writer = PacketWriter::create(out, &params)?;
    Ok(Encoding {
        graph,
        encoder,
        writer,
        sink_tb,
        enc_tb,
        name: name.to_string(),
    })
}
