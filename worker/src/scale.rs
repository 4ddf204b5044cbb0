//! Converting decoded frames to the pixel format and size an encoder or a metric needs: bicubic, as the
//! ffmpeg CLI's `scale` filter does by default, so sizes and quality compare like for like.

use ffmpeg_next::{format::Pixel, frame, software::scaling};

use crate::avlog;

/// A converter to one target format and size. The scaler is built on first use and rebuilt only if the
/// input's format or size changes; frames already in the target shape are passed through.
pub struct Converter {
    dst: (Pixel, u32, u32),
    ctx: Option<(scaling::Context, (Pixel, u32, u32))>,
}

impl Converter {
    pub fn new(format: Pixel, width: u32, height: u32) -> Self {
        Self {
            dst: (format, width, height),
            ctx: None,
        }
    }

    /// `None` when `src` already has the target shape (use it as it is); the error carries FFmpeg's words.
    pub fn convert(&mut self, src: &frame::Video) -> Result<Option<frame::Video>, String> {
        let key = (src.format(), src.width(), src.height());
        if key == self.dst {
            return Ok(None);
        }
        if self.ctx.as_ref().is_none_or(|(_, k)| *k != key) {
            let (fmt, w, h) = self.dst;
            let (ctx, lines) = avlog::capture(|| {
                scaling::Context::get(key.0, key.1, key.2, fmt, w, h, scaling::Flags::BICUBIC)
            });
            self.ctx = Some((ctx.map_err(|e| avlog::explain(e, &lines))?, key));
        }
        let mut out = frame::Video::empty();
        let (ctx, _) = self.ctx.as_mut().expect("built above");
        ctx.run(src, &mut out).map_err(|e| e.to_string())?;
        Ok(Some(out))
    }
}
