//! The work queue's state machine. Pure: time is passed in (milliseconds on the leader's monotonic clock),
//! no I/O. The queue server wraps it behind the authenticated API; the ledger in S3 makes finished work
//! durable; this decides who gets what.
//!
//! Ordering: a task's effective priority is `priority + age / aging_interval`, so an old task eventually
//! outranks newer higher-priority ones (nothing starves). Because every task ages at the same rate, the
//! ordering key `priority * aging_interval - enqueued_at` never changes with time and lives in a BTreeMap.
//! Among equal keys, the namespace holding fewer leases goes first (fair share), then FIFO.
//! Identical work (same coalescing key: input ETag + rendition settings + chunk bounds) is encoded once:
//! later copies wait on the first and complete with it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

pub type TaskId = u64;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Task<W = serde_json::Value> {
    pub id: TaskId,
    pub pool: String,
    pub namespace: String,
    pub job: String,
    pub priority: i32,
    /// Tasks with the same key do the same work.
    pub coalesce: Option<String>,
    /// The worker's instructions (the operator's `tessera_crds::work::Work`); opaque to the queue.
    pub work: W,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    pub task: TaskId,
    pub worker: String,
    pub expires_at: u64,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    UnknownTask(TaskId),
    /// The lease is held by someone else (or expired and re-leased).
    NotHolder {
        task: TaskId,
        holder: Option<String>,
    },
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownTask(t) => write!(f, "task {t} is not in the queue"),
            Self::NotHolder { task, holder } => match holder {
                Some(h) => write!(f, "task {task} is leased to {h}"),
                None => write!(f, "task {task} is not leased"),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    pub lease_ms: u64,
    /// One priority step per this much waiting.
    pub aging_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            lease_ms: 30_000,
            aging_ms: 60_000,
        }
    }
}

type Key = (Reverse<i128>, u64);

#[derive(Debug)]
struct Entry<W> {
    task: Task<W>,
    enqueued_at: u64,
    key: Option<Key>,
    lease: Option<Lease>,
    attempts: u32,
    /// Tasks coalesced onto this one.
    followers: Vec<TaskId>,
    /// Set when this task is a follower of another.
    leader: Option<TaskId>,
}

#[derive(Debug)]
pub struct Queue<W = serde_json::Value> {
    cfg: QueueConfig,
    seq: u64,
    tasks: HashMap<TaskId, Entry<W>>,
    /// pool → namespace → ordering key → task.
    ready: BTreeMap<String, BTreeMap<String, BTreeMap<Key, TaskId>>>,
    leased_per_ns: HashMap<(String, String), u32>,
    coalesce: HashMap<String, TaskId>,
}

/// What completing a task finished: the task and those coalesced onto it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completed<W = serde_json::Value> {
    pub tasks: Vec<Task<W>>,
}

/// Queue depth for one pool, by priority (for metrics and autoscaling).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Depth {
    pub queued: u64,
    pub leased: u64,
    pub queued_by_priority: BTreeMap<i32, u64>,
}

impl<W> Default for Queue<W> {
    fn default() -> Self {
        Self {
            cfg: QueueConfig::default(),
            seq: 0,
            tasks: HashMap::new(),
            ready: BTreeMap::new(),
            leased_per_ns: HashMap::new(),
            coalesce: HashMap::new(),
        }
    }
}

impl<W: Clone> Queue<W> {
    pub fn new(cfg: QueueConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    fn key(&mut self, priority: i32, enqueued_at: u64) -> Key {
        self.seq += 1;
        let k =
            i128::from(priority) * i128::from(self.cfg.aging_ms.max(1)) - i128::from(enqueued_at);
        (Reverse(k), self.seq)
    }

    fn push_ready(&mut self, id: TaskId) {
        let (pool, ns, prio, at) = {
            let e = &self.tasks[&id];
            (
                e.task.pool.clone(),
                e.task.namespace.clone(),
                e.task.priority,
                e.enqueued_at,
            )
        };
        let key = self.key(prio, at);
        self.tasks.get_mut(&id).expect("exists").key = Some(key);
        self.ready
            .entry(pool)
            .or_default()
            .entry(ns)
            .or_default()
            .insert(key, id);
    }

    fn pull_ready(&mut self, id: TaskId) {
        let Some(e) = self.tasks.get_mut(&id) else {
            return;
        };
        let Some(key) = e.key.take() else { return };
        let (pool, ns) = (e.task.pool.clone(), e.task.namespace.clone());
        if let Some(p) = self.ready.get_mut(&pool) {
            if let Some(n) = p.get_mut(&ns) {
                n.remove(&key);
                if n.is_empty() {
                    p.remove(&ns);
                }
            }
            if p.is_empty() {
                self.ready.remove(&pool);
            }
        }
    }

    /// Add a task. Returns `false` when it was coalesced onto identical work already queued or leased.
    pub fn enqueue(&mut self, task: Task<W>, now: u64) -> bool {
        let id = task.id;
        let leader = task
            .coalesce
            .as_ref()
            .and_then(|c| self.coalesce.get(c).copied())
            .filter(|l| self.tasks.contains_key(l));
        if let Some(c) = &task.coalesce {
            self.coalesce.entry(c.clone()).or_insert(id);
        }
        self.tasks.insert(
            id,
            Entry {
                task,
                enqueued_at: now,
                key: None,
                lease: None,
                attempts: 0,
                followers: Vec::new(),
                leader,
            },
        );
        match leader {
            Some(l) => {
                self.tasks
                    .get_mut(&l)
                    .expect("leader exists")
                    .followers
                    .push(id);
                false
            }
            None => {
                self.push_ready(id);
                true
            }
        }
    }

    fn job_tasks(&self, namespace: &str, job: &str) -> Vec<TaskId> {
        self.tasks
            .iter()
            .filter(|(_, e)| e.task.namespace == namespace && e.task.job == job)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Change a job's priority; queued tasks move at once, leased ones keep running.
    pub fn set_priority(&mut self, namespace: &str, job: &str, priority: i32) {
        let ids = self.job_tasks(namespace, job);
        for id in ids {
            let queued = self.tasks[&id].key.is_some();
            self.tasks.get_mut(&id).expect("exists").task.priority = priority;
            if queued {
                self.pull_ready(id);
                self.push_ready(id);
            }
        }
    }

    /// Give the best task of `pool` to `worker`.
    pub fn lease(&mut self, pool: &str, worker: &str, now: u64) -> Option<(Task<W>, Lease)> {
        let namespaces = self.ready.get(pool)?;
        let (ns, id) = namespaces
            .iter()
            .filter_map(|(ns, tasks)| tasks.iter().next().map(|(k, id)| (ns, k, *id)))
            .min_by(|a, b| {
                let la = self
                    .leased_per_ns
                    .get(&(pool.to_string(), a.0.clone()))
                    .copied()
                    .unwrap_or(0);
                let lb = self
                    .leased_per_ns
                    .get(&(pool.to_string(), b.0.clone()))
                    .copied()
                    .unwrap_or(0);
                (a.1 .0, la, a.1 .1).cmp(&(b.1 .0, lb, b.1 .1))
            })
            .map(|(ns, _, id)| (ns.clone(), id))?;
        self.pull_ready(id);
        *self
            .leased_per_ns
            .entry((pool.to_string(), ns))
            .or_default() += 1;
        let e = self.tasks.get_mut(&id).expect("exists");
        e.attempts += 1;
        let lease = Lease {
            task: id,
            worker: worker.to_string(),
            expires_at: now + self.cfg.lease_ms,
            attempt: e.attempts,
        };
        e.lease = Some(lease.clone());
        Some((e.task.clone(), lease))
    }

    fn holder_check(&self, id: TaskId, worker: &str) -> Result<(), QueueError> {
        let e = self.tasks.get(&id).ok_or(QueueError::UnknownTask(id))?;
        match &e.lease {
            Some(l) if l.worker == worker => Ok(()),
            other => Err(QueueError::NotHolder {
                task: id,
                holder: other.as_ref().map(|l| l.worker.clone()),
            }),
        }
    }

    /// Extend a lease; only its holder may.
    pub fn heartbeat(&mut self, id: TaskId, worker: &str, now: u64) -> Result<u64, QueueError> {
        self.holder_check(id, worker)?;
        let exp = now + self.cfg.lease_ms;
        self.tasks
            .get_mut(&id)
            .and_then(|e| e.lease.as_mut())
            .expect("checked")
            .expires_at = exp;
        Ok(exp)
    }

    fn unlease(&mut self, id: TaskId) {
        let Some(e) = self.tasks.get_mut(&id) else {
            return;
        };
        if e.lease.take().is_some() {
            let k = (e.task.pool.clone(), e.task.namespace.clone());
            if let Some(n) = self.leased_per_ns.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.leased_per_ns.remove(&k);
                }
            }
        }
    }

    /// The holder finished the task: it and every task coalesced onto it are done.
    pub fn complete(&mut self, id: TaskId, worker: &str) -> Result<Completed<W>, QueueError> {
        self.holder_check(id, worker)?;
        self.unlease(id);
        let e = self.tasks.remove(&id).expect("checked");
        if let Some(c) = &e.task.coalesce {
            if self.coalesce.get(c) == Some(&id) {
                self.coalesce.remove(c);
            }
        }
        let mut tasks = vec![e.task];
        for f in e.followers {
            if let Some(fe) = self.tasks.remove(&f) {
                tasks.push(fe.task);
            }
        }
        Ok(Completed { tasks })
    }

    /// The holder gives the task back (shutting down): queued again at once, at its old place.
    pub fn release(&mut self, id: TaskId, worker: &str) -> Result<(), QueueError> {
        self.holder_check(id, worker)?;
        self.unlease(id);
        self.push_ready(id);
        Ok(())
    }

    /// Re-queue tasks whose lease ran out (their worker died or was cut off).
    pub fn expire(&mut self, now: u64) -> Vec<TaskId> {
        let expired: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, e)| e.lease.as_ref().is_some_and(|l| l.expires_at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.unlease(*id);
            self.push_ready(*id);
        }
        expired
    }

    /// Remove every task of a job. Returns the leases that were in flight (their workers must stop).
    pub fn cancel_job(&mut self, namespace: &str, job: &str) -> Vec<Lease> {
        let ids = self.job_tasks(namespace, job);
        let mut leases = Vec::new();
        for id in ids {
            // A leader with followers from other jobs hands its place to the first follower.
            let followers = self.tasks[&id].followers.clone();
            if let Some(l) = self.tasks[&id].lease.clone() {
                leases.push(l);
            }
            self.pull_ready(id);
            self.unlease(id);
            let e = self.tasks.remove(&id).expect("exists");
            if let Some(leader) = e.leader {
                if let Some(le) = self.tasks.get_mut(&leader) {
                    le.followers.retain(|f| *f != id);
                }
            }
            if let Some(c) = &e.task.coalesce {
                if self.coalesce.get(c) == Some(&id) {
                    self.coalesce.remove(c);
                }
            }
            let mut rest = followers.into_iter().filter(|f| self.tasks.contains_key(f));
            if let Some(new_leader) = rest.next() {
                let others: Vec<TaskId> = rest.collect();
                let ne = self.tasks.get_mut(&new_leader).expect("exists");
                ne.leader = None;
                ne.followers = others.clone();
                if let Some(c) = ne.task.coalesce.clone() {
                    self.coalesce.insert(c, new_leader);
                }
                for o in others {
                    if let Some(oe) = self.tasks.get_mut(&o) {
                        oe.leader = Some(new_leader);
                    }
                }
                self.push_ready(new_leader);
            }
        }
        leases
    }

    /// Whether any task of the job has been leased (so a worker may have written to its ledger).
    pub fn ever_leased(&self, namespace: &str, job: &str) -> bool {
        self.tasks
            .values()
            .any(|e| e.task.namespace == namespace && e.task.job == job && e.attempts > 0)
    }

    pub fn lease_ms(&self) -> u64 {
        self.cfg.lease_ms
    }

    /// How many times the task has been leased.
    pub fn attempts(&self, id: TaskId) -> u32 {
        self.tasks.get(&id).map_or(0, |e| e.attempts)
    }

    /// Leases held per worker in a pool (busy workers are never scaled down).
    pub fn leases_by_worker(&self, pool: &str) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        for e in self.tasks.values().filter(|e| e.task.pool == pool) {
            if let Some(l) = &e.lease {
                *out.entry(l.worker.clone()).or_default() += 1;
            }
        }
        out
    }

    /// The leases of one job (for suspension and deletion).
    pub fn job_task_ids(&self, namespace: &str, job: &str) -> Vec<TaskId> {
        self.job_tasks(namespace, job)
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn task(&self, id: TaskId) -> Option<&Task<W>> {
        self.tasks.get(&id).map(|e| &e.task)
    }

    pub fn depth(&self, pool: &str) -> Depth {
        let mut d = Depth::default();
        for e in self
            .tasks
            .values()
            .filter(|e| e.task.pool == pool && e.leader.is_none())
        {
            if e.lease.is_some() {
                d.leased += 1;
            } else {
                d.queued += 1;
                *d.queued_by_priority.entry(e.task.priority).or_default() += 1;
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: TaskId, ns: &str, job: &str, priority: i32) -> Task {
        Task {
            id,
            pool: "gpu".into(),
            namespace: ns.into(),
            job: job.into(),
            priority,
            coalesce: None,
            work: serde_json::Value::Null,
        }
    }

    fn q() -> Queue {
        Queue::new(QueueConfig {
            lease_ms: 1_000,
            aging_ms: 10_000,
        })
    }

    #[test]
    fn higher_priority_first_then_fifo() {
        let mut q = q();
        q.enqueue(task(1, "a", "old", 0), 0);
        q.enqueue(task(2, "a", "old", 0), 1);
        q.enqueue(task(3, "a", "urgent", 5), 2);
        let order: Vec<TaskId> = (0..3)
            .map(|_| q.lease("gpu", "w", 3).unwrap().0.id)
            .collect();
        assert_eq!(order, vec![3, 1, 2]);
        assert!(q.lease("gpu", "w", 3).is_none());
        assert!(q.lease("other-pool", "w", 3).is_none());
    }

    #[test]
    fn aging_lets_old_work_overtake() {
        let mut q = q();
        q.enqueue(task(1, "a", "old", 0), 0);
        // 3 priority steps newer but 4 aging intervals later: the old task has aged past it.
        q.enqueue(task(2, "a", "new", 3), 40_000);
        assert_eq!(q.lease("gpu", "w", 40_000).unwrap().0.id, 1);
        // Within 2 intervals it would not have.
        let mut q2 = self::q();
        q2.enqueue(task(1, "a", "old", 0), 0);
        q2.enqueue(task(2, "a", "new", 3), 20_000);
        assert_eq!(q2.lease("gpu", "w", 20_000).unwrap().0.id, 2);
    }

    #[test]
    fn priority_changes_while_queued() {
        let mut q = q();
        q.enqueue(task(1, "a", "j1", 0), 0);
        q.enqueue(task(2, "a", "j2", 0), 1);
        q.set_priority("a", "j2", 10);
        assert_eq!(q.lease("gpu", "w", 2).unwrap().0.id, 2);
        assert_eq!(q.depth("gpu").queued_by_priority, BTreeMap::from([(0, 1)]));
    }

    #[test]
    fn fair_share_across_namespaces_at_equal_priority() {
        let mut q = q();
        // Namespace a floods the queue first; b arrives with one job at the same time stamp.
        for i in 0..10 {
            q.enqueue(task(i, "a", "flood", 0), 0);
        }
        q.enqueue(task(100, "b", "small", 0), 0);
        let first = q.lease("gpu", "w1", 0).unwrap().0;
        let second = q.lease("gpu", "w2", 0).unwrap().0;
        assert_ne!(
            first.namespace, second.namespace,
            "b gets a worker while a holds one"
        );
    }

    #[test]
    fn leases_expire_and_only_holders_act() {
        let mut q = q();
        q.enqueue(task(1, "a", "j", 0), 0);
        let (_, l) = q.lease("gpu", "w1", 0).unwrap();
        assert_eq!(l.expires_at, 1_000);
        assert_eq!(q.heartbeat(1, "w1", 500), Ok(1_500));
        assert!(matches!(
            q.heartbeat(1, "w2", 500),
            Err(QueueError::NotHolder { .. })
        ));
        assert!(q.expire(1_400).is_empty());
        assert_eq!(q.expire(1_500), vec![1]);
        // w1 lost it; w2 gets it with attempt 2, and w1's late completion is refused.
        let (_, l2) = q.lease("gpu", "w2", 1_600).unwrap();
        assert_eq!((l2.worker.as_str(), l2.attempt), ("w2", 2));
        assert!(q.complete(1, "w1").is_err());
        assert_eq!(q.complete(1, "w2").unwrap().tasks.len(), 1);
        assert_eq!(q.complete(1, "w2"), Err(QueueError::UnknownTask(1)));
        assert_eq!(q.depth("gpu"), Depth::default());
    }

    #[test]
    fn release_requeues_at_the_old_place() {
        let mut q = q();
        q.enqueue(task(1, "a", "j", 0), 0);
        q.enqueue(task(2, "a", "j", 0), 5);
        q.lease("gpu", "w", 10).unwrap();
        q.release(1, "w").unwrap();
        assert_eq!(q.lease("gpu", "w", 11).unwrap().0.id, 1);
    }

    #[test]
    fn identical_work_is_encoded_once() {
        let mut q = q();
        let mut t1 = task(1, "a", "j1", 0);
        t1.coalesce = Some("etag-x/720p-crf23/c0".into());
        let mut t2 = task(2, "b", "j2", 0);
        t2.coalesce = t1.coalesce.clone();
        assert!(q.enqueue(t1, 0));
        assert!(!q.enqueue(t2, 1));
        assert_eq!(q.depth("gpu").queued, 1);
        q.lease("gpu", "w", 2).unwrap();
        assert!(
            q.lease("gpu", "w2", 2).is_none(),
            "the copy is not leased separately"
        );
        let done = q.complete(1, "w").unwrap();
        let ids: Vec<TaskId> = done.tasks.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn cancelling_a_job_returns_its_leases_and_promotes_a_coalesced_copy() {
        let mut q = q();
        let mut t1 = task(1, "a", "j1", 0);
        t1.coalesce = Some("k".into());
        let mut t2 = task(2, "b", "j2", 0);
        t2.coalesce = Some("k".into());
        q.enqueue(t1, 0);
        q.enqueue(t2, 0);
        q.enqueue(task(3, "a", "j1", 0), 0);
        let (_, l) = q.lease("gpu", "w", 1).unwrap();
        assert_eq!(l.task, 1);
        let leases = q.cancel_job("a", "j1");
        assert_eq!(leases, vec![l]);
        // j2's copy now stands on its own.
        let (t, _) = q.lease("gpu", "w", 2).unwrap();
        assert_eq!(t.id, 2);
        assert_eq!(q.depth("gpu").queued, 0);
    }
}
