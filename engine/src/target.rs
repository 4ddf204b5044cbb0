//! Quality targeting, the pure part: which frames of a chunk the probe encodes use, which setting to probe
//! next, and which setting to encode with. The search is av1an's target-quality idea (probe, then
//! interpolate between the probes around the target) on the encoder's own CRF scale.

use std::ops::Range;

use crate::plan::{self, Family};

/// Frames in one contiguous run of samples: long enough for the encoder's inter prediction to behave as it
/// does on the whole chunk, short enough that a probe costs a fraction of the chunk.
pub const RUN: u64 = 8;
/// Probe encodes per chunk, at most.
pub const MAX_PROBES: usize = 4;
/// A probe this close to the target ends the search.
pub const CLOSE_ENOUGH: f64 = 0.3;

/// The frames (indices within a chunk of `frames` frames) the probes encode: the whole chunk when it is
/// short, else 2 to 5 runs of [`RUN`] frames spread evenly over it (about a fifth of a 5-second chunk).
pub fn sample_runs(frames: u64) -> Vec<Range<u64>> {
    if frames <= 3 * RUN {
        return std::iter::once(0..frames).collect();
    }
    let k = (frames / 40).clamp(2, 5);
    (0..k)
        .map(|i| {
            let centre = frames * (2 * i + 1) / (2 * k);
            let start = centre.saturating_sub(RUN / 2).min(frames - RUN);
            start..start + RUN
        })
        .collect()
}

/// An encoder's setting scale as the search walks it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    /// The lowest (best) and highest settings searched.
    pub lo: u8,
    pub hi: u8,
    /// The first probe.
    pub first: u8,
    /// Distance (`ln(100.5 − vmaf)`) per step assumed until two probes tell the content's own.
    pub slope: f64,
}

/// The setting scale of an encoder.
pub fn scale(encoder: &str) -> Scale {
    // x264/x265 near VMAF 93 lose about 1.2 points per CRF step (1.2 / 7 on the distance scale); SVT-AV1
    // and libaom, on a 0..63 scale, about half that.
    let (lo, hi, first, slope) = match plan::family(encoder) {
        Family::X26x if encoder == "libx265" => (8, 51, 26, 0.17),
        Family::X26x => (8, 51, 23, 0.17),
        Family::SvtAv1 => (10, 63, 35, 0.08),
        Family::Aom => (10, 63, 32, 0.08),
        // NVENC's constant-quality `cq`, QSV's ICQ `global_quality`, VA-API's `qp`: all 1..51, where 1
        // is best. Unverified on hardware here (no machine of this project has NVENC or QSV): see
        // `nvenc_cq`.
        Family::Nvenc | Family::Qsv | Family::Vaapi => (1, 51, 25, 0.17),
    };
    Scale {
        lo,
        hi,
        first,
        slope,
    }
}

/// The scale of `encoder` within a target's own bounds (`minCrf`/`maxCrf`, mapped to NVENC's cq there).
pub fn bounded(encoder: &str, goal: &tessera_crds::TargetQuality) -> Scale {
    let mut sc = scale(encoder);
    let map = |c: u8| {
        if plan::family(encoder) == Family::Nvenc {
            nvenc_cq(c)
        } else {
            c
        }
    };
    if let Some(m) = goal.min_crf {
        sc.lo = map(m);
    }
    if let Some(m) = goal.max_crf {
        sc.hi = map(m).max(sc.lo);
    }
    sc
}

/// Whether a chosen setting sits on a bound of the scale: the target may have been out of reach there (a
/// still picture above it even at the highest setting, a hard scene below it at the lowest).
pub fn at_bound(crf: u8, sc: &Scale) -> bool {
    crf <= sc.lo || crf >= sc.hi
}

/// NVENC's constant-quality setting for a CRF-scale value: NVENC's `cq` (with `rc=vbr` and no bitrate) is
/// a QP-like scale that lands about 2 steps higher in quality than x264's CRF at the same number (NVIDIA's
/// guidance: cq ≈ crf − 2 for similar quality), clamped to its 1..51. The search itself runs on the cq
/// scale, so this only maps a user's CRF bounds. Unverified on hardware.
pub fn nvenc_cq(crf: u8) -> u8 {
    crf.saturating_sub(2).clamp(1, 51)
}

/// One probe encode: the setting and the mean VMAF of the sample it gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    pub crf: u8,
    pub vmaf: f64,
}

/// The search works on the distance to a perfect score on a log scale, `ln(100.5 − vmaf)`, which is close
/// to linear in the CRF (VMAF falls slowly at low settings and fast at high ones); interpolating VMAF
/// itself overshoots on easy content.
fn distance(vmaf: f64) -> f64 {
    (100.5 - vmaf.min(100.0)).ln()
}

/// The highest setting whose probe reached the target, and the lowest whose probe fell short.
fn bracket(probes: &[Probe], target: f64) -> (Option<Probe>, Option<Probe>) {
    let above = probes
        .iter()
        .filter(|p| p.vmaf >= target)
        .max_by_key(|p| p.crf)
        .copied();
    let below = probes
        .iter()
        .filter(|p| p.vmaf < target)
        .min_by_key(|p| p.crf)
        .copied();
    (above, below)
}

/// The slope (distance per setting step, positive) from the two probes nearest the target, or the
/// default.
fn slope(probes: &[Probe], target: f64, default: f64) -> f64 {
    let mut v: Vec<&Probe> = probes.iter().collect();
    v.sort_by(|a, b| (a.vmaf - target).abs().total_cmp(&(b.vmaf - target).abs()));
    match v.as_slice() {
        [a, b, ..] if a.crf != b.crf => {
            let s = (distance(b.vmaf) - distance(a.vmaf)) / (f64::from(b.crf) - f64::from(a.crf));
            if s > 0.01 {
                s
            } else {
                default
            }
        }
        _ => default,
    }
}

/// Where the target lies on the setting scale, by the probes: interpolated between the bracketing
/// probes, or extrapolated with the slope from the nearest one.
fn crossing(probes: &[Probe], target: f64, default_slope: f64) -> Option<f64> {
    let goal = distance(target);
    match bracket(probes, target) {
        (Some(a), Some(b)) if b.crf > a.crf => {
            let (da, db) = (distance(a.vmaf), distance(b.vmaf));
            let t = (goal - da) / (db - da).max(1e-9);
            Some(f64::from(a.crf) + t * f64::from(b.crf - a.crf))
        }
        _ => {
            let near = probes
                .iter()
                .min_by(|a, b| (a.vmaf - target).abs().total_cmp(&(b.vmaf - target).abs()))?;
            Some(
                f64::from(near.crf)
                    + (goal - distance(near.vmaf)) / slope(probes, target, default_slope),
            )
        }
    }
}

/// The next setting to probe, or `None` when the search is done: a probe landed close enough, the
/// bracketing probes are one step apart, the bound is reached, or [`MAX_PROBES`] were made. While every
/// probe is on one side of the target the steps at least double (2, 4, 8), so a flat stretch of the curve
/// (a still picture stays near-perfect over many settings) is crossed within the budget.
pub fn next_probe(probes: &[Probe], target: f64, sc: &Scale) -> Option<u8> {
    if probes.is_empty() {
        return Some(sc.first.clamp(sc.lo, sc.hi));
    }
    if probes.len() >= MAX_PROBES
        || probes
            .iter()
            .any(|p| (p.vmaf - target).abs() <= CLOSE_ENOUGH)
    {
        return None;
    }
    let tried = |c: u8| probes.iter().any(|p| p.crf == c);
    let (above, below) = bracket(probes, target);
    let x = crossing(probes, target, sc.slope)?.round();
    let step = f64::from(1u8 << probes.len().min(4));
    let c = match (above, below) {
        (Some(a), Some(b)) => {
            if b.crf <= a.crf.saturating_add(1) {
                return None;
            }
            x.clamp(f64::from(a.crf + 1), f64::from(b.crf - 1))
        }
        // Every probe reached the target: look higher. None did: look lower.
        (Some(a), None) => x.max(f64::from(a.crf) + step).min(f64::from(sc.hi)),
        (None, Some(b)) => x.min(f64::from(b.crf) - step).max(f64::from(sc.lo)),
        (None, None) => return None,
    } as u8;
    (!tried(c)).then_some(c)
}

/// The setting to encode with: the crossing of the target rounded to the nearest step, within the
/// probed bracket and the bounds; when every probe reached the target, at most 2 steps past the highest
/// (an extrapolation is trusted only so far); when none did, the best probed or better.
pub fn choose(probes: &[Probe], target: f64, sc: &Scale) -> u8 {
    let (above, below) = bracket(probes, target);
    let Some(x) = crossing(probes, target, sc.slope) else {
        return sc.lo;
    };
    let c = x.round().clamp(f64::from(sc.lo), f64::from(sc.hi)) as u8;
    match (above, below) {
        (Some(a), Some(b)) => c.clamp(a.crf, b.crf),
        (Some(a), None) => c.clamp(a.crf, a.crf.saturating_add(2).min(sc.hi)),
        (None, Some(b)) => c.min(b.crf),
        (None, None) => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A content model: VMAF falls `slope` per step from `at0` at setting 0, clipped to 0..100.
    fn search(at0: f64, slope: f64, target: f64) -> (u8, Vec<Probe>) {
        let sc = scale("libx264");
        let mut probes = Vec::new();
        while let Some(c) = next_probe(&probes, target, &sc) {
            probes.push(Probe {
                crf: c,
                vmaf: (at0 - slope * f64::from(c)).clamp(0.0, 100.0),
            });
        }
        (choose(&probes, target, &sc), probes)
    }

    #[test]
    fn samples_cover_short_chunks_whole_and_long_ones_in_runs() {
        assert_eq!(sample_runs(20), vec![0..20]);
        let r = sample_runs(125);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| x.end <= 125 && x.end - x.start == RUN));
        assert!(r.windows(2).all(|w| w[0].end <= w[1].start));
        assert_eq!(sample_runs(1000).len(), 5);
        assert_eq!(sample_runs(50).len(), 2);
    }

    #[test]
    fn easy_content_gets_a_higher_setting_than_hard_content() {
        // Easy content loses 0.5 per step (93 at crf 34), hard content 1.5 (93 at crf 18).
        let (easy, pe) = search(110.0, 0.5, 93.0);
        let (hard, ph) = search(120.0, 1.5, 93.0);
        assert_eq!(easy, 34, "{pe:?}");
        assert_eq!(hard, 18, "{ph:?}");
        assert!(pe.len() <= MAX_PROBES && ph.len() <= MAX_PROBES);
    }

    #[test]
    fn content_linear_in_vmaf_is_found_within_the_probe_budget() {
        for (at0, slope) in [(120.0, 1.2), (116.0, 1.0), (118.0, 1.4)] {
            let (c, p) = search(at0, slope, 93.0);
            let v = at0 - slope * f64::from(c);
            // Within half a step below (interpolated) or one step above (a probe showed the next one short).
            assert!(
                v >= 93.0 - slope / 2.0 - 1e-9 && v < 93.0 + slope,
                "crf {c} gives {v}: {p:?}"
            );
            assert!(p.len() <= MAX_PROBES, "{p:?}");
        }
    }

    #[test]
    fn bounds_hold_when_the_target_is_out_of_reach() {
        // Never reaches 93: the best allowed setting.
        let (c, _) = search(90.0, 1.0, 93.0);
        assert_eq!(c, 8);
        // Always above: the highest allowed, never extrapolated beyond what was measured by much.
        let sc = Scale {
            lo: 10,
            hi: 30,
            ..scale("libx264")
        };
        let mut probes = Vec::new();
        while let Some(c) = next_probe(&probes, 50.0, &sc) {
            probes.push(Probe {
                crf: c,
                vmaf: 99.0 - 0.1 * f64::from(c),
            });
        }
        assert_eq!(choose(&probes, 50.0, &sc), 30);
    }

    #[test]
    fn adjacent_probes_end_the_search_at_the_nearer_one() {
        let probes = [
            Probe {
                crf: 23,
                vmaf: 93.4,
            },
            Probe {
                crf: 24,
                vmaf: 92.0,
            },
        ];
        let sc = scale("libx264");
        assert_eq!(next_probe(&probes, 93.0, &sc), None);
        assert_eq!(choose(&probes, 93.0, &sc), 23);
        let probes = [
            Probe {
                crf: 23,
                vmaf: 94.0,
            },
            Probe {
                crf: 24,
                vmaf: 92.9,
            },
        ];
        assert_eq!(choose(&probes, 93.0, &sc), 24);
    }

    #[test]
    fn easy_content_that_saturates_is_not_overshot() {
        // VMAF as static slides give it: 100 − 7·e^{0.12·(crf − 31)}, so 93 at crf 31.
        let model = |c: u8| 100.0 - 7.0 * (0.12 * (f64::from(c) - 31.0)).exp();
        let sc = scale("libx264");
        let mut probes = Vec::new();
        while let Some(c) = next_probe(&probes, 93.0, &sc) {
            probes.push(Probe {
                crf: c,
                vmaf: model(c),
            });
        }
        assert_eq!(choose(&probes, 93.0, &sc), 31, "{probes:?}");
    }

    #[test]
    fn a_flat_stretch_is_crossed_within_the_budget() {
        // SVT-AV1 on a still picture: near-perfect until crf 50, then falling (94 at crf 56).
        let model = |c: u8| {
            if c <= 50 {
                97.2 - 0.02 * f64::from(c)
            } else {
                96.2 - 0.37 * f64::from(c - 50)
            }
        };
        let sc = scale("libsvtav1");
        let mut probes = Vec::new();
        while let Some(c) = next_probe(&probes, 94.0, &sc) {
            probes.push(Probe {
                crf: c,
                vmaf: model(c),
            });
        }
        let c = choose(&probes, 94.0, &sc);
        assert!((54..=58).contains(&c), "{c}: {probes:?}");
    }

    #[test]
    fn a_targets_bounds_narrow_the_scale_and_mark_settings_on_them() {
        let goal = tessera_crds::TargetQuality {
            vmaf: 93.0,
            min_crf: Some(18),
            max_crf: Some(30),
        };
        let sc = bounded("libx264", &goal);
        assert_eq!((sc.lo, sc.hi), (18, 30));
        assert!(at_bound(30, &sc) && at_bound(18, &sc) && !at_bound(24, &sc));
        // NVENC's cq is about 2 below x264's CRF for the same quality.
        let n = bounded("h264_nvenc", &goal);
        assert_eq!((n.lo, n.hi), (16, 28));
        let open = tessera_crds::TargetQuality {
            vmaf: 93.0,
            min_crf: None,
            max_crf: None,
        };
        assert_eq!(bounded("libsvtav1", &open).hi, 63);
    }

    #[test]
    fn nvenc_cq_maps_a_crf_bound_into_its_range() {
        assert_eq!(nvenc_cq(23), 21);
        assert_eq!(nvenc_cq(0), 1);
        assert_eq!(nvenc_cq(63), 51);
    }
}
