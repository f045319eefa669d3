//! `courier pki`: create a PKI directory (cluster CA, device CA, provider CA, gateway and admin
//! certificates, node certificates on request, token keys, provider signing key) or fill in what is missing
//! from one (`init`), and issue or renew one cluster certificate at a time (`issue`).

use std::path::PathBuf;

use anyhow::Context;
use courier_core::pki::{self, ClusterRole, PkiDir, PkiOptions};

#[derive(clap::Subcommand)]
pub enum PkiCommand {
    /// Create whatever is missing in DIR; existing files are kept.
    Init {
        #[arg(long, default_value = "courier-pki")]
        dir: PathBuf,
        /// Also issue the certificates of nodes 1..=N (`node-<K>.pem`), where missing; more later with
        /// `pki issue node --id K`.
        #[arg(long, default_value_t = 0)]
        nodes: u64,
        /// Extra DNS name or IP address for node and gateway certificates (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Issue, or renew (replacing certificate and key), one cluster certificate signed by DIR's cluster CA.
    #[command(subcommand)]
    Issue(IssueCommand),
}

#[derive(clap::Subcommand)]
pub enum IssueCommand {
    /// Node K's certificate, `node-<K>.pem`: role node K, its own device name `node-<K>.courier.internal`,
    /// loopback names and the --san names (the hosts it is reached at).
    Node {
        #[arg(long, default_value = "courier-pki")]
        dir: PathBuf,
        /// The node id (1, 2, …), as the node's --node-id.
        #[arg(long)]
        id: u64,
        /// Extra DNS name or IP address (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// The gateways' certificate, `gateway.pem` (also served to providers).
    Gateway {
        #[arg(long, default_value = "courier-pki")]
        dir: PathBuf,
        /// Extra DNS name or IP address (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// The operator's certificate, `admin.pem`, which `courier ctl` presents.
    Admin {
        #[arg(long, default_value = "courier-pki")]
        dir: PathBuf,
    },
}

pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir, nodes, sans } => {
            let options = PkiOptions { extra_sans: sans, nodes: (1..=nodes).collect() };
            let credential = pki::init(&dir, &options).with_context(|| format!("initialising {}", dir.display()))?;
            let paths = PkiDir::new(&dir);
            println!("PKI ready in {}", dir.display());
            println!("  cluster CA      {}", paths.cluster_ca_cert().display());
            println!("  device CA       {}", paths.device_ca_cert().display());
            println!("  provider CA     {}", paths.provider_ca_cert().display());
            for id in 1..=nodes {
                println!("  node {id} cert     {}", paths.node_cert(id).display());
            }
            println!("  gateway cert    {}", paths.member_cert("gateway").display());
            println!("  admin cert      {}", paths.member_cert("admin").display());
            println!("  token keys      {}", paths.token_keys().display());
            println!("  provider team   {}", credential.team_id);
            println!("  provider key id {}", credential.key_id);
            println!("  provider key    {}", paths.provider_signing_key(&credential.key_id).display());
            if nodes == 0 {
                println!("Issue each node's certificate with `courier pki issue node --id K --dir {}`.", dir.display());
            }
            Ok(())
        }
        PkiCommand::Issue(issue) => {
            let (dir, role, sans) = match issue {
                IssueCommand::Node { dir, id, sans } => {
                    anyhow::ensure!(id >= 1, "node ids start at 1");
                    (dir, ClusterRole::Node(id), sans)
                }
                IssueCommand::Gateway { dir, sans } => (dir, ClusterRole::Gateway, sans),
                IssueCommand::Admin { dir } => (dir, ClusterRole::Admin, Vec::new()),
            };
            let path = pki::issue(&PkiDir::new(&dir), role, &sans)
                .with_context(|| format!("issuing the {role} certificate in {}", dir.display()))?;
            println!("issued the {role} certificate: {}", path.display());
            if let ClusterRole::Node(id) = role {
                println!("  devices redirected to it check the name {}", pki::node_device_name(id));
            }
            Ok(())
        }
    }
}
