//! The `tessera` binary's parts beyond the engine: the cluster's worker agent (`pod`: lease, heartbeat,
//! report), the tasks it runs against the job's S3 ledger (`task`), and `tessera doctor`'s checks. The media
//! engine and its S3 I/O are `tessera-engine`.

pub mod doctor;
pub mod pod;
pub mod task;

pub use tessera_engine::{Error, Result};
