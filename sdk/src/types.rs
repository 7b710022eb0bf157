//! The messages that cross the plugin boundary: what the gateway hands a plugin and what the
//! plugin answers. All money is integer fen (`i64`); nothing here is floating point.
//!
//! Every type is plain data with serde derives: on the wire it is JSON, so a later minor ABI
//! version can add optional fields without breaking older plugins (unknown fields are ignored,
//! missing optional fields take their defaults).

use serde::{Deserialize, Serialize};

/// Money in fen (1 yuan = 100 fen).
pub type Fen = i64;

/// The verified claims of the e-card that was scanned.
///
/// The gateway has already checked the token's signature, time window, revocation and replay
/// before a plugin sees these.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillLine {
    /// Catalogue code of the item.
    pub code: String,
    /// Readable name of the item.
    pub name: String,
    /// Policy class: the catalogue's where the gateway has a catalogue (see `catalogue`),
    /// otherwise as the institution asserted it.
    pub category: ItemCategory,
    /// Number of units.
    pub quantity: u32,
    /// Price of one unit, in fen.
    pub unit_price_fen: Fen,
    /// The line's amount in fen. The gateway checks it is non-negative and that the lines sum
    /// to the bill's total.
    pub amount_fen: Fen,
    /// The catalogue's entry for `code`, where the gateway has a catalogue and the code is in
    /// it (a code that is not is class C, or refused, as the gateway is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalogue: Option<CatalogueEntry>,
}

/// The person's year-to-date accumulators for the payer being called, kept by the gateway's
/// ledger and fed back to the plugin on every call, so plugins hold no state of their own.
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
}

impl YearToDate {
    /// Adds what one settlement changed.
    pub fn apply(&mut self, delta: &YearToDate) {
        self.deductible_fen += delta.deductible_fen;
        self.fund_paid_fen += delta.fund_paid_fen;
        self.eligible_fen += delta.eligible_fen;
        self.account_paid_fen += delta.account_paid_fen;
        self.eligible_self_pay_fen += delta.eligible_self_pay_fen;
    }
}

/// What an earlier payer in the chain already covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorPayment {
    /// The earlier payer's name (its plugin name).
    pub payer: String,
    /// What its funds paid.
    pub fund_pay_fen: Fen,
    /// What the personal account paid through it.
    pub account_pay_fen: Fen,
    /// The in-policy self-pay it left to the patient.
    pub eligible_self_pay_fen: Fen,
}

/// A request to split a bill: used by `quote` (nothing moves) and `settle` (money moves).
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
}

fn default_true() -> bool {
    true
}

/// What one fund pays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FundPayment {
    /// The fund's name, for example `"basic_pooling"`.
    pub fund: String,
    /// Amount in fen, never negative.
    pub amount_fen: Fen,
}

/// One readable line of how a split was reached.
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
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Split {
    /// What this payer's funds pay, fund by fund.
    pub funds: Vec<FundPayment>,
    /// What the personal account pays.
    pub account_pay_fen: Fen,
    /// What is left for the patient (or the next payer in the chain).
    pub cash_pay_fen: Fen,
    /// The part of `cash_pay_fen` that is in-policy self-pay, which a later payer (for example
    /// critical-illness insurance) may consider.
    #[serde(default)]
    pub eligible_self_pay_fen: Fen,
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
