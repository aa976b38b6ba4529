//! The API view of a database: its record with the nodes' live state, each node asked with a
//! short bound so that a frozen node slows a listing by at most that bound.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::{Database, Node, NodeRole, TlsSettings};

use crate::nodes::sql::Timeouts;
use crate::nodes::NodeSpec;
use crate::platform::Platform;
use crate::state::DatabaseRecord;

/// How long the view waits for each node's version (and the primary's lags).
const LIVE_STATE: Duration = Duration::from_secs(1);

pub async fn view(platform: &Arc<Platform>, db: &DatabaseRecord) -> Database {
    let mut nodes = Vec::new();
    let mut primary_lags = None;
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
            version: String::new(),
        });
    }
    // Each node's own version; the primary's view of its standbys' lag.
    for (node, record) in nodes.iter_mut().zip(&db.nodes) {
        if node.status != "running" {
            continue;
        }
        let spec = NodeSpec::of(record);
        let live = async {
            let admin = platform
                .nodes
                .session_within(&spec, "postgres", Timeouts::within(LIVE_STATE))
                .await
                .ok()?;
            let version: String = admin.query_one("SHOW server_version", &[]).await.ok()?.get(0);
            let lags = if record.role == NodeRole::Primary {
                admin
                    .query(
                        "SELECT application_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::int8 FROM pg_stat_replication",
                        &[],
                    )
                    .await
                    .ok()
            } else {
                None
            };
            Some((version, lags))
        };
        if let Some((version, lags)) = live.await {
            // `15.18 (Debian 15.18-0+deb12u1)`: the version is the first word.
            node.version = version.split_whitespace().next().unwrap_or_default().to_owned();
            primary_lags = lags.or(primary_lags);
        }
    }
    if let Some(lags) = primary_lags {
        for node in &mut nodes {
            if let Some(row) = lags.iter().find(|r| r.get::<_, String>(0) == node.name) {
                node.lag_bytes = row.get::<_, i64>(1).max(0) as u64;
            } else if node.role == NodeRole::Replica && node.status == "running" {
                // Up, but the primary sees it nowhere: its lag is unknown, not 0.
                node.status = "not_streaming".into();
            }
        }
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
    }
}
