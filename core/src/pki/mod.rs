//! Courier's certificates and keys: creating them, loading them and reading identities out of them.
//!
//! A PKI directory holds three independent trust roots:
//! - the **cluster CA** signs node and gateway certificates (gRPC between them, and the TLS servers devices
//!   and providers connect to);
//! - the **device CA** signs device certificates at activation; only it is trusted for device links;
//! - the **provider signing key** is an ES256 key pair in Apple's `.p8` form, with a team id and key id,
//!   whose public half the gateway checks provider JWTs against;
//! - the **provider CA** signs provider client certificates, APNs's other way to authenticate: each names
//!   one team and the topics it may push to (`issue_provider_cert`, used by `courier ctl providers
//!   issue-cert`, which needs the CA's key and so runs offline, next to the PKI directory).
//!
//! Plus the token-key file (see `token`). This module does files and X.509; it opens no sockets. It is
//! split by job: the directory's layout and `init` here, `issue`, `identity` (reading certificates and
//! keys) and `expiry`; secret files are `crate::secret_file`.
//!
//! Every certificate the cluster CA signs names its **role** in one URI subject alternative name:
//! `urn:courier:role:node:<K>` (node K, in `node-<K>.pem`), `urn:courier:role:gateway` (`gateway.pem`) or
//! `urn:courier:role:admin` (`admin.pem`, what `courier ctl` presents). The cluster API authorizes each RPC
//! by it (`api::authz`). A node's certificate also carries its own device-facing name,
//! `node-<K>.courier.internal` (`node_device_name`), which no other certificate carries: devices redirected
//! to node K check the node by that name, so one node's key cannot stand in for another's.

use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use serde::{Deserialize, Serialize};

use crate::secret_file::write_secret;

mod expiry;
mod identity;
mod issue;

pub use expiry::*;
pub use identity::*;
pub use issue::*;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is not valid: {0}")]
    BadCsr(String),
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

pub(super) fn write_public(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    std::fs::write(path, contents).map_err(io_err(path))
}

pub(super) fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// The file names inside a PKI directory; one place, so nothing else spells them.
#[derive(Debug, Clone)]
pub struct PkiDir {
    pub dir: PathBuf,
}

impl PkiDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PkiDir { dir: dir.into() }
    }
    pub fn cluster_ca_cert(&self) -> PathBuf {
        self.dir.join("cluster-ca.pem")
    }
    pub fn cluster_ca_key(&self) -> PathBuf {
        self.dir.join("cluster-ca.key")
    }
    pub fn device_ca_cert(&self) -> PathBuf {
        self.dir.join("device-ca.pem")
    }
    pub fn device_ca_key(&self) -> PathBuf {
        self.dir.join("device-ca.key")
    }
    pub fn provider_ca_cert(&self) -> PathBuf {
        self.dir.join("provider-ca.pem")
    }
    pub fn provider_ca_key(&self) -> PathBuf {
        self.dir.join("provider-ca.key")
    }
    /// Certificate of a cluster member: `gateway`, `admin` (for `courier ctl`), or `node-<K>`
    /// (`node_cert` spells it).
    pub fn member_cert(&self, member: &str) -> PathBuf {
        self.dir.join(format!("{member}.pem"))
    }
    pub fn member_key(&self, member: &str) -> PathBuf {
        self.dir.join(format!("{member}.key"))
    }
    /// The file stem of node `id`'s certificate and key: `node-<id>`.
    pub fn node_member(id: u64) -> String {
        format!("node-{id}")
    }
    pub fn node_cert(&self, id: u64) -> PathBuf {
        self.member_cert(&Self::node_member(id))
    }
    pub fn node_key(&self, id: u64) -> PathBuf {
        self.member_key(&Self::node_member(id))
    }
    /// The certificate and key file of `role`.
    pub fn role_files(&self, role: ClusterRole) -> (PathBuf, PathBuf) {
        let member = role.member();
        (self.member_cert(&member), self.member_key(&member))
    }
    pub fn token_keys(&self) -> PathBuf {
        self.dir.join("token-keys.json")
    }
    pub fn provider_credential(&self) -> PathBuf {
        self.dir.join("provider.json")
    }
    pub fn provider_signing_key(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("AuthKey_{key_id}.p8"))
    }
}

/// A provider's signing credential as APNs issues it: team id, key id and an ES256 key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProviderCredential {
    /// The `iss` claim of the provider's JWTs (10 characters, as Apple's team ids).
    pub team_id: String,
    /// The `kid` header of the provider's JWTs.
    pub key_id: String,
    /// SPKI PEM of the public key the gateway verifies against.
    pub public_key_pem: String,
    /// Topics the team may push to; empty means any.
    #[serde(default)]
    pub topics: Vec<String>,
}

impl ProviderCredential {
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        let text = read_text(path)?;
        serde_json::from_str(&text).map_err(|e| PkiError::Invalid { path: path.into(), detail: e.to_string() })
    }
}

/// What `init` should put in the certificates beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct PkiOptions {
    /// Extra DNS names or IP addresses for node and gateway certificates.
    pub extra_sans: Vec<String>,
    /// Node ids (1, 2, …) to issue `node-<K>` certificates for, when missing; others come later with
    /// `issue(ClusterRole::Node(K), …)` (`courier pki issue node --id K`).
    pub nodes: Vec<u64>,
}

/// Creates whatever is missing in a PKI directory and leaves what exists alone, so running it twice is
/// harmless and a dev cluster keeps its identities across restarts.
pub fn init(dir: &Path, options: &PkiOptions) -> Result<ProviderCredential, PkiError> {
    let pki = PkiDir::new(dir);
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cluster_ca = load_or_create_ca(&pki.cluster_ca_cert(), &pki.cluster_ca_key(), "Courier cluster CA")?;
    load_or_create_ca(&pki.device_ca_cert(), &pki.device_ca_key(), "Courier device CA")?;
    load_or_create_ca(&pki.provider_ca_cert(), &pki.provider_ca_key(), "Courier provider CA")?;
    let roles = [ClusterRole::Gateway, ClusterRole::Admin].into_iter();
    for role in roles.chain(options.nodes.iter().map(|id| ClusterRole::Node(*id))) {
        let (cert_path, key_path) = pki.role_files(role);
        if cert_path.exists() && key_path.exists() {
            continue;
        }
        issue_signed(&pki, &cluster_ca, role, &options.extra_sans)?;
    }
    crate::token::Keyring::load_or_create(&pki.token_keys())
        .map_err(|e| PkiError::Invalid { path: pki.token_keys(), detail: e.to_string() })?;
    let credential_path = pki.provider_credential();
    if credential_path.exists() {
        return ProviderCredential::load(&credential_path);
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let credential = ProviderCredential {
        team_id: random_apple_style_id(),
        key_id: random_apple_style_id(),
        public_key_pem: key.public_key_pem(),
        topics: Vec::new(),
    };
    let p8 = pki.provider_signing_key(&credential.key_id);
    write_secret(&p8, key.serialize_pem().as_bytes()).map_err(io_err(&p8))?;
    let json = serde_json::to_string_pretty(&credential)
        .map_err(|e| PkiError::Invalid { path: credential_path.clone(), detail: e.to_string() })?;
    write_public(&credential_path, json.as_bytes())?;
    Ok(credential)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    use time::OffsetDateTime;

    use super::*;
    use crate::ids::DeviceId;

    #[test]
    fn init_is_idempotent_and_issues_device_certificates_carrying_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let options = PkiOptions { nodes: vec![1], ..PkiOptions::default() };
        let first = init(dir.path(), &options).unwrap();
        let node_cert = std::fs::read(dir.path().join("node-1.pem")).unwrap();
        let second = init(dir.path(), &options).unwrap();
        assert_eq!(first, second);
        assert_eq!(node_cert, std::fs::read(dir.path().join("node-1.pem")).unwrap());
        assert!(PkiDir::new(dir.path()).provider_signing_key(&first.key_id).exists());

        let ca = DeviceCa::load(&PkiDir::new(dir.path())).unwrap();
        let (_key, csr) = new_device_key_and_csr().unwrap();
        let device = DeviceId(0xfeed);
        let cert = ca.issue(&csr, device).unwrap();
        assert_eq!(device_id_from_cert(&cert), Some(device));
    }

    #[cfg(unix)]
    #[test]
    fn every_private_key_and_the_token_keys_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let credential = init(dir.path(), &PkiOptions { nodes: vec![1], ..PkiOptions::default() }).unwrap();
        let pki = PkiDir::new(dir.path());
        issue(&pki, ClusterRole::Node(2), &[]).unwrap();
        let mut secrets = vec![pki.token_keys(), pki.provider_signing_key(&credential.key_id)];
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "key") {
                secrets.push(path);
            }
        }
        assert!(secrets.len() >= 9, "three CAs, four members, provider and token keys: {secrets:?}");
        for path in secrets {
            assert_eq!(crate::secret_file::mode(&path).unwrap(), 0o600, "{}", path.display());
        }
    }

    #[test]
    fn member_certificates_name_localhost_and_loopback() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &PkiOptions { extra_sans: vec!["node-0.courier".into()], nodes: vec![1] }).unwrap();
        let certs = load_certs(&dir.path().join("node-1.pem")).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(certs[0].as_ref()).unwrap();
        let sans = format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value.general_names);
        assert!(sans.contains("localhost"), "{sans}");
        assert!(sans.contains("127.0.0.1") || sans.contains("[127, 0, 0, 1]"), "{sans}");
        assert!(sans.contains("node-0.courier"), "{sans}");
    }

    #[test]
    fn only_p256_public_keys_pass() {
        let good = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().public_key_pem();
        assert_eq!(check_es256_public_key(&good), Ok(()));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap().public_key_pem();
        assert!(check_es256_public_key(&p384).is_err());
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().public_key_pem();
        assert!(check_es256_public_key(&ed).is_err());
        for bad in ["", "hello", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"] {
            assert!(check_es256_public_key(bad).is_err(), "{bad:?}");
        }
        let private = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
        assert!(check_es256_public_key(&private).is_err());
    }

    #[test]
    fn provider_certificates_carry_team_and_topics() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &PkiOptions::default()).unwrap();
        let pki = PkiDir::new(dir.path());
        let topics = vec!["com.example.app".to_string(), "com.example.other".to_string()];
        let (cert_pem, key_pem) = issue_provider_cert(&pki, "TEAM123456", &topics, Duration::from_secs(3600)).unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let identity = provider_identity_from_cert(&cert).unwrap();
        assert_eq!(identity, ProviderIdentity { team_id: "TEAM123456".into(), topics });
        assert!(issue_provider_cert(&pki, "TEAM", &[], Duration::from_secs(60)).is_err());
        assert!(issue_provider_cert(&pki, "a b", &["t".into()], Duration::from_secs(60)).is_err());
        // A member certificate names no team.
        issue(&pki, ClusterRole::Node(1), &[]).unwrap();
        let node = load_certs(&pki.node_cert(1)).unwrap();
        assert_eq!(provider_identity_from_cert(&node[0]), None);
    }

    #[test]
    fn certificate_expiry_is_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &PkiOptions { nodes: vec![1], ..PkiOptions::default() }).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let node = not_after(&PkiDir::new(dir.path()).node_cert(1)).unwrap();
        assert!(node > now + 365 * 86400 && node <= now + 2 * 365 * 86400 + 60, "{node}");
        assert!(not_after(&dir.path().join("missing.pem")).is_err());
    }

    #[test]
    fn garbage_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &PkiOptions::default()).unwrap();
        let ca = DeviceCa::load(&PkiDir::new(dir.path())).unwrap();
        assert!(matches!(ca.issue(b"not a csr", DeviceId(1)), Err(PkiError::BadCsr(_))));
    }

    fn sans_of(cert: &CertificateDer<'_>) -> String {
        use x509_parser::prelude::FromDer;
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()).unwrap();
        format!("{:?}", cert.subject_alternative_name().unwrap().unwrap().value.general_names)
    }

    #[test]
    fn every_member_certificate_names_its_role_and_nodes_their_own_device_name() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &PkiOptions { nodes: vec![1, 2], ..PkiOptions::default() }).unwrap();
        let pki = PkiDir::new(dir.path());
        let role_of = |path: PathBuf| role_from_cert(&load_certs(&path).unwrap()[0]);
        assert_eq!(role_of(pki.node_cert(1)), Some(ClusterRole::Node(1)));
        assert_eq!(role_of(pki.node_cert(2)), Some(ClusterRole::Node(2)));
        assert_eq!(role_of(pki.member_cert("gateway")), Some(ClusterRole::Gateway));
        assert_eq!(role_of(pki.member_cert("admin")), Some(ClusterRole::Admin));
        let node1 = sans_of(&load_certs(&pki.node_cert(1)).unwrap()[0]);
        assert!(node1.contains(&node_device_name(1)) && !node1.contains(&node_device_name(2)), "{node1}");
        for other in [pki.node_cert(2), pki.member_cert("gateway"), pki.member_cert("admin")] {
            let sans = sans_of(&load_certs(&other).unwrap()[0]);
            assert!(!sans.contains(&node_device_name(1)), "{}: {sans}", other.display());
        }
        let admin = sans_of(&load_certs(&pki.member_cert("admin")).unwrap()[0]);
        assert!(!admin.contains("localhost"), "the admin certificate serves nothing: {admin}");
        // A device certificate carries no role.
        let ca = DeviceCa::load(&pki).unwrap();
        let (_key, csr) = new_device_key_and_csr().unwrap();
        assert_eq!(role_from_cert(&ca.issue(&csr, DeviceId(7)).unwrap()), None);
    }

    #[test]
    fn issuing_again_renews_certificate_and_key() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &PkiOptions::default()).unwrap();
        let pki = PkiDir::new(dir.path());
        assert!(!pki.node_cert(3).exists(), "init issues node certificates only when asked");
        issue(&pki, ClusterRole::Node(3), &["node-3.example.com".into()]).unwrap();
        let (cert, key) = (std::fs::read(pki.node_cert(3)).unwrap(), std::fs::read(pki.node_key(3)).unwrap());
        assert!(sans_of(&load_certs(&pki.node_cert(3)).unwrap()[0]).contains("node-3.example.com"));
        issue(&pki, ClusterRole::Node(3), &[]).unwrap();
        assert_ne!(cert, std::fs::read(pki.node_cert(3)).unwrap());
        assert_ne!(key, std::fs::read(pki.node_key(3)).unwrap());
        assert!(issue(&pki, ClusterRole::Node(0), &[]).is_err());
        assert!(issue(&pki, ClusterRole::Gateway, &["not a name!".into()]).is_err());
    }

    /// A certificate signed by a throwaway CA with exactly `sans`, for hostile-input cases.
    fn cert_with(sans: Vec<SanType>) -> CertificateDer<'static> {
        let ca_key = KeyPair::generate().unwrap();
        let ca = Issuer::new(ca_params("test CA"), ca_key);
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.signed_by(&KeyPair::generate().unwrap(), &ca).unwrap().der().clone()
    }

    #[test]
    fn hostile_role_names_give_no_role() {
        let uri = |text: &str| SanType::URI(text.to_string().try_into().unwrap());
        let dns = |text: &str| SanType::DnsName(text.to_string().try_into().unwrap());
        assert_eq!(role_from_cert(&cert_with(vec![])), None, "no SAN");
        assert_eq!(role_from_cert(&cert_with(vec![dns("localhost")])), None, "no role SAN");
        let two = vec![uri("urn:courier:role:gateway"), uri("urn:courier:role:admin")];
        assert_eq!(role_from_cert(&cert_with(two)), None, "two roles");
        let same_twice = vec![uri("urn:courier:role:admin"), uri("urn:courier:role:admin")];
        assert_eq!(role_from_cert(&cert_with(same_twice)), None, "one role twice");
        for bad in [
            "urn:courier:role:root",
            "urn:courier:role:",
            "urn:courier:role:Admin",
            "urn:courier:role:admin ",
            "urn:courier:role:node",
            "urn:courier:role:node:",
            "urn:courier:role:node:0",
            "urn:courier:role:node:-1",
            "urn:courier:role:node:+1",
            "urn:courier:role:node:1x",
            "urn:courier:role:node:99999999999999999999999",
            "urn:courier:role:node:1:2",
        ] {
            assert_eq!(role_from_cert(&cert_with(vec![uri(bad)])), None, "{bad}");
        }
        assert_eq!(role_from_cert(&CertificateDer::from(b"garbage".to_vec())), None);
        let good = vec![dns("localhost"), uri("urn:courier:team:X"), uri("urn:courier:role:node:12")];
        assert_eq!(role_from_cert(&cert_with(good)), Some(ClusterRole::Node(12)));
    }
}
