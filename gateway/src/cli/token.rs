//! `cardgate keys generate`, `cardgate token mint`, `cardgate token verify`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Subcommand, ValueEnum};

use super::Failure;
use crate::token::issue::{self, MintRequest, SigningKey};
use crate::token::trust::parse_rfc3339;
use crate::token::{
    Algorithm, DelegateClaim, ECardClaim, KeyValidity, Profile, RevocationList, TrustList, Verified, Verifier,
    VerifyOptions, qr,
};

/// Key commands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a key pair: `KID.key` (PKCS#8 PEM, mode 0600) and `KID.pub` (SPKI PEM) in DIR.
    /// Prints the token trust-list entry of an issuer key or, with `--plugin-signer`, the
    /// plugin signers-file entry of a bureau's signing key.
    Generate {
        /// Signature algorithm.
        #[arg(long, value_enum)]
        alg: AlgArg,
        /// Key id: letters, digits, `.`, `_` or `-`, at most 64.
        #[arg(long)]
        kid: String,
        /// Directory to write the key files to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// A key for signing plugins (`cardgate plugin sign`; Ed25519 only): print the entry of
        /// `plugin_runtime.signers` instead of a token trust-list entry.
        #[arg(long)]
        plugin_signer: bool,
        /// With `--plugin-signer`: the plugins (their names in the gateway configuration,
        /// `[plugins.NAME]`) the key may sign; none: any.
        #[arg(long, requires = "plugin_signer", num_args = 1..)]
        plugins: Vec<String>,
    },
}

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint an e-card token and print its QR text.
    Mint(Box<MintArgs>),
    /// Verify a token; exit 0 with its claims, or 1 with `error: <code>: <reason>`.
    Verify(Box<VerifyArgs>),
}

/// Algorithms on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AlgArg {
    /// Ed25519.
    Ed25519,
    /// ECDSA P-256 / SHA-256.
    Es256,
    /// ECDSA P-384 / SHA-384.
    Es384,
    /// RSASSA-PSS / SHA-256, 2048 bits.
    Ps256,
    /// SM2 / SM3.
    Sm2,
}

impl From<AlgArg> for Algorithm {
    fn from(a: AlgArg) -> Self {
        match a {
            AlgArg::Ed25519 => Algorithm::EdDsa,
            AlgArg::Es256 => Algorithm::Es256,
            AlgArg::Es384 => Algorithm::Es384,
            AlgArg::Ps256 => Algorithm::Ps256,
            AlgArg::Sm2 => Algorithm::Sm2Sm3,
        }
    }
}

/// `token mint` arguments.
#[derive(Debug, clap::Args)]
pub struct MintArgs {
    /// The issuer's private key (PKCS#8 PEM); its algorithm is used.
    #[arg(long)]
    key: PathBuf,
    /// Key id placed in the token's protected header.
    #[arg(long)]
    kid: String,
    /// Card id.
    #[arg(long)]
    card: String,
    /// Holder's name.
    #[arg(long)]
    name: String,
    /// Insured region: 6-digit administrative division code.
    #[arg(long)]
    region: String,
    /// Insurance type code; repeat or separate with commas for several.
    #[arg(long, required = true, value_delimiter = ',')]
    insutype: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 120)]
    ttl: i64,
    /// Issuer (`iss`).
    #[arg(long, default_value = "cardgate-issuer")]
    issuer: String,
    /// Issue time: RFC 3339 (`2026-03-01T16:00:00+08:00`), also with `+0800`, `+08` or no
    /// offset (UTC), a space for the `T`, or seconds since the epoch [default: now].
    #[arg(long)]
    at: Option<String>,
    /// Card id of a family member presenting the card (family account).
    #[arg(long, requires = "relation")]
    delegate_card: Option<String>,
    /// The delegate's name.
    #[arg(long, requires = "delegate_card")]
    delegate_name: Option<String>,
    /// The delegate's relation to the holder (`parent`, `spouse`, `child`, ...).
    #[arg(long, requires = "delegate_card")]
    relation: Option<String>,
    /// Also draw the QR code in the terminal (on standard error).
    #[arg(long)]
    qr: bool,
    /// Also write the QR code as a PNG image.
    #[arg(long)]
    png: Option<PathBuf>,
}

/// `token verify` arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Trust list (JSON).
    #[arg(long)]
    trust: PathBuf,
    /// Revocation list (JSON).
    #[arg(long)]
    revocations: Option<PathBuf>,
    /// Verify as of this moment: RFC 3339 (`2026-03-01T16:00:00+08:00`), also with `+0800`,
    /// `+08` or no offset (UTC), a space for the `T`, or seconds since the epoch [default: now].
    #[arg(long)]
    at: Option<String>,
    /// When an issuer key must be valid: `verification` (the `--at` moment) or `issue` (the
    /// token's `iat`).
    #[arg(long, value_enum, default_value_t = KeyValidityArg::Verification)]
    key_validity: KeyValidityArg,
    /// Expected prefix [default: `EC1:` for the e-card profile, `HC1:` for cwt].
    #[arg(long)]
    prefix: Option<String>,
    /// Rules: `ecard` (the full e-card profile) or `cwt` (signature and time only).
    #[arg(long, value_enum, default_value_t = ProfileArg::Ecard)]
    profile: ProfileArg,
    /// Tolerated clock skew in seconds.
    #[arg(long, default_value_t = 60)]
    skew: i64,
    /// Longest e-card token lifetime in seconds.
    #[arg(long, default_value_t = 600)]
    max_lifetime: i64,
    /// Print the claims as JSON.
    #[arg(long)]
    json: bool,
    /// The QR text, or `-` (or nothing) to read it from standard input.
    payload: Option<String>,
}

/// `--key-validity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyValidityArg {
    /// When the token is verified.
    Verification,
    /// When the token was issued (`iat`).
    Issue,
}

/// Verification profiles on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    /// The e-card profile.
    Ecard,
    /// Any COSE_Sign1 CWT: signature and time only.
    Cwt,
}

/// Runs a key command.
pub fn keys(command: KeysCommand, out: &mut dyn Write) -> Result<u8, Failure> {
    let KeysCommand::Generate { alg, kid, out: dir, plugin_signer, plugins } = command;
    let valid_kid =
        !kid.is_empty() && kid.len() <= 64 && kid.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid_kid {
        return Err(Failure::config("--kid: use 1 to 64 letters, digits, `.`, `_` or `-`"));
    }
    if plugin_signer && Algorithm::from(alg) != Algorithm::EdDsa {
        return Err(Failure::config("--plugin-signer: plugins are signed with Ed25519 keys: use --alg ed25519"));
    }
    let key = issue::generate(alg.into()).map_err(Failure::new)?;
    std::fs::create_dir_all(&dir).map_err(|e| Failure::config(format!("{}: {e}", dir.display())))?;
    let private = dir.join(format!("{kid}.key"));
    write_new(&private, key.private_pem.as_bytes(), 0o600)?;
    write_new(&dir.join(format!("{kid}.pub")), key.public_pem.as_bytes(), 0o644)?;
    let entry = if plugin_signer {
        // An entry of the signers file: the kid as `plugin sign --kid` writes it, in clear.
        serde_json::json!({ "kid": kid, "public_key": key.public_pem, "plugins": plugins })
    } else {
        serde_json::json!({
            "kid": BASE64.encode(kid.as_bytes()),
            "alg": key.algorithm.name(),
            "public_key": key.public_pem,
        })
    };
    writeln!(out, "{entry:#}").map_err(Failure::new)?;
    Ok(0)
}

/// Creates a file that must not exist yet, with `mode`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Failure::config(format!("{}: {e} (keys are never overwritten)", path.display())))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| Failure::new(format!("{}: {e}", path.display())))
}

/// Runs a token command.
pub fn run(command: TokenCommand, out: &mut dyn Write, err: &mut dyn Write) -> Result<u8, Failure> {
    match command {
        TokenCommand::Mint(args) => mint(*args, out, err),
        TokenCommand::Verify(args) => verify(*args, out),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn moment(at: Option<&str>) -> Result<i64, Failure> {
    at.map_or(Ok(now()), |t| {
        parse_moment(t).ok_or_else(|| {
            Failure::config(format!(
                "--at: `{t}` is not a time: write it as 2026-03-01T08:00:00+08:00 (a `Z`, `+0800`, `+08` or no \
                 offset, which means UTC; a space for the `T`; seconds optional) or as seconds since the epoch"
            ))
        })
    })
}

/// A moment as operators write it: RFC 3339; an ISO 8601 offset without its colon (`+0800`)
/// or in hours (`+08`); no offset, meaning UTC; a space instead of the `T`; no seconds; or
/// whole seconds since the epoch.
pub fn parse_moment(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<i64>() {
        return Some(seconds);
    }
    let (date, time) = text.split_once(['T', 't', ' '])?;
    let time = time.trim_start();
    let (clock, offset) = match time.find(['Z', 'z', '+', '-']) {
        Some(at) => time.split_at(at),
        None => (time, "Z"),
    };
    let offset = match offset.as_bytes() {
        [b'Z' | b'z'] => "Z".to_owned(),
        [sign @ (b'+' | b'-'), h1, h2] => format!("{}{}{}:00", *sign as char, *h1 as char, *h2 as char),
        [sign @ (b'+' | b'-'), h1, h2, m1, m2] => {
            format!("{}{}{}:{}{}", *sign as char, *h1 as char, *h2 as char, *m1 as char, *m2 as char)
        }
        _ => offset.to_owned(),
    };
    let clock = if clock.len() == 5 { format!("{clock}:00") } else { clock.to_owned() };
    parse_rfc3339(&format!("{date}T{clock}{offset}"))
}

fn mint(args: MintArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<u8, Failure> {
    let pem =
        std::fs::read_to_string(&args.key).map_err(|e| Failure::config(format!("{}: {e}", args.key.display())))?;
    let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| Failure::config(format!("{}: {e}", args.key.display())))?;
    if args.region.len() != 6 || !args.region.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Failure::config("--region: a 6-digit administrative division code"));
    }
    if args.ttl <= 0 {
        return Err(Failure::config("--ttl: must be positive"));
    }
    let delegate = args.delegate_card.map(|card_id| DelegateClaim {
        card_id,
        name: args.delegate_name,
        relation: args.relation.unwrap_or_default(),
    });
    let request = MintRequest {
        issuer: args.issuer,
        kid: args.kid.into_bytes(),
        issued_at: moment(args.at.as_deref())?,
        ttl_secs: args.ttl,
        token_id: None,
        ecard: ECardClaim {
            card_id: args.card,
            holder_name: args.name,
            insured_region: args.region,
            insurance_types: args.insutype,
            delegate,
        },
    };
    let token = issue::mint(&key, &request).map_err(Failure::new)?;
    writeln!(out, "{token}").map_err(Failure::new)?;
    if args.qr || args.png.is_some() {
        let code = qr::encode(&token).map_err(Failure::new)?;
        if args.qr {
            write!(err, "{}", qr::to_terminal(&code)).map_err(Failure::new)?;
        }
        if let Some(path) = &args.png {
            qr::write_png(&code, 8, path).map_err(Failure::new)?;
        }
    }
    Ok(0)
}

fn verify(args: VerifyArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let trust = TrustList::load(&args.trust).map_err(|p| Failure::config(p.join("\n       ")))?;
    let revocations = match &args.revocations {
        Some(path) => RevocationList::load(path).map_err(|p| Failure::config(p.join("\n       ")))?,
        None => RevocationList::default(),
    };
    let profile = match args.profile {
        ProfileArg::Ecard => Profile::ECard,
        ProfileArg::Cwt => Profile::Cwt,
    };
    let default_prefix = if profile == Profile::ECard { "EC1:" } else { "HC1:" };
    let options = VerifyOptions {
        profile,
        prefix: args.prefix.unwrap_or_else(|| default_prefix.to_owned()),
        clock_skew_secs: args.skew,
        max_lifetime_secs: args.max_lifetime,
        key_validity: match args.key_validity {
            KeyValidityArg::Verification => KeyValidity::Verification,
            KeyValidityArg::Issue => KeyValidity::Issue,
        },
    };
    let at = moment(args.at.as_deref())?;
    let payload = match args.payload.as_deref() {
        None | Some("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(Failure::new)?;
            text.trim_end().to_owned()
        }
        Some(text) => text.to_owned(),
    };
    let verifier = Verifier::new(Arc::new(trust), Arc::new(revocations), options);
    let verified = verifier.verify(&payload, at).map_err(|e| Failure::new(format!("{}: {e}", e.code())))?;
    let text = if args.json { format!("{:#}\n", verified_json(&verified)) } else { verified_text(&verified) };
    out.write_all(text.as_bytes()).map_err(Failure::new)?;
    Ok(0)
}

/// The verified token as JSON: key, algorithm, registered claims, e-card claim and the raw map.
pub fn verified_json(v: &Verified) -> serde_json::Value {
    let ecard = v.ecard.as_ref().map(|e| {
        serde_json::json!({
            "card_id": e.card_id,
            "holder_name": e.holder_name,
            "insured_region": e.insured_region,
            "insurance_types": e.insurance_types,
            "delegate": e.delegate.as_ref().map(|d| serde_json::json!({
                "card_id": d.card_id, "name": d.name, "relation": d.relation,
            })),
        })
    });
    serde_json::json!({
        "valid": true,
        "kid": BASE64.encode(&v.kid),
        "alg": v.algorithm.name(),
        "iss": v.claims.issuer,
        "iat": v.claims.issued_at,
        "exp": v.claims.expires_at,
        "cti": v.claims.token_id.as_ref().map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        "ecard": ecard,
        "claims": v.claims.to_json(),
    })
}

fn verified_text(v: &Verified) -> String {
    let mut text = format!("valid: {} signature by key {}\n", v.algorithm, BASE64.encode(&v.kid));
    if let Some(iss) = &v.claims.issuer {
        text += &format!("issuer: {iss}\n");
    }
    for (label, time) in [("issued", v.claims.issued_at), ("expires", v.claims.expires_at)] {
        if let Some(t) = time.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok()) {
            let formatted = t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            text += &format!("{label}: {formatted}\n");
        }
    }
    if let Some(e) = &v.ecard {
        text += &format!(
            "card: {} ({}), insured in {}, insurance {}\n",
            e.card_id,
            e.holder_name,
            e.insured_region,
            e.insurance_types.join(",")
        );
        if let Some(d) = &e.delegate {
            text += &format!("presented by: {} ({})\n", d.card_id, d.relation);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::parse_moment;

    #[test]
    fn moments_are_read_as_operators_write_them() {
        let eight_utc = Some(1_772_352_000); // 2026-03-01T08:00:00Z
        for text in [
            "2026-03-01T08:00:00Z",
            "2026-03-01T16:00:00+08:00",
            "2026-03-01T16:00:00+0800",
            "2026-03-01T16:00:00+08",
            "2026-03-01T08:00:00+0000",
            "2026-03-01T03:30:00-0430",
            "2026-03-01T08:00:00",
            "2026-03-01 08:00:00",
            "2026-03-01 08:00",
            "2026-03-01T08:00Z",
            "2026-03-01t08:00:00z",
            " 2026-03-01T08:00:00Z ",
            "1772352000",
        ] {
            assert_eq!(parse_moment(text), eight_utc, "{text}");
        }
        assert_eq!(parse_moment("2026-03-01T08:00:00.750Z"), eight_utc, "fractions are cut");
        for text in ["", "2026-03-01", "08:00:00", "2026-03-01T25:00:00Z", "2026-03-01T08:00:00+8", "yesterday"] {
            assert_eq!(parse_moment(text), None, "{text}");
        }
    }
}
