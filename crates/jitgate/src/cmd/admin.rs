//! `jitgate admin`: local administration of a controller's data directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Mint a new Owner token when every Owner credential is lost. Runs on the
    /// controller's machine, as root or the data directory's owner, with the controller
    /// stopped; audited. Prints the token once.
    ///
    /// Example: sudo jitgate admin recover --data-dir /var/lib/jitgate
    Recover {
        #[arg(long)]
        data_dir: PathBuf,
        /// The controller's checkpoint file, if not the default.
        #[arg(long)]
        audit_checkpoints: Option<PathBuf>,
    },
}

pub async fn admin(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCommand::Recover {
            data_dir,
            audit_checkpoints,
        } => {
            let token = jitgate_controller::recover(&data_dir, audit_checkpoints).await?;
            eprintln!(
                "new Owner token for principal recovery-admin (shown once; revoke it once you have another Owner):"
            );
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
