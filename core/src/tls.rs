//! rustls configurations for Courier's TLS endpoints, all built on the `ring` provider.
//!
//! Only `ring` is compiled in; `install_crypto_provider` makes it the process default as well, for
//! libraries (tonic) that call `ServerConfig::builder()` themselves.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::pki::{PkiDir, PkiError, load_certs, load_key};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Makes `ring` the process-wide rustls provider; harmless to call again.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store holding every certificate in a PEM file.
pub fn roots_from(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The device port: the node's certificate; a client certificate from the device CA is verified when
/// offered, and its absence is allowed so that unactivated devices can ask for one.
///
/// Sessions resume through stateless tickets (one per handshake, keys rotated by rustls every 6 hours and
/// held only in this process), so a reconnecting device skips the certificate exchange and the node keeps
/// no per-session memory. A resumed session carries the client certificate it was made with.
/// `member` names the certificate in `pki` the node presents (`node-<K>`).
pub fn device_server_config(pki: &PkiDir, member: &str) -> Result<ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from(&pki.device_ca_cert())?), crypto_provider())
            .allow_unauthenticated()
            .build()?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&pki.member_cert(member))?, load_key(&pki.member_key(member))?)?;
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    Ok(config)
}

/// A server that any TLS client can reach, advertising `alpn` protocols.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client that trusts the CA in `ca_path` and, when given one, presents a client certificate.
pub fn client_config(
    ca_path: &Path,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    client_config_with_roots(Arc::new(roots_from(ca_path)?), identity, alpn)
}

/// As `client_config`, with the trusted roots already loaded.
pub fn client_config_with_roots(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
