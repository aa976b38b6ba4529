//! PostgreSQL nodes: the driver interface (`driver.rs`); its local implementation
//! (`local.rs`, blocking, each node in a resource container of its own: `cgroup.rs`) and the
//! async face the control plane uses for it (`this_host.rs`); the configuration the control
//! plane writes into a node (`config.rs`); where new nodes go (`placement.rs`) and their ports
//! (`ports.rs`); SQL sessions on a node, always bounded in time (`sql.rs`), and those kept open
//! for repeated reads (`kept.rs`); and `Nodes`
//! (`context.rs`), what workflows reach nodes with.

pub mod cgroup;
pub mod config;
pub mod context;
pub mod driver;
pub mod engines;
pub mod kept;
pub mod local;
pub mod placement;
pub mod ports;
pub mod roles;
pub mod sql;
pub mod this_host;

pub use context::{Nodes, Tunnels};
pub use driver::{
    DiskUsage, DriverError, NodeConfig, NodeDriver, NodeResources, NodeSpec, Upstream,
};
pub use placement::Hosts;

/// What can go wrong with a node: a program of the driver, a SQL session, its configuration.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Sql(#[from] sql::SqlError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("node work was interrupted: {0}")]
    Interrupted(#[from] tokio::task::JoinError),
}
