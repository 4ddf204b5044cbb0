//! `tessera doctor`: check this machine's encoders and decoders, a storage location, and (with `--cluster`) the
//! cluster Tessera runs on. Every check ends ok, warn or fail, with the fix where there is one; the exit status
//! is non-zero when any check fails.
//!
//! ```text
//!  media    FFmpeg version; per hardware family: open each encoder with real settings (as a job would),
//!           open each hardware decode device; software encoders (the fallback)
//!  storage  endpoint and region; where credentials come from (the SDK's chain, resolved for real);
//!           the object read (HEAD), a tiny object written, read back and removed
//!  cluster  API server; CRDs and their versions; the operator's leader Lease and queue; each WorkerPool
//!           (desired/pending/ready, and why pods are Pending); GPU nodes and their device resources
//! ```
//!
//! The checks themselves do I/O; turning what they saw into a verdict (`pending_reason`, `gpu_resources`,
//! `credential_source`) is pure and unit-tested.

use std::time::Duration;

use ffmpeg_next as ff;
use serde::Serialize;
use tessera_crds::{Hardware, VideoCodec};

use tessera_engine::s3::{self, classify, S3Uri, Settings, S3};
use tessera_engine::{encode, hwdec, plan};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub area: &'static str,
    pub name: String,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(
        area: &'static str,
        name: impl Into<String>,
        status: Status,
        message: impl Into<String>,
    ) -> Self {
        Self {
            area,
            name: name.into(),
            status,
            message: message.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

pub struct Options {
    /// A `s3://bucket/prefix/`, `s3://bucket/key` or `file:///dir/` to check.
    pub storage: Option<String>,
    pub cluster: bool,
    /// The operator's namespace.
    pub namespace: String,
}

/// Run the checks that `opts` asks for.
pub fn run(opts: &Options) -> Vec<Check> {
    let mut out = media();
    if let Some(uri) = &opts.storage {
        out.extend(storage(uri));
    }
    if opts.cluster {
        out.extend(s3::block_on(cluster(&opts.namespace)));
    }
    out
}

/// Whether any check failed.
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

/// The human report: one line per check, the fix indented under it.
pub fn render(checks: &[Check]) -> String {
    let mut s = String::new();
    let mut area = "";
    for c in checks {
        if c.area != area {
            area = c.area;
            s.push_str(&format!("{area}\n"));
        }
        let tag = match c.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        s.push_str(&format!("  {tag}  {}: {}\n", c.name, c.message));
        if let Some(f) = &c.fix {
            s.push_str(&format!("        fix: {f}\n"));
        }
    }
    let (w, f) = (
        checks.iter().filter(|c| c.status == Status::Warn).count(),
        checks.iter().filter(|c| c.status == Status::Fail).count(),
    );
    s.push_str(&format!(
        "{} checks: {} ok, {w} warn, {f} failed\n",
        checks.len(),
        checks.len() - w - f
    ));
    s
}

// ---------------------------------------------------------------------------------------------------------
// Media

const CODECS: [VideoCodec; 3] = [VideoCodec::H264, VideoCodec::Hevc, VideoCodec::Av1];

fn trial_target() -> encode::VideoTarget {
    encode::VideoTarget::plain(320, 240)
}

/// Open `name` as a job would (SVT-AV1 only by lookup: it cannot be opened without frames).
fn try_encoder(name: &str, codec: VideoCodec) -> Result<(), String> {
    if name == "libsvtav1" {
        return ff::encoder::find_by_name(name)
            .map(drop)
            .ok_or_else(|| "not built into this FFmpeg".into());
    }
    let r: tessera_crds::Rendition = serde_yaml::from_str(&format!(
        "{{name: doctor, video: {{codec: {}, height: 240}}}}",
        serde_json::to_value(codec)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    ))
    .map_err(|e| e.to_string())?;
    let pix = encode::encoder_pix_fmt(name, 8, codec);
    encode::open_video(name, &r, &trial_target(), pix).map(drop)
}

/// Group "name: reason" pairs by reason: `h264_nvenc, hevc_nvenc: no device; av1_nvenc: not built in`.
fn grouped(failures: &[(String, String)]) -> String {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for (name, why) in failures {
        match groups.iter_mut().find(|(w, _)| w == why) {
            Some((_, names)) => names.push(name.clone()),
            None => groups.push((why.clone(), vec![name.clone()])),
        }
    }
    groups
        .into_iter()
        .map(|(why, names)| format!("{}: {why}", names.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn media() -> Vec<Check> {
    tessera_engine::avlog::init();
    let mut out = vec![Check::new(
        "media",
        "FFmpeg",
        Status::Ok,
        format!("libraries {}", encode::ffmpeg_version()),
    )];
    let software: Vec<&str> = CODECS
        .iter()
        .filter_map(|c| {
            plan::encoder_candidates(*c, Hardware::Software)
                .into_iter()
                .find(|n| try_encoder(n, *c).is_ok())
        })
        .collect();
    for (family, hw) in [
        ("NVIDIA NVENC encoders", Hardware::Nvidia),
        ("Intel Quick Sync encoders", Hardware::Intel),
        ("VA-API encoders", Hardware::Vaapi),
    ] {
        let mut opened = Vec::new();
        let mut failures = Vec::new();
        for c in CODECS {
            for name in plan::encoder_candidates(c, hw) {
                match try_encoder(name, c) {
                    Ok(()) => opened.push(name.to_string()),
                    Err(why) => failures.push((name.to_string(), why)),
                }
            }
        }
        let check = if failures.is_empty() {
            Check::new(
                "media",
                family,
                Status::Ok,
                format!("{} opened", opened.join(", ")),
            )
        } else if !opened.is_empty() {
            Check::new(
                "media",
                family,
                Status::Ok,
                format!(
                    "{} opened; unavailable: {}",
                    opened.join(", "),
                    grouped(&failures)
                ),
            )
        } else {
            Check::new("media", family, Status::Warn, format!("unavailable: {}", grouped(&failures))).fix(
                format!(
                    "none needed on a machine without this hardware: hardware: auto falls back to software ({})",
                    software.join(", ")
                ),
            )
        };
        out.push(check);
    }
    for c in CODECS {
        let sw = plan::encoder_candidates(c, Hardware::Software);
        let mut why = Vec::new();
        let found = sw.iter().find(|n| match try_encoder(n, c) {
            Ok(()) => true,
            Err(e) => {
                why.push((n.to_string(), e));
                false
            }
        });
        out.push(match found {
            Some(n) => Check::new("media", format!("software {c} encoder"), Status::Ok, format!("{n} opened")),
            None => Check::new(
                "media",
                format!("software {c} encoder"),
                Status::Fail,
                format!("no software {c} encoder opened: {}", grouped(&why)),
            )
            .fix("install FFmpeg's libraries with libx264, libx265 and libsvtav1 (Debian: libavcodec59)"),
        });
    }
    for (name, hw) in [
        ("NVDEC (CUDA) decoding", Hardware::Nvidia),
        ("VA-API decoding", Hardware::Vaapi),
    ] {
        let d = hwdec::choose(ff::codec::Id::H264, hw);
        out.push(if d.method == "software" {
            Check::new(
                "media",
                name,
                Status::Warn,
                format!("unavailable: {}", d.reason),
            )
            .fix("none needed without this hardware: inputs are decoded in software")
        } else {
            Check::new("media", name, Status::Ok, d.reason)
        });
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Storage

/// Where the SDK's credential chain found credentials, in words, from the provider's name.
pub fn credential_source(provider: &str) -> String {
    match provider {
        "Environment" | "EnvironmentVariable" => {
            "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)".into()
        }
        "ProfileFile" => format!(
            "profile {:?} (~/.aws/config and ~/.aws/credentials)",
            std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into())
        ),
        "WebIdentityToken" => {
            "web identity (IRSA: AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN)".into()
        }
        "EcsContainer" => {
            "the container credentials endpoint (EKS Pod Identity or ECS task role)".into()
        }
        "IMDSv2" | "Ec2InstanceMetadata" => "the instance role (EC2 instance metadata)".into(),
        other => format!("the {other} provider"),
    }
}

/// The provider name inside a `Credentials`' Debug text (the only place the SDK exposes it); the rest of
/// that text is never used.
fn provider_of(creds: &aws_credential_types::Credentials) -> String {
    let dbg = format!("{creds:?}");
    dbg.split("provider_name: \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("unknown")
        .to_string()
}

fn region_source() -> &'static str {
    if std::env::var_os("AWS_REGION").is_some() {
        "AWS_REGION"
    } else if std::env::var_os("AWS_DEFAULT_REGION").is_some() {
        "AWS_DEFAULT_REGION"
    } else {
        "the profile, or us-east-1 by default"
    }
}

pub fn storage(uri: &str) -> Vec<Check> {
    if let Some(path) = uri.strip_prefix("file://") {
        return vec![local_dir(path)];
    }
    let Some(u) = S3Uri::parse(uri) else {
        return vec![
            Check::new("storage", uri, Status::Fail, "not an s3:// or file:// URI")
                .fix("give s3://bucket/prefix/ or file:///abs/dir/"),
        ];
    };
    let settings = Settings {
        retry_budget: Duration::from_secs(4),
        max_attempts: 3,
        ..Settings::from_env()
    };
    s3::block_on(async move {
        let s3 = S3::from_env(settings).await;
        let mut out = vec![Check::new(
            "storage",
            "endpoint",
            Status::Ok,
            format!(
                "{} ({}), region {} (from {})",
                s3.endpoint,
                if s3.custom_endpoint {
                    "AWS_ENDPOINT_URL"
                } else {
                    "AWS S3 for the region"
                },
                s3.region,
                region_source()
            ),
        )];
        out.push(credentials_check(&s3).await);
        if out.last().is_some_and(|c| c.status == Status::Fail) {
            return out;
        }
        let object = !u.key.is_empty() && !u.key.ends_with('/');
        if object {
            out.push(match s3.head(&u).await {
                Ok(m) => Check::new(
                    "storage",
                    "read",
                    Status::Ok,
                    format!("{u}: {} bytes", m.size),
                ),
                Err(e) => Check::new("storage", "read", Status::Fail, e.to_string()),
            });
        }
        let dir = if object {
            S3Uri {
                bucket: u.bucket.clone(),
                key: u
                    .key
                    .rsplit_once('/')
                    .map_or(String::new(), |(d, _)| format!("{d}/")),
            }
        } else {
            u.clone()
        };
        let probe = dir.join(&format!(".tessera-doctor-{:016x}", fastrand::u64(..)));
        let s3 = std::sync::Arc::new(s3);
        let body = bytes::Bytes::from_static(b"tessera doctor\n");
        match s3.put_small(&probe, body.clone()).await {
            Err(e) => out.push(Check::new("storage", "write", Status::Fail, e.to_string())),
            Ok(()) => {
                out.push(Check::new(
                    "storage",
                    "write",
                    Status::Ok,
                    format!("{probe} written"),
                ));
                out.push(match s3.get_small(&probe).await {
                    Ok(Some(b)) if b == body => {
                        Check::new("storage", "read back", Status::Ok, "same bytes")
                    }
                    Ok(_) => Check::new(
                        "storage",
                        "read back",
                        Status::Fail,
                        format!("{probe}: read back different bytes"),
                    ),
                    Err(e) => Check::new("storage", "read back", Status::Fail, e.to_string()),
                });
                out.push(match s3.delete(&probe).await {
                    Ok(()) => Check::new("storage", "delete", Status::Ok, "test object removed"),
                    Err(e) => Check::new("storage", "delete", Status::Warn, e.to_string()).fix(
                        format!("remove {probe} by hand; the credentials may lack s3:DeleteObject"),
                    ),
                });
            }
        }
        out
    })
}

async fn credentials_check(s3: &S3) -> Check {
    use aws_credential_types::provider::ProvideCredentials;
    let Some(provider) = s3.credentials.clone() else {
        return Check::new(
            "storage",
            "credentials",
            Status::Fail,
            classify::LOCAL.no_credentials(),
        );
    };
    match tokio::time::timeout(Duration::from_secs(5), provider.provide_credentials()).await {
        Ok(Ok(c)) => Check::new(
            "storage",
            "credentials",
            Status::Ok,
            format!("from {}", credential_source(&provider_of(&c))),
        ),
        Ok(Err(e)) => {
            let f = classify::credentials(&e, &classify::LOCAL);
            Check::new("storage", "credentials", Status::Fail, f.detail)
        }
        Err(_) => Check::new(
            "storage",
            "credentials",
            Status::Fail,
            "the credential chain gave no answer in 5s (no instance metadata service answered)",
        )
        .fix(classify::LOCAL.no_credentials_fix),
    }
}

fn local_dir(path: &str) -> Check {
    let p = std::path::Path::new(path);
    if !p.is_dir() {
        return Check::new("storage", path, Status::Fail, "no such folder")
            .fix("create it, or name an existing folder");
    }
    match tempfile::Builder::new()
        .prefix(".tessera-doctor-")
        .tempfile_in(p)
    {
        Ok(_) => Check::new("storage", path, Status::Ok, "folder writable"),
        Err(e) => Check::new(
            "storage",
            path,
            Status::Fail,
            format!("cannot write here: {e}"),
        )
        .fix("choose a folder this user may write, or fix its permissions"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Cluster

/// Device-plugin resources on a node's allocatable list (`nvidia.com/gpu`, `gpu.intel.com/i915`, ...) with a
/// non-zero count.
pub fn gpu_resources<'a>(allocatable: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    allocatable
        .into_iter()
        .filter(|(k, v)| {
            (k.contains("gpu") || k.starts_with("gpu.intel.com/") || *k == "amd.com/gpu")
                && v.trim() != "0"
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// Why the API server did not answer, in words (the transport error's text classified as for S3).
pub fn api_unreachable(server: &str, text: &str) -> String {
    use classify::Transport;
    let t = text.to_ascii_lowercase();
    match classify::transport_cause(text) {
        Transport::Refused => format!(
            "cannot reach the API server: nothing accepts connections at {server}; is the cluster running?"
        ),
        Transport::Unresolvable => {
            format!("cannot reach the API server: the name in {server} does not resolve")
        }
        _ if t.contains("401") || t.contains("unauthorized") => format!(
            "the API server at {server} does not accept the kubeconfig's credentials (401): log in again"
        ),
        _ => format!(
            "cannot reach the API server at {server}: {}",
            text.rsplit(": ").next().unwrap_or(text)
        ),
    }
}

/// A Pending pod's scheduler message in plain words, with the fix.
pub fn pending_reason(message: &str) -> (String, String) {
    let m = message.to_ascii_lowercase();
    let fix = if let Some(res) = message.split("Insufficient ").nth(1).map(|r| {
        r.split(',')
            .next()
            .unwrap_or(r)
            .trim()
            .trim_end_matches('.')
            .to_string()
    }) {
        format!("no node has a free {res}: add nodes with it (or let the cluster autoscaler), or lower the pool's maxWorkers")
    } else if m.contains("taint") {
        "the GPU nodes carry taints the pool does not tolerate: set WorkerPool.spec.tolerations"
            .into()
    } else if m.contains("node affinity")
        || m.contains("node selector")
        || m.contains("didn't match")
    {
        "no node matches the pool's nodeSelector or affinity: check the node labels".into()
    } else if m.contains("runtimeclass") {
        "the pool's runtimeClassName names a RuntimeClass the cluster lacks: install the GPU runtime or clear it".into()
    } else {
        "see kubectl describe pod for the scheduler's events".into()
    };
    (message.trim().to_string(), fix)
}

async fn cluster(ns: &str) -> Vec<Check> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{Endpoints, Node, Pod};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, ListParams};

    let mut out = Vec::new();
    let fix_api =
        "check that the cluster is up and the kubeconfig's server address (kubectl cluster-info)";
    let config = match tokio::time::timeout(Duration::from_secs(5), kube::Config::infer()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            out.push(
                Check::new("cluster", "API server", Status::Fail, format!("no cluster configured: {}", classify::chain_text(&e)))
                    .fix("set KUBECONFIG or ~/.kube/config to the cluster (kubectl cluster-info must work)"),
            );
            return out;
        }
        Err(_) => {
            out.push(Check::new(
                "cluster",
                "API server",
                Status::Fail,
                "loading the kubeconfig took over 5s",
            ));
            return out;
        }
    };
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let client = match kube::Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::new(
                "cluster",
                "API server",
                Status::Fail,
                format!("the kubeconfig is unusable: {}", classify::chain_text(&e)),
            ));
            return out;
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(v)) => out.push(Check::new(
            "cluster",
            "API server",
            Status::Ok,
            format!("Kubernetes {} at {server}", v.git_version),
        )),
        Ok(Err(e)) => {
            out.push(
                Check::new(
                    "cluster",
                    "API server",
                    Status::Fail,
                    api_unreachable(&server, &classify::chain_text(&e)),
                )
                .fix(fix_api),
            );
            return out;
        }
        Err(_) => {
            out.push(
                Check::new(
                    "cluster",
                    "API server",
                    Status::Fail,
                    format!("no answer from the API server at {server} in 5s"),
                )
                .fix(fix_api),
            );
            return out;
        }
    }
    let install =
        format!("helm install tessera charts/tessera --namespace {ns} --create-namespace");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut have_crds = true;
    for name in ["transcodejobs.tessera.dev", "workerpools.tessera.dev"] {
        match crds.get_opt(name).await {
            Ok(Some(c)) => {
                let versions: Vec<String> = c
                    .spec
                    .versions
                    .iter()
                    .map(|v| format!("{}{}", v.name, if v.storage { " (stored)" } else { "" }))
                    .collect();
                out.push(Check::new(
                    "cluster",
                    format!("CRD {name}"),
                    Status::Ok,
                    versions.join(", "),
                ));
            }
            Ok(None) => {
                have_crds = false;
                out.push(
                    Check::new(
                        "cluster",
                        format!("CRD {name}"),
                        Status::Fail,
                        "not installed",
                    )
                    .fix(install.clone()),
                );
            }
            Err(e) => out.push(Check::new(
                "cluster",
                format!("CRD {name}"),
                Status::Fail,
                classify::chain_text(&e),
            )),
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    match leases.get_opt("tessera-operator-leader").await {
        Ok(Some(l)) => {
            let spec = l.spec.unwrap_or_default();
            let holder = spec.holder_identity.unwrap_or_default();
            let age = spec
                .renew_time
                .map(|t| (k8s_openapi::jiff::Timestamp::now() - t.0).get_seconds());
            let dur = i64::from(spec.lease_duration_seconds.unwrap_or(15));
            match age {
                Some(a) if !holder.is_empty() && a <= dur => out.push(Check::new(
                    "cluster",
                    "operator",
                    Status::Ok,
                    format!("leader {holder} (lease renewed {a}s ago)"),
                )),
                _ => out.push(
                    Check::new(
                        "cluster",
                        "operator",
                        Status::Fail,
                        format!("no live leader in {ns}: the leader lease was last renewed {}s ago", age.unwrap_or(-1)),
                    )
                    .fix(format!("kubectl -n {ns} get pods -l app.kubernetes.io/name=tessera-operator; kubectl -n {ns} logs deploy/tessera-operator")),
                ),
            }
            let queue = l
                .metadata
                .annotations
                .unwrap_or_default()
                .get(tessera_crds::QUEUE_URL_ANNOTATION)
                .cloned();
            if let Some(q) = queue {
                let hostport = q.split("://").nth(1).unwrap_or(&q).trim_end_matches('/').to_string();
                let reach = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(hostport)).await;
                out.push(match reach {
                    Ok(Ok(_)) => Check::new("cluster", "queue", Status::Ok, format!("{q} accepts connections")),
                    _ => Check::new("cluster", "queue", Status::Warn, format!("{q} is not reachable from here"))
                        .fix("expected outside the cluster's pod network; workers inside reach it"),
                });
            }
        }
        Ok(None) => out.push(
            Check::new(
                "cluster",
                "operator",
                Status::Fail,
                format!("no Tessera operator in namespace {ns} (no leader lease tessera-operator-leader)"),
            )
            .fix(format!("{install}; or pass --namespace where it is installed")),
        ),
        Err(e) => out.push(Check::new("cluster", "operator", Status::Fail, classify::chain_text(&e))),
    }
    if let Ok(Some(ep)) = Api::<Endpoints>::namespaced(client.clone(), ns)
        .get_opt("tessera-queue")
        .await
    {
        let subsets = ep.subsets.unwrap_or_default();
        let count = |f: fn(&k8s_openapi::api::core::v1::EndpointSubset) -> usize| -> usize {
            subsets.iter().map(f).sum()
        };
        let ready = count(|s| s.addresses.as_ref().map_or(0, Vec::len));
        let not_ready = count(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len));
        out.push(if ready > 0 {
            Check::new(
                "cluster",
                "queue Service",
                Status::Ok,
                format!("tessera-queue has {ready} ready endpoint(s)"),
            )
        } else {
            // Workers reach the leader at the address on its Lease first; the Service is their fallback.
            Check::new(
                "cluster",
                "queue Service",
                Status::Warn,
                format!(
                    "tessera-queue has no ready endpoint ({not_ready} not ready): workers can reach the queue only at \
                     the address on the leader's Lease"
                ),
            )
            .fix(format!(
                "kubectl -n {ns} get endpoints tessera-queue; kubectl -n {ns} describe pods"
            ))
        });
    }
    if have_crds {
        let pools: Api<tessera_crds::WorkerPool> = Api::all(client.clone());
        match pools.list(&ListParams::default()).await {
            Ok(list) if list.items.is_empty() => out.push(
                Check::new(
                    "cluster",
                    "WorkerPools",
                    Status::Warn,
                    "none: jobs have nowhere to run",
                )
                .fix("install the chart with its default pool, or apply a WorkerPool"),
            ),
            Ok(list) => {
                for p in list.items {
                    let pns = p.metadata.namespace.clone().unwrap_or_default();
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let st = p.status.clone().unwrap_or_default();
                    let counts = format!(
                        "desired {}, pending {}, ready {}, busy {}",
                        st.desired, st.pending, st.ready, st.busy
                    );
                    let pods: Api<Pod> = Api::namespaced(client.clone(), &pns);
                    let pending = pods
                        .list(
                            &ListParams::default()
                                .labels(&format!("{}={name}", tessera_crds::POOL_LABEL)),
                        )
                        .await
                        .map(|l| l.items)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|pod| {
                            pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending")
                        })
                        .filter_map(|pod| {
                            pod.status?
                                .conditions?
                                .into_iter()
                                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
                                .message
                        })
                        .next();
                    // A RuntimeClass that does not exist: the pods are refused at creation and never Pending.
                    let runtime_missing = match &p.spec.runtime_class_name {
                        Some(rc) => {
                            Api::<k8s_openapi::api::node::v1::RuntimeClass>::all(client.clone())
                                .get_opt(rc)
                                .await
                                .ok()
                                .flatten()
                                .is_none()
                                .then(|| rc.clone())
                        }
                        None => None,
                    };
                    out.push(match (runtime_missing, pending) {
                        (Some(rc), _) => Check::new(
                            "cluster",
                            format!("WorkerPool {pns}/{name}"),
                            Status::Fail,
                            format!("{counts}; its runtimeClassName {rc:?} names no RuntimeClass, so no worker pod can be created"),
                        )
                        .fix("install the GPU runtime's RuntimeClass (the NVIDIA GPU Operator creates \"nvidia\"), or clear runtimeClassName"),
                        (None, Some(msg)) => {
                            let (why, fix) = pending_reason(&msg);
                            Check::new(
                                "cluster",
                                format!("WorkerPool {pns}/{name}"),
                                Status::Warn,
                                format!("{counts}; pods Pending: {why}"),
                            )
                            .fix(fix)
                        }
                        (None, None) => Check::new(
                            "cluster",
                            format!("WorkerPool {pns}/{name}"),
                            Status::Ok,
                            counts,
                        ),
                    });
                }
            }
            Err(e) => out.push(Check::new(
                "cluster",
                "WorkerPools",
                Status::Fail,
                classify::chain_text(&e),
            )),
        }
    }
    match Api::<Node>::all(client).list(&ListParams::default()).await {
        Ok(nodes) => {
            let mut gpu = Vec::new();
            for n in &nodes.items {
                let alloc = n
                    .status
                    .as_ref()
                    .and_then(|s| s.allocatable.clone())
                    .unwrap_or_default();
                let res = gpu_resources(alloc.iter().map(|(k, v)| (k.as_str(), v.0.as_str())));
                if !res.is_empty() {
                    gpu.push(format!(
                        "{} ({})",
                        n.metadata.name.clone().unwrap_or_default(),
                        res.join(", ")
                    ));
                }
            }
            out.push(if gpu.is_empty() {
                Check::new("cluster", "GPU nodes", Status::Warn, format!("none of {} nodes offers a GPU device resource", nodes.items.len()))
                    .fix("install the device plugin (NVIDIA GPU Operator, Intel GPU plugin); software workers still run")
            } else {
                Check::new("cluster", "GPU nodes", Status::Ok, gpu.join("; "))
            });
        }
        Err(e) => out.push(Check::new(
            "cluster",
            "GPU nodes",
            Status::Warn,
            format!("cannot list nodes: {}", classify::chain_text(&e)),
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_resources_are_found_by_device_plugin_name() {
        let alloc = [
            ("cpu", "16"),
            ("nvidia.com/gpu", "4"),
            ("gpu.intel.com/i915", "1"),
            ("amd.com/gpu", "0"),
            ("memory", "64Gi"),
        ];
        assert_eq!(
            gpu_resources(alloc),
            vec!["nvidia.com/gpu=4", "gpu.intel.com/i915=1"]
        );
    }

    #[test]
    fn pending_pods_get_a_fix() {
        let (_, fix) = pending_reason("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.");
        assert!(
            fix.starts_with("no node has a free nvidia.com/gpu"),
            "{fix}"
        );
        let (_, fix) = pending_reason("0/2 nodes are available: 2 node(s) had taint {gpu: true}, that the pod didn't tolerate.");
        assert!(fix.contains("tolerations"), "{fix}");
        let (_, fix) = pending_reason(
            "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.",
        );
        assert!(fix.contains("nodeSelector"), "{fix}");
    }

    #[test]
    fn an_unreachable_api_server_is_named() {
        let m = api_unreachable("https://127.0.0.1:6443", "ServiceError: client error (Connect): tcp connect error: Connection refused (os error 111)");
        assert_eq!(m, "cannot reach the API server: nothing accepts connections at https://127.0.0.1:6443; is the cluster running?");
    }

    #[test]
    fn credential_sources_are_named() {
        assert!(credential_source("Environment").contains("AWS_ACCESS_KEY_ID"));
        assert!(credential_source("WebIdentityToken").contains("IRSA"));
        assert!(credential_source("EcsContainer").contains("Pod Identity"));
        assert!(credential_source("IMDSv2").contains("instance role"));
    }

    #[test]
    fn the_report_counts_and_shows_fixes() {
        let c = vec![
            Check::new("media", "a", Status::Ok, "fine"),
            Check::new("storage", "b", Status::Fail, "broken").fix("mend it"),
        ];
        let r = render(&c);
        assert!(
            r.contains("  FAIL  b: broken\n        fix: mend it\n"),
            "{r}"
        );
        assert!(r.ends_with("2 checks: 1 ok, 0 warn, 1 failed\n"), "{r}");
        assert!(failed(&c));
    }
}
