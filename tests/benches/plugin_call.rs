//! One in-process call of the basic-medical plugin with a 10-line bill, JSON both ways:
//! - `direct`: the policy called as a Rust function (no ABI, no JSON) — the floor;
//! - `abi`: encode, call through the C ABI, decode — what the boundary costs;
//! - `pool`: the same through the bounded blocking pool, as the daemon calls it;
//! - `spawn_blocking`: the same through tokio's blocking pool, for comparison;
//! - `inline_async`: the async call with [`Dispatch::Inline`] (no hand-off);
//! - `process_tier`: the call in a child `cardgate plugin-host` over a Unix socket;
//! - `abi_boundary_only`: a `health` call with empty input: the crossing alone;
//! - `json_*`: each JSON step of the call on its own, through serde;
//! - `host_request_encode`, `plugin_split_encode`: the request as the host encodes it
//!   ([`Input`]) and the split as the SDK's dispatch does ([`cardgate_sdk::wire`]): serde's bytes;
//! - `host_split_decode`: the split as the host decodes it ([`Output`]: the SDK's bytes read by
//!   `wire::read_split`, against `json_split_decode`, serde's).
//!
//! Run: `cargo bench -p cardgate-tests --bench plugin_call`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use basic_medical::BasicMedical;
use cardgate::plugin::{Dispatch, Input, LoadOptions, Output, PluginHandle, PluginPool, PoolOptions, load};
use cardgate_sdk::testing::Build;
use cardgate_sdk::{Operation, Plugin, Split};
use cardgate_tests::{bill, example_plugin_config, settlement_request};
use criterion::{Criterion, criterion_group, criterion_main};

/// The daemon's allocator, so the host's half of each call costs what it costs in the daemon.
/// (The plugin, a shared library of its own, keeps its own allocator.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn plugin_call(c: &mut Criterion) {
    let build = Build { release: true, flavour: Some("bench".into()), ..Build::new("basic-medical") };
    let library = build.run().expect("build basic-medical");
    let cache = tempfile::tempdir().expect("temp dir");
    let options = LoadOptions::new(cache.path());
    let config = example_plugin_config("basic-medical");
    let instance = load("basic-medical", &library, &config, &options).expect("load");
    let instance_ref = load("basic-medical", &library, &config, &options).expect("load");
    let pool = PluginPool::new(PoolOptions::default()).expect("pool");
    let handle = PluginHandle::new(instance, pool, Duration::from_secs(1));
    let request = Arc::new(settlement_request(bill(10)));
    let direct = BasicMedical::new(serde_json::from_value(config).expect("config")).expect("plugin");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");

    let mut group = c.benchmark_group("plugin_call_10_lines");
    group.bench_function("direct", |b| b.iter(|| direct.quote(black_box(&request)).expect("quote")));
    group.bench_function("abi", |b| {
        b.iter(|| handle.call_inline::<_, Split>(Operation::Quote, black_box(&*request)).expect("quote"))
    });
    let empty: &[u8] = b"";
    group.bench_function("abi_boundary_only", |b| {
        b.iter(|| instance_ref.call(Operation::Health, black_box(empty)).expect("health"))
    });
    let inline = handle.clone().with_dispatch(Dispatch::Inline);
    group.bench_function("inline_async", |b| {
        b.iter(|| runtime.block_on(inline.quote(black_box(&request))).expect("quote"))
    });
    group.bench_function("pool", |b| b.iter(|| runtime.block_on(handle.quote(black_box(&request))).expect("quote")));
    group.bench_function("spawn_blocking", |b| {
        b.iter(|| {
            let (handle, request) = (handle.clone(), Arc::clone(&request));
            let call = move || handle.call_inline::<_, Split>(Operation::Quote, &*request);
            runtime.block_on(async { tokio::task::spawn_blocking(call).await }).expect("join").expect("quote")
        })
    });
    let host = cardgate::plugin::process::HostCommand {
        binary: cardgate_tests::cardgate_binary(),
        library: library.clone(),
        name: "basic-medical".into(),
        sha256: cardgate::plugin::loader::sha256_hex(&std::fs::read(&library).expect("library")),
        cache_dir: cache.path().to_owned(),
        config: example_plugin_config("basic-medical"),
        memory_limit_mb: None,
    };
    let process = cardgate::plugin::process::ProcessPlugin::start(host.clone()).expect("plugin host");
    let process_handle = PluginHandle::process_tier(
        process,
        host.sha256,
        PluginPool::new(PoolOptions::default()).expect("pool"),
        Duration::from_secs(1),
    );
    group.bench_function("process_tier", |b| {
        b.iter(|| runtime.block_on(process_handle.quote(black_box(&request))).expect("quote"))
    });
    let split = direct.quote(&request).expect("quote");
    let encoded_request = serde_json::to_vec(&*request).expect("encode");
    let encoded_split = serde_json::to_vec(&split).expect("encode");
    group.bench_function("json_request_encode", |b| b.iter(|| serde_json::to_vec(black_box(&*request))));
    group.bench_function("host_request_encode", |b| b.iter(|| Input::encode(black_box(&*request))));
    group.bench_function("json_request_decode", |b| {
        b.iter(|| serde_json::from_slice::<cardgate_sdk::SettlementRequest>(black_box(&encoded_request)))
    });
    let mut place: cardgate_sdk::SettlementRequest = serde_json::from_slice(&encoded_request).expect("decode");
    group.bench_function("json_request_decode_in_place", |b| {
        b.iter(|| {
            let mut de = serde_json::Deserializer::from_slice(black_box(&encoded_request));
            serde::Deserialize::deserialize_in_place(&mut de, &mut place).expect("decode");
        })
    });
    group.bench_function("json_request_parse_only", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&encoded_request)))
    });
    group.bench_function("json_split_encode", |b| b.iter(|| serde_json::to_vec(black_box(&split))));
    group.bench_function("plugin_split_encode", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(1024);
            cardgate_sdk::wire::split(&mut out, black_box(&split)).map(|()| out)
        })
    });
    group
        .bench_function("json_split_decode", |b| b.iter(|| serde_json::from_slice::<Split>(black_box(&encoded_split))));
    assert!(cardgate_sdk::wire::read_split(&encoded_split).is_some(), "the split as the SDK writes it");
    group.bench_function("host_split_decode", |b| b.iter(|| <Split as Output>::decode(black_box(&encoded_split))));
    println!("request {} bytes, split {} bytes", encoded_request.len(), encoded_split.len());
    group.finish();
}

criterion_group!(benches, plugin_call);
criterion_main!(benches);
