//! A circuit breaker per endpoint: after `threshold` consecutive failures it opens and requests fail fast
//! (without touching the network) until `open_for` has passed; then one probe request is let through
//! (half-open). A successful probe closes it; a failed one opens it again for twice as long (capped).
//!
//! The state machine is pure (time is passed in) so it is unit-tested without sleeping.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub threshold: u32,
    pub open_for: Duration,
    pub max_open_for: Duration,
    /// A half-open probe that has not reported back after this long no longer blocks a new probe
    /// (its task may have been cancelled).
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 5,
            open_for: Duration::from_secs(2),
            max_open_for: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        open_for: Duration,
    },
    HalfOpen {
        probe_since: Instant,
        open_for: Duration,
    },
}

/// What a transition means to the outside world (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    Opened { open_for: Duration },
    HalfOpened,
    Closed,
}

#[derive(Debug)]
pub struct Breaker {
    pub cfg: BreakerConfig,
    pub state: State,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: State::Closed { failures: 0 },
        }
    }

    /// May a request go out now? `Err(wait)`: not before `wait` has passed.
    pub fn admit(&mut self, now: Instant) -> (Result<(), Duration>, Option<Event>) {
        match self.state {
            State::Closed { .. } => (Ok(()), None),
            State::Open { until, open_for } if now >= until => {
                self.state = State::HalfOpen {
                    probe_since: now,
                    open_for,
                };
                (Ok(()), Some(Event::HalfOpened))
            }
            State::Open { until, .. } => (Err(until - now), None),
            State::HalfOpen {
                probe_since,
                open_for,
            } if now.duration_since(probe_since) >= self.cfg.probe_timeout => {
                self.state = State::HalfOpen {
                    probe_since: now,
                    open_for,
                };
                (Ok(()), None)
            }
            // One probe at a time; the others wait for its verdict.
            State::HalfOpen { .. } => (Err(Duration::from_millis(200)), None),
        }
    }

    pub fn success(&mut self) -> Option<Event> {
        let was_closed = matches!(self.state, State::Closed { .. });
        self.state = State::Closed { failures: 0 };
        (!was_closed).then_some(Event::Closed)
    }

    pub fn failure(&mut self, now: Instant) -> Option<Event> {
        match self.state {
            State::Closed { failures } if failures + 1 >= self.cfg.threshold => {
                let open_for = self.cfg.open_for;
                self.state = State::Open {
                    until: now + open_for,
                    open_for,
                };
                Some(Event::Opened { open_for })
            }
            State::Closed { failures } => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::HalfOpen { open_for, .. } => {
                let open_for = (open_for * 2).min(self.cfg.max_open_for);
                self.state = State::Open {
                    until: now + open_for,
                    open_for,
                };
                Some(Event::Opened { open_for })
            }
            // Late failures of requests admitted before it opened change nothing.
            State::Open { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            threshold: 3,
            open_for: Duration::from_secs(2),
            max_open_for: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn opens_after_threshold_and_fails_fast() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        assert_eq!(b.failure(t0), None);
        assert_eq!(b.failure(t0), None);
        assert!(b.admit(t0).0.is_ok());
        assert_eq!(
            b.failure(t0),
            Some(Event::Opened {
                open_for: Duration::from_secs(2)
            })
        );
        let (r, _) = b.admit(t0 + Duration::from_millis(500));
        assert_eq!(r, Err(Duration::from_millis(1500)));
    }

    #[test]
    fn success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        b.failure(t0);
        b.failure(t0);
        assert_eq!(b.success(), None);
        b.failure(t0);
        b.failure(t0);
        assert!(matches!(b.state, State::Closed { failures: 2 }));
    }

    #[test]
    fn half_open_probe_closes_or_reopens_longer() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.failure(t0);
        }
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(b.admit(t1), (Ok(()), Some(Event::HalfOpened)));
        // A second request waits for the probe.
        assert!(b.admit(t1).0.is_err());
        // The probe fails: open again, twice as long.
        assert_eq!(
            b.failure(t1),
            Some(Event::Opened {
                open_for: Duration::from_secs(4)
            })
        );
        let t2 = t1 + Duration::from_secs(4);
        assert_eq!(b.admit(t2).1, Some(Event::HalfOpened));
        // Fails again: capped at max_open_for.
        assert_eq!(
            b.failure(t2),
            Some(Event::Opened {
                open_for: Duration::from_secs(5)
            })
        );
        let t3 = t2 + Duration::from_secs(5);
        assert!(b.admit(t3).0.is_ok());
        assert_eq!(b.success(), Some(Event::Closed));
        assert!(b.admit(t3).0.is_ok());
    }

    #[test]
    fn a_lost_probe_does_not_block_forever() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.failure(t0);
        }
        let t1 = t0 + Duration::from_secs(2);
        assert!(b.admit(t1).0.is_ok());
        assert!(b.admit(t1 + Duration::from_secs(9)).0.is_err());
        assert!(b.admit(t1 + Duration::from_secs(10)).0.is_ok());
    }
}
