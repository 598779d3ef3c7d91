//! The WebSocket flow for one connection.
//!
//! Read the request head (bounded in size and time) → validate the upgrade → route → policy
//! (Origin, subprotocols) → for each backend in round-robin order: connect, send the rewritten
//! head and any bytes the client already sent, read the backend's answer → on a valid 101, hand
//! the client the backend's own 101 and whatever followed it, then relay bytes both ways with no
//! timeout. Every refusal before the 101 is an HTTP status with a short plain-text body.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

use crate::balancer::{self, HashKey, Lease, Pool, Retry};
use crate::config::{self, WsRoute, WsSection};
use crate::handshake::{self, ForwardOptions, Head, HeadError, Incoming, Refusal, Response};
use crate::health;
use crate::limit;
use crate::log::{warn, Access};
use crate::metrics;
use crate::net::{self, Net};
use crate::policy;
use crate::proxy_protocol;
use crate::route;
use crate::server;
use crate::tcp::{client_ip_key, DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_DRAIN_TIMEOUT_MS};
use crate::tls;
use crate::Error;

/// The most of a refusing backend's body (after its head) passed on to the client: enough for
/// any error page meant for a WebSocket client, bounded so a misbehaving backend cannot make the
/// proxy copy without end before the tunnel even exists.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// How long a refused client's further input is read and discarded before the socket is
/// dropped (see `Flow::answer`): long enough for a response to cross a slow link, short enough
/// that a client that keeps sending cannot hold the task.
const LINGER: Duration = Duration::from_secs(2);

/// The most input discarded while lingering.
const LINGER_BYTES: usize = 256 * 1024;

/// The largest response head accepted from a backend. Larger than a client's cap, because a
/// backend may set many cookies; still bounded, so a broken backend cannot exhaust memory.
const BACKEND_HEAD_MAX: usize = 16 * 1024;

/// A WebSocket proxy: validates each client's upgrade, forwards it to a backend, completes the
/// client's handshake with the backend's own 101, then relays frames both ways untouched.
///
/// Defaults: round robin over the backends with failover, connect timeout 5000 ms, 30000 ms to
/// read the request head (never applied to the tunnel), 5000 ms for the backend's 101, request
/// heads up to 8192 bytes, `Host` set to the backend's `host:port`, `X-Forwarded-For`,
/// `-Proto` and `-Host` added, and a drain of up to 30000 ms on shutdown. Routes, policies and
/// extra headers come from a [`WsSection`] ([`WsProxy::from_section`]).
///
/// # Examples
///
/// ```no_run
/// use portcullis::WsProxy;
///
/// WsProxy::new(["chat-1:9000", "chat-2:9000"])
///     .connect_timeout_ms(3_000)
///     .read_timeout_ms(30_000)
///     .bind("0.0.0.0:8080")?;
/// # Ok::<(), portcullis::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct WsProxy {
    section: WsSection,
    drain_timeout: Duration,
}

impl WsProxy {
    /// A proxy sending every upgrade to `backends` (`host:port` or `ws://host:port[/path]`).
    pub fn new<I, S>(backends: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let route = WsRoute::catch_all(backends);
        WsProxy::from_section(WsSection {
            name: "ws".to_string(),
            listen: String::new(),
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            read_timeout_ms: config::DEFAULT_READ_TIMEOUT_MS,
            upgrade_timeout_ms: config::DEFAULT_UPGRADE_TIMEOUT_MS,
            max_request_head_bytes: config::DEFAULT_MAX_REQUEST_HEAD_BYTES,
            health_path: None,
            limits: crate::limit::Limits::default(),
            reuse_port: false,
            congestion_control: None,
            tls: Vec::new(),
            upstream_tls: None,
            routes: vec![route],
        })
    }

    /// A proxy as a validated `[[ws_proxy]]` section describes it (its `listen` is used by
    /// [`crate::run`], not here).
    pub fn from_section(section: WsSection) -> Self {
        WsProxy {
            section,
            drain_timeout: Duration::from_millis(DEFAULT_DRAIN_TIMEOUT_MS),
        }
    }

    /// The name this proxy's log lines carry (default `ws`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.section.name = name.into();
        self
    }

    /// How long one connect to one backend may take before the next is tried (default 5000 ms).
    pub fn connect_timeout_ms(mut self, ms: u64) -> Self {
        self.section.connect_timeout_ms = ms;
        self
    }

    /// The TCP congestion control algorithm of the proxy's connections, to clients and to
    /// backends (Linux's `TCP_CONGESTION`, such as `"cubic"` or `"bbr"`); by default the
    /// host's (`net.ipv4.tcp_congestion_control`). A name the kernel refuses fails the start.
    pub fn congestion_control(mut self, name: impl Into<String>) -> Self {
        self.section.congestion_control = Some(name.into());
        self
    }

    /// How long a client may take to send its request head (default 30000 ms). It never
    /// applies to an established tunnel.
    pub fn read_timeout_ms(mut self, ms: u64) -> Self {
        self.section.read_timeout_ms = ms;
        self
    }

    /// How long a backend may take to answer the upgrade before the client gets 504
    /// (default 5000 ms).
    pub fn upgrade_timeout_ms(mut self, ms: u64) -> Self {
        self.section.upgrade_timeout_ms = ms;
        self
    }

    /// The largest request head accepted; a larger one gets 431 (default 8192 bytes).
    pub fn max_request_head_bytes(mut self, bytes: usize) -> Self {
        self.section.max_request_head_bytes = bytes;
        self
    }

    /// A path that answers a plain GET with 200, for load balancers' probes (default none).
    pub fn health_path(mut self, path: impl Into<String>) -> Self {
        self.section.health_path = Some(path.into());
        self
    }

    /// How long, after shutdown, established tunnels may go on before they are closed
    /// (default 30000 ms).
    pub fn drain_timeout_ms(mut self, ms: u64) -> Self {
        self.drain_timeout = Duration::from_millis(ms);
        self
    }

    /// Listens on `addr` and proxies until the process ends, on as many threads as the machine
    /// has cores.
    pub fn bind(self, addr: &str) -> Result<(), Error> {
        server::block_on(|net| async move {
            let listener = server::bind(&net, addr).await?;
            self.serve_with(net, listener, futures_lite::future::pending())
                .await
        })
    }

    /// Proxies connections from `listener` until `shutdown` completes, then waits for
    /// established tunnels to end (up to the drain timeout). Connection tasks run inside the
    /// returned future, so it runs on whichever executor polls it.
    pub async fn serve(
        self,
        listener: async_net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        server::run_inline(listener, |net, listener| {
            self.serve_with(net, listener, shutdown)
        })
        .await
    }

    /// [`WsProxy::serve`] on any [`Net`].
    pub async fn serve_with<N: Net>(
        self,
        net: N,
        listener: N::Listener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        server::serve_flow::<Flow, N>(net, listener, shutdown, self.section, self.drain_timeout)
            .await
    }
}

impl server::SectionFlow for Flow {
    type Section = WsSection;
    const KIND: &'static str = "ws";
    const CLIENT_SPEAKS_FIRST: bool = true;

    fn section_name(section: &WsSection) -> &str {
        &section.name
    }

    fn backend_names(section: &WsSection) -> Vec<String> {
        let backends = section.routes.iter().flat_map(|r| &r.backends);
        backends.map(|b| b.address.clone()).collect()
    }

    fn congestion_control(section: &WsSection) -> Option<&str> {
        section.congestion_control.as_deref()
    }

    /// A flow as `s` configures it, with its routes' health checks and resolvers running on
    /// `net`.
    fn start<N: Net>(
        net: &N,
        s: WsSection,
        listen_addr: Option<SocketAddr>,
        global: Option<Arc<limit::Global>>,
    ) -> Result<Arc<Self>, Error> {
        let admission = limit::Admission::new(&s.name, s.limits.clone(), global, net.now());
        let mut flow = Flow::new(s)?;
        flow.shared.admission = admission;
        flow.shared.listen_addr = listen_addr;
        let (stop, stopped) = async_channel::bounded::<()>(1);
        for r in &flow.routes {
            let pool = format!("{}{}", flow.shared.name, r.config.path);
            if let Some(check) = &r.config.health_check {
                let tls = flow.shared.connector.clone();
                let header = r.config.send_proxy_protocol;
                health::spawn_checks(net, &pool, r.pool.backends(), check, &stopped, tls, header);
            }
            let every = Duration::from_millis(r.config.balancing.resolve_interval_ms);
            balancer::spawn_resolver(net, &pool, r.pool.backends(), every, &stopped);
        }
        flow.shared.stop = std::sync::Mutex::new(Some(stop));
        let pools = flow.routes.iter().map(|r| {
            let name = format!("{}{}", flow.shared.name, r.config.path);
            (name, r.pool.backends().to_vec())
        });
        flow.shared.metrics.set_pools(pools.collect());
        Ok(Arc::new(flow))
    }

    fn open_tunnel<N: Net>(
        self: Arc<Self>,
        net: N,
        client: N::Stream,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Box<limit::Tunnel<N::Stream>>>> + Send + 'static {
        self.open(net, client, peer)
    }

    fn shared(&self) -> &server::Shared {
        &self.shared
    }
}

/// What every connection of one WebSocket proxy shares.
pub(crate) struct Flow {
    shared: server::Shared,
    read_timeout: Duration,
    upgrade_timeout: Duration,
    max_head: usize,
    health_path: Option<String>,
    routes: Vec<Route>,
}

/// A configured route with its pool.
struct Route {
    config: WsRoute,
    forward: ForwardOptions,
    retry: Retry,
    pool: Pool,
}

impl Flow {
    fn new(s: WsSection) -> Result<Flow, Error> {
        let bad = |why: String| Error::Config(format!("ws proxy {}: {why}", s.name));
        if s.connect_timeout_ms == 0 || s.read_timeout_ms == 0 || s.upgrade_timeout_ms == 0 {
            return Err(bad("timeouts must be positive".into()));
        }
        // Certificates are read here, so a reload (which starts a new flow) picks up renewed
        // files, and a bad one keeps the running flow.
        let acceptor = match s.tls.is_empty() {
            true => None,
            false => Some(tls::Acceptor::new(&s.tls, true).map_err(bad)?),
        };
        let mut routes = Vec::new();
        let mut wss = false;
        for r in &s.routes {
            let name = format!("{}{}", s.name, r.path);
            let pool = Pool::from_config(&name, &r.backends, &r.balancing, true)
                .map_err(|why| bad(format!("route {}: {why}", r.path)))?;
            wss |= pool.backends().iter().any(|b| b.is_tls());
            routes.push(Route {
                config: r.clone(),
                forward: ForwardOptions {
                    https: acceptor.is_some(),
                    ..ForwardOptions::from(r)
                },
                retry: Retry::from_config(&r.balancing, s.connect_timeout_ms),
                pool,
            });
        }
        if routes.is_empty() {
            return Err(bad("no backends".into()));
        }
        let connector = match (wss, &s.upstream_tls) {
            (false, _) => None,
            (true, Some(u)) => Some(Arc::new(tls::Connector::new(u, &s.name).map_err(bad)?)),
            (true, None) => Some(Arc::new(
                tls::Connector::new(&config::UpstreamTls::default(), &s.name).map_err(bad)?,
            )),
        };
        Ok(Flow {
            shared: server::Shared {
                admission: limit::Admission::new(
                    &s.name,
                    s.limits.clone(),
                    None,
                    std::time::Instant::now(),
                ),
                metrics: metrics::section("ws", &s.name),
                name: s.name.into(),
                stop: std::sync::Mutex::new(None),
                listen_addr: None,
                acceptor,
                connector,
                congestion_control: s.congestion_control,
            },
            read_timeout: Duration::from_millis(s.read_timeout_ms),
            upgrade_timeout: Duration::from_millis(s.upgrade_timeout_ms),
            max_head: s.max_request_head_bytes,
            health_path: s.health_path,
            routes,
        })
    }

    /// Everything before the tunnel: PROXY header, TLS, limits, the upgrade with its answer.
    /// `None` when the connection ended here (its access line written).
    async fn open<N: Net>(
        self: Arc<Self>,
        net: N,
        mut client: N::Stream,
        peer: SocketAddr,
    ) -> Option<Box<limit::Tunnel<N::Stream>>> {
        let started = net.now();
        let open = self.shared.metrics.open();
        let mut log = Access {
            kind: "ws",
            section: self.shared.name.clone(),
            client: Some(peer),
            ..Access::default()
        };
        // Behind a load balancer, the client is who its PROXY header says.
        let (peer, early) = match &self.shared.admission.limits().accept_proxy_protocol {
            None => (peer, Vec::new()),
            Some(accept) => {
                let limit = self.read_timeout;
                match server::accept_proxy(&net, &mut client, peer, accept, limit).await {
                    Ok(found) => found,
                    Err(why) => {
                        warn!("ws name={} closed: {why}", self.shared.name);
                        self.shared.metrics.refused_proxy_header();
                        return None;
                    }
                }
            }
        };
        log.client = Some(peer);
        let admitted = self.shared.admission.admit(peer.ip(), started);
        // On a TLS listener, the handshake first (within the read timeout, as the head): every
        // answer after it, a refusal included, goes over TLS.
        // The address the client reached, for a PROXY header to the backend; asked of the
        // socket (one system call) only when a route sends one.
        let sends_proxy_header = self
            .routes
            .iter()
            .any(|r| r.config.send_proxy_protocol.is_some());
        let local = sends_proxy_header
            .then(|| net.local_addr(&client).ok())
            .flatten();
        let (mut client, early) = match &self.shared.acceptor {
            None => (tls::Stream::Plain(client), early),
            Some(acceptor) => {
                let limit = self.read_timeout;
                match Box::pin(tls::accept(&net, acceptor, client, early, limit)).await {
                    Ok(Ok(stream)) => {
                        log.tls = stream.protocol();
                        (stream, Vec::new())
                    }
                    Ok(Err((mut plain, _))) => {
                        warn!("ws name={} client={peer} TLS handshake failed (not_tls): the client speaks plain HTTP to a TLS listener", self.shared.name);
                        self.shared.metrics.tls_handshake_failed("not_tls");
                        let text = "this listener speaks TLS: connect with wss:// or https://";
                        let bytes = handshake::response(400, text, &[]);
                        Box::pin(self.answer(&net, &mut plain, &bytes)).await;
                        log.status = Some(400);
                        log.end = "refused: plain HTTP to a TLS listener".into();
                        log.duration_ms = net.now().duration_since(started).as_millis() as u64;
                        log.closed(&self.shared.metrics);
                        return None;
                    }
                    Err(e) => {
                        let reason = tls::failure_reason(&e);
                        warn!(
                            "ws name={} client={peer} TLS handshake failed ({reason}): {e}",
                            self.shared.name
                        );
                        self.shared.metrics.tls_handshake_failed(reason);
                        log.end = format!("client TLS handshake failed: {reason}");
                        log.duration_ms = net.now().duration_since(started).as_millis() as u64;
                        log.closed(&self.shared.metrics);
                        return None;
                    }
                }
            }
        };
        // A connection answered with an error keeps its place under the limits until the
        // answer is written.
        let mut _held = None;
        let outcome = match admitted {
            // Boxed, so the tunnel's task does not keep the handshake's ~10 KiB state for
            // its whole life.
            Ok(ticket) => {
                match Box::pin(self.upgrade(&net, &mut client, local, peer, early, &mut log)).await
                {
                    Ok((upstream, to_client, lease)) => Ok((upstream, to_client, lease, ticket)),
                    Err(ended) => {
                        _held = Some(ticket);
                        Err(ended)
                    }
                }
            }
            Err(why) => {
                self.shared.metrics.refused(why);
                Err(over_capacity("over a connection limit"))
            }
        };
        if let Some(status) = match &outcome {
            Ok(_) => Some(101),
            Err(Ended::Refused(refusal)) => Some(refusal.status()),
            Err(Ended::Answered { status, .. }) => Some(*status),
            Err(Ended::Quietly(_)) => None,
        } {
            self.shared
                .metrics
                .handshake(status, net.now().duration_since(started));
        }
        match outcome {
            Ok((upstream, to_client, lease, ticket)) => {
                log.connect_ms = Some(net.now().duration_since(started).as_millis() as u64);
                log.opened();
                return Some(Box::new(limit::Tunnel {
                    client,
                    upstream,
                    to_backend: Vec::new(),
                    to_client,
                    log,
                    started,
                    max_age: self.shared.admission.max_age(u64::from(peer.port())),
                    _ticket: ticket,
                    _lease: lease,
                    _open: open,
                }));
            }
            Err(Ended::Refused(refusal)) => {
                log.status = Some(refusal.status());
                log.end = format!("refused: {refusal}");
                Box::pin(self.answer(&net, &mut client, &refusal.to_bytes())).await;
            }
            Err(Ended::Answered { status, bytes, why }) => {
                log.status = Some(status);
                log.end = why;
                Box::pin(self.answer(&net, &mut client, &bytes)).await;
            }
            Err(Ended::Quietly(why)) => log.end = why,
        }
        log.duration_ms = net.now().duration_since(started).as_millis() as u64;
        log.closed(&self.shared.metrics);
        None
    }

    async fn answer<S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin>(
        &self,
        net: &impl Net,
        client: &mut S,
        bytes: &[u8],
    ) {
        let sent = net::timeout(net, self.read_timeout, async {
            client.write_all(bytes).await?;
            client.close().await
        })
        .await;
        if sent.is_err() {
            return;
        }
        // Lingering close, as nginx does: closing a socket with unread input makes the kernel
        // send a reset, which can destroy the response before the client reads it (a 431 for
        // a head the client is still sending). So read and discard for a bounded while first.
        let _ = net::timeout(net, LINGER, async {
            let mut sink = [0u8; 4096];
            let mut left = LINGER_BYTES;
            while left > 0 {
                match client.read(&mut sink).await? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            Ok(())
        })
        .await;
    }

    /// Everything up to an established tunnel: returns the backend stream and the bytes owed to
    /// the client (the backend's 101 and whatever followed it).
    async fn upgrade<N: Net>(
        &self,
        net: &N,
        client: &mut tls::Stream<N::Stream>,
        local: Option<SocketAddr>,
        peer: SocketAddr,
        early: Vec<u8>,
        log: &mut Access,
    ) -> Result<(tls::Stream<N::Stream>, Vec<u8>, Lease), Ended> {
        // Bytes that came behind a PROXY header are the start of the request head. A client
        // that has sent nothing when the drain starts is closed then, or a second after its
        // accept if that is later (its request may be on the way).
        let idle = early.is_empty();
        let client = limit::UntilDraining::new(&mut *client, net, &self.shared.admission, idle);
        let mut reader = futures_lite::io::Cursor::new(early).chain(client);
        let head = match net::timeout(
            net,
            self.read_timeout,
            read_head(&mut reader, self.max_head),
        )
        .await
        {
            Ok(head) => head,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Ended::Refused(Refusal::RequestTimeout))
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(Ended::Refused(Refusal::HeadTooLarge))
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Ended::Quietly(
                    "client closed before its request head ended".into(),
                ))
            }
            Err(e) if limit::is_draining(&e) => {
                return Err(Ended::Quietly("closed at shutdown: no request yet".into()))
            }
            Err(e) => return Err(Ended::Quietly(format!("client error: {e}"))),
        };
        let request = match handshake::parse_request(&head.bytes).map_err(Ended::Refused)? {
            Incoming::Upgrade(request) => request,
            Incoming::PlainGet(r) => {
                log.path = Some(r.target().to_string());
                return Err(match &self.health_path {
                    Some(p) if p == r.path() => Ended::Answered {
                        status: 200,
                        bytes: handshake::response(200, "ok", &[]),
                        why: "health check".into(),
                    },
                    _ => Ended::Refused(Refusal::NotUpgrade),
                });
            }
        };
        log.path = Some(request.target().to_string());
        let route = route::find(&self.routes, request.host(), request.target(), |r| {
            &r.config
        })
        .ok_or(Ended::Refused(Refusal::NoRoute))?;
        if let Some(allowed) = &route.config.allowed_origins {
            if !request
                .origin()
                .is_some_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)))
            {
                return Err(Ended::Refused(Refusal::OriginNotAllowed));
            }
        }
        log.up = head.rest.len() as u64;
        log.route = Some(route.config.path.clone());

        let key = hash_key(&route.config.balancing.hash_key, &request, peer);
        let mut attempts = route.pool.attempts(Some(key), route.retry, net.now());
        // Nothing eligible at all (every backend ejected, down or full): 503, as the client
        // should come back later; otherwise the last backend's failure decides.
        let mut last = Ended::Refused(Refusal::NoBackend);
        while let Some(mut lease) = attempts.next(net.now()) {
            let backend = lease.backend().addr().to_string();
            let backend_ref = lease.backend();
            log.backend = Some(backend.clone());
            let target =
                route::backend_target(&route.config, lease.backend().path(), request.target());
            let sent = handshake::forward(&request, &target, &backend, peer.ip(), &route.forward)
                .map_err(Ended::Refused)?;
            let limit = attempts.connect_timeout(net.now());
            let proxy_header = route.config.send_proxy_protocol.map(|v| {
                let dest = local.or(self.shared.listen_addr).unwrap_or(peer);
                proxy_protocol::encode(v, peer, dest)
            });
            let tried = net.now();
            let mut connect_took = None;
            let attempt = async {
                // The upgrade request (or the TLS ClientHello) goes out at once.
                let connect = backend_ref.connect_speaking(net);
                let mut upstream = net::timeout(net, limit, connect).await?;
                self.shared.congestion(net, &upstream);
                connect_took = Some(net.now().duration_since(tried));
                let mut upstream = match (&self.shared.connector, backend_ref.is_tls()) {
                    (Some(c), true) => {
                        // The PROXY header goes first, on the raw connection, before TLS.
                        if let Some(header) = &proxy_header {
                            upstream.write_all(header).await?;
                        }
                        let host = backend_ref.host();
                        let left = limit.saturating_sub(net.now().duration_since(tried));
                        let handshake = Box::pin(c.connect(host, upstream));
                        net::timeout(net, left, handshake).await?
                    }
                    _ => tls::Stream::Plain(upstream),
                };
                // The client's pipelined bytes go right behind the head: they are the tunnel's
                // first bytes, and a backend that answers 101 expects them next.
                let mut out = Vec::with_capacity(sent.head.len() + head.rest.len() + 64);
                if let (Some(header), false) = (&proxy_header, upstream.is_tls()) {
                    out.extend_from_slice(header);
                }
                out.extend_from_slice(&sent.head);
                out.extend_from_slice(&head.rest);
                upstream.write_all(&out).await?;
                upstream.flush().await?;
                Ok::<_, io::Error>(upstream)
            };
            let attempted = attempt.await;
            if let Some(took) = connect_took {
                self.shared.metrics.connected(&backend, took);
            }
            let mut upstream = match attempted {
                Ok(s) => s,
                Err(e) if limit::is_exhaustion(&e) => {
                    // This process is out of descriptors, not the backend at fault: 503, as
                    // over a limit, and nothing recorded against the backend's health.
                    let why = limit::Refused::Exhausted;
                    self.shared.admission.refuse(why, peer.ip(), net.now());
                    self.shared.metrics.refused(why);
                    return Err(over_capacity("refused: out of file descriptors"));
                }
                Err(e) => {
                    warn!(
                        "ws name={} client={peer} cannot connect to backend {backend}: {e}",
                        self.shared.name
                    );
                    let reason = match connect_took {
                        None => metrics::failure_reason(&e),
                        Some(_) if tls::is_backend_handshake(&e) => "tls_handshake",
                        Some(_) => "upgrade_error",
                    };
                    self.shared.metrics.connect_failed(&backend, reason);
                    lease.failed(net.now());
                    // As nginx: the last backend's failure decides, 504 for a timeout.
                    last = Ended::Refused(if e.kind() == io::ErrorKind::TimedOut {
                        Refusal::GatewayTimeout
                    } else {
                        Refusal::BadGateway
                    });
                    continue;
                }
            };
            let answer = net::timeout(
                net,
                self.upgrade_timeout,
                read_head(&mut upstream, BACKEND_HEAD_MAX),
            )
            .await;
            let answer = match answer {
                Ok(h) => h,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    // As nginx's default (proxy_next_upstream error timeout): nothing has
                    // reached the client yet, so the next backend may still serve it; 504 when
                    // this was the last one.
                    warn!("ws name={} client={peer} backend {backend} did not answer the upgrade in time", self.shared.name);
                    self.shared
                        .metrics
                        .connect_failed(&backend, "upgrade_timeout");
                    lease.failed(net.now());
                    last = Ended::Refused(Refusal::GatewayTimeout);
                    continue;
                }
                Err(e) => {
                    // The backend went away (or sent garbage) before answering: nothing has
                    // reached the client yet, so another backend may still serve it.
                    warn!(
                        "ws name={} client={peer} backend {backend} failed during the upgrade: {e}",
                        self.shared.name
                    );
                    self.shared
                        .metrics
                        .connect_failed(&backend, "upgrade_error");
                    lease.failed(net.now());
                    last = Ended::Refused(Refusal::BadGateway);
                    continue;
                }
            };
            return match sent.check_response(&answer.bytes) {
                Ok(Response::Accepted) => {
                    lease.succeeded();
                    log.status = Some(101);
                    let mut to_client = answer.bytes;
                    to_client.extend_from_slice(&answer.rest);
                    Ok((upstream, to_client, lease))
                }
                Ok(Response::Refused {
                    status,
                    content_length,
                    chunked,
                }) => {
                    // It answered: alive, whatever it thinks of this request.
                    lease.succeeded();
                    let bytes = pass_through(
                        net,
                        self.upgrade_timeout,
                        &mut upstream,
                        answer,
                        content_length,
                        chunked,
                    )
                    .await;
                    Err(Ended::Answered {
                        status,
                        bytes,
                        why: format!("backend refused with {status}"),
                    })
                }
                Err(bad) => {
                    // Not recorded against its health: it is up and answering (health counts
                    // connect failures and timeouts), only its answer is wrong.
                    warn!("ws name={} client={peer} backend {backend} gave a bad upgrade response: {bad:?}", self.shared.name);
                    self.shared.metrics.connect_failed(&backend, "bad_response");
                    Err(Ended::Refused(Refusal::from(bad)))
                }
            };
        }
        Err(last)
    }
}

/// The hash key of a request for [`Balance::Hash`](crate::balancer::Balance::Hash): the
/// named header, cookie or query parameter, or the client's IP when the request has none.
fn hash_key(key: &HashKey, request: &handshake::Request, peer: SocketAddr) -> u64 {
    let value: Option<&[u8]> = match key {
        HashKey::ClientIp => None,
        HashKey::Header(name) => request.header(name),
        HashKey::Cookie(name) => request.values("cookie").find_map(|v| {
            v.split(|&b| b == b';').find_map(|pair| {
                let pair = pair.trim_ascii();
                let (n, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
                (n == name.as_bytes()).then(|| &v[1..])
            })
        }),
        HashKey::Query(name) => request.target().split_once('?').and_then(|(_, q)| {
            q.split('&')
                .find_map(|pair| pair.strip_prefix(name.as_str())?.strip_prefix('='))
                .map(str::as_bytes)
        }),
    };
    match value {
        Some(v) => policy::hash_key(v),
        None => client_ip_key(peer.ip()),
    }
}

/// Reads a head of at most `max` bytes; an over-long head is `InvalidData`, an early EOF
/// `UnexpectedEof`.
async fn read_head<R: futures_lite::AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Head> {
    handshake::read_head(r, max).await.map_err(|e| match e {
        HeadError::TooLarge => io::Error::new(io::ErrorKind::InvalidData, "head too large"),
        HeadError::Eof { .. } => io::ErrorKind::UnexpectedEof.into(),
        HeadError::Io(e) => e,
    })
}

/// A refusing backend's head, and its body up to [`MAX_REFUSAL_BODY`] and `content_length`,
/// read within `limit`.
async fn pass_through<S: futures_lite::AsyncRead + Unpin>(
    net: &impl Net,
    limit: Duration,
    upstream: &mut S,
    head: Head,
    content_length: Option<u64>,
    chunked: bool,
) -> Vec<u8> {
    let body = content_length.map_or(MAX_REFUSAL_BODY, |n| {
        usize::try_from(n).unwrap_or(usize::MAX)
    });
    let head_len = head.bytes.len();
    let mut want = head_len + body.min(MAX_REFUSAL_BODY);
    let mut bytes = head.bytes;
    bytes.extend_from_slice(&head.rest);
    let _ = net::timeout(net, limit, async {
        let mut chunk = [0u8; 4096];
        while bytes.len() < want {
            // A chunked body says where it ends; the backend may keep the connection open.
            if let Some(end) = chunked
                .then(|| handshake::chunked_body_len(&bytes[head_len..]))
                .flatten()
            {
                want = want.min(head_len + end);
                break;
            }
            let n = upstream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    })
    .await;
    bytes.truncate(want);
    bytes
}

/// 503 with `Retry-After`, for a client the proxy cannot take now; `why` is the log's `end`.
fn over_capacity(why: &str) -> Ended {
    Ended::Answered {
        status: 503,
        bytes: handshake::response(503, "over capacity, retry shortly", &[("Retry-After", "1")]),
        why: why.into(),
    }
}

/// How a connection ended before it became a tunnel.
enum Ended {
    /// The client gets this refusal, then the connection is closed.
    Refused(Refusal),
    /// The client gets these bytes (a health answer, or a backend's own refusal), then the
    /// connection is closed.
    Answered {
        status: u16,
        bytes: Vec<u8>,
        why: String,
    },
    /// Nothing to tell the client (it left, or its socket failed).
    Quietly(String),
}
