//! Channel management and broadcasts as a provider drives them over HTTP/2, every answer checked against
//! `gateway/openapi.yaml`.

use std::net::SocketAddr;

use courier_core::channel::ChannelId;
use courier_core::pki::PkiDir;
use courier_gateway::provider::{JwtSigner, ProviderClient, PushResponse};
use http::Method;

use super::{TestCluster, openapi};

pub const CHANNELS: &str = "/1/apps/com.example.app/channels";
pub const ALL_CHANNELS: &str = "/1/apps/com.example.app/all-channels";
pub const BROADCAST: &str = "/4/broadcasts/apps/com.example.app";

pub fn assert_reason(what: &str, response: &PushResponse, status: u16, reason: &str) {
    assert_eq!((response.status, response.reason.as_deref()), (status, Some(reason)), "{what}: {response:?}");
}

/// A provider connection to the gateway's channels port.
pub struct Channels {
    pub client: ProviderClient,
    /// `bearer <jwt>`, or `None` on a certificate-authenticated connection.
    pub authorization: Option<String>,
}

impl Channels {
    /// A connection to the test cluster's channels port.
    pub async fn connect(cluster: &TestCluster) -> Self {
        Channels::to(cluster.gateway.channels_addr, &cluster.pki(), &cluster.signer).await
    }

    /// A connection to `addr` (a channels or provider port) of a cluster with PKI `pki`, signing as `signer`.
    pub async fn to(addr: SocketAddr, pki: &PkiDir, signer: &JwtSigner) -> Self {
        let client = ProviderClient::connect(addr, "localhost", &pki.cluster_ca_cert())
            .await
            .expect("the gateway speaks HTTP/2 over TLS");
        Channels { client, authorization: Some(format!("bearer {}", signer.sign())) }
    }

    /// Sends a request with the connection's credentials, `headers` and `body`; checks the answer against
    /// the document and that `apns-request-id` comes back (the one sent, if it was sent).
    pub async fn call(&self, method: Method, path: &str, headers: &[(&str, &str)], body: &str) -> PushResponse {
        let mut all: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        if let Some(authorization) = &self.authorization {
            all.push(("authorization".into(), authorization.clone()));
        }
        let response = self
            .client
            .request(method.clone(), path, all, body.as_bytes().to_vec())
            .await
            .expect("the request reaches the gateway");
        openapi::check_channel_response(method.as_str(), path, response.status, &response.headers, &response.body);
        let echoed = response.header("apns-request-id").expect("every answer carries apns-request-id");
        if let Some((_, sent)) = headers.iter().find(|(name, _)| *name == "apns-request-id") {
            assert_eq!(echoed, *sent, "apns-request-id echoed");
        }
        response
    }

    pub async fn create(&self, body: &str) -> PushResponse {
        self.call(Method::POST, CHANNELS, &[], body).await
    }

    pub async fn create_ok(&self, policy: u8, push_type: &str) -> String {
        let body = format!(r#"{{"message-storage-policy": {policy}, "push-type": "{push_type}"}}"#);
        let response = self.create(&body).await;
        assert_eq!(response.status, 201, "{response:?}");
        assert!(response.body.is_empty());
        let id = response.header("apns-channel-id").expect("a created channel's id").to_string();
        assert!(ChannelId::parse(&id).is_some(), "{id} is 16 bytes of base64");
        id
    }

    pub async fn read(&self, id: &str) -> PushResponse {
        self.call(Method::GET, CHANNELS, &[("apns-channel-id", id)], "").await
    }

    pub async fn delete(&self, id: &str) -> PushResponse {
        self.call(Method::DELETE, CHANNELS, &[("apns-channel-id", id)], "").await
    }

    pub async fn list(&self) -> Vec<String> {
        let response = self.call(Method::GET, ALL_CHANNELS, &[], "").await;
        assert_eq!(response.status, 200, "{response:?}");
        let body: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON");
        body["channels"].as_array().expect("channels").iter().map(|id| id.as_str().unwrap_or("").to_string()).collect()
    }
}

/// A connection to the provider port, for broadcasts, with the same checks.
pub async fn broadcaster(cluster: &TestCluster) -> Channels {
    Channels::to(cluster.gateway.provider_addr, &cluster.pki(), &cluster.signer).await
}

impl Channels {
    /// Broadcasts `payload` on `channel` with `push_type` and any `extra` headers.
    pub async fn broadcast(
        &self,
        channel: &str,
        push_type: &str,
        extra: &[(&str, &str)],
        payload: &str,
    ) -> PushResponse {
        let mut headers = vec![("apns-channel-id", channel), ("apns-push-type", push_type)];
        headers.extend_from_slice(extra);
        self.call(Method::POST, BROADCAST, &headers, payload).await
    }

    /// A broadcast that must be answered 200; its `apns-unique-id`.
    pub async fn broadcast_ok(&self, channel: &str, push_type: &str, payload: &str) -> String {
        let response = self.broadcast(channel, push_type, &[], payload).await;
        assert_eq!(response.status, 200, "{response:?}");
        let unique = response.header("apns-unique-id").expect("a broadcast's apns-unique-id").to_string();
        assert!(uuid::Uuid::parse_str(&unique).is_ok(), "{unique} is a UUID");
        unique
    }
}
