//! Semantic checks the schema cannot express. Pure: shared by the operator (admission-time status) and
//! `tessera run`. Every error names the field it is about.

use std::collections::HashSet;
use std::fmt;

use crate::{AudioCodec, Container, TranscodeJobSpec, VideoCodec};

/// One problem with a spec, with the path of the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ValidationError {}

const X26X_PRESETS: &[&str] = &[
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
];

/// Check a spec; returns every problem found, not just the first.
pub fn validate_spec(spec: &TranscodeJobSpec) -> Result<(), Vec<ValidationError>> {
    let mut errs = Vec::new();
    let mut err = |field: String, message: String| errs.push(ValidationError { field, message });

    check_uri("spec.input.uri", &spec.input.uri, false, &mut err);
    check_uri("spec.output.uri", &spec.output.uri, true, &mut err);

    if spec.renditions.is_empty() && spec.ladder.is_none() {
        err(
            "spec.renditions".into(),
            "at least one rendition is required (or a ladder that builds them)".into(),
        );
    }
    if let Some(l) = &spec.ladder {
        check_ladder(spec, l, &mut err);
    }
    let mut names = HashSet::new();
    for (i, r) in spec.renditions.iter().enumerate() {
        let at = |f: &str| format!("spec.renditions[{i}].{f}");
        if !valid_name(&r.name) {
            err(
                at("name"),
                format!(
                    "{:?} is not a safe output name: use 1-63 letters, digits, '-', '_' or '.', starting and ending \
                     with a letter or digit",
                    r.name
                ),
            );
        } else if !names.insert(r.name.to_ascii_lowercase()) {
            err(
                at("name"),
                format!("{:?} is used by more than one rendition", r.name),
            );
        }
        let v = &r.video;
        if v.crf.is_some() && v.bitrate.is_some() {
            err(
                at("video"),
                "crf and bitrate are exclusive: give one of them".into(),
            );
        }
        let crf_max = match v.codec {
            VideoCodec::H264 | VideoCodec::Hevc => 51,
            VideoCodec::Av1 => 63,
        };
        if let Some(crf) = v.crf {
            if crf > crf_max {
                err(
                    at("video.crf"),
                    format!("{crf} is out of range for {} (0..={crf_max})", v.codec),
                );
            }
        }
        if let Some(t) = &v.target_quality {
            if v.crf.is_some() || v.bitrate.is_some() {
                err(
                    at("video.targetQuality"),
                    "targetQuality is exclusive with crf and bitrate: the setting is chosen per chunk".into(),
                );
            }
            check_target(&at("video.targetQuality"), t, v.codec, &mut err);
        }
        if let (Some(b), Some(m)) = (v.bitrate, v.maxrate) {
            if m.0 < b.0 {
                err(at("video.maxrate"), format!("{m} is below bitrate {b}"));
            }
        }
        for (f, dim) in [("video.width", v.width), ("video.height", v.height)] {
            if let Some(d) = dim {
                if !(16..=8192).contains(&d) {
                    err(at(f), format!("{d} is out of range (16..=8192)"));
                }
            }
        }
        if let Some(p) = &v.preset {
            if let Some(m) = preset_problem(v.codec, p) {
                err(at("video.preset"), m);
            }
        }
        if let Some(a) = &r.audio {
            if spec.output.container != Container::Mp4 && a.codec == AudioCodec::Opus {
                err(
                    at("audio.codec"),
                    "opus is not playable in HLS: use aac".into(),
                );
            }
            if a.codec == AudioCodec::Opus && a.channels.is_some_and(|c| c > 2) {
                err(
                    at("audio.channels"),
                    "opus output is limited to 2 channels here".into(),
                );
            }
        }
    }
    if let Some(st) = &spec.streams {
        for (f, sel) in [("audio", &st.audio), ("subtitles", &st.subtitles)] {
            let at = format!("spec.streams.{f}");
            if sel.none && !(sel.languages.is_empty() && sel.indices.is_empty()) {
                err(
                    at.clone(),
                    "none excludes languages and indices: give either none: true or the tracks to keep"
                        .into(),
                );
            }
            for l in &sel.languages {
                if crate::streams::language(l).is_none() {
                    err(
                        format!("{at}.languages"),
                        format!("{l:?} is not an ISO 639 language code (e.g. en, eng, fr, fra)"),
                    );
                }
            }
        }
    }
    if let Some(t) = &spec.thumbnails {
        if !(t.interval_seconds.is_finite() && (0.5..=600.0).contains(&t.interval_seconds)) {
            err(
                "spec.thumbnails.intervalSeconds".into(),
                format!("{} is out of range (0.5..=600)", t.interval_seconds),
            );
        }
        if !(32..=1920).contains(&t.width) {
            err(
                "spec.thumbnails.width".into(),
                format!("{} is out of range (32..=1920)", t.width),
            );
        }
    }
    if let Some(t) = spec.chunking.as_ref().and_then(|c| c.target_seconds) {
        if !(t.is_finite() && (0.5..=3600.0).contains(&t)) {
            err(
                "spec.chunking.targetSeconds".into(),
                format!("{t} is out of range (0.5..=3600)"),
            );
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Why `p` is not a preset of `codec`'s software encoder.
fn preset_problem(codec: VideoCodec, p: &str) -> Option<String> {
    let ok = match codec {
        VideoCodec::H264 | VideoCodec::Hevc => X26X_PRESETS.contains(&p),
        VideoCodec::Av1 => p.parse::<u8>().is_ok_and(|n| n <= 13),
    };
    let expected = match codec {
        VideoCodec::Av1 => "0..13 (SVT-AV1 speed)".to_string(),
        _ => X26X_PRESETS.join(", "),
    };
    (!ok).then(|| format!("unknown preset {p:?} for {codec}; expected one of {expected}"))
}

/// A quality target's ranges, for `codec`'s CRF scale; `at` is the target's field path.
fn check_target(
    at: &str,
    t: &crate::TargetQuality,
    codec: VideoCodec,
    err: &mut impl FnMut(String, String),
) {
    let crf_max = match codec {
        VideoCodec::H264 | VideoCodec::Hevc => 51,
        VideoCodec::Av1 => 63,
    };
    if !(20.0..=99.0).contains(&t.vmaf) {
        err(
            format!("{at}.vmaf"),
            format!("{} is out of range (20..=99)", t.vmaf),
        );
    }
    for (f, b) in [("minCrf", t.min_crf), ("maxCrf", t.max_crf)] {
        if let Some(b) = b.filter(|&b| b > crf_max) {
            err(
                format!("{at}.{f}"),
                format!("{b} is out of range for {codec} (0..={crf_max})"),
            );
        }
    }
    if let (Some(lo), Some(hi)) = (t.min_crf, t.max_crf) {
        if lo > hi {
            err(format!("{at}.minCrf"), format!("{lo} is above maxCrf {hi}"));
        }
    }
}

fn check_ladder(
    spec: &TranscodeJobSpec,
    l: &crate::LadderSpec,
    err: &mut impl FnMut(String, String),
) {
    let at = |f: &str| format!("spec.ladder.{f}");
    check_target(&at("targetQuality"), &l.target_quality, l.codec, err);
    for (f, dim) in [("maxHeight", l.max_height), ("minHeight", l.min_height)] {
        if let Some(d) = dim.filter(|d| !(16..=8192).contains(d)) {
            err(at(f), format!("{d} is out of range (16..=8192)"));
        }
    }
    if let (Some(lo), Some(hi)) = (l.min_height, l.max_height) {
        if lo > hi {
            err(at("minHeight"), format!("{lo} is above maxHeight {hi}"));
        }
    }
    if let Some(n) = l.max_rungs.filter(|n| !(1..=8).contains(n)) {
        err(at("maxRungs"), format!("{n} is out of range (1..=8)"));
    }
    if let Some(m) = l.preset.as_deref().and_then(|p| preset_problem(l.codec, p)) {
        err(at("preset"), m);
    }
    if let Some(a) = &l.audio {
        if spec.output.container != Container::Mp4 && a.codec == AudioCodec::Opus {
            err(
                at("audio.codec"),
                "opus is not playable in HLS: use aac".into(),
            );
        }
        if a.codec == AudioCodec::Opus && a.channels.is_some_and(|c| c > 2) {
            err(
                at("audio.channels"),
                "opus output is limited to 2 channels here".into(),
            );
        }
    }
}

/// Why a URI cannot be used by a job on a cluster: workers read and write object storage, never the
/// operator's or a node's files. The same words in the operator's status and wherever the rule is checked.
pub fn cluster_uri_problem(field: &str, uri: &str) -> Option<String> {
    (!uri.starts_with("s3://")).then(|| {
        format!("{field}: {uri:?}: jobs in a cluster read and write s3:// URIs (file:// is for `tessera run`)")
    })
}

/// Fields that mean something only on a cluster, named when a job file runs on one machine (`tessera run`).
pub fn ignored_in_local_mode(spec: &TranscodeJobSpec) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = &spec.pool {
        out.push(format!(
            "spec.pool ({p}) is ignored by `tessera run`: it picks a WorkerPool on a cluster; this machine runs the job"
        ));
    }
    if spec.suspend {
        out.push("spec.suspend is ignored by `tessera run`: it pauses a job on a cluster; Ctrl-C stops a local run".into());
    }
    if spec.ttl_seconds_after_finished.is_some() {
        out.push("spec.ttlSecondsAfterFinished is ignored by `tessera run`: it deletes a finished TranscodeJob object on a cluster".into());
    }
    if spec.priority != 0 {
        out.push(format!(
            "spec.priority ({}) is ignored by `tessera run`: it orders jobs in a cluster's queue",
            spec.priority
        ));
    }
    out
}

fn check_uri(field: &str, uri: &str, is_dir: bool, err: &mut impl FnMut(String, String)) {
    if let Some(path) = uri.strip_prefix("file://") {
        if !path.starts_with('/') {
            err(
                field.into(),
                format!("{uri:?}: file:// URIs must hold an absolute path (file:///abs/path)"),
            );
        } else if path.split('/').any(|seg| seg == "..") {
            err(
                field.into(),
                format!("{uri:?}: '..' is not allowed in paths"),
            );
        } else if !is_dir && path.ends_with('/') {
            err(
                field.into(),
                format!("{uri:?}: names a folder; the input must be a file"),
            );
        }
    } else if let Some(rest) = uri.strip_prefix("s3://") {
        // Checked in full where S3 I/O lives; here its shape, and no '.' or '..' segments: stores treat
        // them as plain names, but tools that map keys to paths do not.
        let bucket = rest.split('/').next().unwrap_or("");
        if bucket.is_empty() {
            err(
                field.into(),
                format!("{uri:?}: missing bucket name (s3://bucket/key)"),
            );
        } else if !valid_bucket(bucket) {
            err(
                field.into(),
                format!("{uri:?}: {bucket:?} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.' or '-')"),
            );
        } else if rest.split('/').any(|seg| seg == ".." || seg == ".") {
            err(
                field.into(),
                format!("{uri:?}: '.' and '..' are not allowed in keys"),
            );
        }
    } else {
        err(
            field.into(),
            format!("{uri:?}: unsupported scheme; use file:///abs/path or s3://bucket/key"),
        );
    }
}

fn valid_bucket(b: &str) -> bool {
    let c = b.as_bytes();
    (3..=63).contains(&c.len())
        && c.first()
            .is_some_and(|x| x.is_ascii_lowercase() || x.is_ascii_digit())
        && c.last()
            .is_some_and(|x| x.is_ascii_lowercase() || x.is_ascii_digit())
        && c.iter()
            .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'-'))
}

fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_job_yaml;

    fn spec(renditions: &str, extra: &str) -> TranscodeJobSpec {
        let y = format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {{name: t}}\nspec:\n  input: {{uri: \
             \"file:///in.mp4\"}}\n  output: {{uri: \"file:///out/\"{extra}}}\n  renditions:\n{renditions}"
        );
        parse_job_yaml(&y).unwrap().spec
    }

    fn fields(s: &TranscodeJobSpec) -> Vec<String> {
        validate_spec(s)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_plain_spec_is_valid() {
        assert!(fields(&spec(
            "    - {name: a, video: {codec: h264, height: 360}}\n",
            ""
        ))
        .is_empty());
    }

    #[test]
    fn each_problem_names_its_field() {
        let s = spec(
            "    - {name: a, video: {codec: h264, crf: 20, bitrate: 1M}}\n    - {name: ../x, video: {codec: av1, \
             preset: medium}}\n    - {name: A, video: {codec: hevc, crf: 60}}\n",
            "",
        );
        assert_eq!(
            fields(&s),
            [
                "spec.renditions[0].video",
                "spec.renditions[1].name",
                "spec.renditions[1].video.preset",
                "spec.renditions[2].name",
                "spec.renditions[2].video.crf"
            ]
        );
    }

    #[test]
    fn a_quality_target_excludes_crf_and_bitrate_and_checks_its_bounds() {
        let s = spec(
            "    - {name: a, video: {codec: h264, height: 720, targetQuality: {vmaf: 93}, maxrate: 6M}}\n    - {name: b, \
             video: {codec: h264, crf: 20, targetQuality: {vmaf: 93}}}\n    - {name: c, video: {codec: hevc, \
             targetQuality: {vmaf: 93, minCrf: 30, maxCrf: 20}}}\n    - {name: d, video: {codec: av1, \
             targetQuality: {vmaf: 100, maxCrf: 70}}}\n",
            "",
        );
        assert_eq!(
            fields(&s),
            [
                "spec.renditions[1].video.targetQuality",
                "spec.renditions[2].video.targetQuality.minCrf",
                "spec.renditions[3].video.targetQuality.vmaf",
                "spec.renditions[3].video.targetQuality.maxCrf",
            ]
        );
    }

    #[test]
    fn opus_in_hls_and_bad_uris_are_rejected() {
        let mut s = spec(
            "    - {name: a, video: {codec: h264}, audio: {codec: opus}}\n",
            ", container: hls",
        );
        s.input.uri = "relative.mp4".into();
        s.output.uri = "file://out/".into();
        assert_eq!(
            fields(&s),
            [
                "spec.input.uri",
                "spec.output.uri",
                "spec.renditions[0].audio.codec"
            ]
        );
        s.input.uri = "file:///a/../etc/passwd".into();
        assert!(fields(&s).contains(&"spec.input.uri".to_string()));
        s.output.uri = "s3://bkt/out/../../x/".into();
        assert!(fields(&s).contains(&"spec.output.uri".to_string()));
        s.output.uri = "s3://Bad_Bucket/out/".into();
        assert!(fields(&s).contains(&"spec.output.uri".to_string()));
    }
}
