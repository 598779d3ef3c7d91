//! Connecting to a backend that does not answer: the proxy gives up at exactly its connect
//! timeout, in simulated time, and fails over to the next backend when there is one.
//!
//! The client↔proxy and proxy↔healthy-backend links have a fixed 1 ms latency so the timings
//! can be asserted to within a few ticks; the connect timeout itself is drawn from the seed.

use std::time::Duration;

use portcullis::TcpProxy;
use sim::{
    check_prefix, connect_proxy, echo_server, pattern, read_until, run_seeds, serve_proxy,
    test_name, End,
};
use sim::{Rng, BACKEND_PORT};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The latency of the links the timings go through.
const LINK: Duration = Duration::from_millis(1);

/// Slack for the simulation's granularity: a message is delivered on the receiving host's next
/// tick, and hosts run one after another within a tick.
const TICKS: Duration = Duration::from_millis(3);

/// How a backend that does not complete a connect fails to.
#[derive(Clone, Copy, PartialEq)]
enum Down {
    /// The link to it holds every message: the SYN never arrives.
    Held,
    /// Its host has crashed: nothing delivered to it is processed.
    Crashed,
    /// The link to it is partitioned: turmoil refuses the connect at once.
    Partitioned,
}

/// A simulation with a proxy over `backends` (`"slow"` is made unreachable as `down` says, any
/// other is a healthy echo server), and a connect timeout drawn from the seed.
fn world(seed: u64, backends: &[&'static str], down: Down) -> (turmoil::Sim<'static>, Duration) {
    let timeout = Rng::new(seed).millis(100, 1000);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(Duration::from_millis(20))
        .simulation_duration(Duration::from_secs(30))
        .build();
    for &b in backends {
        sim.host(b, || echo_server(BACKEND_PORT));
    }
    let addrs: Vec<String> = backends
        .iter()
        .map(|b| format!("{b}:{BACKEND_PORT}"))
        .collect();
    let ms = timeout.as_millis() as u64;
    sim.host("proxy", move || {
        serve_proxy(TcpProxy::new(addrs.clone()).connect_timeout_ms(ms))
    });
    for &b in backends {
        sim.set_link_latency("proxy", b, LINK);
    }
    match down {
        Down::Held => sim.hold("proxy", "slow"),
        Down::Crashed => sim.crash("slow"),
        Down::Partitioned => sim.partition("proxy", "slow"),
    }
    (sim, timeout)
}

/// Connects through the proxy, sends `len` bytes of stream `stream`, and returns how long the
/// whole echo took to come back (from just after the connect).
async fn echo_round_trip(stream: u64, len: usize) -> Result<Duration, String> {
    let mut s = connect_proxy().await.map_err(|e| format!("connect: {e}"))?;
    let t0 = Instant::now();
    s.write_all(&pattern(stream, 0, len))
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let end = read_until(&mut s, &mut got, Some(len), t0 + Duration::from_secs(5)).await;
    let took = t0.elapsed();
    check_prefix(stream, &got)?;
    if let Some(end) = end {
        return Err(format!(
            "the echo ended with {end:?} after {} of {len} bytes",
            got.len()
        ));
    }
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let end = read_until(
        &mut s,
        &mut got,
        None,
        Instant::now() + Duration::from_secs(1),
    )
    .await;
    if end != Some(End::Eof) || got.len() != len {
        return Err(format!(
            "after the echo: {end:?} with {} bytes, expected Eof",
            got.len()
        ));
    }
    Ok(took)
}

fn within(what: &str, took: Duration, lo: Duration, hi: Duration) -> turmoil::Result {
    if took < lo || took > hi {
        return Err(format!("{what} took {took:?}, expected {lo:?}..={hi:?}").into());
    }
    Ok(())
}

#[test]
fn backend_that_hangs_on_connect_is_given_up_at_exactly_the_connect_timeout() {
    run_seeds(test_name!(), |seed| {
        let (mut sim, timeout) = world(seed, &["slow"], Down::Held);
        sim.client("client", async move {
            let mut s = connect_proxy().await?;
            let t0 = Instant::now();
            s.write_all(b"hello").await?;
            let mut got = Vec::new();
            let end = read_until(&mut s, &mut got, None, t0 + 3 * timeout).await;
            let took = t0.elapsed();
            // The proxy never read "hello", so closing sends a reset rather than a FIN.
            if !matches!(end, Some(End::Eof | End::Error(_))) || !got.is_empty() {
                return Err(
                    format!("expected the connection closed, got {end:?} and {got:?}").into(),
                );
            }
            within(
                "closing the client",
                took,
                timeout - TICKS,
                timeout + LINK + TICKS,
            )
        });
        sim.set_link_latency("client", "proxy", LINK);
        sim.run()
    });
}

#[test]
fn hanging_backend_is_failed_over_to_a_healthy_one_after_the_connect_timeout() {
    run_seeds(test_name!(), |seed| {
        let (mut sim, timeout) = world(seed, &["slow", "fast"], Down::Held);
        sim.client("client", async move {
            // Round robin: the 1st and 3rd connections try "slow" first, the 2nd "fast".
            let round_trip = 4 * LINK + TICKS;
            let took = echo_round_trip(1, 3000).await?;
            within("1st echo, via slow", took, timeout, timeout + round_trip)?;
            let took = echo_round_trip(2, 3000).await?;
            within("2nd echo, fast first", took, Duration::ZERO, round_trip)?;
            let took = echo_round_trip(3, 3000).await?;
            within("3rd echo, via slow", took, timeout, timeout + round_trip)
        });
        sim.set_link_latency("client", "proxy", LINK);
        sim.run()
    });
}

#[test]
fn crashed_backend_host_hangs_the_connect_until_the_timeout_then_fails_over() {
    run_seeds(test_name!(), |seed| {
        let (mut sim, timeout) = world(seed, &["slow", "fast"], Down::Crashed);
        sim.client("client", async move {
            let took = echo_round_trip(1, 3000).await?;
            within(
                "echo via a crashed host",
                took,
                timeout,
                timeout + 4 * LINK + TICKS,
            )
        });
        sim.set_link_latency("client", "proxy", LINK);
        sim.run()
    });
}

#[test]
fn partitioned_backend_is_refused_at_once_and_failed_over_without_waiting() {
    run_seeds(test_name!(), |seed| {
        let (mut sim, _) = world(seed, &["slow", "fast"], Down::Partitioned);
        sim.client("client", async move {
            let took = echo_round_trip(1, 3000).await?;
            within(
                "echo via a partition",
                took,
                Duration::ZERO,
                4 * LINK + TICKS,
            )
        });
        sim.set_link_latency("client", "proxy", LINK);
        sim.run()
    });
}
