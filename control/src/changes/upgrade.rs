//! Minor engine upgrades (SPEC §4 `POST /v1/databases/{id}/engine-upgrade`): another build of
//! the same major, newer than the one the database runs. The data directory stays; each node
//! restarts on the new build:
//!
//! - one node: it restarts in place while the proxies hold new sessions (established ones end
//!   with `57P01`);
//! - with a standby: the standby restarts on the new build and streams again, a switchover makes
//!   it the primary (new sessions held, none refused), and the old primary rejoins on the new
//!   build (the health watcher rewinds and starts it with the binaries its record names).
//!
//! A major upgrade needs a new cluster (logical replication): `major.rs`.

use std::path::PathBuf;

use pgwarden_api::control::{DatabaseStatus, NodeRole};

use super::plan::{restart_primary_held, restart_standby, set_status, wait_synchronous_again};
use super::{update_record, ChangeError};
use crate::failure::{Failure, Reportable};
use crate::ha::switchover::switchover;
use crate::ha::ChangeGuard;
use crate::nodes::engines::{Engine, Engines};
use crate::nodes::Nodes;
use crate::operations::Progress;
use crate::routing::Routing;
use crate::state::{DatabaseRecord, NodeRecord, Records};

/// Why an upgrade is refused before anything moves.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("PostgreSQL {0} is not installed; installed: {1}")]
    Unknown(String, String),
    #[error("database {0} already runs PostgreSQL {1}")]
    Same(String, String),
    #[error("PostgreSQL {wanted} is older than the {current} database {id} runs; installed: {installed}")]
    Downgrade { id: String, wanted: String, current: String, installed: String },
    #[error("PostgreSQL {0} has no client tools of its major installed")]
    NoToolset(String),
}

/// The build `db` runs now (`None` in the record: the platform's own).
pub fn current<'e>(
    engines: &'e Engines,
    platform_bin: &std::path::Path,
    db: &DatabaseRecord,
) -> Option<&'e Engine> {
    let bin = db.engine.as_deref().unwrap_or(platform_bin);
    engines.all.iter().find(|e| e.bin == bin)
}

/// Where an upgrade leads.
#[derive(Debug)]
pub enum Target {
    /// Another build of the same major: the nodes restart on it (this module).
    Minor(Engine),
    /// A newer major: a new cluster takes over (`major.rs`).
    Major(Engine),
}

/// The build an upgrade of `db` to `version` leads to, or why it cannot be done.
pub fn check(nodes: &Nodes, db: &DatabaseRecord, version: &str) -> Result<Target, Refusal> {
    let engines = &nodes.engines;
    let installed = engines.versions();
    let wanted = engines
        .find(version)
        .ok_or_else(|| Refusal::Unknown(version.to_owned(), installed.clone()))?;
    if engines.toolset(wanted.major).is_none() {
        return Err(Refusal::NoToolset(wanted.version.clone()));
    }
    let Some(now) = current(engines, &nodes.pg_bin, db) else {
        // The build the database was created on is gone: any build of the major it had serves.
        return Ok(Target::Minor(wanted.clone()));
    };
    if wanted.bin == now.bin || wanted.version == now.version {
        return Err(Refusal::Same(db.id.clone(), now.version.clone()));
    }
    if version_key(&wanted.version) < version_key(&now.version) {
        return Err(Refusal::Downgrade {
            id: db.id.clone(),
            wanted: wanted.version.clone(),
            current: now.version.clone(),
            installed,
        });
    }
    if wanted.major == now.major {
        return Ok(Target::Minor(wanted.clone()));
    }
    Ok(Target::Major(wanted.clone()))
}

fn version_key(version: &str) -> Vec<u32> {
    version.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// Upgrades `id` to `engine`; `claim` is its planned-change claim, taken by the caller.
pub async fn upgrade(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: ChangeGuard,
    id: &str,
    engine: Engine,
    mut op: Progress,
) -> Result<(), ChangeError> {
    let old = set_status(records, id, DatabaseStatus::Updating).await?;
    let from = current(&nodes.engines, &nodes.pg_bin, &old)
        .map_or_else(|| "its build".to_owned(), |e| format!("PostgreSQL {}", e.version));
    records
        .event(
            id,
            "engine_upgrade_started",
            format!("from {from} to PostgreSQL {}", engine.version),
        )
        .await;
    let result = run(records, nodes, routing, claim, &old, &engine, &mut op).await;
    let _ = set_status(records, id, DatabaseStatus::Running).await;
    match &result {
        Ok(()) => {
            records
                .event(id, "engine_upgraded", format!("now on PostgreSQL {}", engine.version))
                .await
        }
        Err(e) => records.event(id, "engine_upgrade_failed", e.sentence()).await,
    }
    result
}

/// Records that `nodes` (all of them when empty) and new nodes of `id` run `bin`.
async fn record_engine(
    records: &Records,
    id: &str,
    bin: &Option<PathBuf>,
    nodes: &[&str],
) -> Result<DatabaseRecord, ChangeError> {
    update_record(records, id, |db| {
        db.engine = bin.clone();
        for node in db.nodes.iter_mut().filter(|n| nodes.contains(&n.name.as_str())) {
            node.engine = bin.clone();
        }
    })
    .await
}

async fn run(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: ChangeGuard,
    old: &DatabaseRecord,
    engine: &Engine,
    op: &mut Progress,
) -> Result<(), ChangeError> {
    let id = old.id.as_str();
    let what = format!("PostgreSQL {}", engine.version);
    // The platform's own build is recorded as none, as at creation.
    let bin = (engine.bin != nodes.pg_bin).then(|| engine.bin.clone());
    let primary = old.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let standbys: Vec<NodeRecord> =
        old.nodes.iter().filter(|n| n.role == NodeRole::Replica).cloned().collect();
    if standbys.is_empty() {
        let db = record_engine(records, id, &bin, &[&primary.name]).await?;
        let primary = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
        op.set(0.3).await;
        return restart_primary_held(records, nodes, routing, &claim, &db, &primary, &what).await;
    }
    // Standbys first, then the switchover makes one the primary.
    let names: Vec<&str> = standbys.iter().map(|s| s.name.as_str()).collect();
    let db = record_engine(records, id, &bin, &names).await?;
    for standby in db.replicas() {
        restart_standby(records, nodes, &claim, &db, &primary, standby, &what).await?;
    }
    op.set(0.4).await;
    let target = db.replicas().find(|s| !s.fenced).map(|s| s.name.clone());
    switchover(records, nodes, routing, &claim, id, target.as_deref()).await?;
    op.set(0.7).await;
    // The old primary is stopped and fenced now: the watcher rejoins it with the binaries its
    // record names, the new build's.
    record_engine(records, id, &bin, &[&primary.name]).await?;
    drop(claim);
    wait_synchronous_again(records, id).await
}
