//! Local checks of an "exact" EVM payment, done before any network call: the cheap
//! refusals that protect the facilitator and the operator.
//!
//! The payment is an EIP-3009 `transferWithAuthorization` signed as EIP-712 typed data
//! (x402 `specs/schemes/exact/scheme_exact_evm.md`). Hashing uses alloy's `sol!` struct
//! and `Eip712Domain`; recovery uses alloy's `Signature` over k256. The checks are the
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
    sig.recover_address_from_prehash(&signing_hash(domain, transfer))
        .map_err(|_| LocalError::Signature("no public key recovers from it"))
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
