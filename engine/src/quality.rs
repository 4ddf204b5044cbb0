//! Objective quality of each rendition against the source scaled to the rendition's size: PSNR (from the
//! mean squared error over all frames and planes, weighted by plane size, as FFmpeg's `psnr` filter
//! reports it) and SSIM (8x8 windows on a 4x4 grid, planes weighted by size, averaged over frames, as
//! FFmpeg's `ssim` filter does). The source is decoded once for all renditions.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ffmpeg_next::{self as ff, codec, format::Pixel, frame};

use crate::error::{Error, Result};
use crate::probe::open_input;
use crate::scale::Converter;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub psnr: f64,
    pub ssim: f64,
    pub frames: u64,
}

/// Decoded frames of one file's video stream, in presentation order.
struct Frames {
    ictx: crate::probe::Input,
    decoder: ff::decoder::Video,
    stream: usize,
    eof: bool,
}

impl Frames {
    fn open(path: &Path, stream: Option<usize>) -> Result<Self> {
        let ictx = open_input(path)?;
        let st = match stream {
            Some(i) => ictx.stream(i),
            None => ictx.streams().best(ff::media::Type::Video),
        }
        .ok_or_else(|| Error::media(path, "no video stream to measure", ""))?;
        let stream = st.index();
        let mut ctx = codec::context::Context::from_parameters(st.parameters())
            .map_err(|e| Error::media(path, "decoder", e))?;
        ctx.set_threading(codec::threading::Config::kind(
            codec::threading::Type::Frame,
        ));
        let decoder = ctx
            .decoder()
            .video()
            .map_err(|e| Error::media(path, "decoder", e))?;
        Ok(Self {
            ictx,
            decoder,
            stream,
            eof: false,
        })
    }

    /// The next decoded frame, or `None` at the end.
    fn next(&mut self) -> Option<frame::Video> {
        let mut f = frame::Video::empty();
        loop {
            if self.decoder.receive_frame(&mut f).is_ok() {
                return Some(f);
            }
            if self.eof {
                return None;
            }
            match self.ictx.packets().next() {
                Some((s, p)) if s.index() == self.stream => {
                    let _ = self.decoder.send_packet(&p);
                }
                Some(_) => {}
                None => {
                    self.eof = true;
                    let _ = self.decoder.send_eof();
                }
            }
        }
    }
}

/// A frame as 8-bit 4:2:0 at the converter's size.
fn as_yuv420p(c: &mut Converter, f: frame::Video, path: &Path) -> Result<frame::Video> {
    Ok(c.convert(&f)
        .map_err(|e| Error::media(path, "scaling", e))?
        .unwrap_or(f))
}

#[derive(Default)]
struct Acc {
    sse: f64,
    samples: f64,
    ssim: f64,
    frames: u64,
}

/// Measure every output against the source. Outputs are `(path, width, height)`.
pub fn measure(
    source: &Path,
    stream: usize,
    outputs: &[(PathBuf, u32, u32)],
    cancel: &AtomicBool,
) -> Result<Vec<Scores>> {
    let mut src = Frames::open(source, Some(stream))?;
    // Per output: its decoder, a converter for it, one for the source at its size, and the totals.
    let mut outs = outputs
        .iter()
        .map(|(p, w, h)| {
            let conv = || Converter::new(Pixel::YUV420P, *w, *h);
            Ok((Frames::open(p, None)?, conv(), conv(), Acc::default()))
        })
        .collect::<Result<Vec<_>>>()?;
    while let Some(s) = src.next() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        for ((out, out_conv, src_conv, a), (path, _, _)) in outs.iter_mut().zip(outputs) {
            // An output with fewer frames than the source is compared over the frames it has.
            let Some(m) = out.next() else { continue };
            let m = as_yuv420p(out_conv, m, path)?;
            let r = as_yuv420p(src_conv, s.clone(), source)?;
            let mut frame_ssim = 0.0;
            let mut weight = 0.0;
            for plane in 0..3 {
                let (w, h) = (
                    m.plane_width(plane) as usize,
                    m.plane_height(plane) as usize,
                );
                let pm = Plane {
                    data: m.data(plane),
                    stride: m.stride(plane),
                    w,
                    h,
                };
                let pr = Plane {
                    data: r.data(plane),
                    stride: r.stride(plane),
                    w,
                    h,
                };
                a.sse += sse(&pm, &pr) as f64;
                a.samples += (w * h) as f64;
                frame_ssim += ssim_plane(&pm, &pr) * (w * h) as f64;
                weight += (w * h) as f64;
            }
            a.ssim += frame_ssim / weight;
            a.frames += 1;
        }
    }
    src.ictx.check()?;
    Ok(outs
        .iter()
        .map(|(_, _, _, a)| Scores {
            psnr: psnr(a.sse, a.samples),
            ssim: if a.frames > 0 {
                a.ssim / a.frames as f64
            } else {
                0.0
            },
            frames: a.frames,
        })
        .collect())
}

/// One 8-bit plane.
pub struct Plane<'a> {
    pub data: &'a [u8],
    pub stride: usize,
    pub w: usize,
    pub h: usize,
}

impl Plane<'_> {
    fn row(&self, y: usize) -> &[u8] {
        &self.data[y * self.stride..y * self.stride + self.w]
    }
}

pub fn sse(a: &Plane<'_>, b: &Plane<'_>) -> u64 {
    (0..a.h)
        .map(|y| {
            a.row(y)
                .iter()
                .zip(b.row(y))
                .map(|(&x, &y)| (i32::from(x) - i32::from(y)).pow(2) as u64)
                .sum::<u64>()
        })
        .sum()
}

/// PSNR in dB from accumulated squared error; identical inputs give `f64::INFINITY`.
pub fn psnr(sse: f64, samples: f64) -> f64 {
    if sse <= 0.0 {
        return f64::INFINITY;
    }
    10.0 * ((255.0 * 255.0) / (sse / samples)).log10()
}

/// SSIM of one plane with 8x8 windows stepped by 4 pixels, as in x264 and FFmpeg.
pub fn ssim_plane(a: &Plane<'_>, b: &Plane<'_>) -> f64 {
    let (bw, bh) = (a.w / 4, a.h / 4);
    if bw < 2 || bh < 2 {
        return 1.0;
    }
    // Per 4x4 block: sum a, sum b, sum a²+b², sum ab.
    let mut blocks = vec![[0i64; 4]; bw * bh];
    for by in 0..bh {
        for y in by * 4..by * 4 + 4 {
            let (ra, rb) = (a.row(y), b.row(y));
            for bx in 0..bw {
                let s = &mut blocks[by * bw + bx];
                for x in bx * 4..bx * 4 + 4 {
                    let (p, q) = (i64::from(ra[x]), i64::from(rb[x]));
                    s[0] += p;
                    s[1] += q;
                    s[2] += p * p + q * q;
                    s[3] += p * q;
                }
            }
        }
    }
    let c1 = (0.01 * 0.01 * 255.0 * 255.0 * 64.0 + 0.5) as i64 as f64;
    let c2 = (0.03 * 0.03 * 255.0 * 255.0 * 64.0 * 63.0 + 0.5) as i64 as f64;
    let mut total = 0.0;
    for by in 1..bh {
        for bx in 0..bw - 1 {
            let mut s = [0i64; 4];
            for (yy, xx) in [(by - 1, bx), (by - 1, bx + 1), (by, bx), (by, bx + 1)] {
                for k in 0..4 {
                    s[k] += blocks[yy * bw + xx][k];
                }
            }
            let (s1, s2, ss, s12) = (s[0] as f64, s[1] as f64, s[2] as f64, s[3] as f64);
            let vars = ss * 64.0 - s1 * s1 - s2 * s2;
            let covar = s12 * 64.0 - s1 * s2;
            total += (2.0 * s1 * s2 + c1) * (2.0 * covar + c2)
                / ((s1 * s1 + s2 * s2 + c1) * (vars + c2));
        }
    }
    total / ((bh - 1) * (bw - 1)) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(data: &[u8], w: usize, h: usize) -> Plane<'_> {
        Plane {
            data,
            stride: w,
            w,
            h,
        }
    }

    #[test]
    fn identical_planes_are_perfect() {
        let d: Vec<u8> = (0..64 * 32).map(|i| (i * 7 % 251) as u8).collect();
        let p = plane(&d, 64, 32);
        assert_eq!(sse(&p, &p), 0);
        assert_eq!(psnr(0.0, 10.0), f64::INFINITY);
        assert!((ssim_plane(&p, &p) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_of_a_constant_error_is_known() {
        let a = vec![100u8; 16 * 16];
        let b = vec![102u8; 16 * 16];
        let (pa, pb) = (plane(&a, 16, 16), plane(&b, 16, 16));
        assert_eq!(sse(&pa, &pb), 4 * 256);
        // MSE 4 → 10·log10(255²/4) = 42.110 dB.
        assert!((psnr(1024.0, 256.0) - 42.1102).abs() < 1e-3);
    }

    #[test]
    fn noise_lowers_ssim_monotonically() {
        let a: Vec<u8> = (0..64 * 64).map(|i| ((i % 64) * 4) as u8).collect();
        let noisy = |amp: i32| -> Vec<u8> {
            a.iter()
                .enumerate()
                .map(|(i, &v)| {
                    (i32::from(v) + if i % 2 == 0 { amp } else { -amp }).clamp(0, 255) as u8
                })
                .collect()
        };
        let (b1, b2) = (noisy(2), noisy(20));
        let s1 = ssim_plane(&plane(&a, 64, 64), &plane(&b1, 64, 64));
        let s2 = ssim_plane(&plane(&a, 64, 64), &plane(&b2, 64, 64));
        assert!(s1 < 1.0 && s2 < s1, "{s1} {s2}");
    }
}
