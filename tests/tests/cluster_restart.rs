//! The cluster's database restarted mid-traffic (a real PostgreSQL restart, as a failover or an
//! upgrade does): requests meanwhile get 503 (or wait), nothing acknowledged is lost, nothing
//! settles twice, and the gateway serves again without being restarted.
//!
//! Alone in its test binary (it restarts the server every test of the binary would use). Runs
//! when `CARDGATE_TEST_POSTGRES` names the server and `CARDGATE_TEST_POSTGRES_RESTART` is a
//! shell command that restarts it (`.ci/run` sets both); skipped, saying so, otherwise.

use cardgate_tests::harness::{
    Card, Options, Setup, class_a_bill, get, postgres_server, serve_setup_with_admin, settle_until_final,
};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_mid_traffic_loses_nothing_and_the_gateway_serves_again() {
    let test = "postgres_restarted_mid_traffic_loses_nothing_and_the_gateway_serves_again";
    let restart = std::env::var("CARDGATE_TEST_POSTGRES_RESTART").ok().filter(|c| !c.is_empty());
    let (Some(_), Some(restart)) = (postgres_server(), restart) else {
        eprintln!(
            "SKIPPED (set CARDGATE_TEST_POSTGRES and CARDGATE_TEST_POSTGRES_RESTART, a command restarting it): {test}"
        );
        return;
    };
    let setup = Setup::create(&Options { engine: Some("postgres"), ..Options::default() }, "127.0.0.1:0");
    let (addr, admin, _stop) = serve_setup_with_admin(&setup).await;
    let client = setup.client(addr, 1);
    let tills: Vec<_> = (0..4)
        .map(|t| {
            let (client, bodies) = (
                client.clone(),
                (0..10).map(|_| class_a_bill(&setup.token(&Card::beijing(), 600))).collect::<Vec<_>>(),
            );
            tokio::spawn(async move {
                let mut answered = Vec::new();
                for (n, body) in bodies.into_iter().enumerate() {
                    let key = format!("restart-{t}-{n}-{}", std::process::id());
                    let (reply, unavailable) = settle_until_final(&client, &key, &body).await;
                    // What a database restart may answer meanwhile: the ledger unavailable, nothing else.
                    assert!(unavailable.iter().all(|code| code == "storage_unavailable"), "{key}: {unavailable:?}");
                    let unavailable = unavailable.len();
                    assert_eq!(reply.status, StatusCode::CREATED, "{key}: {}", reply.body);
                    answered.push((key, reply.json()["settlement_id"].as_str().expect("id").to_owned(), unavailable));
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                answered
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let restarted = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh").args(["-c", &restart]).status().expect("the restart command")
    })
    .await
    .expect("restart");
    assert!(restarted.success(), "the restart command failed");
    let (mut ids, mut unavailable) = (std::collections::BTreeSet::new(), 0);
    for till in tills {
        for (key, id, refused) in till.await.expect("till") {
            unavailable += refused;
            let reply = get(&client, &format!("/v1/settlements/{id}")).await;
            assert_eq!((reply.status, reply.json()["state"].as_str()), (StatusCode::OK, Some("settled")), "{key}");
            assert!(ids.insert(id), "{key}: one settlement answered for two keys");
        }
    }
    assert_eq!(ids.len(), 40, "every bill settled once");
    eprintln!("{test}: {unavailable} answers were 503 storage_unavailable while the database restarted");
    let (status, ready) = cardgate_tests::harness::admin(admin, http::Method::GET, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
}
