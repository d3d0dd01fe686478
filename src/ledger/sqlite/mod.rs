//! The embedded SQLite ledger: the default backend, zero setup, one replica. What a
//! ledger promises is in [`Ledger`] and ARCHITECTURE.md ("Invariants"); this says how
//! SQLite keeps it.
//!
//! The folder: this file has the ledger and its [`Ledger`] impl; `writer.rs` the
//! connection threads and group commit; `holds.rs` the book of open holds;
//! `book_sync.rs` how the book stays in step with the file; `sql.rs` the statements;
//! `schema.sql` and `schema.rs` the schema and its migrations.
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
//! per batch instead of one per command); if the `COMMIT` fails, every command of the
//! batch gets the error. Correctness does not depend on batching: the single writer serialises all
//! commands, and each one is atomic.
//!
//! # Open holds live in memory
//!
//! One process owns the file (the gateway takes a lock), so open holds are kept in a
//! [`Book`] in memory rather than written as `pending` rows: `authorize` decides on the
//! calling thread, without a database round trip, and a paid request costs one durable
//! write (its capture) instead of two. Listings show open holds as `pending` debits.
//! See [`holds`] for how the cached balances stay exact and why a crash cannot lose or
//! double a charge. Another process changing the file (`tollgate keys credit` or
//! `revoke` while the gateway runs) is noticed through `PRAGMA data_version` **on
//! every hold**, before the cache is trusted (see `book_sync::Watch`): a revocation or
//! a top-up made by `tollgate keys` holds for every request that starts after the
//! command returned.
//!
//! # Metered captures and long requests
//!
//! A capture of less than the hold is the same one durable write as a full one: the
//! `captured` debit row carries the captured amount and, in `held`, the hold; the
//! balance comes down by the captured amount only (the hold was never written, so there
//! is nothing to give back) and the book drops the whole hold. A capture above the hold
//! is refused before anything is written and the hold stays open. A capture of zero is
//! a release.
//!
//! The stale-hold sweep never releases a hold that is open in the book, however old:
//! this process is alive, so the request that holds it is still running (or will
//! capture or release it). The sweep only releases `pending` rows, which only an older
//! version that crashed, or a hand, can have written. A hold id that the table does not
//! know but that was handed out (below the reserved sequence) is a hold that died with
//! its process: a late capture of it answers false, a release does nothing.
//!
//! # Durability
//!
//! The database runs in WAL mode.
//! - **`kill -9`** (process crash): every acknowledged command survives with either
//!   setting, because a commit is in the WAL file (at least in the OS page cache)
//!   before the reply is sent. Open holds die with the process: they were never written,
//!   so nothing is held after a restart.
//! - **Power loss or OS crash**: with `synchronous=NORMAL` (the default) the WAL is
//!   fsynced only at checkpoints (every `writer::CHECKPOINT_EVERY` while there is
//!   something to copy), so the transactions committed since the last checkpoint may be
//!   lost (the database stays consistent: it rolls back to an earlier commit, never to
//!   a torn one). With `synchronous=FULL` ([`SqliteOptions::synchronous_full`]) every
//!   commit is fsynced before it is acknowledged, so nothing acknowledged is lost;
//!   group commit keeps that affordable.
//!
//! # Schema
//!
//! `schema.sql`, applied through numbered migrations ([`MIGRATIONS`], `schema.rs`)
//! tracked with `PRAGMA user_version`, in one transaction at open.

mod book_sync;
pub mod holds;
mod schema;
mod sql;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};
use tokio::sync::mpsc;

use self::book_sync::{BookSync, Watch};
use self::holds::{Attempt, Book};
use self::schema::migrate;
pub use self::schema::{MIGRATIONS, SCHEMA, SCHEMA_VERSION};
use self::sql::{
    capture_open, closed_hold, connect, insert_credit, key_by_secret, key_row, less_held, less_open_holds, no_ids, now,
    release_open, release_pending, tx_row,
};
pub use self::writer::MAX_BATCH;
use self::writer::{courier_loop, read_loop, write_loop, Checkpointer, Tx, Worker};
use super::rows::{
    capture_above_hold, credit_amount, hold_amount, int_to_db, nonce_key, repeated_top_up, request_window, saturating,
    seconds, to_db, KeyRow, MeteredRow, TxRow, KEY_COLUMNS, TX_COLUMNS,
};
use super::{
    generate_key, Account, CreditOutcome, Cursor, HoldId, HoldOutcome, HoldRequest, KeyInfo, Ledger, LedgerError,
    Metered, NewKey, Result, SecretHash, Settlement, Transaction, TxPage, TxQuery,
};
use crate::money::Micros;

/// How long a statement waits for a lock held by another connection (another process
/// opening the same file, or the reader during a checkpoint) before failing closed.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

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
            let (commits, book) = (commits.clone(), book.clone());
            let around = BookSync { book: book.clone(), watch: watch.clone(), seen: None };
            move |queue| write_loop(&conn, &book, queue, &commits, courier, around)
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
        let limit = saturating(limit);
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
                .query_map(rusqlite::params_from_iter(args), tx_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(TxRow::into_transaction).collect()
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
                conn.prepare_cached(&sql)?.query_row([&id], key_row).optional()?.map(KeyRow::into_info).transpose()
            })
            .await?;
        Ok(key.map(|k| less_held(k, &held)))
    }

    async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let held = self.book.holding();
        let keys: Vec<KeyInfo> = self
            .read(|conn| {
                let sql = format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY rowid");
                let keys = conn.prepare_cached(&sql)?.query_map([], key_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
                keys.into_iter().map(KeyRow::into_info).collect()
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
        let delta = credit_amount(amount)?;
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
                // At most one row carries it: an idempotency key names one top-up in
                // the whole ledger, and the writer runs one credit at a time.
                let seen: Option<(String, i64)> = conn
                    .prepare_cached("SELECT key_id, amount FROM transactions WHERE idempotency_key = ?1")?
                    .query_row([idem], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if repeated_top_up(idem, &id, delta, seen)? {
                    return Ok(CreditOutcome { balance: less_open_holds(conn, &id, balance), applied: false });
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
        hold_amount(req.amount)?;
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

    async fn capture(&self, hold: HoldId, amount: Micros, metered: Option<&Metered>) -> Result<bool> {
        let amount = to_db(amount)?;
        let metered = MeteredRow::of(metered)?;
        self.write(move |tx| {
            if let Some(done) = capture_open(tx, hold, amount, &metered) {
                return done.map(|()| true);
            }
            // Not open, so already closed: captured (idempotent), released (too late to
            // charge, but charging nothing is still possible), or a hold that died with
            // the process that took it (released by construction).
            let Some((status, held)) = closed_hold(tx, hold)? else {
                return Ok(amount == 0);
            };
            if amount > held {
                return Err(capture_above_hold(hold, Micros(amount.unsigned_abs()), held));
            }
            Ok(status == "captured" || amount == 0)
        })
        .await
    }

    async fn release(&self, hold: HoldId) -> Result<()> {
        self.write(move |tx| {
            if let Some(released) = release_open(tx, hold, now()) {
                return released;
            }
            // Already released or captured, or died with its process: nothing to do
            // (idempotent).
            closed_hold(tx, hold).map(|_| ())
        })
        .await
    }

    /// Only `pending` rows older than `older_than`: tollgate writes none on SQLite, but
    /// a file may hold some put there by an older version that crashed, or by hand (the
    /// conformance suite does). Open holds are in this process's book, never in the
    /// table, and are never swept: a hold lives as long as its request (a stream may
    /// run for many minutes), and dies with the process, which releases it by
    /// construction.
    async fn release_stale_holds(&self, older_than: Duration) -> Result<u64> {
        let age = seconds(older_than);
        self.write(move |tx| {
            let now = now();
            // Zero means every pending row, even one stamped in the future by a clock
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
            Ok(released)
        })
        .await
    }

    /// Read like [`Ledger::key`]: the open holds first, so a capture committing in
    /// between errs on the low side of the balance.
    async fn account(&self, secret: SecretHash, spend_window: Option<Duration>) -> Result<Option<Account>> {
        let holding = self.book.holding();
        let window = spend_window.map(seconds);
        let found = self
            .read(move |conn| {
                let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE secret_hash = ?1");
                let Some(key) = conn.prepare_cached(&sql)?.query_row([&secret.0[..]], key_row).optional()? else {
                    return Ok(None);
                };
                let key = key.into_info()?;
                let spent = match window {
                    None => None,
                    Some(window) => Some(Micros(
                        conn.prepare_cached(
                            "SELECT coalesce(sum(amount), 0) FROM transactions
                             WHERE key_id = ?1 AND created_at >= ?2
                               AND kind = 'debit' AND status IN ('pending', 'captured')",
                        )?
                        .query_row(params![key.id, now().saturating_sub(window)], |r| r.get::<_, u64>(0))?,
                    )),
                };
                Ok(Some((key, spent)))
            })
            .await?;
        let Some((key, spent)) = found else {
            return Ok(None);
        };
        // Open holds are spending too (as the spend cap counts them).
        let held = holding.get(&key.id).copied().unwrap_or(Micros::ZERO);
        let spent = spent.map(|s| s.checked_add(held).ok_or(LedgerError::Overflow)).transpose()?;
        Ok(Some(Account { key: less_held(key, &holding), held, spent }))
    }

    /// The open hold of the request, if any, is read before the table (as in
    /// [`Ledger::transaction_page`]): one captured in between shows once, as its row.
    async fn request_transactions(&self, key_id: &str, request_id: &str) -> Result<Vec<Transaction>> {
        let pending: Vec<Transaction> = self
            .book
            .pending(Some(key_id))
            .into_iter()
            .filter(|t| t.request_id.as_deref() == Some(request_id))
            .collect();
        let (key_id, request_id) = (key_id.to_owned(), request_id.to_owned());
        let (from, to) = request_window(&request_id).unwrap_or((i64::MIN, i64::MAX));
        let mut rows = self
            .read(move |conn| {
                let sql = format!(
                    "SELECT {TX_COLUMNS} FROM transactions
                     WHERE key_id = ?1 AND created_at BETWEEN ?3 AND ?4 AND request_id = ?2"
                );
                let rows = conn
                    .prepare_cached(&sql)?
                    .query_map(params![key_id, request_id, from, to], tx_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows.into_iter().map(TxRow::into_transaction).collect::<Result<Vec<_>>>()
            })
            .await?;
        let stored: std::collections::HashSet<i64> = rows.iter().map(|t| t.id).collect();
        rows.extend(pending.into_iter().filter(|t| !stored.contains(&t.id)));
        rows.sort_unstable_by_key(Cursor::of);
        Ok(rows)
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
        let valid_before = int_to_db(valid_before)?;
        let (payer, nonce) = nonce_key(payer, nonce);
        self.write(move |conn| {
            let n = conn
                .prepare_cached("INSERT OR IGNORE INTO x402_nonces (payer, nonce, valid_before) VALUES (?1, ?2, ?3)")?
                .execute(params![payer, nonce, valid_before])?;
            Ok(n == 1)
        })
        .await
    }

    async fn purge_nonces(&self, now: u64) -> Result<u64> {
        let now = saturating(now);
        self.write(move |conn| {
            let n = conn.prepare_cached("DELETE FROM x402_nonces WHERE valid_before < ?1")?.execute([now])?;
            Ok(n as u64)
        })
        .await
    }

    async fn record_settlement(&self, s: &Settlement) -> Result<()> {
        let amount = int_to_db(s.amount)?;
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
        let limit = saturating(limit);
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
                        amount: r.get::<_, u64>(2)?,
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
