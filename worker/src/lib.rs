//! The `tessera` binary's parts beyond the engine: the cluster's worker agent (`pod`: lease, heartbeat,
//! report), the tasks it runs against the job's S3 ledger (`task`), `tessera doctor`'s checks and the chart's
//! `helm test` (`release_test`). The media
//! engine and its S3 I/O are `tessera-engine`.

pub mod doctor;
pub mod logging;
pub mod metrics;
pub mod pod;
pub mod release_test;
pub mod task;

pub use tessera_engine::{Error, Result};
