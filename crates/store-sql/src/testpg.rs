//! A real, throwaway PostgreSQL server for tests (feature `testpg`; not compiled into
//! the product).
//!
//! The first test of a process that asks for a database starts one server for the
//! whole process: `initdb` into a temporary directory (as the `postgres` user when
//! running as root, which PostgreSQL refuses), `pg_ctl start` on a free loopback port
//! with its socket in that directory, durability switched off (these are functional
//! tests; benchmarks keep it on). A watcher process stops the server and removes the
//! directory when the test process ends, however it ends. Each test gets a database of
//! its own ([`TestDb`]), dropped with it: a copy of a template migrated once per
//! process, or an empty one for tests of migrating.
//!
//! `JITGATE_TEST_PG` (a connection string to a server where `CREATE DATABASE` is
//! allowed) uses that server instead. Without either, the test fails saying what to
//! install: PostgreSQL tests never skip.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the server runs.
#[derive(Debug)]
pub struct Server {
    /// `host=... port=... user=...`, without a database.
    base: String,
    /// The server's directory (none for `JITGATE_TEST_PG`).
    pub dir: Option<PathBuf>,
    /// PostgreSQL's programs.
    pub bin: PathBuf,
}

static SERVER: OnceLock<Server> = OnceLock::new();
/// The migrated, empty database each [`TestDb::create`] copies (own server only).
static TEMPLATE: OnceLock<Option<String>> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The directory holding PostgreSQL's programs (`initdb`, `pg_ctl`, `psql`): the
/// newest under `/usr/lib/postgresql`, else wherever `pg_config --bindir` says.
pub fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return bin;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if bin.join("initdb").exists() {
            return bin;
        }
    }
    panic!(
        "PostgreSQL's server programs (initdb, pg_ctl) were not found: install them \
         (Debian 12: apt-get install postgresql-15; ./scripts/test.sh installs it), or set \
         JITGATE_TEST_PG to a server where this user may CREATE DATABASE"
    );
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// `program args...`, as the `postgres` user when running as root.
pub fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Makes the server's user the owner of `path` (a key file the server must read).
pub fn give_to_server_user(path: &Path) {
    if is_root() {
        let mut c = Command::new("chown");
        c.arg("postgres:postgres").arg(path);
        run(c, "chown");
    }
}

/// Runs `c`; panics with its output unless it succeeds.
pub fn run(mut c: Command, what: &str) {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A fresh data directory, `initdb`-ed, owned by the server's user.
pub fn init_data_dir(bin: &Path, parent: &Path, name: &str) -> PathBuf {
    let data = parent.join(name);
    let mut c = as_server_user(&bin.join("initdb"));
    c.arg("-D").arg(&data).args([
        "-U",
        "postgres",
        "--auth=trust",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    run(c, "initdb");
    data
}

/// Starts the server of `data` on `port`, its socket in `socket_dir`; `extra` are
/// more `-c name=value` settings.
pub fn start_server(bin: &Path, data: &Path, port: u16, socket_dir: &Path, extra: &str) {
    let mut c = as_server_user(&bin.join("pg_ctl"));
    c.arg("-D")
        .arg(data)
        .arg("-l")
        .arg(data.with_extension("log"))
        .arg("-w")
        .arg("-o")
        .arg(format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=300 {extra}",
            socket_dir.display()
        ))
        .arg("start");
    run(c, "pg_ctl start");
}

/// A directory the server's user may write, removed by the watcher.
pub fn server_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    give_to_server_user(&dir);
    dir
}

/// Stops every server under `dir` (immediately) and removes `dir` once this process
/// has ended. The watcher outlives this process (init reaps it), so it is not waited
/// for.
#[allow(clippy::zombie_processes)]
pub fn clean_up_after_exit(bin: &Path, dir: &Path) {
    let pg_ctl = bin.join("pg_ctl");
    let runuser = if is_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         for d in '{dir}'/*/; do [ -f \"$d/postmaster.pid\" ] && {runuser}'{pg_ctl}' -D \"$d\" -m immediate stop >/dev/null 2>&1; done; \
         rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display(),
        pg_ctl = pg_ctl.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the clean-up watcher starts");
}

/// The process's server, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let bin = bin_dir();
        if let Ok(url) = std::env::var("JITGATE_TEST_PG") {
            return Server {
                base: url,
                dir: None,
                bin,
            };
        }
        start_own(
            "jitgate-test-pg",
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        )
    })
}

/// A server of this process's own on a free loopback port (stopped and removed when
/// the process ends), with `settings` (`-c name=value ...`).
pub fn start_own(prefix: &str, settings: &str) -> Server {
    let bin = bin_dir();
    let dir = server_dir(prefix);
    clean_up_after_exit(&bin, &dir);
    let data = init_data_dir(&bin, &dir, "data");
    let port = free_port();
    start_server(&bin, &data, port, &dir, settings);
    Server {
        base: format!("host=127.0.0.1 port={port} user=postgres"),
        dir: Some(dir),
        bin,
    }
}

impl Server {
    /// The connection string of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("{} dbname={db}", self.base)
    }

    /// Runs `sql` with `psql` on the `postgres` database; returns its output.
    pub fn psql(&self, sql: &str) -> String {
        psql_at(&self.bin, &self.url("postgres"), sql)
    }
}

/// Runs `sql` with the `psql` of `bin` on the database `conninfo` names; returns its
/// output, or panics with psql's error.
pub fn psql_at(bin: &Path, conninfo: &str, sql: &str) -> String {
    let out = Command::new(bin.join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A database of its own for one test, dropped (connections and all) with the value.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A new database with the store's schema and no rows: a copy of a template
    /// migrated once per process (on `JITGATE_TEST_PG`, an empty database that the
    /// store migrates when it connects).
    pub fn create() -> TestDb {
        Self::new(template())
    }

    /// A new database without even the schema: for what happens when stores migrate
    /// one (several at once, for example).
    pub fn empty() -> TestDb {
        Self::new(None)
    }

    fn new(template: Option<&str>) -> TestDb {
        let s = server();
        let name = format!(
            "jg_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        match template {
            Some(t) => s.psql(&format!("CREATE DATABASE {name} TEMPLATE {t}")),
            None => s.psql(&format!("CREATE DATABASE {name}")),
        };
        TestDb {
            url: s.url(&name),
            name,
        }
    }
}

/// The template database, migrated on first use, with no connection left to it
/// (PostgreSQL copies only a template nobody is connected to).
fn template() -> Option<&'static str> {
    TEMPLATE
        .get_or_init(|| {
            let s = server();
            s.dir.as_ref()?;
            let name = "jg_template";
            s.psql(&format!("CREATE DATABASE {name}"));
            let target = crate::pg::target(&s.url(name)).expect("the template's URL");
            let db = crate::pg::connect(&target).expect("a connection to the template");
            crate::pg::migrate(&db).expect("the template's schema");
            drop(db);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while s.psql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}'"
            )) != "0"
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a connection to the template database stays open"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Some(name.to_owned())
        })
        .as_deref()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(s) = SERVER.get() {
            let _ = Command::new(s.bin.join("psql"))
                .args(["-X", "-q", "-d"])
                .arg(s.url("postgres"))
                .arg("-c")
                .arg(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
