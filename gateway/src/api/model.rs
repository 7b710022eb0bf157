//! The JSON bodies of the v1 API. Money is integer fen. The national platform's names are
//! accepted beside ours, in the national unit: `medfee_sumamt` (yuan, at most two decimals,
//! converted exactly), `insutype`, `fixmedins_code`, `chrgitm_lv` ("01" / "02" / "03"); see
//! docs/API.md.

use cardgate_sdk::{BillLine, Decimal4, Diagnosis, Fen};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
        let national = wire.medfee_sumamt.map(|raw| yuan_to_fen("medfee_sumamt", raw.get())).transpose()?;
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

/// A decimal as written in JSON, a number or a string (`12.5`, `"12.5"`): its text, read
/// exactly (never through floating point) by [`cardgate_sdk::parse_decimal`]; the value in
/// units of `10^-places`.
fn exact_decimal(raw: &str, places: usize) -> Option<i64> {
    let text = raw.trim();
    let text = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
    cardgate_sdk::parse_decimal(text, places)
}

/// A yuan amount as the national interface writes it (`123.45`, `"123.4"`, `12`: a JSON
/// number or string, at most two decimals, not negative, no exponent) in fen, exactly.
pub fn yuan_to_fen(field: &str, raw: &str) -> Result<Fen, String> {
    exact_decimal(raw, 2).ok_or_else(|| format!("{field}: {raw} is not an amount in yuan with at most two decimals"))
}

/// Bill lines (a JSON array) read as [`BillBody`]'s are: exactly the SDK's fields, the
/// national names and units accepted.
pub fn parse_lines(value: serde_json::Value) -> Result<Vec<BillLine>, String> {
    #[derive(Deserialize)]
    struct Lines {
        #[serde(deserialize_with = "strict_lines")]
        lines: Vec<BillLine>,
    }
    serde_json::from_value::<Lines>(serde_json::json!({ "lines": value })).map(|l| l.lines).map_err(|e| e.to_string())
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
        /// Up to four decimals (the national `cnt`).
        #[serde(alias = "cnt")]
        quantity: Box<RawValue>,
        /// Fen, up to four decimals.
        #[serde(default)]
        unit_price_fen: Option<Box<RawValue>>,
        /// The national unit price: yuan, up to six decimals.
        #[serde(default)]
        pric: Option<Box<RawValue>>,
        #[serde(default)]
        amount_fen: Option<Fen>,
        /// The national line amount: yuan, up to two decimals.
        #[serde(default)]
        det_item_fee_sumamt: Option<Box<RawValue>>,
    }
    let lines: Vec<Line> = objects(deserializer)?;
    let bad = <D::Error as serde::de::Error>::custom::<String>;
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let quantity = exact_decimal(l.quantity.get(), 4).and_then(Decimal4::from_units).ok_or_else(|| {
                bad(format!("lines[{i}].quantity: {} is not a number with at most four decimals", l.quantity.get()))
            })?;
            let unit_price_fen = match (&l.unit_price_fen, &l.pric) {
                (Some(fen), None) => {
                    exact_decimal(fen.get(), 4).ok_or(("unit_price_fen", "fen with at most four", fen))
                }
                (None, Some(yuan)) => exact_decimal(yuan.get(), 6).ok_or(("pric", "yuan with at most six", yuan)),
                _ => return Err(bad(format!("lines[{i}]: give exactly one of unit_price_fen and pric"))),
            }
            .map_err(|(field, what, raw)| bad(format!("lines[{i}].{field}: {} is not {what} decimals", raw.get())))?;
            let national = l
                .det_item_fee_sumamt
                .map(|raw| yuan_to_fen(&format!("lines[{i}].det_item_fee_sumamt"), raw.get()))
                .transpose()
                .map_err(bad)?;
            let amount_fen = match (l.amount_fen, national) {
                (Some(fen), Some(yuan)) if fen != yuan => {
                    return Err(bad(format!(
                        "lines[{i}]: amount_fen ({fen}) and det_item_fee_sumamt ({yuan} fen) disagree"
                    )));
                }
                (Some(fen), _) | (None, Some(fen)) => fen,
                (None, None) => {
                    return Err(bad(format!("lines[{i}]: amount_fen (or det_item_fee_sumamt) is required")));
                }
            };
            Ok(BillLine {
                code: l.code,
                name: l.name,
                category: l.category,
                quantity,
                unit_price_fen: Decimal4::from_units(unit_price_fen).unwrap_or_default(),
                amount_fen,
                catalogue: None,
            })
        })
        .collect()
}

/// A line's class: ours (`class_a`, `class_b`, `class_c`), the national platform's
/// `chrgitm_lv` codes (`"01"` class A, `"02"` class B, `"03"` class C) or 甲 / 乙 / 丙, read as
/// the catalogue reads them.
fn category<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<cardgate_sdk::ItemCategory, D::Error> {
    let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
    crate::catalogue::parse_class(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "category: `{text}` is none of class_a, class_b, class_c (chrgitm_lv 01, 02, 03)"
        ))
    })
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
        if line.amount_fen < 0 {
            return Err(ApiError::invalid(format!("lines[{i}]: amounts must not be negative")));
        }
        // The national rule: a line's amount is quantity × unit price, rounded half up to the fen.
        match line.quantity.times_rounded(line.unit_price_fen) {
            Some(product) if product == line.amount_fen => {}
            product => {
                return Err(ApiError::invalid(format!(
                    "lines[{i}]: amount_fen is {} but quantity {} × unit_price_fen {} is {} fen (rounded half up)",
                    line.amount_fen,
                    line.quantity,
                    line.unit_price_fen,
                    product.map_or("too large".to_owned(), |p| p.to_string())
                )));
            }
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

/// Reads each element of a request's array only from a JSON object. serde's derive also reads
/// a struct from an array of its fields in order (`["I10"]` as `{"code": "I10"}`), which the
/// API does not define; the bodies themselves are checked to be objects before they are read.
pub(super) fn objects<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Vec::<Object<T>>::deserialize(deserializer)?.into_iter().map(|o| o.0).collect())
}

/// [`objects`] for an optional array (`null` or absent: `None`).
pub(super) fn optional_objects<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<Object<T>>>::deserialize(deserializer)?.map(|v| v.into_iter().map(|o| o.0).collect()))
}

/// Diagnoses as the API takes them: objects of exactly the SDK's fields (a misspelt or invented
/// one is refused, not ignored; the SDK's own type stays open, as for lines).
pub(super) fn diagnoses<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Diagnosis>, D::Error> {
    Ok(objects::<D, StrictDiagnosis>(deserializer)?.into_iter().map(Diagnosis::from).collect())
}

/// [`diagnoses`] for an optional list (`null` or absent: `None`).
pub(super) fn optional_diagnoses<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<Diagnosis>>, D::Error> {
    Ok(optional_objects::<D, StrictDiagnosis>(deserializer)?.map(|v| v.into_iter().map(Diagnosis::from).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictDiagnosis {
    code: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    primary: bool,
}

impl From<StrictDiagnosis> for Diagnosis {
    fn from(d: StrictDiagnosis) -> Self {
        Self { code: d.code, name: d.name, primary: d.primary }
    }
}

/// A `T` read from a JSON object only.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(ObjectOnly(deserializer)).map(Object)
    }
}

/// A deserializer that hands its visitor maps and nothing else.
struct ObjectOnly<D>(D);

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(MapsOnly(visitor))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_struct(name, fields, MapsOnly(visitor))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// A visitor that takes a map (handing it on) and refuses everything else.
struct MapsOnly<V>(V);

impl<'de, V: serde::de::Visitor<'de>> serde::de::Visitor<'de> for MapsOnly<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(map)
    }
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
            assert_eq!(yuan_to_fen("medfee_sumamt", raw), Ok(fen), "{raw}");
        }
        for raw in ["1.234", "-1", "1e3", "1.", ".5", "", "\"\"", "1,5", "\"12 \"", "1234567890123456", "null", "true"]
        {
            assert!(yuan_to_fen("medfee_sumamt", raw).is_err(), "{raw}");
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

    #[test]
    fn a_line_is_an_object_not_its_fields_in_order() {
        let positional = one_line(r#"["X","x","class_a",1,100,null,100,null]"#).expect_err("fields in order");
        assert!(positional.to_string().contains("expected a JSON object"), "{positional}");
        one_line(r#"{"code":"X","name":"x","category":"class_a","quantity":1,"unit_price_fen":100,"amount_fen":100}"#)
            .expect("the same line as an object");
    }

    #[test]
    fn optional_arrays_of_objects_take_null_and_absence_but_not_fields_in_order() {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default, deserialize_with = "optional_objects")]
            diagnoses: Option<Vec<cardgate_sdk::Diagnosis>>,
        }
        let read = |text: &str| serde_json::from_str::<Body>(text).map(|b| b.diagnoses.map(|d| d.len()));
        assert_eq!(read("{}").expect("absent"), None);
        assert_eq!(read(r#"{"diagnoses":null}"#).expect("null"), None);
        assert_eq!(read(r#"{"diagnoses":[{"code":"I10"},{"code":"E11.9"}]}"#).expect("objects"), Some(2));
        let positional = read(r#"{"diagnoses":[["I10"]]}"#).expect_err("fields in order");
        assert!(positional.to_string().contains("expected a JSON object"), "{positional}");
    }

    #[test]
    fn a_diagnosis_takes_its_own_fields_and_no_other() {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default, deserialize_with = "optional_diagnoses")]
            diagnoses: Option<Vec<cardgate_sdk::Diagnosis>>,
            #[serde(default, deserialize_with = "diagnoses")]
            at_admission: Vec<cardgate_sdk::Diagnosis>,
        }
        let read = |text: &str| serde_json::from_str::<Body>(text);
        let body =
            read(r#"{"diagnoses":[{"code":"I10","name":null,"primary":true}],"at_admission":[{"code":"E11.9"}]}"#)
                .expect("the documented fields");
        assert_eq!(body.diagnoses.map(|d| (d[0].code.clone(), d[0].primary)), Some(("I10".into(), true)));
        assert_eq!(body.at_admission[0].code, "E11.9");
        for text in [r#"{"diagnoses":[{"code":"I10","":null}]}"#, r#"{"at_admission":[{"code":"I10","diag_nam":"x"}]}"#]
        {
            let wrong = read(text).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(wrong.contains("unknown field"), "{text}: {wrong}");
        }
    }

    fn one_line(line: &str) -> Result<BillBody, serde_json::Error> {
        serde_json::from_str(&format!(r#"{{"terminal_id":"T","lines":[{line}]}}"#))
    }

    #[test]
    fn quantities_and_unit_prices_are_exact_decimals() {
        let half = one_line(
            r#"{"code":"X","name":"x","category":"class_a","quantity":0.5,"unit_price_fen":2501,"amount_fen":1251}"#,
        )
        .expect("half a pack");
        assert_eq!(half.lines[0].quantity.units(), 5_000);
        check_bill(&half.lines, Some(1_251)).expect("0.5 x 2501 = 1250.5, rounded half up to 1251");
        let national = one_line(
            r#"{"code":"X","name":"x","chrgitm_lv":"01","cnt":"3","pric":12.345678,"det_item_fee_sumamt":"37.04"}"#,
        )
        .expect("national names");
        assert_eq!(national.lines[0].unit_price_fen.units(), 12_345_678, "yuan to six decimals is fen to four");
        assert_eq!(national.lines[0].amount_fen, 3_704);
        check_bill(&national.lines, Some(3_704)).expect("3 x 1234.5678 fen = 3703.7034, rounded to 3704");
        let off = one_line(
            r#"{"code":"X","name":"x","category":"class_a","quantity":2,"unit_price_fen":2500,"amount_fen":4000}"#,
        )
        .expect("parses");
        let refused = check_bill(&off.lines, Some(4_000)).expect_err("2 x 2500 is not 4000");
        assert!(format!("{refused:?}").contains("5000"), "{refused:?}");
        for bad in [
            r#"{"code":"X","name":"x","category":"class_a","quantity":0.12345,"unit_price_fen":1,"amount_fen":0}"#,
            r#"{"code":"X","name":"x","category":"class_a","quantity":-1,"unit_price_fen":1,"amount_fen":0}"#,
            r#"{"code":"X","name":"x","category":"class_a","quantity":1e2,"unit_price_fen":1,"amount_fen":100}"#,
            r#"{"code":"X","name":"x","category":"class_a","quantity":1,"unit_price_fen":1.23456,"amount_fen":1}"#,
            r#"{"code":"X","name":"x","category":"class_a","quantity":1,"unit_price_fen":1,"pric":0.01,"amount_fen":1}"#,
            r#"{"code":"X","name":"x","category":"class_a","quantity":1,"unit_price_fen":1}"#,
            r#"{"code":"X","name":"x","category":"class_a","quantity":1,"unit_price_fen":100,"amount_fen":100,"det_item_fee_sumamt":100}"#,
        ] {
            assert!(one_line(bad).is_err(), "{bad}");
        }
    }
}
