//! Write settlement plugins for the cardgate gateway.
//!
//! A plugin is a payer's policy — basic medical insurance, critical-illness insurance, medical
//! assistance — compiled as a `cdylib` and loaded by the gateway at run time. The author
//! implements the safe [`Plugin`] trait and calls [`export_plugin!`] once; the macro generates
//! the whole C ABI (declaration, panic containment, memory ownership), so a plugin contains no
//! `unsafe` code.
//!
//! ```
//! use cardgate_sdk::{FundPayment, Plugin, PluginError, SettlementRequest, Split};
//!
//! /// Pays half of every bill from one fund.
//! pub struct HalfPay;
//!
//! impl Plugin for HalfPay {
//!     type Config = ();
//!
//!     fn new((): ()) -> Result<Self, PluginError> {
//!         Ok(HalfPay)
//!     }
//!
//!     fn quote(&self, request: &SettlementRequest) -> Result<Split, PluginError> {
//!         let fund = request.due_fen / 2;
//!         Ok(Split {
//!             funds: vec![FundPayment { fund: "half".into(), amount_fen: fund }],
//!             cash_pay_fen: request.due_fen - fund,
//!             ..Split::default()
//!         })
//!     }
//! }
//!
//! cardgate_sdk::export_plugin!(HalfPay);
//! ```
//!
//! # Layout
//! - [`types`]: the messages (card claims, institution, bill lines, year-to-date
//!   accumulators, splits); money is integer fen.
//! - [`error`]: [`PluginError`] and its stable [`ErrorCode`]s.
//! - [`plugin`]: the [`Plugin`] trait and the safe [`dispatch`] of an operation.
//! - [`testing`]: building a plugin's `cdylib` from its tests.
//! - `schema` (feature `schema`): JSON Schemas of the ABI's messages, published in
//!   `sdk/schema/`.
//! - [`wire`]: the hot messages' JSON (a settlement request, a split) written as serde writes
//!   it, faster.
//! - [`abi`]: ABI v1, the C boundary, and the [`export_plugin!`] macro. `include/cardgate_plugin.h`
//!   is the same boundary for C.

#![deny(missing_docs)]

#[allow(unsafe_code)]
pub mod abi;
pub mod error;
pub mod plugin;
#[cfg(feature = "schema")]
pub mod schema;
pub mod testing;
pub mod types;
pub mod wire;

pub use error::{ErrorCode, PluginError};
pub use plugin::{DispatchError, Operation, Plugin, dispatch};
pub use types::*;

/// Re-exported so that plugins log through the same `log` facade the SDK forwards to the host.
pub use log;
/// Re-exported because [`Inquiry::details`] is a JSON map.
pub use serde_json;
