//! Backend pools under load (`balance`, weights, passive ejection, active checks), each
//! configured as a user would, from a `[[tcp_proxy]]` or `[[ws_proxy]]` TOML section, with
//! backends named by turmoil host: a backend that crashes is ejected and comes back after its
//! trial; one that a silent partition cuts off from the proxy (alone) is caught by the active
//! check; a WebSocket backend that accepts and never answers is ejected after its upgrade
//! timeouts; and 10 000 connections split by weight as the policy promises.
//!
//! The backends are [`sim::counting_echo_server`]s, which record when they accepted each
//! connection, so the scenarios count what every backend got before, during and after a fault.
//! The TCP clients arrive on their own schedule (an open loop: a stalled connection does not
//! hold the next ones back), each one short echo connection through the proxy, and record when
//! they started, how long they took and how they ended. Every scenario checks that every byte
//! sent came back once and in order, and bounds what it asserts about time by the seed's link
//! latency.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use portcullis::{Config, TcpProxy, WsProxy};
use sim::{
    check_prefix, connect_proxy, counting_echo_server, pattern, read_until, run_seeds, serve_proxy,
    serve_ws_proxy, sim_time, status_code, test_name, ws_backend, ws_frame, ws_upgrade, EchoLog,
    End, Rng, WsAnswer, WsLog, BACKEND_PORT, STARTUP,
};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// Slack for the simulation's granularity: a message is delivered on the receiving host's next
/// tick, and hosts run one after another within a tick.
const TICKS: Duration = Duration::from_millis(3);

/// One simulated millisecond, turmoil's tick.
const MS: Duration = Duration::from_millis(1);

/// How one client connection went.
#[derive(Debug, Clone)]
struct Outcome {
    /// Which connection (the id of its byte stream).
    id: u64,
    /// When (simulation time) the client started connecting.
    start: Duration,
    /// From the start until the whole echo was back and the proxy had closed.
    took: Duration,
    /// `Err` says what went wrong.
    result: Result<(), String>,
}

impl Outcome {
    fn end(&self) -> Duration {
        self.start + self.took
    }
}

type Outcomes = Rc<RefCell<Vec<Outcome>>>;

/// One short connection through the proxy: sends `len` bytes of stream `id` in `pieces`
/// writes `pace` apart, checks they all come back in order, half-closes, and checks the proxy
/// closes behind the echo, all within `limit`.
async fn one_echo(id: u64, load: Load) -> Result<(), String> {
    let deadline = Instant::now() + load.limit;
    let mut s = tokio::time::timeout_at(deadline, connect_proxy())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let (len, piece) = (load.len, load.len.div_ceil(load.pieces));
    let mut got = Vec::new();
    for offset in (0..len).step_by(piece) {
        if offset > 0 {
            tokio::time::sleep(load.pace).await;
        }
        let n = piece.min(len - offset);
        s.write_all(&pattern(id, offset as u64, n))
            .await
            .map_err(|e| format!("write at {offset}: {e}"))?;
    }
    let end = read_until(&mut s, &mut got, Some(len), deadline).await;
    check_prefix(id, &got)?;
    if let Some(end) = end {
        return Err(format!(
            "the echo ended with {end:?} after {} of {len} bytes",
            got.len()
        ));
    }
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    match read_until(&mut s, &mut got, None, deadline).await {
        Some(End::Eof) if got.len() == len => Ok(()),
        end => Err(format!(
            "after the echo: {end:?} with {} bytes, expected Eof",
            got.len()
        )),
    }
}

/// How a client host generates load: new connections arrive on their own schedule (an open
/// loop), whether or not earlier ones are done, as independent clients do; so a backend that
/// stalls connections does not slow the arrivals down and hide itself.
#[derive(Debug, Clone, Copy)]
struct Load {
    /// New connections in each simulated millisecond, drawn in `lo..=hi`.
    per_ms: (u64, u64),
    /// Stop starting connections at this simulation time...
    until: Duration,
    /// ...or after this many, whichever comes first.
    max: u64,
    /// Bytes each connection echoes...
    len: usize,
    /// ...written in this many pieces...
    pieces: usize,
    /// ...this far apart.
    pace: Duration,
    /// How long one connection may take in all.
    limit: Duration,
}

/// The software of the client host: starts connections as `load` says, each on its own task,
/// and records every outcome.
async fn generate(load: Load, seed: u64, outcomes: Outcomes) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let mut tasks = Vec::new();
    let mut next = 0;
    tokio::time::sleep(STARTUP).await;
    while sim_time() < load.until && next < load.max {
        for _ in 0..rng.range(load.per_ms.0, load.per_ms.1) {
            if next == load.max {
                break;
            }
            let (id, outcomes) = (next, outcomes.clone());
            next += 1;
            tasks.push(tokio::task::spawn_local(async move {
                let start = sim_time();
                let result = one_echo(id, load).await;
                let took = sim_time() - start;
                outcomes.borrow_mut().push(Outcome {
                    id,
                    start,
                    took,
                    result,
                });
            }));
        }
        tokio::time::sleep(MS).await;
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

/// A simulation with a proxy configured by the `[[tcp_proxy]]` section `toml` and one
/// [`counting_echo_server`] per name in `backends`; returns it with each backend's record.
fn world(
    seed: u64,
    toml: &str,
    backends: &[&'static str],
    max_latency: Duration,
    duration: Duration,
) -> (turmoil::Sim<'static>, Vec<EchoLog>) {
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(seed)
        .max_message_latency(max_latency)
        .simulation_duration(duration);
    world_with(builder, toml, backends)
}

/// [`world`] from a builder the caller configured.
fn world_with(
    builder: turmoil::Builder,
    toml: &str,
    backends: &[&'static str],
) -> (turmoil::Sim<'static>, Vec<EchoLog>) {
    let section = Config::parse(toml, "balance.toml")
        .unwrap_or_else(|e| panic!("{e}"))
        .tcp_proxy
        .remove(0);
    let mut sim = builder.build();
    let mut logs = Vec::new();
    for &b in backends {
        let log = EchoLog::default();
        logs.push(log.clone());
        sim.host(b, move || counting_echo_server(BACKEND_PORT, log.clone()));
    }
    sim.host("proxy", move || {
        serve_proxy(TcpProxy::from_section(section.clone()))
    });
    (sim, logs)
}

/// The connections each backend accepted in `from..to`, health probes left out.
fn counts(logs: &[EchoLog], from: Duration, to: Duration) -> Vec<usize> {
    logs.iter()
        .map(|l| l.borrow().clients_between(from, to))
        .collect()
}

/// Checks `counts` are shared as `weights` are, each share within `tolerance` (a fraction of
/// the total) of its weight's.
fn shares_within(
    what: &str,
    counts: &[usize],
    weights: &[u32],
    tolerance: f64,
) -> Result<(), String> {
    let total: usize = counts.iter().sum();
    let weight_total: u32 = weights.iter().sum();
    if total == 0 {
        return Err(format!("{what}: no connections at all"));
    }
    for (i, (&n, &w)) in counts.iter().zip(weights).enumerate() {
        let share = n as f64 / total as f64;
        let want = f64::from(w) / f64::from(weight_total);
        if (share - want).abs() > tolerance {
            return Err(format!(
                "{what}: backend {} got {n} of {total} ({:.2}%), its weight says {:.2}% \
                 (±{:.1}%); all: {counts:?}",
                i + 1,
                share * 100.0,
                want * 100.0,
                tolerance * 100.0
            ));
        }
    }
    Ok(())
}

/// Steps `sim` until its clients finish, calling `at(sim, now)` before every step so the test
/// can inject faults at chosen simulation times.
fn run_with(
    sim: &mut turmoil::Sim<'_>,
    mut at: impl FnMut(&mut turmoil::Sim<'_>, Duration),
) -> turmoil::Result {
    loop {
        let now = sim.elapsed();
        at(sim, now);
        if sim.step()? {
            return Ok(());
        }
    }
}

/// Passive ejection settings of the crash scenarios.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(100);
const FAIL_TIMEOUT: Duration = Duration::from_millis(1000);
const MAX_FAILS: usize = 3;

/// Three equal backends, round robin, ejected after [`MAX_FAILS`] connect failures in a row for
/// [`FAIL_TIMEOUT`] (doubling while it fails its trials).
fn crash_section() -> String {
    format!(
        r#"
        [[tcp_proxy]]
        listen = "0.0.0.0:7000"
        backends = ["b1:9000", "b2:9000", "b3:9000"]
        balance = "round_robin"
        connect_timeout_ms = {}
        max_fails = {MAX_FAILS}
        fail_timeout_ms = {}
        "#,
        CONNECT_TIMEOUT.as_millis(),
        FAIL_TIMEOUT.as_millis()
    )
}

/// What the crash scenarios saw; the times are simulation times.
struct CrashRun {
    outcomes: Vec<Outcome>,
    logs: Vec<EchoLog>,
    crashed_at: Duration,
    /// Connections open on `b2` when it crashed.
    open_at_crash: usize,
    end: Duration,
}

/// Runs steady load over `b1`, `b2`, `b3`, crashes `b2` at a random moment about a second in,
/// and restarts its software `down_for` later; the load goes on for `load_after` after the
/// crash.
fn crash_under_load(
    seed: u64,
    down_for: Duration,
    load_after: Duration,
) -> Result<CrashRun, String> {
    let mut rng = Rng::new(seed);
    let max_latency = rng.millis(1, 3);
    let crash_at = Duration::from_millis(1000) + rng.millis(0, 100);
    let end = crash_at + load_after;
    let (mut sim, logs) = world(
        seed,
        &crash_section(),
        &["b1", "b2", "b3"],
        max_latency,
        end + Duration::from_secs(10),
    );
    let outcomes = Outcomes::default();
    let load = Load {
        per_ms: (0, 2),
        until: end,
        max: u64::MAX,
        len: 1024,
        pieces: 4,
        pace: 5 * MS,
        limit: Duration::from_secs(2),
    };
    let client_outcomes = outcomes.clone();
    let client_seed = rng.next_u64();
    sim.client("clients", generate(load, client_seed, client_outcomes));

    let (mut crashed_at, mut open_at_crash, mut bounced) = (None, 0, false);
    run_with(&mut sim, |sim, now| {
        if crashed_at.is_none() && now >= crash_at {
            open_at_crash = logs[1].borrow().open;
            sim.crash("b2");
            crashed_at = Some(now);
        }
        if let Some(c) = crashed_at {
            if !bounced && now >= c + down_for {
                sim.bounce("b2");
                bounced = true;
            }
        }
    })
    .map_err(|e| e.to_string())?;
    let outcomes = outcomes.borrow().clone();
    Ok(CrashRun {
        outcomes,
        logs,
        crashed_at: crashed_at.expect("the crash happened"),
        open_at_crash,
        end,
    })
}

impl CrashRun {
    /// Only connections open when `b2` crashed may fail, at most as many as `b2` had open; every
    /// connection started after the crash succeeds.
    fn check_failures(&self) -> Result<usize, String> {
        let c = self.crashed_at;
        let failed: Vec<&Outcome> = self.outcomes.iter().filter(|o| o.result.is_err()).collect();
        // A connection relayed to b2 learns of the crash at once (turmoil drops a crashed
        // host's sockets, so the proxy gets a FIN and passes it on).
        let promptly = 20 * MS;
        if let Some(o) = failed
            .iter()
            .find(|o| o.start >= c || o.end() < c || o.end() > c + promptly)
        {
            return Err(format!(
                "connection {} (started at {:?}, took {:?}) failed, though it was not open to \
                 the backend that crashed at {c:?}, or not only then: {:?}",
                o.id, o.start, o.took, o.result
            ));
        }
        if failed.len() > self.open_at_crash {
            return Err(format!(
                "{} connections failed, but the crashed backend had only {} open",
                failed.len(),
                self.open_at_crash
            ));
        }
        Ok(failed.len())
    }

    /// The connections that waited for a connect timeout (sent to `b2` while it was down, then
    /// failed over), by start time.
    fn slow_starts(&self) -> Vec<Duration> {
        let mut slow: Vec<Duration> = self
            .outcomes
            .iter()
            .filter(|o| o.result.is_ok() && o.took >= CONNECT_TIMEOUT)
            .map(|o| o.start)
            .collect();
        slow.sort();
        slow
    }
}

#[test]
fn crashed_backend_is_ejected_after_max_fails_and_regains_traffic_after_its_trial() {
    run_seeds(test_name!(), |seed| {
        let down_for = Duration::from_millis(400);
        let run = crash_under_load(seed, down_for, Duration::from_millis(2500))?;
        let c = run.crashed_at;
        let failed = run.check_failures()?;

        // Connections sent to b2 after the crash wait out the connect timeout, then fail over;
        // MAX_FAILS of those in a row eject it. The last of them starts, at the latest, when the
        // first MAX_FAILS time out.
        let slow = run.slow_starts();
        let last_slow = *slow
            .last()
            .ok_or("no connection was ever sent to the crashed b2")?;
        if slow.len() < MAX_FAILS || slow[0] + TICKS < c {
            return Err(format!(
                "slow connections (sent to b2) started at {slow:?}; crash at {c:?}"
            )
            .into());
        }
        let ejected_by = c + CONNECT_TIMEOUT + 4 * TICKS;
        if last_slow > ejected_by {
            return Err(format!(
                "a connection started {:?} after the crash still waited for b2: not ejected \
                 after {MAX_FAILS} failures",
                last_slow - c
            )
            .into());
        }

        // b2 is back at c + down_for, but ejected until its fail timeout is over: the first
        // client connection it gets is the trial, a fail timeout after the ejection.
        let b2 = run.logs[1].borrow();
        let trial = b2
            .first_client_after(c)
            .ok_or("b2 never got a connection after it came back")?;
        let (lo, hi) = (
            c + CONNECT_TIMEOUT + FAIL_TIMEOUT - TICKS,
            ejected_by + FAIL_TIMEOUT + 30 * MS,
        );
        if trial < lo || trial > hi {
            return Err(format!(
                "b2's trial came {:?} after the crash, expected {:?}..={:?}",
                trial - c,
                lo - c,
                hi - c
            )
            .into());
        }
        drop(b2);

        // Every connection from the ejection until the trial went to b1 or b3 at once.
        let fast_limit = 50 * MS;
        if let Some(o) = run
            .outcomes
            .iter()
            .find(|o| o.start > ejected_by && o.took > fast_limit)
        {
            return Err(format!(
                "connection {} started {:?} after the crash took {:?}",
                o.id,
                o.start - c,
                o.took
            )
            .into());
        }

        // Round robin, equal weights: thirds before, halves of b1 and b3 while b2 is out,
        // thirds again after the trial.
        let before = counts(&run.logs, Duration::ZERO, c - 20 * MS);
        let outage = counts(&run.logs, ejected_by + CONNECT_TIMEOUT + 20 * MS, trial);
        let after = counts(&run.logs, trial + 20 * MS, run.end);
        shares_within("before the crash", &before, &[1, 1, 1], 0.02)?;
        shares_within("during the ejection", &outage, &[1, 0, 1], 0.02)?;
        shares_within("after the trial", &after, &[1, 1, 1], 0.02)?;
        eprintln!(
            "seed {seed}: {} connections, {failed} failed (b2 had {} open at the crash); \
             {} waited for b2, the last starting {:?} after the crash; trial {:?} after the \
             crash; per backend before {before:?}, during {outage:?}, after {after:?}",
            run.outcomes.len(),
            run.open_at_crash,
            slow.len(),
            last_slow - c,
            trial - c
        );
        Ok(())
    });
}

#[test]
fn backend_still_down_at_its_trial_is_ejected_again_for_twice_as_long() {
    run_seeds(test_name!(), |seed| {
        // b2 stays down through its first trial (at about c + 1.1 s) and comes back at
        // c + 1.5 s; the failed trial ejects it for 2 × FAIL_TIMEOUT.
        let down_for = Duration::from_millis(1500);
        let run = crash_under_load(seed, down_for, Duration::from_millis(3600))?;
        let c = run.crashed_at;
        run.check_failures()?;
        let slow = run.slow_starts();
        let ejected_by = c + CONNECT_TIMEOUT + 4 * TICKS;
        let first_trial = c + CONNECT_TIMEOUT + FAIL_TIMEOUT;
        let (early, late): (Vec<Duration>, Vec<Duration>) =
            slow.iter().partition(|&&s| s <= ejected_by);
        // After the first ejection, exactly one connection waits for b2: the failed trial.
        let trial = match late[..] {
            [t] if t + TICKS >= first_trial && t <= ejected_by + FAIL_TIMEOUT + 30 * MS => t,
            _ => {
                return Err(format!(
                    "expected one trial connection at about {:?} after the crash; connections \
                     that waited for b2 started at {:?} after it",
                    first_trial - c,
                    slow.iter().map(|&s| s - c).collect::<Vec<_>>()
                )
                .into())
            }
        };
        if early.len() < MAX_FAILS {
            return Err(format!(
                "only {} connections were sent to b2 before its ejection",
                early.len()
            )
            .into());
        }
        // The trial fails at its connect timeout; the second ejection lasts twice as long.
        let b2 = run.logs[1].borrow();
        let back = b2
            .first_client_after(c)
            .ok_or("b2 never got a connection after it came back")?;
        let lo = trial + CONNECT_TIMEOUT + 2 * FAIL_TIMEOUT - TICKS;
        let hi = lo + 30 * MS;
        if back < lo || back > hi {
            return Err(format!(
                "b2 got its next connection {:?} after the crash, expected {:?}..={:?}",
                back - c,
                lo - c,
                hi - c
            )
            .into());
        }
        eprintln!(
            "seed {seed}: first trial {:?} after the crash (failed), second {:?} after it",
            trial - c,
            back - c
        );
        Ok(())
    });
}

/// The active check of the partition scenario: a TCP connect every [`INTERVAL`], given up
/// after [`PROBE_TIMEOUT`].
const INTERVAL: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_millis(50);
const UNHEALTHY: u32 = 3;
const HEALTHY: u32 = 2;

/// A connect timeout long enough that a client sent to a cut-off backend shows: it waits a
/// whole second before failing over.
const LONG_CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

#[test]
fn backend_cut_off_from_the_proxy_alone_is_caught_by_the_active_check_and_back_once_the_link_heals()
{
    run_seeds(test_name!(), |seed| {
        let mut rng = Rng::new(seed);
        let max_latency = rng.millis(1, 3);
        let hold_at = Duration::from_millis(1000) + rng.millis(0, 100);
        let release_at = hold_at + Duration::from_millis(1500);
        let end = release_at + Duration::from_millis(1000);
        // Passive ejection is out of the way (max_fails far above what the scenario reaches),
        // so only the active check can take b2 out.
        let toml = format!(
            r#"
            [[tcp_proxy]]
            listen = "0.0.0.0:7000"
            backends = ["b1:9000", "b2:9000", "b3:9000"]
            connect_timeout_ms = {}
            max_fails = 1000
            [tcp_proxy.health_check]
            kind = "tcp"
            interval_ms = {}
            timeout_ms = {}
            unhealthy_threshold = {UNHEALTHY}
            healthy_threshold = {HEALTHY}
            "#,
            LONG_CONNECT_TIMEOUT.as_millis(),
            INTERVAL.as_millis(),
            PROBE_TIMEOUT.as_millis(),
        );
        let mut builder = turmoil::Builder::new();
        builder
            .rng_seed(seed)
            .max_message_latency(max_latency)
            .simulation_duration(end + Duration::from_secs(10))
            // The release delivers every SYN held for b2 at once, a hundred or more (the
            // proxy gave up on them long ago, so b2 skips them); turmoil panics when more
            // than `tcp_capacity` wait on one listener.
            .tcp_capacity(1024);
        let (mut sim, logs) = world_with(builder, &toml, &["b1", "b2", "b3"]);
        let outcomes = Outcomes::default();
        let load = Load {
            per_ms: (0, 2),
            until: end,
            max: u64::MAX,
            len: 1024,
            pieces: 4,
            pace: 5 * MS,
            // Held bytes of connections relayed to b2 when the link was cut arrive at the
            // release, 1.5 s later.
            limit: Duration::from_secs(3),
        };
        sim.client("clients", generate(load, rng.next_u64(), outcomes.clone()));
        // While the link to the proxy is cut, b2 still answers anyone else.
        sim.client("elsewhere", async move {
            tokio::time::sleep(hold_at + Duration::from_millis(300)).await;
            let mut s = turmoil::net::TcpStream::connect(("b2", BACKEND_PORT)).await?;
            s.write_all(&pattern(u64::MAX, 0, 100)).await?;
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_millis(100);
            match read_until(&mut s, &mut got, Some(100), deadline).await {
                None => Ok(check_prefix(u64::MAX, &got)?),
                Some(end) => Err(format!("b2 did not echo to another host: {end:?}").into()),
            }
        });

        // `hold` delays every message between the two, both ways, so a connect hangs (where a
        // `partition` would refuse it at once); `release` delivers what was held.
        let (mut held, mut released) = (false, false);
        run_with(&mut sim, |sim, now| {
            if !held && now >= hold_at {
                sim.hold("proxy", "b2");
                held = true;
            }
            if !released && now >= release_at {
                sim.release("proxy", "b2");
                released = true;
            }
        })?;

        let outcomes = outcomes.borrow();
        if let Some(o) = outcomes.iter().find(|o| o.result.is_err()) {
            return Err(format!(
                "connection {} (started at {:?}) failed: {:?}",
                o.id, o.start, o.result
            )
            .into());
        }
        // A connection sent to b2 while the check still thought it up waits out the connect
        // timeout, then fails over. The check takes b2 out at its UNHEALTHY-th failed probe:
        // the first probe after the hold starts within an interval (plus the round trip of
        // the probe before it), and each failed one takes its timeout plus an interval.
        let probe_round_trip = 2 * max_latency + TICKS;
        let detect_min = PROBE_TIMEOUT + (UNHEALTHY - 1) * (PROBE_TIMEOUT + INTERVAL);
        let detect_max = detect_min + INTERVAL + probe_round_trip;
        let slow: Vec<Duration> = outcomes
            .iter()
            .filter(|o| o.took >= LONG_CONNECT_TIMEOUT)
            .map(|o| o.start)
            .collect();
        let last_slow = slow
            .iter()
            .max()
            .copied()
            .ok_or("no connection was sent to b2 after the hold")?;
        let detected = last_slow.saturating_sub(hold_at);
        if last_slow < hold_at || detected > detect_max || detected + 50 * MS < detect_min {
            return Err(format!(
                "the last connection sent to the cut-off b2 started {detected:?} after the \
                 hold; the check should take it out {detect_min:?}..={detect_max:?} after"
            )
            .into());
        }
        // From then on no connection is even tried on b2: all are quick, until the release.
        let quick = 50 * MS;
        if let Some(o) = outcomes
            .iter()
            .find(|o| o.start > hold_at + detect_max && o.took > quick)
        {
            return Err(format!(
                "connection {} started {:?} after the hold took {:?}",
                o.id,
                o.start - hold_at,
                o.took
            )
            .into());
        }
        // After the release the check needs HEALTHY passing probes: b2's first client comes
        // no sooner than HEALTHY - 1 intervals, and no later than one more probe timeout and
        // interval (a probe hanging at the release).
        let b2 = logs[1].borrow();
        // (A SYN already delivered when the link was cut may still be accepted in that tick.)
        let during = b2.clients_between(hold_at + TICKS, release_at);
        if during != 1 {
            return Err(format!(
                "b2 got {during} connections during the hold, expected only the one from \
                 elsewhere"
            )
            .into());
        }
        let back = b2
            .first_client_after(release_at)
            .ok_or("b2 got no client connection after the release")?;
        drop(b2);
        let back_min = release_at + (HEALTHY - 1) * INTERVAL - TICKS;
        let back_max = release_at + PROBE_TIMEOUT + HEALTHY * INTERVAL + probe_round_trip;
        if back < back_min || back > back_max {
            return Err(format!(
                "b2 took a client again {:?} after the release, expected {:?}..={:?}",
                back.saturating_sub(release_at),
                back_min - release_at,
                back_max - release_at
            )
            .into());
        }
        let before = counts(&logs, Duration::ZERO, hold_at - 20 * MS);
        // (Until the connections that waited for b2 fail over to b3, a connect timeout after
        // the hold.)
        let out = counts(
            &logs,
            hold_at + detect_max + 20 * MS,
            hold_at + LONG_CONNECT_TIMEOUT,
        );
        let after = counts(&logs, back + 20 * MS, end);
        shares_within("before the hold", &before, &[1, 1, 1], 0.02)?;
        shares_within("while b2 is down", &out, &[1, 0, 1], 0.02)?;
        shares_within("after b2 is back", &after, &[1, 1, 1], 0.02)?;
        eprintln!(
            "seed {seed}: {} connections, none failed; {} waited for b2, the last starting \
             {detected:?} after the hold; b2 back {:?} after the release; per backend before \
             {before:?}, down {out:?}, back {after:?}",
            outcomes.len(),
            slow.len(),
            back - release_at
        );
        Ok(())
    });
}

/// How long the WebSocket proxy waits for a backend's answer to an upgrade.
const UPGRADE_TIMEOUT: Duration = Duration::from_millis(300);

/// What one WebSocket client saw.
#[derive(Debug, Clone)]
struct WsOutcome {
    start: Duration,
    took: Duration,
    /// The response's status, or what went wrong.
    status: Result<u16, String>,
}

/// One WebSocket client: upgrades through the proxy; on a 101 sends one masked message,
/// checks it comes back through the echoing backend and closes; on a refusal reads it and
/// closes. `took` runs until the response head arrived.
async fn ws_client(i: u64) -> WsOutcome {
    let start = sim_time();
    let status = async {
        let mut s = connect_proxy().await.map_err(|e| format!("connect: {e}"))?;
        let head = ws_upgrade(&mut s, &[])
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
        let status = status_code(&head.bytes).ok_or("no status in the response")?;
        let answered = sim_time();
        if status == 101 {
            let message = ws_frame(2, &pattern(i, 0, 100), Some([1, 2, 3, 4]));
            s.write_all(&message)
                .await
                .map_err(|e| format!("write: {e}"))?;
            let mut got = head.rest;
            let deadline = Instant::now() + Duration::from_secs(1);
            let end = read_until(&mut s, &mut got, Some(message.len()), deadline).await;
            if end.is_some() || got != message {
                return Err(format!("the echo came back as {got:?}, then {end:?}"));
            }
        }
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut rest = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        match read_until(&mut s, &mut rest, None, deadline).await {
            Some(End::Eof) => Ok((status, answered)),
            end => Err(format!("after {status}: {end:?}, expected Eof")),
        }
    }
    .await;
    match status {
        Ok((status, answered)) => WsOutcome {
            start,
            took: answered - start,
            status: Ok(status),
        },
        Err(e) => WsOutcome {
            start,
            took: sim_time() - start,
            status: Err(e),
        },
    }
}

#[test]
fn websocket_backend_that_accepts_and_never_answers_is_failed_over_at_the_upgrade_timeout_until_max_fails_then_passed_over(
) {
    run_seeds(test_name!(), |seed| {
        let mut rng = Rng::new(seed);
        let max_latency = rng.millis(1, 3);
        let gap = rng.millis(10, 40);
        let clients = 40;
        let max_fails = 2;
        let toml = format!(
            r#"
            [[ws_proxy]]
            listen = "0.0.0.0:7000"
            backends = ["hang:9000", "ok:9000"]
            upgrade_timeout_ms = {}
            max_fails = {max_fails}
            fail_timeout_ms = 60000
            "#,
            UPGRADE_TIMEOUT.as_millis()
        );
        let section = Config::parse(&toml, "balance.toml")
            .unwrap_or_else(|e| panic!("{e}"))
            .ws_proxy
            .remove(0);
        let mut sim = turmoil::Builder::new()
            .rng_seed(seed)
            .max_message_latency(max_latency)
            .simulation_duration(Duration::from_secs(60))
            .build();
        let (hang, ok) = (WsLog::default(), WsLog::default());
        for (name, answer, log) in [
            ("hang", WsAnswer::Silence, hang.clone()),
            (
                "ok",
                WsAnswer::Upgrade {
                    greeting: Vec::new(),
                },
                ok.clone(),
            ),
        ] {
            sim.host(name, move || {
                ws_backend(BACKEND_PORT, answer.clone(), log.clone())
            });
        }
        sim.host("proxy", move || {
            serve_ws_proxy(WsProxy::from_section(section.clone()))
        });
        let outcomes = Rc::new(RefCell::new(Vec::new()));
        let seen = outcomes.clone();
        sim.client("clients", async move {
            let mut tasks = Vec::new();
            for i in 0..clients {
                tokio::time::sleep_until(Instant::now() + if i == 0 { STARTUP } else { gap }).await;
                let seen = seen.clone();
                tasks.push(tokio::task::spawn_local(async move {
                    let outcome = ws_client(i).await;
                    seen.borrow_mut().push(outcome);
                }));
            }
            for t in tasks {
                t.await?;
            }
            // Time for the proxy's last closes to reach the backends.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        });
        sim.run()?;

        let mut outcomes = outcomes.borrow().clone();
        outcomes.sort_by_key(|o| o.start);
        let quick = 4 * max_latency + 2 * TICKS;
        // A client sent to `hang` first is failed over to `ok` when the upgrade times out: it
        // gets its 101 one quick upgrade after the timeout.
        let late = UPGRADE_TIMEOUT + quick + 2 * max_latency + TICKS;
        for o in &outcomes {
            match o.status {
                Ok(101) if o.took <= quick => {}
                Ok(101) if o.took >= UPGRADE_TIMEOUT && o.took <= late => {}
                _ => {
                    return Err(format!(
                        "a client started at {:?} got {:?} after {:?}; expected 101 within \
                         {quick:?}, or after failing over at the upgrade timeout",
                        o.start, o.status, o.took
                    )
                    .into())
                }
            }
        }
        // The proxy ejects `hang` at its max_fails-th upgrade timeout; every client that
        // arrives after that goes straight to `ok`.
        let timeouts: Vec<&WsOutcome> = outcomes
            .iter()
            .filter(|o| o.took >= UPGRADE_TIMEOUT)
            .collect();
        let ejected = timeouts
            .get(max_fails - 1)
            // The proxy got that request up to one latency after it started, and gave up on
            // `hang` one upgrade timeout later.
            .map(|o| o.start + max_latency + UPGRADE_TIMEOUT + TICKS)
            .ok_or("fewer upgrade timeouts than max_fails")?;
        if let Some(o) = timeouts.iter().find(|o| o.start >= ejected) {
            return Err(format!(
                "a client that arrived at {:?}, after `hang` was ejected at {ejected:?}, was sent to it",
                o.start
            )
            .into());
        }
        let after = outcomes.iter().filter(|o| o.start > ejected).count();
        if after < 5 {
            return Err(format!("only {after} clients came after the ejection").into());
        }
        // Every slow client was one connection `hang` accepted, read the upgrade on, and saw
        // closed.
        let hang = hang.borrow();
        if hang.len() != timeouts.len() || hang.iter().any(|c| c.head.is_empty()) {
            return Err(format!(
                "`hang` accepted {} connections for {} timeouts",
                hang.len(),
                timeouts.len()
            )
            .into());
        }
        if let Some(c) = hang
            .iter()
            .find(|c| !matches!(c.ended, Some((_, End::Eof))))
        {
            return Err(format!("a connection to `hang` did not end in a FIN: {c:?}").into());
        }
        eprintln!(
            "seed {seed}: clients every {gap:?}: {} failed over after {:?}..{:?}, `hang` ejected at \
             {ejected:?}, then {after} clients got 101 within {:?}",
            timeouts.len(),
            timeouts.iter().map(|o| o.took).min().unwrap_or_default(),
            timeouts.iter().map(|o| o.took).max().unwrap_or_default(),
            outcomes
                .iter()
                .filter(|o| o.start > ejected)
                .map(|o| o.took)
                .max()
                .unwrap_or_default()
        );
        Ok(())
    });
}

/// The connections of the share scenarios.
const SHARE_CONNECTIONS: u64 = 10_000;

/// The weights of the share scenarios.
const WEIGHTS: [u32; 3] = [5, 3, 2];

/// Opens [`SHARE_CONNECTIONS`] short connections through a proxy over three backends weighted
/// [`WEIGHTS`] with `balance`, several arriving every millisecond, and returns how many each
/// backend got.
fn weighted_shares(seed: u64, balance: &str) -> Result<Vec<usize>, String> {
    let toml = format!(
        r#"
        [[tcp_proxy]]
        listen = "0.0.0.0:7000"
        balance = "{balance}"
        backends = [
          {{ address = "b1:9000", weight = {} }},
          {{ address = "b2:9000", weight = {} }},
          {{ address = "b3:9000", weight = {} }},
        ]
        "#,
        WEIGHTS[0], WEIGHTS[1], WEIGHTS[2]
    );
    let (mut sim, logs) = world(
        seed,
        &toml,
        &["b1", "b2", "b3"],
        MS,
        Duration::from_secs(60),
    );
    let outcomes = Outcomes::default();
    // About 8 connections a millisecond, each a few milliseconds long: a few dozen open at
    // once, so least_connections sees real, changing loads.
    let load = Load {
        per_ms: (4, 12),
        until: Duration::MAX,
        max: SHARE_CONNECTIONS,
        len: 64,
        pieces: 1,
        pace: Duration::ZERO,
        limit: Duration::from_secs(1),
    };
    sim.client("clients", generate(load, seed, outcomes.clone()));
    sim.run().map_err(|e| e.to_string())?;
    let outcomes = outcomes.borrow();
    if let Some(o) = outcomes.iter().find(|o| o.result.is_err()) {
        return Err(format!("connection {} failed: {:?}", o.id, o.result));
    }
    let counts = counts(&logs, Duration::ZERO, Duration::MAX);
    let total: usize = counts.iter().sum();
    if outcomes.len() as u64 != SHARE_CONNECTIONS || total as u64 != SHARE_CONNECTIONS {
        return Err(format!(
            "{} connections ended, the backends got {total}; expected {SHARE_CONNECTIONS}",
            outcomes.len()
        ));
    }
    shares_within(balance, &counts, &WEIGHTS, 0.02)?;
    let open = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    eprintln!(
        "seed {seed}: {balance} over weights {WEIGHTS:?}: {counts:?} of {total} (longest \
         connection {open:?}, {:?} simulated)",
        outcomes.iter().map(Outcome::end).max().unwrap_or_default()
    );
    Ok(counts)
}

#[test]
fn round_robin_splits_ten_thousand_connections_exactly_by_weight() {
    run_seeds(test_name!(), |seed| {
        let counts = weighted_shares(seed, "round_robin")?;
        // Smooth weighted round robin gives every backend exactly its share of each 10 picks.
        let total: u32 = WEIGHTS.iter().sum();
        let exact: Vec<usize> = WEIGHTS
            .iter()
            .map(|&w| (SHARE_CONNECTIONS * u64::from(w) / u64::from(total)) as usize)
            .collect();
        if counts != exact {
            return Err(format!("round robin gave {counts:?}, expected exactly {exact:?}").into());
        }
        Ok(())
    });
}

#[test]
fn least_connections_splits_ten_thousand_short_connections_within_two_percent_of_the_weights() {
    run_seeds(test_name!(), |seed| {
        weighted_shares(seed, "least_connections")?;
        Ok(())
    });
}
