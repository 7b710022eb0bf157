//! `cardgate check-config` never gives a false green: each configured plugin is loaded,
//! initialised and health-checked as `serve` would, and a contradictory plugin runtime is
//! refused. Run on the real binary, as an operator (or the systemd unit) does.

use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::cardgate_binary;
use cardgate_tests::harness::{Options, Setup};

/// `cardgate check-config` on the setup's configuration: exit code, stdout and stderr.
fn check(setup: &Setup) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(cardgate_binary())
        .args(["check-config", "--config"])
        .arg(setup.dir.path().join("cardgate.toml"))
        .output()
        .expect("run cardgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_configuration_is_ok() {
    let setup = Setup::create(&Options::default(), "127.0.0.1:0");
    let (code, stdout, stderr) = check(&setup);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok: "), "{stdout}");
}

#[test]
fn every_broken_plugin_is_reported_with_its_reason() {
    let plugin = |name: &str, package: &str, config: &str| {
        format!("\n[plugins.{name}]\nlibrary = \"{}\"\nconfig = {{ {config} }}\n", build_cdylib(package).display())
    };
    let extra_toml = [
        plugin("magic", "fixture-bad-magic", ""),
        plugin("major", "fixture-wrong-major", ""),
        plugin("entry", "fixture-no-entry", ""),
        plugin("refuses", "fixture-configurable", "refuse_init = \"no such tariff table\""),
    ]
    .concat();
    let setup = Setup::create(&Options { extra_toml, ..Options::default() }, "127.0.0.1:0");
    let (code, stdout, stderr) = check(&setup);
    assert_eq!(code, Some(78), "{stdout}{stderr}");
    assert!(!stdout.contains("ok: "), "{stdout}");
    for expected in ["plugins.magic", "plugins.major", "plugins.entry", "plugins.refuses", "no such tariff table"] {
        assert!(stderr.contains(expected), "`{expected}` missing from:\n{stderr}");
    }
    // Exactly those four (the log lines on stderr aside): the good plugins pass.
    let problems: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  plugins.")).collect();
    assert_eq!(problems.len(), 4, "{stderr}");
}

#[test]
fn an_unsigned_library_and_a_contradictory_runtime_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let signers = dir.path().join("signers.json");
    std::fs::write(&signers, r#"{"signers": []}"#).expect("signers");
    // Signers required: the example plugins carry no signed manifest.
    let runtime = format!("signers = \"{}\"", signers.display());
    let setup = Setup::create(&Options { plugin_runtime: Some(runtime.clone()), ..Options::default() }, "127.0.0.1:0");
    let (code, stdout, stderr) = check(&setup);
    assert_eq!(code, Some(78), "{stdout}{stderr}");
    assert!(stderr.contains("plugins.basic-medical") && stderr.contains("plugins.critical-illness"), "{stderr}");
    // allow_unsigned beside signers was silently ignored; now it is a mistake, named.
    let both = format!("{runtime}\nallow_unsigned = true");
    let setup = Setup::create(&Options { plugin_runtime: Some(both), ..Options::default() }, "127.0.0.1:0");
    let (code, stdout, stderr) = check(&setup);
    assert_eq!(code, Some(78), "{stdout}{stderr}");
    assert!(stderr.contains("plugin_runtime.allow_unsigned: true together with signers"), "{stderr}");
}

/// The admin token guards the admin listener from other local users: a file they could read,
/// a short token or a missing file is refused, and a plain listener without one is a warning.
#[test]
fn the_admin_token_must_be_private_and_long() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::create(&Options::default(), "127.0.0.1:0");
    let token = setup.dir.path().join("admin.token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, stdout, stderr) = check(&setup);
    assert_eq!(code, Some(78), "{stdout}{stderr}");
    assert!(stderr.contains("admin.token_file") && stderr.contains("mode 0644; run chmod 600"), "{stderr}");

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(&token, "short\n").expect("token");
    let (code, stdout, stderr) = check(&setup);
    assert_eq!(code, Some(78), "{stdout}{stderr}");
    assert!(stderr.contains("at least 32 printable ASCII characters"), "{stderr}");

    std::fs::remove_file(&token).expect("remove");
    let (code, _, stderr) = check(&setup);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("admin.token_file") && stderr.contains("No such file"), "{stderr}");

    let config = setup.dir.path().join("cardgate.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("token_file = \"admin.token\"\n", "")).expect("config");
    let (code, stdout, stderr) = check(&setup);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("warning: admin: no token_file"), "{stdout}");
}
