//! End-to-end tests against a real Kubernetes control plane live here (with the operator). The engine's
//! end-to-end tests, which need no cluster, are in `worker/tests/`.
