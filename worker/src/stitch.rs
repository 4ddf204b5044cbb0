//! The stitcher: chunk bitstreams and the audio track, concatenated losslessly into the final container.
//! Outputs are written under a hidden temporary name and renamed into place only when complete.

use std::path::{Path, PathBuf};

use ffmpeg_next::{self as ff, ffi, format, Dictionary, Rational};
use serde::Serialize;

use crate::avlog;
use crate::error::{Error, Result};
use crate::packets::{PacketReader, StoredPacket, StreamParams};

pub struct StitchInput<'a> {
    pub chunks: &'a [PathBuf],
    pub audio: Option<&'a Path>,
    pub display_matrix: Option<[i32; 9]>,
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

/// Mux everything into `octx` (already created); `only_chunk_starts_are_key` makes segmenting muxers cut
/// exactly at chunk boundaries.
fn mux(
    input: &StitchInput<'_>,
    octx: &mut format::context::Output,
    out_path: &Path,
    opts: Dictionary,
    only_chunk_starts_are_key: bool,
) -> Result<Stitched> {
    let mut video = ChunkSequence::open(input.chunks)?;
    let mut audio = input.audio.map(PacketReader::open).transpose()?;
    let vparams = video.params.clone();
    let aparams = audio.as_ref().map(|a| a.params.clone());
    // SAFETY: streams are created on the output context we own and filled before the header is written.
    unsafe {
        for (i, p) in std::iter::once(&vparams).chain(aparams.iter()).enumerate() {
            let st = ffi::avformat_new_stream(octx.as_mut_ptr(), std::ptr::null());
            if st.is_null() {
                return Err(mux_err(out_path, "cannot add stream", i));
            }
            p.to_raw((*st).codecpar);
            (*st).time_base = tb(p.time_base).into();
            if i == 0 {
                if let Some(m) = input.display_matrix {
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
    let in_tb = [
        tb(vparams.time_base),
        aparams
            .as_ref()
            .map(|a| tb(a.time_base))
            .unwrap_or(Rational::new(1, 1)),
    ];

    let mut last_dts = [i64::MIN; 2];
    let mut stats = Stitched {
        width: vparams.width as u32,
        height: vparams.height as u32,
        ..Default::default()
    };
    let (mut first_pts, mut end_pts) = (i64::MAX, i64::MIN);
    let mut vnext = video.next()?;
    let mut anext = match audio.as_mut() {
        Some(a) => a.next_packet()?,
        None => None,
    };
    loop {
        // Interleave by DTS so the muxer never buffers much.
        let take_video = match (&vnext, &anext) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((v, _)), Some(a)) => {
                // SAFETY: pure arithmetic.
                unsafe { ffi::av_compare_ts(v.dts, in_tb[0].into(), a.dts, in_tb[1].into()) <= 0 }
            }
        };
        let (sp, idx, key) = if take_video {
            let (p, start) = vnext.take().expect("video packet");
            vnext = video.next()?;
            stats.frames += 1;
            first_pts = first_pts.min(p.pts);
            end_pts = end_pts.max(p.pts + p.duration);
            let key = if only_chunk_starts_are_key {
                start
            } else {
                p.key
            };
            (p, 0usize, key)
        } else {
            let p = anext.take().expect("audio packet");
            anext = audio.as_mut().expect("audio").next_packet()?;
            let key = p.key;
            (p, 1usize, key)
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
    }
    stats.codecs = codecs_string(&vparams, aparams.as_ref());
    Ok(stats)
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

/// Stitch into `<dir>/<name>.mp4` with the index at the front.
pub fn stitch_mp4(input: &StitchInput<'_>, dir: &Path, name: &str) -> Result<(Stitched, Staged)> {
    let final_path = dir.join(format!("{name}.mp4"));
    let tmp = dir.join(format!(".{name}.mp4.partial-{}", std::process::id()));
    let guard = Cleanup(Some(tmp.clone()));
    let mut octx = format::output_as(&tmp, "mp4")
        .map_err(|e| Error::media(&tmp, "cannot create output", e))?;
    let mut opts = Dictionary::new();
    opts.set("movflags", "+faststart");
    let mut stats = mux(input, &mut octx, &final_path, opts, false)?;
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

/// Stitch into `<dir>/<name>/index.m3u8` with one segment per chunk.
pub fn stitch_hls(input: &StitchInput<'_>, dir: &Path, name: &str) -> Result<(Stitched, Staged)> {
    let final_dir = dir.join(name);
    let tmp_dir = dir.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir).map_err(|source| Error::Write {
        path: tmp_dir.clone(),
        source,
    })?;
    let guard = Cleanup(Some(tmp_dir.clone()));
    // MPEG-TS for H.264+AAC (plays everywhere); fragmented MP4 for HEVC and AV1.
    let h264 = PacketReader::open(&input.chunks[0])?.params.codec_id
        == ffi::AVCodecID::AV_CODEC_ID_H264 as u32;
    let (seg_type, ext) = if h264 {
        ("mpegts", "ts")
    } else {
        ("fmp4", "m4s")
    };
    let playlist = tmp_dir.join("index.m3u8");
    let mut octx = format::output_as(&playlist, "hls")
        .map_err(|e| Error::media(&playlist, "cannot create output", e))?;
    let mut opts = Dictionary::new();
    // Cut at every keyframe; only chunk starts are marked as keyframes, so segments are exactly the chunks.
    opts.set("hls_time", "0.001");
    opts.set("hls_list_size", "0");
    opts.set("hls_playlist_type", "vod");
    opts.set("hls_segment_type", seg_type);
    opts.set("hls_flags", "independent_segments");
    opts.set(
        "hls_segment_filename",
        &tmp_dir.join(format!("seg_%05d.{ext}")).to_string_lossy(),
    );
    if !h264 {
        opts.set("hls_fmp4_init_filename", "init.mp4");
    }
    let mut stats = mux(input, &mut octx, &final_dir.join("index.m3u8"), opts, true)?;
    drop(octx);
    let text = std::fs::read_to_string(&playlist).map_err(|source| Error::Read {
        path: playlist.clone(),
        source,
    })?;
    let mut pending_dur = None;
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
                stats.peak_bandwidth = stats
                    .peak_bandwidth
                    .max((size as f64 * 8.0 / d).ceil() as u64);
            }
        }
    }
    stats.bytes = dir_size(&tmp_dir);
    stats.path = final_dir.join("index.m3u8");
    Ok((
        stats,
        Staged {
            tmp: tmp_dir,
            final_path: final_dir,
            guard,
        },
    ))
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

/// The master playlist, written atomically after every rendition's playlist exists.
pub fn write_master(dir: &Path, variants: &[(String, Stitched, f64)]) -> Result<PathBuf> {
    let mut s = String::from("#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    for (name, st, fps) in variants {
        let avg = if st.duration > 0.0 {
            (st.bytes as f64 * 8.0 / st.duration).ceil() as u64
        } else {
            0
        };
        s.push_str(&format!(
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={avg},RESOLUTION={}x{},FRAME-RATE={fps:.3}",
            st.peak_bandwidth.max(avg),
            st.width,
            st.height
        ));
        if let Some(c) = &st.codecs {
            s.push_str(&format!(",CODECS=\"{c}\""));
        }
        s.push_str(&format!("\n{name}/index.m3u8\n"));
    }
    let path = dir.join("master.m3u8");
    let tmp = dir.join(format!(".master.m3u8.partial-{}", std::process::id()));
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
