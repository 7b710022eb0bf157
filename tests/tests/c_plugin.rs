//! A plugin written in C against the SDK's header, built here with the system C compiler, loaded
//! by the real loader and settling a bill through a running gateway.

use std::path::PathBuf;
use std::process::Command;

use cardgate::plugin::{LoadOptions, load};
use cardgate_sdk::{Operation, Split};
use cardgate_tests::harness::{Card, Options, TestGateway, post};
use cardgate_tests::{bill, settlement_request, workspace_root};
use http::StatusCode;
use serde_json::json;

fn build_c_plugin(dir: &std::path::Path) -> PathBuf {
    build_c_plugin_with(dir, &workspace_root().join("sdk/include"), "libhalf_pay.so")
}

/// Compiles the C plugin against the header in `include` (today's, or an older ABI's).
fn build_c_plugin_with(dir: &std::path::Path, include: &std::path::Path, name: &str) -> PathBuf {
    let source = workspace_root().join("examples/c-plugin/half_pay.c");
    let output = dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I"])
        .arg(include)
        .arg("-o")
        .arg(&output)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "the C plugin does not compile cleanly");
    output
}

#[test]
fn c_plugin_loads_and_splits_exactly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let library = build_c_plugin(dir.path());
    let options = LoadOptions::new(dir.path().join("cache"));
    let instance = load("half-pay-c", &library, &json!({ "fund_bp": 3000 }), &options).expect("loads");
    assert_eq!(instance.library().info().name, "half-pay-c");
    assert_eq!(instance.library().info().version, "1.0.0");
    let request = settlement_request(bill(4));
    let output = instance.call(Operation::Quote, &serde_json::to_vec(&request).expect("JSON")).expect("answers");
    let split: Split = serde_json::from_slice(&output).expect("a split");
    assert_eq!(split.check_balances(request.due_fen), Ok(()));
    assert_eq!(split.fund_pay_fen(), (request.due_fen * 3000 + 5000) / 10000);
    let refused = load("half-pay-c", &library, &json!({ "fund_bp": 20000 }), &options).expect_err("bad config");
    assert!(refused.to_string().contains("fund_bp: 0 to 10000"), "{refused}");
}

#[tokio::test]
async fn c_plugin_settles_through_the_gateway() {
    let dir = tempfile::tempdir().expect("temp dir");
    let library = build_c_plugin(dir.path());
    let extra = format!(
        "\n[plugins.c-payer]\nlibrary = \"{}\"\nconfig = {{ fund_bp = 5000 }}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"c-payer\"]\n",
        library.display()
    );
    let gw = TestGateway::start(Options { extra_toml: extra, ..Options::default() }).await;
    let token = gw.token(&Card::in_region("120101"), 120);
    let body = json!({
        "token": token, "terminal_id": "POS-1", "total_fen": 1001,
        "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 1001, "amount_fen": 1001 }]
    });
    let reply = post(&gw.pharmacy, "/v1/settlements", Some("c-1"), &body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let receipt = reply.json();
    assert_eq!((receipt["fund_pay_fen"].as_i64(), receipt["cash_pay_fen"].as_i64()), (Some(501), Some(500)));
    assert_eq!(receipt["payers"][0]["version"], "1.0.0");
}

#[test]
fn a_plugin_built_against_the_previous_abi_minor_still_loads_and_answers() {
    // The same C plugin compiled against the ABI 1.0 header, kept as it shipped: its
    // declaration is the 1.0 size, without the fields 1.1 appended.
    let dir = tempfile::tempdir().expect("temp dir");
    let library = build_c_plugin_with(dir.path(), &workspace_root().join("tests/abi-1.0"), "libhalf_pay_1_0.so");
    let options = LoadOptions::new(dir.path().join("cache"));
    let instance =
        load("half-pay-1.0", &library, &json!({ "fund_bp": 5000 }), &options).expect("an ABI 1.0 plugin loads");
    let info = instance.library().info();
    assert_eq!(info.abi, cardgate::plugin::AbiVersion { major: 1, minor: 0 });
    assert_eq!(info.description, "", "nothing is read past a 1.0 declaration");
    let request = settlement_request(bill(2));
    let output = instance.call(Operation::Settle, &serde_json::to_vec(&request).expect("JSON")).expect("answers");
    let split: Split = serde_json::from_slice(&output).expect("a split");
    assert_eq!(split.check_balances(request.due_fen), Ok(()));
    // And today's build of the same source declares 1.1.
    let current = build_c_plugin(dir.path());
    let instance = load("half-pay", &current, &json!({}), &options).expect("loads");
    assert_eq!(instance.library().info().abi, cardgate::plugin::AbiVersion::HOST);
}

/// Compiles examples/c-plugin/class_payer.c, which reads the whole request with Jansson (a C
/// JSON library). `None`, saying so, where Jansson's headers are not installed — unless
/// `CARDGATE_REQUIRE_JANSSON` is set (`.ci/run` installs them and sets it), then that fails.
fn build_class_payer(dir: &std::path::Path) -> Option<PathBuf> {
    let source = workspace_root().join("examples/c-plugin/class_payer.c");
    let output = dir.join("libclass_payer.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-I"])
        .arg(workspace_root().join("sdk/include"))
        .arg("-o")
        .arg(&output)
        .arg(&source)
        .arg("-ljansson")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    let stderr = String::from_utf8_lossy(&built.stderr);
    if !built.status.success() && stderr.contains("jansson.h") && std::env::var_os("CARDGATE_REQUIRE_JANSSON").is_none()
    {
        eprintln!("SKIPPED (install libjansson-dev to run): the C plugin that reads requests with Jansson");
        return None;
    }
    assert!(built.status.success(), "class_payer.c does not compile cleanly:\n{stderr}");
    Some(output)
}

/// The class payer's configuration in the examples below.
fn class_payer_config() -> serde_json::Value {
    json!({
        "fund": "tianjin_supplementary", "regions": ["12"], "class_a_bp": 9000, "class_b_bp": 8000,
        "class_b_self_pay_bp": 1000, "annual_ceiling_fen": 30000
    })
}

/// Every key of `value` (recursively) that the schema `schema` does not define anywhere: its
/// own properties or those of its definitions.
fn undefined_keys(value: &serde_json::Value, schema: &serde_json::Value) -> Vec<String> {
    fn defined(schema: &serde_json::Value, into: &mut std::collections::BTreeSet<String>) {
        if let Some(properties) = schema["properties"].as_object() {
            into.extend(properties.keys().cloned());
        }
        if let Some(defs) = schema["$defs"].as_object() {
            defs.values().for_each(|d| defined(d, into));
        }
    }
    fn keys(value: &serde_json::Value, into: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| {
                into.push(k.clone());
                keys(v, into);
            }),
            serde_json::Value::Array(items) => items.iter().for_each(|v| keys(v, into)),
            _ => {}
        }
    }
    let mut known = std::collections::BTreeSet::new();
    defined(schema, &mut known);
    let mut found = Vec::new();
    keys(value, &mut found);
    found.into_iter().filter(|k| !known.contains(k)).collect()
}

fn schema(name: &str) -> serde_json::Value {
    let path = workspace_root().join(format!("sdk/schema/{name}.schema.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("schema")).expect("JSON")
}

/// A C author's plugin reads the request as the published schemas describe it, with a C JSON
/// library, and answers exact amounts (worked by hand below).
#[test]
fn a_c_plugin_reading_the_whole_request_with_jansson_splits_by_class() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(library) = build_class_payer(dir.path()) else { return };
    // Every field the C source reads is one the request schema defines.
    let source = std::fs::read_to_string(workspace_root().join("examples/c-plugin/class_payer.c")).expect("source");
    // Its reads: `json_object_get(object, "field")` and its helper `integer(object, "field", ..)`,
    // less those of its own configuration (read in `init`).
    let request_part = &source[source.find("static int insures").expect("split")..];
    let read: Vec<&str> = ["json_object_get(", "integer("]
        .iter()
        .flat_map(|call| request_part.split(call).skip(1))
        .filter_map(|args| {
            let (object, rest) = args.split_once(", \"")?;
            let plain = !object.contains(['(', ')', '"', '\n']);
            plain.then(|| rest.split('"').next()).flatten()
        })
        .collect();
    for field in ["due_fen", "total_fen", "card", "insured_region", "lines", "category", "amount_fen", "catalogue"] {
        assert!(read.contains(&field), "{field} not found among {read:?}");
    }
    for field in ["price_cap_fen", "quantity", "self_pay_bp", "year_to_date", "year", "fund_paid_fen"] {
        assert!(read.contains(&field), "{field} not found among {read:?}");
    }
    let request_schema = schema("SettlementRequest");
    let as_keys = serde_json::Value::Object(read.iter().map(|f| (f.to_string(), json!(null))).collect());
    assert_eq!(undefined_keys(&as_keys, &request_schema), Vec::<String>::new(), "fields the schema does not define");

    let options = LoadOptions::new(dir.path().join("cache"));
    let instance = load("class-payer-c", &library, &class_payer_config(), &options).expect("loads");
    assert_eq!(instance.library().info().name, "class-payer-c");
    // Hand-worked: class A 100.00 (fund 90%: 9,000); class B 200.00 with the catalogue's 20%
    // first share (4,000 the patient's; 80% of 16,000: 12,800); class B 50.00 with the default
    // 10% (500; 80% of 4,500: 3,600); class C 30.00 (nothing); class A half a unit at 80.00 a
    // unit, capped at 60.00 a unit (40.00 billed, 30.00 counted, 10.00 over the cap; 90% of
    // 3,000: 2,700). Fund: 28,100 of the 420.00 due; cash 13,900.
    let mut request = serde_json::to_value(settlement_request(Vec::new())).expect("JSON");
    request["card"]["insured_region"] = json!("120101");
    request["lines"] = json!([
        { "code": "A1", "name": "a", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 },
        { "code": "B1", "name": "b", "category": "class_b", "quantity": 2, "unit_price_fen": 10000, "amount_fen": 20000,
          "catalogue": { "class": "class_b", "self_pay_bp": 2000, "price_cap_fen": null } },
        { "code": "B2", "name": "b2", "category": "class_b", "quantity": 1, "unit_price_fen": 5000, "amount_fen": 5000 },
        { "code": "C1", "name": "c", "category": "class_c", "quantity": 1, "unit_price_fen": 3000, "amount_fen": 3000 },
        { "code": "A2", "name": "a2", "category": "class_a", "quantity": "0.5", "unit_price_fen": 8000, "amount_fen": 4000,
          "catalogue": { "class": "class_a", "self_pay_bp": 0, "price_cap_fen": 6000 } }
    ]);
    request["total_fen"] = json!(42000);
    request["due_fen"] = json!(42000);
    let typed: cardgate_sdk::SettlementRequest = serde_json::from_value(request.clone()).expect("an SDK request");
    let call = |request: &serde_json::Value| {
        let output = instance.call(Operation::Settle, &serde_json::to_vec(request).expect("JSON")).expect("answers");
        serde_json::from_slice::<serde_json::Value>(&output).expect("JSON")
    };
    let answer = call(&request);
    assert_eq!(undefined_keys(&answer, &schema("Split")), Vec::<String>::new(), "{answer}");
    let split: Split = serde_json::from_value(answer.clone()).expect("a split");
    assert_eq!(split.check_balances(typed.due_fen), Ok(()));
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (28_100, 0, 13_900));
    assert_eq!(split.funds[0].fund, "tianjin_supplementary");
    assert_eq!(split.year_to_date_delta.fund_paid_fen, 28_100);
    let item = |name: &str| split.breakdown.iter().find(|b| b.item == name).map(|b| b.amount_fen);
    assert_eq!(
        (item("class_b_self_pay"), item("class_c"), item("over_price_cap")),
        (Some(4_500), Some(3_000), Some(1_000))
    );

    // An earlier payer left 200.00: the fund pays at most that. The ceiling (300.00) with
    // 290.00 paid this year: 10.00 left.
    request["due_fen"] = json!(20000);
    assert_eq!(call(&request)["funds"][0]["amount_fen"], 20000);
    request["due_fen"] = json!(42000);
    request["year_to_date"]["fund_paid_fen"] = json!(29000);
    let capped = call(&request);
    assert_eq!((capped["funds"][0]["amount_fen"].as_i64(), capped["cash_pay_fen"].as_i64()), (Some(1000), Some(41000)));

    // A card of another region: not insured (the gateway skips this payer).
    request["card"]["insured_region"] = json!("310104");
    let refused = instance.call(Operation::Settle, &serde_json::to_vec(&request).expect("JSON")).expect_err("refused");
    assert!(refused.to_string().contains("not_insured"), "{refused}");
    // A malformed request is the plugin's BAD_INPUT, never a crash.
    let broken = instance.call(Operation::Settle, b"{\"due_fen\": \"x\"}").expect_err("refused");
    assert!(broken.to_string().contains("due_fen"), "{broken}");
    // Its configuration is checked, with the field named.
    let bad = load("class-payer-c", &library, &json!({ "regions": ["12"], "class_b_bp": 12000 }), &options);
    assert!(bad.expect_err("refused").to_string().contains("class_b_bp: 0 to 10000"));
    let absent = load("class-payer-c", &library, &json!({}), &options).expect_err("no regions");
    assert!(absent.to_string().contains("regions"), "{absent}");
}

/// Through the gateway: the accumulators it keeps for the C payer carry its yearly ceiling
/// from one bill to the next.
#[tokio::test]
async fn the_c_class_payer_settles_through_the_gateway_and_its_ceiling_holds_across_bills() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(library) = build_class_payer(dir.path()) else { return };
    let config = toml::to_string(&class_payer_config()).expect("TOML");
    let extra = format!(
        "\n[plugins.class-payer]\nlibrary = \"{}\"\n[plugins.class-payer.config]\n{config}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"class-payer\"]\n",
        library.display()
    );
    let gw = TestGateway::start(Options { extra_toml: extra, ..Options::default() }).await;
    let card = Card::in_region("120101");
    let body = |token: String| {
        json!({
            "token": token, "terminal_id": "POS-1", "total_fen": 30000,
            "lines": [
                { "code": "A1", "name": "a", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 },
                { "code": "B1", "name": "b", "category": "class_b", "quantity": 2, "unit_price_fen": 10000, "amount_fen": 20000 }
            ]
        })
    };
    // 90% of 100.00 and 80% of (200.00 less its 10% first share): 9,000 + 14,400 = 23,400.
    let first = post(&gw.pharmacy, "/v1/settlements", Some("class-1"), &body(gw.token(&card, 120))).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let first = first.json();
    assert_eq!((first["fund_pay_fen"].as_i64(), first["cash_pay_fen"].as_i64()), (Some(23_400), Some(6_600)));
    assert_eq!(first["payers"][0]["version"], "1.0.0");
    // The ceiling of 300.00 leaves 66.00 for the second bill.
    let second = post(&gw.pharmacy, "/v1/settlements", Some("class-2"), &body(gw.token(&card, 120))).await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.body);
    assert_eq!(second.json()["fund_pay_fen"], 6_600);
}
