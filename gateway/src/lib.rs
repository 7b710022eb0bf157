//! cardgate: the settlement gateway for electronic social-security cards.
//!
//! A hospital billing system or a pharmacy terminal posts a settlement with the card's QR
//! token; the gateway verifies it, routes it to the payer plugins that own the card's policy,
//! records the outcome and answers how the bill is split.
//!
//! # Layout
//! - [`plugin`]: loading plugin libraries through the SDK's C ABI and calling them on a
//!   bounded pool.
//! - [`token`]: e-card tokens: offline verification, trust and revocation lists, replay
//!   protection, and issuer tooling.
//! - [`metrics`]: Prometheus metrics.
//! - [`cardlock`]: per-card serialisation of settlements and reversals.
//! - [`catalogue`]: the bureau's item catalogue, which decides each bill line's class.
//! - [`random`]: nonces and ids from the system's generator, a block at a time.
//! - [`cli`]: the `cardgate` command line.

pub mod allocator;
pub mod api;
pub mod cardlock;
pub mod catalogue;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod ledger;
pub mod limit;
pub mod metrics;
pub mod plugin;
pub mod random;
pub mod route;
pub mod server;
pub mod service;
pub mod token;
