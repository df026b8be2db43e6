//! The process's open-file limit. Every connection holds file descriptors: its UDP socket
//! (unless `media.mux`), the participant's WebSocket, an ICE-TCP stream. A process started from a
//! shell gets a soft limit of 1,024 on most Linux systems, which a few hundred participants
//! use up, while the hard limit is far higher (524,288 with systemd's defaults). As servers
//! commonly do, the gateway raises its soft limit to the hard one when it starts
//! ([`raise_open_files`]) and says what it has, with a warning when the configuration could use
//! more ([`needed_open_files`]).

use std::io;

use crate::config::GatewayConfig;

/// Linux refuses a `RLIMIT_NOFILE` above `fs.nr_open` (1,048,576 by default; systemd raises
/// it), even when the hard limit reads "unlimited"; the raise stops at this many anyway, far
/// more than any gateway uses.
const CEILING: u64 = 1 << 20;

/// What the soft limit is raised to: the hard limit, at most `fs.nr_open` and [`CEILING`].
fn target(hard: u64) -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|v| v.trim().parse().ok());
    hard.min(CEILING).min(nr_open.unwrap_or(CEILING))
}

/// Descriptors the process holds besides connections: listeners, the runtime, log files, the
/// metrics collector's reads of `/proc`, a shared media socket per worker.
const BASE: u64 = 64;

/// The open-file limit before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub before: u64,
    pub now: u64,
    pub hard: u64,
}

fn limit(v: Option<u64>) -> u64 {
    v.unwrap_or(CEILING)
}

/// Raise the soft open-file limit to the hard limit (at most `fs.nr_open` and [`CEILING`]).
/// Never lowers it.
pub fn raise_open_files() -> io::Result<OpenFiles> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let r = getrlimit(Resource::Nofile);
    let (before, hard) = (limit(r.current), limit(r.maximum));
    let want = target(hard);
    if want <= before {
        return Ok(OpenFiles { before, now: before, hard });
    }
    setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: r.maximum }).map_err(io::Error::from)?;
    let now = limit(getrlimit(Resource::Nofile).current);
    Ok(OpenFiles { before, now, hard })
}

/// Descriptors the configuration can use at full load, when that is bounded: with a socket per
/// connection, every port of the media range in use, a WebSocket or ICE-TCP stream for each
/// (a participant's two connections share one WebSocket; counting one per connection leaves
/// room for ICE-TCP streams and HTTP clients), plus [`BASE`]. `None` with `media.mux`, where
/// connections share their worker's socket and nothing in the configuration bounds them.
pub fn needed_open_files(cfg: &GatewayConfig) -> Option<u64> {
    if cfg.media.mux {
        return None;
    }
    let ports = u64::from(cfg.media.port_max - cfg.media.port_min) + 1;
    Some(2 * ports + BASE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_follows_the_port_range_and_is_unbounded_with_mux() {
        let mut cfg = GatewayConfig::default();
        cfg.media.port_min = 40000;
        cfg.media.port_max = 40999;
        assert_eq!(needed_open_files(&cfg), Some(2 * 1000 + BASE));
        cfg.media.port_max = 40000;
        assert_eq!(needed_open_files(&cfg), Some(2 + BASE));
        cfg.media.mux = true;
        assert_eq!(needed_open_files(&cfg), None);
    }

    #[test]
    fn raising_never_lowers_and_reaches_the_hard_limit() {
        // The test process's own limit: raising it is harmless (and idempotent).
        let first = raise_open_files().expect("getrlimit/setrlimit");
        assert!(first.now >= first.before, "{first:?}");
        assert_eq!(
            first.now,
            first.before.max(target(first.hard)),
            "the soft limit is raised to the hard one, unless it was already above: {first:?}"
        );
        let again = raise_open_files().expect("second call");
        assert_eq!((again.before, again.now), (first.now, first.now), "a second raise changes nothing");
    }
}
