//! Operability: every metric family shows up with real values after real traffic.

use cardgate_tests::harness::{Card, Options, TestGateway, admin_text, post};
use http::{Method, StatusCode};
use serde_json::json;

fn body(token: &str) -> serde_json::Value {
    json!({
        "token": token, "terminal_id": "POS-1", "total_fen": 10000,
        "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 }]
    })
}

/// The value of the first sample of a family whose line contains every fragment.
fn sample(text: &str, family: &str, fragments: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(family) && fragments.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

#[tokio::test]
async fn metrics_show_every_family_after_traffic() {
    let gw = TestGateway::start(Options {
        extra_toml: "[limits.terminal]\nper_minute = 60\nburst = 3\n".into(),
        ..Options::default()
    })
    .await;
    let mut keep_alive = gw.pharmacy.connect().await.expect("connection");
    let token = gw.token(&Card::beijing(), 120);
    let reply = keep_alive
        .send(Method::POST, "/v1/settlements", &[("idempotency-key", "m-1")], Some(&body(&token).to_string()))
        .await
        .expect("answer");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let forged = post(&gw.pharmacy, "/v1/settlements", Some("m-2"), &body("EC1:NOTATOKEN")).await;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);
    for i in 0..3 {
        post(&gw.pharmacy, "/v1/inquiries", None, &json!({ "token": token, "terminal_id": "POS-1", "n": i })).await;
        post(&gw.pharmacy, "/v1/inquiries", None, &json!({ "token": token, "terminal_id": "POS-1" })).await;
    }
    let stranger = cardgate::dev::Pki::generate().expect("PKI");
    let outsider = stranger.client("outsider").expect("certificate");
    let ca = std::fs::read_to_string(gw.dir.path().join("ca.pem")).expect("CA");
    let refused = cardgate::client::Client::new(gw.addr, &ca, &outsider.cert, &outsider.key).expect("client");
    assert!(refused.send(Method::GET, "/v1/settlements/x", &[], None).await.is_err());

    let (status, text) = admin_text(gw.admin, Method::GET, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let families: [(&str, &[&str]); 11] = [
        ("cardgate_requests_total", &["endpoint=\"settlements\"", "status=\"201\""]),
        ("cardgate_request_duration_seconds_count", &["endpoint=\"settlements\""]),
        ("cardgate_token_rejections_total", &["reason=\"token_malformed\""]),
        ("cardgate_rate_limited_total", &["scope=\"terminal\""]),
        ("cardgate_plugin_calls_total", &["plugin=\"basic-medical\"", "operation=\"settle\"", "outcome=\"ok\""]),
        ("cardgate_plugin_call_duration_seconds_count", &["plugin=\"critical-illness\""]),
        ("cardgate_plugin_breaker_state", &["plugin=\"basic-medical\"", "state=\"closed\""]),
        ("cardgate_ledger_commit_batch_size_count", &[]),
        ("cardgate_ledger_commit_duration_seconds_count", &[]),
        ("cardgate_open_connections", &[]),
        ("cardgate_tls_handshake_failures_total", &[]),
    ];
    for (family, fragments) in families {
        assert!(sample(&text, family, fragments) > 0.0, "{family} {fragments:?} missing or zero in:\n{text}");
    }
    assert!(sample(&text, "cardgate_settlements_total", &["state=\"settled\""]) >= 1.0);
    drop(keep_alive);
}

#[tokio::test]
async fn configuration_reload_applies_or_is_refused_with_every_error() {
    let gw = TestGateway::start(Options::default()).await;
    let settle = |card: Card, key: &'static str| {
        let token = gw.token(&card, 120);
        let gw = &gw;
        async move { post(&gw.pharmacy, "/v1/settlements", Some(key), &body(&token)).await }
    };
    assert_eq!(settle(Card::in_region("440305"), "r-1").await.json()["code"], "no_route");

    // A new route and a revocation list, reloaded while serving.
    let revoked = Card::beijing();
    let revocations = gw.dir.path().join("revoked.json");
    std::fs::write(&revocations, json!({ "cards": [revoked.id] }).to_string()).expect("write");
    gw.reload_config(|text| {
        text.replace("[tokens]\n", "[tokens]\nrevocations = \"revoked.json\"\n")
            + "\n[[routes]]\nregions = [\"44\"]\npayers = [\"basic-medical\"]\n"
    })
    .await
    .expect("a valid configuration reloads");
    assert_eq!(settle(Card::in_region("440305"), "r-2").await.status, StatusCode::CREATED);
    assert_eq!(settle(revoked, "r-3").await.json()["code"], "card_revoked");

    // Three mistakes: refused with all three, and the configuration above keeps serving.
    let problems = gw
        .reload_config(|text| {
            text.replace("clock_skew_secs = 60", "clock_skew_secs = -1")
                .replace("regions = [\"44\"]", "regions = [\"4\"]")
                + "\n[limits.global]\nper_second = 10\nburst = 0\n"
        })
        .await
        .expect_err("refused");
    assert_eq!(problems.len(), 3, "{problems:?}");
    for key in ["tokens.clock_skew_secs", "routes[2].regions", "limits.global.burst"] {
        assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
    }
    assert_eq!(settle(Card::in_region("440305"), "r-4").await.status, StatusCode::CREATED);

    // The ledger is kept across reloads: changing its engine (or database) needs a restart,
    // and says so.
    let engine = cardgate_tests::harness::test_engine();
    let (was, now) = match (engine.as_str(), &gw.database) {
        (_, Some(database)) => (format!("url = \"{}\"", database.url), "url = \"postgres://elsewhere/db\"".to_owned()),
        ("lsm", None) => ("engine = \"lsm\"".to_owned(), "engine = \"sqlite\"".to_owned()),
        _ => ("engine = \"sqlite\"".to_owned(), "engine = \"lsm\"".to_owned()),
    };
    let problems = gw
        .reload_config(|text| {
            assert!(text.contains(&was), "{text}");
            // The good configuration of above, its ledger changed.
            text.replace("clock_skew_secs = -1", "clock_skew_secs = 60")
                .replace("regions = [\"4\"]", "regions = [\"44\"]")
                .replace("\n[limits.global]\nper_second = 10\nburst = 0\n", "")
                .replace(&was, &now)
        })
        .await
        .expect_err("refused");
    assert_eq!(problems.len(), 1, "{problems:?}");
    let what = if gw.database.is_some() { "database" } else { "engine" };
    assert!(problems[0].contains(what) && problems[0].contains("restart"), "{problems:?}");
    assert_eq!(settle(Card::in_region("440305"), "r-5").await.status, StatusCode::CREATED);
}
