//! Limits per database, so that one tenant's reconnect storm or connection leak leaves the
//! others alone: at most `client_connections` clients at once, and new connections at most
//! `connections_per_second` (a bucket of one second's worth, refilled continuously). Both come
//! from the routing table (defaults from the database's plan); a database without them is not
//! limited here.
//!
//! A client takes its seat once its database is known, before any authentication work. Past
//! the rate, a new connection waits for its turn, up to [`MOST_WAITED`] (a pool that reconnects
//! all at once is slowed, not refused); beyond, and beyond the clients, it is
//! refused (`53300`) after [`REFUSAL_DELAY`], so that a client reconnecting in a loop comes
//! back once a second instead of thousands of times: a storm costs the proxy little and the
//! node nothing. The seat is given back when the client's connection ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest a new connection waits for its turn under the rate: this many seconds' worth of
/// connections may wait, those beyond are refused.
pub const MOST_WAITED: Duration = Duration::from_secs(5);

/// How long a refused client waits for its refusal.
pub const REFUSAL_DELAY: Duration = Duration::from_secs(1);

/// A database's limits, as its route carries them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub client_connections: Option<u32>,
    pub connections_per_second: Option<u32>,
}

/// Why a client was refused its seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Clients(u32),
    Rate(u32),
}

#[derive(Default)]
pub struct Tenants {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    databases: HashMap<String, Tenant>,
    /// How many databases there were at the last sweep of the idle ones.
    swept_at: usize,
}

struct Tenant {
    clients: u32,
    /// The rate it was last entered under.
    rate: Option<u32>,
    /// New connections it may still open now, and when that was computed.
    tokens: f64,
    at: Instant,
}

impl Tenant {
    /// Refills the bucket of `rate` per second up to `now`; whether it is full.
    fn refill(&mut self, rate: Option<u32>, now: Instant) -> bool {
        let Some(rate) = rate.map(|r| f64::from(r.max(1))) else { return true };
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.at = now;
        self.tokens >= rate
    }
}

/// A client's seat in its database; dropping it gives it back.
pub struct Seat {
    tenants: Arc<Tenants>,
    database: String,
    /// How long the client waits for its turn under the rate (at most [`MOST_WAITED`]).
    pub wait: Duration,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut state = self.tenants.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tenant) = state.databases.get_mut(&self.database) {
            tenant.clients = tenant.clients.saturating_sub(1);
        }
    }
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seat").field("database", &self.database).field("wait", &self.wait).finish()
    }
}

impl Tenants {
    /// A seat for a new client of `database` under `limits`, or why there is none.
    pub fn enter(self: &Arc<Self>, database: &str, limits: Limits) -> Result<Seat, Full> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Databases with no client and a full bucket are forgotten (they would start again
        // from the same place), once their number has doubled since the last sweep.
        if state.databases.len() > (2 * state.swept_at).max(64) {
            state.databases.retain(|_, t| t.clients > 0 || !t.refill(t.rate, now));
            state.swept_at = state.databases.len();
        }
        let rate = limits.connections_per_second;
        let tenant = state.databases.entry(database.to_owned()).or_insert_with(|| Tenant {
            clients: 0,
            rate,
            tokens: rate.map_or(0.0, f64::from),
            at: now,
        });
        tenant.rate = rate;
        tenant.refill(rate, now);
        if let Some(max) = limits.client_connections {
            if tenant.clients >= max {
                return Err(Full::Clients(max));
            }
        }
        let mut wait = Duration::ZERO;
        if let Some(rate) = rate {
            // In debt of at most `MOST_WAITED`'s worth: those wait for their turn.
            let per_second = f64::from(rate.max(1));
            if tenant.tokens - 1.0 < -per_second * MOST_WAITED.as_secs_f64() {
                return Err(Full::Rate(rate));
            }
            tenant.tokens -= 1.0;
            if tenant.tokens < 0.0 {
                wait = Duration::from_secs_f64(-tenant.tokens / per_second);
            }
        }
        tenant.clients += 1;
        Ok(Seat { tenants: self.clone(), database: database.to_owned(), wait })
    }

    /// Clients of `database` holding a seat.
    #[cfg(test)]
    fn clients(&self, database: &str) -> u32 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.databases.get(database).map_or(0, |t| t.clients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn clients_beyond_the_limit_are_refused_until_one_leaves() {
        let tenants = Arc::new(Tenants::default());
        let limits = Limits { client_connections: Some(2), connections_per_second: None };
        let a = tenants.enter("a", limits).unwrap();
        let _b = tenants.enter("a", limits).unwrap();
        assert_eq!(tenants.enter("a", limits).unwrap_err(), Full::Clients(2));
        // Another database has its own seats.
        let _other = tenants.enter("b", limits).unwrap();
        drop(a);
        assert_eq!(tenants.clients("a"), 1);
        let _c = tenants.enter("a", limits).unwrap();
        assert_eq!(tenants.clients("a"), 2);
    }

    #[test]
    fn past_the_rate_five_seconds_worth_wait_their_turn_and_the_rest_are_refused() {
        let tenants = Arc::new(Tenants::default());
        let limits = Limits { client_connections: None, connections_per_second: Some(20) };
        // A second's worth at once; the seats given back do not give the rate back.
        for _ in 0..20 {
            let seat = tenants.enter("a", limits).unwrap();
            assert!(seat.wait < Duration::from_millis(50), "{:?}", seat.wait);
        }
        // The next five seconds' worth wait for their turn: one every 50 ms.
        let waits: Vec<Duration> =
            (0..100).map(|_| tenants.enter("a", limits).unwrap().wait).collect();
        assert!(waits.windows(2).all(|w| w[0] < w[1]), "{waits:?}");
        assert!(waits[0] <= Duration::from_millis(50), "{waits:?}");
        assert!(waits[99] > Duration::from_millis(4_900) && waits[99] <= MOST_WAITED);
        assert_eq!(tenants.enter("a", limits).unwrap_err(), Full::Rate(20));
        assert!(tenants.enter("b", limits).is_ok(), "another database is not limited by a");
        // 20 per second: one more every 50 ms, as many as the time that passed.
        let debt_paid = Instant::now();
        std::thread::sleep(Duration::from_millis(120));
        let mut admitted = 0;
        while tenants.enter("a", limits).is_ok() {
            admitted += 1;
        }
        let earned = debt_paid.elapsed().as_secs_f64() * 20.0;
        assert!(admitted >= 2 && f64::from(admitted) <= earned + 1.0, "{admitted} in {earned}");
    }

    #[test]
    fn a_database_without_limits_is_not_limited_and_idle_ones_are_forgotten() {
        let tenants = Arc::new(Tenants::default());
        let seats: Vec<Seat> =
            (0..1_000).map(|_| tenants.enter("a", Limits::default()).unwrap()).collect();
        assert_eq!(tenants.clients("a"), 1_000);
        drop(seats);
        for i in 0..1_000 {
            drop(tenants.enter(&format!("db{i}"), Limits::default()).unwrap());
        }
        let known = tenants.state.lock().unwrap().databases.len();
        assert!(known <= 129, "{known} databases remembered");
    }
}
