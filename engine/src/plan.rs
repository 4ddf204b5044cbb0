//! Pure planning: where chunks start, how big each rendition is, which encoders to try and with what
//! settings. No I/O here; everything is unit-tested.

use serde::Serialize;
use tessera_crds::{AudioCodec, AudioSpec, Bitrate, Hardware, Rendition, VideoCodec};

use crate::probe::Keyframe;

/// Automatic chunk length: about two chunks per worker, at least 10 s and at most 120 s. Every seam costs a
/// little compression (the encoder cannot look past a chunk's end), so chunks are as long as keeping all
/// workers busy allows; a chunk left alone at the end of a job uses every core (see `job`), so two per
/// worker balance well enough. Long inputs get 120 s chunks: few seams, and a lost chunk costs little.
pub fn auto_target_seconds(duration: f64, workers: usize) -> f64 {
    let per = duration / (workers.max(1) as f64 * 2.0);
    per.clamp(10.0, 120.0)
}

/// The parallelism a cluster job's automatic chunk length is sized for. A constant, not the pool's size: the
/// same input and `chunking` spec then always give the same chunks, whichever pool runs them.
pub const CLUSTER_PARALLELISM: usize = 16;

/// Indices into `keyframes` at which chunks start. The first chunk always starts at the input's beginning;
/// later chunks start on the keyframe nearest to each multiple of `target` past the previous start, never
/// closer than half a target to it, and a last chunk shorter than a quarter target is merged into the one
/// before it.
pub fn plan_boundaries(keyframes: &[Keyframe], duration: f64, target: f64) -> Vec<usize> {
    let mut starts = vec![0usize];
    if keyframes.is_empty() || target.is_nan() || target <= 0.0 {
        return starts;
    }
    let mut cur = 0usize;
    loop {
        let from = keyframes[cur].time;
        let ideal = from + target;
        // Candidates: keyframes after from + target/2.
        // Always past the current start, so the plan ends even for keyframes out of time order.
        let first = keyframes
            .partition_point(|k| k.time <= from + target * 0.5)
            .max(cur + 1);
        if first >= keyframes.len() {
            break;
        }
        // Nearest to the ideal among candidates (keyframe times are non-decreasing).
        let after = keyframes
            .partition_point(|k| k.time < ideal)
            .clamp(first, keyframes.len());
        let best = [
            after.checked_sub(1).filter(|&i| i >= first),
            (after < keyframes.len()).then_some(after),
        ]
        .into_iter()
        .flatten()
        .min_by(|&a, &b| {
            (keyframes[a].time - ideal)
                .abs()
                .total_cmp(&(keyframes[b].time - ideal).abs())
                .then(a.cmp(&b))
        });
        let Some(best) = best else { break };
        starts.push(best);
        cur = best;
    }
    if starts.len() > 1 && duration > 0.0 {
        let last = keyframes[*starts.last().unwrap()].time;
        if duration - last < target * 0.25 {
            starts.pop();
        }
    }
    starts
}

/// One chunk of the input: frames with presentation timestamps in `[start_pts, end_pts)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Chunk {
    pub index: usize,
    /// Where to seek before decoding; `None` decodes from the beginning.
    pub seek_ts: Option<i64>,
    /// `None`: from the first frame.
    pub start_pts: Option<i64>,
    /// `None`: to the last frame.
    pub end_pts: Option<i64>,
}

/// Frames in each chunk of `spans` (start and end seconds) at `fps`, the last taking what is left so they add
/// up to `total`.
pub fn frames_per_chunk(spans: &[(f64, f64)], fps: f64, total: u64) -> Vec<u64> {
    let mut left = total;
    spans
        .iter()
        .enumerate()
        .map(|(i, &(from, to))| {
            let n = if i + 1 == spans.len() {
                left
            } else {
                (((to - from).max(0.0) * fps).round() as u64).min(left)
            };
            left -= n;
            n
        })
        .collect()
}

/// Turn resolved boundary keyframes (seek timestamp, presentation timestamp) into chunks.
pub fn chunks_from_boundaries(bounds: &[(i64, i64)]) -> Vec<Chunk> {
    let mut out = Vec::with_capacity(bounds.len() + 1);
    // The first boundary is the input's start: chunk 0 decodes from the beginning.
    let n = bounds.len().max(1);
    for i in 0..n {
        let (seek_ts, start_pts) = if i == 0 {
            (None, None)
        } else {
            (Some(bounds[i].0), Some(bounds[i].1))
        };
        let end_pts = bounds.get(i + 1).map(|b| b.1);
        out.push(Chunk {
            index: i,
            seek_ts,
            start_pts,
            end_pts,
        });
    }
    out
}

/// Output frame size for a rendition: even dimensions, aspect kept where one side is omitted. Requested
/// sizes refer to the picture as displayed, so for a source rotated by 90° or 270° they are swapped.
pub fn output_size(
    src_w: u32,
    src_h: u32,
    rotation: f64,
    req_w: Option<u32>,
    req_h: Option<u32>,
) -> (u32, u32) {
    let quarter_turn = ((rotation.abs().round() as i64) % 180) == 90;
    let (req_w, req_h) = if quarter_turn {
        (req_h, req_w)
    } else {
        (req_w, req_h)
    };
    let even = |v: f64| ((v / 2.0).round() as u32 * 2).max(2);
    let (w, h) = (src_w as f64, src_h as f64);
    match (req_w, req_h) {
        (Some(rw), Some(rh)) => (even(rw as f64), even(rh as f64)),
        (Some(rw), None) => (even(rw as f64), even(rw as f64 * h / w)),
        (None, Some(rh)) => (even(rh as f64 * w / h), even(rh as f64)),
        (None, None) => ((src_w & !1).max(2), (src_h & !1).max(2)),
    }
}

/// The encoders to try for a codec, in order. Software is the last resort only for `auto`.
pub fn encoder_candidates(codec: VideoCodec, hw: Hardware) -> Vec<&'static str> {
    let (nv, qsv, va, sw): (&str, &str, &str, &[&str]) = match codec {
        VideoCodec::H264 => ("h264_nvenc", "h264_qsv", "h264_vaapi", &["libx264"]),
        VideoCodec::Hevc => ("hevc_nvenc", "hevc_qsv", "hevc_vaapi", &["libx265"]),
        VideoCodec::Av1 => (
            "av1_nvenc",
            "av1_qsv",
            "av1_vaapi",
            &["libsvtav1", "libaom-av1"],
        ),
    };
    match hw {
        Hardware::Auto => [nv, qsv, va]
            .into_iter()
            .chain(sw.iter().copied())
            .collect(),
        Hardware::Nvidia => vec![nv],
        Hardware::Intel => vec![qsv],
        Hardware::Vaapi => vec![va],
        Hardware::Software => sw.to_vec(),
    }
}

/// Encoder family, which decides how settings are spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    X26x,
    SvtAv1,
    Aom,
    Nvenc,
    Qsv,
    Vaapi,
}

pub fn family(encoder: &str) -> Family {
    match encoder {
        e if e.ends_with("_nvenc") => Family::Nvenc,
        e if e.ends_with("_qsv") => Family::Qsv,
        e if e.ends_with("_vaapi") => Family::Vaapi,
        "libsvtav1" => Family::SvtAv1,
        "libaom-av1" => Family::Aom,
        _ => Family::X26x,
    }
}

pub fn default_crf(codec: VideoCodec) -> u8 {
    match codec {
        VideoCodec::H264 => 23,
        VideoCodec::Hevc => 28,
        VideoCodec::Av1 => 35,
    }
}

/// Rate control and preset for one encoder, as (bit_rate, max_rate, buffer_size, options).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RateControl {
    pub bit_rate: Option<u64>,
    pub max_rate: Option<u64>,
    pub buf_size: Option<u64>,
    pub options: Vec<(String, String)>,
}

pub fn rate_control(encoder: &str, r: &Rendition) -> RateControl {
    let v = &r.video;
    let fam = family(encoder);
    let crf = if v.bitrate.is_none() {
        Some(v.crf.unwrap_or(default_crf(v.codec)))
    } else {
        None
    };
    let mut rc = RateControl {
        bit_rate: v.bitrate.map(|b| b.0),
        max_rate: v.maxrate.map(|b| b.0),
        buf_size: v.maxrate.map(|b| b.0 * 2),
        options: Vec::new(),
    };
    let mut opt = |k: &str, val: String| rc.options.push((k.into(), val));
    match fam {
        Family::X26x | Family::SvtAv1 => {
            if let Some(c) = crf {
                opt("crf", c.to_string());
            }
            if let Some(p) = &v.preset {
                opt("preset", p.clone());
            } else if fam == Family::SvtAv1 {
                opt("preset", "8".into());
            }
        }
        Family::Aom => {
            if let Some(c) = crf {
                opt("crf", c.to_string());
            }
            opt("cpu-used", "6".into());
            opt("row-mt", "1".into());
        }
        Family::Nvenc => {
            opt("rc", "vbr".into());
            if let Some(c) = crf {
                opt("cq", c.to_string());
            }
            let p = match v.preset.as_deref() {
                Some("ultrafast" | "superfast") => "p1",
                Some("veryfast") => "p2",
                Some("faster") => "p3",
                Some("fast") => "p4",
                Some("slow") => "p6",
                Some("slower" | "veryslow" | "placebo") => "p7",
                _ => "p5",
            };
            opt("preset", p.into());
        }
        Family::Qsv => {
            if let Some(c) = crf {
                opt("global_quality", c.to_string());
            }
            if let Some(p) = &v.preset {
                let p = match p.as_str() {
                    "ultrafast" | "superfast" => "veryfast",
                    "placebo" => "veryslow",
                    other => other,
                };
                opt("preset", p.into());
            }
        }
        Family::Vaapi => {
            if let Some(c) = crf {
                opt("rc_mode", "CQP".into());
                opt("qp", c.to_string());
            }
        }
    }
    rc
}

/// Audio settings after defaults: what is actually encoded. Renditions with equal settings share one encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct AudioPlan {
    pub codec: AudioCodec,
    pub bitrate: u64,
    pub channels: Option<u32>,
    /// The bitrate is the default, meant for stereo: tracks with more channels get as much per channel
    /// (5.1 AAC at 384 kb/s rather than a starved 128).
    pub scaled: bool,
}

impl AudioPlan {
    /// The bitrate for a track of `channels` output channels.
    pub fn bitrate_for(&self, channels: u32) -> u64 {
        if self.scaled && channels > 2 {
            self.bitrate / 2 * u64::from(channels)
        } else {
            self.bitrate
        }
    }
}

pub fn audio_plan(spec: Option<&AudioSpec>) -> Option<AudioPlan> {
    let default = AudioSpec {
        codec: AudioCodec::Aac,
        bitrate: None,
        channels: None,
    };
    let a = spec.unwrap_or(&default);
    let bitrate = a.bitrate.unwrap_or(match a.codec {
        AudioCodec::Opus => Bitrate(96_000),
        _ => Bitrate(128_000),
    });
    match a.codec {
        AudioCodec::None => None,
        AudioCodec::Copy => Some(AudioPlan {
            codec: AudioCodec::Copy,
            bitrate: 0,
            channels: None,
            scaled: false,
        }),
        c => Some(AudioPlan {
            codec: c,
            bitrate: bitrate.0,
            channels: a.channels,
            scaled: a.bitrate.is_none(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_crds::VideoSpec;

    fn keys(times: &[f64]) -> Vec<Keyframe> {
        times
            .iter()
            .map(|&t| Keyframe {
                seek_ts: (t * 1000.0) as i64,
                pts: None,
                time: t,
            })
            .collect()
    }

    #[test]
    fn keyframes_out_of_order_still_give_a_finite_increasing_plan() {
        // Found by fuzzing the probe: a damaged index listed a keyframe before an earlier one, and the
        // planner went back and forth between them forever.
        let k = keys(&[0.0, 12.0, 3.0, 11.0, f64::NAN, 2.0, 30.0]);
        let b = plan_boundaries(&k, 40.0, 10.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
    }

    #[test]
    fn boundaries_follow_the_target_on_regular_keyframes() {
        let k = keys(&(0..30).map(|i| i as f64 * 2.0).collect::<Vec<_>>()); // every 2 s, 60 s
        let b = plan_boundaries(&k, 60.0, 10.0);
        let t: Vec<f64> = b.iter().map(|&i| k[i].time).collect();
        assert_eq!(t, [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]);
    }

    #[test]
    fn boundaries_take_the_nearest_keyframe_and_skip_tiny_tails() {
        let k = keys(&[0.0, 3.0, 9.0, 12.5, 19.0, 27.0, 29.5]);
        // 0 → ideal 10: 9 is nearest; 9 → ideal 19: 19; 19 → ideal 29: 29.5, but the tail after it is 0.5 s.
        let b = plan_boundaries(&k, 30.0, 10.0);
        assert_eq!(
            b.iter().map(|&i| k[i].time).collect::<Vec<_>>(),
            [0.0, 9.0, 19.0]
        );
    }

    #[test]
    fn sparse_keyframes_give_one_chunk_and_never_a_chunk_shorter_than_half_target() {
        assert_eq!(plan_boundaries(&keys(&[0.0]), 100.0, 10.0), [0]);
        let k = keys(&[0.0, 1.0, 2.0, 40.0]);
        assert_eq!(plan_boundaries(&k, 50.0, 10.0), [0, 3]);
        assert_eq!(plan_boundaries(&[], 5.0, 10.0), [0]);
    }

    #[test]
    fn chunks_partition_the_timeline() {
        let c = chunks_from_boundaries(&[(0, 0), (4000, 4004), (9000, 9002)]);
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[0].start_pts, c[0].end_pts, c[0].seek_ts),
            (None, Some(4004), None)
        );
        assert_eq!(
            (c[1].start_pts, c[1].end_pts, c[1].seek_ts),
            (Some(4004), Some(9002), Some(4000))
        );
        assert_eq!((c[2].start_pts, c[2].end_pts), (Some(9002), None));
        assert_eq!(chunks_from_boundaries(&[]).len(), 1);
    }

    #[test]
    fn chunk_frames_add_up_to_the_input() {
        let spans = [(0.0, 10.0), (10.0, 20.04), (20.04, 25.0)];
        assert_eq!(frames_per_chunk(&spans, 25.0, 625), vec![250, 251, 124]);
        // An estimate past the total never makes later chunks negative.
        assert_eq!(frames_per_chunk(&spans, 25.0, 300), vec![250, 50, 0]);
        assert_eq!(frames_per_chunk(&[(0.0, 3.0)], 30.0, 91), vec![91]);
        assert!(frames_per_chunk(&[], 30.0, 91).is_empty());
    }

    #[test]
    fn auto_target_scales_with_duration_and_workers() {
        assert_eq!(auto_target_seconds(5.0, 8), 10.0);
        // A cluster's chunks do not depend on the pool: one constant parallelism.
        assert_eq!(auto_target_seconds(600.0, CLUSTER_PARALLELISM), 18.75);
        assert_eq!(auto_target_seconds(120.0, 2), 30.0);
        assert_eq!(auto_target_seconds(7200.0, 4), 120.0);
    }

    #[test]
    fn sizes_are_even_keep_aspect_and_follow_rotation() {
        assert_eq!(output_size(1920, 1080, 0.0, None, Some(720)), (1280, 720));
        assert_eq!(output_size(1280, 720, 0.0, None, Some(360)), (640, 360));
        assert_eq!(output_size(321, 241, 0.0, None, None), (320, 240));
        assert_eq!(output_size(640, 272, 0.0, None, Some(101)), (238, 102));
        assert_eq!(
            output_size(1920, 1080, 0.0, Some(1000), Some(500)),
            (1000, 500)
        );
        // Portrait phone video: stored 1920x1080 rotated 90°, shown 1080x1920. height 720 means shown height.
        assert_eq!(output_size(1920, 1080, -90.0, None, Some(720)), (720, 406));
    }

    #[test]
    fn candidates_try_hardware_first_only_for_auto() {
        assert_eq!(
            encoder_candidates(VideoCodec::H264, Hardware::Auto),
            ["h264_nvenc", "h264_qsv", "h264_vaapi", "libx264"]
        );
        assert_eq!(
            encoder_candidates(VideoCodec::Hevc, Hardware::Nvidia),
            ["hevc_nvenc"]
        );
        assert_eq!(
            encoder_candidates(VideoCodec::Av1, Hardware::Software),
            ["libsvtav1", "libaom-av1"]
        );
    }

    fn rendition(v: VideoSpec) -> Rendition {
        Rendition {
            name: "r".into(),
            video: v,
            audio: None,
        }
    }

    #[test]
    fn rate_control_speaks_each_encoders_language() {
        let v = VideoSpec {
            codec: VideoCodec::H264,
            width: None,
            height: None,
            crf: Some(20),
            bitrate: None,
            maxrate: Some(Bitrate(3_000_000)),
            preset: Some("slow".into()),
            target_quality: None,
        };
        let x = rate_control("libx264", &rendition(v.clone()));
        assert_eq!(
            x.options,
            [
                ("crf".to_string(), "20".to_string()),
                ("preset".into(), "slow".into())
            ]
        );
        assert_eq!((x.max_rate, x.buf_size), (Some(3_000_000), Some(6_000_000)));
        let n = rate_control("h264_nvenc", &rendition(v));
        assert!(
            n.options.contains(&("cq".into(), "20".into()))
                && n.options.contains(&("preset".into(), "p6".into()))
        );
        let b = VideoSpec {
            codec: VideoCodec::Av1,
            width: None,
            height: None,
            crf: None,
            bitrate: Some(Bitrate(2_000_000)),
            maxrate: None,
            preset: None,
            target_quality: None,
        };
        let s = rate_control("libsvtav1", &rendition(b));
        assert_eq!(
            (s.bit_rate, s.options.iter().any(|(k, _)| k == "crf")),
            (Some(2_000_000), false)
        );
        let d = VideoSpec {
            codec: VideoCodec::Hevc,
            width: None,
            height: None,
            crf: None,
            bitrate: None,
            maxrate: None,
            preset: None,
            target_quality: None,
        };
        assert_eq!(
            rate_control("libx265", &rendition(d)).options,
            [("crf".to_string(), "28".to_string())]
        );
    }

    #[test]
    fn audio_defaults_to_aac_128k_and_none_means_none() {
        assert_eq!(
            audio_plan(None),
            Some(AudioPlan {
                codec: AudioCodec::Aac,
                bitrate: 128_000,
                channels: None,
                scaled: true,
            })
        );
        // The default grows with the channels; a bitrate the spec names does not.
        let default = audio_plan(None).unwrap();
        assert_eq!(
            (default.bitrate_for(2), default.bitrate_for(6)),
            (128_000, 384_000)
        );
        let given = AudioSpec {
            codec: AudioCodec::Aac,
            bitrate: Some(Bitrate(256_000)),
            channels: None,
        };
        assert_eq!(audio_plan(Some(&given)).unwrap().bitrate_for(6), 256_000);
        let none = AudioSpec {
            codec: AudioCodec::None,
            bitrate: None,
            channels: None,
        };
        assert_eq!(audio_plan(Some(&none)), None);
        let opus = AudioSpec {
            codec: AudioCodec::Opus,
            bitrate: None,
            channels: Some(2),
        };
        assert_eq!(audio_plan(Some(&opus)).unwrap().bitrate, 96_000);
    }
}
