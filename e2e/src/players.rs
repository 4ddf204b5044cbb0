//! Real players for the tests: hls.js, dash.js and Shaka Player in Debian's Chromium, driven by
//! `e2e/players/play.mjs` (installed by `make setup` into the cache, keyed by its lock file).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::cluster::root;

/// Where `make setup` installed the players (`TESSERA_PLAYERS`, else the cache folder for this lock file).
pub fn players_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TESSERA_PLAYERS") {
        return PathBuf::from(d);
    }
    let lock = root().join("e2e/players/package-lock.json");
    let out = Command::new("sha256sum")
        .arg(&lock)
        .output()
        .expect("sha256sum");
    let hash: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .take(16)
        .collect();
    let d = crate::s3server::cache_dir().join(format!("players-{hash}"));
    assert!(
        d.join("node_modules/hls.js").exists(),
        "{} is missing: run `make setup` (it installs the test players)",
        d.display()
    );
    d
}

/// Play `manifest` (inside `root_dir`) to its end in a real player (`hls`, `dash` or `shaka`) in headless
/// Chromium; returns what the player reported (see e2e/players/play.mjs).
pub fn play(player: &str, root_dir: &Path, manifest: &str, env: &[(&str, &str)]) -> Value {
    let out = Command::new("node")
        .arg(root().join("e2e/players/play.mjs"))
        .args([player, root_dir.to_str().expect("UTF-8 path"), manifest])
        .env("TESSERA_PLAYERS", players_dir())
        .envs(env.iter().copied())
        .output()
        .expect("node runs (the machine has Node.js)");
    assert!(
        out.status.success(),
        "{player} on {manifest}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "{player}: no report ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
