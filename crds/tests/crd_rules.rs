//! The checked-in CRDs as the API server reads them: their CEL rules (`x-kubernetes-validations`), evaluated
//! client-side with Kubernetes' CEL functions (kube-cel; the local control plane, 1.20, does not enforce
//! them), agree with `validate_spec`; every property is described; both kinds are in the `tessera` category.

use std::path::PathBuf;

use kube::core::cel::Validator;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn crd(file: &str) -> Value {
    let text = std::fs::read_to_string(root().join("crds").join(file)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn schema(crd: &Value) -> Value {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The messages of the rules `new` breaks (as a create, or as an update of `old`).
fn broken(new: &Value, old: Option<&Value>) -> Vec<String> {
    let s = schema(&crd("transcodejob.yaml"));
    match Validator::new().validate(&s, new, old) {
        Ok(()) => vec![],
        Err(e) => e.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

/// A cluster job using most of the spec: every rule must accept it.
fn rich_job() -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "TranscodeJob",
        "metadata": {"name": "rich", "namespace": "studio"},
        "spec": {
            "input": {"uri": "s3://media/in/film.mkv"},
            "output": {"uri": "s3://media/out/film/", "container": "mp4"},
            "renditions": [
                {"name": "1080p", "video": {"codec": "h264", "height": 1080, "targetQuality": {"vmaf": 93, "minCrf": 18, "maxCrf": 30}, "maxrate": "6M", "preset": "slow"}},
                {"name": "av1", "video": {"codec": "av1", "crf": 63, "preset": "12"}, "audio": {"codec": "opus", "channels": 2}},
                {"name": "hevc", "video": {"codec": "hevc", "bitrate": "3M", "maxrate": "4M"}, "audio": {"codec": "aac", "channels": 6}}
            ],
            "streams": {"audio": {"languages": ["en", "fr"]}, "subtitles": {"none": true}},
            "thumbnails": {"intervalSeconds": 5, "width": 160},
            "chunking": {"targetSeconds": 4},
            "quality": {"metrics": ["vmaf"]},
            "hardware": "auto",
            "pool": "gpu",
            "priority": 5,
            "ttlSecondsAfterFinished": 3600
        }
    })
}

fn with(mut job: Value, pointer: &str, value: Value) -> Value {
    *job.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} in the job")) = value;
    job
}

fn rust_accepts(job: &Value) -> bool {
    let job: tessera_crds::TranscodeJob = serde_json::from_value(job.clone()).unwrap();
    tessera_crds::validate_spec(&job.spec).is_ok()
}

#[test]
fn the_rules_accept_the_example_jobs() {
    let text = std::fs::read_to_string(root().join("examples/transcodejob.yaml")).unwrap();
    let example: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(broken(&example, None), Vec::<String>::new());
    assert_eq!(broken(&rich_job(), None), Vec::<String>::new());
    assert!(rust_accepts(&rich_job()));
    // An hls job with aac: the opus rule looks at audio codecs only when the container is not mp4.
    let hls = with(rich_job(), "/spec/output/container", json!("hls"));
    let hls = with(hls, "/spec/renditions/1/audio", json!({"codec": "aac"}));
    assert_eq!(broken(&hls, None), Vec::<String>::new());
}

/// Each rule rejects its bad case, with its own message, and `validate_spec` (what `tessera run` and the
/// operator check) rejects the same case.
#[test]
fn each_rule_rejects_its_bad_case() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/spec/renditions/2/video",
            json!({"codec": "hevc", "crf": 20, "bitrate": "3M"}),
            "crf and bitrate are exclusive",
        ),
        (
            "/spec/renditions/0/video",
            json!({"codec": "h264", "crf": 20, "targetQuality": {"vmaf": 90}}),
            "targetQuality is exclusive",
        ),
        (
            "/spec/renditions/0/video",
            json!({"codec": "h264", "crf": 52}),
            "crf is out of range for h264 and hevc",
        ),
        (
            "/spec/renditions/0/video",
            json!({"codec": "hevc", "targetQuality": {"vmaf": 90, "maxCrf": 60}}),
            "minCrf and maxCrf are out of range",
        ),
        (
            "/spec/renditions/0/video",
            json!({"codec": "h264", "targetQuality": {"vmaf": 90, "minCrf": 30, "maxCrf": 20}}),
            "minCrf is above maxCrf",
        ),
        (
            "/spec/renditions/0/video",
            json!({"codec": "h264", "preset": "12"}),
            "unknown preset",
        ),
        (
            "/spec/renditions/1/video",
            json!({"codec": "av1", "preset": "slow"}),
            "unknown preset",
        ),
        (
            "/spec/renditions/1/audio",
            json!({"codec": "opus", "channels": 6}),
            "opus output is limited to 2 channels",
        ),
        (
            "/spec/output/container",
            json!("cmaf"),
            "opus audio is not playable in hls and cmaf",
        ),
        (
            "/spec/streams/subtitles",
            json!({"none": true, "languages": ["en"]}),
            "none excludes languages and indices",
        ),
        (
            "/spec/input/uri",
            json!("file:///data/in.mp4"),
            "file:// is for `tessera run`",
        ),
        (
            "/spec/output/uri",
            json!("file:///data/out/"),
            "file:// is for `tessera run`",
        ),
    ];
    for (pointer, value, expected) in cases {
        let job = with(rich_job(), pointer, value.clone());
        let messages = broken(&job, None);
        assert!(
            messages.len() == 1 && messages[0].contains(expected),
            "{pointer} = {value}: expected only {expected:?}, got {messages:?}"
        );
        // file:// is fine for `tessera run`, which is what validate_spec also serves.
        if !expected.starts_with("file://") {
            assert!(
                !rust_accepts(&job),
                "validate_spec accepts {pointer} = {value}"
            );
        }
    }
}

#[test]
fn what_a_job_produces_is_immutable_and_its_scheduling_is_not() {
    let old = rich_job();
    let edits: Vec<(&str, Value, Option<&str>)> = vec![
        (
            "/spec/input/uri",
            json!("s3://media/in/other.mkv"),
            Some("spec.input is immutable"),
        ),
        (
            "/spec/output/uri",
            json!("s3://media/out/other/"),
            Some("spec.output is immutable"),
        ),
        (
            "/spec/renditions/0/video/height",
            json!(720),
            Some("spec.renditions is immutable"),
        ),
        (
            "/spec/chunking/targetSeconds",
            json!(2),
            Some("spec.chunking is immutable"),
        ),
        (
            "/spec/streams/audio/languages",
            json!(["en"]),
            Some("spec.streams is immutable"),
        ),
        (
            "/spec/thumbnails/width",
            json!(320),
            Some("spec.thumbnails is immutable"),
        ),
        (
            "/spec/quality/metrics",
            json!(["psnr"]),
            Some("spec.quality is immutable"),
        ),
        (
            "/spec/hardware",
            json!("software"),
            Some("spec.hardware is immutable"),
        ),
        ("/spec/pool", json!("other"), Some("spec.pool is immutable")),
        ("/spec/priority", json!(100), None),
        ("/spec/ttlSecondsAfterFinished", json!(60), None),
    ];
    for (pointer, value, expected) in edits {
        let new = with(old.clone(), pointer, value.clone());
        let messages = broken(&new, Some(&old));
        match expected {
            Some(e) => assert!(
                messages.len() == 1 && messages[0].contains(e),
                "{pointer} = {value}: expected only {e:?}, got {messages:?}"
            ),
            None => assert_eq!(messages, Vec::<String>::new(), "{pointer} = {value}"),
        }
        // The same object as a create: transition rules do not apply.
        assert_eq!(
            broken(&new, None),
            Vec::<String>::new(),
            "{pointer} = {value}"
        );
    }
    // Adding an optional section to a running job, or removing one, is an edit too.
    let mut added = old.clone();
    added["spec"]["suspend"] = json!(true);
    assert_eq!(broken(&added, Some(&old)), Vec::<String>::new(), "suspend");
    let mut removed = old.clone();
    removed["spec"].as_object_mut().unwrap().remove("chunking");
    let messages = broken(&removed, Some(&old));
    assert!(
        messages
            .iter()
            .any(|m| m.contains("spec.chunking is immutable")),
        "{messages:?}"
    );
}

/// A ladder may stand in for the renditions; its own rules reject its bad cases; it is immutable.
#[test]
fn a_ladder_builds_renditions_and_keeps_its_rules() {
    let mut job = rich_job();
    job["spec"]["ladder"] = json!({"codec": "h264", "targetQuality": {"vmaf": 93}, "maxHeight": 1080, "preset": "fast"});
    assert_eq!(broken(&job, None), Vec::<String>::new());
    job["spec"]["output"]["container"] = json!("hls");
    job["spec"]["renditions"] = json!([]);
    assert_eq!(broken(&job, None), Vec::<String>::new(), "a ladder alone");
    assert!(rust_accepts(&job));
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/spec/ladder",
            Value::Null,
            "give renditions, a ladder, or both",
        ),
        ("/spec/ladder/preset", json!("7"), "unknown preset"),
        (
            "/spec/ladder/minHeight",
            json!(2160),
            "minHeight is above maxHeight",
        ),
        (
            "/spec/ladder/audio",
            json!({"codec": "opus"}),
            "opus audio is not playable in hls and cmaf",
        ),
    ];
    for (pointer, value, expected) in cases {
        let mut bad = job.clone();
        if value.is_null() {
            bad["spec"].as_object_mut().unwrap().remove("ladder");
        } else {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            bad.pointer_mut(parent).unwrap()[key] = value.clone();
        }
        let messages = broken(&bad, None);
        assert!(
            messages.len() == 1 && messages[0].contains(expected),
            "{pointer} = {value}: expected only {expected:?}, got {messages:?}"
        );
        assert!(
            !rust_accepts(&bad),
            "validate_spec accepts {pointer} = {value}"
        );
    }
    let edited = with(job.clone(), "/spec/ladder/targetQuality/vmaf", json!(95));
    let messages = broken(&edited, Some(&job));
    assert!(
        messages.len() == 1 && messages[0].contains("spec.ladder is immutable"),
        "{messages:?}"
    );
}

/// `kubectl explain` has something to say about every field, and `kubectl get tessera` lists both kinds.
#[test]
fn every_property_is_described_and_both_kinds_are_in_the_category() {
    fn walk(s: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = s["properties"].as_object() {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(p.clone());
                }
                walk(v, &p, missing);
            }
        }
        if s["items"].is_object() {
            walk(&s["items"], &format!("{path}[]"), missing);
        }
        if s["additionalProperties"].is_object() {
            walk(&s["additionalProperties"], &format!("{path}{{}}"), missing);
        }
    }
    for file in ["transcodejob.yaml", "workerpool.yaml"] {
        let c = crd(file);
        let s = schema(&c);
        let root = s["description"].as_str().unwrap_or("");
        assert!(
            !root.is_empty() && !root.contains("Auto-generated"),
            "{file}: root description {root:?}"
        );
        let mut missing = vec![];
        walk(&s, "", &mut missing);
        assert_eq!(
            missing,
            Vec::<String>::new(),
            "{file}: properties without a description"
        );
        assert_eq!(
            c["spec"]["names"]["categories"],
            json!(["tessera"]),
            "{file}"
        );
        // Conditions are a map keyed by type, so a server-side apply merges them per type.
        let conditions = &s["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{file}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            json!(["type"]),
            "{file}"
        );
    }
}
