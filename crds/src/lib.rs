//! Tessera's API types: the one place where `TranscodeJob` and `WorkerPool` are defined.
//!
//! The operator, the worker and `tessera run` all read these types; `crdgen` turns them into the CRD YAML
//! under `crds/` (checked in, and diff-checked in CI).

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod ladder;
pub mod protocol;
pub mod streams;
pub mod tenancy;
mod validate;
pub mod work;

/// Every Tessera CRD as the API server takes it, with its file name (`transcodejob.yaml`, ...): with the
/// CEL rules (`x-kubernetes-validations`, enforced from Kubernetes 1.25) or without them, for 1.20 to 1.24
/// servers, which refuse the field.
pub fn definitions(with_cel: bool) -> Vec<(&'static str, serde_json::Value)> {
    use kube::CustomResourceExt;
    [
        ("transcodejob.yaml", TranscodeJob::crd()),
        ("workerpool.yaml", WorkerPool::crd()),
    ]
    .into_iter()
    .map(|(file, crd)| {
        let mut v = serde_json::to_value(&crd).expect("a CRD serialises");
        if file == "transcodejob.yaml" {
            require_renditions_or_ladder(&mut v);
        }
        if !with_cel {
            strip_cel(&mut v);
        }
        (file, v)
    })
    .collect()
}

/// A job needs renditions or a ladder, said in the structural schema so that servers without CEL (before
/// 1.25) reject it at apply too. Added here: kube's schema rewriter cannot take a property inside `anyOf`.
fn require_renditions_or_ladder(crd: &mut serde_json::Value) {
    for v in crd["spec"]["versions"].as_array_mut().into_iter().flatten() {
        let spec = &mut v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        if let Some(m) = spec.as_object_mut() {
            m.insert(
                "anyOf".into(),
                serde_json::json!([
                    {"properties": {"renditions": {"minItems": 1}}},
                    {"required": ["ladder"]}
                ]),
            );
        }
    }
}

/// Whether an API server of this version enforces CEL rules in CRDs (beta and on by default from 1.25).
pub fn server_enforces_cel(major: &str, minor: &str) -> bool {
    let num = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .unwrap_or(0)
    };
    (num(major), num(minor)) >= (1, 25)
}

/// Remove every `x-kubernetes-validations` (CEL rules).
fn strip_cel(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("x-kubernetes-validations");
            m.values_mut().for_each(strip_cel);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_cel),
        _ => {}
    }
}
pub use ladder::{Ladder, LadderPoint, LadderRung, LadderSpec};
pub use streams::{LeftOutStream, OutputStream, StreamsSpec, TrackSelection};
pub use validate::{cluster_uri_problem, ignored_in_local_mode, validate_spec, ValidationError};

/// The API group of every Tessera kind.
pub const GROUP: &str = "tessera.dev";
/// The label on every worker pod naming its WorkerPool.
pub const POOL_LABEL: &str = "tessera.dev/pool";
/// The annotation on the leader Lease where workers (and `tessera doctor`) find the queue API.
pub const QUEUE_URL_ANNOTATION: &str = "tessera.dev/queue-url";

/// A request to turn one input into a set of renditions.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "TranscodeJob",
    namespaced,
    shortname = "tj",
    category = "tessera",
    doc = "A request to turn one input video (in S3) into a set of renditions: the operator plans it as \
           keyframe-aligned chunks, encodes them on a WorkerPool's workers and stitches frame-exact outputs.",
    status = "TranscodeJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress.display"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.pool","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.output.container) || self.output.container == 'mp4' || self.renditions.all(r, !has(r.audio) || r.audio.codec != 'opus')",
        "message": "opus audio is not playable in hls and cmaf outputs: use aac",
        "fieldPath": ".renditions"
    },
    {
        "rule": "!has(self.output.container) || self.output.container == 'mp4' || !has(self.ladder) || !has(self.ladder.audio) || self.ladder.audio.codec != 'opus'",
        "message": "opus audio is not playable in hls and cmaf outputs: use aac",
        "fieldPath": ".ladder.audio.codec"
    },
    {
        "rule": "size(self.renditions) > 0 || has(self.ladder)",
        "message": "give renditions, a ladder, or both",
        "fieldPath": ".renditions"
    },
    {
        "rule": "has(self.ladder) == has(oldSelf.ladder) && (!has(self.ladder) || self.ladder == oldSelf.ladder)",
        "message": "spec.ladder is immutable: create a new job"
    },
    {"rule": "self.input == oldSelf.input", "message": "spec.input is immutable: create a new job", "fieldPath": ".input"},
    {"rule": "self.output == oldSelf.output", "message": "spec.output is immutable: create a new job", "fieldPath": ".output"},
    {"rule": "self.renditions == oldSelf.renditions", "message": "spec.renditions is immutable: create a new job", "fieldPath": ".renditions"},
    {
        "rule": "has(self.chunking) == has(oldSelf.chunking) && (!has(self.chunking) || self.chunking == oldSelf.chunking)",
        "message": "spec.chunking is immutable: create a new job"
    },
    {
        "rule": "has(self.streams) == has(oldSelf.streams) && (!has(self.streams) || self.streams == oldSelf.streams)",
        "message": "spec.streams is immutable: create a new job"
    },
    {
        "rule": "has(self.thumbnails) == has(oldSelf.thumbnails) && (!has(self.thumbnails) || self.thumbnails == oldSelf.thumbnails)",
        "message": "spec.thumbnails is immutable: create a new job"
    },
    {
        "rule": "has(self.quality) == has(oldSelf.quality) && (!has(self.quality) || self.quality == oldSelf.quality)",
        "message": "spec.quality is immutable: create a new job"
    },
    {
        "rule": "(has(self.hardware) ? self.hardware : 'auto') == (has(oldSelf.hardware) ? oldSelf.hardware : 'auto')",
        "message": "spec.hardware is immutable: create a new job"
    },
    {
        "rule": "has(self.pool) == has(oldSelf.pool) && (!has(self.pool) || self.pool == oldSelf.pool)",
        "message": "spec.pool is immutable: create a new job"
    }
]))]
pub struct TranscodeJobSpec {
    /// Where the source video is read from.
    pub input: InputSpec,
    /// Where the renditions are written to.
    pub output: OutputSpec,
    /// The outputs to produce; each one is a separately encoded file (mp4) or media playlist (hls). Names are
    /// unique (the API server rejects duplicates: the list is a map keyed by name). May be empty when
    /// `ladder` builds the renditions.
    #[serde(default)]
    #[schemars(
        length(max = 32),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub renditions: Vec<Rendition>,
    /// Build renditions from the content (per-title): sample chunks are encoded at several sizes and
    /// settings, scored with VMAF at the top size, and the rungs are chosen among the undominated points. They
    /// follow `renditions`; `status.ladder` reports the choice and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ladder: Option<LadderSpec>,
    /// Which source audio and subtitle tracks the outputs keep (default: all of them). Every source stream
    /// an output lacks is listed in its status with the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<StreamsSpec>,
    /// Thumbnails for scrubbing: JPEG sprite sheets and a WebVTT thumbnail track under `_thumbnails/` (and an
    /// image adaptation set in the DASH MPD of cmaf outputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnails: Option<ThumbnailSpec>,
    /// How the input is cut into chunks that are encoded in parallel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunking: Option<ChunkingSpec>,
    /// Which encoder family to use: `auto` tries hardware encoders first and falls back to software.
    #[serde(default)]
    pub hardware: Hardware,
    /// Larger runs first. Can be changed while the job is queued.
    #[serde(default)]
    pub priority: i32,
    /// Objective quality metrics to compute for every rendition against the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualitySpec>,
    /// The WorkerPool that runs this job: `name` (in the job's namespace) or `namespace/name`. Absent: the
    /// operator's default pool. Ignored by `tessera run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 317),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub pool: Option<String>,
    /// While true, no new work of this job is handed out and its running tasks are given back (as with
    /// Kubernetes Jobs); finished chunks are kept and the job resumes where it stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Delete the job this many seconds after it completed or failed (as with Kubernetes Jobs). Outputs stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<i64>,
}

impl TranscodeJobSpec {
    /// Whether rendition `r`'s chunks are scored with VMAF as they are encoded: the job asks for the metric,
    /// or the rendition aims at a quality.
    pub fn measures_vmaf(&self, r: &Rendition) -> bool {
        r.video.target_quality.is_some()
            || self
                .quality
                .as_ref()
                .is_some_and(|q| q.metrics.contains(&QualityMetric::Vmaf))
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputSpec {
    /// `s3://bucket/key`, or `file:///absolute/path` with `tessera run` (a cluster's workers read S3).
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "!self.startsWith('file://')", "message": "file:// is for `tessera run` on one machine; a cluster reads s3://bucket/key"}
    ]))]
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^(file:///|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$))")
    )]
    pub uri: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputSpec {
    /// A folder: `s3://bucket/prefix/`, or `file:///absolute/dir/` with `tessera run`.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "!self.startsWith('file://')", "message": "file:// is for `tessera run` on one machine; a cluster writes s3://bucket/prefix/"}
    ]))]
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^(file:///|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$))")
    )]
    pub uri: String,
    /// `mp4` writes `<rendition>.mp4`; `hls` writes `master.m3u8` and `<rendition>/index.m3u8`; `cmaf` writes
    /// one set of fragmented-MP4 segments per track, referenced by both `master.m3u8` (HLS) and
    /// `manifest.mpd` (DASH).
    #[serde(default)]
    pub container: Container,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    #[default]
    Mp4,
    Hls,
    Cmaf,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rendition {
    /// Used in output names, so it is restricted to a safe file name.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
    )]
    pub name: String,
    /// The video of this rendition: codec, size and rate control.
    pub video: VideoSpec,
    /// Defaults to AAC at 128 kb/s when the input has audio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<AudioSpec>,
}

/// The video encoding of a rendition.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.crf) && has(self.bitrate))", "message": "crf and bitrate are exclusive: give one of them"},
    {
        "rule": "!has(self.targetQuality) || !(has(self.crf) || has(self.bitrate))",
        "message": "targetQuality is exclusive with crf and bitrate: the setting is chosen per chunk",
        "fieldPath": ".targetQuality"
    },
    {
        "rule": "!has(self.crf) || self.codec == 'av1' || self.crf <= 51",
        "message": "crf is out of range for h264 and hevc (0..51)",
        "fieldPath": ".crf"
    },
    {
        "rule": "!has(self.targetQuality) || self.codec == 'av1' || ((!has(self.targetQuality.minCrf) || self.targetQuality.minCrf <= 51) && (!has(self.targetQuality.maxCrf) || self.targetQuality.maxCrf <= 51))",
        "message": "minCrf and maxCrf are out of range for h264 and hevc (0..51)",
        "fieldPath": ".targetQuality"
    },
    {
        "rule": "!has(self.preset) || (self.codec == 'av1' ? self.preset.matches('^([0-9]|1[0-3])$') : self.preset in ['ultrafast', 'superfast', 'veryfast', 'faster', 'fast', 'medium', 'slow', 'slower', 'veryslow', 'placebo'])",
        "message": "unknown preset: x264/x265 take ultrafast..placebo, SVT-AV1 0..13",
        "fieldPath": ".preset"
    }
]))]
pub struct VideoSpec {
    /// `h264`, `hevc` or `av1`; the encoder is chosen by `spec.hardware` (NVENC, QSV, VAAPI or software).
    pub codec: VideoCodec,
    /// Output width; when only one of width and height is given the other keeps the aspect ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 8192))]
    pub width: Option<u32>,
    /// Output height; when only one of width and height is given the other keeps the aspect ratio. Neither: the
    /// source size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 8192))]
    pub height: Option<u32>,
    /// Constant rate factor (quality target); exclusive with `bitrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 63))]
    pub crf: Option<u8>,
    /// Average bitrate, e.g. `3M` or `800k`; exclusive with `crf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate: Option<Bitrate>,
    /// Peak bitrate cap (VBV), with `crf` or `bitrate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxrate: Option<Bitrate>,
    /// Encoder speed/quality preset in the software encoder's terms (x264/x265: ultrafast..placebo; SVT-AV1: 0..13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub preset: Option<String>,
    /// Aim each chunk at a perceptual quality instead of a fixed `crf`: the worker finds, per chunk, the
    /// encoder setting whose VMAF lands on the target (probe encodes of a sample of the chunk's frames),
    /// then encodes once with it. Exclusive with `crf` and `bitrate`; `maxrate` still caps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_quality: Option<TargetQuality>,
}

/// A per-chunk quality target.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.minCrf) || !has(self.maxCrf) || self.minCrf <= self.maxCrf",
        "message": "minCrf is above maxCrf",
        "fieldPath": ".minCrf"
    }
]))]
pub struct TargetQuality {
    /// The mean VMAF each chunk aims for (model vmaf_v0.6.1; vmaf_4k_v0.6.1 for 2160p renditions).
    #[schemars(range(min = 20.0, max = 99.0))]
    pub vmaf: f64,
    /// The lowest setting (best quality) a chunk may get, on the encoder's CRF scale (cq for NVENC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 63))]
    pub min_crf: Option<u8>,
    /// The highest setting (smallest size) a chunk may get.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 63))]
    pub max_crf: Option<u8>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VideoCodec {
    H264,
    Hevc,
    Av1,
}

impl fmt::Display for VideoCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::H264 => "h264",
            Self::Hevc => "hevc",
            Self::Av1 => "av1",
        })
    }
}

/// The audio of a rendition.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.codec != 'opus' || !has(self.channels) || self.channels <= 2",
        "message": "opus output is limited to 2 channels here",
        "fieldPath": ".channels"
    }
]))]
pub struct AudioSpec {
    /// `aac`, `opus` (mp4 only), `copy` (the source audio as it is) or `none` (no audio).
    pub codec: AudioCodec,
    /// e.g. `128k`; ignored for `copy` and `none`. Default: AAC 128k and Opus 96k for stereo, scaled by the
    /// channel count for more channels (5.1 AAC: 384k).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate: Option<Bitrate>,
    /// Down- or up-mix to this many channels (default: keep, at most 2 for opus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub channels: Option<u32>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AudioCodec {
    Aac,
    Opus,
    Copy,
    None,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThumbnailSpec {
    /// One thumbnail every this many seconds (default 10).
    #[serde(default = "ThumbnailSpec::default_interval")]
    #[schemars(range(min = 0.5, max = 600.0))]
    pub interval_seconds: f64,
    /// Thumbnail width in pixels (default 160); the height keeps the aspect ratio.
    #[serde(default = "ThumbnailSpec::default_width")]
    #[schemars(range(min = 32, max = 1920))]
    pub width: u32,
}

impl ThumbnailSpec {
    fn default_interval() -> f64 {
        10.0
    }
    fn default_width() -> u32 {
        160
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChunkingSpec {
    /// Target chunk length; chunks start on source keyframes near multiples of it. Automatic when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.5, max = 3600.0))]
    pub target_seconds: Option<f64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Hardware {
    /// Try NVENC, QSV, VAAPI in that order by opening them; fall back to software.
    #[default]
    Auto,
    Nvidia,
    Intel,
    Vaapi,
    Software,
}

/// Objective quality metrics to compute.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QualitySpec {
    /// Metrics computed for every rendition against the source scaled to it: `psnr`, `ssim`, `vmaf`.
    #[serde(default)]
    pub metrics: Vec<QualityMetric>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QualityMetric {
    Psnr,
    Ssim,
    /// VMAF (libvmaf 2.3.1, model vmaf_v0.6.1, or vmaf_4k_v0.6.1 for 2160p renditions), measured per chunk
    /// on the frames the worker encodes and aggregated per rendition.
    Vmaf,
}

/// A bitrate in bits per second, written as an integer or a string with a `k`/`M`/`G` suffix (`128k`, `4.5M`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitrate(pub u64);

impl Bitrate {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, mult) = match t.char_indices().last() {
            Some((i, 'k' | 'K')) => (&t[..i], 1e3),
            Some((i, 'm' | 'M')) => (&t[..i], 1e6),
            Some((i, 'g' | 'G')) => (&t[..i], 1e9),
            _ => (t, 1.0),
        };
        let v: f64 = num.parse().map_err(|_| {
            format!(
                "invalid bitrate {s:?}: expected a number with an optional k/M/G suffix, e.g. 128k"
            )
        })?;
        let bps = v * mult;
        if !(1_000.0..=2e9).contains(&bps) {
            return Err(format!("bitrate {s:?} is out of range (1k..2G)"));
        }
        Ok(Self(bps.round() as u64))
    }
}

impl fmt::Display for Bitrate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_multiple_of(1_000_000) {
            write!(f, "{}M", b / 1_000_000)
        } else if b.is_multiple_of(1_000) {
            write!(f, "{}k", b / 1_000)
        } else {
            write!(f, "{b}")
        }
    }
}

impl Serialize for Bitrate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Bitrate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Bitrate::parse(&n.to_string()),
            Raw::Str(s) => Bitrate::parse(&s),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Bitrate {
    fn schema_name() -> Cow<'static, str> {
        "Bitrate".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // Structural schemas allow no types inside anyOf, and an anyOf without them accepts anything: the
        // checks sit at the top, where `pattern` applies to strings only and `minimum` to numbers only.
        json_schema!({
            "description": "Bits per second: an integer, or a string with a k/M/G suffix such as 128k or 4.5M.",
            "x-kubernetes-int-or-string": true,
            "pattern": "^[0-9]+(\\.[0-9]+)?[kKmMgG]?$",
            "minimum": 1000
        })
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// `Pending`, `Running`, `Succeeded` or `Failed` (a plain string enum: Kubernetes 1.20 rejects `null` in enums).
fn phase_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["Pending", "Running", "Succeeded", "Failed"]})
}

/// What the operator observed of a TranscodeJob.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TranscodeJobStatus {
    /// `Pending`, `Running`, `Succeeded` or `Failed`; the conditions say why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<Phase>,
    /// Standard conditions, one per type: `Ready` (True once complete), `Reconciling` and `Stalled` (as
    /// kstatus and Flux read them), and `Complete`, `Failed`, `Progressing` (as for Kubernetes Jobs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Chunks encoded out of the plan's total, with speed and ETA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// One entry per finished rendition: file, size, encoder, quality and streams.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renditions: Vec<RenditionStatus>,
    /// The ladder `spec.ladder` built: the rungs chosen, every point measured, and what was left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ladder: Option<Ladder>,
    /// `master.m3u8` for hls and cmaf outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_playlist: Option<String>,
    /// `manifest.mpd` (DASH) for cmaf outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// The WebVTT thumbnail track, when thumbnails were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnails: Option<String>,
    /// Video encoder(s) used, e.g. `libx264` or `h264_nvenc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<String>,
    /// Seconds of worker time spent on this job's tasks, on the pool's devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_seconds: Option<f64>,
    /// When the job started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When the job completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// Chunk progress of a job.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Chunks encoded (or reused) so far.
    pub chunks_done: u32,
    /// Chunks in the plan.
    pub chunks_total: u32,
    /// 0..=100, whole percent.
    pub percent: u32,
    /// What `kubectl get tj` shows, e.g. `7/12 (58%)`.
    pub display: String,
    /// Source frames encoded per second, over the job so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<f64>,
    /// Estimated seconds until the last chunk is encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Chunks of `chunksDone` not encoded for this job: found in the pool's result store (encoded for an
    /// earlier job with the same input and settings), made by an identical task of another job at the same
    /// time, or found in the job's ledger after a restart.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reused: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Progress {
    pub fn new(chunks_done: u32, chunks_total: u32) -> Self {
        let percent = if chunks_total == 0 {
            0
        } else {
            (u64::from(chunks_done) * 100 / u64::from(chunks_total)) as u32
        };
        Self {
            chunks_done,
            chunks_total,
            percent,
            display: format!("{chunks_done}/{chunks_total} ({percent}%)"),
            fps: None,
            eta_seconds: None,
            reused: 0,
        }
    }
}

/// A finished rendition.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenditionStatus {
    /// The rendition's name from the spec.
    pub name: String,
    /// The finished output: the mp4 file, or the media playlist for hls.
    pub uri: String,
    /// Video frames in the output.
    pub frames: u64,
    /// Duration of the output's video.
    pub duration_seconds: f64,
    /// Size of the output (all its segments for hls and cmaf).
    pub bytes: u64,
    /// Encoded width in pixels.
    pub width: u32,
    /// Encoded height in pixels.
    pub height: u32,
    /// FFmpeg encoder name, e.g. `libx264` or `h264_nvenc`.
    pub encoder: String,
    /// Why this encoder was chosen, including every hardware encoder that failed to open.
    pub encoder_reason: String,
    /// Mean PSNR (dB, luma) against the source scaled to the rendition (`quality.metrics: [psnr]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psnr: Option<f64>,
    /// Mean SSIM (luma) against the source scaled to the rendition (`quality.metrics: [ssim]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssim: Option<f64>,
    /// VMAF over every frame (`quality.metrics: [vmaf]`, or a `targetQuality`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmaf: Option<VmafSummary>,
    /// What a `targetQuality` rendition achieved, and the settings its chunks were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<TargetOutcome>,
    /// Every stream in the output: kind, codec, language, title, disposition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<OutputStream>,
    /// Every source stream this output lacks, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<LeftOutStream>,
}

/// VMAF of a rendition, pooled over all its frames.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmafSummary {
    /// The libvmaf model, e.g. `vmaf_v0.6.1`.
    pub model: String,
    /// Frames scored.
    pub frames: u64,
    /// Arithmetic mean over the frames.
    pub mean: f64,
    /// libvmaf's harmonic mean: `n / Σ 1/(1+score) − 1`; it weighs the worst frames more.
    pub harmonic_mean: f64,
    /// The lowest frame score.
    pub min: f64,
    /// The 5th percentile of the per-frame scores.
    pub p5: f64,
}

/// What a `targetQuality` rendition achieved.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetOutcome {
    /// The target mean VMAF.
    pub target: f64,
    /// Mean VMAF over every frame of the rendition.
    pub achieved_mean: f64,
    /// The chunk with the lowest mean VMAF, and that mean.
    pub min_chunk: u32,
    /// The mean VMAF of that chunk.
    pub min_chunk_vmaf: f64,
    /// The lowest and highest setting given to a chunk (CRF, or cq for NVENC); each chunk's setting, with
    /// the encoder that used it, is in the job's per-chunk records (`tessera run --json`: `chunkRecords`).
    pub min_crf: u8,
    /// The highest setting given to a chunk.
    pub max_crf: u8,
    /// Chunks whose setting sits on a bound (`minCrf`/`maxCrf` or the encoder's range): where the target
    /// was out of reach, the achieved mean differs from it for that reason.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunks_at_bound: u32,
}

/// A set of worker pods on nodes with a given device-plugin resource. Completed by the operator issue.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "WorkerPool",
    namespaced,
    shortname = "wp",
    category = "tessera",
    doc = "A set of worker pods on nodes with a device-plugin resource (`nvidia.com/gpu`, ...), scaled from \
           the depth of its chunk queue, that runs the chunk tasks of the TranscodeJobs allowed to use it.",
    status = "WorkerPoolStatus",
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desired"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Busy","type":"integer","jsonPath":".status.busy"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerPoolSpec {
    /// Device-plugin resource each worker requests, e.g. `nvidia.com/gpu`; absent for CPU-only pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<DeviceResource>,
    /// Workers kept running even with an empty queue (0: scale to zero).
    #[serde(default)]
    pub min_workers: u32,
    /// The most workers the pool scales to (default 4).
    #[serde(default = "default_max_workers")]
    pub max_workers: u32,
    /// Chunk tasks one worker runs at a time: the encoder sessions its device gives (consumer NVIDIA GPUs
    /// allow 8 NVENC sessions, data-centre ones more). The pool's capacity is workers × this.
    #[serde(default = "default_tasks_per_worker")]
    #[schemars(range(min = 1, max = 64))]
    pub tasks_per_worker: u32,
    /// An idle worker is removed only after this many seconds without a task.
    #[serde(default = "default_cooldown")]
    #[schemars(range(min = 0, max = 86_400))]
    pub cooldown_seconds: u32,
    /// The ServiceAccount workers run as (in the pool's namespace); its token is what the queue API accepts
    /// from this pool's workers.
    #[serde(default = "default_worker_sa")]
    pub service_account_name: String,
    /// Which namespaces' jobs may use this pool (the Gateway API's shape): `Same` (the default, the pool's own
    /// namespace), `All`, or `Selector` with a namespace label selector (`kubernetes.io/metadata.name` selects
    /// by name). A job naming a pool it may not use fails with `PoolNotAllowed`, as does one naming a pool that
    /// does not exist in another namespace: the answer does not tell which.
    #[serde(default)]
    pub allowed_namespaces: tenancy::Namespaces,
    /// The S3 locations jobs may read and write through this pool, per namespace (`{namespace}` is replaced
    /// by the job's), checked before anything is queued; a job outside them fails with `AccessNotAllowed`.
    /// Empty: no limit beyond what the pool's credentials reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<tenancy::AccessRule>,
    /// Where this pool's workers file encoded chunks by content (`s3://bucket/prefix/`; `{namespace}` is
    /// replaced by the job's namespace), so identical work is done once across jobs: a chunk encoded for
    /// another job from the same input object (same ETag), with the same boundaries, settings and encoder,
    /// is used instead of encoded again, and two such jobs running at once encode it once. Results are
    /// shared only by jobs that use the same location; with `access` rules it must lie within what they let
    /// the job's namespace write (`{namespace}` keeps tenants apart). Absent: no reuse across jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_store: Option<String>,
    /// How long a result in the store is kept after it was last made or used (default 604800: 7 days). While the
    /// store is in use, a collection task of the pool deletes older results (at most every quarter of this
    /// time, with a job's stitch), except those a job that is still running needs; a worker does not take
    /// a result that is close to expiry (it encodes it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 31_536_000))]
    pub result_retention_seconds: Option<u64>,
    /// The S3 endpoint and credentials workers use. Jobs cannot pick an endpoint: the administrator sets it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Access>,
    /// Extra environment for the workers (proxies, `RUST_LOG`, `TESSERA_S3_*` tuning).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    /// Worker image (the `tessera` binary with FFmpeg runtime libraries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Node labels a worker pod's node must have, e.g. `nvidia.com/gpu.product: NVIDIA-L4`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// Tolerations for tainted GPU nodes (e.g. `nvidia.com/gpu:NoSchedule`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// The RuntimeClass of worker pods, e.g. `nvidia` where the NVIDIA container runtime is not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
    /// Node affinity and the like, for placements a nodeSelector cannot say (e.g. one of several GPU models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// Size limit of each worker's scratch space (an emptyDir, e.g. `20Gi`): the kubelet evicts a worker that
    /// writes more. A worker whose scratch has less than `TESSERA_SCRATCH_MIN_FREE_MB` (256) free takes no
    /// new task until space is freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch_size_limit: Option<k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    /// CPU and memory of each worker container (the device resource is added to its limits). Absent:
    /// requests `cpu: 2, memory: 1Gi`, limit `memory: 4Gi`, so workers are Burstable (not the first evicted)
    /// and a cluster autoscaler or Karpenter can size nodes for them. Measured peak of one 1080p chunk task
    /// on 2 cores: 0.3 GB (x264), 0.46 GB (x265), 0.59 GB (SVT-AV1); encoders use more threads, and memory,
    /// on larger nodes, and `tasksPerWorker` multiplies it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// The PriorityClass of worker pods (e.g. to let them preempt batch work, or be preempted by serving).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Secrets for pulling the worker image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<k8s_openapi::api::core::v1::LocalObjectReference>,
    /// Extra annotations on worker pods (e.g. for a service mesh or a log shipper).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pod_annotations: std::collections::BTreeMap<String, String>,
    /// Extra labels on worker pods; the operator's own (`tessera.dev/pool`, `app.kubernetes.io/*`) win.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pod_labels: std::collections::BTreeMap<String, String>,
    /// How worker pods spread over zones or nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint>,
    /// Extra groups of the worker process, e.g. the host's `render` group's ID, which Intel and AMD device
    /// nodes (`/dev/dri/renderD*`) need.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supplemental_groups: Vec<i64>,
}

impl WorkerPoolSpec {
    /// `resultRetentionSeconds`, or its default: 7 days.
    pub fn result_retention(&self) -> u64 {
        self.result_retention_seconds.unwrap_or(7 * 86_400)
    }
}

fn default_max_workers() -> u32 {
    4
}
fn default_tasks_per_worker() -> u32 {
    1
}
fn default_cooldown() -> u32 {
    60
}
fn default_worker_sa() -> String {
    "tessera-worker".into()
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Access {
    /// e.g. `https://s3.eu-west-1.amazonaws.com` or a MinIO/Ceph URL; absent: AWS's default for the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The S3 region (request signing); absent: `us-east-1`, or the region of the environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A Secret in the pool's namespace with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and optionally
    /// `AWS_SESSION_TOKEN`). Absent: the pod's own identity (IRSA, instance profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceResource {
    /// e.g. `nvidia.com/gpu`, `gpu.intel.com/i915`.
    pub name: String,
    /// Devices each worker requests (default 1).
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// What the operator observed of a WorkerPool: its workers by state.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolStatus {
    /// Workers the autoscaler wants now, from the queue's depth and the pool's bounds.
    #[serde(default)]
    pub desired: u32,
    /// Worker pods not yet ready (scheduling, pulling, starting).
    #[serde(default)]
    pub pending: u32,
    /// Worker pods ready.
    #[serde(default)]
    pub ready: u32,
    /// Workers running a task.
    #[serde(default)]
    pub busy: u32,
    /// Ready workers without a task.
    #[serde(default)]
    pub idle: u32,
    /// `Ready` (True when as many workers are ready as the pool wants) and `Reconciling` (True while workers
    /// are starting), one per type, as kstatus and Argo CD read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Parse a `TranscodeJob` manifest (the YAML `kubectl apply` and `tessera run` both accept).
///
/// Errors name the offending field path, e.g. `spec.renditions[0].video.codec`.
pub fn parse_job_yaml(text: &str) -> Result<TranscodeJob, String> {
    // More than one document: name how many and what they are, rather than serde's generic refusal.
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(text)
        .map(serde_yaml::Value::deserialize)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid YAML: {e}"))?;
    let docs: Vec<serde_yaml::Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let kind_of = |v: &serde_yaml::Value| {
        v.get("kind")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("<no kind>")
            .to_string()
    };
    let value = match docs.len() {
        0 => return Err("the file holds no YAML document: write one TranscodeJob".into()),
        1 => docs.into_iter().next().expect("one document"),
        n => {
            let kinds: Vec<String> = docs.iter().map(kind_of).collect();
            return Err(format!(
                "the file holds {n} YAML documents ({}); `tessera run` takes one TranscodeJob per file: \
                 split it, one job per file",
                kinds.join(", ")
            ));
        }
    };
    let field = |k: &str| {
        value
            .get(k)
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("<missing>")
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if kind.ends_with("List") {
        let n = value
            .get("items")
            .and_then(serde_yaml::Value::as_sequence)
            .map_or(0, Vec::len);
        return Err(format!(
            "kind: {kind} with {n} items; `tessera run` takes one TranscodeJob per file: put each item in its own file"
        ));
    }
    if api_version != format!("{GROUP}/v1alpha1") || kind != "TranscodeJob" {
        return Err(format!(
            "apiVersion/kind: expected tessera.dev/v1alpha1 TranscodeJob, found {api_version} {kind}"
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = did_you_mean(&e.into_inner().to_string());
        if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// serde's "unknown field `rendtions`, expected one of `input`, ..." becomes "unknown field `rendtions`: did
/// you mean `renditions`?" when one expected name is close (a typo), and keeps the list otherwise.
fn did_you_mean(msg: &str) -> String {
    let Some(rest) = msg.strip_prefix("unknown field `") else {
        return msg.to_string();
    };
    let Some((got, expected)) = rest.split_once('`') else {
        return msg.to_string();
    };
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = names
        .iter()
        .map(|n| {
            (
                edit_distance(&got.to_ascii_lowercase(), &n.to_ascii_lowercase()),
                *n,
            )
        })
        .min();
    match best {
        Some((d, n)) if d <= 2.max(got.len() / 4) => {
            format!("unknown field `{got}`: did you mean `{n}`?")
        }
        _ => msg.to_string(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cel_rules_go_only_to_servers_that_enforce_them() {
        assert!(!server_enforces_cel("1", "20"));
        assert!(!server_enforces_cel("1", "24+"));
        assert!(server_enforces_cel("1", "25"));
        assert!(server_enforces_cel("1", "33+"));
        assert!(server_enforces_cel("2", "0"));
        let rules = |cel| {
            serde_json::to_string(&definitions(cel))
                .unwrap()
                .contains("x-kubernetes-validations")
        };
        assert!(rules(true) && !rules(false));
    }

    const EXAMPLE: &str = r#"
apiVersion: tessera.dev/v1alpha1
kind: TranscodeJob
metadata: {name: fixture-job}
spec:
  input:  {uri: "file:///abs/in.mp4"}
  output: {uri: "file:///abs/outdir/", container: mp4}
  renditions:
    - name: 720p
      video: {codec: h264, height: 720, crf: 23, preset: medium}
      audio: {codec: aac, bitrate: 128k}
    - name: 360p
      video: {codec: h264, height: 360, crf: 28}
  chunking: {targetSeconds: 10}
  hardware: auto
  priority: 0
"#;

    #[test]
    fn parses_the_documented_example() {
        let job = parse_job_yaml(EXAMPLE).unwrap();
        assert_eq!(job.spec.renditions.len(), 2);
        assert_eq!(job.spec.renditions[0].video.height, Some(720));
        assert_eq!(
            job.spec.renditions[0].audio.as_ref().unwrap().bitrate,
            Some(Bitrate(128_000))
        );
        assert_eq!(job.spec.chunking.unwrap().target_seconds, Some(10.0));
        assert_eq!(job.spec.hardware, Hardware::Auto);
    }

    #[test]
    fn errors_name_the_field_path() {
        let bad = EXAMPLE.replace("codec: h264, height: 360", "codec: h265, height: 360");
        let err = parse_job_yaml(&bad).unwrap_err();
        assert!(err.contains("spec.renditions[1].video.codec"), "{err}");
        assert!(err.contains("h265"), "{err}");
        let bad = EXAMPLE.replace("crf: 28", "crf: 28, sharpness: 3");
        let err = parse_job_yaml(&bad).unwrap_err();
        assert!(
            err.contains("spec.renditions[1].video") && err.contains("sharpness"),
            "{err}"
        );
    }

    #[test]
    fn bitrates_parse_with_suffixes_and_integers() {
        assert_eq!(Bitrate::parse("128k").unwrap(), Bitrate(128_000));
        assert_eq!(Bitrate::parse("4.5M").unwrap(), Bitrate(4_500_000));
        assert_eq!(Bitrate::parse("800000").unwrap(), Bitrate(800_000));
        assert!(Bitrate::parse("fast").is_err());
        assert!(Bitrate::parse("12").is_err());
        let y = EXAMPLE.replace("bitrate: 128k", "bitrate: 96000");
        let job = parse_job_yaml(&y).unwrap();
        assert_eq!(
            job.spec.renditions[0].audio.as_ref().unwrap().bitrate,
            Some(Bitrate(96_000))
        );
        assert_eq!(Bitrate(96_000).to_string(), "96k");
    }

    #[test]
    fn progress_display_matches_counts() {
        let p = Progress::new(7, 12);
        assert_eq!((p.percent, p.display.as_str()), (58, "7/12 (58%)"));
        assert_eq!(Progress::new(0, 0).percent, 0);
    }

    #[test]
    fn wrong_kind_is_rejected() {
        let err = parse_job_yaml(&EXAMPLE.replace("kind: TranscodeJob", "kind: Job")).unwrap_err();
        assert!(err.contains("kind"), "{err}");
    }

    #[test]
    fn lists_and_several_documents_are_named_with_the_fix() {
        let two = format!("{EXAMPLE}---\n{EXAMPLE}");
        let err = parse_job_yaml(&two).unwrap_err();
        assert!(
            err.contains("2 YAML documents (TranscodeJob, TranscodeJob)"),
            "{err}"
        );
        assert!(err.contains("one TranscodeJob per file"), "{err}");
        // A trailing `---` is not a second document.
        assert!(parse_job_yaml(&format!("{EXAMPLE}---\n")).is_ok());
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n",
            EXAMPLE.trim().replace('\n', "\n  ")
        );
        let err = parse_job_yaml(&list).unwrap_err();
        assert!(err.starts_with("kind: List with 1 items"), "{err}");
        assert!(parse_job_yaml("").unwrap_err().contains("no YAML document"));
    }

    #[test]
    fn a_typo_gets_a_suggestion_and_a_stranger_the_list() {
        let err = parse_job_yaml(&EXAMPLE.replace("  renditions:", "  rendtions:")).unwrap_err();
        assert!(
            err.contains("unknown field `rendtions`: did you mean `renditions`?"),
            "{err}"
        );
        let err = parse_job_yaml(&EXAMPLE.replace("crf: 28", "crf: 28, sharpness: 3")).unwrap_err();
        assert!(err.contains("expected one of"), "{err}");
        assert_eq!(edit_distance("hieght", "height"), 2);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn cluster_only_fields_are_named_in_local_mode() {
        let job = parse_job_yaml(&format!(
            "{EXAMPLE}  pool: gpu/nvenc\n  ttlSecondsAfterFinished: 60\n"
        ))
        .unwrap();
        let notes = ignored_in_local_mode(&job.spec);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("spec.pool (gpu/nvenc) is ignored"));
        assert!(notes[1].starts_with("spec.ttlSecondsAfterFinished is ignored"));
        assert!(ignored_in_local_mode(&parse_job_yaml(EXAMPLE).unwrap().spec).is_empty());
        assert!(cluster_uri_problem("spec.input.uri", "file:///a.mp4")
            .unwrap()
            .contains("file:// is for `tessera run`"));
        assert!(cluster_uri_problem("spec.input.uri", "s3://b/a.mp4").is_none());
    }
}
