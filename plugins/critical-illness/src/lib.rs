//! Critical-illness insurance (大病保险) as a cardgate plugin.
//!
//! It follows basic medical insurance in a payer chain. Of the in-policy self-pay the earlier
//! payers left to the patient (`eligible_self_pay_fen`), the part that lies above the annual
//! threshold — counting what the person already bore this year — is paid at banded ratios, up
//! to an annual ceiling. Every number comes from the configuration; see `config.example.toml`.

#![forbid(unsafe_code)]

use cardgate_sdk::{BreakdownItem, Fen, FundPayment, Plugin, PluginError, SettlementRequest, Split, YearToDate};
use serde::Deserialize;

/// 100% in basis points.
const FULL_BP: u32 = 10_000;

/// The plugin's configuration section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Fund name on receipts.
    #[serde(default = "default_fund")]
    pub fund: String,
    /// Insurance types covered.
    pub insurance_types: Vec<String>,
    /// In-policy self-pay borne in a year before this insurance pays.
    pub annual_threshold_fen: Fen,
    /// The most paid for one person in a year.
    pub annual_ceiling_fen: Fen,
    /// Ratios by band above the threshold, lowest first; the last band has no upper bound.
    pub bands: Vec<Band>,
}

fn default_fund() -> String {
    "critical_illness".to_owned()
}

/// One band of the year's in-policy self-pay above the threshold.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    /// Upper bound of the band (amount above the threshold); absent on the last band.
    pub up_to_fen: Option<Fen>,
    /// Share paid in this band, in basis points.
    pub ratio_bp: u32,
}

/// The plugin.
#[derive(Debug)]
pub struct CriticalIllness {
    config: Config,
}

impl Config {
    /// Checks every number, reporting all problems with their key paths.
    pub fn validate(&self) -> Result<(), PluginError> {
        let mut problems = Vec::new();
        if self.insurance_types.is_empty() {
            problems.push("insurance_types: at least one is required".to_owned());
        }
        for (key, value) in
            [("annual_threshold_fen", self.annual_threshold_fen), ("annual_ceiling_fen", self.annual_ceiling_fen)]
        {
            if value < 0 {
                problems.push(format!("{key}: {value} is negative"));
            }
        }
        if self.bands.is_empty() {
            problems.push("bands: at least one band is required".to_owned());
        }
        let mut previous = 0;
        for (i, band) in self.bands.iter().enumerate() {
            if band.ratio_bp > FULL_BP {
                problems.push(format!("bands[{i}].ratio_bp: {} is above {FULL_BP}", band.ratio_bp));
            }
            match band.up_to_fen {
                Some(up_to) if up_to <= previous => {
                    problems.push(format!("bands[{i}].up_to_fen: must rise above {previous}"));
                }
                Some(up_to) => previous = up_to,
                None if i + 1 != self.bands.len() => {
                    problems.push(format!("bands[{i}].up_to_fen: only the last band may be unbounded"));
                }
                None => {}
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(PluginError::invalid_config(problems.join("; "))) }
    }
}

/// `amount * bp / 10000`, rounded half up; `amount` non-negative.
fn share(amount: Fen, bp: u32) -> Fen {
    ((i128::from(amount) * i128::from(bp) + i128::from(FULL_BP / 2)) / i128::from(FULL_BP)) as Fen
}

impl CriticalIllness {
    /// What the bands pay for self-pay lying between `from` and `to` above the threshold.
    fn banded(&self, from: Fen, to: Fen) -> Fen {
        let mut paid = 0;
        let mut lower = 0;
        for band in &self.config.bands {
            let upper = band.up_to_fen.unwrap_or(Fen::MAX);
            let (a, b) = (from.max(lower), to.min(upper));
            if b > a {
                paid += share(b - a, band.ratio_bp);
            }
            lower = upper;
        }
        paid
    }
}

impl Plugin for CriticalIllness {
    type Config = Config;
    // Answers from the request and the configuration alone: nothing to undo if a call is
    // repeated or forgotten.
    const EFFECT_FREE: bool = true;

    fn new(config: Config) -> Result<Self, PluginError> {
        config.validate()?;
        Ok(Self { config })
    }

    fn quote(&self, request: &SettlementRequest) -> Result<Split, PluginError> {
        if !self.config.insurance_types.contains(&request.insurance_type) {
            return Err(PluginError::not_insured(format!("insurance type {} is not covered", request.insurance_type)));
        }
        // A family member's bill on the holder's card is the holder's account's business
        // (family mutual aid); this insurance is the holder's, not the patient's.
        if request.card.delegate.is_some() {
            return Err(PluginError::not_insured(
                "a family member's bill: the holder's critical-illness cover does not apply",
            ));
        }
        let due = request.due_fen;
        if due < 0 {
            return Err(PluginError::invalid_request("due_fen is negative"));
        }
        // The in-policy self-pay the earlier payer left the person: all of it counts toward the
        // threshold and the bands, the part the personal account paid included (the account
        // is the person's own money); the fund pays at most what is still due in cash.
        let prior = request.prior.last();
        let in_cash = prior.map_or(0, |p| p.eligible_self_pay_fen).clamp(0, due);
        let eligible_now = prior.map_or(0, |p| p.eligible_borne_fen).max(in_cash);
        let ytd = &request.year_to_date;
        let threshold = self.config.annual_threshold_fen;
        let before = ytd.eligible_self_pay_fen.max(0);
        let after = before.saturating_add(eligible_now);
        let by_bands = self.banded((before - threshold).max(0), (after - threshold).max(0));
        let ceiling_left = self.config.annual_ceiling_fen.saturating_sub(ytd.fund_paid_fen).max(0);
        let under_ceiling = by_bands.min(ceiling_left);
        let fund = under_ceiling.min(due);
        let below_threshold = eligible_now.min((threshold - before).max(0));
        let breakdown = [
            ("below_threshold", below_threshold, "in-policy self-pay below the annual threshold"),
            ("co_insurance", eligible_now - below_threshold - by_bands, "patient's share above the threshold"),
            ("above_ceiling", by_bands - under_ceiling, "beyond the annual ceiling"),
            ("paid_by_account", under_ceiling - fund, "already paid from the personal account"),
        ];
        Ok(Split {
            funds: vec![FundPayment { fund: self.config.fund.clone(), amount_fen: fund }],
            account_pay_fen: 0,
            cash_pay_fen: due - fund,
            eligible_self_pay_fen: (in_cash - fund).max(0),
            eligible_borne_fen: (eligible_now - fund).max(0),
            year_to_date_delta: YearToDate {
                year: ytd.year,
                fund_paid_fen: fund,
                eligible_self_pay_fen: eligible_now,
                ..YearToDate::default()
            },
            breakdown: breakdown
                .into_iter()
                .filter(|(_, amount, _)| *amount > 0)
                .map(|(item, amount_fen, note)| BreakdownItem { item: item.into(), amount_fen, note: note.into() })
                .collect(),
        })
    }
}

cardgate_sdk::export_plugin!(CriticalIllness);
