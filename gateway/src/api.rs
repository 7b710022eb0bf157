//! The v1 HTTP API, independent of the transport: a request (method, path, idempotency key,
//! body) in, a response (status, JSON body) out. The server owns TLS, HTTP and limits.
//!
//! - [`model`]: request bodies and their validation.
//! - [`problem`]: error classes -> status and stable code.
//! - [`flow`]: inquiries, quotes, settlements, reversals.

pub mod flow;
pub mod model;
pub mod problem;

use http::{Method, StatusCode};

use crate::service::Gateway;
pub use problem::ApiError;

/// Who is calling: the institution named by the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Institution id.
    pub institution: String,
}

/// A request as the API sees it.
#[derive(Debug)]
pub struct ApiRequest<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path, without the query.
    pub path: &'a str,
    /// Query string, if any.
    pub query: Option<&'a str>,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<&'a str>,
    /// `Content-Type` is JSON (or absent with an empty body).
    pub json: bool,
    /// Body.
    pub body: &'a [u8],
    /// The request id (echoed in every answer).
    pub request_id: &'a str,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// Status.
    pub status: StatusCode,
    /// `application/json` or `application/problem+json`.
    pub problem: bool,
    /// JSON body.
    pub body: String,
    /// `Retry-After`, seconds.
    pub retry_after: Option<u64>,
    /// The problem code, for metrics (`None` on success or a stored answer).
    pub code: Option<&'static str>,
}

impl ApiResponse {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: String) -> Self {
        Self { status, problem: false, body, retry_after: None, code: None }
    }

    /// A problem answer.
    pub fn problem(error: &ApiError, request_id: &str) -> Self {
        let (status, body) = error.body(request_id, None);
        let code = error.parts().1;
        Self { status, problem: true, body, retry_after: error.retry_after(), code: Some(code) }
    }
}

/// Handles one request.
pub async fn handle(gateway: &Gateway, identity: Option<&Identity>, request: ApiRequest<'_>) -> ApiResponse {
    let request_id = request.request_id;
    let Some(identity) = identity.filter(|i| gateway.institution(&i.institution).is_some()) else {
        let error = ApiError::client(
            StatusCode::FORBIDDEN,
            "forbidden_institution",
            "the client certificate names no known institution",
        );
        return ApiResponse::problem(&error, request_id);
    };
    // The institution's rate limit was checked on admission (server::respond), before the body.
    match dispatch(gateway, identity, &request).await {
        Ok(response) => response,
        Err(error) => {
            match &error {
                ApiError::Token(e) => crate::metrics::token_rejected(e.code()),
                ApiError::Storage(crate::ledger::LedgerError::TokenUsed) => {
                    crate::metrics::token_rejected("token_replayed")
                }
                ApiError::Limited(l) => crate::metrics::rate_limited(l.scope.as_str()),
                _ => {}
            }
            let (status, code, detail) = error.parts();
            if status.is_server_error() {
                tracing::warn!(request_id, code, %detail, ?error, "request failed");
            } else {
                tracing::debug!(request_id, code, %detail, "request refused");
            }
            ApiResponse::problem(&error, request_id)
        }
    }
}

async fn dispatch(gateway: &Gateway, identity: &Identity, r: &ApiRequest<'_>) -> Result<ApiResponse, ApiError> {
    let segments: Vec<&str> = r.path.trim_end_matches('/').split('/').skip(1).collect();
    let method = r.method;
    let needs_json = matches!(*method, Method::POST);
    if needs_json && !r.json {
        return Err(ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json",
        ));
    }
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "inquiries"]) => flow::inquire(gateway, identity, parse(r.body)?).await,
        (&Method::POST, ["v1", "quotes"]) => flow::quote(gateway, identity, parse(r.body)?).await,
        (&Method::POST, ["v1", "settlements"]) => {
            let key = r.idempotency_key.ok_or_else(|| {
                ApiError::client(StatusCode::BAD_REQUEST, "idempotency_key_required", "send an Idempotency-Key header")
            })?;
            model::check_id("Idempotency-Key", key)?;
            flow::settle(gateway, identity, key, parse(r.body)?, r.request_id).await
        }
        (&Method::GET, ["v1", "settlements", id]) => flow::get(gateway, identity, id),
        (&Method::GET, ["v1", "reconciliation"]) => flow::reconciliation(gateway, identity, r.query),
        (&Method::POST, ["v1", "settlements", id, "reversal"]) => {
            let body = if r.body.iter().all(u8::is_ascii_whitespace) { Default::default() } else { parse(r.body)? };
            flow::reverse(gateway, identity, id, body).await
        }
        (
            _,
            ["v1", "inquiries" | "quotes" | "settlements"]
            | ["v1", "settlements", _]
            | ["v1", "settlements", _, "reversal"],
        ) => Err(ApiError::client(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed here"),
        )),
        _ => Err(ApiError::client(StatusCode::NOT_FOUND, "not_found", "no such resource")),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("body: {e}")))
}

/// The metrics label of a request's endpoint (its route template).
pub fn endpoint(method: &Method, path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "inquiries"]) => "inquiries",
        (&Method::POST, ["v1", "quotes"]) => "quotes",
        (&Method::POST, ["v1", "settlements"]) => "settlements",
        (&Method::GET, ["v1", "settlements", _]) => "settlement",
        (&Method::POST, ["v1", "settlements", _, "reversal"]) => "reversal",
        (&Method::GET, ["v1", "reconciliation"]) => "reconciliation",
        _ => "other",
    }
}
