//! The PostgreSQL ledger's statements used by more than one operation, and its row
//! readers (the mapping itself is shared with SQLite in `ledger::rows`).

use crate::ledger::rows::{from_db, KeyRow, TxRow};
use crate::ledger::{HoldId, HoldOutcome, KeyInfo, Result, Transaction};

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

/// Captures one pending hold for `$2` (positive, at most the hold), with the metered
/// columns `$3` model, `$4`–`$7` token counts, `$8` usage source: amount, `held`,
/// status and the rest of the hold back to the balance, in one statement. On the
/// right of `SET`, `amount` is the old value: the hold. `held` is written as
/// `rows::held_column` says: the hold when the capture took less or was metered.
/// Still pending is tested as for [`RELEASE`] (see the module docs).
pub(super) const CAPTURE: &str = "
    WITH captured AS (
        UPDATE transactions
        SET status = 'captured', amount = $2,
            held = CASE WHEN $2 <> amount OR $3::text IS NOT NULL THEN amount END,
            model = $3, input_tokens = $4, cached_input_tokens = $5, cache_write_input_tokens = $6,
            output_tokens = $7, usage_source = $8
        WHERE id = $1 AND kind = 'debit' AND status NOT IN ('captured', 'released') AND amount >= $2
        RETURNING key_id, coalesce(held, amount) - amount AS rest
    ), restored AS (
        UPDATE keys SET balance = keys.balance + captured.rest
        FROM captured WHERE keys.id = captured.key_id AND captured.rest > 0
    )
    SELECT count(*) FROM captured";

/// What a hold that [`CAPTURE`] did not capture is: `kind`, `status`, and the amount
/// it held.
pub(super) const HOLD_STATE: &str = "SELECT kind, status, coalesce(held, amount) FROM transactions WHERE id = $1";

/// A `keys` row (`KEY_COLUMNS`).
pub(super) fn key_info(r: &tokio_postgres::Row) -> Result<KeyInfo> {
    KeyRow {
        id: r.try_get(0)?,
        label: r.try_get(1)?,
        balance: r.try_get(2)?,
        revoked: r.try_get(3)?,
        created_at: r.try_get(4)?,
    }
    .into_info()
}

/// A `transactions` row (`TX_COLUMNS`).
pub(super) fn transaction(r: &tokio_postgres::Row) -> Result<Transaction> {
    TxRow {
        id: r.try_get(0)?,
        key_id: r.try_get(1)?,
        kind: r.try_get(2)?,
        amount: r.try_get(3)?,
        route: r.try_get(4)?,
        request_id: r.try_get(5)?,
        status: r.try_get(6)?,
        created_at: r.try_get(7)?,
        held: r.try_get(8)?,
        model: r.try_get(9)?,
        tokens: [r.try_get(10)?, r.try_get(11)?, r.try_get(12)?, r.try_get(13)?],
        usage_source: r.try_get(14)?,
    }
    .into_transaction()
}

/// What a refused hold says, from the key row read after the conditional debit
/// matched nothing.
pub(super) fn refusal(row: Option<tokio_postgres::Row>) -> Result<HoldOutcome> {
    Ok(match row {
        None => HoldOutcome::UnknownKey,
        Some(r) if r.try_get::<_, bool>(1)? => HoldOutcome::Revoked { key_id: r.try_get(0)? },
        Some(r) => HoldOutcome::Insufficient { key_id: r.try_get(0)?, balance: from_db(r.try_get(2)?)? },
    })
}

pub(super) fn held(r: &tokio_postgres::Row) -> Result<HoldOutcome> {
    Ok(HoldOutcome::Held { hold: HoldId(r.try_get(0)?), key_id: r.try_get(1)?, balance: from_db(r.try_get(2)?)? })
}
