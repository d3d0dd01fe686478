//! Shared harness for the end-to-end tests: real hyper upstreams on 127.0.0.1:0, the
//! gateway started in-process from TOML text, a real SQLite ledger in a temp dir, and a
//! small HTTP client.
#![allow(dead_code)]

pub(crate) mod facilitator;
pub(crate) mod pg;
pub(crate) mod stripe;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tollgate::app::{self, Running};
use tollgate::config::Config;
use tollgate::ledger::Ledger;
use tollgate::Body;

/// What an upstream saw of one request.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
}

/// A real HTTP server on 127.0.0.1:0 that counts and records what reaches it.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub(crate) fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    pub(crate) fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("upstream saw a request")
    }
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts an upstream whose responses come from `handler`.
pub(crate) async fn upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (h2, s2) = (hits.clone(), seen.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (handler, hits, seen) = (handler.clone(), h2.clone(), s2.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    seen.lock().unwrap().push(Seen {
                        method: req.method().clone(),
                        uri: req.uri().to_string(),
                        headers: req.headers().clone(),
                    });
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream { addr, hits, seen }
}

/// Serves HTTP/1 and HTTP/2 on `listener` with `handler` until the test's runtime ends
/// (the stand-ins of outside services: a facilitator, Stripe).
pub(crate) fn serve<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// Checks Prometheus text with `promtool check metrics`.
pub(crate) fn assert_promtool_accepts(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool is installed (scripts/test.sh installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An upstream answering 200 `{"ok":true,"path":...}`.
pub(crate) async fn ok_upstream() -> Upstream {
    upstream(|req: Request<Incoming>| async move {
        let body = format!("{{\"ok\":true,\"path\":\"{}\"}}", req.uri().path());
        let mut res = Response::new(tollgate::full(body));
        res.headers_mut().insert("content-type", "application/json".parse().unwrap());
        res
    })
    .await
}

/// An upstream answering with `status` and an empty body.
pub(crate) async fn status_upstream(status: u16) -> Upstream {
    upstream(move |_req| async move {
        let mut res = Response::new(tollgate::empty());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        res
    })
    .await
}

/// A gateway running in-process on ephemeral ports.
pub(crate) struct Gateway {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub ledger: Arc<dyn Ledger>,
    pub config_path: PathBuf,
    pub base: String,
    pub admin: String,
}

pub(crate) const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

impl Gateway {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }
    pub(crate) fn gw(&self) -> &tollgate::gateway::Gateway {
        &self.running.as_ref().unwrap().gateway
    }
    pub(crate) async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
    /// Creates a key with `balance` (decimal string); returns (id, secret).
    pub(crate) async fn key(&self, balance: &str) -> (String, String) {
        let k = self.ledger.create_key(Some("test"), tollgate::money::Micros::parse(balance).unwrap()).await.unwrap();
        (k.id, k.key)
    }
    pub(crate) async fn balance(&self, id: &str) -> tollgate::money::Micros {
        self.ledger.key(id).await.unwrap().unwrap().balance
    }
}

/// The `[server]`, `[admin]` and `[ledger]` sections every test config starts with.
/// `{db}` is replaced by a fresh SQLite path.
pub(crate) fn base_config() -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://api.test\"\nheader_read_timeout = \"2s\"\nshutdown_timeout = \"5s\"\n\n\
[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[ledger]\npath = \"{{db}}\"\n\n"
    )
}

/// Starts the gateway with `base_config()` followed by `rest` (upstreams, routes, …).
pub(crate) async fn gateway(rest: &str) -> Gateway {
    gateway_with(rest, app::default_rails()).await
}

pub(crate) async fn gateway_with(rest: &str, rails: tollgate::gateway::RailFactory) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let text = format!("{}{rest}", base_config()).replace("{db}", &db.display().to_string());
    start_text(dir, &text, rails).await
}

/// Like [`gateway`], but `edit` may rewrite the whole config text first (e.g. to set
/// `header_read_timeout = "500ms"` or add `trusted_proxies` under `[server]`).
pub(crate) async fn gateway_edit(rest: &str, edit: impl FnOnce(String) -> String) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let text = edit(format!("{}{rest}", base_config())).replace("{db}", &db.display().to_string());
    start_text(dir, &text, app::default_rails()).await
}

/// Starts a gateway from complete config text (with `{db}` already replaced).
pub(crate) async fn start_text(dir: tempfile::TempDir, text: &str, rails: tollgate::gateway::RailFactory) -> Gateway {
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, text).unwrap();
    let cfg = Config::load(&config_path).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    let ledger = app::open_ledger(&cfg).await.unwrap();
    let running = app::start(cfg, Some(config_path.clone()), ledger.clone(), rails).await.unwrap();
    let base = format!("http://{}", running.addr);
    let admin = format!("http://{}", running.admin_addr);
    Gateway { running: Some(running), dir, ledger, config_path, base, admin }
}

/// A response read in full.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub(crate) fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request and reads the whole response (10 s bound).
pub(crate) async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let fut = async {
        let res = client().request(req).await.expect("request reached the gateway");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Reply { status: parts.status, headers: parts.headers, body }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.expect("response within 10s")
}

pub(crate) async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    send("GET", url, headers, Bytes::new()).await
}

/// An admin API call with the test admin token.
pub(crate) async fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    send(
        method,
        &gw.admin_url(path),
        &[("authorization", &auth), ("content-type", "application/json")],
        body.to_owned(),
    )
    .await
}

/// Path to the built `tollgate` binary (for black-box tests).
pub(crate) fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))
}

/// A child process that is killed (by PID) and reaped when dropped, whatever happened.
pub(crate) struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port that was free a moment ago (for configs of spawned binaries).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `tollgate ARGS --config CONFIG`; returns (success, stdout, stderr).
pub(crate) fn cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(binary()).args(args).arg("--config").arg(config).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Parses a command's JSON output, or fails the test showing it.
pub(crate) fn parse_json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The `tollgate keys` round trip every ledger backend must pass, through the built
/// binary: create (JSON and readable), idempotent credit, show, list, revoke, and the
/// errors for an unknown key and an over-precise amount. Returns the first key's id.
pub(crate) fn keys_cli_round_trip(cfg: &std::path::Path) -> String {
    let (ok, out, err) = cli(cfg, &["keys", "create", "--balance", "5.00", "--label", "acme", "--json"]);
    assert!(ok, "{err}");
    let k = parse_json(&out);
    let id = k["id"].as_str().unwrap().to_owned();
    assert!(k["key"].as_str().unwrap().starts_with("tg_live_"));
    assert_eq!(k["balance"], "5.00");

    let (ok, out, err) = cli(cfg, &["keys", "create", "--balance", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("shown only this once"), "{out}");

    let (ok, out, err) = cli(cfg, &["keys", "credit", &id, "2.5", "--idempotency-key", "inv-7", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(parse_json(&out)["balance"], "7.50");
    let (ok, out, _) = cli(cfg, &["keys", "credit", &id, "2.5", "--idempotency-key", "inv-7", "--json"]);
    assert!(ok);
    assert_eq!(parse_json(&out)["applied"], false);
    assert_eq!(parse_json(&out)["balance"], "7.50");

    let (ok, out, _) = cli(cfg, &["keys", "show", &id, "--json"]);
    assert!(ok);
    let shown = parse_json(&out);
    assert_eq!((shown["label"].as_str(), shown["balance"].as_str()), (Some("acme"), Some("7.50")));
    assert!(!out.contains("tg_live_"), "the secret is never shown again");
    let (ok, out, _) = cli(cfg, &["keys", "list", "--json"]);
    assert!(ok);
    assert_eq!(parse_json(&out)["keys"].as_array().unwrap().len(), 2);

    let (ok, out, _) = cli(cfg, &["keys", "revoke", &id]);
    assert!(ok, "{out}");
    assert!(out.contains("revoked"));
    let (_, out, _) = cli(cfg, &["keys", "show", &id, "--json"]);
    assert_eq!(parse_json(&out)["revoked"], true);

    let (ok, _, err) = cli(cfg, &["keys", "credit", "key_missing", "1"]);
    assert!(!ok);
    assert!(err.contains("key_missing"), "{err}");
    let (ok, _, err) = cli(cfg, &["keys", "credit", &id, "0.0000001"]);
    assert!(!ok);
    assert!(err.contains("6 decimal"), "{err}");
    id
}

/// Where `needle` first occurs in `hay`.
pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads from `s` until a complete request head arrived; `None` if the peer closed or
/// failed first. For hand-written upstreams that must see exactly what was sent.
pub(crate) async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while find(&buf, b"\r\n\r\n").is_none() {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(buf)
}
