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
    /// Copy a controller's installation (its embedded SQLite database) into an empty
    /// PostgreSQL database, for controllers that share it (`serve --database`). Runs
    /// with the controller stopped; the audit chain is verified on the copy. The data
    /// directory is left as it was.
    ///
    /// Example: sudo jitgate admin migrate --from-data-dir /var/lib/jitgate --to postgres://jitgate@db/jitgate
    Migrate {
        #[arg(long)]
        from_data_dir: PathBuf,
        /// The PostgreSQL database (postgres://... or host=... dbname=...).
        #[arg(long, env = "JITGATE_DATABASE_URL", hide_env_values = true)]
        to: String,
    },
}

pub async fn admin(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AdminCommand::Migrate { from_data_dir, to } => {
            let r = jitgate_controller::migrate_to_postgres(&from_data_dir, &to).await?;
            for (table, rows) in &r.tables {
                println!("{table:<18} {rows:>10} rows");
            }
            println!(
                "audit chain verified on the copy: {} events, head {}",
                r.audit.count, r.audit.head_hash
            );
            eprintln!(
                "next: start the controller with --database (the same URL) and the same --data-dir"
            );
            Ok(ExitCode::SUCCESS)
        }
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
