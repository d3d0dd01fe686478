//! The PostgreSQL ledger's schema (`schema.sql`) and its numbered migrations, recorded
//! in `schema_migrations`. They run at start-up in one transaction that first takes
//! `pg_advisory_xact_lock`, so replicas starting together apply them once, one after
//! the other. Amounts are `BIGINT` micro-units with `CHECK (balance >= 0)`; values
//! above `i64::MAX` are refused with `LedgerError::Overflow` (`ledger::rows`). Use a
//! database of its own for tollgate: the table names (`keys`, `transactions`, …) are
//! plain.

use std::time::Duration;

use deadpool_postgres::GenericClient;

use super::PostgresLedger;
use crate::ledger::{LedgerError, Result};

/// The migration transaction may wait this long for another replica's migration.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// `pg_advisory_xact_lock` key that serialises migrations: "tollgate" in ASCII.
pub const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;
/// The tables and indexes as the migrations leave them.
pub const SCHEMA: &str = include_str!("schema.sql");

/// Schema version a database has once every migration is applied.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`. Append only.
///
/// A new database gets the whole of [`SCHEMA`] as migration 1, and the steps after it
/// change nothing there. A database made by the first migration 1 (tables with the
/// first listing indexes) is at version 1, and migration 2 brings it to [`SCHEMA`]: so
/// each step after the first must be idempotent (`IF NOT EXISTS`, `IF EXISTS`).
pub const MIGRATIONS: &[&str] = &[
    SCHEMA,
    // 2: listings ordered by time (`created_at`, then id), which also serves what the
    // (key_id, created_at) index did; idempotency keys looked up across keys (a reuse
    // on another key is a conflict).
    "CREATE INDEX IF NOT EXISTS transactions_created ON transactions (created_at, id);
     CREATE INDEX IF NOT EXISTS transactions_key_created_id ON transactions (key_id, created_at, id);
     DROP INDEX IF EXISTS transactions_key_created;
     CREATE INDEX IF NOT EXISTS transactions_idempotency_key
         ON transactions (idempotency_key) WHERE idempotency_key IS NOT NULL;",
    // 3: metered captures (the hold of a partial capture, the model and usage it was
    // priced from); the lease of a pending hold (`touched_at`); one request's
    // transactions looked up by key. Adding nullable columns without a default
    // rewrites nothing. The index is built in the migration's transaction (plain, not
    // CONCURRENTLY), which blocks writes to the table while it builds: a short pause
    // at the upgrade, on a table of one row per payment.
    "ALTER TABLE transactions
         ADD COLUMN IF NOT EXISTS held BIGINT CHECK (held IS NULL OR held >= amount),
         ADD COLUMN IF NOT EXISTS model TEXT,
         ADD COLUMN IF NOT EXISTS input_tokens BIGINT CHECK (input_tokens >= 0),
         ADD COLUMN IF NOT EXISTS cached_input_tokens BIGINT CHECK (cached_input_tokens >= 0),
         ADD COLUMN IF NOT EXISTS cache_write_input_tokens BIGINT CHECK (cache_write_input_tokens >= 0),
         ADD COLUMN IF NOT EXISTS output_tokens BIGINT CHECK (output_tokens >= 0),
         ADD COLUMN IF NOT EXISTS usage_source TEXT CHECK (usage_source IN ('reported', 'estimated')),
         ADD COLUMN IF NOT EXISTS touched_at BIGINT;",
];

// === impl PostgresLedger ===

impl PostgresLedger {
    /// Applies the migrations the database does not have yet, in one transaction that
    /// holds the migration advisory lock: concurrent start-ups queue behind it, and the
    /// ones after the first find nothing left to do.
    pub(super) async fn migrate(&self) -> Result<()> {
        let work = async {
            let mut client = self.pool.get().await.map_err(|e| self.pool_error(e))?;
            let tx = client.transaction().await?;
            // Waiting for another replica's migration is expected here; and "already
            // exists, skipping" notices are not worth a log line at every start.
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {}; SET LOCAL client_min_messages = warning",
                MIGRATION_TIMEOUT.as_millis()
            ))
            .await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    INTEGER PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )
            .await?;
            let current: i32 =
                tx.query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[]).await?.try_get(0)?;
            if current > SCHEMA_VERSION {
                return Err(LedgerError::Other(format!(
                    "the ledger schema at {} is version {current}, newer than this tollgate knows \
                     ({SCHEMA_VERSION}); run a newer tollgate or restore a backup",
                    self.target
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
                let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
                tx.batch_execute(sql).await.map_err(|e| match LedgerError::from(e) {
                    LedgerError::Other(m) => LedgerError::Other(format!("ledger migration {version} failed: {m}")),
                    other => other,
                })?;
                tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version]).await?;
            }
            tx.commit().await?;
            Ok(())
        };
        match tokio::time::timeout(MIGRATION_TIMEOUT + self.op_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(LedgerError::Unavailable(format!(
                "the ledger migration at {} did not finish within {MIGRATION_TIMEOUT:?}; \
                 is another process holding advisory lock {MIGRATION_LOCK}?",
                self.target
            ))),
        }
    }
}
