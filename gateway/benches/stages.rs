//! One criterion bench per stage of the request flow that is not measured elsewhere (token
//! verification: `benches/token.rs`; plugin calls: `tests/benches/plugin_call.rs`):
//! body parse, limiter checks, routing, sealing a prepared request, ledger commits (batched by
//! concurrency), and the bureau's catalogue (loading 50,000 items, classifying a 1,000-line
//! bill).
//!
//! Run: `cargo bench -p cardgate --bench stages`.

use std::hint::black_box;
use std::sync::Arc;

use cardgate::api::model::{BillBody, check_bill};
use cardgate::config::{LimitsConfig, RateConfig, RouteConfig};
use cardgate::ledger::sqlite::SqliteLedger;
use cardgate::ledger::{AccumulatorDelta, Amounts, Intent, Ledger, Outcome, State};
use cardgate::limit::Limiter;
use cardgate::route::{RouteQuery, Router};
use cardgate_sdk::YearToDate;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const BODY: &str = r#"{"token":"EC1:6BFOXN%TS3DH0YOJ58S S-W5HDC *M0II5XHC9B5G2+$N IOP-IA%NH$RSC9 PBUVH9V3IUQJ1 Q3S1BMTF*X4TT5$$D2-HXRQ4L2H8W1U$A3F2*7O","terminal_id":"POS-01","total_fen":170000,"lines":[{"code":"XA01","name":"Amoxicillin","category":"class_a","quantity":10,"unit_price_fen":10000,"amount_fen":100000},{"code":"XB02","name":"CT scan","category":"class_b","quantity":1,"unit_price_fen":50000,"amount_fen":50000},{"code":"XC03","name":"Single room","category":"class_c","quantity":1,"unit_price_fen":20000,"amount_fen":20000}]}"#;

fn rate(per_second: u32) -> Option<RateConfig> {
    Some(RateConfig { per_second: Some(per_second), per_minute: None, burst: per_second })
}

fn stages(c: &mut Criterion) {
    let mut group = c.benchmark_group("stages");
    group.bench_function("body_parse_and_check", |b| {
        b.iter(|| {
            let body: BillBody = serde_json::from_str(black_box(BODY)).expect("parses");
            check_bill(&body.lines, body.total_fen).expect("balances")
        })
    });

    let limiter = Limiter::new(&LimitsConfig {
        global: rate(1_000_000_000),
        institution: rate(1_000_000_000),
        terminal: rate(1_000_000_000),
        card: rate(1_000_000_000),
        max_in_flight: 1_000_000,
        institution_max_in_flight: None,
        shared: None,
    });
    // The checks are futures (a cluster's go to Redis); a node's own answer at once.
    let local = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    group.bench_function("limiter_all_scopes", |b| {
        b.iter(|| {
            local.block_on(async {
                let _guard = limiter.enter(black_box("H110105001"));
                limiter.check_request(black_box("H110105001")).await.expect("allowed");
                limiter.check_terminal("H110105001", black_box("POS-01")).await.expect("allowed");
                limiter.check_card(black_box(&[7u8; 32])).await.expect("allowed");
            })
        })
    });

    let routes: Vec<RouteConfig> = (10..60)
        .flat_map(|province| {
            let p = province.to_string();
            [
                RouteConfig {
                    regions: vec![p.clone()],
                    insurance_types: vec![],
                    institutions: vec![],
                    cross_region: None,
                    payers: vec!["a".into()],
                },
                RouteConfig {
                    regions: vec![format!("{p}01")],
                    insurance_types: vec!["390".into()],
                    institutions: vec![],
                    cross_region: None,
                    payers: vec!["b".into()],
                },
                RouteConfig {
                    regions: vec![p],
                    insurance_types: vec![],
                    institutions: vec![],
                    cross_region: Some(true),
                    payers: vec!["c".into()],
                },
            ]
        })
        .collect();
    let router = Router::new(routes);
    group.bench_function("routing_150_rules", |b| {
        b.iter(|| {
            let query = RouteQuery {
                insured_region: black_box("440305"),
                insurance_type: "390",
                institution: "H1",
                treatment_region: "110105",
            };
            router.route(&query).map(<[String]>::len)
        })
    });

    // What every settlement seals twice before it is recorded: the prepared request (the card's
    // claims and the bill, ~1.3 KiB of JSON here) and the receipt. LZ4, then AES-256-GCM under a
    // fresh random nonce.
    let key = cardgate::ledger::CardKey::new(&[7u8; 32]);
    let prepared = format!(
        r#"{{"subject":{{"card_id":"110105199001011234","holder_name":"张三","insured_region":"110105","insurance_types":["310"],"token_id":"{}","token_expires_at":1780000300,"issuer":"dev-issuer"}},"insurance_type":"310","bill":{BODY},"total_fen":170000,"quote_id":null,"lines":{},"reclassified":[]}}"#,
        "7".repeat(43),
        &BODY[BODY.find("[{").expect("lines")..BODY.len() - 1]
    );
    group.bench_function("seal_prepared_request", |b| b.iter(|| key.seal(black_box(prepared.as_bytes()))));

    // A settlement's durable commits — two (intent, outcome), or one (an effect-free chain) —
    // 64 settlements at once, as the group commit sees them under load; per batch of 64.
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger = Arc::new(SqliteLedger::open(&dir.path().join("bench.db")).expect("ledger"));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let serial = std::sync::atomic::AtomicU64::new(0);
    group.sample_size(20);
    for (name, one_commit) in
        [("ledger_64_settlements_two_commits_each", false), ("ledger_64_settlements_one_commit_each", true)]
    {
        group.bench_function(name, |b| {
            b.iter_batched(
                || (0..64).map(|_| serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).collect::<Vec<_>>(),
                |ids| {
                    runtime.block_on(async {
                        let tasks: Vec<_> = ids
                            .into_iter()
                            .map(|n| {
                                let ledger = Arc::clone(&ledger);
                                tokio::spawn(async move { settle(&ledger, n, one_commit).await })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("task");
                        }
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// One settlement: intent then outcome (two commits), or both in one (an effect-free chain).
async fn settle(ledger: &SqliteLedger, n: u64, one_commit: bool) {
    let id = format!("S{n}");
    let card_hash = n.to_le_bytes().repeat(4);
    let intent = Intent {
        id: id.clone(),
        institution: "H1".into(),
        terminal: "T1".into(),
        idempotency_key: format!("k{n}"),
        request_hash: vec![0; 32],
        token_id: Some(n.to_le_bytes().to_vec()),
        quote_id: None,
        card_hash: card_hash.clone(),
        card_masked: "1101**********1234".into(),
        total_fen: 170_000,
        created_at: 1_780_000_000,
        sealed_request: vec![1; 1200],
        insurance_type: "310".into(),
        clearing_type: "41".into(),
        delegated: false,
    };
    let delta = YearToDate { year: 2026, deductible_fen: 80_000, fund_paid_fen: 52_000, ..YearToDate::default() };
    let outcome = Outcome {
        id,
        state: State::Settled,
        status: 201,
        body: BODY.repeat(3),
        deltas: vec![
            AccumulatorDelta { payer: "basic-medical".into(), delta },
            AccumulatorDelta { payer: "critical-illness".into(), delta: YearToDate::default() },
        ],
        card_hash,
        read: Vec::new(),
        at: 1_780_000_001,
        amounts: Some(Amounts {
            fund_fen: 52_000,
            account_fen: 98_000,
            cash_fen: 20_000,
            payers: vec![("basic-medical".into(), 52_000, 98_000), ("critical-illness".into(), 0, 0)],
        }),
    };
    if one_commit {
        ledger.record(intent, outcome).await.expect("record");
    } else {
        ledger.begin(intent).await.expect("begin");
        ledger.finish(outcome).await.expect("finish");
    }
}

/// The catalogue: loading a bureau-sized file, and classifying a large bill against it.
fn catalogue(c: &mut Criterion) {
    use cardgate::catalogue::Catalogue;
    use cardgate::config::{CatalogueConfig, LinePolicy};
    use cardgate_sdk::{BillLine, Decimal4, ItemCategory};
    let mut group = c.benchmark_group("catalogue");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("catalogue.csv");
    let mut csv = String::from("code,name,class,self_pay_bp,price_cap_fen,valid_from,valid_to,restricted\n");
    for i in 0..50_000 {
        let class = ["01", "02", "03"][i % 3];
        csv.push_str(&format!("X{i:08},item {i},{class},1000,{},2026-01-01,,false\n", 1_000 + i));
    }
    std::fs::write(&path, csv).expect("write");
    let config =
        CatalogueConfig { path, not_in_catalogue: LinePolicy::Reclassify, class_mismatch: LinePolicy::Reclassify };
    group.sample_size(10);
    group.bench_function("load_50000_items", |b| b.iter(|| Catalogue::load(black_box(&config)).expect("loads")));
    let catalogue = Catalogue::load(&config).expect("loads");
    let lines: Vec<BillLine> = (0..1_000)
        .map(|i| BillLine {
            code: format!("X{:08}", i * 37),
            name: "item".into(),
            category: ItemCategory::ClassA,
            quantity: Decimal4::ONE,
            unit_price_fen: Decimal4::from_whole(100).expect("100"),
            amount_fen: 100,
            catalogue: None,
        })
        .collect();
    group.sample_size(100);
    group.bench_function("classify_1000_lines", |b| {
        b.iter_batched(
            || lines.clone(),
            |mut lines| catalogue.classify(&mut lines, "2026-12-01").expect("classifies"),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, stages, catalogue);
criterion_main!(benches);
