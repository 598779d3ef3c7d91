//! Soak: thousands of WebSocket connections exchanging messages through a portcullis process
//! for minutes, checking that no message is lost or reordered, that the proxy's resident memory
//! stays flat after warm-up, and that it holds no descriptor once the clients are gone.
//!
//! ```sh
//! cargo build --release && cargo run --release --example soak                  # 5,000 connections, 10 minutes
//! cargo run --release --example soak -- --connections 500 --seconds 60       # a quick one
//! ```
//!
//! Loopback only. It starts a WebSocket echo backend in this process, `target/release/portcullis
//! ws` in front of it, and the clients here; each client sends a numbered message at a random
//! interval (0.5–2 s), and checks that the echo is the same message, in order. Every 10 s it
//! prints the proxy's resident memory and descriptor count. Exits 1 if any check fails.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_net::{TcpListener, TcpStream};
use async_tungstenite::tungstenite::Message;
use futures_lite::StreamExt;

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    echoed: AtomicU64,
    /// An echo that was not the next message sent on its connection.
    wrong: AtomicU64,
    /// A connection that ended before the soak did, or failed to open.
    failed: AtomicU64,
    /// The first few reasons, printed at the end.
    why: std::sync::Mutex<Vec<String>>,
}

struct Args {
    connections: usize,
    seconds: u64,
    warmup: u64,
}

fn args() -> Args {
    let mut a = Args {
        connections: 5_000,
        seconds: 600,
        warmup: 60,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = || -> u64 {
            it.clone()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--connections" => a.connections = value() as usize,
            "--seconds" => a.seconds = value(),
            "--warmup" => a.warmup = value(),
            other => panic!("unknown argument {other}: --connections N --seconds N --warmup N"),
        }
        it.next();
    }
    a.warmup = a.warmup.min(a.seconds / 2);
    a
}

/// Open descriptors of process `pid`: (sockets, pipes, others). Pipes are the splice pool's,
/// kept per thread for reuse (at most 64 per thread), so only sockets and others count as leaks.
fn descriptors(pid: u32) -> (usize, usize, usize) {
    let mut counts = (0, 0, 0);
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten();
    for entry in entries.flatten() {
        match std::fs::read_link(entry.path()) {
            Ok(target) if target.to_string_lossy().starts_with("socket:") => counts.0 += 1,
            Ok(target) if target.to_string_lossy().starts_with("pipe:") => counts.1 += 1,
            _ => counts.2 += 1,
        }
    }
    counts
}

/// (resident KiB, open descriptors) of process `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// A cheap, seeded random number (xorshift), so intervals differ per connection.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

async fn backend(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        smol::spawn(async move {
            let Ok(mut ws) = async_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    break;
                }
            }
        })
        .detach();
    }
}

async fn client(id: usize, proxy: String, totals: Arc<Totals>, stop: Arc<AtomicBool>) {
    let fail = |why: String| {
        totals.failed.fetch_add(1, Ordering::Relaxed);
        let mut all = totals.why.lock().unwrap();
        if all.len() < 10 {
            all.push(format!("client {id}: {why}"));
        }
    };
    let stream = match TcpStream::connect(&proxy).await {
        Ok(s) => s,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{proxy}/soak/{id}");
    let mut ws = match async_tungstenite::client_async(url, stream).await {
        Ok((ws, _)) => ws,
        Err(e) => return fail(format!("handshake: {e}")),
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let pause = 500 + next_random(&mut rng) % 1500;
        smol::Timer::after(Duration::from_millis(pause)).await;
        // Sizes vary from a few bytes to a few KiB, as chat and telemetry messages do.
        let pad = (next_random(&mut rng) % 4096) as usize;
        let text = format!("{id}:{seq}:{}", "x".repeat(pad));
        if let Err(e) = ws.send(Message::text(text.clone())).await {
            return fail(format!("send: {e}"));
        }
        totals.sent.fetch_add(1, Ordering::Relaxed);
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str() == text => {
                totals.echoed.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(_)) => {
                totals.wrong.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(e)) => return fail(format!("receive: {e}")),
            None => return fail("closed by the proxy".into()),
        }
        seq += 1;
    }
    let _ = ws.close(None).await;
    // Read to the end so the close handshake completes.
    while let Some(Ok(_)) = ws.next().await {}
}

fn main() {
    let a = args();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "portcullis"])
        .current_dir(root)
        .status()
        .expect("run cargo build");
    assert!(built.success(), "cargo build --release failed");
    let binary = root.join("target/release/portcullis");

    smol::block_on(async {
        // A backlog of 4096, not std's 128: with thousands of connections opening at once,
        // an overflowing accept queue resets some of the proxy's upgrades (a 502 that says
        // nothing about the proxy).
        let listener = {
            use rustix::net::{AddressFamily, SocketFlags, SocketType};
            let fd = rustix::net::socket_with(
                AddressFamily::INET,
                SocketType::STREAM,
                SocketFlags::CLOEXEC,
                None,
            )
            .unwrap();
            let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
            rustix::net::bind(&fd, &any).unwrap();
            rustix::net::listen(&fd, 4096).unwrap();
            TcpListener::try_from(std::net::TcpListener::from(fd)).unwrap()
        };
        let backend_addr = listener.local_addr().unwrap();
        smol::spawn(backend(listener)).detach();
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let proxy_addr = format!("127.0.0.1:{port}");
        // The proxy's log, for the reasons behind a failure (one access line per connection).
        let log_path =
            std::env::temp_dir().join(format!("portcullis-soak-{}.log", std::process::id()));
        let mut proxy = Command::new(&binary)
            .args([
                "ws",
                "--listen",
                &proxy_addr,
                "--backend",
                &backend_addr.to_string(),
            ])
            .stderr(Stdio::from(
                std::fs::File::create(&log_path).expect("create the proxy's log"),
            ))
            .spawn()
            .expect("start portcullis");
        let pid = proxy.id();
        smol::Timer::after(Duration::from_millis(500)).await;
        let (rss0, fds0) = usage(pid);
        let (sockets0, pipes0, other0) = descriptors(pid);
        println!(
            "soak: {} connections for {} s (warm-up {} s) through {proxy_addr}; proxy idle: {rss0} KiB, {fds0} fds",
            a.connections, a.seconds, a.warmup
        );

        let totals = Arc::new(Totals::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::with_capacity(a.connections);
        for id in 0..a.connections {
            clients.push(smol::spawn(client(
                id,
                proxy_addr.clone(),
                totals.clone(),
                stop.clone(),
            )));
            if id % 100 == 99 {
                // Ramp up, rather than a SYN flood into the backlog.
                smol::Timer::after(Duration::from_millis(10)).await;
            }
        }

        let started = Instant::now();
        let mut after_warmup: Vec<u64> = Vec::new();
        let mut peak_fds = 0;
        while started.elapsed() < Duration::from_secs(a.seconds) {
            smol::Timer::after(Duration::from_secs(10)).await;
            let (rss, fds) = usage(pid);
            peak_fds = peak_fds.max(fds);
            let t = started.elapsed().as_secs();
            if t >= a.warmup {
                after_warmup.push(rss);
            }
            println!(
                "t={t:>4}s rss={rss} KiB fds={fds} sent={} echoed={} wrong={} failed={}",
                totals.sent.load(Ordering::Relaxed),
                totals.echoed.load(Ordering::Relaxed),
                totals.wrong.load(Ordering::Relaxed),
                totals.failed.load(Ordering::Relaxed),
            );
        }
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.await;
        }
        smol::Timer::after(Duration::from_secs(2)).await;
        let (rss_end, fds_end) = usage(pid);
        let (sockets_end, pipes_end, other_end) = descriptors(pid);
        let _ = proxy.kill();
        let _ = proxy.wait();

        let sent = totals.sent.load(Ordering::Relaxed);
        let echoed = totals.echoed.load(Ordering::Relaxed);
        let wrong = totals.wrong.load(Ordering::Relaxed);
        let failed = totals.failed.load(Ordering::Relaxed);
        let (lo, hi) = (
            after_warmup.iter().copied().min().unwrap_or(0),
            after_warmup.iter().copied().max().unwrap_or(0),
        );
        let drift = if lo > 0 {
            (hi - lo) as f64 * 100.0 / lo as f64
        } else {
            0.0
        };
        println!(
            "\nmessages: {sent} sent, {echoed} echoed, {wrong} wrong or reordered, {} lost; connections failed: {failed}",
            sent - echoed - wrong
        );
        println!(
            "proxy memory after warm-up: {lo}..{hi} KiB ({drift:.1}% spread); at the end {rss_end} KiB"
        );
        println!(
            "proxy descriptors: {fds0} idle, {peak_fds} at peak, {fds_end} after the clients left"
        );
        println!(
            "  sockets {sockets0} -> {sockets_end}, splice pool pipes {pipes0} -> {pipes_end}, other {other0} -> {other_end}"
        );
        // The splice pool keeps at most 64 pipes (2 descriptors each) per executor thread.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let leak = sockets_end > sockets0 || other_end > other0 || pipes_end > threads * 128;
        let ok = wrong == 0 && sent == echoed && failed == 0 && drift <= 5.0 && !leak;
        for why in totals.why.lock().unwrap().iter() {
            println!("  {why}");
        }
        if failed > 0 {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(" WARN "))
                .take(10)
                .collect();
            println!("  proxy warnings ({}): {warnings:#?}", log_path.display());
        }
        println!("{}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            std::process::exit(1);
        }
    });
}
