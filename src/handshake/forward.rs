//! The request head the backend sees: the client's own headers, end to end, with the hop-by-hop
//! ones replaced by a clean upgrade and the proxy's `Host` and `X-Forwarded-*` lines.

use std::net::IpAddr;

use super::{accept_key, is_field, tokens, trim, Refusal, Request};
use crate::config::WsRoute;

/// Headers that describe one hop, never the request (RFC 9110 §7.6.1, plus the de-facto
/// Proxy-Connection and Keep-Alive). They are dropped, and the proxy sends its own upgrade.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// How a route passes requests on. One value per route, built once; [`Default`] is what a route
/// with no options gets: Host rewritten to the backend, all three `X-Forwarded-*` headers set,
/// no extra headers, every offered subprotocol passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Pass the client's Host unchanged instead of the backend's `host:port`, for backends that
    /// route or check by the public name.
    pub preserve_host: bool,
    /// Append the client's IP to `X-Forwarded-For` (after any value the client sent, with
    /// `", "`), so the backend sees who connected and not the proxy.
    pub x_forwarded_for: bool,
    /// Set `X-Forwarded-Proto` (`http`, or `https` when [`ForwardOptions::https`]), replacing
    /// any value the client sent.
    pub x_forwarded_proto: bool,
    /// The client came over TLS terminated by the proxy: `X-Forwarded-Proto: https`.
    pub https: bool,
    /// Set `X-Forwarded-Host` to the client's Host, replacing any value the client sent, so a
    /// backend that gets a rewritten Host still knows the public name.
    pub x_forwarded_host: bool,
    /// Headers added to every forwarded request, after the client's. Each replaces any header of
    /// the same name the client sent or this module would set (so `Host` here overrides the Host
    /// rewrite). Names of hop-by-hop or `Sec-WebSocket-*` headers, and lines that are not valid
    /// fields, are ignored: those would break the upgrade or split the head.
    pub headers: Vec<(String, String)>,
    /// When set, only the client's offered subprotocols that are listed (compared exactly, as
    /// RFC 6455 §4.1 says) are passed on; a client that offered some and has none left is
    /// refused with [`Refusal::NoAllowedSubprotocol`].
    pub subprotocols: Option<Vec<String>>,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            preserve_host: false,
            x_forwarded_for: true,
            x_forwarded_proto: true,
            https: false,
            x_forwarded_host: true,
            headers: Vec::new(),
            subprotocols: None,
        }
    }
}

impl From<&WsRoute> for ForwardOptions {
    fn from(route: &WsRoute) -> Self {
        ForwardOptions {
            preserve_host: route.preserve_host,
            x_forwarded_for: route.x_forwarded_for,
            x_forwarded_proto: route.x_forwarded_proto,
            https: false,
            x_forwarded_host: route.x_forwarded_host,
            headers: route.headers.clone(),
            subprotocols: route.subprotocols.clone(),
        }
    }
}

/// A request head ready for the backend, and what the backend's answer must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The head to write to the backend, blank line included. Write the client's
    /// [`Head::rest`](super::Head::rest) right after it.
    pub head: Vec<u8>,
    /// The `Sec-WebSocket-Accept` a valid 101 carries for this request's key.
    pub(super) accept: String,
    /// The subprotocols offered to the backend; its 101 may choose one of these or none.
    pub(super) protocols: Vec<String>,
}

impl Forwarded {
    /// The subprotocols offered to the backend, in the client's order (after filtering).
    pub fn protocols(&self) -> &[String] {
        &self.protocols
    }
}

/// Builds the head sent to `backend` for `request`.
///
/// - `target`: the path and query the backend should see (the route's rewrite applied). It must
///   start with `/` and hold no space or control byte, or the result is
///   [`Refusal::BadTarget`].
/// - `backend`: the backend's `host:port` as the `Host` value, port kept (RFC 9110 §7.2: a Host
///   without the port means the default port, which the backend is rarely on). A value that is
///   not a valid field gives [`Refusal::BadGateway`].
/// - `client`: the peer address's IP, for `X-Forwarded-For` (IPv4-mapped IPv6 is written as
///   IPv4).
///
/// The request line is `<method> <target> HTTP/1.1`. Every other header is passed on unchanged,
/// in order and with its name's spelling (`Origin`, `Cookie`, `Authorization`,
/// `Sec-WebSocket-Key`, `-Version`, `-Extensions`, custom headers), except:
///
/// - hop-by-hop headers are dropped: `Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`,
///   `Trailer`, `Transfer-Encoding`, `Upgrade`, and every header `Connection` names (except
///   `Host` and `Sec-WebSocket-*`, which the upgrade needs end to end); `Connection: Upgrade`
///   and `Upgrade: websocket` follow the client's headers instead;
/// - `Host`, `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and (with a filter)
///   `Sec-WebSocket-Protocol` are written once, in place of the client's first line of that
///   name, or after the client's headers if it sent none;
/// - the configured [`headers`](ForwardOptions::headers) come last.
///
/// # Examples
///
/// ```
/// use portcullis::handshake::{forward, parse_request, ForwardOptions, Incoming};
///
/// let head = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
///              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
///              Sec-WebSocket-Version: 13\r\n\r\n";
/// let Ok(Incoming::Upgrade(request)) = parse_request(head) else { panic!() };
/// let ip = "203.0.113.7".parse().unwrap();
/// let sent = forward(&request, "/chat", "10.0.0.5:9000", ip, &ForwardOptions::default())?;
/// assert_eq!(
///     String::from_utf8_lossy(&sent.head),
///     "GET /chat HTTP/1.1\r\nHost: 10.0.0.5:9000\r\n\
///      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
///      X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: http\r\n\
///      X-Forwarded-Host: example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
/// );
/// # Ok::<(), portcullis::handshake::Refusal>(())
/// ```
pub fn forward(
    request: &Request,
    target: &str,
    backend: &str,
    client: IpAddr,
    options: &ForwardOptions,
) -> Result<Forwarded, Refusal> {
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(Refusal::BadTarget);
    }
    if !is_field(b"Host", backend.as_bytes()) {
        return Err(Refusal::BadGateway);
    }

    // Headers the client itself declared hop-by-hop.
    let named: Vec<&[u8]> = request.values("connection").flat_map(tokens).collect();
    let hop = |name: &str| {
        let required = name.eq_ignore_ascii_case("host") || is_websocket_header(name);
        HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
            || (!required
                && named
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(name.as_bytes())))
    };
    let extra: Vec<&(String, String)> = options
        .headers
        .iter()
        .filter(|(n, v)| is_field(n.as_bytes(), v.as_bytes()) && !hop(n) && !is_websocket_header(n))
        .collect();
    let configured = |name: &str| extra.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    // Client values of a header, unless the client declared it hop-by-hop.
    let kept = |name: &'static str| request.values(name).filter(move |_| !hop(name));

    let offered: Vec<&[u8]> = kept("sec-websocket-protocol").flat_map(tokens).collect();
    let protocols: Vec<String> = offered
        .iter()
        .filter(|p| match &options.subprotocols {
            None => true,
            Some(allowed) => allowed.iter().any(|a| a.as_bytes() == **p),
        })
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    if options.subprotocols.is_some() && !offered.is_empty() && protocols.is_empty() {
        return Err(Refusal::NoAllowedSubprotocol);
    }

    // Headers set here: name, the value (None: drop the client's lines, write nothing), written.
    let mut managed: Vec<(&str, Option<Vec<u8>>, bool)> = Vec::with_capacity(5);
    let mut manage = |on: bool, name: &'static str, value: Option<Vec<u8>>| {
        if on && !configured(name) {
            managed.push((name, value, false));
        }
    };
    let client_host = request.header("host").map(|h| trim(h).to_vec());
    let host = if options.preserve_host {
        client_host.clone()
    } else {
        Some(backend.as_bytes().to_vec())
    };
    manage(true, "Host", host);
    let mut chain: Vec<&[u8]> = kept("x-forwarded-for")
        .map(trim)
        .filter(|v| !v.is_empty())
        .collect();
    let ip = client.to_canonical().to_string();
    chain.push(ip.as_bytes());
    manage(
        options.x_forwarded_for,
        "X-Forwarded-For",
        Some(chain.join(&b", "[..])),
    );
    manage(
        options.x_forwarded_proto,
        "X-Forwarded-Proto",
        Some(
            if options.https {
                &b"https"[..]
            } else {
                b"http"
            }
            .to_vec(),
        ),
    );
    manage(options.x_forwarded_host, "X-Forwarded-Host", client_host);
    let joined = (!protocols.is_empty()).then(|| protocols.join(", ").into_bytes());
    manage(
        options.subprotocols.is_some(),
        "Sec-WebSocket-Protocol",
        joined,
    );

    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(request.method().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        // httparse never yields an empty name; checked anyway, as a stray `: ` line is exactly
        // what breaks httparse-based backends.
        if name.is_empty() || hop(name) || configured(name) {
            continue;
        }
        match managed.iter_mut().find(|m| m.0.eq_ignore_ascii_case(name)) {
            Some((name, value, written)) => {
                if !*written {
                    *written = true;
                    if let Some(v) = value {
                        line(&mut head, name.as_bytes(), b": ", v);
                    }
                }
            }
            None => line(&mut head, name.as_bytes(), b": ", value),
        }
    }
    for (name, value, written) in &managed {
        if let (false, Some(v)) = (written, value) {
            line(&mut head, name.as_bytes(), b": ", v);
        }
    }
    head.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n");
    for (name, value) in extra {
        line(&mut head, name.as_bytes(), b": ", value.as_bytes());
    }
    head.extend_from_slice(b"\r\n");

    let key = request
        .header("sec-websocket-key")
        .map(trim)
        .unwrap_or_default();
    Ok(Forwarded {
        head,
        accept: accept_key(&String::from_utf8_lossy(key)),
        protocols,
    })
}

/// Whether `name` is a `Sec-WebSocket-*` header, in any case.
fn is_websocket_header(name: &str) -> bool {
    let prefix = b"sec-websocket-";
    name.len() >= prefix.len() && name.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Appends `a`, `sep`, `b` and CRLF to `head`.
fn line(head: &mut Vec<u8>, a: &[u8], sep: &[u8], b: &[u8]) {
    head.extend_from_slice(a);
    head.extend_from_slice(sep);
    head.extend_from_slice(b);
    head.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{parse_request, Incoming};

    /// An upgrade request with `lines` between the request line and the upgrade and key lines.
    fn request(lines: &[&str]) -> Request {
        let all = [&["GET /chat HTTP/1.1"], lines, &UPGRADE[..], &KEY_LINES[..]].concat();
        let head = head(&all);
        match parse_request(head.as_bytes()) {
            Ok(Incoming::Upgrade(r)) => r,
            other => panic!("{head:?} parsed as {other:?}"),
        }
    }

    fn options(f: impl FnOnce(&mut ForwardOptions)) -> ForwardOptions {
        let mut o = ForwardOptions::default();
        f(&mut o);
        o
    }

    fn client() -> IpAddr {
        "203.0.113.7".parse().expect("IP")
    }

    /// A head from its lines: CRLF after each, then the blank line.
    fn head(lines: &[&str]) -> String {
        lines.iter().map(|l| format!("{l}\r\n")).collect::<String>() + "\r\n"
    }

    /// The key lines, passed on unchanged.
    const KEY_LINES: [&str; 2] = [
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ];

    /// The upgrade lines every forwarded head ends with (before configured headers).
    const UPGRADE: [&str; 2] = ["Connection: Upgrade", "Upgrade: websocket"];

    /// `X-Forwarded-*` appended with the default options, for a client whose Host is `a.example`.
    const FORWARDED: [&str; 3] = [
        "X-Forwarded-For: 203.0.113.7",
        "X-Forwarded-Proto: http",
        "X-Forwarded-Host: a.example",
    ];

    /// The lines of a forwarded head: request line, `lines`, key lines, then `tail`.
    fn sent(request_line: &str, lines: &[&str], tail: &[&str]) -> String {
        let mut all = vec![request_line];
        all.extend_from_slice(lines);
        all.extend_from_slice(&KEY_LINES);
        all.extend_from_slice(tail);
        head(&all)
    }

    /// The default tail: `X-Forwarded-*`, then the upgrade, then `extra`.
    fn tail<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [&FORWARDED[..], &UPGRADE[..], extra].concat()
    }

    #[test]
    fn rewriting_cases() {
        const GET: &str = "GET /chat HTTP/1.1";
        const BACKEND_HOST: &str = "Host: b.internal:9000";
        let none = ForwardOptions::default();
        let cases: Vec<(&str, &[&str], &str, ForwardOptions, String)> =
            vec![
            (
                "end-to-end headers pass unchanged and in order; Host gets the backend's port",
                &[
                    "Host: a.example",
                    "Origin: https://a.example",
                    "Cookie: s=1; t=2",
                    "Authorization: Bearer x",
                    "X-Custom: 1",
                ],
                "/chat",
                none.clone(),
                sent(
                    GET,
                    &[
                        BACKEND_HOST,
                        "Origin: https://a.example",
                        "Cookie: s=1; t=2",
                        "Authorization: Bearer x",
                        "X-Custom: 1",
                    ],
                    &tail(&[]),
                ),
            ),
            (
                "a rewritten target",
                &["Host: a.example"],
                "/v2/chat?room=1",
                none.clone(),
                sent("GET /v2/chat?room=1 HTTP/1.1", &[BACKEND_HOST], &tail(&[])),
            ),
            (
                "preserve_host keeps the client's Host, port and all",
                &["Host: a.example:8443"],
                "/chat",
                ForwardOptions {
                    preserve_host: true,
                    ..none.clone()
                },
                sent(
                    GET,
                    &["Host: a.example:8443"],
                    &[
                        "X-Forwarded-For: 203.0.113.7",
                        "X-Forwarded-Proto: http",
                        "X-Forwarded-Host: a.example:8443",
                        "Connection: Upgrade",
                        "Upgrade: websocket",
                    ],
                ),
            ),
            (
                "hop-by-hop headers, and those Connection names, are dropped",
                &[
                    "Host: a.example",
                    "Keep-Alive: 300",
                    "Proxy-Connection: keep-alive",
                    "TE: trailers",
                    "Trailer: X",
                    "X-Hop: 1",
                    "X-End: 2",
                    "Connection: X-Hop",
                ],
                "/chat",
                none.clone(),
                sent(GET, &[BACKEND_HOST, "X-End: 2"], &tail(&[])),
            ),
            (
                "Connection cannot strip Host or the handshake headers",
                &[
                    "Host: a.example",
                    "Connection: Host, Sec-WebSocket-Key, Sec-WebSocket-Version",
                ],
                "/chat",
                none.clone(),
                sent(GET, &[BACKEND_HOST], &tail(&[])),
            ),
            (
                "X-Forwarded-For is appended to, every earlier line joined in the first's place",
                &[
                    "Host: a.example",
                    "X-Forwarded-For: 198.51.100.1",
                    "X-A: 1",
                    "X-Forwarded-For: 198.51.100.2, 198.51.100.3",
                ],
                "/chat",
                none.clone(),
                sent(
                    GET,
                    &[
                        BACKEND_HOST,
                        "X-Forwarded-For: 198.51.100.1, 198.51.100.2, 198.51.100.3, 203.0.113.7",
                        "X-A: 1",
                    ],
                    &[&FORWARDED[1..], &UPGRADE[..]].concat(),
                ),
            ),
            (
                "a client's X-Forwarded-For named in Connection is dropped, not appended to",
                &[
                    "Host: a.example",
                    "X-Forwarded-For: 198.51.100.1",
                    "Connection: X-Forwarded-For",
                ],
                "/chat",
                none.clone(),
                sent(GET, &[BACKEND_HOST], &tail(&[])),
            ),
            (
                "X-Forwarded-Proto and -Host replace the client's, in place",
                &[
                    "Host: a.example",
                    "X-Forwarded-Proto: https",
                    "X-Forwarded-Host: spoofed.example",
                ],
                "/chat",
                none.clone(),
                sent(
                    GET,
                    &[BACKEND_HOST, FORWARDED[1], FORWARDED[2]],
                    &[FORWARDED[0], UPGRADE[0], UPGRADE[1]],
                ),
            ),
            (
                "switched off, X-Forwarded-* are neither added nor touched",
                &[
                    "Host: a.example",
                    "X-Forwarded-For: 198.51.100.1",
                    "X-Forwarded-Proto: https",
                ],
                "/chat",
                ForwardOptions {
                    x_forwarded_for: false,
                    x_forwarded_proto: false,
                    x_forwarded_host: false,
                    ..none.clone()
                },
                sent(
                    GET,
                    &[
                        BACKEND_HOST,
                        "X-Forwarded-For: 198.51.100.1",
                        "X-Forwarded-Proto: https",
                    ],
                    &UPGRADE,
                ),
            ),
            (
                "extra headers come last and replace the client's of the same name",
                &["Host: a.example", "X-Api-Key: from-client", "X-Keep: 1"],
                "/chat",
                ForwardOptions {
                    headers: vec![
                        ("X-Api-Key".into(), "secret".into()),
                        ("X-Route".into(), "chat".into()),
                    ],
                    ..none.clone()
                },
                sent(
                    GET,
                    &[BACKEND_HOST, "X-Keep: 1"],
                    &tail(&["X-Api-Key: secret", "X-Route: chat"]),
                ),
            ),
            (
                "an extra Host overrides the rewrite; broken or hop-by-hop extras are ignored",
                &["Host: a.example"],
                "/chat",
                ForwardOptions {
                    headers: vec![
                        ("Host".into(), "chat.internal".into()),
                        ("".into(), "empty name".into()),
                        ("X-Split".into(), "a\r\nX-Evil: 1".into()),
                        ("Connection".into(), "close".into()),
                        ("Sec-WebSocket-Key".into(), "AAAAAAAAAAAAAAAAAAAAAA==".into()),
                    ],
                    ..none.clone()
                },
                sent(GET, &[], &tail(&["Host: chat.internal"])),
            ),
            (
                "subprotocols: only the allowed ones are offered, in the client's order",
                &[
                    "Host: a.example",
                    "Sec-WebSocket-Protocol: jwt.abc, chat.v2",
                    "Sec-WebSocket-Protocol: chat.v1",
                ],
                "/chat",
                ForwardOptions {
                    subprotocols: Some(vec!["chat.v1".into(), "chat.v2".into()]),
                    ..none.clone()
                },
                sent(
                    GET,
                    &[BACKEND_HOST, "Sec-WebSocket-Protocol: chat.v2, chat.v1"],
                    &tail(&[]),
                ),
            ),
            (
                "subprotocols without a filter pass unchanged",
                &["Host: a.example", "Sec-WebSocket-Protocol: jwt.abc, chat.v2"],
                "/chat",
                none.clone(),
                sent(
                    GET,
                    &[BACKEND_HOST, "Sec-WebSocket-Protocol: jwt.abc, chat.v2"],
                    &tail(&[]),
                ),
            ),
            (
                "a filter with nothing offered adds nothing",
                &["Host: a.example"],
                "/chat",
                ForwardOptions {
                    subprotocols: Some(vec!["chat.v1".into()]),
                    ..none.clone()
                },
                sent(GET, &[BACKEND_HOST], &tail(&[])),
            ),
            (
                "obs-text in a value passes byte for byte",
                &["Host: a.example", "X-Name: caf\u{e9}"],
                "/chat",
                none.clone(),
                sent(GET, &[BACKEND_HOST, "X-Name: caf\u{e9}"], &tail(&[])),
            ),
        ];
        for (what, lines, target, options, expected) in cases {
            let request = request(lines);
            let sent = forward(&request, target, "b.internal:9000", client(), &options)
                .unwrap_or_else(|r| panic!("{what}: refused with {r:?}"));
            assert_eq!(String::from_utf8_lossy(&sent.head), expected, "{what}");
            // The backend must see a valid upgrade too.
            let parsed = parse_request(&sent.head);
            assert!(
                matches!(parsed, Ok(Incoming::Upgrade(_))),
                "{what}: {parsed:?}"
            );
        }
    }

    #[test]
    fn ipv4_mapped_and_ipv6_clients() {
        let r = request(&["Host: a.example"]);
        let cases = [
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("2001:db8::1", "2001:db8::1"),
        ];
        for (ip, written) in cases {
            let sent = forward(
                &r,
                "/",
                "b:1",
                ip.parse().expect("IP"),
                &ForwardOptions::default(),
            )
            .expect("forwarded");
            let text = String::from_utf8_lossy(&sent.head).into_owned();
            assert!(
                text.contains(&format!("\r\nX-Forwarded-For: {written}\r\n")),
                "{text}"
            );
        }
    }

    #[test]
    fn refusals() {
        let allow_v1 = options(|o| o.subprotocols = Some(vec!["chat.v1".into()]));
        let cases: Vec<(Request, &str, &str, ForwardOptions, Refusal)> = vec![
            (
                request(&[
                    "Host: a.example",
                    "Sec-WebSocket-Protocol: chat.v2, jwt.abc",
                ]),
                "/",
                "b:1",
                allow_v1.clone(),
                Refusal::NoAllowedSubprotocol,
            ),
            // Allowlists compare exactly.
            (
                request(&["Host: a.example", "Sec-WebSocket-Protocol: Chat.V1"]),
                "/",
                "b:1",
                allow_v1,
                Refusal::NoAllowedSubprotocol,
            ),
            (
                request(&["Host: a"]),
                "chat",
                "b:1",
                ForwardOptions::default(),
                Refusal::BadTarget,
            ),
            (
                request(&["Host: a"]),
                "/a b",
                "b:1",
                ForwardOptions::default(),
                Refusal::BadTarget,
            ),
            (
                request(&["Host: a"]),
                "/a\r\nX: 1",
                "b:1",
                ForwardOptions::default(),
                Refusal::BadTarget,
            ),
            (
                request(&["Host: a"]),
                "/",
                "b:1\r\nX: 1",
                ForwardOptions::default(),
                Refusal::BadGateway,
            ),
        ];
        for (request, target, backend, options, refusal) in cases {
            assert_eq!(
                forward(&request, target, backend, client(), &options),
                Err(refusal),
                "{target:?} {backend:?} {options:?}"
            );
        }
    }

    #[test]
    fn offered_protocols_are_remembered_for_the_response_check() {
        let r = request(&[
            "Host: a",
            "Sec-WebSocket-Protocol: a, b",
            "Sec-WebSocket-Protocol: c",
        ]);
        let all = forward(&r, "/", "b:1", client(), &ForwardOptions::default()).expect("sent");
        assert_eq!(all.protocols(), ["a", "b", "c"]);
        let some = options(|o| o.subprotocols = Some(vec!["c".into(), "a".into()]));
        let filtered = forward(&r, "/", "b:1", client(), &some).expect("sent");
        assert_eq!(filtered.protocols(), ["a", "c"]);
    }
}
