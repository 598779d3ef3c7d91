//! The L4 flow: a client's bytes go to one backend and back, unchanged.
//!
//! Accept → pick a backend (round robin) → connect with a timeout, failing over to the next
//! backend → relay until both sides have closed → one access-log line.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balancer::{self, Balance, Pool, Retry};
use crate::config::{BackendConfig, Balancing, TcpSection};
use crate::health;
use crate::limit;
use crate::log::{warn, Access};
use crate::metrics;
use crate::net;
use crate::net::Net;
use crate::policy;
use crate::proxy_protocol;
use crate::relay::Report;
use crate::server;
use crate::tls;
use crate::Error;
use futures_lite::AsyncWriteExt;

/// The connect timeout when none is configured, as in rws.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// How long a shutdown waits for established connections when none is configured.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;

/// How long a TCP client has for its TLS handshake on a `tls` listener, or to send its
/// ClientHello to a listener with `sni_route`s. A TCP section has no request head whose read
/// timeout could bound it; 10 s covers a handshake across a slow mobile link, and a client
/// that sends nothing is closed rather than held.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP (layer 4) proxy: every accepted connection is tunnelled to one backend of a pool.
///
/// Defaults: round robin over the backends in the order given, a connect timeout of 5000 ms after
/// which the next backend is tried (each backend at most once per connection), no timeout at all
/// on an established tunnel, and a drain of up to 30000 ms on shutdown.
///
/// # Examples
///
/// Blocking, as a whole program:
///
/// ```no_run
/// use portcullis::TcpProxy;
///
/// TcpProxy::new(["db-1:5432", "db-2:5432"])
///     .connect_timeout_ms(3_000)
///     .bind("0.0.0.0:5432")?;
/// # Ok::<(), portcullis::Error>(())
/// ```
///
/// Inside an application's own smol executor, with a shutdown signal:
///
/// ```no_run
/// use portcullis::TcpProxy;
///
/// # smol::block_on(async {
/// let listener = async_net::TcpListener::bind("127.0.0.1:0").await?;
/// let (stop, stopped) = smol::channel::bounded::<()>(1);
/// let proxy = TcpProxy::new(["127.0.0.1:6379"]).serve(listener, async move {
///     let _ = stopped.recv().await;
/// });
/// # drop(stop);
/// proxy.await?;
/// # Ok::<(), portcullis::Error>(()) })?;
/// # Ok::<(), portcullis::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TcpProxy {
    section: TcpSection,
    drain_timeout: Duration,
}

impl TcpProxy {
    /// A proxy over `backends` (`"host:port"` each; host names are resolved at each connect).
    pub fn new<I, S>(backends: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TcpProxy::from_section(TcpSection {
            name: "tcp".to_string(),
            listen: String::new(),
            backends: backends
                .into_iter()
                .map(|b| BackendConfig::new(b))
                .collect(),
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            balancing: Balancing::default(),
            health_check: None,
            send_proxy_protocol: None,
            limits: crate::limit::Limits::default(),
            reuse_port: false,
            congestion_control: None,
            tls: Vec::new(),
            upstream_tls: None,
            sni_routes: Vec::new(),
        })
    }

    /// A proxy as a validated `[[tcp_proxy]]` section describes it (weights, backups, policy,
    /// health); its `listen` is used by [`crate::run`], not here.
    pub fn from_section(section: TcpSection) -> Self {
        TcpProxy {
            section,
            drain_timeout: Duration::from_millis(DEFAULT_DRAIN_TIMEOUT_MS),
        }
    }

    /// The name this proxy's log lines carry (default `tcp`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.section.name = name.into();
        self
    }

    /// How long one connect to one backend may take before the next backend is tried
    /// (default 5000 ms).
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

    /// How connections are spread over the backends (default round robin).
    pub fn balance(mut self, balance: Balance) -> Self {
        self.section.balancing.balance = balance;
        self
    }

    /// How long, after shutdown, established connections may go on before they are closed
    /// (default 30000 ms).
    pub fn drain_timeout_ms(mut self, ms: u64) -> Self {
        self.drain_timeout = Duration::from_millis(ms);
        self
    }

    /// Listens on `addr` and proxies until the process ends, on as many threads as the machine
    /// has cores. Fails if there are no backends or `addr` cannot be bound.
    pub fn bind(self, addr: &str) -> Result<(), Error> {
        server::block_on(|net| async move {
            let listener = server::bind(&net, addr).await?;
            self.serve_with(net, listener, futures_lite::future::pending())
                .await
        })
    }

    /// Proxies connections from `listener` until `shutdown` completes, then waits for established
    /// connections to end (up to the drain timeout). Connection tasks run inside the returned
    /// future, so it runs on whichever executor polls it.
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

    /// [`TcpProxy::serve`] on any [`Net`]: the simulator's, or a [`SmolNet`](crate::SmolNet)
    /// spawning onto an executor of the caller's.
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
    type Section = TcpSection;
    const KIND: &'static str = "tcp";
    const CLIENT_SPEAKS_FIRST: bool = false;

    fn section_name(section: &TcpSection) -> &str {
        &section.name
    }

    fn backend_names(section: &TcpSection) -> Vec<String> {
        section.backends.iter().map(|b| b.address.clone()).collect()
    }

    fn congestion_control(section: &TcpSection) -> Option<&str> {
        section.congestion_control.as_deref()
    }

    /// A flow as `s` configures it, with its health checks and resolver running on `net`.
    fn start<N: Net>(
        net: &N,
        s: TcpSection,
        listen_addr: Option<SocketAddr>,
        global: Option<Arc<limit::Global>>,
    ) -> Result<Arc<Self>, Error> {
        let bad = |why: String| Error::Config(format!("tcp proxy {}: {why}", s.name));
        if s.connect_timeout_ms == 0 {
            return Err(bad("the connect timeout must be positive".into()));
        }
        let tls_pool = |name: &str, backends: &[crate::config::BackendConfig]| match s
            .upstream_tls
            .is_some()
        {
            true => Pool::from_config_tls(name, backends, &s.balancing),
            false => Pool::from_config(name, backends, &s.balancing, false),
        };
        let pool = tls_pool(&s.name, &s.backends).map_err(bad)?;
        // Certificates are read here, so a reload (which starts a new flow) picks up renewed
        // files, and a bad one keeps the running flow.
        let acceptor = match s.tls.is_empty() {
            true => None,
            false => Some(tls::Acceptor::new(&s.tls, false).map_err(bad)?),
        };
        let connector = match &s.upstream_tls {
            Some(u) => Some(Arc::new(tls::Connector::new(u, &s.name).map_err(bad)?)),
            None => None,
        };
        let mut sni = Vec::new();
        for r in &s.sni_routes {
            let name = format!("{}[{}]", s.name, r.server_name);
            let pool = tls_pool(&name, &r.backends).map_err(bad)?;
            sni.push((r.server_name.clone(), pool));
        }
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let resolve_every = Duration::from_millis(s.balancing.resolve_interval_ms);
        let mut pools = vec![(s.name.clone(), &pool)];
        pools.extend(sni.iter().map(|(n, p)| (format!("{}[{n}]", s.name), p)));
        for (name, p) in &pools {
            if let Some(check) = &s.health_check {
                let tls = connector.clone();
                let header = s.send_proxy_protocol;
                health::spawn_checks(net, name, p.backends(), check, &stopped, tls, header);
            }
            balancer::spawn_resolver(net, name, p.backends(), resolve_every, &stopped);
        }
        let metrics = metrics::section("tcp", &s.name);
        metrics.set_pools(
            pools
                .iter()
                .map(|(n, p)| (n.clone(), p.backends().to_vec()))
                .collect(),
        );
        Ok(Arc::new(Flow {
            shared: server::Shared {
                admission: limit::Admission::new(&s.name, s.limits, global, net.now()),
                name: s.name.into(),
                stop: std::sync::Mutex::new(Some(stop)),
                listen_addr,
                metrics,
                acceptor,
                connector,
                congestion_control: s.congestion_control,
            },
            sni,
            retry: Retry::from_config(&s.balancing, s.connect_timeout_ms),
            pool,
            proxy_protocol: s.send_proxy_protocol,
        }))
    }

    fn open_tunnel<N: Net>(
        self: Arc<Self>,
        net: N,
        client: N::Stream,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Box<limit::Tunnel<N::Stream>>>> + Send + 'static {
        self.connect(net, client, peer)
    }

    fn shared(&self) -> &server::Shared {
        &self.shared
    }
}

/// What every connection of one TCP proxy shares.
pub(crate) struct Flow {
    shared: server::Shared,
    pool: Pool,
    retry: Retry,
    /// The PROXY protocol header to send each backend first, if any.
    proxy_protocol: Option<proxy_protocol::Version>,
    /// `[[tcp_proxy.sni_route]]`s in file order: a name pattern and its pool.
    sni: Vec<(String, Pool)>,
}

impl Flow {
    /// A TLS listener's handshake, or an `sni_route` listener's peek at the ClientHello:
    /// the client's stream, the bytes that belong to the tunnel, and the server name the
    /// client asked for. `Err(end)` when the connection ends here (warned and counted; `end`
    /// for its access line).
    async fn open<N: Net>(
        &self,
        net: &N,
        mut client: N::Stream,
        early: Vec<u8>,
        peer: SocketAddr,
    ) -> Result<(tls::Stream<N::Stream>, Vec<u8>, Option<String>), String> {
        let limit = TLS_HANDSHAKE_TIMEOUT;
        if let Some(acceptor) = &self.shared.acceptor {
            return match tls::accept(net, acceptor, client, early, limit).await {
                Ok(Ok(stream)) => {
                    let name = stream.server_name().map(str::to_string);
                    Ok((stream, Vec::new(), name))
                }
                Ok(Err((mut client, _))) => {
                    warn!(
                        "tcp name={} client={peer} TLS handshake failed (not_tls): the client does not speak TLS",
                        self.shared.name
                    );
                    self.shared.metrics.tls_handshake_failed("not_tls");
                    let _ = net::timeout(net, limit, client.close()).await;
                    Err("refused: not TLS, to a TLS listener".into())
                }
                Err(e) => {
                    let reason = tls::failure_reason(&e);
                    warn!(
                        "tcp name={} client={peer} TLS handshake failed ({reason}): {e}",
                        self.shared.name
                    );
                    self.shared.metrics.tls_handshake_failed(reason);
                    Err(format!("client TLS handshake failed: {reason}"))
                }
            };
        }
        if self.sni.is_empty() {
            return Ok((tls::Stream::Plain(client), early, None));
        }
        match net::timeout(net, limit, tls::peek_sni(&mut client, early)).await {
            Ok((hello, bytes)) => {
                let name = match hello {
                    tls::Hello::Tls(name) => name,
                    // Not TLS: no name to route by, so the section's own backends.
                    _ => None,
                };
                Ok((tls::Stream::Plain(client), bytes, name))
            }
            Err(e) => {
                warn!(
                    "tcp name={} client={peer} closed: no ClientHello to route by: {e}",
                    self.shared.name
                );
                Err(format!("client sent no ClientHello to route by: {e}"))
            }
        }
    }

    /// Everything before the tunnel; `None` when the connection ended here (refused, or no
    /// backend could be reached: its access line written).
    async fn connect<N: Net>(
        self: Arc<Self>,
        net: N,
        mut client: N::Stream,
        peer: SocketAddr,
    ) -> Option<Box<limit::Tunnel<N::Stream>>> {
        let started = net.now();
        let open = self.shared.metrics.open();
        // Behind a load balancer, the client is who its PROXY header says.
        let (peer, early) = match &self.shared.admission.limits().accept_proxy_protocol {
            None => (peer, Vec::new()),
            Some(accept) => {
                let limit = server::PROXY_HEADER_TIMEOUT;
                match server::accept_proxy(&net, &mut client, peer, accept, limit).await {
                    Ok(found) => found,
                    Err(why) => {
                        warn!("tcp name={} closed: {why}", self.shared.name);
                        self.shared.metrics.refused_proxy_header();
                        return None;
                    }
                }
            }
        };
        // Over a limit: closed at once (TCP has no way to say why); the refusal is logged,
        // at most once a second.
        let ticket = match self.shared.admission.admit(peer.ip(), started) {
            Ok(ticket) => ticket,
            Err(why) => {
                self.shared.metrics.refused(why);
                return None;
            }
        };
        // The address the client reached, for a PROXY header to the backend; asked of the
        // socket (one system call) only when one is sent.
        let local = self
            .proxy_protocol
            .and_then(|_| net.local_addr(&client).ok());
        // Boxed, as the connect below: the TLS handshake's and the connect's state (several
        // KiB with TLS) is freed when the tunnel opens, rather than kept for its whole life.
        let mut access = Access {
            kind: "tcp",
            section: self.shared.name.clone(),
            client: Some(peer),
            ..Access::default()
        };
        let opened = Box::pin(self.open(&net, client, early, peer)).await;
        let (client, early, server_name) = match opened {
            Ok(opened) => {
                access.tls = opened.0.protocol();
                opened
            }
            Err(end) => {
                access.end = end;
                access.duration_ms = net.now().duration_since(started).as_millis() as u64;
                access.closed(&self.shared.metrics);
                return None;
            }
        };
        let pool = server_name
            .as_deref()
            .and_then(|n| self.sni.iter().find(|(p, _)| tls::name_matches(p, n)))
            .map_or(&self.pool, |(_, pool)| pool);
        let key = client_ip_key(peer.ip());
        let mut attempts = pool.attempts(Some(key), self.retry, started);
        let mut connected = None;
        let mut exhausted = false;
        while let Some(mut lease) = attempts.next(net.now()) {
            let limit = attempts.connect_timeout(net.now());
            let header = self.proxy_protocol.map(|v| {
                let dest = local.or(self.shared.listen_addr).unwrap_or(peer);
                proxy_protocol::encode(v, peer, dest)
            });
            let connect = async {
                let mut stream = lease.backend().connect(&net).await?;
                self.shared.congestion(&net, &stream);
                // The PROXY header goes first, on the raw connection, before any TLS.
                if let Some(header) = header {
                    stream.write_all(&header).await?;
                }
                match &self.shared.connector {
                    Some(c) => c.connect(lease.backend().host(), stream).await,
                    None => Ok(tls::Stream::Plain(stream)),
                }
            };
            let tried = net.now();
            match net::timeout(&net, limit, Box::pin(connect)).await {
                Ok(stream) => {
                    let took = net.now().duration_since(tried);
                    self.shared.metrics.connected(lease.backend().addr(), took);
                    lease.succeeded();
                    connected = Some((stream, lease));
                    break;
                }
                Err(e) if limit::is_exhaustion(&e) => {
                    // This process is out of descriptors: nothing to hold against the backend,
                    // and no other backend would fare better. Refused, logged once a second.
                    self.shared
                        .admission
                        .refuse(limit::Refused::Exhausted, peer.ip(), net.now());
                    self.shared.metrics.refused(limit::Refused::Exhausted);
                    exhausted = true;
                    break;
                }
                Err(e) => {
                    warn!(
                        "tcp name={} client={peer} cannot connect to backend {}: {e}",
                        self.shared.name,
                        lease.backend()
                    );
                    let reason = match tls::is_backend_handshake(&e) {
                        true => "tls_handshake",
                        false => metrics::failure_reason(&e),
                    };
                    self.shared
                        .metrics
                        .connect_failed(lease.backend().addr(), reason);
                    lease.failed(net.now());
                }
            }
        }
        let Some((upstream, lease)) = connected else {
            access.duration_ms = net.now().duration_since(started).as_millis() as u64;
            access.end = if exhausted {
                "refused: out of file descriptors"
            } else if attempts.leased() == 0 {
                "no backend available"
            } else {
                "every backend tried failed"
            }
            .to_string();
            access.closed(&self.shared.metrics);
            return None;
        };
        access.backend = Some(lease.backend().to_string());
        access.connect_ms = Some(net.now().duration_since(started).as_millis() as u64);
        access.opened();
        Some(Box::new(limit::Tunnel {
            client,
            upstream,
            to_backend: early,
            to_client: Vec::new(),
            log: access,
            started,
            max_age: self.shared.admission.max_age(u64::from(peer.port())),
            _ticket: ticket,
            _lease: lease,
            _open: open,
        }))
    }
}

/// The hash key of a client address: IPv4-mapped IPv6 addresses count as their IPv4 form, so a
/// dual-stack listener keeps a client on one backend.
pub(crate) fn client_ip_key(ip: std::net::IpAddr) -> u64 {
    match ip {
        std::net::IpAddr::V4(v4) => policy::hash_key(&v4.octets()),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => policy::hash_key(&v4.octets()),
            None => policy::hash_key(&v6.octets()),
        },
    }
}

/// How a relay ended, for the access log: which side closed first (`client closed`,
/// `backend closed`), or which side failed and the kind of failure.
pub(crate) fn ending(report: &Report) -> String {
    match (&report.result, report.first_to_close) {
        (Ok(()), Some(side)) => format!("{side} closed"),
        (Ok(()), None) => "closed".to_string(),
        (Err((side, e)), _) => format!("{side} error: {}", e.kind()),
    }
}
