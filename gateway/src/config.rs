//! Configuration: load (TOML file + `CARDGATE__...` environment overrides) -> validate (every
//! problem with its key path) -> build (certificates, trust list, plugins) at start, so a bad
//! configuration fails before the gateway serves.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cardgate_sdk::InstitutionLevel;
use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTPS listener.
    pub server: ServerConfig,
    /// The admin listener (health, readiness, plugins, reload); loopback only. Absent: none.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Token verification.
    pub tokens: TokenConfig,
    /// The ledger.
    pub ledger: LedgerConfig,
    /// Rate limits and load shedding.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How plugins are loaded and called.
    #[serde(default)]
    pub plugin_runtime: PluginRuntimeConfig,
    /// The payer plugins, by name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// The institutions allowed to connect, by id (the id their client certificate names).
    pub institutions: BTreeMap<String, InstitutionConfig>,
    /// Routing rules: the most specific match wins.
    pub routes: Vec<RouteConfig>,
    /// The bureau's item catalogue, which decides each line's class. Absent: the class each
    /// line asserts is taken as sent.
    #[serde(default)]
    pub catalogue: Option<CatalogueConfig>,
}

/// The bureau's item catalogue (docs/API.md, Catalogue).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueConfig {
    /// The catalogue file (CSV: `code,name,class,self_pay_bp,price_cap_fen,valid_from,
    /// valid_to,restricted`), reloaded with the configuration.
    pub path: PathBuf,
    /// A line whose code is not in the catalogue (on the day of the bill).
    #[serde(default = "defaults::not_in_catalogue")]
    pub not_in_catalogue: LinePolicy,
    /// A line whose asserted class is not the catalogue's.
    #[serde(default = "defaults::class_mismatch")]
    pub class_mismatch: LinePolicy,
}

/// What a line the catalogue disagrees with gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinePolicy {
    /// The bill is refused (`422`, the line named).
    Refuse,
    /// The line takes the catalogue's class (class C, not covered, for a code not in it), and
    /// the answer says so on the line.
    Reclassify,
}

/// The HTTPS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub certificate: PathBuf,
    /// Server private key (PEM).
    pub private_key: PathBuf,
    /// CA that issues institutions' client certificates (PEM).
    pub client_ca: PathBuf,
    /// TLS handshake timeout, milliseconds.
    #[serde(default = "defaults::handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Time allowed to receive a request's headers, milliseconds.
    #[serde(default = "defaults::header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// Time allowed to receive a request's body, milliseconds.
    #[serde(default = "defaults::body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long, milliseconds.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Largest accepted request body, bytes.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// In-flight requests are given this long to finish at shutdown, milliseconds.
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

/// The admin listener: plain HTTP on a loopback address, or mutual TLS with admin client
/// certificates (required for any other address).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Admin server certificate chain (PEM); with `private_key` and `client_ca`, the listener
    /// speaks mutual TLS.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// Admin server private key (PEM).
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    /// CA of the operators' admin client certificates (PEM).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// A file (mode 0600, at least 32 characters) holding the bearer token every request under
    /// `/admin/` must carry (`Authorization: Bearer ...`). Any local user can connect to a
    /// loopback port, so without it the plain listener serves health, readiness and metrics
    /// only; over mutual TLS the certificate suffices, and a token, when given, is required too.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` at load.
    #[serde(skip)]
    pub token: Option<String>,
}

impl AdminConfig {
    /// The TLS files, when all three are given.
    pub fn tls(&self) -> Option<(&Path, &Path, &Path)> {
        Some((self.certificate.as_deref()?, self.private_key.as_deref()?, self.client_ca.as_deref()?))
    }

    /// A plain listener without a token: it serves health, readiness and metrics, and refuses
    /// everything under `/admin/` (the daemon and `check-config` warn).
    pub fn refuses_admin_paths(&self) -> bool {
        self.tls().is_none() && self.token.is_none()
    }
}

/// Token verification.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Trust list (JSON, see docs/TOKEN.md).
    pub trust_list: PathBuf,
    /// Revocation list (JSON), optional.
    #[serde(default)]
    pub revocations: Option<PathBuf>,
    /// Clock skew tolerated, seconds.
    #[serde(default = "defaults::clock_skew_secs")]
    pub clock_skew_secs: i64,
    /// Longest e-card token lifetime, seconds.
    #[serde(default = "defaults::max_lifetime_secs")]
    pub max_lifetime_secs: i64,
    /// How long a quote can be settled by its `quote_id`, seconds.
    #[serde(default = "defaults::quote_validity_secs")]
    pub quote_validity_secs: i64,
    /// At which moment an issuer key's validity is judged: `verification` (the default) or
    /// `issue` (the token's `iat`).
    #[serde(default)]
    pub key_validity: crate::token::KeyValidity,
    /// The most Ed25519 signatures checked together under load (1 to 1,024; 1: each alone).
    #[serde(default = "defaults::signature_batch_max")]
    pub signature_batch_max: usize,
    /// The longest a request waits for others to join its signature batch, microseconds
    /// (0 to 10,000). A request that finds the gateway idle never waits.
    #[serde(default = "defaults::signature_batch_wait_us")]
    pub signature_batch_wait_us: u64,
}

impl TokenConfig {
    /// How Ed25519 signatures are batched.
    pub fn signature_batch(&self) -> crate::token::batch::BatchSettings {
        crate::token::batch::BatchSettings {
            max: self.signature_batch_max,
            wait: std::time::Duration::from_micros(self.signature_batch_wait_us),
        }
    }
}

/// The ledger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// `embedded` (the default: the ledger in `path`, one node) or `postgres` (several nodes
    /// sharing one PostgreSQL database, set in `[ledger.postgres]`: docs/OPERATIONS.md).
    #[serde(default)]
    pub backend: LedgerBackend,
    /// The cluster's database, for `backend = "postgres"`.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// Where the embedded ledger lives: a directory (the log-structured engine) or an SQLite
    /// file. Required for the embedded backend.
    #[serde(default)]
    pub path: PathBuf,
    /// The storage engine: `sqlite` (one file), `lsm` (a directory: a log-structured engine
    /// sharded by card, for machines with many cores: docs/decisions/0001), or `auto` (the
    /// default): `lsm` when `path` is an existing directory, `sqlite` otherwise.
    #[serde(default)]
    pub engine: LedgerEngine,
    /// For the log-structured engine: how many shards (each its own journal and writer) a
    /// new ledger spreads cards over. Fixed when the ledger is created (an existing ledger
    /// keeps its count). Default: half the machine's cores, 1 to 8 (docs/BENCHMARKS.md: each
    /// shard adds a writer's ceiling on many cores and costs some CPU on few).
    #[serde(default = "defaults::ledger_shards")]
    pub shards: usize,
    /// Secret (64 hex characters) keying the hash under which card ids are stored and the
    /// encryption of stored requests, quotes and receipts. Keep it secret and stable: changing
    /// it orphans history. Better given as `secret_file` or the `CARDGATE__LEDGER__SECRET`
    /// environment variable than written here.
    #[serde(default)]
    pub secret: String,
    /// A file (mode 0600) holding the secret, instead of `secret`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

/// Where the ledger is kept ([`LedgerConfig::backend`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerBackend {
    /// In `ledger.path`, on this node.
    #[default]
    Embedded,
    /// A PostgreSQL database shared by every node of a cluster.
    Postgres,
}

/// The cluster's PostgreSQL database (`[ledger.postgres]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/database` (or the key=value form), without a password:
    /// the password comes from `password_file` or `CARDGATE__LEDGER__POSTGRES__PASSWORD`.
    pub url: String,
    /// A file (mode 0600) holding the database password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The password, from the environment (`CARDGATE__LEDGER__POSTGRES__PASSWORD`); refused
    /// in the configuration file.
    #[serde(default)]
    pub password: String,
    /// Connections this node keeps to the database at most.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// Longest a statement may run on the server, and longest a request waits for a free
    /// connection, milliseconds: past it the request is answered 503 `storage_unavailable`.
    #[serde(default = "defaults::statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Longest a new connection may take, milliseconds.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long a node holds a settlement it is completing (its payers being asked), seconds:
    /// another node takes over a `pending` settlement only after its lease ran out. Must be
    /// longer than the longest chain of payers can take (every plugin's timeout, plus ten
    /// seconds).
    #[serde(default = "defaults::lease_secs")]
    pub lease_secs: i64,
}

/// The ledger's storage engine ([`LedgerConfig::engine`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerEngine {
    /// `lsm` for an existing directory at the path, `sqlite` otherwise.
    #[default]
    Auto,
    /// The log-structured engine (a directory).
    Lsm,
    /// SQLite (a file).
    Sqlite,
}

/// Rate limits (token buckets) by scope, and the in-flight limit. An absent scope is
/// unlimited.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The whole gateway.
    #[serde(default)]
    pub global: Option<RateConfig>,
    /// Each institution.
    #[serde(default)]
    pub institution: Option<RateConfig>,
    /// Each terminal of each institution.
    #[serde(default)]
    pub terminal: Option<RateConfig>,
    /// Each card (velocity: how often one card may be used).
    #[serde(default)]
    pub card: Option<RateConfig>,
    /// Requests in flight past which the gateway answers 503 at once.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Requests of one institution in flight at once, counted from the moment its request's
    /// head arrives (before its body); past it, its requests are shed with 503 while others'
    /// pass. Default: a quarter of `max_in_flight`.
    #[serde(default)]
    pub institution_max_in_flight: Option<usize>,
    /// Keep the institution, terminal and card buckets in Redis, shared by every node of a
    /// cluster (a client spread over three nodes gets its quota once, not three times). The
    /// global limit and the in-flight limits stay each node's own.
    #[serde(default)]
    pub shared: Option<SharedLimitsConfig>,
}

/// Where the cluster's shared rate limits live (`[limits.shared]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedLimitsConfig {
    /// `redis://host:port/db` (`redis://:password@host/...`, or from the environment:
    /// `CARDGATE__LIMITS__SHARED__URL`).
    pub url: String,
    /// Longest a check waits for Redis, milliseconds: past it the node's own limits decide,
    /// and Redis is left alone for a second.
    #[serde(default = "defaults::shared_timeout_ms")]
    pub timeout_ms: u64,
    /// Prefix of the keys (`PREFIX:limit:SCOPE:KEY`): several clusters on one Redis.
    #[serde(default = "defaults::shared_prefix")]
    pub key_prefix: String,
}

impl LimitsConfig {
    /// One institution's share of the in-flight slots.
    pub fn institution_in_flight(&self) -> usize {
        self.institution_max_in_flight.unwrap_or(self.max_in_flight / 4).max(1)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            global: None,
            institution: None,
            terminal: None,
            card: None,
            max_in_flight: defaults::max_in_flight(),
            institution_max_in_flight: None,
            shared: None,
        }
    }
}

/// A token bucket: a sustained rate (per second or per minute) and a burst.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Requests per second.
    #[serde(default)]
    pub per_second: Option<u32>,
    /// Requests per minute (instead of `per_second`).
    #[serde(default)]
    pub per_minute: Option<u32>,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

/// How plugins are loaded and called.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRuntimeConfig {
    /// Directory for content-addressed copies of plugin libraries.
    #[serde(default = "defaults::plugin_cache_dir")]
    pub cache_dir: PathBuf,
    /// Threads in the plugin call pool (0: 4 per core).
    #[serde(default)]
    pub pool_threads: usize,
    /// Calls that may wait for a pool thread.
    #[serde(default = "defaults::pool_queue")]
    pub pool_queue: usize,
    /// Trusted plugin signers (JSON, see docs/PLUGINS.md). Every library must carry a manifest
    /// signed by one of them.
    #[serde(default)]
    pub signers: Option<PathBuf>,
    /// Load unsigned libraries (development only). Without `signers`, this must be `true`.
    #[serde(default)]
    pub allow_unsigned: bool,
    /// The `cardgate` binary that runs process-tier plugins [default: this executable].
    #[serde(default)]
    pub host_binary: Option<PathBuf>,
}

impl Default for PluginRuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: defaults::plugin_cache_dir(),
            pool_threads: 0,
            pool_queue: defaults::pool_queue(),
            signers: None,
            allow_unsigned: false,
            host_binary: None,
        }
    }
}

/// One payer plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The plugin library (`.so`).
    pub library: PathBuf,
    /// Per-call timeout, milliseconds.
    #[serde(default = "defaults::plugin_timeout_ms")]
    pub timeout_ms: u64,
    /// `pool` (default) or `inline` (vetted, fast plugins; see docs/BENCHMARKS.md).
    #[serde(default)]
    pub dispatch: DispatchConfig,
    /// `in_process` (default: fastest, for vetted plugins) or `process` (a child process per
    /// plugin: survives aborts, segfaults and infinite loops).
    #[serde(default)]
    pub isolation: IsolationConfig,
    /// Calls in flight at once; more fail at once with `plugin_unavailable`.
    #[serde(default = "defaults::max_concurrency")]
    pub max_concurrency: usize,
    /// Consecutive failures (timeouts, panics, unavailable) that open the circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker refuses calls before letting one probe through, milliseconds.
    #[serde(default = "defaults::breaker_open_ms")]
    pub breaker_open_ms: u64,
    /// Process tier: the child's memory limit (its data segment), MiB; 0: none. A plugin
    /// that leaks dies inside its own process and is restarted, the gateway unaffected.
    #[serde(default = "defaults::memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// The plugin name a signed manifest must carry (and the library declare) when signers
    /// are configured; default: this section's name. A manifest signed for another plugin
    /// never loads in this one's place.
    #[serde(default)]
    pub declared_name: Option<String>,
    /// The plugin's own configuration section, handed to it as JSON.
    #[serde(default = "defaults::empty_table")]
    pub config: serde_json::Value,
}

/// Where a plugin runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationConfig {
    /// In the gateway's process.
    #[default]
    InProcess,
    /// In a child `cardgate plugin-host`.
    Process,
}

/// How a plugin is called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchConfig {
    /// On the bounded pool, under the timeout.
    #[default]
    Pool,
    /// On the request's own thread.
    Inline,
}

/// One institution.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstitutionConfig {
    /// Readable name.
    pub name: String,
    /// Grade.
    pub level: InstitutionLevel,
    /// Treatment region: 6-digit administrative division code.
    pub region: String,
}

/// One routing rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Insured-region prefixes (2 digits: province, 4: city, 6: county); the longest matching
    /// prefix wins.
    pub regions: Vec<String>,
    /// Insurance types the rule applies to; empty: any.
    #[serde(default)]
    pub insurance_types: Vec<String>,
    /// Institutions the rule applies to; empty: any.
    #[serde(default)]
    pub institutions: Vec<String>,
    /// `true`: only cards insured outside the treatment region; `false`: only local cards;
    /// absent: both.
    #[serde(default)]
    pub cross_region: Option<bool>,
    /// The payer chain, in order.
    pub payers: Vec<String>,
}

/// The longest path a Unix socket may have (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Every section of a configuration that does not deserialize, each on its own, with its key
/// path: sections, then each plugin, institution and route; and unknown top-level keys.
fn every_problem(built: &config::Config) -> Vec<String> {
    use serde::de::DeserializeOwned;
    fn section<T: DeserializeOwned>(built: &config::Config, key: &str, required: bool, problems: &mut Vec<String>) {
        match built.get::<T>(key) {
            Ok(_) => {}
            Err(config::ConfigError::NotFound(_)) if !required => {}
            Err(config::ConfigError::NotFound(_)) => problems.push(format!("{key}: missing")),
            Err(e) => problems.push(match culprit::<T>(built, key) {
                Some(field) => format!("{key}.{field}: {}", plain(&e)),
                None => format!("{key}: {}", plain(&e)),
            }),
        }
    }
    /// The field of a section whose value is what fails (a wrong type names no key): the one
    /// without which the section deserializes, or fails only for lacking it.
    fn culprit<T: DeserializeOwned>(built: &config::Config, key: &str) -> Option<String> {
        let table = built.get::<HashMap<String, config::Value>>(key).ok()?;
        let mut fields: Vec<&String> = table.keys().collect();
        fields.sort();
        fields
            .into_iter()
            .find(|field| {
                let mut without = table.clone();
                without.remove(*field);
                match config::Value::new(None, config::ValueKind::Table(without)).try_deserialize::<T>() {
                    Ok(_) => true,
                    Err(e) => e.to_string().contains(&format!("missing field `{field}`")),
                }
            })
            .cloned()
    }
    /// A deserializer's message without the config crate's trailing "for key ... in FILE".
    fn plain(e: &config::ConfigError) -> String {
        let text = e.to_string();
        text.split(" for key `").next().unwrap_or(&text).to_owned()
    }
    let mut problems = Vec::new();
    let top: HashMap<String, config::Value> = built.clone().try_deserialize().unwrap_or_default();
    const KNOWN: [&str; 10] = [
        "server",
        "admin",
        "tokens",
        "ledger",
        "limits",
        "plugin_runtime",
        "plugins",
        "institutions",
        "routes",
        "catalogue",
    ];
    let mut unknown: Vec<&String> = top.keys().filter(|k| !KNOWN.contains(&k.as_str())).collect();
    unknown.sort();
    problems.extend(unknown.into_iter().map(|k| format!("{k}: unknown section (known: {})", KNOWN.join(", "))));
    section::<ServerConfig>(built, "server", true, &mut problems);
    section::<AdminConfig>(built, "admin", false, &mut problems);
    section::<TokenConfig>(built, "tokens", true, &mut problems);
    section::<LedgerConfig>(built, "ledger", true, &mut problems);
    section::<LimitsConfig>(built, "limits", false, &mut problems);
    section::<PluginRuntimeConfig>(built, "plugin_runtime", false, &mut problems);
    section::<CatalogueConfig>(built, "catalogue", false, &mut problems);
    for (map, required) in [("plugins", true), ("institutions", true)] {
        match built.get::<HashMap<String, config::Value>>(map) {
            Ok(entries) => {
                let mut names: Vec<&String> = entries.keys().collect();
                names.sort();
                for name in names {
                    let key = format!("{map}.{name}");
                    if map == "plugins" {
                        section::<PluginConfig>(built, &key, true, &mut problems);
                    } else {
                        section::<InstitutionConfig>(built, &key, true, &mut problems);
                    }
                }
            }
            Err(config::ConfigError::NotFound(_)) if required => problems.push(format!("{map}: missing")),
            Err(config::ConfigError::NotFound(_)) => {}
            Err(e) => problems.push(format!("{map}: {e}")),
        }
    }
    match built.get::<Vec<config::Value>>("routes") {
        Ok(routes) => {
            for (i, route) in routes.into_iter().enumerate() {
                if let Err(e) = route.try_deserialize::<RouteConfig>() {
                    problems.push(format!("routes[{i}]: {}", plain(&e)));
                }
            }
        }
        Err(config::ConfigError::NotFound(_)) => problems.push("routes: missing".to_owned()),
        Err(e) => problems.push(format!("routes: {e}")),
    }
    problems
}

mod defaults {
    use std::path::PathBuf;

    pub(super) fn shared_timeout_ms() -> u64 {
        50
    }
    pub(super) fn shared_prefix() -> String {
        "cardgate".into()
    }

    pub(super) fn pool_size() -> usize {
        16
    }
    pub(super) fn statement_timeout_ms() -> u64 {
        5_000
    }
    pub(super) fn connect_timeout_ms() -> u64 {
        3_000
    }
    pub(super) fn lease_secs() -> i64 {
        60
    }

    pub(super) fn ledger_shards() -> usize {
        (std::thread::available_parallelism().map_or(1, std::num::NonZero::get) / 2).clamp(1, 8)
    }

    pub(super) fn handshake_timeout_ms() -> u64 {
        5_000
    }
    pub(super) fn header_timeout_ms() -> u64 {
        5_000
    }
    pub(super) fn body_timeout_ms() -> u64 {
        10_000
    }
    pub(super) fn idle_timeout_ms() -> u64 {
        60_000
    }
    pub(super) fn max_body_bytes() -> usize {
        256 * 1024
    }
    pub(super) fn shutdown_grace_ms() -> u64 {
        10_000
    }
    pub(super) fn clock_skew_secs() -> i64 {
        60
    }
    pub(super) fn max_lifetime_secs() -> i64 {
        600
    }
    pub(super) fn quote_validity_secs() -> i64 {
        1_800
    }
    pub(super) fn signature_batch_max() -> usize {
        64
    }
    pub(super) fn signature_batch_wait_us() -> u64 {
        1_000
    }
    pub(super) fn plugin_cache_dir() -> PathBuf {
        PathBuf::from("plugin-cache")
    }
    pub(super) fn pool_queue() -> usize {
        1_024
    }
    pub(super) fn plugin_timeout_ms() -> u64 {
        2_000
    }
    pub(super) fn max_in_flight() -> usize {
        4_096
    }
    pub(super) fn memory_limit_mb() -> u64 {
        1_024
    }
    pub(super) fn max_concurrency() -> usize {
        256
    }
    pub(super) fn not_in_catalogue() -> super::LinePolicy {
        super::LinePolicy::Reclassify
    }

    pub(super) fn class_mismatch() -> super::LinePolicy {
        super::LinePolicy::Reclassify
    }

    pub(super) fn breaker_failures() -> u32 {
        5
    }
    pub(super) fn breaker_open_ms() -> u64 {
        5_000
    }
    pub(super) fn empty_table() -> serde_json::Value {
        serde_json::Value::Object(Default::default())
    }
}

/// A configuration that could not be loaded or is not valid: every problem, with its key path.
#[derive(Debug, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl Config {
    /// Loads `path` with overrides from `env` (`CARDGATE__SERVER__LISTEN=...`), then validates.
    /// Relative paths in the file are relative to the file's directory.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let one = |p: String| ConfigError { problems: vec![p] };
        let overrides: HashMap<String, String> =
            env.iter().filter(|(k, _)| k.starts_with("CARDGATE__")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("CARDGATE")
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(overrides)),
            )
            .build()
            .map_err(|e| one(format!("{}: {e}", path.display())))?;
        let mut config: Config = match built.clone().try_deserialize() {
            Ok(config) => config,
            Err(first) => {
                // Deserializing stops at the first mistake: look at each section (and each
                // plugin, institution and route) on its own to report every one at once.
                let mut problems = every_problem(&built);
                if problems.is_empty() {
                    problems.push(first.to_string());
                }
                return Err(ConfigError { problems });
            }
        };
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.read_secret_file()?;
        config.read_password_file(path)?;
        config.read_admin_token()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `ledger.secret_file` into `ledger.secret`.
    fn read_secret_file(&mut self) -> Result<(), ConfigError> {
        let Some(file) = &self.ledger.secret_file else { return Ok(()) };
        let one = |p: String| ConfigError { problems: vec![p] };
        if !self.ledger.secret.is_empty() {
            return Err(one("ledger: give `secret` or `secret_file`, not both".into()));
        }
        let text =
            std::fs::read_to_string(file).map_err(|e| one(format!("ledger.secret_file: {}: {e}", file.display())))?;
        self.ledger.secret = text.trim().to_owned();
        Ok(())
    }

    /// Reads `admin.token_file` into `admin.token`. Refused: a file anyone but its owner may
    /// read (whoever reads it is an operator), a token under 32 characters or one that is not
    /// printable ASCII without spaces (it travels in a header).
    fn read_admin_token(&mut self) -> Result<(), ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let Some(admin) = &mut self.admin else { return Ok(()) };
        let Some(file) = &admin.token_file else { return Ok(()) };
        let one = |p: String| ConfigError { problems: vec![p] };
        let shown = file.display();
        let mode =
            std::fs::metadata(file).map_err(|e| one(format!("admin.token_file: {shown}: {e}")))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(one(format!(
                "admin.token_file: {shown} is mode {:04o}; run chmod 600 on it (whoever reads it can use the admin listener)",
                mode & 0o7777
            )));
        }
        let text = std::fs::read_to_string(file).map_err(|e| one(format!("admin.token_file: {shown}: {e}")))?;
        let token = text.trim();
        if token.len() < 32 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(one(format!(
                "admin.token_file: {shown}: at least 32 printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)"
            )));
        }
        admin.token = Some(token.to_owned());
        Ok(())
    }

    /// Reads `ledger.postgres.password_file` into `password`; refuses a password written in
    /// the configuration file or in the URL (they belong in a private file or the environment).
    fn read_password_file(&mut self, config_path: &Path) -> Result<(), ConfigError> {
        let Some(pg) = &mut self.ledger.postgres else { return Ok(()) };
        let one = |p: String| ConfigError { problems: vec![p] };
        let in_file = std::fs::read_to_string(config_path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .is_some_and(|t| t.get("ledger").and_then(|l| l.get("postgres")).and_then(|p| p.get("password")).is_some());
        if in_file {
            return Err(one(
                "ledger.postgres.password: not in the configuration file; use password_file or CARDGATE__LEDGER__POSTGRES__PASSWORD"
                    .into(),
            ));
        }
        if let Some(file) = &pg.password_file {
            if !pg.password.is_empty() {
                return Err(
                    one("ledger.postgres: give `password_file` or the environment's password, not both".into()),
                );
            }
            let text = std::fs::read_to_string(file)
                .map_err(|e| one(format!("ledger.postgres.password_file: {}: {e}", file.display())))?;
            pg.password = text.trim_end_matches(['\n', '\r']).to_owned();
        }
        Ok(())
    }

    /// Files holding secrets or card data that users other than the owner can read (or, for
    /// the directories, write): each with what to do. The daemon and `check-config` warn.
    pub fn exposed_files(&self, config_path: &Path) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).ok().map(|m| m.permissions().mode());
        let mut found = Vec::new();
        let mut private = |key: &str, path: &Path| {
            if let Some(m) = mode(path).filter(|m| m & 0o077 != 0) {
                found.push(format!("{key}: {} is mode {:04o}; run chmod 600 on it", path.display(), m & 0o7777));
            }
        };
        private("server.private_key", &self.server.private_key);
        if let Some(key) = self.admin.as_ref().and_then(|a| a.private_key.as_ref()) {
            private("admin.private_key", key);
        }
        if let Some(file) = &self.ledger.secret_file {
            private("ledger.secret_file", file);
        } else if std::fs::read_to_string(config_path)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .is_some_and(|t| t.get("ledger").and_then(|l| l.get("secret")).is_some())
        {
            private("ledger.secret (in the configuration file)", config_path);
        }
        if let Some(file) = self.ledger.postgres.as_ref().and_then(|p| p.password_file.as_ref()) {
            private("ledger.postgres.password_file", file);
        }
        if self.ledger.backend == LedgerBackend::Postgres {
            return found;
        }
        if self.ledger.path.is_dir() {
            // The log-structured ledger: its directory and every file in it.
            private("ledger.path", &self.ledger.path);
            for entry in std::fs::read_dir(&self.ledger.path).into_iter().flatten().flatten() {
                private("ledger.path", &entry.path());
            }
        } else {
            for suffix in ["", "-wal", "-shm"] {
                let mut name = self.ledger.path.clone().into_os_string();
                name.push(suffix);
                private("ledger.path", Path::new(&name));
            }
        }
        if let Some(dir) = self.ledger.path.parent()
            && let Some(m) = mode(dir).filter(|m| m & 0o022 != 0)
        {
            found.push(format!(
                "ledger.path: its directory {} is mode {:04o}: others can replace the ledger; run chmod 700 on it",
                dir.display(),
                m & 0o7777
            ));
        }
        found
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.server.certificate);
        resolve(&mut self.server.private_key);
        resolve(&mut self.server.client_ca);
        resolve(&mut self.tokens.trust_list);
        if let Some(p) = &mut self.tokens.revocations {
            resolve(p);
        }
        if !self.ledger.path.as_os_str().is_empty() {
            resolve(&mut self.ledger.path);
        }
        if let Some(p) = self.ledger.postgres.as_mut().and_then(|pg| pg.password_file.as_mut()) {
            resolve(p);
        }
        if let Some(p) = &mut self.ledger.secret_file {
            resolve(p);
        }
        resolve(&mut self.plugin_runtime.cache_dir);
        if let Some(catalogue) = &mut self.catalogue {
            resolve(&mut catalogue.path);
        }
        if let Some(p) = &mut self.plugin_runtime.signers {
            resolve(p);
        }
        if let Some(admin) = &mut self.admin {
            for p in [&mut admin.certificate, &mut admin.private_key, &mut admin.client_ca, &mut admin.token_file]
                .into_iter()
                .flatten()
            {
                resolve(p);
            }
        }
        for plugin in self.plugins.values_mut() {
            resolve(&mut plugin.library);
        }
    }

    /// Checks everything that can be checked without opening files; reports every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        let s = &self.server;
        for (key, value) in [
            ("handshake_timeout_ms", s.handshake_timeout_ms),
            ("header_timeout_ms", s.header_timeout_ms),
            ("body_timeout_ms", s.body_timeout_ms),
            ("idle_timeout_ms", s.idle_timeout_ms),
        ] {
            check(value > 0, format!("server.{key}: must be positive"));
        }
        check(s.max_body_bytes >= 1024, "server.max_body_bytes: must be at least 1024".into());
        let t = &self.tokens;
        check(t.clock_skew_secs >= 0, "tokens.clock_skew_secs: must not be negative".into());
        check(t.max_lifetime_secs > 0, "tokens.max_lifetime_secs: must be positive".into());
        check(t.quote_validity_secs > 0, "tokens.quote_validity_secs: must be positive".into());
        check((1..=1024).contains(&t.signature_batch_max), "tokens.signature_batch_max: 1 to 1024".into());
        check(t.signature_batch_wait_us <= 10_000, "tokens.signature_batch_wait_us: 0 to 10000".into());
        check((1..=64).contains(&self.ledger.shards), "ledger.shards: 1 to 64".into());
        match (self.ledger.backend, &self.ledger.postgres) {
            (LedgerBackend::Embedded, _) => {
                check(
                    !self.ledger.path.as_os_str().is_empty(),
                    "ledger.path: required (or backend = \"postgres\")".into(),
                );
            }
            (LedgerBackend::Postgres, None) => {
                check(false, "ledger.postgres: required with backend = \"postgres\" (at least its `url`)".into());
            }
            (LedgerBackend::Postgres, Some(pg)) => {
                let chain_secs = self.plugins.values().map(|p| p.timeout_ms).sum::<u64>() / 1000 + 10;
                check(
                    pg.url.parse::<tokio_postgres::Config>().is_ok(),
                    "ledger.postgres.url: not a PostgreSQL connection string (postgres://user@host:port/database)"
                        .into(),
                );
                check(
                    pg.url.parse::<tokio_postgres::Config>().map_or(true, |c| c.get_password().is_none()),
                    "ledger.postgres.url: no password in the URL; use password_file or CARDGATE__LEDGER__POSTGRES__PASSWORD"
                        .into(),
                );
                check((1..=1000).contains(&pg.pool_size), "ledger.postgres.pool_size: 1 to 1000".into());
                check(pg.statement_timeout_ms >= 100, "ledger.postgres.statement_timeout_ms: at least 100".into());
                check(pg.connect_timeout_ms >= 100, "ledger.postgres.connect_timeout_ms: at least 100".into());
                check(
                    u64::try_from(pg.lease_secs).is_ok_and(|lease| lease > chain_secs),
                    format!(
                        "ledger.postgres.lease_secs: must be longer than the longest chain of payers ({chain_secs} s: every plugin's timeout and ten seconds)"
                    ),
                );
            }
        }
        check(
            self.ledger.secret.len() == 64 && self.ledger.secret.bytes().all(|b| b.is_ascii_hexdigit()),
            "ledger.secret: must be 64 hex characters (from `secret`, `secret_file` or CARDGATE__LEDGER__SECRET)"
                .into(),
        );
        let l = &self.limits;
        for (scope, rate) in
            [("global", &l.global), ("institution", &l.institution), ("terminal", &l.terminal), ("card", &l.card)]
        {
            if let Some(rate) = rate {
                let one = matches!((rate.per_second, rate.per_minute), (Some(n), None) | (None, Some(n)) if n > 0);
                check(one, format!("limits.{scope}: give exactly one positive per_second or per_minute"));
                check(rate.burst > 0, format!("limits.{scope}.burst: must be positive"));
            }
        }
        check(l.max_in_flight > 0, "limits.max_in_flight: must be positive".into());
        if let Some(shared) = &l.shared {
            check(
                redis::Client::open(shared.url.as_str()).is_ok(),
                "limits.shared.url: not a Redis URL (redis://host:port/db)".into(),
            );
            check((1..=10_000).contains(&shared.timeout_ms), "limits.shared.timeout_ms: 1 to 10000".into());
            check(
                !shared.key_prefix.is_empty() && !shared.key_prefix.contains(char::is_whitespace),
                "limits.shared.key_prefix: a word without spaces".into(),
            );
        }
        check(l.institution_max_in_flight != Some(0), "limits.institution_max_in_flight: must be positive".into());
        if let Some(admin) = &self.admin {
            let files =
                [&admin.certificate, &admin.private_key, &admin.client_ca].iter().filter(|f| f.is_some()).count();
            check(files == 0 || files == 3, "admin: give certificate, private_key and client_ca together".into());
            check(
                admin.listen.ip().is_loopback() || files == 3,
                "admin.listen: a non-loopback address needs mutual TLS (certificate, private_key, client_ca)".into(),
            );
        }
        let runtime = &self.plugin_runtime;
        check(
            runtime.signers.is_some() || runtime.allow_unsigned,
            "plugin_runtime.signers: required, unless allow_unsigned = true (development only)".into(),
        );
        check(
            !(runtime.signers.is_some() && runtime.allow_unsigned),
            "plugin_runtime.allow_unsigned: true together with signers: every library must be signed when signers \
             are given; remove one of the two"
                .into(),
        );
        for (name, plugin) in &self.plugins {
            // A process-tier plugin talks over a Unix socket in the cache directory's `run/`,
            // named `<plugin>-<up to 20 digits>.sock`; a socket path has at most 107 bytes.
            if plugin.isolation == IsolationConfig::Process {
                let longest = runtime.cache_dir.join("run").join(format!("{name}-{}.sock", u64::MAX));
                let bytes = longest.as_os_str().len();
                check(
                    bytes <= MAX_SOCKET_PATH,
                    format!(
                        "plugins.{name}: the process tier's socket would be {} ({bytes} bytes), longer than the \
                         {MAX_SOCKET_PATH} bytes a Unix socket path may have: use a shorter plugin_runtime.cache_dir \
                         or plugin name",
                        longest.display()
                    ),
                );
            }
            check(plugin.timeout_ms > 0, format!("plugins.{name}.timeout_ms: must be positive"));
            check(plugin.max_concurrency > 0, format!("plugins.{name}.max_concurrency: must be positive"));
            check(plugin.breaker_failures > 0, format!("plugins.{name}.breaker_failures: must be positive"));
            check(plugin.config.is_object(), format!("plugins.{name}.config: must be a table"));
        }
        for (id, institution) in &self.institutions {
            check(is_region(&institution.region, &[6]), format!("institutions.{id}.region: must be 6 digits"));
        }
        check(!self.routes.is_empty(), "routes: at least one route is required".into());
        for (i, route) in self.routes.iter().enumerate() {
            check(!route.regions.is_empty(), format!("routes[{i}].regions: at least one prefix is required"));
            for region in &route.regions {
                check(
                    is_region(region, &[2, 4, 6]),
                    format!("routes[{i}].regions: `{region}` is not 2, 4 or 6 digits"),
                );
            }
            check(!route.payers.is_empty(), format!("routes[{i}].payers: at least one payer is required"));
            for payer in &route.payers {
                check(self.plugins.contains_key(payer), format!("routes[{i}].payers: no plugin named `{payer}`"));
            }
            for institution in &route.institutions {
                check(
                    self.institutions.contains_key(institution),
                    format!("routes[{i}].institutions: no institution `{institution}`"),
                );
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigError { problems }) }
    }

    /// The ledger secret as bytes (validated as 64 hex characters).
    pub fn ledger_secret(&self) -> Vec<u8> {
        let s = &self.ledger.secret;
        (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
    }
}

fn is_region(code: &str, lengths: &[usize]) -> bool {
    lengths.contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cardgate.toml");
        let config = Config::load(&path, &HashMap::new()).expect("examples/cardgate.toml is valid");
        assert_eq!(config.routes.len(), 3);
        assert_eq!(config.plugins["basic-medical"].config["schemes"]["310"]["deductible_fen"], 80000);
    }

    #[test]
    fn environment_overrides_the_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cardgate.toml");
        let env = HashMap::from([("CARDGATE__SERVER__LISTEN".to_owned(), "127.0.0.1:9999".to_owned())]);
        assert_eq!(Config::load(&path, &env).expect("valid").server.listen.port(), 9999);
    }

    #[test]
    fn the_key_validity_policy_is_read_from_the_file_and_the_environment() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cardgate.toml");
        let config = Config::load(&path, &HashMap::new()).expect("valid");
        assert_eq!(config.tokens.key_validity, crate::token::KeyValidity::Verification);
        let env = HashMap::from([("CARDGATE__TOKENS__KEY_VALIDITY".to_owned(), "issue".to_owned())]);
        assert_eq!(Config::load(&path, &env).expect("valid").tokens.key_validity, crate::token::KeyValidity::Issue);
        let env = HashMap::from([("CARDGATE__TOKENS__KEY_VALIDITY".to_owned(), "whenever".to_owned())]);
        let problems = Config::load(&path, &env).expect_err("unknown policy").problems;
        assert!(problems.iter().any(|p| p.contains("key_validity") || p.contains("whenever")), "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cardgate.toml");
        let mut config = Config::load(&path, &HashMap::new()).expect("valid");
        config.ledger.secret = "short".into();
        config.tokens.signature_batch_max = 0;
        config.routes[0].payers.push("nobody".into());
        config.institutions.get_mut("H110105001").expect("institution").region = "11".into();
        config.admin = Some(AdminConfig {
            listen: "0.0.0.0:9180".parse().expect("address"),
            certificate: None,
            private_key: None,
            client_ca: None,
            token_file: None,
            token: None,
        });
        let problems = config.validate().expect_err("invalid").problems;
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with("admin.listen: a non-loopback address needs mutual TLS")));
        for key in ["ledger.secret", "tokens.signature_batch_max", "routes[0].payers", "institutions.H110105001.region"]
        {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
        }
    }
}
