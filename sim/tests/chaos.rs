//! Many clients through one proxy to three echo backends while the network and the hosts fail
//! at random: links held and released, partitioned and repaired, made lossy, slowed down;
//! backends and the proxy crashed and restarted.
//!
//! Whatever happens, for every session: every byte that came back came back once and in order
//! (a prefix of what was sent, never more than was sent), and the session ended, one way or
//! another, within a bounded simulated time. Nothing panics. And once the faults are healed, new
//! connections work again.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use portcullis::TcpProxy;
use sim::{check_prefix, connect_proxy, echo_server, pattern, read_until, run_seeds, serve_proxy};
use sim::{sim_time, test_name, End, Rng, BACKEND_PORT};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const BACKENDS: [&str; 3] = ["b0", "b1", "b2"];
const CLIENTS: usize = 6;
/// Sessions a client host runs at the same time; each lane runs 1 to 3 sessions in turn.
const LANES: usize = 2;
/// How long faults are injected for.
const CHAOS: Duration = Duration::from_secs(6);
/// A client gives up connecting after this long (a connect to a crashed or held host hangs).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A session that has not ended this long after it started is abandoned by its client:
/// stalls (a dropped segment is never retransmitted) only end this way.
const SESSION_DEADLINE: Duration = Duration::from_secs(8);
/// The proxy's connect timeout.
const PROXY_CONNECT_TIMEOUT_MS: u64 = 200;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Every byte came back, then end of file.
    Complete,
    /// The connection ended or stalled before every byte came back.
    Cut(String),
    /// The client could not connect to the proxy.
    NoConnect(String),
}

/// One session, as its client saw it.
#[derive(Debug)]
struct Record {
    stream: u64,
    started: Duration,
    ended: Duration,
    sent: usize,
    received: usize,
    outcome: Outcome,
    /// `check_prefix` of what came back.
    intact: Result<(), String>,
}

/// Sends `len` bytes of `stream` through the proxy in paced chunks, half-closes, and reads the
/// echo until end of file, an error, or [`SESSION_DEADLINE`].
async fn session(stream: u64, len: usize, mut rng: Rng) -> Record {
    let started = sim_time();
    let deadline = Instant::now() + SESSION_DEADLINE;
    let mut record = Record {
        stream,
        started,
        ended: started,
        sent: 0,
        received: 0,
        outcome: Outcome::Complete,
        intact: Ok(()),
    };
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, connect_proxy()).await;
    let s = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            record.outcome = Outcome::NoConnect(format!("{:?}", e.kind()));
            record.ended = sim_time();
            return record;
        }
        Err(_) => {
            record.outcome = Outcome::NoConnect("TimedOut".into());
            record.ended = sim_time();
            return record;
        }
    };
    let (mut r, mut w) = s.into_split();
    let sent = Cell::new(0);
    let writer = async {
        while sent.get() < len {
            let n = (rng.range(1, 8000) as usize).min(len - sent.get());
            if w.write_all(&pattern(stream, sent.get() as u64, n))
                .await
                .is_err()
            {
                return;
            }
            sent.set(sent.get() + n);
            if rng.chance(0.7) {
                tokio::time::sleep(rng.millis(0, 30)).await;
            }
        }
        let _ = w.shutdown().await;
    };
    let mut got = Vec::new();
    let end = {
        let reader = read_until(&mut r, &mut got, None, deadline);
        tokio::pin!(writer, reader);
        // The writer may block for good (a lost segment never frees its flow-control credit),
        // so the session ends with the reader, and the writer is dropped with it.
        tokio::select! {
            biased;
            end = &mut reader => end,
            () = &mut writer => reader.await,
        }
    };
    record.ended = sim_time();
    record.sent = sent.get();
    record.received = got.len();
    record.intact = check_prefix(stream, &got);
    record.outcome = match end {
        Some(End::Eof) if got.len() == len => Outcome::Complete,
        Some(End::Eof) => Outcome::Cut("Eof".into()),
        Some(End::Error(kind)) => Outcome::Cut(format!("{kind:?}")),
        Some(End::TimedOut) => Outcome::Cut("TimedOut".into()),
        None => unreachable!("no byte limit"),
    };
    record
}

/// The software of client host `c`: [`LANES`] lanes of sessions, each starting at a random
/// moment of the chaos window.
async fn client(c: usize, seed: u64, records: Rc<RefCell<Vec<Record>>>) -> turmoil::Result {
    let lanes = (0..LANES).map(|lane| {
        let records = records.clone();
        let mut rng = Rng::new(seed ^ (c * LANES + lane) as u64);
        tokio::task::spawn_local(async move {
            tokio::time::sleep(rng.millis(0, CHAOS.as_millis() as u64 - 1000)).await;
            for k in 0..rng.range(1, 3) {
                let stream = ((c * LANES + lane) * 10) as u64 + k;
                let len = rng.range(1, 100_000) as usize;
                let record = session(stream, len, Rng::new(rng.next_u64())).await;
                records.borrow_mut().push(record);
                tokio::time::sleep(rng.millis(0, 500)).await;
            }
        })
    });
    for lane in lanes.collect::<Vec<_>>() {
        lane.await?;
    }
    Ok(())
}

/// A fault in force, and how to heal it.
#[derive(Debug, Clone)]
enum Fault {
    Held(String, String),
    Partitioned(String, String),
    Lossy(String, String),
    Crashed(String),
}

impl Fault {
    fn target(&self) -> (String, String) {
        match self {
            Fault::Held(a, b) | Fault::Partitioned(a, b) | Fault::Lossy(a, b) => {
                (a.clone(), b.clone())
            }
            Fault::Crashed(h) => (h.clone(), String::new()),
        }
    }

    fn heal(&self, sim: &mut turmoil::Sim<'_>) {
        match self {
            Fault::Held(a, b) => sim.release(a.as_str(), b.as_str()),
            Fault::Partitioned(a, b) => sim.repair(a.as_str(), b.as_str()),
            Fault::Lossy(a, b) => sim.set_link_fail_rate(a.as_str(), b.as_str(), 0.0),
            Fault::Crashed(h) => sim.bounce(h.as_str()),
        }
    }
}

/// Injects one random fault on a target that has none in force, healing it at a random later
/// time (added to `active`).
fn inject(
    sim: &mut turmoil::Sim<'_>,
    rng: &mut Rng,
    links: &[(String, String)],
    active: &mut Vec<(Duration, Fault)>,
) {
    let now = sim.elapsed();
    let (a, b) = rng.pick(links).clone();
    let busy = |t: &(String, String)| active.iter().any(|(_, f)| f.target() == *t);
    let fault = match rng.range(0, 9) {
        0..=2 => Fault::Held(a, b),
        3..=4 => Fault::Partitioned(a, b),
        5 => Fault::Lossy(a, b),
        6 => {
            // Latency is not healed: a slower link is not a fault to recover from.
            let latency = rng.millis(1, 100);
            sim.set_link_max_message_latency(a.as_str(), b.as_str(), latency);
            return;
        }
        7..=8 => Fault::Crashed(rng.pick(&BACKENDS).to_string()),
        _ => Fault::Crashed("proxy".to_string()),
    };
    if busy(&fault.target()) {
        return;
    }
    let lasts = match fault {
        Fault::Crashed(_) => rng.millis(50, 1500),
        _ => rng.millis(10, 800),
    };
    match &fault {
        Fault::Held(a, b) => sim.hold(a.as_str(), b.as_str()),
        Fault::Partitioned(a, b) => sim.partition(a.as_str(), b.as_str()),
        Fault::Lossy(a, b) => {
            let rate = 0.01 * rng.range(1, 20) as f64;
            sim.set_link_fail_rate(a.as_str(), b.as_str(), rate);
        }
        Fault::Crashed(h) => sim.crash(h.as_str()),
    }
    active.push((now + lasts, fault));
}

fn chaos(seed: u64) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(rng.millis(1, 50))
        .enable_random_order()
        .simulation_duration(CHAOS + SESSION_DEADLINE + Duration::from_secs(20))
        .build();
    for b in BACKENDS {
        sim.host(b, || echo_server(BACKEND_PORT));
    }
    let backends = BACKENDS.map(|b| format!("{b}:{BACKEND_PORT}"));
    sim.host("proxy", move || {
        serve_proxy(TcpProxy::new(backends.clone()).connect_timeout_ms(PROXY_CONNECT_TIMEOUT_MS))
    });
    let records: Rc<RefCell<Vec<Record>>> = Rc::default();
    let client_seed = rng.next_u64();
    for c in 0..CLIENTS {
        sim.client(format!("c{c}"), client(c, client_seed, records.clone()));
    }
    let mut links: Vec<(String, String)> = (0..CLIENTS)
        .map(|c| (format!("c{c}"), "proxy".to_string()))
        .collect();
    links.extend(BACKENDS.map(|b| ("proxy".to_string(), b.to_string())));

    // The chaos window: a fault every 20 to 300 ms, each healed after its own while.
    let mut active: Vec<(Duration, Fault)> = Vec::new();
    let mut next_fault = rng.millis(20, 300);
    let mut faults = BTreeMap::<&str, usize>::new();
    let mut finished = false;
    while sim.elapsed() < CHAOS && !finished {
        finished = sim.step()?;
        let now = sim.elapsed();
        active.retain(|(until, fault)| {
            if *until <= now {
                fault.heal(&mut sim);
            }
            *until > now
        });
        if now >= next_fault {
            let before = active.len();
            inject(&mut sim, &mut rng, &links, &mut active);
            if let Some((_, f)) = active.get(before) {
                let name = match f {
                    Fault::Held(..) => "hold",
                    Fault::Partitioned(..) => "partition",
                    Fault::Lossy(..) => "loss",
                    Fault::Crashed(_) => "crash",
                };
                *faults.entry(name).or_default() += 1;
            }
            next_fault = now + rng.millis(20, 300);
        }
    }
    for (_, fault) in active.drain(..) {
        fault.heal(&mut sim);
    }
    if !finished {
        sim.run()?;
    }

    // Every session: intact bytes, never more than sent, ended within its deadline.
    let records = std::mem::take(&mut *records.borrow_mut());
    let mut outcomes = BTreeMap::<Outcome, usize>::new();
    for r in &records {
        r.intact.clone()?;
        if r.received > r.sent {
            return Err(format!(
                "stream {}: {} bytes back, {} sent",
                r.stream, r.received, r.sent
            )
            .into());
        }
        let took = r.ended - r.started;
        let bound = SESSION_DEADLINE + Duration::from_millis(10);
        if took > bound {
            return Err(format!("stream {} took {took:?}, longer than {bound:?}", r.stream).into());
        }
        *outcomes.entry(r.outcome.clone()).or_default() += 1;
    }
    eprintln!(
        "seed {seed}: {} sessions, faults {faults:?}, outcomes {outcomes:?}",
        records.len()
    );
    if !outcomes.contains_key(&Outcome::Complete) {
        return Err(format!("no session completed at all: {outcomes:?}").into());
    }

    // Healed: new connections work, each backend in turn.
    let probe = Rc::new(RefCell::new(Vec::new()));
    let probe_records = probe.clone();
    sim.client("probe", async move {
        for k in 0..BACKENDS.len() as u64 {
            let record = session(1000 + k, 20_000, Rng::new(k)).await;
            probe_records.borrow_mut().push(record);
        }
        Ok(())
    });
    sim.run()?;
    for r in probe.borrow().iter() {
        if r.outcome != Outcome::Complete || r.intact.is_err() {
            return Err(format!("after the faults were healed: {r:?}").into());
        }
    }
    Ok(())
}

#[test]
fn many_clients_under_random_faults_get_every_byte_once_in_order_and_all_end_in_bounded_time() {
    run_seeds(test_name!(), chaos);
}
