//! What a failed S3 request means, in plain words, and whether trying again can help.
//!
//! ```text
//!  SdkError ──┬─ ServiceError (the store answered) ── status, S3 code, message, x-amz-bucket-region
//!             │                                        └─> classify_reply()      (pure, table-tested)
//!             ├─ DispatchFailure / ResponseError ── the error's source chain, as text and as types:
//!             │     CredentialsError (the SDK's credential chain)  ─> no / unusable credentials
//!             │     "dns error", "connection refused", TLS words   ─> classify_transport() (pure)
//!             ├─ TimeoutError                                      ─> transient
//!             └─ ConstructionFailure                               ─> configuration
//! ```
//!
//! The SDK's own retries are off (`RetryConfig::disabled`): its verdict on a failure reaches us whole, and this
//! module is the one place that decides. Permanent failures (credentials, access, region, missing bucket or
//! key, an endpoint name that does not resolve, TLS) are answered on their first occurrence; transient ones
//! (timeouts, resets, 5xx, throttling) are retried by the caller's `Retrier`. Every `detail` is a sentence a
//! user can act on: the cause and what to do, then the store's own code in parentheses. No `Debug` output of
//! an error struct ever reaches it.

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use super::retry::Failure;
use crate::error::StorageKind;

/// What the message needs to say about where requests go.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The endpoint requests go to (`http://127.0.0.1:9000`, `s3.us-east-1.amazonaws.com`).
    pub endpoint: &'a str,
    /// The region requests are signed for.
    pub region: &'a str,
    /// Whether the user named the endpoint (`AWS_ENDPOINT_URL`) or it is AWS's default for the region.
    pub custom_endpoint: bool,
    /// The bucket and key of the request, for hints.
    pub bucket: &'a str,
    pub key: &'a str,
    /// A worker pod, whose S3 settings come from its WorkerPool's `spec.s3`: fixes name the pool's fields.
    pub pool: bool,
}

impl Ctx<'_> {
    fn knobs(&self) -> &'static Knobs {
        if self.pool {
            &POOL
        } else {
            &LOCAL
        }
    }
}

/// The settings a fix tells the user to change: environment variables for `tessera run` and `tessera cp`, the
/// WorkerPool's fields for a worker pod.
pub struct Knobs {
    pub endpoint: &'static str,
    pub region: &'static str,
    pub key_id: &'static str,
    pub secret: &'static str,
    pub no_credentials_fix: &'static str,
}

pub const LOCAL: Knobs = Knobs {
    endpoint: "AWS_ENDPOINT_URL",
    region: "AWS_REGION",
    key_id: "AWS_ACCESS_KEY_ID (or the profile in use)",
    secret: "AWS_SECRET_ACCESS_KEY",
    no_credentials_fix:
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an IAM role \
         is attached; for a local S3 server also set AWS_ENDPOINT_URL",
};

pub const POOL: Knobs = Knobs {
    endpoint: "the WorkerPool's spec.s3.endpoint",
    region: "the WorkerPool's spec.s3.region",
    key_id: "AWS_ACCESS_KEY_ID in the WorkerPool's spec.s3.credentialsSecret",
    secret: "AWS_SECRET_ACCESS_KEY in the WorkerPool's spec.s3.credentialsSecret",
    no_credentials_fix:
        "set the WorkerPool's spec.s3.credentialsSecret, or give its service account an IAM role \
         (IRSA or Pod Identity)",
};

impl Knobs {
    /// "set AWS_REGION=eu-west-1", "set the WorkerPool's spec.s3.region to eu-west-1".
    fn set_region(&self, r: &str) -> String {
        if self.region.starts_with("AWS_") {
            format!("set {}={r}", self.region)
        } else {
            format!("set {} to {r}", self.region)
        }
    }

    /// The sentence for missing credentials.
    pub fn no_credentials(&self) -> String {
        format!("no S3 credentials: {}", self.no_credentials_fix)
    }
}

/// Classify what the SDK returned.
pub fn classify<E>(err: &SdkError<E, HttpResponse>, ctx: &Ctx<'_>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err {
        SdkError::ServiceError(se) => {
            let raw = se.raw();
            let region = raw.headers().get("x-amz-bucket-region");
            classify_reply(
                raw.status().as_u16(),
                se.err().code().unwrap_or(""),
                se.err().message().unwrap_or(""),
                region,
                ctx,
            )
        }
        SdkError::TimeoutError(_) => Failure::transient(format!(
            "no answer from {} in time (timed out)",
            ctx.endpoint
        )),
        SdkError::ConstructionFailure(_) => Failure::fatal(
            StorageKind::Config,
            format!(
                "the S3 request could not be built: {}; check AWS_REGION and AWS_ENDPOINT_URL",
                chain_text(err)
            ),
        ),
        _ => {
            if let Some(c) = find_in_chain::<CredentialsError>(err) {
                return credentials(c, ctx.knobs());
            }
            classify_transport(&chain_text(err), ctx)
        }
    }
}

/// A failure of the SDK's credential chain.
pub fn credentials(c: &CredentialsError, k: &Knobs) -> Failure {
    let why = match c {
        CredentialsError::CredentialsNotLoaded(_) => {
            return Failure::fatal(StorageKind::NoCredentials, k.no_credentials())
        }
        CredentialsError::ProviderTimedOut(_) => {
            "the credential provider timed out (no instance metadata service answered)".to_string()
        }
        _ => {
            let inner = std::error::Error::source(c)
                .map(chain_text)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.to_string());
            if inner.contains("IMDS") || inner.contains("instance metadata") {
                // The chain's last resort, the EC2 instance role, found nothing: nothing before it had keys.
                return Failure::fatal(StorageKind::NoCredentials, k.no_credentials());
            }
            format!("the AWS credential chain failed: {inner}")
        }
    };
    Failure::fatal(
        StorageKind::NoCredentials,
        format!("no usable S3 credentials: {why}; {}", k.no_credentials_fix),
    )
}

/// The store answered: classify by HTTP status and S3 error code. `bucket_region` is S3's
/// `x-amz-bucket-region` header, which a region redirect carries.
pub fn classify_reply(
    status: u16,
    code: &str,
    message: &str,
    bucket_region: Option<&str>,
    ctx: &Ctx<'_>,
) -> Failure {
    let said = match (code, message) {
        ("", _) => format!("HTTP {status}"),
        (c, _) => format!("{c}, HTTP {status}"),
    };
    let with = |s: String| format!("{s} (S3 said: {said})");
    let bucket = ctx.bucket;
    let k = ctx.knobs();
    match (status, code) {
        (_, "SlowDown" | "Throttling" | "ThrottlingException") | (429 | 503, _) => Failure::transient(with(
            format!("{} is throttling requests", ctx.endpoint),
        )),
        (_, "RequestTimeout" | "InternalError") | (500..=599, _) => {
            Failure::transient(with(format!("{} had a temporary failure", ctx.endpoint)))
        }
        (301 | 307, _) | (_, "PermanentRedirect" | "AuthorizationHeaderMalformed" | "IllegalLocationConstraintException") => {
            let right = bucket_region
                .map(str::to_string)
                .or_else(|| region_in_message(message));
            let msg = match right {
                Some(r) => format!(
                    "bucket {bucket:?} is in region {r}, but requests are signed for {}: {}",
                    ctx.region,
                    k.set_region(&r)
                ),
                None => format!(
                    "bucket {bucket:?} is not in region {}: set {} to the bucket's region",
                    ctx.region, k.region
                ),
            };
            Failure::fatal(StorageKind::WrongRegion, with(msg))
        }
        (_, "NoSuchBucket") => Failure::fatal(
            StorageKind::NoSuchBucket,
            with(format!(
                "bucket {bucket:?} does not exist at {}: check the bucket name{}",
                ctx.endpoint,
                if ctx.custom_endpoint { format!(", or {} if it lives on another server", k.endpoint) } else { format!(", or set {} if it lives on another S3 server", k.endpoint) }
            )),
        ),
        (404, _) | (_, "NoSuchKey") => {
            let mut msg = format!("no object with key {:?} in bucket {bucket:?}", ctx.key);
            if ctx.key != ctx.key.trim() || ctx.key.contains("  ") || ctx.key.contains(' ') {
                msg.push_str(" (the key contains a space: check for a stray one)");
            }
            Failure::fatal(StorageKind::NotFound, with(msg))
        }
        (412, _) | (_, "PreconditionFailed") => Failure::fatal(
            StorageKind::Changed,
            with("the object changed since it was first read".into()),
        ),
        (_, "RequestTimeTooSkewed" | "RequestExpired") => Failure::fatal(
            StorageKind::ClockSkew,
            with(format!(
                "this machine's clock is off from {}'s; sync it (NTP)",
                ctx.endpoint
            )),
        ),
        // s3s-based servers answer an unknown key with NotSignedUp (S3's "account not signed up for S3").
        (_, "InvalidAccessKeyId" | "NotSignedUp") => Failure::fatal(
            StorageKind::BadCredentials,
            with(format!(
                "the access key ID is not known to {}: check {}{}",
                ctx.endpoint,
                k.key_id,
                if ctx.custom_endpoint { String::new() } else { format!("; for a local S3 server also set {}", k.endpoint) }
            )),
        ),
        (_, "SignatureDoesNotMatch") => Failure::fatal(
            StorageKind::BadCredentials,
            with(format!("the secret key does not match the access key ID: check {}", k.secret)),
        ),
        (_, "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired") => Failure::fatal(
            StorageKind::BadCredentials,
            with("the session token has expired or is invalid: refresh the credentials (a new AWS_SESSION_TOKEN, or `aws sso login`)".into()),
        ),
        (401 | 403, _) | (_, "AccessDenied" | "AllAccessDisabled") => Failure::fatal(
            StorageKind::AccessDenied,
            with(format!(
                "access denied to bucket {bucket:?}: the credentials in use may not do this here; check the IAM or bucket policy"
            )),
        ),
        (400, "InvalidBucketName") => Failure::fatal(
            StorageKind::InvalidUri,
            with(format!("{bucket:?} is not a valid bucket name")),
        ),
        _ => Failure::fatal(
            StorageKind::Other,
            with(if message.is_empty() {
                "the store refused the request".to_string()
            } else {
                format!("the store refused the request: {message}")
            }),
        ),
    }
}

/// `... the region 'us-east-1' is wrong; expecting 'eu-west-1'` (AuthorizationHeaderMalformed).
fn region_in_message(message: &str) -> Option<String> {
    let rest = message.split("expecting '").nth(1)?;
    let r = rest.split('\'').next()?;
    (!r.is_empty()).then(|| r.to_string())
}

/// The request never got an answer: classify the transport error's text (the source chain, joined).
/// A name that does not resolve, a refused connection and a TLS failure are told apart; anything else (resets,
/// closed connections) is transient.
pub fn classify_transport(text: &str, ctx: &Ctx<'_>) -> Failure {
    let host = host_of(ctx.endpoint);
    let k = ctx.knobs();
    let cause = transport_cause(text);
    if cause == Transport::Unresolvable {
        Failure {
            kind: StorageKind::EndpointUnresolvable,
            retryable: true,
            detail: format!(
                "the endpoint name {host:?} does not resolve{}",
                if ctx.custom_endpoint {
                    format!(": check {}", k.endpoint)
                } else {
                    format!(
                        ": check the network's DNS, or set {} for another S3 server",
                        k.endpoint
                    )
                }
            ),
        }
    } else if cause == Transport::Refused {
        Failure {
            kind: StorageKind::Refused,
            retryable: true,
            detail: format!(
                "nothing accepts connections at {}: start the S3 server or fix {}",
                ctx.endpoint,
                if ctx.custom_endpoint {
                    k.endpoint.to_string()
                } else {
                    format!("the endpoint ({})", k.endpoint)
                }
            ),
        }
    } else if cause == Transport::Tls {
        let plain = if ctx.endpoint.starts_with("https://") {
            format!(
                "; if the server speaks plain HTTP, write http:// in {}",
                k.endpoint
            )
        } else {
            String::new()
        };
        Failure::fatal(
            StorageKind::Tls,
            format!(
                "the TLS connection to {} failed: {}{plain}",
                ctx.endpoint,
                last_clause(text)
            ),
        )
    } else {
        Failure::transient(format!(
            "the connection to {} failed: {}",
            ctx.endpoint,
            last_clause(text)
        ))
    }
}

/// What a transport error's text (the source chain, joined) says went wrong before any answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unresolvable,
    Refused,
    Tls,
    Other,
}

/// Shared by S3 requests and `tessera doctor`'s API-server check.
pub fn transport_cause(text: &str) -> Transport {
    let t = text.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if any(&[
        "dns error",
        "failed to lookup address",
        "name or service not known",
        "no address associated",
        "nodename nor servname",
        "temporary failure in name resolution",
    ]) {
        Transport::Unresolvable
    } else if t.contains("connection refused") {
        Transport::Refused
    } else if any(&[
        "certificate",
        "invalidcontenttype",
        "corrupt message",
        "tls handshake",
        "ssl",
        "invalid peer",
        "peer is incompatible",
    ]) {
        Transport::Tls
    } else {
        Transport::Other
    }
}

fn host_of(endpoint: &str) -> &str {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(authority, |(h, _)| h)
}

/// The innermost cause of a joined chain: the most specific words.
fn last_clause(text: &str) -> &str {
    text.rsplit(": ").next().unwrap_or(text).trim()
}

/// The error and its sources, each level's `Display` once (a level that repeats the one above is skipped),
/// joined by ": ". Never `Debug`.
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let s = strip_debug(&e.to_string());
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// Drop anything from the first `{` or `(` that opens a struct-like dump (`Foo { .. }`, `Bar(Baz { .. })`).
fn strip_debug(s: &str) -> String {
    let cut = s
        .char_indices()
        .find(|&(i, c)| c == '{' || (c == '(' && s[i + 1..].contains('{')))
        .map_or(s.len(), |(i, _)| i);
    s[..cut].trim().trim_end_matches(':').trim().to_string()
}

fn find_in_chain<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// status, code, message, x-amz-bucket-region, kind, retryable, words the detail holds.
    type Row = (
        u16,
        &'static str,
        &'static str,
        Option<&'static str>,
        StorageKind,
        bool,
        &'static str,
    );

    fn ctx() -> Ctx<'static> {
        Ctx {
            endpoint: "http://127.0.0.1:9000",
            region: "us-east-1",
            custom_endpoint: true,
            pool: false,
            bucket: "media",
            key: "in/a.mp4",
        }
    }

    #[test]
    fn replies_are_classified_with_a_cause_and_a_fix() {
        let c = ctx();
        let cases: &[Row] = &[
            (
                503,
                "SlowDown",
                "",
                None,
                StorageKind::Unavailable,
                true,
                "throttling",
            ),
            (
                500,
                "",
                "",
                None,
                StorageKind::Unavailable,
                true,
                "temporary failure",
            ),
            (
                400,
                "RequestTimeout",
                "",
                None,
                StorageKind::Unavailable,
                true,
                "temporary",
            ),
            (
                429,
                "",
                "",
                None,
                StorageKind::Unavailable,
                true,
                "throttling",
            ),
            (
                404,
                "NoSuchKey",
                "The key does not exist",
                None,
                StorageKind::NotFound,
                false,
                "no object with key \"in/a.mp4\"",
            ),
            (404, "", "", None, StorageKind::NotFound, false, "HTTP 404"),
            (
                404,
                "NoSuchBucket",
                "",
                None,
                StorageKind::NoSuchBucket,
                false,
                "bucket \"media\" does not exist",
            ),
            (412, "", "", None, StorageKind::Changed, false, "changed"),
            (
                403,
                "InvalidAccessKeyId",
                "",
                None,
                StorageKind::BadCredentials,
                false,
                "AWS_ACCESS_KEY_ID",
            ),
            (
                403,
                "SignatureDoesNotMatch",
                "",
                None,
                StorageKind::BadCredentials,
                false,
                "AWS_SECRET_ACCESS_KEY",
            ),
            (
                400,
                "ExpiredToken",
                "",
                None,
                StorageKind::BadCredentials,
                false,
                "session token",
            ),
            (
                403,
                "AccessDenied",
                "",
                None,
                StorageKind::AccessDenied,
                false,
                "policy",
            ),
            (
                403,
                "",
                "",
                None,
                StorageKind::AccessDenied,
                false,
                "access denied",
            ),
            (
                301,
                "",
                "",
                Some("eu-west-1"),
                StorageKind::WrongRegion,
                false,
                "set AWS_REGION=eu-west-1",
            ),
            (
                301,
                "PermanentRedirect",
                "",
                None,
                StorageKind::WrongRegion,
                false,
                "set AWS_REGION to",
            ),
            (
                400,
                "AuthorizationHeaderMalformed",
                "the region 'us-east-1' is wrong; expecting 'ap-south-1'",
                None,
                StorageKind::WrongRegion,
                false,
                "AWS_REGION=ap-south-1",
            ),
            (
                403,
                "RequestTimeTooSkewed",
                "",
                None,
                StorageKind::ClockSkew,
                false,
                "clock",
            ),
            (
                400,
                "InvalidArgument",
                "bad",
                None,
                StorageKind::Other,
                false,
                "refused the request: bad",
            ),
        ];
        for &(status, code, message, region, kind, retry, words) in cases {
            let f = classify_reply(status, code, message, region, &c);
            assert_eq!(
                (f.kind, f.retryable),
                (kind, retry),
                "{status} {code}: {}",
                f.detail
            );
            assert!(f.detail.contains(words), "{status} {code}: {}", f.detail);
            if !code.is_empty() {
                assert!(
                    f.detail
                        .contains(&format!("(S3 said: {code}, HTTP {status})")),
                    "{}",
                    f.detail
                );
            }
            assert!(!f.detail.contains('{'), "{}", f.detail);
        }
    }

    #[test]
    fn a_worker_pod_is_told_the_pool_fields() {
        let c = Ctx {
            custom_endpoint: false,
            pool: true,
            ..ctx()
        };
        let region = classify_reply(301, "", "", Some("eu-west-1"), &c).detail;
        assert!(
            region.contains("set the WorkerPool's spec.s3.region to eu-west-1"),
            "{region}"
        );
        let secret = classify_reply(403, "SignatureDoesNotMatch", "", None, &c).detail;
        assert!(secret.contains("spec.s3.credentialsSecret"), "{secret}");
        let none = POOL.no_credentials();
        assert!(
            none.contains("spec.s3.credentialsSecret") && !none.contains("AWS_PROFILE"),
            "{none}"
        );
        let pool_ctx = Ctx {
            pool: true,
            ..ctx()
        };
        let bucket = classify_reply(404, "NoSuchBucket", "", None, &pool_ctx).detail;
        assert!(
            bucket.contains("spec.s3.endpoint") && !bucket.contains("AWS_"),
            "{bucket}"
        );
    }

    #[test]
    fn a_key_with_a_space_is_pointed_out_when_missing() {
        let c = Ctx {
            key: "in/my clip.mp4",
            ..ctx()
        };
        assert!(classify_reply(404, "", "", None, &c)
            .detail
            .contains("contains a space"));
        assert!(!classify_reply(404, "", "", None, &ctx())
            .detail
            .contains("space"));
    }

    #[test]
    fn transport_failures_are_told_apart() {
        let c = ctx();
        let dns = classify_transport(
            "dispatch failure: io error: client error (Connect): dns error: failed to lookup address information: Name or service not known",
            &Ctx { endpoint: "http://minio.local:9000", ..c },
        );
        assert_eq!(dns.kind, StorageKind::EndpointUnresolvable);
        assert!(
            dns.detail.contains("\"minio.local\" does not resolve"),
            "{}",
            dns.detail
        );
        let refused = classify_transport(
            "dispatch failure: io error: client error (Connect): tcp connect error: Connection refused (os error 111)",
            &c,
        );
        assert_eq!(refused.kind, StorageKind::Refused);
        assert!(refused
            .detail
            .contains("nothing accepts connections at http://127.0.0.1:9000"));
        let tls = classify_transport(
            "dispatch failure: io error: client error (Connect): received corrupt message of type InvalidContentType",
            &Ctx { endpoint: "https://127.0.0.1:9000", ..c },
        );
        assert_eq!((tls.kind, tls.retryable), (StorageKind::Tls, false));
        assert!(tls.detail.contains("write http://"), "{}", tls.detail);
        let reset = classify_transport("dispatch failure: io error: connection reset by peer", &c);
        assert_eq!(
            (reset.kind, reset.retryable),
            (StorageKind::Unavailable, true)
        );
        assert!(
            reset.detail.ends_with("connection reset by peer"),
            "{}",
            reset.detail
        );
    }

    #[test]
    fn debug_dumps_never_reach_the_text() {
        assert_eq!(
            strip_debug("other: ProviderError(ProviderError { source: X })"),
            "other: ProviderError"
        );
        assert_eq!(strip_debug("timed out (after 5s)"), "timed out (after 5s)");
        assert_eq!(host_of("https://s3.example.com:443/x"), "s3.example.com");
        assert_eq!(
            host_of("s3.us-east-1.amazonaws.com"),
            "s3.us-east-1.amazonaws.com"
        );
    }
}
