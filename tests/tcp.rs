//! The TCP flow on real loopback sockets: a client, the proxy (`TcpProxy::serve` on its own
//! thread) and small backends written here, all bound to `127.0.0.1:0`.
//!
//! Each test runs its backends on an executor of its own and fails, rather than hangs, once
//! [`TEST_LIMIT`] has passed.

use std::future::Future;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_net::{TcpListener, TcpStream};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use smol::channel::{Receiver, Sender};
use smol::{Executor, Task, Timer};

use portcullis::{Error, TcpProxy};

/// How long one test may take. Generous (a debug build moves 1 MiB in milliseconds), so only a
/// hang reaches it.
const TEST_LIMIT: Duration = Duration::from_secs(30);

/// The proxy's connect timeout. Longer than [`PROMPTLY`], so a client closed within that time
/// was closed because the backend refused, not because the timeout ran out.
const CONNECT_TIMEOUT_MS: u64 = 3_000;

/// How soon something that should happen "at once" (a refused backend closing the client, a
/// drained proxy returning) must have happened.
const PROMPTLY: Duration = Duration::from_secs(2);

/// How long a test waits to be sure something does *not* happen (a connection accepted after
/// shutdown). Loopback round trips take microseconds.
const QUIET: Duration = Duration::from_millis(300);

/// Runs one test on an executor of its own, which its backends spawn onto; panics after
/// [`TEST_LIMIT`].
fn run<F, Fut>(test: F)
where
    F: FnOnce(Arc<Executor<'static>>) -> Fut,
    Fut: Future<Output = ()>,
{
    let ex = Arc::new(Executor::new());
    let body = test(ex.clone());
    smol::block_on(ex.run(future::or(body, async {
        Timer::after(TEST_LIMIT).await;
        panic!("test did not finish within {TEST_LIMIT:?}");
    })));
}

/// `work`, or `None` if it has not finished within `d`.
async fn within<T>(d: Duration, work: impl Future<Output = T>) -> Option<T> {
    future::or(async { Some(work.await) }, async {
        Timer::after(d).await;
        None
    })
    .await
}

/// A proxy serving on its own thread until [`Proxy::stop`] or until it is dropped.
struct Proxy {
    addr: SocketAddr,
    stop: Option<Sender<()>>,
    /// What `serve` returned, once it has.
    done: Receiver<Result<(), Error>>,
}

impl Proxy {
    /// Serves a proxy over `backends` with this file's connect timeout.
    async fn start(backends: &[String]) -> Proxy {
        Proxy::serve(TcpProxy::new(backends.to_vec()).connect_timeout_ms(CONNECT_TIMEOUT_MS)).await
    }

    async fn serve(proxy: TcpProxy) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let (finished, done) = smol::channel::bounded(1);
        std::thread::spawn(move || {
            let result = smol::block_on(proxy.serve(listener, async move {
                let _ = stopped.recv().await;
            }));
            let _ = finished.send_blocking(result);
        });
        Proxy {
            addr,
            stop: Some(stop),
            done,
        }
    }

    /// Completes the shutdown future `serve` was given.
    fn stop(&mut self) {
        drop(self.stop.take());
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }
}

/// A backend listening on loopback that runs `serve` for each connection and counts them.
/// Dropping it stops accepting.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _accepting: Task<()>,
}

impl Backend {
    async fn start<F, Fut>(ex: &Arc<Executor<'static>>, serve: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let spawner = ex.clone();
        let accepting = ex.spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                spawner.spawn(serve(stream)).detach();
            }
        });
        Backend {
            addr,
            accepted,
            _accepting: accepting,
        }
    }

    /// Echoes every byte back, and closes its write side once the client has closed its own.
    async fn echo(ex: &Arc<Executor<'static>>) -> Backend {
        Backend::start(ex, |stream| async move {
            let _ = futures_lite::io::copy(stream.clone(), &mut stream.clone()).await;
            let _ = stream.shutdown(Shutdown::Write);
        })
        .await
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A loopback address that refuses connections for as long as this value lives.
///
/// A port that is bound and then released can be handed to the next `bind` to port 0, by another
/// test or another test process, which would then receive connections meant to be refused (seen
/// with eight copies of this file's tests running at once). So the port is instead the local end
/// of an open outgoing connection: nothing listens on it, so connecting to it is refused, and
/// while that connection exists no listener can be given the port.
struct Refused {
    addr: SocketAddr,
    _hold: (std::net::TcpListener, std::net::TcpStream),
}

impl Refused {
    fn new() -> Refused {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let outgoing = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        Refused {
            addr: outgoing.local_addr().unwrap(),
            _hold: (listener, outgoing),
        }
    }
}

fn addrs(addrs: &[SocketAddr]) -> Vec<String> {
    addrs.iter().map(SocketAddr::to_string).collect()
}

/// `len` bytes of a xorshift sequence: every byte value occurs and nothing repeats with a short
/// period, so a lost, doubled or reordered chunk cannot go unnoticed.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Compares byte strings, naming the first difference instead of printing megabytes.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!(
            "{what}: first difference at byte {i} of {} (got {:#04x}, want {:#04x})",
            want.len(),
            got[i],
            want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

/// Sends `msg` through the proxy, half-closes, and returns everything that came back before EOF.
async fn round_trip(proxy: &Proxy, msg: &[u8]) -> Vec<u8> {
    let mut client = proxy.connect().await;
    client.write_all(msg).await.unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    back
}

#[test]
fn one_mib_each_way_arrives_intact() {
    const MIB: usize = 1 << 20;
    run(|ex| async move {
        let up = pattern(1, MIB);
        let down = pattern(2, MIB);
        let (received, at_backend) = smol::channel::bounded(1);
        let to_client = down.clone();
        let backend = Backend::start(&ex, move |stream| {
            let (received, to_client) = (received.clone(), to_client.clone());
            async move {
                let mut reader = stream.clone();
                let mut writer = stream;
                let (got, ()) = future::zip(
                    async {
                        let mut got = Vec::new();
                        reader.read_to_end(&mut got).await.unwrap();
                        got
                    },
                    async {
                        writer.write_all(&to_client).await.unwrap();
                        writer.shutdown(Shutdown::Write).unwrap();
                    },
                )
                .await;
                received.send(got).await.unwrap();
            }
        })
        .await;
        let proxy = Proxy::start(&addrs(&[backend.addr])).await;

        let client = proxy.connect().await;
        let (mut reader, mut writer) = (client.clone(), client);
        let (got, ()) = future::zip(
            async {
                let mut got = Vec::new();
                reader.read_to_end(&mut got).await.unwrap();
                got
            },
            async {
                writer.write_all(&up).await.unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
            },
        )
        .await;

        assert_same(&got, &down, "backend to client");
        assert_same(&at_backend.recv().await.unwrap(), &up, "client to backend");
    });
}

#[test]
fn backend_still_replies_after_the_client_half_closes() {
    run(|ex| async move {
        let backend = Backend::start(&ex, |mut stream| async move {
            let mut request = Vec::new();
            stream.read_to_end(&mut request).await.unwrap();
            let mut reply = b"after EOF, got: ".to_vec();
            reply.extend_from_slice(&request);
            stream.write_all(&reply).await.unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
        })
        .await;
        let proxy = Proxy::start(&addrs(&[backend.addr])).await;

        // read_to_end returning is the EOF that must follow the reply.
        let reply = round_trip(&proxy, b"the whole request").await;
        assert_eq!(reply, b"after EOF, got: the whole request");
    });
}

#[test]
fn client_keeps_sending_after_the_backend_half_closes() {
    run(|ex| async move {
        let (received, at_backend) = smol::channel::bounded(1);
        let backend = Backend::start(&ex, move |mut stream| {
            let received = received.clone();
            async move {
                stream.write_all(b"banner").await.unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let mut got = Vec::new();
                stream.read_to_end(&mut got).await.unwrap();
                received.send(got).await.unwrap();
            }
        })
        .await;
        let proxy = Proxy::start(&addrs(&[backend.addr])).await;

        let mut client = proxy.connect().await;
        let mut banner = Vec::new();
        client.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner", "the backend's bytes, then its EOF");
        for part in [&b"still "[..], b"sending ", b"after your EOF"] {
            client.write_all(part).await.unwrap();
        }
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            at_backend.recv().await.unwrap(),
            b"still sending after your EOF"
        );
    });
}

#[test]
fn refused_backend_closes_the_client_promptly() {
    run(|_ex| async move {
        let down = Refused::new();
        let proxy = Proxy::start(&addrs(&[down.addr])).await;
        let mut client = proxy.connect().await;
        let started = Instant::now();
        let mut buf = [0; 16];
        let read = within(PROMPTLY, client.read(&mut buf))
            .await
            .unwrap_or_else(|| panic!("client still open after {PROMPTLY:?}"));
        // EOF or a reset: either way the client learns at once that there is no tunnel.
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "expected EOF or an error, got {read:?}"
        );
        assert!(started.elapsed() < PROMPTLY);
    });
}

#[test]
fn three_backends_share_300_sequential_connections_evenly() {
    run(|ex| async move {
        let backends = [
            Backend::echo(&ex).await,
            Backend::echo(&ex).await,
            Backend::echo(&ex).await,
        ];
        let proxy = Proxy::start(&addrs(&backends.each_ref().map(|b| b.addr))).await;
        for i in 0..300 {
            let msg = format!("connection {i}");
            assert_eq!(round_trip(&proxy, msg.as_bytes()).await, msg.as_bytes());
        }
        assert_eq!(backends.each_ref().map(Backend::accepted), [100, 100, 100]);
    });
}

#[test]
fn every_connection_succeeds_with_one_of_three_backends_down() {
    run(|ex| async move {
        let first = Backend::echo(&ex).await;
        let third = Backend::echo(&ex).await;
        let down = Refused::new();
        let proxy = Proxy::start(&addrs(&[first.addr, down.addr, third.addr])).await;
        for i in 0..30 {
            let msg = format!("connection {i}");
            assert_eq!(round_trip(&proxy, msg.as_bytes()).await, msg.as_bytes());
        }
        // The down backend's first turns fail over to the one after it in the list; after
        // max_fails (3) failures it is ejected and the other two share the rest evenly.
        let (a, c) = (first.accepted(), third.accepted());
        assert_eq!(a + c, 30);
        assert!((12..=15).contains(&a) && (15..=18).contains(&c), "{a}/{c}");
    });
}

#[test]
fn shutdown_stops_accepting_but_drains_an_established_tunnel() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let mut proxy = Proxy::start(&addrs(&[backend.addr])).await;

        let mut established = proxy.connect().await;
        let mut buf = [0; 6];
        established.write_all(b"before").await.unwrap();
        established.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"before");

        proxy.stop();
        // The shutdown future is polled on the proxy's thread; give it a moment to be seen. Too
        // short a pause fails the test below, it cannot make it pass wrongly.
        Timer::after(QUIET).await;

        // Not accepting may mean a closed listener (the connect is refused) or one left bound
        // until `serve` returns (the kernel completes the handshake, nobody accepts it). Either
        // way nothing may reach the backend.
        let mut late = TcpStream::connect(proxy.addr).await.ok();
        if let Some(late) = &mut late {
            late.write_all(b"late").await.unwrap();
            let mut late_buf = [0; 4];
            let early = within(QUIET, late.read(&mut late_buf)).await;
            assert!(
                !matches!(early, Some(Ok(n)) if n > 0),
                "a connection made after shutdown was relayed"
            );
        }

        // The established tunnel still works both ways, and keeps `serve` from returning.
        established
            .write_all(b"during")
            .await
            .expect("established tunnel closed by shutdown");
        established
            .read_exact(&mut buf)
            .await
            .expect("established tunnel closed by shutdown");
        assert_eq!(&buf, b"during");
        assert!(proxy.done.is_empty(), "serve returned with a tunnel open");

        established.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        established.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        let served = within(PROMPTLY, proxy.done.recv())
            .await
            .unwrap_or_else(|| panic!("serve did not return within {PROMPTLY:?} of the drain"));
        served.unwrap().unwrap();
        assert_eq!(backend.accepted(), 1, "only the established connection");

        // Once `serve` has returned, a connection it never accepted is reset or closed.
        if let Some(mut late) = late {
            let mut late_buf = [0; 4];
            let end = within(PROMPTLY, late.read(&mut late_buf))
                .await
                .unwrap_or_else(|| panic!("late connection still open after serve returned"));
            assert!(
                matches!(end, Ok(0) | Err(_)),
                "expected EOF or an error, got {end:?}"
            );
        }
    });
}

#[test]
fn drain_timeout_closes_tunnels_still_open() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let mut proxy =
            Proxy::serve(TcpProxy::new([backend.addr.to_string()]).drain_timeout_ms(200)).await;

        let mut open = proxy.connect().await;
        let mut buf = [0; 4];
        open.write_all(b"open").await.unwrap();
        open.read_exact(&mut buf).await.unwrap();

        proxy.stop();
        let served = within(PROMPTLY, proxy.done.recv())
            .await
            .unwrap_or_else(|| panic!("serve did not return within {PROMPTLY:?}"));
        served.unwrap().unwrap();

        // `serve` has given up on the tunnel, so its client must learn that it is over.
        let end = within(PROMPTLY, open.read(&mut buf))
            .await
            .unwrap_or_else(|| panic!("tunnel neither served nor closed after serve returned"));
        assert!(
            matches!(end, Ok(0) | Err(_)),
            "expected EOF or an error, got {end:?}"
        );
    });
}

#[test]
fn every_byte_value_passes_unchanged() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(&addrs(&[backend.addr])).await;
        // All 256 values in both orders, runs of NUL, and bytes that look like other protocols
        // (an HTTP head, a WebSocket close frame, a TLS record header): none may be interpreted.
        let mut msg: Vec<u8> = (0..=255).collect();
        msg.extend((0..=255).rev());
        msg.extend([0; 64]);
        msg.extend_from_slice(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        msg.extend_from_slice(&[0x88, 0x00, 0x16, 0x03, 0x01, 0x00, 0x00, b'\r', b'\n']);
        msg.extend([0xff; 64]);
        assert_same(&round_trip(&proxy, &msg).await, &msg, "echo");
    });
}

#[test]
fn many_small_writes_arrive_in_order() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(&addrs(&[backend.addr])).await;
        // About 2000 writes of 1 to 7 bytes each, cut from a sequence in which order shows.
        let want = pattern(3, 8_000);
        let mut parts = Vec::new();
        let mut rest = &want[..];
        for size in (1..=7).cycle() {
            if rest.is_empty() {
                break;
            }
            let (part, tail) = rest.split_at(size.min(rest.len()));
            parts.push(part);
            rest = tail;
        }
        assert!(parts.len() >= 2_000);

        let client = proxy.connect().await;
        let (mut reader, mut writer) = (client.clone(), client);
        let (got, ()) = future::zip(
            async {
                let mut got = Vec::new();
                reader.read_to_end(&mut got).await.unwrap();
                got
            },
            async {
                for part in parts {
                    writer.write_all(part).await.unwrap();
                    writer.flush().await.unwrap();
                }
                writer.shutdown(Shutdown::Write).unwrap();
            },
        )
        .await;
        assert_same(&got, &want, "echo of many small writes");
    });
}

#[test]
fn serve_without_backends_fails_naming_it() {
    run(|_ex| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = TcpProxy::new(Vec::<String>::new())
            .serve(listener, future::pending())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(err.to_string().contains("no backends"), "{err}");
    });
}

#[cfg(target_os = "linux")]
#[path = "common/sockets.rs"]
mod sockets;

/// `congestion_control` is on both of the proxy's sockets of a tunnel, the client's and the
/// backend's, while the client's own socket keeps the host's default.
#[cfg(target_os = "linux")]
#[test]
fn congestion_control_is_set_on_the_proxys_sockets_to_client_and_backend() {
    let Some((default, other)) = sockets::default_and_other() else {
        return;
    };
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy =
            Proxy::serve(TcpProxy::new(addrs(&[backend.addr])).congestion_control(other.clone()))
                .await;
        let mut client = proxy.connect().await;
        assert_eq!(round_trip_on(&mut client, b"ping").await, b"ping");
        let here = client.local_addr().unwrap();
        sockets::assert_tunnel_runs(proxy.addr, here, backend.addr, &other, &default);
    });
}

/// A name the kernel does not have fails the start, naming the field and the fix.
#[cfg(target_os = "linux")]
#[test]
fn a_congestion_control_the_kernel_lacks_fails_the_start() {
    run(|_ex| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = TcpProxy::new(["127.0.0.1:1"])
            .congestion_control("no-such-cc")
            .serve(listener, future::pending())
            .await
            .expect_err("a refused congestion control");
        let msg = err.to_string();
        assert!(msg.contains("field `congestion_control`"), "{msg}");
        assert!(msg.contains("\"no-such-cc\""), "{msg}");
        assert!(msg.contains("modprobe tcp_no-such-cc"), "{msg}");
    });
}

async fn round_trip_on(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    got
}

/// A reload that drops `congestion_control` gives new connections the host's default again,
/// though the listener (kept across the reload) still carries the old setting.
#[cfg(target_os = "linux")]
#[test]
fn a_reload_without_congestion_control_gives_new_connections_the_hosts_default() {
    let Some((default, other)) = sockets::default_and_other() else {
        return;
    };
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        // A port of its own, so the reload matches the section by its address.
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listen.local_addr().unwrap();
        drop(listen);
        let section = |cc: &str| {
            format!(
                "drain_timeout_ms = 100\n[[tcp_proxy]]\nlisten = \"{addr}\"\nbackends = [\"{}\"]\n{cc}\n",
                backend.addr
            )
        };
        let first = section(&format!("congestion_control = \"{other}\""));
        let config = portcullis::Config::parse(&first, "first.toml").unwrap();
        let next = section("");
        let (reload, reloads) = smol::channel::bounded(1);
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let served = std::thread::spawn(move || {
            portcullis::run_reloading(
                config,
                move || portcullis::Config::parse(&next, "next.toml"),
                reloads,
                async move {
                    let _ = stopped.recv().await;
                },
            )
        });
        let proxied = |want: String| async move {
            let mut client = loop {
                match TcpStream::connect(addr).await {
                    Ok(c) => break c,
                    Err(_) => Timer::after(Duration::from_millis(10)).await,
                };
            };
            assert_eq!(round_trip_on(&mut client, b"ping").await, b"ping");
            let here = client.local_addr().unwrap();
            let to_client = sockets::congestion_controls(Some(addr), Some(here));
            assert_eq!(
                to_client,
                [want.as_str()],
                "the proxy's socket to the client"
            );
        };
        proxied(other.clone()).await;
        reload.send(()).await.unwrap();
        // The reload is done once a new connection is served by the new flow.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut client = TcpStream::connect(addr).await.unwrap();
            assert_eq!(round_trip_on(&mut client, b"ping").await, b"ping");
            let here = client.local_addr().unwrap();
            let now = sockets::congestion_controls(Some(addr), Some(here));
            if now == [default.as_str()] || Instant::now() > deadline {
                break;
            }
            Timer::after(Duration::from_millis(20)).await;
        }
        proxied(default).await;
        drop(stop);
        served.join().unwrap().unwrap();
    });
}
