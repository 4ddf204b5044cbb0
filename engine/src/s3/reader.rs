//! A seekable, blocking reader over ranged GETs, for FFmpeg's custom I/O.
//!
//! Blocks are fetched ahead of the read position by tasks on the S3 runtime, so in steady state a read finds
//! its bytes already here. After a seek (or at the start) the first block is small and each next one twice as
//! large, up to `read_block`, and the window ahead grows the same way: a probe that jumps to an index at the end
//! of a multi-GiB object fetches kilobytes, and a sequential demux soon reads in large blocks. Memory is bounded
//! by `read_ahead + 1` blocks whatever the object's size.

use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::{cancel_token, runtime, ObjectMeta, S3Uri, S3};
use crate::error::{Error, Result};

const FIRST_BLOCK: u64 = 64 << 10;

struct Pending {
    start: u64,
    len: u64,
    task: JoinHandle<Result<Bytes>>,
}

pub struct S3Reader {
    s3: Arc<S3>,
    uri: S3Uri,
    meta: ObjectMeta,
    pos: u64,
    /// The block being read: (offset, bytes).
    current: Option<(u64, Bytes)>,
    /// Fetches ahead, contiguous, in order.
    window: VecDeque<Pending>,
    /// Where the next block to fetch starts, and its size.
    next_start: u64,
    next_len: u64,
    /// Blocks consumed since the last restart: the window grows with it.
    streak: usize,
    /// The first error, kept for a message better than FFmpeg's "I/O error".
    error: Option<Error>,
}

impl S3Reader {
    /// Open a pinned version of the object (see [`S3::pin`]).
    pub fn open(s3: Arc<S3>, uri: S3Uri) -> Result<Self> {
        let meta = runtime().block_on(s3.pin(&uri))?;
        Ok(Self {
            s3,
            uri,
            meta,
            pos: 0,
            current: None,
            window: VecDeque::new(),
            next_start: 0,
            next_len: FIRST_BLOCK,
            streak: 0,
            error: None,
        })
    }

    pub fn size(&self) -> u64 {
        self.meta.size
    }

    pub fn uri(&self) -> &S3Uri {
        &self.uri
    }

    /// The error that stopped reading, if any (taken once).
    pub fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }

    fn restart(&mut self, at: u64) {
        for p in self.window.drain(..) {
            p.task.abort();
        }
        self.next_start = at;
        self.next_len = FIRST_BLOCK;
        self.streak = 0;
    }

    fn refill(&mut self) {
        let max = self.s3.settings.read_block as u64;
        let ahead = (self.streak + 1).min(self.s3.settings.read_ahead);
        while self.window.len() < ahead && self.next_start < self.meta.size {
            let len = self.next_len.min(max).min(self.meta.size - self.next_start);
            let (s3, uri, meta, start) = (
                self.s3.clone(),
                self.uri.clone(),
                self.meta.clone(),
                self.next_start,
            );
            let task =
                runtime().spawn(async move { s3.fetch_range(&uri, &meta, start, len).await });
            self.window.push_back(Pending { start, len, task });
            self.next_start += len;
            self.next_len = (self.next_len * 2).min(max);
        }
    }

    /// Wait for a fetch, or for an interrupt (which aborts it).
    fn wait(&mut self, mut task: JoinHandle<Result<Bytes>>) -> Result<Bytes> {
        let joined = runtime().block_on(async {
            tokio::select! {
                r = &mut task => Some(r),
                () = cancel_token().cancelled() => None,
            }
        });
        match joined {
            None => {
                task.abort();
                Err(Error::Cancelled)
            }
            Some(Ok(res)) => res,
            Some(Err(e)) => Err(Error::Storage {
                uri: self.uri.to_string(),
                what: "read task failed".into(),
                kind: crate::error::StorageKind::Other,
                detail: e.to_string(),
            }),
        }
    }

    /// Make `current` hold the block containing `pos`.
    fn load(&mut self) -> Result<()> {
        let pos = self.pos;
        loop {
            match self.window.front() {
                Some(p) if p.start <= pos && pos < p.start + p.len => {
                    let p = self.window.pop_front().expect("front exists");
                    let data = self.wait(p.task)?;
                    self.current = Some((p.start, data));
                    self.streak += 1;
                    self.refill();
                    return Ok(());
                }
                // A short skip forward within the window: drop what is skipped, keep the rest.
                Some(p) if p.start + p.len <= pos && pos < self.next_start => {
                    let p = self.window.pop_front().expect("front exists");
                    p.task.abort();
                }
                _ => {
                    self.restart(pos);
                    self.refill();
                }
            }
        }
    }
}

impl Read for S3Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.error.is_some() {
            return Err(io::Error::other("an earlier read failed"));
        }
        if self.pos >= self.meta.size || buf.is_empty() {
            return Ok(0);
        }
        let inside = |c: &Option<(u64, Bytes)>, pos: u64| {
            c.as_ref()
                .is_some_and(|(s, b)| *s <= pos && pos < *s + b.len() as u64)
        };
        if !inside(&self.current, self.pos) {
            self.current = None;
            if let Err(e) = self.load() {
                let msg = e.to_string();
                self.error = Some(e);
                return Err(io::Error::other(msg));
            }
        }
        let (start, data) = self.current.as_ref().expect("loaded");
        let off = (self.pos - start) as usize;
        let n = buf.len().min(data.len() - off);
        buf[..n].copy_from_slice(&data[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for S3Reader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.meta.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(t) => {
                self.pos = t;
                Ok(t)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start",
            )),
        }
    }
}

impl Drop for S3Reader {
    fn drop(&mut self) {
        for p in self.window.drain(..) {
            p.task.abort();
        }
    }
}
