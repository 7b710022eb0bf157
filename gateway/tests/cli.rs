//! The `cardgate` binary as an operator runs it.

use std::process::Command;

use cardgate_sdk::testing::build_cdylib;

fn cardgate(args: &[&str]) -> (i32, String, String) {
    let cache = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_cardgate"))
        .args(args)
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .expect("run cardgate");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[test]
fn plugin_inspect_prints_the_declaration() {
    let library = build_cdylib("basic-medical");
    let (code, stdout, stderr) = cardgate(&["plugin", "inspect", library.to_str().expect("UTF-8 path")]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("plugin:      basic-medical 0.1.0"), "{stdout}");
    assert!(stdout.contains(&format!("sdk:         {}", cardgate_sdk::abi::SDK_VERSION)), "{stdout}");
    assert!(stdout.contains("abi:         1.3 (gateway 1.3)"), "{stdout}");
    assert!(stdout.contains("unwinding:   yes"), "{stdout}");
}

#[test]
fn plugin_inspect_json_carries_every_field() {
    let library = build_cdylib("basic-medical");
    let (code, stdout, _) = cardgate(&["plugin", "inspect", "--json", library.to_str().expect("UTF-8 path")]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(v["name"], "basic-medical");
    assert_eq!(v["abi"], "1.3");
    assert_eq!(v["gateway_abi"], "1.3");
    assert_eq!(v["sha256"].as_str().map(str::len), Some(64));
}

#[test]
fn plugin_inspect_of_wrong_abi_fails_naming_both_versions() {
    let library = build_cdylib("fixture-wrong-major");
    let (code, stdout, stderr) = cardgate(&["plugin", "inspect", library.to_str().expect("UTF-8 path")]);
    assert_eq!(code, 1);
    assert!(stdout.is_empty());
    assert!(stderr.contains("ABI major version mismatch"), "{stderr}");
    assert!(stderr.contains("plugin built for ABI 2.3, this gateway runs ABI 1.3"), "{stderr}");
    assert!(stderr.contains(library.to_str().expect("UTF-8 path")), "the path is named: {stderr}");
}

#[test]
fn plugin_inspect_of_missing_file_fails() {
    let (code, _, stderr) = cardgate(&["plugin", "inspect", "/nonexistent/libnothing.so"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("file not found"), "{stderr}");
}

/// `check-config` on `examples/cardgate.toml` as `edit` changes it, in a directory of its own
/// (where `setup` may write files beside it): the exit code and standard error.
fn check_example(edit: impl FnOnce(String) -> String, setup: impl FnOnce(&std::path::Path)) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    setup(dir.path());
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/cardgate.toml")).expect("example");
    let path = dir.path().join("cardgate.toml");
    std::fs::write(&path, edit(example)).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardgate"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_config_lists_every_mistake_with_its_key_path() {
    let (code, stderr) = check_example(
        |example| {
            example
                .replace(
                    "secret = \"0000000000000000000000000000000000000000000000000000000000000000\"",
                    "secret = \"too-short\"",
                )
                .replace(
                    "payers = [\"basic-medical\", \"critical-illness\"]",
                    "payers = [\"basic-medical\", \"nobody\"]",
                )
                .replace("clock_skew_secs = 60", "clock_skew_secs = -5")
        },
        |_| {},
    );
    assert_eq!(code, Some(78), "{stderr}");
    for key in ["ledger.secret", "routes[0].payers: no plugin named `nobody`", "tokens.clock_skew_secs"] {
        assert!(stderr.contains(key), "`{key}` missing from:\n{stderr}");
    }
    let problems = stderr.lines().filter(|l| l.starts_with("  ")).count();
    assert_eq!(problems, 3, "{stderr}");
}

#[test]
fn check_config_reports_missing_files_of_a_valid_config() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardgate"))
        .args(["check-config", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/cardgate.toml")])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr.contains("server.certificate: /etc/cardgate/server.pem"), "{stderr}");
    assert!(stderr.contains("plugins.basic-medical.library"), "{stderr}");
}

#[test]
fn check_config_reports_every_bad_row_of_the_catalogue() {
    let (code, stderr) = check_example(
        |example| format!("{example}\n[catalogue]\npath = \"catalogue.csv\"\nclass_mismatch = \"refuse\"\n"),
        |dir| {
            let rows = "code,name,class,self_pay_bp,price_cap_fen,valid_from,valid_to,restricted\nA1,a,class_d,,,,,\nA2,b,01,20000,,,,\n";
            std::fs::write(dir.join("catalogue.csv"), rows).expect("write");
        },
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("catalogue.path:") && stderr.contains("row 2: class"), "{stderr}");
    assert!(stderr.contains("row 3: self_pay_bp"), "{stderr}");
}

#[test]
fn check_config_reports_every_syntax_and_type_mistake_at_once() {
    let (code, stderr) = check_example(
        |example| {
            example
                .replace("handshake_timeout_ms = 5000", "handshake_timout_ms = 5000")
                .replace("clock_skew_secs = 60", "clock_skew_secs = \"a minute\"")
                .replace("timeout_ms = 2000", "timeout_ms = 2000\nretries = 3")
                + "\n[metrics]\nlisten = \"127.0.0.1:9000\"\n"
        },
        |_| {},
    );
    assert_eq!(code, Some(78), "{stderr}");
    for expected in [
        "  server.handshake_timout_ms: unknown field",
        "  tokens.clock_skew_secs: invalid type: string \"a minute\", expected an integer",
        "  plugins.basic-medical.retries: unknown field",
        "  metrics: unknown section",
    ] {
        assert!(stderr.contains(expected), "`{expected}` missing from:\n{stderr}");
    }
    let problems = stderr.lines().filter(|l| l.starts_with("  ")).count();
    assert_eq!(problems, 4, "one line per mistake:\n{stderr}");
}

#[test]
fn check_config_refuses_a_cache_directory_too_long_for_the_process_tier_socket() {
    let long = format!("/var/lib/{}", "cardgate-plugin-cache/".repeat(5));
    let (code, stderr) = check_example(
        |example| {
            example
                .replace("cache_dir = \"/var/lib/cardgate/plugins\"", &format!("cache_dir = \"{long}\""))
                .replace("isolation = \"in_process\"", "isolation = \"process\"")
        },
        |_| {},
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("plugins.basic-medical: the process tier's socket would be"), "{stderr}");
    assert!(!stderr.contains("plugins.critical-illness: the process tier"), "in process: no socket\n{stderr}");
}
