//! The API over HTTP/2 (ALPN `h2`), as clients that prefer it (curl, Go, Java's and OkHttp's
//! clients) use it: many requests as streams of one connection, the same card from many streams
//! at once, and answers the gateway gives before it has read the whole body (413, 429, 403)
//! arriving as answers, not as reset streams.

use cardgate::client::{Connection, Reply};
use cardgate_tests::harness::{Card, Options, TestGateway, class_a_bill, unique_key};
use http::{Method, StatusCode};
use serde_json::{Value, json};

async fn send(connection: &mut Connection, method: Method, path: &str, key: Option<&str>, body: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = key.map(|k| ("idempotency-key", k)).into_iter().collect();
    connection.send(method, path, &headers, body).await.unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settlements_as_streams_of_one_connection_take_what_they_take_one_by_one() {
    let gw = TestGateway::start(Options::default()).await;
    let mut connection = gw.pharmacy.connect_h2().await.expect("an HTTP/2 connection");
    let card = Card::beijing();
    // Twenty bills of one card at once, each a stream of the one connection.
    let streams: Vec<_> = (0..20)
        .map(|_| {
            let mut stream = connection.stream().expect("HTTP/2 multiplexes");
            let body = class_a_bill(&gw.token(&card, 120)).to_string();
            tokio::spawn(async move {
                send(&mut stream, Method::POST, "/v1/settlements", Some(&unique_key("h2")), Some(&body)).await
            })
        })
        .collect();
    let mut receipts: Vec<Value> = Vec::new();
    for stream in streams {
        let reply = stream.await.expect("task");
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        receipts.push(reply.json());
    }
    // As over HTTP/1.1 (tests/concurrency.rs): 4 x 200 yuan of deductible from the account,
    // then 16 x (160 fund + 40 account) — the account spent exactly once.
    let sum = |field: &str| receipts.iter().map(|r| r[field].as_i64().expect(field)).sum::<i64>();
    assert_eq!((sum("fund_pay_fen"), sum("account_pay_fen")), (256_000, 144_000));
    for receipt in &receipts {
        let parts = ["fund_pay_fen", "account_pay_fen", "cash_pay_fen"].map(|f| receipt[f].as_i64().expect(f));
        assert_eq!(parts.iter().sum::<i64>(), receipt["total_fen"].as_i64().expect("total"), "{receipt}");
    }
    // The same connection reads one back.
    let id = receipts[0]["settlement_id"].as_str().expect("id").to_owned();
    let read = send(&mut connection, Method::GET, &format!("/v1/settlements/{id}"), None, None).await;
    assert_eq!((read.status, read.json()["settlement_id"].as_str()), (StatusCode::OK, Some(id.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_its_413_on_http2_and_the_connection_serves_on() {
    let gw = TestGateway::start(Options::default()).await;
    let mut connection = gw.pharmacy.connect_h2().await.expect("an HTTP/2 connection");
    // The tests' limit is 64 KiB: a little over it (read and dropped), and far over it
    // (refused from its declared length, before it is read).
    for size in [100_000, 4_000_000] {
        let mut big = class_a_bill(&gw.token(&Card::beijing(), 120));
        big["padding"] = json!("x".repeat(size));
        let reply =
            send(&mut connection, Method::POST, "/v1/settlements", Some(&unique_key("big")), Some(&big.to_string()))
                .await;
        assert_eq!(
            (reply.status, reply.json()["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large")),
            "{size} bytes: {}",
            reply.body
        );
    }
    let body = class_a_bill(&gw.token(&Card::beijing(), 120)).to_string();
    let reply = send(&mut connection, Method::POST, "/v1/settlements", Some(&unique_key("after")), Some(&body)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_before_its_body_is_read_gets_its_429_on_http2() {
    let extra = "[limits.institution]\nper_minute = 60\nburst = 1\n".to_owned();
    let gw = TestGateway::start(Options { extra_toml: extra, ..Options::default() }).await;
    let mut connection = gw.pharmacy.connect_h2().await.expect("an HTTP/2 connection");
    let body = class_a_bill(&gw.token(&Card::beijing(), 120)).to_string();
    let first = send(&mut connection, Method::POST, "/v1/settlements", Some(&unique_key("one")), Some(&body)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    // Over the limit with a body of 60 KB (a few DATA frames): refused from its head, before
    // the gateway reads the body, which may still be on its way.
    let mut padded = class_a_bill(&gw.token(&Card::beijing(), 120));
    padded["padding"] = json!("x".repeat(60_000));
    let refused =
        send(&mut connection, Method::POST, "/v1/settlements", Some(&unique_key("two")), Some(&padded.to_string()))
            .await;
    assert_eq!(
        (refused.status, refused.json()["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")),
        "{}",
        refused.body
    );
    assert!(refused.retry_after.as_deref().and_then(|r| r.parse::<u64>().ok()).is_some_and(|s| s >= 1));
}
