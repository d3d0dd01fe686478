//! The x402 rail end to end: a real gateway, a real upstream, a fake facilitator that
//! checks what tollgate sends, and payments signed here with the well-known dev key.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::facilitator::{closed_port_url, FakeFacilitator, Settle, Verify, TX_HASH};
use crate::support::*;
use alloy_primitives::{B256, U256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::Response;
use serde_json::{json, Value};
use tollgate::payment::rails::x402::verify::{self as v, TransferWithAuthorization};
use tollgate::payment::rails::x402::{check_supported, KindSupport, X402};
use tollgate::payment::{Rail, Rails};

const DEV_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const DEV_ADDR: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
/// Hardhat's second dev key: a different signer.
const OTHER_KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const USDC_SEPOLIA: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
const USDC_BASE: &str = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";
const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/x402-vectors.json");

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Upstream, one route `/paid/*` at 0.01 USD accepting x402, and `[x402]` pointing at
/// `facilitator`; `x402_extra` goes inside `[x402]`, `after` after it (offers).
fn config(up: &Upstream, facilitator: &str, x402_extra: &str, after: &str) -> String {
    format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{up}\"\n\n\
[[route]]\nname = \"paid\"\nupstream = \"api\"\npath = \"/paid/*\"\nprice = \"0.01\"\naccept = [\"x402\"]\n\n\
[x402]\nfacilitator = \"{facilitator}\"\nnetwork = \"eip155:84532\"\nasset = \"{USDC_SEPOLIA}\"\n\
pay_to = \"{PAY_TO}\"\nfacilitator_timeout = \"3s\"\n{x402_extra}\n{after}",
        up = up.url()
    )
}

/// The same config with a short facilitator timeout, for the tests of a hanging one
/// (the default is generous so that a loaded CI machine does not time out).
fn impatient(text: String) -> String {
    text.replace("facilitator_timeout = \"3s\"", "facilitator_timeout = \"300ms\"")
}

/// A payment under construction; `header()` signs and encodes it.
#[derive(Clone)]
struct Payment {
    version: u8,
    key: &'static str,
    scheme: String,
    network: String,
    accepted: Value,
    from: Option<String>,
    to: String,
    value: String,
    valid_after: String,
    valid_before: String,
    nonce: B256,
    /// EIP-712 domain the signature is made in: (name, version, chain id, token).
    domain: (&'static str, &'static str, u64, &'static str),
    /// Applied after signing: the signed message differs from the sent one.
    tamper_value: Option<String>,
    signature: Option<String>,
}

impl Payment {
    fn v1() -> Payment {
        Payment {
            version: 1,
            key: DEV_KEY,
            scheme: "exact".into(),
            network: "base-sepolia".into(),
            accepted: Value::Null,
            from: None,
            to: PAY_TO.into(),
            value: "10000".into(),
            valid_after: (now() - 600).to_string(),
            valid_before: (now() + 60).to_string(),
            nonce: B256::from(rand::random::<[u8; 32]>()),
            domain: ("USDC", "2", 84532, USDC_SEPOLIA),
            tamper_value: None,
            signature: None,
        }
    }

    /// As the v2 clients sign: `validAfter = "0"`, `accepted` copied from the challenge.
    fn v2() -> Payment {
        Payment {
            version: 2,
            valid_after: "0".into(),
            accepted: json!({
                "scheme": "exact", "network": "eip155:84532", "amount": "10000", "asset": USDC_SEPOLIA,
                "payTo": PAY_TO, "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}
            }),
            ..Payment::v1()
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Payment)) -> Payment {
        f(&mut self);
        self
    }

    fn json(&self) -> Value {
        let signer: PrivateKeySigner = self.key.parse().unwrap();
        let from = self.from.clone().unwrap_or_else(|| signer.address().to_checksum(None));
        let transfer = TransferWithAuthorization {
            from: v::address(&from).unwrap(),
            to: v::address(&self.to).unwrap(),
            value: U256::from_str_radix(&self.value, 10).unwrap(),
            validAfter: U256::from_str_radix(&self.valid_after, 10).unwrap(),
            validBefore: U256::from_str_radix(&self.valid_before, 10).unwrap(),
            nonce: self.nonce,
        };
        let (name, version, chain, token) = self.domain;
        let hash = v::signing_hash(&v::domain(name, version, chain, v::address(token).unwrap()), &transfer);
        let signature = self
            .signature
            .clone()
            .unwrap_or_else(|| format!("0x{}", hex::encode(signer.sign_hash_sync(&hash).unwrap().as_bytes())));
        let payload = json!({
            "signature": signature,
            "authorization": {
                "from": from, "to": self.to, "value": self.tamper_value.clone().unwrap_or(self.value.clone()),
                "validAfter": self.valid_after, "validBefore": self.valid_before, "nonce": format!("{:#x}", self.nonce)
            }
        });
        if self.version == 1 {
            json!({"x402Version": 1, "scheme": self.scheme, "network": self.network, "payload": payload})
        } else {
            let mut accepted = self.accepted.clone();
            accepted["scheme"] = json!(self.scheme);
            json!({
                "x402Version": 2,
                "resource": {"url": "https://api.test/paid/x", "description": "", "mimeType": "application/json"},
                "accepted": accepted,
                "payload": payload,
                "extensions": {}
            })
        }
    }

    fn header_name(&self) -> &'static str {
        if self.version == 1 {
            "x-payment"
        } else {
            "payment-signature"
        }
    }

    fn header(&self) -> (&'static str, String) {
        (self.header_name(), STANDARD.encode(self.json().to_string()))
    }
}

async fn pay(gw: &Gateway, p: &Payment) -> Reply {
    let (name, value) = p.header();
    get(&gw.url("/paid/x"), &[(name, &value)]).await
}

fn b64_json(s: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(s).expect("standard padded base64")).unwrap()
}

/// Fails when `v` has a `null` anywhere: tollgate leaves absent optional members out.
fn assert_no_null(v: &Value, what: &str) {
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Null => out.push(at),
            Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| walk(v, format!("{at}[{i}]"), out)),
            Value::Object(m) => m.iter().for_each(|(k, v)| walk(v, format!("{at}.{k}"), out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(v, "$".into(), &mut found);
    assert!(found.is_empty(), "{what} has null at {found:?}: {v}");
}

fn assert_refused(r: &Reply, status: u16, reason: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert_eq!(r.json()["reason"], reason, "{what}: {}", r.text());
}

// === the challenge ===

#[tokio::test]
async fn challenge_has_v1_body_and_v2_header_for_every_offer() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let offers = format!(
        "[[x402.offer]]\nnetwork = \"eip155:8453\"\nasset = \"{USDC_BASE}\"\nasset_name = \"USD Coin\"\n\n\
[[x402.offer]]\nnetwork = \"eip155:999999\"\nasset = \"{USDC_SEPOLIA}\"\npay_to = \"0x0000000000000000000000000000000000000001\"\n"
    );
    let gw = gateway(&config(&up, &fac.url(), "", &offers)).await;
    let r = get(&gw.url("/paid/report?q=1"), &[]).await;
    assert_refused(&r, 402, "payment_missing", "no payment");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let expose = r.header("access-control-expose-headers").unwrap().to_ascii_lowercase();
    for name in ["payment-required", "payment-response", "x-payment-response", "retry-after", "x-request-id"] {
        assert!(expose.split(", ").any(|n| n == name), "{name} not exposed: {expose}");
    }

    let body = r.json();
    assert_eq!(body["x402Version"], 1);
    assert_eq!(body["error"], "X-PAYMENT header is required");
    let v1 = |network: &str, asset: &str, name: &str| {
        json!({
            "scheme": "exact", "network": network, "maxAmountRequired": "10000", "asset": asset,
            "payTo": PAY_TO, "resource": "https://api.test/paid/report", "description": "Access to route paid",
            "mimeType": "application/json", "maxTimeoutSeconds": 60,
            "extra": {"name": name, "version": "2"}
        })
    };
    // The chain without a v1 name is offered to v2 clients only.
    assert_eq!(body["accepts"], json!([v1("base-sepolia", USDC_SEPOLIA, "USDC"), v1("base", USDC_BASE, "USD Coin")]));

    let header = r.header("payment-required").expect("PAYMENT-REQUIRED");
    let v2 = |network: &str, asset: &str, name: &str, pay_to: &str| {
        json!({
            "scheme": "exact", "network": network, "amount": "10000", "asset": asset, "payTo": pay_to,
            "maxTimeoutSeconds": 60, "extra": {"name": name, "version": "2"}
        })
    };
    assert_eq!(
        b64_json(header),
        json!({
            "x402Version": 2,
            "error": "PAYMENT-SIGNATURE header is required",
            "resource": {"url": "https://api.test/paid/report", "description": "Access to route paid", "mimeType": "application/json"},
            "accepts": [
                v2("eip155:84532", USDC_SEPOLIA, "USDC", PAY_TO),
                v2("eip155:8453", USDC_BASE, "USD Coin", PAY_TO),
                v2("eip155:999999", USDC_SEPOLIA, "USDC", "0x0000000000000000000000000000000000000001"),
            ],
            "extensions": {}
        })
    );
    // Compact JSON, as the official clients expect, and absent optional members left out
    // (the legacy npm client refuses `"outputSchema": null`).
    let raw = String::from_utf8(STANDARD.decode(header).unwrap()).unwrap();
    assert!(!raw.contains(": ") && !raw.contains('\n'), "{raw}");
    assert_no_null(&body, "the 402 body");
    assert_no_null(&b64_json(header), "PAYMENT-REQUIRED");
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn challenge_uses_route_description_and_mime_type_and_sits_beside_credits() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let text = config(&up, &fac.url(), "", "").replace(
        "accept = [\"x402\"]\n",
        "accept = [\"credits\", \"x402\"]\ndescription = \"Premium market data\"\nmime_type = \"text/csv\"\n",
    );
    let gw = gateway(&text).await;
    let r = get(&gw.url("/paid/x"), &[]).await;
    assert_refused(&r, 402, "payment_missing", "no payment");
    let body = r.json();
    assert_no_null(&body, "the 402 body beside credits");
    assert_eq!(body["credits"]["scheme"], "Bearer");
    assert_eq!(body["accepts"][0]["description"], "Premium market data");
    assert_eq!(body["accepts"][0]["mimeType"], "text/csv");
    assert!(r.header("www-authenticate").is_some());
    let v2 = b64_json(r.header("payment-required").unwrap());
    assert_eq!(v2["resource"]["description"], "Premium market data");
    assert_eq!(v2["resource"]["mimeType"], "text/csv");

    // A refusal names its reason in the x402 `error` members too.
    let (name, value) = ("x-payment", "!!!");
    let r = get(&gw.url("/paid/x"), &[(name, value)]).await;
    assert_refused(&r, 402, "payment_malformed", "bad base64");
    assert_eq!(r.json()["error"], "payment_malformed");
    assert_eq!(b64_json(r.header("payment-required").unwrap())["error"], "payment_malformed");

    // Browsers get the paywall page with an x402 section, and the header still.
    let r = get(&gw.url("/paid/x"), &[("accept", "text/html")]).await;
    assert_eq!(r.status, 402);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text().contains("x402 (stablecoin, per request)"), "{}", r.text());
    assert!(r.text().contains("0.01 USDC"));
    assert!(r.header("payment-required").is_some());
    gw.shutdown().await;
}

// === paying ===

async fn round_trip(p: Payment) {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[("authorization", "Bearer fac-secret"), ("x-cdp-project", "p1")]).await;
    let extra = "facilitator_headers = { Authorization = \"Bearer fac-secret\", X-CDP-Project = \"p1\" }";
    let gw = gateway(&config(&up, &fac.url(), extra, "")).await;

    let challenge = get(&gw.url("/paid/x"), &[]).await;
    let r = pay(&gw, &p).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ok"], true, "the upstream's body");
    assert_eq!(up.hits(), 1);
    assert_eq!((fac.verify_calls(), fac.settle_calls()), (1, 1));
    assert_eq!(fac.problems(), Vec::<String>::new());

    let (settle_header, network) =
        if p.version == 1 { ("x-payment-response", "base-sepolia") } else { ("payment-response", "eip155:84532") };
    let receipt = b64_json(r.header(settle_header).expect("settlement header"));
    assert_no_null(&receipt, settle_header);
    assert_eq!(receipt, json!({"success": true, "payer": DEV_ADDR, "transaction": TX_HASH, "network": network}));
    assert_eq!(r.header("x-tollgate-charged"), Some("0.01 USDC"));
    let expose = r.header("access-control-expose-headers").unwrap().to_ascii_lowercase();
    assert!(expose.contains(settle_header) && expose.contains("x-tollgate-charged"), "{expose}");

    // The upstream sees who paid and never the payment itself.
    let seen = up.last();
    assert_eq!(seen.headers.get("x-tollgate-payer").unwrap(), DEV_ADDR);
    assert_eq!(seen.headers.get("x-tollgate-paid").unwrap(), "0.01 USDC");
    assert_eq!(seen.headers.get("x-tollgate-route").unwrap(), "paid");
    assert!(seen.headers.get("x-payment").is_none() && seen.headers.get("payment-signature").is_none());

    // The facilitator got the payload as sent and the requirement the challenge offered.
    let calls = fac.calls();
    assert_eq!(calls.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(), ["/verify", "/settle"]);
    let offered = if p.version == 1 {
        challenge.json()["accepts"][0].clone()
    } else {
        let mut v2 = b64_json(challenge.header("payment-required").unwrap())["accepts"][0].clone();
        v2.as_object_mut().unwrap().remove("resource");
        v2
    };
    for c in &calls {
        assert_no_null(&c.body["paymentRequirements"], &c.path);
        assert_eq!(c.body["x402Version"], p.version);
        assert_eq!(c.body["paymentPayload"], p.json());
        assert_eq!(c.body["paymentRequirements"], offered);
    }

    let rows = gw.ledger.settlements(10).await.unwrap();
    assert_eq!(rows.len(), 1);
    let s = &rows[0];
    assert_eq!(
        (s.rail.as_str(), s.payer.as_str(), s.amount, s.asset.as_str(), s.network.as_str(), s.tx_hash.as_str()),
        ("x402", DEV_ADDR, 10_000, USDC_SEPOLIA, "eip155:84532", TX_HASH)
    );
    assert_eq!(s.route, "paid");
    assert_eq!(Some(s.request_id.as_str()), r.header("x-request-id"));

    let metrics = admin(&gw, "GET", "/metrics", "").await.text();
    for line in [
        r#"tollgate_facilitator_requests_total{rail="x402",result="verify_ok"} 1"#,
        r#"tollgate_facilitator_requests_total{rail="x402",result="settle_ok"} 1"#,
        r#"tollgate_revenue_micros_total{route="paid",rail="x402"} 10000"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn v1_payment_round_trip() {
    round_trip(Payment::v1()).await;
}

#[tokio::test]
async fn v2_payment_round_trip() {
    round_trip(Payment::v2()).await;
}

#[tokio::test]
async fn v1_paying_more_than_asked_is_accepted_and_charged_what_was_signed() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let r = pay(&gw, &Payment::v1().with(|p| p.value = "12000".into())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-charged"), Some("0.012 USDC"));
    gw.shutdown().await;
}

#[tokio::test]
async fn second_offer_is_payable_in_its_own_domain() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let offers =
        format!("[[x402.offer]]\nnetwork = \"eip155:8453\"\nasset = \"{USDC_BASE}\"\nasset_name = \"USD Coin\"\n");
    let gw = gateway(&config(&up, &fac.url(), "", &offers)).await;
    let base = Payment::v2().with(|p| {
        p.domain = ("USD Coin", "2", 8453, USDC_BASE);
        p.accepted["network"] = json!("eip155:8453");
        p.accepted["asset"] = json!(USDC_BASE.to_lowercase());
        p.accepted["extra"]["name"] = json!("USD Coin");
    });
    let r = pay(&gw, &base).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v1 = Payment::v1().with(|p| {
        p.network = "base".into();
        p.domain = ("USD Coin", "2", 8453, USDC_BASE);
    });
    let r = pay(&gw, &v1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let networks: Vec<String> = gw.ledger.settlements(10).await.unwrap().into_iter().map(|s| s.network).collect();
    assert_eq!(networks, ["eip155:8453", "eip155:8453"]);
    // Signed in the Base domain but presented as Base Sepolia: the signature does not hold.
    let wrong = Payment::v1().with(|p| p.domain = ("USD Coin", "2", 8453, USDC_BASE));
    assert_refused(&pay(&gw, &wrong).await, 402, "payment_invalid", "domain mismatch");
    assert_eq!(fac.problems(), Vec::<String>::new());
    gw.shutdown().await;
}

#[tokio::test]
async fn smart_wallet_signatures_are_left_to_the_facilitator() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let p = Payment::v2().with(|p| p.signature = Some(format!("0x{}", "6492".repeat(150))));
    let r = pay(&gw, &p).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(fac.verify_calls(), 1);
    gw.shutdown().await;
}

// === refused locally ===

#[tokio::test]
async fn local_rejections_never_reach_the_facilitator_or_the_upstream() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let other = "0x0000000000000000000000000000000000000001";
    let raw = |name: &'static str, value: String| (name, value);
    let enc = |v: Value| STANDARD.encode(v.to_string());
    let mut no_sig = Payment::v2().json();
    no_sig["payload"].as_object_mut().unwrap().remove("signature");
    let mut v3 = Payment::v2().json();
    v3["x402Version"] = json!(3);
    let mut short_nonce = Payment::v1().json();
    short_nonce["payload"]["authorization"]["nonce"] = json!("0x1234");
    let mut hex_value = Payment::v2().json();
    hex_value["payload"]["authorization"]["value"] = json!("0x2710");

    let cases: Vec<(&str, (&'static str, String), &str)> = vec![
        ("v2 wrong recipient", Payment::v2().with(|p| p.to = other.into()).header(), "payment_invalid"),
        ("v1 wrong recipient", Payment::v1().with(|p| p.to = other.into()).header(), "payment_invalid"),
        ("v2 amount below price", Payment::v2().with(|p| p.value = "9999".into()).header(), "payment_invalid"),
        ("v2 amount above price", Payment::v2().with(|p| p.value = "10001".into()).header(), "payment_invalid"),
        ("v1 amount below price", Payment::v1().with(|p| p.value = "9999".into()).header(), "payment_invalid"),
        (
            "v2 accepted amount differs",
            Payment::v2().with(|p| p.accepted["amount"] = json!("1")).header(),
            "payment_invalid",
        ),
        (
            "v2 accepted payTo differs",
            Payment::v2().with(|p| p.accepted["payTo"] = json!(other)).header(),
            "payment_invalid",
        ),
        ("v2 expired", Payment::v2().with(|p| p.valid_before = (now() - 1).to_string()).header(), "payment_expired"),
        (
            "v1 expires within the 6 s margin",
            Payment::v1().with(|p| p.valid_before = (now() + 3).to_string()).header(),
            "payment_expired",
        ),
        (
            "v1 not yet valid",
            Payment::v1().with(|p| p.valid_after = (now() + 120).to_string()).header(),
            "payment_expired",
        ),
        (
            "v2 signed by someone else",
            Payment::v2().with(|p| p.from = Some(DEV_ADDR.into())).with(|p| p.key = OTHER_KEY).header(),
            "payment_invalid",
        ),
        (
            "v1 tampered value",
            Payment::v1().with(|p| p.tamper_value = Some("20000".into())).header(),
            "payment_invalid",
        ),
        (
            "v2 tampered value",
            Payment::v2().with(|p| p.tamper_value = Some("10000".into())).with(|p| p.value = "1".into()).header(),
            "payment_invalid",
        ),
        (
            "v2 signed for another token",
            Payment::v2().with(|p| p.domain = ("USDC", "2", 84532, USDC_BASE)).header(),
            "payment_invalid",
        ),
        (
            "v2 bad v byte",
            Payment::v2().with(|p| p.signature = Some(format!("0x{}00", "11".repeat(64)))).header(),
            "payment_invalid",
        ),
        (
            "v2 short signature",
            Payment::v2().with(|p| p.signature = Some(format!("0x{}", "11".repeat(64)))).header(),
            "payment_invalid",
        ),
        ("bad base64", raw("x-payment", "not base64 at all!".into()), "payment_malformed"),
        ("url-safe base64 with '-'", raw("payment-signature", "eyJ4NDAyVmVyc2lvbiI6-Mn0=".into()), "payment_malformed"),
        ("not JSON", raw("x-payment", STANDARD.encode("{\"x402Version\":1,")), "payment_malformed"),
        ("JSON array", raw("payment-signature", enc(json!([1, 2]))), "payment_malformed"),
        ("no signature", raw("payment-signature", enc(no_sig)), "payment_malformed"),
        ("x402Version 3", raw("payment-signature", enc(v3)), "payment_malformed"),
        (
            "odd-length hex signature",
            Payment::v1().with(|p| p.signature = Some("0xabc".into())).header(),
            "payment_malformed",
        ),
        ("nonce not 32 bytes", raw("x-payment", enc(short_nonce)), "payment_malformed"),
        ("value not decimal", raw("payment-signature", enc(hex_value)), "payment_malformed"),
        ("huge header", raw("x-payment", "A".repeat(9000)), "payment_malformed"),
        (
            "v1 network not offered",
            Payment::v1().with(|p| p.network = "polygon".into()).header(),
            "payment_method_unsupported",
        ),
        (
            "v1 unknown network name",
            Payment::v1().with(|p| p.network = "eip155:84532".into()).header(),
            "payment_method_unsupported",
        ),
        (
            "v2 network not offered",
            Payment::v2().with(|p| p.accepted["network"] = json!("eip155:1")).header(),
            "payment_method_unsupported",
        ),
        (
            "v2 asset not offered",
            Payment::v2().with(|p| p.accepted["asset"] = json!(USDC_BASE)).header(),
            "payment_method_unsupported",
        ),
        ("v1 scheme upto", Payment::v1().with(|p| p.scheme = "upto".into()).header(), "payment_method_unsupported"),
        ("v2 scheme upto", Payment::v2().with(|p| p.scheme = "upto".into()).header(), "payment_method_unsupported"),
    ];
    for (what, (name, value), reason) in cases {
        let r = get(&gw.url("/paid/x"), &[(name, &value)]).await;
        assert_refused(&r, 402, reason, what);
        assert!(r.json()["cause"].is_string(), "{what}: {}", r.text());
        assert!(r.header("payment-required").is_some(), "{what}");
    }
    assert_eq!((fac.verify_calls(), fac.settle_calls()), (0, 0), "no facilitator call for a local refusal");
    assert_eq!(up.hits(), 0, "a refused payment never reaches the upstream");
    let metrics = admin(&gw, "GET", "/metrics", "").await.text();
    assert!(!metrics.contains(r#"result="verify_ok"} 1"#));
    gw.shutdown().await;
}

#[tokio::test]
async fn unpadded_base64_is_tolerated() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let p = Payment::v1().with(|p| p.value = "10001".into());
    let value = STANDARD.encode(p.json().to_string());
    assert!(value.ends_with('='), "this payment's encoding is padded");
    let r = get(&gw.url("/paid/x"), &[("x-payment", value.trim_end_matches('='))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.shutdown().await;
}

// === single use ===

#[tokio::test]
async fn the_same_payment_sent_50_times_concurrently_is_served_once() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let (name, value) = Payment::v2().header();
    let url = gw.url("/paid/x");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, value) = (url.clone(), value.clone());
            tokio::spawn(async move { get(&url, &[(name, &value)]).await })
        })
        .collect();
    let mut ok = 0;
    let mut replayed = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            402 if r.json()["reason"] == "payment_replayed" => replayed += 1,
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!((ok, replayed), (1, 49));
    assert_eq!((fac.verify_calls(), fac.settle_calls()), (1, 1));
    assert_eq!(up.hits(), 1);

    // And later, sequentially, in the other protocol version's header too.
    let r = get(&url, &[(name, &value)]).await;
    assert_refused(&r, 402, "payment_replayed", "sent again");
    assert_eq!(r.json()["cause"], "nonce_already_used");
    let r = get(&url, &[("x-payment", &value)]).await;
    assert_refused(&r, 402, "payment_replayed", "sent again as X-PAYMENT");
    assert_eq!(fac.verify_calls(), 1);
    gw.shutdown().await;
}

// === the facilitator failing ===

#[tokio::test]
async fn facilitator_down_fails_closed_with_503() {
    let up = ok_upstream().await;
    let gw = gateway(&config(&up, &closed_port_url().await, "", "")).await;
    let r = pay(&gw, &Payment::v2()).await;
    assert_refused(&r, 503, "payment_backend_unavailable", "facilitator down");
    assert_eq!(r.json()["cause"], "facilitator_unreachable");
    assert!(r.header("retry-after").is_some());
    assert_eq!(up.hits(), 0);
    let metrics = admin(&gw, "GET", "/metrics", "").await.text();
    assert!(metrics.contains(r#"tollgate_facilitator_requests_total{rail="x402",result="verify_error"} 1"#));
    gw.shutdown().await;
}

#[tokio::test]
async fn facilitator_slow_fails_closed_with_503_after_the_timeout() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    fac.set_verify(Verify::Hang);
    let gw = gateway(&impatient(config(&up, &fac.url(), "", ""))).await;
    let started = Instant::now();
    let r = pay(&gw, &Payment::v1()).await;
    assert_refused(&r, 503, "payment_backend_unavailable", "facilitator slow");
    assert_eq!(r.json()["cause"], "facilitator_timeout");
    assert!(r.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by facilitator_timeout");
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn facilitator_refusals_map_to_reasons_with_the_original_cause() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let invalid = |r: &str| Verify::Invalid(r.into());
    let body400 = |r: &str| Verify::Http(400, json!({"isValid": false, "invalidReason": r, "payer": DEV_ADDR}));
    let cases = [
        (invalid("insufficient_funds"), 402, "insufficient_funds", "insufficient_funds"),
        (body400("insufficient_funds"), 402, "insufficient_funds", "insufficient_funds"),
        (
            Verify::Http(412, json!({"isValid": false, "invalidReason": "permit2_allowance_required"})),
            402,
            "payment_invalid",
            "permit2_allowance_required",
        ),
        (
            invalid("invalid_exact_evm_payload_authorization_valid_before"),
            402,
            "payment_expired",
            "invalid_exact_evm_payload_authorization_valid_before",
        ),
        (invalid("invalid_exact_evm_payload_signature"), 402, "payment_invalid", "invalid_exact_evm_payload_signature"),
        (
            invalid("invalid_exact_evm_nonce_already_used"),
            402,
            "payment_replayed",
            "invalid_exact_evm_nonce_already_used",
        ),
        (invalid("invalid_network"), 402, "payment_method_unsupported", "invalid_network"),
        (invalid("invalid_payload"), 402, "payment_invalid", "invalid_payload"),
        // The current SDKs' spellings (Python x402 2.25, @x402/evm 2.27).
        (
            invalid("invalid_exact_evm_insufficient_balance"),
            402,
            "insufficient_funds",
            "invalid_exact_evm_insufficient_balance",
        ),
        (body400("permit2_insufficient_balance"), 402, "insufficient_funds", "permit2_insufficient_balance"),
        (invalid("permit2_invalid_nonce"), 402, "payment_replayed", "permit2_invalid_nonce"),
        (invalid("permit2_deadline_expired"), 402, "payment_expired", "permit2_deadline_expired"),
        (
            invalid("invalid_exact_evm_payload_recipient_mismatch"),
            402,
            "payment_invalid",
            "invalid_exact_evm_payload_recipient_mismatch",
        ),
        (invalid("network_mismatch"), 402, "payment_method_unsupported", "network_mismatch"),
        (
            invalid("invalid_exact_evm_failed_to_get_network_config"),
            402,
            "payment_invalid",
            "invalid_exact_evm_failed_to_get_network_config",
        ),
        (invalid("unexpected_verify_error"), 402, "payment_invalid", "unexpected_verify_error"),
        (Verify::Http(400, json!({"error": "bad things"})), 402, "payment_invalid", "bad things"),
        (Verify::Http(500, json!({"error": "boom"})), 503, "payment_backend_unavailable", "facilitator_http_error"),
        (
            Verify::Http(401, json!({"error": "unauthorized"})),
            503,
            "payment_backend_unavailable",
            "facilitator_http_error",
        ),
        (
            Verify::Http(200, json!(["not", "an", "object"])),
            503,
            "payment_backend_unavailable",
            "facilitator_bad_answer",
        ),
    ];
    for (i, (answer, status, reason, cause)) in cases.into_iter().enumerate() {
        fac.set_verify(answer);
        let r = pay(&gw, &Payment::v2()).await;
        assert_refused(&r, status, reason, cause);
        assert_eq!(r.json()["cause"], cause, "case {i}");
        assert_eq!(fac.verify_calls(), i + 1);
    }
    assert_eq!(fac.settle_calls(), 0);
    assert_eq!(up.hits(), 0);
    assert_eq!(fac.problems(), Vec::<String>::new());
    gw.shutdown().await;
}

// === settling ===

#[tokio::test]
async fn failed_settlement_withholds_the_upstream_response() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&impatient(config(&up, &fac.url(), "", ""))).await;
    // A refusal of the payment itself says why, by the code's meaning; a fault of the
    // facilitator or the chain is `settlement_failed`.
    let cases = [
        (Settle::Fail("insufficient_funds".into()), "insufficient_funds", "insufficient_funds"),
        (
            Settle::Fail("invalid_exact_evm_insufficient_balance".into()),
            "insufficient_funds",
            "invalid_exact_evm_insufficient_balance",
        ),
        (
            Settle::Fail("invalid_exact_evm_nonce_already_used".into()),
            "payment_replayed",
            "invalid_exact_evm_nonce_already_used",
        ),
        (Settle::Fail("transaction_failed".into()), "settlement_failed", "transaction_failed"),
        (Settle::Fail("unexpected_settle_error".into()), "settlement_failed", "unexpected_settle_error"),
        (
            Settle::Http(
                400,
                json!({"success": false, "errorReason": "invalid_transaction_state", "transaction": "", "network": "eip155:84532"}),
            ),
            "settlement_failed",
            "invalid_transaction_state",
        ),
        (Settle::Hang, "settlement_failed", "facilitator_timeout"),
        (Settle::Http(502, json!({})), "settlement_failed", "facilitator_http_error"),
    ];
    for (i, (answer, reason, cause)) in cases.into_iter().enumerate() {
        fac.set_settle(answer);
        let r = pay(&gw, &Payment::v2()).await;
        assert_refused(&r, 402, reason, cause);
        assert_eq!(r.json()["cause"], cause);
        assert!(r.json().get("ok").is_none(), "the upstream body is not delivered");
        let settle = b64_json(r.header("payment-response").expect("the failed settlement is reported"));
        assert_no_null(&settle, "PAYMENT-RESPONSE of a failed settlement");
        assert_no_null(&b64_json(r.header("payment-required").unwrap()), "PAYMENT-REQUIRED");
        assert_eq!(settle["success"], false);
        assert_eq!(settle["errorReason"], cause);
        assert_eq!(settle["transaction"], "");
        assert_eq!(settle["network"], "eip155:84532");
        assert!(r.header("payment-required").is_some());
        assert_eq!(up.hits(), i + 1, "the upstream was asked, after verification");
        assert_eq!(fac.settle_calls(), i + 1);
    }
    assert!(gw.ledger.settlements(10).await.unwrap().is_empty());
    gw.shutdown().await;
}

/// One charge rule for every rail: under `charge_on = "success"` an upstream answer
/// below 500 is paid for (a 404 or 422 the upstream chose to give, as with credits), and
/// a 5xx is not.
#[tokio::test]
async fn charge_on_success_settles_below_500_and_not_from_500() {
    let fac = FakeFacilitator::start(&[]).await;
    for (status, settles) in [(404, true), (422, true), (201, true), (500, false), (503, false)] {
        let up = status_upstream(status).await;
        let gw = gateway(&config(&up, &fac.url(), "", "")).await;
        let before = fac.settle_calls();
        for p in [Payment::v1(), Payment::v2()] {
            let r = pay(&gw, &p).await;
            assert_eq!(r.status, status, "{}", r.text());
            let header = if p.version == 1 { "x-payment-response" } else { "payment-response" };
            if settles {
                let receipt = b64_json(r.header(header).expect("a settled answer carries its receipt"));
                assert_eq!(receipt["success"], true, "{status}");
                assert_eq!(receipt["transaction"], TX_HASH);
                assert_eq!(r.header("x-tollgate-charged"), Some("0.01 USDC"), "{status}");
            } else {
                assert!(r.header(header).is_none() && r.header("x-tollgate-charged").is_none(), "{status}");
            }
        }
        let want = if settles { 2 } else { 0 };
        assert_eq!(fac.settle_calls() - before, want, "settles for an upstream {status}");
        assert_eq!(gw.ledger.settlements(10).await.unwrap().len(), want, "settlements recorded for {status}");
        assert_eq!(up.hits(), 2);
        gw.shutdown().await;
    }
    assert_eq!(fac.verify_calls(), 10);
    assert_eq!(fac.problems(), Vec::<String>::new());
}

#[tokio::test]
async fn charge_on_always_settles_even_an_upstream_error() {
    let up = status_upstream(500).await;
    let fac = FakeFacilitator::start(&[]).await;
    let text = config(&up, &fac.url(), "", "")
        .replace("accept = [\"x402\"]\n", "accept = [\"x402\"]\ncharge_on = \"always\"\n");
    let gw = gateway(&text).await;
    let r = pay(&gw, &Payment::v2()).await;
    assert_eq!(r.status, 500);
    assert_eq!(fac.settle_calls(), 1);
    assert!(r.header("payment-response").is_some());
    gw.shutdown().await;
}

#[tokio::test]
async fn settle_before_upstream_settles_first() {
    let fac = FakeFacilitator::start(&[]).await;
    let f2 = fac.clone();
    let up = upstream(move |_req| {
        let settled = f2.settle_calls();
        async move { Response::new(tollgate::full(format!("{{\"settled_before\":{settled}}}"))) }
    })
    .await;
    let gw = gateway(&config(&up, &fac.url(), "settle = \"before_upstream\"", "")).await;
    let r = pay(&gw, &Payment::v2()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["settled_before"], 1);
    assert_eq!(b64_json(r.header("payment-response").unwrap())["transaction"], TX_HASH);
    assert_eq!(r.header("x-tollgate-charged"), Some("0.01 USDC"));

    fac.set_settle(Settle::Fail("transaction_failed".into()));
    let r = pay(&gw, &Payment::v2()).await;
    assert_refused(&r, 402, "settlement_failed", "settle refused before the upstream");
    fac.set_settle(Settle::Fail("invalid_exact_evm_insufficient_balance".into()));
    let r = pay(&gw, &Payment::v2()).await;
    assert_refused(&r, 402, "insufficient_funds", "an unfunded wallet, settled before the upstream");
    assert_eq!(r.json()["cause"], "invalid_exact_evm_insufficient_balance");
    assert_eq!(up.hits(), 1, "a payment that did not settle never reaches the upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn per_key_limits_count_the_wallet_whatever_the_nonce() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let text = config(&up, &fac.url(), "settle = \"before_upstream\"", "")
        .replace("accept = [\"x402\"]\n", "accept = [\"x402\"]\nrate_limit = { per_key = \"2/hour\" }\n");
    let gw = gateway(&text).await;
    // Fresh nonces, both protocol versions: one wallet, one bucket.
    for p in [Payment::v1(), Payment::v2()] {
        let r = pay(&gw, &p).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (verified, settled) = (fac.verify_calls(), fac.settle_calls());
    for p in [Payment::v1(), Payment::v2()] {
        let r = pay(&gw, &p).await;
        assert_refused(&r, 429, "rate_limited", "a fresh nonce from a spent wallet");
    }
    assert_eq!(fac.settle_calls(), settled, "a limited payment is never settled");
    assert_eq!(fac.verify_calls(), verified, "a spent wallet is refused before the facilitator");
    // Another wallet has its own bucket.
    let r = pay(&gw, &Payment::v2().with(|p| p.key = OTHER_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn payment_headers_never_reach_a_free_routes_upstream() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let text = config(&up, &fac.url(), "", "")
        .replace("[x402]", "[[route]]\nname = \"free\"\nupstream = \"api\"\npath = \"/free/*\"\nfree = true\n\n[x402]");
    let gw = gateway(&text).await;
    for p in [Payment::v1(), Payment::v2()] {
        let (name, value) = p.header();
        let r = get(&gw.url("/free/x"), &[(name, &value)]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(up.last().headers.get(name).is_none(), "{name} reached a free route's upstream");
    }
    assert_eq!(fac.verify_calls(), 0);
    gw.shutdown().await;
}

// === the spec's vectors, with an injected clock ===

fn clocked_rails(at: u64) -> tollgate::gateway::RailFactory {
    Arc::new(move |cfg, ledger, metrics| {
        let x = cfg.x402.as_ref().ok_or("no [x402]")?;
        let rail = X402::with_clock(x, ledger.clone(), metrics.clone(), Arc::new(move || at))?;
        Ok(Rails::new(vec![Arc::new(rail) as Arc<dyn Rail>]))
    })
}

#[tokio::test]
async fn vectors_pass_local_checks_and_tampered_ones_do_not() {
    let vectors: Value = serde_json::from_str(&std::fs::read_to_string(VECTORS).unwrap()).unwrap();
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway_with(&config(&up, &fac.url(), "", ""), clocked_rails(1_740_672_100)).await;
    let header = |auth: &Value, sig: &Value| {
        let p = json!({"x402Version": 1, "scheme": "exact", "network": "base-sepolia",
            "payload": {"signature": sig, "authorization": auth}});
        STANDARD.encode(p.to_string())
    };
    let spec = &vectors["vectors"][0];
    for t in spec["tampered"].as_array().unwrap() {
        let change = t["change"].as_str().unwrap();
        if t["authorization"] == spec["authorization"] {
            // A domain change is invisible in the payload (unit tests cover it).
            continue;
        }
        let r = get(&gw.url("/paid/x"), &[("x-payment", &header(&t["authorization"], &spec["signature"]))]).await;
        assert_refused(&r, 402, "payment_invalid", change);
        // "to changed" fails on the recipient; "value 10001" (v1 accepts paying more)
        // on its signature.
        let cause = if change == "to changed" {
            "invalid_exact_evm_recipient_mismatch"
        } else {
            "invalid_exact_evm_payload_signature"
        };
        assert_eq!(r.json()["cause"], cause, "{change}");
    }
    assert_eq!(fac.verify_calls(), 0);
    let spec_header = header(&spec["authorization"], &spec["signature"]);
    let r = get(&gw.url("/paid/x"), &[("x-payment", &spec_header)]).await;
    assert_eq!(r.status, 200, "the x402 spec's example at its own time: {}", r.text());
    assert_eq!(up.last().headers.get("x-tollgate-payer").unwrap(), "0x857b06519E91e3A54538791bDbb0E22373e36b66");
    let r = get(&gw.url("/paid/x"), &[("x-payment", &spec_header)]).await;
    assert_refused(&r, 402, "payment_replayed", "the spec example, again");
    assert_eq!(fac.verify_calls(), 1);
    let dev = &vectors["vectors"][1];
    let r = get(&gw.url("/paid/x"), &[("x-payment", &header(&dev["authorization"], &dev["signature"]))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().headers.get("x-tollgate-payer").unwrap(), DEV_ADDR);
    gw.shutdown().await;

    // With the real clock, the same vectors are long expired.
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let r = get(&gw.url("/paid/x"), &[("x-payment", &header(&dev["authorization"], &dev["signature"]))]).await;
    assert_refused(&r, 402, "payment_expired", "vector at the real time");
    gw.shutdown().await;
}

// === doctor ===

#[tokio::test]
async fn check_supported_reports_each_configured_kind() {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let offers = format!("[[x402.offer]]\nnetwork = \"eip155:8453\"\nasset = \"{USDC_BASE}\"\n");
    let gw = gateway(&config(&up, &fac.url(), "", &offers)).await;
    let cfg = gw.gw().snapshot().config.x402.clone().unwrap();
    let kinds = check_supported(&cfg).await.unwrap();
    assert_eq!(
        kinds,
        [
            KindSupport {
                scheme: "exact",
                network: "eip155:84532".into(),
                v1_network: Some("base-sepolia"),
                v1: true,
                v2: true
            },
            KindSupport {
                scheme: "exact",
                network: "eip155:8453".into(),
                v1_network: Some("base"),
                v1: false,
                v2: false
            },
        ]
    );
    assert_eq!(fac.supported_calls(), 1);
    let mut down = cfg.clone();
    down.facilitator = tollgate::config::HttpUrl::parse(&closed_port_url().await).unwrap();
    assert!(check_supported(&down).await.is_err());
    gw.shutdown().await;
}

// === the official clients ===
//
// Each official x402 client, pinned in tests/interop/ (package.json + package-lock.json,
// requirements.txt), pays tollgate end to end: it parses the 402 as tollgate writes it,
// selects a requirement, signs with the dev key, retries, and gets the paid 200. tollgate
// checks the signature locally (EIP-712 recovery) before the fake facilitator sees it,
// so a payment signed for anything but the offered requirement fails. scripts/test.sh
// installs the clients under target/interop/ and sets TOLLGATE_INTEROP_REQUIRED=1,
// which turns a missing install into a failure instead of a skip.

/// Where scripts/test.sh installs the clients (`TOLLGATE_INTEROP_DIR` overrides).
fn interop_dir() -> std::path::PathBuf {
    std::env::var_os("TOLLGATE_INTEROP_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop"))
}

/// The program and arguments that run `script` with its installed client, or why not.
fn interop_command(script: &str) -> Result<(std::path::PathBuf, Vec<std::path::PathBuf>), String> {
    let dir = interop_dir();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
    // scripts/test.sh writes `.installed` (the pins installed) once an install succeeded.
    let installed = |sub: &str| {
        let stamp = dir.join(sub).join(".installed");
        if stamp.exists() {
            Ok(dir.join(sub))
        } else {
            Err(format!("{} is missing", stamp.display()))
        }
    };
    if script.ends_with(".py") {
        return Ok((installed("venv")?.join("bin/python"), vec![source]));
    }
    // Node resolves a script's imports from the script's own folder: run a copy beside
    // the installed node_modules.
    let node_dir = installed("node")?;
    let copy = node_dir.join(script);
    std::fs::copy(&source, &copy).map_err(|e| format!("copying {}: {e}", source.display()))?;
    Ok(("node".into(), vec![copy]))
}

/// Runs one official client against `url`; its one line of JSON output, or `None` when
/// the client is not installed (skipped, loudly, unless TOLLGATE_INTEROP_REQUIRED=1).
async fn run_official_client(script: &str, url: &str) -> Option<Value> {
    let (program, args) = match interop_command(script) {
        Ok(c) => c,
        Err(why) => {
            let msg = format!("official x402 client {script} not installed ({why}); run scripts/test.sh to install it");
            assert!(std::env::var_os("TOLLGATE_INTEROP_REQUIRED").is_none(), "{msg}");
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
            return None;
        }
    };
    let mut child = tokio::process::Command::new(&program)
        .args(&args)
        .arg(url)
        .env("X402_PRIVATE_KEY", DEV_KEY)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let run = async {
        use tokio::io::AsyncReadExt;
        let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        o.and(e).expect("reading the client's output");
        child.wait().await.expect("waiting for the client")
    };
    // A bound, not a timing assertion: a hung client fails the test instead of hanging it.
    let status = match tokio::time::timeout(Duration::from_secs(120), run).await {
        Ok(status) => status,
        Err(_) => {
            child.start_kill().expect("killing the client by its pid");
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            panic!("{script} did not finish within 120 s");
        }
    };
    let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    assert!(status.success(), "{script} failed ({status}):\n{err}\n{out}");
    let line = out.lines().last().unwrap_or_else(|| panic!("{script} printed nothing:\n{err}"));
    Some(serde_json::from_str(line).unwrap_or_else(|e| panic!("{script} printed {line:?} ({e}):\n{err}")))
}

/// One official client pays tollgate: 402 parsed, payment signed by the dev key in the
/// protocol `version`, verified and settled, the upstream's 200 delivered with its receipt.
async fn official_client_pays(script: &str, version: u8) {
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let gw = gateway(&config(&up, &fac.url(), "", "")).await;
    let Some(out) = run_official_client(script, &gw.url("/paid/data")).await else {
        gw.shutdown().await;
        return;
    };
    let client = &out["client"];
    assert_eq!(out["status"], 200, "{client}: {out}");
    let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"ok": true, "path": "/paid/data"}), "{client}: the upstream's answer");
    assert_eq!(up.hits(), 1, "{client}: only the paid request reaches the upstream");
    assert_eq!(up.last().headers.get("x-tollgate-payer").unwrap(), DEV_ADDR);

    // The facilitator saw one payment, in the expected protocol version, from the dev
    // key, for the offered requirement; it found nothing wrong in what tollgate sent.
    assert_eq!((fac.verify_calls(), fac.settle_calls()), (1, 1), "{client}");
    assert_eq!(fac.problems(), Vec::<String>::new(), "{client}");
    for call in fac.calls() {
        let b = &call.body;
        assert_eq!(b["x402Version"], version, "{client} {}", call.path);
        let auth = &b["paymentPayload"]["payload"]["authorization"];
        assert_eq!(auth["from"].as_str().unwrap().to_lowercase(), DEV_ADDR.to_lowercase(), "{client}");
        assert_eq!(auth["to"].as_str().unwrap().to_lowercase(), PAY_TO.to_lowercase(), "{client}");
        assert_eq!(auth["value"], "10000", "{client}");
        let network = if version == 1 { "base-sepolia" } else { "eip155:84532" };
        assert_eq!(b["paymentRequirements"]["network"], network, "{client}");
        assert_no_null(&b["paymentRequirements"], client.as_str().unwrap());
    }

    // The client read the receipt tollgate returned.
    let settlement = &out["settlement"];
    assert_eq!(settlement["success"], true, "{client}: {out}");
    assert_eq!(settlement["transaction"], TX_HASH, "{client}");
    assert_eq!(gw.ledger.settlements(10).await.unwrap().len(), 1, "{client}");
    gw.shutdown().await;
}

#[tokio::test]
async fn official_npm_client_x402_fetch_v1_pays() {
    official_client_pays("x402-fetch-v1.mjs", 1).await;
}

#[tokio::test]
async fn official_npm_client_x402_fetch_v2_pays() {
    official_client_pays("x402-fetch-v2.mjs", 2).await;
}

#[tokio::test]
async fn official_python_client_x402_pays() {
    official_client_pays("x402_httpx.py", 2).await;
}
