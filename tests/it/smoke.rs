use crate::support::*;

#[tokio::test]
async fn free_route_forwards_and_priced_route_asks_for_payment() {
    let up = ok_upstream().await;
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{}\"\n\n[[route]]\nname = \"docs\"\nupstream = \"api\"\npath = \"/docs/*\"\nfree = true\n\n\
[[route]]\nname = \"chat\"\nupstream = \"api\"\npath = \"/v1/*\"\nprice = \"0.002\"\naccept = [\"credits\"]\n",
        up.url()
    ))
    .await;
    let r = get(&gw.url("/docs/a"), &[]).await;
    assert_eq!(r.status, 200);
    let r = get(&gw.url("/v1/chat"), &[]).await;
    assert_eq!(r.status, 402);
    assert_eq!(r.json()["reason"], "payment_missing");
    assert_eq!(up.hits(), 1);
    gw.shutdown().await;
}

/// A streaming response counts as in flight until its body is done, not just until
/// its head was sent.
#[tokio::test]
async fn inflight_gauge_covers_the_whole_streamed_body() {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let up = upstream(move |_req| {
        let rx = rx.lock().unwrap().take().expect("one request");
        async move {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(http_body::Frame::data(b)), rx))
            });
            http::Response::new(http_body_util::StreamBody::new(stream).map_err(|e| match e {}).boxed_unsync())
        }
    })
    .await;
    let gw = gateway(&format!(
        "[[upstream]]\nname = \"api\"\nurl = \"{}\"\n\n[[route]]\nname = \"all\"\nupstream = \"api\"\npath = \"/*\"\nfree = true\n",
        up.url()
    ))
    .await;
    let inflight = |text: String| {
        text.lines().find_map(|l| l.strip_prefix("tollgate_inflight_requests ")).unwrap().trim().to_owned()
    };
    let req = http::Request::get(gw.url("/stream")).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    let res = client().request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first");
    assert_eq!(inflight(get(&gw.admin_url("/metrics"), &[]).await.text()), "1", "head sent, body still streaming");
    drop(tx);
    while body.frame().await.is_some() {}
    // The gateway drops the body right after its last frame; give it a moment, bounded.
    let mut last = String::new();
    for _ in 0..100 {
        last = inflight(get(&gw.admin_url("/metrics"), &[]).await.text());
        if last == "0" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(last, "0");
    gw.shutdown().await;
}

/// A second gateway on the same SQLite ledger is refused: it would release the first
/// one's holds as abandoned. After the first stops, the file is free again.
#[tokio::test]
async fn an_sqlite_ledger_serves_one_gateway() {
    let up = ok_upstream().await;
    let rest = format!("[[upstream]]\nname = \"api\"\nurl = \"{}\"\n", up.url());
    let mut first = gateway(&rest).await;
    let text = std::fs::read_to_string(&first.config_path).unwrap();
    let cfg = tollgate::config::Config::parse(&text, |_| None).unwrap();
    let ledger = tollgate::app::open_ledger(&cfg).await.unwrap();
    let err = tollgate::app::start(cfg.clone(), None, ledger.clone(), tollgate::app::default_rails())
        .await
        .expect_err("second gateway on the same ledger");
    assert!(err.0[0].contains("in use by another running tollgate"), "{err:?}");
    // Stop the first gateway but keep its temp dir (and ledger file).
    first.running.take().unwrap().shutdown().await;
    let second = tollgate::app::start(cfg, None, ledger, tollgate::app::default_rails()).await.unwrap();
    second.shutdown().await;
}

/// Without `admin.token` the admin API is off, and says how to turn it on; the probes
/// and metrics still answer.
#[tokio::test]
async fn admin_api_without_a_token_is_disabled_and_says_how_to_enable_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[ledger]\npath = \"{}\"\n",
        db.display()
    );
    let gw = start_text(dir, &text, tollgate::app::default_rails()).await;
    for (method, path) in [("POST", "/admin/keys"), ("POST", "/admin/reload"), ("GET", "/admin/transactions")] {
        let r = send(method, &gw.admin_url(path), &[("authorization", "Bearer anything-at-all-123")], "{}").await;
        assert_eq!(r.status, 403, "{method} {path}");
        assert!(r.json()["error"].as_str().unwrap().contains("set admin.token"), "{}", r.text());
    }
    assert_eq!(get(&gw.admin_url("/healthz"), &[]).await.status, 200);
    assert_eq!(get(&gw.admin_url("/metrics"), &[]).await.status, 200);
    gw.shutdown().await;
}
