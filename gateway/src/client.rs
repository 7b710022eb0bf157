//! A small HTTPS client with a client certificate, for the example POS/HIS client, the
//! end-to-end tests and the load harness: keep-alive HTTP/1.1 connections over rustls, or
//! HTTP/2 (ALPN `h2`) connections whose requests share one connection as streams.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Connects to one gateway as one institution.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    connector: TlsConnector,
    /// The same TLS settings offering only `h2`.
    connector_h2: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.addr)
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// `content-type`.
    pub content_type: String,
    /// `x-request-id`.
    pub request_id: String,
    /// `retry-after`, when present.
    pub retry_after: Option<String>,
    /// `allow`, when present.
    pub allow: Option<String>,
    /// Body.
    pub body: String,
}

impl Reply {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

impl Client {
    /// A client trusting `ca_pem` and presenting `cert_pem` / `key_pem`.
    pub fn new(addr: SocketAddr, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(ca.map_err(|e| format!("CA: {e}"))?).map_err(|e| format!("CA: {e}"))?;
        }
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("client certificate: {e}"))?;
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
            connector_h2: TlsConnector::from(Arc::new(h2)),
            server_name: ServerName::try_from("localhost").map_err(|e| e.to_string())?,
        })
    }

    /// The gateway's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Opens a keep-alive connection.
    pub async fn connect(&self) -> Result<Connection, String> {
        let tls = self.tls(&self.connector).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender: Sender::Http1(sender) })
    }

    /// Opens an HTTP/2 connection (fails unless the server agrees to `h2`). Its requests are
    /// streams of the one connection: [`Connection::stream`] gives another handle on it.
    pub async fn connect_h2(&self) -> Result<Connection, String> {
        let tls = self.tls(&self.connector_h2).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("the server did not agree to HTTP/2".into());
        }
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender: Sender::Http2(sender) })
    }

    /// A bare TLS connection as this institution, for requests written by hand (tests that
    /// send a head and hold the body back, as a slow or hostile client would).
    pub async fn open_tls(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        self.tls(&self.connector).await
    }

    /// TCP (no delay) and TLS with `connector`'s settings.
    async fn tls(&self, connector: &TlsConnector) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let tcp = TcpStream::connect(self.addr).await.map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        connector.connect(self.server_name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))
    }

    /// One request on a new connection.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Reply, String> {
        self.connect().await?.send(method, path, headers, body).await
    }
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct Connection {
    sender: Sender,
}

#[derive(Debug)]
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    /// Another handle on an HTTP/2 connection, for a request sent alongside this one's (a
    /// stream of the same connection); `None` on HTTP/1.1, one request at a time.
    pub fn stream(&self) -> Option<Connection> {
        match &self.sender {
            Sender::Http1(_) => None,
            Sender::Http2(sender) => Some(Connection { sender: Sender::Http2(sender.clone()) }),
        }
    }

    /// Sends a request (JSON body when given) and reads the whole answer.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Reply, String> {
        let mut request = match self.sender {
            Sender::Http1(_) => Request::builder().uri(path).header("host", "localhost"),
            // HTTP/2 carries the authority in the request's URI (`:authority`), not a header.
            Sender::Http2(_) => Request::builder().uri(format!("https://localhost{path}")),
        }
        .method(method);
        if body.is_some() && !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request =
            request.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned()))).map_err(|e| e.to_string())?;
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await.map_err(|e| format!("connection: {e}"))?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                sender.ready().await.map_err(|e| format!("connection: {e}"))?;
                sender.send_request(request).await
            }
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let header =
            |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let (content_type, request_id) = (header("content-type"), header("x-request-id"));
        let optional = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (retry_after, allow) = (optional("retry-after"), optional("allow"));
        let bytes = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        let body = String::from_utf8_lossy(&bytes).into_owned();
        Ok(Reply { status, content_type, request_id, retry_after, allow, body })
    }
}
