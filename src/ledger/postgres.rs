//! The PostgreSQL ledger: one shared ledger for several replicas (DESIGN §5 "Ledger
//! semantics"). Same meaning as the SQLite ledger, row for row; what differs is how the
//! guarantees are kept when several processes on several machines write at once.
//!
//! # Connections
//!
//! `tokio-postgres` behind a `deadpool` pool of `ledger.pool_size` connections. Every
//! connection runs `SET statement_timeout` (`ledger.statement_timeout`) and
//! `SET idle_in_transaction_session_timeout` right after it connects, so the server
//! itself cancels a slow statement and drops a client that went silent inside a
//! transaction (and with it the row locks it held). Each ledger operation is also
//! bounded on the client: pool wait, connect and every round trip together must finish
//! within the statement timeout plus [`CLIENT_MARGIN`], else the operation fails with
//! [`LedgerError::Unavailable`] and its connection is thrown away (it may be stuck on
//! a dead network path). Unavailable means fail closed: no paid request is forwarded.
//! When the server comes back, new connections are made on demand: no restart needed.
//!
//! **No TLS**: connections are plain TCP (or a Unix socket), `NoTls`. Run the database
//! on a private network or the same host, or put a TLS tunnel in front of it.
//!
//! # Concurrency
//!
//! Statements run in `READ COMMITTED`; every guarantee rests on row locks and
//! conditional writes, never on a read followed by a write:
//!
//! - **hold** ([`Ledger::authorize`]): one statement, the conditional debit
//!   `UPDATE keys … WHERE … AND balance >= $amount RETURNING …` chained (CTE) with the
//!   `INSERT` of the pending debit. A concurrent hold on the same key waits for the
//!   row lock and re-evaluates the condition against the committed balance, so the
//!   balance never goes below zero, whatever the number of replicas. Only a refusal
//!   costs a second round trip (a read, to say why).
//! - **spend cap**: the key row is locked (`SELECT … FOR UPDATE`) in the transaction
//!   that sums the window's spending and takes the hold, so two replicas cannot both
//!   spend the last room under the cap.
//! - **capture / release**: `UPDATE … WHERE id = … AND status NOT IN ('captured',
//!   'released')`, i.e. still pending; the release, the refund row and the balance
//!   update are one statement. The test is deliberately not written `status =
//!   'pending'`: that would match the partial index `transactions_pending`, which the
//!   planner then prefers to the primary key although it holds an entry for every hold
//!   captured since the last vacuum (at 10k paid requests/s, each batch of captures
//!   scanned some 50,000 dead entries and 1,250 heap pages: 80 µs of database time per
//!   capture instead of a few). These lookups by id are also sent unprepared
//!   (`query_typed`: one round trip, planned for the ids at hand) rather than as
//!   cached prepared statements: a prepared statement's generic plan is made after a
//!   few executions, and one made while the table was still tiny is a sequential scan
//!   that stays in the connection until something invalidates it — on a new ledger
//!   every capture then read the whole table (5 ms per capture at 50,000 rows).
//! - **stale holds**: pending holds are locked `FOR UPDATE SKIP LOCKED`, so replicas
//!   sweeping at once split the work and never refund a hold twice; the keys to refund
//!   are then locked in id order, so two sweeps cannot deadlock.
//! - **credits**: with an idempotency key, a transaction-scoped advisory lock on the
//!   key's hash serialises every credit that names it (on every replica), so the
//!   look-up (a repeat, or a conflict: another amount or another key) and the insert
//!   cannot interleave; the insert and the balance update are one statement (`INSERT
//!   … ON CONFLICT DO NOTHING` on `(key_id, idempotency_key)` still guards it).
//! - **revocations and top-ups** are seen by the very next hold: a hold reads the key
//!   row (balance, `revoked`) in its own statement, nothing is cached.
//! - **x402 nonces**: `INSERT … ON CONFLICT DO NOTHING` on the primary key
//!   `(payer, nonce)`: exactly one replica wins a replayed payment.
//!
//! Timestamps (`created_at`, the spend-cap window, the stale-hold cutoff) come from the
//! database's clock, so replicas whose clocks disagree still agree on what is stale.
//!
//! An operation that times out after the server committed it is reported as
//! `Unavailable` although it happened: a hold taken that way stays pending and is
//! released by the stale-hold sweep; a capture that way withholds a response that
//! was charged (the transaction row shows it). That window is the round trip of a
//! `COMMIT`; the SQLite ledger has no such window.
//!
//! # Schema
//!
//! Numbered migrations ([`MIGRATIONS`]) recorded in `schema_migrations`. They run at
//! start-up in one transaction that first takes `pg_advisory_xact_lock`, so replicas
//! starting together apply them once, one after the other. Amounts are `BIGINT`
//! micro-units with `CHECK (balance >= 0)`; values above `i64::MAX` are refused with
//! [`LedgerError::Overflow`]. Use a database of its own for tollgate: the table names
//! (`keys`, `transactions`, …) are plain.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config as PgConfig, NoTls};

use super::{
    generate_key, CreditOutcome, HoldId, HoldOutcome, HoldRequest, KeyInfo, Ledger, LedgerError, NewKey, Result,
    SecretHash, Settlement, Transaction, TxKind, TxPage, TxQuery,
};
use crate::money::Micros;

/// How much longer than the statement timeout the client waits for a whole operation
/// (pool wait, connect, every round trip) before giving up on it.
pub const CLIENT_MARGIN: Duration = Duration::from_secs(1);
/// The migration transaction may wait this long for another replica's migration.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// `pg_advisory_xact_lock` key that serialises migrations: "tollgate" in ASCII.
pub const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;
/// Seed of `hashtextextended` for the advisory locks of idempotency keys, so they do not
/// share numbers with other users of `hashtextextended(…, 0)`.
const IDEMPOTENCY_LOCK_SEED: i64 = 0x746f_6c6c_6964_656d;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Most connections this process opens.
    pub pool_size: usize,
    /// Server-side limit of one statement; the client allows [`CLIENT_MARGIN`] more for
    /// a whole operation.
    pub statement_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions { pool_size: 16, statement_timeout: Duration::from_secs(2) }
    }
}

/// The PostgreSQL [`Ledger`].
pub struct PostgresLedger {
    pool: Pool,
    /// Bound on one whole operation.
    op_timeout: Duration,
    /// `host:port/dbname`, for messages (never the password).
    target: String,
    /// The batchers' queues (`None` in the batchers' own handles).
    batchers: Option<Batchers>,
}

struct Batchers {
    holds: mpsc::Sender<HoldJob>,
    captures: mpsc::Sender<(HoldId, oneshot::Sender<Result<bool>>)>,
}

/// A hold waiting for the hold batcher.
struct HoldJob {
    secret: SecretHash,
    amount: i64,
    route: String,
    request_id: String,
    reply: oneshot::Sender<Result<HoldOutcome>>,
}

/// Most holds or captures one batch carries.
pub const MAX_BATCH: usize = 256;

impl std::fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PostgresLedger")
            .field("target", &self.target)
            .field("pool_size", &status.max_size)
            .field("connections", &status.size)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

// === impl PostgresLedger ===

impl PostgresLedger {
    /// Connects to `url` (`postgres://user:password@host:port/dbname`), applies pending
    /// migrations (safe when several replicas start at once) and returns the ledger.
    pub async fn connect(url: &str, opts: PostgresOptions) -> Result<PostgresLedger> {
        let mut pg: PgConfig = url.parse().map_err(|e| {
            LedgerError::Other(format!(
                "ledger.url is not a valid PostgreSQL URL ({e}); expected postgres://user@host:port/dbname"
            ))
        })?;
        let statement_timeout = opts.statement_timeout.max(Duration::from_millis(1));
        let op_timeout = statement_timeout + CLIENT_MARGIN;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(op_timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("tollgate");
        }
        let target = describe(&pg);
        let connector = Connector { statement_timeout, idle_timeout: op_timeout };
        let manager = Manager::from_connect(pg, connector, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(op_timeout))
            .create_timeout(Some(op_timeout))
            .recycle_timeout(Some(op_timeout))
            .build()
            .map_err(|e| LedgerError::Other(format!("cannot build the PostgreSQL pool: {e}")))?;
        let mut ledger = PostgresLedger { pool, op_timeout, target, batchers: None };
        ledger.migrate().await?;
        let (holds, holds_rx) = mpsc::channel(4 * MAX_BATCH);
        let (captures, captures_rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(hold_loop(ledger.handle(), holds_rx));
        tokio::spawn(capture_loop(ledger.handle(), captures_rx));
        ledger.batchers = Some(Batchers { holds, captures });
        Ok(ledger)
    }

    /// Another handle on the same pool, without the batchers' queues (so a batcher's
    /// handle does not keep its own queue open: dropping the ledger ends the batchers).
    fn handle(&self) -> PostgresLedger {
        PostgresLedger {
            pool: self.pool.clone(),
            op_timeout: self.op_timeout,
            target: self.target.clone(),
            batchers: None,
        }
    }

    /// Sends `job` to one of the batchers and waits for its answer.
    async fn batched<J, T>(
        &self,
        queue: impl FnOnce(&Batchers) -> &mpsc::Sender<J>,
        job: J,
        answer: oneshot::Receiver<Result<T>>,
    ) -> Result<T> {
        let stopped = || LedgerError::Unavailable("the PostgreSQL ledger's batchers stopped; restart tollgate".into());
        let queue = self.batchers.as_ref().map(queue).ok_or_else(stopped)?;
        queue.send(job).await.map_err(|_| stopped())?;
        // The batcher bounds each batch by the operation timeout; a job may wait for
        // the batch before its own.
        match timeout(2 * self.op_timeout, answer).await {
            Ok(answer) => answer.map_err(|_| stopped())?,
            Err(_) => Err(self.too_slow()),
        }
    }

    /// Takes every hold of `jobs` with ONE statement ([`HOLD_MANY`]), then reads why
    /// the refused ones were refused.
    async fn hold_many(&self, jobs: &[HoldJob]) -> Result<Vec<HoldOutcome>> {
        self.run(async |c| {
            let mut outcome: Vec<Option<HoldOutcome>> = vec![None; jobs.len()];
            let secrets: Vec<&[u8]> = jobs.iter().map(|j| &j.secret.0[..]).collect();
            let amounts: Vec<i64> = jobs.iter().map(|j| j.amount).collect();
            let routes: Vec<&str> = jobs.iter().map(|j| j.route.as_str()).collect();
            let request_ids: Vec<&str> = jobs.iter().map(|j| j.request_id.as_str()).collect();
            let slots: Vec<i32> = (0..jobs.len()).map(|i| i32::try_from(i).unwrap_or(i32::MAX)).collect();
            let stmt = c.prepare_cached(HOLD_MANY).await?;
            for row in c.query(&stmt, &[&secrets, &amounts, &routes, &request_ids, &slots]).await? {
                let slot = usize::try_from(row.try_get::<_, i32>(0)?).unwrap_or(usize::MAX);
                if let Some(o) = outcome.get_mut(slot) {
                    *o = Some(HoldOutcome::Held {
                        hold: HoldId(row.try_get(1)?),
                        key_id: row.try_get(2)?,
                        balance: micros(row.try_get(3)?),
                    });
                }
            }
            let refused: Vec<&[u8]> =
                jobs.iter().zip(&outcome).filter(|(_, o)| o.is_none()).map(|(j, _)| &j.secret.0[..]).collect();
            let mut keys = HashMap::new();
            if !refused.is_empty() {
                let stmt = c
                    .prepare_cached("SELECT secret_hash, id, revoked, balance FROM keys WHERE secret_hash = ANY($1)")
                    .await?;
                for row in c.query(&stmt, &[&refused]).await? {
                    let secret: Vec<u8> = row.try_get(0)?;
                    keys.insert(
                        secret,
                        (row.try_get::<_, String>(1)?, row.try_get::<_, bool>(2)?, micros(row.try_get(3)?)),
                    );
                }
            }
            Ok(jobs
                .iter()
                .zip(outcome)
                .map(|(job, o)| {
                    o.unwrap_or_else(|| match keys.get(&job.secret.0[..]) {
                        None => HoldOutcome::UnknownKey,
                        Some((key_id, true, _)) => HoldOutcome::Revoked { key_id: key_id.clone() },
                        Some((key_id, false, balance)) => {
                            HoldOutcome::Insufficient { key_id: key_id.clone(), balance: *balance }
                        }
                    })
                })
                .collect())
        })
        .await
    }

    /// Captures every hold of `holds` that is pending with ONE statement (and one
    /// commit); tells for each debit whether it is (now or already) captured. Ids that
    /// are no debit are missing from the answer.
    async fn capture_many(&self, holds: &[i64]) -> Result<HashMap<i64, bool>> {
        self.run(async |c| {
            let mut outcome = HashMap::with_capacity(holds.len());
            for row in c.query_typed(CAPTURE_MANY, &[(&holds, Type::INT8_ARRAY)]).await? {
                outcome.insert(row.try_get::<_, i64>(0)?, true);
            }
            let rest: Vec<i64> = holds.iter().copied().filter(|h| !outcome.contains_key(h)).collect();
            if !rest.is_empty() {
                // Already captured (idempotent) or already released (too late to charge).
                let sql = "SELECT id, status FROM transactions WHERE id = ANY($1) AND kind = 'debit'";
                for row in c.query_typed(sql, &[(&rest, Type::INT8_ARRAY)]).await? {
                    outcome.insert(row.try_get::<_, i64>(0)?, row.try_get::<_, &str>(1)? == "captured");
                }
            }
            Ok(outcome)
        })
        .await
    }

    /// Applies the migrations the database does not have yet, in one transaction that
    /// holds the migration advisory lock: concurrent start-ups queue behind it, and the
    /// ones after the first find nothing left to do.
    async fn migrate(&self) -> Result<()> {
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

    /// Runs `op` on a pooled connection within the operation timeout. A connection whose
    /// operation timed out is discarded rather than returned to the pool.
    async fn run<T>(&self, op: impl AsyncFnOnce(&mut Object) -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + self.op_timeout;
        let mut client = match timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(self.pool_error(e)),
            Err(_) => return Err(self.pool_busy()),
        };
        match timeout_at(deadline, op(&mut client)).await {
            Ok(result) => result,
            Err(_) => {
                // Dropping the detached connection closes it; the server rolls back
                // whatever it was doing.
                drop(Object::take(client));
                Err(self.too_slow())
            }
        }
    }

    fn too_slow(&self) -> LedgerError {
        LedgerError::Unavailable(format!(
            "PostgreSQL at {} did not answer within {:?}; paid requests are refused until it does",
            self.target, self.op_timeout
        ))
    }

    fn pool_busy(&self) -> LedgerError {
        LedgerError::Unavailable(format!(
            "no connection to PostgreSQL at {} became free within {:?} (all {} in use, or connecting is \
             slow); raise ledger.pool_size or look for slow statements",
            self.target,
            self.op_timeout,
            self.pool.status().max_size
        ))
    }

    fn pool_error(&self, e: PoolError) -> LedgerError {
        let why = match e {
            PoolError::Backend(e) => match LedgerError::from(e) {
                LedgerError::Unavailable(m) | LedgerError::Other(m) => m,
                other => other.to_string(),
            },
            PoolError::Timeout(_) => return self.pool_busy(),
            other => other.to_string(),
        };
        LedgerError::Unavailable(format!(
            "cannot connect to PostgreSQL at {}: {why}; is it running and reachable?",
            self.target
        ))
    }
}

/// `host:port/dbname` of the first host, for messages: never the password.
fn describe(pg: &PgConfig) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// Opens connections for the pool and sets the per-connection timeouts.
struct Connector {
    statement_timeout: Duration,
    idle_timeout: Duration,
}

type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<(Client, JoinHandle<()>), tokio_postgres::Error>> + Send + 'a>>;

impl deadpool_postgres::Connect for Connector {
    fn connect(&self, pg: &PgConfig) -> ConnectFuture<'_> {
        let pg = pg.clone();
        let settings = format!(
            "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}",
            self.statement_timeout.as_millis(),
            self.idle_timeout.as_millis()
        );
        Box::pin(async move {
            let (client, connection) = pg.connect(NoTls).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection closed");
                }
            });
            if let Err(e) = client.batch_execute(&settings).await {
                task.abort();
                return Err(e);
            }
            Ok((client, task))
        })
    }
}

/// PostgreSQL errors that mean the store cannot do its job right now (fail closed and
/// let readiness report it) are `Unavailable`; a bigint overflow is `Overflow`; the
/// rest (constraint violations, bugs) are `Other`.
impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> LedgerError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let msg = format!("PostgreSQL: {} (SQLSTATE {code})", db.message());
            return if code == "22003" {
                LedgerError::Overflow
            } else if transient(code) {
                LedgerError::Unavailable(msg)
            } else {
                LedgerError::Other(msg)
            };
        }
        let source = std::error::Error::source(&e);
        let msg = match source {
            Some(s) => format!("PostgreSQL: {e}: {s}"),
            None => format!("PostgreSQL: {e}"),
        };
        let io = source.is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io || e.to_string() == "timeout waiting for server" {
            LedgerError::Unavailable(msg)
        } else {
            LedgerError::Other(msg)
        }
    }
}

/// SQLSTATE classes and codes that a retry later may cure.
fn transient(code: &str) -> bool {
    // 08 connection exception, 40 transaction rollback (serialization, deadlock),
    // 53 insufficient resources, 57 operator intervention (statement timeout,
    // shutdown, database starting), 58 system error (I/O).
    matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58"))
        // lock_not_available, read_only_sql_transaction (a standby after failover)
        || matches!(code, "55P03" | "25006")
}

// === SQL helpers ===

fn to_db(amount: Micros) -> Result<i64> {
    i64::try_from(amount.get()).map_err(|_| LedgerError::Overflow)
}

fn micros(v: i64) -> Micros {
    Micros(u64::try_from(v).unwrap_or(0))
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Takes every hold queued (up to [`MAX_BATCH`]) and takes them in one transaction;
/// ends when the ledger is dropped. While one batch runs, the next gathers.
async fn hold_loop(db: PostgresLedger, mut queue: mpsc::Receiver<HoldJob>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match db.hold_many(&batch).await {
            Ok(outcomes) => {
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    // The caller may have given up (timed out): nothing to tell.
                    let _ = job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Takes every capture queued (up to [`MAX_BATCH`]) and runs them as one statement;
/// ends when the ledger is dropped.
async fn capture_loop(db: PostgresLedger, mut queue: mpsc::Receiver<(HoldId, oneshot::Sender<Result<bool>>)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let holds: Vec<i64> = batch.iter().map(|(h, _)| h.0).collect();
        let outcome = db.capture_many(&holds).await;
        for (hold, reply) in batch.drain(..) {
            let answer = match &outcome {
                Ok(captured) => captured.get(&hold.0).copied().ok_or_else(|| no_hold(hold)),
                Err(e) => Err(e.clone()),
            };
            // The caller may have given up (timed out): nothing to tell.
            let _ = reply.send(answer);
        }
    }
}

fn no_hold(hold: HoldId) -> LedgerError {
    LedgerError::Other(format!("no hold with id {}", hold.0))
}

/// The atomic conditional debit and its pending transaction row, in one statement.
/// `$1` amount, `$2` secret hash, `$3` route, `$4` request id.
const HOLD: &str = "
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

/// [`HOLD`] for a whole batch, in one statement: `$1` secret hashes, `$2` amounts,
/// `$3` routes, `$4` request ids, `$5` the caller's slot for each. The key rows are
/// locked in id order first (batches on other replicas cannot deadlock with this one).
/// Holds on one key are granted in slot order while their running sum fits the
/// balance, as if taken one by one (a hold that does not fit refuses the later ones on
/// that key too). Each granted hold gets its row id before the insert, so the answer
/// (slot, hold id, key id, balance left) maps back exactly.
const HOLD_MANY: &str = "
    WITH req AS (
        SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::text[], $4::text[], $5::int[])
            AS r(secret, amount, route, request_id, slot)
    ), locked AS (
        SELECT id, secret_hash, balance FROM keys
        WHERE secret_hash = ANY($1) AND NOT revoked
        ORDER BY id FOR UPDATE
    ), wanted AS (
        SELECT req.*, locked.id AS key_id, locked.balance AS before,
               sum(req.amount) OVER (PARTITION BY req.secret ORDER BY req.slot) AS upto
        FROM req JOIN locked ON locked.secret_hash = req.secret
    ), granted AS MATERIALIZED (
        SELECT wanted.*, nextval(pg_get_serial_sequence('transactions', 'id')) AS hold_id
        FROM wanted WHERE upto <= before
    ), debited AS (
        UPDATE keys SET balance = keys.balance - per_key.total
        FROM (SELECT key_id, sum(amount)::bigint AS total FROM granted GROUP BY key_id) AS per_key
        WHERE keys.id = per_key.key_id
    ), inserted AS (
        INSERT INTO transactions (id, key_id, kind, amount, route, request_id, status)
        OVERRIDING SYSTEM VALUE
        SELECT hold_id, key_id, 'debit', amount, route, request_id, 'pending' FROM granted
    )
    SELECT slot, hold_id, key_id, (before - upto)::bigint FROM granted";

/// Captures the pending holds among `$1` (hold ids); returns the ids captured. Still
/// pending is tested as `NOT IN ('captured', 'released')`, not `= 'pending'`, so that
/// the planner looks the ids up by primary key (see the module documentation).
pub const CAPTURE_MANY: &str = "
    UPDATE transactions SET status = 'captured'
    WHERE id = ANY($1) AND kind = 'debit' AND status NOT IN ('captured', 'released')
    RETURNING id";

const KEY_BY_SECRET: &str = "SELECT id, revoked, balance FROM keys WHERE secret_hash = $1";

/// Releases one pending hold: status, balance and `refund` row in one statement.
const RELEASE: &str = "
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

const KEY_COLUMNS: &str = "id, label, balance, revoked, created_at";
const TX_COLUMNS: &str = "id, key_id, kind, amount, route, request_id, status, created_at";

fn key_info(r: &tokio_postgres::Row) -> Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.try_get(0)?,
        label: r.try_get(1)?,
        balance: micros(r.try_get(2)?),
        revoked: r.try_get(3)?,
        created_at: r.try_get(4)?,
    })
}

fn transaction(r: &tokio_postgres::Row) -> Result<Transaction> {
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
fn refusal(row: Option<tokio_postgres::Row>) -> Result<HoldOutcome> {
    Ok(match row {
        None => HoldOutcome::UnknownKey,
        Some(r) if r.try_get::<_, bool>(1)? => HoldOutcome::Revoked { key_id: r.try_get(0)? },
        Some(r) => HoldOutcome::Insufficient { key_id: r.try_get(0)?, balance: micros(r.try_get(2)?) },
    })
}

fn held(r: &tokio_postgres::Row) -> Result<HoldOutcome> {
    Ok(HoldOutcome::Held { hold: HoldId(r.try_get(0)?), key_id: r.try_get(1)?, balance: micros(r.try_get(2)?) })
}

// === impl Ledger ===

#[async_trait]
impl Ledger for PostgresLedger {
    async fn create_key(&self, label: Option<&str>, balance: Micros) -> Result<NewKey> {
        let opening = to_db(balance)?;
        let (id, secret) = generate_key();
        // Only the hash is sent: the secret is never stored.
        let hash = SecretHash::of(&secret);
        self.run(async |c| {
            let stmt = c
                .prepare_cached(
                    "WITH k AS (
                         INSERT INTO keys (id, secret_hash, label, balance) VALUES ($1, $2, $3, $4)
                         RETURNING id
                     )
                     INSERT INTO transactions (key_id, kind, amount)
                     SELECT id, 'credit', $4 FROM k WHERE $4 > 0",
                )
                .await?;
            c.execute(&stmt, &[&id, &&hash.0[..], &label, &opening]).await?;
            Ok(())
        })
        .await?;
        Ok(NewKey { id, key: secret, balance })
    }

    async fn key(&self, id: &str) -> Result<Option<KeyInfo>> {
        self.run(async |c| {
            let stmt = c.prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = $1")).await?;
            c.query_opt(&stmt, &[&id]).await?.as_ref().map(key_info).transpose()
        })
        .await
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        self.run(async |c| {
            let stmt = c.prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY seq")).await?;
            c.query(&stmt, &[]).await?.iter().map(key_info).collect()
        })
        .await
    }

    async fn revoke(&self, id: &str) -> Result<bool> {
        self.run(async |c| {
            let stmt = c.prepare_cached("UPDATE keys SET revoked = true WHERE id = $1").await?;
            Ok(c.execute(&stmt, &[&id]).await? > 0)
        })
        .await
    }

    async fn credit(&self, id: &str, amount: Micros, idempotency_key: Option<&str>) -> Result<CreditOutcome> {
        let delta = to_db(amount)?;
        if delta == 0 {
            return Err(LedgerError::Other("a credit must be a positive amount".into()));
        }
        // The credit row and the balance move together or not at all; a second top-up
        // with the same idempotency key inserts nothing, so moves nothing. A balance
        // past i64::MAX fails the statement (SQLSTATE 22003: Overflow).
        const CREDIT: &str = "
            WITH credit AS (
                INSERT INTO transactions (key_id, kind, amount, idempotency_key)
                SELECT id, 'credit', $2, $3 FROM keys WHERE id = $1
                ON CONFLICT (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL
                DO NOTHING
                RETURNING key_id, amount
            )
            UPDATE keys SET balance = keys.balance + credit.amount
            FROM credit WHERE keys.id = credit.key_id
            RETURNING keys.balance";
        self.run(async |c| {
            let tx = c.transaction().await?;
            if let Some(idem) = idempotency_key {
                // Until this transaction ends, no other credit naming this idempotency
                // key (for any key id, on any replica) can look or insert.
                let stmt = tx.prepare_cached("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))").await?;
                tx.execute(&stmt, &[&idem, &IDEMPOTENCY_LOCK_SEED]).await?;
                // This key's own row first: older versions scoped idempotency keys per
                // key, so a database may hold the same one on several keys.
                let stmt = tx
                    .prepare_cached(
                        "SELECT key_id, amount FROM transactions WHERE idempotency_key = $2
                         ORDER BY key_id = $1 DESC LIMIT 1",
                    )
                    .await?;
                if let Some(row) = tx.query_opt(&stmt, &[&id, &idem]).await? {
                    let (key_id, seen): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
                    if key_id != id || seen != delta {
                        return Err(LedgerError::IdempotencyConflict {
                            idempotency_key: idem.to_owned(),
                            key_id,
                            amount: micros(seen),
                        });
                    }
                }
            }
            let stmt = tx.prepare_cached(CREDIT).await?;
            if let Some(row) = tx.query_opt(&stmt, &[&id, &delta, &idempotency_key]).await? {
                let balance = micros(row.try_get(0)?);
                tx.commit().await?;
                return Ok(CreditOutcome { balance, applied: true });
            }
            // Nothing applied: no such key, or this top-up was seen before.
            let stmt = tx.prepare_cached("SELECT balance FROM keys WHERE id = $1").await?;
            match tx.query_opt(&stmt, &[&id]).await? {
                Some(row) => Ok(CreditOutcome { balance: micros(row.try_get(0)?), applied: false }),
                None => Err(LedgerError::NoSuchKey(id.to_owned())),
            }
        })
        .await
    }

    /// Outcomes are checked in this order: unknown key, revoked, spend cap, balance.
    /// The spend cap counts debits taken in the window that are pending or captured: a
    /// released hold is not spending (its refund cancels it).
    async fn authorize(&self, req: HoldRequest<'_>) -> Result<HoldOutcome> {
        let amount = to_db(req.amount)?;
        if amount == 0 {
            return Err(LedgerError::Other("a hold must be for a positive amount (free routes take no hold)".into()));
        }
        let HoldRequest { secret, amount: requested, route, request_id, spend_cap } = req;
        let secret_bytes = &secret.0[..];
        let Some((cap, window)) = spend_cap else {
            let (reply, answer) = oneshot::channel();
            let job = HoldJob { secret, amount, route: route.to_owned(), request_id: request_id.to_owned(), reply };
            return self.batched(|b| &b.holds, job, answer).await;
        };
        let window = seconds(window);
        self.run(async |c| {
            let tx = c.transaction().await?;
            // The key row lock serialises every hold on this key, on every replica,
            // until this transaction ends: the sum below cannot go stale.
            let stmt = tx.prepare_cached(&format!("{KEY_BY_SECRET} FOR UPDATE")).await?;
            let Some(key) = tx.query_opt(&stmt, &[&secret_bytes]).await? else {
                return Ok(HoldOutcome::UnknownKey);
            };
            let key_id: String = key.try_get(0)?;
            if key.try_get::<_, bool>(1)? {
                return Ok(HoldOutcome::Revoked { key_id });
            }
            let balance = micros(key.try_get(2)?);
            let stmt = tx
                .prepare_cached(
                    "SELECT coalesce(sum(amount), 0)::bigint FROM transactions
                     WHERE key_id = $1 AND created_at >= floor(extract(epoch FROM now()))::bigint - $2
                       AND kind = 'debit' AND status IN ('pending', 'captured')",
                )
                .await?;
            let spent = micros(tx.query_one(&stmt, &[&key_id, &window]).await?.try_get(0)?);
            if spent.checked_add(requested).is_none_or(|total| total > cap) {
                return Ok(HoldOutcome::SpendCapReached { key_id, spent, cap });
            }
            if balance < requested {
                return Ok(HoldOutcome::Insufficient { key_id, balance });
            }
            let stmt = tx.prepare_cached(HOLD).await?;
            let outcome = match tx.query_opt(&stmt, &[&amount, &secret_bytes, &route, &request_id]).await? {
                Some(row) => held(&row)?,
                // Unreachable while the row lock is held; kept for the invariant.
                None => refusal(tx.query_opt(KEY_BY_SECRET, &[&secret_bytes]).await?)?,
            };
            tx.commit().await?;
            Ok(outcome)
        })
        .await
    }

    /// Captures are batched (see `capture_loop`): while one batch's statement runs,
    /// the next batch gathers, so under load many captures share one commit.
    async fn capture(&self, hold: HoldId) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.batched(|b| &b.captures, (hold, reply), answer).await
    }

    async fn release(&self, hold: HoldId) -> Result<()> {
        self.run(async |c| {
            let released: i64 = c.query_typed_one(RELEASE, &[(&hold.0, Type::INT8)]).await?.try_get(0)?;
            if released == 0 {
                // Already released or captured: nothing to do (idempotent).
                let sql = "SELECT 1 FROM transactions WHERE id = $1 AND kind = 'debit'";
                if c.query_typed_opt(sql, &[(&hold.0, Type::INT8)]).await?.is_none() {
                    return Err(no_hold(hold));
                }
            }
            Ok(())
        })
        .await
    }

    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64> {
        let age = seconds(older_than);
        self.run(async |c| {
            let tx = c.transaction().await?;
            // Zero means every pending hold, even one stamped in the future by a clock
            // that has since stepped back. Holds another replica is sweeping (or
            // capturing) right now are locked: skip them rather than wait.
            let stmt = tx
                .prepare_cached(
                    "SELECT id, key_id FROM transactions
                     WHERE kind = 'debit' AND status = 'pending'
                       AND ($1::bigint = 0 OR created_at <= floor(extract(epoch FROM now()))::bigint - $1::bigint)
                     FOR UPDATE SKIP LOCKED",
                )
                .await?;
            let rows = tx.query(&stmt, &[&age]).await?;
            if rows.is_empty() {
                return Ok(0);
            }
            let holds = rows.iter().map(|r| r.try_get::<_, i64>(0)).collect::<std::result::Result<Vec<_>, _>>()?;
            let keys = rows.iter().map(|r| r.try_get::<_, &str>(1)).collect::<std::result::Result<Vec<_>, _>>()?;
            // Lock the keys in one order, so concurrent sweeps cannot deadlock.
            let stmt = tx.prepare_cached("SELECT 1 FROM keys WHERE id = ANY($1) ORDER BY id FOR UPDATE").await?;
            tx.query(&stmt, &[&keys]).await?;
            let sql = "WITH released AS (
                     UPDATE transactions SET status = 'released'
                     WHERE id = ANY($1) AND kind = 'debit' AND status NOT IN ('captured', 'released')
                     RETURNING id, key_id, amount, route, request_id
                 ), per_key AS (
                     SELECT key_id, sum(amount)::bigint AS amount FROM released GROUP BY key_id
                 ), refunded AS (
                     UPDATE keys SET balance = keys.balance + per_key.amount
                     FROM per_key WHERE keys.id = per_key.key_id
                 ), refunds AS (
                     INSERT INTO transactions (key_id, kind, amount, route, request_id)
                     SELECT key_id, 'refund', amount, route, request_id FROM released ORDER BY id
                 )
                 SELECT count(*) FROM released";
            let released: i64 = tx.query_typed_one(sql, &[(&holds, Type::INT8_ARRAY)]).await?.try_get(0)?;
            tx.commit().await?;
            Ok(u64::try_from(released).unwrap_or(0))
        })
        .await
    }

    async fn transaction_page(&self, query: TxQuery<'_>) -> Result<TxPage> {
        let limit = i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX);
        let before = query.before.map(|c| (c.created_at, c.id));
        self.run(async |c| {
            // One statement text per shape, so each is planned on its index:
            // (key_id, created_at, id) with a key, (created_at, id) without.
            let mut sql = format!("SELECT {TX_COLUMNS} FROM transactions WHERE true");
            let mut args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::with_capacity(4);
            if let Some(key) = &query.key {
                args.push(key);
                sql.push_str(&format!(" AND key_id = ${}", args.len()));
            }
            if let Some((created_at, id)) = &before {
                args.push(created_at);
                args.push(id);
                sql.push_str(&format!(" AND (created_at, id) < (${}, ${})", args.len() - 1, args.len()));
            }
            args.push(&limit);
            sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT ${}", args.len()));
            let stmt = c.prepare_cached(&sql).await?;
            let rows = c.query(&stmt, &args).await?.iter().map(transaction).collect::<Result<Vec<_>>>()?;
            Ok(TxPage::newest_first(rows, query.limit))
        })
        .await
    }

    async fn reserve_nonce(&self, payer: &str, nonce: &str, valid_before: u64) -> Result<bool> {
        let valid_before = i64::try_from(valid_before).map_err(|_| LedgerError::Overflow)?;
        let payer = payer.to_lowercase();
        let nonce = nonce.to_lowercase();
        self.run(async |c| {
            let stmt = c
                .prepare_cached(
                    "INSERT INTO x402_nonces (payer, nonce, valid_before) VALUES ($1, $2, $3)
                     ON CONFLICT (payer, nonce) DO NOTHING",
                )
                .await?;
            Ok(c.execute(&stmt, &[&payer, &nonce, &valid_before]).await? == 1)
        })
        .await
    }

    async fn purge_nonces(&self, now: u64) -> Result<u64> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.run(async |c| {
            let stmt = c.prepare_cached("DELETE FROM x402_nonces WHERE valid_before < $1").await?;
            Ok(c.execute(&stmt, &[&now]).await?)
        })
        .await
    }

    async fn record_settlement(&self, s: &Settlement) -> Result<()> {
        let amount = i64::try_from(s.amount).map_err(|_| LedgerError::Overflow)?;
        self.run(async |c| {
            let stmt = c
                .prepare_cached(
                    "INSERT INTO settlements (rail, payer, amount, asset, network, tx_hash, route, request_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await?;
            c.execute(&stmt, &[&s.rail, &s.payer, &amount, &s.asset, &s.network, &s.tx_hash, &s.route, &s.request_id])
                .await?;
            Ok(())
        })
        .await
    }

    async fn settlements(&self, limit: usize) -> Result<Vec<Settlement>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(async |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT rail, payer, amount, asset, network, tx_hash, route, request_id
                     FROM settlements ORDER BY id DESC LIMIT $1",
                )
                .await?;
            c.query(&stmt, &[&limit])
                .await?
                .iter()
                .map(|r| {
                    Ok(Settlement {
                        rail: r.try_get(0)?,
                        payer: r.try_get(1)?,
                        amount: u64::try_from(r.try_get::<_, i64>(2)?).unwrap_or(0),
                        asset: r.try_get(3)?,
                        network: r.try_get(4)?,
                        tx_hash: r.try_get(5)?,
                        route: r.try_get(6)?,
                        request_id: r.try_get(7)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.run(async |c| {
            let stmt = c
                .prepare_cached(
                    "INSERT INTO health (id, checked_at) VALUES (1, floor(extract(epoch FROM now()))::bigint)
                     ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                )
                .await?;
            c.execute(&stmt, &[]).await?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_sqlstates_are_unavailable() {
        for code in ["57014", "57P01", "57P03", "08006", "53300", "40001", "40P01", "55P03", "25006", "58030"] {
            assert!(transient(code), "{code}");
        }
        for code in ["23505", "23514", "42P01", "22P02", "XX000"] {
            assert!(!transient(code), "{code}");
        }
    }

    #[test]
    fn messages_never_show_the_password() {
        let pg: PgConfig = "postgres://tollgate:s3cret@db.internal:6432/ledger".parse().unwrap();
        assert_eq!(describe(&pg), "db.internal:6432/ledger");
    }

    #[tokio::test]
    async fn a_bad_url_is_a_config_error() {
        let err = PostgresLedger::connect("postgres://h:notaport/db", PostgresOptions::default()).await.unwrap_err();
        assert!(matches!(err, LedgerError::Other(_)), "{err}");
        assert!(err.to_string().contains("ledger.url"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        // A port nothing listens on: connection refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("postgres://tollgate@127.0.0.1:{port}/tollgate");
        let err = PostgresLedger::connect(&url, PostgresOptions::default()).await.unwrap_err();
        assert!(matches!(err, LedgerError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}/tollgate")), "{err}");
    }
}
