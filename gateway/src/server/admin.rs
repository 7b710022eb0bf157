//! The admin listener: health, readiness, the loaded plugins and their reload, the routing
//! table. Plain HTTP on a loopback address only (validated at load).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
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
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (live, acceptor) = (Arc::clone(&live), acceptor.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let gateway = live.gateway();
                        async move { Ok::<_, std::convert::Infallible>(respond(&gateway, request).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(std::time::Duration::from_secs(5), acceptor.accept(stream));
                            if let Ok(Ok(tls)) = handshake.await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
    response
}

async fn respond(gateway: &Arc<Gateway>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({ "status": "ok" })),
        (&Method::GET, "/readyz") => readiness(gateway).await,
        (&Method::GET, "/admin/plugins") => reply(StatusCode::OK, plugins(gateway)),
        (&Method::POST, "/admin/plugins/reload") => reload(gateway).await,
        (&Method::GET, "/admin/routes") => reply(StatusCode::OK, routes(gateway)),
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(crate::metrics::render())));
            response.headers_mut().insert("content-type", http::HeaderValue::from_static("text/plain; version=0.0.4"));
            response
        }
        _ => reply(StatusCode::NOT_FOUND, json!({ "code": "not_found" })),
    }
}

/// Ready: the ledger reads and takes writes (after a failed commit, a probe must commit within
/// two seconds), every plugin is loaded, and the gateway is not draining.
async fn readiness(gateway: &Gateway) -> Response<Full<Bytes>> {
    let writable = matches!(
        tokio::time::timeout(std::time::Duration::from_secs(2), gateway.ledger.probe()).await,
        Ok(Ok(()))
    );
    let ledger = writable && gateway.ledger.unresolved().is_ok();
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
                "sha256": handle.sha256(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({ "generation": set.generation, "plugins": list })
}

async fn reload(gateway: &Arc<Gateway>) -> Response<Full<Bytes>> {
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
