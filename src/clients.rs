//! The real PostgreSQL client programs.

use std::path::PathBuf;
use std::process::Command;

/// Path of a PostgreSQL 15 program: the Debian layout first, then `PATH`.
pub fn pg_bin(name: &str) -> PathBuf {
    let debian = PathBuf::from("/usr/lib/postgresql/15/bin").join(name);
    if debian.exists() {
        debian
    } else {
        PathBuf::from(name)
    }
}

/// What a client program printed.
#[derive(Debug)]
pub struct ClientOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ClientOutput {
    pub fn from_command(cmd: &mut Command) -> Self {
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Self {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `psql` non-interactively: `conninfo` is a libpq connection string, `password` goes in
/// `PGPASSWORD`. Output is unaligned, tuples only.
pub fn psql(conninfo: &str, password: Option<&str>, sql: &str) -> ClientOutput {
    let mut cmd = Command::new(pg_bin("psql"));
    cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-c", sql]);
    cmd.env_remove("PGPASSWORD").env("PGCONNECT_TIMEOUT", "10");
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    ClientOutput::from_command(&mut cmd)
}
