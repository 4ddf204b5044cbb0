//! Fuzz entry points: the `fuzz/` targets (`make fuzz`, cargo fuzz) and the corpus replay test in `make test`
//! call these, so a crash the fuzzer found stays fixed.

use std::io::Write;

use crate::plan::plan_boundaries;
use crate::probe::{probe, Keyframe};

/// Untrusted bytes as an input file: probing must end in `Ok` or an error, never a panic or a crash; what
/// it finds must plan into ordered chunks.
pub fn probe_and_plan(data: &[u8]) {
    let Ok(mut f) = tempfile::NamedTempFile::new() else {
        return;
    };
    if f.write_all(data).and_then(|()| f.flush()).is_err() {
        return;
    }
    if let Ok(info) = probe(f.path()) {
        check_plan(&info.keyframes, info.duration);
    }
}

/// Bytes as keyframe times, a duration and a target: the planner's invariants for any of them.
pub fn plan(data: &[u8]) {
    let mut it = data
        .chunks_exact(2)
        .map(|c| f64::from(u16::from_le_bytes([c[0], c[1]])) / 100.0);
    let duration = it.next().unwrap_or(0.0);
    let mut t = 0.0;
    let keyframes: Vec<Keyframe> = it
        .map(|d| {
            let k = Keyframe {
                seek_ts: (t * 1000.0) as i64,
                pts: None,
                time: t,
            };
            t += d;
            k
        })
        .collect();
    check_plan(&keyframes, duration);
}

fn check_plan(keyframes: &[Keyframe], duration: f64) {
    for target in [0.5, 2.0, 6.0, 60.0] {
        let starts = plan_boundaries(keyframes, duration, target);
        assert_eq!(
            starts.first(),
            Some(&0),
            "the first chunk starts at the beginning"
        );
        assert!(
            starts.windows(2).all(|w| w[0] < w[1]),
            "chunk starts strictly increase: {starts:?}"
        );
        assert!(
            starts.iter().all(|&i| i < keyframes.len().max(1)),
            "chunk starts are keyframes"
        );
    }
}
