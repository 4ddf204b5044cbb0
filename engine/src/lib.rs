//! Tessera's media engine: probe, plan, encode chunks, encode audio, stitch and package, measure quality;
//! and the S3 streaming I/O it reads inputs and writes outputs with (`s3`). The `tessera` binary, its worker
//! agent and its checks live in `tessera-worker`.

pub mod audio;
pub mod avlog;
pub mod chunk;
pub mod cmaf;
pub mod encode;
pub mod error;
pub mod fmp4;
pub mod fuzzing;
pub mod hwdec;
pub mod job;
pub mod ladder;
pub mod packets;
pub mod plan;
pub mod probe;
pub mod quality;
pub mod s3;
pub mod scale;
pub mod stitch;
pub mod streams;
pub mod subtitles;
pub mod target;
pub mod thumbnails;
pub mod vmaf;

pub use error::{Error, Result};
