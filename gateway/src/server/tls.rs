//! TLS: the server certificate, mandatory client certificates from the institutions' CA, and
//! the institution a client certificate names.
//!
//! An institution's certificate names it by a URI subject alternative name
//! `urn:cardgate:institution:<id>`, or else by its subject common name.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use spki::der::Decode;

use crate::config::ServerConfig;

/// The URI prefix naming an institution in a client certificate.
pub const INSTITUTION_URI_PREFIX: &str = "urn:cardgate:institution:";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server's TLS configuration, reporting every file that does not load.
pub fn server_config(c: &ServerConfig) -> Result<Arc<rustls::ServerConfig>, Vec<String>> {
    mutual_tls("server", &c.certificate, &c.private_key, &c.client_ca)
}

/// A mutual-TLS server configuration from PEM files; `section` prefixes the key paths of
/// problems.
pub fn mutual_tls(
    section: &str,
    certificate: &Path,
    private_key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, Vec<String>> {
    let mut problems = Vec::new();
    let certs: Vec<CertificateDer<'static>> = read_certs(certificate, &format!("{section}.certificate"), &mut problems);
    let key = PrivateKeyDer::from_pem_file(private_key)
        .map_err(|e| problems.push(format!("{section}.private_key: {}: {e}", private_key.display())))
        .ok();
    let mut roots = rustls::RootCertStore::empty();
    for ca in read_certs(client_ca, &format!("{section}.client_ca"), &mut problems) {
        if let Err(e) = roots.add(ca) {
            problems.push(format!("{section}.client_ca: {}: {e}", client_ca.display()));
        }
    }
    let (Some(key), true) = (key, problems.is_empty()) else { return Err(problems) };
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| vec![format!("{section}.client_ca: {e}")])?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![format!("tls: {e}")])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| vec![format!("{section}.certificate / {section}.private_key: {e}")])?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path, key: &str, problems: &mut Vec<String>) -> Vec<CertificateDer<'static>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path).and_then(|iter| iter.collect());
    match certs {
        Ok(certs) if !certs.is_empty() => certs,
        Ok(_) => {
            problems.push(format!("{key}: {}: no certificate in the file", path.display()));
            Vec::new()
        }
        Err(e) => {
            problems.push(format!("{key}: {}: {e}", path.display()));
            Vec::new()
        }
    }
}

/// The institution id the verified client certificate names.
pub fn identity(connection: &rustls::ServerConnection) -> Option<String> {
    let der = connection.peer_certificates()?.first()?;
    institution_of(der.as_ref())
}

/// The institution a DER certificate names: its `urn:cardgate:institution:` URI, else its CN.
pub fn institution_of(der: &[u8]) -> Option<String> {
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let tbs = &cert.tbs_certificate;
    let from_san = tbs.get::<SubjectAltName>().ok().flatten().and_then(|(_, san)| {
        san.0.iter().find_map(|name| match name {
            GeneralName::UniformResourceIdentifier(uri) => {
                uri.as_str().strip_prefix(INSTITUTION_URI_PREFIX).filter(|id| !id.is_empty()).map(str::to_owned)
            }
            _ => None,
        })
    });
    from_san.or_else(|| {
        const CN: spki::ObjectIdentifier = spki::ObjectIdentifier::new_unwrap("2.5.4.3");
        tbs.subject.0.iter().flat_map(|rdn| rdn.0.iter()).find(|atv| atv.oid == CN).and_then(|atv| {
            atv.value.decode_as::<x509_cert::der::asn1::Utf8StringRef<'_>>().ok().map(|s| s.as_str().to_owned())
        })
    })
}
