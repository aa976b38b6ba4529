//! The limit on open files, which caps how many sessions the proxy can serve: each session
//! holds two descriptors (client and node). The binary raises the soft limit to the hard one at
//! start (as HAProxy and nginx do); clients beyond what the limit allows get `53300` like any
//! client over `limits.max_client_connections`, instead of waiting unanswered in the listen
//! queue while `accept` fails with `EMFILE`.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for everything that is not a session: the listeners, each runtime's epoll
/// and wake-up descriptors, admin API connections, the log, clients being refused.
pub const RESERVED: u64 = 64;

/// Raises the soft limit on open files to the hard limit. Returns the soft limit before and
/// after (`None` is unlimited).
pub fn raise_to_hard_limit() -> std::io::Result<(Option<u64>, Option<u64>)> {
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        setrlimit(Resource::Nofile, Rlimit { current: before.maximum, ..before })?;
    }
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

/// Sessions the current soft limit on open files leaves room for.
pub fn session_capacity() -> usize {
    capacity(getrlimit(Resource::Nofile).current)
}

fn capacity(soft_limit: Option<u64>) -> usize {
    soft_limit.map_or(usize::MAX, |n| {
        usize::try_from(n.saturating_sub(RESERVED) / 2).unwrap_or(usize::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_descriptors_per_session_after_the_reserve() {
        assert_eq!(capacity(Some(1024)), 480);
        assert_eq!(capacity(Some(RESERVED + 1)), 0);
        assert_eq!(capacity(Some(10)), 0);
        assert_eq!(capacity(None), usize::MAX);
    }
}
