//! Backend pools under load (`balance`, weights, passive ejection, active checks), each
//! configured as a user would, from a `[[tcp_proxy]]` or `[[ws_proxy]]` TOML section, with
//! backends named by turmoil host: a backend that crashes is ejected and comes back after its
//! trial; one that a silent partition cuts off from the proxy (alone) is caught by the active
//! check; a WebSocket backend that accepts and never answers is ejected after its upgrade
//! timeouts; and 10 000 connections split by weight as the policy promises.
//!
//! The backends are [`sim::counting_echo_server`]s, which record when they accepted each
//! connection, so the scenarios count what every backend got before, during and after a fault.
//! The clients are many workers on one client host, each opening short echo connections one
//! after another, recording when each started, how long it took and how it ended.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use portcullis::{Config, TcpProxy};
use sim::{
    check_prefix, connect_proxy, counting_echo_server, pattern, read_until, run_seeds, serve_proxy,
    sim_time, test_name, EchoLog, End, Rng, BACKEND_PORT, STARTUP,
};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// Slack for the simulation's granularity: a message is delivered on the receiving host's next
/// tick, and hosts run one after another within a tick.
const TICKS: Duration = Duration::from_millis(3);

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
