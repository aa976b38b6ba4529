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

/// Runs `attempt` every 10 ms until it succeeds; returns the time since `since`. Panics once
/// `limit` has passed since `since`.
pub async fn until_ok<T, E, F>(
    since: std::time::Instant,
    limit: std::time::Duration,
    mut attempt: impl FnMut() -> F,
) -> std::time::Duration
where
    F: std::future::Future<Output = Result<T, E>>,
{
    loop {
        if attempt().await.is_ok() {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "still failing after {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits until a session over `conninfo` is running `query` (as `pg_stat_activity` shows it,
/// read over another session): a cancel sent before the backend started it finds nothing to
/// cancel.
pub async fn wait_running(conninfo: &str, query: &str) {
    use tokio_postgres::NoTls;
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(connection);
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'";
    let what = format!("{query:?} running");
    crate::wait_until(&what, std::time::Duration::from_secs(10), async || {
        let row = client.query_one(sql, &[&query]).await.map_err(|e| e.to_string())?;
        let running: i64 = row.get(0);
        if running > 0 {
            Ok(())
        } else {
            Err("not running yet".to_owned())
        }
    })
    .await;
}

/// Starts `SELECT pg_sleep(30)` in a session over `conninfo` and cancels it with the session's
/// cancel key: the query must end with `57014` (long before the sleep would).
pub async fn assert_cancel_reaches_the_backend(conninfo: &str) {
    use tokio_postgres::NoTls;
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await.expect("connect");
    tokio::spawn(connection);
    let token = client.cancel_token();
    let sleeping =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await.map(drop) });
    wait_running(conninfo, "SELECT pg_sleep(30)").await;
    let cancelled = std::time::Instant::now();
    token.cancel_query(NoTls).await.expect("cancel request");
    let err = sleeping.await.expect("join").expect_err("cancelled");
    let canceled = tokio_postgres::error::SqlState::QUERY_CANCELED;
    assert_eq!(err.code(), Some(&canceled), "{err:?}");
    let waited = cancelled.elapsed();
    assert!(waited < std::time::Duration::from_secs(20), "ended by the sleep, not the cancel");
}
