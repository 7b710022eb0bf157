//! Worked examples of `README.md` with `config.example.toml`, and the balance property.

use cardgate_sdk::{CardClaims, Institution, InstitutionLevel, Plugin, PriorPayment, SettlementRequest, YearToDate};
use critical_illness::{Config, CriticalIllness};
use proptest::prelude::*;

fn plugin() -> CriticalIllness {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).expect("config");
    CriticalIllness::new(toml::from_str::<Config>(&text).expect("parses")).expect("valid")
}

/// A request after basic medical insurance left `due` to the patient, `eligible` of it in-policy.
fn after_basic(due: i64, eligible: i64, ytd: YearToDate) -> SettlementRequest {
    SettlementRequest {
        settlement_id: "S1".into(),
        card: CardClaims {
            card_id: "C1".into(),
            holder_name: "H".into(),
            insured_region: "110105".into(),
            insurance_types: vec!["310".into()],
            delegate: None,
        },
        institution: Institution { id: "H1".into(), level: InstitutionLevel::Tertiary, region: "110105".into() },
        insurance_type: "310".into(),
        lines: vec![],
        total_fen: due * 3,
        due_fen: due,
        prior: vec![PriorPayment {
            payer: "basic-medical".into(),
            fund_pay_fen: due * 2,
            account_pay_fen: 0,
            eligible_self_pay_fen: eligible,
            eligible_borne_fen: eligible,
        }],
        year_to_date: ytd,
        use_account: true,
        encounter: None,
    }
}

#[test]
fn example_1_crossing_the_threshold_pays_the_part_above_it() {
    // 12,000 yuan borne this year; this bill leaves 8,000 yuan in-policy (5,000 above the
    // 15,000-yuan threshold) and 1,000 yuan class C.
    let ytd = YearToDate { eligible_self_pay_fen: 1_200_000, ..YearToDate::default() };
    let split = plugin().settle(&after_basic(900_000, 800_000, ytd)).expect("settles");
    assert_eq!(split.fund_pay_fen(), 300_000); // 60% of 500,000
    assert_eq!(split.cash_pay_fen, 600_000);
    assert_eq!(split.check_balances(900_000), Ok(()));
}

#[test]
fn example_2_a_bill_spanning_two_bands() {
    // Already 40,000 yuan above the threshold; 20,000 more: 10,000 at 60%, 10,000 at 70%.
    let ytd = YearToDate { eligible_self_pay_fen: 5_500_000, ..YearToDate::default() };
    let split = plugin().settle(&after_basic(2_000_000, 2_000_000, ytd)).expect("settles");
    assert_eq!(split.fund_pay_fen(), 600_000 + 700_000);
    assert_eq!(split.cash_pay_fen, 700_000);
}

#[test]
fn example_3_below_the_threshold_pays_nothing() {
    let split = plugin().settle(&after_basic(300_000, 300_000, YearToDate::default())).expect("settles");
    assert_eq!((split.fund_pay_fen(), split.cash_pay_fen), (0, 300_000));
    assert_eq!(split.year_to_date_delta.eligible_self_pay_fen, 300_000, "still counts toward the threshold");
}

#[test]
fn example_4_the_annual_ceiling_caps_the_fund() {
    let ytd = YearToDate { eligible_self_pay_fen: 9_000_000, fund_paid_fen: 39_900_000, ..YearToDate::default() };
    let split = plugin().settle(&after_basic(1_000_000, 1_000_000, ytd)).expect("settles");
    assert_eq!(split.fund_pay_fen(), 100_000);
}

#[test]
fn uncovered_insurance_type_is_not_insured() {
    let mut request = after_basic(100, 100, YearToDate::default());
    request.insurance_type = "510".into();
    assert_eq!(plugin().quote(&request).expect_err("refused").code, cardgate_sdk::ErrorCode::NotInsured);
}

proptest! {
    #[test]
    fn every_split_balances(due in 0i64..100_000_000, eligible in 0i64..200_000_000, borne in 0i64..100_000_000, paid in 0i64..50_000_000) {
        let ytd = YearToDate { eligible_self_pay_fen: borne, fund_paid_fen: paid, ..YearToDate::default() };
        let split = plugin().settle(&after_basic(due, eligible, ytd)).expect("settles");
        prop_assert_eq!(split.check_balances(due), Ok(()));
        prop_assert!(split.fund_pay_fen() <= (40_000_000 - paid).max(0));
        prop_assert!(split.eligible_self_pay_fen <= split.cash_pay_fen);
    }
}

#[test]
fn example_5_the_personal_account_s_part_counts_toward_the_base() {
    // An employee past the threshold. Basic medical left 2,000 yuan of in-policy self-pay, of
    // which the personal account paid 500 (all that was left in it) and 1,500 is due in cash.
    // The whole 2,000 is borne by the person: 60% of it, 1,200 yuan, is paid (not 60% of the
    // 1,500 in cash, 900, as when the account's part was left out of the base).
    let ytd = YearToDate { eligible_self_pay_fen: 1_500_000, ..YearToDate::default() };
    let mut request = after_basic(150_000, 150_000, ytd);
    request.prior[0].account_pay_fen = 50_000;
    request.prior[0].eligible_borne_fen = 200_000;
    let split = plugin().settle(&request).expect("settles");
    assert_eq!(split.fund_pay_fen(), 120_000);
    assert_eq!(split.cash_pay_fen, 30_000);
    assert_eq!(split.year_to_date_delta.eligible_self_pay_fen, 200_000, "the whole 2,000 counts toward the year");
    assert_eq!((split.eligible_self_pay_fen, split.eligible_borne_fen), (30_000, 80_000));
    // When the account paid all of it, nothing is due in cash and nothing can be paid: the
    // borne amount still counts toward the year.
    let mut drained = after_basic(0, 0, ytd);
    drained.prior[0].account_pay_fen = 200_000;
    drained.prior[0].eligible_borne_fen = 200_000;
    let split = plugin().settle(&drained).expect("settles");
    assert_eq!((split.fund_pay_fen(), split.cash_pay_fen), (0, 0));
    assert_eq!(split.year_to_date_delta.eligible_self_pay_fen, 200_000);
    assert!(split.breakdown.iter().any(|b| b.item == "paid_by_account" && b.amount_fen == 120_000), "{split:?}");
}
