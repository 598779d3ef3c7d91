//! A host that crashes in the middle of a relayed connection: the client must learn promptly
//! (its read returns end of file or an error within a few link latencies), with every byte it
//! did get intact, and the proxy must not keep the dead connection's sockets.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use portcullis::TcpProxy;
use sim::{
    check_prefix, connect_proxy, echo_server, pattern, read_until, run_seeds, serve_proxy,
    test_name,
};
use sim::{no_streams_left_on, sim_time, wait_for, End, Rng, BACKEND_PORT};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// Slack for the simulation's granularity (delivery on the next tick of each host on the way).
const TICKS: Duration = Duration::from_millis(4);

/// What the client saw, shared with the test driving the simulation.
#[derive(Default)]
struct Seen {
    /// The first echo came back: the relay is established.
    established: bool,
    /// When (simulation time) the client's read ended, and how.
    ended: Option<(Duration, End)>,
}

/// Relays a paced stream of bytes to an echo backend, crashes `victim` at a random moment once
/// the relay is established, and checks the client's connection ends within two link latencies
/// of the crash. When the proxy is the victim it is restarted, and a new connection must work.
fn crash_mid_relay(seed: u64, victim: &'static str) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let max_latency = rng.millis(1, 30);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(max_latency)
        .simulation_duration(Duration::from_secs(30))
        .build();
    sim.host("backend", || echo_server(BACKEND_PORT));
    sim.host("proxy", || {
        serve_proxy(TcpProxy::new([format!("backend:{BACKEND_PORT}")]).connect_timeout_ms(1000))
    });

    let seen = Rc::new(RefCell::new(Seen::default()));
    let client_seen = seen.clone();
    let mut client_rng = Rng::new(rng.next_u64());
    sim.client("client", async move {
        let seen = client_seen;
        let (mut r, mut w) = connect_proxy().await?.into_split();
        // Writes paced chunks of stream 1 until a write fails or the reader is done.
        let writer = tokio::task::spawn_local(async move {
            let mut offset = 0;
            loop {
                let n = client_rng.range(1, 2000) as usize;
                if w.write_all(&pattern(1, offset, n)).await.is_err() {
                    break;
                }
                offset += n as u64;
                tokio::time::sleep(client_rng.millis(5, 20)).await;
            }
        });
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        if read_until(&mut r, &mut got, Some(1), deadline)
            .await
            .is_some()
        {
            return Err("the relay never carried a byte".into());
        }
        seen.borrow_mut().established = true;
        let end = read_until(&mut r, &mut got, None, deadline)
            .await
            .expect("no byte limit");
        seen.borrow_mut().ended = Some((sim_time(), end.clone()));
        writer.abort();
        check_prefix(1, &got)?;
        if end == End::TimedOut {
            return Err(
                format!("the connection was still open 10 s after the {victim} crashed").into(),
            );
        }
        drop(r);
        if victim == "proxy" {
            // The proxy is restarted by the test; until then connects hang, so retry.
            let ok = wait_for_echo_through_restarted_proxy().await;
            if !ok {
                return Err("no connection worked after the proxy restarted".into());
            }
        } else {
            no_streams_left_on("proxy", Duration::from_secs(1)).await?;
        }
        Ok(())
    });

    // Step until the relay is established, then on for a random while, then crash the victim.
    while !seen.borrow().established {
        sim.step()?;
    }
    for _ in 0..rng.range(0, 50) {
        sim.step()?;
    }
    sim.crash(victim);
    let crashed_at = sim.elapsed();
    let mut bounced = false;
    while !sim.step()? {
        if victim == "proxy" && !bounced && sim.elapsed() > crashed_at + Duration::from_millis(300)
        {
            sim.bounce(victim);
            bounced = true;
        }
    }

    let (ended_at, end) = seen.borrow_mut().ended.take().expect("the client finished");
    let took = ended_at.saturating_sub(crashed_at);
    let bound = 2 * max_latency + TICKS;
    if took > bound {
        return Err(format!(
            "the client's connection ended ({end:?}) {took:?} after the {victim} crashed; \
             expected within {bound:?}"
        )
        .into());
    }
    Ok(())
}

/// Retries a small echo through the proxy (each attempt bounded, since a connect to a crashed
/// host hangs) for up to 5 s.
async fn wait_for_echo_through_restarted_proxy() -> bool {
    let attempt = || async {
        let mut s = tokio::time::timeout(Duration::from_millis(100), connect_proxy())
            .await
            .ok()?
            .ok()?;
        s.write_all(&pattern(2, 0, 100)).await.ok()?;
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        let end = read_until(&mut s, &mut got, Some(100), deadline).await;
        (end.is_none() && check_prefix(2, &got).is_ok()).then_some(())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if attempt().await.is_some() {
            return true;
        }
        wait_for(|| false, Duration::from_millis(10)).await;
    }
    false
}

#[test]
fn backend_host_that_crashes_mid_relay_ends_the_client_connection_promptly() {
    run_seeds(test_name!(), |seed| crash_mid_relay(seed, "backend"));
}

#[test]
fn proxy_host_that_crashes_mid_relay_ends_the_client_connection_promptly_and_serves_again_after_restart(
) {
    run_seeds(test_name!(), |seed| crash_mid_relay(seed, "proxy"));
}
