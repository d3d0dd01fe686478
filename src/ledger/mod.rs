//! The ledger: API keys, balances, holds, transactions and the x402 replay store.
//! ARCHITECTURE.md ("Invariants": money, holds, fail closed) says what it guarantees.
//!
//! Money is integer micro-units. A charge has two phases, like a card authorization:
//! [`Ledger::authorize`] takes a **hold** atomically, as a conditional debit (the
//! balance can never go below zero, whatever the concurrency or number of replicas;
//! PostgreSQL writes it, SQLite keeps it in memory, see [`holds`]);
//! [`Ledger::capture`] makes it final, for the held amount or less, when the charge is
//! settled (a fixed price once the upstream answered with a chargeable status, a
//! metered one when the response body ends); [`Ledger::release`] gives it back
//! (recorded as a `refund`) when nothing is owed. Holds a crashed process left open are released by
//! [`Ledger::release_stale_holds`].
//!
//! Invariant for every key, at every commit: `balance = Σ credit − Σ debit + Σ refund`
//! (pending debits count).
//!
//! # Metered captures
//!
//! A metered (per-token) request holds the most it can cost, and captures what it
//! actually cost when its response body ends. Like a two-phase transfer's *post*, a
//! capture of less than the hold is one operation: the debit row's `amount` becomes
//! the captured amount, its `held` column records the hold, and the balance gets the
//! difference back. The remainder has **no refund row**: the debit row alone says what
//! was taken, so the invariant above holds with the captured amount as the debit. A
//! capture of zero is a release (a `refund` row of the whole hold), since amounts are
//! positive. The usage the capture was priced from ([`Metered`]) is stored on the same
//! row.
//!
//! # How long a hold lives
//!
//! A hold lives as long as its request, however long a stream runs: the periodic
//! sweep only releases holds whose process is gone. SQLite keeps open holds in the
//! memory of the one process that owns the file, so they die with it and the sweep
//! never touches them; PostgreSQL renews a lease on the holds each replica has open
//! (see `postgres/`), and the sweep releases only holds whose lease ran out.
//!
//! Listings are newest first by time (`created_at`, then id), and paged with an opaque
//! [`Cursor`]: ids do not follow time on SQLite, whose gateway numbers rows from
//! blocks reserved in advance (see [`holds`]).
//!
//! Each backend is a folder, `sqlite/` and `postgres/`, whose module docs say how it
//! keeps these guarantees; what both do alike with rows and amounts is in `rows.rs`.
//! Code outside this folder does not write SQL.

pub mod postgres;
mod rows;
pub mod sqlite;

/// The SQLite ledger's book of open holds, at the path it always had.
pub use self::sqlite::holds;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::meter::{Usage, UsageSource};
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
    /// A credit's idempotency key was used before for a different top-up (another
    /// amount or another key): nothing changed. Idempotency keys name one top-up in the
    /// whole ledger, not per key.
    #[error(
        "idempotency key {idempotency_key:?} was already used for a credit of {amount} USD to {key_id}; \
         to retry that top-up repeat it exactly (same key id and amount), for a different top-up use a \
         new idempotency key"
    )]
    IdempotencyConflict { idempotency_key: String, key_id: String, amount: Micros },
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

/// A key's own account, as the customer self-service endpoints show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The key; its balance is what is left after its open holds.
    pub key: KeyInfo,
    /// Open holds (pending debits) of the key.
    pub held: Micros,
    /// Debits less refunds in the last `spend_window`, when asked: what the spend cap
    /// counts (open holds included).
    pub spent: Option<Micros>,
}

/// A metered debit's detail, recorded with its capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    pub model: String,
    pub usage: Usage,
    pub source: UsageSource,
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
///
/// A captured debit's `amount` is what was captured. When that is less than the hold
/// (or the capture was metered), `held` says how much was held: the difference went
/// back to the balance with the capture, with no `refund` row. The metered fields are
/// serialized only when set, so a fixed-price debit reads as it always did.
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
    /// The hold of a capture that took less than it, or of a metered capture.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_opt_money")]
    pub held: Option<Micros>,
    /// The model a metered capture was priced for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The tokens a metered capture was priced from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Whether the upstream reported that usage or tollgate estimated it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_source: Option<UsageSource>,
}

/// Most transactions one page may carry (`limit` of `GET /admin/transactions`).
pub const MAX_PAGE: usize = 10_000;

/// Where a page of transactions ended: the sort key (`created_at`, id) of its last row.
/// The next page holds the rows strictly older than it, so rows are neither skipped nor
/// repeated however many are written meanwhile (new rows sort first). Clients see it
/// only as an opaque string ([`Cursor::encode`]); the same row always encodes the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    /// Unix seconds.
    pub created_at: i64,
    pub id: i64,
}

/// Marks the encoding, so another one can be told apart later.
const CURSOR_VERSION: &str = "t1";

// === impl Cursor ===

impl Cursor {
    /// The sort key of `t` (newest first is descending order).
    pub fn of(t: &Transaction) -> Cursor {
        Cursor { created_at: t.created_at, id: t.id }
    }

    /// URL-safe base64 (no padding) of `t1.<created_at>.<id>`.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let plain = format!("{CURSOR_VERSION}.{}.{}", self.created_at, self.id);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(plain)
    }

    /// The cursor `s` encodes; `None` for anything [`Cursor::encode`] did not make.
    pub fn parse(s: &str) -> Option<Cursor> {
        use base64::Engine;
        let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok()?;
        let plain = std::str::from_utf8(&plain).ok()?;
        let mut parts = plain.split('.');
        let (Some(CURSOR_VERSION), Some(created_at), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Cursor { created_at: created_at.parse().ok()?, id: id.parse().ok()? })
    }
}

/// What [`Ledger::transaction_page`] is asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct TxQuery<'a> {
    /// Only this key's transactions (the admin API's `key=`, a customer's own account).
    pub key: Option<&'a str>,
    /// Only rows older than this: the `next` of the page before.
    pub before: Option<Cursor>,
    /// Most rows on the page.
    pub limit: usize,
}

/// One page of transactions, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPage {
    pub transactions: Vec<Transaction>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

// === impl TxPage ===

impl TxPage {
    /// Sorts `rows` newest first and keeps `limit` of them. A backend asks its store for
    /// `limit + 1` rows, so that one more row than fits says there is a next page.
    pub fn newest_first(mut rows: Vec<Transaction>, limit: usize) -> TxPage {
        rows.sort_unstable_by_key(|t| std::cmp::Reverse(Cursor::of(t)));
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more { rows.last().map(Cursor::of) } else { None };
        TxPage { transactions: rows, next }
    }
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

fn ser_opt_money<S: serde::Serializer>(m: &Option<Micros>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.collect_str(m),
        None => s.serialize_none(),
    }
}

/// What every backend does: accounts (keys and balances), holds, the transaction
/// listing, the x402 replay store and settlement log, and a health check.
///
/// One trait for every role, grouped below. It is not split into role traits under a
/// supertrait: `dyn Ledger` callers would not notice, but every call on a concrete
/// backend or through `T: Ledger` (the tests, the benchmarks) would need each role
/// trait imported.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    // === accounts ===

    /// Creates a key with an opening balance (recorded as a `credit`).
    async fn create_key(&self, label: Option<&str>, balance: Micros) -> Result<NewKey>;
    async fn key(&self, id: &str) -> Result<Option<KeyInfo>>;
    async fn list_keys(&self) -> Result<Vec<KeyInfo>>;
    /// Revokes a key; returns false when there is no such key.
    async fn revoke(&self, id: &str) -> Result<bool>;
    /// Adds funds. With an idempotency key, the same top-up applied twice counts once:
    /// the repeat (same key id, same amount) changes nothing and answers `applied:
    /// false`; the same idempotency key with another amount or another key id is
    /// [`LedgerError::IdempotencyConflict`].
    async fn credit(&self, id: &str, amount: Micros, idempotency_key: Option<&str>) -> Result<CreditOutcome>;
    /// A key's own account, looked up by its secret (the customer self-service
    /// endpoints); `None` for an unknown secret. `spent` is given when `spend_window`
    /// is.
    async fn account(&self, secret: SecretHash, spend_window: Option<Duration>) -> Result<Option<Account>>;

    // === holds ===

    /// Looks the key up by its secret's hash and atomically holds `amount`.
    async fn authorize(&self, req: HoldRequest<'_>) -> Result<HoldOutcome>;
    /// Makes a hold final for `amount` ≤ the held amount; the rest goes back to the
    /// balance in the same operation (the debit row records both, see the module docs).
    /// `metered` is stored with the debit.
    ///
    /// Returns true when the hold is (now or already) captured, false when it was
    /// released before (e.g. its process died and it was swept): then nothing is
    /// charged and the caller must not deliver the paid response. Idempotent: capturing
    /// a captured hold again changes nothing and answers true.
    ///
    /// `amount` above the hold is [`LedgerError::Other`] and changes nothing. An
    /// `amount` of zero releases the hold exactly as [`Ledger::release`] does (a
    /// `refund` row of the whole hold) and answers true, also for a hold released
    /// before: charging nothing is always possible.
    async fn capture(&self, hold: HoldId, amount: Micros, metered: Option<&Metered>) -> Result<bool>;
    /// Gives a hold back, recorded as a `refund` of the same amount. Idempotent.
    async fn release(&self, hold: HoldId) -> Result<()>;
    /// Releases holds older than `older_than` that no live process has open (left
    /// behind by a crashed process). A hold open in this ledger is never released by
    /// it, however old: a hold lives as long as its request.
    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64>;

    // === transactions ===

    /// One page of transactions (open holds included, as `pending` debits), newest
    /// first: by `created_at`, then by id.
    async fn transaction_page(&self, query: TxQuery<'_>) -> Result<TxPage>;

    /// The first `limit` transactions of [`Ledger::transaction_page`]; `key` filters
    /// by key id.
    async fn transactions(&self, key: Option<&str>, limit: usize) -> Result<Vec<Transaction>> {
        Ok(self.transaction_page(TxQuery { key, before: None, limit }).await?.transactions)
    }

    /// The transactions of one request of one key (its debit, and the refund if it was
    /// released), oldest first; empty if none, also when the request belongs to another
    /// key.
    async fn request_transactions(&self, key_id: &str, request_id: &str) -> Result<Vec<Transaction>>;

    // === x402: replay store and settlement log ===

    /// Records an x402 (payer, nonce) until `valid_before` (unix seconds).
    /// Returns false when it is already recorded: a replay.
    async fn reserve_nonce(&self, payer: &str, nonce: &str, valid_before: u64) -> Result<bool>;
    /// Forgets nonces whose `valid_before` is before `now` (unix seconds).
    async fn purge_nonces(&self, now: u64) -> Result<u64>;
    async fn record_settlement(&self, s: &Settlement) -> Result<()>;
    async fn settlements(&self, limit: usize) -> Result<Vec<Settlement>>;

    // === health ===

    /// Cheap read-and-write round trip for readiness checks.
    async fn ping(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(id: i64, created_at: i64) -> Transaction {
        Transaction {
            id,
            key_id: "key_a".into(),
            kind: TxKind::Credit,
            amount: Micros(1),
            route: None,
            request_id: None,
            status: None,
            created_at,
            held: None,
            model: None,
            usage: None,
            usage_source: None,
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        for c in [Cursor { created_at: 1_764_000_000, id: 4097 }, Cursor { created_at: 0, id: -1 }] {
            let s = c.encode();
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "URL-safe: {s}");
            assert_eq!(Cursor::parse(&s), Some(c));
        }
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for bad in [
            String::new(),
            "!!".into(),
            "1764000000.4097".into(),
            b64("t1.1764000000"),
            b64("t1.1764000000.4097.1"),
            b64("t2.1764000000.4097"),
            b64("t1.x.4097"),
            b64("t1.1764000000.99999999999999999999"),
        ] {
            assert_eq!(Cursor::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pages_are_newest_by_time_then_id() {
        // Ids out of time order, as SQLite's reserved blocks make them.
        let rows = vec![tx(10, 100), tx(9000, 99), tx(11, 101), tx(9001, 101)];
        let page = TxPage::newest_first(rows.clone(), 3);
        let ids: Vec<i64> = page.transactions.iter().map(|t| t.id).collect();
        assert_eq!(ids, [9001, 11, 10]);
        assert_eq!(page.next, Some(Cursor { created_at: 100, id: 10 }));
        assert_eq!(TxPage::newest_first(rows.clone(), 4).next, None);
        assert_eq!(TxPage::newest_first(rows, 0), TxPage { transactions: vec![], next: None });
    }
}
