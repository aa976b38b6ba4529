//! The API view of a database: its record with the nodes' state. One database's view asks each
//! node (on the session the platform keeps on it, with a short bound, so that a frozen node
//! slows it by at most that bound); a listing asks none, so that it answers as fast with a
//! thousand databases: versions come from the engines' table, and a standby the primary does
//! not see streaming shows only in the database's own view.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::{Database, Node, NodeRole, TlsSettings};

use crate::nodes::kept::Purpose;
use crate::nodes::sql::{Session, Timeouts};
use crate::nodes::NodeSpec;
use crate::platform::Platform;
use crate::state::DatabaseRecord;

/// How long the view waits for each node's version (and the primary's lags).
const LIVE_STATE: Duration = Duration::from_secs(1);

/// One database, with what its nodes say now.
pub async fn view(platform: &Arc<Platform>, db: &DatabaseRecord) -> Database {
    let mut database = listed(platform, db).await;
    live_state(platform, db, &mut database.nodes).await;
    database
}

/// One database of a listing: what the record and the processes say, no node asked.
pub async fn listed(platform: &Arc<Platform>, db: &DatabaseRecord) -> Database {
    let mut nodes = Vec::new();
    for node in &db.nodes {
        let (driver, spec) = (&platform.nodes.driver, NodeSpec::of(node));
        let running = driver.is_running(&spec).await;
        nodes.push(Node {
            name: node.name.clone(),
            role: node.role,
            status: if node.fenced {
                "fenced"
            } else if running {
                "running"
            } else {
                "stopped"
            }
            .into(),
            host: node.host.clone(),
            port: node.port,
            lag_bytes: 0,
            version: engine_version(platform, node.engine.as_deref()),
        });
    }
    Database {
        id: db.id.clone(),
        name: db.name.clone(),
        plan: db.plan.clone(),
        status: db.status,
        database_url: platform.routing.url(&db.name, &db.password, &db.name),
        tls: TlsSettings { force: db.force_tls },
        epoch: platform.routing.publisher.current().epoch,
        replication: match (db.nodes.len(), db.synchronous) {
            (1, _) => "none",
            (_, true) => "synchronous",
            (_, false) => "asynchronous",
        }
        .into(),
        nodes,
        created_at: db.created_at.clone(),
        limits: crate::plans::limits(&db.plan, db.limits),
    }
}

/// The version of the engine at `bin` (the default engine's when `None`), as the engines'
/// table has it.
fn engine_version(platform: &Platform, bin: Option<&std::path::Path>) -> String {
    let bin = bin.unwrap_or(&platform.nodes.pg_bin);
    let engines = &platform.nodes.engines.all;
    engines.iter().find(|e| e.bin == bin).map(|e| e.version.clone()).unwrap_or_default()
}

/// Each running node's own version; the primary's view of its standbys' lag.
async fn live_state(platform: &Platform, db: &DatabaseRecord, nodes: &mut [Node]) {
    let mut primary_lags = None;
    for (node, record) in nodes.iter_mut().zip(&db.nodes) {
        if node.status != "running" {
            continue;
        }
        let spec = NodeSpec::of(record);
        let primary = record.role == NodeRole::Primary;
        let read = async |admin: &Session| {
            let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
            let lags = if primary {
                let sql = "SELECT application_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::int8 FROM pg_stat_replication";
                Some(admin.query(sql, &[]).await?)
            } else {
                None
            };
            Ok((version, lags))
        };
        let timeouts = Timeouts::within(LIVE_STATE);
        let live =
            async { platform.nodes.read_kept(&spec, Purpose::Reads, timeouts, read).await.ok() };
        if let Some((version, lags)) = live.await {
            // `15.18 (Debian 15.18-0+deb12u1)`: the version is the first word.
            node.version = version.split_whitespace().next().unwrap_or_default().to_owned();
            primary_lags = lags.or(primary_lags);
        }
    }
    if let Some(lags) = primary_lags {
        for node in nodes.iter_mut() {
            if let Some(row) = lags.iter().find(|r| r.get::<_, String>(0) == node.name) {
                node.lag_bytes = row.get::<_, i64>(1).max(0) as u64;
            } else if node.role == NodeRole::Replica && node.status == "running" {
                // Up, but the primary sees it nowhere: its lag is unknown, not 0.
                node.status = "not_streaming".into();
            }
        }
    }
}
