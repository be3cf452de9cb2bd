//! What a role of the process (a worker, the sink, the notifier) tells its watchdog: the
//! partitions it holds, that it made progress, and a known cause it is waiting on. The
//! watchdog (in the gateway crate, which talks to Kafka) judges a stall from it and marks
//! the role stalled here; `/health/ready` of the process answers from [`not_ready`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

/// One role's progress, shared by the role and its watchdog.
#[derive(Debug)]
pub struct Progress {
    role: String,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    held: BTreeSet<(String, i32)>,
    /// When `held` last went from some partitions to none (or the role started).
    empty_since: Option<Instant>,
    last_beat: Instant,
    /// Known causes the role is waiting on (a restore, an unreachable database), by
    /// how many are active.
    busy: Vec<String>,
    /// Set by the watchdog: why the role is not making progress.
    stalled: Option<String>,
}

/// `cmd[0, 1, 2] evt[3]`: partitions grouped by topic, as the roles log what they were
/// assigned and what they lost.
pub fn partition_list<'a>(parts: impl IntoIterator<Item = (&'a str, i32)>) -> String {
    let mut by_topic: std::collections::BTreeMap<&str, Vec<i32>> = Default::default();
    for (topic, partition) in parts {
        by_topic.entry(topic).or_default().push(partition);
    }
    by_topic
        .iter()
        .map(|(t, ps)| format!("{t}{ps:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

static REGISTRY: Mutex<Vec<Weak<Progress>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the state itself is intact.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Progress {
    /// A new role's progress, holding nothing yet, registered for [`not_ready`].
    pub fn new(role: &str) -> Arc<Self> {
        let now = Instant::now();
        let p = Arc::new(Progress {
            role: role.to_owned(),
            state: Mutex::new(State {
                held: BTreeSet::new(),
                empty_since: Some(now),
                last_beat: now,
                busy: Vec::new(),
                stalled: None,
            }),
        });
        let mut reg = lock(&REGISTRY);
        reg.retain(|w| w.strong_count() > 0);
        reg.push(Arc::downgrade(&p));
        p
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    /// The role made progress (applied a record, restored a batch, picked its work).
    pub fn beat(&self) {
        lock(&self.state).last_beat = Instant::now();
    }

    pub fn since_beat(&self) -> std::time::Duration {
        lock(&self.state).last_beat.elapsed()
    }

    /// Partitions assigned to the role.
    pub fn assigned(&self, parts: impl IntoIterator<Item = (String, i32)>) {
        let mut s = lock(&self.state);
        s.held.extend(parts);
        if !s.held.is_empty() {
            s.empty_since = None;
        }
    }

    /// Partitions taken from the role.
    pub fn revoked(&self, parts: impl IntoIterator<Item = (String, i32)>) {
        let mut s = lock(&self.state);
        for p in parts {
            s.held.remove(&p);
        }
        if s.held.is_empty() && s.empty_since.is_none() {
            s.empty_since = Some(Instant::now());
        }
    }

    /// The partitions the role holds.
    pub fn held(&self) -> BTreeSet<(String, i32)> {
        lock(&self.state).held.clone()
    }

    /// How long the role has held no partition, if it holds none.
    pub fn empty_for(&self) -> Option<std::time::Duration> {
        lock(&self.state).empty_since.map(|t| t.elapsed())
    }

    /// The role waits on `cause` until the guard is dropped: a stall meanwhile is
    /// reported but does not end the process (a restart would not help).
    pub fn busy(self: &Arc<Self>, cause: impl Into<String>) -> Busy {
        let cause = cause.into();
        lock(&self.state).busy.push(cause.clone());
        Busy {
            progress: self.clone(),
            cause,
        }
    }

    /// The known causes the role is waiting on now.
    pub fn busy_with(&self) -> Vec<String> {
        lock(&self.state).busy.clone()
    }

    /// The watchdog's verdict: `Some(why)` while the role is stalled.
    pub fn set_stalled(&self, why: Option<String>) {
        lock(&self.state).stalled = why;
    }

    pub fn stalled(&self) -> Option<String> {
        lock(&self.state).stalled.clone()
    }
}

/// See [`Progress::busy`].
#[derive(Debug)]
pub struct Busy {
    progress: Arc<Progress>,
    cause: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut s = lock(&self.progress.state);
        if let Some(i) = s.busy.iter().position(|c| *c == self.cause) {
            s.busy.remove(i);
        }
    }
}

/// Why the process is not ready: each stalled role of it as `role: why`; empty when
/// every role makes progress.
pub fn not_ready() -> Vec<String> {
    lock(&REGISTRY)
        .iter()
        .filter_map(Weak::upgrade)
        .filter_map(|p| p.stalled().map(|why| format!("{}: {why}", p.role)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_holding_nothing_counts_from_its_last_partition() {
        let p = Progress::new("worker-test-held");
        assert!(p.empty_for().is_some(), "a new role holds nothing");
        p.assigned([("cmd".to_owned(), 0), ("cmd".to_owned(), 1)]);
        assert_eq!(p.empty_for(), None);
        p.revoked([("cmd".to_owned(), 0)]);
        assert_eq!(p.empty_for(), None, "it still holds cmd[1]");
        p.revoked([("cmd".to_owned(), 1)]);
        assert!(p.empty_for().is_some());
        assert!(p.held().is_empty());
    }

    #[test]
    fn a_stalled_role_makes_the_process_not_ready_until_it_recovers() {
        let p = Progress::new("sink-test-ready");
        let mine = |v: Vec<String>| {
            v.into_iter()
                .filter(|s| s.starts_with("sink-test-ready"))
                .collect::<Vec<_>>()
        };
        assert!(mine(not_ready()).is_empty());
        p.set_stalled(Some("no progress for 31 s".into()));
        assert_eq!(
            mine(not_ready()),
            vec!["sink-test-ready: no progress for 31 s"]
        );
        p.set_stalled(None);
        assert!(mine(not_ready()).is_empty());
        let busy = p.busy("restoring cmd[3]");
        assert_eq!(p.busy_with(), vec!["restoring cmd[3]"]);
        drop(busy);
        assert!(p.busy_with().is_empty());
    }
}
