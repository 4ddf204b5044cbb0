//! `/metrics` in the Prometheus text format, rendered from live state at each scrape: queue depth per pool
//! and priority (what KEDA or an HPA on external metrics can scale on), leases, task outcomes, status
//! writes, jobs by stage, leadership.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::controller::Ctx;
use crate::core::{Shared, Snapshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolPriority {
    pool: String,
    priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

/// `snap` is what the state's owner answered (`Cmd::Snapshot`); `shared` its lock-free counters.
pub fn render(shared: &Shared, snap: &Snapshot, ctx: Option<&Ctx>) -> String {
    let mut reg = Registry::with_prefix("tessera");
    let queued = Family::<PoolPriority, Gauge>::default();
    let leased = Family::<PoolLabel, Gauge>::default();
    {
        for (pool, d) in snap.pools.iter().cloned() {
            leased
                .get_or_create(&PoolLabel { pool: pool.clone() })
                .set(d.leased as i64);
            if d.queued_by_priority.is_empty() {
                queued
                    .get_or_create(&PoolPriority {
                        pool: pool.clone(),
                        priority: "0".into(),
                    })
                    .set(0);
            }
            for (p, n) in d.queued_by_priority {
                queued
                    .get_or_create(&PoolPriority {
                        pool: pool.clone(),
                        priority: p.to_string(),
                    })
                    .set(n as i64);
            }
        }
    }
    reg.register("queue_queued_tasks", "Tasks waiting for a worker", queued);
    reg.register("queue_leased_tasks", "Tasks leased to workers", leased);
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let c = &shared.counters;
    reg.register(
        "leases",
        "Tasks leased",
        counter(c.leases.load(Ordering::Relaxed)),
    );
    reg.register(
        "tasks_completed",
        "Tasks completed",
        counter(c.completed.load(Ordering::Relaxed)),
    );
    reg.register(
        "chunks_reused",
        "Chunk and audio encodes not done again: found in the result store or the job's ledger, or made by an \
         identical task of another job at the same time",
        counter(c.chunks_reused.load(Ordering::Relaxed)),
    );
    reg.register(
        "results_collected",
        "Results deleted from result stores by collection tasks (not made or used for the pool's \
         resultRetentionSeconds, and needed by no running job)",
        counter(c.results_collected.load(Ordering::Relaxed)),
    );
    reg.register(
        "results_missing",
        "Chunk and audio results a stitch found gone from the result store, encoded again",
        counter(c.results_missing.load(Ordering::Relaxed)),
    );
    reg.register(
        "tasks_failed",
        "Tasks failed for good",
        counter(c.failed.load(Ordering::Relaxed)),
    );
    reg.register(
        "leases_expired",
        "Leases that ran out (worker lost)",
        counter(c.expired.load(Ordering::Relaxed)),
    );
    reg.register(
        "queue_requests_rejected",
        "Queue requests refused (401/403)",
        counter(c.rejected.load(Ordering::Relaxed)),
    );
    if let Some(rss) = resident_bytes() {
        let g = Gauge::<i64>::default();
        g.set(rss);
        reg.register(
            "process_resident_memory_bytes",
            "Resident memory of this operator process",
            g,
        );
    }
    let leader = Gauge::<i64>::default();
    leader.set(i64::from(shared.leader.load(Ordering::Relaxed)));
    reg.register("leader", "1 while this replica leads", leader);
    if let Some(ctx) = ctx {
        reg.register(
            "status_writes",
            "TranscodeJob status writes",
            counter(ctx.status_writes.load(Ordering::Relaxed)),
        );
        reg.register(
            "reconciles",
            "TranscodeJob reconciles",
            counter(ctx.reconciles.load(Ordering::Relaxed)),
        );
        reg.register(
            "reconcile_duration_seconds",
            "Time one TranscodeJob reconcile took (finalizer writes run beside it)",
            ctx.reconcile_seconds.clone(),
        );
        reg.register(
            "api_write_duration_seconds",
            "Time one finalizer write to the API server took",
            ctx.api_write_seconds.clone(),
        );
        let jobs = Family::<StageLabel, Gauge>::default();
        for (stage, n) in &snap.jobs_by_stage {
            jobs.get_or_create(&StageLabel {
                stage: (*stage).into(),
            })
            .set(*n as i64);
        }
        reg.register("jobs", "Jobs the leader tracks, by stage", jobs);
    }
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    out
}

/// Resident set size from `/proc/self/statm` (Linux; pages are 4 KiB on the platforms we ship).
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
