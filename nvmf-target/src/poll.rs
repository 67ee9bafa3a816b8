//! Adaptive polling of one queue's socket: for a short window after the queue was last active,
//! the connection checks its socket with non-blocking reads instead of sleeping in epoll, so a
//! host that sends its next command soon (a QD1 loop, a queue that just drained) finds the
//! target awake and pays no wake-up. Once the window passes without data the queue sleeps in
//! epoll as before: polling runs only while I/O flows, and an idle target uses no CPU.
//!
//! The reads go through a duplicate of the socket's descriptor (one open file description, so
//! the same non-blocking flag and the same byte stream): tokio's own reads answer "would block"
//! from its cached readiness without asking the kernel until epoll reports the socket, which is
//! exactly the wake-up polling avoids. Taking bytes behind tokio's back is harmless: its cached
//! readiness at worst costs one read that finds nothing and clears it.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Most bytes one polling read takes (the rest of a large PDU follows through the normal path).
const POLL_READ: usize = 64 * 1024;

/// The polling state of one connection.
#[derive(Debug)]
pub struct Poller {
    /// The socket, read directly (`None` when polling is off or the descriptor could not be
    /// duplicated: the queue then always sleeps in epoll).
    sock: Option<std::net::TcpStream>,
    /// What one polling read lands in, allocated (and zeroed) once per connection; only the bytes
    /// read are copied to the caller's buffer.
    scratch: Vec<u8>,
    window: Duration,
    /// When the queue last received data or completed commands.
    last_active: Instant,
}

/// What a polling episode found.
#[derive(Debug)]
pub enum Polled {
    /// Bytes were appended to the buffer (their count), or the read failed, or the host closed
    /// the connection (`Ok(0)`): as a read of the socket would report them.
    Read(std::io::Result<usize>),
    /// The window passed with nothing to read: sleep in epoll.
    Quiet,
}

impl Poller {
    /// Polling for `stream` with `window` (zero: never poll).
    pub fn new(stream: &TcpStream, window: Duration) -> Poller {
        let sock = if window.is_zero() { None } else { stream.as_fd().try_clone_to_owned().ok().map(std::net::TcpStream::from) };
        let scratch = if sock.is_some() { vec![0; POLL_READ] } else { Vec::new() };
        Poller { sock, scratch, window, last_active: Instant::now() }
    }

    /// Notes activity (data received, commands completed): the window starts again.
    pub fn active(&mut self) {
        if self.sock.is_some() {
            self.last_active = Instant::now();
        }
    }

    /// Whether the queue is inside its window and should poll rather than sleep.
    pub fn hot(&self) -> bool {
        self.sock.is_some() && self.last_active.elapsed() < self.window
    }

    /// Polls until data arrives or the window passes, yielding to the runtime between reads so
    /// that other queues on this worker run and the I/O driver is polled (without sleeping).
    /// Appends what arrives to `buf`.
    pub async fn poll(&mut self, buf: &mut BytesMut) -> Polled {
        let Some(sock) = self.sock.as_mut() else { return Polled::Quiet };
        loop {
            match sock.read(&mut self.scratch) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.last_active.elapsed() >= self.window {
                        return Polled::Quiet;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(n) => {
                    buf.extend_from_slice(self.scratch.get(..n).unwrap_or_default());
                    return Polled::Read(Ok(n));
                }
                Err(e) => return Polled::Read(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn polling_reads_what_arrives_within_the_window() {
        let (mut host, target) = pair().await;
        let mut p = Poller::new(&target, Duration::from_secs(30));
        assert!(p.hot());
        let mut buf = BytesMut::from(&b"kept"[..]);
        let writer = tokio::spawn(async move {
            host.write_all(b"command").await.unwrap();
            host
        });
        let mut got = 0;
        while got < 7 {
            match p.poll(&mut buf).await {
                Polled::Read(Ok(n)) => got += n,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(&buf[..], b"keptcommand");
        // The host closes: a read of 0, as from the socket itself.
        drop(writer.await.unwrap());
        assert!(matches!(p.poll(&mut buf).await, Polled::Read(Ok(0))));
        assert_eq!(&buf[..], b"keptcommand");
    }

    #[tokio::test]
    async fn a_quiet_socket_ends_the_window_and_leaves_the_buffer_alone() {
        let (_host, target) = pair().await;
        let mut p = Poller::new(&target, Duration::from_millis(2));
        let mut buf = BytesMut::from(&b"x"[..]);
        assert!(matches!(p.poll(&mut buf).await, Polled::Quiet));
        assert!(!p.hot(), "the window has passed");
        assert_eq!(&buf[..], b"x");
        p.active();
        assert!(p.hot(), "activity opens the window again");
    }

    #[tokio::test]
    async fn a_zero_window_never_polls() {
        let (_host, target) = pair().await;
        let mut p = Poller::new(&target, Duration::ZERO);
        p.active();
        assert!(!p.hot());
        let mut buf = BytesMut::new();
        assert!(matches!(p.poll(&mut buf).await, Polled::Quiet));
    }
}
