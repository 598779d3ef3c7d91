//! The WebSocket flow end to end on real loopback sockets: clients and backends that are real
//! WebSocket implementations (async-tungstenite here, Python's `websockets` for
//! permessage-deflate, which tungstenite lacks), the proxy (`WsProxy::serve`) on a thread of its
//! own, and a few backends written by hand where a library would not misbehave on purpose. Every
//! socket is bound to `127.0.0.1:0`.
//!
//! Each test runs its backends on an executor of its own and fails, rather than hangs, once
//! [`TEST_LIMIT`] has passed.

use std::future::Future;
use std::io::{self, BufRead, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_net::{TcpListener, TcpStream};
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::handshake::client::Response as ClientResponse;
use async_tungstenite::tungstenite::handshake::derive_accept_key;
use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use async_tungstenite::tungstenite::protocol::frame::Frame;
use async_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures_lite::{future, AsyncReadExt, AsyncWriteExt, StreamExt};
use smol::channel::{Receiver, Sender};
use smol::{Executor, Task, Timer};

use portcullis::{Config, WsProxy};

/// How long one test may take. Generous (a debug build moves 1 MiB in milliseconds), so only a
/// hang reaches it.
const TEST_LIMIT: Duration = Duration::from_secs(30);

/// How soon something that should happen "at once" (an answer, a close, a message through the
/// tunnel) must have happened. Loopback round trips take microseconds; this only absorbs a busy
/// CI machine.
const PROMPTLY: Duration = Duration::from_secs(5);

/// The `Sec-WebSocket-Key` of the raw requests: the example of RFC 6455 §1.3, whose accept value
/// ([`ACCEPT`]) the RFC gives, so a raw client checks the proxy against the RFC and not against
/// the proxy's own code.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The `Sec-WebSocket-Accept` for [`KEY`] (RFC 6455 §1.3).
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Text messages that make the echo backend do something other than echo.
const CLOSE_ME: &str = "close me";
const PING_ME: &str = "ping me";
const FRAGMENT_ME: &str = "fragment me";

/// The close the echo backend starts when asked with [`CLOSE_ME`]: a library-range code and a
/// reason, so a proxy that dropped or rewrote either would be caught.
const BACKEND_CLOSE_CODE: u16 = 4002;
const BACKEND_CLOSE_REASON: &str = "the backend says goodbye";

// ---------------------------------------------------------------------------------------------
// Harness: executor, proxy, backends.
// ---------------------------------------------------------------------------------------------

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

/// `work`, which must finish within [`PROMPTLY`]; `what` names it in the failure.
async fn promptly<T>(what: &str, work: impl Future<Output = T>) -> T {
    within(PROMPTLY, work)
        .await
        .unwrap_or_else(|| panic!("{what}: nothing within {PROMPTLY:?}"))
}

/// A proxy serving on its own thread until [`Proxy::stop`] or until this value is dropped.
struct Proxy {
    addr: SocketAddr,
    /// Dropping it completes the shutdown future `serve` was given.
    stop: Option<Sender<()>>,
    /// What `serve` returned, once it has.
    done: Receiver<Result<(), String>>,
}

impl Proxy {
    /// Serves `proxy` with a short drain, so a finished test does not leave a thread waiting 30 s
    /// on its tunnels.
    fn start(proxy: WsProxy) -> Proxy {
        Proxy::start_draining(proxy.drain_timeout_ms(100))
    }

    /// Serves `proxy` as it is configured.
    fn start_draining(proxy: WsProxy) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = TcpListener::try_from(listener).unwrap();
        let (stop, stopped) = smol::channel::bounded::<()>(1);
        let (finished, done) = smol::channel::bounded(1);
        std::thread::spawn(move || {
            let served = smol::block_on(proxy.serve(listener, async move {
                let _ = stopped.recv().await;
            }));
            if let Err(e) = &served {
                eprintln!("the proxy failed: {e}");
            }
            let _ = finished.send_blocking(served.map_err(|e| e.to_string()));
        });
        Proxy {
            addr,
            stop: Some(stop),
            done,
        }
    }

    /// Completes the shutdown future `serve` was given.
    fn stop(&mut self) {
        self.stop = None;
    }

    /// A proxy as the single `[[ws_proxy]]` section of `toml` describes it.
    fn from_toml(toml: &str) -> Proxy {
        let mut config = Config::parse(toml, "test.toml").expect("a valid test config");
        Proxy::start(WsProxy::from_section(config.ws_proxy.remove(0)))
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// A tungstenite client's upgrade to `path` with extra request `headers`.
    async fn try_open(
        &self,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<(WebSocketStream<TcpStream>, ClientResponse), WsError> {
        let mut request = self.url(path).into_client_request().unwrap();
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, value.parse().expect("a valid header value"));
        }
        let stream = self.connect().await;
        promptly(
            &format!("upgrade to {path}"),
            async_tungstenite::client_async(request, stream),
        )
        .await
    }

    /// An upgraded tungstenite client on `path`; panics if the upgrade fails.
    async fn open(&self, path: &str) -> WebSocketStream<TcpStream> {
        match self.try_open(path, &[]).await {
            Ok((ws, _)) => ws,
            Err(e) => panic!("upgrade to {path} through the proxy failed: {e}"),
        }
    }
}

/// What a backend saw of one upgrade request.
#[derive(Debug, Clone)]
struct Seen {
    /// The request line, e.g. `GET /chat/room1?x=1 HTTP/1.1`.
    line: String,
    /// Every header line, names lower-cased, in order.
    headers: Vec<(String, String)>,
}

impl Seen {
    fn from_request(request: &Request) -> Seen {
        Seen {
            line: format!(
                "{} {} {:?}",
                request.method(),
                request.uri(),
                request.version()
            ),
            headers: request
                .headers()
                .iter()
                .map(|(n, v)| {
                    let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (n.as_str().to_string(), value)
                })
                .collect(),
        }
    }

    /// Every value of header `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of header `name`, which must appear at most once.
    fn header(&self, name: &str) -> Option<&str> {
        match self.all(name)[..] {
            [] => None,
            [one] => Some(one),
            ref many => panic!("{name} appears {} times: {many:?}", many.len()),
        }
    }
}

/// A backend listening on loopback that runs a handler for each connection, counts them, and
/// reports what its handler saw. Dropping it stops accepting.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Each upgrade request, as the backend's WebSocket library parsed it.
    requests: Receiver<Seen>,
    /// Each message the backend received, control frames included, in order.
    messages: Receiver<Message>,
    _accepting: Task<()>,
}

/// Where a backend's handler reports what it saw.
#[derive(Clone)]
struct Report {
    requests: Sender<Seen>,
    messages: Sender<Message>,
}

impl Backend {
    async fn start<F, Fut>(ex: &Arc<Executor<'static>>, serve: F) -> Backend
    where
        F: Fn(TcpStream, Report) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (requests_tx, requests) = smol::channel::unbounded();
        let (messages_tx, messages) = smol::channel::unbounded();
        let report = Report {
            requests: requests_tx,
            messages: messages_tx,
        };
        let count = accepted.clone();
        let spawner = ex.clone();
        let accepting = ex.spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                spawner.spawn(serve(stream, report.clone())).detach();
            }
        });
        Backend {
            addr,
            accepted,
            requests,
            messages,
            _accepting: accepting,
        }
    }

    /// A tungstenite server that echoes text and binary messages and obeys [`CLOSE_ME`],
    /// [`PING_ME`] and [`FRAGMENT_ME`]; it picks no subprotocol.
    async fn echo(ex: &Arc<Executor<'static>>) -> Backend {
        Backend::start(ex, |stream, report| serve_echo(stream, None, report)).await
    }

    /// [`Backend::echo`], choosing subprotocol `protocol` when the client offers it.
    async fn echo_choosing(ex: &Arc<Executor<'static>>, protocol: &'static str) -> Backend {
        Backend::start(ex, move |stream, report| {
            serve_echo(stream, Some(protocol), report)
        })
        .await
    }

    /// A backend written by hand: `serve` gets the stream, the request head it read and the
    /// bytes that came with it.
    async fn raw<F, Fut>(ex: &Arc<Executor<'static>>, serve: F) -> Backend
    where
        F: Fn(TcpStream, String, Vec<u8>, Report) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let serve = Arc::new(serve);
        Backend::start(ex, move |mut stream, report| {
            let serve = serve.clone();
            async move {
                if let Ok((head, rest)) = read_head(&mut stream).await {
                    serve(stream, head, rest, report).await;
                }
            }
        })
        .await
    }

    /// Accepts with a 101 written by hand, with `greeting` in the same write, then echoes as
    /// [`Backend::echo`] does, starting with any frames that came behind the request head
    /// (which tungstenite's own server refuses as junk after the request).
    async fn by_hand(ex: &Arc<Executor<'static>>, greeting: Vec<u8>) -> Backend {
        let greeting = Arc::new(greeting);
        Backend::raw(ex, move |mut stream, head, rest, report| {
            let greeting = greeting.clone();
            async move {
                let key = head
                    .split("\r\n")
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| value.trim().to_string())
                    })
                    .expect("the key was forwarded");
                let mut out = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    derive_accept_key(key.as_bytes())
                )
                .into_bytes();
                out.extend_from_slice(&greeting);
                if stream.write_all(&out).await.is_ok() {
                    let ws = WebSocketStream::from_partially_read(stream, rest, Role::Server, None);
                    echo(ws.await, report).await;
                }
            }
        })
        .await
    }

    /// Reads the request head, then holds the connection open without a word.
    async fn silent(ex: &Arc<Executor<'static>>) -> Backend {
        Backend::raw(ex, |stream, _, _, _| async move {
            let _open = stream;
            future::pending::<()>().await
        })
        .await
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The next upgrade request this backend received.
    async fn request(&self) -> Seen {
        promptly("a request at the backend", self.requests.recv())
            .await
            .unwrap()
    }

    /// The next message this backend received.
    async fn message(&self) -> Message {
        promptly("a message at the backend", self.messages.recv())
            .await
            .unwrap()
    }
}

/// Accepts with tungstenite's own server, reporting the request and choosing `protocol` when
/// the client offers it, then runs [`echo`].
async fn serve_echo(stream: TcpStream, protocol: Option<&'static str>, report: Report) {
    // The error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| {
        let _ = report.requests.try_send(Seen::from_request(request));
        let offered = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|p| Some(p) == protocol);
        if let (true, Some(p)) = (offered, protocol) {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", p.parse().unwrap());
        }
        Ok::<_, ErrorResponse>(response)
    };
    if let Ok(ws) = async_tungstenite::accept_hdr_async(stream, callback).await {
        echo(ws, report).await;
    }
}

/// Echoes text and binary messages and obeys [`CLOSE_ME`], [`PING_ME`] and [`FRAGMENT_ME`],
/// reporting every message received.
async fn echo(mut ws: WebSocketStream<TcpStream>, report: Report) {
    while let Some(Ok(message)) = ws.next().await {
        let _ = report.messages.try_send(message.clone());
        let done = match &message {
            Message::Text(t) if t.as_str() == CLOSE_ME => {
                ws.close(Some(CloseFrame {
                    code: CloseCode::from(BACKEND_CLOSE_CODE),
                    reason: BACKEND_CLOSE_REASON.into(),
                }))
                .await
            }
            Message::Text(t) if t.as_str() == PING_ME => {
                ws.send(Message::Ping(b"from the backend".to_vec().into()))
                    .await
            }
            Message::Text(t) if t.as_str() == FRAGMENT_ME => {
                send_fragments(
                    &mut ws,
                    OpCode::Data(Data::Binary),
                    &[b"frag", b"men", b"ted"],
                )
                .await
            }
            Message::Text(_) | Message::Binary(_) => ws.send(message).await,
            _ => Ok(()),
        };
        if done.is_err() {
            break;
        }
    }
}

/// Sends one message as one frame per part: the first with `opcode`, the rest continuations,
/// FIN only on the last.
async fn send_fragments<S>(
    ws: &mut WebSocketStream<S>,
    opcode: OpCode,
    parts: &[&[u8]],
) -> Result<(), WsError>
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    for (i, part) in parts.iter().enumerate() {
        let op = if i == 0 {
            opcode
        } else {
            OpCode::Data(Data::Continue)
        };
        let last = i + 1 == parts.len();
        ws.send(Message::Frame(Frame::message(part.to_vec(), op, last)))
            .await?;
    }
    Ok(())
}

/// A loopback address that refuses connections for as long as this value lives.
///
/// A port that is bound and then released can be handed to the next `bind` to port 0 by another
/// test, which would then receive connections meant to be refused. So the port is instead the
/// local end of an open outgoing connection: nothing listens on it, so connecting is refused,
/// and while that connection exists no listener can be given the port.
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

    fn target(&self) -> String {
        self.addr.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP and frames, for what a WebSocket library will not send.
// ---------------------------------------------------------------------------------------------

/// A valid upgrade request for `path`, with `extra` header lines (each ending in CRLF) last.
fn upgrade(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         {extra}\r\n"
    )
}

/// `upgrade("/chat", "")` with every line containing `from` replaced by `to` (a whole line with
/// its CRLF, or nothing to remove it).
fn upgrade_replacing(from: &str, to: &str) -> String {
    upgrade("/chat", "")
        .split_inclusive("\r\n")
        .map(|line| if line.contains(from) { to } else { line })
        .collect()
}

/// Reads an HTTP head: everything up to the blank line, and the bytes that came after it.
async fn read_head(stream: &mut TcpStream) -> io::Result<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&got).into_owned(), rest));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&chunk[..n]);
    }
}

/// A response read until the connection closed (or [`PROMPTLY`] passed).
#[derive(Debug)]
struct Answer {
    head: String,
    body: Vec<u8>,
    /// The peer closed (FIN or reset) within [`PROMPTLY`].
    closed: bool,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP/1.1 status line: {:?}", self.head))
    }

    /// The value of the first header `name`.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads what the peer sends until it closes; a reset after a response counts as a close (a
/// server that closes with unread request bytes resets the connection).
async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = within(PROMPTLY, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(e) if is_reset(&e) => return,
                Err(e) => panic!("reading the answer failed: {e}"),
            }
        }
    })
    .await
    .is_some();
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(&got)
            )
        });
    let body = got.split_off(end + 4);
    Answer {
        head: String::from_utf8_lossy(&got[..end]).into_owned(),
        body,
        closed,
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}

/// Sends `request` to the proxy and reads the answer.
async fn exchange(proxy: &Proxy, request: &[u8]) -> Answer {
    let mut stream = proxy.connect().await;
    // A proxy that has already answered and closed may reset the rest of a long request.
    let _ = stream.write_all(request).await;
    read_answer(&mut stream).await
}

/// A masked client frame (RFC 6455 §5.2) with FIN set, for payloads under 126 bytes.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// A server frame (RFC 6455 §5.2) with FIN set, for payloads under 126 bytes.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x80 | opcode, payload.len() as u8];
    frame.extend_from_slice(payload);
    frame
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

/// The next message on `ws`, which must come within [`PROMPTLY`].
async fn next_message(ws: &mut WebSocketStream<TcpStream>) -> Message {
    match promptly("a message at the client", ws.next()).await {
        Some(Ok(m)) => m,
        Some(Err(e)) => panic!("the client's connection failed: {e}"),
        None => panic!("the client's connection ended"),
    }
}

/// Sends `message` and checks the echo backend returns it unchanged.
async fn round_trip(ws: &mut WebSocketStream<TcpStream>, message: Message) {
    ws.send(message.clone()).await.unwrap();
    let back = next_message(ws).await;
    assert!(back == message, "the echo differs from what was sent");
}

fn text(s: &str) -> Message {
    Message::text(s.to_string())
}

// ---------------------------------------------------------------------------------------------
// Messages through the tunnel.
// ---------------------------------------------------------------------------------------------

#[test]
fn text_and_binary_messages_round_trip() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut ws = proxy.open("/chat").await;
        round_trip(&mut ws, text("hello through the proxy")).await;
        assert_eq!(
            backend.message().await,
            text("hello through the proxy"),
            "what the backend received"
        );
        round_trip(&mut ws, text("é ü 中文 🦀")).await;
        round_trip(&mut ws, text("")).await;
        round_trip(&mut ws, Message::binary(vec![0u8, 1, 2, 255, 0])).await;
        round_trip(&mut ws, Message::binary(Vec::new())).await;
    });
}

#[test]
fn pings_are_answered_with_pongs_both_ways() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut ws = proxy.open("/chat").await;

        // The client pings: the backend's library answers with the same payload.
        ws.send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .unwrap();
        assert_eq!(
            next_message(&mut ws).await,
            Message::Pong(b"are you there".to_vec().into())
        );
        assert_eq!(
            backend.message().await,
            Message::Ping(b"are you there".to_vec().into())
        );

        // The backend pings: the client's library answers (as it next reads or writes).
        ws.send(text(PING_ME)).await.unwrap();
        assert_eq!(backend.message().await, text(PING_ME));
        assert_eq!(
            next_message(&mut ws).await,
            Message::Ping(b"from the backend".to_vec().into())
        );
        // The pong goes out with the client's next write, before or after its message.
        round_trip(&mut ws, text("after the ping")).await;
        let next_two = [backend.message().await, backend.message().await];
        assert!(
            next_two.contains(&Message::Pong(b"from the backend".to_vec().into())),
            "{next_two:?}"
        );
    });
}

#[test]
fn a_close_from_the_client_reaches_the_backend_with_its_code_and_reason() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut ws = proxy.open("/chat").await;
        let close = CloseFrame {
            code: CloseCode::from(4001),
            reason: "the client is done".into(),
        };
        ws.close(Some(close.clone())).await.unwrap();
        assert_eq!(backend.message().await, Message::Close(Some(close.clone())));
        // The backend's reply comes back, then the connection ends.
        assert_eq!(next_message(&mut ws).await, Message::Close(Some(close)));
        let end = promptly("the end of the connection", ws.next()).await;
        assert!(end.is_none(), "after the close handshake: {end:?}");
    });
}

#[test]
fn a_close_from_the_backend_reaches_the_client_with_its_code_and_reason() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut ws = proxy.open("/chat").await;
        ws.send(text(CLOSE_ME)).await.unwrap();
        let close = CloseFrame {
            code: CloseCode::from(BACKEND_CLOSE_CODE),
            reason: BACKEND_CLOSE_REASON.into(),
        };
        assert_eq!(
            next_message(&mut ws).await,
            Message::Close(Some(close.clone()))
        );
        // The client's library replies as it reads on; the backend gets the reply.
        let end = promptly("the end of the connection", ws.next()).await;
        assert!(end.is_none(), "after the close handshake: {end:?}");
        assert_eq!(backend.message().await, text(CLOSE_ME));
        assert_eq!(backend.message().await, Message::Close(Some(close)));
    });
}

#[test]
fn fragmented_messages_arrive_reassembled_both_ways() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut ws = proxy.open("/chat").await;

        // Client to backend: three frames, FIN on the last only.
        send_fragments(
            &mut ws,
            OpCode::Data(Data::Text),
            &[b"hel", b"lo, frag", b"mented world"],
        )
        .await
        .unwrap();
        assert_eq!(backend.message().await, text("hello, fragmented world"));
        assert_eq!(next_message(&mut ws).await, text("hello, fragmented world"));

        // Backend to client.
        ws.send(text(FRAGMENT_ME)).await.unwrap();
        assert_eq!(
            next_message(&mut ws).await,
            Message::binary(b"fragmented".to_vec())
        );
    });
}

#[test]
fn one_mib_messages_cross_both_ways_intact() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut ws = proxy.open("/chat").await;
        let binary = Message::binary(pattern(7, 1 << 20));
        round_trip(&mut ws, binary.clone()).await;
        assert!(backend.message().await == binary, "the backend's copy");
        let big_text: String = (0..1 << 20)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        round_trip(&mut ws, text(&big_text)).await;
    });
}

#[test]
fn many_messages_in_flight_both_ways_arrive_in_order() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let (mut tx, mut rx) = proxy.open("/chat").await.split();
        // Each message carries its number and a pattern; 200 × 16 KiB is far more than the
        // socket buffers hold, so the client's writes, the echo and its reads overlap.
        let message = |i: u32| {
            let mut m = i.to_be_bytes().to_vec();
            m.extend_from_slice(&pattern(i, 16 * 1024));
            Message::binary(m)
        };
        const COUNT: u32 = 200;
        let send = async {
            for i in 0..COUNT {
                tx.send(message(i)).await.unwrap();
            }
        };
        let receive = async {
            for i in 0..COUNT {
                let got = promptly("the next echo", rx.next()).await;
                assert!(
                    matches!(&got, Some(Ok(m)) if *m == message(i)),
                    "message {i} is missing, altered or out of order"
                );
            }
        };
        future::zip(send, receive).await;
    });
}

#[test]
fn an_idle_tunnel_outlives_the_read_timeout() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]).read_timeout_ms(200));
        let mut ws = proxy.open("/chat").await;
        round_trip(&mut ws, text("before")).await;
        Timer::after(Duration::from_millis(600)).await;
        round_trip(&mut ws, text("after three read timeouts of silence")).await;
    });
}

#[test]
fn after_shutdown_an_open_tunnel_goes_on_until_its_close_handshake() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let mut proxy =
            Proxy::start_draining(WsProxy::new([backend.target()]).drain_timeout_ms(10_000));
        let mut ws = proxy.open("/chat").await;
        round_trip(&mut ws, text("before the shutdown")).await;

        proxy.stop();
        // The shutdown is seen on the proxy's thread; a pause too short cannot make this pass
        // wrongly, only miss the drain.
        Timer::after(Duration::from_millis(200)).await;
        round_trip(&mut ws, text("during the drain")).await;
        assert!(proxy.done.is_empty(), "serve returned with a tunnel open");

        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = promptly("the end of the tunnel", ws.next()).await {}
        // The relay ends when both sides have closed their TCP connection, not at the close
        // frames: the client's socket is closed when it is dropped.
        drop(ws);
        let served = promptly("serve's return after the last tunnel", proxy.done.recv()).await;
        assert_eq!(served, Ok(Ok(())));
        assert_eq!(backend.accepted(), 1);
    });
}

// ---------------------------------------------------------------------------------------------
// The handshake: what the client gets, what the backend gets.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_subprotocol_the_backend_chooses_reaches_the_client() {
    run(|ex| async move {
        let backend = Backend::echo_choosing(&ex, "b").await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let (mut ws, response) = proxy
            .try_open("/chat", &[("sec-websocket-protocol", "a, b")])
            .await
            .unwrap();
        assert_eq!(
            response.headers().get("sec-websocket-protocol").unwrap(),
            "b"
        );
        let seen = backend.request().await;
        assert_eq!(seen.all("sec-websocket-protocol").join(", "), "a, b");
        round_trip(&mut ws, text("speaking b")).await;
    });
}

#[test]
fn a_greeting_sent_with_the_101_reaches_the_client() {
    run(|ex| async move {
        // The 101 and the first frame leave in one write, so the proxy reads them together.
        let backend = Backend::by_hand(&ex, server_frame(0x1, b"welcome")).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut ws = proxy.open("/chat").await;
        assert_eq!(next_message(&mut ws).await, text("welcome"));
        round_trip(&mut ws, text("thanks")).await;
    });
}

#[test]
fn frames_pipelined_behind_the_request_head_reach_the_backend() {
    run(|ex| async move {
        let backend = Backend::by_hand(&ex, Vec::new()).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut stream = proxy.connect().await;
        let mut out = upgrade("/chat", "").into_bytes();
        out.extend_from_slice(&client_frame(0x1, b"sent before the 101"));
        stream.write_all(&out).await.unwrap();

        assert_eq!(backend.message().await, text("sent before the 101"));
        let (head, mut rest) = promptly("the 101", read_head(&mut stream)).await.unwrap();
        check_101(&head, "a head with a frame behind it");
        let echo = server_frame(0x1, b"sent before the 101");
        while rest.len() < echo.len() {
            let mut chunk = [0u8; 256];
            let n = promptly("the echo", stream.read(&mut chunk)).await.unwrap();
            assert!(n > 0, "the connection ended before the echo");
            rest.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(rest, echo);
    });
}

/// Sends a raw `request` and checks the proxy upgrades it with the backend's 101.
async fn assert_upgraded(proxy: &Proxy, request: &str, what: &str) {
    let mut stream = proxy.connect().await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let (head, _) = promptly(what, read_head(&mut stream))
        .await
        .unwrap_or_else(|e| panic!("{what}: no 101 ({e})"));
    check_101(&head, what);
}

/// Checks that `head` is a 101 completing the handshake of a request with [`KEY`].
fn check_101(head: &str, what: &str) {
    assert!(head.starts_with("HTTP/1.1 101 "), "{what}: {head}");
    let accept = format!("\r\nsec-websocket-accept: {}", ACCEPT.to_ascii_lowercase());
    assert!(
        head.to_ascii_lowercase().contains(&accept),
        "{what}: {head}"
    );
}

#[test]
fn upgrades_shaped_as_browsers_and_libraries_send_them_are_accepted() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let cases: Vec<(&str, String)> = vec![
            ("as built here", upgrade("/chat", "")),
            // Firefox.
            (
                "Connection: keep-alive, Upgrade",
                upgrade_replacing("Connection:", "Connection: keep-alive, Upgrade\r\n"),
            ),
            (
                "Upgrade: WebSocket",
                upgrade_replacing("Upgrade: websocket", "Upgrade: WebSocket\r\n"),
            ),
            (
                "lower-case names",
                upgrade("/chat", "").replace("Sec-WebSocket-", "sec-websocket-"),
            ),
            (
                "spaces around values",
                upgrade_replacing("Upgrade: websocket", "Upgrade:   websocket  \r\n"),
            ),
            (
                "Host with a port",
                upgrade_replacing("Host:", "Host: chat.example.com:8080\r\n"),
            ),
            (
                "IPv6 Host",
                upgrade_replacing("Host:", "Host: [::1]:8080\r\n"),
            ),
            (
                "a query and an Origin",
                upgrade(
                    "/chat?room=1&token=x%20y",
                    "Origin: https://chat.example.com\r\n",
                ),
            ),
            (
                "an empty line before the request line",
                format!("\r\n{}", upgrade("/chat", "")),
            ),
        ];
        for (what, request) in &cases {
            assert_upgraded(&proxy, request, what).await;
        }
        assert_eq!(backend.accepted(), cases.len());
    });
}

#[test]
fn a_request_head_of_exactly_the_size_limit_is_accepted_and_one_byte_more_is_not() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        // A head of `len` bytes: the valid upgrade, padded by one header.
        let head = |len: usize| {
            let bare = upgrade("/chat", "X-Pad: \r\n").len();
            upgrade("/chat", &format!("X-Pad: {}\r\n", "p".repeat(len - bare)))
        };
        assert_eq!(head(8192).len(), 8192);
        assert_upgraded(&proxy, &head(8192), "a head of 8192 bytes").await;
        let answer = exchange(&proxy, head(8193).as_bytes()).await;
        assert_eq!(answer.status(), 431, "a head of 8193 bytes");
        assert!(answer.closed);
        assert_eq!(backend.accepted(), 1);
    });
}

#[test]
fn a_request_head_sent_one_byte_at_a_time_is_upgraded() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let mut stream = proxy.connect().await;
        stream.set_nodelay(true).unwrap();
        for byte in upgrade("/chat", "").bytes() {
            stream.write_all(&[byte]).await.unwrap();
            // Long enough for the proxy to read each byte on its own.
            Timer::after(Duration::from_millis(1)).await;
        }
        let (head, rest) = promptly("the 101", read_head(&mut stream)).await.unwrap();
        check_101(&head, "a head sent byte by byte");
        let mut ws = WebSocketStream::from_partially_read(stream, rest, Role::Client, None).await;
        round_trip(&mut ws, text("slowly, then all at once")).await;
    });
}

#[test]
fn the_backend_sees_forwarding_headers_and_its_own_host() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"
            backends = ["{}"]

            [ws_proxy.headers]
            X-Upstream-Token = "s3cret"
            "#,
            backend.target()
        ));
        let headers = [
            ("host", "chat.example.com"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "spoofed.example"),
            ("cookie", "session=42"),
        ];
        let (mut ws, _) = proxy.try_open("/chat", &headers).await.unwrap();
        let seen = backend.request().await;
        assert_eq!(seen.line, "GET /chat HTTP/1.1");
        assert_eq!(seen.header("host"), Some(backend.target().as_str()));
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("203.0.113.9, 127.0.0.1")
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        assert_eq!(seen.header("x-forwarded-host"), Some("chat.example.com"));
        assert_eq!(seen.header("x-upstream-token"), Some("s3cret"));
        assert_eq!(seen.header("cookie"), Some("session=42"));
        round_trip(&mut ws, text("with headers")).await;
    });
}

#[test]
fn preserve_host_passes_the_clients_host() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"
            backends = ["{}"]
            preserve_host = true
            "#,
            backend.target()
        ));
        proxy
            .try_open("/chat", &[("host", "chat.example.com:8080")])
            .await
            .unwrap();
        let seen = backend.request().await;
        assert_eq!(seen.header("host"), Some("chat.example.com:8080"));
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some("chat.example.com:8080")
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Routes and policies.
// ---------------------------------------------------------------------------------------------

#[test]
fn requests_are_routed_by_path_and_rewritten() {
    run(|ex| async move {
        let chat = Backend::echo(&ex).await;
        let feed = Backend::echo(&ex).await;
        let other = Backend::echo(&ex).await;
        let proxy = Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"
            backends = ["{other}"]

            [[ws_proxy.route]]
            path = "/ws/chat"
            rewrite = "/chat"
            backends = ["{chat}"]

            [[ws_proxy.route]]
            path = "/ws/feed"
            backends = ["ws://{feed}/v2"]
            "#,
            other = other.target(),
            chat = chat.target(),
            feed = feed.target(),
        ));
        let cases: &[(&str, &Backend, &str)] = &[
            ("/ws/chat/room1?x=1", &chat, "GET /chat/room1?x=1 HTTP/1.1"),
            ("/ws/chat", &chat, "GET /chat HTTP/1.1"),
            ("/ws/feed/live", &feed, "GET /v2/ws/feed/live HTTP/1.1"),
            // A segment boundary: /ws/chatty is not under /ws/chat.
            ("/ws/chatty", &other, "GET /ws/chatty HTTP/1.1"),
            ("/elsewhere?q=1", &other, "GET /elsewhere?q=1 HTTP/1.1"),
        ];
        for (path, backend, line) in cases {
            let mut ws = proxy.open(path).await;
            assert_eq!(backend.request().await.line, *line, "for {path}");
            round_trip(&mut ws, text(path)).await;
        }
        for backend in [&chat, &feed, &other] {
            assert!(backend.requests.is_empty(), "a request went astray");
        }
    });
}

#[test]
fn routes_naming_the_requests_host_come_before_host_less_ones() {
    run(|ex| async move {
        let chat = Backend::echo(&ex).await;
        let feed = Backend::echo(&ex).await;
        let other = Backend::echo(&ex).await;
        let proxy = Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"
            backends = ["{other}"]

            [[ws_proxy.route]]
            host = "feed.example.com"
            backends = ["{feed}"]

            [[ws_proxy.route]]
            path = "/ws/chat"
            backends = ["{chat}"]
            "#,
            other = other.target(),
            chat = chat.target(),
            feed = feed.target(),
        ));
        let cases: &[(&str, &str, &Backend)] = &[
            ("feed.example.com", "/ws/chat", &feed),
            ("FEED.example.com:8080", "/anything", &feed),
            ("chat.example.com", "/ws/chat/room1", &chat),
            ("chat.example.com", "/anything", &other),
        ];
        for (host, path, backend) in cases {
            let (mut ws, _) = proxy.try_open(path, &[("host", host)]).await.unwrap();
            let seen = backend.request().await;
            assert_eq!(seen.line, format!("GET {path} HTTP/1.1"), "Host {host}");
            round_trip(&mut ws, text(host)).await;
        }
        for backend in [&chat, &feed, &other] {
            assert!(backend.requests.is_empty(), "a request went astray");
        }
    });
}

#[test]
fn a_path_no_route_matches_gets_404() {
    run(|ex| async move {
        let chat = Backend::echo(&ex).await;
        let proxy = Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"

            [[ws_proxy.route]]
            path = "/ws/chat"
            backends = ["{}"]

            [[ws_proxy.route]]
            path = "/ws/feed"
            backends = ["{}"]
            "#,
            chat.target(),
            chat.target(),
        ));
        let answer = exchange(&proxy, upgrade("/ws/other", "").as_bytes()).await;
        assert_eq!(answer.status(), 404);
        assert!(answer.closed);
        proxy.open("/ws/chat/room").await;
        assert_eq!(
            chat.accepted(),
            1,
            "only the routed request reached a backend"
        );
    });
}

#[test]
fn only_listed_origins_are_let_through() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"
            backends = ["{}"]
            allowed_origins = ["https://chat.example.com"]
            "#,
            backend.target()
        ));
        let (mut ws, _) = proxy
            .try_open("/chat", &[("origin", "https://chat.example.com")])
            .await
            .unwrap();
        round_trip(&mut ws, text("from a listed origin")).await;
        for origin in [Some("https://evil.example"), None] {
            let headers: Vec<_> = origin.map(|o| ("origin", o)).into_iter().collect();
            match proxy.try_open("/chat", &headers).await {
                Err(WsError::Http(response)) => {
                    assert_eq!(response.status(), 403, "origin {origin:?}")
                }
                other => panic!("origin {origin:?}: {:?}", other.map(|(_, r)| r)),
            }
        }
        assert_eq!(backend.accepted(), 1, "refused clients reached the backend");
    });
}

#[test]
fn only_allowed_subprotocols_are_offered_to_the_backend() {
    run(|ex| async move {
        let backend = Backend::echo_choosing(&ex, "mqtt").await;
        let proxy = Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"
            backends = ["{}"]
            subprotocols = ["mqtt"]
            "#,
            backend.target()
        ));
        let (mut ws, response) = proxy
            .try_open("/chat", &[("sec-websocket-protocol", "mqtt, x")])
            .await
            .unwrap();
        assert_eq!(
            backend.request().await.all("sec-websocket-protocol"),
            ["mqtt"]
        );
        assert_eq!(
            response.headers().get("sec-websocket-protocol").unwrap(),
            "mqtt"
        );
        round_trip(&mut ws, text("publish")).await;

        match proxy
            .try_open("/chat", &[("sec-websocket-protocol", "x")])
            .await
        {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
            other => panic!("offering only x: {:?}", other.map(|(_, r)| r)),
        }
        assert_eq!(
            backend.accepted(),
            1,
            "the refused client reached the backend"
        );
    });
}

#[test]
fn the_health_path_answers_a_plain_get_and_other_paths_refuse_it() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]).health_path("/healthz"));
        let probes = [
            "GET /healthz HTTP/1.1\r\nHost: lb.example\r\n\r\n",
            "GET /healthz?probe=1 HTTP/1.1\r\nHost: lb.example\r\n\r\n",
            // Some probes still speak HTTP/1.0, without a Host.
            "GET /healthz HTTP/1.0\r\n\r\n",
        ];
        for probe in probes {
            let answer = exchange(&proxy, probe.as_bytes()).await;
            assert_eq!(answer.status(), 200, "{probe:?}");
            assert_eq!(answer.body, b"ok\n");
            assert!(answer.closed);
        }
        let answer = exchange(&proxy, b"GET /other HTTP/1.1\r\nHost: lb.example\r\n\r\n").await;
        assert_eq!(answer.status(), 400);
        assert!(answer.closed);
        // Probes and refusals never reach the backend; upgrades still do.
        proxy.open("/healthz").await;
        assert_eq!(backend.accepted(), 1);
    });
}

// ---------------------------------------------------------------------------------------------
// Malformed and refused requests.
// ---------------------------------------------------------------------------------------------

/// The malformed and refused requests, each with the status it must get. The proxy they are
/// sent to routes `/chat`, `/private` (Origin allowlist) and `/mqtt` (subprotocols = ["mqtt"]),
/// reads heads for at most 1000 ms, and caps them at 8192 bytes.
#[rustfmt::skip]
fn refusal_cases() -> Vec<(&'static str, String, u16)> {
    let many_headers: String = (0..=100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(9000));
    vec![
        // Not HTTP, or not the HTTP a WebSocket needs.
        ("garbage", "HELLO\r\n\r\n".into(), 400),
        ("HTTP/2.0", upgrade_replacing("GET /chat", "GET /chat HTTP/2.0\r\n"), 400),
        ("no HTTP version", upgrade_replacing("GET /chat", "GET /chat\r\n"), 400),
        ("two spaces", upgrade_replacing("GET /chat", "GET  /chat HTTP/1.1\r\n"), 400),
        ("space before colon", upgrade("/chat", "X-Space : v\r\n"), 400),
        ("name without colon", upgrade("/chat", "NoColon\r\n"), 400),
        ("HTTP/1.0 upgrade", upgrade_replacing("GET /chat", "GET /chat HTTP/1.0\r\n"), 400),
        // Request smuggling shapes.
        ("duplicate Host", upgrade("/chat", "Host: evil.example\r\n"), 400),
        ("Content-Length on an upgrade", upgrade("/chat", "Content-Length: 0\r\n"), 400),
        ("Content-Length with a body", upgrade("/chat", "Content-Length: 5\r\n") + "hello", 400),
        ("Transfer-Encoding", upgrade("/chat", "Transfer-Encoding: chunked\r\n"), 400),
        ("obsolete line folding", upgrade("/chat", "X-Fold: a\r\n b\r\n"), 400),
        ("folding with a tab", upgrade("/chat", "X-Fold: a\r\n\tb\r\n"), 400),
        ("NUL in a value", upgrade("/chat", "X-Nul: a\0b\r\n"), 400),
        ("bare CR", upgrade("/chat", "X-Cr: a\rb\r\n"), 400),
        ("bare LF line end", upgrade_replacing("Host:", "Host: chat.example.com\n"), 400),
        ("control byte", upgrade("/chat", "X-Ctl: a\x01b\r\n"), 400),
        // Host.
        ("missing Host", upgrade_replacing("Host:", ""), 400),
        ("empty Host", upgrade_replacing("Host:", "Host: \r\n"), 400),
        ("Host list", upgrade_replacing("Host:", "Host: a.example, b.example\r\n"), 400),
        ("Host with userinfo", upgrade_replacing("Host:", "Host: user@a.example\r\n"), 400),
        // Targets.
        ("absolute-form target", upgrade_replacing("GET /chat", "GET http://a.example/chat HTTP/1.1\r\n"), 400),
        ("asterisk target", "OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n".into(), 400),
        ("CONNECT", "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n".into(), 400),
        // Not an upgrade, or not a WebSocket one.
        ("plain GET", "GET /chat HTTP/1.1\r\nHost: a.example\r\n\r\n".into(), 400),
        ("plain POST", "POST /chat HTTP/1.1\r\nHost: a.example\r\n\r\n".into(), 400),
        ("no Upgrade", upgrade_replacing("Upgrade: websocket", ""), 400),
        ("Upgrade: h2c", upgrade_replacing("Upgrade: websocket", "Upgrade: h2c\r\n"), 400),
        ("no Connection: upgrade", upgrade_replacing("Connection:", "Connection: keep-alive\r\n"), 400),
        // RFC 6455 §4.2.1.
        ("POST upgrade", upgrade_replacing("GET /chat", "POST /chat HTTP/1.1\r\n"), 405),
        ("PUT upgrade", upgrade_replacing("GET /chat", "PUT /chat HTTP/1.1\r\n"), 405),
        ("version 8", upgrade_replacing("Version", "Sec-WebSocket-Version: 8\r\n"), 426),
        ("no version", upgrade_replacing("Version", ""), 426),
        ("version twice", upgrade("/chat", "Sec-WebSocket-Version: 13\r\n"), 426),
        ("no key", upgrade_replacing("Key", ""), 400),
        ("key not base64", upgrade_replacing("Key", "Sec-WebSocket-Key: not*base64!\r\n"), 400),
        ("key of 15 bytes", upgrade_replacing("Key", "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n"), 400),
        ("key twice", upgrade("/chat", &format!("Sec-WebSocket-Key: {KEY}\r\n")), 400),
        // Size.
        ("more than 100 headers", upgrade("/chat", &many_headers), 431),
        ("head over 8192 bytes", upgrade("/chat", &huge_header), 431),
        // Time.
        ("head never finished", "GET /chat HTTP/1.1\r\nHost: a.example\r\n".into(), 408),
        // Routes and policies.
        ("no route", upgrade("/nowhere", ""), 404),
        ("origin not listed", upgrade("/private", "Origin: https://evil.example\r\n"), 403),
        ("origin missing", upgrade("/private", ""), 403),
        ("no allowed subprotocol", upgrade("/mqtt", "Sec-WebSocket-Protocol: x, y\r\n"), 400),
    ]
}

#[test]
fn malformed_and_refused_requests_get_their_status_and_a_closed_connection() {
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Arc::new(Proxy::from_toml(&format!(
            r#"
            [[ws_proxy]]
            listen = "127.0.0.1:0"
            read_timeout_ms = 1000

            [[ws_proxy.route]]
            path = "/chat"
            backends = ["{b}"]

            [[ws_proxy.route]]
            path = "/private"
            backends = ["{b}"]
            allowed_origins = ["https://chat.example.com"]

            [[ws_proxy.route]]
            path = "/mqtt"
            backends = ["{b}"]
            subprotocols = ["mqtt"]
            "#,
            b = backend.target()
        )));
        let cases = refusal_cases();
        assert!(cases.len() >= 30);
        // All at once: the 408 case waits out the read timeout, the others answer at once.
        let tasks: Vec<_> = cases
            .into_iter()
            .map(|(name, request, want)| {
                let proxy = proxy.clone();
                ex.spawn(async move {
                    let answer = exchange(&proxy, request.as_bytes()).await;
                    check_refusal(&answer, want).map_err(|e| format!("{name}: {e}"))
                })
            })
            .collect();
        let mut failures = Vec::new();
        for task in tasks {
            if let Err(e) = task.await {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert_eq!(
            backend.accepted(),
            0,
            "a refused request reached the backend"
        );
    });
}

/// Checks that `answer` is a complete refusal with status `want`, the headers that status calls
/// for, and a closed connection.
fn check_refusal(answer: &Answer, want: u16) -> Result<(), String> {
    let status = answer.status();
    if status != want {
        return Err(format!("got {:?}, want {want}", answer.head.lines().next()));
    }
    let expect = |name: &str, value: &str| match answer.header(name) {
        Some(v) if v == value => Ok(()),
        v => Err(format!("{name}: got {v:?}, want {value:?}")),
    };
    expect("Connection", "close")?;
    expect("Content-Length", &answer.body.len().to_string())?;
    match want {
        405 => expect("Allow", "GET")?,
        426 => expect("Sec-WebSocket-Version", "13")?,
        _ => {}
    }
    if !answer.closed {
        return Err("the connection stayed open".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backends that fail or refuse.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_backend_refusing_the_upgrade_is_heard_by_the_client() {
    run(|ex| async move {
        const REFUSAL: &str = "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\
                               Content-Length: 19\r\n\r\nyou shall not pass\n";
        // It keeps the connection open: the proxy must end the answer at its Content-Length.
        let backend = Backend::raw(&ex, |mut stream, _, _, _| async move {
            stream.write_all(REFUSAL.as_bytes()).await.unwrap();
            future::pending::<()>().await;
        })
        .await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        let answer = exchange(&proxy, upgrade("/chat", "").as_bytes()).await;
        assert_eq!(answer.status(), 403);
        assert_eq!(answer.body, b"you shall not pass\n");
        assert!(answer.closed, "the connection stayed open");
        match proxy.try_open("/chat", &[]).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 403),
            other => panic!("{:?}", other.map(|(_, r)| r)),
        }
    });
}

/// Backend answers to an upgrade of [`KEY`] offering no subprotocol that must not open a
/// tunnel, each named; every one gets the client a 502.
#[rustfmt::skip]
fn bad_upgrade_answers() -> Vec<(&'static str, String)> {
    let ok = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {ACCEPT}\r\n");
    let without = |name: &str| -> String {
        ok.split_inclusive("\r\n").filter(|l| !l.starts_with(name)).collect()
    };
    let many: String = (0..=100).map(|i| format!("X-H{i}: v\r\n")).collect();
    vec![
        ("a wrong accept", without("Sec-WebSocket-Accept") + "Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"),
        ("no accept", without("Sec-WebSocket-Accept") + "\r\n"),
        ("two accepts", format!("{ok}Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n")),
        ("no Upgrade", without("Upgrade") + "\r\n"),
        ("Upgrade: h2c", without("Upgrade") + "Upgrade: h2c\r\n\r\n"),
        ("no Connection", without("Connection") + "\r\n"),
        ("a subprotocol nobody offered", format!("{ok}Sec-WebSocket-Protocol: chat\r\n\r\n")),
        ("more than 100 headers", format!("{ok}{many}\r\n")),
        ("not HTTP", "SSH-2.0-OpenSSH_9.6\r\n\r\n".into()),
        ("a head over 16 KiB", format!("{ok}X-Big: {}\r\n\r\n", "a".repeat(16 * 1024))),
        ("half a head, then a close", "HTTP/1.1 101 Switching".into()),
    ]
}

#[test]
fn a_backend_answer_that_is_not_a_valid_101_gets_the_client_502() {
    run(|ex| async move {
        // Answers the request for /N with case N, then holds the connection open (except the
        // case that closes), so the proxy judges the answer, not the end of the connection.
        let backend = Backend::raw(&ex, |mut stream, head, _, _| async move {
            let n: usize = head
                .split_whitespace()
                .nth(1)
                .and_then(|target| target[1..].parse().ok())
                .expect("a case number");
            let (name, answer) = bad_upgrade_answers().swap_remove(n);
            let _ = stream.write_all(answer.as_bytes()).await;
            if !name.contains("close") {
                future::pending::<()>().await;
            }
        })
        .await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]));
        for (n, (name, _)) in bad_upgrade_answers().iter().enumerate() {
            let answer = exchange(&proxy, upgrade(&format!("/{n}"), "").as_bytes()).await;
            assert_eq!(answer.status(), 502, "a backend answering with {name}");
            assert!(answer.closed, "{name}");
        }
    });
}

#[test]
fn a_backend_refusal_with_a_chunked_body_reaches_the_client_at_once() {
    run(|ex| async move {
        // What Node's `res.writeHead(401); res.end("nope")` sends: no Content-Length, a chunked
        // body, and the connection kept open for the next request.
        const REFUSAL: &str = "HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n\
                               4\r\nnope\r\n0\r\n\r\n";
        let backend = Backend::raw(&ex, |mut stream, _, _, _| async move {
            stream.write_all(REFUSAL.as_bytes()).await.unwrap();
            future::pending::<()>().await;
        })
        .await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]).upgrade_timeout_ms(3_000));
        let mut stream = proxy.connect().await;
        stream
            .write_all(upgrade("/chat", "").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let complete = within(Duration::from_secs(1), async {
            let mut chunk = [0u8; 1024];
            while !got.ends_with(b"0\r\n\r\n") {
                match stream.read(&mut chunk).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
        })
        .await;
        assert!(
            complete.is_some(),
            "the backend's 401 took more than 1 s; so far: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(String::from_utf8_lossy(&got), REFUSAL);
    });
}

#[test]
fn a_refused_backend_gets_the_client_502() {
    run(|_| async move {
        let refused = Refused::new();
        let proxy = Proxy::start(WsProxy::new([refused.target()]));
        let answer = exchange(&proxy, upgrade("/chat", "").as_bytes()).await;
        assert_eq!(answer.status(), 502);
        assert!(answer.closed);
    });
}

#[test]
fn a_backend_that_never_answers_gets_the_client_504_after_the_upgrade_timeout() {
    run(|ex| async move {
        let backend = Backend::silent(&ex).await;
        let proxy = Proxy::start(WsProxy::new([backend.target()]).upgrade_timeout_ms(300));
        let started = Instant::now();
        let answer = exchange(&proxy, upgrade("/chat", "").as_bytes()).await;
        let took = started.elapsed();
        assert_eq!(answer.status(), 504);
        assert!(answer.closed);
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(1500),
            "answered after {took:?}"
        );
    });
}

#[test]
fn a_refused_backend_fails_over_to_the_next() {
    run(|ex| async move {
        let refused = Refused::new();
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([refused.target(), backend.target()]));
        // Round robin starts the first connection at the refused backend and the second at the
        // working one: both are upgraded.
        for i in 0..2 {
            let mut ws = proxy.open("/chat").await;
            round_trip(&mut ws, text(&format!("connection {i}"))).await;
        }
        assert_eq!(backend.accepted(), 2);
    });
}

#[test]
fn a_backend_closing_before_its_answer_fails_over_to_the_next() {
    run(|ex| async move {
        let closing = Backend::raw(&ex, |stream, _, _, _| async move { drop(stream) }).await;
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::start(WsProxy::new([closing.target(), backend.target()]));
        for i in 0..2 {
            let mut ws = proxy.open("/chat").await;
            round_trip(&mut ws, text(&format!("connection {i}"))).await;
        }
        assert_eq!(closing.accepted(), 1);
        assert_eq!(backend.accepted(), 2);
    });
}

#[test]
fn frames_pipelined_behind_the_head_survive_a_failover() {
    run(|ex| async move {
        // Reads the head and what came with it, then hangs up without answering.
        let closing = Backend::raw(&ex, |stream, _, _, _| async move { drop(stream) }).await;
        let backend = Backend::by_hand(&ex, Vec::new()).await;
        let proxy = Proxy::start(WsProxy::new([closing.target(), backend.target()]));
        let mut stream = proxy.connect().await;
        let mut out = upgrade("/chat", "").into_bytes();
        out.extend_from_slice(&client_frame(0x1, b"sent before the 101"));
        stream.write_all(&out).await.unwrap();
        let (head, rest) = promptly("the 101", read_head(&mut stream)).await.unwrap();
        check_101(&head, "after a failover");
        assert_eq!(backend.message().await, text("sent before the 101"));
        let mut ws = WebSocketStream::from_partially_read(stream, rest, Role::Client, None).await;
        assert_eq!(next_message(&mut ws).await, text("sent before the 101"));
        assert_eq!(closing.accepted(), 1, "the first backend was not tried");
    });
}

// ---------------------------------------------------------------------------------------------
// permessage-deflate, between two Python `websockets` peers.
// ---------------------------------------------------------------------------------------------

/// A Python script from `tests/peers/`, killed when dropped.
struct Peer {
    child: Child,
    name: &'static str,
}

impl Peer {
    fn start(name: &'static str, args: &[&str]) -> Peer {
        let script = format!("{}/tests/peers/{name}", env!("CARGO_MANIFEST_DIR"));
        let child = Command::new("python3")
            .arg(&script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 {script}: {e}"));
        Peer { child, name }
    }

    /// The first line of the script's output, within [`PROMPTLY`].
    fn first_line(&mut self) -> String {
        let stdout = self.child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(PROMPTLY) {
            Ok(line) if !line.is_empty() => line.trim().to_string(),
            _ => {
                let name = self.name;
                panic!("{name} printed nothing: {}", self.stderr())
            }
        }
    }

    /// Waits for the script to exit within `limit`; returns its standard output.
    fn output(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                panic!("{} did not finish within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out).unwrap();
        }
        if !status.success() {
            let name = self.name;
            panic!("{name} failed ({status}):\n{out}\n{}", self.stderr());
        }
        out
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = self.child.kill();
            }
            let _ = stderr.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn permessage_deflate_is_negotiated_end_to_end() {
    let mut server = Peer::start("deflate_server.py", &[]);
    let port = server.first_line();
    let proxy = Proxy::start(WsProxy::new([format!("127.0.0.1:{port}")]));
    let mut client = Peer::start("deflate_client.py", &[&proxy.url("/chat")]);
    let out = client.output(TEST_LIMIT);
    let facts: Vec<&str> = out.lines().collect();
    assert!(
        facts[0].starts_with("101 extensions: permessage-deflate"),
        "{out}"
    );
    assert_eq!(
        &facts[1..],
        [
            "client extensions: permessage-deflate",
            "server says: extensions: permessage-deflate",
            "round trips: 6",
        ],
        "{out}"
    );
}

#[cfg(target_os = "linux")]
#[path = "common/sockets.rs"]
mod sockets;

/// A section's `congestion_control` is on both of the proxy's sockets of a tunnel, the
/// client's and the backend's, while the client's own socket keeps the host's default.
#[cfg(target_os = "linux")]
#[test]
fn congestion_control_is_set_on_the_proxys_sockets_to_client_and_backend() {
    let Some((default, other)) = sockets::default_and_other() else {
        return;
    };
    run(|ex| async move {
        let backend = Backend::echo(&ex).await;
        let proxy = Proxy::from_toml(&format!(
            "[[ws_proxy]]\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n\
             congestion_control = \"{other}\"\n",
            backend.target()
        ));
        let mut ws = proxy.open("/chat").await;
        round_trip(&mut ws, text("hello")).await;
        let here = ws.get_ref().local_addr().unwrap();
        sockets::assert_tunnel_runs(proxy.addr, here, backend.addr, &other, &default);
    });
}
