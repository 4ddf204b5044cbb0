//! The Helm chart: `helm lint`, and every rendered manifest checked against the Kubernetes 1.33 API types
//! (k8s-openapi's `v1_33`) and Tessera's own CRD types. A manifest is read into its type and written back;
//! a field that does not exist in 1.33 (a typo, a removed field) is lost on the way and fails the test, as
//! does a wrong type.

use std::process::Command;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tessera_e2e::cluster::root;

fn helm() -> std::path::PathBuf {
    tessera_e2e::s3server::cache_dir().join("kubectl-helm-2.2.2/bin/helm")
}

/// Drop nulls and empty maps on both sides: serialisation leaves out absent optional fields.
fn normalise(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalise(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalise).collect()),
        // Numbers compare by value: Helm's `fromYaml | toYaml` writes the CRDs' `0.0` as `0`.
        Value::Number(n) if !n.is_i64() && !n.is_u64() => n
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
            .map_or_else(|| v.clone(), |f| Value::from(f as i64)),
        // Quantities and int-or-string ports come back as written.
        other => other.clone(),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T =
        serde_json::from_value(doc.clone()).map_err(|e| format!("does not fit the type: {e}"))?;
    let back = normalise(&serde_json::to_value(&typed).unwrap());
    let want = normalise(doc);
    if back != want {
        return Err(format!(
            "fields unknown to the API type were dropped:\n rendered: {want}\n typed:    {back}"
        ));
    }
    Ok(())
}

fn render(args: &[&str]) -> Vec<Value> {
    render_release("tessera", args)
}

fn render_release(release: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(helm())
        .args([
            "template",
            release,
            root().join("charts/tessera").to_str().unwrap(),
            "-n",
            "tessera-system",
            "--include-crds",
        ])
        .args(args)
        .output()
        .expect("helm runs (make k8s-tools installs it)");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.split("\n---")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn helm_lint_passes() {
    let out = Command::new(helm())
        .args([
            "lint",
            "--strict",
            root().join("charts/tessera").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rendered_manifests_fit_kubernetes_1_33_and_the_crd_types() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

    let docs = render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "s3.endpoint=http://minio:9000",
        "--set",
        "s3.credentialsSecret=s3",
        "--set",
        "defaultPool.runtimeClassName=nvidia",
        "--set",
        "tests.location=s3://media/helm-test/",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "podMonitor.enabled=true",
        "--set",
        "logFormat=json",
        "--set",
        "worker.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn=arn:aws:iam::1:role/w",
    ]);
    let mut kinds = Vec::new();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or_default().to_string();
        let res = match kind.as_str() {
            "Deployment" => round_trip::<Deployment>(d),
            "Service" => round_trip::<Service>(d),
            "ServiceAccount" => round_trip::<ServiceAccount>(d),
            "ClusterRole" => round_trip::<ClusterRole>(d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(d),
            "Role" => round_trip::<Role>(d),
            "RoleBinding" => round_trip::<RoleBinding>(d),
            "NetworkPolicy" => round_trip::<NetworkPolicy>(d),
            "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(d),
            "Job" => round_trip::<Job>(d),
            "Pod" => round_trip::<Pod>(d),
            "ConfigMap" => round_trip::<ConfigMap>(d),
            // The Prometheus operator's type; checked for shape only.
            "PrometheusRule" => d["spec"]["groups"][0]["rules"]
                .as_array()
                .filter(|r| r.len() >= 4)
                .map(drop)
                .ok_or_else(|| "fewer than 4 rules".to_string()),
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(d),
            "WorkerPool" => round_trip::<tessera_crds::WorkerPool>(d),
            // The Prometheus operator's type; checked for shape only.
            "PodMonitor" => d["spec"]["podMetricsEndpoints"]
                .as_array()
                .filter(|e| e.iter().any(|e| e["port"] == "metrics"))
                .map(drop)
                .ok_or_else(|| "no metrics endpoint".to_string()),
            "ServiceMonitor" => d["spec"]["endpoints"]
                .as_array()
                .filter(|e| !e.is_empty())
                .map(drop)
                .ok_or_else(|| "no endpoints".to_string()),
            other => Err(format!("unexpected kind {other}")),
        };
        if let Err(e) = res {
            panic!("{kind} {}: {e}", d["metadata"]["name"]);
        }
        kinds.push(kind);
    }
    for k in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "WorkerPool",
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
        "CustomResourceDefinition",
        "PodDisruptionBudget",
        "Job",
        "Pod",
        "ConfigMap",
        "PrometheusRule",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} rendered");
    }
    // The operator runs locked down.
    let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let sc = &dep["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        dep["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(dep["spec"]["replicas"], 2);
    // Images follow the chart's appVersion; the workers' ServiceAccount carries the cloud identity.
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("charts/tessera/Chart.yaml")).unwrap(),
    )
    .unwrap();
    let app = chart["appVersion"].as_str().unwrap();
    let pool = docs.iter().find(|d| d["kind"] == "WorkerPool").unwrap();
    assert_eq!(
        pool["spec"]["image"],
        format!("ghcr.io/tessera-dev/tessera-worker:{app}")
    );
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/tessera-dev/tessera-operator:{app}")
    );
    let sa = docs
        .iter()
        .find(|d| {
            d["kind"] == "ServiceAccount"
                && d["metadata"]["name"] == pool["spec"]["serviceAccountName"]
        })
        .expect("the pool's ServiceAccount is the chart's");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::1:role/w"
    );
    // Every alert and dashboard query names a tessera_ metric (that the operator exports them is checked
    // against its real /metrics in e2e/tests/operator.rs).
    let queries = tessera_e2e::monitoring::chart_queries(&docs);
    assert!(queries.len() >= 10, "{queries:?}");
    for (at, q) in &queries {
        let names = tessera_e2e::monitoring::promql_metric_names(q);
        assert!(
            !names.is_empty() && names.iter().all(|n| n.starts_with("tessera_")),
            "{at}: {q}"
        );
    }
}

/// values.schema.json: a wrong type or an unknown key fails `helm template` and `helm lint --strict`,
/// naming the value.
#[test]
fn the_values_schema_rejects_wrong_types_and_unknown_keys() {
    let chart = root().join("charts/tessera");
    for (set, says) in [
        ("defaultPool.maxWorkers=lots", "/defaultPool/maxWorkers"),
        ("operator.replica=3", "replica"),
        ("s3.endpoint=minio:9000", "/s3/endpoint"),
        ("queue.port=70000", "/queue/port"),
    ] {
        for cmd in [&["template", "t"][..], &["lint", "--strict"][..]] {
            let out = Command::new(helm())
                .args(cmd)
                .arg(&chart)
                .args(["--set", set])
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "helm {cmd:?} --set {set} passed");
            assert!(text.contains(says), "helm {cmd:?} --set {set}: {text}");
        }
    }
}

/// Names fit 63 characters for the longest release name Helm allows (53), and two releases in one
/// namespace (the second with its own default pool) share no object.
#[test]
fn long_release_names_fit_and_two_releases_share_no_object() {
    use std::collections::BTreeSet;
    let long = "a-release-name-of-fifty-three-characters-for-the-test";
    assert_eq!(long.len(), 53);
    let ids = |docs: &[Value]| -> BTreeSet<(String, String, String)> {
        docs.iter()
            .filter(|d| d["kind"] != "CustomResourceDefinition")
            .map(|d| {
                (
                    d["kind"].as_str().unwrap().to_string(),
                    d["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    d["metadata"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let args = [
        "--set",
        "tests.location=s3://m/t/",
        "--set",
        "prometheusRule.enabled=true",
    ];
    let docs = render_release(long, &args);
    for (kind, _, name) in ids(&docs) {
        assert!(name.len() <= 63, "{kind} {name}: {} characters", name.len());
    }
    for d in &docs {
        for (k, v) in d["metadata"]["labels"].as_object().into_iter().flatten() {
            assert!(
                v.as_str().unwrap().len() <= 63,
                "{} label {k}={v}",
                d["kind"]
            );
        }
    }
    let first = ids(&render(&args));
    let mut second_args = args.to_vec();
    second_args.extend([
        "--set",
        "defaultPool.name=canary",
        "--set",
        "operator.primary=false",
    ]);
    let second = render_release("canary", &second_args);
    let second_ids = ids(&second);
    let shared: Vec<_> = first.intersection(&second_ids).collect();
    assert!(shared.is_empty(), "both releases render {shared:?}");
    // The second release's operator is not the primary and serves the pool it labels as its own.
    let dep = second.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let var = |n: &str| env.iter().find(|e| e["name"] == n).unwrap()["value"].clone();
    assert_eq!(var("TESSERA_PRIMARY"), "false");
    let pool = second.iter().find(|d| d["kind"] == "WorkerPool").unwrap();
    assert_eq!(
        pool["metadata"]["labels"]["tessera.dev/operator"],
        var("TESSERA_INSTANCE")
    );
}

#[test]
fn every_rbac_rule_is_explained() {
    let text = std::fs::read_to_string(root().join("charts/tessera/templates/rbac.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with("- apiGroups:") {
            assert!(
                i > 0 && lines[i - 1].trim_start().starts_with('#'),
                "rbac.yaml line {}: a rule without a comment saying why",
                i + 1
            );
        }
    }
}

/// The chart's CRDs install on every server from 1.20: they carry no CEL rules (a server before 1.25 refuses
/// `x-kubernetes-validations`) and are otherwise the CRDs `make crds` generated; `crds/` has the rules.
#[test]
fn the_charts_crds_install_before_kubernetes_1_25_and_crds_has_the_cel_rules() {
    let crds: Vec<Value> = render(&["--kube-version", "1.20.2"])
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 2);
    for crd in &crds {
        let file = match crd["metadata"]["name"].as_str().unwrap() {
            "transcodejobs.tessera.dev" => "transcodejob.yaml",
            "workerpools.tessera.dev" => "workerpool.yaml",
            other => panic!("unexpected CRD {other}"),
        };
        let read = |dir: &str| -> Value {
            serde_yaml::from_str(&std::fs::read_to_string(root().join(dir).join(file)).unwrap())
                .unwrap()
        };
        assert!(
            normalise(&crd["spec"]) == normalise(&read("crds/pre-cel")["spec"]),
            "{file}: the chart's CRD differs from crds/pre-cel/"
        );
        assert!(!serde_json::to_string(crd)
            .unwrap()
            .contains("x-kubernetes-validations"));
        if file == "transcodejob.yaml" {
            let full = serde_json::to_string(&read("crds")).unwrap();
            assert!(full.contains("x-kubernetes-validations"), "crds/{file}");
        }
    }
}
