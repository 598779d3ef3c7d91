//! The L4 flow: a client's bytes go to one backend and back, unchanged.
//!
//! Accept → pick a backend (round robin) → connect with a timeout, failing over to the next
//! backend → relay until both sides have closed → one access-log line.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::balancer::{Backend, Pool};
use crate::log::{info, warn};
use crate::net::Net;
use crate::relay::{Relay, Report};
use crate::server;
use crate::Error;

/// The connect timeout when none is configured, as in rws.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;

/// How long a shutdown waits for established connections when none is configured.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;

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
    name: String,
    backends: Vec<String>,
    connect_timeout: Duration,
    drain_timeout: Duration,
}

impl TcpProxy {
    /// A proxy over `backends` (`"host:port"` each; host names are resolved at each connect).
    pub fn new<I, S>(backends: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        TcpProxy {
            name: "tcp".to_string(),
            backends: backends.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS),
            drain_timeout: Duration::from_millis(DEFAULT_DRAIN_TIMEOUT_MS),
        }
    }

    /// The name this proxy's log lines carry (default `tcp`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How long one connect to one backend may take before the next backend is tried
    /// (default 5000 ms).
    pub fn connect_timeout_ms(mut self, ms: u64) -> Self {
        self.connect_timeout = Duration::from_millis(ms);
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
        if self.backends.is_empty() {
            return Err(Error::Config(format!(
                "tcp proxy {}: no backends",
                self.name
            )));
        }
        server::log_listening(
            "tcp",
            &self.name,
            crate::net::Listener::local_addr(&listener),
            &self.backends,
        );
        let flow = Arc::new(Flow {
            pool: Pool::new(self.backends.iter().map(Backend::new).collect()),
            name: self.name,
            connect_timeout: self.connect_timeout,
        });
        let left = server::accept_loop(
            &net,
            listener,
            shutdown,
            self.drain_timeout,
            |stream, peer| flow.clone().handle(net.clone(), stream, peer),
        )
        .await;
        info!(
            "stopped kind=tcp name={} open_connections_closed={left}",
            flow.name
        );
        Ok(())
    }
}

/// What every connection of one TCP proxy shares.
struct Flow {
    name: String,
    pool: Pool,
    connect_timeout: Duration,
}

impl Flow {
    async fn handle<N: Net>(self: Arc<Self>, net: N, mut client: N::Stream, peer: SocketAddr) {
        let started = net.now();
        let connected = self
            .pool
            .connect(&net, self.connect_timeout, |e| {
                warn!("tcp name={} client={peer} {e}", self.name)
            })
            .await;
        let (mut upstream, backend) = match connected {
            Ok(c) => c,
            Err(e) => {
                let ms = net.now().duration_since(started).as_millis();
                info!(
                    "tcp name={} client={peer} backend=- up=0 down=0 duration_ms={ms} end=\"{e}\"",
                    self.name
                );
                return;
            }
        };
        let connect_ms = net.now().duration_since(started).as_millis();
        let report = Relay::new(&mut client, &mut upstream).await;
        let ms = net.now().duration_since(started).as_millis();
        info!(
            "tcp name={} client={peer} backend={backend} up={} down={} connect_ms={connect_ms} duration_ms={ms} end={}",
            self.name,
            report.client_to_backend,
            report.backend_to_client,
            ending(&report),
        );
    }
}

/// How a relay ended, for the access log: `closed` when both sides closed in turn, otherwise
/// which side failed and why.
pub(crate) fn ending(report: &Report) -> String {
    match &report.result {
        Ok(()) => "closed".to_string(),
        Err((side, e)) => format!("\"{side} error: {e}\""),
    }
}
