//! Ports for new nodes: free on the host, used by no node of this platform, and never handed
//! out twice, even to two provisions running at the same time. A destroyed node's port is
//! given back, so what is kept here follows the nodes that exist, not every node ever made.

use std::collections::HashSet;
use std::sync::Mutex;

#[derive(Default)]
pub struct Ports {
    /// Ports handed out by this process (a node may not be in the store yet).
    given: Mutex<HashSet<u16>>,
}

impl Ports {
    /// `count` ports from `first` up that are not in `used`, were not given before, and that
    /// nothing on `host` holds now.
    pub fn allocate(&self, host: &str, first: u16, used: &[u16], count: usize) -> Vec<u16> {
        let mut given = self.given.lock().unwrap_or_else(|e| e.into_inner());
        let ports: Vec<u16> = (first..=u16::MAX)
            .filter(|p| !used.contains(p) && !given.contains(p))
            // A port in use on this host is skipped; another host's address cannot be tried
            // here (its agent's start of the node says if the port is taken).
            .filter(|p| match std::net::TcpListener::bind((host, *p)) {
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
            })
            .take(count)
            .collect();
        given.extend(&ports);
        ports
    }

    /// Gives `port` back: its node is destroyed.
    pub fn release(&self, port: u16) {
        self.given.lock().unwrap_or_else(|e| e.into_inner()).remove(&port);
    }

    /// How many ports are handed out.
    #[cfg(test)]
    fn given(&self) -> usize {
        self.given.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_never_given_twice() {
        let ports = Ports::default();
        let first = ports.allocate("127.0.0.1", 20000, &[20001], 2);
        let second = ports.allocate("127.0.0.1", 20000, &[], 2);
        assert_eq!(first.len(), 2);
        assert!(!first.contains(&20001));
        assert!(first.iter().all(|p| !second.contains(p)), "{first:?} {second:?}");
        assert_eq!(ports.given(), 4);
        ports.release(first[0]);
        assert_eq!(ports.given(), 3, "a destroyed node's port is forgotten");
    }
}
