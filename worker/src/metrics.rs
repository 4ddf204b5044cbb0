//! A worker pod's `/metrics` (OpenMetrics text): tasks by kind and outcome and their durations, frames
//! encoded and the last chunk's speed, encoder fallbacks by reason, and the S3 client's requests, retries and
//! bytes. Served on `TESSERA_METRICS_ADDR` (default: the pod's IP, port 9090) in worker mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tessera_engine::s3::StatsSnapshot;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    encoder: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

/// Task duration buckets (seconds): a chunk takes seconds to minutes, a plan or stitch less.
const DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

/// What a worker counts; cheap to clone (every metric is shared).
#[derive(Clone)]
pub struct WorkerMetrics {
    tasks: Family<TaskLabels, Counter>,
    durations: Family<KindLabel, Histogram>,
    frames: Counter,
    last_fps: Arc<AtomicU64>,
    busy: Gauge,
    slots: i64,
}

/// How a task ended, for `tessera_worker_tasks_total{outcome}`.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Completed,
    Failed,
    /// Stopped early (cancelled, lease lost, drained) and handed back.
    Released,
}

impl WorkerMetrics {
    pub fn new(slots: usize) -> Self {
        WorkerMetrics {
            tasks: Family::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            frames: Counter::default(),
            last_fps: Arc::new(AtomicU64::new(0f64.to_bits())),
            busy: Gauge::default(),
            slots: slots as i64,
        }
    }

    /// A task started (a slot is busy until `finished`).
    pub fn started(&self) {
        self.busy.inc();
    }

    /// A task ended: `kind` as the protocol names it (`chunk`, `plan`, ...), its frames (chunk tasks).
    pub fn finished(&self, kind: &str, outcome: Outcome, seconds: f64, frames: u64) {
        self.busy.dec();
        let outcome = match outcome {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Released => "released",
        };
        self.tasks
            .get_or_create(&TaskLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
        self.durations
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(seconds);
        if frames > 0 {
            self.frames.inc_by(frames);
            if seconds > 0.0 {
                self.last_fps
                    .store((frames as f64 / seconds).to_bits(), Ordering::Relaxed);
            }
        }
    }

    /// The exposition, with the process-wide encoder fallbacks and S3 counters read now.
    pub fn render(&self, s3: Option<StatsSnapshot>) -> String {
        let mut reg = Registry::with_prefix("tessera_worker");
        reg.register(
            "tasks",
            "Tasks this worker ran, by kind and outcome",
            self.tasks.clone(),
        );
        reg.register(
            "task_duration_seconds",
            "Time a task took on this worker, by kind",
            self.durations.clone(),
        );
        reg.register(
            "frames_encoded",
            "Video frames encoded by chunk tasks",
            self.frames.clone(),
        );
        reg.register(
            "encode_fps",
            "Frames per second of the last chunk task (all its renditions)",
            ConstGauge::new(f64::from_bits(self.last_fps.load(Ordering::Relaxed))),
        );
        reg.register("busy_slots", "Task slots running a task", self.busy.clone());
        reg.register(
            "slots",
            "Task slots (tasksPerWorker)",
            ConstGauge::new(self.slots),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        for (encoder, reason, n) in tessera_engine::encode::fallbacks() {
            fallbacks
                .get_or_create(&FallbackLabels {
                    encoder,
                    reason: reason.into(),
                })
                .inc_by(n);
        }
        reg.register(
            "encoder_fallbacks",
            "Encoders that did not open and were passed over for the next candidate, by reason",
            fallbacks,
        );
        let s = s3.unwrap_or_default();
        reg.register(
            "s3_requests",
            "S3 requests sent",
            ConstCounter::new(s.requests),
        );
        reg.register(
            "s3_retries",
            "S3 requests retried after a transient failure",
            ConstCounter::new(s.retries),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        for (direction, n) in [
            ("download", s.bytes_downloaded),
            ("upload", s.bytes_uploaded),
        ] {
            bytes
                .get_or_create(&DirectionLabel {
                    direction: direction.into(),
                })
                .inc_by(n);
        }
        reg.register("s3_bytes", "Bytes moved to and from S3", bytes);
        let mut out = String::new();
        let _ = encode(&mut out, &reg);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_frames_and_s3_counters_are_exported() {
        let m = WorkerMetrics::new(2);
        m.started();
        m.finished("chunk", Outcome::Completed, 2.0, 100);
        m.started();
        m.finished("stitch", Outcome::Failed, 0.5, 0);
        m.started();
        let text = m.render(Some(StatsSnapshot {
            requests: 7,
            retries: 2,
            bytes_downloaded: 1000,
            bytes_uploaded: 500,
            ..StatsSnapshot::default()
        }));
        for want in [
            r#"tessera_worker_tasks_total{kind="chunk",outcome="completed"} 1"#,
            r#"tessera_worker_tasks_total{kind="stitch",outcome="failed"} 1"#,
            "tessera_worker_frames_encoded_total 100",
            "tessera_worker_encode_fps 50.0",
            "tessera_worker_busy_slots 1",
            "tessera_worker_slots 2",
            "tessera_worker_s3_requests_total 7",
            "tessera_worker_s3_retries_total 2",
            r#"tessera_worker_s3_bytes_total{direction="download"} 1000"#,
            r#"tessera_worker_task_duration_seconds_count{kind="chunk"} 1"#,
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }

    /// A real encoder choice on this machine (no NVENC device): `hardware: auto` passes the NVENC encoder
    /// over for the software one, and the fallback is counted with its reason.
    #[test]
    fn a_hardware_encoder_passed_over_is_counted_by_reason() {
        let r: tessera_crds::Rendition =
            serde_yaml::from_str("{name: m, video: {codec: h264, height: 240}}").unwrap();
        let t = tessera_engine::encode::VideoTarget::plain(320, 240);
        let chosen =
            tessera_engine::encode::select(&r, tessera_crds::Hardware::Auto, &t, 8, None).unwrap();
        let text = WorkerMetrics::new(1).render(None);
        let counted: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tessera_worker_encoder_fallbacks_total{"))
            .collect();
        if chosen.name == "libx264" {
            assert!(
                counted
                    .iter()
                    .any(|l| l.contains(r#"encoder="h264_nvenc""#)),
                "{text}"
            );
        }
        for l in counted {
            assert!(
                ["not_built_in", "no_device", "open_failed"]
                    .iter()
                    .any(|r| l.contains(&format!("reason=\"{r}\""))),
                "{l}"
            );
        }
    }
}
