//! The ledger: the durable record of every settlement, behind the [`Ledger`] trait.
//!
//! A settlement's intent is written (state `pending`) before any plugin is called, and its
//! outcome after; the gateway answers only once the outcome is durable. The stored answer
//! (HTTP status and body) is what an idempotent retry gets back. Card ids are never stored:
//! only a keyed hash ([`CardKey::hash`]) and a masked form.
//!
//! States: `pending -> settled | failed | unknown`, `settled -> reversed`.
//!
//! - [`sqlite`]: the embedded default (SQLite, WAL, fsync on commit, one writer thread with
//!   group commit).
//! - [`lsm`]: a log-structured engine sharded by card (`engine = "lsm"`): a fifth of SQLite's
//!   serialized work per settlement, more memory; see docs/decisions/0001.
//! - [`postgres`]: the cluster's (`backend = "postgres"`): several nodes on one database.

pub mod export;
pub mod lsm;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use cardgate_sdk::YearToDate;
use ring::hmac;

/// Opens the configured ledger: the cluster's database, or the embedded engine
/// [`crate::config::LedgerEngine`] picks.
pub fn open(config: &crate::config::LedgerConfig) -> Result<std::sync::Arc<dyn Ledger>, LedgerError> {
    use crate::config::{LedgerBackend, LedgerEngine};
    if config.backend == LedgerBackend::Postgres {
        let pg = config.postgres.as_ref().ok_or_else(|| LedgerError::Storage("ledger.postgres: missing".into()))?;
        return Ok(std::sync::Arc::new(postgres::PgLedger::open(pg)?));
    }
    let engine = match config.engine {
        LedgerEngine::Auto if config.path.is_dir() => LedgerEngine::Lsm,
        LedgerEngine::Auto => LedgerEngine::Sqlite,
        chosen => chosen,
    };
    Ok(match engine {
        LedgerEngine::Sqlite => std::sync::Arc::new(sqlite::SqliteLedger::open(&config.path)?),
        _ => std::sync::Arc::new(lsm::LsmLedger::open(&config.path, config.shards)?),
    })
}

/// Business days (reconciliation, accumulator years) follow China Standard Time, UTC+8.
pub const UTC_OFFSET_SECS: i64 = 8 * 3600;

/// The business day (`YYYY-MM-DD`, UTC+8) of a moment.
pub fn business_day(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at + UTC_OFFSET_SECS)
        .map(|t| format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()))
        .unwrap_or_default()
}

/// Whether `text` names a day as [`business_day`] writes one: `YYYY-MM-DD`, a real date.
pub fn is_business_day(text: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    text.len() == 10 && time::Date::parse(text, &format).is_ok()
}

/// A moment as RFC 3339 (UTC), for receipts and reports.
pub fn rfc3339(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// A boxed future returned by ledger operations.
pub type LedgerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>> + Send + 'a>>;

/// A ledger failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The token already settled a bill.
    #[error("the token was already used")]
    TokenUsed,
    /// The quote already settled a bill.
    #[error("the quote was already settled")]
    QuoteUsed,
    /// Another request with the same idempotency key got there first.
    #[error("a request with this idempotency key exists")]
    IdempotencyTaken,
    /// The record does not exist (or belongs to another institution).
    #[error("not found")]
    NotFound,
    /// The card's accumulators changed after the payers were given them (another settlement
    /// or reversal of the card committed in between): nothing was recorded; ask again.
    #[error("the card's year-to-date figures changed while its payers were asked")]
    Stale,
    /// The storage failed.
    #[error("storage: {0}")]
    Storage(String),
}

/// Settlement states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Intent recorded, outcome not yet known.
    Pending,
    /// Settled: money moved.
    Settled,
    /// Refused: no money moved.
    Failed,
    /// A payer did not answer in time: the outcome is not known.
    Unknown,
    /// Reversed after settlement.
    Reversed,
}

impl State {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Settled => "settled",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
            Self::Reversed => "reversed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Settled, Self::Failed, Self::Unknown, Self::Reversed]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// A stored settlement as the API needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Settlement id.
    pub id: String,
    /// Owning institution.
    pub institution: String,
    /// SHA-256 of the request that created it (for idempotency conflicts).
    pub request_hash: Vec<u8>,
    /// State.
    pub state: State,
    /// The stored answer's HTTP status (0 while pending).
    pub status: u16,
    /// The stored answer's body: the receipt, or a problem.
    pub body: String,
    /// The stored answer to the reversal, once reversed.
    pub reversal: Option<String>,
    /// When the intent was recorded (seconds since the epoch).
    pub created_at: i64,
}

/// What is recorded before the plugins are called.
#[derive(Debug, Clone)]
pub struct Intent {
    /// New settlement id.
    pub id: String,
    /// Institution.
    pub institution: String,
    /// Terminal.
    pub terminal: String,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// SHA-256 of the request.
    pub request_hash: Vec<u8>,
    /// The token's `cti`, when settled by token: unique forever.
    pub token_id: Option<Vec<u8>>,
    /// The quote settled, when settled by quote: unique forever.
    pub quote_id: Option<String>,
    /// Keyed hash of the card id.
    pub card_hash: Vec<u8>,
    /// Masked card id.
    pub card_masked: String,
    /// Bill total.
    pub total_fen: i64,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// The prepared request (card claims, bill), sealed with the ledger key, so an interrupted
    /// settlement can be completed later.
    pub sealed_request: Vec<u8>,
    /// The insurance type settled under (`insutype`: 310, 390, ...), for reconciliation.
    pub insurance_type: String,
    /// The clearing type (`clr_type`: [`clearing_type`]), for reconciliation.
    pub clearing_type: String,
    /// A family member's bill on the holder's card: what the account pays is family mutual
    /// aid (`acct_mulaid_pay`), shown apart in reconciliation.
    pub delegated: bool,
}

/// The national clearing type (`clr_type`) of a settlement at an institution of `level`: a
/// designated pharmacy's sale is 41 (定点药店购药), a hospital's one-call settlement 11
/// (门诊, outpatient). Reconciliation totals are kept per insurance type and clearing type.
pub fn clearing_type(level: cardgate_sdk::InstitutionLevel) -> &'static str {
    match level {
        cardgate_sdk::InstitutionLevel::Pharmacy => "41",
        _ => "11",
    }
}

/// A settlement whose outcome is not yet recorded (`pending` or `unknown`).
#[derive(Debug, Clone)]
pub struct Unresolved {
    /// Settlement id.
    pub id: String,
    /// Institution.
    pub institution: String,
    /// State: pending or unknown.
    pub state: State,
    /// The sealed prepared request.
    pub sealed_request: Vec<u8>,
    /// When the intent was recorded.
    pub created_at: i64,
}

/// Money of a settled record, for reconciliation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts {
    /// Fund total.
    pub fund_fen: i64,
    /// Personal account total.
    pub account_fen: i64,
    /// Cash.
    pub cash_fen: i64,
    /// Per payer: (payer, fund, account).
    pub payers: Vec<(String, i64, i64)>,
}

/// An institution's business day. Its totals never change once the day is over: a
/// settlement counts on the day it was made, a reversal on the day it was made (a settlement
/// of Monday reversed on Tuesday is in Monday's `settled` and Tuesday's `reversed`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reconciliation {
    /// The day, `YYYY-MM-DD` (UTC+8).
    pub date: String,
    /// Settlements made on that day (gross: including those reversed since).
    pub settled: Totals,
    /// Reversals made on that day, of settlements of that day or of earlier ones.
    pub reversed: Totals,
    /// Settled less reversed: the day's net movement.
    pub net: Totals,
    /// Per payer: its share of the day's settlements and of the day's reversals.
    pub payers: Vec<PayerTotals>,
    /// One page of the day's events: its settlements and its reversals, in time order.
    pub details: Vec<DetailLine>,
    /// Page number (from 1).
    pub page: u32,
    /// Page size.
    pub page_size: u32,
    /// Detail lines over all pages (settlements and reversals of the day).
    pub detail_count: u64,
    /// Per insurance type and clearing type, as the bureau reconciles them (national 3201):
    /// the day's settlements, reversals and net.
    pub by_type: Vec<TypeTotals>,
    /// When the day was closed (RFC 3339): its totals were fixed then and never change.
    pub closed_at: Option<String>,
}

/// A day's totals as fixed when it is closed ([`Ledger::close_day`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DayTotals {
    /// See [`Reconciliation::settled`].
    pub settled: Totals,
    /// See [`Reconciliation::reversed`].
    pub reversed: Totals,
    /// See [`Reconciliation::net`].
    pub net: Totals,
    /// See [`Reconciliation::payers`].
    pub payers: Vec<PayerTotals>,
    /// See [`Reconciliation::by_type`].
    pub by_type: Vec<TypeTotals>,
    /// See [`Reconciliation::detail_count`].
    pub detail_count: u64,
}

/// A closed day: when, and its totals then (JSON of [`DayTotals`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedDay {
    /// When it was closed (seconds since the epoch).
    pub closed_at: i64,
    /// Its totals, as [`DayTotals`] in JSON.
    pub totals: String,
}

impl Reconciliation {
    /// The totals to fix when the day is closed.
    pub fn day_totals(&self) -> DayTotals {
        DayTotals {
            settled: self.settled.clone(),
            reversed: self.reversed.clone(),
            net: self.net.clone(),
            payers: self.payers.clone(),
            by_type: self.by_type.clone(),
            detail_count: self.detail_count,
        }
    }

    /// The day as it was closed: the totals fixed then, and when.
    pub fn closed(mut self, closed: &ClosedDay) -> Result<Self, LedgerError> {
        let fixed: DayTotals = serde_json::from_str(&closed.totals).map_err(|e| LedgerError::Storage(e.to_string()))?;
        self.settled = fixed.settled;
        self.reversed = fixed.reversed;
        self.net = fixed.net;
        self.payers = fixed.payers;
        self.by_type = fixed.by_type;
        self.detail_count = fixed.detail_count;
        self.closed_at = Some(rfc3339(closed.closed_at));
        Ok(self)
    }
}

/// One insurance type's and clearing type's totals of a day.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TypeTotals {
    /// Insurance type (`insutype`); empty for settlements recorded before it was kept.
    pub insurance_type: String,
    /// Clearing type (`clr_type`); empty likewise.
    pub clearing_type: String,
    /// Settlements made that day.
    pub settled: Totals,
    /// Reversals made that day.
    pub reversed: Totals,
    /// Settled less reversed.
    pub net: Totals,
}

/// Totals per (insurance type, clearing type).
pub type TypeSums = std::collections::BTreeMap<(String, String), Totals>;

/// Adds one settlement's money to `totals`: (total, fund, account, cash), and whether it was a
/// family member's bill.
pub fn add_to(
    totals: &mut Totals,
    (total_fen, fund_fen, account_fen, cash_fen): (i64, i64, i64, i64),
    delegated: bool,
) {
    totals.count += 1;
    totals.total_fen += total_fen;
    totals.fund_pay_fen += fund_fen;
    totals.account_pay_fen += account_fen;
    totals.cash_pay_fen += cash_fen;
    if delegated {
        totals.mutual_aid_pay_fen += account_fen;
    }
}

/// The day's settled and reversed totals and the per-type lines, from the per-type sums of
/// its settlements and of its reversals.
pub fn by_type(settled: &TypeSums, reversed: &TypeSums) -> (Totals, Totals, Vec<TypeTotals>) {
    let mut keys: Vec<&(String, String)> = settled.keys().chain(reversed.keys()).collect();
    keys.sort();
    keys.dedup();
    let (mut all_settled, mut all_reversed) = (Totals::default(), Totals::default());
    let lines = keys
        .into_iter()
        .map(|key| {
            let s = settled.get(key).cloned().unwrap_or_default();
            let r = reversed.get(key).cloned().unwrap_or_default();
            all_settled.add(&s);
            all_reversed.add(&r);
            TypeTotals {
                insurance_type: key.0.clone(),
                clearing_type: key.1.clone(),
                net: net(&s, &r),
                settled: s,
                reversed: r,
            }
        })
        .collect();
    (all_settled, all_reversed, lines)
}

/// Settled less reversed.
fn net(settled: &Totals, reversed: &Totals) -> Totals {
    Totals {
        count: settled.count.saturating_sub(reversed.count),
        total_fen: settled.total_fen - reversed.total_fen,
        fund_pay_fen: settled.fund_pay_fen - reversed.fund_pay_fen,
        account_pay_fen: settled.account_pay_fen - reversed.account_pay_fen,
        cash_pay_fen: settled.cash_pay_fen - reversed.cash_pay_fen,
        mutual_aid_pay_fen: settled.mutual_aid_pay_fen - reversed.mutual_aid_pay_fen,
    }
}

/// Per payer: settlements (or reversals) it took part in, its fund's and the account's sums.
pub type PayerSums = std::collections::BTreeMap<String, (u64, i64, i64)>;

/// A day's net movement (settled less reversed) and each payer's line, from the day's totals
/// and per-payer sums of its settlements (`gross`) and its reversals (`back`).
pub fn net_and_payers(
    settled: &Totals,
    reversed: &Totals,
    gross: &PayerSums,
    mut back: PayerSums,
) -> (Totals, Vec<PayerTotals>) {
    let net = net(settled, reversed);
    let mut names: Vec<String> = gross.keys().chain(back.keys()).cloned().collect();
    names.sort();
    names.dedup();
    let payers = names
        .into_iter()
        .map(|payer| {
            let (count, fund_pay_fen, account_pay_fen) = gross.get(&payer).copied().unwrap_or_default();
            let (reversed_count, reversed_fund_pay_fen, reversed_account_pay_fen) =
                back.remove(&payer).unwrap_or_default();
            PayerTotals {
                payer,
                count,
                fund_pay_fen,
                account_pay_fen,
                reversed_count,
                reversed_fund_pay_fen,
                reversed_account_pay_fen,
            }
        })
        .collect();
    (net, payers)
}

/// Counts and sums.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Settlements.
    pub count: u64,
    /// Bill totals.
    pub total_fen: i64,
    /// Fund payments.
    pub fund_pay_fen: i64,
    /// Personal account payments.
    pub account_pay_fen: i64,
    /// Cash.
    pub cash_pay_fen: i64,
    /// Of `account_pay_fen`, what holders' accounts paid for family members' bills (family
    /// mutual aid, the national `acct_mulaid_pay`).
    #[serde(default)]
    pub mutual_aid_pay_fen: i64,
}

impl Totals {
    /// Adds `other`'s counts and sums.
    pub fn add(&mut self, other: &Totals) {
        self.count += other.count;
        self.total_fen += other.total_fen;
        self.fund_pay_fen += other.fund_pay_fen;
        self.account_pay_fen += other.account_pay_fen;
        self.cash_pay_fen += other.cash_pay_fen;
        self.mutual_aid_pay_fen += other.mutual_aid_pay_fen;
    }
}

/// One payer's sums.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PayerTotals {
    /// Payer (plugin) name.
    pub payer: String,
    /// Settlements it took part in.
    pub count: u64,
    /// What its funds paid.
    pub fund_pay_fen: i64,
    /// What the account paid through it.
    pub account_pay_fen: i64,
    /// Reversals made that day it took part in.
    pub reversed_count: u64,
    /// What those reversals gave back from its funds.
    pub reversed_fund_pay_fen: i64,
    /// What those reversals gave back to the account through it.
    pub reversed_account_pay_fen: i64,
}

/// One event of a reconciliation's day: a settlement made, or a reversal made.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DetailLine {
    /// `settled` (a settlement made that day) or `reversed` (a reversal made that day).
    pub event: String,
    /// Settlement id.
    pub settlement_id: String,
    /// The settlement's state now: `settled` or `reversed`.
    pub state: String,
    /// Terminal.
    pub terminal_id: String,
    /// Masked card.
    pub card: String,
    /// When the event happened (RFC 3339).
    pub created_at: String,
    /// Bill total.
    pub total_fen: i64,
    /// Funds.
    pub fund_pay_fen: i64,
    /// Account.
    pub account_pay_fen: i64,
    /// Cash.
    pub cash_pay_fen: i64,
    /// Insurance type.
    pub insurance_type: String,
    /// Clearing type.
    pub clearing_type: String,
}

/// Which settlements of an institution to list ([`Ledger::list`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// The institution.
    pub institution: String,
    /// Business days, first and last (inclusive, `YYYY-MM-DD`).
    pub days: (String, String),
    /// Made at or after this moment (seconds since the epoch), if given.
    pub from: Option<i64>,
    /// Made before this moment, if given.
    pub to: Option<i64>,
    /// Only this terminal.
    pub terminal: Option<String>,
    /// Only this state.
    pub state: Option<State>,
    /// Only those after this position (the previous page's last [`Listed::position`]; empty
    /// from the start). [`Ledger::cursor_parts`] numbers long.
    pub after: Vec<u64>,
    /// At most this many.
    pub limit: u32,
}

/// A settlement in a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// Its position, for the next page's cursor: [`Ledger::cursor_parts`] numbers (an engine
    /// with several writers keeps one position per writer).
    #[serde(skip)]
    pub position: Vec<u64>,
    /// Settlement id.
    pub settlement_id: String,
    /// State now.
    pub state: String,
    /// Terminal.
    pub terminal_id: String,
    /// Masked card.
    pub card: String,
    /// When its intent was recorded (RFC 3339).
    pub created_at: String,
    /// Bill total.
    pub total_fen: i64,
    /// Funds (none while pending or unknown).
    pub fund_pay_fen: Option<i64>,
    /// Account.
    pub account_pay_fen: Option<i64>,
    /// Cash.
    pub cash_pay_fen: Option<i64>,
}

/// How one payer's accumulators change (stored as JSON with the outcome, to undo on reversal).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AccumulatorDelta {
    /// Payer (plugin) name.
    pub payer: String,
    /// The change (its `year` says which year).
    pub delta: YearToDate,
}

/// The outcome of a settlement.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Settlement id.
    pub id: String,
    /// `settled`, `failed` or `unknown`.
    pub state: State,
    /// The answer's HTTP status.
    pub status: u16,
    /// The answer's body.
    pub body: String,
    /// Accumulator changes (settled only).
    pub deltas: Vec<AccumulatorDelta>,
    /// Card hash the accumulators belong to.
    pub card_hash: Vec<u8>,
    /// The accumulators the payers were given, payer by payer: a settled outcome is recorded
    /// only if they are still what the ledger holds (else [`LedgerError::Stale`]).
    pub read: Vec<AccumulatorDelta>,
    /// Seconds since the epoch.
    pub at: i64,
    /// The money, when settled.
    pub amounts: Option<Amounts>,
}

impl Outcome {
    /// The accumulator changes and the per-payer money as stored: `[{"payer", "delta"}]` and
    /// `[[payer, fund, account]]` (reconciliation reads the latter). Encoded on the caller's
    /// thread: an engine's writer is the one to spare.
    pub fn encoded(&self) -> (String, String) {
        let deltas = serde_json::to_string(&self.deltas).unwrap_or_else(|_| "[]".into());
        let payers = serde_json::to_string(self.amounts.as_ref().map_or(&[][..], |a| &a.payers[..]))
            .unwrap_or_else(|_| "[]".into());
        (deltas, payers)
    }
}

/// A stored quote.
#[derive(Debug, Clone)]
pub struct StoredQuote {
    /// Quote id.
    pub id: String,
    /// Owning institution.
    pub institution: String,
    /// When it stops being settleable.
    pub expires_at: i64,
    /// The quote's content (card claims, bill, split), sealed with the ledger key.
    pub sealed: Vec<u8>,
    /// The settlement that consumed it, if any.
    pub settled_by: Option<String>,
}

/// An encounter (a hospital's visit or stay, settled in steps) as a ledger holds it: its
/// content sealed (it names the patient), and a version every change raises by one, so that
/// two changes made on the same version cannot both be stored ([`Ledger::update_encounter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEncounter {
    /// Encounter id.
    pub id: String,
    /// Owning institution.
    pub institution: String,
    /// The registration's idempotency key.
    pub idempotency_key: String,
    /// SHA-256 of the registration request.
    pub request_hash: Vec<u8>,
    /// The credential's token id, spent by the registration: unique forever, like a
    /// settlement's.
    pub token_id: Option<Vec<u8>>,
    /// Keyed hash of the card id (an engine sharded by card keeps it with the card).
    pub card_hash: Vec<u8>,
    /// When it was registered.
    pub created_at: i64,
    /// 1 when registered, one more with every change.
    pub version: i64,
    /// The content, sealed with the ledger key.
    pub sealed: Vec<u8>,
}

/// A settlement as a ledger holds it, whole: for moving a ledger to another engine.
#[derive(Debug, Clone)]
pub struct Dumped {
    /// Its position in the order settlements were recorded.
    pub seq: u64,
    /// What was recorded before the payers were asked.
    pub intent: Intent,
    /// State (`pending` when no outcome was recorded).
    pub state: State,
    /// The stored answer's status (0 while pending).
    pub status: u16,
    /// The stored answer (as stored: sealed receipts stay sealed).
    pub body: String,
    /// The reversal's stored answer.
    pub reversal: Option<String>,
    /// Accumulator changes, as stored (JSON).
    pub deltas: String,
    /// Per payer (payer, fund, account), as stored (JSON).
    pub payers: String,
    /// Money: funds, account, cash.
    pub amounts: (i64, i64, i64),
    /// When the outcome (or reversal) was recorded.
    pub updated_at: i64,
    /// The business day of the reversal.
    pub reversed_day: Option<String>,
    /// Whether its token, and its quote, are still held (a refused settlement released them).
    pub holds: (bool, bool),
}

/// Each payer's year-to-date figures of one card's year.
pub type PayerYears = Vec<(String, YearToDate)>;

/// One thing an embedded ledger holds, as [`sqlite::SqliteLedger::dump`] streams them and
/// [`lsm::Importer`] takes them: every settlement (in seq order), every card's year of
/// accumulators, every quote.
#[derive(Debug, Clone)]
pub enum DumpItem {
    /// A settlement.
    Settlement(Box<Dumped>),
    /// A card's year (card hash, year): each payer's figures.
    Year(Vec<u8>, i32, PayerYears),
    /// A stored quote.
    Quote(StoredQuote),
    /// A closed day (institution, date).
    Closed(String, String, ClosedDay),
    /// An encounter.
    Encounter(StoredEncounter),
}

/// A settlement's card hash and the accumulator changes it made.
pub type SettledDeltas = (Vec<u8>, Vec<AccumulatorDelta>);

/// The ledger interface: the embedded engines ([`sqlite`], [`lsm`]) and the cluster's
/// PostgreSQL ([`postgres`]) implement it. Reads are futures too: an embedded engine answers
/// at once on the caller's thread ([`ReadsNow`]), a database over the network without holding
/// a thread while it waits.
pub trait Ledger: Send + Sync + std::fmt::Debug {
    /// The settlement an institution created with an idempotency key.
    fn by_idempotency_key<'a>(&'a self, institution: &'a str, key: &'a str) -> LedgerFuture<'a, Option<Record>>;
    /// A settlement of an institution, by id.
    fn get<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<Record>>;
    /// The person's accumulators for a year with each of `payers`, in that order (zero where
    /// none are recorded), read together.
    fn year_to_date<'a>(
        &'a self,
        card_hash: &'a [u8],
        year: i32,
        payers: &'a [&'a str],
    ) -> LedgerFuture<'a, Vec<YearToDate>>;
    /// The person's accumulators with one payer for a year.
    fn accumulators<'a>(&'a self, card_hash: &'a [u8], payer: &'a str, year: i32) -> LedgerFuture<'a, YearToDate> {
        Box::pin(async move {
            let payers = [payer];
            let mut found = self.year_to_date(card_hash, year, &payers).await?;
            Ok(found.pop().unwrap_or(YearToDate { year, ..YearToDate::default() }))
        })
    }
    /// Records an intent (durably), refusing a used token, quote or idempotency key.
    fn begin(&self, intent: Intent) -> LedgerFuture<'_, ()>;
    /// Records an intent and its outcome in one durable commit — for a settlement whose payers
    /// are all effect-free, asked before anything was written: refused like [`Ledger::begin`]
    /// (a used token, quote or idempotency key) or like [`Ledger::finish`] (figures moved),
    /// and then nothing is recorded. A refusal (an outcome that is neither settled nor unknown)
    /// leaves its token and quote unspent, but one carrying a token or quote spent already is
    /// refused as [`Ledger::begin`] would. `outcome` is the intent's: engines record it against
    /// the intent just written, not by its id. Default: the two commits, for ledgers that
    /// cannot do one.
    fn record(&self, intent: Intent, outcome: Outcome) -> LedgerFuture<'_, ()> {
        Box::pin(async move {
            self.begin(intent).await?;
            self.finish(outcome).await
        })
    }
    /// Records an outcome (durably) with its accumulator changes, if the accumulators it read
    /// ([`Outcome::read`]) are unchanged; else nothing, and [`LedgerError::Stale`].
    fn finish(&self, outcome: Outcome) -> LedgerFuture<'_, ()>;
    /// Marks a settled record reversed with the reversal's answer and accumulator changes.
    fn reverse(
        &self,
        id: String,
        body: String,
        deltas: Vec<AccumulatorDelta>,
        card_hash: Vec<u8>,
        at: i64,
    ) -> LedgerFuture<'_, ()>;
    /// Stores a quote.
    fn save_quote(&self, quote: StoredQuote) -> LedgerFuture<'_, ()>;
    /// A quote of an institution, by id.
    fn quote<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<StoredQuote>>;
    /// Every settlement whose outcome is not recorded yet.
    fn unresolved(&self) -> LedgerFuture<'_, Vec<Unresolved>>;
    /// The sealed prepared request of a settlement of an institution.
    fn sealed_request<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<Unresolved>>;
    /// An institution's business day: totals, per payer, reversals and one page of details.
    fn reconciliation<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        page: u32,
        page_size: u32,
    ) -> LedgerFuture<'a, Reconciliation>;
    /// One page of a day's detail lines, as [`Ledger::reconciliation`] pages them, without the
    /// day's sums: the export's pages (on SQLite the sums were two thirds of each page).
    fn day_details<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        page: u32,
        page_size: u32,
    ) -> LedgerFuture<'a, Vec<DetailLine>> {
        Box::pin(async move { Ok(self.reconciliation(institution, date, page, page_size).await?.details) })
    }
    /// Registers an encounter at version 1 (durably), spending its token: refused with
    /// [`LedgerError::TokenUsed`] for a token already spent (by a settlement or an encounter),
    /// [`LedgerError::IdempotencyTaken`] for a registration key already used.
    fn open_encounter(&self, encounter: StoredEncounter) -> LedgerFuture<'_, ()>;
    /// An encounter of an institution, by id.
    fn encounter<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<StoredEncounter>>;
    /// The encounter an institution registered with an idempotency key.
    fn encounter_by_key<'a>(&'a self, institution: &'a str, key: &'a str) -> LedgerFuture<'a, Option<StoredEncounter>>;
    /// Stores a changed encounter (`version` one more than the stored one): if the stored one
    /// is still at `version - 1`; else nothing, and [`LedgerError::Stale`].
    fn update_encounter(&self, encounter: StoredEncounter) -> LedgerFuture<'_, ()>;
    /// Whether an institution's day is closed: when, and its totals then.
    fn closed_day<'a>(&'a self, institution: &'a str, date: &'a str) -> LedgerFuture<'a, Option<ClosedDay>>;
    /// Closes an institution's day with its totals (durably); a day closed already keeps its
    /// first closing, which is answered.
    fn close_day<'a>(&'a self, institution: &'a str, date: &'a str, closed: ClosedDay) -> LedgerFuture<'a, ClosedDay>;
    /// The card hash and accumulator changes recorded for a settlement (to undo them).
    fn settled_deltas<'a>(&'a self, id: &'a str) -> LedgerFuture<'a, Option<SettledDeltas>>;
    /// An institution's settlements matching `query`, in the order they were recorded.
    fn list<'a>(&'a self, query: &'a ListQuery) -> LedgerFuture<'a, Vec<Listed>>;
    /// How many numbers a listing position holds ([`Listed::position`]).
    fn cursor_parts(&self) -> usize {
        1
    }
    /// Takes over an unresolved settlement (`pending` or `unknown`) to complete it: true when
    /// this process may ask its payers now. One process (the embedded engines): always — its
    /// card locks keep two completions of one settlement apart. Several nodes on one database:
    /// only when no other node holds the settlement's lease (its owner is completing it), and
    /// then this node holds it for `lease_secs` — so a settlement is completed by one node at
    /// a time, and one left by a node that died is taken over once its lease runs out.
    fn claim<'a>(&'a self, id: &'a str, lease_secs: i64) -> LedgerFuture<'a, bool> {
        let _ = (id, lease_secs);
        Box::pin(async { Ok(true) })
    }
    /// How long a node holds a settlement it completes, when several nodes share the ledger
    /// (then every node sweeps, now and then, for settlements whose lease ran out); `None` for
    /// a ledger of one process.
    fn lease_secs(&self) -> Option<i64> {
        None
    }
    /// Whether the ledger takes writes now: at once when the last commit succeeded; after a
    /// failed one (a full disk), by committing a probe (so readiness comes back by itself when
    /// space does).
    fn probe(&self) -> LedgerFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// The reads of an embedded engine, answered on the caller's thread at once; [`reads_now`]
/// makes them the [`Ledger`]'s.
pub(crate) trait ReadsNow {
    fn by_idempotency_key(&self, institution: &str, key: &str) -> Result<Option<Record>, LedgerError>;
    fn get(&self, institution: &str, id: &str) -> Result<Option<Record>, LedgerError>;
    fn year_to_date(&self, card_hash: &[u8], year: i32, payers: &[&str]) -> Result<Vec<YearToDate>, LedgerError>;
    fn quote(&self, institution: &str, id: &str) -> Result<Option<StoredQuote>, LedgerError>;
    fn unresolved(&self) -> Result<Vec<Unresolved>, LedgerError>;
    fn sealed_request(&self, institution: &str, id: &str) -> Result<Option<Unresolved>, LedgerError>;
    fn reconciliation(
        &self,
        institution: &str,
        date: &str,
        page: u32,
        page_size: u32,
    ) -> Result<Reconciliation, LedgerError>;
    fn day_details(
        &self,
        institution: &str,
        date: &str,
        page: u32,
        page_size: u32,
    ) -> Result<Vec<DetailLine>, LedgerError> {
        Ok(self.reconciliation(institution, date, page, page_size)?.details)
    }
    fn settled_deltas(&self, id: &str) -> Result<Option<SettledDeltas>, LedgerError>;
    fn list(&self, query: &ListQuery) -> Result<Vec<Listed>, LedgerError>;
    fn closed_day(&self, institution: &str, date: &str) -> Result<Option<ClosedDay>, LedgerError>;
    fn encounter(&self, institution: &str, id: &str) -> Result<Option<StoredEncounter>, LedgerError>;
    fn encounter_by_key(&self, institution: &str, key: &str) -> Result<Option<StoredEncounter>, LedgerError>;
}

/// A read answered already, as a ledger future.
pub(crate) fn ready<'a, T: Send + 'a>(answer: Result<T, LedgerError>) -> LedgerFuture<'a, T> {
    Box::pin(std::future::ready(answer))
}

/// The [`Ledger`] reads of an engine that implements [`ReadsNow`]: inside its `impl Ledger`.
macro_rules! reads_now {
    () => {
        fn by_idempotency_key<'a>(
            &'a self,
            institution: &'a str,
            key: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::Record>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::by_idempotency_key(self, institution, key))
        }
        fn get<'a>(
            &'a self,
            institution: &'a str,
            id: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::Record>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::get(self, institution, id))
        }
        fn year_to_date<'a>(
            &'a self,
            card_hash: &'a [u8],
            year: i32,
            payers: &'a [&'a str],
        ) -> $crate::ledger::LedgerFuture<'a, Vec<cardgate_sdk::YearToDate>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::year_to_date(self, card_hash, year, payers))
        }
        fn quote<'a>(
            &'a self,
            institution: &'a str,
            id: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::StoredQuote>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::quote(self, institution, id))
        }
        fn unresolved(&self) -> $crate::ledger::LedgerFuture<'_, Vec<$crate::ledger::Unresolved>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::unresolved(self))
        }
        fn sealed_request<'a>(
            &'a self,
            institution: &'a str,
            id: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::Unresolved>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::sealed_request(self, institution, id))
        }
        fn reconciliation<'a>(
            &'a self,
            institution: &'a str,
            date: &'a str,
            page: u32,
            page_size: u32,
        ) -> $crate::ledger::LedgerFuture<'a, $crate::ledger::Reconciliation> {
            $crate::ledger::ready($crate::ledger::ReadsNow::reconciliation(self, institution, date, page, page_size))
        }
        fn day_details<'a>(
            &'a self,
            institution: &'a str,
            date: &'a str,
            page: u32,
            page_size: u32,
        ) -> $crate::ledger::LedgerFuture<'a, Vec<$crate::ledger::DetailLine>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::day_details(self, institution, date, page, page_size))
        }
        fn closed_day<'a>(
            &'a self,
            institution: &'a str,
            date: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::ClosedDay>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::closed_day(self, institution, date))
        }
        fn encounter<'a>(
            &'a self,
            institution: &'a str,
            id: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::StoredEncounter>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::encounter(self, institution, id))
        }
        fn encounter_by_key<'a>(
            &'a self,
            institution: &'a str,
            key: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::StoredEncounter>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::encounter_by_key(self, institution, key))
        }
        fn settled_deltas<'a>(
            &'a self,
            id: &'a str,
        ) -> $crate::ledger::LedgerFuture<'a, Option<$crate::ledger::SettledDeltas>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::settled_deltas(self, id))
        }
        fn list<'a>(
            &'a self,
            query: &'a $crate::ledger::ListQuery,
        ) -> $crate::ledger::LedgerFuture<'a, Vec<$crate::ledger::Listed>> {
            $crate::ledger::ready($crate::ledger::ReadsNow::list(self, query))
        }
    };
}
pub(crate) use reads_now;

/// The ledger secret's uses: hashing card ids, sealing quotes.
#[derive(Clone)]
pub struct CardKey {
    hash: hmac::Key,
    seal: ring::aead::LessSafeKey,
}

impl std::fmt::Debug for CardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardKey(..)")
    }
}

impl CardKey {
    /// Derives both keys from the configured secret.
    pub fn new(secret: &[u8]) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive = |label: &[u8]| hmac::sign(&root, label);
        let hash = hmac::Key::new(hmac::HMAC_SHA256, derive(b"cardgate card hash v1").as_ref());
        let seal_key = derive(b"cardgate quote seal v1");
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, seal_key.as_ref())
            .expect("a 32-byte HMAC-SHA256 output is a valid AES-256 key");
        Self { hash, seal: ring::aead::LessSafeKey::new(unbound) }
    }

    /// The keyed hash a card id is stored under.
    pub fn hash(&self, card_id: &str) -> Vec<u8> {
        hmac::sign(&self.hash, card_id.as_bytes()).as_ref().to_vec()
    }

    /// Encrypts and authenticates `plain` (JSON, as every caller seals): nonce || ciphertext ||
    /// tag. What is encrypted is `plain` itself or, where LZ4 makes it smaller (a settlement's
    /// request, ~3 KiB of JSON whose lines repeat, shrinks to about a third), [`PACKED`], the
    /// original length (u32, little-endian) and the LZ4 block: the ledger's writers, journals
    /// and files carry a third of the bytes (docs/BENCHMARKS.md). Compressed before it is
    /// encrypted, as it must be to gain anything; the length this leaks about a stored request
    /// is known only to whoever reads the ledger's files, who also sees each row's size.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 12];
        // The system random source failing is not recoverable; a zero nonce is never reused
        // in practice only if this cannot happen, so refuse to continue.
        crate::random::fill(&mut nonce).expect("system random source");
        let mut buffer = Vec::with_capacity(12 + plain.len() + 16);
        buffer.extend_from_slice(&nonce);
        pack(plain, &mut buffer);
        self.encrypt(buffer)
    }

    /// Encrypts `buffer` after its first 12 bytes, the nonce, in place and appends the tag.
    fn encrypt(&self, mut buffer: Vec<u8>) -> Vec<u8> {
        let (nonce, body) = buffer.split_at_mut(12);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
        let tag = self
            .seal
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::empty(), body)
            .expect("sealing a bounded buffer cannot fail");
        buffer.extend_from_slice(tag.as_ref());
        buffer
    }

    /// Decrypts what [`CardKey::seal`] made (compressed or not: ledgers written before
    /// compression hold plain JSON); `None` if it was altered or sealed with another key.
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 12 {
            return None;
        }
        let (nonce, rest) = sealed.split_at(12);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = rest.to_vec();
        let length = self.seal.open_in_place(nonce, ring::aead::Aad::empty(), &mut buffer).ok()?.len();
        buffer.truncate(length);
        unpack(buffer)
    }
}

/// The first byte of a sealed plaintext that is LZ4-compressed: never the first byte of JSON
/// (nor of any UTF-8 text), which is what was sealed before compression.
const PACKED: u8 = 0xFF;

/// Below this many bytes a plaintext is sealed as it is: too little to gain.
const PACK_FROM: usize = 256;

/// The largest plaintext a compressed seal may claim (a long stay's encounter is a few MiB).
const PACK_MAX: usize = 256 << 20;

/// Appends `plain` to `out`, compressed when that is smaller (and always when it starts with
/// [`PACKED`], which only a compressed plaintext may).
fn pack(plain: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    let must = plain.first() == Some(&PACKED);
    if (plain.len() >= PACK_FROM || must) && plain.len() <= PACK_MAX {
        let header = 5;
        out.resize(start + header + lz4_flex::block::get_maximum_output_size(plain.len()), 0);
        if let Ok(n) = lz4_flex::block::compress_into(plain, &mut out[start + header..])
            && (header + n < plain.len() || must)
        {
            out[start] = PACKED;
            out[start + 1..start + header].copy_from_slice(&(plain.len() as u32).to_le_bytes());
            out.truncate(start + header + n);
            return;
        }
        out.truncate(start);
    }
    out.extend_from_slice(plain);
}

/// What [`pack`] made, as it was; `None` for a compressed plaintext that does not decompress
/// to the length it claims.
fn unpack(plain: Vec<u8>) -> Option<Vec<u8>> {
    match plain.split_first() {
        Some((&PACKED, rest)) if rest.len() >= 4 => {
            let length = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
            if length > PACK_MAX {
                return None;
            }
            let mut out = vec![0; length];
            match lz4_flex::block::decompress_into(&rest[4..], &mut out) {
                Ok(n) if n == length => Some(out),
                _ => None,
            }
        }
        _ => Some(plain),
    }
}

/// What marks a stored answer as sealed ([`CardKey::seal_text`]); plain JSON never starts so.
const SEALED_TEXT: &str = "sealed:v1:";

impl CardKey {
    /// Seals a stored answer that names the card holder: `sealed:v1:` and the sealed bytes in
    /// base64, so it stays text in the ledger.
    pub fn seal_text(&self, plain: &str) -> String {
        use base64::Engine;
        let sealed = self.seal(plain.as_bytes());
        format!("{SEALED_TEXT}{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(sealed))
    }

    /// Opens what [`CardKey::seal_text`] made; text stored plain (older ledgers, answers that
    /// name no one) comes back as it is. `None`: sealed with another key, or altered.
    pub fn open_text(&self, stored: &str) -> Option<String> {
        use base64::Engine;
        let Some(sealed) = stored.strip_prefix(SEALED_TEXT) else { return Some(stored.to_owned()) };
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(sealed).ok()?;
        String::from_utf8(self.open(&bytes)?).ok()
    }
}

/// A card id as shown on receipts: its first four and last four characters.
pub fn mask_card(card_id: &str) -> String {
    let chars: Vec<char> = card_id.chars().collect();
    if chars.len() <= 8 {
        let tail: String = chars[chars.len().saturating_sub(2)..].iter().collect();
        return format!("****{tail}");
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len() - 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_ids_are_masked() {
        assert_eq!(mask_card("110105199001011234"), "1101**********1234");
        assert_eq!(mask_card("C1"), "****C1");
    }

    #[test]
    fn sealed_quotes_open_only_with_the_same_key() {
        let key = CardKey::new(&[7; 32]);
        let sealed = key.seal(b"quote");
        assert_eq!(key.open(&sealed).as_deref(), Some(&b"quote"[..]));
        assert_eq!(CardKey::new(&[8; 32]).open(&sealed), None);
        let text = key.seal_text("{\"holder_name\":\"张三\"}");
        assert!(!text.contains("holder_name"), "{text}");
        assert_eq!(key.open_text(&text).as_deref(), Some("{\"holder_name\":\"张三\"}"));
        assert_eq!(key.open_text("{\"plain\":1}").as_deref(), Some("{\"plain\":1}"));
        assert_eq!(CardKey::new(&[8; 32]).open_text(&text), None);
        let mut tampered = sealed.clone();
        tampered[13] ^= 1;
        assert_eq!(key.open(&tampered), None);
        assert_ne!(key.hash("C1"), CardKey::new(&[8; 32]).hash("C1"));
    }

    /// Seals as ledgers did before compression: the plaintext as it is.
    fn seal_uncompressed(key: &CardKey, plain: &[u8]) -> Vec<u8> {
        key.encrypt([&[3u8; 12][..], plain].concat())
    }

    /// A settlement's request as the flow seals it: ten lines, each twice (as sent and as the
    /// payers see them).
    fn request_json() -> Vec<u8> {
        let line = |n: usize| {
            format!(
                r#"{{"code":"XA{n:02}","name":"Amoxicillin capsules 0.25g","category":"class_a","quantity":2,"unit_price_fen":250,"amount_fen":500}}"#
            )
        };
        let lines: Vec<String> = (0..10).map(line).collect();
        format!(
            r#"{{"subject":{{"card_id":"110105199001011234","holder_name":"张三"}},"bill":{{"lines":[{}]}},"lines":[{}]}}"#,
            lines.join(","),
            lines.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn a_settlements_request_is_sealed_compressed_and_opens_whole() {
        let key = CardKey::new(&[7; 32]);
        let plain = request_json();
        let sealed = key.seal(&plain);
        assert!(sealed.len() * 3 < plain.len(), "{} sealed bytes for {} of JSON", sealed.len(), plain.len());
        assert_eq!(key.open(&sealed).as_deref(), Some(&plain[..]));
        let text = String::from_utf8(plain.clone()).expect("utf-8");
        assert_eq!(key.open_text(&key.seal_text(&text)).as_deref(), Some(text.as_str()));
        // Each bit of the compressed form is authenticated like the rest.
        for at in [12, 13, 16, sealed.len() / 2, sealed.len() - 1] {
            let mut tampered = sealed.clone();
            tampered[at] ^= 0x40;
            assert_eq!(key.open(&tampered), None, "byte {at} changed");
        }
    }

    #[test]
    fn what_ledgers_sealed_before_compression_still_opens() {
        let key = CardKey::new(&[7; 32]);
        let plain = request_json();
        let old = seal_uncompressed(&key, &plain);
        assert_eq!(key.open(&old).as_deref(), Some(&plain[..]));
        assert_eq!(key.open(&seal_uncompressed(&key, b"{}")).as_deref(), Some(&b"{}"[..]));
    }

    #[test]
    fn incompressible_short_and_marker_led_plaintexts_round_trip() {
        let key = CardKey::new(&[7; 32]);
        // Random bytes do not compress: sealed as they are (nonce and tag only beside them).
        let mut random = vec![0u8; 4096];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).expect("random");
        let sealed = key.seal(&random);
        assert_eq!(sealed.len(), 12 + random.len() + 16);
        assert_eq!(key.open(&sealed).as_deref(), Some(&random[..]));
        for plain in [&b""[..], b"{\"a\":1}", &[PACKED], &[PACKED, 0, 0, 0, 0, 1, 2, 3], &[PACKED; 600]] {
            assert_eq!(key.open(&key.seal(plain)).as_deref(), Some(plain), "{plain:?}");
        }
    }

    #[test]
    fn a_compressed_plaintext_that_lies_about_its_length_does_not_open() {
        let key = CardKey::new(&[7; 32]);
        let plain = request_json();
        let mut packed = Vec::new();
        pack(&plain, &mut packed);
        assert_eq!(packed[0], PACKED);
        for claimed in [plain.len() as u32 + 1, plain.len() as u32 - 1, u32::MAX] {
            let mut lying = packed.clone();
            lying[1..5].copy_from_slice(&claimed.to_le_bytes());
            assert_eq!(key.open(&seal_uncompressed(&key, &lying)), None, "claims {claimed}");
        }
        let cut = &packed[..packed.len() - 3];
        assert_eq!(key.open(&seal_uncompressed(&key, cut)), None);
    }
}
