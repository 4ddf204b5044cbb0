//! Reading what fragmented MP4 (CMAF) segments really hold: the track's timescale from the init segment,
//! and from each media segment its fragments' decode start, duration and first sample. Manifests are written
//! from these figures, so the durations they state are the segments' own, never estimates.

use std::path::Path;

use crate::error::{Error, Result};

/// One `moof`+`mdat` fragment of a media segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// `tfdt` baseMediaDecodeTime, in the track's timescale.
    pub decode_start: u64,
    /// Sum of the sample durations.
    pub duration: u64,
    /// Composition offset of the first sample (its presentation time is `decode_start + this`).
    pub first_cts: i64,
    /// Byte offset of the `moof` in the segment file.
    pub offset: u64,
    /// Bytes from the `moof` to the end of the first sample's data: what an I-frame playlist's byte range
    /// covers to show this fragment's first (key) frame.
    pub first_sample_end: u64,
    pub samples: u32,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::media(path, "not a fragmented MP4 segment Tessera can read", what)
}

/// Boxes at this level: (type, payload start, end), in file order.
fn boxes(data: &[u8], from: usize, to: usize) -> Option<Vec<([u8; 4], usize, usize)>> {
    let mut out = Vec::new();
    let mut at = from;
    while at + 8 <= to {
        let size32 = u32::from_be_bytes(data[at..at + 4].try_into().ok()?) as u64;
        let kind: [u8; 4] = data[at + 4..at + 8].try_into().ok()?;
        let (size, header) = match size32 {
            1 => (
                u64::from_be_bytes(data.get(at + 8..at + 16)?.try_into().ok()?),
                16,
            ),
            0 => ((to - at) as u64, 8),
            n => (n, 8),
        };
        let end = at.checked_add(usize::try_from(size).ok()?)?;
        if size < header as u64 || end > to {
            return None;
        }
        out.push((kind, at + header, end));
        at = end;
    }
    Some(out)
}

fn child(data: &[u8], from: usize, to: usize, kind: &[u8; 4]) -> Option<(usize, usize)> {
    boxes(data, from, to)?
        .into_iter()
        .find(|(k, _, _)| k == kind)
        .map(|(_, s, e)| (s, e))
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(d.get(at..at + 8)?.try_into().ok()?))
}

/// The first track's timescale and default sample duration (`trex`) from an init segment.
/// Also the codec string where only the init segment tells it (AV1, from `av1C`).
pub fn init_info(path: &Path) -> Result<(u32, u32, Option<String>)> {
    let data = std::fs::read(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    let (timescale, duration) =
        parse_init(&data).ok_or_else(|| bad(path, "no moov/trak/mdia/mdhd"))?;
    Ok((timescale, duration, av1_codec_string(&data)))
}

fn parse_init(d: &[u8]) -> Option<(u32, u32)> {
    let (ms, me) = child(d, 0, d.len(), b"moov")?;
    let (ts, te) = child(d, ms, me, b"trak")?;
    let (ds, de) = child(d, ts, te, b"mdia")?;
    let (hs, _) = child(d, ds, de, b"mdhd")?;
    let timescale = if d[hs] == 1 {
        u32_at(d, hs + 4 + 16)?
    } else {
        u32_at(d, hs + 4 + 8)?
    };
    let default_duration = child(d, ms, me, b"mvex")
        .and_then(|(vs, ve)| child(d, vs, ve, b"trex"))
        .and_then(|(xs, _)| u32_at(d, xs + 4 + 8))
        .unwrap_or(0);
    Some((timescale, default_duration))
}

/// The fragments of a media segment.
pub fn segment_fragments(path: &Path, default_duration: u32) -> Result<Vec<Fragment>> {
    let data = std::fs::read(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    let f = parse_segment(&data, default_duration).ok_or_else(|| bad(path, "malformed moof"))?;
    if f.is_empty() {
        return Err(bad(path, "no moof"));
    }
    Ok(f)
}

fn parse_segment(d: &[u8], trex_duration: u32) -> Option<Vec<Fragment>> {
    let mut out = Vec::new();
    for (kind, ps, pe) in boxes(d, 0, d.len())? {
        if &kind != b"moof" {
            continue;
        }
        let moof_start = ps - 8;
        let (ts, te) = child(d, ps, pe, b"traf")?;
        let (hs, _) = child(d, ts, te, b"tfhd")?;
        let flags = u32_at(d, hs)? & 0x00ff_ffff;
        let mut at = hs + 8; // version/flags, track id
        let mut base = moof_start as u64;
        if flags & 0x1 != 0 {
            base = u64_at(d, at)?;
            at += 8;
        }
        if flags & 0x2 != 0 {
            at += 4;
        }
        let mut default_duration = trex_duration;
        if flags & 0x8 != 0 {
            default_duration = u32_at(d, at)?;
            at += 4;
        }
        let mut default_size = 0;
        if flags & 0x10 != 0 {
            default_size = u32_at(d, at)?;
        }
        let decode_start = match child(d, ts, te, b"tfdt") {
            Some((s, _)) if d[s] == 1 => u64_at(d, s + 4)?,
            Some((s, _)) => u64::from(u32_at(d, s + 4)?),
            None => 0,
        };
        let (rs, _) = child(d, ts, te, b"trun")?;
        let version = d[rs];
        let tflags = u32_at(d, rs)? & 0x00ff_ffff;
        let count = u32_at(d, rs + 4)?;
        let mut at = rs + 8;
        let mut data_offset = 0i64;
        if tflags & 0x1 != 0 {
            data_offset = i64::from(u32_at(d, at)? as i32);
            at += 4;
        }
        if tflags & 0x4 != 0 {
            at += 4;
        }
        let (mut duration, mut first_size, mut first_cts) = (0u64, 0u64, 0i64);
        for i in 0..count {
            let mut dur = default_duration;
            let mut size = default_size;
            let mut cts = 0i64;
            if tflags & 0x100 != 0 {
                dur = u32_at(d, at)?;
                at += 4;
            }
            if tflags & 0x200 != 0 {
                size = u32_at(d, at)?;
                at += 4;
            }
            if tflags & 0x400 != 0 {
                at += 4;
            }
            if tflags & 0x800 != 0 {
                let raw = u32_at(d, at)?;
                cts = if version == 0 {
                    i64::from(raw)
                } else {
                    i64::from(raw as i32)
                };
                at += 4;
            }
            duration += u64::from(dur);
            if i == 0 {
                first_size = u64::from(size);
                first_cts = cts;
            }
        }
        let first_start = (base as i64 + data_offset) as u64;
        out.push(Fragment {
            decode_start,
            duration,
            first_cts,
            offset: moof_start as u64,
            first_sample_end: first_start + first_size - moof_start as u64,
            samples: count,
        });
    }
    Some(out)
}

/// The RFC 6381 string of an AV1 track (`av01.0.04M.08`) from the `av1C` box of an init segment.
pub fn av1_codec_string(init: &[u8]) -> Option<String> {
    let at = init.windows(4).position(|w| w == b"av1C")? + 4;
    let c = init.get(at..at + 3)?;
    if c[0] != 0x81 {
        return None;
    }
    let (profile, level) = (c[1] >> 5, c[1] & 0x1f);
    let tier = if c[2] & 0x80 != 0 { 'H' } else { 'M' };
    let depth = match (c[2] & 0x40 != 0, c[2] & 0x20 != 0) {
        (true, true) => 12,
        (true, false) => 10,
        _ => 8,
    };
    Some(format!("av01.{profile}.{level:02}{tier}.{depth:02}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn fragments_give_decode_time_duration_and_first_sample_range() {
        // tfhd: default-base-is-moof (0x20000) with a default sample duration of 512.
        let tfhd = bx(
            b"tfhd",
            &[
                &[0, 0x02, 0, 0x08][..],
                &1u32.to_be_bytes(),
                &512u32.to_be_bytes(),
            ]
            .concat(),
        );
        let tfdt = bx(
            b"tfdt",
            &[&[1, 0, 0, 0][..], &25_600u64.to_be_bytes()].concat(),
        );
        // trun: data offset, sample size and composition offset per sample (v1: signed), 3 samples.
        let mut trun_p = vec![1, 0, 0x0a, 0x01];
        trun_p.extend_from_slice(&3u32.to_be_bytes());
        let data_offset_at = trun_p.len();
        trun_p.extend_from_slice(&0u32.to_be_bytes());
        for (size, cts) in [(1000u32, 1024i32), (200, -512), (300, 0)] {
            trun_p.extend_from_slice(&size.to_be_bytes());
            trun_p.extend_from_slice(&cts.to_be_bytes());
        }
        let build = |trun_p: &[u8]| {
            let traf = bx(
                b"traf",
                &[tfhd.clone(), tfdt.clone(), bx(b"trun", trun_p)].concat(),
            );
            bx(b"moof", &[bx(b"mfhd", &[0; 8]), traf].concat())
        };
        let moof_len = build(&trun_p).len() as u32;
        trun_p[data_offset_at..data_offset_at + 4].copy_from_slice(&(moof_len + 8).to_be_bytes());
        let seg = [build(&trun_p), bx(b"mdat", &[0u8; 1500])].concat();
        let f = parse_segment(&seg, 0).expect("parses");
        assert_eq!(
            f,
            [Fragment {
                decode_start: 25_600,
                duration: 1536,
                first_cts: 1024,
                offset: 0,
                first_sample_end: u64::from(moof_len) + 8 + 1000,
                samples: 3,
            }]
        );
        // A truncated segment is refused, not misread.
        assert!(parse_segment(&seg[..seg.len() / 3], 0).is_none());
    }

    #[test]
    fn av1_codec_strings_come_from_av1c() {
        // Main profile, level 4.0 (8), main tier, 8-bit; then level 5.1 (13), high tier, 10-bit.
        let a = [&b"....av1C"[..], &[0x81, 0x08, 0x0c]].concat();
        assert_eq!(av1_codec_string(&a).as_deref(), Some("av01.0.08M.08"));
        let b = [&b"....av1C"[..], &[0x81, 0x0d, 0xcc]].concat();
        assert_eq!(av1_codec_string(&b).as_deref(), Some("av01.0.13H.10"));
        assert_eq!(av1_codec_string(b"no box here"), None);
    }
}
