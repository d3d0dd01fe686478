//! The PostgreSQL ledger: one shared ledger for several replicas. Same meaning as the
//! SQLite ledger, row for row (what a ledger promises is in [`Ledger`] and
//! ARCHITECTURE.md, "Invariants"); what differs is how the guarantees are kept when
//! several processes on several machines write at once.
//!
//! The folder: this file has the ledger and its [`Ledger`] impl; `batch.rs` the
//! batching rounds of holds and captures; `lease.rs` the leases that keep open holds
//! from being swept while their replica lives; `pool.rs` connections, timeouts and what
//! errors mean; `sql.rs` the statements shared by several operations; `schema.sql` and
//! `schema.rs` the schema and its migrations.
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
//!   captured since the last vacuum, so under load every batch of captures would scan
//!   the dead entries and their heap pages (`postgres::captures_use_the_primary_key_
//!   not_the_pending_index` in the tests). These lookups by id are also sent unprepared
//!   (`query_typed`: one round trip, planned for the ids at hand) rather than as
//!   cached prepared statements: a prepared statement's generic plan is made after a
//!   few executions, and one made while the table was still tiny is a sequential scan
//!   that stays in the connection until something invalidates it — on a new ledger
//!   every capture would then read the whole table.
//! - **metered capture** (less than the hold, or with usage): one statement, like a
//!   release: the debit's amount becomes the captured amount, `held` keeps the hold
//!   (`SET held = amount` reads the old amount), and the rest goes back to the balance
//!   (`UPDATE keys … + (held − amount)`), only if the hold was still pending and covers
//!   the amount. The pending row already took the whole hold from the balance, so the
//!   invariant holds at every commit; no refund row is written for the rest. A
//!   fixed-price capture of the whole hold (the amount this ledger knows it held) is
//!   batched as before and moves no money; anything else runs on its own, so the batch
//!   never locks several key rows in an order of its own (a hold batch locks them in id
//!   order: mixing the two could deadlock).
//! - **stale holds**: a hold lives as long as its request: each replica renews a lease
//!   on the holds it has open (`touched_at`, see `lease.rs`), and the sweep takes only
//!   pending holds whose lease (or, never renewed, creation) is older than its age and
//!   that this ledger does not have open. They are locked `FOR UPDATE SKIP LOCKED`, so
//!   replicas sweeping at once split the work and never refund a hold twice; the keys
//!   to refund are then locked in id order, so two sweeps cannot deadlock.
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
//! `schema.sql`, applied through numbered migrations ([`MIGRATIONS`], `schema.rs`) at
//! start-up under an advisory lock, so replicas starting together apply them once. Use
//! a database of its own for tollgate: the table names (`keys`, `transactions`, …) are
//! plain.

mod batch;
mod lease;
mod pool;
mod schema;
mod sql;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::Type;
use tokio_postgres::Config as PgConfig;

use self::batch::{capture_loop, hold_loop, Batchers, HoldJob};
pub use self::batch::{CAPTURE_MANY, MAX_BATCH};
use self::lease::{heartbeat, Leases};
use self::pool::{describe, Connector};
pub use self::schema::{MIGRATIONS, MIGRATION_LOCK, SCHEMA, SCHEMA_VERSION};
use self::sql::{held, key_info, refusal, transaction, CAPTURE, HOLD, HOLD_STATE, KEY_BY_SECRET, RELEASE};
use super::rows::{
    capture_above_hold, credit_amount, from_db, hold_amount, int_to_db, no_hold, nonce_key, repeated_top_up,
    request_window, saturating, seconds, to_db, MeteredRow, KEY_COLUMNS, TX_COLUMNS,
};
use super::{
    generate_key, Account, CreditOutcome, HoldId, HoldOutcome, HoldRequest, KeyInfo, Ledger, LedgerError, Metered,
    NewKey, Result, SecretHash, Settlement, Transaction, TxPage, TxQuery,
};
use crate::money::Micros;

/// How much longer than the statement timeout the client waits for a whole operation
/// (pool wait, connect, every round trip) before giving up on it.
pub const CLIENT_MARGIN: Duration = Duration::from_secs(1);
/// Seed of `hashtextextended` for the advisory locks of idempotency keys, so they do not
/// share numbers with other users of `hashtextextended(…, 0)`.
const IDEMPOTENCY_LOCK_SEED: i64 = 0x746f_6c6c_6964_656d;

/// How often a ledger renews the leases of its open holds, by default.
pub const HOLD_HEARTBEAT: Duration = Duration::from_secs(10);

/// Pool and timeout settings (`[ledger]` `pool_size`, `statement_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Most connections this process opens.
    pub pool_size: usize,
    /// Server-side limit of one statement; the client allows [`CLIENT_MARGIN`] more for
    /// a whole operation.
    pub statement_timeout: Duration,
    /// How often the leases of the open holds are renewed (see `lease.rs`). It must
    /// stay far below the stale-hold sweep's age; [`HOLD_HEARTBEAT`] by default.
    pub hold_heartbeat: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions { pool_size: 16, statement_timeout: Duration::from_secs(2), hold_heartbeat: HOLD_HEARTBEAT }
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
    /// The holds this ledger has open (empty in the background tasks' handles: the
    /// heartbeat holds a weak reference to the ledger's, so it ends with the ledger).
    leases: Arc<Leases>,
}

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
        let mut ledger = PostgresLedger { pool, op_timeout, target, batchers: None, leases: Arc::default() };
        ledger.migrate().await?;
        let (holds, holds_rx) = mpsc::channel(4 * MAX_BATCH);
        let (captures, captures_rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(hold_loop(ledger.handle(), holds_rx));
        tokio::spawn(capture_loop(ledger.handle(), captures_rx));
        // tokio refuses (panics on) a zero interval.
        let every = opts.hold_heartbeat.max(Duration::from_millis(10));
        tokio::spawn(heartbeat(ledger.handle(), Arc::downgrade(&ledger.leases), every));
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
            leases: Arc::default(),
        }
    }

    /// [`Ledger::release`] without ending the lease.
    async fn release_unleased(&self, hold: HoldId) -> Result<()> {
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

    /// Starts the lease of a hold just taken.
    fn leased(&self, outcome: Result<HoldOutcome>, amount: i64) -> Result<HoldOutcome> {
        if let Ok(HoldOutcome::Held { hold, .. }) = &outcome {
            self.leases.insert(hold.0, amount);
        }
        outcome
    }

    /// A capture of zero: the hold is released (refund row and all); true unless there
    /// is no such hold, since charging nothing is always possible.
    async fn capture_nothing(&self, hold: HoldId) -> Result<bool> {
        self.release_unleased(hold).await.map(|()| true)
    }

    /// A capture that is not a batched fixed-price one: [`CAPTURE`], then, if it did not
    /// capture, why.
    async fn capture_one(&self, hold: HoldId, amount: i64, m: &MeteredRow) -> Result<bool> {
        let [input, cached_input, cache_write_input, output] = &m.tokens;
        self.run(async |c| {
            let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 8] = [
                (&hold.0, Type::INT8),
                (&amount, Type::INT8),
                (&m.model, Type::TEXT),
                (input, Type::INT8),
                (cached_input, Type::INT8),
                (cache_write_input, Type::INT8),
                (output, Type::INT8),
                (&m.usage_source, Type::TEXT),
            ];
            let captured: i64 = c.query_typed_one(CAPTURE, &params).await?.try_get(0)?;
            if captured == 1 {
                return Ok(true);
            }
            let Some(row) = c.query_typed_opt(HOLD_STATE, &[(&hold.0, Type::INT8)]).await? else {
                return Err(no_hold(hold));
            };
            let (kind, status, held): (&str, Option<&str>, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            if kind != "debit" {
                return Err(no_hold(hold));
            }
            if amount > held {
                return Err(capture_above_hold(hold, Micros(amount.unsigned_abs()), held));
            }
            match status {
                Some("captured") => Ok(true),
                Some("released") => Ok(false),
                // Pending and covering the amount, yet not captured: it changed between
                // the two statements. The caller withholds the response; the hold is
                // released by the sweep if nothing else closes it.
                _ => Err(LedgerError::Unavailable(format!("hold {} changed while it was captured; retry", hold.0))),
            }
        })
        .await
    }
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
        let delta = credit_amount(amount)?;
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
                // At most one row carries it: an idempotency key names one top-up in
                // the whole ledger, and the lock above serialises the credits naming it.
                let stmt =
                    tx.prepare_cached("SELECT key_id, amount FROM transactions WHERE idempotency_key = $1").await?;
                let seen = match tx.query_opt(&stmt, &[&idem]).await? {
                    Some(row) => Some((row.try_get(0)?, row.try_get(1)?)),
                    None => None,
                };
                // A repeat goes on: the insert below then finds the row and does nothing.
                repeated_top_up(idem, id, delta, seen)?;
            }
            let stmt = tx.prepare_cached(CREDIT).await?;
            if let Some(row) = tx.query_opt(&stmt, &[&id, &delta, &idempotency_key]).await? {
                let balance = from_db(row.try_get(0)?)?;
                tx.commit().await?;
                return Ok(CreditOutcome { balance, applied: true });
            }
            // Nothing applied: no such key, or this top-up was seen before.
            let stmt = tx.prepare_cached("SELECT balance FROM keys WHERE id = $1").await?;
            match tx.query_opt(&stmt, &[&id]).await? {
                Some(row) => Ok(CreditOutcome { balance: from_db(row.try_get(0)?)?, applied: false }),
                None => Err(LedgerError::NoSuchKey(id.to_owned())),
            }
        })
        .await
    }

    /// Outcomes are checked in this order: unknown key, revoked, spend cap, balance.
    /// The spend cap counts debits taken in the window that are pending or captured: a
    /// released hold is not spending (its refund cancels it).
    async fn authorize(&self, req: HoldRequest<'_>) -> Result<HoldOutcome> {
        let amount = hold_amount(req.amount)?;
        let HoldRequest { secret, amount: requested, route, request_id, spend_cap } = req;
        let secret_bytes = &secret.0[..];
        let Some((cap, window)) = spend_cap else {
            let (reply, answer) = oneshot::channel();
            let job = HoldJob { secret, amount, route: route.to_owned(), request_id: request_id.to_owned(), reply };
            return self.leased(self.batched(|b| &b.holds, job, answer).await, amount);
        };
        let window = seconds(window);
        let outcome = self
            .run(async |c| {
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
                let balance = from_db(key.try_get(2)?)?;
                let stmt = tx
                    .prepare_cached(
                        "SELECT coalesce(sum(amount), 0)::bigint FROM transactions
                     WHERE key_id = $1 AND created_at >= floor(extract(epoch FROM now()))::bigint - $2
                       AND kind = 'debit' AND status IN ('pending', 'captured')",
                    )
                    .await?;
                let spent = from_db(tx.query_one(&stmt, &[&key_id, &window]).await?.try_get(0)?)?;
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
            .await;
        self.leased(outcome, amount)
    }

    /// Fixed-price captures of the whole hold are batched (see `capture_loop`): while
    /// one batch's statement runs, the next batch gathers, so under load many captures
    /// share one commit. The others run alone ([`CAPTURE`]; see the module docs).
    async fn capture(&self, hold: HoldId, amount: Micros, metered: Option<&Metered>) -> Result<bool> {
        let amount = to_db(amount)?;
        let metered_row = MeteredRow::of(metered)?;
        let leased = self.leases.amount(hold.0);
        if let Some(held) = leased.filter(|held| amount > *held) {
            // Nothing changes: the hold stays open, and leased.
            return Err(capture_above_hold(hold, Micros(amount.unsigned_abs()), held));
        }
        let captured = if amount == 0 {
            self.capture_nothing(hold).await
        } else if metered.is_none() && leased == Some(amount) {
            let (reply, answer) = oneshot::channel();
            self.batched(|b| &b.captures, (hold, reply), answer).await
        } else {
            self.capture_one(hold, amount, &metered_row).await
        };
        // Whatever the answer: a hold that failed to capture must become sweepable.
        self.leases.remove(hold.0);
        captured
    }

    async fn release(&self, hold: HoldId) -> Result<()> {
        let released = self.release_unleased(hold).await;
        self.leases.remove(hold.0);
        released
    }

    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64> {
        let age = seconds(older_than);
        let mine = self.leases.ids();
        self.run(async |c| {
            let tx = c.transaction().await?;
            // Zero means every pending hold not open here, even one stamped in the
            // future by a clock that has since stepped back. A hold's age counts from
            // its last lease renewal. Holds another replica is sweeping (or capturing)
            // right now are locked: skip them rather than wait.
            let stmt = tx
                .prepare_cached(
                    "SELECT id, key_id FROM transactions
                     WHERE kind = 'debit' AND status = 'pending' AND NOT (id = ANY($2::bigint[]))
                       AND ($1::bigint = 0
                            OR coalesce(touched_at, created_at) <= floor(extract(epoch FROM now()))::bigint - $1::bigint)
                     FOR UPDATE SKIP LOCKED",
                )
                .await?;
            let rows = tx.query(&stmt, &[&age, &mine]).await?;
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

    async fn account(&self, secret: SecretHash, spend_window: Option<Duration>) -> Result<Option<Account>> {
        let window = spend_window.map(seconds);
        let secret_bytes = &secret.0[..];
        self.run(async |c| {
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS},
                         (SELECT coalesce(sum(amount), 0)::bigint FROM transactions
                          WHERE key_id = keys.id AND kind = 'debit' AND status = 'pending'),
                         CASE WHEN $2::bigint IS NOT NULL THEN
                             (SELECT coalesce(sum(amount), 0)::bigint FROM transactions
                              WHERE key_id = keys.id
                                AND created_at >= floor(extract(epoch FROM now()))::bigint - $2::bigint
                                AND kind = 'debit' AND status IN ('pending', 'captured'))
                         END
                     FROM keys WHERE secret_hash = $1"
                ))
                .await?;
            let Some(row) = c.query_opt(&stmt, &[&secret_bytes, &window]).await? else {
                return Ok(None);
            };
            let key = key_info(&row)?;
            let held = from_db(row.try_get(5)?)?;
            let spent = row.try_get::<_, Option<i64>>(6)?.map(from_db).transpose()?;
            Ok(Some(Account { key, held, spent }))
        })
        .await
    }

    async fn request_transactions(&self, key_id: &str, request_id: &str) -> Result<Vec<Transaction>> {
        let (from, to) = request_window(request_id).unwrap_or((i64::MIN, i64::MAX));
        self.run(async |c| {
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT {TX_COLUMNS} FROM transactions
                     WHERE key_id = $1 AND created_at BETWEEN $3 AND $4 AND request_id = $2
                     ORDER BY created_at, id"
                ))
                .await?;
            c.query(&stmt, &[&key_id, &request_id, &from, &to]).await?.iter().map(transaction).collect()
        })
        .await
    }

    async fn transaction_page(&self, query: TxQuery<'_>) -> Result<TxPage> {
        let limit = saturating(query.limit.saturating_add(1));
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
        let valid_before = int_to_db(valid_before)?;
        let (payer, nonce) = nonce_key(payer, nonce);
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
        let now = saturating(now);
        self.run(async |c| {
            let stmt = c.prepare_cached("DELETE FROM x402_nonces WHERE valid_before < $1").await?;
            Ok(c.execute(&stmt, &[&now]).await?)
        })
        .await
    }

    async fn record_settlement(&self, s: &Settlement) -> Result<()> {
        let amount = int_to_db(s.amount)?;
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
        let limit = saturating(limit);
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
                        amount: from_db(r.try_get(2)?)?.get(),
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
