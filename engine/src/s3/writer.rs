//! Streamed multipart uploads.
//!
//! Bytes are cut into parts as they arrive; at most `parts_in_flight` parts upload at once (the writer waits
//! for one to finish before it takes more), so memory stays at about `(parts_in_flight + 1) * part_size`.
//! Every part carries Content-MD5 and its returned ETag is checked; the completed object's size and
//! composite ETag are checked too. An object smaller than one part goes up in one PUT. On any error, on
//! cancellation, or when dropped unfinished, the multipart upload is aborted: nothing half-written stays,
//! neither as a visible object nor as an orphaned upload.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use md5::{Digest, Md5};
use tokio::task::JoinSet;

use super::{Failure, S3Uri, S3};

/// Whether an ETag is an MD5 (of the object, or of its parts' MD5s), as S3's are; other stores' are not.
fn md5_like(etag: &str) -> bool {
    etag.len() >= 32 && etag[..32].chars().all(|c| c.is_ascii_hexdigit())
}

/// How long CompleteMultipartUpload may take to answer: S3 assembles the object first, which for a large one
/// "could take several minutes" (its documentation), far past the read timeout of other requests.
const COMPLETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
use crate::error::{Error, Result, StorageKind};

/// S3's limits.
pub const MAX_PARTS: u64 = 10_000;
pub const MIN_PART: u64 = 5 << 20;
pub const MAX_PART: u64 = 5 << 30;

/// Part size for an object of known size: the configured size, or larger so that it fits in 9,000 parts
/// (a margin under the 10,000 limit), rounded up to a MiB.
pub fn part_size_for(size: Option<u64>, configured: u64) -> u64 {
    let base = configured.clamp(MIN_PART, MAX_PART);
    match size {
        Some(n) => base
            .max(n.div_ceil(9_000).next_multiple_of(1 << 20))
            .min(MAX_PART),
        None => base,
    }
}

/// Part size of the `n`-th part (1-based) of an upload of unknown size: doubles every 1,000 parts, so
/// 10,000 parts of an 8 MiB start hold about 8 TiB.
pub fn part_size_at(n: u64, first: u64) -> u64 {
    (first << ((n.saturating_sub(1)) / 1000).min(10)).min(MAX_PART)
}

struct Part {
    number: i32,
    etag: String,
    md5: [u8; 16],
}

/// What a finished upload wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub uri: S3Uri,
    pub bytes: u64,
    pub etag: String,
    pub parts: usize,
}

pub struct Upload {
    s3: Arc<S3>,
    uri: S3Uri,
    known_size: bool,
    first_part: u64,
    upload_id: Option<String>,
    buf: BytesMut,
    next_part: i32,
    in_flight: JoinSet<Result<Part>>,
    done: Vec<Part>,
    written: u64,
    finished: bool,
}

fn hex_md5(d: &[u8; 16]) -> String {
    hex::encode(d)
}

fn unquote(s: &str) -> &str {
    s.trim_matches('"')
}

fn md5_of(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

impl Upload {
    /// Start writing `uri`. `size`, when known, picks a part size that fits the part limit.
    pub fn new(s3: Arc<S3>, uri: S3Uri, size: Option<u64>) -> Self {
        let first_part = part_size_for(size, s3.settings.part_size as u64);
        Self {
            s3,
            uri,
            known_size: size.is_some(),
            first_part,
            upload_id: None,
            buf: BytesMut::new(),
            next_part: 1,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            written: 0,
            finished: false,
        }
    }

    fn part_size(&self) -> usize {
        if self.known_size {
            self.first_part as usize
        } else {
            part_size_at(self.next_part as u64, self.first_part) as usize
        }
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Take more bytes; uploads whole parts as they fill, waiting while too many are in flight.
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        self.written += data.len() as u64;
        if self.buf.is_empty() && data.len() == self.part_size() {
            return self.send_part(data).await;
        }
        self.buf.extend_from_slice(&data);
        while self.buf.len() >= self.part_size() {
            let n = self.part_size();
            let part = self.buf.split_to(n).freeze();
            self.send_part(part).await?;
        }
        Ok(())
    }

    async fn create(&mut self) -> Result<String> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let mut r = self.s3.retrier("CreateMultipartUpload", &self.uri);
        loop {
            r.admit().await?;
            match self
                .s3
                .client
                .create_multipart_upload()
                .bucket(&self.uri.bucket)
                .key(&self.uri.key)
                .send()
                .await
            {
                Ok(o) => {
                    r.succeeded();
                    let id = o.upload_id().unwrap_or_default().to_string();
                    tracing::debug!(uri = %self.uri, upload_id = %id, "multipart upload started");
                    self.upload_id = Some(id.clone());
                    return Ok(id);
                }
                Err(e) => r.failed(self.s3.classify(&e, &self.uri), false).await?,
            }
        }
    }

    async fn reap_one(&mut self) -> Result<()> {
        match self.in_flight.join_next().await {
            Some(Ok(Ok(p))) => {
                self.done.push(p);
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(Error::Storage {
                uri: self.uri.to_string(),
                what: "part upload task failed".into(),
                kind: StorageKind::Other,
                detail: e.to_string(),
            }),
            None => Ok(()),
        }
    }

    async fn send_part(&mut self, data: Bytes) -> Result<()> {
        let id = self.create().await?;
        while self.in_flight.len() >= self.s3.settings.parts_in_flight {
            self.reap_one().await?;
        }
        if self.next_part as u64 > MAX_PARTS {
            return Err(Error::Storage {
                uri: self.uri.to_string(),
                what: "too large".into(),
                kind: StorageKind::Other,
                detail: format!("more than {MAX_PARTS} parts"),
            });
        }
        let number = self.next_part;
        self.next_part += 1;
        let (s3, uri) = (self.s3.clone(), self.uri.clone());
        self.in_flight
            .spawn(async move { upload_part(&s3, &uri, &id, number, data).await });
        Ok(())
    }

    /// Upload what is left, complete, and verify size and checksum. The object becomes visible here, whole.
    pub async fn finish(&mut self) -> Result<Written> {
        let res = self.finish_inner().await;
        if res.is_err() {
            self.abort_inner().await;
        }
        self.finished = true;
        res
    }

    async fn finish_inner(&mut self) -> Result<Written> {
        if self.upload_id.is_none() {
            let data = std::mem::take(&mut self.buf).freeze();
            return self.put_single(data).await;
        }
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf).freeze();
            self.send_part(last).await?;
        }
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        self.done.sort_by_key(|p| p.number);
        let id = self.upload_id.clone().expect("created");
        let parts: Vec<CompletedPart> = self
            .done
            .iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(&p.etag)
                    .build()
            })
            .collect();
        let mut all = Vec::with_capacity(self.done.len() * 16);
        for p in &self.done {
            all.extend_from_slice(&p.md5);
        }
        let expected = format!("{}-{}", hex_md5(&md5_of(&all)), self.done.len());
        let mut r = self.s3.retrier("CompleteMultipartUpload", &self.uri);
        let etag = loop {
            r.admit().await?;
            match self
                .s3
                .client
                .complete_multipart_upload()
                .bucket(&self.uri.bucket)
                .key(&self.uri.key)
                .upload_id(&id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts.clone()))
                        .build(),
                )
                // S3 may take minutes to assemble a large object before it answers.
                .customize()
                .config_override(
                    aws_sdk_s3::config::Builder::default().timeout_config(
                        aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                            .read_timeout(COMPLETE_TIMEOUT)
                            .operation_attempt_timeout(COMPLETE_TIMEOUT)
                            .build(),
                    ),
                )
                .send()
                .await
            {
                Ok(o) => {
                    r.succeeded();
                    break o.e_tag().unwrap_or_default().to_string();
                }
                Err(e) => {
                    let f = self.s3.classify(&e, &self.uri);
                    // A retried Complete whose first try succeeded (its answer lost) finds no upload any
                    // more: S3 says NoSuchUpload, some servers AccessDenied. The object is ours only if it
                    // carries this upload's ETag (or, where ETags are not MD5s, its size).
                    if r.attempt > 0
                        && (f.detail.contains("NoSuchUpload") || f.detail.contains("AccessDenied"))
                    {
                        if let Ok(m) = self.s3.head(&self.uri).await {
                            let got = unquote(&m.etag);
                            if got.eq_ignore_ascii_case(&expected)
                                || (!md5_like(got) && m.size == self.written)
                            {
                                tracing::info!(uri = %self.uri, "an earlier try of CompleteMultipartUpload had succeeded");
                                break m.etag;
                            }
                        }
                    }
                    r.failed(f, false).await?
                }
            }
        };
        self.upload_id = None;
        self.verify(&etag, &expected).await?;
        Ok(Written {
            uri: self.uri.clone(),
            bytes: self.written,
            etag,
            parts: self.done.len(),
        })
    }

    async fn put_single(&mut self, data: Bytes) -> Result<Written> {
        let md5 = md5_of(&data);
        let mut r = self.s3.retrier("PutObject", &self.uri);
        let etag = loop {
            r.admit().await?;
            match self
                .s3
                .client
                .put_object()
                .bucket(&self.uri.bucket)
                .key(&self.uri.key)
                .content_md5(base64::engine::general_purpose::STANDARD.encode(md5))
                .content_length(data.len() as i64)
                .body(ByteStream::from(data.clone()))
                .send()
                .await
            {
                Ok(o) => {
                    r.succeeded();
                    self.s3
                        .stats
                        .bytes_uploaded
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    break o.e_tag().unwrap_or_default().to_string();
                }
                Err(e) => r.failed(self.s3.classify(&e, &self.uri), false).await?,
            }
        };
        self.verify(&etag, &hex_md5(&md5)).await?;
        Ok(Written {
            uri: self.uri.clone(),
            bytes: data.len() as u64,
            etag,
            parts: 1,
        })
    }

    /// The object the store now holds must be what we wrote: its ETag must be our MD5 (or multipart
    /// composite) where the store's ETags are MD5s, otherwise its size must be ours (one HEAD). On a
    /// mismatch it is deleted and the write fails.
    async fn verify(&self, etag: &str, expected: &str) -> Result<()> {
        let got = unquote(etag);
        let problem = if md5_like(got) {
            (!got.eq_ignore_ascii_case(expected))
                .then(|| format!("ETag {got} does not match the {expected} computed while writing"))
        } else {
            tracing::debug!(uri = %self.uri, %etag, "store's ETag is not an MD5; verifying the size only");
            let head = self.s3.head(&self.uri).await?;
            (head.size != self.written).then(|| {
                format!(
                    "the store holds {} bytes, {} were written",
                    head.size, self.written
                )
            })
        };
        if let Some(detail) = problem {
            let _ = self.s3.delete(&self.uri).await;
            return Err(Error::Storage {
                uri: self.uri.to_string(),
                what: "verification after upload failed (object deleted)".into(),
                kind: StorageKind::Corrupt,
                detail,
            });
        }
        Ok(())
    }

    /// Give up: stop in-flight parts and abort the multipart upload.
    pub async fn abort(&mut self) {
        self.abort_inner().await;
        self.finished = true;
    }

    async fn abort_inner(&mut self) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        if let Some(id) = self.upload_id.take() {
            abort_upload(&self.s3, &self.uri, &id).await;
        }
    }
}

async fn abort_upload(s3: &S3, uri: &S3Uri, id: &str) {
    // Abort must happen even when the job was interrupted: use a retrier that ignores the interrupt flag
    // by making plain attempts with backoff.
    for attempt in 0..8u32 {
        match s3
            .client
            .abort_multipart_upload()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .upload_id(id)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(%uri, upload_id = %id, "multipart upload aborted");
                return;
            }
            Err(e) => {
                let f = s3.classify(&e, uri);
                if f.kind == StorageKind::NotFound || f.detail.contains("NoSuchUpload") {
                    return;
                }
                tracing::warn!(%uri, attempt, error = %f.detail, "abort of multipart upload failed; retrying");
                tokio::time::sleep(
                    s3.settings
                        .backoff
                        .delay(attempt + 2, 0.5 + fastrand::f64() / 2.0),
                )
                .await;
            }
        }
    }
    tracing::error!(%uri, upload_id = %id, "could not abort the multipart upload; a lifecycle rule must clean it up");
}

async fn upload_part(s3: &S3, uri: &S3Uri, id: &str, number: i32, data: Bytes) -> Result<Part> {
    let d = data.clone();
    let md5 = tokio::task::spawn_blocking(move || md5_of(&d))
        .await
        .map_err(|e| Error::Storage {
            uri: uri.to_string(),
            what: "checksum task failed".into(),
            kind: StorageKind::Other,
            detail: e.to_string(),
        })?;
    let content_md5 = base64::engine::general_purpose::STANDARD.encode(md5);
    let mut r = s3.retrier("UploadPart", uri);
    loop {
        r.admit().await?;
        let res = s3
            .client
            .upload_part()
            .bucket(&uri.bucket)
            .key(&uri.key)
            .upload_id(id)
            .part_number(number)
            .content_md5(&content_md5)
            .content_length(data.len() as i64)
            .body(ByteStream::from(data.clone()))
            .send()
            .await;
        match res {
            Ok(o) => {
                let etag = o.e_tag().unwrap_or_default().to_string();
                let got = unquote(&etag);
                if got.len() == 32 && !got.eq_ignore_ascii_case(&hex_md5(&md5)) {
                    r.failed(
                        Failure::transient(format!(
                            "part {number}: ETag {got} is not the part's MD5"
                        )),
                        false,
                    )
                    .await?;
                    continue;
                }
                r.succeeded();
                s3.stats
                    .bytes_uploaded
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                return Ok(Part { number, etag, md5 });
            }
            Err(e) => r.failed(s3.classify(&e, uri), false).await?,
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.in_flight.abort_all();
        if let Some(id) = self.upload_id.take() {
            let (s3, uri) = (self.s3.clone(), self.uri.clone());
            // Dropped unfinished (an error or cancellation elsewhere): abort in the background.
            super::runtime().spawn(async move { abort_upload(&s3, &uri, &id).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_fit_the_part_limit() {
        let mib = 1u64 << 20;
        assert_eq!(part_size_for(Some(0), 8 * mib), 8 * mib);
        assert_eq!(part_size_for(Some(1 << 30), 8 * mib), 8 * mib);
        // 1 TiB needs bigger parts: at most 9,000 of them.
        let p = part_size_for(Some(1 << 40), 8 * mib);
        assert!((1u64 << 40).div_ceil(p) <= 9_000, "{p}");
        assert_eq!(p % mib, 0);
        // Below the minimum is raised to S3's 5 MiB.
        assert_eq!(part_size_for(None, mib), 5 * mib);
        // Unknown size: 10,000 growing parts hold more than 5 TiB.
        let total: u64 = (1..=MAX_PARTS).map(|n| part_size_at(n, 8 * mib)).sum();
        assert!(total > 5 << 40, "{total}");
        assert_eq!(part_size_at(1, 8 * mib), 8 * mib);
        assert_eq!(part_size_at(1000, 8 * mib), 8 * mib);
        assert_eq!(part_size_at(1001, 8 * mib), 16 * mib);
    }
}
