//! What docs/PLUGINS.md tells a bureau to do, step by step: `cardgate plugin new`, test and
//! build the crate, sign it, configure it in a running gateway, reload, settle with it — and
//! roll it back.

use std::path::Path;
use std::process::Command;

use cardgate_sdk::testing::{Build, build_cdylib};
use cardgate_tests::harness::{Card, Options, TestGateway, post};
use cardgate_tests::workspace_root;
use clap::Parser;
use http::StatusCode;
use serde_json::json;

fn cli(args: &[&str]) -> (u8, String) {
    let cli =
        cardgate::cli::Cli::try_parse_from(std::iter::once("cardgate").chain(args.iter().copied())).expect("args");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cardgate::cli::run(cli, &mut out, &mut err);
    (code, format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err)))
}

fn text(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_plugin_new_to_a_signed_plugin_serving_a_route() {
    let work = tempfile::tempdir().expect("temp dir");
    // 1. A new plugin crate from the template.
    let (code, out) = cli(&["plugin", "new", "acme-assist", "--dir", text(work.path())]);
    assert_eq!(code, 0, "{out}");
    let crate_dir = work.path().join("acme-assist");
    // 2. Its own tests pass (they use the SDK's test kit), and it builds as a cdylib.
    let target = workspace_root().join("target/plugin-builds/kit");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let tested = Command::new(&cargo)
        .current_dir(&crate_dir)
        .args(["test", "--quiet", "--target-dir"])
        .arg(&target)
        .output()
        .expect("cargo test");
    assert!(tested.status.success(), "the generated tests fail:\n{}", String::from_utf8_lossy(&tested.stderr));
    let build =
        Build { workspace: Some(crate_dir.clone()), flavour: Some("kit-build".into()), ..Build::new("acme-assist") };
    let built = build.run().expect("the generated crate builds");
    let library = work.path().join("libacme_assist.so");
    std::fs::copy(&built, &library).expect("deploy");
    // 3. Sign it with the bureau's key, made as the guide says; the operator trusts that key by
    //    adding the entry the command printed to the signers file.
    let keys = work.path().join("keys");
    let (code, entry) =
        cli(&["keys", "generate", "--alg", "ed25519", "--kid", "bureau-bj", "--out", text(&keys), "--plugin-signer"]);
    assert_eq!(code, 0, "{entry}");
    let key = keys.join("bureau-bj.key");
    let (code, out) = cli(&["plugin", "sign", "--key", text(&key), "--kid", "bureau-bj", text(&library)]);
    assert_eq!(code, 0, "{out}");
    let signers = work.path().join("signers.json");
    let entry: serde_json::Value = serde_json::from_str(&entry).expect("the printed entry is JSON");
    std::fs::write(&signers, json!({ "signers": [entry] }).to_string()).expect("signers");
    let (code, out) = cli(&["plugin", "verify", "--trust", text(&signers), text(&library)]);
    assert_eq!(code, 0, "{out}");

    // A running gateway that loads only signed plugins (its own are signed by the same bureau).
    let libs = work.path().join("libs");
    std::fs::create_dir(&libs).expect("libs");
    for package in ["basic-medical", "critical-illness"] {
        let copy = libs.join(build_cdylib(package).file_name().expect("name"));
        std::fs::copy(build_cdylib(package), &copy).expect("copy");
        assert_eq!(cli(&["plugin", "sign", "--key", text(&key), "--kid", "bureau-bj", text(&copy)]).0, 0);
    }
    let options = Options {
        plugin_runtime: Some(format!("signers = \"{}\"", signers.display())),
        plugins_dir: Some(libs.clone()),
        ..Options::default()
    };
    let gw = TestGateway::start(options).await;
    let settle = |key: &'static str| {
        let token = gw.token(&Card::in_region("130102"), 120);
        let body = json!({
            "token": token, "terminal_id": "POS-1", "total_fen": 100000, "use_account": false,
            "lines": [{ "code": "X1", "name": "n", "category": "class_a", "quantity": 1, "unit_price_fen": 100000, "amount_fen": 100000 }]
        });
        let gw = &gw;
        async move { post(&gw.pharmacy, "/v1/settlements", Some(key), &body).await }
    };
    assert_eq!(settle("kit-0").await.json()["code"], "no_route");

    // 4. Configure it behind basic medical insurance for region 13, and reload.
    let section = format!(
        "\n[plugins.acme-assist]\nlibrary = \"{}\"\n[plugins.acme-assist.config]\nfund = \"acme\"\ninsurance_types = [\"310\"]\nshare_bp = 7000\nannual_ceiling_fen = 1000000\n\n[[routes]]\nregions = [\"13\"]\npayers = [\"basic-medical\", \"acme-assist\"]\n",
        library.display()
    );
    let before = std::fs::read_to_string(gw.dir.path().join("cardgate.toml")).expect("config");
    gw.reload_config(|text| text + &section).await.expect("reload");
    let receipt = settle("kit-1").await;
    assert_eq!(receipt.status, StatusCode::CREATED, "{}", receipt.body);
    let receipt = receipt.json();
    assert_eq!(receipt["payers"][1]["payer"], "acme-assist");
    assert_eq!(receipt["payers"][1]["version"], "0.1.0");
    // Basic medical (pharmacy, 80% above the 800-yuan deductible) pays 16,000 and leaves 84,000
    // of in-policy self-pay; the new plugin pays 70% of it.
    assert_eq!(receipt["payers"][0]["fund_pay_fen"], 16000);
    assert_eq!(receipt["payers"][0]["eligible_self_pay_fen"], 84000);
    assert_eq!(receipt["payers"][1]["fund_pay_fen"], 58800);
    assert_eq!(receipt["cash_pay_fen"], 25200);

    // 5. Roll back: the previous configuration, reloaded.
    gw.reload_config(|_| before).await.expect("rollback");
    assert_eq!(settle("kit-2").await.json()["code"], "no_route");
}

/// Every `cardgate ...` command of docs/PLUGINS.md: in code spans (which may wrap; a span of
/// three words or fewer names a command rather than runs one) and in code blocks, whitespace
/// collapsed.
fn guide_commands() -> Vec<String> {
    let guide = std::fs::read_to_string(workspace_root().join("docs/PLUGINS.md")).expect("docs/PLUGINS.md");
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in guide.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block && line.trim_start().starts_with("cardgate ") {
            commands.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    let spans = guide.split('`').skip(1).step_by(2);
    commands.extend(
        spans
            .map(|span| span.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|span| span.starts_with("cardgate ") && span.split(' ').count() > 3),
    );
    commands
}

#[test]
fn every_cardgate_command_in_the_guide_is_taken_as_written() {
    let commands = guide_commands();
    assert!(commands.len() >= 8, "{commands:#?}");
    // Each parses: no flag missing, none misspelt.
    for command in &commands {
        let words = command.split(' ');
        if let Err(e) = cardgate::cli::Cli::try_parse_from(words) {
            panic!("the guide's `{command}` is not a valid command line: {e}");
        }
    }
    // The walkthrough's commands run as written, in a directory of their own (the guide's
    // relative paths made absolute there), on a plugin made with `plugin new my-policy`.
    let work = tempfile::tempdir().expect("temp dir");
    let at = |relative: &str| work.path().join(relative).display().to_string();
    let (code, out) = cli(&["plugin", "new", "my-policy", "--dir", text(work.path())]);
    assert_eq!(code, 0, "{out}");
    let build = Build {
        workspace: Some(work.path().join("my-policy")),
        flavour: Some("guide".into()),
        ..Build::new("my-policy")
    };
    let built = build.run().expect("the generated crate builds");
    std::fs::create_dir_all(work.path().join("target/release")).expect("dir");
    std::fs::copy(&built, at("target/release/libmy_policy.so")).expect("library");
    let run = |command: &str| {
        assert!(commands.iter().any(|c| c == command), "the guide no longer says `{command}`:\n{commands:#?}");
        let words: Vec<String> = command
            .split(' ')
            .skip(1)
            .map(|w| match w {
                "keys" | "target/release/libmy_policy.so" | "plugin-signers.json" | "keys/bureau-bj.key" => at(w),
                _ => w.to_owned(),
            })
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        // `keys` is both a subcommand and the guide's key directory: only the latter moves.
        let words: Vec<&str> = std::iter::once(if command.starts_with("cardgate keys ") { "keys" } else { words[0] })
            .chain(words[1..].iter().copied())
            .collect();
        let (code, out) = cli(&words);
        assert_eq!(code, 0, "`{command}`: {out}");
        out
    };
    let entry =
        run("cardgate keys generate --alg ed25519 --kid bureau-bj --out keys --plugin-signer --plugins my-policy");
    let entry: serde_json::Value = serde_json::from_str(&entry).expect("the printed entry is JSON");
    std::fs::write(at("plugin-signers.json"), json!({ "signers": [entry] }).to_string()).expect("signers");
    run("cardgate plugin sign --key keys/bureau-bj.key --kid bureau-bj target/release/libmy_policy.so");
    run("cardgate plugin inspect target/release/libmy_policy.so");
    run("cardgate plugin verify --trust plugin-signers.json target/release/libmy_policy.so");
}
