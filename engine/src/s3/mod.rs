//! Object storage over the S3 API: streaming ranged reads with read-ahead, streamed multipart writes,
//! retries with backoff and jitter, and a circuit breaker per endpoint.
//!
//! ```text
//!  FFmpeg (sync threads) --read/seek--> reader::S3Reader --spawn--> fetch_range tasks --GET Range, If-Match-->
//!                                          (bounded window of blocks, ramping block size)            endpoint
//!  files / readers --parts--> writer::Upload --UploadPart (<= N in flight), Complete, HEAD verify-->
//!                       every request: Retrier (breaker admit -> attempt -> classify -> backoff)
//! ```
//!
//! The async side runs on one small tokio runtime owned by this module; the media engine's threads call into
//! it with blocking waits that also watch for an interrupt.

mod breaker;
pub mod classify;
pub mod cli;
pub mod cp;
pub mod reader;
mod retry;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::stalled_stream_protection::StalledStreamProtectionConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use breaker::BreakerConfig;
use breaker::{Breaker, Event};
pub use classify::{classify_reply, Ctx};
pub use retry::{Backoff, Failure};

use crate::error::{Error, Result, StorageKind};

/// `s3://bucket/key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Uri {
    pub bucket: String,
    pub key: String,
}

impl S3Uri {
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        (!bucket.is_empty()).then(|| Self {
            bucket: bucket.into(),
            key: key.into(),
        })
    }

    /// This URI joined with a relative key (`a/b/` + `c.m3u8`).
    pub fn join(&self, rel: &str) -> Self {
        let key = if self.key.is_empty() || self.key.ends_with('/') {
            format!("{}{rel}", self.key)
        } else {
            format!("{}/{rel}", self.key)
        };
        Self {
            bucket: self.bucket.clone(),
            key,
        }
    }
}

impl std::fmt::Display for S3Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Tunables, from the environment (`TESSERA_S3_*`) with defaults that keep a reader or writer within a
/// few tens of MiB.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Multipart part size for writes of unknown length (grows after every 1,000 parts).
    pub part_size: usize,
    /// Parts uploading at once per upload.
    pub parts_in_flight: usize,
    /// Largest ranged GET of the streaming reader (blocks start small after a seek and double).
    pub read_block: usize,
    /// Blocks fetched ahead of the read position.
    pub read_ahead: usize,
    /// Ranged GET size and parallelism for downloads to a file.
    pub download_block: usize,
    pub downloads_in_flight: usize,
    /// Give up on a request after this long of failing.
    pub retry_budget: Duration,
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// A response body that delivers nothing for this long is dropped and resumed.
    pub body_timeout: Duration,
    pub breaker: BreakerConfig,
    /// How long an endpoint whose name does not resolve, or that refuses connections, is retried: none in
    /// local mode (a typo is answered at once), briefly in a worker pod (DNS and services settle at startup).
    pub network_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            part_size: 8 << 20,
            parts_in_flight: 3,
            read_block: 4 << 20,
            read_ahead: 4,
            download_block: 16 << 20,
            downloads_in_flight: 6,
            retry_budget: Duration::from_secs(120),
            max_attempts: 10,
            backoff: Backoff::default(),
            body_timeout: Duration::from_secs(10),
            breaker: BreakerConfig::default(),
            network_grace: if POD_MODE.load(Ordering::Relaxed) {
                Duration::from_secs(30)
            } else {
                Duration::ZERO
            },
        }
    }
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

impl Settings {
    pub fn from_env() -> Self {
        let d = Self::default();
        let mib = |n: &str, dflt: usize| env_num::<usize>(n).map_or(dflt, |m| m.max(1) << 20);
        let secs =
            |n: &str, dflt: Duration| env_num::<f64>(n).map_or(dflt, Duration::from_secs_f64);
        Self {
            part_size: mib("TESSERA_S3_PART_MIB", d.part_size).max(5 << 20),
            parts_in_flight: env_num("TESSERA_S3_PARTS_IN_FLIGHT")
                .unwrap_or(d.parts_in_flight)
                .max(1),
            read_block: mib("TESSERA_S3_READ_BLOCK_MIB", d.read_block),
            read_ahead: env_num("TESSERA_S3_READ_AHEAD")
                .unwrap_or(d.read_ahead)
                .max(1),
            download_block: mib("TESSERA_S3_DOWNLOAD_BLOCK_MIB", d.download_block),
            downloads_in_flight: env_num("TESSERA_S3_DOWNLOADS_IN_FLIGHT")
                .unwrap_or(d.downloads_in_flight)
                .max(1),
            retry_budget: secs("TESSERA_S3_RETRY_SECONDS", d.retry_budget),
            max_attempts: env_num("TESSERA_S3_MAX_ATTEMPTS").unwrap_or(d.max_attempts),
            backoff: d.backoff,
            body_timeout: secs("TESSERA_S3_BODY_TIMEOUT_SECONDS", d.body_timeout),
            breaker: BreakerConfig {
                threshold: env_num("TESSERA_S3_BREAKER_THRESHOLD").unwrap_or(d.breaker.threshold),
                open_for: secs("TESSERA_S3_BREAKER_OPEN_SECONDS", d.breaker.open_for),
                ..d.breaker
            },
            network_grace: secs("TESSERA_S3_NETWORK_GRACE_SECONDS", d.network_grace),
        }
    }
}

/// Counters, for logs, `--json` summaries and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub breaker_opened: AtomicU64,
    pub breaker_closed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub requests: u64,
    pub retries: u64,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    pub breaker_opened: u64,
    pub breaker_closed: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: g(&self.requests),
            retries: g(&self.retries),
            bytes_downloaded: g(&self.bytes_downloaded),
            bytes_uploaded: g(&self.bytes_uploaded),
            breaker_opened: g(&self.breaker_opened),
            breaker_closed: g(&self.breaker_closed),
        }
    }
}

/// What a HEAD says about an object; reads pin `etag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub etag: String,
    /// When the object was last written, by the store's clock (seconds since the epoch).
    pub last_modified: Option<i64>,
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub uri: S3Uri,
    pub size: u64,
    /// The store's clock, seconds since the epoch (0 when the server did not say).
    pub last_modified: i64,
}

/// One endpoint: its client, breaker, settings and counters.
pub struct S3 {
    pub client: Client,
    pub endpoint: String,
    /// The region requests are signed for.
    pub region: String,
    /// Whether the endpoint came from the user (`AWS_ENDPOINT_URL`), not from the region.
    pub custom_endpoint: bool,
    /// The SDK's credential chain, for `tessera doctor` to ask where credentials come from.
    pub credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
    /// Whether the "retrying" line has been printed since the last success (one line per outage).
    announced: AtomicBool,
    pub settings: Settings,
    pub stats: Stats,
    breaker: Mutex<Breaker>,
    /// ETag seen first for each input URI in this process: every later open of the same URI (chunk workers,
    /// audio, quality) reads that version or fails.
    pinned: Mutex<HashMap<String, ObjectMeta>>,
}

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
static GLOBAL: OnceLock<Arc<S3>> = OnceLock::new();
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static POD_MODE: AtomicBool = AtomicBool::new(false);

/// Worker-pod mode: an endpoint that does not resolve or refuses connections is retried for a while
/// (`Settings::network_grace`) instead of failing at once. Call before the first S3 use.
pub fn set_pod_mode() {
    POD_MODE.store(true, Ordering::Relaxed);
}
static CANCEL: OnceLock<CancellationToken> = OnceLock::new();

/// The runtime every S3 request runs on (two threads: the work is I/O).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-s3")
            .enable_all()
            .build()
            .expect("tokio runtime starts")
    })
}

/// Cancelled when the process is interrupted (Ctrl-C, SIGTERM): in-flight requests stop, waits end.
pub fn cancel_token() -> &'static CancellationToken {
    CANCEL.get_or_init(CancellationToken::new)
}

/// Stop every in-flight and future S3 request of this process promptly.
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
    cancel_token().cancel();
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Is this an `s3://` URI (as a string or as the path the engine carries it in)?
pub fn is_s3(name: &str) -> bool {
    name.starts_with("s3://")
}

/// The process's S3 endpoint if something has used it yet (never configures it: for metrics).
pub fn global_if_made() -> Option<Arc<S3>> {
    GLOBAL.get().cloned()
}

/// The process's S3 endpoint, configured from the standard AWS chain on first use.
pub fn global() -> Arc<S3> {
    GLOBAL
        .get_or_init(|| Arc::new(runtime().block_on(S3::from_env(Settings::from_env()))))
        .clone()
}

impl S3 {
    /// Configure from the environment: credentials (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/
    /// `AWS_SESSION_TOKEN`, profiles, web identity for IRSA), `AWS_REGION`, `AWS_ENDPOINT_URL(_S3)`.
    /// Path-style addressing is on for a custom endpoint (`TESSERA_S3_PATH_STYLE=false` turns it off).
    /// Request checksums are sent only where the API requires them, so stores that reject the SDK's
    /// default CRC32 trailers work; uploads carry Content-MD5 instead.
    pub async fn from_env(settings: Settings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if !POD_MODE.load(Ordering::Relaxed) {
            // Off EC2, the chains' last resort (instance metadata) would spend 4 attempts per lookup before
            // "no credentials" could be said; in local mode one attempt with a 1 s timeout decides. Worker
            // pods keep the SDK's defaults (IMDS there is slow to answer only when it is really busy).
            let imds = aws_config::imds::Client::builder()
                .max_attempts(1)
                .connect_timeout(Duration::from_secs(1))
                .read_timeout(Duration::from_secs(1))
                .build();
            use aws_config::meta::region::RegionProviderChain;
            let region = RegionProviderChain::first_try(
                aws_config::environment::EnvironmentVariableRegionProvider::new(),
            )
            .or_else(aws_config::profile::ProfileFileRegionProvider::builder().build())
            .or_else(
                aws_config::imds::region::ImdsRegionProvider::builder()
                    .imds_client(imds.clone())
                    .build(),
            )
            .region()
            .await;
            let mut creds =
                aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                    .imds_client(imds);
            if let Some(r) = region {
                creds = creds.region(r.clone());
                loader = loader.region(r);
            }
            loader = loader.credentials_provider(creds.build().await);
        }
        let sdk = loader
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(settings.body_timeout + Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            )
            // Our own body timeout (with resume) covers stalls; the SDK's would fail the request instead.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .load()
            .await;
        let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
            .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| sdk.endpoint_url().map(str::to_string));
        let path_style = match std::env::var("TESSERA_S3_PATH_STYLE").ok().as_deref() {
            Some("1" | "true" | "yes") => true,
            Some("0" | "false" | "no") => false,
            _ => endpoint.is_some(),
        };
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        let region = sdk
            .region()
            .map_or_else(|| "us-east-1".to_string(), |r| r.as_ref().to_string());
        if sdk.region().is_none() {
            conf = conf.region(aws_sdk_s3::config::Region::new(region.clone()));
        }
        if let Some(e) = &endpoint {
            conf = conf.endpoint_url(e);
        }
        let custom_endpoint = endpoint.is_some();
        let endpoint = endpoint.unwrap_or_else(|| format!("s3.{region}.amazonaws.com"));
        tracing::debug!(%endpoint, path_style, "S3 endpoint configured");
        Self {
            client: Client::from_conf(conf.build()),
            breaker: Mutex::new(Breaker::new(settings.breaker)),
            endpoint,
            region,
            custom_endpoint,
            credentials: sdk.credentials_provider(),
            announced: AtomicBool::new(false),
            settings,
            stats: Stats::default(),
            pinned: Mutex::default(),
        }
    }

    /// What classification needs to know about this endpoint and the request's object.
    pub fn ctx<'a>(&'a self, uri: &'a S3Uri) -> Ctx<'a> {
        Ctx {
            endpoint: &self.endpoint,
            region: &self.region,
            custom_endpoint: self.custom_endpoint,
            bucket: &uri.bucket,
            key: &uri.key,
            pool: POD_MODE.load(Ordering::Relaxed),
        }
    }

    /// Classify a failed request on `uri`.
    pub fn classify<E>(
        &self,
        err: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
        uri: &S3Uri,
    ) -> Failure
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        classify::classify(err, &self.ctx(uri))
    }

    fn retrier(&self, op: &'static str, uri: &S3Uri) -> Retrier<'_> {
        Retrier {
            s3: self,
            op,
            uri: uri.to_string(),
            started: Instant::now(),
            attempt: 0,
            cleanup: false,
        }
    }

    /// For clean-up work (deletes, aborts) that must run even after an interrupt.
    fn cleanup_retrier(&self, op: &'static str, uri: &S3Uri) -> Retrier<'_> {
        Retrier {
            cleanup: true,
            ..self.retrier(op, uri)
        }
    }

    fn breaker_event(&self, ev: Option<Event>) {
        match ev {
            Some(Event::Opened { open_for }) => {
                self.stats.breaker_opened.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.endpoint, open_seconds = open_for.as_secs_f64(),
                    "S3 circuit breaker opened: {} keeps failing, so requests to it pause for {:.0}s at a time until it recovers",
                    self.endpoint, open_for.as_secs_f64());
            }
            Some(Event::HalfOpened) => {
                tracing::info!(endpoint = %self.endpoint, "S3 circuit breaker half-open: probing the endpoint")
            }
            Some(Event::Closed) => {
                self.stats.breaker_closed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.endpoint, "S3 circuit breaker closed: endpoint recovered");
            }
            None => {}
        }
    }

    /// HEAD an object.
    pub async fn head(&self, uri: &S3Uri) -> Result<ObjectMeta> {
        let mut r = self.retrier("HeadObject", uri);
        loop {
            r.admit().await?;
            let res = self
                .client
                .head_object()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .send()
                .await;
            match res {
                Ok(o) => {
                    r.succeeded();
                    return Ok(ObjectMeta {
                        size: o.content_length().unwrap_or(0).max(0) as u64,
                        etag: o.e_tag().unwrap_or_default().to_string(),
                        last_modified: o.last_modified().map(|t| t.secs()),
                    });
                }
                Err(e) => {
                    let mut f = self.classify(&e, uri);
                    // A HEAD answer has no body, so a missing bucket looks like a missing key: ask.
                    if f.kind == StorageKind::NotFound && !self.bucket_exists(&uri.bucket).await {
                        f = classify::classify_reply(404, "NoSuchBucket", "", None, &self.ctx(uri));
                    } else if !f.retryable && f.kind != StorageKind::NotFound && no_code(&e) {
                        // A 403 or 400 without a body cannot tell a wrong secret from a denied policy or a
                        // wrong region: a one-byte GET of the same object brings S3's error code.
                        if let Some(better) = self.explain_by_get(uri).await {
                            f = better;
                        }
                    }
                    r.failed(f, false).await?
                }
            }
        }
    }

    /// Whether a bucket exists (HeadBucket); `true` when the answer is anything but 404.
    async fn bucket_exists(&self, bucket: &str) -> bool {
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => true,
            Err(e) => {
                let u = S3Uri {
                    bucket: bucket.into(),
                    key: String::new(),
                };
                self.classify(&e, &u).kind != StorageKind::NotFound
            }
        }
    }

    /// The failure a one-byte GET of `uri` reports, when it fails with an S3 error code.
    async fn explain_by_get(&self, uri: &S3Uri) -> Option<Failure> {
        let res = self
            .client
            .get_object()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .range("bytes=0-0")
            .send()
            .await;
        match res {
            Err(e) if !no_code(&e) => Some(self.classify(&e, uri)),
            _ => None,
        }
    }

    /// HEAD once per process and URI; later calls return the same version.
    pub async fn pin(&self, uri: &S3Uri) -> Result<ObjectMeta> {
        let key = uri.to_string();
        if let Some(m) = self
            .pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(m.clone());
        }
        let m = self.head(uri).await?;
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(m.clone());
        Ok(m)
    }

    /// Forget pinned versions (a long-lived worker calls this between jobs).
    pub fn unpin_all(&self) {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Fetch `[start, start+len)` of a pinned object into memory (see [`S3::stream_range`]).
    pub async fn fetch_range(
        &self,
        uri: &S3Uri,
        meta: &ObjectMeta,
        start: u64,
        len: u64,
    ) -> Result<Bytes> {
        let mut buf = BytesMut::with_capacity(len as usize);
        self.stream_range(uri, meta, start, len, &mut |c: &[u8]| {
            buf.extend_from_slice(c);
            Ok(())
        })
        .await?;
        Ok(buf.freeze())
    }

    /// Deliver `[start, start+len)` of a pinned object to `sink`, in order, as it arrives. A body that breaks
    /// off or stalls is resumed from the last byte delivered; a different ETag is an error
    /// (`StorageKind::Changed`), never mixed bytes.
    pub async fn stream_range(
        &self,
        uri: &S3Uri,
        meta: &ObjectMeta,
        start: u64,
        len: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<()> + Send),
    ) -> Result<()> {
        let mut done = 0u64;
        if len == 0 {
            return Ok(());
        }
        let mut r = self.retrier("GetObject", uri);
        loop {
            r.admit().await?;
            let from = start + done;
            let to = start + len - 1;
            let mut req = self
                .client
                .get_object()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .range(format!("bytes={from}-{to}"));
            if !meta.etag.is_empty() {
                req = req.if_match(&meta.etag);
            }
            let out = match req.send().await {
                Ok(o) => o,
                Err(e) => {
                    let f = self.classify(&e, uri);
                    if !f.retryable && !meta.etag.is_empty() {
                        // A range past the end (416), a missing key (404) or a failed If-Match (412) on a
                        // pinned object: say whether it is because the object changed.
                        match self.head(uri).await {
                            Ok(now) if now.etag != meta.etag => {
                                return Err(changed(uri, &meta.etag, &now.etag))
                            }
                            Err(Error::Storage {
                                kind: StorageKind::NotFound,
                                ..
                            }) => return Err(changed(uri, &meta.etag, "(deleted)")),
                            _ => {}
                        }
                    }
                    r.failed(f, false).await?;
                    continue;
                }
            };
            if let Some(tag) = out.e_tag() {
                if !meta.etag.is_empty() && tag != meta.etag {
                    return Err(changed(uri, &meta.etag, tag));
                }
            }
            let mut body = out.body;
            let before = done;
            // One timer for the whole body, pushed back only when it fires after progress: a per-chunk timeout
            // would cost a timer registration per few KiB.
            let idle = self.settings.body_timeout;
            let mut last = Instant::now();
            let timer = tokio::time::sleep(idle);
            tokio::pin!(timer);
            let failure = loop {
                let next = tokio::select! {
                    biased;
                    n = body.next() => Ok(n),
                    () = &mut timer => {
                        if last.elapsed() < idle {
                            timer.as_mut().reset((last + idle).into());
                            continue;
                        }
                        Err(())
                    }
                };
                if matches!(next, Ok(Some(Ok(_)))) {
                    last = Instant::now();
                }
                match next {
                    Ok(Some(Ok(chunk))) => {
                        self.stats
                            .bytes_downloaded
                            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        if done + chunk.len() as u64 > len {
                            break Some(Failure::fatal(
                                StorageKind::Other,
                                "the store sent more bytes than the range asked for",
                            ));
                        }
                        sink(&chunk)?;
                        done += chunk.len() as u64;
                    }
                    Ok(None) if done == len => break None,
                    Ok(None) => {
                        break Some(Failure::transient(format!(
                            "response body ended after {} of {} bytes",
                            done, len
                        )))
                    }
                    Ok(Some(Err(e))) => {
                        break Some(Failure::transient(format!(
                            "connection broke mid-body after {} of {} bytes: {}",
                            done,
                            len,
                            classify::chain_text(&e)
                        )))
                    }
                    Err(_) => {
                        break Some(Failure::transient(format!(
                            "response body stalled for {:.0}s after {} of {} bytes",
                            self.settings.body_timeout.as_secs_f64(),
                            done,
                            len
                        )))
                    }
                }
            };
            match failure {
                None => {
                    r.succeeded();
                    return Ok(());
                }
                Some(f) => r.failed(f, done > before).await?,
            }
        }
    }

    /// Forget pinned versions under a prefix (a worker's ledger objects, once a task is done with them).
    pub fn unpin_prefix(&self, prefix: &S3Uri) {
        let p = prefix.to_string();
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| !k.starts_with(&p));
    }

    /// Read a small object whole (a ledger record); `None` when it does not exist.
    pub async fn get_small(&self, uri: &S3Uri) -> Result<Option<Bytes>> {
        let mut r = self.retrier("GetObject", uri);
        loop {
            r.admit().await?;
            let res = self
                .client
                .get_object()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .send()
                .await;
            match res {
                Ok(o) => match o.body.collect().await {
                    Ok(b) => {
                        r.succeeded();
                        return Ok(Some(b.into_bytes()));
                    }
                    Err(e) => {
                        r.failed(
                            Failure::transient(format!("connection broke mid-body: {e}")),
                            false,
                        )
                        .await?
                    }
                },
                Err(e) => {
                    let f = self.classify(&e, uri);
                    if f.kind == StorageKind::NotFound {
                        r.succeeded();
                        return Ok(None);
                    }
                    r.failed(f, false).await?
                }
            }
        }
    }

    /// Write a small object in one PUT (a ledger record).
    pub async fn put_small(self: &Arc<Self>, uri: &S3Uri, data: Bytes) -> Result<()> {
        let mut up = writer::Upload::new(self.clone(), uri.clone(), Some(data.len() as u64));
        let res = up.write(data).await;
        match res {
            Ok(()) => up.finish().await.map(drop),
            Err(e) => {
                up.abort().await;
                Err(e)
            }
        }
    }

    /// Every object under a prefix (ListObjectsV2, all pages).
    pub async fn list(&self, prefix: &S3Uri) -> Result<Vec<S3Uri>> {
        Ok(self
            .list_objects(prefix)
            .await?
            .into_iter()
            .map(|o| o.uri)
            .collect())
    }

    /// Every object under a prefix with its size and time (ListObjectsV2, all pages).
    pub async fn list_objects(&self, prefix: &S3Uri) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut r = self.retrier("ListObjectsV2", prefix);
            let page = loop {
                r.admit().await?;
                let res = self
                    .client
                    .list_objects_v2()
                    .bucket(&prefix.bucket)
                    .prefix(&prefix.key)
                    .set_continuation_token(token.clone())
                    .send()
                    .await;
                match res {
                    Ok(p) => {
                        r.succeeded();
                        break p;
                    }
                    Err(e) => r.failed(self.classify(&e, prefix), false).await?,
                }
            };
            out.extend(page.contents().iter().filter_map(|o| {
                o.key().map(|k| Listed {
                    uri: S3Uri {
                        bucket: prefix.bucket.clone(),
                        key: k.to_string(),
                    },
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified: o.last_modified().map_or(0, |t| t.secs()),
                })
            }));
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    /// Whether an object exists (HEAD); a missing bucket or a denied request is an error.
    pub async fn exists(&self, uri: &S3Uri) -> Result<bool> {
        Ok(self.head_opt(uri).await?.is_some())
    }

    /// HEAD, with a missing object as `None`; a missing bucket or a denied request is an error.
    pub async fn head_opt(&self, uri: &S3Uri) -> Result<Option<ObjectMeta>> {
        match self.head(uri).await {
            Ok(m) => Ok(Some(m)),
            Err(Error::Storage {
                kind: StorageKind::NotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write a small marker object and answer the store's clock at that moment (its LastModified), so
    /// that times compared with the store's own are never this machine's.
    pub async fn stamp(self: &Arc<Self>, uri: &S3Uri) -> Result<i64> {
        self.put_small(uri, Bytes::from_static(b"{}")).await?;
        self.head(uri)
            .await?
            .last_modified
            .ok_or_else(|| Error::Storage {
                uri: uri.to_string(),
                what: "no time in the store's answer".into(),
                kind: StorageKind::Unavailable,
                detail: "HeadObject gave no Last-Modified".into(),
            })
    }

    /// Delete every object under a prefix; returns how many.
    pub async fn delete_prefix(&self, prefix: &S3Uri) -> Result<usize> {
        let all = self.list(prefix).await?;
        for o in &all {
            self.delete(o).await?;
        }
        self.unpin_prefix(prefix);
        Ok(all.len())
    }

    /// Delete an object (cleanup of outputs that must not stay half-published).
    pub async fn delete(&self, uri: &S3Uri) -> Result<()> {
        let mut r = self.cleanup_retrier("DeleteObject", uri);
        loop {
            r.admit().await?;
            match self
                .client
                .delete_object()
                .bucket(&uri.bucket)
                .key(&uri.key)
                .send()
                .await
            {
                Ok(_) => {
                    r.succeeded();
                    return Ok(());
                }
                Err(e) => r.failed(self.classify(&e, uri), false).await?,
            }
        }
    }
}

/// A service error that carries no S3 error code (HEAD answers have no body).
fn no_code<E: aws_sdk_s3::error::ProvideErrorMetadata>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    match e {
        aws_sdk_s3::error::SdkError::ServiceError(se) => {
            se.err().code().is_none() && se.raw().headers().get("x-amz-bucket-region").is_none()
        }
        _ => false,
    }
}

/// What an operation does, in words: "cannot read", "cannot write".
fn doing(op: &str) -> &'static str {
    match op {
        "HeadObject" | "GetObject" => "cannot read",
        "ListObjectsV2" => "cannot list",
        "DeleteObject" => "cannot delete",
        "AbortMultipartUpload" => "cannot abort the upload",
        _ => "cannot write",
    }
}

fn changed(uri: &S3Uri, pinned: &str, now: &str) -> Error {
    Error::Storage {
        uri: uri.to_string(),
        what: "object changed while it was being read".into(),
        kind: StorageKind::Changed,
        detail: format!("ETag was {pinned}, is now {now}; re-run the job on the new version"),
    }
}

/// One operation's attempts: breaker admission, failure classification, backoff with jitter, budget.
struct Retrier<'a> {
    s3: &'a S3,
    op: &'static str,
    uri: String,
    started: Instant,
    attempt: u32,
    cleanup: bool,
}

impl Retrier<'_> {
    fn give_up(&self, f: &Failure, why: &str) -> Error {
        Error::Storage {
            uri: self.uri.clone(),
            what: doing(self.op).to_string(),
            kind: f.kind,
            detail: format!("{}{why}", f.detail),
        }
    }

    /// Wait until the breaker lets a request out (or the budget or the process ends).
    async fn admit(&mut self) -> Result<()> {
        loop {
            if interrupted() && !self.cleanup {
                return Err(Error::Cancelled);
            }
            let (verdict, ev) = self
                .s3
                .breaker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .admit(Instant::now());
            self.s3.breaker_event(ev);
            match verdict {
                Ok(()) => {
                    self.s3.stats.requests.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(wait) => {
                    if self.started.elapsed() + wait > self.s3.settings.retry_budget {
                        return Err(self.give_up(
                            &Failure::transient(format!(
                                "{} kept failing and its circuit breaker is open",
                                self.s3.endpoint
                            )),
                            &format!(
                                " (gave up after {:.0}s, the retry budget: TESSERA_S3_RETRY_SECONDS)",
                                self.started.elapsed().as_secs_f64()
                            ),
                        ));
                    }
                    self.sleep(wait).await?;
                }
            }
        }
    }

    fn succeeded(&self) {
        self.s3.announced.store(false, Ordering::Relaxed);
        let ev = self
            .s3
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .success();
        self.s3.breaker_event(ev);
    }

    /// Record a failed attempt; `Ok` after sleeping when another attempt is worth making. An attempt that
    /// made progress (bytes received) does not count against the attempt limit.
    async fn failed(&mut self, mut f: Failure, progressed: bool) -> Result<()> {
        // A name that does not resolve or a refused connection is a mistake in local mode, and retried only
        // for the grace period in a worker pod (where DNS and services may still be settling).
        if matches!(
            f.kind,
            StorageKind::EndpointUnresolvable | StorageKind::Refused
        ) && self.started.elapsed() >= self.s3.settings.network_grace
        {
            f.retryable = false;
        }
        {
            let mut b = self.s3.breaker.lock().unwrap_or_else(|p| p.into_inner());
            // A 4xx means the endpoint is up and answering: only transient failures count against it.
            let ev = if f.retryable {
                b.failure(Instant::now())
            } else {
                b.success()
            };
            drop(b);
            self.s3.breaker_event(ev);
        }
        if !f.retryable {
            let why = if self.attempt > 0 {
                format!(
                    " (gave up after {} attempts in {:.0}s)",
                    self.attempt + 1,
                    self.started.elapsed().as_secs_f64()
                )
            } else {
                String::new()
            };
            return Err(self.give_up(&f, &why));
        }
        if progressed {
            self.attempt = 0;
        }
        if self.attempt + 1 >= self.s3.settings.max_attempts {
            return Err(self.give_up(
                &f,
                &format!(
                    " (gave up after {} attempts in {:.0}s: TESSERA_S3_MAX_ATTEMPTS)",
                    self.attempt + 1,
                    self.started.elapsed().as_secs_f64()
                ),
            ));
        }
        let delay = self
            .s3
            .settings
            .backoff
            .delay(self.attempt, fastrand::f64());
        let budget = self.s3.settings.retry_budget;
        if self.started.elapsed() + delay > budget {
            return Err(self.give_up(
                &f,
                &format!(
                    " (gave up after {:.0}s, the retry budget: TESSERA_S3_RETRY_SECONDS)",
                    self.started.elapsed().as_secs_f64()
                ),
            ));
        }
        self.attempt += 1;
        self.s3.stats.retries.fetch_add(1, Ordering::Relaxed);
        // One line per outage at default verbosity: what is retried, for how long at most, how to stop it.
        if !self.cleanup && !self.s3.announced.swap(true, Ordering::Relaxed) {
            tracing::warn!(op = self.op, uri = %self.uri,
                "{}: {}; retrying for up to {:.0}s (TESSERA_S3_RETRY_SECONDS sets this; {})",
                self.uri, f.detail, budget.as_secs_f64(),
                if POD_MODE.load(Ordering::Relaxed) { "the task fails after that and is retried elsewhere" } else { "Ctrl-C stops" });
        }
        tracing::info!(op = self.op, uri = %self.uri, attempt = self.attempt, delay_ms = delay.as_millis() as u64,
            error = %f.detail, "S3 request failed; retrying");
        self.sleep(delay).await
    }

    async fn sleep(&self, d: Duration) -> Result<()> {
        if self.cleanup {
            tokio::time::sleep(d).await;
            Ok(())
        } else {
            sleep_or_cancel(d).await
        }
    }
}

async fn sleep_or_cancel(d: Duration) -> Result<()> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = cancel_token().cancelled() => Err(Error::Cancelled),
    }
}

/// Run a future on the S3 runtime from a plain (non-async) thread.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = S3Uri::parse("s3://b/a/b.mp4").unwrap();
        assert_eq!((u.bucket.as_str(), u.key.as_str()), ("b", "a/b.mp4"));
        assert_eq!(S3Uri::parse("s3://b").unwrap().key, "");
        assert!(S3Uri::parse("s3:///k").is_none());
        assert!(S3Uri::parse("file:///k").is_none());
        let p = S3Uri::parse("s3://b/out/").unwrap();
        assert_eq!(p.join("x/y.ts").to_string(), "s3://b/out/x/y.ts");
        assert_eq!(
            S3Uri::parse("s3://b/out").unwrap().join("y").to_string(),
            "s3://b/out/y"
        );
        assert_eq!(S3Uri::parse("s3://b").unwrap().join("y").key, "y");
    }
}
