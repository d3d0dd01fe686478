//! The SQLite ledger's statements and row helpers: the SQL its commands run, on the
//! writer's [`Tx`] or the reader's connection.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use super::holds::OpenHold;
use super::writer::Tx;
use crate::ledger::rows::{capture_above_hold, held_column, no_hold, to_db, KeyRow, MeteredRow, TxRow};
use crate::ledger::{HoldId, KeyInfo, LedgerError, Result, SecretHash};
use crate::money::Micros;

/// A key as the admin reads show it: its balance less what its open holds keep aside.
pub(super) fn less_held(mut key: KeyInfo, held: &HashMap<String, Micros>) -> KeyInfo {
    if let Some(h) = held.get(&key.id) {
        key.balance = key.balance.checked_sub(*h).unwrap_or(Micros::ZERO);
    }
    key
}

/// A committed balance as callers see it (as PostgreSQL, which writes holds, has it):
/// less what the key's open holds keep aside.
pub(super) fn less_open_holds(tx: &Tx<'_>, key_id: &str, balance: u64) -> Micros {
    Micros(balance).checked_sub(tx.book.held(key_id)).unwrap_or(Micros::ZERO)
}

pub(super) fn connect(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| {
        LedgerError::Unavailable(format!(
            "cannot open the SQLite ledger at {}: {e} (does its directory exist and is it writable?)",
            path.display()
        ))
    })?;
    conn.busy_timeout(busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::Other(format!(
            "{}: SQLite refused WAL mode (journal_mode is {mode}); use a file on a local disk",
            path.display()
        )));
    }
    Ok(conn)
}

/// SQLite errors that mean the store cannot do its job right now (fail closed and let
/// readiness report it) are `Unavailable`; the rest are `Other`.
impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> LedgerError {
        match e.sqlite_error_code() {
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::OutOfMemory,
            ) => LedgerError::Unavailable(format!("SQLite: {e}")),
            _ => LedgerError::Other(format!("SQLite: {e}")),
        }
    }
}

pub(super) fn now() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// (id, revoked, balance) of the key with this secret.
pub(super) fn key_by_secret(conn: &Connection, secret: &SecretHash) -> Result<Option<(String, bool, Micros)>> {
    let row = conn
        .prepare_cached("SELECT id, revoked, balance FROM keys WHERE secret_hash = ?1")?
        .query_row([&secret.0[..]], |r| Ok((r.get(0)?, r.get(1)?, Micros(r.get(2)?))))
        .optional()?;
    Ok(row)
}

/// The writer could not reserve more transaction ids (see the `cannot reserve
/// transaction ids` warning in the log for why).
pub(super) fn no_ids() -> LedgerError {
    LedgerError::Unavailable(
        "the SQLite ledger could not reserve transaction ids: is another process holding a write transaction \
         on the ledger file, or is the disk full? Nothing was held; retry"
            .into(),
    )
}

/// Releases `hold` if it is a `pending` row (not one tollgate wrote: see
/// `release_stale_holds`): the amount goes back to the balance and a `refund` row
/// records it. Returns whether it was pending.
pub(super) fn release_pending(tx: &Tx<'_>, hold: i64, now: i64) -> Result<bool> {
    let row = tx
        .prepare_cached(
            "UPDATE transactions SET status = 'released'
             WHERE id = ?1 AND kind = 'debit' AND status = 'pending'
             RETURNING key_id, amount, route, request_id",
        )?
        .query_row([hold], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })
        .optional()?;
    let Some((key_id, amount, route, request_id)) = row else {
        return Ok(false);
    };
    tx.prepare_cached("UPDATE keys SET balance = balance + ?2 WHERE id = ?1")?.execute(params![key_id, amount])?;
    insert_refund(tx, &key_id, amount, route.as_deref(), request_id.as_deref(), now)?;
    Ok(true)
}

pub(super) fn insert_credit(tx: &Tx<'_>, key_id: &str, amount: i64, idem: Option<&str>, now: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO transactions (id, key_id, kind, amount, idempotency_key, created_at)
         VALUES (?1, ?2, 'credit', ?3, ?4, ?5)",
    )?
    .execute(params![tx.book.next_id(), key_id, amount, idem, now])?;
    Ok(())
}

/// Writes a refund row (numbered after every open hold, like any new row).
pub(super) fn insert_refund(
    tx: &Tx<'_>,
    key_id: &str,
    amount: i64,
    route: Option<&str>,
    request_id: Option<&str>,
    now: i64,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO transactions (id, key_id, kind, amount, route, request_id, created_at)
         VALUES (?1, ?2, 'refund', ?3, ?4, ?5, ?6)",
    )?
    .execute(params![tx.book.next_id(), key_id, amount, route, request_id, now])?;
    Ok(())
}

/// Captures `amount` (already checked to fit an i64) of `hold` if it is open in the
/// book (`None` if not). The book forgets it once something was decided: captured,
/// released (a capture of zero), or failed in the database, when nothing was debited
/// and the caller withholds the response (keeping it would keep its amount held until
/// a restart). A capture above the hold changes nothing: the hold stays open.
pub(super) fn capture_open(tx: &Tx<'_>, hold: HoldId, amount: i64, metered: &MeteredRow) -> Option<Result<()>> {
    let h = tx.book.begin_close(hold)?;
    let held = match to_db(h.amount) {
        Ok(held) => held,
        Err(e) => {
            tx.book.reopen(hold);
            return Some(Err(e));
        }
    };
    let Some(held_col) = held_column(held, amount, metered.model.is_some()) else {
        tx.book.reopen(hold);
        return Some(Err(capture_above_hold(hold, Micros(amount.unsigned_abs()), held)));
    };
    if amount == 0 {
        // Nothing to charge: a release, refund row and all (amounts are positive). As
        // in `release_open`, the book forgets the hold even if that fails.
        let released = write_release(tx, hold, &h, now());
        tx.book.close(hold, None);
        return Some(released);
    }
    let captured = debit_open(tx, hold, &h, amount, held_col, metered);
    tx.book.close(hold, captured.as_ref().ok().copied());
    Some(captured.map(|_| ()))
}

/// The conditional debit of `amount` for an open hold (the database has the last word
/// on the balance) and its `captured` row, numbered as the hold was, with `held` (see
/// `rows::held_column`) and the metered columns. Returns the balance.
pub(super) fn debit_open(
    tx: &Tx<'_>,
    hold: HoldId,
    h: &OpenHold,
    amount: i64,
    held: Option<i64>,
    metered: &MeteredRow,
) -> Result<Micros> {
    let balance = tx
        .prepare_cached("UPDATE keys SET balance = balance - ?2 WHERE id = ?1 AND balance >= ?2 RETURNING balance")?
        .query_row(params![&*h.key_id, amount], |r| Ok(Micros(r.get(0)?)))
        .optional()?
        .ok_or_else(|| {
            LedgerError::Other(format!(
                "the balance of key {} no longer covers hold {}: was the ledger file changed by something \
                 other than tollgate? nothing was charged",
                h.key_id, hold.0
            ))
        })?;
    insert_closed_debit(tx, hold, h, amount, "captured", held, metered)?;
    Ok(balance)
}

/// The debit row of an open hold being closed (`captured` or `released`), numbered as
/// the hold was and stamped with the time it was taken.
pub(super) fn insert_closed_debit(
    tx: &Tx<'_>,
    hold: HoldId,
    h: &OpenHold,
    amount: i64,
    status: &str,
    held: Option<i64>,
    m: &MeteredRow,
) -> Result<()> {
    let [input, cached_input, cache_write_input, output] = m.tokens;
    tx.prepare_cached(
        "INSERT INTO transactions (id, key_id, kind, amount, route, request_id, status, created_at, held, model,
                                   input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
                                   usage_source)
         VALUES (?1, ?2, 'debit', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        hold.0,
        &*h.key_id,
        amount,
        &*h.route,
        &*h.request_id,
        status,
        h.created_at,
        held,
        m.model,
        input,
        cached_input,
        cache_write_input,
        output,
        m.usage_source
    ])?;
    Ok(())
}

/// What the table says of a hold that is not open in the book: `Some((status,
/// hold amount))` for a debit row, `None` for an id that no process ever wrote but
/// that was handed out (a hold that died with its process, released by construction),
/// and an error for anything else (no such hold).
pub(super) fn closed_hold(conn: &Connection, hold: HoldId) -> Result<Option<(String, i64)>> {
    let row = conn
        .prepare_cached("SELECT kind, status, amount, held FROM transactions WHERE id = ?1")?
        .query_row([hold.0], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .optional()?;
    match row {
        Some((kind, Some(status), amount, held)) if kind == "debit" => Ok(Some((status, held.unwrap_or(amount)))),
        Some(_) => Err(no_hold(hold)),
        None => {
            // Ids up to the sequence were reserved (by this process or one before it).
            let reserved: Option<i64> = conn
                .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name = 'transactions'")?
                .query_row([], |r| r.get(0))
                .optional()?;
            if hold.0 > 0 && reserved.is_some_and(|seq| hold.0 <= seq) {
                Ok(None)
            } else {
                Err(no_hold(hold))
            }
        }
    }
}

/// Releases `hold` if it is open in the book (`None` if not). The book forgets it even
/// if writing the release fails: the hold was never written, so forgetting it releases
/// it, as a crash would (only without its rows). Keeping it would keep its amount held
/// until a restart, since the sweep never releases a hold open in the book.
pub(super) fn release_open(tx: &Tx<'_>, hold: HoldId, now: i64) -> Option<Result<()>> {
    let h = tx.book.begin_close(hold)?;
    let released = write_release(tx, hold, &h, now);
    tx.book.close(hold, None);
    Some(released)
}

/// Nothing was debited for an open hold, so its release leaves a `released` debit and
/// its `refund`, which cancel out.
pub(super) fn write_release(tx: &Tx<'_>, hold: HoldId, h: &OpenHold, now: i64) -> Result<()> {
    let amount = to_db(h.amount)?;
    let fixed = MeteredRow::of(None)?;
    insert_closed_debit(tx, hold, h, amount, "released", None, &fixed)?;
    insert_refund(tx, &h.key_id, amount, Some(&h.route), Some(&h.request_id), now)
}

/// A `keys` row (`KEY_COLUMNS`).
pub(super) fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow { id: r.get(0)?, label: r.get(1)?, balance: r.get(2)?, revoked: r.get(3)?, created_at: r.get(4)? })
}

/// A `transactions` row (`TX_COLUMNS`).
pub(super) fn tx_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TxRow> {
    Ok(TxRow {
        id: r.get(0)?,
        key_id: r.get(1)?,
        kind: r.get(2)?,
        amount: r.get(3)?,
        route: r.get(4)?,
        request_id: r.get(5)?,
        status: r.get(6)?,
        created_at: r.get(7)?,
        held: r.get(8)?,
        model: r.get(9)?,
        tokens: [r.get(10)?, r.get(11)?, r.get(12)?, r.get(13)?],
        usage_source: r.get(14)?,
    })
}
