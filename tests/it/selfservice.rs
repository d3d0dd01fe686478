//! Customer self-service and Stripe top-ups, end to end: the gateway in-process with a
//! real SQLite ledger (PostgreSQL for the two-replica case), a stand-in for Stripe's
//! API that records what it receives, and webhook events shaped like Stripe's,
//! signed the way Stripe's libraries sign them.

use serde_json::Value;
use tollgate::money::Micros;

use crate::support::stripe::{self, event, session_object, signature, v1, FakeStripe, WEBHOOK_SECRET};
use crate::support::{admin, gateway, get, send, start_text, Gateway, Reply, Upstream};

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
    for path in ["/.well-known/tollgate/nothing", "/.well-known/tollgate/%61ccount", "/.well-known/tollgate/problems/x"]
    {
        let r = send("POST", &gw.url(path), &[], "x").await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
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
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
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
    gw.shutdown().await;
}
