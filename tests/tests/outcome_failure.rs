//! A settlement whose outcome could not be written (the storage failed after its intent was
//! recorded) stays `pending`. A retry with its key answers `request_in_progress` while the
//! payers could still be answering; past the longest chain's timeouts it completes the
//! settlement — once — instead of waiting for a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

use cardgate::api::flow;
use cardgate::api::model::BillBody;
use cardgate::api::{ApiError, Identity};
use cardgate::config::Config;
use cardgate::dev::PHARMACY;
use cardgate::ledger::{
    AccumulatorDelta, ClosedDay, DetailLine, Intent, Ledger, LedgerError, LedgerFuture, Outcome, Reconciliation,
    Record, SettledDeltas, State, StoredEncounter, StoredQuote, Unresolved,
};
use cardgate::service::{Clock, Gateway};
use cardgate_sdk::YearToDate;
use cardgate_tests::harness::{Card, Options, Setup, now};
use http::StatusCode;
use serde_json::json;

#[derive(Debug)]
struct TestClock(AtomicI64);

impl Clock for TestClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The real ledger, whose next outcome write fails as a full disk would make it.
#[derive(Debug)]
struct FailingOutcome {
    inner: Arc<dyn Ledger>,
    fail_next: AtomicBool,
    /// The next read of a card's figures fails (the database went away for a moment).
    fail_read: AtomicBool,
    /// The next change of an encounter fails likewise.
    fail_encounter: AtomicBool,
    /// A day's lines fail from this page on (0: never); the pages before it are full pages of
    /// made-up lines, so that an export goes on to the failing one.
    fail_export_from: AtomicU32,
    /// A failing page after the first fails only once this is notified (the test has read
    /// the pages before it), as a database going away midway.
    export_fails_now: tokio::sync::Notify,
}

impl FailingOutcome {
    /// The gateway's own ledger, failing nothing until told to.
    fn around(gateway: &Gateway) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::clone(&gateway.ledger),
            fail_next: AtomicBool::new(false),
            fail_read: AtomicBool::new(false),
            fail_encounter: AtomicBool::new(false),
            fail_export_from: AtomicU32::new(0),
            export_fails_now: tokio::sync::Notify::new(),
        })
    }
}

impl Ledger for FailingOutcome {
    fn by_idempotency_key<'a>(&'a self, institution: &'a str, key: &'a str) -> LedgerFuture<'a, Option<Record>> {
        self.inner.by_idempotency_key(institution, key)
    }
    fn get<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<Record>> {
        self.inner.get(institution, id)
    }
    fn year_to_date<'a>(
        &'a self,
        card_hash: &'a [u8],
        year: i32,
        payers: &'a [&'a str],
    ) -> LedgerFuture<'a, Vec<YearToDate>> {
        if self.fail_read.swap(false, Ordering::Relaxed) {
            return Box::pin(async { Err(LedgerError::Storage("connection closed".into())) });
        }
        self.inner.year_to_date(card_hash, year, payers)
    }
    fn begin(&self, intent: Intent) -> LedgerFuture<'_, ()> {
        self.inner.begin(intent)
    }
    fn finish(&self, outcome: Outcome) -> LedgerFuture<'_, ()> {
        if self.fail_next.swap(false, Ordering::Relaxed) {
            return Box::pin(async { Err(LedgerError::Storage("database or disk is full".into())) });
        }
        self.inner.finish(outcome)
    }
    fn reverse(
        &self,
        id: String,
        body: String,
        deltas: Vec<AccumulatorDelta>,
        card_hash: Vec<u8>,
        at: i64,
    ) -> LedgerFuture<'_, ()> {
        self.inner.reverse(id, body, deltas, card_hash, at)
    }
    fn save_quote(&self, quote: StoredQuote) -> LedgerFuture<'_, ()> {
        self.inner.save_quote(quote)
    }
    fn quote<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<StoredQuote>> {
        self.inner.quote(institution, id)
    }
    fn unresolved(&self) -> LedgerFuture<'_, Vec<Unresolved>> {
        self.inner.unresolved()
    }
    fn sealed_request<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<Unresolved>> {
        self.inner.sealed_request(institution, id)
    }
    fn list<'a>(&'a self, query: &'a cardgate::ledger::ListQuery) -> LedgerFuture<'a, Vec<cardgate::ledger::Listed>> {
        self.inner.list(query)
    }
    fn reconciliation<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        page: u32,
        size: u32,
    ) -> LedgerFuture<'a, Reconciliation> {
        self.inner.reconciliation(institution, date, page, size)
    }
    fn day_details<'a>(
        &'a self,
        institution: &'a str,
        date: &'a str,
        page: u32,
        size: u32,
    ) -> LedgerFuture<'a, Vec<DetailLine>> {
        match self.fail_export_from.load(Ordering::Relaxed) {
            0 => self.inner.day_details(institution, date, page, size),
            from if page >= from => Box::pin(async move {
                if page > 1 {
                    self.export_fails_now.notified().await;
                }
                Err(LedgerError::Storage("connection closed".into()))
            }),
            _ => {
                let line = DetailLine { event: "settled".into(), settlement_id: "S".into(), ..DetailLine::default() };
                Box::pin(async move { Ok(vec![line; size as usize]) })
            }
        }
    }
    fn settled_deltas<'a>(&'a self, id: &'a str) -> LedgerFuture<'a, Option<SettledDeltas>> {
        self.inner.settled_deltas(id)
    }
    fn closed_day<'a>(&'a self, institution: &'a str, date: &'a str) -> LedgerFuture<'a, Option<ClosedDay>> {
        self.inner.closed_day(institution, date)
    }
    fn close_day<'a>(&'a self, institution: &'a str, date: &'a str, closed: ClosedDay) -> LedgerFuture<'a, ClosedDay> {
        self.inner.close_day(institution, date, closed)
    }
    fn open_encounter(&self, encounter: StoredEncounter) -> LedgerFuture<'_, ()> {
        self.inner.open_encounter(encounter)
    }
    fn encounter<'a>(&'a self, institution: &'a str, id: &'a str) -> LedgerFuture<'a, Option<StoredEncounter>> {
        self.inner.encounter(institution, id)
    }
    fn encounter_by_key<'a>(&'a self, institution: &'a str, key: &'a str) -> LedgerFuture<'a, Option<StoredEncounter>> {
        self.inner.encounter_by_key(institution, key)
    }
    fn update_encounter(&self, encounter: StoredEncounter) -> LedgerFuture<'_, ()> {
        if self.fail_encounter.swap(false, Ordering::Relaxed) {
            return Box::pin(async { Err(LedgerError::Storage("connection closed".into())) });
        }
        self.inner.update_encounter(encounter)
    }
}

fn status(answer: &Result<cardgate::api::ApiResponse, ApiError>) -> (StatusCode, String) {
    match answer {
        Ok(response) => (response.status, response.body.clone()),
        Err(error) => {
            let (status, body) = error.body("test", None);
            (status, body)
        }
    }
}

/// A gateway on the test clock whose ledger fails its next outcome write (`fail_next`) or its
/// next read of a card's figures (`fail_read`).
fn failing_gateway(fail_next: bool, fail_read: bool) -> (Setup, Gateway, Arc<TestClock>) {
    let setup = Setup::create(&Options::default(), "127.0.0.1:0");
    let config = Config::load(&setup.dir.path().join("cardgate.toml"), &HashMap::new()).expect("config");
    let clock = Arc::new(TestClock(AtomicI64::new(now())));
    let mut gateway = Gateway::build(config, Arc::clone(&clock) as Arc<dyn Clock>).expect("gateway");
    let failing = FailingOutcome::around(&gateway);
    failing.fail_next.store(fail_next, Ordering::Relaxed);
    failing.fail_read.store(fail_read, Ordering::Relaxed);
    gateway.ledger = failing;
    (setup, gateway, clock)
}

#[tokio::test]
async fn a_settlement_whose_outcome_write_failed_completes_on_a_late_retry() {
    let (setup, gateway, clock) = failing_gateway(true, false);
    let identity = Identity { institution: PHARMACY.into() };
    let body: BillBody = serde_json::from_value(json!({
        "token": setup.token(&Card::beijing(), 300), "terminal_id": "POS-01", "total_fen": 170000,
        "lines": [
            { "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 10, "unit_price_fen": 10000, "amount_fen": 100000 },
            { "code": "XB02", "name": "CT scan", "category": "class_b", "quantity": 1, "unit_price_fen": 50000, "amount_fen": 50000 },
            { "code": "XC03", "name": "Single room", "category": "class_c", "quantity": 1, "unit_price_fen": 20000, "amount_fen": 20000 }
        ]
    }))
    .expect("body");

    let first = flow::settle(&gateway, &identity, "till-7", body.clone(), "r1").await;
    assert!(status(&first).0.is_server_error(), "{:?}", status(&first));
    let record = gateway.ledger.by_idempotency_key(PHARMACY, "till-7").await.expect("read").expect("intent kept");
    assert_eq!(record.state, State::Pending);

    // Right away the payers might still be answering: the retry waits.
    let soon = status(&flow::settle(&gateway, &identity, "till-7", body.clone(), "r2").await);
    assert_eq!(soon.0, StatusCode::CONFLICT);
    assert!(soon.1.contains("request_in_progress"), "{}", soon.1);

    // Past every payer's timeout (two plugins of 2 s here) and the ledger's margin: completed.
    clock.0.fetch_add(2 * 2 + 10 + 1, Ordering::Relaxed);
    let late = status(&flow::settle(&gateway, &identity, "till-7", body.clone(), "r3").await);
    assert_eq!(late.0, StatusCode::CREATED, "{}", late.1);
    let receipt: serde_json::Value = serde_json::from_str(&late.1).expect("receipt");
    assert_eq!(
        (receipt["state"].as_str(), receipt["settlement_id"].as_str()),
        (Some("settled"), Some(record.id.as_str()))
    );
    assert_eq!(
        receipt["fund_pay_fen"].as_i64().unwrap_or(-1)
            + receipt["account_pay_fen"].as_i64().unwrap_or(-1)
            + receipt["cash_pay_fen"].as_i64().unwrap_or(-1),
        170_000
    );
    // Recorded once: every later retry gets the same receipt, byte for byte.
    let again = status(&flow::settle(&gateway, &identity, "till-7", body, "r4").await);
    assert_eq!(again, late);
    let stored = gateway.ledger.get(PHARMACY, &record.id).await.expect("read").expect("record");
    // Stored sealed (the receipt names the holder), opening to the answer sent.
    assert!(!stored.body.contains("holder_name"), "{}", stored.body);
    assert_eq!((stored.state, gateway.card_key.open_text(&stored.body)), (State::Settled, Some(late.1)));
}

/// The ledger fails to read the card's figures (before any payer is asked): the answer is a
/// 503 to retry, nothing is recorded under the key, and the retry with the same key settles —
/// a refusal stored under the key would answer every retry with that 503 for ever (found by
/// the cluster test that cuts the database link mid-traffic).
#[tokio::test]
async fn a_settlement_whose_figures_could_not_be_read_is_not_recorded_and_settles_on_retry() {
    let (setup, gateway, _clock) = failing_gateway(false, true);
    let identity = Identity { institution: PHARMACY.into() };
    let body: BillBody = serde_json::from_value(json!({
        "token": setup.token(&Card::beijing(), 300), "terminal_id": "POS-01", "total_fen": 10000,
        "lines": [{ "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 }]
    }))
    .expect("body");
    let first = status(&flow::settle(&gateway, &identity, "till-9", body.clone(), "r1").await);
    assert_eq!(first.0, StatusCode::SERVICE_UNAVAILABLE, "{}", first.1);
    assert!(first.1.contains("storage_unavailable"), "{}", first.1);
    assert_eq!(gateway.ledger.by_idempotency_key(PHARMACY, "till-9").await.expect("read").map(|r| r.state), None);
    let retry = status(&flow::settle(&gateway, &identity, "till-9", body, "r2").await);
    assert_eq!(retry.0, StatusCode::CREATED, "{}", retry.1);
}

/// Closing a business day (issue #18, national 3201): refused while the day is not over or
/// holds a settlement whose outcome is not recorded; once closed, its totals are fixed (per
/// insurance type and clearing type too), a later reversal of one of its settlements lands on
/// the day it is made, and closing again answers the first closing.
#[tokio::test]
async fn a_closed_day_keeps_its_totals_and_a_later_reversal_lands_on_its_own_day() {
    use cardgate::api::reconciliation::{self, CLOSE_GRACE_SECS, CloseBody};
    let (setup, gateway, clock) = failing_gateway(true, false);
    let identity = Identity { institution: PHARMACY.into() };
    let body: BillBody = serde_json::from_value(json!({
        "token": setup.token(&Card::beijing(), 300), "terminal_id": "POS-01", "total_fen": 10000,
        "lines": [{ "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 }]
    }))
    .expect("body");
    let started = clock.0.load(Ordering::Relaxed);
    let date = cardgate::ledger::business_day(started);
    let close =
        async |date: &str| status(&reconciliation::close(&gateway, &identity, CloseBody { date: date.into() }).await);
    let day = async |date: &str| {
        let (code, body) = status(&reconciliation::get(&gateway, &identity, Some(&format!("date={date}"))).await);
        assert_eq!(code, StatusCode::OK, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("json")
    };

    // The outcome write fails: the settlement stays pending.
    let first = flow::settle(&gateway, &identity, "till-close", body.clone(), "r1").await;
    assert!(status(&first).0.is_server_error(), "{:?}", status(&first));

    // Today is not over.
    let (code, answer) = close(&date).await;
    assert_eq!(code, StatusCode::CONFLICT, "{answer}");
    assert!(answer.contains("day_not_over"), "{answer}");

    // The next day, past the grace: the pending settlement holds the day open.
    let day_end = started - (started + cardgate::ledger::UTC_OFFSET_SECS).rem_euclid(86_400) + 86_400;
    clock.0.store(day_end + CLOSE_GRACE_SECS - 1, Ordering::Relaxed);
    assert!(close(&date).await.1.contains("day_not_over"));
    clock.0.store(day_end + CLOSE_GRACE_SECS + 60, Ordering::Relaxed);
    let (code, answer) = close(&date).await;
    assert_eq!(code, StatusCode::CONFLICT, "{answer}");
    assert!(answer.contains("day_has_unresolved"), "{answer}");

    // The retry completes it (counted on the day it was made), and the day closes.
    let late = status(&flow::settle(&gateway, &identity, "till-close", body, "r2").await);
    assert_eq!(late.0, StatusCode::CREATED, "{}", late.1);
    let receipt: serde_json::Value = serde_json::from_str(&late.1).expect("receipt");
    let fund = receipt["fund_pay_fen"].as_i64().expect("fund");
    let (code, answer) = close(&date).await;
    assert_eq!(code, StatusCode::OK, "{answer}");
    let closed: serde_json::Value = serde_json::from_str(&answer).expect("json");
    assert!(closed["closed_at"].is_string(), "{closed}");
    assert_eq!(closed["settled"]["count"], 1);
    assert_eq!(closed["settled"]["total_fen"], 10000);
    assert_eq!(closed["settled"]["fund_pay_fen"], fund);
    let by_type = closed["by_type"].as_array().expect("by_type");
    assert_eq!(by_type.len(), 1, "{closed}");
    assert_eq!(
        (by_type[0]["insurance_type"].as_str(), by_type[0]["clearing_type"].as_str()),
        (Some("310"), Some("41"))
    );
    assert_eq!(by_type[0]["net"]["total_fen"], 10000);
    assert_eq!(closed["details"][0]["insurance_type"], "310");

    // Reversed the day after: the closed day does not move; the reversal is the new day's.
    let id = receipt["settlement_id"].as_str().expect("id");
    let reversal = status(&flow::reverse(&gateway, &identity, id, Default::default()).await);
    assert_eq!(reversal.0, StatusCode::OK, "{}", reversal.1);
    let again = day(&date).await;
    for key in ["settled", "reversed", "net", "by_type", "closed_at"] {
        assert_eq!(again[key], closed[key], "{key}");
    }
    assert_eq!(again["reversed"]["count"], 0);
    // Its lines are read as they are now: the settlement, reversed since.
    assert_eq!(
        (again["date"].as_str(), again["detail_count"].as_u64(), again["page"].as_u64(), again["page_size"].as_u64()),
        (Some(date.as_str()), Some(1), Some(1), Some(100)),
        "{again}"
    );
    assert_eq!(
        (again["details"][0]["event"].as_str(), again["details"][0]["state"].as_str()),
        (Some("settled"), Some("reversed"))
    );
    let next = day(&cardgate::ledger::business_day(day_end + CLOSE_GRACE_SECS + 60)).await;
    assert_eq!(next["reversed"]["count"], 1);
    assert_eq!(next["reversed"]["total_fen"], 10000);
    assert_eq!(next["by_type"][0]["reversed"]["fund_pay_fen"], fund);
    assert_eq!(next["by_type"][0]["net"]["total_fen"], -10000);
    assert_eq!(next["details"][0]["event"], "reversed");
    assert!(next["closed_at"].is_null());

    // Closing again answers the first closing; a bad date is refused.
    let (code, answer) = close(&date).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&answer).expect("json")["closed_at"], closed["closed_at"]);
    let (code, answer) = close("2026-02-30").await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{answer}");
}

/// An encounter's settlement whose claim on its lines could not be written (the database went
/// away): it answers 503 and stays pending; completed later it settles nothing (its lines were
/// never claimed) and is recorded failed; the lines settle with the next settlement, once.
#[tokio::test]
async fn an_encounter_settlement_whose_claim_did_not_land_settles_nothing() {
    use cardgate::api::encounters::{self, EncounterSettleBody, RegisterBody};
    let setup = Setup::create(&Options::default(), "127.0.0.1:0");
    let config = Config::load(&setup.dir.path().join("cardgate.toml"), &HashMap::new()).expect("config");
    let clock = Arc::new(TestClock(AtomicI64::new(now())));
    let mut gateway = Gateway::build(config, Arc::clone(&clock) as Arc<dyn Clock>).expect("gateway");
    let failing = FailingOutcome::around(&gateway);
    gateway.ledger = Arc::clone(&failing) as Arc<dyn Ledger>;
    let identity = Identity { institution: cardgate::dev::HOSPITAL.into() };
    let register: RegisterBody = serde_json::from_value(json!({
        "token": setup.token(&Card::in_region("310104"), 300), "terminal_id": "ADM", "med_type": "21",
        "diagnoses": [{ "code": "K35.8", "primary": true }], "admitted_at": "2026-12-01T08:00:00+08:00"
    }))
    .expect("body");
    let registered = status(&encounters::register(&gateway, &identity, "adm-1", register).await);
    assert_eq!(registered.0, StatusCode::CREATED, "{}", registered.1);
    let id = serde_json::from_str::<serde_json::Value>(&registered.1).expect("json")["encounter_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let fees = json!({ "fees": [{ "feedetl_sn": "1", "code": "A", "name": "a", "category": "class_a",
        "quantity": 1, "unit_price_fen": 200000, "amount_fen": 200000 }] });
    assert_eq!(status(&encounters::upload(&gateway, &identity, &id, fees).await).0, StatusCode::OK);
    let body = EncounterSettleBody { interim: true, use_account: Some(false) };

    failing.fail_encounter.store(true, Ordering::Relaxed);
    let first = status(&encounters::settle(&gateway, &identity, &id, "set-1", body.clone(), "r1").await);
    assert_eq!(first.0, StatusCode::SERVICE_UNAVAILABLE, "{}", first.1);
    let record = gateway.ledger.by_idempotency_key(cardgate::dev::HOSPITAL, "set-1").await.expect("read");
    assert_eq!(record.as_ref().map(|r| r.state), Some(State::Pending));
    // Past the payers' timeouts, its retry completes it: failed, nothing settled, nothing moved.
    clock.0.fetch_add(2 * 2 + 10 + 1, Ordering::Relaxed);
    let retry = status(&encounters::settle(&gateway, &identity, &id, "set-1", body.clone(), "r2").await);
    assert_eq!(retry.0, StatusCode::CONFLICT, "{}", retry.1);
    assert!(retry.1.contains("encounter_busy"), "{}", retry.1);
    let view = status(&encounters::get(&gateway, &identity, &id).await);
    let view: serde_json::Value = serde_json::from_str(&view.1).expect("json");
    assert_eq!(
        (view["fees"]["unsettled_fen"].as_i64(), view["settlements"].as_array().map(Vec::len)),
        (Some(200_000), Some(0))
    );
    // The next settlement takes the line, once: 200,000 less the stay's 90,000, 85%: 93,500.
    let settled = status(&encounters::settle(&gateway, &identity, &id, "set-2", body, "r3").await);
    assert_eq!(settled.0, StatusCode::CREATED, "{}", settled.1);
    let receipt: serde_json::Value = serde_json::from_str(&settled.1).expect("json");
    assert_eq!(receipt["fund_pay_fen"], 93_500);
    let view = status(&encounters::get(&gateway, &identity, &id).await);
    assert!(view.1.contains("\"settled_fen\":200000"), "{}", view.1);
}

/// The admin listener's export of a day the ledger cannot read: failing before the first page,
/// a 503 with its code and no CSV; failing after it, the answer's body ends without its last
/// chunk, so the client reading it gets an error — never a short file that looks whole.
#[tokio::test]
async fn an_export_the_ledger_fails_is_refused_or_cut_short_never_short_and_whole() {
    use cardgate::ledger::export::PAGE;
    use http_body_util::BodyExt;
    let setup = Setup::create(&Options::default(), "127.0.0.1:0");
    let config = Config::load(&setup.dir.path().join("cardgate.toml"), &HashMap::new()).expect("config");
    let mut gateway = Gateway::build(config, Arc::new(cardgate::service::SystemClock)).expect("gateway");
    let failing = FailingOutcome::around(&gateway);
    failing.fail_export_from.store(1, Ordering::Relaxed);
    gateway.ledger = Arc::clone(&failing) as Arc<dyn Ledger>;
    let tls = setup.server_tls("test");
    let live = cardgate::service::Live::new(gateway, tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(cardgate::server::admin::run(listener, live, None, async {
        let _ = stopped.await;
    }));
    let path = format!("/admin/ledger/export?date=2026-12-01&institution={PHARMACY}");

    // The first page fails: nothing sent but the refusal.
    let (status, answer) = cardgate_tests::harness::admin(addr, http::Method::GET, &path).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "storage_unavailable", "{answer}");

    // The second page fails: the first is sent (a full page), then the body breaks off.
    failing.fail_export_from.store(2, Ordering::Relaxed);
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect admin");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(&path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", cardgate_tests::harness::ADMIN_TOKEN))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut released = false;
    let broken = loop {
        match body.frame().await {
            Some(Ok(frame)) => received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Some(Err(_)) => break true,
            None => break false,
        }
        // The header and the first page are here: now the ledger fails.
        if !released && received.iter().filter(|&&b| b == b'\n').count() == 1 + PAGE as usize {
            failing.export_fails_now.notify_one();
            released = true;
        }
    };
    let text = String::from_utf8_lossy(&received);
    assert!(broken, "the body ended as if whole after {} lines", text.lines().count());
    assert!(text.starts_with(cardgate::ledger::export::HEADER), "{}", &text[..text.len().min(200)]);
    assert_eq!(text.lines().count(), 1 + PAGE as usize, "the header and the first page, then the break");

    let _ = stop.send(());
    admin.await.expect("admin listener");
}
