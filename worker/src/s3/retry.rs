//! Which failures are worth retrying, and how long to wait before the next attempt.

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_types::error::display::DisplayErrorContext;

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

/// Classify what the SDK returned. Throttling, 5xx, timeouts and dropped connections are retried; the
/// caller's own mistakes (404, 403, 412, 400) are not.
pub fn classify<E>(err: &SdkError<E, HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let detail = DisplayErrorContext(err).to_string();
    match err {
        SdkError::TimeoutError(_) => Failure::transient(format!("timed out: {detail}")),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => Failure::transient(detail),
        SdkError::ConstructionFailure(_) => Failure::fatal(StorageKind::Config, detail),
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = se.err().code().unwrap_or("");
            classify_status(status, code, se.err().message().unwrap_or(""))
        }
        _ => Failure::transient(detail),
    }
}

/// The pure part of [`classify`], by status code and S3 error code.
pub fn classify_status(status: u16, code: &str, message: &str) -> Failure {
    let what = match (code, message) {
        ("", "") => format!("HTTP {status}"),
        (c, "") => format!("{c} (HTTP {status})"),
        ("", m) => format!("HTTP {status}: {m}"),
        (c, m) => format!("{c} (HTTP {status}): {m}"),
    };
    match (status, code) {
        (
            _,
            "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout" | "InternalError",
        )
        | (429 | 500..=599, _) => Failure::transient(what),
        (_, "NoSuchBucket") => Failure::fatal(StorageKind::NoSuchBucket, what),
        (404, _) | (_, "NoSuchKey") => Failure::fatal(StorageKind::NotFound, what),
        (412, _) | (_, "PreconditionFailed") => Failure::fatal(StorageKind::Changed, what),
        (_, "RequestTimeTooSkewed" | "RequestExpired") => Failure::fatal(
            StorageKind::ClockSkew,
            format!("{what}: this machine's clock is off from the storage server's; sync it (NTP)"),
        ),
        (401 | 403, _)
        | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken") => {
            Failure::fatal(StorageKind::AccessDenied, what)
        }
        _ => Failure::fatal(StorageKind::Other, what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_is_named_not_taken_for_bad_credentials() {
        let f = classify_status(
            403,
            "RequestTimeTooSkewed",
            "request time is too far from server time",
        );
        assert_eq!(f.kind, StorageKind::ClockSkew);
        assert!(f.detail.contains("clock"), "{}", f.detail);
    }

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

    #[test]
    fn status_classes() {
        assert!(classify_status(503, "SlowDown", "").retryable);
        assert!(classify_status(500, "", "").retryable);
        assert!(classify_status(400, "RequestTimeout", "").retryable);
        assert!(classify_status(429, "", "").retryable);
        let f = classify_status(404, "NoSuchKey", "The key does not exist");
        assert_eq!((f.kind, f.retryable), (StorageKind::NotFound, false));
        assert_eq!(f.detail, "NoSuchKey (HTTP 404): The key does not exist");
        assert_eq!(
            classify_status(404, "NoSuchBucket", "").kind,
            StorageKind::NoSuchBucket
        );
        assert_eq!(classify_status(412, "", "").kind, StorageKind::Changed);
        assert_eq!(
            classify_status(403, "InvalidAccessKeyId", "").kind,
            StorageKind::AccessDenied
        );
        assert!(!classify_status(400, "InvalidArgument", "").retryable);
    }
}
