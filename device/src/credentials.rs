//! A device's identity and where it goes: the certificate and key from activation, kept in a directory,
//! the owner the activation named, and the endpoint it was configured with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use courier_core::ids::DeviceId;
use courier_core::pki;
use rustls::pki_types::PrivateKeyDer;

use crate::error::ClientError;
use crate::redirect::RedirectTarget;

/// Where and how to reach a node's device port.
#[derive(Debug, Clone)]
pub struct DeviceEndpoint {
    pub addr: SocketAddr,
    /// Name checked against the certificate of the first node the device connects to; nodes it is
    /// redirected to are checked by the name the redirect gives.
    pub server_name: String,
    /// The cluster CA, which signs node certificates.
    pub ca_path: PathBuf,
}

/// A device's identity: the certificate the device CA issued and its private key.
#[derive(Clone)]
pub struct DeviceCredentials {
    pub device_id: DeviceId,
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The node that owned the device id when it was activated, where the first link goes. `None` when
    /// the activating node knew no owner (or predates `Activated.owner`), or for credentials saved before
    /// it was kept: the link then starts at the configured endpoint.
    pub owner: Option<RedirectTarget>,
}

impl std::fmt::Debug for DeviceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCredentials").field("device_id", &self.device_id).finish_non_exhaustive()
    }
}

impl DeviceCredentials {
    /// Writes `device.pem`, `device.key` and, when there is an owner, `owner.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), ClientError> {
        let err = |e: std::io::Error| ClientError::Credentials { path: dir.into(), detail: e.to_string() };
        std::fs::create_dir_all(dir).map_err(err)?;
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", self.cert_der.clone()));
        std::fs::write(dir.join("device.pem"), cert).map_err(err)?;
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", self.key_der.clone()));
        courier_core::secret_file::write_secret(&dir.join("device.key"), key.as_bytes()).map_err(err)?;
        let owner_path = dir.join(OWNER_FILE);
        match &self.owner {
            Some(owner) => {
                let json = serde_json::to_vec_pretty(owner).map_err(|e| err(e.into()))?;
                std::fs::write(owner_path, json).map_err(err)
            }
            // An owner file left by earlier credentials in this directory belongs to another device.
            None => match std::fs::remove_file(owner_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(err(e)),
                _ => Ok(()),
            },
        }
    }

    /// Reads credentials saved by `save`; `None` if `dir` has none. Directories saved before the owner was
    /// kept (no `owner.json`) load with no owner.
    pub fn load(dir: &Path) -> Result<Option<Self>, ClientError> {
        let (cert_path, key_path) = (dir.join("device.pem"), dir.join("device.key"));
        if !cert_path.exists() || !key_path.exists() {
            return Ok(None);
        }
        let cert = pki::load_certs(&cert_path)?.remove(0);
        let key = match pki::load_key(&key_path)? {
            PrivateKeyDer::Pkcs8(key) => key.secret_pkcs8_der().to_vec(),
            _ => {
                return Err(ClientError::Credentials { path: key_path, detail: "expected a PKCS#8 key".into() });
            }
        };
        let device_id = pki::device_id_from_cert(&cert).ok_or_else(|| ClientError::Credentials {
            path: cert_path,
            detail: "certificate names no device id".into(),
        })?;
        let owner_path = dir.join(OWNER_FILE);
        let owner = match std::fs::read(&owner_path) {
            Ok(json) => Some(serde_json::from_slice(&json).map_err(|e| ClientError::Credentials {
                path: owner_path,
                detail: format!("not an owner address: {e}"),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ClientError::Credentials { path: owner_path, detail: e.to_string() }),
        };
        Ok(Some(DeviceCredentials { device_id, cert_der: cert.to_vec(), key_der: key, owner }))
    }
}

/// The file in a credentials directory naming the owner learned at activation (JSON: `device_addr`,
/// `server_name`).
const OWNER_FILE: &str = "owner.json";

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(dir: &Path, owner: Option<RedirectTarget>) -> DeviceCredentials {
        pki::init(dir, &pki::PkiOptions::default()).unwrap();
        let ca = pki::DeviceCa::load(&pki::PkiDir::new(dir)).unwrap();
        let (key, csr) = pki::new_device_key_and_csr().unwrap();
        let device_id = DeviceId::random();
        let cert = ca.issue(&csr, device_id).unwrap();
        DeviceCredentials { device_id, cert_der: cert.to_vec(), key_der: key.serialize_der(), owner }
    }

    #[test]
    fn credentials_keep_their_owner_and_older_directories_load_without_one() {
        let pki_dir = tempfile::tempdir().unwrap();
        let owner =
            RedirectTarget { device_addr: "10.0.0.2:5223".into(), server_name: "node-2.courier.internal".into() };
        let credentials = issued(pki_dir.path(), Some(owner.clone()));
        let home = tempfile::tempdir().unwrap();
        credentials.save(home.path()).unwrap();
        let loaded = DeviceCredentials::load(home.path()).unwrap().unwrap();
        assert_eq!((loaded.device_id, loaded.owner), (credentials.device_id, Some(owner)));

        // A directory written before owners were kept.
        std::fs::remove_file(home.path().join(OWNER_FILE)).unwrap();
        let old = DeviceCredentials::load(home.path()).unwrap().unwrap();
        assert_eq!((old.device_id, old.owner), (credentials.device_id, None));

        // Credentials without an owner saved over ones with one leave no owner behind.
        credentials.save(home.path()).unwrap();
        DeviceCredentials { owner: None, ..credentials.clone() }.save(home.path()).unwrap();
        assert_eq!(DeviceCredentials::load(home.path()).unwrap().unwrap().owner, None);

        std::fs::write(home.path().join(OWNER_FILE), "{not json").unwrap();
        let damaged = DeviceCredentials::load(home.path()).unwrap_err();
        assert!(matches!(damaged, ClientError::Credentials { .. }), "{damaged}");
    }
}
