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
}

/// The sentence for missing credentials (also used by `tessera doctor`).
pub const NO_CREDENTIALS: &str = "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
     AWS_PROFILE, or run where an IAM role is attached; for a local S3 server also set AWS_ENDPOINT_URL";

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
                return credentials(c);
            }
            classify_transport(&chain_text(err), ctx)
        }
    }
}

/// A failure of the SDK's credential chain.
pub fn credentials(c: &CredentialsError) -> Failure {
    let why = match c {
        CredentialsError::CredentialsNotLoaded(_) => {
            return Failure::fatal(StorageKind::NoCredentials, NO_CREDENTIALS)
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
                return Failure::fatal(StorageKind::NoCredentials, NO_CREDENTIALS);
            }
            format!("the AWS credential chain failed: {inner}")
        }
    };
    Failure::fatal(
        StorageKind::NoCredentials,
        format!(
            "no usable S3 credentials: {why}; {}",
            &NO_CREDENTIALS["no S3 credentials: ".len()..]
        ),
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
                    "bucket {bucket:?} is in region {r}, but requests are signed for {}: set AWS_REGION={r}",
                    ctx.region
                ),
                None => format!(
                    "bucket {bucket:?} is not in region {}: set AWS_REGION to the bucket's region",
                    ctx.region
                ),
            };
            Failure::fatal(StorageKind::WrongRegion, with(msg))
        }
        (_, "NoSuchBucket") => Failure::fatal(
            StorageKind::NoSuchBucket,
            with(format!(
                "bucket {bucket:?} does not exist at {}: check the bucket name{}",
                ctx.endpoint,
                if ctx.custom_endpoint { ", or AWS_ENDPOINT_URL if it lives on another server" } else { ", or set AWS_ENDPOINT_URL if it lives on another S3 server" }
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
                "the access key ID is not known to {}: check AWS_ACCESS_KEY_ID (or the profile in use){}",
                ctx.endpoint,
                if ctx.custom_endpoint { "" } else { "; for a local S3 server also set AWS_ENDPOINT_URL" }
            )),
        ),
        (_, "SignatureDoesNotMatch") => Failure::fatal(
            StorageKind::BadCredentials,
            with("the secret key does not match the access key ID: check AWS_SECRET_ACCESS_KEY".into()),
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

/// The same sentence for a worker pod, whose S3 settings come from its WorkerPool's `spec.s3` rather than from
/// the user's environment: the fix names the pool's fields.
pub fn in_pool_words(detail: &str) -> String {
    detail
        .replace(
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where an IAM role is attached; \
             for a local S3 server also set AWS_ENDPOINT_URL",
            "set the WorkerPool's spec.s3.credentialsSecret, or give its service account an IAM role (IRSA or Pod Identity)",
        )
        .replace("AWS_ACCESS_KEY_ID (or the profile in use)", "AWS_ACCESS_KEY_ID in the WorkerPool's spec.s3.credentialsSecret")
        .replace("check AWS_SECRET_ACCESS_KEY", "check AWS_SECRET_ACCESS_KEY in the WorkerPool's spec.s3.credentialsSecret")
        .replace("set AWS_REGION=", "set the WorkerPool's spec.s3.region to ")
        .replace("set AWS_REGION to", "set the WorkerPool's spec.s3.region to")
        .replace("AWS_ENDPOINT_URL", "the WorkerPool's spec.s3.endpoint")
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
    let t = text.to_ascii_lowercase();
    let host = host_of(ctx.endpoint);
    if t.contains("dns error")
        || t.contains("failed to lookup address")
        || t.contains("name or service not known")
        || t.contains("no address associated")
        || t.contains("nodename nor servname")
        || t.contains("temporary failure in name resolution")
    {
        Failure {
            kind: StorageKind::EndpointUnresolvable,
            retryable: true,
            detail: format!(
                "the endpoint name {host:?} does not resolve{}",
                if ctx.custom_endpoint {
                    ": check AWS_ENDPOINT_URL"
                } else {
                    ": check the network's DNS, or set AWS_ENDPOINT_URL for another S3 server"
                }
            ),
        }
    } else if t.contains("connection refused") {
        Failure {
            kind: StorageKind::Refused,
            retryable: true,
            detail: format!(
                "nothing accepts connections at {}: start the S3 server or fix {}",
                ctx.endpoint,
                if ctx.custom_endpoint {
                    "AWS_ENDPOINT_URL"
                } else {
                    "the endpoint (AWS_ENDPOINT_URL)"
                }
            ),
        }
    } else if t.contains("certificate")
        || t.contains("invalidcontenttype")
        || t.contains("corrupt message")
        || t.contains("tls handshake")
        || t.contains("ssl")
        || t.contains("invalid peer")
        || t.contains("peer is incompatible")
    {
        let plain = if ctx.endpoint.starts_with("https://") {
            "; if the server speaks plain HTTP, write http:// in AWS_ENDPOINT_URL"
        } else {
            ""
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
            ..ctx()
        };
        let region = in_pool_words(&classify_reply(301, "", "", Some("eu-west-1"), &c).detail);
        assert!(
            region.contains("set the WorkerPool's spec.s3.region to eu-west-1"),
            "{region}"
        );
        let secret =
            in_pool_words(&classify_reply(403, "SignatureDoesNotMatch", "", None, &c).detail);
        assert!(secret.contains("spec.s3.credentialsSecret"), "{secret}");
        let none = in_pool_words(NO_CREDENTIALS);
        assert!(
            none.contains("spec.s3.credentialsSecret") && !none.contains("AWS_PROFILE"),
            "{none}"
        );
        let bucket = in_pool_words(&classify_reply(404, "NoSuchBucket", "", None, &ctx()).detail);
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
