//! The gateway's shared state, built from a validated configuration: the token verifier, the
//! router, the loaded plugins, the ledger and the clock. Built once at start (plugins are
//! loaded and initialised, files read), so a bad file fails before serving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::config::{Config, ConfigError, DispatchConfig, InstitutionConfig, IsolationConfig};
use crate::ledger::{CardKey, Ledger};
use crate::limit::Limiter;
use cardgate_sdk::{Health, HealthStatus, Operation};

use crate::plugin::loader::sha256_hex;
use crate::plugin::process::{HostCommand, ProcessPlugin};
use crate::plugin::signing::SignerTrust;
use crate::plugin::{Breaker, Dispatch, LoadOptions, PluginHandle, PluginPool, PoolOptions, load};
use crate::route::Router;
use crate::token::{MemoryReplayStore, Profile, RevocationList, TrustList, Verifier, VerifyOptions};

/// Time, injectable so tests control it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds since the epoch.
    fn now(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
    }
}

/// Everything a request needs. Shared by all connections through an `Arc`; lives until the
/// server stops.
#[derive(Debug)]
pub struct Gateway {
    /// The configuration it was built from.
    pub config: Config,
    /// Token verification.
    pub verifier: Verifier,
    /// Routing.
    pub router: Router,
    /// The bureau's item catalogue, when configured: it decides each line's class.
    pub catalogue: Option<Arc<crate::catalogue::Catalogue>>,
    /// The current generation of payer plugins; a reload swaps it whole. Requests take a
    /// snapshot, so calls in flight finish on the generation they started with.
    plugins: RwLock<Arc<PluginSet>>,
    /// Serialises reloads.
    reloading: Mutex<()>,
    /// The ledger.
    pub ledger: Arc<dyn Ledger>,
    /// Card-id hashing and quote sealing.
    pub card_key: CardKey,
    /// Fast replay check in front of the ledger's unique token ids.
    pub replay_cache: Arc<MemoryReplayStore>,
    /// One settlement or reversal per card at a time (shared across reloads).
    pub card_locks: Arc<crate::cardlock::CardLocks>,
    /// Rate limits and the in-flight limit.
    pub limiter: Limiter,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Set when shutdown begins: readiness turns false so load balancers move away.
    draining: std::sync::atomic::AtomicBool,
}

impl Gateway {
    /// Builds the gateway: reads the trust and revocation lists, opens the ledger, loads and
    /// initialises every plugin. Reports every problem found.
    pub fn build(config: Config, clock: Arc<dyn Clock>) -> Result<Self, ConfigError> {
        crate::metrics::install();
        let mut problems = Vec::new();
        let ledger = crate::ledger::open(&config.ledger)
            .map_err(|e| problems.push(format!("ledger.path: {}: {e}", config.ledger.path.display())))
            .ok();
        let shared = ledger.map(|ledger| Shared {
            ledger,
            replay_cache: Arc::new(MemoryReplayStore::new()),
            card_locks: Arc::default(),
            clock,
            generation: 0,
        });
        Self::assemble(config, shared, problems)
    }

    /// A gateway for a new configuration that keeps this one's ledger, replay cache, plugin
    /// and clock: trust and revocation lists, routes, limits and plugins (a new
    /// generation) come from `config`. The ledger's path and secret cannot change this way.
    pub fn rebuild(&self, config: Config) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let (new, old) = (&config.ledger, &self.config.ledger);
        let database = |l: &crate::config::LedgerConfig| l.postgres.as_ref().map(|p| p.url.clone());
        if new.path != old.path
            || new.secret != old.secret
            || new.engine != old.engine
            || new.backend != old.backend
            || database(new) != database(old)
        {
            problems.push(
                "ledger: the backend, database, path, engine and secret cannot change on reload; restart instead"
                    .to_owned(),
            );
        }
        let shared = Shared {
            ledger: Arc::clone(&self.ledger),
            replay_cache: Arc::clone(&self.replay_cache),
            card_locks: Arc::clone(&self.card_locks),
            clock: Arc::clone(&self.clock),
            generation: self.plugins().generation,
        };
        Self::assemble(config, Some(shared), problems)
    }

    fn assemble(config: Config, shared: Option<Shared>, mut problems: Vec<String>) -> Result<Self, ConfigError> {
        let trust = TrustList::load(&config.tokens.trust_list).unwrap_or_else(|p| {
            problems.extend(p.into_iter().map(|m| format!("tokens.trust_list: {m}")));
            TrustList::default()
        });
        let revocations = match &config.tokens.revocations {
            Some(path) => RevocationList::load(path).unwrap_or_else(|p| {
                problems.extend(p.into_iter().map(|m| format!("tokens.revocations: {m}")));
                RevocationList::default()
            }),
            None => RevocationList::default(),
        };
        let catalogue = config.catalogue.as_ref().and_then(|c| {
            crate::catalogue::Catalogue::load(c)
                .map_err(|p| problems.extend(p.into_iter().map(|m| format!("catalogue.path: {m}"))))
                .ok()
        });
        let plugins = if shared.is_some() { load_plugins(&config, &mut problems) } else { HashMap::new() };
        let (Some(shared), true) = (shared, problems.is_empty()) else { return Err(ConfigError { problems }) };
        let options = VerifyOptions {
            profile: Profile::ECard,
            prefix: crate::token::envelope::ECARD_PREFIX.to_owned(),
            clock_skew_secs: config.tokens.clock_skew_secs,
            max_lifetime_secs: config.tokens.max_lifetime_secs,
            key_validity: config.tokens.key_validity,
        };
        Ok(Self {
            verifier: Verifier::new(Arc::new(trust), Arc::new(revocations), options),
            router: Router::new(config.routes.clone()),
            catalogue: catalogue.map(Arc::new),
            plugins: RwLock::new(Arc::new(PluginSet { generation: shared.generation + 1, handles: plugins })),
            reloading: Mutex::new(()),
            ledger: shared.ledger,
            card_key: CardKey::new(&config.ledger_secret()),
            replay_cache: shared.replay_cache,
            card_locks: shared.card_locks,
            limiter: Limiter::new(&config.limits),
            clock: shared.clock,
            draining: std::sync::atomic::AtomicBool::new(false),
            config,
        })
    }

    /// An institution's configuration.
    pub fn institution(&self, id: &str) -> Option<&InstitutionConfig> {
        self.config.institutions.get(id)
    }

    /// Marks the gateway as shutting down.
    pub fn start_draining(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The current plugin generation.
    pub fn plugins(&self) -> Arc<PluginSet> {
        Arc::clone(&self.plugins.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Loads every plugin again from its configured library, initialises it, runs its health
    /// check, and swaps the whole set in at once. On any failure the current generation keeps
    /// serving and every problem is returned. Blocking: run it off the async runtime.
    pub fn reload_plugins(&self) -> Result<Arc<PluginSet>, Vec<String>> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let mut problems = Vec::new();
        let handles = load_plugins(&self.config, &mut problems);
        self_check(&handles, &mut problems);
        if !problems.is_empty() {
            tracing::warn!(problems = %problems.join("; "), "plugin reload refused; the current generation keeps serving");
            return Err(problems);
        }
        let mut current = self.plugins.write().unwrap_or_else(|p| p.into_inner());
        let next = Arc::new(PluginSet { generation: current.generation + 1, handles });
        *current = Arc::clone(&next);
        tracing::info!(generation = next.generation, "plugins reloaded");
        Ok(next)
    }
}

/// Each plugin's health check, called on this thread; a plugin down or not answering is a
/// problem.
fn self_check(handles: &HashMap<String, PluginHandle>, problems: &mut Vec<String>) {
    for (name, handle) in handles {
        match handle.call_inline::<_, Health>(Operation::Health, &()) {
            Ok(health) if health.status != HealthStatus::Down => {}
            Ok(health) => problems.push(format!("plugins.{name}: self-check: down {}", health.detail)),
            Err(e) => problems.push(format!("plugins.{name}: self-check failed: {e}")),
        }
    }
}

/// Loads every configured plugin exactly as `serve` does — signature and manifest, ABI, the
/// declaration, `init` with its configuration (process-tier plugins in a child that ends with
/// the check) — runs each one's health check, and unloads them: every problem found.
/// Blocking; for `check-config`.
pub fn check_plugins(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let handles = load_plugins(config, &mut problems);
    self_check(&handles, &mut problems);
    problems
}

/// What a rebuilt gateway keeps from the one before.
struct Shared {
    ledger: Arc<dyn Ledger>,
    replay_cache: Arc<MemoryReplayStore>,
    card_locks: Arc<crate::cardlock::CardLocks>,
    clock: Arc<dyn Clock>,
    generation: u64,
}

/// The gateway currently serving, and the TLS configuration: swapped whole by a reload, read
/// by every new connection (TLS) and every request (gateway). Requests in flight finish on the
/// gateway they started with.
#[derive(Debug)]
pub struct Live {
    gateway: RwLock<Arc<Gateway>>,
    tls: RwLock<Arc<rustls::ServerConfig>>,
}

impl Live {
    /// A live pair.
    pub fn new(gateway: Gateway, tls: Arc<rustls::ServerConfig>) -> Arc<Self> {
        Arc::new(Self { gateway: RwLock::new(Arc::new(gateway)), tls: RwLock::new(tls) })
    }

    /// The gateway serving now.
    pub fn gateway(&self) -> Arc<Gateway> {
        Arc::clone(&self.gateway.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The TLS configuration for new connections.
    pub fn tls(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.tls.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reloads the whole configuration from `path`: routes, limits, trust and revocation lists,
    /// the TLS certificate and client CA, and the plugins. A configuration with errors is
    /// refused with all of them, and the current one keeps serving. Blocking.
    pub fn reload(&self, path: &std::path::Path, env: &HashMap<String, String>) -> Result<(), Vec<String>> {
        let config = Config::load(path, env).map_err(|e| e.problems)?;
        let tls = crate::server::tls::server_config(&config.server);
        let current = self.gateway();
        if config.server.listen != current.config.server.listen {
            tracing::warn!("server.listen changed: it takes effect at the next restart");
        }
        let rebuilt = current.rebuild(config);
        let (tls, gateway) = match (tls, rebuilt) {
            (Ok(tls), Ok(gateway)) => (tls, gateway),
            (tls, gateway) => {
                let mut problems = tls.err().unwrap_or_default();
                problems.extend(gateway.err().map(|e| e.problems).unwrap_or_default());
                tracing::warn!(problems = %problems.join("; "), "configuration reload refused; the current one keeps serving");
                return Err(problems);
            }
        };
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        *self.gateway.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(gateway);
        tracing::info!("configuration reloaded");
        Ok(())
    }
}

/// One generation of loaded plugins.
#[derive(Debug)]
pub struct PluginSet {
    /// Generation number, from 1 at start.
    pub generation: u64,
    /// Handles by plugin name.
    pub handles: HashMap<String, PluginHandle>,
}

impl PluginSet {
    /// A plugin by name.
    pub fn get(&self, name: &str) -> Option<&PluginHandle> {
        self.handles.get(name)
    }
}

/// Starts a process-tier plugin after checking its library here (signature, digest): the
/// child re-checks that it maps the same bytes.
fn start_process(
    config: &Config,
    name: &str,
    plugin: &crate::config::PluginConfig,
    options: &LoadOptions,
) -> Result<(ProcessPlugin, String), String> {
    crate::plugin::loader::refuse_shared_directory(name, plugin.library.parent().unwrap_or(std::path::Path::new(".")))
        .map_err(|e| e.to_string())?;
    let bytes = std::fs::read(&plugin.library).map_err(|e| format!("{}: {e}", plugin.library.display()))?;
    let sha256 = sha256_hex(&bytes);
    if let Some(signers) = &options.signers {
        let manifest = signers.verify_manifest(&plugin.library, name).map_err(|e| e.to_string())?;
        crate::plugin::loader::check_manifest_name(&manifest, plugin.declared_name.as_deref().unwrap_or(name))
            .map_err(|e| e.to_string())?;
        if manifest.sha256 != sha256 {
            return Err(format!("the library's SHA-256 is {sha256}, the signed manifest says {}", manifest.sha256));
        }
    }
    let binary = match &config.plugin_runtime.host_binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe().map_err(|e| format!("cannot find the cardgate binary: {e}"))?,
    };
    let command = HostCommand {
        binary,
        library: plugin.library.clone(),
        name: name.to_owned(),
        sha256: sha256.clone(),
        cache_dir: options.cache_dir.clone(),
        config: plugin.config.clone(),
        memory_limit_mb: Some(plugin.memory_limit_mb).filter(|mb| *mb > 0),
    };
    Ok((ProcessPlugin::start(command)?, sha256))
}

/// Each plugin's own call pool (a new one per generation): a plugin that hangs can take only
/// its own threads, and a reload brings fresh ones.
fn plugin_pool(config: &Config, name: &str) -> Result<PluginPool, String> {
    let runtime = &config.plugin_runtime;
    let mut options = PoolOptions::default();
    if runtime.pool_threads > 0 {
        options.threads = runtime.pool_threads;
    }
    options.queue = runtime.pool_queue;
    PluginPool::named(options, name).map_err(|e| format!("cannot start its call pool: {e}"))
}

fn load_plugins(config: &Config, problems: &mut Vec<String>) -> HashMap<String, PluginHandle> {
    let runtime = &config.plugin_runtime;
    let mut options = LoadOptions::new(runtime.cache_dir.clone());
    if let Some(path) = &runtime.signers {
        match SignerTrust::load(path) {
            Ok(signers) => options = options.with_signers(Arc::new(signers)),
            Err(p) => {
                problems.extend(p.into_iter().map(|m| format!("plugin_runtime.signers: {m}")));
                return HashMap::new();
            }
        }
    }
    let mut plugins = HashMap::new();
    for (name, plugin) in &config.plugins {
        let timeout = Duration::from_millis(plugin.timeout_ms);
        let pool = match plugin_pool(config, name) {
            Ok(pool) => pool,
            Err(e) => {
                problems.push(format!("plugins.{name}: {e}"));
                continue;
            }
        };
        let handle = match plugin.isolation {
            IsolationConfig::InProcess => load(
                name,
                &plugin.library,
                &plugin.config,
                &LoadOptions { manifest_name: plugin.declared_name.clone(), ..options.clone() },
            )
            .map(|instance| {
                let dispatch = match plugin.dispatch {
                    DispatchConfig::Pool => Dispatch::Pool,
                    DispatchConfig::Inline => Dispatch::Inline,
                };
                PluginHandle::new(instance, pool.clone(), timeout).with_dispatch(dispatch)
            })
            .map_err(|e| e.to_string()),
            IsolationConfig::Process => start_process(config, name, plugin, &options)
                .map(|(process, sha256)| PluginHandle::process_tier(process, sha256, pool.clone(), timeout)),
        };
        match handle {
            Ok(handle) => {
                let breaker = Breaker::new(plugin.breaker_failures, Duration::from_millis(plugin.breaker_open_ms));
                let handle = handle.with_limits(plugin.max_concurrency, breaker).with_label(name);
                tracing::info!(plugin = %name, version = %handle.info().version, tier = handle.tier(), "plugin loaded");
                plugins.insert(name.clone(), handle);
            }
            Err(e) => problems.push(format!("plugins.{name}: {e}")),
        }
    }
    plugins
}
