//! Flux's verdict on a Tessera object from the `healthCheckExprs` in `flux/kustomization-health.yaml`,
//! evaluated with a CEL interpreter the way Flux does: the object's top-level fields are the variables;
//! `inProgress`, then `failed`, then `current` decide; none true (or an expression failing on a field
//! that is not there yet) is InProgress.

use serde_json::Value;

use crate::cluster::root;

/// `Current`, `Failed` or `InProgress`.
pub fn health(kind: &str, obj: &Value) -> &'static str {
    let text = std::fs::read_to_string(root().join("flux/kustomization-health.yaml"))
        .expect("flux/kustomization-health.yaml");
    let k: Value = serde_yaml::from_str(&text).expect("the Flux snippet is YAML");
    let check = k["spec"]["healthCheckExprs"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["kind"] == kind))
        .unwrap_or_else(|| panic!("no healthCheckExprs for {kind}"));
    let is = |key: &str| -> bool {
        let Some(expr) = check[key].as_str() else {
            return false;
        };
        let program = cel::Program::compile(expr)
            .unwrap_or_else(|e| panic!("{kind} {key}: not CEL: {e}\n{expr}"));
        let mut ctx = cel::Context::default();
        for field in ["apiVersion", "kind", "metadata", "spec", "status"] {
            let v = obj
                .get(field)
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            ctx.add_variable(field, v).expect("JSON is a CEL value");
        }
        matches!(program.execute(&ctx), Ok(cel::Value::Bool(true)))
    };
    if is("inProgress") {
        "InProgress"
    } else if is("failed") {
        "Failed"
    } else if is("current") {
        "Current"
    } else {
        "InProgress"
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn verdicts_follow_the_conditions() {
        let cond = |t: &str, s: &str| json!({"type": t, "status": s});
        let job = |conds: Vec<Value>, suspend: bool| {
            json!({"metadata": {"generation": 2}, "spec": {"suspend": suspend},
                   "status": {"observedGeneration": 2, "conditions": conds}})
        };
        use serde_json::Value;
        let h = |v: &Value| super::health("TranscodeJob", v);
        assert_eq!(h(&job(vec![cond("Ready", "True")], false)), "Current");
        assert_eq!(
            h(&job(
                vec![cond("Ready", "False"), cond("Reconciling", "True")],
                false
            )),
            "InProgress"
        );
        assert_eq!(
            h(&job(
                vec![cond("Ready", "False"), cond("Stalled", "True")],
                false
            )),
            "Failed"
        );
        assert_eq!(h(&job(vec![cond("Ready", "False")], true)), "Current");
        assert_eq!(
            h(&json!({"metadata": {"generation": 1}, "spec": {}})),
            "InProgress"
        );
        let mut stale = job(vec![cond("Ready", "True")], false);
        stale["metadata"]["generation"] = 3.into();
        assert_eq!(h(&stale), "InProgress");
    }
}
