//! Errors as clients see them: one place maps every error class to an HTTP status and a stable
//! problem code (RFC 9457 `application/problem+json`). The detail for the log stays in the log.

use http::StatusCode;
use serde_json::json;

use crate::ledger::LedgerError;
use crate::plugin::CallError;
use crate::token::TokenError;

/// Why a request failed, classified by where it came from.
#[derive(Debug, Clone)]
pub enum ApiError {
    /// The client's mistake.
    Client {
        /// HTTP status.
        status: StatusCode,
        /// Stable code.
        code: &'static str,
        /// Short message for the client.
        detail: String,
    },
    /// The token was refused.
    Token(TokenError),
    /// A payer plugin gave no usable answer.
    Plugin {
        /// The payer.
        payer: String,
        /// Why.
        error: CallError,
    },
    /// A payer's answer does not balance.
    Unbalanced {
        /// The payer.
        payer: String,
        /// What is wrong.
        detail: String,
    },
    /// The ledger failed.
    Storage(LedgerError),
}

impl ApiError {
    /// A client error.
    pub fn client(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self::Client { status, code, detail: detail.into() }
    }

    /// `400 invalid_request`.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::client(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    /// The status, stable code and client-facing detail.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::Client { status, code, detail } => (*status, code, detail.clone()),
            Self::Token(e) => (token_status(e), e.code(), e.to_string()),
            Self::Plugin { payer, error } => {
                let status = match error {
                    CallError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    CallError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                    CallError::Overloaded | CallError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::BAD_GATEWAY,
                };
                let detail = match error {
                    CallError::Rejected(e) => format!("payer `{payer}` refused: {} ({})", e.message, e.code),
                    other => format!("payer `{payer}`: {}", other.code().replace('_', " ")),
                };
                (status, error.code(), detail)
            }
            Self::Unbalanced { payer, .. } => (
                StatusCode::BAD_GATEWAY,
                "plugin_unbalanced",
                format!("payer `{payer}` answered a split that does not balance; nothing was settled"),
            ),
            Self::Storage(LedgerError::TokenUsed) => {
                (StatusCode::CONFLICT, "token_replayed", TokenError::Replayed.to_string())
            }
            Self::Storage(LedgerError::QuoteUsed) => {
                (StatusCode::CONFLICT, "quote_already_settled", "the quote was already settled".into())
            }
            Self::Storage(LedgerError::NotFound) => (StatusCode::NOT_FOUND, "not_found", "no such settlement".into()),
            Self::Storage(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", "the ledger is not available".into())
            }
        }
    }

    /// The problem document.
    pub fn body(&self, request_id: &str, extra: Option<(&str, &str)>) -> (StatusCode, String) {
        let (status, code, detail) = self.parts();
        let mut problem = json!({
            "type": format!("https://cardgate.invalid/problems/{code}"),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "code": code,
            "detail": detail,
            "request_id": request_id,
        });
        if let Some((key, value)) = extra {
            problem[key] = json!(value);
        }
        (status, problem.to_string())
    }
}

fn token_status(e: &TokenError) -> StatusCode {
    match e {
        TokenError::Malformed(_) | TokenError::ProfileInvalid(_) => StatusCode::BAD_REQUEST,
        TokenError::CardRevoked => StatusCode::FORBIDDEN,
        TokenError::Replayed => StatusCode::CONFLICT,
        _ => StatusCode::UNAUTHORIZED,
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        Self::Token(e)
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        Self::Storage(e)
    }
}
