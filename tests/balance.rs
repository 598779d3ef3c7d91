//! Backend pools on loopback: failover, ejection, backups, stickiness, least connections and
//! connection caps, through the proxy as configured from TOML.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portcullis::{Config, TcpProxy, WsProxy};

/// An echo backend on its own threads, counting the connections it accepted and holds open.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Echo {
    fn start() -> Echo {
        Echo::on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn on(listener: TcpListener) -> Echo {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (a, o) = (accepted.clone(), open.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                a.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                o.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut r = stream.try_clone().unwrap();
                    let mut w = stream;
                    let _ = std::io::copy(&mut r, &mut w);
                    let _ = w.shutdown(Shutdown::Write);
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Echo {
            addr,
            accepted,
            open,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// An address nothing listens on: the local port of a connection this test keeps open, so no
/// other test's listener can be given it.
struct Refused {
    addr: SocketAddr,
    _hold: (TcpStream, TcpStream),
}

impl Refused {
    fn new() -> Refused {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        Refused {
            addr: c.local_addr().unwrap(),
            _hold: (c, s),
        }
    }
}

/// Runs `proxy` on its own thread until the test ends; returns its address.
fn serve_tcp(toml: &str) -> SocketAddr {
    let section = Config::parse(toml, "test").unwrap().tcp_proxy.remove(0);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        smol::block_on(async {
            let listener = async_net::TcpListener::try_from(listener).unwrap();
            let _ = TcpProxy::from_section(section)
                .serve(listener, futures_lite::future::pending())
                .await;
        })
    });
    addr
}

fn serve_ws(toml: &str) -> SocketAddr {
    let section = Config::parse(toml, "test").unwrap().ws_proxy.remove(0);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        smol::block_on(async {
            let listener = async_net::TcpListener::try_from(listener).unwrap();
            let _ = WsProxy::from_section(section)
                .serve(listener, futures_lite::future::pending())
                .await;
        })
    });
    addr
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// One echo through the proxy; `Err` when the connection ended without the echo.
fn echo(addr: SocketAddr, msg: &[u8]) -> Result<(), String> {
    let mut s = connect(addr);
    s.write_all(msg).map_err(|e| e.to_string())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| e.to_string())?;
    if got == msg {
        Ok(())
    } else {
        Err(format!("got {} of {} bytes", got.len(), msg.len()))
    }
}

fn status_of(addr: SocketAddr, request: &str) -> u16 {
    let mut s = connect(addr);
    s.write_all(request.as_bytes()).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn failover_around_a_dead_backend_fails_no_client_over_500_connections() {
    let (a, b) = (Echo::start(), Echo::start());
    let dead = Refused::new();
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\", \"{}\", \"{}\"]\n",
        a.addr, dead.addr, b.addr
    ));
    let failures: Vec<String> = (0..500)
        .filter_map(|i| echo(proxy, format!("connection {i}").as_bytes()).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(a.accepted() + b.accepted(), 500);
    // Ejected after 3 failures, so the survivors share the load evenly.
    assert!(
        a.accepted().abs_diff(b.accepted()) <= 4,
        "{} / {}",
        a.accepted(),
        b.accepted()
    );
}

#[test]
fn a_backup_takes_over_while_the_primary_is_down_and_gives_back_when_it_returns() {
    let backup = Echo::start();
    // The primary's port: reserved now, listened on later.
    let reserved = TcpListener::bind("127.0.0.1:0").unwrap();
    let primary_addr = reserved.local_addr().unwrap();
    drop(reserved);
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nmax_fails = 1\nfail_timeout_ms = 200\n\
         backends = [\"{primary_addr}\", {{ address = \"{}\", backup = true }}]\n",
        backup.addr
    ));
    for i in 0..10 {
        echo(proxy, format!("while down {i}").as_bytes()).unwrap();
    }
    assert_eq!(backup.accepted(), 10);

    let primary =
        Echo::on(TcpListener::bind(primary_addr).expect("the primary's port is free again"));
    std::thread::sleep(Duration::from_millis(450));
    for i in 0..10 {
        echo(proxy, format!("after {i}").as_bytes()).unwrap();
    }
    assert_eq!(
        primary.accepted(),
        10,
        "the primary takes everything back after its trial"
    );
    assert_eq!(backup.accepted(), 10);
}

#[test]
fn hashing_the_client_ip_keeps_a_client_on_one_backend() {
    let backends = [Echo::start(), Echo::start(), Echo::start()];
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbalance = \"hash\"\nbackends = [\"{}\", \"{}\", \"{}\"]\n",
        backends[0].addr, backends[1].addr, backends[2].addr
    ));
    for i in 0..30 {
        echo(proxy, format!("sticky {i}").as_bytes()).unwrap();
    }
    let counts: Vec<usize> = backends.iter().map(Echo::accepted).collect();
    assert!(
        counts.contains(&30),
        "one client IP, one backend: {counts:?}"
    );
}

#[test]
fn least_connections_sends_new_connections_away_from_busy_backends() {
    let (a, b) = (Echo::start(), Echo::start());
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbalance = \"least_connections\"\nbackends = [\"{}\", \"{}\"]\n",
        a.addr, b.addr
    ));
    // Ten long-lived connections, each confirmed established before the next.
    let mut held = Vec::new();
    for i in 0..10 {
        let mut s = connect(proxy);
        s.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
        held.push(s);
        let _ = i;
    }
    let (na, nb) = (a.open.load(Ordering::SeqCst), b.open.load(Ordering::SeqCst));
    assert_eq!(
        (na, nb),
        (5, 5),
        "long-lived connections are spread by count"
    );
}

#[test]
fn a_backend_at_max_connections_is_skipped() {
    let (small, big) = (Echo::start(), Echo::start());
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\n\
         backends = [{{ address = \"{}\", max_connections = 2 }}, \"{}\"]\n",
        small.addr, big.addr
    ));
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = connect(proxy);
        s.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
        held.push(s);
    }
    assert_eq!(small.open.load(Ordering::SeqCst), 2);
    assert_eq!(big.open.load(Ordering::SeqCst), 8);
}

#[test]
fn a_websocket_client_gets_503_when_no_backend_can_take_it() {
    // A backend that accepts and never answers, capped at one connection: the first client
    // holds the only place while its upgrade is pending, so the second finds nothing eligible.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let held: Vec<TcpStream> = silent.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let proxy = serve_ws(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nupgrade_timeout_ms = 3000\n\
         backends = [{{ address = \"{addr}\", max_connections = 1 }}]\n"
    ));
    let mut first = connect(proxy);
    first.write_all(UPGRADE.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(status_of(proxy, UPGRADE), 503, "the only backend is full");
}

#[test]
fn an_ejected_only_backend_is_still_tried_rather_than_refusing_everyone() {
    let dead = Refused::new();
    let proxy = serve_ws(&format!(
        "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nmax_fails = 1\nfail_timeout_ms = 60000\nbackends = [\"{}\"]\n",
        dead.addr
    ));
    assert_eq!(status_of(proxy, UPGRADE), 502, "the connect is refused");
    assert_eq!(
        status_of(proxy, UPGRADE),
        502,
        "ejected, but the only one: tried anyway"
    );
}

#[test]
fn weighted_round_robin_gives_each_backend_its_share() {
    let backends = [Echo::start(), Echo::start(), Echo::start()];
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [{{ address = \"{}\", weight = 5 }}, \"{}\", \"{}\"]\n",
        backends[0].addr, backends[1].addr, backends[2].addr
    ));
    for i in 0..70 {
        echo(proxy, format!("w {i}").as_bytes()).unwrap();
    }
    let counts: Vec<usize> = backends.iter().map(Echo::accepted).collect();
    assert_eq!(counts, [50, 10, 10]);
}

/// A backend that answers `GET /health` with 200 or 503 as `healthy` says and echoes anything
/// else, counting the echo connections.
struct Checked {
    addr: SocketAddr,
    healthy: Arc<std::sync::atomic::AtomicBool>,
    echoed: Arc<AtomicUsize>,
}

impl Checked {
    fn start() -> Checked {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let echoed = Arc::new(AtomicUsize::new(0));
        let (h, e) = (healthy.clone(), echoed.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (h, e) = (h.clone(), e.clone());
                std::thread::spawn(move || {
                    let mut s = stream;
                    let mut first = [0u8; 11];
                    if s.read_exact(&mut first).is_err() {
                        return;
                    }
                    if &first == b"GET /health" {
                        let status = if h.load(Ordering::SeqCst) {
                            "200 OK"
                        } else {
                            "503 Unavailable"
                        };
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        return;
                    }
                    e.fetch_add(1, Ordering::SeqCst);
                    let _ = s.write_all(&first);
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        Checked {
            addr,
            healthy,
            echoed,
        }
    }
}

#[test]
fn an_active_http_check_takes_a_backend_out_and_brings_it_back() {
    let (a, b) = (Checked::start(), Checked::start());
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\", \"{}\"]\n\n\
         [tcp_proxy.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval_ms = 30\ntimeout_ms = 500\n\
         healthy_threshold = 2\nunhealthy_threshold = 2\n",
        a.addr, b.addr
    ));
    let send = |n: usize| {
        for i in 0..n {
            echo(proxy, format!("message number {i}").as_bytes()).unwrap();
        }
    };
    send(10);
    assert_eq!(
        (
            a.echoed.load(Ordering::SeqCst),
            b.echoed.load(Ordering::SeqCst)
        ),
        (5, 5)
    );

    a.healthy.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    send(10);
    assert_eq!(
        a.echoed.load(Ordering::SeqCst),
        5,
        "a failing check takes the backend out"
    );
    assert_eq!(b.echoed.load(Ordering::SeqCst), 15);

    a.healthy.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    send(10);
    assert_eq!(
        a.echoed.load(Ordering::SeqCst),
        10,
        "passing checks bring it back"
    );
}

/// A backend that reads a PROXY header, reports the addresses it carried, then echoes.
fn proxy_protocol_backend() -> (
    SocketAddr,
    std::sync::mpsc::Receiver<(SocketAddr, SocketAddr, Vec<u8>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let tx = tx.clone();
            std::thread::spawn(move || {
                smol::block_on(async {
                    let mut s = async_net::TcpStream::try_from(stream).unwrap();
                    let (addrs, rest) = portcullis::proxy_protocol::read_header(&mut s)
                        .await
                        .expect("a PROXY header");
                    let (src, dst) = addrs.expect("addresses");
                    // What followed the header in the same read: the first bytes of the stream.
                    let _ = tx.send((src, dst, rest.clone()));
                    use futures_lite::AsyncWriteExt;
                    let _ = s.write_all(&rest).await;
                    let mut r = s.clone();
                    let _ = futures_lite::io::copy(&mut r, &mut s).await;
                    let _ = s.close().await;
                })
            });
        }
    });
    (addr, rx)
}

#[test]
fn tcp_backends_learn_the_client_address_by_proxy_protocol_v1_and_v2() {
    for version in ["v1", "v2"] {
        let (backend, seen) = proxy_protocol_backend();
        let proxy = serve_tcp(&format!(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nsend_proxy_protocol = \"{version}\"\nbackends = [\"{backend}\"]\n"
        ));
        let mut s = connect(proxy);
        let client = s.local_addr().unwrap();
        s.write_all(b"after the header").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(
            got, b"after the header",
            "{version}: the stream passes unchanged"
        );
        let (src, dst, _) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((src, dst), (client, proxy), "{version}");
    }
}

#[test]
fn websocket_backends_get_the_proxy_header_before_the_request() {
    for version in ["v1", "v2"] {
        let (backend, seen) = proxy_protocol_backend();
        let proxy = serve_ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nupgrade_timeout_ms = 300\n\
             send_proxy_protocol = \"{version}\"\nbackends = [\"{backend}\"]\n"
        ));
        let mut s = connect(proxy);
        let client = s.local_addr().unwrap();
        s.write_all(UPGRADE.as_bytes()).unwrap();
        let (src, dst, rest) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((src, dst), (client, proxy), "{version}");
        assert!(
            rest.starts_with(b"GET / HTTP/1.1\r\n"),
            "{version}: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

#[test]
fn a_backend_named_by_host_is_resolved_and_every_address_that_answers_serves() {
    // localhost resolves to 127.0.0.1 and, on most machines, ::1 as well; the echo listens on
    // 127.0.0.1 only, so an address that refuses must be passed over within the same attempt.
    let backend = Echo::start();
    let proxy = serve_tcp(&format!(
        "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nresolve_interval_ms = 50\nbackends = [\"localhost:{}\"]\n",
        backend.addr.port()
    ));
    for i in 0..20 {
        echo(proxy, format!("by name {i}").as_bytes()).unwrap();
        if i == 9 {
            // Let the resolver's first refresh land: the second half goes by address.
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    assert_eq!(backend.accepted(), 20);
}

/// A WebSocket backend that completes every upgrade by hand and counts them.
fn upgrading_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut s = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut byte).is_ok() {
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let key = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("sec-websocket-key: ")
                            .or_else(|| l.strip_prefix("Sec-WebSocket-Key: "))
                    })
                    .unwrap_or("")
                    .trim()
                    .to_string();
                c.fetch_add(1, Ordering::SeqCst);
                let _ = write!(
                    s,
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {}\r\n\r\n",
                    portcullis::handshake::accept_key(&key)
                );
            });
        }
    });
    (addr, count)
}

#[test]
fn websocket_hash_keys_keep_a_room_a_cookie_or_a_header_on_one_backend() {
    type Request = fn(&str) -> String;
    let cases: [(&str, Request); 3] = [
        ("query:room", |v| {
            format!("GET /chat?user=x&room={v} HTTP/1.1\r\nHost: x\r\n")
        }),
        ("cookie:session", |v| {
            format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: theme=dark; session={v}\r\n")
        }),
        ("header:x-tenant", |v| {
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Tenant: {v}\r\n")
        }),
    ];
    for (key, request) in cases {
        let (b1, n1) = upgrading_backend();
        let (b2, n2) = upgrading_backend();
        let proxy = serve_ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbalance = \"hash\"\nhash_key = \"{key}\"\n\
             backends = [\"{b1}\", \"{b2}\"]\n"
        ));
        let upgrade = |value: &str| {
            request(value)
                + "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        };
        // One value, many connections (from one client IP): always the same backend.
        for _ in 0..10 {
            assert_eq!(status_of(proxy, &upgrade("alpha")), 101, "{key}");
        }
        let (a1, a2) = (n1.load(Ordering::SeqCst), n2.load(Ordering::SeqCst));
        assert!(
            (a1, a2) == (10, 0) || (a1, a2) == (0, 10),
            "{key}: one value, one backend: {a1}/{a2}"
        );
        // Many values from the same client IP: both backends get some.
        for i in 0..40 {
            assert_eq!(
                status_of(proxy, &upgrade(&format!("value-{i}"))),
                101,
                "{key}"
            );
        }
        let (b1n, b2n) = (
            n1.load(Ordering::SeqCst) - a1,
            n2.load(Ordering::SeqCst) - a2,
        );
        assert!(
            b1n >= 8 && b2n >= 8,
            "{key}: the key, not the IP, decides: {b1n}/{b2n}"
        );
    }
}

/// A backend that requires a PROXY header on every connection, as one behind a proxy with
/// `send_proxy_protocol` may: health probes (a header with no addresses: `UNKNOWN`, `LOCAL`)
/// are answered 200, client connections are echoed, anything without a header gets 400.
struct ProxyOnly {
    addr: SocketAddr,
    probes: Arc<AtomicUsize>,
    rejected: Arc<AtomicUsize>,
}

impl ProxyOnly {
    fn start() -> ProxyOnly {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (probes, rejected) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (p, r) = (probes.clone(), rejected.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (p, r) = (p.clone(), r.clone());
                std::thread::spawn(move || {
                    smol::block_on(async {
                        use futures_lite::{AsyncReadExt, AsyncWriteExt};
                        let mut s = async_net::TcpStream::try_from(stream).unwrap();
                        match portcullis::proxy_protocol::read_header(&mut s).await {
                            Err(_) => {
                                r.fetch_add(1, Ordering::SeqCst);
                                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
                            }
                            Ok((None, mut head)) => {
                                let mut buf = [0u8; 1024];
                                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                                    match s.read(&mut buf).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => head.extend_from_slice(&buf[..n]),
                                    }
                                }
                                if head.starts_with(b"GET /health ") {
                                    p.fetch_add(1, Ordering::SeqCst);
                                    let _ = s
                                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                                        .await;
                                }
                            }
                            Ok((Some(_), rest)) => {
                                let _ = s.write_all(&rest).await;
                                let mut r = s.clone();
                                let _ = futures_lite::io::copy(&mut r, &mut s).await;
                            }
                        }
                        let _ = s.close().await;
                    })
                });
            }
        });
        ProxyOnly {
            addr,
            probes,
            rejected,
        }
    }
}

#[test]
fn health_checks_send_a_proxy_header_to_backends_that_require_one() {
    let check =
        "interval_ms = 30\ntimeout_ms = 500\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";
    type Serve = fn(&str) -> SocketAddr;
    let kinds: [(&str, Serve); 2] = [("tcp_proxy", serve_tcp), ("ws_proxy", serve_ws)];
    for version in ["v1", "v2"] {
        for (section, serve) in kinds {
            let backend = ProxyOnly::start();
            let proxy = serve(&format!(
                "[[{section}]]\nlisten = \"127.0.0.1:0\"\nsend_proxy_protocol = \"{version}\"\n\
                 backends = [\"{}\"]\n\n[{section}.health_check]\nkind = \"http\"\npath = \"/health\"\n{check}",
                backend.addr
            ));
            std::thread::sleep(Duration::from_millis(300));
            let probes = backend.probes.load(Ordering::SeqCst);
            assert!(probes >= 3, "{section} {version}: {probes} probes passed");
            assert_eq!(
                backend.rejected.load(Ordering::SeqCst),
                0,
                "{section} {version}"
            );
            if section == "tcp_proxy" {
                // Failing probes would have taken the only backend out by now.
                echo(proxy, b"still served").unwrap();
            }
        }
    }
}
