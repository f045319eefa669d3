//! `courier ctl`: the admin CLI. It talks to any node's cluster API over mutual TLS (the `admin`
//! certificate from the PKI directory, whose role the nodes check on every call); changes go through
//! Raft, forwarded to the leader by that node. Output never contains a secret: token keys are shown by
//! id and state only.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use courier_core::ids::{DeviceId, unix_millis};
use courier_core::peer::Peers;
use courier_core::pki::PkiDir;
use courier_core::state::{Command, CommandResponse};
use courier_core::token::{TokenKey, TokenKeyId};
use courier_core::webhook::{EventKind, SigningSecret};
use courier_proto::cluster::cluster_client::ClusterClient;
use courier_proto::cluster::{JoinRequest, ListChannelsRequest, ProposeRequest, RemoveNodeRequest, StatusRequest};
use serde_json::Value;
use tonic::transport::Channel;

#[derive(clap::Args)]
pub struct CtlArgs {
    /// Cluster API address of any node.
    #[arg(long, env = "COURIER_CTL_NODE", default_value = "127.0.0.1:7400")]
    node: String,
    /// PKI directory holding `cluster-ca.pem` and `admin.pem`/`admin.key` (role admin, from `courier pki
    /// issue admin`); nodes refuse admin commands from any other certificate.
    #[arg(long, env = "COURIER_PKI_DIR", default_value = "courier-dev")]
    pki_dir: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(clap::Subcommand)]
enum CtlCommand {
    /// Members and their states, leader, term, epoch, ring shares, token keys, providers.
    Status {
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
        /// Also name the ring owner of these device ids.
        #[arg(long = "owner-of")]
        owner_of: Vec<String>,
    },
    #[command(subcommand)]
    Nodes(NodesCommand),
    #[command(subcommand)]
    Keys(KeysCommand),
    #[command(subcommand)]
    Providers(ProvidersCommand),
    #[command(subcommand)]
    Devices(DevicesCommand),
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Broadcast channels with their linked subscribers, added up over every active member.
    Channels {
        /// Only this app's channels.
        #[arg(long)]
        app: Option<String>,
        /// Only this team's channels.
        #[arg(long)]
        team_id: Option<String>,
        /// At most this many channels.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand)]
enum NodesCommand {
    /// Add a node to the Raft group and the ring (a node started with --join does this itself).
    Add {
        #[arg(long)]
        id: u64,
        #[arg(long)]
        cluster_addr: String,
        #[arg(long)]
        device_addr: String,
    },
    /// Remove a node from the Raft group and the ring.
    Remove {
        #[arg(long)]
        id: u64,
    },
}

#[derive(clap::Subcommand)]
enum KeysCommand {
    /// Make a fresh key active; the current one keeps opening its tokens until its grace period ends.
    Rotate,
    /// Retire an accepting key now: its tokens answer 410 ExpiredToken.
    Retire {
        #[arg(long)]
        id: u32,
    },
    /// Key ids and states.
    List,
}

#[derive(clap::Subcommand)]
enum ProvidersCommand {
    /// Add (or replace) a provider signing key for a team.
    Add {
        #[arg(long)]
        team_id: String,
        #[arg(long)]
        key_id: String,
        /// SPKI PEM file of the ES256 public key.
        #[arg(long)]
        public_key: PathBuf,
        /// Topic the team may push to (repeatable; none = any).
        #[arg(long = "topic")]
        topics: Vec<String>,
    },
    List,
    /// Issue a provider client certificate (certificate-based auth instead of JWTs) for a team and its
    /// topics. Offline: signs with the provider CA key in --pki-dir and talks to no node.
    IssueCert {
        #[arg(long)]
        team_id: String,
        /// Topic (app bundle id) the certificate may push to; repeatable, at least one.
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        /// Directory to write `provider-<team>.pem` and `provider-<team>.key` into.
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid, in days.
        #[arg(long, default_value_t = 365)]
        validity_days: u64,
    },
    /// Remove one key of a team, or the whole team.
    Remove {
        #[arg(long)]
        team_id: String,
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Allow or forbid a team (JWT or certificate) broadcast channels; every team may until forbidden, and a
    /// forbidden team's channel requests and broadcasts answer `FeatureNotEnabled`.
    Broadcast {
        #[arg(long)]
        team_id: String,
        /// Forbid instead of allow.
        #[arg(long)]
        disable: bool,
    },
}

/// Delivery receipts: where each team's events go (Standard Webhooks format, see the README).
#[derive(clap::Subcommand)]
enum WebhooksCommand {
    /// Set a team's endpoint and the events it gets. The first time, prints the signing secret once; a
    /// team that has one keeps it (`rotate-secret` changes it).
    Set {
        #[arg(long)]
        team: String,
        /// `https://…`; `http://` and private addresses only where the nodes allow them (`courier dev`).
        #[arg(long)]
        url: String,
        /// Comma-separated: delivered, expired, dropped, unregistered (default: all).
        #[arg(long, default_value = "")]
        events: String,
    },
    /// Teams' endpoints, events and secrets (fingerprints only).
    List {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop sending a team's receipts; events queued for it are dropped.
    Remove {
        #[arg(long)]
        team: String,
    },
    /// Make a new signing secret and print it once; the old one keeps signing too for the grace period,
    /// so receivers can switch without missing a request.
    RotateSecret {
        #[arg(long)]
        team: String,
        /// How long the old secret keeps signing, in hours.
        #[arg(long, default_value_t = 24)]
        grace_hours: u64,
    },
}

#[derive(clap::Subcommand)]
enum DevicesCommand {
    /// Close the device's link and refuse its certificate from now on (also ends a clone suspicion).
    Revoke {
        #[arg(long)]
        device: String,
    },
    /// Suspected clones: device ids whose links keep replacing each other from different addresses.
    List,
    /// Clear a clone suspicion: the device's links and pushes work again (revoke it instead if it is cloned).
    ClearClone {
        #[arg(long)]
        device: String,
    },
}

fn admin_peers(args: &CtlArgs) -> anyhow::Result<Peers> {
    let pki = PkiDir::new(&args.pki_dir);
    Peers::new(&pki, "admin", None, Duration::from_secs(5))
        .with_context(|| format!("loading the admin certificate from {}", args.pki_dir.display()))
}

/// Calls `call` on the node at `addr`, and again on the leader when that node answers that it is not the
/// leader: operator changes are made by the leader itself (a follower may not forward them under its node
/// certificate).
async fn at_leader<T, F, Fut>(peers: &Peers, addr: &str, call: F) -> anyhow::Result<T>
where
    F: Fn(ClusterClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut addr = addr.to_string();
    for _ in 0..3 {
        match call(peers.client(&addr)?).await {
            Ok(answer) => return Ok(answer.into_inner()),
            Err(status) => match status.metadata().get(courier_node::api::LEADER_METADATA) {
                Some(leader) if status.code() == tonic::Code::FailedPrecondition => {
                    addr = leader.to_str().context("the leader's address")?.to_string();
                }
                _ => return Err(status.into()),
            },
        }
    }
    bail!("the Raft leader kept moving; try again")
}

async fn status(client: &mut ClusterClient<Channel>, devices: Vec<String>) -> anyhow::Result<Value> {
    let answer = client.status(StatusRequest { devices }).await.context("asking for status")?.into_inner();
    Ok(serde_json::from_slice(&answer.json)?)
}

async fn propose(peers: &Peers, addr: &str, command: Command) -> anyhow::Result<()> {
    let command_json = serde_json::to_vec(&command)?;
    let answer = at_leader(peers, addr, |mut client| {
        let request = ProposeRequest { command_json: command_json.clone() };
        async move { client.propose(request).await }
    })
    .await
    .context("proposing")?;
    match serde_json::from_slice::<CommandResponse>(&answer.response_json)? {
        CommandResponse::Applied { epoch } => {
            println!("applied; cluster epoch is now {}", epoch.0);
            Ok(())
        }
        CommandResponse::Refused { reason } => bail!("refused: {reason}"),
        // `ctl` proposes no channel command; an admin certificate may not.
        other @ (CommandResponse::ChannelApplied { .. } | CommandResponse::ChannelRefused { .. }) => {
            bail!("unexpected answer {other:?}")
        }
    }
}

fn age(ms: &Value) -> String {
    let then = ms.as_u64().unwrap_or(0);
    let secs = unix_millis().saturating_sub(then) / 1000;
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

fn print_status(doc: &Value) {
    let raft = &doc["raft"];
    println!(
        "epoch {}  leader {}  term {}  (answered by node {}: {}, applied index {})",
        doc["epoch"],
        raft["leader"],
        raft["term"],
        doc["node_id"],
        raft["state"].as_str().unwrap_or("?"),
        raft["applied_index"]
    );
    println!();
    println!("{:<6} {:<9} {:<6} {:>6}  {:<22} {:<22}", "NODE", "STATE", "VOTER", "RING", "DEVICE ADDR", "CLUSTER ADDR");
    for m in doc["members"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<9} {:<6} {:>5.1}%  {:<22} {:<22}",
            m["id"].to_string(),
            m["state"].as_str().unwrap_or("?"),
            if m["voter"].as_bool() == Some(true) { "yes" } else { "no" },
            m["ring_share"].as_f64().unwrap_or(0.0) * 100.0,
            m["device_addr"].as_str().unwrap_or(""),
            m["cluster_addr"].as_str().unwrap_or(""),
        );
    }
    println!();
    print_keys(doc);
    println!();
    print_providers(doc);
    println!();
    println!("revoked devices: {}", doc["revoked_devices"]);
    let clones = doc["suspected_clones"].as_array().map_or(0, Vec::len);
    println!("suspected clones: {clones}{}", if clones > 0 { " (courier ctl devices list)" } else { "" });
    if let Some(owners) = doc["owners"].as_object().filter(|o| !o.is_empty()) {
        println!();
        for (device, owner) in owners {
            println!("device {device} -> node {owner}");
        }
    }
}

fn print_keys(doc: &Value) {
    println!("{:<10} {:<10} {:<12} {:<12}", "TOKEN KEY", "STATE", "CREATED", "STATE SINCE");
    for k in doc["token_keys"].as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<10} {:<12} {:<12}",
            k["id"].to_string(),
            k["state"].as_str().unwrap_or("?"),
            age(&k["created_ms"]),
            age(&k["state_since_ms"])
        );
    }
}

fn print_providers(doc: &Value) {
    let disabled: Vec<&str> =
        doc["broadcast_disabled"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if !disabled.is_empty() {
        println!("kept from broadcast channels: {}", disabled.join(", "));
    }
    println!("{:<12} {:<30} TOPICS", "TEAM", "KEY IDS");
    for p in doc["providers"].as_array().into_iter().flatten() {
        let list = |v: &Value| v.as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","));
        let topics = list(&p["topics"]).filter(|t| !t.is_empty()).unwrap_or_else(|| "any".into());
        println!(
            "{:<12} {:<30} {}",
            p["team_id"].as_str().unwrap_or("?"),
            list(&p["key_ids"]).unwrap_or_default(),
            topics
        );
    }
}

/// `ctl webhooks …`. A secret is made here and printed only once the cluster holds it: `set` on a team
/// that already has an endpoint keeps that endpoint's secret, and says so.
async fn webhooks(
    peers: &Peers,
    node: &str,
    client: &mut ClusterClient<Channel>,
    command: WebhooksCommand,
) -> anyhow::Result<()> {
    let holds = |doc: &Value, team: &str, secret: &SigningSecret| {
        doc["webhooks"].as_array().into_iter().flatten().filter(|h| h["team_id"] == team).any(|h| {
            h["secrets"].as_array().into_iter().flatten().any(|s| s["fingerprint"] == secret.fingerprint().as_str())
        })
    };
    match command {
        WebhooksCommand::Set { team, url, events } => {
            let events = EventKind::parse_list(&events).map_err(anyhow::Error::msg)?;
            let secret = SigningSecret::generate(unix_millis());
            let command = Command::SetWebhook {
                team_id: team.clone(),
                url,
                events,
                secret: secret.clone(),
                now_ms: unix_millis(),
            };
            propose(peers, node, command).await?;
            if holds(&status(client, Vec::new()).await?, &team, &secret) {
                println!("signing secret (shown once; configure your receiver with it): {}", secret.whsec());
            } else {
                println!("the team's signing secret is unchanged (courier ctl webhooks rotate-secret makes a new one)");
            }
        }
        WebhooksCommand::List { json } => {
            let doc = status(client, Vec::new()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc["webhooks"])?);
                return Ok(());
            }
            println!("{:<12} {:<40} {:<36} SECRETS", "TEAM", "URL", "EVENTS");
            for hook in doc["webhooks"].as_array().into_iter().flatten() {
                let events: Vec<&str> =
                    hook["events"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                let secrets: Vec<String> = hook["secrets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| match s["retires_ms"].as_u64() {
                        Some(end) if end > unix_millis() => {
                            format!(
                                "{} (retires in {} min)",
                                s["fingerprint"].as_str().unwrap_or("?"),
                                (end - unix_millis()) / 60_000
                            )
                        }
                        Some(_) => format!("{} (retired)", s["fingerprint"].as_str().unwrap_or("?")),
                        None => s["fingerprint"].as_str().unwrap_or("?").to_string(),
                    })
                    .collect();
                println!(
                    "{:<12} {:<40} {:<36} {}",
                    hook["team_id"].as_str().unwrap_or("?"),
                    hook["url"].as_str().unwrap_or("?"),
                    events.join(","),
                    secrets.join(", ")
                );
            }
        }
        WebhooksCommand::Remove { team } => propose(peers, node, Command::RemoveWebhook { team_id: team }).await?,
        WebhooksCommand::RotateSecret { team, grace_hours } => {
            let secret = SigningSecret::generate(unix_millis());
            let grace_ms = grace_hours.saturating_mul(3_600_000);
            let command =
                Command::RotateWebhookSecret { team_id: team, secret: secret.clone(), grace_ms, now_ms: unix_millis() };
            propose(peers, node, command).await?;
            println!("new signing secret (shown once): {}", secret.whsec());
            println!("the previous one keeps signing for {grace_hours} h");
        }
    }
    Ok(())
}

/// One channel as `ctl channels` shows it: its record and the subscribers every answering member has
/// linked.
struct ChannelRow {
    record: Value,
    subscribers: u64,
}

/// Asks every active member for its channels (the same book on each) and adds up their linked subscribers.
/// Members that do not answer are named on stderr; their subscribers are then missing from the counts.
async fn channels(
    peers: &Peers,
    client: &mut ClusterClient<Channel>,
    request: ListChannelsRequest,
) -> anyhow::Result<(Vec<ChannelRow>, bool)> {
    let doc = status(client, Vec::new()).await?;
    let members: Vec<String> = doc["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["state"] == "active")
        .filter_map(|m| m["cluster_addr"].as_str().map(str::to_string))
        .collect();
    let mut rows: Vec<ChannelRow> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut more = false;
    for addr in members {
        let answer = match peers.client(&addr) {
            Ok(mut member) => member.list_channels(request.clone()).await.map_err(anyhow::Error::from),
            Err(error) => Err(error.into()),
        };
        let answer = match answer {
            Ok(answer) => answer.into_inner(),
            Err(error) => {
                eprintln!("member {addr} did not answer ({error:#}); its subscribers are not counted");
                continue;
            }
        };
        more |= answer.more;
        for listed in answer.channels {
            let record: Value = serde_json::from_slice(&listed.record_json)?;
            let id = record["id"].as_str().unwrap_or_default().to_string();
            match index.get(&id) {
                Some(&at) => rows[at].subscribers += listed.subscribers,
                None => {
                    index.insert(id, rows.len());
                    rows.push(ChannelRow { record, subscribers: listed.subscribers });
                }
            }
        }
    }
    Ok((rows, more))
}

fn print_channels(rows: &[ChannelRow], more: bool) {
    println!(
        "{:<26} {:<12} {:<30} {:<7} {:<13} {:<10} SUBSCRIBERS",
        "CHANNEL", "TEAM", "APP", "POLICY", "PUSH TYPE", "CREATED"
    );
    for row in rows {
        let r = &row.record;
        println!(
            "{:<26} {:<12} {:<30} {:<7} {:<13} {:<10} {}",
            r["id"].as_str().unwrap_or("?"),
            r["team_id"].as_str().unwrap_or("?"),
            r["app"].as_str().unwrap_or("?"),
            r["policy"].to_string(),
            r["push_type"].as_str().unwrap_or("?"),
            age(&r["created_ms"]),
            row.subscribers
        );
    }
    if more {
        println!("(more channels match; raise --limit)");
    }
}

fn print_clones(doc: &Value) {
    println!("{:<34} {:<8} {:<10} {:<6} ADDRESSES", "SUSPECTED CLONE", "POLICY", "SINCE", "NODE");
    for c in doc["suspected_clones"].as_array().into_iter().flatten() {
        let addrs = c["addrs"].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>();
        println!(
            "{:<34} {:<8} {:<10} {:<6} {}",
            c["device"].as_str().unwrap_or("?"),
            if c["refuse"].as_bool() == Some(true) { "refused" } else { "alert" },
            age(&c["since_ms"]),
            c["node"].to_string(),
            addrs.join(",")
        );
    }
}

/// Writes a provider certificate and key signed by the provider CA of `pki_dir`; returns their paths.
pub fn issue_provider_cert(
    pki_dir: &std::path::Path,
    team_id: &str,
    topics: &[String],
    out: &std::path::Path,
    validity: Duration,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let pki = PkiDir::new(pki_dir);
    let (cert, key) = courier_core::pki::issue_provider_cert(&pki, team_id, topics, validity)
        .with_context(|| format!("signing with the provider CA in {}", pki_dir.display()))?;
    let cert_path = out.join(format!("provider-{team_id}.pem"));
    let key_path = out.join(format!("provider-{team_id}.key"));
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(&cert_path, cert).with_context(|| format!("writing {}", cert_path.display()))?;
    courier_core::secret_file::write_secret(&key_path, key.as_bytes())
        .with_context(|| format!("writing {}", key_path.display()))?;
    Ok((cert_path, key_path))
}

pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    if let CtlCommand::Providers(ProvidersCommand::IssueCert { team_id, topics, out, validity_days }) = &args.command {
        let validity = Duration::from_secs(validity_days.saturating_mul(86400));
        let (cert, key) = issue_provider_cert(&args.pki_dir, team_id, topics, out, validity)?;
        println!("provider certificate for team {team_id} ({}):", topics.join(", "));
        println!("  certificate {}", cert.display());
        println!("  key         {}", key.display());
        println!("  trust       {}", PkiDir::new(&args.pki_dir).cluster_ca_cert().display());
        return Ok(());
    }
    let peers = admin_peers(&args)?;
    let mut client = peers.client(&args.node)?;
    let node = args.node.as_str();
    match args.command {
        CtlCommand::Status { json, owner_of } => {
            let doc = status(&mut client, owner_of).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print_status(&doc);
            }
        }
        CtlCommand::Nodes(NodesCommand::Add { id, cluster_addr, device_addr }) => {
            let answer = client.join(JoinRequest { node_id: id, cluster_addr, device_addr }).await?.into_inner();
            println!("node {id} added as a {}", if answer.voter { "voter" } else { "learner" });
        }
        CtlCommand::Nodes(NodesCommand::Remove { id }) => {
            at_leader(
                &peers,
                node,
                |mut client| async move { client.remove_node(RemoveNodeRequest { node_id: id }).await },
            )
            .await
            .context("removing the node")?;
            println!("node {id} removed");
        }
        CtlCommand::Keys(KeysCommand::Rotate) => {
            let doc = status(&mut client, Vec::new()).await?;
            let next =
                doc["token_keys"].as_array().into_iter().flatten().filter_map(|k| k["id"].as_u64()).max().unwrap_or(0)
                    + 1;
            let next = u32::try_from(next).context("token key ids are exhausted")?;
            let key = TokenKey::generate(TokenKeyId(next));
            propose(&peers, node, Command::RotateTokenKey { key, now_ms: unix_millis() }).await?;
            println!("token key {next} is now active");
        }
        CtlCommand::Keys(KeysCommand::Retire { id }) => {
            propose(&peers, node, Command::RetireTokenKey { id: TokenKeyId(id), now_ms: unix_millis() }).await?;
        }
        CtlCommand::Keys(KeysCommand::List) => print_keys(&status(&mut client, Vec::new()).await?),
        CtlCommand::Providers(ProvidersCommand::Add { team_id, key_id, public_key, topics }) => {
            let public_key_pem =
                std::fs::read_to_string(&public_key).with_context(|| format!("reading {}", public_key.display()))?;
            if let Err(why) = courier_core::pki::check_es256_public_key(&public_key_pem) {
                bail!("{} is not an ES256 public key: {why}", public_key.display());
            }
            propose(&peers, node, Command::PutProviderKey { team_id, key_id, public_key_pem, topics }).await?;
        }
        CtlCommand::Providers(ProvidersCommand::List) => print_providers(&status(&mut client, Vec::new()).await?),
        CtlCommand::Providers(ProvidersCommand::IssueCert { .. }) => unreachable!("handled offline above"),
        CtlCommand::Providers(ProvidersCommand::Remove { team_id, key_id }) => {
            propose(&peers, node, Command::RemoveProvider { team_id, key_id }).await?;
        }
        CtlCommand::Providers(ProvidersCommand::Broadcast { team_id, disable }) => {
            propose(&peers, node, Command::SetBroadcast { team_id, enabled: !disable }).await?;
        }
        CtlCommand::Webhooks(command) => webhooks(&peers, node, &mut client, command).await?,
        CtlCommand::Devices(DevicesCommand::Revoke { device }) => {
            let device: DeviceId = device.parse().context("a device id is 32 hex characters")?;
            propose(&peers, node, Command::RevokeDevice { device }).await?;
        }
        CtlCommand::Devices(DevicesCommand::List) => print_clones(&status(&mut client, Vec::new()).await?),
        CtlCommand::Channels { app, team_id, limit, json } => {
            let request =
                ListChannelsRequest { app: app.unwrap_or_default(), team_id: team_id.unwrap_or_default(), limit };
            let (rows, more) = channels(&peers, &mut client, request).await?;
            if json {
                for row in &rows {
                    let mut line = row.record.clone();
                    line["subscribers"] = row.subscribers.into();
                    println!("{line}");
                }
            } else {
                print_channels(&rows, more);
            }
        }
        CtlCommand::Devices(DevicesCommand::ClearClone { device }) => {
            let device: DeviceId = device.parse().context("a device id is 32 hex characters")?;
            propose(&peers, node, Command::ClearClone { device }).await?;
        }
    }
    Ok(())
}
