//! The trait a plugin author implements, and the safe dispatch from an operation and its JSON
//! input to the trait's methods.

use serde::de::DeserializeOwned;

use crate::error::PluginError;
use crate::types::{Health, Inquiry, InquiryRequest, Reversal, ReversalRequest, SettlementRequest, Split};

/// A payer's policy, loaded by the gateway at run time.
///
/// The gateway builds one value per loaded generation with [`Plugin::new`] and calls it from
/// several threads at once, so it must be `Send + Sync`; it should hold only its configuration
/// (plugins are pure: every piece of state they need comes in the request).
///
/// Only [`Plugin::quote`] is required. Every other operation has a default body, so a hook
/// added in a later SDK version breaks no existing plugin.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// The plugin's own configuration section, deserialised from the gateway's config.
    type Config: DeserializeOwned;

    /// Whether the plugin is effect-free: its answers depend on its inputs alone and its calls
    /// change nothing anywhere (no outside system, no state of its own), so the gateway may
    /// repeat or forget a call. Declared as [`crate::abi::FLAG_EFFECT_FREE`]; lets the gateway
    /// record a settlement with one durable commit. Default: false (effectful).
    const EFFECT_FREE: bool = false;

    /// Builds the plugin from its configuration. Return [`PluginError::invalid_config`] on a
    /// bad configuration: the gateway then refuses to load this generation.
    fn new(config: Self::Config) -> Result<Self, PluginError>;

    /// Participation information for a card. Default: unsupported.
    fn inquire(&self, request: &InquiryRequest) -> Result<Inquiry, PluginError> {
        let _ = request;
        Err(PluginError::unsupported("inquire"))
    }

    /// Splits a bill without moving money.
    fn quote(&self, request: &SettlementRequest) -> Result<Split, PluginError>;

    /// Splits a bill for settlement. Default: the same answer as [`Plugin::quote`].
    fn settle(&self, request: &SettlementRequest) -> Result<Split, PluginError> {
        self.quote(request)
    }

    /// Accepts or declines the reversal of a settlement. Default: accepted.
    fn reverse(&self, request: &ReversalRequest) -> Result<Reversal, PluginError> {
        let _ = request;
        Ok(Reversal::accepted())
    }

    /// The plugin's health. Default: ok.
    fn health(&self) -> Health {
        Health::ok()
    }
}

/// The operations a plugin serves; the number is the value that crosses the C ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum Operation {
    /// [`Plugin::inquire`]: [`InquiryRequest`] -> [`Inquiry`].
    Inquire = 1,
    /// [`Plugin::quote`]: [`SettlementRequest`] -> [`Split`].
    Quote = 2,
    /// [`Plugin::settle`]: [`SettlementRequest`] -> [`Split`].
    Settle = 3,
    /// [`Plugin::reverse`]: [`ReversalRequest`] -> [`Reversal`].
    Reverse = 4,
    /// [`Plugin::health`]: no input -> [`Health`].
    Health = 5,
}

impl Operation {
    /// Every operation, in ABI order.
    pub const ALL: [Operation; 5] = [Self::Inquire, Self::Quote, Self::Settle, Self::Reverse, Self::Health];

    /// The operation for an ABI number, if it is one.
    pub fn from_u32(value: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|op| *op as u32 == value)
    }

    /// The operation's name, as used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inquire => "inquire",
            Self::Quote => "quote",
            Self::Settle => "settle",
            Self::Reverse => "reverse",
            Self::Health => "health",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`dispatch`] produced no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The plugin refused the call.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The input was not valid JSON for the operation.
    #[error("input for `{operation}` is not valid: {reason}")]
    BadInput {
        /// The operation called.
        operation: Operation,
        /// What the JSON decoder said.
        reason: String,
    },
}

/// Runs one operation on a plugin: decodes the JSON input, calls the trait method, encodes the
/// JSON answer. The export macro's C entry points and the in-process test kit both use it, so
/// a plugin behaves the same loaded or not.
pub fn dispatch<P: Plugin>(plugin: &P, operation: Operation, input: &[u8]) -> Result<Vec<u8>, DispatchError> {
    match operation {
        Operation::Inquire => encode(plugin.inquire(&decode(operation, input)?)?),
        Operation::Quote => encode_split(&with_settlement(operation, input, |request| plugin.quote(request))??),
        Operation::Settle => encode_split(&with_settlement(operation, input, |request| plugin.settle(request))??),
        Operation::Reverse => encode(plugin.reverse(&decode(operation, input)?)?),
        Operation::Health => encode(plugin.health()),
    }
}

/// One UTF-8 check of the whole buffer is cheaper than the decoder's check of every string.
fn text(operation: Operation, input: &[u8]) -> Result<&str, DispatchError> {
    std::str::from_utf8(input).map_err(|e| DispatchError::BadInput { operation, reason: e.to_string() })
}

fn decode<T: DeserializeOwned>(operation: Operation, input: &[u8]) -> Result<T, DispatchError> {
    serde_json::from_str(text(operation, input)?)
        .map_err(|e| DispatchError::BadInput { operation, reason: e.to_string() })
}

thread_local! {
    /// The last settlement request decoded on this thread. The next one is decoded into it,
    /// reusing its strings and lines instead of allocating them again (serde's
    /// `deserialize_in_place`: fields present are overwritten, fields absent take their
    /// defaults, so nothing of the previous request survives). Settlements are the hot path.
    static SETTLEMENT: std::cell::Cell<Option<SettlementRequest>> = const { std::cell::Cell::new(None) };
}

/// Requests this large or larger are decoded afresh and not kept, so a thread does not hold a
/// large bill's allocations for good.
const KEEP_BELOW_BYTES: usize = 64 * 1024;

/// Decodes a settlement request, into this thread's previous one where there is one, and calls
/// `f` with it.
fn with_settlement<R>(
    operation: Operation,
    input: &[u8],
    f: impl FnOnce(&SettlementRequest) -> R,
) -> Result<R, DispatchError> {
    let text = text(operation, input)?;
    let bad = |e: serde_json::Error| DispatchError::BadInput { operation, reason: e.to_string() };
    let keep = input.len() < KEEP_BELOW_BYTES;
    // Taken out of the cell for the call: none yet, the thread ending, or a plugin re-entering
    // dispatch all find it empty and decode afresh. A request half overwritten by a failed
    // decode, or by a panic in `f`, is dropped, never put back.
    let kept = if keep { SETTLEMENT.try_with(std::cell::Cell::take).ok().flatten() } else { None };
    let request = match kept {
        Some(mut request) => {
            let mut de = serde_json::Deserializer::from_str(text);
            serde::Deserialize::deserialize_in_place(&mut de, &mut request).and_then(|()| de.end()).map_err(bad)?;
            request
        }
        None => serde_json::from_str(text).map_err(bad)?,
    };
    let answer = f(&request);
    if keep {
        let _ = SETTLEMENT.try_with(|cell| cell.set(Some(request)));
    }
    Ok(answer)
}

fn encode<T: serde::Serialize>(answer: T) -> Result<Vec<u8>, DispatchError> {
    let mut output = Vec::with_capacity(1024);
    serde_json::to_writer(&mut output, &answer).map_err(unencodable)?;
    Ok(output)
}

/// A split, the answer to every settlement: the same bytes as [`encode`]'s, written faster.
fn encode_split(split: &Split) -> Result<Vec<u8>, DispatchError> {
    let mut output = Vec::with_capacity(256 + 96 * split.breakdown.len());
    crate::wire::split(&mut output, split).map_err(unencodable)?;
    Ok(output)
}

fn unencodable(e: serde_json::Error) -> DispatchError {
    PluginError::internal(format!("cannot encode answer: {e}")).into()
}
