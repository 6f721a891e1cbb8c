//! Starting and stopping the controller: data directory, bootstrap, listener, TLS,
//! the expiry task and graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use jitgate_core::Timestamp;
use jitgate_core::ids::SubscriptionId;
use jitgate_store::{AuditCtx, Bootstrap, Store, TokenRecord};
use jitgate_store_sql::{SqlStore, StoreOptions};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::auth::{generate_token, sha256_hex, split_token};
use crate::checkpoint::{Checkpointer, create_secret_file};
use crate::{AppState, metrics};

pub const DB_FILE: &str = "jitgate.db";
pub const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";
pub const BOOTSTRAP_PRINCIPAL: &str = "bootstrap-admin";
pub const LOCK_FILE: &str = "controller.lock";
pub const RECOVERY_PRINCIPAL: &str = "recovery-admin";
/// Blocked-attempt points are kept 30 days unless configured otherwise.
pub const DEFAULT_BLOCKED_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(30 * 86_400);

/// An exclusive lock on the data directory, held while a controller (or a local
/// recovery) uses it: two writers would fork the audit chain.
pub struct DataDirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                anyhow::anyhow!(
                    "{} is in use by another jitgate controller (or a recovery): {e}",
                    data_dir.display()
                )
            })?;
        Ok(DataDirLock { _lock: lock })
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// A PostgreSQL connection string: all state there instead of in the data
    /// directory's SQLite file (several controllers may share it).
    pub database: Option<String>,
    pub tls: Option<TlsFiles>,
    /// Allow plain HTTP on a non-loopback address.
    pub insecure_http: bool,
    /// Serve HTTPS with the controller's own CA also on a loopback address (the
    /// default elsewhere when no certificate is given).
    pub auto_tls: bool,
    /// Extra subject alternative names for the controller's own certificate.
    pub tls_sans: Vec<String>,
    /// Use this as the bootstrap Owner token instead of generating one.
    pub bootstrap_token: Option<jitgate_proto::Secret>,
    /// Management ports and agent-offline time for recommendations.
    pub recommend: jitgate_core::recommend::RecommendConfig,
    /// Where signed audit checkpoints are appended (default: `audit-checkpoints.jsonl`
    /// in the data directory; better on another volume).
    pub audit_checkpoints: Option<PathBuf>,
    /// How often a checkpoint is written while the chain grows.
    pub checkpoint_interval: std::time::Duration,
    /// Serve even though the audit chain does not match its newest checkpoint (the
    /// decision is audited).
    pub accept_audit_break: bool,
    /// Refused-call, connection and timeout limits.
    pub limits: crate::limits::Limits,
    /// The most writes waiting for the store's writer; past it a write is answered 503
    /// with `Retry-After` (see `jitgate_store_sql::StoreOptions`).
    pub write_queue: usize,
    /// How long blocked-attempt points are kept (pruned at start and hourly).
    pub blocked_retention: std::time::Duration,
    /// Load balancers and reverse proxies whose `X-Forwarded-For` header names the
    /// caller (see `proxy`); empty: the connection's address is the caller's.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Sign-in with the organisation's OpenID Provider.
    pub oidc: Option<crate::oidc::OidcConfig>,
    /// How long break-glass access lasts at most (seconds).
    pub break_glass_max: i64,
    /// URL prefixes webhooks may reach even on private or loopback addresses.
    pub webhook_allow: Vec<String>,
    /// The first retry of a failed webhook delivery (later ones are multiples).
    pub webhook_retry: std::time::Duration,
    /// The binary served to machines as the agent (default: this controller's own).
    pub agent_binary: Option<PathBuf>,
    /// Where the controller reads the time (the system clock; tests pass a
    /// `ManualClock`).
    pub clock: crate::clock::Clock,
}

impl Config {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Config {
            listen,
            data_dir,
            database: None,
            tls: None,
            insecure_http: false,
            auto_tls: false,
            tls_sans: Vec::new(),
            bootstrap_token: None,
            recommend: jitgate_core::recommend::RecommendConfig::default(),
            audit_checkpoints: None,
            checkpoint_interval: std::time::Duration::from_secs(5),
            accept_audit_break: false,
            limits: crate::limits::Limits::default(),
            write_queue: jitgate_store_sql::DEFAULT_WRITE_QUEUE,
            blocked_retention: DEFAULT_BLOCKED_RETENTION,
            trusted_proxies: Vec::new(),
            oidc: None,
            break_glass_max: jitgate_core::approval::BREAK_GLASS_MAX_SECS,
            webhook_allow: Vec::new(),
            webhook_retry: std::time::Duration::from_secs(5),
            agent_binary: None,
            clock: crate::clock::Clock::system(),
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
    checkpoints: JoinHandle<()>,
    _lock: DataDirLock,
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
        // The final checkpoint, after the last request's events are written.
        let _ = self.checkpoints.await;
        served.context("server")?;
        Ok(())
    }
}

/// Takes group and other permissions away from a path the controller owns (the data
/// directory 0700, database files 0600), also when started by hand with a loose umask.
fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    if meta.permissions().mode() & 0o777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot restrict {} to mode {mode:o}", path.display()))?;
    }
    Ok(())
}

/// Opens the store and creates the installation at first start.
async fn bootstrap(config: &Config) -> anyhow::Result<(Arc<dyn Store>, Vec<SubscriptionId>)> {
    // `start` created the directory (it holds the lock).
    restrict(&config.data_dir, 0o700)?;
    let options = StoreOptions {
        write_queue: config.write_queue,
        recommend: config.recommend.clone(),
    };
    let store = match &config.database {
        Some(url) => {
            let store = SqlStore::connect_postgres(url, options)
                .await
                .context("cannot open the PostgreSQL database")?;
            tracing::info!("state is kept in PostgreSQL");
            store
        }
        None => {
            let db = config.data_dir.join(DB_FILE);
            let store = SqlStore::open_with(&db, options).with_context(|| {
                format!("cannot open the database in {}", config.data_dir.display())
            })?;
            for suffix in ["", "-wal", "-shm"] {
                let f = PathBuf::from(format!("{}{suffix}", db.display()));
                if f.exists() {
                    restrict(&f, 0o600)?;
                }
            }
            store
        }
    };
    let store: Arc<dyn Store> = Arc::new(store);
    let now = config.clock.now();
    let (token_text, generated) = match &config.bootstrap_token {
        Some(t) => {
            if t.expose().len() < 16 {
                bail!("JITGATE_BOOTSTRAP_TOKEN must be at least 16 characters long");
            }
            (t.expose().to_owned(), false)
        }
        None => (generate_token().1, true),
    };
    let (id, secret) = match split_token(&token_text) {
        Some((id, secret)) => (id.to_owned(), secret),
        // A token of the operator's own making gets a random id (never derived from it).
        None => (generate_token().0, token_text.as_str()),
    };
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
            identity: None,
            last_used: None,
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
            create_secret_file(&path, format!("{token_text}\n").as_bytes())?;
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
    let loopback = config.listen.ip().is_loopback();
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let (store, subscriptions) = bootstrap(&config).await?;
    let served = match &config.tls {
        Some(files) => {
            let (served, warnings) = crate::tls::check_given(files, config.listen)?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            Some(served)
        }
        None if config.auto_tls || (!loopback && !config.insecure_http) => Some(
            crate::tls::ensure_auto(&config.data_dir, config.listen, &config.tls_sans)?,
        ),
        None => {
            if !loopback {
                tracing::warn!(
                    addr = %config.listen,
                    "serving plain HTTP on a non-loopback address (--insecure-http): tokens and grants cross the network in clear text; anyone on the path can read and replay them. Remove --insecure-http to serve HTTPS with the controller's own CA"
                );
            }
            None
        }
    };
    if let Some(s) = &served {
        if s.auto {
            tracing::info!(
                ca_fingerprint = %s.pin,
                ca_cert = %crate::tls::ca_cert_path(&config.data_dir).display(),
                "serving HTTPS with the controller's own CA; clients pin this fingerprint (enrollment tokens carry it; `jitgate login` shows it)"
            );
        } else {
            tracing::info!(pin = %s.pin, "serving HTTPS with the given certificate; clients may pin this fingerprint");
        }
    }
    let (checkpointer, fresh_key) = Checkpointer::open(
        &config.data_dir.join(crate::checkpoint::SIGNING_KEY_FILE),
        config
            .audit_checkpoints
            .clone()
            .unwrap_or_else(|| config.data_dir.join(crate::checkpoint::CHECKPOINT_FILE)),
    )?;
    crate::checkpoint::check_at_start(
        &checkpointer,
        store.as_ref(),
        fresh_key,
        config.accept_audit_break,
    )
    .await?;
    tracing::info!(
        public_key = %checkpointer.public().to_hex(),
        checkpoints = %checkpointer.path().display(),
        "audit checkpoints are signed with this Ed25519 key"
    );
    let checkpointer = Arc::new(checkpointer);
    let state = AppState {
        store,
        clock: config.clock.clone(),
        subscriptions: Arc::new(subscriptions),
        metrics: Arc::new(metrics::Metrics::new()),
        expiry_wake: Arc::new(Notify::new()),
        expiry_at: Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)),
        vm_changes: Arc::new(crate::desired::VmChanges::default()),
        tls: served.is_some(),
        tls_pin: served.as_ref().map(|s| s.pin),
        tls_cert: served.as_ref().map(|s| s.files.cert.clone()),
        agent_binary: match &config.agent_binary {
            Some(p) => Some(p.clone()),
            None => std::env::current_exe().ok(),
        }
        .map(|p| Arc::new(crate::install::AgentBinary::new(p))),
        recommend: Arc::new(config.recommend.clone()),
        checkpoints: checkpointer.clone(),
        refusals: Arc::new(crate::limits::RefusalLimiter::new(config.limits.clone())),
        auth_cache: Arc::new(crate::authcache::AuthCache::default()),
        trusted_proxies: Arc::new(config.trusted_proxies.clone()),
        break_glass_max: config.break_glass_max,
        webhook_allow: Arc::new(config.webhook_allow.clone()),
        webhook_retry: config.webhook_retry,
        oidc: match &config.oidc {
            Some(c) => Some(Arc::new(crate::oidc::Oidc::new(c.clone())?)),
            None => None,
        },
        web_api: crate::web::Api::default(),
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    tokio::spawn(crate::limits::summarize(state.clone(), shutdown_rx.clone()));
    tokio::spawn(crate::webhooks::run(state.clone(), shutdown_rx.clone()));
    tokio::spawn(crate::webhooks::watch_agents(
        state.clone(),
        shutdown_rx.clone(),
    ));
    if let Some(bell) = state.store.shared_changes() {
        tokio::spawn(crate::feed::run(state.clone(), bell, shutdown_rx.clone()));
    }
    let checkpoints = tokio::spawn(crate::checkpoint::run(
        checkpointer,
        state.store.clone(),
        config.checkpoint_interval,
        shutdown_rx.clone(),
    ));
    let expiry = tokio::spawn(crate::expiry::run(state.clone(), shutdown_rx.clone()));
    tokio::spawn(crate::recommend::prune_blocked(
        state.clone(),
        config.blocked_retention,
        shutdown_rx.clone(),
    ));
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
    // Leave room for the database, checkpoint and log files under the fd limit.
    let fd_limit = crate::limits::raise_fd_limit();
    let max_connections = config
        .limits
        .max_connections
        .min(fd_limit.saturating_sub(128).max(16) as usize);
    let cap =
        crate::limits::CapAcceptor::new(max_connections, state.metrics.connections_refused.clone());
    let mut srv = axum_server::from_tcp(listener)?.handle(handle.clone());
    srv.http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.limits.header_read_timeout);
    srv.http_builder()
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    let server = match served.as_ref().map(|s| &s.files) {
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
            if served.as_ref().is_some_and(|s| s.auto) {
                tokio::spawn(renew_auto_tls(
                    config.clone(),
                    rustls_config.clone(),
                    shutdown.subscribe(),
                ));
            }
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(rustls_config)
                .handshake_timeout(config.limits.header_read_timeout)
                .acceptor(cap);
            tokio::spawn(srv.acceptor(acceptor).serve(app))
        }
        None => tokio::spawn(srv.acceptor(cap).serve(app)),
    };
    tracing::info!(max_connections, fd_limit, "connection cap");
    tracing::info!(addr = %local_addr, tls = served.is_some(), "controller listening");
    Ok(Running {
        local_addr,
        subscription: state.default_subscription(),
        state,
        shutdown,
        handle,
        server,
        expiry,
        checkpoints,
        _lock: lock,
    })
}

/// Renews the controller's own server certificate before it expires (checked twice a
/// day) and serves the new one without a restart.
async fn renew_auto_tls(
    config: Config,
    rustls_config: axum_server::tls_rustls::RustlsConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(12 * 3600)) => {}
            _ = shutdown.changed() => return,
        }
        let before =
            std::fs::read(config.data_dir.join(crate::tls::TLS_DIR).join("server.pem")).ok();
        match crate::tls::ensure_auto(&config.data_dir, config.listen, &config.tls_sans) {
            Ok(s) => {
                if std::fs::read(&s.files.cert).ok() != before
                    && let Err(e) = rustls_config
                        .reload_from_pem_file(&s.files.cert, &s.files.key)
                        .await
                {
                    tracing::error!(error = %e, "cannot load the renewed server certificate");
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot renew the server certificate")
            }
        }
    }
}

/// Copies the installation in `data_dir` (the controller stopped) into an empty
/// PostgreSQL database, its audit chain verified after the copy. The data directory
/// is left as it was (a way back); `jitgate serve --database` then runs on the copy,
/// with the same data directory for its TLS files and checkpoint key.
pub async fn migrate_to_postgres(
    data_dir: &Path,
    url: &str,
) -> anyhow::Result<jitgate_store_sql::CopyReport> {
    let db = data_dir.join(DB_FILE);
    if !db.exists() {
        bail!("no jitgate database at {}", db.display());
    }
    let _lock = DataDirLock::acquire(data_dir)
        .context("stop the controller first (the copy must see a database nobody writes)")?;
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || jitgate_store_sql::copy_sqlite_to_postgres(&db, &url))
        .await
        .context("the copy task failed")?
        .context("the copy failed")
}

/// `jitgate admin recover`: mints a new Owner token directly in the data directory,
/// for when every Owner credential is lost. Local only: the caller must be root or
/// own the data directory, and no controller may be running on it. Audited
/// (`admin.recover`, then the token and role assignment it creates), and anchored
/// with a fresh signed checkpoint. Returns the token text.
pub async fn recover(data_dir: &Path, checkpoints: Option<PathBuf>) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let db = data_dir.join(DB_FILE);
    if !db.exists() {
        bail!("no jitgate database at {}", db.display());
    }
    let me = std::fs::metadata("/proc/self")
        .context("cannot tell who runs this (no /proc)")?
        .uid();
    let owner = std::fs::metadata(data_dir)?.uid();
    if me != 0 && me != owner {
        bail!(
            "only root or the owner of {} (uid {owner}) may recover it",
            data_dir.display()
        );
    }
    let _lock = DataDirLock::acquire(data_dir).context(
        "stop the controller first (jitgate admin recover works on a stopped controller)",
    )?;
    let store: Arc<dyn Store> = Arc::new(SqlStore::open(&db)?);
    let (checkpointer, fresh) = Checkpointer::open(
        &data_dir.join(crate::checkpoint::SIGNING_KEY_FILE),
        checkpoints.unwrap_or_else(|| data_dir.join(crate::checkpoint::CHECKPOINT_FILE)),
    )?;
    // Recovery does not paper over a broken log: the same check as a start.
    crate::checkpoint::check_at_start(&checkpointer, store.as_ref(), fresh, false).await?;
    let now = Timestamp::now();
    let audit = AuditCtx {
        actor: format!("local-recovery:uid={me}"),
        source: "local".to_owned(),
        now,
    };
    store
        .append_audit(jitgate_core::audit::AuditEntry {
            time: now.to_string(),
            actor: audit.actor.clone(),
            source: audit.source.clone(),
            action: "admin.recover".to_owned(),
            target: data_dir.display().to_string(),
            outcome: jitgate_core::audit::Outcome::Success,
            details: serde_json::json!({"principal": RECOVERY_PRINCIPAL}).to_string(),
        })
        .await?;
    let (id, text, hash) = generate_token();
    store
        .create_token(
            TokenRecord {
                id,
                principal: RECOVERY_PRINCIPAL.to_owned(),
                secret_hash: hash,
                description: "created by jitgate admin recover".to_owned(),
                created: now,
                expires: None,
                revoked: None,
                identity: None,
                last_used: None,
            },
            audit.clone(),
        )
        .await?;
    let existing = store.role_assignments(Some(RECOVERY_PRINCIPAL)).await?;
    for sub in store.subscriptions().await? {
        let scope = jitgate_core::ids::Scope::Subscription(sub);
        if existing.iter().any(|r| {
            r.assignment.role == jitgate_core::rbac::Role::Owner && r.assignment.scope == scope
        }) {
            continue;
        }
        store
            .add_role_assignment(
                jitgate_store::RoleAssignmentRecord {
                    id: format!("recovery-{}", generate_token().0),
                    assignment: jitgate_core::rbac::RoleAssignment {
                        principal: RECOVERY_PRINCIPAL.to_owned(),
                        role: jitgate_core::rbac::Role::Owner,
                        scope,
                    },
                    created: now,
                },
                audit.clone(),
            )
            .await?;
    }
    checkpointer.checkpoint(store.as_ref()).await?;
    Ok(text)
}
