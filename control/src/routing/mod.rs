//! Routing: the table every proxy routes by (`table.rs`: built from the records, with the holds
//! of planned operations), and the publisher that keeps each proxy on the newest one
//! (`publisher.rs`, over the proxies' admin API with bounded HTTP calls), and the users'
//! SCRAM verifiers that go with it (`verifiers.rs`, in memory only).

pub mod context;
pub mod publisher;
pub mod refresh;
pub mod table;
pub mod verifiers;

pub use context::{ClientAddress, Routing};
pub use publisher::{Delivery, Publisher};
pub use table::Holds;
pub use verifiers::VerifierCache;
