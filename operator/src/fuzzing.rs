//! Fuzz entry points: the `fuzz/` targets (`make fuzz`, cargo fuzz) and the corpus replay test in `make test`
//! call these, so a crash the fuzzer found stays fixed.

use tessera_crds::protocol::{
    decode, CompleteRequest, FailRequest, HeartbeatRequest, LeaseReply, LeaseRequest,
    ReleaseRequest,
};
use tessera_crds::work::{TaskFailure, Work};

use crate::queue::{Queue, QueueConfig, Task};

/// Untrusted bytes as every message the queue API reads (request bodies, and the results inside them):
/// parsing ends in a value or an error, never a panic. Then the same bytes drive the queue as a script of
/// lease / heartbeat / complete / release / expire / cancel calls from several workers, and its books must
/// balance after each step.
pub fn queue_messages(data: &[u8]) {
    // Each message type of the protocol, as the server and the worker read them: a value, or an error
    // with words in it.
    fn read<T: serde::de::DeserializeOwned>(data: &[u8]) {
        if let Err(e) = decode::<T>("message", data) {
            assert!(!e.is_empty());
        }
    }
    read::<LeaseRequest>(data);
    read::<LeaseReply>(data);
    read::<HeartbeatRequest>(data);
    read::<CompleteRequest>(data);
    read::<FailRequest>(data);
    read::<ReleaseRequest>(data);
    let _ = serde_json::from_slice::<Work>(data);
    let _ = serde_json::from_slice::<TaskFailure>(data);

    let pools = ["ns/a", "ns/b"];
    let mut q: Queue = Queue::new(QueueConfig {
        lease_ms: 1000,
        aging_ms: 5000,
    });
    let mut now = 0u64;
    let mut enqueued = 0usize;
    let mut next_id = 0u64;
    let mut finished = 0usize;
    for op in data.chunks_exact(3) {
        let (a, b) = (u64::from(op[1]), u64::from(op[2]));
        let worker = format!("w{}", b % 4);
        let pool = pools[(a % 2) as usize];
        match op[0] % 8 {
            0 | 1 => {
                // Ids are unique, as the operator makes them (epoch and sequence).
                next_id += 1;
                let task = Task {
                    id: next_id,
                    pool: pool.into(),
                    namespace: "ns".into(),
                    job: format!("j{}", b % 3),
                    priority: (b % 5) as i32 - 2,
                    coalesce: None,
                    work: serde_json::Value::Null,
                };
                if q.enqueue(task, now) {
                    enqueued += 1;
                }
            }
            2 => {
                if let Some((t, l)) = q.lease(pool, &worker, now) {
                    assert_eq!(t.pool, pool, "a lease hands out its own pool's task");
                    assert_eq!(l.worker, worker);
                    assert!(l.expires_at > now);
                }
            }
            3 => {
                let _ = q.heartbeat(a % (next_id + 1), &worker, now);
            }
            4 => {
                if q.complete(a % (next_id + 1), &worker).is_ok() {
                    finished += 1;
                }
            }
            5 => {
                let _ = q.release(a % (next_id + 1), &worker);
            }
            6 => {
                now += b * 20;
                q.expire(now);
            }
            _ => {
                let before = q.len();
                q.cancel_job("ns", &format!("j{}", b % 3));
                finished += before - q.len();
            }
        }
        let (da, db) = (q.depth(pools[0]), q.depth(pools[1]));
        assert_eq!(
            (da.queued + da.leased + db.queued + db.leased) as usize,
            q.len(),
            "every task is queued or leased, once"
        );
        assert_eq!(enqueued - finished, q.len(), "no task lost or duplicated");
    }
}

/// Untrusted bytes as a TranscodeJob (JSON, as the API server hands it to the operator): parsing and validation end in a value or a list of errors
/// naming fields, never a panic.
pub fn job_spec(data: &[u8]) {
    if let Ok(job) = serde_json::from_slice::<tessera_crds::TranscodeJob>(data) {
        if let Err(errs) = tessera_crds::validate_spec(&job.spec) {
            assert!(errs.iter().all(|e| !e.to_string().is_empty()));
        }
    }
}
