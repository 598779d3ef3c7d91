//! Graceful shutdown: when the shutdown future completes, the proxy stops accepting, lets
//! established connections go on, returns as soon as the last one has ended, and closes the
//! ones still open at the drain timeout.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use portcullis::TcpProxy;
use sim::{check_prefix, connect_proxy, echo_server, pattern, read_until, run_seeds, sim_time};
use sim::{test_name, wait_for, End, Rng, SimNet, BACKEND_PORT, PROXY_PORT};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The proxy's drain timeout.
const DRAIN: Duration = Duration::from_millis(500);

/// Slack for the simulation's granularity: the shutdown flag is polled every millisecond, and
/// a message is delivered on the receiving host's next tick.
const TICKS: Duration = Duration::from_millis(3);

/// Flags between the proxy host, the client and the test.
#[derive(Default)]
struct Flags {
    /// Set by the client: shut the proxy down now.
    shutdown: Cell<bool>,
    /// Set by the proxy host: when `serve_with` returned.
    returned: Cell<Option<Duration>>,
}

/// A simulation with an echo backend and a proxy that shuts down when `flags.shutdown` is set.
fn world(seed: u64, flags: &Rc<Flags>) -> turmoil::Sim<'static> {
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(Rng::new(seed).millis(1, 20))
        .simulation_duration(Duration::from_secs(30))
        .build();
    sim.host("backend", || echo_server(BACKEND_PORT));
    let flags = flags.clone();
    sim.host("proxy", move || {
        let flags = flags.clone();
        async move {
            let net = SimNet;
            let listener = portcullis::Net::bind(&net, &format!("0.0.0.0:{PROXY_PORT}")).await?;
            let shutdown = async {
                wait_for(|| flags.shutdown.get(), Duration::from_secs(3600)).await;
            };
            TcpProxy::new([format!("backend:{BACKEND_PORT}")])
                .drain_timeout_ms(DRAIN.as_millis() as u64)
                .serve_with(net, listener, shutdown)
                .await?;
            flags.returned.set(Some(sim_time()));
            // Keep the host (and whatever the proxy left running on it) alive.
            std::future::pending().await
        }
    });
    sim
}

/// Echoes `len` bytes of `stream` at `offset` over `s`, appending to `got`.
async fn echo(
    s: &mut turmoil::net::TcpStream,
    got: &mut Vec<u8>,
    stream: u64,
    len: usize,
) -> Result<(), String> {
    let offset = got.len();
    s.write_all(&pattern(stream, offset as u64, len))
        .await
        .map_err(|e| format!("write: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(1);
    let end = read_until(s, got, Some(offset + len), deadline).await;
    check_prefix(stream, got)?;
    match end {
        None => Ok(()),
        Some(end) => Err(format!("echo ended with {end:?} at byte {}", got.len())),
    }
}

#[test]
fn shutdown_lets_established_connections_finish_and_returns_once_the_last_has_ended() {
    run_seeds(test_name!(), |seed| {
        let flags = Rc::new(Flags::default());
        let mut sim = world(seed, &flags);
        let client_flags = flags.clone();
        sim.client("client", async move {
            let flags = client_flags;
            let mut s = connect_proxy().await?;
            let mut got = Vec::new();
            echo(&mut s, &mut got, 1, 1000).await?;
            flags.shutdown.set(true);
            // Within the drain, the established tunnel still carries both ways.
            tokio::time::sleep(DRAIN / 4).await;
            echo(&mut s, &mut got, 1, 1000).await?;
            // Ending it ends the drain early.
            s.shutdown().await?;
            let end = read_until(&mut s, &mut got, None, Instant::now() + DRAIN).await;
            if end != Some(End::Eof) || got.len() != 2000 {
                return Err(format!("closing: {end:?} after {} bytes", got.len()).into());
            }
            let closed = sim_time();
            drop(s);
            if !wait_for(|| flags.returned.get().is_some(), DRAIN).await {
                return Err("serve_with did not return after the last connection ended".into());
            }
            let returned = flags.returned.get().expect("returned");
            // The drain checks every 10 ms; the FIN still has to reach the proxy.
            if returned > closed + DRAIN / 2 {
                return Err(format!(
                    "serve_with returned at {returned:?}, long after the last connection \
                     closed at {closed:?}"
                )
                .into());
            }
            // And the listener is gone: a new connect is refused.
            match connect_proxy().await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                other => Err(format!("connect after shutdown: {other:?}").into()),
            }
        });
        sim.run()
    });
}

/// The drain deadline is enforced: a connection still open then is closed, so its client sees
/// end of file or a reset at the drain timeout rather than a tunnel that lives on (under
/// `serve_with`) or a task frozen with its sockets open (under `serve`, whose executor the
/// leftover tasks kept alive).
#[test]
fn connection_still_open_at_the_drain_timeout_is_closed() {
    run_seeds(test_name!(), |seed| {
        let flags = Rc::new(Flags::default());
        let mut sim = world(seed, &flags);
        let client_flags = flags.clone();
        sim.client("client", async move {
            let flags = client_flags;
            let mut s = connect_proxy().await?;
            let mut got = Vec::new();
            echo(&mut s, &mut got, 1, 1000).await?;
            flags.shutdown.set(true);
            let shutdown_at = sim_time();
            // Idle, and open: the proxy must close it at the drain timeout.
            let end = read_until(&mut s, &mut got, None, Instant::now() + 4 * DRAIN).await;
            let took = sim_time() - shutdown_at;
            // At the deadline, give or take the close crossing one link (at most 20 ms).
            let (lo, hi) = (DRAIN - TICKS, DRAIN + Duration::from_millis(20) + TICKS);
            if end == Some(End::TimedOut) || took < lo || took > hi {
                return Err(format!(
                    "the connection ended ({end:?}) {took:?} after shutdown; \
                     expected at the drain timeout, {lo:?}..={hi:?}"
                )
                .into());
            }
            Ok(())
        });
        sim.run()
    });
}
