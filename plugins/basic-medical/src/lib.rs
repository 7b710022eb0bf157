//! Regional basic medical insurance as a cardgate plugin.
//!
//! Class A items are fully eligible, class B items after a first self-pay share, class C items
//! are self-pay. Eligible cost first meets the yearly deductible; the pooling fund then pays a
//! ratio set by institution level and insurance type, up to an annual ceiling; the personal
//! account (employee scheme) pays what the policy allows of the rest; the patient pays the
//! remainder in cash. Every number comes from the plugin's configuration; see `README.md`.
//!
//! # Layout
//! - [`policy`]: configuration, validation and the split of one bill.
//! - this file: the [`cardgate_sdk::Plugin`] implementation and its export.

#![forbid(unsafe_code)]

pub mod policy;

use cardgate_sdk::{Inquiry, InquiryRequest, Plugin, PluginError, SettlementRequest, Split, log, serde_json};

use crate::policy::{Config, Scheme, account_balance};

/// The plugin: its validated configuration.
#[derive(Debug)]
pub struct BasicMedical {
    config: Config,
}

impl BasicMedical {
    /// The scheme for an insurance type the card holds, if this payer runs it.
    fn scheme(&self, card_types: &[String], insurance_type: &str) -> Result<&Scheme, PluginError> {
        if !card_types.iter().any(|t| t == insurance_type) {
            return Err(PluginError::not_insured(format!("card does not hold insurance type {insurance_type}")));
        }
        self.config.schemes.get(insurance_type).ok_or_else(|| {
            PluginError::not_insured(format!("insurance type {insurance_type} is not run by this payer"))
        })
    }
}

impl Plugin for BasicMedical {
    type Config = Config;
    // Answers from the request and the configuration alone: nothing to undo if a call is
    // repeated or forgotten.
    const EFFECT_FREE: bool = true;

    fn new(config: Config) -> Result<Self, PluginError> {
        config.validate()?;
        log::info!("basic-medical policy loaded with {} schemes", config.schemes.len());
        Ok(Self { config })
    }

    fn inquire(&self, request: &InquiryRequest) -> Result<Inquiry, PluginError> {
        let types: Vec<String> =
            request.card.insurance_types.iter().filter(|t| self.config.schemes.contains_key(*t)).cloned().collect();
        let Some(scheme) = types.first().and_then(|t| self.config.schemes.get(t)) else {
            return Ok(Inquiry {
                insured: false,
                insurance_types: types,
                account_balance_fen: None,
                deductible_remaining_fen: None,
                ceiling_remaining_fen: None,
                details: Default::default(),
            });
        };
        let ytd = &request.year_to_date;
        let mut details = serde_json::Map::new();
        details.insert("scheme".into(), scheme.name.clone().into());
        Ok(Inquiry {
            insured: true,
            account_balance_fen: scheme.account.as_ref().map(|a| account_balance(a, ytd)),
            deductible_remaining_fen: Some(scheme.deductible_fen.saturating_sub(ytd.deductible_fen).max(0)),
            ceiling_remaining_fen: Some(scheme.annual_ceiling_fen.saturating_sub(ytd.fund_paid_fen).max(0)),
            insurance_types: types,
            details,
        })
    }

    fn quote(&self, request: &SettlementRequest) -> Result<Split, PluginError> {
        let scheme = self.scheme(&request.card.insurance_types, &request.insurance_type)?;
        policy::split(&self.config, scheme, request)
    }
}

cardgate_sdk::export_plugin!(BasicMedical);
