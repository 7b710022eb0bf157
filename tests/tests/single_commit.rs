//! One durable commit per settlement when every payer is effect-free (ABI 1.2), two when any
//! is not — counted from the ledger's own commit metric, over real TLS. Alone in its test
//! binary: the metrics are the process's.

use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::harness::{Card, Options, TestGateway, admin_text, now_nanos, post};
use http::{Method, StatusCode};
use serde_json::json;

async fn commits(gw: &TestGateway) -> u64 {
    let metrics = admin_text(gw.admin, Method::GET, "/metrics").await.1;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("cardgate_ledger_commit_duration_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn effect_free_chains_settle_in_one_commit_and_effectful_ones_in_two() {
    // Region 12: a fixture plugin, which does not declare itself effect-free.
    let extra = format!(
        "\n[plugins.effectful]\nlibrary = \"{}\"\nconfig = {{ fund_bp = 5000 }}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"effectful\"]\n",
        build_cdylib("fixture-configurable").display()
    );
    let gw = TestGateway::start(Options { extra_toml: extra, ..Options::default() }).await;
    let (_, plugins) = cardgate_tests::harness::admin(gw.admin, Method::GET, "/admin/plugins").await;
    assert!(plugins.to_string().contains("basic-medical"), "{plugins}");
    let body = |token: String| {
        json!({ "token": token, "terminal_id": "POS-1", "total_fen": 10000,
            "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 }] })
    };
    let settle = |region: &str| {
        let token = gw.token(&Card::in_region(region), 120);
        let key = format!("commit-{}", now_nanos());
        let client = gw.pharmacy.clone();
        let body = body(token);
        async move { (post(&client, "/v1/settlements", Some(&key), &body).await, key, body) }
    };
    // Beijing cards: basic medical and critical illness, both effect-free.
    let before = commits(&gw).await;
    let (reply, key, sent) = settle("110105").await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(commits(&gw).await - before, 1, "intent and outcome in one commit");
    // Replayed with its key: the stored answer, byte for byte, nothing written.
    let before = commits(&gw).await;
    let again = post(&gw.pharmacy, "/v1/settlements", Some(&key), &sent).await;
    assert_eq!((again.status, again.body), (reply.status, reply.body));
    assert_eq!(commits(&gw).await, before);
    let before = commits(&gw).await;
    let (effectful, _, _) = settle("120101").await;
    assert_eq!(effectful.status, StatusCode::CREATED, "{}", effectful.body);
    assert_eq!(commits(&gw).await - before, 2, "intent before the payer is asked, then the outcome");
}
