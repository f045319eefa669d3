//! A device that stays linked: `Device` connects (to the owner its activation named, else to the
//! endpoint, following redirects), registers its topics, hands the app each notification once, and when
//! the link drops reconnects with backoff, resuming its TLS session, and registers again. Only a refusal
//! of the device itself (revoked, a suspected clone) ends it.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use courier_proto::device as wire;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::connector::Connector;
use crate::credentials::{DeviceCredentials, DeviceEndpoint};
use crate::error::ClientError;
use crate::link::{DeviceLink, LinkEvent};
use crate::redirect::RedirectTarget;
use crate::seen::SeenIds;

/// What happened on a `Device`, for the app.
#[derive(Debug)]
pub enum DeviceEvent {
    /// A link is up and every topic is registered on it.
    Linked { node: SocketAddr, resumed: bool },
    /// The token for `topic`: issued when the topic was registered, or replaced after a key rotation. Hand
    /// it to the app's server; it stays valid across reconnects.
    Token { topic: String, token: String },
    /// A notification the app has not seen before. It is acked when the app next calls `next_event`.
    Notification(wire::Notification),
    /// The link failed or dropped; the next call waits `retry_in` and reconnects.
    Lost { error: ClientError, retry_in: Duration },
    /// A channel given to `with_channel` is subscribed on the new link; its broadcasts carry `topic`.
    Subscribed { channel_id: String, topic: String },
    /// The node refused a channel given to `with_channel` (unknown or deleted, or one too many): it is
    /// dropped from the device's channels and not asked for again.
    ChannelRefused { channel_id: String, reason: wire::ChannelRefusal },
    /// Notifications lost while the device was away, per topic (pushed out of its full queue, or expired
    /// before it linked): sync those topics with the app's server.
    Missed(Vec<wire::MissedTopic>),
}

/// A device's connection to the cluster, kept up for as long as the app runs. Cancel-safe: a
/// `next_event` cancelled (for instance by a `select!` on shutdown) loses no notification.
pub struct Device {
    endpoint: DeviceEndpoint,
    credentials: DeviceCredentials,
    connector: Connector,
    keepalive_secs: u32,
    /// Topics to register on every link, with the token last issued for each (sent in `Hello`, so one
    /// minted under a retired key comes back replaced).
    topics: BTreeMap<String, Option<String>>,
    /// Broadcast channels to subscribe to on every link, with the apns_id of the last broadcast received
    /// on each (so a kept one already seen is not sent again).
    channels: BTreeMap<String, Option<String>>,
    link: Option<DeviceLink>,
    /// Where the next link goes first: the owner from activation, then where a redirect pointed.
    first: Option<RedirectTarget>,
    seen: SeenIds,
    backoff: Backoff,
    retry_at: Option<Instant>,
    pending: VecDeque<DeviceEvent>,
}

impl Device {
    /// A device with these credentials, not linked yet (`next_event` links it).
    pub fn new(endpoint: DeviceEndpoint, credentials: DeviceCredentials) -> Result<Self, ClientError> {
        let connector = Connector::new(&endpoint, Some(&credentials))?;
        Ok(Device {
            first: credentials.owner.clone(),
            endpoint,
            credentials,
            connector,
            keepalive_secs: 0,
            topics: BTreeMap::new(),
            channels: BTreeMap::new(),
            link: None,
            seen: SeenIds::default(),
            backoff: Backoff::default(),
            retry_at: None,
            pending: VecDeque::new(),
        })
    }

    /// Registers `topic` on every link; `token` is the one the app already holds, if any.
    pub fn with_topic(mut self, topic: &str, token: Option<String>) -> Self {
        self.topics.insert(topic.to_string(), token);
        self
    }

    /// Subscribes to broadcast channel `channel_id` (base64, as the provider created it) on every link (the
    /// owner stores subscriptions too; subscribing again tells it the last broadcast this device saw).
    pub fn with_channel(mut self, channel_id: &str) -> Self {
        self.channels.entry(channel_id.to_string()).or_default();
        self
    }

    /// The keepalive to ask for, in seconds (0, the default: the node's).
    pub fn with_keepalive(mut self, secs: u32) -> Self {
        self.keepalive_secs = secs;
        self
    }

    /// Delays between reconnect attempts (default: 500 ms doubling to 30 s, with jitter).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The device's id.
    pub fn device_id(&self) -> courier_core::ids::DeviceId {
        self.credentials.device_id
    }

    /// The next event, linking or relinking first when there is no link. An error means the cluster
    /// refuses this device (`ClientError::refuses_this_device`) or the credentials cannot be used; every
    /// other failure comes back as `DeviceEvent::Lost` and is retried at the next call.
    pub async fn next_event(&mut self) -> Result<DeviceEvent, ClientError> {
        if let Some(event) = self.pending.pop_front() {
            return Ok(event);
        }
        let Some(link) = self.link.as_mut() else {
            return self.relink().await;
        };
        match link.next_app_event().await {
            Ok(LinkEvent::Notification(n)) => {
                if let Some(last_seen) = self.channels.get_mut(&n.channel_id) {
                    *last_seen = Some(n.apns_id.clone());
                }
                Ok(DeviceEvent::Notification(n))
            }
            Ok(LinkEvent::TokenUpdated { topic, token }) => {
                self.topics.insert(topic.clone(), Some(token.clone()));
                Ok(DeviceEvent::Token { topic, token })
            }
            Ok(LinkEvent::Missed(topics)) => Ok(DeviceEvent::Missed(topics)),
            Ok(LinkEvent::Redirect(to)) => {
                // The ring moved: the link is handed to the node the redirect names, at once.
                self.drop_link().await;
                self.first = Some(to.clone());
                Ok(DeviceEvent::Lost { error: ClientError::Redirected(to), retry_in: Duration::ZERO })
            }
            Err(error) => {
                self.drop_link().await;
                self.lost(error)
            }
        }
    }

    /// Acks what the app has received, says goodbye and closes the link.
    pub async fn close(mut self) -> Result<(), ClientError> {
        match self.link.take() {
            Some(link) => link.close().await,
            None => Ok(()),
        }
    }

    async fn relink(&mut self) -> Result<DeviceEvent, ClientError> {
        if let Some(at) = self.retry_at {
            tokio::time::sleep_until(at).await;
        }
        let held: Vec<(String, String)> =
            self.topics.iter().filter_map(|(topic, token)| Some((topic.clone(), token.clone()?))).collect();
        let attempt = async {
            let mut link = DeviceLink::connect_first_to(
                &self.connector,
                self.first.as_ref(),
                self.endpoint.addr,
                &self.credentials,
                self.keepalive_secs,
                &held,
            )
            .await?;
            let mut tokens = Vec::new();
            for topic in self.topics.keys() {
                tokens.push((topic.clone(), link.register(topic).await?));
            }
            let mut subscriptions = Vec::new();
            for (channel_id, last_seen) in &self.channels {
                let answer = match link.subscribe(channel_id, last_seen.as_deref()).await {
                    Ok(topic) => Ok(topic),
                    Err(ClientError::ChannelRefused { reason, .. }) => Err(reason),
                    Err(error) => return Err(error),
                };
                subscriptions.push((channel_id.clone(), answer));
            }
            Ok::<_, ClientError>((link, tokens, subscriptions))
        };
        match attempt.await {
            Ok((mut link, tokens, subscriptions)) => {
                self.retry_at = None;
                self.backoff.succeeded();
                for (topic, token) in tokens {
                    if self.topics.insert(topic.clone(), Some(token.clone())) != Some(Some(token.clone())) {
                        self.pending.push_back(DeviceEvent::Token { topic, token });
                    }
                }
                for (channel_id, answer) in subscriptions {
                    self.pending.push_back(match answer {
                        Ok(topic) => DeviceEvent::Subscribed { channel_id, topic },
                        Err(reason) => {
                            self.channels.remove(&channel_id);
                            DeviceEvent::ChannelRefused { channel_id, reason }
                        }
                    });
                }
                std::mem::swap(&mut link.seen, &mut self.seen);
                let linked = DeviceEvent::Linked { node: link.node_addr, resumed: link.resumed };
                self.link = Some(link);
                Ok(linked)
            }
            Err(error) => {
                // The redirect target may be gone; the next attempt starts from the endpoint.
                self.first = None;
                self.lost(error)
            }
        }
    }

    /// Takes the link down, keeping the ids the app has seen for the next one.
    async fn drop_link(&mut self) {
        if let Some(mut link) = self.link.take() {
            std::mem::swap(&mut link.seen, &mut self.seen);
            let _ = tokio::time::timeout(Duration::from_secs(1), link.close()).await;
        }
    }

    fn lost(&mut self, error: ClientError) -> Result<DeviceEvent, ClientError> {
        if error.refuses_this_device() || matches!(error, ClientError::Credentials { .. } | ClientError::Tls(_)) {
            return Err(error);
        }
        let retry_in = self.backoff.failed();
        self.retry_at = Some(Instant::now() + retry_in);
        Ok(DeviceEvent::Lost { error, retry_in })
    }
}
