//! The UDP port range: a pool of free ports shared by the media workers. Taken when a
//! connection opens, returned when it ends. A port another process holds is skipped.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Mutex;

/// Why [`PortPool::bind`] gave no socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// Every port of the range is in use (by this gateway or another process).
    Exhausted,
    /// The process (`EMFILE`) or the system (`ENFILE`) has no file descriptor left.
    OutOfFiles,
}

/// An error that means no more file descriptors, for the process or the whole system.
pub fn out_of_files(e: &std::io::Error) -> bool {
    let errno = rustix::io::Errno::from_io_error(e);
    errno == Some(rustix::io::Errno::MFILE) || errno == Some(rustix::io::Errno::NFILE)
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

    /// Bind a non-blocking socket on the first free port that binds. Ports that fail to bind
    /// (held elsewhere) go to the back of the queue. When the process is out of file
    /// descriptors no port would bind: the search stops at the first such failure and the port
    /// stays first in line.
    pub fn bind(&self, ip: IpAddr) -> Result<(UdpSocket, u16), BindError> {
        let mut free = self.free.lock().map_err(|_| BindError::Exhausted)?;
        for _ in 0..free.len() {
            let Some(port) = free.pop_front() else { break };
            match UdpSocket::bind(SocketAddr::new(ip, port)) {
                Ok(s) if s.set_nonblocking(true).is_ok() => return Ok((s, port)),
                Err(e) if out_of_files(&e) => {
                    free.push_front(port);
                    return Err(BindError::OutOfFiles);
                }
                _ => free.push_back(port),
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
}
