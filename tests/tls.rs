//! TLS end to end on loopback: certificates made at test time by rcgen (a private CA per test,
//! files in a temporary directory), real TLS clients and servers from futures-rustls, real
//! WebSocket peers from async-tungstenite, and the proxy in-process (or, where a log line is
//! checked, the binary). Every socket is bound to `127.0.0.1:0`.

#![cfg(feature = "tls")]

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_net::{TcpListener, TcpStream};
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::Message;
use futures_lite::{future, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use futures_rustls::rustls::pki_types::ServerName;
use futures_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use futures_rustls::rustls::server::WebPkiClientVerifier;
use futures_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use futures_rustls::{TlsAcceptor, TlsConnector};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use smol::channel::{Receiver, Sender};
use smol::Timer;

use portcullis::{Config, TcpProxy, WsProxy};

/// How long one test may take; only a hang reaches it.
const TEST_LIMIT: Duration = Duration::from_secs(30);

/// Runs one test, failing rather than hanging after [`TEST_LIMIT`].
fn run(test: impl Future<Output = ()>) {
    smol::block_on(future::or(test, async {
        Timer::after(TEST_LIMIT).await;
        panic!("test did not finish within {TEST_LIMIT:?}");
    }));
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------------
// Certificates.
// ---------------------------------------------------------------------------------------------

/// A private CA, and a directory its files and its leaves' files are written to.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

/// A certificate and key signed by a [`Ca`], in memory and on disk.
struct Leaf {
    cert: String,
    key: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// How a leaf certificate is made.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Server,
    /// A server certificate whose validity ended years ago.
    Expired,
    Client,
}

impl Ca {
    fn new(tag: &str) -> Ca {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("portcullis-tls-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("portcullis test CA {tag}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        Ca { issuer, dir }
    }

    fn ca_path(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        roots
    }

    /// A leaf for `names`, written to `<file>.pem` and `<file>.key`.
    fn leaf(&self, names: &[&str], file: &str, kind: Kind) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![match kind {
            Kind::Client => ExtendedKeyUsagePurpose::ClientAuth,
            _ => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        if kind == Kind::Expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Leaf {
            cert: cert_path.display().to_string(),
            key: key_path.display().to_string(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS server configuration for a backend; with `client_ca`, clients must present a
/// certificate it signed (mutual TLS).
fn server_config(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider())
                .build()
                .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(vec![leaf.der.clone()], leaf.key())
            .unwrap(),
    )
}

/// A TLS client configuration trusting `ca`, offering ALPN `http/1.1`.
fn client_config(ca: &Ca) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` asking for `name`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Ca,
    name: &str,
) -> std::io::Result<futures_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string()).unwrap();
    TlsConnector::from(client_config(ca))
        .connect(name, tcp)
        .await
}

// ---------------------------------------------------------------------------------------------
// Backends and the proxy.
// ---------------------------------------------------------------------------------------------

/// A WebSocket echo backend, over TLS when `tls` is given; every request's
/// `X-Forwarded-Proto` is sent to the returned channel.
async fn ws_backend(tls: Option<Arc<ServerConfig>>) -> (SocketAddr, Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, saw) = smol::channel::unbounded();
    smol::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (tls, seen) = (tls.clone(), seen.clone());
            smol::spawn(async move {
                match tls {
                    Some(config) => {
                        if let Ok(s) = TlsAcceptor::from(config).accept(stream).await {
                            serve_ws(s, seen).await;
                        }
                    }
                    None => serve_ws(stream, seen).await,
                }
            })
            .detach();
        }
    })
    .detach();
    (addr, saw)
}

async fn serve_ws<S: AsyncRead + AsyncWrite + Unpin>(stream: S, seen: Sender<String>) {
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        let proto = request
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let _ = seen.try_send(proto);
        Ok::<_, ErrorResponse>(response)
    };
    let Ok(mut ws) = async_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    while let Some(Ok(m)) = ws.next().await {
        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
            return;
        }
    }
}

/// A TLS server that says `tag` and a newline, then echoes.
async fn tls_echo(config: Arc<ServerConfig>, tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    smol::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let config = config.clone();
            smol::spawn(async move {
                let Ok(mut s) = TlsAcceptor::from(config).accept(stream).await else {
                    return;
                };
                let _ = s.write_all(format!("{tag}\n").as_bytes()).await;
                let _ = s.flush().await;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                        return;
                    }
                }
            })
            .detach();
        }
    })
    .detach();
    addr
}

/// A plain echo backend.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    smol::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            smol::spawn(async move {
                let _ = futures_lite::io::copy(stream.clone(), &mut stream.clone()).await;
            })
            .detach();
        }
    })
    .detach();
    addr
}

/// A proxy serving on its own thread until dropped.
struct Proxy {
    addr: SocketAddr,
    _stop: Sender<()>,
}

impl Proxy {
    fn start<F, Fut>(serve: F) -> Proxy
    where
        F: FnOnce(TcpListener, Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), portcullis::Error>>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = TcpListener::try_from(listener).unwrap();
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        std::thread::spawn(move || {
            if let Err(e) = smol::block_on(serve(listener, stopped)) {
                panic!("the proxy failed: {e}");
            }
        });
        Proxy { addr, _stop: stop }
    }

    /// The single `[[ws_proxy]]` of `toml`.
    fn ws(toml: &str) -> Proxy {
        let mut config = Config::parse(toml, "tls-test.toml").expect("a valid test config");
        let section = config.ws_proxy.remove(0);
        Proxy::start(move |listener, stopped| {
            WsProxy::from_section(section)
                .drain_timeout_ms(100)
                .serve(listener, async move {
                    let _ = stopped.recv().await;
                })
        })
    }

    /// The single `[[tcp_proxy]]` of `toml`.
    fn tcp(toml: &str) -> Proxy {
        let mut config = Config::parse(toml, "tls-test.toml").expect("a valid test config");
        let section = config.tcp_proxy.remove(0);
        Proxy::start(move |listener, stopped| {
            TcpProxy::from_section(section)
                .drain_timeout_ms(100)
                .serve(listener, async move {
                    let _ = stopped.recv().await;
                })
        })
    }
}

/// A raw upgrade request for `/chat`.
const UPGRADE: &str = "GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// The status line the proxy answers a raw upgrade request with.
async fn status_of_upgrade(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(UPGRADE.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf).await.unwrap() {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    text.lines().next().unwrap_or("").to_string()
}

async fn round_trip<S>(ws: &mut async_tungstenite::WebSocketStream<S>, text: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_wss_client_reaches_a_ws_backend_through_tls_termination() {
    run(async {
        let ca = Ca::new("terminate");
        let leaf = ca.leaf(&["localhost"], "proxy", Kind::Server);
        let (backend, saw) = ws_backend(None).await;
        let proxy = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            leaf.cert, leaf.key
        ));
        let tls = tls_connect(proxy.addr, &ca, "localhost").await.unwrap();
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"http/1.1"[..]),
            "a WebSocket listener offers ALPN http/1.1"
        );
        let (mut ws, response) = async_tungstenite::client_async("wss://localhost/chat", tls)
            .await
            .expect("the upgrade through TLS");
        assert_eq!(response.status(), 101);
        round_trip(&mut ws, "hello over wss").await;
        assert_eq!(saw.recv().await.unwrap(), "https", "X-Forwarded-Proto");
        let big = "x".repeat(200_000);
        round_trip(&mut ws, &big).await;
        ws.close(None).await.unwrap();
    });
}

#[test]
fn a_ws_client_reaches_a_wss_backend_verified_by_a_private_ca() {
    run(async {
        let ca = Ca::new("wss-backend");
        let leaf = ca.leaf(&["localhost"], "backend", Kind::Server);
        let (backend, saw) = ws_backend(Some(server_config(&leaf, None))).await;
        let proxy = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"wss://localhost:{}/\"]\nupstream_tls = {{ ca = \"{}\" }}\n",
            backend.port(),
            ca.ca_path()
        ));
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut ws, _) = async_tungstenite::client_async("ws://localhost/chat", tcp)
            .await
            .expect("the upgrade to a wss:// backend");
        round_trip(&mut ws, "hello to a wss backend").await;
        assert_eq!(saw.recv().await.unwrap(), "http");
    });
}

#[test]
fn mutual_tls_to_the_backend_presents_the_client_certificate() {
    run(async {
        let ca = Ca::new("mtls");
        let server = ca.leaf(&["localhost"], "backend", Kind::Server);
        let client = ca.leaf(&["portcullis"], "client", Kind::Client);
        let (backend, _saw) = ws_backend(Some(server_config(&server, Some(&ca)))).await;
        let with_cert = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"wss://localhost:{}/\"]\nupstream_tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
            backend.port(),
            ca.ca_path(),
            client.cert,
            client.key
        ));
        let tcp = TcpStream::connect(with_cert.addr).await.unwrap();
        let (mut ws, _) = async_tungstenite::client_async("ws://localhost/chat", tcp)
            .await
            .expect("the upgrade with a client certificate");
        round_trip(&mut ws, "hello with mutual TLS").await;

        // The same backend refuses a proxy that has no client certificate: 502.
        let without = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"wss://localhost:{}/\"]\nupstream_tls = {{ ca = \"{}\" }}\n",
            backend.port(),
            ca.ca_path()
        ));
        let status = status_of_upgrade(without.addr).await;
        assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    });
}

#[test]
fn sni_selects_between_two_certificates() {
    run(async {
        let ca = Ca::new("sni-certs");
        let a = ca.leaf(&["a.test"], "a", Kind::Server);
        let b = ca.leaf(&["*.b.test"], "b", Kind::Server);
        let backend = echo().await;
        let proxy = Proxy::tcp(&format!(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\ntls = [{{ cert = \"{}\", key = \"{}\" }}, {{ cert = \"{}\", key = \"{}\" }}]\n",
            a.cert, a.key, b.cert, b.key
        ));
        for (name, want) in [("a.test", &a), ("chat.b.test", &b), ("a.test", &a)] {
            let mut tls = tls_connect(proxy.addr, &ca, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            assert_eq!(presented, want.der, "{name} got the other certificate");
            tls.write_all(b"ping").await.unwrap();
            tls.flush().await.unwrap();
            let mut back = [0u8; 4];
            tls.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"ping");
        }
        // A name neither covers gets the first certificate (and the client's check fails).
        let e = tls_connect(proxy.addr, &ca, "c.test").await.unwrap_err();
        assert!(e.to_string().contains("not valid for name"), "{e}");
    });
}

#[test]
fn a_tls_1_2_client_is_served_too() {
    run(async {
        let ca = Ca::new("tls12");
        let leaf = ca.leaf(&["localhost"], "proxy", Kind::Server);
        let backend = echo().await;
        let proxy = Proxy::tcp(&format!(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            leaf.cert, leaf.key
        ));
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(ca.roots())
            .with_no_client_auth();
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("a TLS 1.2 handshake");
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        tls.write_all(b"twelve").await.unwrap();
        tls.flush().await.unwrap();
        let mut back = [0u8; 6];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"twelve");
    });
}

#[test]
fn sni_routes_pass_tls_through_to_two_backends_by_name() {
    run(async {
        let ca = Ca::new("sni-route");
        let a = ca.leaf(&["a.test"], "a", Kind::Server);
        let b = ca.leaf(&["*.b.test", "*.z.b.test"], "b", Kind::Server);
        let backend_a = tls_echo(server_config(&a, None), "backend a").await;
        let backend_b = tls_echo(server_config(&b, None), "backend b").await;
        let proxy = Proxy::tcp(&format!(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend_a}\"]\n\n[[tcp_proxy.sni_route]]\nserver_name = \"*.b.test\"\nbackends = [\"{backend_b}\"]\n"
        ));
        for (name, tag) in [
            ("x.b.test", "backend b"),
            ("a.test", "backend a"),
            ("y.z.b.test", "backend b"),
        ] {
            let tls = tls_connect(proxy.addr, &ca, name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut lines = futures_lite::io::BufReader::new(tls);
            let mut line = String::new();
            futures_lite::AsyncBufReadExt::read_line(&mut lines, &mut line)
                .await
                .unwrap();
            assert_eq!(line.trim(), tag, "{name}");
            let mut tls = lines.into_inner();
            tls.write_all(b"through").await.unwrap();
            tls.flush().await.unwrap();
            let mut back = [0u8; 7];
            tls.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"through", "{name}");
        }
    });
}

#[test]
fn plain_http_to_a_tls_listener_gets_a_400_and_a_clean_close() {
    run(async {
        let ca = Ca::new("plain");
        let leaf = ca.leaf(&["localhost"], "proxy", Kind::Server);
        let (backend, _saw) = ws_backend(None).await;
        let ws = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            leaf.cert, leaf.key
        ));
        let mut s = TcpStream::connect(ws.addr).await.unwrap();
        s.write_all(UPGRADE.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .expect("a clean close, not a reset");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(text.contains("TLS"), "{text}");

        // A TCP section has nothing to say: it closes.
        let tcp = Proxy::tcp(&format!(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            leaf.cert, leaf.key
        ));
        let mut s = TcpStream::connect(tcp.addr).await.unwrap();
        s.write_all(b"hello, plain\r\n").await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .expect("a clean close, not a reset");
        assert!(got.is_empty(), "{got:?}");

        // The listener still serves TLS clients.
        let tls = tls_connect(ws.addr, &ca, "localhost").await.unwrap();
        let (mut ws, _) = async_tungstenite::client_async("wss://localhost/chat", tls)
            .await
            .unwrap();
        round_trip(&mut ws, "still here").await;
    });
}

/// The binary, running `config`, with its stderr lines readable.
struct Binary {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    fn start(config: &std::path::Path) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["--config", &config.display().to_string()])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("portcullis: {line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Binary { child, lines }
    }

    /// The first line containing `what`, within a few seconds.
    fn wait_for(&self, what: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line containing {what:?}"),
            }
        }
    }

    /// The address the section logged it listens on.
    fn listening(&self) -> SocketAddr {
        let line = self.wait_for("listening kind=ws");
        let addr = line
            .split("addr=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        addr.parse().unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_expired_or_wrong_host_backend_certificate_gives_502_and_says_why() {
    run(async {
        let ca = Ca::new("bad-backend");
        let expired = ca.leaf(&["localhost"], "expired", Kind::Expired);
        let other = ca.leaf(&["elsewhere.test"], "other", Kind::Server);
        for (leaf, why) in [(&expired, "xpired"), (&other, "not valid for name")] {
            let (backend, _saw) = ws_backend(Some(server_config(leaf, None))).await;
            let file = ca.dir.join("portcullis.toml");
            std::fs::write(
                &file,
                format!(
                    "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"wss://localhost:{}/\"]\nupstream_tls = {{ ca = \"{}\" }}\n",
                    backend.port(),
                    ca.ca_path()
                ),
            )
            .unwrap();
            let binary = Binary::start(&file);
            let addr = binary.listening();
            let status = status_of_upgrade(addr).await;
            assert!(status.starts_with("HTTP/1.1 502"), "{why}: {status}");
            let line = binary.wait_for("TLS handshake with the backend failed");
            assert!(line.contains(why), "{line}");
            assert!(
                line.contains(&format!("localhost:{}", backend.port())),
                "{line}"
            );
        }
    });
}

#[test]
fn a_tcp_sections_access_lines_name_the_tls_version_and_failed_handshakes() {
    run(async {
        let ca = Ca::new("tcp-tls-fail");
        let leaf = ca.leaf(&["localhost"], "proxy", Kind::Server);
        let backend = echo().await;
        let file = ca.dir.join("portcullis.toml");
        std::fs::write(
            &file,
            format!(
                "[[tcp_proxy]]\nname = \"secure\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n\
                 tls = {{ cert = \"{}\", key = \"{}\" }}\n",
                leaf.cert, leaf.key
            ),
        )
        .unwrap();
        let binary = Binary::start(&file);
        let line = binary.wait_for("listening kind=tcp");
        let addr: SocketAddr = line
            .split("addr=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();

        // Plain bytes to the TLS listener.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hello, plain\r\n").await.unwrap();
        let _ = s.read_to_end(&mut Vec::new()).await;
        let line = binary.wait_for("event=closed");
        assert!(line.contains("section=secure"), "{line}");
        assert!(
            line.contains("end=\"refused: not TLS, to a TLS listener\""),
            "{line}"
        );

        // A client that does not trust the proxy's certificate gives up on the handshake.
        let stranger = Ca::new("tcp-tls-stranger");
        assert!(tls_connect(addr, &stranger, "localhost").await.is_err());
        let line = binary.wait_for("event=closed");
        assert!(
            line.contains("end=\"client TLS handshake failed: "),
            "{line}"
        );

        // A client served over TLS: its line says which version.
        let mut tls = tls_connect(addr, &ca, "localhost").await.unwrap();
        tls.write_all(b"hi").await.unwrap();
        tls.flush().await.unwrap();
        let mut back = [0u8; 2];
        tls.read_exact(&mut back).await.unwrap();
        tls.close().await.unwrap();
        let _ = tls.read_to_end(&mut Vec::new()).await;
        drop(tls);
        let line = binary.wait_for("event=closed");
        assert!(line.contains("tls=TLSv1.3"), "{line}");
        assert!(line.contains("up=2 down=2"), "{line}");
    });
}

#[test]
fn renewed_certificates_are_served_after_sighup_and_open_tunnels_go_on() {
    run(async {
        let ca = Ca::new("reload");
        let old = ca.leaf(&["localhost"], "old", Kind::Server);
        let new = ca.leaf(&["localhost"], "new", Kind::Server);
        let (backend, _saw) = ws_backend(None).await;
        // The proxy reads live.pem/live.key; "renewing" them is copying new files over.
        let (cert, key) = (ca.dir.join("live.pem"), ca.dir.join("live.key"));
        std::fs::copy(&old.cert, &cert).unwrap();
        std::fs::copy(&old.key, &key).unwrap();
        let file = ca.dir.join("portcullis.toml");
        std::fs::write(
            &file,
            format!(
                "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let binary = Binary::start(&file);
        let addr = binary.listening();
        let presented = |tls: &futures_rustls::client::TlsStream<TcpStream>| {
            tls.get_ref().1.peer_certificates().unwrap()[0].clone()
        };
        let tls = tls_connect(addr, &ca, "localhost").await.unwrap();
        assert_eq!(presented(&tls), old.der);
        let (mut open, _) = async_tungstenite::client_async("wss://localhost/chat", tls)
            .await
            .unwrap();
        round_trip(&mut open, "before the reload").await;

        std::fs::copy(&new.cert, &cert).unwrap();
        std::fs::copy(&new.key, &key).unwrap();
        let hup = Command::new("kill")
            .args(["-HUP", &binary.child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        binary.wait_for("updated; new connections use its new settings");

        let tls = tls_connect(addr, &ca, "localhost").await.unwrap();
        assert_eq!(
            presented(&tls),
            new.der,
            "a new connection gets the renewed certificate"
        );
        let (mut fresh, _) = async_tungstenite::client_async("wss://localhost/chat", tls)
            .await
            .unwrap();
        round_trip(&mut fresh, "after the reload").await;
        round_trip(&mut open, "the open tunnel goes on").await;
        // The access line of a wss tunnel names its TLS version.
        fresh.close(None).await.unwrap();
        while fresh.next().await.is_some() {}
        drop(fresh);
        let line = binary.wait_for("event=closed");
        assert!(line.contains("kind=ws"), "{line}");
        assert!(line.contains("tls=TLSv1.3"), "{line}");
        // The client dropped its connection with no TLS close_notify: an end all the same, not
        // a client error. (The backend closed first, as RFC 6455 has the server do.)
        assert!(line.contains("end=\"backend closed\""), "{line}");
    });
}

#[test]
fn a_tcp_section_with_upstream_tls_carries_bytes_and_half_closes_to_a_tls_backend() {
    run(async {
        let ca = Ca::new("tcp-upstream");
        let leaf = ca.leaf(&["localhost"], "backend", Kind::Server);
        // The backend reads the whole request (its end is the proxy's close_notify), then
        // answers with a larger reply, then closes: both half-closes must cross the proxy.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        let (seen, saw) = smol::channel::bounded(1);
        let config = server_config(&leaf, None);
        smol::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut s = TlsAcceptor::from(config).accept(stream).await.unwrap();
            let sni = s.get_ref().1.server_name().map(str::to_string);
            let mut request = Vec::new();
            s.read_to_end(&mut request).await.unwrap();
            let mut reply = format!("after EOF, got {} bytes\n", request.len()).into_bytes();
            reply.extend((0..300_000u32).map(|i| (i % 251) as u8));
            s.write_all(&reply).await.unwrap();
            s.close().await.unwrap();
            seen.send((sni, request)).await.unwrap();
        })
        .detach();
        let proxy = Proxy::tcp(&format!(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\nupstream_tls = {{ ca = \"{}\", server_name = \"localhost\" }}\n",
            ca.ca_path()
        ));
        let request: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        client.write_all(&request).await.unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client
            .read_to_end(&mut back)
            .await
            .expect("the reply, then the backend's close as a clean EOF");
        let head = b"after EOF, got 200000 bytes\n";
        assert_eq!(&back[..head.len()], head);
        assert_eq!(back.len(), head.len() + 300_000, "the whole reply");
        assert!(back[head.len()..]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8));
        let (sni, got) = saw.recv().await.unwrap();
        assert_eq!(sni.as_deref(), Some("localhost"), "SNI from server_name");
        assert!(
            got == request,
            "the request arrived intact ({} bytes)",
            got.len()
        );
    });
}

impl Ca {
    /// A self-signed server certificate for `names`, signed by no CA (this one neither).
    fn self_signed(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Leaf {
            cert: String::new(),
            key: String::new(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

impl Binary {
    /// The first line containing each of `what`, in whatever order they come, within a few
    /// seconds.
    fn wait_all(&self, what: &[&str]) -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut found: Vec<Option<String>> = vec![None; what.len()];
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                panic!("no line containing {what:?} (found {found:?})");
            };
            for (w, f) in what.iter().zip(&mut found) {
                if f.is_none() && line.contains(w) {
                    *f = Some(line.clone());
                }
            }
        }
        found.into_iter().map(Option::unwrap).collect()
    }
}

/// The `addr=` of a `listening` log line.
fn logged_addr(line: &str) -> SocketAddr {
    let addr = line.split("addr=").nth(1).unwrap().split(' ').next();
    addr.unwrap().parse().unwrap()
}

#[test]
fn insecure_skip_verify_accepts_a_self_signed_backend_loudly_and_without_it_is_refused() {
    run(async {
        let ca = Ca::new("insecure");
        let leaf = ca.self_signed(&["localhost"]);
        let (ws_backend, _saw) = ws_backend(Some(server_config(&leaf, None))).await;
        let tcp_backend = tls_echo(server_config(&leaf, None), "self-signed").await;

        // With the opt-in: each section connects, and the start-up log says so loudly (one
        // binary per section, as both listen on port 0).
        let start = |kind: &str, section: String| {
            let file = ca.dir.join(format!("{kind}.toml"));
            std::fs::write(&file, section).unwrap();
            let binary = Binary::start(&file);
            let lines = binary.wait_all(&[
                &format!("INSECURE: section {kind}-insecure does not verify"),
                &format!("listening kind={kind}"),
            ]);
            assert!(
                lines[0].contains("insecure_skip_verify = true"),
                "{}",
                lines[0]
            );
            (logged_addr(&lines[1]), binary)
        };
        let (ws_addr, _ws_binary) = start(
            "ws",
            format!(
                "[[ws_proxy]]\nname = \"ws-insecure\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"wss://localhost:{}/\"]\nupstream_tls = {{ insecure_skip_verify = true }}\n",
                ws_backend.port()
            ),
        );
        let (tcp_addr, _tcp_binary) = start(
            "tcp",
            format!(
                "[[tcp_proxy]]\nname = \"tcp-insecure\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{tcp_backend}\"]\nupstream_tls = {{ insecure_skip_verify = true, server_name = \"localhost\" }}\n"
            ),
        );
        let tcp = TcpStream::connect(ws_addr).await.unwrap();
        let (mut ws, _) = async_tungstenite::client_async("ws://localhost/chat", tcp)
            .await
            .expect("the upgrade to a self-signed backend, unverified");
        round_trip(&mut ws, "hello, unverified").await;
        let mut tcp = TcpStream::connect(tcp_addr).await.unwrap();
        tcp.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 16];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"self-signed\nping");

        // Without it, the same backends are refused: 502 for ws, a close for tcp.
        let ws = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"wss://localhost:{}/\"]\n",
            ws_backend.port()
        ));
        let status = status_of_upgrade(ws.addr).await;
        assert!(status.starts_with("HTTP/1.1 502"), "{status}");
        let tcp = Proxy::tcp(&format!(
            "[[tcp_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{tcp_backend}\"]\nupstream_tls = {{ server_name = \"localhost\" }}\n"
        ));
        let mut s = TcpStream::connect(tcp.addr).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .await
            .expect("a clean close, not a reset");
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    });
}

/// Not a test but a measurement, run by hand in release mode:
/// `cargo test --release -p portcullis --test tls -- --ignored --nocapture handshakes`.
/// WebSocket handshakes per second through the proxy from 8 concurrent clients for 3 s each
/// way: `wss://` (TLS 1.3 terminated by the proxy, ECDSA P-256) and plain `ws://`.
#[test]
#[ignore = "a measurement, not a test"]
fn handshakes_per_second() {
    run(async {
        let ca = Ca::new("bench");
        let leaf = ca.leaf(&["localhost"], "proxy", Kind::Server);
        let (backend, _saw) = ws_backend(None).await;
        let tls = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            leaf.cert, leaf.key
        ));
        let plain = Proxy::ws(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\n"
        ));
        let ca = Arc::new(ca);
        for (what, addr, secure) in [("wss", tls.addr, true), ("ws", plain.addr, false)] {
            let count = Arc::new(AtomicUsize::new(0));
            let until = std::time::Instant::now() + Duration::from_secs(3);
            let clients: Vec<_> = (0..8)
                .map(|_| {
                    let (ca, count) = (ca.clone(), count.clone());
                    smol::spawn(async move {
                        while std::time::Instant::now() < until {
                            if secure {
                                let s = tls_connect(addr, &ca, "localhost").await.unwrap();
                                let (mut ws, _) =
                                    async_tungstenite::client_async("wss://localhost/", s)
                                        .await
                                        .unwrap();
                                let _ = ws.close(None).await;
                            } else {
                                let s = TcpStream::connect(addr).await.unwrap();
                                let (mut ws, _) =
                                    async_tungstenite::client_async("ws://localhost/", s)
                                        .await
                                        .unwrap();
                                let _ = ws.close(None).await;
                            }
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for c in clients {
                c.await;
            }
            let n = count.load(Ordering::Relaxed);
            println!("{what}: {n} handshakes in 3 s = {:.0}/s", n as f64 / 3.0);
        }
    });
}
