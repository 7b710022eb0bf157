//! Plugin operations on a running gateway: hot reload under load, signed plugins (every way a
//! library can fail its signature, each refused while the old generation keeps serving).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cardgate::token::issue;
use cardgate::token::trust::Algorithm;
use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::harness::{Card, Options, TestGateway, admin, post};
use clap::Parser;
use http::{Method, StatusCode};
use serde_json::{Value, json};

fn body(token: &str) -> Value {
    json!({
        "token": token, "terminal_id": "POS-1", "total_fen": 10000,
        "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 10000, "amount_fen": 10000 }]
    })
}

fn key() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("ops-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Replaces the deployed library atomically, as a deployment would.
fn deploy(from: &Path, to: &Path) {
    let staging = to.with_extension("staging");
    std::fs::copy(from, &staging).expect("stage");
    std::fs::rename(&staging, to).expect("deploy");
}

fn rotating(library: &Path) -> String {
    format!(
        "\n[plugins.rotating]\nlibrary = \"{}\"\nconfig = {{ fund_bp = 5000 }}\n\n[[routes]]\nregions = [\"12\"]\npayers = [\"rotating\"]\n",
        library.display()
    )
}

async fn settled_version(gw: &TestGateway) -> String {
    let reply =
        post(&gw.pharmacy, "/v1/settlements", Some(&key()), &body(&gw.token(&Card::in_region("120101"), 120))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    reply.json()["payers"][0]["version"].as_str().expect("version").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_fail_no_request() {
    let libs = tempfile::tempdir().expect("temp dir");
    let deployed = libs.path().join("policy.so");
    let (v1, v2) = (build_cdylib("fixture-configurable"), build_cdylib("fixture-v2"));
    deploy(&v1, &deployed);
    let gw = Arc::new(TestGateway::start(Options { extra_toml: rotating(&deployed), ..Options::default() }).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (gw, stop, done, failed) = (gw.clone(), stop.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let token = gw.token(&Card::in_region("120101"), 120);
                    let reply = post(&gw.pharmacy, "/v1/settlements", Some(&key()), &body(&token)).await;
                    if reply.status == StatusCode::CREATED {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("failed during reload: {} {}", reply.status, reply.body);
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for round in 0..20 {
        let (library, version) = if round % 2 == 0 { (&v2, "0.2.0") } else { (&v1, "0.1.0") };
        deploy(library, &deployed);
        let (status, answer) = admin(gw.admin, Method::POST, "/admin/plugins/reload").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["generation"], round + 2);
        assert_eq!(settled_version(&gw).await, version, "round {round}");
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    println!("settled during reloads: {}", done.load(Ordering::Relaxed));
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed because of a reload");
    assert!(done.load(Ordering::Relaxed) > 20, "clients kept settling");
    let (_, plugins) = admin(gw.admin, Method::GET, "/admin/plugins").await;
    let rotating = plugins["plugins"].as_array().expect("list").iter().find(|p| p["name"] == "rotating").cloned();
    assert_eq!(rotating.expect("listed")["tier"], "in_process");
}

fn cli(args: &[&str]) -> (u8, String, String) {
    let cli =
        cardgate::cli::Cli::try_parse_from(std::iter::once("cardgate").chain(args.iter().copied())).expect("args");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cardgate::cli::run(cli, &mut out, &mut err);
    (code, String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned())
}

struct Signer {
    key: PathBuf,
    public_pem: String,
}

fn signer(dir: &Path, name: &str) -> Signer {
    let generated = issue::generate(Algorithm::EdDsa).expect("key");
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&key, &generated.private_pem).expect("write key");
    Signer { key, public_pem: generated.public_pem }
}

fn sign(signer: &Signer, kid: &str, library: &Path) {
    let (code, _, err) = cli(&[
        "plugin",
        "sign",
        "--key",
        signer.key.to_str().expect("UTF-8"),
        "--kid",
        kid,
        library.to_str().expect("UTF-8"),
    ]);
    assert_eq!(code, 0, "{err}");
}

/// `cardgate plugin verify` of the deployed library as the plugin `rotating`, declared as
/// `fixture-v2`.
fn verify_rotating(signers: &Path, deployed: &Path) -> (u8, String, String) {
    cli(&[
        "plugin",
        "verify",
        "--trust",
        signers.to_str().expect("UTF-8"),
        "--name",
        "rotating",
        "--declared-name",
        "fixture-v2",
        deployed.to_str().expect("UTF-8"),
    ])
}

async fn reload_refused(gw: &TestGateway, expected: &str) {
    let (status, answer) = admin(gw.admin, Method::POST, "/admin/plugins/reload").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    let errors = answer["errors"].to_string();
    assert!(errors.contains(expected), "`{expected}` not in {errors}");
    assert_eq!(answer["serving"]["generation"], 1, "the old generation keeps serving");
    assert_eq!(settled_version(gw).await, "0.1.0");
}

#[tokio::test]
async fn badly_signed_plugins_are_refused_while_the_old_generation_serves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bureau = signer(dir.path(), "bureau");
    let impostor = signer(dir.path(), "impostor");
    let signers = dir.path().join("signers.json");
    let trust = json!({ "signers": [{ "kid": "bureau", "public_key": bureau.public_pem }] });
    std::fs::write(&signers, trust.to_string()).expect("write signers");
    let libs = dir.path().join("libs");
    std::fs::create_dir(&libs).expect("libs dir");
    let deployed = libs.join("policy.so");
    let (v1, v2) = (build_cdylib("fixture-configurable"), build_cdylib("fixture-v2"));
    deploy(&v1, &deployed);
    // Everything the gateway loads is signed; the example plugins are copied next to it first.
    let options = Options {
        // Signed plugins load only under the name their manifest carries.
        extra_toml: rotating(&deployed).replace("library =", "declared_name = \"fixture-configurable\"\nlibrary ="),
        plugin_runtime: Some(format!("signers = \"{}\"", signers.display())),
        plugins_dir: Some(libs.clone()),
        ..Options::default()
    };
    for library in [&v1, &build_cdylib("basic-medical"), &build_cdylib("critical-illness")] {
        let copy = libs.join(library.file_name().expect("name"));
        if copy != deployed {
            std::fs::copy(library, &copy).expect("copy");
        }
        sign(&bureau, "bureau", if library == &v1 { &deployed } else { &copy });
    }
    let gw = TestGateway::start(options).await;
    assert_eq!(settled_version(&gw).await, "0.1.0");

    // Tampered: one byte changed after signing.
    deploy(&v2, &deployed);
    sign(&bureau, "bureau", &deployed);
    let mut bytes = std::fs::read(&deployed).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&deployed, &bytes).expect("tamper");
    reload_refused(&gw, "SHA-256").await;
    let manifest = cardgate::plugin::signing::manifest_path(&deployed);
    let (code, _, err) = verify_rotating(&signers, &deployed);
    assert_eq!(code, 1, "{err}");

    // Signed by a key the gateway does not trust under the trusted key id.
    deploy(&v2, &deployed);
    sign(&impostor, "bureau", &deployed);
    reload_refused(&gw, "does not verify").await;
    // Signed by an unknown signer.
    sign(&impostor, "impostor", &deployed);
    reload_refused(&gw, "not trusted").await;
    // Unsigned.
    std::fs::remove_file(&manifest).expect("remove manifest");
    reload_refused(&gw, "no signed manifest").await;
    // A valid signature over a manifest that does not describe this library.
    let wrong = cardgate::plugin::signing::Manifest {
        name: "something-else".into(),
        version: "0.2.0".into(),
        abi: "1.0".into(),
        target: cardgate::plugin::signing::target(),
        sha256: cardgate::plugin::loader::sha256_hex(&std::fs::read(&deployed).expect("read")),
        signer: "bureau".into(),
    };
    let key = issue::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(&bureau.key).expect("key")).expect("key");
    let signed = cardgate::plugin::signing::sign(wrong, &key).expect("sign");
    std::fs::write(&manifest, serde_json::to_string(&signed).expect("JSON")).expect("write manifest");
    reload_refused(&gw, "signed for plugin `something-else`, not `fixture-configurable`").await;

    // Properly signed, but for another plugin than the one configured here: refused, as any
    // trusted signer's other plugin placed at this path would be.
    sign(&bureau, "bureau", &deployed);
    let (code, out, err) = verify_rotating(&signers, &deployed);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("valid: fixture-v2 0.2.0"), "{out}");
    reload_refused(&gw, "signed for plugin `fixture-v2`, not `fixture-configurable`").await;
    // Once the configuration names it, the new generation serves.
    gw.reload_config(|text| text.replace("declared_name = \"fixture-configurable\"", "declared_name = \"fixture-v2\""))
        .await
        .expect("the configuration naming fixture-v2 reloads");
    let (_, answer) = admin(gw.admin, Method::GET, "/admin/plugins").await;
    assert_eq!(answer["generation"].as_u64(), Some(2), "{answer}");
    assert_eq!(settled_version(&gw).await, "0.2.0");
}

#[tokio::test]
async fn admin_reports_health_readiness_and_routes() {
    let gw = TestGateway::start(Options::default()).await;
    assert_eq!(admin(gw.admin, Method::GET, "/healthz").await.0, StatusCode::OK);
    let (status, ready) = admin(gw.admin, Method::GET, "/readyz").await;
    assert_eq!((status, ready["ready"].as_bool()), (StatusCode::OK, Some(true)));
    let (_, routes) = admin(gw.admin, Method::GET, "/admin/routes").await;
    assert_eq!(routes["routes"][0]["payers"], json!(["basic-medical", "critical-illness"]));
    let (_, plugins) = admin(gw.admin, Method::GET, "/admin/plugins").await;
    assert_eq!(plugins["generation"], 1);
    assert_eq!(plugins["plugins"][0]["name"], "basic-medical");
    assert_eq!(plugins["plugins"][0]["breaker"], "closed");
}

#[tokio::test]
async fn admin_over_mutual_tls_admits_only_operator_certificates() {
    use cardgate::dev::Pki;
    let gw = TestGateway::start(Options::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::generate().expect("admin PKI");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let (cert, key, ca) =
        (write("admin.pem", &pki.server.cert), write("admin.key", &pki.server.key), write("ca.pem", &pki.ca));
    let tls = cardgate::server::tls::mutual_tls("admin", &cert, &key, &ca).expect("admin TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(cardgate::server::admin::run(listener, gw.live(), Some(tls), std::future::pending()));
    let operator = pki.client("operator-1").expect("operator certificate");
    let client = cardgate::client::Client::new(addr, &pki.ca, &operator.cert, &operator.key).expect("client");
    // The gateway's configuration names an admin token: over mutual TLS it is asked for too.
    let bearer = format!("Bearer {}", cardgate_tests::harness::ADMIN_TOKEN);
    let reply = client.send(Method::GET, "/admin/plugins", &[("authorization", &bearer)], None).await.expect("answer");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["generation"], 1);
    let tokenless = client.send(Method::GET, "/admin/plugins", &[], None).await.expect("answer");
    assert_eq!((tokenless.status, tokenless.json()["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let other = Pki::generate().expect("another PKI");
    let outsider = other.client("outsider").expect("certificate");
    let refused = cardgate::client::Client::new(addr, &pki.ca, &outsider.cert, &outsider.key).expect("client");
    assert!(refused.send(Method::GET, "/admin/plugins", &[], None).await.is_err(), "a foreign certificate is refused");
}

#[tokio::test]
async fn an_unsupported_inquiry_and_a_skipped_payer_are_not_plugin_failures() {
    let extra_toml = format!(
        "\n[plugins.assist]\nlibrary = \"{}\"\n[plugins.assist.config]\nfund = \"assist\"\ninsurance_types = [\"390\"]\n\
         share_bp = 7000\nannual_ceiling_fen = 100000\n\n[[routes]]\nregions = [\"44\"]\npayers = [\"basic-medical\", \"assist\"]\n",
        build_cdylib("medical-assistance").display()
    );
    let gw = TestGateway::start(Options { extra_toml, ..Options::default() }).await;
    // critical-illness answers no inquiries (`unsupported`).
    let inquiry = json!({ "token": gw.token(&Card::beijing(), 120), "terminal_id": "POS-1" });
    let reply = post(&gw.pharmacy, "/v1/inquiries", None, &inquiry).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json()["payers"][1], json!({ "payer": "critical-illness", "supported": false }));
    // An employee card on a route whose assistance payer serves residents only: skipped.
    let reply =
        post(&gw.pharmacy, "/v1/settlements", Some(&key()), &body(&gw.token(&Card::in_region("440104"), 120))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.json()["skipped"][0]["payer"], "assist", "{}", reply.body);
    let (_, plugins) = admin(gw.admin, Method::GET, "/admin/plugins").await;
    let counts = |name: &str| {
        let plugin = plugins["plugins"].as_array().and_then(|p| p.iter().find(|p| p["name"] == name)).cloned();
        let plugin = plugin.unwrap_or_else(|| panic!("{name} listed: {plugins}"));
        (plugin["calls"].as_u64(), plugin["failures"].as_u64())
    };
    assert_eq!(counts("critical-illness"), (Some(1), Some(0)));
    assert_eq!(counts("assist"), (Some(1), Some(0)));
    let (_, metrics) = cardgate_tests::harness::admin_text(gw.admin, Method::GET, "/metrics").await;
    let line = |plugin: &str, outcome: &str| {
        metrics.lines().any(|l| {
            l.starts_with("cardgate_plugin_calls_total")
                && l.contains(&format!("plugin=\"{plugin}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
    };
    assert!(line("critical-illness", "unsupported") && line("assist", "not_applicable"), "{metrics}");
    assert!(!line("assist", "plugin_rejected") && !line("critical-illness", "plugin_rejected"), "{metrics}");
}

#[test]
fn a_signing_key_made_as_the_guide_says_signs_a_plugin_the_gateway_trusts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys");
    let (code, entry, err) = cli(&[
        "keys",
        "generate",
        "--alg",
        "ed25519",
        "--kid",
        "bureau-bj",
        "--out",
        keys.to_str().expect("path"),
        "--plugin-signer",
        "--plugins",
        "my-policy",
    ]);
    assert_eq!(code, 0, "{err}");
    let entry: Value = serde_json::from_str(&entry).expect("a JSON entry");
    assert_eq!((entry["kid"].as_str(), entry["plugins"].clone()), (Some("bureau-bj"), json!(["my-policy"])));
    // The entry goes into the signers file as printed.
    let signers = dir.path().join("plugin-signers.json");
    std::fs::write(&signers, json!({ "signers": [entry] }).to_string()).expect("signers");
    let library = dir.path().join("libmy_policy.so");
    std::fs::copy(build_cdylib("fixture-configurable"), &library).expect("library");
    let key = keys.join("bureau-bj.key");
    let (code, _, err) = cli(&[
        "plugin",
        "sign",
        "--key",
        key.to_str().expect("path"),
        "--kid",
        "bureau-bj",
        library.to_str().expect("path"),
    ]);
    assert_eq!(code, 0, "{err}");
    let verify = |name: &str| {
        cli(&[
            "plugin",
            "verify",
            "--trust",
            signers.to_str().expect("path"),
            "--name",
            name,
            "--declared-name",
            "fixture-configurable",
            library.to_str().expect("path"),
        ])
    };
    let (code, out, err) = verify("my-policy");
    assert_eq!(code, 0, "{out}{err}");
    // The key may sign only the plugin configured as my-policy.
    let (code, out, err) = verify("other-policy");
    assert_ne!(code, 0, "{out}{err}");
    // A token key cannot be a plugin signer.
    let (code, _, err) = cli(&[
        "keys",
        "generate",
        "--alg",
        "es256",
        "--kid",
        "x",
        "--out",
        keys.to_str().expect("path"),
        "--plugin-signer",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("Ed25519"), "{err}");
}
