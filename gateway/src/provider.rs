//! The provider side of the APNs API: a JWT signer and an HTTP/2 client, as an app server would use them.
//!
//! `courier send`, the gateway's tests and the load generator all push through this, so it speaks the
//! wire format exactly as a third-party APNs client would and knows nothing about the gateway's insides.
//! One `ProviderClient` is one TLS connection carrying many concurrent streams; clone it to share it. When
//! the gateway has closed that connection (GOAWAY after its idle or first-request timeout, or on shutdown),
//! the next request dials a new one, as APNs client libraries do.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use courier_core::pki::{PkiDir, ProviderCredential};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest response body we read; APNs answers are a few dozen bytes.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("the provider signing key is not a usable ES256 key: {0}")]
    BadSigningKey(jsonwebtoken::errors::Error),
    #[error(transparent)]
    Pki(#[from] courier_core::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] courier_core::tls::TlsError),
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0:?} is not a valid TLS server name")]
    BadServerName(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("the gateway did not negotiate HTTP/2 (ALPN h2)")]
    NoHttp2,
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] http::Error),
    #[error("reading the response body: {0}")]
    Body(String),
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
}

/// Signs provider JWTs with a team's `.p8` key, as Apple's tooling does.
#[derive(Clone)]
pub struct JwtSigner {
    team_id: String,
    key_id: String,
    key: EncodingKey,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner").field("team_id", &self.team_id).field("key_id", &self.key_id).finish()
    }
}

impl JwtSigner {
    pub fn new(team_id: &str, key_id: &str, p8_pem: &[u8]) -> Result<Self, ProviderError> {
        let key = EncodingKey::from_ec_pem(p8_pem).map_err(ProviderError::BadSigningKey)?;
        let signer = JwtSigner { team_id: team_id.into(), key_id: key_id.into(), key };
        // Sign once now so that `sign` can promise never to fail.
        signer.try_sign_at(0).map_err(ProviderError::BadSigningKey)?;
        Ok(signer)
    }

    /// The signer for the provider credential a PKI directory holds (`provider.json` + `AuthKey_<kid>.p8`).
    pub fn from_pki(pki: &PkiDir) -> Result<Self, ProviderError> {
        let credential = ProviderCredential::load(&pki.provider_credential())?;
        let path = pki.provider_signing_key(&credential.key_id);
        let p8 =
            std::fs::read(&path).map_err(|source| ProviderError::Io { path: path.display().to_string(), source })?;
        JwtSigner::new(&credential.team_id, &credential.key_id, &p8)
    }

    /// A token issued now.
    pub fn sign(&self) -> String {
        self.sign_at((courier_core::ids::unix_millis() / 1000) as i64)
    }

    /// A token claiming to be issued at `iat` (UNIX seconds); tests use it to make stale tokens.
    pub fn sign_at(&self, iat: i64) -> String {
        self.try_sign_at(iat).expect("the key signed a token when the signer was built")
    }

    fn try_sign_at(&self, iat: i64) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, &Claims { iss: &self.team_id, iat }, &self.key)
    }

    pub fn team_id(&self) -> &str {
        &self.team_id
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

/// One push as a provider describes it. `None` headers are not sent at all.
#[derive(Default, Clone, Debug)]
pub struct Push {
    /// Hex device token, placed in the path.
    pub token: String,
    pub topic: Option<String>,
    pub apns_id: Option<String>,
    pub expiration: Option<String>,
    pub priority: Option<String>,
    pub collapse_id: Option<String>,
    pub push_type: Option<String>,
    /// The whole `authorization` value, e.g. `bearer <jwt>`.
    pub authorization: Option<String>,
    pub payload: Vec<u8>,
}

/// What the gateway answered.
#[derive(Debug, Clone)]
pub struct PushResponse {
    pub status: u16,
    pub apns_id: Option<String>,
    /// `reason` from an error body.
    pub reason: Option<String>,
    /// `timestamp` from a 410 body.
    pub timestamp: Option<u64>,
    pub body: Vec<u8>,
    /// Every response header (channel management answers carry `apns-request-id` and `apns-channel-id`).
    pub headers: http::HeaderMap,
}

impl PushResponse {
    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// An HTTP/2 connection to a gateway's provider API.
#[derive(Clone)]
pub struct ProviderClient {
    /// The live connection's request handle; replaced when the gateway has closed the connection.
    sender: Arc<std::sync::Mutex<SendRequest<Full<Bytes>>>>,
    /// How to dial again; its lock makes concurrent requests that find the connection closed dial once.
    dial: Arc<tokio::sync::Mutex<Dial>>,
    /// `https://name:port`, prefixed to every path: HTTP/2 requests carry scheme and authority.
    origin: Arc<str>,
}

/// Where and how the client connects.
struct Dial {
    addr: SocketAddr,
    name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
}

impl Dial {
    /// One TLS connection with HTTP/2 on it, its connection task spawned.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ProviderError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr).await.map_err(|source| ProviderError::Connect { addr, source })?;
        // Pushes are small and latency-bound.
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|source| ProviderError::Connect { addr, source })?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ProviderError::NoHttp2);
        }
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "provider connection ended");
            }
        });
        Ok(sender)
    }
}

impl std::fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderClient").field("origin", &self.origin).finish()
    }
}

impl ProviderClient {
    /// Connects over TLS, trusting only the CA in `ca_pem_path`, and insists on HTTP/2.
    pub async fn connect(addr: SocketAddr, server_name: &str, ca_pem_path: &Path) -> Result<Self, ProviderError> {
        ProviderClient::connect_with(addr, server_name, ca_pem_path, None).await
    }

    /// Connects presenting a provider client certificate (`courier ctl providers issue-cert`): pushes on
    /// this connection need no JWT.
    pub async fn connect_with_certificate(
        addr: SocketAddr,
        server_name: &str,
        ca_pem_path: &Path,
        cert_pem_path: &Path,
        key_pem_path: &Path,
    ) -> Result<Self, ProviderError> {
        let chain = courier_core::pki::load_certs(cert_pem_path)?;
        let key = courier_core::pki::load_key(key_pem_path)?;
        ProviderClient::connect_with(addr, server_name, ca_pem_path, Some((chain, key))).await
    }

    async fn connect_with(
        addr: SocketAddr,
        server_name: &str,
        ca_pem_path: &Path,
        identity: Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
    ) -> Result<Self, ProviderError> {
        let config = courier_core::tls::client_config(ca_pem_path, identity, &[b"h2"])?;
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| ProviderError::BadServerName(server_name.to_string()))?;
        let dial = Dial { addr, name, tls: Arc::new(config) };
        let sender = dial.connect().await?;
        let origin = if server_name.contains(':') {
            format!("https://[{server_name}]:{}", addr.port())
        } else {
            format!("https://{server_name}:{}", addr.port())
        };
        Ok(ProviderClient {
            sender: Arc::new(std::sync::Mutex::new(sender)),
            dial: Arc::new(tokio::sync::Mutex::new(dial)),
            origin: origin.into(),
        })
    }

    /// The live connection's handle, dialling a new connection first if the gateway closed the last one.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ProviderError> {
        let current = || self.sender.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sender = current();
        if !sender.is_closed() {
            return Ok(sender);
        }
        let dial = self.dial.lock().await;
        // Another request may have dialled while this one waited.
        let sender = current();
        if !sender.is_closed() {
            return Ok(sender);
        }
        let sender = dial.connect().await?;
        *self.sender.lock().unwrap_or_else(|p| p.into_inner()) = sender.clone();
        Ok(sender)
    }

    /// Sends `push` to `POST /3/device/{token}`.
    pub async fn push(&self, push: &Push) -> Result<PushResponse, ProviderError> {
        use http::header::HeaderName;
        // Names as constants and values checked once each: a load generator sends this for every push.
        let named = [
            (http::header::AUTHORIZATION, &push.authorization),
            (HeaderName::from_static("apns-topic"), &push.topic),
            (HeaderName::from_static("apns-id"), &push.apns_id),
            (HeaderName::from_static("apns-expiration"), &push.expiration),
            (HeaderName::from_static("apns-priority"), &push.priority),
            (HeaderName::from_static("apns-collapse-id"), &push.collapse_id),
            (HeaderName::from_static("apns-push-type"), &push.push_type),
        ];
        let uri = format!("{}/3/device/{}", self.origin, push.token).parse::<http::Uri>().map_err(http::Error::from)?;
        let mut headers = http::HeaderMap::with_capacity(named.len());
        for (name, value) in named {
            if let Some(value) = value {
                headers.insert(name, http::HeaderValue::from_str(value).map_err(http::Error::from)?);
            }
        }
        let body = Bytes::from(push.payload.clone());
        self.send(|| {
            let mut request = http::Request::new(Full::new(body.clone()));
            *request.method_mut() = http::Method::POST;
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = headers.clone();
            Ok(request)
        })
        .await
    }

    /// Sends an arbitrary request; for tests that need requests `push` cannot express.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<PushResponse, ProviderError> {
        let body = Bytes::from(body);
        self.send(|| {
            let mut builder = http::Request::builder().method(method.clone()).uri(format!("{}{}", self.origin, path));
            for (name, value) in &headers {
                builder = builder.header(name, value);
            }
            Ok(builder.body(Full::new(body.clone()))?)
        })
        .await
    }

    /// Sends the request `build` makes. When the gateway closed the connection before it processed the
    /// request (its GOAWAY names an earlier last stream, or the request never left), it is sent once more
    /// on a new connection, as RFC 9113 §6.8 allows and APNs client libraries do.
    async fn send(
        &self,
        build: impl Fn() -> Result<http::Request<Full<Bytes>>, ProviderError>,
    ) -> Result<PushResponse, ProviderError> {
        let response = match self.send_once(build()?).await {
            Err(ProviderError::Http(error)) if never_processed(&error) => self.send_once(build()?).await?,
            answered => answered?,
        };
        let status = response.status().as_u16();
        let apns_id = response.headers().get("apns-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BODY)
            .collect()
            .await
            .map_err(|e| ProviderError::Body(e.to_string()))?
            .to_bytes()
            .to_vec();
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name)).cloned();
        Ok(PushResponse {
            status,
            apns_id,
            reason: field("reason").and_then(|v| v.as_str().map(str::to_string)),
            timestamp: field("timestamp").and_then(|v| v.as_u64()),
            body,
            headers: parts.headers,
        })
    }

    async fn send_once(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, ProviderError> {
        let mut sender = self.sender().await?;
        if sender.ready().await.is_err() {
            // Closed between the check and now, before this request left: a new connection, once.
            sender = self.sender().await?;
            sender.ready().await?;
        }
        Ok(sender.send_request(request).await?)
    }
}

/// The request did not reach the gateway's handler: it was never sent, or the gateway's GOAWAY refused its
/// stream (streams above the GOAWAY's last stream id were not processed, RFC 9113 §6.8).
fn never_processed(error: &hyper::Error) -> bool {
    let refused = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .is_some_and(|h2| h2.is_go_away() && h2.is_remote());
    error.is_canceled() || refused
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signer_refuses_keys_that_are_not_p256() {
        assert!(JwtSigner::new("T", "K", b"not a key").is_err());
        let rsa_like = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(JwtSigner::new("T", "K", rsa_like.serialize_pem().as_bytes()).is_err());
    }

    #[test]
    fn signed_tokens_carry_kid_iss_and_iat() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signer = JwtSigner::new("TEAM", "KID", key.serialize_pem().as_bytes()).unwrap();
        let jwt = signer.sign_at(1234);
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KID"));
        let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(&jwt).unwrap();
        assert_eq!(claims, serde_json::json!({"iss": "TEAM", "iat": 1234}));
        assert_eq!((signer.team_id(), signer.key_id()), ("TEAM", "KID"));
    }

    #[test]
    fn from_pki_reads_the_generated_credential() {
        let dir = tempfile::tempdir().unwrap();
        let credential = courier_core::pki::init(dir.path(), &Default::default()).unwrap();
        let signer = JwtSigner::from_pki(&PkiDir::new(dir.path())).unwrap();
        assert_eq!(signer.team_id(), credential.team_id);
        assert_eq!(signer.key_id(), credential.key_id);
    }
}
