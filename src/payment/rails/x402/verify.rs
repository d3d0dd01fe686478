//! Local checks of an "exact" EVM payment, done before any network call: the cheap
//! refusals that protect the facilitator and the operator.
//!
//! The payment is an EIP-3009 `transferWithAuthorization` signed as EIP-712 typed data
//! (x402 `specs/schemes/exact/scheme_exact_evm.md`). Hashing uses alloy's `sol!` struct
//! and `Eip712Domain`; recovery uses libsecp256k1 (the `secp256k1` crate). The checks are the
//! reference facilitator's: recipient, amount, validity window (with a 6 s margin for
//! the settlement transaction to land) and, for 65-byte EOA signatures, that the
//! signature recovers to `from`. Longer signatures (ERC-1271 / ERC-6492 smart wallets)
//! can only be checked on chain, so they are left to the facilitator.

use std::borrow::Cow;

use alloy_primitives::{Address, Signature, B256, U256};
use alloy_sol_types::{sol, Eip712Domain, SolStruct};

use super::types::{ExactEvmPayload, WireAuthorization};

sol! {
    /// EIP-3009 `TransferWithAuthorization`, the typed data an "exact" EVM payment signs.
    #[derive(Debug, PartialEq, Eq)]
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// An authorization must stay valid this long after it is checked, so that the
/// settlement transaction can still land (the reference facilitators use 6 s).
pub const VALID_BEFORE_MARGIN: u64 = 6;

/// The EIP-712 domain of a token: `EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)`.
pub fn domain(name: &str, version: &str, chain_id: u64, verifying_contract: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some(Cow::Owned(name.to_owned())),
        Some(Cow::Owned(version.to_owned())),
        Some(U256::from(chain_id)),
        Some(verifying_contract),
        None,
    )
}

/// The EIP-712 digest: `keccak256(0x1901 ‖ domainSeparator ‖ hashStruct(message))`.
pub fn signing_hash(domain: &Eip712Domain, transfer: &TransferWithAuthorization) -> B256 {
    transfer.eip712_signing_hash(domain)
}

/// The signature as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayerSignature {
    /// 65 bytes r ‖ s ‖ v: an externally owned account, recoverable locally.
    Eoa(Signature),
    /// Anything longer: a smart wallet (ERC-1271, ERC-6492), checked only on chain.
    Contract(Vec<u8>),
    /// Well-formed hex that cannot be a valid signature (too short, bad `v`).
    Unusable(&'static str),
}

/// A decoded payment: the typed-data message and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub transfer: TransferWithAuthorization,
    pub signature: PayerSignature,
}

/// Why a payload could not be decoded (→ `payment_malformed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Malformed {
    pub field: &'static str,
    pub problem: &'static str,
}

fn malformed(field: &'static str, problem: &'static str) -> Malformed {
    Malformed { field, problem }
}

/// Why a well-formed payment is refused without asking the facilitator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalError {
    #[error("the authorization pays {got}, not {want}")]
    Recipient { got: Address, want: Address },
    #[error("the authorization's value {got} does not match the price {want}")]
    Amount { got: U256, want: U256 },
    #[error("the authorization expires at {valid_before}, less than {VALID_BEFORE_MARGIN} s after now ({now})")]
    Expired { valid_before: U256, now: u64 },
    #[error("the authorization is valid only from {valid_after}; now is {now}")]
    NotYetValid { valid_after: U256, now: u64 },
    #[error("the signature is invalid: {0}")]
    Signature(&'static str),
    #[error("the signature was made by {recovered}, not by the payer {from}")]
    WrongSigner { recovered: Address, from: Address },
}

impl LocalError {
    /// A short machine-readable cause, in the vocabulary facilitators use.
    pub fn cause(&self) -> &'static str {
        match self {
            LocalError::Recipient { .. } => "invalid_exact_evm_recipient_mismatch",
            LocalError::Amount { .. } => "invalid_exact_evm_authorization_value",
            LocalError::Expired { .. } => "invalid_exact_evm_payload_authorization_valid_before",
            LocalError::NotYetValid { .. } => "invalid_exact_evm_payload_authorization_valid_after",
            LocalError::Signature(_) | LocalError::WrongSigner { .. } => "invalid_exact_evm_payload_signature",
        }
    }
}

/// Decodes the wire strings strictly: `0x` + 40 hex addresses, decimal uint256 values,
/// a `0x` + 64 hex nonce, a `0x`-prefixed hex signature.
pub fn parse(payload: &ExactEvmPayload) -> Result<Authorization, Malformed> {
    let a: &WireAuthorization = &payload.authorization;
    let transfer = TransferWithAuthorization {
        from: address(&a.from).ok_or_else(|| malformed("authorization.from", "expected 0x and 40 hex digits"))?,
        to: address(&a.to).ok_or_else(|| malformed("authorization.to", "expected 0x and 40 hex digits"))?,
        value: uint(&a.value).ok_or_else(|| malformed("authorization.value", "expected a decimal uint256"))?,
        validAfter: uint(&a.valid_after)
            .ok_or_else(|| malformed("authorization.validAfter", "expected a decimal uint256"))?,
        validBefore: uint(&a.valid_before)
            .ok_or_else(|| malformed("authorization.validBefore", "expected a decimal uint256"))?,
        nonce: bytes32(&a.nonce).ok_or_else(|| malformed("authorization.nonce", "expected 0x and 64 hex digits"))?,
    };
    let raw = payload
        .signature
        .strip_prefix("0x")
        .and_then(|h| hex::decode(h).ok())
        .filter(|b| !b.is_empty())
        .ok_or_else(|| malformed("signature", "expected 0x and an even number of hex digits"))?;
    let signature = match raw.len() {
        // On chain, USDC's ECRecover accepts v = 27 or 28 only.
        65 if matches!(raw[64], 27 | 28) => match Signature::from_raw(&raw) {
            Ok(sig) => PayerSignature::Eoa(sig),
            Err(_) => PayerSignature::Unusable("not an r ‖ s ‖ v signature"),
        },
        65 => PayerSignature::Unusable("v must be 27 or 28"),
        n if n < 65 => PayerSignature::Unusable("shorter than 65 bytes"),
        _ => PayerSignature::Contract(raw),
    };
    Ok(Authorization { transfer, signature })
}

/// What the payment must be, from the offer it claims to pay.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub pay_to: Address,
    pub amount: U256,
    /// v2 requires `value == amount`; v1 accepts `value >= maxAmountRequired`.
    pub exact_amount: bool,
    pub domain: &'a Eip712Domain,
}

/// Recipient, amount, validity window at `now` (unix seconds), then the signature.
pub fn check(auth: &Authorization, want: &Expected<'_>, now: u64) -> Result<(), LocalError> {
    let t = &auth.transfer;
    if t.to != want.pay_to {
        return Err(LocalError::Recipient { got: t.to, want: want.pay_to });
    }
    let amount_ok = if want.exact_amount { t.value == want.amount } else { t.value >= want.amount };
    if !amount_ok {
        return Err(LocalError::Amount { got: t.value, want: want.amount });
    }
    if t.validBefore < U256::from(now).saturating_add(U256::from(VALID_BEFORE_MARGIN)) {
        return Err(LocalError::Expired { valid_before: t.validBefore, now });
    }
    if t.validAfter > U256::from(now) {
        return Err(LocalError::NotYetValid { valid_after: t.validAfter, now });
    }
    match &auth.signature {
        PayerSignature::Eoa(sig) => {
            let recovered = recover(want.domain, t, sig)?;
            if recovered != t.from {
                return Err(LocalError::WrongSigner { recovered, from: t.from });
            }
            Ok(())
        }
        PayerSignature::Unusable(why) => Err(LocalError::Signature(why)),
        PayerSignature::Contract(_) => Ok(()),
    }
}

/// The address that signed `transfer` in `domain`.
pub fn recover(
    domain: &Eip712Domain,
    transfer: &TransferWithAuthorization,
    sig: &Signature,
) -> Result<Address, LocalError> {
    // A high-s signature is the malleated twin of a valid one; the token contract
    // refuses it, so settling it would fail after the upstream was served.
    if sig.normalize_s().is_some() {
        return Err(LocalError::Signature("s is in the upper half of the curve order"));
    }
    recover_prehash(&signing_hash(domain, transfer), sig).ok_or(LocalError::Signature("no public key recovers from it"))
}

/// ECDSA public-key recovery with libsecp256k1 (the `secp256k1` crate): about four
/// times faster than the pure-Rust k256 path, and recovery is the whole cost of a
/// local payment check. The address is the last 20 bytes of the key's keccak256.
fn recover_prehash(prehash: &B256, sig: &Signature) -> Option<Address> {
    use secp256k1::ecdsa::{RecoverableSignature, RecoveryId};
    let id = RecoveryId::try_from(i32::from(sig.v())).ok()?;
    let mut compact = [0u8; 64];
    compact[..32].copy_from_slice(&sig.r().to_be_bytes::<32>());
    compact[32..].copy_from_slice(&sig.s().to_be_bytes::<32>());
    let rs = RecoverableSignature::from_compact(&compact, id).ok()?;
    let key = secp256k1::SECP256K1.recover_ecdsa(secp256k1::Message::from_digest(prehash.0), &rs).ok()?;
    Some(Address::from_raw_public_key(&key.serialize_uncompressed()[1..]))
}

/// `0x` + 40 hex digits, any case (checksums are not required by x402).
pub fn address(s: &str) -> Option<Address> {
    let h = s.strip_prefix("0x")?;
    if h.len() != 40 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 20];
    hex::decode_to_slice(h, &mut out).ok()?;
    Some(Address::from(out))
}

/// A decimal uint256: digits only, no sign, at most 78 digits.
pub fn uint(s: &str) -> Option<U256> {
    if s.is_empty() || s.len() > 78 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    U256::from_str_radix(s, 10).ok()
}

fn bytes32(s: &str) -> Option<B256> {
    let h = s.strip_prefix("0x")?;
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(h, &mut out).ok()?;
    Some(B256::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_signer::SignerSync;
    use serde_json::Value;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/x402-vectors.json");
    /// Between the vectors' validAfter (1740672089) and validBefore (1740672154).
    const VECTOR_NOW: u64 = 1_740_672_100;

    fn vectors() -> Value {
        let text = std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("{VECTORS}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn s(v: &Value) -> &str {
        v.as_str().unwrap()
    }

    fn domain_of(d: &Value) -> Eip712Domain {
        domain(
            s(&d["name"]),
            s(&d["version"]),
            d["chainId"].as_u64().unwrap(),
            address(s(&d["verifyingContract"])).unwrap(),
        )
    }

    fn payload(auth: &Value, signature: &str) -> ExactEvmPayload {
        ExactEvmPayload {
            signature: signature.to_owned(),
            authorization: serde_json::from_value(auth.clone()).unwrap(),
        }
    }

    fn b256(v: &Value) -> B256 {
        bytes32(s(v)).unwrap()
    }

    fn expected<'d>(d: &'d Eip712Domain, to: &str, amount: u64) -> Expected<'d> {
        Expected { pay_to: address(to).unwrap(), amount: U256::from(amount), exact_amount: true, domain: d }
    }

    #[test]
    fn domain_separators_match_the_known_usdc_domains() {
        let v = vectors();
        let sepolia = domain_of(&v["domain"]);
        assert_eq!(sepolia.separator(), b256(&v["known_domain_separators"]["base-sepolia-usdc"]));
        let base = domain("USD Coin", "2", 8453, address("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913").unwrap());
        assert_eq!(base.separator(), b256(&v["known_domain_separators"]["base-usdc"]));
    }

    #[test]
    fn typehash_is_eip3009() {
        let t = TransferWithAuthorization {
            from: Address::ZERO,
            to: Address::ZERO,
            value: U256::ZERO,
            validAfter: U256::ZERO,
            validBefore: U256::ZERO,
            nonce: B256::ZERO,
        };
        assert_eq!(
            t.eip712_type_hash(),
            bytes32("0x7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267").unwrap()
        );
    }

    #[test]
    fn vectors_hash_and_recover_to_their_signers() {
        let v = vectors();
        let d = domain_of(&v["domain"]);
        for vec in v["vectors"].as_array().unwrap() {
            let name = s(&vec["name"]);
            let auth = parse(&payload(&vec["authorization"], s(&vec["signature"]))).unwrap();
            assert_eq!(d.separator(), b256(&vec["domain_separator"]), "{name}");
            assert_eq!(auth.transfer.eip712_hash_struct(), b256(&vec["struct_hash"]), "{name}");
            assert_eq!(signing_hash(&d, &auth.transfer), b256(&vec["digest"]), "{name}");
            let PayerSignature::Eoa(sig) = &auth.signature else { panic!("{name}: 65-byte signature") };
            assert_eq!(recover(&d, &auth.transfer, sig).unwrap(), address(s(&vec["recovers_to"])).unwrap(), "{name}");
            let to = s(&vec["authorization"]["to"]);
            assert_eq!(check(&auth, &expected(&d, to, 10_000), VECTOR_NOW), Ok(()), "{name}");
        }
    }

    #[test]
    fn tampered_vectors_recover_to_someone_else_and_are_refused() {
        let v = vectors();
        let spec = &v["vectors"][0];
        for t in spec["tampered"].as_array().unwrap() {
            let change = s(&t["change"]);
            let d = domain_of(&t["domain"]);
            let auth = parse(&payload(&t["authorization"], s(&spec["signature"]))).unwrap();
            let PayerSignature::Eoa(sig) = &auth.signature else { panic!("65 bytes") };
            let recovered = recover(&d, &auth.transfer, sig).unwrap();
            assert_eq!(recovered, address(s(&t["recovers_to"])).unwrap(), "{change}");
            // Checked against what the tampered payment claims, so only the signature fails.
            let want =
                Expected { pay_to: auth.transfer.to, amount: auth.transfer.value, exact_amount: true, domain: &d };
            assert_eq!(
                check(&auth, &want, VECTOR_NOW),
                Err(LocalError::WrongSigner { recovered, from: auth.transfer.from }),
                "{change}"
            );
        }
    }

    #[test]
    fn dev_key_signs_the_vector_signature() {
        let v = vectors();
        let vec = &v["vectors"][1];
        let signer: alloy_signer_local::PrivateKeySigner = s(&vec["private_key"]).parse().unwrap();
        assert_eq!(signer.address(), address(s(&vec["authorization"]["from"])).unwrap());
        let auth = parse(&payload(&vec["authorization"], s(&vec["signature"]))).unwrap();
        let sig = signer.sign_hash_sync(&signing_hash(&domain_of(&v["domain"]), &auth.transfer)).unwrap();
        assert_eq!(format!("0x{}", hex::encode(sig.as_bytes())), s(&vec["signature"]));
    }

    #[test]
    fn validity_window_has_a_six_second_margin() {
        let v = vectors();
        let d = domain_of(&v["domain"]);
        let vec = &v["vectors"][1];
        let auth = parse(&payload(&vec["authorization"], s(&vec["signature"]))).unwrap();
        let want = expected(&d, s(&vec["authorization"]["to"]), 10_000);
        // validAfter 1740672089, validBefore 1740672154.
        assert_eq!(check(&auth, &want, 1_740_672_089), Ok(()));
        assert_eq!(check(&auth, &want, 1_740_672_148), Ok(()));
        assert!(matches!(check(&auth, &want, 1_740_672_149), Err(LocalError::Expired { .. })));
        assert!(matches!(check(&auth, &want, 1_740_672_088), Err(LocalError::NotYetValid { .. })));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(matches!(check(&auth, &want, now), Err(LocalError::Expired { .. })));
    }

    #[test]
    fn recipient_and_amount_are_checked_before_the_signature() {
        let v = vectors();
        let d = domain_of(&v["domain"]);
        let vec = &v["vectors"][1];
        let auth = parse(&payload(&vec["authorization"], s(&vec["signature"]))).unwrap();
        let other = "0x0000000000000000000000000000000000000001";
        assert!(matches!(check(&auth, &expected(&d, other, 10_000), VECTOR_NOW), Err(LocalError::Recipient { .. })));
        let to = s(&vec["authorization"]["to"]);
        assert!(matches!(check(&auth, &expected(&d, to, 9_999), VECTOR_NOW), Err(LocalError::Amount { .. })));
        // v1 accepts paying more than asked; v2 wants the exact amount.
        let v1 = Expected { exact_amount: false, ..expected(&d, to, 9_999) };
        assert_eq!(check(&auth, &v1, VECTOR_NOW), Ok(()));
        let v1 = Expected { exact_amount: false, ..expected(&d, to, 10_001) };
        assert!(matches!(check(&auth, &v1, VECTOR_NOW), Err(LocalError::Amount { .. })));
    }

    #[test]
    fn malleated_and_unusable_signatures_are_refused() {
        let v = vectors();
        let d = domain_of(&v["domain"]);
        let vec = &v["vectors"][1];
        let to = s(&vec["authorization"]["to"]);
        let good = parse(&payload(&vec["authorization"], s(&vec["signature"]))).unwrap();
        let PayerSignature::Eoa(sig) = good.signature else { panic!() };
        // (r, n - s, !v) recovers the same key but is not canonical.
        let n = U256::from_str_radix("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141", 16).unwrap();
        let high = Signature::new(sig.r(), n - sig.s(), !sig.v());
        let hex_sig = format!("0x{}", hex::encode(high.as_bytes()));
        let auth = parse(&payload(&vec["authorization"], &hex_sig)).unwrap();
        assert!(matches!(check(&auth, &expected(&d, to, 10_000), VECTOR_NOW), Err(LocalError::Signature(_))));

        let mut v0 = s(&vec["signature"]).to_owned();
        v0.replace_range(v0.len() - 2.., "00");
        let auth = parse(&payload(&vec["authorization"], &v0)).unwrap();
        assert_eq!(
            check(&auth, &expected(&d, to, 10_000), VECTOR_NOW),
            Err(LocalError::Signature("v must be 27 or 28"))
        );

        let short = &s(&vec["signature"])[..40];
        let auth = parse(&payload(&vec["authorization"], short)).unwrap();
        assert!(matches!(check(&auth, &expected(&d, to, 10_000), VECTOR_NOW), Err(LocalError::Signature(_))));

        // A smart-wallet signature is left to the facilitator.
        let long = format!("0x{}", "ab".repeat(200));
        let auth = parse(&payload(&vec["authorization"], &long)).unwrap();
        assert!(matches!(auth.signature, PayerSignature::Contract(ref b) if b.len() == 200));
        assert_eq!(check(&auth, &expected(&d, to, 10_000), VECTOR_NOW), Ok(()));
    }

    #[test]
    fn wire_strings_are_decoded_strictly() {
        let v = vectors();
        let vec = &v["vectors"][1];
        let sig = s(&vec["signature"]);
        let bad = |field: &str, value: &str| {
            let mut a = vec["authorization"].clone();
            a[field] = Value::String(value.to_owned());
            parse(&payload(&a, sig)).unwrap_err().field
        };
        assert_eq!(bad("from", "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb9226"), "authorization.from");
        assert_eq!(bad("to", "209693Bc6afc0C5328bA36FaF03C514EF312287C00"), "authorization.to");
        assert_eq!(bad("to", "0X209693Bc6afc0C5328bA36FaF03C514EF312287C"), "authorization.to");
        assert_eq!(bad("value", "-1"), "authorization.value");
        assert_eq!(bad("value", "1e4"), "authorization.value");
        assert_eq!(bad("value", ""), "authorization.value");
        assert_eq!(bad("value", &"9".repeat(79)), "authorization.value");
        assert_eq!(bad("validAfter", "0x10"), "authorization.validAfter");
        assert_eq!(bad("validBefore", " 1"), "authorization.validBefore");
        assert_eq!(bad("nonce", "0x1234"), "authorization.nonce");
        assert_eq!(bad("nonce", &format!("0x{}", "zz".repeat(32))), "authorization.nonce");
        let auth = &vec["authorization"];
        assert_eq!(parse(&payload(auth, "0xabc")).unwrap_err().field, "signature");
        assert_eq!(parse(&payload(auth, "abcd")).unwrap_err().field, "signature");
        assert_eq!(parse(&payload(auth, "0x")).unwrap_err().field, "signature");
        // validAfter "0", as the v2 clients sign it, is fine.
        let mut a = auth.clone();
        a["validAfter"] = Value::String("0".into());
        assert_eq!(parse(&payload(&a, sig)).unwrap().transfer.validAfter, U256::ZERO);
    }
}
