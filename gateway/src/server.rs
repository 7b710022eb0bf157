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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
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
    let cap = connection_cap();
    let open = Arc::new(AtomicUsize::new(0));
    let (mut refused_said, mut accept_failed_said) = (None::<Instant>, None::<Instant>);
    // A warning said at most every ten seconds: a flood, or a process out of descriptors,
    // would otherwise write one line for every connection it meets.
    let due = |said: &mut Option<Instant>| {
        let due = said.is_none_or(|at| at.elapsed() >= Duration::from_secs(10));
        if due {
            *said = Some(Instant::now());
        }
        due
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if open.load(Ordering::Relaxed) >= cap => {
                    // Closed at once: the descriptors left are the ledger's and the pools'.
                    drop(stream);
                    crate::metrics::connection_refused();
                    if due(&mut refused_said) {
                        tracing::warn!(
                            open = cap,
                            "connections refused: as many are open as the open-files limit leaves room for"
                        );
                    }
                }
                Ok((stream, peer)) => {
                    let counted = Counted::new(&open);
                    let _ = stream.set_nodelay(true);
                    // The configuration current when the connection arrives: a reload applies
                    // to new connections (TLS) and new requests (everything else).
                    let acceptor = TlsAcceptor::from(live.tls());
                    let limits = Limits::from(&live.gateway().config.server);
                    let (live, watcher) = (Arc::clone(&live), graceful.watcher());
                    tokio::spawn(async move {
                        serve_connection(stream, peer, acceptor, live, limits, watcher).await;
                        drop(counted);
                    });
                }
                Err(e) => {
                    if due(&mut accept_failed_said) {
                        tracing::warn!(error = %e, "accept failed");
                    }
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

/// Descriptors kept for the ledger (the lsm engine caches up to 256 tables, and opens new ones
/// as it flushes), its journals, the database pools and the plugins.
const RESERVED_FILES: u64 = 512;

/// How many client connections may be open at once: the open-files limit less
/// [`RESERVED_FILES`] (at least half the limit): a flood of connections must not take the
/// descriptors the ledger needs to write.
pub fn connection_cap() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1 << 20);
    usize::try_from(limit.saturating_sub(RESERVED_FILES).max(limit / 2)).unwrap_or(usize::MAX)
}

/// One open connection, counted while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(open))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let activity = Arc::new(Activity::default());
    let in_service = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request| {
        let (gateway, identity) = (live.gateway(), identity.clone());
        let busy = Busy::start(&in_service);
        async move {
            let response = respond(&gateway, identity.as_ref(), request, limits).await;
            drop(busy);
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // HTTP/1.1: hyper's header timeout also runs while a kept-alive connection waits for its
    // next request, so it is the idle timeout here; the head timeout (slow or half-sent heads)
    // is the watch below.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.idle).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle / 2))
        .keep_alive_timeout(limits.header)
        .max_concurrent_streams(256);
    let io = Watched { inner: tls, activity: Arc::clone(&activity) };
    let connection = builder.serve_connection(TokioIo::new(io), service).into_owned();
    tokio::select! {
        served = watcher.watch(connection) => {
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
        }
        () = slow_head(&activity, limits.header), if !http2 => {
            tracing::debug!(%peer, "a request head arrived too slowly; connection closed");
        }
    }
    crate::metrics::connections(-1.0);
}

/// What an HTTP/1.1 connection is doing, for the head timeout: requests being served, and
/// since when bytes have been arriving while none was (a head in progress).
#[derive(Debug)]
struct Activity {
    started: std::time::Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds after `started` (plus one) when the current head began; 0: none.
    head_since: std::sync::atomic::AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self { started: std::time::Instant::now(), in_flight: Default::default(), head_since: Default::default() }
    }
}

/// A request being served (its head has arrived) until dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Self {
        use std::sync::atomic::Ordering;
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.head_since.store(0, Ordering::Release);
        Self(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Completes when a request head has been arriving for longer than `limit` (its first bytes
/// came while the connection was idle, and no request started since): a slow or half-sent
/// head. An idle connection (no bytes) is not timed here: hyper closes it after the idle
/// timeout.
async fn slow_head(activity: &Activity, limit: Duration) {
    use std::sync::atomic::Ordering;
    let tick = (limit / 5).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        let since = activity.head_since.load(Ordering::Acquire);
        let now = activity.started.elapsed().as_millis() as u64 + 1;
        if since != 0 && now.saturating_sub(since) > limit.as_millis() as u64 {
            return;
        }
    }
}

/// The connection's stream, noting when bytes arrive on an idle connection.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::sync::atomic::Ordering;
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let activity = &self.activity;
        if buf.filled().len() > before
            && activity.in_flight.load(Ordering::Acquire) == 0
            && activity.head_since.load(Ordering::Acquire) == 0
        {
            let now = activity.started.elapsed().as_millis() as u64 + 1;
            activity.head_since.store(now, Ordering::Release);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
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
    let mut bytes = [0u8; 8];
    let _ = crate::random::fill(&mut bytes);
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
        Some(institution) => gateway.limiter.check_request(institution).await.err().map(|limited| {
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
    let declared = declared_length(&parts.headers);
    // A client asking `Expect: 100-continue` sends nothing more until told to: it is answered
    // 413 without being asked for the body.
    let waits =
        parts.headers.get(http::header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (answer, close) = match read_body(body, declared, waits, limits).await {
        Ok(body) => {
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
            let content_type = header("content-type");
            let api_request = ApiRequest {
                method: &parts.method,
                path: parts.uri.path(),
                query: parts.uri.query(),
                idempotency_key: api::IdempotencyKey::from_header(parts.headers.get("idempotency-key")),
                json: content_type.map_or(body.is_empty(), is_json),
                encoded: parts.headers.get_all(http::header::CONTENT_ENCODING).iter().any(|v| {
                    // A value that is not text names no coding the gateway knows either.
                    v.to_str().map_or(true, |v| {
                        v.split(',').map(str::trim).any(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
                    })
                }),
                body: &body,
                request_id: &request_id,
            };
            (api::handle(gateway, identity, api_request).await, false)
        }
        Err((error, close)) => (ApiResponse::problem(&error, &request_id), close),
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
    let mut response = to_response(answer, &request_id);
    // An HTTP/1.1 client still sending a body the gateway will not read: close after the
    // answer, so its next request does not start in the middle of that body.
    if close && parts.version <= http::Version::HTTP_11 {
        response.headers_mut().insert("connection", HeaderValue::from_static("close"));
    }
    response
}

/// `application/json`, whatever its case and parameters (RFC 9110: media types are
/// case-insensitive).
fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// The body's declared `Content-Length`, if any.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

/// What the gateway reads of a body over the limit, to answer 413 to a client that sends it
/// all before it reads (most do): past this, it answers at once and closes.
const DRAIN_AT_MOST: usize = 1 << 20;

/// Reads the body under the size limit and the body timeout. A refusal says whether the
/// connection must close after it (a body left unread).
///
/// A body declared larger than the limit is refused before any of it is read: no
/// `100 Continue` is sent, and a client that declared a gigabyte gets its 413 at once. One
/// that turns out too large while it is read is read on (and dropped) up to
/// [`DRAIN_AT_MOST`], so the client finishes sending and reads its 413 rather than a broken
/// connection.
async fn read_body(
    body: Incoming,
    declared: Option<u64>,
    waits: bool,
    limits: Limits,
) -> Result<Bytes, (ApiError, bool)> {
    let too_large = || {
        ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {} bytes", limits.max_body),
        )
    };
    if let Some(length) = declared.filter(|l| *l > limits.max_body as u64) {
        // Small enough to take in and drop: the connection stays usable.
        if !waits && length <= (limits.max_body + DRAIN_AT_MOST) as u64 {
            let drained = tokio::time::timeout(limits.body, drain(body, DRAIN_AT_MOST + limits.max_body)).await;
            return Err((too_large(), !matches!(drained, Ok(true))));
        }
        return Err((too_large(), true));
    }
    let mut body = body;
    let mut collected = bytes::BytesMut::new();
    let reading = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return Err((ApiError::invalid("the body could not be read"), true)) };
            if let Ok(data) = frame.into_data() {
                if collected.len() + data.len() > limits.max_body {
                    let finished = drain(body, DRAIN_AT_MOST).await;
                    return Err((too_large(), !finished));
                }
                collected.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(limits.body, reading).await {
        Ok(Ok(())) => Ok(collected.freeze()),
        Ok(Err(refused)) => Err(refused),
        Err(_) => {
            Err((ApiError::client(StatusCode::REQUEST_TIMEOUT, "request_timeout", "the body arrived too slowly"), true))
        }
    }
}

/// Reads and drops the rest of a body, at most `limit` bytes; whether it ended within that.
async fn drain(mut body: Incoming, limit: usize) -> bool {
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        match frame.map(hyper::body::Frame::into_data) {
            Ok(Ok(data)) => {
                seen += data.len();
                if seen > limit {
                    return false;
                }
            }
            Ok(Err(_)) => {}
            Err(_) => return false,
        }
    }
    true
}

fn to_response(answer: ApiResponse, request_id: &str) -> Response<Full<Bytes>> {
    let content_type = if answer.problem { "application/problem+json" } else { "application/json" };
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    if let Some(seconds) = answer.retry_after {
        headers.insert("retry-after", HeaderValue::from(seconds));
    }
    if let Some(allow) = answer.allow {
        headers.insert("allow", HeaderValue::from_static(allow));
    }
    headers.insert("content-type", HeaderValue::from_static(content_type));
    headers.insert("cache-control", HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", value);
    }
    response
}
