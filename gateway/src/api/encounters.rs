//! Encounters (issue #17): a hospital's outpatient visit or inpatient stay, settled in steps
//! as the national platform's interface for designated institutions does it — registration or
//! admission with the patient's credential (2201, 2401), fee details uploaded in batches and
//! withdrawn (2204/2205, 2301/2302), pre-settlement (2206, 2303), interim and final
//! settlement (2207, 2304 with `mid_setl_flag`), discharge (2402) and withdrawal of a
//! settlement (2208, 2305).
//!
//! The credential (the e-card token) is spent once, by the registration; every later step is
//! authorized by the institution's certificate and the encounter id.
//!
//! # What is stored
//! An encounter is one ledger record ([`StoredEncounter`]), its content sealed (it names the
//! patient) and versioned: every change is made on the version read and stored only over it
//! ([`crate::ledger::Ledger::update_encounter`]), so two changes made at once cannot both land.
//! Its fee lines and the settlements that claimed them are in it. A settlement of an
//! encounter is an ordinary settlement (same ledger, same idempotency, same per-card lock and
//! no-overspend guarantee) whose intent is recorded **before** it claims its lines in the
//! encounter; a line is settled, or being settled, while the settlement that claimed it last is
//! settled, pending or unknown, and free again once that one failed or was withdrawn. A
//! settlement left pending by a crash before its claim landed is completed as failed (its
//! lines were never claimed), never settled.

use cardgate_sdk::{BillLine, Diagnosis, EncounterInfo, EncounterKind, Operation};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::flow::{
    Bill, Chained, EncounterClaim, Prepared, Settlement, Subject, admit, classify_lines, complete, institution,
    insurance_type, moment, new_id, payer_chain, replay, request_hash, run_chain, sdk_institution, split_view,
    stored_answer, year_of,
};
use super::model::{BillBody, ReversalBody, check_bill, check_id};
use super::{ApiError, ApiResponse, Identity};
use crate::ledger::{Intent, LedgerError, Outcome, State, StoredEncounter, mask_card, rfc3339};
use crate::service::Gateway;
use crate::token::{ReplayStore, TokenError};

/// Most fee lines over one encounter's stay (a 30-day stay has a few thousand).
pub const MAX_ENCOUNTER_LINES: usize = 20_000;

/// An encounter's content, sealed in the ledger.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Content {
    subject: Subject,
    insurance_type: String,
    terminal_id: String,
    kind: EncounterKind,
    med_type: String,
    department: Option<String>,
    diagnoses: Vec<Diagnosis>,
    admitted_at: i64,
    discharged_at: Option<i64>,
    lines: Vec<Fee>,
    settlements: Vec<Claim>,
}

/// One fee line (`feedetl_sn`): as sent, and as the catalogue classified it on upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fee {
    serial: String,
    line: BillLine,
    classified: BillLine,
    withdrawn: bool,
}

/// A settlement of the encounter and the lines it claimed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    settlement_id: String,
    serials: Vec<String>,
    interim: bool,
}

/// `POST /v1/encounters`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// The scanned QR text: spent by this registration.
    pub token: String,
    /// The institution; when given it must be the certificate's.
    #[serde(default, alias = "fixmedins_code", skip_serializing_if = "Option::is_none")]
    pub institution_id: Option<String>,
    /// The terminal (registration desk, admission office).
    pub terminal_id: String,
    /// Insurance type; default: the card's first.
    #[serde(default, alias = "insutype", skip_serializing_if = "Option::is_none")]
    pub insurance_type: Option<String>,
    /// The national medical type (`med_type`): `11` general outpatient, `14` outpatient
    /// chronic or special disease, `21` general inpatient, ...
    pub med_type: String,
    /// Outpatient or inpatient; default: by `med_type` (`2x` and `52` inpatient, else
    /// outpatient).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<EncounterKind>,
    /// Department (`dept_code`).
    #[serde(default, alias = "dept_code", skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    /// Diagnoses (ICD-10), at least one for an inpatient stay.
    #[serde(default, deserialize_with = "super::model::diagnoses")]
    pub diagnoses: Vec<Diagnosis>,
    /// Registration or admission time (`begntime`), RFC 3339.
    #[serde(alias = "begntime")]
    pub admitted_at: String,
}

/// `POST /v1/encounters/{id}/settlements` (and `/quotes`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EncounterSettleBody {
    /// An interim settlement of a stay still going on (`mid_setl_flag`); default false: the
    /// final settlement (of an inpatient stay: after discharge).
    #[serde(default)]
    pub interim: bool,
    /// Whether the patient agrees to pay from the personal account (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_account: Option<bool>,
}

/// `POST /v1/encounters/{id}/discharge`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DischargeBody {
    /// Discharge time (`endtime`), RFC 3339.
    #[serde(alias = "endtime")]
    pub discharged_at: String,
    /// Diagnoses at discharge, replacing those of admission where given.
    #[serde(default, deserialize_with = "super::model::optional_diagnoses")]
    pub diagnoses: Option<Vec<Diagnosis>>,
}

fn refused(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError::client(status, code, detail)
}

fn not_found() -> ApiError {
    refused(StatusCode::NOT_FOUND, "not_found", "no such encounter for this institution")
}

/// The kind of encounter a national medical type is, where the client does not say: the `2x`
/// types (general, injury, referral, emergency admission ...) and `52` (maternity) are stays,
/// the rest visits. A type of the bureau's own is sent with its `kind`.
fn kind_of(med_type: &str) -> EncounterKind {
    if med_type.starts_with('2') || med_type == "52" { EncounterKind::Inpatient } else { EncounterKind::Outpatient }
}

/// An ICD-10 code as the national platform writes them: a letter, two digits, optionally a
/// dot and up to four more characters (`I10`, `E11.9`, `S72.001`).
fn check_diagnoses(diagnoses: &[Diagnosis]) -> Result<(), ApiError> {
    for (i, d) in diagnoses.iter().enumerate() {
        let code = d.code.as_bytes();
        let ok = code.len() >= 3
            && code[0].is_ascii_uppercase()
            && code[1..3].iter().all(u8::is_ascii_digit)
            && match &code[3..] {
                [] => true,
                [b'.', rest @ ..] => (1..=4).contains(&rest.len()) && rest.iter().all(u8::is_ascii_alphanumeric),
                _ => false,
            };
        if !ok {
            return Err(ApiError::invalid(format!("diagnoses[{i}].code: an ICD-10 code such as I10 or E11.9")));
        }
    }
    if diagnoses.iter().filter(|d| d.primary).count() > 1 {
        return Err(ApiError::invalid("diagnoses: at most one primary"));
    }
    Ok(())
}

/// An encounter read from the ledger, opened.
struct Loaded {
    stored: StoredEncounter,
    content: Content,
}

async fn load(gateway: &Gateway, institution: &str, id: &str) -> Result<Loaded, ApiError> {
    let stored = gateway.ledger.encounter(institution, id).await?.ok_or_else(not_found)?;
    let content = open_content(gateway, &stored)?;
    Ok(Loaded { stored, content })
}

fn open_content(gateway: &Gateway, stored: &StoredEncounter) -> Result<Content, ApiError> {
    gateway
        .card_key
        .open(&stored.sealed)
        .and_then(|plain| serde_json::from_slice(&plain).ok())
        .ok_or_else(|| ApiError::Storage(LedgerError::Storage("a stored encounter does not open".into())))
}

/// Stores `content` over the version `loaded` was read at; [`LedgerError::Stale`] when another
/// change landed meanwhile.
async fn store(gateway: &Gateway, loaded: &Loaded, content: &Content) -> Result<(), ApiError> {
    let sealed = gateway.card_key.seal(&serde_json::to_vec(content).map_err(|e| LedgerError::Storage(e.to_string()))?);
    let next = StoredEncounter { version: loaded.stored.version + 1, sealed, ..loaded.stored.clone() };
    gateway.ledger.update_encounter(next).await.map_err(ApiError::from)
}

/// Runs `change` on the encounter as it is now and stores the result, again on a fresh read
/// when another change landed meanwhile; `change` answers what to reply.
async fn change<T>(
    gateway: &Gateway,
    institution: &str,
    id: &str,
    mut change: impl FnMut(&mut Content, &Claims) -> Result<T, ApiError>,
) -> Result<(T, Content, Claims), ApiError> {
    for _ in 0..8 {
        let loaded = load(gateway, institution, id).await?;
        let claims = Claims::of(gateway, institution, &loaded.content).await?;
        let mut content = loaded.content.clone();
        let answer = change(&mut content, &claims)?;
        match store(gateway, &loaded, &content).await {
            Ok(()) => return Ok((answer, content, claims)),
            Err(ApiError::Storage(LedgerError::Stale)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(refused(StatusCode::CONFLICT, "request_in_progress", "the encounter is being changed; retry shortly"))
}

/// Each claim's settlement state now, and so each line's.
struct Claims {
    /// (settlement id, its state, interim) for every claim, in order.
    states: Vec<(String, State, bool)>,
    /// Serial -> the settlement holding it (settled, pending or unknown).
    held: std::collections::HashMap<String, (String, State)>,
}

impl Claims {
    async fn of(gateway: &Gateway, institution: &str, content: &Content) -> Result<Self, ApiError> {
        let mut states = Vec::with_capacity(content.settlements.len());
        let mut held = std::collections::HashMap::new();
        for claim in &content.settlements {
            let state = gateway.ledger.get(institution, &claim.settlement_id).await?.map_or(State::Failed, |r| r.state);
            if matches!(state, State::Settled | State::Pending | State::Unknown) {
                for serial in &claim.serials {
                    held.insert(serial.clone(), (claim.settlement_id.clone(), state));
                }
            }
            states.push((claim.settlement_id.clone(), state, claim.interim));
        }
        Ok(Self { states, held })
    }

    /// A final settlement that stands (settled, or still being settled).
    fn final_settlement(&self) -> Option<&str> {
        self.states
            .iter()
            .find(|(_, state, interim)| !interim && matches!(state, State::Settled | State::Pending | State::Unknown))
            .map(|(id, _, _)| id.as_str())
    }

    fn line_state(&self, fee: &Fee) -> &'static str {
        match (fee.withdrawn, self.held.get(&fee.serial)) {
            (true, _) => "withdrawn",
            (false, Some((_, State::Settled))) => "settled",
            (false, Some(_)) => "settling",
            (false, None) => "unsettled",
        }
    }
}

/// The encounter as the answers to changes show it: its summary, without the lines (a stay has
/// thousands, sent again with every batch otherwise).
fn view(id: &str, institution: &str, content: &Content, claims: &Claims) -> Value {
    view_of(id, institution, content, claims, false)
}

/// The encounter as `GET` shows it: with every fee line and its state.
fn view_with_lines(id: &str, institution: &str, content: &Content, claims: &Claims) -> Value {
    view_of(id, institution, content, claims, true)
}

fn view_of(id: &str, institution: &str, content: &Content, claims: &Claims, with_lines: bool) -> Value {
    let state = match (claims.final_settlement(), content.discharged_at) {
        (Some(_), _) => "settled",
        (None, Some(_)) => "discharged",
        (None, None) => "open",
    };
    let (mut unsettled, mut unsettled_fen, mut settled_fen) = (0usize, 0i64, 0i64);
    let mut lines = Vec::with_capacity(if with_lines { content.lines.len() } else { 0 });
    for fee in &content.lines {
        let line_state = claims.line_state(fee);
        match line_state {
            "unsettled" => {
                unsettled += 1;
                unsettled_fen += fee.line.amount_fen;
            }
            "settled" => settled_fen += fee.line.amount_fen,
            _ => {}
        }
        if with_lines {
            lines.push(json!({
                "feedetl_sn": fee.serial, "code": fee.line.code, "category": fee.classified.category,
                "amount_fen": fee.line.amount_fen, "state": line_state,
                "settlement_id": claims.held.get(&fee.serial).map(|(sid, _)| sid),
            }));
        }
    }
    let settlements: Vec<Value> = claims
        .states
        .iter()
        .zip(&content.settlements)
        .map(|((sid, state, interim), claim)| {
            json!({ "settlement_id": sid, "state": state.as_str(), "interim": interim, "lines": claim.serials.len() })
        })
        .collect();
    let mut answer = json!({
        "encounter_id": id,
        "state": state,
        "institution_id": institution,
        "terminal_id": content.terminal_id,
        "card": mask_card(&content.subject.card_id),
        "holder_name": content.subject.holder_name,
        "delegate": content.subject.delegate_json(),
        "insured_region": content.subject.insured_region,
        "insurance_type": content.insurance_type,
        "kind": content.kind,
        "med_type": content.med_type,
        "department": content.department,
        "diagnoses": content.diagnoses,
        "admitted_at": rfc3339(content.admitted_at),
        "discharged_at": content.discharged_at.map(rfc3339),
        "fees": {
            "count": content.lines.iter().filter(|f| !f.withdrawn).count(),
            "unsettled_count": unsettled,
            "unsettled_fen": unsettled_fen,
            "settled_fen": settled_fen,
        },
        "settlements": settlements,
    });
    if with_lines {
        answer["lines"] = json!(lines);
    }
    answer
}

fn json_response(status: StatusCode, value: &Value) -> ApiResponse {
    ApiResponse::json(status, value.to_string())
}

/// `POST /v1/encounters` (Idempotency-Key required): registers an outpatient visit or admits
/// an inpatient, spending the credential. A retry with the same key and body answers the
/// encounter as it is now; another body under the key, `409 idempotency_conflict`.
pub async fn register(
    gateway: &Gateway,
    identity: &Identity,
    key: &str,
    body: RegisterBody,
) -> Result<ApiResponse, ApiError> {
    let institution = admit(gateway, identity, body.institution_id.as_deref(), &body.terminal_id).await?;
    let hash = request_hash(&body);
    if let Some(existing) = gateway.ledger.encounter_by_key(institution.0, key).await? {
        return again(gateway, institution.0, existing, &hash).await;
    }
    let now = gateway.clock.now();
    let admitted_at = moment("admitted_at", &body.admitted_at)?;
    if admitted_at > now + gateway.config.tokens.clock_skew_secs {
        return Err(ApiError::invalid("admitted_at: in the future"));
    }
    if !(2..=4).contains(&body.med_type.len()) || !body.med_type.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ApiError::invalid("med_type: the national medical type, 2 to 4 letters or digits (11, 14, 21)"));
    }
    let kind = body.kind.unwrap_or_else(|| kind_of(&body.med_type));
    check_diagnoses(&body.diagnoses)?;
    if kind == EncounterKind::Inpatient && body.diagnoses.is_empty() {
        return Err(ApiError::invalid("diagnoses: an admission needs at least one"));
    }
    if let Some(department) = &body.department {
        check_id("department", department)?;
    }
    let verified = gateway.verifier.verify_batched(&body.token, now, gateway.config.tokens.signature_batch()).await?;
    let ecard = verified.ecard.ok_or(TokenError::ProfileInvalid("no e-card claim".into()))?;
    let subject = Subject::from_claim(ecard, verified.claims.token_id.clone(), verified.claims.expires_at);
    if subject.token_id.as_ref().is_some_and(|cti| gateway.replay_cache.contains(cti)) {
        return Err(TokenError::Replayed.into());
    }
    let card_hash = gateway.card_key.hash(&subject.card_id);
    gateway.limiter.check_card(&card_hash).await?;
    let insurance_type = insurance_type(&subject, body.insurance_type.as_deref())?;
    payer_chain(gateway, &gateway.plugins(), &subject, &insurance_type, institution)?;
    let mut diagnoses = body.diagnoses.clone();
    diagnoses.sort_by_key(|d| !d.primary);
    let content = Content {
        subject,
        insurance_type,
        terminal_id: body.terminal_id.clone(),
        kind,
        med_type: body.med_type.clone(),
        department: body.department.clone(),
        diagnoses,
        admitted_at,
        discharged_at: None,
        lines: Vec::new(),
        settlements: Vec::new(),
    };
    let id = new_id('E');
    let sealed = gateway.card_key.seal(&serde_json::to_vec(&content).map_err(|e| LedgerError::Storage(e.to_string()))?);
    let stored = StoredEncounter {
        id: id.clone(),
        institution: institution.0.to_owned(),
        idempotency_key: key.to_owned(),
        request_hash: hash.clone(),
        token_id: content.subject.token_id.clone(),
        card_hash,
        created_at: now,
        version: 1,
        sealed,
    };
    match gateway.ledger.open_encounter(stored).await {
        Ok(()) => {}
        // A concurrent twin of this registration got there first: its answer.
        Err(LedgerError::IdempotencyTaken) => {
            let existing = gateway.ledger.encounter_by_key(institution.0, key).await?.ok_or(LedgerError::NotFound)?;
            return again(gateway, institution.0, existing, &hash).await;
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(cti) = &content.subject.token_id {
        let forget_after = content.subject.token_expires_at.unwrap_or(now) + gateway.config.tokens.clock_skew_secs;
        let _ = gateway.replay_cache.claim(cti, forget_after, now);
    }
    let claims = Claims { states: Vec::new(), held: Default::default() };
    tracing::debug!(encounter = %id, institution = institution.0, med_type = %content.med_type, "encounter registered");
    Ok(json_response(StatusCode::CREATED, &view(&id, institution.0, &content, &claims)))
}

/// A registration retried under its key.
async fn again(
    gateway: &Gateway,
    institution: &str,
    existing: StoredEncounter,
    hash: &[u8],
) -> Result<ApiResponse, ApiError> {
    if existing.request_hash != hash {
        return Err(refused(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request",
        ));
    }
    let content = open_content(gateway, &existing)?;
    let claims = Claims::of(gateway, institution, &content).await?;
    Ok(json_response(StatusCode::CREATED, &view(&existing.id, institution, &content, &claims)))
}

/// `GET /v1/encounters/{id}`: with every fee line and its state.
pub async fn get(gateway: &Gateway, identity: &Identity, id: &str) -> Result<ApiResponse, ApiError> {
    let institution = identity.institution.as_str();
    let loaded = load(gateway, institution, id).await?;
    let claims = Claims::of(gateway, institution, &loaded.content).await?;
    Ok(json_response(StatusCode::OK, &view_with_lines(id, institution, &loaded.content, &claims)))
}

/// `POST /v1/encounters/{id}/fees` with `{"fees": [{"feedetl_sn": "...", ...line}]}`: up to
/// 1,000 lines a batch. Idempotent per serial number: a line sent again as it was is
/// `duplicate`; another line under a serial already used, `409 fee_serial_conflict` for the
/// whole batch (nothing of it is stored). Refused once the encounter's final settlement
/// stands (withdraw it first).
pub async fn upload(gateway: &Gateway, identity: &Identity, id: &str, body: Value) -> Result<ApiResponse, ApiError> {
    let institution = identity.institution.as_str();
    let Some(Value::Array(fees)) = body.get("fees").cloned() else {
        return Err(ApiError::invalid("fees: an array of fee lines, each with its feedetl_sn"));
    };
    if let Some(other) = body.as_object().and_then(|o| o.keys().find(|k| *k != "fees")) {
        return Err(ApiError::invalid(format!("unknown field `{other}`")));
    }
    let mut serials = Vec::with_capacity(fees.len());
    let mut raw_lines = Vec::with_capacity(fees.len());
    for (i, fee) in fees.into_iter().enumerate() {
        let Value::Object(mut fields) = fee else {
            return Err(ApiError::invalid(format!("fees[{i}]: an object")));
        };
        let serial = match (fields.remove("feedetl_sn"), fields.remove("serial")) {
            (Some(Value::String(s)), None) | (None, Some(Value::String(s))) => s,
            _ => return Err(ApiError::invalid(format!("fees[{i}].feedetl_sn: required, a string"))),
        };
        check_id(&format!("fees[{i}].feedetl_sn"), &serial)?;
        if serials.contains(&serial) {
            return Err(ApiError::invalid(format!("fees[{i}].feedetl_sn: {serial} twice in the batch")));
        }
        serials.push(serial);
        raw_lines.push(Value::Object(fields));
    }
    let lines = super::model::parse_lines(Value::Array(raw_lines)).map_err(ApiError::invalid)?;
    let total = lines.iter().try_fold(0i64, |sum, l| sum.checked_add(l.amount_fen));
    check_bill(&lines, total)?;
    let mut classified = lines.clone();
    classify_lines(gateway, &mut classified, gateway.clock.now())?;
    let (results, content, claims) = change(gateway, institution, id, |content, claims| {
        if let Some(settlement) = claims.final_settlement() {
            return Err(refused(
                StatusCode::CONFLICT,
                "encounter_settled",
                format!("the encounter's final settlement {settlement} stands: withdraw it to add fees"),
            ));
        }
        // The stay's lines by serial: looked up once per line sent, not scanned (a stay has
        // thousands of lines, a batch up to a thousand).
        let known: std::collections::HashMap<&str, &Fee> =
            content.lines.iter().map(|f| (f.serial.as_str(), f)).collect();
        let mut results = Vec::with_capacity(lines.len());
        for ((serial, line), classified) in serials.iter().zip(&lines).zip(&classified) {
            match known.get(serial.as_str()) {
                Some(fee) if fee.line == *line => results.push((serial.clone(), "duplicate", fee.classified.clone())),
                Some(_) => {
                    return Err(refused(
                        StatusCode::CONFLICT,
                        "fee_serial_conflict",
                        format!("feedetl_sn {serial} was uploaded with another line"),
                    ));
                }
                None => results.push((serial.clone(), "accepted", classified.clone())),
            }
        }
        let added = results.iter().filter(|(_, status, _)| *status == "accepted").count();
        if content.lines.len() + added > MAX_ENCOUNTER_LINES {
            return Err(ApiError::invalid(format!("an encounter holds at most {MAX_ENCOUNTER_LINES} fee lines")));
        }
        for (((serial, status, _), line), classified) in results.iter().zip(&lines).zip(&classified) {
            if *status == "accepted" {
                content.lines.push(Fee {
                    serial: serial.clone(),
                    line: line.clone(),
                    classified: classified.clone(),
                    withdrawn: false,
                });
            }
        }
        Ok(results)
    })
    .await?;
    let fees: Vec<Value> = results
        .into_iter()
        .map(|(serial, status, line)| {
            let entry = line.catalogue.as_ref();
            let over_cap = entry
                .and_then(|e| e.price_cap_fen)
                .and_then(cardgate_sdk::Decimal4::from_whole)
                .and_then(|cap| line.quantity.times_rounded(cap));
            json!({
                "feedetl_sn": serial,
                "status": status,
                "category": line.category,
                "in_scope": line.category != cardgate_sdk::ItemCategory::ClassC,
                "self_pay_bp": entry.and_then(|e| e.self_pay_bp),
                "over_price_cap_fen": over_cap.map_or(0, |allowed| (line.amount_fen - allowed).max(0)),
                "restricted": entry.is_some_and(|e| e.restricted),
            })
        })
        .collect();
    let mut answer = view(id, institution, &content, &claims);
    answer["uploaded"] = json!(fees);
    Ok(json_response(StatusCode::OK, &answer))
}

/// `DELETE /v1/encounters/{id}/fees/{feedetl_sn}`: withdraws a line not settled (2205, 2302).
/// Withdrawing a withdrawn line answers the same; a line a settlement holds, `409
/// fee_settled` (withdraw the settlement first).
pub async fn withdraw_fee(
    gateway: &Gateway,
    identity: &Identity,
    id: &str,
    serial: &str,
) -> Result<ApiResponse, ApiError> {
    let institution = identity.institution.as_str();
    let ((), content, claims) = change(gateway, institution, id, |content, claims| {
        let Some(position) = content.lines.iter().position(|f| f.serial == serial) else {
            return Err(refused(StatusCode::NOT_FOUND, "not_found", format!("no fee line {serial} in this encounter")));
        };
        if let Some((settlement, _)) = claims.held.get(serial) {
            return Err(refused(
                StatusCode::CONFLICT,
                "fee_settled",
                format!("fee line {serial} is in settlement {settlement}: withdraw that first"),
            ));
        }
        content.lines[position].withdrawn = true;
        Ok(())
    })
    .await?;
    Ok(json_response(StatusCode::OK, &view(id, institution, &content, &claims)))
}

/// `POST /v1/encounters/{id}/discharge` (2402): records the discharge; the stay's final
/// settlement can follow. Sent again with the same time, the same answer.
pub async fn discharge(
    gateway: &Gateway,
    identity: &Identity,
    id: &str,
    body: DischargeBody,
) -> Result<ApiResponse, ApiError> {
    let institution = identity.institution.as_str();
    let at = moment("discharged_at", &body.discharged_at)?;
    if at > gateway.clock.now() + gateway.config.tokens.clock_skew_secs {
        return Err(ApiError::invalid("discharged_at: in the future"));
    }
    if let Some(diagnoses) = &body.diagnoses {
        check_diagnoses(diagnoses)?;
    }
    let ((), content, claims) = change(gateway, institution, id, |content, _| {
        if content.kind != EncounterKind::Inpatient {
            return Err(refused(StatusCode::CONFLICT, "not_inpatient", "only an inpatient stay is discharged"));
        }
        if at < content.admitted_at {
            return Err(ApiError::invalid("discharged_at: before the admission"));
        }
        match content.discharged_at {
            Some(existing) if existing != at => {
                return Err(refused(
                    StatusCode::CONFLICT,
                    "already_discharged",
                    format!("discharged at {} already", rfc3339(existing)),
                ));
            }
            _ => content.discharged_at = Some(at),
        }
        if let Some(diagnoses) = &body.diagnoses {
            content.diagnoses.clone_from(diagnoses);
            content.diagnoses.sort_by_key(|d| !d.primary);
        }
        Ok(())
    })
    .await?;
    Ok(json_response(StatusCode::OK, &view(id, institution, &content, &claims)))
}

/// `DELETE /v1/encounters/{id}/discharge` (2405): withdraws a discharge recorded in error,
/// while no final settlement stands (withdraw that first). The stay is in again.
pub async fn withdraw_discharge(gateway: &Gateway, identity: &Identity, id: &str) -> Result<ApiResponse, ApiError> {
    let institution = identity.institution.as_str();
    let ((), content, claims) = change(gateway, institution, id, |content, claims| {
        if let Some(settlement) = claims.final_settlement() {
            return Err(refused(
                StatusCode::CONFLICT,
                "encounter_settled",
                format!("the stay's final settlement {settlement} stands: withdraw it first"),
            ));
        }
        if content.kind != EncounterKind::Inpatient {
            return Err(refused(StatusCode::CONFLICT, "not_inpatient", "only an inpatient stay is discharged"));
        }
        content.discharged_at = None;
        Ok(())
    })
    .await?;
    Ok(json_response(StatusCode::OK, &view(id, institution, &content, &claims)))
}

/// `POST /v1/encounters/{id}/admission` (2403): corrects the registration's diagnoses and
/// department while no final settlement stands; later settlements' payers see the new ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionChange {
    /// The diagnoses, replacing the registration's.
    #[serde(default, deserialize_with = "super::model::optional_diagnoses")]
    pub diagnoses: Option<Vec<Diagnosis>>,
    /// The department (`dept_code`).
    #[serde(default, alias = "dept_code")]
    pub department: Option<String>,
}

/// `POST /v1/encounters/{id}/admission`: see [`AdmissionChange`].
pub async fn change_admission(
    gateway: &Gateway,
    identity: &Identity,
    id: &str,
    body: AdmissionChange,
) -> Result<ApiResponse, ApiError> {
    let institution = identity.institution.as_str();
    if let Some(diagnoses) = &body.diagnoses {
        check_diagnoses(diagnoses)?;
    }
    if let Some(department) = &body.department {
        check_id("department", department)?;
    }
    let ((), content, claims) = change(gateway, institution, id, |content, claims| {
        if let Some(settlement) = claims.final_settlement() {
            return Err(refused(
                StatusCode::CONFLICT,
                "encounter_settled",
                format!("the encounter's final settlement {settlement} stands: withdraw it first"),
            ));
        }
        if let Some(diagnoses) = &body.diagnoses {
            if content.kind == EncounterKind::Inpatient && diagnoses.is_empty() {
                return Err(ApiError::invalid("diagnoses: a stay needs at least one"));
            }
            content.diagnoses.clone_from(diagnoses);
            content.diagnoses.sort_by_key(|d| !d.primary);
        }
        if let Some(department) = &body.department {
            content.department = Some(department.clone());
        }
        Ok(())
    })
    .await?;
    Ok(json_response(StatusCode::OK, &view(id, institution, &content, &claims)))
}

/// What an encounter's settlement (or pre-settlement) would settle now: its free lines, and
/// the encounter as its payers see it. Checks the step is allowed.
fn next_settlement(
    id: &str,
    content: &Content,
    claims: &Claims,
    interim: bool,
) -> Result<(Vec<String>, Vec<BillLine>, EncounterInfo), ApiError> {
    if let Some(settlement) = claims.final_settlement() {
        return Err(refused(
            StatusCode::CONFLICT,
            "encounter_settled",
            format!("the encounter's final settlement {settlement} stands"),
        ));
    }
    match (content.kind, interim, content.discharged_at) {
        (EncounterKind::Outpatient, true, _) => {
            return Err(refused(
                StatusCode::CONFLICT,
                "not_inpatient",
                "an outpatient visit has no interim settlement",
            ));
        }
        (EncounterKind::Inpatient, false, None) => {
            return Err(refused(
                StatusCode::CONFLICT,
                "not_discharged",
                "the final settlement of a stay follows its discharge (or settle in the interim)",
            ));
        }
        (EncounterKind::Inpatient, true, Some(_)) => {
            return Err(refused(StatusCode::CONFLICT, "already_discharged", "settle a discharged stay finally"));
        }
        _ => {}
    }
    let free: Vec<&Fee> = content.lines.iter().filter(|f| claims.line_state(f) == "unsettled").collect();
    if free.is_empty() {
        return Err(refused(StatusCode::CONFLICT, "no_fees", "no fee line is waiting to be settled"));
    }
    let settled_lines: Vec<BillLine> =
        content.lines.iter().filter(|f| claims.line_state(f) == "settled").map(|f| f.classified.clone()).collect();
    let settled_count = claims.states.iter().filter(|(_, state, _)| *state == State::Settled).count();
    let info = EncounterInfo {
        id: id.to_owned(),
        kind: content.kind,
        med_type: content.med_type.clone(),
        diagnoses: content.diagnoses.clone(),
        department: content.department.clone(),
        admitted_at: rfc3339(content.admitted_at),
        discharged_at: content.discharged_at.map(rfc3339),
        interim,
        settled_lines,
        settled_count: u32::try_from(settled_count).unwrap_or(u32::MAX),
    };
    Ok((free.iter().map(|f| f.serial.clone()).collect(), free.iter().map(|f| f.classified.clone()).collect(), info))
}

/// `POST /v1/encounters/{id}/quotes` (2206, 2303): the split of the lines not yet settled,
/// nothing recorded.
pub async fn quote(
    gateway: &Gateway,
    identity: &Identity,
    id: &str,
    body: EncounterSettleBody,
) -> Result<ApiResponse, ApiError> {
    let institution = institution(gateway, identity, None)?;
    let loaded = load(gateway, institution.0, id).await?;
    let claims = Claims::of(gateway, institution.0, &loaded.content).await?;
    let content = &loaded.content;
    let (serials, lines, info) = next_settlement(id, content, &claims, body.interim)?;
    let total_fen = lines.iter().map(|l| l.amount_fen).sum();
    let plugins = gateway.plugins();
    let chain = payer_chain(gateway, &plugins, &content.subject, &content.insurance_type, institution)?;
    let bill = Bill {
        id,
        subject: &content.subject,
        institution: sdk_institution(institution.0, institution.1),
        insurance_type: &content.insurance_type,
        lines: &lines,
        use_account: body.use_account.unwrap_or(true),
        total_fen,
        encounter: Some(&info),
    };
    let card_hash = gateway.card_key.hash(&content.subject.card_id);
    let now = gateway.clock.now();
    let Chained { results, skipped, .. } =
        run_chain(gateway, &chain, Operation::Quote, &bill, &card_hash, year_of(now)).await?;
    let mut answer = serde_json::to_value(split_view(&results, &skipped, total_fen))
        .map_err(|e| LedgerError::Storage(e.to_string()))?;
    answer["encounter_id"] = json!(id);
    answer["interim"] = json!(body.interim);
    answer["lines"] = json!(serials.len());
    answer["state"] = json!("quoted");
    Ok(json_response(StatusCode::OK, &answer))
}

/// `POST /v1/encounters/{id}/settlements` (Idempotency-Key required; 2207, 2304): settles the
/// lines not yet settled, interim or final. Its intent is recorded first, then it claims its
/// lines in the encounter, then the payers are asked — as `POST /v1/settlements` from there on
/// (same receipt, retries, unknown outcomes). Two settlements of one encounter at once: one
/// claims the lines, the other is recorded `failed` with `409 encounter_busy`.
pub async fn settle(
    gateway: &Gateway,
    identity: &Identity,
    id: &str,
    key: &str,
    body: EncounterSettleBody,
    request_id: &str,
) -> Result<ApiResponse, ApiError> {
    let institution = institution(gateway, identity, None)?;
    let hash = request_hash(&(id, &body));
    if let Some(record) = gateway.ledger.by_idempotency_key(institution.0, key).await? {
        return replay(gateway, record, &hash).await;
    }
    let loaded = load(gateway, institution.0, id).await?;
    let claims = Claims::of(gateway, institution.0, &loaded.content).await?;
    let content = &loaded.content;
    let (serials, lines, info) = next_settlement(id, content, &claims, body.interim)?;
    if gateway.verifier.card_revoked(&content.subject.card_id) {
        return Err(TokenError::CardRevoked.into());
    }
    let card_hash = gateway.card_key.hash(&content.subject.card_id);
    gateway.limiter.check_card(&card_hash).await?;
    payer_chain(gateway, &gateway.plugins(), &content.subject, &content.insurance_type, institution)?;
    let total_fen = lines.iter().map(|l| l.amount_fen).sum();
    let now = gateway.clock.now();
    let sid = new_id('S');
    let prepared = Prepared {
        subject: Subject { token_id: None, ..content.subject.clone() },
        insurance_type: content.insurance_type.clone(),
        bill: BillBody {
            token: None,
            quote_id: None,
            institution_id: None,
            terminal_id: content.terminal_id.clone(),
            insurance_type: Some(content.insurance_type.clone()),
            total_fen: Some(total_fen),
            lines: Vec::new(),
            use_account: body.use_account,
        },
        total_fen,
        quote_id: None,
        lines,
        reclassified: Vec::new(),
        encounter: Some(EncounterClaim { info, serials: serials.clone() }),
    };
    let clearing_type = match content.kind {
        EncounterKind::Inpatient => "21",
        EncounterKind::Outpatient => "11",
    };
    let intent = Intent {
        id: sid.clone(),
        institution: institution.0.to_owned(),
        terminal: content.terminal_id.clone(),
        idempotency_key: key.to_owned(),
        request_hash: hash.clone(),
        token_id: None,
        quote_id: None,
        card_hash: card_hash.clone(),
        card_masked: mask_card(&content.subject.card_id),
        total_fen,
        created_at: now,
        sealed_request: gateway
            .card_key
            .seal(&serde_json::to_vec(&prepared).map_err(|e| LedgerError::Storage(e.to_string()))?),
        insurance_type: content.insurance_type.clone(),
        clearing_type: clearing_type.to_owned(),
        delegated: content.subject.delegate.is_some(),
    };
    match gateway.ledger.begin(intent).await {
        Ok(()) => {}
        Err(LedgerError::IdempotencyTaken) => {
            let record = gateway.ledger.by_idempotency_key(institution.0, key).await?.ok_or(LedgerError::NotFound)?;
            return replay(gateway, record, &hash).await;
        }
        Err(e) => return Err(e.into()),
    }
    // Claim the lines over the version read: a change meanwhile (another settlement, a line
    // added or withdrawn) means this settlement settles nothing.
    let mut claimed = loaded.content.clone();
    claimed.settlements.push(Claim { settlement_id: sid.clone(), serials, interim: body.interim });
    let settlement = Settlement { id: &sid, institution: institution.0, created_at: now, request_id };
    match store(gateway, &loaded, &claimed).await {
        Ok(()) => {}
        Err(ApiError::Storage(LedgerError::Stale)) => {
            let busy = refused(StatusCode::CONFLICT, "encounter_busy", "the encounter changed meanwhile; retry");
            return fail_unclaimed(gateway, settlement, &card_hash, busy).await;
        }
        // Whether the claim landed is not known (the answer may be all that was lost): the
        // settlement stays pending, completed later — settled if its claim is there, failed
        // if not.
        Err(error) => return Err(error),
    }
    complete(gateway, settlement, &prepared, card_hash, None).await
}

/// Whether the encounter of `claim` holds settlement `id`'s claim (a settlement whose claim
/// never landed must not settle).
pub(super) async fn claim_holds(
    gateway: &Gateway,
    institution: &str,
    claim: &EncounterClaim,
    id: &str,
) -> Result<bool, ApiError> {
    let loaded = load(gateway, institution, &claim.info.id).await?;
    Ok(loaded.content.settlements.iter().any(|c| c.settlement_id == id))
}

/// Records a settlement whose lines were not claimed as `failed`, with `reason` as its
/// answer (stored under its key, like any refusal).
pub(super) async fn fail_unclaimed(
    gateway: &Gateway,
    settlement: Settlement<'_>,
    card_hash: &[u8],
    reason: ApiError,
) -> Result<ApiResponse, ApiError> {
    let (status, problem) = reason.body(settlement.request_id, Some(("settlement_id", settlement.id)));
    let outcome = Outcome {
        id: settlement.id.to_owned(),
        state: State::Failed,
        status: status.as_u16(),
        body: problem.clone(),
        deltas: Vec::new(),
        card_hash: card_hash.to_vec(),
        read: Vec::new(),
        at: gateway.clock.now(),
        amounts: None,
    };
    match gateway.ledger.finish(outcome).await {
        Ok(()) => {}
        Err(LedgerError::NotFound) => {
            let record =
                gateway.ledger.get(settlement.institution, settlement.id).await?.ok_or(LedgerError::NotFound)?;
            return stored_answer(gateway, record);
        }
        Err(e) => return Err(e.into()),
    }
    crate::metrics::settlement(State::Failed.as_str());
    Ok(ApiResponse { status, problem: true, body: problem, retry_after: None, code: None, allow: None })
}

/// `POST /v1/encounters/{id}/settlements/{sid}/withdrawal` (2208, 2305): withdraws a
/// settlement of the encounter — a reversal: the payers are asked, the accumulators restored,
/// and its lines are unsettled again, to be corrected (withdrawn, added) and settled anew.
pub async fn withdraw_settlement(
    gateway: &Gateway,
    identity: &Identity,
    id: &str,
    settlement_id: &str,
    body: ReversalBody,
) -> Result<ApiResponse, ApiError> {
    let loaded = load(gateway, &identity.institution, id).await?;
    if !loaded.content.settlements.iter().any(|c| c.settlement_id == settlement_id) {
        return Err(refused(StatusCode::NOT_FOUND, "not_found", "no such settlement of this encounter"));
    }
    super::flow::reverse(gateway, identity, settlement_id, body).await
}
