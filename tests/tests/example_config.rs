//! The example configuration (`examples/cardgate.toml`) as an operator would start from it:
//! every route settles a card it serves, with hand-worked amounts, and a payer that does not
//! apply to the person is skipped and shown, not a failure of the chain.

use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::harness::{Card, Options, Setup, TestGateway, post, serve_setup, unique_key};
use cardgate_tests::workspace_root;
use http::StatusCode;
use serde_json::{Value, json};

/// The registered assistance recipient of the example configuration.
const RECIPIENT: &str = "110105195501015555";

/// `examples/cardgate.toml` with this machine's files: the setup's certificates, trust list
/// and ledger, the plugins built from this workspace, loopback addresses.
fn example_config(setup: &Setup) -> String {
    let generated: toml::Table =
        toml::from_str(&std::fs::read_to_string(setup.dir.path().join("cardgate.toml")).expect("config"))
            .expect("generated config");
    let path = workspace_root().join("examples/cardgate.toml");
    let mut config: toml::Table = toml::from_str(&std::fs::read_to_string(&path).expect("example")).expect("example");
    let table = |config: &mut toml::Table, key: &str| -> toml::Table {
        config.get(key).and_then(toml::Value::as_table).cloned().unwrap_or_else(|| panic!("[{key}]"))
    };
    let mut server = table(&mut config, "server");
    for (key, value) in [
        ("listen", "127.0.0.1:0"),
        ("certificate", "server.pem"),
        ("private_key", "server.key"),
        ("client_ca", "ca.pem"),
    ] {
        server.insert(key.into(), value.into());
    }
    config.insert("server".into(), server.into());
    let mut admin = table(&mut config, "admin");
    admin.insert("listen".into(), "127.0.0.1:0".into());
    admin.insert("token_file".into(), "admin.token".into());
    config.insert("admin".into(), admin.into());
    let mut tokens = table(&mut config, "tokens");
    tokens.insert("trust_list".into(), "trust.json".into());
    tokens.remove("revocations");
    config.insert("tokens".into(), tokens.into());
    // The ledger the other end-to-end tests use (CARDGATE_TEST_LEDGER), unsigned plugins.
    config.insert("ledger".into(), generated["ledger"].clone());
    let mut runtime = table(&mut config, "plugin_runtime");
    runtime.insert("cache_dir".into(), "plugin-cache".into());
    runtime.remove("signers");
    runtime.insert("allow_unsigned".into(), true.into());
    config.insert("plugin_runtime".into(), runtime.into());
    let mut plugins = table(&mut config, "plugins");
    for (name, plugin) in plugins.iter_mut() {
        let library = build_cdylib(name).display().to_string();
        plugin.as_table_mut().expect("plugin table").insert("library".into(), library.into());
    }
    config.insert("plugins".into(), plugins.into());
    toml::to_string(&config).expect("serializes")
}

/// A card of `region` holding `insurance_type`, with a unique id (or `id`).
fn card(region: &str, insurance_type: &str, id: Option<&str>) -> Card {
    let mut card = Card::in_region(region);
    card.insurance_types = vec![insurance_type.into()];
    if let Some(id) = id {
        card.id = id.into();
    }
    card
}

/// A 10,000-yuan bill of class A items.
fn bill(token: &str) -> Value {
    json!({
        "token": token, "terminal_id": "HIS-1", "total_fen": 1_000_000,
        "lines": [{ "code": "XA01", "name": "Surgery", "category": "class_a", "quantity": 1, "unit_price_fen": 1_000_000, "amount_fen": 1_000_000 }]
    })
}

/// `(payer, fund_pay_fen, account_pay_fen, cash_pay_fen)` of each payer of an answer.
fn payers(answer: &Value) -> Vec<(String, i64, i64, i64)> {
    answer["payers"]
        .as_array()
        .expect("payers")
        .iter()
        .map(|p| {
            let amount = |key: &str| p[key].as_i64().expect(key);
            (
                p["payer"].as_str().expect("payer").to_owned(),
                amount("fund_pay_fen"),
                amount("account_pay_fen"),
                amount("cash_pay_fen"),
            )
        })
        .collect()
}

fn split(answer: &Value) -> (i64, i64, i64) {
    let amount = |key: &str| answer[key].as_i64().unwrap_or_else(|| panic!("{key}: {answer}"));
    (amount("fund_pay_fen"), amount("account_pay_fen"), amount("cash_pay_fen"))
}

fn skipped(answer: &Value) -> Vec<String> {
    answer["skipped"]
        .as_array()
        .map(|s| s.iter().map(|p| format!("{}: {}", p["payer"].as_str().unwrap_or(""), p["reason"])).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_of_the_example_configuration_settles_a_card_it_serves() {
    let setup = Setup::create(&Options::default(), "127.0.0.1:0");
    std::fs::write(setup.dir.path().join("cardgate.toml"), example_config(&setup)).expect("write config");
    let (addr, _stop) = serve_setup(&setup).await;
    // The example's one institution, H110105001: tertiary, in 110105.
    let hospital = setup.client(addr, 0);
    let settle = async |card: &Card| {
        let reply =
            post(&hospital, "/v1/settlements", Some(&unique_key("example")), &bill(&setup.token(card, 120))).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.json()
    };
    let names = |list: &[(String, i64, i64, i64)]| list.iter().map(|p| p.0.clone()).collect::<Vec<_>>();

    // Route 1, Beijing employees (310): basic medical then critical illness. Basic, tertiary:
    // 800 yuan deductible, 80% of the other 9,200 = 7,360 yuan; the account pays 2,000 of the
    // 2,640 left, 640 in cash. Critical illness: below its 15,000-yuan yearly threshold, 0.
    let employee = settle(&card("110105", "310", None)).await;
    assert_eq!(names(&payers(&employee)), ["basic-medical", "critical-illness"]);
    assert_eq!(split(&employee), (736_000, 200_000, 64_000));
    assert_eq!(payers(&employee)[1], ("critical-illness".into(), 0, 0, 64_000));
    assert!(skipped(&employee).is_empty(), "{employee}");

    // Route 2, Beijing residents (390): basic medical (resident scheme), critical illness and
    // medical assistance. Basic, tertiary: 600 yuan deductible, 60% of 9,400 = 5,640 yuan; no
    // personal account: 4,360 yuan left. Critical illness: below threshold, 0. Medical
    // assistance: 70% of the 4,360 in-policy self-pay = 3,052 yuan for a registered recipient...
    let recipient = settle(&card("110105", "390", Some(RECIPIENT))).await;
    assert_eq!(
        payers(&recipient),
        [
            ("basic-medical".into(), 564_000, 0, 436_000),
            ("critical-illness".into(), 0, 0, 436_000),
            ("medical-assistance".into(), 305_200, 0, 130_800),
        ]
    );
    assert_eq!(split(&recipient), (869_200, 0, 130_800));
    // ...and for anyone else it does not apply: skipped and shown, the rest settles.
    let resident = settle(&card("110105", "390", None)).await;
    assert_eq!(names(&payers(&resident)), ["basic-medical", "critical-illness"]);
    assert_eq!(split(&resident), (564_000, 0, 436_000));
    assert_eq!(skipped(&resident), [r#"medical-assistance: "not_insured""#]);
    assert!(
        resident["skipped"][0]["detail"].as_str().is_some_and(|d| d.contains("recipient")),
        "the payer's reason is shown: {resident}"
    );

    // Route 3, Shanghai cards treated here (cross-region, at this hospital): basic medical only.
    let visitor = settle(&card("310104", "310", None)).await;
    assert_eq!(names(&payers(&visitor)), ["basic-medical"]);
    assert_eq!(split(&visitor), (736_000, 200_000, 64_000));

    // The skipped payer is not asked to reverse what it had no part in.
    let id = resident["settlement_id"].as_str().expect("id");
    let reversal = post(&hospital, &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "test" })).await;
    assert_eq!(reversal.status, StatusCode::OK, "{}", reversal.body);
    assert_eq!(reversal.json()["state"], "reversed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_none_of_whose_payers_applies_is_refused_with_the_first_reason() {
    let assistance = build_cdylib("medical-assistance").display().to_string();
    let extra_toml = format!(
        r#"
[plugins.medical-assistance]
library = "{assistance}"
[plugins.medical-assistance.config]
fund = "medical_assistance"
insurance_types = ["390"]
recipients = ["{RECIPIENT}"]
share_bp = 7000
annual_ceiling_fen = 1000000

[[routes]]
regions = ["44"]
payers = ["medical-assistance"]
"#
    );
    let gw = TestGateway::start(Options { extra_toml, ..Options::default() }).await;
    let token = gw.token(&card("440104", "390", None), 120);
    let quote = post(&gw.hospital, "/v1/quotes", None, &bill(&token)).await;
    assert_eq!(quote.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", quote.body);
    assert_eq!(quote.json()["code"], "plugin_rejected");
    assert!(
        quote.json()["detail"].as_str().is_some_and(|d| d.contains("medical-assistance") && d.contains("not_insured"))
    );
    let reply = post(&gw.hospital, "/v1/settlements", Some(&unique_key("none")), &bill(&token)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", reply.body);
    assert_eq!(reply.json()["code"], "plugin_rejected");
}
