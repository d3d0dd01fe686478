//! The PostgreSQL ledger's schema and its numbered migrations, recorded in
//! `schema_migrations` and applied at start-up under an advisory lock, so replicas
//! starting together apply them once.

use std::time::Duration;

use deadpool_postgres::GenericClient;

use super::PostgresLedger;
use crate::ledger::{LedgerError, Result};

/// The migration transaction may wait this long for another replica's migration.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// `pg_advisory_xact_lock` key that serialises migrations: "tollgate" in ASCII.
pub const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;
/// Schema version a database has once every migration is applied.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migration `n` (1-based) is `MIGRATIONS[n - 1]`. Append only; never edit a shipped one.
pub const MIGRATIONS: &[&str] = &[
    // 1: keys, transactions, x402 nonces, settlements, health.
    r#"
    CREATE TABLE keys (
        -- Creation order, for listings (ids are random).
        seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        id          TEXT PRIMARY KEY,
        secret_hash BYTEA NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
        label       TEXT,
        balance     BIGINT NOT NULL CHECK (balance >= 0),
        revoked     BOOLEAN NOT NULL DEFAULT false,
        created_at  BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
    );

    CREATE TABLE transactions (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key_id          TEXT NOT NULL REFERENCES keys (id),
        kind            TEXT NOT NULL CHECK (kind IN ('credit', 'debit', 'refund')),
        amount          BIGINT NOT NULL CHECK (amount > 0),
        route           TEXT,
        request_id      TEXT,
        -- A debit is a hold: pending, then captured or released. Others have no status.
        status          TEXT CHECK (
            (kind = 'debit' AND status IS NOT NULL
                AND status IN ('pending', 'captured', 'released'))
            OR (kind <> 'debit' AND status IS NULL)),
        idempotency_key TEXT CHECK (idempotency_key IS NULL OR kind = 'credit'),
        created_at      BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
    );

    CREATE UNIQUE INDEX transactions_idempotency
        ON transactions (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX transactions_key_id ON transactions (key_id, id);
    CREATE INDEX transactions_key_created ON transactions (key_id, created_at);
    CREATE INDEX transactions_pending
        ON transactions (created_at) WHERE kind = 'debit' AND status = 'pending';

    -- Payer and nonce are stored lower-cased: hex is case-insensitive.
    CREATE TABLE x402_nonces (
        payer        TEXT NOT NULL,
        nonce        TEXT NOT NULL,
        valid_before BIGINT NOT NULL,
        PRIMARY KEY (payer, nonce)
    );
    CREATE INDEX x402_nonces_valid_before ON x402_nonces (valid_before);

    CREATE TABLE settlements (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        rail       TEXT NOT NULL,
        payer      TEXT NOT NULL,
        amount     BIGINT NOT NULL CHECK (amount >= 0),
        asset      TEXT NOT NULL,
        network    TEXT NOT NULL,
        tx_hash    TEXT NOT NULL,
        route      TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_at BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
    );

    -- One row, rewritten by ping: readiness proves the database is writable (a
    -- read-only standby after a failover is not ready).
    CREATE TABLE health (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        checked_at BIGINT NOT NULL
    );
    "#,
    // 2: listings ordered by time (`created_at`, then id), which also serves what the
    // (key_id, created_at) index did; idempotency keys looked up across keys (a reuse
    // on another key is a conflict).
    r#"
    CREATE INDEX transactions_created ON transactions (created_at, id);
    CREATE INDEX transactions_key_created_id ON transactions (key_id, created_at, id);
    DROP INDEX transactions_key_created;
    CREATE INDEX transactions_idempotency_key
        ON transactions (idempotency_key) WHERE idempotency_key IS NOT NULL;
    "#,
];

/// Pool and timeout settings (`[ledger]` `pool_size`, `statement_timeout`).

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
