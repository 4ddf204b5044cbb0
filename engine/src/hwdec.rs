//! Hardware decoding (NVDEC through CUDA, VA-API) where a device opens; software otherwise. Frames are
//! downloaded to system memory right after decoding, so everything after the decoder is unchanged and the
//! decoded pictures are bit-identical to software decoding.

use std::ffi::c_int;

use ffmpeg_next::{self as ff, ffi, frame};
use serde::Serialize;
use tessera_crds::Hardware;

use crate::avlog;

/// The decode path chosen for a job, and why.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeChoice {
    /// `cuda`, `vaapi`, or `software`.
    pub method: String,
    pub reason: String,
    #[serde(skip)]
    pub device: Option<ffi::AVHWDeviceType>,
}

fn device_types(hw: Hardware) -> &'static [ffi::AVHWDeviceType] {
    use ffi::AVHWDeviceType::*;
    match hw {
        Hardware::Auto => &[AV_HWDEVICE_TYPE_CUDA, AV_HWDEVICE_TYPE_VAAPI],
        Hardware::Nvidia => &[AV_HWDEVICE_TYPE_CUDA],
        Hardware::Intel | Hardware::Vaapi => &[AV_HWDEVICE_TYPE_VAAPI],
        Hardware::Software => &[],
    }
}

fn type_name(t: ffi::AVHWDeviceType) -> String {
    // SAFETY: returns a static string or null.
    let p = unsafe { ffi::av_hwdevice_get_type_name(t) };
    if p.is_null() {
        "unknown".into()
    } else {
        // SAFETY: non-null static C string.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The hardware pixel format a decoder offers for a device type, if it supports it at all.
fn hw_pix_fmt(codec: *const ffi::AVCodec, t: ffi::AVHWDeviceType) -> Option<ffi::AVPixelFormat> {
    for i in 0.. {
        // SAFETY: walks the decoder's static configuration table until it ends (null).
        let cfg = unsafe { ffi::avcodec_get_hw_config(codec, i) };
        if cfg.is_null() {
            return None;
        }
        // SAFETY: non-null entry of the table.
        let cfg = unsafe { &*cfg };
        if cfg.device_type == t
            && cfg.methods & ffi::AV_CODEC_HW_CONFIG_METHOD_HW_DEVICE_CTX as c_int != 0
        {
            return Some(cfg.pix_fmt);
        }
    }
    None
}

fn create_device(t: ffi::AVHWDeviceType) -> Result<*mut ffi::AVBufferRef, String> {
    let mut dev: *mut ffi::AVBufferRef = std::ptr::null_mut();
    // SAFETY: on success `dev` holds a new reference owned by the caller.
    let (ret, lines) = avlog::capture(|| unsafe {
        ffi::av_hwdevice_ctx_create(&mut dev, t, std::ptr::null(), std::ptr::null_mut(), 0)
    });
    if ret < 0 {
        Err(avlog::explain(ff::Error::from(ret), &lines))
    } else {
        Ok(dev)
    }
}

/// Decide once per job: the first device type that the decoder supports and that opens here.
pub fn choose(codec_id: ff::codec::Id, hw: Hardware) -> DecodeChoice {
    let mut why = Vec::new();
    let Some(codec) = ff::decoder::find(codec_id) else {
        return DecodeChoice {
            method: "software".into(),
            reason: "no decoder".into(),
            device: None,
        };
    };
    for &t in device_types(hw) {
        let name = type_name(t);
        // SAFETY: the codec pointer is a static FFmpeg table entry.
        if hw_pix_fmt(unsafe { codec.as_ptr() }, t).is_none() {
            why.push(format!(
                "{name}: the {} decoder has no {name} support",
                codec_id.name()
            ));
            continue;
        }
        match create_device(t) {
            Ok(mut dev) => {
                // SAFETY: releasing the trial reference.
                unsafe { ffi::av_buffer_unref(&mut dev) };
                return DecodeChoice {
                    method: name.clone(),
                    reason: format!("{name} device opened"),
                    device: Some(t),
                };
            }
            Err(e) => why.push(format!("{name}: no device ({e})")),
        }
    }
    if why.is_empty() {
        why.push("hardware: software".into());
    }
    DecodeChoice {
        method: "software".into(),
        reason: why.join("; "),
        device: None,
    }
}

unsafe extern "C" fn get_format(
    ctx: *mut ffi::AVCodecContext,
    fmts: *const ffi::AVPixelFormat,
) -> ffi::AVPixelFormat {
    // SAFETY: FFmpeg passes a valid context and an AV_PIX_FMT_NONE-terminated list; `opaque` holds the
    // wanted format as set by `attach`.
    unsafe {
        let want = (*ctx).opaque as isize as c_int;
        let mut p = fmts;
        while *p != ffi::AVPixelFormat::AV_PIX_FMT_NONE {
            if *p as c_int == want {
                return *p;
            }
            p = p.add(1);
        }
        // The stream cannot be decoded on this device (e.g. a profile it lacks): software.
        ffi::avcodec_default_get_format(ctx, fmts)
    }
}

/// Attach a device of type `t` to a decoder context before it is opened. Returns the hardware pixel
/// format its frames will have, or why it could not.
pub fn attach(
    ctx: &mut ff::codec::context::Context,
    t: ffi::AVHWDeviceType,
) -> Result<ffi::AVPixelFormat, String> {
    // SAFETY: reading the codec of a context created from stream parameters.
    let codec = unsafe { ffi::avcodec_find_decoder((*ctx.as_ptr()).codec_id) };
    let fmt =
        hw_pix_fmt(codec, t).ok_or_else(|| format!("decoder has no {} support", type_name(t)))?;
    let dev = create_device(t)?;
    // SAFETY: the context takes ownership of the device reference; opaque carries the wanted format.
    unsafe {
        let c = ctx.as_mut_ptr();
        (*c).hw_device_ctx = dev;
        (*c).opaque = fmt as c_int as isize as *mut std::ffi::c_void;
        (*c).get_format = Some(get_format);
    }
    Ok(fmt)
}

/// Download a hardware frame into system memory, keeping its timestamps and properties.
pub fn download(hw: &frame::Video) -> Result<frame::Video, String> {
    let mut sw = frame::Video::empty();
    // SAFETY: both frames are valid; transfer allocates the destination's buffers.
    let ret = unsafe { ffi::av_hwframe_transfer_data(sw.as_mut_ptr(), hw.as_ptr(), 0) };
    if ret < 0 {
        return Err(format!(
            "downloading a decoded frame: {}",
            ff::Error::from(ret)
        ));
    }
    // SAFETY: copies pts, durations and metadata.
    let ret = unsafe { ffi::av_frame_copy_props(sw.as_mut_ptr(), hw.as_ptr()) };
    if ret < 0 {
        return Err(format!(
            "copying frame properties: {}",
            ff::Error::from(ret)
        ));
    }
    Ok(sw)
}
