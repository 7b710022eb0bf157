//! The request flows: inquiry, quote, settlement (by token or by quote), reversal, lookup.
//!
//! A settlement: verify the token (or load the quote) -> route to the payer chain -> record
//! the intent (a used token, quote or idempotency key is refused here, durably) -> call each
//! payer with what the earlier ones left -> check every answer balances -> record the outcome
//! with the accumulator changes -> answer. The stored answer is what a retry gets back.

use cardgate_sdk::{
    CardClaims, Delegate, Inquiry, InquiryRequest, Institution, Operation, PriorPayment, ReversalRequest, Split,
    YearToDate,
};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::model::{BillBody, InquiryBody, ReversalBody, check_bill, check_id};
use super::{ApiError, ApiResponse, Identity};
use crate::catalogue::Reclassified;
use crate::config::InstitutionConfig;
use crate::ledger::{
    AccumulatorDelta, Amounts, Intent, LedgerError, Outcome, Record, State, StoredQuote, Unresolved, mask_card,
};
use crate::ledger::{UTC_OFFSET_SECS, rfc3339};
use crate::plugin::input::{Common, SettlementInput};
use crate::plugin::{CallError, PluginHandle};
use crate::route::RouteQuery;
use crate::service::{Gateway, PluginSet};
use crate::token::{DelegateClaim, ECardClaim, ReplayStore, TokenError};

/// What a bill is settled for: the card, and the token or quote that vouched for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Subject {
    pub(super) card_id: String,
    pub(super) holder_name: String,
    pub(super) insured_region: String,
    pub(super) insurance_types: Vec<String>,
    pub(super) delegate: Option<(String, Option<String>, String)>,
    pub(super) token_id: Option<Vec<u8>>,
    pub(super) token_expires_at: Option<i64>,
}

impl Subject {
    pub(super) fn from_claim(ecard: ECardClaim, token_id: Option<Vec<u8>>, token_expires_at: Option<i64>) -> Self {
        Self {
            card_id: ecard.card_id,
            holder_name: ecard.holder_name,
            insured_region: ecard.insured_region,
            insurance_types: ecard.insurance_types,
            delegate: ecard.delegate.map(|d: DelegateClaim| (d.card_id, d.name, d.relation)),
            token_id,
            token_expires_at,
        }
    }

    pub(super) fn card(&self) -> CardClaims {
        CardClaims {
            card_id: self.card_id.clone(),
            holder_name: self.holder_name.clone(),
            insured_region: self.insured_region.clone(),
            insurance_types: self.insurance_types.clone(),
            delegate: self.delegate.as_ref().map(|(card_id, name, relation)| Delegate {
                card_id: card_id.clone(),
                name: name.clone(),
                relation: relation.clone(),
            }),
        }
    }

    pub(super) fn delegate_json(&self) -> Value {
        self.delegate.as_ref().map_or(
            Value::Null,
            |(card_id, name, relation)| json!({ "card": mask_card(card_id), "name": name, "relation": relation }),
        )
    }
}

/// A sealed quote's content.
#[derive(Debug, Serialize, Deserialize)]
struct QuoteContent {
    subject: Subject,
    insurance_type: String,
    terminal_id: String,
    bill: BillBody,
}

pub(super) fn institution<'g>(
    gateway: &'g Gateway,
    identity: &Identity,
    named: Option<&str>,
) -> Result<(&'g str, &'g InstitutionConfig), ApiError> {
    if named.is_some_and(|n| n != identity.institution) {
        return Err(ApiError::client(
            StatusCode::FORBIDDEN,
            "forbidden_institution",
            "the request names another institution than the client certificate",
        ));
    }
    let (id, config) = gateway
        .config
        .institutions
        .get_key_value(&identity.institution)
        .ok_or_else(|| ApiError::client(StatusCode::FORBIDDEN, "forbidden_institution", "unknown institution"))?;
    Ok((id.as_str(), config))
}

/// What every request that names a terminal goes through first: the institution must be the
/// certificate's, the terminal id well-formed and within its rate limit.
pub(super) async fn admit<'g>(
    gateway: &'g Gateway,
    identity: &Identity,
    named: Option<&str>,
    terminal: &str,
) -> Result<(&'g str, &'g InstitutionConfig), ApiError> {
    let institution = institution(gateway, identity, named)?;
    check_id("terminal_id", terminal)?;
    gateway.limiter.check_terminal(institution.0, terminal).await?;
    Ok(institution)
}

pub(super) fn sdk_institution(id: &str, config: &InstitutionConfig) -> Institution {
    Institution { id: id.to_owned(), level: config.level, region: config.region.clone() }
}

pub(super) fn insurance_type(subject: &Subject, requested: Option<&str>) -> Result<String, ApiError> {
    match requested {
        None => subject
            .insurance_types
            .first()
            .cloned()
            .ok_or_else(|| ApiError::invalid("the card holds no insurance type")),
        Some(t) if subject.insurance_types.iter().any(|held| held == t) => Ok(t.to_owned()),
        Some(t) => Err(ApiError::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            "insurance_type_not_held",
            format!("the card does not hold insurance type {t}"),
        )),
    }
}

pub(super) fn payer_chain<'g>(
    gateway: &'g Gateway,
    plugins: &'g PluginSet,
    subject: &Subject,
    insurance_type: &str,
    institution: (&str, &InstitutionConfig),
) -> Result<Vec<(&'g str, &'g PluginHandle)>, ApiError> {
    let query = RouteQuery {
        insured_region: &subject.insured_region,
        insurance_type,
        institution: institution.0,
        treatment_region: &institution.1.region,
    };
    let names = gateway.router.route(&query).ok_or_else(|| {
        ApiError::client(StatusCode::UNPROCESSABLE_ENTITY, "no_route", "no payer serves this card here")
    })?;
    names
        .iter()
        .map(|name| {
            let plugin = plugins
                .get(name)
                .ok_or_else(|| ApiError::Plugin { payer: name.clone(), error: CallError::Unavailable })?;
            Ok((name.as_str(), plugin))
        })
        .collect()
}

/// The payer chain as `a>b`, for the request log.
fn route_names(
    gateway: &Gateway,
    subject: &Subject,
    insurance_type: &str,
    institution: (&str, &InstitutionConfig),
) -> String {
    let query = RouteQuery {
        insured_region: &subject.insured_region,
        insurance_type,
        institution: institution.0,
        treatment_region: &institution.1.region,
    };
    gateway.router.route(&query).map_or_else(|| "-".to_owned(), |names| names.join(">"))
}

pub(super) fn year_of(now: i64) -> i32 {
    time::OffsetDateTime::from_unix_timestamp(now + UTC_OFFSET_SECS).map_or(1970, |t| t.year())
}

/// A new id: `prefix`, the time in milliseconds (12 hex digits, so ids sort by when they were
/// made) and 80 random bits (20 hex digits).
pub(super) fn new_id(prefix: char) -> String {
    use std::fmt::Write;
    let mut random = [0u8; 10];
    if crate::random::fill(&mut random).is_err() {
        // The system's generator does not fail once the system has booted; if it ever did, the
        // id must still differ from every other this process makes in the same millisecond
        // (the ledger would refuse a second settlement with the first one's id).
        static FALLBACK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = FALLBACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        random[..8].copy_from_slice(&n.to_be_bytes());
        random[8..].copy_from_slice(&(std::process::id() as u16).to_be_bytes());
    }
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let mut id = String::with_capacity(1 + 12 + 2 * random.len());
    id.push(prefix);
    // Writing to a String cannot fail.
    let _ = write!(id, "{millis:012x}");
    for byte in random {
        let _ = write!(id, "{byte:02x}");
    }
    id
}

/// One payer's answer in a chain.
pub(super) struct PayerSplit<'g> {
    pub(super) name: &'g str,
    pub(super) version: String,
    pub(super) split: Split,
}

/// What a chain of payers needs to know about the bill.
pub(super) struct Bill<'a> {
    pub(super) id: &'a str,
    pub(super) subject: &'a Subject,
    pub(super) institution: Institution,
    pub(super) insurance_type: &'a str,
    /// The lines as the payers see them (classified by the catalogue, where there is one).
    pub(super) lines: &'a [cardgate_sdk::BillLine],
    pub(super) use_account: bool,
    pub(super) total_fen: i64,
    /// The encounter, for a hospital's settlement in steps.
    pub(super) encounter: Option<&'a cardgate_sdk::EncounterInfo>,
}

/// A payer the chain passed over: it answered that it does not insure this person for this
/// insurance type (`not_insured`). Shown on the quote and the receipt; nothing of it moves.
#[derive(Debug, Serialize)]
pub(super) struct Skipped<'g> {
    pub(super) payer: &'g str,
    pub(super) reason: &'static str,
    pub(super) detail: String,
}

/// Calls each payer with what the earlier ones left; checks every answer balances. A payer
/// that answers `not_insured` does not apply to this person and is skipped (the next is asked
/// for the same amount); any other refusal stops the chain. When no payer applies, the first
/// one's refusal is the answer.
pub(super) async fn run_chain<'g>(
    gateway: &'g Gateway,
    chain: &[(&'g str, &'g PluginHandle)],
    operation: Operation,
    bill: &Bill<'_>,
    card_hash: &[u8],
    year: i32,
) -> Result<Chained<'g>, ApiError> {
    let mut due = bill.total_fen;
    let mut prior: Vec<PriorPayment> = Vec::new();
    let mut results = Vec::with_capacity(chain.len());
    let mut skipped = Vec::new();
    let mut first_refusal = None;
    let mut read = Vec::with_capacity(chain.len());
    let names: Vec<&str> = chain.iter().map(|(name, _)| *name).collect();
    let mut years = gateway.ledger.year_to_date(card_hash, year, &names).await?.into_iter();
    let card = bill.subject.card();
    // What every payer is sent alike (the card, the institution, the lines) is encoded once.
    let input = SettlementInput::new(&Common {
        settlement_id: bill.id,
        card: &card,
        institution: &bill.institution,
        insurance_type: bill.insurance_type,
        lines: bill.lines,
        total_fen: bill.total_fen,
        use_account: bill.use_account,
        encounter: bill.encounter,
    })
    .map_err(|error| ApiError::Plugin { payer: chain.first().map_or("", |(name, _)| *name).to_owned(), error })?;
    for (name, plugin) in chain {
        let year_to_date = years.next().unwrap_or(YearToDate { year, ..YearToDate::default() });
        read.push(AccumulatorDelta { payer: (*name).to_owned(), delta: year_to_date });
        let request = input.payer(due, &prior, &year_to_date);
        let answer: Result<Split, CallError> = plugin.call(operation, &request).await;
        let split = match answer {
            Ok(split) => split,
            Err(CallError::Rejected(e)) if e.code == cardgate_sdk::ErrorCode::NotInsured => {
                read.pop();
                skipped.push(Skipped { payer: name, reason: e.code.as_str(), detail: e.message.clone() });
                first_refusal
                    .get_or_insert(ApiError::Plugin { payer: (*name).to_owned(), error: CallError::Rejected(e) });
                continue;
            }
            Err(error) => return Err(ApiError::Plugin { payer: (*name).to_owned(), error }),
        };
        split
            .check_balances(due)
            .map_err(|e| ApiError::Unbalanced { payer: (*name).to_owned(), detail: e.to_string() })?;
        prior.push(PriorPayment {
            payer: (*name).to_owned(),
            fund_pay_fen: split.fund_pay_fen(),
            account_pay_fen: split.account_pay_fen,
            eligible_self_pay_fen: split.eligible_self_pay_fen,
            eligible_borne_fen: split.eligible_borne_fen,
        });
        due = split.cash_pay_fen;
        results.push(PayerSplit { name, version: plugin.info().version.clone(), split });
    }
    match first_refusal {
        Some(refusal) if results.is_empty() => Err(refusal),
        _ => Ok(Chained { results, skipped, read }),
    }
}

/// A chain's answers, the payers it skipped and the accumulators its payers were given.
pub(super) struct Chained<'g> {
    pub(super) results: Vec<PayerSplit<'g>>,
    pub(super) skipped: Vec<Skipped<'g>>,
    pub(super) read: Vec<AccumulatorDelta>,
}

/// A delegate as answers show it: the card masked.
#[derive(Serialize)]
struct DelegateView<'a> {
    card: String,
    name: &'a Option<String>,
    relation: &'a str,
}

fn delegate_view(subject: &Subject) -> Option<DelegateView<'_>> {
    subject.delegate.as_ref().map(|(card_id, name, relation)| DelegateView { card: mask_card(card_id), name, relation })
}

#[derive(Serialize)]
pub(super) struct FundLine<'a> {
    payer: &'a str,
    fund: &'a str,
    amount_fen: i64,
}

#[derive(Serialize)]
pub(super) struct PayerView<'a> {
    payer: &'a str,
    version: &'a str,
    funds: &'a [cardgate_sdk::FundPayment],
    fund_pay_fen: i64,
    account_pay_fen: i64,
    cash_pay_fen: i64,
    eligible_self_pay_fen: i64,
    breakdown: &'a [cardgate_sdk::BreakdownItem],
}

/// The split part shared by quotes and receipts, serialised straight from the payers' answers.
#[derive(Serialize)]
pub(super) struct SplitView<'a> {
    total_fen: i64,
    fund_pay_fen: i64,
    account_pay_fen: i64,
    cash_pay_fen: i64,
    funds: Vec<FundLine<'a>>,
    payers: Vec<PayerView<'a>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    skipped: &'a [Skipped<'a>],
}

pub(super) fn split_view<'a>(
    results: &'a [PayerSplit<'_>],
    skipped: &'a [Skipped<'a>],
    total_fen: i64,
) -> SplitView<'a> {
    SplitView {
        skipped,
        total_fen,
        fund_pay_fen: results.iter().map(|r| r.split.fund_pay_fen()).sum(),
        account_pay_fen: results.iter().map(|r| r.split.account_pay_fen).sum(),
        cash_pay_fen: results.last().map_or(total_fen, |r| r.split.cash_pay_fen),
        funds: results
            .iter()
            .flat_map(|r| {
                r.split.funds.iter().map(|f| FundLine { payer: r.name, fund: &f.fund, amount_fen: f.amount_fen })
            })
            .collect(),
        payers: results
            .iter()
            .map(|r| PayerView {
                payer: r.name,
                version: &r.version,
                funds: &r.split.funds,
                fund_pay_fen: r.split.fund_pay_fen(),
                account_pay_fen: r.split.account_pay_fen,
                cash_pay_fen: r.split.cash_pay_fen,
                eligible_self_pay_fen: r.split.eligible_self_pay_fen,
                breakdown: &r.split.breakdown,
            })
            .collect(),
    }
}

fn merge(mut base: Value, extra: Value) -> Value {
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base
}

/// `POST /v1/inquiries`.
pub async fn inquire(gateway: &Gateway, identity: &Identity, body: InquiryBody) -> Result<ApiResponse, ApiError> {
    let institution = admit(gateway, identity, body.institution_id.as_deref(), &body.terminal_id).await?;
    let now = gateway.clock.now();
    let verified = gateway.verifier.verify_batched(&body.token, now, gateway.config.tokens.signature_batch()).await?;
    let subject =
        Subject::from_claim(verified.ecard.ok_or(TokenError::ProfileInvalid("no e-card claim".into()))?, None, None);
    let card_hash = gateway.card_key.hash(&subject.card_id);
    gateway.limiter.check_card(&card_hash).await?;
    let insurance_type = insurance_type(&subject, body.insurance_type.as_deref())?;
    let plugins = gateway.plugins();
    let chain = payer_chain(gateway, &plugins, &subject, &insurance_type, institution)?;
    let mut payers = Vec::new();
    let (year, names) = (year_of(now), chain.iter().map(|(name, _)| *name).collect::<Vec<_>>());
    let mut years = gateway.ledger.year_to_date(&card_hash, year, &names).await?.into_iter();
    for (name, plugin) in chain {
        let year_to_date = years.next().unwrap_or(YearToDate { year, ..YearToDate::default() });
        let request = InquiryRequest {
            card: subject.card(),
            institution: sdk_institution(institution.0, institution.1),
            year_to_date,
        };
        let answer: Result<Inquiry, CallError> = plugin.inquire(&request).await;
        payers.push(match answer {
            Ok(inquiry) => {
                merge(json!({ "payer": name, "supported": true }), serde_json::to_value(inquiry).unwrap_or_default())
            }
            Err(CallError::Rejected(e)) if e.code == cardgate_sdk::ErrorCode::Unsupported => {
                json!({ "payer": name, "supported": false })
            }
            Err(error) => return Err(ApiError::Plugin { payer: name.to_owned(), error }),
        });
    }
    let answer = json!({
        "card": mask_card(&subject.card_id),
        "holder_name": subject.holder_name,
        "insured_region": subject.insured_region,
        "insurance_types": subject.insurance_types,
        "insurance_type": insurance_type,
        "delegate": subject.delegate_json(),
        "token_expires_at": verified.claims.expires_at.map(rfc3339),
        "payers": payers,
    });
    Ok(ApiResponse::json(StatusCode::OK, answer.to_string()))
}

/// A quote, as answered.
#[derive(Serialize)]
struct QuoteView<'a> {
    quote_id: &'a str,
    state: &'static str,
    expires_at: String,
    institution_id: &'a str,
    terminal_id: &'a str,
    card: String,
    holder_name: &'a str,
    delegate: Option<DelegateView<'a>>,
    insurance_type: &'a str,
    insured_region: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    reclassified: &'a [Reclassified],
    #[serde(flatten)]
    split: SplitView<'a>,
}

/// The bureau's catalogue applied to a bill's lines on the business day of `now` (nothing
/// without a catalogue): each line takes the catalogue's entry and class, or the bill is
/// refused (`422 item_not_in_catalogue`, `item_class_mismatch`) as configured.
pub(super) fn classify_lines(
    gateway: &Gateway,
    lines: &mut [cardgate_sdk::BillLine],
    now: i64,
) -> Result<Vec<Reclassified>, ApiError> {
    let Some(catalogue) = &gateway.catalogue else { return Ok(Vec::new()) };
    catalogue
        .classify(lines, &crate::ledger::business_day(now))
        .map_err(|r| ApiError::client(StatusCode::UNPROCESSABLE_ENTITY, r.code, r.detail))
}

/// A settlement's lines as its payers see them ([`Prepared::lines`]) and those the catalogue
/// reclassified. No lines where the catalogue changed none (where there is no catalogue, say):
/// [`Prepared::lines`] answers the bill's own then, and the sealed request, stored with every
/// settlement, does not carry the lines twice.
fn classified(
    gateway: &Gateway,
    bill_lines: &[cardgate_sdk::BillLine],
    now: i64,
) -> Result<(Vec<cardgate_sdk::BillLine>, Vec<Reclassified>), ApiError> {
    if gateway.catalogue.is_none() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut lines = bill_lines.to_vec();
    let reclassified = classify_lines(gateway, &mut lines, now)?;
    if lines == bill_lines {
        lines.clear();
    }
    Ok((lines, reclassified))
}

/// `POST /v1/quotes`.
pub async fn quote(gateway: &Gateway, identity: &Identity, body: BillBody) -> Result<ApiResponse, ApiError> {
    let institution = admit(gateway, identity, body.institution_id.as_deref(), &body.terminal_id).await?;
    let total_fen = check_bill(&body.lines, body.total_fen)?;
    let mut lines = body.lines.clone();
    let reclassified = classify_lines(gateway, &mut lines, gateway.clock.now())?;
    let token = match (&body.token, &body.quote_id) {
        (Some(token), None) => token,
        _ => return Err(ApiError::invalid("a quote needs `token` (and no `quote_id`)")),
    };
    let now = gateway.clock.now();
    let verified = gateway.verifier.verify_batched(token, now, gateway.config.tokens.signature_batch()).await?;
    let ecard = verified.ecard.ok_or(TokenError::ProfileInvalid("no e-card claim".into()))?;
    let subject = Subject::from_claim(ecard, verified.claims.token_id.clone(), verified.claims.expires_at);
    gateway.limiter.check_card(&gateway.card_key.hash(&subject.card_id)).await?;
    let insurance_type = insurance_type(&subject, body.insurance_type.as_deref())?;
    let plugins = gateway.plugins();
    let chain = payer_chain(gateway, &plugins, &subject, &insurance_type, institution)?;
    let id = new_id('Q');
    let bill = Bill {
        id: &id,
        subject: &subject,
        institution: sdk_institution(institution.0, institution.1),
        insurance_type: &insurance_type,
        lines: &lines,
        use_account: body.use_account.unwrap_or(true),
        total_fen,
        encounter: None,
    };
    let card_hash = gateway.card_key.hash(&subject.card_id);
    let Chained { results, skipped, .. } =
        run_chain(gateway, &chain, Operation::Quote, &bill, &card_hash, year_of(now)).await?;
    let expires_at = now + gateway.config.tokens.quote_validity_secs;
    let content = QuoteContent {
        subject: subject.clone(),
        insurance_type: insurance_type.clone(),
        terminal_id: body.terminal_id.clone(),
        bill: BillBody { token: None, ..body.clone() },
    };
    let sealed = gateway.card_key.seal(&serde_json::to_vec(&content).map_err(|e| LedgerError::Storage(e.to_string()))?);
    let stored =
        StoredQuote { id: id.clone(), institution: institution.0.to_owned(), expires_at, sealed, settled_by: None };
    gateway.ledger.save_quote(stored).await?;
    let answer = QuoteView {
        quote_id: &id,
        state: "quoted",
        expires_at: rfc3339(expires_at),
        institution_id: institution.0,
        terminal_id: &body.terminal_id,
        card: mask_card(&subject.card_id),
        holder_name: &subject.holder_name,
        delegate: delegate_view(&subject),
        insurance_type: &insurance_type,
        insured_region: &subject.insured_region,
        reclassified: &reclassified,
        split: split_view(&results, &skipped, total_fen),
    };
    let answer = serde_json::to_string(&answer).map_err(|e| LedgerError::Storage(e.to_string()))?;
    Ok(ApiResponse::json(StatusCode::CREATED, answer))
}

/// What a settlement request resolves to before any money moves; sealed into the intent so an
/// interrupted settlement can be completed exactly as it was asked.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Prepared {
    pub(super) subject: Subject,
    pub(super) insurance_type: String,
    pub(super) bill: BillBody,
    pub(super) total_fen: i64,
    pub(super) quote_id: Option<String>,
    /// The lines as the payers see them: `bill`'s, classified by the catalogue (each with its
    /// entry). Kept apart from `bill`, which is the request as sent and is read back as one;
    /// empty where they would be `bill`'s as they are (see [`Prepared::lines`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) lines: Vec<cardgate_sdk::BillLine>,
    /// The lines the catalogue reclassified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) reclassified: Vec<Reclassified>,
    /// A settlement of an encounter: which, and the fee lines (serial numbers) it claims.
    #[serde(default)]
    pub(super) encounter: Option<EncounterClaim>,
}

/// What an encounter's settlement settles: the encounter as its payers see it and the serial
/// numbers of the fee lines it claimed (see `encounters`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct EncounterClaim {
    pub(super) info: cardgate_sdk::EncounterInfo,
    pub(super) serials: Vec<String>,
}

impl Prepared {
    /// The lines the payers are asked about: the classified ones, or `bill`'s where the
    /// catalogue changed nothing (or an intent was written before the catalogue existed).
    fn lines(&self) -> &[cardgate_sdk::BillLine] {
        if self.lines.is_empty() { &self.bill.lines } else { &self.lines }
    }
}

async fn prepare_by_token(gateway: &Gateway, body: &BillBody, token: &str, now: i64) -> Result<Prepared, ApiError> {
    let total_fen = check_bill(&body.lines, body.total_fen)?;
    let verified = gateway.verifier.verify_batched(token, now, gateway.config.tokens.signature_batch()).await?;
    let ecard = verified.ecard.ok_or(TokenError::ProfileInvalid("no e-card claim".into()))?;
    let subject = Subject::from_claim(ecard, verified.claims.token_id.clone(), verified.claims.expires_at);
    if subject.token_id.as_ref().is_some_and(|cti| gateway.replay_cache.contains(cti)) {
        return Err(TokenError::Replayed.into());
    }
    let insurance_type = insurance_type(&subject, body.insurance_type.as_deref())?;
    let (lines, reclassified) = classified(gateway, &body.lines, now)?;
    Ok(Prepared {
        subject,
        insurance_type,
        bill: body.clone(),
        total_fen,
        quote_id: None,
        lines,
        reclassified,
        encounter: None,
    })
}

async fn prepare_by_quote(
    gateway: &Gateway,
    institution: &str,
    body: &BillBody,
    quote_id: &str,
    now: i64,
) -> Result<Prepared, ApiError> {
    let quote = gateway.ledger.quote(institution, quote_id).await?.ok_or_else(|| {
        ApiError::client(StatusCode::NOT_FOUND, "quote_not_found", "no such quote for this institution")
    })?;
    if quote.settled_by.is_some() {
        return Err(LedgerError::QuoteUsed.into());
    }
    if now >= quote.expires_at {
        return Err(ApiError::client(StatusCode::UNPROCESSABLE_ENTITY, "quote_expired", "the quote has expired"));
    }
    let content: QuoteContent = gateway
        .card_key
        .open(&quote.sealed)
        .and_then(|plain| serde_json::from_slice(&plain).ok())
        .ok_or_else(|| ApiError::Storage(LedgerError::Storage("a stored quote does not open".into())))?;
    if !body.lines.is_empty() && (body.lines != content.bill.lines || body.total_fen != content.bill.total_fen) {
        return Err(ApiError::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            "quote_mismatch",
            "the bill differs from the quote",
        ));
    }
    if body.insurance_type.as_ref().is_some_and(|t| *t != content.insurance_type) {
        return Err(ApiError::client(StatusCode::UNPROCESSABLE_ENTITY, "quote_mismatch", "the insurance type differs"));
    }
    if gateway.verifier.card_revoked(&content.subject.card_id) {
        return Err(TokenError::CardRevoked.into());
    }
    let total_fen = check_bill(&content.bill.lines, content.bill.total_fen)?;
    let mut bill = content.bill;
    if body.use_account.is_some() {
        bill.use_account = body.use_account;
    }
    // Classified as of the settlement, like the accumulators: a quote reserves neither.
    let (lines, reclassified) = classified(gateway, &bill.lines, now)?;
    Ok(Prepared {
        subject: content.subject,
        insurance_type: content.insurance_type,
        bill,
        total_fen,
        quote_id: Some(quote_id.to_owned()),
        lines,
        reclassified,
        encounter: None,
    })
}

/// SHA-256 of a request body as parsed (what an idempotency key is bound to).
pub(super) fn request_hash<T: Serialize>(body: &T) -> Vec<u8> {
    let canonical = serde_json::to_vec(body).unwrap_or_default();
    ring::digest::digest(&ring::digest::SHA256, &canonical).as_ref().to_vec()
}

/// The answer for a repeated idempotency key: the stored one; for an `unknown` outcome, the
/// settlement is completed first (never twice).
pub(super) async fn replay(gateway: &Gateway, record: Record, hash: &[u8]) -> Result<ApiResponse, ApiError> {
    if record.request_hash != hash {
        return Err(ApiError::client(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request",
        ));
    }
    let stale = gateway.clock.now() - record.created_at > stale_pending_secs(gateway);
    match record.state {
        State::Pending if !stale => Err(ApiError::client(
            StatusCode::CONFLICT,
            "request_in_progress",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        )),
        // Pending for longer than any chain of payers can take: its outcome was never recorded
        // (the write failed, the storage was full). Completed now like an unknown one.
        State::Pending | State::Unknown => {
            // Unless another node of the cluster is completing it now.
            if !gateway.ledger.claim(&record.id, lease_secs(gateway)).await? {
                return Err(ApiError::client(
                    StatusCode::CONFLICT,
                    "request_in_progress",
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                ));
            }
            let unresolved =
                gateway.ledger.sealed_request(&record.institution, &record.id).await?.ok_or(LedgerError::NotFound)?;
            resolve(gateway, &unresolved).await
        }
        _ => stored_answer(gateway, record),
    }
}

/// How long a settlement may stay `pending` while its payers are being asked: every configured
/// plugin's timeout (the longest chain could call them all) and ten seconds for the ledger.
fn stale_pending_secs(gateway: &Gateway) -> i64 {
    let payers_ms: u64 = gateway.config.plugins.values().map(|p| p.timeout_ms).sum();
    i64::try_from(payers_ms / 1000).unwrap_or(i64::MAX / 2) + 10
}

/// How long a node holds a settlement it takes over to complete: the cluster's lease, or (one
/// process) as long as a chain of payers can take.
fn lease_secs(gateway: &Gateway) -> i64 {
    gateway.ledger.lease_secs().unwrap_or_else(|| stale_pending_secs(gateway))
}

pub(super) fn stored_answer(gateway: &Gateway, record: Record) -> Result<ApiResponse, ApiError> {
    Ok(match record.state {
        State::Pending | State::Unknown => {
            let error = ApiError::client(StatusCode::CONFLICT, "request_in_progress", "still being processed; retry");
            ApiResponse::problem(&error, "-")
        }
        _ => ApiResponse {
            status: StatusCode::from_u16(record.status).unwrap_or(StatusCode::OK),
            problem: !(200..300).contains(&record.status),
            body: opened(gateway, &record.body)?,
            retry_after: None,
            code: None,
            allow: None,
        },
    })
}

/// A stored answer as sent: receipts name the holder, so they are stored sealed.
fn opened(gateway: &Gateway, stored: &str) -> Result<String, ApiError> {
    gateway
        .card_key
        .open_text(stored)
        .ok_or_else(|| ApiError::Storage(LedgerError::Storage("a stored answer does not open".into())))
}

/// Everything a new settlement must pass before its intent is recorded: the token (or quote),
/// the card's velocity, a route. Answers the prepared request and the card's hash.
async fn prepare_settlement(
    gateway: &Gateway,
    institution: (&str, &InstitutionConfig),
    body: &BillBody,
    now: i64,
) -> Result<(Prepared, Vec<u8>), ApiError> {
    let prepared = match (&body.token, &body.quote_id) {
        (Some(token), None) => prepare_by_token(gateway, body, token, now).await?,
        (None, Some(quote_id)) => prepare_by_quote(gateway, institution.0, body, quote_id, now).await?,
        _ => return Err(ApiError::invalid("give exactly one of `token` and `quote_id`")),
    };
    let card_hash = gateway.card_key.hash(&prepared.subject.card_id);
    gateway.limiter.check_card(&card_hash).await?;
    // Refuse an unroutable card before anything is recorded.
    payer_chain(gateway, &gateway.plugins(), &prepared.subject, &prepared.insurance_type, institution)?;
    Ok((prepared, card_hash))
}

/// `POST /v1/settlements`.
pub async fn settle(
    gateway: &Gateway,
    identity: &Identity,
    key: &str,
    body: BillBody,
    request_id: &str,
) -> Result<ApiResponse, ApiError> {
    let institution = admit(gateway, identity, body.institution_id.as_deref(), &body.terminal_id).await?;
    let hash = request_hash(&body);
    let now = gateway.clock.now();
    let admitted = prepare_settlement(gateway, institution, &body, now).await;
    // A retry gets the stored answer whatever its token or quote says by now (used, expired,
    // over the card's velocity). The key is looked up only when the request is refused, or
    // when recording its intent finds the key taken: a new settlement costs no extra read.
    let (prepared, card_hash) = match admitted {
        Ok(admitted) => admitted,
        Err(error) => {
            return match gateway.ledger.by_idempotency_key(institution.0, key).await? {
                Some(record) => replay(gateway, record, &hash).await,
                None => Err(error),
            };
        }
    };
    let id = new_id('S');
    let intent = Intent {
        id: id.clone(),
        institution: institution.0.to_owned(),
        terminal: body.terminal_id.clone(),
        idempotency_key: key.to_owned(),
        request_hash: hash.clone(),
        token_id: prepared.subject.token_id.clone(),
        quote_id: prepared.quote_id.clone(),
        card_hash: card_hash.clone(),
        card_masked: mask_card(&prepared.subject.card_id),
        total_fen: prepared.total_fen,
        created_at: now,
        sealed_request: gateway
            .card_key
            .seal(&serde_json::to_vec(&prepared).map_err(|e| LedgerError::Storage(e.to_string()))?),
        insurance_type: prepared.insurance_type.clone(),
        clearing_type: crate::ledger::clearing_type(institution.1.level).to_owned(),
        delegated: prepared.subject.delegate.is_some(),
    };
    // The intent is recorded by `complete`: before the payers are asked, or with the outcome
    // in one commit when they are all effect-free. Either way a taken key means a retry (or a
    // concurrent twin) of a settlement already recorded: it gets that one's answer.
    let settlement = Settlement { id: &id, institution: institution.0, created_at: now, request_id };
    match complete(gateway, settlement, &prepared, card_hash, Some(intent)).await {
        Err(ApiError::Storage(LedgerError::IdempotencyTaken)) => {
            let record = gateway.ledger.by_idempotency_key(institution.0, key).await?.ok_or(LedgerError::NotFound)?;
            replay(gateway, record, &hash).await
        }
        answered => answered,
    }
}

/// Runs the payer chain and records its outcome; answers what was recorded. Used for new
/// settlements (`unrecorded`: their intent, not yet written), retries of `unknown` ones and
/// the start-up recovery.
pub(super) async fn complete(
    gateway: &Gateway,
    settlement: Settlement<'_>,
    prepared: &Prepared,
    card_hash: Vec<u8>,
    mut unrecorded: Option<Intent>,
) -> Result<ApiResponse, ApiError> {
    let Settlement { id, institution: institution_id, created_at, request_id } = settlement;
    let institution = gateway
        .config
        .institutions
        .get_key_value(institution_id)
        .map(|(k, v)| (k.as_str(), v))
        .ok_or_else(|| ApiError::client(StatusCode::FORBIDDEN, "forbidden_institution", "unknown institution"))?;
    let year = year_of(created_at);
    // One settlement or reversal of a card at a time, from reading its accumulators to the
    // durable outcome (crate::cardlock); the ledger's conditional commit covers other processes.
    let _card = gateway.card_locks.lock(&card_hash).await;
    // An encounter's settlement settles only the lines it claimed: one left pending before its
    // claim landed (a crash, a change of the encounter meanwhile) settles nothing.
    if unrecorded.is_none()
        && let Some(claim) = &prepared.encounter
        && !super::encounters::claim_holds(gateway, institution.0, claim, id).await?
    {
        let busy = ApiError::client(StatusCode::CONFLICT, "encounter_busy", "the encounter changed meanwhile; retry");
        return super::encounters::fail_unclaimed(gateway, settlement, &card_hash, busy).await;
    }
    let (mut attempt, mut retry_after) = (0, None);
    let (state, status, answer) = loop {
        attempt += 1;
        let plugins = gateway.plugins();
        let chain = payer_chain(gateway, &plugins, &prepared.subject, &prepared.insurance_type, institution);
        // A new settlement's intent is written before any payer is asked, unless every payer
        // of the chain it actually runs is effect-free: then intent and outcome are one commit
        // (a crash before it loses nothing — nothing was answered, nothing happened anywhere).
        if let Ok(chain) = &chain
            && !chain.iter().all(|(_, plugin)| plugin.info().effect_free)
            && let Some(intent) = unrecorded.take()
        {
            gateway.ledger.begin(intent).await?;
        }
        let outcome = match chain {
            Ok(chain) => {
                let bill = Bill {
                    id,
                    subject: &prepared.subject,
                    institution: sdk_institution(institution.0, institution.1),
                    insurance_type: &prepared.insurance_type,
                    lines: prepared.lines(),
                    use_account: prepared.bill.use_account.unwrap_or(true),
                    total_fen: prepared.total_fen,
                    encounter: prepared.encounter.as_ref().map(|e| &e.info),
                };
                run_chain(gateway, &chain, Operation::Settle, &bill, &card_hash, year).await
            }
            Err(e) => Err(e),
        };
        // The ledger failed before any payer was asked (reading the card's figures): nothing
        // happened, and nothing is recorded as if it had — a refusal stored under the key would
        // answer every retry with this 503 for ever. A new settlement stays unrecorded; one whose
        // intent is written stays pending, completed later like any interrupted one.
        if let Err(ApiError::Storage(error @ LedgerError::Storage(_))) = &outcome {
            return Err(ApiError::Storage(error.clone()));
        }
        let now = gateway.clock.now();
        let (state, status, answer, deltas, amounts, read) = match outcome {
            Ok(Chained { results, skipped, read }) => {
                let receipt = receipt(id, institution.0, &prepared.bill.terminal_id, prepared, &results, &skipped, now);
                let deltas = results
                    .iter()
                    .map(|r| AccumulatorDelta {
                        payer: r.name.to_owned(),
                        delta: YearToDate { year, ..r.split.year_to_date_delta },
                    })
                    .collect();
                let amounts = Amounts {
                    fund_fen: results.iter().map(|r| r.split.fund_pay_fen()).sum(),
                    account_fen: results.iter().map(|r| r.split.account_pay_fen).sum(),
                    cash_fen: results.last().map_or(prepared.total_fen, |r| r.split.cash_pay_fen),
                    payers: results
                        .iter()
                        .map(|r| (r.name.to_owned(), r.split.fund_pay_fen(), r.split.account_pay_fen))
                        .collect(),
                };
                (State::Settled, StatusCode::CREATED, receipt, deltas, Some(amounts), read)
            }
            Err(error) => {
                retry_after = error.retry_after();
                let timed_out = matches!(error, ApiError::Plugin { error: CallError::Timeout(_), .. });
                let (status, problem) = error.body(request_id, Some(("settlement_id", id)));
                (if timed_out { State::Unknown } else { State::Failed }, status, problem, Vec::new(), None, Vec::new())
            }
        };
        // A receipt names the holder: stored sealed, like the request.
        let stored = if state == State::Settled { gateway.card_key.seal_text(&answer) } else { answer.clone() };
        let outcome = Outcome {
            id: id.to_owned(),
            state,
            status: status.as_u16(),
            body: stored,
            deltas,
            card_hash: card_hash.clone(),
            read,
            at: now,
            amounts,
        };
        let written = match &unrecorded {
            Some(intent) => gateway.ledger.record(intent.clone(), outcome).await,
            None => gateway.ledger.finish(outcome).await,
        };
        match written {
            Ok(()) => break (state, status, answer),
            // Another process settled the same card in between: ask the payers again with the
            // figures as they are now (the same settlement id: payers treat it as one bill).
            Err(LedgerError::Stale) if attempt < STALE_ATTEMPTS => {
                tracing::info!(
                    settlement = id,
                    attempt,
                    "the card's figures changed meanwhile; asking the payers again"
                );
            }
            // Completed meanwhile by a concurrent retry: answer what it recorded.
            Err(LedgerError::NotFound) => {
                let record = gateway.ledger.get(institution.0, id).await?.ok_or(LedgerError::NotFound)?;
                return stored_answer(gateway, record);
            }
            Err(e) => return Err(e.into()),
        }
    };
    let now = gateway.clock.now();
    crate::metrics::settlement(state.as_str());
    tracing::debug!(
        request_id,
        settlement = id,
        institution = institution.0,
        terminal = %prepared.bill.terminal_id,
        route = %route_names(gateway, &prepared.subject, &prepared.insurance_type, institution),
        outcome = state.as_str(),
        "settlement"
    );
    if state == State::Settled
        && let Some(cti) = &prepared.subject.token_id
    {
        let forget_after = prepared.subject.token_expires_at.unwrap_or(now) + gateway.config.tokens.clock_skew_secs;
        let _ = gateway.replay_cache.claim(cti, forget_after, now);
    }
    // `Retry-After` on the first answer of a refusal worth retrying (a payer unavailable): the
    // refused settlement itself is final, its token free again for a retry with a new key.
    Ok(ApiResponse { status, problem: state != State::Settled, body: answer, retry_after, code: None, allow: None })
}

/// Which settlement [`complete`] completes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settlement<'a> {
    pub(super) id: &'a str,
    pub(super) institution: &'a str,
    /// When its intent was made (its accumulator year).
    pub(super) created_at: i64,
    pub(super) request_id: &'a str,
}

/// How often a settlement is asked again when the card's figures changed under it.
const STALE_ATTEMPTS: u32 = 3;

/// Completes a settlement left `pending` (by a crash) or `unknown` (by a timeout), from the
/// request sealed in its intent. The payers are asked again with the same settlement id; the
/// outcome is recorded once.
pub async fn resolve(gateway: &Gateway, unresolved: &Unresolved) -> Result<ApiResponse, ApiError> {
    let prepared: Prepared = gateway
        .card_key
        .open(&unresolved.sealed_request)
        .and_then(|plain| serde_json::from_slice(&plain).ok())
        .ok_or_else(|| ApiError::Storage(LedgerError::Storage("a sealed request does not open".into())))?;
    let request_id = format!("resolve-{}", unresolved.id);
    let card_hash = gateway.card_key.hash(&prepared.subject.card_id);
    let settlement = Settlement {
        id: &unresolved.id,
        institution: &unresolved.institution,
        created_at: unresolved.created_at,
        request_id: &request_id,
    };
    complete(gateway, settlement, &prepared, card_hash, None).await
}

/// Resolves every settlement left `pending` or `unknown`; run at start, before serving, and
/// (nodes of a cluster) now and then: those another node holds are left to it — one that died
/// leaves them when their lease runs out. Answers how many were resolved.
pub async fn resolve_all(gateway: &Gateway) -> Result<usize, ApiError> {
    let unresolved = gateway.ledger.unresolved().await?;
    let mut resolved = 0;
    for record in &unresolved {
        if !gateway.ledger.claim(&record.id, lease_secs(gateway)).await? {
            continue;
        }
        resolved += 1;
        match resolve(gateway, record).await {
            Ok(answer) => {
                tracing::info!(settlement = %record.id, status = answer.status.as_u16(), "resolved an interrupted settlement")
            }
            Err(error) => tracing::warn!(settlement = %record.id, ?error, "could not resolve a settlement yet"),
        }
    }
    Ok(resolved)
}

/// A settled receipt, as stored and answered.
#[derive(Serialize)]
struct Receipt<'a> {
    settlement_id: &'a str,
    state: &'static str,
    institution_id: &'a str,
    terminal_id: &'a str,
    card: String,
    holder_name: &'a str,
    delegate: Option<DelegateView<'a>>,
    insured_region: &'a str,
    insurance_type: &'a str,
    quote_id: Option<&'a str>,
    lines: usize,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    reclassified: &'a [Reclassified],
    /// The encounter settled (a hospital's settlement in steps), and whether in the interim.
    #[serde(skip_serializing_if = "Option::is_none")]
    encounter_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interim: Option<bool>,
    settled_at: String,
    #[serde(flatten)]
    split: SplitView<'a>,
}

fn receipt(
    id: &str,
    institution: &str,
    terminal: &str,
    p: &Prepared,
    results: &[PayerSplit<'_>],
    skipped: &[Skipped<'_>],
    now: i64,
) -> String {
    let receipt = Receipt {
        settlement_id: id,
        state: "settled",
        institution_id: institution,
        terminal_id: terminal,
        card: mask_card(&p.subject.card_id),
        holder_name: &p.subject.holder_name,
        delegate: delegate_view(&p.subject),
        insured_region: &p.subject.insured_region,
        insurance_type: &p.insurance_type,
        quote_id: p.quote_id.as_deref(),
        lines: p.lines().len(),
        reclassified: &p.reclassified,
        encounter_id: p.encounter.as_ref().map(|e| e.info.id.as_str()),
        interim: p.encounter.as_ref().map(|e| e.info.interim),
        settled_at: rfc3339(now),
        split: split_view(results, skipped, p.total_fen),
    };
    serde_json::to_string(&receipt).unwrap_or_default()
}

/// `GET /v1/settlements/{id}`.
pub async fn get(gateway: &Gateway, identity: &Identity, id: &str) -> Result<ApiResponse, ApiError> {
    let record = gateway.ledger.get(&identity.institution, id).await?.ok_or(LedgerError::NotFound)?;
    let view = match record.state {
        State::Settled | State::Reversed => {
            let mut receipt: Value = serde_json::from_str(&opened(gateway, &record.body)?).unwrap_or_default();
            receipt["state"] = json!(record.state.as_str());
            if let Some(reversal) = &record.reversal {
                receipt["reversal"] = serde_json::from_str(reversal).unwrap_or_default();
            }
            receipt
        }
        State::Failed => json!({
            "settlement_id": record.id,
            "state": "failed",
            "problem": serde_json::from_str::<Value>(&record.body).unwrap_or_default(),
        }),
        State::Pending | State::Unknown => json!({ "settlement_id": record.id, "state": record.state.as_str() }),
    };
    Ok(ApiResponse::json(StatusCode::OK, view.to_string()))
}

/// `POST /v1/settlements/{id}/reversal`: idempotent; a repeat returns the same answer.
pub async fn reverse(
    gateway: &Gateway,
    identity: &Identity,
    id: &str,
    body: ReversalBody,
) -> Result<ApiResponse, ApiError> {
    // Only a settled settlement is reversed; a reversed one answers its stored reversal.
    let unless_settled = |record: Record| match record.state {
        State::Settled => Ok(record),
        State::Reversed => Err(Ok(ApiResponse::json(StatusCode::OK, record.reversal.unwrap_or_default()))),
        other => Err(Err(ApiError::client(
            StatusCode::CONFLICT,
            "not_reversible",
            format!("a {} settlement cannot be reversed", other.as_str()),
        ))),
    };
    let read =
        async || gateway.ledger.get(&identity.institution, id).await?.ok_or(ApiError::Storage(LedgerError::NotFound));
    if let Err(answer) = unless_settled(read().await?) {
        return answer;
    }
    // The card's lock, as a settlement takes it: its accumulators move back while no payer of
    // the card is being asked. The state is read again under it. A settled record's card and
    // accumulator changes never change: read once.
    let (card_hash, deltas) = gateway.ledger.settled_deltas(id).await?.ok_or(LedgerError::NotFound)?;
    let _card = gateway.card_locks.lock(&card_hash).await;
    let record = match unless_settled(read().await?) {
        Ok(record) => record,
        Err(answer) => return answer,
    };
    let receipt: Value =
        serde_json::from_str(&opened(gateway, &record.body)?).map_err(|e| LedgerError::Storage(e.to_string()))?;
    let institution_config = gateway.institution(&identity.institution).ok_or(LedgerError::NotFound)?;
    // The card as the payers saw it at settlement (its id, the delegate), from the request
    // sealed in the intent: a payer keeping books of its own matches the reversal to them. The
    // receipt keeps only the masked id; it stands in where the sealed request cannot be read.
    let settled_card = gateway
        .ledger
        .sealed_request(&identity.institution, id)
        .await?
        .and_then(|u| gateway.card_key.open(&u.sealed_request))
        .and_then(|plain| serde_json::from_slice::<Prepared>(&plain).ok())
        .map(|prepared| prepared.subject.card());
    let card = settled_card.unwrap_or_else(|| CardClaims {
        card_id: receipt["card"].as_str().unwrap_or_default().to_owned(),
        holder_name: receipt["holder_name"].as_str().unwrap_or_default().to_owned(),
        insured_region: receipt["insured_region"].as_str().unwrap_or_default().to_owned(),
        insurance_types: vec![receipt["insurance_type"].as_str().unwrap_or_default().to_owned()],
        delegate: None,
    });
    let payers = receipt["payers"].as_array().cloned().unwrap_or_default();
    let plugins = gateway.plugins();
    for payer in payers.iter().rev() {
        let name = payer["payer"].as_str().unwrap_or_default();
        let plugin = plugins
            .get(name)
            .ok_or_else(|| ApiError::Plugin { payer: name.to_owned(), error: CallError::Unavailable })?;
        let original: Split = serde_json::from_value(payer.clone()).unwrap_or_default();
        let request = ReversalRequest {
            settlement_id: id.to_owned(),
            card: card.clone(),
            institution: sdk_institution(&identity.institution, institution_config),
            original,
            reason: body.reason.clone(),
        };
        let answer =
            plugin.reverse(&request).await.map_err(|error| ApiError::Plugin { payer: name.to_owned(), error })?;
        if !answer.accepted {
            return Err(ApiError::client(
                StatusCode::UNPROCESSABLE_ENTITY,
                "reversal_declined",
                format!("payer `{name}` declined the reversal: {}", answer.note),
            ));
        }
    }
    let now = gateway.clock.now();
    let undo = deltas.into_iter().map(|d| AccumulatorDelta { payer: d.payer, delta: negate(d.delta) }).collect();
    let answer = json!({
        "settlement_id": id,
        "state": "reversed",
        "reversed_at": rfc3339(now),
        "reason": body.reason,
        "refund": {
            "total_fen": receipt["total_fen"],
            "fund_pay_fen": receipt["fund_pay_fen"],
            "account_pay_fen": receipt["account_pay_fen"],
            "cash_pay_fen": receipt["cash_pay_fen"],
        },
    })
    .to_string();
    match gateway.ledger.reverse(id.to_owned(), answer.clone(), undo, card_hash, now).await {
        Ok(()) => Ok(ApiResponse::json(StatusCode::OK, answer)),
        // A concurrent reversal won: answer what it stored.
        Err(LedgerError::NotFound) => {
            let record = gateway.ledger.get(&identity.institution, id).await?.ok_or(LedgerError::NotFound)?;
            Ok(ApiResponse::json(StatusCode::OK, record.reversal.unwrap_or_default()))
        }
        Err(e) => Err(e.into()),
    }
}

fn negate(d: YearToDate) -> YearToDate {
    YearToDate {
        year: d.year,
        deductible_fen: -d.deductible_fen,
        fund_paid_fen: -d.fund_paid_fen,
        eligible_fen: -d.eligible_fen,
        account_paid_fen: -d.account_paid_fen,
        eligible_self_pay_fen: -d.eligible_self_pay_fen,
        outpatient_fund_paid_fen: -d.outpatient_fund_paid_fen,
    }
}

/// `GET /v1/settlements?date=YYYY-MM-DD | from=..&to=..[&terminal_id=..][&state=..][&limit=N][&cursor=..]`:
/// the calling institution's settlements of a business day (UTC+8) or a time range (RFC 3339,
/// `to` excluded, at most 31 days), in the order they were recorded, a page at a time. The
/// answer's `next_cursor`, sent back as `cursor`, gives the next page; `null` after the last.
pub async fn list(gateway: &Gateway, identity: &Identity, query: Option<&str>) -> Result<ApiResponse, ApiError> {
    let mut q =
        crate::ledger::ListQuery { institution: identity.institution.clone(), limit: 100, ..Default::default() };
    let (mut date, mut from, mut to) = (None, None, None);
    for (key, value) in query_pairs(query)? {
        match key {
            "date" => date = Some(business_date(value)?),
            "from" => from = Some(moment("from", &value)?),
            "to" => to = Some(moment("to", &value)?),
            "terminal_id" => {
                check_id("terminal_id", &value)?;
                q.terminal = Some(value);
            }
            "state" => {
                q.state =
                    Some(State::parse(&value).ok_or_else(|| {
                        ApiError::invalid("state: one of pending, settled, failed, unknown, reversed")
                    })?)
            }
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::invalid("limit: 1 to 1000"))?
            }
            "cursor" => {
                q.after = value
                    .strip_prefix('c')
                    .and_then(|n| {
                        n.split('.').map(|part| u64::from_str_radix(part, 16).ok()).collect::<Option<Vec<_>>>()
                    })
                    .filter(|parts| parts.len() == gateway.ledger.cursor_parts())
                    .ok_or_else(|| ApiError::invalid("cursor: not one this gateway gave"))?
            }
            other => return Err(ApiError::invalid(format!("unknown query parameter `{other}`"))),
        }
    }
    q.days = match (date, from, to) {
        (Some(date), None, None) => (date.clone(), date),
        (None, Some(from), Some(to)) if from < to && to - from <= 31 * 86_400 => {
            q.from = Some(from);
            q.to = Some(to);
            (crate::ledger::business_day(from), crate::ledger::business_day(to))
        }
        (None, Some(_), Some(_)) => return Err(ApiError::invalid("from, to: from before to, at most 31 days apart")),
        _ => return Err(ApiError::invalid("give `date`, or `from` and `to`")),
    };
    let listed = gateway.ledger.list(&q).await?;
    let cursor = |l: &crate::ledger::Listed| {
        let parts: Vec<String> = l.position.iter().map(|p| format!("{p:x}")).collect();
        format!("c{}", parts.join("."))
    };
    let next_cursor = (listed.len() == q.limit as usize).then(|| listed.last().map(cursor)).flatten();
    let answer = json!({ "settlements": listed, "next_cursor": next_cursor });
    Ok(ApiResponse::json(StatusCode::OK, answer.to_string()))
}

/// A query string's `key=value` pairs, values percent-decoded. A parameter given twice is
/// refused: which of the two a filter would use is a guess a client should not have to make.
pub(crate) fn query_pairs(query: Option<&str>) -> Result<Vec<(&str, String)>, ApiError> {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
        if pairs.iter().any(|(seen, _)| *seen == key) {
            return Err(ApiError::invalid(format!("{key}: given more than once")));
        }
        let value = percent_decode(raw).ok_or_else(|| ApiError::invalid(format!("{key}: bad percent-encoding")))?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// A `date` parameter: a business day, `YYYY-MM-DD`.
pub(super) fn business_date(value: String) -> Result<String, ApiError> {
    if crate::ledger::is_business_day(&value) { Ok(value) } else { Err(ApiError::invalid("date: YYYY-MM-DD")) }
}

/// An RFC 3339 moment from a query parameter.
pub(super) fn moment(key: &str, value: &str) -> Result<i64, ApiError> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(time::OffsetDateTime::unix_timestamp)
        .map_err(|_| ApiError::invalid(format!("{key}: an RFC 3339 time, e.g. 2026-12-01T08:00:00+08:00")))
}

/// Decodes `%XX` escapes (and `+` as a space) of a query value; `None` if malformed.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_prefixed_time_ordered_hex_and_distinct() {
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
        let ids: Vec<String> = (0..10_000).map(|_| new_id('S')).collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "an id repeated");
        for id in &ids {
            assert_eq!(id.len(), 33, "{id}");
            assert!(id.starts_with('S'), "{id}");
            assert!(id[1..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
            let millis = u128::from_str_radix(&id[1..13], 16).expect("time part");
            assert!(millis >= before && millis < before + 60_000, "{id}: {millis} against {before}");
        }
        assert!(ids.windows(2).all(|w| w[0][..13] <= w[1][..13]), "ids made later sort later");
        assert_eq!(new_id('Q').chars().next(), Some('Q'));
    }
}
