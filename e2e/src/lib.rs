//! End-to-end test fixtures. `s3server` starts a real S3-compatible server (s3s-fs) over HTTP on loopback;
//! `faultproxy` sits between a client and it and injects the faults object storage really has: 5xx and 503
//! bursts, connections reset mid-body, stalls, bandwidth limits and outages. The engine's end-to-end tests are
//! in `worker/tests/`; `cluster` is the local Kubernetes the operator's run on.

pub mod argocd;
pub mod cluster;
pub mod faultproxy;
pub mod flux;
pub mod jobs;
pub mod load;
pub mod monitoring;
pub mod players;
pub mod s3server;

/// `kubectl`: the machine's, or the one `scripts/k8s-tools.sh` put in the cache.
pub fn kubectl_bin() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("kubectl").is_file()))
        .unwrap_or(false);
    if on_path {
        return "kubectl".into();
    }
    s3server::cache_dir().join("kubectl-helm-2.2.2/bin/kubectl")
}
