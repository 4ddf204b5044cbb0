//! Checks for the chart's monitoring: the metric names a PromQL expression references, every query of the
//! rendered PrometheusRule and Grafana dashboard, and the series names a `/metrics` exposition has, so a test
//! can prove that alerts and panels only name series the operator really exports.

use std::collections::BTreeSet;

use serde_json::Value;

/// PromQL functions, aggregation operators and keywords: identifiers that are never metric names.
const NOT_METRICS: &[&str] = &[
    // Aggregations.
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // Keywords and binary operators.
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
    // Functions.
    "abs",
    "absent",
    "absent_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "cos",
    "cosh",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "deg",
    "delta",
    "deriv",
    "double_exponential_smoothing",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "histogram_sum",
    "holt_winters",
    "hour",
    "idelta",
    "increase",
    "info",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "mad_over_time",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "pi",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rad",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sin",
    "sinh",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "tan",
    "tanh",
    "time",
    "timestamp",
    "vector",
    "year",
    // `@ start()` / `@ end()`.
    "start",
    "end",
];

/// Keywords followed by a parenthesised list of label names (not metrics).
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the string literal that starts at `i` (`"`, `'` or a backtick; backslash escapes in the
/// first two).
fn skip_string(s: &[char], i: usize) -> usize {
    let quote = s[i];
    let mut j = i + 1;
    while j < s.len() {
        if s[j] == '\\' && quote != '`' {
            j += 2;
            continue;
        }
        if s[j] == quote {
            return j + 1;
        }
        j += 1;
    }
    s.len()
}

/// Index just past the bracket that closes the one opening at `i`, skipping string literals inside.
fn skip_group(s: &[char], i: usize, open: char, close: char) -> usize {
    let mut depth = 0usize;
    let mut j = i;
    while j < s.len() {
        let c = s[j];
        if c == '"' || c == '\'' || c == '`' {
            j = skip_string(s, j);
            continue;
        }
        if c == open {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return j + 1;
            }
        }
        j += 1;
    }
    s.len()
}

fn next_non_space(s: &[char], mut i: usize) -> Option<(usize, char)> {
    while i < s.len() {
        if !s[i].is_whitespace() {
            return Some((i, s[i]));
        }
        i += 1;
    }
    None
}

/// The value of a string literal's text (between its quotes), with simple backslash escapes undone.
fn unquote(lit: &[char]) -> String {
    let quote = lit[0];
    let inner = &lit[1..lit.len().saturating_sub(1).max(1)];
    if quote == '`' {
        return inner.iter().collect();
    }
    let mut out = String::new();
    let mut k = 0;
    while k < inner.len() {
        if inner[k] == '\\' && k + 1 < inner.len() {
            out.push(inner[k + 1]);
            k += 2;
        } else {
            out.push(inner[k]);
            k += 1;
        }
    }
    out
}

/// Metric names named by an equality matcher on `__name__` inside a `{...}` selector (`{__name__="x"}`).
fn name_matchers(body: &[char], out: &mut BTreeSet<String>) {
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(body, i);
            continue;
        }
        if is_ident_start(c) {
            let start = i;
            while i < body.len() && is_ident_char(body[i]) {
                i += 1;
            }
            let label: String = body[start..i].iter().collect();
            let Some((op, oc)) = next_non_space(body, i) else {
                break;
            };
            // `=` only: `!=`, `=~` and `!~` do not name one metric.
            if oc != '=' || body.get(op + 1) == Some(&'~') {
                continue;
            }
            let Some((q, qc)) = next_non_space(body, op + 1) else {
                break;
            };
            if qc == '"' || qc == '\'' || qc == '`' {
                let end = skip_string(body, q);
                if label == "__name__" {
                    out.insert(unquote(&body[q..end]));
                }
                i = end;
            } else {
                i = op + 1;
            }
            continue;
        }
        i += 1;
    }
}

/// The metric names a PromQL expression references: identifiers that are not functions, aggregations or
/// keywords, outside label matchers (`{...}`), range and subquery brackets (`[...]`), label lists after
/// `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`, string literals and numbers (durations after
/// `offset` included). A `{__name__="x"}` matcher counts as `x`. Grafana variables (`$x`, `${x}`) are not
/// names. Comments (`# ...`) are skipped.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let s: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&s, i);
        } else if c == '{' {
            let end = skip_group(&s, i, '{', '}');
            name_matchers(&s[i + 1..end.saturating_sub(1).max(i + 1)], &mut out);
            i = end;
        } else if c == '[' {
            i = skip_group(&s, i, '[', ']');
        } else if c == '$' {
            // A Grafana variable: `$name`, `${name}` or `${name:format}`.
            i += 1;
            if s.get(i) == Some(&'{') {
                i = skip_group(&s, i, '{', '}');
            } else {
                while i < s.len() && is_ident_char(s[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && s.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // A number (1, 0.95, 1e-9, 0x1f) or a duration (5m, 1h30m).
            let hex = c == '0' && matches!(s.get(i + 1), Some('x') | Some('X'));
            i += 1;
            while i < s.len() {
                let d = s[i];
                let exponent_sign = (d == '+' || d == '-')
                    && !hex
                    && matches!(s[i - 1], 'e' | 'E')
                    && s.get(i + 1).is_some_and(|n| n.is_ascii_digit());
                if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                    i += 1;
                } else {
                    break;
                }
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = next_non_space(&s, i);
            if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                if let Some((p, '(')) = next {
                    i = skip_group(&s, p, '(', ')');
                }
            } else if NOT_METRICS.contains(&lower.as_str()) {
                // A function, aggregation or keyword.
            } else if matches!(next, Some((_, '('))) {
                // A function this list does not know; metric names are never called.
            } else {
                out.insert(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn expr_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn dashboard_panels(panels: &Value, prefix: &str, out: &mut Vec<(String, String)>) {
    let Some(panels) = panels.as_array() else {
        return;
    };
    for (n, panel) in panels.iter().enumerate() {
        let title = panel
            .get("title")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("#{n}"));
        if let Some(targets) = panel.get("targets").and_then(Value::as_array) {
            for (t, target) in targets.iter().enumerate() {
                if let Some(expr) = target.get("expr").and_then(expr_text) {
                    let reference = target
                        .get("refId")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("#{t}"));
                    out.push((format!("{prefix} panel {title:?} target {reference}"), expr));
                }
            }
        }
        if let Some(nested) = panel.get("panels") {
            dashboard_panels(nested, &format!("{prefix} row {title:?}"), out);
        }
    }
}

/// Every query of the rendered chart: each PrometheusRule rule's `expr` and each panel target's `expr` of the
/// Grafana dashboards in ConfigMaps (`*.json` data that parses as a dashboard; panels in rows included), as
/// (where, expr). `docs` are the rendered YAML documents as JSON values (null documents are skipped).
pub fn chart_queries(docs: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for doc in docs {
        let kind = str_at(doc, &["kind"]).unwrap_or_default();
        let name = str_at(doc, &["metadata", "name"]).unwrap_or_default();
        match kind {
            "PrometheusRule" => {
                let groups = doc
                    .pointer("/spec/groups")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                for group in groups {
                    let gname = str_at(group, &["name"]).unwrap_or_default();
                    let rules = group
                        .get("rules")
                        .and_then(Value::as_array)
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    for (r, rule) in rules.iter().enumerate() {
                        let Some(expr) = rule.get("expr").and_then(expr_text) else {
                            continue;
                        };
                        let what = str_at(rule, &["alert"])
                            .map(|a| format!("alert {a}"))
                            .or_else(|| str_at(rule, &["record"]).map(|r| format!("record {r}")))
                            .unwrap_or_else(|| format!("rule #{r}"));
                        out.push((format!("PrometheusRule {name} group {gname} {what}"), expr));
                    }
                }
            }
            "ConfigMap" => {
                let Some(data) = doc.get("data").and_then(Value::as_object) else {
                    continue;
                };
                for (key, text) in data {
                    if !key.ends_with(".json") {
                        continue;
                    }
                    let Some(text) = text.as_str() else {
                        continue;
                    };
                    let Ok(dashboard) = serde_json::from_str::<Value>(text) else {
                        continue;
                    };
                    // Dashboards exported for sharing may wrap the model in `{"dashboard": ...}`.
                    let dashboard = dashboard.get("dashboard").unwrap_or(&dashboard);
                    if let Some(panels) = dashboard.get("panels") {
                        dashboard_panels(panels, &format!("ConfigMap {name} {key}"), &mut out);
                    }
                    // Old-style dashboards: `rows[].panels[]`.
                    if let Some(rows) = dashboard.get("rows").and_then(Value::as_array) {
                        for row in rows {
                            if let Some(panels) = row.get("panels") {
                                dashboard_panels(
                                    panels,
                                    &format!("ConfigMap {name} {key}"),
                                    &mut out,
                                );
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The series names in a Prometheus or OpenMetrics text exposition: each sample line's name (up to `{` or
/// whitespace); `#` lines (HELP, TYPE, UNIT, EOF) and blank lines are not samples. A family without children
/// (a `Family` nothing was set in) has only `#` lines, so its name is not here.
pub fn exposed_names(metrics_text: &str) -> BTreeSet<String> {
    metrics_text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let end = l
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or(l.len());
            (end > 0).then(|| l[..end].to_owned())
        })
        .collect()
}

/// The series names an exposition declares in its `# TYPE` lines, as Prometheus stores them (counter:
/// `_total`; histogram: `_bucket`, `_sum`, `_count`; summary: the name, `_sum`, `_count`; info: `_info`;
/// gaugehistogram: `_bucket`, `_gsum`, `_gcount`; others: the name). Unlike `exposed_names`, this includes
/// families that have no sample yet (a label family nothing was set in).
pub fn declared_names(metrics_text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in metrics_text.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => {
                if name.ends_with("_total") {
                    &[""][..]
                } else {
                    &["_total"][..]
                }
            }
            "histogram" => &["_bucket", "_sum", "_count"][..],
            "gaugehistogram" => &["_bucket", "_gsum", "_gcount"][..],
            "summary" => &["", "_sum", "_count"][..],
            "info" => &["_info"][..],
            _ => &[""][..],
        };
        for suffix in suffixes {
            out.insert(format!("{name}{suffix}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names(expr: &str) -> Vec<String> {
        promql_metric_names(expr).into_iter().collect()
    }

    #[test]
    fn histogram_quantile_over_buckets() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.95, sum by (le, pool) (rate(tessera_x_bucket{namespace="a"}[5m])))"#
            ),
            ["tessera_x_bucket"]
        );
    }

    #[test]
    fn label_lists_matchers_and_strings_are_not_names() {
        assert_eq!(
            names(
                r#"(sum by (pool) (tessera_queue_queued_tasks{namespace="media", pool=~"a|b"}) > 0)
                   and on (pool)
                   (sum without (priority) (tessera_queue_leased_tasks{pool!="x{y}"}) == bool 0)"#
            ),
            ["tessera_queue_leased_tasks", "tessera_queue_queued_tasks"]
        );
        assert_eq!(
            names(r#"label_replace(up{job="x"}, "dst", "$1", "src", "(.*)")"#),
            ["up"]
        );
        assert_eq!(
            names(r#"count_values("le", foo) * on (a) group_left (b, c) bar:rate5m"#),
            ["bar:rate5m", "foo"]
        );
    }

    #[test]
    fn durations_numbers_offsets_and_variables() {
        assert_eq!(
            names("rate(a_total[$__rate_interval]) / clamp_min(b_total offset 1h30m, 1e-9) + 0x1F - .5"),
            ["a_total", "b_total"]
        );
        assert_eq!(
            names(r#"max_over_time(deriv(c{ns="$namespace"}[1h:5m])[1d:]) @ end() > Inf"#),
            ["c"]
        );
        assert_eq!(names("topk(${k}, d) unless ignoring(le) e # f"), ["d", "e"]);
    }

    #[test]
    fn absent_or_and_name_matcher() {
        assert_eq!(
            names(
                r#"(max(tessera_leader{namespace="m"}) < 1) or absent(tessera_leader{namespace="m"})"#
            ),
            ["tessera_leader"]
        );
        assert_eq!(
            names(r#"sum({__name__="tessera_jobs", stage="Failed"}) + {__name__=~"re.*"}"#),
            ["tessera_jobs"]
        );
        assert!(names("vector(1) + scalar(time())").is_empty());
    }

    #[test]
    fn chart_queries_finds_rules_and_nested_panels() {
        let dashboard = json!({
            "panels": [
                {"type": "row", "title": "R", "panels": [
                    {"title": "inner", "targets": [{"refId": "A", "expr": "inner_metric"}]}
                ]},
                {"title": "top", "targets": [{"refId": "B", "expr": "top_metric"}, {"refId": "C"}]}
            ]
        });
        let docs = vec![
            json!({"kind": "PrometheusRule", "metadata": {"name": "r"}, "spec": {"groups": [
                {"name": "g", "rules": [{"alert": "A", "expr": "rule_metric > 0"}, {"record": "x:y", "expr": "z"}]}
            ]}}),
            json!({"kind": "ConfigMap", "metadata": {"name": "d"},
                   "data": {"d.json": dashboard.to_string(), "other": "{}"}}),
            json!({"kind": "Service", "metadata": {"name": "s"}}),
            Value::Null,
        ];
        let q = chart_queries(&docs);
        let exprs: Vec<&str> = q.iter().map(|(_, e)| e.as_str()).collect();
        assert_eq!(
            exprs,
            ["rule_metric > 0", "z", "inner_metric", "top_metric"]
        );
        assert!(q[0].0.contains("alert A"), "{}", q[0].0);
        assert!(q[2].0.contains("inner"), "{}", q[2].0);
    }

    #[test]
    fn exposition_names() {
        let text = "# HELP tessera_leases Tasks leased.\n\
                    # TYPE tessera_leases counter\n\
                    tessera_leases_total 3\n\
                    # TYPE tessera_jobs gauge\n\
                    # TYPE tessera_queue_leased_tasks gauge\n\
                    tessera_queue_leased_tasks{pool=\"a/b\"} 0\n\
                    # TYPE tessera_d_seconds histogram\n\
                    tessera_d_seconds_sum 0.0\n\
                    tessera_d_seconds_count 0\n\
                    tessera_d_seconds_bucket{le=\"+Inf\"} 0\n\
                    # EOF\n";
        let exposed: Vec<String> = exposed_names(text).into_iter().collect();
        assert_eq!(
            exposed,
            [
                "tessera_d_seconds_bucket",
                "tessera_d_seconds_count",
                "tessera_d_seconds_sum",
                "tessera_leases_total",
                "tessera_queue_leased_tasks"
            ]
        );
        let declared = declared_names(text);
        assert!(declared.contains("tessera_jobs"));
        assert!(declared.contains("tessera_leases_total"));
        assert!(exposed_names(text).is_subset(&declared));
    }
}
