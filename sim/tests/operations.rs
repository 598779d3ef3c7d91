//! Operations: what an operator relies on when the proxy is under load or short of resources.
//!
//! - A graceful drain with 1 000 tunnels that end at random times: `serve_with` returns as
//!   soon as the last tunnel has ended when that is before the drain timeout, and at the drain
//!   timeout otherwise; no new connection is accepted once shutdown begins; every byte of a
//!   tunnel that ends before the deadline arrives.
//! - `idle_timeout_ms` closes a silent tunnel at the timeout (the watchdog checks a quarter of
//!   the timeout at a time, so between 1 and 1.25 times the timeout after its last byte), and
//!   never a tunnel that keeps moving bytes; `max_connection_age_ms` closes a busy tunnel at its
//!   age, which is the configured age less up to 10% of jitter drawn from the client's port.
//! - Accept errors that mean the process is out of descriptors (`EMFILE`) make the accept loop
//!   back off instead of spinning; it keeps trying, and serves the connection that waited in
//!   the backlog once descriptors are back.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use portcullis::{Config, TcpProxy};
use sim::{check_prefix, connect_proxy, counting_echo_server, echo_server, no_streams_left_on};
use sim::{pattern, read_until, run_seeds, serve_proxy, sim_time, test_name, wait_for};
use sim::{AcceptFaults, EchoLog, End, Rng, SimListener, SimNet, BACKEND_PORT, PROXY_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// One simulated millisecond: the tick, the granularity of every time measured here.
const TICK: Duration = Duration::from_millis(1);

/// How often the drain checks whether the last connection has ended (`DRAIN_POLL` in
/// `src/server.rs`).
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// The longest pause the accept loop takes between attempts while accepts fail
/// (`ACCEPT_BACKOFF_MAX` in `src/server.rs`).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A `[[tcp_proxy]]` in front of `backend:9000`, with `extra` lines added to its section.
fn tcp_section(extra: &str) -> portcullis::config::TcpSection {
    let toml = format!(
        "[[tcp_proxy]]\nlisten = \"0.0.0.0:{PROXY_PORT}\"\n\
         backends = [\"backend:{BACKEND_PORT}\"]\nconnect_timeout_ms = 500\n{extra}\n"
    );
    Config::parse(&toml, "operations.toml")
        .unwrap_or_else(|e| panic!("{e}"))
        .tcp_proxy
        .remove(0)
}

/// `len` bytes of `stream` from `offset`, written to `s`, with the error named.
async fn send(
    s: &mut (impl tokio::io::AsyncWrite + Unpin),
    stream: u64,
    offset: usize,
    len: usize,
) -> Result<(), String> {
    s.write_all(&pattern(stream, offset as u64, len))
        .await
        .map_err(|e| format!("stream {stream}: write at byte {offset}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Drain with 1 000 tunnels
// ---------------------------------------------------------------------------------------------

/// The tunnels of a drain scenario.
const TUNNELS: usize = 1000;

/// The proxy's drain timeout.
const DRAIN: Duration = Duration::from_millis(1000);

/// When the test shuts the proxy down: every tunnel is established by then (they connect over
/// the first [`CONNECT_SPREAD`]).
const SHUTDOWN_AT: Duration = Duration::from_millis(600);

/// Tunnels connect at random over this long.
const CONNECT_SPREAD: Duration = Duration::from_millis(300);

/// The largest one-way latency of the drain scenarios.
const DRAIN_LATENCY: Duration = Duration::from_millis(5);

/// Flags between the proxy host and the clients.
#[derive(Default)]
struct DrainFlags {
    /// Set by the test's driver: shut the proxy down now.
    shutdown: Cell<bool>,
    /// When the proxy's shutdown future completed (simulation time).
    shutdown_seen: Cell<Option<Duration>>,
    /// When `serve_with` returned.
    returned: Cell<Option<Duration>>,
    /// Tunnels that have connected and echoed their first bytes.
    established: Cell<usize>,
}

/// How one drain tunnel ended.
#[derive(Debug, Clone)]
struct TunnelEnd {
    /// When (simulation time) it was planned to end: its client sends its last bytes and
    /// half-closes then, unless the proxy closed it first.
    planned: Duration,
    /// When it saw end of file or an error, and which.
    ended: Duration,
    end: End,
    /// Bytes sent and bytes echoed back.
    sent: usize,
    got: usize,
}

/// One drain tunnel: connects at `connect_at`, echoes a first chunk, waits (reading) until
/// `planned`, then sends a last chunk, half-closes and reads to end of file. Returns how it
/// ended; an error for anything the proxy must never do (lose, duplicate or reorder bytes,
/// refuse or stall an established tunnel).
async fn drain_tunnel(
    id: u64,
    connect_at: Duration,
    planned: Duration,
    sizes: (usize, usize),
    flags: Rc<DrainFlags>,
) -> Result<TunnelEnd, String> {
    tokio::time::sleep(connect_at.saturating_sub(sim_time())).await;
    let mut s = connect_proxy()
        .await
        .map_err(|e| format!("tunnel {id}: connect: {e}"))?;
    let mut got = Vec::new();
    send(&mut s, id, 0, sizes.0).await?;
    let first = read_until(&mut s, &mut got, Some(sizes.0), far(Duration::from_secs(2))).await;
    check_prefix(id, &got)?;
    if let Some(end) = first {
        return Err(format!("tunnel {id}: first echo ended with {end:?}"));
    }
    flags.established.set(flags.established.get() + 1);
    let mut sent = sizes.0;
    // Idle until the planned end; the proxy may close it first only at the drain deadline,
    // which the test checks.
    let deadline = Instant::now() + planned.saturating_sub(sim_time());
    let early = read_until(&mut s, &mut got, None, deadline).await;
    let end = match early {
        Some(End::TimedOut) => {
            send(&mut s, id, sent, sizes.1).await?;
            sent += sizes.1;
            s.shutdown()
                .await
                .map_err(|e| format!("tunnel {id}: shutdown: {e}"))?;
            let end = read_until(&mut s, &mut got, None, far(DRAIN * 4)).await;
            end.unwrap_or(End::TimedOut)
        }
        Some(end) => end,
        None => unreachable!("read_until without a byte count ends only with the stream"),
    };
    check_prefix(id, &got)?;
    Ok(TunnelEnd {
        planned,
        ended: sim_time(),
        end,
        sent,
        got: got.len(),
    })
}

/// An instant `d` from now on the caller's clock.
fn far(d: Duration) -> Instant {
    Instant::now() + d
}

/// Runs the drain scenario for `seed`: [`TUNNELS`] tunnels, shutdown at [`SHUTDOWN_AT`], each
/// tunnel planned to end at the time `plan` draws (simulation time). Checks
/// everything that holds in both cases and returns the tunnels' ends with the proxy's
/// `(shutdown_seen, returned)` times.
fn drain_scenario(
    seed: u64,
    mut plan: impl FnMut(&mut Rng, usize) -> Duration,
) -> Result<(Vec<TunnelEnd>, Duration, Duration), String> {
    let flags = Rc::new(DrainFlags::default());
    let backend = EchoLog::default();
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .min_message_latency(TICK)
        .max_message_latency(DRAIN_LATENCY)
        .tcp_capacity(4 * TUNNELS)
        .simulation_duration(Duration::from_secs(20))
        .build();
    let log = backend.clone();
    sim.host("backend", move || {
        counting_echo_server(BACKEND_PORT, log.clone())
    });
    let proxy_flags = flags.clone();
    sim.host("proxy", move || {
        let flags = proxy_flags.clone();
        async move {
            let net = SimNet;
            let listener = portcullis::Net::bind(&net, &format!("0.0.0.0:{PROXY_PORT}")).await?;
            let shutdown = async {
                wait_for(|| flags.shutdown.get(), Duration::from_secs(3600)).await;
                flags.shutdown_seen.set(Some(sim_time()));
            };
            TcpProxy::new([format!("backend:{BACKEND_PORT}")])
                .drain_timeout_ms(DRAIN.as_millis() as u64)
                .serve_with(net, listener, shutdown)
                .await?;
            flags.returned.set(Some(sim_time()));
            std::future::pending().await
        }
    });

    let ends: Rc<RefCell<Vec<TunnelEnd>>> = Rc::default();
    let client_flags = flags.clone();
    let client_ends = ends.clone();
    let mut rng = Rng::new(seed);
    let tunnels: Vec<_> = (0..TUNNELS)
        .map(|i| {
            let connect_at = sim::STARTUP + rng.millis(0, CONNECT_SPREAD.as_millis() as u64);
            let planned = plan(&mut rng, i);
            let sizes = (rng.range(1, 3000) as usize, rng.range(1, 3000) as usize);
            (i as u64, connect_at, planned, sizes)
        })
        .collect();
    sim.client("clients", async move {
        let flags = client_flags;
        let mut tasks = Vec::new();
        for (id, connect_at, planned, sizes) in tunnels {
            let (flags, ends) = (flags.clone(), client_ends.clone());
            tasks.push(tokio::task::spawn_local(async move {
                let end = drain_tunnel(id, connect_at, planned, sizes, flags).await?;
                ends.borrow_mut().push(end);
                Ok::<(), String>(())
            }));
        }
        tokio::time::sleep(SHUTDOWN_AT.saturating_sub(sim_time())).await;
        if flags.established.get() != TUNNELS {
            return Err(format!(
                "only {} of {TUNNELS} tunnels were established at the shutdown",
                flags.established.get()
            )
            .into());
        }
        flags.shutdown.set(true);
        // New connections are refused from the moment the proxy sees the shutdown, through
        // the drain.
        for after in [Duration::from_millis(5), DRAIN / 2] {
            tokio::time::sleep((SHUTDOWN_AT + after).saturating_sub(sim_time())).await;
            match connect_proxy().await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                other => {
                    return Err(format!("a connect {after:?} into the drain: {other:?}").into())
                }
            }
        }
        for task in tasks {
            task.await??;
        }
        if !wait_for(|| flags.returned.get().is_some(), 2 * DRAIN).await {
            return Err("serve_with did not return after every tunnel ended".into());
        }
        no_streams_left_on("proxy", Duration::from_secs(1)).await?;
        Ok(())
    });
    sim.run().map_err(|e| e.to_string())?;

    let (seen, returned) = (flags.shutdown_seen.get(), flags.returned.get());
    let (seen, returned) = (seen.ok_or("no shutdown")?, returned.ok_or("no return")?);
    if seen < SHUTDOWN_AT || seen > SHUTDOWN_AT + 2 * TICK {
        return Err(format!(
            "the proxy saw the shutdown at {seen:?}, set at {SHUTDOWN_AT:?}"
        ));
    }
    let backend = backend.borrow();
    let late = backend.conns.iter().filter(|c| c.at >= seen).count();
    if backend.conns.len() != TUNNELS || late > 0 {
        return Err(format!(
            "the backend got {} connections, {late} of them after the shutdown; \
             expected {TUNNELS}, all before",
            backend.conns.len()
        ));
    }
    let ends = ends.borrow().clone();
    assert_eq!(ends.len(), TUNNELS, "every tunnel task returned");
    let deadline = seen + DRAIN;
    for (i, t) in ends.iter().enumerate() {
        // A tunnel planned to end before the deadline ends on its own, with every byte back.
        if t.planned < deadline - 10 * DRAIN_LATENCY
            && (t.end != End::Eof || t.got != t.sent || t.ended > deadline)
        {
            return Err(format!(
                "tunnel #{i} planned to end at {:?}, before the deadline {deadline:?}, \
                 ended with {:?} at {:?} after {} of {} bytes",
                t.planned, t.end, t.ended, t.got, t.sent
            ));
        }
        // One that outlives the deadline is closed at it, as its peer sees it.
        if t.planned > deadline
            && (t.ended < deadline || t.ended > deadline + DRAIN_LATENCY + 2 * TICK)
        {
            return Err(format!(
                "tunnel #{i} planned to end at {:?}, after the deadline {deadline:?}, \
                 ended with {:?} at {:?}",
                t.planned, t.end, t.ended
            ));
        }
    }
    Ok((ends, seen, returned))
}

/// Every tunnel ends within the drain: `serve_with` returns when the last one has ended, well
/// before the deadline.
#[test]
fn drain_of_1000_tunnels_returns_when_the_last_one_ends_before_the_deadline() {
    run_seeds(test_name!(), |seed| {
        let started = std::time::Instant::now();
        // Some end just before the shutdown, most during the drain, none near the deadline.
        let plan = |rng: &mut Rng, _| SHUTDOWN_AT - Duration::from_millis(100) + rng.millis(0, 800);
        let (ends, seen, returned) = drain_scenario(seed, plan)?;
        let last = ends.iter().map(|t| t.ended).max().expect("tunnels");
        // The last relay ended when the proxy closed its client's side, at most one latency
        // before that client saw end of file; the drain notices within one poll.
        let (lo, hi) = (last - DRAIN_LATENCY - TICK, last + DRAIN_POLL + 2 * TICK);
        if returned < lo || returned > hi {
            return Err(format!(
                "serve_with returned at {returned:?}; the last tunnel ended at {last:?}, \
                 so expected {lo:?}..={hi:?}"
            )
            .into());
        }
        if returned >= seen + DRAIN {
            return Err(format!("returned at {returned:?}, not before the deadline").into());
        }
        eprintln!(
            "seed {seed}: shutdown seen at {seen:?}, last tunnel ended at {last:?}, \
             serve_with returned at {returned:?} ({:?} into a {DRAIN:?} drain); wall {:?}",
            returned - seen,
            started.elapsed()
        );
        Ok(())
    });
}

/// About one tunnel in ten outlives the drain: `serve_with` returns at the deadline (within a
/// drain poll), those tunnels are closed then, and every other one has ended with all its
/// bytes.
#[test]
fn drain_of_1000_tunnels_some_outliving_it_returns_at_the_deadline() {
    run_seeds(test_name!(), |seed| {
        let started = std::time::Instant::now();
        let plan = |rng: &mut Rng, i| {
            SHUTDOWN_AT
                + if i == 0 || rng.chance(0.1) {
                    DRAIN + rng.millis(50, 2000)
                } else {
                    rng.millis(0, 800)
                }
        };
        let (ends, seen, returned) = drain_scenario(seed, plan)?;
        let deadline = seen + DRAIN;
        let (lo, hi) = (deadline, deadline + DRAIN_POLL + 2 * TICK);
        if returned < lo || returned > hi {
            return Err(format!(
                "serve_with returned at {returned:?}; the drain deadline was {deadline:?}, \
                 so expected {lo:?}..={hi:?}"
            )
            .into());
        }
        let cut = ends.iter().filter(|t| t.planned > deadline).count();
        eprintln!(
            "seed {seed}: {cut} of {TUNNELS} tunnels outlived the drain; shutdown seen at \
             {seen:?}, serve_with returned at {returned:?} ({:?} into a {DRAIN:?} drain); \
             wall {:?}",
            returned - seen,
            started.elapsed()
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Idle timeout and maximum connection age
// ---------------------------------------------------------------------------------------------

/// The idle timeout of the limit scenarios.
const IDLE: Duration = Duration::from_millis(1000);

/// The maximum connection age of the age scenario.
const AGE: Duration = Duration::from_millis(4000);

/// How a limit-scenario tunnel went, as its client saw it.
#[derive(Debug)]
struct Tunnel {
    /// When the connect completed, and the client's port (the proxy's jitter seed).
    connected: Duration,
    port: u16,
    /// When the last echoed byte arrived.
    last_byte: Option<Duration>,
    /// When and how the stream ended; `TimedOut` if it was still open at the limit.
    ended: Duration,
    end: End,
    /// Bytes written and echoed back.
    sent: usize,
    got: usize,
}

/// A tunnel to the echo backend through the proxy whose client writes `len` bytes of stream
/// `id` at each offset (from the connect) of `writes`, and reads until the stream ends or
/// `limit` after the connect.
async fn paced_tunnel(id: u64, writes: Vec<(Duration, usize)>, limit: Duration) -> Tunnel {
    let s = connect_proxy().await.expect("connect");
    let connected = sim_time();
    let port = s.local_addr().expect("local address").port();
    let (mut r, mut w) = s.into_split();
    let start = Instant::now();
    let writer = tokio::task::spawn_local(async move {
        let mut sent = 0;
        for (at, len) in writes {
            tokio::time::sleep_until(start + at).await;
            if send(&mut w, id, sent, len).await.is_err() {
                break;
            }
            sent += len;
        }
        // Keep the write half open: a FIN would end the tunnel on its own.
        (sent, w)
    });
    let mut got = Vec::new();
    let mut last_byte = None;
    let mut buf = vec![0; 4096];
    let end = loop {
        match tokio::time::timeout_at(start + limit, r.read(&mut buf)).await {
            Err(_) => break End::TimedOut,
            Ok(Ok(0)) => break End::Eof,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                last_byte = Some(sim_time());
            }
            Ok(Err(e)) => break End::Error(e.kind()),
        }
    };
    let ended = sim_time();
    writer.abort();
    let sent = match writer.await {
        Ok((sent, _)) => sent,
        // Aborted mid-schedule: count what was echoed as sent.
        Err(_) => got.len(),
    };
    check_prefix(id, &got).expect("echoed bytes are the stream's, in order");
    Tunnel {
        connected,
        port,
        last_byte,
        ended,
        end,
        sent,
        got: got.len(),
    }
}

/// A write schedule: `len`-byte chunks at random gaps of `gaps` ms, from 0 to `until`.
fn busy(rng: &mut Rng, gaps: (u64, u64), until: Duration) -> Vec<(Duration, usize)> {
    let mut at = Duration::ZERO;
    let mut writes = Vec::new();
    while at < until {
        writes.push((at, rng.range(1, 500) as usize));
        at += rng.millis(gaps.0, gaps.1);
    }
    writes
}

/// A limit-scenario world: an echo backend, a proxy with the `[[tcp_proxy]]` lines `limits`,
/// and one fixed one-way latency for the seed, so the times the client sees are exact.
fn limits_world(seed: u64, limits: &str) -> (turmoil::Sim<'static>, Duration) {
    let latency = Rng::new(seed ^ 0x1A7E).millis(1, 10);
    let section = tcp_section(limits);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .min_message_latency(latency)
        .max_message_latency(latency)
        .simulation_duration(Duration::from_secs(60))
        .build();
    sim.host("backend", || echo_server(BACKEND_PORT));
    sim.host("proxy", move || {
        serve_proxy(TcpProxy::from_section(section.clone()))
    });
    (sim, latency)
}

/// Checks a tunnel the idle timeout closed: every byte sent came back, and it ended between
/// [`IDLE`] and 1.25 × [`IDLE`] after its last byte (the watchdog checks every quarter of the
/// timeout; both ends of the interval are one latency from the proxy, so it cancels out).
fn closed_at_idle_timeout(what: &str, t: &Tunnel) -> Result<Duration, String> {
    let last = t.last_byte.ok_or(format!("{what}: no byte came back"))?;
    let quiet = t.ended - last;
    let (lo, hi) = (IDLE - TICK, IDLE + IDLE / 4 + 2 * TICK);
    if t.end == End::TimedOut || t.got != t.sent || quiet < lo || quiet > hi {
        return Err(format!(
            "{what}: ended with {:?} {quiet:?} after its last byte (at {last:?}), with {} of {} \
             bytes back; expected end of file {lo:?}..={hi:?} after it, all bytes back",
            t.end, t.got, t.sent
        ));
    }
    Ok(quiet)
}

/// A tunnel that goes silent is closed at the idle timeout; one whose bytes keep flowing (gaps
/// up to 0.7 × the timeout) is not, however long it lasts, until it goes silent too.
#[test]
fn idle_timeout_closes_a_silent_tunnel_on_time_and_never_a_busy_one() {
    run_seeds(test_name!(), |seed| {
        let started = std::time::Instant::now();
        let (mut sim, latency) =
            limits_world(seed, &format!("idle_timeout_ms = {}", IDLE.as_millis()));
        let results: Rc<RefCell<Vec<(&str, Tunnel)>>> = Rc::default();
        let mut rng = Rng::new(seed);
        let silent = busy(&mut rng, (1, 50), Duration::from_millis(100));
        let gaps = (
            IDLE.as_millis() as u64 / 10,
            IDLE.as_millis() as u64 * 7 / 10,
        );
        let busy_for = 8 * IDLE;
        let steady = busy(&mut rng, gaps, busy_for);
        for (name, id, writes) in [("silent", 1, silent), ("busy", 2, steady)] {
            let results = results.clone();
            sim.client(name, async move {
                let t = paced_tunnel(id, writes, 20 * IDLE).await;
                results.borrow_mut().push((name, t));
                Ok(())
            });
        }
        sim.run()?;
        let results = results.borrow();
        let mut report = Vec::new();
        for (name, t) in results.iter() {
            let quiet = closed_at_idle_timeout(name, t)?;
            if *name == "busy" && t.ended - t.connected < busy_for {
                return Err(format!(
                    "the busy tunnel was closed {:?} after it connected, while its bytes \
                     still flowed (for {busy_for:?})",
                    t.ended - t.connected
                )
                .into());
            }
            report.push(format!(
                "{name}: open {:?}, closed {quiet:?} after its last byte",
                t.ended - t.connected
            ));
        }
        eprintln!(
            "seed {seed} (latency {latency:?}, idle timeout {IDLE:?}): {}; wall {:?}",
            report.join("; "),
            started.elapsed()
        );
        Ok(())
    });
}

/// `max_connection_age_ms` closes busy tunnels (which the idle timeout leaves alone) at their
/// age: the configured age less a jitter of up to 10% drawn from the client's port, exactly as
/// `Admission::max_age` computes it, measured from when the relay started (one latency after
/// the client's connect, once the backend accepted) to when the client saw the close (one more).
#[test]
fn max_connection_age_closes_busy_tunnels_within_the_jitter_window() {
    run_seeds(test_name!(), |seed| {
        let started = std::time::Instant::now();
        let limits = format!(
            "idle_timeout_ms = {}\nmax_connection_age_ms = {}",
            IDLE.as_millis(),
            AGE.as_millis()
        );
        let (mut sim, latency) = limits_world(seed, &limits);
        let admission = portcullis::limit::Admission::new(
            "tcp",
            tcp_section(&limits).limits,
            None,
            std::time::Instant::now(),
        );
        let results: Rc<RefCell<Vec<Tunnel>>> = Rc::default();
        let mut rng = Rng::new(seed);
        // One client host, so the tunnels have different ports, and so different jitter.
        const CLIENTS: u64 = 16;
        let plans: Vec<_> = (0..CLIENTS)
            .map(|id| (id, rng.millis(0, 500), busy(&mut rng, (20, 300), 2 * AGE)))
            .collect();
        let client_results = results.clone();
        sim.client("clients", async move {
            let tasks: Vec<_> = plans
                .into_iter()
                .map(|(id, delay, writes)| {
                    let results = client_results.clone();
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep(delay).await;
                        let t = paced_tunnel(id, writes, 3 * AGE).await;
                        results.borrow_mut().push(t);
                    })
                })
                .collect();
            for task in tasks {
                task.await?;
            }
            Ok(())
        });
        sim.run()?;
        let mut lived = Vec::new();
        for t in results.borrow().iter() {
            let age = admission.max_age(u64::from(t.port)).expect("an age is set");
            let open = t.ended - t.connected;
            // The relay starts once the backend accepted (one latency after the connect), and
            // the close reaches the client one latency after the proxy closes.
            let expected = age + 2 * latency;
            let in_window = (AGE - AGE / 10..=AGE).contains(&age);
            if t.end == End::TimedOut
                || !in_window
                || open + TICK < expected
                || open > expected + 2 * TICK
            {
                return Err(format!(
                    "a tunnel from port {} was open {open:?} and ended with {:?}; its age is \
                     {age:?} (the window is {:?}..={AGE:?}), so expected it closed after \
                     {expected:?} (age + 2 × latency {latency:?})",
                    t.port,
                    t.end,
                    AGE - AGE / 10
                )
                .into());
            }
            lived.push(open.as_millis());
        }
        if lived.len() != CLIENTS as usize {
            return Err(format!("{} of {CLIENTS} tunnels reported", lived.len()).into());
        }
        lived.sort_unstable();
        eprintln!(
            "seed {seed} (latency {latency:?}, max age {AGE:?}): busy tunnels open for {lived:?} \
             ms; wall {:?}",
            started.elapsed()
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Accept errors
// ---------------------------------------------------------------------------------------------

/// When the accept-error scenario's listener stops failing with `EMFILE`.
const FAIL_FOR: Duration = Duration::from_millis(5000);

/// Accepts fail with `EMFILE` for the first [`FAIL_FOR`]: the accept loop backs off (a bounded
/// number of calls, pauses that grow to at most a second), does not give up, serves the
/// client that connected during the failure once accepts work again (within one pause of the
/// end), and serves a client that comes later at once.
#[test]
fn accept_errors_back_off_without_spinning_and_serving_resumes() {
    run_seeds(test_name!(), |seed| {
        let started = std::time::Instant::now();
        let mut rng = Rng::new(seed);
        let fail_until = FAIL_FOR + rng.millis(0, 1000);
        let faults = AcceptFaults::fail_until(fail_until);
        let mut sim = turmoil::Builder::new()
            .rng_seed(seed)
            .max_message_latency(rng.millis(1, 10))
            .simulation_duration(Duration::from_secs(30))
            .build();
        sim.host("backend", || echo_server(BACKEND_PORT));
        let proxy_faults = faults.clone();
        sim.host("proxy", move || {
            let faults = proxy_faults.clone();
            async move {
                let net = SimNet;
                let listener: SimListener =
                    portcullis::Net::bind(&net, &format!("0.0.0.0:{PROXY_PORT}")).await?;
                TcpProxy::new([format!("backend:{BACKEND_PORT}")])
                    .serve_with(net, listener.with_faults(faults), std::future::pending())
                    .await?;
                Err("serve_with returned".into())
            }
        });
        let served: Rc<RefCell<Vec<(u64, Duration, Duration)>>> = Rc::default();
        let waiting_from = rng.millis(500, FAIL_FOR.as_millis() as u64 - 500);
        for (id, at) in [(1, waiting_from), (2, fail_until + Duration::from_secs(3))] {
            let served = served.clone();
            sim.client(format!("client-{id}"), async move {
                tokio::time::sleep(at).await;
                let mut s = connect_proxy().await?;
                send(&mut s, id, 0, 1000).await?;
                let mut got = Vec::new();
                let end = read_until(&mut s, &mut got, Some(1000), far(Duration::from_secs(10)));
                if let Some(end) = end.await {
                    return Err(format!("client {id}: {end:?} after {} bytes", got.len()).into());
                }
                check_prefix(id, &got)?;
                served.borrow_mut().push((id, at, sim_time()));
                Ok(())
            });
        }
        sim.run()?;

        let calls = faults.calls();
        let failed: Vec<Duration> = calls.iter().filter(|c| c.1).map(|c| c.0).collect();
        let first_ok = calls.iter().find(|c| !c.1).map(|c| c.0);
        // Spinning would be thousands of calls; retrying every 5 ms, a thousand. Backing off
        // from 5 ms to 1 s is about 8 calls in the first 1.3 s and one a second after that.
        let bound = 10 + (fail_until.as_millis() / 1000) as usize;
        if failed.len() < 2 || failed.len() > bound {
            return Err(format!(
                "accept was called {} times in the {fail_until:?} it failed: expected 2..={bound}",
                failed.len()
            )
            .into());
        }
        let gaps: Vec<Duration> = failed.windows(2).map(|w| w[1] - w[0]).collect();
        if gaps.windows(2).any(|g| g[1] < g[0])
            || gaps.iter().any(|&g| g > ACCEPT_BACKOFF_MAX + TICK)
        {
            return Err(format!(
                "pauses between failed accepts should grow, up to {ACCEPT_BACKOFF_MAX:?}: \
                 {gaps:?}"
            )
            .into());
        }
        let first_ok = first_ok.ok_or("accept never succeeded after the failures")?;
        if first_ok < fail_until || first_ok > fail_until + ACCEPT_BACKOFF_MAX + TICK {
            return Err(format!(
                "the first accept after the failures ended at {fail_until:?} was at \
                 {first_ok:?}: expected within {ACCEPT_BACKOFF_MAX:?}"
            )
            .into());
        }
        let served = served.borrow();
        let waited = served
            .iter()
            .find(|s| s.0 == 1)
            .ok_or("client 1 not served")?;
        let later = served
            .iter()
            .find(|s| s.0 == 2)
            .ok_or("client 2 not served")?;
        // Client 1 waited in the backlog; it is served by the first accept that works.
        if waited.2 < fail_until || waited.2 > first_ok + Duration::from_millis(100) {
            return Err(format!(
                "the client that connected during the failures was served at {:?}: expected \
                 after {fail_until:?}, soon after the first working accept at {first_ok:?}",
                waited.2
            )
            .into());
        }
        if later.2 - later.1 > Duration::from_millis(100) {
            return Err(format!(
                "a client after the failures took {:?} to be served",
                later.2 - later.1
            )
            .into());
        }
        eprintln!(
            "seed {seed}: {} accept calls failed over {fail_until:?} (pauses {:?} ms); first \
             working accept at {first_ok:?}; the waiting client served at {:?}; wall {:?}",
            failed.len(),
            gaps.iter().map(|g| g.as_millis()).collect::<Vec<_>>(),
            waited.2,
            started.elapsed()
        );
        Ok(())
    });
}
