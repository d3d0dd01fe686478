//! End-to-end tests of the payment gate with the credits rail: every refusal reason,
//! the ledger's hold/capture/release semantics through real HTTP, the admin API and
//! the metrics. Real upstreams, a real SQLite ledger, the in-process gateway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use http::Response;
use tollgate::ledger::TxKind;
use tollgate::money::Micros;

fn priced(up: &Upstream, extra_route: &str, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{}\"\ntimeout = \"2s\"\n\n\
[[route]]\nname = \"chat\"\nupstream = \"api\"\npath = \"/v1/chat/*\"\nprice = \"0.002\"\naccept = [\"credits\"]\n{extra_route}\n\n\
[[route]]\nname = \"docs\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n\n\
[credits]\ntopup_url = \"https://billing.test/topup\"\n{extra}\n",
        up.url()
    )
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn assert_refusal(r: &Reply, status: u16, reason: &str) {
    assert_eq!(r.status.as_u16(), status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    assert_eq!(j["reason"], reason, "{j}");
    assert_eq!(j["status"], status);
    assert_eq!(j["type"], format!("https://api.test/.well-known/tollgate/problems/{reason}"));
}

#[tokio::test]
async fn payment_missing_carries_the_whole_402_contract() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let r = get(&gw.url("/v1/chat/completions"), &[]).await;
    assert_refusal(&r, 402, "payment_missing");
    assert_eq!(r.header("x-robots-tag"), Some("noindex"));
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"tollgate\", error=\"payment_missing\""));
    let j = r.json();
    assert_eq!(j["title"], "Payment required");
    assert_eq!(j["instance"], "/v1/chat/completions");
    assert_eq!(j["route"], "chat");
    assert_eq!(j["price"], serde_json::json!({"amount": "0.002", "currency": "USD"}));
    assert_eq!(
        j["credits"],
        serde_json::json!({"header": "Authorization", "scheme": "Bearer", "topup_url": "https://billing.test/topup"})
    );
    assert_eq!(j["request_id"].as_str(), r.header("x-request-id"));
    assert!(j["detail"].as_str().unwrap().contains("0.002 USD"));
    assert_eq!(up.hits(), 0, "an unpaid request never reaches the upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_paid_request_is_forwarded_with_receipt_and_without_the_credential() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let (id, key) = gw.key("0.01").await;
    let auth = bearer(&key);
    let r = get(
        &gw.url("/v1/chat/x?q=1"),
        &[("authorization", &auth), ("x-tollgate-payer", "someone-else"), ("x-tollgate-paid", "100 USD")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-charged"), Some("0.002 USD"));
    assert_eq!(r.header("x-tollgate-balance"), Some("0.008 USD"));
    let seen = up.last();
    assert!(seen.headers.get("authorization").is_none(), "credential removed before forwarding");
    assert_eq!(seen.headers["x-tollgate-route"], "chat");
    assert_eq!(seen.headers["x-tollgate-payer"], id.as_str(), "client-sent X-Tollgate-* replaced");
    assert_eq!(seen.headers["x-tollgate-paid"], "0.002 USD");
    assert_eq!(seen.uri, "/v1/chat/x?q=1");
    assert_eq!(gw.balance(&id).await, Micros(8_000));

    // X-API-Key works too and is removed as well.
    let r = get(&gw.url("/v1/chat/x"), &[("x-api-key", &key)]).await;
    assert_eq!(r.status, 200);
    assert!(up.last().headers.get("x-api-key").is_none());
    assert_eq!(gw.balance(&id).await, Micros(6_000));

    let txs = gw.ledger.transactions(Some(&id), 10).await.unwrap();
    let debits: Vec<_> = txs.iter().filter(|t| t.kind == TxKind::Debit).collect();
    assert_eq!(debits.len(), 2);
    assert!(debits.iter().all(|t| t.status.as_deref() == Some("captured") && t.route.as_deref() == Some("chat")));
    gw.shutdown().await;
}

#[tokio::test]
async fn malformed_credentials_are_refused_never_forwarded_never_5xx() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let long = format!("Bearer tg_live_{}", "a".repeat(10_000));
    let cases: Vec<(&str, String)> = vec![
        ("authorization", "Bearer".to_owned()),
        ("authorization", "Bearer not-a-key".to_owned()),
        ("authorization", "Bearer tg_live_zz".to_owned()),
        ("authorization", format!("Bearer tg_live_{}", "A".repeat(40))),
        ("authorization", long),
        ("authorization", "Bearer tg_live_\t0000".to_owned()),
        ("x-api-key", "%00%01".to_owned()),
        ("x-api-key", "tg_live_".to_owned()),
    ];
    for (h, v) in &cases {
        let r = get(&gw.url("/v1/chat/x"), &[(h, v)]).await;
        assert_refusal(&r, 402, "payment_malformed");
    }
    // Raw bytes no client library would send (non-UTF-8, control characters) go over a
    // raw socket: hyper may refuse the head itself (400) or the gate refuses it (402).
    for raw in [&b"Bearer \xff\xfe\x00garbage"[..], b"Bearer tg_live_\x01\x02\x7f", b"\x80\x81\x82"] {
        let status = raw_request_status(&gw, raw).await;
        assert!(status == 402 || status == 400, "status {status} for {raw:?}");
    }
    assert_eq!(up.hits(), 0);
    // The gateway is still healthy.
    assert_eq!(get(&gw.url("/free"), &[]).await.status, 200);
    gw.shutdown().await;
}

/// Sends a GET with `Authorization: <raw bytes>` over a raw socket; returns the status.
async fn raw_request_status(gw: &Gateway, raw: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = gw.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = b"GET /v1/chat/x HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: ".to_vec();
    req.extend_from_slice(raw);
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn unsupported_method_invalid_and_revoked_keys() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", "Basic dXNlcjpwYXNz")]).await;
    assert_refusal(&r, 402, "payment_method_unsupported");

    let unknown = format!("Bearer tg_live_{}", "0".repeat(40));
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &unknown)]).await;
    assert_refusal(&r, 402, "payment_invalid");
    assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"tollgate\", error=\"payment_invalid\""));

    let (id, key) = gw.key("1").await;
    assert!(gw.ledger.revoke(&id).await.unwrap());
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_refusal(&r, 402, "payment_invalid");
    assert!(r.json()["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(gw.balance(&id).await, Micros(1_000_000), "nothing held from a revoked key");
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn insufficient_funds_states_the_balance() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let (id, key) = gw.key("0.0005").await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_refusal(&r, 402, "insufficient_funds");
    assert_eq!(r.json()["detail"], "Balance 0.0005 USD is below the price 0.002 USD of route chat.");
    assert_eq!(gw.balance(&id).await, Micros(500));
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn spend_cap_stops_a_key_within_its_window() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "spend_cap = \"0.004/hour\"")).await;
    let (id, key) = gw.key("1").await;
    let auth = bearer(&key);
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/v1/chat/x"), &[("authorization", &auth)]).await.status, 200);
    }
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &auth)]).await;
    assert_refusal(&r, 402, "spend_cap_reached");
    assert!(r.json()["detail"].as_str().unwrap().contains("0.004 USD cap per hour"), "{}", r.text());
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - 4_000));
    assert_eq!(up.hits(), 2);
    gw.shutdown().await;
}

#[tokio::test(start_paused = false)]
async fn rate_limits_answer_429_with_retry_after() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "rate_limit = { per_key = \"2/min\" }", "")).await;
    let (_, key) = gw.key("1").await;
    let (_, other) = gw.key("1").await;
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await.status, 200);
    }
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_refusal(&r, 429, "rate_limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&other))]).await.status, 200, "per key");
    gw.shutdown().await;

    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "rate_limit = { per_ip = \"3/min\" }", "")).await;
    let (_, key) = gw.key("1").await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await.status, 200);
    }
    let r = get(&gw.url("/v1/chat/x"), &[]).await;
    assert_refusal(&r, 429, "rate_limited");
    assert_eq!(up.hits(), 3);
    gw.shutdown().await;
}

#[tokio::test]
async fn ledger_unavailable_fails_closed_with_503() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let (id, key) = gw.key("1").await;
    // Another process holds the database's write lock: the ledger cannot write.
    let db = gw.dir.path().join("ledger.db");
    let locker = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(db).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE").unwrap();
        c
    })
    .join()
    .unwrap();
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_refusal(&r, 503, "payment_backend_unavailable");
    assert!(r.header("retry-after").is_some());
    assert_eq!(up.hits(), 0, "never forwarded unpaid");
    let ready = get(&gw.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, 503);
    drop(locker);
    assert_eq!(get(&gw.admin_url("/readyz"), &[]).await.status, 200);
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 200, "recovers by itself");
    assert_eq!(gw.balance(&id).await, Micros(998_000));
    let metrics = get(&gw.admin_url("/metrics"), &[]).await.text();
    assert!(metrics.lines().any(|l| l.starts_with("tollgate_ledger_errors_total ") && !l.ends_with(" 0")), "{metrics}");
    gw.shutdown().await;
}

#[tokio::test]
async fn settlement_failed_when_the_hold_was_released_before_capture() {
    // The upstream answers only after the hold was released behind the gateway's back
    // (as another replica's sweep does to a hold whose lease ran out; a sweep never
    // releases a hold its own ledger has open): the capture fails, the response is
    // withheld.
    let ledger_slot: Arc<std::sync::Mutex<Option<Arc<dyn tollgate::ledger::Ledger>>>> = Default::default();
    let slot = ledger_slot.clone();
    let up = upstream(move |_req| {
        let slot = slot.clone();
        async move {
            let l = slot.lock().unwrap().clone().unwrap();
            let pending =
                l.transactions(None, 10).await.unwrap().into_iter().find(|t| t.status.as_deref() == Some("pending"));
            l.release(tollgate::ledger::HoldId(pending.unwrap().id)).await.unwrap();
            Response::new(tollgate::full("secret paid content"))
        }
    })
    .await;
    let gw = gateway(&priced(&up, "", "")).await;
    *ledger_slot.lock().unwrap() = Some(gw.ledger.clone());
    let (id, key) = gw.key("1").await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_refusal(&r, 402, "settlement_failed");
    assert!(!r.text().contains("secret paid content"));
    assert_eq!(gw.balance(&id).await, Micros(1_000_000), "not charged");
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_release_the_hold() {
    for (status, reaches) in [(500u16, true), (503, true)] {
        let up = status_upstream(status).await;
        let gw = gateway(&priced(&up, "", "")).await;
        let (id, key) = gw.key("1").await;
        let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
        assert_eq!(r.status.as_u16(), status);
        assert!(r.header("x-tollgate-charged").is_none());
        assert_eq!(up.hits(), usize::from(reaches));
        assert_eq!(gw.balance(&id).await, Micros(1_000_000), "released on {status}");
        let txs = gw.ledger.transactions(Some(&id), 10).await.unwrap();
        let refunds: Vec<_> = txs.iter().filter(|t| t.kind == TxKind::Refund).collect();
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0].amount, Micros(2_000));
        gw.shutdown().await;
    }
    // 4xx is a chargeable answer under charge_on = "success".
    let up = status_upstream(404).await;
    let gw = gateway(&priced(&up, "", "")).await;
    let (id, key) = gw.key("1").await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-tollgate-charged"), Some("0.002 USD"));
    assert_eq!(gw.balance(&id).await, Micros(998_000));
    gw.shutdown().await;
}

#[tokio::test]
async fn charge_on_always_charges_a_500_but_never_an_unreached_upstream() {
    let up = status_upstream(500).await;
    let gw = gateway(&priced(&up, "charge_on = \"always\"", "")).await;
    let (id, key) = gw.key("1").await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 500);
    assert_eq!(gw.balance(&id).await, Micros(998_000));
    gw.shutdown().await;

    // Connection refused: a port that was just free.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dead = Upstream { addr: free, hits: Default::default(), seen: Default::default() };
    let gw = gateway(&priced(&dead, "charge_on = \"always\"", "")).await;
    let (id, key) = gw.key("1").await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["type"], "https://api.test/.well-known/tollgate/problems/upstream_unavailable");
    assert_eq!(gw.balance(&id).await, Micros(1_000_000), "never charged for an unreached upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_timeout_is_504_refunded_and_charged_only_under_always() {
    let up = upstream(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Response::new(tollgate::empty())
    })
    .await;
    let gw = gateway(&priced(&up, "", "").replace("timeout = \"2s\"", "timeout = \"200ms\"")).await;
    let (id, key) = gw.key("1").await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(gw.balance(&id).await, Micros(1_000_000));
    gw.shutdown().await;

    // Under "always" the request reached the upstream, which did the work: charged.
    let text = priced(&up, "charge_on = \"always\"", "").replace("timeout = \"2s\"", "timeout = \"200ms\"");
    let gw = gateway(&text).await;
    let (id, key) = gw.key("1").await;
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.status, 504);
    assert_eq!(gw.balance(&id).await, Micros(998_000));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_race_200_concurrent_requests_on_a_key_funded_for_20() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let (id, key) = gw.key("0.04").await; // exactly 20 × 0.002
    let auth = bearer(&key);
    let ok = Arc::new(AtomicUsize::new(0));
    let broke = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (url, auth, ok, broke) = (gw.url("/v1/chat/x"), auth.clone(), ok.clone(), broke.clone());
        tasks.push(tokio::spawn(async move {
            let r = get(&url, &[("authorization", &auth)]).await;
            match r.status.as_u16() {
                200 => ok.fetch_add(1, Ordering::SeqCst),
                402 if r.json()["reason"] == "insufficient_funds" => broke.fetch_add(1, Ordering::SeqCst),
                other => panic!("unexpected {other}: {}", r.text()),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ok.load(Ordering::SeqCst), 20);
    assert_eq!(broke.load(Ordering::SeqCst), 180);
    assert_eq!(up.hits(), 20);
    assert_eq!(gw.balance(&id).await, Micros::ZERO);
    let txs = gw.ledger.transactions(Some(&id), 1000).await.unwrap();
    assert_eq!(txs.iter().filter(|t| t.kind == TxKind::Debit).count(), 20);
    assert_eq!(txs.iter().filter(|t| t.status.as_deref() == Some("captured")).count(), 20);
    gw.shutdown().await;
}

#[tokio::test]
async fn browsers_get_a_paywall_page_and_problem_types_are_served() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "description = \"Chat <b>completions</b>\"", "")).await;
    let r = get(&gw.url("/v1/chat/x"), &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")]).await;
    assert_eq!(r.status, 402);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let page = r.text();
    assert!(page.contains("0.002 USD"));
    assert!(page.contains("https://billing.test/topup"));
    assert!(page.contains("Authorization: Bearer"));
    assert!(!page.contains("<script") && !page.contains("http://") && !page.contains("src="), "no external assets");

    for reason in tollgate::payment::Reason::ALL {
        let r = get(&gw.url(&format!("/.well-known/tollgate/problems/{}", reason.as_str())), &[]).await;
        assert_eq!(r.status, 200, "{}", reason.as_str());
        assert!(r.text().contains(reason.as_str()));
        assert!(r.text().contains("How to fix it"));
    }
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_api_manages_keys_and_credits_idempotently() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let r = send("POST", &gw.admin_url("/admin/keys"), &[], "{\"balance\":\"1\"}").await;
    assert_eq!(r.status, 401);
    let r = admin(&gw, "POST", "/admin/keys", "{\"balance\":\"1.50\",\"label\":\"acme\"}").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let k = r.json();
    let id = k["id"].as_str().unwrap().to_owned();
    let key = k["key"].as_str().unwrap().to_owned();
    assert_eq!(k["balance"], "1.50");
    assert!(key.starts_with("tg_live_"));

    let r = admin(&gw, "GET", &format!("/admin/keys/{id}"), "").await;
    assert_eq!(r.json()["balance"], "1.50");
    assert_eq!(r.json()["label"], "acme");
    assert!(!r.text().contains(&key), "the secret is shown only once");

    let body = "{\"amount\":\"0.25\",\"idempotency_key\":\"inv-1\"}";
    let a = admin(&gw, "POST", &format!("/admin/keys/{id}/credit"), body).await;
    let b = admin(&gw, "POST", &format!("/admin/keys/{id}/credit"), body).await;
    assert_eq!(a.json()["applied"], true);
    assert_eq!(b.json()["applied"], false);
    assert_eq!(b.json()["balance"], "1.75");
    let r = admin(&gw, "POST", &format!("/admin/keys/{id}/credit"), "{\"amount\":\"-1\"}").await;
    assert_eq!(r.status, 400);
    let r = admin(&gw, "POST", "/admin/keys/key_nope/credit", "{\"amount\":\"1\"}").await;
    assert_eq!(r.status, 404);
    // A JSON number with a fraction went through a binary float: refused, not rounded.
    let r = admin(&gw, "POST", &format!("/admin/keys/{id}/credit"), "{\"amount\":0.1}").await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("decimal strings"), "{}", r.text());
    let r = admin(&gw, "POST", &format!("/admin/keys/{id}/credit"), "{\"amount\":1}").await;
    assert_eq!(r.json()["balance"], "2.75", "a JSON integer is whole units");

    assert_eq!(get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await.status, 200);
    let r = admin(&gw, "GET", &format!("/admin/transactions?key={id}&limit=10"), "").await;
    let txs = r.json()["transactions"].as_array().unwrap().clone();
    let kinds: Vec<&str> = txs.iter().map(|t| t["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["debit", "credit", "credit", "credit"]);
    assert_eq!(txs[0]["amount"], "0.002");
    assert_eq!(txs[0]["status"], "captured");
    assert_eq!(txs[0]["route"], "chat");
    for field in ["id", "key_id", "kind", "amount", "route", "request_id", "status", "created_at"] {
        assert!(txs[0].get(field).is_some(), "transaction field {field}");
    }

    let r = admin(&gw, "POST", &format!("/admin/keys/{id}/revoke"), "").await;
    assert_eq!(r.json()["revoked"], true);
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(&key))]).await;
    assert_refusal(&r, 402, "payment_invalid");
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_count_exactly_and_pass_promtool() {
    let up = ok_upstream().await;
    let gw = gateway(&priced(&up, "", "")).await;
    let (_, key) = gw.key("0.004").await;
    let auth = bearer(&key);
    get(&gw.url("/v1/chat/x"), &[]).await; // payment_missing
    get(&gw.url("/v1/chat/x"), &[]).await; // payment_missing
    get(&gw.url("/v1/chat/x"), &[("authorization", &auth)]).await; // paid
    get(&gw.url("/v1/chat/x"), &[("authorization", &auth)]).await; // paid
    get(&gw.url("/v1/chat/x"), &[("authorization", &auth)]).await; // insufficient
    get(&gw.url("/docs"), &[]).await; // free
    let m = get(&gw.admin_url("/metrics"), &[]).await;
    assert_eq!(m.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let text = m.text();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("tollgate_payment_required_total{route=\"chat\",reason=\"payment_missing\"}"), 2.0);
    assert_eq!(value("tollgate_payment_required_total{route=\"chat\",reason=\"insufficient_funds\"}"), 1.0);
    assert_eq!(value("tollgate_payments_total{route=\"chat\",rail=\"credits\",result=\"success\"}"), 2.0);
    assert_eq!(value("tollgate_payments_total{route=\"chat\",rail=\"credits\",result=\"rejected\"}"), 1.0);
    assert_eq!(value("tollgate_revenue_micros_total{route=\"chat\",rail=\"credits\"}"), 4000.0);
    assert_eq!(value("tollgate_requests_total{route=\"chat\",outcome=\"forwarded\"}"), 2.0);
    assert_eq!(value("tollgate_requests_total{route=\"chat\",outcome=\"payment_required\"}"), 3.0);
    assert_eq!(value("tollgate_requests_total{route=\"docs\",outcome=\"free\"}"), 1.0);
    assert_eq!(value("tollgate_payment_verify_duration_seconds_count{rail=\"credits\"}"), 3.0);
    assert_eq!(value("tollgate_ledger_errors_total"), 0.0);
    assert_eq!(value("tollgate_inflight_requests"), 0.0);
    assert_eq!(value("tollgate_request_duration_seconds_count{route=\"chat\"}"), 5.0);
    assert_eq!(value("tollgate_upstream_duration_seconds_count{upstream=\"api\"}"), 3.0);

    assert_promtool_accepts(&text);
    gw.shutdown().await;
}
