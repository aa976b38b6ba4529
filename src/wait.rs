//! Waiting in tests, one way: until a condition holds, failing the test with what was last
//! seen when it does not hold in time. Tests wait on conditions, never on fixed sleeps, unless
//! time itself must pass (a PITR target between two commits): those say so where they sleep.

use std::time::{Duration, Instant};

/// How often a test looks again at what it waits for.
const EVERY: Duration = Duration::from_millis(100);

/// Runs `check` until it gives `Ok` (its value is returned), for at most `limit`; each `Err`
/// says what was seen. Panics with `what` and the last thing seen once `limit` has passed.
pub async fn wait_until<T>(
    what: &str,
    limit: Duration,
    check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    wait_until_every(what, limit, EVERY, check).await
}

/// As [`wait_until`], looking every `every`: for the harness's own waits on fast things (a node
/// ready, a process gone) and for waits whose duration a test reports (a takeover), which a
/// 100 ms step would slow or blur.
pub async fn wait_until_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(done) => return done,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {} s; last seen: {seen}", limit.as_secs_f64())
            }
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// As [`wait_until`], for a test that does not run on a runtime: `check` blocks, and so does
/// the wait.
pub fn wait_until_blocking<T>(
    what: &str,
    limit: Duration,
    check: impl FnMut() -> Result<T, String>,
) -> T {
    until_blocking_every(limit, EVERY, check).unwrap_or_else(|seen| {
        panic!("{what}: not within {} s; last seen: {seen}", limit.as_secs_f64())
    })
}

/// Runs `check` every `every` until it gives `Ok`, for at most `limit`; the last thing seen
/// when it did not hold in time. For the harness's blocking waits that handle the timeout
/// themselves (a node that would not stop is killed).
pub fn until_blocking_every<T>(
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(done) => return Ok(done),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// Runs `sql` through `url` with psql until it succeeds, for at most `limit`; returns its
/// output. Fails the test with `what` and psql's last error.
pub async fn wait_psql(what: &str, limit: Duration, url: &str, sql: &str) -> crate::ClientOutput {
    wait_until(what, limit, async || {
        let out = crate::psql(url, None, sql);
        if out.success {
            Ok(out)
        } else {
            Err(out.stderr)
        }
    })
    .await
}

/// Lets `duration` of wall-clock time pass: only for what needs time itself to pass (a PITR
/// target strictly between two commits' timestamps), never to wait for something to happen.
pub async fn let_time_pass(duration: Duration) {
    tokio::time::sleep(duration).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_returns_what_held_and_fails_with_what_it_saw_last() {
        let mut n = 0;
        let third = wait_until("the third look", Duration::from_secs(5), async || {
            n += 1;
            if n == 3 {
                Ok(n)
            } else {
                Err(format!("look {n}"))
            }
        });
        assert_eq!(third.await, 3);
        let never = tokio::spawn(wait_until("never", Duration::from_millis(50), async || {
            Err::<(), _>("still nothing".to_owned())
        }));
        let panic = never.await.expect_err("it gives up").into_panic();
        let message = panic.downcast_ref::<String>().expect("a message");
        assert!(message.contains("never") && message.contains("still nothing"), "{message}");
    }
}
