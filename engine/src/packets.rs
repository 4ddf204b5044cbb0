//! Tessera's intermediate packet files: one encoded stream (a chunk of video or a whole audio track) with
//! its codec parameters and every packet's exact timestamps. Containers would round timestamps (Matroska),
//! rebuild DTS (NUT) or shift starts (MP4); this format keeps them exactly as the encoder produced them.
//!
//! Layout: `TSRAPKT1`, u32 header length, JSON header, then records `u32 size, i64 pts, i64 dts,
//! i64 duration, u32 flags, data`, ended by `u32::MAX, u64 packet count` so a truncated file is detected.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ffmpeg_next::{ffi, Packet};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"TSRAPKT1";
const END: u32 = u32::MAX;

/// The codec parameters a muxer needs, copied out of and back into `AVCodecParameters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamParams {
    pub codec_type: i32,
    pub codec_id: u32,
    pub extradata: Vec<u8>,
    pub format: i32,
    pub bit_rate: i64,
    pub profile: i32,
    pub level: i32,
    pub width: i32,
    pub height: i32,
    pub sar: (i32, i32),
    pub color: [u32; 5],
    pub video_delay: i32,
    pub sample_rate: i32,
    pub channels: i32,
    pub channel_mask: u64,
    pub frame_size: i32,
    pub initial_padding: i32,
    pub block_align: i32,
    /// Time base of every timestamp in the file.
    pub time_base: (i32, i32),
    /// Encoder name, for reports.
    pub encoder: String,
}

impl StreamParams {
    /// # Safety
    /// `p` must point to valid codec parameters.
    pub unsafe fn from_raw(
        p: *const ffi::AVCodecParameters,
        time_base: (i32, i32),
        encoder: &str,
    ) -> Self {
        // SAFETY: the caller guarantees `p` is valid.
        let p = unsafe { &*p };
        let extradata = if p.extradata.is_null() || p.extradata_size <= 0 {
            Vec::new()
        } else {
            // SAFETY: extradata holds extradata_size bytes.
            unsafe { std::slice::from_raw_parts(p.extradata, p.extradata_size as usize) }.to_vec()
        };
        let mask = if p.ch_layout.order == ffi::AVChannelOrder::AV_CHANNEL_ORDER_NATIVE {
            // SAFETY: `mask` is the active union member for native order.
            unsafe { p.ch_layout.u.mask }
        } else {
            0
        };
        Self {
            codec_type: p.codec_type as i32,
            codec_id: p.codec_id as u32,
            extradata,
            format: p.format,
            bit_rate: p.bit_rate,
            profile: p.profile,
            level: p.level,
            width: p.width,
            height: p.height,
            sar: (p.sample_aspect_ratio.num, p.sample_aspect_ratio.den),
            color: [
                p.color_range as u32,
                p.color_primaries as u32,
                p.color_trc as u32,
                p.color_space as u32,
                p.chroma_location as u32,
            ],
            video_delay: p.video_delay,
            sample_rate: p.sample_rate,
            channels: p.ch_layout.nb_channels,
            channel_mask: mask,
            frame_size: p.frame_size,
            initial_padding: p.initial_padding,
            block_align: p.block_align,
            time_base,
            encoder: encoder.to_string(),
        }
    }

    /// # Safety
    /// `p` must point to valid, writable codec parameters.
    pub unsafe fn to_raw(&self, p: *mut ffi::AVCodecParameters) {
        // SAFETY: the caller guarantees `p` is valid; enum values were read from FFmpeg by `from_raw`.
        unsafe {
            let p = &mut *p;
            p.codec_type = std::mem::transmute::<i32, ffi::AVMediaType>(self.codec_type);
            p.codec_id = std::mem::transmute::<u32, ffi::AVCodecID>(self.codec_id);
            // HEVC as `hvc1` (parameter sets in the sample entry only), which Apple players require; the
            // muxers' default `hev1` allows them in-band. Everything else: the muxer's own default.
            p.codec_tag = if self.codec_id == ffi::AVCodecID::AV_CODEC_ID_HEVC as u32 {
                u32::from_le_bytes(*b"hvc1")
            } else {
                0
            };
            if !p.extradata.is_null() {
                ffi::av_freep(&mut p.extradata as *mut *mut u8 as *mut std::ffi::c_void);
            }
            p.extradata_size = 0;
            if !self.extradata.is_empty() {
                let n = self.extradata.len();
                let buf =
                    ffi::av_mallocz(n + ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize) as *mut u8;
                std::ptr::copy_nonoverlapping(self.extradata.as_ptr(), buf, n);
                p.extradata = buf;
                p.extradata_size = n as i32;
            }
            p.format = self.format;
            p.bit_rate = self.bit_rate;
            p.profile = self.profile;
            p.level = self.level;
            p.width = self.width;
            p.height = self.height;
            p.sample_aspect_ratio = ffi::AVRational {
                num: self.sar.0,
                den: self.sar.1,
            };
            p.color_range = std::mem::transmute::<u32, ffi::AVColorRange>(self.color[0]);
            p.color_primaries = std::mem::transmute::<u32, ffi::AVColorPrimaries>(self.color[1]);
            p.color_trc =
                std::mem::transmute::<u32, ffi::AVColorTransferCharacteristic>(self.color[2]);
            p.color_space = std::mem::transmute::<u32, ffi::AVColorSpace>(self.color[3]);
            p.chroma_location = std::mem::transmute::<u32, ffi::AVChromaLocation>(self.color[4]);
            p.video_delay = self.video_delay;
            p.sample_rate = self.sample_rate;
            if self.channels > 0 {
                ffi::av_channel_layout_uninit(&mut p.ch_layout);
                if self.channel_mask != 0 {
                    ffi::av_channel_layout_from_mask(&mut p.ch_layout, self.channel_mask);
                } else {
                    ffi::av_channel_layout_default(&mut p.ch_layout, self.channels);
                }
            }
            p.frame_size = self.frame_size;
            p.initial_padding = self.initial_padding;
            p.block_align = self.block_align;
        }
    }
}

/// One packet as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPacket {
    pub pts: i64,
    pub dts: i64,
    pub duration: i64,
    pub key: bool,
    pub data: Vec<u8>,
}

impl StoredPacket {
    pub fn to_packet(&self) -> Packet {
        let mut p = Packet::copy(&self.data);
        p.set_pts(Some(self.pts));
        p.set_dts(Some(self.dts));
        p.set_duration(self.duration);
        if self.key {
            p.set_flags(ffmpeg_next::packet::Flags::KEY);
        }
        p
    }
}

/// Writes a packet file under a temporary name; `finish` renames it into place.
pub struct PacketWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    count: u64,
}

impl PacketWriter {
    pub fn create(path: &Path, params: &StreamParams) -> Result<Self> {
        let tmp = path.with_extension("tpk.partial");
        let werr = |source| Error::Write {
            path: tmp.clone(),
            source,
        };
        let mut out = BufWriter::new(File::create(&tmp).map_err(werr)?);
        let header = serde_json::to_vec(params).expect("stream parameters serialise");
        out.write_all(MAGIC).map_err(werr)?;
        out.write_all(&(header.len() as u32).to_le_bytes())
            .map_err(werr)?;
        out.write_all(&header).map_err(werr)?;
        Ok(Self {
            out,
            tmp,
            path: path.into(),
            count: 0,
        })
    }

    pub fn write(&mut self, p: &Packet) -> Result<()> {
        let data = p.data().unwrap_or(&[]);
        let pts = p.pts().or(p.dts()).unwrap_or(0);
        let dts = p.dts().unwrap_or(pts);
        let w = &mut self.out;
        let res = (|| {
            w.write_all(&(data.len() as u32).to_le_bytes())?;
            w.write_all(&pts.to_le_bytes())?;
            w.write_all(&dts.to_le_bytes())?;
            w.write_all(&p.duration().to_le_bytes())?;
            w.write_all(&(p.is_key() as u32).to_le_bytes())?;
            w.write_all(data)
        })();
        res.map_err(|source| Error::Write {
            path: self.tmp.clone(),
            source,
        })?;
        self.count += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<u64> {
        let werr = |source| Error::Write {
            path: self.tmp.clone(),
            source,
        };
        self.out.write_all(&END.to_le_bytes()).map_err(werr)?;
        self.out
            .write_all(&self.count.to_le_bytes())
            .map_err(werr)?;
        self.out.flush().map_err(werr)?;
        std::fs::rename(&self.tmp, &self.path).map_err(|source| Error::Write {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.count)
    }
}

/// Reads a packet file written by [`PacketWriter`]; a missing end marker is an error.
pub struct PacketReader {
    input: BufReader<File>,
    path: PathBuf,
    pub params: StreamParams,
    seen: u64,
    done: bool,
}

impl PacketReader {
    pub fn open(path: &Path) -> Result<Self> {
        let rerr = |source| Error::Read {
            path: path.into(),
            source,
        };
        let mut input = BufReader::new(File::open(path).map_err(rerr)?);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(rerr)?;
        if &magic != MAGIC {
            return Err(Error::media(path, "not a Tessera packet file", "bad magic"));
        }
        let mut len = [0u8; 4];
        input.read_exact(&mut len).map_err(rerr)?;
        let mut header = vec![0u8; u32::from_le_bytes(len) as usize];
        input.read_exact(&mut header).map_err(rerr)?;
        let params = serde_json::from_slice(&header)
            .map_err(|e| Error::media(path, "bad packet file header", e))?;
        Ok(Self {
            input,
            path: path.into(),
            params,
            seen: 0,
            done: false,
        })
    }

    /// The next packet, or `None` at the (verified) end.
    pub fn next_packet(&mut self) -> Result<Option<StoredPacket>> {
        if self.done {
            return Ok(None);
        }
        let path = self.path.clone();
        let rerr = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::media(&path, "packet file is truncated", "no end marker")
            } else {
                Error::Read {
                    path: path.clone(),
                    source,
                }
            }
        };
        let mut b4 = [0u8; 4];
        let mut b8 = [0u8; 8];
        self.input.read_exact(&mut b4).map_err(rerr)?;
        let size = u32::from_le_bytes(b4);
        if size == END {
            self.input.read_exact(&mut b8).map_err(rerr)?;
            let count = u64::from_le_bytes(b8);
            if count != self.seen {
                return Err(Error::media(
                    &self.path,
                    "packet file is inconsistent",
                    format!("{} packets, end says {count}", self.seen),
                ));
            }
            self.done = true;
            return Ok(None);
        }
        let mut i64s = [0i64; 3];
        for v in &mut i64s {
            self.input.read_exact(&mut b8).map_err(rerr)?;
            *v = i64::from_le_bytes(b8);
        }
        self.input.read_exact(&mut b4).map_err(rerr)?;
        let key = u32::from_le_bytes(b4) & 1 == 1;
        let mut data = vec![0u8; size as usize];
        self.input.read_exact(&mut data).map_err(rerr)?;
        self.seen += 1;
        Ok(Some(StoredPacket {
            pts: i64s[0],
            dts: i64s[1],
            duration: i64s[2],
            key,
            data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> StreamParams {
        StreamParams {
            codec_type: 0,
            codec_id: ffi::AVCodecID::AV_CODEC_ID_H264 as u32,
            extradata: vec![1, 2, 3],
            format: 0,
            bit_rate: 0,
            profile: 100,
            level: 31,
            width: 640,
            height: 360,
            sar: (1, 1),
            color: [0, 2, 2, 2, 0],
            video_delay: 2,
            sample_rate: 0,
            channels: 0,
            channel_mask: 0,
            frame_size: 0,
            initial_padding: 0,
            block_align: 0,
            time_base: (1, 25),
            encoder: "libx264".into(),
        }
    }

    #[test]
    fn round_trips_packets_and_detects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.tpk");
        let mut w = PacketWriter::create(&path, &params()).unwrap();
        for i in 0..3i64 {
            let mut p = Packet::copy(&[i as u8; 10]);
            p.set_pts(Some(i + 2));
            p.set_dts(Some(i));
            p.set_duration(1);
            if i == 0 {
                p.set_flags(ffmpeg_next::packet::Flags::KEY);
            }
            w.write(&p).unwrap();
        }
        assert!(!path.exists(), "visible before finish");
        assert_eq!(w.finish().unwrap(), 3);
        let mut r = PacketReader::open(&path).unwrap();
        assert_eq!(r.params, params());
        let got: Vec<StoredPacket> = std::iter::from_fn(|| r.next_packet().unwrap()).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(
            (got[0].pts, got[0].dts, got[0].key, got[1].key),
            (2, 0, true, false)
        );
        assert_eq!(got[2].data, vec![2u8; 10]);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
        let mut r = PacketReader::open(&path).unwrap();
        let err = std::iter::from_fn(|| Some(r.next_packet()))
            .find_map(|x| x.err())
            .unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
