//! CPU and memory of the gateway and of the load tester itself: from `/proc/<pid>` when the
//! gateway's pid is known (same machine), else from the gateway's `/metrics` (`process_*` from
//! the Prometheus process collector, which reads the same `/proc` files). Also the gateway's
//! forwarded-packet counter, for CPU per forwarded packet.

use std::time::Instant;

use crate::api::{metric_sum, Api};

/// Linux reports process CPU times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux supports (the kernel's `CLOCKS_PER_SEC` for `/proc`).
const USER_HZ: f64 = 100.0;

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    /// User + system CPU seconds since the process started.
    pub cpu_s: f64,
    pub rss_bytes: u64,
    /// Seconds its threads were runnable but waited for a CPU (scheduler run-queue time, summed
    /// over threads); `None` when unknown (from `/metrics`).
    pub wait_s: Option<f64>,
}

/// CPU seconds and RSS of a process from `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn read_proc(pid: &str) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5), counted from 1 with `pid` and `comm` first.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        at: Instant::now(),
        cpu_s: (utime + stime) / USER_HZ,
        rss_bytes: rss_kb * 1024,
        wait_s: run_queue_wait(pid),
    })
}

/// Time the process's threads spent runnable but not running (second field of
/// `/proc/<pid>/task/<tid>/schedstat`, ns), summed: how much other load on the machine delayed it.
fn run_queue_wait(pid: &str) -> Option<f64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        total += text.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(total as f64 / 1e9)
}

/// CPU time the hypervisor gave to other guests while this machine's CPUs wanted to run
/// (`steal`, the 8th value of the `cpu` line of `/proc/stat`): seconds summed over CPUs, and the
/// number of CPUs. A guest's own accounting cannot see it — processes look as if they ran — so a
/// busy host shows up here only, as slower packets and higher latency on the same load.
#[derive(Debug, Clone, Copy)]
pub struct StealSample {
    pub at: Instant,
    pub steal_s: f64,
    pub cpus: usize,
}

pub fn read_steal() -> Option<StealSample> {
    parse_steal(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_steal(stat: &str) -> Option<StealSample> {
    let total = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq steal guest guest_nice
    let steal: f64 = total.split_whitespace().nth(8)?.parse().ok()?;
    let cpus =
        stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
    Some(StealSample { at: Instant::now(), steal_s: steal / USER_HZ, cpus: cpus.max(1) })
}

/// Percent of the machine's CPU time (all CPUs) stolen between two readings.
pub fn steal_pct(a: &StealSample, b: &StealSample) -> Option<f64> {
    let wall = b.at.saturating_duration_since(a.at).as_secs_f64();
    (wall > 0.0).then(|| ((b.steal_s - a.steal_s).max(0.0) / (wall * b.cpus as f64) * 100.0).min(100.0))
}

/// The gateway as seen at one moment.
#[derive(Debug, Clone, Copy)]
pub struct GatewaySample {
    pub proc: Option<ProcSample>,
    /// `gateway_rtp_packets_total{direction="out"}` (all kinds), when `/metrics` answered.
    pub packets_out: Option<f64>,
    pub packets_in: Option<f64>,
}

/// Where gateway CPU figures come from.
#[derive(Debug, Clone)]
pub enum Source {
    Proc(String),
    Metrics,
}

impl Source {
    pub fn name(&self) -> &'static str {
        match self {
            Source::Proc(_) => "proc",
            Source::Metrics => "metrics",
        }
    }
}

pub async fn sample_gateway(api: &Api, source: &Source) -> GatewaySample {
    let text = api.metrics().await.ok();
    let from_metrics = |name: &str, labels: &[&str]| text.as_deref().and_then(|t| metric_sum(t, name, labels));
    let packets_out = from_metrics("gateway_rtp_packets_total", &["direction=\"out\""]);
    let packets_in = from_metrics("gateway_rtp_packets_total", &["direction=\"in\""]);
    let proc = match source {
        Source::Proc(pid) => read_proc(pid),
        Source::Metrics => {
            match (from_metrics("process_cpu_seconds_total", &[]), from_metrics("process_resident_memory_bytes", &[])) {
                (Some(cpu_s), Some(rss)) => {
                    Some(ProcSample { at: Instant::now(), cpu_s, rss_bytes: rss as u64, wait_s: None })
                }
                _ => None,
            }
        }
    };
    GatewaySample { proc, packets_out, packets_in }
}

/// The pid of the one process whose name (`/proc/<pid>/comm`) is `name`; an error if there
/// is none or more than one.
pub fn find_pid(name: &str) -> anyhow::Result<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if std::fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim_end() == name) {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => Ok(pid),
        [] => anyhow::bail!("no process named {name} on this machine"),
        _ => anyhow::bail!("{} processes named {name} ({found:?})", found.len()),
    }
}

/// CPU percent (100 = one core) between two readings.
pub fn cpu_pct(a: &ProcSample, b: &ProcSample) -> f64 {
    let wall = b.at.saturating_duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    (b.cpu_s - a.cpu_s).max(0.0) / wall * 100.0
}

/// Percent of the time between two readings its threads waited for a CPU (100 = one thread
/// waiting all the time).
pub fn wait_pct(a: &ProcSample, b: &ProcSample) -> Option<f64> {
    let wall = b.at.saturating_duration_since(a.at).as_secs_f64();
    match (a.wait_s, b.wait_s) {
        (Some(x), Some(y)) if wall > 0.0 => Some((y - x).max(0.0) / wall * 100.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let s = read_proc("self").expect("/proc/self");
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_s >= 0.0);
        assert!(s.wait_s.is_some());
    }

    #[test]
    fn finds_a_process_by_name() {
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        // Test threads run in parallel in other test binaries of the same name only rarely;
        // the name of this binary is unique enough, but tolerate duplicates.
        match find_pid(comm.trim_end()) {
            Ok(pid) => assert_eq!(pid, std::process::id()),
            Err(e) => assert!(e.to_string().contains("processes named"), "{e}"),
        }
        assert!(find_pid("no-such-process-name-here").is_err());
    }

    #[test]
    fn steal_from_proc_stat() {
        let stat = "cpu  100 0 50 1000 5 0 2 300 0 0\ncpu0 50 0 25 500 2 0 1 150 0 0\ncpu1 50 0 25 500 3 0 1 150 0 0\nintr 1 2\n";
        let a = parse_steal(stat).expect("cpu line");
        assert_eq!(a.cpus, 2);
        assert!((a.steal_s - 3.0).abs() < 1e-9);
        // 1 s later 0.5 s more stolen over 2 CPUs: 25% of the machine's CPU time.
        let b = StealSample { at: a.at + std::time::Duration::from_secs(1), steal_s: 3.5, cpus: 2 };
        assert!((steal_pct(&a, &b).unwrap() - 25.0).abs() < 1e-9);
        assert!(read_steal().is_some(), "/proc/stat of this machine");
    }
}
