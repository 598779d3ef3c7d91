//! Connection limits: per section, per client IP, and for the whole process.
//!
//! A connection is admitted when it is accepted, and holds a [`Ticket`] until it ends; a
//! refusal names the limit that was reached, so the flow can answer (503 with `Retry-After` for
//! WebSocket, an immediate close for TCP) and the log can say why. Refusals are logged at most
//! once a second per section, with a count, so a flood cannot flood the log too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Open connections per client IP of one section.
type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// The limits of one section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once through this section.
    pub max_connections: Option<usize>,
    /// Connections open at once from one client IP through this section.
    pub max_connections_per_ip: Option<usize>,
    /// Close a tunnel after this long with no byte either way.
    pub idle_timeout_ms: Option<u64>,
    /// Close a tunnel after this long, whatever it is doing (with up to 10% jitter, so a fleet
    /// of tunnels opened together does not reconnect together).
    pub max_connection_age_ms: Option<u64>,
    /// Read a PROXY protocol header first, from trusted peers only; `None`: off.
    pub accept_proxy_protocol: Option<AcceptProxy>,
}

/// Reading a PROXY protocol header from the load balancer in front (`accept_proxy_protocol`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AcceptProxy {
    /// Peers allowed to send one (`trusted_proxies`); a connection from anyone else is closed.
    pub trusted: Vec<Cidr>,
}

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is a range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `addr/prefix` or a bare address.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or(format!("{p:?} is not a prefix length (0-{max})"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the range; an IPv4-mapped IPv6 address counts as its IPv4 form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)) << 96, 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let ((net, width), (host, host_width)) = (bits(self.addr), bits(ip));
        if width != host_width {
            return false;
        }
        let mask = if self.prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix))
        };
        net & mask == host & mask
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The process-wide `max_connections`.
    Global,
    /// The section's `max_connections`.
    Section,
    /// The section's `max_connections_per_ip`.
    PerIp,
    /// The process ran out of file descriptors (or socket buffers) for the backend side.
    Exhausted,
}

impl Refused {
    /// The reason, for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Global => "global max_connections",
            Refused::Section => "section max_connections",
            Refused::PerIp => "max_connections_per_ip",
            Refused::Exhausted => "out of file descriptors",
        }
    }
}

/// Whether an error means this process ran out of a resource (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM) rather than that a peer failed: an accept that would spin if retried at once, or a
/// backend connect that says nothing about the backend's health.
pub(crate) fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
        || e.kind() == std::io::ErrorKind::OutOfMemory
}

/// The process-wide connection count, shared by every section, and the drain deadline's
/// signal.
#[derive(Debug, Default)]
pub struct Global {
    max: Option<usize>,
    open: AtomicUsize,
    /// Closed when the drain deadline passes: tunnels still open end, and log how.
    deadline: Option<async_channel::Receiver<()>>,
    /// Closed when the drain starts: connections that have sent nothing yet are closed.
    draining: Option<async_channel::Receiver<()>>,
}

impl Global {
    /// A process-wide cap of `max` connections (`None`: no cap, only counting).
    pub fn new(max: Option<usize>) -> Arc<Global> {
        Arc::new(Global {
            max,
            open: AtomicUsize::new(0),
            deadline: None,
            draining: None,
        })
    }

    /// As [`Global::new`], with tunnels ended (and logged) when `deadline` closes, and
    /// connections that have sent nothing yet closed when `draining` does.
    pub(crate) fn with_deadline(
        max: Option<usize>,
        deadline: async_channel::Receiver<()>,
        draining: async_channel::Receiver<()>,
    ) -> Arc<Global> {
        Arc::new(Global {
            max,
            open: AtomicUsize::new(0),
            deadline: Some(deadline),
            draining: Some(draining),
        })
    }
}

/// How long a connection that has sent nothing may still wait for its first byte once the drain
/// starts, counted from its accept: one accepted a moment before the shutdown may have its
/// request on the way, while one silent for longer is idle (a port scan, a balancer's TCP check).
pub(crate) const FIRST_BYTE_GRACE: Duration = Duration::from_secs(1);

/// A reader that, until it has returned its first byte, also fails (with [`Draining`]) once
/// the drain has started and the connection has been silent for [`FIRST_BYTE_GRACE`]: a client
/// connected but idle is closed then, not waited for.
pub(crate) struct UntilDraining<'a, N, R> {
    inner: R,
    net: &'a N,
    /// When the silence began: when the reader was made.
    since: Instant,
    draining: Option<std::pin::Pin<Box<async_channel::Recv<'a, ()>>>>,
    /// Set when the drain starts, for a connection still within its grace.
    grace: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>>,
}

impl<'a, N: crate::net::Net, R> UntilDraining<'a, N, R> {
    /// `inner`, cut as above if `admission`'s process has a drain to watch and `idle` (nothing
    /// received yet). Its silence is counted from now: right after the accept (or after the
    /// TLS handshake, on a TLS listener).
    pub(crate) fn new(inner: R, net: &'a N, admission: &'a Admission, idle: bool) -> Self {
        let draining = admission
            .global
            .as_ref()
            .and_then(|g| g.draining.as_ref())
            .filter(|_| idle)
            .map(|d| Box::pin(d.recv()));
        UntilDraining {
            inner,
            net,
            since: net.now(),
            draining,
            grace: None,
        }
    }
}

impl<N, R> futures_lite::AsyncRead for UntilDraining<'_, N, R>
where
    N: crate::net::Net,
    R: futures_lite::AsyncRead + Unpin,
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        let read = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if read.is_ready() {
            this.draining = None;
            this.grace = None;
            return read;
        }
        if let Some(draining) = &mut this.draining {
            if draining.as_mut().poll(cx).is_ready() {
                this.draining = None;
                let silent = this.net.now().duration_since(this.since);
                this.grace = Some(Box::pin(
                    this.net.sleep(FIRST_BYTE_GRACE.saturating_sub(silent)),
                ));
            }
        }
        if let Some(grace) = &mut this.grace {
            if grace.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::other(Draining)));
            }
        }
        read
    }
}

/// The error [`UntilDraining`] fails with.
#[derive(Debug)]
pub(crate) struct Draining;

impl std::fmt::Display for Draining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed at shutdown before sending a byte")
    }
}

impl std::error::Error for Draining {}

/// Whether `e` is [`UntilDraining`]'s.
pub(crate) fn is_draining(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|e| e.is::<Draining>())
}

/// Admission for one section.
#[derive(Debug)]
pub struct Admission {
    name: String,
    limits: Limits,
    global: Option<Arc<Global>>,
    open: Arc<AtomicUsize>,
    per_ip: PerIp,
    /// Refusals since the last log line.
    refused: Throttle,
}

/// Counts one admitted connection until dropped.
#[derive(Debug)]
pub struct Ticket {
    global: Option<Arc<Global>>,
    open: Arc<AtomicUsize>,
    per_ip: Option<(PerIp, IpAddr)>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(g) = &self.global {
            g.open.fetch_sub(1, Ordering::Relaxed);
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some((map, ip)) = &self.per_ip {
            let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(ip);
                }
            }
        }
    }
}

/// Takes a place under `max` on `counter`, or none.
fn take(counter: &AtomicUsize, max: Option<usize>) -> bool {
    let before = counter.fetch_add(1, Ordering::Relaxed);
    if max.is_some_and(|m| before >= m) {
        counter.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

/// Counts events and says when one is due a log line: the first at once, then at most one a
/// second, each with the count since the line before. Shared between tasks without a lock.
#[derive(Debug)]
pub(crate) struct Throttle {
    count: AtomicU64,
    /// When the last line was due, in ms after `epoch` (0: never).
    logged_at: AtomicU64,
    epoch: Instant,
}

impl Throttle {
    pub(crate) fn new(epoch: Instant) -> Self {
        Throttle {
            count: AtomicU64::new(0),
            logged_at: AtomicU64::new(0),
            epoch,
        }
    }

    /// Counts one event at `now`; `Some(n)` when a line is due, for the `n` events since the
    /// last one (this one included).
    pub(crate) fn count(&self, now: Instant) -> Option<u64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let last = self.logged_at.load(Ordering::Relaxed);
        let due = (ms >= last + 1000 || last == 0)
            && self
                .logged_at
                .compare_exchange(last, ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        due.then(|| self.count.swap(0, Ordering::Relaxed))
    }
}

impl Admission {
    /// Admission for the section `name`, under `global` if the process has a cap.
    pub fn new(name: &str, limits: Limits, global: Option<Arc<Global>>, epoch: Instant) -> Self {
        Admission {
            name: name.to_string(),
            limits,
            global,
            open: Arc::new(AtomicUsize::new(0)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            refused: Throttle::new(epoch),
        }
    }

    /// The section's limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits a connection from `ip` at `now`, or says which limit refuses it (and logs, at
    /// most once a second).
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<Ticket, Refused> {
        let refused = self.try_admit(ip);
        if let Err(why) = refused {
            self.refuse(why, ip, now);
        }
        refused
    }

    /// Counts a refusal of a client at `ip` for `why`, and logs it, at most once a second
    /// for the section with the count since the last line.
    pub fn refuse(&self, why: Refused, ip: IpAddr, now: Instant) {
        if let Some(n) = self.refused.count(now) {
            crate::log::warn!(
                "limit name={} refused={n} reason=\"{}\" (last: {ip})",
                self.name,
                why.reason()
            );
        }
    }

    fn try_admit(&self, ip: IpAddr) -> Result<Ticket, Refused> {
        let global = match &self.global {
            Some(g) if !take(&g.open, g.max) => return Err(Refused::Global),
            g => g.clone(),
        };
        if !take(&self.open, self.limits.max_connections) {
            if let Some(g) = &global {
                g.open.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(Refused::Section);
        }
        // From here on, dropping the ticket gives back what was taken.
        let mut ticket = Ticket {
            global,
            open: self.open.clone(),
            per_ip: None,
        };
        if let Some(max) = self.limits.max_connections_per_ip {
            let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(ip).or_default();
            if *n >= max {
                drop(map);
                drop(ticket);
                return Err(Refused::PerIp);
            }
            *n += 1;
            ticket.per_ip = Some((self.per_ip.clone(), ip));
        }
        Ok(ticket)
    }

    /// How long a tunnel may live, with jitter drawn from `seed` (e.g. the client's port), so
    /// tunnels opened together do not all end together: between 90% and 100% of the limit.
    pub fn max_age(&self, seed: u64) -> Option<Duration> {
        self.limits.max_connection_age_ms.map(|ms| {
            let jitter = crate::policy::hash_key(&seed.to_le_bytes()) % (ms / 10 + 1);
            Duration::from_millis(ms - jitter)
        })
    }
}

/// Why a tunnel was ended by the proxy rather than by its peers.
pub(crate) const IDLE: &str = "idle timeout";
/// See [`IDLE`].
pub(crate) const AGE: &str = "max connection age";
/// See [`IDLE`]: still open when the shutdown's drain deadline passed.
pub(crate) const DRAIN: &str = "drain deadline";

/// Completes when a tunnel has moved no byte (per `progress`) for `idle`, or has lived for
/// `age`, whichever comes first, with the reason; never when neither is set.
pub(crate) async fn watchdog<N: crate::net::Net>(
    net: &N,
    progress: &AtomicU64,
    idle: Option<Duration>,
    age: Option<Duration>,
) -> &'static str {
    let idle = async {
        let Some(idle) = idle else {
            return futures_lite::future::pending().await;
        };
        // Checking a quarter of the timeout at a time ends an idle tunnel between 1 and 1.25
        // times the timeout after its last byte, at four timer wake-ups per timeout.
        let tick = (idle / 4).max(Duration::from_millis(1));
        let mut seen = progress.load(Ordering::Relaxed);
        let mut quiet = Duration::ZERO;
        loop {
            net.sleep(tick).await;
            let now = progress.load(Ordering::Relaxed);
            if now == seen {
                quiet += tick;
                if quiet >= idle {
                    return IDLE;
                }
            } else {
                seen = now;
                quiet = Duration::ZERO;
            }
        }
    };
    let age = async {
        match age {
            Some(age) => {
                net.sleep(age).await;
                AGE
            }
            None => futures_lite::future::pending().await,
        }
    };
    futures_lite::future::or(idle, age).await
}

/// An open tunnel: all a connection's task keeps once its handshake is done. The flows build
/// it in a boxed future that is freed when the tunnel opens, so a long-lived tunnel costs this
/// and its relay, not the handshake's state as well.
pub(crate) struct Tunnel<S> {
    pub(crate) client: crate::tls::Stream<S>,
    pub(crate) upstream: crate::tls::Stream<S>,
    /// Bytes read ahead that belong to the tunnel, written before anything else.
    pub(crate) to_backend: Vec<u8>,
    pub(crate) to_client: Vec<u8>,
    /// The access line, written when the tunnel ends.
    pub(crate) log: crate::log::Access,
    pub(crate) started: Instant,
    pub(crate) max_age: Option<Duration>,
    /// Held until the tunnel ends: its place under the limits, its backend lease (for
    /// least-connections), its count in the metrics.
    pub(crate) _ticket: Ticket,
    pub(crate) _lease: crate::balancer::Lease,
    pub(crate) _open: crate::metrics::Open,
}

impl<S> Tunnel<S>
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + Send + 'static,
{
    /// Relays until both sides are done, a limit cuts the tunnel, or the drain deadline
    /// passes; then writes the access line and counts the ending.
    pub(crate) async fn run<N: crate::net::Net<Stream = S>>(
        &mut self,
        net: &N,
        admission: &Admission,
        metrics: &crate::metrics::Section,
    ) {
        let max_age = self.max_age;
        // What the connection moved before the tunnel (the backend's 101 head, passed on), and
        // from here on the tunnel's bytes as they go.
        metrics.relayed(self.log.up, self.log.down);
        let (up, down) = (&mut self.to_backend, &mut self.to_client);
        let (report, cut) = match (&mut self.client, &mut self.upstream) {
            (crate::tls::Stream::Plain(client), crate::tls::Stream::Plain(upstream)) => {
                let mut relay = crate::relay::Relay::new(client, upstream)
                    .pending(std::mem::take(up), std::mem::take(down))
                    .splice();
                run_tunnel(net, &mut relay, admission, max_age, metrics).await
            }
            // TLS on either side: the copying relay, over the TLS streams.
            #[cfg(feature = "tls")]
            (client, upstream) => {
                let mut relay = crate::relay::Relay::new(client, upstream)
                    .pending(std::mem::take(up), std::mem::take(down));
                run_tunnel(net, &mut relay, admission, max_age, metrics).await
            }
        };
        let log = &mut self.log;
        log.up += report.client_to_backend;
        log.down += report.backend_to_client;
        log.end = cut.map_or_else(|| crate::tcp::ending(&report), str::to_string);
        log.duration_ms = net.now().duration_since(self.started).as_millis() as u64;
        log.closed_counted(metrics);
    }
}

/// Runs `relay` under the section's idle timeout and `max_age`, until the drain deadline at
/// most; returns what it did and, when a limit or the deadline ended it, which.
pub(crate) async fn run_tunnel<N, C, B>(
    net: &N,
    relay: &mut crate::relay::Relay<'_, C, B>,
    admission: &Admission,
    max_age: Option<Duration>,
    metrics: &crate::metrics::Section,
) -> (crate::relay::Report, Option<&'static str>)
where
    N: crate::net::Net,
    C: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + ?Sized,
    B: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + ?Sized,
{
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    let idle = admission.limits.idle_timeout_ms.map(Duration::from_millis);
    let deadline = admission.global.as_ref().and_then(|g| g.deadline.as_ref());
    // The relay publishes its progress only when something watches it; by default a quiet
    // tunnel is a healthy one, and only the drain deadline can end it. The watchdog's timers
    // live in a box of their own, so a tunnel without limits does not carry their room.
    let progress = (idle.is_some() || max_age.is_some()).then(|| Arc::new(AtomicU64::new(0)));
    if let Some(p) = &progress {
        relay.set_progress(p.clone());
    }
    let mut watch = progress
        .as_ref()
        .map(|p| Box::pin(watchdog(net, p, idle, max_age)));
    let mut drain = std::pin::pin!(deadline.map(|d| d.recv()));
    // The bytes already given to the metrics.
    let mut counted = (0, 0);
    // One relay, polled in place, and whatever may cut it.
    std::future::poll_fn(|cx| {
        let polled = Pin::new(&mut *relay).poll(cx);
        let moved = relay.moved();
        if moved != counted {
            metrics.relayed(moved.0 - counted.0, moved.1 - counted.1);
            counted = moved;
        }
        if let Poll::Ready(report) = polled {
            return Poll::Ready((report, None));
        }
        let mut why = None;
        if let Some(Poll::Ready(w)) = watch.as_mut().map(|w| w.as_mut().poll(cx)) {
            why = Some(w);
        }
        if let Some(Poll::Ready(_)) = drain.as_mut().as_pin_mut().map(|d| d.poll(cx)) {
            why = Some(DRAIN);
        }
        match why {
            Some(why) => Poll::Ready((relay.report_so_far(Ok(())), Some(why))),
            None => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn section_per_ip_and_global_limits_refuse_and_give_back() {
        let now = Instant::now();
        let global = Global::new(Some(3));
        let limits = Limits {
            max_connections: Some(2),
            max_connections_per_ip: Some(1),
            ..Limits::default()
        };
        let a = Admission::new("a", limits, Some(global.clone()), now);
        let b = Admission::new("b", Limits::default(), Some(global.clone()), now);
        let t1 = a.admit(ip(1), now).unwrap();
        assert_eq!(a.admit(ip(1), now).unwrap_err(), Refused::PerIp);
        let t2 = a.admit(ip(2), now).unwrap();
        assert_eq!(a.admit(ip(3), now).unwrap_err(), Refused::Section);
        let t3 = b.admit(ip(4), now).unwrap();
        assert_eq!(b.admit(ip(5), now).unwrap_err(), Refused::Global);
        assert_eq!(
            global.open.load(Ordering::Relaxed),
            3,
            "refusals give back what they took"
        );
        drop((t1, t3));
        assert_eq!(global.open.load(Ordering::Relaxed), 1);
        let _t4 = a.admit(ip(1), now).expect("its place is free again");
        drop(t2);
        assert_eq!(a.open.load(Ordering::Relaxed), 1);
        assert!(
            a.per_ip.lock().unwrap().get(&ip(2)).is_none(),
            "no entry left for a gone client"
        );
    }

    #[test]
    fn address_ranges() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.0.0.0/8", "::ffff:10.9.9.9", true),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::1", "::1", true),
            ("10.0.0.0/8", "fd00::1", false),
        ];
        for &(range, ip, inside) in cases {
            let cidr = Cidr::parse(range).unwrap();
            assert_eq!(
                cidr.contains(ip.parse().unwrap()),
                inside,
                "{ip} in {range}"
            );
        }
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn max_age_has_up_to_ten_percent_jitter() {
        let limits = Limits {
            max_connection_age_ms: Some(10_000),
            ..Limits::default()
        };
        let a = Admission::new("a", limits, None, Instant::now());
        let ages: Vec<u128> = (0..200)
            .map(|seed| a.max_age(seed).unwrap().as_millis())
            .collect();
        assert!(
            ages.iter().all(|&ms| (9_000..=10_000).contains(&ms)),
            "{ages:?}"
        );
        let distinct: std::collections::HashSet<_> = ages.iter().collect();
        assert!(distinct.len() > 100, "spread: {}", distinct.len());
        assert_eq!(
            Admission::new("b", Limits::default(), None, Instant::now()).max_age(1),
            None
        );
    }
}
