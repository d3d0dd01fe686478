//! Black-box tests of the built `tollgate` binary: the keys CLI and crash safety.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

fn write_config(dir: &std::path::Path, upstream: &str, port: u16, admin_port: u16) -> std::path::PathBuf {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout = \"2s\"\n\n\
[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{ADMIN_TOKEN}\"\n\n\
[ledger]\npath = \"{db}\"\n\n[log]\nfilter = \"warn\"\n\n\
[[upstream]]\nname = \"api\"\nurl = \"{upstream}\"\ntimeout = \"5s\"\n\n\
[[route]]\nname = \"chat\"\nupstream = \"api\"\npath = \"/v1/*\"\nprice = \"0.002\"\naccept = [\"credits\"]\n",
        db = dir.join("ledger.db").display()
    );
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn keys_cli_creates_credits_shows_lists_and_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "http://127.0.0.1:9", free_port(), free_port());

    keys_cli_round_trip(&cfg);
}

async fn wait_healthy(admin: &str) {
    for _ in 0..200 {
        if let Ok(Ok(res)) =
            tokio::time::timeout(Duration::from_millis(500), client().get(format!("{admin}/healthz").parse().unwrap()))
                .await
        {
            if res.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway did not become healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_paid_load_leaves_the_ledger_consistent() {
    let up = ok_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let cfg = write_config(dir.path(), &up.url(), port, admin_port);
    let (ok, out, err) = cli(&cfg, &["keys", "create", "--balance", "10", "--json"]);
    assert!(ok, "{err}");
    let k = parse_json(&out);
    let (id, key) = (k["id"].as_str().unwrap().to_owned(), k["key"].as_str().unwrap().to_owned());
    let admin_base = format!("http://127.0.0.1:{admin_port}");

    let spawn = || {
        Proc(
            Command::new(binary())
                .args(["run", "--config"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut gw = spawn();
    wait_healthy(&admin_base).await;

    let served = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://127.0.0.1:{port}/v1/x");
    let auth = format!("Bearer {key}");
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (served, stop, url, auth) = (served.clone(), stop.clone(), url.clone(), auth.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let req = http::Request::get(&url).header("authorization", &auth).body(Default::default()).unwrap();
                match tokio::time::timeout(Duration::from_secs(5), client().request(req)).await {
                    Ok(Ok(res)) if res.status() == 200 => {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ok(res)) => panic!("unexpected status {}", res.status()),
                    _ => break, // the gateway died under us
                }
            }
        }));
    }
    // Kill once real paid traffic is flowing, mid-load (bounded: 20 s at most).
    for _ in 0..2000 {
        if served.load(Ordering::SeqCst) >= 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.0.kill().unwrap(); // SIGKILL
    gw.0.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let client_200s = served.load(Ordering::SeqCst);
    assert!(client_200s >= 150, "load was flowing: {client_200s}");

    let _gw2 = spawn();
    wait_healthy(&admin_base).await;
    let r = send(
        "GET",
        &format!("{admin_base}/admin/transactions?key={id}&limit=10000"),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        "",
    )
    .await;
    let txs = r.json()["transactions"].as_array().unwrap().clone();
    let micros =
        |t: &serde_json::Value| tollgate::money::Micros::parse(t["amount"].as_str().unwrap()).unwrap().get() as i64;
    let sum = |kind: &str| txs.iter().filter(|t| t["kind"] == kind).map(micros).sum::<i64>();
    let captured = txs.iter().filter(|t| t["kind"] == "debit" && t["status"] == "captured").count();
    let pending = txs.iter().filter(|t| t["status"] == "pending").count();
    let r = send(
        "GET",
        &format!("{admin_base}/admin/keys/{id}"),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        "",
    )
    .await;
    let balance = tollgate::money::Micros::parse(r.json()["balance"].as_str().unwrap()).unwrap().get() as i64;

    assert_eq!(pending, 0, "restart released every abandoned hold");
    assert_eq!(balance, sum("credit") - sum("debit") + sum("refund"), "transactions explain the balance");
    assert_eq!(balance, 10_000_000 - 2_000 * captured as i64, "only captured debits cost money");
    assert!(captured >= client_200s, "every paid response was charged: {captured} < {client_200s}");
    assert!(captured <= up.hits(), "nothing charged that the upstream did not serve: {captured} > {}", up.hits());
}

/// `tollgate keys revoke` / `credit` run while the gateway runs (another process on the
/// same SQLite file): the very next request sees them, with no wait. The CLI and the
/// admin API refuse an idempotency key reused for another top-up alike, and the admin
/// API pages through every transaction, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_changes_hold_for_the_next_request_of_a_running_gateway() {
    let up = ok_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let cfg = write_config(dir.path(), &up.url(), port, admin_port);
    let create = |balance: &str| {
        let (ok, out, err) = cli(&cfg, &["keys", "create", "--balance", balance, "--json"]);
        assert!(ok, "{err}");
        let k = parse_json(&out);
        (k["id"].as_str().unwrap().to_owned(), k["key"].as_str().unwrap().to_owned())
    };
    let (a, a_key) = create("10");
    let (b, b_key) = create("0.002");
    let _gw = Proc(Command::new(binary()).args(["run", "--config"]).arg(&cfg).stdout(Stdio::null()).spawn().unwrap());
    let admin_base = format!("http://127.0.0.1:{admin_port}");
    wait_healthy(&admin_base).await;
    let url = format!("http://127.0.0.1:{port}/v1/x");
    let paid = |key: &str| {
        let (url, auth) = (url.clone(), format!("Bearer {key}"));
        async move { send("GET", &url, &[("authorization", &auth)], "").await }
    };
    let admin_auth = format!("Bearer {ADMIN_TOKEN}");
    let admin = |method: &'static str, path: String, body: &'static str| {
        let (url, auth) = (format!("{admin_base}{path}"), admin_auth.clone());
        async move { send(method, &url, &[("authorization", &auth), ("content-type", "application/json")], body).await }
    };

    assert_eq!(paid(&a_key).await.status, 200);
    let (ok, _, err) = cli(&cfg, &["keys", "revoke", &a]);
    assert!(ok, "{err}");
    let refused = paid(&a_key).await;
    assert_eq!((refused.status.as_u16(), refused.json()["reason"].as_str()), (402, Some("payment_invalid")));

    assert_eq!(paid(&b_key).await.status, 200);
    let short = paid(&b_key).await;
    assert_eq!((short.status.as_u16(), short.json()["reason"].as_str()), (402, Some("insufficient_funds")));
    let (ok, _, err) = cli(&cfg, &["keys", "credit", &b, "1.00", "--idempotency-key", "inv-1"]);
    assert!(ok, "{err}");
    assert_eq!(paid(&b_key).await.status, 200, "the top-up holds for the next request");

    // The same idempotency key for another top-up: refused by the CLI (exit 1) and the
    // admin API (409) alike, changing nothing; the same top-up again is harmless.
    for (key_id, amount) in [(&b, "2.00"), (&a, "1.00")] {
        let (ok, out, err) = cli(&cfg, &["keys", "credit", key_id, amount, "--idempotency-key", "inv-1", "--json"]);
        assert!(!ok && out.is_empty(), "{out}");
        assert!(err.contains("\"inv-1\"") && err.contains(&b) && err.contains("new idempotency key"), "{err}");
        let body = if key_id == &b {
            r#"{"amount":"2.00","idempotency_key":"inv-1"}"#
        } else {
            r#"{"amount":"1.00","idempotency_key":"inv-1"}"#
        };
        let r = admin("POST", format!("/admin/keys/{key_id}/credit"), body).await;
        assert_eq!(r.status, 409, "{}", r.text());
        assert_eq!(r.json()["error"].as_str(), Some(err.trim().trim_start_matches("error: ")));
    }
    let (ok, out, err) = cli(&cfg, &["keys", "credit", &b, "1.00", "--idempotency-key", "inv-1", "--json"]);
    assert!(ok, "{err}");
    let repeat =
        admin("POST", format!("/admin/keys/{b}/credit"), r#"{"amount":"1.00","idempotency_key":"inv-1"}"#).await;
    assert_eq!(repeat.status, 200);
    assert_eq!(parse_json(&out), repeat.json(), "the CLI prints what the admin API answers");
    assert_eq!(repeat.json()["applied"], false);
    assert_eq!(repeat.json()["balance"], "0.998");

    // Pages of two, following `next`, read every row once, in the order of one big page.
    let whole = admin("GET", "/admin/transactions?limit=10000".into(), "").await.json();
    assert!(whole.get("next").is_none(), "{whole}");
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v["transactions"].as_array().unwrap().iter().map(|t| t["id"].as_i64().unwrap()).collect()
    };
    let all = ids(&whole);
    assert_eq!(all.len(), 6, "two openings, one top-up, three paid requests: {whole}");
    let (mut paged, mut next) = (Vec::new(), String::new());
    loop {
        let path = if next.is_empty() {
            "/admin/transactions?limit=2".to_owned()
        } else {
            format!("/admin/transactions?limit=2&before={next}")
        };
        let page = admin("GET", path, "").await.json();
        paged.extend(ids(&page));
        match page["next"].as_str() {
            Some(n) => next = n.to_owned(),
            None => break,
        }
    }
    assert_eq!(paged, all);
    for bad in ["before=nope", "before=", "limit=0", "limit=10001"] {
        let r = admin("GET", format!("/admin/transactions?{bad}"), "").await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
}
