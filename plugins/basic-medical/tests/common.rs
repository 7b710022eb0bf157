//! Request builders shared by the plugin's tests.

#![allow(dead_code, unreachable_pub)]

use basic_medical::policy::Config;
use cardgate_sdk::{
    BillLine, CardClaims, Fen, Institution, InstitutionLevel, ItemCategory, SettlementRequest, YearToDate,
};

/// The example configuration shipped next to the plugin.
pub fn example_config() -> Config {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .expect("config.example.toml");
    toml::from_str(&text).expect("example config parses")
}

pub fn line(category: ItemCategory, amount_fen: Fen) -> BillLine {
    BillLine {
        code: format!("{category:?}-{amount_fen}"),
        name: "item".into(),
        category,
        quantity: cardgate_sdk::Decimal4::ONE,
        unit_price_fen: cardgate_sdk::Decimal4::from_whole(amount_fen).unwrap_or_default(),
        amount_fen,
        catalogue: None,
    }
}

pub fn request(
    insurance_type: &str,
    level: InstitutionLevel,
    lines: Vec<BillLine>,
    ytd: YearToDate,
) -> SettlementRequest {
    let total_fen = lines.iter().map(|l| l.amount_fen).sum();
    SettlementRequest {
        settlement_id: "s-1".into(),
        card: CardClaims {
            card_id: "C1".into(),
            holder_name: "Test Holder".into(),
            insured_region: "110105".into(),
            insurance_types: vec![insurance_type.into()],
            delegate: None,
        },
        institution: Institution { id: "H1".into(), level, region: "110105".into() },
        insurance_type: insurance_type.into(),
        lines,
        total_fen,
        due_fen: total_fen,
        prior: vec![],
        year_to_date: ytd,
        use_account: true,
        encounter: None,
    }
}
