//! The process isolation tier: plugins that abort, segfault or loop forever run in a child
//! `cardgate plugin-host`; the faulty route answers with a clear error, every other route keeps
//! serving, and the route recovers once a good build is deployed.

use std::path::Path;

use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::cardgate_binary;
use cardgate_tests::harness::{Card, Options, TestGateway, admin, post};
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn body(token: &str) -> Value {
    json!({
        "token": token, "terminal_id": "POS-1", "total_fen": 10000,
        "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 }]
    })
}

fn deploy(from: &Path, to: &Path) {
    let staging = to.with_extension("staging");
    std::fs::copy(from, &staging).expect("stage");
    std::fs::rename(&staging, to).expect("deploy");
}

const FAULTS: [(&str, &str); 3] = [("abort", "12"), ("segfault", "13"), ("loop", "14")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashing_plugins_fail_only_their_route_and_recover_after_a_good_deploy() {
    let libs = tempfile::tempdir().expect("temp dir");
    let crashing = build_cdylib("fixture-crashing");
    let mut extra = String::new();
    for (fault, region) in FAULTS {
        let library = libs.path().join(format!("{fault}.so"));
        deploy(&crashing, &library);
        extra += &format!(
            "\n[plugins.{fault}]\nlibrary = \"{}\"\nisolation = \"process\"\ntimeout_ms = 500\nbreaker_failures = 100\nconfig = {{ crash = \"{fault}\", fund_bp = 5000 }}\n\n[[routes]]\nregions = [\"{region}\"]\npayers = [\"{fault}\"]\n",
            library.display()
        );
    }
    let runtime = format!("allow_unsigned = true\nhost_binary = \"{}\"", cardgate_binary().display());
    let gw =
        TestGateway::start(Options { extra_toml: extra, plugin_runtime: Some(runtime), ..Options::default() }).await;
    let settle = |region: &'static str| {
        let token = gw.token(&Card::in_region(&format!("{region}0101")), 120);
        let key = format!("iso-{region}-{}", cardgate_tests::harness::now_nanos());
        let gw = &gw;
        async move { post(&gw.pharmacy, "/v1/settlements", Some(&key), &body(&token)).await }
    };
    for (fault, region) in FAULTS {
        let reply = settle(region).await;
        let expected = if fault == "loop" {
            (StatusCode::GATEWAY_TIMEOUT, "plugin_timeout")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "plugin_unavailable")
        };
        assert_eq!(
            (reply.status, reply.json()["code"].as_str().unwrap_or_default()),
            expected,
            "{fault}: {}",
            reply.body
        );
        // The gateway, and every other route, keeps serving.
        assert_eq!(settle("11").await.status, StatusCode::CREATED, "after {fault}");
    }
    let (_, plugins) = admin(gw.admin, Method::GET, "/admin/plugins").await;
    let tiers: Vec<&str> =
        plugins["plugins"].as_array().expect("list").iter().filter_map(|p| p["tier"].as_str()).collect();
    assert_eq!(tiers.iter().filter(|t| **t == "process").count(), 3);

    // A good build at the same paths, reloaded: every route recovers.
    let good = build_cdylib("fixture-configurable");
    for (fault, _) in FAULTS {
        deploy(&good, &libs.path().join(format!("{fault}.so")));
    }
    let (status, answer) = admin(gw.admin, Method::POST, "/admin/plugins/reload").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for (fault, region) in FAULTS {
        let reply = settle(region).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{fault} recovered: {}", reply.body);
        assert_eq!(reply.json()["fund_pay_fen"], 5000);
    }
}
