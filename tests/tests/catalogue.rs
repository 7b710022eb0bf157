//! End to end: the bureau's catalogue decides each line's class, its class B share and its
//! price cap — a hospital labelling a class C item class A does not make the fund pay.

use cardgate_tests::harness::{Card, Options, TestGateway, post};
use http::StatusCode;
use serde_json::{Value, json};

const CATALOGUE: &str = "code,name,class,self_pay_bp,price_cap_fen,valid_from,valid_to,restricted
XA0001,Amoxicillin,class_a,,,,,
XB0002,Insulin pen,02,2000,3000,,,false
XC0003,Single room,03,,,,,
XA0009,Retired item,01,,,2001-01-01,2001-12-31,
";

/// A gateway whose catalogue is [`CATALOGUE`] with these policies.
async fn gateway(policies: &str) -> (TestGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("catalogue.csv");
    std::fs::write(&path, CATALOGUE).expect("catalogue");
    let extra_toml = format!("\n[catalogue]\npath = \"{}\"\n{policies}\n", path.display());
    (TestGateway::start(Options { extra_toml, ..Options::default() }).await, dir)
}

fn line(code: &str, category: &str, quantity: u32, unit_price_fen: i64) -> Value {
    json!({ "code": code, "name": code, "category": category, "quantity": quantity,
            "unit_price_fen": unit_price_fen, "amount_fen": i64::from(quantity) * unit_price_fen })
}

/// 1,700 yuan at the pharmacy: amoxicillin 1,000; ten insulin pens at 35 (cap 30); a single
/// room and an item the catalogue does not list, both sent as class A.
fn bill(token: &str) -> Value {
    json!({
        "token": token, "terminal_id": "POS-01", "total_fen": 170_000,
        "lines": [
            line("XA0001", "class_a", 1, 100_000),
            line("XB0002", "class_b", 10, 3_500),
            line("XC0003", "class_a", 1, 20_000),
            line("ZZ9999", "class_a", 1, 15_000),
        ]
    })
}

fn key() -> String {
    cardgate_tests::harness::unique_key("catalogue")
}

#[tokio::test]
async fn the_catalogue_reclassifies_caps_and_says_so_on_the_lines() {
    let (gw, dir) = gateway("").await;
    let token = gw.token(&Card::beijing(), 120);
    let quote = post(&gw.pharmacy, "/v1/quotes", None, &bill(&token)).await;
    assert_eq!(quote.status, StatusCode::CREATED, "{}", quote.body);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &bill(&token)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let r = reply.json();
    // Basic medical at a pharmacy (80%): class A 100,000 eligible; the pens' 5,000 above the
    // cap of 10 × 3,000 is the patient's, then 20% of 30,000 first (6,000), 24,000 eligible; the
    // room and the unlisted item are class C (35,000). Eligible 124,000: 80,000 deductible, 80%
    // of 44,000 = 35,200. The account pays the in-policy 94,800 of the patient's 134,800, not
    // the 40,000 uncovered. (As the hospital labelled them, the fund would have paid 72,000.)
    for answer in [quote.json(), r.clone()] {
        assert_eq!(
            (answer["fund_pay_fen"].as_i64(), answer["account_pay_fen"].as_i64(), answer["cash_pay_fen"].as_i64()),
            (Some(35_200), Some(94_800), Some(40_000)),
            "{answer}"
        );
        assert_eq!(
            answer["reclassified"],
            json!([
                { "line": 2, "code": "XC0003", "asserted": "class_a", "class": "class_c", "reason": "class_mismatch" },
                { "line": 3, "code": "ZZ9999", "asserted": "class_a", "class": "class_c", "reason": "not_in_catalogue" }
            ])
        );
    }
    let breakdown = |item: &str| {
        r["payers"][0]["breakdown"]
            .as_array()
            .and_then(|b| b.iter().find(|i| i["item"] == item))
            .map(|i| i["amount_fen"].clone())
    };
    assert_eq!(breakdown("over_price_cap"), Some(json!(5_000)));
    assert_eq!(breakdown("class_b_first_self_pay"), Some(json!(6_000)));
    assert_eq!(breakdown("class_c_self_pay"), Some(json!(35_000)));

    // The bureau lists the item; the catalogue reloads with the configuration (SIGHUP).
    std::fs::write(dir.path().join("catalogue.csv"), format!("{CATALOGUE}ZZ9999,New item,class_a,,,,,\n"))
        .expect("write");
    gw.reload_config(|text| text).await.expect("reloads");
    let reply = post(&gw.pharmacy, "/v1/quotes", None, &bill(&gw.token(&Card::beijing(), 120))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.json()["reclassified"].as_array().map(Vec::len), Some(1), "{}", reply.body);
    // A catalogue with errors is refused on reload; the current one keeps serving.
    std::fs::write(dir.path().join("catalogue.csv"), "code,name,class\nX,y,class_z\n").expect("write");
    let problems = gw.reload_config(|text| text).await.expect_err("refused");
    assert!(problems.iter().any(|p| p.starts_with("catalogue.path:")), "{problems:?}");
    let reply = post(&gw.pharmacy, "/v1/quotes", None, &bill(&gw.token(&Card::beijing(), 120))).await;
    assert_eq!(reply.json()["reclassified"].as_array().map(Vec::len), Some(1), "{}", reply.body);
}

#[tokio::test]
async fn refusing_policies_refuse_the_bill_and_spend_nothing() {
    let (gw, _dir) = gateway("not_in_catalogue = \"refuse\"\nclass_mismatch = \"refuse\"").await;
    let token = gw.token(&Card::beijing(), 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &bill(&token)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", reply.body);
    assert_eq!(reply.json()["code"], "item_class_mismatch");
    assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("lines[2]") && d.contains("XC0003")));
    // A retired code is not in the catalogue today.
    let mut retired = bill(&token);
    retired["lines"] = json!([line("XA0009", "class_a", 1, 170_000)]);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &retired).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", reply.body);
    assert_eq!(reply.json()["code"], "item_not_in_catalogue");
    // The token was not spent: the corrected bill settles with it.
    let mut corrected = bill(&token);
    corrected["lines"] = json!([
        line("XA0001", "class_a", 1, 100_000),
        line("XB0002", "class_b", 10, 3_500),
        line("XC0003", "class_c", 1, 35_000),
    ]);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &corrected).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert!(reply.json().get("reclassified").is_none(), "nothing reclassified: {}", reply.body);
}

#[tokio::test]
async fn a_settlement_left_unknown_completes_with_its_classified_lines() {
    // A payer that misses its timeout on the first call: the settlement is `unknown`, and the
    // retry completes it from the request sealed in its intent — lines classified, with their
    // catalogue entries, included.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("catalogue.csv");
    std::fs::write(&path, CATALOGUE).expect("catalogue");
    let extra_toml = format!(
        "\n[catalogue]\npath = \"{}\"\n\n[plugins.sluggish]\nlibrary = \"{}\"\ntimeout_ms = 200\nconfig = {{ delay_ms = 800, delayed_calls = 1, fund_bp = 5000 }}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"sluggish\"]\n",
        path.display(),
        cardgate_sdk::testing::build_cdylib("fixture-configurable").display()
    );
    let gw = TestGateway::start(Options { extra_toml, ..Options::default() }).await;
    let token = gw.token(&Card::in_region("120101"), 120);
    let body = json!({
        "token": token, "terminal_id": "POS-01", "total_fen": 135_000,
        "lines": [line("XA0001", "class_a", 1, 100_000), line("XB0002", "class_b", 10, 3_500)]
    });
    let key = key();
    let first = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!((first.status, first.json()["code"].as_str()), (StatusCode::GATEWAY_TIMEOUT, Some("plugin_timeout")));
    let retry = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert_eq!(retry.json()["fund_pay_fen"], 67_500, "{}", retry.body);
    let id = retry.json()["settlement_id"].as_str().expect("id").to_owned();
    let reversal = post(&gw.pharmacy, &format!("/v1/settlements/{id}/reversal"), None, &json!({})).await;
    assert_eq!(reversal.status, StatusCode::OK, "{}", reversal.body);
}
