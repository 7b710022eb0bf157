//! An example till or billing-system client for cardgate.
//!
//! Against a `cardgate dev` directory it mints a token for a test card (or uses one given),
//! asks who the card belongs to, settles a three-line bill — in one step as a pharmacy, or as
//! a hospital by quote first — prints the receipt, and optionally reverses it.
//!
//! ```text
//! cargo run -p cardgate-example-client -- --dir .cardgate-dev [--as hospital] [--reverse]
//! ```

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use cardgate::client::{Client, Reply};
use cardgate::config::Config;
use cardgate::token::ECardClaim;
use cardgate::token::issue::{self, MintRequest, SigningKey};
use clap::{Parser, ValueEnum};
use http::Method;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "Example POS/HIS client for cardgate")]
struct Args {
    /// The `cardgate dev` directory (configuration, CA, client certificates, issuer key).
    #[arg(long, default_value = ".cardgate-dev")]
    dir: PathBuf,
    /// Which example institution to act as.
    #[arg(long = "as", value_enum, default_value_t = Role::Pharmacy)]
    role: Role,
    /// A scanned token to use instead of minting one.
    #[arg(long)]
    token: Option<String>,
    /// Card id for the minted token.
    #[arg(long, default_value = "110105199001011234")]
    card: String,
    /// Reverse the settlement afterwards.
    #[arg(long)]
    reverse: bool,
    /// Speak HTTP/2 (ALPN `h2`) instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// A pharmacy till: one scan, one settlement.
    Pharmacy,
    /// A hospital billing system: quote first, then settle the quote.
    Hospital,
}

fn read(dir: &std::path::Path, name: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
}

fn mint(dir: &std::path::Path, card: &str) -> Result<String, String> {
    let key = SigningKey::from_pkcs8_pem(&read(dir, "issuer.key")?).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let request = MintRequest {
        issuer: "CN-110000".into(),
        kid: cardgate::dev::ISSUER_KID.as_bytes().to_vec(),
        issued_at: now,
        ttl_secs: 120,
        token_id: None,
        ecard: ECardClaim {
            card_id: card.into(),
            holder_name: "张三".into(),
            insured_region: "110105".into(),
            insurance_types: vec!["310".into()],
            delegate: None,
        },
    };
    issue::mint(&key, &request).map_err(|e| e.to_string())
}

fn show(step: &str, reply: &Reply) -> Result<Value, String> {
    println!("{step}: HTTP {} (request {})", reply.status.as_u16(), reply.request_id);
    let value = reply.json();
    if !reply.status.is_success() {
        return Err(format!("{step} refused: {} — {}", value["code"], value["detail"]));
    }
    Ok(value)
}

fn bill() -> Value {
    json!([
        { "code": "XA01", "name": "Appendectomy", "category": "class_a", "quantity": 1, "unit_price_fen": 180000, "amount_fen": 180000 },
        { "code": "XB02", "name": "CT scan", "category": "class_b", "quantity": 2, "unit_price_fen": 25000, "amount_fen": 50000 },
        { "code": "XC03", "name": "Single room", "category": "class_c", "quantity": 2, "unit_price_fen": 10000, "amount_fen": 20000 }
    ])
}

async fn run(args: Args) -> Result<(), String> {
    let config = Config::load(&args.dir.join("cardgate.toml"), &HashMap::new()).map_err(|e| e.to_string())?;
    let name = match args.role {
        Role::Pharmacy => "pharmacy",
        Role::Hospital => "hospital",
    };
    let client = Client::new(
        config.server.listen,
        &read(&args.dir, "ca.pem")?,
        &read(&args.dir, &format!("{name}.pem"))?,
        &read(&args.dir, &format!("{name}.key"))?,
    )?;
    let token = match args.token {
        Some(token) => token,
        None => mint(&args.dir, &args.card)?,
    };
    let mut connection = if args.http2 { client.connect_h2().await? } else { client.connect().await? };
    let inquiry = json!({ "token": token, "terminal_id": "EXAMPLE-1" });
    let who = show("inquiry", &connection.send(Method::POST, "/v1/inquiries", &[], Some(&inquiry.to_string())).await?)?;
    println!("  card {} ({}), insured in {}", who["card"], who["holder_name"], who["insured_region"]);

    let key = format!("example-{}", std::process::id());
    let headers = [("idempotency-key", key.as_str())];
    let bill = json!({ "token": token, "terminal_id": "EXAMPLE-1", "total_fen": 250000, "lines": bill() });
    let settle_body = if args.role == Role::Hospital {
        let quote = show("quote", &connection.send(Method::POST, "/v1/quotes", &[], Some(&bill.to_string())).await?)?;
        println!("  quote {} valid until {}", quote["quote_id"], quote["expires_at"]);
        json!({ "quote_id": quote["quote_id"], "terminal_id": "EXAMPLE-1" })
    } else {
        bill
    };
    let reply = connection.send(Method::POST, "/v1/settlements", &headers, Some(&settle_body.to_string())).await?;
    let receipt = show("settlement", &reply)?;
    println!(
        "  {} {}: total {} fen = funds {} + account {} + cash {}",
        receipt["settlement_id"],
        receipt["state"],
        receipt["total_fen"],
        receipt["fund_pay_fen"],
        receipt["account_pay_fen"],
        receipt["cash_pay_fen"]
    );
    println!("{}", serde_json::to_string_pretty(&receipt).unwrap_or_default());
    if args.reverse {
        let path = format!("/v1/settlements/{}/reversal", receipt["settlement_id"].as_str().unwrap_or_default());
        let body = json!({ "reason": "example refund" }).to_string();
        let reversal = show("reversal", &connection.send(Method::POST, &path, &[], Some(&body)).await?)?;
        println!("  refunded: {}", reversal["refund"]);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
