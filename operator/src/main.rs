//! `tessera-operator`: the Kubernetes controller. Every replica serves `/livez`, `/readyz` and `/metrics`;
//! the replica holding the leader Lease also serves the work queue and runs the controllers. A replica that
//! loses the Lease exits (and is restarted clean), so two leaders never act at once.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use tessera_operator::api::{self, QueueApi, TokenReviewer};
use tessera_operator::controller::{self, Ctx};
use tessera_operator::core::{Cmd, Core, CoreHandle, Snapshot};
use tessera_operator::leader::{self, Elector};
use tessera_operator::queue::QueueConfig;
use tessera_operator::Error;
use tokio::sync::{watch, OnceCell};

#[derive(Parser, Debug)]
#[command(
    name = "tessera-operator",
    version,
    about = "Tessera's Kubernetes operator"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address for the queue API, metrics and probes. Default: the pod's IP (POD_IP) and TESSERA_PORT, else
    /// 0.0.0.0:8080.
    #[arg(long, env = "TESSERA_LISTEN")]
    listen: Option<String>,
    /// The operator's namespace (its Lease and queue Service live here).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    namespace: String,
    /// This replica's name in leader election.
    #[arg(long, env = "POD_NAME", default_value = "tessera-operator")]
    identity: String,
    /// Pool for jobs that name none: `name` (in the operator's namespace) or `namespace/name`.
    #[arg(long, env = "TESSERA_DEFAULT_POOL", default_value = "default")]
    default_pool: String,
    /// The queue Service: `name:port` in the operator's namespace. Workers reach the leader at the address
    /// it writes on its Lease, and through this Service (cluster DNS) when that fails.
    #[arg(
        long,
        env = "TESSERA_QUEUE_SERVICE",
        default_value = "tessera-queue:8080"
    )]
    queue_service: String,
    #[arg(
        long,
        env = "TESSERA_LEASE_NAME",
        default_value = "tessera-operator-leader"
    )]
    lease_name: String,
    /// Seconds a leader's Lease lasts without renewal before a standby takes over.
    #[arg(long, env = "TESSERA_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Seconds a task lease lasts without a heartbeat before the task is queued again.
    #[arg(long, env = "TESSERA_TASK_LEASE_SECONDS", default_value_t = 30)]
    task_lease_seconds: u64,
    /// Shortest interval between two progress-only status writes of one job (milliseconds).
    #[arg(long, env = "TESSERA_STATUS_INTERVAL_MS", default_value_t = 1000)]
    status_interval_ms: u64,
    /// This operator's instance (the Helm release's full name): it serves the WorkerPools labelled
    /// `tessera.dev/operator` with it.
    #[arg(long, env = "TESSERA_INSTANCE", default_value = "tessera")]
    instance: String,
    /// Also serve WorkerPools without that label, and jobs naming no pool or a missing one. One operator per
    /// cluster does; a second release sets false and labels its pools.
    #[arg(long, env = "TESSERA_PRIMARY", default_value_t = true, action = clap::ArgAction::Set)]
    primary: bool,
    /// Log lines as text or JSON (one object per line).
    #[arg(
        long,
        value_enum,
        env = "TESSERA_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Apply the CRDs this operator was built with (the chart's pre-install/pre-upgrade hook: `helm upgrade`
    /// never updates a chart's crds/), with CEL rules where the API server enforces them (1.25+).
    Crds {
        #[command(subcommand)]
        action: CrdsAction,
    },
}

#[derive(clap::Subcommand, Debug)]
enum CrdsAction {
    /// Server-side apply both CRDs to the cluster of the kubeconfig (or the pod's ServiceAccount).
    Apply,
}

struct App {
    core: CoreHandle,
    ctx: OnceCell<Arc<Ctx>>,
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    // Ready once serving; the standby is ready too (it answers probes and waits for the Lease). Workers
    // skip it: it answers queue calls with 503.
    let role = if app.core.is_leader() {
        "leader"
    } else {
        "standby"
    };
    (StatusCode::OK, role)
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        {
            let snap = app
                .core
                .ask(|reply| Cmd::Snapshot { reply })
                .await
                .unwrap_or_else(|_| Snapshot::default());
            tessera_operator::metrics::render(
                &app.core.shared,
                &snap,
                app.ctx.get().map(|c| c.as_ref()),
            )
        },
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_runtime=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    if let Some(Command::Crds {
        action: CrdsAction::Apply,
    }) = &args.command
    {
        return match apply_crds().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tessera-operator: error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "operator stopped");
            eprintln!("tessera-operator: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn apply_crds() -> Result<(), Error> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::kube("connect to the Kubernetes API".into(), e))?;
    for applied in tessera_operator::crds::apply(&client).await? {
        println!("applied {applied}");
    }
    Ok(())
}

async fn run(args: Args) -> Result<ExitCode, Error> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::kube("connect to the Kubernetes API".into(), e))?;
    // The leader's state has one owner, started now (a standby's stays empty): everything else sends it
    // commands.
    let core = Core::new(QueueConfig {
        lease_ms: args.task_lease_seconds.max(1) * 1000,
        ..QueueConfig::default()
    })
    .spawn();
    let api = Arc::new(QueueApi {
        core: core.clone(),
        auth: Box::new(TokenReviewer::new(client.clone())),
    });
    let app = Arc::new(App {
        core: core.clone(),
        ctx: OnceCell::new(),
    });
    let router = api::router(api.clone()).merge(
        Router::new()
            .route("/livez", get(livez))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(app.clone()),
    );
    let listen = args.listen.clone().unwrap_or_else(|| {
        let ip = std::env::var("POD_IP")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "0.0.0.0".into());
        let port = std::env::var("TESSERA_PORT")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "8080".into());
        format!("{ip}:{port}")
    });
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| Error::Config(format!("--listen {listen:?}: {e}")))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            what: format!("listen on {addr}"),
            source,
        })?;
    tracing::info!(%addr, identity = %args.identity, "serving probes and metrics; campaigning for leadership");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });

    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &args.namespace);
    let settings = leader::Settings {
        lease_name: args.lease_name.clone(),
        identity: args.identity.clone(),
        lease_duration: Duration::from_secs(args.lease_seconds.max(2)),
        renew_every: Duration::from_secs((args.lease_seconds / 5).max(1)),
        retry_every: Duration::from_secs(1),
        advertise: Some(format!(
            "http://{}",
            if addr.ip().is_unspecified() {
                SocketAddr::new([127, 0, 0, 1].into(), addr.port())
            } else {
                addr
            }
        )),
    };
    let (lead_tx, mut lead_rx) = watch::channel(false);
    tokio::spawn(Elector::new(leases.clone(), settings.clone()).run(lead_tx));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| Error::Io {
            what: "SIGTERM handler".into(),
            source,
        })?;
    let with_ns = |s: &str| {
        if s.contains('/') {
            s.to_string()
        } else {
            format!("{}/{s}", args.namespace)
        }
    };
    let mut started = false;
    loop {
        tokio::select! {
            changed = lead_rx.changed() => {
                if changed.is_err() {
                    return Ok(ExitCode::FAILURE);
                }
                if *lead_rx.borrow() {
                    core.shared.leader.store(true, Ordering::Relaxed);
                    let ctx = Arc::new(Ctx::new(client.clone(), core.clone(), controller::Config {
                        namespace: args.namespace.clone(),
                        lease: with_ns(&args.lease_name),
                        default_pool: with_ns(&args.default_pool),
                        queue_service: with_ns(&args.queue_service),
                        status_interval: Duration::from_millis(args.status_interval_ms),
                        identity: args.identity.clone(),
                        ownership: controller::Ownership {
                            instance: args.instance.clone(),
                            primary: args.primary,
                        },
                    }));
                    let _ = app.ctx.set(ctx.clone());
                    if !std::mem::replace(&mut started, true) {
                        tokio::spawn(controller::run(ctx));
                    }
                } else {
                    core.shared.leader.store(false, Ordering::Relaxed);
                    tracing::error!("no longer the leader; exiting so a clean replica takes over");
                    return Ok(ExitCode::FAILURE);
                }
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: giving up the leader lease");
                core.shared.leader.store(false, Ordering::Relaxed);
                Elector::new(leases.clone(), settings.clone()).release().await;
                return Ok(ExitCode::SUCCESS);
            }
            _ = tokio::signal::ctrl_c() => {
                core.shared.leader.store(false, Ordering::Relaxed);
                Elector::new(leases.clone(), settings.clone()).release().await;
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}
