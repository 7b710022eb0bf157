//! The JSON bodies of the v1 API. Money is integer fen. Field aliases accept the national
//! platform's names (`medfee_sumamt`, `insutype`, `fixmedins_code`); see docs/API.md.

use cardgate_sdk::{BillLine, Fen};
use serde::{Deserialize, Serialize};

use super::problem::ApiError;

/// `POST /v1/inquiries`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InquiryBody {
    /// The scanned QR text.
    pub token: String,
    /// The institution; when given it must be the one the client certificate names.
    #[serde(default, alias = "fixmedins_code", skip_serializing_if = "Option::is_none")]
    pub institution_id: Option<String>,
    /// The terminal.
    pub terminal_id: String,
    /// Insurance type to ask about; default: the card's first.
    #[serde(default, alias = "insutype", skip_serializing_if = "Option::is_none")]
    pub insurance_type: Option<String>,
}

/// `POST /v1/quotes` and `POST /v1/settlements`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BillBody {
    /// The scanned QR text (or `quote_id`, for a settlement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A quote to settle (settlements only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quote_id: Option<String>,
    /// The institution; when given it must be the one the client certificate names.
    #[serde(default, alias = "fixmedins_code", skip_serializing_if = "Option::is_none")]
    pub institution_id: Option<String>,
    /// The terminal.
    pub terminal_id: String,
    /// Insurance type to settle under; default: the card's first.
    #[serde(default, alias = "insutype", skip_serializing_if = "Option::is_none")]
    pub insurance_type: Option<String>,
    /// The bill's total: the sum of the lines.
    #[serde(default, alias = "medfee_sumamt", skip_serializing_if = "Option::is_none")]
    pub total_fen: Option<Fen>,
    /// The bill. A line with a field the API does not define is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty", deserialize_with = "strict_lines")]
    pub lines: Vec<BillLine>,
    /// Whether the patient agrees to pay from the personal account (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_account: Option<bool>,
}

/// Bill lines as the API takes them: exactly the SDK's fields, no others (a misspelt or
/// invented field, `vat_fen` say, is refused, not ignored). The SDK's own type stays open so
/// that plugins accept lines a later gateway extends.
fn strict_lines<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<BillLine>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        code: String,
        name: String,
        category: cardgate_sdk::ItemCategory,
        quantity: u32,
        unit_price_fen: Fen,
        amount_fen: Fen,
    }
    let lines = Vec::<Line>::deserialize(deserializer)?;
    Ok(lines
        .into_iter()
        .map(|l| BillLine {
            code: l.code,
            name: l.name,
            category: l.category,
            quantity: l.quantity,
            unit_price_fen: l.unit_price_fen,
            amount_fen: l.amount_fen,
        })
        .collect())
}

/// `POST /v1/settlements/{id}/reversal`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReversalBody {
    /// Why (refund, cashier error, ...).
    #[serde(default)]
    pub reason: String,
}

/// Most lines on one bill.
pub const MAX_LINES: usize = 1_000;

/// The rule for identifier-like fields, as refusals state it.
pub const ID_RULE: &str = "{field}: 1 to 64 printable ASCII characters (spaces allowed, but not first or last)";

/// Checks an identifier-like field (`terminal_id`, `Idempotency-Key`): 1 to 64 printable ASCII
/// characters, the space included (tills name terminals "Window 3"), but not first or last
/// (HTTP drops those from a header, and a value that differs only there would look equal).
pub fn check_id(field: &str, value: &str) -> Result<(), ApiError> {
    let ok = (1..=64).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !value.starts_with(' ')
        && !value.ends_with(' ');
    if ok { Ok(()) } else { Err(ApiError::invalid(ID_RULE.replace("{field}", field))) }
}

/// Checks a bill: lines present, amounts non-negative, and summing exactly to the total.
pub fn check_bill(lines: &[BillLine], total_fen: Option<Fen>) -> Result<Fen, ApiError> {
    if lines.is_empty() || lines.len() > MAX_LINES {
        return Err(ApiError::invalid(format!("lines: 1 to {MAX_LINES} lines are required")));
    }
    let mut sum: Fen = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.amount_fen < 0 || line.unit_price_fen < 0 {
            return Err(ApiError::invalid(format!("lines[{i}]: amounts must not be negative")));
        }
        if line.code.is_empty() || line.code.len() > 64 || line.name.len() > 200 {
            return Err(ApiError::invalid(format!("lines[{i}]: code 1 to 64 characters, name at most 200")));
        }
        sum = sum.checked_add(line.amount_fen).ok_or_else(|| ApiError::invalid("lines: the sum overflows"))?;
    }
    let total = total_fen.ok_or_else(|| ApiError::invalid("total_fen: required"))?;
    if total != sum {
        return Err(ApiError::invalid(format!("total_fen is {total} but the lines sum to {sum}")));
    }
    Ok(total)
}
