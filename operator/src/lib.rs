//! The operator's parts. The decisions are pure (`scale`, `podspec`, `queue`); `api` serves the queue to
//! workers over HTTP, authenticating them with Kubernetes TokenReview.

pub mod api;
pub mod podspec;
pub mod queue;
pub mod scale;
pub mod status;
