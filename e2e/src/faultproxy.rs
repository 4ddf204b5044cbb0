//! A fault-injecting HTTP/1.1 proxy for object-storage tests.
//!
//! Clients talk to the proxy as if it were the S3 endpoint (Host headers are forwarded unchanged, so SigV4
//! signatures stay valid). Each request is matched against the armed faults, first match wins, and each
//! fault fires a set number of times:
//! * `Status`: answer with an S3 error document (503 SlowDown, 500 InternalError) without forwarding;
//! * `Reset { after }`: forward, send `after` bytes of the response body, then drop the connection;
//! * `Stall { after, for_ }`: forward, send `after` bytes, then send nothing for `for_`;
//! * `Delay(d)`: hold the request for `d` before forwarding it;
//! * `Drop`: close the connection without any response (what an outage looks like to a client);
//! * `WrongRegion(r)`: S3's region redirect (301, `x-amz-bucket-region: r`) without forwarding.
//!
//! Besides: `set_outage(true)` makes every request a `Drop`; `set_bandwidth` limits response bodies;
//! `set_storm(p)` answers a random fraction `p` of requests with 503/500. Counters tell tests what passed,
//! and `seen()` lists every request (method, path, the SigV4 access key id) so a test can show a key was
//! never asked for, or which credentials asked.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, std::io::Error>;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Status(u16),
    Reset {
        after: u64,
    },
    Stall {
        after: u64,
        for_: Duration,
    },
    /// Hold the request this long before forwarding it (a slow or hung store).
    Delay(Duration),
    Drop,
    /// Answer as S3 does for a bucket in another region: 301 with `x-amz-bucket-region` (and, except to
    /// HEAD, a PermanentRedirect error document). No local S3 server sends this; the row using it is emulated.
    WrongRegion(&'static str),
}

#[derive(Debug, Clone)]
struct Armed {
    method: Option<Method>,
    fault: Fault,
    remaining: u32,
}

#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub faults: AtomicU64,
    /// Response body bytes sent to clients for GET requests.
    pub get_body_bytes: AtomicU64,
    pub gets: AtomicU64,
    pub puts: AtomicU64,
}

/// One request as the proxy saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// Path and query, percent-encoded as sent.
    pub path: String,
    /// The access key id of the SigV4 `Authorization` header (`Credential=AKID/...`); empty when unsigned.
    pub access_key: String,
}

#[derive(Default)]
struct Shared {
    armed: Mutex<Vec<Armed>>,
    seen: Mutex<Vec<Seen>>,
    outage: AtomicBool,
    /// Bytes per second for response bodies; 0 = unlimited.
    bandwidth: AtomicU64,
    /// Fraction of requests (in millionths) answered with 503/500.
    storm_ppm: AtomicU64,
    counters: Counters,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let shared = Arc::new(Shared::default());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let sh = shared.clone();
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (sh, client) = (sh.clone(), client.clone());
                tokio::spawn(async move {
                    let svc =
                        service_fn(move |req| handle(req, upstream, sh.clone(), client.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            shared,
            _runtime: rt,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Arm `fault` for the next `times` requests with this method (any method when `None`).
    pub fn arm(&self, method: Option<Method>, fault: Fault, times: u32) {
        self.shared.armed.lock().unwrap().push(Armed {
            method,
            fault,
            remaining: times,
        });
    }

    /// Faults armed and not yet fired.
    pub fn pending(&self) -> u32 {
        self.shared
            .armed
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.remaining)
            .sum()
    }

    pub fn disarm(&self) {
        self.shared.armed.lock().unwrap().clear();
    }

    pub fn set_outage(&self, on: bool) {
        self.shared.outage.store(on, Ordering::SeqCst);
    }

    pub fn set_bandwidth(&self, bytes_per_second: u64) {
        self.shared
            .bandwidth
            .store(bytes_per_second, Ordering::SeqCst);
    }

    pub fn set_storm(&self, fraction: f64) {
        self.shared
            .storm_ppm
            .store((fraction * 1e6) as u64, Ordering::SeqCst);
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }
}

/// `AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/s3/aws4_request, ...` → `AKID`.
fn access_key_id(authorization: &str) -> String {
    authorization
        .split_once("Credential=")
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap_or_default()
        .to_string()
}

fn s3_error(status: u16) -> Response<Body> {
    let (code, msg) = match status {
        503 => ("SlowDown", "Please reduce your request rate."),
        500 => (
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
        _ => ("ServiceUnavailable", "Injected fault."),
    };
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{msg}</Message></Error>"
    );
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE))
        .header("content-type", "application/xml")
        .body(
            Full::new(Bytes::from(xml))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response")
}

fn pick(sh: &Shared, method: &Method) -> Option<Fault> {
    if sh.outage.load(Ordering::SeqCst) {
        return Some(Fault::Drop);
    }
    {
        let mut armed = sh.armed.lock().unwrap();
        if let Some(a) = armed
            .iter_mut()
            .find(|a| a.remaining > 0 && a.method.as_ref().is_none_or(|m| m == method))
        {
            a.remaining -= 1;
            return Some(a.fault);
        }
    }
    let ppm = sh.storm_ppm.load(Ordering::Relaxed);
    if ppm > 0 && fastrand::u64(..1_000_000) < ppm {
        return Some(Fault::Status(if fastrand::bool() { 503 } else { 500 }));
    }
    None
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    sh: Arc<Shared>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
) -> Result<Response<Body>, std::io::Error> {
    sh.counters.requests.fetch_add(1, Ordering::Relaxed);
    let method = req.method().clone();
    if method == Method::GET {
        sh.counters.gets.fetch_add(1, Ordering::Relaxed);
    } else if method == Method::PUT {
        sh.counters.puts.fetch_add(1, Ordering::Relaxed);
    }
    sh.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        access_key: req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(access_key_id)
            .unwrap_or_default(),
    });
    let fault = pick(&sh, &method);
    let (parts, body) = req.into_parts();
    // Read the request body whole (parts are a few MiB) so a fault never leaves it half-sent upstream.
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    match fault {
        Some(Fault::Drop) => {
            sh.counters.faults.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::other("injected: connection dropped"));
        }
        Some(Fault::Status(code)) => {
            sh.counters.faults.fetch_add(1, Ordering::Relaxed);
            return Ok(s3_error(code));
        }
        Some(Fault::Delay(d)) => {
            sh.counters.faults.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(d).await;
        }
        Some(Fault::WrongRegion(region)) => {
            sh.counters.faults.fetch_add(1, Ordering::Relaxed);
            let body = if method == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from(format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>PermanentRedirect</Code><Message>The bucket \
                     you are attempting to access must be addressed using the specified endpoint.</Message>\
                     <Endpoint>s3.{region}.amazonaws.com</Endpoint></Error>"
                ))
            };
            return Ok(Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header("content-type", "application/xml")
                .header("x-amz-bucket-region", region)
                .body(Full::new(body).map_err(|never| match never {}).boxed())
                .expect("static response"));
        }
        _ => {}
    }
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut up = Request::from_parts(parts, Full::new(body));
    *up.uri_mut() = format!("http://{upstream}{pq}")
        .parse()
        .expect("upstream URI");
    let resp = client.request(up).await.map_err(std::io::Error::other)?;
    let (rparts, rbody) = resp.into_parts();
    let is_get = method == Method::GET;
    let cut = match fault {
        Some(Fault::Reset { after }) | Some(Fault::Stall { after, .. }) => {
            sh.counters.faults.fetch_add(1, Ordering::Relaxed);
            Some(after)
        }
        _ => None,
    };
    // Stream the response body through: count it, throttle it, and cut or stall it where armed.
    struct St {
        body: Incoming,
        sent: u64,
        sh: Arc<Shared>,
        fault: Option<Fault>,
        cut: Option<u64>,
        pending: Option<Bytes>,
        is_get: bool,
        done: bool,
    }
    let st = St {
        body: rbody,
        sent: 0,
        sh: sh.clone(),
        fault,
        cut,
        pending: None,
        is_get,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let mut data = match st.pending.take() {
            Some(d) => d,
            None => loop {
                match st.body.frame().await {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) if d.is_empty() => continue,
                        Ok(d) => break d,
                        Err(_) => continue,
                    },
                    Some(Err(e)) => {
                        st.done = true;
                        return Some((Err(std::io::Error::other(e)), st));
                    }
                    None => return None,
                }
            },
        };
        if let Some(cut) = st.cut {
            if st.sent >= cut {
                match st.fault {
                    Some(Fault::Stall { for_, .. }) => {
                        tokio::time::sleep(for_).await;
                        st.cut = None;
                    }
                    _ => {
                        st.done = true;
                        return Some((
                            Err(std::io::Error::other("injected: connection reset mid-body")),
                            st,
                        ));
                    }
                }
            } else if st.sent + data.len() as u64 > cut {
                let n = (cut - st.sent) as usize;
                st.pending = Some(data.split_off(n));
            }
        }
        // At most 64 KiB per frame so the bandwidth limit is smooth.
        if data.len() > 64 << 10 {
            let rest = data.split_off(64 << 10);
            st.pending = Some(match st.pending.take() {
                Some(p) => {
                    let mut v = rest.to_vec();
                    v.extend_from_slice(&p);
                    Bytes::from(v)
                }
                None => rest,
            });
        }
        let bw = st.sh.bandwidth.load(Ordering::Relaxed);
        if bw > 0 {
            tokio::time::sleep(Duration::from_secs_f64(data.len() as f64 / bw as f64)).await;
        }
        st.sent += data.len() as u64;
        if st.is_get {
            st.sh
                .counters
                .get_body_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Some((Ok(Frame::data(data)), st))
    });
    let body: Body = BodyExt::boxed(StreamBody::new(stream));
    Ok(Response::from_parts(rparts, body))
}

/// Handy for tests that must not wait forever on a condition.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_key_id_comes_from_the_sigv4_credential() {
        assert_eq!(
            super::access_key_id(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261202/us-east-1/s3/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature=abc"
            ),
            "AKIDEXAMPLE"
        );
        assert_eq!(super::access_key_id("Bearer x"), "");
    }
}
