//! When certificates expire: `courier_certificate_expiry_timestamp_seconds` for every certificate a
//! process loaded, so an alert can warn before one does.

use std::path::{Path, PathBuf};

use super::*;

/// The notAfter time of the first certificate in a PEM file, UNIX seconds.
pub fn not_after(path: &Path) -> Result<i64, PkiError> {
    use x509_parser::prelude::FromDer;
    let certs = load_certs(path)?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(certs[0].as_ref())
        .map_err(|e| PkiError::Invalid { path: path.into(), detail: e.to_string() })?;
    Ok(cert.validity().not_after.timestamp())
}

/// Publishes `courier_certificate_expiry_timestamp_seconds{certificate}` for each certificate a process
/// loaded, so that an alert can warn before one expires.
pub fn export_certificate_expiry(certificates: &[(&str, PathBuf)]) {
    metrics::describe_gauge!(
        "courier_certificate_expiry_timestamp_seconds",
        "When each certificate this process loaded expires (notAfter), UNIX seconds."
    );
    for (name, path) in certificates {
        match not_after(path) {
            Ok(at) => {
                metrics::gauge!("courier_certificate_expiry_timestamp_seconds", "certificate" => name.to_string())
                    .set(at as f64)
            }
            Err(error) => tracing::warn!(%error, "cannot read a certificate's expiry"),
        }
    }
}
