//! When to write a job's status. Chunk completions arrive many times a second on a large job; each one is
//! not a status write. A change of phase or condition is written at once; progress alone at most once per
//! interval, carrying everything that happened since. Pure: the reconciler asks, and schedules a requeue for
//! the delay it is given.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    pub interval: Duration,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
        }
    }
}

/// What to do with a pending status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    WriteNow,
    /// Write after this delay (the reconciler requeues itself); nothing is lost meanwhile: the next write
    /// carries the newest state.
    Later(Duration),
    Nothing,
}

impl Throttle {
    /// `since_last_write`: time since the last status write (`None`: never written).
    pub fn decide(
        &self,
        changed: bool,
        phase_changed: bool,
        since_last_write: Option<Duration>,
    ) -> Decision {
        if phase_changed {
            return Decision::WriteNow;
        }
        if !changed {
            return Decision::Nothing;
        }
        match since_last_write {
            None => Decision::WriteNow,
            Some(t) if t >= self.interval => Decision::WriteNow,
            Some(t) => Decision::Later(self.interval - t),
        }
    }
}

/// Seconds left, from the rate so far (`None` until there is a rate).
pub fn eta_seconds(done: u64, total: u64, elapsed: Duration) -> Option<u64> {
    if done == 0 || total <= done || elapsed.is_zero() {
        return (total > 0 && done >= total).then_some(0);
    }
    let per = elapsed.as_secs_f64() / done as f64;
    Some((per * (total - done) as f64).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_changes_are_written_at_once_progress_at_most_once_a_second() {
        let t = Throttle::default();
        assert_eq!(
            t.decide(true, true, Some(Duration::from_millis(10))),
            Decision::WriteNow
        );
        assert_eq!(t.decide(true, false, None), Decision::WriteNow);
        assert_eq!(
            t.decide(true, false, Some(Duration::from_millis(300))),
            Decision::Later(Duration::from_millis(700))
        );
        assert_eq!(
            t.decide(false, false, Some(Duration::from_millis(300))),
            Decision::Nothing
        );
    }

    #[test]
    fn writes_per_second_do_not_grow_with_chunk_count() {
        // Simulate 100 and 1,000 chunk completions spread over 10 s: a write happens only when the throttle
        // says so, and a scheduled write absorbs every completion before it.
        let t = Throttle::default();
        for chunks in [100u64, 1_000] {
            let mut writes = 0u64;
            let mut last: Option<u64> = None; // ms of the last write
            let mut pending_until: Option<u64> = None;
            for i in 0..chunks {
                let now = i * 10_000 / chunks;
                if let Some(due) = pending_until {
                    if now >= due {
                        writes += 1;
                        last = Some(due);
                        pending_until = None;
                    }
                }
                let since = last.map(|l| Duration::from_millis(now - l));
                match t.decide(true, false, since) {
                    Decision::WriteNow => {
                        writes += 1;
                        last = Some(now);
                    }
                    Decision::Later(d) => {
                        pending_until.get_or_insert(now + d.as_millis() as u64);
                    }
                    Decision::Nothing => {}
                }
            }
            assert!(
                writes <= 11,
                "{chunks} chunks caused {writes} writes in 10 s"
            );
        }
    }

    #[test]
    fn eta() {
        assert_eq!(eta_seconds(0, 10, Duration::from_secs(5)), None);
        assert_eq!(eta_seconds(5, 10, Duration::from_secs(10)), Some(10));
        assert_eq!(eta_seconds(10, 10, Duration::from_secs(10)), Some(0));
        assert_eq!(eta_seconds(1, 3, Duration::from_millis(1500)), Some(3));
    }
}
