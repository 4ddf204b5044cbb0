//! Copies between files and objects, on the same reader and writer the engine uses: `tessera cp`, and the
//! upload of finished outputs.
//!
//! * file → s3: the file is read part by part into a streamed multipart upload.
//! * s3 → file: ranged GETs in parallel, written at their offsets into a temporary file beside the
//!   destination, renamed into place when complete (never a partial file under the final name).
//! * s3 → s3: ranged GETs in order, streamed into a multipart upload; nothing touches the disk.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::task::{JoinHandle, JoinSet};

use super::writer::{Upload, Written};
use super::{cancel_token, S3Uri, S3};
use crate::error::{Error, Result, StorageKind};

/// Downloads write to the file in batches of this size.
const WRITE_BATCH: usize = 1 << 20;

/// One end of a copy.
#[derive(Debug, Clone)]
pub enum Location {
    File(PathBuf),
    S3(S3Uri),
}

impl Location {
    pub fn parse(s: &str) -> Result<Self> {
        if s.starts_with("s3://") {
            return S3Uri::parse(s).map(Self::S3).ok_or_else(|| Error::Field {
                field: "URI".into(),
                message: format!("{s:?}: expected s3://bucket/key"),
            });
        }
        if let Some(p) = s.strip_prefix("file://") {
            return Ok(Self::File(PathBuf::from(p)));
        }
        if s.contains("://") {
            return Err(Error::Field {
                field: "URI".into(),
                message: format!("{s:?}: unsupported scheme; use a path, file:// or s3://"),
            });
        }
        Ok(Self::File(PathBuf::from(s)))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::S3(u) => write!(f, "{u}"),
        }
    }
}

/// Bytes moved so far and the total, for a progress bar.
#[derive(Debug, Default)]
pub struct CopyProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

fn read_err(path: &Path, source: std::io::Error) -> Error {
    Error::Read {
        path: path.into(),
        source,
    }
}

fn write_err(path: &Path, source: std::io::Error) -> Error {
    Error::Write {
        path: path.into(),
        source,
    }
}

/// Copy `src` to `dst`. Stops promptly, cleaning up, when the process is interrupted.
pub async fn copy(
    s3: &Arc<S3>,
    src: &Location,
    dst: &Location,
    progress: &CopyProgress,
) -> Result<u64> {
    let work = async {
        match (src, dst) {
            (Location::File(s), Location::S3(d)) => {
                upload_file(s3, s, d, progress).await.map(|w| w.bytes)
            }
            (Location::S3(s), Location::File(d)) => download_file(s3, s, d, progress).await,
            (Location::S3(s), Location::S3(d)) => {
                copy_object(s3, s, d, progress).await.map(|w| w.bytes)
            }
            (Location::File(_), Location::File(_)) => Err(Error::Field {
                field: "URI".into(),
                message: "one side of a copy must be s3://".into(),
            }),
        }
    };
    // Each copy watches for an interrupt itself, so that it can abort its upload before returning.
    work.await
}

/// Run `f` unless the process is interrupted first.
async fn or_cancel<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        r = f => r,
        _ = cancel_token().cancelled() => Err(Error::Cancelled),
    }
}

/// Finish the upload if `pumped` succeeded (and no interrupt came); abort it otherwise, and wait for that.
async fn conclude(up: &mut Upload, pumped: Result<()>) -> Result<Written> {
    let res = match pumped {
        Ok(()) => or_cancel(up.finish()).await,
        Err(e) => Err(e),
    };
    if res.is_err() {
        up.abort().await;
    }
    res
}

/// Upload a local file as one object.
pub async fn upload_file(
    s3: &Arc<S3>,
    src: &Path,
    dst: &S3Uri,
    progress: &CopyProgress,
) -> Result<Written> {
    let mut f = tokio::fs::File::open(src)
        .await
        .map_err(|e| read_err(src, e))?;
    let size = f.metadata().await.map_err(|e| read_err(src, e))?.len();
    progress.total.fetch_add(size, Ordering::Relaxed);
    let mut up = Upload::new(s3.clone(), dst.clone(), Some(size));
    let part = super::writer::part_size_for(Some(size), s3.settings.part_size as u64) as usize;
    let res = or_cancel(async {
        loop {
            let mut buf = bytes::BytesMut::with_capacity(part);
            while buf.len() < part {
                let n = f.read_buf(&mut buf).await.map_err(|e| read_err(src, e))?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                break;
            }
            let n = buf.len() as u64;
            up.write(buf.freeze()).await?;
            progress.done.fetch_add(n, Ordering::Relaxed);
            if (n as usize) < part {
                break;
            }
        }
        if up.written() != size {
            return Err(Error::media(
                src,
                "file changed while it was uploaded",
                format!("{} bytes read, {} expected", up.written(), size),
            ));
        }
        Ok(())
    })
    .await;
    conclude(&mut up, res).await
}

/// Download an object into a file; the file appears under its name only when complete.
pub async fn download_file(
    s3: &Arc<S3>,
    src: &S3Uri,
    dst: &Path,
    progress: &CopyProgress,
) -> Result<u64> {
    let meta = s3.pin(src).await?;
    progress.total.fetch_add(meta.size, Ordering::Relaxed);
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(&dir)
        .map_err(|e| write_err(dst, e))?;
    let file = Arc::new(tmp.as_file().try_clone().map_err(|e| write_err(dst, e))?);
    file.set_len(meta.size).map_err(|e| write_err(dst, e))?;
    let block = s3.settings.download_block as u64;
    let mut tasks: JoinSet<Result<u64>> = JoinSet::new();
    let mut offset = 0u64;
    let mut running = 0usize;
    let result: Result<()> = or_cancel(async {
        while offset < meta.size || running > 0 {
            while offset < meta.size && running < s3.settings.downloads_in_flight {
                let len = block.min(meta.size - offset);
                let (s3, src, meta, file, dst) = (
                    s3.clone(),
                    src.clone(),
                    meta.clone(),
                    file.clone(),
                    dst.to_path_buf(),
                );
                let at = offset;
                tasks.spawn(async move {
                    // Bytes go to the file as they arrive, a MiB at a time: memory does not grow with the
                    // range size. (Writes into the page cache are short enough to make on the runtime.)
                    let mut pending = bytes::BytesMut::with_capacity(WRITE_BATCH);
                    let mut pos = at;
                    let flush = |pending: &mut bytes::BytesMut, pos: &mut u64| -> Result<()> {
                        file.write_all_at(pending, *pos)
                            .map_err(|e| write_err(&dst, e))?;
                        *pos += pending.len() as u64;
                        pending.clear();
                        Ok(())
                    };
                    s3.stream_range(&src, &meta, at, len, &mut |c: &[u8]| {
                        pending.extend_from_slice(c);
                        if pending.len() >= WRITE_BATCH {
                            flush(&mut pending, &mut pos)?;
                        }
                        Ok(())
                    })
                    .await?;
                    flush(&mut pending, &mut pos)?;
                    Ok(len)
                });
                offset += len;
                running += 1;
            }
            match tasks.join_next().await {
                Some(Ok(Ok(n))) => {
                    running -= 1;
                    progress.done.fetch_add(n, Ordering::Relaxed);
                }
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(write_err(dst, std::io::Error::other(e))),
                None => break,
            }
        }
        Ok(())
    })
    .await;
    tasks.abort_all();
    result?;
    // No fsync: like cp, s5cmd and aws, the data reaches the disk on the kernel's schedule (an fsync of a
    // multi-GiB file costs seconds). The rename still guarantees no partial file under the final name
    // while the system is up.
    let written = file.metadata().map_err(|e| write_err(dst, e))?.len();
    if written != meta.size {
        return Err(Error::Storage {
            uri: src.to_string(),
            what: "download incomplete".into(),
            kind: StorageKind::Corrupt,
            detail: format!("{written} of {} bytes", meta.size),
        });
    }
    tmp.persist(dst).map_err(|e| write_err(dst, e.error))?;
    Ok(meta.size)
}

/// Stream one object into another: ranged GETs, several ahead, in order, into a multipart upload.
pub async fn copy_object(
    s3: &Arc<S3>,
    src: &S3Uri,
    dst: &S3Uri,
    progress: &CopyProgress,
) -> Result<Written> {
    let meta = s3.pin(src).await?;
    progress.total.fetch_add(meta.size, Ordering::Relaxed);
    let mut up = Upload::new(s3.clone(), dst.clone(), Some(meta.size));
    let block = super::writer::part_size_for(Some(meta.size), s3.settings.part_size as u64);
    let mut window: VecDeque<JoinHandle<Result<Bytes>>> = VecDeque::new();
    let mut offset = 0u64;
    let res: Result<()> = or_cancel(async {
        loop {
            while offset < meta.size && window.len() < s3.settings.downloads_in_flight {
                let len = block.min(meta.size - offset);
                let (s3, src, meta, at) = (s3.clone(), src.clone(), meta.clone(), offset);
                window.push_back(tokio::spawn(async move {
                    s3.fetch_range(&src, &meta, at, len).await
                }));
                offset += len;
            }
            let Some(next) = window.pop_front() else {
                break;
            };
            let data = next.await.map_err(|e| Error::Storage {
                uri: src.to_string(),
                what: "read task failed".into(),
                kind: StorageKind::Other,
                detail: e.to_string(),
            })??;
            let n = data.len() as u64;
            up.write(data).await?;
            progress.done.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    })
    .await;
    for t in window {
        t.abort();
    }
    conclude(&mut up, res).await
}

/// Keep a finished upload, or the first error.
fn record(
    r: std::result::Result<Result<Written>, tokio::task::JoinError>,
    dir: &Path,
    done: &mut Vec<Written>,
    result: &mut Result<()>,
) {
    match r {
        Ok(Ok(w)) => done.push(w),
        Ok(Err(e)) if result.is_ok() => *result = Err(e),
        Err(e) if result.is_ok() => *result = Err(write_err(dir, std::io::Error::other(e))),
        _ => {}
    }
}

/// Publish a finished output folder under an S3 prefix: media files first, then media playlists, then the
/// master playlist, so a player that finds a playlist finds everything it names. If any upload fails, the
/// objects already written are deleted again: the prefix holds the whole output or none of it.
pub async fn upload_tree(
    s3: &Arc<S3>,
    dir: &Path,
    prefix: &S3Uri,
    entry_points: &[String],
) -> Result<Vec<Written>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| read_err(&d, e))? {
            let e = e.map_err(|e| read_err(&d, e))?;
            let p = e.path();
            if e.file_type().map_err(|e| read_err(&p, e))?.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let rank = |p: &Path| {
        let rel = p
            .strip_prefix(dir)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned();
        if entry_points.contains(&rel) {
            2
        } else if rel.ends_with(".m3u8") {
            1
        } else {
            0
        }
    };
    files.sort_by_key(|p| (rank(p), p.clone()));
    let mut done: Vec<Written> = Vec::new();
    let mut result = Ok(());
    for stage in 0..3 {
        let mut set: JoinSet<Result<Written>> = JoinSet::new();
        for p in files.iter().filter(|p| rank(p) == stage) {
            let rel = p
                .strip_prefix(dir)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned();
            let (s3, p, dst) = (s3.clone(), p.clone(), prefix.join(&rel));
            // Two files at a time: each may hold `parts_in_flight` parts in memory.
            while set.len() >= 2 {
                if let Some(r) = set.join_next().await {
                    record(r, dir, &mut done, &mut result);
                }
            }
            if result.is_err() {
                break;
            }
            set.spawn(async move { upload_file(&s3, &p, &dst, &CopyProgress::default()).await });
        }
        while let Some(r) = set.join_next().await {
            record(r, dir, &mut done, &mut result);
        }
        if result.is_err() {
            break;
        }
    }
    if let Err(e) = result {
        for w in &done {
            if let Err(d) = s3.delete(&w.uri).await {
                tracing::warn!(uri = %w.uri, error = %d, "could not delete a published object after a failed publish");
            }
        }
        return Err(e);
    }
    Ok(done)
}
