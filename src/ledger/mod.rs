//! The ledger: API keys, balances, holds, transactions and the x402 replay store
//! (DESIGN §5).
//!
//! Money is integer micro-units. A charge has two phases, like a card authorization:
//! [`Ledger::authorize`] takes a **hold** atomically, as a conditional debit (the
//! balance can never go below zero, whatever the concurrency or number of replicas;
//! PostgreSQL writes it, SQLite keeps it in memory, see [`holds`]);
//! [`Ledger::capture`] makes it final once the upstream answered with a chargeable
//! status; [`Ledger::release`] gives it back (recorded as a `refund`) when it did not.
//! Holds a crashed process left open are released by [`Ledger::release_stale_holds`].
//!
//! Invariant for every key, at every commit: `balance = Σ credit − Σ debit + Σ refund`.
//!
//! Code outside this folder does not write SQL.

pub mod holds;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::money::Micros;

/// Prefix of every API key secret, so leaked keys are recognisable (and scannable).
pub const KEY_PREFIX: &str = "tg_live_";
/// Prefix of public key ids.
pub const KEY_ID_PREFIX: &str = "key_";

#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The store could not be reached or did not answer in time: fail closed.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    #[error("no key with id {0:?}")]
    NoSuchKey(String),
    #[error("amount too large")]
    Overflow,
    #[error("ledger error: {0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, LedgerError>;

/// SHA-256 of a key secret: the only form in which secrets are stored or looked up.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash(pub [u8; 32]);

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretHash({}…)", hex::encode(&self.0[..4]))
    }
}

impl SecretHash {
    pub fn of(secret: &str) -> SecretHash {
        SecretHash(Sha256::digest(secret.as_bytes()).into())
    }
}

/// Generates a new key: a 160-bit random secret with [`KEY_PREFIX`], and a public id.
pub fn generate_key() -> (String, String) {
    use rand::RngCore;
    let mut secret = [0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    (format!("{KEY_ID_PREFIX}{}", hex::encode(id)), format!("{KEY_PREFIX}{}", hex::encode(secret)))
}

/// A key as created: the secret is shown once and never stored.
#[derive(Debug, Clone, Serialize)]
pub struct NewKey {
    pub id: String,
    pub key: String,
    #[serde(serialize_with = "ser_money")]
    pub balance: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub label: Option<String>,
    #[serde(serialize_with = "ser_money")]
    pub balance: Micros,
    pub revoked: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// What [`Ledger::authorize`] is asked to hold.
#[derive(Debug, Clone)]
pub struct HoldRequest<'a> {
    pub secret: SecretHash,
    pub amount: Micros,
    pub route: &'a str,
    pub request_id: &'a str,
    /// Maximum spend (debits less refunds) per window, if the key is capped.
    pub spend_cap: Option<(Micros, Duration)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// The amount is held; `balance` is what is left after the hold.
    Held {
        hold: HoldId,
        key_id: String,
        balance: Micros,
    },
    UnknownKey,
    Revoked {
        key_id: String,
    },
    Insufficient {
        key_id: String,
        balance: Micros,
    },
    SpendCapReached {
        key_id: String,
        spent: Micros,
        cap: Micros,
    },
}

/// Identifies one hold (the debit transaction row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HoldId(pub i64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditOutcome {
    pub balance: Micros,
    /// False when the idempotency key was seen before and nothing changed.
    pub applied: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TxKind {
    Credit,
    Debit,
    Refund,
}

impl TxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TxKind::Credit => "credit",
            TxKind::Debit => "debit",
            TxKind::Refund => "refund",
        }
    }
}

/// One transaction row, as the admin API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transaction {
    pub id: i64,
    pub key_id: String,
    pub kind: TxKind,
    #[serde(serialize_with = "ser_money")]
    pub amount: Micros,
    pub route: Option<String>,
    pub request_id: Option<String>,
    /// Debits: `pending` (a hold), `captured`, or `released` (a `refund` row follows).
    pub status: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
}

/// An x402 payment settled on chain, recorded next to the credit transactions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settlement {
    pub rail: String,
    pub payer: String,
    pub amount: u64,
    pub asset: String,
    pub network: String,
    pub tx_hash: String,
    pub route: String,
    pub request_id: String,
}

fn ser_money<S: serde::Serializer>(m: &Micros, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(m)
}

#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Creates a key with an opening balance (recorded as a `credit`).
    async fn create_key(&self, label: Option<&str>, balance: Micros) -> Result<NewKey>;
    async fn key(&self, id: &str) -> Result<Option<KeyInfo>>;
    async fn list_keys(&self) -> Result<Vec<KeyInfo>>;
    /// Revokes a key; returns false when there is no such key.
    async fn revoke(&self, id: &str) -> Result<bool>;
    /// Adds funds. With an idempotency key, the same top-up applied twice counts once.
    async fn credit(&self, id: &str, amount: Micros, idempotency_key: Option<&str>) -> Result<CreditOutcome>;

    /// Looks the key up by its secret's hash and atomically holds `amount`.
    async fn authorize(&self, req: HoldRequest<'_>) -> Result<HoldOutcome>;
    /// Makes a hold final. Idempotent: true when the hold is (now or already) captured,
    /// false when it was released before (e.g. swept as stale): then nothing is charged
    /// and the caller must not deliver the paid response.
    async fn capture(&self, hold: HoldId) -> Result<bool>;
    /// Gives a hold back, recorded as a `refund` of the same amount. Idempotent.
    async fn release(&self, hold: HoldId) -> Result<()>;
    /// Releases holds older than `older_than` (left behind by a crashed process).
    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64>;

    /// Newest first; `key` filters by key id.
    async fn transactions(&self, key: Option<&str>, limit: usize) -> Result<Vec<Transaction>>;

    /// Records an x402 (payer, nonce) until `valid_before` (unix seconds).
    /// Returns false when it is already recorded: a replay.
    async fn reserve_nonce(&self, payer: &str, nonce: &str, valid_before: u64) -> Result<bool>;
    /// Forgets nonces whose `valid_before` is before `now` (unix seconds).
    async fn purge_nonces(&self, now: u64) -> Result<u64>;
    async fn record_settlement(&self, s: &Settlement) -> Result<()>;
    async fn settlements(&self, limit: usize) -> Result<Vec<Settlement>>;

    /// Cheap read-and-write round trip for readiness checks.
    async fn ping(&self) -> Result<()>;
}
