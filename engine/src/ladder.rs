//! Per-title ladders, the pure part: which sizes and settings the plan measures, the rate-quality hull of
//! the points it measured, and the rungs chosen on it. The measuring (sample encodes scored with VMAF at
//! the top size) is `chunk::ladder_sample` and `chunk::ladder_point`; `job::prepare` runs both.
//!
//! The choice, in short: the top rung is the cheapest undominated point whose VMAF reaches the target;
//! each rung below is the best undominated point at no more than [`RUNG_SPACING`] of the rate above, down
//! to [`LOWEST_VMAF`] or `maxRungs`. Every rung is a measured encode on the rate-quality frontier (no
//! other point scores as high for as little). The convex hull of the points is marked too: a rung may lie
//! just under it, between two hull points of other sizes, when it is still the best encode measured
//! within its rate (choosing only hull vertices would give a worse picture for the same budget there).

use tessera_crds::ladder::{rung_name, LOWEST_VMAF, RUNG_SPACING};
use tessera_crds::{LadderPoint, LadderRung};

use crate::target::Scale;

/// The sizes a ladder may use below its top (the top itself is always measured).
pub const STANDARD_HEIGHTS: &[u32] = &[2160, 1440, 1080, 720, 540, 360, 240];
/// Sizes measured at most, the top included.
pub const MAX_SIZES: usize = 5;
/// Settings measured per size (before the top rung's refinement).
pub const SETTINGS: usize = 5;
/// Sample chunks at most, spread over the input.
pub const SAMPLE_CHUNKS: usize = 3;

/// The ladder's top height: `maxHeight` where given, never above the source (a ladder does not upscale).
pub fn top_height(source: u32, max_height: Option<u32>) -> u32 {
    max_height.unwrap_or(source).min(source).max(16)
}

/// The heights to measure: the top, then the standard sizes below it down to `min_height`, thinned
/// evenly (keeping the lowest) to [`MAX_SIZES`].
pub fn candidate_heights(top: u32, min_height: u32) -> Vec<u32> {
    let below: Vec<u32> = STANDARD_HEIGHTS
        .iter()
        .copied()
        .filter(|&h| h < top && h >= min_height)
        .collect();
    let keep = MAX_SIZES - 1;
    let mut out = vec![top];
    if below.len() <= keep {
        out.extend(below);
    } else {
        let n = below.len() - 1;
        out.extend((0..keep).map(|i| below[(i * n).div_ceil(keep - 1)]));
        out.dedup();
    }
    out
}

/// The settings to measure on the encoder's scale: [`SETTINGS`] values a fixed quality distance apart
/// (about 5 CRF steps of x264), starting a little below the scale's usual first probe, within its bounds.
pub fn settings(sc: &Scale) -> Vec<u8> {
    let step = (0.85 / sc.slope).round().max(1.0) as i32;
    let start = i32::from(sc.first) - (step * 7) / 5;
    let mut out: Vec<u8> = (0..SETTINGS as i32)
        .map(|i| (start + i * step).clamp(i32::from(sc.lo), i32::from(sc.hi)) as u8)
        .collect();
    out.dedup();
    out
}

/// The chunks to sample (positions in the plan): all of them when there are few, else [`SAMPLE_CHUNKS`]
/// at the centres of equal thirds of the input.
pub fn sample_chunks(count: usize) -> Vec<usize> {
    if count <= SAMPLE_CHUNKS {
        return (0..count).collect();
    }
    (0..SAMPLE_CHUNKS)
        .map(|i| (count * (2 * i + 1)) / (2 * SAMPLE_CHUNKS))
        .collect()
}

/// The frames of a chunk of `frames` frames that a ladder samples: two runs of [`crate::target::RUN`], at a
/// quarter and three quarters of it, or the whole chunk when it is short.
pub fn sample_runs(frames: u64) -> Vec<std::ops::Range<u64>> {
    let run = crate::target::RUN;
    if frames <= 3 * run {
        return std::iter::once(0..frames).collect();
    }
    [frames / 4, frames * 3 / 4]
        .into_iter()
        .map(|c| {
            let s = c.saturating_sub(run / 2).min(frames - run);
            s..s + run
        })
        .collect()
}

/// Whether `a` dominates `b`: no more rate for at least the quality, and better in one of them.
pub fn dominates(a: &LadderPoint, b: &LadderPoint) -> bool {
    a.kbps <= b.kbps && a.vmaf >= b.vmaf && (a.kbps < b.kbps || a.vmaf > b.vmaf)
}

/// Mark the dominated points, and those on the hull: the upper convex hull, in (ln rate, VMAF), of the
/// undominated ones. A point under the hull is beaten by a mix of its neighbours on it.
pub fn mark_hull(points: &mut [LadderPoint]) {
    for i in 0..points.len() {
        let p = points[i];
        points[i].dominated = points.iter().any(|q| dominates(q, &p));
    }
    let mut order: Vec<usize> = (0..points.len())
        .filter(|&i| !points[i].dominated)
        .collect();
    order.sort_by(|&a, &b| points[a].kbps.total_cmp(&points[b].kbps));
    // Equal points (same rate and score at two settings): keep one.
    order.dedup_by(|a, b| points[*a].kbps == points[*b].kbps && points[*a].vmaf == points[*b].vmaf);
    let xy = |i: usize| (points[i].kbps.max(1e-6).ln(), points[i].vmaf);
    let mut hull: Vec<usize> = Vec::new();
    for i in order {
        while hull.len() >= 2 {
            let (o, a, b) = (xy(hull[hull.len() - 2]), xy(hull[hull.len() - 1]), xy(i));
            let cross = (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
            if cross >= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(i);
    }
    for (i, p) in points.iter_mut().enumerate() {
        p.on_hull = hull.contains(&i);
    }
}

/// The point a ladder topped at `target` VMAF starts from: the cheapest undominated one reaching it, or,
/// where none does, the best there is.
pub fn top_point(points: &[LadderPoint], target: f64) -> Option<LadderPoint> {
    let mut hull: Vec<&LadderPoint> = points.iter().filter(|p| !p.dominated).collect();
    hull.sort_by(|a, b| a.kbps.total_cmp(&b.kbps));
    hull.iter()
        .find(|p| p.vmaf >= target)
        .or(hull.last())
        .map(|p| **p)
}

/// The rungs, top first, and what was left out and why. `points` are marked ([`mark_hull`]); `taken` are
/// the names the job's listed renditions use.
pub fn choose(
    points: &[LadderPoint],
    target: f64,
    max_rungs: usize,
    taken: &[String],
) -> (Vec<LadderRung>, Vec<String>) {
    let mut hull: Vec<LadderPoint> = points.iter().filter(|p| !p.dominated).copied().collect();
    hull.sort_by(|a, b| a.kbps.total_cmp(&b.kbps));
    let mut notes = Vec::new();
    let Some(top) = top_point(points, target) else {
        return (Vec::new(), vec!["no point was measured".into()]);
    };
    let mut names: Vec<String> = taken.to_vec();
    let rung = |p: &LadderPoint, why: String, names: &mut Vec<String>| {
        let name = rung_name(p.height, names);
        names.push(name.clone());
        LadderRung {
            name,
            width: p.width,
            height: p.height,
            crf: p.crf,
            kbps: p.kbps,
            vmaf: p.vmaf,
            why,
        }
    };
    let why_top = if top.vmaf >= target {
        format!(
            "the cheapest undominated point reaching VMAF {target}: {}p at crf {} ({:.0} kb/s, VMAF {:.1}){}",
            top.height,
            top.crf,
            top.kbps,
            top.vmaf,
            rivals(points, &top, top.kbps, Some(target))
        )
    } else {
        notes.push(format!(
            "VMAF {target} is out of reach: the best measured point scores {:.1} ({}p at crf {}); lower \
             minCrf or raise maxHeight to reach it",
            top.vmaf, top.height, top.crf
        ));
        format!(
            "the best point measured, below the target of {target}: {}p at crf {} ({:.0} kb/s, VMAF {:.1})",
            top.height, top.crf, top.kbps, top.vmaf
        )
    };
    let mut rungs = vec![rung(&top, why_top, &mut names)];
    let mut above = top;
    loop {
        let limit = above.kbps * RUNG_SPACING;
        let Some(p) = hull.iter().rev().find(|p| p.kbps <= limit).copied() else {
            notes.push(format!(
                "no rung below {:.0} kb/s: no measured point costs {:.0} % of it or less",
                above.kbps,
                RUNG_SPACING * 100.0
            ));
            break;
        };
        if p.vmaf < LOWEST_VMAF {
            notes.push(format!(
                "no rung below {:.0} kb/s: the best point at {:.0} kb/s or less scores VMAF {:.1}, under {LOWEST_VMAF}",
                above.kbps, limit, p.vmaf
            ));
            break;
        }
        if rungs.len() >= max_rungs {
            notes.push(format!(
                "the ladder stops at maxRungs ({max_rungs}); measured points go on down to {:.0} kb/s",
                hull.first().map_or(0.0, |h| h.kbps)
            ));
            break;
        }
        let why = format!(
            "the best point at no more than {:.0} % of the rate above ({limit:.0} kb/s): {}p at crf {} (VMAF {:.1}){}",
            RUNG_SPACING * 100.0,
            p.height,
            p.crf,
            p.vmaf,
            rivals(points, &p, limit, None)
        );
        rungs.push(rung(&p, why, &mut names));
        above = p;
    }
    let mut heights: Vec<u32> = points.iter().map(|p| p.height).collect();
    heights.sort_unstable_by(|a, b| b.cmp(a));
    heights.dedup();
    for h in heights {
        if !points.iter().any(|p| p.height == h && !p.dominated) {
            notes.push(format!(
                "{h}p is left out: at each of its measured rates another size scores higher for less"
            ));
        }
    }
    (rungs, notes)
}

/// ", beating <h>p (VMAF v)": the best point of each other size within `limit` kb/s (reaching `floor`,
/// when given, the cheapest that does).
fn rivals(points: &[LadderPoint], chosen: &LadderPoint, limit: f64, floor: Option<f64>) -> String {
    let mut heights: Vec<u32> = points
        .iter()
        .map(|p| p.height)
        .filter(|&h| h != chosen.height)
        .collect();
    heights.sort_unstable_by(|a, b| b.cmp(a));
    heights.dedup();
    let mut said = Vec::new();
    for h in heights {
        let at: Vec<&LadderPoint> = points.iter().filter(|p| p.height == h).collect();
        let line = match floor {
            Some(t) => at
                .iter()
                .filter(|p| p.vmaf >= t)
                .min_by(|a, b| a.kbps.total_cmp(&b.kbps))
                .map(|p| format!("{h}p needs {:.0} kb/s", p.kbps))
                .unwrap_or_else(|| format!("{h}p never reaches it")),
            None => at
                .iter()
                .filter(|p| p.kbps <= limit)
                .max_by(|a, b| a.vmaf.total_cmp(&b.vmaf))
                .map(|p| format!("{h}p scores {:.1}", p.vmaf))
                .unwrap_or_else(|| format!("{h}p has no point this cheap")),
        };
        said.push(line);
    }
    if said.is_empty() {
        String::new()
    } else {
        format!("; {}", said.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(height: u32, crf: u8, kbps: f64, vmaf: f64) -> LadderPoint {
        LadderPoint {
            width: height * 16 / 9,
            height,
            crf,
            kbps,
            vmaf,
            dominated: false,
            on_hull: false,
        }
    }

    /// A content model: each setting step costs 40 % of the rate and, on harder content, more VMAF;
    /// smaller sizes cost less and top out lower (the crossing curves of a ladder).
    fn curves(hardness: f64) -> Vec<LadderPoint> {
        let mut out = Vec::new();
        for (h, ceiling) in [
            (1080u32, 99.0),
            (720, 94.0),
            (540, 88.0),
            (360, 78.0),
            (240, 64.0),
        ] {
            for (i, crf) in [16u8, 21, 26, 31, 36].into_iter().enumerate() {
                let pixels = f64::from(h * h * 16 / 9);
                let kbps = hardness * pixels / 1000.0 * 0.6f64.powi(i as i32);
                let v = ceiling - (4.0 + 2.0 * hardness) * i as f64;
                out.push(pt(h, crf, kbps, v));
            }
        }
        out
    }

    #[test]
    fn candidate_sizes_start_at_the_top_and_thin_evenly() {
        assert_eq!(candidate_heights(1080, 240), [1080, 720, 540, 360, 240]);
        assert_eq!(candidate_heights(2160, 240), [2160, 1440, 720, 360, 240]);
        assert_eq!(candidate_heights(720, 360), [720, 540, 360]);
        assert_eq!(candidate_heights(404, 240), [404, 360, 240]);
        assert_eq!(candidate_heights(200, 240), [200]);
        assert_eq!(top_height(1080, Some(720)), 720);
        assert_eq!(top_height(480, Some(1080)), 480, "never above the source");
    }

    #[test]
    fn settings_span_the_scale_within_bounds() {
        assert_eq!(
            settings(&crate::target::scale("libx264")),
            [16, 21, 26, 31, 36]
        );
        let av1 = settings(&crate::target::scale("libsvtav1"));
        assert_eq!(av1.len(), 5);
        assert!(av1.windows(2).all(|w| w[0] < w[1]) && *av1.last().unwrap() <= 63);
        let mut sc = crate::target::scale("libx264");
        sc.hi = 24;
        assert_eq!(settings(&sc), [16, 21, 24]);
    }

    #[test]
    fn sampling_spreads_over_the_input() {
        assert_eq!(sample_chunks(2), [0, 1]);
        assert_eq!(sample_chunks(12), [2, 6, 10]);
        assert_eq!(sample_runs(20), std::iter::once(0..20).collect::<Vec<_>>());
        assert_eq!(sample_runs(60), [11..19, 41..49]);
    }

    #[test]
    fn the_hull_keeps_only_undominated_convex_points() {
        let mut p = vec![
            pt(720, 20, 1000.0, 90.0),
            pt(720, 25, 500.0, 80.0),
            pt(540, 20, 600.0, 78.0), // dominated by 720p at 500
            pt(540, 25, 300.0, 70.0),
            pt(360, 25, 420.0, 71.0), // undominated, but under the line from 300 to 500
        ];
        mark_hull(&mut p);
        let on: Vec<bool> = p.iter().map(|p| p.on_hull).collect();
        assert_eq!(on, [true, true, false, true, false]);
        let dominated: Vec<bool> = p.iter().map(|p| p.dominated).collect();
        assert_eq!(dominated, [false, false, true, false, false]);
    }

    #[test]
    fn rungs_are_undominated_spaced_and_differ_with_complexity() {
        let ladder = |hardness: f64| {
            let mut p = curves(hardness);
            mark_hull(&mut p);
            let (rungs, notes) = choose(&p, 93.0, 5, &[]);
            for r in &rungs {
                let at = p
                    .iter()
                    .find(|q| q.height == r.height && q.crf == r.crf)
                    .unwrap();
                assert!(!at.dominated, "{r:?} marked dominated");
                assert!(!p.iter().any(|q| dominates(q, at)), "{r:?} dominated");
            }
            for w in rungs.windows(2) {
                assert!(w[1].kbps <= w[0].kbps * RUNG_SPACING + 1e-9, "{w:?}");
                assert!(w[1].vmaf < w[0].vmaf);
            }
            assert!(rungs[0].vmaf >= 93.0, "{rungs:?}");
            assert!(rungs.iter().all(|r| r.vmaf >= LOWEST_VMAF));
            assert!(!notes.is_empty(), "the ladder says where it stopped");
            rungs
        };
        let easy = ladder(0.2);
        let hard = ladder(3.0);
        assert!(hard[0].kbps > 5.0 * easy[0].kbps, "{easy:?} {hard:?}");
        let names: Vec<&str> = easy.iter().map(|r| r.name.as_str()).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names, unique);
    }

    #[test]
    fn an_unreachable_target_takes_the_best_point_and_says_so() {
        let mut p = vec![pt(480, 20, 800.0, 80.0), pt(480, 30, 300.0, 60.0)];
        mark_hull(&mut p);
        let (rungs, notes) = choose(&p, 95.0, 3, &["480p".into()]);
        assert_eq!(rungs[0].name, "480p-2");
        assert_eq!(rungs[0].crf, 20);
        assert!(
            notes.iter().any(|n| n.contains("out of reach")),
            "{notes:?}"
        );
    }
}
