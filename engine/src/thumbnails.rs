//! Thumbnails for scrubbing: one picture every `intervalSeconds`, tiled into JPEG sprite sheets, listed by a
//! WebVTT thumbnail track (`sprite_001.jpg#xywh=x,y,w,h`, as Shaka Player and video.js read it) and, for
//! DASH, by an image AdaptationSet (DASH-IF thumbnail tiles). Each picture is found by seeking to the
//! keyframe before its time and decoding up to it, so the cost grows with the number of thumbnails, not with
//! the input's length.

use std::fmt::Write as _;
use std::path::Path;

use ffmpeg_next::{self as ff, codec, ffi, format::Pixel, frame, Rational};

use crate::chunk::rescale;
use crate::error::{Error, Result};
use crate::probe::{open_input, ProbeInfo};
use crate::scale::Converter;

/// Tiles per sprite sheet, across and down.
pub const COLUMNS: u32 = 5;
pub const ROWS: u32 = 5;

/// What was written.
#[derive(Debug, Clone)]
pub struct Thumbnails {
    pub interval: f64,
    pub tile_width: u32,
    pub tile_height: u32,
    pub count: usize,
    /// Sprite sheet file names, in order.
    pub sheets: Vec<String>,
}

impl Thumbnails {
    /// Where thumbnail `k` lies: (sheet, x, y).
    pub fn place(&self, k: usize) -> (usize, u32, u32) {
        place(k, self.tile_width, self.tile_height)
    }

    /// The WebVTT thumbnail track for a presentation of `duration` seconds.
    pub fn vtt(&self, duration: f64) -> String {
        let mut s = String::from("WEBVTT\n\n");
        for k in 0..self.count {
            let from = k as f64 * self.interval;
            let to = ((k + 1) as f64 * self.interval).min(duration.max(from + 0.001));
            let (sheet, x, y) = self.place(k);
            let ms = |t: f64| crate::subtitles::vtt_time((t * 1000.0).round() as i64);
            let _ = write!(
                s,
                "{} --> {}\n{}#xywh={x},{y},{},{}\n\n",
                ms(from),
                ms(to),
                self.sheets[sheet],
                self.tile_width,
                self.tile_height
            );
        }
        s
    }
}

/// The thumbnail size for a source of `w`x`h` (display aspect) at `width` pixels across: even sizes.
pub fn tile_size(w: u32, h: u32, width: u32) -> (u32, u32) {
    let tw = (width.max(16) / 2) * 2;
    let th = ((f64::from(tw) * f64::from(h) / f64::from(w.max(1)) / 2.0).round() as u32 * 2).max(2);
    (tw, th)
}

fn err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::media(path, what, e)
}

/// Make the sprite sheets in `dir` for `info`'s video, one thumbnail every `interval` seconds, `width`
/// pixels wide.
pub fn make(info: &ProbeInfo, interval: f64, width: u32, dir: &Path) -> Result<Thumbnails> {
    let path = &info.path;
    let v = &info.video;
    let (tw, th) = tile_size(v.width, v.height, width);
    let count = ((info.duration / interval).ceil() as usize).max(1);
    let mut ictx = open_input(path)?;
    let st = ictx
        .stream(v.index)
        .ok_or_else(|| err(path, "stream vanished", v.index))?;
    let tb = st.time_base();
    let mut dec = codec::context::Context::from_parameters(st.parameters())
        .and_then(|c| c.decoder().video())
        .map_err(|e| err(path, "cannot open the video decoder", e))?;
    let mjpeg = ff::encoder::find_by_name("mjpeg")
        .ok_or_else(|| err(path, "thumbnails", "no mjpeg encoder"))?;
    let mut scaler = Converter::new(Pixel::YUVJ420P, tw, th);
    let start = rescale(
        (info.start_time * 1e6).round() as i64,
        Rational::new(1, 1_000_000),
        tb,
    );
    let per = (COLUMNS * ROWS) as usize;
    let mut sheets = Vec::new();
    let mut sheet: Option<frame::Video> = None;
    let mut decoded = frame::Video::empty();
    for k in 0..count {
        let target = start
            + rescale(
                (k as f64 * interval * 1e6).round() as i64,
                Rational::new(1, 1_000_000),
                tb,
            );
        // SAFETY: seeking an open input; the decoder is flushed after it.
        unsafe {
            ffi::av_seek_frame(
                ictx.as_mut_ptr(),
                v.index as i32,
                target,
                ffi::AVSEEK_FLAG_BACKWARD,
            );
            ffi::avcodec_flush_buffers(dec.as_mut_ptr());
        }
        let mut picture: Option<frame::Video> = None;
        let mut packets = ictx.packets();
        loop {
            let next = packets.next();
            match &next {
                Some((s, p)) if s.index() == v.index => {
                    let _ = dec.send_packet(p);
                }
                Some(_) => continue,
                None => {
                    let _ = dec.send_eof();
                }
            }
            while dec.receive_frame(&mut decoded).is_ok() {
                let at = decoded.timestamp().unwrap_or(i64::MIN);
                picture = Some(decoded.clone());
                if at >= target {
                    break;
                }
            }
            if next.is_none()
                || picture
                    .as_ref()
                    .is_some_and(|p| p.timestamp().unwrap_or(i64::MIN) >= target)
            {
                break;
            }
        }
        ictx.check()?;
        let Some(pic) = picture else {
            return Err(err(
                path,
                "thumbnails",
                format!("no picture decoded near {:.3} s", k as f64 * interval),
            ));
        };
        let tile = scaler
            .convert(&pic)
            .map_err(|e| err(path, "thumbnail scaling", e))?
            .unwrap_or(pic);
        let sh = sheet.get_or_insert_with(|| blank(tw * COLUMNS, th * ROWS));
        let (_, x, y) = place(k, tw, th);
        blit(&tile, sh, x, y);
        if (k + 1) % per == 0 || k + 1 == count {
            let name = format!("sprite_{:03}.jpg", sheets.len() + 1);
            write_jpeg(
                mjpeg,
                sheet.take().expect("sheet in progress"),
                &dir.join(&name),
            )?;
            sheets.push(name);
        }
    }
    Ok(Thumbnails {
        interval,
        tile_width: tw,
        tile_height: th,
        count,
        sheets,
    })
}

fn place(k: usize, tw: u32, th: u32) -> (usize, u32, u32) {
    let per = (COLUMNS * ROWS) as usize;
    let i = (k % per) as u32;
    (k / per, (i % COLUMNS) * tw, (i / COLUMNS) * th)
}

fn blank(w: u32, h: u32) -> frame::Video {
    let mut f = frame::Video::new(Pixel::YUVJ420P, w, h);
    for (plane, value) in [(0, 0u8), (1, 128), (2, 128)] {
        f.data_mut(plane).fill(value);
    }
    f
}

/// Copy `tile` into `sheet` at (x, y) (even coordinates; 4:2:0 planes).
fn blit(tile: &frame::Video, sheet: &mut frame::Video, x: u32, y: u32) {
    for plane in 0..3 {
        let (sx, sy) = if plane == 0 { (x, y) } else { (x / 2, y / 2) };
        let (w, h) = if plane == 0 {
            (tile.width(), tile.height())
        } else {
            (tile.width() / 2, tile.height() / 2)
        };
        let (src_stride, dst_stride) = (tile.stride(plane), sheet.stride(plane));
        for row in 0..h as usize {
            let s = &tile.data(plane)[row * src_stride..row * src_stride + w as usize];
            let at = (sy as usize + row) * dst_stride + sx as usize;
            sheet.data_mut(plane)[at..at + w as usize].copy_from_slice(s);
        }
    }
}

fn write_jpeg(codec: ff::Codec, sheet: frame::Video, path: &Path) -> Result<()> {
    let mut enc = codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(|e| err(path, "jpeg encoder", e))?;
    enc.set_width(sheet.width());
    enc.set_height(sheet.height());
    enc.set_format(Pixel::YUVJ420P);
    enc.set_time_base(Rational::new(1, 1));
    // SAFETY: plain fields of the context being configured: fixed quality (qscale 4).
    unsafe {
        (*enc.as_mut_ptr()).flags |= ffi::AV_CODEC_FLAG_QSCALE as i32;
        (*enc.as_mut_ptr()).global_quality = 4 * ffi::FF_QP2LAMBDA;
    }
    let mut enc = enc.open().map_err(|e| err(path, "jpeg encoder", e))?;
    let mut f = sheet;
    f.set_pts(Some(0));
    // SAFETY: plain field of the frame we own.
    unsafe { (*f.as_mut_ptr()).quality = 4 * ffi::FF_QP2LAMBDA };
    enc.send_frame(&f)
        .map_err(|e| err(path, "jpeg encode", e))?;
    enc.send_eof().map_err(|e| err(path, "jpeg encode", e))?;
    let mut p = ff::Packet::empty();
    let mut bytes = Vec::new();
    while enc.receive_packet(&mut p).is_ok() {
        bytes.extend_from_slice(p.data().unwrap_or(&[]));
    }
    std::fs::write(path, bytes).map_err(|source| Error::Write {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_placed_row_by_row_and_listed_by_time() {
        assert_eq!(tile_size(1920, 1080, 160), (160, 90));
        assert_eq!(tile_size(320, 240, 101), (100, 76));
        let t = Thumbnails {
            interval: 2.0,
            tile_width: 160,
            tile_height: 90,
            count: 27,
            sheets: vec!["sprite_001.jpg".into(), "sprite_002.jpg".into()],
        };
        assert_eq!(t.place(0), (0, 0, 0));
        assert_eq!(t.place(6), (0, 160, 90));
        assert_eq!(t.place(26), (1, 160, 0));
        let vtt = t.vtt(53.5);
        assert!(vtt.starts_with(
            "WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nsprite_001.jpg#xywh=0,0,160,90\n"
        ));
        assert!(
            vtt.ends_with("00:00:52.000 --> 00:00:53.500\nsprite_002.jpg#xywh=160,0,160,90\n\n"),
            "{vtt}"
        );
    }
}
