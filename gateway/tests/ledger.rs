//! The embedded ledgers (both engines run the same suite; the SQLite one also its
//! migrations and log): durability across reopen, unique tokens and keys, group commit in which
//! one refused write does not undo the others, accumulators.

use std::sync::Arc;

use cardgate::ledger::lsm::LsmLedger;
use cardgate::ledger::postgres::{PgLedger, ScratchDatabase};
use cardgate::ledger::sqlite::SqliteLedger;
use cardgate::ledger::{AccumulatorDelta, Amounts, Intent, Ledger, LedgerError, ListQuery, Outcome, State};
use cardgate_sdk::YearToDate;

/// The ledgers behind the `Ledger` trait: one suite for all three.
#[derive(Debug, Clone, Copy)]
enum Engine {
    Sqlite,
    Lsm,
    /// The cluster's: on the server `CARDGATE_TEST_POSTGRES` names, a database per test.
    Postgres,
}

/// Where a test's ledger lives: a directory, and for PostgreSQL a database of its own.
struct Place {
    dir: tempfile::TempDir,
    database: Option<ScratchDatabase>,
}

impl Place {
    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// The cluster ledger's configuration for a test's database, its leases `lease_secs` long.
fn postgres(database: &ScratchDatabase, lease_secs: i64) -> cardgate::config::PostgresConfig {
    toml::from_str(&format!("url = {:?}\nlease_secs = {lease_secs}", database.url)).expect("postgres config")
}

/// The PostgreSQL server the cluster ledger's tests use, if one is named.
fn postgres_server() -> Option<String> {
    std::env::var("CARDGATE_TEST_POSTGRES").ok().filter(|url| !url.is_empty())
}

impl Engine {
    fn place(self) -> Place {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = match self {
            Self::Postgres => {
                let server = postgres_server().expect("CARDGATE_TEST_POSTGRES");
                Some(ScratchDatabase::create(&server).expect("a database of the test's own"))
            }
            _ => None,
        };
        Place { dir, database }
    }

    fn open(self, place: &Place) -> Arc<dyn Ledger> {
        match self {
            Self::Sqlite => Arc::new(SqliteLedger::open(&place.path().join("ledger.db")).expect("open")),
            // Three shards: what one shard cannot see alone is exercised.
            Self::Lsm => Arc::new(LsmLedger::open(&place.path().join("ledger"), 3).expect("open")),
            Self::Postgres => {
                let database = place.database.as_ref().expect("a database");
                Arc::new(PgLedger::open(&postgres(database, 30)).expect("open"))
            }
        }
    }
}

macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::Sqlite).await;
            })*
        }
        mod lsm {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::Lsm).await;
            })*
        }
        /// Run when `CARDGATE_TEST_POSTGRES` names a server (`.ci/run` sets it); skipped,
        /// saying so, when not.
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if super::postgres_server().is_none() {
                    eprintln!("SKIPPED (set CARDGATE_TEST_POSTGRES=postgres://user@host/db to run): postgres::{}", stringify!($name));
                    return;
                }
                super::$name(super::Engine::Postgres).await;
            })*
        }
    };
}

on_every_engine!(
    settlement_survives_reopening_and_its_token_stays_used,
    a_refused_write_in_a_batch_does_not_undo_the_others,
    a_failed_settlement_releases_its_token,
    reversal_undoes_the_accumulators_once,
    unresolved_settlements_are_listed_and_an_unknown_one_can_complete_once,
    a_reversal_counts_on_the_day_it_is_made_and_a_closed_day_never_changes,
    a_day_is_read_in_pages_each_event_once_in_time_order,
    an_outcome_computed_on_figures_that_moved_since_is_not_recorded,
    a_settlement_recorded_in_one_commit_is_refused_whole,
    an_idempotency_key_is_unique_whatever_the_card,
    a_listing_pages_through_every_card_once_in_time_order,
    a_day_has_totals_per_insurance_and_clearing_type_and_closes_once,
    an_encounter_spends_its_token_once_and_changes_only_over_the_version_it_read,
);

fn stored_encounter(id: &str, key: &str, token: &[u8]) -> cardgate::ledger::StoredEncounter {
    cardgate::ledger::StoredEncounter {
        id: id.into(),
        institution: "H1".into(),
        idempotency_key: key.into(),
        request_hash: vec![4, 5, 6],
        token_id: Some(token.to_vec()),
        card_hash: vec![9; 32],
        created_at: 1_700_000_000,
        version: 1,
        sealed: vec![1; 100],
    }
}

async fn an_encounter_spends_its_token_once_and_changes_only_over_the_version_it_read(engine: Engine) {
    let dir = engine.place();
    {
        let ledger = engine.open(&dir);
        ledger.open_encounter(stored_encounter("E1", "reg-1", b"tok-e1")).await.expect("open");
        // Its token settles nothing else, and a settlement's token opens no encounter.
        assert_eq!(ledger.begin(intent("S1", "k1", b"tok-e1")).await, Err(LedgerError::TokenUsed));
        ledger.begin(intent("S2", "k2", b"tok-s2")).await.expect("begin");
        let reused = stored_encounter("E2", "reg-2", b"tok-s2");
        assert_eq!(ledger.open_encounter(reused).await, Err(LedgerError::TokenUsed));
        let again = stored_encounter("E3", "reg-1", b"tok-e3");
        assert_eq!(ledger.open_encounter(again).await, Err(LedgerError::IdempotencyTaken));
        // A registration key and a settlement key are apart: the same text may be both.
        ledger.open_encounter(stored_encounter("E4", "k2", b"tok-e4")).await.expect("keys apart");
        // Changed over version 1 once; a second change made from version 1 is refused.
        let changed = cardgate::ledger::StoredEncounter {
            version: 2,
            sealed: vec![2; 100],
            ..stored_encounter("E1", "reg-1", b"tok-e1")
        };
        ledger.update_encounter(changed.clone()).await.expect("update");
        assert_eq!(ledger.update_encounter(changed).await, Err(LedgerError::Stale));
    }
    let ledger = engine.open(&dir);
    let e1 = ledger.encounter("H1", "E1").await.expect("read").expect("kept");
    assert_eq!((e1.version, e1.sealed[0], e1.token_id.as_deref()), (2, 2, Some(&b"tok-e1"[..])));
    assert_eq!(ledger.encounter("H2", "E1").await.expect("read"), None, "another institution's");
    assert_eq!(ledger.encounter_by_key("H1", "reg-1").await.expect("read").map(|e| e.id), Some("E1".into()));
    assert_eq!(ledger.encounter_by_key("H1", "k2").await.expect("read").map(|e| e.id), Some("E4".into()));
    assert_eq!(ledger.encounter_by_key("H1", "reg-9").await.expect("read"), None);
    assert_eq!(ledger.by_idempotency_key("H1", "reg-1").await.expect("read"), None, "not a settlement's key");
}

fn intent(id: &str, key: &str, token: &[u8]) -> Intent {
    Intent {
        id: id.into(),
        institution: "H1".into(),
        terminal: "T1".into(),
        idempotency_key: key.into(),
        request_hash: vec![1, 2, 3],
        token_id: Some(token.to_vec()),
        quote_id: None,
        card_hash: vec![9; 32],
        card_masked: "****34".into(),
        total_fen: 1000,
        created_at: 1_700_000_000,
        sealed_request: vec![0; 40],
        insurance_type: "310".into(),
        clearing_type: "41".into(),
        delegated: false,
    }
}

fn settled(id: &str, fund: i64) -> Outcome {
    Outcome {
        id: id.into(),
        state: State::Settled,
        status: 201,
        body: format!("{{\"settlement_id\":\"{id}\"}}"),
        deltas: vec![AccumulatorDelta {
            payer: "basic-medical".into(),
            delta: YearToDate { year: 2026, fund_paid_fen: fund, deductible_fen: 100, ..YearToDate::default() },
        }],
        card_hash: vec![9; 32],
        read: Vec::new(),
        at: 1_700_000_001,
        amounts: Some(Amounts {
            fund_fen: fund,
            account_fen: 0,
            cash_fen: 1000 - fund,
            payers: vec![("basic-medical".into(), fund, 0)],
        }),
    }
}

async fn settlement_survives_reopening_and_its_token_stays_used(engine: Engine) {
    let dir = engine.place();
    {
        let ledger = engine.open(&dir);
        ledger.begin(intent("S1", "k1", b"tok-1")).await.expect("begin");
        ledger.finish(settled("S1", 700)).await.expect("finish");
    }
    let ledger = engine.open(&dir);
    let record = ledger.get("H1", "S1").await.expect("read").expect("present");
    assert_eq!((record.state, record.status), (State::Settled, 201));
    assert_eq!(ledger.by_idempotency_key("H1", "k1").await.expect("read").map(|r| r.id), Some("S1".into()));
    assert_eq!(ledger.begin(intent("S2", "k2", b"tok-1")).await, Err(LedgerError::TokenUsed));
    assert_eq!(ledger.begin(intent("S3", "k1", b"tok-3")).await, Err(LedgerError::IdempotencyTaken));
    let ytd = ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read");
    assert_eq!((ytd.fund_paid_fen, ytd.deductible_fen), (700, 100));
    assert_eq!(ledger.accumulators(&[9; 32], "basic-medical", 2025).await.expect("read").fund_paid_fen, 0);
    assert!(ledger.get("H2", "S1").await.expect("read").is_none(), "other institutions do not see it");
}

async fn a_refused_write_in_a_batch_does_not_undo_the_others(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    // 200 concurrent intents, two of which share a token: they land in the same batches.
    let mut tasks = Vec::new();
    for i in 0..200 {
        let ledger = Arc::clone(&ledger);
        let token = if i == 199 { b"tok-0".to_vec() } else { format!("tok-{i}").into_bytes() };
        tasks.push(tokio::spawn(async move { ledger.begin(intent(&format!("S{i}"), &format!("k{i}"), &token)).await }));
    }
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(()) => {}
            Err(LedgerError::TokenUsed) => refused += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, 1);
    let mut present = 0;
    for i in 0..200 {
        present += usize::from(ledger.get("H1", &format!("S{i}")).await.expect("read").is_some());
    }
    assert_eq!(present, 199);
}

async fn a_failed_settlement_releases_its_token(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    ledger.begin(intent("S1", "k1", b"tok")).await.expect("begin");
    let failed = Outcome { state: State::Failed, status: 422, deltas: vec![], amounts: None, ..settled("S1", 0) };
    ledger.finish(failed).await.expect("finish");
    assert_eq!(ledger.get("H1", "S1").await.expect("read").map(|r| r.state), Some(State::Failed));
    ledger.begin(intent("S2", "k2", b"tok")).await.expect("the token can settle another attempt");
    assert_eq!(ledger.finish(settled("S1", 1)).await, Err(LedgerError::NotFound), "an outcome is written once");
}

async fn reversal_undoes_the_accumulators_once(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    ledger.begin(intent("S1", "k1", b"tok")).await.expect("begin");
    ledger.finish(settled("S1", 700)).await.expect("finish");
    let (card_hash, deltas) = ledger.settled_deltas("S1").await.expect("read").expect("present");
    let undo: Vec<AccumulatorDelta> = deltas
        .into_iter()
        .map(|d| AccumulatorDelta {
            payer: d.payer,
            delta: YearToDate {
                fund_paid_fen: -d.delta.fund_paid_fen,
                deductible_fen: -d.delta.deductible_fen,
                ..d.delta
            },
        })
        .collect();
    ledger.reverse("S1".into(), "{}".into(), undo.clone(), card_hash.clone(), 1).await.expect("reverse");
    assert_eq!(ledger.reverse("S1".into(), "{}".into(), undo, card_hash, 2).await, Err(LedgerError::NotFound));
    let ytd = ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read");
    assert_eq!((ytd.fund_paid_fen, ytd.deductible_fen), (0, 0));
    assert_eq!(ledger.get("H1", "S1").await.expect("read").map(|r| r.state), Some(State::Reversed));
}

async fn unresolved_settlements_are_listed_and_an_unknown_one_can_complete_once(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    ledger.begin(intent("S1", "k1", b"t1")).await.expect("begin");
    ledger.begin(intent("S2", "k2", b"t2")).await.expect("begin");
    let unknown = Outcome { state: State::Unknown, status: 504, deltas: vec![], amounts: None, ..settled("S2", 0) };
    ledger.finish(unknown).await.expect("unknown");
    let ids: Vec<String> = ledger.unresolved().await.expect("read").into_iter().map(|u| u.id).collect();
    assert_eq!(ids, ["S1", "S2"]);
    ledger.finish(settled("S2", 300)).await.expect("completes");
    assert_eq!(ledger.finish(settled("S2", 300)).await, Err(LedgerError::NotFound), "only once");
    assert_eq!(ledger.unresolved().await.expect("read").len(), 1);
    let day = ledger.reconciliation("H1", &cardgate::ledger::business_day(1_700_000_000), 1, 10).await.expect("read");
    assert_eq!((day.settled.count, day.settled.fund_pay_fen), (1, 300));
}

#[tokio::test]
async fn a_version_2_ledger_is_migrated_with_every_state_and_sum_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger.db");
    {
        let old = rusqlite::Connection::open(&path).expect("create");
        old.execute_batch(include_str!("fixtures/ledger-v2.sql")).expect("version 2 ledger");
    }
    let ledger = SqliteLedger::open(&path).expect("migrated");
    let state = async |institution: &str, id: &str| {
        ledger.get(institution, id).await.expect("read").map(|r| (r.state, r.status))
    };
    assert_eq!(state("H1", "S1").await, Some((State::Settled, 201)));
    assert_eq!(state("H1", "S2").await, Some((State::Reversed, 201)));
    assert_eq!(state("H1", "S3").await, Some((State::Failed, 422)));
    assert_eq!(state("H1", "S4").await, Some((State::Pending, 0)));
    assert_eq!(state("H2", "S5").await, Some((State::Unknown, 504)));
    let s1 = ledger.by_idempotency_key("H1", "k1").await.expect("read").expect("S1");
    assert_eq!((s1.id.as_str(), s1.body.as_str()), ("S1", "{\"settlement_id\":\"S1\"}"));
    assert_eq!(
        ledger.get("H1", "S2").await.expect("read").expect("S2").reversal.as_deref(),
        Some("{\"state\":\"reversed\"}")
    );

    // Tokens, quotes and idempotency keys stay taken.
    assert_eq!(ledger.begin(intent("S9", "k9", &[0xaa, 0x01])).await, Err(LedgerError::TokenUsed));
    assert_eq!(ledger.begin(intent("S9", "k4", b"fresh")).await, Err(LedgerError::IdempotencyTaken));
    assert_eq!(ledger.quote("H2", "Q1").await.expect("read").expect("Q1").settled_by.as_deref(), Some("S5"));

    // The interrupted ones are still to resolve, and the day's sums are unchanged.
    let mut unresolved: Vec<_> =
        ledger.unresolved().await.expect("read").into_iter().map(|u| (u.id, u.state)).collect();
    unresolved.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(unresolved, vec![("S4".to_owned(), State::Pending), ("S5".to_owned(), State::Unknown)]);
    let day = ledger.reconciliation("H1", "2025-11-20", 1, 10).await.expect("read");
    assert_eq!((day.settled.count, day.settled.total_fen, day.settled.fund_pay_fen), (2, 30_000, 18_000));
    assert_eq!((day.reversed.count, day.net.total_fen, day.net.cash_pay_fen), (1, 10_000, 1_000));
    let payers: Vec<_> = day.payers.iter().map(|p| (p.payer.as_str(), p.count, p.fund_pay_fen)).collect();
    assert_eq!(payers, vec![("basic-medical", 2, 18_000), ("critical-illness", 1, 0)]);
    let events: Vec<_> = day.details.iter().map(|d| (d.event.as_str(), d.settlement_id.as_str())).collect();
    assert_eq!(events, vec![("settled", "S1"), ("settled", "S2"), ("reversed", "S2")]);
    let ytd = ledger.accumulators(&[0xc1], "basic-medical", 2025).await.expect("read");
    assert_eq!((ytd.fund_paid_fen, ytd.eligible_fen), (6000, 10_000));
    let (card, deltas) = ledger.settled_deltas("S1").await.expect("read").expect("S1");
    assert_eq!((card, deltas.len(), deltas[0].delta.fund_paid_fen), (vec![0xc1], 1, 6000));

    // And the pending one completes on the new schema.
    ledger.finish(settled("S4", 300)).await.expect("finish");
    assert_eq!(state("H1", "S4").await, Some((State::Settled, 201)));
    drop(ledger);
    SqliteLedger::open(&path).expect("a migrated ledger reopens as the current version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_over_under_back_to_back_commits() {
    use cardgate::ledger::sqlite::SqliteOptions;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger.db");
    // 1 MiB instead of 1 GiB, so a short run shows it; and the writer starts the
    // log over itself as soon as it passes them, without waiting for the checkpoint thread
    // (whose pace depends on how loaded the machine is): the bound holds however slow it is.
    let options = SqliteOptions { wal_restart_bytes: 1 << 20, hurry_at_most: std::time::Duration::ZERO };
    let ledger = Arc::new(SqliteLedger::open_with(&path, &options).expect("open"));
    let mut writers = Vec::new();
    for w in 0..32 {
        let ledger = Arc::clone(&ledger);
        writers.push(tokio::spawn(async move {
            for i in 0..100 {
                let (id, key) = (format!("S{w}-{i}"), format!("k{w}-{i}"));
                let mut settlement = intent(&id, &key, key.as_bytes());
                settlement.sealed_request = vec![7; 600];
                settlement.card_hash = format!("card-{w}-{i}").into_bytes();
                ledger.begin(settlement).await.expect("begin");
                let mut outcome = settled(&id, 500);
                outcome.body = "x".repeat(1500);
                outcome.card_hash = format!("card-{w}-{i}").into_bytes();
                ledger.finish(outcome).await.expect("finish");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    // 3,200 settlements write about 50 MiB of log; started over, the file stays a few MiB.
    let wal = std::fs::metadata(dir.path().join("ledger.db-wal")).expect("log").len();
    assert!(wal < 16 << 20, "the log grew to {} MiB", wal >> 20);
    assert_eq!(ledger.get("H1", "S31-99").await.expect("read").map(|r| r.state), Some(State::Settled));
}

async fn a_reversal_counts_on_the_day_it_is_made_and_a_closed_day_never_changes(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    ledger.begin(intent("S1", "k1", b"tok-1")).await.expect("begin");
    ledger.finish(settled("S1", 700)).await.expect("finish");
    let monday = cardgate::ledger::business_day(1_700_000_000);
    let before = ledger.reconciliation("H1", &monday, 1, 10).await.expect("read");
    assert_eq!((before.settled.count, before.reversed.count, before.net.fund_pay_fen), (1, 0, 700));

    // Reversed a day later.
    let undo = vec![AccumulatorDelta {
        payer: "basic-medical".into(),
        delta: YearToDate { year: 2026, fund_paid_fen: -700, deductible_fen: -100, ..YearToDate::default() },
    }];
    let tuesday_at = 1_700_000_000 + 86_400;
    ledger.reverse("S1".into(), "{}".into(), undo, vec![9; 32], tuesday_at).await.expect("reverse");
    let after = ledger.reconciliation("H1", &monday, 1, 10).await.expect("read");
    assert_eq!((after.settled, after.reversed, after.net), (before.settled, before.reversed, before.net));
    let tuesday = ledger.reconciliation("H1", &cardgate::ledger::business_day(tuesday_at), 1, 10).await.expect("read");
    assert_eq!((tuesday.settled.count, tuesday.reversed.count), (0, 1));
    assert_eq!((tuesday.reversed.fund_pay_fen, tuesday.net.fund_pay_fen), (700, -700));
    assert_eq!((tuesday.payers[0].reversed_count, tuesday.payers[0].reversed_fund_pay_fen), (1, 700));
    let events: Vec<_> = tuesday.details.iter().map(|d| (d.event.as_str(), d.state.as_str())).collect();
    assert_eq!(events, vec![("reversed", "reversed")]);
}

/// Pages of a day hold its events in time order (a settlement before its reversal at the same
/// moment, settlements of one moment in the order they were recorded), each once, whatever
/// shard each card's settlements are in; the totals are the whole day's on every page, and the
/// export's pages (the lines alone) are the same.
async fn a_day_is_read_in_pages_each_event_once_in_time_order(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    let at = 1_700_000_000;
    let card = |n: usize| format!("card-{n}").into_bytes();
    for (n, offset) in [0, 10, 20, 30, 40, 40].into_iter().enumerate() {
        let id = format!("S{n}");
        let key = format!("k{n}");
        let token = format!("tok-{n}");
        let begun = Intent { card_hash: card(n), created_at: at + offset, ..intent(&id, &key, token.as_bytes()) };
        ledger.begin(begun).await.expect("begin");
        let outcome = Outcome { card_hash: card(n), at: at + offset, ..settled(&id, 100 + n as i64) };
        ledger.finish(outcome).await.expect("finish");
    }
    // Still pending: not an event of the day.
    ledger
        .begin(Intent { card_hash: card(6), created_at: at + 15, ..intent("S6", "k6", b"tok-6") })
        .await
        .expect("begin");
    ledger.reverse("S1".into(), "{}".into(), vec![], card(1), at + 25).await.expect("reverse");
    ledger.reverse("S3".into(), "{}".into(), vec![], card(3), at + 30).await.expect("reverse");

    let day = cardgate::ledger::business_day(at);
    let mut lines = Vec::new();
    for page in 1..=4 {
        let read = ledger.reconciliation("H1", &day, page, 3).await.expect("read");
        assert_eq!((read.detail_count, read.settled.count, read.reversed.count), (8, 6, 2), "page {page}");
        assert_eq!((read.settled.fund_pay_fen, read.reversed.fund_pay_fen), (615, 204), "page {page}");
        assert_eq!(read.details.len(), [3, 3, 2, 0][page as usize - 1], "page {page}");
        // The export's pages: the same lines without the sums.
        assert_eq!(ledger.day_details("H1", &day, page, 3).await.expect("read"), read.details, "page {page}");
        lines.extend(read.details);
    }
    let events: Vec<_> =
        lines.iter().map(|d| (d.event.as_str(), d.settlement_id.as_str(), d.state.as_str(), d.fund_pay_fen)).collect();
    assert_eq!(
        events,
        vec![
            ("settled", "S0", "settled", 100),
            ("settled", "S1", "reversed", 101),
            ("settled", "S2", "settled", 102),
            ("reversed", "S1", "reversed", 101),
            ("settled", "S3", "reversed", 103),
            ("reversed", "S3", "reversed", 103),
            ("settled", "S4", "settled", 104),
            ("settled", "S5", "settled", 105),
        ]
    );
    let whole = ledger.reconciliation("H1", &day, 1, 100).await.expect("read").details;
    assert_eq!(whole, lines, "one page of the whole day");
}

#[tokio::test]
async fn a_version_3_ledger_gets_the_day_of_each_reversal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger.db");
    {
        let ledger = SqliteLedger::open(&path).expect("open");
        ledger.begin(intent("S1", "k1", b"tok-1")).await.expect("begin");
        ledger.finish(settled("S1", 700)).await.expect("finish");
        ledger.reverse("S1".into(), "{}".into(), vec![], vec![9; 32], 1_700_000_000 + 86_400).await.expect("reverse");
    }
    {
        // As version 3 left it: no reversal days.
        let old = rusqlite::Connection::open(&path).expect("open");
        old.execute_batch(&format!(
            "{AS_VERSION_4} DROP INDEX outcomes_by_reversed_day; ALTER TABLE outcomes DROP COLUMN reversed_day; \
                      PRAGMA user_version = 3;"
        ))
        .expect("version 3");
    }
    let ledger = SqliteLedger::open(&path).expect("migrated");
    let tuesday = cardgate::ledger::business_day(1_700_000_000 + 86_400);
    assert_eq!(ledger.reconciliation("H1", &tuesday, 1, 10).await.expect("read").reversed.count, 1);
    let version: i64 = rusqlite::Connection::open(&path)
        .and_then(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
        .expect("version");
    assert_eq!(version, 7);
}

/// What version 5 added, taken away: a ledger as version 4 left it.
const AS_VERSION_4: &str = "ALTER TABLE settlements DROP COLUMN insurance_type; \
    ALTER TABLE settlements DROP COLUMN clearing_type; ALTER TABLE settlements DROP COLUMN delegated; \
    DROP TABLE closed_days; DROP TABLE encounters; \
    ALTER TABLE accumulators DROP COLUMN outpatient_fund_paid_fen; PRAGMA user_version = 4;";

#[tokio::test]
async fn a_version_4_ledger_gets_types_and_closed_days() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger.db");
    {
        let ledger = SqliteLedger::open(&path).expect("open");
        ledger.begin(intent("S1", "k1", b"tok-1")).await.expect("begin");
        ledger.finish(settled("S1", 700)).await.expect("finish");
    }
    rusqlite::Connection::open(&path).expect("open").execute_batch(AS_VERSION_4).expect("version 4");
    let ledger = SqliteLedger::open(&path).expect("migrated");
    let monday = cardgate::ledger::business_day(1_700_000_000);
    let day = ledger.reconciliation("H1", &monday, 1, 10).await.expect("read");
    let types: Vec<_> =
        day.by_type.iter().map(|t| (t.insurance_type.as_str(), t.clearing_type.as_str(), t.settled.count)).collect();
    assert_eq!(types, [("", "", 1)], "recorded before the types were kept");
    assert_eq!(day.details[0].insurance_type, "");
    let closed = cardgate::ledger::ClosedDay { closed_at: 1_700_100_000, totals: "{}".into() };
    assert_eq!(ledger.close_day("H1", &monday, closed.clone()).await.expect("close"), closed);
    ledger.begin(intent("S2", "k2", b"tok-2")).await.expect("new settlements keep their types");
    ledger.finish(settled("S2", 600)).await.expect("finish");
    let day = ledger.reconciliation("H1", &monday, 1, 10).await.expect("read");
    assert_eq!(day.by_type.iter().map(|t| t.insurance_type.as_str()).collect::<Vec<_>>(), ["", "310"]);
}

async fn a_day_has_totals_per_insurance_and_clearing_type_and_closes_once(engine: Engine) {
    let dir = engine.place();
    let monday = cardgate::ledger::business_day(1_700_000_000);
    {
        let ledger = engine.open(&dir);
        // Two employees (310) at the till, one resident (390) at the clinic (11).
        ledger.begin(intent("S1", "k1", b"tok-1")).await.expect("begin");
        ledger.finish(settled("S1", 700)).await.expect("finish");
        ledger.begin(intent("S2", "k2", b"tok-2")).await.expect("begin");
        ledger.finish(settled("S2", 600)).await.expect("finish");
        let resident =
            Intent { insurance_type: "390".into(), clearing_type: "11".into(), ..intent("S3", "k3", b"tok-3") };
        ledger.begin(resident).await.expect("begin");
        ledger.finish(settled("S3", 300)).await.expect("finish");
        // A family member's bill on an employee's card: the holder's account pays (mutual aid).
        let family = Intent { delegated: true, ..intent("S4", "k4", b"tok-4") };
        ledger.begin(family).await.expect("begin");
        let mut aid = settled("S4", 0);
        aid.deltas.clear();
        aid.amounts = Some(Amounts { fund_fen: 0, account_fen: 500, cash_fen: 500, payers: vec![] });
        ledger.finish(aid).await.expect("finish");
        ledger.reverse("S2".into(), "{}".into(), vec![], vec![9; 32], 1_700_000_100).await.expect("reverse");
        let day = ledger.reconciliation("H1", &monday, 1, 10).await.expect("read");
        let lines: Vec<_> = day
            .by_type
            .iter()
            .map(|t| {
                let (i, c) = (t.insurance_type.as_str(), t.clearing_type.as_str());
                let aid = t.net.mutual_aid_pay_fen;
                (i, c, t.settled.count, t.settled.fund_pay_fen, t.reversed.fund_pay_fen, t.net.cash_pay_fen, aid)
            })
            .collect();
        assert_eq!(lines, [("310", "41", 3, 1300, 600, 800, 500), ("390", "11", 1, 300, 0, 700, 0)]);
        assert_eq!((day.settled.count, day.settled.fund_pay_fen, day.net.fund_pay_fen), (4, 1600, 1000));
        assert_eq!(
            (day.settled.account_pay_fen, day.settled.mutual_aid_pay_fen, day.reversed.mutual_aid_pay_fen),
            (500, 500, 0)
        );
        let kinds: Vec<_> = day.details.iter().map(|d| (d.event.as_str(), d.insurance_type.as_str())).collect();
        assert_eq!(
            kinds,
            [("settled", "310"), ("settled", "310"), ("settled", "390"), ("settled", "310"), ("reversed", "310")]
        );
        assert_eq!(day.closed_at, None);
        assert_eq!(ledger.closed_day("H1", &monday).await.expect("read"), None);

        // Closed once: a second closing (another node, a retry) gets the first.
        let totals = serde_json::to_string(&day.day_totals()).expect("json");
        let first = cardgate::ledger::ClosedDay { closed_at: 1_700_100_000, totals };
        let kept = ledger.close_day("H1", &monday, first.clone()).await.expect("close");
        assert_eq!(kept, first);
        let other = cardgate::ledger::ClosedDay { closed_at: 1_700_200_000, totals: "{}".into() };
        assert_eq!(ledger.close_day("H1", &monday, other).await.expect("close again"), first);
        // Another institution's day is its own.
        assert_eq!(ledger.closed_day("H2", &monday).await.expect("read"), None);
    }
    let ledger = engine.open(&dir);
    let closed = ledger.closed_day("H1", &monday).await.expect("read").expect("kept across reopening");
    assert_eq!(closed.closed_at, 1_700_100_000);
    let day = ledger.reconciliation("H1", &monday, 1, 10).await.expect("read").closed(&closed).expect("totals");
    assert_eq!((day.settled.count, day.net.fund_pay_fen, day.by_type.len()), (4, 1000, 2));
    assert_eq!(day.closed_at.as_deref(), Some(cardgate::ledger::rfc3339(1_700_100_000).as_str()));
}

async fn an_outcome_computed_on_figures_that_moved_since_is_not_recorded(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    ledger.begin(intent("S1", "k1", b"tok-1")).await.expect("begin");
    ledger.begin(intent("S2", "k2", b"tok-2")).await.expect("begin");
    // Both were computed on the card's empty figures (as two nodes, or a node and a restart,
    // could): the first commits, the second finds the figures moved.
    let zero = vec![AccumulatorDelta {
        payer: "basic-medical".into(),
        delta: YearToDate { year: 2026, ..YearToDate::default() },
    }];
    ledger.finish(Outcome { read: zero.clone(), ..settled("S1", 700) }).await.expect("first");
    assert_eq!(ledger.finish(Outcome { read: zero, ..settled("S2", 700) }).await, Err(LedgerError::Stale));
    assert_eq!(ledger.get("H1", "S2").await.expect("read").map(|r| r.state), Some(State::Pending), "nothing recorded");
    let ytd = ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read");
    assert_eq!(ytd.fund_paid_fen, 700, "counted once");
    // Asked again on the figures as they are now, it commits.
    let now = vec![AccumulatorDelta { payer: "basic-medical".into(), delta: ytd }];
    ledger.finish(Outcome { read: now, ..settled("S2", 700) }).await.expect("second, on fresh figures");
    assert_eq!(ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read").fund_paid_fen, 1400);
}

async fn a_settlement_recorded_in_one_commit_is_refused_whole(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    ledger.record(intent("S1", "k1", b"tok-1"), settled("S1", 700)).await.expect("one commit");
    assert_eq!(ledger.get("H1", "S1").await.expect("read").map(|r| (r.state, r.status)), Some((State::Settled, 201)));
    // The same token, or the same key: refused, and nothing of it stays.
    let token_again = ledger.record(intent("S2", "k2", b"tok-1"), settled("S2", 700)).await;
    assert_eq!(token_again, Err(LedgerError::TokenUsed));
    let key_again = ledger.record(intent("S3", "k1", b"tok-3"), settled("S3", 700)).await;
    assert_eq!(key_again, Err(LedgerError::IdempotencyTaken));
    assert!(
        ledger.get("H1", "S2").await.expect("read").is_none() && ledger.get("H1", "S3").await.expect("read").is_none()
    );
    let ytd = ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read");
    assert_eq!(ytd.fund_paid_fen, 700, "counted once");
    assert!(ledger.unresolved().await.expect("read").is_empty(), "nothing left pending");
    // A refusal recorded in one commit gives its token back, and its outcome is final.
    let failed = Outcome { state: State::Failed, status: 422, deltas: vec![], amounts: None, ..settled("S4", 0) };
    ledger.record(intent("S4", "k4", b"tok-4"), failed).await.expect("one commit");
    assert_eq!(ledger.get("H1", "S4").await.expect("read").map(|r| (r.state, r.status)), Some((State::Failed, 422)));
    ledger.record(intent("S5", "k5", b"tok-4"), settled("S5", 100)).await.expect("the token settles another attempt");
    assert_eq!(ledger.finish(settled("S4", 1)).await, Err(LedgerError::NotFound), "an outcome is written once");
    assert!(ledger.unresolved().await.expect("read").is_empty(), "nothing left pending");
    // A refusal carrying a token already spent is a replay, not a refusal of its own: refused
    // as such in every engine, and nothing of it is recorded (a retry with its key is new).
    let failed = Outcome { state: State::Failed, status: 422, deltas: vec![], amounts: None, ..settled("S6", 0) };
    assert_eq!(ledger.record(intent("S6", "k6", b"tok-1"), failed).await, Err(LedgerError::TokenUsed));
    assert!(ledger.get("H1", "S6").await.expect("read").is_none());
    assert!(ledger.by_idempotency_key("H1", "k6").await.expect("read").is_none());
    let quoted = |id: &str, key: &str| Intent { token_id: None, quote_id: Some("Q1".into()), ..intent(id, key, b"") };
    ledger.record(quoted("S7", "k7"), settled("S7", 100)).await.expect("the quote settles once");
    let failed = Outcome { state: State::Failed, status: 422, deltas: vec![], amounts: None, ..settled("S8", 0) };
    assert_eq!(ledger.record(quoted("S8", "k8"), failed).await, Err(LedgerError::QuoteUsed));
    assert!(ledger.get("H1", "S8").await.expect("read").is_none());
    let ytd = ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read");
    assert_eq!(ytd.fund_paid_fen, 900, "S1, S5 and S7, each once");
}

/// The lsm engine moves a settlement (over 1 KiB) to a blob file when its memtable is
/// flushed: read back from there it is whole, its token and key stay taken, and a reversal
/// rewrites it.
#[tokio::test]
async fn an_lsm_settlement_read_back_from_a_blob_file_is_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger");
    let sealed: Vec<u8> = (0..4096u32).map(|n| (n % 251) as u8).collect();
    let with_sealed =
        |id: &str, key: &str, token: &[u8]| Intent { sealed_request: sealed.clone(), ..intent(id, key, token) };
    {
        let ledger = LsmLedger::open(&path, 1).expect("open");
        ledger.record(with_sealed("S1", "k1", b"tok-1"), settled("S1", 700)).await.expect("record");
        ledger.flush().expect("flush");
    }
    let blobs = walkdir(&path).into_iter().filter(|p| p.components().any(|c| c.as_os_str() == "blobs")).count();
    assert!(blobs > 0, "the settlement went to a blob file");
    let ledger = LsmLedger::open(&path, 1).expect("reopen");
    let record = ledger.get("H1", "S1").await.expect("read").expect("present");
    assert_eq!(
        (record.state, record.status, record.body.as_str()),
        (State::Settled, 201, "{\"settlement_id\":\"S1\"}")
    );
    let stored = ledger.sealed_request("H1", "S1").await.expect("read").expect("present");
    assert_eq!(stored.sealed_request, sealed);
    let again = ledger.record(with_sealed("S2", "k2", b"tok-1"), settled("S2", 700)).await;
    assert_eq!(again, Err(LedgerError::TokenUsed));
    let undo = vec![AccumulatorDelta {
        payer: "basic-medical".into(),
        delta: YearToDate { year: 2026, fund_paid_fen: -700, deductible_fen: -100, ..YearToDate::default() },
    }];
    ledger.reverse("S1".into(), "{}".into(), undo, vec![9; 32], 1_700_000_100).await.expect("reverse");
    ledger.flush().expect("flush");
    drop(ledger);
    let ledger = LsmLedger::open(&path, 1).expect("reopen");
    assert_eq!(ledger.get("H1", "S1").await.expect("read").map(|r| r.state), Some(State::Reversed));
    assert_eq!(ledger.sealed_request("H1", "S1").await.expect("read").map(|u| u.sealed_request), Some(sealed));
    assert_eq!(ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read").fund_paid_fen, 0);
}

/// The sealed request of crash-test settlement `n`: 2 KiB, different for each, so a row read
/// back from the wrong place, or half of one, shows.
fn crash_sealed(n: u64) -> Vec<u8> {
    (0..2048u64).map(|i| ((i * 7 + n * 13) % 251) as u8).collect()
}

/// Set in the child process of the test below: the ledger it writes to, its first number.
const CRASH_CHILD: &str = "CARDGATE_LSM_FLUSH_CRASH_CHILD";

/// kill -9 while the lsm engine flushes settlements to blob files (a thread flushing without
/// pause beside the writes): every settlement acknowledged before the kill is read back whole
/// after it, none is half there, and the card's accumulators count exactly the settlements
/// present. Three kills on the same ledger.
#[tokio::test]
async fn an_lsm_settlement_acknowledged_before_a_kill_during_a_flush_is_whole_after_it() {
    if let Ok(child) = std::env::var(CRASH_CHILD) {
        return flush_crash_child(&child).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger");
    let mut next = 0u64;
    let mut acknowledged = std::collections::BTreeSet::new();
    for cycle in 0..3u64 {
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "an_lsm_settlement_acknowledged_before_a_kill_during_a_flush_is_whole_after_it"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CRASH_CHILD, format!("{} {next}", path.display()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("child");
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().expect("stdout")));
        // Kill after a different number of acknowledgements each cycle.
        let kill_after = 150 + cycle * 70;
        let mut seen = 0;
        while seen < kill_after {
            let line = lines.next().expect("the child stopped before the kill").expect("line");
            if let Some(n) = line.strip_prefix("ack ") {
                acknowledged.insert(n.parse::<u64>().expect("number"));
                seen += 1;
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        next = acknowledged.last().expect("acknowledged") + 1_000;
        let ledger = LsmLedger::open(&path, 1).expect("reopen after the kill");
        for n in &acknowledged {
            let id = format!("S{n}");
            let record = ledger.get("H1", &id).await.expect("read").unwrap_or_else(|| panic!("{id} lost"));
            assert_eq!((record.state, record.status), (State::Settled, 201), "{id}");
            let stored = ledger.sealed_request("H1", &id).await.expect("read").expect("present");
            assert_eq!(stored.sealed_request, crash_sealed(*n), "{id} whole");
        }
        // Those not acknowledged may be there (written, not yet answered) but whole.
        let mut present = 0i64;
        for n in 0..next {
            let id = format!("S{n}");
            if let Some(unresolved) = ledger.sealed_request("H1", &id).await.expect("read") {
                assert_eq!(unresolved.sealed_request, crash_sealed(n), "{id} whole");
                present += 1;
            }
        }
        let ytd = ledger.accumulators(&[9; 32], "basic-medical", 2026).await.expect("read");
        assert_eq!(ytd.fund_paid_fen, 700 * present, "the accumulators count each settlement present, once");
        assert!(present >= acknowledged.len() as i64);
    }
    let blobs = walkdir(&path).into_iter().filter(|p| p.components().any(|c| c.as_os_str() == "blobs")).count();
    assert!(blobs > 0, "the settlements went through blob files");
}

/// The child: settles `S<first>`, `S<first+1>`, ... on the ledger at the path, printing each
/// acknowledgement, while a thread flushes the memtables over and over; killed by the parent.
async fn flush_crash_child(spec: &str) {
    let (path, first) = spec.rsplit_once(' ').expect("path and first number");
    let ledger = Arc::new(LsmLedger::open(std::path::Path::new(path), 1).expect("open"));
    let flusher = Arc::clone(&ledger);
    std::thread::spawn(move || {
        loop {
            flusher.flush().expect("flush");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
    let mut out = std::io::stdout();
    for n in first.parse::<u64>().expect("first number").. {
        let (id, key, token) = (format!("S{n}"), format!("k{n}"), format!("tok-{n}"));
        let intent = Intent { sealed_request: crash_sealed(n), ..intent(&id, &key, token.as_bytes()) };
        ledger.record(intent, settled(&id, 700)).await.expect("record");
        std::io::Write::write_all(&mut out, format!("ack {n}\n").as_bytes()).expect("stdout");
        std::io::Write::flush(&mut out).expect("stdout");
    }
}

/// Every file under `dir`.
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() { files.extend(walkdir(&path)) } else { files.push(path) }
    }
    files
}

#[tokio::test]
async fn a_version_3_ledger_written_by_the_previous_gateway_is_migrated_with_everything_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger = version_3_ledger(dir.path());
    holds_the_version_3_fixture(&ledger).await;
    // It keeps the page size it was made with (SQLite's default then).
    assert_eq!(page_size(&dir.path().join("ledger.db")), 4096);

    // And moved whole into the log-structured engine (`cardgate ledger migrate`), with a quote
    // and a settlement left pending besides.
    add_a_quote_and_a_pending_settlement(&ledger).await;
    let mut items = Vec::new();
    ledger
        .dump(&mut |item| {
            items.push(item);
            Ok(())
        })
        .expect("dump");
    let moved = dir.path().join("moved");
    let mut importer = LsmLedger::import(&moved, 3).expect("import");
    for item in items.iter().cloned() {
        importer.add(item).expect("add");
    }
    assert!(!moved.exists(), "nothing at the destination before the import is whole");
    importer.finish().expect("finish");
    assert!(LsmLedger::import(&moved, 3).is_err(), "never into an existing directory");
    // An import given up leaves nothing behind.
    let given_up = dir.path().join("given-up");
    let mut importer = LsmLedger::import(&given_up, 3).expect("import");
    importer.add(items[0].clone()).expect("add");
    importer.abandon();
    assert!(!given_up.exists() && !dir.path().join("given-up.importing").exists());
    let settlements: Vec<&cardgate::ledger::Dumped> = items
        .iter()
        .filter_map(|i| if let cardgate::ledger::DumpItem::Settlement(d) = i { Some(&**d) } else { None })
        .collect();
    let years = items.iter().filter(|i| matches!(i, cardgate::ledger::DumpItem::Year(..))).count();
    assert_eq!((settlements.len(), years), (4, 3), "three settled and one pending; three cards' years");
    let lsm = LsmLedger::open(&moved, 3).expect("open");
    holds_the_version_3_fixture(&lsm).await;
    holds_the_closed_day(&lsm).await;
    let quote = lsm.quote("P110105002", "Q1").await.expect("read").expect("the quote moved");
    assert_eq!((quote.expires_at, quote.sealed.len(), quote.settled_by), (1_900_000_000, 60, None));
    let open: Vec<String> = lsm.unresolved().await.expect("read").into_iter().map(|u| u.id).collect();
    assert_eq!(open, ["S-pending"]);
    lsm.finish(settled("S-pending", 10)).await.expect("the pending one completes in its new home");
    // Its tokens stay used and its keys taken.
    let institution = "P110105002";
    for record in settlements.iter().filter(|d| d.holds.0) {
        let again = Intent {
            id: format!("{}-again", record.intent.id),
            idempotency_key: "fresh".into(),
            ..record.intent.clone()
        };
        assert_eq!(lsm.begin(again).await, Err(LedgerError::TokenUsed));
    }
    let again = Intent { id: "S-new".into(), token_id: Some(b"fresh".to_vec()), ..settlements[0].intent.clone() };
    assert_eq!(lsm.begin(again).await, Err(LedgerError::IdempotencyTaken));
    assert_eq!(
        lsm.by_idempotency_key(institution, "v3-1").await.expect("read").map(|r| r.id),
        Some(settlements[0].intent.id.clone())
    );
}

/// The page size of the SQLite ledger at `path`, read by a connection of its own.
fn page_size(path: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.query_row("PRAGMA page_size", [], |r| r.get(0)).expect("page size")
}

/// A new SQLite ledger is made with 2 KiB pages (less of each random index page to write per
/// settlement), and reopening it keeps them.
#[tokio::test]
async fn a_new_sqlite_ledger_has_small_pages_and_keeps_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger.db");
    let first = SqliteLedger::open(&path).expect("open");
    first.record(intent("S1", "k1", b"tok-1"), settled("S1", 700)).await.expect("one commit");
    drop(first);
    assert_eq!(page_size(&path), 2048);
    let ledger = SqliteLedger::open(&path).expect("reopen");
    assert_eq!(page_size(&path), 2048);
    let record = ledger.get("H1", "S1").await.expect("read").expect("kept");
    assert_eq!((record.state, record.status), (State::Settled, 201));
}

/// The version 3 fixture (a ledger the previous gateway wrote), opened (so migrated) in `dir`.
fn version_3_ledger(dir: &std::path::Path) -> SqliteLedger {
    let path = dir.join("ledger.db");
    {
        let old = rusqlite::Connection::open(&path).expect("create");
        old.execute_batch(include_str!("fixtures/ledger-v3.sql")).expect("version 3 ledger");
    }
    SqliteLedger::open(&path).expect("migrated")
}

/// What a migration must carry besides the fixture: a quote, and a settlement still pending.
async fn add_a_quote_and_a_pending_settlement(ledger: &SqliteLedger) {
    let quote = cardgate::ledger::StoredQuote {
        id: "Q1".into(),
        institution: "P110105002".into(),
        expires_at: 1_900_000_000,
        sealed: vec![5; 60],
        settled_by: None,
    };
    ledger.save_quote(quote).await.expect("quote");
    ledger.begin(intent("S-pending", "k-pending", b"tok-pending")).await.expect("pending");
    let closed = cardgate::ledger::ClosedDay { closed_at: 1_796_200_000, totals: "{\"closed\":1}".into() };
    ledger.close_day("P110105002", "2026-12-01", closed).await.expect("close");
}

/// The closed day [`add_a_quote_and_a_pending_settlement`] added, as a migrated ledger holds it.
async fn holds_the_closed_day(ledger: &dyn Ledger) {
    let closed = ledger.closed_day("P110105002", "2026-12-01").await.expect("read").expect("moved");
    assert_eq!((closed.closed_at, closed.totals.as_str()), (1_796_200_000, "{\"closed\":1}"));
}

/// What the version 3 fixture holds, checked through any engine.
async fn holds_the_version_3_fixture(ledger: &dyn Ledger) {
    let institution = "P110105002";
    // Every settlement, its state and its stored answer (plain JSON then) and key.
    let keys = ["v3-1", "v3-2", "v3-3"];
    let mut records = Vec::new();
    for key in keys {
        records.push(ledger.by_idempotency_key(institution, key).await.expect("read").expect("kept"));
    }
    let states: Vec<_> = records.iter().map(|r| r.state).collect();
    assert_eq!(states, [State::Settled, State::Reversed, State::Settled]);
    for record in &records {
        let receipt: serde_json::Value = serde_json::from_str(&record.body).expect("the stored receipt, as JSON");
        assert_eq!(receipt["settlement_id"].as_str(), Some(record.id.as_str()));
        assert_eq!(receipt["total_fen"], 5000);
    }
    assert!(records[1].reversal.as_deref().is_some_and(|r| r.contains("refund")));
    // The reversal was made on the day of its settlement: that day holds both.
    let day = ledger.reconciliation(institution, "2026-12-01", 1, 10).await.expect("read");
    // Recorded before insurance and clearing types were kept: one line, without them.
    let types: Vec<_> =
        day.by_type.iter().map(|t| (t.insurance_type.as_str(), t.clearing_type.as_str(), t.settled.count)).collect();
    assert_eq!(types, [("", "", 3)]);
    assert_eq!((day.settled.count, day.settled.account_pay_fen), (3, 15_000));
    assert_eq!((day.reversed.count, day.reversed.account_pay_fen, day.net.account_pay_fen), (1, 5_000, 10_000));
    // In time order (to the second; within one, by settlement): all four fell in one second.
    let events: Vec<_> = day.details.iter().map(|d| d.event.as_str()).collect();
    assert_eq!(events, ["settled", "settled", "reversed", "settled"]);
    // Settled answers can still be reversed, and the accumulators are where they were.
    let (card, deltas) = ledger.settled_deltas(&records[0].id).await.expect("read").expect("deltas");
    assert_eq!(deltas.iter().find(|d| d.payer == "basic-medical").map(|d| d.delta.account_paid_fen), Some(5000));
    let year = ledger.accumulators(&card, "basic-medical", 2026).await.expect("read");
    assert_eq!(year.account_paid_fen, 5000);
    assert!(ledger.unresolved().await.expect("read").iter().all(|u| u.id == "S-pending"));
}

/// A settlement of a card of its own (`n` picks the card, so the shard), recorded in one commit.
fn of_card(n: u8, id: &str, key: &str, at: i64) -> (Intent, Outcome) {
    let card = vec![n; 32];
    let intent = Intent { card_hash: card.clone(), created_at: at, ..intent(id, key, format!("tok-{id}").as_bytes()) };
    (intent, Outcome { card_hash: card, at, ..settled(id, 100) })
}

async fn an_idempotency_key_is_unique_whatever_the_card(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    // Twenty bills of twenty cards (spread over every shard), one key, all at once: one is
    // recorded, every other is told the key is taken.
    let tasks: Vec<_> = (0..20u8)
        .map(|n| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                let (intent, outcome) = of_card(n, &format!("S{n}"), "one-key", 1_700_000_000);
                ledger.record(intent, outcome).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 1, "{answers:?}");
    assert!(answers.iter().all(|a| matches!(a, Ok(()) | Err(LedgerError::IdempotencyTaken))), "{answers:?}");
    let found = ledger.by_idempotency_key("H1", "one-key").await.expect("read").expect("recorded");
    assert_eq!(found.state, State::Settled);
    // Settled afterwards, from any card: still taken.
    let (intent, outcome) = of_card(200, "S-late", "one-key", 1_700_000_001);
    assert_eq!(ledger.record(intent, outcome).await, Err(LedgerError::IdempotencyTaken));
}

async fn a_listing_pages_through_every_card_once_in_time_order(engine: Engine) {
    let dir = engine.place();
    let ledger = engine.open(&dir);
    let day_start = 1_700_000_000 - (1_700_000_000 + cardgate::ledger::UTC_OFFSET_SECS) % 86_400;
    for n in 0..30u8 {
        let (intent, outcome) = of_card(n, &format!("S{n:02}"), &format!("k{n}"), day_start + 100 + i64::from(n));
        ledger.record(intent, outcome).await.expect("record");
    }
    let day = cardgate::ledger::business_day(day_start + 100);
    let mut query = ListQuery { institution: "H1".into(), days: (day.clone(), day), limit: 7, ..Default::default() };
    let expected: Vec<String> = (0..30).map(|n| format!("S{n:02}")).collect();
    let (mut seen, mut waits) = (Vec::new(), 0);
    loop {
        let page = ledger.list(&query).await.expect("list");
        seen.extend(page.iter().map(|l| l.settlement_id.clone()));
        assert!(page.len() <= 7);
        assert_eq!(page.last().map_or(ledger.cursor_parts(), |l| l.position.len()), ledger.cursor_parts());
        match page.last() {
            Some(last) => query.after = last.position.clone(),
            // PostgreSQL lists what transactions older than every running one wrote (on the
            // whole server: other tests' too): the rest shows a moment later, after the same
            // cursor.
            None if seen.len() < expected.len() && waits < 100 => {
                waits += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            None => break,
        }
    }
    assert_eq!(seen, expected, "each once, in the order they were made");
    // And the day's reconciliation counts every card's settlement.
    let totals =
        ledger.reconciliation("H1", &cardgate::ledger::business_day(day_start + 100), 2, 25).await.expect("read");
    assert_eq!((totals.settled.count, totals.settled.fund_pay_fen, totals.details.len()), (30, 3000, 5));
}

#[tokio::test]
async fn a_ledger_keeps_the_shard_count_it_was_created_with() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ledger");
    {
        let ledger = LsmLedger::open(&path, 3).expect("create");
        for n in 0..12u8 {
            let (intent, outcome) = of_card(n, &format!("S{n}"), &format!("k{n}"), 1_700_000_000);
            ledger.record(intent, outcome).await.expect("record");
        }
    }
    // Configured differently later: the cards must still be found where they were put.
    let ledger = LsmLedger::open(&path, 8).expect("reopen");
    assert_eq!(ledger.cursor_parts(), 3);
    for n in 0..12u8 {
        let (intent, outcome) = of_card(n, &format!("S{n}-again"), &format!("k{n}"), 1_700_000_000);
        assert_eq!(ledger.record(intent, outcome).await, Err(LedgerError::IdempotencyTaken));
        let again = Intent { idempotency_key: format!("fresh-{n}"), ..of_card(n, &format!("S{n}-b"), "x", 0).0 };
        let again = Intent { token_id: Some(format!("tok-S{n}").into_bytes()), ..again };
        assert_eq!(ledger.begin(again).await, Err(LedgerError::TokenUsed), "card {n}: its token stays used");
        let ytd = ledger.accumulators(&[n; 32], "basic-medical", 2026).await.expect("read");
        assert_eq!(ytd.fund_paid_fen, 100, "card {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_ledger_moves_whole_into_postgres() {
    let Some(server) = postgres_server() else {
        eprintln!(
            "SKIPPED (set CARDGATE_TEST_POSTGRES=postgres://user@host/db to run): a_version_3_ledger_moves_whole_into_postgres"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger = version_3_ledger(dir.path());
    add_a_quote_and_a_pending_settlement(&ledger).await;
    // `cardgate ledger migrate --to postgres://...`: into an empty database, in one transaction.
    let database = ScratchDatabase::create(&server).expect("database");
    let config = postgres(&database, 60);
    let copied = cardgate::ledger::postgres::import(&config, &|visit| ledger.dump(visit)).expect("import");
    assert_eq!(copied, (4, 3, 1), "three settled and one pending; three cards' years; one quote");
    // Never into a database that holds a ledger: refused, nothing added.
    let again = cardgate::ledger::postgres::import(&config, &|visit| ledger.dump(visit));
    assert!(matches!(&again, Err(LedgerError::Storage(m)) if m.contains("already holds")), "{again:?}");
    // A source that fails midway leaves nothing behind.
    let empty = ScratchDatabase::create(&server).expect("database");
    let into_empty = postgres(&empty, 60);
    let failing = cardgate::ledger::postgres::import(&into_empty, &|visit| {
        ledger.dump(&mut |item| match item {
            cardgate::ledger::DumpItem::Quote(_) => Err(LedgerError::Storage("the disk went".into())),
            other => visit(other),
        })
    });
    assert!(failing.is_err());
    // A statement the database refuses midway (the first settlement sent twice): the error named
    // is that refusal, not the aborted transaction the statements after it meet — some of them
    // are earlier items' (a group's statements are sent together).
    let twice = ScratchDatabase::create(&server).expect("database");
    let refused = cardgate::ledger::postgres::import(&postgres(&twice, 60), &|visit| {
        let mut first = None;
        ledger.dump(&mut |item| {
            if first.is_none() && matches!(item, cardgate::ledger::DumpItem::Settlement(_)) {
                first = Some(item.clone());
            }
            if matches!(item, cardgate::ledger::DumpItem::Quote(_))
                && let Some(again) = first.take()
            {
                visit(again)?;
            }
            visit(item)
        })
    });
    let message = refused.expect_err("a settlement sent twice is refused").to_string();
    assert!(message.contains("duplicate key") && !message.contains("aborted"), "{message}");
    let fresh = PgLedger::open(&into_empty).expect("open");
    assert!(fresh.unresolved().await.expect("read").is_empty());
    assert_eq!(fresh.get("H1", "S-pending").await.expect("read"), None, "rolled back whole");

    let pg = PgLedger::open(&config).expect("open");
    holds_the_version_3_fixture(&pg).await;
    holds_the_closed_day(&pg).await;
    let quote = pg.quote("P110105002", "Q1").await.expect("read").expect("the quote moved");
    assert_eq!((quote.expires_at, quote.sealed.len(), quote.settled_by), (1_900_000_000, 60, None));
    let open: Vec<String> = pg.unresolved().await.expect("read").into_iter().map(|u| u.id).collect();
    assert_eq!(open, ["S-pending"]);
    pg.finish(settled("S-pending", 10)).await.expect("the pending one completes in its new home");
    // Its tokens stay used and its keys taken; new settlements come after the old ones.
    let record = pg.by_idempotency_key("P110105002", "v3-1").await.expect("read").expect("kept");
    let mut reused = intent("S-reused", "fresh-1", b"tok-pending");
    reused.institution = "P110105002".into();
    assert_eq!(pg.begin(reused).await, Err(LedgerError::TokenUsed));
    let mut taken = intent("S-taken", "v3-1", b"tok-new");
    taken.institution = "P110105002".into();
    assert_eq!(pg.begin(taken).await, Err(LedgerError::IdempotencyTaken));
    assert!(record.id.starts_with('S'));
    pg.begin(intent("S-after", "k-after", b"tok-after")).await.expect("a new settlement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_settlement_is_taken_over_only_when_its_lease_ran_out() {
    let Some(server) = postgres_server() else {
        eprintln!(
            "SKIPPED (set CARDGATE_TEST_POSTGRES=postgres://user@host/db to run): a_pending_settlement_is_taken_over_only_when_its_lease_ran_out"
        );
        return;
    };
    let database = ScratchDatabase::create(&server).expect("database");
    let node = |lease: i64| PgLedger::open(&postgres(&database, lease)).expect("open");
    // Two nodes of one cluster; the first records an intent and holds it for 30 s.
    let (first, second) = (node(30), node(30));
    first.begin(intent("S1", "k1", b"tok-1")).await.expect("begin");
    assert_eq!(second.claim("S1", 30).await, Ok(false), "the owner is completing it");
    assert_eq!(first.claim("S1", 30).await, Ok(false), "not even its owner's sweep takes it again");
    // Its outcome unknown (a payer did not answer): no lease; the next retry, on any node, takes it.
    let unknown = Outcome { state: State::Unknown, status: 504, deltas: vec![], amounts: None, ..settled("S1", 0) };
    first.finish(unknown).await.expect("unknown");
    assert_eq!(second.claim("S1", 30).await, Ok(true));
    assert_eq!(first.claim("S1", 30).await, Ok(false), "the second node holds it now");
    second.finish(settled("S1", 700)).await.expect("completed once");
    assert_eq!(first.claim("S1", 30).await, Ok(false), "settled: nothing to take over");
    // A node that dies holding a lease: taken over once the lease runs out, by one node.
    let short = node(1);
    short.begin(intent("S2", "k2", b"tok-2")).await.expect("begin");
    drop(short);
    assert_eq!(second.claim("S2", 30).await, Ok(false));
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    let (a, b) = tokio::join!(first.claim("S2", 30), second.claim("S2", 30));
    let claims = [a, b];
    assert_eq!(claims.iter().filter(|c| **c == Ok(true)).count(), 1, "{claims:?}");
}
