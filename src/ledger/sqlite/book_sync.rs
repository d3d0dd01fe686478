//! Keeping the SQLite ledger's in-memory [`Book`] in step with the file: noticing
//! commits made by other processes (`tollgate keys credit` or `revoke` while the
//! gateway runs) through `PRAGMA data_version`, refreshing the cached keys, and
//! reserving blocks of transaction ids for open holds. The writer does this around
//! every batch ([`BookSync`]); the hold path asks [`Watch::fresh`] before it trusts the
//! book. ARCHITECTURE.md ("Holds") says why open holds live in memory.

use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension};

use super::holds::{Book, ID_BLOCK, ID_LOW_WATER};
use super::writer::{control, AroundBatch};
use crate::money::Micros;

/// The writer's work around each batch: sync the book and reserve ids before it,
/// record the file's version and sync again after it (see [`Watch`] for the order).
pub(super) struct BookSync {
    pub(super) book: Book,
    pub(super) watch: Arc<Watch>,
    /// The writer connection's `data_version` as last synced; `None` forces a refresh
    /// of every cached key before the next batch.
    pub(super) seen: Option<i64>,
}

impl AroundBatch for BookSync {
    fn before(&mut self, conn: &Connection) {
        self.seen = sync(conn, &self.book, self.seen);
        if self.book.ids_left() < ID_LOW_WATER {
            match reserve_ids(conn) {
                Ok(block) => self.book.add_ids(block),
                Err(e) => tracing::warn!(error = %e, "cannot reserve transaction ids; will retry"),
            }
        }
    }

    fn after(&mut self, conn: &Connection, clean: bool) {
        if !clean {
            // Some book changes may belong to writes that were rolled back.
            self.seen = None;
        }
        // Before the replies go: a caller's next hold must not take this batch's own
        // commit for another process's (see `Watch`).
        self.seen = self.watch.mark(conn, &self.book, self.seen);
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
pub(super) struct Watch {
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
    pub(super) fn new(conn: Connection) -> Watch {
        Watch { inner: Mutex::new(WatchState { conn, synced: None }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        // The state is one integer, always whole: a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when the book reflects every commit to the file. An error reading the
    /// version is "maybe stale": the caller then asks the writer.
    pub(super) fn fresh(&self) -> bool {
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
