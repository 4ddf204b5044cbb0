//! The worker pod a WorkerPool asks for. Pure: the reconciler names the pool, the image and the queue, this
//! builds the Pod.
//!
//! Every worker: requests the pool's device-plugin resource (limits, as device plugins require), lands where
//! the pool's nodeSelector and tolerations allow, runs non-root with a read-only root filesystem, no
//! privilege escalation, all capabilities dropped and the RuntimeDefault seccomp profile, scratch in an
//! emptyDir. NVIDIA pools get `NVIDIA_DRIVER_CAPABILITIES=compute,video,utility`: without `video` the
//! container runtime does not mount libnvidia-encode and NVENC silently falls back to software.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use tessera_crds::WorkerPoolSpec;

pub use tessera_crds::POOL_LABEL;
pub const DEFAULT_IMAGE: &str = "ghcr.io/tessera-dev/tessera-worker:0.1.0";
/// Long enough for a worker to finish or release its lease on SIGTERM.
pub const GRACE_SECONDS: i64 = 120;

pub struct WorkerPodInput<'a> {
    pub pool: &'a str,
    pub namespace: &'a str,
    pub pool_uid: &'a str,
    pub spec: &'a WorkerPoolSpec,
    /// A unique suffix for the pod's name.
    pub suffix: &'a str,
    /// ServiceAccount the workers run as (their token authenticates them to the queue).
    pub service_account: &'a str,
    /// The operator's queue Service, `namespace/name:port` (reached through cluster DNS as a fallback).
    pub queue_service: &'a str,
    /// The leader Lease, `namespace/name`: workers read the queue's address from it.
    pub queue_lease: &'a str,
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Annotations that keep node autoscalers from draining a node under a busy worker: Karpenter's consolidation
/// and the Cluster Autoscaler's scale-down. Set while the worker holds a task lease, removed when it is idle.
pub const DO_NOT_DISRUPT: [(&str, &str); 2] = [
    ("karpenter.sh/do-not-disrupt", "true"),
    ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
];

/// The merge patch that brings a worker pod's `annotations` in line with `busy`, or `None` when they are.
/// A key the pool sets itself (`podAnnotations`) is the pool's: left alone.
pub fn disruption_patch(
    annotations: &BTreeMap<String, String>,
    busy: bool,
    pool_annotations: &BTreeMap<String, String>,
) -> Option<serde_json::Value> {
    let mut patch = serde_json::Map::new();
    for (key, value) in DO_NOT_DISRUPT {
        if pool_annotations.contains_key(key) {
            continue;
        }
        match (busy, annotations.get(key)) {
            (true, Some(v)) if v == value => {}
            (true, _) => {
                patch.insert(key.into(), value.into());
            }
            (false, Some(_)) => {
                patch.insert(key.into(), serde_json::Value::Null);
            }
            (false, None) => {}
        }
    }
    (!patch.is_empty()).then(|| serde_json::json!({"metadata": {"annotations": patch}}))
}

/// A worker's CPU and memory when the pool names none: Burstable, sized for a 1080p chunk task with room
/// for more encoder threads on larger nodes (see `WorkerPoolSpec::resources`).
pub fn default_worker_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.into());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("2")),
            ("memory".to_string(), q("1Gi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("4Gi"))])),
        ..ResourceRequirements::default()
    }
}

const QUEUE_TOKEN_VOLUME: &str = "queue-token";

fn queue_token_dir() -> &'static str {
    let f = tessera_crds::protocol::QUEUE_TOKEN_FILE;
    f.rsplit_once('/').map_or(f, |(dir, _)| dir)
}

/// The worker's queue token: its ServiceAccount's, issued by the kubelet for the queue's audience only (an
/// hour, refreshed by the kubelet before it expires), so it is no key to the API server.
fn queue_token_volume() -> Volume {
    use k8s_openapi::api::core::v1::{
        ProjectedVolumeSource, ServiceAccountTokenProjection, VolumeProjection,
    };
    let file = tessera_crds::protocol::QUEUE_TOKEN_FILE;
    Volume {
        name: QUEUE_TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(tessera_crds::protocol::QUEUE_AUDIENCE.into()),
                    expiration_seconds: Some(3600),
                    path: file.rsplit('/').next().unwrap_or("token").into(),
                }),
                ..VolumeProjection::default()
            }]),
            ..ProjectedVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub fn worker_pod(i: &WorkerPodInput<'_>) -> Pod {
    let mut labels = i.spec.pod_labels.clone();
    labels.insert(POOL_LABEL.to_string(), i.pool.to_string());
    labels.insert("app.kubernetes.io/name".into(), "tessera-worker".into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "tessera-operator".into(),
    );
    let mut envs = vec![
        env("TESSERA_QUEUE_SERVICE", i.queue_service),
        env("TESSERA_QUEUE_LEASE", i.queue_lease),
        env("TESSERA_POOL", &format!("{}/{}", i.namespace, i.pool)),
        env(
            "TESSERA_TASKS_PER_WORKER",
            &i.spec.tasks_per_worker.max(1).to_string(),
        ),
        env("RUST_LOG", "info,aws_config=error"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
        env("TMPDIR", "/scratch"),
        env(
            "TESSERA_QUEUE_TOKEN_FILE",
            tessera_crds::protocol::QUEUE_TOKEN_FILE,
        ),
    ];
    if let Some(s3) = &i.spec.s3 {
        if let Some(e) = &s3.endpoint {
            envs.push(env("AWS_ENDPOINT_URL", e));
        }
        if let Some(r) = &s3.region {
            envs.push(env("AWS_REGION", r));
        }
        if let Some(secret) = &s3.credentials_secret {
            for (key, optional) in [
                ("AWS_ACCESS_KEY_ID", false),
                ("AWS_SECRET_ACCESS_KEY", false),
                ("AWS_SESSION_TOKEN", true),
            ] {
                envs.push(EnvVar {
                    name: key.into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret.clone(),
                            key: key.into(),
                            optional: optional.then_some(true),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                });
            }
        }
    }
    envs.extend(i.spec.env.iter().cloned());
    let mut resources = i
        .spec
        .resources
        .clone()
        .unwrap_or_else(default_worker_resources);
    let mut limits = resources.limits.take().unwrap_or_default();
    if let Some(r) = &i.spec.resource {
        limits.insert(r.name.clone(), Quantity(r.count.to_string()));
        if r.name.starts_with("nvidia.com/") {
            envs.push(env("NVIDIA_DRIVER_CAPABILITIES", "compute,video,utility"));
        }
    }
    let container = Container {
        name: "worker".into(),
        image: Some(i.spec.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into())),
        args: Some(vec!["worker".into()]),
        env: Some(envs),
        // The worker's /metrics (tasks, frames, fps, encoder fallbacks, S3): a PodMonitor scrapes it.
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("metrics".into()),
            container_port: 9090,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            limits: (!limits.is_empty()).then_some(limits),
            ..resources
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "scratch".into(),
                mount_path: "/scratch".into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: QUEUE_TOKEN_VOLUME.into(),
                mount_path: queue_token_dir().into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-worker-{}", i.pool, i.suffix)),
            namespace: Some(i.namespace.into()),
            labels: Some(labels),
            annotations: (!i.spec.pod_annotations.is_empty())
                .then(|| i.spec.pod_annotations.clone()),
            owner_references: Some(vec![OwnerReference {
                api_version: format!("{}/v1alpha1", tessera_crds::GROUP),
                kind: "WorkerPool".into(),
                name: i.pool.into(),
                uid: i.pool_uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            service_account_name: Some(i.service_account.into()),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(GRACE_SECONDS),
            node_selector: (!i.spec.node_selector.is_empty()).then(|| i.spec.node_selector.clone()),
            tolerations: (!i.spec.tolerations.is_empty()).then(|| i.spec.tolerations.clone()),
            runtime_class_name: i.spec.runtime_class_name.clone(),
            affinity: i.spec.affinity.clone(),
            priority_class_name: i.spec.priority_class_name.clone(),
            image_pull_secrets: (!i.spec.image_pull_secrets.is_empty())
                .then(|| i.spec.image_pull_secrets.clone()),
            topology_spread_constraints: (!i.spec.topology_spread_constraints.is_empty())
                .then(|| i.spec.topology_spread_constraints.clone()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                supplemental_groups: (!i.spec.supplemental_groups.is_empty())
                    .then(|| i.spec.supplemental_groups.clone()),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            volumes: Some(vec![
                Volume {
                    name: "scratch".into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: i.spec.scratch_size_limit.clone(),
                        ..EmptyDirVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                queue_token_volume(),
            ]),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Toleration;
    use tessera_crds::DeviceResource;

    fn spec(resource: Option<(&str, u32)>) -> WorkerPoolSpec {
        WorkerPoolSpec {
            resource: resource.map(|(n, c)| DeviceResource {
                name: n.into(),
                count: c,
            }),
            min_workers: 0,
            max_workers: 4,
            tasks_per_worker: 1,
            image: None,
            node_selector: [("tessera.dev/gpu".to_string(), "true".to_string())].into(),
            tolerations: vec![Toleration {
                key: Some("nvidia.com/gpu".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            }],
            runtime_class_name: Some("nvidia".into()),
            affinity: None,
            cooldown_seconds: 60,
            service_account_name: "tessera-worker".into(),
            allowed_namespaces: Default::default(),
            access: Vec::new(),
            result_store: None,
            result_retention_seconds: None,
            s3: None,
            env: Vec::new(),
            scratch_size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "20Gi".into(),
            )),
            resources: None,
            priority_class_name: None,
            image_pull_secrets: Vec::new(),
            pod_annotations: BTreeMap::new(),
            pod_labels: BTreeMap::new(),
            topology_spread_constraints: Vec::new(),
            supplemental_groups: Vec::new(),
        }
    }

    fn build(s: &WorkerPoolSpec) -> Pod {
        worker_pod(&WorkerPodInput {
            pool: "gpu",
            namespace: "media",
            pool_uid: "uid-1",
            spec: s,
            suffix: "x7k2p",
            service_account: "tessera-worker",
            queue_service: "tessera-system/tessera-queue:8080",
            queue_lease: "tessera-system/tessera-operator-leader",
        })
    }

    #[test]
    fn nvidia_pool_requests_the_gpu_and_the_video_capability() {
        let p = build(&spec(Some(("nvidia.com/gpu", 1))));
        let ps = p.spec.as_ref().unwrap();
        let c = &ps.containers[0];
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"],
            Quantity("1".into())
        );
        let envs = c.env.as_ref().unwrap();
        let caps = envs
            .iter()
            .find(|e| e.name == "NVIDIA_DRIVER_CAPABILITIES")
            .unwrap();
        assert!(caps
            .value
            .as_deref()
            .unwrap()
            .split(',')
            .any(|c| c == "video"));
        assert_eq!(
            ps.node_selector.as_ref().unwrap()["tessera.dev/gpu"],
            "true"
        );
        assert_eq!(ps.tolerations.as_ref().unwrap().len(), 1);
        assert_eq!(ps.runtime_class_name.as_deref(), Some("nvidia"));
        assert_eq!(p.metadata.name.as_deref(), Some("gpu-worker-x7k2p"));
        assert_eq!(p.metadata.labels.as_ref().unwrap()[POOL_LABEL], "gpu");
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("WorkerPool", Some(true))
        );
    }

    #[test]
    fn intel_and_cpu_pools() {
        let p = build(&spec(Some(("gpu.intel.com/i915", 1))));
        let c = &p.spec.as_ref().unwrap().containers[0];
        assert!(c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .all(|e| e.name != "NVIDIA_DRIVER_CAPABILITIES"));
        let p = build(&spec(None));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits.keys().collect::<Vec<_>>(), ["memory"], "no device");
    }

    #[test]
    fn busy_workers_are_marked_not_to_disrupt_and_idle_ones_unmarked() {
        let none = BTreeMap::new();
        let p = disruption_patch(&none, true, &none).unwrap();
        assert_eq!(
            p["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"],
            "true"
        );
        assert_eq!(
            p["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"],
            "false"
        );
        let marked: BTreeMap<String, String> = DO_NOT_DISRUPT
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            disruption_patch(&marked, true, &none),
            None,
            "already marked"
        );
        assert_eq!(
            disruption_patch(&none, false, &none),
            None,
            "idle and unmarked"
        );
        let p = disruption_patch(&marked, false, &none).unwrap();
        assert!(p["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"].is_null());
        assert_eq!(p["metadata"]["annotations"].as_object().unwrap().len(), 2);
        // The pool pins safe-to-evict itself: only Karpenter's key follows the worker.
        let pinned = BTreeMap::from([(
            "cluster-autoscaler.kubernetes.io/safe-to-evict".to_string(),
            "false".to_string(),
        )]);
        let p = disruption_patch(&marked, false, &pinned).unwrap();
        assert_eq!(p["metadata"]["annotations"].as_object().unwrap().len(), 1);
    }

    /// Burstable by default (requests below limits), so the autoscalers can size nodes and the kubelet
    /// does not evict workers first; a pool's own resources replace the defaults, the device is added.
    #[test]
    fn workers_request_cpu_and_memory_and_carry_the_pools_extras() {
        let p = build(&spec(Some(("nvidia.com/gpu", 1))));
        let r = p.spec.as_ref().unwrap().containers[0]
            .resources
            .clone()
            .unwrap();
        let requests = r.requests.unwrap();
        let limits = r.limits.unwrap();
        assert_eq!(requests["cpu"], Quantity("2".into()));
        assert_eq!(requests["memory"], Quantity("1Gi".into()));
        assert_eq!(limits["memory"], Quantity("4Gi".into()));
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));

        let mut s = spec(Some(("gpu.intel.com/i915", 1)));
        s.resources = Some(ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".into(), Quantity("500m".into()))])),
            limits: Some(BTreeMap::from([("cpu".into(), Quantity("4".into()))])),
            ..ResourceRequirements::default()
        });
        s.priority_class_name = Some("media-batch".into());
        s.image_pull_secrets = vec![k8s_openapi::api::core::v1::LocalObjectReference {
            name: "registry".into(),
        }];
        s.pod_annotations = BTreeMap::from([("sidecar.istio.io/inject".into(), "false".into())]);
        s.pod_labels = BTreeMap::from([
            ("team".into(), "media".into()),
            (POOL_LABEL.into(), "spoofed".into()),
        ]);
        s.topology_spread_constraints =
            vec![k8s_openapi::api::core::v1::TopologySpreadConstraint {
                max_skew: 1,
                topology_key: "topology.kubernetes.io/zone".into(),
                when_unsatisfiable: "ScheduleAnyway".into(),
                ..Default::default()
            }];
        s.supplemental_groups = vec![110];
        let p = build(&s);
        let ps = p.spec.as_ref().unwrap();
        let r = ps.containers[0].resources.clone().unwrap();
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("500m".into()));
        let limits = r.limits.unwrap();
        assert_eq!(limits["cpu"], Quantity("4".into()));
        assert_eq!(limits["gpu.intel.com/i915"], Quantity("1".into()));
        assert!(
            !limits.contains_key("memory"),
            "the pool's resources replace the defaults"
        );
        assert_eq!(ps.priority_class_name.as_deref(), Some("media-batch"));
        assert_eq!(ps.image_pull_secrets.as_ref().unwrap()[0].name, "registry");
        assert_eq!(ps.topology_spread_constraints.as_ref().unwrap().len(), 1);
        assert_eq!(
            ps.security_context.as_ref().unwrap().supplemental_groups,
            Some(vec![110])
        );
        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(
            (labels["team"].as_str(), labels[POOL_LABEL].as_str()),
            ("media", "gpu")
        );
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()["sidecar.istio.io/inject"],
            "false"
        );
    }

    #[test]
    fn workers_run_locked_down() {
        let p = build(&spec(Some(("nvidia.com/gpu", 1))));
        let ps = p.spec.as_ref().unwrap();
        let sc = ps.containers[0].security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let psc = ps.security_context.as_ref().unwrap();
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(psc.run_as_user, Some(65532));
        // Scratch is writable even though the root filesystem is not.
        let mounts = ps.containers[0].volume_mounts.as_ref().unwrap();
        assert_eq!(mounts[0].mount_path, "/scratch");
        let scratch = ps.volumes.as_ref().unwrap()[0].empty_dir.as_ref().unwrap();
        assert_eq!(scratch.size_limit.as_ref().unwrap().0, "20Gi");
        assert_eq!(ps.termination_grace_period_seconds, Some(GRACE_SECONDS));
    }

    #[test]
    fn workers_get_a_queue_token_for_the_queue_audience_only() {
        let p = build(&spec(Some(("nvidia.com/gpu", 1))));
        let ps = p.spec.as_ref().unwrap();
        let vol = ps
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == QUEUE_TOKEN_VOLUME)
            .unwrap();
        let proj = vol.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(
            proj.audience.as_deref(),
            Some(tessera_crds::protocol::QUEUE_AUDIENCE)
        );
        let c = &ps.containers[0];
        let m = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == QUEUE_TOKEN_VOLUME)
            .unwrap();
        assert_eq!(
            format!("{}/{}", m.mount_path, proj.path),
            tessera_crds::protocol::QUEUE_TOKEN_FILE
        );
        assert_eq!(m.read_only, Some(true));
        let env = c.env.as_ref().unwrap();
        assert!(env.iter().any(|e| e.name == "TESSERA_QUEUE_TOKEN_FILE"
            && e.value.as_deref() == Some(tessera_crds::protocol::QUEUE_TOKEN_FILE)));
    }
}
