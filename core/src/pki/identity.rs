//! Reading what certificates and keys say: PEM files, the role a cluster certificate carries, a
//! provider certificate's team and topics, a device certificate's id, and provider public keys.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::ids::DeviceId;

use super::*;

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| PkiError::Invalid { path: path.into(), detail: e.to_string() })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Invalid { path: path.into(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(PkiError::Invalid { path: path.into(), detail: "no certificate in file".into() });
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PkiError::Invalid { path: path.into(), detail: e.to_string() })
}

/// What a cluster certificate lets its holder do; one URI subject alternative name says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterRole {
    /// Node K: Raft, replication, forwarding proposals to the leader.
    Node(u64),
    /// A gateway: delivering and watching the cluster.
    Gateway,
    /// The operator's `courier ctl`.
    Admin,
}

pub(super) const ROLE_URN: &str = "urn:courier:role:";

/// The DNS domain under which each node's device-facing name lives (`node-<K>.courier.internal`).
/// `.internal` is reserved for private use, so no public name can collide; the name is only checked
/// against certificates, never resolved (devices connect to the address a redirect gives).
pub const NODE_NAME_DOMAIN: &str = "courier.internal";

/// The name devices check node `id`'s certificate against after a redirect to it.
pub fn node_device_name(id: u64) -> String {
    format!("node-{id}.{NODE_NAME_DOMAIN}")
}

impl ClusterRole {
    /// The URI subject alternative name that carries this role.
    pub fn urn(self) -> String {
        match self {
            ClusterRole::Node(id) => format!("{ROLE_URN}node:{id}"),
            ClusterRole::Gateway => format!("{ROLE_URN}gateway"),
            ClusterRole::Admin => format!("{ROLE_URN}admin"),
        }
    }

    /// The file stem of this role's certificate and key in a PKI directory.
    pub fn member(self) -> String {
        match self {
            ClusterRole::Node(id) => PkiDir::node_member(id),
            ClusterRole::Gateway => "gateway".into(),
            ClusterRole::Admin => "admin".into(),
        }
    }

    fn parse_urn(uri: &str) -> Option<ClusterRole> {
        match uri.strip_prefix(ROLE_URN)? {
            "gateway" => Some(ClusterRole::Gateway),
            "admin" => Some(ClusterRole::Admin),
            other => {
                let id = other.strip_prefix("node:")?;
                // Digits only: `u64::from_str` would also take a leading '+'.
                if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                id.parse::<u64>().ok().filter(|id| *id > 0).map(ClusterRole::Node)
            }
        }
    }
}

impl std::fmt::Display for ClusterRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterRole::Node(id) => write!(f, "node {id}"),
            ClusterRole::Gateway => f.write_str("gateway"),
            ClusterRole::Admin => f.write_str("admin"),
        }
    }
}

/// The role a cluster certificate the TLS layer has already verified carries; `None` unless it has exactly
/// one role URI and that one is well formed (no SAN, two role names, an unknown role or a bad node id all
/// give no role, which the cluster API refuses everywhere).
pub fn role_from_cert(cert: &CertificateDer<'_>) -> Option<ClusterRole> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()).ok()?;
    let names = parsed.subject_alternative_name().ok()??;
    let mut roles = names.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with(ROLE_URN) => Some(*uri),
        _ => None,
    });
    let role = ClusterRole::parse_urn(roles.next()?)?;
    roles.next().is_none().then_some(role)
}

/// URI subject alternative names of provider certificates: `urn:courier:team:<team id>` (exactly one)
/// and `urn:courier:topic:<topic>` (one per topic).
pub(super) const TEAM_URN: &str = "urn:courier:team:";
pub(super) const TOPIC_URN: &str = "urn:courier:topic:";

/// Who a provider client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderIdentity {
    pub team_id: String,
    /// Topics (app bundle ids) the certificate may push to; never empty.
    pub topics: Vec<String>,
}

pub(super) fn valid_name(text: &str) -> bool {
    !text.is_empty() && text.len() <= 255 && text.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads the team and topics out of a provider certificate the TLS layer has already verified; `None`
/// when it names no team or no topic (a certificate from the provider CA that is not a provider's).
pub fn provider_identity_from_cert(cert: &CertificateDer<'_>) -> Option<ProviderIdentity> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()).ok()?;
    let names = parsed.subject_alternative_name().ok()??;
    let mut team = None;
    let mut topics = Vec::new();
    for name in &names.value.general_names {
        if let GeneralName::URI(uri) = name {
            if let Some(id) = uri.strip_prefix(TEAM_URN) {
                if team.replace(id.to_string()).is_some() {
                    return None;
                }
            } else if let Some(topic) = uri.strip_prefix(TOPIC_URN) {
                topics.push(topic.to_string());
            }
        }
    }
    let team_id = team.filter(|t| valid_name(t))?;
    (!topics.is_empty()).then_some(ProviderIdentity { team_id, topics })
}

/// Reads the device id out of a device certificate the TLS layer has already verified.
pub fn device_id_from_cert(cert: &CertificateDer<'_>) -> Option<DeviceId> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    cn.parse().ok()
}

/// Checks that `pem` is one SPKI public key on P-256, the only kind an ES256 provider key can be.
/// Deterministic, so the Raft state machine can use it to refuse bad keys before any gateway sees them.
pub fn check_es256_public_key(pem: &str) -> Result<(), String> {
    use x509_parser::prelude::FromDer;
    let parsed = ::pem::parse(pem.trim()).map_err(|e| format!("not PEM: {e}"))?;
    if parsed.tag() != "PUBLIC KEY" {
        return Err(format!("a {:?} block, not PUBLIC KEY", parsed.tag()));
    }
    let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(parsed.contents())
        .map_err(|e| format!("not a public key: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the public key".into());
    }
    let is_ec = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY;
    let on_p256 = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|curve| curve == x509_parser::oid_registry::OID_EC_P256);
    if !(is_ec && on_p256) {
        return Err("not an EC P-256 key (ES256)".into());
    }
    // An uncompressed point: 0x04 and two 32-byte coordinates.
    let point = &spki.subject_public_key.data;
    if point.len() != 65 || point[0] != 4 {
        return Err("not an uncompressed P-256 point".into());
    }
    Ok(())
}
