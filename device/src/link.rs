//! A live link: hello and redirects, topics and their tokens, notifications, acks, pings and keepalive.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use courier_core::ids::DeviceId;
use courier_proto::device::{self as wire, DeviceFrame, GoodbyeReason, device_frame, server_frame};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;

use crate::connector::{ClientLink, Connector, resolve};
use crate::credentials::{DeviceCredentials, DeviceEndpoint};
use crate::error::ClientError;
use crate::redirect::RedirectTarget;
use crate::seen::SeenIds;

/// Redirects followed before giving up (more means the cluster's views disagree).
pub const MAX_REDIRECTS: usize = 4;

pub(crate) fn device_frame(kind: device_frame::Kind) -> DeviceFrame {
    DeviceFrame { kind: Some(kind) }
}

pub(crate) async fn next_frame(link: &mut ClientLink, wait: Duration) -> Result<server_frame::Kind, ClientError> {
    match tokio::time::timeout(wait, link.next()).await {
        Err(_) => Err(ClientError::Timeout(wait)),
        Ok(frame) => kind_of(frame),
    }
}

/// What a read off the link gave: a frame's content, or why there is none.
fn kind_of(
    frame: Option<Result<wire::ServerFrame, crate::codec::FrameError>>,
) -> Result<server_frame::Kind, ClientError> {
    match frame {
        None => Err(ClientError::Closed),
        Some(frame) => match frame?.kind {
            Some(server_frame::Kind::Goodbye(bye)) => Err(ClientError::Goodbye {
                reason: GoodbyeReason::try_from(bye.reason).unwrap_or(GoodbyeReason::Unspecified),
                detail: bye.detail,
            }),
            Some(kind) => Ok(kind),
            None => Err(ClientError::Unexpected("empty frame".into())),
        },
    }
}

/// Something the node sent that the app may care about.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    Notification(wire::Notification),
    TokenUpdated {
        topic: String,
        token: String,
    },
    Redirect(RedirectTarget),
    /// Notifications lost while the device was away, per topic (pushed out of a full queue, or expired):
    /// the app should sync those topics with its server. Sent once, after the backlog.
    Missed(Vec<wire::MissedTopic>),
}

/// A live, authenticated link.
pub struct DeviceLink {
    link: ClientLink,
    /// The node this link is to (after redirects).
    pub node_addr: SocketAddr,
    pub device_id: DeviceId,
    pub keepalive: Duration,
    /// Whether the TLS handshake resumed an earlier session rather than doing a full one.
    pub resumed: bool,
    /// Frames that arrived while waiting for a specific answer.
    buffered: VecDeque<server_frame::Kind>,
    /// apns-ids already surfaced to the app; move it between links to keep dropping redeliveries.
    pub seen: SeenIds,
    /// Notifications handed to the app whose ack is not yet sent. Acks go out at the start of the next
    /// call, so that a caller that cancels a call (a timeout around it) never loses a notification: it is
    /// either not yet taken off the link, or returned and then acked.
    unacked: VecDeque<String>,
    last_sent: Instant,
    /// When to ping if nothing was sent since: kept for the link's life and moved as `last_sent` moves, so
    /// waiting for a frame costs no new timer each time.
    ping: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl DeviceLink {
    /// Opens a mutual-TLS link and says hello, asking for `keepalive_secs` (0 = the node's default): to
    /// the owner the credentials name when it takes the link, else to the endpoint, following redirects to the
    /// node that owns this device.
    pub async fn connect(
        endpoint: &DeviceEndpoint,
        credentials: &DeviceCredentials,
        keepalive_secs: u32,
    ) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, credentials, keepalive_secs, &[]).await
    }

    /// As `connect`, telling the node which (topic, token) pairs the device holds, so that tokens minted
    /// under a rotated-out key come back replaced (`LinkEvent::TokenUpdated`).
    pub async fn connect_with(
        endpoint: &DeviceEndpoint,
        credentials: &DeviceCredentials,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let connector = Connector::new(endpoint, Some(credentials))?;
        Self::connect_first_to(
            &connector,
            credentials.owner.as_ref(),
            endpoint.addr,
            credentials,
            keepalive_secs,
            held_tokens,
        )
        .await
    }

    /// Connects through `connector` (built with these credentials) to `first` when given and it takes
    /// the link, else to `addr`, following redirects either way.
    pub async fn connect_first_to(
        connector: &Connector,
        first: Option<&RedirectTarget>,
        addr: SocketAddr,
        credentials: &DeviceCredentials,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let device_id = credentials.device_id;
        if let Some(owner) = first {
            match Self::connect_to_owner(connector, owner, device_id, keepalive_secs, held_tokens).await {
                Err(error) if error.another_node_may_answer() => {
                    tracing::debug!(%owner, %error, "the node the device was sent to did not take the link; trying the endpoint");
                }
                answered => return answered,
            }
        }
        Self::connect_via(connector, addr, device_id, keepalive_secs, held_tokens).await
    }

    /// Connects to `owner` (checked by the name it gives) through `connector`, following redirects from
    /// there.
    pub async fn connect_to_owner(
        connector: &Connector,
        owner: &RedirectTarget,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let addr = resolve(&owner.device_addr).await?;
        let first = connector.for_redirect(owner)?;
        Self::follow_redirects(connector, first, addr, device_id, keepalive_secs, held_tokens).await
    }

    /// Connects through a reusable `connector` (built with this device's credentials), following
    /// redirects (each target checked by the name its redirect gives); the connector's remembered sessions
    /// make reconnects resume.
    pub async fn connect_via(
        connector: &Connector,
        addr: SocketAddr,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        Self::follow_redirects(connector, connector.clone(), addr, device_id, keepalive_secs, held_tokens).await
    }

    /// Connects through `first` to `addr`, then through `connector` named as each redirect says.
    async fn follow_redirects(
        connector: &Connector,
        first: Connector,
        mut addr: SocketAddr,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let mut current = first;
        for _ in 0..MAX_REDIRECTS {
            match Self::connect_once(&current, addr, device_id, keepalive_secs, held_tokens).await {
                Err(ClientError::Redirected(to)) => {
                    addr = resolve(&to.device_addr).await?;
                    current = connector.for_redirect(&to)?;
                }
                other => return other,
            }
        }
        Err(ClientError::Unexpected(format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// One attempt on `addr`; a redirect comes back as `ClientError::Redirected`.
    pub async fn connect_once(
        connector: &Connector,
        addr: SocketAddr,
        device_id: DeviceId,
        keepalive_secs: u32,
        held_tokens: &[(String, String)],
    ) -> Result<Self, ClientError> {
        let (mut link, resumed) = connector.open(addr).await?;
        let hello = wire::Hello {
            keepalive_secs,
            client: concat!("courier/", env!("CARGO_PKG_VERSION")).into(),
            held_tokens: held_tokens
                .iter()
                .map(|(topic, token)| wire::HeldToken { topic: topic.clone(), token: token.clone() })
                .collect(),
        };
        link.send(device_frame(device_frame::Kind::Hello(hello))).await?;
        match next_frame(&mut link, Duration::from_secs(10)).await? {
            server_frame::Kind::Redirect(redirect) => Err(ClientError::Redirected(redirect.into())),
            server_frame::Kind::Welcome(welcome) => {
                let keepalive = Duration::from_secs(u64::from(welcome.keepalive_secs.max(1)));
                Ok(DeviceLink {
                    node_addr: addr,
                    link,
                    device_id,
                    keepalive,
                    resumed,
                    buffered: VecDeque::new(),
                    seen: SeenIds::default(),
                    unacked: VecDeque::new(),
                    last_sent: Instant::now(),
                    ping: Box::pin(tokio::time::sleep(keepalive)),
                })
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn send(&mut self, kind: device_frame::Kind) -> Result<(), ClientError> {
        self.link.send(device_frame(kind)).await?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Reads frames until `want` picks one out, buffering the rest for `next_event`.
    async fn wait_for<T>(&mut self, mut want: impl FnMut(&server_frame::Kind) -> Option<T>) -> Result<T, ClientError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let kind = next_frame(&mut self.link, deadline.saturating_duration_since(Instant::now())).await?;
            if let Some(found) = want(&kind) {
                return Ok(found);
            }
            self.buffered.push_back(kind);
        }
    }

    /// Registers a topic and returns the device token for it.
    pub async fn register(&mut self, topic: &str) -> Result<String, ClientError> {
        self.send(device_frame::Kind::RegisterTopic(wire::RegisterTopic { topic: topic.into() })).await?;
        self.wait_for(|kind| match kind {
            server_frame::Kind::TokenIssued(issued) if issued.topic == topic => Some(issued.token.clone()),
            _ => None,
        })
        .await
    }

    pub async fn unregister(&mut self, topic: &str) -> Result<(), ClientError> {
        self.send(device_frame::Kind::UnregisterTopic(wire::UnregisterTopic { topic: topic.into() })).await?;
        self.wait_for(|kind| matches!(kind, server_frame::Kind::TopicUnregistered(t) if t.topic == topic).then_some(()))
            .await
    }

    /// Subscribes this link to a broadcast channel (base64 id, as the provider created it). `last_seen` is
    /// the apns_id of the last broadcast the device got on it: a channel that keeps its latest broadcast
    /// sends it next unless it is that one. Returns the channel's app (its broadcasts' topic), or
    /// `ClientError::ChannelRefused`. The device's owner stores the subscription and restores it on later
    /// links (sending `ChannelSubscribed` unasked) until `unsubscribe`.
    pub async fn subscribe(&mut self, channel_id: &str, last_seen: Option<&str>) -> Result<String, ClientError> {
        let request =
            wire::SubscribeChannel { channel_id: channel_id.into(), last_seen: last_seen.unwrap_or_default().into() };
        self.send(device_frame::Kind::SubscribeChannel(request)).await?;
        let answer = self
            .wait_for(|kind| match kind {
                server_frame::Kind::ChannelSubscribed(done) if done.channel_id == channel_id => {
                    Some(Ok(done.topic.clone()))
                }
                server_frame::Kind::ChannelRefused(refused) if refused.channel_id == channel_id => Some(Err(
                    wire::ChannelRefusal::try_from(refused.reason).unwrap_or(wire::ChannelRefusal::Unspecified),
                )),
                _ => None,
            })
            .await?;
        answer.map_err(|reason| ClientError::ChannelRefused { channel_id: channel_id.to_string(), reason })
    }

    /// Ends the device's subscription to a channel, on its owner and the owner's copies.
    pub async fn unsubscribe(&mut self, channel_id: &str) -> Result<(), ClientError> {
        let request = wire::UnsubscribeChannel { channel_id: channel_id.into() };
        self.send(device_frame::Kind::UnsubscribeChannel(request)).await?;
        self.wait_for(|kind| {
            matches!(kind, server_frame::Kind::ChannelUnsubscribed(done) if done.channel_id == channel_id).then_some(())
        })
        .await
    }

    pub async fn ack(&mut self, apns_id: &str) -> Result<(), ClientError> {
        self.send(device_frame::Kind::Ack(wire::Ack { apns_id: apns_id.into() })).await
    }

    /// The next event, answering pings and keeping the link alive meanwhile. Every notification is
    /// returned, duplicates included; `next_notification` is the app-level view.
    pub async fn next_event(&mut self) -> Result<LinkEvent, ClientError> {
        loop {
            let kind = match self.buffered.pop_front() {
                Some(kind) => kind,
                None => {
                    crate::codec::release_idle_buffers(&mut self.link);
                    let ping_at = self.last_sent + self.keepalive;
                    if self.ping.deadline() != ping_at {
                        self.ping.as_mut().reset(ping_at);
                    }
                    // The link first: the ping timer is looked at only once no frame is waiting.
                    tokio::select! {
                        biased;
                        frame = self.link.next() => kind_of(frame)?,
                        _ = &mut self.ping => {
                            self.send(device_frame::Kind::Ping(wire::Ping { nonce: rand::random() })).await?;
                            continue;
                        }
                    }
                }
            };
            match kind {
                server_frame::Kind::Notification(n) => return Ok(LinkEvent::Notification(n)),
                server_frame::Kind::TokenUpdated(t) => {
                    return Ok(LinkEvent::TokenUpdated { topic: t.topic, token: t.token });
                }
                server_frame::Kind::Redirect(r) => return Ok(LinkEvent::Redirect(r.into())),
                server_frame::Kind::Missed(m) => return Ok(LinkEvent::Missed(m.topics)),
                server_frame::Kind::Ping(ping) => {
                    self.send(device_frame::Kind::Pong(wire::Pong { nonce: ping.nonce })).await?;
                }
                _ => {}
            }
        }
    }

    /// The next event the app should see; redeliveries are dropped. Each notification is acked when the
    /// app next calls (or closes the link), i.e. after the app has it. Cancel-safe.
    pub async fn next_app_event(&mut self) -> Result<LinkEvent, ClientError> {
        loop {
            self.flush_acks().await?;
            match self.next_event().await? {
                LinkEvent::Notification(n) => {
                    // A broadcast is not acked: it was never queued for this device.
                    if n.channel_id.is_empty() {
                        self.unacked.push_back(n.apns_id.clone());
                    }
                    if self.seen.insert(&n.apns_id) {
                        return Ok(LinkEvent::Notification(n));
                    }
                }
                other => return Ok(other),
            }
        }
    }

    /// Sends the acks owed for notifications already handed to the app.
    pub async fn flush_acks(&mut self) -> Result<(), ClientError> {
        while let Some(apns_id) = self.unacked.front().cloned() {
            // Taken off only once sent: a cancelled send is repeated, and a repeated ack is harmless.
            self.ack(&apns_id).await?;
            self.unacked.pop_front();
        }
        Ok(())
    }

    /// The next notification the app has not seen, skipping other events.
    pub async fn next_notification(&mut self) -> Result<wire::Notification, ClientError> {
        loop {
            if let LinkEvent::Notification(n) = self.next_app_event().await? {
                return Ok(n);
            }
        }
    }

    /// Sends a ping and returns every notification that arrives before its pong, acking none. The node
    /// answers frames in order, so once the pong is back nothing queued before the ping is still on the way.
    pub async fn sync(&mut self) -> Result<Vec<wire::Notification>, ClientError> {
        let nonce: u64 = rand::random();
        self.send(device_frame::Kind::Ping(wire::Ping { nonce })).await?;
        // Frames already buffered come first in `buffered`, those read while waiting after them.
        self.wait_for(|kind| match kind {
            server_frame::Kind::Pong(pong) if pong.nonce == nonce => Some(()),
            _ => None,
        })
        .await?;
        let arrived = self
            .buffered
            .drain(..)
            .filter_map(|kind| match kind {
                server_frame::Kind::Notification(n) => Some(n),
                _ => None,
            })
            .collect();
        Ok(arrived)
    }

    /// Says goodbye and closes, acking what the app has received.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.flush_acks().await?;
        let bye = wire::Goodbye { reason: GoodbyeReason::ClientClosing as i32, detail: String::new() };
        self.send(device_frame::Kind::Goodbye(bye)).await?;
        SinkExt::<DeviceFrame>::close(&mut self.link).await?;
        Ok(())
    }
}
