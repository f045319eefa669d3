//! `courier device`: a demo device. Activates once (the certificate is kept under
//! `<dir>/devices/<name>/`), connects, registers a topic, prints its token and then every notification as
//! one JSON line on stdout, acking each. With `--channel`, it subscribes to broadcast channels on every link
//! and prints their broadcasts too. It reconnects with backoff when the link drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use courier_core::pki::PkiDir;
use courier_device::{ClientError, Device, DeviceCredentials, DeviceEndpoint, DeviceEvent};
use courier_proto::device::GoodbyeReason;

#[derive(clap::Args)]
pub struct DeviceArgs {
    /// The cluster directory (`courier dev`'s `--dir`, or a PKI directory holding `cluster-ca.pem`).
    #[arg(long, default_value = "courier-dev")]
    dir: PathBuf,
    /// App topic to register.
    #[arg(long)]
    topic: String,
    /// This demo device's name; its certificate lives in `<dir>/devices/<name>/`.
    #[arg(long, default_value = "default")]
    name: String,
    /// The node's device port.
    #[arg(long, default_value = "127.0.0.1:5223")]
    node: SocketAddr,
    /// Name to check on the node's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Enrolment secret for activation (dev clusters accept any).
    #[arg(long, env = "COURIER_ENROLMENT_SECRET", default_value = "", hide_env_values = true)]
    enrolment_secret: String,
    /// Keepalive to ask for, in seconds (0 = the node's default).
    #[arg(long, default_value_t = 0)]
    keepalive: u32,
    /// A broadcast channel to subscribe to (its base64 id, as `apns-channel-id` gave it); repeatable.
    /// Broadcasts print like other notifications, with their `channel_id`.
    #[arg(long = "channel")]
    channels: Vec<String>,
}

/// Where `device` remembers the token it got for a topic, so `courier send` can default to it.
pub fn token_file(dir: &Path, name: &str, topic: &str) -> PathBuf {
    dir.join("devices").join(name).join(format!("token-{topic}"))
}

pub async fn run(args: DeviceArgs) -> anyhow::Result<()> {
    let endpoint = DeviceEndpoint {
        addr: args.node,
        server_name: args.server_name.clone(),
        ca_path: PkiDir::new(&args.dir).cluster_ca_cert(),
    };
    let home = args.dir.join("devices").join(&args.name);
    let credentials = match DeviceCredentials::load(&home)? {
        Some(credentials) => credentials,
        None => {
            let credentials =
                courier_device::activate(&endpoint, &args.enrolment_secret).await.context("activating the device")?;
            credentials.save(&home)?;
            eprintln!("activated as device {}", credentials.device_id);
            credentials
        }
    };
    let held = std::fs::read_to_string(token_file(&args.dir, &args.name, &args.topic)).ok();
    let mut device = Device::new(endpoint, credentials)?
        .with_topic(&args.topic, held.map(|token| token.trim().to_string()))
        .with_keepalive(args.keepalive);
    for channel in &args.channels {
        device = device.with_channel(channel);
    }
    loop {
        let event = tokio::select! {
            event = device.next_event() => event,
            _ = super::terminated() => return Ok(()),
        };
        match event {
            Err(ClientError::Goodbye { reason: GoodbyeReason::Revoked, detail }) => {
                anyhow::bail!("this device was revoked: {detail}")
            }
            Err(ClientError::Goodbye { reason: GoodbyeReason::ClonedIdentity, detail }) => {
                anyhow::bail!("the cluster refuses this device as a suspected clone: {detail}")
            }
            Err(error) => return Err(error.into()),
            Ok(DeviceEvent::Linked { .. }) => {}
            Ok(DeviceEvent::Lost { error, retry_in }) => eprintln!("link lost: {error}; reconnecting in {retry_in:?}"),
            Ok(DeviceEvent::Token { topic, token }) => {
                let _ = std::fs::write(token_file(&args.dir, &args.name, &topic), &token);
                let device_id = device.device_id().to_string();
                println!(
                    "{}",
                    serde_json::json!({"event": "registered", "device_id": device_id, "topic": topic, "token": token})
                );
            }
            Ok(DeviceEvent::Notification(n)) => print_notification(&n),
            Ok(DeviceEvent::Missed(topics)) => {
                let topics: Vec<_> = topics
                    .iter()
                    .map(|t| serde_json::json!({"topic": t.topic, "dropped": t.dropped, "expired": t.expired}))
                    .collect();
                println!("{}", serde_json::json!({"event": "missed", "topics": topics}));
            }
            Ok(DeviceEvent::Subscribed { channel_id, topic }) => {
                println!("{}", serde_json::json!({"event": "subscribed", "channel_id": channel_id, "topic": topic}));
            }
            Ok(DeviceEvent::ChannelRefused { channel_id, reason }) => {
                let reason = reason.as_str_name();
                println!(
                    "{}",
                    serde_json::json!({"event": "channel_refused", "channel_id": channel_id, "reason": reason})
                );
            }
        }
    }
}

/// One notification as a JSON line on stdout; a payload that is not JSON is shown as text.
fn print_notification(n: &courier_device::Notification) {
    let payload: serde_json::Value = serde_json::from_slice(&n.payload)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&n.payload).into_owned()));
    println!(
        "{}",
        serde_json::json!({
            "event": "notification",
            "apns_id": n.apns_id,
            "topic": n.topic,
            "priority": n.priority,
            "expiration": n.expiration,
            "collapse_id": n.collapse_id,
            "push_type": n.push_type,
            "accepted_at_ms": n.accepted_at_ms,
            "channel_id": n.channel_id,
            "payload": payload,
        })
    );
}
