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
}

impl Backend {
    /// A backend at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        Backend { addr: addr.into() }
    }

    /// The address as configured.
    pub fn addr(&self) -> &str {
        &self.addr
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
    fn an_empty_pool_yields_nothing() {
        assert_eq!(order(&pool(0)), Vec::<&str>::new());
    }
}
