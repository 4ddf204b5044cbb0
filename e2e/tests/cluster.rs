//! The local control plane itself: real etcd, kube-apiserver, kube-scheduler and kube-controller-manager,
//! fake GPU nodes and the test kubelet (`scripts/cluster.sh`). These tests are what the operator's e2e tests
//! stand on: GPU scheduling, pods run as processes with their ServiceAccount's credentials, RBAC enforced,
//! deletion honoured.

use std::time::Duration;

use tessera_e2e::cluster::{e2e_dir, json, kubectl, kubectl_ok};
use tessera_e2e::faultproxy::wait_until;

fn cluster() -> std::sync::MutexGuard<'static, Option<tessera_e2e::cluster::Cluster>> {
    tessera_e2e::cluster::cluster(&[
        ("TESSERA_GPU_NODES", "2"),
        ("TESSERA_GPUS_PER_NODE", "2"),
        ("TESSERA_CPU_NODES", "1"),
    ])
}

fn sleeper(name: &str, ns: &str, gpus: Option<u32>) -> String {
    let resources = gpus
        .map(|g| format!("      resources: {{limits: {{nvidia.com/gpu: {g}}}}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 5\n  tolerations: [{{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}]\n  containers:\n    - name: main\n      image: local/sh:1\n      command: [sh, -c, 'trap \"exit 0\" TERM; sleep 300 & wait']\n{resources}"
    )
}

#[test]
fn gpu_pods_land_on_gpu_nodes_and_the_extra_one_stays_pending() {
    let _c = cluster();
    let nodes = json(&["get", "nodes"]);
    let items = nodes["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let gpus: u32 = items
        .iter()
        .filter_map(|n| n["status"]["allocatable"]["nvidia.com/gpu"].as_str())
        .map(|g| g.parse::<u32>().unwrap())
        .sum();
    assert_eq!(gpus, 4);
    kubectl_ok(&["create", "namespace", "gpu-test"], None);
    for i in 0..5 {
        kubectl_ok(
            &["apply", "-f", "-"],
            Some(&sleeper(&format!("g{i}"), "gpu-test", Some(1))),
        );
    }
    wait_until("four GPU pods running", Duration::from_secs(60), || {
        json(&["get", "pods", "-n", "gpu-test"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .count()
            == 4
    });
    let pods = json(&["get", "pods", "-n", "gpu-test"]);
    let mut pending = Vec::new();
    for p in pods["items"].as_array().unwrap() {
        match p["status"]["phase"].as_str().unwrap() {
            "Running" => {
                let node = p["spec"]["nodeName"].as_str().unwrap();
                assert!(node.starts_with("gpu-"), "a GPU pod ran on {node}");
                // A loopback address of the kubelet's own, not the host's.
                let ip: std::net::Ipv4Addr =
                    p["status"]["podIP"].as_str().unwrap().parse().unwrap();
                assert!(ip.is_loopback() && ip.octets()[1] >= 2, "pod IP {ip}");
            }
            "Pending" => pending.push(p.clone()),
            other => panic!("unexpected phase {other}"),
        }
    }
    assert_eq!(pending.len(), 1);
    let cond = &pending[0]["status"]["conditions"][0];
    assert_eq!(cond["reason"], "Unschedulable", "{cond}");
    assert!(
        cond["message"].as_str().unwrap().contains("nvidia.com/gpu"),
        "{cond}"
    );
    // Deleting a running pod stops its process (SIGTERM, then gone within the grace period).
    let t = std::time::Instant::now();
    kubectl_ok(
        &[
            "delete",
            "pod",
            "-n",
            "gpu-test",
            "g0",
            "--wait=true",
            "--timeout=30s",
        ],
        None,
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "deletion took {:?}",
        t.elapsed()
    );
    kubectl_ok(&["delete", "namespace", "gpu-test", "--wait=false"], None);
}

#[test]
fn pods_get_their_service_accounts_credentials_and_rbac_applies() {
    let _c = cluster();
    kubectl_ok(&["create", "namespace", "rbac-test"], None);
    kubectl_ok(
        &["create", "serviceaccount", "-n", "rbac-test", "reader"],
        None,
    );
    kubectl_ok(
        &["create", "serviceaccount", "-n", "rbac-test", "nobody"],
        None,
    );
    kubectl_ok(
        &[
            "create",
            "role",
            "-n",
            "rbac-test",
            "list-pods",
            "--verb=list",
            "--resource=pods",
        ],
        None,
    );
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "-n",
            "rbac-test",
            "reader-list",
            "--role=list-pods",
            "--serviceaccount=rbac-test:reader",
        ],
        None,
    );
    let pod = |name: &str, sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: rbac-test}}\nspec:\n  serviceAccountName: {sa}\n  restartPolicy: Never\n  nodeSelector: {{kubernetes.io/hostname: cpu-0}}\n  containers:\n    - name: main\n      image: local/sh:1\n      command: [sh, -c, 'kubectl get pods -n rbac-test -o name']\n"
        )
    };
    kubectl_ok(&["apply", "-f", "-"], Some(&pod("allowed", "reader")));
    kubectl_ok(&["apply", "-f", "-"], Some(&pod("denied", "nobody")));
    let phase = |n: &str| {
        json(&["get", "pod", "-n", "rbac-test", n])["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    wait_until("both pods to finish", Duration::from_secs(60), || {
        ["allowed", "denied"]
            .iter()
            .all(|n| matches!(phase(n).as_str(), "Succeeded" | "Failed"))
    });
    assert_eq!(phase("allowed"), "Succeeded");
    assert_eq!(phase("denied"), "Failed");
    let log = std::fs::read_to_string(e2e_dir().join("cluster/kubelet/pods/rbac-test_denied.log"))
        .unwrap();
    assert!(log.contains("forbidden"), "{log}");
    assert!(
        log.contains("system:serviceaccount:rbac-test:nobody"),
        "{log}"
    );
    kubectl_ok(&["delete", "namespace", "rbac-test", "--wait=false"], None);
}

/// The queue API authenticates workers with TokenReview against the real API server: a pool's own
/// ServiceAccount token for the queue's audience is accepted, another account's token is refused for that
/// pool, the same account's API-server token (wrong audience), a made-up token and a missing one are refused;
/// the queue token itself is refused by the API server.
#[test]
fn queue_api_checks_real_service_account_tokens() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tessera_operator::api::{router, PoolAccess, QueueApi, TokenReviewer};
    use tessera_operator::core::{Cmd, Core};
    use tessera_operator::queue::{QueueConfig, Task};
    use tower::ServiceExt;

    let _c = cluster();
    kubectl_ok(&["create", "namespace", "queue-test"], None);
    for sa in ["gpu-worker", "intruder"] {
        kubectl_ok(&["create", "serviceaccount", "-n", "queue-test", sa], None);
    }
    // Tokens as a worker's projected volume has them: for the queue's audience.
    let aud = format!("--audience={}", tessera_crds::protocol::QUEUE_AUDIENCE);
    let token = |sa: &str, aud: &str| {
        kubectl_ok(&["create", "token", "-n", "queue-test", sa, aud], None)
            .trim()
            .to_string()
    };
    let (good, other) = (token("gpu-worker", &aud), token("intruder", &aud));
    // The same worker's token for the API server (what every pod has mounted by default).
    let api_token = token("gpu-worker", "--audience=https://kubernetes.default.svc");
    // A queue token is no key to the API server: refused there as unauthenticated.
    let out = kubectl(&["get", "pods", "-n", "queue-test", "--token", &good], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Unauthorized"),
        "the API server must refuse a queue token: {err}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(e2e_dir().join("kubeconfig")).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let mut core = Core::new(QueueConfig::default());
        core.queue_mut().enqueue(
            Task {
                id: 7,
                pool: "queue-test/gpu".into(),
                namespace: "queue-test".into(),
                job: "j".into(),
                priority: 0,
                coalesce: None,
                work: tessera_e2e::load::sample_work(
                    tessera_crds::work::WorkKind::Chunk,
                    "j",
                    Some(0),
                ),
            },
            0,
        );
        let mut access = PoolAccess::default();
        access.pools.insert(
            "queue-test/gpu".into(),
            ("queue-test".into(), "gpu-worker".into()),
        );
        core.apply(Cmd::SetAccess(access));
        let core = core.spawn();
        core.shared
            .leader
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let st = Arc::new(QueueApi {
            core,
            auth: Box::new(TokenReviewer::new(client)),
        });
        let call = |token: Option<String>| {
            let st = st.clone();
            async move {
                let mut req = Request::post("/v1/pools/queue-test/gpu/lease")
                    .header("content-type", "application/json");
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let resp = router(st)
                    .oneshot(req.body(Body::from(r#"{"worker":"pod-1"}"#)).unwrap())
                    .await
                    .unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        assert_eq!(call(None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            call(Some("not-a-real-token".into())).await.0,
            StatusCode::UNAUTHORIZED
        );
        let (s, body) = call(Some(other.clone())).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body.contains("system:serviceaccount:queue-test:intruder"),
            "{body}"
        );
        assert!(!body.contains(&other), "the token must not be echoed");
        // The API server's token of the right ServiceAccount is refused by the queue: wrong audience.
        let (s, body) = call(Some(api_token.clone())).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("audience"), "{body}");
        assert!(!body.contains(&api_token), "the token must not be echoed");
        let (s, body) = call(Some(good.clone())).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(body.contains("\"id\":7"), "{body}");
    });
    kubectl_ok(&["delete", "namespace", "queue-test", "--wait=false"], None);
}
