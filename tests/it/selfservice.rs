//! Customer self-service and Stripe top-ups, end to end: the gateway in-process with a
//! real SQLite ledger (PostgreSQL for the two-replica case), a stand-in for Stripe's
//! API that records what it receives, and webhook events shaped like Stripe's,
//! signed the way Stripe's libraries sign them.

use serde_json::Value;
use tollgate::money::Micros;

use crate::support::stripe::{self, event, session_object, signature, v1, FakeStripe, WEBHOOK_SECRET};
use crate::support::{admin, assert_promtool_accepts, gateway, get, send, start_text, Gateway, Reply, Upstream};

const COMPLETED: &str = "checkout.session.completed";
const ASYNC_SUCCEEDED: &str = "checkout.session.async_payment_succeeded";
const WEBHOOK: &str = "/.well-known/tollgate/stripe/webhook";

/// An upstream, a priced route, and a catch-all free route: anything the gateway did
/// not answer itself reaches the upstream, which records it.
fn routes(up: &Upstream) -> String {
    format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{}\"\n\n\
[[route]]\nname = \"chat\"\nupstream = \"api\"\npath = \"/v1/chat/*\"\nprice = \"0.25\"\naccept = [\"credits\"]\n\n\
[[route]]\nname = \"everything\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n\n",
        up.url()
    )
}

async fn with_stripe(up: &Upstream, fake: &FakeStripe) -> Gateway {
    gateway(&format!("{}{}", routes(up), fake.section())).await
}

async fn post_webhook(gw: &Gateway, body: &str, sig: Option<&str>) -> Reply {
    let mut headers = vec![("content-type", "application/json; charset=utf-8")];
    if let Some(s) = sig {
        headers.push(("stripe-signature", s));
    }
    send("POST", &gw.url(WEBHOOK), &headers, body.to_owned()).await
}

fn completed(event_id: &str, session: &str, key_id: &str, cents: u64) -> String {
    event(
        event_id,
        COMPLETED,
        session_object(session, key_id, cents, "paid", &format!("{}.{:02}", cents / 100, cents % 100)),
    )
}

async fn metric(gw: &Gateway, series: &str) -> f64 {
    let text = get(&gw.admin_url("/metrics"), &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .unwrap()
}

fn credits_of(txs: &Value) -> Vec<&Value> {
    txs["transactions"].as_array().unwrap().iter().filter(|t| t["kind"] == "credit").collect()
}

// === webhook: signatures ===

#[tokio::test]
async fn a_signed_completed_event_credits_once_however_often_and_by_whichever_event() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, _) = gw.key("1.00").await;

    let body = completed("evt_1", "cs_test_once", &id, 1000);
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"], "credited");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(gw.balance(&id).await, Micros(11_000_000));

    // Stripe redelivers the same event (a new signature each time).
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!((r.status.as_u16(), r.json()["result"].as_str()), (200, Some("duplicate")));
    // The other event of the same session.
    let again = event("evt_2", ASYNC_SUCCEEDED, session_object("cs_test_once", &id, 1000, "paid", "10.00"));
    let r = post_webhook(&gw, &again, Some(&signature(&again))).await;
    assert_eq!((r.status.as_u16(), r.json()["result"].as_str()), (200, Some("duplicate")));
    assert_eq!(gw.balance(&id).await, Micros(11_000_000));

    let txs = admin(&gw, "GET", &format!("/admin/transactions?key={id}"), "").await.json();
    assert_eq!(credits_of(&txs).len(), 2, "the opening balance and one top-up: {txs}");
    assert_eq!(metric(&gw, "tollgate_topups_total{provider=\"stripe\",result=\"credited\"}").await, 1.0);
    assert_eq!(metric(&gw, "tollgate_topups_total{provider=\"stripe\",result=\"duplicate\"}").await, 2.0);
    assert_eq!(metric(&gw, "tollgate_topup_micros_total{provider=\"stripe\"}").await, 10_000_000.0);
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn during_a_secret_rotation_any_v1_may_match() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, _) = gw.key("0").await;
    let body = completed("evt_rot", "cs_test_rotation", &id, 500);
    let t = stripe::now();
    let old = v1("whsec_the_old_secret", t, &body);
    let new = v1(WEBHOOK_SECRET, t, &body);
    let r = post_webhook(&gw, &body, Some(&format!("t={t},v1={old},v1={new}"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.balance(&id).await, Micros(5_000_000));
    gw.shutdown().await;
}

#[tokio::test]
async fn unsigned_stale_tampered_or_foreign_deliveries_change_nothing() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, _) = gw.key("2.00").await;
    let body = completed("evt_bad", "cs_test_bad", &id, 10_000);
    let t = stripe::now();
    let tampered = body.replace("10000", "99900");
    let cases: Vec<(&str, String, Option<String>)> = vec![
        ("no signature", body.clone(), None),
        ("stale", body.clone(), Some(format!("t={},v1={}", t - 301, v1(WEBHOOK_SECRET, t - 301, &body)))),
        ("from the future", body.clone(), Some(format!("t={},v1={}", t + 301, v1(WEBHOOK_SECRET, t + 301, &body)))),
        ("tampered body", tampered.clone(), Some(format!("t={t},v1={}", v1(WEBHOOK_SECRET, t, &body)))),
        ("another secret", body.clone(), Some(format!("t={t},v1={}", v1("whsec_someone_else", t, &body)))),
        ("signature of another time", body.clone(), Some(format!("t={},v1={}", t - 1, v1(WEBHOOK_SECRET, t, &body)))),
        ("malformed", body.clone(), Some("v1=abc".into())),
        ("v0 only", body.clone(), Some(format!("t={t},v0={}", v1(WEBHOOK_SECRET, t, &body)))),
    ];
    for (what, b, sig) in cases {
        let r = post_webhook(&gw, &b, sig.as_deref()).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"), "{what}");
        assert_eq!(r.json()["type"], "https://api.test/.well-known/tollgate/problems/webhook_invalid", "{what}");
    }
    assert_eq!(gw.balance(&id).await, Micros(2_000_000));
    let txs = admin(&gw, "GET", &format!("/admin/transactions?key={id}"), "").await.json();
    assert_eq!(credits_of(&txs).len(), 1, "only the opening balance: {txs}");
    // Signed, but not JSON.
    let r = post_webhook(&gw, "not json", Some(&signature("not json"))).await;
    assert_eq!(r.status, 400);
    // Wrong method.
    let r = get(&gw.url(WEBHOOK), &[]).await;
    assert_eq!((r.status.as_u16(), r.header("allow")), (405, Some("POST")));
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

// === webhook: what is credited ===

#[tokio::test]
async fn the_amount_is_amount_total_never_metadata() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, _) = gw.key("0").await;
    let body = event("evt_forged", COMPLETED, session_object("cs_test_forged", &id, 500, "paid", "5000.00"));
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.balance(&id).await, Micros(5_000_000), "5.00 paid, whatever metadata[tollgate_amount] says");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_unpaid_session_waits_for_async_payment_succeeded() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, _) = gw.key("0").await;
    let body = event("evt_u", COMPLETED, session_object("cs_test_bank", &id, 2500, "unpaid", "25.00"));
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!((r.status.as_u16(), r.json()["result"].as_str()), (200, Some("ignored")));
    assert_eq!(gw.balance(&id).await, Micros::ZERO);

    let body = event("evt_s", ASYNC_SUCCEEDED, session_object("cs_test_bank", &id, 2500, "paid", "25.00"));
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!((r.status.as_u16(), r.json()["result"].as_str()), (200, Some("credited")));
    assert_eq!(gw.balance(&id).await, Micros(25_000_000));
    gw.shutdown().await;
}

#[tokio::test]
async fn other_events_and_other_sessions_are_acknowledged_and_change_nothing() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, _) = gw.key("1.00").await;
    let expired = event("evt_x", "checkout.session.expired", session_object("cs_test_x", &id, 500, "unpaid", "5.00"));
    let intent = event(
        "evt_pi",
        "payment_intent.succeeded",
        serde_json::json!({"id": "pi_1", "object": "payment_intent", "amount": 500}),
    );
    let mut not_ours = session_object("cs_test_other_product", &id, 500, "paid", "5.00");
    not_ours["client_reference_id"] = Value::Null;
    not_ours["metadata"] = serde_json::json!({});
    let not_ours = event("evt_o", COMPLETED, not_ours);
    for body in [expired, intent, not_ours] {
        let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
        assert_eq!((r.status.as_u16(), r.json()["result"].as_str()), (200, Some("ignored")), "{body}");
    }
    assert_eq!(gw.balance(&id).await, Micros(1_000_000));
    gw.shutdown().await;
}

#[tokio::test]
async fn revoked_keys_are_credited_unknown_ones_acknowledged_and_inconsistent_sessions_refused() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, _) = gw.key("0").await;
    assert!(gw.ledger.revoke(&id).await.unwrap());
    let body = completed("evt_r", "cs_test_revoked", &id, 700);
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!((r.status.as_u16(), r.json()["result"].as_str()), (200, Some("credited")));
    assert_eq!(gw.balance(&id).await, Micros(7_000_000), "the money arrived");

    // A key of another ledger (say, staging sharing the Stripe account): Stripe must
    // stop retrying; nothing is credited.
    let body = completed("evt_k", "cs_test_unknown", "key_0000000000000000", 700);
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!((r.status.as_u16(), r.json()["result"].as_str()), (200, Some("rejected")));

    // client_reference_id and metadata disagree; a currency balances are not kept in.
    let (other, _) = gw.key("0").await;
    let mut mismatch = session_object("cs_test_mismatch", &id, 700, "paid", "7.00");
    mismatch["metadata"]["tollgate_key_id"] = Value::String(other.clone());
    let mut eur = session_object("cs_test_eur", &id, 700, "paid", "7.00");
    eur["currency"] = Value::String("eur".into());
    for object in [mismatch, eur] {
        let body = event("evt_i", COMPLETED, object);
        let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
        assert_eq!(r.status, 400, "{}", r.text());
    }
    assert_eq!(gw.balance(&id).await, Micros(7_000_000));
    assert_eq!(gw.balance(&other).await, Micros::ZERO);
    assert_eq!(metric(&gw, "tollgate_topups_total{provider=\"stripe\",result=\"rejected\"}").await, 3.0);
    gw.shutdown().await;
}

/// Two replicas on one PostgreSQL ledger receive the same event at the same moment
/// (Stripe retrying while the first delivery is in flight, behind a load balancer):
/// one credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_at_two_replicas_on_postgres_credits_once() {
    let cluster = crate::support::pg::Cluster::spawn().await;
    let url = cluster.create_db().await;
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let text = |db: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"https://api.test\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
[ledger]\nbackend = \"postgres\"\nurl = \"{db}\"\n\n{}{}",
            routes(&up),
            fake.section()
        )
    };
    let a = start_text(tempfile::tempdir().unwrap(), &text(&url), tollgate::app::default_rails()).await;
    let b = start_text(tempfile::tempdir().unwrap(), &text(&url), tollgate::app::default_rails()).await;
    let (id, _) = a.key("0").await;
    for round in 0..5 {
        let body = completed(&format!("evt_{round}"), &format!("cs_test_race_{round}"), &id, 1000);
        let sig = signature(&body);
        let (ra, rb) = tokio::join!(post_webhook(&a, &body, Some(&sig)), post_webhook(&b, &body, Some(&sig)));
        let mut results = [ra.json()["result"].clone(), rb.json()["result"].clone()];
        results.sort_by_key(|v| v.to_string());
        assert_eq!((ra.status.as_u16(), rb.status.as_u16()), (200, 200));
        assert_eq!(results, [Value::from("credited"), Value::from("duplicate")], "round {round}");
    }
    assert_eq!(a.balance(&id).await, Micros(50_000_000));
    assert_eq!(b.ledger.transactions(Some(&id), 100).await.unwrap().len(), 5, "five top-ups, one row each");
    a.shutdown().await;
    b.shutdown().await;
}

// === without [stripe] ===

#[tokio::test]
async fn without_stripe_the_endpoints_are_404_and_nothing_is_forwarded() {
    let up = crate::support::ok_upstream().await;
    let gw = gateway(&routes(&up)).await;
    let body = completed("evt_1", "cs_test_1", "key_1", 1000);
    let r = post_webhook(&gw, &body, Some(&signature(&body))).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["type"], "https://api.test/.well-known/tollgate/problems/not_found");
    // Spelled with escapes, it is still tollgate's own (`%61ccount` is `account`).
    for (path, status) in [
        ("/.well-known/tollgate/nothing", 404),
        ("/.well-known/tollgate/%61ccount", 405),
        ("/.well-known/tollgate/problems/x", 404),
    ] {
        let r = send("POST", &gw.url(path), &[], "x").await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    assert_eq!(up.hits(), 0, "tollgate's namespace never reaches the upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn topup_metrics_pass_promtool() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let text = get(&gw.admin_url("/metrics"), &[]).await.text();
    for result in ["created", "credited", "duplicate", "rejected"] {
        assert!(
            text.contains(&format!("tollgate_topups_total{{provider=\"stripe\",result=\"{result}\"}} 0")),
            "{text}"
        );
    }
    assert!(text.contains("# TYPE tollgate_topup_micros_total counter"), "{text}");
    assert_promtool_accepts(&text);
    gw.shutdown().await;
}

// === top-ups ===

const TOPUP: &str = "/.well-known/tollgate/account/topup";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn topup_json(gw: &Gateway, key: Option<&str>, body: &str, extra: &[(&str, &str)]) -> Reply {
    let auth = key.map(bearer);
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    headers.extend_from_slice(extra);
    send("POST", &gw.url(TOPUP), &headers, body.to_owned()).await
}

#[tokio::test]
async fn a_topup_creates_a_checkout_session_with_exactly_the_documented_fields() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, key) = gw.key("0").await;
    let r = topup_json(&gw, Some(&key), r#"{"amount":"10.00"}"#, &[]).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    let session = j["session_id"].as_str().unwrap().to_owned();
    assert!(session.starts_with("cs_test_"), "{j}");
    assert_eq!(j["url"], format!("https://checkout.stripe.com/c/pay/{session}#fidkdWxOYHwnPyd1blpxYHZxWjA0"));
    assert_eq!(j["amount"], "10.00");
    assert!(j["expires_at"].as_i64().unwrap() >= 1_900_000_000, "{j}");

    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!((c.method.as_str(), c.path.as_str()), ("POST", "/v1/checkout/sessions"));
    assert_eq!(c.header("authorization"), Some(format!("Bearer {}", stripe::SECRET_KEY).as_str()));
    assert_eq!(c.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert!(c.header("idempotency-key").is_some_and(|k| k.contains(&id)), "{:?}", c.headers);
    let mut fields: Vec<(&str, &str)> = c.form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    fields.sort_unstable();
    let mut want = vec![
        ("cancel_url", "https://example.com/pricing"),
        ("client_reference_id", id.as_str()),
        ("line_items[0][price_data][currency]", "usd"),
        ("line_items[0][price_data][product_data][name]", "API credits (10.00 USD)"),
        ("line_items[0][price_data][unit_amount]", "1000"),
        ("line_items[0][quantity]", "1"),
        ("metadata[tollgate_amount]", "10.00"),
        ("metadata[tollgate_key_id]", id.as_str()),
        ("mode", "payment"),
        ("success_url", "https://example.com/thanks"),
    ];
    want.sort_unstable();
    assert_eq!(fields, want);
    assert!(!format!("{:?}", c.form).contains(&key), "the key secret never goes to Stripe");
    assert_eq!(metric(&gw, "tollgate_topups_total{provider=\"stripe\",result=\"created\"}").await, 1.0);
    assert_eq!(gw.balance(&id).await, Micros::ZERO, "nothing is credited before Stripe says it was paid");
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_retried_topup_is_the_same_session_and_a_new_one_is_not() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (_, key) = gw.key("0").await;
    let first = topup_json(&gw, Some(&key), r#"{"amount":"20.00"}"#, &[("idempotency-key", "click-1")]).await;
    let retry = topup_json(&gw, Some(&key), r#"{"amount":"20.00"}"#, &[("idempotency-key", "click-1")]).await;
    let other = topup_json(&gw, Some(&key), r#"{"amount":"20.00"}"#, &[("idempotency-key", "click-2")]).await;
    assert_eq!((first.status.as_u16(), retry.status.as_u16(), other.status.as_u16()), (201, 201, 201));
    assert_eq!(first.json()["session_id"], retry.json()["session_id"]);
    assert_ne!(first.json()["session_id"], other.json()["session_id"]);
    let calls = fake.calls();
    assert_eq!(calls[0].header("idempotency-key"), calls[1].header("idempotency-key"));
    assert_ne!(calls[0].header("idempotency-key"), calls[2].header("idempotency-key"));
    // Without a client key, two requests in one moment (a double click) send the same.
    let (a, b) = tokio::join!(
        topup_json(&gw, Some(&key), r#"{"amount":"30.00"}"#, &[]),
        topup_json(&gw, Some(&key), r#"{"amount":"30.00"}"#, &[])
    );
    let (a, b) = (a.json(), b.json());
    let window_turned = a["session_id"] != b["session_id"];
    let calls = fake.calls();
    assert!(calls[3].header("idempotency-key") == calls[4].header("idempotency-key") || window_turned);
    gw.shutdown().await;
}

#[tokio::test]
async fn amounts_out_of_range_or_too_precise_are_refused_before_stripe_is_called() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (_, key) = gw.key("0").await;
    for body in [
        r#"{"amount":"4.99"}"#,
        r#"{"amount":"500.01"}"#,
        r#"{"amount":"10.001"}"#,
        r#"{"amount":"10.0000001"}"#,
        r#"{"amount":"-10"}"#,
        r#"{"amount":"ten"}"#,
        r#"{"amount":10.5}"#,
        r#"{}"#,
    ] {
        let r = topup_json(&gw, Some(&key), body, &[]).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.json()["type"], "https://api.test/.well-known/tollgate/problems/topup_amount_invalid", "{body}");
    }
    assert!(fake.calls().is_empty(), "Stripe was never called");
    gw.shutdown().await;
}

#[tokio::test]
async fn stripe_down_is_503_with_retry_after_and_a_refusal_is_a_clear_problem() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, key) = gw.key("0").await;
    for status in [500, 503, 429] {
        fake.set(stripe::Answer::Http(status, serde_json::json!({"error": {"type": "api_error", "message": "boom"}})));
        let r = topup_json(&gw, Some(&key), r#"{"amount":"10.00"}"#, &[]).await;
        assert_eq!(r.status, 503, "{status}: {}", r.text());
        assert_eq!(r.json()["reason"], "payment_backend_unavailable");
        assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    }
    fake.set(stripe::Answer::Http(
        400,
        serde_json::json!({"error": {"type": "invalid_request_error", "code": "url_invalid",
            "message": "Not a valid URL", "param": "success_url"}}),
    ));
    let r = topup_json(&gw, Some(&key), r#"{"amount":"10.00"}"#, &[]).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["type"], "https://api.test/.well-known/tollgate/problems/topup_failed");
    assert!(!r.text().contains(stripe::SECRET_KEY));
    assert_eq!(metric(&gw, "tollgate_topups_total{provider=\"stripe\",result=\"created\"}").await, 0.0);
    gw.shutdown().await;

    // Nothing listens at api_base.
    let closed = crate::support::facilitator::closed_port_url().await;
    let section = fake.section().replace(&fake.url(), &closed);
    let gw = gateway(&format!("{}{section}", routes(&up))).await;
    let (_, key) = gw.key("0").await;
    let r = topup_json(&gw, Some(&key), r#"{"amount":"10.00"}"#, &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let _ = id;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_browser_form_post_is_sent_on_to_stripe_with_303() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, key) = gw.key("0").await;
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let r = send("POST", &gw.url(TOPUP), &form, format!("amount=25.00&key={key}")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let location = r.header("location").unwrap();
    assert!(location.starts_with("https://checkout.stripe.com/c/pay/cs_test_"), "{location}");
    assert!(!location.contains(&key));
    assert_eq!(fake.calls()[0].field("client_reference_id"), Some(id.as_str()));
    assert_eq!(fake.calls()[0].field("line_items[0][price_data][unit_amount]"), Some("2500"));

    let r =
        send("POST", &gw.url(TOPUP), &form, "amount=25.00&key=tg_live_0000000000000000000000000000000000000000").await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.json()["reason"], "payment_invalid");
    let r = send("POST", &gw.url(TOPUP), &form, "amount=25.00").await;
    assert_eq!(r.json()["reason"], "payment_missing");
    assert_eq!(fake.calls().len(), 1);

    // The page a person reaches by following topup_url.
    let r = get(&gw.url(TOPUP), &[("accept", "text/html")]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("<form method=\"post\" action=\"https://api.test/.well-known/tollgate/account/topup\""));
    let r = send("PUT", &gw.url(TOPUP), &[], "").await;
    assert_eq!((r.status.as_u16(), r.header("allow")), (405, Some("GET, HEAD, POST")));
    gw.shutdown().await;
}

#[tokio::test]
async fn the_402_links_to_the_topup_and_the_paywall_has_the_form() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let r = get(&gw.url("/v1/chat/x"), &[]).await;
    assert_eq!(r.status, 402);
    assert_eq!(r.json()["credits"]["topup_url"], "https://api.test/.well-known/tollgate/account/topup");
    let r = get(&gw.url("/v1/chat/x"), &[("accept", "text/html")]).await;
    assert_eq!(r.status, 402);
    let page = r.text();
    assert!(
        page.contains("<form method=\"post\" action=\"https://api.test/.well-known/tollgate/account/topup\""),
        "{page}"
    );
    assert!(page.contains("name=\"key\" type=\"password\""), "{page}");
    gw.shutdown().await;

    let gw = gateway(&routes(&up)).await;
    let r = get(&gw.url("/v1/chat/x"), &[]).await;
    assert!(r.json()["credits"].get("topup_url").is_none(), "{}", r.text());
    let (_, key) = gw.key("1.00").await;
    let r = get(&gw.url("/.well-known/tollgate/account"), &[("authorization", &bearer(&key))]).await;
    assert_eq!(r.json()["topup_url"], Value::Null);
    let r = topup_json(&gw, Some(&key), r#"{"amount":"10.00"}"#, &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

// === the account ===

const ACCOUNT: &str = "/.well-known/tollgate/account";

async fn paid(gw: &Gateway, key: &str) -> String {
    let r = get(&gw.url("/v1/chat/x"), &[("authorization", &bearer(key))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("x-request-id").unwrap().to_owned()
}

#[tokio::test]
async fn a_key_sees_its_own_account_transactions_and_requests_and_nothing_else() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = gateway(&format!("{}[credits]\nspend_cap = \"5.00/day\"\n\n{}", routes(&up), fake.section())).await;
    let (id, key) = gw.key("1.00").await;
    let (other_id, other_key) = gw.key("1.00").await;
    let rids = [paid(&gw, &key).await, paid(&gw, &key).await, paid(&gw, &key).await];
    let other_rid = paid(&gw, &other_key).await;
    let auth = bearer(&key);
    let me = [("authorization", auth.as_str())];

    let r = get(&gw.url(ACCOUNT), &me).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.json(),
        serde_json::json!({
            "key_id": id, "label": "test", "balance": "0.25", "currency": "USD", "held": "0.00",
            "spend_cap": {"limit": "5.00", "window": "day", "spent": "0.75"},
            "topup_url": "https://api.test/.well-known/tollgate/account/topup"
        })
    );
    let r = get(&gw.url(ACCOUNT), &[("x-api-key", &key)]).await;
    assert_eq!(r.json()["key_id"], id.as_str(), "X-API-Key works too");

    // Newest first, two a page, with a cursor; only this key's rows.
    let page = get(&gw.url(&format!("{ACCOUNT}/transactions?limit=2")), &me).await.json();
    let txs = page["transactions"].as_array().unwrap();
    assert_eq!(txs.len(), 2);
    assert_eq!((txs[0]["kind"].as_str(), txs[0]["request_id"].as_str()), (Some("debit"), Some(rids[2].as_str())));
    let next = page["next"].as_str().expect("a next cursor");
    let rest = get(&gw.url(&format!("{ACCOUNT}/transactions?limit=2&before={next}")), &me).await.json();
    let rest_txs = rest["transactions"].as_array().unwrap();
    assert_eq!(rest_txs.len(), 2);
    assert_eq!(rest_txs[1]["kind"], "credit");
    assert!(rest.get("next").is_none(), "{rest}");
    for t in txs.iter().chain(rest_txs) {
        assert_eq!(t["key_id"], id.as_str());
    }
    let r = get(&gw.url(&format!("{ACCOUNT}/transactions?before=not-a-cursor")), &me).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = get(&gw.url(&format!("{ACCOUNT}/transactions?limit=0")), &me).await;
    assert_eq!(r.status, 400);

    // One request's charge.
    let r = get(&gw.url(&format!("{ACCOUNT}/requests/{}", rids[0])), &me).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(
        (j["status"].as_str(), j["amount"].as_str(), j["route"].as_str()),
        (Some("captured"), Some("0.25"), Some("chat"))
    );
    assert_eq!(j["request_id"], rids[0].as_str());

    // Another key's request is as unknown as one that never was.
    let theirs = get(&gw.url(&format!("{ACCOUNT}/requests/{other_rid}")), &me).await;
    let never = get(&gw.url(&format!("{ACCOUNT}/requests/01JNEVERMADE0000000000000")), &me).await;
    assert_eq!((theirs.status.as_u16(), never.status.as_u16()), (404, 404));
    assert_eq!(theirs.json()["type"], never.json()["type"]);
    assert_eq!(theirs.json()["title"], never.json()["title"]);
    assert!(!theirs.text().contains(&other_id));

    // Wrong method.
    let r = send("POST", &gw.url(ACCOUNT), &me, "").await;
    assert_eq!((r.status.as_u16(), r.header("allow")), (405, Some("GET, HEAD")));
    assert_eq!(up.hits(), 4, "only the paid requests reached the upstream");
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_revoked_or_missing_keys_get_the_402_of_a_paid_route() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, key) = gw.key("1.00").await;
    let unknown = "tg_live_0000000000000000000000000000000000000000";
    assert!(gw.ledger.revoke(&id).await.unwrap());
    let paths = [ACCOUNT.to_owned(), format!("{ACCOUNT}/transactions"), format!("{ACCOUNT}/requests/01J")];
    for path in &paths {
        let cases: [(Vec<(&str, String)>, &str); 4] = [
            (vec![], "payment_missing"),
            (vec![("authorization", bearer(unknown))], "payment_invalid"),
            (vec![("authorization", bearer(&key))], "payment_invalid"),
            (vec![("x-api-key", "not-a-key".into())], "payment_malformed"),
        ];
        for (headers, reason) in cases {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = get(&gw.url(path), &h).await;
            assert_eq!(r.status, 402, "{path} {reason}: {}", r.text());
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
            assert_eq!(r.json()["reason"], reason, "{path}");
            assert_eq!(r.json()["credits"]["header"], "Authorization");
            assert!(r.header("www-authenticate").unwrap().contains(reason));
        }
    }
    let r = topup_json(&gw, Some(&key), r#"{"amount":"10.00"}"#, &[]).await;
    assert_eq!((r.status.as_u16(), r.json()["reason"].as_str()), (402, Some("payment_invalid")));
    assert!(fake.calls().is_empty());
    assert_eq!(up.hits(), 0, "never forwarded");
    gw.shutdown().await;
}

/// The whole story with only a key: read the balance, start a top-up, Stripe's webhook
/// arrives, the credit shows, and so does each later charge.
#[tokio::test]
async fn after_the_webhook_the_customer_sees_the_credit_and_each_later_charge() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let gw = with_stripe(&up, &fake).await;
    let (id, key) = gw.key("0").await;
    let me = [("authorization", bearer(&key))];
    let me: Vec<(&str, &str)> = me.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(get(&gw.url(ACCOUNT), &me).await.json()["balance"], "0.00");
    assert_eq!(get(&gw.url("/v1/chat/x"), &me).await.json()["reason"], "insufficient_funds");

    let started = topup_json(&gw, Some(&key), r#"{"amount":"10.00"}"#, &[]).await.json();
    let session = started["session_id"].as_str().unwrap();
    let call = &fake.calls()[0];
    let cents: u64 = call.field("line_items[0][price_data][unit_amount]").unwrap().parse().unwrap();
    let body = event(
        "evt_paid",
        COMPLETED,
        session_object(session, call.field("client_reference_id").unwrap(), cents, "paid", "10.00"),
    );
    assert_eq!(post_webhook(&gw, &body, Some(&signature(&body))).await.status, 200);

    let account = get(&gw.url(ACCOUNT), &me).await.json();
    assert_eq!(account["balance"], "10.00");
    let txs = get(&gw.url(&format!("{ACCOUNT}/transactions")), &me).await.json();
    assert_eq!(txs["transactions"][0]["kind"], "credit");
    assert_eq!(txs["transactions"][0]["amount"], "10.00");

    let rid = paid(&gw, &key).await;
    let txs = get(&gw.url(&format!("{ACCOUNT}/transactions")), &me).await.json();
    assert_eq!(txs["transactions"][0]["kind"], "debit");
    assert_eq!(txs["transactions"][0]["request_id"], rid.as_str());
    assert_eq!(txs["transactions"][0]["amount"], "0.25");
    assert_eq!(txs["transactions"][1]["kind"], "credit");
    let charge = get(&gw.url(&format!("{ACCOUNT}/requests/{rid}")), &me).await.json();
    assert_eq!((charge["amount"].as_str(), charge["status"].as_str()), (Some("0.25"), Some("captured")));
    assert_eq!(gw.balance(&id).await, Micros(9_750_000));
    gw.shutdown().await;
}

// === doctor ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_stripe_without_spending() {
    let (up, fake) = (crate::support::ok_upstream().await, FakeStripe::start().await);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tollgate.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[ledger]\npath = \"{}\"\n\n{}{}",
        dir.path().join("l.db").display(),
        routes(&up),
        fake.section()
    );
    std::fs::write(&cfg, &text).unwrap();
    let (ok, out, err) = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || crate::support::cli(&cfg, &["doctor"])
    })
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.contains("stripe secret_key: looks like a test-mode key"), "{out}");
    assert!(out.contains("stripe webhook_secret: looks like a signing secret"), "{out}");
    assert!(out.contains("answers GET /v1/balance"), "{out}");
    assert!(!out.contains(stripe::SECRET_KEY) && !out.contains(WEBHOOK_SECRET), "{out}");
    let calls = fake.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!((calls[0].method.as_str(), calls[0].path.as_str()), ("GET", "/v1/balance"));

    std::fs::write(&cfg, text.replace(stripe::SECRET_KEY, "pk_test_publishable").replace(WEBHOOK_SECRET, "secret"))
        .unwrap();
    let (ok, out, _) = tokio::task::spawn_blocking(move || crate::support::cli(&cfg, &["doctor"])).await.unwrap();
    assert!(!ok, "{out}");
    assert!(out.contains("does NOT look like a Stripe secret key"), "{out}");
    assert!(out.contains("does NOT look like a webhook signing secret"), "{out}");
    assert!(out.contains("stripe api") && out.contains("FAILED"), "{out}");
}

/// A metered charge (captured for less than its hold, with usage) shows its detail as
/// the transaction itself carries it.
#[tokio::test]
async fn a_metered_charge_shows_its_hold_model_and_usage() {
    use tollgate::ledger::{HoldOutcome, HoldRequest, Metered, SecretHash};
    use tollgate::meter::{Usage, UsageSource};
    let up = crate::support::ok_upstream().await;
    let gw = gateway(&routes(&up)).await;
    let (_, key) = gw.key("1.00").await;
    let held = gw
        .ledger
        .authorize(HoldRequest {
            secret: SecretHash::of(&key),
            amount: Micros(50_000),
            route: "chat",
            request_id: "01JMETEREDREQUEST000000000",
            spend_cap: None,
        })
        .await
        .unwrap();
    let HoldOutcome::Held { hold, .. } = held else { panic!("{held:?}") };
    let usage = Usage { input: 1200, cached_input: 200, cache_write_input: 0, output: 300 };
    let metered = Metered { model: "gpt-4o-mini".into(), usage, source: UsageSource::Reported };
    assert!(gw.ledger.capture(hold, Micros(1_234), Some(&metered)).await.unwrap());

    let auth = bearer(&key);
    let r = get(&gw.url(&format!("{ACCOUNT}/requests/01JMETEREDREQUEST000000000")), &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!((j["amount"].as_str(), j["status"].as_str()), (Some("0.001234"), Some("captured")));
    assert_eq!(j["held"], "0.05");
    assert_eq!(j["model"], "gpt-4o-mini");
    assert_eq!(j["usage"]["input_tokens"], 1200);
    assert_eq!(j["usage_source"], "reported");
    gw.shutdown().await;
}
