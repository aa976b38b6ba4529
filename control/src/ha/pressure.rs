//! How starved this machine is, from Linux's pressure stall information (`/proc/pressure`):
//! the share of the time some task waited for a CPU, or every task waited for I/O. A primary
//! on this host that did not answer a check in time while the machine was that starved may only
//! have waited for its turn (issue 26: a storm of creates made healthy primaries miss their
//! checks, and the watcher failed them over).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A reading this close to the previous one returns the previous share (every watcher asks at
/// every tick; the file is read for all of them at most this often).
const FRESH: Duration = Duration::from_millis(200);

/// The machine's stall times, read again as watchers ask.
pub struct Pressure {
    last: Mutex<Option<Reading>>,
}

/// This machine's: one for every watcher of the process.
pub static MACHINE: Pressure = Pressure { last: Mutex::new(None) };

#[derive(Clone, Copy)]
struct Reading {
    at: Instant,
    /// Microseconds some task waited for a CPU, since boot.
    cpu_some: u64,
    /// Microseconds every task waited for I/O, since boot.
    io_full: u64,
    /// The share of the time stalled between the reading before and this one.
    share: f64,
}

impl Pressure {
    /// The share of the time (0 to 1) the machine was stalled since the previous reading, the
    /// larger of CPU ("some") and I/O ("full"); `None` where the kernel does not tell (no PSI)
    /// or at the first reading.
    pub fn stalled(&self) -> Option<f64> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reading) = last.as_ref().filter(|r| r.at.elapsed() < FRESH) {
            return Some(reading.share);
        }
        let (cpu_some, io_full) = (total("cpu", "some")?, total("io", "full")?);
        let at = Instant::now();
        let share = last.as_ref().map(|before| {
            let wall = at.duration_since(before.at).as_micros().max(1) as f64;
            let cpu = cpu_some.saturating_sub(before.cpu_some) as f64 / wall;
            let io = io_full.saturating_sub(before.io_full) as f64 / wall;
            cpu.max(io).min(1.0)
        });
        *last = Some(Reading { at, cpu_some, io_full, share: share.unwrap_or(0.0) });
        share
    }
}

/// The `total=` of `/proc/pressure/<resource>`'s line `kind` (`some`, `full`), in microseconds.
fn total(resource: &str, kind: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
    parse_total(&text, kind)
}

fn parse_total(text: &str, kind: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(kind))?;
    line.split_whitespace().find_map(|field| field.strip_prefix("total="))?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_of_each_line_is_read() {
        let text = "some avg10=1.54 avg60=18.29 avg300=50.19 total=1609120334\n\
                    full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n";
        assert_eq!(parse_total(text, "some"), Some(1_609_120_334));
        assert_eq!(parse_total(text, "full"), Some(7));
        assert_eq!(parse_total("", "some"), None);
    }
}
