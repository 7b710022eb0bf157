//! Plugins as the daemon sees them: load a library, build an instance from its configuration,
//! and call it with typed requests on the bounded pool under a timeout.
//!
//! - [`loader`]: the load sequence and the raw ABI calls (the gateway's only `unsafe` code).
//! - [`pool`]: the bounded blocking pool.
//! - [`error`]: [`LoadError`] and [`CallError`].

pub mod error;
#[allow(unsafe_code)]
pub mod loader;
pub mod pool;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cardgate_sdk::{Health, Inquiry, InquiryRequest, Operation, Reversal, ReversalRequest, SettlementRequest, Split};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use error::{AbiVersion, CallError, LoadError};
pub use loader::{Instance, Library, LoadOptions, PluginInfo};
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

/// A configured plugin with the pool and the per-call timeout it is called under. Clones
/// share the instance.
#[derive(Debug, Clone)]
pub struct PluginHandle {
    instance: Arc<Instance>,
    pool: PluginPool,
    timeout: Duration,
    dispatch: Dispatch,
}

impl PluginHandle {
    /// Wraps an instance; calls go through the pool.
    pub fn new(instance: Instance, pool: PluginPool, timeout: Duration) -> Self {
        Self { instance: Arc::new(instance), pool, timeout, dispatch: Dispatch::Pool }
    }

    /// The same handle with another dispatch.
    pub fn with_dispatch(self, dispatch: Dispatch) -> Self {
        Self { dispatch, ..self }
    }

    /// What the plugin declares.
    pub fn info(&self) -> &PluginInfo {
        self.instance.library().info()
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

    /// Calls one operation as the handle's [`Dispatch`] says.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        operation: Operation,
        request: &Req,
    ) -> Result<Resp, CallError> {
        if self.dispatch == Dispatch::Inline {
            return self.call_inline(operation, request);
        }
        let input = encode(request)?;
        let output = self.pool.call(Arc::clone(&self.instance), operation, input, self.timeout).await?;
        decode(&output)
    }

    /// Calls one operation on the current thread, bypassing the pool and the timeout. For
    /// callers that are already on a blocking thread, and for measuring the ABI alone.
    pub fn call_inline<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        operation: Operation,
        request: &Req,
    ) -> Result<Resp, CallError> {
        decode(&self.instance.call(operation, &encode(request)?)?)
    }
}

fn encode<Req: Serialize>(request: &Req) -> Result<Vec<u8>, CallError> {
    let mut input = Vec::with_capacity(2048);
    serde_json::to_writer(&mut input, request)
        .map_err(|e| CallError::BadInput { reason: format!("cannot encode request: {e}") })?;
    Ok(input)
}

fn decode<Resp: DeserializeOwned>(output: &[u8]) -> Result<Resp, CallError> {
    let text = std::str::from_utf8(output).map_err(|e| CallError::BadAnswer { reason: e.to_string() })?;
    serde_json::from_str(text).map_err(|e| CallError::BadAnswer { reason: e.to_string() })
}
