//! Encounters end to end over real TLS (issue #17): a hospital's inpatient stay settled in steps
//! — admission with the credential, fee details in batches (one retried, one line withdrawn),
//! an interim settlement, discharge and final settlement, then a partial refund by
//! withdraw-correct-resettle — amounts exact to the fen against the hand-worked example below,
//! the accumulators checked after every step; an outpatient visit; two stays of one card
//! settling at once; another institution refused; the gateway restarted between steps.
//!
//! The card is insured in Shanghai (310104) and treated at the test hospital (tertiary,
//! Beijing): its route is basic medical insurance alone, employee scheme 310, whose stays have
//! a deductible of 900 yuan per admission at a tertiary hospital and a fund share of 85%
//! above it (plugins/basic-medical/config.example.toml).

use cardgate_tests::harness::{Card, Options, TestGateway, get, post, unique_key};
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// `count` fee lines from serial `first`: one unit each at `unit_fen`, of `category`.
fn fees(first: usize, count: usize, category: &str, unit_fen: i64) -> Value {
    let lines: Vec<Value> = (first..first + count)
        .map(|sn| {
            json!({
                "feedetl_sn": sn.to_string(), "code": format!("{category}-{unit_fen}"), "name": "item",
                "category": category, "quantity": 1, "unit_price_fen": unit_fen, "amount_fen": unit_fen
            })
        })
        .collect();
    json!({ "fees": lines })
}

/// Uploads `count` lines from serial `first` in batches of 300 (each under the test
/// gateway's 64 KiB body limit); answers the last batch's reply.
async fn upload(gw: &TestGateway, path: &str, first: usize, count: usize, category: &str, unit_fen: i64) -> Value {
    let mut last = Value::Null;
    for start in (first..first + count).step_by(300) {
        let reply =
            post(&gw.hospital, path, None, &fees(start, 300.min(first + count - start), category, unit_fen)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        last = reply.json();
    }
    last
}

async fn admit(gw: &TestGateway, card: &Card, med_type: &str) -> String {
    let body = json!({
        "token": gw.token(card, 120), "terminal_id": "ADMISSIONS", "med_type": med_type,
        "dept_code": "CARDIO", "diagnoses": [{ "code": "I21.9", "name": "acute myocardial infarction", "primary": true }],
        "begntime": "2026-11-27T09:00:00+08:00"
    });
    let reply = post(&gw.hospital, "/v1/encounters", Some(&unique_key("adm")), &body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    reply.json()["encounter_id"].as_str().expect("id").to_owned()
}

/// What the card's basic-medical year shows: the fund's ceiling left (300,000 yuan a year less
/// what the fund paid) and the yearly deductible left.
async fn year(gw: &TestGateway, card: &Card) -> (i64, i64) {
    let body = json!({ "token": gw.token(card, 120), "terminal_id": "DESK" });
    let reply = post(&gw.hospital, "/v1/inquiries", None, &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let payer = &reply.json()["payers"][0];
    (
        payer["ceiling_remaining_fen"].as_i64().expect("ceiling"),
        payer["deductible_remaining_fen"].as_i64().expect("deductible"),
    )
}

const CEILING: i64 = 30_000_000;

async fn settle(gw: &TestGateway, id: &str, interim: bool) -> Value {
    let body = json!({ "interim": interim, "use_account": false });
    let reply = post(&gw.hospital, &format!("/v1/encounters/{id}/settlements"), Some(&unique_key("s")), &body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    reply.json()
}

fn split(receipt: &Value) -> (i64, i64, i64, i64) {
    let amount = |k: &str| receipt[k].as_i64().unwrap_or(-1);
    (amount("total_fen"), amount("fund_pay_fen"), amount("account_pay_fen"), amount("cash_pay_fen"))
}

#[tokio::test]
async fn a_five_day_stay_settles_in_steps_and_a_partial_refund_is_withdraw_correct_resettle() {
    let mut gw = TestGateway::start(Options::default()).await;
    let card = Card::in_region("310104");
    let id = admit(&gw, &card, "21").await;
    // The credential is spent: it settles nothing else.
    let view = get(&gw.hospital, &format!("/v1/encounters/{id}")).await.json();
    assert_eq!((view["state"].as_str(), view["kind"].as_str()), (Some("open"), Some("inpatient")));
    assert_eq!(view["diagnoses"][0]["code"], "I21.9");

    // Day 1: 1,000 class A lines of 1 yuan (100,000 fen); sent twice (the network dropped the
    // answer): the second time every line is a duplicate and nothing changes.
    let fees_path = format!("/v1/encounters/{id}/fees");
    let first = upload(&gw, &fees_path, 1, 1000, "class_a", 100).await;
    assert_eq!(first["uploaded"][0]["status"], "accepted");
    assert_eq!(first["uploaded"][0]["in_scope"], true);
    let again = post(&gw.hospital, &fees_path, None, &fees(901, 100, "class_a", 100)).await.json();
    assert!(again["uploaded"].as_array().expect("lines").iter().all(|l| l["status"] == "duplicate"));
    assert_eq!((again["fees"]["count"].as_u64(), again["fees"]["unsettled_fen"].as_i64()), (Some(1000), Some(100_000)));
    // A serial reused for another line is refused whole.
    let clash = post(&gw.hospital, &fees_path, None, &fees(1000, 2, "class_b", 999)).await;
    assert_eq!((clash.status, clash.json()["code"].as_str()), (StatusCode::CONFLICT, Some("fee_serial_conflict")));

    gw.restart().await;

    // Day 3: 800 class B lines of 2.50 yuan; one of them withdrawn (a wrong charge).
    upload(&gw, &fees_path, 1001, 800, "class_b", 250).await;
    let withdrawn = gw.hospital.send(Method::DELETE, &format!("{fees_path}/1800"), &[], None).await.expect("answer");
    assert_eq!(withdrawn.status, StatusCode::OK, "{}", withdrawn.body);
    assert_eq!(withdrawn.json()["fees"]["count"], 1799);

    // Interim settlement of the 1,799 lines: 100,000 + 799 x 250 = 299,750. Eligible: class A
    // 100,000 and class B less its 10% first share, 799 x 225 = 179,775: 279,775. The stay's
    // deductible takes 90,000; the fund 85% of 189,775 = 161,308.75, half up 161,309.
    let interim = settle(&gw, &id, true).await;
    assert_eq!(split(&interim), (299_750, 161_309, 0, 138_441), "{interim}");
    assert_eq!((interim["encounter_id"].as_str(), interim["interim"].as_bool()), (Some(id.as_str()), Some(true)));
    assert_eq!(interim["lines"], 1799);
    // The fund's year moved by the interim's share; the yearly deductible did not (a stay's is
    // its own).
    assert_eq!(year(&gw, &card).await, (CEILING - 161_309, 80_000));
    // A settled line cannot be withdrawn.
    let settled_line = gw.hospital.send(Method::DELETE, &format!("{fees_path}/5"), &[], None).await.expect("answer");
    assert_eq!(settled_line.json()["code"], "fee_settled");

    gw.restart().await;

    // Day 5: 700 class A lines of 2 yuan (140,000); 2,500 lines uploaded in all. Not
    // discharged yet: no final settlement.
    upload(&gw, &fees_path, 1801, 700, "class_a", 200).await;
    let view = get(&gw.hospital, &format!("/v1/encounters/{id}")).await.json();
    assert_eq!(view["lines"].as_array().map(Vec::len), Some(2500));
    let withdrawn_line = view["lines"].as_array().and_then(|l| l.iter().find(|l| l["feedetl_sn"] == "1800")).cloned();
    assert_eq!(withdrawn_line.map(|l| l["state"].clone()), Some(json!("withdrawn")));
    assert_eq!(view["lines"][0]["state"], "settled");
    let early =
        post(&gw.hospital, &format!("/v1/encounters/{id}/settlements"), Some("early"), &json!({ "interim": false }))
            .await;
    assert_eq!(early.json()["code"], "not_discharged");
    let discharged = post(
        &gw.hospital,
        &format!("/v1/encounters/{id}/discharge"),
        None,
        &json!({ "endtime": "2026-12-01T10:00:00+08:00" }),
    )
    .await;
    assert_eq!(discharged.status, StatusCode::OK, "{}", discharged.body);
    assert_eq!(discharged.json()["state"], "discharged");
    // Discharged in error, withdrawn (2405), the diagnoses corrected (2403), discharged again.
    let undone = gw.hospital.send(Method::DELETE, &format!("/v1/encounters/{id}/discharge"), &[], None).await;
    assert_eq!(undone.expect("answer").json()["state"], "open");
    let corrected = post(
        &gw.hospital,
        &format!("/v1/encounters/{id}/admission"),
        None,
        &json!({ "diagnoses": [{ "code": "I10" }, { "code": "I21.9", "primary": true }] }),
    )
    .await;
    assert_eq!(corrected.status, StatusCode::OK, "{}", corrected.body);
    let corrected = corrected.json();
    let codes: Vec<&str> =
        corrected["diagnoses"].as_array().expect("diagnoses").iter().filter_map(|d| d["code"].as_str()).collect();
    assert_eq!(codes, ["I21.9", "I10"], "the primary first");
    let again = post(
        &gw.hospital,
        &format!("/v1/encounters/{id}/discharge"),
        None,
        &json!({ "endtime": "2026-12-01T10:00:00+08:00" }),
    )
    .await;
    assert_eq!(again.json()["state"], "discharged");

    // Pre-settlement, then the final settlement: the interim's lines met the deductible, so the
    // fund pays 85% of the 140,000.
    let quote =
        post(&gw.hospital, &format!("/v1/encounters/{id}/quotes"), None, &json!({ "use_account": false })).await;
    assert_eq!(quote.status, StatusCode::OK, "{}", quote.body);
    assert_eq!((quote.json()["fund_pay_fen"].as_i64(), quote.json()["lines"].as_u64()), (Some(119_000), Some(700)));
    let last = settle(&gw, &id, false).await;
    assert_eq!(split(&last), (140_000, 119_000, 0, 21_000), "{last}");
    assert_eq!(year(&gw, &card).await, (CEILING - 161_309 - 119_000, 80_000));
    let view = get(&gw.hospital, &format!("/v1/encounters/{id}")).await.json();
    assert_eq!((view["state"].as_str(), view["fees"]["settled_fen"].as_i64()), (Some("settled"), Some(439_750)));
    // Settled finally: no more fees.
    let late = post(&gw.hospital, &fees_path, None, &fees(3000, 1, "class_a", 100)).await;
    assert_eq!(late.json()["code"], "encounter_settled");
    let undo = gw.hospital.send(Method::DELETE, &format!("/v1/encounters/{id}/discharge"), &[], None).await;
    assert_eq!(undo.expect("answer").json()["code"], "encounter_settled");

    // A partial refund: 100 of the day-5 lines (20,000) were not given. Withdraw the final
    // settlement, withdraw the lines, settle again: 600 x 200 = 120,000, fund 102,000.
    let sid = last["settlement_id"].as_str().expect("sid");
    let withdrawal =
        post(&gw.hospital, &format!("/v1/encounters/{id}/settlements/{sid}/withdrawal"), None, &json!({})).await;
    assert_eq!(withdrawal.status, StatusCode::OK, "{}", withdrawal.body);
    assert_eq!(year(&gw, &card).await, (CEILING - 161_309, 80_000));
    for sn in 2401..=2500 {
        let reply = gw.hospital.send(Method::DELETE, &format!("{fees_path}/{sn}"), &[], None).await.expect("answer");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    gw.restart().await;
    let again = settle(&gw, &id, false).await;
    assert_eq!(split(&again), (120_000, 102_000, 0, 18_000), "{again}");
    assert_eq!(year(&gw, &card).await, (CEILING - 161_309 - 102_000, 80_000));
    let view = get(&gw.hospital, &format!("/v1/encounters/{id}")).await.json();
    let states: Vec<&str> =
        view["settlements"].as_array().expect("settlements").iter().filter_map(|s| s["state"].as_str()).collect();
    assert_eq!(states, ["settled", "reversed", "settled"]);
    assert_eq!((view["fees"]["count"].as_u64(), view["fees"]["settled_fen"].as_i64()), (Some(2399), Some(419_750)));
    // Reconciliation counts the stay as inpatient (clearing type 21).
    let today = cardgate::ledger::business_day(cardgate_tests::harness::now());
    let day = get(&gw.hospital, &format!("/v1/reconciliation?date={today}")).await.json();
    assert_eq!(day["by_type"][0]["clearing_type"], "21", "{day}");
    assert_eq!(day["by_type"][0]["net"]["fund_pay_fen"], 161_309 + 102_000);
}

#[tokio::test]
async fn an_outpatient_visit_settles_under_the_yearly_rules_and_refuses_what_a_visit_cannot_do() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::in_region("310104");
    let id = admit(&gw, &card, "11").await;
    let view = get(&gw.hospital, &format!("/v1/encounters/{id}")).await.json();
    assert_eq!(view["kind"], "outpatient");
    let fees_path = format!("/v1/encounters/{id}/fees");
    assert_eq!(post(&gw.hospital, &fees_path, None, &fees(1, 10, "class_a", 10_000)).await.status, StatusCode::OK);
    // No interim settlement, no discharge for a visit.
    let interim =
        post(&gw.hospital, &format!("/v1/encounters/{id}/settlements"), Some("v-i"), &json!({ "interim": true })).await;
    assert_eq!(interim.json()["code"], "not_inpatient");
    let out = post(
        &gw.hospital,
        &format!("/v1/encounters/{id}/discharge"),
        None,
        &json!({ "discharged_at": "2026-12-01T10:00:00+08:00" }),
    )
    .await;
    assert_eq!(out.json()["code"], "not_inpatient");
    // 100,000 eligible: the yearly deductible (800 yuan) first, then 80% of 20,000 at a
    // tertiary hospital.
    let receipt = settle(&gw, &id, false).await;
    assert_eq!(split(&receipt), (100_000, 16_000, 0, 84_000), "{receipt}");
    assert_eq!(year(&gw, &card).await, (CEILING - 16_000, 0));
    let today = cardgate::ledger::business_day(cardgate_tests::harness::now());
    let day = get(&gw.hospital, &format!("/v1/reconciliation?date={today}")).await.json();
    assert_eq!(day["by_type"][0]["clearing_type"], "11", "{day}");
    // A registration retried under its key answers the same encounter; another body under
    // it is a conflict; a spent credential registers nothing else.
    let token = gw.token(&card, 120);
    let body =
        json!({ "token": token, "terminal_id": "DESK", "med_type": "11", "admitted_at": "2026-12-01T08:00:00+08:00" });
    let first = post(&gw.hospital, "/v1/encounters", Some("reg-x"), &body).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let retry = post(&gw.hospital, "/v1/encounters", Some("reg-x"), &body).await;
    assert_eq!(retry.json()["encounter_id"], first.json()["encounter_id"]);
    let mut other = body.clone();
    other["med_type"] = json!("14");
    assert_eq!(
        post(&gw.hospital, "/v1/encounters", Some("reg-x"), &other).await.json()["code"],
        "idempotency_conflict"
    );
    // A maternity stay (52) is a stay; a bureau's own type says its kind.
    for (med_type, kind, expected) in [("52", None, "inpatient"), ("9901", Some("inpatient"), "inpatient")] {
        let mut typed = body.clone();
        typed["token"] = json!(gw.token(&card, 120));
        typed["med_type"] = json!(med_type);
        typed["diagnoses"] = json!([{ "code": "O80", "primary": true }]);
        if let Some(kind) = kind {
            typed["kind"] = json!(kind);
        }
        let reply = post(&gw.hospital, "/v1/encounters", Some(&unique_key("typed")), &typed).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        assert_eq!(reply.json()["kind"], expected);
    }
    let reused = post(&gw.hospital, "/v1/encounters", Some("reg-y"), &body).await;
    assert_eq!((reused.status, reused.json()["code"].as_str()), (StatusCode::CONFLICT, Some("token_replayed")));
    let settled_with_it = json!({ "token": token, "terminal_id": "T", "total_fen": 100,
        "lines": [{ "code": "A", "name": "a", "category": "class_a", "quantity": 1, "unit_price_fen": 100, "amount_fen": 100 }] });
    let by_token = post(&gw.hospital, "/v1/settlements", Some("tok-again"), &settled_with_it).await;
    assert_eq!(by_token.json()["code"], "token_replayed");
    // Bad input: a clear error, nothing stored.
    for (field, value) in
        [("med_type", json!("")), ("admitted_at", json!("yesterday")), ("admitted_at", json!("2099-01-01T00:00:00Z"))]
    {
        let mut bad = body.clone();
        bad[field] = value;
        bad["token"] = json!(gw.token(&card, 120));
        let reply = post(&gw.hospital, "/v1/encounters", Some(&unique_key("bad")), &bad).await;
        assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    }
    let mut bad = body.clone();
    bad["token"] = json!(gw.token(&card, 120));
    bad["diagnoses"] = json!([{ "code": "heart attack" }]);
    let reply = post(&gw.hospital, "/v1/encounters", Some(&unique_key("bad")), &bad).await;
    assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("ICD-10")), "{}", reply.body);
    // A diagnosis is an object, not its fields in order.
    bad["token"] = json!(gw.token(&card, 120));
    bad["diagnoses"] = json!([["I21.9", "acute myocardial infarction", true]]);
    let reply = post(&gw.hospital, "/v1/encounters", Some(&unique_key("bad")), &bad).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("a JSON object")), "{}", reply.body);
    // Nor does it take a field it does not define (a misspelt `diag_nam` is refused, not dropped).
    bad["token"] = json!(gw.token(&card, 120));
    bad["diagnoses"] = json!([{ "code": "I21.9", "diag_nam": "acute myocardial infarction" }]);
    let reply = post(&gw.hospital, "/v1/encounters", Some(&unique_key("bad")), &bad).await;
    assert_eq!((reply.status, reply.json()["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("unknown field `diag_nam`")), "{}", reply.body);
}

#[tokio::test]
async fn another_institution_cannot_see_or_settle_an_encounter() {
    let gw = TestGateway::start(Options::default()).await;
    let id = admit(&gw, &Card::in_region("310104"), "21").await;
    let path = format!("/v1/encounters/{id}");
    assert_eq!(get(&gw.pharmacy, &path).await.status, StatusCode::NOT_FOUND);
    let fees = post(&gw.pharmacy, &format!("{path}/fees"), None, &fees(1, 1, "class_a", 100)).await;
    assert_eq!(fees.status, StatusCode::NOT_FOUND);
    let settle = post(&gw.pharmacy, &format!("{path}/settlements"), Some("p-1"), &json!({ "interim": true })).await;
    assert_eq!(settle.status, StatusCode::NOT_FOUND);
    // Its own view is untouched.
    assert_eq!(get(&gw.hospital, &path).await.json()["fees"]["count"], 0);
}

/// Two stays of one card (a patient admitted twice, settled at once by two cashiers): the
/// card's settlements are taken one at a time, so its personal account (2,000 yuan a year)
/// pays at most once over.
#[tokio::test]
async fn two_encounters_of_one_card_settling_at_once_never_overspend_its_account() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::in_region("310104");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = admit(&gw, &card, "21").await;
        let upload =
            post(&gw.hospital, &format!("/v1/encounters/{id}/fees"), None, &fees(1, 50, "class_a", 10_000)).await;
        assert_eq!(upload.status, StatusCode::OK, "{}", upload.body);
        ids.push(id);
    }
    let settle = |id: String| {
        let client = gw.hospital.clone();
        async move {
            post(
                &client,
                &format!("/v1/encounters/{id}/settlements"),
                Some(&unique_key("c")),
                &json!({ "interim": true }),
            )
            .await
        }
    };
    let (a, b) = tokio::join!(settle(ids[0].clone()), settle(ids[1].clone()));
    assert_eq!((a.status, b.status), (StatusCode::CREATED, StatusCode::CREATED), "{} {}", a.body, b.body);
    // Each stay: 500,000 eligible, 90,000 deductible, fund 85% of 410,000 = 348,500; the
    // patient's 151,500 is the account's up to its 200,000 a year: 151,500 then 48,500.
    let (a, b) = (a.json(), b.json());
    assert_eq!((a["fund_pay_fen"].as_i64(), b["fund_pay_fen"].as_i64()), (Some(348_500), Some(348_500)));
    let accounts = a["account_pay_fen"].as_i64().unwrap_or(-1) + b["account_pay_fen"].as_i64().unwrap_or(-1);
    assert_eq!(accounts, 200_000, "{a} {b}");
}

/// One stay settled from eight connections at once (eight keys: cashiers pressing at once,
/// a client retrying without its key): the lines are settled once, by one settlement; every
/// other attempt settles nothing — refused `encounter_busy` (recorded failed) or, after the
/// winner, `no_fees` — and the fund pays once.
#[tokio::test]
async fn one_stay_settled_from_many_connections_at_once_is_settled_once() {
    let gw = TestGateway::start(Options::default()).await;
    let card = Card::in_region("310104");
    let id = admit(&gw, &card, "21").await;
    let upload = post(&gw.hospital, &format!("/v1/encounters/{id}/fees"), None, &fees(1, 100, "class_a", 2_000)).await;
    assert_eq!(upload.status, StatusCode::OK, "{}", upload.body);
    let attempts: Vec<_> = (0..8)
        .map(|n| {
            let (client, path) = (gw.hospital.clone(), format!("/v1/encounters/{id}/settlements"));
            tokio::spawn(async move {
                let body = json!({ "interim": true, "use_account": false });
                post(&client, &path, Some(&unique_key(&format!("race-{n}"))), &body).await
            })
        })
        .collect();
    let mut created = Vec::new();
    for attempt in attempts {
        let reply = attempt.await.expect("attempt");
        match reply.status {
            StatusCode::CREATED => created.push(reply.json()),
            StatusCode::CONFLICT => {
                let code = reply.json()["code"].as_str().map(str::to_owned);
                assert!(matches!(code.as_deref(), Some("encounter_busy" | "no_fees")), "{}", reply.body);
            }
            other => panic!("{other}: {}", reply.body),
        }
    }
    assert_eq!(created.len(), 1, "one settlement takes the lines");
    // 200,000 eligible less the stay's 90,000, 85%: 93,500, once.
    assert_eq!(split(&created[0]), (200_000, 93_500, 0, 106_500));
    let view = get(&gw.hospital, &format!("/v1/encounters/{id}")).await.json();
    let settled: Vec<&Value> =
        view["settlements"].as_array().expect("settlements").iter().filter(|s| s["state"] == "settled").collect();
    assert_eq!(settled.len(), 1, "{view}");
    assert_eq!(
        (view["fees"]["settled_fen"].as_i64(), view["fees"]["unsettled_count"].as_u64()),
        (Some(200_000), Some(0))
    );
    assert_eq!(year(&gw, &card).await.0, CEILING - 93_500);
}
