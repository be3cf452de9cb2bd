//! CPU time and CPU placement of processes, from `/proc` and `sched_setaffinity`: what
//! `make bench` charges each component of the system under test per payment, and how it
//! keeps its load generator off the CPU it measures.

use anyhow::Context as _;
use std::path::Path;

/// The clock ticks of `/proc/<pid>/stat` per second.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The CPUs this machine has online.
pub fn online_cpus() -> usize {
    // SAFETY: as above.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and
/// parentheses, so the line is cut at its last `)`): field 3, the state, comes first.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    // The state is a letter; the numbers that matter here all come after it.
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse::<i64>().map_or(0, |v| v.max(0) as u64))
            .collect(),
    )
}

/// `(parent pid, own user + system ticks, reaped children's user + system ticks)`.
fn times(pid: u32) -> Option<(u32, u64, u64)> {
    // Counted from field 4 (ppid): utime is field 14, stime 15, cutime 16, cstime 17.
    let f = stat_fields(pid)?;
    let at = |field: usize| f.get(field - 4).copied();
    Some((
        u32::try_from(at(4)?).ok()?,
        at(14)? + at(15)?,
        at(16)? + at(17)?,
    ))
}

/// Every live process: `(pid, parent pid)`.
fn processes() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| times(pid).map(|(ppid, ..)| (pid, ppid)))
        .collect()
}

/// `root` and its live descendants.
pub fn tree(root: u32) -> Vec<u32> {
    let all = processes();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found
}

/// The CPU time, in ticks, that `root` and its descendants have used: the live ones'
/// own, and what the ones already reaped left in their parent's count (PostgreSQL's
/// postmaster reaps its backends). `None` once `root` has gone.
pub fn tree_ticks(root: u32) -> Option<u64> {
    let (_, own, reaped) = times(root)?;
    let descendants: u64 = tree(root)
        .into_iter()
        .skip(1)
        .filter_map(times)
        .map(|(_, own, reaped)| own + reaped)
        .sum();
    Some(own + reaped + descendants)
}

/// Restricts one thread (a task id of `/proc/<pid>/task`; 0: the calling thread) to
/// `cpus`. Threads and processes it starts afterwards inherit the restriction.
pub fn pin_thread(tid: u32, cpus: &[usize]) -> anyhow::Result<()> {
    let online = online_cpus();
    anyhow::ensure!(
        !cpus.is_empty() && cpus.iter().all(|c| *c < online),
        "CPUs {cpus:?} are not all online (this machine has {online})"
    );
    // SAFETY: the set is a plain bit mask, zeroed, then bits set below the number of
    // CPUs online (far within its size); the call only reads it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus {
            libc::CPU_SET(*c, &mut set);
        }
        libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set)
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // A thread that ended meanwhile has nothing left to pin.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e).with_context(|| format!("pinning thread {tid} to CPUs {cpus:?}"));
        }
    }
    Ok(())
}

/// Restricts every thread of process `pid` (not its children) to `cpus`; returns how
/// many threads it pinned.
pub fn pin_process(pid: u32, cpus: &[usize]) -> anyhow::Result<usize> {
    let tids = threads(pid);
    for tid in &tids {
        pin_thread(*tid, cpus)?;
    }
    Ok(tids.len())
}

/// Restricts every thread of `root` and of its live descendants to `cpus`; returns how
/// many threads it pinned. Threads and processes they start later inherit it (a new
/// PostgreSQL backend, a broker's new thread).
pub fn pin_tree(root: u32, cpus: &[usize]) -> anyhow::Result<usize> {
    let mut pinned = 0;
    for pid in tree(root) {
        pinned += pin_process(pid, cpus)?;
    }
    anyhow::ensure!(pinned > 0, "process {root} has gone: nothing to pin");
    Ok(pinned)
}

/// The CPU time, in ticks, of process `pid` alone (its threads, not its children).
pub fn own_ticks(pid: u32) -> Option<u64> {
    times(pid).map(|(_, own, _)| own)
}

/// The task ids of a process's threads (none once it has gone).
fn threads(pid: u32) -> Vec<u32> {
    let dir = Path::new("/proc").join(pid.to_string()).join("task");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The CPUs a thread may run on (0: the calling thread), as `sched_getaffinity` says.
pub fn affinity(tid: u32) -> anyhow::Result<Vec<usize>> {
    // SAFETY: the set is zeroed and sized for the call, which writes into it.
    let (r, set) = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let r = libc::sched_getaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &mut set);
        (r, set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the CPUs of thread {tid}"));
    }
    // SAFETY: CPU_ISSET reads a bit of an initialised set, within its size.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_child_is_counted_in_its_parents_tree_and_pinned_with_it() {
        // A shell that starts a busy child: the child's time is the tree's.
        let mut sh = std::process::Command::new("sh")
            .arg("-c")
            .arg("sh -c 'i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 30' & wait")
            .spawn()
            .expect("sh starts");
        let root = sh.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut ticks = 0;
        while ticks < 5 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ticks = tree_ticks(root).expect("the shell is running");
        }
        assert!(
            ticks >= 5,
            "the busy child's CPU time was not counted: {ticks} ticks"
        );
        let family = tree(root);
        assert!(family.len() >= 2, "the child was not found: {family:?}");
        let own = own_ticks(root).unwrap_or(0);
        assert!(
            own < ticks,
            "the tree's time ({ticks}) is the parent's own ({own}): the child's is missing"
        );
        let cpu = online_cpus() - 1;
        assert!(pin_tree(root, &[cpu]).expect("pinning") >= 2);
        for pid in &family {
            assert_eq!(affinity(*pid).expect("reading the affinity"), vec![cpu]);
        }
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .args(tree(root).iter().rev().map(u32::to_string))
            .status();
        let _ = sh.wait();
        assert_eq!(
            tree_ticks(u32::MAX),
            None,
            "a process that does not exist has no time"
        );
        assert!(
            pin_thread(0, &[online_cpus()]).is_err(),
            "a CPU not online is refused"
        );
        assert!(
            pin_thread(0, &[]).is_err(),
            "an empty set of CPUs is refused"
        );
    }
}
