//! The simulator: portcullis's own accept, connect and relay code, run under
//! [turmoil](https://docs.rs/turmoil) in simulated time.
//!
//! turmoil runs a whole network of hosts on one thread: each host has its own single-threaded
//! tokio runtime with a paused clock, and the simulation advances every host and the network
//! one tick (1 ms by default) at a time. Latency, held links, partitions, packet loss and
//! host crashes are all under the test's control and driven by one seeded random number
//! generator, so a failing run replays exactly from its seed.
//!
//! The proxy code under test is not a copy: [`SimNet`] implements the runtime seam
//! ([`portcullis::Net`]) with turmoil's sockets and tokio's paused timers, and a scenario runs
//! `portcullis::TcpProxy::serve_with(SimNet, ..)` on a host named `"proxy"`. Everything else here
//! is shared by the scenarios in `sim/tests/`:
//!
//! - [`run_seeds`] and [`test_name!`]: run a scenario for one fixed seed, or `SEEDS=N` seeds, or
//!   the single seed `SEED=S`, and name the failing seed with a one-line replay command;
//!   [`run_seed_list`] with [`seeds_or`] does the same for a campaign with its own default
//!   count, or for a regression test pinned to a seed;
//! - [`live_streams`] and [`live_tasks`]: how many [`SimStream`]s and tasks spawned through
//!   [`SimNet`] exist now, so a scenario can check the proxy let go of all of them;
//! - [`serve_proxy`], [`echo_server`] and [`echo`]: the software of the proxy and backend hosts;
//!   [`counting_echo_server`] also records each connection it accepts ([`EchoStats`]), so a
//!   scenario can count what each backend of a pool got, and when (and, by the first byte, which
//!   client stream each connection carried);
//! - [`serve_ws_proxy`] and [`ws_backend`]: the same for the WebSocket flow, the backend a
//!   minimal one that reads the forwarded head with the proxy's own `read_head`, answers
//!   ([`WsAnswer`]) with a 101, silence or a hang-up, echoes, and records what it saw
//!   ([`WsLog`]); on the client side [`ws_upgrade`], [`read_http_head`], [`status_code`] and
//!   [`ws_frame`];
//! - [`pattern`] and [`check_prefix`]: deterministic per-stream bytes, so a receiver can tell
//!   that every byte that arrived arrived once and in order;
//! - [`AcceptFaults`]: an injection hook for a [`SimListener`] that fails accepts with `EMFILE`
//!   for a while and records every call, to see the accept loop back off;
//! - [`Rng`]: a small seeded generator for the scenarios' own random choices;
//! - [`connect_proxy`], [`read_until`], [`wait_for`] and [`sim_time`]: client-side reading with deadlines, waiting
//!   on flags shared with the test, and the simulation clock.
//!
//! The scenarios, one file per subject in `sim/tests/`, each test named as the sentence it checks:
//! `connect_timeout` (a backend that does not answer a connect, failover), `crash` (a backend or
//! the proxy crashing mid-relay), `half_close` (a FIN each way under random latency), `partition`
//! (a partition mid-relay, then repair), `chaos` (many clients, random faults), `drain` (graceful
//! shutdown), `ws` (the WebSocket flow: upgrade and read timeouts, a backend failing mid-handshake,
//! an idle tunnel, bytes behind heads), `balance` (backend pools configured from TOML: passive
//! ejection of a crashed backend and its trial, an active check catching a silent partition, a
//! WebSocket backend ejected after upgrade timeouts, weighted shares over 10 000 connections),
//! `operations` (a drain of 1 000 tunnels, the idle timeout and maximum connection age firing
//! on time, accept failures with `EMFILE` injected through [`AcceptFaults`] backing off),
//! `campaign` (a random scenario per seed, 200 seeds by default: TCP and WebSocket clients,
//! 2 to 4 backends, sizes, latencies, half-closes, aborts, crashes and bounces, partitions,
//! holds, lossy links, mid-run shutdowns, with the invariants checked after each run). Run
//! them with `cargo test -p sim`; `SEEDS=20 cargo test -p sim` tries 20 seeds each, and a failure
//! prints its seed and the command that replays it.
//!
//! Things about turmoil 0.7 a scenario has to know (see also `/work/shared/DESIGN.md`): `partition`
//! makes a connect fail at once (refused) and silently drops data on an established stream; `hold`
//! and a crashed host make a connect hang; there is no retransmission, so a dropped segment stalls
//! its stream for good and only a timeout ends it; a listener with more than `tcp_capacity` (64)
//! connections waiting to be accepted panics (a `release` after a long `hold` delivers every held
//! SYN at once: raise it with `Builder::tcp_capacity`); `repair` after `hold` keeps the held
//! messages held for good, only `release` delivers them; a connect completes the moment the server
//! accepts (the SYN-ACK is not a network message), and a listener skips the SYN of a connect its
//! client gave up on, so a late SYN never becomes a connection; `Sim::crash` and `Sim::bounce` are
//! called from outside the simulation, between calls to `Sim::step`; a host that crashes drops its
//! sockets, so its peers get a FIN (or a reset, where it had unread input) at once, unlike a real
//! machine that loses power; a stream is counted by `established_tcp_stream_count_on` until both of
//! its halves are dropped, so a proxy socket in a lingering close counts until the client closes
//! too; every host is stepped once per tick whether anything happens or not, so simulated time
//! costs wall time (about 35 µs per 1 ms tick for three hosts in a debug build: an idle hour is two
//! minutes, unless the scenario uses a coarser `tick_duration`).

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use futures_lite::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

/// The port every scenario's proxy listens on.
pub const PROXY_PORT: u16 = 7000;

/// The port every scenario's backends listen on.
pub const BACKEND_PORT: u16 = 9000;

/// The seed a scenario runs with when neither `SEED` nor `SEEDS` is set; `SEEDS=N` runs this
/// seed and the `N - 1` after it.
pub const FIRST_SEED: u64 = 0x5EED_0000;

/// The stream type of [`SimNet`]: a turmoil TCP stream seen through the futures-io traits the
/// flows are written against. Its `poll_close` sends a FIN (a half-close), as on a real socket.
///
/// Every one is counted while it exists ([`live_streams`]), so a scenario can check that the
/// proxy let go of every socket it accepted or connected, whatever turmoil's own count says
/// (turmoil keeps counting a socket whose connect was abandoned).
pub struct SimStream {
    inner: Compat<turmoil::net::TcpStream>,
    _live: Live,
}

impl fmt::Debug for SimStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimStream")
            .field("peer", &self.inner.get_ref().peer_addr().ok())
            .finish()
    }
}

impl SimStream {
    fn new(stream: turmoil::net::TcpStream) -> Self {
        SimStream {
            inner: stream.compat(),
            _live: Live::new(Counter::Streams),
        }
    }
}

impl futures_lite::io::AsyncRead for SimStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl futures_lite::io::AsyncWrite for SimStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// What a [`Live`] guard counts.
#[derive(Debug, Clone, Copy)]
enum Counter {
    Streams,
    Tasks,
}

thread_local! {
    /// Live [`SimStream`]s and live tasks spawned by [`SimNet`] on this thread (a simulation
    /// runs on the thread of its test, so concurrent tests do not see each other's).
    static LIVE: std::cell::Cell<[usize; 2]> = const { std::cell::Cell::new([0, 0]) };
}

/// Counts one stream or task while it exists: from its creation until it is dropped, which
/// for a task includes being dropped unfinished when its host crashes.
#[derive(Debug)]
struct Live(Counter);

impl Live {
    fn new(counter: Counter) -> Self {
        LIVE.with(|l| {
            let mut v = l.get();
            v[counter as usize] += 1;
            l.set(v);
        });
        Live(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        // A thread being torn down has nothing left to count.
        let _ = LIVE.try_with(|l| {
            let mut v = l.get();
            v[self.0 as usize] -= 1;
            l.set(v);
        });
    }
}

/// [`SimStream`]s that exist now on this thread: every socket the proxy accepted or connected
/// through [`SimNet`] and has not dropped yet.
pub fn live_streams() -> usize {
    LIVE.with(|l| l.get()[Counter::Streams as usize])
}

/// Tasks spawned through [`SimNet`]'s `spawn` on this thread that have neither finished nor
/// been dropped (by a crash of their host).
pub fn live_tasks() -> usize {
    LIVE.with(|l| l.get()[Counter::Tasks as usize])
}

/// The turmoil implementation of [`portcullis::Net`].
///
/// Sockets are turmoil's, so addresses are `"host:port"` with turmoil host names (`"backend:9000"`)
/// and a listener binds `"0.0.0.0:port"`; `sleep` and `now` use the host's paused tokio clock, which
/// turmoil advances tick by tick; `spawn` is `tokio::spawn` on the host's runtime, so a host crash
/// drops every connection task with it. It must be used from inside a turmoil host or client.
///
/// A task spawned through it that panics is recorded (see [`take_task_panics`]) rather than lost:
/// tokio would otherwise swallow the panic and the scenario would never know.
///
/// # Examples
///
/// ```no_run
/// let mut sim = turmoil::Builder::new().build();
/// sim.host("backend", || sim::echo_server(sim::BACKEND_PORT));
/// sim.host("proxy", || {
///     sim::serve_proxy(portcullis::TcpProxy::new(["backend:9000"]).connect_timeout_ms(500))
/// });
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SimNet;

/// The listener of [`SimNet`]: a turmoil TCP listener, optionally with injected accept
/// failures ([`AcceptFaults`]).
pub struct SimListener {
    inner: turmoil::net::TcpListener,
    faults: Option<AcceptFaults>,
}

impl fmt::Debug for SimListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimListener")
            .field("addr", &self.inner.local_addr().ok())
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

impl SimListener {
    /// Wraps a listener a scenario bound itself.
    pub fn new(listener: turmoil::net::TcpListener) -> Self {
        SimListener {
            inner: listener,
            faults: None,
        }
    }

    /// The same listener, failing accepts as `faults` says and recording every call in it.
    pub fn with_faults(mut self, faults: AcceptFaults) -> Self {
        self.faults = Some(faults);
        self
    }
}

impl portcullis::Listener for SimListener {
    type Stream = SimStream;

    async fn accept(&self) -> io::Result<(SimStream, SocketAddr)> {
        if let Some(faults) = &self.faults {
            faults.on_accept()?;
        }
        let (stream, peer) = self.inner.accept().await?;
        Ok((SimStream::new(stream), peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// `EMFILE`: the process is out of file descriptors.
pub const EMFILE: i32 = 24;

/// An injection hook for a [`SimListener`]: every call to its `accept` before a given simulated
/// time fails at once with `EMFILE` (as a real `accept` does while the process is out of
/// descriptors: the pending connection stays queued, and the listener stays readable, so a loop
/// that retries at once spins). Every call is recorded, with its time and whether it failed,
/// so a scenario can count how often the accept loop tried.
///
/// A spinning loop never lets simulated time advance (its host never goes idle), which would
/// hang the simulation: so past [`AcceptFaults::SPIN_LIMIT`] failed calls the hook panics
/// instead, and the scenario fails with a message.
///
/// Clones share one record. It is `Send + Sync`, as a listener must be.
#[derive(Debug, Clone, Default)]
pub struct AcceptFaults(std::sync::Arc<std::sync::Mutex<FaultState>>);

#[derive(Debug, Default)]
struct FaultState {
    /// Accepts fail while the simulation is younger than this.
    fail_until: Duration,
    /// Every call: when (simulation time), and whether it failed.
    calls: Vec<(Duration, bool)>,
    /// How many calls failed.
    failed: usize,
}

impl AcceptFaults {
    /// Failed calls after which the hook decides the accept loop spins, and panics.
    pub const SPIN_LIMIT: usize = 10_000;

    /// A hook that fails every accept called before simulation time `until`.
    pub fn fail_until(until: Duration) -> Self {
        let faults = AcceptFaults::default();
        faults.state().fail_until = until;
        faults
    }

    /// Every call to `accept` so far: when (simulation time), and whether it failed.
    pub fn calls(&self) -> Vec<(Duration, bool)> {
        self.state().calls.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a call; fails it while the failure window lasts.
    fn on_accept(&self) -> io::Result<()> {
        let now = sim_time();
        let mut state = self.state();
        let fail = now < state.fail_until;
        state.calls.push((now, fail));
        if !fail {
            return Ok(());
        }
        state.failed += 1;
        let failed = state.failed;
        drop(state);
        assert!(
            failed <= Self::SPIN_LIMIT,
            "accept was called {failed} times by {now:?} while it failed with EMFILE: \
             the accept loop spins"
        );
        Err(io::Error::from_raw_os_error(EMFILE))
    }
}

impl portcullis::Net for SimNet {
    type Stream = SimStream;
    type Listener = SimListener;

    async fn bind(&self, addr: &str) -> io::Result<SimListener> {
        turmoil::net::TcpListener::bind(addr)
            .await
            .map(SimListener::new)
    }

    async fn connect(&self, addr: &str) -> io::Result<SimStream> {
        turmoil::net::TcpStream::connect(addr)
            .await
            .map(SimStream::new)
    }

    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// The host's simulated clock. Each turmoil host has its own runtime and clock, and a crash
    /// or bounce gives the host a new one, so instants are only comparable within one host run.
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) {
        let live = Live::new(Counter::Tasks);
        tokio::spawn(async move {
            let _live = live;
            if let Err(payload) = AssertUnwindSafe(f).catch_unwind().await {
                let message = panic_message(payload.as_ref());
                TASK_PANICS.with(|p| p.borrow_mut().push(message));
            }
        });
    }
}

thread_local! {
    /// Panics of tasks spawned by [`SimNet`] on this thread (a simulation runs on the thread
    /// of its test).
    static TASK_PANICS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Takes the messages of the panics that tasks spawned by [`SimNet`]'s
/// [`spawn`](portcullis::Net::spawn) on this thread have had since the last call. [`run_seeds`]
/// fails a seed when there are any.
pub fn take_task_panics() -> Vec<String> {
    TASK_PANICS.with(|p| std::mem::take(&mut *p.borrow_mut()))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// The seeds to run: `SEED=S` runs only `S` (to replay a failure); otherwise `SEEDS=N` (default
/// 1) runs `N` seeds starting at [`FIRST_SEED`].
pub fn seeds() -> Vec<u64> {
    seeds_or(1)
}

/// [`seeds`] for a scenario that runs `default` seeds when `SEEDS` is unset (a campaign);
/// `SEED=S` still runs only `S`, and `SEEDS=N` runs `N`.
pub fn seeds_or(default: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("SEED") {
        return vec![seed];
    }
    let n = env_u64("SEEDS").unwrap_or(default).max(1);
    (FIRST_SEED..FIRST_SEED + n).collect()
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

/// The path of the enclosing function, `test_target::function`, for [`run_seeds`].
///
/// In an integration test the first segment is the test target (the file name), which is what
/// `cargo test --test` takes.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn f() {}
        let name = ::std::any::type_name_of_val(&f);
        name.strip_suffix("::f").unwrap_or(name)
    }};
}

/// Runs `scenario` once per seed of [`seeds`], and fails on the first seed whose run returns an
/// error, panics, or leaves a panicked [`SimNet`] task behind, naming the seed and the command
/// that replays it.
///
/// `name` is `test_target::test_function`, as [`test_name!`] gives it.
///
/// # Examples
///
/// ```no_run
/// #[test]
/// fn nothing_happens() {
///     sim::run_seeds(sim::test_name!(), |seed| {
///         let mut sim = turmoil::Builder::new().rng_seed(seed).build();
///         sim.client("client", async { Ok(()) });
///         sim.run()
///     });
/// }
/// ```
pub fn run_seeds(name: &str, scenario: impl FnMut(u64) -> turmoil::Result) {
    run_seed_list(name, seeds(), scenario);
}

/// [`run_seeds`] over the given `seeds`: for a campaign's own default count ([`seeds_or`]),
/// or a regression test pinned to the seed that found its bug.
pub fn run_seed_list(
    name: &str,
    seeds: impl IntoIterator<Item = u64>,
    mut scenario: impl FnMut(u64) -> turmoil::Result,
) {
    let (target, test) = name.split_once("::").unwrap_or(("<test file>", name));
    for seed in seeds {
        take_task_panics();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| scenario(seed)));
        let panics = take_task_panics();
        let failure = match outcome {
            Ok(Ok(())) if panics.is_empty() => continue,
            Ok(Ok(())) => format!("a proxy task panicked: {panics:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
        };
        panic!(
            "{test} failed with seed {seed}: {failure}\n\
             replay: SEED={seed} cargo test -p sim --test {target} -- --exact {test} --include-ignored"
        );
    }
}

/// The software of a proxy host: binds `0.0.0.0:`[`PROXY_PORT`] and runs `proxy` on [`SimNet`]
/// until the host crashes.
pub async fn serve_proxy(proxy: portcullis::TcpProxy) -> turmoil::Result {
    let net = SimNet;
    let listener = portcullis::Net::bind(&net, &format!("0.0.0.0:{PROXY_PORT}")).await?;
    proxy
        .serve_with(net, listener, std::future::pending())
        .await?;
    Ok(())
}

/// The software of a WebSocket proxy host: binds `0.0.0.0:`[`PROXY_PORT`] and runs `proxy` on
/// [`SimNet`] until the host crashes.
pub async fn serve_ws_proxy(proxy: portcullis::WsProxy) -> turmoil::Result {
    let net = SimNet;
    let listener = portcullis::Net::bind(&net, &format!("0.0.0.0:{PROXY_PORT}")).await?;
    proxy
        .serve_with(net, listener, std::future::pending())
        .await?;
    Ok(())
}

/// The software of an echo backend: accepts on `0.0.0.0:port` and runs [`echo`] on every
/// connection, each on its own task.
pub async fn echo_server(port: u16) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = echo(stream).await;
        });
    }
}

/// Writes back every byte read, and half-closes (a FIN) after the peer's FIN. Returns the bytes
/// echoed.
pub async fn echo(stream: turmoil::net::TcpStream) -> io::Result<u64> {
    let (mut r, mut w) = stream.into_split();
    let n = tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await?;
    Ok(n)
}

/// [`echo`], telling `first` the first byte read before echoing it.
async fn echo_noting_first_byte(
    stream: turmoil::net::TcpStream,
    first: impl FnOnce(u8),
) -> io::Result<u64> {
    let (mut r, mut w) = stream.into_split();
    let mut buf = [0u8; 1];
    let mut n = 0;
    if r.read(&mut buf).await? == 1 {
        first(buf[0]);
        w.write_all(&buf).await?;
        n = 1 + tokio::io::copy(&mut r, &mut w).await?;
    }
    w.shutdown().await?;
    Ok(n)
}

/// One connection a [`counting_echo_server`] accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// When (simulation time) it was accepted.
    pub at: Duration,
    /// The bytes it echoed, once the peer's FIN came and the echo half-closed; `None` while
    /// open, or when it failed or the host crashed first. A TCP health probe connects and
    /// closes at once, so it shows as `Some(0)`: a client connection carries bytes.
    pub echoed: Option<u64>,
    /// The first byte it received, if any: with streams whose first [`pattern_byte`]s differ,
    /// it tells which client stream this connection carried.
    pub first_byte: Option<u8>,
}

/// What a [`counting_echo_server`] saw, shared with the test (hosts and the test run on one
/// thread, so an `Rc` is enough). It outlives crashes and bounces of the host.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Every connection accepted, in order.
    pub conns: Vec<Accepted>,
    /// Connections open now (accepted, echo not finished, host not crashed since).
    pub open: usize,
}

impl EchoStats {
    /// Connections accepted in `from..to` (simulation time) that were not health probes: they
    /// carried bytes, or have not finished yet.
    pub fn clients_between(&self, from: Duration, to: Duration) -> usize {
        self.conns
            .iter()
            .filter(|c| (from..to).contains(&c.at) && c.echoed != Some(0))
            .count()
    }

    /// When the first connection at or after `from` that was not a health probe was accepted.
    pub fn first_client_after(&self, from: Duration) -> Option<Duration> {
        self.conns
            .iter()
            .find(|c| c.at >= from && c.echoed != Some(0))
            .map(|c| c.at)
    }
}

/// The shared record of a [`counting_echo_server`].
pub type EchoLog = std::rc::Rc<RefCell<EchoStats>>;

/// An [`echo_server`] that records every connection it accepts, and how many are open, in
/// `log`, so a scenario can count the connections each backend got and when.
pub async fn counting_echo_server(port: u16, log: EchoLog) -> turmoil::Result {
    /// Counts a connection as open until its task ends, or is dropped by a crash.
    struct Open(EchoLog);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.borrow_mut().open -= 1;
        }
    }
    let listener = turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let i = {
            let mut stats = log.borrow_mut();
            stats.conns.push(Accepted {
                at: sim_time(),
                echoed: None,
                first_byte: None,
            });
            stats.open += 1;
            stats.conns.len() - 1
        };
        let open = Open(log.clone());
        tokio::task::spawn_local(async move {
            let log = open.0.clone();
            let first = |b: u8| log.borrow_mut().conns[i].first_byte = Some(b);
            if let Ok(n) = echo_noting_first_byte(stream, first).await {
                open.0.borrow_mut().conns[i].echoed = Some(n);
            }
            drop(open);
        });
    }
}

/// One step of SplitMix64: a good 64-bit mix of `x`.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Byte `i` of the deterministic stream `stream`. Streams never repeat a short period, so a
/// byte duplicated, dropped or reordered anywhere shows up as a mismatch.
pub fn pattern_byte(stream: u64, i: u64) -> u8 {
    let word = splitmix(splitmix(stream) ^ (i / 8));
    word.to_le_bytes()[(i % 8) as usize]
}

/// Bytes `offset..offset + len` of the deterministic stream `stream` (see [`pattern_byte`]).
pub fn pattern(stream: u64, offset: u64, len: usize) -> Vec<u8> {
    // One mix per 8 bytes rather than per byte: a debug build spends most of a campaign's
    // time here otherwise.
    let key = splitmix(stream);
    let mut out = Vec::with_capacity(len);
    let mut i = offset;
    let end = offset + len as u64;
    while i < end {
        let word = splitmix(key ^ (i / 8)).to_le_bytes();
        let from = (i % 8) as usize;
        let take = (8 - from).min((end - i) as usize);
        out.extend_from_slice(&word[from..from + take]);
        i += take as u64;
    }
    out
}

/// Checks that `received` is a prefix of stream `stream`: every byte arrived once and in order,
/// with nothing extra. The error names the first byte that differs.
pub fn check_prefix(stream: u64, received: &[u8]) -> Result<(), String> {
    let expected = pattern(stream, 0, received.len());
    match (0..received.len()).find(|&i| received[i] != expected[i]) {
        None => Ok(()),
        Some(i) => Err(format!(
            "stream {stream}: byte {i} of {} is {:#04x}, expected {:#04x}",
            received.len(),
            received[i],
            pattern_byte(stream, i as u64)
        )),
    }
}

/// A small seeded random number generator (SplitMix64) for a scenario's own choices: fault
/// times, sizes, which link to cut. Deterministic for a seed, independent of turmoil's.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix(self.0)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A duration of `lo..=hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// One element of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64 - 1) as usize]
    }
}

/// Time since the simulation started, as seen from the running host or client. Comparable
/// across hosts and with `Sim::elapsed` outside the simulation (to within a tick).
pub fn sim_time() -> Duration {
    turmoil::sim_elapsed().expect("sim_time() is called from inside a turmoil host or client")
}

/// Connects to the proxy, first waiting until the simulation is [`STARTUP`] old, so every
/// host has had its first tick and bound its listener: with `enable_random_order`, or a client
/// registered before the hosts, a connect in the very first tick can reach the proxy before it
/// listens and be refused.
pub async fn connect_proxy() -> io::Result<turmoil::net::TcpStream> {
    let now = sim_time();
    if now < STARTUP {
        tokio::time::sleep(STARTUP - now).await;
    }
    turmoil::net::TcpStream::connect(("proxy", PROXY_PORT)).await
}

/// How long into a simulation every host has certainly bound its listeners (see
/// [`connect_proxy`]).
pub const STARTUP: Duration = Duration::from_millis(5);

/// How a read loop ([`read_until`]) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer half-closed: read returned 0.
    Eof,
    /// A read failed (typically a reset).
    Error(io::ErrorKind),
    /// The deadline passed first: the stream stalled.
    TimedOut,
}

/// Reads from `r` into `into` until end of file, an error, `want` bytes in total, or `deadline`
/// on the caller's tokio clock, whichever comes first. Returns `None` when `want` bytes arrived
/// before the stream ended, and how it ended otherwise.
pub async fn read_until<R: AsyncRead + Unpin>(
    r: &mut R,
    into: &mut Vec<u8>,
    want: Option<usize>,
    deadline: tokio::time::Instant,
) -> Option<End> {
    let mut buf = vec![0; 4096];
    loop {
        if want.is_some_and(|w| into.len() >= w) {
            return None;
        }
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return Some(End::TimedOut),
            Ok(Ok(0)) => return Some(End::Eof),
            Ok(Ok(n)) => into.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Some(End::Error(e.kind())),
        }
    }
}

/// Polls `ready` every simulated millisecond until it is true (returns true) or `limit` has
/// passed (returns false). For a client waiting on a flag the test sets between steps.
pub async fn wait_for(mut ready: impl FnMut() -> bool, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !ready() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Waits until `host` has no TCP stream open (the proxy closed every socket of its finished
/// connections), or fails after `limit`.
///
/// Only meaningful where no connect from `host` was abandoned: turmoil 0.7 registers a socket
/// when a connect starts and never removes it if the connect future is dropped (as a connect
/// timeout does), so such a socket is counted for the rest of the simulation.
pub async fn no_streams_left_on(host: &str, limit: Duration) -> Result<(), String> {
    if wait_for(
        || turmoil::established_tcp_stream_count_on(host) == 0,
        limit,
    )
    .await
    {
        Ok(())
    } else {
        Err(format!(
            "{host} still has {} TCP stream(s) open {limit:?} after the clients finished",
            turmoil::established_tcp_stream_count_on(host)
        ))
    }
}

/// The `Sec-WebSocket-Key` of every upgrade request [`upgrade_request`] builds (the example
/// key of RFC 6455 §1.3).
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The largest response head the client helpers read: as large as the proxy accepts from a
/// backend.
const RESPONSE_HEAD_MAX: usize = 16 * 1024;

/// A valid WebSocket upgrade request for `path`, with the key [`WS_KEY`].
pub fn upgrade_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// The `101 Switching Protocols` head a [`ws_backend`] answers an upgrade with `key` with.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        portcullis::handshake::accept_key(key)
    )
    .into_bytes()
}

/// A single-frame (FIN) WebSocket message: `opcode` (1 text, 2 binary), `payload`, masked with
/// `mask` when there is one, as a client must. Payloads up to 64 KiB.
pub fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | (opcode & 0x0f)];
    let masked = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(masked | n as u8),
        n => {
            let n = u16::try_from(n).expect("ws_frame takes payloads up to 64 KiB");
            out.push(masked | 126);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    match mask {
        None => out.extend_from_slice(payload),
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
    }
    out
}

/// The status code of an HTTP response head (`HTTP/1.1 504 Gateway Timeout` → 504).
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let code = line.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The value of the first header `name` (ASCII case-insensitive) in an HTTP head, trimmed.
pub fn header_value<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads an HTTP head from `r` with [`portcullis::handshake::read_head`] (the proxy's own
/// incremental reader); bytes that came after the head are in
/// [`Head::rest`](portcullis::handshake::Head::rest). A close before the head ended is
/// `UnexpectedEof`.
pub async fn read_http_head<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> io::Result<portcullis::handshake::Head> {
    use portcullis::handshake::HeadError;
    portcullis::handshake::read_head(&mut r.compat(), max)
        .await
        .map_err(|e| match e {
            HeadError::Io(e) => e,
            HeadError::Eof { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string()),
            HeadError::TooLarge => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })
}

/// The client side of an upgrade: writes [`upgrade_request`]`("/")` and then `pipelined` (the
/// first bytes of the tunnel) in one write, and reads the response head. The head may be the
/// 101 or a refusal; either way the bytes after it are in
/// [`Head::rest`](portcullis::handshake::Head::rest).
pub async fn ws_upgrade(
    stream: &mut turmoil::net::TcpStream,
    pipelined: &[u8],
) -> io::Result<portcullis::handshake::Head> {
    let mut out = upgrade_request("/");
    out.extend_from_slice(pipelined);
    stream.write_all(&out).await?;
    read_http_head(stream, RESPONSE_HEAD_MAX).await
}

/// What a [`ws_backend`] does once it has read an upgrade request's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsAnswer {
    /// Answers with [`switching_protocols`] for the request's key followed, in the same write,
    /// by `greeting` (may be empty); then echoes every byte after the head (those that came
    /// with it first) until the peer's FIN, and half-closes.
    Upgrade {
        /// Bytes written right behind the 101, as a server's first frame.
        greeting: Vec<u8>,
    },
    /// Never answers: reads (and records) until the peer closes.
    Silence,
    /// Closes the connection at once without answering.
    Hangup,
}

/// One connection a [`ws_backend`] accepted, as it saw it.
#[derive(Debug, Clone, Default)]
pub struct WsConn {
    /// The request head, blank line included; empty until it has been read.
    pub head: Vec<u8>,
    /// When (simulation time) the head had been read.
    pub head_at: Option<Duration>,
    /// Every byte after the head, in order of arrival.
    pub received: Vec<u8>,
    /// When (simulation time) and how the read side ended; `None` while open, or when the
    /// host crashed first.
    pub ended: Option<(Duration, End)>,
}

/// The connections of a [`ws_backend`] in order of acceptance, shared with the test (hosts and
/// the test run on one thread, so an `Rc` is enough).
pub type WsLog = std::rc::Rc<RefCell<Vec<WsConn>>>;

/// The software of a minimal WebSocket backend: accepts on `0.0.0.0:port`, reads each
/// connection's request head with [`portcullis::handshake::read_head`], and answers as `answer`
/// says, recording what it saw in `log`. It checks nothing about the request beyond taking its
/// `Sec-WebSocket-Key`: the scenarios check what it recorded.
pub async fn ws_backend(port: u16, answer: WsAnswer, log: WsLog) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let i = {
            let mut log = log.borrow_mut();
            log.push(WsConn::default());
            log.len() - 1
        };
        tokio::task::spawn_local(ws_backend_connection(
            stream,
            answer.clone(),
            log.clone(),
            i,
        ));
    }
}

async fn ws_backend_connection(
    mut stream: turmoil::net::TcpStream,
    answer: WsAnswer,
    log: WsLog,
    i: usize,
) {
    let ended = |end: End| log.borrow_mut()[i].ended = Some((sim_time(), end));
    let head = match read_http_head(&mut stream, RESPONSE_HEAD_MAX).await {
        Ok(head) => head,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return ended(End::Eof),
        Err(e) => return ended(End::Error(e.kind())),
    };
    {
        let mut log = log.borrow_mut();
        log[i].head.clone_from(&head.bytes);
        log[i].head_at = Some(sim_time());
        log[i].received.extend_from_slice(&head.rest);
    }
    let echo = match answer {
        WsAnswer::Hangup => return,
        WsAnswer::Silence => false,
        WsAnswer::Upgrade { greeting } => {
            let key = header_value(&head.bytes, "sec-websocket-key").unwrap_or("");
            let mut out = switching_protocols(key);
            out.extend_from_slice(&greeting);
            out.extend_from_slice(&head.rest);
            if let Err(e) = stream.write_all(&out).await {
                return ended(End::Error(e.kind()));
            }
            true
        }
    };
    let mut buf = vec![0; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                if echo {
                    let _ = stream.shutdown().await;
                }
                return ended(End::Eof);
            }
            Ok(n) => {
                log.borrow_mut()[i].received.extend_from_slice(&buf[..n]);
                if echo {
                    if let Err(e) = stream.write_all(&buf[..n]).await {
                        return ended(End::Error(e.kind()));
                    }
                }
            }
            Err(e) => return ended(End::Error(e.kind())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_deterministic_and_streams_differ() {
        assert_eq!(pattern(7, 0, 64), pattern(7, 0, 64));
        assert_eq!(pattern(7, 10, 20), pattern(7, 0, 30)[10..]);
        for (offset, len) in [(0, 0), (0, 1), (3, 5), (5, 17), (8, 8), (13, 100)] {
            let bytes: Vec<u8> = (offset..offset + len as u64)
                .map(|i| pattern_byte(7, i))
                .collect();
            assert_eq!(pattern(7, offset, len), bytes, "offset {offset}, len {len}");
        }
        assert_ne!(pattern(7, 0, 64), pattern(8, 0, 64));
        assert!(check_prefix(7, &pattern(7, 0, 1000)).is_ok());
        let mut shifted = pattern(7, 0, 100);
        shifted.remove(50);
        assert!(check_prefix(7, &shifted).unwrap_err().contains("byte 50"));
    }

    #[test]
    fn rng_stays_in_range() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let x = rng.range(3, 5);
            assert!((3..=5).contains(&x));
        }
        assert_eq!(Rng::new(9).next_u64(), Rng::new(9).next_u64());
    }
}
