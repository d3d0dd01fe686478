//! `tollgate demo`: a sample upstream behind the gateway, a temporary ledger and one
//! funded key, with copy-paste curl lines.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::money::Micros;
use crate::Body;

/// The demo's price per request, and the key is funded for exactly one request.
const DEMO_PRICE: &str = "0.002";

/// Starts a tiny JSON API on `127.0.0.1:0`; returns its address.
pub(crate) async fn sample_upstream() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc =
                    service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(sample_response(&req)) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn sample_response(req: &Request<Incoming>) -> Response<Body> {
    let payer = req.headers().get("x-tollgate-payer").and_then(|v| v.to_str().ok()).unwrap_or("");
    let body = if req.uri().path().starts_with("/docs") {
        serde_json::json!({"docs": "GET /v1/quote returns a quote; it costs 0.002 USD per request."})
    } else {
        serde_json::json!({"symbol": "TOLL", "price": "42.00", "path": req.uri().path(), "paid_by": payer})
    };
    let mut res = Response::new(crate::full(body.to_string()));
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    *res.status_mut() = StatusCode::OK;
    res
}

pub(crate) fn demo_config(listen: &str, admin_listen: &str, upstream: SocketAddr, ledger: &std::path::Path) -> String {
    format!(
        r#"[server]
listen = "{listen}"
public_url = "http://{listen}"

[admin]
listen = "{admin_listen}"
token = "demo-admin-token-0123456789"

[ledger]
backend = "sqlite"
path = "{ledger}"

[[upstream]]
name = "sample"
url = "http://{upstream}"
timeout = "10s"

[[route]]
name = "docs"
upstream = "sample"
path = "/docs/*"
free = true

[[route]]
name = "quote"
upstream = "sample"
path = "/v1/quote"
methods = ["GET"]
price = "{DEMO_PRICE}"
accept = ["credits"]
description = "A stock quote"

[credits]
topup_url = "http://{listen}/docs/topup"
"#,
        ledger = ledger.display()
    )
}

pub(crate) async fn run(listen: &str, admin_listen: &str) -> ExitCode {
    match run_inner(listen, admin_listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run_inner(listen: &str, admin_listen: &str) -> Result<(), String> {
    let signals = crate::app::Signals::install().map_err(|e| format!("signal handlers: {e}"))?;
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let upstream = sample_upstream().await.map_err(|e| format!("sample upstream: {e}"))?;
    let text = demo_config(listen, admin_listen, upstream, &dir.join("demo.db"));
    let cfg_path = dir.join("tollgate.toml");
    std::fs::write(&cfg_path, &text).map_err(|e| e.to_string())?;
    let cfg = Config::parse(&text, |_| None).map_err(|e| e.to_string())?;
    let ledger = crate::app::open_ledger(&cfg).await?;
    let price = Micros::parse(DEMO_PRICE).map_err(|e| e.to_string())?;
    let key = ledger.create_key(Some("demo"), price).await.map_err(|e| e.to_string())?;
    let running = crate::app::start(cfg, Some(cfg_path.clone()), ledger, crate::app::default_rails())
        .await
        .map_err(|e| e.to_string())?;
    let (a, m) = (running.addr, running.admin_addr);
    println!(
        r#"
tollgate demo is running: a sample API at http://{upstream} behind the gateway at http://{a}
Ledger: {db} (temporary). Config: {cfg}
Route "quote" (GET /v1/quote) costs {DEMO_PRICE} USD; route "docs" (/docs/*) is free.
A key was funded for exactly one request: {id}

1. No payment: 402 payment_missing
   curl -i http://{a}/v1/quote

2. Paid: 200 with X-Tollgate-Charged and X-Tollgate-Balance
   curl -i -H 'Authorization: Bearer {key}' http://{a}/v1/quote

3. The same again: the key ran dry, 402 insufficient_funds
   curl -i -H 'Authorization: Bearer {key}' http://{a}/v1/quote

   A browser gets a readable page:  curl -H 'Accept: text/html' http://{a}/v1/quote
   Free route:                      curl -i http://{a}/docs/
   Top the key up (admin API):      curl -s -H 'Authorization: Bearer demo-admin-token-0123456789' \
                                         -d '{{"amount":"0.01","idempotency_key":"topup-1"}}' http://{m}/admin/keys/{id}/credit
   Its transactions:                curl -s -H 'Authorization: Bearer demo-admin-token-0123456789' 'http://{m}/admin/transactions?key={id}'
   Metrics:                         curl -s http://{m}/metrics

Press Ctrl-C to stop.
"#,
        db = dir.join("demo.db").display(),
        cfg = cfg_path.display(),
        id = key.id,
        key = key.key,
    );
    crate::app::run_until_signalled(running, signals).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
