//! `tessera-cp SRC DST`: what `tessera cp` runs. A binary of its own so that a copy does not carry the
//! media engine's FFmpeg libraries (their mapped pages alone are about 50 MiB of resident memory).

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tessera-cp",
    version,
    about = "Copy file → s3://, s3:// → file, or s3:// → s3://, streaming"
)]
struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Source: a path, file:// or s3://bucket/key.
    src: String,
    /// Destination: a path, file:// or s3://bucket/key (a key ending in / takes the source's name).
    dst: String,
    /// Print one JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // (Not tessera_worker::logging: this binary links no FFmpeg, and that crate does.)
    let b = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tessera_engine::s3::cli::log_filter(cli.verbose).into()),
        )
        .with_writer(std::io::stderr);
    if std::env::var("TESSERA_LOG_FORMAT").as_deref() == Ok("json") {
        b.json().init();
    } else {
        b.init();
    }
    match tessera_engine::s3::cli::cp_command(&cli.src, &cli.dst, cli.json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
