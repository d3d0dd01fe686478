//! The SQLite ledger's connection threads: a writer that runs commands in group
//! commits, a reader for the admin listings, and the WAL checkpointer. Generic: a
//! command is any closure over a [`Tx`]; what the ledger does around each batch comes
//! in through [`AroundBatch`]. The module docs of [`super`] say why (threads, group
//! commit, durability).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::holds::Book;
use crate::ledger::{LedgerError, Result};

/// Most commands one write transaction carries.
pub const MAX_BATCH: usize = 256;
/// Commands that may wait for a connection thread before callers wait for room.
const QUEUE_DEPTH: usize = 4096;

/// What a command runs against: the connection (through `Deref`) and the open holds.
pub(super) struct Tx<'a> {
    pub(super) conn: &'a Connection,
    pub(super) book: &'a Book,
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

// === commands ===

/// One unit of work for a connection thread, with its reply channel.
pub(super) trait Command: Send {
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
pub(super) struct Wake(oneshot::Sender<Result<()>>);

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
pub(super) trait Reply: Send {
    fn failed(&self) -> bool;
    /// Sends the result; a success whose transaction did not commit becomes `lost`.
    fn send(self: Box<Self>, lost: Option<&LedgerError>);
}

pub(super) struct Call<T, F> {
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

pub(super) struct Ran<T> {
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

pub(super) fn stopped() -> LedgerError {
    LedgerError::Unavailable("the SQLite ledger thread stopped; see the logs above".into())
}

pub(super) type Queue = mpsc::Receiver<Box<dyn Command>>;

/// A connection thread and the channel feeding it.
pub(super) struct Worker {
    pub(super) queue: Option<mpsc::Sender<Box<dyn Command>>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub(super) fn spawn(name: &str, body: impl FnOnce(Queue) + Send + 'static) -> Result<Worker> {
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(rx))
            .map_err(|e| LedgerError::Other(format!("cannot start thread {name}: {e}")))?;
        Ok(Worker { queue: Some(queue), thread: Some(thread) })
    }

    pub(super) async fn call<T, F>(&self, work: F) -> Result<T>
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
    pub(super) async fn wake(&self) -> Result<()> {
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
pub(super) struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Short, so each checkpoint is small: it copies only what the WAL gained since the
/// last one, and a request that shares a core with it waits less for it. It also
/// bounds what `synchronous=NORMAL` can lose to a power cut. A checkpoint with nothing
/// new to copy does nothing (no `fsync`).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

impl Checkpointer {
    pub(super) fn spawn(conn: Connection, writer: Option<mpsc::WeakSender<Box<dyn Command>>>) -> Result<Checkpointer> {
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

/// What the writer does around each batch besides running it. The ledger keeps its
/// book of open holds in step with the file there (`super::book_sync`); the writer
/// itself knows nothing of keys or holds.
pub(super) trait AroundBatch {
    /// Before a batch runs (the commands are already taken from the queue).
    fn before(&mut self, conn: &Connection);
    /// After its transaction ended and before its replies go; `clean` is false when
    /// some write of it was rolled back.
    fn after(&mut self, conn: &Connection, clean: bool);
}

/// The writer thread's body: takes every command already queued (up to [`MAX_BATCH`]),
/// runs them in one transaction (`run_batch`) and sends the replies once it ended.
pub(super) fn write_loop(
    conn: &Connection,
    book: &Book,
    mut queue: Queue,
    commits: &AtomicU64,
    courier: Option<Courier>,
    mut around: impl AroundBatch,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut outbox = Vec::with_capacity(MAX_BATCH);
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
        around.before(conn);
        let clean = run_batch(conn, book, &mut batch, commits, &mut outbox);
        around.after(conn, clean);
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
pub(super) type Courier = mpsc::UnboundedSender<Vec<Outgoing>>;

pub(super) fn deliver(replies: Vec<Outgoing>) {
    for (reply, lost) in replies {
        reply.send(lost.as_ref());
    }
}

pub(super) async fn courier_loop(mut batches: mpsc::UnboundedReceiver<Vec<Outgoing>>) {
    while let Some(replies) = batches.recv().await {
        deliver(replies);
    }
}

pub(super) fn read_loop(conn: &Connection, book: &Book, mut queue: Queue) {
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
pub(super) fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// A reply ready to go, with the error that undid its success, if one did.
pub(super) type Outgoing = (Box<dyn Reply>, Option<LedgerError>);

/// Runs `batch` (draining it) in one write transaction, each command in a savepoint,
/// and puts the replies in `outbox` once their transaction ended. Returns false when
/// some write was rolled back (a failed command or transaction).
pub(super) fn run_batch(
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

    /// Through the whole ledger: many callers at once share commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commands_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = std::sync::Arc::new(
            crate::ledger::sqlite::SqliteLedger::open(
                &dir.path().join("l.db"),
                crate::ledger::sqlite::SqliteOptions::default(),
            )
            .unwrap(),
        );
        let before = ledger.commit_count();
        let n = 1000;
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let ledger = ledger.clone();
                tokio::spawn(async move { crate::ledger::Ledger::ping(&*ledger).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let commits = ledger.commit_count() - before;
        assert!(commits >= 1 && commits < n, "{n} commands took {commits} commits");
    }
}
