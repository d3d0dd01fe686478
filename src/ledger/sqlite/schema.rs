//! The SQLite ledger's schema (`schema.sql`) and its numbered migrations, tracked with
//! `PRAGMA user_version`: those not yet applied run in one transaction at open, so
//! re-opening an up-to-date database changes nothing. Amounts are `INTEGER` (i64) in
//! SQLite and `Micros` (u64) in Rust; values above `i64::MAX` are refused with
//! `LedgerError::Overflow` (`ledger::rows`).

use rusqlite::{Connection, TransactionBehavior};

use crate::ledger::{LedgerError, Result};

/// The tables and indexes as the migrations leave them.
pub const SCHEMA: &str = include_str!("schema.sql");

/// Schema version a database has once every migration is applied.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`. Append only.
///
/// A new database gets the whole of [`SCHEMA`] and goes straight to
/// [`SCHEMA_VERSION`]; the steps after the first run only on databases made before
/// them. A database made by the first migration 1 (tables without the listing indexes)
/// is at version 1, and migrations 2 and 3 bring it to [`SCHEMA`]. Migration 2 is
/// idempotent (`IF NOT EXISTS`) because the versions before migration 3 also ran it
/// after [`SCHEMA`] on a new database; SQLite has no `ADD COLUMN IF NOT EXISTS`, hence
/// the shortcut for new databases.
pub const MIGRATIONS: &[&str] = &[
    SCHEMA,
    // 2: listings ordered by time (`created_at`, then id); idempotency keys looked up
    // across keys (a reuse on another key is a conflict).
    "CREATE INDEX IF NOT EXISTS transactions_created ON transactions (created_at);
     CREATE INDEX IF NOT EXISTS transactions_idempotency_key
         ON transactions (idempotency_key) WHERE idempotency_key IS NOT NULL;",
    // 3: metered captures (the hold of a partial capture, the model and usage it was
    // priced from); one request's transactions looked up by key.
    "ALTER TABLE transactions ADD COLUMN held INTEGER CHECK (held IS NULL OR held >= amount);
     ALTER TABLE transactions ADD COLUMN model TEXT;
     ALTER TABLE transactions ADD COLUMN input_tokens INTEGER CHECK (input_tokens >= 0);
     ALTER TABLE transactions ADD COLUMN cached_input_tokens INTEGER CHECK (cached_input_tokens >= 0);
     ALTER TABLE transactions ADD COLUMN cache_write_input_tokens INTEGER CHECK (cache_write_input_tokens >= 0);
     ALTER TABLE transactions ADD COLUMN output_tokens INTEGER CHECK (output_tokens >= 0);
     ALTER TABLE transactions ADD COLUMN usage_source TEXT CHECK (usage_source IN ('reported', 'estimated'));",
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
    if current == 0 {
        tx.execute_batch(SCHEMA).map_err(|e| LedgerError::Other(format!("ledger schema failed: {e}")))?;
    } else {
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.execute_batch(sql).map_err(|e| LedgerError::Other(format!("ledger migration {} failed: {e}", i + 1)))?;
        }
    }
    if current < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Migration 1 as the first databases got it: the tables, without the indexes that
    /// migration 2 adds.
    const FIRST_MIGRATION_1: &str = r#"
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
    "#;

    /// Everything SQLite knows of a schema: each table's columns (name, type, not
    /// null, default, primary key) and each index's table, uniqueness, columns and
    /// `WHERE` clause (from its statement, spaces collapsed).
    fn shape(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        let mut objects = conn
            .prepare("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master ORDER BY type, name")
            .unwrap();
        let objects = objects
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<Vec<(String, String, String, String)>>>()
            .unwrap();
        for (kind, name, table, sql) in objects {
            if kind == "table" {
                let mut cols = conn.prepare(&format!("PRAGMA table_info({name})")).unwrap();
                let cols = cols
                    .query_map([], |r| {
                        Ok(format!(
                            "{}.{} {} notnull={} default={:?} pk={}",
                            name,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, Option<String>>(4)?,
                            r.get::<_, i64>(5)?
                        ))
                    })
                    .unwrap()
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .unwrap();
                out.extend(cols);
            } else {
                let sql = sql.split_whitespace().collect::<Vec<_>>().join(" ").replace(" IF NOT EXISTS", "");
                out.push(format!("{kind} {name} on {table}: {sql}"));
            }
        }
        out
    }

    /// A database made at `version` by `sql` (`None`: a new one), then migrated.
    fn migrated(first: Option<(&str, u32)>) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        if let Some((sql, version)) = first {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", version).unwrap();
        }
        migrate(&mut conn).unwrap();
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        conn
    }

    #[test]
    fn a_database_from_the_first_migration_upgrades_to_the_schema() {
        let fresh = shape(&migrated(None));
        assert!(fresh.iter().any(|o| o.starts_with("index transactions_created ")), "{fresh:#?}");
        assert!(fresh.iter().any(|o| o.starts_with("transactions.usage_source TEXT")), "{fresh:#?}");
        assert_eq!(shape(&migrated(Some((FIRST_MIGRATION_1, 1)))), fresh);
        // As the versions before metered captures left a database: migration 3 only.
        let second = format!("{FIRST_MIGRATION_1}; {}", MIGRATIONS[1]);
        assert_eq!(shape(&migrated(Some((&second, 2)))), fresh);
        let plain = Connection::open_in_memory().unwrap();
        plain.execute_batch(SCHEMA).unwrap();
        assert_eq!(shape(&plain), fresh, "schema.sql is the schema, and later migrations change nothing");
    }
}
