//! The API as docs/API.md promises it, checked from the client's side over real mutual TLS:
//! strict bill lines, identifiers with spaces, 413 that always arrives, media types, 405 with
//! `Allow`, `Retry-After` where a retry helps, and HTTP/1.1 connections that stay open while
//! idle but not while a head dribbles in.

use std::time::{Duration, Instant};

use cardgate::api::model::ID_RULE;
use cardgate_tests::harness::{Card, Options, TestGateway, now_nanos, post};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn line() -> Value {
    json!({ "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 2, "unit_price_fen": 2500, "amount_fen": 5000 })
}

fn bill(token: &str, terminal: &str, line: Value) -> Value {
    json!({ "token": token, "terminal_id": terminal, "total_fen": 5000, "lines": [line] })
}

fn key() -> String {
    format!("contract-{}", now_nanos())
}

/// Sends `request` on a fresh TLS connection as the pharmacy and reads the answer (what
/// arrives within `wait`).
async fn raw(gw: &TestGateway, request: &[u8], wait: Duration) -> String {
    let mut stream = gw.pharmacy.open_tls().await.expect("TLS");
    stream.write_all(request).await.expect("send");
    stream.flush().await.expect("flush");
    let mut answer = vec![0u8; 8192];
    match tokio::time::timeout(wait, stream.read(&mut answer)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&answer[..n]).into_owned(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => String::new(),
    }
}

#[tokio::test]
async fn unknown_fields_in_a_bill_line_are_refused() {
    let gw = TestGateway::start(Options::default()).await;
    let mut extended = line();
    extended["vat_fen"] = json!(0);
    for path in ["/v1/quotes", "/v1/settlements"] {
        let token = gw.token(&Card::beijing(), 120);
        let reply = post(&gw.pharmacy, path, Some(&key()), &bill(&token, "POS-01", extended.clone())).await;
        assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
        assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("vat_fen")), "{}", reply.body);
    }
}

#[tokio::test]
async fn terminal_ids_and_idempotency_keys_may_hold_spaces_but_not_at_their_ends() {
    let gw = TestGateway::start(Options::default()).await;
    let token = gw.token(&Card::beijing(), 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some("order 2026 0001"), &bill(&token, "Window 3", line())).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.json()["terminal_id"], "Window 3");
    // The same key again: the same settlement.
    let again = post(&gw.pharmacy, "/v1/settlements", Some("order 2026 0001"), &bill(&token, "Window 3", line())).await;
    assert_eq!(again.json()["settlement_id"], reply.json()["settlement_id"]);

    let token = gw.token(&Card::beijing(), 120);
    let padded = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &bill(&token, " Window 3", line())).await;
    assert_eq!((padded.status, padded.json()["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    assert!(padded.json()["detail"].as_str().is_some_and(|d| d.contains("terminal_id")), "{}", padded.body);

    // A key that is not visible ASCII is a bad key, not a missing one.
    let body = bill(&gw.token(&Card::beijing(), 120), "POS-01", line()).to_string();
    let request = format!(
        "POST /v1/settlements HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nIdempotency-Key: k\u{e9}y\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw(&gw, request.as_bytes(), Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_request") && answer.contains("Idempotency-Key"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_always_gets_its_413() {
    let gw = TestGateway::start(Options::default()).await;
    // Sent whole, a little over the limit (64 KiB here), five times on one kept-alive
    // connection: a 413 each time, and the connection still serves.
    let mut big = bill(&gw.token(&Card::beijing(), 120), "POS-01", line());
    big["padding"] = json!("x".repeat(100_000));
    let mut connection = gw.pharmacy.connect().await.expect("connect");
    for _ in 0..5 {
        let reply = connection
            .send(Method::POST, "/v1/settlements", &[("idempotency-key", &key())], Some(&big.to_string()))
            .await
            .expect("an answer, not a broken connection");
        assert_eq!(
            (reply.status, reply.json()["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
        );
    }
    let small = connection.send(Method::GET, "/v1/settlements/S-none", &[], None).await.expect("still open");
    assert_eq!(small.status, StatusCode::NOT_FOUND);

    // Declared too large: answered at once, without asking for the body.
    for head in [
        "POST /v1/settlements HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nIdempotency-Key: a\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n",
        "POST /v1/settlements HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nIdempotency-Key: b\r\nContent-Length: 1000000000\r\n\r\n",
    ] {
        let started = Instant::now();
        let answer = raw(&gw, head.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{head:?}: {answer:?}");
        assert!(!answer.contains("100 Continue"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(3), "413 took {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn media_types_are_case_insensitive() {
    let gw = TestGateway::start(Options::default()).await;
    let body = bill(&gw.token(&Card::beijing(), 120), "POS-01", line()).to_string();
    let reply = gw
        .pharmacy
        .send(
            Method::POST,
            "/v1/settlements",
            &[("idempotency-key", &key()), ("content-type", "Application/JSON; charset=UTF-8")],
            Some(&body),
        )
        .await
        .expect("answer");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let wrong = gw
        .pharmacy
        .send(Method::POST, "/v1/quotes", &[("content-type", "application/jsonx")], Some(&body))
        .await
        .expect("answer");
    assert_eq!(wrong.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // A coded body is not decoded: refused as such, not read as a broken JSON object.
    let inquiry = json!({ "token": gw.token(&Card::beijing(), 120), "terminal_id": "POS-01" }).to_string();
    for coding in ["gzip", "identity, gzip", "br"] {
        let coded = gw
            .pharmacy
            .send(Method::POST, "/v1/inquiries", &[("content-encoding", coding)], Some(&inquiry))
            .await
            .expect("answer");
        assert_eq!(
            (coded.status, coded.json()["code"].as_str()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type")),
            "{coding}: {}",
            coded.body
        );
        assert!(coded.json()["detail"].as_str().is_some_and(|d| d.contains("Content-Encoding")), "{}", coded.body);
    }
    let identity = gw
        .pharmacy
        .send(Method::POST, "/v1/inquiries", &[("content-encoding", "Identity")], Some(&inquiry))
        .await
        .expect("answer");
    assert_eq!(identity.status, StatusCode::OK, "{}", identity.body);
}

#[tokio::test]
async fn method_not_allowed_says_which_are() {
    let gw = TestGateway::start(Options::default()).await;
    for (method, path, allow) in [
        (Method::POST, "/v1/reconciliation", "GET, HEAD"),
        (Method::DELETE, "/v1/settlements/S1", "GET, HEAD"),
        (Method::DELETE, "/v1/settlements", "GET, HEAD, POST"),
        (Method::PUT, "/v1/quotes", "POST"),
        (Method::GET, "/v1/reconciliation/closures", "POST"),
    ] {
        let reply = gw.pharmacy.send(method.clone(), path, &[], None).await.expect("answer");
        assert_eq!(
            (reply.status, reply.json()["code"].as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
        );
        let mut connection = gw.pharmacy.connect().await.expect("connect");
        let raw = connection.send(method, path, &[], None).await.expect("answer");
        assert_eq!(raw.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(raw.allow.as_deref(), Some(allow), "{path}");
    }
    let missing = gw.pharmacy.send(Method::GET, "/v1/nothing", &[], None).await.expect("answer");
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_payer_that_is_down_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let down = dir.path().join("down");
    std::fs::write(&down, b"").expect("mark down");
    let extra = format!(
        "\n[plugins.flaky]\nlibrary = \"{}\"\nconfig = {{ down_while_exists = \"{}\" }}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"flaky\"]\n",
        cardgate_sdk::testing::build_cdylib("fixture-configurable").display(),
        down.display()
    );
    let gw = TestGateway::start(Options { extra_toml: extra, ..Options::default() }).await;
    let token = gw.token(&Card::in_region("120101"), 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &bill(&token, "POS-01", line())).await;
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("plugin_unavailable"))
    );
    assert_eq!(reply.retry_after.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_stays_open_but_a_dribbled_head_is_cut() {
    let gw = TestGateway::start(Options::default()).await;
    let mut connection = gw.pharmacy.connect().await.expect("connect");
    assert_eq!(
        connection.send(Method::GET, "/v1/settlements/S1", &[], None).await.expect("first").status,
        StatusCode::NOT_FOUND
    );
    // Longer than the head timeout (5 s), well within the idle timeout (60 s).
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let second =
        connection.send(Method::GET, "/v1/settlements/S2", &[], None).await.expect("the connection stayed open");
    assert_eq!(second.status, StatusCode::NOT_FOUND);

    // Half a head, then nothing: closed after the head timeout.
    let started = Instant::now();
    let mut stream = gw.pharmacy.open_tls().await.expect("TLS");
    stream.write_all(b"GET /v1/settlements/S3 HTTP/1.1\r\nHost: loc").await.expect("send");
    stream.flush().await.expect("flush");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a dribbled head kept the connection open");
    assert!(started.elapsed() < Duration::from_secs(12), "closed after {:?}", started.elapsed());
}

#[tokio::test]
async fn documented_choices_hold_request_ids_and_line_amounts() {
    let gw = TestGateway::start(Options::default()).await;
    // A request id outside [A-Za-z0-9-_.]{1,64} is replaced by one of the gateway's.
    let reply = gw
        .pharmacy
        .send(Method::GET, "/v1/settlements/S1", &[("x-request-id", "bad id!")], None)
        .await
        .expect("answer");
    assert!(!reply.request_id.is_empty() && reply.request_id != "bad id!");
    let kept = gw
        .pharmacy
        .send(Method::GET, "/v1/settlements/S1", &[("x-request-id", "till-7.42")], None)
        .await
        .expect("answer");
    assert_eq!(kept.request_id, "till-7.42");
    // A line's amount is quantity x unit price, rounded half up to the fen (the national rule):
    // a discount is a lower unit price, not an amount that disagrees.
    let token = gw.token(&Card::beijing(), 120);
    let mut discounted = line();
    discounted["amount_fen"] = json!(4000);
    let body = json!({ "token": token, "terminal_id": "POS-01", "total_fen": 4000, "lines": [discounted] });
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &body).await;
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request")),
        "{}",
        reply.body
    );
    assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("5000")), "{}", reply.body);
    // Half a pack at 25.01 yuan is 12.505 yuan: 1,251 fen.
    let half = json!({ "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": "0.5", "unit_price_fen": 2501, "amount_fen": 1251 });
    let body = json!({ "token": token, "terminal_id": "POS-01", "total_fen": 1251, "lines": [half] });
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &body).await;
    assert_eq!((reply.status, reply.json()["total_fen"].as_i64()), (StatusCode::CREATED, Some(1251)), "{}", reply.body);
}

fn today() -> String {
    let now = time::OffsetDateTime::now_utc() + time::Duration::hours(8);
    format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day())
}

#[tokio::test]
async fn an_his_lists_its_settlements_page_by_page_with_a_cursor() {
    let gw = TestGateway::start(Options::default()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let token = gw.token(&Card::beijing(), 120);
        let terminal = if i % 2 == 0 { "Window 1" } else { "Window 2" };
        let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &bill(&token, terminal, line())).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        ids.push(reply.json()["settlement_id"].as_str().expect("id").to_owned());
    }
    let reversed = post(&gw.pharmacy, &format!("/v1/settlements/{}/reversal", ids[1]), None, &json!({})).await;
    assert_eq!(reversed.status, StatusCode::OK);
    let list = |query: String| {
        let client = gw.pharmacy.clone();
        async move {
            let reply = client.send(Method::GET, &format!("/v1/settlements?{query}"), &[], None).await.expect("answer");
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
            reply.json()
        }
    };
    // Two at a time, following the cursor: every settlement once, in order.
    let (mut seen, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let page =
            list(format!("date={}&limit=2{}", today(), cursor.map(|c| format!("&cursor={c}")).unwrap_or_default()))
                .await;
        for s in page["settlements"].as_array().expect("settlements") {
            seen.push(s["settlement_id"].as_str().expect("id").to_owned());
            assert!(s["card"].as_str().is_some_and(|c| c.contains('*')), "masked: {s}");
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    let window = list(format!("date={}&terminal_id=Window%202", today())).await;
    assert_eq!(window["settlements"].as_array().map(Vec::len), Some(2));
    let back = list(format!("date={}&state=reversed", today())).await;
    assert_eq!(back["settlements"][0]["settlement_id"].as_str(), Some(ids[1].as_str()));
    assert!(back["settlements"][0]["fund_pay_fen"].as_i64().is_some(), "{back}");
    let now = time::OffsetDateTime::now_utc();
    let format = &time::format_description::well_known::Rfc3339;
    let from = (now - time::Duration::hours(1)).format(format).expect("time").replace('+', "%2B");
    let to = (now + time::Duration::hours(1)).format(format).expect("time").replace('+', "%2B");
    assert_eq!(list(format!("from={from}&to={to}")).await["settlements"].as_array().map(Vec::len), Some(5));
    // Another institution sees none of them; a made-up cursor is refused.
    let other =
        gw.hospital.send(Method::GET, &format!("/v1/settlements?date={}", today()), &[], None).await.expect("answer");
    assert_eq!(other.json()["settlements"].as_array().map(Vec::len), Some(0));
    let bad = gw.pharmacy.send(Method::GET, &format!("/v1/settlements?date={}&cursor=zz", today()), &[], None).await;
    assert_eq!(bad.expect("answer").status, StatusCode::BAD_REQUEST);
    let neither = gw.pharmacy.send(Method::GET, "/v1/settlements", &[], None).await.expect("answer");
    assert_eq!(neither.status, StatusCode::BAD_REQUEST);
    // A filter no terminal can have is the client's mistake, not an empty page; a parameter
    // given twice is refused rather than one of the two silently used.
    let day = today();
    for (query, detail) in [
        (format!("date={day}&terminal_id=%20POS"), ID_RULE.replace("{field}", "terminal_id")),
        (format!("date={day}&terminal_id={}", "T".repeat(65)), ID_RULE.replace("{field}", "terminal_id")),
        (format!("date={day}&terminal_id="), ID_RULE.replace("{field}", "terminal_id")),
        (format!("date={day}&state=settled&state=reversed"), "state: given more than once".into()),
        (format!("date={day}&date={day}"), "date: given more than once".into()),
    ] {
        let reply = gw.pharmacy.send(Method::GET, &format!("/v1/settlements?{query}"), &[], None).await;
        let reply = reply.expect("answer");
        assert_eq!(
            (reply.status, reply.json()["code"].as_str(), reply.json()["detail"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"), Some(detail.as_str())),
            "{query}"
        );
    }
}

/// A request body is one JSON object. serde reads a struct from an array of its fields too, so
/// `[]` was taken as `{}` (and reversed a settlement); anything but an object is refused now
/// and changes nothing. An empty body still means "no fields" where every field is optional.
#[tokio::test]
async fn a_body_that_is_not_a_json_object_is_refused() {
    let gw = TestGateway::start(Options::default()).await;
    let token = gw.token(&Card::beijing(), 120);
    let settled = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &bill(&token, "POS-01", line())).await;
    assert_eq!(settled.status, StatusCode::CREATED, "{}", settled.body);
    let id = settled.json()["settlement_id"].as_str().expect("id").to_owned();
    let reversal = format!("/v1/settlements/{id}/reversal");
    // A form feed is not JSON whitespace (RFC 8259): not an empty body either.
    for body in ["[]", r#"["mistake"]"#, "null", r#""reverse""#, "1", "true", "\u{c}", "\u{c}{}"] {
        let reply = gw.pharmacy.send(Method::POST, &reversal, &[], Some(body)).await.expect("answer");
        assert_eq!(
            (reply.status, reply.json()["code"].as_str(), reply.json()["detail"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"), Some("body: a JSON object")),
            "{body}"
        );
    }
    let record = gw.pharmacy.send(Method::GET, &format!("/v1/settlements/{id}"), &[], None).await.expect("answer");
    assert_eq!(record.json()["state"], "settled", "{}", record.body);
    let fresh = gw.token(&Card::beijing(), 120);
    let positional = json!([fresh, null, null, "POS-01", null, 5000, [line()]]).to_string();
    for path in ["/v1/quotes", "/v1/settlements", "/v1/inquiries"] {
        let reply = gw.pharmacy.send(Method::POST, path, &[("idempotency-key", &key())], Some(&positional)).await;
        let reply = reply.expect("answer");
        assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    }
    // An empty body where every field is optional: the reversal itself.
    let reply = gw.pharmacy.send(Method::POST, &reversal, &[], Some("")).await.expect("answer");
    assert!(reply.status.is_success(), "{} {}", reply.status, reply.body);
    let record = gw.pharmacy.send(Method::GET, &format!("/v1/settlements/{id}"), &[], None).await.expect("answer");
    assert_eq!(record.json()["state"], "reversed", "{}", record.body);
}
