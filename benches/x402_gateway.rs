//! The gateway's own time on an x402 request, the facilitator's excluded.
//!
//! In-process: an upstream and a facilitator that answer at once (hyper on
//! 127.0.0.1:0), tollgate with one x402 route, and a client sending pre-signed v2
//! payments one at a time. For each request it also times, from the same client, one
//! `/verify`, one `/settle` and one upstream call made directly; the gateway's own time
//! is the paid request's latency minus those three round trips. Prints the median and
//! p99 of that difference.
//!
//! `cargo bench --bench x402_gateway`

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy_primitives::{B256, U256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tollgate::payment::rails::x402::verify::{self as v, TransferWithAuthorization};

const DEV_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
const REQUESTS: usize = 2000;

async fn serve(answer: fn(&str) -> String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer(&path)))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    addr
}

fn facilitator_answer(path: &str) -> String {
    let payer = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
    match path {
        "/verify" => json!({"isValid": true, "payer": payer}),
        _ => json!({"success": true, "payer": payer, "transaction": format!("0x{}", "ab".repeat(32)), "network": "eip155:84532"}),
    }
    .to_string()
}

fn payment(signer: &PrivateKeySigner) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let nonce = B256::from(rand::random::<[u8; 32]>());
    let t = TransferWithAuthorization {
        from: signer.address(),
        to: v::address(PAY_TO).unwrap(),
        value: U256::from(10_000u64),
        validAfter: U256::ZERO,
        validBefore: U256::from(now + 3600),
        nonce,
    };
    let hash = v::signing_hash(&v::domain("USDC", "2", 84532, v::address(USDC).unwrap()), &t);
    let sig = format!("0x{}", hex::encode(signer.sign_hash_sync(&hash).unwrap().as_bytes()));
    let body = json!({
        "x402Version": 2,
        "resource": {"url": "http://bench/paid/x", "description": "", "mimeType": "application/json"},
        "accepted": {"scheme": "exact", "network": "eip155:84532", "amount": "10000", "asset": USDC,
                     "payTo": PAY_TO, "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}},
        "payload": {"signature": sig, "authorization": {
            "from": signer.address().to_checksum(None), "to": PAY_TO, "value": "10000",
            "validAfter": "0", "validBefore": (now + 3600).to_string(), "nonce": format!("{nonce:#x}")}},
        "extensions": {}
    });
    STANDARD.encode(body.to_string())
}

async fn timed(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (Duration, u16) {
    let t = Instant::now();
    let res = client.request(req).await.unwrap();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await.unwrap();
    (t.elapsed(), status)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let upstream = serve(|_| "ok".to_owned()).await;
        let facilitator = serve(facilitator_answer).await;
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\npath = \"{db}\"\n[log]\nfilter = \"warn\"\n\
[[upstream]]\nname = \"api\"\nurl = \"http://{upstream}\"\n\
[[route]]\nname = \"paid\"\nupstream = \"api\"\npath = \"/paid/*\"\nprice = \"0.01\"\naccept = [\"x402\"]\n\
[x402]\nfacilitator = \"http://{facilitator}\"\nnetwork = \"eip155:84532\"\nasset = \"{USDC}\"\npay_to = \"{PAY_TO}\"\n",
            db = dir.path().join("l.db").display()
        );
        let cfg = tollgate::config::Config::parse(&text, |_| None).unwrap();
        let ledger = tollgate::app::open_ledger(&cfg).await.unwrap();
        let running = tollgate::app::start(cfg, None, ledger, tollgate::app::default_rails()).await.unwrap();
        let signer: PrivateKeySigner = DEV_KEY.parse().unwrap();
        let payments: Vec<String> = (0..REQUESTS + 100).map(|_| payment(&signer)).collect();
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let get = |url: String, pay: Option<&str>| {
            let mut b = Request::get(url);
            if let Some(p) = pay {
                b = b.header("payment-signature", p);
            }
            b.body(Full::new(Bytes::new())).unwrap()
        };
        let post = |url: String| Request::post(url).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
        let mut own = Vec::with_capacity(REQUESTS);
        for (i, p) in payments.iter().enumerate() {
            let (total, status) = timed(&client, get(format!("http://{}/paid/x", running.addr), Some(p))).await;
            assert_eq!(status, 200, "paid request refused");
            let (verify, _) = timed(&client, post(format!("http://{facilitator}/verify"))).await;
            let (settle, _) = timed(&client, post(format!("http://{facilitator}/settle"))).await;
            let (up, _) = timed(&client, get(format!("http://{upstream}/x"), None)).await;
            if i >= 100 {
                // The first 100 warm the pools and caches.
                own.push(total.saturating_sub(verify + settle + up));
            }
        }
        own.sort();
        let at = |q: f64| own[((own.len() as f64 * q) as usize).min(own.len() - 1)].as_micros();
        println!(
            "x402_gateway_own_time: {REQUESTS} sequential v2 payments; gateway's own time p50 {} µs, p90 {} µs, p99 {} µs",
            at(0.5),
            at(0.9),
            at(0.99)
        );
        running.shutdown().await;
    });
}
