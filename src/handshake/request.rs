//! The client's request: parsed once with httparse, checked against RFC 9112 framing rules and
//! RFC 6455 §4.2.1, kept as an owned value the flow can route, police and forward.

use httparse::Status;

use super::{base64, has_token, trim, Refusal};

/// The most header lines a request (or a backend's response) may have; one more gets 431. A
/// browser sends 10–20; 100 leaves room for cookies and tracing headers while bounding the
/// parser's stack array (100 × 32 bytes).
pub const MAX_HEADERS: usize = 100;

/// A parsed request head. Header names and values are kept exactly as sent and in order, so that
/// [`forward`](super::forward) can pass them on unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: String,
    target: String,
    /// The `y` in `HTTP/1.y`; httparse only accepts HTTP/1.0 and HTTP/1.1.
    minor: u8,
    headers: Vec<(String, Vec<u8>)>,
}

/// What [`parse_request`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A WebSocket upgrade that passed every check of RFC 6455 §4.2.1: route it, apply policy,
    /// then [`forward`](super::forward) it.
    Upgrade(Request),
    /// A GET that asks for no upgrade at all (no `Upgrade` header, no `upgrade` token in
    /// `Connection`), such as a load balancer's probe. Answer the configured health path with
    /// `response(200, "ok", &[])` and anything else with [`Refusal::NotUpgrade`]. HTTP/1.0 is
    /// accepted here because some probes still send it.
    PlainGet(Request),
}

impl Incoming {
    /// The request, whichever kind it is (for logs).
    pub fn request(&self) -> &Request {
        match self {
            Incoming::Upgrade(r) | Incoming::PlainGet(r) => r,
        }
    }
}

impl Request {
    /// The method, e.g. `GET` (case-sensitive, as HTTP defines it).
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request target as sent: path and query, e.g. `/chat?room=1`. Always starts with `/`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The target's path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }

    /// The minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub fn http_minor(&self) -> u8 {
        self.minor
    }

    /// The first value of header `name` (compared case-insensitively), as sent.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    /// Every value of header `name`, in order.
    pub fn values<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every header line, in order, names as sent.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// The Host header, e.g. `chat.example.com:8080` (checked: ASCII, no spaces, at most one).
    /// `None` only for an HTTP/1.0 [`Incoming::PlainGet`] that sent none.
    pub fn host(&self) -> Option<&str> {
        self.text("host")
    }

    /// The Origin header, if it is UTF-8, trimmed; for an Origin allowlist.
    pub fn origin(&self) -> Option<&str> {
        self.text("origin")
    }

    /// The first value of `name` as trimmed text, if it is UTF-8.
    fn text(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(trim(self.header(name)?)).ok()
    }
}

/// Parses and checks a request head as returned by [`read_head`](super::read_head).
///
/// Checks run in this order, the first failure deciding the answer:
///
/// 1. bytes and lines: NUL, bare CR or bare LF → [`ForbiddenByte`](Refusal::ForbiddenByte);
///    a line starting with whitespace → [`LineFolding`](Refusal::LineFolding);
/// 2. httparse: syntax → [`Malformed`](Refusal::Malformed); more than [`MAX_HEADERS`] →
///    [`TooManyHeaders`](Refusal::TooManyHeaders);
/// 3. the target must be a path → [`BadTarget`](Refusal::BadTarget);
/// 4. Host: [`DuplicateHost`](Refusal::DuplicateHost), [`MissingHost`](Refusal::MissingHost)
///    (HTTP/1.1 only), [`BadHost`](Refusal::BadHost);
/// 5. a GET asking for no upgrade at all is an [`Incoming::PlainGet`]; any other request not
///    asking for exactly `Upgrade: websocket` with `Connection: upgrade` →
///    [`NotUpgrade`](Refusal::NotUpgrade);
/// 6. RFC 6455 §4.2.1: method → [`MethodNotAllowed`](Refusal::MethodNotAllowed), HTTP/1.1 →
///    [`HttpVersion`](Refusal::HttpVersion), no body →
///    [`BodyOnUpgrade`](Refusal::BodyOnUpgrade), version 13 →
///    [`WebSocketVersion`](Refusal::WebSocketVersion), the key → [`BadKey`](Refusal::BadKey).
///
/// Header names and the `upgrade`/`websocket` tokens compare case-insensitively, and tokens are
/// found in comma-separated lists across repeated lines (`Connection: keep-alive, Upgrade`).
///
/// # Examples
///
/// ```
/// use portcullis::handshake::{parse_request, Incoming, Refusal};
///
/// let head = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
///              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
///              Sec-WebSocket-Version: 13\r\n\r\n";
/// let Ok(Incoming::Upgrade(request)) = parse_request(head) else { panic!() };
/// assert_eq!(request.path(), "/chat");
///
/// let head = b"POST /chat HTTP/1.1\r\nHost: example.com\r\n\r\n";
/// assert_eq!(parse_request(head), Err(Refusal::NotUpgrade));
/// ```
pub fn parse_request(head: &[u8]) -> Result<Incoming, Refusal> {
    check_lines(head)?;
    let request = parse(head)?;
    if !request.target.starts_with('/') {
        return Err(Refusal::BadTarget);
    }
    check_host(&request)?;

    let upgrade_websocket = has_token(request.values("upgrade"), "websocket");
    let connection_upgrade = has_token(request.values("connection"), "upgrade");
    if !upgrade_websocket || !connection_upgrade {
        let asks_nothing = request.header("upgrade").is_none() && !connection_upgrade;
        return if asks_nothing && request.method == "GET" {
            Ok(Incoming::PlainGet(request))
        } else {
            Err(Refusal::NotUpgrade)
        };
    }
    if request.method != "GET" {
        return Err(Refusal::MethodNotAllowed);
    }
    if request.minor < 1 {
        return Err(Refusal::HttpVersion);
    }
    if request.header("content-length").is_some() || request.header("transfer-encoding").is_some() {
        return Err(Refusal::BodyOnUpgrade);
    }
    match single(&request, "sec-websocket-version") {
        Some(b"13") => {}
        _ => return Err(Refusal::WebSocketVersion),
    }
    let key = single(&request, "sec-websocket-key").ok_or(Refusal::BadKey)?;
    match base64::decode(key) {
        Some(nonce) if nonce.len() == 16 => {}
        _ => return Err(Refusal::BadKey),
    }
    Ok(Incoming::Upgrade(request))
}

/// Refuses bytes and line shapes that different HTTP parsers read differently: NUL, a CR not
/// followed by LF, an LF not preceded by CR, and a header line starting with whitespace (obsolete
/// folding, or whitespace before the first header). httparse rejects some of these, not all; this
/// gives each its own answer.
fn check_lines(head: &[u8]) -> Result<(), Refusal> {
    for (i, &b) in head.iter().enumerate() {
        let bad = match b {
            0 => true,
            b'\r' => head.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || head[i - 1] != b'\r',
            _ => false,
        };
        if bad {
            return Err(Refusal::ForbiddenByte);
        }
    }
    // Empty lines before the request line are allowed (RFC 9112 §2.2), and httparse skips them.
    let mut lines = head.split(|&b| b == b'\n').skip_while(|l| *l == b"\r");
    lines.next();
    if lines.any(|l| matches!(l.first(), Some(b' ' | b'\t'))) {
        return Err(Refusal::LineFolding);
    }
    Ok(())
}

/// Runs httparse and copies what it found into an owned [`Request`].
fn parse(head: &[u8]) -> Result<Request, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(Status::Complete(_)) => {}
        Ok(Status::Partial) => return Err(Refusal::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders),
        Err(_) => return Err(Refusal::Malformed),
    }
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(Refusal::Malformed);
    };
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        minor,
        headers: parsed
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
    })
}

/// One Host line, required in HTTP/1.1 (RFC 9112 §3.2), holding a host name or address with an
/// optional port. Commas, spaces, `@` and `/` are refused: they are how a Host is made to mean
/// different things to the proxy and to the backend.
fn check_host(request: &Request) -> Result<(), Refusal> {
    let mut hosts = request.values("host");
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    let Some(host) = host.map(trim) else {
        return if request.minor >= 1 {
            Err(Refusal::MissingHost)
        } else {
            Ok(())
        };
    };
    if host.is_empty() {
        return Err(Refusal::MissingHost);
    }
    let valid = |b: &u8| b.is_ascii_alphanumeric() || b"-._~:[]%".contains(b);
    if !host.iter().all(valid) {
        return Err(Refusal::BadHost);
    }
    Ok(())
}

/// The trimmed value of header `name` if it appears exactly once. RFC 6455 §11.3 says
/// `Sec-WebSocket-Key` and `Sec-WebSocket-Version` must not be repeated in a request.
fn single<'a>(request: &'a Request, name: &'a str) -> Option<&'a [u8]> {
    let mut values = request.values(name);
    let value = values.next()?;
    match values.next() {
        Some(_) => None,
        None => Some(trim(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a case should come to: an upgrade, a plain GET, or a refusal with its status.
    #[derive(Debug, PartialEq, Eq)]
    enum Want {
        Upgrade,
        Plain,
        Refused(Refusal, u16),
    }

    fn outcome(head: &[u8]) -> Want {
        match parse_request(head) {
            Ok(Incoming::Upgrade(_)) => Want::Upgrade,
            Ok(Incoming::PlainGet(_)) => Want::Plain,
            Err(r) => Want::Refused(r, r.status()),
        }
    }

    /// A valid upgrade with `line` inserted after the request line (and `line` may be empty).
    fn upgrade_with(line: &str) -> String {
        format!(
            "GET /chat HTTP/1.1\r\n{line}Host: example.com\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
    }

    /// A valid upgrade with every line containing `from` replaced by `to` (removed if empty).
    fn upgrade_replacing(from: &str, to: &str) -> String {
        upgrade_with("")
            .split_inclusive("\r\n")
            .map(|line| {
                if line.contains(from) {
                    to.to_string()
                } else {
                    line.to_string()
                }
            })
            .collect()
    }

    #[test]
    fn malformed_and_refused_requests() {
        use Refusal::*;
        let many_headers: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let cases: Vec<(String, Refusal, u16)> = vec![
            // Syntax.
            ("HELLO\r\n\r\n".into(), Malformed, 400),
            ("GET / HTTP/1.1\r\n".into(), Malformed, 400),
            (
                "GET  /chat HTTP/1.1\r\nHost: a\r\n\r\n".into(),
                Malformed,
                400,
            ),
            (
                "GET /chat HTTP/2.0\r\nHost: a\r\n\r\n".into(),
                Malformed,
                400,
            ),
            ("GET /chat\r\nHost: a\r\n\r\n".into(), Malformed, 400),
            (upgrade_with("Ho st: x\r\n"), Malformed, 400),
            (upgrade_with(": empty name\r\n"), Malformed, 400),
            (upgrade_with("X-Space : before colon\r\n"), Malformed, 400),
            (upgrade_with("X-Del: a\x7fb\r\n"), Malformed, 400),
            (upgrade_with("X-Ctl: a\x01b\r\n"), Malformed, 400),
            (upgrade_with("NoColon\r\n"), Malformed, 400),
            // Bytes that split lines differently in different parsers.
            (upgrade_with("X-Nul: a\0b\r\n"), ForbiddenByte, 400),
            (upgrade_with("X-Nul\0: b\r\n"), ForbiddenByte, 400),
            (upgrade_with("X-Cr: a\rb\r\n"), ForbiddenByte, 400),
            (upgrade_with("X-Lf: a\nb\r\n"), ForbiddenByte, 400),
            (upgrade_with("X-Bare: lf\n"), ForbiddenByte, 400),
            (upgrade_with("X-Fold: a\r\n b\r\n"), LineFolding, 400),
            (upgrade_with("X-Fold: a\r\n\tb\r\n"), LineFolding, 400),
            (upgrade_with(" X-Leading: space\r\n"), LineFolding, 400),
            // Size.
            (upgrade_with(&many_headers), TooManyHeaders, 431),
            // Target.
            (
                upgrade_replacing("GET /chat", "GET http://example.com/chat HTTP/1.1\r\n"),
                BadTarget,
                400,
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".into(),
                BadTarget,
                400,
            ),
            (
                "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n".into(),
                BadTarget,
                400,
            ),
            // Host.
            (upgrade_with("Host: evil.example\r\n"), DuplicateHost, 400),
            (upgrade_with("host: example.com\r\n"), DuplicateHost, 400),
            (upgrade_replacing("Host:", ""), MissingHost, 400),
            (upgrade_replacing("Host:", "Host: \r\n"), MissingHost, 400),
            (
                upgrade_replacing("Host:", "Host: a.example, b.example\r\n"),
                BadHost,
                400,
            ),
            (
                upgrade_replacing("Host:", "Host: a.example b.example\r\n"),
                BadHost,
                400,
            ),
            (
                upgrade_replacing("Host:", "Host: user@a.example\r\n"),
                BadHost,
                400,
            ),
            (
                upgrade_replacing("Host:", "Host: a.example/path\r\n"),
                BadHost,
                400,
            ),
            // Not an upgrade.
            (
                "POST /chat HTTP/1.1\r\nHost: a\r\n\r\n".into(),
                NotUpgrade,
                400,
            ),
            (upgrade_replacing("Upgrade: websocket", ""), NotUpgrade, 400),
            (upgrade_replacing("Connection:", ""), NotUpgrade, 400),
            (
                upgrade_replacing("Upgrade: websocket", "Upgrade: h2c\r\n"),
                NotUpgrade,
                400,
            ),
            (
                upgrade_replacing("Connection:", "Connection: keep-alive\r\n"),
                NotUpgrade,
                400,
            ),
            (
                upgrade_replacing("Connection:", "Connection: upgraded\r\n"),
                NotUpgrade,
                400,
            ),
            (
                upgrade_replacing("Upgrade: websocket", "Upgrade: websockets\r\n"),
                NotUpgrade,
                400,
            ),
            // RFC 6455 §4.2.1.
            (
                upgrade_replacing("GET /chat", "POST /chat HTTP/1.1\r\n"),
                MethodNotAllowed,
                405,
            ),
            (
                upgrade_replacing("GET /chat", "PUT /chat HTTP/1.1\r\n"),
                MethodNotAllowed,
                405,
            ),
            (
                upgrade_replacing("GET /chat", "get /chat HTTP/1.1\r\n"),
                MethodNotAllowed,
                405,
            ),
            (
                upgrade_replacing("GET /chat", "GET /chat HTTP/1.0\r\n"),
                HttpVersion,
                400,
            ),
            (upgrade_with("Content-Length: 0\r\n"), BodyOnUpgrade, 400),
            (upgrade_with("Content-Length: 5\r\n"), BodyOnUpgrade, 400),
            (
                upgrade_with("Transfer-Encoding: chunked\r\n"),
                BodyOnUpgrade,
                400,
            ),
            (
                upgrade_replacing("Sec-WebSocket-Version", ""),
                WebSocketVersion,
                426,
            ),
            (
                upgrade_replacing("Sec-WebSocket-Version", "Sec-WebSocket-Version: 8\r\n"),
                WebSocketVersion,
                426,
            ),
            (
                upgrade_replacing("Sec-WebSocket-Version", "Sec-WebSocket-Version: 13, 8\r\n"),
                WebSocketVersion,
                426,
            ),
            (
                upgrade_replacing("Sec-WebSocket-Version", "Sec-WebSocket-Version: 013\r\n"),
                WebSocketVersion,
                426,
            ),
            (
                upgrade_with("Sec-WebSocket-Version: 13\r\n"),
                WebSocketVersion,
                426,
            ),
            (upgrade_replacing("Sec-WebSocket-Key", ""), BadKey, 400),
            (
                upgrade_with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
                BadKey,
                400,
            ),
            (
                upgrade_replacing("Sec-WebSocket-Key", "Sec-WebSocket-Key: \r\n"),
                BadKey,
                400,
            ),
            // 15 bytes, 17 bytes.
            (
                upgrade_replacing(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n",
                ),
                BadKey,
                400,
            ),
            (
                upgrade_replacing(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZTE=\r\n",
                ),
                BadKey,
                400,
            ),
            // Padding missing, unused bits set, URL-safe alphabet, a space inside.
            (
                upgrade_replacing(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n",
                ),
                BadKey,
                400,
            ),
            (
                upgrade_replacing(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZR==\r\n",
                ),
                BadKey,
                400,
            ),
            (
                upgrade_replacing(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: -_-_-_-_-_-_-_-_-_-_-w==\r\n",
                ),
                BadKey,
                400,
            ),
            (
                upgrade_replacing(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZS Bub25jZQ==\r\n",
                ),
                BadKey,
                400,
            ),
            (
                upgrade_replacing(
                    "Sec-WebSocket-Key",
                    "Sec-WebSocket-Key: not base64 at all!!!!!\r\n",
                ),
                BadKey,
                400,
            ),
        ];
        assert!(cases.len() >= 30);
        for (head, refusal, status) in &cases {
            assert_eq!(
                outcome(head.as_bytes()),
                Want::Refused(*refusal, *status),
                "{head:?}"
            );
        }
    }

    #[test]
    fn valid_upgrades() {
        let cases: Vec<String> = vec![
            upgrade_with(""),
            // Firefox.
            upgrade_replacing("Connection:", "Connection: keep-alive, Upgrade\r\n"),
            upgrade_replacing("Connection:", "Connection: keep-alive,Upgrade\r\n"),
            upgrade_replacing(
                "Connection:",
                "Connection: keep-alive\r\nConnection: Upgrade\r\n",
            ),
            upgrade_replacing("Connection:", "connection: UPGRADE\r\n"),
            upgrade_replacing("Upgrade: websocket", "Upgrade: WebSocket\r\n"),
            upgrade_replacing("Upgrade: websocket", "UPGRADE: WEBSOCKET\r\n"),
            upgrade_replacing("Upgrade: websocket", "upgrade:websocket\r\n"),
            upgrade_replacing("Upgrade: websocket", "Upgrade: foo, websocket\r\n"),
            upgrade_replacing(
                "Sec-WebSocket-Key",
                "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==   \r\n",
            ),
            upgrade_replacing("Sec-WebSocket-Version", "SEC-WEBSOCKET-VERSION:13\r\n"),
            upgrade_replacing("Host:", "Host: example.com:8080\r\n"),
            upgrade_replacing("Host:", "Host: [::1]:8080\r\n"),
            upgrade_replacing("Host:", "Host: 10.0.0.1\r\n"),
            upgrade_replacing("GET /chat", "GET /chat?room=1&token=abc HTTP/1.1\r\n"),
            upgrade_replacing("GET /chat", "GET / HTTP/1.1\r\n"),
            upgrade_with("Origin: https://example.com\r\nCookie: a=b\r\n"),
            upgrade_with("Sec-WebSocket-Protocol: chat, superchat\r\n"),
            upgrade_with(
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
            ),
            // obs-text in a value is legal HTTP; it is passed on byte for byte.
            upgrade_with("X-Latin1: caf\u{e9}\r\n"),
            format!("\r\n{}", upgrade_with("")),
        ];
        for head in &cases {
            assert_eq!(outcome(head.as_bytes()), Want::Upgrade, "{head:?}");
        }
    }

    #[test]
    fn plain_gets_are_told_apart() {
        let cases: &[(&str, Want)] = &[
            ("GET /health HTTP/1.1\r\nHost: a\r\n\r\n", Want::Plain),
            ("GET /health HTTP/1.0\r\n\r\n", Want::Plain),
            (
                "GET /health HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
                Want::Plain,
            ),
            (
                "GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                Want::Plain,
            ),
            // Asking for an upgrade, even half of one, is not a plain GET.
            (
                "GET /health HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
                Want::Refused(Refusal::NotUpgrade, 400),
            ),
            (
                "GET /health HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n\r\n",
                Want::Refused(Refusal::NotUpgrade, 400),
            ),
            (
                "HEAD /health HTTP/1.1\r\nHost: a\r\n\r\n",
                Want::Refused(Refusal::NotUpgrade, 400),
            ),
            (
                "GET /health HTTP/1.1\r\n\r\n",
                Want::Refused(Refusal::MissingHost, 400),
            ),
        ];
        for (head, want) in cases {
            assert_eq!(&outcome(head.as_bytes()), want, "{head:?}");
        }
    }

    #[test]
    fn accessors_read_what_was_sent() {
        let head = upgrade_with("Origin:  https://example.com \r\nX-Two: 1\r\nx-two: 2\r\n")
            .replace("GET /chat", "GET /chat?room=1");
        let Ok(Incoming::Upgrade(r)) = parse_request(head.as_bytes()) else {
            panic!("not an upgrade: {head:?}");
        };
        assert_eq!(r.method(), "GET");
        assert_eq!(r.target(), "/chat?room=1");
        assert_eq!(r.path(), "/chat");
        assert_eq!(r.http_minor(), 1);
        assert_eq!(r.host(), Some("example.com"));
        assert_eq!(r.origin(), Some("https://example.com"));
        assert_eq!(r.values("X-TWO").collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(
            r.headers().next(),
            Some(("Origin", &b"https://example.com"[..]))
        );
    }
}
