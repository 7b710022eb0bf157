//! What a plugin answers, decoded.
//!
//! Every settlement reads a split from each payer. The SDK writes splits with
//! [`cardgate_sdk::wire`], and the host reads those bytes with its reader (a third of serde's
//! time); an answer in any other form (another SDK, another key order, whitespace, escapes)
//! goes to serde, so an answer means the same whoever wrote it.

use cardgate_sdk::{Health, Inquiry, Reversal, Split, wire};
use serde::de::DeserializeOwned;

use super::CallError;

/// An answer a plugin can give: decoded from its JSON, through serde unless the type reads
/// its own form first.
pub trait Output: DeserializeOwned {
    /// The answer in `output`, or why it is not one.
    fn decode(output: &[u8]) -> Result<Self, CallError> {
        by_serde(output)
    }
}

/// Through serde: the answers that are not the hot path, and any split not as the SDK writes.
fn by_serde<T: DeserializeOwned>(output: &[u8]) -> Result<T, CallError> {
    let text = std::str::from_utf8(output).map_err(|e| CallError::BadAnswer { reason: e.to_string() })?;
    serde_json::from_str(text).map_err(|e| CallError::BadAnswer { reason: e.to_string() })
}

impl Output for Split {
    fn decode(output: &[u8]) -> Result<Self, CallError> {
        wire::read_split(output).map_or_else(|| by_serde(output), Ok)
    }
}

impl Output for Inquiry {}

impl Output for Reversal {}

impl Output for Health {}

#[cfg(test)]
mod tests {
    use cardgate_sdk::{BreakdownItem, FundPayment, YearToDate};

    use super::*;

    fn split() -> Split {
        Split {
            funds: vec![FundPayment { fund: "basic_pooling".into(), amount_fen: 52_000 }],
            account_pay_fen: 18_000,
            cash_pay_fen: 100_000,
            eligible_self_pay_fen: 30_000,
            eligible_borne_fen: 48_000,
            year_to_date_delta: YearToDate { year: 2026, deductible_fen: 20_000, ..YearToDate::default() },
            breakdown: vec![BreakdownItem {
                item: "deductible".into(),
                amount_fen: 20_000,
                note: "起付线 \"a\"".into(),
            }],
        }
    }

    /// The same split, however it was written: by the SDK, by serde compactly or prettily.
    #[test]
    fn a_split_decodes_the_same_whoever_wrote_it() {
        let split = split();
        let mut sdk = Vec::new();
        wire::split(&mut sdk, &split).expect("written");
        let plain = Split {
            breakdown: vec![BreakdownItem { note: String::new(), ..split.breakdown[0].clone() }],
            ..split.clone()
        };
        let mut sdk_plain = Vec::new();
        wire::split(&mut sdk_plain, &plain).expect("written");
        assert!(wire::read_split(&sdk_plain).is_some(), "the SDK's bytes take the quick way");
        assert_eq!(Split::decode(&sdk_plain).expect("decoded"), plain);
        for bytes in
            [sdk, serde_json::to_vec(&split).expect("serde"), serde_json::to_vec_pretty(&split).expect("serde")]
        {
            assert_eq!(Split::decode(&bytes).expect("decoded"), split);
        }
    }

    /// What is not a split is refused with the reason, whichever way it went.
    #[test]
    fn what_is_not_a_split_is_a_bad_answer() {
        for bytes in [&b"{\"funds\":[],\"account_pay_fen\":-0,\"cash_pay_fen\":0}"[..], b"{}", b"\xff", b"[1]", b""] {
            match Split::decode(bytes) {
                Err(CallError::BadAnswer { reason }) => assert!(!reason.is_empty()),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(bytes)),
            }
        }
    }
}
