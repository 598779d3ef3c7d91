//! Backend pools and how a connection picks its backend.
//!
//! A [`Pool`] holds the backends of one section or route with their live state (connections
//! open, passive and active health) and a selection [`Balance`]. A connection asks the pool for
//! [`Attempts`]: each attempt leases one eligible backend (healthy, below its
//! `max_connections`, not yet tried by this connection); a failed connect is recorded against
//! that backend and the next attempt goes elsewhere, each backend at most once, within the retry
//! count and the connect budget. Backup backends are used only when no primary can take the
//! connection.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::health::{Active, Availability, Flip, Passive, PassiveConfig};
use crate::log::warn;
use crate::policy::{self, LeastConnections, Random, Ring, SmoothWeighted};

/// One backend, as configured, with its live state.
///
/// The address is `host:port`; a host name is resolved at each connect, so DNS changes reach
/// the next connection.
#[derive(Debug)]
pub struct Backend {
    addr: String,
    /// For a WebSocket backend written `ws://host:port/path`: the path prefix put in front of
    /// every request path sent to it. Empty otherwise.
    path: String,
    /// Written `wss://`: the proxy speaks TLS to it.
    tls: bool,
    weight: u32,
    max_connections: Option<usize>,
    backup: bool,
    /// Connections open to this backend now (leases not yet dropped).
    active: AtomicUsize,
    passive: Passive,
    checks: Active,
    /// The addresses its host name resolved to at the last refresh, used in turn; empty
    /// before the first refresh (and for IP literals), when connects resolve the name
    /// themselves.
    resolved: std::sync::Mutex<Vec<SocketAddr>>,
    /// Which of `resolved` the next connection goes to.
    rotation: AtomicUsize,
}

/// What a refresh of a backend's addresses did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// The name resolved to the same addresses as before.
    Unchanged,
    /// The name resolved to new addresses, now in use.
    Changed(Vec<SocketAddr>),
    /// The name did not resolve (or to nothing): the last good addresses stay in use.
    KeptLastGood(String),
}

impl Backend {
    /// A backend at `addr` (`host:port`), weight 1, no connection limit, not a backup.
    pub fn new(addr: impl Into<String>) -> Self {
        Backend {
            addr: addr.into(),
            path: String::new(),
            tls: false,
            weight: 1,
            max_connections: None,
            backup: false,
            active: AtomicUsize::new(0),
            passive: Passive::new(PassiveConfig::default()),
            checks: Active::default(),
            resolved: std::sync::Mutex::new(Vec::new()),
            rotation: AtomicUsize::new(0),
        }
    }

    /// A WebSocket backend: `host:port`, `ws://host[:port][/path]` (port 80 by default) or
    /// `wss://host[:port][/path]` (TLS, port 443 by default).
    pub fn parse_ws(spec: &str) -> Result<Self, String> {
        let (rest, tls, default_port) = if let Some(rest) = spec.strip_prefix("wss://") {
            if !cfg!(feature = "tls") {
                return Err("wss:// backends need TLS, and this portcullis was built without TLS (the `tls` cargo feature)".into());
            }
            (rest, true, 443)
        } else if let Some(rest) = spec.strip_prefix("ws://") {
            (rest, false, 80)
        } else {
            crate::config::check_addr(spec, false)?;
            return Ok(Backend::new(spec));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if path.contains(['?', '#', ' ']) {
            return Err("the path may not hold a query, fragment or space".into());
        }
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(h, _)| !h.ends_with(':') && !authority.ends_with(']'));
        let addr = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        crate::config::check_addr(&addr, false)?;
        let mut backend = Backend::new(addr);
        backend.path = path.to_string();
        backend.tls = tls;
        Ok(backend)
    }

    /// Whether the proxy speaks TLS to this backend (`wss://`, or `upstream_tls`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host of the address, without port or brackets: the TLS server name by default.
    pub fn host(&self) -> &str {
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// Sets the share of connections this backend gets relative to the others (default 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Caps the connections open to this backend at once (default: no cap).
    pub fn max_connections(mut self, max: Option<usize>) -> Self {
        self.max_connections = max;
        self
    }

    /// Makes this a backup: it takes connections only when no primary can.
    pub fn backup(mut self, backup: bool) -> Self {
        self.backup = backup;
        self
    }

    /// Sets when passive health ejects this backend.
    pub fn passive(mut self, config: PassiveConfig) -> Self {
        self.passive = Passive::new(config);
        self
    }

    /// The address as configured: `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The path prefix of a `ws://host:port/path` backend; empty when there is none.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the address names a host (to be resolved) rather than an IP.
    pub fn is_name(&self) -> bool {
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_err()
    }

    /// Where the next connection to this backend connects to, in order: the addresses its
    /// name last resolved to, starting one further each time so every address gets
    /// connections (and an address that refuses is passed over for the next); the name
    /// itself before the first resolution.
    pub fn targets(&self) -> Vec<String> {
        let resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if resolved.is_empty() {
            return vec![self.addr.clone()];
        }
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        (0..resolved.len())
            .map(|i| resolved[(start + i) % resolved.len()].to_string())
            .collect()
    }

    /// Connects to this backend: to each of [`Backend::targets`] in turn until one accepts.
    pub async fn connect<N: crate::net::Net>(&self, net: &N) -> std::io::Result<N::Stream> {
        self.connect_with(net, false).await
    }

    /// [`connect`](Self::connect) for a connection the proxy speaks first on (see
    /// [`Net::connect_speaking`](crate::Net::connect_speaking)).
    pub async fn connect_speaking<N: crate::net::Net>(
        &self,
        net: &N,
    ) -> std::io::Result<N::Stream> {
        self.connect_with(net, true).await
    }

    async fn connect_with<N: crate::net::Net>(
        &self,
        net: &N,
        speaking: bool,
    ) -> std::io::Result<N::Stream> {
        let mut last = None;
        for target in self.targets() {
            let connected = match speaking {
                true => net.connect_speaking(&target).await,
                false => net.connect(&target).await,
            };
            match connected {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()))
    }

    /// Takes the result of resolving this backend's name: new addresses replace the old ones;
    /// a failure, or no address at all, keeps the last good ones.
    pub fn refresh(&self, result: std::io::Result<Vec<SocketAddr>>) -> Refresh {
        let mut addrs = match result {
            Ok(addrs) if !addrs.is_empty() => addrs,
            Ok(_) => return Refresh::KeptLastGood("the name has no addresses".into()),
            Err(e) => return Refresh::KeptLastGood(e.to_string()),
        };
        addrs.sort();
        addrs.dedup();
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        if *resolved == addrs {
            return Refresh::Unchanged;
        }
        *resolved = addrs.clone();
        Refresh::Changed(addrs)
    }

    /// Connections open to this backend now.
    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether this backend may take new connections (passive and active health agree).
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.checks.is_up() && self.passive.availability(now) != Availability::Ejected
    }

    /// Its active-check state, for the checker.
    #[allow(dead_code)] // used by the active health checker (next commit)
    pub(crate) fn checks(&self) -> &Active {
        &self.checks
    }

    fn has_room(&self) -> bool {
        self.max_connections
            .is_none_or(|max| self.active_connections() < max)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// Re-resolves the host names among `backends` every `interval` until `stop` completes, so
/// connections follow DNS changes and use every address a name has. A name that stops
/// resolving keeps its last good addresses, with one warning (and one line when it recovers).
pub(crate) fn spawn_resolver<N: crate::net::Net>(
    net: &N,
    pool: &str,
    backends: &[Arc<Backend>],
    interval: Duration,
    stop: &async_channel::Receiver<()>,
) {
    let named: Vec<Arc<Backend>> = backends.iter().filter(|b| b.is_name()).cloned().collect();
    if named.is_empty() {
        return;
    }
    let (net2, pool, stop) = (net.clone(), pool.to_string(), stop.clone());
    net.spawn(async move {
        let run = async {
            let mut failing = vec![false; named.len()];
            loop {
                for (b, failing) in named.iter().zip(failing.iter_mut()) {
                    let result = net2.resolve(b.addr()).await;
                    if matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::Unsupported) {
                        // This runtime has no resolver: connects go by name, nothing to do.
                        return;
                    }
                    match b.refresh(result) {
                        Refresh::Changed(addrs) => {
                            *failing = false;
                            let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                            crate::log::info!("resolved pool={pool} backend={b} addresses={}", list.join(","));
                        }
                        Refresh::KeptLastGood(why) if !*failing => {
                            *failing = true;
                            warn!("resolve failed pool={pool} backend={b}, keeping its last addresses: {why}");
                        }
                        Refresh::Unchanged => *failing = false,
                        Refresh::KeptLastGood(_) => {}
                    }
                }
                net2.sleep(interval).await;
            }
        };
        futures_lite::future::or(run, async {
            let _ = stop.recv().await;
        })
        .await;
    });
}

/// How a pool picks among its eligible backends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Balance {
    /// Smooth weighted round robin (plain round robin when the weights are equal).
    RoundRobin,
    /// The fewer open connections per weight, of two backends chosen at random.
    LeastConnections,
    /// Consistent hashing of a key (the client's IP by default), optionally with bounded load:
    /// a key spills to the next backend on the ring when its own has more than
    /// `balance_factor` × the average load.
    Hash {
        /// The bound on load, e.g. 1.25; `None` for plain consistent hashing.
        balance_factor: Option<f64>,
    },
    /// Weighted random.
    Random,
}

/// What [`Balance::Hash`] hashes to keep a client on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address (the default; the only key a TCP connection has).
    ClientIp,
    /// A request header's value (WebSocket), `header:NAME`.
    Header(String),
    /// A cookie's value (WebSocket), `cookie:NAME`.
    Cookie(String),
    /// A query parameter's value (WebSocket), `query:NAME`.
    Query(String),
}

impl HashKey {
    /// Parses `client_ip`, `header:NAME`, `cookie:NAME` or `query:NAME`.
    pub fn parse(s: &str) -> Result<HashKey, String> {
        let named = |name: &str| {
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ';' || c == '=')
            {
                Err(format!("{s:?} needs a name after the colon"))
            } else {
                Ok(name.to_string())
            }
        };
        match s.split_once(':') {
            None if s == "client_ip" => Ok(HashKey::ClientIp),
            Some(("header", n)) => named(n).map(|n| HashKey::Header(n.to_ascii_lowercase())),
            Some(("cookie", n)) => named(n).map(HashKey::Cookie),
            Some(("query", n)) => named(n).map(HashKey::Query),
            _ => Err(format!("{s:?} is not a hash key")),
        }
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(n) => write!(f, "header:{n}"),
            HashKey::Cookie(n) => write!(f, "cookie:{n}"),
            HashKey::Query(n) => write!(f, "query:{n}"),
        }
    }
}

/// How many attempts a connection may make, and how long they may take in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// How long one connect may take.
    pub connect_timeout: Duration,
    /// Attempts after the first; `None` for every backend once.
    pub retries: Option<usize>,
    /// How long all attempts together may take; `None` for no limit beyond the per-connect one.
    pub budget: Option<Duration>,
}

impl Retry {
    /// The retry settings of a section or route.
    pub fn from_config(balancing: &crate::config::Balancing, connect_timeout_ms: u64) -> Retry {
        Retry {
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            retries: balancing.retries,
            budget: balancing.connect_budget_ms.map(Duration::from_millis),
        }
    }
}

/// A set of interchangeable backends and the policy that spreads connections over them.
#[derive(Debug)]
pub struct Pool {
    name: String,
    backends: Vec<Arc<Backend>>,
    weights: Vec<u32>,
    balance: Balance,
    round_robin: SmoothWeighted,
    least: LeastConnections,
    ring: Ring,
    random: Random,
}

impl Pool {
    /// A round-robin pool over `backends`.
    pub fn new(backends: Vec<Backend>) -> Self {
        Pool::with_balance("pool", backends, Balance::RoundRobin)
    }

    /// A pool named `name` (for health log lines) over `backends`, picking by `balance`.
    pub fn with_balance(name: &str, backends: Vec<Backend>, balance: Balance) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        let ids: Vec<(String, u32)> = backends
            .iter()
            .map(|b| (b.addr.clone(), b.weight))
            .collect();
        // A fixed seed: the random choices only need to be spread, not unpredictable, and a
        // fixed seed keeps simulations reproducible.
        let seed = policy::hash_key(name.as_bytes());
        Pool {
            name: name.to_string(),
            round_robin: SmoothWeighted::new(&weights),
            least: LeastConnections::new(seed),
            ring: Ring::new(&ids),
            random: Random::new(seed ^ 0x9E37_79B9_7F4A_7C15),
            weights,
            balance,
            backends: backends.into_iter().map(Arc::new).collect(),
        }
    }

    /// A pool as a section or route configures it; `websocket` allows `ws://` backends.
    pub fn from_config(
        name: &str,
        backends: &[crate::config::BackendConfig],
        balancing: &crate::config::Balancing,
        websocket: bool,
    ) -> Result<Pool, String> {
        Pool::build(name, backends, balancing, websocket, false)
    }

    /// A pool of TCP backends the proxy speaks TLS to (a section with `upstream_tls`).
    pub fn from_config_tls(
        name: &str,
        backends: &[crate::config::BackendConfig],
        balancing: &crate::config::Balancing,
    ) -> Result<Pool, String> {
        Pool::build(name, backends, balancing, false, true)
    }

    fn build(
        name: &str,
        backends: &[crate::config::BackendConfig],
        balancing: &crate::config::Balancing,
        websocket: bool,
        tls: bool,
    ) -> Result<Pool, String> {
        let passive = PassiveConfig {
            max_fails: balancing.max_fails,
            fail_timeout: Duration::from_millis(balancing.fail_timeout_ms),
        };
        let mut built = Vec::new();
        for b in backends {
            let backend = if websocket {
                Backend::parse_ws(&b.address)
            } else {
                crate::config::check_addr(&b.address, false)
                    .map(|()| Backend::new(b.address.clone()))
            };
            let mut backend = backend.map_err(|why| format!("backend {:?}: {why}", b.address))?;
            backend.tls |= tls;
            built.push(
                backend
                    .weight(b.weight)
                    .max_connections(b.max_connections)
                    .backup(b.backup)
                    .passive(passive),
            );
        }
        if built.is_empty() {
            return Err("no backends".into());
        }
        Ok(Pool::with_balance(name, built, balancing.balance))
    }

    /// The backends, as configured.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The policy this pool picks by.
    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// The attempts one new connection may make; `key` is its hash key (used by
    /// [`Balance::Hash`]).
    pub fn attempts(&self, key: Option<u64>, retry: Retry, now: Instant) -> Attempts<'_> {
        Attempts {
            pool: self,
            key,
            tried: vec![false; self.backends.len()],
            left: retry
                .retries
                .map_or(self.backends.len(), |r| r.saturating_add(1)),
            deadline: retry.budget.map(|b| now + b),
            connect_timeout: retry.connect_timeout,
            leased: 0,
            last: None,
        }
    }

    fn eligible(&self, i: usize, tier: Tier, skip: &[bool], now: Instant) -> bool {
        let b = &self.backends[i];
        !skip[i]
            && b.has_room()
            && match tier {
                Tier::Primary => !b.backup && b.is_healthy(now),
                Tier::Backup => b.backup && b.is_healthy(now),
                Tier::Panic => b.checks.is_up(),
            }
    }

    /// The first eligible backend after `last` in list order, wrapping around.
    fn after(&self, last: usize, tier: Tier, skip: &[bool], now: Instant) -> Option<usize> {
        let n = self.backends.len();
        (1..=n)
            .map(|k| (last + k) % n)
            .find(|&i| self.eligible(i, tier, skip, now))
    }

    /// One pick among backends of `tier` that pass `skip`.
    fn pick_in(&self, tier: Tier, key: Option<u64>, skip: &[bool], now: Instant) -> Option<usize> {
        let eligible = |i: usize| self.eligible(i, tier, skip, now);
        let active = |i: usize| self.backends[i].active_connections();
        match self.balance {
            Balance::RoundRobin => self.round_robin.next(eligible),
            Balance::LeastConnections => self.least.pick(&self.weights, active, eligible),
            Balance::Random => self.random.pick(&self.weights, eligible),
            Balance::Hash { balance_factor } => {
                let key = key.unwrap_or(0);
                match balance_factor {
                    Some(f) => self.ring.pick(key, eligible, Some((&active, f))),
                    None => self.ring.pick(key, eligible, None),
                }
            }
        }
    }
}

/// Which backends a pick considers, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// Healthy primaries.
    Primary,
    /// Healthy backups, when no primary can take the connection.
    Backup,
    /// Every backend whose active checks pass, ejected or not: when passive health has
    /// ejected them all, refusing every client until an ejection ends would turn a blip into
    /// an outage (as Envoy's panic threshold and nginx's single-server rule avoid), so the
    /// connection tries them anyway and a success brings the backend straight back.
    Panic,
}

/// The attempts of one connection: see [`Pool::attempts`].
#[derive(Debug)]
pub struct Attempts<'a> {
    pool: &'a Pool,
    key: Option<u64>,
    /// Backends this connection tried, or found unable to take it.
    tried: Vec<bool>,
    left: usize,
    deadline: Option<Instant>,
    connect_timeout: Duration,
    leased: usize,
    /// The backend of the previous attempt.
    last: Option<usize>,
}

impl Attempts<'_> {
    /// The next backend to try, leased (counted as a connection to it) until the lease is
    /// dropped; `None` when the retries or the budget are used up, or no backend is eligible.
    pub fn next(&mut self, now: Instant) -> Option<Lease> {
        if self.left == 0 || self.deadline.is_some_and(|d| now >= d) {
            return None;
        }
        loop {
            // The policy makes the first pick; a failover goes to the next eligible backend in
            // list order, so retries neither disturb the policy's shares nor pile onto one
            // backend.
            let pick = |tier| match self.last {
                None => self.pool.pick_in(tier, self.key, &self.tried, now),
                Some(last) => self.pool.after(last, tier, &self.tried, now),
            };
            let (i, tier) = [Tier::Primary, Tier::Backup, Tier::Panic]
                .into_iter()
                .find_map(|tier| pick(tier).map(|i| (i, tier)))?;
            self.last = Some(i);
            // Whatever happens next, this connection does not come back to this backend.
            self.tried[i] = true;
            let backend = &self.pool.backends[i];
            let trial = match backend.passive.availability(now) {
                Availability::Healthy => false,
                Availability::TrialDue if backend.passive.claim_trial(now) => true,
                // Every backend is ejected: try this one anyway (its result still counts).
                _ if tier == Tier::Panic => false,
                _ => continue,
            };
            let before = backend.active.fetch_add(1, Ordering::Relaxed);
            if backend.max_connections.is_some_and(|max| before >= max) {
                // Another connection took the last place between the check and now.
                backend.active.fetch_sub(1, Ordering::Relaxed);
                if trial {
                    backend.passive.release_trial();
                }
                continue;
            }
            self.left -= 1;
            self.leased += 1;
            return Some(Lease {
                backend: backend.clone(),
                pool: self.pool.name.clone(),
                trial,
                settled: false,
            });
        }
    }

    /// How long the next connect may take: the connect timeout, or what is left of the budget.
    pub fn connect_timeout(&self, now: Instant) -> Duration {
        match self.deadline {
            Some(d) => self.connect_timeout.min(d.saturating_duration_since(now)),
            None => self.connect_timeout,
        }
    }

    /// How many backends were leased so far: 0 after the first [`Attempts::next`] means no
    /// backend was eligible at all (503 for WebSocket), more means every attempt failed.
    pub fn leased(&self) -> usize {
        self.leased
    }
}

/// One connection's claim on a backend: counted in its open connections until dropped. Tell it
/// how the connect went, so health can follow.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<Backend>,
    pool: String,
    trial: bool,
    settled: bool,
}

impl Lease {
    /// The leased backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The backend took the connection (and, for WebSocket, answered the upgrade).
    pub fn succeeded(&mut self) {
        self.settled = true;
        if self.backend.passive.success() == Some(Flip::Up) {
            warn!("backend up pool={} backend={}", self.pool, self.backend);
        }
    }

    /// The backend failed the connection (refused, timed out, or broke the upgrade) at `now`.
    pub fn failed(&mut self, now: Instant) {
        self.settled = true;
        if let Some(Flip::Down(lasts)) = self.backend.passive.failure(now, self.trial) {
            warn!(
                "backend down pool={} backend={} for_ms={} (consecutive connect failures)",
                self.pool,
                self.backend,
                lasts.as_millis()
            );
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
        if self.trial && !self.settled {
            // The client went away before the trial said anything about the backend.
            self.backend.passive.release_trial();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Retry = Retry {
        connect_timeout: Duration::from_secs(1),
        retries: None,
        budget: None,
    };

    fn pool(n: usize) -> Pool {
        Pool::new((0..n).map(|i| Backend::new(format!("b{i}:1"))).collect())
    }

    /// The backends one connection would try, in order, if every attempt failed.
    fn order(p: &Pool, now: Instant) -> Vec<String> {
        let mut attempts = p.attempts(None, RETRY, now);
        let mut seen = Vec::new();
        while let Some(lease) = attempts.next(now) {
            seen.push(lease.backend().addr().to_string());
        }
        seen
    }

    #[test]
    fn each_connection_starts_at_the_next_backend_and_tries_each_once() {
        let p = pool(3);
        let now = Instant::now();
        let mut firsts = Vec::new();
        for _ in 0..3 {
            let mut tried = order(&p, now);
            firsts.push(tried[0].clone());
            tried.sort();
            assert_eq!(tried, ["b0:1", "b1:1", "b2:1"]);
        }
        firsts.sort();
        assert_eq!(firsts, ["b0:1", "b1:1", "b2:1"]);
    }

    #[test]
    fn round_robin_spreads_evenly_and_leases_count_connections() {
        let p = pool(3);
        let now = Instant::now();
        let mut leases = Vec::new();
        for _ in 0..300 {
            leases.push(p.attempts(None, RETRY, now).next(now).unwrap());
        }
        let counts: Vec<usize> = p
            .backends()
            .iter()
            .map(|b| b.active_connections())
            .collect();
        assert_eq!(counts, [100, 100, 100]);
        drop(leases);
        assert!(p.backends().iter().all(|b| b.active_connections() == 0));
    }

    #[test]
    fn retries_and_the_budget_bound_the_attempts() {
        let p = pool(5);
        let now = Instant::now();
        let retry = Retry {
            retries: Some(1),
            ..RETRY
        };
        let mut a = p.attempts(None, retry, now);
        assert!(a.next(now).is_some() && a.next(now).is_some() && a.next(now).is_none());

        let retry = Retry {
            budget: Some(Duration::from_millis(1500)),
            ..RETRY
        };
        let a = p.attempts(None, retry, now);
        assert_eq!(a.connect_timeout(now), Duration::from_secs(1));
        assert_eq!(
            a.connect_timeout(now + Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        let mut a = p.attempts(None, retry, now);
        assert!(a.next(now + Duration::from_millis(1500)).is_none());
        assert_eq!(a.leased(), 0);
    }

    #[test]
    fn backups_take_connections_only_when_no_primary_can() {
        let passive = PassiveConfig {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
        };
        let p = Pool::new(vec![
            Backend::new("primary:1").passive(passive),
            Backend::new("backup:1").backup(true),
        ]);
        let now = Instant::now();
        assert_eq!(order(&p, now), ["primary:1", "backup:1"]);
        // The primary fails once and is ejected: the backup takes over...
        p.attempts(None, RETRY, now).next(now).unwrap().failed(now);
        // (the ejected primary stays a last resort, should the backup fail too)...
        assert_eq!(order(&p, now), ["backup:1", "primary:1"]);
        // ...and gives back when the primary's trial succeeds.
        let later = now + Duration::from_secs(10);
        p.attempts(None, RETRY, later)
            .next(later)
            .unwrap()
            .succeeded();
        assert_eq!(order(&p, later), ["primary:1", "backup:1"]);
    }

    #[test]
    fn when_every_backend_is_ejected_they_are_tried_anyway_and_a_success_brings_one_back() {
        let passive = PassiveConfig {
            max_fails: 1,
            fail_timeout: Duration::from_secs(60),
        };
        let p = Pool::new(vec![
            Backend::new("a:1").passive(passive),
            Backend::new("b:1").passive(passive),
        ]);
        let now = Instant::now();
        let mut attempts = p.attempts(None, RETRY, now);
        while let Some(mut lease) = attempts.next(now) {
            lease.failed(now);
        }
        assert!(p.backends().iter().all(|b| !b.is_healthy(now)));
        let mut lease = p
            .attempts(None, RETRY, now)
            .next(now)
            .expect("tried anyway");
        let name = lease.backend().addr().to_string();
        lease.succeeded();
        drop(lease);
        let back: Vec<bool> = p.backends().iter().map(|b| b.is_healthy(now)).collect();
        assert_eq!(
            back.iter().filter(|&&h| h).count(),
            1,
            "{name} is back: {back:?}"
        );
    }

    #[test]
    fn a_backend_at_max_connections_is_skipped() {
        let p = Pool::new(vec![
            Backend::new("small:1").max_connections(Some(1)),
            Backend::new("big:1"),
        ]);
        let now = Instant::now();
        let first = p.attempts(None, RETRY, now).next(now).unwrap();
        assert_eq!(first.backend().addr(), "small:1");
        for _ in 0..3 {
            assert_eq!(
                p.attempts(None, RETRY, now)
                    .next(now)
                    .unwrap()
                    .backend()
                    .addr(),
                "big:1"
            );
        }
        drop(first);
        assert_eq!(order(&p, now).len(), 2);
    }

    #[test]
    fn an_ejected_backend_gets_one_trial_after_its_timeout() {
        let passive = PassiveConfig {
            max_fails: 2,
            fail_timeout: Duration::from_secs(1),
        };
        let p = Pool::new(vec![
            Backend::new("flaky:1").passive(passive),
            Backend::new("ok:1"),
        ]);
        let now = Instant::now();
        let first = |at: Instant| p.attempts(None, RETRY, at).next(at).unwrap();
        for _ in 0..2 {
            let mut attempts = p.attempts(None, RETRY, now);
            while let Some(mut lease) = attempts.next(now) {
                if lease.backend().addr() == "flaky:1" {
                    lease.failed(now);
                    break;
                }
            }
        }
        for _ in 0..4 {
            assert_eq!(first(now).backend().addr(), "ok:1", "ejected");
        }
        let later = now + Duration::from_secs(1);
        let trial = (0..2).find_map(|_| {
            let lease = p.attempts(None, RETRY, later).next(later)?;
            (lease.backend().addr() == "flaky:1").then_some(lease)
        });
        let trial = trial.expect("a trial connection once the ejection is over");
        // While the trial is under way, nobody else is sent there.
        for _ in 0..4 {
            assert_eq!(first(later).backend().addr(), "ok:1", "trial under way");
        }
        drop(trial);
    }

    #[test]
    fn names_resolve_to_every_address_in_turn_and_keep_the_last_good_ones() {
        let b = Backend::new("db.internal:5432");
        assert!(b.is_name());
        assert!(!Backend::new("10.0.0.1:5432").is_name());
        assert!(!Backend::new("[::1]:5432").is_name());
        assert_eq!(
            b.targets(),
            ["db.internal:5432"],
            "before the first resolution"
        );
        let a1: SocketAddr = "10.0.0.1:5432".parse().unwrap();
        let a2: SocketAddr = "10.0.0.2:5432".parse().unwrap();
        assert_eq!(
            b.refresh(Ok(vec![a2, a1, a2])),
            Refresh::Changed(vec![a1, a2])
        );
        let firsts: Vec<String> = (0..4).map(|_| b.targets()[0].clone()).collect();
        assert_eq!(
            firsts,
            [
                "10.0.0.1:5432",
                "10.0.0.2:5432",
                "10.0.0.1:5432",
                "10.0.0.2:5432"
            ]
        );
        assert_eq!(
            b.targets(),
            ["10.0.0.1:5432", "10.0.0.2:5432"],
            "the others follow"
        );
        assert_eq!(b.refresh(Ok(vec![a1, a2])), Refresh::Unchanged);
        let gone = b.refresh(Err(std::io::ErrorKind::NotFound.into()));
        assert!(matches!(gone, Refresh::KeptLastGood(_)));
        assert!(matches!(b.refresh(Ok(vec![])), Refresh::KeptLastGood(_)));
        assert_eq!(b.targets().len(), 2, "the last good addresses stay in use");
        assert_eq!(b.refresh(Ok(vec![a2])), Refresh::Changed(vec![a2]));
        assert_eq!(b.targets(), ["10.0.0.2:5432"]);
    }

    #[test]
    fn an_empty_pool_yields_nothing() {
        assert!(order(&pool(0), Instant::now()).is_empty());
    }

    #[test]
    fn websocket_backends() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("chat:9000", Some(("chat:9000", ""))),
            ("ws://chat:9000", Some(("chat:9000", ""))),
            ("ws://chat", Some(("chat:80", ""))),
            ("ws://chat:9000/", Some(("chat:9000", ""))),
            ("ws://chat:9000/api/v1", Some(("chat:9000", "/api/v1"))),
            ("ws://[::1]:9000/x", Some(("[::1]:9000", "/x"))),
            ("ws://[::1]/x", Some(("[::1]:80", "/x"))),
            (
                "wss://chat:8443/x",
                cfg!(feature = "tls").then_some(("chat:8443", "/x")),
            ),
            (
                "wss://chat",
                cfg!(feature = "tls").then_some(("chat:443", "")),
            ),
            ("http://chat:80", None),
            ("ws://chat:9000/a?b", None),
            ("chat", None),
        ];
        for &(spec, want) in cases {
            let got = Backend::parse_ws(spec)
                .ok()
                .map(|b| (b.addr.clone(), b.path.clone()));
            let want = want.map(|(a, p)| (a.to_string(), p.to_string()));
            assert_eq!(got, want, "{spec}");
        }
    }
}
