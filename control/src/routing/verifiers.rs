//! The SCRAM verifiers of each database's users, as the proxies need them to authenticate
//! clients. Read from the primary's catalog (so users created in SQL are included), held in
//! memory only, handed to the proxies with the routing table; never written to the store and
//! never logged (`Verifiers` prints user names only).

use std::collections::HashMap;
use std::sync::Mutex;

use pgwarden_api::Verifiers;

/// The last verifiers read for each database.
#[derive(Default)]
pub struct VerifierCache {
    by_database: Mutex<HashMap<String, Verifiers>>,
}

impl VerifierCache {
    pub fn get(&self, id: &str) -> Option<Verifiers> {
        self.by_database.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Records `verifiers` for `id`; true when they differ from what was known.
    pub fn set(&self, id: &str, verifiers: Verifiers) -> bool {
        let mut map = self.by_database.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(id) == Some(&verifiers) {
            return false;
        }
        map.insert(id.to_owned(), verifiers);
        true
    }

    pub fn forget(&self, id: &str) {
        self.by_database.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}
