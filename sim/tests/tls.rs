//! TLS handshakes interrupted by a crash, under turmoil: the proxy's own TLS code (rustls through
//! futures-rustls, over the simulator's streams) on both sides of the proxy.
//!
//! - A backend that crashes in the middle of the proxy's TLS handshake with it: the connect
//!   fails at once (not at the connect timeout) and the client is served by the next backend.
//! - A client that crashes in the middle of its TLS handshake with a TLS listener: the proxy
//!   counts and drops that connection, keeps no socket of it, and serves the next client.
//!
//! Certificates come from rcgen at test time, written to a temporary directory the proxy reads.

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::rustls::pki_types::ServerName;
use futures_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use futures_rustls::{TlsAcceptor, TlsConnector};
use portcullis::{Config, TcpProxy};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use sim::{
    check_prefix, connect_proxy, echo_server, no_streams_left_on, pattern, run_seeds, serve_proxy,
    sim_time, test_name, Rng, BACKEND_PORT,
};
use tokio_util::compat::TokioAsyncReadCompatExt;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A private CA and one server certificate for `names`, on disk and in memory.
struct Pki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl Pki {
    fn new(tag: &str, names: &[&str]) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("portcullis-sim-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca: issuer.der().clone(),
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn server(&self) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .unwrap();
        Arc::new(config)
    }

    fn client(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The single `[[tcp_proxy]]` of `toml`, as a proxy.
fn proxy(toml: &str) -> TcpProxy {
    let mut config = Config::parse(toml, "sim-tls.toml").expect("a valid config");
    TcpProxy::from_section(config.tcp_proxy.remove(0))
}

/// A TLS echo server on `port`.
async fn tls_echo_server(config: Arc<ServerConfig>) -> turmoil::Result {
    let listener =
        turmoil::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, BACKEND_PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let config = config.clone();
        tokio::task::spawn_local(async move {
            let Ok(mut s) = TlsAcceptor::from(config).accept(stream.compat()).await else {
                return;
            };
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                    return;
                }
            }
            let _ = s.close().await;
        });
    }
}

/// The proxy speaks TLS to a backend that crashes after reading the ClientHello: the connect
/// fails at once, and the client is served by the backup backend through a TLS connection to
/// it, every byte once and in order.
fn backend_crash_mid_handshake(seed: u64) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let pki = Pki::new(&format!("backend-{seed}"), &["backend1", "backend2"]);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(rng.millis(1, 20))
        .simulation_duration(Duration::from_secs(30))
        .build();
    // backend1 reads the ClientHello and says so, then never answers; the test crashes it.
    let hello_read = Rc::new(Cell::new(false));
    let flag = hello_read.clone();
    sim.host("backend1", move || {
        let flag = flag.clone();
        async move {
            let listener =
                turmoil::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, BACKEND_PORT))
                    .await?;
            let (mut stream, _) = listener.accept().await?;
            let mut buf = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await?;
            flag.set(true);
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    let server = pki.server();
    sim.host("backend2", move || tls_echo_server(server.clone()));
    let toml = format!(
        "[[tcp_proxy]]\nname = \"tls-backend-crash\"\nlisten = \"0.0.0.0:7000\"\nconnect_timeout_ms = 5000\n\
         backends = [\"backend1:{BACKEND_PORT}\", {{ address = \"backend2:{BACKEND_PORT}\", backup = true }}]\n\
         upstream_tls = {{ ca = \"{}\" }}\n",
        pki.path("ca.pem")
    );
    sim.host("proxy", move || serve_proxy(proxy(&toml)));

    let crashed_at = Rc::new(Cell::new(None::<Duration>));
    let crash_seen = crashed_at.clone();
    let len = rng.range(1, 50_000) as usize;
    sim.client("client", async move {
        let mut s = connect_proxy().await?;
        let sent = pattern(1, 0, len);
        tokio::io::AsyncWriteExt::write_all(&mut s, &sent).await?;
        let mut got = vec![0u8; len];
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_exact(&mut s, &mut got),
        )
        .await
        .map_err(|_| "no echo within 10 s")??;
        check_prefix(1, &got)?;
        let crashed = crash_seen
            .get()
            .ok_or("the echo came before backend1 crashed")?;
        let took = sim_time().saturating_sub(crashed);
        if took >= Duration::from_secs(1) {
            return Err(format!("the failover took {took:?} after the crash").into());
        }
        drop(s);
        no_streams_left_on("proxy", Duration::from_secs(1)).await?;
        Ok(())
    });

    while !hello_read.get() {
        sim.step()?;
    }
    for _ in 0..rng.range(0, 5) {
        sim.step()?;
    }
    sim.crash("backend1");
    crashed_at.set(Some(sim.elapsed()));
    sim.run()
}

/// A client that crashes halfway through sending its ClientHello to a TLS listener: the proxy
/// counts the failed handshake, lets go of the connection, and serves the next client.
fn client_crash_mid_handshake(seed: u64) -> turmoil::Result {
    let mut rng = Rng::new(seed);
    let pki = Pki::new(&format!("client-{seed}"), &["proxy"]);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .max_message_latency(rng.millis(1, 20))
        .simulation_duration(Duration::from_secs(30))
        .build();
    sim.host("backend", || echo_server(BACKEND_PORT));
    let toml = format!(
        "[[tcp_proxy]]\nname = \"tls-client-crash\"\nlisten = \"0.0.0.0:7000\"\nbackends = [\"backend:{BACKEND_PORT}\"]\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        pki.path("server.pem"),
        pki.path("server.key")
    );
    sim.host("proxy", move || serve_proxy(proxy(&toml)));

    // The first client sends half a real ClientHello, says so, and waits to be crashed.
    let half_sent = Rc::new(Cell::new(false));
    let flag = half_sent.clone();
    let client = pki.client();
    sim.host("crasher", move || {
        let (flag, client) = (flag.clone(), client.clone());
        async move {
            let mut s = connect_proxy().await?;
            let name = ServerName::try_from("proxy").unwrap();
            let mut conn = rustls::ClientConnection::new(client, name).unwrap();
            let mut hello = Vec::new();
            conn.write_tls(&mut hello).unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, &hello[..hello.len() / 2]).await?;
            flag.set(true);
            std::future::pending::<()>().await;
            Ok(())
        }
    });

    let crashed = Rc::new(Cell::new(false));
    let crash_seen = crashed.clone();
    let client = pki.client();
    let len = rng.range(1, 20_000) as usize;
    sim.client("client", async move {
        while !crash_seen.get() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The crashed client's connection goes away: the proxy holds no socket of it.
        no_streams_left_on("proxy", Duration::from_secs(1)).await?;
        let tcp = connect_proxy().await?;
        let name = ServerName::try_from("proxy").unwrap();
        let mut s = TlsConnector::from(client)
            .connect(name, tcp.compat())
            .await?;
        s.write_all(&pattern(2, 0, len)).await?;
        s.flush().await?;
        let mut got = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .map_err(|_| "no echo within 10 s")??;
        check_prefix(2, &got)?;
        let metrics = portcullis::metrics::render();
        if !metrics.lines().any(|l| {
            l.starts_with("portcullis_tls_handshake_failures_total")
                && l.contains("section=\"tls-client-crash\"")
                && l.contains("reason=\"client_closed\"")
        }) {
            return Err(format!("the failed handshake was not counted:\n{metrics}").into());
        }
        s.close().await?;
        drop(s);
        no_streams_left_on("proxy", Duration::from_secs(1)).await?;
        Ok(())
    });

    while !half_sent.get() {
        sim.step()?;
    }
    for _ in 0..rng.range(0, 5) {
        sim.step()?;
    }
    sim.crash("crasher");
    crashed.set(true);
    sim.run()
}

#[test]
fn a_backend_that_crashes_during_the_tls_handshake_fails_over_to_the_next_at_once() {
    run_seeds(test_name!(), backend_crash_mid_handshake);
}

#[test]
fn a_client_that_crashes_during_its_tls_handshake_is_counted_and_let_go() {
    run_seeds(test_name!(), client_crash_mid_handshake);
}
