//! The cluster ledger: several gateway nodes sharing one PostgreSQL database
//! (`[ledger] backend = "postgres"`).
//!
//! Every guarantee of the embedded ledger is the database's here, not one node's memory:
//! - a token or quote settles once: the primary keys of `used_tokens` / `used_quotes`;
//! - an idempotency key names one settlement: a unique key on (institution, key);
//! - no overspend: an outcome's accumulator changes are conditional upserts (the row changes
//!   only if it still holds the figures the payers were given; the upsert locks the row, so
//!   two nodes settling one card at once cannot both pass), in the outcome's transaction;
//! - a settlement is completed by one node at a time: the node that records an intent holds
//!   its lease ([`Ledger::claim`]); another node takes it over only once the lease ran out.
//!
//! Reads and writes are futures: a node waiting for the database holds no thread. Each
//! operation runs under a deadline (the pool's wait, the server's `statement_timeout`, and
//! one around the whole): a database that went away is a `Storage` error, 503
//! `storage_unavailable` to the client, never a hang. Schema migrations (refinery, under an
//! advisory lock so that nodes starting together apply them once) run at open.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cardgate_sdk::YearToDate;
use deadpool_postgres::{GenericClient, Pool};
use tokio_postgres::error::SqlState;

use super::{
    AccumulatorDelta, DumpItem, Intent, Ledger, LedgerError, LedgerFuture, Listed, Outcome, Reconciliation, Record,
    SettledDeltas, State, StoredQuote, Unresolved,
};
use crate::config::PostgresConfig;

mod embedded {
    refinery::embed_migrations!("migrations/postgres");
}

/// Taken while migrating: nodes starting together apply the migrations once.
const MIGRATION_LOCK: i64 = 0x6361_7264_6761_7465; // "cardgate"

/// The PostgreSQL ledger.
pub struct PgLedger {
    pool: Pool,
    /// This process, as a lease owner: new at every start.
    node: String,
    lease_secs: i64,
    /// The longest one operation may take, all included.
    deadline: Duration,
    /// The last operation failed for want of the database.
    failing: AtomicBool,
}

impl std::fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLedger").field("node", &self.node).field("lease_secs", &self.lease_secs).finish()
    }
}

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(format!("postgres: {e}"))
}

/// A database error as the ledger reports it: a unique key says what was taken; anything
/// else says what the server said (its code and message — not its detail, which may quote the
/// row's values), where the driver's own text would be only "db error".
fn db(e: tokio_postgres::Error) -> LedgerError {
    let Some(error) = e.as_db_error() else { return storage(e) };
    if *error.code() == SqlState::UNIQUE_VIOLATION {
        match error.constraint() {
            Some("used_tokens_pkey") => return LedgerError::TokenUsed,
            Some("used_quotes_pkey") => return LedgerError::QuoteUsed,
            Some("settlements_idempotency_key" | "encounters_idempotency_key") => {
                return LedgerError::IdempotencyTaken;
            }
            _ => {}
        }
    }
    storage(format!("db error {}: {}", error.code().code(), error.message()))
}

impl PgLedger {
    /// Connects, applies the schema's migrations and makes the pool. Blocks the calling thread
    /// while migrating (on a thread of its own, with a runtime of its own: callable from
    /// inside a runtime, as the gateway builds).
    pub fn open(config: &PostgresConfig) -> Result<Self, LedgerError> {
        let (pg, statement, connect) = connection(config)?;
        migrate(&pg, connect + statement * 4)?;
        let manager = deadpool_postgres::Manager::from_config(
            pg,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(statement))
            .create_timeout(Some(connect))
            .recycle_timeout(Some(connect))
            .build()
            .map_err(storage)?;
        Ok(Self {
            pool,
            node: node_name(),
            lease_secs: config.lease_secs,
            deadline: statement + connect * 2,
            failing: AtomicBool::new(false),
        })
    }

    /// This process's name as a lease owner.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `work` on a pooled connection under the deadline; notes whether the database
    /// answers.
    async fn with<T>(
        &self,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Client) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let attempt = async {
            let mut client = self.pool.get().await.map_err(storage)?;
            work(&mut client).await
        };
        let result = match tokio::time::timeout(self.deadline, attempt).await {
            Ok(result) => result,
            Err(_) => Err(LedgerError::Storage("postgres: no answer in time".into())),
        };
        let down = matches!(&result, Err(LedgerError::Storage(_)));
        if self.failing.swap(down, Ordering::Relaxed) != down {
            if down {
                tracing::error!(error = ?result.as_ref().err(), "ledger: the database fails; requests get 503 until it answers");
            } else {
                tracing::info!("ledger: the database answers again");
            }
        }
        result
    }

    /// Runs `work` in a transaction: committed if it succeeds, rolled back if not.
    async fn transaction<T>(
        &self,
        work: impl AsyncFnOnce(&deadpool_postgres::Transaction<'_>) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        self.with(async |client| {
            let started = std::time::Instant::now();
            let tx = client.transaction().await.map_err(db)?;
            let value = work(&tx).await?;
            tx.commit().await.map_err(db)?;
            crate::metrics::ledger_commit(1, started.elapsed());
            Ok(value)
        })
        .await
    }
}

/// How to connect, and the statement and connect timeouts.
fn connection(config: &PostgresConfig) -> Result<(tokio_postgres::Config, Duration, Duration), LedgerError> {
    let mut pg: tokio_postgres::Config = config.url.parse().map_err(storage)?;
    if !config.password.is_empty() {
        pg.password(config.password.as_bytes());
    }
    let statement = Duration::from_millis(config.statement_timeout_ms);
    let connect = Duration::from_millis(config.connect_timeout_ms);
    pg.connect_timeout(connect);
    pg.application_name("cardgate");
    // The server ends a statement that runs too long, and a transaction left idle (a node
    // stopped between two statements) before it holds rows locked for long.
    pg.options(format!(
        "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        config.statement_timeout_ms,
        config.statement_timeout_ms * 2
    ));
    Ok((pg, statement, connect))
}

/// What `cardgate check-config` says of the database: that it answers (connecting as `serve`
/// would, changing nothing), its version, and whether `serve` will create or migrate the
/// schema.
pub fn check(config: &PostgresConfig) -> Result<String, LedgerError> {
    let (pg, statement, connect) = connection(config)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(storage)?;
                runtime.block_on(async {
                    let work = async {
                        let (client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(storage)?;
                        let connection = tokio::spawn(connection);
                        let row = client
                            .query_one(
                                "SELECT current_setting('server_version'),
                                     to_regclass('cardgate_schema_history') IS NOT NULL",
                                &[],
                            )
                            .await
                            .map_err(storage)?;
                        let (version, has_schema): (String, bool) = (row.get(0), row.get(1));
                        let latest = embedded::migrations::runner().get_migrations().iter().map(|m| m.version()).max();
                        let applied: Option<i32> = if has_schema {
                            client
                                .query_one("SELECT max(version) FROM cardgate_schema_history", &[])
                                .await
                                .map_err(storage)?
                                .get(0)
                        } else {
                            None
                        };
                        drop(client);
                        let _ = connection.await;
                        let schema = match (applied, latest) {
                            (None, _) => "no ledger yet: `serve` creates it".to_owned(),
                            (Some(a), Some(l)) if i64::from(a) >= i64::from(l) => {
                                format!("ledger schema version {a}, current")
                            }
                            (Some(a), Some(l)) => format!("ledger schema version {a}: `serve` migrates it to {l}"),
                            (Some(a), None) => format!("ledger schema version {a}"),
                        };
                        Ok(format!("PostgreSQL {version}; {schema}"))
                    };
                    tokio::time::timeout(connect + statement, work)
                        .await
                        .unwrap_or_else(|_| Err(LedgerError::Storage("postgres: no answer in time".into())))
                })
            })
            .join()
            .unwrap_or_else(|_| Err(LedgerError::Storage("postgres: the check failed".into())))
    })
}

/// A name for this process as a lease owner: its host, its pid and a random part (a
/// restarted node is another owner; its old leases run out).
fn node_name() -> String {
    use ring::rand::SecureRandom;
    let mut random = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut random);
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    format!("{host}/{}/{:08x}", std::process::id(), u32::from_be_bytes(random))
}

/// Applies the schema's migrations, on a thread of its own with a runtime of its own
/// (callable from inside a runtime).
fn migrate(config: &tokio_postgres::Config, deadline: Duration) -> Result<(), LedgerError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| migrate_here(config, deadline))
            .join()
            .unwrap_or_else(|_| Err(LedgerError::Storage("postgres: the migration thread failed".into())))
    })
}

fn migrate_here(config: &tokio_postgres::Config, deadline: Duration) -> Result<(), LedgerError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(storage)?;
    runtime.block_on(async {
        let work = async {
            let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(storage)?;
            let connection = tokio::spawn(connection);
            client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(storage)?;
            let report = embedded::migrations::runner()
                .set_migration_table_name("cardgate_schema_history")
                .run_async(&mut client)
                .await
                .map_err(|e| LedgerError::Storage(format!("postgres: migrating the ledger's schema: {e}")));
            let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await;
            for applied in report?.applied_migrations() {
                tracing::info!(version = applied.version(), name = applied.name(), "ledger: schema migration applied");
            }
            drop(client);
            let _ = connection.await;
            Ok(())
        };
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or_else(|_| Err(LedgerError::Storage("postgres: no answer in time".into())))
    })
}

/// The transaction id below which every transaction of this database has ended: the oldest
/// one still running here, or the next to start. Three steps, in this order, outside any
/// transaction: (1) the transactions running on the server (its snapshot); (2) those of them
/// that belong to this database (`pg_stat_activity`, read after (1)); (3) the caller's query,
/// on a snapshot taken after (2). A transaction of this database below the horizon either
/// ended before (1), or was running at (1) and — not found at (2) — ended before (2): both are
/// visible at (3). Transactions of other databases on the server do not hold it back.
/// (`pg_stat_activity` shows a session's transaction to the same role: every node connects as
/// one role, or has `pg_read_all_stats`.)
async fn horizon(c: &impl GenericClient) -> Result<i64, LedgerError> {
    let running = c
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                 ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(pg_current_snapshot()) x)",
            &[],
        )
        .await
        .map_err(db)?;
    let (next, running): (i64, Vec<i64>) = (running.try_get(0).map_err(db)?, running.try_get(1).map_err(db)?);
    if running.is_empty() {
        return Ok(next);
    }
    let here: Vec<i64> = c
        .query(
            "SELECT backend_xid::text::bigint FROM pg_stat_activity
             WHERE datname = current_database() AND backend_xid IS NOT NULL",
            &[],
        )
        .await
        .map_err(db)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(db)?;
    // `backend_xid` is the 32-bit form of a full transaction id.
    Ok(running.into_iter().filter(|x| here.contains(&(x & 0xffff_ffff))).min().unwrap_or(next).min(next))
}

const RECORD_SELECT: &str =
    "SELECT id, institution, request_hash, state, status, body, reversal, created_at FROM settlements";

fn record(row: &tokio_postgres::Row) -> Result<Record, LedgerError> {
    Ok(Record {
        id: row.try_get(0).map_err(db)?,
        institution: row.try_get(1).map_err(db)?,
        request_hash: row.try_get(2).map_err(db)?,
        state: state(row.try_get(3).map_err(db)?),
        status: u16::try_from(row.try_get::<_, i32>(4).map_err(db)?).unwrap_or(0),
        body: row.try_get(5).map_err(db)?,
        reversal: row.try_get(6).map_err(db)?,
        created_at: row.try_get(7).map_err(db)?,
    })
}

fn state(name: &str) -> State {
    State::parse(name).unwrap_or(State::Unknown)
}

const UNRESOLVED_SELECT: &str = "SELECT id, institution, state, sealed_request, created_at FROM settlements";

fn unresolved_row(row: &tokio_postgres::Row) -> Result<Unresolved, LedgerError> {
    Ok(Unresolved {
        id: row.try_get(0).map_err(db)?,
        institution: row.try_get(1).map_err(db)?,
        state: state(row.try_get(2).map_err(db)?),
        sealed_request: row.try_get(3).map_err(db)?,
        created_at: row.try_get(4).map_err(db)?,
    })
}

/// The columns of a settlement's intent, `$1` to `$16` in the statements that insert one, with
/// their values from [`intent_values`].
macro_rules! insert_intent {
    ($more_columns:literal, $more_values:literal) => {
        concat!(
            "INSERT INTO settlements (id, institution, terminal, idempotency_key, request_hash, token_id, quote_id, ",
            "card_hash, card_masked, total_fen, day, created_at, sealed_request, insurance_type, clearing_type, delegated, ",
            $more_columns,
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, ",
            $more_values,
            ")"
        )
    };
}

/// A statement parameter.
type Param<'p> = &'p (dyn tokio_postgres::types::ToSql + Sync);

/// The intent's values, `$1` to `$16` of [`insert_intent`] (`day`: its business day).
fn intent_values<'a>(i: &'a Intent, day: &'a String) -> Vec<Param<'a>> {
    vec![
        &i.id,
        &i.institution,
        &i.terminal,
        &i.idempotency_key,
        &i.request_hash,
        &i.token_id,
        &i.quote_id,
        &i.card_hash,
        &i.card_masked,
        &i.total_fen,
        day,
        &i.created_at,
        &i.sealed_request,
        &i.insurance_type,
        &i.clearing_type,
        &i.delegated,
    ]
}

const INSERT_ENCOUNTER: &str = "INSERT INTO encounters (id, institution, idempotency_key, request_hash, token_id,
    card_hash, created_at, version, sealed) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

const ENCOUNTER_SELECT: &str = "SELECT id, institution, idempotency_key, request_hash, token_id, card_hash,
    created_at, version, sealed FROM encounters";

fn encounter_values(e: &super::StoredEncounter) -> [Param<'_>; 9] {
    [
        &e.id,
        &e.institution,
        &e.idempotency_key,
        &e.request_hash,
        &e.token_id,
        &e.card_hash,
        &e.created_at,
        &e.version,
        &e.sealed,
    ]
}

fn encounter_row(r: &tokio_postgres::Row) -> Result<super::StoredEncounter, LedgerError> {
    Ok(super::StoredEncounter {
        id: r.try_get(0).map_err(db)?,
        institution: r.try_get(1).map_err(db)?,
        idempotency_key: r.try_get(2).map_err(db)?,
        request_hash: r.try_get(3).map_err(db)?,
        token_id: r.try_get(4).map_err(db)?,
        card_hash: r.try_get(5).map_err(db)?,
        created_at: r.try_get(6).map_err(db)?,
        version: r.try_get(7).map_err(db)?,
        sealed: r.try_get(8).map_err(db)?,
    })
}

/// Marks a token (`$1`) used by a settlement (`$2`); a quote likewise.
const INSERT_TOKEN: &str = "INSERT INTO used_tokens (token_id, settlement) VALUES ($1, $2)";
const INSERT_QUOTE: &str = "INSERT INTO used_quotes (quote_id, settlement) VALUES ($1, $2)";
/// Whether a token (`$1`) is spent; a quote likewise.
const TOKEN_SPENT: &str = "SELECT 1 FROM used_tokens WHERE token_id = $1";
const QUOTE_SPENT: &str = "SELECT 1 FROM used_quotes WHERE quote_id = $1";

/// Inserts a pending intent, held by `owner` for `lease_secs`, with its token (or quote).
async fn begin_intent(tx: &impl GenericClient, i: &Intent, owner: &str, lease_secs: i64) -> Result<(), LedgerError> {
    let statement = tx
        .prepare_cached(insert_intent!("lease_owner, lease_until", "$17, now() + make_interval(secs => $18::bigint)"))
        .await
        .map_err(db)?;
    let day = super::business_day(i.created_at);
    let mut values = intent_values(i, &day);
    values.extend([&owner as Param<'_>, &lease_secs]);
    tx.execute(&statement, &values).await.map_err(db)?;
    if let Some(token_id) = &i.token_id {
        let statement = tx.prepare_cached(INSERT_TOKEN).await.map_err(db)?;
        tx.execute(&statement, &[token_id, &i.id]).await.map_err(db)?;
    }
    if let Some(quote_id) = &i.quote_id {
        let statement = tx.prepare_cached(INSERT_QUOTE).await.map_err(db)?;
        tx.execute(&statement, &[quote_id, &i.id]).await.map_err(db)?;
    }
    Ok(())
}

/// An intent with its outcome and accumulator changes, in the caller's transaction, every
/// statement sent at once (the connection pipelines them); the first refused decides.
async fn record_pipelined(
    tx: &deadpool_postgres::Transaction<'_>,
    i: &Intent,
    o: &Outcome,
    deltas: &str,
    payers: &str,
) -> Result<(), LedgerError> {
    let insert = tx
        .prepare_cached(insert_intent!(
            "state, status, body, deltas, payers, fund_fen, account_fen, cash_fen, updated_at",
            "$17, $18, $19, $20, $21::text::jsonb, $22, $23, $24, $25"
        ))
        .await
        .map_err(db)?;
    let upsert = tx.prepare_cached(UPSERT_ACCUMULATORS).await.map_err(db)?;
    let (day, state, status) = (super::business_day(i.created_at), o.state.as_str(), i32::from(o.status));
    let amounts = o.amounts.as_ref();
    let (fund, account, cash) =
        (amounts.map_or(0, |a| a.fund_fen), amounts.map_or(0, |a| a.account_fen), amounts.map_or(0, |a| a.cash_fen));
    let mut row = intent_values(i, &day);
    row.extend([&state as Param<'_>, &status, &o.body, &deltas, &payers, &fund, &account, &cash, &o.at]);
    let read = if o.state == State::Settled { &o.read[..] } else { &[] };
    let figures: Vec<Figures> = o.deltas.iter().map(|d| Figures::of(d, read)).collect();
    let upserts: Vec<[Param<'_>; 16]> =
        o.deltas.iter().zip(&figures).map(|(d, f)| f.params(&o.card_hash, &d.payer)).collect();
    // A refused settlement holds neither its token nor its quote: the patient may try again.
    // It is still refused when its token or quote is spent already — a replay, answered as
    // such, as by the other engines — so then they are only looked up (`execute` answers a
    // SELECT's row count).
    let holds = matches!(o.state, State::Settled | State::Unknown);
    let (token, quote) = if holds {
        (tx.prepare_cached(INSERT_TOKEN).await.map_err(db)?, tx.prepare_cached(INSERT_QUOTE).await.map_err(db)?)
    } else {
        (tx.prepare_cached(TOKEN_SPENT).await.map_err(db)?, tx.prepare_cached(QUOTE_SPENT).await.map_err(db)?)
    };
    let token_row: [Param<'_>; 2] = [&i.token_id, &i.id];
    let quote_row: [Param<'_>; 2] = [&i.quote_id, &i.id];
    let mut sent: Vec<Sent<'_>> = vec![Box::pin(tx.execute(&insert, &row))];
    // Where each lookup's answer will be, and what a spent one is refused as.
    let mut spent = Vec::with_capacity(2);
    let width = if holds { 2 } else { 1 };
    for (present, statement, values, used) in [
        (i.token_id.is_some(), &token, &token_row, LedgerError::TokenUsed),
        (i.quote_id.is_some(), &quote, &quote_row, LedgerError::QuoteUsed),
    ] {
        if present {
            spent.push((sent.len(), used));
            sent.push(Box::pin(tx.execute(statement, &values[..width])));
        }
    }
    let first_upsert = sent.len();
    for params in &upserts {
        sent.push(Box::pin(tx.execute(&upsert, params)));
    }
    let answers = futures_util::future::join_all(sent).await;
    let mut changed = Vec::with_capacity(answers.len());
    // In order: the first refusal is the cause (the statements after it fail as "aborted").
    for answer in answers {
        changed.push(answer.map_err(db)?);
    }
    if !holds && let Some((_, used)) = spent.into_iter().find(|(at, _)| changed[*at] > 0) {
        return Err(used);
    }
    if changed[first_upsert..].contains(&0) {
        return Err(LedgerError::Stale);
    }
    Ok(())
}

/// A statement sent, its answer to come.
type Sent<'a> = std::pin::Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// One payer's accumulator change and, if given, the figures it must find.
struct Figures {
    delta: YearToDate,
    given: bool,
    expected: YearToDate,
}

impl Figures {
    fn of(d: &AccumulatorDelta, read: &[AccumulatorDelta]) -> Self {
        let given = read.iter().find(|r| r.payer == d.payer && r.delta.year == d.delta.year).map(|r| r.delta);
        Self { delta: d.delta, given: given.is_some(), expected: given.unwrap_or_default() }
    }

    fn params<'p>(
        &'p self,
        card_hash: Param<'p>,
        payer: &'p String,
    ) -> [&'p (dyn tokio_postgres::types::ToSql + Sync); 16] {
        let (d, g) = (&self.delta, &self.expected);
        [
            card_hash,
            &d.year,
            payer,
            &d.deductible_fen,
            &d.fund_paid_fen,
            &d.eligible_fen,
            &d.account_paid_fen,
            &d.eligible_self_pay_fen,
            &self.given,
            &g.deductible_fen,
            &g.fund_paid_fen,
            &g.eligible_fen,
            &g.account_paid_fen,
            &g.eligible_self_pay_fen,
            &d.outpatient_fund_paid_fen,
            &g.outpatient_fund_paid_fen,
        ]
    }
}

/// Adds a payer's change to a card's year; with $9, only if the row still holds $10..$14 and $16.
const UPSERT_ACCUMULATORS: &str =
    "INSERT INTO accumulators AS a (card_hash, year, payer, deductible_fen, fund_paid_fen,
         eligible_fen, account_paid_fen, eligible_self_pay_fen, outpatient_fund_paid_fen)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $15)
     ON CONFLICT (card_hash, year, payer) DO UPDATE SET
         deductible_fen = a.deductible_fen + excluded.deductible_fen,
         fund_paid_fen = a.fund_paid_fen + excluded.fund_paid_fen,
         eligible_fen = a.eligible_fen + excluded.eligible_fen,
         account_paid_fen = a.account_paid_fen + excluded.account_paid_fen,
         eligible_self_pay_fen = a.eligible_self_pay_fen + excluded.eligible_self_pay_fen,
         outpatient_fund_paid_fen = a.outpatient_fund_paid_fen + excluded.outpatient_fund_paid_fen
     WHERE NOT $9 OR (a.deductible_fen = $10 AND a.fund_paid_fen = $11 AND a.eligible_fen = $12
         AND a.account_paid_fen = $13 AND a.eligible_self_pay_fen = $14 AND a.outpatient_fund_paid_fen = $16)";

/// Records an outcome over a pending (or unknown) intent, in the caller's transaction.
async fn write_outcome(tx: &impl GenericClient, o: &Outcome, deltas: &str, payers: &str) -> Result<(), LedgerError> {
    let statement = tx
        .prepare_cached("SELECT token_id, quote_id, state FROM settlements WHERE id = $1 FOR UPDATE")
        .await
        .map_err(db)?;
    let Some(row) = tx.query_opt(&statement, &[&o.id]).await.map_err(db)? else { return Err(LedgerError::NotFound) };
    let (token_id, quote_id): (Option<Vec<u8>>, Option<String>) =
        (row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?);
    if !matches!(row.try_get::<_, &str>(2).map_err(db)?, "pending" | "unknown") {
        return Err(LedgerError::NotFound);
    }
    let amounts = o.amounts.as_ref();
    let statement = tx
        .prepare_cached(
            "UPDATE settlements SET state = $2, status = $3, body = $4, deltas = $5, payers = $6::text::jsonb,
                 fund_fen = $7, account_fen = $8, cash_fen = $9, updated_at = $10, lease_owner = NULL,
                 lease_until = NULL
             WHERE id = $1",
        )
        .await
        .map_err(db)?;
    tx.execute(
        &statement,
        &[
            &o.id,
            &o.state.as_str(),
            &i32::from(o.status),
            &o.body,
            &deltas,
            &payers,
            &amounts.map_or(0, |a| a.fund_fen),
            &amounts.map_or(0, |a| a.account_fen),
            &amounts.map_or(0, |a| a.cash_fen),
            &o.at,
        ],
    )
    .await
    .map_err(db)?;
    if !matches!(o.state, State::Settled | State::Unknown) {
        if let Some(token_id) = token_id {
            let statement = tx.prepare_cached("DELETE FROM used_tokens WHERE token_id = $1").await.map_err(db)?;
            tx.execute(&statement, &[&token_id]).await.map_err(db)?;
        }
        if let Some(quote_id) = quote_id {
            let statement = tx.prepare_cached("DELETE FROM used_quotes WHERE quote_id = $1").await.map_err(db)?;
            tx.execute(&statement, &[&quote_id]).await.map_err(db)?;
        }
    }
    Ok(())
}

/// Adds each payer's change to the card's accumulators. With `read` (the figures the payers
/// were given), a payer's row changes only if it still holds them; a row that moved makes the
/// whole transaction [`LedgerError::Stale`]. The upsert locks the row: of two nodes changing
/// one card's figures at once, the second sees the first's and finds them moved.
async fn add_accumulators(
    tx: &impl GenericClient,
    card_hash: &[u8],
    deltas: &[AccumulatorDelta],
    read: &[AccumulatorDelta],
) -> Result<(), LedgerError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let statement = tx.prepare_cached(UPSERT_ACCUMULATORS).await.map_err(db)?;
    for delta in deltas {
        let figures = Figures::of(delta, read);
        let changed = tx.execute(&statement, &figures.params(&card_hash, &delta.payer)).await.map_err(db)?;
        if changed == 0 {
            return Err(LedgerError::Stale);
        }
    }
    Ok(())
}

/// The settlements an institution made on a day (settled then, reversed since or not).
const DAY_SETTLED: &str = "WHERE institution = $1 AND day = $2 AND state IN ('settled', 'reversed')";
/// The reversals an institution made on a day, whatever day their settlements were.
const DAY_REVERSED: &str = "WHERE institution = $1 AND reversed_day = $2";

/// Totals per insurance type and clearing type.
async fn type_sums(
    c: &impl GenericClient,
    institution: &str,
    date: &str,
    filter: &str,
) -> Result<super::TypeSums, LedgerError> {
    let sql = format!(
        "SELECT insurance_type, clearing_type, count(*), sum(total_fen)::bigint, sum(fund_fen)::bigint,
             sum(account_fen)::bigint, sum(cash_fen)::bigint,
             sum(CASE WHEN delegated THEN account_fen ELSE 0 END)::bigint FROM settlements {filter} GROUP BY 1, 2"
    );
    let statement = c.prepare_cached(&sql).await.map_err(db)?;
    let mut sums = super::TypeSums::new();
    for r in c.query(&statement, &[&institution, &date]).await.map_err(db)? {
        let totals = super::Totals {
            count: u64::try_from(r.try_get::<_, i64>(2).map_err(db)?).unwrap_or(0),
            total_fen: r.try_get(3).map_err(db)?,
            fund_pay_fen: r.try_get(4).map_err(db)?,
            account_pay_fen: r.try_get(5).map_err(db)?,
            cash_pay_fen: r.try_get(6).map_err(db)?,
            mutual_aid_pay_fen: r.try_get(7).map_err(db)?,
        };
        sums.insert((r.try_get(0).map_err(db)?, r.try_get(1).map_err(db)?), totals);
    }
    Ok(sums)
}

async fn payer_sums(
    c: &impl GenericClient,
    institution: &str,
    date: &str,
    filter: &str,
) -> Result<super::PayerSums, LedgerError> {
    let sql = format!(
        "SELECT p ->> 0, count(*), coalesce(sum((p ->> 1)::bigint), 0)::bigint,
             coalesce(sum((p ->> 2)::bigint), 0)::bigint
         FROM settlements, jsonb_array_elements(payers) p {filter} GROUP BY 1"
    );
    let statement = c.prepare_cached(&sql).await.map_err(db)?;
    let mut sums = super::PayerSums::new();
    for r in c.query(&statement, &[&institution, &date]).await.map_err(db)? {
        let count = u64::try_from(r.try_get::<_, i64>(1).map_err(db)?).unwrap_or(0);
        sums.insert(r.try_get(0).map_err(db)?, (count, r.try_get(2).map_err(db)?, r.try_get(3).map_err(db)?));
    }
    Ok(sums)
}

async fn reconcile(
    c: &impl GenericClient,
    institution: &str,
    date: &str,
    page: u32,
    page_size: u32,
) -> Result<Reconciliation, LedgerError> {
    let (settled, reversed, by_type) = super::by_type(
        &type_sums(c, institution, date, DAY_SETTLED).await?,
        &type_sums(c, institution, date, DAY_REVERSED).await?,
    );
    let gross = payer_sums(c, institution, date, DAY_SETTLED).await?;
    let back = payer_sums(c, institution, date, DAY_REVERSED).await?;
    let (net, payers) = super::net_and_payers(&settled, &reversed, &gross, back);
    let details = day_details(c, institution, date, page, page_size).await?;
    Ok(Reconciliation {
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
async fn day_details(
    c: &impl GenericClient,
    institution: &str,
    date: &str,
    page: u32,
    page_size: u32,
) -> Result<Vec<super::DetailLine>, LedgerError> {
    let sql = format!(
        "SELECT * FROM (
             SELECT 'settled' AS event, seq, created_at AS at, id, state, terminal, card_masked, total_fen,
                 fund_fen, account_fen, cash_fen, insurance_type, clearing_type FROM settlements {DAY_SETTLED}
             UNION ALL
             SELECT 'reversed', seq, updated_at, id, state, terminal, card_masked, total_fen, fund_fen,
                 account_fen, cash_fen, insurance_type, clearing_type FROM settlements {DAY_REVERSED}) events
         ORDER BY at, seq, event DESC LIMIT $3 OFFSET $4"
    );
    let statement = c.prepare_cached(&sql).await.map_err(db)?;
    let offset = i64::from(page.saturating_sub(1)) * i64::from(page_size);
    let mut details = Vec::new();
    for r in c.query(&statement, &[&institution, &date, &i64::from(page_size), &offset]).await.map_err(db)? {
        details.push(super::DetailLine {
            event: r.try_get(0).map_err(db)?,
            settlement_id: r.try_get(3).map_err(db)?,
            state: r.try_get(4).map_err(db)?,
            terminal_id: r.try_get(5).map_err(db)?,
            card: r.try_get(6).map_err(db)?,
            created_at: super::rfc3339(r.try_get(2).map_err(db)?),
            total_fen: r.try_get(7).map_err(db)?,
            fund_pay_fen: r.try_get(8).map_err(db)?,
            account_pay_fen: r.try_get(9).map_err(db)?,
            cash_pay_fen: r.try_get(10).map_err(db)?,
            insurance_type: r.try_get(11).map_err(db)?,
            clearing_type: r.try_get(12).map_err(db)?,
        });
    }
    Ok(details)
}

impl Ledger for PgLedger {
    fn by_idempotency_key<'a>(&'a self, institution: &'a str, key: &'a str) -> LedgerFuture<'a, Option<Record>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(&format!("{RECORD_SELECT} WHERE institution = $1 AND idempotency_key = $2"))
                .await
                .map_err(db)?;
            c.query_opt(&statement, &[&institution, &key]).await.map_err(db)?.as_ref().map(record).transpose()
        }))
    }

    fn get<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<Record>> {
        Box::pin(self.with(async move |c| {
            let statement =
                c.prepare_cached(&format!("{RECORD_SELECT} WHERE id = $2 AND institution = $1")).await.map_err(db)?;
            c.query_opt(&statement, &[&institution, &id]).await.map_err(db)?.as_ref().map(record).transpose()
        }))
    }

    fn year_to_date<'a>(
        &'a self,
        card_hash: &'a [u8],
        year: i32,
        payers: &'a [&'a str],
    ) -> LedgerFuture<'a, Vec<YearToDate>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(
                    "SELECT payer, deductible_fen, fund_paid_fen, eligible_fen, account_paid_fen, eligible_self_pay_fen,
                         outpatient_fund_paid_fen FROM accumulators WHERE card_hash = $1 AND year = $2",
                )
                .await
                .map_err(db)?;
            let mut found: Vec<YearToDate> =
                payers.iter().map(|_| YearToDate { year, ..YearToDate::default() }).collect();
            for r in c.query(&statement, &[&card_hash, &year]).await.map_err(db)? {
                let payer: &str = r.try_get(0).map_err(db)?;
                if let Some(slot) = payers.iter().position(|p| *p == payer) {
                    found[slot] = YearToDate {
                        year,
                        deductible_fen: r.try_get(1).map_err(db)?,
                        fund_paid_fen: r.try_get(2).map_err(db)?,
                        eligible_fen: r.try_get(3).map_err(db)?,
                        account_paid_fen: r.try_get(4).map_err(db)?,
                        eligible_self_pay_fen: r.try_get(5).map_err(db)?,
                        outpatient_fund_paid_fen: r.try_get(6).map_err(db)?,
                    };
                }
            }
            Ok(found)
        }))
    }

    fn begin(&self, intent: Intent) -> LedgerFuture<'_, ()> {
        Box::pin(self.transaction(async move |tx| begin_intent(tx, &intent, &self.node, self.lease_secs).await))
    }

    /// One transaction, its statements sent together: `BEGIN`, then the settlement row, its
    /// token (or quote) and each payer's conditional upsert in one round trip, then `COMMIT`
    /// (or, if any was refused, a rollback).
    fn record(&self, intent: Intent, o: Outcome) -> LedgerFuture<'_, ()> {
        let (deltas, payers) = o.encoded();
        Box::pin(self.transaction(async move |tx| record_pipelined(tx, &intent, &o, &deltas, &payers).await))
    }

    fn finish(&self, o: Outcome) -> LedgerFuture<'_, ()> {
        let (deltas, payers) = o.encoded();
        Box::pin(self.transaction(async move |tx| {
            write_outcome(tx, &o, &deltas, &payers).await?;
            let read = if o.state == State::Settled { &o.read[..] } else { &[] };
            add_accumulators(tx, &o.card_hash, &o.deltas, read).await
        }))
    }

    fn reverse(
        &self,
        id: String,
        body: String,
        deltas: Vec<AccumulatorDelta>,
        card_hash: Vec<u8>,
        at: i64,
    ) -> LedgerFuture<'_, ()> {
        Box::pin(self.transaction(async move |tx| {
            let statement = tx
                .prepare_cached(
                    "UPDATE settlements SET state = 'reversed', reversal = $2, updated_at = $3, reversed_day = $4
                     WHERE id = $1 AND state = 'settled'",
                )
                .await
                .map_err(db)?;
            let changed = tx.execute(&statement, &[&id, &body, &at, &super::business_day(at)]).await.map_err(db)?;
            if changed != 1 {
                return Err(LedgerError::NotFound);
            }
            add_accumulators(tx, &card_hash, &deltas, &[]).await
        }))
    }

    fn close_day<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        closed: super::ClosedDay,
    ) -> LedgerFuture<'a, super::ClosedDay> {
        Box::pin(self.with(async move |c| {
            // One statement: the closing inserted, or the first one kept and answered.
            let statement = c
                .prepare_cached(
                    "WITH first AS (INSERT INTO closed_days (institution, day, closed_at, totals)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (institution, day) DO NOTHING
                         RETURNING closed_at, totals)
                     SELECT closed_at, totals FROM first
                     UNION ALL SELECT closed_at, totals FROM closed_days WHERE institution = $1 AND day = $2",
                )
                .await
                .map_err(db)?;
            let r = c
                .query(&statement, &[&institution, &date, &closed.closed_at, &closed.totals])
                .await
                .map_err(db)?
                .into_iter()
                .next()
                .ok_or(LedgerError::NotFound)?;
            Ok(super::ClosedDay { closed_at: r.try_get(0).map_err(db)?, totals: r.try_get(1).map_err(db)? })
        }))
    }

    fn open_encounter(&self, e: super::StoredEncounter) -> LedgerFuture<'_, ()> {
        Box::pin(self.transaction(async move |tx| {
            let statement = tx.prepare_cached(INSERT_ENCOUNTER).await.map_err(db)?;
            tx.execute(&statement, &encounter_values(&e)).await.map_err(db)?;
            if let Some(token_id) = &e.token_id {
                let statement = tx.prepare_cached(INSERT_TOKEN).await.map_err(db)?;
                tx.execute(&statement, &[token_id, &e.id]).await.map_err(db)?;
            }
            Ok(())
        }))
    }

    fn encounter<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<super::StoredEncounter>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(&format!("{ENCOUNTER_SELECT} WHERE institution = $1 AND id = $2"))
                .await
                .map_err(db)?;
            c.query_opt(&statement, &[&institution, &id]).await.map_err(db)?.as_ref().map(encounter_row).transpose()
        }))
    }

    fn encounter_by_key<'a>(
        &'a self,
        institution: &'a str,
        key: &'a str,
    ) -> LedgerFuture<'a, Option<super::StoredEncounter>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(&format!("{ENCOUNTER_SELECT} WHERE institution = $1 AND idempotency_key = $2"))
                .await
                .map_err(db)?;
            c.query_opt(&statement, &[&institution, &key]).await.map_err(db)?.as_ref().map(encounter_row).transpose()
        }))
    }

    fn update_encounter(&self, e: super::StoredEncounter) -> LedgerFuture<'_, ()> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached("UPDATE encounters SET version = $2::bigint, sealed = $3 WHERE id = $1 AND version = $2::bigint - 1")
                .await
                .map_err(db)?;
            let changed = c.execute(&statement, &[&e.id, &e.version, &e.sealed]).await.map_err(db)?;
            if changed == 1 { Ok(()) } else { Err(LedgerError::Stale) }
        }))
    }

    fn closed_day<'a>(&'a self, institution: &'a str, date: &'a str) -> LedgerFuture<'a, Option<super::ClosedDay>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached("SELECT closed_at, totals FROM closed_days WHERE institution = $1 AND day = $2")
                .await
                .map_err(db)?;
            let Some(r) = c.query_opt(&statement, &[&institution, &date]).await.map_err(db)? else {
                return Ok(None);
            };
            Ok(Some(super::ClosedDay { closed_at: r.try_get(0).map_err(db)?, totals: r.try_get(1).map_err(db)? }))
        }))
    }

    fn save_quote(&self, q: StoredQuote) -> LedgerFuture<'_, ()> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached("INSERT INTO quotes (id, institution, expires_at, sealed) VALUES ($1, $2, $3, $4)")
                .await
                .map_err(db)?;
            c.execute(&statement, &[&q.id, &q.institution, &q.expires_at, &q.sealed]).await.map_err(db).map(|_| ())
        }))
    }

    fn quote<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<StoredQuote>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(
                    "SELECT q.id, q.institution, q.expires_at, q.sealed, u.settlement FROM quotes q
                     LEFT JOIN used_quotes u ON u.quote_id = q.id WHERE q.institution = $1 AND q.id = $2",
                )
                .await
                .map_err(db)?;
            let Some(r) = c.query_opt(&statement, &[&institution, &id]).await.map_err(db)? else { return Ok(None) };
            Ok(Some(StoredQuote {
                id: r.try_get(0).map_err(db)?,
                institution: r.try_get(1).map_err(db)?,
                expires_at: r.try_get(2).map_err(db)?,
                sealed: r.try_get(3).map_err(db)?,
                settled_by: r.try_get(4).map_err(db)?,
            }))
        }))
    }

    fn unresolved(&self) -> LedgerFuture<'_, Vec<Unresolved>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(&format!(
                    "{UNRESOLVED_SELECT} WHERE state IN ('pending', 'unknown') ORDER BY created_at, seq"
                ))
                .await
                .map_err(db)?;
            c.query(&statement, &[]).await.map_err(db)?.iter().map(unresolved_row).collect()
        }))
    }

    fn sealed_request<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<Unresolved>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(&format!("{UNRESOLVED_SELECT} WHERE id = $2 AND institution = $1"))
                .await
                .map_err(db)?;
            c.query_opt(&statement, &[&institution, &id]).await.map_err(db)?.as_ref().map(unresolved_row).transpose()
        }))
    }

    fn reconciliation<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        page: u32,
        page_size: u32,
    ) -> LedgerFuture<'a, Reconciliation> {
        // One snapshot for the totals and the page: they agree with each other.
        Box::pin(self.with(async move |c| {
            let tx = c
                .build_transaction()
                .read_only(true)
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .start()
                .await
                .map_err(db)?;
            let day = reconcile(&tx, institution, date, page, page_size).await?;
            tx.commit().await.map_err(db)?;
            Ok(day)
        }))
    }

    fn day_details<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        page: u32,
        page_size: u32,
    ) -> LedgerFuture<'a, Vec<super::DetailLine>> {
        Box::pin(self.with(async move |c| day_details(&*c, institution, date, page, page_size).await))
    }

    fn settled_deltas<'a>(&'a self, id: &'a str) -> LedgerFuture<'a, Option<SettledDeltas>> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached("SELECT card_hash, deltas FROM settlements WHERE id = $1 AND state <> 'pending'")
                .await
                .map_err(db)?;
            let Some(r) = c.query_opt(&statement, &[&id]).await.map_err(db)? else { return Ok(None) };
            let deltas = serde_json::from_str(r.try_get(1).map_err(db)?).map_err(storage)?;
            Ok(Some((r.try_get(0).map_err(db)?, deltas)))
        }))
    }

    /// A position is (writing transaction, seq).
    fn cursor_parts(&self) -> usize {
        2
    }

    /// In the order of the transactions that recorded them, and only those older than every
    /// transaction of this database still running ([`horizon`]): a settlement whose
    /// transaction commits later comes after every position handed out before it, so a cursor
    /// never skips one.
    fn list<'a>(&'a self, q: &'a super::ListQuery) -> LedgerFuture<'a, Vec<Listed>> {
        Box::pin(self.with(async move |c| {
            let (txid, seq) = match q.after[..] {
                [] => (0, 0),
                [txid, seq] => (i64::try_from(txid).unwrap_or(i64::MAX), i64::try_from(seq).unwrap_or(i64::MAX)),
                _ => return Err(LedgerError::NotFound),
            };
            let horizon = horizon(&*c).await?;
            let statement = c
                .prepare_cached(
                    "SELECT txid, seq, id, state, terminal, card_masked, created_at, total_fen, fund_fen,
                         account_fen, cash_fen
                     FROM settlements
                     WHERE institution = $1 AND day BETWEEN $2 AND $3 AND (txid, seq) > ($4, $5)
                         AND txid < $11
                         AND ($6::bigint IS NULL OR created_at >= $6) AND ($7::bigint IS NULL OR created_at < $7)
                         AND ($8::text IS NULL OR terminal = $8) AND ($9::text IS NULL OR state = $9)
                     ORDER BY txid, seq LIMIT $10",
                )
                .await
                .map_err(db)?;
            let state = q.state.map(State::as_str);
            let rows = c
                .query(
                    &statement,
                    &[
                        &q.institution,
                        &q.days.0,
                        &q.days.1,
                        &txid,
                        &seq,
                        &q.from,
                        &q.to,
                        &q.terminal,
                        &state,
                        &i64::from(q.limit),
                        &horizon,
                    ],
                )
                .await
                .map_err(db)?;
            rows.iter()
                .map(|r| {
                    let state: String = r.try_get(3).map_err(db)?;
                    let settled = matches!(state.as_str(), "settled" | "reversed" | "failed");
                    let amount = |i: usize| -> Result<Option<i64>, LedgerError> {
                        Ok(if settled { Some(r.try_get(i).map_err(db)?) } else { None })
                    };
                    let position = [r.try_get::<_, i64>(0).map_err(db)?, r.try_get::<_, i64>(1).map_err(db)?];
                    Ok(Listed {
                        position: position.iter().map(|&n| u64::try_from(n).unwrap_or(0)).collect(),
                        settlement_id: r.try_get(2).map_err(db)?,
                        terminal_id: r.try_get(4).map_err(db)?,
                        card: r.try_get(5).map_err(db)?,
                        created_at: super::rfc3339(r.try_get(6).map_err(db)?),
                        total_fen: r.try_get(7).map_err(db)?,
                        fund_pay_fen: amount(8)?,
                        account_pay_fen: amount(9)?,
                        cash_pay_fen: amount(10)?,
                        state,
                    })
                })
                .collect()
        }))
    }

    fn claim<'a>(&'a self, id: &'a str, lease_secs: i64) -> LedgerFuture<'a, bool> {
        Box::pin(self.with(async move |c| {
            let statement = c
                .prepare_cached(
                    "UPDATE settlements SET lease_owner = $2, lease_until = now() + make_interval(secs => $3::bigint)
                     WHERE id = $1 AND state IN ('pending', 'unknown') AND (lease_until IS NULL OR lease_until < now())",
                )
                .await
                .map_err(db)?;
            Ok(c.execute(&statement, &[&id, &self.node, &lease_secs]).await.map_err(db)? == 1)
        }))
    }

    fn lease_secs(&self) -> Option<i64> {
        Some(self.lease_secs)
    }

    /// The database answers a query.
    fn probe(&self) -> LedgerFuture<'_, ()> {
        Box::pin(self.with(async |c| c.simple_query("SELECT 1").await.map(|_| ()).map_err(db)))
    }
}

/// What [`import`] copied: settlements, card years of accumulators, quotes.
pub type Imported = (u64, u64, u64);

/// A ledger's whole content, streamed to a visitor (`SqliteLedger::dump`).
pub type Dump<'a> = &'a (dyn Fn(&mut dyn FnMut(DumpItem) -> Result<(), LedgerError>) -> Result<(), LedgerError> + Sync);

/// Copies everything `dump` streams (an embedded ledger: `cardgate ledger migrate --to
/// postgres://...`) into the database, which must hold no ledger yet (its schema is created
/// first), in one transaction: all of it or, on any failure, nothing. Every settlement keeps
/// its id, seq, state, stored answers, key and held token or quote; accumulators and quotes
/// as they were. New settlements take seqs after the last one copied.
pub fn import(config: &PostgresConfig, dump: Dump<'_>) -> Result<Imported, LedgerError> {
    let (mut pg, statement, connect) = connection(config)?;
    migrate(&pg, connect + statement * 4)?;
    // No statement timeout for the copy: it is one long transaction.
    pg.options("-c statement_timeout=0");
    std::thread::scope(|scope| {
        let (items, inbox) = tokio::sync::mpsc::channel::<DumpItem>(1024);
        let (done, read) = tokio::sync::oneshot::channel();
        scope.spawn(move || {
            let result = dump(&mut |item| {
                items.blocking_send(item).map_err(|_| LedgerError::Storage("postgres: the copy stopped".into()))
            });
            drop(items);
            let _ = done.send(result);
        });
        // The writer on a thread of its own too: the caller may be inside a runtime.
        let writer = scope.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(storage)?;
            runtime.block_on(write_all(pg, inbox, read))
        });
        writer.join().unwrap_or_else(|_| Err(LedgerError::Storage("postgres: the writer failed".into())))
    })
}

/// Inserts what arrives in `inbox`, in one transaction committed only if `read` (the
/// source's own verdict, once everything was sent) is a success.
async fn write_all(
    pg: tokio_postgres::Config,
    mut inbox: tokio::sync::mpsc::Receiver<DumpItem>,
    read: tokio::sync::oneshot::Receiver<Result<(), LedgerError>>,
) -> Result<Imported, LedgerError> {
    let (mut client, connection) = pg.connect(tokio_postgres::NoTls).await.map_err(storage)?;
    let connection = tokio::spawn(connection);
    let tx = client.transaction().await.map_err(db)?;
    let held: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM settlements) + (SELECT count(*) FROM quotes)
                         + (SELECT count(*) FROM accumulators)",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if held > 0 {
        return Err(LedgerError::Storage(
            "postgres: the database already holds a ledger; migrate into an empty one".into(),
        ));
    }
    let statements = Statements::prepare(&tx).await?;
    let mut counts = (0, 0, 0);
    // Items go in groups, their statements pipelined (one round trip a group, not one a
    // statement: 100,000 settlements took 53 s one at a time).
    let mut group = Vec::with_capacity(COPY_GROUP);
    while inbox.recv_many(&mut group, COPY_GROUP).await > 0 {
        let copied = futures_util::future::join_all(group.drain(..).map(|item| copy(&tx, &statements, item))).await;
        let mut failed: Option<CopyFailure> = None;
        for kind in copied {
            match kind {
                Ok(Copied::Settlement) => counts.0 += 1,
                Ok(Copied::Year) => counts.1 += 1,
                Ok(Copied::Quote) => counts.2 += 1,
                Ok(Copied::Other) => {}
                // The statements after a failed one fail as the transaction's abort (and may
                // be of items before it): name the cause.
                Err(e) if failed.as_ref().is_none_or(|f| f.after_another) => failed = Some(e),
                Err(_) => {}
            }
        }
        if let Some(failure) = failed {
            return Err(failure.error);
        }
    }
    // Everything read: the source's own verdict decides.
    read.await.unwrap_or_else(|_| Err(LedgerError::Storage("postgres: the reader failed".into())))?;
    tx.execute(
        "SELECT setval(pg_get_serial_sequence('settlements', 'seq'), greatest(coalesce(max(seq), 0), 1))
                 FROM settlements",
        &[],
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    drop(client);
    let _ = connection.await;
    Ok(counts)
}

/// The copy's statements, prepared once.
struct Statements {
    settlement: tokio_postgres::Statement,
    token: tokio_postgres::Statement,
    quote_used: tokio_postgres::Statement,
    year: tokio_postgres::Statement,
    quote: tokio_postgres::Statement,
    closed: tokio_postgres::Statement,
    encounter: tokio_postgres::Statement,
}

impl Statements {
    async fn prepare(tx: &tokio_postgres::Transaction<'_>) -> Result<Self, LedgerError> {
        Ok(Self {
            settlement: tx
                .prepare(insert_intent!(
                    "seq, state, status, body, reversal, deltas, payers, fund_fen, account_fen, cash_fen, updated_at, \
                     reversed_day",
                    "$17, $18, $19, $20, $21, $22, $23::text::jsonb, $24, $25, $26, $27, $28"
                ))
                .await
                .map_err(db)?,
            token: tx.prepare(INSERT_TOKEN).await.map_err(db)?,
            quote_used: tx.prepare(INSERT_QUOTE).await.map_err(db)?,
            year: tx
                .prepare(
                    "INSERT INTO accumulators (card_hash, year, payer, deductible_fen, fund_paid_fen, eligible_fen,
                         account_paid_fen, eligible_self_pay_fen, outpatient_fund_paid_fen)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .await
                .map_err(db)?,
            quote: tx
                .prepare("INSERT INTO quotes (id, institution, expires_at, sealed) VALUES ($1, $2, $3, $4)")
                .await
                .map_err(db)?,
            closed: tx
                .prepare("INSERT INTO closed_days (institution, day, closed_at, totals) VALUES ($1, $2, $3, $4)")
                .await
                .map_err(db)?,
            encounter: tx.prepare(INSERT_ENCOUNTER).await.map_err(db)?,
        })
    }
}

/// Items copied at a time.
const COPY_GROUP: usize = 256;

/// What [`copy`] copied, for the counts.
enum Copied {
    Settlement,
    Year,
    Quote,
    Other,
}

/// Why an item was not copied, and whether only because an earlier statement of the
/// transaction had failed (SQLSTATE 25P02, whatever language the server answers in).
struct CopyFailure {
    after_another: bool,
    error: LedgerError,
}

impl From<tokio_postgres::Error> for CopyFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self { after_another: e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION), error: db(e) }
    }
}

impl From<LedgerError> for CopyFailure {
    fn from(error: LedgerError) -> Self {
        Self { after_another: false, error }
    }
}

/// One item of a dump, inserted in the copy's transaction.
async fn copy(
    tx: &tokio_postgres::Transaction<'_>,
    statements: &Statements,
    item: DumpItem,
) -> Result<Copied, CopyFailure> {
    Ok(match item {
        DumpItem::Settlement(d) => {
            let i = &d.intent;
            let seq = i64::try_from(d.seq).map_err(storage)?;
            let (day, state, status) = (super::business_day(i.created_at), d.state.as_str(), i32::from(d.status));
            let mut values = intent_values(i, &day);
            values.extend([
                &seq as Param<'_>,
                &state,
                &status,
                &d.body,
                &d.reversal,
                &d.deltas,
                &d.payers,
                &d.amounts.0,
                &d.amounts.1,
                &d.amounts.2,
                &d.updated_at,
                &d.reversed_day,
            ]);
            tx.execute(&statements.settlement, &values).await?;
            if d.holds.0
                && let Some(token_id) = &i.token_id
            {
                tx.execute(&statements.token, &[token_id, &i.id]).await?;
            }
            if d.holds.1
                && let Some(quote_id) = &i.quote_id
            {
                tx.execute(&statements.quote_used, &[quote_id, &i.id]).await?;
            }
            Copied::Settlement
        }
        DumpItem::Year(card, year, payers) => {
            for (payer, y) in payers {
                tx.execute(
                    &statements.year,
                    &[
                        &card,
                        &year,
                        &payer,
                        &y.deductible_fen,
                        &y.fund_paid_fen,
                        &y.eligible_fen,
                        &y.account_paid_fen,
                        &y.eligible_self_pay_fen,
                        &y.outpatient_fund_paid_fen,
                    ],
                )
                .await?;
            }
            Copied::Year
        }
        DumpItem::Quote(q) => {
            tx.execute(&statements.quote, &[&q.id, &q.institution, &q.expires_at, &q.sealed]).await?;
            Copied::Quote
        }
        DumpItem::Encounter(e) => {
            tx.execute(&statements.encounter, &encounter_values(&e)).await?;
            if let Some(token_id) = &e.token_id {
                tx.execute(&statements.token, &[token_id, &e.id]).await?;
            }
            Copied::Other
        }
        DumpItem::Closed(institution, date, closed) => {
            tx.execute(&statements.closed, &[&institution, &date, &closed.closed_at, &closed.totals]).await?;
            Copied::Other
        }
    })
}

/// A database of its own on a PostgreSQL server, created empty and dropped with this value:
/// for tests and benchmarks, which each need a ledger of their own on one server.
#[derive(Debug)]
pub struct ScratchDatabase {
    server: tokio_postgres::Config,
    name: String,
    /// The new database's connection string.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates `cardgate_scratch_<random>` on the server `url` names (whose user may create
    /// databases).
    pub fn create(url: &str) -> Result<Self, LedgerError> {
        use ring::rand::SecureRandom;
        let server: tokio_postgres::Config = url.parse().map_err(storage)?;
        let mut random = [0u8; 8];
        let _ = ring::rand::SystemRandom::new().fill(&mut random);
        let name = format!("cardgate_scratch_{}", u64::from_be_bytes(random));
        on_server(&server, &format!("CREATE DATABASE {name}"))?;
        let mut url = url.to_owned();
        // The same server and user, the new database: the URL's path names the database.
        match url.find("://").and_then(|scheme| url[scheme + 3..].find('/').map(|slash| scheme + 3 + slash)) {
            Some(slash) => {
                let query = url[slash..].find('?').map(|q| url[slash + q..].to_owned()).unwrap_or_default();
                url = format!("{}/{name}{query}", &url[..slash]);
            }
            None => url = format!("{url}/{name}"),
        }
        Ok(Self { server, name, url })
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let _ = on_server(&self.server, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// Runs one statement on a connection of its own, on a thread of its own.
fn on_server(config: &tokio_postgres::Config, sql: &str) -> Result<(), LedgerError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(storage)?;
                runtime.block_on(async {
                    let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(storage)?;
                    let connection = tokio::spawn(connection);
                    let done = client.batch_execute(sql).await.map_err(storage);
                    drop(client);
                    let _ = connection.await;
                    done
                })
            })
            .join()
            .unwrap_or_else(|_| Err(LedgerError::Storage("postgres: the helper thread failed".into())))
    })
}
