//! Security on the local cluster (chart installed with helm): the operator's RBAC is exactly what it needs
//! (a removed permission breaks it; what is not granted is forbidden), worker tokens reach the queue only
//! for their own pool, and pods run locked down.

use std::time::Duration;

use serde_json::Value;
use tessera_e2e::cluster::{json, kubectl, kubectl_ok, pod_logs};
use tessera_e2e::faultproxy::wait_until;
use tessera_e2e::jobs::{
    delete_job, get_job, input, job_yaml, live_workers, reliability_row, wait_complete,
};

fn cluster() -> std::sync::MutexGuard<'static, Option<tessera_e2e::cluster::Cluster>> {
    tessera_e2e::cluster::cluster(&[("TESSERA_POOL_MAX", "2"), ("TESSERA_POOL_COOLDOWN", "5")])
}

const HEADER: &str = "| check | result |\n|---|---|";

/// `kubectl auth can-i` as anyone (`system:serviceaccount:NS:NAME`).
fn can_as(who: &str, verb: &str, resource: &str, ns: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb];
    match resource.split_once(':') {
        Some((r, sub)) => args.extend([r, "--subresource", sub]),
        None => args.push(resource),
    }
    if ns.is_empty() {
        args.push("--all-namespaces");
    } else {
        args.extend(["-n", ns]);
    }
    args.extend(["--as", who]);
    let out = kubectl(&args, None);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// A tenant's ServiceAccount bound (RoleBinding, in its namespace) to the chart's `tessera-jobs-edit` role may
/// run jobs there, and may not read or write pools, Secrets or jobs anywhere else (the API server's authorizer).
#[test]
fn a_tenant_runs_jobs_in_its_namespace_and_touches_nothing_else() {
    let _c = cluster();
    for ns in ["tenant-x", "tenant-y"] {
        let _ = kubectl(&["create", "namespace", ns], None);
    }
    let _ = kubectl(
        &["create", "serviceaccount", "author", "-n", "tenant-x"],
        None,
    );
    let _ = kubectl(
        &[
            "create",
            "rolebinding",
            "author-jobs",
            "-n",
            "tenant-x",
            "--clusterrole=tessera-jobs-edit",
            "--serviceaccount=tenant-x:author",
        ],
        None,
    );
    let who = "system:serviceaccount:tenant-x:author";
    for (verb, res, ns) in [
        ("create", "transcodejobs.tessera.dev", "tenant-x"),
        ("delete", "transcodejobs.tessera.dev", "tenant-x"),
        ("watch", "transcodejobs.tessera.dev", "tenant-x"),
    ] {
        assert!(
            can_as(who, verb, res, ns),
            "a tenant needs {verb} {res} in {ns}"
        );
    }
    for (verb, res, ns) in [
        ("get", "transcodejobs.tessera.dev", "tenant-y"),
        ("create", "transcodejobs.tessera.dev", "tenant-y"),
        ("list", "transcodejobs.tessera.dev", ""),
        ("get", "workerpools.tessera.dev", "tenant-x"),
        ("create", "workerpools.tessera.dev", "tenant-x"),
        ("patch", "workerpools.tessera.dev", "tessera-system"),
        ("get", "secrets", "tenant-x"),
        ("get", "secrets", "tenant-y"),
        ("get", "secrets", "tessera-system"),
        ("create", "pods", "tenant-x"),
        ("patch", "transcodejobs.tessera.dev:status", "tenant-x"),
    ] {
        assert!(
            !can_as(who, verb, res, ns),
            "a tenant must not {verb} {res} in {ns:?}"
        );
    }
    reliability_row(
        "security",
        HEADER,
        "tenant RBAC (tessera-jobs-edit bound in its namespace)",
        "creates, watches and deletes TranscodeJobs there; jobs of other namespaces, WorkerPools, Secrets, pods, job status: forbidden (the API server's authorizer)",
    );
    for ns in ["tenant-x", "tenant-y"] {
        let _ = kubectl(&["delete", "namespace", ns, "--wait=false"], None);
    }
}

/// A pool per tenant, in the tenant's namespace, with its own ServiceAccount and its own credentials (a second
/// S3 server with another key pair, behind a proxy that logs each request's access key id): the tenant's job
/// completes, every request its store saw was signed with the tenant's key, and the shared credentials never
/// touched the tenant's data.
#[test]
fn a_tenant_pool_runs_with_the_tenants_own_account_and_credentials() {
    let _c = cluster();
    let studio = tessera_e2e::s3server::S3Server::start(&["studio"]);
    let proxy = tessera_e2e::faultproxy::FaultProxy::start(studio.addr);
    // The clip, made once and read from the shared store's folder, then put into the tenant's own store.
    input("tenant-own", 2);
    let clip = tessera_e2e::jobs::s3_dir().join("tessera/inputs/tenant-own.mp4");
    tessera_e2e::jobs::upload_with(&clip, "s3://studio/in/clip.mp4", studio.env(&studio.url()));
    let _ = kubectl(&["create", "namespace", "studio"], None);
    let _ = kubectl(
        &["create", "serviceaccount", "studio-worker", "-n", "studio"],
        None,
    );
    let _ = kubectl(&["delete", "secret", "studio-s3", "-n", "studio"], None);
    kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "studio-s3",
            "-n",
            "studio",
            &format!("--from-literal=AWS_ACCESS_KEY_ID={}", studio.access_key),
            &format!("--from-literal=AWS_SECRET_ACCESS_KEY={}", studio.secret_key),
        ],
        None,
    );
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata: {name: own-keys, namespace: studio}\nspec:\n  \
             pool: own\n  input: {uri: \"s3://studio/in/clip.mp4\"}\n  output: {uri: \"s3://studio/out/\"}\n  \
             renditions:\n    - {name: small, video: {codec: h264, height: 180, crf: 30, preset: ultrafast}}\n  \
             chunking: {targetSeconds: 1}\n",
        ),
    );
    // The job came first: it waits for its pool (its own namespace, so saying so leaks nothing), Pending,
    // with the reason; then the pool is created and the same job runs.
    let mut waiting = Value::Null;
    wait_until(
        "the job to wait for its pool",
        Duration::from_secs(30),
        || {
            waiting = json(&["get", "tj", "own-keys", "-n", "studio", "-o", "json"]);
            waiting["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["reason"] == "PoolNotFound"))
        },
    );
    assert_eq!(
        waiting["status"]["phase"], "Pending",
        "{}",
        waiting["status"]
    );
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: tessera.dev/v1alpha1\nkind: WorkerPool\nmetadata: {{name: own, namespace: studio}}\nspec:\n  \
             maxWorkers: 1\n  cooldownSeconds: 5\n  image: ghcr.io/tessera-dev/tessera-worker:0.1.0\n  \
             serviceAccountName: studio-worker\n  \
             s3: {{endpoint: \"{}\", region: us-east-1, credentialsSecret: studio-s3}}\n",
            proxy.url()
        )),
    );
    // The pool's creation wakes the waiting job (a watch, not the 30 s safety-net look).
    let created = std::time::Instant::now();
    wait_until(
        "the waiting job to be admitted on its new pool",
        Duration::from_secs(20),
        || {
            json(&["get", "tj", "own-keys", "-n", "studio", "-o", "json"])["status"]["conditions"]
                .as_array()
                .is_some_and(|c| !c.iter().any(|c| c["reason"] == "PoolNotFound"))
        },
    );
    eprintln!(
        "pool created → job admitted in {:.1} s",
        created.elapsed().as_secs_f64()
    );
    let mut last = Value::Null;
    wait_until(
        "the tenant's job to finish",
        Duration::from_secs(180),
        || {
            last = json(&["get", "tj", "own-keys", "-n", "studio", "-o", "json"]);
            matches!(
                last["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            )
        },
    );
    assert_eq!(last["status"]["phase"], "Succeeded", "{}", last["status"]);
    assert!(
        studio.object_path("studio", "out/small.mp4").exists(),
        "the output is in the tenant's own store: {:?}",
        studio.keys("studio")
    );
    // Every request the tenant's store saw was signed with the tenant's key pair.
    let seen = proxy.seen();
    assert!(seen.len() > 5, "{seen:?}");
    let keys: std::collections::BTreeSet<&str> =
        seen.iter().map(|r| r.access_key.as_str()).collect();
    assert_eq!(
        keys,
        [studio.access_key.as_str()].into_iter().collect(),
        "access keys seen by the tenant's store"
    );
    // The work ran as the tenant's account, in the tenant's namespace; the shared store holds none of it.
    let accounts: std::collections::BTreeSet<String> =
        json(&["get", "pods", "-n", "studio", "-o", "json"])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["spec"]["serviceAccountName"].as_str().map(String::from))
            .collect();
    assert!(
        accounts.is_empty() || accounts == ["studio-worker".to_string()].into_iter().collect(),
        "{accounts:?}"
    );
    assert!(!tessera_e2e::jobs::s3_dir().join("studio").exists());
    reliability_row(
        "security",
        HEADER,
        "a tenant's own pool (its namespace, ServiceAccount and credentials Secret)",
        &format!(
            "job completed; all {} requests to the tenant's store signed with the tenant's key; the shared credentials never used",
            seen.len()
        ),
    );
    let _ = kubectl(
        &["delete", "tj", "own-keys", "-n", "studio", "--wait=false"],
        None,
    );
    wait_until(
        "the tenant's job to be deleted",
        Duration::from_secs(60),
        || {
            !kubectl(&["get", "tj", "own-keys", "-n", "studio"], None)
                .status
                .success()
        },
    );
    let _ = kubectl(
        &["delete", "wp", "own", "-n", "studio", "--wait=false"],
        None,
    );
}

/// `kubectl auth can-i` as a ServiceAccount. `resource` may be `kind.group/NAME` or `kind.group:SUBRESOURCE`;
/// an empty `ns` asks cluster-wide.
fn can(sa: &str, verb: &str, resource: &str, ns: &str) -> bool {
    can_as(
        &format!("system:serviceaccount:tessera-system:{sa}"),
        verb,
        resource,
        ns,
    )
}

#[test]
fn the_operator_may_do_what_it_needs_and_nothing_else() {
    let _c = cluster();
    let op = "tessera-operator";
    for (verb, res, ns) in [
        ("watch", "transcodejobs.tessera.dev", "default"),
        ("patch", "transcodejobs.tessera.dev", "default"),
        ("delete", "transcodejobs.tessera.dev", "default"),
        ("patch", "transcodejobs.tessera.dev:status", "default"),
        ("list", "workerpools.tessera.dev", "tessera-system"),
        ("watch", "workerpools.tessera.dev", "tessera-system"),
        ("watch", "pods", "tessera-system"),
        ("patch", "workerpools.tessera.dev:status", "tessera-system"),
        ("create", "pods", "tessera-system"),
        ("delete", "pods", "tessera-system"),
        // The do-not-disrupt annotations of busy workers.
        ("patch", "pods", "tessera-system"),
        ("create", "events.events.k8s.io", "default"),
        ("create", "tokenreviews.authentication.k8s.io", ""),
        ("create", "leases.coordination.k8s.io", "tessera-system"),
        ("get", "namespaces", ""),
    ] {
        assert!(can(op, verb, res, ns), "the operator needs {verb} {res}");
    }
    for (verb, res, ns) in [
        ("get", "secrets", "tessera-system"),
        ("list", "secrets", "default"),
        ("update", "transcodejobs.tessera.dev", "default"),
        ("create", "workerpools.tessera.dev", "tessera-system"),
        ("create", "pods:exec", "tessera-system"),
        ("create", "deployments.apps", "tessera-system"),
        ("create", "leases.coordination.k8s.io", "kube-system"),
        ("update", "nodes", ""),
        ("list", "namespaces", ""),
        ("patch", "namespaces", ""),
        ("create", "serviceaccounts:token", "tessera-system"),
    ] {
        assert!(
            !can(op, verb, res, ns),
            "the operator must not {verb} {res} in {ns:?}"
        );
    }
    // Workers: read the leader Lease, nothing else.
    assert!(can(
        "tessera-worker",
        "get",
        "leases.coordination.k8s.io/tessera-operator-leader",
        "tessera-system"
    ));
    for (verb, res) in [
        ("list", "pods"),
        ("get", "secrets"),
        ("get", "leases.coordination.k8s.io/other"),
        ("list", "transcodejobs.tessera.dev"),
    ] {
        assert!(
            !can("tessera-worker", verb, res, "tessera-system"),
            "a worker must not {verb} {res}"
        );
    }
    // A forbidden call made with the operator's own token is refused by the API server.
    let token = kubectl_ok(&["create", "token", op, "-n", "tessera-system"], None)
        .trim()
        .to_string();
    let out = kubectl(
        &["get", "secrets", "-n", "tessera-system", "--token", &token],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("forbidden"), "{err}");
    reliability_row("security", HEADER, "operator RBAC", "every granted verb used; secrets, exec, spec updates, other namespaces' Leases: forbidden (checked with the API server's authorizer)");
}

#[test]
fn without_permission_to_create_pods_the_pool_cannot_scale_and_says_so() {
    let _c = cluster();
    // Start from an idle pool, so the job needs a new worker.
    wait_until("an idle pool", Duration::from_secs(60), || {
        live_workers("default") == 0
    });
    let role = json(&["get", "clusterrole", "tessera-operator"]);
    let original = serde_json::to_string(&role).unwrap();
    let mut cut = role.clone();
    let rules = cut["rules"].as_array_mut().unwrap();
    for r in rules.iter_mut() {
        if r["resources"] == serde_json::json!(["pods"]) {
            r["verbs"] = serde_json::json!(["list", "watch", "delete"]);
        }
    }
    cut["metadata"] = serde_json::json!({"name": "tessera-operator"});
    kubectl_ok(&["replace", "-f", "-"], Some(&cut.to_string()));
    let src = input("sec", 2);
    kubectl_ok(&["apply", "-f", "-"], Some(&job_yaml("noperm", &src, "")));
    wait_until(
        "the operator to report the refusal",
        Duration::from_secs(60),
        || {
            pod_logs("tessera-operator")
                .iter()
                .any(|(_, l)| l.contains("create a worker of pool") && l.contains("forbidden"))
        },
    );
    assert_eq!(
        live_workers("default"),
        0,
        "no worker without the permission"
    );
    assert_ne!(get_job("noperm").unwrap()["status"]["phase"], "Succeeded");
    // Restored, the same job completes.
    let mut back: Value = serde_json::from_str(&original).unwrap();
    back["metadata"] = serde_json::json!({"name": "tessera-operator"});
    kubectl_ok(&["replace", "-f", "-"], Some(&back.to_string()));
    wait_complete("noperm", Duration::from_secs(120));
    delete_job("noperm");
    reliability_row(
        "security",
        HEADER,
        "a permission removed (pods: create)",
        "no worker created, `forbidden` logged, job waits; restored, it completes",
    );
}

#[test]
fn pods_run_locked_down() {
    let _c = cluster();
    let src = input("sec", 2);
    kubectl_ok(&["apply", "-f", "-"], Some(&job_yaml("locked", &src, "")));
    wait_complete("locked", Duration::from_secs(120));
    let mut pods = json(&["get", "pods", "-n", "tessera-system"])["items"]
        .as_array()
        .cloned()
        .unwrap();
    pods.retain(|p| p["metadata"]["deletionTimestamp"].is_null());
    assert!(pods
        .iter()
        .any(|p| p["metadata"]["name"].as_str().unwrap().contains("-worker-")));
    for p in &pods {
        let name = p["metadata"]["name"].as_str().unwrap();
        let spec = &p["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
        }
    }
    delete_job("locked");
    reliability_row("security", HEADER, "pod hardening", "operator and worker pods: non-root, read-only root filesystem, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp");
}
