//! Activation: a fresh key and a certificate signing request sent to a node, which answers with the
//! device's certificate (and the node that owns it, where its first link goes).

use std::net::SocketAddr;
use std::time::Duration;

use courier_core::pki;
use courier_proto::device::{self as wire, device_frame, server_frame};
use futures_util::SinkExt;

use crate::connector::Connector;
use crate::credentials::{DeviceCredentials, DeviceEndpoint};
use crate::error::ClientError;
use crate::link::{device_frame, next_frame};
use crate::redirect::RedirectTarget;

/// Asks the node for a device certificate: a fresh key, a CSR, and the enrolment secret.
pub async fn activate(endpoint: &DeviceEndpoint, enrolment_secret: &str) -> Result<DeviceCredentials, ClientError> {
    activate_via(&Connector::new(endpoint, None)?, endpoint.addr, enrolment_secret).await
}

/// As `activate`, through a connector without identity (reused across many activations).
pub async fn activate_via(
    connector: &Connector,
    addr: SocketAddr,
    enrolment_secret: &str,
) -> Result<DeviceCredentials, ClientError> {
    let (key, csr_der) = pki::new_device_key_and_csr()?;
    let (mut link, _) = connector.open(addr).await?;
    let request = wire::Activate { csr_der, enrolment_secret: enrolment_secret.to_string() };
    link.send(device_frame(device_frame::Kind::Activate(request))).await?;
    match next_frame(&mut link, Duration::from_secs(10)).await? {
        server_frame::Kind::Activated(activated) => {
            let device_id = activated
                .device_id
                .parse()
                .map_err(|_| ClientError::Unexpected(format!("device id {:?}", activated.device_id)))?;
            Ok(DeviceCredentials {
                device_id,
                cert_der: activated.certificate_der,
                key_der: key.serialize_der(),
                owner: activated.owner.map(RedirectTarget::from).filter(|owner| !owner.device_addr.is_empty()),
            })
        }
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}
