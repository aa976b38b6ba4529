//! Node agents. `pgwarden agent` runs on each database host and owns the nodes there: it runs
//! the same [`LocalDriver`](crate::nodes::local::LocalDriver) the single-host platform uses, and
//! serves it to the control plane over mutual TLS (certificates of the platform CA). The control
//! plane reaches it through [`client::RemoteDriver`], which implements the same
//! [`NodeDriver`](crate::nodes::driver::NodeDriver) interface, and opens its superuser sessions
//! through the agent ([`client::tunnel`]): the superuser never logs in over the network.
//!
//! API (JSON, mutual TLS only):
//! - `GET /v1/info`: [`Info`];
//! - `POST /v1/nodes/{op}` with a [`Call`]: one driver operation on a node under the agent's
//!   root; 200 with the operation's answer, or an error `{"error": {"code", "message"}}`;
//! - `GET /v1/sql/{dir}/{port}` with `Upgrade: pgwarden-sql`: the connection becomes a byte
//!   stream to the node's Unix socket;
//! - `POST /v1/dump` (node, database, tools): a `pg_dump` archive, with its SHA-256;
//! - `POST /v1/staging/{dir}/{base|wal}`: a tar stream unpacked in the staging area of the node
//!   whose directory is `{dir}`, which `init-from-backup` then restores from.
//!
//! With etcd, an agent holds a lease there and fences its primaries when cut off
//! (`fencing.rs`).

pub mod client;
pub mod fencing;
pub mod forward;
pub mod server;
pub mod tls;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::nodes::driver::{NodeConfig, NodeSpec, Upstream};

/// The protocol name of the SQL tunnel's upgrade.
pub const SQL_PROTOCOL: &str = "pgwarden-sql";

/// What an agent says of itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Info {
    /// Where its nodes' directories go: `<root>/nodes/<node>`.
    pub root: PathBuf,
    pub version: String,
}

/// One driver operation, with what it needs.
#[derive(Serialize, Deserialize)]
pub struct Call {
    pub node: NodeSpec,
    #[serde(default)]
    pub config: Option<NodeConfig>,
    #[serde(default)]
    pub upstream: Option<Upstream>,
    /// The calling control plane's leadership term (the revision that created its leader key in
    /// etcd); none for a control plane alone. An agent refuses changes from a term older than
    /// one it has already served: a leader that was frozen and resumed acts on no node.
    #[serde(default)]
    pub term: Option<i64>,
}

/// The driver operations an agent serves, by their path segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Init,
    InitStandby,
    Configure,
    Start,
    Stop,
    Reload,
    IsRunning,
    Fence,
    Promote,
    MakeStandby,
    /// pg_rewind from the primary named by the call's `upstream`.
    RewindFrom,
    /// From the base backup and WAL uploaded to the node's staging area.
    InitFromBackup,
    LogTail,
    Destroy,
    Resources,
    /// What the node's files take on disk.
    Disk,
}

impl Op {
    pub const ALL: [Op; 16] = [
        Op::Init,
        Op::InitStandby,
        Op::Configure,
        Op::Start,
        Op::Stop,
        Op::Reload,
        Op::IsRunning,
        Op::Fence,
        Op::Promote,
        Op::MakeStandby,
        Op::RewindFrom,
        Op::InitFromBackup,
        Op::LogTail,
        Op::Destroy,
        Op::Resources,
        Op::Disk,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Init => "init",
            Op::InitStandby => "init-standby",
            Op::Configure => "configure",
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Reload => "reload",
            Op::IsRunning => "is-running",
            Op::Fence => "fence",
            Op::Promote => "promote",
            Op::MakeStandby => "make-standby",
            Op::RewindFrom => "rewind-from",
            Op::InitFromBackup => "init-from-backup",
            Op::LogTail => "log-tail",
            Op::Destroy => "destroy",
            Op::Resources => "resources",
            Op::Disk => "disk",
        }
    }

    /// Whether it changes the node: such operations run one at a time per node, and only for
    /// the newest leader. Fencing is not one: it must never wait (it kills, whatever runs).
    pub fn changes_node(self) -> bool {
        !matches!(self, Op::IsRunning | Op::Fence | Op::LogTail | Op::Resources | Op::Disk)
    }

    pub fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// How long the control plane waits for the answer: copies of a whole cluster take long,
    /// the rest is bounded by the driver's own waits.
    pub fn bound(self) -> std::time::Duration {
        use std::time::Duration;
        match self {
            // A rewind copies what changed since the timelines forked: up to the whole cluster.
            Op::InitStandby | Op::InitFromBackup | Op::RewindFrom => Duration::from_secs(6 * 3600),
            Op::Init | Op::Start | Op::Stop | Op::Promote | Op::Destroy => Duration::from_secs(300),
            // A failover waits on it: kill -9 takes no time, an agent out of reach is waited
            // for through its lease instead.
            Op::Fence => Duration::from_secs(5),
            _ => Duration::from_secs(30),
        }
    }
}
