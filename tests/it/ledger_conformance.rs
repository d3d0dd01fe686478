//! The ledger conformance suite (ARCHITECTURE.md, "The ledger" and "Invariants"): the same cases, asserting the same exact
//! numbers, run against every backend.
//!
//! Each case in [`suite`] takes a fresh, empty `Arc<dyn Ledger>`. A backend joins with
//! one line, `conformance_suite!(module_name, async { (ledger, other, guard) })`: the
//! factory runs once per test and returns the ledger, a second handle opened on the
//! same store on its own (its own connections: to the ledger it is another process,
//! as `tollgate keys` is to a running gateway), plus a guard (a temp dir, a scratch
//! schema…) that lives until the test ends. Most cases use the first handle only; the
//! `case_other_process_*` ones take both. SQLite-only behaviour (reopening a file,
//! surviving `kill -9`) is tested at the bottom.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tollgate::ledger::sqlite::{SqliteLedger, SqliteOptions, SCHEMA_VERSION};
use tollgate::ledger::{HoldId, HoldOutcome, HoldRequest, Ledger, LedgerError, Metered, SecretHash, TxKind};
use tollgate::meter::{Usage, UsageSource};
use tollgate::money::Micros;

pub(crate) mod suite {
    use super::*;
    use tollgate::ledger::{CreditOutcome, Cursor, Settlement, Transaction, TxQuery, KEY_PREFIX};

    pub(crate) const PRICE: Micros = Micros(2_000);
    const ROUTE: &str = "/v1/chat";
    const HOUR: Duration = Duration::from_secs(3600);
    /// Enough to read every row a case writes.
    const ALL: usize = 100_000;

    pub(crate) fn req<'a>(secret: &str, amount: Micros, request_id: &'a str) -> HoldRequest<'a> {
        HoldRequest { secret: SecretHash::of(secret), amount, route: ROUTE, request_id, spend_cap: None }
    }

    async fn hold(l: &Arc<dyn Ledger>, secret: &str, amount: Micros, request_id: &str) -> HoldId {
        match l.authorize(req(secret, amount, request_id)).await.unwrap() {
            HoldOutcome::Held { hold, .. } => hold,
            other => panic!("expected a hold, got {other:?}"),
        }
    }

    async fn balance(l: &Arc<dyn Ledger>, id: &str) -> Micros {
        l.key(id).await.unwrap().expect("key exists").balance
    }

    async fn rows(l: &Arc<dyn Ledger>, id: &str) -> Vec<Transaction> {
        l.transactions(Some(id), ALL).await.unwrap()
    }

    async fn row(l: &Arc<dyn Ledger>, hold: HoldId) -> Transaction {
        let all = l.transactions(None, ALL).await.unwrap();
        all.into_iter().find(|t| t.id == hold.0).expect("hold row exists")
    }

    /// Captures the whole of `hold` (at a fixed price), whatever it held.
    async fn capture_whole(l: &Arc<dyn Ledger>, hold: HoldId) -> bool {
        let amount = row(l, hold).await.amount;
        l.capture(hold, amount, None).await.unwrap()
    }

    fn metered(source: UsageSource) -> Metered {
        Metered {
            model: "gpt-test".into(),
            usage: Usage { input: 1_200, cached_input: 300, cache_write_input: 7, output: 450 },
            source,
        }
    }

    fn of_kind(rows: &[Transaction], kind: TxKind) -> Vec<&Transaction> {
        rows.iter().filter(|t| t.kind == kind).collect()
    }

    fn sum(rows: &[Transaction], kind: TxKind) -> u64 {
        of_kind(rows, kind).iter().map(|t| t.amount.get()).sum()
    }

    /// `balance = Σ credit − Σ debit + Σ refund` (ARCHITECTURE.md, "Invariants").
    async fn assert_invariant(l: &Arc<dyn Ledger>, id: &str) {
        let rows = rows(l, id).await;
        let expected = sum(&rows, TxKind::Credit) + sum(&rows, TxKind::Refund) - sum(&rows, TxKind::Debit);
        assert_eq!(balance(l, id).await, Micros(expected), "balance = Σcredit − Σdebit + Σrefund for {id}");
    }

    pub(crate) async fn case_create_key(l: Arc<dyn Ledger>) {
        let k = l.create_key(Some("alice"), Micros(5_000_000)).await.unwrap();
        assert_eq!(k.balance, Micros(5_000_000));
        let random = k.key.strip_prefix(KEY_PREFIX).expect("secret starts with tg_live_");
        assert!(random.len() >= 32, "at least 128 bits of hex: {random}");
        assert!(random.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!k.key.contains(&k.id) && !k.id.contains(random), "the id does not leak the secret");

        let info = l.key(&k.id).await.unwrap().unwrap();
        assert_eq!(info.id, k.id);
        assert_eq!(info.label.as_deref(), Some("alice"));
        assert_eq!(info.balance, Micros(5_000_000));
        assert!(!info.revoked);
        assert!(info.created_at > 1_600_000_000, "unix seconds: {}", info.created_at);

        let opening = rows(&l, &k.id).await;
        assert_eq!(opening.len(), 1);
        assert_eq!(opening[0].kind, TxKind::Credit);
        assert_eq!(opening[0].amount, Micros(5_000_000));
        assert_eq!(opening[0].status, None);
        assert_eq!(opening[0].key_id, k.id);

        // A zero opening balance writes no transaction (amounts are positive).
        let empty = l.create_key(None, Micros::ZERO).await.unwrap();
        assert_eq!(rows(&l, &empty.id).await, []);
        assert_eq!(l.key(&empty.id).await.unwrap().unwrap().label, None);
        assert_ne!(empty.key, k.key);
        assert_ne!(empty.id, k.id);

        let listed = l.list_keys().await.unwrap();
        let ids: Vec<&str> = listed.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, [k.id.as_str(), empty.id.as_str()]);
        assert_eq!(listed[0], info);
        assert_eq!(l.key("key_nope").await.unwrap(), None);

        // Only the hash is stored: a near miss of the secret is an unknown key.
        let wrong = format!("{}0", k.key);
        assert_eq!(l.authorize(req(&wrong, PRICE, "r1")).await.unwrap(), HoldOutcome::UnknownKey);
        assert_eq!(l.authorize(req(&k.id, PRICE, "r2")).await.unwrap(), HoldOutcome::UnknownKey);
        assert_eq!(balance(&l, &k.id).await, Micros(5_000_000));
    }

    pub(crate) async fn case_capture(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(10_000)).await.unwrap();
        let outcome = l.authorize(req(&k.key, PRICE, "req-1")).await.unwrap();
        let HoldOutcome::Held { hold, key_id, balance: left } = outcome else {
            panic!("expected a hold, got {outcome:?}");
        };
        assert_eq!(key_id, k.id);
        assert_eq!(left, Micros(8_000));
        assert_eq!(balance(&l, &k.id).await, Micros(8_000));

        let debit = row(&l, hold).await;
        assert_eq!(debit.kind, TxKind::Debit);
        assert_eq!(debit.amount, PRICE);
        assert_eq!(debit.status.as_deref(), Some("pending"));
        assert_eq!(debit.route.as_deref(), Some(ROUTE));
        assert_eq!(debit.request_id.as_deref(), Some("req-1"));

        assert!(l.capture(hold, PRICE, None).await.unwrap());
        assert_eq!(row(&l, hold).await.status.as_deref(), Some("captured"));
        assert_eq!(balance(&l, &k.id).await, Micros(8_000), "capture does not move money");
        assert!(l.capture(hold, PRICE, None).await.unwrap(), "capture twice is once");
        // Release after capture: captured is final.
        l.release(hold).await.unwrap();
        assert_eq!(row(&l, hold).await.status.as_deref(), Some("captured"));
        assert_eq!(balance(&l, &k.id).await, Micros(8_000));
        assert_eq!(rows(&l, &k.id).await.len(), 2);

        // A hold id that is not a debit is a caller bug, reported as such.
        let credit_row = rows(&l, &k.id).await.into_iter().find(|t| t.kind == TxKind::Credit).unwrap();
        assert!(matches!(l.capture(HoldId(credit_row.id), PRICE, None).await, Err(LedgerError::Other(_))));
        assert!(matches!(l.capture(HoldId(i64::MAX), PRICE, None).await, Err(LedgerError::Other(_))));
        assert!(matches!(l.release(HoldId(i64::MAX)).await, Err(LedgerError::Other(_))));
        assert_invariant(&l, &k.id).await;
    }

    pub(crate) async fn case_release(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(10_000)).await.unwrap();
        let hold = hold(&l, &k.key, Micros(3_000), "req-9").await;
        assert_eq!(balance(&l, &k.id).await, Micros(7_000));

        l.release(hold).await.unwrap();
        assert_eq!(balance(&l, &k.id).await, Micros(10_000));
        assert_eq!(row(&l, hold).await.status.as_deref(), Some("released"));
        let all = rows(&l, &k.id).await;
        let refunds = of_kind(&all, TxKind::Refund);
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0].amount, Micros(3_000));
        assert_eq!(refunds[0].route.as_deref(), Some(ROUTE));
        assert_eq!(refunds[0].request_id.as_deref(), Some("req-9"));
        assert_eq!(refunds[0].status, None);
        assert_eq!(refunds[0].key_id, k.id);
        assert!(refunds[0].id > hold.0);

        // Twice is once; capture after release changes nothing.
        l.release(hold).await.unwrap();
        assert!(!l.capture(hold, Micros(3_000), None).await.unwrap(), "a released hold cannot be captured");
        assert_eq!(balance(&l, &k.id).await, Micros(10_000));
        assert_eq!(row(&l, hold).await.status.as_deref(), Some("released"));
        assert_eq!(rows(&l, &k.id).await.len(), 3, "credit, debit, one refund");
        assert_invariant(&l, &k.id).await;
    }

    pub(crate) async fn case_insufficient(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(5_000)).await.unwrap();
        let outcome = l.authorize(req(&k.key, Micros(5_001), "r")).await.unwrap();
        assert_eq!(outcome, HoldOutcome::Insufficient { key_id: k.id.clone(), balance: Micros(5_000) });
        assert!(of_kind(&rows(&l, &k.id).await, TxKind::Debit).is_empty(), "no debit row");
        assert_eq!(balance(&l, &k.id).await, Micros(5_000));

        let exact = l.authorize(req(&k.key, Micros(5_000), "r")).await.unwrap();
        assert!(matches!(exact, HoldOutcome::Held { balance: Micros(0), .. }), "{exact:?}");
        assert_eq!(balance(&l, &k.id).await, Micros::ZERO);
        let after = l.authorize(req(&k.key, Micros(1), "r")).await.unwrap();
        assert_eq!(after, HoldOutcome::Insufficient { key_id: k.id.clone(), balance: Micros::ZERO });
        // A credit answers the balance as `key` shows it: less what open holds keep.
        assert_eq!(l.credit(&k.id, Micros(1), None).await.unwrap().balance, Micros(1));
        assert_eq!(balance(&l, &k.id).await, Micros(1));

        // Amounts a backend cannot store are refused, not wrapped.
        assert!(matches!(l.authorize(req(&k.key, Micros(u64::MAX), "r")).await, Err(LedgerError::Overflow)));
        assert!(l.authorize(req(&k.key, Micros::ZERO, "r")).await.is_err(), "a hold is positive");
        assert_invariant(&l, &k.id).await;
    }

    pub(crate) async fn case_revoked_and_unknown(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(10_000)).await.unwrap();
        assert!(l.revoke(&k.id).await.unwrap());
        assert!(l.revoke(&k.id).await.unwrap(), "revoking twice is fine");
        assert!(!l.revoke("key_0000000000000000").await.unwrap());
        assert!(l.key(&k.id).await.unwrap().unwrap().revoked);

        let outcome = l.authorize(req(&k.key, PRICE, "r")).await.unwrap();
        assert_eq!(outcome, HoldOutcome::Revoked { key_id: k.id.clone() });
        let capped = HoldRequest { spend_cap: Some((Micros(1), HOUR)), ..req(&k.key, PRICE, "r") };
        assert_eq!(l.authorize(capped).await.unwrap(), HoldOutcome::Revoked { key_id: k.id.clone() });
        assert_eq!(balance(&l, &k.id).await, Micros(10_000));

        let unknown = l.authorize(req("tg_live_00000000000000000000000000000000", PRICE, "r")).await.unwrap();
        assert_eq!(unknown, HoldOutcome::UnknownKey);
        assert_eq!(rows(&l, &k.id).await.len(), 1);
    }

    pub(crate) async fn case_race(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(20 * PRICE.get())).await.unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (l, secret) = (l.clone(), k.key.clone());
                tokio::spawn(async move {
                    let request_id = format!("race-{i}");
                    l.authorize(req(&secret, PRICE, &request_id)).await.unwrap()
                })
            })
            .collect();
        let (mut held, mut refused) = (0, 0);
        for task in tasks {
            match task.await.unwrap() {
                HoldOutcome::Held { .. } => held += 1,
                HoldOutcome::Insufficient { balance, .. } => {
                    assert_eq!(balance, Micros::ZERO, "refused only once empty");
                    refused += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((held, refused), (20, 180));
        assert_eq!(balance(&l, &k.id).await, Micros::ZERO);
        let all = rows(&l, &k.id).await;
        assert_eq!(of_kind(&all, TxKind::Debit).len(), 20);
        assert!(of_kind(&all, TxKind::Debit).iter().all(|t| t.amount == PRICE));
        assert_invariant(&l, &k.id).await;
    }

    pub(crate) async fn case_idempotent_credit(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(1_000)).await.unwrap();
        let first = l.credit(&k.id, Micros(500), Some("topup-1")).await.unwrap();
        assert_eq!(first, CreditOutcome { balance: Micros(1_500), applied: true });
        let again = l.credit(&k.id, Micros(500), Some("topup-1")).await.unwrap();
        assert_eq!(again, CreditOutcome { balance: Micros(1_500), applied: false });
        let other = l.credit(&k.id, Micros(500), Some("topup-2")).await.unwrap();
        assert_eq!(other, CreditOutcome { balance: Micros(2_000), applied: true });
        let plain = l.credit(&k.id, Micros(1), None).await.unwrap();
        assert_eq!(plain, CreditOutcome { balance: Micros(2_001), applied: true });
        let plain = l.credit(&k.id, Micros(1), None).await.unwrap();
        assert_eq!(plain, CreditOutcome { balance: Micros(2_002), applied: true }, "no key, no dedup");

        // Concurrent duplicates: applied exactly once.
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (l, id) = (l.clone(), k.id.clone());
                tokio::spawn(async move { l.credit(&id, Micros(1_000), Some("topup-3")).await.unwrap() })
            })
            .collect();
        let mut applied = 0;
        for task in tasks {
            let outcome = task.await.unwrap();
            applied += usize::from(outcome.applied);
        }
        assert_eq!(applied, 1);
        assert_eq!(balance(&l, &k.id).await, Micros(3_002));

        // An idempotency key names one top-up in the whole ledger: reused with another
        // amount, or on another key, it is refused and changes nothing.
        let k2 = l.create_key(None, Micros::ZERO).await.unwrap();
        let conflict = |e: LedgerError| match e {
            LedgerError::IdempotencyConflict { idempotency_key, key_id, amount } => (idempotency_key, key_id, amount),
            other => panic!("expected a conflict, got {other:?}"),
        };
        let first_topup = ("topup-1".to_owned(), k.id.clone(), Micros(500));
        let other_amount = l.credit(&k.id, Micros(501), Some("topup-1")).await.unwrap_err();
        assert!(other_amount.to_string().contains("new idempotency key"), "says what to do: {other_amount}");
        assert_eq!(conflict(other_amount), first_topup);
        assert_eq!(conflict(l.credit(&k2.id, Micros(500), Some("topup-1")).await.unwrap_err()), first_topup);
        assert_eq!(conflict(l.credit(&k2.id, Micros(700), Some("topup-1")).await.unwrap_err()), first_topup);
        assert_eq!(balance(&l, &k2.id).await, Micros::ZERO);
        assert_eq!(balance(&l, &k.id).await, Micros(3_002));
        let scoped = l.credit(&k2.id, Micros(700), Some("k2-topup-1")).await.unwrap();
        assert_eq!(scoped, CreditOutcome { balance: Micros(700), applied: true });
        // Still a harmless repeat after the conflicts.
        let again = l.credit(&k.id, Micros(500), Some("topup-1")).await.unwrap();
        assert_eq!(again, CreditOutcome { balance: Micros(3_002), applied: false });

        // Concurrent first uses of one idempotency key on two keys: exactly one applies,
        // the other is a conflict.
        let tasks: Vec<_> = [&k.id, &k2.id]
            .into_iter()
            .cycle()
            .take(20)
            .map(|id| {
                let (l, id) = (l.clone(), id.clone());
                tokio::spawn(async move { l.credit(&id, Micros(10), Some("topup-race")).await })
            })
            .collect();
        let (mut applied, mut repeats, mut conflicts) = (0, 0, 0);
        for task in tasks {
            match task.await.unwrap() {
                Ok(CreditOutcome { applied: true, .. }) => applied += 1,
                Ok(CreditOutcome { applied: false, .. }) => repeats += 1,
                Err(LedgerError::IdempotencyConflict { .. }) => conflicts += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((applied, repeats + conflicts), (1, 19));
        assert_eq!(conflicts, 10, "every use on the key that lost is a conflict");
        let winner = if balance(&l, &k.id).await == Micros(3_012) { &k.id } else { &k2.id };
        let total = balance(&l, &k.id).await.get() + balance(&l, &k2.id).await.get();
        assert_eq!(total, 3_002 + 700 + 10, "won by {winner}");

        assert!(matches!(l.credit("key_nope", Micros(1), None).await, Err(LedgerError::NoSuchKey(_))));
        assert!(matches!(l.credit("key_nope", Micros(1), Some("x")).await, Err(LedgerError::NoSuchKey(_))));
        assert!(matches!(l.credit(&k.id, Micros::ZERO, None).await, Err(LedgerError::Other(_))));
        assert!(matches!(l.credit(&k.id, Micros(u64::MAX), None).await, Err(LedgerError::Overflow)));
        let top = balance(&l, &k.id).await.get();
        let near_max = Micros(i64::MAX as u64 - top);
        assert_eq!(l.credit(&k.id, near_max, None).await.unwrap().balance, Micros(i64::MAX as u64));
        assert!(matches!(l.credit(&k.id, Micros(1), None).await, Err(LedgerError::Overflow)));

        // A revoked key can still be credited (e.g. before it is reinstated).
        l.revoke(&k2.id).await.unwrap();
        let before = balance(&l, &k2.id).await;
        let revoked = l.credit(&k2.id, Micros(300), Some("late")).await.unwrap();
        assert_eq!(revoked, CreditOutcome { balance: Micros(before.get() + 300), applied: true });

        let credits = of_kind(&rows(&l, &k.id).await, TxKind::Credit).len();
        let raced = usize::from(winner == &k.id);
        assert_eq!(credits, 7 + raced, "opening, topup-1, topup-2, two plain, topup-3, near max (and the race)");
        assert_invariant(&l, &k.id).await;
        assert_invariant(&l, &k2.id).await;
    }

    pub(crate) async fn case_spend_cap(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(1_000_000)).await.unwrap();
        let cap = Micros(3 * PRICE.get());
        let capped = |id: &'static str| HoldRequest { spend_cap: Some((cap, HOUR)), ..req(&k.key, PRICE, id) };

        let mut holds = Vec::new();
        for i in 0..3 {
            match l.authorize(capped(["a", "b", "c"][i])).await.unwrap() {
                HoldOutcome::Held { hold, .. } => holds.push(hold),
                other => panic!("hold {i}: {other:?}"),
            }
        }
        assert!(l.capture(holds[0], PRICE, None).await.unwrap());
        let fourth = l.authorize(capped("d")).await.unwrap();
        assert_eq!(fourth, HoldOutcome::SpendCapReached { key_id: k.id.clone(), spent: cap, cap });
        assert_eq!(balance(&l, &k.id).await, Micros(1_000_000 - 3 * PRICE.get()), "nothing held");
        assert_eq!(of_kind(&rows(&l, &k.id).await, TxKind::Debit).len(), 3);

        // A released hold is not spending: it frees its room.
        l.release(holds[1]).await.unwrap();
        assert!(matches!(l.authorize(capped("e")).await.unwrap(), HoldOutcome::Held { .. }));
        let sixth = l.authorize(capped("f")).await.unwrap();
        assert_eq!(sixth, HoldOutcome::SpendCapReached { key_id: k.id.clone(), spent: cap, cap });

        // A hold larger than the room left is refused even if the cap is not yet reached.
        l.release(holds[2]).await.unwrap();
        let big = HoldRequest { spend_cap: Some((cap, HOUR)), ..req(&k.key, Micros(2 * PRICE.get()), "g") };
        let spent = Micros(2 * PRICE.get());
        assert_eq!(l.authorize(big).await.unwrap(), HoldOutcome::SpendCapReached { key_id: k.id.clone(), spent, cap });

        // The cap applies per request: without it the same key is only bound by its balance.
        assert!(matches!(l.authorize(req(&k.key, PRICE, "h")).await.unwrap(), HoldOutcome::Held { .. }));
        assert_invariant(&l, &k.id).await;
    }

    /// A hold lives as long as its request: the sweep never releases a hold its own
    /// ledger has open, however old (a stream may run for many minutes). Holds whose
    /// process died are released: `case_other_process_dies_holding`.
    pub(crate) async fn case_release_stale_holds(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(100_000)).await.unwrap();
        let other = l.create_key(None, Micros(100_000)).await.unwrap();
        let a = hold(&l, &k.key, Micros(1_000), "a").await;
        let b = hold(&l, &k.key, Micros(2_000), "b").await;
        let c = hold(&l, &k.key, Micros(4_000), "c").await;
        let d = hold(&l, &other.key, Micros(8_000), "d").await;
        assert!(l.capture(b, Micros(2_000), None).await.unwrap());
        assert_eq!(balance(&l, &k.id).await, Micros(93_000));

        assert_eq!(l.release_stale_holds(HOUR).await.unwrap(), 0, "all holds are fresh");
        assert_eq!(l.release_stale_holds(Duration::ZERO).await.unwrap(), 0, "and open in this ledger");
        for (h, status) in [(a, "pending"), (b, "captured"), (c, "pending"), (d, "pending")] {
            assert_eq!(row(&l, h).await.status.as_deref(), Some(status));
        }
        assert_eq!(balance(&l, &k.id).await, Micros(93_000));

        // Each still ends as its request says.
        assert!(l.capture(a, Micros(600), Some(&metered(UsageSource::Reported))).await.unwrap());
        l.release(c).await.unwrap();
        assert!(l.capture(d, Micros(8_000), None).await.unwrap());
        assert_eq!(balance(&l, &k.id).await, Micros(97_400));
        assert_eq!(balance(&l, &other.id).await, Micros(92_000));
        for (h, status) in [(a, "captured"), (b, "captured"), (c, "released"), (d, "captured")] {
            assert_eq!(row(&l, h).await.status.as_deref(), Some(status));
        }
        assert_eq!(l.release_stale_holds(Duration::ZERO).await.unwrap(), 0);
        assert_invariant(&l, &k.id).await;
        assert_invariant(&l, &other.id).await;
    }

    /// A metered capture takes less than the hold: one debit row of the captured amount
    /// that records the hold, the rest back to the balance, no refund row.
    pub(crate) async fn case_capture_less(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(100_000)).await.unwrap();
        let h = hold(&l, &k.key, Micros(10_000), "m-1").await;
        assert_eq!(balance(&l, &k.id).await, Micros(90_000));
        let m = metered(UsageSource::Reported);
        assert!(l.capture(h, Micros(3_500), Some(&m)).await.unwrap());
        assert_eq!(balance(&l, &k.id).await, Micros(96_500));

        let debit = row(&l, h).await;
        assert_eq!(
            (debit.kind, debit.amount, debit.held, debit.status.as_deref()),
            (TxKind::Debit, Micros(3_500), Some(Micros(10_000)), Some("captured"))
        );
        assert_eq!(debit.model.as_deref(), Some("gpt-test"));
        assert_eq!(debit.usage, Some(m.usage));
        assert_eq!(debit.usage_source, Some(UsageSource::Reported));
        assert_eq!(debit.request_id.as_deref(), Some("m-1"));
        assert!(of_kind(&rows(&l, &k.id).await, TxKind::Refund).is_empty(), "no refund row for the rest");

        let json = serde_json::to_value(&debit).unwrap();
        assert_eq!(json["amount"], serde_json::json!(Micros(3_500).to_string()));
        assert_eq!(json["held"], serde_json::json!(Micros(10_000).to_string()));
        assert_eq!(json["model"], "gpt-test");
        assert_eq!(
            json["usage"],
            serde_json::json!({
                "input_tokens": 1_200, "cached_input_tokens": 300, "cache_write_input_tokens": 7, "output_tokens": 450
            })
        );
        assert_eq!(json["usage_source"], "reported");

        // Twice is once, whatever the second asks (within the hold).
        assert!(l.capture(h, Micros(3_500), Some(&m)).await.unwrap());
        assert!(l.capture(h, Micros(1), None).await.unwrap());
        assert!(l.capture(h, Micros::ZERO, None).await.unwrap());
        l.release(h).await.unwrap();
        assert_eq!(row(&l, h).await, debit, "nothing changed");
        assert_eq!(balance(&l, &k.id).await, Micros(96_500));
        assert_eq!(rows(&l, &k.id).await.len(), 2);
        assert_invariant(&l, &k.id).await;
    }

    /// A capture of exactly the hold: at a fixed price the row reads as it always did;
    /// metered, it records the hold and the usage.
    pub(crate) async fn case_capture_exactly(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(10_000)).await.unwrap();
        let fixed = hold(&l, &k.key, PRICE, "fixed").await;
        assert!(l.capture(fixed, PRICE, None).await.unwrap());
        let debit = row(&l, fixed).await;
        assert_eq!((debit.amount, debit.held, debit.model.as_deref()), (PRICE, None, None));
        assert_eq!((debit.usage, debit.usage_source), (None, None));
        let json = serde_json::to_value(&debit).unwrap();
        let mut fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["amount", "created_at", "id", "key_id", "kind", "request_id", "route", "status"]);

        let m = metered(UsageSource::Estimated);
        let exact = hold(&l, &k.key, Micros(1_000), "metered").await;
        assert!(l.capture(exact, Micros(1_000), Some(&m)).await.unwrap());
        let debit = row(&l, exact).await;
        assert_eq!((debit.amount, debit.held), (Micros(1_000), Some(Micros(1_000))));
        assert_eq!((debit.usage, debit.usage_source), (Some(m.usage), Some(UsageSource::Estimated)));
        assert_eq!(serde_json::to_value(&debit).unwrap()["usage_source"], "estimated");
        assert_eq!(balance(&l, &k.id).await, Micros(7_000));
        assert_invariant(&l, &k.id).await;
    }

    /// A capture of zero is a release: the whole hold back, with its refund row.
    pub(crate) async fn case_capture_zero(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(10_000)).await.unwrap();
        let h = hold(&l, &k.key, Micros(5_000), "empty").await;
        assert!(l.capture(h, Micros::ZERO, Some(&metered(UsageSource::Reported))).await.unwrap());
        assert_eq!(balance(&l, &k.id).await, Micros(10_000));
        let debit = row(&l, h).await;
        assert_eq!((debit.status.as_deref(), debit.amount, debit.held), (Some("released"), Micros(5_000), None));
        let all = rows(&l, &k.id).await;
        let refunds = of_kind(&all, TxKind::Refund);
        assert_eq!(refunds.len(), 1);
        assert_eq!((refunds[0].amount, refunds[0].request_id.as_deref()), (Micros(5_000), Some("empty")));
        // Charging nothing again is still possible; charging something no longer is.
        assert!(l.capture(h, Micros::ZERO, None).await.unwrap());
        assert!(!l.capture(h, Micros(1), None).await.unwrap());
        assert_eq!(rows(&l, &k.id).await.len(), 3);
        assert_eq!(balance(&l, &k.id).await, Micros(10_000));
        assert!(matches!(l.capture(HoldId(i64::MAX), Micros::ZERO, None).await, Err(LedgerError::Other(_))));
        assert_invariant(&l, &k.id).await;
    }

    /// A capture above the hold is refused and changes nothing: the hold stays open.
    pub(crate) async fn case_capture_above_the_hold(l: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(10_000)).await.unwrap();
        let h = hold(&l, &k.key, Micros(1_000), "over").await;
        let m = metered(UsageSource::Reported);
        assert!(matches!(l.capture(h, Micros(1_001), Some(&m)).await, Err(LedgerError::Other(_))));
        assert!(matches!(l.capture(h, Micros(u64::MAX), None).await, Err(LedgerError::Overflow)));
        let pending = row(&l, h).await;
        assert_eq!((pending.status.as_deref(), pending.amount, pending.held), (Some("pending"), Micros(1_000), None));
        assert_eq!(balance(&l, &k.id).await, Micros(9_000));
        assert_eq!(rows(&l, &k.id).await.len(), 2);

        assert!(l.capture(h, Micros(999), Some(&m)).await.unwrap());
        assert_eq!(balance(&l, &k.id).await, Micros(9_001));
        // Closed, it still refuses more than it held.
        assert!(matches!(l.capture(h, Micros(1_001), None).await, Err(LedgerError::Other(_))));
        assert_eq!(row(&l, h).await.amount, Micros(999));
        assert_invariant(&l, &k.id).await;
    }

    /// Concurrent holds on one key take exactly what the balance covers; capturing each
    /// for less gives the rest back, and the rows add up to the balance.
    pub(crate) async fn case_concurrent_metered_holds(l: Arc<dyn Ledger>) {
        const X: u64 = 9_000;
        let k = l.create_key(None, Micros(3 * X)).await.unwrap();
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let (l, secret) = (l.clone(), k.key.clone());
                tokio::spawn(async move { l.authorize(req(&secret, Micros(X), &format!("llm-{i}"))).await.unwrap() })
            })
            .collect();
        let mut holds = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                HoldOutcome::Held { hold, .. } => holds.push(hold),
                HoldOutcome::Insufficient { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(holds.len(), 3);
        assert_eq!(balance(&l, &k.id).await, Micros::ZERO);
        let m = metered(UsageSource::Reported);
        let captures: Vec<_> = holds
            .iter()
            .enumerate()
            .map(|(i, &h)| {
                let (l, m) = (l.clone(), m.clone());
                tokio::spawn(async move { l.capture(h, Micros(1_000 * (i as u64 + 1)), Some(&m)).await.unwrap() })
            })
            .collect();
        for c in captures {
            assert!(c.await.unwrap());
        }
        assert_eq!(balance(&l, &k.id).await, Micros(3 * X - 6_000));
        let all = rows(&l, &k.id).await;
        let debits = sum(&all, TxKind::Debit);
        assert_eq!(debits - sum(&all, TxKind::Refund), 6_000, "Σ debit − Σ refund = what the balance lost");
        assert!(of_kind(&all, TxKind::Debit).iter().all(|t| t.held == Some(Micros(X))));
        assert_invariant(&l, &k.id).await;
    }

    /// A key's own account, looked up by its secret, and one request's transactions.
    pub(crate) async fn case_account_and_request_transactions(l: Arc<dyn Ledger>) {
        let k = l.create_key(Some("self"), Micros(50_000)).await.unwrap();
        let k2 = l.create_key(None, Micros(50_000)).await.unwrap();
        let a = hold(&l, &k.key, Micros(2_000), "r-a").await;
        assert!(l.capture(a, Micros(1_500), Some(&metered(UsageSource::Reported))).await.unwrap());
        let b = hold(&l, &k.key, Micros(3_000), "r-b").await;
        l.release(b).await.unwrap();
        let c = hold(&l, &k.key, Micros(4_000), "r-c").await;
        let x = hold(&l, &k2.key, Micros(100), "r-x").await;

        let secret = SecretHash::of(&k.key);
        let acct = l.account(secret, None).await.unwrap().unwrap();
        assert_eq!((acct.key.id.as_str(), acct.key.label.as_deref()), (k.id.as_str(), Some("self")));
        assert_eq!((acct.key.balance, acct.held, acct.spent), (Micros(44_500), Micros(4_000), None));
        assert_eq!(acct.key, l.key(&k.id).await.unwrap().unwrap());
        let acct = l.account(secret, Some(HOUR)).await.unwrap().unwrap();
        assert_eq!(acct.spent, Some(Micros(5_500)), "captured and held, not released");
        assert!(l.revoke(&k.id).await.unwrap());
        assert!(l.account(secret, None).await.unwrap().unwrap().key.revoked);
        assert_eq!(l.account(SecretHash::of("tg_live_nope"), Some(HOUR)).await.unwrap(), None);

        let ra = l.request_transactions(&k.id, "r-a").await.unwrap();
        assert_eq!(ra, [row(&l, a).await]);
        assert_eq!((ra[0].amount, ra[0].held), (Micros(1_500), Some(Micros(2_000))));
        let rb = l.request_transactions(&k.id, "r-b").await.unwrap();
        assert_eq!(rb.iter().map(|t| t.kind).collect::<Vec<_>>(), [TxKind::Debit, TxKind::Refund]);
        assert_eq!((rb[0].id, rb[0].status.as_deref(), rb[1].amount), (b.0, Some("released"), Micros(3_000)));
        let rc = l.request_transactions(&k.id, "r-c").await.unwrap();
        assert_eq!((rc.len(), rc[0].id, rc[0].status.as_deref()), (1, c.0, Some("pending")));
        assert_eq!(l.request_transactions(&k2.id, "r-x").await.unwrap()[0].id, x.0);
        assert_eq!(l.request_transactions(&k.id, "r-x").await.unwrap(), [], "another key's request");
        assert_eq!(l.request_transactions(&k2.id, "r-a").await.unwrap(), []);
        assert_eq!(l.request_transactions(&k.id, "nope").await.unwrap(), []);
    }

    pub(crate) async fn case_nonces(l: Arc<dyn Ledger>) {
        let payer = "0xAbCdEf0123456789aBcDeF0123456789AbCdEf01";
        let far = 4_000_000_000;
        assert!(l.reserve_nonce(payer, "0xAA01", far).await.unwrap());
        assert!(!l.reserve_nonce(payer, "0xAA01", far).await.unwrap(), "replay");
        assert!(!l.reserve_nonce(&payer.to_lowercase(), "0xaa01", far).await.unwrap(), "case-insensitive");
        assert!(!l.reserve_nonce(&payer.to_uppercase(), "0XAA01", far).await.unwrap(), "case-insensitive");
        assert!(l.reserve_nonce(payer, "0xAA02", far).await.unwrap(), "another nonce");
        assert!(l.reserve_nonce("0x1111111111111111111111111111111111111111", "0xAA01", far).await.unwrap());

        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move { l.reserve_nonce(payer, "0xBEEF", far).await.unwrap() })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            won += usize::from(task.await.unwrap());
        }
        assert_eq!(won, 1);

        for (nonce, valid_before) in [("0x100", 100), ("0x200", 200), ("0x300", 300)] {
            assert!(l.reserve_nonce(payer, nonce, valid_before).await.unwrap());
        }
        assert_eq!(l.purge_nonces(200).await.unwrap(), 1, "only valid_before < now");
        assert_eq!(l.purge_nonces(200).await.unwrap(), 0);
        assert!(l.reserve_nonce(payer, "0x100", 100).await.unwrap(), "purged, so new again");
        assert!(!l.reserve_nonce(payer, "0x200", 200).await.unwrap(), "still recorded");
        assert!(!l.reserve_nonce(payer, "0xAA01", far).await.unwrap(), "unexpired kept");
        assert_eq!(l.purge_nonces(301).await.unwrap(), 3);
        assert!(matches!(l.reserve_nonce(payer, "0x1", u64::MAX).await, Err(LedgerError::Overflow)));
    }

    pub(crate) async fn case_transactions_order(l: Arc<dyn Ledger>) {
        let a = l.create_key(None, Micros(10_000)).await.unwrap();
        let b = l.create_key(None, Micros(20_000)).await.unwrap();
        let h = hold(&l, &a.key, Micros(1_000), "a1").await;
        l.credit(&b.id, Micros(5), None).await.unwrap();
        l.release(h).await.unwrap();
        hold(&l, &b.key, Micros(7), "b1").await;

        let of_a = rows(&l, &a.id).await;
        let kinds: Vec<TxKind> = of_a.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, [TxKind::Refund, TxKind::Debit, TxKind::Credit], "newest first");
        assert!(of_a.iter().all(|t| t.key_id == a.id));
        assert!(newest_first(&of_a));

        let all = l.transactions(None, ALL).await.unwrap();
        assert_eq!(all.len(), 6);
        assert!(newest_first(&all));
        let newest: Vec<(&str, TxKind)> = all.iter().take(3).map(|t| (t.key_id.as_str(), t.kind)).collect();
        assert_eq!(
            newest,
            [(b.id.as_str(), TxKind::Debit), (a.id.as_str(), TxKind::Refund), (b.id.as_str(), TxKind::Credit)]
        );

        let two = l.transactions(Some(&b.id), 2).await.unwrap();
        assert_eq!(two.iter().map(|t| t.amount.get()).collect::<Vec<_>>(), [7, 5]);
        assert_eq!(l.transactions(None, 1).await.unwrap(), all[..1]);
        assert_eq!(l.transactions(None, 0).await.unwrap(), []);
        assert_eq!(l.transactions(Some("key_nope"), 10).await.unwrap(), []);
    }

    /// Strictly newest first: by `created_at`, then id.
    fn newest_first(rows: &[Transaction]) -> bool {
        rows.windows(2).all(|w| Cursor::of(&w[0]) > Cursor::of(&w[1]))
    }

    /// Every row of `query`'s listing, read `limit` at a time by following `next`.
    async fn paged(l: &Arc<dyn Ledger>, key: Option<&str>, limit: usize) -> Vec<Transaction> {
        let (mut all, mut before) = (Vec::new(), None);
        loop {
            let page = l.transaction_page(TxQuery { key, before, limit }).await.unwrap();
            assert!(page.transactions.len() <= limit);
            all.extend(page.transactions);
            match page.next {
                Some(next) => before = Some(next),
                None => return all,
            }
        }
    }

    fn ids(rows: &[Transaction]) -> Vec<i64> {
        rows.iter().map(|t| t.id).collect()
    }

    fn unix_now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    /// A revocation or a top-up made through another handle (another process, as
    /// `tollgate keys` is to the gateway) holds for the very next hold: no delay, no
    /// retry.
    pub(crate) async fn case_other_process_revocations_and_top_ups(l: Arc<dyn Ledger>, other: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(3_000)).await.unwrap();
        // The gateway has served the key: whatever it keeps of it is warm.
        let first = hold(&l, &k.key, PRICE, "a").await;
        assert!(l.capture(first, PRICE, None).await.unwrap());
        let short = l.authorize(req(&k.key, PRICE, "b")).await.unwrap();
        assert_eq!(short, HoldOutcome::Insufficient { key_id: k.id.clone(), balance: Micros(1_000) });
        for i in 0..20 {
            let topup = format!("topup-{i}");
            assert!(other.credit(&k.id, PRICE, Some(&topup)).await.unwrap().applied);
            let request_id = format!("after-{topup}");
            match l.authorize(req(&k.key, PRICE, &request_id)).await.unwrap() {
                HoldOutcome::Held { hold, balance, .. } => {
                    assert_eq!(balance, Micros(1_000), "top-up {i}");
                    assert!(l.capture(hold, PRICE, None).await.unwrap());
                }
                other => panic!("top-up {i} not seen by the next request: {other:?}"),
            }
        }

        // A request that started before the revocation may finish; none after it starts.
        let before = hold(&l, &k.key, Micros(500), "before-revoke").await;
        assert!(other.revoke(&k.id).await.unwrap());
        assert_eq!(
            l.authorize(req(&k.key, Micros(1), "c")).await.unwrap(),
            HoldOutcome::Revoked { key_id: k.id.clone() }
        );
        let capped = HoldRequest { spend_cap: Some((PRICE, HOUR)), ..req(&k.key, Micros(1), "d") };
        assert_eq!(l.authorize(capped).await.unwrap(), HoldOutcome::Revoked { key_id: k.id.clone() });
        assert!(l.capture(before, Micros(500), None).await.unwrap());

        for i in 0..10 {
            let k = other.create_key(None, Micros(10_000)).await.unwrap();
            let request_id = format!("warm-{i}");
            let h = hold(&l, &k.key, PRICE, &request_id).await;
            l.release(h).await.unwrap();
            assert!(other.revoke(&k.id).await.unwrap());
            let refused = l.authorize(req(&k.key, PRICE, &request_id)).await.unwrap();
            assert_eq!(refused, HoldOutcome::Revoked { key_id: k.id.clone() }, "revocation {i}");
        }
        assert_invariant(&l, &k.id).await;
    }

    /// Rows written by the gateway and by another process, interleaved, list newest
    /// first by time, and paging with any limit reads each exactly once, also while
    /// rows are written and holds close between pages.
    /// A process that held and died: its hold is released (PostgreSQL: by the sweep,
    /// once nobody renews it; SQLite: it was never written), and a late capture of it
    /// charges nothing. The surviving ledger's own hold is untouched.
    pub(crate) async fn case_other_process_dies_holding(l: Arc<dyn Ledger>, other: Arc<dyn Ledger>) {
        let k = l.create_key(None, Micros(10_000)).await.unwrap();
        let theirs = hold(&other, &k.key, Micros(3_000), "dead").await;
        let mine = hold(&l, &k.key, Micros(2_000), "alive").await;
        drop(other);
        let released = l.release_stale_holds(Duration::ZERO).await.unwrap();
        assert!(released <= 1, "only the dead process's hold, if it was written: {released}");
        assert_eq!(balance(&l, &k.id).await, Micros(8_000));
        assert!(!l.capture(theirs, Micros(3_000), None).await.unwrap(), "too late to charge");
        l.release(theirs).await.unwrap();
        assert_eq!(balance(&l, &k.id).await, Micros(8_000));
        assert!(l.capture(mine, Micros(1_500), None).await.unwrap());
        assert_eq!(balance(&l, &k.id).await, Micros(8_500));
        assert_invariant(&l, &k.id).await;
    }

    pub(crate) async fn case_other_process_transactions_page(l: Arc<dyn Ledger>, other: Arc<dyn Ledger>) {
        let a = l.create_key(None, Micros(1_000_000)).await.unwrap();
        let b = other.create_key(None, Micros(1_000_000)).await.unwrap();
        let mut open = Vec::new();
        for i in 0..12 {
            let request_id = format!("gw-{i}");
            let secret = if i % 2 == 0 { &a.key } else { &b.key };
            let h = hold(&l, secret, Micros(100 + i), &request_id).await;
            match i % 3 {
                0 => assert!(capture_whole(&l, h).await),
                1 => l.release(h).await.unwrap(),
                _ => open.push(h),
            }
            let topup = format!("cli-{i}");
            other.credit(if i % 2 == 0 { &b.id } else { &a.id }, Micros(7), Some(&topup)).await.unwrap();
        }
        // A gateway row a second later than everything the other process wrote sorts
        // first, whatever the ids (SQLite numbers the gateway's rows from a block it
        // reserved before the other process's rows).
        let newest_so_far = l.transactions(None, 1).await.unwrap()[0].created_at;
        while unix_now() <= newest_so_far {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let late = hold(&l, &a.key, Micros(1), "gw-late").await;
        assert!(l.capture(late, Micros(1), None).await.unwrap());
        assert_eq!(l.transactions(None, 1).await.unwrap()[0].request_id.as_deref(), Some("gw-late"));

        let all = l.transactions(None, ALL).await.unwrap();
        // Two openings, 12 holds (4 released with their refund), 12 credits, the late one.
        assert_eq!(all.len(), 2 + 12 + 4 + 12 + 1);
        assert!(newest_first(&all));
        assert_eq!(all.iter().filter(|t| t.status.as_deref() == Some("pending")).count(), 4);
        let whole = l.transaction_page(TxQuery { key: None, before: None, limit: ALL }).await.unwrap();
        assert_eq!((whole.transactions.len(), whole.next), (all.len(), None));
        for limit in [1, 2, 3, 5, all.len() - 1, all.len()] {
            assert_eq!(ids(&paged(&l, None, limit).await), ids(&all), "limit {limit}");
        }
        let of_a = rows(&l, &a.id).await;
        assert!(of_a.iter().all(|t| t.key_id == a.id) && newest_first(&of_a));
        assert_eq!(of_a.len(), 1 + 6 + 2 + 6 + 1);
        for limit in [1, 4] {
            assert_eq!(ids(&paged(&l, Some(&a.id), limit).await), ids(&of_a), "key a, limit {limit}");
        }

        // Writes and closing holds between pages: the pages still add up to the rows
        // that were there when paging began, each once, in place.
        let first = l.transaction_page(TxQuery { key: None, before: None, limit: 3 }).await.unwrap();
        let read_first = first.transactions.len();
        let credit = other.credit(&a.id, Micros(9), None).await.unwrap();
        let h = hold(&l, &b.key, Micros(9), "gw-between").await;
        for h in open.drain(..) {
            assert!(capture_whole(&l, h).await);
        }
        let mut seen = first.transactions;
        let (mut before, limit) = (first.next, 4);
        while let Some(cursor) = before {
            let page = l.transaction_page(TxQuery { key: None, before: Some(cursor), limit }).await.unwrap();
            seen.extend(page.transactions);
            before = page.next;
        }
        assert_eq!(ids(&seen), ids(&all));
        let later = &seen[read_first..];
        assert!(later.iter().all(|t| t.status.as_deref() != Some("pending")), "captured holds show as captured");
        // The rows written meanwhile are the newest two (in the same second, so in id
        // order, which on SQLite depends on whose block of ids is higher).
        let now = l.transactions(None, 2).await.unwrap();
        assert!(now.iter().any(|t| t.id == h.0 && t.status.as_deref() == Some("pending")), "{now:?}");
        assert!(now.iter().any(|t| t.kind == TxKind::Credit && t.amount == Micros(9)), "{now:?}");
        assert!(credit.applied);
        assert_invariant(&l, &a.id).await;
        assert_invariant(&l, &b.id).await;
    }

    pub(crate) async fn case_settlements(l: Arc<dyn Ledger>) {
        assert_eq!(l.settlements(10).await.unwrap(), []);
        let first = Settlement {
            rail: "x402".into(),
            payer: "0xAbCd000000000000000000000000000000000001".into(),
            amount: 10_000,
            asset: "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913".into(),
            network: "base".into(),
            tx_hash: "0xfeed01".into(),
            route: ROUTE.into(),
            request_id: "req-1".into(),
        };
        let second =
            Settlement { amount: 20_000, tx_hash: "0xfeed02".into(), request_id: "req-2".into(), ..first.clone() };
        l.record_settlement(&first).await.unwrap();
        l.record_settlement(&second).await.unwrap();
        assert_eq!(l.settlements(10).await.unwrap(), [second.clone(), first]);
        assert_eq!(l.settlements(1).await.unwrap(), std::slice::from_ref(&second));
        let huge = Settlement { amount: u64::MAX, ..second };
        assert!(matches!(l.record_settlement(&huge).await, Err(LedgerError::Overflow)));
        assert_eq!(l.settlements(10).await.unwrap().len(), 2);
    }

    pub(crate) async fn case_ping(l: Arc<dyn Ledger>) {
        l.ping().await.unwrap();
        l.ping().await.unwrap();
    }
}

/// Expands to one `#[tokio::test]` per case of [`suite`], in a module named `$backend`.
/// `$factory` is an expression evaluating to a future of `(Arc<dyn Ledger>, Arc<dyn
/// Ledger>, guard)`: the ledger, another handle on the same store, the guard.
macro_rules! conformance_suite {
    (@cases $factory:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (ledger, _other, _guard) = $factory.await;
                crate::ledger_conformance::suite::$case(ledger).await;
            }
        )+
    };
    (@pair_cases $factory:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (ledger, other, _guard) = $factory.await;
                crate::ledger_conformance::suite::$case(ledger, other).await;
            }
        )+
    };
    ($backend:ident, $factory:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;

            conformance_suite!(@cases $factory;
                case_create_key,
                case_capture,
                case_release,
                case_insufficient,
                case_revoked_and_unknown,
                case_race,
                case_idempotent_credit,
                case_spend_cap,
                case_release_stale_holds,
                case_capture_less,
                case_capture_exactly,
                case_capture_zero,
                case_capture_above_the_hold,
                case_concurrent_metered_holds,
                case_account_and_request_transactions,
                case_nonces,
                case_transactions_order,
                case_settlements,
                case_ping,
            );
            conformance_suite!(@pair_cases $factory;
                case_other_process_revocations_and_top_ups,
                case_other_process_transactions_page,
                case_other_process_dies_holding,
            );
        }
    };
}

fn open(path: &Path) -> SqliteLedger {
    SqliteLedger::open(path, SqliteOptions::default()).unwrap()
}

conformance_suite!(sqlite, async {
    let dir = tempfile::tempdir().unwrap();
    let ledger: Arc<dyn Ledger> = Arc::new(open(&dir.path().join("ledger.db")));
    let other: Arc<dyn Ledger> = Arc::new(open(&dir.path().join("ledger.db")));
    (ledger, other, dir)
});

conformance_suite!(sqlite_full_sync, async {
    let dir = tempfile::tempdir().unwrap();
    let opts = SqliteOptions { synchronous_full: true, ..Default::default() };
    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::open(&dir.path().join("ledger.db"), opts).unwrap());
    let other: Arc<dyn Ledger> = Arc::new(SqliteLedger::open(&dir.path().join("ledger.db"), opts).unwrap());
    (ledger, other, dir)
});

// === SQLite only ===

fn user_version(path: &Path) -> u32 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let l = open(&path);
    let k = l.create_key(Some("durable"), Micros(50_000)).await.unwrap();
    l.credit(&k.id, Micros(1_000), Some("topup-1")).await.unwrap();
    let hold = |request_id: &'static str| {
        let (l, req) = (&l, suite::req(&k.key, Micros(2_000), request_id));
        async move {
            match l.authorize(req).await.unwrap() {
                HoldOutcome::Held { hold, .. } => hold,
                other => panic!("{other:?}"),
            }
        }
    };
    let captured = hold("q1").await;
    assert!(l.capture(captured, Micros(2_000), None).await.unwrap());
    let open_hold = hold("q2").await;
    assert!(l.reserve_nonce("0xAB", "0x01", 4_000_000_000).await.unwrap());
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros(47_000));
    let rows = l.transactions(None, 100).await.unwrap();
    assert_eq!(rows[0].id, open_hold.0);
    assert_eq!(rows[0].status.as_deref(), Some("pending"));
    drop(l);
    assert_eq!(user_version(&path), SCHEMA_VERSION);

    // The open hold lived in memory: it died with the process, and nothing is held.
    for _ in 0..3 {
        let l = open(&path);
        let keys = l.list_keys().await.unwrap();
        assert_eq!((keys.len(), keys[0].balance), (1, Micros(49_000)));
        assert_eq!(l.transactions(None, 100).await.unwrap(), rows[1..]);
    }
    assert_eq!(user_version(&path), SCHEMA_VERSION, "reopening migrates nothing");

    let l = open(&path);
    // A hold of the process before cannot be captured: nothing is charged.
    assert!(!l.capture(open_hold, Micros(2_000), None).await.unwrap());
    l.release(open_hold).await.unwrap();
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros(49_000));
    assert!(!l.credit(&k.id, Micros(1_000), Some("topup-1")).await.unwrap().applied, "idempotent across restarts");
    assert!(!l.reserve_nonce("0xab", "0x01", 4_000_000_000).await.unwrap(), "replay across restarts");
    assert_eq!(l.release_stale_holds(Duration::ZERO).await.unwrap(), 0);
    // New rows are numbered after everything written before the restart.
    let again = l.credit(&k.id, Micros(1_000), None).await.unwrap();
    assert_eq!(again.balance, Micros(50_000));
    let newest = l.transactions(None, 1).await.unwrap();
    assert!(newest[0].id > rows[0].id && newest[0].kind == TxKind::Credit);
    drop(l);

    // A database written by a version that kept holds as `pending` rows: the first
    // start releases them.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "UPDATE keys SET balance = balance - 3000 WHERE id = '{id}';
         INSERT INTO transactions (key_id, kind, amount, route, request_id, status, created_at)
         VALUES ('{id}', 'debit', 3000, '/r', 'old', 'pending', 0);",
        id = k.id
    ))
    .unwrap();
    drop(conn);
    let l = open(&path);
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros(47_000));
    assert_eq!(l.release_stale_holds(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros(50_000));
    let rows = l.transactions(Some(&k.id), 100).await.unwrap();
    assert_eq!((rows[0].kind, rows[0].request_id.as_deref()), (TxKind::Refund, Some("old")));
    // Listed by time: the old row was stamped 0, so it is the oldest.
    let old = rows.last().unwrap();
    assert_eq!((old.kind, old.status.as_deref(), old.created_at), (TxKind::Debit, Some("released"), 0));
}

/// More holds than one block of reserved ids, with no other write to wake the writer:
/// a hold that finds no id left has the writer reserve more, and every hold gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_holds_outlast_a_block_of_ids() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(&dir.path().join("ledger.db"));
    let k = l.create_key(None, Micros(1_000_000_000)).await.unwrap();
    let n = 2 * tollgate::ledger::holds::ID_BLOCK as usize + 10;
    let mut ids = std::collections::HashSet::new();
    for i in 0..n {
        let request_id = format!("many-{i}");
        let req = suite::req(&k.key, Micros(1), &request_id);
        let HoldOutcome::Held { hold, balance, .. } = l.authorize(req).await.unwrap() else { panic!("hold {i}") };
        assert_eq!(balance, Micros(1_000_000_000 - i as u64 - 1));
        assert!(ids.insert(hold.0), "hold id {} given twice", hold.0);
    }
    assert_eq!(l.transactions(Some(&k.id), usize::MAX).await.unwrap().len(), n + 1);
}

/// A capture the database refuses (here the balance was lowered behind the gateway's
/// back, by hand) is an error, charges nothing, and does not leave its amount held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failed_capture_frees_its_hold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let l = open(&path);
    let k = l.create_key(None, Micros(3_000)).await.unwrap();
    let HoldOutcome::Held { hold, .. } = l.authorize(suite::req(&k.key, Micros(2_000), "a")).await.unwrap() else {
        panic!()
    };
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("UPDATE keys SET balance = 1000 WHERE id = ?1", [&k.id]).unwrap();
    drop(conn);

    assert!(matches!(l.capture(hold, Micros(2_000), None).await, Err(LedgerError::Other(_))));
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros(1_000), "nothing charged, nothing held");
    let again = l.authorize(suite::req(&k.key, Micros(1_000), "b")).await.unwrap();
    assert!(matches!(again, HoldOutcome::Held { balance: Micros::ZERO, .. }), "{again:?}");
    let rows = l.transactions(Some(&k.id), 10).await.unwrap();
    assert!(rows.iter().all(|t| t.status.as_deref() != Some("captured")));
}

/// Hold ids run out while another process keeps a write transaction open on the file
/// (an `sqlite3` shell left in `BEGIN IMMEDIATE`), so the writer cannot reserve more:
/// holds fail closed with a message that says why, hold nothing, and work again once
/// the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_out_of_ids_under_a_foreign_lock_fails_closed_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let opts = SqliteOptions { busy_timeout: Duration::from_millis(50), ..SqliteOptions::default() };
    let l = SqliteLedger::open(&path, opts).unwrap();
    let k = l.create_key(None, Micros(1_000_000)).await.unwrap();
    // The key is cached by its first hold; later holds need no database round trip.
    assert!(matches!(l.authorize(suite::req(&k.key, Micros(1), "first")).await, Ok(HoldOutcome::Held { .. })));
    let foreign = rusqlite::Connection::open(&path).unwrap();
    foreign.execute_batch("BEGIN IMMEDIATE").unwrap();

    let mut held = 1u64;
    let refusal = loop {
        assert!(held < 10_000, "ids never ran out");
        match l.authorize(suite::req(&k.key, Micros(1), "id")).await {
            Ok(HoldOutcome::Held { .. }) => held += 1,
            Err(LedgerError::Unavailable(m)) => break m,
            other => panic!("{other:?}"),
        }
    };
    assert!(held >= 3_000, "the first block of ids was used: {held}");
    assert!(refusal.contains("another process holding a write transaction"), "{refusal}");
    // The refused request holds nothing: the balance shown is net of the open holds.
    assert_eq!(l.key(&k.id).await.unwrap().unwrap().balance, Micros(1_000_000 - held));

    foreign.execute_batch("ROLLBACK").unwrap();
    assert!(matches!(l.authorize(suite::req(&k.key, Micros(1), "after")).await, Ok(HoldOutcome::Held { .. })));
}

/// `tollgate keys credit` / `revoke` run as another process while the gateway serves:
/// the gateway's cached balances follow at once (the very next hold sees them), and
/// rows the other process writes never take an id the gateway handed to an open hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_follows_changes_made_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let gateway = open(&path);
    let k = gateway.create_key(None, Micros(3_000)).await.unwrap();
    let req = |request_id| suite::req(&k.key, Micros(2_000), request_id);
    let HoldOutcome::Held { hold: first, .. } = gateway.authorize(req("a")).await.unwrap() else { panic!() };
    assert!(matches!(gateway.authorize(req("b")).await.unwrap(), HoldOutcome::Insufficient { .. }));

    // The "CLI": its own connections, its own process as far as SQLite can tell.
    let cli = open(&path);
    cli.credit(&k.id, Micros(10_000), Some("topup")).await.unwrap();
    let HoldOutcome::Held { hold: second, balance, .. } = gateway.authorize(req("b")).await.unwrap() else {
        panic!("the credit was not seen by the next hold")
    };
    assert_eq!(balance, Micros(9_000));
    // Both open holds capture under the ids they were given, after the CLI's row.
    assert!(gateway.capture(first, Micros(2_000), None).await.unwrap());
    assert!(gateway.capture(second, Micros(2_000), None).await.unwrap());
    let rows = gateway.transactions(Some(&k.id), 10).await.unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().filter(|t| t.kind == TxKind::Debit).all(|t| t.status.as_deref() == Some("captured")));
    assert_eq!(cli.key(&k.id).await.unwrap().unwrap().balance, Micros(9_000));

    assert!(cli.revoke(&k.id).await.unwrap());
    assert_eq!(gateway.authorize(req("c")).await.unwrap(), HoldOutcome::Revoked { key_id: k.id.clone() });

    // The same through a plain SQLite connection (a `sqlite3` shell, an older tollgate):
    // the gateway watches the file, not the tollgate code that wrote it.
    let k2 = gateway.create_key(None, Micros(1_000)).await.unwrap();
    let req2 = |request_id| suite::req(&k2.key, Micros(1_000), request_id);
    let HoldOutcome::Held { hold, .. } = gateway.authorize(req2("d")).await.unwrap() else { panic!() };
    gateway.release(hold).await.unwrap();
    let shell = rusqlite::Connection::open(&path).unwrap();
    shell.execute("UPDATE keys SET revoked = 1 WHERE id = ?1", [&k2.id]).unwrap();
    assert_eq!(gateway.authorize(req2("e")).await.unwrap(), HoldOutcome::Revoked { key_id: k2.id.clone() });
    let rows = gateway.transactions(Some(&k.id), 100).await.unwrap();
    let sum = |kind| rows.iter().filter(|t| t.kind == kind).map(|t| t.amount.get()).sum::<u64>();
    assert_eq!(sum(TxKind::Credit) - sum(TxKind::Debit) + sum(TxKind::Refund), 9_000);
}

/// The gateway numbers its rows from a block of ids it reserved before the CLI wrote
/// anything, so a gateway row written after a CLI row has the lower id: listings go by
/// time, so it still comes first, and `limit` keeps the newest rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lists_by_time_not_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let gateway = open(&path);
    let k = gateway.create_key(None, Micros(10_000)).await.unwrap();
    // Opened after the gateway reserved its block: the CLI's ids come after it.
    let cli = open(&path);
    cli.credit(&k.id, Micros(5), Some("cli-topup")).await.unwrap();
    let cli_row = cli.transactions(None, 1).await.unwrap().remove(0);
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    while unix_now() <= cli_row.created_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let HoldOutcome::Held { hold, .. } = gateway.authorize(suite::req(&k.key, Micros(100), "later")).await.unwrap()
    else {
        panic!()
    };
    assert!(gateway.capture(hold, Micros(100), None).await.unwrap());
    assert!(hold.0 < cli_row.id, "the premise: the later row has the lower id ({} < {})", hold.0, cli_row.id);

    for l in [&gateway, &cli] {
        let newest = l.transactions(None, 1).await.unwrap();
        assert_eq!((newest[0].id, newest[0].request_id.as_deref()), (hold.0, Some("later")));
        let rows = l.transactions(Some(&k.id), 10).await.unwrap();
        assert_eq!(rows.iter().map(|t| t.id).collect::<Vec<_>>()[..2], [hold.0, cli_row.id]);
    }
}

#[test]
fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    drop(open(&path));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    drop(conn);
    let err = SqliteLedger::open(&path, SqliteOptions::default()).unwrap_err();
    assert!(err.to_string().contains("newer than this tollgate"), "{err}");
}

#[test]
fn sqlite_open_in_a_missing_directory_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteLedger::open(&dir.path().join("nope/ledger.db"), SqliteOptions::default()).unwrap_err();
    assert!(matches!(err, LedgerError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("does its directory exist"), "{err}");
}

const CRASH_ENV: &str = "TOLLGATE_TEST_CRASH_DB";

/// The child half of `sqlite_survives_kill_9`: a no-op unless that test started it.
#[test]
fn sqlite_crash_child() {
    let Ok(path) = std::env::var(CRASH_ENV) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let l = open(Path::new(&path));
        let k = l.create_key(Some("crash"), Micros(1_000_000)).await.unwrap();
        for i in 0..10 {
            let request_id = format!("crash-{i}");
            let req = suite::req(&k.key, Micros(1_000), &request_id);
            let HoldOutcome::Held { hold, .. } = l.authorize(req).await.unwrap() else { panic!() };
            match i {
                0..=5 => assert!(l.capture(hold, Micros(1_000), None).await.unwrap()),
                6 | 7 => l.release(hold).await.unwrap(),
                _ => {} // left open: the crash interrupts these requests
            }
        }
        l.credit(&k.id, Micros(500), Some("topup-1")).await.unwrap();
        assert!(l.reserve_nonce("0xAB", "0x01", 4_000_000_000).await.unwrap());
        // Everything above was acknowledged, hence committed.
        println!("\nCRASH-READY {}", k.id);
        std::future::pending::<()>().await;
    });
}

#[test]
fn sqlite_survives_kill_9() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    if std::env::var_os(CRASH_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["ledger_conformance::sqlite_crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut key_id = None;
    for line in stdout.lines() {
        if let Some(id) = line.unwrap().split("CRASH-READY ").nth(1) {
            key_id = Some(id.trim().to_owned());
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let key_id = key_id.expect("the child reported its writes");
    tokio::runtime::Runtime::new().unwrap().block_on(check_after_crash(&path, &key_id));
}

async fn check_after_crash(path: &Path, key_id: &str) {
    let l = open(path);
    // Six captures count; the two holds the dead process left open held nothing
    // durable, so nothing is held now.
    assert_eq!(l.key(key_id).await.unwrap().unwrap().balance, Micros(1_000_000 - 6_000 + 500));
    let rows = l.transactions(Some(key_id), 100).await.unwrap();
    let count = |kind| rows.iter().filter(|t| t.kind == kind).count();
    assert_eq!((count(TxKind::Credit), count(TxKind::Debit), count(TxKind::Refund)), (2, 8, 2));
    assert!(rows.iter().all(|t| t.status.as_deref() != Some("pending")));
    assert!(!l.credit(key_id, Micros(500), Some("topup-1")).await.unwrap().applied);
    assert!(!l.reserve_nonce("0xab", "0x01", 4_000_000_000).await.unwrap());
    assert_eq!(l.release_stale_holds(Duration::ZERO).await.unwrap(), 0);
    let sum = |kind| rows.iter().filter(|t| t.kind == kind).map(|t| t.amount.get()).sum::<u64>();
    assert_eq!(sum(TxKind::Credit) - sum(TxKind::Debit) + sum(TxKind::Refund), 1_000_000 - 6_000 + 500);
}

// === PostgreSQL ===

use crate::support::pg;

// A throwaway cluster per test (about a second to `initdb` and start), a database in
// it, and the ledger on that database. The cluster is the guard: dropping it stops the
// server and removes its files.
conformance_suite!(postgres, async {
    use tollgate::ledger::postgres::{PostgresLedger, PostgresOptions};
    let cluster = pg::Cluster::spawn().await;
    let url = cluster.create_db().await;
    // Leases renewed often, so a case never waits long for one.
    let opts = PostgresOptions {
        pool_size: 8,
        statement_timeout: Duration::from_secs(10),
        hold_heartbeat: Duration::from_millis(200),
    };
    let ledger: Arc<dyn Ledger> = Arc::new(PostgresLedger::connect(&url, opts).await.unwrap());
    let other: Arc<dyn Ledger> = Arc::new(PostgresLedger::connect(&url, opts).await.unwrap());
    (ledger, other, cluster)
});
