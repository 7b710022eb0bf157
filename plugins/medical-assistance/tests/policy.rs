//! The policy through the same JSON dispatch the gateway uses.

use cardgate_sdk::testing::{Harness, RequestBuilder, assert_balances};
use cardgate_sdk::{ItemCategory, YearToDate};
use medical_assistance::Policy;

fn plugin() -> Harness<Policy> {
    let config = serde_json::json!({
        "fund": "medical_assistance", "insurance_types": ["310", "390"], "share_bp": 7000, "annual_ceiling_fen": 1_000_000
    });
    Harness::new(config).expect("the example configuration is valid")
}

#[test]
fn pays_its_share_of_what_the_earlier_payer_left() {
    let request =
        RequestBuilder::new().line(ItemCategory::ClassA, 100_000).after("basic-medical", 60_000, 0, 40_000).build();
    let split = plugin().settle(&request).expect("settles");
    assert_balances(&split, request.due_fen);
    assert_eq!(split.fund_pay_fen(), 28_000);
    assert_eq!(split.cash_pay_fen, 12_000);
}

#[test]
fn stops_at_the_annual_ceiling() {
    let ytd = YearToDate { fund_paid_fen: 995_000, ..YearToDate::default() };
    let request = RequestBuilder::new().line(ItemCategory::ClassA, 100_000).year_to_date(ytd).build();
    assert_eq!(plugin().settle(&request).expect("settles").fund_pay_fen(), 5_000);
}

#[test]
fn a_bad_configuration_is_refused_with_its_key() {
    let error = Harness::<Policy>::new(serde_json::json!({
        "fund": "f", "insurance_types": ["310"], "share_bp": 12_000, "annual_ceiling_fen": 0
    }))
    .expect_err("refused");
    assert!(error.message.contains("share_bp"), "{error}");
}

#[test]
fn only_registered_recipients_are_assisted() {
    let config = serde_json::json!({
        "fund": "medical_assistance", "insurance_types": ["390"], "recipients": ["110105195501015555"],
        "share_bp": 7000, "annual_ceiling_fen": 1_000_000
    });
    let plugin = Harness::<Policy>::new(config).expect("valid");
    let bill = || {
        RequestBuilder::new().insurance_type("390").line(ItemCategory::ClassA, 100_000).after(
            "basic-medical",
            60_000,
            0,
            40_000,
        )
    };
    let recipient = bill().card("110105195501015555").build();
    assert_eq!(plugin.settle(&recipient).expect("settles").fund_pay_fen(), 28_000);
    // Anyone else: not insured with this payer, which the gateway skips (not a refusal).
    let other = bill().card("110105199001011234").build();
    let error = plugin.settle(&other).expect_err("not a recipient");
    assert_eq!(error.code, cardgate_sdk::ErrorCode::NotInsured, "{error}");
    let employee =
        RequestBuilder::new().insurance_type("310").card("110105195501015555").line(ItemCategory::ClassA, 100).build();
    let error = plugin.settle(&employee).expect_err("390 only");
    assert_eq!(error.code, cardgate_sdk::ErrorCode::NotInsured, "{error}");
}
