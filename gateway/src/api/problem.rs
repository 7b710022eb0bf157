//! Errors as clients see them: one place maps every error class to an HTTP status and a stable
//! problem code (RFC 9457 `application/problem+json`). The detail for the log stays in the log.

use http::StatusCode;
use serde_json::json;

use crate::ledger::LedgerError;
use crate::limit::Limited;
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
    /// A rate limit refused the request.
    Limited(Limited),
    /// Too many requests in flight: shed.
    Overloaded,
    /// The resource exists but does not take this method.
    MethodNotAllowed {
        /// The method sent.
        method: String,
        /// The methods it takes (the `Allow` header).
        allow: &'static str,
    },
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
                    CallError::Rejected(e) if e.code == cardgate_sdk::ErrorCode::Unavailable => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    CallError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    CallError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                    CallError::Overloaded | CallError::Unavailable | CallError::CircuitOpen => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    _ => StatusCode::BAD_GATEWAY,
                };
                let detail = match error {
                    CallError::Rejected(e) => format!("payer `{payer}` refused: {} ({})", e.message, e.code),
                    CallError::Timeout(_) => format!("payer `{payer}` did not answer in time"),
                    CallError::CircuitOpen => format!("payer `{payer}`: circuit breaker open after repeated failures"),
                    CallError::Overloaded | CallError::Unavailable => format!("payer `{payer}` is at capacity"),
                    _ => format!("payer `{payer}` failed to give a usable answer"),
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
            Self::Limited(l) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("the {} rate limit is reached; retry after {} s", l.scope.as_str(), retry_secs(l.retry_after)),
            ),
            Self::Overloaded => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded", "the gateway is at capacity; retry shortly".into())
            }
            Self::MethodNotAllowed { method, allow } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not allowed here; allowed: {allow}"),
            ),
        }
    }

    /// Seconds for a `Retry-After` header, when the error has one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Limited(l) => Some(retry_secs(l.retry_after)),
            // Worth retrying with the same key shortly.
            Self::Overloaded | Self::Storage(LedgerError::Storage(_) | LedgerError::Stale) => Some(1),
            Self::Plugin { error, .. } if error.code() == "plugin_unavailable" => Some(1),
            Self::Client { code: "request_in_progress", .. } => Some(1),
            _ => None,
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
        if let Self::Limited(l) = self {
            problem["scope"] = json!(l.scope.as_str());
        }
        (status, problem.to_string())
    }
}

fn retry_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
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

impl From<Limited> for ApiError {
    fn from(l: Limited) -> Self {
        Self::Limited(l)
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        Self::Storage(e)
    }
}
