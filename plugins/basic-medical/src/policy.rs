//! The policy: configuration, its validation, and the split of one bill.
//!
//! Every number comes from [`Config`]. Ratios are basis points (1/10000), so all arithmetic is
//! integer; shares are rounded half up to the fen and the cash part takes what is left, so every
//! split balances exactly.

use std::collections::BTreeMap;

use cardgate_sdk::{
    BillLine, BreakdownItem, EncounterKind, Fen, FundPayment, InstitutionLevel, ItemCategory, PluginError,
    SettlementRequest, Split, YearToDate,
};
use serde::Deserialize;

/// 100% in basis points.
pub const FULL_BP: u32 = 10_000;

/// The plugin's configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Fund name on receipts.
    #[serde(default = "default_fund")]
    pub fund: String,
    /// The share of a class B item the patient pays first, before it counts as eligible, in
    /// basis points.
    pub class_b_self_pay_bp: u32,
    /// The schemes this payer runs, keyed by national insurance type code (`"310"`, `"390"`).
    pub schemes: BTreeMap<String, Scheme>,
}

fn default_fund() -> String {
    "basic_pooling".to_owned()
}

/// One insurance scheme (employee or resident basic medical insurance).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    /// Readable name.
    pub name: String,
    /// Yearly deductible: eligible cost the patient bears before the fund pays.
    pub deductible_fen: Fen,
    /// The most the fund pays for one person in a year.
    pub annual_ceiling_fen: Fen,
    /// The share of eligible cost above the deductible the fund pays, by institution level.
    pub ratio_bp: Ratios,
    /// The personal account, where the scheme has one.
    #[serde(default)]
    pub account: Option<AccountPolicy>,
    /// Inpatient stays (an encounter of kind `inpatient`), where they have rules of their own:
    /// a deductible per admission by hospital level instead of the yearly one. Absent: a stay
    /// is settled like any bill.
    #[serde(default)]
    pub inpatient: Option<Inpatient>,
    /// Outpatient pooling (门诊统筹), where it has rules of its own: a ceiling of its own within
    /// the annual one, its own share, and chronic and special diseases. It applies to every bill
    /// that is not an inpatient stay's. Absent: such bills are settled by the scheme's numbers.
    #[serde(default)]
    pub outpatient: Option<Outpatient>,
}

/// How a scheme's outpatient pooling settles.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outpatient {
    /// The most the funds pay for one person's outpatient care in a year (counted in the
    /// annual ceiling too).
    pub annual_ceiling_fen: Fen,
    /// Its share above the yearly deductible, by level; absent: the scheme's `ratio_bp`.
    #[serde(default)]
    pub ratio_bp: Option<Ratios>,
    /// Outpatient chronic and special diseases (门诊慢特病): visits of these medical types are
    /// paid without the yearly deductible at their own share, within the outpatient ceiling.
    #[serde(default)]
    pub chronic: Option<Chronic>,
}

/// The rules of outpatient chronic and special diseases.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chronic {
    /// The national medical types (`med_type`) they cover, for example `["14"]`.
    pub med_types: Vec<String>,
    /// Their share, by level.
    pub ratio_bp: Ratios,
}

/// How a scheme settles an inpatient stay.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inpatient {
    /// The deductible of one stay (起付线), by hospital level: eligible cost the patient bears
    /// once per admission, over the stay's interim and final settlements together. It does
    /// not count toward the yearly (outpatient) deductible.
    pub deductible_fen: Levels,
    /// The fund's share above it, by hospital level; absent: the scheme's `ratio_bp`.
    #[serde(default)]
    pub ratio_bp: Option<Ratios>,
}

/// An amount by hospital level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Levels {
    /// Grade 1 hospitals.
    pub primary: Fen,
    /// Grade 2 hospitals.
    pub secondary: Fen,
    /// Grade 3 hospitals.
    pub tertiary: Fen,
}

impl Levels {
    /// The amount for a hospital level; `None` for a pharmacy (no stays) or a level unknown.
    pub fn for_level(&self, level: InstitutionLevel) -> Option<Fen> {
        match level {
            InstitutionLevel::Primary => Some(self.primary),
            InstitutionLevel::Secondary => Some(self.secondary),
            InstitutionLevel::Tertiary => Some(self.tertiary),
            _ => None,
        }
    }
}

/// Reimbursement ratios by institution level, in basis points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ratios {
    /// Grade 1 institutions.
    pub primary: u32,
    /// Grade 2 institutions.
    pub secondary: u32,
    /// Grade 3 institutions.
    pub tertiary: u32,
    /// Designated pharmacies.
    pub pharmacy: u32,
}

impl Ratios {
    /// The ratio for an institution level; `None` for a level this policy does not know.
    pub fn for_level(&self, level: InstitutionLevel) -> Option<u32> {
        match level {
            InstitutionLevel::Primary => Some(self.primary),
            InstitutionLevel::Secondary => Some(self.secondary),
            InstitutionLevel::Tertiary => Some(self.tertiary),
            InstitutionLevel::Pharmacy => Some(self.pharmacy),
            _ => None,
        }
    }

    fn all(&self) -> [(&'static str, u32); 4] {
        [
            ("primary", self.primary),
            ("secondary", self.secondary),
            ("tertiary", self.tertiary),
            ("pharmacy", self.pharmacy),
        ]
    }
}

/// The personal account's rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountPolicy {
    /// What the account is credited with each year.
    pub annual_credit_fen: Fen,
    /// Whether the account may also pay class C (not covered) items.
    #[serde(default)]
    pub covers_class_c: bool,
    /// Family mutual aid (家庭共济): the account pays for bound family members who present the
    /// holder's card. Absent: it does not.
    #[serde(default)]
    pub mutual_aid: Option<MutualAid>,
}

/// What the personal account pays for a family member (the national `acct_mulaid_pay`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutualAid {
    /// The relations it pays for (`spouse`, `parent`, `child`, ...); empty: any.
    #[serde(default)]
    pub relations: Vec<String>,
    /// The most it pays for one bill; absent: up to the balance.
    #[serde(default)]
    pub per_settlement_limit_fen: Option<Fen>,
    /// Whether it may pay class C items (and amounts above a price cap) too.
    #[serde(default)]
    pub covers_class_c: bool,
}

impl Config {
    /// Checks every number, reporting all problems at once with their key paths.
    pub fn validate(&self) -> Result<(), PluginError> {
        let mut problems = Vec::new();
        if self.fund.is_empty() {
            problems.push("fund: must not be empty".to_owned());
        }
        if self.class_b_self_pay_bp > FULL_BP {
            problems.push(format!("class_b_self_pay_bp: {} is above {FULL_BP}", self.class_b_self_pay_bp));
        }
        if self.schemes.is_empty() {
            problems.push("schemes: at least one scheme is required".to_owned());
        }
        for (code, scheme) in &self.schemes {
            scheme.validate(&format!("schemes.{code}"), &mut problems);
        }
        if problems.is_empty() { Ok(()) } else { Err(PluginError::invalid_config(problems.join("; "))) }
    }
}

impl Scheme {
    fn validate(&self, path: &str, problems: &mut Vec<String>) {
        for (key, value) in [("deductible_fen", self.deductible_fen), ("annual_ceiling_fen", self.annual_ceiling_fen)] {
            if value < 0 {
                problems.push(format!("{path}.{key}: {value} is negative"));
            }
        }
        for (level, bp) in self.ratio_bp.all() {
            if bp > FULL_BP {
                problems.push(format!("{path}.ratio_bp.{level}: {bp} is above {FULL_BP}"));
            }
        }
        if let Some(account) = &self.account
            && account.annual_credit_fen < 0
        {
            problems.push(format!("{path}.account.annual_credit_fen: {} is negative", account.annual_credit_fen));
        }
        if let Some(limit) = self.account.as_ref().and_then(|a| a.mutual_aid.as_ref()?.per_settlement_limit_fen)
            && limit < 0
        {
            problems.push(format!("{path}.account.mutual_aid.per_settlement_limit_fen: {limit} is negative"));
        }
        if let Some(outpatient) = &self.outpatient {
            if outpatient.annual_ceiling_fen < 0 {
                problems.push(format!(
                    "{path}.outpatient.annual_ceiling_fen: {} is negative",
                    outpatient.annual_ceiling_fen
                ));
            }
            let chronic = outpatient.chronic.as_ref().map(|c| ("chronic.ratio_bp", &c.ratio_bp));
            for (key, ratios) in outpatient.ratio_bp.as_ref().map(|r| ("ratio_bp", r)).into_iter().chain(chronic) {
                for (level, bp) in ratios.all() {
                    if bp > FULL_BP {
                        problems.push(format!("{path}.outpatient.{key}.{level}: {bp} is above {FULL_BP}"));
                    }
                }
            }
            if outpatient.chronic.as_ref().is_some_and(|c| c.med_types.is_empty()) {
                problems.push(format!("{path}.outpatient.chronic.med_types: at least one"));
            }
        }
        if let Some(inpatient) = &self.inpatient {
            let d = inpatient.deductible_fen;
            for (level, value) in [("primary", d.primary), ("secondary", d.secondary), ("tertiary", d.tertiary)] {
                if value < 0 {
                    problems.push(format!("{path}.inpatient.deductible_fen.{level}: {value} is negative"));
                }
            }
            for (level, bp) in inpatient.ratio_bp.iter().flat_map(Ratios::all) {
                if bp > FULL_BP {
                    problems.push(format!("{path}.inpatient.ratio_bp.{level}: {bp} is above {FULL_BP}"));
                }
            }
        }
    }
}

/// `amount * bp / 10000`, rounded half up. `amount` must be non-negative.
pub fn share(amount: Fen, bp: u32) -> Fen {
    let exact = i128::from(amount) * i128::from(bp);
    // At most `amount`, because `bp <= FULL_BP`, so it fits back in an i64.
    ((exact + i128::from(FULL_BP / 2)) / i128::from(FULL_BP)) as Fen
}

/// How a bill's lines fall into the policy's classes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Classified {
    /// The sum of all lines.
    pub total: Fen,
    /// Cost eligible for reimbursement (class A, and class B after the first self-pay).
    pub eligible: Fen,
    /// Class A cost.
    pub class_a: Fen,
    /// The patient's first self-pay share of class B items.
    pub class_b_first_self_pay: Fen,
    /// Class C cost (not covered).
    pub class_c: Fen,
    /// The part of lines above their catalogue price cap (`price_cap_fen × quantity`): the
    /// patient's, not covered.
    pub over_price_cap: Fen,
}

/// Sorts the lines into classes, refusing negative or overflowing amounts. Where a line carries
/// the catalogue's entry, the part above its price cap is the patient's and a class B item's
/// first self-pay share is the catalogue's for that item; otherwise `class_b_self_pay_bp`.
pub fn classify(lines: &[BillLine], class_b_self_pay_bp: u32) -> Result<Classified, PluginError> {
    let mut c = Classified::default();
    for (index, line) in lines.iter().enumerate() {
        let amount = line.amount_fen;
        if amount < 0 {
            return Err(PluginError::invalid_request(format!("lines[{index}].amount_fen is negative")));
        }
        let overflow = || PluginError::invalid_request("bill total overflows");
        c.total = c.total.checked_add(amount).ok_or_else(overflow)?;
        let entry = line.catalogue.as_ref();
        let over_cap = match entry.and_then(|e| e.price_cap_fen) {
            Some(cap) if line.category != ItemCategory::ClassC => {
                let cap = cardgate_sdk::Decimal4::from_whole(cap.max(0)).ok_or_else(overflow)?;
                let allowed = cap.times_rounded(line.quantity).ok_or_else(overflow)?;
                (amount - allowed).max(0)
            }
            _ => 0,
        };
        c.over_price_cap += over_cap;
        let amount = amount - over_cap;
        let class_b_bp = entry.and_then(|e| e.self_pay_bp).unwrap_or(class_b_self_pay_bp).min(FULL_BP);
        match line.category {
            ItemCategory::ClassA => {
                c.class_a += amount;
                c.eligible += amount;
            }
            ItemCategory::ClassB => {
                let first = share(amount, class_b_bp);
                c.class_b_first_self_pay += first;
                c.eligible += amount - first;
            }
            ItemCategory::ClassC => c.class_c += amount,
            _ => {
                return Err(PluginError::not_covered(format!(
                    "lines[{index}] has a category this policy does not know"
                )));
            }
        }
    }
    Ok(c)
}

/// The request's lines classified, checked against its total, and what is due (within it).
fn checked_bill(config: &Config, request: &SettlementRequest) -> Result<(Classified, Fen), PluginError> {
    let bill = classify(&request.lines, config.class_b_self_pay_bp)?;
    if bill.total != request.total_fen {
        return Err(PluginError::invalid_request(format!(
            "lines sum to {} fen but total_fen is {}",
            bill.total, request.total_fen
        )));
    }
    let due = request.due_fen;
    if !(0..=bill.total).contains(&due) {
        return Err(PluginError::invalid_request(format!("due_fen {due} is outside 0..={}", bill.total)));
    }
    Ok((bill, due))
}

/// Splits one bill under one scheme. A bill presented by a family member (a delegate) is paid
/// by the holder's account alone, as [`family_split`] says.
pub fn split(config: &Config, scheme: &Scheme, request: &SettlementRequest) -> Result<Split, PluginError> {
    if let Some(delegate) = &request.card.delegate {
        return family_split(config, scheme, request, &delegate.relation);
    }
    let level = request.institution.level;
    let not_covered = || PluginError::not_covered(format!("institution level {level:?} is not covered"));
    let (bill, due) = checked_bill(config, request)?;
    let ytd = &request.year_to_date;
    let stay = request
        .encounter
        .as_ref()
        .filter(|e| e.kind == EncounterKind::Inpatient)
        .and_then(|e| Some((e, scheme.inpatient.as_ref()?)));
    let eligible = bill.eligible.min(due);

    // Eligible cost first meets what is left of the deductible — a stay's own (per admission,
    // less what the stay's earlier settlements met), none for a chronic disease's visit, or
    // the yearly one; the fund pays its ratio of the rest, up to what is left under the annual
    // ceiling (and the outpatient pooling's), and never more than is due.
    let inpatient_bill = request.encounter.as_ref().is_some_and(|e| e.kind == EncounterKind::Inpatient);
    let outpatient = scheme.outpatient.as_ref().filter(|_| !inpatient_bill);
    let med_type = request.encounter.as_ref().map(|e| e.med_type.as_str());
    let chronic = outpatient
        .and_then(|o| o.chronic.as_ref())
        .filter(|c| med_type.is_some_and(|m| c.med_types.iter().any(|t| t == m)));
    let (ratio, deductible, yearly_deductible) = match stay {
        Some((encounter, inpatient)) => {
            let ratio =
                inpatient.ratio_bp.as_ref().unwrap_or(&scheme.ratio_bp).for_level(level).ok_or_else(not_covered)?;
            let per_stay = inpatient.deductible_fen.for_level(level).ok_or_else(not_covered)?;
            let met = classify(&encounter.settled_lines, config.class_b_self_pay_bp)?.eligible;
            let deductible = eligible.min(per_stay.saturating_sub(met).max(0));
            (ratio, deductible, 0)
        }
        None if chronic.is_some() => {
            (chronic.map(|c| c.ratio_bp).unwrap_or(scheme.ratio_bp).for_level(level).ok_or_else(not_covered)?, 0, 0)
        }
        None => {
            let ratios = outpatient.and_then(|o| o.ratio_bp.as_ref()).unwrap_or(&scheme.ratio_bp);
            let ratio = ratios.for_level(level).ok_or_else(not_covered)?;
            let deductible = eligible.min(scheme.deductible_fen.saturating_sub(ytd.deductible_fen).max(0));
            (ratio, deductible, deductible)
        }
    };
    let coinsured = eligible - deductible;
    let by_ratio = share(coinsured, ratio);
    let outpatient_left =
        outpatient.map_or(Fen::MAX, |o| o.annual_ceiling_fen.saturating_sub(ytd.outpatient_fund_paid_fen).max(0));
    let fund = by_ratio.min(scheme.annual_ceiling_fen.saturating_sub(ytd.fund_paid_fen).max(0)).min(outpatient_left);
    let patient = due - fund;
    let eligible_self_pay = eligible - fund;

    let account = account_payment(scheme, request, patient, bill.class_c + bill.over_price_cap);
    let cash = patient - account;
    let breakdown = [
        ("class_a", bill.class_a, "class A items, fully eligible"),
        ("class_b_first_self_pay", bill.class_b_first_self_pay, "first self-pay share of class B items"),
        ("class_c_self_pay", bill.class_c, "class C items, not covered"),
        ("over_price_cap", bill.over_price_cap, "above the catalogue's price cap, not covered"),
        (
            if stay.is_some() { "stay_deductible" } else { "deductible" },
            deductible,
            if stay.is_some() { "toward this stay's deductible" } else { "toward the yearly deductible" },
        ),
        ("co_insurance", coinsured - by_ratio, "patient's share above the deductible"),
        ("above_ceiling", by_ratio - fund, "beyond the annual ceiling, or the outpatient pooling's"),
    ];
    Ok(Split {
        funds: vec![FundPayment { fund: config.fund.clone(), amount_fen: fund }],
        account_pay_fen: account,
        cash_pay_fen: cash,
        // The account pays in-policy self-pay first, so what stays in cash is what it left; the
        // person bore all of it either way (the account is their own money).
        eligible_self_pay_fen: (eligible_self_pay - account).max(0),
        eligible_borne_fen: eligible_self_pay,
        year_to_date_delta: YearToDate {
            year: ytd.year,
            deductible_fen: yearly_deductible,
            fund_paid_fen: fund,
            eligible_fen: eligible,
            account_paid_fen: account,
            eligible_self_pay_fen: eligible_self_pay,
            outpatient_fund_paid_fen: if inpatient_bill { 0 } else { fund },
        },
        breakdown: breakdown
            .into_iter()
            .filter(|(_, amount, _)| *amount != 0)
            .map(|(item, amount_fen, note)| BreakdownItem { item: item.to_owned(), amount_fen, note: note.to_owned() })
            .collect(),
    })
}

/// What the personal account pays of the patient's share: up to its balance, and the uncovered
/// part (class C items, amounts above a price cap) only where the scheme allows.
fn account_payment(scheme: &Scheme, request: &SettlementRequest, patient: Fen, uncovered: Fen) -> Fen {
    let Some(policy) = scheme.account.as_ref().filter(|_| request.use_account) else { return 0 };
    let payable = if policy.covers_class_c { patient } else { (patient - uncovered).max(0) };
    payable.min(account_balance(policy, &request.year_to_date))
}

/// A family member's bill on the holder's card (家庭共济, the national `acct_mulaid_pay`): the
/// holder's personal account pays the covered part of what is due, up to its balance and the
/// per-bill limit, and the rest is cash. The holder's pooling, deductible and ceiling are the
/// holder's own and do not move (the patient's own insurance settles its pooling apart); only
/// the account's year-to-date payments do. A scheme without mutual aid, or a relation it does
/// not cover, answers `not_insured`.
fn family_split(
    config: &Config,
    scheme: &Scheme,
    request: &SettlementRequest,
    relation: &str,
) -> Result<Split, PluginError> {
    let (account, aid) =
        scheme.account.as_ref().and_then(|a| Some((a, a.mutual_aid.as_ref()?))).ok_or_else(|| {
            PluginError::not_insured("this scheme's personal account does not pay for family members")
        })?;
    if !aid.relations.is_empty() && !aid.relations.iter().any(|r| r == relation) {
        return Err(PluginError::not_insured(format!("the personal account does not pay for a {relation}")));
    }
    let (bill, due) = checked_bill(config, request)?;
    let uncovered = if aid.covers_class_c { 0 } else { bill.class_c + bill.over_price_cap };
    let paid = if request.use_account {
        (due - uncovered)
            .max(0)
            .min(account_balance(account, &request.year_to_date))
            .min(aid.per_settlement_limit_fen.unwrap_or(Fen::MAX))
    } else {
        0
    };
    Ok(Split {
        funds: vec![FundPayment { fund: config.fund.clone(), amount_fen: 0 }],
        account_pay_fen: paid,
        cash_pay_fen: due - paid,
        eligible_self_pay_fen: 0,
        eligible_borne_fen: 0,
        year_to_date_delta: YearToDate {
            year: request.year_to_date.year,
            account_paid_fen: paid,
            ..YearToDate::default()
        },
        breakdown: vec![BreakdownItem {
            item: "family_mutual_aid".to_owned(),
            amount_fen: paid,
            note: format!("paid from the holder's personal account for a family member ({relation})"),
        }],
    })
}

/// The account balance left this year.
pub fn account_balance(policy: &AccountPolicy, ytd: &YearToDate) -> Fen {
    policy.annual_credit_fen.saturating_sub(ytd.account_paid_fen).max(0)
}
