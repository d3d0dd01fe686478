//! Micro-benchmarks of the per-request work: route match, credential parsing, the
//! credits hold+capture on a real SQLite ledger, 402 rendering, metrics encoding.
//!
//! `cargo bench --bench hot_path`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use tollgate::config::Config;
use tollgate::ledger::sqlite::{SqliteLedger, SqliteOptions};
use tollgate::ledger::{HoldOutcome, HoldRequest, Ledger, SecretHash};
use tollgate::metrics::Metrics;
use tollgate::money::Micros;
use tollgate::payment::{ChallengePart, Denial, Reason};
use tollgate::rejection::{PaymentRefusal, Rejection, Responder};
use tollgate::route::RouteTable;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[[upstream]]
name = "api"
url = "http://127.0.0.1:3000"
[[route]]
name = "models"
upstream = "api"
path = "/v1/models"
free = true
[[route]]
name = "embeddings"
upstream = "api"
path = "/v1/embeddings/*"
price = "0.0001"
accept = ["credits"]
[[route]]
name = "chat"
upstream = "api"
path = "/v1/chat/*"
methods = ["POST"]
price = "0.002"
accept = ["credits"]
[[route]]
name = "docs"
upstream = "api"
path = "/*"
free = true
"#;

fn config() -> Config {
    Config::parse(CONFIG, |_| None).unwrap()
}

fn route_match(c: &mut Criterion) {
    let table = RouteTable::new(&config());
    c.bench_function("route_match/prefix_third", |b| {
        b.iter(|| table.resolve(None, &Method::POST, std::hint::black_box("/v1/chat/completions")).unwrap())
    });
    c.bench_function("route_match/normalised_path", |b| {
        b.iter(|| table.resolve(None, &Method::POST, std::hint::black_box("/v1/%63hat/../chat/completions")).unwrap())
    });
}

fn credential_parsing(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    let key = format!("Bearer tg_live_{}", "0123456789abcdef0123456789abcdef01234567");
    headers.insert("authorization", HeaderValue::from_str(&key).unwrap());
    c.bench_function("credential/bearer_extract_and_hash", |b| {
        b.iter(|| {
            let v = headers.get("authorization").unwrap().to_str().unwrap();
            let k = v.strip_prefix("Bearer ").unwrap();
            SecretHash::of(std::hint::black_box(k))
        })
    });
}

fn credits_check(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ledger: Arc<dyn Ledger> =
        Arc::new(SqliteLedger::open(&dir.path().join("bench.db"), SqliteOptions::default()).unwrap());
    let key = rt.block_on(ledger.create_key(None, Micros(u64::MAX / 4))).unwrap();
    let secret = SecretHash::of(&key.key);
    c.bench_function("credits/hold_and_capture_sqlite", |b| {
        b.to_async(&rt).iter(|| {
            let ledger = ledger.clone();
            async move {
                let out = ledger
                    .authorize(HoldRequest {
                        secret,
                        amount: Micros(2_000),
                        route: "chat",
                        request_id: "01JBENCH",
                        spend_cap: None,
                    })
                    .await
                    .unwrap();
                let HoldOutcome::Held { hold, .. } = out else { panic!("{out:?}") };
                ledger.capture(hold, Micros(2_000), None).await.unwrap();
            }
        })
    });
}

/// The in-memory part of a hold on the SQLite ledger (what `authorize` costs once the
/// key is cached): take a hold from the book, then drop it.
fn book_hold(c: &mut Criterion) {
    use tollgate::ledger::holds::{Attempt, Book};
    let book = Book::default();
    book.add_ids(1..i64::MAX);
    let secret = SecretHash::of("tg_live_bench");
    book.load(secret, "key_bench", false, Micros(u64::MAX / 4));
    c.bench_function("credits/hold_in_memory_sqlite", |b| {
        b.iter(|| {
            let Attempt::Decided(HoldOutcome::Held { hold, .. }) =
                book.try_hold(&secret, Micros(2_000), "chat", "01JBENCH", 0)
            else {
                panic!("no hold")
            };
            book.close(hold, None);
        })
    });
}

fn render_402(c: &mut Criterion) {
    let responder = Responder {
        public_base: "https://api.example.com",
        request_id: "01JBENCHREQUEST0000000000",
        instance: "/v1/chat/completions",
        html: false,
    };
    c.bench_function("render_402/problem_json", |b| {
        b.iter(|| {
            let denial = Denial::new(Reason::PaymentMissing, "Route chat costs 0.002 USD per request.");
            let mut part = ChallengePart::default();
            part.body.insert("credits".into(), serde_json::json!({"header": "Authorization", "scheme": "Bearer"}));
            let refusal = PaymentRefusal {
                denial,
                route: "chat".into(),
                price: Micros(2_000),
                topup_url: Some("https://billing.example.com/topup".into()),
                parts: vec![part],
            };
            Rejection::Payment(Box::new(refusal)).into_response(&responder)
        })
    });
}

fn metrics_encoding(c: &mut Criterion) {
    let m = Metrics::new();
    for r in ["chat", "embeddings", "models", "docs"] {
        let h = m.for_route(r);
        h.forwarded.inc();
        h.duration.observe(0.001);
    }
    c.bench_function("metrics/encode_4_routes", |b| b.iter(|| m.encode()));
}

criterion_group!(benches, route_match, credential_parsing, credits_check, book_hold, render_402, metrics_encoding);
criterion_main!(benches);
