//! Property tests: whatever the bill, the configuration and the year so far, every split
//! balances exactly, nothing is negative, and the policy's limits hold.

mod common;

use basic_medical::BasicMedical;
use basic_medical::policy::{AccountPolicy, Config, FULL_BP, Ratios, Scheme};
use cardgate_sdk::{BillLine, InstitutionLevel, ItemCategory, Plugin, YearToDate};
use common::{line, request};
use proptest::prelude::*;

fn category() -> impl Strategy<Value = ItemCategory> {
    prop_oneof![Just(ItemCategory::ClassA), Just(ItemCategory::ClassB), Just(ItemCategory::ClassC)]
}

fn level() -> impl Strategy<Value = InstitutionLevel> {
    prop_oneof![
        Just(InstitutionLevel::Primary),
        Just(InstitutionLevel::Secondary),
        Just(InstitutionLevel::Tertiary),
        Just(InstitutionLevel::Pharmacy)
    ]
}

fn lines() -> impl Strategy<Value = Vec<BillLine>> {
    prop::collection::vec((category(), 0i64..50_000_000), 0..12)
        .prop_map(|v| v.into_iter().map(|(c, a)| line(c, a)).collect())
}

fn config() -> impl Strategy<Value = Config> {
    let bp = || 0u32..=FULL_BP;
    (
        bp(),
        0i64..2_000_000,
        0i64..50_000_000,
        [bp(), bp(), bp(), bp()],
        prop::option::of((0i64..1_000_000, any::<bool>())),
    )
        .prop_map(|(class_b, deductible, ceiling, [primary, secondary, tertiary, pharmacy], account)| Config {
            fund: "basic_pooling".into(),
            class_b_self_pay_bp: class_b,
            schemes: [(
                "310".to_owned(),
                Scheme {
                    name: "generated".into(),
                    deductible_fen: deductible,
                    annual_ceiling_fen: ceiling,
                    ratio_bp: Ratios { primary, secondary, tertiary, pharmacy },
                    account: account.map(|(credit, c)| AccountPolicy {
                        annual_credit_fen: credit,
                        covers_class_c: c,
                        mutual_aid: None,
                    }),
                    inpatient: None,
                    outpatient: None,
                },
            )]
            .into(),
        })
}

fn year_to_date() -> impl Strategy<Value = YearToDate> {
    (0i64..3_000_000, 0i64..60_000_000, 0i64..2_000_000).prop_map(|(deductible, fund, account)| YearToDate {
        year: 2026,
        deductible_fen: deductible,
        fund_paid_fen: fund,
        account_paid_fen: account,
        ..YearToDate::default()
    })
}

proptest! {
    #[test]
    fn every_split_balances_and_respects_the_limits(
        config in config(), lines in lines(), level in level(), ytd in year_to_date(), use_account in any::<bool>(),
    ) {
        let scheme = config.schemes["310"].clone();
        let plugin = BasicMedical::new(config).expect("generated config is valid");
        let mut req = request("310", level, lines, ytd);
        req.use_account = use_account;
        let split = plugin.settle(&req).expect("settles");
        prop_assert_eq!(split.check_balances(req.total_fen), Ok(()));
        prop_assert!(split.eligible_self_pay_fen >= 0 && split.eligible_self_pay_fen <= split.cash_pay_fen);
        let ceiling_left = (scheme.annual_ceiling_fen - ytd.fund_paid_fen).max(0);
        prop_assert!(split.fund_pay_fen() <= ceiling_left);
        prop_assert_eq!(split.year_to_date_delta.fund_paid_fen, split.fund_pay_fen());
        prop_assert_eq!(split.year_to_date_delta.account_paid_fen, split.account_pay_fen);
        let balance = scheme.account.map_or(0, |a| (a.annual_credit_fen - ytd.account_paid_fen).max(0));
        let allowed = if use_account { balance } else { 0 };
        prop_assert!(split.account_pay_fen <= allowed);
        prop_assert!(ytd.deductible_fen + split.year_to_date_delta.deductible_fen <= scheme.deductible_fen.max(ytd.deductible_fen));
    }

    #[test]
    fn a_later_payer_position_still_balances_against_what_is_due(
        config in config(), lines in lines(), ytd in year_to_date(), covered_bp in 0u32..=FULL_BP,
    ) {
        let plugin = BasicMedical::new(config).expect("generated config is valid");
        let mut req = request("310", InstitutionLevel::Secondary, lines, ytd);
        req.due_fen = req.total_fen - basic_medical::policy::share(req.total_fen, covered_bp);
        let split = plugin.quote(&req).expect("quotes");
        prop_assert_eq!(split.check_balances(req.due_fen), Ok(()));
    }
}
