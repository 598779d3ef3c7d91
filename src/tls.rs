//! TLS: terminating it on a listener, speaking it to backends, and reading the server name
//! of a raw ClientHello without terminating it.
//!
//! - [`Stream`] is a connection that is plain or TLS (either side), one `AsyncRead +
//!   AsyncWrite` type, so the flows and the relay stay generic over the seam's stream.
//! - [`Acceptor`] terminates TLS 1.2 and 1.3 with one certificate or several chosen by SNI
//!   (the first one serves clients that send no name, or a name no certificate covers), and
//!   offers ALPN `http/1.1` on WebSocket listeners.
//! - [`Connector`] speaks TLS to backends: system roots or a private `ca`, an optional client
//!   certificate (mutual TLS), the backend's host name as SNI unless `server_name` says
//!   otherwise, and `insecure_skip_verify` only as a loudly logged opt-in.
//! - [`peek_sni`] reads a ClientHello (bounded in size; the caller bounds it in time) and
//!   returns the server name it asks for together with every byte read, which the caller
//!   replays to the backend: TLS passes through untouched.
//!
//! Everything that needs rustls is behind the `tls` cargo feature. Without it [`Stream`] has
//! only its plain variant, [`Acceptor`] and [`Connector`] cannot be built (the config loader
//! already refuses the fields that would need them), and [`peek_sni`], which is plain parsing,
//! still works.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite};

/// The most of a ClientHello [`peek_sni`] reads: a handshake message may span records, but a
/// real ClientHello (even with post-quantum key shares) is a few KiB at most.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// A connection that is plain, or TLS as either side.
pub enum Stream<S> {
    /// Bytes as they are.
    Plain(S),
    /// TLS terminated here: the client's connection.
    #[cfg(feature = "tls")]
    Server(Box<futures_rustls::server::TlsStream<S>>),
    /// TLS started here: a connection to a backend.
    #[cfg(feature = "tls")]
    Client(Box<futures_rustls::client::TlsStream<S>>),
}

impl<S> fmt::Debug for Stream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Plain(_) => "Stream::Plain",
            #[cfg(feature = "tls")]
            Stream::Server(_) => "Stream::Server",
            #[cfg(feature = "tls")]
            Stream::Client(_) => "Stream::Client",
        })
    }
}

impl<S> Stream<S> {
    /// The socket underneath.
    pub fn get_ref(&self) -> &S {
        match self {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Server(s) => s.get_ref().0,
            #[cfg(feature = "tls")]
            Stream::Client(s) => s.get_ref().0,
        }
    }

    /// Whether this stream speaks TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The server name a terminated client asked for (SNI), if any.
    pub fn server_name(&self) -> Option<&str> {
        match self {
            #[cfg(feature = "tls")]
            Stream::Server(s) => s.get_ref().1.server_name(),
            _ => None,
        }
    }

    /// The TLS version spoken, as nginx's `$ssl_protocol` names it (`TLSv1.3`); `None` for a
    /// plain stream, or before the handshake.
    pub fn protocol(&self) -> Option<&'static str> {
        #[cfg(feature = "tls")]
        {
            let version = match self {
                Stream::Server(s) => s.get_ref().1.protocol_version(),
                Stream::Client(s) => s.get_ref().1.protocol_version(),
                Stream::Plain(_) => None,
            };
            match version? {
                rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
                rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
                _ => Some("TLS"),
            }
        }
        #[cfg(not(feature = "tls"))]
        None
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            #[cfg(feature = "tls")]
            Stream::Server($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            #[cfg(feature = "tls")]
            Stream::Client($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let tls = self.is_tls();
        match each!(self, s => s.poll_read(cx, buf)) {
            // A peer that closes its connection without TLS's close_notify has ended its stream
            // all the same (many clients do, after a WebSocket close handshake): an end, as
            // nginx takes it (OpenSSL's IGNORE_UNEXPECTED_EOF), not a client error. Whoever
            // needs to know a body is whole has its own framing for it.
            Poll::Ready(Err(e)) if tls && e.kind() == io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Ok(0))
            }
            polled => polled,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_close(cx))
    }
}

/// What the first bytes of a connection say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// A TLS ClientHello asking for this server name (`None`: it sends no SNI).
    Tls(Option<String>),
    /// Not a TLS ClientHello (plain HTTP, say, or garbage).
    NotTls,
}

/// Parses the start of a connection: a TLS handshake record holding a ClientHello, whose
/// `server_name` extension (RFC 6066 §3) names the host the client wants. The handshake
/// message may span several records. The name is returned in lower case.
pub fn parse_client_hello(bytes: &[u8]) -> Hello {
    // A ContentType of handshake (22), a legacy version 3.x: anything else is not TLS.
    match bytes {
        [] => return Hello::Incomplete,
        [22] | [22, 3, ..] => {}
        _ => return Hello::NotTls,
    }
    // Reassemble the handshake layer from consecutive handshake records.
    let mut handshake = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + 5) {
        if header[0] != 22 || header[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 + 2048 {
            return Hello::NotTls;
        }
        let end = (at + 5 + len).min(bytes.len());
        handshake.extend_from_slice(&bytes[at + 5..end]);
        at += 5 + len;
        if handshake.len() >= 4 && handshake.len() >= 4 + be24(&handshake[1..4]) {
            break;
        }
    }
    if handshake.len() < 4 {
        return Hello::Incomplete;
    }
    // HandshakeType client_hello (1).
    if handshake[0] != 1 {
        return Hello::NotTls;
    }
    let len = be24(&handshake[1..4]);
    if handshake.len() < 4 + len {
        return Hello::Incomplete;
    }
    match server_name(&handshake[4..4 + len]) {
        Some(name) => Hello::Tls(name),
        None => Hello::NotTls,
    }
}

fn be24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// The SNI of a ClientHello body: `Some(None)` when it has no `server_name` extension, `None`
/// when the body is malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let n = usize::from(r.u8()?);
    r.take(n)?; // legacy_session_id
    let n = r.u16()?;
    r.take(n)?; // cipher_suites
    let n = usize::from(r.u8()?);
    r.take(n)?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(None); // no extensions at all (SSL 3.0-style hello)
    }
    let n = r.u16()?;
    let mut exts = Reader(r.take(n)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let n = exts.u16()?;
        let data = exts.take(n)?;
        if kind != 0 {
            continue;
        }
        // ServerNameList: a list of (type, name); type 0 is host_name.
        let mut list = Reader(data);
        let n = list.u16()?;
        let mut names = Reader(list.take(n)?);
        while !names.0.is_empty() {
            let kind = names.u8()?;
            let n = names.u16()?;
            let name = names.take(n)?;
            if kind == 0 {
                let name = std::str::from_utf8(name).ok()?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                return Some(Some(name.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

/// A cursor over a byte slice for the parser above.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

/// Reads from `r` (after `early`, bytes already read from it) until the ClientHello is
/// complete. Returns what it says and every byte read, `early` included, which belong to the
/// stream and must be replayed. Fails with `InvalidData` when the client sends more than
/// [`MAX_CLIENT_HELLO`] bytes without completing one, and with `UnexpectedEof` when it closes
/// first. The caller bounds the wait.
pub async fn peek_sni<R: AsyncRead + Unpin>(
    r: &mut R,
    early: Vec<u8>,
) -> io::Result<(Hello, Vec<u8>)> {
    let mut bytes = early;
    let mut chunk = [0u8; 2048];
    loop {
        match parse_client_hello(&bytes) {
            Hello::Incomplete => {}
            done => return Ok((done, bytes)),
        }
        if bytes.len() >= MAX_CLIENT_HELLO {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no complete ClientHello in the first 16 KiB",
            ));
        }
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// The listener side of a connection on a TLS listener, within `limit`: reads the first bytes
/// (unless `early`, bytes already read, has some) and, when they start a TLS record, runs the
/// handshake with those bytes fed in first. `Ok(Err((stream, bytes)))` when the client does
/// not speak TLS (plain HTTP, say), so the caller can answer it in plain text and close.
pub(crate) async fn accept<N, S>(
    net: &N,
    acceptor: &Acceptor,
    client: S,
    early: Vec<u8>,
    limit: std::time::Duration,
) -> io::Result<Result<Stream<S>, (S, Vec<u8>)>>
where
    N: crate::net::Net,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = async move {
        let (mut client, mut early) = (client, early);
        if early.is_empty() {
            let mut first = [0u8; 2048];
            let n = client.read(&mut first).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            early.extend_from_slice(&first[..n]);
        }
        if early[0] != 22 {
            return Ok(Err((client, early)));
        }
        acceptor.accept(client, early).await.map(Ok)
    };
    crate::net::timeout(net, limit, handshake).await
}

/// Whether a server name matches a pattern: exactly (case-insensitively), or, for a pattern
/// `*.suffix`, any name ending in `.suffix` (one label or more in front, as HAProxy's
/// `req.ssl_sni -m end` and nginx's `map` with a leading dot do).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            name.len() > suffix.len()
                && name
                    .get(name.len() - suffix.len()..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(name),
    }
}

/// A failed TLS handshake with a backend (its certificate expired, names another host, or
/// chains to no trusted root), as the error [`Connector::connect`] returns carries it.
#[derive(Debug)]
pub struct BackendHandshake(pub String);

impl fmt::Display for BackendHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake with the backend failed: {}", self.0)
    }
}

impl std::error::Error for BackendHandshake {}

/// Whether `e` is a failed TLS handshake with a backend.
pub fn is_backend_handshake(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<BackendHandshake>())
}

/// The `reason` label and log text of a failed TLS handshake on the listener side.
pub fn failure_reason(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    if matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    ) {
        return "client_closed";
    }
    #[cfg(feature = "tls")]
    if let Some(e) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match e {
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                "protocol"
            }
            rustls::Error::PeerIncompatible(_) => "incompatible",
            rustls::Error::NoCertificatesPresented
            | rustls::Error::InvalidCertificate(_)
            | rustls::Error::InvalidCertRevocationList(_) => "certificate",
            rustls::Error::AlertReceived(_) => "alert",
            _ => "error",
        };
    }
    "error"
}

#[cfg(feature = "tls")]
pub use imp::{check_cert_key, check_upstream, Acceptor, Connector};

#[cfg(not(feature = "tls"))]
pub use none::{Acceptor, Connector};

/// Stand-ins for a build without TLS: neither can be built, so code holding an
/// `Option<Acceptor>` compiles unchanged and never has one.
#[cfg(not(feature = "tls"))]
mod none {
    use super::*;

    /// What this build would need TLS for.
    const WHY: &str =
        "this portcullis was built without TLS (the `tls` cargo feature); rebuild with it";

    /// Terminates TLS on a listener; never built without the `tls` feature.
    #[derive(Debug)]
    pub enum Acceptor {}

    impl Acceptor {
        /// Fails: this build has no TLS.
        pub fn new(_certs: &[crate::config::CertKey], _http: bool) -> Result<Acceptor, String> {
            Err(WHY.into())
        }

        /// Never called: no `Acceptor` exists.
        pub async fn accept<S>(&self, _stream: S, _early: Vec<u8>) -> io::Result<Stream<S>> {
            match *self {}
        }
    }

    /// Speaks TLS to backends; never built without the `tls` feature.
    #[derive(Debug)]
    pub enum Connector {}

    impl Connector {
        /// Fails: this build has no TLS.
        pub fn new(_u: &crate::config::UpstreamTls, _section: &str) -> Result<Connector, String> {
            Err(WHY.into())
        }

        /// Never called: no `Connector` exists.
        pub async fn connect<S>(&self, _host: &str, _stream: S) -> io::Result<Stream<S>> {
            match *self {}
        }
    }
}

#[cfg(feature = "tls")]
mod imp {
    use std::sync::Arc;

    use futures_lite::AsyncWrite;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;
    use rustls::{
        ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    };
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

    use super::*;
    use crate::config::{CertKey, UpstreamTls};
    use crate::log::warn;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Every certificate in the PEM file at `path`.
    fn load_certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read {what} {path:?}: {}", pem_error(&e)))?;
        if certs.is_empty() {
            return Err(format!(
                "{what} {path:?} holds no certificate (no `-----BEGIN CERTIFICATE-----` block)"
            ));
        }
        Ok(certs)
    }

    /// The private key in the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
    fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => format!(
                "key {path:?} holds no private key (no `-----BEGIN PRIVATE KEY-----` block)"
            ),
            e => format!("cannot read key {path:?}: {}", pem_error(&e)),
        })
    }

    fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
        match e {
            rustls_pki_types::pem::Error::Io(e) => e.to_string(),
            e => format!("not valid PEM ({e:?})"),
        }
    }

    /// A certificate chain with its key, checked to belong together.
    fn certified(pair: &CertKey) -> Result<CertifiedKey, String> {
        let certs = load_certs(&pair.cert, "certificate")?;
        let key = load_key(&pair.key)?;
        CertifiedKey::from_der(certs, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the key {:?} does not belong to the certificate {:?}",
                pair.key, pair.cert
            ),
            e => format!("cannot use the key {:?}: {e}", pair.key),
        })
    }

    /// Loads a certificate and its key as a listener would, for the config check.
    pub fn check_cert_key(pair: &CertKey) -> Result<(), String> {
        certified(pair).map(drop)
    }

    /// Builds an upstream client configuration as a flow would, for the config check.
    pub fn check_upstream(u: &UpstreamTls) -> Result<(), String> {
        client_config(u, false).map(drop)
    }

    /// Picks a certificate by the name the client asks for: the first whose names cover it,
    /// else the first one (for clients that send no SNI, or a name none covers).
    #[derive(Debug)]
    struct BySni {
        keys: Vec<Arc<CertifiedKey>>,
    }

    impl BySni {
        /// Whether `key`'s certificate is valid for `name` (its SANs, wildcards included).
        fn covers(key: &CertifiedKey, name: &str) -> bool {
            let (Ok(name), Ok(cert)) = (ServerName::try_from(name), key.end_entity_cert()) else {
                return false;
            };
            webpki::EndEntityCert::try_from(cert)
                .and_then(|c| c.verify_is_valid_for_subject_name(&name))
                .is_ok()
        }
    }

    impl ResolvesServerCert for BySni {
        fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            let name = hello.server_name();
            let chosen = name.and_then(|n| self.keys.iter().find(|k| BySni::covers(k, n)));
            chosen.or_else(|| self.keys.first()).cloned()
        }
    }

    /// Terminates TLS on a listener.
    pub struct Acceptor {
        acceptor: futures_rustls::TlsAcceptor,
    }

    impl fmt::Debug for Acceptor {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Acceptor").finish_non_exhaustive()
        }
    }

    impl Acceptor {
        /// A server configuration over `certs` (read from disk now, so a reload that builds a
        /// new one picks up renewed files), TLS 1.2 and 1.3, with ALPN `http/1.1` when `http`.
        pub fn new(certs: &[CertKey], http: bool) -> Result<Acceptor, String> {
            let mut keys = Vec::new();
            for pair in certs {
                keys.push(Arc::new(certified(pair)?));
            }
            if keys.is_empty() {
                return Err("no certificate given".into());
            }
            let resolver: Arc<dyn ResolvesServerCert> = if keys.len() == 1 {
                Arc::new(Single(keys.remove(0)))
            } else {
                Arc::new(BySni { keys })
            };
            let mut config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_cert_resolver(resolver);
            if http {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
            }
            Ok(Acceptor {
                acceptor: futures_rustls::TlsAcceptor::from(Arc::new(config)),
            })
        }

        /// The server side of a handshake on `stream`, whose first bytes `early` were already
        /// read from it. The caller bounds it in time.
        pub async fn accept<S>(&self, stream: S, early: Vec<u8>) -> io::Result<Stream<S>>
        where
            S: AsyncRead + AsyncWrite + Unpin,
        {
            let accept = self.acceptor.accept_with(stream, |conn| {
                let mut rest = &early[..];
                while !rest.is_empty() {
                    match conn.read_tls(&mut rest) {
                        Ok(0) | Err(_) => break,
                        // Processed now: the handshake only processes what it reads itself,
                        // and the client may send nothing more until it gets an answer. An
                        // error is kept by the connection and ends the handshake.
                        Ok(_) => {
                            if conn.process_new_packets().is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            Ok(Stream::Server(Box::new(accept.await?)))
        }
    }

    /// Serves one certificate to every client.
    #[derive(Debug)]
    struct Single(Arc<CertifiedKey>);

    impl ResolvesServerCert for Single {
        fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// Speaks TLS to backends.
    pub struct Connector {
        connector: futures_rustls::TlsConnector,
        server_name: Option<ServerName<'static>>,
    }

    impl fmt::Debug for Connector {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Connector")
                .field("server_name", &self.server_name)
                .finish_non_exhaustive()
        }
    }

    /// The client configuration `u` describes; `log` says whether to warn about skipped
    /// verification (at a flow's start, not at a config check).
    fn client_config(u: &UpstreamTls, log: bool) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if u.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        } else {
            let mut roots = RootCertStore::empty();
            match &u.ca {
                Some(ca) => {
                    for cert in load_certs(ca, "ca")? {
                        roots.add(cert).map_err(|e| {
                            format!("ca {ca:?} holds a certificate rustls cannot use: {e}")
                        })?;
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    let (added, _) = roots.add_parsable_certificates(found.certs);
                    if added == 0 && log {
                        warn!(
                            "no system root certificates found ({} error(s)); TLS backends will fail verification unless upstream_tls.ca is given",
                            found.errors.len()
                        );
                    }
                }
            }
            builder.with_root_certificates(roots)
        };
        let config = match (&u.cert, &u.key) {
            (Some(cert), Some(key)) => {
                let certs = load_certs(cert, "client certificate")?;
                let key = load_key(key)?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    format!(
                        "cannot use the client key {key_path:?}: {e}",
                        key_path = u.key.as_deref().unwrap_or("")
                    )
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("a client certificate needs both `cert` and `key`".into()),
        };
        Ok(config)
    }

    impl Connector {
        /// A client configuration as `u` describes it, read from disk now; `section` names the
        /// section in the warning `insecure_skip_verify` earns.
        pub fn new(u: &UpstreamTls, section: &str) -> Result<Connector, String> {
            let config = client_config(u, true)?;
            if u.insecure_skip_verify {
                warn!(
                    "INSECURE: section {section} does not verify its backends' TLS certificates (upstream_tls.insecure_skip_verify = true); anyone on the path can impersonate them"
                );
            }
            let server_name = match &u.server_name {
                Some(n) => Some(
                    ServerName::try_from(n.clone())
                        .map_err(|_| format!("{n:?} is not a server name"))?,
                ),
                None => None,
            };
            Ok(Connector {
                connector: futures_rustls::TlsConnector::from(Arc::new(config)),
                server_name,
            })
        }

        /// The client side of a handshake on `stream` to `host` (the backend's host name, its
        /// SNI and the name its certificate must carry, unless `server_name` overrides it).
        pub async fn connect<S>(&self, host: &str, stream: S) -> io::Result<Stream<S>>
        where
            S: AsyncRead + AsyncWrite + Unpin,
        {
            let name = match &self.server_name {
                Some(n) => n.clone(),
                None => ServerName::try_from(host.to_string()).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{host:?} is not a TLS server name"),
                    )
                })?,
            };
            match self.connector.connect(name, stream).await {
                Ok(s) => Ok(Stream::Client(Box::new(s))),
                Err(e) => Err(io::Error::new(e.kind(), BackendHandshake(e.to_string()))),
            }
        }
    }

    /// Accepts any certificate (`insecure_skip_verify`), still checking the handshake's
    /// signatures so the connection is at least encrypted to whoever holds the key.
    #[derive(Debug)]
    struct NoVerification(Arc<CryptoProvider>);

    impl ServerCertVerifier for NoVerification {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as curl sends it for `example.com`, trimmed to what the parser reads.
    fn hello(name: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        // An extension before SNI, to be skipped: supported_versions (43).
        exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
        if let Some(name) = name {
            let n = name.len() as u16;
            exts.extend_from_slice(&0u16.to_be_bytes());
            exts.extend_from_slice(&(n + 5).to_be_bytes());
            exts.extend_from_slice(&(n + 3).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&n.to_be_bytes());
            exts.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_server_name_is_found() {
        let h = hello(Some("Chat.Example.com"));
        assert_eq!(
            parse_client_hello(&h),
            Hello::Tls(Some("chat.example.com".into()))
        );
        assert_eq!(parse_client_hello(&hello(None)), Hello::Tls(None));
    }

    #[test]
    fn every_prefix_is_incomplete_and_never_a_wrong_answer() {
        let h = hello(Some("a.example"));
        for n in 0..h.len() {
            assert_eq!(parse_client_hello(&h[..n]), Hello::Incomplete, "{n} bytes");
        }
    }

    #[test]
    fn a_hello_split_over_two_records_is_reassembled() {
        let h = hello(Some("split.example"));
        let hs = &h[5..];
        let (a, b) = hs.split_at(20);
        let mut two = vec![22, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[22, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(
            parse_client_hello(&two),
            Hello::Tls(Some("split.example".into()))
        );
    }

    #[test]
    fn plain_http_and_garbage_are_not_tls() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse_client_hello(&[22, 9, 9, 0, 1]), Hello::NotTls);
        let mut h = hello(Some("x.example"));
        h[5] = 2; // a ServerHello
        assert_eq!(parse_client_hello(&h), Hello::NotTls);
        // A truncated extension list inside a complete message.
        let mut h = hello(Some("x.example"));
        let len = h.len();
        h[len - 12] = 0xff;
        assert!(matches!(
            parse_client_hello(&h),
            Hello::NotTls | Hello::Tls(_)
        ));
    }

    #[test]
    fn names_match_exactly_or_by_suffix() {
        let cases = [
            ("chat.example.com", "chat.example.com", true),
            ("chat.example.com", "CHAT.example.com", true),
            ("chat.example.com", "x.chat.example.com", false),
            ("*.example.com", "chat.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(name_matches(pattern, name), want, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn peek_returns_every_byte_it_read() {
        let h = hello(Some("peek.example"));
        let mut input = futures_lite::io::Cursor::new(h[3..].to_vec());
        let (found, bytes) =
            futures_lite::future::block_on(peek_sni(&mut input, h[..3].to_vec())).unwrap();
        assert_eq!(found, Hello::Tls(Some("peek.example".into())));
        assert_eq!(bytes, h);
    }
}
