//! Property tests of everything that reads bytes or text a peer or an operator controls: the
//! request-head reader and validator, the backend's response head, the PROXY protocol parser and
//! the config loader. The same properties as the fuzz targets in `fuzz/`, run on every
//! `cargo test` with proptest's default case count:
//!
//! - never panic, whatever the input;
//! - never read past the bound: a parser reports at most the bytes it was given, and a head
//!   reader takes no more than its cap from the stream and leaves what follows the head for the
//!   relay, byte for byte;
//! - a valid input is accepted with the same meaning (a generated upgrade keeps its path, Host
//!   and key; an encoded PROXY header gives back its addresses; a generated config loads to the
//!   values written).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures_lite::future::block_on;
use proptest::prelude::*;

use portcullis::config::BackendConfig;
use portcullis::handshake::{
    accept_key, chunked_body_len, forward, parse_request, read_head, ForwardOptions, Forwarded,
    HeadError, Incoming, Refusal, Response,
};
use portcullis::proxy_protocol::{self, Parsed, Version};
use portcullis::Config;

#[path = "common/segments.rs"]
mod segments;
use segments::Segments;

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

/// Standard base64 with padding, for generated keys (written here, not taken from the crate, so
/// the test does not check the proxy against itself).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The request the response properties answer.
fn forwarded() -> Forwarded {
    let head = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let Ok(Incoming::Upgrade(request)) = parse_request(head) else {
        panic!("the fixture is a valid upgrade")
    };
    forward(
        &request,
        "/chat",
        "10.0.0.5:9000",
        [127, 0, 0, 1].into(),
        &ForwardOptions::default(),
    )
    .expect("the fixture forwards")
}

// ---------------------------------------------------------------------------------------------
// Generators.
// ---------------------------------------------------------------------------------------------

/// A valid upgrade request and what it must parse to.
#[derive(Debug, Clone)]
struct Upgrade {
    head: String,
    target: String,
    path: String,
    host: String,
    key: String,
}

/// A header name in a random ASCII case.
fn cased(name: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, u)| {
                if u {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    })
}

/// Optional whitespace around a header value.
fn ows() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just(""), Just(" "), Just("  "), Just("\t"), Just(" \t")]
}

fn upgrade() -> impl Strategy<Value = Upgrade> {
    let path = "(/[A-Za-z0-9._~!$&'()*+,;=:@%-]{0,12}){1,4}";
    let query = proptest::option::of("[A-Za-z0-9=&._~-]{0,20}");
    let host = (
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]{1,8}){0,3}",
        proptest::option::of(1u16..),
    )
        .prop_map(|(h, port)| match port {
            Some(p) => format!("{h}:{p}"),
            None => h,
        });
    let extra =
        proptest::collection::vec(("X-[A-Za-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?"), 0..8);
    (
        (path, query),
        host,
        any::<[u8; 16]>(),
        (
            cased("host"),
            cased("upgrade"),
            cased("connection"),
            cased("sec-websocket-key"),
            cased("sec-websocket-version"),
        ),
        (ows(), ows(), ows()),
        extra,
        proptest::sample::select(vec![
            "Upgrade",
            "upgrade",
            "keep-alive, Upgrade",
            "Upgrade,keep-alive",
        ]),
        any::<prop::sample::Index>(),
    )
        .prop_map(
            |((path, query), host, nonce, names, (o1, o2, o3), extra, connection, at)| {
                let target = match query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                let key = base64(&nonce);
                let mut lines = vec![
                    format!("{}:{o1}{host}{o2}", names.0),
                    format!("{}:{o1}websocket", names.1),
                    format!("{}: {connection}{o3}", names.2),
                    format!("{}:{o2}{key}{o3}", names.3),
                    format!("{}: 13", names.4),
                ];
                // The extra headers go somewhere among the required ones, in order.
                let split = at.index(lines.len() + 1);
                let tail = lines.split_off(split);
                lines.extend(extra.iter().map(|(n, v)| format!("{n}: {v}")));
                lines.extend(tail);
                let head = format!("GET {target} HTTP/1.1\r\n{}\r\n\r\n", lines.join("\r\n"));
                Upgrade {
                    head,
                    target,
                    path,
                    host,
                    key,
                }
            },
        )
}

/// Bytes that look like an HTTP head often enough to get past the first checks: a valid upgrade
/// with a few random bytes spliced in, or HTTP-ish tokens glued together.
fn headish() -> impl Strategy<Value = Vec<u8>> {
    let spliced = (
        upgrade(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    )
        .prop_map(|(u, edits)| {
            let mut bytes = u.head.into_bytes();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes.insert(i, byte);
            }
            bytes
        });
    let pieces = proptest::collection::vec(
        prop_oneof![
            Just(b"GET ".to_vec()),
            Just(b"/ ".to_vec()),
            Just(b"HTTP/1.1".to_vec()),
            Just(b"HTTP/1.0".to_vec()),
            Just(b"\r\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"Host: a".to_vec()),
            Just(b"Upgrade: websocket".to_vec()),
            Just(b"Connection: Upgrade".to_vec()),
            Just(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".to_vec()),
            Just(b"Sec-WebSocket-Version: 13".to_vec()),
            Just(b"Content-Length: 1".to_vec()),
            Just(b"Transfer-Encoding: chunked".to_vec()),
            Just(b" ".to_vec()),
            Just(b":".to_vec()),
            Just(b"\0".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8),
        ],
        0..40,
    )
    .prop_map(|p| p.concat());
    prop_oneof![spliced, pieces]
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        // IPv4-mapped IPv6, which the version 1 encoder must write in hex groups.
        any::<u32>().prop_map(|a| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())),
        Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// What a header carrying `(source, destination)` must parse back to: the same addresses when
/// both are IPv4, else both as IPv6 (IPv4 ones mapped).
fn as_carried(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    if source.is_ipv4() && destination.is_ipv4() {
        return (source, destination);
    }
    let v6 = |a: SocketAddr| {
        let ip = match a.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            IpAddr::V6(ip) => ip,
        };
        SocketAddr::new(IpAddr::V6(ip), a.port())
    };
    (v6(source), v6(destination))
}

// ---------------------------------------------------------------------------------------------
// The request head.
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn parse_request_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_request(&bytes);
    }

    #[test]
    fn parse_request_never_panics_on_near_heads(bytes in headish()) {
        if let Ok(incoming) = parse_request(&bytes) {
            // Whatever was accepted can be forwarded or refused, never a panic.
            if let Incoming::Upgrade(request) = &incoming {
                let _ = forward(request, request.target(), "b:1", [10, 0, 0, 1].into(), &ForwardOptions::default());
            }
            // An accepted request holds only what the head held.
            prop_assert!(incoming.request().target().len() < bytes.len());
        }
    }

    #[test]
    fn a_valid_upgrade_keeps_its_meaning(u in upgrade()) {
        let parsed = parse_request(u.head.as_bytes());
        let Ok(Incoming::Upgrade(request)) = parsed else {
            return Err(TestCaseError::fail(format!("{parsed:?} for {:?}", u.head)));
        };
        prop_assert_eq!(request.method(), "GET");
        prop_assert_eq!(request.target(), u.target.as_str());
        prop_assert_eq!(request.path(), u.path.as_str());
        prop_assert_eq!(request.host(), Some(u.host.as_str()));
        let key = request.header("sec-websocket-key").map(|k| String::from_utf8_lossy(k).trim().to_string());
        prop_assert_eq!(key.as_deref(), Some(u.key.as_str()));

        // And the backend's 101 for that key is accepted, the client's key end to end.
        let sent = forward(&request, request.target(), "10.0.0.5:9000", [192, 0, 2, 1].into(), &ForwardOptions::default())
            .expect("a valid upgrade forwards");
        let forwarded = String::from_utf8(sent.head.clone()).expect("ASCII");
        prop_assert!(forwarded.starts_with(&format!("GET {} HTTP/1.1\r\n", u.target)), "{}", forwarded);
        prop_assert!(forwarded.contains(&u.key), "{}", forwarded);
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(&u.key)
        );
        prop_assert_eq!(sent.check_response(answer.as_bytes()), Ok(Response::Accepted));
        // The forwarded head is itself a valid upgrade with the same target.
        let again = parse_request(&sent.head);
        prop_assert!(matches!(&again, Ok(Incoming::Upgrade(r)) if r.target() == u.target), "{:?}", again);
    }

    /// A request with a smuggling shape added is refused, whichever the valid request was.
    #[test]
    fn smuggling_shapes_are_refused(u in upgrade(), shape in 0usize..7) {
        let line = match shape {
            0 => format!("Host: {}", u.host),
            1 => "Content-Length: 0\r\nTransfer-Encoding: chunked".to_string(),
            2 => "X-Folded: a\r\n b".to_string(),
            3 => "X-Nul: a\0b".to_string(),
            4 => "X-Cr: a\rb".to_string(),
            5 => "X-N\u{e9}: v".to_string(),
            _ => (0..=100).map(|i| format!("X-{i}: v")).collect::<Vec<_>>().join("\r\n"),
        };
        let head = u.head.replacen("\r\n", &format!("\r\n{line}\r\n"), 1);
        let got = parse_request(head.as_bytes());
        let want = match shape {
            0 => Refusal::DuplicateHost,
            1 => Refusal::BodyOnUpgrade,
            2 => Refusal::LineFolding,
            3 | 4 => Refusal::ForbiddenByte,
            5 => Refusal::Malformed,
            _ => Refusal::TooManyHeaders,
        };
        prop_assert_eq!(got, Err(want), "{:?}", head);
    }

    /// Whatever the stream and however it is segmented: at most `max` bytes are taken from it;
    /// a head found is the stream's first `\r\n\r\n`-terminated prefix, and what follows it
    /// (`rest` plus what was never read) is the rest of the stream, byte for byte.
    #[test]
    fn read_head_stays_within_its_bound(
        stream in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            (headish(), proptest::collection::vec(any::<u8>(), 0..100)).prop_map(|(h, t)| [h, t].concat()),
            (upgrade(), proptest::collection::vec(any::<u8>(), 0..100)).prop_map(|(u, t)| [u.head.into_bytes(), t].concat()),
        ],
        sizes in proptest::collection::vec(0usize..64, 1..8),
        max in 0usize..700,
    ) {
        let mut peer = Segments::new(&stream, sizes);
        let got = block_on(read_head(&mut peer, max));
        prop_assert!(peer.at <= max, "read {} bytes with a cap of {max}", peer.at);
        let end = find(&stream, b"\r\n\r\n").map(|i| i + 4);
        match got {
            Ok(head) => {
                prop_assert_eq!(Some(head.bytes.len()), end);
                prop_assert!(head.bytes.len() <= max);
                prop_assert_eq!(&head.bytes[..], &stream[..head.bytes.len()]);
                let after: Vec<u8> = head.rest.iter().chain(peer.unread()).copied().collect();
                prop_assert_eq!(&after[..], &stream[head.bytes.len()..]);
            }
            Err(HeadError::TooLarge) => prop_assert!(end.is_none_or(|e| e > max)),
            Err(HeadError::Eof { received }) => {
                prop_assert!(end.is_none());
                prop_assert_eq!(received, stream.len());
            }
            Err(HeadError::Io(e)) => return Err(TestCaseError::fail(format!("I/O error {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The backend's response head.
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn check_response_never_panics(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (0u16..1000, proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,20}"), 0..12)).prop_map(|(status, headers)| {
            let mut s = format!("HTTP/1.1 {status} X\r\n");
            for (n, v) in headers {
                s.push_str(&format!("{n}: {v}\r\n"));
            }
            s.push_str("\r\n");
            s.into_bytes()
        }),
    ]) {
        let _ = forwarded().check_response(&bytes);
    }

    #[test]
    fn chunked_body_len_stays_within_the_body(body in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proptest::collection::vec(prop_oneof![
            "[0-9a-fA-F]{1,4}\r\n".prop_map(String::into_bytes),
            Just(b"\r\n".to_vec()),
            Just(b"0\r\n\r\n".to_vec()),
            Just(b";ext=1".to_vec()),
            "[ -~]{0,10}".prop_map(String::into_bytes),
        ], 0..20).prop_map(|p| p.concat()),
    ]) {
        if let Some(n) = chunked_body_len(&body) {
            prop_assert!(n <= body.len(), "{n} > {}", body.len());
        }
    }

    /// A chunked body built from arbitrary chunks is measured to its exact end, whatever follows.
    #[test]
    fn a_chunked_body_is_measured_exactly(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
        after in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut body = Vec::new();
        for c in &chunks {
            body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            body.extend_from_slice(c);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let len = body.len();
        // Every strict prefix is incomplete.
        for cut in [0, len / 2, len - 1] {
            prop_assert_eq!(chunked_body_len(&body[..cut]), None);
        }
        body.extend_from_slice(&after);
        prop_assert_eq!(chunked_body_len(&body), Some(len));
    }

    /// A well-formed answer is classified by what it says.
    #[test]
    fn a_response_keeps_its_meaning(
        status in prop_oneof![200u16..600, 102u16..200],
        length in proptest::option::of(0u64..1_000_000),
        extra in proptest::collection::vec(("X-[A-Za-z0-9-]{1,12}", "[!-~]{0,20}"), 0..6),
        case in any::<bool>(),
    ) {
        let mut head = format!("HTTP/1.1 {status} Whatever\r\n");
        for (n, v) in &extra {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(n) = length {
            head.push_str(&format!("{}: {n}\r\n", if case { "content-length" } else { "Content-Length" }));
        }
        head.push_str("\r\n");
        let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
        let want = Response::Refused {
            status,
            content_length: if bodiless { Some(0) } else { length },
            chunked: false,
        };
        prop_assert_eq!(forwarded().check_response(head.as_bytes()), Ok(want));

        // And a valid 101 with the same extra headers is accepted.
        let mut ok = "HTTP/1.1 101 Switching Protocols\r\n".to_string();
        for (n, v) in &extra {
            ok.push_str(&format!("{n}: {v}\r\n"));
        }
        ok.push_str(&format!(
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_key("dGhlIHNhbXBsZSBub25jZQ==")
        ));
        prop_assert_eq!(forwarded().check_response(ok.as_bytes()), Ok(Response::Accepted));
    }
}

// ---------------------------------------------------------------------------------------------
// The PROXY protocol.
// ---------------------------------------------------------------------------------------------

/// Bytes that start like a PROXY header: a v1 prefix or the v2 signature, then anything.
fn proxyish() -> impl Strategy<Value = Vec<u8>> {
    let v1 = proptest::collection::vec(
        prop_oneof![
            Just(b"TCP4 ".to_vec()),
            Just(b"TCP6 ".to_vec()),
            Just(b"UNKNOWN".to_vec()),
            Just(b" ".to_vec()),
            Just(b"\r\n".to_vec()),
            "[0-9]{1,6}".prop_map(String::into_bytes),
            "[0-9.:a-f]{1,20}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..4),
        ],
        0..14,
    )
    .prop_map(|p| [b"PROXY ".to_vec(), p.concat()].concat());
    let v2 = (
        any::<u8>(),
        any::<u8>(),
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(version, family, len, data)| {
            let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            out.push(version);
            out.push(family);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&data);
            out
        });
    // Valid v2 headers with a short length, family byte and TLVs chosen at random.
    let v2_tlvs = (
        prop_oneof![Just(0x20u8), Just(0x21u8)],
        proptest::sample::select(vec![0x00u8, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x13]),
        proptest::collection::vec(any::<u8>(), 0..240),
        proptest::collection::vec(
            (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..20)),
            0..5,
        ),
    )
        .prop_map(|(cmd, family, addrs, tlvs)| {
            let mut data = addrs;
            for (t, v) in tlvs {
                data.push(t);
                data.extend_from_slice(&(v.len() as u16).to_be_bytes());
                data.extend_from_slice(&v);
            }
            let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            out.push(cmd);
            out.push(family);
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(&data);
            out
        });
    prop_oneof![v1, v2, v2_tlvs]
}

proptest! {
    #[test]
    fn proxy_parse_stays_within_its_input(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        proxyish(),
    ]) {
        match proxy_protocol::parse(&bytes) {
            Ok(Parsed::Complete { header_len, .. }) => {
                prop_assert!(header_len <= bytes.len());
                prop_assert!(header_len <= proxy_protocol::MAX_HEADER_LEN);
                // The same header is found whatever follows it.
                let mut more = bytes[..header_len].to_vec();
                more.extend_from_slice(b"GET / HTTP/1.1\r\n");
                let again = proxy_protocol::parse(&more);
                prop_assert!(
                    matches!(again, Ok(Parsed::Complete { header_len: n, .. }) if n == header_len),
                    "{:?}",
                    again
                );
            }
            Ok(Parsed::Incomplete) => {
                prop_assert!(bytes.len() < proxy_protocol::MAX_HEADER_LEN);
            }
            Err(_) => {}
        }
    }

    /// An encoded header parses back to its addresses and its own length, with any stream bytes
    /// behind it left alone; every strict prefix of it is incomplete, never an error.
    #[test]
    fn proxy_headers_round_trip(
        source in socket_addr(),
        destination in socket_addr(),
        v2 in any::<bool>(),
        after in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let version = if v2 { Version::V2 } else { Version::V1 };
        let header = proxy_protocol::encode(version, source, destination);
        let want = as_carried(source, destination);
        prop_assert_eq!(
            proxy_protocol::parse(&header),
            Ok(Parsed::Complete { header_len: header.len(), addresses: Some(want) })
        );
        for cut in 0..header.len() {
            prop_assert_eq!(proxy_protocol::parse(&header[..cut]), Ok(Parsed::Incomplete), "cut at {}", cut);
        }
        let mut stream = header.clone();
        stream.extend_from_slice(&after);
        prop_assert_eq!(
            proxy_protocol::parse(&stream),
            Ok(Parsed::Complete { header_len: header.len(), addresses: Some(want) })
        );
    }

    /// Over a stream in arbitrary segments, the header is read without taking more than the
    /// bound, and the stream's own bytes come back in order.
    #[test]
    fn proxy_read_header_keeps_the_stream(
        source in socket_addr(),
        destination in socket_addr(),
        v2 in any::<bool>(),
        after in proptest::collection::vec(any::<u8>(), 0..200),
        sizes in proptest::collection::vec(0usize..40, 1..6),
    ) {
        let version = if v2 { Version::V2 } else { Version::V1 };
        let header = proxy_protocol::encode(version, source, destination);
        let mut peer = Segments::new(&[header.clone(), after.clone()].concat(), sizes);
        let (addresses, rest) = block_on(proxy_protocol::read_header(&mut peer)).expect("a valid header");
        prop_assert_eq!(addresses, Some(as_carried(source, destination)));
        let mut stream = rest;
        stream.extend_from_slice(peer.unread());
        prop_assert_eq!(stream, after);
    }

    #[test]
    fn proxy_read_header_never_overreads(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), proxyish()],
        sizes in proptest::collection::vec(0usize..64, 1..6),
    ) {
        let mut peer = Segments::new(&bytes, sizes);
        let got = block_on(proxy_protocol::read_header(&mut peer));
        prop_assert!(peer.at <= proxy_protocol::MAX_HEADER_LEN);
        if let Ok((_, rest)) = got {
            // The header plus `rest` is exactly what was taken.
            let Ok(Parsed::Complete { header_len, .. }) = proxy_protocol::parse(&bytes) else {
                return Err(TestCaseError::fail("read_header found a header parse does not"));
            };
            prop_assert_eq!(header_len + rest.len(), peer.at);
            prop_assert_eq!(&rest[..], &bytes[header_len..peer.at]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The config loader.
// ---------------------------------------------------------------------------------------------

/// TOML made of the loader's own keys with values of any type, so the validation (not only the
/// TOML syntax check) is reached.
fn tomlish() -> impl Strategy<Value = String> {
    let key = proptest::sample::select(vec![
        "name",
        "listen",
        "bind",
        "backends",
        "connect_timeout_ms",
        "read_timeout_ms",
        "upgrade_timeout_ms",
        "max_request_head_bytes",
        "health_path",
        "max_connections",
        "max_connections_per_ip",
        "idle_timeout_ms",
        "max_connection_age_ms",
        "accept_proxy_protocol",
        "trusted_proxies",
        "balance",
        "hash_key",
        "hash_balance_factor",
        "retries",
        "connect_budget_ms",
        "max_fails",
        "fail_timeout_ms",
        "send_proxy_protocol",
        "path",
        "host",
        "rewrite",
        "headers",
        "allowed_origins",
        "subprotocols",
        "kind",
        "interval_ms",
        "drain_timeout_ms",
        "log_format",
        "preserve_host",
        "address",
        "weight",
        "backup",
        "reuse_port",
        "log_open",
        "access_log",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,20}".prop_map(|s| format!("{s:?}")),
        "(127\\.0\\.0\\.1|\\[::1\\]|[a-z]{1,6}):[0-9]{1,6}".prop_map(|s| format!("{s:?}")),
        "(/[a-z]{0,5}){0,3}".prop_map(|s| format!("{s:?}")),
        proptest::collection::vec("[a-z0-9.:/\\[\\]-]{0,16}", 0..4).prop_map(|v| format!("{v:?}")),
        Just("{ address = \"b:1\", weight = 2 }".to_string()),
        Just("[{ address = \"b:1\", backup = true }, \"c:2\"]".to_string()),
        Just("1.5".to_string()),
        Just("\"v2\"".to_string()),
        Just("\"json\"".to_string()),
    ];
    let table = proptest::sample::select(vec![
        "[[tcp_proxy]]",
        "[[ws_proxy]]",
        "[[ws_proxy.route]]",
        "[ws_proxy.health_check]",
        "[tcp_proxy.health_check]",
        "[admin]",
        "[ws_proxy.headers]",
        "",
    ]);
    proptest::collection::vec((table, proptest::collection::vec((key, value), 0..6)), 0..5)
        .prop_map(|sections| {
            let mut out = String::new();
            for (table, fields) in sections {
                out.push_str(table);
                out.push('\n');
                for (k, v) in fields {
                    out.push_str(&format!("{k} = {v}\n"));
                }
            }
            out
        })
}

/// A valid config file and the values it must load to.
#[derive(Debug, Clone)]
struct GenConfig {
    text: String,
    drain_timeout_ms: Option<u64>,
    max_connections: Option<u64>,
    log_json: Option<bool>,
    tcp: Vec<GenTcp>,
    ws: Vec<GenWs>,
}

#[derive(Debug, Clone)]
struct GenTcp {
    name: Option<String>,
    port: u16,
    backends: Vec<(String, u32, bool)>,
    connect_timeout_ms: Option<u64>,
    max_connections: Option<u64>,
}

#[derive(Debug, Clone)]
struct GenWs {
    name: Option<String>,
    port: u16,
    backends: Vec<(String, u32, bool)>,
    read_timeout_ms: Option<u64>,
    upgrade_timeout_ms: Option<u64>,
    max_request_head_bytes: Option<u64>,
    health_path: Option<String>,
}

fn backends() -> impl Strategy<Value = Vec<(String, u32, bool)>> {
    let addr = prop_oneof![
        (any::<u32>(), 1u16..).prop_map(|(ip, p)| format!("{}:{p}", Ipv4Addr::from(ip))),
        (any::<u128>(), 1u16..).prop_map(|(ip, p)| format!("[{}]:{p}", Ipv6Addr::from(ip))),
        ("[a-z][a-z0-9-]{0,8}(\\.[a-z0-9]{1,6}){0,2}", 1u16..)
            .prop_map(|(h, p)| format!("{h}:{p}")),
    ];
    proptest::collection::vec((addr, 1u32..100, any::<bool>()), 1..4).prop_map(|mut b| {
        // At least one primary: a list of backups only is refused.
        b[0].2 = false;
        b
    })
}

fn timeout() -> impl Strategy<Value = Option<u64>> {
    proptest::option::of(1u64..10_000_000)
}

fn gen_config() -> impl Strategy<Value = GenConfig> {
    let tcp = (
        proptest::option::of("[A-Za-z][A-Za-z0-9 _-]{0,10}"),
        backends(),
        timeout(),
        proptest::option::of(1u64..100_000),
    )
        .prop_map(
            |(name, backends, connect_timeout_ms, max_connections)| GenTcp {
                name,
                port: 0,
                backends,
                connect_timeout_ms,
                max_connections,
            },
        );
    let ws = (
        proptest::option::of("[A-Za-z][A-Za-z0-9 _-]{0,10}"),
        backends(),
        (timeout(), timeout()),
        proptest::option::of(1024u64..=1 << 20),
        proptest::option::of("(/[a-z0-9_-]{1,8}){1,3}"),
    )
        .prop_map(
            |(name, backends, (read, upgrade), head, health_path)| GenWs {
                name,
                port: 0,
                backends,
                read_timeout_ms: read,
                upgrade_timeout_ms: upgrade,
                max_request_head_bytes: head,
                health_path,
            },
        );
    (
        proptest::option::of(0u64..1_000_000),
        proptest::option::of(1u64..1_000_000),
        proptest::option::of(any::<bool>()),
        proptest::collection::vec(tcp, 0..3),
        proptest::collection::vec(ws, 0..3),
    )
        .prop_map(|(drain, max, json, mut tcp, mut ws)| {
            // Names and ports unique across the file, as the loader requires.
            let mut port = 1000;
            let mut text = String::new();
            if let Some(d) = drain {
                text.push_str(&format!("drain_timeout_ms = {d}\n"));
            }
            if let Some(m) = max {
                text.push_str(&format!("max_connections = {m}\n"));
            }
            if let Some(j) = json {
                text.push_str(&format!(
                    "log_format = \"{}\"\n",
                    if j { "json" } else { "text" }
                ));
            }
            let list = |b: &[(String, u32, bool)], tables: bool| -> String {
                let items: Vec<String> = b
                    .iter()
                    .map(|(a, w, backup)| {
                        if tables {
                            format!("{{ address = {a:?}, weight = {w}, backup = {backup} }}")
                        } else {
                            format!("{a:?}")
                        }
                    })
                    .collect();
                format!("[{}]", items.join(", "))
            };
            for (i, t) in tcp.iter_mut().enumerate() {
                port += 1;
                t.port = port;
                if let Some(n) = &mut t.name {
                    n.push_str(&format!("-t{i}"));
                }
                text.push_str("\n[[tcp_proxy]]\n");
                if let Some(n) = &t.name {
                    text.push_str(&format!("name = {n:?}\n"));
                }
                text.push_str(&format!("listen = \"127.0.0.1:{}\"\n", t.port));
                text.push_str(&format!("backends = {}\n", list(&t.backends, i % 2 == 1)));
                if i % 2 == 0 {
                    for b in &mut t.backends {
                        b.1 = 1;
                        b.2 = false;
                    }
                }
                if let Some(c) = t.connect_timeout_ms {
                    text.push_str(&format!("connect_timeout_ms = {c}\n"));
                }
                if let Some(m) = t.max_connections {
                    text.push_str(&format!("max_connections = {m}\n"));
                }
            }
            for (i, w) in ws.iter_mut().enumerate() {
                port += 1;
                w.port = port;
                if let Some(n) = &mut w.name {
                    n.push_str(&format!("-w{i}"));
                }
                text.push_str("\n[[ws_proxy]]\n");
                if let Some(n) = &w.name {
                    text.push_str(&format!("name = {n:?}\n"));
                }
                text.push_str(&format!("bind = \"127.0.0.1:{}\"\n", w.port));
                // Only plain strings for WebSocket backends, where a backup needs a primary.
                for b in &mut w.backends {
                    b.1 = 1;
                    b.2 = false;
                }
                text.push_str(&format!("backends = {}\n", list(&w.backends, false)));
                if let Some(v) = w.read_timeout_ms {
                    text.push_str(&format!("read_timeout_ms = {v}\n"));
                }
                if let Some(v) = w.upgrade_timeout_ms {
                    text.push_str(&format!("upgrade_timeout_ms = {v}\n"));
                }
                if let Some(v) = w.max_request_head_bytes {
                    text.push_str(&format!("max_request_head_bytes = {v}\n"));
                }
                if let Some(p) = &w.health_path {
                    text.push_str(&format!("health_path = {p:?}\n"));
                }
            }
            GenConfig {
                text,
                drain_timeout_ms: drain,
                max_connections: max,
                log_json: json,
                tcp,
                ws,
            }
        })
}

fn backend_configs(b: &[(String, u32, bool)]) -> Vec<BackendConfig> {
    b.iter()
        .map(|(a, w, backup)| BackendConfig {
            weight: *w,
            backup: *backup,
            ..BackendConfig::new(a.clone())
        })
        .collect()
}

/// Every error names the place: `origin:line:col: `, with a line and column inside the text.
fn check_located(text: &str, e: &portcullis::Error) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    let rest = msg
        .strip_prefix("fuzz.toml:")
        .ok_or_else(|| TestCaseError::fail(format!("no origin in {msg:?}")))?;
    let mut parts = rest.splitn(3, ':');
    let line: usize = parts
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| TestCaseError::fail(format!("no line in {msg:?}")))?;
    let col: usize = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| TestCaseError::fail(format!("no column in {msg:?}")))?;
    prop_assert!(
        line >= 1 && line <= text.split('\n').count(),
        "line {} in {:?}",
        line,
        msg
    );
    let width = text
        .split('\n')
        .nth(line - 1)
        .map_or(0, |l| l.chars().count());
    prop_assert!(
        col >= 1 && col <= width + 1,
        "column {} of a {}-char line in {:?}",
        col,
        width,
        msg
    );
    Ok(())
}

proptest! {
    #[test]
    fn config_parse_never_panics_on_text(text in prop_oneof!["\\PC{0,200}", "[ -~\n\t]{0,300}"]) {
        if let Err(e) = Config::parse(&text, "fuzz.toml") {
            check_located(&text, &e)?;
        }
    }

    #[test]
    fn config_parse_never_panics_on_its_own_keys(text in tomlish()) {
        if let Err(e) = Config::parse(&text, "fuzz.toml") {
            check_located(&text, &e)?;
        }
    }

    #[test]
    fn a_valid_config_loads_with_its_values(g in gen_config()) {
        let c = Config::parse(&g.text, "gen.toml").map_err(|e| TestCaseError::fail(format!("{e}\n{}", g.text)))?;
        prop_assert_eq!(c.drain_timeout_ms, g.drain_timeout_ms.unwrap_or(c.drain_timeout_ms));
        prop_assert_eq!(c.max_connections, g.max_connections.map(|m| m as usize));
        prop_assert_eq!(c.log_json, g.log_json.unwrap_or(false));
        prop_assert_eq!(c.tcp_proxy.len(), g.tcp.len());
        prop_assert_eq!(c.ws_proxy.len(), g.ws.len());
        for (i, (got, want)) in c.tcp_proxy.iter().zip(&g.tcp).enumerate() {
            let name = want.name.clone().unwrap_or(format!("tcp-{}", i + 1));
            prop_assert_eq!(&got.name, &name);
            prop_assert_eq!(&got.listen, &format!("127.0.0.1:{}", want.port));
            prop_assert_eq!(&got.backends, &backend_configs(&want.backends));
            prop_assert_eq!(got.connect_timeout_ms, want.connect_timeout_ms.unwrap_or(portcullis::tcp::DEFAULT_CONNECT_TIMEOUT_MS));
            prop_assert_eq!(got.limits.max_connections, want.max_connections.map(|m| m as usize));
        }
        for (i, (got, want)) in c.ws_proxy.iter().zip(&g.ws).enumerate() {
            let name = want.name.clone().unwrap_or(format!("ws-{}", i + 1));
            prop_assert_eq!(&got.name, &name);
            prop_assert_eq!(&got.listen, &format!("127.0.0.1:{}", want.port));
            prop_assert_eq!(got.routes.len(), 1);
            prop_assert_eq!(&got.routes[0].path, "/");
            prop_assert_eq!(&got.routes[0].backends, &backend_configs(&want.backends));
            prop_assert_eq!(got.read_timeout_ms, want.read_timeout_ms.unwrap_or(portcullis::config::DEFAULT_READ_TIMEOUT_MS));
            prop_assert_eq!(got.upgrade_timeout_ms, want.upgrade_timeout_ms.unwrap_or(portcullis::config::DEFAULT_UPGRADE_TIMEOUT_MS));
            prop_assert_eq!(got.max_request_head_bytes as u64, want.max_request_head_bytes.unwrap_or(portcullis::config::DEFAULT_MAX_REQUEST_HEAD_BYTES as u64));
            prop_assert_eq!(&got.health_path, &want.health_path);
        }
    }
}
