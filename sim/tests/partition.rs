//! A network partition in the middle of a relayed connection, on either side of the proxy.
//!
//! turmoil drops every segment sent across a partition and never retransmits, so the tunnel
//! cannot recover: the client must see it end or stall (nothing more arrives, and what did
//! arrive is intact), nothing may panic, and once the partition is repaired new connections
//! through the proxy must work as before.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use portcullis::TcpProxy;
use sim::{check_prefix, connect_proxy, echo_server, pattern, read_until, run_seeds, serve_proxy};
use sim::{test_name, wait_for, End, Rng, BACKEND_PORT};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The flags the client and the test hand each other between steps.
#[derive(Default)]
struct Flags {
    /// Set by the client: the first echo came back, the relay is established.
    established: Cell<bool>,
    /// Set by the test: the link is cut.
    partitioned: Cell<bool>,
    /// Set by the client: it has seen the tunnel end or stall.
    stalled: Cell<bool>,
    /// Set by the test: the link is repaired.
    repaired: Cell<bool>,
}

fn partition_mid_relay(seed: u64) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let link = *rng.pick(&[("client", "proxy"), ("proxy", "backend")]);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(rng.millis(1, 30))
        .simulation_duration(Duration::from_secs(60))
        .build();
    sim.host("backend", || echo_server(BACKEND_PORT));
    sim.host("proxy", || {
        serve_proxy(TcpProxy::new([format!("backend:{BACKEND_PORT}")]).connect_timeout_ms(500))
    });

    let flags = Rc::new(Flags::default());
    let client_flags = flags.clone();
    let (before, during, after) = (
        rng.range(1, 50_000) as usize,
        rng.range(1, 50_000) as usize,
        rng.range(1, 50_000) as usize,
    );
    sim.client("client", async move {
        let flags = client_flags;
        let limit = Duration::from_secs(10);

        // Establish the tunnel: one full echo.
        let mut s = connect_proxy().await?;
        s.write_all(&pattern(1, 0, before)).await?;
        let mut got = Vec::new();
        let end = read_until(&mut s, &mut got, Some(before), Instant::now() + limit).await;
        if end.is_some() {
            return Err(format!("the first echo ended with {end:?}").into());
        }
        flags.established.set(true);

        // Across the partition: the write may well succeed (the bytes are dropped on the way),
        // but nothing more may come back, and the tunnel must visibly end or stall.
        if !wait_for(|| flags.partitioned.get(), limit).await {
            return Err("the test never partitioned the link".into());
        }
        let _ = s.write_all(&pattern(1, before as u64, during)).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        let end = read_until(&mut s, &mut got, Some(before + during), deadline).await;
        check_prefix(1, &got)?;
        if end.is_none() || got.len() != before {
            return Err(format!(
                "{} bytes came back across a partition of {link:?} ({end:?})",
                got.len() - before
            )
            .into());
        }
        drop(s);
        flags.stalled.set(true);

        // After the repair, a new connection carries a whole echo and closes cleanly.
        if !wait_for(|| flags.repaired.get(), limit).await {
            return Err("the test never repaired the link".into());
        }
        let mut s = connect_proxy().await?;
        s.write_all(&pattern(2, 0, after)).await?;
        s.shutdown().await?;
        let mut got = Vec::new();
        let end = read_until(&mut s, &mut got, None, Instant::now() + limit).await;
        check_prefix(2, &got)?;
        if end != Some(End::Eof) || got.len() != after {
            return Err(format!(
                "after the repair, the echo got {} of {after} bytes, then {end:?}",
                got.len()
            )
            .into());
        }
        Ok(())
    });

    while !flags.established.get() {
        sim.step()?;
    }
    for _ in 0..rng.range(0, 30) {
        sim.step()?;
    }
    sim.partition(link.0, link.1);
    flags.partitioned.set(true);
    while !flags.stalled.get() {
        sim.step()?;
    }
    for _ in 0..rng.range(0, 100) {
        sim.step()?;
    }
    sim.repair(link.0, link.1);
    flags.repaired.set(true);
    sim.run()
}

#[test]
fn partition_mid_relay_stalls_the_tunnel_without_panic_and_new_connections_work_after_repair() {
    run_seeds(test_name!(), partition_mid_relay);
}
