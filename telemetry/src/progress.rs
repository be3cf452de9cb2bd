//! What a role of the process (a worker, the sink, the notifier) tells its watchdog: the
//! partitions it holds, that it made progress, and a known cause it is waiting on. The
//! watchdog (in the gateway crate, which talks to Kafka) judges a stall from it and marks
//! the role stalled here; `/health/ready` of the process answers from [`not_ready`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

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
    /// Held partitions the role's consumer does not fetch: since when, and when that was
    /// last said.
    unfetched: BTreeMap<(String, i32), (Instant, Option<Instant>)>,
}

/// One partition's fetch state in a consumer's statistics (librdkafka's `fetch_state`:
/// `active` while it fetches; `offset-query`, `validate-epoch-wait` and the like while it
/// cannot).
#[derive(Debug, Clone, Copy)]
pub struct FetchState<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub state: &'a str,
    /// The partition's leader as the consumer knows it (-1: none).
    pub leader: i32,
}

/// How long a held partition may go unfetched before the role says so (and again every
/// such span while it lasts).
pub const UNFETCHED_REPORT: Duration = Duration::from_secs(30);

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
                unfetched: BTreeMap::new(),
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

    /// Takes a statistics report of the role's consumer: a partition the role holds that
    /// the consumer has not fetched for [`UNFETCHED_REPORT`] (no leader known, an offset
    /// it cannot get from the group, a leader epoch it cannot validate) is said, as a
    /// warning, since nothing the role waits on would tell: its records simply never
    /// come.
    pub fn fetch_states<'a>(&self, states: impl IntoIterator<Item = FetchState<'a>>) {
        for (f, quiet) in self.unfetched_due(states, Instant::now()) {
            tracing::warn!(
                role = %self.role,
                topic = f.topic,
                partition = f.partition,
                not_fetched_s = quiet.as_secs(),
                fetch_state = f.state,
                leader = f.leader,
                "the consumer does not fetch a partition the role holds: no records come from it"
            );
        }
    }

    /// The held partitions of `states` that are due to be said at `now`, with how long
    /// each has not been fetched.
    fn unfetched_due<'a>(
        &self,
        states: impl IntoIterator<Item = FetchState<'a>>,
        now: Instant,
    ) -> Vec<(FetchState<'a>, Duration)> {
        let mut s = lock(&self.state);
        let State {
            held, unfetched, ..
        } = &mut *s;
        unfetched.retain(|tp, _| held.contains(tp));
        let mut due = Vec::new();
        for f in states {
            let tp = (f.topic.to_owned(), f.partition);
            if f.state == "active" || !held.contains(&tp) {
                unfetched.remove(&tp);
                continue;
            }
            let (since, said) = unfetched.entry(tp).or_insert((now, None));
            let quiet = now.saturating_duration_since(*since);
            if quiet >= UNFETCHED_REPORT
                && said.is_none_or(|t| now.saturating_duration_since(t) >= UNFETCHED_REPORT)
            {
                *said = Some(now);
                due.push((f, quiet));
            }
        }
        due
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
    fn a_held_partition_left_unfetched_is_said_once_every_report_span() {
        let p = Progress::new("worker-test-unfetched");
        p.assigned([("cmd".to_owned(), 3)]);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let said = |state: &str, other: &str, at: Instant| {
            let states = [
                FetchState {
                    topic: "cmd",
                    partition: 3,
                    state,
                    leader: 2,
                },
                // Not held: never said, whatever its state.
                FetchState {
                    topic: "cmd",
                    partition: 4,
                    state: other,
                    leader: 2,
                },
            ];
            p.unfetched_due(states, at)
                .into_iter()
                .map(|(f, quiet)| (f.partition, quiet.as_secs()))
                .collect::<Vec<_>>()
        };
        assert_eq!(said("offset-query", "none", t0), vec![]);
        assert_eq!(said("offset-query", "none", at(29)), vec![]);
        assert_eq!(said("validate-epoch-wait", "none", at(30)), vec![(3, 30)]);
        assert_eq!(
            said("offset-query", "none", at(45)),
            vec![],
            "said once a span"
        );
        assert_eq!(said("offset-query", "none", at(60)), vec![(3, 60)]);
        assert_eq!(said("active", "none", at(61)), vec![]);
        assert_eq!(
            said("offset-query", "none", at(62)),
            vec![],
            "a new span begins"
        );
        assert_eq!(said("offset-query", "none", at(92)), vec![(3, 30)]);
        p.revoked([("cmd".to_owned(), 3)]);
        assert_eq!(
            said("offset-query", "none", at(200)),
            vec![],
            "no longer held"
        );
    }

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
