//! Refusals: every answer other than a 101, each a clear HTTP status with a short plain-text body.
//!
//! A client that is refused before its upgrade should learn why, not see a silently closed socket.
//! Every refusal closes the connection (`Connection: close`): after a refused upgrade the
//! client's further bytes cannot be trusted to be HTTP, so no second request is read.

use std::fmt;
use std::io;

use futures_lite::{AsyncWrite, AsyncWriteExt};

use super::is_field;

/// Why a request is not upgraded, and what the client is told.
///
/// The first group is decided by this module ([`parse_request`](super::parse_request),
/// [`forward`](super::forward)); the second by the WebSocket flow, kept here so that every status
/// the proxy answers before a 101 is listed in one table:
///
/// | refusal | status | extra headers |
/// |---|---|---|
/// | [`Malformed`](Refusal::Malformed), [`ForbiddenByte`](Refusal::ForbiddenByte), [`LineFolding`](Refusal::LineFolding), [`BadTarget`](Refusal::BadTarget) | 400 | |
/// | [`MissingHost`](Refusal::MissingHost), [`DuplicateHost`](Refusal::DuplicateHost), [`BadHost`](Refusal::BadHost) | 400 | |
/// | [`TooManyHeaders`](Refusal::TooManyHeaders), [`HeadTooLarge`](Refusal::HeadTooLarge) | 431 | |
/// | [`NotUpgrade`](Refusal::NotUpgrade), [`HttpVersion`](Refusal::HttpVersion), [`BodyOnUpgrade`](Refusal::BodyOnUpgrade), [`BadKey`](Refusal::BadKey), [`NoAllowedSubprotocol`](Refusal::NoAllowedSubprotocol) | 400 | |
/// | [`MethodNotAllowed`](Refusal::MethodNotAllowed) | 405 | `Allow: GET` |
/// | [`WebSocketVersion`](Refusal::WebSocketVersion) | 426 | `Sec-WebSocket-Version: 13` |
/// | [`OriginNotAllowed`](Refusal::OriginNotAllowed) | 403 | |
/// | [`NoRoute`](Refusal::NoRoute) | 404 | |
/// | [`RequestTimeout`](Refusal::RequestTimeout) | 408 | |
/// | [`BadGateway`](Refusal::BadGateway) | 502 | |
/// | [`NoBackend`](Refusal::NoBackend) | 503 | |
/// | [`GatewayTimeout`](Refusal::GatewayTimeout) | 504 | |
///
/// `Display` gives the body's text, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// httparse could not parse the head.
    Malformed,
    /// The head contains a NUL byte, a CR not followed by LF or an LF not preceded by CR: bytes
    /// that proxies and servers split lines on differently (request smuggling).
    ForbiddenByte,
    /// A header line starts with a space or tab (obsolete line folding, RFC 9112 §5.2).
    LineFolding,
    /// More header lines than [`MAX_HEADERS`](super::MAX_HEADERS).
    TooManyHeaders,
    /// The head did not end within the configured `max_request_head_bytes`.
    HeadTooLarge,
    /// The request target is not a path (absolute-form, authority-form, `*`, or a byte that
    /// cannot go on a request line).
    BadTarget,
    /// An HTTP/1.1 request without a Host, or with an empty one (RFC 9112 §3.2).
    MissingHost,
    /// More than one Host line: which one a backend believes is anyone's guess.
    DuplicateHost,
    /// A Host that is not a host name or address with an optional port.
    BadHost,
    /// Not a WebSocket upgrade: no `Upgrade: websocket` together with `Connection: upgrade`.
    NotUpgrade,
    /// An upgrade with a method other than GET (RFC 6455 §4.1).
    MethodNotAllowed,
    /// An upgrade over HTTP/1.0 (RFC 6455 §4.1 requires HTTP/1.1 or higher).
    HttpVersion,
    /// An upgrade carrying `Content-Length` or `Transfer-Encoding`: an upgrade has no body, and
    /// one announced anyway is a request-smuggling shape.
    BodyOnUpgrade,
    /// `Sec-WebSocket-Version` missing, repeated or other than 13 (RFC 6455 §4.4).
    WebSocketVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not base64 for exactly 16 bytes.
    BadKey,
    /// The client offered subprotocols and the route allows none of them.
    NoAllowedSubprotocol,
    /// The route's Origin allowlist does not list the request's Origin.
    OriginNotAllowed,
    /// No route matches the request's Host and path.
    NoRoute,
    /// The client did not finish its request head in time.
    RequestTimeout,
    /// The backend failed: no connection, no head, or an invalid 101.
    BadGateway,
    /// Every backend of the route is marked unhealthy.
    NoBackend,
    /// The backend did not answer the upgrade in time.
    GatewayTimeout,
}

impl Refusal {
    /// The HTTP status code.
    pub fn status(self) -> u16 {
        use Refusal::*;
        match self {
            Malformed | ForbiddenByte | LineFolding | BadTarget | MissingHost | DuplicateHost
            | BadHost | NotUpgrade | HttpVersion | BodyOnUpgrade | BadKey
            | NoAllowedSubprotocol => 400,
            OriginNotAllowed => 403,
            NoRoute => 404,
            MethodNotAllowed => 405,
            RequestTimeout => 408,
            WebSocketVersion => 426,
            TooManyHeaders | HeadTooLarge => 431,
            BadGateway => 502,
            NoBackend => 503,
            GatewayTimeout => 504,
        }
    }

    /// The status's reason phrase, e.g. `Upgrade Required`.
    pub fn reason(self) -> &'static str {
        reason(self.status())
    }

    /// The plain-text body, one short sentence. It names the rule that was broken, so a
    /// developer with curl can fix the request, and says nothing about the backends.
    pub fn body(self) -> &'static str {
        use Refusal::*;
        match self {
            Malformed => "malformed HTTP request",
            ForbiddenByte => "NUL, bare CR or bare LF in the request head",
            LineFolding => "obsolete line folding in the request head",
            TooManyHeaders => "too many header fields",
            HeadTooLarge => "request head too large",
            BadTarget => "the request target must be a path",
            MissingHost => "missing Host header",
            DuplicateHost => "more than one Host header",
            BadHost => "invalid Host header",
            NotUpgrade => "this endpoint only accepts WebSocket upgrades",
            MethodNotAllowed => "a WebSocket upgrade must use GET",
            HttpVersion => "a WebSocket upgrade needs HTTP/1.1",
            BodyOnUpgrade => "a WebSocket upgrade must not have a body",
            WebSocketVersion => "only WebSocket version 13 is supported",
            BadKey => "missing or malformed Sec-WebSocket-Key",
            NoAllowedSubprotocol => "none of the offered subprotocols is allowed",
            OriginNotAllowed => "origin not allowed",
            NoRoute => "no route for this host and path",
            RequestTimeout => "request head not received in time",
            BadGateway => "the backend failed to accept the WebSocket",
            NoBackend => "no healthy backend",
            GatewayTimeout => "the backend did not answer in time",
        }
    }

    /// Headers the status calls for: `Allow` with 405 (RFC 9110 §15.5.6) and
    /// `Sec-WebSocket-Version` with 426 (RFC 6455 §4.4), so the client learns what would work.
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Refusal::MethodNotAllowed => &[("Allow", "GET")],
            Refusal::WebSocketVersion => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        }
    }

    /// The complete response, as [`response`] builds it.
    ///
    /// # Examples
    ///
    /// ```
    /// use portcullis::handshake::Refusal;
    ///
    /// let bytes = Refusal::MethodNotAllowed.to_bytes();
    /// assert!(bytes.starts_with(b"HTTP/1.1 405 Method Not Allowed\r\n"));
    /// assert!(bytes.windows(12).any(|w| w == b"Allow: GET\r\n"));
    /// ```
    pub fn to_bytes(self) -> Vec<u8> {
        response(self.status(), self.body(), self.headers())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.body())
    }
}

impl std::error::Error for Refusal {}

/// The reason phrase for `status`. Clients ignore it (RFC 9112 §4) but people read it.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// A complete response that closes the connection:
///
/// ```text
/// HTTP/1.1 <status> <reason>\r\n
/// Content-Type: text/plain; charset=utf-8\r\n
/// Content-Length: <body length + 1>\r\n
/// Connection: close\r\n
/// <each extra header>\r\n
/// \r\n
/// <body>\n
/// ```
///
/// The body gets a final newline so it prints cleanly in a terminal. An extra header whose name
/// is not a token or whose value holds CR, LF or NUL is left out, so no argument can split the
/// response. Besides refusals this serves the health path's `200`.
///
/// # Examples
///
/// ```
/// let bytes = portcullis::handshake::response(200, "ok", &[]);
/// assert_eq!(
///     bytes,
///     b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
///       Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
/// );
/// ```
pub fn response(status: u16, body: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            reason(status),
            body.len() + 1
        )
        .as_bytes(),
    );
    for (name, value) in headers {
        if is_field(name.as_bytes(), value.as_bytes()) {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out.push(b'\n');
    out
}

/// Writes `refusal`'s response to `writer` and flushes it. The caller closes the connection
/// afterwards; a client that is already gone makes this fail, which changes nothing.
///
/// # Examples
///
/// ```
/// use portcullis::handshake::{write_refusal, Refusal};
///
/// # futures_lite::future::block_on(async {
/// let mut client = Vec::new();
/// write_refusal(&mut client, Refusal::WebSocketVersion).await?;
/// assert!(client.starts_with(b"HTTP/1.1 426 Upgrade Required\r\n"));
/// # std::io::Result::Ok(()) }).unwrap();
/// ```
pub async fn write_refusal<W>(writer: &mut W, refusal: Refusal) -> io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    writer.write_all(&refusal.to_bytes()).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_responses_are_exact() {
        let cases: &[(Refusal, &str)] = &[
            (
                Refusal::MethodNotAllowed,
                "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: 33\r\nConnection: close\r\nAllow: GET\r\n\r\n\
                 a WebSocket upgrade must use GET\n",
            ),
            (
                Refusal::WebSocketVersion,
                "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: 39\r\nConnection: close\r\nSec-WebSocket-Version: 13\r\n\r\n\
                 only WebSocket version 13 is supported\n",
            ),
            (
                Refusal::HeadTooLarge,
                "HTTP/1.1 431 Request Header Fields Too Large\r\n\
                 Content-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: 23\r\nConnection: close\r\n\r\nrequest head too large\n",
            ),
            (
                Refusal::BadGateway,
                "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: 43\r\nConnection: close\r\n\r\n\
                 the backend failed to accept the WebSocket\n",
            ),
        ];
        for (refusal, expected) in cases {
            assert_eq!(
                String::from_utf8_lossy(&refusal.to_bytes()),
                *expected,
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn content_length_counts_the_body() {
        let all = [
            Refusal::Malformed,
            Refusal::ForbiddenByte,
            Refusal::LineFolding,
            Refusal::TooManyHeaders,
            Refusal::HeadTooLarge,
            Refusal::BadTarget,
            Refusal::MissingHost,
            Refusal::DuplicateHost,
            Refusal::BadHost,
            Refusal::NotUpgrade,
            Refusal::MethodNotAllowed,
            Refusal::HttpVersion,
            Refusal::BodyOnUpgrade,
            Refusal::WebSocketVersion,
            Refusal::BadKey,
            Refusal::NoAllowedSubprotocol,
            Refusal::OriginNotAllowed,
            Refusal::NoRoute,
            Refusal::RequestTimeout,
            Refusal::BadGateway,
            Refusal::NoBackend,
            Refusal::GatewayTimeout,
        ];
        for refusal in all {
            let bytes = refusal.to_bytes();
            let text = String::from_utf8(bytes).expect("ASCII");
            let (head, body) = text.split_once("\r\n\r\n").expect("blank line");
            let length = format!("Content-Length: {}\r\n", body.len());
            assert!(head.contains(&length), "{refusal:?}: {text:?}");
            assert_ne!(refusal.reason(), "Unknown", "{refusal:?}");
            assert_eq!(refusal.to_string(), body.trim_end(), "{refusal:?}");
        }
    }

    #[test]
    fn extra_headers_cannot_split_the_response() {
        let bytes = response(
            400,
            "no",
            &[
                ("X-Ok", "1"),
                ("", "empty name"),
                ("Bad Name", "x"),
                ("X-Split", "a\r\nSet-Cookie: evil=1"),
                ("X-Nul", "a\0b"),
            ],
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("\r\nX-Ok: 1\r\n"), "{text}");
        assert!(!text.contains("empty name"), "{text}");
        assert!(!text.contains("Bad Name"), "{text}");
        assert!(!text.contains("evil"), "{text}");
        assert!(!text.contains("X-Nul"), "{text}");
    }
}
