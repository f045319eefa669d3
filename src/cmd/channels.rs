//! `courier channels`: broadcast channels as a provider manages them (APNs's channel management API on the
//! gateway's channels port) and broadcasts to them (on the provider port), signed with a fresh provider
//! JWT from the cluster directory, like `courier send`. Prints the status and what the gateway answered;
//! exits non-zero unless it answered success.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use courier_core::pki::PkiDir;
use courier_gateway::provider::{JwtSigner, ProviderClient, PushResponse};
use http::Method;

#[derive(clap::Args)]
pub struct ChannelsArgs {
    /// The cluster directory holding `cluster-ca.pem`, `provider.json` and the `.p8` signing key.
    #[arg(long, default_value = "courier-dev", global = true)]
    dir: PathBuf,
    /// The app (bundle id) the channels belong to.
    #[arg(long, default_value = "com.example.app", global = true)]
    app: String,
    /// The gateway's channel management port.
    #[arg(long, default_value = "127.0.0.1:2196", global = true)]
    channels_addr: SocketAddr,
    /// The gateway's provider port (broadcasts go there).
    #[arg(long, default_value = "127.0.0.1:8443", global = true)]
    gateway: SocketAddr,
    /// Name to check on the gateway's certificate.
    #[arg(long, default_value = "localhost", global = true)]
    server_name: String,
    #[command(subcommand)]
    command: ChannelsCommand,
}

#[derive(clap::Subcommand)]
enum ChannelsCommand {
    /// Creates a channel and prints its id.
    Create {
        /// 0: delivered only to subscribers linked at the time; 1: the latest broadcast is kept (8 h at
        /// most) for subscribers that link or subscribe later.
        #[arg(long, default_value_t = 0)]
        policy: u8,
        /// `LiveActivity` (APNs), or Courier's `Alert` and `Background`.
        #[arg(long, default_value = "LiveActivity")]
        push_type: String,
    },
    /// Prints a channel's settings.
    Show { id: String },
    /// Lists the ids of the team's channels for the app.
    List,
    /// Deletes a channel.
    Delete { id: String },
    /// Broadcasts a JSON payload to every subscriber of a channel.
    Send {
        id: String,
        /// The JSON payload.
        payload: String,
        /// `apns-push-type`: the channel's own (`liveactivity`, `alert` or `background`).
        #[arg(long, default_value = "liveactivity")]
        push_type: String,
        #[arg(long)]
        priority: Option<String>,
        /// UNIX seconds (policy-1 channels: how long it is kept; 0 = not kept).
        #[arg(long)]
        expiration: Option<String>,
    },
}

pub async fn run(args: ChannelsArgs) -> anyhow::Result<()> {
    let paths = PkiDir::new(&args.dir);
    let signer = JwtSigner::from_pki(&paths).context("loading the provider signing key")?;
    let connect = |addr: SocketAddr| {
        let (name, ca) = (args.server_name.clone(), paths.cluster_ca_cert());
        async move {
            ProviderClient::connect(addr, &name, &ca)
                .await
                .with_context(|| format!("connecting to the gateway at {addr}"))
        }
    };
    let mut headers = vec![("authorization".to_string(), format!("bearer {}", signer.sign()))];
    let channels_path = format!("/1/apps/{}/channels", args.app);
    let (client, method, path, body) = match &args.command {
        ChannelsCommand::Create { policy, push_type } => {
            let body = serde_json::json!({"message-storage-policy": policy, "push-type": push_type}).to_string();
            (connect(args.channels_addr).await?, Method::POST, channels_path, body)
        }
        ChannelsCommand::Show { id } => {
            headers.push(("apns-channel-id".into(), id.clone()));
            (connect(args.channels_addr).await?, Method::GET, channels_path, String::new())
        }
        ChannelsCommand::List => {
            let path = format!("/1/apps/{}/all-channels", args.app);
            (connect(args.channels_addr).await?, Method::GET, path, String::new())
        }
        ChannelsCommand::Delete { id } => {
            headers.push(("apns-channel-id".into(), id.clone()));
            (connect(args.channels_addr).await?, Method::DELETE, channels_path, String::new())
        }
        ChannelsCommand::Send { id, payload, push_type, priority, expiration } => {
            headers.push(("apns-channel-id".into(), id.clone()));
            headers.push(("apns-push-type".into(), push_type.clone()));
            headers.extend(priority.iter().map(|p| ("apns-priority".to_string(), p.clone())));
            headers.extend(expiration.iter().map(|e| ("apns-expiration".to_string(), e.clone())));
            let path = format!("/4/broadcasts/apps/{}", args.app);
            (connect(args.gateway).await?, Method::POST, path, payload.clone())
        }
    };
    let response = client.request(method, &path, headers, body.into_bytes()).await.context("sending the request")?;
    print_answer(&response);
    if !(200..300).contains(&response.status) {
        std::process::exit(1);
    }
    Ok(())
}

/// The status, the reason or body, and the channel and broadcast ids the answer carries.
fn print_answer(response: &PushResponse) {
    let mut line = response.status.to_string();
    if let Some(reason) = &response.reason {
        line.push_str(&format!(" {reason}"));
    } else if !response.body.is_empty() {
        line.push_str(&format!(" {}", String::from_utf8_lossy(&response.body)));
    }
    for header in ["apns-channel-id", "apns-unique-id", "apns-request-id"] {
        if let Some(value) = response.header(header) {
            line.push_str(&format!(" {header}={value}"));
        }
    }
    println!("{line}");
}
