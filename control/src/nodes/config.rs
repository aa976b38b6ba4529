//! What the control plane writes into a node: `postgresql.conf` settings from the plan, the
//! replication settings of its role, `pg_hba.conf`, its TLS certificate; and the quoting rules
//! for every value that goes into a configuration file or a libpq connection string.

use pgwarden_api::control::NodeRole;
use pgwarden_certs::Ca;

use crate::nodes::driver::NodeConfig;
use crate::plans;
use crate::state::{DatabaseRecord, NodeRecord};

/// The role standbys replicate with; never given to users.
pub const REPLICATION_ROLE: &str = "pgwarden_replicator";

/// File (in the node's directory) holding the replication password for `primary_conninfo`.
pub const REPLICATION_PASSFILE: &str = "replication.pgpass";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown plan {0}")]
    UnknownPlan(String),
    #[error("cannot issue the node's certificate: {0}")]
    Certificate(String),
}

/// A `postgresql.conf` string value: `'value'` with quotes and backslashes escaped.
pub fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// A libpq connection string from `key`/`value` pairs, every value quoted and escaped.
pub fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `.pgpass` line for `user` on any host, port and database (`:` and `\` escaped).
pub fn pgpass_line(user: &str, password: &str) -> String {
    let escape = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", escape(user), escape(password))
}

pub fn slot_name(node: &str) -> String {
    node.replace('-', "_")
}

/// The settings of `db`'s plan for `node`; `sync_standby` names the synchronous standby of a
/// primary. `extra` settings (already quoted) go last.
pub fn node_config(
    ca: &Ca,
    extra: &[(String, String)],
    db: &DatabaseRecord,
    node: &NodeRecord,
    sync_standby: Option<&str>,
) -> Result<NodeConfig, ConfigError> {
    let plan = plans::find(&db.plan).ok_or_else(|| ConfigError::UnknownPlan(db.plan.clone()))?;
    let mut settings: Vec<(String, String)> =
        plans::parameters(&plan).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    settings.extend([
        // Logical: a major upgrade replicates into a new cluster without a restart first.
        ("wal_level".into(), "logical".into()),
        ("max_wal_senders".into(), "10".into()),
        ("max_replication_slots".into(), "10".into()),
        ("hot_standby".into(), "on".into()),
        // Dumps taken on the standby are not cancelled by replay conflicts.
        ("hot_standby_feedback".into(), "on".into()),
        ("wal_keep_size".into(), "'256MB'".into()),
        // A standby whose upstream vanished retries soon, and a promotion is not delayed by a
        // wait for the next retry.
        ("wal_retrieve_retry_interval".into(), "'200ms'".into()),
        (
            "synchronous_standby_names".into(),
            quote(&sync_standby.map(|n| format!("\"{n}\"")).unwrap_or_default()),
        ),
    ]);
    settings.extend(extra.iter().cloned());
    if node.role == NodeRole::Replica {
        if let Some(primary) = db.primary() {
            let port = primary.port.to_string();
            let ca_file = node.dir.join("ca.crt").display().to_string();
            let passfile = node.dir.join(REPLICATION_PASSFILE).display().to_string();
            let conninfo = conninfo(&[
                ("host", &primary.host),
                ("port", &port),
                ("user", REPLICATION_ROLE),
                ("passfile", &passfile),
                ("sslmode", "verify-full"),
                ("sslrootcert", &ca_file),
                ("application_name", &node.name),
                ("connect_timeout", "2"),
            ]);
            settings.push(("primary_conninfo".into(), quote(&conninfo)));
            settings.push(("primary_slot_name".into(), quote(&slot_name(&node.name))));
        }
    }
    // The address the proxies and standbys connect to, and the node's name.
    let names: Vec<&str> = vec![node.host.as_str(), node.name.as_str(), "localhost"];
    let cert = ca.issue_server(&names).map_err(|e| ConfigError::Certificate(e.to_string()))?;
    Ok(NodeConfig {
        settings,
        hba: hba(),
        tls: (cert.cert_pem, cert.key_pem, ca.cert_pem().to_owned()),
        replication_password: db.replication_password.clone(),
        memory_limit: plan.memory_mib * 1024 * 1024,
    })
}

/// Clients (through the proxies) over TLS only, with SCRAM; replication only over TLS and only
/// for the replication role; the superuser only over the node's private Unix socket. A
/// plaintext TCP login matches no line and is refused.
fn hba() -> String {
    format!(
        "# Managed by pgwarden.\n\
         local   all          postgres                 trust\n\
         local   replication  postgres                 trust\n\
         hostssl replication  {REPLICATION_ROLE}  all   scram-sha-256\n\
         host    replication  all                  all   reject\n\
         host    all          {REPLICATION_ROLE}  all   reject\n\
         host    all          postgres             all   reject\n\
         hostssl all          all                  all   scram-sha-256\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_and_escaped() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(quote(r"a\b"), r"'a\\b'");
        assert_eq!(
            conninfo(&[("host", "/tmp/my dir/o'k"), ("port", "5432")]),
            r"host='/tmp/my dir/o\'k' port='5432'"
        );
        let parsed: tokio_postgres::Config =
            conninfo(&[("host", "/tmp/my dir/o'k\\x"), ("dbname", "d b")]).parse().unwrap();
        assert_eq!(parsed.get_dbname(), Some("d b"));
        assert_eq!(
            parsed.get_hosts(),
            [tokio_postgres::config::Host::Unix("/tmp/my dir/o'k\\x".into())]
        );
        assert_eq!(pgpass_line("u:1", r"p\w"), "*:*:*:u\\:1:p\\\\w\n");
    }
}
