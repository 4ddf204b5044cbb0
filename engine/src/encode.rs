//! Opening video encoders: the same settings in every chunk of a rendition, and the choice between hardware
//! and software made once per rendition by actually opening each candidate.

use std::collections::BTreeMap;

use ffmpeg_next::{self as ff, codec, ffi, format::Pixel, Dictionary, Rational};
use serde::Serialize;
use tessera_crds::work::HdrStatic;
use tessera_crds::{Hardware, Rendition};

use crate::avlog;
use crate::error::{Error, Result};
use crate::plan::{self, Family};

/// Everything about a rendition's video that is the same in every chunk.
#[derive(Debug, Clone)]
pub struct VideoTarget {
    pub width: u32,
    pub height: u32,
    pub pix_fmt: Pixel,
    pub time_base: Rational,
    pub frame_rate: Rational,
    pub sar: Rational,
    /// Colour description copied from the source: range, primaries, transfer, matrix.
    pub color: (
        ff::color::Range,
        ff::color::Primaries,
        ff::color::TransferCharacteristic,
        ff::color::Space,
    ),
    pub threads: usize,
    /// HDR10 static metadata to signal (HEVC and AV1 renditions of an HDR source).
    pub hdr: Option<HdrStatic>,
    /// Tone-map from this HDR transfer (zimg's name) to SDR BT.709: H.264 renditions of an HDR source.
    pub tone_map_from: Option<&'static str>,
}

impl VideoTarget {
    /// 8-bit 4:2:0 at 25 fps, square pixels, no colour description, one thread: trial opens and tests.
    pub fn plain(width: u32, height: u32) -> Self {
        VideoTarget {
            width,
            height,
            pix_fmt: Pixel::YUV420P,
            time_base: Rational(1, 25),
            frame_rate: Rational(25, 1),
            sar: Rational(1, 1),
            color: (
                ff::color::Range::MPEG,
                ff::color::Primaries::Unspecified,
                ff::color::TransferCharacteristic::Unspecified,
                ff::color::Space::Unspecified,
            ),
            threads: 1,
            hdr: None,
            tone_map_from: None,
        }
    }
}

/// Whether an encoder writes CEA-608/708 caption data (A/53) found on its frames back into the bitstream in
/// this FFmpeg (5.1): libx264 and NVENC (`a53cc`, on by default) and QSV H.264. libx265 and SVT-AV1 have no
/// such path. The NVENC and QSV entries are unverified here (no such hardware).
pub fn carries_captions(encoder: &str) -> bool {
    matches!(
        encoder,
        "libx264" | "h264_nvenc" | "hevc_nvenc" | "h264_qsv"
    )
}

/// x265's HDR10 parameters: SMPTE ST 2086 primaries in 0.00002 units (G, B, R, white point), luminance in
/// 0.0001 cd/m², content light levels, and HDR10 signalling.
pub fn x265_hdr_params(h: &HdrStatic) -> String {
    let mut p = Vec::new();
    if let Some(m) = &h.mastering {
        let xy = |c: [f64; 2]| {
            format!(
                "({},{})",
                (c[0] * 50_000.0).round(),
                (c[1] * 50_000.0).round()
            )
        };
        p.push(format!(
            "master-display=G{}B{}R{}WP{}L({},{})",
            xy(m.primaries[1]),
            xy(m.primaries[2]),
            xy(m.primaries[0]),
            xy(m.white_point),
            (m.max_luminance * 10_000.0).round(),
            (m.min_luminance * 10_000.0).round()
        ));
    }
    if let Some(c) = &h.content_light {
        p.push(format!("max-cll={},{}", c.max_cll, c.max_fall));
    }
    p.push("hdr10=1".into());
    p.join(":")
}

/// SVT-AV1's HDR10 parameters: chromaticities and luminance as decimals, G, B, R order as x265's.
pub fn svtav1_hdr_params(h: &HdrStatic) -> String {
    let mut p = Vec::new();
    if let Some(m) = &h.mastering {
        let xy = |c: [f64; 2]| format!("({:.4},{:.4})", c[0], c[1]);
        p.push(format!(
            "mastering-display=G{}B{}R{}WP{}L({:.4},{:.4})",
            xy(m.primaries[1]),
            xy(m.primaries[2]),
            xy(m.primaries[0]),
            xy(m.white_point),
            m.max_luminance,
            m.min_luminance
        ));
    }
    if let Some(c) = &h.content_light {
        p.push(format!("content-light={},{}", c.max_cll, c.max_fall));
    }
    p.join(":")
}

/// What a hardware encoder that reads HDR10 metadata from frames (NVENC in newer FFmpeg) is given: the
/// mastering display as FFmpeg's rationals (primaries R, G, B and white point in 1/50000, luminance in
/// 1/10000 cd/m²) and the content light levels. Unverified on hardware: no machine here has NVENC.
pub fn frame_hdr_side_data(
    h: &HdrStatic,
) -> (Option<crate::probe::RawMastering>, Option<(u32, u32)>) {
    let q = |v: f64, den: i32| ffi::AVRational {
        num: (v * f64::from(den)).round() as i32,
        den,
    };
    let m = h.mastering.map(|m| crate::probe::RawMastering {
        display_primaries: m.primaries.map(|c| [q(c[0], 50_000), q(c[1], 50_000)]),
        white_point: [q(m.white_point[0], 50_000), q(m.white_point[1], 50_000)],
        min_luminance: q(m.min_luminance, 10_000),
        max_luminance: q(m.max_luminance, 10_000),
        has_primaries: 1,
        has_luminance: 1,
    });
    (m, h.content_light.map(|c| (c.max_cll, c.max_fall)))
}

/// The encoder a rendition uses for all of its chunks, and why.
#[derive(Debug, Clone, Serialize)]
pub struct EncoderChoice {
    pub name: String,
    pub reason: String,
    #[serde(skip)]
    pub pix_fmt: Pixel,
}

/// Pixel format an encoder is fed: 8-bit 4:2:0 unless the source has more bits and the codec can keep them.
pub fn encoder_pix_fmt(
    encoder: &str,
    source_bit_depth: u8,
    codec: tessera_crds::VideoCodec,
) -> Pixel {
    let deep = source_bit_depth > 8 && codec != tessera_crds::VideoCodec::H264;
    match (plan::family(encoder), deep) {
        (Family::Qsv, false) => Pixel::NV12,
        (Family::Qsv | Family::Nvenc, true) => Pixel::P010LE,
        (Family::Vaapi, _) => Pixel::VAAPI,
        (_, true) => Pixel::YUV420P10LE,
        (_, false) => Pixel::YUV420P,
    }
}

/// An open video encoder that is always flushed before it is freed: libsvtav1 (and other encoders with
/// internal threads) can deadlock in `avcodec_close` when freed without having seen end-of-stream.
pub struct OpenEncoder {
    inner: Option<ff::encoder::Video>,
    /// libsvtav1: it hangs (1.4) on end-of-stream when it never received a frame, and its open and close
    /// must not overlap another SVT-AV1 encoder's ([`SVT_AV1_LIFECYCLE`]).
    svt_av1: bool,
    /// Set once a frame was sent.
    pub fed: bool,
}

impl std::ops::Deref for OpenEncoder {
    type Target = ff::encoder::Video;
    fn deref(&self) -> &Self::Target {
        self.inner.as_ref().expect("encoder present until drop")
    }
}

impl std::ops::DerefMut for OpenEncoder {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.inner.as_mut().expect("encoder present until drop")
    }
}

impl Drop for OpenEncoder {
    fn drop(&mut self) {
        let Some(mut enc) = self.inner.take() else {
            return;
        };
        if self.svt_av1 && !self.fed {
            // Closing it would block forever; leaking one unused encoder (error paths only) is the lesser harm.
            std::mem::forget(enc);
            return;
        }
        // A second EOF is refused harmlessly when the encoder was already flushed.
        let _ = enc.send_eof();
        let mut p = ff::Packet::empty();
        while enc.receive_packet(&mut p).is_ok() {}
        let _lifecycle = self.svt_av1.then(svt_av1_lifecycle);
        drop(enc);
    }
}

/// SVT-AV1 (1.4 in Debian 12, and up to 2.3 at least) keeps process-wide state that each encoder's
/// `svt_av1_enc_init_handle` writes (the CPU topology, shared tables) and each `svt_av1_enc_deinit_handle`
/// frees, with no synchronisation: one chunk's encoder opening while another's closes crashed the process
/// (SIGSEGV in `svt_av1_enc_init_handle`). Opens and closes of SVT-AV1 encoders in this process take this
/// lock; encoding itself runs in parallel.
static SVT_AV1_LIFECYCLE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn svt_av1_lifecycle() -> std::sync::MutexGuard<'static, ()> {
    // The guarded state is SVT-AV1's, not ours: a panic while holding the lock leaves nothing to repair.
    SVT_AV1_LIFECYCLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Open `name` with the rendition's settings. The error text includes FFmpeg's own explanation.
pub fn open_video(
    name: &str,
    r: &Rendition,
    t: &VideoTarget,
    pix_fmt: Pixel,
) -> Result<OpenEncoder, String> {
    let codec =
        ff::encoder::find_by_name(name).ok_or_else(|| "not built into this FFmpeg".to_string())?;
    if plan::family(name) == Family::Vaapi {
        vaapi_device_present()?;
        return Err("VA-API device found, but VA-API encoding needs hardware frame upload, which this build does not do".into());
    }
    let mut ctx = codec::context::Context::new_with_codec(codec);
    if t.threads > 0 {
        ctx.set_threading({
            let mut c = codec::threading::Config::kind(codec::threading::Type::Frame);
            c.count = t.threads;
            c
        });
    }
    let mut enc = ctx.encoder().video().map_err(|e| e.to_string())?;
    enc.set_width(t.width);
    enc.set_height(t.height);
    enc.set_format(pix_fmt);
    enc.set_time_base(t.time_base);
    enc.set_frame_rate(Some(t.frame_rate));
    enc.set_aspect_ratio(t.sar);
    enc.set_color_range(t.color.0);
    enc.set_color_primaries(t.color.1);
    enc.set_color_transfer_characteristic(t.color.2);
    enc.set_colorspace(t.color.3);
    // OR the flag in: `set_flags` would replace codec defaults such as libx264's closed GOP (`+cgop`).
    // SAFETY: plain field of the context being configured.
    unsafe { (*enc.as_mut_ptr()).flags |= ffi::AV_CODEC_FLAG_GLOBAL_HEADER as i32 };
    let rc = plan::rate_control(name, r);
    if let Some(b) = rc.bit_rate {
        enc.set_bit_rate(b as usize);
    }
    if let Some(m) = rc.max_rate {
        enc.set_max_bit_rate(m as usize);
        // SAFETY: plain field of the context being configured.
        unsafe {
            (*enc.as_mut_ptr()).rc_buffer_size =
                rc.buf_size.unwrap_or(m * 2).min(i32::MAX as u64) as i32
        };
    }
    let mut opts = Dictionary::new();
    for (k, v) in &rc.options {
        opts.set(k, v);
    }
    match plan::family(name) {
        // Chunks of a quality target differ in CRF, which x264 would write into each chunk's PPS (its
        // initial QP): `stitchable` keeps the headers equal, so the chunks join into one stream.
        Family::X26x if name == "libx264" && r.video.target_quality.is_some() => {
            opts.set("x264-params", "stitchable=1")
        }
        Family::X26x if name == "libx265" => {
            // HDR10: the metadata SEI with the parameter sets at every keyframe, so each chunk carries it.
            let hdr = t
                .hdr
                .map(|h| format!(":repeat-headers=1:{}", x265_hdr_params(&h)))
                .unwrap_or_default();
            // A quality target's chunks differ in CRF, which x265's info SEI (in the headers) spells out:
            // without it the headers are equal and the chunks join.
            let info = if r.video.target_quality.is_some() {
                ":info=0"
            } else {
                ""
            };
            opts.set(
                "x265-params",
                &format!("log-level=error:pools={}{hdr}{info}", t.threads.max(1)),
            )
        }
        Family::SvtAv1 => {
            let hdr = t
                .hdr
                .map(|h| format!(":{}", svtav1_hdr_params(&h)))
                .filter(|p| p.len() > 1)
                .unwrap_or_default();
            opts.set("svtav1-params", &format!("lp={}{hdr}", t.threads.max(1)))
        }
        _ => {}
    }
    let svt_av1 = name == "libsvtav1";
    let (res, lines) = {
        let _lifecycle = svt_av1.then(svt_av1_lifecycle);
        avlog::capture(|| enc.open_with(opts))
    };
    res.map(|e| OpenEncoder {
        inner: Some(e),
        svt_av1,
        fed: false,
    })
    .map_err(|e| explain_open_failure(name, e, &lines))
}

fn vaapi_device_present() -> Result<(), String> {
    let mut dev: *mut ffi::AVBufferRef = std::ptr::null_mut();
    // SAFETY: creates (and below frees) a device reference.
    let (ret, lines) = avlog::capture(|| unsafe {
        ffi::av_hwdevice_ctx_create(
            &mut dev,
            ffi::AVHWDeviceType::AV_HWDEVICE_TYPE_VAAPI,
            std::ptr::null(),
            std::ptr::null_mut(),
            0,
        )
    });
    if ret < 0 {
        return Err(avlog::explain(
            format!("no VA-API device ({})", ff::Error::from(ret)),
            &lines,
        ));
    }
    // SAFETY: dev was allocated by av_hwdevice_ctx_create.
    unsafe { ffi::av_buffer_unref(&mut dev) };
    Ok(())
}

/// FFmpeg's words plus what a user can do about the known NVENC failure modes.
fn explain_open_failure(name: &str, e: ff::Error, lines: &[String]) -> String {
    let mut msg = avlog::explain(e, lines);
    let all = lines.join(" ").to_lowercase();
    if plan::family(name) == Family::Nvenc {
        if all.contains("libnvidia-encode") || all.contains("cannot load") {
            let caps = std::env::var("NVIDIA_DRIVER_CAPABILITIES").unwrap_or_default();
            if !caps.is_empty() && !caps.contains("video") && caps != "all" {
                msg.push_str(&format!(
                    "; NVIDIA_DRIVER_CAPABILITIES={caps} lacks `video`, so the container runtime did not mount \
                     libnvidia-encode: set it to compute,video,utility"
                ));
            } else {
                msg.push_str("; the NVIDIA encode library is not available here (no NVIDIA driver with NVENC)");
            }
        } else if all.contains("out of memory") || all.contains("incompatible client key") {
            msg.push_str("; the GPU's limit on concurrent NVENC sessions is probably reached");
        } else if all.contains("unsupported device") || all.contains("no capable devices") {
            msg.push_str("; this GPU has no NVENC encoder");
        }
    }
    msg
}

/// Encoders that did not open and were passed over for the next candidate, by encoder and reason class,
/// since the process started (a worker exports them as `tessera_worker_encoder_fallbacks_total`).
static FALLBACKS: std::sync::Mutex<BTreeMap<(String, &'static str), u64>> =
    std::sync::Mutex::new(BTreeMap::new());

/// The class of an encoder's failure to open, for metrics: `not_built_in`, `no_device` or `open_failed`.
pub fn fallback_reason(why: &str) -> &'static str {
    let w = why.to_ascii_lowercase();
    if w.contains("not built into") {
        "not_built_in"
    } else if [
        "no device",
        "unsupported device",
        "no capable devices",
        "cannot load",
        "no such file",
        "no nvenc",
    ]
    .iter()
    .any(|k| w.contains(k))
    {
        "no_device"
    } else {
        "open_failed"
    }
}

/// Every fallback so far: (encoder passed over, reason class, count).
pub fn fallbacks() -> Vec<(String, &'static str, u64)> {
    FALLBACKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|((e, r), n)| (e.clone(), *r, *n))
        .collect()
}

/// Pick the encoder for a rendition: the first candidate that opens with the real settings. `only` restricts
/// the choice to one encoder (a distributed job's plan fixed it: every chunk of a rendition must match).
pub fn select(
    r: &Rendition,
    hw: Hardware,
    t: &VideoTarget,
    source_bit_depth: u8,
    only: Option<&str>,
) -> Result<EncoderChoice> {
    let mut failures = Vec::new();
    let mut passed_over: Vec<(&str, &'static str)> = Vec::new();
    let candidates = plan::encoder_candidates(r.video.codec, hw);
    if let Some(o) = only.filter(|o| !candidates.contains(o)) {
        return Err(Error::Encoder {
            encoder: format!("spec.renditions[{}] ({})", r.name, r.video.codec),
            detail: format!("the job's plan names encoder {o:?}, which is not a candidate here"),
        });
    }
    for name in candidates
        .into_iter()
        .filter(|n| only.is_none_or(|o| o == *n))
    {
        let pix = encoder_pix_fmt(name, source_bit_depth, r.video.codec);
        // SVT-AV1 cannot be opened and closed without frames (see OpenEncoder); it is opened per chunk.
        let trial = if name == "libsvtav1" {
            ff::encoder::find_by_name(name)
                .map(|_| ())
                .ok_or_else(|| "not built into this FFmpeg".to_string())
        } else {
            open_video(name, r, t, pix).map(drop)
        };
        match trial {
            Ok(()) => {
                let reason = if failures.is_empty() {
                    format!("{name} opened (hardware: {})", hw_name(hw))
                } else {
                    format!("{}; used {name}", failures.join("; "))
                };
                tracing::info!(rendition = %r.name, encoder = name, %reason, "encoder chosen");
                let mut f = FALLBACKS.lock().unwrap_or_else(|p| p.into_inner());
                for (over, class) in passed_over {
                    *f.entry((over.to_string(), class)).or_default() += 1;
                }
                return Ok(EncoderChoice {
                    name: name.to_string(),
                    reason,
                    pix_fmt: pix,
                });
            }
            Err(why) => {
                tracing::debug!(rendition = %r.name, encoder = name, %why, "encoder did not open");
                passed_over.push((name, fallback_reason(&why)));
                failures.push(format!("{name} failed to open: {why}"));
            }
        }
    }
    Err(Error::Encoder {
        encoder: format!("spec.renditions[{}] ({})", r.name, r.video.codec),
        detail: no_encoder_sentence(r.video.codec, hw, &failures),
    })
}

/// The FFmpeg libraries' version (`5.1.6-0+deb12u1`).
pub fn ffmpeg_version() -> String {
    // SAFETY: returns a static C string.
    unsafe { std::ffi::CStr::from_ptr(ffi::av_version_info()) }
        .to_string_lossy()
        .into_owned()
}

/// Why no candidate opened, and what to do: a missing encoder (FFmpeg 5.1 has no `av1_nvenc`) is told
/// from a device that is not there.
fn no_encoder_sentence(
    codec: tessera_crds::VideoCodec,
    hw: Hardware,
    failures: &[String],
) -> String {
    let missing = failures
        .iter()
        .all(|f| f.ends_with("not built into this FFmpeg"));
    let fallback = plan::encoder_candidates(codec, Hardware::Software)
        .first()
        .copied()
        .unwrap_or("software");
    let fix = if hw == Hardware::Auto || hw == Hardware::Software {
        "install an FFmpeg built with it".to_string()
    } else {
        format!("use hardware: auto (it falls back to {fallback}) or hardware: software")
    };
    let names: Vec<&str> = plan::encoder_candidates(codec, hw);
    if missing {
        format!(
            "{codec} with hardware: {} needs {}, which this FFmpeg ({}) does not have: {fix}",
            hw_name(hw),
            names.join(" or "),
            ffmpeg_version()
        )
    } else {
        format!(
            "no {codec} encoder for hardware: {} opened here ({}): {fix}",
            hw_name(hw),
            failures.join("; ")
        )
    }
}

fn hw_name(hw: Hardware) -> String {
    serde_json::to_value(hw)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

#[cfg(test)]
mod hdr_tests {
    use super::*;
    use tessera_crds::work::{ContentLight, MasteringDisplay};

    fn p3_d65() -> HdrStatic {
        HdrStatic {
            mastering: Some(MasteringDisplay {
                primaries: [[0.68, 0.32], [0.265, 0.69], [0.15, 0.06]],
                white_point: [0.3127, 0.329],
                max_luminance: 1000.0,
                min_luminance: 0.0001,
            }),
            content_light: Some(ContentLight {
                max_cll: 1000,
                max_fall: 400,
            }),
        }
    }

    #[test]
    fn hdr10_metadata_maps_to_each_encoders_terms() {
        assert_eq!(
            x265_hdr_params(&p3_d65()),
            "master-display=G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1):max-cll=1000,400:hdr10=1"
        );
        assert_eq!(
            svtav1_hdr_params(&p3_d65()),
            "mastering-display=G(0.2650,0.6900)B(0.1500,0.0600)R(0.6800,0.3200)WP(0.3127,0.3290)L(1000.0000,0.0001):content-light=1000,400"
        );
        let (m, c) = frame_hdr_side_data(&p3_d65());
        let m = m.expect("mastering");
        assert_eq!(
            (m.display_primaries[0][0].num, m.display_primaries[0][0].den),
            (34_000, 50_000)
        );
        assert_eq!((m.max_luminance.num, m.min_luminance.num), (10_000_000, 1));
        assert_eq!(c, Some((1000, 400)));
        // Light levels alone: no mastering display in any encoder's terms.
        let cll = HdrStatic {
            mastering: None,
            ..p3_d65()
        };
        assert_eq!(x265_hdr_params(&cll), "max-cll=1000,400:hdr10=1");
        assert_eq!(svtav1_hdr_params(&cll), "content-light=1000,400");
    }
}

#[cfg(test)]
mod svt_av1_tests {
    use super::*;
    use tessera_crds::{VideoCodec, VideoSpec};

    /// Chunk workers in one process open and close SVT-AV1 encoders at the same time; without
    /// [`SVT_AV1_LIFECYCLE`] this crashed the process now and then (SIGSEGV in `svt_av1_enc_init_handle`).
    #[test]
    fn svt_av1_encoders_open_and_close_side_by_side() {
        ff::init().unwrap();
        let r = Rendition {
            name: "av1".into(),
            video: VideoSpec {
                codec: VideoCodec::Av1,
                width: None,
                height: None,
                crf: Some(50),
                bitrate: None,
                maxrate: None,
                preset: Some("12".into()),
                target_quality: None,
            },
            audio: None,
        };
        let t = VideoTarget::plain(64, 64);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..10 {
                        let mut enc = open_video("libsvtav1", &r, &t, Pixel::YUV420P).unwrap();
                        let mut f = ff::frame::Video::new(Pixel::YUV420P, 64, 64);
                        f.set_pts(Some(i));
                        enc.send_frame(&f).unwrap();
                        enc.fed = true;
                    }
                });
            }
        });
    }
}
