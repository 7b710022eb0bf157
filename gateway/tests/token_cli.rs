//! `cardgate keys generate`, `token mint` and `token verify` as an issuer and an integrator run
//! them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

fn cardgate(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cardgate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cardgate");
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Generates a key with the CLI and writes a one-key trust list from the printed entry.
fn setup(dir: &Path, alg: &str) -> (String, String) {
    let keys = dir.join("keys");
    let (code, stdout, stderr) =
        cardgate(&["keys", "generate", "--alg", alg, "--kid", "issuer-1", "--out", path(&keys)], None);
    assert_eq!(code, 0, "{stderr}");
    let entry: serde_json::Value = serde_json::from_str(&stdout).expect("trust entry JSON");
    let trust = dir.join("trust.json");
    std::fs::write(&trust, serde_json::json!({ "keys": [entry] }).to_string()).expect("write trust list");
    (keys.join("issuer-1.key").to_str().expect("UTF-8").to_owned(), path(&trust).to_owned())
}

fn mint(key: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "token",
        "mint",
        "--key",
        key,
        "--kid",
        "issuer-1",
        "--card",
        "110105199001011234",
        "--name",
        "王五",
        "--region",
        "110105",
        "--insutype",
        "310,392",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = cardgate(&args, None);
    assert_eq!(code, 0, "{stderr}");
    stdout.trim().to_owned()
}

#[test]
fn generated_key_files_are_pkcs8_with_a_private_mode() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (key, _) = setup(dir.path(), "ed25519");
    let mode = std::fs::metadata(&key).expect("key file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(std::fs::read_to_string(&key).expect("read").starts_with("-----BEGIN PRIVATE KEY-----"));
    let public = std::fs::read_to_string(dir.path().join("keys/issuer-1.pub")).expect("public key");
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
}

#[test]
fn keys_are_never_overwritten() {
    let dir = tempfile::tempdir().expect("temp dir");
    setup(dir.path(), "es256");
    let keys = dir.path().join("keys");
    let (code, _, stderr) =
        cardgate(&["keys", "generate", "--alg", "es256", "--kid", "issuer-1", "--out", path(&keys)], None);
    assert_eq!(code, 78);
    assert!(stderr.contains("never overwritten"), "{stderr}");
}

#[test]
fn minted_token_verifies_with_every_algorithm() {
    for alg in ["ed25519", "es256", "es384", "ps256", "sm2"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (key, trust) = setup(dir.path(), alg);
        let token = mint(&key, &[]);
        assert!(token.starts_with("EC1:"), "{token}");
        let (code, stdout, stderr) = cardgate(&["token", "verify", "--trust", &trust, "--json", &token], None);
        assert_eq!(code, 0, "{alg}: {stderr}");
        let claims: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
        assert_eq!(claims["ecard"]["card_id"], "110105199001011234");
        assert_eq!(claims["ecard"]["insurance_types"], serde_json::json!(["310", "392"]));
        assert_eq!(claims["kid"], "aXNzdWVyLTE=");
    }
}

#[test]
fn verify_reads_standard_input_and_reports_each_refusal_with_its_code() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (key, trust) = setup(dir.path(), "ed25519");
    let token = mint(&key, &["--at", "2026-03-01T08:00:00Z", "--ttl", "60"]);
    let at = |t: &str| {
        vec!["token", "verify", "--trust", trust.as_str(), "--at", t, "-"]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cardgate(&args, Some(&format!("{token}\n")))
    };
    let (code, stdout, _) = run(at("2026-03-01T08:00:30Z"));
    assert_eq!(code, 0);
    assert!(stdout.contains("card: 110105199001011234 (王五)"), "{stdout}");
    let (code, _, stderr) = run(at("2026-03-01T08:05:00Z"));
    assert_eq!((code, stderr.trim()), (1, "error: token_expired: the token expired"));
    let (code, _, stderr) = run(at("2026-03-01T07:00:00Z"));
    assert_eq!((code, stderr.trim()), (1, "error: token_not_yet_valid: the token is not yet valid"));
    // Times as operators paste them: the same moment without the offset's colon, in
    // another zone, with a space and no offset (UTC), as seconds since the epoch.
    for moment in ["2026-03-01T08:00:30+0000", "2026-03-01T16:00:30+0800", "2026-03-01 08:00:30", "1772352030"] {
        let (code, stdout, stderr) = run(at(moment));
        assert_eq!(code, 0, "{moment}: {stderr}");
        assert!(stdout.contains("card: 110105199001011234"), "{moment}: {stdout}");
    }
    let (code, _, stderr) = run(at("1 March 2026"));
    assert_eq!(code, 78, "a time it cannot read is a configuration error (EX_CONFIG): {stderr}");
    assert!(stderr.contains("--at: `1 March 2026` is not a time"), "{stderr}");

    let revoked = dir.path().join("revoked.json");
    std::fs::write(&revoked, r#"{"cards": ["110105199001011234"]}"#).expect("write");
    let mut args = at("2026-03-01T08:00:30Z");
    args.splice(2..2, ["--revocations".to_owned(), path(&revoked).to_owned()]);
    let (code, _, stderr) = run(args);
    assert_eq!((code, stderr.trim()), (1, "error: card_revoked: the card is revoked"));
}

#[test]
fn forged_token_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, trust) = setup(dir.path(), "ed25519");
    let other = tempfile::tempdir().expect("temp dir");
    let (forger_key, _) = setup(other.path(), "ed25519");
    let forged = mint(&forger_key, &[]);
    let (code, _, stderr) = cardgate(&["token", "verify", "--trust", &trust, &forged], None);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("error: token_signature_invalid: "), "{stderr}");
}

#[test]
fn bad_trust_list_is_a_config_error_naming_the_entry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trust = dir.path().join("trust.json");
    std::fs::write(&trust, r#"{"keys": [{"kid": "AAEC", "public_key": "not a key"}]}"#).expect("write");
    let (code, _, stderr) = cardgate(&["token", "verify", "--trust", path(&trust), "EC1:X"], None);
    assert_eq!(code, 78);
    assert!(stderr.contains("keys[0]: public_key:"), "{stderr}");
}

#[test]
fn mint_draws_the_qr_code_and_writes_a_png() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (key, _) = setup(dir.path(), "ed25519");
    let png = dir.path().join("token.png");
    let (code, stdout, stderr) = cardgate(
        &[
            "token",
            "mint",
            "--key",
            &key,
            "--kid",
            "issuer-1",
            "--card",
            "C1",
            "--name",
            "N",
            "--region",
            "110105",
            "--insutype",
            "310",
            "--delegate-card",
            "C2",
            "--relation",
            "child",
            "--qr",
            "--png",
            path(&png),
        ],
        None,
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "standard output carries only the token");
    assert!(stderr.contains('▄') && stderr.lines().count() > 20, "a QR drawing on standard error");
    let header = std::fs::read(&png).expect("PNG written");
    assert_eq!(&header[..8], b"\x89PNG\r\n\x1a\n");
}
