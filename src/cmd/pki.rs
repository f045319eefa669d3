//! `courier pki init`: create a PKI directory (cluster CA, device CA, member certificates, token keys,
//! provider signing key) or fill in what is missing from one.

use std::path::PathBuf;

use anyhow::Context;
use courier_node::pki::{self, PkiDir, PkiOptions};

#[derive(clap::Subcommand)]
pub enum PkiCommand {
    /// Create whatever is missing in DIR; existing files are kept.
    Init {
        #[arg(long, default_value = "courier-pki")]
        dir: PathBuf,
        /// Extra DNS name or IP address for node and gateway certificates (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir, sans } => {
            let credential = pki::init(&dir, &PkiOptions { extra_sans: sans })
                .with_context(|| format!("initialising {}", dir.display()))?;
            let paths = PkiDir::new(&dir);
            println!("PKI ready in {}", dir.display());
            println!("  cluster CA      {}", paths.cluster_ca_cert().display());
            println!("  device CA       {}", paths.device_ca_cert().display());
            println!("  provider CA     {}", paths.provider_ca_cert().display());
            println!("  node cert       {}", paths.member_cert("node").display());
            println!("  gateway cert    {}", paths.member_cert("gateway").display());
            println!("  token keys      {}", paths.token_keys().display());
            println!("  provider team   {}", credential.team_id);
            println!("  provider key id {}", credential.key_id);
            println!("  provider key    {}", paths.provider_signing_key(&credential.key_id).display());
            Ok(())
        }
    }
}
