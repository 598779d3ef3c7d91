//! The benchmark: portcullis side by side with a direct connection and, where installed, nginx
//! and HAProxy, on loopback, doing the same work in the same run.
//!
//! ```sh
//! cargo run --release --example bench                    # 3 rounds of 3 s per test, ~4 minutes
//! cargo run --release --example bench -- --quick         # 1 round of 1 s per test
//! cargo run --release --example bench -- --secs 2 --rounds 2 --idle 2000 --only direct,portcullis
//! ```
//! (`BENCH_SECS`, `BENCH_ROUNDS` and `BENCH_IDLE` set the same defaults from the environment;
//! `BENCH_BASELINE=path/to/portcullis` adds a column for another build, e.g. before a change,
//! run with the environment in `BENCH_BASELINE_ENV="K=V ..."`, e.g. `PORTCULLIS_SPLICE=0`;
//! `BENCH_SECTION_CONFIG` / `BENCH_BASELINE_SECTION_CONFIG` add lines to every section of the
//! portcullis / the baseline column, e.g. `congestion_control = "cubic"`.)
//!
//! It builds the release `portcullis` binary, starts a WebSocket echo backend and a TCP sink
//! backend (this same program, `--backends`, in a second process) and, each round, starts every
//! target's proxy as a separate process in front of them. The load generator and the backends
//! are pinned to core 0 and the proxies to core 1, with one worker/thread each. Each test runs
//! against every target back to back (the order turning each round), so the figures a ratio
//! compares were taken seconds apart; the table shows medians, and for each ratio the median of
//! the rounds' ratios to direct.
//!
//! Tests, in this order:
//! - resident memory per idle WebSocket connection: the proxy's RSS grows by this much per
//!   tunnel with `--idle` (9000) tunnels open, each having carried one 64 B echo;
//! - WebSocket echo, 64 B and 16 KiB messages, 50 connections in a closed loop: messages/s and
//!   round-trip p50/p99;
//! - WebSocket handshakes/s, 32 at a time: connect, upgrade, one echo, close handshake;
//! - TCP throughput to a sink with 1 and 8 connections, counted by the sink;
//! - the same WebSocket echo (64 B) and handshakes over TLS (`wss64`, `wss_hs`): the proxy
//!   terminates TLS 1.3 (an ECDSA P-256 certificate from a CA made at start with rcgen) in
//!   front of the same plain backend; the client (futures-rustls, trusting that CA) resumes no
//!   sessions, so every handshake is a full one. Targets that cannot listen with TLS (and the
//!   direct connection, whose backend speaks none) leave these rows empty;
//! - the proxy's CPU seconds for each test (utime + stime from /proc/<pid>/stat); for
//!   portcullis also, in parentheses, the same less the time it spent polling for work
//!   (`portcullis_thread_polling_seconds_total`, from an admin endpoint added to its config).
//!
//! The client frames are written by hand (masked, as RFC 6455 requires), so the load generator
//! costs as little as it can. The backends and nginx/HAProxy configurations are in this file.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_net::{TcpListener, TcpStream};
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};
use futures_rustls::TlsConnector;
use smol::{LocalExecutor, Timer};

/// The WebSocket key every client sends (the one from RFC 6455's example).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ECHO_CONNS: usize = 50;
const HANDSHAKE_PARALLEL: usize = 32;
const TCP_CHUNK: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Options

struct Opts {
    secs: f64,
    rounds: usize,
    idle: usize,
    only: Option<Vec<String>>,
    tests: Option<Vec<String>>,
}

impl Opts {
    fn parse() -> Opts {
        let env = |k: &str| std::env::var(k).ok();
        let mut o = Opts {
            secs: env("BENCH_SECS")
                .and_then(|s| s.parse().ok())
                .unwrap_or(3.0),
            rounds: env("BENCH_ROUNDS")
                .and_then(|s| s.parse().ok())
                .unwrap_or(3),
            idle: env("BENCH_IDLE")
                .and_then(|s| s.parse().ok())
                .unwrap_or(9000),
            only: None,
            tests: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut val = || args.next().expect("a value after the flag");
            match a.as_str() {
                "--quick" => {
                    o.secs = 1.0;
                    o.rounds = 1;
                }
                "--secs" => o.secs = val().parse().expect("--secs SECONDS"),
                "--rounds" => o.rounds = val().parse().expect("--rounds N"),
                "--idle" => o.idle = val().parse().expect("--idle CONNECTIONS"),
                "--only" => o.only = Some(val().split(',').map(str::to_string).collect()),
                "--tests" => o.tests = Some(val().split(',').map(str::to_string).collect()),
                _ => {
                    eprintln!(
                        "usage: bench [--quick] [--secs S] [--rounds N] [--idle N] \
                         [--only direct,portcullis,nginx,haproxy] \
                         [--tests idle,echo64,echo16k,hs,tcp1,tcp8,wss64,wss_hs]"
                    );
                    std::process::exit(2);
                }
            }
        }
        o
    }

    /// Whether `--tests` (if given) names this test.
    fn wants(&self, test: &str) -> bool {
        self.tests
            .as_ref()
            .is_none_or(|ts| ts.iter().any(|t| t == test))
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket framing (client side: masked frames; server side: unmasked)

fn client_frame(opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let n = payload.len();
    let mut f = Vec::with_capacity(n + 14);
    f.push(0x80 | opcode);
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n <= 0xffff {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

fn server_header(opcode: u8, n: usize, out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    if n < 126 {
        out.push(n as u8);
    } else if n <= 0xffff {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
}

fn server_frame_len(n: usize) -> usize {
    n + if n < 126 {
        2
    } else if n <= 0xffff {
        4
    } else {
        10
    }
}

fn mask_key(i: usize) -> [u8; 4] {
    ((i as u32).wrapping_mul(2_654_435_761) | 0x0101_0101).to_le_bytes()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn other(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// Reads an HTTP head; returns it and any bytes that followed it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 2048];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(p) = find(&head, b"\r\n\r\n") {
            let rest = head.split_off(p + 4);
            return Ok((head, rest));
        }
        if head.len() > 16 * 1024 {
            return Err(other("head too large"));
        }
    }
}

/// Connects to `addr` and completes a WebSocket upgrade.
async fn ws_open(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    ws_upgrade(s, addr).await
}

/// Connects to `addr`, completes a TLS handshake for `localhost`, then a WebSocket upgrade.
async fn wss_open(
    addr: SocketAddr,
    tls: TlsConnector,
) -> io::Result<futures_rustls::client::TlsStream<TcpStream>> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let s = tls
        .connect(ServerName::try_from("localhost").unwrap(), s)
        .await?;
    ws_upgrade(s, addr).await
}

/// A WebSocket upgrade on a connection to `addr`.
async fn ws_upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    addr: SocketAddr,
) -> io::Result<S> {
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    s.flush().await?;
    let (head, rest) = read_head(&mut s).await?;
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(other(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&head).lines().next().unwrap_or("")
        )));
    }
    if !rest.is_empty() {
        return Err(other("bytes after the 101"));
    }
    Ok(s)
}

/// One echo of `frame` (a client frame carrying `len` payload bytes), checked when `expect` is
/// given.
async fn echo_once<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    frame: &[u8],
    reply: &mut [u8],
    expect: Option<&[u8]>,
) -> io::Result<()> {
    s.write_all(frame).await?;
    s.flush().await?; // a no-op on TCP; TLS may hold the record otherwise
    s.read_exact(reply).await?;
    if let Some(payload) = expect {
        let h = reply.len() - payload.len();
        if reply[0] != 0x82 || &reply[h..] != payload {
            return Err(other("the echo differs from what was sent"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The backends: a WebSocket echo server and a TCP sink, on one thread in their own process.

fn run_backends() {
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(async {
        let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!(
            "ws={} tcp={}",
            ws.local_addr().unwrap(),
            sink.local_addr().unwrap()
        );
        let ex = &ex;
        let ws_loop = async {
            loop {
                if let Ok((s, _)) = ws.accept().await {
                    ex.spawn(async move {
                        let _ = ws_echo(s).await;
                    })
                    .detach();
                }
            }
        };
        let sink_loop = async {
            loop {
                if let Ok((s, _)) = sink.accept().await {
                    ex.spawn(async move {
                        let _ = tcp_sink(s).await;
                    })
                    .detach();
                }
            }
        };
        future::zip(ws_loop, sink_loop).await;
    }));
}

async fn ws_echo(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let (head, mut buf) = read_head(&mut s).await?;
    let text = String::from_utf8_lossy(&head);
    let key = text
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| v.trim().to_string())
        })
        .ok_or_else(|| other("no key"))?;
    let accept = async_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    s.write_all(resp.as_bytes()).await?;
    let mut filled = buf.len();
    buf.resize(64 * 1024, 0);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        // Answer every complete frame in the buffer, in one write.
        let mut at = 0;
        let mut close = false;
        while let Some((op, start, len)) = parse_frame(&buf[at..filled]) {
            let key = [
                buf[at + start - 4],
                buf[at + start - 3],
                buf[at + start - 2],
                buf[at + start - 1],
            ];
            let payload = &mut buf[at + start..at + start + len];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i & 3];
            }
            server_header(op, len, &mut out);
            out.extend_from_slice(payload);
            at += start + len;
            if op == 0x8 {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if close {
            // The server closes the TCP connection first (RFC 6455 §7.1.1).
            return s.close().await;
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[filled..]).await?;
        if n == 0 {
            return s.close().await;
        }
        filled += n;
    }
}

/// A complete masked frame at the start of `b`: (opcode, payload offset, payload length).
fn parse_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let op = b[0] & 0x0f;
    let (len, mut start) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    start += 4; // the mask key
    (b.len() >= start + len).then_some((op, start, len))
}

/// Reads until end of file, then answers with the number of bytes it read (u64, little end).
async fn tcp_sink(mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; TCP_CHUNK];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await? {
            0 => break,
            n => total += n as u64,
        }
    }
    s.write_all(&total.to_le_bytes()).await?;
    s.close().await
}

// ---------------------------------------------------------------------------------------------
// The tests (load generator side)

/// A flag that turns true once `d` has passed.
fn stop_after(ex: &LocalExecutor<'_>, d: Duration) -> Rc<Cell<bool>> {
    let stop = Rc::new(Cell::new(false));
    let s = stop.clone();
    ex.spawn(async move {
        Timer::after(d).await;
        s.set(true);
    })
    .detach();
    stop
}

/// Echoes over [`ECHO_CONNS`] connections, each opened by `open`.
async fn test_echo<S, F>(
    ex: &LocalExecutor<'_>,
    open: impl Fn() -> F,
    size: usize,
    d: Duration,
) -> io::Result<(f64, f64, f64)>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
    F: std::future::Future<Output = io::Result<S>>,
{
    let mut conns = Vec::new();
    for _ in 0..ECHO_CONNS {
        conns.push(open().await?);
    }
    let mut tasks = Vec::new();
    for (i, mut s) in conns.into_iter().enumerate() {
        tasks.push(ex.spawn(async move {
            let payload: Vec<u8> = (0..size).map(|j| (i + j) as u8).collect();
            let frame = client_frame(0x2, &payload, mask_key(i));
            let mut reply = vec![0u8; server_frame_len(size)];
            // A checked echo first, which also warms the path up.
            echo_once(&mut s, &frame, &mut reply, Some(&payload)).await?;
            Ok::<_, io::Error>((s, frame, reply))
        }));
    }
    let mut ready = Vec::new();
    for t in tasks {
        ready.push(t.await?);
    }
    let began = Instant::now();
    let stop = stop_after(ex, d);
    let mut tasks = Vec::new();
    for (mut s, frame, mut reply) in ready {
        let stop = stop.clone();
        tasks.push(ex.spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            while !stop.get() {
                let t0 = Instant::now();
                echo_once(&mut s, &frame, &mut reply, None).await?;
                lat.push(t0.elapsed().as_micros() as u32);
            }
            Ok::<_, io::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let secs = began.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64;
    Ok((all.len() as f64 / secs, pct(0.50), pct(0.99)))
}

/// Connect (`open`), upgrade, one 64 B echo, close handshake, wait for the server's FIN.
async fn handshake_cycle<S, F>(open: &impl Fn() -> F, frame: &[u8], close: &[u8]) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = io::Result<S>>,
{
    let mut s = open().await?;
    let mut reply = [0u8; 66];
    echo_once(&mut s, frame, &mut reply, None).await?;
    s.write_all(close).await?;
    s.flush().await?;
    let mut rest = Vec::with_capacity(8);
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            // A TLS server that closes without a close_notify: the close frame is what counts.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && rest.len() >= 4 => break,
            Err(e) => return Err(e),
        }
    }
    if rest.first() != Some(&0x88) {
        return Err(other("no close frame"));
    }
    Ok(())
}

/// Handshake cycles, [`HANDSHAKE_PARALLEL`] at a time, each connection opened by `open`.
async fn test_handshakes<S, F>(
    ex: &LocalExecutor<'_>,
    open: impl Fn() -> F + Clone + 'static,
    d: Duration,
) -> io::Result<f64>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = io::Result<S>>,
{
    let began = Instant::now();
    let stop = stop_after(ex, d);
    let mut tasks = Vec::new();
    for i in 0..HANDSHAKE_PARALLEL {
        let stop = stop.clone();
        let open = open.clone();
        tasks.push(ex.spawn(async move {
            let frame = client_frame(0x2, &[7u8; 64], mask_key(i));
            let close = client_frame(0x8, &1000u16.to_be_bytes(), mask_key(i + 1));
            let mut n = 0u64;
            while !stop.get() {
                handshake_cycle(&open, &frame, &close).await?;
                n += 1;
            }
            Ok::<_, io::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / began.elapsed().as_secs_f64())
}

/// Bytes per second that reached the sink over `conns` connections.
async fn test_tcp(
    ex: &LocalExecutor<'_>,
    addr: SocketAddr,
    conns: usize,
    d: Duration,
) -> io::Result<f64> {
    let mut streams = Vec::new();
    for _ in 0..conns {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    let began = Instant::now();
    let stop = stop_after(ex, d);
    let mut tasks = Vec::new();
    for mut s in streams {
        let stop = stop.clone();
        tasks.push(ex.spawn(async move {
            let chunk = vec![0x5au8; TCP_CHUNK];
            while !stop.get() {
                s.write_all(&chunk).await?;
            }
            s.close().await?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count).await?;
            Ok::<_, io::Error>(u64::from_le_bytes(count))
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / began.elapsed().as_secs_f64())
}

/// Opens `n` WebSocket tunnels through the proxy (each carries one echo, then idles) and
/// returns the proxy's RSS growth per tunnel, in bytes.
async fn test_idle(
    ex: &LocalExecutor<'_>,
    addr: SocketAddr,
    pid: u32,
    n: usize,
) -> io::Result<f64> {
    // A first tunnel, so the baseline counts what any first connection sets up.
    let frame = client_frame(0x2, &[1u8; 64], mask_key(0));
    let mut reply = [0u8; 66];
    let mut warm = ws_open(addr).await?;
    echo_once(&mut warm, &frame, &mut reply, None).await?;
    drop(warm);
    Timer::after(Duration::from_millis(200)).await;
    let base = rss_bytes(pid)?;
    let per = n.div_ceil(HANDSHAKE_PARALLEL);
    let mut tasks = Vec::new();
    for i in 0..HANDSHAKE_PARALLEL {
        let count = per.min(n.saturating_sub(i * per));
        tasks.push(ex.spawn(async move {
            let frame = client_frame(0x2, &[1u8; 64], mask_key(i));
            let mut reply = [0u8; 66];
            let mut open = Vec::with_capacity(count);
            for _ in 0..count {
                let mut s = ws_open(addr).await?;
                echo_once(&mut s, &frame, &mut reply, None).await?;
                open.push(s);
            }
            Ok::<_, io::Error>(open)
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        open.extend(t.await?);
    }
    Timer::after(Duration::from_millis(500)).await;
    let grown = rss_bytes(pid)?.saturating_sub(base);
    let per_conn = grown as f64 / open.len() as f64;
    drop(open);
    Timer::after(Duration::from_millis(500)).await;
    Ok(per_conn)
}

// ---------------------------------------------------------------------------------------------
// /proc

fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| other("no VmRSS"))
}

/// User + system CPU seconds of a process (all its threads).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// ---------------------------------------------------------------------------------------------
// The targets

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Target {
    Direct,
    /// Another portcullis binary (`BENCH_BASELINE=path`), e.g. before a change.
    Baseline,
    Portcullis,
    Nginx,
    Haproxy,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Baseline => "baseline",
            Target::Portcullis => "portcullis",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
        }
    }
}

/// A proxy process, killed when dropped.
struct Proxy {
    child: Child,
    ws: SocketAddr,
    tcp: SocketAddr,
    /// The TLS-terminating WebSocket listener, when the proxy was started with one.
    wss: Option<SocketAddr>,
    /// portcullis's admin endpoint, for the time it spent polling.
    admin: Option<SocketAddr>,
}

/// The TLS material made at start: a private CA and a `localhost` certificate it signed,
/// written to the scratch directory, and a client configuration trusting the CA.
struct Certs {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file, as HAProxy's `crt` takes them.
    combined: PathBuf,
    connector: TlsConnector,
}

fn make_certs(dir: &Path) -> Result<Certs, Box<dyn std::error::Error>> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "portcullis bench CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["localhost".to_string()])?.signed_by(&key, &ca)?;
    let certs = Certs {
        cert: dir.join("bench-cert.pem"),
        key: dir.join("bench-key.pem"),
        combined: dir.join("bench-haproxy.pem"),
        connector: {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der().clone())?;
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            // Every handshake a full one, whatever each server's session cache or tickets.
            config.resumption = rustls::client::Resumption::disabled();
            TlsConnector::from(std::sync::Arc::new(config))
        },
    };
    std::fs::write(&certs.cert, leaf.pem())?;
    std::fs::write(&certs.key, key.serialize_pem())?;
    std::fs::write(&certs.combined, leaf.pem() + &key.serialize_pem())?;
    Ok(certs)
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `target`'s proxy on core 1 in front of the backends; with `tls`, also a WebSocket
/// listener terminating TLS in front of the same (plain) WebSocket backend.
fn start_proxy(
    target: Target,
    bin: &Path,
    dir: &Path,
    ws_backend: SocketAddr,
    tcp_backend: SocketAddr,
    tls: Option<&Certs>,
) -> io::Result<Proxy> {
    let (pw, pt) = (free_port(), free_port());
    let mut admin = None;
    let ws: SocketAddr = format!("127.0.0.1:{pw}").parse().unwrap();
    let tcp: SocketAddr = format!("127.0.0.1:{pt}").parse().unwrap();
    let wss: Option<SocketAddr> =
        tls.map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap());
    let mut cmd = Command::new("taskset");
    // BENCH_PROXY_CPUS="0,1": the proxy on both cores (and on two threads), to compare how a
    // multi-threaded proxy shares them; not for the table.
    let cpus = std::env::var("BENCH_PROXY_CPUS").unwrap_or_else(|_| "1".into());
    cmd.args(["-c", &cpus]);
    match target {
        Target::Direct => unreachable!(),
        Target::Portcullis | Target::Baseline => {
            let file = dir.join(format!("{}.toml", target.name()));
            // No access lines, as nginx (`access_log off`) and HAProxy (no `log`) write none:
            // the same work. BENCH_CONFIG / BENCH_BASELINE_CONFIG replace these top-level
            // settings for the portcullis / the baseline column, e.g. "busy_poll_us = 0" (polling
            // off; it is on by default) or "" for a build older than `access_log`.
            let top = match target {
                Target::Baseline => std::env::var("BENCH_BASELINE_CONFIG"),
                _ => std::env::var("BENCH_CONFIG"),
            }
            .unwrap_or_else(|_| "access_log = false".into());
            // BENCH_SECTION_CONFIG / BENCH_BASELINE_SECTION_CONFIG: lines added to every
            // section, e.g. 'congestion_control = "cubic"'.
            let each = match target {
                Target::Baseline => std::env::var("BENCH_BASELINE_SECTION_CONFIG"),
                _ => std::env::var("BENCH_SECTION_CONFIG"),
            }
            .unwrap_or_default();
            // An admin endpoint, for `portcullis_thread_polling_seconds_total`, unless the
            // configuration given has its own.
            let admin_table = if top.contains("admin") {
                String::new()
            } else {
                let a: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                admin = Some(a);
                format!("\n[admin]\nlisten = \"{a}\"\n")
            };
            std::fs::write(
                &file,
                format!(
                    "{top}\n{admin_table}\n[[ws_proxy]]\nlisten = \"{ws}\"\nbackends = [\"{ws_backend}\"]\n{each}\n\n\
                     [[tcp_proxy]]\nlisten = \"{tcp}\"\nbackends = [\"{tcp_backend}\"]\n{each}\n{}",
                    match (wss, tls) {
                        (Some(wss), Some(c)) => format!(
                            "\n[[ws_proxy]]\nname = \"wss\"\nlisten = \"{wss}\"\nbackends = [\"{ws_backend}\"]\n{each}\n\
                             tls = {{ cert = \"{}\", key = \"{}\" }}\n",
                            c.cert.display(),
                            c.key.display()
                        ),
                        _ => String::new(),
                    }
                ),
            )?;
            let baseline = std::env::var_os("BENCH_BASELINE").map(PathBuf::from);
            let bin = match target {
                Target::Baseline => baseline.as_deref().unwrap_or(bin),
                _ => bin,
            };
            cmd.arg(bin).arg("--config").arg(&file);
            if target == Target::Baseline {
                // BENCH_BASELINE_ENV="K=V K2=V2": environment for the baseline only.
                let env = std::env::var("BENCH_BASELINE_ENV").unwrap_or_default();
                for (k, v) in env.split_whitespace().filter_map(|kv| kv.split_once('=')) {
                    cmd.env(k, v);
                }
            }
        }
        Target::Nginx => {
            let file = dir.join("nginx.conf");
            let d = dir.display();
            std::fs::write(
                &file,
                format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
                     daemon off;\nmaster_process off;\nworker_processes 1;\n\
                     worker_rlimit_nofile 20000;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err crit;\n\
                     events {{ worker_connections 19900; }}\n\
                     http {{\n  access_log off;\n\
                     client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;\n\
                     uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
                     upstream ws {{ server {ws_backend}; }}\n\
                     server {{\n    listen {ws} backlog=4096;\n    location / {{\n\
                     proxy_pass http://ws;\n      proxy_http_version 1.1;\n\
                     proxy_set_header Upgrade $http_upgrade;\n\
                     proxy_set_header Connection \"upgrade\";\n      proxy_buffering off;\n\
                     proxy_buffer_size 16k;\n      proxy_buffers 8 16k;\n      proxy_busy_buffers_size 32k;\n      proxy_read_timeout 1h;\n\
                     proxy_send_timeout 1h;\n    }}\n  }}\n{}}}\n\
                     stream {{\n  server {{\n    listen {tcp} backlog=4096;\n\
                     proxy_pass {tcp_backend};\n    proxy_buffer_size 16k;\n\
                     proxy_half_close on;\n  }}\n}}\n",
                    match (wss, tls) {
                        (Some(wss), Some(c)) => format!(
                            "  server {{\n    listen {wss} ssl backlog=4096;\n\
                             ssl_certificate {};\n    ssl_certificate_key {};\n\
                             location / {{\n      proxy_pass http://ws;\n      proxy_http_version 1.1;\n\
                             proxy_set_header Upgrade $http_upgrade;\n\
                             proxy_set_header Connection \"upgrade\";\n      proxy_buffering off;\n\
                             proxy_buffer_size 16k;\n      proxy_buffers 8 16k;\n      proxy_busy_buffers_size 32k;\n\
                             proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n    }}\n  }}\n",
                            c.cert.display(),
                            c.key.display()
                        ),
                        _ => String::new(),
                    }
                ),
            )?;
            cmd.args(["nginx", "-p"]).arg(dir).arg("-c").arg(&file);
        }
        Target::Haproxy => {
            let file = dir.join("haproxy.cfg");
            std::fs::write(
                &file,
                format!(
                    "global\n  maxconn 9900\n  nbthread 1\n  tune.bufsize 16384\n\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n\
                     timeout server 1h\n  timeout tunnel 1h\n  timeout client-fin 10s\n\
                     timeout server-fin 10s\n\n\
                     frontend ws\n  bind {ws}\n  default_backend ws\n\n\
                     backend ws\n  server s1 {ws_backend}\n\n\
                     frontend tcp\n  mode tcp\n  bind {tcp}\n  default_backend tcp\n\n\
                     backend tcp\n  mode tcp\n  server s1 {tcp_backend}\n{}",
                    match (wss, tls) {
                        (Some(wss), Some(c)) => format!(
                            "\nfrontend wss\n  bind {wss} ssl crt {} alpn http/1.1\n  default_backend ws\n",
                            c.combined.display()
                        ),
                        _ => String::new(),
                    }
                ),
            )?;
            cmd.args(["haproxy", "-db", "-f"]).arg(&file);
        }
    }
    let log = dir.join(format!("{}.stderr.log", target.name()));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // The proxy's standard error: kept in the scratch directory (the round's latest, one
        // file per target), shown if the proxy fails to start.
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let proxy = Proxy {
        child,
        ws,
        tcp,
        wss,
        admin,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(ws).is_err()
        || std::net::TcpStream::connect(tcp).is_err()
        || wss.is_some_and(|a| std::net::TcpStream::connect(a).is_err())
    {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(other(format!(
                "{} did not start listening: {}",
                target.name(),
                tail.join(" / ")
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proxy)
}

fn installed(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

// ---------------------------------------------------------------------------------------------
// Setup

/// Pins this process (and the threads and processes it starts later) to core 0.
fn pin_to_core_0() {
    let pid = std::process::id().to_string();
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &pid])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("warning: taskset failed; the figures will be noisier");
    }
}

/// Raises this process's open-file limit to the hard limit (children inherit it).
fn raise_nofile() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap_or("unlimited")
        .to_string();
    let pid = std::process::id().to_string();
    let _ = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status();
}

fn build_portcullis() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--bin",
            "portcullis",
            "--manifest-path",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building portcullis failed");
    // This program is target/release/examples/bench; the binary is target/release/portcullis.
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("portcullis"))
        .expect("the release directory")
}

struct Backends(Child);

impl Drop for Backends {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_backends() -> (Backends, SocketAddr, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg("--backends")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the backends start");
    let mut line = String::new();
    io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the backends' addresses");
    let mut addrs = line.split_whitespace().map(|kv| {
        kv.split_once('=')
            .and_then(|(_, v)| v.parse::<SocketAddr>().ok())
            .expect("an address")
    });
    let (ws, tcp) = (addrs.next().unwrap(), addrs.next().unwrap());
    (Backends(child), ws, tcp)
}

// ---------------------------------------------------------------------------------------------
// Main

/// Rows of the table, in order: (key, label).
const ROWS: &[(&str, &str)] = &[
    ("echo64", "WS echo 64 B, msgs/s"),
    ("echo64_p50", "  round trip p50, µs"),
    ("echo64_p99", "  round trip p99, µs"),
    ("echo16k", "WS echo 16 KiB, msgs/s"),
    ("echo16k_p50", "  round trip p50, µs"),
    ("echo16k_p99", "  round trip p99, µs"),
    ("hs", "WS handshakes/s (32 at a time)"),
    ("wss64", "WS echo 64 B over TLS, msgs/s"),
    ("wss64_p50", "  round trip p50, µs"),
    ("wss64_p99", "  round trip p99, µs"),
    ("wss_hs", "WS handshakes/s over TLS (wss)"),
    ("tcp1", "TCP 1 conn, MB/s"),
    ("tcp8", "TCP 8 conns, MB/s"),
    ("idle", "memory per idle WS conn, KiB"),
    ("cpu_echo64", "proxy CPU s: echo 64 B"),
    ("cpu_echo16k", "proxy CPU s: echo 16 KiB"),
    ("cpu_hs", "proxy CPU s: handshakes"),
    ("cpu_wss64", "proxy CPU s: echo 64 B over TLS"),
    ("cpu_wss_hs", "proxy CPU s: wss handshakes"),
    ("cpu_tcp1", "proxy CPU s: TCP 1 conn"),
    ("cpu_tcp8", "proxy CPU s: TCP 8 conns"),
];

/// For each CPU row, the key of portcullis's CPU seconds less the time it polled for work
/// (`portcullis_thread_polling_seconds_total`), shown in the same cell.
const WORKING: &[(&str, &str)] = &[
    ("cpu_echo64", "working_echo64"),
    ("cpu_echo16k", "working_echo16k"),
    ("cpu_hs", "working_hs"),
    ("cpu_wss64", "working_wss64"),
    ("cpu_wss_hs", "working_wss_hs"),
    ("cpu_tcp1", "working_tcp1"),
    ("cpu_tcp8", "working_tcp8"),
];

/// [`WORKING`]'s key for a CPU row's.
fn polling_key(cpu_key: &str) -> &'static str {
    WORKING
        .iter()
        .find(|(c, _)| *c == cpu_key)
        .map(|(_, w)| *w)
        .expect("a CPU row")
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--backends") {
        return run_backends();
    }
    let opts = Opts::parse();
    raise_nofile();
    pin_to_core_0();
    let bin = build_portcullis();
    let (_backends, ws_backend, tcp_backend) = start_backends();
    let mut targets = vec![Target::Direct, Target::Portcullis];
    if std::env::var_os("BENCH_BASELINE").is_some() {
        targets.insert(1, Target::Baseline);
    }
    for (t, cmd) in [(Target::Nginx, "nginx"), (Target::Haproxy, "haproxy")] {
        if installed(cmd) {
            targets.push(t);
        } else {
            eprintln!("{cmd} is not installed: its column is left out");
        }
    }
    if let Some(only) = &opts.only {
        targets.retain(|t| only.iter().any(|o| o == t.name()));
    }
    let dir = std::env::temp_dir().join(format!("portcullis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let want_tls = opts
        .tests
        .as_ref()
        .is_none_or(|ts| ts.iter().any(|t| t.starts_with("wss")));
    let certs = match want_tls.then(|| make_certs(&dir)) {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("cannot make the TLS certificates ({e}): the wss rows are left out");
            None
        }
        None => None,
    };
    let d = Duration::from_secs_f64(opts.secs);
    eprintln!("TCP congestion control: {}", host_congestion_control());
    eprintln!(
        "{} round(s) of {:.1} s per test, {} idle connections; targets: {}",
        opts.rounds,
        opts.secs,
        opts.idle,
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut results = Results::new();
    let ex = LocalExecutor::new();
    let started = Instant::now();
    let verbose = std::env::var_os("BENCH_VERBOSE").is_some();
    for round in 0..opts.rounds {
        // Every target's proxy runs for the whole round (fresh processes each round, so the
        // memory test sees a new one); the ones not under test sit idle on core 1.
        let mut running: Vec<(Target, Endpoints, Option<Proxy>)> = Vec::new();
        for &target in &targets {
            let start = |tls| start_proxy(target, &bin, &dir, ws_backend, tcp_backend, tls);
            let proxy = match target {
                Target::Direct => None,
                t => match start(certs.as_ref()) {
                    Ok(p) => Some(p),
                    // A target that cannot listen with TLS still runs the plain tests.
                    Err(e) if certs.is_some() => match start(None) {
                        Ok(p) => {
                            eprintln!("round {}: {} cannot terminate TLS ({e}): its wss rows are left out", round + 1, t.name());
                            Some(p)
                        }
                        Err(e) => {
                            eprintln!("round {}: {}: {e}", round + 1, t.name());
                            continue;
                        }
                    },
                    Err(e) => {
                        eprintln!("round {}: {}: {e}", round + 1, t.name());
                        continue;
                    }
                },
            };
            let at = Endpoints {
                ws: proxy.as_ref().map_or(ws_backend, |p| p.ws),
                tcp: proxy.as_ref().map_or(tcp_backend, |p| p.tcp),
                wss: proxy
                    .as_ref()
                    .and_then(|p| p.wss)
                    .zip(certs.as_ref().map(|c| c.connector.clone())),
                pid: proxy.as_ref().map(|p| p.child.id()),
                admin: proxy.as_ref().and_then(|p| p.admin),
            };
            running.push((target, at, proxy));
        }
        // Each test against every target back to back, so the figures a ratio compares were
        // taken seconds apart, not minutes; the order turns each round, so no target always
        // runs first (or right after the memory test's 9,000 connections).
        let n = running.len();
        for test in TESTS.iter().filter(|t| opts.wants(t)) {
            for i in 0..n {
                let (target, at, _) = &running[(round + i) % n];
                let values = smol::block_on(ex.run(run_test(&ex, test, at, d, opts.idle)));
                for (k, v) in values {
                    if verbose {
                        eprintln!("  {} {k}: {v:.2}", target.name());
                    }
                    results.insert((*target, k, round), v);
                }
            }
            eprintln!(
                "round {}/{} {test} done ({:.0} s)",
                round + 1,
                opts.rounds,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    print_table(&targets, &results, &opts);
}

/// The tests, in the order each round runs them.
const TESTS: &[&str] = &[
    "idle", "echo64", "echo16k", "hs", "wss64", "wss_hs", "tcp1", "tcp8",
];

/// Every figure of the run: (target, metric, round) → value.
type Results = BTreeMap<(Target, &'static str, usize), f64>;

/// Where a test reaches one target: its listeners, and its process for the CPU and memory
/// figures (none for the direct connection).
struct Endpoints {
    ws: SocketAddr,
    tcp: SocketAddr,
    /// The TLS-terminating listener and a client configured for it, if the target has one.
    wss: Option<(SocketAddr, TlsConnector)>,
    pid: Option<u32>,
    /// portcullis's admin endpoint (none for other targets, and for a build without it).
    admin: Option<SocketAddr>,
}

/// The seconds portcullis has spent polling for work (`busy_poll_us`), from its admin
/// endpoint; NaN if it does not say (a build from before the metric).
fn polling_secs(admin: SocketAddr) -> f64 {
    let get = || -> io::Result<String> {
        let mut s = std::net::TcpStream::connect(admin)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        io::Write::write_all(
            &mut s,
            b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        )?;
        let mut text = String::new();
        io::Read::read_to_string(&mut s, &mut text)?;
        Ok(text)
    };
    get()
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("portcullis_thread_polling_seconds_total "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// One test against one target: its figures, named as the table's rows, with the proxy's CPU
/// seconds during it. A test that does not apply (memory and TLS without a proxy, TLS without
/// a TLS listener) gives none; one that fails is reported and gives none.
async fn run_test(
    ex: &LocalExecutor<'_>,
    test: &str,
    at: &Endpoints,
    d: Duration,
    idle: usize,
) -> Vec<(&'static str, f64)> {
    let limit = d + Duration::from_secs(30);
    let cpu = || at.pid.map_or(f64::NAN, cpu_secs);
    let polling = || at.admin.map_or(f64::NAN, polling_secs);
    let p0 = polling();
    let c0 = cpu();
    let ws = at.ws;
    let figures: io::Result<Vec<(&'static str, f64)>> = bounded(limit, async {
        let echo =
            |r: (f64, f64, f64), k: [&'static str; 3]| vec![(k[0], r.0), (k[1], r.1), (k[2], r.2)];
        Ok(match (test, at.pid, &at.wss) {
            ("idle", Some(pid), _) => {
                vec![("idle", test_idle(ex, ws, pid, idle).await? / 1024.0)]
            }
            ("idle", None, _) => return Ok(vec![]),
            ("echo64", ..) => echo(
                test_echo(ex, || ws_open(ws), 64, d).await?,
                ["echo64", "echo64_p50", "echo64_p99"],
            ),
            ("echo16k", ..) => echo(
                test_echo(ex, || ws_open(ws), 16 * 1024, d).await?,
                ["echo16k", "echo16k_p50", "echo16k_p99"],
            ),
            ("hs", ..) => vec![("hs", test_handshakes(ex, move || ws_open(ws), d).await?)],
            ("wss64", _, Some((wss, tls))) => echo(
                test_echo(ex, || wss_open(*wss, tls.clone()), 64, d).await?,
                ["wss64", "wss64_p50", "wss64_p99"],
            ),
            ("wss_hs", _, Some((wss, tls))) => {
                let (wss, tls) = (*wss, tls.clone());
                let open = move || wss_open(wss, tls.clone());
                vec![("wss_hs", test_handshakes(ex, open, d).await?)]
            }
            ("wss64" | "wss_hs", _, None) => return Ok(vec![]),
            ("tcp1", ..) => vec![("tcp1", test_tcp(ex, at.tcp, 1, d).await? / 1e6)],
            ("tcp8", ..) => vec![("tcp8", test_tcp(ex, at.tcp, 8, d).await? / 1e6)],
            _ => unreachable!("a test named in TESTS"),
        })
    })
    .await;
    match figures {
        Ok(mut v) => {
            if at.pid.is_some() && test != "idle" && !v.is_empty() {
                let key = ROWS
                    .iter()
                    .map(|(k, _)| *k)
                    .find(|k| k.strip_prefix("cpu_") == Some(test))
                    .expect("a CPU row for each test but memory");
                let c = cpu() - c0;
                v.push((key, c));
                let polled = polling() - p0;
                if polled.is_finite() {
                    v.push((polling_key(key), c - polled));
                }
            }
            v
        }
        Err(e) => {
            eprintln!("  {test}: {e}");
            vec![]
        }
    }
}

async fn bounded<T>(
    limit: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    future::or(f, async {
        Timer::after(limit).await;
        Err(other("timed out"))
    })
    .await
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fmt_value(key: &str, v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if key.starts_with("cpu") {
        format!("{v:.2}")
    } else if key == "idle" {
        format!("{v:.1}")
    } else if key.ends_with("p50") || key.ends_with("p99") || key.starts_with("tcp") {
        format!("{v:.0}")
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// The host's congestion control, which every TCP connection here runs unless a proxy's config
/// says otherwise (BBR paces, which bounds the one-connection test: see the README).
fn host_congestion_control() -> String {
    let cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control");
    let cc = cc.as_deref().map_or("unknown", str::trim);
    format!("{cc} (net.ipv4.tcp_congestion_control)")
}

fn print_table(targets: &[Target], results: &Results, o: &Opts) {
    println!(
        "\nportcullis benchmark: medians of {} round(s), {:.1} s per test, {} idle connections; \
         each test runs against every target back to back, and a ratio is the median of its \
         rounds' ratios to direct; CPU in parentheses: less the time portcullis polled for \
         work (busy_poll_us); TCP congestion control {}\n",
        o.rounds,
        o.secs,
        o.idle,
        host_congestion_control()
    );
    let width = 18;
    let mut header = format!("| {:<32} |", "test");
    let mut rule = format!("|{}|", "-".repeat(34));
    for t in targets {
        header += &format!(" {:>width$} |", t.name());
        rule += &format!("{}:|", "-".repeat(width + 1));
    }
    println!("{header}\n{rule}");
    for (key, label) in ROWS {
        let mut line = format!("| {label:<32} |");
        for t in targets {
            let cell = match paired(results, *t, key) {
                None => "—".to_string(),
                Some((m, ratio)) => {
                    let ratio = match ratio {
                        Some(r) if *t != Target::Direct && !key.starts_with("cpu") => {
                            format!(" ({r:.2}×)")
                        }
                        _ => String::new(),
                    };
                    // portcullis's CPU less the time it polled for work, beside its CPU.
                    let working = if key.starts_with("cpu_") {
                        paired(results, *t, polling_key(key))
                            .map_or(String::new(), |(w, _)| format!(" ({w:.2})"))
                    } else {
                        String::new()
                    };
                    format!("{}{ratio}{working}", fmt_value(key, m))
                }
            };
            line += &format!(" {cell:>width$} |");
        }
        println!("{line}");
    }
}

/// A target's figure for one metric: the median over rounds, and the median of each round's
/// ratio to the direct connection's figure in the same round (None without a direct figure).
/// Paired this way, a drift of the machine between rounds cancels out of the ratio.
fn paired(results: &Results, target: Target, key: &str) -> Option<(f64, Option<f64>)> {
    let mine: Vec<(usize, f64)> = results
        .iter()
        .filter(|((t, k, _), _)| *t == target && *k == key)
        .map(|((_, _, round), v)| (*round, *v))
        .collect();
    if mine.is_empty() {
        return None;
    }
    let ratios: Vec<f64> = mine
        .iter()
        .filter_map(|(round, v)| {
            let d = results.get(&(Target::Direct, key, *round))?;
            (*d > 0.0).then(|| v / d)
        })
        .collect();
    let values: Vec<f64> = mine.iter().map(|(_, v)| *v).collect();
    Some((
        median(&values),
        (!ratios.is_empty()).then(|| median(&ratios)),
    ))
}
