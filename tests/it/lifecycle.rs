//! Lifecycle: reload, admin auth, graceful shutdown, idle connections and HTTP/2 limits,
//! signals and `tollgate check`.
//!
//! In-process tests drive the gateway through `tests/it/support`; the signal tests run the
//! built binary. Ordering is proven with channels (an upstream that holds its answer
//! until the test releases it), never with sleeps; time bounds are generous ceilings.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tollgate::Body;

const T: Duration = Duration::from_secs(10);

// === helpers ===

fn upstream_section(url: &str) -> String {
    format!("[[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n")
}

fn free_route(name: &str, path: &str) -> String {
    format!("[[route]]\nname = \"{name}\"\nupstream = \"api\"\npath = \"{path}\"\nfree = true\n\n")
}

fn priced_route(name: &str, path: &str, price: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nupstream = \"api\"\npath = \"{path}\"\nprice = \"{price}\"\naccept = [\"credits\"]\n\n"
    )
}

/// Rewrites the running gateway's config file: the harness's base sections, then `rest`.
fn rewrite_config(gw: &Gateway, rest: &str) {
    let db = gw.dir.path().join("ledger.db");
    let text = format!("{}{rest}", base_config()).replace("{db}", &db.display().to_string());
    std::fs::write(&gw.config_path, text).unwrap();
}

fn addr(gw: &Gateway) -> SocketAddr {
    gw.running.as_ref().unwrap().addr
}

/// A body fed by the returned sender; it ends when the sender drops.
fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, tollgate::BoxError>(Frame::data(b)), rx))
    });
    (tx, http_body_util::StreamBody::new(stream).boxed_unsync())
}

/// An upstream that answers paths containing `/slow` only when the test calls `release`, telling the
/// test (through `arrived`) when such a request got there; anything else is 200 `ok`.
struct Gated {
    up: Upstream,
    arrived: mpsc::Receiver<()>,
    release: Arc<Notify>,
}

async fn gated_upstream() -> Gated {
    let (tx, arrived) = mpsc::channel(8);
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let (tx, r) = (tx.clone(), r.clone());
        async move {
            if req.uri().path().contains("/slow") {
                let released = r.notified();
                let _ = tx.send(()).await;
                released.await;
                return Response::new(tollgate::full("finally"));
            }
            Response::new(tollgate::full("ok"))
        }
    })
    .await;
    Gated { up, arrived, release }
}

impl Gated {
    async fn wait_arrival(&mut self) {
        tokio::time::timeout(T, self.arrived.recv()).await.expect("request reached the upstream").unwrap();
    }
}

/// Polls until a TCP connection to `addr` is refused.
async fn until_refused(addr: SocketAddr) {
    let refused = async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(T, refused).await.expect("new connections refused after shutdown began");
}

/// One GET that may fail (the gateway may be starting or stopping): status or None.
async fn try_get(url: &str) -> Option<u16> {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(2), client().request(req)).await.ok()?.ok()?;
    Some(res.status().as_u16())
}

// === reload ===

#[tokio::test]
async fn admin_reload_swaps_routes_and_prices() {
    let up = ok_upstream().await;
    let before = format!(
        "{}{}{}",
        upstream_section(&up.url()),
        free_route("a", "/a/*"),
        priced_route("paid", "/paid/*", "0.002")
    );
    let gw = gateway(&before).await;
    assert_eq!(get(&gw.url("/a/x"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/b/x"), &[]).await.status, 404);
    let r = get(&gw.url("/paid/x"), &[]).await;
    assert_eq!(r.status, 402);
    assert_eq!(r.json()["price"]["amount"], "0.002");

    rewrite_config(
        &gw,
        &format!(
            "{}{}{}{}",
            upstream_section(&up.url()),
            free_route("a", "/a/*"),
            free_route("b", "/b/*"),
            priced_route("paid", "/paid/*", "0.005")
        ),
    );
    let r = admin(&gw, "POST", "/admin/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "reloaded");

    assert_eq!(get(&gw.url("/b/x"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/a/x"), &[]).await.status, 200);
    let r = get(&gw.url("/paid/x"), &[]).await;
    assert_eq!(r.status, 402);
    assert_eq!(r.json()["price"]["amount"], "0.005");
    assert_eq!(up.hits(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn gateway_reload_swaps_routes() {
    let up = ok_upstream().await;
    let gw = gateway(&format!("{}{}", upstream_section(&up.url()), free_route("a", "/a/*"))).await;
    assert_eq!(get(&gw.url("/c/x"), &[]).await.status, 404);
    rewrite_config(&gw, &format!("{}{}", upstream_section(&up.url()), free_route("c", "/c/*")));
    gw.gw().reload().await.expect("valid config reloads");
    assert_eq!(get(&gw.url("/c/x"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/a/x"), &[]).await.status, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_reload_is_refused_with_every_error_and_the_old_config_keeps_serving() {
    let up = ok_upstream().await;
    let gw = gateway(&format!("{}{}", upstream_section(&up.url()), free_route("a", "/a/*"))).await;
    rewrite_config(
        &gw,
        &format!(
            "[[upstream]]\nname = \"api\"\nurl = \"{}\"\ntimeout = \"soon\"\n\n{}{}{}",
            up.url(),
            free_route("a", "/a/*"),
            free_route("b", "/b/*").replace("upstream = \"api\"", "upstream = \"nope\""),
            priced_route("c", "/c/*", "abc"),
        ),
    );
    let expected = ["upstream[0].timeout: ", "route[1].upstream: ", "route[2].price: "];

    let r = admin(&gw, "POST", "/admin/reload", "").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let j = r.json();
    assert_eq!(j["status"], "refused");
    let errors: Vec<&str> = j["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    for (e, prefix) in errors.iter().zip(expected) {
        assert!(e.starts_with(prefix), "{e:?} should start with {prefix:?}");
    }

    let e = gw.gw().reload().await.expect_err("invalid config refused");
    assert_eq!(e.0, errors);

    // The old config is untouched.
    assert_eq!(get(&gw.url("/a/x"), &[]).await.status, 200);
    assert_eq!(get(&gw.url("/b/x"), &[]).await.status, 404);
    assert_eq!(get(&gw.url("/c/x"), &[]).await.status, 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn in_flight_stream_completes_across_a_reload() {
    let slot: Arc<Mutex<Option<Body>>> = Arc::default();
    let (tx, body) = channel_body();
    *slot.lock().unwrap() = Some(body);
    let s = slot.clone();
    let up = upstream(move |_req| {
        let body = s.lock().unwrap().take().unwrap_or_else(|| tollgate::full("later"));
        async move { Response::new(body) }
    })
    .await;
    let gw = gateway(&format!("{}{}", upstream_section(&up.url()), free_route("stream", "/stream/*"))).await;

    let res = tokio::time::timeout(T, client().get(gw.url("/stream/feed").parse().unwrap())).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    tx.send(Bytes::from_static(b"before;")).await.unwrap();
    let first = tokio::time::timeout(T, body.frame()).await.unwrap().unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "before;");

    // The route this stream came through disappears.
    rewrite_config(&gw, &format!("{}{}", upstream_section(&up.url()), free_route("other", "/other/*")));
    let r = admin(&gw, "POST", "/admin/reload", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(&gw.url("/stream/feed"), &[]).await.status, 404);

    tx.send(Bytes::from_static(b"after;")).await.unwrap();
    tx.send(Bytes::from_static(b"end")).await.unwrap();
    drop(tx);
    let rest = tokio::time::timeout(T, body.collect()).await.unwrap().unwrap().to_bytes();
    assert_eq!(rest, "after;end");
    gw.shutdown().await;
}

// === admin auth ===

#[tokio::test]
async fn admin_api_needs_the_token_and_probes_do_not() {
    let up = ok_upstream().await;
    let gw = gateway(&format!("{}{}", upstream_section(&up.url()), free_route("a", "/a/*"))).await;

    let r = send("POST", &gw.admin_url("/admin/reload"), &[], "").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"tollgate-admin\""));
    for wrong in ["Bearer wrong-token-0123456789", "Bearer test-admin-token-012345678", "Basic dGVzdA==", "Bearer"] {
        let r = send("POST", &gw.admin_url("/admin/reload"), &[("authorization", wrong)], "").await;
        assert_eq!(r.status, 401, "{wrong}");
    }

    let r = get(&gw.admin_url("/metrics"), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("tollgate_"), "{}", r.text());
    assert_eq!(get(&gw.admin_url("/healthz"), &[]).await.status, 200);
    let r = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    gw.shutdown().await;
}

// === graceful shutdown ===

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let mut g = gated_upstream().await;
    let mut gw = gateway(&format!("{}{}", upstream_section(&g.up.url()), free_route("all", "/*"))).await;
    let a = addr(&gw);
    let url = gw.url("/slow/report");
    let in_flight = tokio::spawn(async move { get(&url, &[]).await });
    g.wait_arrival().await;

    let running = gw.running.take().unwrap();
    let _ = running.shutdown_handle().send(true);
    let stopped = tokio::spawn(running.wait());
    until_refused(a).await;
    assert!(!stopped.is_finished(), "shutdown finished while a request was in flight");

    g.release.notify_one();
    let r = tokio::time::timeout(T, in_flight).await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "finally");
    tokio::time::timeout(T, stopped).await.expect("shutdown completes after the drain").unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_deadline_closes_connections_that_do_not_finish() {
    let mut g = gated_upstream().await;
    let mut gw = gateway_edit(&format!("{}{}", upstream_section(&g.up.url()), free_route("all", "/*")), |t| {
        t.replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"300ms\"")
    })
    .await;
    let req = Request::get(gw.url("/slow/forever")).body(Full::new(Bytes::new())).unwrap();
    let in_flight = tokio::spawn(client().request(req));
    g.wait_arrival().await;

    let running = gw.running.take().unwrap();
    let _ = running.shutdown_handle().send(true);
    tokio::time::timeout(T, running.wait()).await.expect("shutdown completes at its deadline");
    // The stuck request's connection was closed, not left running in the background.
    let res = tokio::time::timeout(T, in_flight).await.expect("connection closed at the deadline").unwrap();
    assert!(res.is_err(), "{res:?}");
    gw.shutdown().await;
}

// === idle connections and HTTP/2 limits ===

/// Config edit: `extra` keys added to `[server]`.
fn server_keys(extra: &str) -> impl FnOnce(String) -> String + '_ {
    move |t| t.replace("shutdown_timeout = \"5s\"", &format!("shutdown_timeout = \"5s\"\n{extra}"))
}

/// An HTTP/2 client connection (h2c by prior knowledge). Its h2 stack answers the
/// server's PINGs for as long as `conn` runs; `conn` ends when the server closes.
struct H2 {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

async fn h2_connect(addr: SocketAddr) -> H2 {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    H2 { send, conn: tokio::spawn(conn) }
}

impl H2 {
    /// A GET on this connection, read in full.
    async fn get(&mut self, url: &str) -> (u16, Bytes) {
        let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        let res = tokio::time::timeout(T, self.send.send_request(req)).await.expect("answer within 10s").unwrap();
        let status = res.status().as_u16();
        (status, res.into_body().collect().await.unwrap().to_bytes())
    }

    /// Waits (10 s at most) for the server to close the connection; true when it was
    /// closed cleanly (GOAWAY, then close) rather than reset.
    async fn closed(&mut self, what: &str) -> bool {
        let end = tokio::time::timeout(T, &mut self.conn).await.unwrap_or_else(|_| panic!("{what}"));
        end.unwrap().is_ok()
    }
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// A bare HTTP/2 client that reads and writes frames (RFC 9113 §4), to see exactly
/// what the server sends and to do what hyper's client would not.
struct RawH2(TcpStream);

struct RawFrame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl RawH2 {
    /// Connects, sends the preface and an empty SETTINGS frame.
    async fn connect(addr: SocketAddr) -> RawH2 {
        let mut h2 = RawH2(TcpStream::connect(addr).await.unwrap());
        h2.0.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        h2.send(SETTINGS, 0, 0, &[]).await;
        h2
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.0.write_all(&frame_bytes(kind, flags, stream, payload)).await.unwrap();
    }

    /// A GET on `stream`, ending the stream.
    async fn get(&mut self, stream: u32, path: &str) {
        self.0.write_all(&get_frame(stream, path)).await.unwrap();
    }

    /// The next frame; `None` once the server closed the connection (10 s at most).
    async fn frame(&mut self) -> Option<RawFrame> {
        let read = async {
            let mut head = [0u8; 9];
            self.0.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            self.0.read_exact(&mut payload).await.ok()?;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            Some(RawFrame { kind: head[3], flags: head[4], stream, payload })
        };
        tokio::time::timeout(T, read).await.expect("a frame or the close within 10s")
    }

    /// Reads frames until the server closes; answers PINGs when `answer_pings`. Returns
    /// the frames seen.
    async fn until_closed(&mut self, answer_pings: bool) -> Vec<RawFrame> {
        let mut seen = Vec::new();
        while let Some(f) = self.frame().await {
            if answer_pings && f.kind == PING && f.flags & ACK == 0 {
                self.send(PING, ACK, 0, &f.payload).await;
            }
            seen.push(f);
        }
        seen
    }
}

fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// HEADERS for a GET, with END_STREAM and END_HEADERS; the header block is HPACK
/// without Huffman coding (RFC 7541: static-table `:method GET` and `:scheme http`,
/// literal `:path` and `:authority`).
fn get_frame(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend(path.as_bytes());
    block.extend([0x01, 9]);
    block.extend(b"127.0.0.1");
    frame_bytes(HEADERS, 0x1 | 0x4, stream, &block)
}

/// The error code of a GOAWAY or RST_STREAM payload.
fn error_code(f: &RawFrame) -> u32 {
    let at = if f.kind == GOAWAY { 4 } else { 0 };
    u32::from_be_bytes(f.payload[at..at + 4].try_into().unwrap())
}

/// SETTINGS_MAX_CONCURRENT_STREAMS from the server's first frame, its SETTINGS.
async fn max_concurrent_streams(h2: &mut RawH2) -> Option<u32> {
    let settings = h2.frame().await.expect("server SETTINGS");
    assert_eq!((settings.kind, settings.flags), (SETTINGS, 0), "the server speaks first with SETTINGS");
    settings.payload.chunks(6).find(|s| s[..2] == [0, 0x3]).map(|s| u32::from_be_bytes(s[2..].try_into().unwrap()))
}

#[tokio::test]
async fn http2_stream_cap_defaults_to_100() {
    let up = ok_upstream().await;
    let gw = gateway(&format!("{}{}", upstream_section(&up.url()), free_route("all", "/*"))).await;
    let mut h2 = RawH2::connect(addr(&gw)).await;
    assert_eq!(max_concurrent_streams(&mut h2).await, Some(100));
    drop(h2);
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_http2_connection_is_closed_after_the_idle_timeout() {
    let up = ok_upstream().await;
    let routes = format!("{}{}", upstream_section(&up.url()), free_route("all", "/*"));
    let gw = gateway_edit(&routes, server_keys("idle_timeout = \"300ms\"")).await;

    let mut c = h2_connect(addr(&gw)).await;
    assert_eq!(c.get(&gw.url("/a/x")).await.0, 200);
    assert_eq!(c.get(&gw.url("/a/y")).await.0, 200, "the connection stays open between requests");
    // Left idle, its PINGs answered by the client's h2 stack.
    assert!(c.closed("idle HTTP/2 connection closed").await, "closed with GOAWAY, not reset");
    assert!(c.send.is_closed());
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_http2_connection_gets_goaway_and_is_closed_whether_or_not_it_answers_pings() {
    let up = ok_upstream().await;
    let routes = format!("{}{}", upstream_section(&up.url()), free_route("all", "/*"));
    let gw = gateway_edit(&routes, server_keys("idle_timeout = \"300ms\"")).await;

    for answer_pings in [true, false] {
        // Preface and SETTINGS, then nothing: never a request.
        let mut h2 = RawH2::connect(addr(&gw)).await;
        let seen = h2.until_closed(answer_pings).await;
        let goaway = seen.iter().find(|f| f.kind == GOAWAY);
        let goaway = goaway.unwrap_or_else(|| panic!("GOAWAY before the close (answer_pings = {answer_pings})"));
        assert_eq!(error_code(goaway), 0, "NO_ERROR");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn idle_http2_connections_give_their_slots_back() {
    let up = ok_upstream().await;
    let routes = format!("{}{}", upstream_section(&up.url()), free_route("all", "/*"));
    let gw = gateway_edit(&routes, server_keys("max_connections = 2\nidle_timeout = \"300ms\"")).await;
    let a = addr(&gw);

    // Two clients hold both slots (each was served, so each was accepted), then idle.
    let mut idle = [h2_connect(a).await, h2_connect(a).await];
    for c in &mut idle {
        assert_eq!(c.get(&gw.url("/a/x")).await.0, 200);
    }
    // A third waits in the listen backlog until an idle one is closed.
    let mut third = h2_connect(a).await;
    assert_eq!(third.get(&gw.url("/a/third")).await.0, 200);
    for c in &mut idle {
        assert!(c.closed("idle connection closed").await);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn streamed_response_keeps_its_http2_connection_open_past_the_idle_timeout() {
    let slot: Arc<Mutex<Option<Body>>> = Arc::default();
    let (tx, body) = channel_body();
    *slot.lock().unwrap() = Some(body);
    let s = slot.clone();
    let up = upstream(move |_req| {
        let body = s.lock().unwrap().take().unwrap_or_else(|| tollgate::full("later"));
        async move { Response::new(body) }
    })
    .await;
    let routes = format!("{}{}", upstream_section(&up.url()), free_route("stream", "/stream/*"));
    let gw = gateway_edit(&routes, server_keys("idle_timeout = \"300ms\"")).await;
    let a = addr(&gw);

    let mut c = h2_connect(a).await;
    let req = Request::get(gw.url("/stream/feed")).body(Full::new(Bytes::new())).unwrap();
    let res = tokio::time::timeout(T, c.send.send_request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    tx.send(Bytes::from_static(b"first;")).await.unwrap();
    let first = tokio::time::timeout(T, body.frame()).await.unwrap().unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first;");

    // Connections opened now, one after the other, and left idle are closed after the
    // idle timeout: by then the streaming connection has gone twice that long without a
    // new request (twice: a graceful close waits for the stream, a stalled one does not).
    for _ in 0..2 {
        let mut witness = h2_connect(a).await;
        assert!(witness.closed("witness connection closed").await);
    }
    assert!(!c.conn.is_finished(), "the connection was closed while its response was streaming");
    let (status, other) = c.get(&gw.url("/stream/other")).await;
    assert_eq!((status, &other[..]), (200, &b"later"[..]), "no GOAWAY: the connection still takes requests");

    tx.send(Bytes::from_static(b"second;")).await.unwrap();
    tx.send(Bytes::from_static(b"end")).await.unwrap();
    drop(tx);
    let rest = tokio::time::timeout(T, body.collect()).await.unwrap().unwrap().to_bytes();
    assert_eq!(rest, "second;end");
    // Once the stream has ended the connection is idle, and closed in its turn.
    assert!(c.closed("connection closed after its stream ended").await);
    gw.shutdown().await;
}

#[tokio::test]
async fn http2_concurrent_streams_are_capped() {
    let mut g = gated_upstream().await;
    let routes = format!("{}{}", upstream_section(&g.up.url()), free_route("all", "/*"));
    let gw = gateway_edit(&routes, server_keys("http2_max_concurrent_streams = 2")).await;

    let mut h2 = RawH2::connect(addr(&gw)).await;
    assert_eq!(max_concurrent_streams(&mut h2).await, Some(2));
    h2.send(SETTINGS, ACK, 0, &[]).await;

    // Three requests at once, against an upstream that holds its answers.
    for stream in [1, 3, 5] {
        h2.get(stream, &format!("/slow/{stream}")).await;
    }
    g.wait_arrival().await;
    g.wait_arrival().await;
    let refused = loop {
        let f = h2.frame().await.expect("RST_STREAM before the close");
        if f.kind == RST_STREAM {
            break f;
        }
    };
    assert_eq!((refused.stream, error_code(&refused)), (5, 0x7), "stream 5 refused (REFUSED_STREAM)");

    g.release.notify_one();
    g.release.notify_one();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let f = h2.frame().await.expect("responses before the close");
        if f.kind == HEADERS {
            answered.push(f.stream);
        }
    }
    answered.sort();
    assert_eq!(answered, [1, 3]);
    assert_eq!(g.up.hits(), 2, "the refused stream never reached the upstream");
    drop(h2);
    gw.shutdown().await;
}

#[tokio::test]
async fn http2_rapid_reset_closes_the_connection() {
    let up = ok_upstream().await;
    let gw = gateway(&format!("{}{}", upstream_section(&up.url()), free_route("all", "/*"))).await;

    // CVE-2023-44487: open a stream and cancel it at once, twice as often as allowed,
    // in one write, so the resets arrive before the server has taken the streams up.
    let mut h2 = RawH2::connect(addr(&gw)).await;
    let mut burst = Vec::new();
    for stream in (1..80).step_by(2) {
        burst.extend(get_frame(stream, "/a/x"));
        burst.extend(frame_bytes(RST_STREAM, 0, stream, &0x8u32.to_be_bytes()));
    }
    h2.0.write_all(&burst).await.unwrap();
    let goaway = h2.until_closed(true).await.into_iter().find(|f| f.kind == GOAWAY);
    let goaway = goaway.expect("GOAWAY before the close");
    assert_eq!(error_code(&goaway), 0xb, "ENHANCE_YOUR_CALM");
    gw.shutdown().await;
}

/// An HTTP/1.1 client connection; `conn` ends when the server closes it.
async fn h1_connect(
    addr: SocketAddr,
) -> (hyper::client::conn::http1::SendRequest<Full<Bytes>>, tokio::task::JoinHandle<Result<(), hyper::Error>>) {
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    (send, tokio::spawn(conn))
}

async fn h1_get(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, path: &str) -> u16 {
    let req = Request::get(path).header("host", "127.0.0.1").body(Full::new(Bytes::new())).unwrap();
    let res = tokio::time::timeout(T, send.send_request(req)).await.expect("answer within 10s").unwrap();
    let status = res.status().as_u16();
    res.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let up = ok_upstream().await;
    let routes = format!("{}{}", upstream_section(&up.url()), free_route("all", "/*"));
    // The header read timeout also bounds the wait for a next request (next test); here
    // it is longer than the test's bound, so only the idle timeout can close.
    let gw = gateway_edit(&routes, |t| {
        server_keys("idle_timeout = \"300ms\"")(t)
            .replace("header_read_timeout = \"2s\"", "header_read_timeout = \"30s\"")
    })
    .await;

    let (mut send, conn) = h1_connect(addr(&gw)).await;
    assert_eq!(h1_get(&mut send, "/a/x").await, 200);
    assert_eq!(h1_get(&mut send, "/a/y").await, 200, "kept alive between requests");
    let end = tokio::time::timeout(T, conn).await.expect("idle keep-alive connection closed");
    assert!(end.unwrap().is_ok());
    gw.shutdown().await;
}

#[tokio::test]
async fn http1_header_read_timeout_also_closes_an_idle_keep_alive_connection() {
    let up = ok_upstream().await;
    let routes = format!("{}{}", upstream_section(&up.url()), free_route("all", "/*"));
    // hyper restarts its header timer whenever a connection waits for a request head,
    // the next one on a kept-alive connection included. Idle timeout left at 60 s.
    let gw =
        gateway_edit(&routes, |t| t.replace("header_read_timeout = \"2s\"", "header_read_timeout = \"300ms\"")).await;

    let (mut send, conn) = h1_connect(addr(&gw)).await;
    assert_eq!(h1_get(&mut send, "/a/x").await, 200);
    let end = tokio::time::timeout(T, conn).await.expect("idle keep-alive connection closed");
    assert!(end.unwrap().is_ok());
    gw.shutdown().await;
}

// === the binary: signals and `check` ===

/// The `tollgate` child process; killed (by PID) and reaped however the test ends.
fn signal(child: &Proc, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(child.0.id().to_string()).status().unwrap();
    assert!(status.success(), "kill -{sig} failed");
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
}

#[tokio::test]
async fn sighup_reloads_and_sigterm_drains_then_exits_zero() {
    let mut g = gated_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let config = |routes: &str| {
        base_config()
            .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1)
            .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{admin_port}\""), 1)
            .replace("{db}", &dir.path().join("ledger.db").display().to_string())
            + &upstream_section(&g.up.url())
            + routes
    };
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config(&free_route("a", "/a/*"))).unwrap();
    let child = Command::new(binary())
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let mut child = Proc(child);
    let base = format!("http://127.0.0.1:{port}");

    let ready = async {
        while try_get(&format!("http://127.0.0.1:{admin_port}/healthz")).await != Some(200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(T, ready)
        .await
        .unwrap_or_else(|_| panic!("gateway never became ready:\n{}", log_of(dir.path())));
    // The binary installs its signal handlers right after it starts listening; leave it
    // a moment so SIGHUP is not taken by the default action (which would kill it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(try_get(&format!("{base}/a/x")).await, Some(200));
    assert_eq!(try_get(&format!("{base}/b/x")).await, Some(404));

    // SIGHUP: the new route works.
    std::fs::write(&path, config(&(free_route("a", "/a/*") + &free_route("b", "/b/*")))).unwrap();
    signal(&child, "HUP");
    let reloaded = async {
        while try_get(&format!("{base}/b/x")).await != Some(200) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(T, reloaded)
        .await
        .unwrap_or_else(|_| panic!("SIGHUP did not reload:\n{}", log_of(dir.path())));
    assert!(child.0.try_wait().unwrap().is_none(), "SIGHUP killed the process");

    // SIGTERM with a request in flight: it completes, then the process exits 0.
    let (done_tx, done_rx) = oneshot::channel();
    let slow = format!("{base}/a/slow");
    tokio::spawn(async move {
        let _ = done_tx.send(get(&slow, &[]).await);
    });
    g.wait_arrival().await;
    signal(&child, "TERM");
    until_refused(format!("127.0.0.1:{port}").parse().unwrap()).await;
    assert!(child.0.try_wait().unwrap().is_none(), "exited before draining");
    g.release.notify_one();
    let r = tokio::time::timeout(T, done_rx).await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "finally");
    let exited = async {
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let status = tokio::time::timeout(T, exited).await.expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", log_of(dir.path()));
}

#[test]
fn check_prints_every_mistake_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:8080\"\n\n\
[[upstream]]\nname = \"api\"\nurl = \"http://127.0.0.1:3000\"\ntimeout = \"soon\"\n\n\
[[route]]\nname = \"chat\"\nupstream = \"ap\"\npath = \"/v1/*\"\nprice = \"two cents\"\naccept = [\"credits\"]\n",
    )
    .unwrap();
    let out = Command::new(binary()).arg("check").arg("--config").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  ")).map(str::trim).collect();
    assert_eq!(errors.len(), 3, "{stderr}");
    assert!(errors[0].starts_with("upstream[0].timeout: "), "{stderr}");
    assert!(errors[1].starts_with("route[0].upstream: no upstream named \"ap\""), "{stderr}");
    assert!(errors[2].starts_with("route[0].price: "), "{stderr}");
    assert!(stderr.contains("3 error(s)"), "{stderr}");

    // And a good file passes.
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:8080\"\n").unwrap();
    let out = Command::new(binary()).arg("check").arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
