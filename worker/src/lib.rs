//! Tessera's media engine: probe, plan, encode chunks, encode audio, stitch, measure quality.

pub mod audio;
pub mod avlog;
pub mod chunk;
pub mod cmaf;
pub mod doctor;
pub mod encode;
pub mod error;
pub mod fmp4;
pub mod fuzzing;
pub mod hwdec;
pub mod job;
pub mod packets;
pub mod plan;
pub mod pod;
pub mod probe;
pub mod quality;
pub mod s3;
pub mod scale;
pub mod stitch;
pub mod streams;
pub mod subtitles;
pub mod task;
pub mod thumbnails;

pub use error::{Error, Result};
