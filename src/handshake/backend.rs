//! The backend's answer to a forwarded upgrade: accepted, refused, or broken.
//!
//! Only a valid 101 opens the tunnel. Its head is then passed to the client byte for byte: the
//! backend's own `Sec-WebSocket-Accept`, `-Protocol` and `-Extensions` are what the client must
//! see, or the two ends disagree about the connection they share.

use std::fmt;

use httparse::Status;

use super::{has_token, trim, Forwarded, Refusal, MAX_HEADERS};

/// What the backend answered, when it answered well-formed HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// A valid 101: write the backend's head bytes, then the bytes that followed it, to the
    /// client, and start relaying.
    Accepted,
    /// The backend answered with another status (401, 403, 404, 503, …): it refused the
    /// upgrade itself. Pass its response to the client unchanged, so the client hears the
    /// backend's own reason, then close.
    Refused {
        /// The backend's status code.
        status: u16,
        /// How many body bytes follow the head, when the head says so: from a single valid
        /// `Content-Length`, or 0 for 1xx, 204 and 304, which never have a body. `None` (chunked,
        /// or no length given) means the body ends when the backend closes, so copy until then,
        /// under a timeout: the backend was sent `Connection: Upgrade`, not `close`, and may
        /// keep the connection open.
        content_length: Option<u64>,
        /// The body is chunked (the last transfer coding is `chunked`): it ends where
        /// [`chunked_body_len`] says, which may be long before the backend closes.
        chunked: bool,
    },
}

/// Why a backend's answer cannot be used. The client gets
/// [`Refusal::BadGateway`] (502) for each; the variant is for the log and for health, which
/// blames the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadResponse {
    /// Not a parsable HTTP response head.
    Malformed,
    /// More header lines than [`MAX_HEADERS`].
    TooManyHeaders,
    /// A 101 without `Upgrade: websocket` and `Connection: upgrade` (RFC 6455 §4.1): it
    /// switched to something else.
    NotWebSocket,
    /// A 101 without `Sec-WebSocket-Accept`.
    MissingAccept,
    /// A 101 whose `Sec-WebSocket-Accept` does not match the key (or appears twice): the
    /// backend did not answer this handshake.
    WrongAccept,
    /// A 101 choosing a subprotocol that was not offered to it, or several.
    UnofferedProtocol,
}

impl fmt::Display for BadResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadResponse::Malformed => "malformed HTTP response",
            BadResponse::TooManyHeaders => "too many header fields in the response",
            BadResponse::NotWebSocket => "101 without Upgrade: websocket and Connection: upgrade",
            BadResponse::MissingAccept => "101 without Sec-WebSocket-Accept",
            BadResponse::WrongAccept => "101 with a wrong Sec-WebSocket-Accept",
            BadResponse::UnofferedProtocol => "101 with a subprotocol that was not offered",
        })
    }
}

impl std::error::Error for BadResponse {}

impl From<BadResponse> for Refusal {
    fn from(_: BadResponse) -> Self {
        Refusal::BadGateway
    }
}

impl Forwarded {
    /// Classifies the backend's response head (as returned by
    /// [`read_head`](super::read_head)) to this request.
    ///
    /// A 101 is [`Accepted`](Response::Accepted) when it has `Upgrade: websocket`,
    /// `Connection: upgrade`, exactly one `Sec-WebSocket-Accept` equal to
    /// base64(SHA-1(key + GUID)) for the key that was forwarded, and at most one subprotocol,
    /// chosen from those offered. Any other status is [`Refused`](Response::Refused).
    ///
    /// # Examples
    ///
    /// ```
    /// use portcullis::handshake::{forward, parse_request, ForwardOptions, Incoming, Response};
    ///
    /// let head = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
    ///              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    ///              Sec-WebSocket-Version: 13\r\n\r\n";
    /// let Ok(Incoming::Upgrade(request)) = parse_request(head) else { panic!() };
    /// let options = ForwardOptions::default();
    /// let sent = forward(&request, "/", "b:9000", [127, 0, 0, 1].into(), &options)?;
    ///
    /// let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
    ///                Connection: Upgrade\r\n\
    ///                Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    /// assert_eq!(sent.check_response(answer), Ok(Response::Accepted));
    ///
    /// let answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
    /// assert_eq!(
    ///     sent.check_response(answer),
    ///     Ok(Response::Refused { status: 403, content_length: Some(0), chunked: false })
    /// );
    /// # Ok::<(), portcullis::handshake::Refusal>(())
    /// ```
    pub fn check_response(&self, head: &[u8]) -> Result<Response, BadResponse> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(head) {
            Ok(Status::Complete(_)) => {}
            Ok(Status::Partial) => return Err(BadResponse::Malformed),
            Err(httparse::Error::TooManyHeaders) => return Err(BadResponse::TooManyHeaders),
            Err(_) => return Err(BadResponse::Malformed),
        }
        let status = parsed.code.ok_or(BadResponse::Malformed)?;
        let values = |name: &'static str| {
            parsed
                .headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        if status != 101 {
            let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
            let coded = values("transfer-encoding").next().is_some();
            let content_length = if bodiless {
                Some(0)
            } else if coded {
                None
            } else {
                single_length(values("content-length"))
            };
            // RFC 9112 §6.3: only a final `chunked` coding makes the body self-delimiting.
            let last_coding = values("transfer-encoding")
                .flat_map(|v| v.split(|&b| b == b','))
                .last()
                .map(trim);
            let chunked =
                !bodiless && last_coding.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
            return Ok(Response::Refused {
                status,
                content_length,
                chunked,
            });
        }
        if !has_token(values("upgrade"), "websocket") || !has_token(values("connection"), "upgrade")
        {
            return Err(BadResponse::NotWebSocket);
        }
        let mut accepts = values("sec-websocket-accept");
        let accept = accepts.next().ok_or(BadResponse::MissingAccept)?;
        if accepts.next().is_some() || trim(accept) != self.accept.as_bytes() {
            return Err(BadResponse::WrongAccept);
        }
        let mut chosen = values("sec-websocket-protocol");
        if let Some(protocol) = chosen.next() {
            let offered = self
                .protocols
                .iter()
                .any(|p| p.as_bytes() == trim(protocol));
            if !offered || chosen.next().is_some() {
                return Err(BadResponse::UnofferedProtocol);
            }
        }
        Ok(Response::Accepted)
    }
}

/// The length of a complete chunked body (RFC 9112 §7.1), trailers included, from its first
/// byte; `None` while it is still incomplete. A malformed chunk-size line ends the body where it
/// stands, so a broken backend cannot keep the client waiting for more.
pub fn chunked_body_len(body: &[u8]) -> Option<usize> {
    let line_end = |from: usize| {
        body.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| from + i)
    };
    let mut at = 0;
    loop {
        let eol = line_end(at)?;
        let size = std::str::from_utf8(&body[at..eol])
            .ok()
            .and_then(|l| l.split(';').next())
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let Some(size) = size else {
            return Some(eol + 2);
        };
        at = eol + 2;
        if size == 0 {
            // Trailer lines, then the blank line.
            loop {
                let eol = line_end(at)?;
                if eol == at {
                    return Some(at + 2);
                }
                at = eol + 2;
            }
        }
        at = at.checked_add(size)?.checked_add(2)?;
        if at > body.len() {
            return None;
        }
    }
}

/// The value of a `Content-Length` that appears once and is plain digits; anything else (absent,
/// repeated, signed, a list) leaves the length unknown rather than guessed.
fn single_length<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Option<u64> {
    let value = trim(values.next()?);
    if values.next().is_some() || value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{forward, parse_request, ForwardOptions, Incoming};

    /// A request offering `chat` and `superchat`, as forwarded with the default options.
    fn sent() -> Forwarded {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Protocol: chat, superchat\r\n\r\n";
        let Ok(Incoming::Upgrade(request)) = parse_request(head) else {
            panic!("test request refused");
        };
        let client = [127, 0, 0, 1].into();
        forward(&request, "/", "b:1", client, &ForwardOptions::default()).expect("forwarded")
    }

    fn refused(status: u16, content_length: Option<u64>) -> Result<Response, BadResponse> {
        Ok(Response::Refused {
            status,
            content_length,
            chunked: false,
        })
    }

    #[test]
    fn chunked_refusals_are_recognised() {
        let sent = sent();
        let chunked = |status, content_length| {
            Ok(Response::Refused {
                status,
                content_length,
                chunked: true,
            })
        };
        let cases: &[(&[&str], Result<Response, BadResponse>)] = &[
            (
                &["HTTP/1.1 401 Unauthorized", "Transfer-Encoding: chunked"],
                chunked(401, None),
            ),
            (
                &[
                    "HTTP/1.1 401 Unauthorized",
                    "Transfer-Encoding: gzip, Chunked",
                ],
                chunked(401, None),
            ),
            (
                &[
                    "HTTP/1.1 401 Unauthorized",
                    "Transfer-Encoding: chunked, gzip",
                ],
                refused(401, None),
            ),
        ];
        for (lines, want) in cases {
            assert_eq!(
                &sent.check_response(head(lines).as_bytes()),
                want,
                "{lines:?}"
            );
        }
    }

    #[test]
    fn chunked_bodies_end_where_their_last_chunk_says() {
        let cases: &[(&[u8], Option<usize>)] = &[
            (b"4\r\nnope\r\n0\r\n\r\n", Some(14)),
            (b"4\r\nnope\r\n0\r\n\r\nextra", Some(14)),
            (b"4;ext=1\r\nnope\r\n0\r\nX-Trailer: 1\r\n\r\n", Some(34)),
            (b"a\r\n0123456789\r\n0\r\n\r\n", Some(20)),
            (b"4\r\nnope\r\n", None),
            (b"4\r\nno", None),
            (b"4\r\nnope\r\n0\r\n", None),
            (b"", None),
            (b"zz\r\nwhatever", Some(4)),
        ];
        for &(body, want) in cases {
            assert_eq!(
                chunked_body_len(body),
                want,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A head from its lines: CRLF after each, then the blank line.
    fn head(lines: &[&str]) -> String {
        lines.iter().map(|l| format!("{l}\r\n")).collect::<String>() + "\r\n"
    }

    const SWITCHING: &str = "HTTP/1.1 101 Switching Protocols";
    const UPGRADE: &str = "Upgrade: websocket";
    const CONNECTION: &str = "Connection: Upgrade";
    /// The right answer to the key of RFC 6455 §1.3.
    const ACCEPT: &str = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    #[test]
    fn response_classification() {
        use BadResponse::*;
        let many: Vec<String> = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v")).collect();
        let many: Vec<&str> = [SWITCHING]
            .into_iter()
            .chain(many.iter().map(String::as_str))
            .collect();
        let cases: Vec<(&[&str], Result<Response, BadResponse>)> = vec![
            (
                &[SWITCHING, UPGRADE, CONNECTION, ACCEPT],
                Ok(Response::Accepted),
            ),
            (
                &[
                    "HTTP/1.1 101 Web Socket Protocol Handshake",
                    "upgrade: WebSocket",
                    "connection: keep-alive, upgrade",
                    "sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
                ],
                Ok(Response::Accepted),
            ),
            (
                &[
                    SWITCHING,
                    UPGRADE,
                    CONNECTION,
                    ACCEPT,
                    "Sec-WebSocket-Protocol: superchat",
                    "Sec-WebSocket-Extensions: permessage-deflate",
                ],
                Ok(Response::Accepted),
            ),
            (
                &[
                    SWITCHING,
                    UPGRADE,
                    CONNECTION,
                    "Sec-WebSocket-Accept:   s3pPLMBiTxaQ9kYGzzhZRbK+xOo=  ",
                ],
                Ok(Response::Accepted),
            ),
            // Refused by the backend: passed through, body length where the head gives it.
            (
                &["HTTP/1.1 403 Forbidden", "Content-Length: 0"],
                refused(403, Some(0)),
            ),
            (
                &["HTTP/1.1 401 Unauthorized", "content-length:  12 "],
                refused(401, Some(12)),
            ),
            (&["HTTP/1.1 404 Not Found"], refused(404, None)),
            (
                &[
                    "HTTP/1.1 200 OK",
                    "Transfer-Encoding: chunked",
                    "Content-Length: 2",
                ],
                Ok(Response::Refused {
                    status: 200,
                    content_length: None,
                    chunked: true,
                }),
            ),
            (
                &[
                    "HTTP/1.1 400 Bad Request",
                    "Content-Length: 2",
                    "Content-Length: 2",
                ],
                refused(400, None),
            ),
            (
                &["HTTP/1.1 400 Bad Request", "Content-Length: +2"],
                refused(400, None),
            ),
            (
                &[
                    "HTTP/1.1 400 Bad Request",
                    "Content-Length: 99999999999999999999",
                ],
                refused(400, None),
            ),
            (&["HTTP/1.1 204 No Content"], refused(204, Some(0))),
            (
                &["HTTP/1.1 304 Not Modified", "Content-Length: 9"],
                refused(304, Some(0)),
            ),
            (&["HTTP/1.1 100 Continue"], refused(100, Some(0))),
            (&["HTTP/1.0 503 Service Unavailable"], refused(503, None)),
            // A 101 the client could not use: 502.
            (&[SWITCHING, UPGRADE, CONNECTION], Err(MissingAccept)),
            (
                &[
                    SWITCHING,
                    UPGRADE,
                    CONNECTION,
                    "Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                ],
                Err(WrongAccept),
            ),
            // base64 is case-sensitive.
            (
                &[
                    SWITCHING,
                    UPGRADE,
                    CONNECTION,
                    "Sec-WebSocket-Accept: S3PPLMBITXAQ9KYGZZHZRBK+XOO=",
                ],
                Err(WrongAccept),
            ),
            (
                &[SWITCHING, UPGRADE, CONNECTION, ACCEPT, ACCEPT],
                Err(WrongAccept),
            ),
            (&[SWITCHING, CONNECTION, ACCEPT], Err(NotWebSocket)),
            (
                &[SWITCHING, "Upgrade: h2c", CONNECTION, ACCEPT],
                Err(NotWebSocket),
            ),
            (&[SWITCHING, UPGRADE, ACCEPT], Err(NotWebSocket)),
            (
                &[SWITCHING, UPGRADE, "Connection: keep-alive", ACCEPT],
                Err(NotWebSocket),
            ),
            (
                &[
                    SWITCHING,
                    UPGRADE,
                    CONNECTION,
                    ACCEPT,
                    "Sec-WebSocket-Protocol: admin",
                ],
                Err(UnofferedProtocol),
            ),
            (
                &[
                    SWITCHING,
                    UPGRADE,
                    CONNECTION,
                    ACCEPT,
                    "Sec-WebSocket-Protocol: chat, superchat",
                ],
                Err(UnofferedProtocol),
            ),
            (
                &[
                    SWITCHING,
                    UPGRADE,
                    CONNECTION,
                    ACCEPT,
                    "Sec-WebSocket-Protocol: chat",
                    "Sec-WebSocket-Protocol: chat",
                ],
                Err(UnofferedProtocol),
            ),
            (&["SSH-2.0-OpenSSH_9.6"], Err(Malformed)),
            (&["HTTP/1.1 1O1 Switching Protocols"], Err(Malformed)),
            (
                &["HTTP/1.1 101 Switching Protocols", " folded: line"],
                Err(Malformed),
            ),
            (&many, Err(TooManyHeaders)),
        ];
        let sent = sent();
        for (lines, want) in cases {
            let head = head(lines);
            assert_eq!(sent.check_response(head.as_bytes()), want, "{head:?}");
        }
        // A head cut short is not a response.
        let cut = "HTTP/1.1 101 Switching Protocols\r\n";
        assert_eq!(sent.check_response(cut.as_bytes()), Err(Malformed));
    }

    #[test]
    fn a_protocol_filtered_out_is_not_offered() {
        let request = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Protocol: chat, admin\r\n\r\n";
        let Ok(Incoming::Upgrade(request)) = parse_request(request) else {
            panic!("test request refused");
        };
        let options = ForwardOptions {
            subprotocols: Some(vec!["chat".into()]),
            ..ForwardOptions::default()
        };
        let sent = forward(&request, "/", "b:1", [127, 0, 0, 1].into(), &options).expect("sent");
        let answer = head(&[
            SWITCHING,
            UPGRADE,
            CONNECTION,
            ACCEPT,
            "Sec-WebSocket-Protocol: admin",
        ]);
        assert_eq!(
            sent.check_response(answer.as_bytes()),
            Err(BadResponse::UnofferedProtocol)
        );
    }

    #[test]
    fn every_bad_response_is_a_502() {
        assert_eq!(Refusal::from(BadResponse::WrongAccept).status(), 502);
    }
}
