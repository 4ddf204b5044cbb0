//! CMAF packaging: one set of fragmented-MP4 segments per track, referenced by HLS media playlists (with
//! I-frame playlists for trick play) and by one static DASH MPD. Every duration written is read from the
//! segments themselves (`fmp4`), so playlists and MPD agree with what players decode.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fmp4;

/// A track's segments as they are: timescale, and each segment's file, decode start, duration and the byte
/// range of its first (key) frame.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub timescale: u32,
    pub segments: Vec<Segment>,
    /// The codec string read from the init segment where the stream parameters cannot give one (AV1).
    pub codecs: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub file: String,
    pub start: u64,
    pub duration: u64,
    pub bytes: u64,
    /// Bytes from the segment's start that hold its first `moof` and first sample.
    pub first_frame_bytes: u64,
}

impl Timeline {
    pub fn seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / f64::from(self.timescale.max(1))
    }

    pub fn duration(&self) -> f64 {
        self.seconds(self.segments.iter().map(|s| s.duration).sum())
    }

    /// Largest segment bitrate, bits per second.
    pub fn peak_bandwidth(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.duration > 0)
            .map(|s| (s.bytes as f64 * 8.0 / self.seconds(s.duration)).ceil() as u64)
            .max()
            .unwrap_or(0)
    }

    /// Largest I-frame bitrate (first frame bytes over its segment's duration), as the I-frame playlist
    /// declares it.
    pub fn iframe_bandwidth(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.duration > 0)
            .map(|s| (s.first_frame_bytes as f64 * 8.0 / self.seconds(s.duration)).ceil() as u64)
            .max()
            .unwrap_or(0)
    }
}

/// Read the timeline of an HLS fMP4 folder (`init.mp4` and the segments its `index.m3u8` lists).
pub fn read_timeline(dir: &Path) -> Result<Timeline> {
    let (timescale, trex, codecs) = fmp4::init_info(&dir.join("init.mp4"))?;
    let index = dir.join("index.m3u8");
    let text = std::fs::read_to_string(&index).map_err(|source| Error::Read {
        path: index.clone(),
        source,
    })?;
    let mut segments = Vec::new();
    for file in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = dir.join(file);
        let frags = fmp4::segment_fragments(&path, trex)?;
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        segments.push(Segment {
            file: file.to_string(),
            start: frags[0].decode_start,
            duration: frags.iter().map(|f| f.duration).sum(),
            bytes,
            first_frame_bytes: frags[0].offset + frags[0].first_sample_end,
        });
    }
    Ok(Timeline {
        timescale,
        segments,
        codecs,
    })
}

/// A media playlist with the segments' real durations.
pub fn media_playlist(t: &Timeline) -> String {
    playlist(t, false)
}

/// The I-frame playlist: each segment's first frame, by byte range.
pub fn iframe_playlist(t: &Timeline) -> String {
    playlist(t, true)
}

fn playlist(t: &Timeline, iframes: bool) -> String {
    let target = t
        .segments
        .iter()
        .map(|s| t.seconds(s.duration))
        .fold(1.0f64, f64::max)
        .round()
        .max(1.0);
    let mut s = format!(
        "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:{target}\n#EXT-X-MEDIA-SEQUENCE:0\n\
         #EXT-X-PLAYLIST-TYPE:VOD\n{}#EXT-X-INDEPENDENT-SEGMENTS\n#EXT-X-MAP:URI=\"init.mp4\"\n",
        if iframes {
            "#EXT-X-I-FRAMES-ONLY\n"
        } else {
            ""
        }
    );
    for seg in &t.segments {
        let _ = writeln!(s, "#EXTINF:{:.6},", t.seconds(seg.duration));
        if iframes {
            let _ = writeln!(s, "#EXT-X-BYTERANGE:{}@0", seg.first_frame_bytes);
        }
        let _ = writeln!(s, "{}", seg.file);
    }
    s.push_str("#EXT-X-ENDLIST\n");
    s
}

/// Rewrite an fMP4 HLS folder's playlist from its segments and add its I-frame playlist (video).
pub fn finish_folder(dir: &Path, video: bool) -> Result<Timeline> {
    let t = read_timeline(dir)?;
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|source| Error::Write { path: p, source })
    };
    write("index.m3u8", media_playlist(&t))?;
    if video {
        write("iframes.m3u8", iframe_playlist(&t))?;
    }
    Ok(t)
}

/// A DASH Representation.
#[derive(Debug, Clone)]
pub struct Representation {
    pub id: String,
    /// Folder of its segments, relative to the MPD.
    pub dir: String,
    pub bandwidth: u64,
    pub codecs: Option<String>,
    pub width: u32,
    pub height: u32,
    pub frame_rate: Option<String>,
    pub channels: Option<u32>,
    pub timeline: Timeline,
}

/// A DASH AdaptationSet.
#[derive(Debug, Clone)]
pub struct AdaptationSet {
    /// `video`, `audio` or `text`.
    pub content: &'static str,
    pub lang: Option<String>,
    pub label: Option<String>,
    /// DASH Role: `main` for the default track, `alternate` for others; `subtitle`/`forced-subtitle` for
    /// text.
    pub role: &'static str,
    pub representations: Vec<Representation>,
    /// Text: a WebVTT file covering the whole presentation, relative to the MPD.
    pub vtt: Option<String>,
    /// `EssentialProperty`/`SupplementalProperty` lines (colour, accessibility) written as they are.
    pub properties: Vec<String>,
    /// Image: thumbnail sprite sheets.
    pub image: Option<ImageTiles>,
}

/// Thumbnail sprite sheets as a DASH-IF image adaptation set.
#[derive(Debug, Clone)]
pub struct ImageTiles {
    /// Folder of the sheets, relative to the MPD; sheets are `sprite_001.jpg`, ...
    pub dir: String,
    pub columns: u32,
    pub rows: u32,
    /// One sheet's size in pixels.
    pub width: u32,
    pub height: u32,
    /// Seconds one sheet covers.
    pub seconds_per_sheet: f64,
    pub bandwidth: u64,
}

fn iso_duration(seconds: f64) -> String {
    format!("PT{:.3}S", seconds.max(0.0))
}

fn xml(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `<SegmentTimeline>` with runs of equal, contiguous segments folded into `r`.
fn segment_timeline(t: &Timeline) -> String {
    let mut s = String::from("<SegmentTimeline>");
    let mut i = 0;
    let segs = &t.segments;
    let mut expected_next: Option<u64> = None;
    while i < segs.len() {
        let mut r = 0;
        while i + r + 1 < segs.len()
            && segs[i + r + 1].duration == segs[i].duration
            && segs[i + r + 1].start == segs[i + r].start + segs[i + r].duration
        {
            r += 1;
        }
        // `t` only where the timeline does not simply continue.
        if expected_next != Some(segs[i].start) {
            let _ = write!(s, "<S t=\"{}\" d=\"{}\"", segs[i].start, segs[i].duration);
        } else {
            let _ = write!(s, "<S d=\"{}\"", segs[i].duration);
        }
        if r > 0 {
            let _ = write!(s, " r=\"{r}\"");
        }
        s.push_str("/>");
        let last = &segs[i + r];
        expected_next = Some(last.start + last.duration);
        i += r + 1;
    }
    s.push_str("</SegmentTimeline>");
    s
}

/// A static MPD (ISO/IEC 23009-1, live profile addressing with SegmentTemplate and SegmentTimeline, CMAF
/// media profile) for the given adaptation sets; `duration` is the presentation's length in seconds.
pub fn mpd(duration: f64, sets: &[AdaptationSet]) -> String {
    let max_segment = sets
        .iter()
        .flat_map(|a| &a.representations)
        .flat_map(|r| {
            r.timeline
                .segments
                .iter()
                .map(|s| r.timeline.seconds(s.duration))
        })
        .fold(1.0f64, f64::max);
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<MPD xmlns=\"urn:mpeg:dash:schema:mpd:2011\" type=\"static\" \
         profiles=\"urn:mpeg:dash:profile:isoff-live:2011,urn:mpeg:dash:profile:cmaf:2019\" \
         mediaPresentationDuration=\"{}\" minBufferTime=\"{}\">",
        iso_duration(duration),
        iso_duration(max_segment.ceil())
    );
    s.push_str("  <Period id=\"0\" start=\"PT0S\">\n");
    for (id, a) in sets.iter().enumerate() {
        let mime = match a.content {
            "video" => "video/mp4",
            "audio" => "audio/mp4",
            "image" => "image/jpeg",
            _ => "text/vtt",
        };
        let _ = write!(
            s,
            "    <AdaptationSet id=\"{id}\" contentType=\"{}\" mimeType=\"{mime}\"",
            a.content
        );
        if a.content == "video" || a.content == "audio" {
            s.push_str(" segmentAlignment=\"true\" startWithSAP=\"1\"");
        }
        if let Some(l) = &a.lang {
            let _ = write!(s, " lang=\"{}\"", xml(l));
        }
        s.push_str(">\n");
        for p in &a.properties {
            let _ = writeln!(s, "      {p}");
        }
        if let Some(t) = &a.image {
            let _ = writeln!(
                s,
                "      <Representation id=\"thumbnails\" bandwidth=\"{}\" codecs=\"jpeg\" width=\"{}\" height=\"{}\">\n        \
                 <EssentialProperty schemeIdUri=\"http://dashif.org/thumbnail_tile\" value=\"{}x{}\"/>\n        \
                 <SegmentTemplate media=\"{}/sprite_$Number%03d$.jpg\" timescale=\"1000\" duration=\"{}\" startNumber=\"1\"/>\n      \
                 </Representation>\n    </AdaptationSet>",
                t.bandwidth.max(1),
                t.width,
                t.height,
                t.columns,
                t.rows,
                xml(&t.dir),
                (t.seconds_per_sheet * 1000.0).round() as u64
            );
            continue;
        }
        let _ = writeln!(
            s,
            "      <Role schemeIdUri=\"urn:mpeg:dash:role:2011\" value=\"{}\"/>",
            a.role
        );
        if let Some(l) = &a.label {
            let _ = writeln!(s, "      <Label>{}</Label>", xml(l));
        }
        if let Some(vtt) = &a.vtt {
            let _ = writeln!(
                s,
                "      <Representation id=\"text{id}\" bandwidth=\"256\"><BaseURL>{}</BaseURL></Representation>",
                xml(vtt)
            );
        }
        for r in &a.representations {
            let _ = write!(
                s,
                "      <Representation id=\"{}\" bandwidth=\"{}\"",
                xml(&r.id),
                r.bandwidth.max(1)
            );
            if let Some(c) = &r.codecs {
                let _ = write!(s, " codecs=\"{}\"", xml(c));
            }
            if a.content == "video" {
                let _ = write!(s, " width=\"{}\" height=\"{}\"", r.width, r.height);
                if let Some(f) = &r.frame_rate {
                    let _ = write!(s, " frameRate=\"{f}\"");
                }
            }
            s.push_str(">\n");
            if let Some(c) = r.channels {
                let _ = writeln!(
                    s,
                    "        <AudioChannelConfiguration schemeIdUri=\"urn:mpeg:dash:23003:3:audio_channel_configuration:2011\" value=\"{c}\"/>"
                );
            }
            let _ = writeln!(
                s,
                "        <SegmentTemplate timescale=\"{}\" initialization=\"{dir}/init.mp4\" media=\"{dir}/seg_$Number%05d$.m4s\" startNumber=\"0\">{}</SegmentTemplate>",
                r.timeline.timescale,
                segment_timeline(&r.timeline),
                dir = xml(&r.dir),
            );
            s.push_str("      </Representation>\n");
        }
        s.push_str("    </AdaptationSet>\n");
    }
    s.push_str("  </Period>\n</MPD>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(durs: &[u64]) -> Timeline {
        let mut start = 0;
        Timeline {
            timescale: 12_800,
            segments: durs
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    let s = Segment {
                        file: format!("seg_{i:05}.m4s"),
                        start,
                        duration: d,
                        bytes: 100_000,
                        first_frame_bytes: 20_000,
                    };
                    start += d;
                    s
                })
                .collect(),
            codecs: None,
        }
    }

    #[test]
    fn timelines_fold_equal_runs_and_state_every_duration() {
        let t = tl(&[25_600, 25_600, 25_600, 12_800]);
        assert_eq!(
            segment_timeline(&t),
            "<SegmentTimeline><S t=\"0\" d=\"25600\" r=\"2\"/><S d=\"12800\"/></SegmentTimeline>"
        );
        assert!((t.duration() - 7.0).abs() < 1e-9);
        assert_eq!(t.peak_bandwidth(), 800_000);
        let p = media_playlist(&t);
        assert!(
            p.contains("#EXTINF:2.000000,\nseg_00000.m4s\n")
                && p.contains("#EXTINF:1.000000,\nseg_00003.m4s\n")
        );
        assert!(p.contains("#EXT-X-TARGETDURATION:2\n") && p.ends_with("#EXT-X-ENDLIST\n"));
        let i = iframe_playlist(&t);
        assert!(
            i.contains("#EXT-X-I-FRAMES-ONLY")
                && i.contains("#EXT-X-BYTERANGE:20000@0\nseg_00001.m4s")
        );
    }

    #[test]
    fn the_mpd_is_static_with_a_template_per_representation() {
        let rep = Representation {
            id: "a&b".into(),
            dir: "a&b".into(),
            bandwidth: 1000,
            codecs: Some("avc1.64001f".into()),
            width: 640,
            height: 360,
            frame_rate: Some("25".into()),
            channels: None,
            timeline: tl(&[25_600, 25_600]),
        };
        let m = mpd(
            4.0,
            &[AdaptationSet {
                content: "video",
                lang: None,
                label: None,
                role: "main",
                representations: vec![rep],
                vtt: None,
                properties: vec![],
                image: None,
            }],
        );
        assert!(
            m.contains("type=\"static\"") && m.contains("mediaPresentationDuration=\"PT4.000S\"")
        );
        assert!(m.contains("media=\"a&amp;b/seg_$Number%05d$.m4s\""), "{m}");
        assert!(m.contains("minBufferTime=\"PT2.000S\""));
    }
}
