//! The `cp` command, shared by `tessera cp` and the FFmpeg-free `tessera-cp` binary.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::cp::{copy, CopyProgress, Location};
use crate::error::Error;

/// The default log filter for `-v` counts. The SDK's region lookup warns when it cannot reach instance
/// metadata (common off EC2, and harmless: the region then defaults to us-east-1); keep that out.
pub fn log_filter(verbose: u8) -> &'static str {
    match verbose {
        0 => "warn,aws_config=error",
        1 => "info,aws_config=error",
        _ => "debug",
    }
}

/// `tessera cp SRC DST [--json]`.
pub fn cp_command(src: &str, dst: &str, json: bool) -> Result<(), Error> {
    let src_loc = Location::parse(src)?;
    let mut dst_loc = Location::parse(dst)?;
    // `cp x s3://b/dir/` and `cp s3://b/k dir/` keep the source's name, as cp and aws s3 cp do.
    let src_name = match &src_loc {
        Location::File(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
        Location::S3(u) => u.key.rsplit('/').next().map(str::to_string),
    }
    .filter(|n| !n.is_empty());
    match &mut dst_loc {
        Location::S3(u) if u.key.is_empty() || u.key.ends_with('/') => {
            if let Some(n) = &src_name {
                u.key.push_str(n);
            }
        }
        Location::File(p) if p.is_dir() || dst.ends_with('/') => {
            if let Some(n) = &src_name {
                *p = p.join(n);
            }
        }
        _ => {}
    }
    let _ = ctrlc::set_handler(|| {
        eprintln!("\ntessera: stopping the copy");
        super::interrupt();
    });
    let s3 = super::global();
    let progress = Arc::new(CopyProgress::default());
    let started = std::time::Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar_thread = std::io::stderr().is_terminal().then(|| {
        let (progress, done) = (progress.clone(), done.clone());
        std::thread::spawn(move || {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            while !done.load(Ordering::Relaxed) {
                bar.set_length(progress.total.load(Ordering::Relaxed));
                bar.set_position(progress.done.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        })
    });
    let res = super::block_on(copy(&s3, &src_loc, &dst_loc, &progress));
    done.store(true, Ordering::Relaxed);
    if let Some(t) = bar_thread {
        let _ = t.join();
    }
    let bytes = res?;
    let secs = started.elapsed().as_secs_f64();
    let stats = s3.stats.snapshot();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "source": src_loc.to_string(),
                "destination": dst_loc.to_string(),
                "bytes": bytes,
                "seconds": (secs * 1000.0).round() / 1000.0,
                "mibPerSecond": ((bytes as f64 / 1048576.0 / secs.max(1e-9)) * 10.0).round() / 10.0,
                "s3": stats,
            })
        );
    } else {
        println!(
            "{src_loc} -> {dst_loc}: {bytes} bytes in {secs:.1}s ({:.1} MiB/s)",
            bytes as f64 / 1048576.0 / secs.max(1e-9)
        );
    }
    Ok(())
}
