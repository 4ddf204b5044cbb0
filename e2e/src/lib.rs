//! End-to-end test fixtures. `s3server` starts a real S3-compatible server (s3s-fs) over HTTP on loopback;
//! `faultproxy` sits between a client and it and injects the faults object storage really has: 5xx and 503
//! bursts, connections reset mid-body, stalls, bandwidth limits and outages. The engine's end-to-end tests are
//! in `worker/tests/`; the operator's will join them here.

pub mod faultproxy;
pub mod s3server;
