//! Admission of connections that have not authenticated yet, so that floods do not starve
//! legitimate clients:
//!
//! - at most `max_starting_per_source` connections from one client address may be starting
//!   (handshake and authentication) at once; beyond it a new one is refused at once (`53300`);
//! - at most `max_starting` in all: when a new connection would exceed it, the oldest starting
//!   connection is ended (a client that takes its time loses its place to one that does not,
//!   so idle or byte-a-second connections from many addresses cannot fill the proxy);
//! - failed logins from an address slow that address's next refusals: the failure score decays
//!   with a half-life of [`FAILURE_HALF_LIFE`], and each failed login is answered after
//!   `score × FAILURE_STEP` (at most [`MAX_PENALTY`]). A refused client holds its place among
//!   the starting connections meanwhile, so a storm of wrong passwords from one address runs at
//!   most `max_starting_per_source / MAX_PENALTY` attempts per second.
//!
//! Established sessions are not counted here (`max_client_connections` bounds them).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

pub const FAILURE_HALF_LIFE: Duration = Duration::from_secs(10);
pub const FAILURE_STEP: Duration = Duration::from_millis(100);
pub const MAX_PENALTY: Duration = Duration::from_secs(3);
/// Addresses remembered for their failures at most; beyond it the calmest are forgotten.
const MAX_REMEMBERED: usize = 65_536;

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Starting connections by arrival order: the token that ends each.
    starting: BTreeMap<u64, CancellationToken>,
    sources: HashMap<IpAddr, Source>,
}

#[derive(Default)]
struct Source {
    starting: usize,
    failures: f64,
    last_failure: Option<Instant>,
}

impl Source {
    fn decayed(&self, now: Instant) -> f64 {
        let Some(last) = self.last_failure else { return 0.0 };
        let halves = now.duration_since(last).as_secs_f64() / FAILURE_HALF_LIFE.as_secs_f64();
        self.failures * 0.5f64.powf(halves)
    }
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    TooManyFromSource,
}

pub struct Admission {
    max_starting: usize,
    max_per_source: usize,
    state: Mutex<State>,
}

/// A starting connection's place; dropping it (authenticated, or gone) frees it.
pub struct Starting {
    admission: Arc<Admission>,
    ip: IpAddr,
    seq: u64,
    /// Cancelled when a newer connection takes this one's place.
    pub evicted: CancellationToken,
}

impl Starting {
    /// The client address it was admitted for.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        state.starting.remove(&self.seq);
        if let Some(source) = state.sources.get_mut(&self.ip) {
            source.starting -= 1;
            if source.starting == 0 && source.decayed(Instant::now()) < 0.01 {
                state.sources.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    pub fn new(max_starting: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self { max_starting, max_per_source, state: Mutex::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`, ending the oldest starting one if all places are taken.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Starting, Refused> {
        let mut state = self.lock();
        let source = state.sources.entry(ip).or_default();
        if source.starting >= self.max_per_source {
            return Err(Refused::TooManyFromSource);
        }
        source.starting += 1;
        if state.starting.len() >= self.max_starting {
            if let Some((_, oldest)) = state.starting.pop_first() {
                // Its task sees the token, drops its connection and its place.
                oldest.cancel();
            }
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let evicted = CancellationToken::new();
        state.starting.insert(seq, evicted.clone());
        Ok(Starting { admission: self.clone(), ip, seq, evicted })
    }

    /// Records a failed login from `ip`; returns how long to wait before saying so.
    pub fn login_failed(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut state = self.lock();
        if state.sources.len() >= MAX_REMEMBERED && !state.sources.contains_key(&ip) {
            forget_calmest(&mut state.sources, now);
        }
        let source = state.sources.entry(ip).or_default();
        source.failures = source.decayed(now) + 1.0;
        source.last_failure = Some(now);
        FAILURE_STEP.mul_f64(source.failures - 1.0).min(MAX_PENALTY)
    }

    /// Connections starting now.
    #[cfg(test)]
    pub fn starting(&self) -> usize {
        self.lock().starting.len()
    }
}

/// Forgets the addresses with no starting connection and the lowest failure scores (half of
/// what is remembered), so the map stays bounded whatever the number of addresses.
fn forget_calmest(sources: &mut HashMap<IpAddr, Source>, now: Instant) {
    let mut idle: Vec<(IpAddr, f64)> = sources
        .iter()
        .filter(|(_, s)| s.starting == 0)
        .map(|(ip, s)| (*ip, s.decayed(now)))
        .collect();
    idle.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (ip, _) in idle.iter().take(sources.len() / 2) {
        sources.remove(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let admission = Admission::new(100, 3);
        let held: Vec<Starting> = (0..3).map(|_| admission.admit(ip(2)).unwrap()).collect();
        assert_eq!(admission.admit(ip(2)).err(), Some(Refused::TooManyFromSource));
        assert!(admission.admit(ip(1)).is_ok(), "another address is not affected");
        drop(held);
        assert!(admission.admit(ip(2)).is_ok(), "places come back when connections go");
        assert_eq!(admission.starting(), 0);
    }

    #[test]
    fn when_full_the_oldest_starting_connection_makes_room() {
        let admission = Admission::new(2, 10);
        let first = admission.admit(ip(2)).unwrap();
        let second = admission.admit(ip(3)).unwrap();
        let third = admission.admit(ip(1)).unwrap();
        assert!(first.evicted.is_cancelled(), "the oldest gave way");
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        drop(first);
        assert_eq!(admission.starting(), 2);
    }

    #[test]
    fn failed_logins_slow_their_source_and_the_penalty_is_bounded() {
        let admission = Admission::new(10, 10);
        assert_eq!(admission.login_failed(ip(4)), Duration::ZERO, "a first mistake is free");
        let second = admission.login_failed(ip(4));
        assert!(second >= Duration::from_millis(90), "{second:?}");
        let penalties: Vec<Duration> = (0..100).map(|_| admission.login_failed(ip(4))).collect();
        assert_eq!(*penalties.last().unwrap(), MAX_PENALTY);
        assert_eq!(admission.login_failed(ip(5)), Duration::ZERO, "other addresses unaffected");
    }

    #[test]
    fn the_memory_of_failures_is_bounded() {
        let admission = Admission::new(10, 10);
        for i in 0..(MAX_REMEMBERED as u32 + 10) {
            admission.login_failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(admission.lock().sources.len() <= MAX_REMEMBERED);
    }
}
