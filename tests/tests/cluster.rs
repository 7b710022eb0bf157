//! Cluster mode: three gateway nodes on one PostgreSQL database, each with its own memory (card
//! locks, replay cache, connection pool), as three machines behind a load balancer would be.
//! Every guarantee of one node must hold across them, enforced by the database.
//!
//! Run when `CARDGATE_TEST_POSTGRES` names a server (`.ci/run` sets it); skipped, saying so,
//! when not.

use std::net::SocketAddr;

use cardgate::client::Client;
use cardgate_tests::harness::{Card, Options, Setup, post, postgres_server, serve_setup};
use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// Three nodes of one cluster: one configuration, one database, three gateways.
struct Cluster {
    setup: Setup,
    nodes: Vec<(SocketAddr, oneshot::Sender<()>)>,
}

impl Cluster {
    /// `None` (and a line saying the test was skipped) without a PostgreSQL server.
    async fn start(test: &str) -> Option<Self> {
        if postgres_server().is_none() {
            eprintln!("SKIPPED (set CARDGATE_TEST_POSTGRES=postgres://user@host/db to run): cluster::{test}");
            return None;
        }
        let setup = Setup::create(&Options { engine: Some("postgres"), ..Options::default() }, "127.0.0.1:0");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(serve_setup(&setup).await);
        }
        Some(Self { setup, nodes })
    }

    /// A pharmacy till's client of node `n`.
    fn pharmacy(&self, n: usize) -> Client {
        self.setup.client(self.nodes[n % self.nodes.len()].0, 1)
    }
}

fn bill(token: &str) -> Value {
    json!({
        "token": token, "terminal_id": "POS-01", "total_fen": 20000,
        "lines": [{ "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 1, "unit_price_fen": 20000, "amount_fen": 20000 }]
    })
}

fn key(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Posts until the answer is final: a till retries a 503 (a conflict not settled in a few
/// tries, nothing recorded) and a 409 `request_in_progress` with the same key.
async fn settle(client: &Client, key: &str, body: &Value) -> cardgate::client::Reply {
    for _ in 0..60 {
        let reply = post(client, "/v1/settlements", Some(key), body).await;
        let in_progress = reply.status == StatusCode::CONFLICT && reply.body.contains("request_in_progress");
        if reply.status != StatusCode::SERVICE_UNAVAILABLE && !in_progress {
            return reply;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no final answer after 60 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_raced_on_three_nodes_settles_once() {
    let Some(cluster) = Cluster::start("one_token_raced_on_three_nodes_settles_once").await else { return };
    for round in 0..10 {
        let body = bill(&cluster.setup.token(&Card::beijing(), 120));
        let tasks: Vec<_> = (0..3)
            .map(|n| {
                let (client, body, key) = (cluster.pharmacy(n), body.clone(), key("race"));
                tokio::spawn(async move { settle(&client, &key, &body).await })
            })
            .collect();
        let mut created = 0;
        for task in tasks {
            let reply = task.await.expect("task");
            match reply.status {
                StatusCode::CREATED => created += 1,
                StatusCode::CONFLICT => assert!(reply.body.contains("token_replayed"), "round {round}: {}", reply.body),
                other => panic!("round {round}: {other}: {}", reply.body),
            }
        }
        assert_eq!(created, 1, "round {round}: the token settled {created} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_on_two_nodes_at_once_is_one_settlement_with_one_answer() {
    let Some(cluster) =
        Cluster::start("one_idempotency_key_on_two_nodes_at_once_is_one_settlement_with_one_answer").await
    else {
        return;
    };
    for round in 0..5 {
        let (body, key) = (bill(&cluster.setup.token(&Card::beijing(), 120)), key("twice"));
        let tasks: Vec<_> = (0..2)
            .map(|n| {
                let (client, body, key) = (cluster.pharmacy(n), body.clone(), key.clone());
                tokio::spawn(async move { settle(&client, &key, &body).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            let reply = task.await.expect("task");
            assert_eq!(reply.status, StatusCode::CREATED, "round {round}: {}", reply.body);
            answers.push(reply.json());
        }
        // Later, on the third node: the same answer again.
        let later = settle(&cluster.pharmacy(2), &key, &body).await;
        assert_eq!(later.status, StatusCode::CREATED, "{}", later.body);
        answers.push(later.json());
        assert!(answers.iter().all(|a| *a == answers[0]), "round {round}: answers differ: {answers:?}");
        // One settlement: the receipt's id is known to every node.
        let id = answers[0]["settlement_id"].as_str().expect("id");
        for n in 0..3 {
            let reply = cardgate_tests::harness::get(&cluster.pharmacy(n), &format!("/v1/settlements/{id}")).await;
            assert_eq!(reply.status, StatusCode::OK, "node {n}: {}", reply.body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_bills_of_one_card_over_three_nodes_take_what_they_take_one_by_one() {
    let Some(cluster) =
        Cluster::start("twenty_bills_of_one_card_over_three_nodes_take_what_they_take_one_by_one").await
    else {
        return;
    };
    for round in 0..2 {
        let card = Card::beijing();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (client, body, key) = (cluster.pharmacy(i), bill(&cluster.setup.token(&card, 120)), key("burst"));
                tokio::spawn(async move { settle(&client, &key, &body).await })
            })
            .collect();
        let (mut fund, mut account) = (0, 0);
        for task in tasks {
            let reply = task.await.expect("task");
            assert_eq!(reply.status, StatusCode::CREATED, "round {round}: {}", reply.body);
            let receipt = reply.json();
            fund += receipt["fund_pay_fen"].as_i64().expect("fund");
            account += receipt["account_pay_fen"].as_i64().expect("account");
        }
        // Exactly what the same twenty bills take one after another (tests/concurrency.rs):
        // 4 x 200 yuan of deductible from the account, then 16 x (160 fund + 40 account).
        assert_eq!((fund, account), (256_000, 144_000), "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settlement_is_reversed_and_reconciled_from_any_node() {
    let Some(cluster) = Cluster::start("a_settlement_is_reversed_and_reconciled_from_any_node").await else { return };
    let card = Card::beijing();
    let receipt = settle(&cluster.pharmacy(0), &key("rev"), &bill(&cluster.setup.token(&card, 120))).await.json();
    let id = receipt["settlement_id"].as_str().expect("id");
    let reversal =
        post(&cluster.pharmacy(1), &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "returned" }))
            .await;
    assert_eq!(reversal.status, StatusCode::OK, "{}", reversal.body);
    // Reversed once: a second reversal on the third node answers the same reversal.
    let again =
        post(&cluster.pharmacy(2), &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "returned" }))
            .await;
    assert_eq!((again.status, again.json()), (StatusCode::OK, reversal.json()));
    let day = receipt["settled_at"].as_str().expect("settled_at");
    let date = cardgate::ledger::business_day(
        time::OffsetDateTime::parse(day, &time::format_description::well_known::Rfc3339)
            .expect("time")
            .unix_timestamp(),
    );
    for n in 0..3 {
        let reply =
            cardgate_tests::harness::get(&cluster.pharmacy(n), &format!("/v1/reconciliation?date={date}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let day = reply.json();
        assert_eq!((day["settled"]["count"].as_u64(), day["reversed"]["count"].as_u64()), (Some(1), Some(1)), "{day}");
        assert_eq!(day["net"]["total_fen"], 0, "{day}");
    }
}
