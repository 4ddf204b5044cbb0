//! Logging for the `tessera` and `tessera-cp` binaries: to stderr, as text or as one JSON object per line
//! (`--log-format json` or `TESSERA_LOG_FORMAT=json`), filtered by `RUST_LOG` or the given default.

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, span), for log pipelines.
    Json,
}

impl LogFormat {
    /// `TESSERA_LOG_FORMAT` (`json` or `text`); text when unset or unknown.
    pub fn from_env() -> Self {
        match std::env::var("TESSERA_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

pub fn init(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
