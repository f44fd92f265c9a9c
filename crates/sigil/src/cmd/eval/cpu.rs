//! CPU time from /proc: of this process's threads with a given name, of a process tree, and
//! of the whole machine.
//!
//! A task's time comes from its `schedstat` (nanoseconds on the CPU) where the kernel has it,
//! else from `stat` (clock ticks, 10 ms apiece: a small run of a fast enforcer can take less
//! than one, and would read as none).
use std::path::Path;
use std::time::Duration;

fn ticks() -> f64 {
    let t = rustix::param::clock_ticks_per_second();
    if t == 0 { 100.0 } else { t as f64 }
}

/// utime + stime of a /proc `stat` line (fields 14 and 15, counted after the `(comm)`).
fn stat_cpu(stat: &str) -> Option<(u64, i64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); field n is f[n - 3].
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime, ppid))
}

/// Nanoseconds on the CPU, the first field of a `schedstat` line.
fn schedstat_ns(line: &str) -> Option<u64> {
    line.split_whitespace().next()?.parse().ok()
}

/// CPU time of the task (or process) at `/proc/<..>` `dir` from its `stat`, and its parent.
fn stat_time(dir: &Path) -> Option<(Duration, i64)> {
    let (t, ppid) = std::fs::read_to_string(dir.join("stat"))
        .ok()
        .and_then(|s| stat_cpu(&s))?;
    Some((Duration::from_secs_f64(t as f64 / ticks()), ppid))
}

/// Time on the CPU of the task at `dir` (`/proc/<pid>/task/<tid>`), from its `schedstat`.
fn schedstat(dir: &Path) -> Option<Duration> {
    let s = std::fs::read_to_string(dir.join("schedstat")).ok()?;
    schedstat_ns(&s).map(Duration::from_nanos)
}

/// CPU time of one task (a thread's `/proc/<pid>/task/<tid>` directory).
fn task_time(dir: &Path) -> Option<Duration> {
    schedstat(dir).or_else(|| stat_time(dir).map(|(t, _)| t))
}

/// CPU time of a whole process: its live threads' `schedstat`, or its `stat` (which also
/// counts threads that have exited) where one of them has none.
fn process_time(dir: &Path) -> Option<Duration> {
    let threads: Option<Vec<Duration>> = std::fs::read_dir(dir.join("task"))
        .ok()
        .and_then(|tasks| tasks.flatten().map(|t| schedstat(&t.path())).collect());
    match threads {
        Some(t) if !t.is_empty() => Some(t.iter().sum()),
        _ => stat_time(dir).map(|(t, _)| t),
    }
}

/// CPU time of this process's threads named `name`.
pub(super) fn threads_named(name: &str) -> Duration {
    let mut total = Duration::ZERO;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            total += task_time(&t.path()).unwrap_or_default();
        }
    }
    total
}

/// CPU time of process `pid` and its live children (nginx's workers).
pub(super) fn tree(pid: u32) -> Duration {
    let mut total = Duration::ZERO;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for p in dir.flatten() {
            let Some(n) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Some((_, ppid)) = stat_time(&p.path()) else {
                continue;
            };
            if n == pid || u32::try_from(ppid).ok() == Some(pid) {
                total += process_time(&p.path()).unwrap_or_default();
            }
        }
    }
    total
}

/// (busy, total) jiffies of the whole machine, from the first line of /proc/stat.
pub(super) fn machine() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// The machine's utilization between two [`machine`] readings (0–1).
pub(super) fn utilization(a: (u64, u64), b: (u64, u64)) -> f64 {
    let busy = b.0.saturating_sub(a.0) as f64;
    let total = b.1.saturating_sub(a.1) as f64;
    if total > 0.0 { busy / total } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let line = "42 (my (odd) name) S 7 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 1 0";
        assert_eq!(stat_cpu(line), Some((281, 7)));
        assert_eq!(stat_cpu("garbage"), None);
        assert_eq!(schedstat_ns("317927 0 2\n"), Some(317_927));
        assert_eq!(schedstat_ns(""), None);
    }

    #[test]
    fn cpu_time_is_read_finer_than_a_clock_tick() {
        // `stat` counts in clock ticks (10 ms): a thread's first non-zero reading there is a
        // whole tick. Spin on a thread of its own until its time reads non-zero: it must be
        // less than a tick (CPU time, so a loaded machine only makes the wait longer).
        let t = std::thread::Builder::new()
            .name("sigil-cpu-probe".into())
            .spawn(|| {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let mut x = 0u64;
                loop {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
                    }
                    let used = threads_named("sigil-cpu-probe");
                    if used > Duration::ZERO || std::time::Instant::now() > deadline {
                        return used;
                    }
                }
            })
            .unwrap();
        let first = t.join().unwrap();
        assert!(first > Duration::ZERO, "never read");
        assert!(first < Duration::from_millis(9), "{first:?}: a whole tick");
    }

    #[test]
    fn this_process_has_cpu_time_and_the_machine_is_read() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(tree(std::process::id()) > Duration::ZERO);
        let (busy, total) = machine();
        assert!(total > 0 && busy <= total);
    }
}
