//! Text subtitles: the source track's packets (copied out by the audio pass) decoded to FFmpeg's ASS events
//! and encoded as the output wants them, `mov_text` for MP4 and WebVTT cue payloads for HLS. Styling that
//! the target can express (italics, bold) survives; the rest is dropped by FFmpeg's encoders as usual.

use std::path::Path;

use ffmpeg_next::{ffi, packet::Mut};

use crate::error::{Error, Result};
use crate::packets::{PacketReader, StoredPacket, StreamParams};

/// The text format an output carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextCodec {
    MovText,
    WebVtt,
}

impl TextCodec {
    pub fn name(self) -> &'static str {
        match self {
            Self::MovText => "mov_text",
            Self::WebVtt => "webvtt",
        }
    }
}

/// A converted track: its stream parameters (time base 1/1000) and one packet per cue, in milliseconds.
pub struct Converted {
    pub params: StreamParams,
    pub cues: Vec<StoredPacket>,
}

/// Frees an FFmpeg codec context on drop.
struct Ctx(*mut ffi::AVCodecContext);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the context was allocated by avcodec_alloc_context3 and is freed once.
        unsafe { ffi::avcodec_free_context(&mut self.0) };
    }
}

fn err(path: &Path, what: &str, detail: impl std::fmt::Display) -> Error {
    Error::media(path, what, detail)
}

/// Convert the subtitle packet file at `path` into `to`.
pub fn convert(path: &Path, to: TextCodec) -> Result<Converted> {
    let mut reader = PacketReader::open(path)?;
    let src = reader.params.clone();
    let tb = ffi::AVRational {
        num: src.time_base.0,
        den: src.time_base.1,
    };
    // SAFETY: contexts are allocated, configured and opened here and freed by `Ctx`; every pointer passed to
    // FFmpeg is valid for the call; AVSubtitle is freed after each use.
    unsafe {
        let codec_id = std::mem::transmute::<u32, ffi::AVCodecID>(src.codec_id);
        let dcodec = ffi::avcodec_find_decoder(codec_id);
        if dcodec.is_null() {
            return Err(err(path, "no subtitle decoder", src.codec_id));
        }
        let dec = Ctx(ffi::avcodec_alloc_context3(dcodec));
        let par = ffi::avcodec_parameters_alloc();
        src.to_raw(par);
        let r = ffi::avcodec_parameters_to_context(dec.0, par);
        let mut par = par;
        ffi::avcodec_parameters_free(&mut par);
        if r < 0 {
            return Err(err(
                path,
                "subtitle decoder setup",
                ffmpeg_next::Error::from(r),
            ));
        }
        (*dec.0).pkt_timebase = tb;
        let r = ffi::avcodec_open2(dec.0, dcodec, std::ptr::null_mut());
        if r < 0 {
            return Err(err(
                path,
                "cannot open the subtitle decoder",
                ffmpeg_next::Error::from(r),
            ));
        }
        let name = std::ffi::CString::new(to.name()).expect("static name");
        let ecodec = ffi::avcodec_find_encoder_by_name(name.as_ptr());
        if ecodec.is_null() {
            return Err(err(path, "no subtitle encoder", to.name()));
        }
        let enc = Ctx(ffi::avcodec_alloc_context3(ecodec));
        (*enc.0).time_base = ffi::AVRational { num: 1, den: 1000 };
        // The encoder reads the styles of the ASS header the decoder made (as ffmpeg does).
        let h = (*dec.0).subtitle_header;
        let hn = (*dec.0).subtitle_header_size;
        if !h.is_null() && hn > 0 {
            let copy = ffi::av_mallocz(hn as usize + 1) as *mut u8;
            std::ptr::copy_nonoverlapping(h, copy, hn as usize);
            (*enc.0).subtitle_header = copy;
            (*enc.0).subtitle_header_size = hn;
        }
        let r = ffi::avcodec_open2(enc.0, ecodec, std::ptr::null_mut());
        if r < 0 {
            return Err(err(
                path,
                "cannot open the subtitle encoder",
                ffmpeg_next::Error::from(r),
            ));
        }
        let par = ffi::avcodec_parameters_alloc();
        ffi::avcodec_parameters_from_context(par, enc.0);
        let params = StreamParams::from_raw(par, (1, 1000), to.name());
        let mut par = par;
        ffi::avcodec_parameters_free(&mut par);

        let mut cues = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        while let Some(sp) = reader.next_packet()? {
            let mut pkt = sp.to_packet();
            let mut sub: ffi::AVSubtitle = std::mem::zeroed();
            let mut got = 0;
            let r = ffi::avcodec_decode_subtitle2(dec.0, &mut sub, &mut got, pkt.as_mut_ptr());
            if r < 0 || got == 0 {
                if r < 0 {
                    tracing::warn!(file = %path.display(), pts = sp.pts, "undecodable subtitle packet skipped");
                }
                continue;
            }
            let start_ms = ffi::av_rescale_q(sp.pts, tb, ffi::AVRational { num: 1, den: 1000 })
                + i64::from(sub.start_display_time);
            let shown = sub.end_display_time.saturating_sub(sub.start_display_time);
            let dur_ms = if shown > 0 && shown != u32::MAX {
                i64::from(shown)
            } else {
                ffi::av_rescale_q(sp.duration, tb, ffi::AVRational { num: 1, den: 1000 })
            };
            sub.start_display_time = 0;
            sub.end_display_time = dur_ms.clamp(0, i64::from(u32::MAX - 1)) as u32;
            sub.pts = start_ms * 1000;
            let n = if sub.num_rects > 0 {
                ffi::avcodec_encode_subtitle(enc.0, buf.as_mut_ptr(), buf.len() as i32, &sub)
            } else {
                0
            };
            ffi::avsubtitle_free(&mut sub);
            if n < 0 {
                return Err(err(
                    path,
                    &format!("cannot convert a subtitle to {}", to.name()),
                    ffmpeg_next::Error::from(n),
                ));
            }
            if n == 0 || dur_ms <= 0 {
                continue;
            }
            cues.push(StoredPacket {
                pts: start_ms,
                dts: start_ms,
                duration: dur_ms,
                key: true,
                data: buf[..n as usize].to_vec(),
            });
        }
        // Muxers need cues in time order.
        cues.sort_by_key(|c| c.pts);
        Ok(Converted { params, cues })
    }
}

/// `HH:MM:SS.mmm`, as WebVTT writes times.
pub fn vtt_time(ms: i64) -> String {
    let ms = ms.max(0);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// A WebVTT segment of cues overlapping `[from_ms, to_ms)` (a cue crossing a boundary is in both segments,
/// as HLS players expect). `mpegts` maps WebVTT time zero onto the media's 90 kHz timeline.
pub fn vtt_segment(cues: &[StoredPacket], from_ms: i64, to_ms: i64, mpegts: i64) -> String {
    let mut s = format!("WEBVTT\nX-TIMESTAMP-MAP=MPEGTS:{mpegts},LOCAL:00:00:00.000\n\n");
    for c in cues
        .iter()
        .filter(|c| c.pts < to_ms && c.pts + c.duration > from_ms)
    {
        let text = String::from_utf8_lossy(&c.data);
        s.push_str(&format!(
            "{} --> {}\n{}\n\n",
            vtt_time(c.pts),
            vtt_time(c.pts + c.duration),
            text.trim_end()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cue(pts: i64, duration: i64, text: &str) -> StoredPacket {
        StoredPacket {
            pts,
            dts: pts,
            duration,
            key: true,
            data: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn segments_hold_the_cues_they_overlap() {
        let cues = [
            cue(500, 1000, "one"),
            cue(1900, 300, "two"),
            cue(3_723_004, 1000, "late"),
        ];
        let a = vtt_segment(&cues, 0, 2000, 0);
        assert!(a.starts_with("WEBVTT\nX-TIMESTAMP-MAP=MPEGTS:0,LOCAL:00:00:00.000\n\n"));
        assert!(a.contains("00:00:00.500 --> 00:00:01.500\none\n"));
        assert!(a.contains("00:00:01.900 --> 00:00:02.200\ntwo\n"));
        // The cue crossing 2 s is repeated in the next segment; a cue is never in a segment it ends before.
        let b = vtt_segment(&cues, 2000, 4000, 0);
        assert!(b.contains("two") && !b.contains("one"));
        assert_eq!(vtt_time(3_723_004), "01:02:03.004");
        assert!(vtt_segment(&cues, 4000, 6000, 0).ends_with("LOCAL:00:00:00.000\n\n"));
    }
}
