//! Open holds and the balances they are taken against, in memory: the SQLite ledger's
//! hot path (ARCHITECTURE.md, "Holds").
//!
//! One process owns a SQLite ledger (the gateway takes a file lock), so it can keep
//! every **open hold** in memory instead of writing a `pending` row for it and
//! updating it again at capture. A paid request then costs one durable write, not two:
//! the hold is a few map operations under a mutex on the calling thread, and the
//! capture writes the `captured` debit (of the captured amount, with the hold in its
//! `held` column when it took less) and the balance change (less the captured amount
//! only: the rest of the hold was never taken from the committed balance) in one
//! group-committed command, and the book drops the whole hold. Crash safety is unchanged: an open hold that dies with the process was
//! never written, so it is released by construction, and a capture is still durable
//! before it is acknowledged.
//!
//! An open hold is never swept while its process runs: it lives as long as its request
//! (a stream may run for many minutes), and nothing but a capture or a release ends it.
//!
//! The [`Book`] caches, per key, the balance as last committed (`balance`) and the sum
//! of its open holds (`held`); a hold is granted when `balance - held` covers it. The
//! ledger's writer thread is the only place `balance` changes, right after each commit
//! (or after it saw another process, e.g. `tollgate keys credit`, change the file), so
//! the cache never runs ahead of the database. Before a hold trusts the cache, the
//! ledger checks that no other process wrote to the file since the writer last synced
//! it, and has the writer sync first if one did (`book_sync::Watch`): a revocation or a
//! top-up holds for the very next hold. The database keeps the last word all
//! the same: a capture is a conditional debit (`balance >= amount`), so even a stale
//! cache cannot take a balance below zero.
//!
//! Transaction ids: a hold's id is the id its debit row will have, so a hold keeps its
//! place in listings (ordered by time, then id) once it is closed. The writer reserves blocks of ids in SQLite's
//! `sqlite_sequence` (committed before any id of the block is handed out), so rows
//! another process inserts meanwhile take ids after the block, never one of ours.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::ledger::{HoldId, HoldOutcome, SecretHash, Transaction, TxKind};
use crate::money::Micros;

/// Ids the writer reserves at a time.
pub const ID_BLOCK: i64 = 4096;
/// The writer reserves the next block once fewer ids than this are left.
pub const ID_LOW_WATER: usize = 1024;

#[derive(Debug, Clone)]
struct Account {
    key_id: Arc<str>,
    revoked: bool,
    /// As last committed.
    balance: Micros,
    /// Sum of this key's open holds.
    held: Micros,
}

impl Account {
    fn available(&self) -> Micros {
        self.balance.checked_sub(self.held).unwrap_or(Micros::ZERO)
    }
}

/// A hold not yet captured or released.
#[derive(Debug, Clone)]
pub struct OpenHold {
    pub secret: SecretHash,
    pub key_id: Arc<str>,
    pub amount: Micros,
    pub route: Arc<str>,
    pub request_id: Box<str>,
    /// Unix seconds.
    pub created_at: i64,
    /// A capture or release of it is running on the writer.
    closing: bool,
}

/// What [`Book::try_hold`] could decide on its own.
#[derive(Debug)]
pub enum Attempt {
    Decided(HoldOutcome),
    /// The key is not cached: load it from the database and try again.
    Miss,
    /// No transaction id is left: let the writer reserve more and try again.
    NoIds,
}

/// See the module docs. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Book {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    accounts: HashMap<SecretHash, Account>,
    by_id: HashMap<Arc<str>, SecretHash>,
    holds: HashMap<i64, OpenHold>,
    ids: VecDeque<Range<i64>>,
}

impl Inner {
    fn next_id(&mut self) -> Option<i64> {
        while let Some(range) = self.ids.front_mut() {
            if let Some(id) = range.next() {
                return Some(id);
            }
            self.ids.pop_front();
        }
        None
    }

    fn account_by_id(&mut self, key_id: &str) -> Option<&mut Account> {
        let secret = self.by_id.get(key_id)?;
        self.accounts.get_mut(secret)
    }
}

// === impl Book ===

impl Book {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section below leaves the maps consistent before it can panic
        // (no user code runs under the lock), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a hold from the cached balance if it can decide alone.
    pub fn try_hold(&self, secret: &SecretHash, amount: Micros, route: &str, request_id: &str, now: i64) -> Attempt {
        let mut inner = self.lock();
        let Some(account) = inner.accounts.get(secret) else {
            return Attempt::Miss;
        };
        if account.revoked {
            return Attempt::Decided(HoldOutcome::Revoked { key_id: account.key_id.to_string() });
        }
        let available = account.available();
        if available < amount {
            return Attempt::Decided(HoldOutcome::Insufficient {
                key_id: account.key_id.to_string(),
                balance: available,
            });
        }
        let Some(id) = inner.next_id() else {
            return Attempt::NoIds;
        };
        Attempt::Decided(open(&mut inner, id, *secret, amount, route, request_id, now))
    }

    /// (key id, revoked, available) of a cached key.
    pub fn available(&self, secret: &SecretHash) -> Option<(String, bool, Micros)> {
        let inner = self.lock();
        inner.accounts.get(secret).map(|a| (a.key_id.to_string(), a.revoked, a.available()))
    }

    /// Caches a key as read from the database; an already cached one keeps its holds.
    pub fn load(&self, secret: SecretHash, key_id: &str, revoked: bool, balance: Micros) {
        let mut inner = self.lock();
        if let Some(a) = inner.accounts.get_mut(&secret) {
            a.revoked = revoked;
            a.balance = balance;
            return;
        }
        let key_id: Arc<str> = key_id.into();
        inner.by_id.insert(key_id.clone(), secret);
        inner.accounts.insert(secret, Account { key_id, revoked, balance, held: Micros::ZERO });
    }

    /// Sets what the database now says of a cached key (no-op for one not cached).
    pub fn set(&self, key_id: &str, balance: Micros, revoked: bool) {
        let mut inner = self.lock();
        if let Some(a) = inner.account_by_id(key_id) {
            a.balance = balance;
            a.revoked = revoked;
        }
    }

    /// Ids of the cached keys (to refresh them from the database).
    pub fn cached_keys(&self) -> Vec<String> {
        self.lock().by_id.keys().map(|k| k.to_string()).collect()
    }

    /// Keys with open holds, and the sum of them.
    pub fn holding(&self) -> HashMap<String, Micros> {
        let inner = self.lock();
        inner.accounts.values().filter(|a| a.held > Micros::ZERO).map(|a| (a.key_id.to_string(), a.held)).collect()
    }

    /// Sum of the open holds of key `key_id`.
    pub fn held(&self, key_id: &str) -> Micros {
        let mut inner = self.lock();
        inner.account_by_id(key_id).map_or(Micros::ZERO, |a| a.held)
    }

    /// Marks an open hold as closing and returns it; `None` if it is not open (never
    /// was, already closed, or being closed by another command).
    pub fn begin_close(&self, hold: HoldId) -> Option<OpenHold> {
        let mut inner = self.lock();
        let h = inner.holds.get_mut(&hold.0).filter(|h| !h.closing)?;
        h.closing = true;
        Some(h.clone())
    }

    /// The close of `hold` was refused before anything was written (a capture above
    /// the hold): it is open again.
    pub fn reopen(&self, hold: HoldId) {
        if let Some(h) = self.lock().holds.get_mut(&hold.0) {
            h.closing = false;
        }
    }

    /// Forgets `hold` (captured, released, or its capture failed), and, after a
    /// capture, sets the key's balance as committed.
    pub fn close(&self, hold: HoldId, balance: Option<Micros>) {
        let mut inner = self.lock();
        let Some(h) = inner.holds.remove(&hold.0) else {
            return;
        };
        if let Some(a) = inner.accounts.get_mut(&h.secret) {
            a.held = a.held.checked_sub(h.amount).unwrap_or(Micros::ZERO);
            if let Some(b) = balance {
                a.balance = b;
            }
        }
    }

    /// Open holds as `pending` debits, newest first, optionally of one key.
    pub fn pending(&self, key_id: Option<&str>) -> Vec<Transaction> {
        let inner = self.lock();
        let mut rows: Vec<Transaction> = inner
            .holds
            .iter()
            .filter(|(_, h)| key_id.is_none_or(|k| *h.key_id == *k))
            .map(|(&id, h)| Transaction {
                id,
                key_id: h.key_id.to_string(),
                kind: TxKind::Debit,
                amount: h.amount,
                route: Some(h.route.to_string()),
                request_id: Some(h.request_id.to_string()),
                status: Some("pending".into()),
                created_at: h.created_at,
                held: None,
                model: None,
                usage: None,
                usage_source: None,
            })
            .collect();
        rows.sort_unstable_by_key(|t| std::cmp::Reverse(t.id));
        rows
    }

    /// An id for a row the writer inserts, if one is left (else SQLite assigns one).
    pub fn next_id(&self) -> Option<i64> {
        self.lock().next_id()
    }

    pub fn ids_left(&self) -> usize {
        self.lock().ids.iter().map(|r| r.end.saturating_sub(r.start) as usize).sum()
    }

    /// Adds a block of ids the writer has reserved (and committed).
    pub fn add_ids(&self, block: Range<i64>) {
        self.lock().ids.push_back(block);
    }
}

fn open(
    inner: &mut Inner,
    id: i64,
    secret: SecretHash,
    amount: Micros,
    route: &str,
    request_id: &str,
    now: i64,
) -> HoldOutcome {
    let Some(account) = inner.accounts.get_mut(&secret) else {
        // Callers check the account first, under the same lock.
        return HoldOutcome::UnknownKey;
    };
    account.held = account.held.checked_add(amount).unwrap_or(account.balance);
    let key_id = account.key_id.clone();
    let balance = account.available();
    inner.holds.insert(
        id,
        OpenHold {
            secret,
            key_id: key_id.clone(),
            amount,
            route: route.into(),
            request_id: request_id.into(),
            created_at: now,
            closing: false,
        },
    );
    HoldOutcome::Held { hold: HoldId(id), key_id: key_id.to_string(), balance }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(n: u8) -> SecretHash {
        SecretHash([n; 32])
    }

    fn book_with(balance: u64) -> Book {
        let book = Book::default();
        book.add_ids(1..4);
        book.load(secret(1), "key_a", false, Micros(balance));
        book
    }

    fn held(outcome: Attempt) -> HoldId {
        match outcome {
            Attempt::Decided(HoldOutcome::Held { hold, .. }) => hold,
            other => panic!("expected a hold, got {other:?}"),
        }
    }

    #[test]
    fn holds_never_exceed_the_balance_and_closing_frees_them() {
        let book = book_with(5);
        let a = held(book.try_hold(&secret(1), Micros(3), "r", "q1", 0));
        assert!(matches!(
            book.try_hold(&secret(1), Micros(3), "r", "q2", 0),
            Attempt::Decided(HoldOutcome::Insufficient { balance: Micros(2), .. })
        ));
        assert_eq!(book.held("key_a"), Micros(3));
        // Captured: the balance as committed comes down, the hold goes.
        assert!(book.begin_close(a).is_some());
        assert!(book.begin_close(a).is_none(), "one close at a time");
        book.close(a, Some(Micros(2)));
        assert_eq!(book.held("key_a"), Micros::ZERO);
        assert_eq!(book.available(&secret(1)).unwrap().2, Micros(2));
        let b = held(book.try_hold(&secret(1), Micros(2), "r", "q3", 0));
        assert_eq!(book.pending(Some("key_a")).iter().map(|t| t.id).collect::<Vec<_>>(), [b.0]);
        // Released: nothing was debited.
        book.close(b, None);
        assert_eq!(book.available(&secret(1)).unwrap().2, Micros(2));
    }

    #[test]
    fn misses_revocations_and_running_out_of_ids() {
        let book = book_with(100);
        assert!(matches!(book.try_hold(&secret(9), Micros(1), "r", "q", 0), Attempt::Miss));
        for _ in 0..3 {
            held(book.try_hold(&secret(1), Micros(1), "r", "q", 0));
        }
        assert!(matches!(book.try_hold(&secret(1), Micros(1), "r", "q", 0), Attempt::NoIds));
        book.add_ids(10..11);
        assert_eq!(held(book.try_hold(&secret(1), Micros(1), "r", "q", 0)), HoldId(10));
        book.set("key_a", Micros(100), true);
        assert!(matches!(
            book.try_hold(&secret(1), Micros(1), "r", "q", 0),
            Attempt::Decided(HoldOutcome::Revoked { .. })
        ));
        // A reload keeps the open holds.
        book.load(secret(1), "key_a", false, Micros(50));
        assert_eq!(book.available(&secret(1)).unwrap().2, Micros(46));
    }

    #[test]
    fn a_refused_close_reopens_the_hold() {
        let book = book_with(10);
        let h = held(book.try_hold(&secret(1), Micros(4), "r", "q1", 100));
        assert!(book.begin_close(h).is_some());
        book.reopen(h);
        assert_eq!(book.held("key_a"), Micros(4), "still held");
        assert_eq!(book.begin_close(h).map(|o| o.amount), Some(Micros(4)), "and can be closed again");
    }
}
