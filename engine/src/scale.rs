//! Converting decoded frames to the pixel format and size an encoder or a metric needs: bicubic, as the
//! ffmpeg CLI's `scale` filter does by default, so sizes and quality compare like for like. An HDR source
//! bound for an SDR rendition is tone-mapped to BT.709 on the way (zimg's `zscale` and `tonemap`).

use ffmpeg_next::{filter, format::Pixel, frame, software::scaling};

use crate::avlog;

/// A converter to one target format and size. The scaler is built on first use and rebuilt only if the
/// input's format or size changes; frames already in the target shape are passed through.
pub struct Converter {
    dst: (Pixel, u32, u32),
    ctx: Option<(scaling::Context, (Pixel, u32, u32))>,
    /// Tone mapping from this transfer (zimg's name: `smpte2084`, `arib-std-b67`), when set.
    tone_from: Option<&'static str>,
    graph: Option<(filter::Graph, (Pixel, u32, u32))>,
}

impl Converter {
    pub fn new(format: Pixel, width: u32, height: u32) -> Self {
        Self {
            dst: (format, width, height),
            ctx: None,
            tone_from: None,
            graph: None,
        }
    }

    /// A converter that also maps HDR (PQ or HLG, BT.2020) to SDR BT.709.
    pub fn tone_mapping(format: Pixel, width: u32, height: u32, transfer: &'static str) -> Self {
        Self {
            tone_from: Some(transfer),
            ..Self::new(format, width, height)
        }
    }

    /// `None` when `src` already has the target shape (use it as it is); the error carries FFmpeg's words.
    pub fn convert(&mut self, src: &frame::Video) -> Result<Option<frame::Video>, String> {
        let key = (src.format(), src.width(), src.height());
        if let Some(tin) = self.tone_from {
            return self.tone_map(src, key, tin).map(Some);
        }
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

    fn tone_map(
        &mut self,
        src: &frame::Video,
        key: (Pixel, u32, u32),
        tin: &str,
    ) -> Result<frame::Video, String> {
        if self.graph.as_ref().is_none_or(|(_, k)| *k != key) {
            let (fmt, w, h) = self.dst;
            let fmt_name = fmt.descriptor().map(|d| d.name()).unwrap_or("yuv420p");
            let src_name = key
                .0
                .descriptor()
                .map(|d| d.name())
                .unwrap_or("yuv420p10le");
            let mut g = filter::Graph::new();
            let args = format!(
                "video_size={}x{}:pix_fmt={src_name}:time_base=1/1:pixel_aspect=1/1",
                key.1, key.2
            );
            let chain = format!(
                "zscale=tin={tin}:pin=bt2020:min=bt2020nc:t=linear:npl=100,format=gbrpf32le,zscale=p=bt709,\
                 tonemap=tonemap=hable:desat=0,zscale=t=bt709:m=bt709:r=tv:w={w}:h={h}:f=bicubic,format={fmt_name}"
            );
            let build = |g: &mut filter::Graph| -> Result<(), ffmpeg_next::Error> {
                g.add(
                    &filter::find("buffer").ok_or(ffmpeg_next::Error::FilterNotFound)?,
                    "in",
                    &args,
                )?;
                g.add(
                    &filter::find("buffersink").ok_or(ffmpeg_next::Error::FilterNotFound)?,
                    "out",
                    "",
                )?;
                g.output("in", 0)?.input("out", 0)?.parse(&chain)?;
                g.validate()
            };
            let (res, lines) = avlog::capture(|| build(&mut g));
            res.map_err(|e| format!("tone mapping: {}", avlog::explain(e, &lines)))?;
            self.graph = Some((g, key));
        }
        let (g, _) = self.graph.as_mut().expect("built above");
        g.get("in")
            .expect("source")
            .source()
            .add(&src.clone())
            .map_err(|e| format!("tone mapping: {e}"))?;
        let mut out = frame::Video::empty();
        g.get("out")
            .expect("sink")
            .sink()
            .frame(&mut out)
            .map_err(|e| format!("tone mapping: {e}"))?;
        Ok(out)
    }
}
