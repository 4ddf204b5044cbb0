//! VMAF through libvmaf 2.3.1 (BSD-2-Clause-Patent), linked statically with its built-in models
//! (`build.rs`). The few functions used are declared here by hand, from libvmaf's public headers.
//!
//! A [`Meter`] takes pairs of frames (the reference: the source scaled to the rendition, exactly what the
//! encoder was given; the distorted: the encoder's output decoded) and answers one score per frame.

use std::ffi::{c_char, c_int, c_uint, c_void, CString};

use ffmpeg_next::{format::Pixel, frame};

use crate::scale::Converter;

mod ffi {
    use super::*;

    #[repr(C)]
    pub struct VmafContext {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub struct VmafModel {
        _p: [u8; 0],
    }

    #[repr(C)]
    pub struct VmafConfiguration {
        pub log_level: c_int,
        pub n_threads: c_uint,
        pub n_subsample: c_uint,
        pub cpumask: u64,
    }

    #[repr(C)]
    pub struct VmafModelConfig {
        pub name: *const c_char,
        pub flags: u64,
    }

    #[repr(C)]
    pub struct VmafPicture {
        pub pix_fmt: c_int,
        pub bpc: c_uint,
        pub w: [c_uint; 3],
        pub h: [c_uint; 3],
        pub stride: [isize; 3],
        pub data: [*mut c_void; 3],
        pub r#ref: *mut c_void,
    }

    pub const PIX_FMT_YUV420P: c_int = 1;
    pub const PIX_FMT_YUV422P: c_int = 2;
    pub const PIX_FMT_YUV444P: c_int = 3;

    extern "C" {
        pub fn vmaf_init(vmaf: *mut *mut VmafContext, cfg: VmafConfiguration) -> c_int;
        pub fn vmaf_model_load(
            model: *mut *mut VmafModel,
            cfg: *mut VmafModelConfig,
            version: *const c_char,
        ) -> c_int;
        pub fn vmaf_use_features_from_model(vmaf: *mut VmafContext, model: *mut VmafModel)
            -> c_int;
        pub fn vmaf_picture_alloc(
            pic: *mut VmafPicture,
            pix_fmt: c_int,
            bpc: c_uint,
            w: c_uint,
            h: c_uint,
        ) -> c_int;
        pub fn vmaf_picture_unref(pic: *mut VmafPicture) -> c_int;
        pub fn vmaf_read_pictures(
            vmaf: *mut VmafContext,
            reference: *mut VmafPicture,
            distorted: *mut VmafPicture,
            index: c_uint,
        ) -> c_int;
        pub fn vmaf_score_at_index(
            vmaf: *mut VmafContext,
            model: *mut VmafModel,
            score: *mut f64,
            index: c_uint,
        ) -> c_int;
        pub fn vmaf_model_destroy(model: *mut VmafModel);
        pub fn vmaf_close(vmaf: *mut VmafContext) -> c_int;
    }
}

/// The VMAF model for a rendition shown at `width`x`height`: the 4K model (trained for 4K displays viewed
/// at 1.5 screen heights) for 2160p and larger, the default model (1080p displays, 3 heights) otherwise.
pub fn model_for(width: u32, height: u32) -> &'static str {
    if height >= 2160 || width >= 3840 {
        "vmaf_4k_v0.6.1"
    } else {
        "vmaf_v0.6.1"
    }
}

/// Scores frame pairs with one libvmaf context.
pub struct Meter {
    ctx: *mut ffi::VmafContext,
    model: *mut ffi::VmafModel,
    frames: u32,
    /// For frames libvmaf cannot take as they are (semi-planar, RGB...): to planar 4:2:0 of their depth.
    conv: Option<(Converter, Converter)>,
    flushed: bool,
    /// Only every this many frames is scored.
    subsample: u32,
}

// SAFETY: a Meter is used by one thread at a time; libvmaf's context holds no thread-bound state.
unsafe impl Send for Meter {}

impl Meter {
    /// A meter with the model `model_for(width, height)` picks, on `threads` threads of its own (0: none,
    /// scoring on the caller's thread), scoring every `subsample`th frame (1: every frame).
    pub fn new(width: u32, height: u32, threads: usize, subsample: u32) -> Result<Self, String> {
        let subsample = subsample.max(1);
        let version = model_for(width, height);
        let mut ctx = std::ptr::null_mut();
        let cfg = ffi::VmafConfiguration {
            log_level: 1,
            n_threads: threads as c_uint,
            n_subsample: subsample as c_uint,
            cpumask: 0,
        };
        // SAFETY: out-pointers to locals; the configuration is passed by value.
        let ret = unsafe { ffi::vmaf_init(&mut ctx, cfg) };
        if ret < 0 || ctx.is_null() {
            return Err(format!("libvmaf: cannot initialise ({ret})"));
        }
        let mut model = std::ptr::null_mut();
        let name = CString::new("vmaf").expect("no NUL");
        let v = CString::new(version).expect("no NUL");
        let mut mcfg = ffi::VmafModelConfig {
            name: name.as_ptr(),
            flags: 0,
        };
        // SAFETY: the strings outlive the calls; the context is open.
        let ret = unsafe { ffi::vmaf_model_load(&mut model, &mut mcfg, v.as_ptr()) };
        if ret < 0 || model.is_null() {
            // SAFETY: the context was opened above and is not used again.
            unsafe { ffi::vmaf_close(ctx) };
            return Err(format!(
                "libvmaf: cannot load the built-in model {version} ({ret})"
            ));
        }
        // SAFETY: both are open.
        let ret = unsafe { ffi::vmaf_use_features_from_model(ctx, model) };
        let m = Self {
            ctx,
            model,
            frames: 0,
            conv: None,
            flushed: false,
            subsample,
        };
        if ret < 0 {
            return Err(format!(
                "libvmaf: cannot set up the features of {version} ({ret})"
            ));
        }
        Ok(m)
    }

    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// Score one pair; both frames have the same size (the rendition's).
    pub fn push(
        &mut self,
        reference: &frame::Video,
        distorted: &frame::Video,
    ) -> Result<(), String> {
        let converted;
        let (r, d) =
            if layout(reference.format()).is_some() && reference.format() == distorted.format() {
                (reference, distorted)
            } else {
                let deep = depth(reference.format()) > 8;
                let (w, h) = (reference.width(), reference.height());
                let fmt = if deep {
                    Pixel::YUV420P10LE
                } else {
                    Pixel::YUV420P
                };
                let (cr, cd) = self
                    .conv
                    .get_or_insert_with(|| (Converter::new(fmt, w, h), Converter::new(fmt, w, h)));
                let r2 = cr.convert(reference)?.unwrap_or_else(|| reference.clone());
                let d2 = cd.convert(distorted)?.unwrap_or_else(|| distorted.clone());
                converted = (r2, d2);
                (&converted.0, &converted.1)
            };
        let mut r = self.picture(r)?;
        let mut d = match self.picture(d) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: allocated above and not handed to libvmaf.
                unsafe { ffi::vmaf_picture_unref(&mut r) };
                return Err(e);
            }
        };
        // SAFETY: both pictures were allocated by libvmaf; it takes (and releases) them.
        let ret = unsafe { ffi::vmaf_read_pictures(self.ctx, &mut r, &mut d, self.frames) };
        if ret < 0 {
            // SAFETY: refused pictures stay ours to release (unref of a released picture is refused).
            unsafe {
                ffi::vmaf_picture_unref(&mut r);
                ffi::vmaf_picture_unref(&mut d);
            }
            return Err(format!(
                "libvmaf: cannot score frame {} ({ret})",
                self.frames
            ));
        }
        self.frames += 1;
        Ok(())
    }

    fn picture(&self, f: &frame::Video) -> Result<ffi::VmafPicture, String> {
        let fmt = layout(f.format())
            .ok_or_else(|| format!("libvmaf: cannot take {:?} frames", f.format()))?;
        let bpc = depth(f.format());
        let mut pic: ffi::VmafPicture = unsafe { std::mem::zeroed() };
        // SAFETY: allocates the picture's planes at the frame's size.
        let ret =
            unsafe { ffi::vmaf_picture_alloc(&mut pic, fmt, bpc as c_uint, f.width(), f.height()) };
        if ret < 0 {
            return Err(format!(
                "libvmaf: cannot allocate a {}x{} picture",
                f.width(),
                f.height()
            ));
        }
        let bytes = if bpc > 8 { 2 } else { 1 };
        for p in 0..3 {
            let (w, h) = (pic.w[p] as usize * bytes, pic.h[p] as usize);
            let (src, stride) = (f.data(p), f.stride(p));
            let dst_stride = pic.stride[p] as usize;
            for y in 0..h {
                // SAFETY: the destination plane holds h rows of stride bytes, each of at least w bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src[y * stride..y * stride + w].as_ptr(),
                        (pic.data[p] as *mut u8).add(y * dst_stride),
                        w,
                    );
                }
            }
        }
        Ok(pic)
    }

    /// The scores of the frames scored (every `subsample`th), in the order pushed.
    pub fn finish(mut self) -> Result<Vec<f64>, String> {
        // SAFETY: a null pair flushes the context.
        let ret = unsafe {
            ffi::vmaf_read_pictures(self.ctx, std::ptr::null_mut(), std::ptr::null_mut(), 0)
        };
        self.flushed = true;
        if ret < 0 && self.frames > 0 {
            return Err(format!("libvmaf: cannot finish ({ret})"));
        }
        (0..self.frames)
            .step_by(self.subsample as usize)
            .map(|i| {
                let mut s = 0.0;
                // SAFETY: the index was read and the context flushed.
                let ret = unsafe { ffi::vmaf_score_at_index(self.ctx, self.model, &mut s, i) };
                if ret < 0 {
                    Err(format!("libvmaf: no score for frame {i} ({ret})"))
                } else {
                    Ok(s)
                }
            })
            .collect()
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // SAFETY: both were opened in `new` and are released once, here. An unflushed context is flushed
        // first so its worker threads end.
        unsafe {
            if !self.flushed && self.frames > 0 {
                ffi::vmaf_read_pictures(self.ctx, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            }
            ffi::vmaf_model_destroy(self.model);
            ffi::vmaf_close(self.ctx);
        }
    }
}

/// libvmaf's layout for a planar YUV format, if it takes it as it is.
fn layout(p: Pixel) -> Option<c_int> {
    match p {
        Pixel::YUV420P | Pixel::YUVJ420P | Pixel::YUV420P10LE | Pixel::YUV420P12LE => {
            Some(ffi::PIX_FMT_YUV420P)
        }
        Pixel::YUV422P | Pixel::YUVJ422P | Pixel::YUV422P10LE | Pixel::YUV422P12LE => {
            Some(ffi::PIX_FMT_YUV422P)
        }
        Pixel::YUV444P | Pixel::YUVJ444P | Pixel::YUV444P10LE | Pixel::YUV444P12LE => {
            Some(ffi::PIX_FMT_YUV444P)
        }
        _ => None,
    }
}

/// Bits per sample of a format's first component.
fn depth(p: Pixel) -> u8 {
    // SAFETY: a descriptor lookup; FFmpeg's descriptors are static.
    unsafe {
        let d = ffmpeg_next::ffi::av_pix_fmt_desc_get(p.into());
        if d.is_null() {
            8
        } else {
            (*d).comp[0].depth as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32, noise: u8) -> frame::Video {
        let mut f = frame::Video::new(Pixel::YUV420P, w, h);
        for p in 0..3 {
            let stride = f.stride(p);
            let (pw, ph) = (f.plane_width(p) as usize, f.plane_height(p) as usize);
            let d = f.data_mut(p);
            for y in 0..ph {
                for x in 0..pw {
                    let n = if (x + y) % 2 == 0 { noise } else { 0 };
                    d[y * stride + x] = ((x * 3 + y * 2) % 200) as u8 + 20 + n;
                }
            }
        }
        f
    }

    #[test]
    fn the_4k_model_is_for_2160p_renditions_only() {
        assert_eq!(model_for(3840, 2160), "vmaf_4k_v0.6.1");
        assert_eq!(model_for(4096, 1716), "vmaf_4k_v0.6.1");
        assert_eq!(model_for(1920, 1080), "vmaf_v0.6.1");
        assert_eq!(model_for(1280, 720), "vmaf_v0.6.1");
    }

    #[test]
    fn identical_frames_score_high_and_noise_scores_lower() {
        let clean = gradient(320, 240, 0);
        let noisy = gradient(320, 240, 40);
        let mut same = Meter::new(320, 240, 0, 1).unwrap();
        let mut worse = Meter::new(320, 240, 0, 1).unwrap();
        for _ in 0..3 {
            same.push(&clean, &clean).unwrap();
            worse.push(&clean, &noisy).unwrap();
        }
        let (a, b) = (same.finish().unwrap(), worse.finish().unwrap());
        assert_eq!((a.len(), b.len()), (3, 3));
        assert!(a[1] > 95.0, "{a:?}");
        assert!(b[1] < a[1] - 5.0, "{a:?} {b:?}");
    }

    #[test]
    fn a_subsampling_meter_scores_every_nth_frame() {
        let f = gradient(64, 64, 0);
        let mut m = Meter::new(64, 64, 0, 2).unwrap();
        for _ in 0..5 {
            m.push(&f, &f).unwrap();
        }
        assert_eq!(m.finish().unwrap().len(), 3);
    }

    #[test]
    fn a_meter_dropped_unfinished_is_released() {
        let f = gradient(64, 64, 0);
        let mut m = Meter::new(64, 64, 2, 1).unwrap();
        m.push(&f, &f).unwrap();
        drop(m);
    }
}
