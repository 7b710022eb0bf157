//! The HTTPS server: accept, TLS handshake (mutual, in the connection's own task, under a
//! timeout), HTTP/1.1 or HTTP/2 by ALPN, header / body / idle timeouts and a body size limit,
//! then the API. Shutdown is two-phase: stop accepting and ask connections to close after their
//! current request, then wait for them under a grace period.
//!
//! - [`tls`]: certificates, the client-certificate verifier, institution identity.
//! - [`admin`]: the admin listener.

pub mod admin;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::{self, ApiError, ApiRequest, ApiResponse, Identity};
use crate::config::ServerConfig;
use crate::service::{Gateway, Live};

/// Timeouts and limits the server enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    handshake: Duration,
    header: Duration,
    body: Duration,
    idle: Duration,
    max_body: usize,
    grace: Duration,
}

impl From<&ServerConfig> for Limits {
    fn from(c: &ServerConfig) -> Self {
        Self {
            handshake: Duration::from_millis(c.handshake_timeout_ms),
            header: Duration::from_millis(c.header_timeout_ms),
            body: Duration::from_millis(c.body_timeout_ms),
            idle: Duration::from_millis(c.idle_timeout_ms),
            max_body: c.max_body_bytes,
            grace: Duration::from_millis(c.shutdown_grace_ms),
        }
    }
}

/// Serves until `shutdown` completes, then drains connections under the grace period.
///
/// `main` binds the listener; tests bind `127.0.0.1:0`.
pub async fn run(listener: TcpListener, live: Arc<Live>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // The configuration current when the connection arrives: a reload applies
                    // to new connections (TLS) and new requests (everything else).
                    let acceptor = TlsAcceptor::from(live.tls());
                    let limits = Limits::from(&live.gateway().config.server);
                    let (live, watcher) = (Arc::clone(&live), graceful.watcher());
                    tokio::spawn(async move {
                        serve_connection(stream, peer, acceptor, live, limits, watcher).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of file descriptors: give connections time to close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let gateway = live.gateway();
    gateway.start_draining();
    tracing::info!("shutting down: draining connections");
    let grace = Limits::from(&gateway.config.server).grace;
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("grace period over; closing the remaining connections");
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: TlsAcceptor,
    live: Arc<Live>,
    limits: Limits,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            crate::metrics::handshake_failed("error");
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            crate::metrics::handshake_failed("timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    crate::metrics::connections(1.0);
    let identity = tls::identity(tls.get_ref().1).map(|institution| Identity { institution });
    let service = hyper::service::service_fn(move |request| {
        let (gateway, identity) = (live.gateway(), identity.clone());
        async move { Ok::<_, std::convert::Infallible>(respond(&gateway, identity.as_ref(), request, limits).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle / 2))
        .keep_alive_timeout(limits.header)
        .max_concurrent_streams(256);
    let connection = builder.serve_connection(TokioIo::new(tls), service).into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(%peer, error = %e, "connection closed with an error");
    }
    crate::metrics::connections(-1.0);
}

fn request_id(request: &Request<Incoming>) -> String {
    request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| (1..=64).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        .map_or_else(|| format!("{:016x}", rand_u64()), str::to_owned)
}

fn rand_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

async fn respond(
    gateway: &Gateway,
    identity: Option<&Identity>,
    request: Request<Incoming>,
    limits: Limits,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let request_id = request_id(&request);
    let endpoint = api::endpoint(request.method(), request.uri().path());
    // Admission as early as the certificate allows, before the body is read: the institution
    // must be known, within its rate limit, and within its share of the in-flight slots.
    let institution = identity.map(|i| i.institution.as_str()).filter(|i| gateway.institution(i).is_some());
    let Some(_in_flight) = gateway.limiter.enter(institution.unwrap_or_default()) else {
        crate::metrics::shed();
        crate::metrics::request(endpoint, 503, "overloaded", started.elapsed());
        return to_response(ApiResponse::problem(&ApiError::Overloaded, &request_id), &request_id);
    };
    let early = match institution {
        None => Some(ApiError::client(
            StatusCode::FORBIDDEN,
            "forbidden_institution",
            "the client certificate names no known institution",
        )),
        Some(institution) => gateway.limiter.check_request(institution).err().map(|limited| {
            crate::metrics::rate_limited(limited.scope.as_str());
            ApiError::from(limited)
        }),
    };
    if let Some(error) = early {
        let answer = ApiResponse::problem(&error, &request_id);
        crate::metrics::request(endpoint, answer.status.as_u16(), answer.code.unwrap_or("-"), started.elapsed());
        return to_response(answer, &request_id);
    }
    let (parts, body) = request.into_parts();
    let answer = match read_body(body, limits).await {
        Ok(body) => {
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
            let json = header("content-type").is_none_or(|t| t.starts_with("application/json"));
            let api_request = ApiRequest {
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query(),
                idempotency_key: header("idempotency-key"),
                json: json && (header("content-type").is_some() || body.is_empty()),
                body: &body,
                request_id: &request_id,
            };
            api::handle(gateway, identity, api_request).await
        }
        Err(error) => ApiResponse::problem(&error, &request_id),
    };
    crate::metrics::request(endpoint, answer.status.as_u16(), answer.code.unwrap_or("-"), started.elapsed());
    tracing::debug!(
        request_id,
        endpoint,
        code = answer.code.unwrap_or("-"),
        institution = identity.map_or("-", |i| i.institution.as_str()),
        method = %parts.method,
        path = parts.uri.path(),
        status = answer.status.as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    to_response(answer, &request_id)
}

async fn read_body(body: Incoming, limits: Limits) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(limits.body, Limited::new(body, limits.max_body).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {} bytes", limits.max_body),
        )),
        Ok(Err(_)) => Err(ApiError::invalid("the body could not be read")),
        Err(_) => Err(ApiError::client(StatusCode::REQUEST_TIMEOUT, "request_timeout", "the body arrived too slowly")),
    }
}

fn to_response(answer: ApiResponse, request_id: &str) -> Response<Full<Bytes>> {
    let content_type = if answer.problem { "application/problem+json" } else { "application/json" };
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    if let Some(seconds) = answer.retry_after {
        headers.insert("retry-after", HeaderValue::from(seconds));
    }
    headers.insert("content-type", HeaderValue::from_static(content_type));
    headers.insert("cache-control", HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", value);
    }
    response
}
