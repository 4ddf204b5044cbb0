//! Argo CD's view of Tessera's objects: the `health.lua` checks and resource actions under `argocd/`, run
//! with a Lua 5.1 interpreter (`lua5.1`, as Argo CD's gopher-lua is 5.1) on objects read from the cluster.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::cluster::root;

/// A JSON value as a Lua table constructor, as Argo CD hands objects to its scripts.
pub fn lua_literal(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                match b {
                    b'"' => out.push_str("\\\""),
                    b'\\' => out.push_str("\\\\"),
                    0x20..=0x7e => out.push(b as char),
                    _ => out.push_str(&format!("\\{b}")),
                }
            }
            out.push('"');
            out
        }
        Value::Array(a) => format!(
            "{{{}}}",
            a.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!(
                    "[{}] = {}",
                    lua_literal(&Value::from(k.as_str())),
                    lua_literal(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Run `argocd/tessera.dev/<kind>/<script>` with the global `obj`, then `after` (Lua that prints).
fn run(kind: &str, script: &str, obj: &Value, after: &str) -> Vec<String> {
    let path = root().join("argocd/tessera.dev").join(kind).join(script);
    let body = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let program = format!(
        "obj = {}\nlocal function script()\n{body}\nend\nlocal result = script()\n{after}\n",
        lua_literal(obj)
    );
    let mut child = Command::new("lua5.1")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lua5.1 runs (make setup installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(program.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{kind}/{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// `(status, message)` of Argo CD's health check for `obj` (`TranscodeJob` or `WorkerPool`).
pub fn health(kind: &str, obj: &Value) -> (String, String) {
    let lines = run(
        kind,
        "health.lua",
        obj,
        "print(result.status)\nprint(result.message)",
    );
    (
        lines.first().cloned().unwrap_or_default(),
        lines.get(1).cloned().unwrap_or_default(),
    )
}

/// The TranscodeJob actions Argo CD offers for `obj` (those not disabled), sorted.
pub fn actions(obj: &Value) -> Vec<String> {
    let mut names = run(
        "TranscodeJob",
        "actions/discovery.lua",
        obj,
        "for name, a in pairs(result) do if not a.disabled then print(name) end end",
    );
    names.sort();
    names
}

/// `spec.suspend` after running the `suspend` or `resume` action on `obj`.
pub fn suspend_after(action: &str, obj: &Value) -> bool {
    run(
        "TranscodeJob",
        &format!("actions/{action}/action.lua"),
        obj,
        "print(tostring(result.spec.suspend))",
    ) == ["true"]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Messages reach Argo CD as the operator wrote them: quotes, backslashes, newlines and UTF-8 intact.
    #[test]
    fn health_messages_survive_the_trip_into_lua() {
        let msg = "s3://b/\"in\".mp4: not found \\ naïve — ok";
        let job = json!({"spec": {"suspend": false}, "status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "InputNotFound", "message": msg},
            {"type": "Ready", "status": "False", "reason": "InputNotFound", "message": msg}
        ]}});
        assert_eq!(
            health("TranscodeJob", &job),
            ("Degraded".into(), format!("InputNotFound: {msg}"))
        );
        assert_eq!(
            health("TranscodeJob", &json!({"spec": {}})).0,
            "Progressing"
        );
    }
}
