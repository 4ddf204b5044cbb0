//! Per-title ladders: `spec.ladder` asks for renditions chosen from the content's own rate-quality hull
//! instead of a fixed list. The plan task measures it (sample chunks encoded at several sizes and settings,
//! each scored with VMAF at the ladder's top size) and records the [`Ladder`] it chose in the plan; every
//! later task, and the operator, turn that record into ordinary renditions with [`apply`]. No one measures
//! twice, and a job re-planned from its ledger keeps its ladder.

use std::borrow::Cow;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{AudioSpec, Rendition, TargetQuality, TranscodeJobSpec, VideoCodec, VideoSpec};

/// A ladder to build from the content (per-title encoding).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.minHeight) || !has(self.maxHeight) || self.minHeight <= self.maxHeight",
        "message": "minHeight is above maxHeight",
        "fieldPath": ".minHeight"
    },
    {
        "rule": "!has(self.preset) || (self.codec == 'av1' ? self.preset.matches('^([0-9]|1[0-3])$') : self.preset in ['ultrafast', 'superfast', 'veryfast', 'faster', 'fast', 'medium', 'slow', 'slower', 'veryslow', 'placebo'])",
        "message": "unknown preset: x264/x265 take ultrafast..placebo, SVT-AV1 0..13",
        "fieldPath": ".preset"
    }
]))]
pub struct LadderSpec {
    /// `h264`, `hevc` or `av1`, for every rung.
    pub codec: VideoCodec,
    /// The top rung's quality: the cheapest undominated measured point whose VMAF, scored at the ladder's top
    /// size, reaches `vmaf`. `minCrf`/`maxCrf` bound the settings measured.
    pub target_quality: TargetQuality,
    /// The ladder's top size, at which every point is scored (lower sizes upscaled to it, as a player
    /// would). Default: the source's height.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 8192))]
    pub max_height: Option<u32>,
    /// No rung below this height (default 240).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 8192))]
    pub min_height: Option<u32>,
    /// At most this many rungs (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub max_rungs: Option<u32>,
    /// Encoder preset of every rung and of the measuring encodes (x264/x265: ultrafast..placebo; SVT-AV1: 0..13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub preset: Option<String>,
    /// Audio of every rung (default: AAC at 128 kb/s when the input has audio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioSpec>,
}

/// Rungs are at most this fraction of the rate of the rung above (about 1.8× apart, within the 1.5–2×
/// spacing Apple's HLS authoring guide recommends).
pub const RUNG_SPACING: f64 = 0.55;
/// No rung is chosen below this VMAF (at the top size): lower, a viewer is better served by waiting.
pub const LOWEST_VMAF: f64 = 40.0;
/// Default lowest rung height.
pub const DEFAULT_MIN_HEIGHT: u32 = 240;
/// Default number of rungs at most.
pub const DEFAULT_MAX_RUNGS: u32 = 5;

/// The ladder the plan chose, and the measurements it chose it from (in the plan and in the job's status).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ladder {
    /// The size every point was scored at (the top of the ladder), e.g. `1920x1080`.
    pub display: String,
    /// The VMAF model used (`vmaf_v0.6.1`, or `vmaf_4k_v0.6.1` for a 2160p top).
    pub model: String,
    /// The top rung's VMAF target.
    pub target_vmaf: f64,
    /// The chunks sampled (indices in the plan).
    pub sample_chunks: Vec<u32>,
    /// The frames encoded and scored per point (runs from each sampled chunk).
    pub sample_frames: u64,
    /// The chosen rungs, top first: their renditions are appended to `spec.renditions`.
    pub rungs: Vec<LadderRung>,
    /// Every measured point, with whether another dominates it and whether it lies on the convex hull.
    pub points: Vec<LadderPoint>,
    /// What was left out of the ladder, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One measured point: a size and setting, the rate of the sample's encode and its VMAF at the top size.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LadderPoint {
    /// The encoded width.
    pub width: u32,
    /// The encoded height (the rung's size before upscaling to the top).
    pub height: u32,
    /// The encoder's setting (CRF; NVENC's cq).
    pub crf: u8,
    /// The sample's encoded rate, kb/s (sample runs start with a keyframe each, so full encodes run lower).
    pub kbps: f64,
    /// Mean VMAF of the sample, decoded and upscaled to the top size, against the source at that size.
    pub vmaf: f64,
    /// Another point scores at least as high for no more rate: it is never chosen as a rung.
    pub dominated: bool,
    /// On the upper convex hull of (log rate, VMAF) over every point: not even a mix of two other points
    /// does better.
    pub on_hull: bool,
}

/// A chosen rung.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LadderRung {
    /// The rendition's name: `<height>p` (with `-2`, `-3`... where taken).
    pub name: String,
    /// The rung's width (keeping the source's aspect ratio).
    pub width: u32,
    /// The rung's height.
    pub height: u32,
    /// The encoder setting every chunk of the rung is encoded with (CRF; NVENC's cq).
    pub crf: u8,
    /// The sample's rate at the measured point it was chosen at, kb/s.
    pub kbps: f64,
    /// The sample's mean VMAF there, scored at the top size.
    pub vmaf: f64,
    /// Why this point.
    pub why: String,
}

/// `spec` as every task after the plan runs it: the ladder's rungs appended to `renditions` as ordinary
/// renditions, and no ladder left. Borrowed where there is no ladder; a spec applied once is applied.
pub fn apply<'a>(spec: &'a TranscodeJobSpec, ladder: Option<&Ladder>) -> Cow<'a, TranscodeJobSpec> {
    let Some(ls) = &spec.ladder else {
        return Cow::Borrowed(spec);
    };
    let mut out = spec.clone();
    out.ladder = None;
    for r in ladder.map(|l| l.rungs.as_slice()).unwrap_or_default() {
        out.renditions.push(Rendition {
            name: r.name.clone(),
            video: VideoSpec {
                codec: ls.codec,
                width: None,
                height: Some(r.height),
                crf: Some(r.crf),
                bitrate: None,
                maxrate: None,
                preset: ls.preset.clone(),
                target_quality: None,
            },
            audio: ls.audio.clone(),
        });
    }
    Cow::Owned(out)
}

/// A rung's name: `<height>p`, or `<height>p-<n>` when a rendition already has that name (case-insensitive,
/// as output names are compared).
pub fn rung_name(height: u32, taken: &[String]) -> String {
    let free = |n: &str| !taken.iter().any(|t| t.eq_ignore_ascii_case(n));
    let base = format!("{height}p");
    if free(&base) {
        return base;
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| free(n))
        .expect("some suffix is free")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(y: &str) -> TranscodeJobSpec {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn apply_appends_the_rungs_once_and_leaves_other_specs_alone() {
        let s = spec(
            "input: {uri: s3://bkt/in.mp4}\noutput: {uri: s3://bkt/out/}\nrenditions: [{name: 720p, video: {codec: h264, crf: 20}}]\n\
             ladder: {codec: hevc, targetQuality: {vmaf: 93}, preset: fast, audio: {codec: aac}}\n",
        );
        let l = Ladder {
            rungs: vec![
                LadderRung {
                    name: rung_name(720, &["720p".into()]),
                    height: 720,
                    crf: 24,
                    ..Default::default()
                },
                LadderRung {
                    name: "360p".into(),
                    height: 360,
                    crf: 28,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let a = apply(&s, Some(&l));
        let names: Vec<&str> = a.renditions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["720p", "720p-2", "360p"]);
        assert!(a.ladder.is_none());
        let r = &a.renditions[1];
        assert_eq!(
            (r.video.codec, r.video.height, r.video.crf),
            (VideoCodec::Hevc, Some(720), Some(24))
        );
        assert_eq!(r.video.preset.as_deref(), Some("fast"));
        assert!(r.audio.is_some());
        assert!(
            crate::validate_spec(&a).is_ok(),
            "{:?}",
            crate::validate_spec(&a)
        );
        // Applied again (a worker given the operator's applied spec): unchanged.
        assert_eq!(apply(&a, Some(&l)).as_ref(), a.as_ref());
        assert!(matches!(apply(&a, Some(&l)), Cow::Borrowed(_)));
    }
}
