mod support;
use support::*;

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
