//! Leases on the holds a replica has open, so a hold lives as long as its request and
//! is still released after its replica died.
//!
//! Each [`PostgresLedger`] keeps the ids (and amounts) of the holds it took and has not
//! captured or released yet ([`Leases`]). A task renews their lease every
//! `PostgresOptions::hold_heartbeat` (10 s by default) by setting `touched_at` to the
//! database's now, and the stale-hold sweep releases only pending holds whose
//! `coalesce(touched_at, created_at)` is older than its age. The sweep's age is at
//! least the longest upstream timeout plus a margin (a minute, `app::STALE_HOLD_MARGIN`),
//! many heartbeats: a live replica's hold is renewed again and again before it could
//! look stale, however long its stream runs, while a dead replica's holds stop being
//! renewed and are released one sweep age after its last heartbeat. A sweep also never
//! releases the holds its own ledger has open, even if a heartbeat failed.
//!
//! The lease ends when the hold is captured or released through this ledger, whatever
//! the answer: after a failed capture the caller withholds the response, so the hold
//! must become sweepable. The heartbeat also forgets holds it finds closed (released by
//! another replica's sweep after a long outage). It runs while the ledger lives: it
//! holds only a [`Weak`] reference to the leases, and ends once the ledger is dropped.
//!
//! Renewing locks the rows `FOR UPDATE SKIP LOCKED`: it never waits for a capture or a
//! sweep holding one of them (and so can never deadlock with a batch of captures); a
//! row skipped is being closed, or is renewed at the next beat.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_postgres::types::Type;

use super::PostgresLedger;
use crate::ledger::Result;

/// The holds this ledger has open: id → amount held.
#[derive(Debug, Default)]
pub(super) struct Leases {
    open: Mutex<HashMap<i64, i64>>,
}

// === impl Leases ===

impl Leases {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, i64>> {
        // No critical section below can leave the map half-changed.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn insert(&self, hold: i64, amount: i64) {
        self.lock().insert(hold, amount);
    }

    /// The amount of an open hold of this ledger.
    pub(super) fn amount(&self, hold: i64) -> Option<i64> {
        self.lock().get(&hold).copied()
    }

    pub(super) fn remove(&self, hold: i64) {
        self.lock().remove(&hold);
    }

    pub(super) fn ids(&self) -> Vec<i64> {
        self.lock().keys().copied().collect()
    }

    fn forget(&self, closed: &HashSet<i64>) {
        self.lock().retain(|id, _| !closed.contains(id));
    }
}

/// Renews the leases of `holds` and answers which of them are closed. See the module
/// docs for the locking.
const RENEW: &str = "
    WITH live AS (
        SELECT id FROM transactions
        WHERE id = ANY($1) AND kind = 'debit' AND status NOT IN ('captured', 'released')
        FOR UPDATE SKIP LOCKED
    ), renewed AS (
        UPDATE transactions SET touched_at = floor(extract(epoch FROM now()))::bigint
        FROM live WHERE transactions.id = live.id
    )
    SELECT id FROM transactions WHERE id = ANY($1) AND status IN ('captured', 'released')";

// === impl PostgresLedger ===

impl PostgresLedger {
    async fn renew(&self, holds: &[i64]) -> Result<HashSet<i64>> {
        self.run(async |c| {
            let rows = c.query_typed(RENEW, &[(&holds, Type::INT8_ARRAY)]).await?;
            rows.iter().map(|r| Ok(r.try_get::<_, i64>(0)?)).collect()
        })
        .await
    }
}

/// Renews the leases of `leases` every `every` until the ledger that owns them is
/// dropped. `db` is a handle on the ledger's pool.
pub(super) async fn heartbeat(db: PostgresLedger, leases: Weak<Leases>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Not kept across the round trip: the ledger may be dropped meanwhile.
        let Some(ids) = leases.upgrade().map(|l| l.ids()) else {
            return;
        };
        if ids.is_empty() {
            continue;
        }
        match db.renew(&ids).await {
            Ok(closed) if !closed.is_empty() => {
                if let Some(l) = leases.upgrade() {
                    l.forget(&closed);
                }
            }
            Ok(_) => {}
            // The next beat tries again; the sweep's age leaves room for many misses.
            Err(e) => tracing::warn!(error = %e, holds = ids.len(), "could not renew the leases of open holds"),
        }
    }
}
