//! The same card from many connections at once: concurrent settlements (and reversals) of one
//! card must move its year-to-date figures exactly as the same bills settled one after another
//! — never spending the personal account or the deductible twice.

use cardgate_tests::harness::{
    Card, Options, Setup, TestGateway, class_a_bill, created_else_conflict, now, post, serve_setup, unique_key,
};
use http::StatusCode;
use serde_json::{Value, json};

/// Sums of what a set of receipts took: (fund, account).
fn sums(receipts: &[Value]) -> (i64, i64) {
    receipts.iter().fold((0, 0), |(fund, account), r| {
        (fund + r["fund_pay_fen"].as_i64().unwrap_or(0), account + r["account_pay_fen"].as_i64().unwrap_or(0))
    })
}

/// The card's basic-medical accumulators as the ledger holds them.
async fn accumulators(gw: &TestGateway, card: &Card) -> cardgate_sdk::YearToDate {
    let gateway = gw.live().gateway();
    let year = time::OffsetDateTime::from_unix_timestamp(now() + 8 * 3600).expect("now").year();
    let card_hash = gateway.card_key.hash(&card.id);
    gateway.ledger.accumulators(&card_hash, "basic-medical", year).await.expect("accumulators")
}

async fn settle_at_once(gw: &TestGateway, card: &Card, bills: usize) -> Vec<Value> {
    let tasks: Vec<_> = (0..bills)
        .map(|_| {
            let (client, body) = (gw.pharmacy.clone(), class_a_bill(&gw.token(card, 120)));
            tokio::spawn(async move { post(&client, "/v1/settlements", Some(&unique_key("burst")), &body).await })
        })
        .collect();
    let mut receipts = Vec::new();
    for task in tasks {
        let reply = task.await.expect("task");
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        receipts.push(reply.json());
    }
    receipts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_bills_of_one_card_at_once_take_what_they_take_one_by_one() {
    let gw = TestGateway::start(Options::default()).await;
    let sequential_card = Card::beijing();
    let mut sequential = Vec::new();
    for _ in 0..20 {
        let reply = post(
            &gw.pharmacy,
            "/v1/settlements",
            Some(&unique_key("one")),
            &class_a_bill(&gw.token(&sequential_card, 120)),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        sequential.push(reply.json());
    }
    // 4 x 200 yuan of deductible from the account, then 16 x (160 fund + 40 account).
    assert_eq!(sums(&sequential), (256_000, 144_000));
    let expected = accumulators(&gw, &sequential_card).await;
    assert_eq!((expected.deductible_fen, expected.account_paid_fen), (80_000, 144_000));

    for round in 0..4 {
        let card = Card::beijing();
        let receipts = settle_at_once(&gw, &card, 20).await;
        assert_eq!(sums(&receipts), sums(&sequential), "round {round}: the burst took other amounts");
        let held = accumulators(&gw, &card).await;
        assert!(held.account_paid_fen <= 200_000, "round {round}: account overspent: {held:?}");
        assert!(held.deductible_fen <= 80_000, "round {round}: deductible over-charged: {held:?}");
        assert_eq!(held, expected, "round {round}: the figures differ from the sequential run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reversals_and_settlements_of_one_card_at_once_leave_the_figures_of_what_stands() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let first = settle_at_once(&gw, &card, 10).await;
    // Reverse all ten while ten more settle, all at once.
    let reversals: Vec<_> = first
        .iter()
        .map(|r| {
            let (client, id) = (gw.pharmacy.clone(), r["settlement_id"].as_str().expect("id").to_owned());
            tokio::spawn(async move {
                post(&client, &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "returned" })).await
            })
        })
        .collect();
    let second = settle_at_once(&gw, &card, 10).await;
    for reversal in reversals {
        let reply = reversal.await.expect("task");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    // What stands is the second ten: the figures are exactly theirs.
    let (fund, account) = sums(&second);
    let held = accumulators(&gw, &card).await;
    assert_eq!((held.fund_paid_fen, held.account_paid_fen), (fund, account), "{held:?}");
    assert!(held.account_paid_fen <= 200_000 && held.deductible_fen <= 80_000, "{held:?}");
    assert!(held.deductible_fen >= 0 && held.account_paid_fen >= 0, "{held:?}");
}

/// Two gateways on one ledger file, as two processes of one node (or a node and its
/// replacement) could be: neither one's in-process card lock sees the other's settlements, so
/// only the ledger's conditional commit stands between them and a double spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_sharing_a_ledger_never_spend_a_card_twice() {
    // The SQLite engine lets two processes share its file: its conditional commit must hold.
    // (The default engine refuses a second gateway outright: the test after this one.)
    let setup = Setup::create(&Options { engine: Some("sqlite"), ..Options::default() }, "127.0.0.1:0");
    let text = std::fs::read_to_string(setup.dir.path().join("cardgate.toml")).expect("config");
    assert!(text.contains("engine = \"sqlite\""), "{text}");
    let ((first, _stop_first), (second, _stop_second)) = (serve_setup(&setup).await, serve_setup(&setup).await);
    let clients = [setup.client(first, 1), setup.client(second, 1)];
    let card = Card::beijing();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (client, body) = (clients[i % 2].clone(), class_a_bill(&setup.token(&card, 120)));
            let key = unique_key("two-nodes");
            tokio::spawn(async move {
                // A conflict the ledger could not settle in three tries is a 503 with nothing
                // recorded: the till retries with the same key, as it would.
                for _ in 0..30 {
                    let reply = post(&client, "/v1/settlements", Some(&key), &body).await;
                    if reply.status != http::StatusCode::SERVICE_UNAVAILABLE {
                        return reply;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                panic!("still refused after 30 tries");
            })
        })
        .collect();
    let mut receipts = Vec::new();
    for task in tasks {
        let reply = task.await.expect("task");
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        receipts.push(reply.json());
    }
    // Exactly what the same twenty bills take one after another.
    assert_eq!(sums(&receipts), (256_000, 144_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_the_same_embedded_ledger_refuses_to_start() {
    // The log-structured engine: one process per ledger.
    let setup = Setup::create(&Options { engine: Some("lsm"), ..Options::default() }, "127.0.0.1:0");
    let (_first, _stop) = serve_setup(&setup).await;
    let config =
        cardgate::config::Config::load(&setup.dir.path().join("cardgate.toml"), &Default::default()).expect("config");
    let second = cardgate::service::Gateway::build(config, std::sync::Arc::new(cardgate::service::SystemClock));
    let problems = second.expect_err("a second gateway on the same ledger").to_string();
    assert!(problems.contains("open in another process"), "{problems}");
}

/// A till on a flaky network: the same bill, with its one key, sent from twenty connections at
/// once (each retry on a new connection while the first is still being answered). One
/// settlement: every answer is it (201, its id) or "still being processed" (409
/// `request_in_progress`, which the till retries), and the card is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_bill_sent_twenty_times_at_once_with_its_key_settles_once() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let body = class_a_bill(&gw.token(&card, 120));
    let key = unique_key("retried");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, body, key) = (gw.pharmacy.clone(), body.clone(), key.clone());
            tokio::spawn(async move { post(&client, "/v1/settlements", Some(&key), &body).await })
        })
        .collect();
    let created = created_else_conflict(tasks, "request_in_progress", "one key twenty times").await;
    let ids: std::collections::HashSet<&str> =
        created.iter().map(|r| r["settlement_id"].as_str().expect("id")).collect();
    assert!(!created.is_empty(), "no answer was the settlement");
    assert_eq!(ids.len(), 1, "one key settled more than once: {ids:?}");
    // The till's retry after the storm: the same settlement again.
    let again = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert!(ids.contains(again.json()["settlement_id"].as_str().expect("id")));
    // One bill of 200 yuan: 200 yuan of the deductible, from the account; charged once.
    let held = accumulators(&gw, &card).await;
    assert_eq!((held.deductible_fen, held.account_paid_fen), (20_000, 20_000), "{held:?}");
}

/// One QR code scanned at twenty tills at once (twenty keys, one token): one settlement, every
/// other answer `token_replayed`, the card charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_token_at_twenty_tills_at_once_settles_once() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let body = class_a_bill(&gw.token(&card, 120));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (client, body) = (gw.pharmacy.clone(), body.clone());
            tokio::spawn(async move { post(&client, "/v1/settlements", Some(&unique_key("till")), &body).await })
        })
        .collect();
    let created = created_else_conflict(tasks, "token_replayed", "one token at twenty tills").await;
    assert_eq!(created.len(), 1, "the token settled {} times", created.len());
    let held = accumulators(&gw, &card).await;
    assert_eq!((held.deductible_fen, held.account_paid_fen), (20_000, 20_000), "{held:?}");
}
