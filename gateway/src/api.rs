//! The v1 HTTP API, independent of the transport: a request (method, path, idempotency key,
//! body) in, a response (status, JSON body) out. The server owns TLS, HTTP and limits.
//!
//! - [`model`]: request bodies and their validation.
//! - [`problem`]: error classes -> status and stable code.
//! - [`flow`]: inquiries, quotes, settlements, reversals.
//! - [`reconciliation`]: an institution's business day, and closing it.
//! - [`encounters`]: a hospital's visits and stays settled in steps (its settlements run
//!   through `flow`'s settlement machinery).

pub mod encounters;
pub mod flow;
pub mod model;
pub mod problem;
pub mod reconciliation;

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
    pub idempotency_key: IdempotencyKey<'a>,
    /// `Content-Type` is JSON (or absent with an empty body).
    pub json: bool,
    /// The body comes with a `Content-Encoding` other than `identity` (gzip, say), which the
    /// gateway does not decode.
    pub encoded: bool,
    /// Body.
    pub body: &'a [u8],
    /// The request id (echoed in every answer).
    pub request_id: &'a str,
}

/// The `Idempotency-Key` header as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdempotencyKey<'a> {
    /// Not sent.
    Missing,
    /// Sent, but not text (bytes outside visible ASCII).
    NotText,
    /// Sent.
    Given(&'a str),
}

impl<'a> IdempotencyKey<'a> {
    /// From the header's value.
    pub fn from_header(value: Option<&'a http::HeaderValue>) -> Self {
        match value.map(|v| v.to_str()) {
            None => Self::Missing,
            Some(Ok(key)) => Self::Given(key),
            Some(Err(_)) => Self::NotText,
        }
    }
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
    /// `Allow`, on a 405: the methods the resource takes.
    pub allow: Option<&'static str>,
}

impl ApiResponse {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: String) -> Self {
        Self { status, problem: false, body, retry_after: None, code: None, allow: None }
    }

    /// A problem answer.
    pub fn problem(error: &ApiError, request_id: &str) -> Self {
        let (status, body) = error.body(request_id, None);
        let code = error.parts().1;
        let allow = match error {
            ApiError::MethodNotAllowed { allow, .. } => Some(*allow),
            _ => None,
        };
        Self { status, problem: true, body, retry_after: error.retry_after(), code: Some(code), allow }
    }
}

/// The methods each resource takes (for `405` and its `Allow` header); `None`: no such resource.
fn allowed(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["v1", "inquiries" | "quotes"]
        | ["v1", "settlements", _, "reversal"]
        | ["v1", "reconciliation", "closures"] => Some("POST"),
        ["v1", "settlements"] => Some("GET, HEAD, POST"),
        ["v1", "settlements", _] | ["v1", "reconciliation"] | ["v1", "encounters", _] => Some("GET, HEAD"),
        ["v1", "encounters"]
        | ["v1", "encounters", _, "fees" | "quotes" | "settlements" | "admission"]
        | ["v1", "encounters", _, "settlements", _, "withdrawal"] => Some("POST"),
        ["v1", "encounters", _, "discharge"] => Some("POST, DELETE"),
        ["v1", "encounters", _, "fees", _] => Some("DELETE"),
        _ => None,
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
    let Some(allow) = allowed(&segments) else {
        return Err(ApiError::client(StatusCode::NOT_FOUND, "not_found", "no such resource"));
    };
    let takes = |m: &Method| allow.split(", ").any(|a| a == m.as_str());
    if !takes(method) {
        return Err(ApiError::MethodNotAllowed { method: method.to_string(), allow });
    }
    let needs_json = matches!(*method, Method::POST);
    if needs_json && r.encoded {
        return Err(ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body without Content-Encoding (gzip and other codings are not accepted)",
        ));
    }
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
            flow::settle(gateway, identity, idempotency_key(r)?, parse(r.body)?, r.request_id).await
        }
        (&Method::POST, ["v1", "encounters"]) => {
            encounters::register(gateway, identity, idempotency_key(r)?, parse(r.body)?).await
        }
        (&Method::GET | &Method::HEAD, ["v1", "encounters", id]) => encounters::get(gateway, identity, id).await,
        (&Method::POST, ["v1", "encounters", id, "fees"]) => {
            encounters::upload(gateway, identity, id, parse(r.body)?).await
        }
        (&Method::DELETE, ["v1", "encounters", id, "fees", serial]) => {
            encounters::withdraw_fee(gateway, identity, id, serial).await
        }
        (&Method::POST, ["v1", "encounters", id, "discharge"]) => {
            encounters::discharge(gateway, identity, id, parse(r.body)?).await
        }
        (&Method::DELETE, ["v1", "encounters", id, "discharge"]) => {
            encounters::withdraw_discharge(gateway, identity, id).await
        }
        (&Method::POST, ["v1", "encounters", id, "admission"]) => {
            encounters::change_admission(gateway, identity, id, parse(r.body)?).await
        }
        (&Method::POST, ["v1", "encounters", id, "quotes"]) => {
            encounters::quote(gateway, identity, id, parse_or_default(r.body)?).await
        }
        (&Method::POST, ["v1", "encounters", id, "settlements"]) => {
            let key = idempotency_key(r)?;
            encounters::settle(gateway, identity, id, key, parse_or_default(r.body)?, r.request_id).await
        }
        (&Method::POST, ["v1", "encounters", id, "settlements", sid, "withdrawal"]) => {
            encounters::withdraw_settlement(gateway, identity, id, sid, parse_or_default(r.body)?).await
        }
        (&Method::GET | &Method::HEAD, ["v1", "settlements"]) => flow::list(gateway, identity, r.query).await,
        (&Method::GET | &Method::HEAD, ["v1", "settlements", id]) => flow::get(gateway, identity, id).await,
        (&Method::GET | &Method::HEAD, ["v1", "reconciliation"]) => {
            reconciliation::get(gateway, identity, r.query).await
        }
        (&Method::POST, ["v1", "reconciliation", "closures"]) => {
            reconciliation::close(gateway, identity, parse(r.body)?).await
        }
        (&Method::POST, ["v1", "settlements", id, "reversal"]) => {
            flow::reverse(gateway, identity, id, parse_or_default(r.body)?).await
        }
        _ => Err(ApiError::MethodNotAllowed { method: method.to_string(), allow }),
    }
}

/// The request's `Idempotency-Key`, required and well-formed.
fn idempotency_key<'r>(r: &ApiRequest<'r>) -> Result<&'r str, ApiError> {
    let key = match r.idempotency_key {
        IdempotencyKey::Missing => {
            return Err(ApiError::client(
                StatusCode::BAD_REQUEST,
                "idempotency_key_required",
                "send an Idempotency-Key header",
            ));
        }
        IdempotencyKey::NotText => return Err(ApiError::invalid(model::ID_RULE.replace("{field}", "Idempotency-Key"))),
        IdempotencyKey::Given(key) => key,
    };
    model::check_id("Idempotency-Key", key)?;
    Ok(key)
}

/// JSON's whitespace (RFC 8259): space, tab, LF, CR — not the form feed Rust's
/// `is_ascii_whitespace` also counts, which would make `\x0c` an empty body.
fn json_space(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// A body that may be empty (then the defaults).
fn parse_or_default<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(json_space) { Ok(T::default()) } else { parse(body) }
}

/// A request body: one JSON object. (serde would also read a struct from an array of its
/// fields in order — `[]` as an empty object, `[true]` as `{"interim": true}` — which no
/// document describes.)
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().find(|b| !json_space(b)) != Some(&b'{') {
        return Err(ApiError::invalid("body: a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("body: {e}")))
}

/// The metrics label of a request's endpoint (its route template).
pub fn endpoint(method: &Method, path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "inquiries"]) => "inquiries",
        (&Method::POST, ["v1", "quotes"]) => "quotes",
        (&Method::POST, ["v1", "settlements"]) => "settlements",
        (&Method::GET, ["v1", "settlements"]) => "settlements_list",
        (&Method::GET, ["v1", "settlements", _]) => "settlement",
        (&Method::POST, ["v1", "settlements", _, "reversal"]) => "reversal",
        (&Method::GET, ["v1", "reconciliation"]) => "reconciliation",
        (&Method::POST, ["v1", "reconciliation", "closures"]) => "reconciliation_closure",
        (&Method::POST, ["v1", "encounters"]) => "encounters",
        (&Method::GET, ["v1", "encounters", _]) => "encounter",
        (&Method::POST, ["v1", "encounters", _, "fees"]) => "encounter_fees",
        (&Method::DELETE, ["v1", "encounters", _, "fees", _]) => "encounter_fee_withdrawal",
        (&Method::POST, ["v1", "encounters", _, "discharge"]) => "encounter_discharge",
        (&Method::DELETE, ["v1", "encounters", _, "discharge"]) => "encounter_discharge_withdrawal",
        (&Method::POST, ["v1", "encounters", _, "admission"]) => "encounter_admission_change",
        (&Method::POST, ["v1", "encounters", _, "quotes"]) => "encounter_quote",
        (&Method::POST, ["v1", "encounters", _, "settlements"]) => "encounter_settlement",
        (&Method::POST, ["v1", "encounters", _, "settlements", _, "withdrawal"]) => "encounter_withdrawal",
        _ => "other",
    }
}
