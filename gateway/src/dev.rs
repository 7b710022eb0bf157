//! Dev mode: everything a fresh clone needs to run the gateway on localhost — a CA, a server
//! certificate, a client certificate per example institution, an issuer key and trust list, a
//! configuration with the example plugins and routes, and a ledger file — written once into a
//! directory and reused on every later start (the ledger and keys survive restarts).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::server::tls::INSTITUTION_URI_PREFIX;
use crate::token::issue;
use crate::token::trust::Algorithm;

/// The example hospital's institution id.
pub const HOSPITAL: &str = "H110105001";
/// The example pharmacy's institution id.
pub const PHARMACY: &str = "P110105002";
/// The dev issuer's key id.
pub const ISSUER_KID: &str = "dev-issuer";

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    /// Certificate.
    pub cert: String,
    /// PKCS#8 private key.
    pub key: String,
}

/// A small PKI: a CA, a server certificate and institution client certificates.
#[derive(Debug)]
pub struct Pki {
    /// The CA certificate (PEM); it signs both server and client certificates.
    pub ca: String,
    /// The server's certificate, for `localhost` and `127.0.0.1`.
    pub server: Pem,
    issuer: Issuer<'static, KeyPair>,
}

fn failed(e: rcgen::Error) -> String {
    format!("certificate generation: {e}")
}

impl Pki {
    /// A new CA and server certificate.
    pub fn generate() -> Result<Self, String> {
        let ca_key = KeyPair::generate().map_err(failed)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = name("cardgate dev CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).map_err(failed)?;
        let issuer = Issuer::new(ca, ca_key);
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).map_err(failed)?;
        server.subject_alt_names.push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        server.distinguished_name = name("localhost");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sign(server, &issuer)?;
        Ok(Self { ca: ca_cert.pem(), server, issuer })
    }

    /// A client certificate naming `institution` (URI SAN and CN).
    pub fn client(&self, institution: &str) -> Result<Pem, String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(institution);
        let uri = format!("{INSTITUTION_URI_PREFIX}{institution}");
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(failed)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        sign(params, &self.issuer)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn sign(params: CertificateParams, issuer: &Issuer<'static, KeyPair>) -> Result<Pem, String> {
    let key = KeyPair::generate().map_err(failed)?;
    let cert = params.signed_by(&key, issuer).map_err(failed)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// Where the plugins of a dev setup are.
#[derive(Debug, Clone)]
pub struct DevPlugins {
    /// `basic-medical` library.
    pub basic_medical: PathBuf,
    /// `critical-illness` library.
    pub critical_illness: PathBuf,
    /// `medical-assistance` library.
    pub medical_assistance: PathBuf,
}

/// The files of a dev setup.
#[derive(Debug, Clone)]
pub struct DevFiles {
    /// The directory.
    pub dir: PathBuf,
    /// `cardgate.toml`.
    pub config: PathBuf,
}

impl DevFiles {
    /// A file in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes a dev setup into `dir` unless `cardgate.toml` is already there.
pub fn ensure(dir: &Path, listen: &str, plugins: &DevPlugins) -> Result<DevFiles, String> {
    let files = DevFiles { dir: dir.to_owned(), config: dir.join("cardgate.toml") };
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Keys, the ledger secret and card data live here: the owner's alone (also a directory
    // set up by an earlier version, which left it 0755).
    restrict(dir, 0o700)?;
    if files.config.exists() {
        for secret in [files.config.clone(), dir.join("admin.token"), dir.join("ledger.secret")] {
            if secret.exists() {
                restrict(&secret, 0o600)?;
            }
        }
        return Ok(files);
    }
    let pki = Pki::generate()?;
    let write = |name: &str, contents: &str| {
        std::fs::write(dir.join(name), contents).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    write("ca.pem", &pki.ca)?;
    write("server.pem", &pki.server.cert)?;
    write_private(&dir.join("server.key"), &pki.server.key)?;
    for (file, institution) in [("hospital", HOSPITAL), ("pharmacy", PHARMACY)] {
        let pem = pki.client(institution)?;
        write(&format!("{file}.pem"), &pem.cert)?;
        write_private(&dir.join(format!("{file}.key")), &pem.key)?;
    }
    let issuer = issue::generate(Algorithm::EdDsa).map_err(|e| e.to_string())?;
    write_private(&dir.join("issuer.key"), &issuer.private_pem)?;
    let kid = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, ISSUER_KID);
    let trust = serde_json::json!({ "keys": [{ "kid": kid, "alg": "EdDSA", "public_key": issuer.public_pem }] });
    write("trust.json", &format!("{trust:#}\n"))?;
    write_private(&dir.join("ledger.secret"), &format!("{}\n", random_hex(32)))?;
    write_private(&dir.join("admin.token"), &format!("{}\n", random_hex(32)))?;
    write_private(&files.config, &config_text(listen, plugins)?)?;
    Ok(files)
}

fn restrict(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buffer = vec![0u8; bytes];
    let _ = ring::rand::SystemRandom::new().fill(&mut buffer);
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

const BASIC_MEDICAL_CONFIG: &str = include_str!("../../plugins/basic-medical/config.example.toml");
const CRITICAL_ILLNESS_CONFIG: &str = include_str!("../../plugins/critical-illness/config.example.toml");
const MEDICAL_ASSISTANCE_CONFIG: &str = include_str!("../../plugins/medical-assistance/config.example.toml");

/// The dev configuration: the two example institutions, the example payer chain for Beijing
/// cards, and a cross-region rule for Shanghai cards.
fn config_text(listen: &str, plugins: &DevPlugins) -> Result<String, String> {
    let plugin_config =
        |text: &str| toml::from_str::<toml::Table>(text).map_err(|e| format!("example plugin config: {e}"));
    let head = format!(
        r#"# cardgate dev configuration, written by `cardgate dev`. Every key is documented in
# examples/cardgate.toml.

[server]
listen = "{listen}"
certificate = "server.pem"
private_key = "server.key"
client_ca = "ca.pem"
{admin}
[tokens]
trust_list = "trust.json"
clock_skew_secs = 60
max_lifetime_secs = 600
quote_validity_secs = 1800

[ledger]
path = "ledger.db"
# The secret keying card hashes and sealing stored requests, quotes and receipts (mode 0600).
secret_file = "ledger.secret"

[plugin_runtime]
cache_dir = "plugin-cache"
# Dev mode loads the example plugins unsigned; production names `signers` instead.
allow_unsigned = true

[institutions.{HOSPITAL}]
name = "Example Tertiary Hospital"
level = "tertiary"
region = "110105"

[institutions.{PHARMACY}]
name = "Example Pharmacy"
level = "pharmacy"
region = "110105"

# Beijing cards: basic medical insurance, then critical-illness insurance, then medical
# assistance for registered low-income recipients.
[[routes]]
regions = ["11"]
payers = ["basic-medical", "critical-illness", "medical-assistance"]

# Shanghai cards treated outside Shanghai: basic medical insurance only.
[[routes]]
regions = ["31"]
cross_region = true
payers = ["basic-medical"]
"#,
        admin = listen
            .parse::<std::net::SocketAddr>()
            .map(|a| {
                format!(
                    "\n[admin]\nlisten = \"127.0.0.1:{}\"\n# The operator's bearer token for /admin/ (mode 0600).\ntoken_file = \"admin.token\"\n",
                    a.port().wrapping_add(1)
                )
            })
            .unwrap_or_default()
    );
    let mut plugins_table = toml::Table::new();
    for (name, library, text) in [
        ("basic-medical", &plugins.basic_medical, BASIC_MEDICAL_CONFIG),
        ("critical-illness", &plugins.critical_illness, CRITICAL_ILLNESS_CONFIG),
        ("medical-assistance", &plugins.medical_assistance, MEDICAL_ASSISTANCE_CONFIG),
    ] {
        let mut table = toml::Table::new();
        table.insert("library".into(), toml::Value::String(library.display().to_string()));
        table.insert("dispatch".into(), toml::Value::String("inline".into()));
        table.insert("config".into(), toml::Value::Table(plugin_config(text)?));
        plugins_table.insert(name.into(), toml::Value::Table(table));
    }
    let mut root = toml::Table::new();
    root.insert("plugins".into(), toml::Value::Table(plugins_table));
    let plugins_text = toml::to_string(&root).map_err(|e| e.to_string())?;
    Ok(format!("{head}\n{plugins_text}"))
}
