//! Sessions the platform keeps open on its nodes for what it reads again and again: health
//! checks, stats samples, users' verifiers. A new session costs the node a fork and 4-5 ms of
//! CPU, a query on an open one about 30 µs; with hundreds of databases, opening one per read
//! kept the machine busy doing nothing (issue 26).
//!
//! One session per node and purpose: health checks have their own, so that a slow read (the
//! size of a large database) never delays a check past its deadline. A session whose statement
//! did not answer in time, or that closed, is dropped and the next read opens a new one; so a
//! node that died, froze or moved is seen exactly as with a session per read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::sql::Session;
use super::NodeSpec;

/// What a kept session is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The watcher's checks of a primary, bounded by the health timeout.
    Health,
    /// Stats samples and verifier reads.
    Reads,
}

/// The kept sessions, by node name and purpose.
#[derive(Default)]
pub struct Kept {
    sessions: Mutex<HashMap<(String, Purpose), Entry>>,
}

struct Entry {
    /// Where the session was opened: a node that moved needs a new one.
    address: Address,
    session: Arc<Session>,
}

impl Entry {
    /// Its session, if open and at `address`.
    fn usable(&self, address: &Address) -> Option<Arc<Session>> {
        (self.address == *address && !self.session.is_closed()).then(|| Arc::clone(&self.session))
    }
}

#[derive(Clone, PartialEq, Eq)]
struct Address {
    host: String,
    port: u16,
    agent: Option<String>,
}

impl Address {
    fn of(node: &NodeSpec) -> Self {
        Self { host: node.host.clone(), port: node.port, agent: node.agent.clone() }
    }
}

impl Kept {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Purpose), Entry>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open session kept for `node` and `purpose`, if any.
    pub(crate) fn get(&self, node: &NodeSpec, purpose: Purpose) -> Option<Arc<Session>> {
        self.sessions().get(&(node.name.clone(), purpose))?.usable(&Address::of(node))
    }

    /// Keeps `session`, unless another open one was kept meanwhile (two reads opened one at
    /// once): then that one is returned and `session` closes when dropped.
    pub(crate) fn put(&self, node: &NodeSpec, purpose: Purpose, session: Session) -> Arc<Session> {
        let address = Address::of(node);
        let mut sessions = self.sessions();
        let key = (node.name.clone(), purpose);
        if let Some(kept) = sessions.get(&key).and_then(|e| e.usable(&address)) {
            return kept;
        }
        let session = Arc::new(session);
        sessions.insert(key, Entry { address, session: Arc::clone(&session) });
        session
    }

    /// Drops `session` (if it is still the one kept): the next read opens a new one.
    pub(crate) fn forget(&self, node: &str, purpose: Purpose, session: &Arc<Session>) {
        let mut sessions = self.sessions();
        let key = (node.to_owned(), purpose);
        if sessions.get(&key).is_some_and(|e| Arc::ptr_eq(&e.session, session)) {
            sessions.remove(&key);
        }
    }

    /// Drops the sessions of nodes for which `keep` is false (nodes that are gone).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.sessions().retain(|(node, _), _| keep(node));
    }
}
