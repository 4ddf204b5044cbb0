//! The operator's parts. The decisions are pure (`autoscale`, `podspec`, `queue`, `jobrun`, `status`); `core`
//! owns the leader's state in one task that applies typed commands; `api` serves the queue to workers over
//! HTTP (the messages are `tessera_crds::protocol`'s), authenticating them with Kubernetes TokenReview;
//! `controller` runs the reconcilers on the elected leader (`leader`).

pub mod api;
pub mod autoscale;
pub mod controller;
pub mod core;
pub mod crds;
pub mod error;
pub mod fuzzing;
pub mod jobrun;
pub mod leader;
pub mod metrics;
pub mod podspec;
pub mod queue;
pub mod status;

pub use error::Error;
