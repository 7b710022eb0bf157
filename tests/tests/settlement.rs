//! End-to-end: the real daemon over real mutual TLS, as pharmacy tills and hospital billing
//! systems use it.

use cardgate_tests::harness::{Card, Options, TestGateway, get, now, post};
use http::StatusCode;
use serde_json::{Value, json};

fn bill() -> Value {
    json!([
        { "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 10, "unit_price_fen": 10000, "amount_fen": 100000 },
        { "code": "XB02", "name": "CT scan", "category": "class_b", "quantity": 1, "unit_price_fen": 50000, "amount_fen": 50000 },
        { "code": "XC03", "name": "Single room", "category": "class_c", "quantity": 1, "unit_price_fen": 20000, "amount_fen": 20000 }
    ])
}

fn settle_body(token: &str) -> Value {
    json!({ "token": token, "terminal_id": "POS-01", "total_fen": 170000, "lines": bill() })
}

fn key() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("key-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[tokio::test]
async fn pharmacy_one_step_settlement_has_the_exact_split() {
    let gw = TestGateway::start(Options::default()).await;
    let token = gw.token(&Card::beijing(), 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&token)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.content_type, "application/json");
    assert!(!reply.request_id.is_empty());
    let r = reply.json();
    assert_eq!(r["state"], "settled");
    assert_eq!(r["institution_id"], "P110105002");
    // Basic medical at a pharmacy (80%): 800 yuan deductible, then 80% of 650 yuan; the account
    // pays the in-policy rest; class C is cash. Critical illness: nothing below its threshold.
    assert_eq!((r["total_fen"].as_i64(), r["fund_pay_fen"].as_i64()), (Some(170000), Some(52000)));
    assert_eq!((r["account_pay_fen"].as_i64(), r["cash_pay_fen"].as_i64()), (Some(98000), Some(20000)));
    assert_eq!(r["payers"].as_array().map(Vec::len), Some(2));
    assert_eq!(r["payers"][0]["payer"], "basic-medical");
    assert_eq!(r["funds"][0], json!({ "payer": "basic-medical", "fund": "basic_pooling", "amount_fen": 52000 }));
    assert!(r["card"].as_str().is_some_and(|c| c.contains("****")), "card is masked: {}", r["card"]);
    let settlement_id = r["settlement_id"].as_str().expect("id");
    let stored = get(&gw.pharmacy, &format!("/v1/settlements/{settlement_id}")).await;
    assert_eq!(stored.status, StatusCode::OK);
    assert_eq!(stored.json()["cash_pay_fen"], 20000);
    // Another institution cannot see it.
    assert_eq!(get(&gw.hospital, &format!("/v1/settlements/{settlement_id}")).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn hospital_settles_a_quote_after_the_qr_code_expired() {
    let gw = TestGateway::start(Options { clock_skew_secs: 0, ..Options::default() }).await;
    let card = Card::beijing();
    let token = gw.token(&card, 2);
    let body = json!({ "token": token, "terminal_id": "HIS-7", "total_fen": 170000, "lines": bill() });
    let quote = post(&gw.hospital, "/v1/quotes", None, &body).await;
    assert_eq!(quote.status, StatusCode::CREATED, "{}", quote.body);
    let quote = quote.json();
    assert_eq!((quote["state"].as_str(), quote["fund_pay_fen"].as_i64()), (Some("quoted"), Some(52000)));
    let quote_id = quote["quote_id"].as_str().expect("quote id").to_owned();

    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let late = post(&gw.hospital, "/v1/settlements", Some(&key()), &settle_body(&token)).await;
    assert_eq!((late.status, late.json()["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_expired")));

    let by_quote = json!({ "quote_id": quote_id, "terminal_id": "HIS-7" });
    let receipt = post(&gw.hospital, "/v1/settlements", Some(&key()), &by_quote).await;
    assert_eq!(receipt.status, StatusCode::CREATED, "{}", receipt.body);
    let receipt = receipt.json();
    assert_eq!(receipt["quote_id"].as_str(), Some(quote_id.as_str()));
    assert_eq!((receipt["fund_pay_fen"].as_i64(), receipt["cash_pay_fen"].as_i64()), (Some(52000), Some(20000)));
    // A quote settles once; the pharmacy cannot use the hospital's quote.
    let again = post(&gw.hospital, "/v1/settlements", Some(&key()), &by_quote).await;
    assert_eq!(again.json()["code"], "quote_already_settled");
    let foreign = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &by_quote).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn family_delegated_token_puts_the_delegate_on_the_receipt() {
    let gw = TestGateway::start(Options::default()).await;
    let mut card = Card::beijing();
    card.delegate = Some(("110105196501011111".into(), "parent".into()));
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&card, 120))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let delegate = &reply.json()["delegate"];
    assert_eq!(delegate["relation"], "parent");
    assert_eq!(delegate["card"], "1101**********1111");
}

#[tokio::test]
async fn a_family_member_s_bills_are_paid_from_the_holder_s_account_and_a_reversal_gives_it_back() {
    let gw = TestGateway::start(Options::default()).await;
    let mut parent = Card::beijing();
    parent.delegate = Some(("110105196501011111".into(), "parent".into()));
    let settle = async |card: &Card| {
        let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&gw.token(card, 120))).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.json()
    };
    let split = |r: &Value| (r["fund_pay_fen"].as_i64(), r["account_pay_fen"].as_i64(), r["cash_pay_fen"].as_i64());
    // The 1,700-yuan bill of `settle_body`: the holder's account (2,000 yuan a year) pays the
    // covered 1,500 up to 1,000 a bill (family mutual aid); no pooling; critical illness, the
    // holder's own cover, is skipped.
    let first = settle(&parent).await;
    assert_eq!(split(&first), (Some(0), Some(100_000), Some(70_000)), "{first}");
    assert_eq!(first["payers"][0]["breakdown"][0]["item"], "family_mutual_aid");
    assert_eq!(first["skipped"][0]["payer"], "critical-illness", "{first}");
    // The second takes the other 1,000 yuan; the third finds the account empty.
    assert_eq!(split(&settle(&parent).await), (Some(0), Some(100_000), Some(70_000)));
    assert_eq!(split(&settle(&parent).await), (Some(0), Some(0), Some(170_000)));
    // Reversing the first gives its 1,000 yuan back to the account.
    let id = first["settlement_id"].as_str().expect("id");
    let reversal =
        post(&gw.pharmacy, &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "refund" })).await;
    assert_eq!(reversal.status, StatusCode::OK, "{}", reversal.body);
    assert_eq!(split(&settle(&parent).await), (Some(0), Some(100_000), Some(70_000)));
    // The holder's own bill: his deductible is untouched by his parent's bills (800 yuan of it
    // still to meet: the fund pays 80% of the 650 above it, 52,000), his account is empty.
    let mut holder = parent.clone();
    holder.delegate = None;
    assert_eq!(split(&settle(&holder).await), (Some(52_000), Some(0), Some(118_000)));
    // Reconciliation shows the mutual aid apart: three bills of 1,000 yuan, one reversed.
    let today = cardgate::ledger::business_day(cardgate_tests::harness::now());
    let day = cardgate_tests::harness::get(&gw.pharmacy, &format!("/v1/reconciliation?date={today}")).await.json();
    let aid = |totals: &str| day[totals]["mutual_aid_pay_fen"].as_i64();
    assert_eq!((aid("settled"), aid("reversed"), aid("net")), (Some(300_000), Some(100_000), Some(200_000)), "{day}");
    assert_eq!(day["settled"]["account_pay_fen"], 300_000);
    assert_eq!(day["by_type"][0]["net"]["mutual_aid_pay_fen"], 200_000);
}

#[tokio::test]
async fn cross_region_card_settles_through_its_rule() {
    let gw = TestGateway::start(Options::default()).await;
    let shanghai = Card::in_region("310104");
    let reply = post(&gw.hospital, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&shanghai, 120))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let r = reply.json();
    let payers: Vec<&str> =
        r["payers"].as_array().expect("payers").iter().filter_map(|p| p["payer"].as_str()).collect();
    assert_eq!(payers, ["basic-medical"], "the cross-region rule has basic medical insurance only");
    assert_eq!(r["insured_region"], "310104");
}

#[tokio::test]
async fn unknown_region_has_no_route() {
    let gw = TestGateway::start(Options::default()).await;
    let reply =
        post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&Card::in_region("440305"), 120)))
            .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.content_type, "application/problem+json");
    assert_eq!(reply.json()["code"], "no_route");
}

#[tokio::test]
async fn replayed_token_is_refused_also_after_a_restart() {
    let mut gw = TestGateway::start(Options::default()).await;
    let token = gw.token(&Card::beijing(), 300);
    let first = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&token)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let replay = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&token)).await;
    assert_eq!((replay.status, replay.json()["code"].as_str()), (StatusCode::CONFLICT, Some("token_replayed")));
    gw.restart().await;
    let after_restart = post(&gw.hospital, "/v1/settlements", Some(&key()), &settle_body(&token)).await;
    assert_eq!(after_restart.status, StatusCode::CONFLICT, "{}", after_restart.body);
    assert_eq!(after_restart.json()["code"], "token_replayed");
}

#[tokio::test]
async fn expired_and_forged_tokens_are_refused_with_their_codes() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let expired = gw.token_at(&card, now() - 600, 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&expired)).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_expired")));

    let other = TestGateway::start(Options::default()).await;
    let forged = other.token(&card, 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&forged)).await;
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_signature_invalid"))
    );

    let garbage = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body("EC1:NOT-A-TOKEN")).await;
    assert_eq!((garbage.status, garbage.json()["code"].as_str()), (StatusCode::BAD_REQUEST, Some("token_malformed")));
}

#[tokio::test]
async fn institution_naming_another_institution_is_forbidden() {
    let gw = TestGateway::start(Options::default()).await;
    let mut body = settle_body(&gw.token(&Card::beijing(), 120));
    body["institution_id"] = json!("H110105001");
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &body).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden_institution")));
    body["institution_id"] = json!("P110105002");
    assert_eq!(post(&gw.pharmacy, "/v1/settlements", Some(&key()), &body).await.status, StatusCode::CREATED);
    // A certificate naming an institution the gateway does not know.
    let stranger = post(&gw.stranger, "/v1/settlements", Some(&key()), &body).await;
    assert_eq!(stranger.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn idempotent_retry_returns_the_identical_receipt() {
    let gw = TestGateway::start(Options::default()).await;
    let body = settle_body(&gw.token(&Card::beijing(), 120));
    let key = key();
    let first = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    let retry = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!((retry.status, &retry.body), (StatusCode::CREATED, &first.body), "byte for byte");
    let mut changed = body.clone();
    changed["terminal_id"] = json!("POS-02");
    let conflict = post(&gw.pharmacy, "/v1/settlements", Some(&key), &changed).await;
    assert_eq!(
        (conflict.status, conflict.json()["code"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_conflict"))
    );
}

#[tokio::test]
async fn a_retry_gets_its_receipt_after_a_restart_and_after_its_token_expired() {
    let options = Options { clock_skew_secs: 0, ..Options::default() };
    let mut gw = TestGateway::start(options).await;
    let body = settle_body(&gw.token(&Card::beijing(), 3));
    let key = key();
    let first = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    // The in-memory replay cache is gone: the ledger finds the key when the intent is refused.
    gw.restart().await;
    let retry = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!((retry.status, &retry.body), (StatusCode::CREATED, &first.body));
    // The token no longer verifies; the stored answer still comes back, byte for byte.
    tokio::time::sleep(std::time::Duration::from_millis(4_100)).await;
    let late = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!((late.status, &late.body), (StatusCode::CREATED, &first.body));
    let fresh = post(&gw.pharmacy, "/v1/settlements", Some(&self::key()), &body).await;
    assert_eq!((fresh.status, fresh.json()["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_expired")));
}

#[tokio::test]
async fn reversal_is_idempotent_and_restores_the_accumulators() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    let first = post(&gw.hospital, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&card, 120))).await.json();
    let id = first["settlement_id"].as_str().expect("id").to_owned();
    let path = format!("/v1/settlements/{id}/reversal");
    let reversal = post(&gw.hospital, &path, None, &json!({ "reason": "refund" })).await;
    assert_eq!(reversal.status, StatusCode::OK, "{}", reversal.body);
    assert_eq!(reversal.json()["state"], "reversed");
    assert_eq!(reversal.json()["refund"]["fund_pay_fen"], 52000);
    let repeated = post(&gw.hospital, &path, None, &json!({ "reason": "refund" })).await;
    assert_eq!((repeated.status, &repeated.body), (StatusCode::OK, &reversal.body));
    assert_eq!(get(&gw.hospital, &format!("/v1/settlements/{id}")).await.json()["state"], "reversed");
    // The deductible and account the first bill used are back: the same bill splits the same.
    let second = post(&gw.hospital, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&card, 120))).await.json();
    for field in ["fund_pay_fen", "account_pay_fen", "cash_pay_fen"] {
        assert_eq!(second[field], first[field], "{field}");
    }
}

#[tokio::test]
async fn accumulators_carry_over_between_settlements() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::beijing();
    post(&gw.hospital, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&card, 120))).await;
    let second = post(&gw.hospital, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&card, 120))).await.json();
    // Deductible met, account down to 1,020 yuan: fund 80% of 1,450 yuan; the account pays
    // what it has left of the in-policy rest.
    assert_eq!(second["fund_pay_fen"], 116000);
    assert_eq!(second["account_pay_fen"], 34000);
    assert_eq!(second["cash_pay_fen"], 20000);
}

#[tokio::test]
async fn unbalanced_plugin_answer_is_refused_and_nothing_settles() {
    let fixture = cardgate_sdk::testing::build_cdylib("fixture-configurable");
    let extra = format!(
        r#"
[plugins.sloppy]
library = "{}"
config = {{ unbalanced = true, fund_bp = 5000 }}

[[routes]]
regions = ["12"]
payers = ["sloppy"]
"#,
        fixture.display()
    );
    let gw = TestGateway::start(Options { extra_toml: extra, ..Options::default() }).await;
    let body = settle_body(&gw.token(&Card::in_region("120101"), 120));
    let key = key();
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("plugin_unbalanced")));
    let id = reply.json()["settlement_id"].as_str().expect("the failed attempt is identified").to_owned();
    let stored = get(&gw.pharmacy, &format!("/v1/settlements/{id}")).await.json();
    assert_eq!(stored["state"], "failed");
    assert!(stored.get("fund_pay_fen").is_none(), "no money recorded: {stored}");
    assert_eq!(post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await.body, reply.body, "retry: same answer");
    let reversal = post(&gw.pharmacy, &format!("/v1/settlements/{id}/reversal"), None, &json!({})).await;
    assert_eq!(reversal.json()["code"], "not_reversible");
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let gw = TestGateway::start(Options::default()).await;
    let token = gw.token(&Card::beijing(), 120);
    let cases: Vec<(Option<&str>, Value, StatusCode, &str)> = vec![
        (None, settle_body(&token), StatusCode::BAD_REQUEST, "idempotency_key_required"),
        (
            Some("k"),
            json!({ "token": token, "terminal_id": "T", "total_fen": 1, "lines": bill() }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Some("k"),
            json!({ "token": token, "terminal_id": "T", "total_fen": 0, "lines": [] }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Some("k"),
            json!({ "terminal_id": "T", "total_fen": 170000, "lines": bill() }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Some("k"),
            json!({ "token": token, "terminal_id": "T", "total_fen": 170000, "lines": bill(), "extra": 1 }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Some("k"),
            json!({ "token": token, "terminal_id": "", "total_fen": 170000, "lines": bill() }),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (key, body, status, code) in cases {
        let reply = post(&gw.pharmacy, "/v1/settlements", key, &body).await;
        assert_eq!((reply.status, reply.json()["code"].as_str()), (status, Some(code)), "{body}: {}", reply.body);
        assert!(reply.json()["request_id"].is_string());
    }
    let raw =
        gw.pharmacy.send(http::Method::POST, "/v1/settlements", &[("idempotency-key", "k")], Some("{not json")).await;
    assert_eq!(raw.expect("answer").json()["code"], "invalid_request");
    let huge = "x".repeat(70_000);
    let too_big = gw.pharmacy.send(http::Method::POST, "/v1/quotes", &[], Some(&huge)).await.expect("answer");
    assert_eq!(
        (too_big.status, too_big.json()["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    assert_eq!(get(&gw.pharmacy, "/v2/nothing").await.status, StatusCode::NOT_FOUND);
    // Listing needs a day or a range.
    assert_eq!(get(&gw.pharmacy, "/v1/settlements").await.status, StatusCode::BAD_REQUEST);
    let delete = gw.pharmacy.send(http::Method::DELETE, "/v1/settlements", &[], None).await.expect("answer");
    assert_eq!(delete.status, StatusCode::METHOD_NOT_ALLOWED);
    let plain = gw.pharmacy.send(http::Method::POST, "/v1/quotes", &[("content-type", "text/plain")], None).await;
    assert_eq!(plain.expect("answer").status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Nothing here settled: the token still works.
    let ok = post(&gw.pharmacy, "/v1/settlements", Some("fresh"), &settle_body(&token)).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
}

#[tokio::test]
async fn inquiry_reports_participation_without_consuming_the_token() {
    let gw = TestGateway::start(Options::default()).await;
    let token = gw.token(&Card::beijing(), 120);
    let body = json!({ "token": token, "terminal_id": "POS-01" });
    let reply = post(&gw.pharmacy, "/v1/inquiries", None, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let r = reply.json();
    assert_eq!(r["payers"][0]["insured"], true);
    assert_eq!(r["payers"][0]["account_balance_fen"], 200000);
    assert_eq!(r["payers"][0]["deductible_remaining_fen"], 80000);
    assert_eq!(r["payers"][1]["supported"], false, "critical illness has no inquiry");
    assert_eq!(post(&gw.pharmacy, "/v1/inquiries", None, &body).await.status, StatusCode::OK, "reusable");
    assert_eq!(
        post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&token)).await.status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn a_bill_in_the_national_platform_s_names_and_units_settles_the_same() {
    let gw = TestGateway::start(Options::default()).await;
    // The bill of `settle_body`, as a national HIS client writes it: the total in yuan
    // (`medfee_sumamt`), classes as `chrgitm_lv` codes, `insutype`.
    let national = |token: &str, total: Value| {
        json!({
            "token": token, "terminal_id": "POS-01", "insutype": "310", "medfee_sumamt": total,
            "lines": [
                { "code": "XA01", "name": "Amoxicillin", "chrgitm_lv": "01", "quantity": 10, "unit_price_fen": 10000, "amount_fen": 100000 },
                { "code": "XB02", "name": "CT scan", "chrgitm_lv": "02", "quantity": 1, "unit_price_fen": 50000, "amount_fen": 50000 },
                { "code": "XC03", "name": "Single room", "category": "03", "quantity": 1, "unit_price_fen": 20000, "amount_fen": 20000 }
            ]
        })
    };
    for total in [json!(1700), json!("1700.00"), json!(1700.0)] {
        let token = gw.token(&Card::beijing(), 120);
        let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &national(&token, total.clone())).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{total}: {}", reply.body);
        let r = reply.json();
        // The split of pharmacy_one_step_settlement_has_the_exact_split.
        assert_eq!((r["total_fen"].as_i64(), r["fund_pay_fen"].as_i64()), (Some(170000), Some(52000)), "{total}");
        assert_eq!((r["account_pay_fen"].as_i64(), r["cash_pay_fen"].as_i64()), (Some(98000), Some(20000)));
    }
    // Read as fen, 170000 "yuan" would be a bill 100 times too large: the lines disagree.
    let token = gw.token(&Card::beijing(), 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &national(&token, json!(170000))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert_eq!(reply.json()["code"], "invalid_request");
    // A third decimal is not money; a class code the platform does not have is refused.
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &national(&token, json!("1700.001"))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("medfee_sumamt")), "{}", reply.body);
}

#[tokio::test]
async fn a_reversal_hands_the_payers_the_card_and_delegate_they_settled() {
    // A family member pays with the holder's card; the payer (a fixture that declines any
    // reversal naming another card or delegate) keeps books by card id.
    let mut card = Card::in_region("450103");
    card.delegate = Some(("450103200501015678".into(), "child".into()));
    let extra_toml = format!(
        r#"
[plugins.own-books]
library = "{}"
[plugins.own-books.config]
fund_bp = 5000
reverse_expects_card = "{}"
reverse_expects_delegate = "child"

[[routes]]
regions = ["45"]
payers = ["own-books"]
"#,
        cardgate_sdk::testing::build_cdylib("fixture-configurable").display(),
        card.id
    );
    let gw = TestGateway::start(Options { extra_toml, ..Options::default() }).await;
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &settle_body(&gw.token(&card, 120))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.json()["fund_pay_fen"], 85000);
    let id = reply.json()["settlement_id"].as_str().expect("id").to_owned();
    let reversal =
        post(&gw.pharmacy, &format!("/v1/settlements/{id}/reversal"), None, &json!({ "reason": "refund" })).await;
    assert_eq!(reversal.status, StatusCode::OK, "the payer saw another card: {}", reversal.body);
    assert_eq!(reversal.json()["state"], "reversed");
}
