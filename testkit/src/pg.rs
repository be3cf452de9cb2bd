//! A throwaway PostgreSQL for tests.
//!
//! With `DATABASE_URL` set, that server is used (it must allow `CREATE DATABASE`).
//! Otherwise one cluster per test process is created with `initdb` in a temporary
//! directory and started with `pg_ctl` on a free loopback port (as the `postgres` user
//! when running as root, since PostgreSQL refuses to run as root). It is stopped when the
//! process exits.

use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct PgServer {
    admin_url: String,
    data_dir: Option<PathBuf>,
    run_as: Option<String>,
    bin: PathBuf,
}

static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();

/// The process-wide server, started on first use.
pub fn server() -> anyhow::Result<&'static PgServer> {
    SERVER
        .get_or_init(|| PgServer::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("sh")
        .arg("-c")
        .arg("command -v initdb")
        .output()
    {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !p.is_empty() {
            let real = std::fs::canonicalize(&p).unwrap_or_else(|_| PathBuf::from(&p));
            if let Some(dir) = real.parent() {
                return Ok(dir.to_path_buf());
            }
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates
        .into_iter()
        .rev()
        .find(|p| p.join("initdb").exists())
        .context("PostgreSQL server binaries (initdb, pg_ctl) not found: install them with `apt-get install postgresql`, or set DATABASE_URL to a server the tests may create databases on")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_to(path: &Path, user: &str) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:"))
        .arg(path)
        .status()?;
    if !status.success() {
        bail!("chown {user} {} failed", path.display());
    }
    Ok(())
}

impl PgServer {
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let exe = self.bin.join(program);
        let out = match &self.run_as {
            Some(user) => Command::new("runuser")
                .arg("-u")
                .arg(user)
                .arg("--")
                .arg(&exe)
                .args(args)
                .output(),
            None => Command::new(&exe).args(args).output(),
        }
        .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    fn start() -> anyhow::Result<PgServer> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return Ok(PgServer {
                admin_url: url,
                data_dir: None,
                run_as: None,
                bin: PathBuf::new(),
            });
        }
        let bin = find_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("gateway-pg-").tempdir()?;
        let run_as = if is_root() {
            Some(std::env::var("PG_TEST_USER").unwrap_or_else(|_| "postgres".into()))
        } else {
            None
        };
        if let Some(user) = &run_as {
            chown_to(dir.path(), user).with_context(|| {
                format!("running as root, the cluster must belong to user `{user}` (create it with `useradd {user}` or set PG_TEST_USER)")
            })?;
        }
        let data = dir.path().join("data");
        let port = crate::ports::free_port()?;
        let server = PgServer {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            data_dir: Some(data.clone()),
            run_as,
            bin,
        };
        let data_s = data.to_string_lossy().into_owned();
        server.run(
            "initdb",
            &[
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        // `TESTKIT_PG_OPTIONS` adds server options (e.g. to load pg_stat_statements).
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 {}",
            dir.path().display(),
            std::env::var("TESTKIT_PG_OPTIONS").unwrap_or_default()
        );
        let log = dir.path().join("server.log").to_string_lossy().into_owned();
        server.run(
            "pg_ctl",
            &[
                "-D", &data_s, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
            ],
        )?;
        // A static is never dropped: a watchdog stops the cluster and removes its files
        // when this test process ends, however it ends.
        let dir = dir.keep();
        let pg_ctl = server.bin.join("pg_ctl");
        let stop = match &server.run_as {
            Some(u) => format!(
                "runuser -u {u} -- {} -D {data_s} -m immediate stop",
                pg_ctl.display()
            ),
            None => format!("{} -D {data_s} -m immediate stop", pg_ctl.display()),
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = dir.display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the cluster watchdog")?;
        Ok(server)
    }

    /// The postmaster's process id (its backends are its children); `None` for a server
    /// named by `DATABASE_URL`.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir.as_ref()?.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Creates an empty database and returns its URL.
    pub async fn fresh_database(&self) -> anyhow::Result<String> {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) = tokio_postgres::connect(&self.admin_url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {}", self.admin_url))?;
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        drop(client);
        let _ = task.await;
        let mut cfg: tokio_postgres::Config = self.admin_url.parse()?;
        cfg.dbname(&name);
        let base = self
            .admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&self.admin_url);
        Ok(format!("{base}/{name}"))
    }

    /// A pool of `max_size` connections to a new database holding the projection's
    /// schema (every migration applied).
    pub async fn migrated_pool(&self, max_size: usize) -> anyhow::Result<sinks::Pool> {
        let pool = sinks::connect(&self.fresh_database().await?, max_size)?;
        sinks::migrate(&pool)
            .await
            .context("applying the migrations")?;
        Ok(pool)
    }

    /// Stops and starts the server (tests of outages). Only for the throwaway cluster.
    pub fn restart(&self) -> anyhow::Result<()> {
        let data = self
            .data_dir
            .as_ref()
            .context("cannot restart an external DATABASE_URL server")?;
        let d = data.to_string_lossy().into_owned();
        // With its output in the log file: the server must not hold our pipes open.
        let log = data
            .parent()
            .unwrap_or(data)
            .join("server.log")
            .to_string_lossy()
            .into_owned();
        self.run(
            "pg_ctl",
            &[
                "-D", &d, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart",
            ],
        )?;
        Ok(())
    }
}
