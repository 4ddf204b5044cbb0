//! `tessera-operator`: the Kubernetes controller. This build carries the API types only; the controllers
//! (TranscodeJob, WorkerPool, the work queue) come with the operator issue. Until then it says so and exits
//! non-zero, so nobody mistakes it for a working operator.

use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("tessera-operator {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "tessera-operator {}: the controllers are not part of this build yet (API group {}); use `tessera run` \
         for local mode",
        env!("CARGO_PKG_VERSION"),
        tessera_crds::GROUP
    );
    ExitCode::from(2)
}
