//! The configuration file: TOML with any number of `[[tcp_proxy]]` and `[[ws_proxy]]` sections,
//! each its own listener.
//!
//! The section fields read as rws documents them, so an rws user's sections load unchanged:
//!
//! ```toml
//! [[tcp_proxy]]
//! name = "postgres"
//! listen = "0.0.0.0:5432"          # `bind` is accepted too
//! backends = ["db-1:5432", "db-2:5432"]
//! connect_timeout_ms = 3000        # default 5000
//!
//! [[ws_proxy]]
//! name = "chat"
//! listen = "0.0.0.0:8080"
//! backends = ["chat-1:9000", "ws://chat-2:9000"]
//! connect_timeout_ms = 3000        # default 5000
//! read_timeout_ms = 30000          # default 30000; bounds reading the request head only
//! ```
//!
//! Loading is two passes: serde with `deny_unknown_fields` for the shape, then
//! [`validate`](Config::parse) for meaning. Every error names the file, the line and column, the
//! section, the field and the fix.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::balancer::{Balance, HashKey};
use crate::health::{ActiveConfig, CheckKind};
use crate::limit::Limits;
use crate::proxy_protocol::Version as ProxyVersion;
use crate::tcp::DEFAULT_CONNECT_TIMEOUT_MS;
use crate::Error;

/// How long a WebSocket client may take to send its request head when none is configured, as
/// in rws. It never applies to an established tunnel.
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;

/// How often backend host names are resolved again when not configured: DNS records of
/// services that move (Kubernetes, cloud load balancers) change on the order of a minute.
pub const DEFAULT_RESOLVE_INTERVAL_MS: u64 = 30_000;

/// How long a backend may take to answer a WebSocket upgrade when none is configured: a backend
/// that accepted the connection but has not answered in 5 s is not going to serve this client
/// well, and the client should hear 504 rather than wait on.
pub const DEFAULT_UPGRADE_TIMEOUT_MS: u64 = 5_000;

/// The largest request head accepted when none is configured, as in nginx's default
/// `client_header_buffer_size`-plus-one-large-buffer range: real browsers send 1–4 KiB.
pub const DEFAULT_MAX_REQUEST_HEAD_BYTES: usize = 8192;

/// A validated configuration: every section is ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The `[[tcp_proxy]]` sections, in file order.
    pub tcp_proxy: Vec<TcpSection>,
    /// The `[[ws_proxy]]` sections, in file order.
    pub ws_proxy: Vec<WsSection>,
    /// On shutdown, how long established connections may go on before they are closed
    /// (`drain_timeout_ms`, top level).
    pub drain_timeout_ms: u64,
    /// Connections open at once in the whole process (`max_connections`, top level).
    pub max_connections: Option<usize>,
    /// Access lines as JSON objects rather than `key=value` text (`log_format = "json"`).
    pub log_json: bool,
    /// A line when a tunnel opens too, not only when it ends (`log_open`).
    pub log_open: bool,
    /// Access lines at all (`access_log`, default true); `false` is nginx's `access_log off`.
    /// Warnings and the start-up lines are written either way.
    pub access_log: bool,
    /// Where the admin endpoint listens (`[admin] listen`): `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: Option<String>,
    /// The longest a thread of the proxy polls for events before it sleeps, in microseconds
    /// (`busy_poll_us`; 0 is off). It polls only while its work comes back within that
    /// time, and lets any other runnable thread have the core meanwhile. See
    /// [`DEFAULT_BUSY_POLL_US`] and [`MAX_BUSY_POLL_US`].
    pub busy_poll_us: u64,
}

/// `busy_poll_us` when the file does not set it: 100 µs. On a virtual machine a thread that
/// sleeps costs the peer that wakes it an interrupt to another core, and itself tens of
/// microseconds to get going (the README has the figures).
pub const DEFAULT_BUSY_POLL_US: u64 = 100;

/// The most `busy_poll_us` may be: 10 ms. Longer spins buy no more latency, only more CPU.
pub const MAX_BUSY_POLL_US: u64 = 10_000;

/// One backend of a section or route: `"host:port"`, or a table with `address` and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// `host:port` (for WebSocket also `ws://host:port/path`).
    pub address: String,
    /// Its share of connections relative to the others (default 1).
    pub weight: u32,
    /// The most connections open to it at once (default: no limit).
    pub max_connections: Option<usize>,
    /// Takes connections only when no primary backend can (default false).
    pub backup: bool,
}

impl BackendConfig {
    /// A backend at `address` with the defaults.
    pub fn new(address: impl Into<String>) -> Self {
        BackendConfig {
            address: address.into(),
            weight: 1,
            max_connections: None,
            backup: false,
        }
    }
}

impl fmt::Display for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)?;
        if self.weight != 1 {
            write!(f, " weight={}", self.weight)?;
        }
        if let Some(m) = self.max_connections {
            write!(f, " max_connections={m}")?;
        }
        if self.backup {
            f.write_str(" backup")?;
        }
        Ok(())
    }
}

/// A certificate chain and its private key, PEM files (`tls = { cert = "...", key = "..." }`).
/// Paths are relative to the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKey {
    /// The certificate chain, leaf first (`fullchain.pem`).
    pub cert: String,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// How a section speaks TLS to its backends (`upstream_tls = { ... }`); every field is
/// optional.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamTls {
    /// The CA certificates backends' certificates must chain to; the system's roots if absent.
    pub ca: Option<String>,
    /// A client certificate, for backends that require mutual TLS (with `key`).
    pub cert: Option<String>,
    /// The client certificate's key.
    pub key: Option<String>,
    /// The name sent as SNI and checked against the backend's certificate, instead of the
    /// backend's host.
    pub server_name: Option<String>,
    /// Accept any backend certificate. Logged loudly at start-up; for tests only.
    pub insecure_skip_verify: bool,
}

/// One `[[tcp_proxy.sni_route]]`: raw TLS connections whose ClientHello asks for a matching
/// name go to these backends, unterminated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// An exact name, or `*.suffix` for every name under `suffix`; lower case.
    pub server_name: String,
    /// The backends, `host:port` each.
    pub backends: Vec<BackendConfig>,
}

/// How a section or route spreads connections and reacts to failing backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Balancing {
    /// The selection policy (`balance`, and `hash_balance_factor` for `hash`).
    pub balance: Balance,
    /// What `hash` hashes (`hash_key`).
    pub hash_key: HashKey,
    /// Attempts after the first (`retries`); `None` for every backend once.
    pub retries: Option<usize>,
    /// How long all connect attempts of one connection may take (`connect_budget_ms`).
    pub connect_budget_ms: Option<u64>,
    /// Consecutive connect failures that eject a backend (`max_fails`).
    pub max_fails: u32,
    /// How long the first ejection lasts (`fail_timeout_ms`); it doubles on each repeat.
    pub fail_timeout_ms: u64,
    /// How often host names among the backends are resolved again (`resolve_interval_ms`).
    pub resolve_interval_ms: u64,
}

impl Default for Balancing {
    fn default() -> Self {
        Balancing {
            balance: Balance::RoundRobin,
            hash_key: HashKey::ClientIp,
            retries: None,
            connect_budget_ms: None,
            max_fails: crate::health::DEFAULT_MAX_FAILS,
            fail_timeout_ms: crate::health::DEFAULT_FAIL_TIMEOUT_MS,
            resolve_interval_ms: DEFAULT_RESOLVE_INTERVAL_MS,
        }
    }
}

/// One `[[tcp_proxy]]` section: a listener whose connections are tunnelled to `backends`.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpSection {
    /// Names the section in logs; defaults to `tcp-N` for the N-th section.
    pub name: String,
    /// `host:port` to listen on.
    pub listen: String,
    /// The backends, `host:port` each.
    pub backends: Vec<BackendConfig>,
    /// How long one connect to one backend may take.
    pub connect_timeout_ms: u64,
    /// Selection and failover.
    pub balancing: Balancing,
    /// Active health checks (`[tcp_proxy.health_check]`), if any.
    pub health_check: Option<ActiveConfig>,
    /// Send a PROXY protocol header to each backend first (`send_proxy_protocol`), so it
    /// learns the client's address.
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// Connection limits and tunnel timeouts.
    pub limits: Limits,
    /// Listen with `SO_REUSEPORT`, so several processes can share the port (`reuse_port`).
    pub reuse_port: bool,
    /// The TCP congestion control algorithm of the section's connections, both the clients'
    /// and the backends' (`congestion_control`, Linux's `TCP_CONGESTION`); `None` keeps the
    /// host's default (`net.ipv4.tcp_congestion_control`).
    pub congestion_control: Option<String>,
    /// Terminate TLS on the listener with these certificates, chosen by SNI (`tls`); empty
    /// for none.
    pub tls: Vec<CertKey>,
    /// Speak TLS to every backend (`upstream_tls`).
    pub upstream_tls: Option<UpstreamTls>,
    /// Route connections by the ClientHello's server name (`[[tcp_proxy.sni_route]]`), in
    /// file order; `backends` serve names none matches.
    pub sni_routes: Vec<SniRoute>,
}

/// One `[[ws_proxy]]` section: a listener for WebSocket upgrades.
#[derive(Debug, Clone, PartialEq)]
pub struct WsSection {
    /// Names the section in logs; defaults to `ws-N` for the N-th section.
    pub name: String,
    /// `host:port` to listen on.
    pub listen: String,
    /// How long one connect to one backend may take.
    pub connect_timeout_ms: u64,
    /// How long a client may take to send its request head.
    pub read_timeout_ms: u64,
    /// How long a backend may take to answer the upgrade.
    pub upgrade_timeout_ms: u64,
    /// The largest request head accepted; a larger one gets 431.
    pub max_request_head_bytes: usize,
    /// A path answered with 200 to a plain GET, for load balancers' probes.
    pub health_path: Option<String>,
    /// Connection limits and tunnel timeouts.
    pub limits: Limits,
    /// Listen with `SO_REUSEPORT`, so several processes can share the port (`reuse_port`).
    pub reuse_port: bool,
    /// The TCP congestion control algorithm of the section's connections, both the clients'
    /// and the backends' (`congestion_control`, Linux's `TCP_CONGESTION`); `None` keeps the
    /// host's default (`net.ipv4.tcp_congestion_control`).
    pub congestion_control: Option<String>,
    /// Terminate TLS on the listener with these certificates, chosen by SNI (`tls`); empty
    /// for none. Clients then connect with `wss://`.
    pub tls: Vec<CertKey>,
    /// How to speak TLS to `wss://` backends (`upstream_tls`); system roots when absent.
    pub upstream_tls: Option<UpstreamTls>,
    /// The routes in file order; the section's own `backends`, if any, come last as a
    /// catch-all route (path `/`, any host).
    pub routes: Vec<WsRoute>,
}

/// Where one kind of WebSocket request goes, and how it is passed on.
#[derive(Debug, Clone, PartialEq)]
pub struct WsRoute {
    /// The Host (without port, lower case) this route is for; `None` matches any.
    pub host: Option<String>,
    /// The path prefix this route matches on a segment boundary; `/` matches every path.
    pub path: String,
    /// What replaces the matched prefix before the request goes to the backend.
    pub rewrite: Option<String>,
    /// The backends, `host:port` or `ws://host:port[/path]` each.
    pub backends: Vec<BackendConfig>,
    /// Selection and failover.
    pub balancing: Balancing,
    /// Active health checks (`[ws_proxy.health_check]` or the route's own), if any.
    pub health_check: Option<ActiveConfig>,
    /// Send a PROXY protocol header to each backend before the request (`send_proxy_protocol`).
    pub send_proxy_protocol: Option<ProxyVersion>,
    /// Pass the client's Host header unchanged instead of the backend's `host:port`.
    pub preserve_host: bool,
    /// Append the client's IP to `X-Forwarded-For`.
    pub x_forwarded_for: bool,
    /// Set `X-Forwarded-Proto`.
    pub x_forwarded_proto: bool,
    /// Set `X-Forwarded-Host` to the client's Host.
    pub x_forwarded_host: bool,
    /// Extra headers added to every request this route forwards.
    pub headers: Vec<(String, String)>,
    /// When set, only requests whose Origin is listed are let through (others get 403).
    pub allowed_origins: Option<Vec<String>>,
    /// When set, only these of the client's offered subprotocols are passed on.
    pub subprotocols: Option<Vec<String>>,
}

impl WsRoute {
    /// A route matching every request, to `backends`, with every option at its default.
    pub fn catch_all<I, S>(backends: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        WsRoute {
            host: None,
            path: "/".to_string(),
            rewrite: None,
            backends: backends.into_iter().map(BackendConfig::new).collect(),
            balancing: Balancing::default(),
            health_check: None,
            send_proxy_protocol: None,
            preserve_host: false,
            x_forwarded_for: true,
            x_forwarded_proto: true,
            x_forwarded_host: true,
            headers: Vec::new(),
            allowed_origins: None,
            subprotocols: None,
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "{}: cannot read the config file: {e}",
                path.display()
            ))
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `origin` (usually the file name) starts every message.
    pub fn parse(text: &str, origin: &str) -> Result<Config, Error> {
        let file = Source { text, origin };
        let raw: raw::File = toml::from_str(text).map_err(|e| file.shape_error(&e))?;
        file.validate(raw)
    }

    /// How many listeners this configuration runs.
    pub fn listeners(&self) -> usize {
        self.tcp_proxy.len() + self.ws_proxy.len()
    }
}

impl fmt::Display for Config {
    /// What would run, one line per listener.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "on shutdown: drain for up to {} ms",
            self.drain_timeout_ms
        )?;
        if !self.access_log {
            writeln!(f, "access lines: off")?;
        }
        if self.busy_poll_us > 0 {
            writeln!(
                f,
                "threads poll for up to {} µs before they sleep, while work comes back that soon",
                self.busy_poll_us
            )?;
        } else {
            writeln!(
                f,
                "threads sleep as soon as they are idle (busy_poll_us = 0)"
            )?;
        }
        for s in &self.tcp_proxy {
            writeln!(
                f,
                "tcp_proxy {:?}: listen {} -> {} (connect_timeout_ms {})",
                s.name,
                s.listen,
                join(&s.backends),
                s.connect_timeout_ms
            )?;
            writeln!(f, "  {}", s.balancing)?;
            extras(f, "  ", &s.health_check, s.send_proxy_protocol)?;
            tls_lines(f, &s.tls, s.upstream_tls.as_ref())?;
            congestion_line(f, s.congestion_control.as_deref())?;
            for r in &s.sni_routes {
                writeln!(f, "  SNI {} -> {}", r.server_name, join(&r.backends))?;
            }
            if !s.sni_routes.is_empty() {
                writeln!(
                    f,
                    "  SNI of any other name, or none -> {}",
                    join(&s.backends)
                )?;
            }
        }
        for s in &self.ws_proxy {
            writeln!(
                f,
                "ws_proxy {:?}: listen {} (connect_timeout_ms {}, read_timeout_ms {}, upgrade_timeout_ms {})",
                s.name, s.listen, s.connect_timeout_ms, s.read_timeout_ms, s.upgrade_timeout_ms
            )?;
            if let Some(p) = &s.health_path {
                writeln!(f, "  GET {p} -> 200 (health)")?;
            }
            tls_lines(f, &s.tls, s.upstream_tls.as_ref())?;
            congestion_line(f, s.congestion_control.as_deref())?;
            for r in &s.routes {
                let host = r.host.as_deref().unwrap_or("*");
                let rewrite = r
                    .rewrite
                    .as_ref()
                    .map(|w| format!(" (rewritten to {w})"))
                    .unwrap_or_default();
                writeln!(f, "  {host}{}{rewrite} -> {}", r.path, join(&r.backends))?;
                writeln!(f, "    {}", r.balancing)?;
                extras(f, "    ", &r.health_check, r.send_proxy_protocol)?;
            }
        }
        Ok(())
    }
}

/// `check`'s line for a section's `congestion_control`, when it sets one.
fn congestion_line(f: &mut fmt::Formatter<'_>, cc: Option<&str>) -> fmt::Result {
    match cc {
        Some(cc) => writeln!(
            f,
            "  TCP congestion control: {cc} (to clients and to backends)"
        ),
        None => Ok(()),
    }
}

/// The health-check and PROXY-protocol lines of `check`'s output.
fn extras(
    f: &mut fmt::Formatter<'_>,
    indent: &str,
    check: &Option<ActiveConfig>,
    proxy: Option<ProxyVersion>,
) -> fmt::Result {
    if let Some(c) = check {
        let what = match c.kind {
            CheckKind::Tcp => "tcp connect".to_string(),
            CheckKind::Http => format!("http GET {}", c.path),
            CheckKind::WebSocket => format!("websocket upgrade of {}", c.path),
        };
        writeln!(
            f,
            "{indent}health check: {what} every {} ms (timeout {} ms; up after {}, down after {})",
            c.interval.as_millis(),
            c.timeout.as_millis(),
            c.healthy_threshold,
            c.unhealthy_threshold
        )?;
    }
    if let Some(v) = proxy {
        let v = if v == ProxyVersion::V1 { "v1" } else { "v2" };
        writeln!(f, "{indent}PROXY protocol {v} to backends")?;
    }
    Ok(())
}

/// The TLS lines of `check`'s output.
fn tls_lines(f: &mut fmt::Formatter<'_>, tls: &[CertKey], up: Option<&UpstreamTls>) -> fmt::Result {
    match tls {
        [] => {}
        [one] => writeln!(
            f,
            "  TLS terminated: cert {} key {} (TLS 1.2, 1.3)",
            one.cert, one.key
        )?,
        many => {
            writeln!(f, "  TLS terminated (TLS 1.2, 1.3), certificate chosen by SNI, the first for unknown names:")?;
            for p in many {
                writeln!(f, "    cert {} key {}", p.cert, p.key)?;
            }
        }
    }
    if let Some(u) = up {
        let mut parts = Vec::new();
        if u.insecure_skip_verify {
            parts.push("INSECURE: certificates not verified".to_string());
        } else {
            parts.push(format!(
                "verified against {}",
                u.ca.as_deref().unwrap_or("the system roots")
            ));
        }
        if let Some(c) = &u.cert {
            parts.push(format!("client cert {c}"));
        }
        if let Some(n) = &u.server_name {
            parts.push(format!("server_name {n}"));
        }
        writeln!(f, "  TLS to backends: {}", parts.join(", "))?;
    }
    Ok(())
}

fn join(backends: &[BackendConfig]) -> String {
    let all: Vec<String> = backends.iter().map(ToString::to_string).collect();
    all.join(", ")
}

impl fmt::Display for Balancing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.balance {
            Balance::RoundRobin => f.write_str("balance round_robin")?,
            Balance::LeastConnections => f.write_str("balance least_connections")?,
            Balance::Random => f.write_str("balance random")?,
            Balance::Hash { balance_factor } => {
                write!(f, "balance hash on {}", self.hash_key)?;
                if let Some(factor) = balance_factor {
                    write!(f, " (bounded load {factor})")?;
                }
            }
        }
        match self.retries {
            Some(r) => write!(f, ", retries {r}")?,
            None => f.write_str(", retries: every backend once")?,
        }
        if let Some(b) = self.connect_budget_ms {
            write!(f, ", connect_budget_ms {b}")?;
        }
        write!(
            f,
            ", eject after {} failures for {} ms",
            self.max_fails, self.fail_timeout_ms
        )
    }
}

/// The file's shape as serde sees it, with spans for every value a later check may blame.
mod raw {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct File {
        pub drain_timeout_ms: Option<Spanned<u64>>,
        pub max_connections: Option<Spanned<u64>>,
        pub log_format: Option<Spanned<String>>,
        pub log_open: Option<bool>,
        pub access_log: Option<bool>,
        pub busy_poll_us: Option<Spanned<u64>>,
        pub admin: Option<Spanned<Admin>>,
        #[serde(default)]
        pub tcp_proxy: Vec<Spanned<TcpSection>>,
        #[serde(default)]
        pub ws_proxy: Vec<Spanned<WsSection>>,
    }

    /// Each backend is a string or a table, told apart in validation so that messages can
    /// point at the entry.
    pub(super) type Addrs = Spanned<Vec<Spanned<toml::Value>>>;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct TcpSection {
        pub max_connections: Option<Spanned<u64>>,
        pub max_connections_per_ip: Option<Spanned<u64>>,
        pub idle_timeout_ms: Option<Spanned<u64>>,
        pub max_connection_age_ms: Option<Spanned<u64>>,
        pub accept_proxy_protocol: Option<Spanned<bool>>,
        pub reuse_port: Option<bool>,
        pub congestion_control: Option<Spanned<String>>,
        pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
        pub name: Option<Spanned<String>>,
        #[serde(alias = "bind")]
        pub listen: Spanned<String>,
        pub backends: Addrs,
        pub connect_timeout_ms: Option<Spanned<u64>>,
        pub balance: Option<Spanned<String>>,
        pub hash_key: Option<Spanned<String>>,
        pub hash_balance_factor: Option<Spanned<f64>>,
        pub retries: Option<Spanned<u64>>,
        pub connect_budget_ms: Option<Spanned<u64>>,
        pub max_fails: Option<Spanned<u64>>,
        pub fail_timeout_ms: Option<Spanned<u64>>,
        pub resolve_interval_ms: Option<Spanned<u64>>,
        pub health_check: Option<Spanned<HealthCheck>>,
        pub send_proxy_protocol: Option<Spanned<String>>,
        pub tls: Option<Spanned<toml::Value>>,
        pub upstream_tls: Option<Spanned<toml::Value>>,
        #[serde(default)]
        pub sni_route: Vec<Spanned<SniRoute>>,
    }

    /// `[[tcp_proxy.sni_route]]`.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct SniRoute {
        pub server_name: Spanned<String>,
        pub backends: Addrs,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct WsSection {
        pub tls: Option<Spanned<toml::Value>>,
        pub upstream_tls: Option<Spanned<toml::Value>>,
        pub max_connections: Option<Spanned<u64>>,
        pub max_connections_per_ip: Option<Spanned<u64>>,
        pub idle_timeout_ms: Option<Spanned<u64>>,
        pub max_connection_age_ms: Option<Spanned<u64>>,
        pub accept_proxy_protocol: Option<Spanned<bool>>,
        pub reuse_port: Option<bool>,
        pub congestion_control: Option<Spanned<String>>,
        pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
        pub name: Option<Spanned<String>>,
        #[serde(alias = "bind")]
        pub listen: Spanned<String>,
        pub backends: Option<Addrs>,
        pub connect_timeout_ms: Option<Spanned<u64>>,
        pub read_timeout_ms: Option<Spanned<u64>>,
        pub upgrade_timeout_ms: Option<Spanned<u64>>,
        pub max_request_head_bytes: Option<Spanned<u64>>,
        pub health_path: Option<Spanned<String>>,
        #[serde(default)]
        pub route: Vec<Spanned<WsRoute>>,
        // Route options given at section level are every route's defaults. (Repeated rather
        // than flattened: serde cannot combine `flatten` with `deny_unknown_fields`.)
        pub preserve_host: Option<bool>,
        pub x_forwarded_for: Option<bool>,
        pub x_forwarded_proto: Option<bool>,
        pub x_forwarded_host: Option<bool>,
        pub headers: Option<BTreeMap<String, Spanned<String>>>,
        pub allowed_origins: Option<Vec<Spanned<String>>>,
        pub subprotocols: Option<Vec<Spanned<String>>>,
        pub balance: Option<Spanned<String>>,
        pub hash_key: Option<Spanned<String>>,
        pub hash_balance_factor: Option<Spanned<f64>>,
        pub retries: Option<Spanned<u64>>,
        pub connect_budget_ms: Option<Spanned<u64>>,
        pub max_fails: Option<Spanned<u64>>,
        pub fail_timeout_ms: Option<Spanned<u64>>,
        pub resolve_interval_ms: Option<Spanned<u64>>,
        pub health_check: Option<Spanned<HealthCheck>>,
        pub send_proxy_protocol: Option<Spanned<String>>,
    }

    /// `[admin]`.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Admin {
        pub listen: Spanned<String>,
    }

    /// `[*.health_check]`, with the field names rws uses.
    #[derive(Deserialize, Clone)]
    #[serde(deny_unknown_fields)]
    pub(super) struct HealthCheck {
        pub kind: Option<Spanned<String>>,
        pub path: Option<Spanned<String>>,
        pub interval_ms: Option<Spanned<u64>>,
        pub timeout_ms: Option<Spanned<u64>>,
        pub healthy_threshold: Option<Spanned<u64>>,
        pub unhealthy_threshold: Option<Spanned<u64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct WsRoute {
        pub path: Option<Spanned<String>>,
        pub host: Option<Spanned<String>>,
        pub rewrite: Option<Spanned<String>>,
        pub backends: Option<Addrs>,
        pub preserve_host: Option<bool>,
        pub x_forwarded_for: Option<bool>,
        pub x_forwarded_proto: Option<bool>,
        pub x_forwarded_host: Option<bool>,
        pub headers: Option<BTreeMap<String, Spanned<String>>>,
        pub allowed_origins: Option<Vec<Spanned<String>>>,
        pub subprotocols: Option<Vec<Spanned<String>>>,
        pub balance: Option<Spanned<String>>,
        pub hash_key: Option<Spanned<String>>,
        pub hash_balance_factor: Option<Spanned<f64>>,
        pub retries: Option<Spanned<u64>>,
        pub connect_budget_ms: Option<Spanned<u64>>,
        pub max_fails: Option<Spanned<u64>>,
        pub fail_timeout_ms: Option<Spanned<u64>>,
        pub resolve_interval_ms: Option<Spanned<u64>>,
        pub health_check: Option<Spanned<HealthCheck>>,
        pub send_proxy_protocol: Option<Spanned<String>>,
    }
}

/// The text being loaded and where it came from, for messages.
struct Source<'a> {
    text: &'a str,
    origin: &'a str,
}

/// Which kind of section a check is looking at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Ws,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp_proxy",
            Kind::Ws => "ws_proxy",
        }
    }
}

/// Values that must be unique across the whole file.
#[derive(Default)]
struct Seen {
    /// Listen address → the section that claimed it.
    listens: HashMap<String, String>,
    /// Section name → where it was first used.
    names: HashMap<String, String>,
}

/// An HTTP token character (RFC 9110 `tchar`), for header names and subprotocols.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl raw::WsRoute {
    fn empty() -> Self {
        raw::WsRoute {
            path: None,
            host: None,
            rewrite: None,
            backends: None,
            preserve_host: None,
            x_forwarded_for: None,
            x_forwarded_proto: None,
            x_forwarded_host: None,
            headers: None,
            allowed_origins: None,
            subprotocols: None,
            balance: None,
            hash_key: None,
            hash_balance_factor: None,
            retries: None,
            connect_budget_ms: None,
            max_fails: None,
            fail_timeout_ms: None,
            resolve_interval_ms: None,
            health_check: None,
            send_proxy_protocol: None,
        }
    }
}

/// `accept_proxy_protocol` and `trusted_proxies` of one section, borrowed.
type ProxyFields<'a> = (
    &'a Option<Spanned<bool>>,
    &'a Option<Spanned<Vec<Spanned<String>>>>,
);

/// The balancing fields of one table, borrowed, with a route's own values before its
/// section's.
#[derive(Clone, Copy)]
struct BalancingFields<'a> {
    balance: Option<&'a Spanned<String>>,
    hash_key: Option<&'a Spanned<String>>,
    hash_balance_factor: Option<&'a Spanned<f64>>,
    retries: Option<&'a Spanned<u64>>,
    connect_budget_ms: Option<&'a Spanned<u64>>,
    max_fails: Option<&'a Spanned<u64>>,
    fail_timeout_ms: Option<&'a Spanned<u64>>,
    resolve_interval_ms: Option<&'a Spanned<u64>>,
}

macro_rules! balancing_fields {
    ($t:expr) => {
        BalancingFields {
            balance: $t.balance.as_ref(),
            hash_key: $t.hash_key.as_ref(),
            hash_balance_factor: $t.hash_balance_factor.as_ref(),
            retries: $t.retries.as_ref(),
            connect_budget_ms: $t.connect_budget_ms.as_ref(),
            max_fails: $t.max_fails.as_ref(),
            fail_timeout_ms: $t.fail_timeout_ms.as_ref(),
            resolve_interval_ms: $t.resolve_interval_ms.as_ref(),
        }
    };
}

impl<'a> BalancingFields<'a> {
    /// These fields, with `section`'s filling the ones left out.
    fn or(self, section: BalancingFields<'a>) -> Self {
        BalancingFields {
            balance: self.balance.or(section.balance),
            hash_key: self.hash_key.or(section.hash_key),
            hash_balance_factor: self.hash_balance_factor.or(section.hash_balance_factor),
            retries: self.retries.or(section.retries),
            connect_budget_ms: self.connect_budget_ms.or(section.connect_budget_ms),
            max_fails: self.max_fails.or(section.max_fails),
            fail_timeout_ms: self.fail_timeout_ms.or(section.fail_timeout_ms),
            resolve_interval_ms: self.resolve_interval_ms.or(section.resolve_interval_ms),
        }
    }
}

impl Source<'_> {
    /// 1-based line and column of byte offset `at`.
    fn position(&self, at: usize) -> (usize, usize) {
        let before = &self.text[..at.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        (line, col)
    }

    /// The `[[table]]` header in force at byte offset `at`, with its ordinal: `[[tcp_proxy]] #2`.
    fn section_at(&self, at: usize) -> Option<String> {
        let mut found = None;
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut offset = 0;
        for line in self.text.split_inclusive('\n') {
            if offset > at {
                break;
            }
            let t = line.trim();
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
                let name = name.trim();
                let n = counts.entry(name).or_default();
                *n += 1;
                found = Some(format!("[[{name}]] #{n}"));
            } else if t.starts_with('[') {
                found = t.split(']').next().map(|h| format!("{h}]"));
            }
            offset += line.len();
        }
        found
    }

    /// A message naming the place, the section, the field, the problem and the fix.
    fn error(&self, span: Range<usize>, field: &str, problem: &str, fix: &str) -> Error {
        let (line, col) = self.position(span.start);
        let section = self
            .section_at(span.start)
            .map(|s| format!("{s}, "))
            .unwrap_or_default();
        let field = if field.is_empty() {
            String::new()
        } else {
            format!("field `{field}`: ")
        };
        Error::Config(format!(
            "{}:{line}:{col}: {section}{field}{problem}; fix: {fix}",
            self.origin
        ))
    }

    /// Turns a serde/TOML error into the same shape of message as a validation error.
    fn shape_error(&self, e: &toml::de::Error) -> Error {
        let span = e.span().unwrap_or(0..0);
        let msg = e.message().trim();
        let quoted = msg.split('`').nth(1).unwrap_or("");
        let (field, fix) = if msg.starts_with("unknown field") {
            (
                quoted.to_string(),
                format!("remove `{quoted}` or correct its spelling"),
            )
        } else if msg.starts_with("missing field") {
            (
                quoted.to_string(),
                format!("add `{quoted} = ...` to this section"),
            )
        } else if msg.starts_with("duplicate field") {
            let hint = if quoted == "listen" {
                " (`bind` is another name for `listen`)"
            } else {
                ""
            };
            (
                quoted.to_string(),
                format!("give `{quoted}` only once{hint}"),
            )
        } else {
            // A type or syntax error: blame the key on the offending line, if there is one.
            let (line, _) = self.position(span.start);
            let text = self.text.lines().nth(line - 1).unwrap_or("");
            let key = text.split_once('=').map(|(k, _)| k.trim()).unwrap_or("");
            let fix = if msg.contains("invalid type") {
                "give the value the type the message names (numbers unquoted, addresses quoted)"
            } else {
                "correct the TOML syntax at this position (strings need quotes)"
            };
            (key.to_string(), fix.to_string())
        };
        let problem = msg
            .lines()
            .next()
            .unwrap_or(msg)
            .split(", expected nothing")
            .next()
            .unwrap_or(msg);
        self.error(span, &field, problem, &fix)
    }

    fn validate(&self, raw: raw::File) -> Result<Config, Error> {
        let admin_span = raw.admin.as_ref().map(|a| a.get_ref().listen.span());
        let mut seen = Seen::default();
        let mut config =
            Config {
                tcp_proxy: Vec::new(),
                ws_proxy: Vec::new(),
                max_connections: self.count(&raw.max_connections, "max_connections")?,
                log_json: match raw.log_format.as_ref().map(|f| (f, f.get_ref().as_str())) {
                    None | Some((_, "text")) => false,
                    Some((_, "json")) => true,
                    Some((f, other)) => return Err(self.error(
                        f.span(),
                        "log_format",
                        &format!("{other:?} is not a log format"),
                        "use \"text\" (key=value, the default) or \"json\" (one object per line)",
                    )),
                },
                log_open: raw.log_open.unwrap_or(false),
                access_log: raw.access_log.unwrap_or(true),
                busy_poll_us: match &raw.busy_poll_us {
                    None => DEFAULT_BUSY_POLL_US,
                    Some(v) if *v.get_ref() > MAX_BUSY_POLL_US => return Err(self.error(
                        v.span(),
                        "busy_poll_us",
                        &format!("{} µs of polling before each sleep is more than the most, {MAX_BUSY_POLL_US}", v.get_ref()),
                        "use 0 (off) up to 10000; 50 to 200 is where it helps, and 100 is the default",
                    )),
                    Some(v) => *v.get_ref(),
                },
                admin_listen: match &raw.admin {
                    None => None,
                    Some(admin) => {
                        let listen = &admin.get_ref().listen;
                        let addr = listen.get_ref().trim().to_string();
                        if let Err(why) = check_addr(&addr, true) {
                            return Err(self.error(
                                listen.span(),
                                "admin.listen",
                                &format!("{addr:?} is not a listen address: {why}"),
                                "write it as \"host:port\", e.g. \"127.0.0.1:9900\"",
                            ));
                        }
                        Some(addr)
                    }
                },
                // 0 is allowed: close every connection at once on shutdown.
                drain_timeout_ms: raw
                    .drain_timeout_ms
                    .as_ref()
                    .map_or(crate::tcp::DEFAULT_DRAIN_TIMEOUT_MS, |v| *v.get_ref()),
            };
        for (i, section) in raw.tcp_proxy.into_iter().enumerate() {
            let span = section.span();
            let s = section.into_inner();
            let name = self.name(&mut seen, &s.name, span, Kind::Tcp, i + 1)?;
            let listen = self.listen(&mut seen, &s.listen, &name)?;
            let backends = self.backends(&s.backends, Kind::Tcp)?;
            let connect_timeout_ms = self.timeout(
                &s.connect_timeout_ms,
                "connect_timeout_ms",
                DEFAULT_CONNECT_TIMEOUT_MS,
            )?;
            let balancing =
                self.balancing(balancing_fields!(s), balancing_fields!(s), Kind::Tcp)?;
            let health_check = match &s.health_check {
                Some(hc) => Some(self.health_check(hc, CheckKind::Tcp)?),
                None => None,
            };
            let send_proxy_protocol = self.proxy_version(s.send_proxy_protocol.as_ref())?;
            let limits = self.limits(
                &s.max_connections,
                &s.max_connections_per_ip,
                &s.idle_timeout_ms,
                &s.max_connection_age_ms,
                (&s.accept_proxy_protocol, &s.trusted_proxies),
            )?;
            let tls = self.tls(&s.tls)?;
            let upstream_tls = self.upstream_tls(&s.upstream_tls)?;
            let mut sni_routes = Vec::new();
            for r in &s.sni_route {
                sni_routes.push(self.sni_route(r, &sni_routes)?);
            }
            if let (Some(u), false, true) = (&s.upstream_tls, sni_routes.is_empty(), tls.is_empty())
            {
                return Err(self.error(
                    u.span(),
                    "upstream_tls",
                    "sni_route passes the client's TLS through untouched, so TLS to the backends would wrap TLS in TLS",
                    "remove upstream_tls, or terminate TLS here with `tls = { cert, key }` and route by the name it negotiates",
                ));
            }
            config.tcp_proxy.push(TcpSection {
                tls,
                upstream_tls,
                sni_routes,
                reuse_port: s.reuse_port.unwrap_or(false),
                congestion_control: self.congestion_control(&s.congestion_control)?,
                limits,
                name,
                listen,
                backends,
                connect_timeout_ms,
                balancing,
                health_check,
                send_proxy_protocol,
            });
        }
        for (i, section) in raw.ws_proxy.into_iter().enumerate() {
            let span = section.span();
            let s = section.into_inner();
            config
                .ws_proxy
                .push(self.ws_section(&mut seen, s, span, i + 1)?);
        }
        if let (Some(admin), Some(span)) = (&config.admin_listen, admin_span) {
            if let Some(section) = seen
                .listens
                .get(&admin.to_ascii_lowercase())
                .filter(|_| !admin.ends_with(":0"))
            {
                return Err(self.error(
                    span,
                    "admin.listen",
                    &format!("{admin} is already the listen address of section {section:?}"),
                    "give the admin endpoint its own port, e.g. \"127.0.0.1:9900\"",
                ));
            }
        }
        Ok(config)
    }

    fn ws_section(
        &self,
        seen: &mut Seen,
        s: raw::WsSection,
        span: Range<usize>,
        n: usize,
    ) -> Result<WsSection, Error> {
        let name = self.name(seen, &s.name, span.clone(), Kind::Ws, n)?;
        let limits = self.limits(
            &s.max_connections,
            &s.max_connections_per_ip,
            &s.idle_timeout_ms,
            &s.max_connection_age_ms,
            (&s.accept_proxy_protocol, &s.trusted_proxies),
        )?;
        let listen = self.listen(seen, &s.listen, &name)?;
        let tls = self.tls(&s.tls)?;
        let upstream_tls = self.upstream_tls(&s.upstream_tls)?;
        let connect_timeout_ms = self.timeout(
            &s.connect_timeout_ms,
            "connect_timeout_ms",
            DEFAULT_CONNECT_TIMEOUT_MS,
        )?;
        let read_timeout_ms = self.timeout(
            &s.read_timeout_ms,
            "read_timeout_ms",
            DEFAULT_READ_TIMEOUT_MS,
        )?;
        let upgrade_timeout_ms = self.timeout(
            &s.upgrade_timeout_ms,
            "upgrade_timeout_ms",
            DEFAULT_UPGRADE_TIMEOUT_MS,
        )?;
        let max_request_head_bytes = match &s.max_request_head_bytes {
            None => DEFAULT_MAX_REQUEST_HEAD_BYTES,
            Some(v) if (1024..=1 << 20).contains(v.get_ref()) => *v.get_ref() as usize,
            Some(v) => {
                return Err(self.error(
                    v.span(),
                    "max_request_head_bytes",
                    &format!("{} is outside 1024..=1048576", v.get_ref()),
                    "pick a size between 1 KiB and 1 MiB (the default is 8192)",
                ))
            }
        };
        let health_path = match &s.health_path {
            None => None,
            Some(p) => Some(self.path(p, "health_path")?),
        };
        let defaults = raw::WsRoute {
            path: None,
            host: None,
            rewrite: None,
            backends: None,
            preserve_host: s.preserve_host,
            x_forwarded_for: s.x_forwarded_for,
            x_forwarded_proto: s.x_forwarded_proto,
            x_forwarded_host: s.x_forwarded_host,
            headers: s.headers,
            allowed_origins: s.allowed_origins,
            subprotocols: s.subprotocols,
            balance: s.balance,
            hash_key: s.hash_key,
            hash_balance_factor: s.hash_balance_factor,
            retries: s.retries,
            connect_budget_ms: s.connect_budget_ms,
            max_fails: s.max_fails,
            fail_timeout_ms: s.fail_timeout_ms,
            resolve_interval_ms: s.resolve_interval_ms,
            health_check: s.health_check,
            send_proxy_protocol: s.send_proxy_protocol,
        };
        let mut routes = Vec::new();
        let mut keys: HashMap<(Option<String>, String), usize> = HashMap::new();
        for (i, route) in s.route.into_iter().enumerate() {
            let span = route.span();
            let r = self.ws_route(route.into_inner(), &defaults, span.clone())?;
            if let Some(first) = keys.insert((r.host.clone(), r.path.clone()), i + 1) {
                return Err(self.error(
                    span,
                    "path",
                    &format!(
                        "route #{} has the same host and path as route #{first}",
                        i + 1
                    ),
                    "merge the two routes, or give them different paths or hosts",
                ));
            }
            routes.push(r);
        }
        match s.backends {
            Some(backends) => {
                let catch_all = raw::WsRoute {
                    backends: Some(backends),
                    ..defaults
                };
                routes.push(self.ws_route(catch_all, &raw::WsRoute::empty(), span)?);
            }
            None if routes.is_empty() => {
                return Err(self.error(
                    span,
                    "backends",
                    "the section has neither `backends` nor any [[ws_proxy.route]]",
                    "add backends = [\"host:port\"], or routes with their own backends",
                ))
            }
            None => {}
        }
        let wss = routes
            .iter()
            .flat_map(|r| &r.backends)
            .any(|b| b.address.starts_with("wss://"));
        if let (Some(u), false) = (&s.upstream_tls, wss) {
            return Err(self.error(
                u.span(),
                "upstream_tls",
                "upstream_tls applies to wss:// backends, and this section has none",
                "write the backends that speak TLS as \"wss://host:port/path\", or remove upstream_tls",
            ));
        }
        Ok(WsSection {
            tls,
            upstream_tls,
            reuse_port: s.reuse_port.unwrap_or(false),
            congestion_control: self.congestion_control(&s.congestion_control)?,
            limits,
            name,
            listen,
            connect_timeout_ms,
            read_timeout_ms,
            upgrade_timeout_ms,
            max_request_head_bytes,
            health_path,
            routes,
        })
    }

    /// One route, with the section's options filling what the route leaves out.
    fn ws_route(
        &self,
        r: raw::WsRoute,
        d: &raw::WsRoute,
        span: Range<usize>,
    ) -> Result<WsRoute, Error> {
        let path = match &r.path {
            Some(p) => self.path(p, "path")?,
            None => "/".to_string(),
        };
        let rewrite = match &r.rewrite {
            Some(p) => Some(self.path(p, "rewrite")?),
            None => None,
        };
        let host = match &r.host {
            Some(h) if check_host(h.get_ref()).is_err() => {
                return Err(self.error(
                    h.span(),
                    "host",
                    &format!("{:?} is not a host name", h.get_ref()),
                    "give the name clients put in the Host header, without scheme or port",
                ))
            }
            Some(h) => Some(h.get_ref().to_ascii_lowercase()),
            None => None,
        };
        let backends = match &r.backends {
            Some(b) => self.backends(b, Kind::Ws)?,
            None => {
                return Err(self.error(
                    span,
                    "backends",
                    "this route has no backends",
                    "add backends = [\"host:port\"] to the route",
                ))
            }
        };
        let headers = match r.headers.as_ref().or(d.headers.as_ref()) {
            None => Vec::new(),
            Some(map) => {
                let mut headers = Vec::new();
                for (name, value) in map {
                    self.header(name, value)?;
                    headers.push((name.clone(), value.get_ref().clone()));
                }
                headers
            }
        };
        let allowed_origins = r.allowed_origins.as_ref().or(d.allowed_origins.as_ref());
        let subprotocols = r.subprotocols.as_ref().or(d.subprotocols.as_ref());
        if let Some(list) = subprotocols {
            for p in list {
                if p.get_ref().is_empty() || !p.get_ref().bytes().all(is_token) {
                    return Err(self.error(
                        p.span(),
                        "subprotocols",
                        &format!("{:?} is not a subprotocol name", p.get_ref()),
                        "use the token the client offers in Sec-WebSocket-Protocol, e.g. \"mqtt\"",
                    ));
                }
            }
        }
        let balancing = self.balancing(
            balancing_fields!(r).or(balancing_fields!(d)),
            balancing_fields!(r),
            Kind::Ws,
        )?;
        let strings = |list: Option<&Vec<Spanned<String>>>| {
            list.map(|l| l.iter().map(|s| s.get_ref().clone()).collect::<Vec<_>>())
        };
        let health_check = match r.health_check.as_ref().or(d.health_check.as_ref()) {
            Some(hc) => Some(self.health_check(hc, CheckKind::Http)?),
            None => None,
        };
        let send_proxy_protocol = self.proxy_version(
            r.send_proxy_protocol
                .as_ref()
                .or(d.send_proxy_protocol.as_ref()),
        )?;
        Ok(WsRoute {
            host,
            path,
            rewrite,
            backends,
            balancing,
            health_check,
            send_proxy_protocol,
            preserve_host: r.preserve_host.or(d.preserve_host).unwrap_or(false),
            x_forwarded_for: r.x_forwarded_for.or(d.x_forwarded_for).unwrap_or(true),
            x_forwarded_proto: r.x_forwarded_proto.or(d.x_forwarded_proto).unwrap_or(true),
            x_forwarded_host: r.x_forwarded_host.or(d.x_forwarded_host).unwrap_or(true),
            headers,
            allowed_origins: strings(allowed_origins),
            subprotocols: strings(subprotocols),
        })
    }

    /// `tls = { cert, key }` or an array of such tables; each pair is loaded now, so a
    /// missing file or a key that does not match its certificate fails the check.
    fn tls(&self, v: &Option<Spanned<toml::Value>>) -> Result<Vec<CertKey>, Error> {
        let Some(v) = v else {
            return Ok(Vec::new());
        };
        let span = v.span();
        let form = "tls = { cert = \"fullchain.pem\", key = \"key.pem\" }, or an array of such tables for several certificates chosen by SNI";
        if !cfg!(feature = "tls") {
            return Err(self.error(
                span,
                "tls",
                "this portcullis was built without TLS",
                "rebuild with the `tls` cargo feature (on by default), or remove `tls`",
            ));
        }
        let tables: Vec<&toml::Table> = match v.get_ref() {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(a) if !a.is_empty() => a
                .iter()
                .map(toml::Value::as_table)
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    self.error(
                        span.clone(),
                        "tls",
                        "every entry must be a table",
                        &format!("write {form}"),
                    )
                })?,
            other => {
                return Err(self.error(
                    span,
                    "tls",
                    &format!("`{other}` is not a certificate and key"),
                    &format!("write {form}"),
                ))
            }
        };
        let mut pairs = Vec::new();
        for t in tables {
            let mut pair = CertKey {
                cert: String::new(),
                key: String::new(),
            };
            for (k, value) in t {
                match (k.as_str(), value) {
                    ("cert", toml::Value::String(p)) => pair.cert = p.clone(),
                    ("key", toml::Value::String(p)) => pair.key = p.clone(),
                    _ => {
                        return Err(self.error(
                            span,
                            "tls",
                            &format!("`{k} = {value}` is not a field of a tls table"),
                            &format!("give only cert and key, as paths: {form}"),
                        ))
                    }
                }
            }
            if pair.cert.is_empty() || pair.key.is_empty() {
                return Err(self.error(
                    span,
                    "tls",
                    "a tls table needs both `cert` and `key`",
                    &format!("write {form}"),
                ));
            }
            #[cfg(feature = "tls")]
            crate::tls::check_cert_key(&pair).map_err(|why| {
                self.error(
                    span.clone(),
                    "tls",
                    &why,
                    "give the PEM files of a certificate chain (leaf first) and its private key, readable by this process",
                )
            })?;
            pairs.push(pair);
        }
        Ok(pairs)
    }

    /// `upstream_tls = { ca, cert, key, server_name, insecure_skip_verify }`, every field
    /// optional; the files are loaded now.
    fn upstream_tls(&self, v: &Option<Spanned<toml::Value>>) -> Result<Option<UpstreamTls>, Error> {
        let Some(v) = v else {
            return Ok(None);
        };
        let span = v.span();
        if !cfg!(feature = "tls") {
            return Err(self.error(
                span,
                "upstream_tls",
                "this portcullis was built without TLS",
                "rebuild with the `tls` cargo feature (on by default), or remove `upstream_tls`",
            ));
        }
        let form = "upstream_tls = { ca = \"ca.pem\", cert = \"client.pem\", key = \"client.key\", server_name = \"backend.internal\" }, every field optional";
        let Some(t) = v.get_ref().as_table() else {
            return Err(self.error(
                span,
                "upstream_tls",
                "upstream_tls must be a table",
                &format!("write {form}"),
            ));
        };
        let mut u = UpstreamTls::default();
        for (k, value) in t {
            let path = value.as_str().map(str::to_string);
            match (k.as_str(), value) {
                ("ca", toml::Value::String(_)) => u.ca = path,
                ("cert", toml::Value::String(_)) => u.cert = path,
                ("key", toml::Value::String(_)) => u.key = path,
                ("server_name", toml::Value::String(n)) => {
                    if check_host(n).is_err() {
                        return Err(self.error(
                            span,
                            "upstream_tls",
                            &format!("server_name {n:?} is not a host name or IP address"),
                            "give the name the backends' certificates carry, e.g. \"backend.internal\"",
                        ));
                    }
                    u.server_name = Some(n.to_ascii_lowercase());
                }
                ("insecure_skip_verify", toml::Value::Boolean(b)) => u.insecure_skip_verify = *b,
                _ => {
                    return Err(self.error(
                        span,
                        "upstream_tls",
                        &format!("`{k} = {value}` is not a field of upstream_tls"),
                        &format!("use only ca, cert, key and server_name (strings) and insecure_skip_verify (true or false): {form}"),
                    ))
                }
            }
        }
        if u.cert.is_some() != u.key.is_some() {
            return Err(self.error(
                span,
                "upstream_tls",
                "a client certificate needs both `cert` and `key`",
                "give both (for backends that require mutual TLS), or neither",
            ));
        }
        if u.insecure_skip_verify && u.ca.is_some() {
            return Err(self.error(
                span,
                "upstream_tls",
                "`ca` is never used with insecure_skip_verify = true",
                "remove insecure_skip_verify (and let `ca` verify the backends), or remove `ca`",
            ));
        }
        #[cfg(feature = "tls")]
        crate::tls::check_upstream(&u).map_err(|why| {
            self.error(
                span.clone(),
                "upstream_tls",
                &why,
                "give PEM files readable by this process: ca a CA certificate, cert a chain and key its private key",
            )
        })?;
        Ok(Some(u))
    }

    /// One `[[tcp_proxy.sni_route]]`; `earlier` are the routes before it, which must not
    /// have the same name.
    fn sni_route(
        &self,
        r: &Spanned<raw::SniRoute>,
        earlier: &[SniRoute],
    ) -> Result<SniRoute, Error> {
        let name = &r.get_ref().server_name;
        let value = name.get_ref().trim().to_ascii_lowercase();
        let host = value.strip_prefix("*.").unwrap_or(&value);
        if check_host(host).is_err() || host.contains('*') {
            return Err(self.error(
                name.span(),
                "server_name",
                &format!("{:?} is not a server name", name.get_ref()),
                "give an exact name (\"db.example.com\") or a suffix pattern (\"*.example.com\")",
            ));
        }
        if earlier.iter().any(|e| e.server_name == value) {
            return Err(self.error(
                name.span(),
                "server_name",
                &format!("{value} is already routed by an earlier sni_route"),
                "merge the two routes' backends, or remove one",
            ));
        }
        Ok(SniRoute {
            backends: self.backends(&r.get_ref().backends, Kind::Tcp)?,
            server_name: value,
        })
    }

    fn name(
        &self,
        seen: &mut Seen,
        name: &Option<Spanned<String>>,
        span: Range<usize>,
        kind: Kind,
        n: usize,
    ) -> Result<String, Error> {
        let value = match name {
            Some(name) if name.get_ref().trim().is_empty() => {
                return Err(self.error(
                    name.span(),
                    "name",
                    "the name is empty",
                    "give the section a name, or leave `name` out",
                ))
            }
            Some(name) => name.get_ref().clone(),
            None => format!("{}-{n}", if kind == Kind::Tcp { "tcp" } else { "ws" }),
        };
        let blame = name.as_ref().map_or(span, Spanned::span);
        if let Some(first) = seen
            .names
            .insert(value.clone(), format!("[[{}]] #{n}", kind.table()))
        {
            return Err(self.error(
                blame,
                "name",
                &format!("the name {value:?} is already used by {first}"),
                "give every section its own name, so log lines tell them apart",
            ));
        }
        Ok(value)
    }

    fn listen(
        &self,
        seen: &mut Seen,
        listen: &Spanned<String>,
        name: &str,
    ) -> Result<String, Error> {
        let value = listen.get_ref().trim().to_string();
        if let Err(why) = check_addr(&value, true) {
            return Err(self.error(
                listen.span(),
                "listen",
                &format!("{value:?} is not a listen address: {why}"),
                "write it as \"host:port\", e.g. \"0.0.0.0:8080\" or \"[::]:8080\"",
            ));
        }
        // Port 0 asks the system for a free port, a different one for each listener.
        let ephemeral = value.ends_with(":0");
        if let Some(first) = seen
            .listens
            .insert(value.to_ascii_lowercase(), name.to_string())
            .filter(|_| !ephemeral)
        {
            return Err(self.error(
                listen.span(),
                "listen",
                &format!("{value} is already the listen address of section {first:?}"),
                "give each section its own address or port",
            ));
        }
        Ok(value)
    }

    fn backends(&self, list: &raw::Addrs, kind: Kind) -> Result<Vec<BackendConfig>, Error> {
        if list.get_ref().is_empty() {
            return Err(self.error(
                list.span(),
                "backends",
                "no backends are listed",
                "list at least one, e.g. backends = [\"127.0.0.1:9000\"]",
            ));
        }
        let form = match kind {
            Kind::Tcp => "\"host:port\", e.g. \"10.0.0.5:5432\"",
            Kind::Ws => "\"host:port\" or \"ws://host:port/path\", e.g. \"chat-1:9000\"",
        };
        let table_form =
            "{ address = \"host:port\", weight = 1, max_connections = 1000, backup = false }";
        let mut backends = Vec::new();
        for entry in list.get_ref() {
            let span = entry.span();
            let bad =
                |problem: String, fix: String| self.error(span.clone(), "backends", &problem, &fix);
            let mut backend = match entry.get_ref() {
                toml::Value::String(addr) => BackendConfig::new(addr.trim()),
                toml::Value::Table(t) => {
                    let mut b = BackendConfig::new("");
                    for (key, value) in t {
                        match (key.as_str(), value) {
                            ("address", toml::Value::String(a)) => b.address = a.trim().to_string(),
                            ("weight", toml::Value::Integer(w)) if (1..=1000).contains(w) => b.weight = *w as u32,
                            ("max_connections", toml::Value::Integer(m)) if *m >= 1 => {
                                b.max_connections = Some(*m as usize)
                            }
                            ("backup", toml::Value::Boolean(x)) => b.backup = *x,
                            ("address" | "weight" | "max_connections" | "backup", v) => {
                                return Err(bad(
                                    format!("`{key} = {v}` is not a valid value"),
                                    "address is a string, weight a whole number from 1 to 1000, \
                                     max_connections a positive whole number, backup true or false"
                                        .into(),
                                ))
                            }
                            _ => {
                                return Err(bad(
                                    format!("a backend table has no field `{key}`"),
                                    format!("use only address, weight, max_connections, backup: {table_form}"),
                                ))
                            }
                        }
                    }
                    if b.address.is_empty() {
                        return Err(bad(
                            "this backend table has no `address`".into(),
                            format!("write it as {table_form}"),
                        ));
                    }
                    b
                }
                other => {
                    return Err(bad(
                        format!("`{other}` is not a backend"),
                        format!("write each backend as {form}, or as a table {table_form}"),
                    ))
                }
            };
            let checked = match kind {
                Kind::Tcp => check_addr(&backend.address, false),
                Kind::Ws => crate::balancer::Backend::parse_ws(&backend.address).map(drop),
            };
            if let Err(why) = checked {
                return Err(bad(
                    format!("{:?} is not a backend address: {why}", backend.address),
                    format!("write each backend as {form}"),
                ));
            }
            backend.address = backend.address.trim().to_string();
            backends.push(backend);
        }
        if backends.iter().all(|b| b.backup) {
            return Err(self.error(
                list.span(),
                "backends",
                "every backend is a backup, so none would ever be used first",
                "make at least one backend a primary (backup = false)",
            ));
        }
        Ok(backends)
    }

    /// Validates merged balancing fields; `own` are the fields the table itself sets, the only
    /// ones blamed for not fitting its policy (a route may pick `random` under a section that
    /// hashes).
    fn balancing(
        &self,
        f: BalancingFields<'_>,
        own: BalancingFields<'_>,
        kind: Kind,
    ) -> Result<Balancing, Error> {
        let mut b = Balancing::default();
        let hash_key =
            match f.hash_key {
                None => HashKey::ClientIp,
                Some(k) => {
                    match HashKey::parse(k.get_ref()) {
                        Ok(HashKey::ClientIp) => HashKey::ClientIp,
                        Ok(_) if kind == Kind::Tcp => return Err(self.error(
                            k.span(),
                            "hash_key",
                            "a TCP connection has no headers, cookies or query to hash",
                            "use hash_key = \"client_ip\" (the default) in a [[tcp_proxy]] section",
                        )),
                        Ok(key) => key,
                        Err(why) => return Err(self.error(
                            k.span(),
                            "hash_key",
                            &why,
                            "use \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\"",
                        )),
                    }
                }
            };
        let factor = match f.hash_balance_factor {
            Some(x) if !(x.get_ref().is_finite() && *x.get_ref() > 1.0) => return Err(self.error(
                x.span(),
                "hash_balance_factor",
                &format!("{} does not bound the load", x.get_ref()),
                "use a factor above 1.0, e.g. 1.25 (a backend takes at most 25% over the average)",
            )),
            x => x.map(|x| *x.get_ref()),
        };
        b.balance = match f.balance.map(|s| (s, s.get_ref().as_str())) {
            None | Some((_, "round_robin")) => Balance::RoundRobin,
            Some((_, "least_connections")) => Balance::LeastConnections,
            Some((_, "random")) => Balance::Random,
            Some((_, "hash")) => Balance::Hash {
                balance_factor: factor,
            },
            Some((s, other)) => return Err(self.error(
                s.span(),
                "balance",
                &format!("{other:?} is not a balancing policy"),
                "use \"round_robin\" (the default), \"least_connections\", \"hash\" or \"random\"",
            )),
        };
        for (set, field) in [
            (own.hash_key.map(Spanned::span), "hash_key"),
            (
                own.hash_balance_factor.map(Spanned::span),
                "hash_balance_factor",
            ),
        ] {
            if let (Some(span), false) = (set, matches!(b.balance, Balance::Hash { .. })) {
                return Err(self.error(
                    span,
                    field,
                    &format!("`{field}` only applies to balance = \"hash\""),
                    &format!("set balance = \"hash\", or remove `{field}`"),
                ));
            }
        }
        b.hash_key = hash_key;
        b.retries = f.retries.map(|r| *r.get_ref() as usize);
        if let Some(budget) = f.connect_budget_ms {
            b.connect_budget_ms =
                Some(self.timeout(&Some(budget.clone()), "connect_budget_ms", 0)?);
        }
        if let Some(m) = f.max_fails {
            if *m.get_ref() == 0 {
                return Err(self.error(
                    m.span(),
                    "max_fails",
                    "0 failures would eject every backend before its first connection",
                    "use a positive count (the default is 3)",
                ));
            }
            b.max_fails = u32::try_from(*m.get_ref()).unwrap_or(u32::MAX);
        }
        if let Some(t) = f.fail_timeout_ms {
            b.fail_timeout_ms = self.timeout(
                &Some(t.clone()),
                "fail_timeout_ms",
                crate::health::DEFAULT_FAIL_TIMEOUT_MS,
            )?;
        }
        if let Some(t) = f.resolve_interval_ms {
            b.resolve_interval_ms = self.timeout(
                &Some(t.clone()),
                "resolve_interval_ms",
                DEFAULT_RESOLVE_INTERVAL_MS,
            )?;
        }
        Ok(b)
    }

    fn limits(
        &self,
        max: &Option<Spanned<u64>>,
        per_ip: &Option<Spanned<u64>>,
        idle: &Option<Spanned<u64>>,
        age: &Option<Spanned<u64>>,
        proxy: ProxyFields<'_>,
    ) -> Result<Limits, Error> {
        let accept_proxy_protocol = match proxy {
            (Some(on), trusted) if *on.get_ref() => {
                let Some(list) = trusted else {
                    return Err(self.error(
                        on.span(),
                        "trusted_proxies",
                        "accept_proxy_protocol is on but no peer is trusted to send the header",
                        "list the load balancers' addresses, e.g. trusted_proxies = [\"10.0.0.0/8\"]",
                    ));
                };
                let mut cidrs = Vec::new();
                for c in list.get_ref() {
                    let cidr = crate::limit::Cidr::parse(c.get_ref()).map_err(|why| {
                        self.error(
                            c.span(),
                            "trusted_proxies",
                            &why,
                            "write an address or a range, e.g. \"10.0.0.0/8\" or \"fd00::/8\"",
                        )
                    })?;
                    cidrs.push(cidr);
                }
                Some(crate::limit::AcceptProxy { trusted: cidrs })
            }
            (_, Some(list)) => {
                return Err(self.error(
                    list.span(),
                    "trusted_proxies",
                    "trusted_proxies only applies with accept_proxy_protocol = true",
                    "set accept_proxy_protocol = true, or remove trusted_proxies",
                ))
            }
            _ => None,
        };
        Ok(Limits {
            accept_proxy_protocol,
            max_connections: self.count(max, "max_connections")?,
            max_connections_per_ip: self.count(per_ip, "max_connections_per_ip")?,
            idle_timeout_ms: match idle {
                Some(v) => Some(self.timeout(&Some(v.clone()), "idle_timeout_ms", 0)?),
                None => None,
            },
            max_connection_age_ms: match age {
                Some(v) => Some(self.timeout(&Some(v.clone()), "max_connection_age_ms", 0)?),
                None => None,
            },
        })
    }

    /// A connection cap: absent means none; zero is refused, as it would refuse everyone.
    fn count(&self, v: &Option<Spanned<u64>>, field: &str) -> Result<Option<usize>, Error> {
        match v {
            None => Ok(None),
            Some(n) if *n.get_ref() == 0 => Err(self.error(
                n.span(),
                field,
                "a limit of 0 would refuse every connection",
                &format!("use a positive number, or leave `{field}` out for no limit"),
            )),
            Some(n) => Ok(Some(usize::try_from(*n.get_ref()).unwrap_or(usize::MAX))),
        }
    }

    fn proxy_version(&self, v: Option<&Spanned<String>>) -> Result<Option<ProxyVersion>, Error> {
        match v.map(|v| (v, v.get_ref().as_str())) {
            None => Ok(None),
            Some((_, "v1")) => Ok(Some(ProxyVersion::V1)),
            Some((_, "v2")) => Ok(Some(ProxyVersion::V2)),
            Some((v, other)) => Err(self.error(
                v.span(),
                "send_proxy_protocol",
                &format!("{other:?} is not a PROXY protocol version"),
                "use \"v1\" (text) or \"v2\" (binary), as the backend expects",
            )),
        }
    }

    /// `congestion_control`: a name the kernel could know (at most 15 characters of
    /// `[a-z0-9_-]`), and on Linux one it lists as available, so a typo is caught by `check`
    /// rather than at start-up.
    fn congestion_control(&self, v: &Option<Spanned<String>>) -> Result<Option<String>, Error> {
        let Some(v) = v else { return Ok(None) };
        let name = v.get_ref();
        let err =
            |problem: &str, fix: &str| self.error(v.span(), "congestion_control", problem, fix);
        let shaped = name.len() <= 15
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if name.is_empty() || !shaped {
            return Err(err(
                &format!("{name:?} is not a congestion control algorithm's name"),
                "use one the kernel lists in /proc/sys/net/ipv4/tcp_available_congestion_control (such as \"cubic\" or \"bbr\"), or remove the field to keep the host's default",
            ));
        }
        if let Some(available) = crate::net::available_congestion_controls() {
            if !available.iter().any(|a| a == name) {
                return Err(err(
                    &format!(
                        "{name:?} is not available on this host (it has: {})",
                        available.join(", ")
                    ),
                    "use one of those, load the algorithm's kernel module (`modprobe tcp_<name>`), or remove the field to keep the host's default",
                ));
            }
        }
        Ok(Some(name.clone()))
    }

    /// A health check table; `kind` defaults to `default` (tcp for TCP sections, http for
    /// WebSocket ones, as rws probes WebSocket backends with a plain GET).
    fn health_check(
        &self,
        hc: &Spanned<raw::HealthCheck>,
        default: CheckKind,
    ) -> Result<ActiveConfig, Error> {
        let h = hc.get_ref();
        let kind = match h.kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
            None => default,
            Some((_, "tcp")) => CheckKind::Tcp,
            Some((_, "http")) => CheckKind::Http,
            Some((_, "websocket")) => CheckKind::WebSocket,
            Some((k, other)) => {
                return Err(self.error(
                    k.span(),
                    "health_check.kind",
                    &format!("{other:?} is not a kind of check"),
                    "use \"tcp\" (connect), \"http\" (GET expecting 2xx) or \"websocket\" (upgrade expecting 101)",
                ))
            }
        };
        let path = match &h.path {
            Some(p) => self.path(p, "health_check.path")?,
            None => "/health".to_string(),
        };
        let ms = |v: &Option<Spanned<u64>>, field: &str, default: u64| {
            self.timeout(v, field, default).map(Duration::from_millis)
        };
        let interval = ms(&h.interval_ms, "health_check.interval_ms", 30_000)?;
        let timeout = ms(&h.timeout_ms, "health_check.timeout_ms", 5_000)?;
        let count = |v: &Option<Spanned<u64>>, field: &str, default: u32| match v {
            None => Ok(default),
            Some(n) if *n.get_ref() == 0 => Err(self.error(
                n.span(),
                field,
                "a threshold of 0 would flip on no evidence",
                "use a positive count of consecutive probes",
            )),
            Some(n) => Ok(u32::try_from(*n.get_ref()).unwrap_or(u32::MAX)),
        };
        Ok(ActiveConfig {
            kind,
            path,
            interval,
            timeout,
            healthy_threshold: count(&h.healthy_threshold, "health_check.healthy_threshold", 2)?,
            unhealthy_threshold: count(
                &h.unhealthy_threshold,
                "health_check.unhealthy_threshold",
                3,
            )?,
        })
    }

    fn path(&self, p: &Spanned<String>, field: &str) -> Result<String, Error> {
        let v = p.get_ref();
        if !v.starts_with('/')
            || v.bytes()
                .any(|b| b <= b' ' || b == b'?' || b == b'#' || b >= 0x7f)
        {
            return Err(self.error(
                p.span(),
                field,
                &format!("{v:?} is not a path"),
                "write an absolute path without query or spaces, e.g. \"/ws/chat\"",
            ));
        }
        Ok(v.clone())
    }

    fn header(&self, name: &str, value: &Spanned<String>) -> Result<(), Error> {
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(is_token) {
            return Err(self.error(
                value.span(),
                "headers",
                &format!("{name:?} is not a header name"),
                "use letters, digits and '-' only, e.g. X-Upstream-Token",
            ));
        }
        if matches!(
            lower.as_str(),
            "host" | "connection" | "upgrade" | "content-length" | "transfer-encoding"
        ) || lower.starts_with("sec-websocket-")
        {
            return Err(self.error(
                value.span(),
                "headers",
                &format!("{name} is managed by the proxy and cannot be set here"),
                "remove it (for Host, use preserve_host = true to pass the client's own)",
            ));
        }
        if value
            .get_ref()
            .bytes()
            .any(|b| b == b'\r' || b == b'\n' || b == 0)
        {
            return Err(self.error(
                value.span(),
                "headers",
                &format!("the value of {name} contains a line break or NUL"),
                "put the value on one line",
            ));
        }
        Ok(())
    }

    /// A timeout in milliseconds: absent means `default`; zero is refused.
    fn timeout(
        &self,
        value: &Option<Spanned<u64>>,
        field: &str,
        default: u64,
    ) -> Result<u64, Error> {
        match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => Err(self.error(
                v.span(),
                field,
                "a timeout of 0 ms would fail every attempt",
                &format!("use a positive number of milliseconds (the default is {default}), or leave `{field}` out"),
            )),
            Some(v) => Ok(*v.get_ref()),
        }
    }
}

/// Checks that `addr` is `host:port`: a host name, an IPv4 address, or an IPv6 address in
/// brackets, and a port. Port 0 is allowed for listening only (the system picks a port, which
/// the start-up log line shows).
pub(crate) fn check_addr(addr: &str, listening: bool) -> Result<(), String> {
    let (host, port) = addr.rsplit_once(':').ok_or("there is no `:port`")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port (0-65535)"))?;
    if port == 0 && !listening {
        return Err("port 0 cannot be connected to".into());
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(drop)
            .map_err(|_| format!("{v6:?} is not an IPv6 address"));
    }
    check_host(host)
}

/// Checks that `host` is a host name or an IPv4 address (an IPv6 address needs brackets).
pub(crate) fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets, e.g. \"[::1]:8080\"".into());
    }
    let ok = host.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let cases: &[(&str, bool, bool)] = &[
            ("127.0.0.1:80", false, true),
            ("db-1:5432", false, true),
            ("db.internal.example:5432", false, true),
            ("[::1]:9000", false, true),
            ("0.0.0.0:0", true, true),
            ("0.0.0.0:0", false, false),
            ("localhost", false, false),
            (":80", false, false),
            ("host:99999", false, false),
            ("host:http", false, false),
            ("::1:80", false, false),
            ("[zz]:80", false, false),
            ("bad host:80", false, false),
            ("a..b:80", false, false),
        ];
        for &(addr, listening, ok) in cases {
            assert_eq!(
                check_addr(addr, listening).is_ok(),
                ok,
                "{addr} listening={listening}"
            );
        }
    }

    #[test]
    fn defaults_are_filled() {
        let c = Config::parse(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:1\"\nbackends = [\"b:2\"]\n\n[[ws_proxy]]\nbind = \"127.0.0.1:3\"\nbackends = [\"ws://w:4/x\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(
            c.tcp_proxy,
            [TcpSection {
                name: "tcp-1".into(),
                listen: "127.0.0.1:1".into(),
                backends: vec![BackendConfig::new("b:2")],
                connect_timeout_ms: 5000,
                balancing: Balancing::default(),
                health_check: None,
                send_proxy_protocol: None,
                limits: Limits::default(),
                reuse_port: false,
                congestion_control: None,
                tls: Vec::new(),
                upstream_tls: None,
                sni_routes: Vec::new(),
            }]
        );
        assert_eq!(c.ws_proxy[0].name, "ws-1");
        assert_eq!(c.ws_proxy[0].read_timeout_ms, 30_000);
        assert_eq!(c.listeners(), 2);
        assert_eq!(
            c.busy_poll_us, 100,
            "threads poll for up to 100 µs by default"
        );
        assert!(c.access_log, "access lines are on by default");
        assert!(!c.to_string().contains("access lines"), "{c}");
    }

    #[test]
    fn busy_polling_and_access_lines_off_are_read_and_shown_by_check() {
        let c = Config::parse(
            "busy_poll_us = 150\naccess_log = false\n\
             [[tcp_proxy]]\nlisten = \"127.0.0.1:1\"\nbackends = [\"b:2\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.busy_poll_us, 150);
        assert!(c.to_string().contains("poll for up to 150 µs"), "{c}");
        let off = Config::parse(
            "busy_poll_us = 0\n[[tcp_proxy]]\nlisten = \"127.0.0.1:1\"\nbackends = [\"b:2\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(off.busy_poll_us, 0);
        assert!(
            off.to_string().contains("sleep as soon as they are idle"),
            "{off}"
        );
        assert!(!c.access_log);
        assert!(c.to_string().contains("access lines: off"), "{c}");
    }

    #[test]
    fn messages_name_the_place() {
        let e = Config::parse(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:1\"\nbackends = []\n",
            "f.toml",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.toml:3:12: [[tcp_proxy]] #1, field `backends`: no backends are listed; fix: list at least one, e.g. backends = [\"127.0.0.1:9000\"]"
        );
    }
}
