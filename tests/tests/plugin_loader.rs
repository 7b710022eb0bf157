//! Loading plugin libraries through the real loader, and calling them as the daemon does: each
//! fixture's exact outcome, panic containment, timeouts and the pool's bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cardgate::plugin::{
    AbiVersion, CallError, Instance, Library, LoadError, LoadOptions, PluginHandle, PluginPool, PoolOptions, load,
};
use cardgate_sdk::testing::{Build, build_cdylib};
use cardgate_sdk::{ErrorCode, Health, HealthStatus, Operation, Split};
use cardgate_tests::{bill, example_plugin_config, line, settlement_request};
use serde_json::json;

fn options(cache: &Path) -> LoadOptions {
    LoadOptions::new(cache)
}

fn load_fixture(package: &str, config: serde_json::Value) -> (Result<Instance, LoadError>, PathBuf) {
    let cache = tempfile::tempdir().expect("temp dir");
    let path = build_cdylib(package);
    (load(package, &path, &config, &options(cache.path())), path)
}

fn handle(instance: Instance, timeout: Duration) -> PluginHandle {
    let pool = PluginPool::new(PoolOptions { threads: 2, queue: 4 }).expect("pool");
    PluginHandle::new(instance, pool, timeout)
}

#[tokio::test]
async fn basic_medical_loads_and_splits_a_bill_exactly() {
    let (instance, _) = load_fixture("basic-medical", example_plugin_config("basic-medical"));
    let plugin = handle(instance.expect("loads"), Duration::from_secs(5));
    assert_eq!(plugin.info().name, "basic-medical");
    assert_eq!(plugin.info().abi, AbiVersion::HOST);
    let request = settlement_request(vec![
        line(cardgate_sdk::ItemCategory::ClassA, 100_000),
        line(cardgate_sdk::ItemCategory::ClassB, 50_000),
        line(cardgate_sdk::ItemCategory::ClassC, 20_000),
    ]);
    let split: Split = plugin.settle(&request).await.expect("settles");
    assert_eq!((split.fund_pay_fen(), split.account_pay_fen, split.cash_pay_fen), (52_000, 98_000, 20_000));
    assert_eq!(split.check_balances(170_000), Ok(()));
    assert_eq!(plugin.quote(&request).await.expect("quotes"), split);
    assert_eq!(plugin.health().await.expect("health"), Health::ok());
}

#[test]
fn wrong_abi_major_is_refused_naming_both_versions() {
    let (result, path) = load_fixture("fixture-wrong-major", json!({}));
    let error = result.expect_err("refused");
    assert!(
        matches!(&error, LoadError::AbiMajorMismatch { found, expected, .. }
            if *found == AbiVersion { major: 2, minor: AbiVersion::HOST.minor } && *expected == AbiVersion::HOST),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("fixture-wrong-major") && message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("ABI 2.3") && message.contains("ABI 1.3"), "{message}");
}

#[test]
fn newer_abi_minor_is_refused() {
    let (result, _) = load_fixture("fixture-newer-minor", json!({}));
    let error = result.expect_err("refused");
    let newer = AbiVersion { major: AbiVersion::HOST.major, minor: AbiVersion::HOST.minor + 1 };
    assert!(matches!(&error, LoadError::AbiMinorNewer { found, .. } if *found == newer), "{error:?}");
    assert!(error.to_string().contains("ABI 1.4, this gateway runs ABI 1.3"), "{error}");
}

#[test]
fn bad_magic_is_refused() {
    let (result, _) = load_fixture("fixture-bad-magic", json!({}));
    assert!(matches!(result, Err(LoadError::BadMagic { found, .. }) if &found == b"NOTCARDG"));
}

#[test]
fn library_without_entry_symbol_is_refused() {
    let (result, _) = load_fixture("fixture-no-entry", json!({}));
    let error = result.expect_err("refused");
    assert!(matches!(error, LoadError::EntrySymbolMissing { .. }), "{error:?}");
    assert!(error.to_string().contains("cardgate_plugin_declaration"));
}

#[test]
fn file_that_is_not_a_shared_object_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("libfake.so");
    std::fs::write(&path, b"this is not an ELF file").expect("write");
    let error = load("fake", &path, &json!({}), &options(dir.path())).expect_err("refused");
    assert!(matches!(error, LoadError::NotSharedObject { .. }), "{error:?}");
}

#[test]
fn missing_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let error = load("ghost", &dir.path().join("libghost.so"), &json!({}), &options(dir.path())).expect_err("refused");
    assert!(matches!(error, LoadError::FileMissing { ref plugin, .. } if plugin == "ghost"), "{error:?}");
}

#[test]
fn library_built_with_panic_abort_is_refused_in_process() {
    let build = Build {
        rustc_args: vec!["-C".into(), "panic=abort".into()],
        flavour: Some("panic-abort".into()),
        ..Build::new("fixture-configurable")
    };
    let path = build.run().expect("builds");
    let cache = tempfile::tempdir().expect("temp dir");
    let error = load("aborting", &path, &json!({}), &options(cache.path())).expect_err("refused");
    assert!(matches!(error, LoadError::BuiltWithPanicAbort { .. }), "{error:?}");
    // Only the in-process tier needs unwinding; the library itself is well-formed.
    let lenient = LoadOptions { require_unwind: false, ..options(cache.path()) };
    assert!(!Library::open("aborting", &path, &lenient).expect("opens").info().unwind);
}

#[test]
fn init_refusing_its_config_is_a_load_error_with_the_plugins_reason() {
    let mut config = example_plugin_config("basic-medical");
    config["class_b_self_pay_bp"] = json!(20_000);
    let (result, _) = load_fixture("basic-medical", config);
    match result.expect_err("refused") {
        LoadError::InitFailed { error, version, .. } => {
            assert_eq!(error.code, ErrorCode::InvalidConfig);
            assert!(error.message.contains("class_b_self_pay_bp"), "{}", error.message);
            assert_eq!(version, "0.1.0");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn config_of_the_wrong_shape_is_refused_at_init() {
    let (result, _) = load_fixture("basic-medical", json!({ "class_b_self_pay_bp": "ten percent" }));
    assert!(matches!(result, Err(LoadError::InitFailed { error, .. }) if error.code == ErrorCode::InvalidConfig));
}

#[test]
fn panic_in_init_is_contained() {
    let (result, _) = load_fixture("fixture-configurable", json!({ "panic_in": ["init"] }));
    match result.expect_err("refused") {
        LoadError::InitFailed { error, .. } => assert!(error.message.contains("init panicked"), "{}", error.message),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn plugin_panic_fails_only_that_call() {
    let (instance, _) = load_fixture("fixture-configurable", json!({ "panic_in": ["quote"] }));
    let plugin = handle(instance.expect("loads"), Duration::from_secs(5));
    let request = settlement_request(bill(3));
    for _ in 0..3 {
        let error = plugin.quote(&request).await.expect_err("panics");
        assert!(matches!(&error, CallError::Panicked { message } if message.contains("fixture panics in quote")));
        assert_eq!(error.code(), "plugin_panicked");
    }
    // The same instance, and the pool's threads, carry on.
    let split = plugin.settle(&request).await.expect("settle does not panic");
    assert_eq!(split.check_balances(request.due_fen), Ok(()));
}

#[tokio::test]
async fn slow_plugin_times_out_and_the_pool_recovers() {
    let (instance, _) = load_fixture("fixture-configurable", json!({ "delay_ms": 400 }));
    let plugin = handle(instance.expect("loads"), Duration::from_millis(50));
    let request = settlement_request(bill(2));
    let error = plugin.quote(&request).await.expect_err("too slow");
    assert_eq!(error, CallError::Timeout(Duration::from_millis(50)));
    assert_eq!(error.code(), "plugin_timeout");
    // The stuck call holds one pool thread until the plugin returns; the other still serves.
    assert_eq!(plugin.health().await.expect("health"), Health::ok());
}

#[tokio::test]
async fn full_pool_refuses_at_once() {
    let (instance, _) = load_fixture("fixture-configurable", json!({ "delay_ms": 300 }));
    let pool = PluginPool::new(PoolOptions { threads: 1, queue: 1 }).expect("pool");
    let plugin = PluginHandle::new(instance.expect("loads"), pool, Duration::from_secs(5));
    let request = Arc::new(settlement_request(bill(1)));
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (plugin, request) = (plugin.clone(), Arc::clone(&request));
            tokio::spawn(async move { plugin.quote(&request).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.expect("task"));
    }
    let overloaded = outcomes.iter().filter(|r| matches!(r, Err(CallError::Overloaded))).count();
    let answered = outcomes.iter().filter(|r| r.is_ok()).count();
    // At most one call runs and one waits in the queue (fewer if the worker has not yet taken
    // the first job when the second arrives); the rest are refused without waiting.
    assert_eq!(answered + overloaded, 4, "{outcomes:?}");
    assert!((1..=2).contains(&answered), "{outcomes:?}");
}

#[tokio::test]
async fn undecodable_input_is_a_protocol_error_not_a_crash() {
    let (instance, _) = load_fixture("basic-medical", example_plugin_config("basic-medical"));
    let instance = instance.expect("loads");
    let error = instance.call(Operation::Quote, b"{not json").expect_err("refused");
    assert!(matches!(error, CallError::BadInput { .. }), "{error:?}");
    assert_eq!(error.code(), "plugin_protocol_error");
    // An operation the plugin leaves to the SDK's default answers it.
    let health: Health = serde_json::from_slice(&instance.call(Operation::Health, b"").expect("health")).expect("JSON");
    assert_eq!(health.status, HealthStatus::Ok);
}

#[tokio::test]
async fn plugin_refusal_keeps_its_code() {
    let (instance, _) = load_fixture("basic-medical", example_plugin_config("basic-medical"));
    let plugin = handle(instance.expect("loads"), Duration::from_secs(5));
    let mut request = settlement_request(bill(3));
    request.insurance_type = "999".into();
    request.card.insurance_types = vec!["999".into()];
    match plugin.quote(&request).await {
        Err(CallError::Rejected(error)) => assert_eq!(error.code, ErrorCode::NotInsured),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unbalanced_answer_is_caught_by_the_balance_check() {
    let (instance, _) = load_fixture("fixture-configurable", json!({ "unbalanced": true, "fund_bp": 5000 }));
    let instance = instance.expect("loads");
    let request = settlement_request(bill(4));
    let output = instance.call(Operation::Settle, &serde_json::to_vec(&request).expect("JSON")).expect("answers");
    let split: Split = serde_json::from_slice(&output).expect("decodes");
    assert!(split.check_balances(request.due_fen).is_err());
}

#[test]
fn rebuilt_library_at_the_same_path_loads_as_new_code() {
    let dir = tempfile::tempdir().expect("temp dir");
    let deployed = dir.path().join("libpolicy.so");
    let cache = dir.path().join("cache");
    std::fs::copy(build_cdylib("fixture-configurable"), &deployed).expect("deploy");
    let first = Library::open("policy", &deployed, &options(&cache)).expect("loads");
    assert_eq!(first.info().name, "fixture-configurable");

    std::fs::copy(build_cdylib("basic-medical"), &deployed).expect("redeploy");
    let second = Library::open("policy", &deployed, &options(&cache)).expect("loads");
    assert_eq!(second.info().name, "basic-medical");
    assert_ne!(first.sha256(), second.sha256());
    assert_ne!(first.loaded_path(), second.loaded_path());
    assert!(second.loaded_path().ends_with(format!("{}.so", second.sha256())));
    // The first generation still answers: its code stays mapped.
    let instance = first.instantiate(&json!({})).expect("instantiates");
    assert!(instance.call(Operation::Health, b"").is_ok());
}

#[test]
fn plugin_logs_reach_the_hosts_tracing() {
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    tracing::subscriber::with_default(subscriber, || {
        let (instance, _) = load_fixture("basic-medical", example_plugin_config("basic-medical"));
        instance.expect("loads");
    });
    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("UTF-8");
    assert!(logs.contains("basic-medical policy loaded with 2 schemes"), "{logs}");
    assert!(logs.contains("plugin=\"basic-medical\""), "{logs}");
}

#[test]
fn a_cache_or_library_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    let mode = |path: &Path| std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = example_plugin_config("basic-medical");
    let built = build_cdylib("basic-medical");

    let shared_cache = dir.path().join("shared-cache");
    std::fs::create_dir(&shared_cache).expect("mkdir");
    chmod(&shared_cache, 0o777);
    let error = load("basic-medical", &built, &config, &options(&shared_cache)).expect_err("refused");
    assert!(matches!(error, LoadError::UnsafeLocation { .. }), "{error}");
    assert!(error.to_string().contains("writable by group or others (mode 0777)"), "{error}");

    let libs = dir.path().join("libs");
    std::fs::create_dir(&libs).expect("mkdir");
    let library = libs.join("libbasic_medical.so");
    std::fs::copy(&built, &library).expect("copy");
    chmod(&libs, 0o775);
    let cache = dir.path().join("cache");
    let error = load("basic-medical", &library, &config, &options(&cache)).expect_err("refused");
    assert!(matches!(error, LoadError::UnsafeLocation { .. }), "{error}");

    // Safe modes: it loads; the cache the loader makes is 0700 and its copy read-only.
    chmod(&libs, 0o755);
    let instance = load("basic-medical", &library, &config, &options(&cache)).expect("loads");
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(instance.library().loaded_path()), 0o500);
}
