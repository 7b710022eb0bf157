//! Graceful shutdown of the real daemon: SIGTERM with 50 requests in flight answers all 50, then
//! the process exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::harness::{Card, Options, Setup};
use cardgate_tests::{cardgate_binary, listen_addr};
use http::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_request_in_flight_then_exits_zero() {
    let addr = listen_addr();
    let slow = format!(
        "\n[plugins.slow]\nlibrary = \"{}\"\ntimeout_ms = 5000\nconfig = {{ delay_ms = 300, fund_bp = 5000 }}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"slow\"]\n",
        build_cdylib("fixture-configurable").display()
    );
    let setup = Setup::create(&Options { extra_toml: slow, ..Options::default() }, &addr.to_string());
    let mut child = Command::new(cardgate_binary())
        .args(["serve", "--config"])
        .arg(setup.dir.path().join("cardgate.toml"))
        .env("CARDGATE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start cardgate");
    let client = setup.client(addr, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.send(Method::GET, "/v1/settlements/none", &[], None).await.is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            let body = json!({
                "token": setup.token(&Card::in_region("120101"), 120), "terminal_id": "POS-1", "total_fen": 1000,
                "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 1000, "amount_fen": 1000 }]
            });
            tokio::spawn(async move {
                let key = format!("drain-{i}");
                client.send(Method::POST, "/v1/settlements", &[("idempotency-key", key.as_str())], Some(&body.to_string())).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(term.success());
    let mut answered = 0;
    for request in requests {
        let reply = request.await.expect("task").expect("answered, not cut off");
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        answered += 1;
    }
    assert_eq!(answered, 50);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert_eq!(status.code(), Some(0), "clean exit after draining");
    assert!(client.send(Method::GET, "/v1/settlements/none", &[], None).await.is_err(), "no longer serving");
}
