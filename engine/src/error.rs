//! The worker crate's one error type. Every variant carries the context a user needs: the file, the field,
//! the encoder, and FFmpeg's own words where it gave any.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Spec { path: PathBuf, message: String },

    #[error("{field}: {message}")]
    Field { field: String, message: String },

    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: {what}: {detail}")]
    Media {
        path: PathBuf,
        what: String,
        detail: String,
    },

    #[error("{path}: no video stream (streams found: {found})")]
    NoVideo { path: PathBuf, found: String },

    #[error("encoder {encoder}: {detail}")]
    Encoder { encoder: String, detail: String },

    #[error("chunk {chunk}: {detail}")]
    Chunk { chunk: usize, detail: String },

    /// Object storage: the URI (never credentials), what was being done, and what the store said.
    #[error("{uri}: {what}: {detail}")]
    Storage {
        uri: String,
        what: String,
        kind: StorageKind,
        detail: String,
    },

    /// The operator's work queue (worker pod mode).
    #[error("work queue: {0}")]
    Queue(String),

    #[error("cancelled")]
    Cancelled,
}

/// Why an object-storage operation failed, for status reasons and for deciding what to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    NotFound,
    NoSuchBucket,
    AccessDenied,
    /// The object changed while it was being read (its ETag no longer matches).
    Changed,
    /// Throttling, 5xx, timeouts or dropped connections outlasted the retry budget.
    Unavailable,
    /// The upload's size or checksum did not match what was sent.
    Corrupt,
    /// Bad configuration: credentials, region, endpoint.
    Config,
    /// The request's signing time is too far from the server's (this machine's clock is off).
    ClockSkew,
    /// No credentials anywhere in the chain (environment, profile, web identity, instance role).
    NoCredentials,
    /// Credentials the store does not accept: unknown access key, wrong secret, expired token.
    BadCredentials,
    /// The bucket lives in another region than the one requests are signed for.
    WrongRegion,
    /// The endpoint's host name does not resolve.
    EndpointUnresolvable,
    /// Nothing accepts connections at the endpoint.
    Refused,
    /// The TLS handshake with the endpoint failed.
    Tls,
    /// The URI or bucket name is malformed.
    InvalidUri,
    Other,
}

impl Error {
    pub fn media(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        detail: impl std::fmt::Display,
    ) -> Self {
        Self::Media {
            path: path.into(),
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    /// The process exit status for this error: 2 for a bad job file or argument, 130 when interrupted, 1
    /// otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Spec { .. } | Self::Field { .. } => 2,
            Self::Cancelled => 130,
            _ => 1,
        }
    }

    /// A short, stable label for metrics and status reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Spec { .. } | Self::Field { .. } => "InvalidSpec",
            Self::Read { .. } => "InputUnreadable",
            Self::Write { .. } => "OutputUnwritable",
            Self::Media { .. } => "InvalidMedia",
            Self::NoVideo { .. } => "NoVideoStream",
            Self::Encoder { .. } => "EncoderFailed",
            Self::Chunk { .. } => "ChunkFailed",
            Self::Storage { kind, .. } => match kind {
                StorageKind::NotFound => "InputNotFound",
                StorageKind::NoSuchBucket => "BucketNotFound",
                StorageKind::AccessDenied => "AccessDenied",
                StorageKind::Changed => "InputChanged",
                StorageKind::Unavailable => "StorageUnavailable",
                StorageKind::Corrupt => "StorageChecksumMismatch",
                StorageKind::Config => "StorageMisconfigured",
                StorageKind::ClockSkew => "ClockSkewed",
                StorageKind::NoCredentials => "NoCredentials",
                StorageKind::BadCredentials => "InvalidCredentials",
                StorageKind::WrongRegion => "WrongRegion",
                StorageKind::EndpointUnresolvable => "EndpointNotFound",
                StorageKind::Refused => "EndpointRefused",
                StorageKind::Tls => "TlsFailed",
                StorageKind::InvalidUri => "InvalidURI",
                StorageKind::Other => "StorageError",
            },
            Self::Queue(_) => "QueueUnavailable",
            Self::Cancelled => "Cancelled",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
