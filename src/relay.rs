//! The relay: bytes both ways between a client and a backend until both directions are done.
//!
//! One future per connection, one buffer per direction, no task per direction and no split: the
//! future polls both directions in turn. When a read side reaches end of file, the opposite write
//! side is flushed and closed exactly once (a half-close, which the peer sees as a FIN); the relay
//! completes when both directions are closed or either side fails, and reports the bytes moved.
//! A per-poll budget keeps one busy direction from starving the other.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

/// Bytes read per buffer fill. 16 KiB matches a TLS record and a typical socket read, so a bulk
/// transfer needs few system calls while an idle tunnel holds no buffer at all (see [`Direction`]).
const BUF_SIZE: usize = 16 * 1024;

/// Buffer fills one direction may do in one poll before it yields. 16 × 16 KiB = 256 KiB: enough
/// to keep a bulk transfer efficient, small enough that the other direction (and other tasks on
/// the same thread) get their turn within a fraction of a millisecond.
const BUDGET: u32 = 16;

/// Which peer of a relayed connection something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The peer that connected to the proxy.
    Client,
    /// The peer the proxy connected to.
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// What a finished relay did.
#[derive(Debug)]
pub struct Report {
    /// Bytes written to the backend (including any bytes handed over with [`Relay::pending`]).
    pub client_to_backend: u64,
    /// Bytes written to the client (including any bytes handed over with [`Relay::pending`]).
    pub backend_to_client: u64,
    /// `Ok` when both directions ended with a close; otherwise the first failure and whose
    /// socket it was on.
    pub result: Result<(), (Side, io::Error)>,
    /// Which peer closed its side first (sent end of file), if either did.
    pub first_to_close: Option<Side>,
}

/// One direction of the relay: reads from one peer, writes to the other.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes read and not yet written are `buf[start..end]`. Empty until the first read, so a
    /// tunnel that never carries traffic in this direction holds no memory for it.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The reader reached end of file.
    eof: bool,
    /// Bytes were written since the last flush.
    dirty: bool,
    /// The writer was closed; this direction is over.
    closed: bool,
    /// Bytes written so far.
    moved: u64,
}

/// Which half of a direction failed: its reader's peer or its writer's peer.
enum Failure {
    Read(io::Error),
    Write(io::Error),
}

impl Direction {
    fn with_pending(bytes: Vec<u8>) -> Self {
        let end = bytes.len();
        Direction {
            buf: bytes,
            end,
            ..Direction::default()
        }
    }

    /// Moves bytes until the reader or writer would block, the budget runs out (then the task is
    /// woken again at once), or the direction is over (`Ready(Ok)`).
    fn poll_move<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<Result<(), Failure>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        let mut budget = BUDGET;
        loop {
            if self.start < self.end {
                match w.as_mut().poll_write(cx, &self.buf[self.start..self.end]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Failure::Write(io::ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        self.moved += n as u64;
                        self.dirty = true;
                        if self.start == self.end {
                            self.start = 0;
                            self.end = 0;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            } else if !self.eof {
                if budget == 0 {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                budget -= 1;
                if self.buf.len() < BUF_SIZE {
                    self.buf.resize(BUF_SIZE, 0);
                }
                match r.as_mut().poll_read(cx, &mut self.buf) {
                    Poll::Ready(Ok(0)) => self.eof = true,
                    Poll::Ready(Ok(n)) => self.end = n,
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                    Poll::Pending => {
                        // Nothing more to read for now: push out what a buffering writer (TLS)
                        // may still hold, so the peer is not kept waiting for bytes we relayed.
                        if self.dirty {
                            match w.as_mut().poll_flush(cx) {
                                Poll::Ready(Ok(())) => self.dirty = false,
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Write(e))),
                                Poll::Pending => {}
                            }
                        }
                        return Poll::Pending;
                    }
                }
            } else {
                // End of file and every byte written: close the write side once. poll_close
                // flushes first.
                return match w.as_mut().poll_close(cx) {
                    Poll::Ready(result) => {
                        self.closed = true;
                        self.buf = Vec::new();
                        match result {
                            // The peer is already gone for writing; the half-close has nothing
                            // left to tell it.
                            Err(e) if e.kind() != io::ErrorKind::NotConnected => {
                                Poll::Ready(Err(Failure::Write(e)))
                            }
                            _ => Poll::Ready(Ok(())),
                        }
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
        }
    }
}

/// The relay future: see the [module documentation](self).
///
/// # Examples
///
/// ```no_run
/// # smol::block_on(async {
/// let mut client = async_net::TcpStream::connect("127.0.0.1:7000").await?;
/// let mut backend = async_net::TcpStream::connect("127.0.0.1:9000").await?;
/// let report = portcullis::Relay::new(&mut client, &mut backend).await;
/// println!("{} bytes up, {} down", report.client_to_backend, report.backend_to_client);
/// # std::io::Result::Ok(()) });
/// ```
#[derive(Debug)]
pub struct Relay<'a, C: ?Sized, B: ?Sized> {
    client: &'a mut C,
    backend: &'a mut B,
    up: Direction,
    down: Direction,
    /// Where the total of bytes moved is published, for an idle timeout watching from outside.
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Which peer closed first.
    first_to_close: Option<Side>,
}

impl<'a, C, B> Relay<'a, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    /// A relay between `client` and `backend`.
    pub fn new(client: &'a mut C, backend: &'a mut B) -> Self {
        Relay {
            client,
            backend,
            up: Direction::default(),
            down: Direction::default(),
            progress: None,
            first_to_close: None,
        }
    }

    /// Bytes already read from one side that belong to the tunnel (e.g. frames that arrived in
    /// the same segment as an HTTP head): they are written before anything else in their
    /// direction and counted like relayed bytes.
    pub fn pending(mut self, to_backend: Vec<u8>, to_client: Vec<u8>) -> Self {
        self.up = Direction::with_pending(to_backend);
        self.down = Direction::with_pending(to_client);
        self
    }

    /// Publishes the bytes moved so far (both ways together) to `progress` after every poll,
    /// so an idle timeout can tell a quiet tunnel from a busy one without a timer in here.
    pub fn progress(mut self, progress: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// What the relay has done so far, for a caller that ends it early (a timeout).
    pub fn report_so_far(&self, result: Result<(), (Side, io::Error)>) -> Report {
        self.report(result)
    }

    fn report(&self, result: Result<(), (Side, io::Error)>) -> Report {
        Report {
            client_to_backend: self.up.moved,
            backend_to_client: self.down.moved,
            result,
            first_to_close: self.first_to_close,
        }
    }
}

impl<C, B> Future for Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = Report;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Report> {
        let this = self.get_mut();
        let polled = this.poll_both(cx);
        if this.first_to_close.is_none() {
            if this.up.eof {
                this.first_to_close = Some(Side::Client);
            } else if this.down.eof {
                this.first_to_close = Some(Side::Backend);
            }
        }
        if let Some(p) = &this.progress {
            p.store(
                this.up.moved + this.down.moved,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        polled.map(|mut report| {
            report.first_to_close = this.first_to_close;
            report
        })
    }
}

impl<C, B> Relay<'_, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    fn poll_both(&mut self, cx: &mut Context<'_>) -> Poll<Report> {
        let this = self;
        let up = this.up.poll_move(
            cx,
            Pin::new(&mut *this.client),
            Pin::new(&mut *this.backend),
        );
        if let Poll::Ready(Err(f)) = up {
            let failure = match f {
                Failure::Read(e) => (Side::Client, e),
                Failure::Write(e) => (Side::Backend, e),
            };
            return Poll::Ready(this.report(Err(failure)));
        }
        let down = this.down.poll_move(
            cx,
            Pin::new(&mut *this.backend),
            Pin::new(&mut *this.client),
        );
        if let Poll::Ready(Err(f)) = down {
            let failure = match f {
                Failure::Read(e) => (Side::Backend, e),
                Failure::Write(e) => (Side::Client, e),
            };
            return Poll::Ready(this.report(Err(failure)));
        }
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(this.report(Ok(())));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a test peer saw: the bytes written to it and how often its write side was closed.
    #[derive(Default, Debug)]
    struct Seen {
        written: Vec<u8>,
        closes: usize,
    }

    /// An in-memory peer: reads come from `input` in `chunk`-sized pieces (endless when
    /// `endless`), then EOF or `read_error`; writes are recorded, or fail with `write_error`.
    struct Peer {
        input: Vec<u8>,
        chunk: usize,
        endless: bool,
        read_error: Option<io::ErrorKind>,
        write_error: Option<io::ErrorKind>,
        seen: Arc<Mutex<Seen>>,
    }

    impl Peer {
        fn new(input: &[u8]) -> (Self, Arc<Mutex<Seen>>) {
            let seen = Arc::new(Mutex::new(Seen::default()));
            let peer = Peer {
                input: input.to_vec(),
                chunk: 7,
                endless: false,
                read_error: None,
                write_error: None,
                seen: seen.clone(),
            };
            (peer, seen)
        }
    }

    impl AsyncRead for Peer {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            if self.endless {
                let n = buf.len().min(self.chunk);
                buf[..n].fill(b'x');
                return Poll::Ready(Ok(n));
            }
            if self.input.is_empty() {
                return Poll::Ready(self.read_error.map_or(Ok(0), |k| Err(k.into())));
            }
            let n = buf.len().min(self.chunk).min(self.input.len());
            buf[..n].copy_from_slice(&self.input[..n]);
            self.input.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Peer {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if let Some(k) = self.write_error {
                return Poll::Ready(Err(k.into()));
            }
            // Accept at most 5 bytes per call, so partial writes are exercised.
            let n = buf.len().min(5);
            self.seen
                .lock()
                .unwrap()
                .written
                .extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.seen.lock().unwrap().closes += 1;
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn bytes_cross_both_ways_and_each_side_is_closed_exactly_once() {
        let up: Vec<u8> = (0..=255).cycle().take(100_000).collect();
        let down = b"the backend's answer".to_vec();
        let (mut client, client_seen) = Peer::new(&up);
        let (mut backend, backend_seen) = Peer::new(&down);
        let report = futures_lite::future::block_on(Relay::new(&mut client, &mut backend));
        assert!(report.result.is_ok(), "{report:?}");
        assert_eq!(report.client_to_backend, up.len() as u64);
        assert_eq!(report.backend_to_client, down.len() as u64);
        assert_eq!(backend_seen.lock().unwrap().written, up);
        assert_eq!(client_seen.lock().unwrap().written, down);
        assert_eq!(client_seen.lock().unwrap().closes, 1);
        assert_eq!(backend_seen.lock().unwrap().closes, 1);
    }

    #[test]
    fn pending_bytes_go_first_and_are_counted() {
        let (mut client, client_seen) = Peer::new(b" world");
        let (mut backend, backend_seen) = Peer::new(b" frame");
        let relay =
            Relay::new(&mut client, &mut backend).pending(b"hello".to_vec(), b"101 +".to_vec());
        let report = futures_lite::future::block_on(relay);
        assert_eq!(backend_seen.lock().unwrap().written, b"hello world");
        assert_eq!(client_seen.lock().unwrap().written, b"101 + frame");
        assert_eq!(
            (report.client_to_backend, report.backend_to_client),
            (11, 11)
        );
    }

    #[test]
    fn failures_name_the_side_whose_socket_failed() {
        let cases = [
            (Some(io::ErrorKind::ConnectionReset), None, Side::Client),
            (None, Some(io::ErrorKind::BrokenPipe), Side::Backend),
        ];
        for (client_read, backend_write, side) in cases {
            let (mut client, _) = Peer::new(b"data");
            client.read_error = client_read;
            let (mut backend, _) = Peer::new(b"");
            backend.write_error = backend_write;
            // Keep the backend's read side open so only the failure can end the relay.
            backend.endless = client_read.is_some();
            backend.chunk = 1;
            let report = futures_lite::future::block_on(Relay::new(&mut client, &mut backend));
            match report.result {
                Err((s, _)) => assert_eq!(s, side),
                Ok(()) => panic!("expected a failure on the {side} side"),
            }
        }
    }

    #[test]
    fn an_endless_direction_does_not_starve_the_other() {
        let (mut client, client_seen) = Peer::new(b"");
        client.endless = true;
        client.chunk = BUF_SIZE;
        let (mut backend, _) = Peer::new(b"reply");
        let mut relay = Relay::new(&mut client, &mut backend);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..3 {
            assert!(Pin::new(&mut relay).poll(&mut cx).is_pending());
        }
        drop(relay);
        assert_eq!(client_seen.lock().unwrap().written, b"reply");
        assert_eq!(client_seen.lock().unwrap().closes, 1);
    }
}
