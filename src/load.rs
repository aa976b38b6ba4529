//! Load generators for HA tests and benchmarks: a writer of increasing numbers that records
//! every acknowledged insert, and a connector that opens a new session every 20 ms.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// An acknowledged insert: the number, the port of the node that acknowledged it, and when.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub n: i64,
    pub port: i32,
    pub at: Instant,
}

/// Inserts 1, 2, 3... into table `w(n int8)` through `url`, reconnecting on errors.
pub struct Writer {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(url: String) -> Self {
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let stop = CancellationToken::new();
        let (record, stopped) = (acks.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut next = 1i64;
            while !stopped.is_cancelled() {
                let connect = tokio_postgres::connect(&url, NoTls);
                let Ok(Ok((client, connection))) =
                    tokio::time::timeout(Duration::from_secs(2), connect).await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                tokio::spawn(connection);
                while !stopped.is_cancelled() {
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&next];
                    let insert = client.query_one(
                        "INSERT INTO w VALUES ($1) RETURNING inet_server_port()",
                        &params,
                    );
                    match tokio::time::timeout(Duration::from_secs(5), insert).await {
                        Ok(Ok(row)) => {
                            record.lock().expect("lock").push(Ack {
                                n: next,
                                port: row.get(0),
                                at: Instant::now(),
                            });
                            next += 1;
                        }
                        // Outcome unknown: never counted as acknowledged, never reused.
                        _ => {
                            next += 1;
                            break;
                        }
                    }
                }
            }
        });
        Self { acks, stop, task }
    }

    pub fn acked(&self) -> Vec<Ack> {
        self.acks.lock().expect("lock").clone()
    }

    /// Waits until `count` inserts were acknowledged by the node on `port`.
    pub async fn wait_acks_from(&self, port: i32, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.acked().iter().filter(|a| a.port == port).count() < count {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Waits until `more` inserts beyond those acknowledged now are (the load runs).
    pub async fn wait_more(&self, more: usize) {
        let from = self.acked().len();
        crate::wait_until(&format!("{more} more writes"), Duration::from_secs(30), async || {
            let now = self.acked().len();
            if now >= from + more {
                Ok(())
            } else {
                Err(format!("{} more", now - from))
            }
        })
        .await;
    }

    pub async fn stop(self) -> Vec<Ack> {
        self.stop.cancel();
        let _ = self.task.await;
        self.acks.lock().expect("lock").clone()
    }

    /// The first write acknowledged once writes resumed after a fault at `since`: after the
    /// first pause of over 200 ms (acknowledgements still on their way when the fault struck
    /// come before it; with none before `since`, the first after it), once 10 more were
    /// acknowledged; `None` after `limit`.
    pub async fn resumed_after(&self, since: Instant, limit: Duration) -> Option<Ack> {
        let deadline = Instant::now() + limit;
        loop {
            let acked = self.acked();
            let from = acked.iter().position(|a| a.at > since).unwrap_or(acked.len());
            if from == 0 && acked.len() > 10 {
                return Some(acked[0]);
            }
            let after = &acked[from.saturating_sub(1)..];
            let pause = Duration::from_millis(200);
            let gap = after.windows(2).position(|w| w[1].at - w[0].at > pause);
            if let Some(gap) = gap.filter(|gap| after.len() > gap + 11) {
                return Some(after[gap + 1]);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Opens a new session every 20 ms through `url` and runs `SELECT 1`; records how long each
/// connection took, or why it failed (a session ended by its node's planned restart, `57P01`,
/// before its first query ran counts as connected: it is an established session).
pub struct Connector {
    outcomes: Arc<Mutex<Vec<Result<Duration, String>>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Connector {
    pub fn start(url: String) -> Self {
        let outcomes: Arc<Mutex<Vec<Result<Duration, String>>>> = Arc::default();
        let stop = CancellationToken::new();
        let (record, stopped) = (outcomes.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !stopped.is_cancelled() {
                let started = Instant::now();
                let outcome = async {
                    let (client, connection) =
                        tokio_postgres::connect(&url, NoTls).await.map_err(|e| format!("{e:?}"))?;
                    tokio::spawn(connection);
                    let waited = started.elapsed();
                    match client.simple_query("SELECT 1").await {
                        // A session that opened just before a planned restart of its node is
                        // an established session ending as documented (57P01), not a new
                        // connection that failed.
                        Err(e)
                            if e.code()
                                == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN) =>
                        {
                            Ok(waited)
                        }
                        Err(e) => Err(format!("{e:?}")),
                        Ok(_) => Ok(waited),
                    }
                }
                .await;
                record.lock().expect("lock").push(outcome);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self { outcomes, stop, task }
    }

    /// Waits until `more` sessions beyond those tried now were (the load runs).
    pub async fn wait_more(&self, more: usize) {
        let tried = || self.outcomes.lock().expect("lock").len();
        let from = tried();
        let what = format!("{more} more new sessions");
        crate::wait_until(&what, Duration::from_secs(30), async || {
            let now = tried();
            if now >= from + more {
                Ok(())
            } else {
                Err(format!("{} more", now - from))
            }
        })
        .await;
    }

    pub async fn stop(self) -> Vec<Result<Duration, String>> {
        self.stop.cancel();
        let _ = self.task.await;
        self.outcomes.lock().expect("lock").clone()
    }
}

/// Acknowledged numbers missing from the comma-separated list `present`.
pub fn lost_writes(acks: &[Ack], present: &str) -> Vec<i64> {
    let present: std::collections::HashSet<i64> = present
        .trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .filter_map(|n| n.parse().ok())
        .collect();
    acks.iter().map(|a| a.n).filter(|n| !present.contains(n)).collect()
}

/// Asserts that no new connection of a `Connector` failed; prints how many there were and the
/// longest wait.
pub fn assert_no_failed(outcomes: &[Result<Duration, String>], what: &str) {
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} new connections failed: {failed:?}",
        failed.len(),
        outcomes.len()
    );
    let longest = outcomes.iter().filter_map(|o| o.as_ref().ok()).max();
    println!("{what}: {} new connections, longest wait {longest:?}", outcomes.len());
}

/// "median …, max … (n runs)" of `times`, for benchmarks.
pub fn median_max(mut times: Vec<Duration>) -> String {
    if times.is_empty() {
        return "no runs".into();
    }
    times.sort();
    let (median, max) = (times[times.len() / 2], times[times.len() - 1]);
    format!("median {median:?}, max {max:?} ({} runs)", times.len())
}
