//! Where sessions run: one single-threaded runtime per core, each session pinned to the least
//! busy one for its whole life.
//!
//! A session is a chain of wake-ups (client readable, node writable, node readable, client
//! writable). On a work-stealing runtime those wake-ups hop between threads and each hop costs a
//! futex wake and often a cross-CPU interrupt; on a single-threaded runtime a session's wake-ups
//! are all served by the thread blocked in that runtime's `epoll_wait`, which also batches the
//! readiness of all its sessions into one call (measurements in benches/RESULTS.md).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The runtimes sessions are spread over. Empty: sessions run on the caller's runtime.
#[derive(Clone, Default)]
pub struct Workers {
    slots: Arc<[Slot]>,
}

struct Slot {
    handle: Handle,
    sessions: AtomicUsize,
}

/// The threads behind [`Workers::start`]; [`WorkerThreads::stop`] ends them.
pub struct WorkerThreads {
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Sessions run on the runtime that calls [`crate::run`] (tests and embedders).
    pub fn inline() -> Self {
        Self::default()
    }

    /// `current` (the caller's single-threaded runtime) plus `extra` single-threaded runtimes,
    /// each on its own thread. With `pin`, runtime i (the caller's is 0) runs only on the i-th
    /// CPU the process may use, so that no two runtimes share a CPU while another idles.
    pub fn start(current: Handle, extra: usize, pin: bool) -> io::Result<(Self, WorkerThreads)> {
        // Empty without `pin`: then nothing is pinned.
        let cpus = if pin { allowed_cpus() } else { Vec::new() };
        pin_current_thread(&cpus, 0);
        let stop = CancellationToken::new();
        let mut handles = vec![current];
        let mut threads = Vec::with_capacity(extra);
        for i in 1..=extra {
            let (tx, rx) = mpsc::channel();
            let stop = stop.clone();
            let cpus = cpus.clone();
            let thread = std::thread::Builder::new().name(format!("pgwarden-worker-{i}")).spawn(
                move || {
                    pin_current_thread(&cpus, i);
                    let runtime =
                        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                            Ok(runtime) => runtime,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(stop.cancelled());
                },
            )?;
            threads.push(thread);
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("worker thread ended before starting"))??;
            handles.push(handle);
        }
        let slots = handles
            .into_iter()
            .map(|handle| Slot { handle, sessions: AtomicUsize::new(0) })
            .collect();
        Ok((Self { slots }, WorkerThreads { stop, threads }))
    }

    /// Runs `serve` for the accepted `tcp` on the least busy runtime, tracked by `tracker`.
    pub(crate) fn spawn<F, Fut>(&self, tracker: &TaskTracker, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let least_busy = self.slots.iter().enumerate();
        let Some((index, slot)) =
            least_busy.min_by_key(|(_, s)| s.sessions.load(Ordering::Relaxed))
        else {
            tracker.spawn(serve(tcp));
            return;
        };
        // A socket belongs to the reactor of the runtime that registered it: hand it over as a
        // plain socket and register it again on the chosen runtime.
        let std_tcp = match tcp.into_std() {
            Ok(std_tcp) => std_tcp,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        slot.sessions.fetch_add(1, Ordering::Relaxed);
        let slots = Arc::clone(&self.slots);
        tracker.spawn_on(
            async move {
                let _count = SessionCount(&slots[index].sessions);
                match TcpStream::from_std(std_tcp) {
                    Ok(tcp) => serve(tcp).await,
                    Err(e) => tracing::warn!(error = %e, "cannot register a connection"),
                }
            },
            &slot.handle,
        );
    }
}

/// Decrements a runtime's session count when the session ends (or is dropped with its runtime).
struct SessionCount<'a>(&'a AtomicUsize);

impl Drop for SessionCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkerThreads {
    /// Ends the worker runtimes (dropping whatever they still run) and waits for their threads.
    pub fn stop(self) {
        self.stop.cancel();
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// The CPUs this process may run on (its affinity mask), lowest first.
fn allowed_cpus() -> Vec<usize> {
    use rustix::thread::{sched_getaffinity, CpuSet};
    match sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|&cpu| set.is_set(cpu)).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the CPU affinity; runtimes are not pinned");
            Vec::new()
        }
    }
}

/// Pins the calling thread to runtime `index`'s CPU: the index-th of `cpus`, wrapping; does
/// nothing when `cpus` is empty.
fn pin_current_thread(cpus: &[usize], index: usize) {
    use rustix::thread::{sched_setaffinity, CpuSet};
    let Some(&cpu) = cpus.get(index.checked_rem(cpus.len()).unwrap_or(0)) else {
        return;
    };
    let mut set = CpuSet::new();
    set.set(cpu);
    if let Err(e) = sched_setaffinity(None, &set) {
        tracing::warn!(error = %e, cpu, "cannot pin a runtime thread to its CPU");
    }
}
