//! The listener loop: accept, spawn one task per connection, back off on accept errors, and on
//! shutdown stop accepting and let established connections drain.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future;

use crate::log::{info, warn};
use crate::net::{Listener, Net, SmolListener, SmolNet};
use crate::Error;

/// The first pause after an accept error that means the process is out of a resource
/// (descriptors, buffers). Short, because a descriptor is often freed within milliseconds.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// The longest pause between accept attempts while resources stay exhausted: long enough not to
/// spin, short enough to serve again within a second of a descriptor freeing up.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often the drain checks whether the last connection has ended. Only runs after shutdown.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// Counts a connection as live for as long as it exists, including when its task is dropped.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        LiveGuard(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connections of one proxy (or of a whole process, across reloads): how many are open,
/// and the signal that closes them all at a drain deadline.
#[derive(Debug)]
pub(crate) struct Tracker {
    live: Arc<AtomicUsize>,
    /// Dropping it at the drain deadline wakes every connection still open and ends it.
    close: std::sync::Mutex<Option<async_channel::Sender<()>>>,
    closing: async_channel::Receiver<()>,
    /// Dropped when the drain starts: connections that have not sent a byte yet are closed
    /// then rather than waited for (an idle client would hold the shutdown for its read
    /// timeout), as nginx closes its idle connections on a graceful shutdown.
    drain_start: std::sync::Mutex<Option<async_channel::Sender<()>>>,
    draining: async_channel::Receiver<()>,
}

impl Default for Tracker {
    fn default() -> Self {
        let (close, closing) = async_channel::bounded(1);
        let (drain_start, draining) = async_channel::bounded(1);
        Tracker {
            live: Arc::new(AtomicUsize::new(0)),
            close: std::sync::Mutex::new(Some(close)),
            closing,
            drain_start: std::sync::Mutex::new(Some(drain_start)),
            draining,
        }
    }
}

impl Tracker {
    /// Runs `conn` on its own task, counted until it ends and ended at the drain deadline.
    fn spawn<N: Net>(&self, net: &N, conn: impl Future<Output = ()> + Send + 'static) {
        let guard = LiveGuard::new(&self.live);
        let closing = self.closing.clone();
        // No async block around `conn`: one would hold it twice (captured, and inside the `or`
        // it awaits), doubling every connection's task. The guard goes with the `or`, which the
        // executor drops as soon as either side completes.
        net.spawn(future::or(conn, async move {
            let _guard = guard;
            let _ = closing.recv().await;
        }));
    }

    /// The process-wide count for the connections tracked here, capped at `max`: their
    /// tunnels end at this tracker's drain deadline and log it.
    pub(crate) fn global(&self, max: Option<usize>) -> Arc<crate::limit::Global> {
        crate::limit::Global::with_deadline(max, self.closing.clone(), self.draining.clone())
    }

    /// Waits up to `drain` for every connection to end, then closes those still open.
    /// Returns how many had to be closed.
    pub(crate) async fn drain<N: Net>(&self, net: &N, drain: Duration) -> usize {
        drop(
            self.drain_start
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let idle = || async {
            while self.live.load(Ordering::Relaxed) > 0 {
                net.sleep(DRAIN_POLL).await;
            }
        };
        future::or(idle(), net.sleep(drain)).await;
        let left = self.live.load(Ordering::Relaxed);
        if left > 0 {
            warn!(
                "drain deadline passed after {}ms, closing {left} open connection(s)",
                drain.as_millis()
            );
            drop(self.close.lock().unwrap_or_else(|e| e.into_inner()).take());
            idle().await;
        }
        left
    }
}

/// The flow a listener hands new connections to, replaceable on reload: a connection takes
/// the flow current when it is accepted and keeps it to the end, so a reload changes what new
/// connections get and leaves established ones alone.
#[derive(Debug)]
pub(crate) struct Slot<F> {
    current: std::sync::RwLock<Arc<F>>,
}

impl<F> Slot<F> {
    pub(crate) fn new(flow: Arc<F>) -> Self {
        Slot {
            current: std::sync::RwLock::new(flow),
        }
    }

    /// The flow for a new connection.
    pub(crate) fn get(&self) -> Arc<F> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `flow` in place for new connections; returns the one it replaces.
    pub(crate) fn replace(&self, flow: Arc<F>) -> Arc<F> {
        std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            flow,
        )
    }
}

/// Accepts connections on `listener` and runs `handle` for each on its own task (counted by
/// `tracker`), until `stop` completes; then closes the listener, so new connections are
/// refused at once rather than queued in its backlog. Established connections go on.
pub(crate) async fn accept_until<N, H, F>(
    net: &N,
    listener: N::Listener,
    stop: impl Future<Output = ()>,
    tracker: &Tracker,
    handle: H,
) where
    N: Net,
    H: Fn(N::Stream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut stop = pin!(stop);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    // Out of descriptors, accepting can fail once per connection served (each frees the
    // descriptor the next takes): said once a second, with a count, not once a connection.
    let failures = crate::limit::Throttle::new(net.now());
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            (&mut stop).await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => {
                backoff = ACCEPT_BACKOFF_MIN;
                tracker.spawn(net, handle(stream, peer));
            }
            Some(Err(e)) if crate::limit::is_exhaustion(&e) => {
                if let Some(n) = failures.count(net.now()) {
                    warn!(
                        "accept failed, retrying in {}ms ({n} since the last line): {e}",
                        backoff.as_millis()
                    );
                }
                net.sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            Some(Err(e)) => warn!("accept failed: {e}"),
        }
    }
    drop(listener);
}

/// Accepts connections on `listener` and runs `handle` for each on its own task, until
/// `shutdown` completes; then waits up to `drain` for live connections to end, and closes the
/// ones still open after that.
///
/// Returns how many connections had to be closed at the deadline.
pub(crate) async fn accept_loop<N, H, F>(
    net: &N,
    listener: N::Listener,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    handle: H,
) -> usize
where
    N: Net,
    H: Fn(N::Stream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let tracker = Tracker::default();
    accept_until(net, listener, shutdown, &tracker, handle).await;
    tracker.drain(net, drain).await
}

/// How long a TCP client behind a load balancer has to deliver its PROXY header: the
/// balancer sends it with the connection, so a few seconds only cover a slow network.
pub(crate) const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the PROXY protocol header a trusted load balancer sends first: returns the client
/// address it carries (the peer's own for a LOCAL or UNKNOWN header) and any bytes read past
/// it, which belong to the stream. A peer outside `accept.trusted`, a malformed header or none
/// within `limit` is an error, and the caller closes the connection.
pub(crate) async fn accept_proxy<N: Net, S: futures_lite::AsyncRead + Unpin>(
    net: &N,
    stream: &mut S,
    peer: SocketAddr,
    accept: &crate::limit::AcceptProxy,
    limit: Duration,
) -> Result<(SocketAddr, Vec<u8>), String> {
    if !accept.trusted.iter().any(|c| c.contains(peer.ip())) {
        return Err(format!("{peer} is not in trusted_proxies"));
    }
    let read = async {
        crate::proxy_protocol::read_header(stream)
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    };
    match crate::net::timeout(net, limit, read).await {
        Ok((Some((source, _)), rest)) => Ok((source, rest)),
        Ok((None, rest)) => Ok((peer, rest)),
        Err(e) => Err(format!("no valid PROXY header from {peer}: {e}")),
    }
}

/// Binds `addr` on `net`, naming the address in the error.
pub(crate) async fn bind<N: Net>(net: &N, addr: &str) -> Result<N::Listener, Error> {
    net.bind(addr).await.map_err(|source| Error::Bind {
        addr: addr.to_string(),
        source,
    })
}

/// Runs `serve` on a smol executor driven by this thread and, to use the machine's other cores,
/// by `available_parallelism() - 1` more threads. Blocks until `serve` completes.
pub(crate) fn block_on<F, Fut>(serve: F) -> Result<(), Error>
where
    F: FnOnce(SmolNet) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let ex = Arc::new(smol::Executor::new());
    // On Linux the threads wait in the streams' reactor themselves (see `reactor::block_on`).
    #[cfg(target_os = "linux")]
    let driven = crate::reactor::start().is_ok();
    #[cfg(not(target_os = "linux"))]
    let driven = false;
    let net = match driven {
        #[cfg(target_os = "linux")]
        true => SmolNet::driven(ex.clone()),
        _ => SmolNet::new(ex.clone()),
    };
    fn run<T>(driven: bool, future: impl Future<Output = T>) -> T {
        #[cfg(target_os = "linux")]
        if driven {
            return crate::reactor::block_on(future);
        }
        let _ = driven;
        smol::block_on(future)
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    for i in 0..threads {
        let ex = ex.clone();
        let stopped = stopped.clone();
        std::thread::Builder::new()
            .name(format!("portcullis-{i}"))
            .spawn(move || run(driven, ex.run(stopped.recv())))
            .map_err(Error::Io)?;
    }
    let result = run(driven, ex.run(WhenWoken::new(serve(net))));
    drop(stop);
    result
}

/// Sets how long the proxy's threads poll before they sleep (`busy_poll_us`; Linux only: the
/// setting is accepted, and does nothing, elsewhere).
fn busy_poll(us: u64) {
    #[cfg(target_os = "linux")]
    crate::reactor::set_busy_poll(Duration::from_micros(us));
    #[cfg(not(target_os = "linux"))]
    let _ = us;
}

/// A future that polls the one it wraps only once that one's waker was called.
///
/// `Executor::run` polls the future it was given every time it is polled itself, that is after
/// every batch of tasks, whether that future was woken or not. The proxy's is the whole server
/// and its shutdown signal, which reads the signal socket each time: a failed `recvfrom` per
/// wakeup of the thread.
struct WhenWoken<F> {
    inner: std::pin::Pin<Box<F>>,
    flag: Arc<Woken>,
}

#[derive(Default)]
struct Woken {
    woken: std::sync::atomic::AtomicBool,
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = waker.as_ref() {
            w.wake_by_ref();
        }
    }
}

impl<F: Future> WhenWoken<F> {
    fn new(inner: F) -> Self {
        let flag = Arc::new(Woken::default());
        flag.woken.store(true, Ordering::SeqCst);
        WhenWoken {
            inner: Box::pin(inner),
            flag,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        {
            let mut waker = self.flag.waker.lock().unwrap_or_else(|e| e.into_inner());
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        if !self.flag.woken.swap(false, Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(self.flag.clone());
        self.inner
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
    }
}

/// Runs `serve` with a [`SmolNet`] whose tasks are driven by the future this returns, so it
/// works inside any executor the caller already has.
pub(crate) async fn run_inline<F, Fut>(
    listener: async_net::TcpListener,
    serve: F,
) -> Result<(), Error>
where
    F: FnOnce(SmolNet, SmolListener) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let ex = Arc::new(smol::Executor::new());
    ex.run(serve(SmolNet::new(ex.clone()), SmolListener::new(listener)))
        .await
}

/// A section's flow, as a builder's proxy serves it ([`serve_flow`]): `tcp::Flow`, `ws::Flow`.
pub(crate) trait SectionFlow: Send + Sync + Sized + 'static {
    /// The section it is made from.
    type Section;
    /// `kind=` in the log lines.
    const KIND: &'static str;
    /// Its clients speak first (a WebSocket request): the listener may wait for their first
    /// bytes before it accepts ([`Listener::client_speaks_first`]).
    const CLIENT_SPEAKS_FIRST: bool;
    /// The section's name.
    fn section_name(section: &Self::Section) -> &str;
    /// Every backend address of the section, for the listening line.
    fn backend_names(section: &Self::Section) -> Vec<String>;
    /// The section's `congestion_control`, if it sets one.
    fn congestion_control(section: &Self::Section) -> Option<&str>;
    /// Validates the section and starts its background work (health checks, resolvers).
    fn start<N: Net>(
        net: &N,
        section: Self::Section,
        listen_addr: Option<SocketAddr>,
        global: Option<Arc<crate::limit::Global>>,
    ) -> Result<Arc<Self>, Error>;
    /// Takes one accepted connection up to an open tunnel (PROXY header, limits, TLS, the
    /// WebSocket handshake, the backend connect), or to its end (`None`).
    fn open_tunnel<N: Net>(
        self: Arc<Self>,
        net: N,
        client: N::Stream,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Box<crate::limit::Tunnel<N::Stream>>>> + Send + 'static;
    /// What every flow has, whatever its kind.
    fn shared(&self) -> &Shared;

    /// Serves one accepted connection: the opening, in a box that is freed when the tunnel
    /// opens, then the tunnel, so a connection's task is sized for the tunnel alone.
    fn handle<N: Net>(
        self: Arc<Self>,
        net: N,
        client: N::Stream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Connections the kernel accepted before the listener took the setting (at start-up,
        // or queued before a builder's `serve`) did not inherit it.
        self.shared().congestion(&net, &client);
        // The tunnel comes back boxed too: the task then holds a pointer to it rather than a
        // copy of it next to the one the opening's result occupied.
        let opening = Box::pin(self.clone().open_tunnel(net.clone(), client, peer));
        async move {
            if let Some(mut tunnel) = opening.await {
                let shared = self.shared();
                tunnel.run(&net, &shared.admission, &shared.metrics).await;
            }
        }
    }

    /// Stops the background work (health checks, resolvers).
    fn stop_background(&self) {
        let stop = &self.shared().stop;
        drop(stop.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// What every flow has, whatever its kind ([`SectionFlow::shared`]).
pub(crate) struct Shared {
    /// The section's name, in log lines.
    pub(crate) name: Arc<str>,
    /// The section's connection limits and its share of the process-wide cap.
    pub(crate) admission: crate::limit::Admission,
    /// Dropped to stop the flow's health checks and resolvers (on shutdown, or when a reload
    /// replaces the flow).
    pub(crate) stop: std::sync::Mutex<Option<async_channel::Sender<()>>>,
    /// The listener's address: the PROXY header's destination when the runtime cannot tell
    /// a stream's own local address.
    pub(crate) listen_addr: Option<SocketAddr>,
    pub(crate) metrics: Arc<crate::metrics::Section>,
    /// Terminates TLS on the listener (`tls`), with certificates read when the flow started.
    pub(crate) acceptor: Option<crate::tls::Acceptor>,
    /// Speaks TLS to backends (`upstream_tls`, or a WebSocket section's `wss://` backends).
    pub(crate) connector: Option<Arc<crate::tls::Connector>>,
    /// Set on each connection, to the client and to the backend (`congestion_control`).
    pub(crate) congestion_control: Option<String>,
}

impl Shared {
    /// Sets the section's `congestion_control`, if it has one, on a connection (to the
    /// client or to a backend). The listener took the name at start-up, so this does not
    /// fail.
    pub(crate) fn congestion<N: Net>(&self, net: &N, stream: &N::Stream) {
        if let Some(cc) = &self.congestion_control {
            let _ = net.set_congestion_control(stream, cc);
        }
    }
}

/// A builder's proxy (`TcpProxy`, `WsProxy`) on any [`Net`]: logs the listener, starts the
/// flow, accepts until `shutdown` completes, then drains for up to `drain_timeout`.
pub(crate) async fn serve_flow<F: SectionFlow, N: Net>(
    net: N,
    listener: N::Listener,
    shutdown: impl Future<Output = ()>,
    section: F::Section,
    drain_timeout: Duration,
) -> Result<(), Error> {
    let name = F::section_name(&section).to_string();
    let tracker = Tracker::default();
    let slot = Slot::new(start_flow::<F, N>(
        &net,
        &listener,
        section,
        tracker.global(None),
    )?);
    accept_until(&net, listener, shutdown, &tracker, |stream, peer| {
        slot.get().handle(net.clone(), stream, peer)
    })
    .await;
    slot.get().stop_background();
    let left = tracker.drain(&net, drain_timeout).await;
    info!(
        "stopped kind={} name={name} open_connections_closed={left}",
        F::KIND
    );
    Ok(())
}

/// Logs that `listener` is up for `section`, and starts the section's flow.
fn start_flow<F: SectionFlow, N: Net>(
    net: &N,
    listener: &N::Listener,
    section: F::Section,
    global: Arc<crate::limit::Global>,
) -> Result<Arc<F>, Error> {
    if F::CLIENT_SPEAKS_FIRST {
        listener.client_speaks_first();
    }
    if let Some(cc) = F::congestion_control(&section) {
        // Set on the listener, whose connections inherit it, so a refusal stops the start
        // rather than showing up connection by connection.
        listener
            .set_congestion_control(cc)
            .map_err(|e| congestion_refused(F::KIND, F::section_name(&section), cc, &e))?;
    }
    let names = F::backend_names(&section);
    let addr = listener.local_addr();
    log_listening(F::KIND, F::section_name(&section), addr, &names);
    F::start(net, section, listener.local_addr().ok(), Some(global))
}

/// The error for a `congestion_control` the kernel refused, with what would fix it.
fn congestion_refused(kind: &str, section: &str, cc: &str, e: &io::Error) -> Error {
    let fix = match e.kind() {
        io::ErrorKind::PermissionDenied => format!(
            "allow it for unprivileged processes (add {cc} to the sysctl \
             net.ipv4.tcp_allowed_congestion_control), run with CAP_NET_ADMIN, or remove the field"
        ),
        io::ErrorKind::NotFound => format!(
            "load its kernel module (`modprobe tcp_{cc}`), use one listed in \
             /proc/sys/net/ipv4/tcp_available_congestion_control, or remove the field"
        ),
        _ => "remove the field (the option is Linux's TCP_CONGESTION)".to_string(),
    };
    Error::Config(format!(
        "[[{kind}_proxy]] {section:?}: field `congestion_control`: the kernel refused {cc:?} ({e}); fix: {fix}"
    ))
}

/// Logs that a listener is up.
pub(crate) fn log_listening(
    kind: &str,
    name: &str,
    addr: io::Result<SocketAddr>,
    backends: &[String],
) {
    let addr = addr.map_or_else(|e| format!("?({e})"), |a| a.to_string());
    info!(
        "listening kind={kind} name={name} addr={addr} backends={}",
        backends.join(",")
    );
}

/// Runs every section of `config` until the process ends: see [`run_until`].
pub fn run(config: crate::Config) -> Result<(), Error> {
    run_until(config, future::pending())
}

/// Runs every section of `config` until `shutdown` completes: see [`run_reloading`], without
/// reloads.
pub fn run_until(
    config: crate::Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (_never, reloads) = async_channel::bounded(1);
    let load = || Err(Error::Config("this run does not reload".into()));
    run_reloading(config, load, reloads, shutdown)
}

/// Runs every section of `config`, reloading on each message from `reloads`, until `shutdown`
/// completes; then stops accepting on every listener at once, lets established connections
/// finish for up to `drain_timeout_ms`, closes what remains and returns.
///
/// Every listener is bound first, so a busy address fails start-up as a whole (naming the
/// address); all are served on one executor spread over the machine's cores.
///
/// A reload calls `load` for the new configuration. An invalid one is logged and the running
/// one stays. Otherwise sections are matched by kind and listen address: new ones start
/// listening; removed ones stop accepting, and their open connections go on; changed ones keep
/// their listener and give new connections the new backends and policies. No established
/// connection is cut by a reload.
pub fn run_reloading(
    config: crate::Config,
    load: impl Fn() -> Result<crate::Config, Error> + Send + 'static,
    reloads: async_channel::Receiver<()>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    block_on(|net| async move {
        let tracker = Arc::new(Tracker::default());
        let mut drain = config.drain_timeout_ms;
        let admin_listen = config.admin_listen.clone();
        crate::log::configure(config.log_json, config.log_open, config.access_log);
        busy_poll(config.busy_poll_us);
        // The process-wide cap is read at start-up; a reload does not change it.
        let global = tracker.global(config.max_connections);
        // Bind everything first, then start: a busy address fails start-up as a whole.
        let mut bound = Vec::new();
        for section in Section::all(config) {
            bound.push((bind_section(&net, &section).await?, section));
        }
        crate::metrics::started();
        let admin = Arc::new(crate::admin::State::default());
        // Every listener is bound (the kernel queues their connections from here on).
        admin.set_listening();
        let mut admin_server = match &admin_listen {
            Some(addr) => Some(AdminServer::start(&net, addr, &admin).await?),
            None => None,
        };
        let mut live = Vec::new();
        for (listener, section) in bound {
            live.push(Live::start(&net, listener, section, &tracker, &global)?);
        }
        let mut shutdown = pin!(shutdown);
        loop {
            let reload = future::or(async { reloads.recv().await.is_ok() }, async {
                (&mut shutdown).await;
                false
            })
            .await;
            if !reload {
                break;
            }
            let config = match load() {
                Ok(config) => config,
                Err(e) => {
                    warn!("reload rejected, the running configuration stays: {e}");
                    continue;
                }
            };
            drain = config.drain_timeout_ms;
            crate::log::configure(config.log_json, config.log_open, config.access_log);
            busy_poll(config.busy_poll_us);
            let running = admin_server.as_ref().map(|a| a.addr.as_str());
            if config.admin_listen.as_deref() != running {
                match &config.admin_listen {
                    // The new address is bound before the old one closes: if it cannot be,
                    // the endpoint stays where it was rather than going away.
                    Some(addr) => match AdminServer::start(&net, addr, &admin).await {
                        Ok(server) => admin_server = Some(server),
                        Err(e) => warn!(
                            "reload: the admin endpoint stays at {}: {e}",
                            running.unwrap_or("none")
                        ),
                    },
                    None => {
                        admin_server = None;
                        info!("reload: the admin endpoint stopped");
                    }
                }
            }
            let sections = Section::all(config);
            live.retain(|l| {
                let kept = sections.iter().any(|s| s.key() == l.section.key());
                if !kept {
                    info!(
                        "reload: {} stops accepting; its open connections go on",
                        l.section.name()
                    );
                    l.stop();
                    l.section.metrics().retire();
                }
                kept
            });
            for section in sections {
                match live.iter_mut().find(|l| l.section.key() == section.key()) {
                    // Unchanged, unless it reads certificates: those files may have been
                    // renewed, and a new flow reads them again.
                    Some(l) if l.section == section && !section.has_tls() => {}
                    Some(l) => match l.update(&net, section) {
                        Ok(()) => info!(
                            "reload: {} updated; new connections use its new settings",
                            l.section.name()
                        ),
                        Err(e) => warn!("reload: keeping the old settings: {e}"),
                    },
                    None => {
                        let started = match bind_section(&net, &section).await {
                            Ok(listener) => Live::start(&net, listener, section, &tracker, &global),
                            Err(e) => Err(e),
                        };
                        match started {
                            Ok(l) => live.push(l),
                            Err(e) => warn!("reload: cannot start a section: {e}"),
                        }
                    }
                }
            }
        }
        info!("shutting down: no new connections, draining for up to {drain}ms");
        admin.set_draining();
        for l in &live {
            l.stop();
        }
        let left = tracker.drain(&net, Duration::from_millis(drain)).await;
        info!("stopped open_connections_closed={left}");
        drop(admin_server);
        Ok(())
    })
}

/// The admin endpoint's listener, served until this is dropped.
struct AdminServer {
    /// The address as configured.
    addr: String,
    _stop: async_channel::Sender<()>,
}

impl AdminServer {
    /// Binds `addr` and serves the endpoint there.
    async fn start(
        net: &SmolNet,
        addr: &str,
        state: &Arc<crate::admin::State>,
    ) -> Result<AdminServer, Error> {
        let listener = bind(net, addr).await?;
        listener.client_speaks_first();
        info!(
            "admin listening addr={} paths=/metrics,/healthz,/readyz",
            Listener::local_addr(&listener).map_or_else(|_| addr.to_string(), |a| a.to_string())
        );
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let (net2, state) = (net.clone(), state.clone());
        net.spawn(async move {
            let stop = async move {
                let _ = stopped.recv().await;
            };
            crate::admin::serve(&net2, listener, state, stop).await;
        });
        Ok(AdminServer {
            addr: addr.to_string(),
            _stop: stop,
        })
    }
}

/// Binds a section's listener, with `SO_REUSEPORT` when it asks for it.
async fn bind_section(net: &SmolNet, section: &Section) -> Result<SmolListener, Error> {
    let addr = section.listen();
    #[cfg(unix)]
    if section.reuse_port() {
        return net.bind_reuse_port(addr).map_err(|source| Error::Bind {
            addr: addr.to_string(),
            source,
        });
    }
    bind(net, addr).await
}

/// One section of either kind, as the supervisor compares them across reloads.
#[derive(Debug, Clone, PartialEq)]
enum Section {
    Tcp(crate::config::TcpSection),
    Ws(crate::config::WsSection),
}

impl Section {
    fn all(config: crate::Config) -> Vec<Section> {
        let tcp = config.tcp_proxy.into_iter().map(Section::Tcp);
        tcp.chain(config.ws_proxy.into_iter().map(Section::Ws))
            .collect()
    }

    fn listen(&self) -> &str {
        match self {
            Section::Tcp(s) => &s.listen,
            Section::Ws(s) => &s.listen,
        }
    }

    fn reuse_port(&self) -> bool {
        match self {
            Section::Tcp(s) => s.reuse_port,
            Section::Ws(s) => s.reuse_port,
        }
    }

    fn name(&self) -> String {
        match self {
            Section::Tcp(s) => format!("[[tcp_proxy]] {:?}", s.name),
            Section::Ws(s) => format!("[[ws_proxy]] {:?}", s.name),
        }
    }

    /// The section's `congestion_control`, and a way to change it.
    fn congestion_control(&mut self) -> &mut Option<String> {
        match self {
            Section::Tcp(s) => &mut s.congestion_control,
            Section::Ws(s) => &mut s.congestion_control,
        }
    }

    /// Whether the section reads certificate files (listener or backend side).
    fn has_tls(&self) -> bool {
        match self {
            Section::Tcp(s) => !s.tls.is_empty() || s.upstream_tls.is_some(),
            Section::Ws(s) => !s.tls.is_empty() || s.upstream_tls.is_some(),
        }
    }

    /// The section's metrics.
    fn metrics(&self) -> Arc<crate::metrics::Section> {
        match self {
            Section::Tcp(s) => crate::metrics::section("tcp", &s.name),
            Section::Ws(s) => crate::metrics::section("ws", &s.name),
        }
    }

    /// What identifies a section across reloads: its kind and listen address (and its name
    /// when the port is 0, which gives every such section a port of its own).
    fn key(&self) -> (bool, String) {
        let mut key = self.listen().to_ascii_lowercase();
        if key.ends_with(":0") {
            key = format!("{key} {}", self.name());
        }
        (matches!(self, Section::Tcp(_)), key)
    }
}

/// The flow slot of a running section.
enum Flows {
    Tcp(Arc<Slot<crate::tcp::Flow>>),
    Ws(Arc<Slot<crate::ws::Flow>>),
}

/// Starts the flow `section` describes and, on its own task, the accept loop that hands it
/// `listener`'s connections until `stopped` completes.
fn serve_section<F: SectionFlow, N: Net>(
    net: &N,
    listener: N::Listener,
    section: F::Section,
    tracker: &Arc<Tracker>,
    global: &Arc<crate::limit::Global>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<Arc<Slot<F>>, Error> {
    let slot = Arc::new(Slot::new(start_flow::<F, N>(
        net,
        &listener,
        section,
        global.clone(),
    )?));
    let (net2, tracker, slot2) = (net.clone(), tracker.clone(), slot.clone());
    net.spawn(async move {
        accept_until(&net2, listener, stopped, &tracker, |stream, peer| {
            slot2.get().handle(net2.clone(), stream, peer)
        })
        .await;
    });
    Ok(slot)
}

/// A running section: its listener task and the flow it hands connections to.
struct Live {
    section: Section,
    flows: Flows,
    listen_addr: Option<SocketAddr>,
    /// The congestion control the listener was given at start-up (`congestion_control`),
    /// which its connections inherit whatever a reload says.
    listener_cc: Option<String>,
    /// The process-wide connection count and cap.
    global: Arc<crate::limit::Global>,
    /// Dropped to stop the listener.
    stop: std::sync::Mutex<Option<async_channel::Sender<()>>>,
}

impl Live {
    fn start<N: Net>(
        net: &N,
        listener: N::Listener,
        mut section: Section,
        tracker: &Arc<Tracker>,
        global: &Arc<crate::limit::Global>,
    ) -> Result<Live, Error> {
        let listen_addr = listener.local_addr().ok();
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let stopped = async move {
            let _ = stopped.recv().await;
        };
        let (t, g) = (tracker, global);
        let flows = match &section {
            Section::Tcp(s) => Flows::Tcp(serve_section(net, listener, s.clone(), t, g, stopped)?),
            Section::Ws(s) => Flows::Ws(serve_section(net, listener, s.clone(), t, g, stopped)?),
        };
        Ok(Live {
            listener_cc: section.congestion_control().clone(),
            section,
            flows,
            listen_addr,
            global: global.clone(),
            stop: std::sync::Mutex::new(Some(stop)),
        })
    }

    /// Gives new connections the flow `section` describes; the old flow's background tasks
    /// stop, its connections go on.
    fn update<N: Net>(&mut self, net: &N, section: Section) -> Result<(), Error> {
        fn restart<F: SectionFlow, N: Net>(
            live: &Live,
            net: &N,
            slot: &Slot<F>,
            section: F::Section,
        ) -> Result<(), Error> {
            let flow = F::start(net, section, live.listen_addr, Some(live.global.clone()))?;
            slot.replace(flow).stop_background();
            Ok(())
        }
        // The listener keeps the congestion control it started with, and its connections
        // inherit it: a flow whose section no longer names one sets the host's default on
        // each connection instead. (One that names one sets it on each either way.)
        let mut given = section.clone();
        if given.congestion_control().is_none() && self.listener_cc.is_some() {
            *given.congestion_control() = crate::net::default_congestion_control();
        }
        match (&self.flows, &given) {
            (Flows::Tcp(slot), Section::Tcp(s)) => restart(self, net, slot, s.clone())?,
            (Flows::Ws(slot), Section::Ws(s)) => restart(self, net, slot, s.clone())?,
            _ => unreachable!("sections are matched by kind"),
        }
        let old = std::mem::replace(&mut self.section, section);
        if old.name() != self.section.name() {
            // Renamed: the old name's backends are no longer running.
            old.metrics().retire();
        }
        Ok(())
    }

    /// Stops the listener and the flow's background tasks; open connections go on.
    fn stop(&self) {
        drop(self.stop.lock().unwrap_or_else(|e| e.into_inner()).take());
        match &self.flows {
            Flows::Tcp(slot) => slot.get().stop_background(),
            Flows::Ws(slot) => slot.get().stop_background(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll, Waker};

    #[test]
    fn a_future_run_when_woken_is_polled_once_per_wakeup_not_per_poll() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = async_channel::unbounded::<()>();
        let counted = polls.clone();
        let mut inner = Box::pin(async move {
            rx.recv().await.unwrap();
            rx.recv().await.unwrap();
        });
        let mut future = pin!(WhenWoken::new(future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::SeqCst);
            inner.as_mut().poll(cx)
        })));
        let mut cx = Context::from_waker(Waker::noop());
        let mut poll = |times: usize| {
            (0..times)
                .map(|_| future.as_mut().poll(&mut cx))
                .last()
                .unwrap()
        };
        assert!(poll(5).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "polled once, then not again until woken"
        );
        tx.try_send(()).unwrap();
        assert!(poll(3).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        tx.try_send(()).unwrap();
        assert_eq!(poll(1), Poll::Ready(()));
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }
}
