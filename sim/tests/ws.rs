//! The WebSocket flow (`portcullis::WsProxy`) under turmoil: what the client gets when a
//! backend stays silent, fails mid-handshake, or when the client itself stalls; a tunnel that
//! stays open through an idle hour; and bytes that arrive behind a head in either direction.
//!
//! The backends are [`sim::ws_backend`]s: they read the forwarded request head with the proxy's
//! own `read_head`, answer (or not) as the scenario says, echo the tunnel, and record what they
//! saw for the test to check. Where a timing is asserted, the links it goes through have a fixed
//! 1 ms latency; elsewhere latency is random, drawn from the seed.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use portcullis::handshake::accept_key;
use portcullis::WsProxy;
use sim::{
    connect_proxy, no_streams_left_on, pattern, read_http_head, read_until, run_seeds,
    serve_ws_proxy, sim_time, status_code, switching_protocols, test_name, upgrade_request,
    wait_for, ws_backend, ws_frame, ws_upgrade, End, Rng, WsAnswer, WsLog, BACKEND_PORT, WS_KEY,
};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use turmoil::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// The latency of the links a timing goes through.
const LINK: Duration = Duration::from_millis(1);

/// Slack for the simulation's granularity: a message is delivered on the receiving host's next
/// tick, and hosts run one after another within a tick.
const TICKS: Duration = Duration::from_millis(3);

/// The tick of the idle-hour scenario. turmoil steps every host once per tick whether anything
/// happens or not, so an hour of 1 ms ticks (3.6 million steps) takes minutes of wall time in a
/// debug build; 100 ms ticks make it 36 000 steps, and the 1 s read timeout that must not fire is
/// still ten ticks long.
const IDLE_TICK: Duration = Duration::from_millis(100);

/// A simulation with a WebSocket proxy (`proxy`, over `"name:9000"` for each backend) and one
/// [`ws_backend`] per `(name, answer)`; returns it with each backend's log, in order.
fn world(
    seed: u64,
    max_latency: Duration,
    duration: Duration,
    backends: &[(&'static str, WsAnswer)],
    proxy: WsProxy,
) -> (turmoil::Sim<'static>, Vec<WsLog>) {
    world_with_tick(
        seed,
        max_latency,
        duration,
        Duration::from_millis(1),
        backends,
        proxy,
    )
}

/// [`world`] with a simulation tick of `tick` rather than turmoil's 1 ms.
fn world_with_tick(
    seed: u64,
    max_latency: Duration,
    duration: Duration,
    tick: Duration,
    backends: &[(&'static str, WsAnswer)],
    proxy: WsProxy,
) -> (turmoil::Sim<'static>, Vec<WsLog>) {
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(max_latency)
        .simulation_duration(duration)
        .tick_duration(tick)
        .build();
    let mut logs = Vec::new();
    for (name, answer) in backends {
        let log = WsLog::default();
        logs.push(log.clone());
        let answer = answer.clone();
        sim.host(*name, move || {
            ws_backend(BACKEND_PORT, answer.clone(), log.clone())
        });
    }
    sim.host("proxy", move || serve_ws_proxy(proxy.clone()));
    (sim, logs)
}

/// The addresses of `backends` for [`WsProxy::new`].
fn addrs(backends: &[(&'static str, WsAnswer)]) -> Vec<String> {
    backends
        .iter()
        .map(|(name, _)| format!("{name}:{BACKEND_PORT}"))
        .collect()
}

fn within(what: &str, took: Duration, lo: Duration, hi: Duration) -> Result<(), String> {
    if took < lo || took > hi {
        return Err(format!("{what} took {took:?}, expected {lo:?}..={hi:?}"));
    }
    Ok(())
}

/// Reads the rest of a response the proxy answered instead of a tunnel, after its head, and
/// checks the proxy closed the connection right behind it: end of file within `slack` of
/// `answered_at` (simulation time), [`TICKS`] on a link of fixed latency, more where the FIN may
/// take longer than the response did. Then closes the client's side too, as a client does: the
/// proxy lingers after a refusal, reading and discarding until the client closes or a couple of
/// seconds pass, and only then lets go of the socket.
async fn read_to_close(
    mut s: turmoil::net::TcpStream,
    mut got: Vec<u8>,
    answered_at: Duration,
    slack: Duration,
) -> Result<Vec<u8>, String> {
    let end = read_until(
        &mut s,
        &mut got,
        None,
        Instant::now() + Duration::from_secs(1),
    )
    .await;
    if end != Some(End::Eof) {
        return Err(format!(
            "after the response, the proxy did not close the connection: {end:?}"
        ));
    }
    within(
        "the close, after the response head",
        sim_time() - answered_at,
        Duration::ZERO,
        slack,
    )?;
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    Ok(got)
}

/// Checks that `head` is exactly the 101 a [`ws_backend`] writes for [`WS_KEY`], passed on byte
/// for byte.
fn check_101(head: &[u8]) -> Result<(), String> {
    if head != switching_protocols(WS_KEY) {
        return Err(format!(
            "expected the backend's own 101, got {:?}",
            String::from_utf8_lossy(head)
        ));
    }
    let accept = sim::header_value(head, "sec-websocket-accept");
    if accept != Some(accept_key(WS_KEY).as_str()) {
        return Err(format!("wrong Sec-WebSocket-Accept {accept:?}"));
    }
    Ok(())
}

/// Checks that a response head has `status`.
fn check_status(head: &[u8], status: u16) -> Result<(), String> {
    if status_code(head) != Some(status) {
        return Err(format!(
            "expected HTTP/1.1 {status}, got {:?}",
            String::from_utf8_lossy(head)
        ));
    }
    Ok(())
}

/// Sends `message` through an established tunnel to an echo backend and checks it comes back
/// byte for byte within `limit`.
async fn round_trip(
    r: &mut OwnedReadHalf,
    w: &mut OwnedWriteHalf,
    message: &[u8],
    limit: Duration,
) -> Result<(), String> {
    w.write_all(message)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let end = read_until(r, &mut got, Some(message.len()), Instant::now() + limit).await;
    if end.is_some() || got != message {
        return Err(format!(
            "the echo ended with {end:?} after {} of {} bytes (equal so far: {})",
            got.len(),
            message.len(),
            message.starts_with(&got)
        ));
    }
    Ok(())
}

/// Half-closes the client's side of a tunnel and checks the backend's FIN comes back through
/// the proxy, with no byte after it.
async fn close_tunnel(mut r: OwnedReadHalf, mut w: OwnedWriteHalf) -> Result<(), String> {
    w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut got = Vec::new();
    let end = read_until(
        &mut r,
        &mut got,
        None,
        Instant::now() + Duration::from_secs(1),
    )
    .await;
    if end != Some(End::Eof) || !got.is_empty() {
        return Err(format!(
            "after the client's FIN: {end:?} with {} more bytes, expected Eof",
            got.len()
        ));
    }
    Ok(())
}

/// A masked binary frame carrying bytes `offset..offset + len` of pattern stream `stream`, with
/// a mask drawn from `rng`.
fn frame(rng: &mut Rng, stream: u64, offset: u64, len: usize) -> Vec<u8> {
    let mask = rng.next_u64().to_le_bytes();
    ws_frame(
        2,
        &pattern(stream, offset, len),
        Some([mask[0], mask[1], mask[2], mask[3]]),
    )
}

#[test]
fn backend_that_never_answers_the_upgrade_gets_the_client_a_504_at_exactly_the_upgrade_timeout() {
    run_seeds(test_name!(), |seed| {
        let timeout = Rng::new(seed).millis(100, 2000);
        let backends = [("silent", WsAnswer::Silence)];
        let proxy = WsProxy::new(addrs(&backends)).upgrade_timeout_ms(timeout.as_millis() as u64);
        let (mut sim, logs) = world(
            seed,
            Duration::from_millis(20),
            Duration::from_secs(30),
            &backends,
            proxy,
        );
        let log = logs[0].clone();
        sim.client("client", async move {
            let mut s = connect_proxy().await?;
            let head = tokio::time::timeout(3 * timeout, ws_upgrade(&mut s, b""))
                .await
                .map_err(|_| format!("no answer within {:?}", 3 * timeout))??;
            let answered_at = sim_time();
            check_status(&head.bytes, 504)?;
            read_to_close(s, head.rest, answered_at, TICKS).await?;

            // The upgrade timeout runs from the proxy's write of the head, which reached the
            // backend one link latency later; the 504 takes one link latency back too.
            let asked_at = log.borrow()[0]
                .head_at
                .ok_or("the backend never got the head")?;
            within(
                "the 504, from the backend's receipt of the request",
                answered_at - asked_at,
                timeout - TICKS,
                timeout + TICKS,
            )?;
            // The proxy also closed its connection to the silent backend.
            if !wait_for(|| log.borrow()[0].ended.is_some(), Duration::from_secs(1)).await {
                return Err("the proxy left its connection to the silent backend open".into());
            }
            let conns = log.borrow().clone();
            if conns.len() != 1 || conns[0].ended.as_ref().map(|e| &e.1) != Some(&End::Eof) {
                return Err(format!("the silent backend saw {conns:?}").into());
            }
            no_streams_left_on("proxy", Duration::from_secs(1)).await?;
            Ok(())
        });
        sim.set_link_latency("client", "proxy", LINK);
        sim.set_link_latency("proxy", "silent", LINK);
        sim.run()
    });
}

/// How a backend fails in the middle of a handshake: after reading the request head, before
/// answering it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The test crashes its host (from outside the simulation, a random few ticks later).
    Crash,
    /// Its software closes the connection without a word.
    Hangup,
}

/// What the client saw in [`failing_mid_handshake`], for the checks after the run.
#[derive(Default)]
struct Outcome {
    /// When (simulation time) the client had the response head.
    answered_at: Option<Duration>,
}

/// A client upgrades (with a frame pipelined behind its head) through a proxy whose first
/// backend, `"flaky"`, fails mid-handshake as `fault` says. With a healthy second backend, the
/// client must get that backend's 101 and a working tunnel, and the pipelined frame must reach
/// the healthy backend once; with none, the client must get 502. Either way promptly: long
/// before the upgrade timeout, within a few link latencies of the fault.
fn failing_mid_handshake(seed: u64, fault: Fault, healthy_next: bool) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let max_latency = rng.millis(1, 20);
    let mut backends = vec![(
        "flaky",
        match fault {
            Fault::Crash => WsAnswer::Silence,
            Fault::Hangup => WsAnswer::Hangup,
        },
    )];
    if healthy_next {
        backends.push((
            "healthy",
            WsAnswer::Upgrade {
                greeting: Vec::new(),
            },
        ));
    }
    let upgrade_timeout = Duration::from_secs(5);
    let proxy = WsProxy::new(addrs(&backends))
        .upgrade_timeout_ms(upgrade_timeout.as_millis() as u64)
        .connect_timeout_ms(1000);
    let (mut sim, logs) = world(seed, max_latency, Duration::from_secs(30), &backends, proxy);

    let outcome = Rc::new(RefCell::new(Outcome::default()));
    let seen = outcome.clone();
    let first_len = rng.range(0, 500) as usize;
    let first = frame(&mut rng, 1, 0, first_len);
    let second = frame(&mut rng, 1, 10_000, 700);
    let client_logs = logs.clone();
    let sent_first = first.clone();
    sim.client("client", async move {
        let first = sent_first;
        let mut s = connect_proxy().await?;
        let head = tokio::time::timeout(upgrade_timeout, ws_upgrade(&mut s, &first))
            .await
            .map_err(|_| "no answer within the upgrade timeout")??;
        let answered_at = sim_time();
        seen.borrow_mut().answered_at = Some(answered_at);
        if !healthy_next {
            check_status(&head.bytes, 502)?;
            read_to_close(s, head.rest, answered_at, max_latency + TICKS).await?;
            no_streams_left_on("proxy", Duration::from_secs(1)).await?;
            return Ok(());
        }
        check_101(&head.bytes)?;
        let (mut r, mut w) = s.into_split();
        // The healthy backend echoes the pipelined frame first.
        let mut got = head.rest;
        let end = read_until(
            &mut r,
            &mut got,
            Some(first.len()),
            Instant::now() + Duration::from_secs(1),
        )
        .await;
        if end.is_some() || got != first {
            return Err(format!(
                "the pipelined frame came back as {} bytes ({end:?}), sent {}",
                got.len(),
                first.len()
            )
            .into());
        }
        round_trip(&mut r, &mut w, &second, Duration::from_secs(1)).await?;
        close_tunnel(r, w).await?;
        let healthy = client_logs[1].borrow().clone();
        let mut tunnel = first.clone();
        tunnel.extend_from_slice(&second);
        if healthy.len() != 1 || healthy[0].received != tunnel {
            return Err(format!(
                "the healthy backend should have had one connection carrying {} bytes, saw {healthy:?}",
                tunnel.len()
            )
            .into());
        }
        no_streams_left_on("proxy", Duration::from_secs(1)).await?;
        Ok(())
    });

    // The flaky backend got the request (and, being read, the pipelined frame) before failing.
    let flaky = logs[0].clone();
    while flaky.borrow().first().and_then(|c| c.head_at).is_none() {
        if sim.step()? {
            return Err("the simulation ended before the flaky backend had the request".into());
        }
    }
    let fault_at = match fault {
        Fault::Crash => {
            for _ in 0..rng.range(0, 50) {
                sim.step()?;
            }
            sim.crash("flaky");
            sim.elapsed()
        }
        Fault::Hangup => flaky.borrow()[0].head_at.expect("checked above"),
    };
    while !sim.step()? {}

    let conns = flaky.borrow().clone();
    if conns.len() != 1 || conns[0].received != first {
        return Err(format!(
            "the flaky backend should have had one connection with the frame: {conns:?}"
        )
        .into());
    }
    let answered_at = outcome.borrow().answered_at.expect("checked by the client");
    // The proxy learns of the close one latency after the fault and answers the client one
    // latency later; trying the healthy backend adds a connect and the head there and back.
    let hops = if healthy_next { 6 } else { 2 };
    let bound = hops * (max_latency + Duration::from_millis(1)) + TICKS;
    let took = answered_at.saturating_sub(fault_at);
    if took > bound {
        return Err(format!(
            "the client's answer came {took:?} after the flaky backend's {fault:?}; expected within {bound:?}"
        )
        .into());
    }
    Ok(())
}

#[test]
fn backend_host_that_crashes_mid_handshake_is_passed_over_and_the_next_backend_upgrades_the_client()
{
    run_seeds(test_name!(), |seed| {
        failing_mid_handshake(seed, Fault::Crash, true)
    });
}

#[test]
fn backend_host_that_crashes_mid_handshake_with_no_other_backend_gets_the_client_a_502() {
    run_seeds(test_name!(), |seed| {
        failing_mid_handshake(seed, Fault::Crash, false)
    });
}

#[test]
fn backend_that_hangs_up_without_answering_the_upgrade_is_passed_over_and_the_next_backend_upgrades_the_client(
) {
    run_seeds(test_name!(), |seed| {
        failing_mid_handshake(seed, Fault::Hangup, true)
    });
}

#[test]
fn backend_that_hangs_up_without_answering_the_upgrade_with_no_other_backend_gets_the_client_a_502()
{
    run_seeds(test_name!(), |seed| {
        failing_mid_handshake(seed, Fault::Hangup, false)
    });
}

#[test]
fn client_that_stalls_mid_head_is_answered_408_and_closed_at_exactly_the_read_timeout() {
    run_seeds(test_name!(), |seed| {
        let mut rng = Rng::new(seed);
        let timeout = rng.millis(100, 2000);
        let backends = [(
            "backend",
            WsAnswer::Upgrade {
                greeting: Vec::new(),
            },
        )];
        let proxy = WsProxy::new(addrs(&backends)).read_timeout_ms(timeout.as_millis() as u64);
        let (mut sim, logs) = world(
            seed,
            Duration::from_millis(20),
            Duration::from_secs(30),
            &backends,
            proxy,
        );
        let request = upgrade_request("/");
        // Anything short of the whole head: even "...\r\n\r" has not ended it.
        let cut = rng.range(1, request.len() as u64 - 1) as usize;
        let log = logs[0].clone();
        sim.client("client", async move {
            let mut s = connect_proxy().await?;
            // The proxy accepted one link latency before the connect completed here.
            let accepted_at = sim_time() - LINK;
            s.write_all(&request[..cut]).await?;
            let head = tokio::time::timeout(3 * timeout, read_http_head(&mut s, 16 * 1024))
                .await
                .map_err(|_| format!("no answer within {:?}", 3 * timeout))??;
            let answered_at = sim_time();
            check_status(&head.bytes, 408)?;
            read_to_close(s, head.rest, answered_at, TICKS).await?;
            within(
                "the 408, from the accept",
                answered_at - accepted_at,
                timeout + LINK - TICKS,
                timeout + LINK + TICKS,
            )?;
            if !log.borrow().is_empty() {
                return Err("a backend was contacted for a request that never ended".into());
            }
            no_streams_left_on("proxy", Duration::from_secs(1)).await?;
            Ok(())
        });
        sim.set_link_latency("client", "proxy", LINK);
        sim.run()
    });
}

#[test]
fn tunnel_idle_for_an_hour_stays_open_although_the_read_timeout_is_one_second() {
    run_seeds(test_name!(), |seed| {
        let mut rng = Rng::new(seed);
        let idle = Duration::from_secs(3600);
        let backends = [(
            "backend",
            WsAnswer::Upgrade {
                greeting: Vec::new(),
            },
        )];
        let proxy = WsProxy::new(addrs(&backends))
            .read_timeout_ms(1000)
            .upgrade_timeout_ms(1000)
            .connect_timeout_ms(1000);
        let (mut sim, logs) = world_with_tick(
            seed,
            rng.millis(1, 300),
            idle + Duration::from_secs(60),
            IDLE_TICK,
            &backends,
            proxy,
        );
        let before = frame(&mut rng, 1, 0, 100);
        let after = frame(&mut rng, 1, 100, 3000);
        let log = logs[0].clone();
        sim.client("client", async move {
            let mut s = connect_proxy().await?;
            let head = ws_upgrade(&mut s, b"").await?;
            check_101(&head.bytes)?;
            if !head.rest.is_empty() {
                return Err(format!("{} unexpected bytes after the 101", head.rest.len()).into());
            }
            let (mut r, mut w) = s.into_split();
            round_trip(&mut r, &mut w, &before, Duration::from_secs(1)).await?;

            // An hour without a byte either way; nothing may arrive meanwhile, not even a close.
            let mut got = Vec::new();
            let end = read_until(&mut r, &mut got, None, Instant::now() + idle).await;
            if end != Some(End::TimedOut) || !got.is_empty() {
                return Err(format!(
                    "the idle tunnel ended with {end:?} and {} bytes",
                    got.len()
                )
                .into());
            }

            round_trip(&mut r, &mut w, &after, Duration::from_secs(1)).await?;
            close_tunnel(r, w).await?;
            let conns = log.borrow().clone();
            let mut tunnel = before.clone();
            tunnel.extend_from_slice(&after);
            if conns.len() != 1 || conns[0].received != tunnel {
                return Err(format!(
                    "the backend should have had one connection carrying {} bytes, saw {} connection(s)",
                    tunnel.len(),
                    conns.len()
                )
                .into());
            }
            no_streams_left_on("proxy", Duration::from_secs(1)).await?;
            Ok(())
        });
        sim.run()
    });
}

#[test]
fn frames_pipelined_with_the_head_arrive_once_and_in_order_and_a_greeting_sent_with_the_101_reaches_the_client(
) {
    run_seeds(test_name!(), |seed| {
        let mut rng = Rng::new(seed);
        let greeting = ws_frame(1, b"hello from the backend", None);
        let backends = [(
            "backend",
            WsAnswer::Upgrade {
                greeting: greeting.clone(),
            },
        )];
        let proxy = WsProxy::new(addrs(&backends));
        let (mut sim, logs) = world(
            seed,
            rng.millis(1, 50),
            Duration::from_secs(30),
            &backends,
            proxy,
        );

        // Frames of random sizes whose payloads are consecutive pieces of stream 1.
        let mut tunnel = Vec::new();
        let mut offset = 0;
        for _ in 0..rng.range(1, 20) {
            let len = rng.range(0, 300) as usize;
            tunnel.extend_from_slice(&frame(&mut rng, 1, offset, len));
            offset += len as u64;
        }
        // The first write carries the head and at least one byte of the frames; the rest follow
        // in up to four writes a few milliseconds apart, before the 101 can have come back.
        let mut all = upgrade_request("/");
        let head_len = all.len();
        all.extend_from_slice(&tunnel);
        let mut cuts = vec![rng.range(head_len as u64 + 1, all.len() as u64) as usize];
        for _ in 0..rng.range(0, 3) {
            cuts.push(rng.range(cuts[0] as u64, all.len() as u64) as usize);
        }
        cuts.sort_unstable();
        cuts.push(all.len());
        let mut writes = Vec::new();
        let mut from = 0;
        for cut in cuts {
            writes.push((all[from..cut].to_vec(), rng.millis(0, 5)));
            from = cut;
        }

        let log = logs[0].clone();
        let expected_tunnel = tunnel.clone();
        sim.client("client", async move {
            let (mut r, mut w) = connect_proxy().await?.into_split();
            for (bytes, pause) in writes {
                w.write_all(&bytes).await?;
                tokio::time::sleep(pause).await;
            }
            let head = read_http_head(&mut r, 16 * 1024).await?;
            check_101(&head.bytes)?;
            // Byte for byte: the greeting written with the 101, then the echo of every frame.
            let mut expected = greeting.clone();
            expected.extend_from_slice(&expected_tunnel);
            let mut got = head.rest;
            let end = read_until(
                &mut r,
                &mut got,
                Some(expected.len()),
                Instant::now() + Duration::from_secs(5),
            )
            .await;
            if end.is_some() || got != expected {
                let same = got
                    .iter()
                    .zip(&expected)
                    .take_while(|(a, b)| a == b)
                    .count();
                return Err(format!(
                    "the client got {} bytes ({end:?}), expected {}: the first {same} agree",
                    got.len(),
                    expected.len()
                )
                .into());
            }
            close_tunnel(r, w).await?;

            let conns = log.borrow().clone();
            if conns.len() != 1 {
                return Err(format!("the backend had {} connections", conns.len()).into());
            }
            if conns[0].received != expected_tunnel {
                let same = conns[0]
                    .received
                    .iter()
                    .zip(&expected_tunnel)
                    .take_while(|(a, b)| a == b)
                    .count();
                return Err(format!(
                    "the backend got {} tunnel bytes, expected {}: the first {same} agree",
                    conns[0].received.len(),
                    expected_tunnel.len()
                )
                .into());
            }
            no_streams_left_on("proxy", Duration::from_secs(1)).await?;
            Ok(())
        });
        sim.run()
    });
}

#[test]
fn backend_that_hangs_on_connect_gets_the_client_a_504_at_the_connect_timeout() {
    run_seeds(test_name!(), |seed| {
        let timeout = Rng::new(seed).millis(100, 1000);
        let backends = [(
            "held",
            WsAnswer::Upgrade {
                greeting: Vec::new(),
            },
        )];
        let proxy = WsProxy::new(addrs(&backends)).connect_timeout_ms(timeout.as_millis() as u64);
        let (mut sim, logs) = world(seed, LINK, Duration::from_secs(30), &backends, proxy);
        sim.client("client", async move {
            let mut s = connect_proxy().await?;
            let sent_at = sim_time();
            let head = tokio::time::timeout(3 * timeout, ws_upgrade(&mut s, b""))
                .await
                .map_err(|_| format!("no answer within {:?}", 3 * timeout))??;
            check_status(&head.bytes, 504)?;
            // The request reaches the proxy one link latency after it was sent, the 504 comes
            // back one link latency after the connect gave up.
            within(
                "the 504, from the request",
                sim_time() - sent_at,
                timeout,
                timeout + 2 * LINK + TICKS,
            )?;
            Ok(())
        });
        // Connects to the backend hang from the start: the proxy must give up on its own clock.
        sim.hold("proxy", "held");
        sim.run()?;
        if !logs[0].borrow().is_empty() {
            return Err("the held backend saw a connection".into());
        }
        Ok(())
    });
}
