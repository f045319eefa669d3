//! Issuing: the three CAs, member certificates for nodes, gateways and the admin, device certificates at
//! activation (`DeviceCa`), provider client certificates, and a device's own key and CSR.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::ids::DeviceId;
use crate::secret_file::write_secret;

use super::*;

pub(super) fn random_apple_style_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..10).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect()
}

pub(super) fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Courier");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(10 * 365 * 86400);
    params
}

/// Letters, digits, '-', '.', and '*' (wildcards); rcgen would take any ASCII.
pub(super) fn valid_dns_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.*".contains(&b))
}

pub(super) fn san(name: &str) -> Result<SanType, PkiError> {
    Ok(match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) if !valid_dns_name(name) => {
            return Err(PkiError::Invalid { path: PathBuf::new(), detail: format!("bad DNS name {name:?}") });
        }
        Err(_) => SanType::DnsName(
            name.try_into()
                .map_err(|_| PkiError::Invalid { path: PathBuf::new(), detail: format!("bad DNS name {name:?}") })?,
        ),
    })
}

/// A member certificate: the role URI, and for nodes and gateways (which serve TLS) loopback names,
/// `courier-<member>`, the node's own device name and `extra_sans`. The admin certificate is a client
/// certificate only and names no host.
pub(super) fn member_params(role: ClusterRole, extra_sans: &[String]) -> Result<CertificateParams, PkiError> {
    let member = role.member();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Courier");
    dn.push(DnType::CommonName, format!("courier-{member}"));
    params.distinguished_name = dn;
    let mut names = Vec::new();
    if role != ClusterRole::Admin {
        names.extend([
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            format!("courier-{member}"),
        ]);
        if let ClusterRole::Node(id) = role {
            names.push(node_device_name(id));
        }
        names.extend(extra_sans.iter().cloned());
    }
    let mut sans = names.iter().map(|n| san(n)).collect::<Result<Vec<_>, _>>()?;
    let urn = role.urn();
    sans.push(SanType::URI(
        urn.clone()
            .try_into()
            .map_err(|_| PkiError::Invalid { path: PathBuf::new(), detail: format!("{urn:?} is not a URI") })?,
    ));
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        ClusterRole::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        _ => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    };
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(2 * 365 * 86400);
    Ok(params)
}

/// Loads a CA from its certificate and key files, or creates both if neither exists.
pub(super) fn load_or_create_ca(
    cert_path: &Path,
    key_path: &Path,
    name: &str,
) -> Result<Issuer<'static, KeyPair>, PkiError> {
    if cert_path.exists() && key_path.exists() {
        return load_issuer(cert_path, key_path);
    }
    let key = KeyPair::generate()?;
    let cert = ca_params(name).self_signed(&key)?;
    write_secret(key_path, key.serialize_pem().as_bytes()).map_err(io_err(key_path))?;
    write_public(cert_path, cert.pem().as_bytes())?;
    load_issuer(cert_path, key_path)
}

pub(super) fn load_issuer(cert_path: &Path, key_path: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&read_text(key_path)?)
        .map_err(|e| PkiError::Invalid { path: key_path.into(), detail: e.to_string() })?;
    Issuer::from_ca_cert_pem(&read_text(cert_path)?, key)
        .map_err(|e| PkiError::Invalid { path: cert_path.into(), detail: e.to_string() })
}

/// Issues (or renews: replaces certificate and key) the certificate of `role` in `pki`, signed by its
/// cluster CA, naming `extra_sans` besides the defaults; returns the certificate's path.
pub fn issue(pki: &PkiDir, role: ClusterRole, extra_sans: &[String]) -> Result<PathBuf, PkiError> {
    if role == ClusterRole::Node(0) {
        return Err(PkiError::Invalid { path: pki.dir.clone(), detail: "node ids start at 1".into() });
    }
    let cluster_ca = load_issuer(&pki.cluster_ca_cert(), &pki.cluster_ca_key())?;
    issue_signed(pki, &cluster_ca, role, extra_sans)
}

pub(super) fn issue_signed(
    pki: &PkiDir,
    cluster_ca: &Issuer<'static, KeyPair>,
    role: ClusterRole,
    extra_sans: &[String],
) -> Result<PathBuf, PkiError> {
    let (cert_path, key_path) = pki.role_files(role);
    let key = KeyPair::generate()?;
    let cert = member_params(role, extra_sans)?.signed_by(&key, cluster_ca)?;
    write_secret(&key_path, key.serialize_pem().as_bytes()).map_err(io_err(&key_path))?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(cert_path)
}

/// Signs device certificates. Each carries the device id as its subject common name.
pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    /// How long an issued device certificate is valid.
    validity: Duration,
}

impl DeviceCa {
    pub fn load(pki: &PkiDir) -> Result<Self, PkiError> {
        Ok(DeviceCa {
            issuer: load_issuer(&pki.device_ca_cert(), &pki.device_ca_key())?,
            validity: Duration::from_secs(5 * 365 * 86400),
        })
    }

    /// Issues a certificate for `device` over the public key in `csr_der`. Only the key is taken from the
    /// request; names, extensions and lifetime are the CA's choice.
    pub fn issue(&self, csr_der: &[u8], device: DeviceId) -> Result<CertificateDer<'static>, PkiError> {
        let mut request = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Courier device");
        dn.push(DnType::CommonName, device.to_string());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&device.to_bytes()));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + self.validity;
        request.params = params;
        Ok(request.signed_by(&self.issuer)?.der().clone())
    }
}

/// Signs a provider client certificate for `team_id` and `topics` with the provider CA of `pki`, over a
/// fresh P-256 key; returns (certificate PEM, PKCS#8 key PEM). Needs the CA's private key.
pub fn issue_provider_cert(
    pki: &PkiDir,
    team_id: &str,
    topics: &[String],
    validity: Duration,
) -> Result<(String, String), PkiError> {
    let bad = |detail: String| PkiError::Invalid { path: PathBuf::new(), detail };
    if !valid_name(team_id) || team_id.contains(':') {
        return Err(bad(format!("team id {team_id:?} must be printable ASCII without ':'")));
    }
    if topics.is_empty() || !topics.iter().all(|t| valid_name(t)) {
        return Err(bad("a provider certificate needs at least one printable-ASCII topic".into()));
    }
    let issuer = load_issuer(&pki.provider_ca_cert(), &pki.provider_ca_key())?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Courier provider");
    dn.push(DnType::OrganizationalUnitName, team_id);
    dn.push(DnType::CommonName, format!("Courier Push Services: {}", topics[0]));
    params.distinguished_name = dn;
    let uri = |text: String| -> Result<SanType, PkiError> {
        Ok(SanType::URI(text.clone().try_into().map_err(|_| bad(format!("{text:?} is not a URI")))?))
    };
    let mut sans = vec![uri(format!("{TEAM_URN}{team_id}"))?];
    for topic in topics {
        sans.push(uri(format!("{TOPIC_URN}{topic}"))?);
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + validity;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A fresh P-256 key and a CSR for it, as a device makes before activation.
pub fn new_device_key_and_csr() -> Result<(KeyPair, Vec<u8>), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}
