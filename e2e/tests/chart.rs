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
    let out = Command::new(helm())
        .args([
            "template",
            "tessera",
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
    use k8s_openapi::api::core::v1::{Service, ServiceAccount};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
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
            "CustomResourceDefinition" => round_trip::<CustomResourceDefinition>(d),
            "WorkerPool" => round_trip::<tessera_crds::WorkerPool>(d),
            // The Prometheus operator's type; checked for shape only.
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
        "CustomResourceDefinition",
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
