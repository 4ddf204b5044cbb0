//! Which failures are worth retrying, and how long to wait before the next attempt.

use std::time::Duration;

use crate::error::StorageKind;

/// Exponential backoff with full jitter (the AWS architecture blog's recommendation): the n-th retry waits a
/// uniformly random time in [0, min(cap, base * 2^n)], so clients that failed together do not retry together.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(8),
        }
    }
}

impl Backoff {
    /// `unit` is a uniform random number in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cap);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// One failed attempt, classified.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: StorageKind,
    pub retryable: bool,
    pub detail: String,
}

impl Failure {
    pub fn transient(detail: impl Into<String>) -> Self {
        Self {
            kind: StorageKind::Unavailable,
            retryable: true,
            detail: detail.into(),
        }
    }

    pub fn fatal(kind: StorageKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            retryable: false,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff::default();
        let d = b.delay(0, 0.999_999);
        assert!(
            d < Duration::from_millis(100) && d > Duration::from_millis(99),
            "{d:?}"
        );
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(400));
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(8));
        assert_eq!(b.delay(60, 1.0), Duration::from_secs(8));
        assert_eq!(b.delay(5, 0.0), Duration::ZERO);
    }
}
