//! A real gateway for end-to-end tests: generated PKI and issuer key, the real plugins built
//! as cdylibs, a TOML configuration loaded through `Config::load`, a ledger file, and the
//! server listening on `127.0.0.1:0` over mutual TLS. It can be stopped and started again on
//! the same directory, as a daemon restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cardgate::client::{Client, Reply};
use cardgate::config::Config;
use cardgate::dev::{HOSPITAL, PHARMACY, Pki};
use cardgate::ledger::postgres::ScratchDatabase;
use cardgate::service::{Gateway, Live, SystemClock};
use cardgate::token::issue::{self, MintRequest, SigningKey};
use cardgate::token::trust::Algorithm;
use cardgate::token::{DelegateClaim, ECardClaim};
use cardgate_sdk::testing::build_cdylib;
use http::Method;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The issuer key id trusted by test gateways.
pub const KID: &str = "test-issuer";

/// Settings a test can change.
#[derive(Debug, Clone)]
pub struct Options {
    /// `tokens.clock_skew_secs`.
    pub clock_skew_secs: i64,
    /// Extra TOML appended to the configuration (more plugins, routes).
    pub extra_toml: String,
    /// Extra keys of `[plugin_runtime]` (replacing `allow_unsigned = true`).
    pub plugin_runtime: Option<String>,
    /// Copy the example plugins here and load them from there (to sign them, say).
    pub plugins_dir: Option<PathBuf>,
    /// Build the example plugins with `--release` (benchmarks).
    pub release_plugins: bool,
    /// Call the example plugins inline rather than on the pool.
    pub inline_plugins: bool,
    /// `ledger.engine`, or `postgres` for the cluster's backend on a database of the
    /// gateway's own (default: [`test_engine`]).
    pub engine: Option<&'static str>,
    /// `admin.listen` for the real binary (default: any free loopback port). The in-process
    /// gateway binds its own admin listener; both take [`ADMIN_TOKEN`].
    pub admin_listen: Option<SocketAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            clock_skew_secs: 60,
            extra_toml: String::new(),
            plugin_runtime: None,
            plugins_dir: None,
            release_plugins: false,
            inline_plugins: false,
            engine: None,
            admin_listen: None,
        }
    }
}

/// A running test gateway and what a client needs to talk to it.
#[derive(Debug)]
pub struct TestGateway {
    /// Its directory (configuration, certificates, ledger).
    pub dir: tempfile::TempDir,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// A client as the example hospital.
    pub hospital: Client,
    /// A client as the example pharmacy.
    pub pharmacy: Client,
    /// A client whose certificate names an institution the gateway does not know.
    pub stranger: Client,
    /// The admin listener (plain HTTP, loopback).
    pub admin: SocketAddr,
    /// Its ledger's database, when the backend is PostgreSQL (dropped with the gateway).
    pub database: Option<ScratchDatabase>,
    /// The running gateway's state (swapped by a configuration reload).
    live: Option<Arc<Live>>,
    issuer: Arc<SigningKey>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Writes a file readable by its owner alone, as an operator keeps keys and configuration (the
/// gateway warns about a private key others can read).
fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// The ledger the test gateways use: `CARDGATE_TEST_LEDGER` (`sqlite`, the default, `lsm`, or
/// `postgres`: the cluster's backend, each gateway on a database of its own on the server
/// [`postgres_server`] names); `.ci/run` runs the end-to-end tests with each.
pub fn test_engine() -> String {
    match std::env::var("CARDGATE_TEST_LEDGER").as_deref() {
        Ok("lsm") => "lsm".into(),
        Ok("postgres") => "postgres".into(),
        _ => "sqlite".into(),
    }
}

/// The embedded engine the tests use where a test needs one (files on disk): `lsm` when
/// `CARDGATE_TEST_LEDGER` says so, else `sqlite`.
pub fn embedded_engine() -> &'static str {
    if test_engine() == "lsm" { "lsm" } else { "sqlite" }
}

/// The PostgreSQL server for the cluster's tests: `CARDGATE_TEST_POSTGRES`
/// (`postgres://user@host:port/database`, a user that may create databases), if set.
pub fn postgres_server() -> Option<String> {
    std::env::var("CARDGATE_TEST_POSTGRES").ok().filter(|url| !url.is_empty())
}

/// The `[ledger]` section for `engine`, on `database` for `postgres`.
fn ledger_toml(engine: &str, database: Option<&ScratchDatabase>) -> String {
    let secret = "ab".repeat(32);
    match database {
        Some(database) if engine == "postgres" => format!(
            "[ledger]\nbackend = \"postgres\"\nsecret = \"{secret}\"\n\n[ledger.postgres]\nurl = \"{}\"\npool_size = 8\nlease_secs = 30\n",
            database.url
        ),
        _ => format!("[ledger]\npath = \"ledger\"\nengine = \"{engine}\"\nsecret = \"{secret}\"\n"),
    }
}

fn config_toml(options: &Options, database: Option<&ScratchDatabase>) -> String {
    let engine = options.engine.map_or_else(test_engine, str::to_owned);
    let ledger = ledger_toml(&engine, database);
    let library = |p: &str| {
        let built = if options.release_plugins {
            let build = cardgate_sdk::testing::Build {
                release: true,
                flavour: Some("bench".into()),
                ..cardgate_sdk::testing::Build::new(p)
            };
            build.run().unwrap_or_else(|e| panic!("{e}"))
        } else {
            build_cdylib(p)
        };
        match &options.plugins_dir {
            Some(dir) => {
                let copy = dir.join(built.file_name().expect("file name"));
                std::fs::copy(&built, &copy).expect("copy plugin");
                copy.display().to_string()
            }
            None => built.display().to_string(),
        }
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
certificate = "server.pem"
private_key = "server.key"
client_ca = "ca.pem"
max_body_bytes = 65536

[tokens]
trust_list = "trust.json"
clock_skew_secs = {skew}
max_lifetime_secs = 600

{ledger}
[plugin_runtime]
cache_dir = "plugin-cache"
{runtime}

[institutions.{HOSPITAL}]
name = "Test Hospital"
level = "tertiary"
region = "110105"

[institutions.{PHARMACY}]
name = "Test Pharmacy"
level = "pharmacy"
region = "110105"

[[routes]]
regions = ["11"]
payers = ["basic-medical", "critical-illness"]

[[routes]]
regions = ["31"]
cross_region = true
payers = ["basic-medical"]

[plugins.basic-medical]
library = "{basic}"
dispatch = "{dispatch}"
{basic_config}

[plugins.critical-illness]
library = "{critical}"
dispatch = "{dispatch}"
{critical_config}
{extra}
"#,
        skew = options.clock_skew_secs,
        basic = library("basic-medical"),
        critical = library("critical-illness"),
        basic_config = crate::plugin_config_toml("basic-medical", "basic-medical"),
        critical_config = crate::plugin_config_toml("critical-illness", "critical-illness"),
        extra = options.extra_toml,
        runtime = options.plugin_runtime.as_deref().unwrap_or("allow_unsigned = true"),
        dispatch = if options.inline_plugins { "inline" } else { "pool" },
    )
}

/// A gateway's directory, certificates and issuer key, ready to serve (in-process or as the
/// real `cardgate` binary).
#[derive(Debug)]
pub struct Setup {
    /// The directory: `cardgate.toml`, certificates, trust list, ledger.
    pub dir: tempfile::TempDir,
    ca: String,
    clients: Vec<(String, String)>,
    issuer: Arc<SigningKey>,
    /// The ledger's database, when the backend is PostgreSQL.
    pub database: Option<ScratchDatabase>,
}

impl Setup {
    /// A server's mutual TLS on this setup's certificates (the server's, the clients' CA), as a
    /// listener built outside the gateway's configuration uses it.
    pub fn server_tls(&self, section: &str) -> Arc<rustls::ServerConfig> {
        let dir = self.dir.path();
        cardgate::server::tls::mutual_tls(
            section,
            &dir.join("server.pem"),
            &dir.join("server.key"),
            &dir.join("ca.pem"),
        )
        .unwrap_or_else(|problems| panic!("TLS: {problems:?}"))
    }

    /// Writes a configuration listening on `listen`, with generated PKI and issuer key.
    pub fn create(options: &Options, listen: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let database = (options.engine.map_or_else(test_engine, str::to_owned) == "postgres").then(|| {
            let server = postgres_server()
                .expect("the postgres ledger's tests need CARDGATE_TEST_POSTGRES=postgres://user@host/database");
            ScratchDatabase::create(&server).expect("a database of the gateway's own")
        });
        let pki = Pki::generate().expect("PKI");
        write(dir.path(), "ca.pem", &pki.ca);
        write(dir.path(), "server.pem", &pki.server.cert);
        write(dir.path(), "server.key", &pki.server.key);
        let issuer = issue::generate(Algorithm::EdDsa).expect("issuer key");
        let kid = base64_encode(KID.as_bytes());
        let trust = serde_json::json!({ "keys": [{ "kid": kid, "public_key": issuer.public_pem }] });
        write(dir.path(), "trust.json", &trust.to_string());
        // The operator's admin token, which [`admin`] sends.
        write(dir.path(), "admin.token", ADMIN_TOKEN);
        let admin = options.admin_listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let config = config_toml(options, database.as_ref()).replace("127.0.0.1:0", listen);
        let config = format!("{config}\n[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n");
        write(dir.path(), "cardgate.toml", &config);
        let clients = [HOSPITAL, PHARMACY, "X999999999"]
            .iter()
            .map(|institution| {
                let pem = pki.client(institution).expect("client certificate");
                (pem.cert, pem.key)
            })
            .collect();
        let issuer = Arc::new(SigningKey::from_pkcs8_pem(&issuer.private_pem).expect("issuer key"));
        Self { dir, ca: pki.ca, clients, issuer, database }
    }

    /// A client for `addr` as the hospital (0), the pharmacy (1) or a stranger (2).
    pub fn client(&self, addr: SocketAddr, which: usize) -> Client {
        let (cert, key) = &self.clients[which];
        Client::new(addr, &self.ca, cert, key).expect("client")
    }

    /// Mints a token for a card, issued now, valid `ttl_secs`.
    pub fn token(&self, card: &Card, ttl_secs: i64) -> String {
        let request = MintRequest {
            issuer: "CN-110000".into(),
            kid: KID.as_bytes().to_vec(),
            issued_at: now(),
            ttl_secs,
            token_id: None,
            ecard: card.claim(),
        };
        issue::mint(&self.issuer, &request).expect("mint")
    }
}

impl TestGateway {
    /// Sets up a directory and starts a gateway on it, on a port [`restart`](Self::restart)
    /// finds free again ([`crate::listen_addr`]).
    pub async fn start(options: Options) -> Self {
        let setup = Setup::create(&options, "127.0.0.1:0");
        let (addr, admin, live, stop, task) = serve_on(setup.dir.path(), Some(crate::listen_addr())).await;
        Self {
            admin,
            live: Some(live),
            hospital: setup.client(addr, 0),
            pharmacy: setup.client(addr, 1),
            stranger: setup.client(addr, 2),
            dir: setup.dir,
            database: setup.database,
            addr,
            issuer: setup.issuer,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the gateway (draining) and starts it again on the same directory and port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let (addr, admin, live, stop, task) = serve_on(self.dir.path(), Some(self.addr)).await;
        assert_eq!(addr, self.addr);
        self.admin = admin;
        self.live = Some(live);
        self.stop = Some(stop);
        self.task = Some(task);
    }

    /// Rewrites `cardgate.toml` with `edit` and reloads it, as SIGHUP does.
    pub async fn reload_config(&self, edit: impl FnOnce(String) -> String) -> Result<(), Vec<String>> {
        let path = self.dir.path().join("cardgate.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, edit(text)).expect("write config");
        let live = self.live();
        tokio::task::spawn_blocking(move || live.reload(&path, &HashMap::new())).await.expect("reload task")
    }

    /// Stops the gateway and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
        // The gateway goes with it, and its ledger: another process (or a restart) may open it.
        self.live = None;
    }

    /// The gateway and TLS configuration serving now (panics once stopped).
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(self.live.as_ref().expect("the gateway is running"))
    }

    /// Mints a token for a card, issued now, valid `ttl_secs`.
    pub fn token(&self, card: &Card, ttl_secs: i64) -> String {
        self.token_at(card, now(), ttl_secs)
    }

    /// Mints a token issued at `issued_at`.
    pub fn token_at(&self, card: &Card, issued_at: i64, ttl_secs: i64) -> String {
        let request = MintRequest {
            issuer: "CN-110000".into(),
            kid: KID.as_bytes().to_vec(),
            issued_at,
            ttl_secs,
            token_id: None,
            ecard: card.claim(),
        };
        issue::mint(&self.issuer, &request).expect("mint")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type Served = (SocketAddr, SocketAddr, Arc<Live>, oneshot::Sender<()>, JoinHandle<()>);

async fn serve(dir: &Path) -> Served {
    serve_on(dir, None).await
}

/// Serves a setup's gateway in this process on `127.0.0.1:0`: its address and a stop handle.
pub async fn serve_setup(setup: &Setup) -> (SocketAddr, oneshot::Sender<()>) {
    let (addr, _, stop) = serve_setup_with_admin(setup).await;
    (addr, stop)
}

/// [`serve_setup`], with the admin listener's address.
pub async fn serve_setup_with_admin(setup: &Setup) -> (SocketAddr, SocketAddr, oneshot::Sender<()>) {
    let (addr, admin, _, stop, _) = serve(setup.dir.path()).await;
    (addr, admin, stop)
}

async fn serve_on(dir: &Path, addr: Option<SocketAddr>) -> Served {
    let config = Config::load(&dir.join("cardgate.toml"), &HashMap::new()).expect("test config is valid");
    let tls = cardgate::server::tls::server_config(&config.server).expect("TLS config");
    let gateway = Gateway::build(config, Arc::new(SystemClock)).expect("gateway builds");
    cardgate::api::flow::resolve_all(&gateway).await.expect("start-up recovery");
    let live = Live::new(gateway, tls);
    let listener = tokio::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("address")))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = admin_listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_task = tokio::spawn(cardgate::server::admin::run(admin_listener, Arc::clone(&live), None, async move {
        let mut rx = admin_stopped;
        let _ = rx.wait_for(|s| *s).await;
    }));
    let state = Arc::clone(&live);
    let task = tokio::spawn(async move {
        cardgate::server::run(listener, live, async {
            let _ = stopped.await;
        })
        .await;
        let _ = admin_stop.send(true);
        let _ = admin_task.await;
    });
    (addr, admin, state, stop, task)
}

/// The admin token every test gateway's `admin.token` holds.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123456789abcdef";

/// One request to the admin listener (plain HTTP): status and JSON body.
pub async fn admin(addr: SocketAddr, method: Method, path: &str) -> (http::StatusCode, serde_json::Value) {
    let (status, body) = admin_text(addr, method, path).await;
    (status, serde_json::from_str(&body).unwrap_or_default())
}

/// One request to the admin listener: status and text body.
pub async fn admin_text(addr: SocketAddr, method: Method, path: &str) -> (http::StatusCode, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect admin");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        // What the admin listener asks of a request that changes state (no web page can send it).
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("admin answer");
    let status = response.status();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Nanoseconds since the epoch (unique enough for test keys).
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn base64_encode(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

/// A card to mint tokens for.
#[derive(Debug, Clone)]
pub struct Card {
    /// Card id.
    pub id: String,
    /// Insured region.
    pub region: String,
    /// Insurance types.
    pub insurance_types: Vec<String>,
    /// Family delegate (card id, relation).
    pub delegate: Option<(String, String)>,
}

impl Card {
    /// An employee-insured (310) Beijing card with a unique id.
    pub fn beijing() -> Self {
        Self::in_region("110105")
    }

    /// An employee-insured card from `region`, with a unique id.
    pub fn in_region(region: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let serial = NEXT.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id()) * 1000;
        Self {
            id: format!("{region}1990{serial:08}"),
            region: region.into(),
            insurance_types: vec!["310".into()],
            delegate: None,
        }
    }

    fn claim(&self) -> ECardClaim {
        ECardClaim {
            card_id: self.id.clone(),
            holder_name: "测试".into(),
            insured_region: self.region.clone(),
            insurance_types: self.insurance_types.clone(),
            delegate: self.delegate.as_ref().map(|(card_id, relation)| DelegateClaim {
                card_id: card_id.clone(),
                name: None,
                relation: relation.clone(),
            }),
        }
    }
}

/// A pharmacy's bill of one class A line of 200 yuan (terminal `POS-01`), settled by `token`.
pub fn class_a_bill(token: &str) -> serde_json::Value {
    serde_json::json!({
        "token": token, "terminal_id": "POS-01", "total_fen": 20000,
        "lines": [{ "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 1, "unit_price_fen": 20000, "amount_fen": 20000 }]
    })
}

/// An idempotency key no other request of this run uses: `TAG-PID-N`.
pub fn unique_key(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// POSTs a settlement until its answer is final, as a till does: a 503 (the ledger unavailable,
/// a conflict not settled in a few tries: nothing recorded) and a 409 `request_in_progress`
/// are retried with the same key, for up to 60 s. The final answer, and the codes of the 503s
/// met on the way.
pub async fn settle_until_final(client: &Client, key: &str, body: &serde_json::Value) -> (Reply, Vec<String>) {
    let (started, mut unavailable) = (std::time::Instant::now(), Vec::new());
    loop {
        let reply = post(client, "/v1/settlements", Some(key), body).await;
        let in_progress = reply.status == http::StatusCode::CONFLICT && reply.body.contains("request_in_progress");
        if reply.status == http::StatusCode::SERVICE_UNAVAILABLE {
            unavailable.push(reply.json()["code"].as_str().unwrap_or_default().to_owned());
        } else if !in_progress {
            return (reply, unavailable);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{key}: no final answer in 60 s: {}",
            reply.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The answers to one thing sent at once from many places, each awaited: how many were `201
/// Created`. Every other must be a `409` with the problem `code` (`what` names the round in a
/// failure); anything else fails the test.
pub async fn created_else_conflict(
    tasks: Vec<tokio::task::JoinHandle<Reply>>,
    code: &str,
    what: &str,
) -> Vec<serde_json::Value> {
    let mut created = Vec::new();
    for task in tasks {
        let reply = task.await.expect("task");
        match reply.status {
            http::StatusCode::CREATED => created.push(reply.json()),
            http::StatusCode::CONFLICT => assert_eq!(reply.json()["code"], code, "{what}: {}", reply.body),
            other => panic!("{what}: {other}: {}", reply.body),
        }
    }
    created
}

/// POSTs JSON, with an idempotency key when given.
pub async fn post(client: &Client, path: &str, key: Option<&str>, body: &serde_json::Value) -> Reply {
    let headers: Vec<(&str, &str)> = key.map(|k| vec![("idempotency-key", k)]).unwrap_or_default();
    client.send(Method::POST, path, &headers, Some(&body.to_string())).await.expect("request")
}

/// GETs a path.
pub async fn get(client: &Client, path: &str) -> Reply {
    client.send(Method::GET, path, &[], None).await.expect("request")
}
