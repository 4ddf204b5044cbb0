//! How many workers a pool wants, and which pods to create or delete to get there. Pure: the WorkerPool
//! reconciler gathers the queue depth and the pool's pods, calls [`plan`], and applies what it says.
//!
//! The rules users of KEDA and HPA asked for and did not get:
//! * desired = ceil((queued + leased) / tasksPerWorker), clamped to [min, max] (min 0 allowed);
//! * Pending pods count as capacity already asked for: a cluster without free GPUs never causes runaway
//!   creation (kedacore/keda#6157);
//! * scale down removes Pending pods first, then only workers idle for at least the cooldown; a worker that
//!   holds a lease is never deleted (kedacore/keda#3674).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::time::Duration;
use tessera_crds::WorkerPoolStatus;

/// A worker pod as the reconciler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Worker {
    pub name: String,
    pub state: WorkerState,
    /// Holds at least one task lease.
    pub busy: bool,
    /// How long it has been without a lease (Ready workers).
    pub idle_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Not running yet (unscheduled, or starting).
    Pending,
    Ready,
    /// Being deleted: counts for nothing.
    Terminating,
}

#[derive(Debug, Clone, Copy)]
pub struct PoolShape {
    pub min: u32,
    pub max: u32,
    pub tasks_per_worker: u32,
    pub cooldown: Duration,
}

/// Queue depth for one pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub queued: u64,
    pub leased: u64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub desired: u32,
    pub create: u32,
    pub delete: Vec<String>,
    /// For the pool's status.
    pub pending: u32,
    pub ready: u32,
    pub busy: u32,
    pub idle: u32,
}

pub fn desired(load: Load, shape: PoolShape) -> u32 {
    let per = u64::from(shape.tasks_per_worker.max(1));
    let want = (load.queued + load.leased).div_ceil(per);
    (want.min(u64::from(u32::MAX)) as u32).clamp(shape.min, shape.max.max(shape.min))
}

pub fn plan(load: Load, shape: PoolShape, workers: &[Worker]) -> Plan {
    let desired = desired(load, shape);
    let live: Vec<&Worker> = workers
        .iter()
        .filter(|w| w.state != WorkerState::Terminating)
        .collect();
    let pending = live
        .iter()
        .filter(|w| w.state == WorkerState::Pending)
        .count() as u32;
    let ready = live
        .iter()
        .filter(|w| w.state == WorkerState::Ready)
        .count() as u32;
    let busy = live.iter().filter(|w| w.busy).count() as u32;
    let idle = live
        .iter()
        .filter(|w| w.state == WorkerState::Ready && !w.busy)
        .count() as u32;
    let have = live.len() as u32;
    let mut out = Plan {
        desired,
        pending,
        ready,
        busy,
        idle,
        ..Plan::default()
    };
    if desired > have {
        out.create = desired - have;
    } else if desired < have {
        let mut surplus = (have - desired) as usize;
        // Pending first (they do no work), newest names last so the choice is stable.
        let mut pend: Vec<&&Worker> = live
            .iter()
            .filter(|w| w.state == WorkerState::Pending && !w.busy)
            .collect();
        pend.sort_by(|a, b| b.name.cmp(&a.name));
        for w in pend.into_iter().take(surplus) {
            out.delete.push(w.name.clone());
        }
        surplus -= out.delete.len();
        // Then the longest-idle Ready workers past the cooldown; never a busy one.
        let mut idle: Vec<&&Worker> = live
            .iter()
            .filter(|w| w.state == WorkerState::Ready && !w.busy && w.idle_for >= shape.cooldown)
            .collect();
        idle.sort_by(|a, b| b.idle_for.cmp(&a.idle_for).then(a.name.cmp(&b.name)));
        for w in idle.into_iter().take(surplus) {
            out.delete.push(w.name.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: PoolShape = PoolShape {
        min: 0,
        max: 4,
        tasks_per_worker: 2,
        cooldown: Duration::from_secs(60),
    };

    fn w(name: &str, state: WorkerState, busy: bool, idle: u64) -> Worker {
        Worker {
            name: name.into(),
            state,
            busy,
            idle_for: Duration::from_secs(idle),
        }
    }

    #[test]
    fn desired_follows_the_queue_within_bounds() {
        let d = |q, l| {
            desired(
                Load {
                    queued: q,
                    leased: l,
                },
                SHAPE,
            )
        };
        assert_eq!(d(0, 0), 0);
        assert_eq!(d(1, 0), 1);
        assert_eq!(d(3, 0), 2);
        assert_eq!(d(2, 2), 2);
        assert_eq!(d(1000, 0), 4);
        let min1 = PoolShape { min: 1, ..SHAPE };
        assert_eq!(desired(Load::default(), min1), 1);
        // A max below min is read as min.
        let odd = PoolShape {
            min: 2,
            max: 1,
            ..SHAPE
        };
        assert_eq!(
            desired(
                Load {
                    queued: 100,
                    leased: 0
                },
                odd
            ),
            2
        );
    }

    #[test]
    fn pending_pods_count_as_capacity_already_asked_for() {
        let load = Load {
            queued: 100,
            leased: 0,
        };
        let workers = vec![
            w("a", WorkerState::Ready, true, 0),
            w("b", WorkerState::Pending, false, 0),
            w("c", WorkerState::Pending, false, 0),
            w("d", WorkerState::Pending, false, 0),
        ];
        // At max already (3 of them Pending for lack of GPUs): nothing more is created, however long.
        let p = plan(load, SHAPE, &workers);
        assert_eq!((p.desired, p.create), (4, 0));
        assert!(p.delete.is_empty());
        assert_eq!((p.pending, p.ready, p.busy), (3, 1, 1));
    }

    #[test]
    fn scales_up_in_one_step() {
        let p = plan(
            Load {
                queued: 7,
                leased: 0,
            },
            SHAPE,
            &[],
        );
        assert_eq!(p.create, 4);
        let p = plan(
            Load {
                queued: 7,
                leased: 0,
            },
            SHAPE,
            &[w("x", WorkerState::Terminating, false, 0)],
        );
        assert_eq!(p.create, 4, "terminating pods are not capacity");
    }

    #[test]
    fn scales_down_pending_first_then_idle_past_cooldown_never_busy() {
        let workers = vec![
            w("busy", WorkerState::Ready, true, 0),
            w("fresh-idle", WorkerState::Ready, false, 10),
            w("old-idle", WorkerState::Ready, false, 600),
            w("older-idle", WorkerState::Ready, false, 900),
            w("stuck", WorkerState::Pending, false, 0),
        ];
        // Queue empty, min 0: everyone idle past the cooldown goes, pending first; the busy one and the one
        // idle for 10 s stay.
        let p = plan(
            Load {
                queued: 0,
                leased: 1,
            },
            SHAPE,
            &workers,
        );
        assert_eq!(p.desired, 1);
        assert_eq!(p.delete, vec!["stuck", "older-idle", "old-idle"]);
        // Everyone busy: nothing is deleted even far above desired.
        let all_busy: Vec<Worker> = (0..4)
            .map(|i| w(&format!("b{i}"), WorkerState::Ready, true, 0))
            .collect();
        assert!(plan(Load::default(), SHAPE, &all_busy).delete.is_empty());
    }

    #[test]
    fn deletes_no_more_than_the_surplus() {
        let workers: Vec<Worker> = (0..4)
            .map(|i| w(&format!("i{i}"), WorkerState::Ready, false, 100 + i))
            .collect();
        let p = plan(
            Load {
                queued: 4,
                leased: 0,
            },
            SHAPE,
            &workers,
        );
        assert_eq!(p.desired, 2);
        assert_eq!(p.delete, vec!["i3", "i2"]);
    }
}

/// The pool's status from a scaling plan: counts, and the conditions kstatus and Argo CD read. `Ready` is
/// True when every wanted worker is ready (an empty pool at zero is ready); `Reconciling` while workers are
/// starting or more are wanted than exist.
pub fn pool_status(p: &Plan, generation: Option<i64>, now: &Time) -> WorkerPoolStatus {
    let pending = p.pending + p.create;
    let ready = p.ready >= p.desired && pending == 0;
    let (reason, message) = if ready {
        (
            "WorkersReady",
            format!(
                "{} of {} workers ready, {} busy",
                p.ready, p.desired, p.busy
            ),
        )
    } else {
        (
            "ScalingUp",
            format!(
                "{} of {} workers ready, {pending} starting",
                p.ready, p.desired
            ),
        )
    };
    let cond = |type_: &str, status: bool| Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.clone(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    let mut conditions = vec![cond("Ready", ready)];
    if !ready {
        conditions.push(cond("Reconciling", true));
    }
    WorkerPoolStatus {
        desired: p.desired,
        pending,
        ready: p.ready,
        busy: p.busy,
        idle: p.idle,
        conditions,
        observed_generation: generation,
    }
}

#[cfg(test)]
mod status_tests {
    use super::*;

    fn plan(desired: u32, pending: u32, create: u32, ready: u32) -> Plan {
        Plan {
            desired,
            create,
            delete: vec![],
            pending,
            ready,
            busy: ready.min(1),
            idle: ready.saturating_sub(1),
        }
    }

    #[test]
    fn a_pool_is_ready_when_its_wanted_workers_are() {
        let now = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap());
        let get = |s: &WorkerPoolStatus, t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        let idle_at_zero = pool_status(&plan(0, 0, 0, 0), Some(3), &now);
        assert_eq!(
            get(&idle_at_zero, "Ready"),
            Some(("True".into(), "WorkersReady".into()))
        );
        assert_eq!(get(&idle_at_zero, "Reconciling"), None);
        assert_eq!(idle_at_zero.observed_generation, Some(3));
        let scaling = pool_status(&plan(3, 1, 1, 1), Some(3), &now);
        assert_eq!(scaling.pending, 2);
        assert_eq!(
            get(&scaling, "Ready"),
            Some(("False".into(), "ScalingUp".into()))
        );
        assert_eq!(
            get(&scaling, "Reconciling"),
            Some(("True".into(), "ScalingUp".into()))
        );
        let full = pool_status(&plan(2, 0, 0, 2), Some(4), &now);
        assert_eq!(get(&full, "Ready").unwrap().0, "True");
    }
}
