//! Errors a plugin returns, with stable codes the gateway maps to its API.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable reason a plugin refused a call.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The person is not insured with this payer (or not for this insurance type).
    NotInsured,
    /// The request is outside what this policy covers (institution, item, region).
    NotCovered,
    /// The request is malformed for this plugin.
    InvalidRequest,
    /// The plugin's configuration is invalid (returned by `new`).
    InvalidConfig,
    /// The operation is not supported by this plugin.
    Unsupported,
    /// The payer declines, for a policy reason given in the message.
    Rejected,
    /// The plugin cannot serve now; the call may be retried later.
    Unavailable,
    /// A bug in the plugin.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotInsured => "not_insured",
            Self::NotCovered => "not_covered",
            Self::InvalidRequest => "invalid_request",
            Self::InvalidConfig => "invalid_config",
            Self::Unsupported => "unsupported",
            Self::Rejected => "rejected",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plugin's refusal: a stable code and a short message for the log and the client.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PluginError {
    /// The stable code.
    pub code: ErrorCode,
    /// A short, human-readable reason. Never put a card id or a token in it.
    pub message: String,
}

impl PluginError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// [`ErrorCode::NotInsured`].
    pub fn not_insured(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotInsured, message)
    }

    /// [`ErrorCode::NotCovered`].
    pub fn not_covered(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotCovered, message)
    }

    /// [`ErrorCode::InvalidRequest`].
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// [`ErrorCode::InvalidConfig`].
    pub fn invalid_config(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidConfig, message)
    }

    /// [`ErrorCode::Unsupported`], naming the operation.
    pub fn unsupported(operation: &str) -> Self {
        Self::new(ErrorCode::Unsupported, format!("operation `{operation}` is not supported"))
    }

    /// [`ErrorCode::Rejected`].
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Rejected, message)
    }

    /// [`ErrorCode::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}
