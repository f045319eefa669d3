//! A real HTTPS webhook receiver for receipt tests: HTTP/1.1 over TLS with a certificate from its own CA
//! (made here, at run time), recording every request it gets. It can be told to fail the next requests
//! with 500, as an endpoint that is down for a while, or to answer them late, as a slow one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// One request as the receiver got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub id: String,
    pub timestamp: u64,
    pub signature: String,
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The events of the batch.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).expect("a JSON body");
        body["data"]["events"].as_array().cloned().unwrap_or_default()
    }
}

pub struct Receiver {
    /// `https://127.0.0.1:<port>/hooks/courier`.
    pub url: String,
    /// The receiver's CA certificate (PEM), for `--webhook-ca`.
    pub ca_path: PathBuf,
    received: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicUsize>,
    /// The status failing requests are answered with.
    refusal: Arc<AtomicU16>,
    /// How many of the next requests are answered late, and how late (ms).
    slow: Arc<(AtomicUsize, AtomicU64)>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        courier_core::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let ca_path = dir.path().join("receiver-ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).expect("CA file");
        let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names =
            vec![SanType::DnsName("localhost".try_into().expect("name")), SanType::IpAddress([127, 0, 0, 1].into())];
        let cert = params.signed_by(&key, &issuer).expect("certificate");
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut tls = rustls::ServerConfig::builder_with_provider(courier_core::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicUsize::new(0));
        let refusal = Arc::new(AtomicU16::new(500));
        let slow = Arc::new((AtomicUsize::new(0), AtomicU64::new(0)));
        let (log, fail, refuse_with, late) = (received.clone(), failing.clone(), refusal.clone(), slow.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, log, fail) = (acceptor.clone(), log.clone(), fail.clone());
                let (refuse_with, late) = (refuse_with.clone(), late.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (log, fail, refuse_with, late) =
                            (log.clone(), fail.clone(), refuse_with.clone(), late.clone());
                        async move {
                            if late.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                                tokio::time::sleep(Duration::from_millis(late.1.load(Ordering::SeqCst))).await;
                            }
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                            let header = |name: &str| {
                                parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
                            };
                            let status =
                                match fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)) {
                                    Ok(_) => refuse_with.load(Ordering::SeqCst),
                                    Err(_) => 204,
                                };
                            log.lock().unwrap().push(Received {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                id: header("webhook-id"),
                                timestamp: header("webhook-timestamp").parse().unwrap_or(0),
                                signature: header("webhook-signature"),
                                body,
                                status,
                            });
                            // A redirect names another path here, which a sender must not follow.
                            let answer = http::Response::builder()
                                .status(status)
                                .header(http::header::LOCATION, "/elsewhere")
                                .body(Full::new(Bytes::new()));
                            Ok::<_, std::convert::Infallible>(answer.expect("response"))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let url = format!("https://{addr}/hooks/courier");
        Receiver { url, ca_path, received, failing, refusal, slow, _dir: dir, task }
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The events of the requests answered 2xx, in arrival order.
    pub fn accepted_events(&self) -> Vec<serde_json::Value> {
        self.requests().iter().filter(|r| r.status < 300).flat_map(Received::events).collect()
    }

    /// Answers the next `n` requests 500.
    pub fn fail_next(&self, n: usize) {
        self.refuse_next(n, 500);
    }

    /// Answers the next `n` requests only after `delay` (the request is recorded when answered).
    pub fn slow_next(&self, n: usize, delay: Duration) {
        self.slow.1.store(delay.as_millis() as u64, Ordering::SeqCst);
        self.slow.0.store(n, Ordering::SeqCst);
    }

    /// Answers the next `n` requests with `status` (a 3xx names `/elsewhere` as its location).
    pub fn refuse_next(&self, n: usize, status: u16) {
        self.refusal.store(status, Ordering::SeqCst);
        self.failing.store(n, Ordering::SeqCst);
    }
}

/// The provider team of a cluster's PKI in `dir`.
pub fn team_id(dir: &Path) -> String {
    let pki = courier_core::pki::PkiDir::new(dir);
    let credential: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pki.provider_credential()).expect("provider.json")).expect("JSON");
    credential["team_id"].as_str().expect("a team id").to_string()
}

/// The key of the `whsec_…` secret a `courier ctl webhooks` run printed.
pub fn printed_secret(run: &super::CtlRun) -> Vec<u8> {
    let word = run.stdout.split_whitespace().find(|w| w.starts_with("whsec_")).unwrap_or_else(|| panic!("{run:?}"));
    courier_core::webhook::SigningSecret::key_from_whsec(word).expect("a secret")
}

/// The apns-id (a UUID, as the provider API requires) a test uses for the notification it calls `label`.
pub fn apns_id(label: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    label.hash(&mut hasher);
    format!("{:08x}-0000-4000-8000-{:012x}", hasher.finish() as u32, hasher.finish() >> 16)
}

/// The first of `events` about the notification `label` with `outcome`.
pub fn event<'a>(events: &'a [serde_json::Value], label: &str, outcome: &str) -> Option<&'a serde_json::Value> {
    events.iter().find(|e| e["apns_id"] == apns_id(label).as_str() && e["outcome"] == outcome)
}

/// A push to `token` with the apns-id of `label`.
pub fn labelled_push(
    signer: &courier_gateway::provider::JwtSigner,
    token: &str,
    label: &str,
    expiration: u64,
    collapse: Option<&str>,
) -> courier_gateway::provider::Push {
    let mut push = super::push_for(signer, token, r#"{"aps":{"alert":"receipt"}}"#);
    push.apns_id = Some(apns_id(label));
    push.expiration = Some(expiration.to_string());
    push.collapse_id = collapse.map(str::to_string);
    push
}

/// Waits until the gateway's view names every one of `teams` as getting receipts (it then tags their pushes).
pub async fn gateway_sends_receipts_for(gateway: &courier_gateway::RunningGateway, teams: &[&str]) {
    super::eventually(std::time::Duration::from_secs(10), "the gateway knows the teams get receipts", || {
        let view = gateway.view.borrow().clone();
        std::future::ready(view.is_some_and(|v| teams.iter().all(|t| v.receipt_teams.contains(*t))))
    })
    .await;
}
