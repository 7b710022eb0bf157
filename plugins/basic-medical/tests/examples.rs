//! The hand-worked examples of `README.md`, with the example configuration.

mod common;

use basic_medical::BasicMedical;
use cardgate_sdk::{ErrorCode, InquiryRequest, InstitutionLevel::*, ItemCategory::*, Plugin, Split, YearToDate};
use common::{example_config, line, request};

fn plugin() -> BasicMedical {
    BasicMedical::new(example_config()).expect("example config is valid")
}

fn breakdown(split: &Split, item: &str) -> i64 {
    split.breakdown.iter().find(|b| b.item == item).map_or(0, |b| b.amount_fen)
}

#[test]
fn example_1_employee_first_visit_of_the_year_at_a_tertiary_hospital() {
    let req = request(
        "310",
        Tertiary,
        vec![line(ClassA, 100_000), line(ClassB, 50_000), line(ClassC, 20_000)],
        YearToDate::default(),
    );
    let split = plugin().settle(&req).expect("settles");
    assert_eq!(split.fund_pay_fen(), 52_000);
    assert_eq!(split.account_pay_fen, 98_000);
    assert_eq!(split.cash_pay_fen, 20_000);
    assert_eq!(split.eligible_self_pay_fen, 0);
    assert_eq!(breakdown(&split, "class_b_first_self_pay"), 5_000);
    assert_eq!(breakdown(&split, "deductible"), 80_000);
    assert_eq!(breakdown(&split, "co_insurance"), 13_000);
    assert_eq!(breakdown(&split, "class_c_self_pay"), 20_000);
    let delta = split.year_to_date_delta;
    assert_eq!(
        (
            delta.deductible_fen,
            delta.fund_paid_fen,
            delta.eligible_fen,
            delta.account_paid_fen,
            delta.eligible_self_pay_fen
        ),
        (80_000, 52_000, 145_000, 98_000, 93_000)
    );
    split.check_balances(170_000).expect("balances");
}

#[test]
fn example_2_deductible_met_and_account_declined() {
    let ytd = YearToDate { deductible_fen: 80_000, ..YearToDate::default() };
    let mut req =
        request("310", Tertiary, vec![line(ClassA, 100_000), line(ClassB, 50_000), line(ClassC, 20_000)], ytd);
    req.use_account = false;
    let split = plugin().settle(&req).expect("settles");
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (116_000, 0, 54_000));
    assert_eq!(split.eligible_self_pay_fen, 29_000);
    assert_eq!(breakdown(&split, "deductible"), 0);
    assert_eq!(breakdown(&split, "co_insurance"), 29_000);
}

#[test]
fn example_3_resident_at_a_pharmacy_reaches_the_annual_ceiling() {
    let ytd = YearToDate { deductible_fen: 60_000, fund_paid_fen: 19_990_000, ..YearToDate::default() };
    let req = request("390", Pharmacy, vec![line(ClassA, 30_000)], ytd);
    let split = plugin().settle(&req).expect("settles");
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (10_000, 0, 20_000));
    assert_eq!(breakdown(&split, "co_insurance"), 12_000);
    assert_eq!(breakdown(&split, "above_ceiling"), 8_000);
    assert_eq!(split.eligible_self_pay_fen, 20_000);
}

#[test]
fn example_4_rounding_half_up_and_a_nearly_empty_account() {
    let ytd = YearToDate { deductible_fen: 80_000, account_paid_fen: 199_900, ..YearToDate::default() };
    let req = request("310", Primary, vec![line(ClassB, 3_335)], ytd);
    let split = plugin().settle(&req).expect("settles");
    assert_eq!(breakdown(&split, "class_b_first_self_pay"), 334);
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (2_701, 100, 534));
    assert_eq!(split.eligible_self_pay_fen, 200);
}

#[test]
fn example_5_card_without_the_insurance_type_is_not_insured() {
    let mut req = request("310", Tertiary, vec![line(ClassA, 1_000)], YearToDate::default());
    req.card.insurance_types = vec!["390".into()];
    let error = plugin().quote(&req).expect_err("refused");
    assert_eq!(error.code, ErrorCode::NotInsured);
}

#[test]
fn quote_and_settle_agree() {
    let req = request("390", Secondary, vec![line(ClassA, 70_000), line(ClassB, 12_345)], YearToDate::default());
    assert_eq!(plugin().quote(&req), plugin().settle(&req));
}

#[test]
fn lines_that_do_not_sum_to_the_total_are_refused() {
    let mut req = request("310", Tertiary, vec![line(ClassA, 1_000)], YearToDate::default());
    req.total_fen = 999;
    req.due_fen = 999;
    assert_eq!(plugin().quote(&req).expect_err("refused").code, ErrorCode::InvalidRequest);
}

#[test]
fn negative_line_is_refused() {
    let req = request("310", Tertiary, vec![line(ClassA, -5)], YearToDate::default());
    assert_eq!(plugin().quote(&req).expect_err("refused").code, ErrorCode::InvalidRequest);
}

#[test]
fn inquiry_reports_balance_deductible_and_ceiling_left() {
    let base = request("310", Tertiary, vec![], YearToDate::default());
    let ytd = YearToDate {
        deductible_fen: 30_000,
        fund_paid_fen: 1_000_000,
        account_paid_fen: 50_000,
        ..YearToDate::default()
    };
    let answer = plugin()
        .inquire(&InquiryRequest { card: base.card, institution: base.institution, year_to_date: ytd })
        .expect("answers");
    assert!(answer.insured);
    assert_eq!(answer.insurance_types, vec!["310".to_owned()]);
    assert_eq!(answer.account_balance_fen, Some(150_000));
    assert_eq!(answer.deductible_remaining_fen, Some(50_000));
    assert_eq!(answer.ceiling_remaining_fen, Some(29_000_000));
}

#[test]
fn invalid_config_lists_every_problem_with_its_key_path() {
    let mut config = example_config();
    config.class_b_self_pay_bp = 10_001;
    let employee = config.schemes.get_mut("310").expect("scheme 310");
    employee.deductible_fen = -1;
    employee.ratio_bp.pharmacy = 12_000;
    let error = BasicMedical::new(config).expect_err("refused");
    assert_eq!(error.code, ErrorCode::InvalidConfig);
    for path in ["class_b_self_pay_bp", "schemes.310.deductible_fen", "schemes.310.ratio_bp.pharmacy"] {
        assert!(error.message.contains(path), "{path} missing from: {}", error.message);
    }
}

#[test]
fn example_6_the_catalogue_sets_the_class_b_share_and_the_price_cap() {
    use cardgate_sdk::{BillLine, CatalogueEntry};
    let drug = BillLine {
        code: "XB0001".into(),
        name: "class B drug".into(),
        category: ClassB,
        quantity: cardgate_sdk::Decimal4::from_whole(10).expect("10"),
        unit_price_fen: cardgate_sdk::Decimal4::from_whole(1_200).expect("1,200"),
        amount_fen: 12_000,
        catalogue: Some(CatalogueEntry {
            class: ClassB,
            self_pay_bp: Some(2_000),
            price_cap_fen: Some(1_000),
            restricted: false,
        }),
    };
    let ytd = YearToDate { deductible_fen: 80_000, ..YearToDate::default() };
    let mut req = request("310", Tertiary, vec![drug, line(ClassA, 5_000)], ytd);
    req.use_account = false;
    let split = plugin().settle(&req).expect("settles");
    // 12,000 for ten units capped at 1,000 each: 2,000 over the cap; 20% of the other 10,000
    // first (2,000), 8,000 eligible; with the class A 5,000, 13,000 eligible, 80% = 10,400.
    assert_eq!(breakdown(&split, "over_price_cap"), 2_000);
    assert_eq!(breakdown(&split, "class_b_first_self_pay"), 2_000);
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (10_400, 0, 6_600));
    assert_eq!(split.eligible_self_pay_fen, 2_600);
    assert_eq!(split.year_to_date_delta.eligible_fen, 13_000);
    // With the account: it pays the in-policy 4,600 of the patient's 6,600, not the part over
    // the cap.
    req.use_account = true;
    let split = plugin().settle(&req).expect("settles");
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (10_400, 4_600, 2_000));
    split.check_balances(17_000).expect("balances");
}

#[test]
fn example_7_a_family_member_s_bill_is_paid_from_the_holder_s_account() {
    use cardgate_sdk::Delegate;
    let family = |relation: &str, ytd: YearToDate| {
        let mut req = request("310", Tertiary, vec![line(ClassA, 150_000), line(ClassC, 20_000)], ytd);
        req.card.delegate = Some(Delegate { card_id: "C2".into(), name: None, relation: relation.into() });
        req
    };
    // A parent's 1,700-yuan bill: the account pays the covered 1,500 up to the 1,000-yuan
    // limit per bill; no pooling, no deductible of the holder's moves.
    let split = plugin().settle(&family("parent", YearToDate::default())).expect("settles");
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (0, 100_000, 70_000));
    let delta = split.year_to_date_delta;
    assert_eq!(
        (delta.account_paid_fen, delta.deductible_fen, delta.fund_paid_fen, delta.eligible_fen),
        (100_000, 0, 0, 0)
    );
    assert_eq!(breakdown(&split, "family_mutual_aid"), 100_000);
    // With 300 yuan left in the account, it pays 300.
    let ytd = YearToDate { account_paid_fen: 170_000, ..YearToDate::default() };
    assert_eq!(plugin().settle(&family("child", ytd)).expect("settles").account_pay_fen, 30_000);
    // A relation the scheme does not cover is not insured here (the gateway skips the payer).
    let error = plugin().settle(&family("cousin", YearToDate::default())).expect_err("not covered");
    assert_eq!(error.code, ErrorCode::NotInsured);
    // The resident scheme has no account, so no mutual aid.
    let mut resident = family("parent", YearToDate::default());
    resident.insurance_type = "390".into();
    resident.card.insurance_types = vec!["390".into()];
    assert_eq!(plugin().settle(&resident).expect_err("no account").code, ErrorCode::NotInsured);
}

#[test]
fn example_8_an_inpatient_stay_meets_its_deductible_once_over_interim_and_final_settlements() {
    use cardgate_sdk::{EncounterInfo, EncounterKind};
    let stay = |settled_lines: Vec<cardgate_sdk::BillLine>, interim: bool| EncounterInfo {
        id: "E1".into(),
        kind: EncounterKind::Inpatient,
        med_type: "21".into(),
        diagnoses: vec![],
        department: None,
        admitted_at: "2026-12-01T08:00:00+08:00".into(),
        discharged_at: (!interim).then(|| "2026-12-06T10:00:00+08:00".into()),
        interim,
        settled_count: u32::from(!settled_lines.is_empty()),
        settled_lines,
    };
    let bill = |level, lines: Vec<cardgate_sdk::BillLine>, encounter: EncounterInfo| {
        let mut req = request("310", level, lines, YearToDate::default());
        req.use_account = false;
        req.encounter = Some(encounter);
        req
    };
    let interim_lines = vec![line(ClassA, 50_000), line(ClassB, 100_000)];
    let interim = plugin().settle(&bill(Tertiary, interim_lines.clone(), stay(vec![], true))).expect("settles");
    assert_eq!((interim.fund_pay_fen(), interim.cash_pay_fen), (42_500, 107_500));
    assert_eq!(breakdown(&interim, "stay_deductible"), 90_000);
    assert_eq!(breakdown(&interim, "deductible"), 0);
    assert_eq!(interim.year_to_date_delta.deductible_fen, 0, "the yearly deductible is not the stay's");
    assert_eq!(interim.year_to_date_delta.fund_paid_fen, 42_500, "the annual ceiling counts stays");

    let final_lines = vec![line(ClassA, 200_000)];
    let settled = plugin().settle(&bill(Tertiary, final_lines.clone(), stay(interim_lines.clone(), false)));
    let settled = settled.expect("settles");
    assert_eq!((settled.fund_pay_fen(), settled.cash_pay_fen), (170_000, 30_000));
    assert_eq!(breakdown(&settled, "stay_deductible"), 0);
    // The interim withdrawn: the final settlement meets the deductible itself.
    let alone = plugin().settle(&bill(Tertiary, final_lines, stay(vec![], false))).expect("settles");
    assert_eq!(alone.fund_pay_fen(), 93_500);
    // A grade 2 hospital: its own deductible and ratio.
    let secondary = plugin().settle(&bill(Secondary, interim_lines.clone(), stay(vec![], true))).expect("settles");
    assert_eq!(secondary.fund_pay_fen(), 72_000);
    // The same lines without an encounter: the yearly deductible (800) and the scheme's ratio.
    let mut visit = request("310", Tertiary, interim_lines, YearToDate::default());
    visit.use_account = false;
    let visit = plugin().settle(&visit).expect("settles");
    assert_eq!((visit.fund_pay_fen(), visit.year_to_date_delta.deductible_fen), (48_000, 80_000));
}

#[test]
fn example_9_outpatient_pooling_has_its_own_ceiling_and_chronic_diseases_no_deductible() {
    use cardgate_sdk::{EncounterInfo, EncounterKind};
    let visit = |med_type: &str, kind: EncounterKind| EncounterInfo {
        id: "E2".into(),
        kind,
        med_type: med_type.into(),
        diagnoses: vec![],
        department: None,
        admitted_at: "2026-12-01T08:00:00+08:00".into(),
        discharged_at: None,
        interim: kind == EncounterKind::Inpatient,
        settled_lines: vec![],
        settled_count: 0,
    };
    let bill = |ytd: YearToDate, encounter: Option<EncounterInfo>| {
        let mut req = request("310", Tertiary, vec![line(ClassA, 100_000)], ytd);
        req.use_account = false;
        req.encounter = encounter;
        req
    };
    // 49,900 of the outpatient pooling's 50,000 yuan used: 100 yuan left of the 800 due.
    let used = YearToDate { deductible_fen: 80_000, outpatient_fund_paid_fen: 4_990_000, ..YearToDate::default() };
    let capped = plugin().settle(&bill(used, None)).expect("settles");
    assert_eq!((capped.fund_pay_fen(), capped.cash_pay_fen), (10_000, 90_000));
    assert_eq!(breakdown(&capped, "above_ceiling"), 70_000);
    assert_eq!(capped.year_to_date_delta.outpatient_fund_paid_fen, 10_000);
    // A chronic disease's visit (med_type 14): no yearly deductible, 80% at a tertiary hospital.
    let chronic = plugin().settle(&bill(YearToDate::default(), Some(visit("14", EncounterKind::Outpatient))));
    let chronic = chronic.expect("settles");
    assert_eq!((chronic.fund_pay_fen(), chronic.year_to_date_delta.deductible_fen), (80_000, 0));
    assert_eq!(chronic.year_to_date_delta.outpatient_fund_paid_fen, 80_000);
    // A general visit (med_type 11) meets the yearly deductible first: 80% of 20,000.
    let general = plugin().settle(&bill(YearToDate::default(), Some(visit("11", EncounterKind::Outpatient))));
    assert_eq!(general.expect("settles").fund_pay_fen(), 16_000);
    // A stay is not outpatient care: the outpatient ceiling reached does not limit it, and it
    // does not count toward it.
    let full = YearToDate { outpatient_fund_paid_fen: 5_000_000, ..YearToDate::default() };
    let stay = plugin().settle(&bill(full, Some(visit("21", EncounterKind::Inpatient)))).expect("settles");
    assert_eq!((stay.fund_pay_fen(), stay.year_to_date_delta.outpatient_fund_paid_fen), (8_500, 0));
}
