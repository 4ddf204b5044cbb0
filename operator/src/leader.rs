//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does it: the holder renews the
//! Lease; a candidate takes it over when it has not seen the record change for a whole lease duration, by
//! its own clock (so clocks of different nodes need not agree). Updates carry the resourceVersion, so two
//! candidates cannot both win. A leader that cannot renew within the lease duration steps down.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct Settings {
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    pub retry_every: Duration,
    /// Written on the Lease (annotation [`QUEUE_URL_ANNOTATION`]) while leading: where workers reach the
    /// queue, without cluster DNS.
    pub advertise: Option<String>,
}

pub use tessera_crds::QUEUE_URL_ANNOTATION;

pub struct Elector {
    api: Api<Lease>,
    s: Settings,
    /// The last record seen from another holder, and when (by this process's clock).
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Elector {
    pub fn new(api: Api<Lease>, s: Settings) -> Self {
        Self {
            api,
            s,
            observed: None,
        }
    }

    fn mine(&self, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.s.identity.clone()),
            lease_duration_seconds: Some(self.s.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(now_micro()),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn annotations(
        &self,
        old: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        let mut a = old.cloned().unwrap_or_default();
        match &self.s.advertise {
            Some(u) => a.insert(QUEUE_URL_ANNOTATION.into(), u.clone()),
            None => a.remove(QUEUE_URL_ANNOTATION),
        };
        Some(a)
    }

    /// One round: `Ok(true)` when this process holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let current = match self.api.get_opt(&self.s.lease_name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.s.lease_name.clone()),
                        annotations: self.annotations(None),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.mine(0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mut next = current.clone();
        if holder == self.s.identity {
            let mut s = spec;
            s.renew_time = Some(now_micro());
            next.spec = Some(s);
        } else {
            let record = (holder.clone(), spec.renew_time.clone());
            let fresh = match &self.observed {
                Some((h, r, _)) => *h != record.0 || *r != record.1,
                None => true,
            };
            if fresh {
                self.observed = Some((record.0, record.1, Instant::now()));
            }
            let seen = self
                .observed
                .as_ref()
                .map(|o| o.2)
                .unwrap_or_else(Instant::now);
            let duration = spec
                .lease_duration_seconds
                .map(|d| Duration::from_secs(d.max(1) as u64))
                .unwrap_or(self.s.lease_duration);
            if !holder.is_empty() && seen.elapsed() < duration {
                return Ok(false);
            }
            tracing::info!(previous = %holder, "taking over the leader lease");
            next.spec = Some(self.mine(spec.lease_transitions.unwrap_or(0) + 1));
        }
        next.metadata.annotations = self.annotations(current.metadata.annotations.as_ref());
        match self
            .api
            .replace(&self.s.lease_name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up (on shutdown), so a standby takes over at its next try rather than after expiry.
    pub async fn release(&self) {
        if let Ok(Some(mut l)) = self.api.get_opt(&self.s.lease_name).await {
            let spec = l.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(&self.s.identity) {
                spec.holder_identity = None;
                spec.renew_time = None;
                if let Some(a) = l.metadata.annotations.as_mut() {
                    a.remove(QUEUE_URL_ANNOTATION);
                }
                let _ = self
                    .api
                    .replace(&self.s.lease_name, &PostParams::default(), &l)
                    .await;
            }
        }
    }

    /// Campaign forever; `leading` says whether this process leads. Once lost, leadership is not re-taken
    /// (the process exits and restarts clean, as client-go's callers do).
    pub async fn run(mut self, leading: watch::Sender<bool>) {
        let mut last_renew: Option<Instant> = None;
        loop {
            let res = self.try_acquire_or_renew().await;
            let was = *leading.borrow();
            match res {
                Ok(true) => {
                    last_renew = Some(Instant::now());
                    if !was {
                        tracing::info!(identity = %self.s.identity, "became the leader");
                        let _ = leading.send(true);
                    }
                }
                Ok(false) if was => {
                    tracing::error!("lost the leader lease to another replica");
                    let _ = leading.send(false);
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: API request failed");
                    if was && last_renew.is_some_and(|t| t.elapsed() > self.s.lease_duration) {
                        tracing::error!("could not renew the leader lease in time; stepping down");
                        let _ = leading.send(false);
                        return;
                    }
                }
            }
            let wait = if *leading.borrow() {
                self.s.renew_every
            } else {
                self.s.retry_every
            };
            tokio::time::sleep(wait).await;
        }
    }
}
