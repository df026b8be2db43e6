//! The UDP port range: a pool of free ports shared by the media workers. Taken when a
//! connection opens, returned when it ends. A port another process holds is skipped.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Mutex;

/// Why [`PortPool::bind`] gave no socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindError {
    /// Every port of the range is in use (by this gateway or another process).
    Exhausted,
    /// No file descriptor left: for the process (`EMFILE`), or for the whole system (`ENFILE`,
    /// `system`).
    OutOfFiles { system: bool },
    /// Any other failure to open or bind a socket (no buffer space, the address gone): what
    /// the system said.
    Other(String),
}

impl BindError {
    /// What a refused client is told.
    pub fn message(&self) -> String {
        match self {
            BindError::Exhausted => "no free UDP port in the media range".into(),
            BindError::OutOfFiles { system: false } => {
                "the gateway has no file descriptor left for a media socket".into()
            }
            BindError::OutOfFiles { system: true } => {
                "the system has no file descriptor left for a media socket".into()
            }
            BindError::Other(e) => format!("cannot open a media socket: {e}"),
        }
    }
}

pub struct PortPool {
    free: Mutex<VecDeque<u16>>,
    total: usize,
}

impl PortPool {
    pub fn new(min: u16, max: u16) -> Self {
        let free: VecDeque<u16> = (min..=max).collect();
        let total = free.len();
        Self { free: Mutex::new(free), total }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn free(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Bind a non-blocking socket on the first free port that binds. Ports held elsewhere
    /// (`EADDRINUSE`, `EACCES`) go to the back of the queue and the next is tried. Any other
    /// failure (out of file descriptors, say) would fail on every port: the search stops there
    /// and the port stays first in line.
    pub fn bind(&self, ip: IpAddr) -> Result<(UdpSocket, u16), BindError> {
        use rustix::io::Errno;
        let mut free = self.free.lock().map_err(|_| BindError::Exhausted)?;
        for _ in 0..free.len() {
            let Some(port) = free.pop_front() else { break };
            let e = match UdpSocket::bind(SocketAddr::new(ip, port)).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => return Ok((s, port)),
                Err(e) => e,
            };
            match Errno::from_io_error(&e) {
                Some(Errno::ADDRINUSE | Errno::ACCESS) => free.push_back(port),
                errno => {
                    free.push_front(port);
                    return Err(match errno {
                        Some(Errno::MFILE) => BindError::OutOfFiles { system: false },
                        Some(Errno::NFILE) => BindError::OutOfFiles { system: true },
                        _ => BindError::Other(e.to_string()),
                    });
                }
            }
        }
        Err(BindError::Exhausted)
    }

    pub fn release(&self, port: u16) {
        if let Ok(mut free) = self.free.lock() {
            // Recently used ports go last, so a late datagram for an old connection is less
            // likely to reach a new one.
            free.push_back(port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhausts_and_recovers() {
        let pool = PortPool::new(47810, 47812);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let a = pool.bind(ip).unwrap();
        let b = pool.bind(ip).unwrap();
        let c = pool.bind(ip).unwrap();
        assert_eq!(pool.bind(ip).err(), Some(BindError::Exhausted));
        assert_eq!(pool.free(), 0);
        let port = b.1;
        drop(b);
        pool.release(port);
        assert_eq!(pool.bind(ip).unwrap().1, port);
        drop((a, c));
    }

    #[test]
    fn a_port_held_elsewhere_is_skipped_and_other_failures_stop_the_search() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let held = UdpSocket::bind((ip, 47815)).unwrap();
        let pool = PortPool::new(47815, 47816);
        let (_s, port) = pool.bind(ip).unwrap();
        assert_eq!(port, 47816, "the held port is skipped");
        assert_eq!(pool.bind(ip).err(), Some(BindError::Exhausted), "the held one stays held");
        drop(held);
        // An address this host does not have fails on every port: said at once, port kept.
        let pool = PortPool::new(47817, 47818);
        let err = pool.bind(IpAddr::from([192, 0, 2, 1])).unwrap_err();
        assert!(matches!(&err, BindError::Other(_)), "{err:?}");
        assert!(err.message().starts_with("cannot open a media socket: "), "{}", err.message());
        assert_eq!(pool.free(), 2, "no port lost");
    }
}
