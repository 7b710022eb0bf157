//! The embedded ledger on a log-structured engine ([fjall]), sharded by card (issue #15;
//! `engine = "lsm"`).
//!
//! Why (docs/decisions/0001-ledger-write-path.md): with SQLite every settlement dirtied about
//! a dozen 4 KiB B-tree pages on its single writer thread, 50 µs of work that ran one at a
//! time. Here a settlement is a few key-value entries appended to one journal and a memtable;
//! what runs one at a time is only that append.
//!
//! # How a write runs
//! - **On the caller's thread**, in parallel with other callers: every read a write depends on
//!   (is the token used? the idempotency key? what do the card's accumulators hold? is the
//!   settlement still pending?) and the encoding of every value. The write is then a list of
//!   entries ([`Op`]) and the *stripes* it read under: each unique thing it checked (a token,
//!   a key, a card, a settlement id) hashes to one of [`STRIPES`] version counters, read before
//!   the reads.
//! - **On the writer thread**, one write at a time: if none of its stripes' versions moved, its
//!   reads still hold and its entries go into the group's batch as they are; if one moved (a
//!   write on the same token, key, card or settlement committed meanwhile), the writer redoes
//!   the reads itself before deciding. This is optimistic concurrency control; a conflict
//!   costs a re-read, never a wrong answer.
//! - **Group commit**: the writer appends every write that arrived while it was busy as one
//!   batch, makes the journal durable (`fsync`) once, and only then answers each caller:
//!   acknowledged means durable. A read that finds an entry not yet durable (committed to the
//!   memtable, its fsync still running) waits for that fsync before answering, so no client
//!   is ever shown what a crash could take back.
//!
//! One process owns a ledger: the engine locks its directory, and a second gateway on the same
//! ledger refuses to start (the per-stripe checks are in this process's memory).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cardgate_sdk::YearToDate;
use crossbeam_channel::{Receiver, Sender};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode};

use super::{
    AccumulatorDelta, Intent, Ledger, LedgerError, LedgerFuture, Listed, Outcome, Reconciliation, Record,
    SettledDeltas, State, StoredQuote, Unresolved,
};

/// The on-disk format this code writes (key `format` of the `meta` keyspace).
const FORMAT: u64 = 1;

/// Version counters the writer checks reads against. More stripes, fewer false conflicts.
const STRIPES: usize = 4096;

/// The `meta` key holding the next seq (written with every group that assigns seqs).
const NEXT_SEQ: &str = "next_seq";

/// Every shard's writer thread has this name (the load harness sums their CPU).
pub const WRITER_THREAD: &str = "cardgate-ledger";

/// Every shard's memtable keeper has this name ([`keep_memtables`]; the load harness counts its
/// CPU with the engine's background threads).
pub const KEEPER_THREAD: &str = "cardgate-keeper";

/// How often the keeper looks for new memtables and frees the ones only it still holds. A
/// memtable is active for far longer (a settlements memtable holds ~3,600 settlements, more
/// than a shard's writer commits in 50 ms), and a flushed one is kept at most this much
/// longer; an idle gateway wakes the keeper 20 times a second.
const KEEPER_TICK: Duration = Duration::from_millis(50);

/// What a ledger already open elsewhere is refused with.
pub const LOCKED: &str = "the ledger is open in another process";

/// Most writes committed together.
const MAX_GROUP: usize = 512;

/// The longest a read waits for the fsync of what it found (then: a storage error).
const DURABLE_WAIT: Duration = Duration::from_secs(10);

/// The keyspaces, by index into [`Store::spaces`].
#[derive(Debug, Clone, Copy)]
enum Space {
    /// settlement id -> its seq (u64 BE) and the settlement ([`Row`]).
    Settlements = 0,
    /// institution \0 idempotency key -> settlement id.
    Keys,
    /// token id -> settlement id: a token settles once, forever (released by a refused
    /// settlement).
    Tokens,
    /// quote id -> the id of the settlement that consumed it.
    UsedQuotes,
    /// quote id -> the stored quote.
    Quotes,
    /// card hash ‖ year (i32 BE) -> each payer's year-to-date figures (one entry for all the
    /// payers of a card's year: one write per settlement, one read).
    Accumulators,
    /// seq -> settlement id: settlements still pending or unknown.
    Open,
    /// institution \0 day \0 seq -> settlement id: the settlements made on a business day.
    Days,
    /// institution \0 day \0 seq -> settlement id: the reversals made on a business day.
    ReversalDays,
    /// Small facts about the ledger itself: its format, the next seq.
    Meta,
    /// encounter id -> the encounter ([`encounter_bytes`]), in its card's shard; its
    /// registration key is in [`Space::Keys`] ([`encounter_key`]), its token in
    /// [`Space::Tokens`].
    Encounters,
}

const SPACE_NAMES: [&str; 11] = [
    "settlements",
    "idempotency_keys",
    "tokens",
    "used_quotes",
    "quotes",
    "accumulators",
    "open",
    "days",
    "reversal_days",
    "meta",
    "encounters",
];

/// The engine and its keyspaces.
struct Store {
    db: Database,
    spaces: Vec<Keyspace>,
}

impl Store {
    fn space(&self, s: Space) -> &Keyspace {
        &self.spaces[s as usize]
    }

    fn get(&self, s: Space, key: &[u8]) -> Result<Option<fjall::Slice>, LedgerError> {
        self.space(s).get(key).map_err(storage)
    }

    /// The settlement an index entry names (its value is the settlement's id).
    fn row_via(&self, s: Space, key: &[u8]) -> Result<Option<(u64, Row)>, LedgerError> {
        let Some(id) = self.get(s, key)? else { return Ok(None) };
        self.row_by_id_bytes(&id)
    }

    fn row_by_id(&self, id: &str) -> Result<Option<(u64, Row)>, LedgerError> {
        self.row_by_id_bytes(id.as_bytes())
    }

    fn row_by_id_bytes(&self, id: &[u8]) -> Result<Option<(u64, Row)>, LedgerError> {
        self.decode_row(id, Row::decode)
    }

    fn decode_row(&self, id: &[u8], decode: fn(&[u8]) -> Option<Row>) -> Result<Option<(u64, Row)>, LedgerError> {
        let Some(bytes) = self.get(Space::Settlements, id)? else { return Ok(None) };
        let decoded =
            bytes.split_first_chunk::<8>().and_then(|(seq, row)| Some((u64::from_be_bytes(*seq), decode(row)?)));
        decoded.map(Some).ok_or_else(|| storage("a settlement entry does not decode"))
    }

    /// The settlements an index lists (`prefix`, or a key range), with their seqs.
    fn rows_of(&self, guards: fjall::Iter) -> Result<Vec<(u64, Row)>, LedgerError> {
        let mut rows = Vec::new();
        self.each_row(guards, Row::decode, |seq, row| rows.push((seq, row)))?;
        Ok(rows)
    }

    /// Each settlement an index lists, decoded by `decode`, handed to `f` one at a time.
    fn each_row(
        &self,
        guards: fjall::Iter,
        decode: fn(&[u8]) -> Option<Row>,
        mut f: impl FnMut(u64, Row),
    ) -> Result<(), LedgerError> {
        for guard in guards {
            let (_, id) = guard.into_inner().map_err(storage)?;
            if let Some((seq, row)) = self.decode_row(&id, decode)? {
                f(seq, row);
            }
        }
        Ok(())
    }
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// One entry of a write. Keys and values that hold the new settlement's seq name it with
/// [`Part::Seq`]: the writer assigns seqs, in commit order, so a listing's cursor never
/// skips a settlement that committed late.
#[derive(Debug, Clone)]
enum Op {
    Put(Space, Vec<Part>, Vec<Part>),
    Remove(Space, Vec<u8>),
}

#[derive(Debug, Clone)]
enum Part {
    Bytes(Vec<u8>),
    Seq,
}

/// The bytes of `parts` with `seq` in place: the single part itself when it is all there is,
/// else assembled in `buffer` (the writer's own, reused: nothing allocated per entry).
fn assemble<'a>(parts: &'a [Part], seq: u64, buffer: &'a mut Vec<u8>) -> &'a [u8] {
    if let [Part::Bytes(only)] = parts {
        return only;
    }
    buffer.clear();
    for part in parts {
        match part {
            Part::Bytes(b) => buffer.extend_from_slice(b),
            Part::Seq => buffer.extend_from_slice(&seq.to_be_bytes()),
        }
    }
    buffer
}

fn bytes(b: impl Into<Vec<u8>>) -> Vec<Part> {
    vec![Part::Bytes(b.into())]
}

/// What a write decided: its entries, whether it creates a settlement (needs a seq).
#[derive(Debug, Default)]
struct Plan {
    ops: Vec<Op>,
    new_settlement: bool,
}

type Prepare = Box<dyn Fn(&Store) -> Result<Plan, LedgerError> + Send>;

/// A write on its way to the writer.
struct Job {
    /// Stripes read under, with the versions seen before reading.
    stripes: Vec<(usize, u64)>,
    /// The engine's epoch ([`Slot::epoch`]) the plan was made in.
    epoch: u64,
    /// What the caller decided on its reads.
    planned: Result<Plan, LedgerError>,
    /// The same decision, redone by the writer when a stripe moved.
    prepare: Prepare,
    reply: tokio::sync::oneshot::Sender<(Result<(), LedgerError>, Leftovers)>,
}

/// What a write brought to the writer (its plan, its closure and what that holds), sent back
/// with the answer for the caller's thread to free: memory freed on the thread that allocated
/// it is cheap, freed on another it is not, and the writer's time is the one to spare.
type Leftovers = Box<dyn std::any::Any + Send>;

/// Durability, as the writer publishes it for readers.
#[derive(Debug, Default)]
struct Durable {
    /// Groups that may be visible to reads: raised before a group's first entry reaches the
    /// memtable (lowered again if none of it did).
    applied: AtomicU64,
    /// Groups whose fsync returned.
    synced: Mutex<u64>,
    changed: Condvar,
    /// The last group's commit or fsync failed (the engine refuses writes after that).
    failing: AtomicBool,
}

impl Durable {
    /// Waits until every group applied before `seen` is durable.
    fn wait(&self, seen: u64) -> Result<(), LedgerError> {
        let synced = self.synced.lock().map_err(storage)?;
        let (synced, timeout) = self
            .changed
            .wait_timeout_while(synced, DURABLE_WAIT, |synced| *synced < seen && !self.failing.load(Ordering::Relaxed))
            .map_err(storage)?;
        if *synced < seen {
            let why =
                if timeout.timed_out() { "timed out waiting for the journal's fsync" } else { "the journal failed" };
            return Err(LedgerError::Storage(why.into()));
        }
        Ok(())
    }
}

/// One shard: an engine of its own (its journal, its writer) for the cards that hash to it.
struct Shard {
    slot: Arc<Slot>,
    versions: Arc<[AtomicU64]>,
    durable: Arc<Durable>,
    /// Taken on drop: closing the channel stops the writer, which commits what it holds.
    jobs: Option<Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Taken on drop: closing the channel stops the memtable keeper.
    keeping: Option<Sender<()>>,
    keeper: Option<std::thread::JoinHandle<()>>,
    /// Memtables the keeper freed.
    #[cfg_attr(not(test), expect(dead_code, reason = "what the tests watch the keeper by"))]
    freed: Arc<AtomicU64>,
}

impl Drop for Shard {
    /// Stops the writer and waits for it, so the engine (and its directory lock) is released
    /// when this returns: the ledger can be opened again at once.
    fn drop(&mut self) {
        drop(self.keeping.take());
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl std::fmt::Debug for LsmLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LsmLedger")
            .field("path", &self.path)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// Which stripe a unique thing falls in.
fn stripe(kind: u8, key: &[u8]) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    kind.hash(&mut hasher);
    key.hash(&mut hasher);
    (hasher.finish() as usize) % STRIPES
}

impl Store {
    /// Opens the engine at `path`; answers it and the next settlement's seq.
    fn open(path: &Path, tuning: Tuning) -> Result<(Self, u64), LedgerError> {
        let db = Database::builder(path)
            .cache_size(tuning.cache_bytes)
            .max_cached_files(Some(tuning.open_files))
            // One flush and compaction thread a shard. With two, fjall's first worker hands
            // every compaction request back to the queue (to stay free for flushes) and takes it
            // again at once, a busy loop for as long as the other worker is busy: ~4% of the
            // process's CPU under load on 2 cores (docs/BENCHMARKS.md, sixteenth round;
            // docs/upstream/fjall-worker-compaction-spin.md).
            .worker_threads(1)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => {
                    LedgerError::Storage(format!("{}: {LOCKED} (one gateway per embedded ledger)", path.display()))
                }
                e => LedgerError::Storage(format!("{}: {e}", path.display())),
            })?;
        let spaces = SPACE_NAMES
            .iter()
            .enumerate()
            .map(|(n, name)| {
                // The settlements' entries are large; the indexes' small.
                let settlements = n == Space::Settlements as usize;
                let memtable = if settlements { tuning.settlements_memtable } else { tuning.index_memtable };
                db.keyspace(name, || {
                    let options = KeyspaceCreateOptions::default().max_memtable_size(memtable.max(1 << 20));
                    // A settlement (~5 KiB) goes to a blob file once, at flush, and its table
                    // keeps a pointer: compactions move pointers, not settlements (a third of
                    // the engine's background CPU, docs/BENCHMARKS.md). Fixed at creation: a
                    // keyspace made without it keeps its own settings.
                    if settlements { options.with_kv_separation(Some(KvSeparationOptions::default())) } else { options }
                })
                .map_err(storage)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let store = Self { db, spaces };
        let meta = store.space(Space::Meta);
        match meta.get("format").map_err(storage)? {
            None => {
                meta.insert("format", FORMAT.to_be_bytes()).map_err(storage)?;
                store.db.persist(PersistMode::SyncAll).map_err(storage)?;
            }
            Some(v) if v.as_ref() == FORMAT.to_be_bytes() => {}
            Some(_) => {
                return Err(LedgerError::Storage(format!(
                    "{}: ledger format unknown to this gateway (it writes format {FORMAT})",
                    path.display()
                )));
            }
        }
        let next_seq = match meta.get(NEXT_SEQ).map_err(storage)? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| storage("the next seq does not decode"))?),
            None => 1,
        };
        Ok((store, next_seq))
    }
}

/// The engine as readers and the writer find it: none while the writer reopens it.
#[derive(Default)]
struct Slot {
    store: std::sync::RwLock<Option<Arc<Store>>>,
    /// Bumped at each reopening: plans made on an older engine are made again.
    epoch: AtomicU64,
}

impl Slot {
    fn current(&self) -> Result<Arc<Store>, LedgerError> {
        let store = self.store.read().map_err(storage)?;
        store.clone().ok_or_else(|| LedgerError::Storage("the ledger is being reopened".into()))
    }
}

impl Shard {
    /// Opens (or creates) a shard in the directory `path` (created 0700) and starts its
    /// writer thread. Fails if another process has it open.
    fn open(path: &Path, seqs: &Arc<AtomicU64>, tuning: Tuning) -> Result<Self, LedgerError> {
        create_private_dir(path)?;
        // A gateway restarting while the previous process is still exiting finds the lock
        // held for a moment: wait for it (a little), then say who holds it.
        let mut attempts = 0;
        let (store, next_seq) = loop {
            match Store::open(path, tuning) {
                Err(LedgerError::Storage(message)) if message.contains(LOCKED) && attempts < 20 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                opened => break opened?,
            }
        };
        seqs.fetch_max(next_seq, Ordering::AcqRel);
        let store = Arc::new(store);
        let slot = Arc::new(Slot { store: std::sync::RwLock::new(Some(Arc::clone(&store))), epoch: AtomicU64::new(0) });
        let versions: Arc<[AtomicU64]> = (0..STRIPES).map(|_| AtomicU64::new(0)).collect();
        let durable = Arc::new(Durable::default());
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let writer = Writer {
            store: Some(store),
            slot: Arc::clone(&slot),
            path: path.to_owned(),
            versions: Arc::clone(&versions),
            durable: Arc::clone(&durable),
            seqs: Arc::clone(seqs),
            tuning,
        };
        let writer = std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || writer.run(&queue))
            .map_err(storage)?;
        let (keeping, stop) = crossbeam_channel::bounded::<()>(0);
        let watched = Arc::clone(&slot);
        let freed = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&freed);
        let keeper = std::thread::Builder::new()
            .name(KEEPER_THREAD.into())
            .spawn(move || keep_memtables(&watched, &counted, &stop));
        let mut shard = Self {
            slot,
            versions,
            durable,
            jobs: Some(jobs),
            writer: Some(writer),
            keeping: None,
            keeper: None,
            freed,
        };
        // Without it the engine works as before (its stalls aside): a failed spawn is no reason
        // to refuse the ledger.
        match keeper {
            Ok(keeper) => (shard.keeping, shard.keeper) = (Some(keeping), Some(keeper)),
            Err(e) => tracing::warn!(error = %e, "lsm ledger: memtable keeper not started"),
        }
        Ok(shard)
    }

    /// Runs `prepare` here (reads under the stripes of `keys`), then queues its plan for the
    /// writer and waits for the durable commit.
    fn write(
        &self,
        keys: &[(u8, &[u8])],
        prepare: impl Fn(&Store) -> Result<Plan, LedgerError> + Send + 'static,
    ) -> LedgerFuture<'_, ()> {
        let mut stripes: Vec<usize> = keys.iter().map(|(kind, key)| stripe(*kind, key)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let stripes: Vec<(usize, u64)> =
            stripes.into_iter().map(|s| (s, self.versions[s].load(Ordering::Acquire))).collect();
        let epoch = self.slot.epoch.load(Ordering::Acquire);
        let planned = self.slot.current().and_then(|store| prepare(&store));
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job { stripes, epoch, planned, prepare: Box::new(prepare), reply };
        let sent = match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|_| LedgerError::Storage("ledger writer stopped".into())),
            None => Err(LedgerError::Storage("ledger closed".into())),
        };
        Box::pin(async move {
            sent?;
            let (answer, leftovers) = answer.await.map_err(|_| LedgerError::Storage("ledger writer stopped".into()))?;
            drop(leftovers);
            answer
        })
    }

    /// Reads through `f`; if it found something, waits until what was visible is durable.
    /// The groups that may have been visible are counted after the read: a group is announced
    /// before its entries reach the memtable, so whatever the read saw is counted.
    fn read<T>(&self, f: impl FnOnce(&Store) -> Result<Option<T>, LedgerError>) -> Result<Option<T>, LedgerError> {
        let found = f(&*self.slot.current()?)?;
        if found.is_some() {
            self.durable.wait(self.durable.applied.load(Ordering::Acquire))?;
        }
        Ok(found)
    }
}

/// Holds a reference to every memtable of the shard's engine and frees each once nobody else
/// does, so that its memory is never freed under the engine's locks.
///
/// Why: lsm-tree drops the versions of a keyspace that no reader needs any more while it holds
/// that keyspace's version lock, which every read and every write of the keyspace takes. When
/// a dropped version was the last holder of a flushed memtable, the memtable (thousands of
/// skiplist nodes) was freed right there — milliseconds, and on two busy cores the thread
/// doing it was preempted with the lock held: reads and the writer waited 10-20 ms (a
/// scheduler trace with user stacks, docs/BENCHMARKS.md "Issue #15, ninth round"). Here each
/// memtable is picked up while it is active (it stays active far longer than a tick) and held
/// until this thread's reference is the only one left, then freed on this thread with no lock
/// held. The engine's own lifetimes do not change: a memtable lives at most a tick longer
/// ([`KEEPER_TICK`]).
///
/// Uses the engine's hidden `tree` field (fjall 3.1; the upstream report in
/// docs/upstream/lsm-tree-unlink-under-version-lock.md asks for the drop outside the lock).
fn keep_memtables(slot: &Slot, freed: &AtomicU64, stop: &Receiver<()>) {
    use fjall::AbstractTree;
    let mut held = Vec::new();
    loop {
        if let Ok(store) = slot.current() {
            for space in &store.spaces {
                let memtable = space.tree.active_memtable();
                if !held.iter().any(|h| Arc::ptr_eq(h, &memtable)) {
                    held.push(memtable);
                }
            }
        }
        // Nobody can take a new reference from ours: one alone is the last.
        let before = held.len();
        held.retain(|memtable| Arc::strong_count(memtable) > 1);
        freed.fetch_add((before - held.len()) as u64, Ordering::Relaxed);
        match stop.recv_timeout(KEEPER_TICK) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// Creates the ledger's directory readable by its owner alone.
fn create_private_dir(path: &Path) -> Result<(), LedgerError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) => Err(LedgerError::Storage(format!("{}: {e}", path.display()))),
    }
}

/// The writer thread's state.
struct Writer {
    /// The engine (none after a failed reopening).
    store: Option<Arc<Store>>,
    slot: Arc<Slot>,
    path: PathBuf,
    versions: Arc<[AtomicU64]>,
    durable: Arc<Durable>,
    /// The ledger's seqs, shared by every shard's writer: a settlement's seq orders it among
    /// all shards' (listings, reconciliation), and within its shard it follows commit order.
    seqs: Arc<AtomicU64>,
    tuning: Tuning,
}

impl Writer {
    fn run(mut self, queue: &Receiver<Job>) {
        let mut group_number = 0u64;
        while let Ok(first) = queue.recv() {
            let mut group = vec![first];
            group.extend(queue.try_iter().take(MAX_GROUP - 1));
            if self.durable.failing.load(Ordering::Relaxed) {
                self.recover();
            }
            let Some(store) = self.store.clone() else {
                for job in group {
                    let error = LedgerError::Storage("the ledger could not be reopened".into());
                    let _ = job.reply.send((Err(error), Box::new(())));
                }
                continue;
            };
            let epoch = self.slot.epoch.load(Ordering::Acquire);
            // The highest seq this batch took: written with it, so a reopened ledger goes on
            // after it.
            let mut taken: Option<u64> = None;
            let (started, size) = (std::time::Instant::now(), group.len());
            let mut batch = store.db.batch();
            // Stripes written by this group and not yet applied (their versions not bumped).
            let mut touched: HashSet<usize> = HashSet::new();
            let mut replies = Vec::with_capacity(group.len());
            let mut failed: Option<LedgerError> = None;
            // Announced before any of it can be read; whether any of it reached the memtable.
            let number = group_number + 1;
            self.durable.applied.store(number, Ordering::Release);
            let mut applied = false;
            let (mut keys, mut values) = (Vec::with_capacity(256), Vec::with_capacity(4096));
            for job in group {
                let Job { stripes, epoch: planned_in, planned, prepare, reply } = job;
                let moved = stripes.iter().any(|(s, v)| self.versions[*s].load(Ordering::Acquire) != *v);
                let pending = stripes.iter().any(|(s, _)| touched.contains(s));
                if pending {
                    // An earlier write of this group touched the same thing: apply the group
                    // so far, so the reads redone below see it.
                    let mut full = std::mem::replace(&mut batch, store.db.batch());
                    if let Some(last) = taken.take() {
                        full.insert(store.space(Space::Meta), NEXT_SEQ, (last + 1).to_be_bytes());
                    }
                    match full.commit() {
                        Ok(()) => applied = true,
                        Err(e) => _ = failed.get_or_insert(storage(e)),
                    }
                    self.bump(&mut touched);
                }
                let (plan, unused) = if moved || pending || planned_in != epoch {
                    (prepare(&store), Some(planned))
                } else {
                    (planned, None)
                };
                let answer = match &plan {
                    Ok(plan) => {
                        let seq = if plan.new_settlement {
                            let seq = self.seqs.fetch_add(1, Ordering::AcqRel);
                            taken = Some(seq);
                            seq
                        } else {
                            0
                        };
                        for op in &plan.ops {
                            match op {
                                Op::Put(space, key, value) => batch.insert(
                                    store.space(*space),
                                    assemble(key, seq, &mut keys),
                                    assemble(value, seq, &mut values),
                                ),
                                Op::Remove(space, key) => batch.remove(store.space(*space), key.as_slice()),
                            }
                        }
                        touched.extend(stripes.iter().map(|(s, _)| *s));
                        Ok(())
                    }
                    Err(e) => Err(e.clone()),
                };
                replies.push((reply, answer, Box::new((stripes, plan, unused, prepare)) as Leftovers));
            }
            // The next seq, in the same atomic batch as the settlements that took theirs.
            if let Some(last) = taken {
                batch.insert(store.space(Space::Meta), NEXT_SEQ, (last + 1).to_be_bytes());
            }
            match batch.commit() {
                Ok(()) => applied = true,
                Err(e) => _ = failed.get_or_insert(storage(e)),
            }
            self.bump(&mut touched);
            if applied {
                // Reads that find any of it wait for the fsync below.
                group_number = number;
            } else {
                // Nothing of it can be read: reads need not wait for it (a full disk).
                self.durable.applied.store(group_number, Ordering::Release);
            }
            if failed.is_none()
                && let Err(e) = store.db.persist(PersistMode::SyncData)
            {
                failed = Some(storage(e));
            }
            crate::metrics::ledger_commit(size, started.elapsed());
            match &failed {
                Some(e) if !self.durable.failing.swap(true, Ordering::Relaxed) => {
                    tracing::error!(error = %e, "ledger: commit failed; writes fail until the journal can be written again");
                }
                _ => {}
            }
            if failed.is_none()
                && let Ok(mut synced) = self.durable.synced.lock()
            {
                *synced = group_number;
            }
            self.durable.changed.notify_all();
            for (reply, answer, leftovers) in replies {
                let answer = match &failed {
                    Some(e) if answer.is_ok() => Err(e.clone()),
                    _ => answer,
                };
                let _ = reply.send((answer, leftovers));
            }
        }
    }

    /// After a failed commit the engine refuses every write until it is opened again. Once a
    /// file can be written and synced in the ledger's directory (the disk has space again),
    /// the writer closes the engine and opens it: recovery replays the journal up to its last
    /// whole batch. Reads fail for the moment it takes (the gateway answers 503).
    fn recover(&mut self) {
        let probe = self.path.join(".write-probe");
        let writable = std::fs::File::create(&probe)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"probe").and_then(|()| f.sync_all()));
        let _ = std::fs::remove_file(&probe);
        if writable.is_err() {
            return;
        }
        if let Ok(mut slot) = self.slot.store.write() {
            *slot = None;
        }
        self.store = None;
        for _ in 0..200 {
            match Store::open(&self.path, self.tuning) {
                Ok((store, next_seq)) => {
                    let store = Arc::new(store);
                    self.store = Some(Arc::clone(&store));
                    if let Ok(mut slot) = self.slot.store.write() {
                        *slot = Some(store);
                    }
                    self.seqs.fetch_max(next_seq, Ordering::AcqRel);
                    self.slot.epoch.fetch_add(1, Ordering::AcqRel);
                    self.durable.failing.store(false, Ordering::Relaxed);
                    tracing::info!("ledger: reopened; commits succeed again");
                    return;
                }
                // A reader still holds the old engine for a moment.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        tracing::error!(path = %self.path.display(), "ledger: could not be reopened; writes and reads fail");
    }

    fn bump(&self, touched: &mut HashSet<usize>) {
        for s in touched.drain() {
            self.versions[s].fetch_add(1, Ordering::AcqRel);
        }
    }
}

// --- Rows -----------------------------------------------------------------------------------

/// A settlement as stored: its intent and, once known, its outcome.
#[derive(Debug, Clone, Default)]
struct Row {
    id: String,
    institution: String,
    terminal: String,
    idempotency_key: String,
    request_hash: Vec<u8>,
    token_id: Option<Vec<u8>>,
    quote_id: Option<String>,
    card_hash: Vec<u8>,
    card_masked: String,
    total_fen: i64,
    day: String,
    created_at: i64,
    sealed_request: Vec<u8>,
    state: Option<State>,
    status: u16,
    body: String,
    reversal: Option<String>,
    deltas: String,
    payers: String,
    fund_fen: i64,
    account_fen: i64,
    cash_fen: i64,
    updated_at: i64,
    reversed_day: Option<String>,
    /// Absent (empty) in rows written before they were kept.
    insurance_type: String,
    clearing_type: String,
    delegated: bool,
}

/// Length-prefixed fields, in [`Row`]'s order, after a version byte.
struct Enc(Vec<u8>);

impl Enc {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
    }
    fn opt(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                self.0.push(1);
                self.bytes(b);
            }
            None => self.0.push(0),
        }
    }
    fn int(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n)
    }
    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn opt(&mut self) -> Option<Option<&'a [u8]>> {
        match self.take(1)? {
            [0] => Some(None),
            [1] => Some(Some(self.bytes()?)),
            _ => None,
        }
    }
    fn opt_text(&mut self) -> Option<Option<String>> {
        match self.opt()? {
            Some(b) => Some(Some(String::from_utf8(b.to_vec()).ok()?)),
            None => Some(None),
        }
    }
    fn int(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

const ROW_VERSION: u8 = 1;

impl Row {
    fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(
            256 + self.sealed_request.len() + self.body.len() + self.deltas.len() + self.payers.len(),
        ));
        e.0.push(ROW_VERSION);
        for text in [&self.id, &self.institution, &self.terminal, &self.idempotency_key] {
            e.bytes(text.as_bytes());
        }
        e.bytes(&self.request_hash);
        e.opt(self.token_id.as_deref());
        e.opt(self.quote_id.as_deref().map(str::as_bytes));
        e.bytes(&self.card_hash);
        e.bytes(self.card_masked.as_bytes());
        e.int(self.total_fen);
        e.bytes(self.day.as_bytes());
        e.int(self.created_at);
        e.bytes(&self.sealed_request);
        e.opt(self.state.map(|s| s.as_str().as_bytes()));
        e.int(i64::from(self.status));
        e.bytes(self.body.as_bytes());
        e.opt(self.reversal.as_deref().map(str::as_bytes));
        e.bytes(self.deltas.as_bytes());
        e.bytes(self.payers.as_bytes());
        for v in [self.fund_fen, self.account_fen, self.cash_fen, self.updated_at] {
            e.int(v);
        }
        e.opt(self.reversed_day.as_deref().map(str::as_bytes));
        e.bytes(self.insurance_type.as_bytes());
        e.bytes(self.clearing_type.as_bytes());
        e.0.push(u8::from(self.delegated));
        e.0
    }

    fn decode(b: &[u8]) -> Option<Self> {
        Self::decode_parts(b, true)
    }

    /// The row without its stored request, answer, reversal and deltas, its key, hashes and
    /// token (left empty): what a day's totals and detail lines read of it.
    fn decode_summary(b: &[u8]) -> Option<Self> {
        Self::decode_parts(b, false)
    }

    fn decode_parts(b: &[u8], whole: bool) -> Option<Self> {
        let mut d = Dec(b);
        if d.take(1)? != [ROW_VERSION] {
            return None;
        }
        let bytes = |b: &[u8]| if whole { b.to_vec() } else { Vec::new() };
        let text = |b: &[u8]| if whole { String::from_utf8(b.to_vec()).ok() } else { Some(String::new()) };
        let mut row = Self {
            id: d.text()?,
            institution: d.text()?,
            terminal: d.text()?,
            idempotency_key: text(d.bytes()?)?,
            request_hash: bytes(d.bytes()?),
            token_id: d.opt()?.map(bytes),
            quote_id: d.opt_text()?,
            card_hash: bytes(d.bytes()?),
            card_masked: d.text()?,
            total_fen: d.int()?,
            day: d.text()?,
            created_at: d.int()?,
            sealed_request: bytes(d.bytes()?),
            state: match d.opt_text()? {
                Some(s) => Some(State::parse(&s)?),
                None => None,
            },
            status: u16::try_from(d.int()?).ok()?,
            body: text(d.bytes()?)?,
            reversal: match d.opt()? {
                Some(b) => Some(text(b)?),
                None => None,
            },
            deltas: text(d.bytes()?)?,
            payers: d.text()?,
            fund_fen: d.int()?,
            account_fen: d.int()?,
            cash_fen: d.int()?,
            updated_at: d.int()?,
            reversed_day: d.opt_text()?,
            ..Self::default()
        };
        // Rows written before the types were kept end here.
        if !d.0.is_empty() {
            row.insurance_type = d.text()?;
            row.clearing_type = d.text()?;
            row.delegated = d.take(1)? == [1];
        }
        d.0.is_empty().then_some(row)
    }

    fn state(&self) -> State {
        self.state.unwrap_or(State::Pending)
    }

    fn record(self) -> Record {
        Record {
            state: self.state(),
            id: self.id,
            institution: self.institution,
            request_hash: self.request_hash,
            status: self.status,
            body: self.body,
            reversal: self.reversal,
            created_at: self.created_at,
        }
    }

    fn unresolved(self) -> Unresolved {
        Unresolved {
            state: self.state(),
            id: self.id,
            institution: self.institution,
            sealed_request: self.sealed_request,
            created_at: self.created_at,
        }
    }

    fn from_intent(i: &Intent) -> Self {
        Self {
            id: i.id.clone(),
            institution: i.institution.clone(),
            terminal: i.terminal.clone(),
            idempotency_key: i.idempotency_key.clone(),
            request_hash: i.request_hash.clone(),
            token_id: i.token_id.clone(),
            quote_id: i.quote_id.clone(),
            card_hash: i.card_hash.clone(),
            card_masked: i.card_masked.clone(),
            total_fen: i.total_fen,
            day: super::business_day(i.created_at),
            created_at: i.created_at,
            sealed_request: i.sealed_request.clone(),
            insurance_type: i.insurance_type.clone(),
            clearing_type: i.clearing_type.clone(),
            delegated: i.delegated,
            ..Self::default()
        }
    }

    /// Writes the outcome into the row.
    fn with_outcome(mut self, o: &Outcome, deltas: &str, payers: &str) -> Self {
        let amounts = o.amounts.as_ref();
        self.state = Some(o.state);
        self.status = o.status;
        self.body.clone_from(&o.body);
        self.deltas = deltas.to_owned();
        self.payers = payers.to_owned();
        self.fund_fen = amounts.map_or(0, |a| a.fund_fen);
        self.account_fen = amounts.map_or(0, |a| a.account_fen);
        self.cash_fen = amounts.map_or(0, |a| a.cash_fen);
        self.updated_at = o.at;
        self
    }
}

// --- Keys -----------------------------------------------------------------------------------

fn key_of(institution: &str, key: &str) -> Vec<u8> {
    [institution.as_bytes(), b"\0", key.as_bytes()].concat()
}

fn day_prefix(institution: &str, day: &str) -> Vec<u8> {
    [institution.as_bytes(), b"\0", day.as_bytes(), b"\0"].concat()
}

fn accumulator_key(card_hash: &[u8], year: i32) -> Vec<u8> {
    [card_hash, &year.to_be_bytes()].concat()
}

/// A card's year: each payer's figures, in the order first recorded.
type Year = super::PayerYears;

fn read_year(store: &Store, card_hash: &[u8], year: i32) -> Result<Year, LedgerError> {
    let Some(value) = store.get(Space::Accumulators, &accumulator_key(card_hash, year))? else { return Ok(Vec::new()) };
    // Version 2 starts with YEAR_V2 (a length never does: it would be 4 GiB) and has the
    // outpatient figure; version 1 does not.
    let (mut d, v2) = match value.split_first() {
        Some((&YEAR_V2, rest)) => (Dec(rest), true),
        _ => (Dec(&value), false),
    };
    let mut found = Vec::new();
    while !d.0.is_empty() {
        let entry = (|| {
            let payer = d.text()?;
            let figures = YearToDate {
                year,
                deductible_fen: d.int()?,
                fund_paid_fen: d.int()?,
                eligible_fen: d.int()?,
                account_paid_fen: d.int()?,
                eligible_self_pay_fen: d.int()?,
                outpatient_fund_paid_fen: if v2 { d.int()? } else { 0 },
            };
            Some((payer, figures))
        })();
        found.push(entry.ok_or_else(|| storage("accumulators do not decode"))?);
    }
    Ok(found)
}

/// The first byte of a card's year in its second encoding.
const YEAR_V2: u8 = 0xff;

fn year_bytes(year: &Year) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(1 + year.len() * 72));
    e.0.push(YEAR_V2);
    for (payer, y) in year {
        e.bytes(payer.as_bytes());
        for v in [
            y.deductible_fen,
            y.fund_paid_fen,
            y.eligible_fen,
            y.account_paid_fen,
            y.eligible_self_pay_fen,
            y.outpatient_fund_paid_fen,
        ] {
            e.int(v);
        }
    }
    e.0
}

fn same_figures(a: &YearToDate, b: &YearToDate) -> bool {
    YearToDate { year: 0, ..*a } == YearToDate { year: 0, ..*b }
}

/// Stripe kinds.
const TOKEN: u8 = b't';
const KEY: u8 = b'k';
const QUOTE: u8 = b'q';
const CARD: u8 = b'c';
const SETTLEMENT: u8 = b's';
const ENCOUNTER: u8 = b'e';

// --- Plans ----------------------------------------------------------------------------------

/// Checks an intent can be recorded (token, quote and key unused) and plans its entries;
/// `row` is what to store (pending, or with its outcome), `holds` whether the token or quote
/// stays used.
fn plan_intent(store: &Store, i: &Intent, row: &Row, holds: bool, plan: &mut Plan) -> Result<(), LedgerError> {
    // The key first: a retry (whose token is used by its own first attempt) is told so, and
    // gets its settlement's answer.
    let key = key_of(&i.institution, &i.idempotency_key);
    if store.get(Space::Keys, &key)?.is_some() {
        return Err(LedgerError::IdempotencyTaken);
    }
    if let Some(token) = &i.token_id
        && store.get(Space::Tokens, token)?.is_some()
    {
        return Err(LedgerError::TokenUsed);
    }
    if let Some(quote) = &i.quote_id
        && store.get(Space::UsedQuotes, quote.as_bytes())?.is_some()
    {
        return Err(LedgerError::QuoteUsed);
    }
    if store.get(Space::Settlements, i.id.as_bytes())?.is_some() {
        return Err(storage("settlement id already recorded"));
    }
    let id = i.id.as_bytes();
    plan.new_settlement = true;
    plan.ops.push(Op::Put(Space::Settlements, bytes(id), vec![Part::Seq, Part::Bytes(row.encode())]));
    plan.ops.push(Op::Put(Space::Keys, bytes(key), bytes(id)));
    if holds {
        if let Some(token) = &i.token_id {
            plan.ops.push(Op::Put(Space::Tokens, bytes(token.as_slice()), bytes(id)));
        }
        if let Some(quote) = &i.quote_id {
            plan.ops.push(Op::Put(Space::UsedQuotes, bytes(quote.as_bytes()), bytes(id)));
        }
    }
    if matches!(row.state(), State::Pending | State::Unknown) {
        plan.ops.push(Op::Put(Space::Open, vec![Part::Seq], bytes(id)));
    }
    let day = vec![Part::Bytes(day_prefix(&i.institution, &row.day)), Part::Seq];
    plan.ops.push(Op::Put(Space::Days, day, bytes(id)));
    Ok(())
}

/// Plans each payer's change to the card's accumulators; with `read` (the figures the payers
/// were given), refuses ([`LedgerError::Stale`]) if a payer's figures moved since.
fn plan_accumulators(
    store: &Store,
    card_hash: &[u8],
    deltas: &[AccumulatorDelta],
    read: &[AccumulatorDelta],
    plan: &mut Plan,
) -> Result<(), LedgerError> {
    let mut years: Vec<i32> = deltas.iter().map(|d| d.delta.year).collect();
    years.sort_unstable();
    years.dedup();
    for year in years {
        let mut figures = read_year(store, card_hash, year)?;
        for AccumulatorDelta { payer, delta: d } in deltas.iter().filter(|d| d.delta.year == year) {
            let slot = match figures.iter().position(|(p, _)| p == payer) {
                Some(slot) => slot,
                None => {
                    figures.push((payer.clone(), YearToDate { year, ..YearToDate::default() }));
                    figures.len() - 1
                }
            };
            let now = &mut figures[slot].1;
            if let Some(given) = read.iter().find(|r| r.payer == *payer && r.delta.year == year)
                && !same_figures(&given.delta, now)
            {
                return Err(LedgerError::Stale);
            }
            now.apply(d);
        }
        plan.ops.push(Op::Put(
            Space::Accumulators,
            bytes(accumulator_key(card_hash, year)),
            bytes(year_bytes(&figures)),
        ));
    }
    Ok(())
}

/// Plans an outcome for a pending (or unknown) settlement.
fn plan_outcome(store: &Store, o: &Outcome, deltas: &str, payers: &str, plan: &mut Plan) -> Result<(), LedgerError> {
    let Some((seq, row)) = store.row_by_id(&o.id)? else { return Err(LedgerError::NotFound) };
    if !matches!(row.state(), State::Pending | State::Unknown) {
        return Err(LedgerError::NotFound);
    }
    let read = if o.state == State::Settled { &o.read[..] } else { &[] };
    plan_accumulators(store, &o.card_hash, &o.deltas, read, plan)?;
    // A refused settlement gives its token (or quote) back: the patient may try again.
    if o.state != State::Settled && o.state != State::Unknown {
        if let Some(token) = &row.token_id {
            plan.ops.push(Op::Remove(Space::Tokens, token.clone()));
        }
        if let Some(quote) = &row.quote_id {
            plan.ops.push(Op::Remove(Space::UsedQuotes, quote.as_bytes().to_vec()));
        }
    }
    if o.state != State::Unknown {
        plan.ops.push(Op::Remove(Space::Open, seq.to_be_bytes().to_vec()));
    }
    let row = row.with_outcome(o, deltas, payers);
    plan.ops.push(Op::Put(Space::Settlements, bytes(o.id.as_bytes()), stored(seq, &row)));
    Ok(())
}

/// A settlement's stored value: its seq, then the row.
fn stored(seq: u64, row: &Row) -> Vec<Part> {
    vec![Part::Bytes([&seq.to_be_bytes()[..], &row.encode()].concat())]
}

fn intent_keys(i: &Intent) -> Vec<(u8, Vec<u8>)> {
    let mut keys = vec![(KEY, key_of(&i.institution, &i.idempotency_key)), (SETTLEMENT, i.id.as_bytes().to_vec())];
    if let Some(token) = &i.token_id {
        keys.push((TOKEN, token.clone()));
    }
    if let Some(quote) = &i.quote_id {
        keys.push((QUOTE, quote.as_bytes().to_vec()));
    }
    keys
}

fn borrowed(keys: &[(u8, Vec<u8>)]) -> Vec<(u8, &[u8])> {
    keys.iter().map(|(k, v)| (*k, v.as_slice())).collect()
}

/// The sharded ledger: the cards spread over [`LsmLedger::shards`] engines by their hash, each
/// with its own journal and writer, so what runs one at a time is one shard's share.
///
/// What a shard cannot see alone:
/// - an idempotency key is unique per institution whatever the card (and so the shard): a new
///   settlement holds its key's claim (an in-process lock stripe) while it checks the other
///   shards and commits in its own;
/// - a settlement id, a key or a quote's consumer may be in any shard: reads ask each;
/// - a listing's position is one seq per shard (each shard assigns its seqs in commit order).
///
/// A token, a quote's use and the accumulators belong to one card, hence to one shard, and are
/// checked there as a single engine checks them.
pub struct LsmLedger {
    shards: Vec<Shard>,
    claims: Box<[tokio::sync::Mutex<()>]>,
    path: PathBuf,
}

/// The file naming the shard count, fixed when the ledger is created.
const MANIFEST: &str = "cardgate-ledger";

/// Claim stripes for idempotency keys.
const CLAIMS: usize = 4096;

/// A stable 64-bit hash (FNV-1a) of bytes that are not already uniform (quote ids, keys).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

impl LsmLedger {
    /// Opens (or creates, with `shards` shards) the ledger in the directory `path`. The shard
    /// count of an existing ledger is the one it was created with (cards are spread by it);
    /// a different `shards` is ignored with a warning. Fails if another process has it open.
    pub fn open(path: &Path, shards: usize) -> Result<Self, LedgerError> {
        create_private_dir(path)?;
        let manifest = path.join(MANIFEST);
        let count = match std::fs::read_to_string(&manifest) {
            Ok(text) => text
                .lines()
                .find_map(|l| l.strip_prefix("shards = ")?.trim().parse::<usize>().ok())
                .filter(|n| (1..=MAX_SHARDS).contains(n))
                .ok_or_else(|| LedgerError::Storage(format!("{}: not a ledger manifest", manifest.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let count = shards.clamp(1, MAX_SHARDS);
                write_manifest(&manifest, count)?;
                count
            }
            Err(e) => return Err(LedgerError::Storage(format!("{}: {e}", manifest.display()))),
        };
        if count != shards {
            tracing::warn!(path = %path.display(), shards = count, configured = shards,
                "ledger: the shard count is fixed when the ledger is created; using the ledger's");
        }
        let seqs = Arc::new(AtomicU64::new(1));
        let shards = (0..count)
            .map(|n| Shard::open(&path.join(format!("shard-{n}")), &seqs, Tuning::for_shards(count)))
            .collect::<Result<Vec<_>, _>>()?;
        let claims = (0..CLAIMS).map(|_| tokio::sync::Mutex::new(())).collect();
        Ok(Self { shards, claims, path: path.to_owned() })
    }

    /// Writes every shard's memtables out as tables now, and waits (the engine does it by
    /// itself when they fill): for tests that need the ledger's rows in their on-disk form,
    /// the settlements in blob files. It calls the engine's own test hook
    /// (`rotate_memtable_and_wait`, hidden from its documentation and outside its stability
    /// promise), so nothing in the gateway's running paths uses it.
    #[doc(hidden)]
    pub fn flush(&self) -> Result<(), LedgerError> {
        for shard in &self.shards {
            let store = shard.slot.current()?;
            for space in &store.spaces {
                space.rotate_memtable_and_wait().map_err(storage)?;
            }
        }
        Ok(())
    }

    /// The shard holding a card's settlements, tokens and accumulators (its hash is uniform:
    /// its first bytes are enough).
    fn shard_of(&self, card_hash: &[u8]) -> &Shard {
        let mut first = [0u8; 8];
        for (to, from) in first.iter_mut().zip(card_hash) {
            *to = *from;
        }
        &self.shards[(u64::from_be_bytes(first) % self.shards.len() as u64) as usize]
    }

    /// Where a quote is kept (by its id; its use is recorded in its card's shard).
    fn quote_shard(&self, id: &str) -> &Shard {
        &self.shards[(fnv(id.as_bytes()) % self.shards.len() as u64) as usize]
    }

    /// The first shard where `f` finds something.
    fn find<T>(&self, f: impl Fn(&Store) -> Result<Option<T>, LedgerError>) -> Result<Option<T>, LedgerError> {
        for shard in &self.shards {
            if let Some(found) = shard.read(&f)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Records a new settlement in its card's shard, its idempotency key claimed meanwhile and
    /// checked in the other shards.
    fn create(
        &self,
        intent: &Intent,
        keys: Vec<(u8, Vec<u8>)>,
        card_hash: &[u8],
        prepare: impl Fn(&Store) -> Result<Plan, LedgerError> + Send + 'static,
    ) -> LedgerFuture<'_, ()> {
        let key = key_of(&intent.institution, &intent.idempotency_key);
        let home = self.shard_of(card_hash);
        let claim = &self.claims[(fnv(&key) % CLAIMS as u64) as usize];
        Box::pin(async move {
            let _claim = claim.lock().await;
            for shard in self.shards.iter().filter(|s| !std::ptr::eq(*s, home)) {
                if shard.read(|s| s.get(Space::Keys, &key))?.is_some() {
                    return Err(LedgerError::IdempotencyTaken);
                }
            }
            home.write(&borrowed(&keys), prepare).await
        })
    }
}

/// Builds a new ledger from what [`super::sqlite::SqliteLedger::dump`] streams
/// ([`LsmLedger::import`]): into a directory beside the destination, renamed to it only once
/// everything is in and fsynced, so an import that fails or is interrupted leaves no ledger
/// at the destination (only the `.importing` directory, removed by [`Importer::abandon`] or
/// by the next import).
pub struct Importer {
    ledger: LsmLedger,
    stores: Vec<Arc<Store>>,
    batches: Vec<fjall::OwnedWriteBatch>,
    /// Per shard: the seq after the highest imported.
    next: Vec<u64>,
    staging: PathBuf,
    destination: PathBuf,
    /// Settlements, card years and quotes imported.
    pub counts: (u64, u64, u64),
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer").field("staging", &self.staging).field("counts", &self.counts).finish_non_exhaustive()
    }
}

/// Entries a shard's batch holds before it is committed (bounded memory).
const IMPORT_BATCH: usize = 10_000;

impl LsmLedger {
    /// Starts a new ledger at `path` (which must not exist) with `shards` shards, to be filled
    /// through the returned [`Importer`].
    pub fn import(path: &Path, shards: usize) -> Result<Importer, LedgerError> {
        if path.exists() {
            return Err(LedgerError::Storage(format!("{}: exists; migrate into a new directory", path.display())));
        }
        let mut staging = path.as_os_str().to_owned();
        staging.push(".importing");
        let staging = PathBuf::from(staging);
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .map_err(|e| LedgerError::Storage(format!("{}: {e}", staging.display())))?;
        }
        let ledger = Self::open(&staging, shards)?;
        let stores: Vec<Arc<Store>> = ledger.shards.iter().map(|s| s.slot.current()).collect::<Result<_, _>>()?;
        let batches = stores.iter().map(|s| s.db.batch()).collect();
        let next = vec![1; stores.len()];
        Ok(Importer { ledger, stores, batches, next, staging, destination: path.to_owned(), counts: (0, 0, 0) })
    }
}

impl Importer {
    fn shard_index(&self, shard: &Shard) -> usize {
        self.ledger.shards.iter().position(|s| std::ptr::eq(s, shard)).unwrap_or(0)
    }

    /// Adds one item: a settlement with its seq, state, stored answers, key, held token and
    /// quote and day indexes; a card's year of accumulators; a quote.
    pub fn add(&mut self, item: super::DumpItem) -> Result<(), LedgerError> {
        let (n, entries) = match item {
            super::DumpItem::Settlement(d) => {
                self.counts.0 += 1;
                let n = self.shard_index(self.ledger.shard_of(&d.intent.card_hash));
                self.next[n] = self.next[n].max(d.seq + 1);
                (n, settlement_entries(&d))
            }
            super::DumpItem::Year(card, year, figures) => {
                self.counts.1 += 1;
                let n = self.shard_index(self.ledger.shard_of(&card));
                (n, vec![(Space::Accumulators, accumulator_key(&card, year), year_bytes(&figures))])
            }
            super::DumpItem::Quote(q) => {
                self.counts.2 += 1;
                let n = self.shard_index(self.ledger.quote_shard(&q.id));
                (n, vec![(Space::Quotes, q.id.into_bytes(), quote_bytes(&q.institution, q.expires_at, &q.sealed))])
            }
            super::DumpItem::Encounter(e) => {
                let n = self.shard_index(self.ledger.shard_of(&e.card_hash));
                (n, encounter_entries(&e))
            }
            super::DumpItem::Closed(institution, date, closed) => {
                (0, vec![(Space::Meta, closed_key(&institution, &date), closed_bytes(&closed))])
            }
        };
        for (space, key, value) in entries {
            self.batches[n].insert(self.stores[n].space(space), key, value);
        }
        if self.batches[n].len() >= IMPORT_BATCH {
            let full = std::mem::replace(&mut self.batches[n], self.stores[n].db.batch());
            full.commit().map_err(storage)?;
        }
        Ok(())
    }

    /// Commits and fsyncs what is left, closes the ledger and moves it to its destination.
    pub fn finish(self) -> Result<(), LedgerError> {
        let Self { ledger, stores, batches, next, staging, destination, .. } = self;
        for (n, mut batch) in batches.into_iter().enumerate() {
            batch.insert(stores[n].space(Space::Meta), NEXT_SEQ, next[n].to_be_bytes());
            batch.commit().map_err(storage)?;
            stores[n].db.persist(PersistMode::SyncAll).map_err(storage)?;
        }
        drop(stores);
        drop(ledger);
        let moved = std::fs::rename(&staging, &destination).and_then(|()| match destination.parent() {
            Some(parent) => std::fs::File::open(parent)?.sync_all(),
            None => Ok(()),
        });
        moved.map_err(|e| LedgerError::Storage(format!("{}: {e}", destination.display())))
    }

    /// Gives up: closes and removes the unfinished ledger.
    pub fn abandon(self) {
        let staging = self.staging.clone();
        drop(self);
        let _ = std::fs::remove_dir_all(staging);
    }
}

/// A dumped settlement's entries, as its shard stores them.
fn settlement_entries(d: &super::Dumped) -> Vec<(Space, Vec<u8>, Vec<u8>)> {
    let mut row = Row::from_intent(&d.intent);
    if d.state != State::Pending {
        row.state = Some(d.state);
    }
    row.status = d.status;
    row.body.clone_from(&d.body);
    row.reversal.clone_from(&d.reversal);
    row.deltas.clone_from(&d.deltas);
    row.payers.clone_from(&d.payers);
    (row.fund_fen, row.account_fen, row.cash_fen) = d.amounts;
    row.updated_at = d.updated_at;
    row.reversed_day.clone_from(&d.reversed_day);
    let (id, seq) = (d.intent.id.as_bytes().to_vec(), d.seq.to_be_bytes());
    let mut entries = vec![
        (Space::Settlements, id.clone(), [&seq[..], &row.encode()].concat()),
        (Space::Keys, key_of(&d.intent.institution, &d.intent.idempotency_key), id.clone()),
        (Space::Days, [day_prefix(&d.intent.institution, &row.day), seq.to_vec()].concat(), id.clone()),
    ];
    if let (Some(token), true) = (&d.intent.token_id, d.holds.0) {
        entries.push((Space::Tokens, token.clone(), id.clone()));
    }
    if let (Some(quote), true) = (&d.intent.quote_id, d.holds.1) {
        entries.push((Space::UsedQuotes, quote.as_bytes().to_vec(), id.clone()));
    }
    if matches!(d.state, State::Pending | State::Unknown) {
        entries.push((Space::Open, seq.to_vec(), id.clone()));
    }
    if let Some(day) = &d.reversed_day {
        entries.push((Space::ReversalDays, [day_prefix(&d.intent.institution, day), seq.to_vec()].concat(), id));
    }
    entries
}

/// An encounter's registration key in [`Space::Keys`]: apart from settlements' keys (a
/// client's key is printable ASCII, never `\x01`).
fn encounter_key(institution: &str, key: &str) -> Vec<u8> {
    key_of(institution, &format!("\x01encounter\x01{key}"))
}

fn encounter_bytes(e: &super::StoredEncounter) -> Vec<u8> {
    let mut enc = Enc(Vec::with_capacity(128 + e.sealed.len()));
    for text in [&e.id, &e.institution, &e.idempotency_key] {
        enc.bytes(text.as_bytes());
    }
    enc.bytes(&e.request_hash);
    enc.opt(e.token_id.as_deref());
    enc.bytes(&e.card_hash);
    enc.int(e.created_at);
    enc.int(e.version);
    enc.bytes(&e.sealed);
    enc.0
}

fn read_encounter(store: &Store, id: &[u8]) -> Result<Option<super::StoredEncounter>, LedgerError> {
    let Some(value) = store.get(Space::Encounters, id)? else { return Ok(None) };
    let mut d = Dec(&value);
    let decoded = (|| {
        Some(super::StoredEncounter {
            id: d.text()?,
            institution: d.text()?,
            idempotency_key: d.text()?,
            request_hash: d.bytes()?.to_vec(),
            token_id: d.opt()?.map(<[u8]>::to_vec),
            card_hash: d.bytes()?.to_vec(),
            created_at: d.int()?,
            version: d.int()?,
            sealed: d.bytes()?.to_vec(),
        })
    })();
    decoded.map(Some).ok_or_else(|| LedgerError::Storage("an encounter's entry does not decode".into()))
}

/// An encounter's entries, as its shard stores them.
fn encounter_entries(e: &super::StoredEncounter) -> Vec<(Space, Vec<u8>, Vec<u8>)> {
    let id = e.id.as_bytes().to_vec();
    let mut entries = vec![
        (Space::Encounters, id.clone(), encounter_bytes(e)),
        (Space::Keys, encounter_key(&e.institution, &e.idempotency_key), id.clone()),
    ];
    if let Some(token) = &e.token_id {
        entries.push((Space::Tokens, token.clone(), id));
    }
    entries
}

/// Where a closed day is kept: in the first shard's `meta`.
fn closed_key(institution: &str, date: &str) -> Vec<u8> {
    [b"closed\0", institution.as_bytes(), b"\0", date.as_bytes()].concat()
}

fn closed_bytes(closed: &super::ClosedDay) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(16 + closed.totals.len()));
    e.int(closed.closed_at);
    e.bytes(closed.totals.as_bytes());
    e.0
}

fn read_closed(store: &Store, key: &[u8]) -> Result<Option<super::ClosedDay>, LedgerError> {
    let Some(value) = store.get(Space::Meta, key)? else { return Ok(None) };
    let mut d = Dec(&value);
    let closed = (|| Some(super::ClosedDay { closed_at: d.int()?, totals: d.text()? }))();
    closed.map(Some).ok_or_else(|| LedgerError::Storage("a closed day's entry does not decode".into()))
}

/// A stored quote's value.
fn quote_bytes(institution: &str, expires_at: i64, sealed: &[u8]) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(64 + sealed.len()));
    e.bytes(institution.as_bytes());
    e.int(expires_at);
    e.bytes(sealed);
    e.0
}

fn write_manifest(path: &Path, shards: usize) -> Result<(), LedgerError> {
    use std::io::Write;
    let text =
        format!("# cardgate ledger: log-structured engine, cards spread over the shards by hash\nshards = {shards}\n");
    let written = std::fs::File::create(path).and_then(|mut f| {
        f.write_all(text.as_bytes())?;
        f.sync_all()
    });
    let dir = path.parent().map(std::fs::File::open);
    written
        .and_then(|()| match dir {
            Some(dir) => dir?.sync_all(),
            None => Ok(()),
        })
        .map_err(|e| LedgerError::Storage(format!("{}: {e}", path.display())))
}

/// What each shard's engine may hold in memory and open, so the ledger's sum stays the same
/// whatever the shard count (the gateway's memory budget: docs/BENCHMARKS.md).
#[derive(Debug, Clone, Copy)]
struct Tuning {
    /// Block cache (reads of flushed tables).
    cache_bytes: u64,
    /// The settlements' memtable.
    settlements_memtable: u64,
    /// Each index's memtable.
    index_memtable: u64,
    /// Table files kept open.
    open_files: usize,
}

impl Tuning {
    /// The ledger's whole budget, shared by the shards: 16 MiB of block cache, memtables of
    /// 8 MiB for the settlements and 4 MiB for each index (at least 4 MiB and 2 MiB a shard),
    /// 256 open files. Smaller memtables flush more often (the engine's background CPU, beside
    /// the writers); larger ones cost resident memory (docs/BENCHMARKS.md, seventh round: 16 and
    /// 8 MiB peaked at 158-165 MiB with 1,000 connections, 8 and 4 MiB at 133-137 MiB, for
    /// ~4 µs more background CPU per settlement and no change in throughput or latency beyond
    /// the spread). Fixed when a keyspace is created: a ledger made with other sizes keeps its
    /// own.
    fn for_shards(shards: usize) -> Self {
        let n = shards.max(1) as u64;
        Self {
            cache_bytes: ((16 << 20) / n).max(2 << 20),
            settlements_memtable: ((8 << 20) / n).max(4 << 20),
            index_memtable: ((4 << 20) / n).max(2 << 20),
            open_files: (256 / shards.max(1)).max(32),
        }
    }
}

/// Most shards a ledger may have.
const MAX_SHARDS: usize = 64;

impl Ledger for LsmLedger {
    super::reads_now!();
    fn begin(&self, intent: Intent) -> LedgerFuture<'_, ()> {
        let keys = intent_keys(&intent);
        let row = Row::from_intent(&intent);
        let (card_hash, key_intent) = (intent.card_hash.clone(), intent.clone());
        self.create(&key_intent, keys, &card_hash, move |s| {
            let mut plan = Plan::default();
            plan_intent(s, &intent, &row, true, &mut plan)?;
            Ok(plan)
        })
    }

    fn record(&self, intent: Intent, o: Outcome) -> LedgerFuture<'_, ()> {
        let mut keys = intent_keys(&intent);
        keys.push((CARD, o.card_hash.clone()));
        let (deltas, payers) = o.encoded();
        let row = Row::from_intent(&intent).with_outcome(&o, &deltas, &payers);
        let holds = matches!(o.state, State::Settled | State::Unknown);
        let (card_hash, key_intent) = (intent.card_hash.clone(), intent.clone());
        self.create(&key_intent, keys, &card_hash, move |s| {
            let mut plan = Plan::default();
            plan_intent(s, &intent, &row, holds, &mut plan)?;
            let read = if o.state == State::Settled { &o.read[..] } else { &[] };
            plan_accumulators(s, &o.card_hash, &o.deltas, read, &mut plan)?;
            Ok(plan)
        })
    }

    fn finish(&self, o: Outcome) -> LedgerFuture<'_, ()> {
        let keys = [(SETTLEMENT, o.id.as_bytes().to_vec()), (CARD, o.card_hash.clone())];
        let (deltas, payers) = o.encoded();
        let shard = self.shard_of(&o.card_hash);
        shard.write(&borrowed(&keys), move |s| {
            let mut plan = Plan::default();
            plan_outcome(s, &o, &deltas, &payers, &mut plan)?;
            Ok(plan)
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
        let keys = [(SETTLEMENT, id.as_bytes().to_vec()), (CARD, card_hash.clone())];
        let shard = self.shard_of(&card_hash);
        shard.write(&borrowed(&keys), move |s| {
            let Some((seq, mut row)) = s.row_by_id(&id)? else { return Err(LedgerError::NotFound) };
            if row.state() != State::Settled {
                return Err(LedgerError::NotFound);
            }
            let mut plan = Plan::default();
            plan_accumulators(s, &card_hash, &deltas, &[], &mut plan)?;
            let day = super::business_day(at);
            let index = [day_prefix(&row.institution, &day), seq.to_be_bytes().to_vec()].concat();
            plan.ops.push(Op::Put(Space::ReversalDays, bytes(index), bytes(id.as_bytes())));
            row.state = Some(State::Reversed);
            row.reversal = Some(body.clone());
            row.updated_at = at;
            row.reversed_day = Some(day);
            plan.ops.push(Op::Put(Space::Settlements, bytes(id.as_bytes()), stored(seq, &row)));
            Ok(plan)
        })
    }

    fn open_encounter(&self, e: super::StoredEncounter) -> LedgerFuture<'_, ()> {
        let key = encounter_key(&e.institution, &e.idempotency_key);
        let home = self.shard_of(&e.card_hash);
        let claim = &self.claims[(fnv(&key) % CLAIMS as u64) as usize];
        let mut keys = vec![(KEY, key.clone()), (ENCOUNTER, e.id.as_bytes().to_vec())];
        if let Some(token) = &e.token_id {
            keys.push((TOKEN, token.clone()));
        }
        Box::pin(async move {
            let _claim = claim.lock().await;
            for shard in self.shards.iter().filter(|s| !std::ptr::eq(*s, home)) {
                if shard.read(|s| s.get(Space::Keys, &key))?.is_some() {
                    return Err(LedgerError::IdempotencyTaken);
                }
            }
            home.write(&borrowed(&keys), move |store| {
                if store.get(Space::Keys, &key)?.is_some() {
                    return Err(LedgerError::IdempotencyTaken);
                }
                if let Some(token) = &e.token_id
                    && store.get(Space::Tokens, token)?.is_some()
                {
                    return Err(LedgerError::TokenUsed);
                }
                if store.get(Space::Encounters, e.id.as_bytes())?.is_some() {
                    return Err(storage("encounter id already recorded"));
                }
                let ops = encounter_entries(&e)
                    .into_iter()
                    .map(|(space, key, value)| Op::Put(space, bytes(key), bytes(value)))
                    .collect();
                Ok(Plan { ops, new_settlement: false })
            })
            .await
        })
    }

    fn update_encounter(&self, e: super::StoredEncounter) -> LedgerFuture<'_, ()> {
        let keys = [(ENCOUNTER, e.id.as_bytes().to_vec())];
        let value = encounter_bytes(&e);
        self.shard_of(&e.card_hash).write(&borrowed(&keys), move |store| {
            match read_encounter(store, e.id.as_bytes())? {
                Some(stored) if stored.version == e.version - 1 => Ok(Plan {
                    ops: vec![Op::Put(Space::Encounters, bytes(e.id.as_bytes()), bytes(value.clone()))],
                    new_settlement: false,
                }),
                Some(_) => Err(LedgerError::Stale),
                None => Err(LedgerError::NotFound),
            }
        })
    }

    fn close_day<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        closed: super::ClosedDay,
    ) -> LedgerFuture<'a, super::ClosedDay> {
        let key = closed_key(institution, date);
        let shard = &self.shards[0];
        let (value, at) = (closed_bytes(&closed), key.clone());
        let write = shard.write(&[(b'c', &key)], move |store| {
            let ops = match read_closed(store, &at)? {
                Some(_) => Vec::new(),
                None => vec![Op::Put(Space::Meta, bytes(at.clone()), bytes(value.clone()))],
            };
            Ok(Plan { ops, new_settlement: false })
        });
        Box::pin(async move {
            write.await?;
            shard.read(|store| read_closed(store, &key))?.ok_or(LedgerError::NotFound)
        })
    }

    fn save_quote(&self, q: StoredQuote) -> LedgerFuture<'_, ()> {
        let shard = self.quote_shard(&q.id);
        let (id, value) = (q.id.into_bytes(), quote_bytes(&q.institution, q.expires_at, &q.sealed));
        shard.write(&[], move |_| {
            Ok(Plan {
                ops: vec![Op::Put(Space::Quotes, bytes(id.clone()), bytes(value.clone()))],
                new_settlement: false,
            })
        })
    }

    fn cursor_parts(&self) -> usize {
        self.shards.len()
    }

    fn probe(&self) -> LedgerFuture<'_, ()> {
        let failing: Vec<&Shard> = self.shards.iter().filter(|s| s.durable.failing.load(Ordering::Relaxed)).collect();
        Box::pin(async move {
            for shard in failing {
                shard
                    .write(&[], |_| {
                        Ok(Plan {
                            ops: vec![Op::Put(Space::Meta, bytes(&b"probe"[..]), bytes(&b"1"[..]))],
                            new_settlement: false,
                        })
                    })
                    .await?;
            }
            Ok(())
        })
    }
}

impl super::ReadsNow for LsmLedger {
    fn by_idempotency_key(&self, institution: &str, key: &str) -> Result<Option<Record>, LedgerError> {
        let key = key_of(institution, key);
        self.find(|s| Ok(s.row_via(Space::Keys, &key)?.map(|(_, row)| row.record())))
    }

    fn get(&self, institution: &str, id: &str) -> Result<Option<Record>, LedgerError> {
        self.find(|s| {
            Ok(s.row_by_id(id)?.map(|(_, row)| row).filter(|r| r.institution == institution).map(Row::record))
        })
    }

    fn year_to_date(&self, card_hash: &[u8], year: i32, payers: &[&str]) -> Result<Vec<YearToDate>, LedgerError> {
        let figures = read_year(&*self.shard_of(card_hash).slot.current()?, card_hash, year)?;
        Ok(payers
            .iter()
            .map(|payer| {
                figures
                    .iter()
                    .find(|(p, _)| p == payer)
                    .map_or(YearToDate { year, ..YearToDate::default() }, |(_, y)| *y)
            })
            .collect())
    }

    fn quote(&self, institution: &str, id: &str) -> Result<Option<StoredQuote>, LedgerError> {
        let found = self.quote_shard(id).read(|s| {
            let Some(value) = s.get(Space::Quotes, id.as_bytes())? else { return Ok(None) };
            let mut d = Dec(&value);
            let decoded = (|| Some((d.text()?, d.int()?, d.bytes()?.to_vec())))();
            decoded.map(Some).ok_or_else(|| storage("a quote entry does not decode"))
        })?;
        let Some((owner, expires_at, sealed)) = found else { return Ok(None) };
        if owner != institution {
            return Ok(None);
        }
        let settled_by = self.find(|s| {
            Ok(s.get(Space::UsedQuotes, id.as_bytes())?.map(|by| String::from_utf8_lossy(&by).into_owned()))
        })?;
        Ok(Some(StoredQuote { id: id.to_owned(), institution: owner, expires_at, sealed, settled_by }))
    }

    fn unresolved(&self) -> Result<Vec<Unresolved>, LedgerError> {
        let mut rows = Vec::new();
        for (n, shard) in self.shards.iter().enumerate() {
            let found = shard.read(|s| {
                let mut rows = Vec::new();
                for (seq, row) in s.rows_of(s.space(Space::Open).iter())? {
                    if matches!(row.state(), State::Pending | State::Unknown) {
                        rows.push((row.created_at, seq, n, row.unresolved()));
                    }
                }
                Ok(Some(rows))
            })?;
            rows.extend(found.unwrap_or_default());
        }
        rows.sort_by_key(|(at, seq, n, _)| (*at, *seq, *n));
        Ok(rows.into_iter().map(|(_, _, _, u)| u).collect())
    }

    fn sealed_request(&self, institution: &str, id: &str) -> Result<Option<Unresolved>, LedgerError> {
        self.find(|s| {
            Ok(s.row_by_id(id)?.map(|(_, row)| row).filter(|r| r.institution == institution).map(Row::unresolved))
        })
    }

    /// One pass over the day's rows sums them and keeps each event's place alone (its
    /// time, its seq and shard, its id); the page's rows are read again for their lines. A
    /// day of 86,400 events held whole took 330 MiB a request.
    fn reconciliation(
        &self,
        institution: &str,
        date: &str,
        page: u32,
        page_size: u32,
    ) -> Result<Reconciliation, LedgerError> {
        let mut day = DayScan::new(date);
        for (n, shard) in self.shards.iter().enumerate() {
            shard.read(|s| {
                for (space, kind) in [(Space::Days, Event::Settled), (Space::ReversalDays, Event::Reversed)] {
                    let index = s.space(space).prefix(day_prefix(institution, date));
                    s.each_row(index, Row::decode_summary, |seq, row| day.add(kind, (seq, n), row))?;
                }
                Ok(Some(()))
            })?;
        }
        let (mut reconciliation, events) = day.finish(page, page_size);
        for (at, (_, n), kind, id) in events {
            let row = self.shards[n].read(|s| s.decode_row(id.as_bytes(), Row::decode_summary))?;
            // Rows are never removed: one summed a moment ago is there still.
            let Some((_, row)) = row else { return Err(storage(format!("settlement {id} vanished"))) };
            reconciliation.details.push(detail_line(kind, at, row));
        }
        Ok(reconciliation)
    }

    fn closed_day(&self, institution: &str, date: &str) -> Result<Option<super::ClosedDay>, LedgerError> {
        self.shards[0].read(|store| read_closed(store, &closed_key(institution, date)))
    }

    fn encounter(&self, institution: &str, id: &str) -> Result<Option<super::StoredEncounter>, LedgerError> {
        self.find(|s| Ok(read_encounter(s, id.as_bytes())?.filter(|e| e.institution == institution)))
    }

    fn encounter_by_key(&self, institution: &str, key: &str) -> Result<Option<super::StoredEncounter>, LedgerError> {
        let key = encounter_key(institution, key);
        self.find(|s| match s.get(Space::Keys, &key)? {
            Some(id) => read_encounter(s, &id),
            None => Ok(None),
        })
    }

    fn settled_deltas(&self, id: &str) -> Result<Option<SettledDeltas>, LedgerError> {
        let row = self.find(|s| Ok(s.row_by_id(id)?.map(|(_, row)| row).filter(|r| r.state.is_some())))?;
        let Some(row) = row else { return Ok(None) };
        let deltas = serde_json::from_str(&row.deltas).map_err(storage)?;
        Ok(Some((row.card_hash, deltas)))
    }

    /// Each shard's matching settlements in seq order (within a shard, its commit order),
    /// merged by seq: a page takes a prefix of every shard's list, so the position after it
    /// (one seq per shard) never skips one that commits later in any shard.
    fn list(&self, q: &super::ListQuery) -> Result<Vec<Listed>, LedgerError> {
        let mut position: Vec<u64> = match q.after.len() {
            0 => vec![0; self.shards.len()],
            n if n == self.shards.len() => q.after.clone(),
            _ => return Err(LedgerError::NotFound),
        };
        let mut queues = Vec::with_capacity(self.shards.len());
        for (n, shard) in self.shards.iter().enumerate() {
            let after = position[n];
            let found = shard.read(|s| shard_listing(s, q, after).map(Some))?;
            queues.push(std::collections::VecDeque::from(found.unwrap_or_default()));
        }
        let mut listed = Vec::new();
        while listed.len() < q.limit as usize {
            // The earliest head among the shards (seqs order the shards' settlements together).
            let next = queues.iter().enumerate().filter_map(|(n, queue)| queue.front().map(|(seq, _)| (*seq, n))).min();
            let Some((_, n)) = next else { break };
            let Some((seq, row)) = queues[n].pop_front() else { break };
            position[n] = seq;
            let state = row.state();
            let settled = matches!(state, State::Settled | State::Reversed | State::Failed);
            let amount = |v: i64| settled.then_some(v);
            listed.push(Listed {
                position: position.clone(),
                settlement_id: row.id,
                state: state.as_str().to_owned(),
                terminal_id: row.terminal,
                card: row.card_masked,
                created_at: super::rfc3339(row.created_at),
                total_fen: row.total_fen,
                fund_pay_fen: amount(row.fund_fen),
                account_pay_fen: amount(row.account_fen),
                cash_pay_fen: amount(row.cash_fen),
            });
        }
        Ok(listed)
    }
}

/// One shard's settlements matching a listing, after its position `after`, in seq order, at
/// most the page's size of them.
fn shard_listing(s: &Store, q: &super::ListQuery, after: u64) -> Result<Vec<(u64, Row)>, LedgerError> {
    let from = [q.institution.as_bytes(), b"\0", q.days.0.as_bytes(), b"\0"].concat();
    let to = [q.institution.as_bytes(), b"\0", q.days.1.as_bytes(), b"\x01"].concat();
    let mut ids = Vec::new();
    for guard in s.space(Space::Days).range(from..to) {
        let (key, id) = guard.into_inner().map_err(storage)?;
        let tail = key.len().checked_sub(8).map(|at| &key[at..]).ok_or_else(|| storage("a day key is short"))?;
        let seq = u64::from_be_bytes(tail.try_into().map_err(storage)?);
        if seq > after {
            ids.push((seq, id));
        }
    }
    ids.sort_unstable_by_key(|(seq, _)| *seq);
    let mut rows = Vec::new();
    for (seq, id) in ids {
        if rows.len() >= q.limit as usize {
            break;
        }
        let Some((_, row)) = s.decode_row(&id, Row::decode_summary)? else { continue };
        if q.from.is_some_and(|from| row.created_at < from)
            || q.to.is_some_and(|to| row.created_at >= to)
            || q.terminal.as_ref().is_some_and(|t| *t != row.terminal)
            || q.state.is_some_and(|s| s != row.state())
        {
            continue;
        }
        rows.push((seq, row));
    }
    Ok(rows)
}

/// A settlement's place among the shards: (seq, shard); seqs are the ledger's, so this is
/// the order they were recorded in.
type Place = (u64, usize);

/// What a day's detail line stands for: the settlement made that day, or its reversal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Settled,
    Reversed,
}

/// A business day summed one row at a time: its totals per type and per payer, and where
/// each of its events falls (time, place, settlement before reversal at the same moment).
struct DayScan<'a> {
    date: &'a str,
    settled: super::TypeSums,
    reversed: super::TypeSums,
    gross: super::PayerSums,
    back: super::PayerSums,
    events: Vec<(i64, Place, Event, String)>,
}

impl<'a> DayScan<'a> {
    fn new(date: &'a str) -> Self {
        Self {
            date,
            settled: super::TypeSums::new(),
            reversed: super::TypeSums::new(),
            gross: super::PayerSums::new(),
            back: super::PayerSums::new(),
            events: Vec::new(),
        }
    }

    /// A row a day index lists: the day's settlements count once settled (reversed since
    /// too), its reversals once the settlement is reversed on this day.
    fn add(&mut self, kind: Event, place: Place, r: Row) {
        let (types, payers, at) = match kind {
            Event::Settled if matches!(r.state(), State::Settled | State::Reversed) => {
                (&mut self.settled, &mut self.gross, r.created_at)
            }
            Event::Reversed if r.state() == State::Reversed && r.reversed_day.as_deref() == Some(self.date) => {
                (&mut self.reversed, &mut self.back, r.updated_at)
            }
            _ => return,
        };
        let totals = types.entry((r.insurance_type, r.clearing_type)).or_default();
        super::add_to(totals, (r.total_fen, r.fund_fen, r.account_fen, r.cash_fen), r.delegated);
        let split: Vec<(String, i64, i64)> = serde_json::from_str(&r.payers).unwrap_or_default();
        for (payer, fund, account) in split {
            let sum = payers.entry(payer).or_default();
            sum.0 += 1;
            sum.1 += fund;
            sum.2 += account;
        }
        self.events.push((at, place, kind, r.id));
    }

    /// The day's totals, with no detail lines yet, and the events of `page` in time order.
    fn finish(mut self, page: u32, page_size: u32) -> (Reconciliation, Vec<(i64, Place, Event, String)>) {
        let (settled, reversed, by_type) = super::by_type(&self.settled, &self.reversed);
        let (net, payers) = super::net_and_payers(&settled, &reversed, &self.gross, self.back);
        self.events.sort_unstable_by_key(|&(at, place, kind, _)| (at, place, kind));
        let skip = (page.saturating_sub(1) as usize).saturating_mul(page_size as usize);
        let events = self.events.into_iter().skip(skip).take(page_size as usize).collect();
        let reconciliation = Reconciliation {
            date: self.date.to_owned(),
            detail_count: settled.count + reversed.count,
            settled,
            reversed,
            net,
            payers,
            details: Vec::new(),
            page,
            page_size,
            by_type,
            closed_at: None,
        };
        (reconciliation, events)
    }
}

/// A detail line of the day: the settlement as it is now, at the moment of its event.
fn detail_line(kind: Event, at: i64, r: Row) -> super::DetailLine {
    super::DetailLine {
        event: if kind == Event::Settled { "settled" } else { "reversed" }.to_owned(),
        state: r.state().as_str().to_owned(),
        settlement_id: r.id,
        terminal_id: r.terminal,
        card: r.card_masked,
        created_at: super::rfc3339(at),
        total_fen: r.total_fen,
        fund_pay_fen: r.fund_fen,
        account_pay_fen: r.account_fen,
        cash_pay_fen: r.cash_fen,
        insurance_type: r.insurance_type,
        clearing_type: r.clearing_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A settlement is stored apart from its keys (in a blob file) only in keyspaces made so:
    /// the setting is kept by the engine from the keyspace's creation, so a ledger made before
    /// it keeps its settlements as they were, and reads them.
    #[test]
    fn the_settlements_are_kept_in_blob_files_only_in_ledgers_made_so() {
        let earlier = tempfile::tempdir().expect("temp dir");
        {
            // What the earlier gateway made: the same keyspace, without the separation.
            let db = Database::builder(earlier.path()).open().expect("open");
            let settlements = db
                .keyspace(SPACE_NAMES[Space::Settlements as usize], KeyspaceCreateOptions::default)
                .expect("keyspace");
            settlements.insert("S1", vec![7u8; 4096]).expect("insert");
            db.persist(PersistMode::SyncAll).expect("persist");
        }
        let (store, _) = Store::open(earlier.path(), Tuning::for_shards(1)).expect("reopen");
        assert!(!store.space(Space::Settlements).is_kv_separated(), "an existing keyspace keeps its settings");
        assert_eq!(store.get(Space::Settlements, b"S1").expect("read").as_deref(), Some(&[7u8; 4096][..]));
        let fresh = tempfile::tempdir().expect("temp dir");
        let (store, _) = Store::open(fresh.path(), Tuning::for_shards(1)).expect("create");
        assert!(store.space(Space::Settlements).is_kv_separated(), "a new ledger keeps settlements in blob files");
        assert!(!store.space(Space::Tokens).is_kv_separated(), "the indexes' small entries stay in their tables");
    }

    /// Each memtable the engine flushed and no longer needs is freed — by the shard's keeper,
    /// which held it meanwhile, so that the engine's own last reference (dropped under its
    /// version lock) was not the last — and none is kept for ever.
    #[test]
    fn the_keeper_frees_each_flushed_memtable_once_the_engine_lets_go() {
        use fjall::AbstractTree;
        let dir = tempfile::tempdir().expect("temp dir");
        let shard = Shard::open(dir.path(), &Arc::new(AtomicU64::new(1)), Tuning::for_shards(1)).expect("open");
        let store = shard.slot.current().expect("engine");
        let tokens = store.space(Space::Tokens);
        tokens.insert("T0", "S0").expect("insert");
        let first = Arc::downgrade(&tokens.tree.active_memtable());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // Each flush seals the memtable and starts another; the engine lets go of a flushed
        // one at a later rotation (its version GC).
        let mut round = 1;
        while first.strong_count() > 0 {
            assert!(std::time::Instant::now() < deadline, "the first memtable is still held after {round} flushes");
            std::thread::sleep(KEEPER_TICK * 3);
            tokens.insert(format!("T{round}"), format!("S{round}")).expect("insert");
            tokens.rotate_memtable_and_wait().expect("flush");
            round += 1;
        }
        // The keeper counts what it freed just after freeing it.
        while shard.freed.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(KEEPER_TICK);
        }
        assert!(shard.freed.load(Ordering::Relaxed) >= 1, "the keeper freed the memtables it held");
        for n in 0..round {
            assert_eq!(tokens.get(format!("T{n}")).expect("read").as_deref(), Some(format!("S{n}").as_bytes()));
        }
    }
}
