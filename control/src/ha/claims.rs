//! One primary change at a time per database. A planned change (switchover) claims the
//! database with `try_planned`; an automatic or forced failover with `for_failover`, which
//! cancels a planned change that has not yet stopped the primary on purpose instead of waiting
//! for it: a planned change can never talk a failing database out of its failover. A planned
//! change reacts to the cancel at its next step (every step of it is bounded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct PrimaryChanges {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    planned: Mutex<Option<Planned>>,
}

#[derive(Clone)]
struct Planned {
    cancel: CancellationToken,
    primary_stopped: bool,
    /// Which claim this is.
    claim: Arc<()>,
}

/// Held while a primary change runs; dropping it ends the change.
pub struct ChangeGuard {
    slot: Arc<Slot>,
    cancel: CancellationToken,
    claim: Arc<()>,
    _lock: OwnedMutexGuard<()>,
}

impl ChangeGuard {
    /// Resolves when a failover took over from this (planned) change.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The planned change stopped the primary itself: the watcher must not take that for a
    /// failure.
    pub fn primary_stopped_on_purpose(&self) {
        self.set_primary_stopped(true);
    }

    /// The primary a planned change stopped serves again: a failure is a failure again.
    pub fn primary_back(&self) {
        self.set_primary_stopped(false);
    }

    fn set_primary_stopped(&self, stopped: bool) {
        let mut planned = self.slot.planned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = planned.as_mut().filter(|p| Arc::ptr_eq(&p.claim, &self.claim)) {
            p.primary_stopped = stopped;
        }
    }
}

impl Drop for ChangeGuard {
    fn drop(&mut self) {
        let mut planned = self.slot.planned.lock().unwrap_or_else(|e| e.into_inner());
        if planned.as_ref().is_some_and(|p| Arc::ptr_eq(&p.claim, &self.claim)) {
            *planned = None;
        }
    }
}

impl PrimaryChanges {
    fn slot(&self, id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !slots.contains_key(id) {
            // A slot no guard holds has nothing to remember (a guard clears its claim when it
            // drops): such slots go as new ones come, so the map follows the databases being
            // changed, not every database there ever was.
            slots.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        Arc::clone(slots.entry(id.to_owned()).or_default())
    }

    /// Claims `id` for a planned change, or `None` when another change is running.
    pub fn try_planned(&self, id: &str) -> Option<ChangeGuard> {
        let slot = self.slot(id);
        let lock = Arc::clone(&slot.lock).try_lock_owned().ok()?;
        let (cancel, claim) = (CancellationToken::new(), Arc::new(()));
        *slot.planned.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Planned { cancel: cancel.clone(), primary_stopped: false, claim: claim.clone() });
        Some(ChangeGuard { slot, cancel, claim, _lock: lock })
    }

    /// `id`'s slot if it has one (asking makes none).
    fn existing(&self, id: &str) -> Option<Arc<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Whether a primary change of `id` is running.
    pub fn busy(&self, id: &str) -> bool {
        self.existing(id).is_some_and(|slot| slot.lock.try_lock().is_err())
    }

    /// Whether a planned change stopped `id`'s primary on purpose (and still runs).
    pub fn primary_stopped_on_purpose(&self, id: &str) -> bool {
        let Some(slot) = self.existing(id) else { return false };
        let planned = slot.planned.lock().unwrap_or_else(|e| e.into_inner());
        planned.as_ref().is_some_and(|p| p.primary_stopped && !p.cancel.is_cancelled())
    }

    /// Claims `id` for a failover: a running planned change is cancelled (unless it stopped
    /// the primary on purpose: then `None`, it is finishing the change itself), and the claim
    /// waits for it to give up.
    pub async fn for_failover(&self, id: &str) -> Option<ChangeGuard> {
        let slot = self.slot(id);
        {
            let planned = slot.planned.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = planned.as_ref() {
                if p.primary_stopped && !p.cancel.is_cancelled() {
                    return None;
                }
                p.cancel.cancel();
            }
        }
        let lock = Arc::clone(&slot.lock).lock_owned().await;
        Some(ChangeGuard {
            slot,
            cancel: CancellationToken::new(),
            claim: Arc::new(()),
            _lock: lock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failover_preempts_a_planned_change_unless_it_stopped_the_primary() {
        let changes = PrimaryChanges::default();
        let planned = changes.try_planned("db").expect("free");
        assert!(changes.try_planned("db").is_none(), "one change at a time");
        let failover = changes.for_failover("db");
        tokio::pin!(failover);
        // The claim waits for the planned change, which is told to give up.
        assert!(futures_poll(&mut failover).await.is_none());
        assert!(planned.is_cancelled());
        drop(planned);
        let guard = failover.await.expect("claimed after the planned change gave up");
        drop(guard);

        let planned = changes.try_planned("db").expect("free again");
        planned.primary_stopped_on_purpose();
        assert!(changes.primary_stopped_on_purpose("db"));
        assert!(changes.for_failover("db").await.is_none(), "the planned change finishes it");
        assert!(!planned.is_cancelled());
        drop(planned);
        assert!(!changes.primary_stopped_on_purpose("db"));
    }

    #[test]
    fn slots_no_guard_holds_are_forgotten() {
        let changes = PrimaryChanges::default();
        let held = changes.try_planned("a").expect("claimed");
        for id in ["b", "c", "d"] {
            drop(changes.try_planned(id).expect("claimed"));
        }
        assert!(!changes.busy("never-claimed"), "asking makes no slot");
        let _e = changes.try_planned("e").expect("claimed");
        let kept: Vec<String> = changes.slots.lock().unwrap().keys().cloned().collect();
        assert_eq!(kept.len(), 2, "the held one and the new one: {kept:?}");
        assert!(changes.busy("a"));
        drop(held);
        assert!(!changes.busy("a"));
    }

    /// Polls a future once: `Some` if it is ready.
    async fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = f => Some(out),
            () = tokio::task::yield_now() => None,
        }
    }
}
