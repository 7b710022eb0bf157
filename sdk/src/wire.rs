//! JSON for the messages that cross the boundary on every settlement — a
//! [`SettlementRequest`] and its [`Split`] — written as serde_json writes them, byte for byte,
//! without serde's per-field machinery (each key escaped afresh, several writes a field): a key
//! and its punctuation are one literal, strings are escaped by serde_json itself, integers
//! written as it writes them. About a third of the time serde takes (docs/BENCHMARKS.md,
//! "fifteenth round"). The gateway writes requests with it, [`dispatch`](crate::dispatch)
//! writes splits; anything rare or nested (a delegate, an encounter) still goes through serde.
//!
//! Each type is taken apart naming every field, so a field added to a type stops this
//! compiling until it is written here too; the tests hold every byte to serde's encoding.
//!
//! [`read_split`] reads a split back from exactly the bytes [`split`] writes, and from nothing
//! else: the gateway tries it on every answer and hands anything it does not take (another
//! key order, whitespace, escapes, a field more or less: what another SDK might write) to
//! serde, so an answer reads the same whichever reads it.

use serde::{Serialize, Serializer as _};

use crate::{
    BillLine, BreakdownItem, CardClaims, CatalogueEntry, Decimal4, EncounterInfo, Fen, FundPayment, Institution,
    InstitutionLevel, ItemCategory, PriorPayment, SettlementRequest, Split, YearToDate,
};

/// A whole [`SettlementRequest`].
pub fn settlement_request(out: &mut Vec<u8>, request: &SettlementRequest) -> Written {
    let SettlementRequest {
        settlement_id,
        card,
        institution,
        insurance_type,
        lines,
        total_fen,
        due_fen,
        prior,
        year_to_date,
        use_account,
        encounter,
    } = request;
    settlement_head(out, settlement_id, card, institution, insurance_type, lines, *total_fen)?;
    settlement_payer(out, *due_fen, prior, year_to_date)?;
    settlement_tail(out, *use_account, encounter.as_ref())
}

/// A [`Split`].
pub fn split(out: &mut Vec<u8>, split: &Split) -> Written {
    let Split {
        funds,
        account_pay_fen,
        cash_pay_fen,
        eligible_self_pay_fen,
        eligible_borne_fen,
        year_to_date_delta,
        breakdown,
    } = split;
    lit(out, "{\"funds\":[");
    for (i, FundPayment { fund, amount_fen }) in funds.iter().enumerate() {
        lit(out, if i == 0 { "{\"fund\":" } else { ",{\"fund\":" });
        string(out, fund)?;
        lit(out, ",\"amount_fen\":");
        int(out, *amount_fen);
        lit(out, "}");
    }
    lit(out, "],\"account_pay_fen\":");
    int(out, *account_pay_fen);
    lit(out, ",\"cash_pay_fen\":");
    int(out, *cash_pay_fen);
    lit(out, ",\"eligible_self_pay_fen\":");
    int(out, *eligible_self_pay_fen);
    lit(out, ",\"eligible_borne_fen\":");
    int(out, *eligible_borne_fen);
    lit(out, ",\"year_to_date_delta\":");
    self::year_to_date(out, year_to_date_delta);
    lit(out, ",\"breakdown\":[");
    for (i, BreakdownItem { item, amount_fen, note }) in breakdown.iter().enumerate() {
        lit(out, if i == 0 { "{\"item\":" } else { ",{\"item\":" });
        string(out, item)?;
        lit(out, ",\"amount_fen\":");
        int(out, *amount_fen);
        if !note.is_empty() {
            lit(out, ",\"note\":");
            string(out, note)?;
        }
        lit(out, "}");
    }
    lit(out, "]}");
    Ok(())
}

/// A [`Split`] from exactly the bytes [`split`] writes; `None` for any other bytes, even
/// those serde_json would read as a split (the caller then reads them with serde). Where it
/// answers, it answers what serde_json reads from the same bytes.
pub fn read_split(bytes: &[u8]) -> Option<Split> {
    let mut r = Reader(bytes);
    r.lit(b"{\"funds\":")?;
    let funds = r.list(|r| {
        let fund = r.text(b"{\"fund\":")?;
        let amount_fen = r.int_after(b",\"amount_fen\":")?;
        r.lit(b"}")?;
        Some(FundPayment { fund, amount_fen })
    })?;
    let account_pay_fen = r.int_after(b",\"account_pay_fen\":")?;
    let cash_pay_fen = r.int_after(b",\"cash_pay_fen\":")?;
    let eligible_self_pay_fen = r.int_after(b",\"eligible_self_pay_fen\":")?;
    let eligible_borne_fen = r.int_after(b",\"eligible_borne_fen\":")?;
    r.lit(b",\"year_to_date_delta\":")?;
    let year_to_date_delta = r.year_to_date()?;
    r.lit(b",\"breakdown\":")?;
    let breakdown = r.list(|r| {
        let item = r.text(b"{\"item\":")?;
        let amount_fen = r.int_after(b",\"amount_fen\":")?;
        let note = if r.eat(b",\"note\":") { r.string()? } else { String::new() };
        r.lit(b"}")?;
        Some(BreakdownItem { item, amount_fen, note })
    })?;
    r.lit(b"}")?;
    r.0.is_empty().then_some(Split {
        funds,
        account_pay_fen,
        cash_pay_fen,
        eligible_self_pay_fen,
        eligible_borne_fen,
        year_to_date_delta,
        breakdown,
    })
}

/// What is left to read; every step answers `None` where the bytes are not as written here.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    /// Takes `text` if the bytes go on with it.
    fn eat(&mut self, text: &[u8]) -> bool {
        match self.0.strip_prefix(text) {
            Some(rest) => {
                self.0 = rest;
                true
            }
            None => false,
        }
    }

    fn lit(&mut self, text: &[u8]) -> Option<()> {
        self.eat(text).then_some(())
    }

    /// A string without escapes or control characters (anything else is left to serde).
    fn string(&mut self) -> Option<String> {
        self.lit(b"\"")?;
        let end = self.0.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if self.0[end] != b'"' {
            return None;
        }
        let text = std::str::from_utf8(&self.0[..end]).ok()?.to_owned();
        self.0 = &self.0[end + 1..];
        Some(text)
    }

    /// An integer as serde_json writes one: an optional minus, then `0` or digits not starting
    /// with `0`, within an `i64`. Not `-0`, which serde_json reads as a float.
    fn int(&mut self) -> Option<i64> {
        let negative = self.eat(b"-");
        let digits = self.0.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || (self.0[0] == b'0' && (digits > 1 || negative)) {
            return None;
        }
        let mut value: i64 = 0;
        for &digit in &self.0[..digits] {
            let digit = i64::from(digit - b'0');
            value = value.checked_mul(10)?;
            value = if negative { value.checked_sub(digit)? } else { value.checked_add(digit)? };
        }
        self.0 = &self.0[digits..];
        Some(value)
    }

    /// `key`, then a string.
    fn text(&mut self, key: &[u8]) -> Option<String> {
        self.lit(key)?;
        self.string()
    }

    /// `key`, then an integer.
    fn int_after(&mut self, key: &[u8]) -> Option<i64> {
        self.lit(key)?;
        self.int()
    }

    /// An array, each element read by `element`, written without spaces.
    fn list<T>(&mut self, mut element: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        self.lit(b"[")?;
        let mut list = Vec::new();
        if self.eat(b"]") {
            return Some(list);
        }
        loop {
            list.push(element(self)?);
            if self.eat(b"]") {
                return Some(list);
            }
            self.lit(b",")?;
        }
    }

    fn year_to_date(&mut self) -> Option<YearToDate> {
        let year = i32::try_from(self.int_after(b"{\"year\":")?).ok()?;
        let deductible_fen = self.int_after(b",\"deductible_fen\":")?;
        let fund_paid_fen = self.int_after(b",\"fund_paid_fen\":")?;
        let eligible_fen = self.int_after(b",\"eligible_fen\":")?;
        let account_paid_fen = self.int_after(b",\"account_paid_fen\":")?;
        let eligible_self_pay_fen = self.int_after(b",\"eligible_self_pay_fen\":")?;
        let outpatient_fund_paid_fen = self.int_after(b",\"outpatient_fund_paid_fen\":")?;
        self.lit(b"}")?;
        Some(YearToDate {
            year,
            deductible_fen,
            fund_paid_fen,
            eligible_fen,
            account_paid_fen,
            eligible_self_pay_fen,
            outpatient_fund_paid_fen,
        })
    }
}

/// What each writer answers: writing to a `Vec` fails only where serde_json would.
pub type Written = serde_json::Result<()>;

fn lit(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
}

/// A JSON string, escaped as serde_json escapes it.
fn string(out: &mut Vec<u8>, value: &str) -> Written {
    serde_json::Serializer::new(out).serialize_str(value)
}

fn int(out: &mut Vec<u8>, value: i64) {
    lit(out, itoa::Buffer::new().format(value));
}

fn boolean(out: &mut Vec<u8>, value: bool) {
    lit(out, if value { "true" } else { "false" });
}

/// Anything else through serde (enums, rare nested values).
fn serde_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Written {
    value.serialize(&mut serde_json::Serializer::new(out))
}

/// A [`Decimal4`]: an integer when whole, else its digits as a string.
fn decimal(out: &mut Vec<u8>, value: Decimal4) -> Written {
    match value.whole() {
        Some(whole) => {
            int(out, whole);
            Ok(())
        }
        None => serde_value(out, &value),
    }
}

/// The start of a [`SettlementRequest`]: `{"settlement_id":…,"card":…,"institution":…,
/// "insurance_type":…,"lines":[…],"total_fen":N` — what every payer of a chain is sent alike.
pub fn settlement_head(
    out: &mut Vec<u8>,
    settlement_id: &str,
    card: &CardClaims,
    institution: &Institution,
    insurance_type: &str,
    lines: &[BillLine],
    total_fen: Fen,
) -> Written {
    let Institution { id, level, region } = institution;
    lit(out, "{\"settlement_id\":");
    string(out, settlement_id)?;
    lit(out, ",\"card\":");
    self::card(out, card)?;
    lit(out, ",\"institution\":{\"id\":");
    string(out, id)?;
    lit(out, ",\"level\":");
    lit(
        out,
        match level {
            InstitutionLevel::Primary => "\"primary\"",
            InstitutionLevel::Secondary => "\"secondary\"",
            InstitutionLevel::Tertiary => "\"tertiary\"",
            InstitutionLevel::Pharmacy => "\"pharmacy\"",
        },
    );
    lit(out, ",\"region\":");
    string(out, region)?;
    lit(out, "},\"insurance_type\":");
    string(out, insurance_type)?;
    lit(out, ",\"lines\":");
    self::lines(out, lines)?;
    lit(out, ",\"total_fen\":");
    int(out, total_fen);
    Ok(())
}

/// The middle of a [`SettlementRequest`], what differs from payer to payer of a chain:
/// `,"due_fen":N,"prior":[…],"year_to_date":{…}`.
pub fn settlement_payer(out: &mut Vec<u8>, due_fen: Fen, prior: &[PriorPayment], ytd: &YearToDate) -> Written {
    lit(out, ",\"due_fen\":");
    int(out, due_fen);
    lit(out, ",\"prior\":[");
    for (i, p) in prior.iter().enumerate() {
        let PriorPayment { payer, fund_pay_fen, account_pay_fen, eligible_self_pay_fen, eligible_borne_fen } = p;
        lit(out, if i == 0 { "{\"payer\":" } else { ",{\"payer\":" });
        string(out, payer)?;
        lit(out, ",\"fund_pay_fen\":");
        int(out, *fund_pay_fen);
        lit(out, ",\"account_pay_fen\":");
        int(out, *account_pay_fen);
        lit(out, ",\"eligible_self_pay_fen\":");
        int(out, *eligible_self_pay_fen);
        lit(out, ",\"eligible_borne_fen\":");
        int(out, *eligible_borne_fen);
        lit(out, "}");
    }
    lit(out, "],\"year_to_date\":");
    year_to_date(out, ytd);
    Ok(())
}

/// The end of a [`SettlementRequest`]: `,"use_account":B[,"encounter":{…}]}`.
pub fn settlement_tail(out: &mut Vec<u8>, use_account: bool, encounter: Option<&EncounterInfo>) -> Written {
    lit(out, ",\"use_account\":");
    boolean(out, use_account);
    if let Some(encounter) = encounter {
        lit(out, ",\"encounter\":");
        serde_value(out, encounter)?;
    }
    lit(out, "}");
    Ok(())
}

fn year_to_date(out: &mut Vec<u8>, ytd: &YearToDate) {
    let YearToDate {
        year,
        deductible_fen,
        fund_paid_fen,
        eligible_fen,
        account_paid_fen,
        eligible_self_pay_fen,
        outpatient_fund_paid_fen,
    } = *ytd;
    lit(out, "{\"year\":");
    int(out, year.into());
    lit(out, ",\"deductible_fen\":");
    int(out, deductible_fen);
    lit(out, ",\"fund_paid_fen\":");
    int(out, fund_paid_fen);
    lit(out, ",\"eligible_fen\":");
    int(out, eligible_fen);
    lit(out, ",\"account_paid_fen\":");
    int(out, account_paid_fen);
    lit(out, ",\"eligible_self_pay_fen\":");
    int(out, eligible_self_pay_fen);
    lit(out, ",\"outpatient_fund_paid_fen\":");
    int(out, outpatient_fund_paid_fen);
    lit(out, "}");
}

fn card(out: &mut Vec<u8>, card: &CardClaims) -> Written {
    let CardClaims { card_id, holder_name, insured_region, insurance_types, delegate } = card;
    lit(out, "{\"card_id\":");
    string(out, card_id)?;
    lit(out, ",\"holder_name\":");
    string(out, holder_name)?;
    lit(out, ",\"insured_region\":");
    string(out, insured_region)?;
    lit(out, ",\"insurance_types\":[");
    for (i, t) in insurance_types.iter().enumerate() {
        if i > 0 {
            lit(out, ",");
        }
        string(out, t)?;
    }
    lit(out, "]");
    if let Some(delegate) = delegate {
        lit(out, ",\"delegate\":");
        serde_value(out, delegate)?;
    }
    lit(out, "}");
    Ok(())
}

fn lines(out: &mut Vec<u8>, lines: &[BillLine]) -> Written {
    lit(out, "[");
    for (i, line) in lines.iter().enumerate() {
        let BillLine { code, name, category, quantity, unit_price_fen, amount_fen, catalogue: entry } = line;
        lit(out, if i == 0 { "{\"code\":" } else { ",{\"code\":" });
        string(out, code)?;
        lit(out, ",\"name\":");
        string(out, name)?;
        lit(out, ",\"category\":");
        self::category(out, *category);
        lit(out, ",\"quantity\":");
        decimal(out, *quantity)?;
        lit(out, ",\"unit_price_fen\":");
        decimal(out, *unit_price_fen)?;
        lit(out, ",\"amount_fen\":");
        int(out, *amount_fen);
        if let Some(entry) = entry {
            lit(out, ",\"catalogue\":");
            catalogue(out, entry)?;
        }
        lit(out, "}");
    }
    lit(out, "]");
    Ok(())
}

fn category(out: &mut Vec<u8>, category: ItemCategory) {
    lit(
        out,
        match category {
            ItemCategory::ClassA => "\"class_a\"",
            ItemCategory::ClassB => "\"class_b\"",
            ItemCategory::ClassC => "\"class_c\"",
        },
    );
}

fn catalogue(out: &mut Vec<u8>, entry: &CatalogueEntry) -> Written {
    let CatalogueEntry { class, self_pay_bp, price_cap_fen, restricted } = entry;
    lit(out, "{\"class\":");
    category(out, *class);
    if let Some(bp) = self_pay_bp {
        lit(out, ",\"self_pay_bp\":");
        int(out, (*bp).into());
    }
    if let Some(cap) = price_cap_fen {
        lit(out, ",\"price_cap_fen\":");
        int(out, *cap);
    }
    lit(out, ",\"restricted\":");
    boolean(out, *restricted);
    lit(out, "}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::Delegate;

    fn written<T>(write: impl Fn(&mut Vec<u8>, &T) -> Written, value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut out, value).expect("written");
        out
    }

    /// Against serde's encoding, byte for byte, as text for a readable diff.
    fn assert_as_serde(request: &SettlementRequest) {
        let serde = String::from_utf8(serde_json::to_vec(request).expect("serde")).expect("UTF-8");
        let ours = String::from_utf8(written(settlement_request, request)).expect("UTF-8");
        assert_eq!(ours, serde);
    }

    /// Every optional part present (a delegate, an encounter, earlier payers, catalogue entries,
    /// fractional decimals, escapes), then each left out.
    #[test]
    fn a_settlement_request_with_every_part_encodes_as_serde_does() {
        let full = serde_json::json!({
            "settlement_id": "S0001", "insurance_type": "310", "total_fen": 170000, "due_fen": 52000,
            "card": { "card_id": "110105199001011234", "holder_name": "张三", "insured_region": "110105",
                      "insurance_types": ["310", "390"],
                      "delegate": { "card_id": "110105196501011234", "name": "李四", "relation": "parent" } },
            "institution": { "id": "H110105001", "level": "tertiary", "region": "110105" },
            "lines": [
                { "code": "XA01", "name": "Amoxicillin \"500\"\n\t\\", "category": "class_a", "quantity": "2.5",
                  "unit_price_fen": 100, "amount_fen": 250,
                  "catalogue": { "class": "class_b", "self_pay_bp": 1000, "price_cap_fen": 90, "restricted": true } },
                { "code": "XB02", "name": "CT", "category": "class_b", "quantity": 1, "unit_price_fen": "0.3333",
                  "amount_fen": 169750, "catalogue": { "class": "class_c" } }
            ],
            "prior": [{ "payer": "basic-medical", "fund_pay_fen": 118000, "account_pay_fen": 0,
                        "eligible_self_pay_fen": 1000, "eligible_borne_fen": 2000 },
                      { "payer": "critical-illness", "fund_pay_fen": 0, "account_pay_fen": 0, "eligible_self_pay_fen": 0 }],
            "year_to_date": { "year": 2026, "deductible_fen": 80000, "fund_paid_fen": 52000 },
            "use_account": false,
            "encounter": { "id": "E0001", "kind": "inpatient", "med_type": "21", "admitted_at": "2026-11-01T08:00:00+08:00",
                           "diagnoses": [{ "code": "I21.9", "primary": true }], "interim": true, "settled_count": 2 }
        });
        let mut bare = full.clone();
        for field in ["encounter", "prior", "use_account"] {
            bare.as_object_mut().expect("object").remove(field);
        }
        bare["card"].as_object_mut().expect("card").remove("delegate");
        bare["lines"][0].as_object_mut().expect("line").remove("catalogue");
        bare["lines"][1].as_object_mut().expect("line").remove("catalogue");
        for value in [full, bare] {
            let request: SettlementRequest = serde_json::from_value(value).expect("a settlement request");
            assert_as_serde(&request);
        }
    }

    /// Any Unicode text (proptest's strings leave out control characters), or any ASCII text,
    /// control characters, quotes and backslashes included.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[\\x00-\\x7f]{0,16}"]
    }

    fn category() -> impl Strategy<Value = ItemCategory> {
        prop_oneof![Just(ItemCategory::ClassA), Just(ItemCategory::ClassB), Just(ItemCategory::ClassC)]
    }

    fn decimal4() -> impl Strategy<Value = Decimal4> {
        prop_oneof![
            (0i64..1_000_000).prop_map(|n| Decimal4::from_whole(n).expect("whole")),
            (0i64..i64::MAX).prop_map(|u| Decimal4::from_units(u).expect("units")),
        ]
    }

    fn catalogue_entry() -> impl Strategy<Value = CatalogueEntry> {
        (category(), proptest::option::of(any::<u32>()), proptest::option::of(any::<i64>()), any::<bool>()).prop_map(
            |(class, self_pay_bp, price_cap_fen, restricted)| CatalogueEntry {
                class,
                self_pay_bp,
                price_cap_fen,
                restricted,
            },
        )
    }

    fn line() -> impl Strategy<Value = BillLine> {
        (text(), text(), category(), decimal4(), decimal4(), any::<i64>(), proptest::option::of(catalogue_entry()))
            .prop_map(|(code, name, category, quantity, unit_price_fen, amount_fen, catalogue)| BillLine {
                code,
                name,
                category,
                quantity,
                unit_price_fen,
                amount_fen,
                catalogue,
            })
    }

    fn prior() -> impl Strategy<Value = PriorPayment> {
        (text(), any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()).prop_map(
            |(payer, fund_pay_fen, account_pay_fen, eligible_self_pay_fen, eligible_borne_fen)| PriorPayment {
                payer,
                fund_pay_fen,
                account_pay_fen,
                eligible_self_pay_fen,
                eligible_borne_fen,
            },
        )
    }

    fn card() -> impl Strategy<Value = CardClaims> {
        let delegate = (text(), proptest::option::of(text()), text()).prop_map(|(card_id, name, relation)| Delegate {
            card_id,
            name,
            relation,
        });
        (text(), text(), text(), proptest::collection::vec(text(), 0..3), proptest::option::of(delegate)).prop_map(
            |(card_id, holder_name, insured_region, insurance_types, delegate)| CardClaims {
                card_id,
                holder_name,
                insured_region,
                insurance_types,
                delegate,
            },
        )
    }

    fn year_to_date() -> impl Strategy<Value = YearToDate> {
        (any::<i32>(), any::<[i64; 6]>()).prop_map(|(year, [a, b, c, d, e, f])| YearToDate {
            year,
            deductible_fen: a,
            fund_paid_fen: b,
            eligible_fen: c,
            account_paid_fen: d,
            eligible_self_pay_fen: e,
            outpatient_fund_paid_fen: f,
        })
    }

    fn request() -> impl Strategy<Value = SettlementRequest> {
        let institution = (
            text(),
            prop_oneof![
                Just(InstitutionLevel::Primary),
                Just(InstitutionLevel::Secondary),
                Just(InstitutionLevel::Tertiary),
                Just(InstitutionLevel::Pharmacy)
            ],
            text(),
        )
            .prop_map(|(id, level, region)| Institution { id, level, region });
        (
            (text(), card(), institution, text()),
            proptest::collection::vec(line(), 0..6),
            (any::<i64>(), any::<i64>(), proptest::collection::vec(prior(), 0..3), year_to_date(), any::<bool>()),
        )
            .prop_map(
                |(
                    (settlement_id, card, institution, insurance_type),
                    lines,
                    (total_fen, due_fen, prior, year_to_date, use_account),
                )| SettlementRequest {
                    settlement_id,
                    card,
                    institution,
                    insurance_type,
                    lines,
                    total_fen,
                    due_fen,
                    prior,
                    year_to_date,
                    use_account,
                    encounter: None,
                },
            )
    }

    fn split_value() -> impl Strategy<Value = Split> {
        let fund = (text(), any::<i64>()).prop_map(|(fund, amount_fen)| FundPayment { fund, amount_fen });
        let item = (text(), any::<i64>(), prop_oneof![Just(String::new()), text()])
            .prop_map(|(item, amount_fen, note)| BreakdownItem { item, amount_fen, note });
        (
            proptest::collection::vec(fund, 0..3),
            any::<[i64; 4]>(),
            year_to_date(),
            proptest::collection::vec(item, 0..8),
        )
            .prop_map(|(funds, [a, b, c, d], year_to_date_delta, breakdown)| Split {
                funds,
                account_pay_fen: a,
                cash_pay_fen: b,
                eligible_self_pay_fen: c,
                eligible_borne_fen: d,
                year_to_date_delta,
                breakdown,
            })
    }

    proptest! {
        /// Any text (control characters, quotes, backslashes, every plane of Unicode), any
        /// amount, any decimal: the same bytes as serde's.
        #[test]
        fn any_settlement_request_encodes_as_serde_does(request in request()) {
            prop_assert_eq!(written(settlement_request, &request), serde_json::to_vec(&request).expect("serde"));
        }

        #[test]
        fn any_split_encodes_as_serde_does(split in split_value()) {
            prop_assert_eq!(written(self::split, &split), serde_json::to_vec(&split).expect("serde"));
        }

        /// What the writer writes, the reader takes, as it was — unless a string needed an
        /// escape (those are serde's to read).
        #[test]
        fn any_split_written_reads_back(split in split_value()) {
            let texts = split.funds.iter().map(|f| &f.fund).chain(split.breakdown.iter().flat_map(|b| [&b.item, &b.note]));
            let plain = texts.into_iter().all(|t| !t.chars().any(|c| c == '"' || c == '\\' || c < ' '));
            prop_assert_eq!(read_split(&written(self::split, &split)), plain.then_some(split));
        }

        /// Bytes changed anywhere (one replaced, one inserted, one taken out, the end cut off):
        /// the reader either leaves them to serde or reads what serde reads.
        #[test]
        fn any_changed_split_reads_as_serde_reads_it_or_is_left_to_serde(
            split in split_value(),
            at in any::<prop::sample::Index>(),
            byte in prop_oneof![any::<u8>(), proptest::sample::select(b"0123456789-\"\\{}[],: e.".to_vec())],
            how in 0..4u8,
        ) {
            let mut bytes = written(self::split, &split);
            match how {
                0 => { let at = at.index(bytes.len()); bytes[at] = byte; }
                1 => bytes.insert(at.index(bytes.len() + 1), byte),
                2 => { bytes.remove(at.index(bytes.len())); }
                _ => bytes.truncate(at.index(bytes.len())),
            }
            if let Some(read) = read_split(&bytes) {
                let serde: Split = serde_json::from_slice(&bytes).expect("the reader took what serde refuses");
                prop_assert_eq!(read, serde);
            }
        }
    }

    #[test]
    fn a_split_not_as_written_here_is_left_to_serde() {
        let split = Split {
            funds: vec![FundPayment { fund: "basic_pooling".into(), amount_fen: 52_000 }],
            account_pay_fen: 18_000,
            cash_pay_fen: 100_000,
            breakdown: vec![BreakdownItem { item: "deductible".into(), amount_fen: 0, note: "起付线".into() }],
            ..Split::default()
        };
        let bytes = written(self::split, &split);
        assert_eq!(read_split(&bytes), Some(split.clone()), "as written here");
        let text = String::from_utf8(bytes).expect("UTF-8");
        let escaped = Split {
            breakdown: vec![BreakdownItem { note: "a \"note\"".into(), ..split.breakdown[0].clone() }],
            ..split.clone()
        };
        let others = [
            serde_json::to_vec_pretty(&split).expect("serde"),
            written(self::split, &escaped),
            // Keys in another order.
            text.replacen(
                "\"account_pay_fen\":18000,\"cash_pay_fen\":100000",
                "\"cash_pay_fen\":100000,\"account_pay_fen\":18000",
                1,
            )
            .into_bytes(),
            // A field left to its default.
            text.replacen(",\"eligible_borne_fen\":0", "", 1).into_bytes(),
            // A field this SDK does not know.
            text.replacen("{\"funds\"", "{\"extra\":1,\"funds\"", 1).into_bytes(),
            // Minus zero, a leading zero, a fraction, an integer past i64.
            text.replacen(":18000", ":-0", 1).into_bytes(),
            text.replacen(":18000", ":018000", 1).into_bytes(),
            text.replacen(":18000", ":18000.0", 1).into_bytes(),
            text.replacen(":18000", ":9223372036854775808", 1).into_bytes(),
            // Anything after the split.
            format!("{text} ").into_bytes(),
            format!("{text}{{}}").into_bytes(),
        ];
        for (n, other) in others.iter().enumerate() {
            assert_ne!(other.as_slice(), text.as_bytes(), "case {n} changed nothing");
            assert_eq!(read_split(other), None, "case {n}: {}", String::from_utf8_lossy(other));
        }
        // Serde reads them as the split, or refuses them.
        assert_eq!(serde_json::from_slice::<Split>(&others[0]).expect("pretty"), split);
        assert_eq!(serde_json::from_slice::<Split>(&others[1]).expect("escaped"), escaped);
        assert_eq!(serde_json::from_slice::<Split>(&others[2]).expect("reordered"), split);
        assert_eq!(serde_json::from_slice::<Split>(&others[3]).expect("defaulted"), split);
        assert!(serde_json::from_slice::<Split>(&others[5]).is_err(), "minus zero");
        assert!(serde_json::from_slice::<Split>(&others[8]).is_err(), "past i64");
    }
}
