//! Micro-benchmark of the x402 local checks every payment goes through before any
//! network call: base64 + JSON decoding, EIP-712 hashing and secp256k1 recovery.
//!
//! `cargo bench --bench x402`

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::payment::rails::x402::types::PaymentPayloadV1;
use tollgate::payment::rails::x402::verify::{self, Expected};

/// The dev-key vector of `shared/spec/x402-vectors.json` and a time inside its window.
const PAYLOAD: &str = r#"{"x402Version":1,"scheme":"exact","network":"base-sepolia","payload":{"signature":"0xdc53a4a579de989368a0fae2ef2172ff2f474b4297013f865d171239f17ef4c3157b4b4030f1bebc53d55ace15c2377dff501a60e1e56c291f1000d6e78f082f1b","authorization":{"from":"0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266","to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C","value":"10000","validAfter":"1740672089","validBefore":"1740672154","nonce":"0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"}}}"#;
const NOW: u64 = 1_740_672_100;

fn local_checks(c: &mut Criterion) {
    let header = STANDARD.encode(PAYLOAD);
    let domain =
        verify::domain("USDC", "2", 84532, verify::address("0x036CbD53842c5426634e7929541eC2318f3dCF7e").unwrap());
    let want = Expected {
        pay_to: verify::address("0x209693Bc6afc0C5328bA36FaF03C514EF312287C").unwrap(),
        amount: alloy_primitives::U256::from(10_000u64),
        exact_amount: false,
        domain: &domain,
    };
    c.bench_function("x402_decode_and_check_eoa_payment", |b| {
        b.iter(|| {
            let bytes = STANDARD.decode(header.as_bytes()).unwrap();
            let p: PaymentPayloadV1 = serde_json::from_slice(&bytes).unwrap();
            let auth = verify::parse(&p.payload).unwrap();
            verify::check(&auth, &want, NOW).unwrap();
        })
    });
}

criterion_group!(benches, local_checks);
criterion_main!(benches);
