//! Tenancy: which namespaces may use a WorkerPool, and which S3 locations a job may read and write through it.
//! Pure: the operator fetches the pool and the job's namespace labels, calls these, and acts on the verdict
//! before anything is queued or read.
//!
//! ```text
//!  job (ns, pool, input, output) ──> pool_admits(pool.allowedNamespaces, pool ns, job ns, ns labels)
//!                                      no  ─> PoolNotAllowed (same words whether the pool exists or not)
//!                                      yes ─> check_access(pool.access, job ns, labels, input, output)
//!                                               no ─> AccessNotAllowed, naming the URI and the pool
//! ```
//!
//! Keys are compared as S3 stores them: literally, segment by segment. A prefix `s3://media/a/` does not admit
//! `s3://media/ab/x`, and keys with `.` or `..` segments, empty segments (`//`) or a percent sign are never
//! admitted: S3 keeps them literal, but stores that map keys to paths, and tools that decode URIs, do not.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The label every namespace carries from Kubernetes 1.21 on; on older servers it is taken as present.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Which namespaces: the Gateway API's `allowedRoutes.namespaces` shape.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespaces {
    /// `Same`: the pool's own namespace only (the default). `All`: every namespace. `Selector`: the namespaces
    /// whose labels match `selector` (`kubernetes.io/metadata.name` selects by name).
    #[serde(default)]
    pub from: NamespacesFrom,
    /// With `from: Selector`: a label selector over namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NamespacesFrom {
    #[default]
    Same,
    All,
    Selector,
}

/// S3 locations the matching namespaces may read and write through a pool. `{namespace}` in a location is
/// replaced by the job's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessRule {
    /// The namespaces this rule is for.
    #[serde(default)]
    pub namespaces: Namespaces,
    /// Prefixes (`s3://bucket/prefix/`) or objects a job may read its input from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read: Vec<String>,
    /// Prefixes a job may write its outputs (and its ledger) under; writing implies reading back there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub write: Vec<String>,
}

/// Whether `sel` admits a job in `job_ns` to a pool in `pool_ns`; `labels` are the job namespace's labels.
pub fn namespaces_admit(
    sel: &Namespaces,
    pool_ns: &str,
    job_ns: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    match sel.from {
        NamespacesFrom::Same => pool_ns == job_ns,
        NamespacesFrom::All => true,
        NamespacesFrom::Selector => sel
            .selector
            .as_ref()
            .is_some_and(|s| selector_matches(s, job_ns, labels)),
    }
}

/// Label-selector semantics (matchLabels AND matchExpressions; an empty selector matches everything), with
/// `kubernetes.io/metadata.name` always present as the namespace's name.
pub fn selector_matches(sel: &LabelSelector, ns: &str, labels: &BTreeMap<String, String>) -> bool {
    let get = |k: &str| -> Option<&str> {
        if k == NAMESPACE_NAME_LABEL {
            Some(ns)
        } else {
            labels.get(k).map(String::as_str)
        }
    };
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| get(k) == Some(v.as_str()));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => get(&e.key).is_some_and(|v| values.iter().any(|x| x == v)),
            "NotIn" => get(&e.key).is_none_or(|v| values.iter().all(|x| x != v)),
            "Exists" => get(&e.key).is_some(),
            "DoesNotExist" => get(&e.key).is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// `s3://bucket/key` split, or why it cannot be checked safely.
fn split(uri: &str) -> Result<(&str, &str), String> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{uri:?} is not an s3:// URI"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("{uri:?} has no bucket"));
    }
    if key.contains('%') {
        return Err(format!(
            "{uri:?}: '%' is not allowed in keys (some stores and tools decode it)"
        ));
    }
    let segs: Vec<&str> = key.split('/').collect();
    // The last segment may be empty (a prefix ends with '/'); no other may.
    let inner = &segs[..segs.len().saturating_sub(1)];
    if inner.iter().any(|s| s.is_empty()) || segs.iter().any(|s| *s == "." || *s == "..") {
        return Err(format!(
            "{uri:?}: empty, '.' and '..' segments are not allowed in keys"
        ));
    }
    Ok((bucket, key))
}

/// Whether `location` (a rule's prefix or object, `{namespace}` already replaced) covers `uri`. A location
/// ending in '/' covers the keys under it; one that does not covers that key and the keys under `location/`.
pub fn covers(location: &str, uri: &str) -> bool {
    let (Ok((lb, lk)), Ok((ub, uk))) = (split(location), split(uri)) else {
        return false;
    };
    if lb != ub {
        return false;
    }
    if lk.is_empty() {
        return true;
    }
    if lk.ends_with('/') {
        uk.starts_with(lk)
    } else {
        uk == lk || uk.strip_prefix(lk).is_some_and(|r| r.starts_with('/'))
    }
}

/// Check a job's input and output against a pool's rules. `Ok` when every URI is covered by a rule for the
/// job's namespace (an output's prefix by a `write` location; an input by `read` or `write`); otherwise the
/// first URI that is not, in words. A pool with no rules restricts nothing beyond its credentials.
pub fn check_access(
    rules: &[AccessRule],
    pool: &str,
    pool_ns: &str,
    job_ns: &str,
    labels: &BTreeMap<String, String>,
    input: &str,
    output: &str,
) -> Result<(), String> {
    let uris = [
        ("spec.input.uri", input, false),
        ("spec.output.uri", output, true),
    ];
    check_uris(rules, pool, pool_ns, job_ns, labels, &uris)
}

/// The pool's result store for a job in `job_ns` (`{namespace}` filled in), checked as a location the job
/// writes: `Ok(None)` for a pool without one.
pub fn result_store_for(
    rules: &[AccessRule],
    store: Option<&str>,
    pool: &str,
    pool_ns: &str,
    job_ns: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Option<String>, String> {
    let Some(store) = store else {
        return Ok(None);
    };
    let uri = store.replace("{namespace}", job_ns);
    let uris = [("the pool's spec.resultStore", uri.as_str(), true)];
    check_uris(rules, pool, pool_ns, job_ns, labels, &uris)?;
    Ok(Some(uri))
}

/// `(field, uri, writing)`: each must be covered by a rule for the job's namespace.
fn check_uris(
    rules: &[AccessRule],
    pool: &str,
    pool_ns: &str,
    job_ns: &str,
    labels: &BTreeMap<String, String>,
    uris: &[(&str, &str, bool)],
) -> Result<(), String> {
    if rules.is_empty() {
        return Ok(());
    }
    for &(field, uri, _) in uris {
        if let Err(why) = split(uri) {
            return Err(format!("{field}: {why}"));
        }
    }
    let mine: Vec<&AccessRule> = rules
        .iter()
        .filter(|r| namespaces_admit(&r.namespaces, pool_ns, job_ns, labels))
        .collect();
    let expand = |l: &String| l.replace("{namespace}", job_ns);
    for &(field, uri, writing) in uris {
        let ok = mine.iter().any(|r| {
            r.write.iter().map(expand).any(|l| covers(&l, uri))
                || (!writing && r.read.iter().map(expand).any(|l| covers(&l, uri)))
        });
        if !ok {
            return Err(format!(
                "{field}: {uri:?} is outside what WorkerPool {pool} lets namespace {job_ns} {}",
                if writing { "write" } else { "read" }
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn who_may_use_a_pool() {
        let none = labels(&[]);
        let same = Namespaces::default();
        assert!(namespaces_admit(&same, "media", "media", &none));
        assert!(!namespaces_admit(&same, "media", "other", &none));
        let all = Namespaces {
            from: NamespacesFrom::All,
            selector: None,
        };
        assert!(namespaces_admit(&all, "media", "other", &none));
        let by_label = Namespaces {
            from: NamespacesFrom::Selector,
            selector: Some(LabelSelector {
                match_labels: Some([("tessera.dev/tenant".to_string(), "yes".to_string())].into()),
                ..Default::default()
            }),
        };
        assert!(namespaces_admit(
            &by_label,
            "p",
            "a",
            &labels(&[("tessera.dev/tenant", "yes")])
        ));
        assert!(!namespaces_admit(
            &by_label,
            "p",
            "a",
            &labels(&[("tessera.dev/tenant", "no")])
        ));
        assert!(!namespaces_admit(&by_label, "p", "a", &none));
        let by_name = Namespaces {
            from: NamespacesFrom::Selector,
            selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: NAMESPACE_NAME_LABEL.into(),
                    operator: "In".into(),
                    values: Some(vec!["default".into(), "studio-a".into()]),
                }]),
                ..Default::default()
            }),
        };
        // The name label counts even where the server (1.20) does not set it.
        assert!(namespaces_admit(&by_name, "p", "studio-a", &none));
        assert!(!namespaces_admit(&by_name, "p", "studio-b", &none));
        let no_selector = Namespaces {
            from: NamespacesFrom::Selector,
            selector: None,
        };
        assert!(!namespaces_admit(&no_selector, "p", "p", &none));
    }

    #[test]
    fn locations_cover_keys_segment_by_segment() {
        let cases: &[(&str, &str, bool)] = &[
            ("s3://media/a/", "s3://media/a/x.mp4", true),
            ("s3://media/a/", "s3://media/ab/x.mp4", false),
            ("s3://media/a", "s3://media/ab/x.mp4", false),
            ("s3://media/a", "s3://media/a/x.mp4", true),
            ("s3://media/a", "s3://media/a", true),
            ("s3://media/a/", "s3://media/a/../b/x.mp4", false),
            ("s3://media/a/", "s3://media/a/./x.mp4", false),
            ("s3://media/a/", "s3://media/a//x.mp4", false),
            ("s3://media/a/", "s3://media/a/%2e%2e/b", false),
            ("s3://media/a/", "s3://other/a/x.mp4", false),
            ("s3://media/a/", "s3://mediaa/a/x.mp4", false),
            ("s3://media/", "s3://media/anything/x", true),
            ("s3://media", "s3://media/anything/x", true),
            ("s3://media/a/", "file:///media/a/x", false),
            ("s3://media/a/out/", "s3://media/a/out/", true),
        ];
        for (loc, uri, want) in cases {
            assert_eq!(covers(loc, uri), *want, "{loc} covers {uri}");
        }
    }

    fn rules() -> Vec<AccessRule> {
        vec![AccessRule {
            namespaces: Namespaces {
                from: NamespacesFrom::All,
                selector: None,
            },
            read: vec!["s3://media/{namespace}/".into()],
            write: vec!["s3://media/{namespace}/out/".into()],
        }]
    }

    #[test]
    fn a_result_store_is_per_namespace_and_inside_what_it_may_write() {
        let l = labels(&[]);
        let r = rules();
        let store =
            |s: &str, ns: &str| result_store_for(&r, Some(s), "shared/gpu", "shared", ns, &l);
        assert_eq!(
            store("s3://media/{namespace}/out/.results/", "a"),
            Ok(Some("s3://media/a/out/.results/".into()))
        );
        // One store for every namespace would let tenants share results: outside what each may write.
        let e = store("s3://media/results/", "a").unwrap_err();
        assert!(
            e.contains("spec.resultStore") && e.contains("s3://media/results/"),
            "{e}"
        );
        // Readable is not enough: results are written there.
        assert!(store("s3://media/{namespace}/cache/", "a").is_err());
        assert_eq!(result_store_for(&r, None, "p", "p", "a", &l), Ok(None));
        // A pool without rules limits nothing: its store is used as written.
        assert_eq!(
            result_store_for(&[], Some("s3://c/r/"), "p", "p", "a", &l),
            Ok(Some("s3://c/r/".into()))
        );
    }

    #[test]
    fn each_namespace_reaches_its_own_prefix_only() {
        let l = labels(&[]);
        let r = rules();
        let check =
            |ns: &str, i: &str, o: &str| check_access(&r, "shared/gpu", "shared", ns, &l, i, o);
        assert!(check("a", "s3://media/a/in.mp4", "s3://media/a/out/x/").is_ok());
        // Output under the write prefix only; input anywhere readable, including the write prefix.
        assert!(check("a", "s3://media/a/out/in.mp4", "s3://media/a/out/y/").is_ok());
        let e = check("a", "s3://media/b/in.mp4", "s3://media/a/out/x/").unwrap_err();
        assert_eq!(
            e,
            "spec.input.uri: \"s3://media/b/in.mp4\" is outside what WorkerPool shared/gpu lets namespace a read"
        );
        let e = check("a", "s3://media/a/in.mp4", "s3://media/b/out/x/").unwrap_err();
        assert!(
            e.starts_with("spec.output.uri:") && e.ends_with("write"),
            "{e}"
        );
        assert!(
            check("a", "s3://media/a/in.mp4", "s3://media/a/x/").is_err(),
            "read-only prefix"
        );
        // `ab` is not `a`, and '..' cannot climb out.
        assert!(check("a", "s3://media/ab/in.mp4", "s3://media/a/out/").is_err());
        assert!(check("a", "s3://media/a/../b/in.mp4", "s3://media/a/out/").is_err());
        assert!(check("a", "s3://media/a/%2e%2e/b/in.mp4", "s3://media/a/out/").is_err());
        assert!(check("a", "s3://media/a//in.mp4", "s3://media/a/out/").is_err());
        // No rules: the pool's credentials are the only limit.
        assert!(check_access(&[], "p", "p", "x", &l, "s3://any/k", "s3://any/o/").is_ok());
        // Rules for other namespaces only: nothing allowed.
        let only_b = vec![AccessRule {
            namespaces: Namespaces {
                from: NamespacesFrom::Selector,
                selector: Some(LabelSelector {
                    match_labels: Some(
                        [(NAMESPACE_NAME_LABEL.to_string(), "b".to_string())].into(),
                    ),
                    ..Default::default()
                }),
            },
            ..rules()[0].clone()
        }];
        assert!(check_access(
            &only_b,
            "p",
            "p",
            "a",
            &l,
            "s3://media/a/in.mp4",
            "s3://media/a/out/"
        )
        .is_err());
        assert!(check_access(
            &only_b,
            "p",
            "p",
            "b",
            &l,
            "s3://media/b/in.mp4",
            "s3://media/b/out/"
        )
        .is_ok());
    }
}
