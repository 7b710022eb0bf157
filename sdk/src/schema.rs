//! JSON Schemas of every message that crosses the ABI, generated from the SDK's types (feature
//! `schema`). The published copies are `sdk/schema/*.schema.json`; a test fails when they and
//! the types drift (`UPDATE_SCHEMAS=1 cargo test -p cardgate-tests --test schemas` rewrites them).

use schemars::{JsonSchema, schema_for};

use crate::{Health, Inquiry, InquiryRequest, PluginError, Reversal, ReversalRequest, SettlementRequest, Split};

/// Each message's file name (without `.schema.json`) and its schema: the inputs of `quote`,
/// `settle`, `inquire` and `reverse`, their answers, the health answer and the error.
pub fn all() -> Vec<(&'static str, serde_json::Value)> {
    fn one<T: JsonSchema>(name: &'static str) -> (&'static str, serde_json::Value) {
        (name, serde_json::to_value(schema_for!(T)).unwrap_or_default())
    }
    vec![
        one::<SettlementRequest>("SettlementRequest"),
        one::<Split>("Split"),
        one::<InquiryRequest>("InquiryRequest"),
        one::<Inquiry>("Inquiry"),
        one::<ReversalRequest>("ReversalRequest"),
        one::<Reversal>("Reversal"),
        one::<Health>("Health"),
        one::<PluginError>("PluginError"),
    ]
}
