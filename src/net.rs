//! The runtime seam: what the flows need from a runtime, and its smol implementation.
//!
//! Every flow in this crate (accept loop, TCP flow, WebSocket flow, timeouts) is generic over
//! [`Net`]. The smol implementation below is what the binary and the library use; `sim/` has a
//! turmoil implementation so the very same code runs in simulated time. Nothing outside this
//! module calls smol, async-io or async-net directly, and every wait goes through
//! [`Net::sleep`]: a real timer inside turmoil would break determinism.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};

/// A bound listener that hands out accepted streams.
///
/// The methods return `impl Future + Send` rather than being `async fn`, so that the futures stay
/// `Send` when they are spawned from generic code such as the accept loop.
pub trait Listener: Send + Sync + 'static {
    /// The stream an accepted connection is read and written through.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next connection and returns it with the peer's address.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;

    /// The address this listener is bound to (useful after binding port 0).
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// Says that on this listener's connections the client speaks first and the proxy answers
    /// (an HTTP request): the runtime may then delay ACKs from the start, so that the request's
    /// ACK goes with the answer, a packet less per connection. Does nothing by default.
    fn client_speaks_first(&self) {}

    /// Sets the TCP congestion control algorithm of this listener's connections (`name`, as
    /// in `/proc/sys/net/ipv4/tcp_available_congestion_control`): accepted connections inherit
    /// it. The kernel refuses a name it does not have (`NotFound`), and an unprivileged
    /// process one outside `tcp_allowed_congestion_control` (`PermissionDenied`). Runtimes
    /// without the option return `Unsupported`.
    fn set_congestion_control(&self, name: &str) -> io::Result<()> {
        let _ = name;
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The runtime a flow runs on: sockets, a clock and a spawner.
pub trait Net: Clone + Send + Sync + 'static {
    /// The stream type of both accepted and outgoing connections.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The listener type [`Net::bind`] returns.
    type Listener: Listener<Stream = Self::Stream>;

    /// Binds a listener to `addr` (`"host:port"`).
    fn bind(&self, addr: &str) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Connects to `addr` (`"host:port"`), resolving a host name at this moment, so a backend's
    /// DNS changes are picked up by the next connection.
    fn connect(&self, addr: &str) -> impl Future<Output = io::Result<Self::Stream>> + Send;

    /// [`connect`](Net::connect) for a connection whose first bytes the proxy sends as soon as
    /// it is up (an HTTP request, a TLS ClientHello): the runtime may hold back the last ACK of
    /// the TCP handshake to send it with them, a packet less per connection. Not for a
    /// protocol whose server speaks first, which would wait for that ACK.
    fn connect_speaking(
        &self,
        addr: &str,
    ) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        self.connect(addr)
    }

    /// Completes after `d` has passed on this runtime's clock.
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send;

    /// The current instant on this runtime's clock (simulated time under turmoil), for
    /// durations in logs and deadlines.
    fn now(&self) -> Instant;

    /// Runs `f` in the background.
    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F);

    /// Resolves `addr` (`"host:port"`) to every address the name has, for a pool that
    /// spreads connections over all of them. Runtimes without a resolver return the address
    /// itself when it is an IP literal and `Unsupported` otherwise; the pool then connects by
    /// name.
    fn resolve(&self, addr: &str) -> impl Future<Output = io::Result<Vec<SocketAddr>>> + Send {
        let parsed = addr.parse::<SocketAddr>();
        async move {
            match parsed {
                Ok(a) => Ok(vec![a]),
                Err(_) => Err(io::ErrorKind::Unsupported.into()),
            }
        }
    }

    /// The local address of an accepted stream: the address the client connected to, which the
    /// PROXY protocol tells the backend. Runtimes that cannot say return `Unsupported`, and the
    /// listener's address is used instead.
    fn local_addr(&self, stream: &Self::Stream) -> io::Result<SocketAddr> {
        let _ = stream;
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Sets the TCP congestion control algorithm of a connected stream, as
    /// [`Listener::set_congestion_control`] does for a listener's.
    fn set_congestion_control(&self, stream: &Self::Stream, name: &str) -> io::Result<()> {
        let _ = (stream, name);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// The host's default congestion control (`net.ipv4.tcp_congestion_control`), or `None` where
/// that cannot be read.
pub(crate) fn default_congestion_control() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control");
    Some(name.ok()?.trim().to_string())
}

/// The congestion control algorithms the kernel has (`tcp_available_congestion_control`), or
/// `None` where that cannot be read (not Linux, no `/proc`).
pub(crate) fn available_congestion_controls() -> Option<Vec<String>> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let list = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control");
    Some(list.ok()?.split_whitespace().map(String::from).collect())
}

/// Runs `work`, or fails with [`io::ErrorKind::TimedOut`] once `d` has passed on `net`'s clock.
///
/// `work` is polled first, so a result that is ready at the deadline still wins; the poll order is
/// fixed, which keeps simulations deterministic.
pub async fn timeout<N: Net, T>(
    net: &N,
    d: Duration,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    futures_lite::future::or(work, async {
        net.sleep(d).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    })
    .await
}

/// The smol implementation of [`Net`].
///
/// It spawns onto the executor it was given rather than a global one, so an application that
/// embeds the proxy keeps control of its threads.
///
/// # Examples
///
/// ```no_run
/// use std::sync::Arc;
/// use portcullis::SmolNet;
///
/// let ex = Arc::new(smol::Executor::new());
/// let net = SmolNet::new(ex.clone());
/// # let _ = net;
/// ```
#[derive(Clone)]
pub struct SmolNet {
    executor: Arc<smol::Executor<'static>>,
    /// Its executor runs on `reactor::block_on` threads, which fire the reactor's timers: its
    /// sleeps are those, not async-io's.
    #[cfg(target_os = "linux")]
    driven: bool,
}

impl SmolNet {
    /// Binds `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`), so several processes can listen
    /// on one port and the kernel spreads connections over them: a rolling restart with no
    /// moment where the port is closed.
    #[cfg(unix)]
    pub fn bind_reuse_port(&self, addr: &str) -> io::Result<SmolListener> {
        listen(addr, true)
    }

    /// A runtime that spawns connection tasks onto `executor`.
    pub fn new(executor: Arc<smol::Executor<'static>>) -> Self {
        // The streams' epoll instance, made now rather than at the first connection, so that
        // a process's descriptors at rest are all there from the start. (Failing here, it is
        // tried again at the first stream, which then fails if it fails again.)
        #[cfg(target_os = "linux")]
        let _ = crate::reactor::start();
        SmolNet {
            executor,
            #[cfg(target_os = "linux")]
            driven: false,
        }
    }

    /// A runtime whose executor is run only by `reactor::block_on` threads.
    #[cfg(target_os = "linux")]
    pub(crate) fn driven(executor: Arc<smol::Executor<'static>>) -> Self {
        SmolNet {
            executor,
            driven: true,
        }
    }
}

/// The listen backlog asked for. std's `bind` asks for 128, so a burst of a few hundred
/// connections loses SYNs and its clients wait a second or more to retry; the kernel caps this
/// at `net.core.somaxconn` (4096 on current Linux) anyway.
#[cfg(unix)]
const BACKLOG: i32 = 4096;

/// A listening socket on the first address `addr` resolves to that can be bound, with
/// `SO_REUSEADDR` (as std sets it) and, if asked, `SO_REUSEPORT`.
#[cfg(unix)]
fn listen(addr: &str, reuse_port: bool) -> io::Result<SmolListener> {
    use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};
    use std::net::ToSocketAddrs;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing");
    for sa in addr.to_socket_addrs()? {
        let family = if sa.is_ipv4() {
            AddressFamily::INET
        } else {
            AddressFamily::INET6
        };
        let bound = (|| {
            let fd =
                rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
            sockopt::set_socket_reuseaddr(&fd, true)?;
            if reuse_port {
                sockopt::set_socket_reuseport(&fd, true)?;
            }
            rustix::net::bind(&fd, &sa)?;
            rustix::net::listen(&fd, BACKLOG)?;
            Ok::<_, io::Error>(std::net::TcpListener::from(fd))
        })();
        match bound {
            Ok(listener) => return SmolListener::registered(listener),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A TCP stream of [`SmolNet`]: the socket's reactor entry and nothing else.
///
/// On Linux the socket is registered once, edge-triggered, in an epoll instance of the
/// process's own (see `src/reactor.rs`): waiting for it costs no system call. Elsewhere it is
/// async-io's. Either way the stream is one pointer. Like async_net's, closing it shuts down the
/// write half (a FIN), which half-closes need.
#[derive(Debug, Clone)]
pub struct SmolStream(Arc<Io>);

#[cfg(target_os = "linux")]
type Io = crate::reactor::Source;
#[cfg(not(target_os = "linux"))]
type Io = smol::Async<std::net::TcpStream>;

impl SmolStream {
    /// A stream for a connected non-blocking socket.
    fn connected(stream: std::net::TcpStream) -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        return Ok(SmolStream(Io::new(stream, true, true)?));
        #[cfg(not(target_os = "linux"))]
        Ok(SmolStream(Arc::new(Io::new_nonblocking(stream)?)))
    }

    /// The socket.
    pub fn get_ref(&self) -> &std::net::TcpStream {
        self.0.get_ref()
    }
}

impl TryFrom<std::net::TcpStream> for SmolStream {
    type Error = io::Error;

    /// Makes a connected socket non-blocking and registers it.
    fn try_from(stream: std::net::TcpStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        SmolStream::connected(stream)
    }
}

impl futures_lite::AsyncRead for SmolStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        return self.0.poll_read(cx, buf);
        #[cfg(not(target_os = "linux"))]
        std::pin::Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl futures_lite::AsyncWrite for SmolStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        return self.0.poll_io(crate::reactor::WRITE, cx, |mut s| {
            std::io::Write::write(&mut s, buf)
        });
        #[cfg(not(target_os = "linux"))]
        std::pin::Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        return self.0.poll_io(crate::reactor::WRITE, cx, |mut s| {
            std::io::Write::write_vectored(&mut s, bufs)
        });
        #[cfg(not(target_os = "linux"))]
        std::pin::Pin::new(&mut &*self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(self.0.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

/// Connects to the first address `addr` resolves to that accepts, with `TCP_NODELAY`;
/// `speaking`: see [`Net::connect_speaking`].
async fn connect_to(addr: &str, speaking: bool) -> io::Result<SmolStream> {
    let mut last = None;
    for sa in async_net::resolve(addr).await? {
        match connect(sa, speaking).await {
            Ok(stream) => {
                let _ = stream.get_ref().set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing")
    }))
}

/// Connects a non-blocking socket to `sa` and waits until it is connected.
///
/// (`Async::connect` does the same but waits with a future that leaves a waker list allocated
/// in the socket's async-io entry for the connection's whole life, ~170 bytes per tunnel.)
#[cfg(unix)]
async fn connect(sa: SocketAddr, speaking: bool) -> io::Result<SmolStream> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = match sa {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let fd = rustix::net::socket_with(family, SocketType::STREAM, flags, None)?;
    // Delayed ACKs from the start: the handshake's last ACK goes with our first bytes. (A
    // failure only costs that packet.)
    #[cfg(target_os = "linux")]
    if speaking {
        let _ = rustix::net::sockopt::set_tcp_quickack(&fd, false);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = speaking;
    match rustix::net::connect(&fd, &sa) {
        // A non-blocking connect goes on in the background (also when interrupted).
        Ok(()) | Err(rustix::io::Errno::INPROGRESS | rustix::io::Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    let socket = std::net::TcpStream::from(fd);
    // Writable once connected, or once the connect failed: SO_ERROR tells which.
    #[cfg(target_os = "linux")]
    let stream = {
        // Not readable either: nothing can have come before the connection. (A server that
        // speaks first is heard through the event its bytes bring.)
        let source = Io::new(socket, false, false)?;
        std::future::poll_fn(|cx| source.poll_ready(crate::reactor::WRITE, cx)).await;
        if !source.closed(crate::reactor::WRITE) {
            // Writable with no error or hang-up: connected (a failed connect reports
            // EPOLLERR), so SO_ERROR need not be asked.
            return Ok(SmolStream(source));
        }
        SmolStream(source)
    };
    #[cfg(not(target_os = "linux"))]
    let stream = {
        let source = Arc::new(Io::new_nonblocking(socket)?);
        std::future::poll_fn(|cx| source.poll_writable(cx)).await?;
        SmolStream(source)
    };
    match stream.get_ref().take_error()? {
        None => Ok(stream),
        Some(e) => Err(e),
    }
}

#[cfg(not(unix))]
async fn connect(sa: SocketAddr, _speaking: bool) -> io::Result<SmolStream> {
    let stream = smol::Async::<std::net::TcpStream>::connect(sa).await?;
    Ok(SmolStream(Arc::new(stream)))
}

impl fmt::Debug for SmolNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmolNet").finish_non_exhaustive()
    }
}

/// A listener of [`SmolNet`]: a listening socket that sets `TCP_NODELAY` on every accepted
/// stream, because a proxy that holds back small writes adds a round trip to every message
/// (Nagle's algorithm against delayed ACKs). On Linux it is registered with the streams'
/// reactor (edge-triggered, so waiting for the next connection costs no system call).
#[derive(Debug)]
pub struct SmolListener {
    io: ListenIo,
    /// Whether accepted streams come with `TCP_NODELAY` already, set on the listener (Linux
    /// copies it to them): `NODELAY_UNKNOWN` until the first one is asked.
    nodelay: AtomicU8,
}

const NODELAY_UNKNOWN: u8 = 0;
const NODELAY_INHERITED: u8 = 1;
const NODELAY_PER_STREAM: u8 = 2;

#[derive(Debug)]
enum ListenIo {
    #[cfg(target_os = "linux")]
    Reactor(Arc<crate::reactor::Source<std::net::TcpListener>>),
    AsyncIo(Arc<smol::Async<std::net::TcpListener>>),
}

impl SmolListener {
    /// Wraps an already-bound listener, e.g. one bound to port 0 by a test.
    pub fn new(listener: async_net::TcpListener) -> Self {
        let listener: Arc<smol::Async<std::net::TcpListener>> = listener.into();
        // Into our reactor through a duplicate of the descriptor (the socket lives on in it
        // when async-io's entry is dropped); if that cannot be done, async-io's entry serves.
        #[cfg(target_os = "linux")]
        match listener
            .get_ref()
            .try_clone()
            .and_then(SmolListener::registered)
        {
            Ok(ours) => return ours,
            Err(e) => crate::log::warn!("a listener stays with async-io: {e}"),
        }
        SmolListener::with(ListenIo::AsyncIo(listener))
    }

    fn with(io: ListenIo) -> Self {
        // Set on the listener, the option comes with every accepted stream on Linux, which
        // saves a system call per connection; checked on the first one.
        #[cfg(unix)]
        let inherit = rustix::net::sockopt::set_tcp_nodelay(SmolListener::socket(&io), true);
        #[cfg(not(unix))]
        let inherit: Result<(), ()> = Err(());
        let nodelay = match inherit {
            Ok(()) => NODELAY_UNKNOWN,
            Err(_) => NODELAY_PER_STREAM,
        };
        SmolListener {
            io,
            nodelay: AtomicU8::new(nodelay),
        }
    }

    /// Registers a bound, listening socket (with async-io if our reactor will not have it).
    fn registered(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        #[cfg(target_os = "linux")]
        {
            // (A duplicate to fall back on: this is once per listener.)
            let spare = listener.try_clone()?;
            match crate::reactor::Source::new(listener, true, false) {
                Ok(source) => return Ok(SmolListener::with(ListenIo::Reactor(source))),
                Err(e) => crate::log::warn!("a listener goes through async-io: {e}"),
            }
            smol::Async::new(spare).map(|l| SmolListener::with(ListenIo::AsyncIo(Arc::new(l))))
        }
        #[cfg(not(target_os = "linux"))]
        smol::Async::new(listener).map(|l| SmolListener::with(ListenIo::AsyncIo(Arc::new(l))))
    }

    /// Sets `TCP_NODELAY` on an accepted stream, unless it came with it.
    fn nodelay(&self, stream: &std::net::TcpStream) {
        let known = self.nodelay.load(Ordering::Relaxed);
        if known == NODELAY_INHERITED {
            return;
        }
        if known == NODELAY_UNKNOWN {
            let inherited = stream.nodelay().unwrap_or(false);
            let now = if inherited {
                NODELAY_INHERITED
            } else {
                NODELAY_PER_STREAM
            };
            self.nodelay.store(now, Ordering::Relaxed);
            if inherited {
                return;
            }
        }
        // Failing to set the option only costs latency; the connection is still good.
        let _ = stream.set_nodelay(true);
    }

    fn get_ref(&self) -> &std::net::TcpListener {
        SmolListener::socket(&self.io)
    }

    fn socket(io: &ListenIo) -> &std::net::TcpListener {
        match io {
            #[cfg(target_os = "linux")]
            ListenIo::Reactor(source) => source.get_ref(),
            ListenIo::AsyncIo(listener) => listener.get_ref(),
        }
    }
}

impl From<async_net::TcpListener> for SmolListener {
    fn from(listener: async_net::TcpListener) -> Self {
        SmolListener::new(listener)
    }
}

impl Listener for SmolListener {
    type Stream = SmolStream;

    #[cfg(unix)]
    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        // accept4 with SOCK_NONBLOCK: the socket needs no ioctl afterwards to be made
        // non-blocking, as async_net's accept does (one system call less per connection).
        use rustix::net::SocketFlags;
        let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
        let accept = |l: &std::net::TcpListener| {
            rustix::net::acceptfrom_with(l, flags).map_err(io::Error::from)
        };
        let (fd, peer) = loop {
            let accepted = match &self.io {
                #[cfg(target_os = "linux")]
                ListenIo::Reactor(source) => {
                    std::future::poll_fn(|cx| source.poll_io(crate::reactor::READ, cx, accept))
                        .await
                }
                ListenIo::AsyncIo(listener) => listener.read_with(accept).await,
            };
            match accepted {
                Ok((fd, Some(peer))) => match SocketAddr::try_from(peer) {
                    Ok(peer) => break (fd, peer),
                    // Not an IP peer on a TCP listener: not one to serve.
                    Err(_) => continue,
                },
                Ok((_, None)) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let stream = std::net::TcpStream::from(fd);
        self.nodelay(&stream);
        Ok((SmolStream::connected(stream)?, peer))
    }

    #[cfg(not(unix))]
    async fn accept(&self) -> io::Result<(Self::Stream, SocketAddr)> {
        let ListenIo::AsyncIo(listener) = &self.io;
        let (stream, peer) = listener.read_with(|l| l.accept()).await?;
        self.nodelay(&stream);
        Ok((SmolStream(Arc::new(smol::Async::new(stream)?)), peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.get_ref().local_addr()
    }

    fn client_speaks_first(&self) {
        // Linux: TCP_QUICKACK off on the listener, which the sockets it accepts inherit. (A
        // failure only costs that packet.)
        #[cfg(target_os = "linux")]
        let _ = rustix::net::sockopt::set_tcp_quickack(self.get_ref(), false);
    }

    fn set_congestion_control(&self, name: &str) -> io::Result<()> {
        set_congestion_control(self.get_ref(), name)
    }
}

/// `TCP_CONGESTION` on a socket (Linux only; `Unsupported` elsewhere).
fn set_congestion_control(socket: &impl std::os::fd::AsFd, name: &str) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    return Ok(rustix::net::sockopt::set_tcp_congestion(socket, name)?);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, name);
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl Net for SmolNet {
    type Stream = SmolStream;
    type Listener = SmolListener;

    async fn bind(&self, addr: &str) -> io::Result<SmolListener> {
        #[cfg(unix)]
        return listen(addr, false);
        #[cfg(not(unix))]
        async_net::TcpListener::bind(addr)
            .await
            .map(SmolListener::new)
    }

    async fn connect(&self, addr: &str) -> io::Result<SmolStream> {
        connect_to(addr, false).await
    }

    async fn connect_speaking(&self, addr: &str) -> io::Result<SmolStream> {
        connect_to(addr, true).await
    }

    async fn sleep(&self, d: Duration) {
        #[cfg(target_os = "linux")]
        if self.driven {
            return crate::reactor::Sleep::new(d).await;
        }
        smol::Timer::after(d).await;
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) {
        self.executor.spawn(f).detach();
    }

    fn local_addr(&self, stream: &SmolStream) -> io::Result<SocketAddr> {
        stream.get_ref().local_addr()
    }

    fn set_congestion_control(&self, stream: &SmolStream, name: &str) -> io::Result<()> {
        set_congestion_control(stream.get_ref(), name)
    }

    async fn resolve(&self, addr: &str) -> io::Result<Vec<SocketAddr>> {
        async_net::resolve(addr).await
    }
}

/// The two directions of a tunnel between two plain sockets of [`SmolNet`], as [`Splicer`]s
/// (client to backend, backend to client); `None` when either stream is anything else (the
/// simulator's, a test's, a TLS stream).
#[cfg(target_os = "linux")]
pub(crate) fn splicers<C: std::any::Any, B: std::any::Any>(
    client: &C,
    backend: &B,
) -> Option<(Splicer, Splicer)> {
    let socket = |s: &dyn std::any::Any| s.downcast_ref::<SmolStream>().map(|s| s.0.clone());
    let (c, b) = (socket(client)?, socket(backend)?);
    Some((Splicer::new(c.clone(), b.clone()), Splicer::new(b, c)))
}

#[cfg(target_os = "linux")]
pub(crate) use splice::{SpliceError, Splicer};

/// Whether bulk data may go through splice(2): yes unless `PORTCULLIS_SPLICE=0` is set.
#[cfg(target_os = "linux")]
pub(crate) fn splice_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("PORTCULLIS_SPLICE").is_none_or(|v| v != "0"))
}

/// One direction between two plain sockets: bulk bytes moved with splice(2) (socket → pipe →
/// socket, never copied into user space).
#[cfg(target_os = "linux")]
mod splice {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use rustix::io::Errno;
    use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};

    use crate::reactor::{Source, READ, WRITE};

    /// The size a pipe is given when it is made, and what one splice into it asks for: four
    /// times a pipe's default, so bulk data takes a quarter of the splices and wakeups. A pipe
    /// holds the sockets' own pages (nothing is copied), so a larger one holds no more memory
    /// than the bytes in it, and a pipe is held only while bytes are in it.
    const PIPE_SIZE: usize = 256 * 1024;

    /// At most this many enlarged pipes at once in the process. An unprivileged user's pipes
    /// share a budget (`/proc/sys/fs/pipe-user-pages-soft`, 16384 pages by default), past which
    /// new pipes get two pages; 128 pipes of 64 pages take half of it. Past the cap, pipes keep
    /// the default size.
    const BIG_PIPES_MAX: usize = 128;

    /// Enlarged pipes alive in the process.
    static BIG_PIPES: AtomicUsize = AtomicUsize::new(0);

    /// The unsent bytes a socket that bulk data is spliced into may hold (`TCP_NOTSENT_LOWAT`;
    /// it reads as writable again below half of it). Without a limit, a busy socket's send
    /// buffer grows to megabytes of bytes not yet sent, which leave as the peer's ACKs arrive,
    /// on whichever core handles those ACKs; with it, the proxy writes when the socket runs low
    /// and its bytes leave at once, from the proxy's thread. It limits bytes queued, not bytes
    /// in flight, so a long fat path still fills its window. Measured with the larger pipes, and
    /// against other sizes, in the README ("Pacing bulk writes").
    const NOTSENT_LOWAT: u32 = 256 * 1024;

    /// Empty pipes kept per thread for the next burst, so a busy proxy does not create and close
    /// a pipe per message, while an idle tunnel holds no pipe (and no descriptors) at all.
    const POOL_MAX: usize = 64;

    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// Counted in [`BIG_PIPES`].
        big: bool,
    }

    impl Drop for Pipe {
        fn drop(&mut self) {
            if self.big {
                BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    std::thread_local! {
        static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    fn take_pipe() -> io::Result<Pipe> {
        if let Some(p) = POOL.with(|pool| pool.borrow_mut().pop()) {
            return Ok(p);
        }
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Enlarged while under the cap; a refusal (the user's pipe budget) keeps the default.
        let big = BIG_PIPES.fetch_add(1, Ordering::Relaxed) < BIG_PIPES_MAX
            && rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE).is_ok();
        if !big {
            BIG_PIPES.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(Pipe { read, write, big })
    }

    /// Gives an empty pipe back to this thread's pool (or closes it when the pool is full).
    fn give_pipe(pipe: Pipe) {
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(pipe);
            }
        });
    }

    /// Why a [`Splicer`] stopped.
    #[derive(Debug)]
    pub(crate) enum SpliceError {
        /// Reading `src` failed.
        Read(io::Error),
        /// Writing `dst` failed.
        Write(io::Error),
        /// No pipe could be had (descriptors exhausted) while no byte was in flight: the
        /// direction can go on with the copying relay.
        NoPipe,
    }

    /// One direction of a tunnel between plain sockets: `src` is read, `dst` written.
    pub(crate) struct Splicer {
        src: Arc<Source>,
        dst: Arc<Source>,
        /// Held only while bytes are in it (waiting for `dst` to take them).
        pipe: Option<Pipe>,
        in_pipe: usize,
        /// `dst` has had [`NOTSENT_LOWAT`] set (on the first bulk bytes).
        paced: bool,
    }

    impl std::fmt::Debug for Splicer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Splicer")
                .field("in_pipe", &self.in_pipe)
                .finish_non_exhaustive()
        }
    }

    impl Splicer {
        pub(crate) fn new(src: Arc<Source>, dst: Arc<Source>) -> Self {
            Splicer {
                src,
                dst,
                pipe: None,
                in_pipe: 0,
                paced: false,
            }
        }

        /// Moves one chunk: `Ready(Ok(n))` after writing `n > 0` bytes to `dst`, `Ready(Ok(0))`
        /// at the end of `src` with nothing left in the pipe, `Pending` when `src` has nothing
        /// or `dst` takes nothing now.
        pub(crate) fn poll_move(
            &mut self,
            cx: &mut Context<'_>,
        ) -> Poll<Result<usize, SpliceError>> {
            let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
            if !self.paced {
                self.paced = true;
                // (A failure only costs the pacing.)
                let dst = socket2::SockRef::from(self.dst.get_ref());
                let _ = dst.set_tcp_notsent_lowat(NOTSENT_LOWAT);
            }
            loop {
                if let (Some(pipe), true) = (&self.pipe, self.in_pipe > 0) {
                    let Poll::Ready(tick) = self.dst.poll_ready(WRITE, cx) else {
                        return Poll::Pending;
                    };
                    match splice(
                        &pipe.read,
                        None,
                        self.dst.get_ref(),
                        None,
                        self.in_pipe,
                        flags,
                    ) {
                        Ok(0) => {
                            return Poll::Ready(Err(SpliceError::Write(
                                io::ErrorKind::WriteZero.into(),
                            )))
                        }
                        Ok(n) => {
                            self.in_pipe -= n;
                            if self.in_pipe == 0 {
                                give_pipe(self.pipe.take().expect("a pipe"));
                            }
                            return Poll::Ready(Ok(n));
                        }
                        Err(Errno::INTR) => {}
                        Err(Errno::AGAIN) => self.dst.clear(WRITE, tick),
                        Err(e) => return Poll::Ready(Err(SpliceError::Write(e.into()))),
                    }
                } else {
                    let Poll::Ready(tick) = self.src.poll_ready(READ, cx) else {
                        return Poll::Pending;
                    };
                    let pipe = match self.pipe.take() {
                        Some(p) => p,
                        // Out of descriptors (or pipes): the caller copies instead.
                        None => match take_pipe() {
                            Ok(p) => p,
                            Err(_) => return Poll::Ready(Err(SpliceError::NoPipe)),
                        },
                    };
                    // (A short splice is no sign of an empty socket, as a short read is: the
                    // pipe may have run out of slots. Only EAGAIN says so.)
                    match splice(
                        self.src.get_ref(),
                        None,
                        &pipe.write,
                        None,
                        PIPE_SIZE,
                        flags,
                    ) {
                        Ok(0) => {
                            give_pipe(pipe);
                            return Poll::Ready(Ok(0));
                        }
                        Ok(n) => {
                            self.in_pipe = n;
                            self.pipe = Some(pipe);
                        }
                        Err(Errno::INTR) => self.pipe = Some(pipe),
                        Err(Errno::AGAIN) => {
                            // Nothing to read: the empty pipe goes back while the tunnel waits.
                            give_pipe(pipe);
                            self.src.clear(READ, tick);
                        }
                        Err(e) => {
                            give_pipe(pipe);
                            return Poll::Ready(Err(SpliceError::Read(e.into())));
                        }
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn pipes_are_enlarged_up_to_the_cap_and_counted_until_closed() {
            // Other tests may hold pipes at the same time, so the counts are bounds.
            let pipes: Vec<Pipe> = (0..BIG_PIPES_MAX + 2)
                .map(|_| take_pipe().unwrap())
                .collect();
            let big = pipes.iter().filter(|p| p.big).count();
            assert!((1..=BIG_PIPES_MAX).contains(&big), "{big} enlarged");
            assert!(pipes.iter().any(|p| !p.big), "the cap holds");
            for p in &pipes {
                let size = rustix::pipe::fcntl_getpipe_size(&p.write).unwrap();
                assert_eq!(size >= PIPE_SIZE, p.big, "{size} bytes");
            }
            assert!(BIG_PIPES.load(Ordering::Relaxed) >= big);
            drop(pipes);
            // Closed pipes leave the count, so a new one is enlarged again.
            assert!(take_pipe().unwrap().big);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_both_ways_have_nagle_off_and_a_refused_connect_fails() {
        smol::block_on(async {
            let net = SmolNet::new(Arc::new(smol::Executor::new()));
            let wrapped = async_net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let listeners = [
                net.bind("127.0.0.1:0").await.unwrap(),
                SmolListener::new(wrapped),
            ];
            for listener in listeners {
                let addr = listener.local_addr().unwrap().to_string();
                // The first accepted stream is asked; the later ones are trusted.
                for _ in 0..3 {
                    let (connected, accepted) =
                        futures_lite::future::zip(net.connect(&addr), listener.accept()).await;
                    assert!(connected.unwrap().get_ref().nodelay().unwrap());
                    assert!(accepted.unwrap().0.get_ref().nodelay().unwrap());
                }
            }
            // A connect that fails is not taken for one that succeeded.
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = closed.local_addr().unwrap().to_string();
            drop(closed);
            let refused = net.connect(&addr).await.expect_err("a refused connect");
            assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        })
    }

    /// Delayed ACKs from the start on the connections of a listener whose clients speak first
    /// (the ACK of a request is sent with the answer, not alone): `TCP_QUICKACK` reads back 0
    /// on them. (On a connected socket the mode does not show once the handshake is over.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_listener_whose_clients_speak_first_delays_acks() {
        use rustix::net::sockopt::tcp_quickack;
        smol::block_on(async {
            let net = SmolNet::new(Arc::new(smol::Executor::new()));
            let listener = net.bind("127.0.0.1:0").await.unwrap();
            listener.client_speaks_first();
            let addr = listener.local_addr().unwrap().to_string();
            for _ in 0..3 {
                let (speaking, accepted) =
                    futures_lite::future::zip(net.connect_speaking(&addr), listener.accept()).await;
                assert!(speaking.is_ok());
                assert!(!tcp_quickack(accepted.unwrap().0.get_ref()).unwrap());
            }
        })
    }
}
