//! The SQLite ledger's statements and row helpers: the SQL its commands run, on the
//! writer's [`Tx`] or the reader's connection.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use super::holds::OpenHold;
use super::writer::Tx;
use crate::ledger::rows::{to_db, KeyRow, TxRow};
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

pub(super) fn is_debit(conn: &Connection, hold: HoldId) -> Result<bool> {
    Ok(debit_status(conn, hold)?.is_some())
}

pub(super) fn debit_status(conn: &Connection, hold: HoldId) -> Result<Option<String>> {
    let status = conn
        .prepare_cached("SELECT status FROM transactions WHERE id = ?1 AND kind = 'debit'")?
        .query_row([hold.0], |r| r.get::<_, String>(0))
        .optional()?;
    Ok(status)
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

/// Captures `hold` if it is open in the book (`None` if not). The book forgets it
/// either way: captured, or failed, when nothing was debited and the caller withholds
/// the response (keeping it would keep its amount held until a restart).
pub(super) fn capture_open(tx: &Tx<'_>, hold: HoldId) -> Option<Result<()>> {
    let h = tx.book.begin_close(hold)?;
    let captured = debit_open(tx, hold, &h);
    tx.book.close(hold, captured.as_ref().ok().copied());
    Some(captured.map(|_| ()))
}

/// The conditional debit of an open hold (the database has the last word on the
/// balance) and its `captured` row, numbered as the hold was. Returns the balance.
pub(super) fn debit_open(tx: &Tx<'_>, hold: HoldId, h: &OpenHold) -> Result<Micros> {
    let amount = to_db(h.amount)?;
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
    insert_closed_debit(tx, hold, h, amount, "captured")?;
    Ok(balance)
}

/// The debit row of an open hold being closed (`captured` or `released`), numbered as
/// the hold was and stamped with the time it was taken.
pub(super) fn insert_closed_debit(tx: &Tx<'_>, hold: HoldId, h: &OpenHold, amount: i64, status: &str) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO transactions (id, key_id, kind, amount, route, request_id, status, created_at)
         VALUES (?1, ?2, 'debit', ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![hold.0, &*h.key_id, amount, &*h.route, &*h.request_id, status, h.created_at])?;
    Ok(())
}

/// Releases `hold` if it is open in the book (`None` if not). If writing the release
/// fails, the hold stays open: a retry or the stale-hold sweep releases it.
pub(super) fn release_open(tx: &Tx<'_>, hold: HoldId, now: i64) -> Option<Result<()>> {
    let h = tx.book.begin_close(hold)?;
    let released = write_release(tx, hold, &h, now);
    match released {
        Ok(()) => tx.book.close(hold, None),
        Err(_) => tx.book.reopen(hold),
    }
    Some(released)
}

/// Nothing was debited for an open hold, so its release leaves a `released` debit and
/// its `refund`, which cancel out.
pub(super) fn write_release(tx: &Tx<'_>, hold: HoldId, h: &OpenHold, now: i64) -> Result<()> {
    let amount = to_db(h.amount)?;
    insert_closed_debit(tx, hold, h, amount, "released")?;
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
    })
}
