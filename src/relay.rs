//! The relay: bytes both ways between a client and a backend until both directions are done.
//!
//! One future per connection, no task per direction and no split: the future polls both
//! directions in turn. When a read side reaches end of file, the opposite write side is flushed
//! and closed exactly once (a half-close, which the peer sees as a FIN); the relay completes when
//! both directions are closed or either side fails, and reports the bytes moved. A per-poll
//! budget keeps one busy direction from starving the other.
//!
//! An idle tunnel holds no buffer: reads go into the executor thread's scratch buffer and are
//! written straight out of it, and a direction owns a buffer only while its writer is slower than
//! its reader. With [`Relay::splice`], bulk data between two plain sockets on Linux is joined with
//! splice(2) through a pipe that is held only while bytes are in it (see `net::Splicer`).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};

/// Bytes read per buffer fill. 16 KiB matches a TLS record and a typical socket read, so a bulk
/// transfer needs few system calls.
const BUF_SIZE: usize = 16 * 1024;

/// Buffer fills one direction may do in one poll before it yields. 16 × 16 KiB = 256 KiB: enough
/// to keep a bulk transfer efficient, small enough that the other direction (and other tasks on
/// the same thread) get their turn within a fraction of a millisecond.
const BUDGET: u32 = 16;

std::thread_local! {
    /// The buffer every relay on this thread reads into: lent for one read and the writes that
    /// follow it, so a tunnel holds no buffer of its own unless its writer is slow.
    static SCRATCH: std::cell::Cell<Option<Box<[u8]>>> = const { std::cell::Cell::new(None) };
}

/// The thread's scratch buffer for the moment; given back when dropped. A fresh one when the
/// thread's is already lent (a relay polled from inside another's poll).
struct Scratch(Option<Box<[u8]>>);

impl Scratch {
    fn take() -> Self {
        let buf = SCRATCH
            .with(std::cell::Cell::take)
            .unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice());
        Scratch(Some(buf))
    }

    fn buf(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        SCRATCH.with(|c| c.set(self.0.take()));
    }
}

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
    /// Bytes read and not yet written are `held[start..]`: owned only while the writer is
    /// slower than the reader (or for bytes handed over with [`Relay::pending`]). Reads go into
    /// the thread's scratch buffer, so an idle tunnel holds no buffer at all.
    held: Vec<u8>,
    start: usize,
    /// The reader reached end of file.
    eof: bool,
    /// Bytes were written since the last flush.
    dirty: bool,
    /// The writer was closed; this direction is over.
    closed: bool,
    /// Bytes written so far.
    moved: u64,
    /// Both peers are plain sockets: bulk bytes may go through a pipe with splice(2).
    #[cfg(target_os = "linux")]
    splice: Option<crate::net::Splicer>,
    /// The direction has moved bulk data, so it splices from then on: set when a copying read
    /// fills the whole scratch buffer. Small messages (a chat, a game, a 64-byte echo) are
    /// cheaper copied: one read and one write, where splicing costs two splices and a pipe.
    /// (Going back to copying would need a rule that large messages split across reads do not
    /// flip back and forth on; none measured better than staying.)
    #[cfg(target_os = "linux")]
    bulk: bool,
}

/// Which half of a direction failed: its reader's peer or its writer's peer.
enum Failure {
    Read(io::Error),
    Write(io::Error),
}

impl Direction {
    /// Writes `buf` until it is all written or the writer would block; returns how much went.
    fn write_some<W>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut Pin<&mut W>,
        buf: &[u8],
    ) -> Result<usize, Failure>
    where
        W: AsyncWrite + ?Sized,
    {
        let mut off = 0;
        while off < buf.len() {
            match w.as_mut().poll_write(cx, &buf[off..]) {
                Poll::Ready(Ok(0)) => return Err(Failure::Write(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.moved += n as u64;
                    self.dirty = true;
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Err(Failure::Write(e)),
                Poll::Pending => break,
            }
        }
        Ok(off)
    }

    /// Nothing more to read for now: push out what a buffering writer (TLS) may still hold, so
    /// the peer is not kept waiting for bytes we relayed.
    fn flush_if_dirty<W>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut Pin<&mut W>,
    ) -> Result<(), Failure>
    where
        W: AsyncWrite + ?Sized,
    {
        if self.dirty {
            match w.as_mut().poll_flush(cx) {
                Poll::Ready(Ok(())) => self.dirty = false,
                Poll::Ready(Err(e)) => return Err(Failure::Write(e)),
                Poll::Pending => {}
            }
        }
        Ok(())
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
            if self.start < self.held.len() {
                let held = std::mem::take(&mut self.held);
                let wrote = self.write_some(cx, &mut w, &held[self.start..]);
                self.held = held;
                self.start += wrote?;
                if self.start < self.held.len() {
                    return Poll::Pending;
                }
                // All written: the buffer goes, so a quiet tunnel holds none.
                self.held = Vec::new();
                self.start = 0;
            } else if !self.eof {
                if budget == 0 {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                budget -= 1;
                #[cfg(target_os = "linux")]
                if let (Some(splicer), true) = (&mut self.splice, self.bulk) {
                    use crate::net::SpliceError;
                    match splicer.poll_move(cx) {
                        Poll::Ready(Ok(0)) => self.eof = true,
                        Poll::Ready(Ok(n)) => {
                            self.moved += n as u64;
                            self.dirty = true;
                        }
                        Poll::Ready(Err(SpliceError::Read(e))) => {
                            return Poll::Ready(Err(Failure::Read(e)))
                        }
                        // No pipe to be had: this direction copies from now on.
                        Poll::Ready(Err(SpliceError::NoPipe)) => self.splice = None,
                        Poll::Ready(Err(SpliceError::Write(e))) => {
                            return Poll::Ready(Err(Failure::Write(e)))
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                    continue;
                }
                let mut scratch = Scratch::take();
                let buf = scratch.buf();
                match r.as_mut().poll_read(cx, buf) {
                    Poll::Ready(Ok(0)) => self.eof = true,
                    Poll::Ready(Ok(n)) => {
                        // Straight out of the scratch buffer; only what the writer cannot take
                        // now is copied into a buffer of this tunnel's own.
                        let wrote = match self.write_some(cx, &mut w, &buf[..n]) {
                            Ok(wrote) => wrote,
                            Err(f) => return Poll::Ready(Err(f)),
                        };
                        if wrote < n {
                            self.held = buf[wrote..n].to_vec();
                            return Poll::Pending;
                        }
                        // A full buffer: bulk data, spliced from here on (nothing is held, so
                        // no byte can overtake another).
                        #[cfg(target_os = "linux")]
                        if n == buf.len() && self.splice.is_some() && crate::net::splice_enabled() {
                            self.bulk = true;
                        }
                    }
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                    Poll::Pending => {
                        drop(scratch);
                        if let Err(f) = self.flush_if_dirty(cx, &mut w) {
                            return Poll::Ready(Err(f));
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
                        self.held = Vec::new();
                        #[cfg(target_os = "linux")]
                        {
                            self.splice = None;
                        }
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
        (self.up.held, self.up.start) = (to_backend, 0);
        (self.down.held, self.down.start) = (to_client, 0);
        self
    }

    /// On Linux, when both peers are plain sockets of [`SmolNet`](crate::SmolNet), moves bulk
    /// bytes with splice(2) through a pipe, never copying them into user space; the
    /// semantics (half-close, counts, progress, which side failed) stay the same. Any other
    /// stream (the simulator's, a test's, a TLS stream) keeps the plain copying relay.
    /// `PORTCULLIS_SPLICE=0` in the environment turns splice(2) off.
    pub fn splice(mut self) -> Self
    where
        C: Sized + 'static,
        B: Sized + 'static,
    {
        #[cfg(target_os = "linux")]
        if let Some((up, down)) = crate::net::splicers(&*self.client, &*self.backend) {
            self.up.splice = Some(up);
            self.down.splice = Some(down);
        }
        self
    }

    /// Publishes the bytes moved so far (both ways together) to `progress` after every poll,
    /// so an idle timeout can tell a quiet tunnel from a busy one without a timer in here.
    pub fn progress(mut self, progress: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.set_progress(progress);
        self
    }

    /// [`Relay::progress`] on a relay already in place.
    pub(crate) fn set_progress(&mut self, progress: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.progress = Some(progress);
    }

    /// What the relay has done so far, for a caller that ends it early (a timeout).
    pub fn report_so_far(&self, result: Result<(), (Side, io::Error)>) -> Report {
        self.report(result)
    }

    /// The bytes moved so far: client to backend, backend to client.
    pub(crate) fn moved(&self) -> (u64, u64) {
        (self.up.moved, self.down.moved)
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
        assert_eq!(
            relay.up.held.capacity() + relay.down.held.capacity(),
            0,
            "a writer that keeps up leaves no buffer in the tunnel"
        );
        drop(relay);
        assert_eq!(client_seen.lock().unwrap().written, b"reply");
        assert_eq!(client_seen.lock().unwrap().closes, 1);
    }

    /// Two connected loopback sockets: (the outside peer, the accepted one).
    #[cfg(target_os = "linux")]
    async fn socket_pair() -> (async_net::TcpStream, crate::SmolStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let outside = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let inside = l.accept().unwrap().0;
        (
            async_net::TcpStream::try_from(outside).unwrap(),
            crate::SmolStream::try_from(inside).unwrap(),
        )
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn plain_sockets_are_spliced_with_the_same_half_close_counts_and_pending_bytes() {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        smol::block_on(async {
            let (mut client_peer, mut client) = socket_pair().await;
            let (mut backend_peer, mut backend) = socket_pair().await;
            let up: Vec<u8> = (0..=255).cycle().take(3_000_000).collect();
            let relay = Relay::new(&mut client, &mut backend)
                .pending(b"early".to_vec(), b"101 ".to_vec())
                .splice();
            assert!(relay.up.splice.is_some() && relay.down.splice.is_some());
            let client_side = async {
                client_peer.write_all(&up).await.unwrap();
                client_peer.close().await.unwrap();
                let mut got = Vec::new();
                client_peer.read_to_end(&mut got).await.unwrap();
                got
            };
            let backend_side = async {
                let mut got = Vec::new();
                backend_peer.read_to_end(&mut got).await.unwrap();
                backend_peer.write_all(b"answer").await.unwrap();
                backend_peer.close().await.unwrap();
                got
            };
            let (report, (to_client, to_backend)) = futures_lite::future::zip(
                relay,
                futures_lite::future::zip(client_side, backend_side),
            )
            .await;
            assert!(report.result.is_ok(), "{report:?}");
            assert_eq!(report.first_to_close, Some(Side::Client));
            assert_eq!(report.client_to_backend, up.len() as u64 + 5);
            assert_eq!(report.backend_to_client, 10);
            assert_eq!(&to_backend[..5], b"early");
            assert!(to_backend[5..] == up[..], "bytes arrive once and in order");
            assert_eq!(to_client, b"101 answer");
            // The socket bulk data went into was paced (`net::splice::NOTSENT_LOWAT`); the one
            // that only had the short answer was left alone.
            let lowat = |s: &crate::SmolStream| {
                socket2::SockRef::from(s.get_ref())
                    .tcp_notsent_lowat()
                    .unwrap()
            };
            assert_eq!(lowat(&backend), 256 * 1024);
            assert_eq!(lowat(&client), 0);
        });
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn plain_sockets_relay_small_messages_in_lock_step_without_a_missed_wakeup() {
        // After a short read the relay waits for the reactor rather than reading again; a lost
        // readiness event would stall this lock-step exchange, which the timeout turns into a
        // failure.
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        smol::block_on(async {
            let (mut client_peer, mut client) = socket_pair().await;
            let (mut backend_peer, mut backend) = socket_pair().await;
            let relay = Relay::new(&mut client, &mut backend).splice();
            let exchange = async {
                let mut sent = 0u64;
                for i in 0..2_000usize {
                    // Lock step: one message each way, so every read drains its socket.
                    let msg: Vec<u8> = (0..1 + i % 200).map(|b| (b + i) as u8).collect();
                    client_peer.write_all(&msg).await.unwrap();
                    let mut got = vec![0; msg.len()];
                    backend_peer.read_exact(&mut got).await.unwrap();
                    assert_eq!(got, msg);
                    backend_peer.write_all(&got).await.unwrap();
                    client_peer.read_exact(&mut got).await.unwrap();
                    assert_eq!(got, msg);
                    sent += msg.len() as u64;
                }
                client_peer.close().await.unwrap();
                backend_peer.close().await.unwrap();
                sent
            };
            let timeout = async {
                smol::Timer::after(std::time::Duration::from_secs(20)).await;
                panic!("the exchange stalled: a readiness event was missed");
            };
            let (report, sent) =
                futures_lite::future::zip(relay, futures_lite::future::or(exchange, timeout)).await;
            assert!(report.result.is_ok(), "{report:?}");
            assert_eq!(report.client_to_backend, sent);
            assert_eq!(report.backend_to_client, sent);
        });
    }
}
