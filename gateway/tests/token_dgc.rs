//! The public EU Digital COVID Certificate vectors in `tests/testdata/dgc` (Apache-2.0, its
//! LICENSE beside them; vendored so a clone needs nothing beside it): every stage each
//! file tests gives the expected result, and the signature and expiry checks run through the
//! `cardgate token verify` code path, with the file's certificate as the trust list.

use std::path::{Path, PathBuf};

use cardgate::cli::{Cli, run};
use cardgate::token::claims::Claims;
use cardgate::token::envelope;
use clap::Parser;
use serde_json::Value;

fn vectors() -> Vec<(String, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/dgc");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("test vectors missing at {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "expected the DGC vectors, found {}", files.len());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable vector");
            (p.file_name().expect("name").to_string_lossy().into_owned(), serde_json::from_str(&text).expect("JSON"))
        })
        .collect()
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

fn expected(v: &Value, stage: &str) -> Option<bool> {
    v["EXPECTEDRESULTS"][stage].as_bool()
}

/// Runs `cardgate token verify` in generic mode as of the vector's clock; returns the problem
/// code, or `None` when the token is valid.
fn cli_verify(v: &Value) -> Option<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let trust = dir.path().join("trust.json");
    let certificate = v["TESTCTX"]["CERTIFICATE"].as_str().expect("certificate");
    std::fs::write(&trust, serde_json::json!({ "keys": [{ "certificate": certificate }] }).to_string()).expect("write");
    let at = v["TESTCTX"]["VALIDATIONCLOCK"].as_str().expect("clock");
    let payload = v["PREFIX"].as_str().expect("payload");
    let args = ["cardgate", "token", "verify", "--profile", "cwt", "--prefix", "HC1:", "--skew", "0", "--at", at];
    let cli = Cli::try_parse_from(args.iter().copied().chain(["--trust", trust.to_str().expect("UTF-8"), payload]))
        .expect("arguments parse");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = run(cli, &mut out, &mut err);
    let err = String::from_utf8(err).expect("UTF-8");
    match code {
        0 => None,
        1 => Some(err.trim_start_matches("error: ").split(':').next().expect("code").to_owned()),
        other => panic!("unexpected exit {other}: {err}"),
    }
}

#[test]
fn every_vector_gives_its_expected_stage_results() {
    let mut checked = 0;
    for (name, v) in vectors() {
        let prefixed = v["PREFIX"].as_str().unwrap_or_default();
        if let Some(ok) = expected(&v, "EXPECTEDUNPREFIX") {
            let stripped = envelope::unprefix(prefixed, "HC1:");
            assert_eq!(stripped.is_ok(), ok, "{name}: unprefix");
            if let (Ok(text), Some(b45)) = (stripped, v["BASE45"].as_str()) {
                assert_eq!(text, b45, "{name}: unprefixed text");
            }
            checked += 1;
        }
        if let Some(ok) = expected(&v, "EXPECTEDB45DECODE") {
            let decoded = envelope::unprefix(prefixed, "HC1:").and_then(envelope::unbase45);
            assert_eq!(decoded.is_ok(), ok, "{name}: base45");
            if let (Ok(bytes), Some(compressed)) = (&decoded, v["COMPRESSED"].as_str()) {
                assert_eq!(*bytes, hex(compressed), "{name}: base45 output");
            }
            checked += 1;
        }
        if let Some(ok) = expected(&v, "EXPECTEDCOMPRESSION") {
            let inflated = envelope::decode(prefixed, "HC1:");
            assert_eq!(inflated.is_ok(), ok, "{name}: zlib");
            if let (Ok(bytes), Some(cose)) = (&inflated, v["COSE"].as_str()) {
                assert_eq!(*bytes, hex(cose), "{name}: inflated COSE");
            }
            checked += 1;
        }
        if let Some(ok) = expected(&v, "EXPECTEDDECODE") {
            let cose = envelope::parse_cose(&hex(v["COSE"].as_str().expect("COSE hex")));
            let claims = cose.and_then(|c| Claims::decode(c.payload.as_deref().unwrap_or_default()));
            assert_eq!(claims.is_ok(), ok, "{name}: COSE and CWT decode");
            if let Ok(claims) = claims {
                assert!(claims.get(-260).is_some(), "{name}: the health certificate claim is there");
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} stage checks ran");
}

#[test]
fn every_vector_verifies_and_expires_as_expected_through_the_cli() {
    let mut checked = 0;
    for (name, v) in vectors() {
        let verify = expected(&v, "EXPECTEDVERIFY");
        let expiry = expected(&v, "EXPECTEDEXPIRATIONCHECK");
        if verify.is_none() && expiry.is_none() {
            continue;
        }
        let problem = cli_verify(&v);
        let signature_failed = matches!(problem.as_deref(), Some("token_signature_invalid" | "unknown_key"));
        let time_failed = matches!(problem.as_deref(), Some("token_expired" | "token_not_yet_valid"));
        if let Some(ok) = verify {
            assert_eq!(!signature_failed, ok, "{name}: signature check gave {problem:?}");
            if ok {
                assert!(problem.is_none() || time_failed, "{name}: only the time may fail, got {problem:?}");
            }
        }
        if let Some(ok) = expiry {
            assert_eq!(problem.as_deref() != Some("token_expired"), ok, "{name}: expiry check gave {problem:?}");
        }
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} vectors verified");
}
