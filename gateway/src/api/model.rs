//! The JSON bodies of the v1 API. Money is integer fen. The national platform's names are
//! accepted beside ours, in the national unit: `medfee_sumamt` (yuan, at most two decimals,
//! converted exactly), `insutype`, `fixmedins_code`, `chrgitm_lv` ("01" / "02" / "03"); see
//! docs/API.md.

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
#[serde(try_from = "BillWire")]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_fen: Option<Fen>,
    /// The bill.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<BillLine>,
    /// Whether the patient agrees to pay from the personal account (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_account: Option<bool>,
}

/// [`BillBody`] as clients send it: the national `medfee_sumamt` (yuan) beside `total_fen`,
/// and no field the API does not define.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BillWire {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    quote_id: Option<String>,
    #[serde(default, alias = "fixmedins_code")]
    institution_id: Option<String>,
    terminal_id: String,
    #[serde(default, alias = "insutype")]
    insurance_type: Option<String>,
    #[serde(default)]
    total_fen: Option<Fen>,
    /// The national platform's total: yuan, a JSON number or string with at most two decimals.
    #[serde(default)]
    medfee_sumamt: Option<Box<serde_json::value::RawValue>>,
    /// A line with a field the API does not define is refused.
    #[serde(default, deserialize_with = "strict_lines")]
    lines: Vec<BillLine>,
    #[serde(default)]
    use_account: Option<bool>,
}

impl TryFrom<BillWire> for BillBody {
    type Error = String;

    fn try_from(wire: BillWire) -> Result<Self, String> {
        let national = wire.medfee_sumamt.map(|raw| yuan_to_fen(raw.get())).transpose()?;
        let total_fen = match (wire.total_fen, national) {
            (Some(fen), Some(yuan)) if fen != yuan => {
                return Err(format!("total_fen ({fen}) and medfee_sumamt ({yuan} fen) disagree"));
            }
            (fen, yuan) => fen.or(yuan),
        };
        Ok(Self {
            token: wire.token,
            quote_id: wire.quote_id,
            institution_id: wire.institution_id,
            terminal_id: wire.terminal_id,
            insurance_type: wire.insurance_type,
            total_fen,
            lines: wire.lines,
            use_account: wire.use_account,
        })
    }
}

/// A yuan amount as the national interface writes it (`123.45`, `"123.4"`, `12`: a JSON
/// number or string, at most two decimals, not negative, no exponent) in fen, exactly: read
/// as text, never through floating point.
pub fn yuan_to_fen(raw: &str) -> Result<Fen, String> {
    let text = raw.trim();
    let text = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    let bad = || format!("medfee_sumamt: {raw} is not an amount in yuan with at most two decimals");
    let (whole, decimals) = text.split_once('.').unwrap_or((text, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 15 || !digits(whole) || decimals.len() > 2 || !digits(decimals) {
        return Err(bad());
    }
    if text.contains('.') && decimals.is_empty() {
        return Err(bad());
    }
    let whole: Fen = whole.parse().map_err(|_| bad())?;
    let cents: Fen = format!("{decimals:0<2}").parse().map_err(|_| bad())?;
    Ok(whole * 100 + cents)
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
        #[serde(alias = "chrgitm_lv", deserialize_with = "category")]
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
            catalogue: None,
        })
        .collect())
}

/// A line's class: ours (`class_a`, `class_b`, `class_c`) or the national platform's
/// `chrgitm_lv` codes (`"01"` class A, `"02"` class B, `"03"` class C).
fn category<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<cardgate_sdk::ItemCategory, D::Error> {
    use cardgate_sdk::ItemCategory;
    let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
    match text.as_ref() {
        "class_a" | "01" => Ok(ItemCategory::ClassA),
        "class_b" | "02" => Ok(ItemCategory::ClassB),
        "class_c" | "03" => Ok(ItemCategory::ClassC),
        other => Err(serde::de::Error::custom(format!(
            "category: `{other}` is none of class_a, class_b, class_c (chrgitm_lv 01, 02, 03)"
        ))),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_amounts_convert_exactly() {
        for (raw, fen) in [
            ("1700", 170_000),
            ("1700.5", 170_050),
            ("1700.05", 170_005),
            ("\"0.01\"", 1),
            ("0", 0),
            ("0.10", 10),
            ("123456789012345.99", 12_345_678_901_234_599),
        ] {
            assert_eq!(yuan_to_fen(raw), Ok(fen), "{raw}");
        }
        for raw in ["1.234", "-1", "1e3", "1.", ".5", "", "\"\"", "1,5", "\"12 \"", "1234567890123456", "null", "true"]
        {
            assert!(yuan_to_fen(raw).is_err(), "{raw}");
        }
    }

    fn bill(extra: &str) -> Result<BillBody, serde_json::Error> {
        let line =
            r#"{"code":"X","name":"x","chrgitm_lv":"02","quantity":1,"unit_price_fen":12345,"amount_fen":12345}"#;
        serde_json::from_str(&format!(r#"{{"terminal_id":"T","lines":[{line}]{extra}}}"#))
    }

    #[test]
    fn the_national_total_is_yuan_and_its_line_class_a_code() {
        let body = bill(r#","medfee_sumamt":123.45"#).expect("national names");
        assert_eq!(body.total_fen, Some(12_345));
        assert_eq!(body.lines[0].category, cardgate_sdk::ItemCategory::ClassB);
        assert_eq!(
            bill(r#","medfee_sumamt":"123.45","total_fen":12345"#).expect("both, agreeing").total_fen,
            Some(12_345)
        );
        let disagree = bill(r#","medfee_sumamt":12345,"total_fen":12345"#).expect_err("100 times apart");
        assert!(disagree.to_string().contains("disagree"), "{disagree}");
        assert!(bill(r#","medfee_sumamt":1.234"#).is_err());
        assert!(bill(r#","vat_fen":1"#).is_err(), "unknown fields are still refused");
        let wrong = serde_json::from_str::<BillBody>(
            r#"{"terminal_id":"T","lines":[{"code":"X","name":"x","category":"04","quantity":1,"unit_price_fen":1,"amount_fen":1}]}"#,
        )
        .expect_err("no class 04");
        assert!(wrong.to_string().contains("chrgitm_lv"), "{wrong}");
    }
}
