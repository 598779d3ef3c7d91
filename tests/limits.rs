//! Connection limits and tunnel timeouts on loopback: per-section and per-IP caps, the
//! WebSocket 503 with Retry-After, idle timeouts and maximum connection age.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use portcullis::{Config, TcpProxy, WsProxy};

fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = stream.try_clone().unwrap();
                let mut w = stream;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

fn serve(toml: &str) -> SocketAddr {
    let config = Config::parse(toml, "test").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        smol::block_on(async {
            let listener = async_net::TcpListener::try_from(listener).unwrap();
            let stop = futures_lite::future::pending();
            let _ = match (
                config.tcp_proxy.into_iter().next(),
                config.ws_proxy.into_iter().next(),
            ) {
                (Some(t), _) => TcpProxy::from_section(t).serve(listener, stop).await,
                (_, Some(w)) => WsProxy::from_section(w).serve(listener, stop).await,
                _ => unreachable!(),
            };
        })
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Whether the proxy keeps relaying on `s`.
fn relays(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut got = [0u8; 4];
    s.read_exact(&mut got).is_ok() && &got == b"ping"
}

#[test]
fn a_tcp_section_at_max_connections_closes_the_next_client_at_once() {
    let proxy = serve(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\nbackends = [\"{}\"]\n",
        echo_backend()
    ));
    let (mut a, mut b) = (connect(proxy), connect(proxy));
    assert!(relays(&mut a) && relays(&mut b));
    let mut c = connect(proxy);
    let started = Instant::now();
    let mut buf = [0u8; 1];
    assert!(
        matches!(c.read(&mut buf), Ok(0) | Err(_)),
        "the third is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    let mut d = connect(proxy);
    assert!(relays(&mut d), "a freed place serves again");
    assert!(relays(&mut b));
}

#[test]
fn a_websocket_client_over_its_ip_limit_gets_503_with_retry_after() {
    // A backend that completes nothing: the first client's upgrade stays pending, holding its place.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let held: Vec<TcpStream> = silent.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let proxy = serve(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nmax_connections_per_ip = 1\nupgrade_timeout_ms = 5000\n\
         backends = [\"{backend}\"]\n"
    ));
    let upgrade = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut first = connect(proxy);
    first.write_all(upgrade.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut second = connect(proxy);
    second.write_all(upgrade.as_bytes()).unwrap();
    second.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    second.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
}

#[test]
fn an_idle_tunnel_is_closed_after_idle_timeout_ms_and_a_busy_one_is_not() {
    let proxy = serve(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nidle_timeout_ms = 300\nbackends = [\"{}\"]\n",
        echo_backend()
    ));
    let (mut idle, mut busy) = (connect(proxy), connect(proxy));
    assert!(relays(&mut idle));
    let started = Instant::now();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(50));
        assert!(relays(&mut busy), "a tunnel with traffic stays open");
    }
    let mut buf = [0u8; 1];
    assert!(
        matches!(idle.read(&mut buf), Ok(0) | Err(_)),
        "the idle tunnel was closed"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn a_tunnel_is_closed_at_max_connection_age_within_its_jitter() {
    let proxy = serve(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nmax_connection_age_ms = 400\nbackends = [\"{}\"]\n",
        echo_backend()
    ));
    let mut s = connect(proxy);
    let started = Instant::now();
    assert!(relays(&mut s));
    let mut buf = [0u8; 1];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(340) && lived < Duration::from_millis(1000),
        "{lived:?}"
    );
}

/// A WebSocket backend that answers every upgrade and reports the X-Forwarded-For it saw.
fn xff_backend() -> (SocketAddr, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut s = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut byte).is_ok() {
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let header = |name: &str| {
                    text.lines()
                        .find_map(|l| {
                            l.strip_prefix(&format!("{name}: "))
                                .map(|v| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let _ = tx.send(header("x-forwarded-for"));
                // Base64 is case-sensitive: the key comes from the head as sent.
                let raw = String::from_utf8_lossy(&head).to_string();
                let key = raw
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("sec-websocket-key:"))
                    .map(|l| l[18..].trim().to_string())
                    .unwrap_or_default();
                let _ = write!(
                    s,
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {}\r\n\r\n",
                    portcullis::handshake::accept_key(&key)
                );
                std::thread::sleep(Duration::from_millis(200));
            });
        }
    });
    (addr, rx)
}

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn behind_a_trusted_balancer_the_proxy_header_gives_the_client_address_v1_and_v2() {
    let (backend, seen) = xff_backend();
    let proxy = serve(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n\
         trusted_proxies = [\"127.0.0.0/8\"]\nbackends = [\"{backend}\"]\n"
    ));
    let client: SocketAddr = "203.0.113.7:5555".parse().unwrap();
    let dest: SocketAddr = "10.0.0.1:80".parse().unwrap();
    for version in [
        portcullis::proxy_protocol::Version::V1,
        portcullis::proxy_protocol::Version::V2,
    ] {
        let mut s = connect(proxy);
        let mut first = portcullis::proxy_protocol::encode(version, client, dest);
        first.extend_from_slice(UPGRADE.as_bytes());
        s.write_all(&first).unwrap();
        let mut status = [0u8; 12];
        s.read_exact(&mut status).unwrap();
        assert_eq!(&status, b"HTTP/1.1 101", "{version:?}");
        assert_eq!(
            seen.recv_timeout(Duration::from_secs(5)).unwrap(),
            "203.0.113.7",
            "{version:?}"
        );
    }
}

#[test]
fn a_tcp_stream_behind_a_proxy_header_reaches_the_backend_without_it() {
    let proxy = serve(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n\
         trusted_proxies = [\"127.0.0.1\"]\nbackends = [\"{}\"]\n",
        echo_backend()
    ));
    let mut s = connect(proxy);
    s.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nhello after the header")
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello after the header");
}

#[test]
fn untrusted_peers_and_malformed_headers_are_closed() {
    let backend = echo_backend();
    let untrusted = serve(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n\
         trusted_proxies = [\"10.0.0.0/8\"]\nbackends = [\"{backend}\"]\n"
    ));
    let trusted = serve(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\naccept_proxy_protocol = true\n\
         trusted_proxies = [\"127.0.0.0/8\"]\nbackends = [\"{backend}\"]\n"
    ));
    for (proxy, first) in [
        (
            untrusted,
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nhi"[..],
        ),
        (trusted, &b"GET / HTTP/1.1\r\n\r\n"[..]),
        (trusted, &b"PROXY TCP4 999.0.113.7 10.0.0.1 5555 80\r\n"[..]),
    ] {
        let mut s = connect(proxy);
        let _ = s.write_all(first);
        let mut buf = [0u8; 64];
        assert!(
            matches!(s.read(&mut buf), Ok(0) | Err(_)),
            "{:?} must be closed",
            String::from_utf8_lossy(first)
        );
    }
}
