//! The local node driver: PostgreSQL 15 processes on this host, managed with `pg_ctl` so that
//! they keep running if the control plane dies, and adopted when it comes back. When pgwarden
//! runs as root, every node file is owned by, and every node process runs as, an unprivileged
//! OS user.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{chown, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context};

use crate::nodes::cgroup::Cgroups;
use crate::nodes::config::{conninfo, pgpass_line, quote, REPLICATION_PASSFILE};
use crate::nodes::driver::{
    client_sentence, DiskUsage, DriverError, NodeConfig, NodeResources, NodeSpec, Upstream,
};

pub struct LocalDriver {
    bin: PathBuf,
    /// `(uid, gid)` nodes run as, when we are root.
    run_as: Option<(u32, u32)>,
    /// Where each node's resource container goes.
    cgroups: Cgroups,
    /// Nodes whose container could not be made or entered, and why.
    uncontained: Mutex<HashMap<String, String>>,
}

/// The node's file holding its container's memory limit in bytes (from its configuration).
const MEMORY_LIMIT_FILE: &str = "memory.limit";

/// In a node's directory from the start of a pg_rewind to the node's next start.
const REWIND_MARKER: &str = "rewound";

/// Why a node runs without its resource container (shown with its stats).
#[derive(Debug, thiserror::Error)]
enum Uncontained {
    /// This host has no usable cgroups: the sentence says why.
    #[error("{0}")]
    NoContainers(String),
    #[error("the node has no memory limit in its configuration")]
    NoLimit,
    #[error("cannot make the node's container: {0}")]
    Create(std::io::Error),
    #[error("the node has no postmaster.pid")]
    NoPostmaster,
    #[error("cannot move process {pid} into the node's container: {source}")]
    Enter { pid: u32, source: std::io::Error },
}

impl LocalDriver {
    /// `bin`: directory of the PostgreSQL 15 programs; `user`: OS user for nodes when root.
    pub fn new(bin: PathBuf, user: &str) -> Result<Self, DriverError> {
        let run_as = if is_root() { Some(lookup_user(user)?) } else { None };
        if !bin.join("postgres").exists() {
            return Err(DriverError::NotInstalled(bin));
        }
        let cgroups = Cgroups::detect();
        match cgroups.unavailable() {
            None => tracing::info!(cgroup = cgroups.version(), "nodes run in resource containers"),
            Some(why) => tracing::warn!(reason = why, "nodes run without a memory limit"),
        }
        Ok(Self { bin, run_as, cgroups, uncontained: Mutex::default() })
    }

    /// Whether the node's server answers (`pg_ctl status` says a server runs; `pg_isready`
    /// says it accepts connections, unlike one that is shutting down).
    fn accepts_connections(&self, node: &NodeSpec) -> bool {
        let mut cmd = self.command(node, "pg_isready");
        cmd.args(["-q", "-t", "2", "-h"])
            .arg(&node.dir)
            .args(["-p", &node.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    }

    /// The postmaster's process id, from its pid file.
    fn postmaster_pid(node: &NodeSpec) -> Option<u32> {
        fs::read_to_string(Self::data(node).join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
    }

    /// Makes the node's container anew with the limit its configuration names, before it
    /// starts.
    fn prepare_container(&self, node: &NodeSpec) -> Result<(), Uncontained> {
        if let Some(why) = self.cgroups.unavailable() {
            return Err(Uncontained::NoContainers(why.to_owned()));
        }
        let limit = fs::read_to_string(node.dir.join(MEMORY_LIMIT_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or(Uncontained::NoLimit)?;
        self.cgroups.create(&node.name, limit).map_err(Uncontained::Create)
    }

    /// Moves the started postmaster, then the children it has already forked, into the node's
    /// container (the children it forks later are born there).
    fn enter_container(&self, node: &NodeSpec) -> Result<(), Uncontained> {
        let pid = Self::postmaster_pid(node).ok_or(Uncontained::NoPostmaster)?;
        let enter = |pid| {
            self.cgroups.enter(&node.name, pid).map_err(|source| Uncontained::Enter { pid, source })
        };
        enter(pid)?;
        for child in children_of(pid) {
            // A child that ended meanwhile is no matter.
            if let Err(e) = enter(child) {
                if fs::metadata(format!("/proc/{child}")).is_ok() {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn contain(&self, node: &NodeSpec, placed: Result<(), Uncontained>) {
        let mut uncontained = self.uncontained.lock().unwrap_or_else(|e| e.into_inner());
        match placed {
            Ok(()) => {
                uncontained.remove(&node.name);
            }
            Err(why) => {
                if self.cgroups.unavailable().is_none() {
                    tracing::warn!(node = %node.name, reason = %why, "node runs without its container");
                }
                uncontained.insert(node.name.clone(), why.to_string());
            }
        }
    }

    /// The Debian location of PostgreSQL 15.
    pub fn default_bin() -> PathBuf {
        PathBuf::from("/usr/lib/postgresql/15/bin")
    }

    fn data(node: &NodeSpec) -> PathBuf {
        node.dir.join("data")
    }

    /// `program` for `node`: the server programs of its own build; client tools of its build
    /// too when it has them (a full toolset), else the driver's (a server-only build of the
    /// driver's major).
    fn command(&self, node: &NodeSpec, program: &str) -> Command {
        let server = matches!(program, "initdb" | "pg_ctl" | "postgres");
        let bin = match &node.bin {
            // A full build has its own client tools: those of another major refuse its nodes.
            Some(bin) if server || bin.join(program).exists() => bin,
            _ => &self.bin,
        };
        let mut cmd = Command::new(bin.join(program));
        cmd.stdin(Stdio::null()).env_clear().env("PATH", "/usr/bin:/bin").env("LC_ALL", "C.UTF-8");
        // Programs that connect to a node (pg_basebackup, pg_rewind) give up on one that does
        // not answer.
        cmd.env("PGCONNECT_TIMEOUT", "10");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", "/tmp");
        }
        cmd
    }

    /// Runs pg_rewind `cmd` on `node`, once between two starts. A rewound node must start as a
    /// standby of the rewind's source: it then replays from the rewind's backup label. A second
    /// pg_rewind before that start (a control plane that lost its leadership between the rewind
    /// and the start, and the next one rejoining the node again) would first run crash
    /// recovery over the copy, ending its history where the copy ended: the node would start
    /// on a fork of the primary's timeline and never stream. An interrupted pg_rewind leaves
    /// the data directory half copied. Either way the node needs a fresh copy, which the
    /// error tells the rejoin to make.
    fn run_rewind(&self, node: &NodeSpec, cmd: &mut Command) -> Result<(), DriverError> {
        let marker = node.dir.join(REWIND_MARKER);
        if marker.exists() || Self::data(node).join("backup_label").exists() {
            return Err(DriverError::RewoundNotStarted(node.name.clone()));
        }
        self.write(&marker, "", 0o600)?;
        self.run("pg_rewind", cmd).map(drop)
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<String, DriverError> {
        let out = cmd.output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            tracing::error!(command = what, output = %last_lines(&text, 10), "node program failed");
            Err(DriverError::Command { what: what.into(), detail: client_sentence(&text) })
        }
    }

    /// Writes a file the node will read, owned by the node user. It is created with `mode`
    /// (whatever the umask) and never readable by others before that.
    fn write(&self, path: &Path, contents: &str, mode: u32) -> Result<(), DriverError> {
        use std::io::Write;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o600)
            .open(path)?;
        file.set_permissions(fs::Permissions::from_mode(mode & 0o600))?;
        file.write_all(contents.as_bytes())?;
        drop(file);
        self.own(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    fn own(&self, path: &Path) -> Result<(), DriverError> {
        if let Some((uid, gid)) = self.run_as {
            chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    fn make_dir(&self, node: &NodeSpec) -> Result<(), DriverError> {
        fs::create_dir_all(&node.dir)?;
        fs::set_permissions(&node.dir, fs::Permissions::from_mode(0o700))?;
        self.own(&node.dir)
    }

    fn write_files(&self, node: &NodeSpec, config: &NodeConfig) -> Result<(), DriverError> {
        let data = Self::data(node);
        let (cert, key, ca) = &config.tls;
        self.write(&node.dir.join("server.crt"), cert, 0o644)?;
        self.write(&node.dir.join("server.key"), key, 0o600)?;
        self.write(&node.dir.join("ca.crt"), ca, 0o644)?;
        let passfile =
            pgpass_line(crate::nodes::config::REPLICATION_ROLE, &config.replication_password);
        self.write(&node.dir.join(REPLICATION_PASSFILE), &passfile, 0o600)?;
        self.write(&data.join("pg_hba.conf"), &config.hba, 0o600)?;
        self.write(&node.dir.join(MEMORY_LIMIT_FILE), &config.memory_limit.to_string(), 0o600)?;
        let mut conf = String::from("# Managed by pgwarden: rewritten on every change.\n");
        let fixed = [
            ("listen_addresses", quote(&node.host)),
            ("port", node.port.to_string()),
            ("unix_socket_directories", quote(&node.dir.display().to_string())),
            ("ssl", "on".into()),
            ("ssl_cert_file", quote(&node.dir.join("server.crt").display().to_string())),
            ("ssl_key_file", quote(&node.dir.join("server.key").display().to_string())),
            ("ssl_ca_file", quote(&node.dir.join("ca.crt").display().to_string())),
            ("ssl_min_protocol_version", quote("TLSv1.2")),
            ("password_encryption", quote("scram-sha-256")),
            ("cluster_name", quote(&node.name)),
            ("logging_collector", "off".into()),
        ];
        for (k, v) in fixed
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .chain(config.settings.iter().cloned())
        {
            conf += &format!("{k} = {v}\n");
        }
        self.write(&data.join("pgwarden.conf"), &conf, 0o600)?;
        let main = data.join("postgresql.conf");
        let existing = fs::read_to_string(&main).unwrap_or_default();
        if !existing.contains("include 'pgwarden.conf'") {
            self.write(&main, &format!("{existing}\ninclude 'pgwarden.conf'\n"), 0o600)?;
        }
        Ok(())
    }

    /// The node's own last complaint (its log's last FATAL, PANIC or ERROR line) as a sentence;
    /// the last lines of the log go to the control plane's log.
    fn read_log_tail(node: &NodeSpec) -> String {
        let log = fs::read_to_string(node.dir.join("postgres.log")).unwrap_or_default();
        tracing::error!(node = %node.name, log = %last_lines(&log, 10), "node log");
        let complaint = log
            .lines()
            .rev()
            .find(|l| ["FATAL:", "PANIC:", "ERROR:"].iter().any(|k| l.contains(k)))
            .map(|l| {
                l.find("FATAL:").or(l.find("PANIC:")).or(l.find("ERROR:")).map_or(l, |at| &l[at..])
            });
        client_sentence(complaint.unwrap_or("the node logged no error"))
    }
}

/// The driver's calls, blocking (they run programs and touch files): the agent runs them on
/// its blocking threads, the control plane through `this_host::ThisHost`.
impl LocalDriver {
    pub fn init(&self, node: &NodeSpec, config: &NodeConfig) -> Result<(), DriverError> {
        self.make_dir(node)?;
        let mut cmd = self.command(node, "initdb");
        cmd.arg("-D").arg(Self::data(node)).args([
            "-U",
            "postgres",
            "--data-checksums",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]);
        self.run("initdb", &mut cmd)?;
        self.write_files(node, config)
    }

    pub fn init_standby(
        &self,
        node: &NodeSpec,
        config: &NodeConfig,
        upstream: &Upstream,
    ) -> Result<(), DriverError> {
        self.make_dir(node)?;
        self.write(&node.dir.join("ca.crt"), &config.tls.2, 0o644)?;
        let mut cmd = self.command(node, "pg_basebackup");
        cmd.arg("-D")
            .arg(Self::data(node))
            .args(["-h", &upstream.host, "-p", &upstream.port.to_string(), "-U", &upstream.user])
            .args(["-X", "stream", "-c", "fast", "--no-password", "-C", "-S", &upstream.slot])
            .env("PGPASSWORD", &upstream.password)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", node.dir.join("ca.crt"))
            .env("PGAPPNAME", &node.name);
        self.run("pg_basebackup", &mut cmd)?;
        self.write_files(node, config)?;
        self.write(&Self::data(node).join("standby.signal"), "", 0o600)
    }

    pub fn configure(&self, node: &NodeSpec, config: &NodeConfig) -> Result<(), DriverError> {
        self.write_files(node, config)?;
        // A higher limit holds at once; a lower one waits for the restart that brings the
        // node's memory settings down with it.
        let limit = self.cgroups.usage(&node.name).and_then(|u| u.memory.limit);
        if limit.is_some_and(|now| now < config.memory_limit) {
            if let Err(e) = self.cgroups.set_limit(&node.name, config.memory_limit) {
                tracing::warn!(node = %node.name, error = %e, "cannot raise the node's memory limit");
            }
        }
        Ok(())
    }

    pub fn start(&self, node: &NodeSpec) -> Result<(), DriverError> {
        // A postmaster still shutting down (a stop that an earlier control plane began and did
        // not see through, say) holds the node's lock files: its end is waited for first.
        if let Some(pid) = Self::postmaster_pid(node) {
            // If it is still there after the wait, pg_ctl says what holds the node.
            let limit = std::time::Duration::from_secs(60);
            crate::wait::until_blocking(limit, crate::wait::STEADY, || {
                !is_postgres(pid) || self.accepts_connections(node)
            });
        }
        let prepared = self.prepare_container(node);
        let log = node.dir.join("postgres.log");
        let mut cmd = self.command(node, "pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(Self::data(node))
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60"]);
        self.run("pg_ctl start", &mut cmd).map_err(|e| DriverError::NotStarted {
            node: node.name.clone(),
            log: match &e {
                DriverError::Command { .. } => Self::read_log_tail(node),
                other => other.to_string(),
            },
        })?;
        // Started: a rewind before it is replayed from here on (`run_rewind`).
        let _ = fs::remove_file(node.dir.join(REWIND_MARKER));
        self.contain(node, prepared.and_then(|()| self.enter_container(node)));
        Ok(())
    }

    pub fn stop(&self, node: &NodeSpec) -> Result<(), DriverError> {
        if !self.is_running(node) {
            return Ok(());
        }
        let mut cmd = self.command(node, "pg_ctl");
        cmd.arg("stop").arg("-D").arg(Self::data(node)).args(["-m", "fast", "-w", "-t", "60"]);
        self.run("pg_ctl stop", &mut cmd).map(drop)
    }

    pub fn reload(&self, node: &NodeSpec) -> Result<(), DriverError> {
        let mut cmd = self.command(node, "pg_ctl");
        cmd.arg("reload").arg("-D").arg(Self::data(node));
        self.run("pg_ctl reload", &mut cmd).map(drop)
    }

    /// Whether the node's postmaster runs: the process its `postmaster.pid` names is alive, a
    /// PostgreSQL server, and works in the node's data directory (what `pg_ctl status` checks,
    /// without a process of its own: listings and checks ask this of every node).
    pub fn is_running(&self, node: &NodeSpec) -> bool {
        let data = Self::data(node);
        Self::postmaster_pid(node).is_some_and(|pid| {
            let cwd = fs::read_link(format!("/proc/{pid}/cwd"));
            is_postgres(pid) && cwd.is_ok_and(|cwd| same_file(&cwd, &data))
        })
    }

    pub fn fence(&self, node: &NodeSpec) -> Result<(), DriverError> {
        let Some(pid) = Self::postmaster_pid(node) else {
            return Ok(());
        };
        // SIGKILL works on a stopped (SIGSTOP) process too. Children first, so none outlives
        // the postmaster and keeps serving a session.
        for child in children_of(pid) {
            kill(child, "-KILL");
        }
        kill(pid, "-KILL");
        Ok(())
    }

    pub fn promote(&self, node: &NodeSpec) -> Result<(), DriverError> {
        // Promoted already (a failover that promoted it was cut short before recording it).
        if !Self::data(node).join("standby.signal").exists() && self.is_running(node) {
            return Ok(());
        }
        let mut cmd = self.command(node, "pg_ctl");
        cmd.arg("promote").arg("-D").arg(Self::data(node)).args(["-w", "-t", "60"]);
        self.run("pg_ctl promote", &mut cmd).map(drop)
    }

    pub fn rewind(&self, node: &NodeSpec, source: &NodeSpec) -> Result<(), DriverError> {
        let mut cmd = self.command(node, "pg_rewind");
        cmd.arg("--target-pgdata")
            .arg(Self::data(node))
            .arg(format!("--source-server={}", self.admin_conninfo(source, "postgres")));
        self.run_rewind(node, &mut cmd)
    }

    pub fn rewind_from(&self, node: &NodeSpec, source: &Upstream) -> Result<(), DriverError> {
        let port = source.port.to_string();
        let server = conninfo(&[
            ("host", &source.host),
            ("port", &port),
            ("user", &source.user),
            ("dbname", "postgres"),
            ("connect_timeout", "5"),
        ]);
        let mut cmd = self.command(node, "pg_rewind");
        cmd.arg("--target-pgdata")
            .arg(Self::data(node))
            .arg(format!("--source-server={server}"))
            .env("PGPASSWORD", &source.password)
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", node.dir.join("ca.crt"))
            .env("PGAPPNAME", &node.name);
        self.run_rewind(node, &mut cmd)
    }

    pub fn make_standby(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.write(&Self::data(node).join("standby.signal"), "", 0o600)
    }

    pub fn init_from_backup(
        &self,
        node: &NodeSpec,
        config: &NodeConfig,
        base: &Path,
        wal: &Path,
    ) -> Result<(), DriverError> {
        self.make_dir(node)?;
        let data = Self::data(node);
        let status = Command::new("cp").arg("-a").arg(base).arg(&data).status()?;
        if !status.success() {
            return Err(DriverError::Command {
                what: format!("copying base backup {}", base.display()),
                detail: format!("cp {status}"),
            });
        }
        for leftover in ["standby.signal", "recovery.signal", "postmaster.pid", "backup_manifest"] {
            let _ = fs::remove_file(data.join(leftover));
        }
        let restore = node.dir.join("wal-restore");
        crate::files::private_dir(&restore)?;
        for entry in fs::read_dir(wal)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let target = name.strip_suffix(".partial").unwrap_or(name);
            if name.ends_with(".partial") && wal.join(target).exists() {
                continue;
            }
            fs::copy(&path, restore.join(target))?;
        }
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700))?;
        if let Some((uid, gid)) = self.run_as {
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{uid}:{gid}"))
                .arg(&node.dir)
                .status()?;
            if !status.success() {
                return Err(DriverError::Command {
                    what: "giving the restored node to its OS user".into(),
                    detail: format!("chown {status}"),
                });
            }
        }
        let mut config = config.clone();
        // A shell command (the path in shell quotes) in which `%` introduces a placeholder.
        let shell_path = restore.display().to_string().replace('\'', "'\\''").replace('%', "%%");
        let restore_command = format!("cp '{shell_path}/%f' '%p'");
        config.settings.push(("restore_command".into(), quote(&restore_command)));
        self.write_files(node, &config)?;
        self.write(&data.join("recovery.signal"), "", 0o600)
    }

    pub fn log_tail(&self, node: &NodeSpec) -> String {
        Self::read_log_tail(node)
    }

    pub fn destroy(&self, node: &NodeSpec) -> Result<(), DriverError> {
        if self.is_running(node) {
            let mut cmd = self.command(node, "pg_ctl");
            cmd.arg("stop").arg("-D").arg(Self::data(node)).args(["-m", "immediate", "-w"]);
            self.run("pg_ctl stop", &mut cmd)?;
        }
        self.cgroups.remove(&node.name);
        self.uncontained.lock().unwrap_or_else(|e| e.into_inner()).remove(&node.name);
        match fs::remove_dir_all(&node.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub fn resources(&self, node: &NodeSpec) -> NodeResources {
        let usage = self.cgroups.usage(&node.name);
        let uncontained = self.uncontained.lock().unwrap_or_else(|e| e.into_inner());
        let unlimited = match (uncontained.get(&node.name), &usage) {
            (Some(why), _) => Some(why.clone()),
            (None, Some(u)) if u.memory.limit.is_none() => {
                Some("the node's container has no memory limit".to_owned())
            }
            (None, Some(_)) => None,
            (None, None) => Some(self.cgroups.unavailable().map_or_else(
                || "the node has no container (it was started before pgwarden made one; it gets one when it restarts)".to_owned(),
                str::to_owned,
            )),
        };
        let cgroup = usage.as_ref().and(self.cgroups.version()).map(str::to_owned);
        NodeResources { usage, cgroup, unlimited }
    }

    pub fn disk(&self, node: &NodeSpec) -> DiskUsage {
        disk_usage(&node.dir)
    }

    pub fn dump(
        &self,
        node: &NodeSpec,
        database: &str,
        tools: &Path,
        file: &Path,
    ) -> Result<(), DriverError> {
        let conninfo = self.admin_conninfo(node, database);
        self.run(
            "pg_dump",
            Command::new(tools.join("pg_dump"))
                .args(["--format=custom", "--no-password", "--dbname", &conninfo, "--file"])
                .arg(file),
        )
        .map(drop)
    }

    pub fn admin_conninfo(&self, node: &NodeSpec, database: &str) -> String {
        let (dir, port) = (node.dir.display().to_string(), node.port.to_string());
        conninfo(&[
            ("host", &dir),
            ("port", &port),
            ("user", "postgres"),
            ("dbname", database),
            ("connect_timeout", "3"),
        ])
    }
}

/// What the node's files take on disk: its data directory's `pg_wal` is WAL, `base` and
/// `global` are data, everything else of the node directory is other.
fn disk_usage(dir: &Path) -> DiskUsage {
    fn walk(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
        let own = meta.blocks() * 512;
        if !meta.is_dir() {
            return own;
        }
        let entries = fs::read_dir(path).into_iter().flatten().flatten();
        own + entries.map(|e| walk(&e.path())).sum::<u64>()
    }
    let data = dir.join("data");
    let wal = walk(&data.join("pg_wal"));
    // Tablespaces need a superuser: nodes have none but `base` and `global`.
    let tables: u64 = ["base", "global"].iter().map(|d| walk(&data.join(d))).sum();
    let all = walk(dir);
    DiskUsage { data: tables, wal, other: all.saturating_sub(tables + wal) }
}

/// Whether `a` and `b` name the same directory (one may go through a symbolic link).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether process `pid` is alive and a PostgreSQL server process.
fn is_postgres(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
        stat.contains("(postgres)") && !zombie
    })
}

fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill").args([signal, &pid.to_string()]).stderr(Stdio::null()).status();
}

/// Processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    stat.rsplit_once(") ")
                        .map(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
                })
                .flatten()
                .is_some_and(|ppid| ppid == pid.to_string())
        })
        .collect()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Whether this process runs as root (then nodes run as an unprivileged user).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

fn lookup_user(name: &str) -> Result<(u32, u32), DriverError> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    let fields = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .ok_or_else(|| DriverError::OsUser {
            name: name.to_owned(),
            reason: "not found: PostgreSQL nodes cannot run as root (apt-get install postgresql \
                     creates the postgres user)",
        })?;
    let parse = |s: &str| {
        let bad = || DriverError::OsUser { name: name.to_owned(), reason: "bad /etc/passwd entry" };
        s.parse().map_err(|_| bad())
    };
    Ok((parse(fields[2])?, parse(fields[3])?))
}

/// Creates `dir` and `dir/nodes`, private; when nodes run as another OS user (`user`), both
/// can be crossed (not read) by it, and so can every directory above.
pub fn prepare_nodes_dir(dir: &Path, user: &str) -> anyhow::Result<()> {
    for private in [dir.to_owned(), dir.join("nodes")] {
        crate::files::private_dir(&private)
            .with_context(|| format!("cannot create {}", private.display()))?;
    }
    if is_root() {
        // Node processes run unprivileged: they must be able to reach their directories.
        for shared in [dir.to_owned(), dir.join("nodes")] {
            fs::set_permissions(&shared, fs::Permissions::from_mode(0o711))?;
        }
        check_traversable(dir, user)?;
    }
    Ok(())
}

fn check_traversable(dir: &Path, user: &str) -> anyhow::Result<()> {
    let dir = dir.canonicalize()?;
    for ancestor in dir.ancestors().skip(1) {
        let mode = fs::metadata(ancestor)?.permissions().mode();
        if mode & 0o001 == 0 {
            bail!(
                "the node user {user:?} cannot reach {}: {} is not traversable by others (chmod o+x it, or choose a --data-dir elsewhere)",
                dir.display(),
                ancestor.display()
            );
        }
    }
    Ok(())
}
