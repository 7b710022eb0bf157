//! The embedded ledger: SQLite in WAL mode with `synchronous = FULL` (every commit is fsynced),
//! one writer thread that commits writes in batches (group commit: one fsync for all the writes
//! that arrived while the previous commit ran), and a small pool of read connections.
//!
//! Each write runs in its own savepoint inside the batch's transaction, so one write refused by
//! a constraint (a replayed token) does not undo the others. A writer's answer is sent only
//! after the batch's commit returned: acknowledged means durable.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cardgate_sdk::YearToDate;
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AccumulatorDelta, Intent, Ledger, LedgerError, LedgerFuture, Outcome, Record, SettledDeltas, State, StoredQuote,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settlements (
    id              TEXT PRIMARY KEY,
    institution     TEXT NOT NULL,
    terminal        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash    BLOB NOT NULL,
    token_id        BLOB UNIQUE,
    quote_id        TEXT UNIQUE,
    card_hash       BLOB NOT NULL,
    card_masked     TEXT NOT NULL,
    total_fen       INTEGER NOT NULL,
    state           TEXT NOT NULL,
    status          INTEGER NOT NULL DEFAULT 0,
    body            TEXT NOT NULL DEFAULT '',
    reversal        TEXT,
    deltas          TEXT NOT NULL DEFAULT '[]',
    sealed_request  BLOB NOT NULL,
    fund_fen        INTEGER NOT NULL DEFAULT 0,
    account_fen     INTEGER NOT NULL DEFAULT 0,
    cash_fen        INTEGER NOT NULL DEFAULT 0,
    day             TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (institution, idempotency_key)
);
CREATE INDEX IF NOT EXISTS settlements_by_day ON settlements (institution, day, created_at);
CREATE INDEX IF NOT EXISTS settlements_unresolved ON settlements (state) WHERE state IN ('pending', 'unknown');
CREATE TABLE IF NOT EXISTS settlement_payers (
    settlement_id TEXT NOT NULL,
    payer         TEXT NOT NULL,
    fund_fen      INTEGER NOT NULL,
    account_fen   INTEGER NOT NULL,
    PRIMARY KEY (settlement_id, payer)
);
CREATE TABLE IF NOT EXISTS accumulators (
    card_hash             BLOB NOT NULL,
    payer                 TEXT NOT NULL,
    year                  INTEGER NOT NULL,
    deductible_fen        INTEGER NOT NULL DEFAULT 0,
    fund_paid_fen         INTEGER NOT NULL DEFAULT 0,
    eligible_fen          INTEGER NOT NULL DEFAULT 0,
    account_paid_fen      INTEGER NOT NULL DEFAULT 0,
    eligible_self_pay_fen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (card_hash, payer, year)
);
CREATE TABLE IF NOT EXISTS quotes (
    id          TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    sealed      BLOB NOT NULL
);
";

/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

/// Most writes committed together.
const MAX_BATCH: usize = 512;

type Completion = Box<dyn FnOnce(Result<(), LedgerError>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> (bool, Completion) + Send>;

/// The SQLite ledger.
///
/// Owns the writer thread through `jobs`: dropping the ledger closes the channel, the writer
/// commits what it holds and exits.
#[derive(Debug)]
pub struct SqliteLedger {
    path: PathBuf,
    jobs: Sender<Job>,
    readers: Mutex<Vec<Connection>>,
    /// Tells the checkpoint thread to stop when the ledger is dropped.
    stop_checkpoints: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        self.stop_checkpoints.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies the write-ahead log into the database off the writer's thread, so commits never
/// wait for a checkpoint.
fn checkpoint_loop(path: PathBuf, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let Ok(conn) = open(&path) else { return };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(250));
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "ledger: checkpoint failed");
        }
    }
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        storage(e)
    }
}

/// Stored answers are JSON; they are kept deflated (a third of the bytes to write and
/// checkpoint). Readers accept both forms.
fn pack(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::with_capacity(text.len() / 3), flate2::Compression::fast());
    let _ = encoder.write_all(text.as_bytes());
    encoder.finish().unwrap_or_else(|_| text.as_bytes().to_vec())
}

fn unpack(value: rusqlite::types::ValueRef<'_>) -> String {
    use std::io::Read;
    match value {
        rusqlite::types::ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
        rusqlite::types::ValueRef::Blob(bytes) => {
            let mut text = String::new();
            match flate2::read::ZlibDecoder::new(bytes).read_to_string(&mut text) {
                Ok(_) => text,
                Err(_) => String::from_utf8_lossy(bytes).into_owned(),
            }
        }
        _ => String::new(),
    }
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

fn open(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path).map_err(storage)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")
        .map_err(storage)?;
    Ok(conn)
}

impl SqliteLedger {
    /// Opens (or creates) the ledger at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let writer = open(path)?;
        let version: i64 = writer.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(storage)?;
        let has_tables: bool = writer
            .query_row("SELECT count(*) > 0 FROM sqlite_master WHERE name = 'settlements'", [], |r| r.get(0))
            .map_err(storage)?;
        if has_tables && version != SCHEMA_VERSION {
            return Err(LedgerError::Storage(format!(
                "{}: ledger schema version {version}, this gateway writes version {SCHEMA_VERSION}",
                path.display()
            )));
        }
        writer.execute_batch(SCHEMA).map_err(storage)?;
        writer.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")).map_err(storage)?;
        // Checkpoints run on their own thread (below), not inside the writer's commits.
        writer.execute_batch("PRAGMA wal_autocheckpoint = 0").map_err(storage)?;
        let stop_checkpoints = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (checkpoint_path, stop) = (path.to_owned(), std::sync::Arc::clone(&stop_checkpoints));
        std::thread::Builder::new()
            .name("cardgate-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_path, stop))
            .map_err(storage)?;
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        std::thread::Builder::new()
            .name("cardgate-ledger".into())
            .spawn(move || write_loop(writer, queue))
            .map_err(storage)?;
        Ok(Self { path: path.to_owned(), jobs, readers: Mutex::new(Vec::new()), stop_checkpoints })
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, LedgerError> {
        let pooled = self.readers.lock().map_err(storage)?.pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open(&self.path)?,
        };
        let result = f(&conn).map_err(storage);
        if let Ok(mut readers) = self.readers.lock() {
            readers.push(conn);
        }
        result
    }

    /// Queues a write and waits for its durable commit.
    fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    ) -> LedgerFuture<'_, T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = work(conn);
            let keep = result.is_ok();
            let completion: Completion = Box::new(move |committed| {
                let _ = reply.send(committed.and(result));
            });
            (keep, completion)
        });
        let sent = self.jobs.send(job).map_err(|_| LedgerError::Storage("ledger writer stopped".into()));
        Box::pin(async move {
            sent?;
            answer.await.map_err(|_| LedgerError::Storage("ledger writer stopped".into()))?
        })
    }
}

/// The writer: takes a batch, runs each job in a savepoint, commits once, then answers.
fn write_loop(mut conn: Connection, queue: Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        let (started, size) = (std::time::Instant::now(), batch.len());
        let mut completions = Vec::with_capacity(batch.len());
        let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                // Run nothing: dropping the jobs tells every waiter the storage failed.
                drop(batch);
                tracing::error!(error = %e, "ledger: cannot begin a transaction");
                continue;
            }
        };
        for job in batch {
            let outcome = run_cached(&tx, "SAVEPOINT job").map(|()| job(&tx));
            match outcome {
                Ok((true, completion)) => {
                    let _ = run_cached(&tx, "RELEASE job");
                    completions.push(completion);
                }
                Ok((false, completion)) => {
                    let _ = run_cached(&tx, "ROLLBACK TO job").and_then(|()| run_cached(&tx, "RELEASE job"));
                    completions.push(completion);
                }
                Err(e) => tracing::error!(error = %e, "ledger: savepoint failed"),
            }
        }
        let committed = tx.commit().map_err(storage);
        crate::metrics::ledger_commit(size, started.elapsed());
        if let Err(e) = &committed {
            tracing::error!(error = %e, "ledger: commit failed");
        }
        for completion in completions {
            completion(committed.clone());
        }
    }
}

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let state: String = row.get(3)?;
    Ok(Record {
        id: row.get(0)?,
        institution: row.get(1)?,
        request_hash: row.get(2)?,
        state: State::parse(&state).unwrap_or(State::Unknown),
        status: row.get(4)?,
        body: unpack(row.get_ref(5)?),
        reversal: row.get(6)?,
    })
}

const RECORD_COLUMNS: &str = "id, institution, request_hash, state, status, body, reversal";

fn add_accumulators(conn: &Connection, card_hash: &[u8], deltas: &[AccumulatorDelta]) -> rusqlite::Result<()> {
    for AccumulatorDelta { payer, delta: d } in deltas {
        conn.prepare_cached(
            "INSERT INTO accumulators (card_hash, payer, year, deductible_fen, fund_paid_fen, eligible_fen,
                 account_paid_fen, eligible_self_pay_fen) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (card_hash, payer, year) DO UPDATE SET
                 deductible_fen = deductible_fen + excluded.deductible_fen,
                 fund_paid_fen = fund_paid_fen + excluded.fund_paid_fen,
                 eligible_fen = eligible_fen + excluded.eligible_fen,
                 account_paid_fen = account_paid_fen + excluded.account_paid_fen,
                 eligible_self_pay_fen = eligible_self_pay_fen + excluded.eligible_self_pay_fen",
        )?
        .execute(params![
            card_hash,
            payer,
            d.year,
            d.deductible_fen,
            d.fund_paid_fen,
            d.eligible_fen,
            d.account_paid_fen,
            d.eligible_self_pay_fen
        ])?;
    }
    Ok(())
}

/// Runs a parameterless statement through the statement cache (no parsing after the first).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn record_amounts(conn: &Connection, id: &str, a: &super::Amounts) -> rusqlite::Result<()> {
    for (payer, fund, account) in &a.payers {
        conn.prepare_cached(
            "INSERT INTO settlement_payers (settlement_id, payer, fund_fen, account_fen) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![id, payer, fund, account])?;
    }
    Ok(())
}

fn unresolved_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<super::Unresolved> {
    let state: String = r.get(2)?;
    Ok(super::Unresolved {
        id: r.get(0)?,
        institution: r.get(1)?,
        state: State::parse(&state).unwrap_or(State::Unknown),
        sealed_request: r.get(3)?,
        created_at: r.get(4)?,
    })
}

const TOTALS_SQL: &str = "SELECT count(*), coalesce(sum(total_fen), 0), coalesce(sum(fund_fen), 0),
    coalesce(sum(account_fen), 0), coalesce(sum(cash_fen), 0) FROM settlements
    WHERE institution = ?1 AND day = ?2 AND state IN ";

fn totals(conn: &Connection, institution: &str, date: &str, states: &str) -> rusqlite::Result<super::Totals> {
    conn.query_row(&format!("{TOTALS_SQL}{states}"), params![institution, date], |r| {
        Ok(super::Totals {
            count: r.get::<_, i64>(0)? as u64,
            total_fen: r.get(1)?,
            fund_pay_fen: r.get(2)?,
            account_pay_fen: r.get(3)?,
            cash_pay_fen: r.get(4)?,
        })
    })
}

fn reconcile(
    conn: &Connection,
    institution: &str,
    date: &str,
    page: u32,
    page_size: u32,
) -> rusqlite::Result<super::Reconciliation> {
    let settled = totals(conn, institution, date, "('settled', 'reversed')")?;
    let reversed = totals(conn, institution, date, "('reversed')")?;
    let net = super::Totals {
        count: settled.count - reversed.count,
        total_fen: settled.total_fen - reversed.total_fen,
        fund_pay_fen: settled.fund_pay_fen - reversed.fund_pay_fen,
        account_pay_fen: settled.account_pay_fen - reversed.account_pay_fen,
        cash_pay_fen: settled.cash_pay_fen - reversed.cash_pay_fen,
    };
    let mut payers = conn.prepare(
        "SELECT p.payer, count(*), sum(p.fund_fen), sum(p.account_fen) FROM settlement_payers p
         JOIN settlements s ON s.id = p.settlement_id
         WHERE s.institution = ?1 AND s.day = ?2 AND s.state IN ('settled', 'reversed')
         GROUP BY p.payer ORDER BY p.payer",
    )?;
    let payers = payers
        .query_map(params![institution, date], |r| {
            Ok(super::PayerTotals {
                payer: r.get(0)?,
                count: r.get::<_, i64>(1)? as u64,
                fund_pay_fen: r.get(2)?,
                account_pay_fen: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut details = conn.prepare(
        "SELECT id, state, terminal, card_masked, created_at, total_fen, fund_fen, account_fen, cash_fen
         FROM settlements WHERE institution = ?1 AND day = ?2 AND state IN ('settled', 'reversed')
         ORDER BY created_at, id LIMIT ?3 OFFSET ?4",
    )?;
    let offset = i64::from(page.saturating_sub(1)) * i64::from(page_size);
    let details = details
        .query_map(params![institution, date, page_size, offset], |r| {
            let created: i64 = r.get(4)?;
            Ok(super::DetailLine {
                settlement_id: r.get(0)?,
                state: r.get(1)?,
                terminal_id: r.get(2)?,
                card: r.get(3)?,
                created_at: super::rfc3339(created),
                total_fen: r.get(5)?,
                fund_pay_fen: r.get(6)?,
                account_pay_fen: r.get(7)?,
                cash_pay_fen: r.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(super::Reconciliation {
        date: date.to_owned(),
        detail_count: settled.count,
        settled,
        reversed,
        net,
        payers,
        details,
        page,
        page_size,
    })
}

fn deltas_json(deltas: &[AccumulatorDelta]) -> String {
    let list: Vec<serde_json::Value> =
        deltas.iter().map(|d| serde_json::json!({ "payer": d.payer, "delta": d.delta })).collect();
    serde_json::Value::Array(list).to_string()
}

fn begin_intent(conn: &Connection, i: &Intent) -> Result<(), LedgerError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO settlements (id, institution, terminal, idempotency_key, request_hash, token_id, quote_id,
             card_hash, card_masked, total_fen, state, created_at, updated_at, sealed_request, day)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'pending', ?11, ?11, ?12, ?13)",
        )?
        .execute(params![
            i.id,
            i.institution,
            i.terminal,
            i.idempotency_key,
            i.request_hash,
            i.token_id,
            i.quote_id,
            i.card_hash,
            i.card_masked,
            i.total_fen,
            i.created_at,
            i.sealed_request,
            super::business_day(i.created_at)
        ]);
    match inserted {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, Some(message))) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
            Err(if message.contains("token_id") {
                LedgerError::TokenUsed
            } else if message.contains("quote_id") {
                LedgerError::QuoteUsed
            } else {
                LedgerError::IdempotencyTaken
            })
        }
        Err(e) => Err(storage(e)),
    }
}

impl Ledger for SqliteLedger {
    fn by_idempotency_key(&self, institution: &str, key: &str) -> Result<Option<Record>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {RECORD_COLUMNS} FROM settlements WHERE institution = ?1 AND idempotency_key = ?2"
            ))?
            .query_row(params![institution, key], record)
            .optional()
        })
    }

    fn get(&self, institution: &str, id: &str) -> Result<Option<Record>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(&format!("SELECT {RECORD_COLUMNS} FROM settlements WHERE institution = ?1 AND id = ?2"))?
                .query_row(params![institution, id], record)
                .optional()
        })
    }

    fn accumulators(&self, card_hash: &[u8], payer: &str, year: i32) -> Result<YearToDate, LedgerError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT deductible_fen, fund_paid_fen, eligible_fen, account_paid_fen, eligible_self_pay_fen
                 FROM accumulators WHERE card_hash = ?1 AND payer = ?2 AND year = ?3",
            )?
            .query_row(params![card_hash, payer, year], |r| {
                Ok(YearToDate {
                    year,
                    deductible_fen: r.get(0)?,
                    fund_paid_fen: r.get(1)?,
                    eligible_fen: r.get(2)?,
                    account_paid_fen: r.get(3)?,
                    eligible_self_pay_fen: r.get(4)?,
                })
            })
            .optional()
            .map(|found| found.unwrap_or(YearToDate { year, ..YearToDate::default() }))
        })
    }

    fn begin(&self, intent: Intent) -> LedgerFuture<'_, ()> {
        self.write(move |c| begin_intent(c, &intent))
    }

    fn finish(&self, o: Outcome) -> LedgerFuture<'_, ()> {
        // Compressed here, on the caller's thread: the writer's thread is the one to spare.
        let (body, deltas) = (pack(&o.body), deltas_json(&o.deltas));
        self.write(move |c| {
            let release_token = o.state != State::Settled && o.state != State::Unknown;
            let changed = c
                .prepare_cached(
                    "UPDATE settlements SET state = ?2, status = ?3, body = ?4, updated_at = ?5, deltas = ?7,
                         fund_fen = ?8, account_fen = ?9, cash_fen = ?10,
                         token_id = CASE WHEN ?6 THEN NULL ELSE token_id END,
                         quote_id = CASE WHEN ?6 THEN NULL ELSE quote_id END
                     WHERE id = ?1 AND state IN ('pending', 'unknown')",
                )?
                .execute(params![
                    o.id,
                    o.state.as_str(),
                    o.status,
                    body,
                    o.at,
                    release_token,
                    deltas,
                    o.amounts.as_ref().map_or(0, |a| a.fund_fen),
                    o.amounts.as_ref().map_or(0, |a| a.account_fen),
                    o.amounts.as_ref().map_or(0, |a| a.cash_fen)
                ])
                .map_err(storage)?;
            if changed != 1 {
                return Err(LedgerError::NotFound);
            }
            if let Some(a) = &o.amounts {
                record_amounts(c, &o.id, a).map_err(storage)?;
            }
            add_accumulators(c, &o.card_hash, &o.deltas).map_err(storage)
        })
    }

    fn reverse(
        &self,
        id: String,
        body: String,
        deltas: Vec<AccumulatorDelta>,
        card_hash: Vec<u8>,
        at: i64,
    ) -> LedgerFuture<'_, ()> {
        self.write(move |c| {
            let changed = c
                .execute(
                    "UPDATE settlements SET state = 'reversed', reversal = ?2, updated_at = ?3
                     WHERE id = ?1 AND state = 'settled'",
                    params![id, body, at],
                )
                .map_err(storage)?;
            if changed != 1 {
                return Err(LedgerError::NotFound);
            }
            add_accumulators(c, &card_hash, &deltas).map_err(storage)
        })
    }

    fn save_quote(&self, q: StoredQuote) -> LedgerFuture<'_, ()> {
        self.write(move |c| {
            c.prepare_cached("INSERT INTO quotes (id, institution, expires_at, sealed) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![q.id, q.institution, q.expires_at, q.sealed])
                .map(|_| ())
                .map_err(storage)
        })
    }

    fn quote(&self, institution: &str, id: &str) -> Result<Option<StoredQuote>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT q.id, q.institution, q.expires_at, q.sealed, s.id FROM quotes q
                 LEFT JOIN settlements s ON s.quote_id = q.id
                 WHERE q.institution = ?1 AND q.id = ?2",
            )?
            .query_row(params![institution, id], |r| {
                Ok(StoredQuote {
                    id: r.get(0)?,
                    institution: r.get(1)?,
                    expires_at: r.get(2)?,
                    sealed: r.get(3)?,
                    settled_by: r.get(4)?,
                })
            })
            .optional()
        })
    }

    fn unresolved(&self) -> Result<Vec<super::Unresolved>, LedgerError> {
        self.read(|c| {
            let mut statement = c.prepare(
                "SELECT id, institution, state, sealed_request, created_at FROM settlements
                 WHERE state IN ('pending', 'unknown') ORDER BY created_at",
            )?;
            statement.query_map([], unresolved_row)?.collect()
        })
    }

    fn sealed_request(&self, institution: &str, id: &str) -> Result<Option<super::Unresolved>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT id, institution, state, sealed_request, created_at FROM settlements
                 WHERE institution = ?1 AND id = ?2",
            )?
            .query_row(params![institution, id], unresolved_row)
            .optional()
        })
    }

    fn reconciliation(
        &self,
        institution: &str,
        date: &str,
        page: u32,
        page_size: u32,
    ) -> Result<super::Reconciliation, LedgerError> {
        self.read(|c| reconcile(c, institution, date, page, page_size))
    }

    fn settled_deltas(&self, id: &str) -> Result<Option<SettledDeltas>, LedgerError> {
        let row: Option<(Vec<u8>, String)> = self.read(|c| {
            c.prepare_cached("SELECT card_hash, deltas FROM settlements WHERE id = ?1")?
                .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })?;
        let Some((card_hash, json)) = row else { return Ok(None) };
        let list: Vec<serde_json::Value> = serde_json::from_str(&json).map_err(storage)?;
        let deltas = list
            .into_iter()
            .map(|v| {
                let payer = v["payer"].as_str().unwrap_or_default().to_owned();
                serde_json::from_value(v["delta"].clone()).map(|delta| AccumulatorDelta { payer, delta })
            })
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        Ok(Some((card_hash, deltas)))
    }
}
