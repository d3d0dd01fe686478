//! Transparency: what a reverse proxy must not break (RFC 9110 and the README's proxy guarantees).
//!
//! Every test runs the gateway in-process in front of real upstreams on 127.0.0.1:0
//! and asserts exact values, so each one fails when the behaviour it is named after
//! breaks. Where a client library would refuse to send something (hop-by-hop headers,
//! broken requests), a raw `TcpStream` writes the HTTP/1.1 bytes itself. Nothing
//! waits on a clock to prove ordering: upstreams are gated by channels, and timeouts
//! are only generous upper bounds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tollgate::Body;

/// Upper bound for anything that should take milliseconds.
const T: Duration = Duration::from_secs(10);

// === helpers ===

/// One upstream named `api` behind a free catch-all route.
fn free_all(url: &str) -> String {
    format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n\
[[route]]\nname = \"all\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n"
    )
}

fn addr(gw: &Gateway) -> SocketAddr {
    gw.running.as_ref().unwrap().addr
}

/// A body fed by the returned sender, frame by frame; it ends when the sender drops.
fn channel_body() -> (mpsc::Sender<Frame<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, tollgate::BoxError>(f), rx))
    });
    (tx, StreamBody::new(stream).boxed_unsync())
}

fn data(s: &'static str) -> Frame<Bytes> {
    Frame::data(Bytes::from_static(s.as_bytes()))
}

/// A client whose request bodies may stream.
fn streaming_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Reads the next data frame (skipping trailers) within `T`.
async fn next_data(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(T, body.frame()).await.expect("frame within 10s")?;
        if let Ok(d) = frame.expect("body frame").into_data() {
            return Some(d);
        }
    }
}

/// What an upstream read of one request's body.
#[derive(Debug, Clone, Default)]
struct Received {
    body: Bytes,
    trailers: Option<HeaderMap>,
}

/// An upstream that reads every request body in full and answers 200 `ok`.
async fn body_upstream() -> (Upstream, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let g = got.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let g = g.clone();
        async move {
            let collected = req.into_body().collect().await.expect("request body");
            let trailers = collected.trailers().cloned();
            g.lock().unwrap().push(Received { body: collected.to_bytes(), trailers });
            Response::new(tollgate::full("ok"))
        }
    })
    .await;
    (up, got)
}

/// An upstream written by hand: on each connection it reads one request head, records
/// it, writes `response` verbatim and closes. For responses hyper would not send.
async fn raw_upstream(response: &'static [u8]) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = heads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let h = h.clone();
            tokio::spawn(async move {
                let Some(buf) = read_head(&mut s).await else { return };
                h.lock().unwrap().push(String::from_utf8_lossy(&buf).into_owned());
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (url, heads)
}

/// Writes `request` on a new connection and reads until the server closes it.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it read everything (e.g. 431).
    let _ = s.write_all(request).await;
    read_until_close(&mut s).await
}

/// Everything the peer sends until it closes (a reset ends the read too).
async fn read_until_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await.expect("connection closed within 10s") {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A response as it crossed the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn parse(bytes: &[u8]) -> Raw {
        let end = find(bytes, b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response head in {:?}", String::from_utf8_lossy(bytes)));
        let head = std::str::from_utf8(&bytes[..end]).expect("ASCII response head");
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).expect("status code").parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').expect("header line");
                (k.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        Raw { status, headers, body: bytes[end + 4..].to_vec() }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn assert_problem(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let j = r.json();
    assert_eq!(j["status"], status);
    let ty = j["type"].as_str().unwrap();
    assert_eq!(ty, format!("https://api.test/.well-known/tollgate/problems/{code}"));
    assert_eq!(j["request_id"].as_str(), r.header("x-request-id"));
}

// === hop-by-hop headers (RFC 9110 §7.6.1) ===

#[tokio::test]
async fn hop_by_hop_request_headers_are_not_forwarded() {
    let (up, got) = body_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let req = b"POST /hop HTTP/1.1\r\n\
Host: gw.test\r\n\
Connection: close, X-Hop-Custom, X-Forwarded-For, X-Request-Id\r\n\
Keep-Alive: timeout=5\r\n\
Proxy-Connection: keep-alive\r\n\
Proxy-Authorization: Basic c2VjcmV0\r\n\
TE: trailers, deflate\r\n\
Upgrade: websocket\r\n\
X-Hop-Custom: secret\r\n\
X-Request-Id: client-chosen-id\r\n\
X-End-To-End: kept\r\n\
Transfer-Encoding: chunked\r\n\
\r\n\
5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let res = Raw::parse(&raw_exchange(addr(&gw), req).await);
    assert_eq!(res.status, 200);

    let seen = up.last();
    for name in ["connection", "keep-alive", "proxy-connection", "proxy-authorization", "upgrade", "x-hop-custom"] {
        assert!(!seen.headers.contains_key(name), "{name} reached the upstream: {:?}", seen.headers);
    }
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.headers["x-end-to-end"], "kept");
    // Naming a header in `Connection` strips what the client sent, never what the
    // gateway itself adds afterwards.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    let rid = seen.headers["x-request-id"].to_str().unwrap();
    assert_ne!(rid, "client-chosen-id");
    assert_eq!(rid.len(), 26, "a fresh ULID: {rid}");
    // The chunked framing is this hop's; the upstream gets the same bytes, re-framed.
    assert!(!seen.headers.contains_key("content-length"));
    assert_eq!(got.lock().unwrap()[0].body, "hello world");
    gw.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_not_returned() {
    let (url, _) = raw_upstream(
        b"HTTP/1.1 200 OK\r\n\
Content-Length: 2\r\n\
Connection: close, X-Hop-Resp\r\n\
Keep-Alive: timeout=5\r\n\
X-Hop-Resp: secret\r\n\
Proxy-Authenticate: Basic realm=\"up\"\r\n\
Proxy-Connection: keep-alive\r\n\
Upgrade: h2c\r\n\
X-End-To-End: kept\r\n\
\r\n\
ok",
    )
    .await;
    let gw = gateway(&free_all(&url)).await;

    // Keep-alive client: any `Connection` in the answer would be the upstream's.
    let r = get(&gw.url("/resp"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    for name in ["connection", "keep-alive", "x-hop-resp", "proxy-authenticate", "proxy-connection", "upgrade"] {
        assert!(r.header(name).is_none(), "{name} reached the client: {:?}", r.headers);
    }
    assert_eq!(r.header("x-end-to-end"), Some("kept"));
    assert_eq!(r.header("content-length"), Some("2"));

    // On the wire too, with the client closing: only the gateway's own `close`.
    let raw =
        Raw::parse(&raw_exchange(addr(&gw), b"GET /resp HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await);
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("connection"), Some("close"));
    assert_eq!(raw.header("x-hop-resp"), None);
    assert_eq!(raw.header("keep-alive"), None);
    assert_eq!(raw.body, b"ok");
    gw.shutdown().await;
}

// === X-Forwarded-* ===

#[tokio::test]
async fn forwarded_headers_are_set_and_an_untrusted_client_cannot_spoof_them() {
    let up = ok_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let r = get(
        &gw.url("/fwd"),
        &[
            ("host", "Public.Test:8443"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.test"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let h = up.last().headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "Public.Test:8443");
    // Host names the upstream, as nginx's default `proxy_set_header Host $proxy_host`.
    assert_eq!(h["host"], up.addr.to_string().as_str());
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_is_kept_and_extended() {
    let up = ok_upstream().await;
    let gw = gateway_edit(&free_all(&up.url()), |t| {
        t.replacen("[server]\n", "[server]\ntrusted_proxies = [\"127.0.0.1/32\"]\n", 1)
    })
    .await;
    let r = get(
        &gw.url("/fwd"),
        &[
            ("host", "gw.internal"),
            ("x-forwarded-for", "198.51.100.7, 10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "public.test"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let h = up.last().headers;
    assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.0.0.2, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "public.test");

    let r = get(&gw.url("/fwd"), &[("host", "gw.internal")]).await;
    assert_eq!(r.status, 200);
    let h = up.last().headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "gw.internal");
    gw.shutdown().await;
}

// === paths and queries ===

#[tokio::test]
async fn query_reaches_the_upstream_byte_for_byte_and_the_path_in_its_normal_form() {
    let up = ok_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    for (target, forwarded) in [
        ("/docs/a%2Fb%20c?x=1&y=%3D&z", "/docs/a%2Fb%20c?x=1&y=%3D&z"),
        (
            "/docs/%7Euser/;p=1/caf%C3%A9/%2e%2E/x?q=a+b&q=%2B&empty=&&flag#",
            "/docs/~user/;p=1/x?q=a+b&q=%2B&empty=&&flag",
        ),
        ("/docs/a%2fb?%2e%2e=%2f", "/docs/a%2Fb?%2e%2e=%2f"),
        ("/docs/x?", "/docs/x?"),
        ("/docs//double//slash/?a[]=1&a[]=2", "/docs/double/slash/?a[]=1&a[]=2"),
    ] {
        let sent = target.trim_end_matches('#');
        let r = get(&gw.url(sent), &[]).await;
        assert_eq!(r.status, 200, "{sent}");
        assert_eq!(up.last().uri, forwarded);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn strip_prefix_removes_only_the_prefix() {
    let up = ok_upstream().await;
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"based\"\nurl = \"{url}/base\"\n\n\
[[upstream]]\nname = \"plain\"\nurl = \"{url}\"\n\n\
[[route]]\nname = \"api\"\nupstream = \"based\"\npath = \"/api/*\"\nfree = true\nstrip_prefix = \"/api\"\n\n\
[[route]]\nname = \"p\"\nupstream = \"plain\"\npath = \"/p/*\"\nfree = true\nstrip_prefix = \"/p/\"\n",
        url = up.url()
    ))
    .await;
    for (sent, expected) in [
        ("/api/v2/items?id=7", "/base/v2/items?id=7"),
        ("/api", "/base/"),
        ("/api?x=1", "/base/?x=1"),
        ("/api/a%2Fb", "/base/a%2Fb"),
        ("/p/a%2Fb?x", "/a%2Fb?x"),
        ("/p/p/nested", "/p/nested"),
    ] {
        let r = get(&gw.url(sent), &[]).await;
        assert_eq!(r.status, 200, "{sent}");
        assert_eq!(up.last().uri, expected, "{sent}");
    }
    assert_eq!(get(&gw.url("/apix"), &[]).await.status, 404);
    gw.shutdown().await;
}

// === streaming ===

#[tokio::test]
async fn chunked_upload_arrives_complete() {
    let (up, got) = body_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let (tx, body) = channel_body();
    let feeder = tokio::spawn(async move {
        for part in ["alpha,", "beta,", "gamma"] {
            tx.send(data(part)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let req = Request::post(gw.url("/upload")).body(body).unwrap();
    let res = tokio::time::timeout(T, streaming_client().request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    feeder.await.unwrap();
    let seen = up.last();
    assert!(!seen.headers.contains_key("content-length"));
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert_eq!(got.lock().unwrap()[0].body, "alpha,beta,gamma");
    gw.shutdown().await;
}

#[tokio::test]
async fn upload_streams_to_the_upstream_before_the_client_finished() {
    // The upstream echoes each chunk as it arrives. The client waits for the echo of
    // its first chunk before sending the second: a gateway that buffered the whole
    // request body would deadlock here (and hit the timeout).
    let total = Arc::new(Mutex::new(Vec::<u8>::new()));
    let t = total.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let t = t.clone();
        async move {
            let (tx, body) = channel_body();
            let mut incoming = req.into_body();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = incoming.frame().await {
                    if let Ok(d) = frame.into_data() {
                        t.lock().unwrap().extend_from_slice(&d);
                        if tx.send(Frame::data(d)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Response::new(body)
        }
    })
    .await;
    let gw = gateway(&free_all(&up.url())).await;

    let (tx, body) = channel_body();
    tx.send(data("first;")).await.unwrap();
    let req = Request::post(gw.url("/echo")).body(body).unwrap();
    let res = tokio::time::timeout(T, streaming_client().request(req)).await.expect("head before body end").unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    assert_eq!(next_data(&mut body).await.unwrap(), "first;");
    tx.send(data("second;")).await.unwrap();
    assert_eq!(next_data(&mut body).await.unwrap(), "second;");
    tx.send(data("third")).await.unwrap();
    drop(tx);
    let mut rest = Vec::new();
    while let Some(d) = next_data(&mut body).await {
        rest.extend_from_slice(&d);
    }
    assert_eq!(rest, b"third");
    assert_eq!(*total.lock().unwrap(), b"first;second;third");
    gw.shutdown().await;
}

/// A process's resident set and its peak (`VmRSS`, `VmHWM` in `/proc/PID/status`).
fn rss_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in status"));
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// Measured on the built binary in a process of its own, so that other tests running
/// in this one cannot move the figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_with_bounded_memory() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 4096; // 256 MiB, generated on the fly
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let up = upstream(move |_req| {
        let chunk = chunk.clone();
        async move {
            let stream = futures_util::stream::iter(0..CHUNKS)
                .map(move |_| Ok::<_, tollgate::BoxError>(Frame::data(chunk.clone())));
            let mut res = Response::new(StreamBody::new(stream).boxed_unsync());
            res.headers_mut().insert("content-length", HeaderValue::from(CHUNK * CHUNKS));
            res
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
[ledger]\npath = \"{db}\"\n\n[log]\nfilter = \"warn\"\n\n{routes}",
            db = dir.path().join("ledger.db").display(),
            routes = free_all(&up.url()),
        ),
    )
    .unwrap();
    let gw = Proc(
        std::process::Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}/big");
    // Warm up (the first request builds the pool and the runtime's buffers), bounded.
    let mut warm = false;
    for _ in 0..200 {
        if let Ok(Ok(r)) = tokio::time::timeout(
            T,
            crate::support::client().get(format!("http://127.0.0.1:{port}/small").parse().unwrap()),
        )
        .await
        {
            let _ = r.into_body().collect().await;
            warm = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(warm, "the gateway did not start");
    let (before, _) = rss_of(gw.0.id());

    let res = crate::support::client().get(url.parse().unwrap()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-length"], (CHUNK * CHUNKS).to_string().as_str());
    let mut body = res.into_body();
    let mut n = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                n += d.len();
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("256 MiB within 60s");
    assert_eq!(n, CHUNK * CHUNKS);
    let (_, peak) = rss_of(gw.0.id());
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 64 * 1024 * 1024,
        "the gateway's peak RSS grew by {} MiB for a 256 MiB body",
        growth / (1024 * 1024)
    );
}

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let slot: Arc<Mutex<Option<Body>>> = Arc::default();
    let (tx, body) = channel_body();
    *slot.lock().unwrap() = Some(body);
    let s = slot.clone();
    let up = upstream(move |_req| {
        let body = s.lock().unwrap().take().unwrap_or_else(tollgate::empty);
        async move {
            let mut res = Response::new(body);
            res.headers_mut().insert("content-type", HeaderValue::from_static("text/event-stream"));
            res.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
            res
        }
    })
    .await;
    let gw = gateway(&free_all(&up.url())).await;

    let req = Request::get(gw.url("/events")).header("accept", "text/event-stream").body(tollgate::empty()).unwrap();
    let res = tokio::time::timeout(T, streaming_client().request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert!(res.headers().get("content-length").is_none());
    let mut body = res.into_body();
    // Each event is produced only after the previous one reached the client.
    for n in 1..=3 {
        let event = Bytes::from(format!("data: {n}\n\n"));
        tx.send(Frame::data(event.clone())).await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"\n\n") {
            got.extend_from_slice(&next_data(&mut body).await.expect("event"));
        }
        assert_eq!(got, event);
    }
    drop(tx);
    assert!(next_data(&mut body).await.is_none());
    gw.shutdown().await;
}

// === upgrades ===

#[tokio::test]
async fn websocket_echo_passes_through() {
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let gw = gateway(&free_all(&format!("http://{up_addr}"))).await;

    let url = format!("ws://{}/ws/chat?room=1", addr(&gw));
    let (mut ws, res) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url)).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(res.headers().get("x-request-id").is_some());
    ws.send(Message::text("hello through the gate")).await.unwrap();
    let echo = tokio::time::timeout(T, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo, Message::text("hello through the gate"));
    let blob: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let echo = tokio::time::timeout(T, ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echo, Message::binary(blob));
    ws.close(None).await.unwrap();
    gw.shutdown().await;
}

// === HEAD, 204, 304, empty bodies, trailers ===

#[tokio::test]
async fn head_keeps_content_length_and_sends_no_body() {
    let (url, heads) = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
    )
    .await;
    let gw = gateway(&free_all(&url)).await;
    let raw =
        Raw::parse(&raw_exchange(addr(&gw), b"HEAD /file HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await);
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-length"), Some("1234"));
    assert_eq!(raw.header("content-type"), Some("text/plain"));
    assert_eq!(raw.header("transfer-encoding"), None);
    assert!(raw.body.is_empty(), "HEAD answered with a body: {:?}", raw.body);
    assert!(heads.lock().unwrap()[0].starts_with("HEAD /file HTTP/1.1\r\n"));
    gw.shutdown().await;
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    let up = upstream(|req: Request<Incoming>| async move {
        let mut res = Response::new(tollgate::empty());
        match req.uri().path() {
            "/gone" => *res.status_mut() = StatusCode::NO_CONTENT,
            _ => {
                res.headers_mut().insert("etag", HeaderValue::from_static("\"v1\""));
                if req.headers().get("if-none-match").is_some_and(|v| v == "\"v1\"") {
                    *res.status_mut() = StatusCode::NOT_MODIFIED;
                } else {
                    *res.body_mut() = tollgate::full("fresh");
                }
            }
        }
        res
    })
    .await;
    let gw = gateway(&free_all(&up.url())).await;

    let raw =
        Raw::parse(&raw_exchange(addr(&gw), b"DELETE /gone HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").await);
    assert_eq!(raw.status, 204);
    assert_eq!(raw.header("transfer-encoding"), None);
    assert_eq!(raw.header("content-length"), None);
    assert!(raw.body.is_empty());

    let raw = Raw::parse(
        &raw_exchange(
            addr(&gw),
            b"GET /doc HTTP/1.1\r\nHost: gw\r\nIf-None-Match: \"v1\"\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    assert_eq!(raw.status, 304);
    assert_eq!(raw.header("etag"), Some("\"v1\""));
    assert_eq!(raw.header("transfer-encoding"), None);
    assert!(raw.body.is_empty());
    assert_eq!(up.last().headers["if-none-match"], "\"v1\"");

    let r = get(&gw.url("/doc"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    assert_eq!(r.text(), "fresh");
    gw.shutdown().await;
}

#[tokio::test]
async fn zero_length_post_keeps_content_length_zero() {
    let (up, got) = body_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let raw = Raw::parse(
        &raw_exchange(addr(&gw), b"POST /zero HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await,
    );
    assert_eq!(raw.status, 200);
    assert_eq!(raw.body, b"ok");
    let seen = up.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.headers["content-length"], "0");
    assert!(!seen.headers.contains_key("transfer-encoding"));
    assert!(got.lock().unwrap()[0].body.is_empty());
    gw.shutdown().await;
}

/// An upstream that answers with a chunked body and trailers when asked with
/// `TE: trailers`, and reports the HTTP version and forwarded proto it saw.
async fn trailers_upstream() -> Upstream {
    upstream(|req: Request<Incoming>| async move {
        let te = req.headers().get("te").is_some_and(|v| v == "trailers");
        let proto = req.headers().get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let _ = tx.send(Frame::data(Bytes::from(format!("{:?} {proto};", req.version())))).await;
            let _ = tx.send(data("part2")).await;
            if te {
                let mut t = HeaderMap::new();
                t.insert("x-checksum", HeaderValue::from_static("abc123"));
                t.insert("grpc-status", HeaderValue::from_static("0"));
                let _ = tx.send(Frame::trailers(t)).await;
            }
        });
        let mut res = Response::new(body);
        res.headers_mut().insert("trailer", HeaderValue::from_static("x-checksum, grpc-status"));
        res
    })
    .await
}

#[tokio::test]
async fn response_trailers_pass_through() {
    let up = trailers_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let req = Request::get(gw.url("/t")).header("te", "trailers").body(Full::new(Bytes::new())).unwrap();
    let res = tokio::time::timeout(T, crate::support::client().request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["transfer-encoding"], "chunked");
    let collected = tokio::time::timeout(T, res.into_body().collect()).await.unwrap().unwrap();
    let trailers = collected.trailers().cloned().expect("trailers reached the client");
    assert_eq!(collected.to_bytes(), "HTTP/1.1 http;part2");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(up.last().headers["te"], "trailers");
    gw.shutdown().await;
}

#[tokio::test]
async fn request_trailers_pass_through() {
    let (up, got) = body_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let req = b"POST /rt HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTrailer: x-req-sum\r\nConnection: close\r\n\r\n\
5\r\nhello\r\n0\r\nX-Req-Sum: 42\r\n\r\n";
    let raw = Raw::parse(&raw_exchange(addr(&gw), req).await);
    assert_eq!(raw.status, 200);
    let r = got.lock().unwrap()[0].clone();
    assert_eq!(r.body, "hello");
    assert_eq!(r.trailers.expect("trailers reached the upstream")["x-req-sum"], "42");
    gw.shutdown().await;
}

// === upstream failures ===

#[tokio::test]
async fn upstream_connect_error_is_502_problem() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let gw = gateway(&free_all(&format!("http://{closed}"))).await;
    let r = get(&gw.url("/down?secret=1"), &[]).await;
    assert_problem(&r, 502, "upstream_unavailable");
    assert_eq!(r.json()["instance"], "/down");
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_that_never_answers_is_504_problem() {
    let up = upstream(|_req| std::future::pending::<Response<Body>>()).await;
    let gw = gateway(&free_all(&up.url()).replacen("url = ", "timeout = \"300ms\"\nurl = ", 1)).await;
    let started = Instant::now();
    let r = get(&gw.url("/slow"), &[]).await;
    assert_problem(&r, 504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(up.hits(), 1);
    gw.shutdown().await;
}

// === slow and huge request heads ===

#[tokio::test]
async fn slow_header_clients_are_cut_off_while_others_are_served() {
    let up = ok_upstream().await;
    let gw = gateway_edit(&free_all(&up.url()), |t| {
        t.replace("header_read_timeout = \"2s\"", "header_read_timeout = \"500ms\"")
    })
    .await;
    let a = addr(&gw);
    let started = Instant::now();
    let stallers: Vec<_> = [
        &b"GET /slow HTTP/1.1\r\nHost: gw\r\nX-Partial: ab"[..],
        b"",                   // connects and says nothing
        b"PRI * HTTP/2.0\r\n", // half an HTTP/2 preface
        b"G",                  // one byte
    ]
    .into_iter()
    .map(|bytes| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(a).await.unwrap();
            s.write_all(bytes).await.unwrap();
            let got = read_until_close(&mut s).await;
            (started.elapsed(), got)
        })
    })
    .collect();
    // Meanwhile, everyone else is served.
    for i in 0..5 {
        let r = get(&gw.url(&format!("/ok/{i}")), &[]).await;
        assert_eq!(r.status, 200);
    }
    for (i, s) in stallers.into_iter().enumerate() {
        let (elapsed, got) = s.await.unwrap();
        assert!(elapsed >= Duration::from_millis(450), "staller {i} cut after {elapsed:?}, before the timeout");
        assert!(elapsed < Duration::from_secs(5), "staller {i} still connected after {elapsed:?}");
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "staller {i} got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(up.hits(), 5);
    gw.shutdown().await;
}

#[tokio::test]
async fn oversized_request_header_is_431() {
    let up = ok_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let big = format!("GET /big HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(64 * 1024));
    let raw = Raw::parse(&raw_exchange(addr(&gw), big.as_bytes()).await);
    assert_eq!(raw.status, 431);
    assert_eq!(up.hits(), 0);
    // Well under the 16 KiB default limit is fine.
    let fine = "b".repeat(10 * 1024);
    let r = get(&gw.url("/fine"), &[("x-fine", &fine)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().headers["x-fine"], fine.as_str());
    gw.shutdown().await;
}

// === HTTP/2 and TLS ===

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let up = trailers_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let client = Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let req = Request::get(gw.url("/h2?q=1")).header("te", "trailers").body(Full::new(Bytes::new())).unwrap();
    let res = tokio::time::timeout(T, client.request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), Version::HTTP_2);
    assert!(res.headers().get("x-request-id").is_some());
    let collected = tokio::time::timeout(T, res.into_body().collect()).await.unwrap().unwrap();
    let trailers = collected.trailers().cloned().expect("trailers over h2");
    // The upstream is spoken to in HTTP/1.1 whatever the client used.
    assert_eq!(collected.to_bytes(), "HTTP/1.1 http;part2");
    assert_eq!(trailers["grpc-status"], "0");
    let seen = up.last();
    assert_eq!(seen.uri, "/h2?q=1");
    assert_eq!(seen.headers["x-forwarded-host"], addr(&gw).to_string().as_str());
    gw.shutdown().await;
}

/// A self-signed certificate for `localhost` and 127.0.0.1, made by `openssl req`.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cnf = dir.join("openssl.cnf");
    std::fs::write(
        &cnf,
        "[req]\ndistinguished_name = dn\nx509_extensions = v3\nprompt = no\n[dn]\nCN = localhost\n\
[v3]\nbasicConstraints = critical, CA:FALSE\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n\
keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .arg("-config")
        .arg(&cnf)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the TLS test needs the `openssl` command to make a certificate");
    assert!(out.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

async fn tls_connect(
    addr: SocketAddr,
    cert: &std::path::Path,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let pem = std::fs::read(cert).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(T, connector.connect(name, tcp)).await.unwrap().expect("TLS handshake")
}

#[tokio::test]
async fn tls_serves_h2_and_http11_by_alpn() {
    let up = trailers_upstream().await;
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path());
    let gw = gateway_edit(&free_all(&up.url()), |t| {
        t.replacen(
            "[server]\n",
            &format!("[server]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n", cert.display(), key.display()),
            1,
        )
    })
    .await;
    let a = addr(&gw);

    // h2 by ALPN
    let tls = tls_connect(a, &cert, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{}/tls/h2", a.port())).body(Full::new(Bytes::new())).unwrap();
    let res = tokio::time::timeout(T, send.send_request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), Version::HTTP_2);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "HTTP/1.1 https;part2");
    assert_eq!(up.last().headers["x-forwarded-proto"], "https");
    assert_eq!(up.last().headers["x-forwarded-host"], format!("localhost:{}", a.port()).as_str());

    // http/1.1 by ALPN, and with no ALPN at all
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let tls = tls_connect(a, &cert, alpn).await;
        let expected = if alpn.is_empty() { None } else { Some(&b"http/1.1"[..]) };
        assert_eq!(tls.get_ref().1.alpn_protocol(), expected);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let req = Request::get("/tls/h1").header("host", "localhost").body(Full::new(Bytes::new())).unwrap();
        let res = tokio::time::timeout(T, send.send_request(req)).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.version(), Version::HTTP_11);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "HTTP/1.1 https;part2");
        assert_eq!(up.last().headers["x-forwarded-proto"], "https");
    }

    // Plain HTTP on the TLS port is refused, and the listener keeps serving.
    let raw = raw_exchange(a, b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert!(!raw.starts_with(b"HTTP/1.1 200"));
    assert_eq!(up.hits(), 3);
    gw.shutdown().await;
}

// === malformed input ===

static WORKER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on runtime worker threads (where the gateway's connection tasks run
/// in a multi-threaded test), while keeping the default report.
fn count_worker_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("tokio-runtime-worker") {
                WORKER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_never_panics_and_the_gateway_keeps_serving() {
    count_worker_panics();
    let up = ok_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;
    let absurd_uri = format!("GET /{} HTTP/1.1\r\nHost: gw\r\n\r\n", "a/".repeat(40_000));
    let inputs: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\x03garbage\xff\xfe\r\n\r\n".to_vec(),
        b"G(T / HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
        b"GET /\xff\xfe%%% HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
        absurd_uri.into_bytes(),
        b"GET http://[::1 HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Nul: a\x00b\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
        b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\nHost: gw\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n".to_vec(),
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nConnection: close\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        // A SETTINGS frame whose length is not a multiple of 6: FRAME_SIZE_ERROR.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x05\x04\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00".to_vec(),
    ];
    for input in &inputs {
        let hits_before = up.hits();
        let got = raw_exchange(addr(&gw), input).await;
        let shown = String::from_utf8_lossy(&input[..input.len().min(60)]).into_owned();
        if got.starts_with(b"HTTP/1.1 ") {
            let status = Raw::parse(&got).status;
            assert!((400..500).contains(&status), "{shown:?} got {status}");
        } else if !got.is_empty() && !input.starts_with(b"PRI") {
            panic!("{shown:?} got {:?}", String::from_utf8_lossy(&got));
        }
        // A head that parsed may already be upstream when its chunked body turns out bad.
        if !input.ends_with(b"0\r\n\r\n") {
            assert_eq!(up.hits(), hits_before, "{shown:?} reached the upstream");
        }
        let r = get(&gw.url("/still-ok"), &[]).await;
        assert_eq!(r.status, 200, "after {shown:?}");
    }
    assert_eq!(WORKER_PANICS.load(Ordering::SeqCst), 0, "a gateway task panicked");
    gw.shutdown().await;
}

// === request id ===

#[tokio::test]
async fn request_id_is_kept_when_sane_and_replaced_when_not() {
    let up = ok_upstream().await;
    let gw = gateway(&free_all(&up.url())).await;

    let r = get(&gw.url("/id"), &[("x-request-id", "abc-123_x.y:z")]).await;
    assert_eq!(r.header("x-request-id"), Some("abc-123_x.y:z"));
    assert_eq!(up.last().headers["x-request-id"], "abc-123_x.y:z");

    for bad in ["has space", "semi;colon", &"a".repeat(129)] {
        let r = get(&gw.url("/id"), &[("x-request-id", bad)]).await;
        let id = r.header("x-request-id").unwrap().to_owned();
        assert_ne!(id, bad);
        assert_eq!(id.len(), 26, "a ULID: {id}");
        assert_eq!(up.last().headers["x-request-id"], id.as_str());
    }

    let r = get(&gw.url("/id"), &[]).await;
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(id.len(), 26);
    assert_eq!(up.last().headers["x-request-id"], id.as_str());
    gw.shutdown().await;
}

// === routing ===

#[tokio::test]
async fn unrouted_request_is_404_problem_with_request_id() {
    let up = ok_upstream().await;
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{}\"\n\n[[route]]\nname = \"docs\"\nupstream = \"api\"\npath = \"/docs/*\"\nfree = true\n",
        up.url()
    ))
    .await;
    let r = get(&gw.url("/nowhere?x=1"), &[("x-request-id", "trace-404")]).await;
    assert_problem(&r, 404, "route_not_found");
    assert_eq!(r.header("x-request-id"), Some("trace-404"));
    assert_eq!(r.json()["instance"], "/nowhere");
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn routes_match_on_host_and_method() {
    let a = ok_upstream().await;
    let b = ok_upstream().await;
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"a\"\nurl = \"{}\"\n\n[[upstream]]\nname = \"b\"\nurl = \"{}\"\n\n\
[[route]]\nname = \"a-host\"\nupstream = \"a\"\nhost = \"a.test\"\npath = \"/*\"\nfree = true\n\n\
[[route]]\nname = \"b-get\"\nupstream = \"b\"\npath = \"/read/*\"\nmethods = [\"GET\", \"HEAD\"]\nfree = true\n",
        a.url(),
        b.url()
    ))
    .await;
    for host in ["a.test", "A.Test:8080"] {
        let r = get(&gw.url("/read/x"), &[("host", host)]).await;
        assert_eq!(r.status, 200, "{host}");
    }
    assert_eq!((a.hits(), b.hits()), (2, 0));
    assert_eq!(get(&gw.url("/read/x"), &[("host", "b.test")]).await.status, 200);
    assert_eq!((a.hits(), b.hits()), (2, 1));
    assert_eq!(get(&gw.url("/other"), &[("host", "b.test")]).await.status, 404);
    let r = send("POST", &gw.url("/read/x"), &[("host", "b.test")], "x").await;
    assert_problem(&r, 404, "route_not_found");
    assert_eq!((a.hits(), b.hits()), (2, 1));
    gw.shutdown().await;
}

#[tokio::test]
async fn encoded_or_dotted_paths_cannot_dodge_a_priced_route() {
    let up = ok_upstream().await;
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{}\"\n\n\
[[route]]\nname = \"chat\"\nupstream = \"api\"\npath = \"/v1/chat/*\"\nprice = \"0.002\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"free\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n",
        up.url()
    ))
    .await;
    for path in [
        "/v1/chat/completions",
        "/v1/%63hat/completions",
        "/v1/%63%68%61%74",
        "/docs/../v1/chat/completions",
        "/docs/%2e%2e/v1/chat/x",
        "/v1//chat/x",
        "/v1/./chat/x",
    ] {
        let r = get(&gw.url(path), &[]).await;
        assert_eq!(r.status, 402, "{path} reached the free route");
        assert_eq!(r.json()["reason"], "payment_missing", "{path}");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(get(&gw.url("/v1/chatty"), &[]).await.status, 200);
    gw.shutdown().await;
}
