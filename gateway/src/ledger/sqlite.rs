//! The embedded ledger: SQLite in WAL mode with `synchronous = FULL` (every commit is fsynced),
//! one writer thread that commits writes in batches (group commit: one fsync for all the writes
//! that arrived while the previous commit ran), and a small pool of read connections.
//!
//! Each write runs in its own savepoint inside the batch's transaction, so one write refused by
//! a constraint (a replayed token) does not undo the others. A writer's answer is sent only
//! after the batch's commit returned: acknowledged means durable.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cardgate_sdk::YearToDate;
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    AccumulatorDelta, Intent, Ledger, LedgerError, LedgerFuture, Outcome, Record, SettledDeltas, State, StoredQuote,
};

/// The closed days (schema 5): in the schema and in the migration to it, once.
macro_rules! closed_days_table {
    () => {
        "
CREATE TABLE IF NOT EXISTS closed_days (
    institution TEXT NOT NULL,
    day         TEXT NOT NULL,
    closed_at   INTEGER NOT NULL,
    totals      TEXT NOT NULL,
    PRIMARY KEY (institution, day)
) WITHOUT ROWID;
"
    };
}

/// The encounters (schema 6): in the schema and in the migration to it, once.
macro_rules! encounters_table {
    () => {
        "
CREATE TABLE IF NOT EXISTS encounters (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    institution     TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash    BLOB NOT NULL,
    token_id        BLOB,
    card_hash       BLOB NOT NULL,
    created_at      INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    sealed          BLOB NOT NULL,
    UNIQUE (institution, idempotency_key)
);
"
    };
}

/// Settlement rows are written once (the intent) and never rewritten: the outcome is a row of
/// its own. Every index but three grows at its right edge (keys in time order), so a group
/// commit writes few pages; the three random ones (idempotency key, token, accumulators) are
/// narrow. See docs/BENCHMARKS.md for why pages, not bytes, are the cost.
const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS settlements (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    institution     TEXT NOT NULL,
    terminal        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash    BLOB NOT NULL,
    token_id        BLOB,
    quote_id        TEXT,
    card_hash       BLOB NOT NULL,
    card_masked     TEXT NOT NULL,
    total_fen       INTEGER NOT NULL,
    day             TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    sealed_request  BLOB NOT NULL,
    insurance_type  TEXT NOT NULL DEFAULT '',
    clearing_type   TEXT NOT NULL DEFAULT '',
    delegated       INTEGER NOT NULL DEFAULT 0,
    UNIQUE (institution, idempotency_key)
);
CREATE INDEX IF NOT EXISTS settlements_by_day ON settlements (institution, day);
CREATE TABLE IF NOT EXISTS pending (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS used_tokens (token_id BLOB PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS used_quotes (quote_id TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outcomes (
    seq         INTEGER PRIMARY KEY,
    state       TEXT NOT NULL,
    status      INTEGER NOT NULL,
    body        TEXT NOT NULL,
    reversal    TEXT,
    deltas      TEXT NOT NULL,
    payers      TEXT NOT NULL,
    fund_fen    INTEGER NOT NULL,
    account_fen INTEGER NOT NULL,
    cash_fen    INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    reversed_day TEXT
);
CREATE INDEX IF NOT EXISTS outcomes_unknown ON outcomes (state) WHERE state = 'unknown';
CREATE INDEX IF NOT EXISTS outcomes_by_reversed_day ON outcomes (reversed_day) WHERE reversed_day IS NOT NULL;
CREATE TABLE IF NOT EXISTS accumulators (
    card_hash             BLOB NOT NULL,
    year                  INTEGER NOT NULL,
    payer                 TEXT NOT NULL,
    deductible_fen        INTEGER NOT NULL DEFAULT 0,
    fund_paid_fen         INTEGER NOT NULL DEFAULT 0,
    eligible_fen          INTEGER NOT NULL DEFAULT 0,
    account_paid_fen      INTEGER NOT NULL DEFAULT 0,
    eligible_self_pay_fen INTEGER NOT NULL DEFAULT 0,
    outpatient_fund_paid_fen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (card_hash, year, payer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quotes (
    id          TEXT PRIMARY KEY,
    institution TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    sealed      BLOB NOT NULL
);
",
    closed_days_table!(),
    encounters_table!()
);

/// Moves a version 2 ledger (one wide settlement row updated in place, payers in a table of
/// their own) to version 3, in one transaction.
const MIGRATE_2_TO_3: &str = "
ALTER TABLE settlements RENAME TO settlements_v2;
ALTER TABLE accumulators RENAME TO accumulators_v2;
DROP INDEX IF EXISTS settlements_by_day;
DROP INDEX IF EXISTS settlements_unresolved;
{SCHEMA}
INSERT INTO settlements (seq, id, institution, terminal, idempotency_key, request_hash, token_id, quote_id,
    card_hash, card_masked, total_fen, day, created_at, sealed_request)
    SELECT rowid, id, institution, terminal, idempotency_key, request_hash, token_id, quote_id, card_hash,
        card_masked, total_fen, day, created_at, sealed_request FROM settlements_v2;
INSERT INTO pending (seq) SELECT rowid FROM settlements_v2 WHERE state = 'pending';
INSERT INTO used_tokens (token_id, seq) SELECT token_id, rowid FROM settlements_v2 WHERE token_id IS NOT NULL;
INSERT INTO used_quotes (quote_id, seq) SELECT quote_id, rowid FROM settlements_v2 WHERE quote_id IS NOT NULL;
INSERT INTO outcomes (seq, state, status, body, reversal, deltas, payers, fund_fen, account_fen, cash_fen, updated_at)
    SELECT s.rowid, s.state, s.status, s.body, s.reversal, s.deltas,
        coalesce((SELECT json_group_array(json_array(p.payer, p.fund_fen, p.account_fen))
                  FROM settlement_payers p WHERE p.settlement_id = s.id), '[]'),
        s.fund_fen, s.account_fen, s.cash_fen, s.updated_at
    FROM settlements_v2 s WHERE s.state <> 'pending';
INSERT INTO accumulators (card_hash, year, payer, deductible_fen, fund_paid_fen, eligible_fen, account_paid_fen,
    eligible_self_pay_fen) SELECT card_hash, year, payer, deductible_fen, fund_paid_fen, eligible_fen,
    account_paid_fen, eligible_self_pay_fen FROM accumulators_v2;
DROP TABLE settlements_v2;
DROP TABLE settlement_payers;
DROP TABLE accumulators_v2;
";

/// Moves a version 3 ledger to version 4: the business day (UTC+8) each reversal was made
/// on, so that reconciliation counts a reversal on the day it happens.
const MIGRATE_3_TO_4: &str = "
ALTER TABLE outcomes ADD COLUMN reversed_day TEXT;
CREATE INDEX IF NOT EXISTS outcomes_by_reversed_day ON outcomes (reversed_day) WHERE reversed_day IS NOT NULL;
";

/// Moves a version 4 ledger to version 5: each settlement's insurance type and clearing type
/// (empty for those recorded before) and whether it was a family member's bill, and the
/// closed days.
const MIGRATE_4_TO_5: &str = concat!(
    "
ALTER TABLE settlements ADD COLUMN insurance_type TEXT NOT NULL DEFAULT '';
ALTER TABLE settlements ADD COLUMN clearing_type TEXT NOT NULL DEFAULT '';
ALTER TABLE settlements ADD COLUMN delegated INTEGER NOT NULL DEFAULT 0;
",
    closed_days_table!()
);

/// Moves a version 5 ledger to version 6: encounters (a token an encounter spent is in
/// `used_tokens` under the encounter's seq, negated).
const MIGRATE_5_TO_6: &str = encounters_table!();

/// Moves a version 6 ledger to version 7: the outpatient pooling's own year-to-date figure.
const MIGRATE_6_TO_7: &str = "ALTER TABLE accumulators ADD COLUMN outpatient_fund_paid_fen INTEGER NOT NULL DEFAULT 0;";

/// Fills `reversed_day` for reversals recorded before version 4 (from their time).
const FILL_REVERSED_DAY: &str =
    "UPDATE outcomes SET reversed_day = date(updated_at + 28800, 'unixepoch') WHERE state = 'reversed';";

/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 7;

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
    /// Shared with the writer and the checkpoint thread (which it tells to stop on drop).
    wal: Arc<WalState>,
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        self.wal.stop.store(true, Ordering::Relaxed);
        if let Some(checkpointer) = self.wal.checkpointer.get() {
            checkpointer.unpark();
        }
    }
}

/// What the writer and the checkpoint thread tell each other about the write-ahead log.
#[derive(Debug, Default)]
struct WalState {
    /// The ledger was dropped.
    stop: AtomicBool,
    /// The writer wants the log to start over: checkpoint without pausing.
    hurry: AtomicBool,
    /// The last checkpoint copied every frame and had little to copy: the writer's own
    /// checkpoint, right after a commit, will be short.
    caught_up: AtomicBool,
    /// [`SqliteOptions::wal_restart_bytes`], in frames of this ledger's page size.
    restart_frames: i32,
    /// [`SqliteOptions::hurry_at_most`].
    hurry_at_most: std::time::Duration,
    /// The checkpoint thread, woken when the writer starts to hurry it.
    checkpointer: std::sync::OnceLock<std::thread::Thread>,
    /// The writer's last transaction failed to begin or commit (a full disk, an I/O error).
    failing: AtomicBool,
}

/// Copies the write-ahead log into the database off the writer's thread, so commits never
/// wait for a checkpoint. Every 250 ms; back to back while the writer wants the log to start
/// over ([`restart_point`]).
fn checkpoint_loop(path: PathBuf, wal: Arc<WalState>) {
    let Ok(conn) = open(&path) else { return };
    let (mut copied_before, mut idle, mut failing) = (0, false, false);
    while !wal.stop.load(Ordering::Relaxed) {
        if wal.hurry.load(Ordering::Relaxed) && !idle {
            // Hurried: the next pass as soon as the writer may have added a commit or two.
            std::thread::sleep(std::time::Duration::from_millis(1));
        } else {
            std::thread::park_timeout(std::time::Duration::from_millis(250));
        }
        let hurry = wal.hurry.load(Ordering::Relaxed);
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))) {
            Ok((log, copied)) => {
                failing = false;
                let step = copied - copied_before;
                copied_before = copied;
                // Nothing new since the last pass: the writer is idle, no need to spin.
                idle = step == 0;
                wal.caught_up
                    .store(hurry && copied == log && (0..=CAUGHT_UP_FRAMES).contains(&step), Ordering::Release);
            }
            // Once per failing spell (a full disk fails every pass).
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "ledger: checkpoint failed");
            }
            Err(_) => {}
        }
    }
}

/// A checkpoint that copied at most this many frames (4 MiB) finished close behind the writer.
const CAUGHT_UP_FRAMES: i64 = 1024;

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        storage(e)
    }
}

/// Stored answers are JSON text. Version 2 ledgers kept some deflated (rows rewritten in
/// place made bytes count; appended rows made the compression cost more than it saved):
/// readers accept both forms.
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

/// Creates a missing ledger file readable by its owner alone (0600, whatever the umask):
/// SQLite gives the write-ahead log and shared-memory files the same mode as the database.
fn create_private(path: &Path) -> Result<(), LedgerError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(LedgerError::Storage(format!("{}: {e}", path.display()))),
    }
}

/// The page size of a new ledger file: most of the writer's CPU is copying, checksumming and
/// writing whole pages into the log, and each settlement dirties about three random index pages
/// (idempotency key, token, card accumulators), so a smaller page is less of each. 2 KiB took
/// the writer's CPU per settlement from ~105 to ~87 µs (4 KiB: SQLite's default; 1 KiB: deeper
/// trees, no better; docs/BENCHMARKS.md). A ledger keeps the size it was made with.
const NEW_LEDGER_PAGE_SIZE: u32 = 2048;

fn open(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path).map_err(storage)?;
    // Before the switch to WAL, which writes the first page: on a file that already has pages
    // this changes nothing.
    conn.execute_batch(&format!(
        "PRAGMA page_size = {NEW_LEDGER_PAGE_SIZE}; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
         PRAGMA busy_timeout = 5000;"
    ))
    .map_err(storage)?;
    Ok(conn)
}

/// Tuning of the SQLite ledger; the defaults are what the daemon uses.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Bytes of write-ahead log (its frames' pages) past which the writer makes it start over
    /// (see [`restart_point`]).
    pub wal_restart_bytes: u64,
    /// The longest the writer waits for the checkpoint thread to get close behind before it
    /// makes the log start over itself (zero: at once, deterministically — for tests).
    pub hurry_at_most: std::time::Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { wal_restart_bytes: WAL_RESTART_BYTES, hurry_at_most: HURRY_AT_MOST }
    }
}

impl SqliteLedger {
    /// Opens (or creates) the ledger at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        Self::open_with(path, &SqliteOptions::default())
    }

    /// [`SqliteLedger::open`] with tuning.
    pub fn open_with(path: &Path, options: &SqliteOptions) -> Result<Self, LedgerError> {
        create_private(path)?;
        let writer = open(path)?;
        let version: i64 = writer.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(storage)?;
        let has_tables: bool = writer
            .query_row("SELECT count(*) > 0 FROM sqlite_master WHERE name = 'settlements'", [], |r| r.get(0))
            .map_err(storage)?;
        match (has_tables, version) {
            (false, _) => {
                writer.execute_batch(SCHEMA).map_err(storage)?;
                writer.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")).map_err(storage)?;
            }
            (true, SCHEMA_VERSION) => {}
            (true, 2..=6) => {
                let migration = match version {
                    2 => MIGRATE_2_TO_3.replace("{SCHEMA}", SCHEMA),
                    3 => format!("{MIGRATE_3_TO_4} {MIGRATE_4_TO_5} {MIGRATE_5_TO_6} {MIGRATE_6_TO_7}"),
                    4 => format!("{MIGRATE_4_TO_5} {MIGRATE_5_TO_6} {MIGRATE_6_TO_7}"),
                    5 => format!("{MIGRATE_5_TO_6} {MIGRATE_6_TO_7}"),
                    _ => MIGRATE_6_TO_7.to_owned(),
                };
                writer
                    .execute_batch(&format!(
                        "BEGIN IMMEDIATE; {migration} {FILL_REVERSED_DAY} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                    ))
                    .map_err(|e| {
                        LedgerError::Storage(format!(
                            "{}: migrating the ledger to version {SCHEMA_VERSION}: {e}",
                            path.display()
                        ))
                    })?;
                tracing::info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "ledger migrated");
            }
            (true, _) => {
                return Err(LedgerError::Storage(format!(
                    "{}: ledger schema version {version}, this gateway writes version {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        }
        // Checkpoints run on their own thread (below), not inside the writer's commits.
        writer
            .execute_batch(&format!("PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_KEEP_BYTES};"))
            .map_err(storage)?;
        let page_size: u64 = writer.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(storage)?;
        let state = Arc::new(WalState {
            restart_frames: i32::try_from(options.wal_restart_bytes / page_size.max(512)).unwrap_or(i32::MAX).max(1),
            hurry_at_most: options.hurry_at_most,
            ..WalState::default()
        });
        let (checkpoint_path, checkpoint_state) = (path.to_owned(), Arc::clone(&state));
        let checkpointer = std::thread::Builder::new()
            .name("cardgate-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpoint_path, checkpoint_state))
            .map_err(storage)?;
        let _ = state.checkpointer.set(checkpointer.thread().clone());
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let writer_state = Arc::clone(&state);
        std::thread::Builder::new()
            .name("cardgate-ledger".into())
            .spawn(move || write_loop(writer, queue, &writer_state))
            .map_err(storage)?;
        Ok(Self { path: path.to_owned(), jobs, readers: Mutex::new(Vec::new()), wal: state })
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
fn write_loop(mut conn: Connection, queue: Receiver<Job>, wal: &WalState) {
    conn.wal_hook(Some(note_wal_frames));
    let mut hurried_at = std::time::Instant::now();
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
                if !wal.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "ledger: cannot begin a transaction; writes fail until it can");
                }
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
        match &committed {
            // Logged once per failing spell, not once per batch: a full disk would flood the log.
            Err(e) if !wal.failing.swap(true, Ordering::Relaxed) => {
                tracing::error!(error = %e, "ledger: commit failed; writes fail until one commits");
            }
            Err(_) => {}
            Ok(()) if wal.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!("ledger: commits succeed again");
            }
            Ok(()) => {}
        }
        for completion in completions {
            completion(committed.clone());
        }
        if WAL_FRAMES.get() > wal.restart_frames && !wal.hurry.swap(true, Ordering::Relaxed) {
            hurried_at = std::time::Instant::now();
            if let Some(checkpointer) = wal.checkpointer.get() {
                checkpointer.unpark();
            }
        }
        // Once the checkpoint thread is close behind; or, if it never gets there (every pass
        // finding the log busy), after two seconds anyway, with a longer pause.
        if wal.hurry.load(Ordering::Relaxed)
            && (wal.caught_up.swap(false, Ordering::Acquire) || hurried_at.elapsed() >= wal.hurry_at_most)
        {
            restart_point(&conn);
            wal.hurry.store(false, Ordering::Relaxed);
        }
    }
}

/// The longest the writer waits for the checkpoint thread to get close behind.
const HURRY_AT_MOST: std::time::Duration = std::time::Duration::from_secs(2);

/// Past this much log (1 GiB of pages, whatever their size) it has not started over for a while:
/// the writer makes it. Each start-over costs the writer one short copy and an fsync of the
/// database (a pause of a few to 30 ms here), so it is kept rare: at 10k settlements/s a few
/// seconds apart. The file keeps its size and is overwritten from its start, which is
/// cheaper than growing it; it is cut back only past [`WAL_KEEP_BYTES`].
const WAL_RESTART_BYTES: u64 = 1 << 30;

/// A log file larger than this is cut back when the log starts over (`journal_size_limit`).
const WAL_KEEP_BYTES: u64 = 3 << 29;

thread_local! {
    /// Frames in the write-ahead log after the writer's last commit (its commit hook).
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

/// Lets the write-ahead log start over from its beginning.
///
/// SQLite reuses the log from its start only when a write transaction begins with every frame
/// already copied into the database. When the writer commits back to back, the checkpoint
/// thread never finishes between two commits and the log grows without bound (a gigabyte in
/// six seconds at 10k settlements/s). So past [`WAL_RESTART_BYTES`] the writer asks the
/// checkpoint thread to hurry; once a checkpoint finishes close behind, the writer copies the
/// few frames left itself, between two batches, and its next transaction starts the log over.
/// The pause is one short copy and an fsync.
fn restart_point(conn: &Connection) {
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))) {
        Ok((log, copied)) => crate::metrics::ledger_wal(log, copied),
        Err(e) => tracing::warn!(error = %e, "ledger: checkpoint failed"),
    }
}

impl SqliteLedger {
    /// Streams everything this ledger holds to `visit`, from one consistent snapshot (a read
    /// transaction on a connection of its own), one item at a time: a ledger of any size
    /// moves in bounded memory (`cardgate ledger migrate`).
    pub fn dump(&self, visit: &mut dyn FnMut(super::DumpItem) -> Result<(), LedgerError>) -> Result<(), LedgerError> {
        let conn = open(&self.path)?;
        conn.execute_batch("BEGIN")?;
        // The transaction ends with the connection, whatever happens.
        dump_into(&conn, visit)
    }
}

/// Every settlement with its outcome, and whether it holds its token and its quote: those
/// looked up by their keys (a search on `seq` alone scans the table for every settlement:
/// 100,000 took 416 s).
const DUMP_SETTLEMENTS: &str =
    "SELECT s.seq, s.id, s.institution, s.terminal, s.idempotency_key, s.request_hash, s.token_id, s.quote_id,
         s.card_hash, s.card_masked, s.total_fen, s.created_at, s.sealed_request, o.state, o.status, o.body,
         o.reversal, o.deltas, o.payers, o.fund_fen, o.account_fen, o.cash_fen, o.updated_at, o.reversed_day,
         EXISTS (SELECT 1 FROM used_tokens u WHERE u.token_id = s.token_id AND u.seq = s.seq),
         EXISTS (SELECT 1 FROM used_quotes q WHERE q.quote_id = s.quote_id AND q.seq = s.seq),
         s.insurance_type, s.clearing_type, s.delegated
     FROM settlements s LEFT JOIN outcomes o ON o.seq = s.seq ORDER BY s.seq";

fn dump_into(
    c: &Connection,
    visit: &mut dyn FnMut(super::DumpItem) -> Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    let mut statement = c.prepare(DUMP_SETTLEMENTS)?;
    let mut rows = statement.query([])?;
    while let Some(r) = rows.next()? {
        let state: Option<String> = r.get(13)?;
        visit(super::DumpItem::Settlement(Box::new(super::Dumped {
            seq: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
            intent: Intent {
                id: r.get(1)?,
                institution: r.get(2)?,
                terminal: r.get(3)?,
                idempotency_key: r.get(4)?,
                request_hash: r.get(5)?,
                token_id: r.get(6)?,
                quote_id: r.get(7)?,
                card_hash: r.get(8)?,
                card_masked: r.get(9)?,
                total_fen: r.get(10)?,
                created_at: r.get(11)?,
                sealed_request: r.get(12)?,
                insurance_type: r.get(26)?,
                clearing_type: r.get(27)?,
                delegated: r.get(28)?,
            },
            state: state.as_deref().map_or(State::Pending, |s| State::parse(s).unwrap_or(State::Unknown)),
            status: r.get::<_, Option<u16>>(14)?.unwrap_or(0),
            body: r.get_ref(15).map(unpack)?,
            reversal: r.get(16)?,
            deltas: r.get::<_, Option<String>>(17)?.unwrap_or_else(|| "[]".into()),
            payers: r.get::<_, Option<String>>(18)?.unwrap_or_else(|| "[]".into()),
            amounts: (
                r.get::<_, Option<i64>>(19)?.unwrap_or(0),
                r.get::<_, Option<i64>>(20)?.unwrap_or(0),
                r.get::<_, Option<i64>>(21)?.unwrap_or(0),
            ),
            updated_at: r.get::<_, Option<i64>>(22)?.unwrap_or(0),
            reversed_day: r.get(23)?,
            holds: (r.get(24)?, r.get(25)?),
        })))?;
    }
    // A card's year is its rows together (the primary key's order).
    let mut statement = c.prepare(
        "SELECT card_hash, year, payer, deductible_fen, fund_paid_fen, eligible_fen, account_paid_fen,
             eligible_self_pay_fen, outpatient_fund_paid_fen FROM accumulators ORDER BY card_hash, year",
    )?;
    let mut rows = statement.query([])?;
    let mut year: Option<(Vec<u8>, i32, super::PayerYears)> = None;
    while let Some(r) = rows.next()? {
        let (card, number): (Vec<u8>, i32) = (r.get(0)?, r.get(1)?);
        let figures = YearToDate {
            year: number,
            deductible_fen: r.get(3)?,
            fund_paid_fen: r.get(4)?,
            eligible_fen: r.get(5)?,
            account_paid_fen: r.get(6)?,
            eligible_self_pay_fen: r.get(7)?,
            outpatient_fund_paid_fen: r.get(8)?,
        };
        match &mut year {
            Some((c, y, payers)) if *c == card && *y == number => payers.push((r.get(2)?, figures)),
            _ => {
                if let Some((c, y, payers)) = year.replace((card, number, vec![(r.get(2)?, figures)])) {
                    visit(super::DumpItem::Year(c, y, payers))?;
                }
            }
        }
    }
    if let Some((c, y, payers)) = year {
        visit(super::DumpItem::Year(c, y, payers))?;
    }
    let mut statement = c.prepare("SELECT id, institution, expires_at, sealed FROM quotes")?;
    let mut rows = statement.query([])?;
    while let Some(r) = rows.next()? {
        visit(super::DumpItem::Quote(StoredQuote {
            id: r.get(0)?,
            institution: r.get(1)?,
            expires_at: r.get(2)?,
            sealed: r.get(3)?,
            settled_by: None,
        }))?;
    }
    let mut statement = c.prepare(&format!("{ENCOUNTER_SELECT} ORDER BY seq"))?;
    let mut rows = statement.query([])?;
    while let Some(r) = rows.next()? {
        visit(super::DumpItem::Encounter(encounter_row(r)?))?;
    }
    let mut statement = c.prepare("SELECT institution, day, closed_at, totals FROM closed_days")?;
    let mut rows = statement.query([])?;
    while let Some(r) = rows.next()? {
        let closed = super::ClosedDay { closed_at: r.get(2)?, totals: r.get(3)? };
        visit(super::DumpItem::Closed(r.get(0)?, r.get(1)?, closed))?;
    }
    Ok(())
}

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let state: Option<String> = row.get(3)?;
    Ok(Record {
        id: row.get(0)?,
        institution: row.get(1)?,
        request_hash: row.get(2)?,
        state: state.as_deref().map_or(State::Pending, |s| State::parse(s).unwrap_or(State::Unknown)),
        status: row.get::<_, Option<u16>>(4)?.unwrap_or(0),
        body: row.get_ref(5).map(unpack)?,
        reversal: row.get(6)?,
        created_at: row.get(7)?,
    })
}

/// A listing's page: `?1` institution, `?2`..`?3` days, after seq `?4`, `?5`..`?6` times,
/// `?7` terminal, `?8` state, `?9` rows. One day walks that day's index in seq order from the
/// cursor and stops at the page's end; a range of days is read whole and sorted (one day of
/// 100,000 settlements read so: 0.3 s a page, whichever page).
fn listing(one_day: bool) -> String {
    let days = if one_day { "s.day = ?2" } else { "s.day BETWEEN ?2 AND ?3" };
    format!(
        "SELECT s.seq, s.id, coalesce(o.state, 'pending'), s.terminal, s.card_masked, s.created_at,
             s.total_fen, o.fund_fen, o.account_fen, o.cash_fen
         FROM settlements s LEFT JOIN outcomes o ON o.seq = s.seq
         WHERE s.institution = ?1 AND {days} AND s.seq > ?4
             AND (?5 IS NULL OR s.created_at >= ?5) AND (?6 IS NULL OR s.created_at < ?6)
             AND (?7 IS NULL OR s.terminal = ?7) AND (?8 IS NULL OR coalesce(o.state, 'pending') = ?8)
         ORDER BY s.seq LIMIT ?9"
    )
}

/// A settlement with its outcome, if any (none: still pending).
const RECORD_SELECT: &str = "SELECT s.id, s.institution, s.request_hash, o.state, o.status, o.body, o.reversal,
    s.created_at FROM settlements s LEFT JOIN outcomes o ON o.seq = s.seq";

/// Adds each payer's change to the card's accumulators. With `read` (the figures the payers
/// were given), a payer's row changes only if it still holds them — the compare of the
/// compare-and-set folded into the same upsert, so it costs the writer nothing more — and a
/// row that moved meanwhile makes the whole outcome [`LedgerError::Stale`].
fn add_accumulators(
    conn: &Connection,
    card_hash: &[u8],
    deltas: &[AccumulatorDelta],
    read: &[AccumulatorDelta],
) -> Result<(), LedgerError> {
    for AccumulatorDelta { payer, delta: d } in deltas {
        let given = read.iter().find(|r| r.payer == *payer && r.delta.year == d.year).map(|r| r.delta);
        let changed = conn
            .prepare_cached(
                "INSERT INTO accumulators (card_hash, year, payer, deductible_fen, fund_paid_fen, eligible_fen,
                     account_paid_fen, eligible_self_pay_fen, outpatient_fund_paid_fen)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?15)
                 ON CONFLICT (card_hash, year, payer) DO UPDATE SET
                     deductible_fen = deductible_fen + excluded.deductible_fen,
                     fund_paid_fen = fund_paid_fen + excluded.fund_paid_fen,
                     eligible_fen = eligible_fen + excluded.eligible_fen,
                     account_paid_fen = account_paid_fen + excluded.account_paid_fen,
                     eligible_self_pay_fen = eligible_self_pay_fen + excluded.eligible_self_pay_fen,
                     outpatient_fund_paid_fen = outpatient_fund_paid_fen + excluded.outpatient_fund_paid_fen
                 WHERE ?9 = 0 OR (deductible_fen = ?10 AND fund_paid_fen = ?11 AND eligible_fen = ?12
                     AND account_paid_fen = ?13 AND eligible_self_pay_fen = ?14 AND outpatient_fund_paid_fen = ?16)",
            )?
            .execute(params![
                card_hash,
                d.year,
                payer,
                d.deductible_fen,
                d.fund_paid_fen,
                d.eligible_fen,
                d.account_paid_fen,
                d.eligible_self_pay_fen,
                given.is_some(),
                given.map_or(0, |g| g.deductible_fen),
                given.map_or(0, |g| g.fund_paid_fen),
                given.map_or(0, |g| g.eligible_fen),
                given.map_or(0, |g| g.account_paid_fen),
                given.map_or(0, |g| g.eligible_self_pay_fen),
                d.outpatient_fund_paid_fen,
                given.map_or(0, |g| g.outpatient_fund_paid_fen),
            ])?;
        // No row inserted or updated: it exists and holds other figures than were read. (A
        // missing row was read as zeros; one inserted since is caught here too.)
        if changed == 0 {
            return Err(LedgerError::Stale);
        }
    }
    Ok(())
}

/// Runs a parameterless statement through the statement cache (no parsing after the first).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn unresolved_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<super::Unresolved> {
    let state: Option<String> = r.get(2)?;
    Ok(super::Unresolved {
        id: r.get(0)?,
        institution: r.get(1)?,
        state: state.as_deref().map_or(State::Pending, |s| State::parse(s).unwrap_or(State::Unknown)),
        sealed_request: r.get(3)?,
        created_at: r.get(4)?,
    })
}

const UNRESOLVED_SELECT: &str = "SELECT s.id, s.institution, o.state, s.sealed_request, s.created_at
    FROM settlements s LEFT JOIN outcomes o ON o.seq = s.seq";

/// Rows of a reconciliation: the tables joined, and which rows of them.
type Rows = (&'static str, &'static str);

/// The settlements an institution made on a day (settled then, reversed since or not).
const DAY_SETTLED: Rows = (
    "FROM settlements s JOIN outcomes o ON o.seq = s.seq",
    "WHERE s.institution = ?1 AND s.day = ?2 AND o.state IN ('settled', 'reversed')",
);

/// The reversals an institution made on a day, whatever day their settlements were: found
/// from the day's reversals (`CROSS JOIN` keeps that order; left to choose, SQLite walked every
/// settlement the institution ever made).
const DAY_REVERSED: Rows =
    ("FROM outcomes o CROSS JOIN settlements s ON s.seq = o.seq", "WHERE o.reversed_day = ?2 AND s.institution = ?1");

/// Totals per insurance type and clearing type.
fn type_sums(
    conn: &Connection,
    institution: &str,
    date: &str,
    (from, filter): Rows,
) -> rusqlite::Result<super::TypeSums> {
    let sql = format!(
        "SELECT s.insurance_type, s.clearing_type, count(*), sum(s.total_fen), sum(o.fund_fen), sum(o.account_fen),
             sum(o.cash_fen), sum(CASE WHEN s.delegated THEN o.account_fen ELSE 0 END) {from} {filter} GROUP BY 1, 2"
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map(params![institution, date], |r| {
        let totals = super::Totals {
            count: r.get::<_, i64>(2)? as u64,
            total_fen: r.get(3)?,
            fund_pay_fen: r.get(4)?,
            account_pay_fen: r.get(5)?,
            cash_pay_fen: r.get(6)?,
            mutual_aid_pay_fen: r.get(7)?,
        };
        Ok(((r.get(0)?, r.get(1)?), totals))
    })?;
    rows.collect()
}

/// Per payer: count, fund and account over the settlements (or reversals) of `join`.
fn payer_sums(
    conn: &Connection,
    institution: &str,
    date: &str,
    (from, filter): Rows,
) -> rusqlite::Result<super::PayerSums> {
    let sql = format!(
        "SELECT p.value ->> 0, count(*), sum(p.value ->> 1), sum(p.value ->> 2) {from}, json_each(o.payers) p
         {filter} GROUP BY 1"
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement.query_map(params![institution, date], |r| {
        Ok((r.get::<_, String>(0)?, (r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?)))
    })?;
    rows.collect()
}

fn reconcile(
    conn: &Connection,
    institution: &str,
    date: &str,
    page: u32,
    page_size: u32,
) -> rusqlite::Result<super::Reconciliation> {
    let (settled, reversed, by_type) = super::by_type(
        &type_sums(conn, institution, date, DAY_SETTLED)?,
        &type_sums(conn, institution, date, DAY_REVERSED)?,
    );
    let gross = payer_sums(conn, institution, date, DAY_SETTLED)?;
    let back = payer_sums(conn, institution, date, DAY_REVERSED)?;
    let (net, payers) = super::net_and_payers(&settled, &reversed, &gross, back);
    let details = day_details(conn, institution, date, page, page_size)?;
    Ok(super::Reconciliation {
        date: date.to_owned(),
        detail_count: settled.count + reversed.count,
        settled,
        reversed,
        net,
        payers,
        details,
        page,
        page_size,
        by_type,
        closed_at: None,
    })
}

/// One page of the day's events in the order they happened: its settlements, then its
/// reversals.
fn day_details(
    conn: &Connection,
    institution: &str,
    date: &str,
    page: u32,
    page_size: u32,
) -> rusqlite::Result<Vec<super::DetailLine>> {
    let mut details = conn.prepare_cached(&format!(
        "SELECT * FROM (
             SELECT 'settled' AS event, s.seq AS seq, s.created_at AS at, s.id, o.state, s.terminal, s.card_masked,
                 s.total_fen, o.fund_fen, o.account_fen, o.cash_fen, s.insurance_type, s.clearing_type {} {}
             UNION ALL
             SELECT 'reversed', s.seq, o.updated_at, s.id, o.state, s.terminal, s.card_masked, s.total_fen,
                 o.fund_fen, o.account_fen, o.cash_fen, s.insurance_type, s.clearing_type {} {})
         ORDER BY at, seq, event DESC LIMIT ?3 OFFSET ?4",
        DAY_SETTLED.0, DAY_SETTLED.1, DAY_REVERSED.0, DAY_REVERSED.1
    ))?;
    let offset = i64::from(page.saturating_sub(1)) * i64::from(page_size);
    details
        .query_map(params![institution, date, page_size, offset], |r| {
            let at: i64 = r.get(2)?;
            Ok(super::DetailLine {
                event: r.get(0)?,
                settlement_id: r.get(3)?,
                state: r.get(4)?,
                terminal_id: r.get(5)?,
                card: r.get(6)?,
                created_at: super::rfc3339(at),
                total_fen: r.get(7)?,
                fund_pay_fen: r.get(8)?,
                account_pay_fen: r.get(9)?,
                cash_pay_fen: r.get(10)?,
                insurance_type: r.get(11)?,
                clearing_type: r.get(12)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()
}

const ENCOUNTER_SELECT: &str = "SELECT id, institution, idempotency_key, request_hash, token_id, card_hash,
    created_at, version, sealed FROM encounters";

fn encounter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<super::StoredEncounter> {
    Ok(super::StoredEncounter {
        id: r.get(0)?,
        institution: r.get(1)?,
        idempotency_key: r.get(2)?,
        request_hash: r.get(3)?,
        token_id: r.get(4)?,
        card_hash: r.get(5)?,
        created_at: r.get(6)?,
        version: r.get(7)?,
        sealed: r.get(8)?,
    })
}

/// Inserts an encounter and spends its token (under the encounter's seq, negated).
fn insert_encounter(conn: &Connection, e: &super::StoredEncounter) -> Result<(), LedgerError> {
    conn.prepare_cached(
        "INSERT INTO encounters (id, institution, idempotency_key, request_hash, token_id, card_hash, created_at,
             version, sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        e.id,
        e.institution,
        e.idempotency_key,
        e.request_hash,
        e.token_id,
        e.card_hash,
        e.created_at,
        e.version,
        e.sealed
    ])
    .map_err(taken)?;
    if let Some(token_id) = &e.token_id {
        let seq = -conn.last_insert_rowid();
        conn.prepare_cached("INSERT INTO used_tokens (token_id, seq) VALUES (?1, ?2)")?
            .execute(params![token_id, seq])
            .map_err(taken)?;
    }
    Ok(())
}

fn closed_day(conn: &Connection, institution: &str, date: &str) -> rusqlite::Result<Option<super::ClosedDay>> {
    conn.prepare_cached("SELECT closed_at, totals FROM closed_days WHERE institution = ?1 AND day = ?2")?
        .query_row(params![institution, date], |r| Ok(super::ClosedDay { closed_at: r.get(0)?, totals: r.get(1)? }))
        .optional()
}

/// Maps a unique-constraint failure to what was taken.
fn taken(e: rusqlite::Error) -> LedgerError {
    match &e {
        rusqlite::Error::SqliteFailure(failure, Some(message))
            if failure.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            if message.contains("used_tokens") {
                LedgerError::TokenUsed
            } else if message.contains("used_quotes") {
                LedgerError::QuoteUsed
            } else if message.contains("idempotency_key") {
                LedgerError::IdempotencyTaken
            } else {
                storage(e)
            }
        }
        _ => storage(e),
    }
}

/// Records an intent that is pending until its outcome comes ([`finish_outcome`]).
fn begin_intent(conn: &Connection, i: &Intent) -> Result<(), LedgerError> {
    let seq = insert_intent(conn, i)?;
    conn.prepare_cached("INSERT INTO pending (seq) VALUES (?1)")?.execute(params![seq])?;
    Ok(())
}

/// The intent's row, its token and quote marked used; answers its seq.
fn insert_intent(conn: &Connection, i: &Intent) -> Result<i64, LedgerError> {
    conn.prepare_cached(
        "INSERT INTO settlements (id, institution, terminal, idempotency_key, request_hash, token_id, quote_id,
             card_hash, card_masked, total_fen, day, created_at, sealed_request, insurance_type, clearing_type,
             delegated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
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
        super::business_day(i.created_at),
        i.created_at,
        i.sealed_request,
        i.insurance_type,
        i.clearing_type,
        i.delegated,
    ])
    .map_err(taken)?;
    let seq = conn.last_insert_rowid();
    if let Some(token_id) = &i.token_id {
        conn.prepare_cached("INSERT INTO used_tokens (token_id, seq) VALUES (?1, ?2)")?
            .execute(params![token_id, seq])
            .map_err(taken)?;
    }
    if let Some(quote_id) = &i.quote_id {
        conn.prepare_cached("INSERT INTO used_quotes (quote_id, seq) VALUES (?1, ?2)")?
            .execute(params![quote_id, seq])
            .map_err(taken)?;
    }
    Ok(seq)
}

/// What an outcome is recorded against: the intent's seq, token, quote, and the state it has
/// so far (`None`: pending).
type Found = (i64, Option<Vec<u8>>, Option<String>, Option<String>);

/// Records an outcome: the intent must be pending, or unknown (a retry completing it).
fn finish_outcome(conn: &Connection, o: &Outcome, deltas: &str, payers: &str) -> Result<(), LedgerError> {
    let found: Option<Found> = conn
        .prepare_cached(
            "SELECT s.seq, s.token_id, s.quote_id, o.state FROM settlements s LEFT JOIN outcomes o ON o.seq = s.seq
             WHERE s.id = ?1",
        )?
        .query_row(params![o.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some(found) = found else { return Err(LedgerError::NotFound) };
    write_outcome(conn, o, deltas, payers, found, true)
}

/// [`finish_outcome`] once the intent is found; `listed`: the intent is in `pending` (an
/// intent recorded in the same commit as its outcome never is).
fn write_outcome(
    conn: &Connection,
    o: &Outcome,
    deltas: &str,
    payers: &str,
    (seq, token_id, quote_id, state): Found,
    listed: bool,
) -> Result<(), LedgerError> {
    let amounts = o.amounts.as_ref();
    let values = params![
        seq,
        o.state.as_str(),
        o.status,
        o.body,
        deltas,
        payers,
        amounts.map_or(0, |a| a.fund_fen),
        amounts.map_or(0, |a| a.account_fen),
        amounts.map_or(0, |a| a.cash_fen),
        o.at
    ];
    match state.as_deref() {
        None => {
            conn.prepare_cached(
                "INSERT INTO outcomes (seq, state, status, body, deltas, payers, fund_fen, account_fen, cash_fen,
                     updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?
            .execute(values)?;
            if listed {
                conn.prepare_cached("DELETE FROM pending WHERE seq = ?1")?.execute(params![seq])?;
            }
        }
        Some("unknown") => {
            conn.prepare_cached(
                "UPDATE outcomes SET state = ?2, status = ?3, body = ?4, deltas = ?5, payers = ?6, fund_fen = ?7,
                     account_fen = ?8, cash_fen = ?9, updated_at = ?10 WHERE seq = ?1",
            )?
            .execute(values)?;
        }
        Some(_) => return Err(LedgerError::NotFound),
    }
    // A refused settlement gives its token (or quote) back: the patient may try again.
    if o.state != State::Settled && o.state != State::Unknown {
        if let Some(token_id) = token_id {
            conn.prepare_cached("DELETE FROM used_tokens WHERE token_id = ?1")?.execute(params![token_id])?;
        }
        if let Some(quote_id) = quote_id {
            conn.prepare_cached("DELETE FROM used_quotes WHERE quote_id = ?1")?.execute(params![quote_id])?;
        }
    }
    let read = if o.state == State::Settled { &o.read[..] } else { &[] };
    add_accumulators(conn, &o.card_hash, &o.deltas, read)
}

impl Ledger for SqliteLedger {
    super::reads_now!();
    fn begin(&self, intent: Intent) -> LedgerFuture<'_, ()> {
        self.write(move |c| begin_intent(c, &intent))
    }

    fn record(&self, intent: Intent, o: Outcome) -> LedgerFuture<'_, ()> {
        let (deltas, payers) = o.encoded();
        // One job, one savepoint: a refusal of either part undoes both. The outcome is the
        // intent's (as in the other engines): it is neither looked up again nor listed as pending.
        self.write(move |c| {
            let seq = insert_intent(c, &intent)?;
            let found = (seq, intent.token_id.clone(), intent.quote_id.clone(), None);
            write_outcome(c, &o, &deltas, &payers, found, false)
        })
    }

    fn finish(&self, o: Outcome) -> LedgerFuture<'_, ()> {
        let (deltas, payers) = o.encoded();
        self.write(move |c| finish_outcome(c, &o, &deltas, &payers))
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
                .prepare_cached(
                    "UPDATE outcomes SET state = 'reversed', reversal = ?2, updated_at = ?3, reversed_day = ?4
                     WHERE seq = (SELECT seq FROM settlements WHERE id = ?1) AND state = 'settled'",
                )?
                .execute(params![id, body, at, super::business_day(at)])
                .map_err(storage)?;
            if changed != 1 {
                return Err(LedgerError::NotFound);
            }
            add_accumulators(c, &card_hash, &deltas, &[])
        })
    }

    fn close_day<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        closed: super::ClosedDay,
    ) -> LedgerFuture<'a, super::ClosedDay> {
        let (institution, date) = (institution.to_owned(), date.to_owned());
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO closed_days (institution, day, closed_at, totals) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (institution, day) DO NOTHING",
            )?
            .execute(params![institution, date, closed.closed_at, closed.totals])
            .map_err(storage)?;
            closed_day(c, &institution, &date)?.ok_or(LedgerError::NotFound)
        })
    }

    fn open_encounter(&self, encounter: super::StoredEncounter) -> LedgerFuture<'_, ()> {
        self.write(move |c| insert_encounter(c, &encounter))
    }

    fn update_encounter(&self, e: super::StoredEncounter) -> LedgerFuture<'_, ()> {
        self.write(move |c| {
            let changed = c
                .prepare_cached("UPDATE encounters SET version = ?2, sealed = ?3 WHERE id = ?1 AND version = ?2 - 1")?
                .execute(params![e.id, e.version, e.sealed])
                .map_err(storage)?;
            if changed == 1 { Ok(()) } else { Err(LedgerError::Stale) }
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

    fn probe(&self) -> LedgerFuture<'_, ()> {
        if !self.wal.failing.load(Ordering::Relaxed) {
            return Box::pin(async { Ok(()) });
        }
        self.write(|c| {
            run_cached(c, "CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at INTEGER NOT NULL)")?;
            c.prepare_cached("INSERT OR REPLACE INTO probe (id, at) VALUES (1, unixepoch())")?.execute([])?;
            Ok(())
        })
    }
}

impl super::ReadsNow for SqliteLedger {
    fn by_idempotency_key(&self, institution: &str, key: &str) -> Result<Option<Record>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(&format!("{RECORD_SELECT} WHERE s.institution = ?1 AND s.idempotency_key = ?2"))?
                .query_row(params![institution, key], record)
                .optional()
        })
    }

    fn get(&self, institution: &str, id: &str) -> Result<Option<Record>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(&format!("{RECORD_SELECT} WHERE s.id = ?2 AND s.institution = ?1"))?
                .query_row(params![institution, id], record)
                .optional()
        })
    }

    fn year_to_date(&self, card_hash: &[u8], year: i32, payers: &[&str]) -> Result<Vec<YearToDate>, LedgerError> {
        let mut found: Vec<YearToDate> = payers.iter().map(|_| YearToDate { year, ..YearToDate::default() }).collect();
        self.read(|c| {
            let mut statement = c.prepare_cached(
                "SELECT payer, deductible_fen, fund_paid_fen, eligible_fen, account_paid_fen, eligible_self_pay_fen,
                     outpatient_fund_paid_fen FROM accumulators WHERE card_hash = ?1 AND year = ?2",
            )?;
            let mut rows = statement.query(params![card_hash, year])?;
            while let Some(r) = rows.next()? {
                let payer = r.get_ref(0)?.as_str().unwrap_or_default();
                if let Some(slot) = payers.iter().position(|p| *p == payer) {
                    found[slot] = YearToDate {
                        year,
                        deductible_fen: r.get(1)?,
                        fund_paid_fen: r.get(2)?,
                        eligible_fen: r.get(3)?,
                        account_paid_fen: r.get(4)?,
                        eligible_self_pay_fen: r.get(5)?,
                        outpatient_fund_paid_fen: r.get(6)?,
                    };
                }
            }
            Ok(())
        })?;
        Ok(found)
    }

    fn quote(&self, institution: &str, id: &str) -> Result<Option<StoredQuote>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT q.id, q.institution, q.expires_at, q.sealed, s.id FROM quotes q
                 LEFT JOIN used_quotes u ON u.quote_id = q.id LEFT JOIN settlements s ON s.seq = u.seq
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
            let mut statement = c.prepare(&format!(
                "{UNRESOLVED_SELECT} WHERE s.seq IN (SELECT seq FROM pending
                     UNION ALL SELECT seq FROM outcomes WHERE state = 'unknown')
                 ORDER BY s.created_at, s.seq"
            ))?;
            statement.query_map([], unresolved_row)?.collect()
        })
    }

    fn sealed_request(&self, institution: &str, id: &str) -> Result<Option<super::Unresolved>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(&format!("{UNRESOLVED_SELECT} WHERE s.id = ?2 AND s.institution = ?1"))?
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

    fn day_details(
        &self,
        institution: &str,
        date: &str,
        page: u32,
        page_size: u32,
    ) -> Result<Vec<super::DetailLine>, LedgerError> {
        self.read(|c| day_details(c, institution, date, page, page_size))
    }

    fn closed_day(&self, institution: &str, date: &str) -> Result<Option<super::ClosedDay>, LedgerError> {
        self.read(|c| closed_day(c, institution, date))
    }

    fn encounter(&self, institution: &str, id: &str) -> Result<Option<super::StoredEncounter>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(&format!("{ENCOUNTER_SELECT} WHERE institution = ?1 AND id = ?2"))?
                .query_row(params![institution, id], encounter_row)
                .optional()
        })
    }

    fn encounter_by_key(&self, institution: &str, key: &str) -> Result<Option<super::StoredEncounter>, LedgerError> {
        self.read(|c| {
            c.prepare_cached(&format!("{ENCOUNTER_SELECT} WHERE institution = ?1 AND idempotency_key = ?2"))?
                .query_row(params![institution, key], encounter_row)
                .optional()
        })
    }

    fn list(&self, q: &super::ListQuery) -> Result<Vec<super::Listed>, LedgerError> {
        let one_day = q.days.0 == q.days.1;
        self.read(|c| {
            let mut statement = c.prepare_cached(&listing(one_day))?;
            let state = q.state.map(State::as_str);
            let after = q.after.first().map_or(0, |&seq| i64::try_from(seq).unwrap_or(i64::MAX));
            let rows = statement.query_map(
                params![q.institution, q.days.0, q.days.1, after, q.from, q.to, q.terminal, state, q.limit],
                |r| {
                    let settled = |state: &str| matches!(state, "settled" | "reversed" | "failed");
                    let state: String = r.get(2)?;
                    let amount = |i: usize| -> rusqlite::Result<Option<i64>> {
                        Ok(if settled(&state) { r.get(i)? } else { None })
                    };
                    Ok(super::Listed {
                        position: vec![u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0)],
                        settlement_id: r.get(1)?,
                        terminal_id: r.get(3)?,
                        card: r.get(4)?,
                        created_at: super::rfc3339(r.get(5)?),
                        total_fen: r.get(6)?,
                        fund_pay_fen: amount(7)?,
                        account_pay_fen: amount(8)?,
                        cash_pay_fen: amount(9)?,
                        state,
                    })
                },
            )?;
            rows.collect()
        })
    }

    fn settled_deltas(&self, id: &str) -> Result<Option<SettledDeltas>, LedgerError> {
        let row: Option<(Vec<u8>, String)> = self.read(|c| {
            c.prepare_cached(
                "SELECT s.card_hash, o.deltas FROM settlements s JOIN outcomes o ON o.seq = s.seq WHERE s.id = ?1",
            )?
            .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })?;
        let Some((card_hash, json)) = row else { return Ok(None) };
        let deltas = serde_json::from_str(&json).map_err(storage)?;
        Ok(Some((card_hash, deltas)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The steps of `sql`'s plan on a new ledger (schema and indexes as the gateway makes
    /// them), given `values`.
    fn plan(sql: &str, values: impl rusqlite::Params) -> Vec<String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.db");
        drop(SqliteLedger::open(&path).expect("create"));
        let conn = open(&path).expect("open");
        conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .and_then(|mut s| s.query_map(values, |r| r.get::<_, String>(3))?.collect())
            .expect("plan")
    }

    /// Moving a ledger reads each settlement once: its held token and quote are found by
    /// their keys, not by scanning those tables for each settlement.
    #[test]
    fn the_dump_finds_held_tokens_and_quotes_by_their_keys() {
        let plan = plan(DUMP_SETTLEMENTS, []);
        for table in ["u", "q"] {
            assert!(plan.iter().any(|step| step.starts_with(&format!("SEARCH {table} USING PRIMARY KEY"))), "{plan:?}");
            assert!(!plan.iter().any(|step| step.starts_with(&format!("SCAN {table}"))), "{plan:?}");
        }
    }

    /// A day's listing reads that day's settlements from the cursor on, in the index's order:
    /// nothing sorted, a page as long as its rows.
    #[test]
    fn a_days_listing_walks_its_index_from_the_cursor() {
        let (none, day) = (None::<i64>, "2026-12-01");
        let plan = plan(&listing(true), params!["H1", day, day, 0, none, none, none, none, 100]);
        assert!(plan[0].contains("settlements_by_day (institution=? AND day=? AND rowid>?)"), "{plan:?}");
        assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "{plan:?}");
    }

    /// A day's reversals are read from the index of reversal days, whatever else the
    /// institution settled: the sums and the details alike.
    #[test]
    fn a_days_reversals_are_found_from_that_day() {
        let (from, filter) = DAY_REVERSED;
        for query in [
            format!("SELECT s.insurance_type, count(*) {from} {filter} GROUP BY 1"),
            format!("SELECT p.value ->> 0, count(*) {from}, json_each(o.payers) p {filter} GROUP BY 1"),
            format!("SELECT s.id, o.updated_at {from} {filter}"),
        ] {
            let plan = plan(&query, params!["H1", "2026-12-01"]);
            let first = &plan[0];
            assert!(first.starts_with("SEARCH o ") && first.contains("outcomes_by_reversed_day"), "{query}: {plan:?}");
            assert!(
                plan.iter().any(|step| step.starts_with("SEARCH s USING INTEGER PRIMARY KEY")),
                "{query}: {plan:?}"
            );
        }
    }
}
