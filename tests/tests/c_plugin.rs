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
