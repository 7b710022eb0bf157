//! The admin listener: health, readiness, the loaded plugins and their reload, the routing
//! table, a business day's export for finance. Plain HTTP on a loopback address only
//! (validated at load), or mutual TLS; everything under `/admin/` also needs the operator's
//! token (see [`operator_refusal`]). At most [`MAX_CONNECTIONS`] connections, each closed
//! when a request's head is slow or when the listener stops; requests a web page could forge
//! are refused (see [`browser_refusal`]).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::plugin::Dispatch;
use crate::service::{Gateway, Live};

/// Serves the admin API until `shutdown` completes: plain HTTP, or mutual TLS when `tls` is
/// given (any client certificate from the admin CA is an operator).
pub async fn run(
    listener: TcpListener,
    live: Arc<Live>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let plain = acceptor.is_none();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Told to every connection when the listener stops: each finishes the answer it is sending
    // and closes, so none keeps the gateway (and its ledger) alive after a stop.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors: give connections time to close.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                // Past the cap a new connection is closed at once: idle admin sockets can never
                // take the descriptors the TLS listener needs.
                let Ok(slot) = Arc::clone(&connections).try_acquire_owned() else { continue };
                let (live, acceptor, stop) = (Arc::clone(&live), acceptor.clone(), stop.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |request| {
                        let gateway = live.gateway();
                        async move { Ok::<_, std::convert::Infallible>(respond(&gateway, request, plain).await) }
                    });
                    // A request's head must arrive within the timeout, and so must the next one
                    // on a kept-alive connection: a half-sent or idle connection is closed.
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
                    match acceptor {
                        None => {
                            let serving = http.serve_connection(TokioIo::new(stream), service);
                            let _ = tokio::time::timeout(CONNECTION_LIFETIME, until_stopped(serving, stop)).await;
                        }
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream));
                            if let Ok(Ok(tls)) = handshake.await {
                                let serving = http.serve_connection(TokioIo::new(tls), service);
                                let _ = tokio::time::timeout(CONNECTION_LIFETIME, until_stopped(serving, stop)).await;
                            }
                        }
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    let _ = stopping.send(true);
}

/// Serves one connection until it ends, or until the listener stops: then the answer being
/// sent is finished and the connection closed.
async fn until_stopped<I, S>(
    serving: hyper::server::conn::http1::Connection<I, S>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Told, or the listener gone without telling: either way it has stopped.
    let stopped = async move {
        let _ = stop.wait_for(|stopped| *stopped).await.is_ok();
    };
    tokio::pin!(serving);
    tokio::select! {
        _ = serving.as_mut() => {}
        () = stopped => {
            serving.as_mut().graceful_shutdown();
            let _ = serving.await;
        }
    }
}

/// Admin connections open at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a request's head (and, on a kept-alive connection, the next request) may take.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The longest an admin connection lives, however busy (a reload answers well within it).
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);

/// Why a request to the plain (loopback) listener is refused before it is looked at: a page in
/// a browser on this machine must not reach it. Its `Host` must name the loopback (no DNS
/// rebinding), an `Origin` if sent must be the loopback's, and a request that changes state
/// must say `Content-Type: application/json`, which a page cannot send across origins without
/// a preflight this listener never grants.
/// Over mutual TLS (a remote operator's own name in `Host`) only the content-type rule applies.
fn browser_refusal(request: &Request<Incoming>, plain: bool) -> Option<&'static str> {
    let loopback = |authority: &str| {
        let host = authority.rsplit_once(':').filter(|(h, p)| !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        let host = host.map_or(authority, |(h, _)| h);
        matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.starts_with("127.")
    };
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    if plain && !header("host").is_some_and(loopback) {
        return Some("the Host header must name the loopback address (localhost, 127.0.0.1 or [::1])");
    }
    if let Some(origin) = header("origin").filter(|_| plain) {
        let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        if !authority.is_some_and(loopback) {
            return Some("requests from a web page of another origin are refused");
        }
    }
    let json = header("content-type")
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if request.method() != Method::GET && request.method() != Method::HEAD && !json {
        return Some("a request that changes state must be sent with Content-Type: application/json");
    }
    None
}

/// An answer's body: whole, or streamed (an export), which may end in an error.
type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn whole(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(whole(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    response
}

/// Whether a request under `/admin/` may go on: `None` if so, else the refusal. Health,
/// readiness and metrics answer anyone who can connect (probes and scrapers); what reads the
/// ledger, shows the plugins or reloads them needs the operator's token (`admin.token_file`),
/// or, on a listener without one, mutual TLS. A loopback port is open to every local user, so
/// a plain listener without a token serves none of it.
fn operator_refusal(gateway: &Gateway, request: &Request<Incoming>, plain: bool) -> Option<Response<Body>> {
    if !request.uri().path().starts_with("/admin/") {
        return None;
    }
    let token = gateway.config.admin.as_ref().and_then(|a| a.token.as_deref());
    let Some(token) = token else {
        if !plain {
            return None;
        }
        let detail = "the plain admin listener serves /admin/ only with a token: set [admin] token_file \
                      (docs/OPERATIONS.md, Admin listener)";
        return Some(reply(StatusCode::FORBIDDEN, json!({ "code": "forbidden", "detail": detail })));
    };
    let sent = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials.trim());
    // Compared by digest: the time a comparison takes tells nothing about the token.
    let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
    if sent.is_some_and(|sent| digest(sent).as_ref() == digest(token).as_ref()) {
        return None;
    }
    let detail = "send the operator's token: Authorization: Bearer <the contents of admin.token_file>";
    let mut refusal = reply(StatusCode::UNAUTHORIZED, json!({ "code": "unauthorized", "detail": detail }));
    refusal
        .headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer realm=\"cardgate-admin\""));
    Some(refusal)
}

async fn respond(gateway: &Arc<Gateway>, request: Request<Incoming>, plain: bool) -> Response<Body> {
    if let Some(reason) = browser_refusal(&request, plain) {
        return reply(StatusCode::FORBIDDEN, json!({ "code": "forbidden", "detail": reason }));
    }
    if let Some(refusal) = operator_refusal(gateway, &request, plain) {
        return refusal;
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => readiness(gateway).await,
        (&Method::GET, "/admin/plugins") => reply(StatusCode::OK, plugins(gateway)),
        (&Method::POST, "/admin/plugins/reload") => reload(gateway).await,
        (&Method::GET, "/admin/routes") => reply(StatusCode::OK, routes(gateway)),
        (&Method::GET, "/admin/ledger/export") => export(gateway, request.uri().query()).await,
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(whole(crate::metrics::render()));
            response.headers_mut().insert("content-type", http::HeaderValue::from_static("text/plain; version=0.0.4"));
            response
        }
        _ => reply(StatusCode::NOT_FOUND, json!({ "code": "not_found" })),
    }
}

/// Ready: the ledger reads and takes writes (after a failed commit, a probe must commit within
/// two seconds), every plugin is loaded, and the gateway is not draining.
async fn readiness(gateway: &Gateway) -> Response<Body> {
    let writable =
        matches!(tokio::time::timeout(std::time::Duration::from_secs(2), gateway.ledger.probe()).await, Ok(Ok(())));
    let ledger = writable && gateway.ledger.unresolved().await.is_ok();
    let plugins = gateway.plugins().handles.len() == gateway.config.plugins.len();
    let draining = gateway.is_draining();
    let status = if ledger && plugins && !draining { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    reply(
        status,
        json!({ "ready": status == StatusCode::OK, "ledger": ledger, "plugins": plugins, "draining": draining }),
    )
}

/// The current plugin generation, plugin by plugin.
pub fn plugins(gateway: &Gateway) -> Value {
    let set = gateway.plugins();
    let mut list: Vec<Value> = set
        .handles
        .iter()
        .map(|(name, handle)| {
            let info = handle.info();
            let breaker = handle.breaker_state().name();
            json!({
                "name": name,
                "declared_name": info.name,
                "version": info.version,
                "sdk_version": info.sdk_version,
                "abi": info.abi.to_string(),
                "tier": handle.tier(),
                "dispatch": if handle.dispatch() == Dispatch::Inline { "inline" } else { "pool" },
                "breaker": breaker,
                "calls": handle.counters().calls.load(Ordering::Relaxed),
                "failures": handle.counters().failures.load(Ordering::Relaxed),
                "stuck_calls": handle.stuck_calls(),
                "effect_free": info.effect_free,
                // In process a plugin shares the gateway's network; a process-tier child of an
                // effect-free plugin runs without one where the system allows.
                "network": match (handle.tier(), info.network_denied) {
                    ("process", true) => "denied",
                    ("process", false) => "allowed",
                    _ => "shared",
                },
                "sha256": handle.sha256(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({ "generation": set.generation, "plugins": list })
}

async fn reload(gateway: &Arc<Gateway>) -> Response<Body> {
    let worker = Arc::clone(gateway);
    match tokio::task::spawn_blocking(move || worker.reload_plugins()).await {
        Ok(Ok(_)) => reply(StatusCode::OK, plugins(gateway)),
        Ok(Err(errors)) => reply(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "code": "reload_failed", "errors": errors, "serving": plugins(gateway) }),
        ),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "code": "internal", "detail": e.to_string() })),
    }
}

fn routes(gateway: &Gateway) -> Value {
    let routes: Vec<Value> = gateway
        .config
        .routes
        .iter()
        .map(|r| {
            json!({
                "regions": r.regions, "insurance_types": r.insurance_types, "institutions": r.institutions,
                "cross_region": r.cross_region, "payers": r.payers,
            })
        })
        .collect();
    json!({ "routes": routes })
}

/// `GET /admin/ledger/export?date=YYYY-MM-DD[&institution=ID]`: the day's events as CSV, the
/// same lines as `cardgate ledger export`, from the running gateway's ledger (an engine one
/// process holds at a time cannot be opened by the command meanwhile). Streamed a page of
/// events at a time, so a day of any size costs the gateway one page of memory. The answer
/// waits for the first page: a ledger that cannot be read is a 503 before anything is sent;
/// one that fails later ends the answer without its last chunk, so a client never takes a
/// cut-short export for a whole one.
async fn export(gateway: &Arc<Gateway>, query: Option<&str>) -> Response<Body> {
    let invalid =
        |detail: String| reply(StatusCode::BAD_REQUEST, json!({ "code": "invalid_request", "detail": detail }));
    let (mut date, mut institution) = (None, None);
    let pairs = match crate::api::flow::query_pairs(query) {
        Ok(pairs) => pairs,
        Err(e) => return invalid(e.parts().2),
    };
    for (key, value) in pairs {
        match key {
            "date" => date = Some(value),
            "institution" => institution = Some(value),
            key => return invalid(format!("unknown parameter `{key}` (date, institution)")),
        }
    }
    let Some(date) = date.filter(|d| crate::ledger::is_business_day(d)) else {
        return invalid("date: YYYY-MM-DD, required".into());
    };
    let institutions: Vec<String> = match institution {
        Some(id) if gateway.config.institutions.contains_key(&id) => vec![id],
        Some(id) => {
            let detail = format!("no institution `{id}` in the configuration");
            return reply(StatusCode::NOT_FOUND, json!({ "code": "unknown_institution", "detail": detail }));
        }
        // In the configuration's (sorted) order, as the command writes them.
        None => gateway.config.institutions.keys().cloned().collect(),
    };
    let filename = format!("attachment; filename=\"cardgate-{date}.csv\"");
    let (pages, mut chunks) = tokio::sync::mpsc::channel::<Result<Bytes, crate::ledger::LedgerError>>(2);
    let worker = Arc::clone(gateway);
    tokio::spawn(async move {
        // The header goes out with the first page (or alone, for a day without events).
        let mut header = Some(crate::ledger::export::HEADER);
        let sent = crate::ledger::export::day_csv(&*worker.ledger, &institutions, &date, |page| {
            let pages = pages.clone();
            let chunk = match header.take() {
                Some(h) => format!("{h}{page}"),
                None => page,
            };
            async move { pages.send(Ok(Bytes::from(chunk))).await.is_ok() }
        })
        .await;
        match sent {
            Ok(lines) => {
                if let Some(h) = header {
                    let _ = pages.send(Ok(Bytes::from_static(h.as_bytes()))).await;
                }
                if pages.is_closed() {
                    tracing::info!(lines, %date, "ledger export left off: its reader went away");
                } else {
                    tracing::info!(lines, %date, "ledger exported (admin listener)");
                }
            }
            Err(e) => {
                if header.is_none() {
                    tracing::warn!(error = %e, %date, "ledger export failed midway; the answer ends cut short");
                } else {
                    tracing::warn!(error = %e, %date, "ledger export failed before its first page; answered 503");
                }
                let _ = pages.send(Err(e)).await;
            }
        }
    });
    let first = match chunks.recv().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => {
            let detail = e.to_string();
            return reply(StatusCode::SERVICE_UNAVAILABLE, json!({ "code": "storage_unavailable", "detail": detail }));
        }
        None => {
            let detail = "the export stopped before its first page";
            return reply(StatusCode::SERVICE_UNAVAILABLE, json!({ "code": "storage_unavailable", "detail": detail }));
        }
    };
    let mut response = Response::new(Chunks { first: Some(first), rest: chunks }.boxed());
    let headers = response.headers_mut();
    headers.insert("content-type", http::HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(disposition) = http::HeaderValue::from_str(&filename) {
        headers.insert("content-disposition", disposition);
    }
    response
}

/// An export's pages as they come; an error ends the body without its last chunk.
struct Chunks {
    /// The first page, already read.
    first: Option<Bytes>,
    rest: tokio::sync::mpsc::Receiver<Result<Bytes, crate::ledger::LedgerError>>,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(first) = self.first.take() {
            return std::task::Poll::Ready(Some(Ok(Frame::data(first))));
        }
        self.rest.poll_recv(cx).map(|chunk| chunk.map(|c| c.map(Frame::data).map_err(Into::into)))
    }
}
