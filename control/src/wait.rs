//! Waiting, one way: until a condition holds, or a deadline passes.
//!
//! Most of what the control plane waits for is announced by nothing (a standby's replay
//! position, a process that starts, a proxy that answers), so it is looked at again at one of
//! the intervals named here, the whole wait bounded by one timeout. Waiting on another task of
//! our own uses a channel instead (`watch`, `Notify`), never a polled value.

use std::future::Future;
use std::time::Duration;

/// For a position that moves within milliseconds on its own (a standby catching up while
/// clients are held).
pub const QUICK: Duration = Duration::from_millis(10);
/// For a node's or a process's state (streaming, synchronous, started, a proxy answering).
pub const STEADY: Duration = Duration::from_millis(100);
/// For what takes seconds (a database provisioned, a recovery, an operation through the API).
pub const SLOW: Duration = Duration::from_millis(250);

/// Runs `check` at once, then every `every`, until it gives `Some` (then `Ok(Some)`), fails
/// (then its error), or `limit` passes (then `Ok(None)`; a check still running is dropped).
pub async fn until<T, E, F, Fut>(
    limit: Duration,
    every: Duration,
    mut check: F,
) -> Result<Option<T>, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
{
    let polled = async {
        loop {
            if let Some(done) = check().await? {
                return Ok(done);
            }
            tokio::time::sleep(every).await;
        }
    };
    match tokio::time::timeout(limit, polled).await {
        Ok(result) => result.map(Some),
        Err(_) => Ok(None),
    }
}

/// [`until`] for a check that cannot fail: whether it held within `limit`.
pub async fn until_true<F, Fut>(limit: Duration, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let held = until(limit, every, || {
        let checked = check();
        async move { Ok::<_, std::convert::Infallible>(checked.await.then_some(())) }
    });
    matches!(held.await, Ok(Some(())))
}

/// [`until_true`] on a blocking thread (code that waits on a process or a file, and may not
/// hold up the runtime): whether `check` held within `limit`.
pub fn until_blocking(limit: Duration, every: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_wait_ends_when_its_check_holds_fails_or_its_time_is_up() {
        let calls = AtomicU32::new(0);
        let third = until(Duration::from_secs(5), Duration::from_millis(1), || async {
            let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
            Ok::<_, String>((n == 3).then_some(n))
        });
        assert_eq!(third.await, Ok(Some(3)));
        let failed = until(Duration::from_secs(5), Duration::from_millis(1), || async {
            Err::<Option<()>, _>("node gone")
        });
        assert_eq!(failed.await, Err("node gone"));
        let never =
            until_true(Duration::from_millis(30), Duration::from_millis(1), || async { false });
        assert!(!never.await);
        // A check that hangs is bounded too.
        let hangs = until_true(Duration::from_millis(30), Duration::from_millis(1), || {
            std::future::pending::<bool>()
        });
        assert!(!hangs.await);
        assert!(until_blocking(Duration::from_millis(30), Duration::from_millis(1), || true));
        assert!(!until_blocking(Duration::from_millis(5), Duration::from_millis(1), || false));
    }
}
