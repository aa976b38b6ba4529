//! The routing table of SPEC §6, built from the database records.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use pgwarden_api::control::DatabaseStatus;
use pgwarden_api::{DatabaseRoute, RoutingTable};

use super::VerifierCache;
use crate::plans;
use crate::state::DatabaseRecord;

/// Databases whose new sessions the proxies hold (a planned primary change is in progress).
#[derive(Default)]
pub struct Holds {
    held: Mutex<HashSet<String>>,
}

impl Holds {
    pub fn hold(&self, id: &str) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned());
    }

    pub fn release(&self, id: &str) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    pub fn is_held(&self, id: &str) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }
}

/// The table for `databases` at `epoch`: running (or updating) databases with a primary, with
/// their users' verifiers once they have been read, and the CA the proxies verify nodes with.
pub fn build(
    databases: &[DatabaseRecord],
    holds: &Holds,
    verifiers: &VerifierCache,
    node_ca: &str,
    epoch: u64,
) -> RoutingTable {
    let mut routes = BTreeMap::new();
    for db in databases {
        if !matches!(db.status, DatabaseStatus::Running | DatabaseStatus::Updating) {
            continue;
        }
        let Some(primary) = db.primary() else { continue };
        let limits = plans::limits(&db.plan, db.limits);
        let route = DatabaseRoute {
            force_tls: db.force_tls,
            primary: format!("{}:{}", primary.host, primary.port),
            replicas: db.replicas().map(|n| format!("{}:{}", n.host, n.port)).collect(),
            hold: holds.is_held(&db.id),
            id: Some(db.id.clone()),
            users: verifiers.get(&db.id),
            pool_size: Some(plans::pool_size(&db.plan)),
            client_connections: Some(limits.client_connections),
            connections_per_second: Some(limits.connections_per_second),
        };
        routes.insert(db.name.clone(), route);
    }
    RoutingTable { epoch, databases: routes, node_ca: Some(node_ca.to_owned()) }
}
