//! The crash harness: many clients settle while the real `cardgate` daemon is killed with
//! SIGKILL at random moments and restarted; every request not yet acknowledged is retried with
//! its idempotency key. Then every acknowledged settlement must be present and identical, no
//! bill settled twice, and the ledger's totals equal the sum of the receipts.
//!
//! Short form by default (CI). The full form: `CRASH_CYCLES=5 CRASH_BILLS=1000 cargo test -p
//! cardgate-tests --test crash -- --nocapture`.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardgate::client::Client;
use cardgate_tests::harness::{Card, Options, Setup, get};
use cardgate_tests::{cardgate_binary, listen_addr};
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Daemon {
    setup: Setup,
    child: Option<Child>,
}

impl Daemon {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.setup.dir.path().join("daemon.log"))
            .expect("log file");
        let child = Command::new(cardgate_binary())
            .args(["serve", "--config"])
            .arg(self.setup.dir.path().join("cardgate.toml"))
            .env("CARDGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start cardgate");
        self.child = Some(child);
    }

    async fn wait_ready(&self, client: &Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if client.send(Method::GET, "/v1/settlements/ready", &[], None).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the daemon did not come up; see {}", self.setup.dir.path().join("daemon.log").display());
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Bill {
    key: String,
    body: Value,
}

/// A tiny deterministic generator for kill moments (no extra dependency).
fn next(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *seed >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_settlements_survive_sigkill_and_none_settles_twice() {
    let cycles = env_number("CRASH_CYCLES", 3);
    let bills = env_number("CRASH_BILLS", 240);
    let addr = listen_addr();
    let setup = Setup::create(&Options::default(), &addr.to_string());
    let client = setup.client(addr, 1);
    let queue: Vec<Bill> = (0..bills)
        .map(|i| {
            let token = setup.token(&Card::beijing(), 600);
            let amount = 1_000 + 37 * i as i64;
            let body = json!({
                "token": token, "terminal_id": format!("POS-{}", i % 8), "total_fen": amount,
                "lines": [{ "code": "XA01", "name": "drug", "category": "class_a", "quantity": 1, "unit_price_fen": amount, "amount_fen": amount }]
            });
            Bill { key: format!("crash-{i}"), body }
        })
        .collect();
    let mut daemon = Daemon { setup, child: None };
    daemon.start();
    daemon.wait_ready(&client).await;

    let queue = Arc::new(Mutex::new(queue));
    let receipts: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let retried = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (queue, receipts, client, retried) = (queue.clone(), receipts.clone(), client.clone(), retried.clone());
            tokio::spawn(async move {
                loop {
                    let Some(bill) = queue.lock().expect("queue").pop() else { break };
                    let headers = [("idempotency-key", bill.key.as_str())];
                    let sent = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.send(Method::POST, "/v1/settlements", &headers, Some(&bill.body.to_string())),
                    )
                    .await;
                    match sent {
                        Ok(Ok(reply)) if reply.status == StatusCode::CREATED => {
                            receipts.lock().expect("receipts").insert(bill.key.clone(), reply.json());
                        }
                        Ok(Ok(reply))
                            if reply.status == StatusCode::CONFLICT
                                && reply.json()["code"] == "request_in_progress" =>
                        {
                            retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            queue.lock().expect("queue").insert(0, bill);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Ok(Ok(reply)) => panic!("bill {} refused: {} {}", bill.key, reply.status, reply.body),
                        // The daemon is down or died mid-request: retry with the same key.
                        Ok(Err(_)) | Err(_) => {
                            retried.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            queue.lock().expect("queue").insert(0, bill);
                            tokio::time::sleep(Duration::from_millis(30)).await;
                        }
                    }
                }
            })
        })
        .collect();

    // Kill at random moments spread over the run: when the acknowledged count passes a random
    // point in each slice of the bills.
    let mut seed = 0x5eed_u64 ^ u64::from(std::process::id());
    for cycle in 0..cycles {
        let slice = bills / (cycles + 1);
        let threshold = slice * (cycle + 1) + (next(&mut seed) as usize % slice.max(1)) / 2;
        while receipts.lock().expect("receipts").len() < threshold {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_micros(next(&mut seed) % 3000)).await;
        let acknowledged = receipts.lock().expect("receipts").len();
        daemon.kill();
        println!("cycle {}: SIGKILL with {acknowledged} acknowledged", cycle + 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        daemon.start();
        daemon.wait_ready(&client).await;
    }
    for worker in workers {
        worker.await.expect("worker");
    }

    let receipts = receipts.lock().expect("receipts").clone();
    let mut present = 0;
    for receipt in receipts.values() {
        let id = receipt["settlement_id"].as_str().expect("id");
        let stored = get(&client, &format!("/v1/settlements/{id}")).await;
        assert_eq!(stored.json(), *receipt, "settlement {id} differs from its acknowledgement");
        present += 1;
    }
    let ids: HashSet<&str> = receipts.values().filter_map(|r| r["settlement_id"].as_str()).collect();
    let now = time::OffsetDateTime::now_utc() + time::Duration::hours(8);
    let date = format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day());
    let day = get(&client, &format!("/v1/reconciliation?date={date}&page_size=1000")).await.json();
    let recorded = day["settled"]["count"].as_u64().expect("count") as usize;
    let duplicated = recorded.saturating_sub(ids.len());
    let missing = bills - receipts.len();
    println!(
        "bills {bills}, cycles {cycles}, retries {}: acknowledged {}, present {present}, duplicated {duplicated}, missing {missing}",
        retried.load(std::sync::atomic::Ordering::Relaxed),
        receipts.len()
    );
    assert_eq!((receipts.len(), present, duplicated, missing), (bills, bills, 0, 0));
    assert_eq!(recorded, bills, "one settlement per bill in the ledger");
    for field in ["total_fen", "fund_pay_fen", "account_pay_fen", "cash_pay_fen"] {
        let sum: i64 = receipts.values().map(|r| r[field].as_i64().expect("amount")).sum();
        assert_eq!(day["settled"][field].as_i64(), Some(sum), "ledger {field} equals the receipts'");
    }
}

/// One step of an encounter as a hospital's system sends it: the path, its body, and the
/// idempotency key it is sent under (a step that settles or registers has one).
fn encounter_step(step: usize, id: &str, token: &str, key: &str) -> (String, Option<String>, Value) {
    let fees = |first: usize| {
        let lines: Vec<Value> = (first..first + 100)
            .map(|sn| {
                json!({ "feedetl_sn": sn.to_string(), "code": "XA01", "name": "drug", "category": "class_a",
                "quantity": 1, "unit_price_fen": 100, "amount_fen": 100 })
            })
            .collect();
        json!({ "fees": lines })
    };
    match step {
        0 => (
            "/v1/encounters".into(),
            Some(format!("{key}-adm")),
            json!({ "token": token, "terminal_id": "ADM", "med_type": "21", "begntime": "2026-11-28T08:00:00+08:00",
                "diagnoses": [{ "code": "J18.9", "primary": true }] }),
        ),
        1 => (format!("/v1/encounters/{id}/fees"), None, fees(1)),
        2 => (format!("/v1/encounters/{id}/settlements"), Some(format!("{key}-interim")), json!({ "interim": true })),
        3 => (format!("/v1/encounters/{id}/fees"), None, fees(101)),
        4 => (format!("/v1/encounters/{id}/discharge"), None, json!({ "endtime": "2026-11-30T10:00:00+08:00" })),
        _ => (format!("/v1/encounters/{id}/settlements"), Some(format!("{key}-final")), json!({})),
    }
}

/// Stays settled in steps (admission, fees, interim settlement, more fees, discharge, final
/// settlement) while the real daemon is killed with SIGKILL and restarted; each step not yet
/// acknowledged is sent again (with its key where it has one). Then every stay has its 200
/// lines settled exactly once, by exactly one interim and one final settlement, each
/// acknowledged receipt is what the ledger holds, and the day's totals are the receipts'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encounters_settled_in_steps_survive_sigkill_and_none_settles_twice() {
    let stays = env_number("CRASH_STAYS", 16);
    let addr = listen_addr();
    let setup = Setup::create(&Options::default(), &addr.to_string());
    let client = setup.client(addr, 0);
    let tokens: Vec<String> = (0..stays).map(|_| setup.token(&Card::in_region("310104"), 600)).collect();
    let mut daemon = Daemon { setup, child: None };
    daemon.start();
    daemon.wait_ready(&client).await;
    let steps_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let receipts: Arc<Mutex<Vec<Value>>> = Arc::default();
    let workers: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(n, token)| {
            let (client, steps_done, receipts) = (client.clone(), steps_done.clone(), receipts.clone());
            tokio::spawn(async move {
                let (mut id, mut step, mut attempt) = (String::new(), 0, 0);
                while step < 6 {
                    let (path, key, body) = encounter_step(step, &id, &token, &format!("stay-{n}-{attempt}"));
                    let headers: Vec<(&str, &str)> = key.iter().map(|k| ("idempotency-key", k.as_str())).collect();
                    let sent = tokio::time::timeout(
                        Duration::from_secs(10),
                        client.send(Method::POST, &path, &headers, Some(&body.to_string())),
                    )
                    .await;
                    match sent {
                        Ok(Ok(reply)) if reply.status.is_success() => {
                            let answer = reply.json();
                            if step == 0 {
                                id = answer["encounter_id"].as_str().expect("id").to_owned();
                            }
                            if step == 2 || step == 5 {
                                receipts.lock().expect("receipts").push(answer);
                            }
                            step += 1;
                            steps_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(Ok(reply)) if reply.status == StatusCode::CONFLICT => match reply.json()["code"].as_str() {
                            // Still running (or pending since the kill): the same key later.
                            Some("request_in_progress") => tokio::time::sleep(Duration::from_millis(200)).await,
                            // Took nothing: a new key.
                            Some("encounter_busy") => attempt += 1,
                            _ => panic!("stay {n} step {step}: {} {}", reply.status, reply.body),
                        },
                        Ok(Ok(reply)) if reply.status == StatusCode::SERVICE_UNAVAILABLE => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Ok(Ok(reply)) => panic!("stay {n} step {step}: {} {}", reply.status, reply.body),
                        Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                id
            })
        })
        .collect();
    let mut seed = 0xe4c0_u64 ^ u64::from(std::process::id());
    let total_steps = stays * 6;
    for cycle in 0..3 {
        let threshold = total_steps * (cycle + 1) / 4 + (next(&mut seed) as usize % (total_steps / 8).max(1));
        let deadline = Instant::now() + Duration::from_secs(120);
        while steps_done.load(std::sync::atomic::Ordering::Relaxed) < threshold.min(total_steps - 1) {
            // A worker stopped by a refusal it did not expect never brings the count there.
            assert!(Instant::now() < deadline, "the stays made no progress in two minutes");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_micros(next(&mut seed) % 5000)).await;
        daemon.kill();
        println!("cycle {}: SIGKILL after {} steps", cycle + 1, steps_done.load(std::sync::atomic::Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(100)).await;
        daemon.start();
        daemon.wait_ready(&client).await;
    }
    let mut ids = Vec::new();
    for worker in workers {
        ids.push(worker.await.expect("worker"));
    }
    let receipts = receipts.lock().expect("receipts").clone();
    assert_eq!(receipts.len(), stays * 2, "an interim and a final receipt per stay");
    for id in &ids {
        let view = get(&client, &format!("/v1/encounters/{id}")).await.json();
        assert_eq!((view["fees"]["count"].as_u64(), view["fees"]["settled_fen"].as_i64()), (Some(200), Some(20_000)));
        let settled: Vec<&Value> =
            view["settlements"].as_array().expect("settlements").iter().filter(|s| s["state"] == "settled").collect();
        assert_eq!(settled.len(), 2, "{view}");
        assert_eq!((settled[0]["interim"].as_bool(), settled[1]["interim"].as_bool()), (Some(true), Some(false)));
    }
    for receipt in &receipts {
        let sid = receipt["settlement_id"].as_str().expect("sid");
        assert_eq!(get(&client, &format!("/v1/settlements/{sid}")).await.json(), *receipt, "{sid}");
    }
    let now = time::OffsetDateTime::now_utc() + time::Duration::hours(8);
    let date = format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day());
    let day = get(&client, &format!("/v1/reconciliation?date={date}&page_size=1000")).await.json();
    assert_eq!(day["settled"]["count"].as_u64(), Some(stays as u64 * 2), "one settlement per step, none twice");
    for field in ["total_fen", "fund_pay_fen", "cash_pay_fen"] {
        let sum: i64 = receipts.iter().map(|r| r[field].as_i64().expect("amount")).sum();
        assert_eq!(day["settled"][field].as_i64(), Some(sum), "{field}");
    }
}
