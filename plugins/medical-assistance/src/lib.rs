//! Medical assistance (医疗救助) for low-income patients: the last payer of a chain.
//!
//! Made with `cardgate plugin new` and written only against the public SDK and its test kit.
//!
//! It pays `share_bp` (basis points) of the in-policy self-pay the earlier payers in the chain
//! left to the patient — or of what is due, when it is the first payer — for the insurance
//! types and (optionally) the card ids its configuration lists, up to `annual_ceiling_fen` a
//! year. Change `quote` to your policy; keep every number in `Config`.

#![forbid(unsafe_code)]

use cardgate_sdk::{BreakdownItem, Fen, FundPayment, Plugin, PluginError, SettlementRequest, Split, YearToDate};
use serde::Deserialize;

/// The plugin's section of the gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Fund name on receipts.
    pub fund: String,
    /// Insurance types this payer covers.
    pub insurance_types: Vec<String>,
    /// Card ids this payer covers; empty: every card of those types.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Share of the remaining in-policy self-pay paid, in basis points (1/10000).
    pub share_bp: u32,
    /// The most paid for one person in a year.
    pub annual_ceiling_fen: Fen,
}

/// The plugin: its validated configuration.
#[derive(Debug)]
pub struct Policy {
    config: Config,
}

impl Plugin for Policy {
    type Config = Config;
    // Answers from the request and the configuration alone: nothing to undo if a call is
    // repeated or forgotten.
    const EFFECT_FREE: bool = true;

    fn new(config: Config) -> Result<Self, PluginError> {
        let mut problems = Vec::new();
        if config.share_bp > 10_000 {
            problems.push(format!("share_bp: {} is above 10000", config.share_bp));
        }
        if config.annual_ceiling_fen < 0 {
            problems.push("annual_ceiling_fen: must not be negative".to_owned());
        }
        if config.insurance_types.is_empty() {
            problems.push("insurance_types: at least one is required".to_owned());
        }
        if problems.is_empty() { Ok(Self { config }) } else { Err(PluginError::invalid_config(problems.join("; "))) }
    }

    fn quote(&self, request: &SettlementRequest) -> Result<Split, PluginError> {
        let due = request.due_fen;
        // A card this payer does not assist is not a refusal: the gateway skips the payer.
        if !self.config.insurance_types.contains(&request.insurance_type) {
            return Err(PluginError::not_insured(format!("insurance type {} is not assisted", request.insurance_type)));
        }
        if !(self.config.recipients.is_empty() || self.config.recipients.contains(&request.card.card_id)) {
            return Err(PluginError::not_insured("not a registered recipient of medical assistance"));
        }
        if request.card.delegate.is_some() {
            return Err(PluginError::not_insured("a family member's bill: the holder's assistance does not apply"));
        }
        // What counts: the in-policy self-pay the previous payer left, or what is due.
        let base = match request.prior.last() {
            Some(previous) => previous.eligible_self_pay_fen.clamp(0, due),
            None => due,
        };
        let borne = request.prior.last().map_or(due, |p| p.eligible_borne_fen.max(p.eligible_self_pay_fen));
        let by_share = share(base, self.config.share_bp);
        let left = self.config.annual_ceiling_fen.saturating_sub(request.year_to_date.fund_paid_fen).max(0);
        let fund = by_share.min(left).min(due);
        Ok(Split {
            funds: vec![FundPayment { fund: self.config.fund.clone(), amount_fen: fund }],
            account_pay_fen: 0,
            cash_pay_fen: due - fund,
            eligible_self_pay_fen: (base - fund).max(0),
            // What the person still bears in-policy, the personal account's part included.
            eligible_borne_fen: (borne - fund).max(0),
            year_to_date_delta: YearToDate {
                year: request.year_to_date.year,
                fund_paid_fen: fund,
                ..YearToDate::default()
            },
            breakdown: vec![BreakdownItem { item: "assistance".into(), amount_fen: fund, note: String::new() }],
        })
    }
}

/// `amount * bp / 10000`, rounded half up; `amount` non-negative.
fn share(amount: Fen, bp: u32) -> Fen {
    ((i128::from(amount) * i128::from(bp) + 5_000) / 10_000) as Fen
}

cardgate_sdk::export_plugin!(Policy);
