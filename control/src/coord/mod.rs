//! Control planes on several hosts, coordinated through etcd (`pgwarden serve --etcd`), with
//! `pgwarden_etcd`: the connection and the leadership: one control plane at a time holds a key
//! bound to its lease and is the only one that acts; the others wait on standby and take over
//! when the lease ends.
//!
//! Keys, under a prefix (`/pgwarden` by default):
//! - `leader`: the leader's API address, bound to its lease. Its create revision is the
//!   leader's term: every write of the state is a transaction that compares it, so a control
//!   plane that lost the leadership can write nothing, not even a routing epoch.
//! - `state/<table>/<key>`, `counters/<name>`: the store (`state/etcd.rs`).
//! - `routing`: the routing table, sealed for the proxies (`pgwarden_api::sealed`), which
//!   watch it; the revision that wrote it is its epoch.
//! - `agents/<address>`: each agent's, bound to its lease (`agent/fencing.rs`).

use std::time::Duration;

/// Why a control plane that lost its leadership does nothing.
pub const NOT_LEADING: &str = "this control plane does not lead any more: it acts on no node";

pub use pgwarden_etcd::{bounded, CoordError, Etcd, Leadership, Lease, CALL_TIMEOUT};

/// `pgwarden serve --etcd`: where etcd is and how this control plane campaigns.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Members' client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// Prefix of pgwarden's keys (several platforms may share one etcd).
    pub prefix: String,
    /// TTL of the leader's lease: how long a leader that died keeps the others waiting.
    pub lease_ttl: Duration,
    /// This control plane's API address, as the standbys name the leader.
    pub advertise: String,
}
