//! The kubelet of a local test cluster's fake nodes (test fixture; there is no container runtime here).
//!
//! It registers each `--node` (capacity, device-plugin resources such as `nvidia.com/gpu`, labels, taints),
//! keeps it Ready (status heartbeat and a Lease in `kube-node-lease`), and runs every pod the real scheduler
//! binds to those nodes as local processes: the image name is mapped to a locally built binary (`--image
//! NAME=PATH`), `command`/`args`/`env` (values, downward-API fields, Secret and ConfigMap keys) are honoured,
//! each pod gets its own loopback address as its IP, and a kubeconfig holding a token from its
//! ServiceAccount's TokenRequest API (`KUBECONFIG`), so RBAC applies to it for real; projected
//! ServiceAccount token volumes get a token for their audience the same way. Pod status follows the
//! process; `restartPolicy` is honoured; deletion sends SIGTERM, waits the grace period, then SIGKILL.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::Client;
use serde_json::json;
use tokio::process::Command;
use tokio::sync::Mutex;

/// The API server's own audience (a token for it works against the API server).
const API_AUDIENCE: &str = "https://kubernetes.default.svc";

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Folder for pod logs and per-pod kubeconfigs.
    #[arg(long)]
    state_dir: PathBuf,
    /// `NAME[:RESOURCE=COUNT[:LABEL=VALUE,...[:TAINTKEY=VALUE:EFFECT]]]`, repeatable.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// `IMAGE=PATH`: pods whose image (without tag) is IMAGE run PATH (repeatable).
    #[arg(long = "image")]
    images: Vec<String>,
}

#[derive(Debug, Clone)]
struct NodeSpec {
    name: String,
    resource: Option<(String, String)>,
    labels: BTreeMap<String, String>,
    taint: Option<(String, String, String)>,
}

fn parse_node(s: &str) -> NodeSpec {
    let mut parts = s.splitn(4, ':');
    let name = parts.next().unwrap_or_default().to_string();
    let resource = parts
        .next()
        .filter(|r| !r.is_empty())
        .and_then(|r| r.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()));
    let labels = parts
        .next()
        .map(|l| {
            l.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let taint = parts.next().filter(|t| !t.is_empty()).and_then(|t| {
        let (kv, effect) = t.rsplit_once(':')?;
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        Some((k.to_string(), v.to_string(), effect.to_string()))
    });
    NodeSpec {
        name,
        resource,
        labels,
        taint,
    }
}

/// A pod's record: claimed while its process starts (`proc` is `None`: nothing to signal yet), then its process.
struct Running {
    proc: Option<Proc>,
}

/// A pod's process, signalled through a pidfd: once the process is gone its pid may belong to anything
/// (pids wrap at 32768 on these machines), and pid 0 would be this kubelet's whole process group, which is the
/// test run's. A pidfd names this process only, and signalling it after it exited fails with ESRCH.
struct Proc {
    pid: u32,
    fd: OwnedFd,
}

impl Proc {
    /// Opened right after spawn, before anything waits on (and so reaps) the child.
    fn open(pid: u32) -> std::io::Result<Proc> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Proc { pid, fd })
    }

    /// Send `sig` (0 only probes); false once the process is gone.
    fn signal(&self, sig: i32) -> bool {
        // SAFETY: pidfd_send_signal(2) on a descriptor this Proc owns, with no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            ) == 0
        }
    }
}

struct Kubelet {
    client: Client,
    server: String,
    state: PathBuf,
    images: HashMap<String, PathBuf>,
    nodes: Vec<String>,
    pods: Mutex<HashMap<String, Running>>,
    next_ip: AtomicU32,
    /// Pods get `127.<net>.<n>.<m>`: one random `net` per kubelet, so two local clusters (a soak beside a
    /// test run) never share a pod address.
    net: u8,
}

fn now() -> Time {
    Time(Timestamp::now())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let kc = kube::config::Kubeconfig::read_from(&args.kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config)?;
    std::fs::create_dir_all(args.state_dir.join("pods"))?;
    let specs: Vec<NodeSpec> = args.nodes.iter().map(|s| parse_node(s)).collect();
    let images = args
        .images
        .iter()
        .filter_map(|m| m.split_once('='))
        .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        .collect();
    let k = Arc::new(Kubelet {
        client: client.clone(),
        server,
        state: args.state_dir.clone(),
        images,
        nodes: specs.iter().map(|n| n.name.clone()).collect(),
        pods: Mutex::new(HashMap::new()),
        next_ip: AtomicU32::new(10),
        net: fastrand::u8(2..=254),
    });
    for n in &specs {
        register(&client, n).await?;
    }
    // Heartbeats: node status and Lease every 10 s (the node-lifecycle controller's grace is 40 s).
    {
        let (client, specs) = (client.clone(), specs.clone());
        tokio::spawn(async move {
            loop {
                for n in &specs {
                    if let Err(e) = heartbeat(&client, n).await {
                        tracing::warn!(node = %n.name, error = %e, "heartbeat failed");
                    }
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }
    // On SIGTERM: stop every pod process, then exit.
    {
        let k = k.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal");
            term.recv().await;
            for p in k.pods.lock().await.values().filter_map(|r| r.proc.as_ref()) {
                p.signal(libc::SIGKILL);
            }
            std::process::exit(0);
        });
    }
    let pods: Api<Pod> = Api::all(client.clone());
    let mut stream = watcher::watcher(pods, watcher::Config::default()).boxed();
    while let Some(ev) = stream.next().await {
        let pods = match ev {
            Ok(Event::Apply(p)) | Ok(Event::InitApply(p)) => vec![p],
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "pod watch");
                continue;
            }
        };
        for p in pods {
            let k = k.clone();
            tokio::spawn(async move {
                if let Err(e) = k.handle(p).await {
                    tracing::warn!(error = %e, "pod handling failed");
                }
            });
        }
    }
    Ok(())
}

async fn register(client: &Client, n: &NodeSpec) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let taints = n
        .taint
        .as_ref()
        .map(|(k, v, e)| json!([{"key": k, "value": v, "effect": e}]))
        .unwrap_or(json!([]));
    let mut labels = n.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), n.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": n.name, "labels": labels},
        "spec": {"taints": taints},
    });
    nodes
        .patch(
            &n.name,
            &PatchParams::apply("fake-kubelet").force(),
            &Patch::Apply(node),
        )
        .await?;
    heartbeat(client, n).await
}

async fn heartbeat(client: &Client, n: &NodeSpec) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut cap = json!({"cpu": "16", "memory": "64Gi", "pods": "110"});
    if let Some((r, c)) = &n.resource {
        cap[r] = json!(c);
    }
    let t = now();
    let status = json!({"status": {
        "capacity": cap, "allocatable": cap,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "fake kubelet is posting ready status",
                        "lastHeartbeatTime": t, "lastTransitionTime": t}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": n.name}],
        "nodeInfo": {"kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux",
                     "architecture": "amd64", "containerRuntimeVersion": "fake://1", "kernelVersion": "",
                     "osImage": "fake", "machineID": "", "systemUUID": "", "bootID": ""},
    }});
    nodes
        .patch_status(&n.name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": n.name},
        "spec": {"holderIdentity": n.name, "leaseDurationSeconds": 40, "renewTime": MicroTime(Timestamp::now())},
    });
    leases
        .patch(
            &n.name,
            &PatchParams::apply("fake-kubelet").force(),
            &Patch::Apply(lease),
        )
        .await?;
    Ok(())
}

fn key(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or_default()
    )
}

impl Kubelet {
    async fn handle(
        self: Arc<Self>,
        p: Pod,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        if !node.as_ref().is_some_and(|n| self.nodes.contains(n)) {
            return Ok(());
        }
        let k = key(&p);
        let ns = p
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = p.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        if p.metadata.deletion_timestamp.is_some() {
            // A pod still starting has no process yet: removing its record stops the start.
            let proc = self.pods.lock().await.remove(&k).and_then(|r| r.proc);
            if let Some(proc) = proc {
                let grace = p
                    .metadata
                    .deletion_grace_period_seconds
                    .unwrap_or(30)
                    .max(0) as u64;
                proc.signal(libc::SIGTERM);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(grace);
                while proc.signal(0) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                proc.signal(libc::SIGKILL);
            }
            let _ = api
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
            return Ok(());
        }
        let phase = p
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return Ok(());
        }
        {
            let mut pods = self.pods.lock().await;
            if pods.contains_key(&k) {
                return Ok(());
            }
            // Claim it before starting (events for one pod arrive more than once).
            pods.insert(k.clone(), Running { proc: None });
        }
        let n = self.next_ip.fetch_add(1, Ordering::Relaxed) % 60000;
        let ip = format!("127.{}.{}.{}", self.net, n / 250, n % 250 + 1);
        let spec = p.spec.clone().unwrap_or_default();
        let c = spec.containers.first().cloned().unwrap_or_default();
        let kubeconfig = match self.pod_kubeconfig(&p, &ns).await {
            Ok(path) => Some(path),
            Err(e) => {
                tracing::warn!(pod = %k, error = %e, "no ServiceAccount token for the pod");
                None
            }
        };
        let restart = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let mut restarts = 0i32;
        loop {
            let mut cmd = match self.command(&c) {
                Ok(c) => c,
                Err(e) => {
                    self.fail(&api, &name, &format!("cannot run the image: {e}"))
                        .await;
                    return Ok(());
                }
            };
            let mut env = self.env(&p, &c, &ns, &ip).await?;
            // Projected ServiceAccount tokens: issued (TokenRequest, for the volume's audience, bound to the
            // pod) into the pod's folder, and environment values naming the mount path pointed there.
            match self.projected_tokens(&p, &c, &ns).await {
                Ok(dirs) => {
                    for (mount, dir) in dirs {
                        for (_, v) in env.iter_mut() {
                            if *v == mount || v.starts_with(&format!("{mount}/")) {
                                *v = format!("{}{}", dir.display(), &v[mount.len()..]);
                            }
                        }
                    }
                }
                Err(e) => {
                    self.fail(&api, &name, &format!("projected ServiceAccount token: {e}"))
                        .await;
                    return Ok(());
                }
            }
            // emptyDir volumes: a folder per pod and volume; the process cannot see the mount path itself
            // (no mount namespace), so environment values naming it are pointed at the folder.
            let mut limited = Vec::new();
            for (mount, dir, limit) in self.empty_dirs(&p, &c, &ns)? {
                for (_, v) in env.iter_mut() {
                    if *v == mount || v.starts_with(&format!("{mount}/")) {
                        *v = format!("{}{}", dir.display(), &v[mount.len()..]);
                    }
                }
                if let Some(bytes) = limit {
                    limited.push((dir, bytes));
                }
            }
            // An emptyDir with a sizeLimit is a tmpfs of that size over the pod's folder, in a mount namespace
            // of the pod's own (as a real kubelet's memory-backed emptyDir): writing past it fails with ENOSPC.
            if !limited.is_empty() {
                cmd = size_limited(&cmd, &limited);
            }
            cmd.env_clear();
            cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
            cmd.env("HOME", std::env::var("HOME").unwrap_or_default());
            for (n, v) in env {
                cmd.env(n, v);
            }
            if let Some(kc) = &kubeconfig {
                cmd.env("KUBECONFIG", kc);
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.state.join("pods").join(format!("{ns}_{name}.log")))?;
            cmd.stdout(log.try_clone()?).stderr(log);
            // A process group of its own, as a container's: a signal a pod sends to its group stays in it.
            cmd.process_group(0);
            let mut child = match cmd.spawn() {
                Ok(ch) => ch,
                Err(e) => {
                    self.fail(&api, &name, &format!("cannot start: {e}")).await;
                    return Ok(());
                }
            };
            let Some(pid) = child.id() else {
                self.fail(&api, &name, "exited as it started").await;
                self.pods.lock().await.remove(&k);
                return Ok(());
            };
            let proc = match Proc::open(pid) {
                Ok(p) => p,
                Err(e) => {
                    let _ = child.start_kill();
                    self.fail(&api, &name, &format!("pidfd_open: {e}")).await;
                    self.pods.lock().await.remove(&k);
                    return Ok(());
                }
            };
            {
                let mut pods = self.pods.lock().await;
                if !pods.contains_key(&k) {
                    // Deleted while starting.
                    let _ = child.start_kill();
                    return Ok(());
                }
                pods.insert(k.clone(), Running { proc: Some(proc) });
            }
            let t = now();
            let status = json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "127.0.0.1", "startTime": t,
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
                               {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
                               {"type": "Ready", "status": "True", "lastTransitionTime": t}],
                "containerStatuses": [{"name": c.name, "ready": true, "restartCount": restarts, "image": c.image,
                                       "imageID": "", "started": true, "state": {"running": {"startedAt": t}}}],
            }});
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await;
            tracing::info!(pod = %k, pid, %ip, "started");
            let code = child
                .wait()
                .await
                .ok()
                .and_then(|s| s.code())
                .unwrap_or(137);
            let mut deleted = false;
            {
                let mut pods = self.pods.lock().await;
                match pods.get_mut(&k) {
                    // Exited on its own: nothing left to signal until the next start.
                    Some(r) if r.proc.as_ref().is_some_and(|p| p.pid == pid) => r.proc = None,
                    _ => deleted = true,
                }
            }
            if deleted {
                // Being deleted: emptyDir volumes go with the pod.
                let _ = std::fs::remove_dir_all(
                    self.state.join("volumes").join(format!("{ns}_{name}")),
                );
                return Ok(());
            }
            tracing::info!(pod = %k, code, "exited");
            let again = restart == "Always" || (restart == "OnFailure" && code != 0);
            if again {
                restarts += 1;
                let backoff = Duration::from_secs((1u64 << restarts.min(5)).min(30));
                tokio::time::sleep(backoff).await;
                if !self.pods.lock().await.contains_key(&k) {
                    return Ok(());
                }
                continue;
            }
            let t = now();
            let phase = if code == 0 { "Succeeded" } else { "Failed" };
            let status = json!({"status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": t}],
                "containerStatuses": [{"name": c.name, "ready": false, "restartCount": restarts, "image": c.image,
                    "imageID": "", "state": {"terminated": {"exitCode": code, "finishedAt": t, "startedAt": t,
                    "reason": if code == 0 { "Completed" } else { "Error" }}}}],
            }});
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                .await;
            self.pods.lock().await.remove(&k);
            return Ok(());
        }
    }

    async fn fail(&self, api: &Api<Pod>, name: &str, msg: &str) {
        tracing::warn!(pod = name, msg, "pod failed");
        let _ = api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"status": {"phase": "Failed", "reason": "FakeKubelet", "message": msg}}),
                ),
            )
            .await;
    }

    /// The container's command: the image's binary (or `command`, resolved beside it) plus `args`.
    fn command(&self, c: &Container) -> Result<Command, String> {
        let image = c.image.clone().unwrap_or_default();
        let base = image.rsplit_once(':').map(|(b, _)| b).unwrap_or(&image);
        let base = base.rsplit('/').take(2).collect::<Vec<_>>();
        let short = format!(
            "{}/{}",
            base.get(1).unwrap_or(&""),
            base.first().unwrap_or(&"")
        );
        let entry = self
            .images
            .get(&image)
            .or_else(|| self.images.get(&short))
            .or_else(|| {
                self.images
                    .iter()
                    .find(|(k, _)| image.contains(k.as_str()))
                    .map(|(_, v)| v)
            })
            .ok_or_else(|| format!("no local binary for image {image:?}"))?;
        let (prog, mut rest) = match c.command.as_ref().filter(|c| !c.is_empty()) {
            Some(cmd) => {
                let name = Path::new(&cmd[0]).file_name().unwrap_or_default();
                let beside = entry
                    .parent()
                    .map(|d| d.join(name))
                    .unwrap_or_else(|| entry.clone());
                (beside, cmd[1..].to_vec())
            }
            None => (entry.clone(), Vec::new()),
        };
        rest.extend(c.args.clone().unwrap_or_default());
        let mut cmd = Command::new(prog);
        cmd.args(rest).kill_on_drop(false);
        Ok(cmd)
    }

    async fn env(
        &self,
        p: &Pod,
        c: &Container,
        ns: &str,
        ip: &str,
    ) -> Result<Vec<(String, String)>, kube::Error> {
        let mut out = Vec::new();
        for e in c.env.clone().unwrap_or_default() {
            let v = if let Some(v) = e.value {
                v
            } else if let Some(from) = e.value_from {
                if let Some(f) = from.field_ref {
                    match f.field_path.as_str() {
                        "metadata.name" => p.metadata.name.clone().unwrap_or_default(),
                        "metadata.namespace" => ns.to_string(),
                        "status.podIP" => ip.to_string(),
                        "status.hostIP" => "127.0.0.1".into(),
                        "spec.nodeName" => p
                            .spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default(),
                        "spec.serviceAccountName" => p
                            .spec
                            .as_ref()
                            .and_then(|s| s.service_account_name.clone())
                            .unwrap_or_default(),
                        other => {
                            tracing::warn!(field = other, "unsupported fieldRef");
                            String::new()
                        }
                    }
                } else if let Some(s) = from.secret_key_ref {
                    let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
                    secrets
                        .get(&s.name)
                        .await?
                        .data
                        .and_then(|d| {
                            d.get(&s.key)
                                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                        })
                        .unwrap_or_default()
                } else if let Some(cm) = from.config_map_key_ref {
                    let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
                    cms.get(&cm.name)
                        .await?
                        .data
                        .and_then(|d| d.get(&cm.key).cloned())
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            out.push((e.name, v));
        }
        Ok(out)
    }

    /// The pod's emptyDir volumes mounted in `c`: (mount path, host folder), created on first use.
    fn empty_dirs(
        &self,
        p: &Pod,
        c: &Container,
        ns: &str,
    ) -> std::io::Result<Vec<(String, PathBuf, Option<u64>)>> {
        let vols = p
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut out = Vec::new();
        for m in c.volume_mounts.clone().unwrap_or_default() {
            if let Some(ed) = vols
                .iter()
                .find(|v| v.name == m.name)
                .and_then(|v| v.empty_dir.as_ref())
            {
                let limit = ed.size_limit.as_ref().and_then(|q| bytes(&q.0));
                let dir = self.volume_dir(ns, &name, &m.name)?;
                out.push((m.mount_path.trim_end_matches('/').to_string(), dir, limit));
            }
        }
        Ok(out)
    }

    /// A pod volume's folder (created on first use).
    fn volume_dir(&self, ns: &str, pod: &str, volume: &str) -> std::io::Result<PathBuf> {
        let dir = self
            .state
            .join("volumes")
            .join(format!("{ns}_{pod}"))
            .join(volume);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The pod's projected volumes with ServiceAccount tokens mounted in `c`: each token requested for its
    /// audience and lifetime, bound to the pod, written at its path in the volume's folder; returns (mount
    /// path, folder). (Not refreshed: test pods live far shorter than a token.)
    async fn projected_tokens(
        &self,
        p: &Pod,
        c: &Container,
        ns: &str,
    ) -> Result<Vec<(String, PathBuf)>, Box<dyn std::error::Error + Send + Sync>> {
        let spec = p.spec.clone().unwrap_or_default();
        let vols = spec.volumes.unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let mut out = Vec::new();
        for m in c.volume_mounts.clone().unwrap_or_default() {
            let Some(proj) = vols
                .iter()
                .find(|v| v.name == m.name)
                .and_then(|v| v.projected.as_ref())
            else {
                continue;
            };
            let dir = self.volume_dir(ns, &name, &m.name)?;
            for src in proj.sources.clone().unwrap_or_default() {
                let Some(t) = src.service_account_token else {
                    continue;
                };
                let audience = t.audience.clone().unwrap_or_else(|| API_AUDIENCE.into());
                let token = self
                    .pod_token(p, ns, &audience, t.expiration_seconds.unwrap_or(3600))
                    .await?;
                std::fs::write(dir.join(&t.path), token)?;
            }
            out.push((m.mount_path.trim_end_matches('/').to_string(), dir));
        }
        Ok(out)
    }

    /// A token of the pod's ServiceAccount for `audience`, bound to the pod (TokenRequest).
    async fn pod_token(
        &self,
        p: &Pod,
        ns: &str,
        audience: &str,
        seconds: i64,
    ) -> Result<String, kube::Error> {
        let sa = p
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_string()],
                expiration_seconds: Some(seconds),
                bound_object_ref: Some(
                    k8s_openapi::api::authentication::v1::BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: p.metadata.name.clone(),
                        uid: p.metadata.uid.clone(),
                    },
                ),
            },
            ..Default::default()
        };
        let tr: TokenRequest = sas
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await?;
        Ok(tr.status.map(|s| s.token).unwrap_or_default())
    }

    /// A kubeconfig with a token from the pod's ServiceAccount (TokenRequest, bound to the pod).
    async fn pod_kubeconfig(&self, p: &Pod, ns: &str) -> Result<PathBuf, kube::Error> {
        let token = self.pod_token(p, ns, API_AUDIENCE, 24 * 3600).await?;
        let path = self.state.join("pods").join(format!(
            "{ns}_{}.kubeconfig",
            p.metadata.name.as_deref().unwrap_or_default()
        ));
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {{server: \"{}\", insecure-skip-tls-verify: true}}\nusers:\n- name: sa\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: sa\n  context: {{cluster: local, user: sa, namespace: {ns}}}\ncurrent-context: sa\n",
            self.server.trim_end_matches('/')
        );
        std::fs::write(&path, kc).map_err(|e| kube::Error::Service(Box::new(e)))?;
        Ok(path)
    }
}

/// A resource quantity (`64Mi`, `1G`, `1000`) in bytes.
fn bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, unit) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mul: u64 = match unit {
        "" => 1,
        "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// `cmd` run in a user and mount namespace of its own, with a tmpfs of the given size over each folder.
/// `unshare` and `sh` exec in place, so the pid the kubelet signals is the program's.
fn size_limited(cmd: &Command, limited: &[(PathBuf, u64)]) -> Command {
    let std = cmd.as_std();
    let mut script = String::new();
    for i in 0..limited.len() {
        script += &format!(
            "mount -t tmpfs -o size=\"${}\" tmpfs \"${}\" && ",
            2 * i + 1,
            2 * i + 2
        );
    }
    script += &format!("shift {} && exec \"$@\"", 2 * limited.len());
    let mut w = Command::new("unshare");
    w.args([
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        &script,
        "sh",
    ]);
    for (dir, size) in limited {
        w.arg(size.to_string()).arg(dir);
    }
    w.arg(std.get_program()).args(std.get_args());
    w.kill_on_drop(false);
    w
}
