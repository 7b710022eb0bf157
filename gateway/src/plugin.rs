//! Plugins as the daemon sees them: load a library, build an instance from its configuration,
//! and call it with typed requests on the bounded pool under a timeout.
//!
//! - [`loader`]: the load sequence and the raw ABI calls (the gateway's only `unsafe` code).
//! - [`pool`]: the bounded blocking pool.
//! - [`process`]: the process isolation tier (`cardgate plugin-host`).
//! - [`signing`]: signed manifests and trusted signers.
//! - [`input`]: the requests' JSON, a settlement's encoded once for its chain of payers.
//! - [`error`]: [`LoadError`] and [`CallError`].

pub mod error;
pub mod input;
#[allow(unsafe_code)]
pub mod loader;
pub mod output;
pub mod pool;
pub mod process;
pub mod signing;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardgate_sdk::{Health, Inquiry, InquiryRequest, Operation, Reversal, ReversalRequest, SettlementRequest, Split};

pub use error::{AbiVersion, CallError, LoadError};
pub use input::Input;
pub use loader::{Instance, Library, LoadOptions, PluginInfo};
pub use output::Output;
pub use pool::{PluginPool, PoolOptions};

/// Loads the library at `path` and builds an instance from `config`.
pub fn load(
    label: &str,
    path: &Path,
    config: &serde_json::Value,
    options: &LoadOptions,
) -> Result<Instance, LoadError> {
    Library::open(label, path, options)?.instantiate(config)
}

/// How a handle runs its calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Dispatch {
    /// On the bounded pool under the timeout: a slow or stuck plugin cannot stall the async
    /// runtime. The default.
    #[default]
    Pool,
    /// On the calling task's thread, without a hand-off. For vetted plugins whose calls take
    /// a few microseconds, where the pool's hand-off would cost more than the call; the timeout
    /// cannot be enforced, so a plugin that hangs stalls a runtime thread.
    Inline,
}

/// A configured plugin with the pool, the per-call timeout, the concurrency limit and the
/// circuit breaker it is called under. Clones share all of them.
#[derive(Debug, Clone)]
pub struct PluginHandle {
    backend: Backend,
    pool: PluginPool,
    timeout: Duration,
    dispatch: Dispatch,
    permits: Arc<tokio::sync::Semaphore>,
    breaker: Arc<Breaker>,
    counters: Arc<Counters>,
    /// The configured name, for metrics.
    label: Arc<str>,
}

/// Where a plugin runs.
#[derive(Debug, Clone)]
enum Backend {
    /// Loaded into the gateway's process.
    InProcess(Arc<Instance>),
    /// In its own child process.
    Process(Arc<process::ProcessPlugin>, String),
}

/// Calls and failures of one handle, for the admin API and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Calls made.
    pub calls: std::sync::atomic::AtomicU64,
    /// Calls that failed, refusals included; a payer answering that it does not apply to the
    /// person (`not_insured`) or does not implement the operation (`unsupported`) is not a failure.
    pub failures: std::sync::atomic::AtomicU64,
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass; this many consecutive failures so far.
    Closed(u32),
    /// Calls fail fast until the instant, then one probe passes.
    Open(Instant),
    /// One probe call is in flight.
    HalfOpen,
}

impl BreakerState {
    /// The state's name in metrics and the admin API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed(_) => "closed",
            Self::Open(_) => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Opens after `threshold` consecutive failures; after `open_for`, lets one probe through;
/// closes when a call succeeds.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<BreakerState>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self { threshold: threshold.max(1), open_for, state: Mutex::new(BreakerState::Closed(0)) }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go ahead now (the state is recorded in the metrics on a change).
    fn admit(&self, label: &str) -> Result<(), CallError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *state {
            BreakerState::Closed(_) => Ok(()),
            BreakerState::Open(until) if Instant::now() >= until => {
                *state = BreakerState::HalfOpen;
                crate::metrics::breaker(label, BreakerState::HalfOpen.name());
                Ok(())
            }
            BreakerState::Open(_) | BreakerState::HalfOpen => Err(CallError::CircuitOpen),
        }
    }

    /// Records a call's outcome; returns the new state when it changed from closed, open or
    /// half-open to another of them.
    fn record(&self, failed: bool) -> Option<BreakerState> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = *state;
        *state = match (*state, failed) {
            (_, false) => BreakerState::Closed(0),
            (BreakerState::Closed(n), true) if n + 1 < self.threshold => BreakerState::Closed(n + 1),
            (BreakerState::Open(until), true) => BreakerState::Open(until),
            (_, true) => {
                tracing::warn!(open_for_ms = self.open_for.as_millis() as u64, "plugin circuit breaker opens");
                BreakerState::Open(Instant::now() + self.open_for)
            }
        };
        (std::mem::discriminant(&before) != std::mem::discriminant(&*state)).then_some(*state)
    }
}

impl PluginHandle {
    /// Wraps an instance; calls go through the pool, at most 256 at once, with a breaker that
    /// opens for 5 s after 5 consecutive failures.
    pub fn new(instance: Instance, pool: PluginPool, timeout: Duration) -> Self {
        Self::with_backend(Backend::InProcess(Arc::new(instance)), pool, timeout)
    }

    fn with_backend(backend: Backend, pool: PluginPool, timeout: Duration) -> Self {
        Self {
            backend,
            pool,
            timeout,
            dispatch: Dispatch::Pool,
            permits: Arc::new(tokio::sync::Semaphore::new(256)),
            breaker: Arc::new(Breaker::new(5, Duration::from_secs(5))),
            counters: Arc::default(),
            label: Arc::from(""),
        }
    }

    /// The same handle labelled with its configured name (for metrics, which start with the
    /// breaker's current state).
    pub fn with_label(self, label: &str) -> Self {
        crate::metrics::breaker(label, self.breaker.state().name());
        Self { label: Arc::from(label), ..self }
    }

    /// Calls past their timeout still holding a thread of this plugin's pool.
    pub fn stuck_calls(&self) -> usize {
        self.pool.stuck()
    }

    /// Calls and failures so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// How calls are dispatched.
    pub fn dispatch(&self) -> Dispatch {
        self.dispatch
    }

    /// The library's SHA-256.
    pub fn sha256(&self) -> &str {
        match &self.backend {
            Backend::InProcess(instance) => instance.library().sha256(),
            Backend::Process(_, sha256) => sha256,
        }
    }

    /// A handle on a plugin running in its own process (`sha256` of its library).
    pub fn process_tier(plugin: process::ProcessPlugin, sha256: String, pool: PluginPool, timeout: Duration) -> Self {
        Self::with_backend(Backend::Process(Arc::new(plugin), sha256), pool, timeout)
    }

    /// `in_process` or `process`.
    pub fn tier(&self) -> &'static str {
        match self.backend {
            Backend::InProcess(_) => "in_process",
            Backend::Process(..) => "process",
        }
    }

    /// The same handle with another concurrency limit and breaker.
    pub fn with_limits(self, max_concurrency: usize, breaker: Breaker) -> Self {
        Self { permits: Arc::new(tokio::sync::Semaphore::new(max_concurrency)), breaker: Arc::new(breaker), ..self }
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The same handle with another dispatch.
    pub fn with_dispatch(self, dispatch: Dispatch) -> Self {
        Self { dispatch, ..self }
    }

    /// What the plugin declares.
    pub fn info(&self) -> &PluginInfo {
        match &self.backend {
            Backend::InProcess(instance) => instance.library().info(),
            Backend::Process(plugin, _) => plugin.info(),
        }
    }

    /// Participation information.
    pub async fn inquire(&self, request: &InquiryRequest) -> Result<Inquiry, CallError> {
        self.call(Operation::Inquire, request).await
    }

    /// A split without moving money.
    pub async fn quote(&self, request: &SettlementRequest) -> Result<Split, CallError> {
        self.call(Operation::Quote, request).await
    }

    /// A split for settlement.
    pub async fn settle(&self, request: &SettlementRequest) -> Result<Split, CallError> {
        self.call(Operation::Settle, request).await
    }

    /// Accept or decline a reversal.
    pub async fn reverse(&self, request: &ReversalRequest) -> Result<Reversal, CallError> {
        self.call(Operation::Reverse, request).await
    }

    /// The plugin's health.
    pub async fn health(&self) -> Result<Health, CallError> {
        self.call(Operation::Health, &()).await
    }

    /// Calls one operation as the handle's [`Dispatch`] says, under the concurrency limit and
    /// the circuit breaker.
    pub async fn call<Req: Input + ?Sized, Resp: Output>(
        &self,
        operation: Operation,
        request: &Req,
    ) -> Result<Resp, CallError> {
        let started = Instant::now();
        if let Err(e) = self.breaker.admit(&self.label) {
            crate::metrics::plugin_call(&self.label, operation.as_str(), e.code(), started.elapsed());
            return Err(e);
        }
        let Ok(_permit) = self.permits.try_acquire() else { return Err(CallError::Overloaded) };
        let result = match (&self.backend, self.dispatch) {
            (Backend::InProcess(_), Dispatch::Inline) => self.call_inline(operation, request),
            (Backend::InProcess(instance), Dispatch::Pool) => match request.encode() {
                Ok(input) => match self.pool.call(Arc::clone(instance), operation, input, self.timeout).await {
                    Ok(output) => Resp::decode(&output),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
            (Backend::Process(plugin, _), _) => match request.encode() {
                Ok(input) => match plugin.call(operation, &input, self.timeout).await {
                    Ok(output) => Resp::decode(&output),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
        };
        let changed = self.breaker.record(result.as_ref().err().is_some_and(CallError::is_plugin_failure));
        let outcome = result.as_ref().err().map_or("ok", CallError::outcome);
        crate::metrics::plugin_call(&self.label, operation.as_str(), outcome, started.elapsed());
        if let Some(state) = changed {
            crate::metrics::breaker(&self.label, state.name());
        }
        self.counters.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if result.as_ref().is_err_and(|e| !e.is_answer()) {
            self.counters.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    /// Calls one operation on the current thread, bypassing the pool and the timeout. For
    /// callers that are already on a blocking thread, and for measuring the ABI alone.
    pub fn call_inline<Req: Input + ?Sized, Resp: Output>(
        &self,
        operation: Operation,
        request: &Req,
    ) -> Result<Resp, CallError> {
        match &self.backend {
            Backend::InProcess(instance) => Resp::decode(&instance.call(operation, &request.encode()?)?),
            // A blocking caller (a reload's self-check) waits for the child on the runtime.
            Backend::Process(plugin, _) => {
                let input = request.encode()?;
                let runtime = tokio::runtime::Handle::try_current().map_err(|_| CallError::Unavailable)?;
                Resp::decode(&runtime.block_on(plugin.call(operation, &input, self.timeout))?)
            }
        }
    }
}
