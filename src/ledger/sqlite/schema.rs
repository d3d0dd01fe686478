//! The SQLite ledger's schema and its numbered migrations, tracked with
//! `PRAGMA user_version`: those not yet applied run in one transaction at open, so
//! re-opening an up-to-date database changes nothing.

use rusqlite::{Connection, TransactionBehavior};

use crate::ledger::{LedgerError, Result};

/// Schema version a database has once every migration is applied.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`. Append only; never edit a shipped one.
pub const MIGRATIONS: &[&str] = &[
    // 1: keys, transactions, x402 nonces, settlements, health.
    r#"
    CREATE TABLE keys (
        id          TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
        label       TEXT,
        balance     INTEGER NOT NULL CHECK (balance >= 0),
        revoked     INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
        created_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE transactions (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        key_id          TEXT NOT NULL REFERENCES keys (id),
        kind            TEXT NOT NULL CHECK (kind IN ('credit', 'debit', 'refund')),
        amount          INTEGER NOT NULL CHECK (amount > 0),
        route           TEXT,
        request_id      TEXT,
        -- A debit is a hold: pending, then captured or released. Others have no status.
        status          TEXT CHECK (
            (kind = 'debit' AND status IS NOT NULL
                AND status IN ('pending', 'captured', 'released'))
            OR (kind <> 'debit' AND status IS NULL)),
        idempotency_key TEXT CHECK (idempotency_key IS NULL OR kind = 'credit'),
        created_at      INTEGER NOT NULL
    ) STRICT;

    CREATE UNIQUE INDEX transactions_idempotency
        ON transactions (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX transactions_key_created ON transactions (key_id, created_at);
    CREATE INDEX transactions_pending
        ON transactions (created_at) WHERE kind = 'debit' AND status = 'pending';

    -- Payer and nonce are stored lower-cased: hex is case-insensitive.
    CREATE TABLE x402_nonces (
        payer        TEXT NOT NULL,
        nonce        TEXT NOT NULL,
        valid_before INTEGER NOT NULL,
        PRIMARY KEY (payer, nonce)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX x402_nonces_valid_before ON x402_nonces (valid_before);

    CREATE TABLE settlements (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        rail       TEXT NOT NULL,
        payer      TEXT NOT NULL,
        amount     INTEGER NOT NULL CHECK (amount >= 0),
        asset      TEXT NOT NULL,
        network    TEXT NOT NULL,
        tx_hash    TEXT NOT NULL,
        route      TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) STRICT;

    -- One row, rewritten by ping: readiness proves the database is writable.
    CREATE TABLE health (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        checked_at INTEGER NOT NULL
    ) STRICT;
    "#,
    // 2: listings ordered by time (`created_at`, then id: the id is the rowid, so it
    // is in every index); idempotency keys looked up across keys (a reuse on another
    // key is a conflict).
    r#"
    CREATE INDEX transactions_created ON transactions (created_at);
    CREATE INDEX transactions_idempotency_key
        ON transactions (idempotency_key) WHERE idempotency_key IS NOT NULL;
    "#,
];

/// Applies the migrations the database does not have yet, all in one transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(LedgerError::Other(format!(
            "the ledger schema is version {current}, newer than this tollgate knows \
             ({SCHEMA_VERSION}); run a newer tollgate or restore a backup"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql).map_err(|e| LedgerError::Other(format!("ledger migration {} failed: {e}", i + 1)))?;
    }
    if current < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}
