//! The load harness: one HTTPS client with mutual-TLS keep-alive connections standing for many
//! terminals, against three servers with the same TLS settings, in one run:
//! - (a) the bare floor: hyper + rustls reading the body and answering a fixed JSON;
//! - (a') the floor plus one Ed25519 signature check per request;
//! - (b) the full gateway: EdDSA tokens, every limiter on, the two-payer in-process plugin
//!   chain, the durable ledger (fsync on commit) on disk.
//!
//! Closed loop (maximum throughput) and open loop (a fixed offered rate, latency measured from
//! each request's scheduled time, so no coordinated omission). Tokens are minted before the
//! clock starts, each unique, so the replay check is real. The closed loops of (a') and (b)
//! alternate in three slices each ([`SLICES`]), so a drift in the machine's speed during the
//! run moves both sides of their ratio alike.
//!
//! Run: `cargo run --release -p cardgate-tests --bin loadgen -- [SECONDS] [CONNECTIONS] [gateway]`
//! (`gateway`: only the full gateway, with fewer tokens — for profiling; `open`: only its open
//! loop, at `LOADGEN_OPEN_RATE` or 2,000 req/s, on a fresh ledger). Without either
//! the run ends with the four targets measured side by side: the throughput ratio,
//! p99 at half load, the in-process plugin call, and the daemon's memory with 1,000
//! connections (this needs `target/release/cardgate`: `cargo build --release -p cardgate`).
//!
//! Every run of the full gateway also prints its **serialized work**: the CPU the ledger's
//! single writer thread spent per settlement, the figure that predicts the ceiling on any
//! number of cores. `LOADGEN_CORES=N loadgen ...` runs pinned to cores 0..N (`taskset`);
//! `LOADGEN_BATCH=1` checks every token's signature alone (no Ed25519 batches);
//! `LOADGEN_OPEN_RATE=R` runs the open loop at R req/s instead of half the gateway's maximum.
//! Every open loop also prints the ledger's commits during it (the gateway's
//! `cardgate_ledger_commit_duration_seconds`, fsync included): how many took over 5, 10 and 25
//! ms — a request waits for the commit in progress and then its own, so a few long commits set
//! the loop's p99. Every loop of the full gateway also prints how much work was shared: Ed25519
//! signatures per batch and writes per ledger commit (the gateway's own histograms) — in a
//! closed loop of 64 connections about 13 and 9, in an open loop at half load about 2 and 2 (on
//! a 2-core VM), which is much of why a request costs more CPU there.
//!
//! `loadgen scale [SECONDS] [CONNECTIONS] [CORES ...]` redoes the scaling table of issue #15
//! with one command: for each core count (2, 4, 8, 16 by default, as many as the machine has)
//! the closed loop of (a), (a') and (b) and the real daemon with 1,000 connections, each
//! pinned to that many cores, then one table with the busiest writer's µs per settlement.
//!
//! `loadgen ledger [SECONDS] [CONCURRENCY ...]` is the ledger's stage benchmark: each engine
//! alone, CONCURRENCY settlements in flight at once (64 and 512 by default), each one commit
//! as an effect-free chain makes it (intent, outcome, two payers' accumulators, read first
//! as the flow reads them), with values of a real settlement's sizes. It prints settlements/s,
//! the writer's CPU per settlement (the serialized work), the engine's background CPU and the
//! whole process's CPU per settlement.
//!
//! `loadgen rss [CONNECTIONS] [SECONDS]` measures the resident memory of the real daemon
//! (`target/release/cardgate serve`, a process of its own) idle, with CONNECTIONS mutual-TLS
//! keep-alive connections open (each has settled one bill), and at its peak while all of them
//! settle for SECONDS.
//!
//! `loadgen stay [LINES]` is a hospital's stay: one encounter of LINES fee lines (20,000 by
//! default) uploaded in batches, each batch's time as the stay grows, then its interim
//! settlement and the `GET` of the whole stay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cardgate::client::Client;
use cardgate_tests::harness::{Card, Options, Setup, serve_setup};
use http::{Method, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;

/// The allocator the `cardgate` binary uses, so the in-process servers run as the daemon does
/// (all three servers share it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LIMITS: &str = "
[limits]
max_in_flight = 100000
global = { per_second = 1000000, burst = 1000000 }
institution = { per_second = 1000000, burst = 1000000 }
terminal = { per_second = 100000, burst = 100000 }
card = { per_minute = 60, burst = 10 }
";

/// A bare server: reads the body, optionally verifies one Ed25519 signature, answers JSON.
async fn bare(setup: &Setup, verify: bool) -> SocketAddr {
    let tls = setup.server_tls("bare");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let key = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(key.as_ref()).expect("key");
    let message = vec![7u8; 180];
    let signature = pair.sign(&message).as_ref().to_vec();
    let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
    let check = Arc::new((public, message, signature));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let (acceptor, check) = (acceptor.clone(), Arc::clone(&check));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let check = Arc::clone(&check);
                    async move {
                        let _ = request.into_body().collect().await;
                        if verify {
                            let (public, message, signature) = &*check;
                            let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public);
                            assert!(key.verify(message, signature).is_ok());
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"{\"state\":\"settled\"}",
                        ))))
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    addr
}

fn bill(token: &str) -> String {
    json!({
        "token": token, "terminal_id": "POS-01", "total_fen": 170000,
        "lines": [
            { "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 10, "unit_price_fen": 10000, "amount_fen": 100000 },
            { "code": "XB02", "name": "CT scan", "category": "class_b", "quantity": 1, "unit_price_fen": 50000, "amount_fen": 50000 },
            { "code": "XC03", "name": "Single room", "category": "class_c", "quantity": 1, "unit_price_fen": 20000, "amount_fen": 20000 }
        ]
    })
    .to_string()
}

#[derive(Default)]
struct Run {
    completed: usize,
    errors: usize,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// CPU time this process (client and server) spent during the run.
    cpu: Duration,
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

/// `LOADGEN_ENGINE=postgres`: the gateway on the cluster's ledger, on the PostgreSQL server
/// `CARDGATE_TEST_POSTGRES` names (the server's own CPU is measured too: [`postgres_cpu`]).
fn postgres() -> bool {
    std::env::var("LOADGEN_ENGINE").as_deref() == Ok("postgres")
}

/// CPU time (user + system) every `postgres` process on this machine has used so far: the
/// database's work, when the server runs here.
fn postgres_cpu() -> Duration {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some((name, rest)) = stat.rsplit_once(')') else { continue };
        if !name.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields.get(11..13).map_or(0, |f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum());
    }
    Duration::from_millis(ticks * 10)
}

/// The measured gateway's options: the harness's limits, release plugins called inline, and
/// the cluster's ledger under `LOADGEN_ENGINE=postgres`.
fn harness_options() -> Options {
    Options {
        extra_toml: LIMITS.into(),
        release_plugins: true,
        inline_plugins: true,
        engine: postgres().then_some("postgres"),
        ..Options::default()
    }
}

/// `LOADGEN_ENGINE=lsm` runs the gateway on the log-structured ledger (`LOADGEN_SHARDS=N`: N
/// shards, default the gateway's, half the cores), `LOADGEN_ENGINE=sqlite` on SQLite (the
/// default), to compare both in one session.
fn choose_engine(setup: &Setup) {
    if postgres() {
        println!("ledger: postgres (a database of its own on the server CARDGATE_TEST_POSTGRES names)");
        return;
    }
    let path = setup.dir.path().join("cardgate.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let section = format!("[ledger]\npath = \"ledger\"\nengine = \"{}\"\n", cardgate_tests::harness::test_engine());
    assert!(text.contains(&section), "the harness's ledger section changed; update choose_engine");
    let replacement = match (std::env::var("LOADGEN_ENGINE").as_deref(), std::env::var("LOADGEN_SHARDS")) {
        (Ok("lsm"), Ok(shards)) => {
            format!("[ledger]\npath = \"ledger\"\nengine = \"lsm\"\nshards = {}\n", shards.trim())
        }
        (Ok("lsm"), _) => "[ledger]\npath = \"ledger\"\nengine = \"lsm\"\n".to_owned(),
        (Ok("sqlite"), _) => "[ledger]\npath = \"ledger\"\nengine = \"sqlite\"\n".to_owned(),
        _ => return,
    };
    println!("ledger: {}", replacement.lines().skip(1).collect::<Vec<_>>().join(", "));
    std::fs::write(&path, text.replace(&section, &replacement)).expect("config");
}

/// `LOADGEN_BATCH=N`: Ed25519 signatures checked at most N together (`tokens.
/// signature_batch_max`; 1: each alone, as before batches), to compare both in one session.
fn choose_batch(setup: &Setup) {
    let Ok(max) = std::env::var("LOADGEN_BATCH") else { return };
    let path = setup.dir.path().join("cardgate.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let anchor = "max_lifetime_secs = 600\n";
    assert!(text.contains(anchor), "the harness's tokens section changed; update choose_batch");
    println!("signature batches: at most {}", max.trim());
    let replacement = format!("{anchor}signature_batch_max = {}\n", max.trim());
    std::fs::write(&path, text.replacen(anchor, &replacement, 1)).expect("config");
}

/// The ledger's stage benchmark (`loadgen ledger`): both engines, each at every concurrency.
async fn ledger_stage(seconds: u64, levels: &[usize]) {
    use cardgate::config::{LedgerConfig, LedgerEngine};
    println!("ledger stage: one commit per settlement, {seconds} s per row; CPU in µs per settlement");
    println!(
        "| engine | shards | in flight | settlements/s | busiest writer (serialized) | all writers | background | whole process |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let shard_counts: Vec<usize> = std::env::var("LOADGEN_SHARDS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4]);
    let mut engines: Vec<(LedgerEngine, usize)> = shard_counts.iter().map(|&n| (LedgerEngine::Lsm, n)).collect();
    engines.push((LedgerEngine::Sqlite, 1));
    let only = std::env::var("LOADGEN_ENGINE").ok();
    for (engine, shards) in engines {
        if only.as_deref().is_some_and(|only| !format!("{engine:?}").eq_ignore_ascii_case(only)) {
            continue;
        }
        for &level in levels {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join(if engine == LedgerEngine::Sqlite { "ledger.db" } else { "ledger" });
            let config = LedgerConfig {
                backend: Default::default(),
                postgres: None,
                path,
                engine,
                shards,
                secret: String::new(),
                secret_file: None,
            };
            let ledger = cardgate::ledger::open(&config).expect("ledger");
            // A new thread names itself once it runs: let the writers get there.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let done = Arc::new(AtomicUsize::new(0));
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let (before, cpu) = (LedgerCpu::now(), cpu_time());
            let tasks: Vec<_> = (0..level)
                .map(|task| {
                    let (ledger, done) = (Arc::clone(&ledger), Arc::clone(&done));
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            n += 1;
                            let (intent, outcome) = stage_settlement(task as u64, n);
                            let payers = ["basic-medical", "critical-illness"];
                            let read = ledger.year_to_date(&intent.card_hash, 2026, &payers).await.expect("read");
                            let read = payers
                                .iter()
                                .zip(read)
                                .map(|(p, y)| cardgate::ledger::AccumulatorDelta { payer: (*p).into(), delta: y })
                                .collect();
                            ledger.record(intent, cardgate::ledger::Outcome { read, ..outcome }).await.expect("record");
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task");
            }
            let n = done.load(Ordering::Relaxed).max(1);
            let (busiest, all, background) = LedgerCpu::now().per_settlement(&before, n);
            let process = (cpu_time() - cpu).as_secs_f64() * 1e6 / n as f64;
            println!(
                "| {engine:?} | {shards} | {level} | {:.0} | {busiest:.1} | {all:.1} | {background:.1} | {process:.0} |",
                n as f64 / seconds as f64
            );
            // The writers stop once the ledger is gone: before the next row measures.
            drop(ledger);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// One settlement of the stage benchmark: a new card, token and key each time, values of a
/// real settlement's sizes (a sealed prepared request, a sealed receipt).
fn stage_settlement(task: u64, n: u64) -> (cardgate::ledger::Intent, cardgate::ledger::Outcome) {
    use cardgate::ledger::{AccumulatorDelta, Amounts, Intent, Outcome, State};
    use cardgate_sdk::YearToDate;
    let unique = ring::digest::digest(&ring::digest::SHA256, format!("{task}/{n}/{:?}", Instant::now()).as_bytes());
    let unique = unique.as_ref();
    let id = format!("S{}", hex(&unique[..12]));
    let delta = |payer: &str, fund: i64| AccumulatorDelta {
        payer: payer.into(),
        delta: YearToDate { year: 2026, fund_paid_fen: fund, deductible_fen: 100, ..YearToDate::default() },
    };
    let intent = Intent {
        id: id.clone(),
        institution: "P110105002".into(),
        terminal: "POS-01".into(),
        idempotency_key: hex(&unique[12..28]),
        request_hash: unique.to_vec(),
        token_id: Some(unique[..16].to_vec()),
        quote_id: None,
        card_hash: unique.to_vec(),
        card_masked: "1101**********1234".into(),
        total_fen: 170_000,
        created_at: 1_764_547_200,
        sealed_request: vec![7; 800],
        insurance_type: "310".into(),
        clearing_type: "41".into(),
        delegated: false,
    };
    let outcome = Outcome {
        id,
        state: State::Settled,
        status: 201,
        body: format!("sealed:v1:{}", "A".repeat(1600)),
        deltas: vec![delta("basic-medical", 90_000), delta("critical-illness", 10_000)],
        card_hash: unique.to_vec(),
        read: Vec::new(),
        at: 1_764_547_201,
        amounts: Some(Amounts {
            fund_fen: 100_000,
            account_fen: 20_000,
            cash_fen: 50_000,
            payers: vec![("basic-medical".into(), 90_000, 20_000), ("critical-illness".into(), 10_000, 0)],
        }),
    };
    (intent, outcome)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// CPU time each thread named `name` (in this process) has used so far, by thread id, from
/// the scheduler's own accounting (nanoseconds).
fn threads_cpu_ns(name: &str) -> std::collections::HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Default::default() };
    tasks
        .flatten()
        .filter_map(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            if comm.trim() != name {
                return None;
            }
            let ns =
                std::fs::read_to_string(task.path().join("schedstat")).ok()?.split_whitespace().next()?.parse().ok()?;
            Some((task.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// The ledger's threads' CPU at a moment: its writers (`cardgate-ledger`, one per shard: each
/// runs its shard's settlements one at a time) and the storage engine's background threads
/// (`fjall:worker`: memtable flushes and compactions, beside the writers; and the lsm
/// engine's memtable keepers, which free what the flushes left).
struct LedgerCpu {
    writers: std::collections::HashMap<String, u64>,
    background: std::collections::HashMap<String, u64>,
}

impl LedgerCpu {
    fn now() -> Self {
        let mut background = threads_cpu_ns("fjall:worker");
        background.extend(threads_cpu_ns(cardgate::ledger::lsm::KEEPER_THREAD));
        Self { writers: threads_cpu_ns(cardgate::ledger::lsm::WRITER_THREAD), background }
    }

    /// Since `before`, per settlement (µs): the busiest writer's CPU (the serialized work: what
    /// one thread had to do one at a time), all writers', and the background threads'.
    fn per_settlement(&self, before: &Self, settlements: usize) -> (f64, f64, f64) {
        let n = settlements.max(1) as f64;
        let deltas = |now: &std::collections::HashMap<String, u64>, then: &std::collections::HashMap<String, u64>| {
            now.iter().map(|(tid, ns)| ns.saturating_sub(then.get(tid).copied().unwrap_or(0))).collect::<Vec<u64>>()
        };
        let writers = deltas(&self.writers, &before.writers);
        let busiest = writers.iter().max().copied().unwrap_or(0) as f64 / 1000.0 / n;
        let all = writers.iter().sum::<u64>() as f64 / 1000.0 / n;
        let background = deltas(&self.background, &before.background).iter().sum::<u64>() as f64 / 1000.0 / n;
        (busiest, all, background)
    }
}

fn serialized_work(before: &LedgerCpu, run: &Run) -> Option<f64> {
    if run.completed == 0 {
        return None;
    }
    let (busiest, all, background) = LedgerCpu::now().per_settlement(before, run.completed);
    if all == 0.0 {
        return None; // No ledger writer threads: the ledger is a database server's.
    }
    println!(
        "
serialized work: the busiest ledger writer spent {busiest:.1} µs of CPU per settlement ({} settlements; \
         all writers {all:.1} µs); alone it would carry {:.0} settlements/s; the engine's background \
         threads (beside the writers) {background:.1} µs per settlement",
        run.completed,
        1e6 / busiest
    );
    Some(busiest)
}

/// One of the gateway's histograms, taken before and after a loop. The ledger's commits
/// (`cardgate_ledger_commit_duration_seconds`: a group's entries applied and made durable, its
/// fsync included) say how much of the loop's tail the disk sets: a request waits for the
/// commit in progress, then for its own.
#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative counts by upper bound in seconds, as the exporter renders them.
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum: f64,
}

impl Histogram {
    /// The ledger's commits, fsync included.
    fn commits() -> Self {
        Self::read(&cardgate::metrics::render(), "cardgate_ledger_commit_duration_seconds")
    }

    /// The histogram `name` in `rendered` (this process's metrics as the exporter renders them).
    fn read(rendered: &str, name: &str) -> Self {
        let mut read = Self::default();
        for line in rendered.lines() {
            let Some(rest) = line.strip_prefix(name) else { continue };
            let Some((label, value)) = rest.rsplit_once(' ') else { continue };
            if let Some(bound) = label.strip_prefix("_bucket{le=\"").and_then(|l| l.strip_suffix("\"}")) {
                if let (Ok(bound), Ok(n)) = (bound.parse::<f64>(), value.parse::<u64>()) {
                    read.buckets.push((bound, n));
                }
            } else if label == "_count" {
                read.count = value.parse().unwrap_or(0);
            } else if label == "_sum" {
                read.sum = value.parse().unwrap_or(0.0);
            }
        }
        read
    }

    /// Commits in this loop that took longer than `bound` seconds (a bucket's bound).
    fn over(&self, before: &Self, bound: f64) -> Option<u64> {
        let at = |c: &Self| c.buckets.iter().find(|(b, _)| (*b - bound).abs() < 1e-9).map(|(_, n)| *n);
        let within = at(self)?.saturating_sub(at(before).unwrap_or(0));
        Some(self.count.saturating_sub(before.count).saturating_sub(within))
    }

    /// One line on the loop's commits since `before`, if any were counted. Their time is
    /// summed: one writer's share of the loop, or more than 100% where commits run side by side
    /// (several shards' writers; PostgreSQL, whose every transaction is counted with its round
    /// trip).
    fn report_commits(&self, before: &Self, loop_time: Duration) {
        let n = self.count.saturating_sub(before.count);
        if n == 0 {
            return;
        }
        let busy = (self.sum - before.sum) / loop_time.as_secs_f64().max(1e-9);
        let over = |ms: f64| self.over(before, ms / 1000.0).map_or("?".into(), |k| k.to_string());
        println!(
            "ledger commits (fsync included): {n}, {:.2} ms on average, their time summed {:.0}% of the loop; \
             over 5 ms: {}, over 10 ms: {}, over 25 ms: {}",
            (self.sum - before.sum) * 1000.0 / n as f64,
            busy * 100.0,
            over(5.0),
            over(10.0),
            over(25.0)
        );
    }
}

/// How many things a loop's work was shared among: Ed25519 signatures checked in one batch,
/// settlements in one ledger commit (one fsync). Larger in a closed loop than in an open one at
/// a lower rate, which is much of why an open-loop request costs more CPU.
struct Batches {
    signatures: Histogram,
    commits: Histogram,
}

impl Batches {
    fn now() -> Self {
        let rendered = cardgate::metrics::render();
        Self {
            signatures: Histogram::read(&rendered, "cardgate_token_signature_batch_size"),
            commits: Histogram::read(&rendered, "cardgate_ledger_commit_batch_size"),
        }
    }

    fn report(&self, before: &Self) {
        let mean = |now: &Histogram, then: &Histogram| {
            let n = now.count.saturating_sub(then.count);
            (n, if n == 0 { 0.0 } else { (now.sum - then.sum) / n as f64 })
        };
        let (batches, signatures) = mean(&self.signatures, &before.signatures);
        let (groups, settlements) = mean(&self.commits, &before.commits);
        println!(
            "shared work: {batches} Ed25519 batches of {signatures:.1} signatures on average \
             (a batch of one is checked alone); {groups} ledger commits of {settlements:.1} writes on average"
        );
    }
}

/// Marks the line a pinned run of `loadgen SECONDS CONNECTIONS closed` ends with: (a), (a')
/// and (b) in req/s and the busiest ledger writer's µs per settlement.
const SCALE_ROW: &str = "scale-row:";

/// `loadgen scale [SECONDS] [CONNECTIONS] [CORES ...]`: the scaling table of issue #15 in one
/// command. For each core count (2, 4, 8 and 16 by default, those the machine has), this
/// program runs itself pinned to that many cores twice: the closed loop of (a), (a') and (b)
/// with CONNECTIONS connections (256 by default), then the real daemon with 1,000
/// connections (`loadgen rss`, whose settlements/s is the daemon's throughput). The engine
/// and shards follow `LOADGEN_ENGINE` and `LOADGEN_SHARDS` as in every run.
fn scale(seconds: u64, connections: usize, mut cores: Vec<usize>) {
    let have = std::thread::available_parallelism().map_or(1, usize::from);
    if cores.is_empty() {
        cores = [2, 4, 8, 16].into_iter().filter(|n| *n <= have).collect();
        if cores.is_empty() {
            cores.push(have);
        }
    }
    let exe = std::env::current_exe().expect("own path");
    let pinned = |n: usize, args: &[String]| -> String {
        let output = std::process::Command::new(&exe)
            .args(args)
            .env("LOADGEN_CORES", n.to_string())
            .env_remove("LOADGEN_PINNED")
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run loadgen pinned");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        print!("{text}");
        text
    };
    let mut rows = Vec::new();
    for &n in &cores {
        eprintln!("== {n} cores");
        let closed = pinned(n, &[seconds.to_string(), connections.to_string(), "closed".into()]);
        let figures: Vec<f64> = closed
            .lines()
            .find_map(|l| l.strip_prefix(SCALE_ROW))
            .map(|l| l.split_whitespace().filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_default();
        let daemon = pinned(n, &["rss".into(), "1000".into(), seconds.to_string()]);
        // "| after S s of all 1000 settling (N settlements, R/s) | ..."
        let daemon_rate = daemon
            .lines()
            .find(|l| l.starts_with("| after "))
            .and_then(|l| l.split(", ").nth(1))
            .and_then(|r| r.split('/').next())
            .and_then(|r| r.parse::<f64>().ok());
        rows.push((n, figures, daemon_rate));
    }
    let engine = std::env::var("LOADGEN_ENGINE").unwrap_or_else(|_| "sqlite".into());
    println!(
        "\nscaling, {seconds} s per run, {connections} connections, ledger {engine}; req/s, writer µs per settlement:"
    );
    println!(
        "| cores | (a) bare floor | (a') floor + Ed25519 | (b) full gateway | (b)/(a') | busiest writer µs | daemon, 1,000 connections |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (n, f, daemon) in rows {
        let cell = |i: usize| f.get(i).map_or("failed".to_string(), |v| format!("{v:.0}"));
        let ratio = match (f.get(1), f.get(2)) {
            (Some(a_sig), Some(b)) if *a_sig > 0.0 => format!("{:.2}", b / a_sig),
            _ => "-".into(),
        };
        let writer = f.get(3).filter(|v| v.is_finite()).map_or("-".to_string(), |v| format!("{v:.1}"));
        let daemon = daemon.map_or("failed".to_string(), |r| format!("{r:.0}"));
        println!("| {n} | {} | {} | {} | {ratio} | {writer} | {daemon} |", cell(0), cell(1), cell(2));
    }
}

/// `LOADGEN_CORES=N`: runs again pinned to cores 0..N (client, servers and the daemon of the
/// memory run alike), so a many-core machine can redo the scaling table core count by core count.
fn pin_to_cores() {
    use std::os::unix::process::CommandExt;
    let Some(cores) = std::env::var("LOADGEN_CORES").ok().and_then(|n| n.parse::<usize>().ok()) else { return };
    if std::env::var_os("LOADGEN_PINNED").is_some() || cores == 0 {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let error = std::process::Command::new("taskset")
        .args(["-c", &format!("0-{}", cores - 1)])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("LOADGEN_PINNED", cores.to_string())
        .exec();
    panic!("cannot run pinned with taskset: {error}");
}

impl Run {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[index]) / 1000.0
    }

    fn throughput(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }

    /// This run and `other` as one (two slices of one loop).
    fn merged(mut self, other: Run) -> Run {
        self.completed += other.completed;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
        self
    }
}

/// The closed loops of (a') and (b), whose ratio is the target, run in this many
/// alternating slices each, sharing out the run's seconds: on a machine whose speed drifts
/// over a run (a shared VM's does, by a third within minutes), the drift then moves both sides
/// of the ratio alike instead of whichever loop ran second.
const SLICES: usize = 3;

/// `bodies` in `n` runs of consecutive bills (moved, not copied).
fn split_bodies(mut bodies: Vec<String>, n: usize) -> Vec<Vec<String>> {
    let per = bodies.len().div_ceil(n.max(1)).max(1);
    let mut chunks = Vec::with_capacity(n);
    while !bodies.is_empty() {
        let rest = bodies.split_off(per.min(bodies.len()));
        chunks.push(std::mem::replace(&mut bodies, rest));
    }
    chunks
}

/// Bills with fresh tokens for an open loop of `seconds` at `rate` (and a few over).
fn open_loop_bills(setup: &Setup, rate: f64, seconds: u64) -> Vec<String> {
    (0..(rate as usize * seconds as usize + 100)).map(|_| bill(&setup.token(&Card::beijing(), 600))).collect()
}

/// The open loop's rate from `LOADGEN_OPEN_RATE`, if it names one the harness can offer: a
/// positive number of requests per second up to a million (its tokens are made beforehand).
/// Anything else is said on stderr and the run goes on at half the gateway's maximum.
fn open_rate() -> Option<f64> {
    let text = std::env::var("LOADGEN_OPEN_RATE").ok()?;
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 1e6 => Some(rate),
        _ => {
            eprintln!("LOADGEN_OPEN_RATE={text:?} is not a positive rate up to 1000000 req/s: using half the maximum");
            None
        }
    }
}

/// Sends `bodies` over `connections` keep-alive connections; `rate` = None is closed loop,
/// Some(r) schedules request i at start + i/r and measures from that moment.
async fn drive(
    client: &Client,
    bodies: Arc<Vec<String>>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Run {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let run_id = RUN.fetch_add(1, Ordering::Relaxed);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now() + Duration::from_millis(200);
    let mut workers = Vec::new();
    for _ in 0..connections {
        let (client, bodies, next) = (client.clone(), Arc::clone(&bodies), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            let mut connection = client.connect().await.expect("connect");
            let (mut latencies, mut errors, mut completed) = (Vec::new(), 0usize, 0usize);
            tokio::time::sleep_until(start.into()).await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies.len() {
                    break;
                }
                let scheduled = match rate {
                    Some(r) => start + Duration::from_secs_f64(i as f64 / r),
                    None => Instant::now(),
                };
                if scheduled.duration_since(start) > duration {
                    break;
                }
                if scheduled > Instant::now() {
                    tokio::time::sleep_until(scheduled.into()).await;
                }
                // Keys as tills make them (random, like UUIDs), so the ledger's index on them
                // is written at random places, as in production.
                let key = format!("{:016x}-{run_id}-{i}", splitmix(i as u64 ^ ((run_id as u64) << 40)));
                let headers = [("idempotency-key", key.as_str())];
                match connection.send(Method::POST, "/v1/settlements", &headers, Some(&bodies[i])).await {
                    Ok(reply) if reply.status.is_success() => completed += 1,
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        connection = client.connect().await.expect("reconnect");
                    }
                }
                latencies.push(scheduled.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            (latencies, errors, completed)
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let cpu_start = cpu_time();
    let mut run =
        Run { completed: 0, errors: 0, elapsed: Duration::ZERO, latencies_us: Vec::new(), cpu: Duration::ZERO };
    for worker in workers {
        let (latencies, errors, completed) = worker.await.expect("worker");
        run.latencies_us.extend(latencies);
        run.errors += errors;
        run.completed += completed;
    }
    run.elapsed = start.elapsed();
    run.cpu = cpu_time().saturating_sub(cpu_start);
    run.latencies_us.sort_unstable();
    run
}

/// A fixed scramble of a counter (SplitMix64's finaliser): keys that look random, made cheaply.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn row(name: &str, run: &Run) {
    println!(
        "| {name} | {:>9.0} | {:>7.2} | {:>7.2} | {:>7.2} | {:>7.2} | {:>6} | {:>5.0} |",
        run.throughput(),
        run.percentile(0.5),
        run.percentile(0.9),
        run.percentile(0.99),
        run.percentile(0.999),
        run.errors,
        run.cpu.as_secs_f64() * 1e6 / run.completed.max(1) as f64
    );
}

/// `VmRSS` and `VmHWM` (peak) of a process, in MiB.
fn resident_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The daemon's resident memory with many terminals connected.
async fn rss(connections: usize, seconds: u64) -> f64 {
    let addr = cardgate_tests::listen_addr();
    let options = harness_options();
    let setup = Setup::create(&options, &addr.to_string());
    choose_engine(&setup);
    choose_batch(&setup);
    let binary = std::env::current_exe().expect("own path").with_file_name("cardgate");
    assert!(binary.exists(), "{} is missing: cargo build --release -p cardgate", binary.display());
    let mut daemon = std::process::Command::new(&binary)
        .args(["serve", "--config"])
        .arg(setup.dir.path().join("cardgate.toml"))
        .env("CARDGATE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start cardgate");
    let client = setup.client(addr, 1);
    let ready = Instant::now();
    while client.send(Method::GET, "/v1/settlements/ready", &[], None).await.is_err() {
        assert!(ready.elapsed() < Duration::from_secs(30), "the daemon did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = daemon.id();
    let idle = resident_mib(pid);
    eprintln!("minting {} tokens ...", connections * (seconds as usize * 40 + 1));
    let bodies: Vec<String> =
        (0..connections * (seconds as usize * 40 + 1)).map(|_| bill(&setup.token(&Card::beijing(), 600))).collect();
    let mut open = Vec::with_capacity(connections);
    for (i, body) in bodies.iter().take(connections).enumerate() {
        let mut connection = client.connect().await.expect("connect");
        let key = format!("rss-open-{i}");
        let reply = connection
            .send(Method::POST, "/v1/settlements", &[("idempotency-key", key.as_str())], Some(body))
            .await
            .expect("settle");
        assert!(reply.status.is_success(), "{}: {}", reply.status, reply.body);
        open.push(connection);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected = resident_mib(pid);
    // Every connection settles in a closed loop; the peak is read afterwards.
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(connections));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for (c, mut connection) in open.into_iter().enumerate() {
        let (bodies, next) = (Arc::clone(&bodies), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            let mut done = 0usize;
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                let key = format!("rss-{c}-{i}");
                match connection
                    .send(Method::POST, "/v1/settlements", &[("idempotency-key", key.as_str())], Some(body))
                    .await
                {
                    Ok(reply) if reply.status.is_success() => done += 1,
                    _ => {}
                }
            }
            (done, connection)
        }));
    }
    let mut settled = 0;
    let mut still_open = Vec::new();
    for worker in workers {
        let (done, connection) = worker.await.expect("worker");
        settled += done;
        still_open.push(connection);
    }
    let loaded = resident_mib(pid);
    println!("resident memory of `cardgate serve` (MiB), {connections} mutual-TLS keep-alive connections:");
    println!("| moment | VmRSS | VmHWM (peak so far) |");
    println!("|---|---|---|");
    println!("| started, no connection | {:.1} | {:.1} |", idle.0, idle.1);
    println!("| {connections} connections open, one settlement each | {:.1} | {:.1} |", connected.0, connected.1);
    println!(
        "| after {seconds} s of all {connections} settling ({settled} settlements, {:.0}/s) | {:.1} | {:.1} |",
        settled as f64 / seconds as f64,
        loaded.0,
        loaded.1
    );
    drop(still_open);
    let _ = daemon.kill();
    let _ = daemon.wait();
    loaded.1
}

/// Median time of one in-process call of the basic-medical plugin through the C ABI, JSON both
/// ways, as the daemon makes it (`Dispatch::Inline`): 20 rounds of 5,000 calls.
fn plugin_dispatch_us(lines: usize) -> f64 {
    use cardgate::plugin::{LoadOptions, PluginHandle, PluginPool, PoolOptions, load};
    let build = cardgate_sdk::testing::Build {
        release: true,
        flavour: Some("bench".into()),
        ..cardgate_sdk::testing::Build::new("basic-medical")
    };
    let library = build.run().expect("build basic-medical");
    let cache = tempfile::tempdir().expect("temp dir");
    let config = cardgate_tests::example_plugin_config("basic-medical");
    let instance = load("basic-medical", &library, &config, &LoadOptions::new(cache.path())).expect("load");
    let pool = PluginPool::new(PoolOptions::default()).expect("pool");
    let handle = PluginHandle::new(instance, pool, Duration::from_secs(1));
    let request = cardgate_tests::settlement_request(cardgate_tests::bill(lines));
    let call = || {
        handle
            .call_inline::<_, cardgate_sdk::Split>(cardgate_sdk::Operation::Quote, std::hint::black_box(&request))
            .expect("quote")
    };
    let mut rounds: Vec<f64> = (0..21)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..5_000 {
                call();
            }
            started.elapsed().as_secs_f64() * 1e6 / 5_000.0
        })
        .skip(1)
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

/// `loadgen stay LINES`: one inpatient stay of `LINES` fee lines uploaded in batches of 300
/// (the harness's 64 KiB body limit) through the real gateway over TLS: each batch's time as
/// the stay grows (the encounter is read, changed and sealed whole at every change), then the
/// interim settlement of every line and the `GET` of the whole stay.
async fn stay(lines: usize) {
    let options = harness_options();
    let setup = Setup::create(&options, "127.0.0.1:0");
    choose_engine(&setup);
    let (addr, _stop) = serve_setup(&setup).await;
    let client = setup.client(addr, 0);
    let admission = json!({
        "token": setup.token(&Card::in_region("310104"), 600), "terminal_id": "ADM", "med_type": "21",
        "diagnoses": [{ "code": "I21.9", "primary": true }], "begntime": "2026-11-01T08:00:00+08:00"
    })
    .to_string();
    let reply = client
        .send(Method::POST, "/v1/encounters", &[("idempotency-key", "stay")], Some(&admission))
        .await
        .expect("admit");
    let id = reply.json()["encounter_id"].as_str().expect("encounter id").to_owned();
    let path = format!("/v1/encounters/{id}/fees");
    println!("one stay, {lines} fee lines in batches of 300 (ms per batch, as the stay grows):");
    println!("| lines before | batch ms |\n|---|---|");
    let mut uploaded = 0;
    while uploaded < lines {
        let count = 300.min(lines - uploaded);
        let fees: Vec<serde_json::Value> = (uploaded..uploaded + count)
            .map(|sn| {
                json!({ "feedetl_sn": sn.to_string(), "code": "XA01", "name": "drug", "category": "class_a",
                "quantity": 1, "unit_price_fen": 100, "amount_fen": 100 })
            })
            .collect();
        let body = json!({ "fees": fees }).to_string();
        let started = Instant::now();
        let reply = client.send(Method::POST, &path, &[], Some(&body)).await.expect("upload");
        assert!(reply.status.is_success(), "{}: {}", reply.status, reply.body);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if uploaded == 0 || (uploaded + count) % 5_000 < 300 || uploaded + count == lines {
            println!("| {uploaded} | {ms:.1} |");
        }
        uploaded += count;
    }
    let body = json!({ "interim": true, "use_account": false }).to_string();
    let started = Instant::now();
    let settlement = format!("/v1/encounters/{id}/settlements");
    let reply = client.send(Method::POST, &settlement, &[("idempotency-key", "settle")], Some(&body)).await;
    let reply = reply.expect("settle");
    assert!(reply.status.is_success(), "{}: {}", reply.status, reply.body);
    println!("interim settlement of {lines} lines: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    let started = Instant::now();
    let view = client.send(Method::GET, &format!("/v1/encounters/{id}"), &[], None).await.expect("get");
    println!("GET of the stay: {:.1} ms, {} KiB", started.elapsed().as_secs_f64() * 1e3, view.body.len() / 1024);
}

fn main() {
    cardgate::allocator::tune();
    pin_to_cores();
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime").block_on(run());
}

async fn run() {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(cores) = std::env::var("LOADGEN_PINNED") {
        println!("pinned to {cores} cores (taskset -c 0-{})", cores.parse::<usize>().unwrap_or(1) - 1);
    }
    if args.get(1).is_some_and(|a| a == "rss") {
        let connections = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
        let seconds = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
        rss(connections, seconds).await;
        return;
    }
    if args.get(1).is_some_and(|a| a == "stay") {
        let lines = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
        stay(lines).await;
        return;
    }
    if args.get(1).is_some_and(|a| a == "scale") {
        let seconds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
        let connections = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(256);
        let cores: Vec<usize> = args.iter().skip(4).filter_map(|s| s.parse().ok()).collect();
        scale(seconds, connections, cores);
        return;
    }
    if args.get(1).is_some_and(|a| a == "ledger") {
        let seconds = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
        let mut levels: Vec<usize> = args.iter().skip(3).filter_map(|s| s.parse().ok()).collect();
        if levels.is_empty() {
            levels = vec![64, 512];
        }
        ledger_stage(seconds, &levels).await;
        return;
    }
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let connections: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let duration = Duration::from_secs(seconds);
    let options = harness_options();
    let setup = Setup::create(&options, "127.0.0.1:0");
    choose_engine(&setup);
    choose_batch(&setup);
    let (gateway, _stop) = serve_setup(&setup).await;
    let (floor, floor_sig) = (bare(&setup, false).await, bare(&setup, true).await);

    let only_gateway = args.get(3).is_some_and(|a| a == "gateway");
    if args.get(3).is_some_and(|a| a == "open") {
        // Only the open loop against the full gateway, on a fresh ledger (for profiling it, and
        // for finding where its latency goes): at LOADGEN_OPEN_RATE, else 2,000 req/s.
        let rate = open_rate().unwrap_or(2000.0);
        let fresh = open_loop_bills(&setup, rate, seconds);
        eprintln!("profiling window starts");
        let (writer, commits, shared) = (LedgerCpu::now(), Histogram::commits(), Batches::now());
        let open = drive(&setup.client(gateway, 1), Arc::new(fresh), connections, duration, Some(rate)).await;
        println!(
            "open loop at {rate:.0} req/s, {connections} connections, {seconds} s; latency in ms from the scheduled time"
        );
        println!("| server | req/s | p50 | p90 | p99 | p99.9 | errors | CPU µs/req |");
        println!("|---|---|---|---|---|---|---|---|");
        row("(b) full gateway", &open);
        serialized_work(&writer, &open);
        Histogram::commits().report_commits(&commits, duration);
        Batches::now().report(&shared);
        return;
    }
    let budget = (seconds as usize) * if only_gateway { 15_000 } else { 60_000 };
    eprintln!("minting {budget} tokens ...");
    let minted = Instant::now();
    let bodies: Vec<String> = (0..budget).map(|_| bill(&setup.token(&Card::beijing(), 600))).collect();
    eprintln!("minted in {:.1} s", minted.elapsed().as_secs_f64());
    let bodies = Arc::new(bodies);
    println!("closed loop, {connections} connections, {seconds} s each; latency in ms");
    println!("| server | req/s | p50 | p90 | p99 | p99.9 | errors | CPU µs/req |");
    println!("|---|---|---|---|---|---|---|---|");
    if only_gateway {
        eprintln!("profiling window starts");
        let (writer, shared) = (LedgerCpu::now(), Batches::now());
        let b = drive(&setup.client(gateway, 1), Arc::clone(&bodies), connections, duration, None).await;
        row("(b) full gateway", &b);
        Batches::now().report(&shared);
        serialized_work(&writer, &b);
        return;
    }
    let a = drive(&setup.client(floor, 1), Arc::clone(&bodies), connections, duration, None).await;
    row("(a) bare mTLS floor", &a);
    // (a') and (b) slice by slice; each (b) slice settles bills of its own (the ledger takes a
    // token once), which the (a') slice before it checks first (the floor keeps nothing).
    let bodies = Arc::try_unwrap(bodies).unwrap_or_else(|shared| shared.as_ref().clone());
    let slice = duration / SLICES as u32;
    let (writer, database) = (LedgerCpu::now(), postgres_cpu());
    let (mut a_sig, mut b) = (Run::default(), Run::default());
    // Only the gateway records these: the floor's slices add nothing to them.
    let shared = Batches::now();
    for chunk in split_bodies(bodies, SLICES) {
        let chunk = Arc::new(chunk);
        let sig = drive(&setup.client(floor_sig, 1), Arc::clone(&chunk), connections, slice, None).await;
        a_sig = a_sig.merged(sig);
        b = b.merged(drive(&setup.client(gateway, 1), chunk, connections, slice, None).await);
    }
    row("(a') floor + Ed25519", &a_sig);
    row("(b) full gateway", &b);
    Batches::now().report(&shared);
    let busiest = serialized_work(&writer, &b);
    if args.get(3).is_some_and(|a| a == "closed") {
        // One line for `loadgen scale`, which runs this pinned to each core count.
        println!(
            "{SCALE_ROW} {:.0} {:.0} {:.0} {:.1}",
            a.throughput(),
            a_sig.throughput(),
            b.throughput(),
            busiest.unwrap_or(f64::NAN)
        );
        return;
    }
    if postgres() && b.completed > 0 {
        let spent = postgres_cpu().saturating_sub(database);
        println!(
            "database: PostgreSQL spent {:.1} µs of CPU per settlement ({} settlements)",
            spent.as_secs_f64() * 1e6 / b.completed as f64,
            b.completed
        );
    }
    println!(
        "\nratios: (b)/(a') = {:.2}, (b)/(a) = {:.2}",
        b.throughput() / a_sig.throughput(),
        b.throughput() / a.throughput()
    );
    // Open loop at half the gateway's maximum, fresh tokens.
    // `LOADGEN_OPEN_RATE=R`: the open loop at R req/s instead (to compare engines at one rate).
    let half = (b.throughput() / 2.0).max(1.0);
    let rate = open_rate().unwrap_or(half);
    let fresh = open_loop_bills(&setup, rate, seconds);
    let (commits, shared) = (Histogram::commits(), Batches::now());
    let open = drive(&setup.client(gateway, 1), Arc::new(fresh), connections.max(64), duration, Some(rate)).await;
    let which = if rate == half { "half the gateway's maximum" } else { "LOADGEN_OPEN_RATE" };
    println!("\nopen loop at {rate:.0} req/s ({which}), latency from the scheduled time:");
    println!("| server | req/s | p50 | p90 | p99 | p99.9 | errors | CPU µs/req |");
    println!("|---|---|---|---|---|---|---|---|");
    row("(b) full gateway", &open);
    Histogram::commits().report_commits(&commits, duration);
    Batches::now().report(&shared);
    // The other targets, in the same run.
    let (dispatch_10, dispatch_3) = (plugin_dispatch_us(10), plugin_dispatch_us(3));
    println!();
    let peak = rss(1000, seconds).await;
    let ratio = b.throughput() / a_sig.throughput();
    let met = |ok: bool| if ok { "yes" } else { "no" };
    println!("\ntargets, this run:");
    println!("| target | goal | measured | met |");
    println!("|---|---|---|---|");
    println!("| full pipeline / (a') maximum throughput | >= 0.50 | {ratio:.2} | {} |", met(ratio >= 0.5));
    let p99 = open.percentile(0.99);
    if rate == half {
        println!("| p99 at half the gateway's maximum, fsync on | <= 10 ms | {p99:.2} ms | {} |", met(p99 <= 10.0));
    } else {
        println!("| p99 at half the gateway's maximum, fsync on | <= 10 ms | {p99:.2} ms at {rate:.0} req/s | n/a |");
    }
    println!(
        "| in-process plugin dispatch (10-line bill; 3-line: {dispatch_3:.2} µs) | < 5 µs | {dispatch_10:.2} µs | {} |",
        met(dispatch_10 < 5.0)
    );
    println!(
        "| resident memory, 1,000 connections settling (peak) | <= 150 MiB | {peak:.1} MiB | {} |",
        met(peak <= 150.0)
    );
}
