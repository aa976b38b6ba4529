//! What the control plane keeps: database, node and user records (`records.rs`), with events
//! and operations (`store.rs`), in an embedded, crash-safe redb file (`kv.rs`) or, for control
//! planes on several hosts, in etcd (`etcd.rs`).

pub mod access;
pub mod etcd;
pub mod kv;
pub mod records;
pub mod store;

pub use access::Records;
pub use records::{DatabaseRecord, MajorUpgrade, NodeRecord, RetiredCluster, UserRecord};
pub use store::{Store, StoreError};
