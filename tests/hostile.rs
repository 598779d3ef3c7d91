//! Hostile clients against the real WebSocket proxy on loopback: slowloris, a flood beyond
//! `max_connections`, request-smuggling shapes, and a client that never reads. Whatever one peer
//! does, the proxy must keep serving everyone else, stay within bounded memory and never pass a
//! doubtful request on.
//!
//! The proxy runs in this process, on a thread of its own (`WsProxy::serve` under
//! `smol::block_on`), so `/proc/self/statm` measures its memory. Backends are hand-written on std
//! threads so that they can count what reaches them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use smol::Timer;

use portcullis::handshake::accept_key;
use portcullis::{Config, WsProxy};

/// The `Sec-WebSocket-Key` of every request here (RFC 6455 §1.3's example).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A valid upgrade request.
const UPGRADE: &str = "GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Sec-WebSocket-Version: 13\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// Harness.
// ---------------------------------------------------------------------------------------------

/// The tests of this file run one at a time: they measure the process's memory and open a
/// thousand sockets, which tests running alongside would disturb.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves the single `[[ws_proxy]]` section of `toml` (whose `listen` is ignored: the proxy
/// gets a listener on `127.0.0.1:0`) on a thread of its own, for the rest of the process.
fn serve(toml: &str) -> SocketAddr {
    let mut config = Config::parse(toml, "hostile.toml").expect("a valid test config");
    let section = config.ws_proxy.remove(0);
    let listener = listen_deep();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        smol::block_on(async {
            let listener = async_net::TcpListener::try_from(listener).unwrap();
            let _ = WsProxy::from_section(section)
                .drain_timeout_ms(100)
                .serve(listener, future::pending())
                .await;
        })
    });
    addr
}

/// A listener on `127.0.0.1:0` with the backlog a proxy asks for (as
/// `SmolNet::bind_reuse_port` does), not std's 128: a flood of SYNs beyond that would wait for
/// the client's SYN retransmits (1 s, 2 s, 4 s), which measures the kernel, not the proxy.
fn listen_deep() -> TcpListener {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    rustix::net::bind(&fd, &any).unwrap();
    rustix::net::listen(&fd, 4096).unwrap();
    TcpListener::from(fd)
}

/// What a backend does with a tunnel once it has answered 101.
#[derive(Clone, Copy)]
enum Tunnel {
    /// Echo every byte back until the proxy closes.
    Echo,
    /// Count what arrives in `received`, and write 64 KiB blocks as fast as the proxy takes them,
    /// adding each to `sent`, until the connection fails.
    Stream,
}

/// A WebSocket backend on std threads: answers every upgrade with a valid 101, then does
/// `tunnel`. Counts the connections that reach it.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

fn backend(tunnel: Tunnel) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let (a, s, r) = (accepted.clone(), sent.clone(), received.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            a.fetch_add(1, Ordering::SeqCst);
            let (s, r) = (s.clone(), r.clone());
            std::thread::spawn(move || serve_backend(stream, tunnel, s, r));
        }
    });
    Backend {
        addr,
        accepted,
        sent,
        received,
    }
}

fn serve_backend(
    mut stream: TcpStream,
    tunnel: Tunnel,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
) {
    let Ok((head, rest)) = read_head(&mut stream) else {
        return;
    };
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    if stream.write_all(answer.as_bytes()).is_err() {
        return;
    }
    match tunnel {
        Tunnel::Echo => {
            let _ = stream.write_all(&rest);
            let mut r = stream.try_clone().unwrap();
            let _ = std::io::copy(&mut r, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        }
        Tunnel::Stream => {
            received.fetch_add(rest.len() as u64, Ordering::SeqCst);
            let mut r = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n @ 1..) = r.read(&mut buf) {
                    received.fetch_add(n as u64, Ordering::SeqCst);
                }
            });
            let block = vec![0x5a; 64 * 1024];
            while stream.write_all(&block).is_ok() {
                sent.fetch_add(block.len() as u64, Ordering::SeqCst);
            }
        }
    }
}

/// Reads an HTTP head (up to the blank line) and whatever came after it in the same reads.
fn read_head(stream: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
    }
}

/// A client's upgrade through the proxy; panics unless it gets the backend's valid 101.
fn handshake(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(UPGRADE.as_bytes()).unwrap();
    let (head, rest) = read_head(&mut s).expect("an answer to the upgrade");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains(&accept_key(KEY)), "{head}");
    // Only a streaming backend sends anything right behind its 101.
    let _ = rest;
    s
}

/// Sends `request` and reads the whole answer until the proxy closes.
fn answer_to(proxy: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A refusal may come before all of a large request is written; that is fine.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .expect("a clean close after the answer, not a reset");
    String::from_utf8_lossy(&answer).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

/// Whether `s`, a tunnel to an echo backend, still carries bytes both ways.
fn echoes(s: &mut TcpStream) -> bool {
    let mut got = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut got).is_ok() && &got == b"ping"
}

/// The process's resident memory, from `/proc/self/statm`.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

// ---------------------------------------------------------------------------------------------
// Slowloris.
// ---------------------------------------------------------------------------------------------

/// The slow clients' read timeout: short, to keep the test quick, yet several seconds of one
/// byte each.
const READ_TIMEOUT: Duration = Duration::from_millis(2000);

/// One slowloris client: sends a head one byte per second, never finishing it, and reads until
/// the proxy closes. Returns how long after connecting that close came, and what it said.
async fn slowloris(proxy: SocketAddr, closed: Arc<AtomicUsize>) -> (Duration, Vec<u8>) {
    // Timed from before the connect: the proxy's clock starts at its accept, which the task may
    // only learn of later, with a thousand others to poll.
    let started = Instant::now();
    let stream = async_net::TcpStream::connect(proxy).await.unwrap();
    let mut writer = stream.clone();
    let mut reader = stream;
    let trickle = async move {
        for byte in UPGRADE.bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            Timer::after(Duration::from_secs(1)).await;
        }
        future::pending().await
    };
    let read = async move {
        let mut answer = Vec::new();
        let _ = reader.read_to_end(&mut answer).await;
        closed.fetch_add(1, Ordering::SeqCst);
        (started.elapsed(), answer)
    };
    future::or(read, trickle).await
}

#[test]
fn slowloris_clients_do_not_stop_a_normal_client_and_are_closed_at_the_read_timeout() {
    let _serial = serial();
    const SLOW: usize = 1000;
    const NORMAL: usize = 100;
    let backend = backend(Tunnel::Echo);
    let proxy = serve(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nread_timeout_ms = {}\nbackends = [\"{}\"]\n",
        READ_TIMEOUT.as_millis(),
        backend.addr
    ));

    let closed = Arc::new(AtomicUsize::new(0));
    let (connected_tx, connected) = mpsc::channel();
    let slow = {
        let closed = closed.clone();
        std::thread::spawn(move || {
            let ex = smol::LocalExecutor::new();
            smol::block_on(ex.run(async {
                let tasks: Vec<_> = (0..SLOW)
                    .map(|_| ex.spawn(slowloris(proxy, closed.clone())))
                    .collect();
                // Each has connected and sent its first byte once they have all been polled a
                // little: give the connects a moment.
                Timer::after(Duration::from_millis(300)).await;
                connected_tx.send(Instant::now()).unwrap();
                let mut results = Vec::new();
                for t in tasks {
                    results.push(t.await);
                }
                results
            }))
        })
    };

    let started = connected.recv().unwrap();
    for _ in 0..NORMAL {
        let mut s = handshake(proxy);
        assert!(echoes(&mut s));
    }
    let normal_took = started.elapsed();
    let closed_meanwhile = closed.load(Ordering::SeqCst);
    eprintln!(
        "{NORMAL} handshakes (each with an echo) in {normal_took:?} while {SLOW} slowloris \
         clients were open ({closed_meanwhile} of them closed by then)"
    );
    assert_eq!(
        closed_meanwhile, 0,
        "the normal client finished while every slow one was still open"
    );
    assert_eq!(backend.accepted.load(Ordering::SeqCst), NORMAL);

    let results = slow.join().unwrap();
    let (min, max) = results
        .iter()
        .fold((Duration::MAX, Duration::ZERO), |(lo, hi), (d, _)| {
            (lo.min(*d), hi.max(*d))
        });
    eprintln!("{SLOW} slow clients closed between {min:?} and {max:?} after connecting");
    for (took, answer) in &results {
        let answer = String::from_utf8_lossy(answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
        assert!(
            *took >= READ_TIMEOUT - Duration::from_millis(100),
            "closed after {took:?}, before the read timeout"
        );
        assert!(
            *took < READ_TIMEOUT + Duration::from_millis(1500),
            "closed after {took:?}, long after the read timeout"
        );
    }
    // None of them reached a backend.
    assert_eq!(backend.accepted.load(Ordering::SeqCst), NORMAL);
}

// ---------------------------------------------------------------------------------------------
// A flood beyond max_connections.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_flood_beyond_max_connections_gets_503_and_the_proxy_recovers() {
    const MAX: usize = 20;
    const FLOOD: usize = 500;
    let backend = backend(Tunnel::Echo);
    let proxy = serve(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nmax_connections = {MAX}\nbackends = [\"{}\"]\n",
        backend.addr
    ));
    let mut held: Vec<TcpStream> = (0..MAX).map(|_| handshake(proxy)).collect();

    // The flood, all at once: half send an upgrade, half send nothing at all.
    let started = Instant::now();
    let answers: Vec<Result<Vec<u8>, String>> = smol::block_on(async {
        let ex = smol::LocalExecutor::new();
        ex.run(async {
            let tasks: Vec<_> = (0..FLOOD)
                .map(|i| {
                    ex.spawn(async move {
                        let mut s = async_net::TcpStream::connect(proxy)
                            .await
                            .map_err(|e| format!("connect: {e}"))?;
                        if i % 2 == 0 {
                            s.write_all(UPGRADE.as_bytes())
                                .await
                                .map_err(|e| format!("write: {e}"))?;
                        }
                        let mut answer = Vec::new();
                        let read = future::or(
                            async { s.read_to_end(&mut answer).await.map_err(|e| e.to_string()) },
                            async {
                                Timer::after(Duration::from_secs(5)).await;
                                Err("no close within 5 s".to_string())
                            },
                        );
                        read.await?;
                        Ok(answer)
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for t in tasks {
                answers.push(t.await);
            }
            answers
        })
        .await
    });
    let flood_took = started.elapsed();
    let refused = answers
        .iter()
        .filter(|a| {
            a.as_ref().is_ok_and(|a| {
                let a = String::from_utf8_lossy(a);
                a.starts_with("HTTP/1.1 503 ") && a.contains("\r\nRetry-After: 1\r\n")
            })
        })
        .count();
    eprintln!(
        "{refused} of {FLOOD} flood connections answered 503 with Retry-After in {flood_took:?}"
    );
    for a in &answers {
        let a = a.as_ref().expect("a clean answer and close");
        let a = String::from_utf8_lossy(a);
        assert!(a.starts_with("HTTP/1.1 503 "), "{a:?}");
        assert!(a.contains("\r\nRetry-After: 1\r\n"), "{a:?}");
    }
    assert_eq!(refused, FLOOD);
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        MAX,
        "the flood reached no backend"
    );

    // The tunnels that were admitted kept working through it.
    assert!(held.iter_mut().all(echoes));

    // Recovery: once the held tunnels end, their places serve new clients again.
    held.clear();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = Vec::new();
    while again.len() < MAX {
        let mut s = TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(UPGRADE.as_bytes()).unwrap();
        let (head, _) = read_head(&mut s).unwrap();
        if head.starts_with("HTTP/1.1 101 ") {
            assert!(echoes(&mut s));
            again.push(s);
        } else {
            // A held tunnel still being torn down: try again shortly.
            assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
            assert!(
                Instant::now() < deadline,
                "the proxy did not recover within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(
        status(&answer_to(proxy, UPGRADE.as_bytes())),
        503,
        "and the limit holds again"
    );
}

// ---------------------------------------------------------------------------------------------
// Request smuggling shapes.
// ---------------------------------------------------------------------------------------------

/// [`UPGRADE`] with `line` (CRLF added) after the request line.
fn with_line(line: &str) -> Vec<u8> {
    UPGRADE
        .replacen("\r\n", &format!("\r\n{line}\r\n"), 1)
        .into_bytes()
}

#[test]
fn request_smuggling_shapes_are_refused_and_never_reach_the_backend() {
    let _serial = serial();
    let backend = backend(Tunnel::Echo);
    let proxy = serve(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        backend.addr
    ));
    let many: Vec<String> = (0..=100).map(|i| format!("X-H{i}: v")).collect();
    let mut bad_name = with_line("X-Caf\u{e9}: v");
    let latin1 = bad_name.iter().position(|&b| b == 0xc3).unwrap();
    bad_name.splice(latin1..latin1 + 2, [0xe9]); // a Latin-1 byte rather than UTF-8
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("duplicate Host", with_line("Host: evil.example"), 400),
        (
            "duplicate Host, other case",
            with_line("host: example.com"),
            400,
        ),
        (
            "Content-Length with Transfer-Encoding",
            with_line("Content-Length: 5\r\nTransfer-Encoding: chunked"),
            400,
        ),
        (
            "Transfer-Encoding with Content-Length",
            with_line("Transfer-Encoding: chunked\r\nContent-Length: 0"),
            400,
        ),
        ("Content-Length alone", with_line("Content-Length: 0"), 400),
        (
            "Transfer-Encoding alone",
            with_line("Transfer-Encoding: chunked"),
            400,
        ),
        (
            "obsolete line folding, space",
            with_line("X-Folded: a\r\n b"),
            400,
        ),
        (
            "obsolete line folding, tab",
            with_line("X-Folded: a\r\n\tb"),
            400,
        ),
        (
            "folded Host",
            with_line("X-A: a\r\n Host: evil.example"),
            400,
        ),
        ("NUL in a value", with_line("X-Nul: a\0b"), 400),
        ("NUL in a name", with_line("X-N\0ul: b"), 400),
        ("bare CR in a value", with_line("X-Cr: a\rb"), 400),
        (
            "bare CR ending a line",
            with_line("X-Cr: a\rHost: evil.example"),
            400,
        ),
        (
            "bare LF ending a line",
            with_line("X-Lf: a\nHost: evil.example"),
            400,
        ),
        ("non-ASCII name, UTF-8", with_line("X-Caf\u{e9}: v"), 400),
        ("non-ASCII name, Latin-1", bad_name, 400),
        (
            "space before the colon",
            with_line("Host : evil.example"),
            400,
        ),
        (
            "absolute-form target",
            UPGRADE
                .replacen("GET /chat", "GET http://evil.example/chat", 1)
                .into_bytes(),
            400,
        ),
        (
            "over-long header line",
            with_line(&format!("X-Long: {}", "a".repeat(9000))),
            431,
        ),
        (
            "over-long request line",
            UPGRADE
                .replacen("/chat", &format!("/{}", "a".repeat(9000)), 1)
                .into_bytes(),
            431,
        ),
        ("more than 100 headers", with_line(&many.join("\r\n")), 431),
    ];
    let mut seen = Vec::new();
    for (name, request, want) in &cases {
        let answer = answer_to(proxy, request);
        let got = status(&answer);
        seen.push(format!("{name}: {got}"));
        assert_eq!(got, *want, "{name}: {answer:?}");
        assert!(
            answer.contains("\r\nConnection: close\r\n"),
            "{name}: {answer:?}"
        );
    }
    eprintln!("{}", seen.join("\n"));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        0,
        "a refused request reached the backend"
    );
    // The control: a clean upgrade through the same proxy does reach it.
    let mut s = handshake(proxy);
    assert!(echoes(&mut s));
    assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// A client that never reads.
// ---------------------------------------------------------------------------------------------

/// Waits until `counter` has not moved for a second (at most 10 s), and returns its value.
fn stalled(counter: &AtomicU64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = counter.load(Ordering::SeqCst);
    let mut still_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = counter.load(Ordering::SeqCst);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_secs(1) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the backend's writes never stalled: {now} bytes taken from it so far"
        );
    }
}

#[test]
fn a_client_that_never_reads_does_not_make_the_proxy_buffer_without_bound() {
    let _serial = serial();
    let backend = backend(Tunnel::Stream);
    let proxy = serve(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        backend.addr
    ));
    // Warm up (allocator arenas, the proxy's thread) before the baseline.
    drop(handshake(proxy));
    std::thread::sleep(Duration::from_millis(200));
    let before = resident_bytes();
    let sent_before = backend.sent.load(Ordering::SeqCst);

    // Never read from it: its receive window closes, the proxy's writes to it stop, and so must
    // its reads from the backend.
    let mut client = handshake(proxy);
    let taken = stalled(&backend.sent) - sent_before;

    // The other direction keeps working while this one is stalled.
    const UP: u64 = 4 << 20;
    let block = vec![0xa5u8; 16 * 1024];
    let received_before = backend.received.load(Ordering::SeqCst);
    let mut written = 0;
    while written < UP {
        client.write_all(&block).unwrap();
        written += block.len() as u64;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.received.load(Ordering::SeqCst) - received_before < UP {
        assert!(
            Instant::now() < deadline,
            "client-to-backend bytes stopped flowing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Stalled again (socket buffers may have grown meanwhile), and the proxy holds no more
    // than its buffers.
    let taken_after = stalled(&backend.sent) - sent_before;
    let after = resident_bytes();
    let growth = after.saturating_sub(before);
    eprintln!(
        "backend wrote {taken} bytes before stalling ({taken_after} after another {UP} bytes \
         went up); resident memory {before} -> {after} bytes (+{growth})"
    );
    assert!(
        taken_after < 64 << 20,
        "{taken_after} bytes taken from the backend"
    );
    assert!(growth < 16 << 20, "resident memory grew by {growth} bytes");
    drop(client);
}
