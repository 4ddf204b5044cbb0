//! A real S3 server for tests: `s3s-fs` (installed by `make setup` into the cache) serving a temporary
//! folder on a free loopback port.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const S3S_FS_VERSION: &str = "0.14.1";

/// Where `make setup` installs s3s-fs (`TESSERA_S3S_FS` overrides).
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_S3S_FS") {
        return p.into();
    }
    cache_dir().join(format!("s3s-fs-{S3S_FS_VERSION}/bin/s3s-fs"))
}

/// Where `make setup` caches tools: `$TESSERA_CACHE`, else `$XDG_CACHE_HOME/tessera`, else `~/.cache/tessera`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TESSERA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("tessera")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tessera")
        })
}

pub struct S3Server {
    child: Child,
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    pub access_key: String,
    pub secret_key: String,
}

/// A loopback port nothing listens on at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl S3Server {
    /// Start a server with one bucket per name in `buckets`; returns once it accepts connections.
    pub fn start(buckets: &[&str]) -> Self {
        let bin = s3s_fs_binary();
        assert!(
            bin.exists(),
            "{} is missing: run `make setup`",
            bin.display()
        );
        let root = tempfile::Builder::new()
            .prefix("tessera-s3-")
            .tempdir()
            .expect("temporary folder");
        for b in buckets {
            std::fs::create_dir_all(root.path().join(b)).expect("bucket folder");
        }
        let secret_key = format!("test-secret-{:016x}", fastrand::u64(..));
        // A port taken between free_port() and the bind is retried with another.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", "tessera-test", "--secret-key", &secret_key])
                .arg(root.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("s3s-fs starts");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Self {
                        child,
                        addr,
                        root,
                        access_key: "tessera-test".into(),
                        secret_key,
                    };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("s3s-fs did not start");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Environment for a client of this server (through `endpoint`, e.g. a proxy, or the server itself).
    pub fn env(&self, endpoint: &str) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), endpoint.into()),
            // Keep the test's own ~/.aws out of it.
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// The object's bytes on the server's disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// Multipart uploads still open on the server. s3s-fs does not implement ListMultipartUploads; it keeps
    /// each open upload as `.upload-<id>.json` (and its parts) in its root folder, so they are counted there.
    pub fn open_uploads(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![self.root.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                } else if name.starts_with(".upload") {
                    found.push(name);
                }
            }
        }
        found
    }

    /// Every object key under a bucket (files of the bucket folder, hidden bookkeeping files left out).
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let base = self.root.path().join(bucket);
        let mut out = Vec::new();
        let mut stack = vec![base.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(p);
                } else if !e.file_name().to_string_lossy().starts_with('.') {
                    out.push(rel(&base, &p));
                }
            }
        }
        out.sort();
        out
    }
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base)
        .unwrap_or(p)
        .to_string_lossy()
        .into_owned()
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
