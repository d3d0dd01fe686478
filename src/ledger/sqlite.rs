//! The embedded SQLite ledger: the default backend, zero setup, one replica
//! (DESIGN §5 "Ledger semantics").
//!
//! # Threads
//!
//! SQLite calls block, so none of them run on the async runtime. One dedicated
//! **writer** thread owns the read-write connection and executes every command that
//! writes (and `ping`); one **reader** thread owns a second, query-only connection for
//! the admin reads (`key`, `list_keys`, `transactions`, `settlements`). In WAL mode a
//! reader never blocks the writer, so a slow admin listing cannot delay `authorize`.
//! Callers send a closure over a bounded channel and await a `oneshot` reply; a full
//! channel makes them wait (backpressure) instead of queueing without bound.
//!
//! # Group commit
//!
//! The writer takes every command already queued (up to [`MAX_BATCH`]) and runs them in
//! ONE `BEGIN IMMEDIATE … COMMIT`, so one commit (and, with `synchronous=FULL`, one
//! fsync) is shared by the whole batch. Each command runs inside its own `SAVEPOINT`:
//! a command that fails (or panics) is rolled back alone and the others still commit.
//! Replies are sent only after the `COMMIT` returned, so an acknowledged capture, credit
//! or nonce is always committed (they travel as one message per batch to a task on the
//! runtime that opened the ledger, which wakes each caller: one cross-thread wake-up
//! per batch instead of one per command); if the `COMMIT` fails, every command of the batch gets
//! the error. Correctness does not depend on batching: the single writer serialises all
//! commands, and each one is atomic.
//!
//! # Open holds live in memory
//!
//! One process owns the file (the gateway takes a lock), so open holds are kept in a
//! [`Book`] in memory rather than written as `pending` rows: `authorize` decides on the
//! calling thread, without a database round trip, and a paid request costs one durable
//! write (its capture) instead of two. Listings show open holds as `pending` debits, as
//! before. See [`super::holds`] for how the cached balances stay exact and why a crash
//! cannot lose or double a charge. Another process changing the file (`tollgate keys
//! credit` or `revoke` while the gateway runs) is noticed through `PRAGMA data_version`
//! **on every hold**, before the cache is trusted (see `Watch`): a revocation or a
//! top-up made by `tollgate keys` holds for every request that starts after the
//! command returned.
//!
//! # Durability
//!
//! The database runs in WAL mode.
//! - **`kill -9`** (process crash): every acknowledged command survives with either
//!   setting, because a commit is in the WAL file (at least in the OS page cache)
//!   before the reply is sent. Open holds die with the process: they were never written,
//!   so nothing is held after a restart (databases written by older versions may still
//!   have `pending` rows; [`Ledger::release_stale_holds`] releases those).
//! - **Power loss or OS crash**: with `synchronous=NORMAL` (the default) the WAL is
//!   fsynced only at checkpoints (every [`CHECKPOINT_EVERY`] while there is something
//!   to copy), so the transactions committed since the last checkpoint may be lost (the database stays consistent: it rolls back to an earlier
//!   commit, never to a torn one). With `synchronous=FULL`
//!   ([`SqliteOptions::synchronous_full`]) every commit is fsynced before it is
//!   acknowledged, so nothing acknowledged is lost; group commit keeps that affordable.
//!
//! # Schema
//!
//! Migrations are numbered (the position in [`MIGRATIONS`]) and tracked with
//! `PRAGMA user_version`; those not yet applied run in one transaction at open, so
//! re-opening an up-to-date database changes nothing. Amounts are `INTEGER` (i64) in
//! SQLite and [`Micros`] (u64) in Rust; values above `i64::MAX` are refused with
//! [`LedgerError::Overflow`].

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::holds::{Attempt, Book, OpenHold, ID_BLOCK, ID_LOW_WATER};
use super::{
    generate_key, CreditOutcome, Cursor, HoldId, HoldOutcome, HoldRequest, KeyInfo, Ledger, LedgerError, NewKey,
    Result, SecretHash, Settlement, Transaction, TxKind, TxPage, TxQuery,
};
use crate::money::Micros;

/// Most commands one write transaction carries.
pub const MAX_BATCH: usize = 256;
/// Commands that may wait for a connection thread before callers wait for room.
const QUEUE_DEPTH: usize = 4096;
/// How long a statement waits for a lock held by another connection (another process
/// opening the same file, or the reader during a checkpoint) before failing closed.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Durability settings (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `PRAGMA synchronous=FULL`: fsync every commit, so nothing acknowledged is lost
    /// on power loss. The default (`false`, `NORMAL`) survives a process crash
    /// (`kill -9`) but may lose the last commits on power loss.
    pub synchronous_full: bool,
    /// How long a statement waits for a lock held by another connection before the
    /// ledger answers `Unavailable` (fail closed). `ledger.statement_timeout`.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { synchronous_full: false, busy_timeout: BUSY_TIMEOUT }
    }
}

/// The SQLite [`Ledger`]. Dropping it stops its threads after the queued commands ran
/// and closes the database (which checkpoints the WAL).
pub struct SqliteLedger {
    writer: Worker,
    reader: Worker,
    _checkpointer: Checkpointer,
    commits: Arc<AtomicU64>,
    book: Book,
    watch: Arc<Watch>,
}

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLedger").field("commits", &self.commit_count()).finish()
    }
}

// === impl SqliteLedger ===

impl SqliteLedger {
    /// Opens (creating if needed) the database at `path`, applies pending migrations
    /// and starts the writer and reader threads. Blocking: call it before serving.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<SqliteLedger> {
        let mut conn = connect(path, opts.busy_timeout)?;
        let sync = if opts.synchronous_full { "FULL" } else { "NORMAL" };
        // Checkpoints (which fsync the database file) run on their own thread, so the
        // writer never stalls a payment behind one.
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;"
        ))?;
        migrate(&mut conn).map_err(|e| LedgerError::Other(format!("{}: {e}", path.display())))?;

        let reader_conn = connect(path, opts.busy_timeout)?;
        reader_conn.execute_batch("PRAGMA query_only = ON;")?;

        let commits = Arc::new(AtomicU64::new(0));
        let book = Book::default();
        let watch_conn = connect(path, opts.busy_timeout)?;
        watch_conn.execute_batch("PRAGMA query_only = ON;")?;
        let watch = Arc::new(Watch::new(watch_conn));
        // Replies go through a task on the runtime that opened the ledger, if any (the
        // gateway's; it runs as long as the gateway does).
        let courier = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (courier, batches) = mpsc::unbounded_channel();
            rt.spawn(courier_loop(batches));
            courier
        });
        let writer = Worker::spawn("tollgate-ledger-writer", {
            let (commits, book, watch) = (commits.clone(), book.clone(), watch.clone());
            move |queue| write_loop(&conn, &book, &watch, queue, &commits, courier)
        })?;
        let reader = Worker::spawn("tollgate-ledger-reader", {
            let book = book.clone();
            move |queue| read_loop(&reader_conn, &book, queue)
        })?;
        let nudge = writer.queue.as_ref().map(mpsc::Sender::downgrade);
        let checkpointer = Checkpointer::spawn(connect(path, opts.busy_timeout)?, nudge)?;
        Ok(SqliteLedger { writer, reader, _checkpointer: checkpointer, commits, book, watch })
    }

    /// Number of write transactions committed so far. Each may carry up to
    /// [`MAX_BATCH`] commands (group commit).
    pub fn commit_count(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    async fn write<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T> + Send + 'static,
    {
        self.writer.call(work).await
    }

    async fn read<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T> + Send + 'static,
    {
        self.reader.call(work).await
    }

    /// Caches the key with this secret (a read on the writer, so it is ordered with
    /// every balance change). False when there is no such key.
    async fn load(&self, secret: SecretHash) -> Result<bool> {
        self.write(move |tx| match key_by_secret(tx, &secret)? {
            Some((key_id, revoked, balance)) => {
                tx.book.load(secret, &key_id, revoked, balance);
                Ok(true)
            }
            None => Ok(false),
        })
        .await
    }

    /// Stored rows of `query`, newest first, at most `limit`.
    async fn stored_transactions(&self, query: TxQuery<'_>, limit: usize) -> Result<Vec<Transaction>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let key = query.key.map(str::to_owned);
        let before = query.before;
        self.read(move |conn| {
            // One statement text per shape, so each is planned on its index:
            // (key_id, created_at) with a key, (created_at) without; the id (rowid) is
            // the last column of both.
            let mut sql = format!("SELECT {TX_COLUMNS} FROM transactions WHERE true");
            let mut args: Vec<rusqlite::types::Value> = Vec::with_capacity(4);
            if let Some(key) = key {
                sql.push_str(" AND key_id = ?");
                args.push(key.into());
            }
            if let Some(c) = before {
                sql.push_str(" AND (created_at, id) < (?, ?)");
                args.extend([c.created_at.into(), c.id.into()]);
            }
            sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
            args.push(limit.into());
            let rows = conn
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(args), transaction)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// The spend-cap path: the spending in the window is a query, so the whole check
    /// runs on the writer, ordered with every capture.
    async fn authorize_capped(
        &self,
        secret: SecretHash,
        requested: Micros,
        route: &str,
        request_id: &str,
        (cap, window): (Micros, Duration),
    ) -> Result<HoldOutcome> {
        let window = seconds(window);
        let (route, request_id) = (route.to_owned(), request_id.to_owned());
        self.write(move |tx| {
            let now = now();
            let (key_id, revoked) = match tx.book.available(&secret) {
                Some((key_id, revoked, _)) => (key_id, revoked),
                None => match key_by_secret(tx, &secret)? {
                    None => return Ok(HoldOutcome::UnknownKey),
                    Some((key_id, revoked, balance)) => {
                        tx.book.load(secret, &key_id, revoked, balance);
                        (key_id, revoked)
                    }
                },
            };
            if revoked {
                return Ok(HoldOutcome::Revoked { key_id });
            }
            let captured: u64 = tx
                .prepare_cached(
                    "SELECT coalesce(sum(amount), 0) FROM transactions
                     WHERE key_id = ?1 AND created_at >= ?2
                       AND kind = 'debit' AND status IN ('pending', 'captured')",
                )?
                .query_row(params![key_id, now.saturating_sub(window)], |r| r.get(0))?;
            // Open holds are spending too; they are in the book, not in the table.
            let spent = Micros(captured).checked_add(tx.book.held(&key_id)).ok_or(LedgerError::Overflow)?;
            if spent.checked_add(requested).is_none_or(|total| total > cap) {
                return Ok(HoldOutcome::SpendCapReached { key_id, spent, cap });
            }
            match tx.book.try_hold(&secret, requested, &route, &request_id, now) {
                Attempt::Decided(outcome) => Ok(outcome),
                Attempt::Miss => Ok(HoldOutcome::UnknownKey),
                Attempt::NoIds => Err(no_ids()),
            }
        })
        .await
    }
}

/// A key as the admin reads show it: its balance less what its open holds keep aside.
fn less_held(mut key: KeyInfo, held: &HashMap<String, Micros>) -> KeyInfo {
    if let Some(h) = held.get(&key.id) {
        key.balance = key.balance.checked_sub(*h).unwrap_or(Micros::ZERO);
    }
    key
}

/// A committed balance as callers see it (as PostgreSQL, which writes holds, has it):
/// less what the key's open holds keep aside.
fn less_open_holds(tx: &Tx<'_>, key_id: &str, balance: u64) -> Micros {
    Micros(balance).checked_sub(tx.book.held(key_id)).unwrap_or(Micros::ZERO)
}

/// What a command runs against: the connection (through `Deref`) and the open holds.
pub struct Tx<'a> {
    conn: &'a Connection,
    book: &'a Book,
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

fn connect(path: &Path, busy_timeout: Duration) -> Result<Connection> {
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

/// Applies the migrations the database does not have yet, all in one transaction.
fn migrate(conn: &mut Connection) -> Result<()> {
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

// === connection threads ===

/// One unit of work for a connection thread, with its reply channel.
trait Command: Send {
    /// Runs the work; the returned reply is sent once the outcome is committed.
    fn run(self: Box<Self>, tx: &Tx<'_>) -> Box<dyn Reply>;
    /// Answers without running (the transaction could not start).
    fn abort(self: Box<Self>, err: LedgerError);
    /// False for a command that needs no write transaction.
    fn writes(&self) -> bool {
        true
    }
}

/// Wakes the writer, which syncs with other processes and reserves ids before every
/// batch; it writes nothing, so it opens no transaction.
struct Wake(oneshot::Sender<Result<()>>);

impl Command for Wake {
    fn run(self: Box<Self>, _: &Tx<'_>) -> Box<dyn Reply> {
        Box::new(Ran { result: Ok(()), reply: self.0 })
    }

    fn abort(self: Box<Self>, err: LedgerError) {
        let _ = self.0.send(Err(err));
    }

    fn writes(&self) -> bool {
        false
    }
}

/// The result of a command that ran, waiting for its transaction to end.
trait Reply: Send {
    fn failed(&self) -> bool;
    /// Sends the result; a success whose transaction did not commit becomes `lost`.
    fn send(self: Box<Self>, lost: Option<&LedgerError>);
}

struct Call<T, F> {
    work: F,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Command for Call<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Tx<'_>) -> Result<T> + Send + 'static,
{
    fn run(self: Box<Self>, tx: &Tx<'_>) -> Box<dyn Reply> {
        let Call { work, reply } = *self;
        Box::new(Ran { result: work(tx), reply })
    }

    fn abort(self: Box<Self>, err: LedgerError) {
        // The caller may have gone away (its future was dropped): nothing to tell.
        let _ = self.reply.send(Err(err));
    }
}

struct Ran<T> {
    result: Result<T>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T: Send> Reply for Ran<T> {
    fn failed(&self) -> bool {
        self.result.is_err()
    }

    fn send(self: Box<Self>, lost: Option<&LedgerError>) {
        let result = match (self.result, lost) {
            (Ok(_), Some(e)) => Err(e.clone()),
            (result, _) => result,
        };
        let _ = self.reply.send(result);
    }
}

fn stopped() -> LedgerError {
    LedgerError::Unavailable("the SQLite ledger thread stopped; see the logs above".into())
}

type Queue = mpsc::Receiver<Box<dyn Command>>;

/// A connection thread and the channel feeding it.
struct Worker {
    queue: Option<mpsc::Sender<Box<dyn Command>>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(name: &str, body: impl FnOnce(Queue) + Send + 'static) -> Result<Worker> {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(rx))
            .map_err(|e| LedgerError::Other(format!("cannot start thread {name}: {e}")))?;
        Ok(Worker { queue: Some(queue), thread: Some(thread) })
    }

    async fn call<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T> + Send + 'static,
    {
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        queue.send(Box::new(Call { work, reply })).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Sends a [`Wake`] and waits until the writer has handled it.
    async fn wake(&self) -> Result<()> {
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        let (reply, answer) = oneshot::channel();
        queue.send(Box::new(Wake(reply))).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the queued commands ran; joining
        // makes "dropped" mean "database closed" (the file can be reopened or removed).
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies the WAL back into the database file in the background (`PASSIVE`: it never
/// blocks the writer), every [`CHECKPOINT_EVERY`], and nudges an idle writer so it
/// looks for changes made by other processes. Stops and joins when dropped.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Short, so each checkpoint is small: it copies what the WAL gained in 50 ms, and a
/// request that shares the core with it waits less (credits p99 under `wrk -c1` on
/// one pinned core: 1.6–2.7 ms with 500 ms, 0.74–0.82 ms with 50 ms, throughput
/// unchanged). It also bounds what `synchronous=NORMAL` can lose to a power cut. A
/// checkpoint with nothing new to copy does nothing (no `fsync`).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

impl Checkpointer {
    fn spawn(conn: Connection, writer: Option<mpsc::WeakSender<Box<dyn Command>>>) -> Result<Checkpointer> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tollgate-ledger-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(error = %e, "ledger WAL checkpoint failed; will retry");
                    }
                    // A weak sender, so this thread never keeps the writer alive.
                    if let Some(queue) = writer.as_ref().and_then(mpsc::WeakSender::upgrade) {
                        let _ = queue.try_send(Box::new(Wake(oneshot::channel().0)));
                    }
                }
            })
            .map_err(|e| LedgerError::Other(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    conn: &Connection,
    book: &Book,
    watch: &Watch,
    mut queue: Queue,
    commits: &AtomicU64,
    courier: Option<Courier>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut outbox = Vec::with_capacity(MAX_BATCH);
    // `None` forces a refresh of every cached key before the next batch.
    let mut seen: Option<i64> = None;
    while let Some(first) = queue.blocking_recv() {
        // Woken by the first command: let the threads that are queueing more (on the
        // same core, the gateway finishing its event-loop turn) run first, so they
        // join this batch. With a core of its own the writer is back at once.
        std::thread::yield_now();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        seen = sync(conn, book, seen);
        if book.ids_left() < ID_LOW_WATER {
            match reserve_ids(conn) {
                Ok(block) => book.add_ids(block),
                Err(e) => tracing::warn!(error = %e, "cannot reserve transaction ids; will retry"),
            }
        }
        if !run_batch(conn, book, &mut batch, commits, &mut outbox) {
            // Some book changes may belong to writes that were rolled back.
            seen = None;
        }
        // Before the replies go: a caller's next hold must not take this batch's own
        // commit for another process's (see `Watch`).
        seen = watch.mark(conn, book, seen);
        let replies = std::mem::replace(&mut outbox, Vec::with_capacity(MAX_BATCH));
        match &courier {
            // One wake-up of the runtime for the whole batch; the courier task then
            // wakes each caller from inside the runtime, which costs no system call.
            Some(courier) => {
                if let Err(returned) = courier.send(replies) {
                    deliver(returned.0);
                }
            }
            None => deliver(replies),
        }
    }
}

/// Carries a batch's replies to a task on the runtime that opened the ledger.
type Courier = mpsc::UnboundedSender<Vec<Outgoing>>;

fn deliver(replies: Vec<Outgoing>) {
    for (reply, lost) in replies {
        reply.send(lost.as_ref());
    }
}

async fn courier_loop(mut batches: mpsc::UnboundedReceiver<Vec<Outgoing>>) {
    while let Some(replies) = batches.recv().await {
        deliver(replies);
    }
}

/// Tells the hold path, synchronously, whether the [`Book`] may be stale: whether any
/// connection committed to the file since the writer last brought the book up to date.
///
/// `PRAGMA data_version` changes when *another* connection commits. The writer's own
/// connection would answer exactly ("another process wrote"), but it is busy with
/// batches; so the hold path asks a connection of its own, which also sees the
/// writer's commits. The writer therefore records, after each batch and before its
/// replies go out, this connection's version (`synced`) and *then* syncs the book on
/// its own connection: a foreign commit before the record is caught by that sync, one
/// after it changes the version the next hold reads. A hold that finds the version
/// moved wakes the writer, which syncs before its next batch, and waits for it; that
/// happens after another process wrote, or when a hold falls between the writer's
/// commit and its record (microseconds).
///
/// The check is a mutex and one `PRAGMA` (a read transaction's start: the WAL index
/// header is compared in shared memory, no file I/O).
struct Watch {
    inner: Mutex<WatchState>,
}

struct WatchState {
    conn: Connection,
    /// `data_version` as the writer last recorded it; `None` until its first sync, and
    /// after a sync that failed.
    synced: Option<i64>,
}

// === impl Watch ===

impl Watch {
    fn new(conn: Connection) -> Watch {
        Watch { inner: Mutex::new(WatchState { conn, synced: None }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // The state is one integer, always whole: a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when the book reflects every commit to the file. An error reading the
    /// version is "maybe stale": the caller then asks the writer.
    fn fresh(&self) -> bool {
        let state = self.lock();
        state.synced.is_some() && data_version(&state.conn).ok() == state.synced
    }

    /// The writer, after a batch: records the version, then syncs the book (see the type
    /// docs for why in this order). Returns what [`sync`] returns.
    fn mark(&self, conn: &Connection, book: &Book, seen: Option<i64>) -> Option<i64> {
        let mut state = self.lock();
        let version = data_version(&state.conn).ok();
        let seen = sync(conn, book, seen);
        state.synced = version.filter(|_| seen.is_some());
        seen
    }
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))
}

/// Refreshes the cached keys when another connection committed since `seen` (the
/// connection's `data_version`), or always when `seen` is `None`. Returns the version
/// now seen (`None` again if the refresh failed).
fn sync(conn: &Connection, book: &Book, seen: Option<i64>) -> Option<i64> {
    let version = data_version(conn).ok()?;
    if seen == Some(version) {
        return seen;
    }
    let refresh = || -> rusqlite::Result<()> {
        let mut stmt = conn.prepare_cached("SELECT balance, revoked FROM keys WHERE id = ?1")?;
        for key_id in book.cached_keys() {
            if let Some((balance, revoked)) =
                stmt.query_row([&key_id], |r| Ok((Micros(r.get(0)?), r.get(1)?))).optional()?
            {
                book.set(&key_id, balance, revoked);
            }
        }
        Ok(())
    };
    match refresh() {
        Ok(()) => Some(version),
        Err(e) => {
            tracing::warn!(error = %e, "cannot refresh cached balances; will retry");
            None
        }
    }
}

/// Reserves the next [`ID_BLOCK`] transaction ids in `sqlite_sequence`, in a
/// transaction of its own, committed before any of them is handed out: rows that
/// SQLite numbers itself (another process's) then come after the block.
fn reserve_ids(conn: &Connection) -> rusqlite::Result<std::ops::Range<i64>> {
    control(conn, "BEGIN IMMEDIATE")?;
    let reserve = || -> rusqlite::Result<std::ops::Range<i64>> {
        let top: i64 = conn.query_row(
            "SELECT max(coalesce((SELECT max(id) FROM transactions), 0),
                        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'transactions'), 0))",
            [],
            |r| r.get(0),
        )?;
        let end = top + 1 + ID_BLOCK;
        conn.execute("DELETE FROM sqlite_sequence WHERE name = 'transactions'", [])?;
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('transactions', ?1)", [end - 1])?;
        Ok(top + 1..end)
    };
    match reserve().and_then(|block| control(conn, "COMMIT").map(|()| block)) {
        Ok(block) => Ok(block),
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}

fn read_loop(conn: &Connection, book: &Book, mut queue: Queue) {
    let tx = Tx { conn, book };
    while let Some(command) = queue.blocking_recv() {
        // A panicking command drops its reply channel: its caller gets `Unavailable`.
        if let Ok(reply) = catch_unwind(AssertUnwindSafe(|| command.run(&tx))) {
            reply.send(None);
        }
    }
}

/// Runs a transaction-control statement through the statement cache: these run for
/// every command, and re-parsing them showed up in profiles.
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// A reply ready to go, with the error that undid its success, if one did.
type Outgoing = (Box<dyn Reply>, Option<LedgerError>);

/// Runs `batch` (draining it) in one write transaction, each command in a savepoint,
/// and puts the replies in `outbox` once their transaction ended. Returns false when
/// some write was rolled back (a failed command or transaction).
fn run_batch(
    conn: &Connection,
    book: &Book,
    batch: &mut Vec<Box<dyn Command>>,
    commits: &AtomicU64,
    outbox: &mut Vec<Outgoing>,
) -> bool {
    let tx = Tx { conn, book };
    let mut ran: Vec<Box<dyn Reply>> = Vec::with_capacity(batch.len());
    let mut open = false;
    let mut clean = true;
    for command in batch.drain(..) {
        if !command.writes() {
            outbox.push((command.run(&tx), None));
            continue;
        }
        if !open {
            if let Err(e) = control(conn, "BEGIN IMMEDIATE") {
                command.abort(e.into());
                continue;
            }
            open = true;
        }
        if let Err(e) = control(conn, "SAVEPOINT command") {
            command.abort(e.into());
        } else {
            let outcome = catch_unwind(AssertUnwindSafe(|| command.run(&tx)));
            let keep = matches!(&outcome, Ok(reply) if !reply.failed());
            // Commands change the book only once their SQL succeeded, so a command
            // rolled back to its savepoint left none; a panic might have.
            clean &= outcome.is_ok();
            let ended = if keep {
                control(conn, "RELEASE command")
            } else {
                control(conn, "ROLLBACK TO command").and_then(|()| control(conn, "RELEASE command"))
            };
            // A panicked command dropped its reply channel: its caller gets `Unavailable`.
            if let Ok(reply) = outcome {
                ran.push(reply);
            }
            if ended.is_ok() && !conn.is_autocommit() {
                continue;
            }
        }
        // The transaction is gone or unusable: SQLite rolls it back itself on some
        // errors (I/O, disk full). The commands before this one were undone too.
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let lost = LedgerError::Unavailable(
            "SQLite rolled the ledger transaction back (I/O error or disk full?); retry".into(),
        );
        outbox.extend(ran.drain(..).map(|reply| (reply, Some(lost.clone()))));
        open = false;
        clean = false;
    }
    if !open {
        return clean;
    }
    match control(conn, "COMMIT") {
        Ok(()) => {
            commits.fetch_add(1, Ordering::Relaxed);
            outbox.extend(ran.into_iter().map(|reply| (reply, None)));
            clean
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            let lost = LedgerError::from(e);
            outbox.extend(ran.into_iter().map(|reply| (reply, Some(lost.clone()))));
            false
        }
    }
}

// === SQL helpers ===

fn now() -> i64 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn to_db(amount: Micros) -> Result<i64> {
    i64::try_from(amount.get()).map_err(|_| LedgerError::Overflow)
}

/// (id, revoked, balance) of the key with this secret.
fn key_by_secret(conn: &Connection, secret: &SecretHash) -> Result<Option<(String, bool, Micros)>> {
    let row = conn
        .prepare_cached("SELECT id, revoked, balance FROM keys WHERE secret_hash = ?1")?
        .query_row([&secret.0[..]], |r| Ok((r.get(0)?, r.get(1)?, Micros(r.get(2)?))))
        .optional()?;
    Ok(row)
}

fn is_debit(conn: &Connection, hold: HoldId) -> Result<bool> {
    Ok(debit_status(conn, hold)?.is_some())
}

fn debit_status(conn: &Connection, hold: HoldId) -> Result<Option<String>> {
    let status = conn
        .prepare_cached("SELECT status FROM transactions WHERE id = ?1 AND kind = 'debit'")?
        .query_row([hold.0], |r| r.get::<_, String>(0))
        .optional()?;
    Ok(status)
}

/// The writer could not reserve more transaction ids (see the `cannot reserve
/// transaction ids` warning in the log for why).
fn no_ids() -> LedgerError {
    LedgerError::Unavailable(
        "the SQLite ledger could not reserve transaction ids: is another process holding a write transaction \
         on the ledger file, or is the disk full? Nothing was held; retry"
            .into(),
    )
}

fn no_hold(hold: HoldId) -> LedgerError {
    LedgerError::Other(format!("no hold with id {}", hold.0))
}

/// Releases `hold` if it is a `pending` row (written by an older version, which kept
/// holds in the database): the amount goes back to the balance and a `refund` row
/// records it. Returns whether it was pending.
fn release_pending(tx: &Tx<'_>, hold: i64, now: i64) -> Result<bool> {
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

fn insert_credit(tx: &Tx<'_>, key_id: &str, amount: i64, idem: Option<&str>, now: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO transactions (id, key_id, kind, amount, idempotency_key, created_at)
         VALUES (?1, ?2, 'credit', ?3, ?4, ?5)",
    )?
    .execute(params![tx.book.next_id(), key_id, amount, idem, now])?;
    Ok(())
}

/// Writes a refund row (numbered after every open hold, like any new row).
fn insert_refund(
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
fn capture_open(tx: &Tx<'_>, hold: HoldId) -> Option<Result<()>> {
    let h = tx.book.begin_close(hold)?;
    let captured = debit_open(tx, hold, &h);
    tx.book.close(hold, captured.as_ref().ok().copied());
    Some(captured.map(|_| ()))
}

/// The conditional debit of an open hold (the database has the last word on the
/// balance) and its `captured` row, numbered as the hold was. Returns the balance.
fn debit_open(tx: &Tx<'_>, hold: HoldId, h: &OpenHold) -> Result<Micros> {
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
fn insert_closed_debit(tx: &Tx<'_>, hold: HoldId, h: &OpenHold, amount: i64, status: &str) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO transactions (id, key_id, kind, amount, route, request_id, status, created_at)
         VALUES (?1, ?2, 'debit', ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![hold.0, &*h.key_id, amount, &*h.route, &*h.request_id, status, h.created_at])?;
    Ok(())
}

/// Releases `hold` if it is open in the book (`None` if not). If writing the release
/// fails, the hold stays open: a retry or the stale-hold sweep releases it.
fn release_open(tx: &Tx<'_>, hold: HoldId, now: i64) -> Option<Result<()>> {
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
fn write_release(tx: &Tx<'_>, hold: HoldId, h: &OpenHold, now: i64) -> Result<()> {
    let amount = to_db(h.amount)?;
    insert_closed_debit(tx, hold, h, amount, "released")?;
    insert_refund(tx, &h.key_id, amount, Some(&h.route), Some(&h.request_id), now)
}

fn key_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0)?,
        label: r.get(1)?,
        balance: Micros(r.get(2)?),
        revoked: r.get(3)?,
        created_at: r.get(4)?,
    })
}

const KEY_COLUMNS: &str = "id, label, balance, revoked, created_at";

fn transaction(r: &rusqlite::Row<'_>) -> rusqlite::Result<Transaction> {
    let kind: String = r.get(2)?;
    let kind = match kind.as_str() {
        "credit" => TxKind::Credit,
        "debit" => TxKind::Debit,
        "refund" => TxKind::Refund,
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                2,
                rusqlite::types::Type::Text,
                format!("unknown transaction kind {other:?}").into(),
            ))
        }
    };
    Ok(Transaction {
        id: r.get(0)?,
        key_id: r.get(1)?,
        kind,
        amount: Micros(r.get(3)?),
        route: r.get(4)?,
        request_id: r.get(5)?,
        status: r.get(6)?,
        created_at: r.get(7)?,
    })
}

const TX_COLUMNS: &str = "id, key_id, kind, amount, route, request_id, status, created_at";

// === impl Ledger ===

#[async_trait]
impl Ledger for SqliteLedger {
    async fn create_key(&self, label: Option<&str>, balance: Micros) -> Result<NewKey> {
        let opening = to_db(balance)?;
        let (id, secret) = generate_key();
        // Only the hash crosses to the writer: the secret is never stored.
        let hash = SecretHash::of(&secret);
        let label = label.map(str::to_owned);
        let key_id = id.clone();
        self.write(move |conn| {
            let now = now();
            conn.prepare_cached(
                "INSERT INTO keys (id, secret_hash, label, balance, revoked, created_at)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5)",
            )?
            .execute(params![key_id, &hash.0[..], label, opening, now])?;
            if opening > 0 {
                insert_credit(conn, &key_id, opening, None, now)?;
            }
            Ok(())
        })
        .await?;
        Ok(NewKey { id, key: secret, balance })
    }

    // The open holds are read before the database: a capture committing in between
    // is then subtracted twice, never not at all, so a balance shown errs low.
    async fn key(&self, id: &str) -> Result<Option<KeyInfo>> {
        let held = self.book.holding();
        let id = id.to_owned();
        let key = self
            .read(move |conn| {
                let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1");
                Ok(conn.prepare_cached(&sql)?.query_row([&id], key_info).optional()?)
            })
            .await?;
        Ok(key.map(|k| less_held(k, &held)))
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let held = self.book.holding();
        let keys: Vec<KeyInfo> = self
            .read(|conn| {
                let sql = format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY rowid");
                let keys = conn.prepare_cached(&sql)?.query_map([], key_info)?.collect::<rusqlite::Result<_>>()?;
                Ok(keys)
            })
            .await?;
        Ok(keys.into_iter().map(|k| less_held(k, &held)).collect())
    }

    async fn revoke(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.write(move |tx| {
            let balance = tx
                .prepare_cached("UPDATE keys SET revoked = 1 WHERE id = ?1 RETURNING balance")?
                .query_row([&id], |r| Ok(Micros(r.get(0)?)))
                .optional()?;
            if let Some(balance) = balance {
                tx.book.set(&id, balance, true);
            }
            Ok(balance.is_some())
        })
        .await
    }

    async fn credit(&self, id: &str, amount: Micros, idempotency_key: Option<&str>) -> Result<CreditOutcome> {
        let delta = to_db(amount)?;
        if delta == 0 {
            return Err(LedgerError::Other("a credit must be a positive amount".into()));
        }
        let id = id.to_owned();
        let idem = idempotency_key.map(str::to_owned);
        self.write(move |conn| {
            let key: Option<(u64, bool)> = conn
                .prepare_cached("SELECT balance, revoked FROM keys WHERE id = ?1")?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((balance, revoked)) = key else {
                return Err(LedgerError::NoSuchKey(id));
            };
            if let Some(idem) = &idem {
                // This key's own row first: older versions scoped idempotency keys per
                // key, so a database may hold the same one on several keys.
                let seen: Option<(String, u64)> = conn
                    .prepare_cached(
                        "SELECT key_id, amount FROM transactions WHERE idempotency_key = ?2
                         ORDER BY key_id = ?1 DESC LIMIT 1",
                    )?
                    .query_row(params![id, idem], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                match seen {
                    Some((key_id, seen)) if key_id == id && seen == amount.get() => {
                        return Ok(CreditOutcome { balance: less_open_holds(conn, &id, balance), applied: false });
                    }
                    Some((key_id, seen)) => {
                        return Err(LedgerError::IdempotencyConflict {
                            idempotency_key: idem.clone(),
                            key_id,
                            amount: Micros(seen),
                        });
                    }
                    None => {}
                }
            }
            let new_balance =
                balance.checked_add(amount.get()).filter(|b| i64::try_from(*b).is_ok()).ok_or(LedgerError::Overflow)?;
            conn.prepare_cached("UPDATE keys SET balance = balance + ?2 WHERE id = ?1")?.execute(params![id, delta])?;
            insert_credit(conn, &id, delta, idem.as_deref(), now())?;
            conn.book.set(&id, Micros(new_balance), revoked);
            Ok(CreditOutcome { balance: less_open_holds(conn, &id, new_balance), applied: true })
        })
        .await
    }

    /// Outcomes are checked in this order: unknown key, revoked, spend cap, balance.
    /// The spend cap counts debits taken in the window that are pending or captured: a
    /// released hold is not spending (its refund cancels it).
    ///
    /// Without a spend cap this decides on the calling thread from the [`Book`]; the
    /// writer is asked only to load a key not cached yet, to reserve more ids, or to
    /// sync the book when another process wrote to the file (`Watch`).
    async fn authorize(&self, req: HoldRequest<'_>) -> Result<HoldOutcome> {
        if to_db(req.amount)? == 0 {
            return Err(LedgerError::Other("a hold must be for a positive amount (free routes take no hold)".into()));
        }
        let HoldRequest { secret, amount, route, request_id, spend_cap } = req;
        if let Some(cap) = spend_cap {
            return self.authorize_capped(secret, amount, route, request_id, cap).await;
        }
        if !self.watch.fresh() {
            // Another process (`tollgate keys revoke` or `credit`) committed since the
            // book was synced: the writer syncs it before its next batch.
            self.writer.wake().await?;
        }
        let mut loaded = false;
        for _ in 0..4 {
            match self.book.try_hold(&secret, amount, route, request_id, now()) {
                Attempt::Decided(outcome) => return Ok(outcome),
                Attempt::Miss if loaded => return Ok(HoldOutcome::UnknownKey),
                Attempt::Miss => {
                    if !self.load(secret).await? {
                        return Ok(HoldOutcome::UnknownKey);
                    }
                    loaded = true;
                }
                // The writer reserves ids before each batch.
                Attempt::NoIds => self.writer.wake().await?,
            }
        }
        Err(no_ids())
    }

    async fn capture(&self, hold: HoldId) -> Result<bool> {
        self.write(move |tx| {
            if let Some(captured) = capture_open(tx, hold) {
                return captured.map(|()| true);
            }
            // Not open: a `pending` row of an older version, or already closed.
            let n = tx
                .prepare_cached("UPDATE transactions SET status = 'captured' WHERE id = ?1 AND kind = 'debit' AND status = 'pending'")?
                .execute([hold.0])?;
            if n == 1 {
                return Ok(true);
            }
            // Already captured (idempotent) or already released (too late to charge).
            match debit_status(tx, hold)? {
                Some(status) => Ok(status == "captured"),
                None => Err(no_hold(hold)),
            }
        })
        .await
    }

    async fn release(&self, hold: HoldId) -> Result<()> {
        self.write(move |tx| {
            if let Some(released) = release_open(tx, hold, now()) {
                return released;
            }
            // Already released or captured: nothing to do (idempotent).
            if !release_pending(tx, hold.0, now())? && !is_debit(tx, hold)? {
                return Err(no_hold(hold));
            }
            Ok(())
        })
        .await
    }

    /// Open holds older than `older_than` (requests still running long past their
    /// upstream timeout), and any `pending` row an older version left behind.
    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64> {
        let age = seconds(older_than);
        self.write(move |tx| {
            let now = now();
            // Zero means every pending hold, even one stamped in the future by a clock
            // that has since stepped back.
            let cutoff = if age == 0 { i64::MAX } else { now.saturating_sub(age) };
            let stale = tx
                .prepare_cached(
                    "SELECT id FROM transactions
                     WHERE kind = 'debit' AND status = 'pending' AND created_at <= ?1",
                )?
                .query_map([cutoff], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut released = 0;
            for hold in stale {
                if release_pending(tx, hold, now)? {
                    released += 1;
                }
            }
            for hold in tx.book.taken_before(cutoff) {
                if let Some(done) = release_open(tx, hold, now) {
                    done?;
                    released += 1;
                }
            }
            Ok(released)
        })
        .await
    }

    /// Open holds are listed as `pending` debits among the rows (read first: a hold
    /// captured in between shows once, as its row). A hold's row keeps the hold's time
    /// and id, so it sorts in the same place before and after it is closed.
    async fn transaction_page(&self, query: TxQuery<'_>) -> Result<TxPage> {
        let in_page = |t: &Transaction| query.before.is_none_or(|c| Cursor::of(t) < c);
        let pending: Vec<Transaction> = self.book.pending(query.key).into_iter().filter(in_page).collect();
        let mut rows = self.stored_transactions(query, query.limit.saturating_add(1)).await?;
        let stored: std::collections::HashSet<i64> = rows.iter().map(|t| t.id).collect();
        rows.extend(pending.into_iter().filter(|t| !stored.contains(&t.id)));
        Ok(TxPage::newest_first(rows, query.limit))
    }

    async fn reserve_nonce(&self, payer: &str, nonce: &str, valid_before: u64) -> Result<bool> {
        let valid_before = i64::try_from(valid_before).map_err(|_| LedgerError::Overflow)?;
        let payer = payer.to_lowercase();
        let nonce = nonce.to_lowercase();
        self.write(move |conn| {
            let n = conn
                .prepare_cached("INSERT OR IGNORE INTO x402_nonces (payer, nonce, valid_before) VALUES (?1, ?2, ?3)")?
                .execute(params![payer, nonce, valid_before])?;
            Ok(n == 1)
        })
        .await
    }

    async fn purge_nonces(&self, now: u64) -> Result<u64> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.write(move |conn| {
            let n = conn.prepare_cached("DELETE FROM x402_nonces WHERE valid_before < ?1")?.execute([now])?;
            Ok(n as u64)
        })
        .await
    }

    async fn record_settlement(&self, s: &Settlement) -> Result<()> {
        let amount = i64::try_from(s.amount).map_err(|_| LedgerError::Overflow)?;
        let s = s.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO settlements
                     (rail, payer, amount, asset, network, tx_hash, route, request_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                s.rail,
                s.payer,
                amount,
                s.asset,
                s.network,
                s.tx_hash,
                s.route,
                s.request_id,
                now()
            ])?;
            Ok(())
        })
        .await
    }

    async fn settlements(&self, limit: usize) -> Result<Vec<Settlement>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT rail, payer, amount, asset, network, tx_hash, route, request_id
                     FROM settlements ORDER BY id DESC LIMIT ?1",
                )?
                .query_map([limit], |r| {
                    Ok(Settlement {
                        rail: r.get(0)?,
                        payer: r.get(1)?,
                        amount: r.get(2)?,
                        asset: r.get(3)?,
                        network: r.get(4)?,
                        tx_hash: r.get(5)?,
                        route: r.get(6)?,
                        request_id: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO health (id, checked_at) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            )?
            .execute([now()])?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER NOT NULL CHECK (x >= 0))").unwrap();
        conn
    }

    fn insert(x: i64) -> impl FnOnce(&Tx<'_>) -> Result<()> + Send + 'static {
        move |conn| {
            conn.execute("INSERT INTO t (x) VALUES (?1)", [x])?;
            Ok(())
        }
    }

    fn command<T, F>(work: F) -> (Box<dyn Command>, oneshot::Receiver<Result<T>>)
    where
        T: Send + 'static,
        F: FnOnce(&Tx<'_>) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        (Box::new(Call { work, reply }), answer)
    }

    /// Runs a batch and delivers its replies at once.
    fn run(conn: &Connection, mut batch: Vec<Box<dyn Command>>, commits: &AtomicU64) {
        let mut outbox = Vec::new();
        run_batch(conn, &Book::default(), &mut batch, commits, &mut outbox);
        deliver(outbox);
    }

    fn rows(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn.prepare("SELECT x FROM t ORDER BY x").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn a_failing_command_rolls_back_alone_and_the_batch_commits_once() {
        let conn = scratch();
        let commits = AtomicU64::new(0);
        let (a, mut a_answer) = command(insert(1));
        // Writes, then fails: its own write must be undone.
        let (b, mut b_answer) = command(|conn: &Tx<'_>| -> Result<()> {
            conn.execute("INSERT INTO t (x) VALUES (2)", [])?;
            conn.execute("INSERT INTO t (x) VALUES (-1)", [])?;
            Ok(())
        });
        let (c, mut c_answer) = command(insert(3));
        run(&conn, vec![a, b, c], &commits);

        assert_eq!(commits.load(Ordering::Relaxed), 1);
        assert!(a_answer.try_recv().unwrap().is_ok());
        assert!(matches!(b_answer.try_recv().unwrap(), Err(LedgerError::Other(_))));
        assert!(c_answer.try_recv().unwrap().is_ok());
        assert_eq!(rows(&conn), [1, 3]);
        assert!(conn.is_autocommit(), "the batch transaction is closed");
    }

    #[test]
    fn a_wake_opens_no_transaction() {
        let conn = scratch();
        let commits = AtomicU64::new(0);
        let (reply, mut answer) = oneshot::channel();
        run(&conn, vec![Box::new(Wake(reply))], &commits);
        assert!(answer.try_recv().unwrap().is_ok());
        assert_eq!(commits.load(Ordering::Relaxed), 0, "nothing to commit");
        let (reply, mut woke) = oneshot::channel();
        let (a, mut a_answer) = command(insert(1));
        run(&conn, vec![Box::new(Wake(reply)), a], &commits);
        assert!(woke.try_recv().unwrap().is_ok() && a_answer.try_recv().unwrap().is_ok());
        assert_eq!((commits.load(Ordering::Relaxed), rows(&conn)), (1, vec![1]));
    }

    #[test]
    fn a_panicking_command_answers_unavailable_and_the_others_commit() {
        let conn = scratch();
        let commits = AtomicU64::new(0);
        let (a, mut a_answer) = command(insert(1));
        let (b, b_answer) = command(|conn: &Tx<'_>| -> Result<()> {
            conn.execute("INSERT INTO t (x) VALUES (2)", [])?;
            panic!("a bug in one command");
        });
        let (c, mut c_answer) = command(insert(3));
        run(&conn, vec![a, b, c], &commits);

        assert!(a_answer.try_recv().unwrap().is_ok());
        assert!(c_answer.try_recv().unwrap().is_ok());
        // Its reply channel was dropped: `Worker::call` maps that to `Unavailable`.
        assert!(b_answer.blocking_recv().is_err());
        assert_eq!(rows(&conn), [1, 3]);
        assert_eq!(commits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_failed_commit_fails_every_command_of_the_batch() {
        let conn = scratch();
        conn.execute_batch(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);
             PRAGMA foreign_keys = ON;",
        )
        .unwrap();
        let commits = AtomicU64::new(0);
        let (a, mut a_answer) = command(insert(1));
        // A deferred foreign key violation only shows at COMMIT.
        let (b, mut b_answer) = command(|conn: &Tx<'_>| -> Result<()> {
            conn.execute("INSERT INTO child (p) VALUES (42)", [])?;
            Ok(())
        });
        run(&conn, vec![a, b], &commits);

        assert_eq!(commits.load(Ordering::Relaxed), 0);
        assert!(a_answer.try_recv().unwrap().is_err());
        assert!(b_answer.try_recv().unwrap().is_err());
        assert_eq!(rows(&conn), Vec::<i64>::new());
        assert!(conn.is_autocommit());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commands_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(SqliteLedger::open(&dir.path().join("l.db"), SqliteOptions::default()).unwrap());
        let before = ledger.commit_count();
        let n = 1000;
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.ping().await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let commits = ledger.commit_count() - before;
        assert!(commits >= 1 && commits < n, "{n} commands took {commits} commits");
    }

    #[test]
    fn amounts_beyond_i64_are_refused() {
        assert!(matches!(to_db(Micros(u64::MAX)), Err(LedgerError::Overflow)));
        assert_eq!(to_db(Micros(i64::MAX as u64)).unwrap(), i64::MAX);
    }
}
