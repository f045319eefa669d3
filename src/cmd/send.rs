//! `courier send`: one push through a gateway, signed with a fresh provider JWT, printing the APNs status
//! and reason. Exits non-zero unless the gateway answered 200.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use courier_core::pki::PkiDir;
use courier_gateway::provider::{JwtSigner, ProviderClient, Push};

#[derive(clap::Args)]
pub struct SendArgs {
    /// The cluster directory holding `cluster-ca.pem`, `provider.json` and the `.p8` signing key.
    #[arg(long, default_value = "courier-dev")]
    dir: PathBuf,
    /// `apns-topic`.
    #[arg(long)]
    topic: String,
    /// Device token (hex). Defaults to the token the demo device `--device` registered for the topic.
    #[arg(long)]
    token: Option<String>,
    /// Demo device whose saved token to use when `--token` is not given.
    #[arg(long, default_value = "default")]
    device: String,
    /// The gateway's provider API.
    #[arg(long, default_value = "127.0.0.1:8443")]
    gateway: SocketAddr,
    /// Name to check on the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long)]
    apns_id: Option<String>,
    /// UNIX seconds; 0 = deliver only if the device is connected now.
    #[arg(long)]
    expiration: Option<String>,
    #[arg(long)]
    priority: Option<String>,
    #[arg(long)]
    collapse_id: Option<String>,
    #[arg(long)]
    push_type: Option<String>,
    /// The JSON payload.
    payload: String,
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    let paths = PkiDir::new(&args.dir);
    let token = match args.token.clone() {
        Some(token) => token,
        None => {
            let file = super::device::token_file(&args.dir, &args.device, &args.topic);
            std::fs::read_to_string(&file)
                .with_context(|| format!("no --token given and no demo-device token at {}", file.display()))?
                .trim()
                .to_string()
        }
    };
    let signer = JwtSigner::from_pki(&paths).context("loading the provider signing key")?;
    let client = ProviderClient::connect(args.gateway, &args.server_name, &paths.cluster_ca_cert())
        .await
        .with_context(|| format!("connecting to the gateway at {}", args.gateway))?;
    let push = Push {
        token,
        topic: Some(args.topic.clone()),
        apns_id: args.apns_id.clone(),
        expiration: args.expiration.clone(),
        priority: args.priority.clone(),
        collapse_id: args.collapse_id.clone(),
        push_type: args.push_type.clone(),
        authorization: Some(format!("bearer {}", signer.sign())),
        payload: args.payload.clone().into_bytes(),
    };
    let response = client.push(&push).await.context("sending the push")?;
    let apns_id = response.apns_id.as_deref().unwrap_or("-");
    match &response.reason {
        None => println!("{} apns-id={apns_id}", response.status),
        Some(reason) => println!("{} {reason} apns-id={apns_id}", response.status),
    }
    if response.status != 200 {
        std::process::exit(1);
    }
    Ok(())
}
