//! The messages that cross the plugin boundary: what the gateway hands a plugin and what the
//! plugin answers. All money is integer fen (`i64`); nothing here is floating point.
//!
//! Every type is plain data with serde derives: on the wire it is JSON, so a later minor ABI
//! version can add optional fields without breaking older plugins (unknown fields are ignored,
//! missing optional fields take their defaults).

use serde::{Deserialize, Serialize};

/// Money in fen (1 yuan = 100 fen).
pub type Fen = i64;

/// An exact, non-negative decimal with up to four digits after the point, held as a whole
/// number of ten-thousandths — never floating point. Bill lines use it for the quantity (the
/// national interface's `cnt` has four decimals: half doses, grams of herbal medicine) and for
/// the unit price in fen (`pric` has six decimals of a yuan, which is four of a fen).
///
/// On the wire a whole value is a JSON integer (`2`), any other a string (`"0.5"`,
/// `"12.3456"`), so plugins built when quantities were whole numbers still read whole ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal4(i64);

impl Decimal4 {
    /// Units in one: 10,000.
    pub const SCALE: i64 = 10_000;
    /// One.
    pub const ONE: Self = Self(Self::SCALE);

    /// A whole number (`None` if negative or too large).
    pub fn from_whole(n: i64) -> Option<Self> {
        n.checked_mul(Self::SCALE).filter(|u| *u >= 0).map(Self)
    }

    /// From ten-thousandths (`None` if negative).
    pub fn from_units(units: i64) -> Option<Self> {
        (units >= 0).then_some(Self(units))
    }

    /// In ten-thousandths.
    pub fn units(self) -> i64 {
        self.0
    }

    /// The whole number it is, if it is one.
    pub fn whole(self) -> Option<i64> {
        (self.0 % Self::SCALE == 0).then_some(self.0 / Self::SCALE)
    }

    /// Reads `123`, `0.5`, `12.3456`: digits, optionally a point and one to four digits; no
    /// sign, no exponent; `None` beyond the largest value (922,337,203,685,477.5807).
    pub fn parse(text: &str) -> Option<Self> {
        parse_decimal(text, 4).map(Self)
    }

    /// `self × other` rounded half up to a whole number: the fen of a quantity at a unit price.
    pub fn times_rounded(self, other: Self) -> Option<i64> {
        let product = i128::from(self.0) * i128::from(other.0);
        let scale = i128::from(Self::SCALE) * i128::from(Self::SCALE);
        i64::try_from((product + scale / 2) / scale).ok()
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Decimal4 {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Decimal4".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An exact non-negative decimal with at most four decimals: an integer when whole, else a string such as \"0.5\".",
            "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^[0-9]{1,15}\\.[0-9]{1,4}$" }
            ]
        })
    }
}

/// A non-negative decimal written `123`, `0.5` or `12.345678` (digits, optionally a point and
/// one to `places` digits; no sign, no exponent, at most 15 digits before the point), read
/// exactly as a whole number of `10^-places` units; `None` for anything else or past `i64`.
pub fn parse_decimal(text: &str, places: usize) -> Option<i64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 15 || !digits(whole) || fraction.len() > places || !digits(fraction) {
        return None;
    }
    if text.contains('.') && fraction.is_empty() {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    // "5" of "0.5" at four places is 5,000 units: the digits, then the places they leave.
    let fraction: i64 = match fraction {
        "" => 0,
        digits => {
            digits.parse::<i64>().ok()?.checked_mul(10i64.checked_pow(u32::try_from(places - digits.len()).ok()?)?)?
        }
    };
    whole.checked_mul(10i64.checked_pow(u32::try_from(places).ok()?)?)?.checked_add(fraction)
}

impl std::fmt::Display for Decimal4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (whole, mut fraction) = (self.0 / Self::SCALE, self.0 % Self::SCALE);
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        // 0.05 is 500 units: "05" once its trailing zeros are gone.
        let mut digits = 4;
        while fraction % 10 == 0 {
            fraction /= 10;
            digits -= 1;
        }
        write!(f, "{whole}.{fraction:0digits$}")
    }
}

impl Serialize for Decimal4 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.whole() {
            Some(whole) => serializer.serialize_i64(whole),
            None => serializer.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Decimal4 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Decimal4;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a non-negative decimal with at most four decimals: an integer, or a string such as \"0.5\"",
                )
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Decimal4, E> {
                i64::try_from(v).ok().and_then(Decimal4::from_whole).ok_or_else(|| E::custom("too large"))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Decimal4, E> {
                Decimal4::from_whole(v).ok_or_else(|| E::custom("must not be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Decimal4, E> {
                Decimal4::parse(v).ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The verified claims of the e-card that was scanned.
///
/// The gateway has already checked the token's signature, time window, revocation and replay
/// before a plugin sees these.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardClaims {
    /// Card id; maps one-to-one to the physical social-security card.
    pub card_id: String,
    /// The card holder's name.
    pub holder_name: String,
    /// Insured region (`insuplc_admdvs`): 6-digit administrative division code.
    pub insured_region: String,
    /// Insurance types (`insutype`), national codes such as `"310"` (employee basic medical)
    /// or `"390"` (urban and rural resident basic medical).
    pub insurance_types: Vec<String>,
    /// Present when a family member presents the card on the holder's behalf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<Delegate>,
}

/// Who presented the card on the holder's behalf (family account).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegate {
    /// The delegate's own card id.
    pub card_id: String,
    /// The delegate's name, when the token carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Relation to the holder, for example `"parent"`, `"spouse"`, `"child"`.
    pub relation: String,
}

/// The grade of a medical institution, which many policies use to set reimbursement ratios.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InstitutionLevel {
    /// Grade 1 (community health centres, township hospitals).
    Primary,
    /// Grade 2 (county and district hospitals).
    Secondary,
    /// Grade 3 (large city and provincial hospitals).
    Tertiary,
    /// A designated retail pharmacy.
    Pharmacy,
}

/// The institution that posted the request, as named by its client certificate.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Institution {
    /// Institution id (fixed-point medical institution code).
    pub id: String,
    /// Its grade.
    pub level: InstitutionLevel,
    /// Treatment region (`mdtrtarea_admvs`): 6-digit administrative division code.
    pub region: String,
}

/// The policy class of a bill item, from the national catalogue.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ItemCategory {
    /// Class A (甲类): fully eligible for reimbursement.
    ClassA,
    /// Class B (乙类): eligible after the patient pays a first self-pay share.
    ClassB,
    /// Class C (丙类): not covered; the patient pays it all.
    ClassC,
}

/// What the bureau's catalogue says of an item (by its national code, `med_list_codg`), valid
/// on the day of the settlement. Where the gateway has a catalogue, it decides the line's class,
/// not the hospital's assertion.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueEntry {
    /// The item's class in the catalogue (the line's `category` is set to it).
    pub class: ItemCategory,
    /// For a class B item: the share the patient pays first, in basis points, for this item;
    /// `None`: the payer's general ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_pay_bp: Option<u32>,
    /// The highest price of one unit the funds count, in fen; the part of the line above
    /// `price_cap_fen × quantity` is the patient's. `None`: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_cap_fen: Option<Fen>,
    /// A restricted-use item (限定支付范围): covered only for the indications the catalogue
    /// names, which the payer may check.
    #[serde(default)]
    pub restricted: bool,
}

/// One line of a bill.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillLine {
    /// Catalogue code of the item.
    pub code: String,
    /// Readable name of the item.
    pub name: String,
    /// Policy class: the catalogue's where the gateway has a catalogue (see `catalogue`),
    /// otherwise as the institution asserted it.
    pub category: ItemCategory,
    /// Number of units, to four decimals (half a pack, 12.5 grams of a herb).
    pub quantity: Decimal4,
    /// Price of one unit in fen, to four decimals (a yuan to six, as the national interface).
    pub unit_price_fen: Decimal4,
    /// The line's amount in fen: `quantity × unit_price_fen` rounded half up to the fen (the
    /// gateway checks it), non-negative; the lines sum to the bill's total.
    pub amount_fen: Fen,
    /// The catalogue's entry for `code`, where the gateway has a catalogue and the code is in
    /// it (a code that is not is class C, or refused, as the gateway is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalogue: Option<CatalogueEntry>,
}

/// The person's year-to-date accumulators for the payer being called, kept by the gateway's
/// ledger and fed back to the plugin on every call, so plugins hold no state of their own.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct YearToDate {
    /// Calendar year the accumulators belong to.
    pub year: i32,
    /// Eligible cost counted toward the yearly deductible so far.
    pub deductible_fen: Fen,
    /// What this payer's funds have paid so far this year (counts toward its ceiling).
    pub fund_paid_fen: Fen,
    /// Eligible (in-policy) cost accumulated so far this year.
    pub eligible_fen: Fen,
    /// What the personal account has paid so far this year.
    pub account_paid_fen: Fen,
    /// In-policy self-pay (what the patient bore of eligible cost) so far this year.
    pub eligible_self_pay_fen: Fen,
    /// Of `fund_paid_fen`, what the funds paid for outpatient care this year, where the
    /// payer's outpatient pooling has a ceiling of its own (ABI 1.3).
    pub outpatient_fund_paid_fen: Fen,
}

impl YearToDate {
    /// Adds what one settlement changed.
    pub fn apply(&mut self, delta: &YearToDate) {
        self.deductible_fen += delta.deductible_fen;
        self.fund_paid_fen += delta.fund_paid_fen;
        self.eligible_fen += delta.eligible_fen;
        self.account_paid_fen += delta.account_paid_fen;
        self.eligible_self_pay_fen += delta.eligible_self_pay_fen;
        self.outpatient_fund_paid_fen += delta.outpatient_fund_paid_fen;
    }
}

/// What an earlier payer in the chain already covered.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorPayment {
    /// The earlier payer's name (its plugin name).
    pub payer: String,
    /// What its funds paid.
    pub fund_pay_fen: Fen,
    /// What the personal account paid through it.
    pub account_pay_fen: Fen,
    /// The in-policy self-pay it left to the patient, in cash (what the personal account paid
    /// is not in it).
    pub eligible_self_pay_fen: Fen,
    /// The in-policy self-pay the person bore with it, the personal account's part included: the
    /// base a critical-illness payer counts toward its threshold. 0 from a payer that does not
    /// say (use `eligible_self_pay_fen` then).
    #[serde(default)]
    pub eligible_borne_fen: Fen,
}

/// A request to split a bill: used by `quote` (nothing moves) and `settle` (money moves).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementRequest {
    /// The gateway's settlement id (or quote id, for a quote).
    pub settlement_id: String,
    /// The card's verified claims.
    pub card: CardClaims,
    /// The institution settling the bill.
    pub institution: Institution,
    /// The insurance type being settled (`insutype`).
    pub insurance_type: String,
    /// The bill.
    pub lines: Vec<BillLine>,
    /// The bill's total in fen: the sum of `lines[].amount_fen`.
    pub total_fen: Fen,
    /// What this payer must split: the total less what earlier payers covered. Every answer
    /// must balance against it exactly.
    pub due_fen: Fen,
    /// What earlier payers in the chain covered, in order.
    #[serde(default)]
    pub prior: Vec<PriorPayment>,
    /// The person's year-to-date accumulators with this payer.
    #[serde(default)]
    pub year_to_date: YearToDate,
    /// Whether the patient agrees to pay from the personal account.
    #[serde(default = "default_true")]
    pub use_account: bool,
    /// The encounter a hospital settles in steps (ABI 1.3): the visit or admission, its
    /// medical type and diagnoses, whether this settlement is interim or final, and what its
    /// earlier settlements covered. Absent for a one-call settlement (a pharmacy's sale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<EncounterInfo>,
}

/// An outpatient visit or an inpatient stay (the national `mdtrt_id`), settled in steps.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncounterInfo {
    /// The gateway's encounter id.
    pub id: String,
    /// Outpatient visit or inpatient stay.
    pub kind: EncounterKind,
    /// The national medical type (`med_type`), for example `11` general outpatient, `14`
    /// outpatient chronic or special disease, `21` general inpatient.
    pub med_type: String,
    /// Diagnoses (ICD-10), the primary one first.
    #[serde(default)]
    pub diagnoses: Vec<Diagnosis>,
    /// The department (`dept_code`), where given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    /// Registration or admission (`begntime`), RFC 3339.
    pub admitted_at: String,
    /// Discharge (`endtime`), RFC 3339; absent while the patient is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discharged_at: Option<String>,
    /// Whether this is an interim settlement of a long stay (`mid_setl_flag`); false for the
    /// final one.
    #[serde(default)]
    pub interim: bool,
    /// The lines this encounter's earlier settlements (still settled: not withdrawn) covered,
    /// as the payers saw them; empty for its first settlement. A per-admission rule (an
    /// inpatient deductible met once per stay) counts them.
    #[serde(default)]
    pub settled_lines: Vec<BillLine>,
    /// How many earlier settlements of this encounter are settled.
    #[serde(default)]
    pub settled_count: u32,
}

/// Whether an encounter is an outpatient visit or an inpatient stay.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncounterKind {
    /// An outpatient visit (national 2201-2208).
    Outpatient,
    /// An inpatient stay, from admission to discharge (national 2301-2305, 2401-2405).
    Inpatient,
}

/// A diagnosis (the national `diseinfo`).
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// ICD-10 code (`diag_code`), for example `I10` or `E11.9`.
    pub code: String,
    /// Readable name (`diag_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether it is the primary diagnosis (`maindiag_flag`).
    #[serde(default)]
    pub primary: bool,
}

fn default_true() -> bool {
    true
}

/// What one fund pays.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundPayment {
    /// The fund's name, for example `"basic_pooling"`.
    pub fund: String,
    /// Amount in fen, never negative.
    pub amount_fen: Fen,
}

/// One readable line of how a split was reached.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakdownItem {
    /// A stable key, for example `"deductible"` or `"class_c_self_pay"`.
    pub item: String,
    /// Amount in fen.
    pub amount_fen: Fen,
    /// A short human-readable note.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A plugin's answer to a quote or a settlement: how `due_fen` is split.
///
/// Invariant, checked by the gateway on every answer:
/// `due_fen == sum(funds) + account_pay_fen + cash_pay_fen`, every amount non-negative.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Split {
    /// What this payer's funds pay, fund by fund.
    pub funds: Vec<FundPayment>,
    /// What the personal account pays.
    pub account_pay_fen: Fen,
    /// What is left for the patient (or the next payer in the chain).
    pub cash_pay_fen: Fen,
    /// The part of `cash_pay_fen` that is in-policy self-pay, which a later payer (for example
    /// medical assistance) may cover.
    #[serde(default)]
    pub eligible_self_pay_fen: Fen,
    /// The in-policy self-pay the person bears after this payer, whether the personal account
    /// or cash pays it: the base of critical-illness insurance, which counts the person's own
    /// account money as borne (0: not given; later payers use `eligible_self_pay_fen`).
    #[serde(default)]
    pub eligible_borne_fen: Fen,
    /// How the accumulators change if this split is settled.
    #[serde(default)]
    pub year_to_date_delta: YearToDate,
    /// How the split was reached, for the receipt.
    #[serde(default)]
    pub breakdown: Vec<BreakdownItem>,
}

impl Split {
    /// The sum of all fund payments.
    pub fn fund_pay_fen(&self) -> Fen {
        self.funds.iter().map(|f| f.amount_fen).sum()
    }

    /// Checks that the split balances exactly against `due_fen` and that no amount is
    /// negative. The gateway runs this on every plugin answer.
    pub fn check_balances(&self, due_fen: Fen) -> Result<(), BalanceError> {
        if let Some(f) = self.funds.iter().find(|f| f.amount_fen < 0) {
            return Err(BalanceError::Negative { what: format!("fund {}", f.fund), amount_fen: f.amount_fen });
        }
        for (what, amount_fen) in [("account_pay_fen", self.account_pay_fen), ("cash_pay_fen", self.cash_pay_fen)] {
            if amount_fen < 0 {
                return Err(BalanceError::Negative { what: what.to_owned(), amount_fen });
            }
        }
        let sum = self
            .funds
            .iter()
            .try_fold(0i64, |acc, f| acc.checked_add(f.amount_fen))
            .and_then(|s| s.checked_add(self.account_pay_fen))
            .and_then(|s| s.checked_add(self.cash_pay_fen));
        match sum {
            Some(sum) if sum == due_fen => Ok(()),
            sum => Err(BalanceError::Unbalanced { due_fen, sum_fen: sum }),
        }
    }
}

/// Why a split does not balance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    /// An amount is negative.
    #[error("{what} is negative ({amount_fen} fen)")]
    Negative {
        /// Which amount.
        what: String,
        /// Its value.
        amount_fen: Fen,
    },
    /// The parts do not add up to what was due (`None`: the sum overflowed).
    #[error("split does not balance: due {due_fen} fen, parts sum to {sum_fen:?} fen")]
    Unbalanced {
        /// What was due.
        due_fen: Fen,
        /// What the parts add up to.
        sum_fen: Option<Fen>,
    },
}

/// A request for participation information about a card.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InquiryRequest {
    /// The card's verified claims.
    pub card: CardClaims,
    /// The institution asking.
    pub institution: Institution,
    /// The person's year-to-date accumulators with this payer.
    #[serde(default)]
    pub year_to_date: YearToDate,
}

/// Participation information: what a cashier sees after the scan.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inquiry {
    /// Whether the person is insured with this payer now.
    pub insured: bool,
    /// Insurance types this payer covers for the person.
    pub insurance_types: Vec<String>,
    /// Personal-account balance in fen, where the policy has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_balance_fen: Option<Fen>,
    /// Deductible still to be met this year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deductible_remaining_fen: Option<Fen>,
    /// What the funds may still pay this year before the annual ceiling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling_remaining_fen: Option<Fen>,
    /// Free-form details (payment base, contribution period, ...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// A request to reverse (refund or undo) a settlement this payer took part in.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversalRequest {
    /// The settlement being reversed.
    pub settlement_id: String,
    /// The card's claims as recorded at settlement.
    pub card: CardClaims,
    /// The institution asking.
    pub institution: Institution,
    /// The split this payer answered at settlement.
    pub original: Split,
    /// Why, as given by the institution.
    #[serde(default)]
    pub reason: String,
}

/// A payer's answer to a reversal.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reversal {
    /// Whether the payer accepts the reversal.
    pub accepted: bool,
    /// A short note for the log and the receipt.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Reversal {
    /// The reversal is accepted.
    pub fn accepted() -> Self {
        Self { accepted: true, note: String::new() }
    }
}

/// A plugin's view of its own health.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The state.
    pub status: HealthStatus,
    /// A short note.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Health {
    /// Healthy, nothing to say.
    pub fn ok() -> Self {
        Self { status: HealthStatus::Ok, detail: String::new() }
    }
}

/// Health states.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Serving normally.
    Ok,
    /// Serving, with a problem worth a look.
    Degraded,
    /// Not able to serve.
    Down,
}

#[cfg(test)]
mod tests {
    use super::Decimal4;

    /// A small deterministic generator (no dependency for a unit test).
    fn values(seed: u64, count: usize) -> impl Iterator<Item = i64> {
        let mut state = seed;
        (0..count).map(move |i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Mostly small values with few decimals, some large ones.
            match i % 4 {
                0 => (state % 1_000_000) as i64,
                1 => (state % 10_000) as i64 * Decimal4::SCALE,
                2 => (state % 100_000_000_000) as i64,
                _ => (state % (i64::MAX as u64 / 2)) as i64,
            }
        })
    }

    #[test]
    fn text_and_json_give_back_the_same_decimal() {
        for units in values(7, 20_000) {
            let d = Decimal4::from_units(units).expect("non-negative");
            let text = d.to_string();
            assert_eq!(Decimal4::parse(&text), Some(d), "{text}");
            let json = serde_json::to_string(&d).expect("serializes");
            assert_eq!(serde_json::from_str::<Decimal4>(&json).expect("deserializes"), d, "{json}");
            // Whole values travel as JSON integers, so older plugins (u32 quantities) read them.
            assert_eq!(json.starts_with('"'), d.whole().is_none(), "{json}");
        }
    }

    #[test]
    fn decimals_read_and_write_as_written() {
        for (text, units) in
            [("0.5", 5_000), ("0.05", 500), ("0.0001", 1), ("1.05", 10_500), ("12.3456", 123_456), ("7", 70_000)]
        {
            let d = Decimal4::parse(text).expect(text);
            assert_eq!(d.units(), units, "{text}");
            assert_eq!(d.to_string(), text);
        }
        assert_eq!(super::parse_decimal("12.345678", 6), Some(12_345_678));
        assert_eq!(super::parse_decimal("0.5", 6), Some(500_000));
        assert_eq!(super::parse_decimal("3", 0), Some(3));
        assert_eq!(super::parse_decimal("3.1", 0), None);
    }

    #[test]
    fn the_product_rounds_half_up_to_the_unit() {
        let scale = u128::from(Decimal4::SCALE.unsigned_abs()).pow(2);
        for (a, b) in values(11, 20_000).zip(values(13, 20_000)) {
            let (a, b) = (
                Decimal4::from_units(a % 10_000_000_000).expect("a"),
                Decimal4::from_units(b % 10_000_000_000).expect("b"),
            );
            let product = u128::from(a.units().unsigned_abs()) * u128::from(b.units().unsigned_abs());
            let (quotient, remainder) = (product / scale, product % scale);
            let expected = quotient + u128::from(2 * remainder >= scale);
            assert_eq!(a.times_rounded(b).map(|v| v as u128), Some(expected), "{a} x {b}");
        }
        let half = Decimal4::parse("0.5").expect("0.5");
        assert_eq!(half.times_rounded(Decimal4::parse("2501").expect("2501")), Some(1_251), "1250.5 rounds up");
        assert_eq!(half.times_rounded(Decimal4::parse("2500.9999").expect("p")), Some(1_250), "1250.49995 rounds down");
    }

    #[test]
    fn malformed_decimals_are_refused() {
        for text in [
            "",
            ".",
            "1.",
            ".5",
            "-1",
            "+1",
            "1e3",
            "1.23456",
            "0x10",
            "1 ",
            " 1",
            "1,5",
            "922337203685477.5808",
            "1234567890123456",
        ] {
            assert_eq!(Decimal4::parse(text), None, "{text}");
        }
        for json in ["-1", "1.5", "\"1.23456\"", "null", "true", "18446744073709551615"] {
            assert!(serde_json::from_str::<Decimal4>(json).is_err(), "{json}");
        }
    }
}
