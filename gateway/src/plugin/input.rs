//! What the host hands a plugin, encoded: JSON, exactly as the SDK's types encode with serde
//! (a plugin decodes it with them).
//!
//! A settlement's request is most of what crosses the boundary, and it is written by
//! [`cardgate_sdk::wire`], not by serde's derived code (a third of the time). Most of it — the
//! card, the institution, the lines — is the same for every payer of a chain:
//! [`SettlementInput`] encodes that once, and each payer's request is those bytes around the
//! little that differs (what is due, what earlier payers covered, the accumulators).

use cardgate_sdk::{
    BillLine, CardClaims, EncounterInfo, Fen, InquiryRequest, Institution, PriorPayment, ReversalRequest,
    SettlementRequest, YearToDate, wire,
};
use serde::Serialize;

use super::CallError;

/// A request a plugin can be sent: its JSON.
pub trait Input {
    /// The request's JSON, as the SDK's types decode it.
    fn encode(&self) -> Result<Vec<u8>, CallError>;
}

/// Through serde: the operations that are not the hot path.
fn by_serde<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CallError> {
    let mut input = Vec::with_capacity(1024);
    serde_json::to_writer(&mut input, value).map_err(unencodable)?;
    Ok(input)
}

fn unencodable(e: serde_json::Error) -> CallError {
    CallError::BadInput { reason: format!("cannot encode request: {e}") }
}

impl Input for InquiryRequest {
    fn encode(&self) -> Result<Vec<u8>, CallError> {
        by_serde(self)
    }
}

impl Input for ReversalRequest {
    fn encode(&self) -> Result<Vec<u8>, CallError> {
        by_serde(self)
    }
}

/// `health`: no input.
impl Input for () {
    fn encode(&self) -> Result<Vec<u8>, CallError> {
        by_serde(self)
    }
}

impl Input for SettlementRequest {
    fn encode(&self) -> Result<Vec<u8>, CallError> {
        let mut out = Vec::with_capacity(512 + 128 * self.lines.len());
        wire::settlement_request(&mut out, self).map_err(unencodable)?;
        Ok(out)
    }
}

/// What every payer of a chain is sent alike: all of a [`SettlementRequest`] but `due_fen`,
/// `prior` and `year_to_date`.
#[derive(Debug, Clone, Copy)]
pub struct Common<'a> {
    /// `settlement_id`.
    pub settlement_id: &'a str,
    /// `card`.
    pub card: &'a CardClaims,
    /// `institution`.
    pub institution: &'a Institution,
    /// `insurance_type`.
    pub insurance_type: &'a str,
    /// `lines`.
    pub lines: &'a [BillLine],
    /// `total_fen`.
    pub total_fen: Fen,
    /// `use_account`.
    pub use_account: bool,
    /// `encounter`.
    pub encounter: Option<&'a EncounterInfo>,
}

/// A settlement's request for a chain of payers: the part they are all sent, encoded once.
#[derive(Debug, Clone)]
pub struct SettlementInput {
    /// `{"settlement_id":…` to `total_fen`'s value.
    head: Vec<u8>,
    /// `,"use_account":…` to the closing brace.
    tail: Vec<u8>,
}

impl SettlementInput {
    /// Encodes what every payer is sent.
    pub fn new(common: &Common<'_>) -> Result<Self, CallError> {
        let Common { settlement_id, card, institution, insurance_type, lines, total_fen, use_account, encounter } =
            *common;
        let mut head = Vec::with_capacity(512 + 128 * lines.len());
        wire::settlement_head(&mut head, settlement_id, card, institution, insurance_type, lines, total_fen)
            .map_err(unencodable)?;
        let mut tail = Vec::with_capacity(64);
        wire::settlement_tail(&mut tail, use_account, encounter).map_err(unencodable)?;
        Ok(Self { head, tail })
    }

    /// One payer's request: what is left due, what the payers before it covered, and its
    /// accumulators.
    pub fn payer<'a>(&'a self, due_fen: Fen, prior: &'a [PriorPayment], year_to_date: &'a YearToDate) -> Payer<'a> {
        Payer { input: self, due_fen, prior, year_to_date }
    }
}

/// One payer's request of a chain ([`SettlementInput::payer`]).
#[derive(Debug, Clone, Copy)]
pub struct Payer<'a> {
    input: &'a SettlementInput,
    due_fen: Fen,
    prior: &'a [PriorPayment],
    year_to_date: &'a YearToDate,
}

impl Input for Payer<'_> {
    fn encode(&self) -> Result<Vec<u8>, CallError> {
        let SettlementInput { head, tail } = self.input;
        let mut out = Vec::with_capacity(head.len() + tail.len() + 256 + 160 * self.prior.len());
        out.extend_from_slice(head);
        wire::settlement_payer(&mut out, self.due_fen, self.prior, self.year_to_date).map_err(unencodable)?;
        out.extend_from_slice(tail);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as a chain sends it to each payer: the common part encoded once, each payer's
    /// own part between — the same bytes as serde's encoding of that payer's whole request.
    #[test]
    fn each_payer_of_a_chain_is_sent_what_serde_would_encode() {
        let full = serde_json::json!({
            "settlement_id": "S0001", "insurance_type": "310", "total_fen": 170000, "due_fen": 170000,
            "card": { "card_id": "110105199001011234", "holder_name": "张三", "insured_region": "110105",
                      "insurance_types": ["310", "390"],
                      "delegate": { "card_id": "110105196501011234", "name": "李四", "relation": "parent" } },
            "institution": { "id": "H110105001", "level": "tertiary", "region": "110105" },
            "lines": [
                { "code": "XA01", "name": "Amoxicillin \"500\"", "category": "class_a", "quantity": "2.5",
                  "unit_price_fen": 100, "amount_fen": 250, "catalogue": { "class": "class_b", "self_pay_bp": 1000 } },
                { "code": "XB02", "name": "CT", "category": "class_b", "quantity": 1, "unit_price_fen": "0.3333",
                  "amount_fen": 169750 }
            ],
            "year_to_date": { "year": 2026, "deductible_fen": 80000, "fund_paid_fen": 52000 },
            "use_account": false,
            "encounter": { "id": "E0001", "kind": "inpatient", "med_type": "21", "admitted_at": "2026-11-01T08:00:00+08:00",
                           "diagnoses": [{ "code": "I21.9", "primary": true }], "interim": true, "settled_count": 2 }
        });
        let mut bare = full.clone();
        for field in ["encounter", "use_account"] {
            bare.as_object_mut().expect("object").remove(field);
        }
        bare["card"].as_object_mut().expect("card").remove("delegate");
        for value in [full, bare] {
            let mut request: SettlementRequest = serde_json::from_value(value).expect("a settlement request");
            let input = SettlementInput::new(&Common {
                settlement_id: &request.settlement_id,
                card: &request.card,
                institution: &request.institution,
                insurance_type: &request.insurance_type,
                lines: &request.lines,
                total_fen: request.total_fen,
                use_account: request.use_account,
                encounter: request.encounter.as_ref(),
            })
            .expect("common part");
            let payers =
                [("basic-medical", 118_000, 52_000), ("critical-illness", 30_000, 22_000), ("assistance", 0, 22_000)];
            let mut prior = Vec::new();
            let mut due = request.total_fen;
            for (n, (payer, fund, left)) in payers.into_iter().enumerate() {
                let year_to_date = YearToDate { year: 2026, fund_paid_fen: 1_000 * n as i64, ..YearToDate::default() };
                let ours = input.payer(due, &prior, &year_to_date).encode().expect("payer's request");
                (request.due_fen, request.prior, request.year_to_date) = (due, prior.clone(), year_to_date);
                let serde = serde_json::to_vec(&request).expect("serde");
                assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&serde), "payer {n}");
                assert_eq!(request.encode().expect("whole request"), serde, "payer {n}");
                prior.push(PriorPayment {
                    payer: payer.into(),
                    fund_pay_fen: fund,
                    account_pay_fen: 0,
                    eligible_self_pay_fen: left,
                    eligible_borne_fen: left,
                });
                due = left;
            }
        }
    }
}
