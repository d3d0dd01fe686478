//! What the SQLite and PostgreSQL ledgers do alike with rows and amounts: the columns
//! both read, a stored row turned into a [`KeyInfo`] or a [`Transaction`], the
//! conversions between [`Micros`] (u64) and the stores' signed 64-bit integers, and
//! the rule for a reused idempotency key. ARCHITECTURE.md ("Money") has the
//! invariants these keep.

use std::time::Duration;

use super::{HoldId, KeyInfo, LedgerError, Metered, Result, Transaction, TxKind};
use crate::meter::{Usage, UsageSource};
use crate::money::Micros;

/// The `keys` columns [`KeyRow`] holds, in its order.
pub(crate) const KEY_COLUMNS: &str = "id, label, balance, revoked, created_at";
/// The `transactions` columns [`TxRow`] holds, in its order.
pub(crate) const TX_COLUMNS: &str = "id, key_id, kind, amount, route, request_id, status, created_at, held, model, \
     input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens, usage_source";

// === amounts ===

/// An amount as both stores keep it (INTEGER, BIGINT: signed 64 bits); one above
/// `i64::MAX` is refused rather than wrapped.
pub(crate) fn to_db(amount: Micros) -> Result<i64> {
    int_to_db(amount.get())
}

/// Any unsigned count the stores keep (a nonce's `valid_before`, a settled amount).
pub(crate) fn int_to_db(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| LedgerError::Overflow)
}

/// A stored amount or balance. The schemas' `CHECK`s keep them at zero or above, so a
/// negative one means the store was changed by something other than tollgate.
pub(crate) fn from_db(v: i64) -> Result<Micros> {
    u64::try_from(v)
        .map(Micros)
        .map_err(|_| LedgerError::Other(format!("the ledger holds a negative amount ({v}); was it edited by hand?")))
}

/// The amount of a hold, which must be positive: a free route takes no hold.
pub(crate) fn hold_amount(amount: Micros) -> Result<i64> {
    match to_db(amount)? {
        0 => Err(LedgerError::Other("a hold must be for a positive amount (free routes take no hold)".into())),
        n => Ok(n),
    }
}

/// The amount of a credit, which must be positive.
pub(crate) fn credit_amount(amount: Micros) -> Result<i64> {
    match to_db(amount)? {
        0 => Err(LedgerError::Other("a credit must be a positive amount".into())),
        n => Ok(n),
    }
}

/// Whole seconds of `d` (a spend-cap window, a stale-hold age), saturating.
pub(crate) fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// A `LIMIT` or a unix time given as an unsigned number, saturating.
pub(crate) fn saturating(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

// === rows ===

/// A `keys` row as read ([`KEY_COLUMNS`]).
pub(crate) struct KeyRow {
    pub(crate) id: String,
    pub(crate) label: Option<String>,
    pub(crate) balance: i64,
    pub(crate) revoked: bool,
    pub(crate) created_at: i64,
}

impl KeyRow {
    pub(crate) fn into_info(self) -> Result<KeyInfo> {
        let KeyRow { id, label, balance, revoked, created_at } = self;
        Ok(KeyInfo { id, label, balance: from_db(balance)?, revoked, created_at })
    }
}

/// A `transactions` row as read ([`TX_COLUMNS`]).
pub(crate) struct TxRow {
    pub(crate) id: i64,
    pub(crate) key_id: String,
    pub(crate) kind: String,
    pub(crate) amount: i64,
    pub(crate) route: Option<String>,
    pub(crate) request_id: Option<String>,
    pub(crate) status: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) held: Option<i64>,
    pub(crate) model: Option<String>,
    /// input, cached input, cache write input, output.
    pub(crate) tokens: [Option<i64>; 4],
    pub(crate) usage_source: Option<String>,
}

impl TxRow {
    pub(crate) fn into_transaction(self) -> Result<Transaction> {
        let kind = match self.kind.as_str() {
            "credit" => TxKind::Credit,
            "debit" => TxKind::Debit,
            "refund" => TxKind::Refund,
            other => return Err(LedgerError::Other(format!("unknown transaction kind {other:?}"))),
        };
        let usage = match self.tokens {
            [None, None, None, None] => None,
            [Some(input), Some(cached_input), Some(cache_write_input), Some(output)] => Some(Usage {
                input: from_db(input)?.get(),
                cached_input: from_db(cached_input)?.get(),
                cache_write_input: from_db(cache_write_input)?.get(),
                output: from_db(output)?.get(),
            }),
            partial => {
                return Err(LedgerError::Other(format!(
                    "transaction {} has some token counts but not all ({partial:?}); was it edited by hand?",
                    self.id
                )))
            }
        };
        let usage_source = match self.usage_source.as_deref() {
            None => None,
            Some(s) => Some(UsageSource::parse(s).ok_or_else(|| {
                LedgerError::Other(format!("transaction {} has an unknown usage source {s:?}", self.id))
            })?),
        };
        Ok(Transaction {
            id: self.id,
            key_id: self.key_id,
            kind,
            amount: from_db(self.amount)?,
            route: self.route,
            request_id: self.request_id,
            status: self.status,
            created_at: self.created_at,
            held: self.held.map(from_db).transpose()?,
            model: self.model,
            usage,
            usage_source,
        })
    }
}

/// The columns a capture writes besides its amount, as both stores keep them: the
/// model, the four token counts (`Usage` order) and the usage source; all `NULL` for a
/// fixed-price capture.
pub(crate) struct MeteredRow {
    pub(crate) model: Option<String>,
    pub(crate) tokens: [Option<i64>; 4],
    pub(crate) usage_source: Option<&'static str>,
}

impl MeteredRow {
    pub(crate) fn of(metered: Option<&Metered>) -> Result<MeteredRow> {
        let Some(m) = metered else {
            return Ok(MeteredRow { model: None, tokens: [None; 4], usage_source: None });
        };
        let u = &m.usage;
        let mut tokens = [None; 4];
        for (slot, n) in tokens.iter_mut().zip([u.input, u.cached_input, u.cache_write_input, u.output]) {
            *slot = Some(int_to_db(n)?);
        }
        Ok(MeteredRow { model: Some(m.model.clone()), tokens, usage_source: Some(m.source.as_str()) })
    }
}

/// What a capture of `amount` does to a hold of `hold` (both positive or zero, checked
/// before anything is written): `None` when it asks for more than was held.
/// Otherwise the `held` column to write: the hold when the capture took less than it or
/// was metered (so the row says what was held), `NULL` for a fixed-price capture of the
/// whole hold (whose row reads as it always did).
pub(crate) fn held_column(hold: i64, amount: i64, metered: bool) -> Option<Option<i64>> {
    if amount > hold {
        return None;
    }
    Some((metered || amount != hold).then_some(hold))
}

pub(crate) fn capture_above_hold(hold: HoldId, amount: Micros, held: i64) -> LedgerError {
    LedgerError::Other(format!(
        "cannot capture {amount} USD from hold {}, which holds only {} USD; nothing was charged and the hold \
         is still open: capture at most the held amount, or release it",
        hold.0,
        Micros(u64::try_from(held).unwrap_or(0))
    ))
}

// === rules ===

/// x402 payers and nonces are hex, which is case-insensitive: both are stored
/// lower-cased, so a replay in other letters is still a replay.
pub(crate) fn nonce_key(payer: &str, nonce: &str) -> (String, String) {
    (payer.to_lowercase(), nonce.to_lowercase())
}

/// What a credit's idempotency key was used for before (`seen`: the key id and amount
/// of the credit row that carries it) means for a credit of `amount` to `key_id`: true
/// for the same top-up again (nothing to do), false for a key never used, and
/// [`LedgerError::IdempotencyConflict`] for another amount or another key.
pub(crate) fn repeated_top_up(idem: &str, key_id: &str, amount: i64, seen: Option<(String, i64)>) -> Result<bool> {
    match seen {
        None => Ok(false),
        Some((seen_key, seen_amount)) if seen_key == key_id && seen_amount == amount => Ok(true),
        Some((seen_key, seen_amount)) => Err(LedgerError::IdempotencyConflict {
            idempotency_key: idem.to_owned(),
            key_id: seen_key,
            amount: from_db(seen_amount)?,
        }),
    }
}

pub(crate) fn no_hold(hold: HoldId) -> LedgerError {
    LedgerError::Other(format!("no hold with id {}", hold.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_beyond_i64_are_refused() {
        assert!(matches!(to_db(Micros(u64::MAX)), Err(LedgerError::Overflow)));
        assert_eq!(to_db(Micros(i64::MAX as u64)).unwrap(), i64::MAX);
        assert!(matches!(int_to_db(u64::MAX), Err(LedgerError::Overflow)));
        assert!(matches!(hold_amount(Micros::ZERO), Err(LedgerError::Other(_))));
        assert!(matches!(credit_amount(Micros::ZERO), Err(LedgerError::Other(_))));
        assert_eq!(hold_amount(Micros(1)).unwrap(), 1);
    }

    #[test]
    fn a_capture_records_its_hold_when_it_took_less_or_was_metered() {
        assert_eq!(held_column(10, 11, false), None, "above the hold");
        assert_eq!(held_column(10, 10, false), Some(None), "a fixed price reads as it always did");
        assert_eq!(held_column(10, 10, true), Some(Some(10)));
        assert_eq!(held_column(10, 4, false), Some(Some(10)));
        assert_eq!(held_column(10, 0, true), Some(Some(10)));
    }

    #[test]
    fn stored_usage_is_all_or_nothing() {
        let row = |tokens, source: Option<&str>| TxRow {
            id: 1,
            key_id: "key_a".into(),
            kind: "debit".into(),
            amount: 5,
            route: None,
            request_id: None,
            status: Some("captured".into()),
            created_at: 0,
            held: Some(9),
            model: Some("m".into()),
            tokens,
            usage_source: source.map(str::to_owned),
        };
        let t = row([Some(1), Some(2), Some(3), Some(4)], Some("estimated")).into_transaction().unwrap();
        assert_eq!(t.usage, Some(Usage { input: 1, cached_input: 2, cache_write_input: 3, output: 4 }));
        assert_eq!((t.held, t.usage_source), (Some(Micros(9)), Some(UsageSource::Estimated)));
        assert!(row([Some(1), None, Some(3), Some(4)], None).into_transaction().is_err());
        assert!(row([None; 4], Some("guessed")).into_transaction().is_err());
        assert!(row([Some(-1), Some(2), Some(3), Some(4)], None).into_transaction().is_err());
    }

    #[test]
    fn a_negative_stored_amount_is_an_error_not_zero() {
        assert_eq!(from_db(7).unwrap(), Micros(7));
        assert!(matches!(from_db(-1), Err(LedgerError::Other(_))));
    }

    #[test]
    fn a_reused_idempotency_key_is_a_repeat_only_for_the_same_key_and_amount() {
        assert!(!repeated_top_up("inv", "key_a", 5, None).unwrap());
        assert!(repeated_top_up("inv", "key_a", 5, Some(("key_a".into(), 5))).unwrap());
        for seen in [("key_a".to_owned(), 6), ("key_b".to_owned(), 5)] {
            match repeated_top_up("inv", "key_a", 5, Some(seen.clone())) {
                Err(LedgerError::IdempotencyConflict { idempotency_key, key_id, amount }) => {
                    assert_eq!((idempotency_key.as_str(), key_id, amount), ("inv", seen.0, Micros(seen.1 as u64)));
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

/// The `created_at` range (unix seconds) one request's rows can have, when its id is a
/// ULID (tollgate's own request ids are): from its time to a day after, long enough for
/// the longest stream's refund. The lookup then walks the key's rows of that day on the
/// `(key_id, created_at)` index, so no index on request ids has to be written with
/// every charge. `None` for an id of the client's own making: all the key's rows.
pub(super) fn request_window(request_id: &str) -> Option<(i64, i64)> {
    let ulid = ulid::Ulid::from_string(request_id).ok()?;
    let secs = i64::try_from(ulid.timestamp_ms() / 1000).ok()?;
    // A hold is stamped when it is taken, a moment after the id was made; a little
    // slack before covers a clock step between the two.
    Some((secs.saturating_sub(60), secs.saturating_add(86_400)))
}

#[cfg(test)]
mod request_window_tests {
    use super::request_window;

    #[test]
    fn ulids_give_their_day_and_other_ids_none() {
        let id = ulid::Ulid::from_parts(1_764_500_000_123, 42).to_string();
        assert_eq!(request_window(&id), Some((1_764_500_000 - 60, 1_764_500_000 + 86_400)));
        assert_eq!(request_window("my-own-request-id"), None);
    }
}
