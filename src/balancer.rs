//! Backend pools and how a connection picks its backend.
//!
//! A [`Pool`] hands each new connection an order in which to try its backends: round robin picks
//! where the order starts, and the rest of the pool follows, so a connection that cannot reach its
//! first backend fails over to the next, each backend at most once.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::net::{self, Net};
use crate::Error;

/// One backend, as configured: `host:port`. A host name is resolved at each connect, so DNS
/// changes reach the next connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    addr: String,
    /// For a WebSocket backend written `ws://host:port/path`: the path prefix put in front of
    /// every request path sent to it. Empty otherwise.
    path: String,
}

impl Backend {
    /// A backend at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        Backend {
            addr: addr.into(),
            path: String::new(),
        }
    }

    /// A WebSocket backend: `host:port`, or `ws://host[:port][/path]` (port 80 by default).
    pub fn parse_ws(spec: &str) -> Result<Self, String> {
        if spec.starts_with("wss://") {
            return Err("wss:// backends need TLS, which this build does not support yet".into());
        }
        let Some(rest) = spec.strip_prefix("ws://") else {
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
            format!("{authority}:80")
        };
        crate::config::check_addr(&addr, false)?;
        Ok(Backend {
            addr,
            path: path.to_string(),
        })
    }

    /// The address as configured: `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The path prefix of a `ws://host:port/path` backend; empty when there is none.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A set of interchangeable backends with round-robin selection.
///
/// The counter is a lock-free atomic, so connections accepted on different threads never contend
/// on a lock to pick a backend.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Backend>,
    next: AtomicUsize,
}

impl Pool {
    /// A pool over `backends`, tried in the order given.
    pub fn new(backends: Vec<Backend>) -> Self {
        Pool {
            backends,
            next: AtomicUsize::new(0),
        }
    }

    /// The backends, as configured.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The order in which one new connection tries backends: every backend exactly once,
    /// starting at the next one in round-robin order.
    pub fn order(&self) -> impl Iterator<Item = &Backend> + '_ {
        let n = self.backends.len();
        let start = if n == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        };
        (0..n).map(move |i| &self.backends[(start + i) % n])
    }

    /// Connects to the first backend in [`Pool::order`] that accepts within `timeout`.
    ///
    /// Each failure is passed to `on_failure` (for logging and health), and the next backend is
    /// tried; when every backend has failed, the result is [`Error::NoHealthyBackend`].
    pub async fn connect<N: Net>(
        &self,
        net: &N,
        timeout: Duration,
        mut on_failure: impl FnMut(&Error),
    ) -> Result<(N::Stream, &Backend), Error> {
        let mut tried = 0;
        for backend in self.order() {
            tried += 1;
            match net::timeout(net, timeout, net.connect(backend.addr())).await {
                Ok(stream) => return Ok((stream, backend)),
                Err(source) => on_failure(&Error::UpstreamConnect {
                    backend: backend.addr.clone(),
                    source,
                }),
            }
        }
        Err(Error::NoHealthyBackend { tried })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Pool {
        Pool::new((0..n).map(|i| Backend::new(format!("b{i}:1"))).collect())
    }

    fn order(p: &Pool) -> Vec<&str> {
        p.order().map(Backend::addr).collect()
    }

    #[test]
    fn each_connection_starts_at_the_next_backend_and_tries_each_once() {
        let p = pool(3);
        assert_eq!(order(&p), ["b0:1", "b1:1", "b2:1"]);
        assert_eq!(order(&p), ["b1:1", "b2:1", "b0:1"]);
        assert_eq!(order(&p), ["b2:1", "b0:1", "b1:1"]);
        assert_eq!(order(&p), ["b0:1", "b1:1", "b2:1"]);
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let p = pool(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            let first = p.order().next().unwrap().addr().as_bytes()[1] - b'0';
            counts[first as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
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
            ("wss://chat:443", None),
            ("http://chat:80", None),
            ("ws://chat:9000/a?b", None),
            ("chat", None),
        ];
        for &(spec, want) in cases {
            let got = Backend::parse_ws(spec).ok().map(|b| (b.addr, b.path));
            let want = want.map(|(a, p)| (a.to_string(), p.to_string()));
            assert_eq!(got, want, "{spec}");
        }
    }

    #[test]
    fn an_empty_pool_yields_nothing() {
        assert_eq!(order(&pool(0)), Vec::<&str>::new());
    }
}
