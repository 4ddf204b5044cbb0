//! The fate of every source stream: kept in the outputs or left out, and why. Pure: decided from the probe's
//! track list and the spec, so every task of a job decides alike.

use tessera_crds::{LeftOutStream, OutputStream, StreamsSpec, TrackSelection};

use crate::probe::{TrackInfo, TrackKind};

/// What a job keeps of its source besides the video.
#[derive(Debug, Clone, Default)]
pub struct StreamPlan {
    /// Audio tracks every rendition with audio carries, in source order.
    pub audio: Vec<TrackInfo>,
    /// Text subtitle tracks, in source order.
    pub subtitles: Vec<TrackInfo>,
    /// Streams no output carries, with the reason.
    pub left_out: Vec<LeftOutStream>,
}

fn left(t: &TrackInfo, reason: impl Into<String>) -> LeftOutStream {
    LeftOutStream {
        source_index: t.index as u32,
        kind: t.kind.as_str().into(),
        codec: t.codec.clone(),
        language: t.language.clone(),
        reason: reason.into(),
    }
}

fn not_selected(field: &str, sel: &TrackSelection) -> String {
    format!("not selected by spec.streams.{field} ({})", sel.describe())
}

/// Decide each track's fate.
pub fn plan(tracks: &[TrackInfo], spec: Option<&StreamsSpec>) -> StreamPlan {
    let all = StreamsSpec::default();
    let spec = spec.unwrap_or(&all);
    let mut p = StreamPlan::default();
    for t in tracks {
        match t.kind {
            TrackKind::Audio if !t.decodable => p.left_out.push(left(
                t,
                format!("unsupported audio codec {}: this FFmpeg cannot decode it", t.codec),
            )),
            TrackKind::Audio if !spec.audio.keeps(t.index, t.language.as_deref()) => {
                p.left_out.push(left(t, not_selected("audio", &spec.audio)))
            }
            TrackKind::Audio => p.audio.push(t.clone()),
            TrackKind::Subtitle if !t.text => p.left_out.push(left(
                t,
                format!(
                    "bitmap subtitles ({}) cannot become text, and MP4, HLS and CMAF outputs carry text \
                     subtitles only",
                    t.codec
                ),
            )),
            TrackKind::Subtitle if !t.decodable => p.left_out.push(left(
                t,
                format!("unsupported subtitle codec {}: this FFmpeg cannot read it", t.codec),
            )),
            TrackKind::Subtitle if !spec.subtitles.keeps(t.index, t.language.as_deref()) => p
                .left_out
                .push(left(t, not_selected("subtitles", &spec.subtitles))),
            TrackKind::Subtitle => p.subtitles.push(t.clone()),
            TrackKind::Video if t.attached_picture => p.left_out.push(left(
                t,
                "cover art (an attached picture) is not carried into video renditions",
            )),
            TrackKind::Video => p.left_out.push(left(
                t,
                "a further video stream: only the first video stream is transcoded",
            )),
            TrackKind::Attachment => p.left_out.push(left(
                t,
                "attachments (fonts, images) have no place in MP4, HLS or CMAF outputs",
            )),
            TrackKind::Data => p.left_out.push(left(
                t,
                format!("data stream ({}): not media the outputs carry", t.codec),
            )),
        }
    }
    p
}

impl StreamPlan {
    /// Whether the kept audio tracks need a default: when none is marked, the first one is.
    pub fn audio_default(&self, position: usize) -> bool {
        if self.audio.iter().any(|t| t.default) {
            self.audio[position].default
        } else {
            position == 0
        }
    }

    /// What a rendition lacks of the source: the job's left-out streams, and its audio tracks when the
    /// rendition asks for no audio.
    pub fn left_out_of(&self, rendition_has_audio: bool) -> Vec<LeftOutStream> {
        let mut out = self.left_out.clone();
        if !rendition_has_audio {
            out.extend(
                self.audio
                    .iter()
                    .map(|t| left(t, "the rendition asks for no audio (audio.codec: none)")),
            );
        }
        out.sort_by_key(|l| l.source_index);
        out
    }
}

/// An output stream made from source track `t`.
pub fn output_stream(
    t: &TrackInfo,
    codec: &str,
    default: bool,
    channels: Option<u32>,
) -> OutputStream {
    OutputStream {
        kind: t.kind.as_str().into(),
        codec: codec.into(),
        source_index: t.index as u32,
        language: t.language.clone(),
        title: t.title.clone(),
        default,
        forced: t.forced,
        channels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(index: usize, kind: TrackKind, codec: &str, lang: Option<&str>) -> TrackInfo {
        TrackInfo {
            index,
            kind,
            codec: codec.into(),
            language: lang.map(str::to_string),
            title: None,
            default: false,
            forced: false,
            decodable: codec != "ttml",
            text: matches!(codec, "subrip" | "ass" | "mov_text" | "webvtt" | "ttml"),
            attached_picture: codec == "mjpeg",
            channels: 2,
            sample_rate: 48_000,
            time_base: (1, 1000),
        }
    }

    fn source() -> Vec<TrackInfo> {
        vec![
            track(1, TrackKind::Audio, "aac", Some("eng")),
            track(2, TrackKind::Audio, "ac3", Some("fre")),
            track(3, TrackKind::Subtitle, "subrip", Some("eng")),
            track(4, TrackKind::Subtitle, "hdmv_pgs_subtitle", Some("eng")),
            track(5, TrackKind::Subtitle, "ass", Some("ger")),
            track(6, TrackKind::Video, "mjpeg", None),
            track(7, TrackKind::Attachment, "ttf", None),
            track(8, TrackKind::Data, "bin_data", None),
            track(9, TrackKind::Subtitle, "ttml", None),
        ]
    }

    #[test]
    fn everything_is_kept_or_reported() {
        let p = plan(&source(), None);
        let kept: Vec<usize> = p
            .audio
            .iter()
            .chain(&p.subtitles)
            .map(|t| t.index)
            .collect();
        assert_eq!(kept, [1, 2, 3, 5]);
        let left: Vec<u32> = p.left_out.iter().map(|l| l.source_index).collect();
        assert_eq!(left, [4, 6, 7, 8, 9]);
        // Nothing vanishes: every source stream is kept or left out with a reason.
        assert_eq!(kept.len() + left.len(), source().len());
        assert!(
            p.left_out[0].reason.contains("bitmap"),
            "{:?}",
            p.left_out[0]
        );
        assert!(p.left_out.iter().all(|l| !l.reason.is_empty()));
        assert!(p.audio_default(0) && !p.audio_default(1));
    }

    #[test]
    fn selections_choose_tracks_and_say_why_others_are_out() {
        let spec = StreamsSpec {
            audio: TrackSelection {
                languages: vec!["fr".into()],
                ..Default::default()
            },
            subtitles: TrackSelection {
                none: true,
                ..Default::default()
            },
        };
        let p = plan(&source(), Some(&spec));
        assert_eq!(p.audio.iter().map(|t| t.index).collect::<Vec<_>>(), [2]);
        assert!(p.subtitles.is_empty());
        let eng = p
            .left_out
            .iter()
            .find(|l| l.source_index == 1)
            .expect("eng audio reported");
        assert_eq!(
            eng.reason,
            "not selected by spec.streams.audio (languages fr)"
        );
        assert!(p
            .left_out
            .iter()
            .any(|l| l.source_index == 3 && l.reason.contains("none")));
        // The bitmap track keeps its own reason, not "not selected".
        assert!(p
            .left_out
            .iter()
            .any(|l| l.source_index == 4 && l.reason.contains("bitmap")));
        // A rendition without audio lacks the kept tracks too, in source order.
        let r = p.left_out_of(false);
        let order: Vec<u32> = r.iter().map(|l| l.source_index).collect();
        assert_eq!(order, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(r[1].reason.contains("no audio"), "{:?}", r[1]);
    }
}
