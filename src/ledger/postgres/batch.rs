//! Batching rounds of the PostgreSQL ledger: holds without a spend cap and captures
//! are queued to two tasks, each of which takes everything queued (up to
//! [`MAX_BATCH`]) and runs it as ONE statement. While one round runs, the next
//! gathers, so under load many holds or captures share one round trip and one commit.
//! The module docs of [`super`] say how each statement keeps the guarantees.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_postgres::types::Type;

use super::PostgresLedger;
use crate::ledger::rows::{from_db, no_hold};
use crate::ledger::{HoldId, HoldOutcome, LedgerError, Result, SecretHash};

pub(super) struct Batchers {
    pub(super) holds: mpsc::Sender<HoldJob>,
    pub(super) captures: mpsc::Sender<(HoldId, oneshot::Sender<Result<bool>>)>,
}

/// A hold waiting for the hold batcher.
pub(super) struct HoldJob {
    pub(super) secret: SecretHash,
    pub(super) amount: i64,
    pub(super) route: String,
    pub(super) request_id: String,
    pub(super) reply: oneshot::Sender<Result<HoldOutcome>>,
}

/// Most holds or captures one batch carries.
pub const MAX_BATCH: usize = 256;

// === impl PostgresLedger ===

impl PostgresLedger {
    /// Sends `job` to one of the batchers and waits for its answer.
    pub(super) async fn batched<J, T>(
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
                        balance: from_db(row.try_get(3)?)?,
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
                        (row.try_get::<_, String>(1)?, row.try_get::<_, bool>(2)?, from_db(row.try_get(3)?)?),
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
}

/// Takes every hold queued (up to [`MAX_BATCH`]) and takes them in one transaction;
/// ends when the ledger is dropped. While one batch runs, the next gathers.
pub(super) async fn hold_loop(db: PostgresLedger, mut queue: mpsc::Receiver<HoldJob>) {
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
pub(super) async fn capture_loop(
    db: PostgresLedger,
    mut queue: mpsc::Receiver<(HoldId, oneshot::Sender<Result<bool>>)>,
) {
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
