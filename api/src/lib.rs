//! Types that cross a process boundary between pgwarden components, and nothing else.
//!
//! - [`RoutingTable`]: what the control plane `PUT`s to each proxy's `/v1/routes` (and what a
//!   proxy's `routes_file` holds); [`RoutingDelta`]: what it `PATCH`es there, the databases
//!   that changed since an epoch the proxy holds.
//! - [`ProxyHealth`]: what a proxy's `GET /health` answers.
//! - [`ApiError`]: the JSON error body every pgwarden HTTP API answers with.
//! - `sealed`: the routing table as etcd holds it, sealed with the proxies' admin token.
//! - `control`: bodies of the control API (plans, databases, users, operations), shared by
//!   `pgwarden serve` and the CLI.
#![forbid(unsafe_code)]

pub mod control;
pub mod sealed;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The routing table of a proxy: for each database name, where its primary is.
///
/// Tables are ordered by `epoch`; a proxy accepts only a table with a greater epoch than the one
/// it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingTable {
    pub epoch: u64,
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseRoute>,
    /// The CA (PEM) that signs the nodes' certificates. When present, the proxy reaches every
    /// node over TLS and verifies its certificate against it (`verify-full`: the address it
    /// connects to must be in the certificate); when absent, in plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ca: Option<String>,
}

/// A change to a routing table (`PATCH /v1/routes`): the databases that changed since
/// `base_epoch`, whole, and those removed. A proxy that does not hold `base_epoch` refuses it
/// (`409`, `base_epoch_mismatch`) and is sent the whole table instead.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingDelta {
    pub base_epoch: u64,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, DatabaseRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl RoutingDelta {
    /// What turns `old` into `new`; `None` when more than databases changed (the nodes' CA).
    pub fn between(old: &RoutingTable, new: &RoutingTable) -> Option<Self> {
        if old.node_ca != new.node_ca {
            return None;
        }
        let set = new
            .databases
            .iter()
            .filter(|(name, route)| old.databases.get(*name) != Some(route))
            .map(|(name, route)| (name.clone(), route.clone()))
            .collect();
        let remove = old
            .databases
            .keys()
            .filter(|name| !new.databases.contains_key(*name))
            .cloned()
            .collect();
        Some(Self { base_epoch: old.epoch, epoch: new.epoch, set, remove })
    }
}

/// Where one database lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseRoute {
    /// Refuse clients that did not negotiate TLS.
    #[serde(default)]
    pub force_tls: bool,
    /// `host:port` of the current primary.
    pub primary: String,
    /// `host:port` of the streaming replicas.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// New sessions wait (instead of being refused) until a table without `hold` arrives: set
    /// during a planned switchover. Established sessions are not affected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    /// The database's id, which a TLS client may name as `<id>.<domain>` (SNI) instead of
    /// naming the database in its startup packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The users that may log in, with their SCRAM verifiers. When present, the proxy
    /// authenticates clients itself (a user not listed is refused); when absent, the node does
    /// (the exchange is relayed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Verifiers>,
    /// Transaction pooling: server connections the proxy may open to the primary for the
    /// pooled clients of this database (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u32>,
    /// Clients of this database the proxy serves at once (both addresses); beyond it a new one
    /// is refused (`53300`). Absent: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_connections: Option<u32>,
    /// New connections per second the proxy takes for this database (a second's worth at
    /// once); beyond it a new one is refused (`53300`). Absent: not limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_second: Option<u32>,
}

/// SCRAM verifiers by user name, as `pg_authid.rolpassword` holds them
/// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`). Not passwords, but what an
/// offline guess of one starts from: `Debug` names the users only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Verifiers(pub BTreeMap<String, String>);

impl Verifiers {
    /// The same users with every verifier replaced, for showing a table.
    pub fn hidden(&self) -> Self {
        Self(self.0.keys().map(|u| (u.clone(), "(hidden)".to_owned())).collect())
    }
}

impl std::fmt::Debug for Verifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// A proxy's role in its active/standby pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyRole {
    Active,
    Standby,
}

/// Body of a proxy's `GET /health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyHealth {
    pub role: ProxyRole,
    pub epoch: u64,
}

/// `{"error": {"code", "message"}}`: the body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    pub error: ApiErrorBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiErrorBody {
    /// snake_case, stable: clients match on it.
    pub code: String,
    /// A sentence for humans.
    pub message: String,
}

impl ApiError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { error: ApiErrorBody { code: code.into(), message: message.into() } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table_matches_the_spec_example() {
        let json = r#"{"epoch": 12,
            "databases": {"my_app_3030": {"force_tls": true,
                                           "primary": "127.0.0.1:15432",
                                           "replicas": ["127.0.0.1:15433"]}}}"#;
        let table: RoutingTable = serde_json::from_str(json).unwrap();
        assert_eq!(table.epoch, 12);
        let route = &table.databases["my_app_3030"];
        assert!(route.force_tls);
        assert_eq!(route.primary, "127.0.0.1:15432");
        assert_eq!(route.replicas, ["127.0.0.1:15433"]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"epoch": 1, "databases": {"a": {"primary": "x:1", "primry": "y:2"}}}"#;
        assert!(serde_json::from_str::<RoutingTable>(json).is_err());
    }
}
