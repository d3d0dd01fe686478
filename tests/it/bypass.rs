//! The request the upstream receives is the request tollgate priced, and nothing else
//! rides along. Each test attacks one class of bypass with many variants, through raw
//! sockets where a well-behaved client would tidy the request up, in front of a real
//! upstream that records exactly what reached it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate::ledger::TxKind;

const T: Duration = Duration::from_secs(10);

/// Priced `/paid/*`, `/paid-exact` and POST-only `/paid-post`, a free `/free/*`, and a
/// free catch-all after them: the shape in which a routing differential is a bypass.
fn table(up: &Upstream, extra_route: &str) -> String {
    format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{}\"\ntimeout = \"5s\"\n\n\
[[route]]\nname = \"paid\"\nupstream = \"api\"\npath = \"/paid/*\"\nprice = \"0.01\"\naccept = [\"credits\"]\n{extra_route}\n\n\
[[route]]\nname = \"paid-exact\"\nupstream = \"api\"\npath = \"/paid-exact\"\nprice = \"0.01\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"paid-post\"\nupstream = \"api\"\npath = \"/paid-post\"\nmethods = [\"POST\"]\nprice = \"0.01\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"paid-get\"\nupstream = \"api\"\npath = \"/paid-get\"\nmethods = [\"GET\"]\nprice = \"0.01\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"paid-host\"\nupstream = \"api\"\nhost = \"paid.local\"\npath = \"/*\"\nprice = \"0.01\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"free\"\nupstream = \"api\"\npath = \"/free/*\"\nfree = true\n\n\
[[route]]\nname = \"rest\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n",
        up.url()
    )
}

fn addr(gw: &Gateway) -> SocketAddr {
    gw.base.trim_start_matches("http://").parse().unwrap()
}

/// Sends a request line and header lines (`Connection: close` added) on a new
/// connection and returns the status code of the answer's head.
async fn raw_status(addr: SocketAddr, request_line: &[u8], headers: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = request_line.to_vec();
    req.extend_from_slice(format!("\r\n{headers}Connection: close\r\n\r\n").as_bytes());
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    // The head is enough (a switched connection stays open).
    while find(&out, b"\r\n\r\n").is_none() {
        match tokio::time::timeout(T, s.read(&mut buf)).await.expect("answer within 10s") {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let head = &out[..find(&out, b"\r\n").unwrap_or_else(|| panic!("no answer: {:?}", String::from_utf8_lossy(&out)))];
    std::str::from_utf8(head).unwrap().split(' ').nth(1).unwrap().parse().unwrap()
}

/// How origin frameworks read a path they were given, for the "what did the
/// upstream serve" side of each check: decode once (WSGI/ASGI, `%2F` included),
/// strip `;parameters` (Tomcat, Jetty), `\` as `/` (IIS), dot segments resolved,
/// case and trailing slash ignored (Express defaults).
fn origin_readings(path: &str) -> Vec<String> {
    let decoded = percent_decode(path);
    let mut out = vec![path.to_owned(), decoded.clone()];
    let no_params: String = decoded.split('/').map(|s| s.split(';').next().unwrap()).collect::<Vec<_>>().join("/");
    out.push(no_params.clone());
    out.push(decoded.replace('\\', "/"));
    for p in out.clone() {
        out.push(resolve_dots(&p));
        out.push(resolve_dots(&p).to_ascii_lowercase().trim_end_matches('/').to_owned());
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn resolve_dots(p: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    for s in p.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    format!("/{}", segs.join("/"))
}

fn reads_as_paid(path: &str) -> bool {
    origin_readings(path).iter().any(|p| {
        let p = p.to_ascii_lowercase();
        p == "/paid" || p.starts_with("/paid/") || p == "/paid-exact" || p == "/paid-exact/"
    })
}

#[tokio::test]
async fn path_variants_are_priced_refused_or_forwarded_as_routed() {
    let up = ok_upstream().await;
    let gw = gateway(&table(&up, "")).await;
    let a = addr(&gw);
    // (request target, what must happen: 402 priced, 400 refused, or the path the
    // upstream must receive for a free request).
    let cases: &[(&[u8], Result<u16, &str>)] = &[
        (b"/paid/x", Ok(402)),
        (b"/paid/../free/echo", Err("/free/echo")),
        (b"/paid/%2e%2e/free/echo", Err("/free/echo")),
        (b"/free/../paid/x", Ok(402)),
        (b"/free/%2E%2E/paid/x", Ok(402)),
        (b"/free/./../paid/x", Ok(402)),
        (b"//paid//x", Ok(402)),
        (b"/%70aid/x", Ok(402)),
        (b"/PAID/x", Ok(402)),
        (b"/Paid/X", Ok(402)),
        (b"/paid-exact/", Ok(402)),
        (b"/PAID-EXACT", Ok(402)),
        (b"/paid;jsessionid=1/x", Ok(402)),
        (b"/paid;/x", Ok(402)),
        (b"/paid%3bx/y", Ok(402)),
        (b"/paid%2Fx", Ok(402)),
        (b"/paid%2fx", Ok(402)),
        (b"/paid%252Fx", Ok(402)),
        (b"/free/..;/paid/x", Ok(400)),
        (b"/free/..;x=1/paid/x", Ok(400)),
        (b"/free/%2e%2e;/paid/x", Ok(400)),
        (b"/free/..%2Fpaid/x", Ok(400)),
        (b"/free/..%2fpaid/x", Ok(400)),
        (b"/free/%252e%252e/paid/x", Ok(400)),
        (b"/free/%5C..%5Cpaid/x", Ok(400)),
        (b"/free/..%5cpaid", Ok(400)),
        (b"/free/%00/x", Ok(400)),
        (b"/free\\..\\paid\\x", Ok(400)),
        (b"/free/%e2%82%ac/x", Err("/free/%E2%82%AC/x")),
        (b"/free/a%20b", Err("/free/a%20b")),
        (b"/free/%7Euser", Err("/free/~user")),
        (b"/free//a/./b/", Err("/free/a/b/")),
        (b"/free/%\xc3\xa9", Err("/free/%é")),
        (b"/free/x;v=1", Err("/free/x;v=1")),
    ];
    for (target, want) in cases {
        let before = up.hits();
        let line = [b"GET ".as_slice(), target, b" HTTP/1.1".as_slice()].concat();
        let status = raw_status(a, &line, "Host: api.test\r\n").await;
        let shown = String::from_utf8_lossy(target);
        match want {
            Ok(code) => {
                // hyper itself refuses a raw backslash with 400 before tollgate sees it.
                assert_eq!(status, *code, "{shown}");
                assert_eq!(up.hits(), before, "{shown} reached the upstream unpaid");
            }
            Err(path) => {
                assert_eq!(status, 200, "{shown}");
                let seen = up.last().uri;
                assert_eq!(seen, *path, "{shown}");
                assert!(!reads_as_paid(&seen), "{shown} reached the upstream as {seen}, which origins read as priced");
            }
        }
    }
    gw.shutdown().await;
}

/// A property over generated paths: whatever a request is made of, either it was
/// priced or refused, or what the upstream received reads as no priced path to any
/// origin model above.
#[tokio::test]
async fn no_generated_path_reaches_a_priced_path_unpaid() {
    const PIECES: &[&str] = &[
        "paid",
        "PAID",
        "Paid",
        "free",
        "paid-exact",
        "x",
        ".",
        "..",
        "%2e",
        "%2E%2e",
        "%2f",
        "%2F",
        "%5c",
        ";",
        ";a=1",
        "..;",
        "%25",
        "%252e",
        "%3b",
        "/",
        "//",
        "%70",
        "a%20b",
        "%",
        "é",
    ];
    let up = ok_upstream().await;
    let gw = gateway(&table(&up, "")).await;
    let a = addr(&gw);
    // A fixed-seed generator keeps the run reproducible and bounded.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut forwarded = 0;
    for _ in 0..400 {
        let n = 1 + (next() % 6) as usize;
        let mut path = String::new();
        for _ in 0..n {
            if next() % 2 == 0 {
                path.push('/');
            }
            path.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
        }
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        let before = up.hits();
        let line = format!("GET {path} HTTP/1.1");
        let status = raw_status(a, line.as_bytes(), "Host: api.test\r\n").await;
        if up.hits() > before {
            forwarded += 1;
            let seen = up.last().uri;
            assert!(matches!(status, 200), "{path}");
            assert!(!reads_as_paid(&seen), "{path} reached the upstream unpaid as {seen}");
        } else {
            assert!(matches!(status, 400 | 402 | 404), "{path}: {status}");
        }
    }
    assert!(forwarded > 50, "the generator should also produce free paths ({forwarded})");
    gw.shutdown().await;
}

#[tokio::test]
async fn method_spellings_and_overrides_cannot_dodge_a_priced_method() {
    let up = ok_upstream().await;
    let gw = gateway(&table(&up, "")).await;
    let a = addr(&gw);
    for m in ["POST", "post", "Post", "pOST"] {
        let status =
            raw_status(a, format!("{m} /paid-post HTTP/1.1").as_bytes(), "Host: a\r\nContent-Length: 0\r\n").await;
        assert_eq!(status, 402, "{m}");
    }
    // HEAD runs the GET handler at the origin.
    for m in ["HEAD", "head"] {
        let status = raw_status(a, format!("{m} /paid-get HTTP/1.1").as_bytes(), "Host: a\r\n").await;
        assert_eq!(status, 402, "{m}");
    }
    assert_eq!(up.hits(), 0);

    // A free request carries no override the origin could act on.
    let overrides = [
        "X-HTTP-Method-Override: POST",
        "X-HTTP-Method: POST",
        "X-Method-Override: POST",
        "X-Original-Method: POST",
        "X-Original-URL: /paid/x",
        "X-Rewrite-URL: /paid/x",
    ];
    let headers: String = overrides.iter().map(|h| format!("{h}\r\n")).collect();
    let status = raw_status(a, b"get /paid-post HTTP/1.1", &format!("Host: a\r\n{headers}")).await;
    assert_eq!(status, 200);
    let seen = up.last();
    assert_eq!(seen.method, http::Method::GET, "the method is forwarded in its canonical spelling");
    for h in overrides {
        let name = h.split(':').next().unwrap();
        assert!(seen.headers.get(name).is_none(), "{name} reached the upstream");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn host_spellings_cannot_dodge_a_host_route() {
    let up = ok_upstream().await;
    let gw = gateway(&table(&up, "")).await;
    let a = addr(&gw);
    for host in ["paid.local", "PAID.local", "paid.local.", "Paid.Local.:8080", "paid.local:80", "paid.local.."] {
        let status = raw_status(a, b"GET /anything HTTP/1.1", &format!("Host: {host}\r\n")).await;
        assert_eq!(status, 402, "{host}");
        let status = raw_status(a, format!("GET http://{host}/anything HTTP/1.1").as_bytes(), "Host: other\r\n").await;
        assert_eq!(status, 402, "absolute-form {host}");
    }
    assert_eq!(up.hits(), 0);
    assert_eq!(raw_status(a, b"GET /anything HTTP/1.1", "Host: paid.local.evil\r\n").await, 200);
    gw.shutdown().await;
}

/// An origin that accepts any upgrade it is offered (h2c included): it answers 101 and
/// then echoes whatever bytes come through the tunnel.
async fn upgrading_origin() -> (String, Arc<Mutex<Vec<String>>>) {
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
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                h.lock().unwrap().push(head.clone());
                let proto = head
                    .lines()
                    .find_map(|l| l.strip_prefix("upgrade:"))
                    .map(|p| p.trim().to_owned())
                    .unwrap_or_else(|| "h2c".to_owned());
                let res =
                    format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n");
                let _ = s.write_all(res.as_bytes()).await;
                let mut echo = [0u8; 1024];
                while let Ok(n) = s.read(&mut echo).await {
                    if n == 0 || s.write_all(&echo[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, heads)
}

#[tokio::test]
async fn h2c_upgrades_are_never_forwarded_and_upgrades_follow_the_route() {
    let (url, heads) = upgrading_origin().await;
    let cfg = format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n\
[[route]]\nname = \"ws-off\"\nupstream = \"api\"\npath = \"/nows/*\"\nfree = true\nupgrades = []\n\n\
[[route]]\nname = \"free\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n"
    );
    let gw = gateway(&cfg).await;
    let a = addr(&gw);
    let h2c = [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "Connection: upgrade\r\nUpgrade: H2C\r\n",
        "Connection: Upgrade\r\nUpgrade: websocket, h2c\r\n",
        "Connection: keep-alive, Upgrade\r\nUpgrade: h2c/1\r\n",
    ];
    for headers in h2c {
        let status = raw_status(a, b"GET /free/x HTTP/1.1", &format!("Host: a\r\n{headers}")).await;
        assert_ne!(status, 101, "{headers}");
        let head = heads.lock().unwrap().last().cloned().unwrap();
        assert!(!head.contains("upgrade:"), "an h2c upgrade reached the origin: {head}");
        assert!(!head.contains("http2-settings"), "{head}");
    }
    // The origin still switched (it answers 101 to anything): tollgate does not follow.
    let n = heads.lock().unwrap().len();
    assert_eq!(n, h2c.len());

    // WebSocket is allowed by default, and off where the route says so.
    let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_eq!(raw_status(a, b"GET /chat HTTP/1.1", &format!("Host: a\r\n{ws}")).await, 101);
    assert!(heads.lock().unwrap().last().unwrap().contains("upgrade: websocket"));
    assert_ne!(raw_status(a, b"GET /nows/chat HTTP/1.1", &format!("Host: a\r\n{ws}")).await, 101);
    assert!(!heads.lock().unwrap().last().unwrap().contains("upgrade:"));
    gw.shutdown().await;
}

#[tokio::test]
async fn an_origin_switching_to_an_unasked_protocol_is_not_followed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    .await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n[[route]]\nname = \"free\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n"
    ))
    .await;
    let a = addr(&gw);
    let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_eq!(raw_status(a, b"GET /x HTTP/1.1", &format!("Host: a\r\n{ws}")).await, 502);
    assert_eq!(raw_status(a, b"GET /x HTTP/1.1", "Host: a\r\n").await, 502);
    gw.shutdown().await;
}

#[tokio::test]
async fn h2c_in_the_upgrades_list_is_a_config_error() {
    let text = format!(
        "{}[[upstream]]\nname = \"api\"\nurl = \"http://127.0.0.1:9\"\n\n[[route]]\nname = \"r\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\nupgrades = [\"websocket\", \"h2c\"]\n",
        base_config().replace("{db}", "/tmp/never-opened.db")
    );
    let err = tollgate::config::Config::parse(&text, |_| None).unwrap_err().0.join("\n");
    assert!(err.contains("route[0].upgrades[1]") && err.contains("h2c"), "{err}");
}

#[tokio::test]
async fn tollgate_keys_never_reach_the_upstream_of_a_free_route() {
    let up = ok_upstream().await;
    let gw = gateway(&table(&up, "")).await;
    let (_, key) = gw.key("1.00").await;
    let bearer = format!("Bearer {key}");
    let lower = format!("bearer   {key}");
    for (name, value) in [
        ("authorization", bearer.as_str()),
        ("authorization", lower.as_str()),
        ("x-api-key", key.as_str()),
        ("x-api-key", "TG_LIVE_not-even-a-valid-key"),
    ] {
        let r = get(&gw.url("/free/x"), &[(name, value)]).await;
        assert_eq!(r.status, 200);
        assert!(up.last().headers.get(name).is_none(), "{name}: {value} reached a free route's upstream");
    }
    // The upstream's own credential on a free route is its business.
    let r = get(&gw.url("/free/x"), &[("authorization", "Bearer upstream-token"), ("x-api-key", "upstream-key")]).await;
    assert_eq!(r.status, 200);
    let seen = up.last().headers;
    assert_eq!(seen["authorization"], "Bearer upstream-token");
    assert_eq!(seen["x-api-key"], "upstream-key");
    // The key was not charged for free requests.
    gw.shutdown().await;
}

#[tokio::test]
async fn per_key_limits_count_the_payer_however_the_key_is_spelled() {
    let up = ok_upstream().await;
    let gw = gateway(&table(&up, "rate_limit = { per_key = \"3/hour\" }")).await;
    let (id, key) = gw.key("1.00").await;
    let spellings = [
        ("authorization", format!("Bearer {key}")),
        ("authorization", format!("bearer   {key}  ")),
        ("x-api-key", key.clone()),
    ];
    for (name, value) in &spellings {
        let r = get(&gw.url("/paid/x"), &[(name, value)]).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    for (name, value) in &spellings {
        let r = get(&gw.url("/paid/x"), &[(name, value)]).await;
        assert_eq!(r.status, 429, "{name}: a new spelling bought a fresh bucket");
        assert!(r.header("retry-after").is_some());
    }
    // A limited request is refused before the ledger: nothing held, nothing written.
    assert_eq!(gw.balance(&id).await.get(), 1_000_000 - 3 * 10_000);
    let tx = gw.ledger.transactions(Some(&id), 100).await.unwrap();
    assert_eq!(tx.iter().filter(|t| t.kind == TxKind::Debit).count(), 3, "{tx:?}");
    assert_eq!(tx.iter().filter(|t| t.kind == TxKind::Refund).count(), 0, "{tx:?}");

    // Another payer has its own bucket; unknown keys are refused as such, never 429.
    let (_, other) = gw.key("1.00").await;
    let r = get(&gw.url("/paid/x"), &[("x-api-key", &other)]).await;
    assert_eq!(r.status, 200);
    for i in 0..10 {
        let fake = format!("tg_live_{:040x}", i);
        let r = get(&gw.url("/paid/x"), &[("x-api-key", &fake)]).await;
        assert_eq!(r.json()["reason"], "payment_invalid");
    }
    // A second credential header is ambiguous, not a second chance.
    let r = get(&gw.url("/paid/x"), &[("x-api-key", &other), ("x-api-key", "junk")]).await;
    assert_eq!(r.json()["reason"], "payment_malformed");
    gw.shutdown().await;
}

/// An upstream that answers only when told to (one answer per `release`).
async fn gated_upstream(status: u16) -> (Upstream, Arc<tokio::sync::Semaphore>, Arc<tokio::sync::Notify>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (g, n) = (gate.clone(), arrived.clone());
    let up = upstream(move |_req: Request<Incoming>| {
        let (g, n) = (g.clone(), n.clone());
        async move {
            n.notify_one();
            g.acquire().await.unwrap().forget();
            let mut res = Response::new(tollgate::full("done"));
            *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
            res
        }
    })
    .await;
    (up, gate, arrived)
}

async fn hang_up_before_the_head(charge_on: &str, status: u16) -> (i64, Vec<TxKind>) {
    let (up, gate, arrived) = gated_upstream(status).await;
    let gw = gateway(&table(&up, &format!("charge_on = \"{charge_on}\""))).await;
    let (id, key) = gw.key("1.00").await;
    let mut s = TcpStream::connect(addr(&gw)).await.unwrap();
    let req =
        format!("POST /paid/sms HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\nContent-Length: 2\r\n\r\nhi");
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::time::timeout(T, arrived.notified()).await.expect("the request reached the upstream");
    drop(s);
    // Let the gateway notice the hang-up before the upstream answers.
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    let mut kinds = Vec::new();
    for _ in 0..200 {
        let tx = gw.ledger.transactions(Some(&id), 100).await.unwrap();
        kinds = tx.iter().filter(|t| t.kind != TxKind::Credit).map(|t| t.kind).collect();
        let settled = tx.iter().any(|t| t.kind == TxKind::Refund)
            || tx.iter().any(|t| t.kind == TxKind::Debit && t.status.as_deref() == Some("captured"));
        if settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let balance = gw.balance(&id).await.get() as i64;
    gw.shutdown().await;
    (balance, kinds)
}

#[tokio::test]
async fn a_client_that_hangs_up_after_sending_pays_by_the_upstreams_answer() {
    // "always": the upstream ran the request, so it is paid for.
    let (balance, kinds) = hang_up_before_the_head("always", 503).await;
    assert_eq!(balance, 990_000, "{kinds:?}");
    // "success": the upstream's answer decides, as if the client had stayed.
    let (balance, kinds) = hang_up_before_the_head("success", 200).await;
    assert_eq!(balance, 990_000, "{kinds:?}");
    let (balance, kinds) = hang_up_before_the_head("success", 503).await;
    assert_eq!(balance, 1_000_000, "{kinds:?}");
    assert!(kinds.contains(&TxKind::Refund), "{kinds:?}");
}

// === real origin frameworks ===
//
// The same attacks in front of real Flask (Werkzeug, WSGI) and Starlette (uvicorn,
// ASGI) origins, whose handlers say which one ran: the paid handler must run only for
// a request tollgate charged. The frameworks are pinned in tests/interop/requirements.txt
// and installed by scripts/test.sh (which makes a missing install a failure).

/// Starts `script` (an origin in tests/interop/) on a free port; `None` if the Python
/// environment is not installed (skipped loudly unless TOLLGATE_INTEROP_REQUIRED=1).
async fn python_origin(script: &str) -> Option<(Proc, String)> {
    let dir = std::env::var_os("TOLLGATE_INTEROP_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop"));
    let venv = dir.join("venv");
    if !venv.join(".installed").exists() {
        let msg = format!("{script}: {} is not installed; run scripts/test.sh", venv.display());
        assert!(std::env::var_os("TOLLGATE_INTEROP_REQUIRED").is_none(), "{msg}");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
        return None;
    }
    let port = free_port();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
    let child = std::process::Command::new(venv.join("bin/python"))
        .arg(source)
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Some((proc, format!("http://127.0.0.1:{port}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{script} did not listen on port {port} within 10 s");
}

/// One request on a new connection, read to the end: (status, the whole answer).
async fn raw_request(addr: SocketAddr, request_line: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{request_line}\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("answer within 10s").unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

async fn attack_real_origin(script: &str) {
    let Some((_origin, url)) = python_origin(script).await else { return };
    let cfg = format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\ntimeout = \"5s\"\n\n\
[[route]]\nname = \"paid\"\nupstream = \"api\"\npath = \"/paid/*\"\nprice = \"0.01\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"paid-post\"\nupstream = \"api\"\npath = \"/paid-post\"\nmethods = [\"POST\"]\nprice = \"0.01\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"rest\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n"
    );
    let gw = gateway(&cfg).await;
    let a = addr(&gw);
    let (_, key) = gw.key("1.00").await;

    // The origin's handlers work: paid runs when paid, free when free.
    let (status, body) = raw_request(a, "GET /paid/x HTTP/1.1", &format!("Host: a\r\nX-API-Key: {key}\r\n")).await;
    assert_eq!(status, 200, "{script}: {body}");
    assert!(body.contains("\"handler\":\"paid\""), "{script}: {body}");
    let (status, body) = raw_request(a, "GET /free/x HTTP/1.1", "Host: a\r\n").await;
    assert_eq!(status, 200, "{script}: {body}");
    assert!(body.contains("\"handler\":\"free\""), "{script}: {body}");

    let attacks = [
        ("GET", "/paid/x"),
        ("GET", "/free/../paid/x"),
        ("GET", "/free/%2e%2e/paid/x"),
        ("GET", "/free/..%2Fpaid/x"),
        ("GET", "/paid%2Fx"),
        ("GET", "/paid%2fx"),
        ("GET", "/%70aid/x"),
        ("GET", "/PAID/x"),
        ("GET", "//paid/x"),
        ("GET", "/paid/./x"),
        ("GET", "/paid;x=1/y"),
        ("GET", "/free/..;/paid/x"),
        ("GET", "/free/%252e%252e/paid/x"),
        ("GET", "/free%5C..%5Cpaid/x"),
        ("HEAD", "/paid/x"),
        ("head", "/paid/x"),
        ("POST", "/paid-post"),
        ("post", "/paid-post"),
        ("Post", "/paid-post"),
        ("pOST", "/paid-post"),
        ("GET", "http://a/paid/x"),
    ];
    let overrides = "X-HTTP-Method-Override: POST\r\nX-HTTP-Method: POST\r\nX-Method-Override: POST\r\n\
X-Original-URL: /paid/x\r\nX-Rewrite-URL: /paid/x\r\n";
    for (method, target) in attacks {
        for extra in ["", overrides] {
            let line = format!("{method} {target} HTTP/1.1");
            let (status, body) = raw_request(a, &line, &format!("Host: a\r\nContent-Length: 0\r\n{extra}")).await;
            assert!(
                !body.contains("\"handler\":\"paid\"") && !body.to_ascii_lowercase().contains("x-handler: paid"),
                "{script}: {line} ran the paid handler unpaid ({status}): {body}"
            );
        }
    }
    // Overrides on a free request: the free handler runs, with the method sent.
    let (status, body) = raw_request(a, "GET /paid-post-not HTTP/1.1", &format!("Host: a\r\n{overrides}")).await;
    assert_eq!(status, 200, "{script}: {body}");
    assert!(body.contains("\"method\":\"GET\""), "{script}: {body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_real_flask_origin_never_runs_its_paid_handler_unpaid() {
    attack_real_origin("origin_flask.py").await;
}

#[tokio::test]
async fn a_real_starlette_origin_never_runs_its_paid_handler_unpaid() {
    attack_real_origin("origin_starlette.py").await;
}
