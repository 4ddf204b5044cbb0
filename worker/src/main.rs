//! `tessera`: run a TranscodeJob on this machine, or probe an input.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tessera_engine::job::{self, Progress, RunOptions};
use tessera_engine::{probe, Error};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Frame-exact chunked video transcoding, on one machine or a Kubernetes cluster"
)]
struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log lines as text or JSON (one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TESSERA_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: tessera_worker::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a TranscodeJob YAML here, with parallel chunk workers.
    Run {
        /// The TranscodeJob manifest (the same file `kubectl apply` takes).
        job: PathBuf,
        /// Parallel chunk workers (default: the number of cores).
        #[arg(long, short)]
        workers: Option<usize>,
        /// Print one JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show streams, duration, frame rate, rotation and keyframes of an input.
    Probe {
        /// A path, file:// or s3:// URI.
        uri: String,
        #[arg(long)]
        json: bool,
    },
    /// Check this machine (encoders, decoders), a storage location and, with --cluster, the cluster: each
    /// check says ok, warn or fail with the fix; the exit status is 1 when one fails.
    Doctor {
        /// A storage location to check: s3://bucket/prefix/, s3://bucket/key or file:///abs/dir/ (a tiny
        /// object is written there and removed).
        uri: Option<String>,
        /// Also check the cluster of the current kubeconfig: CRDs, operator, queue, WorkerPools, GPU nodes.
        #[arg(long)]
        cluster: bool,
        /// The operator's namespace.
        #[arg(long, short, default_value = "tessera-system")]
        namespace: String,
        #[arg(long)]
        json: bool,
    },
    /// What the chart's `helm test` runs: the pool is Ready and, with --location, a 2-second clip goes
    /// through a TranscodeJob to Succeeded (the job and its files are removed after).
    TestRelease {
        /// The pool: namespace/name.
        #[arg(long)]
        pool: String,
        /// The namespace the test job runs in (one the pool serves).
        #[arg(long, default_value = "default")]
        namespace: String,
        /// s3://bucket/prefix/ for the clip and the outputs; without it the job step is skipped.
        #[arg(long)]
        location: Option<String>,
        /// Seconds for the whole test.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Worker pod mode: lease tasks from the operator's queue and run them until SIGTERM (configured by the
    /// environment the operator's pod spec sets: TESSERA_POOL, TESSERA_QUEUE_SERVICE, POD_NAME, ...).
    Worker,
    /// Copy file → s3://, s3:// → file, or s3:// → s3://, streaming (bounded memory, any size).
    Cp {
        /// Source: a path, file:// or s3://bucket/key.
        src: String,
        /// Destination: a path, file:// or s3://bucket/key (a key ending in / takes the source's name).
        dst: String,
        /// Print one JSON summary on stdout (bytes, seconds, request and retry counts).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Allocations of 1 MiB and more (read-ahead blocks, frame pools) get their own mappings and go back to
    // the system when freed. glibc otherwise raises this threshold as such blocks are freed and serves them
    // from the heap, which then fragments: a job's peak memory crept up with the number of chunks it ran.
    // SAFETY: mallopt is called before any other thread exists.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    let cli = Cli::parse();
    if std::env::var_os("SVT_LOG").is_none() {
        // SVT-AV1 prints its configuration banner at info level for every encoder it opens.
        // SAFETY (edition 2024 wording): set before any other thread exists.
        std::env::set_var("SVT_LOG", "2");
    }
    tessera_worker::logging::init(
        tessera_engine::s3::cli::log_filter(cli.verbose),
        cli.log_format,
    );
    let res = match cli.command {
        Command::Run { job, workers, json } => run(job, workers, json),
        Command::Probe { uri, json } => probe_cmd(&uri, json),
        Command::Doctor {
            uri,
            cluster,
            namespace,
            json,
        } => return doctor_cmd(uri, cluster, namespace, json),
        Command::TestRelease {
            pool,
            namespace,
            location,
            timeout,
        } => {
            let opts = tessera_worker::release_test::Options {
                pool,
                namespace,
                location,
                timeout: std::time::Duration::from_secs(timeout),
            };
            return match tessera_worker::release_test::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tessera test-release: failed: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Cp { src, dst, json } => cp_cmd(&src, &dst, json, cli.verbose, cli.log_format),
        Command::Worker => {
            tessera_engine::s3::set_pod_mode();
            tessera_worker::pod::Config::from_env().and_then(tessera_worker::pod::run)
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(path: PathBuf, workers: Option<usize>, json: bool) -> Result<(), Error> {
    let job = job::read_job(&path)?;
    for note in tessera_crds::ignored_in_local_mode(&job.spec) {
        eprintln!("tessera: note: {note}");
    }
    let progress = Arc::new(Progress::default());
    // Ctrl-C / SIGTERM: stop cooperatively so partial outputs and scratch files are removed; a second
    // signal exits at once.
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            tessera_engine::s3::interrupt();
            eprintln!("\ntessera: stopping (press Ctrl-C again to exit at once)");
        });
    }
    let opts = RunOptions {
        workers: workers.unwrap_or_else(job::default_workers),
        progress: progress.clone(),
        cancel: cancel.clone(),
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("static template"));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let bar_style = ProgressStyle::with_template(
        "{spinner} {msg:<22} [{bar:30}] {percent:>3}% {pos}/{len} frames  {prefix}  ETA {eta}",
    )
    .expect("static template")
    .progress_chars("=> ");
    let done = std::sync::atomic::AtomicBool::new(false);
    let summary = std::thread::scope(|s| {
        if let Some(bar) = &bar {
            let (progress, done, bar_style) = (&progress, &done, &bar_style);
            s.spawn(move || {
                let started = std::time::Instant::now();
                let mut styled = false;
                while !done.load(Ordering::Relaxed) {
                    let total = progress.frames_total.load(Ordering::Relaxed);
                    let frames = progress.frames_done.load(Ordering::Relaxed);
                    if total > 0 && !styled {
                        bar.set_style(bar_style.clone());
                        styled = true;
                    }
                    bar.set_length(total);
                    bar.set_position(frames);
                    bar.set_prefix(format!(
                        "{:.0} fps",
                        frames as f64 / started.elapsed().as_secs_f64().max(1e-3)
                    ));
                    let stage = progress.stage.lock().map(|s| s.clone()).unwrap_or_default();
                    bar.set_message(format!(
                        "{stage} {}/{} chunks",
                        progress.chunks_done.load(Ordering::Relaxed),
                        progress.chunks_total.load(Ordering::Relaxed)
                    ));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let r = job::run_job(&job, &opts);
        done.store(true, Ordering::Relaxed);
        r
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("summary serialises")
        );
    } else {
        println!(
            "{}: {} frames, {} chunks on {} workers in {:.1}s",
            summary.job,
            summary.source.frames,
            summary.chunks,
            summary.workers,
            summary.elapsed_seconds
        );
        for r in &summary.renditions {
            let q = match (r.psnr, r.ssim) {
                (Some(p), Some(s)) => format!("  PSNR {p:.2} dB  SSIM {s:.4}"),
                (Some(p), None) => format!("  PSNR {p:.2} dB"),
                (None, Some(s)) => format!("  SSIM {s:.4}"),
                _ => String::new(),
            };
            println!(
                "  {:<10} {}x{} {} frames {:.3}s {} bytes  {}{q}\n             {}",
                r.name, r.width, r.height, r.frames, r.duration_seconds, r.bytes, r.encoder, r.uri
            );
        }
        if let Some(m) = &summary.master_playlist {
            println!("  master playlist: {m}");
        }
        if let Some(l) = &summary.ladder {
            println!(
                "  ladder: target VMAF {} at {} ({}), {} points on {} frames of chunks {:?}",
                l.target_vmaf,
                l.display,
                l.model,
                l.points.len(),
                l.sample_frames,
                l.sample_chunks
            );
            for r in &l.rungs {
                println!(
                    "    {:<8} crf {:<3} {:>7.0} kb/s  VMAF {:>5.1}  {}",
                    r.name, r.crf, r.kbps, r.vmaf, r.why
                );
            }
            for n in &l.notes {
                println!("    note: {n}");
            }
        }
    }
    Ok(())
}

fn doctor_cmd(storage: Option<String>, cluster: bool, namespace: String, json: bool) -> ExitCode {
    let checks = tessera_worker::doctor::run(&tessera_worker::doctor::Options {
        storage,
        cluster,
        namespace,
    });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": !tessera_worker::doctor::failed(&checks),
                "checks": checks,
            }))
            .expect("checks serialise")
        );
    } else {
        print!("{}", tessera_worker::doctor::render(&checks));
    }
    if tessera_worker::doctor::failed(&checks) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn probe_cmd(uri: &str, json: bool) -> Result<(), Error> {
    let path = match uri.strip_prefix("file://") {
        Some(p) => PathBuf::from(p),
        None if uri.starts_with("s3://") => PathBuf::from(uri),
        None if uri.contains("://") => {
            return Err(Error::Field {
                field: "URI".into(),
                message: format!("{uri:?}: use a path, file:// or s3://bucket/key"),
            })
        }
        None => PathBuf::from(uri),
    };
    let info = probe::probe(&path)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).expect("probe serialises")
        );
        return Ok(());
    }
    let v = &info.video;
    println!(
        "{}: {} ({} bytes), {:.3}s",
        info.path.display(),
        info.format,
        info.bytes,
        info.duration
    );
    println!(
        "  video #{}: {} {}x{} {} {:.3} fps{} {} frames{}{}",
        v.index,
        v.codec,
        v.width,
        v.height,
        v.pix_fmt,
        v.fps.0 as f64 / v.fps.1.max(1) as f64,
        if v.vfr { " (VFR)" } else { "" },
        v.frames,
        if v.frames_exact { "" } else { " (estimated)" },
        if v.rotation != 0.0 {
            format!(", rotation {}°", v.rotation)
        } else {
            String::new()
        },
    );
    for t in &info.tracks {
        let mut line = format!("  {} #{}: {}", t.kind.as_str(), t.index, t.codec);
        if t.kind == tessera_engine::probe::TrackKind::Audio {
            line.push_str(&format!(" {} Hz, {} channels", t.sample_rate, t.channels));
        }
        if t.kind == tessera_engine::probe::TrackKind::Subtitle {
            line.push_str(if t.text { " (text)" } else { " (bitmap)" });
        }
        if let Some(l) = &t.language {
            line.push_str(&format!(", {l}"));
        }
        if let Some(n) = &t.title {
            line.push_str(&format!(", {n:?}"));
        }
        if t.default {
            line.push_str(", default");
        }
        if t.forced {
            line.push_str(", forced");
        }
        println!("{line}");
    }
    println!(
        "  keyframes: {} (from {})",
        info.keyframes.len(),
        info.keyframe_source
    );
    Ok(())
}

/// `tessera cp` runs the `tessera-cp` binary beside this one where there is one, the way `git foo` runs
/// `git-foo`: it carries no FFmpeg, so a copy's memory is the copy's own (about 50 MiB less than this binary's
/// baseline). Without it, the copy runs here.
fn cp_cmd(
    src: &str,
    dst: &str,
    json: bool,
    verbose: u8,
    log_format: tessera_worker::logging::LogFormat,
) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    if let Some(bin) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("tessera-cp")))
        .filter(|b| b.is_file())
    {
        let mut cmd = std::process::Command::new(&bin);
        if verbose > 0 {
            cmd.arg(format!("-{}", "v".repeat(verbose as usize)));
        }
        cmd.arg(src).arg(dst);
        if json {
            cmd.arg("--json");
        }
        if log_format == tessera_worker::logging::LogFormat::Json {
            cmd.env("TESSERA_LOG_FORMAT", "json");
        }
        let err = cmd.exec();
        tracing::warn!(bin = %bin.display(), error = %err, "could not run tessera-cp; copying here");
    }
    tessera_engine::s3::cli::cp_command(src, dst, json)
}
