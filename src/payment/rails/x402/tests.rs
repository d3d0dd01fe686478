//! Unit tests of the x402 rail: documents without null, and property tests of the
//! payment header parser.

use super::*;

/// Paths of every `null` in `v`.
fn nulls(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Null => out.push(at.to_owned()),
        Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| nulls(v, &format!("{at}[{i}]"), out)),
        Value::Object(m) => m.iter().for_each(|(k, v)| nulls(v, &format!("{at}.{k}"), out)),
        _ => {}
    }
}

fn header_json(h: Option<(HeaderName, HeaderValue)>) -> Value {
    let (_, v) = h.expect("a settlement header");
    serde_json::from_slice(&STANDARD.decode(v.as_bytes()).unwrap()).unwrap()
}

#[test]
fn no_x402_document_tollgate_writes_contains_null() {
    let offer = |network: &str| {
        let raw = config::RawOffer {
            network: network.into(),
            asset: "0x036CbD53842c5426634e7929541eC2318f3dCF7e".into(),
            asset_name: "USDC".into(),
            asset_version: "2".into(),
            pay_to: Some("0x209693Bc6afc0C5328bA36FaF03C514EF312287C".into()),
        };
        let mut p = crate::config::values::Problems::default();
        let cfg = OfferConfig::parse("x402", &raw, "", &mut p);
        assert!(p.is_empty(), "{p:?}");
        Offer::new(&cfg.unwrap())
    };
    let sepolia = offer("eip155:84532");
    // A chain without a v1 name: its v1 requirement is absent, never null.
    let unnamed = offer("eip155:999999");
    let resource = ResourceInfo {
        url: "https://api.test/paid/x".into(),
        description: "Access to route paid".into(),
        mime_type: "application/json".into(),
    };
    let offers = [sepolia.clone(), unnamed];
    let (v1, v2) = requirements(&offers, Micros(10_000), resource.clone(), 60, "payment_missing");
    assert_eq!(v1.len(), 1);
    let payload = serde_json::json!({"x402Version": 1});
    let v1_req = Requirements::V1(sepolia.v1(Micros(10_000), &resource, 60).unwrap());
    let v2_req = Requirements::V2(sepolia.v2(Micros(10_000), 60));
    let facilitator = |version, r| {
        serde_json::to_value(FacilitatorRequest {
            x402_version: version,
            payment_payload: &payload,
            payment_requirements: r,
        })
        .unwrap()
    };
    // As tollgate writes them: a success (payer from the facilitator or ours), a
    // refusal, and a facilitator that answered with neither payer nor reason.
    let settled = |success, error_reason: Option<&str>, payer: Option<&str>| SettleResponse {
        success,
        error_reason: error_reason.map(str::to_owned),
        payer: payer.map(str::to_owned),
        transaction: String::new(),
        network: "eip155:84532".into(),
    };
    let docs = [
        ("v1 accepts", serde_json::to_value(&v1).unwrap()),
        ("PAYMENT-REQUIRED", serde_json::to_value(&v2).unwrap()),
        ("v1 facilitator request", facilitator(1, &v1_req)),
        ("v2 facilitator request", facilitator(2, &v2_req)),
        ("v1 settled", header_json(settlement_header(1, &settled(true, None, Some("0xf39F"))))),
        ("v2 refused", header_json(settlement_header(2, &settled(false, Some("insufficient_funds"), None)))),
        ("bare", header_json(settlement_header(2, &settled(false, None, None)))),
    ];
    for (what, doc) in docs {
        let mut found = Vec::new();
        nulls(&doc, "$", &mut found);
        assert!(found.is_empty(), "{what} has null at {found:?}: {doc}");
    }
    // The optional members are left out, not emptied.
    let v1_json = serde_json::to_value(&v1[0]).unwrap();
    assert!(v1_json.get("outputSchema").is_none(), "{v1_json}");
    let bare = header_json(settlement_header(2, &settled(false, None, None)));
    assert!(bare.get("errorReason").is_none() && bare.get("payer").is_none(), "{bare}");
}

// === properties (the payment header parser's fuzz targets, run by `cargo test`) ===

use proptest::prelude::*;

/// Header values that are base64 of JSON close to a payment, and raw bytes.
fn payment_header() -> impl Strategy<Value = Vec<u8>> {
    let json_like = prop_oneof![
        Just(r#"{"x402Version":1,"scheme":"exact","network":"base-sepolia","payload":{}}"#.to_owned()),
        Just(r#"{"x402Version":2,"accepted":{},"payload":{"signature":"0x","authorization":{}}}"#.to_owned()),
        "\\{\"x402Version\":[0-9]{1,3}(,\"[a-z]{1,8}\":(null|[0-9]{1,20}|\"[ -~]{0,20}\"|\\{\\}|\\[\\]))*\\}",
        any::<String>(),
    ];
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..400), json_like.prop_map(|j| STANDARD.encode(j).into_bytes()),]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Any header bytes in either payment header: a decoded payment or a refusal
    /// with a reason, never a panic; the payer hint never panics either.
    #[test]
    fn any_payment_header_gets_a_decision(v in payment_header(), v2 in any::<bool>()) {
        let mut headers = HeaderMap::new();
        let name = if v2 { PAYMENT_SIGNATURE } else { X_PAYMENT };
        if let Ok(value) = HeaderValue::from_bytes(&v) {
            headers.insert(name, value);
            match decode(&headers) {
                Ok(_) => {}
                Err(d) => prop_assert!(matches!(
                    d.reason,
                    Reason::PaymentMalformed | Reason::PaymentMissing | Reason::PaymentMethodUnsupported
                ), "{:?}", d.reason),
            }
            let _ = signed_from(&headers);
        }
    }
}
