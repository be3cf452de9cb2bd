//! Freezes of the whole process and lost partitions: when a task must stop acting.
//!
//! A worker that was frozen for longer than its group session (SIGSTOP, a paused VM, a
//! stop-the-world stall) has most likely lost its partitions to another worker meanwhile.
//! When it runs again its tasks would go on from where they stopped: apply the records
//! they had prefetched and fire every timer that fell due during the freeze, from state the
//! new owner has already moved past. Under `exactly_once` the broker fences what that
//! would write; under `at_least_once` nothing would, and the events topic would hold a
//! second, different history of the same payments. So a task that notices a freeze does
//! nothing until the group answers: under `at_least_once` the coordinator accepting a
//! commit from the worker (see `tasks::membership`), under `exactly_once` the assignment
//! revoked as lost or the grace passed; a task whose partition was lost stops at once,
//! without applying or publishing anything more.
//!
//! This module must never decide ownership itself: the consumer group does. It only tells
//! a task that it must ask.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// How often the pulse beats.
const BEAT: Duration = Duration::from_millis(100);

/// A thread that beats every [`BEAT`]; a beat that comes much later than that means the
/// whole process did not run meanwhile.
struct Pulse {
    origin: Instant,
    /// Milliseconds since `origin` of the last beat.
    last_beat_ms: AtomicU64,
    /// How many freezes the beating thread has seen.
    freezes: AtomicU64,
    /// The longest gap between beats that is not a freeze, in milliseconds.
    bound_ms: AtomicU64,
}

static PULSE: LazyLock<Arc<Pulse>> = LazyLock::new(|| {
    let pulse = Arc::new(Pulse {
        origin: Instant::now(),
        last_beat_ms: AtomicU64::new(0),
        freezes: AtomicU64::new(0),
        bound_ms: AtomicU64::new(u64::MAX),
    });
    let beating = pulse.clone();
    // A thread of its own, not a tokio task: a runtime whose threads are all busy is not
    // a frozen process.
    let spawned = std::thread::Builder::new()
        .name("freeze-pulse".into())
        .spawn(move || loop {
            std::thread::sleep(BEAT);
            let now = beating.elapsed_ms();
            let last = beating.last_beat_ms.swap(now, Ordering::SeqCst);
            if now.saturating_sub(last) > beating.bound_ms.load(Ordering::SeqCst) {
                beating.freezes.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(
                    frozen_ms = now.saturating_sub(last),
                    "the process did not run for longer than its group session allows"
                );
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no thread to notice freezes of the process");
    }
    pulse
});

impl Pulse {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// What a task remembers of the pulse: the freezes it has already waited out.
pub(super) struct FreezeWatch {
    seen: AtomicU64,
    bound: Duration,
    grace: Duration,
}

impl FreezeWatch {
    /// Watches for freezes longer than `bound`; after one, a task waits `grace` for the
    /// group's verdict.
    pub(super) fn new(bound: Duration, grace: Duration) -> Self {
        let pulse = &*PULSE;
        let bound_ms = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
        pulse.bound_ms.fetch_min(bound_ms, Ordering::SeqCst);
        FreezeWatch {
            seen: AtomicU64::new(pulse.freezes.load(Ordering::SeqCst)),
            bound,
            grace,
        }
    }

    /// Whether the process was frozen since the last call: the beating thread saw it, or
    /// its last beat is older than the bound (it has not run yet since the freeze).
    pub(super) fn frozen(&self) -> bool {
        let pulse = &*PULSE;
        let age = pulse
            .elapsed_ms()
            .saturating_sub(pulse.last_beat_ms.load(Ordering::SeqCst));
        let freezes = pulse.freezes.load(Ordering::SeqCst);
        let seen = self.seen.swap(freezes, Ordering::SeqCst);
        freezes != seen || u128::from(age) > self.bound.as_millis()
    }

    /// Forgets the freezes seen so far: the group has answered since.
    pub(super) fn forget(&self) {
        self.seen
            .store(PULSE.freezes.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// After a freeze: waits for the grace, or until the partition is lost or revoked,
    /// then forgets the freeze (the beating thread has counted it by then). Returns
    /// whether the partition was lost meanwhile.
    pub(super) async fn wait_for_the_group(
        &self,
        lost: &AtomicBool,
        revoked: impl Fn() -> bool,
    ) -> bool {
        let until = Instant::now() + self.grace;
        while Instant::now() < until && !lost.load(Ordering::SeqCst) && !revoked() {
            tokio::time::sleep(BEAT).await;
        }
        self.forget();
        lost.load(Ordering::SeqCst)
    }
}

/// Set by the rebalance callback when the group took a task's partition away without a
/// clean revoke (the session expired): the task stops without another write.
pub(super) type Lost = Arc<AtomicBool>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lost_partition_ends_the_wait_at_once() {
        let watch = FreezeWatch::new(Duration::from_secs(60), Duration::from_secs(30));
        let lost = AtomicBool::new(true);
        let started = Instant::now();
        assert!(watch.wait_for_the_group(&lost, || false).await);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_revoke_ends_the_wait_and_the_partition_is_not_lost() {
        let watch = FreezeWatch::new(Duration::from_secs(60), Duration::from_secs(30));
        let lost = AtomicBool::new(false);
        assert!(!watch.wait_for_the_group(&lost, || true).await);
    }

    #[test]
    fn a_process_that_runs_is_not_frozen() {
        let watch = FreezeWatch::new(Duration::from_secs(60), Duration::from_secs(1));
        std::thread::sleep(BEAT * 3);
        assert!(!watch.frozen());
    }
}
