//! Traffic control and "nothing lost", end to end: rate limits by scope, load shedding, the
//! circuit breaker, unknown outcomes resolved by a retry, reconciliation and its CSV export.

use std::path::Path;

use cardgate_tests::harness::{Card, Options, TestGateway, get, post};
use http::StatusCode;
use serde_json::{Value, json};

fn bill_body(token: &str, terminal: &str) -> Value {
    json!({
        "token": token, "terminal_id": terminal, "total_fen": 30000,
        "lines": [{ "code": "XA01", "name": "Insulin", "category": "class_a", "quantity": 3, "unit_price_fen": 10000, "amount_fen": 30000 }]
    })
}

fn key(label: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{label}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn limited(extra: &str) -> TestGateway {
    TestGateway::start(Options { extra_toml: extra.to_owned(), ..Options::default() }).await
}

fn assert_limited(reply: &cardgate::client::Reply, scope: &str) {
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.body);
    assert_eq!(reply.json()["code"], "rate_limited");
    assert_eq!(reply.json()["scope"], scope);
    let retry: u64 = reply.retry_after.as_deref().and_then(|r| r.parse().ok()).expect("Retry-After");
    assert!(retry >= 1, "Retry-After {retry}");
}

#[tokio::test]
async fn global_limit_answers_429() {
    let gw = limited("[limits.global]\nper_minute = 60\nburst = 2\n").await;
    for _ in 0..2 {
        assert_eq!(get(&gw.pharmacy, "/v1/settlements/S0").await.status, StatusCode::NOT_FOUND);
    }
    assert_limited(&get(&gw.hospital, "/v1/settlements/S0").await, "global");
}

#[tokio::test]
async fn institution_limit_spares_other_institutions() {
    let gw = limited("[limits.institution]\nper_minute = 60\nburst = 2\n").await;
    for _ in 0..2 {
        get(&gw.pharmacy, "/v1/settlements/S0").await;
    }
    assert_limited(&get(&gw.pharmacy, "/v1/settlements/S0").await, "institution");
    assert_eq!(get(&gw.hospital, "/v1/settlements/S0").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn terminal_limit_spares_other_terminals() {
    let gw = limited("[limits.terminal]\nper_minute = 60\nburst = 2\n").await;
    let token = gw.token(&Card::beijing(), 120);
    let inquiry = |terminal: &str| json!({ "token": token, "terminal_id": terminal });
    for _ in 0..2 {
        assert_eq!(post(&gw.pharmacy, "/v1/inquiries", None, &inquiry("POS-1")).await.status, StatusCode::OK);
    }
    assert_limited(&post(&gw.pharmacy, "/v1/inquiries", None, &inquiry("POS-1")).await, "terminal");
    assert_eq!(post(&gw.pharmacy, "/v1/inquiries", None, &inquiry("POS-2")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn card_velocity_limit_spares_other_cards() {
    let gw = limited("[limits.card]\nper_minute = 1\nburst = 1\n").await;
    let card = Card::beijing();
    let first =
        post(&gw.pharmacy, "/v1/settlements", Some(&key("c")), &bill_body(&gw.token(&card, 120), "POS-1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let second =
        post(&gw.pharmacy, "/v1/settlements", Some(&key("c")), &bill_body(&gw.token(&card, 120), "POS-2")).await;
    assert_limited(&second, "card");
    let other =
        post(&gw.pharmacy, "/v1/settlements", Some(&key("c")), &bill_body(&gw.token(&Card::beijing(), 120), "POS-1"))
            .await;
    assert_eq!(other.status, StatusCode::CREATED);
}

fn fixture_route(name: &str, region: &str, config: &str, plugin_settings: &str) -> String {
    let library = cardgate_sdk::testing::build_cdylib("fixture-configurable");
    format!(
        "\n[plugins.{name}]\nlibrary = \"{}\"\n{plugin_settings}\nconfig = {config}\n\n[[routes]]\nregions = [\"{region}\"]\npayers = [\"{name}\"]\n",
        library.display()
    )
}

#[tokio::test]
async fn past_the_in_flight_limit_the_gateway_sheds_with_503() {
    let extra = fixture_route("slow", "12", "{ delay_ms = 600 }", "") + "\n[limits]\nmax_in_flight = 1\n";
    let gw = limited(&extra).await;
    let (a, b) = (gw.token(&Card::in_region("120101"), 120), gw.token(&Card::in_region("120101"), 120));
    let (slow_key, slow_body) = (key("s"), bill_body(&a, "POS-1"));
    let slow = post(&gw.pharmacy, "/v1/settlements", Some(&slow_key), &slow_body);
    let shed = async {
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        post(&gw.hospital, "/v1/settlements", Some(&key("s")), &bill_body(&b, "HIS-1")).await
    };
    let (slow, shed) = tokio::join!(slow, shed);
    assert_eq!(slow.status, StatusCode::CREATED, "{}", slow.body);
    assert_eq!((shed.status, shed.json()["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("overloaded")));
    assert_eq!(shed.retry_after.as_deref(), Some("1"));
    // Once the slow one is done, the gateway serves again.
    let again = post(&gw.hospital, "/v1/settlements", Some(&key("s")), &bill_body(&b, "HIS-1")).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
}

#[tokio::test]
async fn breaker_opens_on_a_failing_plugin_and_closes_after_it_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let down = dir.path().join("down");
    std::fs::write(&down, b"").expect("mark down");
    let config = format!("{{ down_while_exists = \"{}\" }}", down.display());
    let extra = fixture_route("flaky", "12", &config, "breaker_failures = 3\nbreaker_open_ms = 400");
    let gw = limited(&extra).await;
    let settle = || async {
        let token = gw.token(&Card::in_region("120101"), 120);
        post(&gw.pharmacy, "/v1/settlements", Some(&key("b")), &bill_body(&token, "POS-1")).await
    };
    for _ in 0..3 {
        let reply = settle().await;
        assert_eq!(
            (reply.status, reply.json()["code"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("plugin_unavailable"))
        );
        assert!(reply.json()["detail"].as_str().is_some_and(|d| d.contains("payer is down")), "{}", reply.body);
    }
    let open = settle().await;
    assert_eq!(open.json()["code"], "plugin_unavailable");
    assert!(open.json()["detail"].as_str().is_some_and(|d| d.contains("circuit breaker open")), "{}", open.body);
    // The payer recovers; after the open period one probe goes through and closes the breaker.
    std::fs::remove_file(&down).expect("mark up");
    assert!(settle().await.json()["detail"].as_str().is_some_and(|d| d.contains("circuit breaker open")));
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    assert_eq!(settle().await.status, StatusCode::CREATED);
    assert_eq!(settle().await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn plugin_timeout_then_retry_settles_exactly_once() {
    let extra =
        fixture_route("sluggish", "12", "{ delay_ms = 800, delayed_calls = 1, fund_bp = 5000 }", "timeout_ms = 200");
    let gw = limited(&extra).await;
    let token = gw.token(&Card::in_region("120101"), 120);
    let body = bill_body(&token, "POS-1");
    let key = key("t");
    let first = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!((first.status, first.json()["code"].as_str()), (StatusCode::GATEWAY_TIMEOUT, Some("plugin_timeout")));
    let id = first.json()["settlement_id"].as_str().expect("settlement id").to_owned();
    assert_eq!(get(&gw.pharmacy, &format!("/v1/settlements/{id}")).await.json()["state"], "unknown");
    // The token stays reserved: another attempt under another key cannot settle it too.
    let other = post(&gw.pharmacy, "/v1/settlements", Some("another-key"), &body).await;
    assert_eq!(other.json()["code"], "token_replayed");
    // The retry with the same key completes the same settlement.
    let retry = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert_eq!(retry.json()["settlement_id"].as_str(), Some(id.as_str()));
    assert_eq!(retry.json()["fund_pay_fen"], 15000);
    let again = post(&gw.pharmacy, "/v1/settlements", Some(&key), &body).await;
    assert_eq!(again.body, retry.body);
    let day = reconciliation(&gw, &today(), "").await;
    assert_eq!(day["settled"]["count"], 1, "exactly one settlement: {day}");
}

fn today() -> String {
    let now = time::OffsetDateTime::now_utc() + time::Duration::hours(8);
    format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day())
}

async fn reconciliation(gw: &TestGateway, date: &str, extra: &str) -> Value {
    let reply = get(&gw.pharmacy, &format!("/v1/reconciliation?date={date}{extra}")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    reply.json()
}

#[tokio::test]
async fn reconciliation_totals_equal_the_sum_of_the_details() {
    let mut gw = TestGateway::start(Options::default()).await;
    let mut receipts = Vec::new();
    // The first till names itself as a spreadsheet formula: the export must not run it.
    for terminal in ["=SUM(1,2)", "POS-1", "POS-1"] {
        let token = gw.token(&Card::beijing(), 120);
        let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key("r")), &bill_body(&token, terminal)).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        receipts.push(reply.json());
    }
    let reversed = receipts[1]["settlement_id"].as_str().expect("id");
    post(&gw.pharmacy, &format!("/v1/settlements/{reversed}/reversal"), None, &json!({})).await;
    let day = reconciliation(&gw, &today(), "").await;
    assert_eq!((day["settled"]["count"].as_u64(), day["reversed"]["count"].as_u64()), (Some(3), Some(1)));
    for field in ["total_fen", "fund_pay_fen", "account_pay_fen", "cash_pay_fen"] {
        let from_receipts: i64 = receipts.iter().map(|r| r[field].as_i64().expect("amount")).sum();
        let from_details: i64 = day["details"]
            .as_array()
            .expect("details")
            .iter()
            .filter(|d| d["event"] == "settled")
            .map(|d| d[field].as_i64().expect("amount"))
            .sum();
        assert_eq!(day["settled"][field].as_i64(), Some(from_receipts), "{field}");
        assert_eq!(from_details, from_receipts, "{field}");
        let net = day["settled"][field].as_i64().expect("n") - day["reversed"][field].as_i64().expect("n");
        assert_eq!(day["net"][field].as_i64(), Some(net));
    }
    // One insurance type (the card's employee scheme) and clearing type (a pharmacy's sale).
    let by_type = day["by_type"].as_array().expect("by_type");
    assert_eq!(by_type.len(), 1, "{day}");
    assert_eq!(
        (by_type[0]["insurance_type"].as_str(), by_type[0]["clearing_type"].as_str()),
        (Some("310"), Some("41"))
    );
    for totals in ["settled", "reversed", "net"] {
        assert_eq!(by_type[0][totals], day[totals], "{totals}");
    }
    assert!(day["closed_at"].is_null());
    // Today cannot be closed yet; a past day can, once, and says when.
    let close =
        async |date: &str| post(&gw.pharmacy, "/v1/reconciliation/closures", None, &json!({ "date": date })).await;
    let today_refused = close(&today()).await;
    assert_eq!(
        (today_refused.status, today_refused.json()["code"].as_str()),
        (StatusCode::CONFLICT, Some("day_not_over"))
    );
    let closed = close("2020-01-01").await;
    assert_eq!(closed.status, StatusCode::OK, "{}", closed.body);
    assert!(closed.json()["closed_at"].is_string());
    assert_eq!(closed.json()["settled"]["count"], 0);
    assert_eq!(reconciliation(&gw, "2020-01-01", "").await["closed_at"], closed.json()["closed_at"]);
    assert_eq!(close("2020-01-01").await.json()["closed_at"], closed.json()["closed_at"]);
    let basic: i64 = receipts.iter().map(|r| r["payers"][0]["fund_pay_fen"].as_i64().expect("fund")).sum();
    assert_eq!(day["payers"][0]["payer"], "basic-medical");
    assert_eq!(day["payers"][0]["fund_pay_fen"].as_i64(), Some(basic));
    let page = reconciliation(&gw, &today(), "&page=2&page_size=2").await;
    // Three settlements and one reversal made today: four events.
    assert_eq!((page["details"].as_array().map(Vec::len), page["detail_count"].as_u64()), (Some(2), Some(4)));
    assert_eq!(get(&gw.pharmacy, "/v1/reconciliation?date=2026-13-01").await.status, StatusCode::BAD_REQUEST);
    let twice = get(&gw.pharmacy, &format!("/v1/reconciliation?date={}&page=1&page=2", today())).await;
    assert_eq!(
        (twice.status, twice.json()["detail"].as_str()),
        (StatusCode::BAD_REQUEST, Some("page: given more than once")),
        "{}",
        twice.body
    );
    assert_eq!(reconciliation(&gw, "2020-01-01", "").await["settled"]["count"], 0);

    // The running gateway exports the day itself, on its admin listener: what the command
    // writes once it is stopped, line for line.
    use cardgate_tests::harness::admin_text;
    let path = format!("/admin/ledger/export?date={}", today());
    let (status, live) = admin_text(gw.admin, http::Method::GET, &path).await;
    assert_eq!(status, StatusCode::OK, "{live}");
    let (status, one) =
        admin_text(gw.admin, http::Method::GET, &format!("{path}&institution={}", cardgate::dev::PHARMACY)).await;
    assert_eq!((status, one.lines().count()), (StatusCode::OK, 5), "one institution's:\n{one}");
    let (status, other) =
        admin_text(gw.admin, http::Method::GET, &format!("{path}&institution={}", cardgate::dev::HOSPITAL)).await;
    assert_eq!((status, other.lines().count()), (StatusCode::OK, 1), "the header alone:\n{other}");
    for (query, expected, code) in [
        ("", StatusCode::BAD_REQUEST, "invalid_request"),
        ("?date=2026-13-01", StatusCode::BAD_REQUEST, "invalid_request"),
        ("?date=2020-01-01&page=2", StatusCode::BAD_REQUEST, "invalid_request"),
        ("?date=2020-01-01&institution=NOPE", StatusCode::NOT_FOUND, "unknown_institution"),
        ("?date=2020-01-01&date=2020-01-02", StatusCode::BAD_REQUEST, "invalid_request"),
    ] {
        let (status, answer) =
            cardgate_tests::harness::admin(gw.admin, http::Method::GET, &format!("/admin/ledger/export{query}")).await;
        assert_eq!((status, answer["code"].as_str()), (expected, Some(code)), "{query}: {answer}");
    }
    if cardgate_tests::harness::test_engine() == "lsm" {
        // One process holds that engine: the command says where the export is meanwhile.
        use clap::Parser;
        let config = gw.dir.path().join("cardgate.toml");
        let args =
            ["cardgate", "ledger", "export", "--config", config.to_str().expect("UTF-8"), "--date", "2020-01-01"];
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = cardgate::cli::run(cardgate::cli::Cli::try_parse_from(args).expect("arguments"), &mut out, &mut err);
        let err = String::from_utf8_lossy(&err);
        assert!(code != 0 && err.contains("GET /admin/ledger/export?date=2020-01-01"), "{err}");
    }

    gw.stop().await;
    let csv = export_csv(gw.dir.path(), &today());
    assert_eq!(live, csv, "the admin listener's export and the command's");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 5, "header, three settlements and a reversal:\n{csv}");
    assert!(lines[0].starts_with("institution_id,event,settlement_id,state"));
    assert!(lines[0].ends_with(",insurance_type,clearing_type"), "{}", lines[0]);
    assert!(lines[1..].iter().all(|l| l.ends_with(",310,41")), "{csv}");
    let formula: Vec<&&str> = lines.iter().filter(|l| l.contains("SUM(1,2)")).collect();
    assert_eq!(formula.len(), 1, "{csv}");
    assert!(formula[0].contains(",\"'=SUM(1,2)\","), "written as text: {}", formula[0]);
    assert_eq!(
        lines.iter().filter(|l| l.contains(",reversed,")).count(),
        2,
        "the reversal, and its settlement's state"
    );

    // An SQLite ledger moves whole into the log-structured engine; an lsm one is refused.
    use clap::Parser;
    let config = gw.dir.path().join("cardgate.toml");
    let to = gw.dir.path().join("moved");
    let args = [
        "cardgate",
        "ledger",
        "migrate",
        "--config",
        config.to_str().expect("UTF-8"),
        "--to",
        to.to_str().expect("UTF-8"),
    ];
    let cli = cardgate::cli::Cli::try_parse_from(args).expect("arguments");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cardgate::cli::run(cli, &mut out, &mut err);
    let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    if cardgate_tests::harness::test_engine() == "sqlite" {
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("migrated 3 settlements") && out.contains("engine = \"lsm\""), "{out}");
        assert!(to.join("cardgate-ledger").is_file(), "the new ledger's manifest");
    } else {
        assert_ne!(code, 0);
        assert!(err.contains("not an SQLite ledger file"), "{err}");
    }
}

fn export_csv(dir: &Path, date: &str) -> String {
    use clap::Parser;
    let config = dir.join("cardgate.toml");
    let args = ["cardgate", "ledger", "export", "--config", config.to_str().expect("UTF-8"), "--date", date];
    let cli = cardgate::cli::Cli::try_parse_from(args).expect("arguments");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(cardgate::cli::run(cli, &mut out, &mut err), 0, "{}", String::from_utf8_lossy(&err));
    String::from_utf8(out).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_institution_holding_requests_open_cannot_starve_the_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = limited("\n[limits]\nmax_in_flight = 8\ninstitution_max_in_flight = 4\n").await;
    // The pharmacy sends ten request heads and holds every body back.
    let head = "POST /v1/settlements HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nIdempotency-Key: held\r\nContent-Length: 1000\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut stream = gw.pharmacy.open_tls().await.expect("TLS");
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.flush().await.expect("flush");
        held.push(stream);
    }
    // Past its share, the pharmacy's requests are shed at once; the rest wait for their bodies
    // (for the body timeout, 10 s: all are read at once, for 4 s).
    let reads: Vec<_> = held
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut answer = vec![0u8; 4096];
                let read = tokio::time::timeout(std::time::Duration::from_secs(4), stream.read(&mut answer)).await;
                (read.map(|r| r.map(|n| String::from_utf8_lossy(&answer[..n]).into_owned())), stream)
            })
        })
        .collect();
    let (mut shed, mut waiting, mut streams) = (0, 0, Vec::new());
    for read in reads {
        let (read, stream) = read.await.expect("task");
        streams.push(stream);
        match read {
            Ok(Ok(text)) if !text.is_empty() => {
                assert!(text.starts_with("HTTP/1.1 503") && text.contains("overloaded"), "{text}");
                shed += 1;
            }
            Ok(other) => panic!("closed without an answer: {other:?}"),
            Err(_) => waiting += 1,
        }
    }
    assert_eq!((waiting, shed), (4, 6), "the pharmacy holds exactly its share");
    // The hospital is served meanwhile.
    let token = gw.token(&Card::beijing(), 120);
    let reply = post(&gw.hospital, "/v1/settlements", Some(&key("h")), &bill_body(&token, "HIS-1")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    drop(streams);
}
