//! The PostgreSQL ledger's statements and row helpers.

use std::time::Duration;

use crate::ledger::{HoldId, HoldOutcome, KeyInfo, LedgerError, Result, Transaction, TxKind};
use crate::money::Micros;

pub(super) fn to_db(amount: Micros) -> Result<i64> {
    i64::try_from(amount.get()).map_err(|_| LedgerError::Overflow)
}

pub(super) fn micros(v: i64) -> Micros {
    Micros(u64::try_from(v).unwrap_or(0))
}

pub(super) fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

pub(super) fn no_hold(hold: HoldId) -> LedgerError {
    LedgerError::Other(format!("no hold with id {}", hold.0))
}

/// The atomic conditional debit and its pending transaction row, in one statement.
/// `$1` amount, `$2` secret hash, `$3` route, `$4` request id.
pub(super) const HOLD: &str = "
    WITH held AS (
        UPDATE keys SET balance = balance - $1
        WHERE secret_hash = $2 AND NOT revoked AND balance >= $1
        RETURNING id, balance
    ), hold AS (
        INSERT INTO transactions (key_id, kind, amount, route, request_id, status)
        SELECT id, 'debit', $1, $3, $4, 'pending' FROM held
        RETURNING id, key_id
    )
    SELECT hold.id, hold.key_id, held.balance FROM hold JOIN held ON held.id = hold.key_id";

pub(super) const KEY_BY_SECRET: &str = "SELECT id, revoked, balance FROM keys WHERE secret_hash = $1";

/// Releases one pending hold: status, balance and `refund` row in one statement.
pub(super) const RELEASE: &str = "
    WITH released AS (
        UPDATE transactions SET status = 'released'
        WHERE id = $1 AND kind = 'debit' AND status NOT IN ('captured', 'released')
        RETURNING key_id, amount, route, request_id
    ), refunded AS (
        UPDATE keys SET balance = keys.balance + released.amount
        FROM released WHERE keys.id = released.key_id
    ), refund AS (
        INSERT INTO transactions (key_id, kind, amount, route, request_id)
        SELECT key_id, 'refund', amount, route, request_id FROM released
    )
    SELECT count(*) FROM released";

pub(super) const KEY_COLUMNS: &str = "id, label, balance, revoked, created_at";
pub(super) const TX_COLUMNS: &str = "id, key_id, kind, amount, route, request_id, status, created_at";

pub(super) fn key_info(r: &tokio_postgres::Row) -> Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.try_get(0)?,
        label: r.try_get(1)?,
        balance: micros(r.try_get(2)?),
        revoked: r.try_get(3)?,
        created_at: r.try_get(4)?,
    })
}

pub(super) fn transaction(r: &tokio_postgres::Row) -> Result<Transaction> {
    let kind = match r.try_get::<_, &str>(2)? {
        "credit" => TxKind::Credit,
        "debit" => TxKind::Debit,
        "refund" => TxKind::Refund,
        other => return Err(LedgerError::Other(format!("unknown transaction kind {other:?}"))),
    };
    Ok(Transaction {
        id: r.try_get(0)?,
        key_id: r.try_get(1)?,
        kind,
        amount: micros(r.try_get(3)?),
        route: r.try_get(4)?,
        request_id: r.try_get(5)?,
        status: r.try_get(6)?,
        created_at: r.try_get(7)?,
    })
}

/// What a refused hold says, from the key row read after the conditional debit
/// matched nothing.
pub(super) fn refusal(row: Option<tokio_postgres::Row>) -> Result<HoldOutcome> {
    Ok(match row {
        None => HoldOutcome::UnknownKey,
        Some(r) if r.try_get::<_, bool>(1)? => HoldOutcome::Revoked { key_id: r.try_get(0)? },
        Some(r) => HoldOutcome::Insufficient { key_id: r.try_get(0)?, balance: micros(r.try_get(2)?) },
    })
}

pub(super) fn held(r: &tokio_postgres::Row) -> Result<HoldOutcome> {
    Ok(HoldOutcome::Held { hold: HoldId(r.try_get(0)?), key_id: r.try_get(1)?, balance: micros(r.try_get(2)?) })
}
