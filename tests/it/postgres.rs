//! The PostgreSQL ledger beyond the conformance suite (which runs in
//! `ledger_conformance.rs`): several replicas on one database, database outages,
//! the CLI, and concurrent start-up. Every test starts its own throwaway cluster
//! (`crate::support::pg`), so a test that stops its database disturbs no other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::facilitator::FakeFacilitator;
use crate::support::pg::Cluster;
use crate::support::*;
use alloy_primitives::{B256, U256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::json;
use tollgate::ledger::postgres::{PostgresLedger, PostgresOptions, SCHEMA_VERSION};
use tollgate::ledger::{HoldOutcome, HoldRequest, Ledger, LedgerError, SecretHash, TxKind};
use tollgate::money::Micros;
use tollgate::payment::rails::x402::verify::{self as v, TransferWithAuthorization};

/// Price of the credits route, in micro-USD.
const PRICE: u64 = 2_000;
const DEV_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const USDC_SEPOLIA: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";

fn opts() -> PostgresOptions {
    PostgresOptions { pool_size: 8, statement_timeout: Duration::from_secs(10), ..Default::default() }
}

async fn ledger(url: &str) -> Arc<PostgresLedger> {
    Arc::new(PostgresLedger::connect(url, opts()).await.unwrap())
}

/// Holds `PRICE` on route `/v1/chat` for the key with `secret`.
async fn hold(
    l: &PostgresLedger,
    secret: &str,
    request_id: &str,
    spend_cap: Option<(Micros, Duration)>,
) -> HoldOutcome {
    let req =
        HoldRequest { secret: SecretHash::of(secret), amount: Micros(PRICE), route: "/v1/chat", request_id, spend_cap };
    l.authorize(req).await.unwrap()
}

/// A plain client on `url`, for what the test does behind the ledger's back; its
/// connection task ends when the client is dropped.
async fn sql_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A gateway config on the PostgreSQL ledger at `url`: `/v1/*` priced 0.002 USD in
/// credits; with a facilitator, also `/paid/*` at 0.01 USD in x402.
fn config_text(url: &str, port: u16, admin_port: u16, upstream: &str, facilitator: Option<&str>) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\npublic_url = \"https://api.test\"\nshutdown_timeout = \"2s\"\n\n\
[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n\
[ledger]\nbackend = \"postgres\"\nurl = \"{url}\"\npool_size = 8\nstatement_timeout = \"1s\"\n\n\
[log]\nfilter = \"warn\"\n\n\
[[upstream]]\nname = \"api\"\nurl = \"{upstream}\"\ntimeout = \"5s\"\n\n\
[[route]]\nname = \"chat\"\nupstream = \"api\"\npath = \"/v1/*\"\nprice = \"0.002\"\naccept = [\"credits\"]\n"
    );
    if let Some(f) = facilitator {
        text.push_str(&format!(
            "\n[[route]]\nname = \"paid\"\nupstream = \"api\"\npath = \"/paid/*\"\nprice = \"0.01\"\naccept = [\"x402\"]\n\n\
[x402]\nfacilitator = \"{f}\"\nnetwork = \"eip155:84532\"\nasset = \"{USDC_SEPOLIA}\"\npay_to = \"{PAY_TO}\"\n\
facilitator_timeout = \"5s\"\n"
        ));
    }
    text
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// One `tollgate run` process, its stderr in a log file, killed on drop.
struct Replica {
    _proc: Proc,
    base: String,
    admin: String,
}

async fn replica(dir: &Path, name: &str, url: &str, upstream: &str, facilitator: Option<&str>) -> Replica {
    let (port, admin_port) = (free_port(), free_port());
    let cfg = write(dir, &format!("{name}.toml"), &config_text(url, port, admin_port, upstream, facilitator));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut proc = Proc(
        Command::new(binary()).args(["run", "--config"]).arg(&cfg).stdout(Stdio::null()).stderr(log).spawn().unwrap(),
    );
    let admin = format!("http://127.0.0.1:{admin_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            panic!("replica {name} exited with {status}:\n{log}");
        }
        let req = http::Request::get(format!("{admin}/readyz")).body(Default::default()).unwrap();
        if let Ok(Ok(res)) = tokio::time::timeout(Duration::from_secs(2), client().request(req)).await {
            if res.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "replica {name} not ready within 30s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Replica { _proc: proc, base: format!("http://127.0.0.1:{port}"), admin }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn admin_get(admin: &str, path: &str) -> serde_json::Value {
    let r = send("GET", &format!("{admin}{path}"), &[("authorization", &bearer(ADMIN_TOKEN))], "").await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

/// A v1 x402 payment of 0.01 USDC to `PAY_TO`, signed with the dev key and a fresh
/// nonce: the `X-PAYMENT` header value, the payer and the nonce.
fn x402_payment() -> (String, String, String) {
    let signer: PrivateKeySigner = DEV_KEY.parse().unwrap();
    let nonce = B256::from(rand::random::<[u8; 32]>());
    let (valid_after, valid_before) = (now() - 600, now() + 120);
    let transfer = TransferWithAuthorization {
        from: signer.address(),
        to: v::address(PAY_TO).unwrap(),
        value: U256::from(10_000u64),
        validAfter: U256::from(valid_after),
        validBefore: U256::from(valid_before),
        nonce,
    };
    let domain = v::domain("USDC", "2", 84532, v::address(USDC_SEPOLIA).unwrap());
    let signature = signer.sign_hash_sync(&v::signing_hash(&domain, &transfer)).unwrap();
    let payer = signer.address().to_checksum(None);
    let nonce = format!("{nonce:#x}");
    let payment = json!({
        "x402Version": 1, "scheme": "exact", "network": "base-sepolia",
        "payload": {
            "signature": format!("0x{}", hex::encode(signature.as_bytes())),
            "authorization": {
                "from": payer, "to": PAY_TO, "value": "10000",
                "validAfter": valid_after.to_string(), "validBefore": valid_before.to_string(), "nonce": nonce
            }
        }
    });
    (STANDARD.encode(payment.to_string()), payer, nonce)
}

/// Opens every pooled connection, so a race starts with full concurrency.
async fn warm_up(ledgers: &[&Arc<PostgresLedger>]) {
    let pings = ledgers.iter().flat_map(|l| (0..opts().pool_size).map(move |_| (*l).clone()));
    let tasks: Vec<_> = pings.map(|l| tokio::spawn(async move { l.ping().await.unwrap() })).collect();
    for t in tasks {
        t.await.unwrap();
    }
}

// === several replicas ===

/// Two `tollgate run` processes on one database: a key funded for exactly N requests
/// gets 10·N concurrent requests split across both, and one x402 payment is replayed
/// against both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_overspend_and_never_accept_a_payment_twice() {
    const N: usize = 20;
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let up = ok_upstream().await;
    let fac = FakeFacilitator::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(&url).await;
    let k = l.create_key(Some("shared"), Micros(N as u64 * PRICE)).await.unwrap();

    let a = replica(dir.path(), "a", &url, &up.url(), Some(&fac.url())).await;
    let b = replica(dir.path(), "b", &url, &up.url(), Some(&fac.url())).await;

    // Credits: 10·N requests at once, alternating between the replicas.
    let tasks: Vec<_> = (0..10 * N)
        .map(|i| {
            let url = format!("{}/v1/chat/{i}", if i % 2 == 0 { &a.base } else { &b.base });
            let auth = bearer(&k.key);
            tokio::spawn(async move { get(&url, &[("authorization", &auth)]).await })
        })
        .collect();
    let (mut served, mut refused) = ([0; 2], 0);
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task.await.unwrap();
        match r.status.as_u16() {
            200 => served[i % 2] += 1,
            402 => {
                assert_eq!(r.json()["reason"], "insufficient_funds", "{}", r.text());
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!((served[0] + served[1], refused), (N, 9 * N), "served by a, b: {served:?}");
    assert_eq!(up.hits(), N, "only paid requests reached the upstream");

    // Each replica's admin API sees the shared ledger.
    let key = admin_get(&b.admin, &format!("/admin/keys/{}", k.id)).await;
    assert_eq!(key["balance"], "0.00");
    let txs = admin_get(&a.admin, &format!("/admin/transactions?key={}&limit=1000", k.id)).await;
    let txs = txs["transactions"].as_array().unwrap().clone();
    let debits: Vec<_> = txs.iter().filter(|t| t["kind"] == "debit").collect();
    assert_eq!(debits.len(), N);
    assert!(debits.iter().all(|t| t["status"] == "captured" && t["amount"] == "0.002"), "{debits:?}");
    assert_eq!(txs.iter().filter(|t| t["kind"] == "refund").count(), 0);
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros::ZERO);
    let rows = l.transactions(Some(&k.id), 1000).await.unwrap();
    assert_eq!(rows.iter().filter(|t| t.kind == TxKind::Debit && t.status.as_deref() == Some("captured")).count(), N);

    // x402: the same signed payment sent 20 times at once, to both replicas.
    let (payment, payer, nonce) = x402_payment();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let url = format!("{}/paid/report", if i % 2 == 0 { &a.base } else { &b.base });
            let payment = payment.clone();
            tokio::spawn(async move { get(&url, &[("x-payment", &payment)]).await })
        })
        .collect();
    let (mut ok, mut replayed) = (0, 0);
    for task in tasks {
        let r = task.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            402 if r.json()["reason"] == "payment_replayed" => replayed += 1,
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!((ok, replayed), (1, 19));
    assert_eq!(up.hits(), N + 1);
    assert_eq!((fac.verify_calls(), fac.settle_calls()), (1, 1), "the facilitator saw the payment once");
    assert_eq!(l.settlements(10).await.unwrap().len(), 1);
    assert!(!l.reserve_nonce(&payer, &nonce, now() + 120).await.unwrap(), "recorded in the shared store");
    assert!(fac.problems().is_empty(), "{:?}", fac.problems());
}

/// The replay store across two ledgers on one database: 50 concurrent reservations
/// of one (payer, nonce), split across both, and exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_reserved_once_across_two_ledgers() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let (a, b) = (ledger(&url).await, ledger(&url).await);
    let payer = "0xAbCdEf0123456789aBcDeF0123456789AbCdEf01";
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            // Either spelling of the same hex is the same nonce.
            let nonce = if i % 3 == 0 { "0xBEEF" } else { "0xbeef" };
            tokio::spawn(async move { l.reserve_nonce(payer, nonce, 4_000_000_000).await.unwrap() })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        won += usize::from(task.await.unwrap());
    }
    assert_eq!(won, 1);
}

/// A spend cap holds across replicas: 100 concurrent capped holds split across two
/// ledgers, a cap of 5 prices → exactly 5 held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_cap_holds_across_two_ledgers() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let (a, b) = (ledger(&url).await, ledger(&url).await);
    let k = a.create_key(None, Micros(1_000_000)).await.unwrap();
    warm_up(&[&a, &b]).await;
    let cap = Micros(5 * PRICE);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            let secret = k.key.clone();
            tokio::spawn(
                async move { hold(&l, &secret, &format!("cap-{i}"), Some((cap, Duration::from_secs(3600)))).await },
            )
        })
        .collect();
    let (mut held, mut capped) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            HoldOutcome::Held { .. } => held += 1,
            HoldOutcome::SpendCapReached { spent, .. } => {
                assert_eq!(spent, cap);
                capped += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((held, capped), (5, 95));
    assert_eq!(b.key(&k.id).await.unwrap().unwrap().balance, Micros(1_000_000 - 5 * PRICE));
}

/// Two replicas sweeping stale holds at once refund each hold exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sweeps_never_double_refund() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let (a, b) = (ledger(&url).await, ledger(&url).await);
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(a.create_key(None, Micros(100 * PRICE)).await.unwrap());
    }
    for i in 0..60 {
        let k = &keys[i % 3];
        assert!(matches!(hold(&a, &k.key, &format!("stale-{i}"), None).await, HoldOutcome::Held { .. }));
    }
    warm_up(&[&a, &b]).await;
    let sweeps: Vec<_> = (0..4)
        .map(|i| {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { l.release_stale_holds(Duration::ZERO).await.unwrap() })
        })
        .collect();
    let mut released = 0;
    for s in sweeps {
        released += s.await.unwrap();
    }
    assert_eq!(released, 60);
    for k in &keys {
        assert_eq!(b.key(&k.id).await.unwrap().unwrap().balance, Micros(100 * PRICE));
        let rows = b.transactions(Some(&k.id), 1000).await.unwrap();
        assert_eq!(rows.iter().filter(|t| t.kind == TxKind::Refund).count(), 20);
        assert!(rows.iter().filter(|t| t.kind == TxKind::Debit).all(|t| t.status.as_deref() == Some("released")));
    }
}

/// Sets back by an hour the time a hold was taken and its lease last renewed, as if
/// that long had passed.
async fn age(c: &tokio_postgres::Client, hold: tollgate::ledger::HoldId) {
    let sql = "UPDATE transactions SET created_at = created_at - 3600, touched_at = touched_at - 3600 WHERE id = $1";
    assert_eq!(c.execute(sql, &[&hold.0]).await.unwrap(), 1);
}

/// The lease (`touched_at`) of a hold.
async fn touched_at(c: &tokio_postgres::Client, hold: tollgate::ledger::HoldId) -> Option<i64> {
    c.query_one("SELECT touched_at FROM transactions WHERE id = $1", &[&hold.0]).await.unwrap().get(0)
}

/// A hold lives as long as its replica: its lease is renewed, so another replica's
/// sweep leaves it however old it is (a long stream). Once its replica is gone, the
/// lease runs out, the sweep releases it, and a late capture charges nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_lives_as_long_as_its_replica() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let quick = PostgresOptions { hold_heartbeat: Duration::from_millis(100), ..opts() };
    let a = Arc::new(PostgresLedger::connect(&url, quick).await.unwrap());
    let b = ledger(&url).await;
    let c = sql_client(&url).await;
    let k = a.create_key(None, Micros(10 * PRICE)).await.unwrap();
    let held = |request_id: &'static str| {
        let (a, secret) = (a.clone(), k.key.clone());
        async move {
            match hold(&a, &secret, request_id, None).await {
                HoldOutcome::Held { hold, .. } => hold,
                other => panic!("{other:?}"),
            }
        }
    };
    let streaming = held("stream").await;
    let orphan = held("orphan").await;
    age(&c, streaming).await;
    age(&c, orphan).await;
    // The next beats renew both leases.
    let stamped = touched_at(&c, streaming).await;
    let mut waited = Duration::ZERO;
    while touched_at(&c, streaming).await == stamped || touched_at(&c, orphan).await.is_none() {
        assert!(waited < Duration::from_secs(10), "the leases were never renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    assert_eq!(b.release_stale_holds(Duration::from_secs(60)).await.unwrap(), 0, "an hour old, but alive");
    let metered = tollgate::ledger::Metered {
        model: "m".into(),
        usage: tollgate::meter::Usage { input: 10, cached_input: 0, cache_write_input: 0, output: 5 },
        source: tollgate::meter::UsageSource::Reported,
    };
    assert!(a.capture(streaming, Micros(PRICE / 2), Some(&metered)).await.unwrap());

    // The replica holding `orphan` dies; its last beat is an hour old by the sweep.
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    age(&c, orphan).await;
    let after = touched_at(&c, orphan).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(touched_at(&c, orphan).await, after, "no beat after the ledger was dropped");
    assert_eq!(b.release_stale_holds(Duration::from_secs(60)).await.unwrap(), 1);
    assert!(!b.capture(orphan, Micros(PRICE), None).await.unwrap(), "too late to charge");
    assert_eq!(b.key(&k.id).await.unwrap().unwrap().balance, Micros(10 * PRICE - PRICE / 2));
    let rows = b.transactions(Some(&k.id), 10).await.unwrap();
    assert_eq!(rows.iter().filter(|t| t.kind == TxKind::Refund).count(), 1);
}

/// Holds issued at once are taken in one batch (several holds on one key, an unknown
/// key, a revoked key among them); each caller still gets its own exact answer. On a
/// current-thread runtime every task queues its hold before the batcher runs, so they
/// are one batch, one statement.
#[tokio::test]
async fn concurrent_holds_are_batched_and_answered_one_by_one() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let l = ledger(&url).await;
    let funded = l.create_key(None, Micros(3 * PRICE)).await.unwrap();
    let revoked = l.create_key(None, Micros(100 * PRICE)).await.unwrap();
    assert!(l.revoke(&revoked.id).await.unwrap());
    let secrets: Vec<(&'static str, String)> = (0..10)
        .map(|_| ("funded", funded.key.clone()))
        .chain((0..3).map(|_| ("revoked", revoked.key.clone())))
        .chain((0..3).map(|i| ("unknown", format!("tg_live_{i:040}"))))
        .collect();
    let tasks: Vec<_> = secrets
        .into_iter()
        .enumerate()
        .map(|(i, (who, secret))| {
            let l = l.clone();
            tokio::spawn(async move { (who, hold(&l, &secret, &format!("mixed-{i}"), None).await) })
        })
        .collect();
    let (mut held, mut short) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            ("funded", HoldOutcome::Held { key_id, .. }) if key_id == funded.id => held += 1,
            ("funded", HoldOutcome::Insufficient { balance, .. }) => {
                assert!(balance < Micros(PRICE));
                short += 1;
            }
            ("revoked", HoldOutcome::Revoked { key_id }) => assert_eq!(key_id, revoked.id),
            ("unknown", HoldOutcome::UnknownKey) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((held, short), (3, 7));
    assert_eq!(l.key(&funded.id).await.unwrap().unwrap().balance, Micros::ZERO);
    assert_eq!(l.key(&revoked.id).await.unwrap().unwrap().balance, Micros(100 * PRICE));
}

/// Captures issued at once share statements (one batch per round trip); each caller
/// still gets its own answer: captured, too late (released meanwhile), or no such hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_captures_are_batched_and_answered_one_by_one() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let l = ledger(&url).await;
    let k = l.create_key(None, Micros(300 * PRICE)).await.unwrap();
    let mut holds = Vec::new();
    for i in 0..200 {
        let HoldOutcome::Held { hold, .. } = hold(&l, &k.key, &format!("batch-{i}"), None).await else { panic!() };
        holds.push(hold);
    }
    // Every tenth hold is released first: capturing it must say "too late".
    for hold in holds.iter().step_by(10) {
        l.release(*hold).await.unwrap();
    }
    let bogus = tollgate::ledger::HoldId(i64::MAX);
    let mut tasks: Vec<_> = holds
        .iter()
        .chain([bogus].iter())
        .map(|&hold| {
            let l = l.clone();
            tokio::spawn(async move { (hold, l.capture(hold, Micros(PRICE), None).await) })
        })
        .collect();
    // The same hold captured twice at once is captured once.
    let twice = holds[1];
    tasks.push(tokio::spawn({
        let l = l.clone();
        async move { (twice, l.capture(twice, Micros(PRICE), None).await) }
    }));
    for task in tasks {
        let (hold, answer) = task.await.unwrap();
        match holds.iter().position(|h| *h == hold) {
            Some(i) if i % 10 == 0 => assert!(!answer.unwrap(), "released hold {i} was captured"),
            Some(i) => assert!(answer.unwrap(), "hold {i} was not captured"),
            None => assert!(matches!(answer, Err(LedgerError::Other(_))), "{answer:?}"),
        }
    }
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros(300 * PRICE - 180 * PRICE));
    let rows = l.transactions(Some(&k.id), 1000).await.unwrap();
    let captured = rows.iter().filter(|t| t.status.as_deref() == Some("captured")).count();
    assert_eq!(captured, 180);
}

/// Captures look holds up by primary key, however many captured holds the partial
/// index of pending holds still lists (dead entries stay there until a vacuum): with
/// `status = 'pending'` in the statement the planner chose that index and every batch
/// scanned every hold captured since the last vacuum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_use_the_primary_key_not_the_pending_index() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let l = ledger(&url).await;
    let k = l.create_key(None, Micros(3_000 * PRICE)).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|t| {
            let (l, key) = (l.clone(), k.key.clone());
            tokio::spawn(async move {
                for i in 0..100 {
                    let HoldOutcome::Held { hold: h, .. } = hold(&l, &key, &format!("bloat-{t}-{i}"), None).await
                    else {
                        panic!("hold refused")
                    };
                    assert!(l.capture(h, Micros(PRICE), None).await.unwrap());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let c = sql_client(&url).await;
    // What autovacuum's analyze would find: 2,000 debits, none of them pending.
    c.batch_execute("ANALYZE transactions").await.unwrap();
    let ids: Vec<i64> = vec![1, 2, 3];
    let explain = format!("EXPLAIN {}", tollgate::ledger::postgres::CAPTURE_MANY);
    let rows = c.query(explain.as_str(), &[&ids]).await.unwrap();
    let plan: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("transactions_pkey"), "capture does not use the primary key: {plan}");
    assert!(!plan.contains("transactions_pending"), "capture scans the pending index: {plan}");
}

/// `seq_scan` and `idx_scan` of `transactions`, once every backend has published its
/// statistics (an idle backend does so within 10 s: `PGSTAT_IDLE_INTERVAL`).
async fn table_scans(c: &tokio_postgres::Client) -> (i64, i64) {
    tokio::time::sleep(Duration::from_secs(11)).await;
    // The statistics are read from a snapshot cached per transaction: start afresh.
    c.batch_execute("SELECT pg_stat_clear_snapshot()").await.unwrap();
    let sql = "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'transactions'";
    let row = c.query_one(sql, &[]).await.unwrap();
    (row.get(0), row.get(1))
}

/// A capture is planned for the ids at hand, not from a cached generic plan: one made
/// while the ledger was new and `transactions` tiny is a sequential scan, which then
/// read the whole table for every capture as it grew (5 ms per capture at 50,000 rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_stay_on_the_primary_key_as_the_ledger_grows() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    // One connection, so that it runs every capture and caches any generic plan.
    let l = Arc::new(PostgresLedger::connect(&url, PostgresOptions { pool_size: 1, ..opts() }).await.unwrap());
    let c = sql_client(&url).await;
    // No autovacuum: its ANALYZE would replace stale plans and hide the defect.
    c.batch_execute("ALTER TABLE transactions SET (autovacuum_enabled = false)").await.unwrap();
    let k = l.create_key(None, Micros(1_000 * PRICE)).await.unwrap();
    let grow = async |rows: i32| {
        let sql = "INSERT INTO transactions (key_id, kind, amount) SELECT $1, 'credit', 1 FROM generate_series(1, $2)";
        c.execute(sql, &[&k.id, &rows]).await.unwrap();
    };
    // A young ledger: a few pages.
    grow(300).await;
    // Rounds of 20 holds captured at once: captures batched as under load.
    let rounds = async |tag: &str| {
        for round in 0..10 {
            let mut holds = Vec::new();
            for i in 0..20 {
                let HoldOutcome::Held { hold: h, .. } = hold(&l, &k.key, &format!("{tag}-{round}-{i}"), None).await
                else {
                    panic!("hold refused")
                };
                holds.push(h);
            }
            let captures: Vec<_> = holds
                .into_iter()
                .map(|h| {
                    let l = l.clone();
                    tokio::spawn(async move { l.capture(h, Micros(PRICE), None).await })
                })
                .collect();
            for c in captures {
                assert!(c.await.unwrap().unwrap());
            }
        }
    };
    rounds("young").await;
    grow(50_000).await;
    let (seq_before, idx_before) = table_scans(&c).await;
    rounds("grown").await;
    let (seq_after, idx_after) = table_scans(&c).await;
    assert!(idx_after - idx_before >= 10, "captures did not show in the statistics: {idx_before} → {idx_after}");
    assert_eq!(seq_after, seq_before, "captures scanned the whole table {} times", seq_after - seq_before);
}

// === faults ===

/// The database stops: paid requests fail closed with 503 and `/readyz` fails; it
/// starts again: the same gateway serves again. A key row locked elsewhere (a slow
/// database) hits the statement timeout: 503 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fails_closed_and_heals_without_restart() {
    let cluster = Arc::new(Cluster::spawn().await);
    let url = cluster.create_db().await;
    let up = ok_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(&url, 0, 0, &up.url(), None);
    let gw = start_text(dir, &text, tollgate::app::default_rails()).await;
    let (id, key) = gw.key("1.00").await;
    let (paid_url, ready_url, auth) = (gw.url("/v1/chat"), gw.admin_url("/readyz"), bearer(&key));
    let paid = async || get(&paid_url, &[("authorization", &auth)]).await;
    let ready = async || get(&ready_url, &[]).await;

    assert_eq!(paid().await.status, 200);
    assert_eq!(ready().await.status, 200);
    assert_eq!(up.hits(), 1);

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop()).await.unwrap();
    for _ in 0..3 {
        let r = paid().await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["reason"], "payment_backend_unavailable");
        let retry: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
        assert!(retry >= 1);
    }
    let r = ready().await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["status"], "unready");
    assert_eq!(up.hits(), 1, "nothing unpaid was forwarded");
    assert!(matches!(gw.ledger.ping().await, Err(LedgerError::Unavailable(_))));

    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start()).await.unwrap();
    // Pooled connections died with the server; new ones are made on demand.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = paid().await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < deadline, "no recovery within 30s: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready().await.status, 200);
    assert_eq!(up.hits(), 2);
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - 2 * PRICE));

    // Slow: another session holds the key's row lock; the hold waits for it until the
    // 1s statement timeout cancels it.
    let locker = sql_client(&url).await;
    locker.batch_execute(&format!("BEGIN; SELECT 1 FROM keys WHERE id = '{id}' FOR UPDATE")).await.unwrap();
    let started = Instant::now();
    let r = paid().await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["reason"], "payment_backend_unavailable");
    assert!(started.elapsed() >= Duration::from_millis(900), "waited for the lock: {:?}", started.elapsed());
    assert_eq!(up.hits(), 2);
    locker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(paid().await.status, 200);
    assert_eq!(up.hits(), 3);
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - 3 * PRICE));
    gw.shutdown().await;
}

// === CLI ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_and_doctor_work_against_postgres() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let up = ok_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "tollgate.toml", &config_text(&url, free_port(), free_port(), &up.url(), None));

    let id = keys_cli_round_trip(&cfg);
    // The CLI wrote to the shared database, not to a local file.
    let l = ledger(&url).await;
    let rows = l.transactions(Some(&id), 100).await.unwrap();
    assert_eq!(rows.iter().map(|t| t.amount.get()).collect::<Vec<_>>(), [2_500_000, 5_000_000]);
    assert!(!dir.path().join("tollgate.db").exists());

    let (ok, out, err) = cli(&cfg, &["doctor"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("ledger (Postgres): read/write ok"), "{out}");
    assert!(out.contains("doctor: all checks passed"), "{out}");

    // Database down: doctor and the CLI say so and exit non-zero.
    drop(l);
    tokio::task::spawn_blocking(move || cluster.stop()).await.unwrap();
    let (ok, out, _) = cli(&cfg, &["doctor"]);
    assert!(!ok);
    assert!(out.contains("ledger: FAILED"), "{out}");
    assert!(out.contains("cannot connect to PostgreSQL at 127.0.0.1:"), "{out}");
    let (ok, _, err) = cli(&cfg, &["keys", "show", &id]);
    assert!(!ok);
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
}

/// `tollgate keys` against the shared database while a replica serves: a revocation
/// and a top-up hold for the very next request, an idempotency key reused for another
/// top-up is refused by the CLI (exit 1) and the admin API (409) alike, and the admin
/// API pages through every transaction, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_changes_hold_for_the_next_request_on_postgres() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let up = ok_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "cli.toml", &config_text(&url, free_port(), free_port(), &up.url(), None));
    let create = |balance: &str| {
        let (ok, out, err) = cli(&cfg, &["keys", "create", "--balance", balance, "--json"]);
        assert!(ok, "{err}");
        let k = parse_json(&out);
        (k["id"].as_str().unwrap().to_owned(), k["key"].as_str().unwrap().to_owned())
    };
    let (a, a_key) = create("10");
    let (b, b_key) = create("0.002");
    let r = replica(dir.path(), "a", &url, &up.url(), None).await;
    let paid = async |key: &str| get(&format!("{}/v1/x", r.base), &[("authorization", &bearer(key))]).await;
    let reason = |reply: &Reply| (reply.status.as_u16(), reply.json()["reason"].as_str().map(str::to_owned));

    assert_eq!(paid(&a_key).await.status, 200);
    assert!(cli(&cfg, &["keys", "revoke", &a]).0);
    assert_eq!(reason(&paid(&a_key).await), (402, Some("payment_invalid".into())));
    assert_eq!(paid(&b_key).await.status, 200);
    assert_eq!(reason(&paid(&b_key).await), (402, Some("insufficient_funds".into())));
    assert!(cli(&cfg, &["keys", "credit", &b, "1.00", "--idempotency-key", "inv-1"]).0);
    assert_eq!(paid(&b_key).await.status, 200, "the top-up holds for the next request");

    let (ok, _, err) = cli(&cfg, &["keys", "credit", &b, "2.00", "--idempotency-key", "inv-1"]);
    assert!(!ok && err.contains("\"inv-1\"") && err.contains("new idempotency key"), "{err}");
    let credit = |key_id: &str, body: &'static str| {
        let url = format!("{}/admin/keys/{key_id}/credit", r.admin);
        async move { send("POST", &url, &[("authorization", &bearer(ADMIN_TOKEN))], body).await }
    };
    let conflict = credit(&a, r#"{"amount":"1.00","idempotency_key":"inv-1"}"#).await;
    assert_eq!(conflict.status, 409, "{}", conflict.text());
    assert!(conflict.json()["error"].as_str().unwrap().contains(&b), "{}", conflict.text());
    let repeat = credit(&b, r#"{"amount":"1.00","idempotency_key":"inv-1"}"#).await;
    assert_eq!((repeat.status.as_u16(), &repeat.json()["applied"]), (200, &json!(false)));

    let whole = admin_get(&r.admin, "/admin/transactions?limit=10000").await;
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v["transactions"].as_array().unwrap().iter().map(|t| t["id"].as_i64().unwrap()).collect()
    };
    assert_eq!(ids(&whole).len(), 6, "two openings, one top-up, three paid requests: {whole}");
    let (mut paged, mut path) = (Vec::new(), "/admin/transactions?limit=2".to_owned());
    loop {
        let page = admin_get(&r.admin, &path).await;
        paged.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => path = format!("/admin/transactions?limit=2&before={next}"),
            None => break,
        }
    }
    assert_eq!(paged, ids(&whole));
}

// === migrations ===

async fn versions(url: &str) -> Vec<i32> {
    let c = sql_client(url).await;
    let rows = c.query("SELECT version FROM schema_migrations ORDER BY version", &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_at_once_migrate_once() {
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresLedger::connect(&url, opts()).await })
        })
        .collect();
    let mut ledgers = Vec::new();
    for task in tasks {
        ledgers.push(task.await.unwrap().expect("every replica starts"));
    }
    let all: Vec<i32> = (1..=SCHEMA_VERSION).collect();
    assert_eq!(versions(&url).await, all);
    // They all work on the one schema.
    let k = ledgers[0].create_key(None, Micros(7)).await.unwrap();
    assert_eq!(ledgers[3].key(&k.id).await.unwrap().unwrap().balance, Micros(7));

    // Starting again migrates nothing.
    drop(ledgers);
    drop(ledger(&url).await);
    assert_eq!(versions(&url).await, all);

    // A schema from a newer tollgate is refused, not clobbered.
    let c = sql_client(&url).await;
    c.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&(SCHEMA_VERSION + 1)]).await.unwrap();
    let err = PostgresLedger::connect(&url, opts()).await.unwrap_err();
    assert!(matches!(err, LedgerError::Other(_)), "{err}");
    assert!(err.to_string().contains("newer than this tollgate"), "{err}");
}

// === the schema ===

/// Table → column names of `schema`, applied to a new SQLite file and read back from
/// `sqlite_master` and `PRAGMA table_info`.
fn sqlite_columns(schema: &str) -> BTreeMap<String, BTreeSet<String>> {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("schema.db")).unwrap();
    conn.execute_batch(schema).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let mut columns = BTreeMap::new();
    for table in tables {
        let names: BTreeSet<String> = conn
            .prepare(&format!("PRAGMA table_info({table})"))
            .unwrap()
            .query_map([], |r| r.get(1))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        columns.insert(table, names);
    }
    columns
}

/// Table → column names of the database at `url`, from `information_schema.columns`.
async fn postgres_columns(url: &str) -> BTreeMap<String, BTreeSet<String>> {
    let c = sql_client(url).await;
    let sql =
        "SELECT table_name::text, column_name::text FROM information_schema.columns WHERE table_schema = 'public'";
    let mut columns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in c.query(sql, &[]).await.unwrap() {
        columns.entry(row.get(0)).or_default().insert(row.get(1));
    }
    columns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_schema_files_describe_the_same_tables_and_columns() {
    let sqlite = sqlite_columns(tollgate::ledger::sqlite::SCHEMA);
    let cluster = Cluster::spawn().await;
    let url = cluster.create_db().await;
    sql_client(&url).await.batch_execute(tollgate::ledger::postgres::SCHEMA).await.unwrap();
    let mut postgres = postgres_columns(&url).await;
    assert_eq!(sqlite.len(), 5, "{sqlite:?}");
    // The deliberate differences: PostgreSQL numbers keys for listings in creation
    // order (SQLite has its rowid for that), and renews leases on pending holds
    // (SQLite keeps open holds in memory).
    assert!(postgres.get_mut("keys").unwrap().remove("seq"), "{postgres:?}");
    assert!(postgres.get_mut("transactions").unwrap().remove("touched_at"), "{postgres:?}");
    assert_eq!(postgres, sqlite);
}

/// Migration 1 as the first databases got it, before migration 2's indexes.
const FIRST_MIGRATION_1: &str = r#"
    CREATE TABLE keys (
        -- Creation order, for listings (ids are random).
        seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        id          TEXT PRIMARY KEY,
        secret_hash BYTEA NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
        label       TEXT,
        balance     BIGINT NOT NULL CHECK (balance >= 0),
        revoked     BOOLEAN NOT NULL DEFAULT false,
        created_at  BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
    );

    CREATE TABLE transactions (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key_id          TEXT NOT NULL REFERENCES keys (id),
        kind            TEXT NOT NULL CHECK (kind IN ('credit', 'debit', 'refund')),
        amount          BIGINT NOT NULL CHECK (amount > 0),
        route           TEXT,
        request_id      TEXT,
        -- A debit is a hold: pending, then captured or released. Others have no status.
        status          TEXT CHECK (
            (kind = 'debit' AND status IS NOT NULL
                AND status IN ('pending', 'captured', 'released'))
            OR (kind <> 'debit' AND status IS NULL)),
        idempotency_key TEXT CHECK (idempotency_key IS NULL OR kind = 'credit'),
        created_at      BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
    );

    CREATE UNIQUE INDEX transactions_idempotency
        ON transactions (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX transactions_key_id ON transactions (key_id, id);
    CREATE INDEX transactions_key_created ON transactions (key_id, created_at);
    CREATE INDEX transactions_pending
        ON transactions (created_at) WHERE kind = 'debit' AND status = 'pending';

    -- Payer and nonce are stored lower-cased: hex is case-insensitive.
    CREATE TABLE x402_nonces (
        payer        TEXT NOT NULL,
        nonce        TEXT NOT NULL,
        valid_before BIGINT NOT NULL,
        PRIMARY KEY (payer, nonce)
    );
    CREATE INDEX x402_nonces_valid_before ON x402_nonces (valid_before);

    CREATE TABLE settlements (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        rail       TEXT NOT NULL,
        payer      TEXT NOT NULL,
        amount     BIGINT NOT NULL CHECK (amount >= 0),
        asset      TEXT NOT NULL,
        network    TEXT NOT NULL,
        tx_hash    TEXT NOT NULL,
        route      TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_at BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
    );

    -- One row, rewritten by ping: readiness proves the database is writable (a
    -- read-only standby after a failover is not ready).
    CREATE TABLE health (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        checked_at BIGINT NOT NULL
    );
"#;

/// Columns (with type, nullability and default) and index definitions of `url`.
async fn catalog(url: &str) -> Vec<String> {
    let c = sql_client(url).await;
    let columns = "SELECT format('%s.%s %s null=%s default=%s', table_name, column_name, data_type, is_nullable,
                                 coalesce(column_default, '-'))
                   FROM information_schema.columns WHERE table_schema = 'public'";
    let indexes = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'";
    let mut all = Vec::new();
    for sql in [columns, indexes] {
        all.extend(c.query(sql, &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)));
    }
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_the_first_migration_upgrades_to_the_schema() {
    let cluster = Cluster::spawn().await;
    let fresh = cluster.create_db().await;
    drop(ledger(&fresh).await);
    let old = cluster.create_db().await;
    let c = sql_client(&old).await;
    c.batch_execute(FIRST_MIGRATION_1).await.unwrap();
    c.batch_execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO schema_migrations (version) VALUES (1);",
    )
    .await
    .unwrap();
    drop(ledger(&old).await);
    let all: Vec<i32> = (1..=SCHEMA_VERSION).collect();
    assert_eq!(versions(&old).await, all);
    let want = catalog(&fresh).await;
    assert!(want.iter().any(|d| d.contains("transactions_key_created_id")), "{want:#?}");
    assert!(want.iter().any(|d| d.starts_with("transactions.touched_at bigint")), "{want:#?}");
    assert_eq!(catalog(&old).await, want);

    // As the versions before metered captures left a database: migration 3 only.
    let second = cluster.create_db().await;
    let c = sql_client(&second).await;
    c.batch_execute(FIRST_MIGRATION_1).await.unwrap();
    c.batch_execute(tollgate::ledger::postgres::MIGRATIONS[1]).await.unwrap();
    c.batch_execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO schema_migrations (version) VALUES (1), (2);",
    )
    .await
    .unwrap();
    drop(ledger(&second).await);
    assert_eq!(versions(&second).await, all);
    assert_eq!(catalog(&second).await, want);

    // schema.sql is the schema: the migrations after it change nothing.
    let plain = cluster.create_db().await;
    sql_client(&plain).await.batch_execute(tollgate::ledger::postgres::SCHEMA).await.unwrap();
    let want: Vec<String> = want.into_iter().filter(|d| !d.contains("schema_migrations")).collect();
    assert_eq!(catalog(&plain).await, want);
}

// === the deploy example ===

#[test]
fn deploy_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tollgate.toml");
    let out = Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .env("TOLLGATE_ADMIN_TOKEN", "an-admin-token-of-32-characters!")
        .env("TOLLGATE_DB_PASSWORD", "secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok (1 upstream(s), 2 route(s), 1 priced)"), "{stdout}");
}
