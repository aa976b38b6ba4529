//! What the control plane keeps: database, node and user records (`records.rs`) in an embedded,
//! crash-safe redb store (`store.rs`), with events and operations.

pub mod records;
pub mod store;

pub use records::{DatabaseRecord, MajorUpgrade, NodeRecord, RetiredCluster, UserRecord};
pub use store::{Store, StoreError};
