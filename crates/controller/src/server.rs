//! Starting and stopping the controller: data directory, bootstrap, listener, TLS,
//! the expiry task and graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use jitgate_core::Timestamp;
use jitgate_core::ids::SubscriptionId;
use jitgate_store::sqlite::SqliteStore;
use jitgate_store::{AuditCtx, Bootstrap, Store, TokenRecord};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::auth::{generate_token, sha256_hex, split_token};
use crate::{AppState, metrics};

pub const DB_FILE: &str = "jitgate.db";
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";
pub const BOOTSTRAP_PRINCIPAL: &str = "bootstrap-admin";

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: Option<TlsFiles>,
    /// Allow plain HTTP on a non-loopback address.
    pub insecure_http: bool,
    /// Use this as the bootstrap Owner token instead of generating one.
    pub bootstrap_token: Option<String>,
    /// Management ports and agent-offline time for recommendations.
    pub recommend: jitgate_core::recommend::RecommendConfig,
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Config {
            listen,
            data_dir,
            tls: None,
            insecure_http: false,
            bootstrap_token: None,
            recommend: jitgate_core::recommend::RecommendConfig::default(),
        }
    }
}

/// A running controller.
pub struct Running {
    pub local_addr: SocketAddr,
    pub subscription: SubscriptionId,
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    handle: axum_server::Handle<SocketAddr>,
    server: JoinHandle<std::io::Result<()>>,
    expiry: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to 10 s), stops the
    /// scheduler and the store's writer.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.handle
            .graceful_shutdown(Some(std::time::Duration::from_secs(10)));
        let _ = self.shutdown.send(true);
        let served = self.server.await.context("server task")?;
        let _ = self.expiry.await;
        served.context("server")?;
        Ok(())
    }
}

fn write_secret_file(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

/// Opens the store and creates the installation at first start.
async fn bootstrap(config: &Config) -> anyhow::Result<(Arc<dyn Store>, Vec<SubscriptionId>)> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let store = SqliteStore::open(&config.data_dir.join(DB_FILE))
        .with_context(|| format!("cannot open the database in {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = Arc::new(store);
    let now = Timestamp::now();
    let (token_text, generated) = match &config.bootstrap_token {
        Some(t) => {
            if t.len() < 16 {
                bail!("JITGATE_BOOTSTRAP_TOKEN must be at least 16 characters long");
            }
            (t.clone(), false)
        }
        None => (generate_token().1, true),
    };
    let (id, secret) = split_token(&token_text);
    let init = Bootstrap {
        subscription: SubscriptionId::new(uuid::Uuid::new_v4()),
        owner_principal: BOOTSTRAP_PRINCIPAL.to_owned(),
        owner_token: TokenRecord {
            id,
            principal: BOOTSTRAP_PRINCIPAL.to_owned(),
            secret_hash: sha256_hex(secret),
            description: "bootstrap Owner token".to_owned(),
            created: now,
            expires: None,
            revoked: None,
        },
    };
    let audit = AuditCtx {
        actor: "system".to_owned(),
        source: "controller".to_owned(),
        now,
    };
    let outcome = store.bootstrap(init, audit).await.context("bootstrap")?;
    if outcome.created {
        tracing::info!(subscription = %outcome.subscription, "created the installation");
        if generated {
            let path = config.data_dir.join(BOOTSTRAP_TOKEN_FILE);
            write_secret_file(&path, &token_text)?;
            tracing::info!(path = %path.display(), "wrote the bootstrap Owner token (mode 0600)");
        }
    }
    let subs = store.subscriptions().await?;
    if subs.is_empty() {
        bail!("the database has no subscription");
    }
    Ok((store, subs))
}

/// Starts the controller and returns once it is listening.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    if !config.listen.ip().is_loopback() && config.tls.is_none() && !config.insecure_http {
        bail!(
            "refusing to serve plain HTTP on the non-loopback address {}: give --tls-cert and --tls-key, or --insecure-http",
            config.listen
        );
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (store, subscriptions) = bootstrap(&config).await?;
    let state = AppState {
        store,
        subscriptions: Arc::new(subscriptions),
        metrics: Arc::new(metrics::Metrics::new()),
        expiry_wake: Arc::new(Notify::new()),
        expiry_at: Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)),
        vm_changes: Arc::new(crate::agent::VmChanges::default()),
        tls: config.tls.is_some(),
        recommend: Arc::new(config.recommend.clone()),
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let expiry = tokio::spawn(crate::expiry::run(state.clone(), shutdown_rx.clone()));
    tokio::spawn(crate::recommend::refresh_metrics(
        state.clone(),
        shutdown_rx,
    ));

    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let handle = axum_server::Handle::<SocketAddr>::new();
    let app = crate::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let server = match &config.tls {
        Some(tls) => {
            let rustls_config =
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot load the TLS certificate {} and key {}",
                            tls.cert.display(),
                            tls.key.display()
                        )
                    })?;
            let srv = axum_server::from_tcp_rustls(listener, rustls_config)?.handle(handle.clone());
            tokio::spawn(srv.serve(app))
        }
        None => {
            let srv = axum_server::from_tcp(listener)?.handle(handle.clone());
            tokio::spawn(srv.serve(app))
        }
    };
    tracing::info!(addr = %local_addr, tls = config.tls.is_some(), "controller listening");
    Ok(Running {
        local_addr,
        subscription: state.default_subscription(),
        state,
        shutdown,
        handle,
        server,
        expiry,
    })
}
