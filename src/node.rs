//! A real PostgreSQL 15 server for one test.
//!
//! `initdb` runs once per machine into a template directory (reused across tests and runs);
//! each node copies it, writes its own `pg_hba.conf`, and starts `postgres` directly as a child
//! process on a free loopback port. When the tests run as root, everything PostgreSQL touches is
//! owned by, and runs as, the `postgres` OS user. Dropping the node stops it and removes its
//! directory.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::clients::{pg_bin, ClientOutput};

/// Password of every login role the harness creates.
pub const TEST_PASSWORD: &str = "pgwarden-test-password";

/// Bump when the template's contents change.
const TEMPLATE_VERSION: u32 = 1;

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub max_connections: u32,
    /// Certificate and key (PEM) for server-side TLS (`ssl = on`).
    pub tls: Option<(String, String)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self { max_connections: 300, tls: None }
    }
}

pub struct PgNode {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PgNode {
    /// Starts a node with the test roles and database:
    /// - `app` (SCRAM password, owner of database `app`), `md5_user` (MD5 password),
    ///   `trust_user` (no password), all with [`TEST_PASSWORD`] where one applies;
    /// - `postgres`, superuser, reachable over the node's Unix socket only.
    pub fn start() -> Self {
        Self::start_with(NodeOptions::default())
    }

    pub fn start_with(options: NodeOptions) -> Self {
        Self::try_start(options).unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e:#}"))
    }

    fn try_start(options: NodeOptions) -> anyhow::Result<Self> {
        let template = template_dir()?;
        let dir = tempfile::Builder::new().prefix("pgwarden-node-").tempdir()?;
        let data = dir.path().join("data");
        let status = Command::new("cp").arg("-a").arg(&template).arg(&data).status()?;
        if !status.success() {
            bail!("cannot copy template {}", template.display());
        }
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all trust_user 127.0.0.1/32 trust\n\
             host all md5_user 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )?;
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = {}\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             logging_collector = off\n",
            dir.path().display(),
            options.max_connections
        );
        if let Some((cert, key)) = &options.tls {
            fs::write(data.join("server.crt"), cert)?;
            fs::write(data.join("server.key"), key)?;
            fs::set_permissions(
                data.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )?;
            conf += "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n";
        }
        fs::write(data.join("postgresql.auto.conf"), conf)?;
        if let Some((uid, gid)) = service_user()? {
            chown_tree(dir.path(), uid, gid)?;
        }
        let port = free_port();
        let log = fs::File::create(dir.path().join("postgres.log"))?;
        if let Some((uid, gid)) = service_user()? {
            chown(dir.path().join("postgres.log"), Some(uid), Some(gid))?;
        }
        let mut node = Self { port, dir, child: None };
        node.spawn(log)?;
        Ok(node)
    }

    fn spawn(&mut self, log: fs::File) -> anyhow::Result<()> {
        let mut cmd = Command::new(pg_bin("postgres"));
        cmd.arg("-D").arg(self.dir.path().join("data")).args(["-p", &self.port.to_string()]);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        as_service_user(&mut cmd)?;
        self.child = Some(cmd.spawn().context("cannot run postgres")?);
        self.wait_ready()
    }

    /// Starts the server again (after `stop`, or once it exited), on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("log");
        self.spawn(log).unwrap_or_else(|e| panic!("cannot restart PostgreSQL: {e:#}"));
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid_file = self.dir.path().join("data/postmaster.pid");
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()).flatten() {
                bail!("postgres exited with {status}: {}", self.log());
            }
            let ready = fs::read_to_string(&pid_file)
                .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("postgres did not become ready: {}", self.log())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `host:port`, as routing tables hold it.
    pub fn address(&self) -> String {
        self.addr().to_string()
    }

    /// Runs SQL as the superuser over the Unix socket.
    pub fn superuser_sql(&self, sql: &str) -> ClientOutput {
        let mut cmd = Command::new(pg_bin("psql"));
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres"])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", sql]);
        ClientOutput::from_command(&mut cmd)
    }

    /// Sends `signal` (`-STOP`, `-CONT`...) to the postmaster.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let sent = Command::new("kill").args([signal, &pid.to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill {signal} {pid}");
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server (fast shutdown), waiting for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let every = Duration::from_millis(20);
            let exited = crate::wait::until_blocking_every(Duration::from_secs(20), every, || {
                child.try_wait().ok().flatten().ok_or_else(|| "running".to_owned())
            });
            if exited.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// A first port for a control plane's nodes, which it allocates upwards from there: a block of
/// 40 below the kernel's ephemeral range (where `free_port` and client sockets land), claimed
/// by this process for its lifetime, so that tests running at the same time (each test is a
/// process of its own) never get the same block. The search starts at a block chosen by
/// process id; a block is this process's while it holds an exclusive lock on the block's file
/// (the kernel releases it when the process ends, however it ends). Two test processes whose
/// ids were equal modulo the number of blocks once got the same block: `pgwarden up` found its
/// API port taken and exited (control_up, in a full suite run).
pub fn node_port_block() -> u16 {
    static BLOCK: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *BLOCK.get_or_init(|| {
        const BLOCKS: u32 = 550; // 10 000 to 32 000
        let dir = std::env::temp_dir().join("pgwarden-port-blocks");
        fs::create_dir_all(&dir).expect("port block directory");
        let first = std::process::id() % BLOCKS;
        for n in (0..BLOCKS).map(|i| (first + i) % BLOCKS) {
            let Ok(file) = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(n.to_string()))
            else {
                continue;
            };
            let exclusive = rustix::fs::FlockOperation::NonBlockingLockExclusive;
            if rustix::fs::flock(&file, exclusive).is_ok() {
                // Held until the process ends.
                std::mem::forget(file);
                return 10_000 + n as u16 * 40;
            }
        }
        panic!("every port block is taken by a running test")
    })
}

/// The initialized data directory every node copies, made once (atomically) per machine.
fn template_dir() -> anyhow::Result<PathBuf> {
    let user = service_user()?.map(|(uid, _)| uid).unwrap_or(0);
    let base =
        std::env::temp_dir().join(format!("pgwarden-pg15-template-v{TEMPLATE_VERSION}-u{user}"));
    let data = base.join("data");
    if data.join("PG_VERSION").exists() {
        return Ok(data);
    }
    let staging = tempfile::Builder::new().prefix("pgwarden-template-").tempdir()?;
    let staged = staging.path().join("data");
    let pwfile = staging.path().join("pw");
    fs::write(&pwfile, TEST_PASSWORD)?;
    if let Some((uid, gid)) = service_user()? {
        chown_tree(staging.path(), uid, gid)?;
    }
    let mut initdb = Command::new(pg_bin("initdb"));
    initdb
        .arg("-D")
        .arg(&staged)
        .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"])
        .args(["--data-checksums", "--encoding=UTF8", "--locale=C", "--no-sync"])
        .arg(format!("--pwfile={}", pwfile.display()));
    as_service_user(&mut initdb)?;
    let out = ClientOutput::from_command(&mut initdb);
    if !out.success {
        bail!("initdb failed: {}{}", out.stdout, out.stderr);
    }
    init_roles(&staged, staging.path())?;
    fs::create_dir_all(&base)?;
    // Another test may have won the race; its template is as good as ours.
    if fs::rename(&staged, &data).is_err() && !data.join("PG_VERSION").exists() {
        bail!("cannot install template at {}", data.display());
    }
    Ok(data)
}

/// Creates the test roles and database in a freshly initialized data directory, using
/// single-user mode so that no port is needed.
fn init_roles(data: &Path, _dir: &Path) -> anyhow::Result<()> {
    let sql = format!(
        "SET password_encryption = 'scram-sha-256';\n\
         CREATE ROLE app LOGIN PASSWORD '{p}';\n\
         CREATE ROLE trust_user LOGIN;\n\
         CREATE DATABASE app OWNER app;\n\
         SET password_encryption = 'md5';\n\
         CREATE ROLE md5_user LOGIN PASSWORD '{p}';\n\
         GRANT ALL ON DATABASE app TO md5_user, trust_user;\n",
        p = TEST_PASSWORD
    );
    let mut cmd = Command::new(pg_bin("postgres"));
    cmd.args(["--single", "-j", "-D"]).arg(data).arg("postgres");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    as_service_user(&mut cmd)?;
    let mut child = cmd.spawn()?;
    std::io::Write::write_all(
        child.stdin.as_mut().expect("stdin"),
        sql.replace(";\n", ";\n\n").as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("ERROR") {
        bail!("cannot create test roles: {stderr}");
    }
    Ok(())
}

/// `(uid, gid)` of the unprivileged user PostgreSQL runs as when we are root.
fn service_user() -> anyhow::Result<Option<(u32, u32)>> {
    let me = fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_default();
    if me != "0" {
        return Ok(None);
    }
    let name = std::env::var("PGWARDEN_NODE_USER").unwrap_or_else(|_| "postgres".into());
    let passwd = fs::read_to_string("/etc/passwd")?;
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .with_context(|| format!("running as root needs the OS user {name:?} (apt-get install postgresql creates it)"))?;
    Ok(Some((entry[2].parse()?, entry[3].parse()?)))
}

fn as_service_user(cmd: &mut Command) -> anyhow::Result<()> {
    if let Some((uid, gid)) = service_user()? {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The postmaster of the data directory `data`, if it is running (works as root, unlike
/// `pg_ctl status`).
/// Kills the postmaster of the node whose data directory is `data` (`kill -9`), as a crash
/// would.
pub fn kill_postmaster(data: &Path) {
    let pid = postmaster_pid(data).expect("the node runs");
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -9 {pid}");
}

pub fn postmaster_pid(data: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline).contains("postgres").then_some(pid)
}

/// Stops the node of data directory `data` at once (SIGQUIT: immediate shutdown), waiting up
/// to 10 s for it to go.
pub fn stop_immediately(data: &Path) {
    let Some(pid) = postmaster_pid(data) else { return };
    let _ = Command::new("kill").args(["-QUIT", &pid.to_string()]).status();
    let every = Duration::from_millis(20);
    let _ = crate::wait::until_blocking_every(Duration::from_secs(10), every, || {
        postmaster_pid(data).map_or(Ok(()), |pid| Err(format!("{pid} still there")))
    });
}

/// The `data` directories of every node under a pgwarden data dir.
pub fn node_data_dirs(pgwarden_data: &Path) -> Vec<PathBuf> {
    fs::read_dir(pgwarden_data.join("nodes"))
        .map(|d| d.flatten().map(|e| e.path().join("data")).collect())
        .unwrap_or_default()
}

/// Of `dirs` (from `node_data_dirs`), the `data` directory of node `name` (a node's directory
/// is `<name>.<attempt>`).
pub fn data_dir_of(dirs: Vec<PathBuf>, name: &str) -> PathBuf {
    let prefix = format!("{name}.");
    dirs.into_iter()
        .find(|d| {
            let dir = d.parent().and_then(|p| p.file_name());
            dir.is_some_and(|f| f.to_string_lossy().starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("no directory for node {name}"))
}
