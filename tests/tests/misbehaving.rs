//! Plugins that misbehave without crashing: one that hangs in process, one that answers far too
//! much, one that leaks. Each may hurt only its own route, never the gateway or another payer.

use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::cardgate_binary;
use cardgate_tests::harness::{Card, Options, TestGateway, admin, now_nanos, post};
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn body(token: &str) -> Value {
    json!({
        "token": token, "terminal_id": "POS-1", "total_fen": 10000,
        "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 }]
    })
}

/// A `fixture-configurable` plugin named `name`, alone on the route of region `region`.
fn plugin(name: &str, region: &str, settings: &str, config: &str) -> String {
    format!(
        "\n[plugins.{name}]\nlibrary = \"{}\"\n{settings}\nconfig = {{ {config} }}\n\n[[routes]]\nregions = [\"{region}\"]\npayers = [\"{name}\"]\n",
        build_cdylib("fixture-configurable").display()
    )
}

async fn settle(gw: &TestGateway, region: &str) -> (StatusCode, String) {
    let token = gw.token(&Card::in_region(&format!("{region}0101")), 120);
    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&format!("mis-{}", now_nanos())), &body(&token)).await;
    (reply.status, reply.json()["code"].as_str().unwrap_or_default().to_owned())
}

fn stuck_calls(plugins: &Value, name: &str) -> u64 {
    let list = plugins["plugins"].as_array().cloned().unwrap_or_default();
    list.iter().find(|p| p["name"] == name).and_then(|p| p["stuck_calls"].as_u64()).unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_hung_in_process_takes_only_its_own_threads_and_a_reload_restores_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hang = dir.path().join("hang");
    std::fs::write(&hang, "").expect("hang on");
    let extra = plugin(
        "hung",
        "12",
        "timeout_ms = 200\nbreaker_failures = 1000",
        &format!("hang_while_exists = \"{}\", fund_bp = 5000", hang.display()),
    );
    // Few threads per plugin, as a small machine has: the hung plugin can hold only its own.
    let runtime = "allow_unsigned = true\npool_threads = 2\npool_queue = 2".to_owned();
    let gw =
        TestGateway::start(Options { extra_toml: extra, plugin_runtime: Some(runtime), ..Options::default() }).await;

    // Many more hung calls than the whole machine has pool threads.
    for _ in 0..12 {
        let (status, code) = settle(&gw, "12").await;
        assert!(
            matches!(code.as_str(), "plugin_timeout" | "plugin_unavailable"),
            "the hung route fails fast: {status} {code}"
        );
        // Every other route keeps its full capacity meanwhile.
        let (status, code) = settle(&gw, "11").await;
        assert_eq!(status, StatusCode::CREATED, "{code}");
    }
    let (_, plugins) = admin(gw.admin, Method::GET, "/admin/plugins").await;
    assert_eq!(stuck_calls(&plugins, "hung"), 2, "both of its threads are stuck, and counted: {plugins}");
    assert_eq!(stuck_calls(&plugins, "basic-medical"), 0, "{plugins}");
    let metrics = cardgate_tests::harness::admin_text(gw.admin, Method::GET, "/metrics").await.1;
    assert!(metrics.contains("cardgate_plugin_stuck_calls{plugin=\"hung\"} 2"), "{metrics}");

    // A reload brings a fresh pool beside the stuck threads (never reused): with the fault
    // gone, the route serves at once.
    std::fs::remove_file(&hang).expect("hang off");
    let (status, answer) = admin(gw.admin, Method::POST, "/admin/plugins/reload").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(settle(&gw, "12").await.0, StatusCode::CREATED);
}

/// Bytes the files under `dir` occupy on disk, however deep (blocks, not lengths: the engine
/// sizes its journal ahead, sparsely).
fn bytes_under(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    if !dir.is_dir() {
        return std::fs::metadata(dir).map(|m| m.blocks() * 512).unwrap_or(0);
    }
    std::fs::read_dir(dir)
        .expect("ledger directory")
        .flatten()
        .map(|entry| {
            let path = entry.path();
            if path.is_dir() { bytes_under(&path) } else { entry.metadata().map(|m| m.blocks() * 512).unwrap_or(0) }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_limit_is_a_protocol_error_in_both_tiers_and_nothing_large_is_stored() {
    let padding = "answer_padding_bytes = 3000000, fund_bp = 5000";
    let mut extra = plugin("chatty", "12", "", padding);
    extra += &plugin("chatty-child", "13", "isolation = \"process\"", padding);
    let runtime = format!("allow_unsigned = true\nhost_binary = \"{}\"", cardgate_binary().display());
    let gw =
        TestGateway::start(Options { extra_toml: extra, plugin_runtime: Some(runtime), ..Options::default() }).await;
    for region in ["12", "13"] {
        let (status, code) = settle(&gw, region).await;
        assert_eq!((status, code.as_str()), (StatusCode::BAD_GATEWAY, "plugin_protocol_error"), "region {region}");
    }
    // The refusals are recorded, small (an embedded ledger's files).
    if gw.database.is_none() {
        let ledger = bytes_under(&gw.dir.path().join("ledger")) + bytes_under(&gw.dir.path().join("ledger-wal"));
        assert!(ledger > 0 && ledger < 2 << 20, "the ledger holds {ledger} bytes");
    }
    // And the child still serves other calls of its plugin's neighbours.
    assert_eq!(settle(&gw, "11").await.0, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaking_process_tier_plugin_dies_at_its_memory_limit_and_comes_back() {
    let extra = plugin(
        "leaky",
        "12",
        "isolation = \"process\"\nmemory_limit_mb = 64\nbreaker_failures = 1000",
        "leak_bytes_per_call = 16000000, fund_bp = 5000",
    );
    let runtime = format!("allow_unsigned = true\nhost_binary = \"{}\"", cardgate_binary().display());
    let gw =
        TestGateway::start(Options { extra_toml: extra, plugin_runtime: Some(runtime), ..Options::default() }).await;
    let mut answers = Vec::new();
    for _ in 0..12 {
        answers.push(settle(&gw, "12").await);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // 16 MB a call against 64 MiB: the child runs out within a few calls and is restarted.
    assert!(answers.iter().any(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE), "{answers:?}");
    assert!(answers.iter().any(|(s, _)| *s == StatusCode::CREATED), "{answers:?}");
    // The gateway itself never grew with it, and its other routes serve.
    assert_eq!(settle(&gw, "11").await.0, StatusCode::CREATED);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, code) = settle(&gw, "12").await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the child did not come back: {status} {code}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_free_plugin_in_the_process_tier_runs_without_network() {
    use std::os::unix::fs::MetadataExt;
    let extra = format!(
        "\n[plugins.basic-child]\nlibrary = \"{}\"\nisolation = \"process\"\n{}\n[[routes]]\nregions = [\"12\"]\npayers = [\"basic-child\"]\n",
        build_cdylib("basic-medical").display(),
        cardgate_tests::plugin_config_toml("basic-medical", "basic-child")
    );
    let runtime = format!("allow_unsigned = true\nhost_binary = \"{}\"", cardgate_binary().display());
    let gw =
        TestGateway::start(Options { extra_toml: extra, plugin_runtime: Some(runtime), ..Options::default() }).await;
    let (_, plugins) = admin(gw.admin, Method::GET, "/admin/plugins").await;
    let list = plugins["plugins"].as_array().cloned().unwrap_or_default();
    let child = list.iter().find(|p| p["name"] == "basic-child").expect("basic-child listed");
    let in_process = list.iter().find(|p| p["name"] == "basic-medical").expect("basic-medical listed");
    assert_eq!((child["effect_free"].as_bool(), in_process["network"].as_str()), (Some(true), Some("shared")));
    // Root (as CI runs) gives the child a network namespace of its own; elsewhere the system
    // may refuse, and the gateway says which it is (never "shared": a child is a process).
    let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let network = child["network"].as_str().unwrap_or_default();
    if root {
        assert_eq!(network, "denied", "{child}");
    } else {
        assert!(matches!(network, "denied" | "allowed"), "{child}");
    }
    // And it settles, over its Unix socket, as before.
    assert_eq!(settle(&gw, "12").await.0, StatusCode::CREATED);
    // Whoever can connect to that socket can call the plugin: it lies in a directory of the
    // gateway's user alone, even when the cache directory is open to everyone to read.
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let cache = gw.dir.path().join("plugin-cache");
    let run = cache.join("run");
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700, "{}", run.display());
    let sockets: Vec<_> = std::fs::read_dir(&run)
        .expect("run dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .collect();
    assert!(!sockets.is_empty(), "the child's socket is in {}", run.display());
    let loose =
        std::fs::read_dir(&cache).expect("cache").flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_socket()));
    assert_eq!(loose.count(), 0, "no socket directly in the cache directory");
}
