//! The operator crate's one error type; every variant says what was being done.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Config(String),
    /// The task that owns the leader's state has stopped (the process is ending).
    #[error("the operator's state owner has stopped")]
    Stopped,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn kube(what: String, source: kube::Error) -> Self {
        Self::Kube { what, source }
    }
}
