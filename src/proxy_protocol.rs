//! The PROXY protocol, versions 1 and 2: how one proxy tells the next hop who the client is.
//!
//! A TCP proxy hides the client: the backend sees the proxy's address as the peer. The
//! [PROXY protocol](https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt) fixes that with
//! one header, sent by the connecting side before any other byte, carrying the original source
//! and destination. Version 1 is a line of text (`PROXY TCP4 … \r\n`), version 2 a binary block
//! with a 12-byte signature and optional TLVs.
//!
//! This module is pure: [`encode`], [`encode_local`] and [`encode_local_v2`] build headers to write to a backend,
//! [`parse`] is a push parser over whatever bytes have arrived, and [`read_header`] drives it over
//! any [`AsyncRead`]. There is no timer here: the caller bounds [`read_header`] with
//! [`net::timeout`](crate::net::timeout), as the spec asks receivers to.
//!
//! Accept a header only from peers you trust (your own load balancers): anyone who can connect
//! can claim any address in one, and the spec gives no way to tell a forged header from a real
//! one.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures_lite::{AsyncRead, AsyncReadExt};

/// The longest version 1 line, CRLF included, that a receiver must accept: the spec's worst case,
/// `PROXY UNKNOWN` followed by two full-length IPv6 addresses and two five-digit ports. A longer
/// line is refused rather than waited for, so a sender that never ends its line costs at most
/// this much.
pub const V1_MAX_LEN: usize = 107;

/// The most address and TLV data (the version 2 length field) this parser accepts.
///
/// The field allows 65535, but the largest address block (two UNIX paths) is 216 bytes and the
/// registered TLVs that balancers actually send (ALPN, authority, a unique ID of at most 128
/// bytes, the SSL summary, a cloud's endpoint or link ID) add a few hundred at most. 4096 leaves
/// ten times that as headroom while keeping what a connection can make us buffer, before anything
/// in it has been checked, to about a page.
pub const V2_MAX_DATA_LEN: usize = 4096;

/// The most bytes [`read_header`] reads from a stream, header and early stream bytes together:
/// a version 2 header of the largest accepted length. A version 1 header is read with a tighter
/// bound, [`V1_MAX_LEN`].
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + V2_MAX_DATA_LEN;

/// What starts a version 1 header. The space is part of it: the spec puts exactly one after
/// `PROXY`, so `PROXYX` is already another protocol.
const V1_PREFIX: &[u8] = b"PROXY ";

/// What starts a version 2 header. It contains a NUL and `QUIT`, so that a server of most other
/// protocols that receives it by mistake rejects it or hangs up.
const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// The fixed part of a version 2 header: the signature, the version and command, the family and
/// protocol, and the two-byte length of what follows.
const V2_FIXED_LEN: usize = 16;

/// The version in the high nibble of the 13th byte; the spec defines no other.
const V2_VERSION: u8 = 0x2;

/// The command in the low nibble of the 13th byte: a health check or other connection the proxy
/// made for itself, whose real endpoints are the ones to use.
const LOCAL: u8 = 0x0;

/// The command for a relayed connection, whose original endpoints follow.
const PROXY: u8 = 0x1;

/// The family and protocol byte of each combination the spec defines; any other byte must be
/// refused. The high nibble is the family (unspecified, IPv4, IPv6, UNIX), the low nibble the
/// transport (unspecified, stream, datagram).
const FAMILIES: [u8; 7] = [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32];

/// TCP over IPv4: two 4-byte addresses and two ports.
const TCP_OVER_IPV4: u8 = 0x11;

/// TCP over IPv6: two 16-byte addresses and two ports.
const TCP_OVER_IPV6: u8 = 0x21;

/// Which version of the protocol [`encode`] writes.
///
/// Version 1 is readable in a packet capture and accepted by more old servers; version 2 is
/// cheaper to parse and the one to prefer when the backend takes both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// The text line: `PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n`.
    V1,
    /// The binary block: signature, command, family, length, addresses and ports.
    V2,
}

/// What [`parse`] made of the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// No whole header yet, and nothing wrong found so far: read more and parse again. (A version
    /// 1 line's fields are checked once its CRLF arrives, as the spec asks.)
    Incomplete,
    /// A whole header.
    Complete {
        /// How many bytes the header took. Everything after them belongs to the stream.
        header_len: usize,
        /// The original `(source, destination)`, or `None` when the header says to use the
        /// connection's own endpoints: a version 1 `UNKNOWN`, a version 2 `LOCAL` (a health
        /// check), or a version 2 family this proxy does not carry (unspecified, UDP, UNIX).
        addresses: Option<(SocketAddr, SocketAddr)>,
    },
}

/// Why some bytes are not a PROXY protocol header.
///
/// Every one of them means the connection should be closed: the spec forbids guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The bytes start neither with `PROXY ` nor with the version 2 signature: the peer speaks
    /// another protocol (often a client that connected directly, bypassing the balancer).
    NotProxyProtocol,
    /// A header of a known version that breaks its grammar: a bad address or port, a missing
    /// CRLF, an unknown family, a length too short for its addresses, a TLV past the end.
    Malformed,
    /// A version 1 line without CRLF within [`V1_MAX_LEN`] bytes, or a version 2 length over
    /// [`V2_MAX_DATA_LEN`].
    TooLong,
    /// A version 2 signature followed by a version other than 2.
    UnsupportedVersion,
    /// A version 2 command other than `LOCAL` and `PROXY`.
    UnsupportedCommand,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::NotProxyProtocol => "not a PROXY protocol header",
            Error::Malformed => "malformed PROXY protocol header",
            Error::TooLong => "PROXY protocol header longer than the limit",
            Error::UnsupportedVersion => "unsupported PROXY protocol version",
            Error::UnsupportedCommand => "unsupported PROXY protocol command",
        })
    }
}

impl std::error::Error for Error {}

/// Why [`read_header`] found no header.
#[derive(Debug)]
pub enum ReadError {
    /// The bytes are not a valid header.
    Header(Error),
    /// The peer closed its side before the header was complete; `received` bytes of it had
    /// arrived (0 for a connection that sent nothing, such as a TCP health probe).
    Eof {
        /// How many bytes arrived before the close.
        received: usize,
    },
    /// Reading failed.
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Header(e) => e.fmt(f),
            ReadError::Eof { received: 0 } => {
                f.write_str("closed before sending a PROXY protocol header")
            }
            ReadError::Eof { received } => {
                write!(
                    f,
                    "closed after {received} bytes of a PROXY protocol header"
                )
            }
            ReadError::Io(e) => write!(f, "reading the PROXY protocol header failed: {e}"),
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Builds the header that tells a backend this connection comes from `source` and was made to
/// `destination`. Write it before any other byte.
///
/// Both addresses of a header share one family, so when one is IPv4 and the other IPv6 the IPv4
/// one is sent as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). In version 1 that address is
/// written in hex groups (`::ffff:c000:201`), the only IPv6 form the spec's grammar allows.
/// IPv6 flow labels and scope IDs are not carried.
///
/// # Examples
///
/// ```
/// use portcullis::proxy_protocol::{encode, Version};
///
/// let client = "192.0.2.1:56324".parse().unwrap();
/// let listener = "198.51.100.1:443".parse().unwrap();
/// assert_eq!(
///     encode(Version::V1, client, listener),
///     b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n"
/// );
/// assert_eq!(encode(Version::V2, client, listener).len(), 16 + 12);
/// ```
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let ports = (source.port(), destination.port());
    match (version, Pair::new(source.ip(), destination.ip())) {
        (Version::V1, Pair::V4(src, dst)) => {
            format!("PROXY TCP4 {src} {dst} {} {}\r\n", ports.0, ports.1).into_bytes()
        }
        (Version::V1, Pair::V6(src, dst)) => {
            let (src, dst) = (Hex(src), Hex(dst));
            format!("PROXY TCP6 {src} {dst} {} {}\r\n", ports.0, ports.1).into_bytes()
        }
        (Version::V2, Pair::V4(src, dst)) => {
            v2_proxy(TCP_OVER_IPV4, &[&src.octets(), &dst.octets()], ports)
        }
        (Version::V2, Pair::V6(src, dst)) => {
            v2_proxy(TCP_OVER_IPV6, &[&src.octets(), &dst.octets()], ports)
        }
    }
}

/// Builds the header a connection of the proxy's own sends, with no client behind it (a health
/// check, to a backend that requires a header on every connection): `PROXY UNKNOWN` in version
/// 1, a `LOCAL` command in version 2. Either tells the backend to use the connection's real
/// endpoints.
///
/// # Examples
///
/// ```
/// use portcullis::proxy_protocol::{encode_local, Version};
///
/// assert_eq!(encode_local(Version::V1), b"PROXY UNKNOWN\r\n");
/// assert_eq!(encode_local(Version::V2).len(), 16);
/// ```
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => encode_local_v2(),
    }
}

/// Builds a version 2 `LOCAL` header: "this connection is my own, use its real endpoints". It is
/// what a health check sends to a backend that requires a header on every connection.
///
/// # Examples
///
/// ```
/// use portcullis::proxy_protocol::{encode_local_v2, parse, Parsed};
///
/// let header = encode_local_v2();
/// assert_eq!(parse(&header), Ok(Parsed::Complete { header_len: 16, addresses: None }));
/// ```
pub fn encode_local_v2() -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN);
    out.extend_from_slice(SIGNATURE);
    // The spec asks for the unspecified family and no address with LOCAL.
    out.extend_from_slice(&[V2_VERSION << 4 | LOCAL, 0x00, 0, 0]);
    out
}

/// The version 2 header of a `PROXY` command for TCP.
fn v2_proxy(family: u8, addresses: &[&[u8]; 2], ports: (u16, u16)) -> Vec<u8> {
    // Two addresses of at most 16 bytes and two ports: never near u16::MAX.
    let len = (2 * addresses[0].len() + 4) as u16;
    let mut out = Vec::with_capacity(V2_FIXED_LEN + usize::from(len));
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&[V2_VERSION << 4 | PROXY, family]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(addresses[0]);
    out.extend_from_slice(addresses[1]);
    out.extend_from_slice(&ports.0.to_be_bytes());
    out.extend_from_slice(&ports.1.to_be_bytes());
    out
}

/// Two addresses of one family, as a header carries them.
enum Pair {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Pair {
    fn new(src: IpAddr, dst: IpAddr) -> Self {
        match (src, dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Pair::V4(src, dst),
            (src, dst) => Pair::V6(mapped(src), mapped(dst)),
        }
    }
}

/// `ip` as IPv6, an IPv4 address as its IPv4-mapped form.
fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
        IpAddr::V6(ip) => ip,
    }
}

/// An IPv6 address in hex groups only. `Ipv6Addr`'s own `Display` writes an IPv4-mapped address
/// as `::ffff:a.b.c.d`, which the version 1 grammar does not allow and a strict receiver refuses.
struct Hex(Ipv6Addr);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.to_ipv4_mapped() {
            Some(_) => {
                let s = self.0.segments();
                write!(f, "::ffff:{:x}:{:x}", s[6], s[7])
            }
            None => self.0.fmt(f),
        }
    }
}

/// Parses a PROXY protocol header, version 1 or 2, at the start of `buf`.
///
/// Call it again with more bytes after [`Parsed::Incomplete`]; a valid prefix is never an error.
/// An invalid one is refused as soon as it cannot become valid: a client speaking another
/// protocol is found out by its first byte or so, not at a timeout. A version 1 line must end
/// within [`V1_MAX_LEN`] bytes; a version 2 header may carry at most [`V2_MAX_DATA_LEN`] bytes of
/// addresses and TLVs. TLVs are checked to fit the declared length, then skipped.
///
/// Addresses are returned as they were sent: an IPv4 client behind a header that had to be IPv6
/// appears as `::ffff:a.b.c.d`.
///
/// # Examples
///
/// ```
/// use portcullis::proxy_protocol::{parse, Error, Parsed};
///
/// let stream = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n";
/// assert_eq!(parse(&stream[..20]), Ok(Parsed::Incomplete));
/// let Ok(Parsed::Complete { header_len, addresses }) = parse(stream) else { panic!() };
/// assert_eq!(&stream[header_len..], b"GET / HTTP/1.1\r\n");
/// assert_eq!(addresses, Some(("192.0.2.1:56324".parse()?, "198.51.100.1:443".parse()?)));
///
/// assert_eq!(parse(b"GET"), Err(Error::NotProxyProtocol));
/// # Ok::<(), std::net::AddrParseError>(())
/// ```
pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    if starts_like(buf, V1_PREFIX) {
        parse_v1(buf)
    } else if starts_like(buf, SIGNATURE) {
        parse_v2(buf)
    } else {
        Err(Error::NotProxyProtocol)
    }
}

/// Whether `buf` and `prefix` agree on the bytes both have.
fn starts_like(buf: &[u8], prefix: &[u8]) -> bool {
    let n = buf.len().min(prefix.len());
    buf[..n] == prefix[..n]
}

/// Parses a buffer that agrees with [`V1_PREFIX`].
fn parse_v1(buf: &[u8]) -> Result<Parsed, Error> {
    // The whole buffer is scanned on every call; it is at most 107 bytes long.
    for (i, &byte) in buf.iter().enumerate().skip(V1_PREFIX.len()) {
        match byte {
            b'\r' if i + 2 > V1_MAX_LEN => return Err(Error::TooLong),
            b'\r' => {
                return match buf.get(i + 1) {
                    None => Ok(Parsed::Incomplete),
                    Some(b'\n') => Ok(Parsed::Complete {
                        header_len: i + 2,
                        addresses: parse_v1_fields(&buf[V1_PREFIX.len()..i])?,
                    }),
                    Some(_) => Err(Error::Malformed),
                };
            }
            // Only CRLF ends the line; the spec forbids accepting a lone LF.
            b'\n' => return Err(Error::Malformed),
            // No room left for the CRLF after this byte.
            _ if i + 3 > V1_MAX_LEN => return Err(Error::TooLong),
            _ => {}
        }
    }
    Ok(Parsed::Incomplete)
}

/// Parses what follows `PROXY ` on a version 1 line, up to the CRLF.
fn parse_v1_fields(fields: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, Error> {
    // After UNKNOWN the sender may put anything, and the receiver must ignore it.
    if fields == b"UNKNOWN" || fields.starts_with(b"UNKNOWN ") {
        return Ok(None);
    }
    let fields = std::str::from_utf8(fields).map_err(|_| Error::Malformed)?;
    // Exactly one space between fields: an empty field from a doubled space fails to parse.
    let mut fields = fields.split(' ');
    let (Some(family), Some(src), Some(dst), Some(src_port), Some(dst_port), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(Error::Malformed);
    };
    let (src, dst) = match family {
        "TCP4" => (IpAddr::V4(address(src)?), IpAddr::V4(address(dst)?)),
        "TCP6" => (IpAddr::V6(address(src)?), IpAddr::V6(address(dst)?)),
        _ => return Err(Error::Malformed),
    };
    Ok(Some((
        SocketAddr::new(src, port(src_port)?),
        SocketAddr::new(dst, port(dst_port)?),
    )))
}

/// An address of a version 1 line. The standard parsers refuse what the spec refuses (IPv4
/// octets with leading zeros, IPv6 zone IDs, brackets); they also accept an IPv6 address ending
/// in dotted IPv4 (`::ffff:192.0.2.1`), which the grammar does not allow but HAProxy sends.
fn address<A: std::str::FromStr>(text: &str) -> Result<A, Error> {
    text.parse().map_err(|_| Error::Malformed)
}

/// A port of a version 1 line: decimal, 0 to 65535, no sign and no leading zero.
fn port(text: &str) -> Result<u16, Error> {
    let digits = text.bytes().all(|b| b.is_ascii_digit());
    if !digits || text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
        return Err(Error::Malformed);
    }
    text.parse().map_err(|_| Error::Malformed)
}

/// Parses a buffer that agrees with [`SIGNATURE`]. Each field is checked as soon as it arrives,
/// so a bad header is refused without waiting for the rest of it.
fn parse_v2(buf: &[u8]) -> Result<Parsed, Error> {
    let Some(&version_command) = buf.get(SIGNATURE.len()) else {
        return Ok(Parsed::Incomplete);
    };
    if version_command >> 4 != V2_VERSION {
        return Err(Error::UnsupportedVersion);
    }
    let command = version_command & 0x0f;
    if command != LOCAL && command != PROXY {
        return Err(Error::UnsupportedCommand);
    }
    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // With LOCAL the whole block, family included, is to be ignored.
    if command == PROXY && !FAMILIES.contains(&family) {
        return Err(Error::Malformed);
    }
    let Some(&[hi, lo]) = buf.get(14..V2_FIXED_LEN) else {
        return Ok(Parsed::Incomplete);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_DATA_LEN {
        return Err(Error::TooLong);
    }
    let address_len = match (command, family >> 4) {
        (LOCAL, _) => 0,
        (_, 0x1) => 12,
        (_, 0x2) => 36,
        (_, 0x3) => 216,
        _ => 0,
    };
    if len < address_len {
        return Err(Error::Malformed);
    }
    let header_len = V2_FIXED_LEN + len;
    let Some(data) = buf.get(V2_FIXED_LEN..header_len) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL and the unspecified family carry nothing to read: skip the block whole.
    if command == LOCAL || family == 0x00 {
        return Ok(Parsed::Complete {
            header_len,
            addresses: None,
        });
    }
    let (addresses, tlvs) = data.split_at(address_len);
    skip_tlvs(tlvs)?;
    let mut addresses = addresses;
    let addresses = match family {
        TCP_OVER_IPV4 => {
            let src = Ipv4Addr::from(take::<4>(&mut addresses)?);
            let dst = Ipv4Addr::from(take::<4>(&mut addresses)?);
            Some(socket_addrs(src.into(), dst.into(), &mut addresses)?)
        }
        TCP_OVER_IPV6 => {
            let src = Ipv6Addr::from(take::<16>(&mut addresses)?);
            let dst = Ipv6Addr::from(take::<16>(&mut addresses)?);
            Some(socket_addrs(src.into(), dst.into(), &mut addresses)?)
        }
        // UDP and UNIX sockets are not what this proxy carries; the spec lets a receiver treat a
        // combination it does not support as the unspecified one, and use the real endpoints.
        _ => None,
    };
    Ok(Parsed::Complete {
        header_len,
        addresses,
    })
}

/// Pairs `src` and `dst` with the two ports at the start of `data`.
fn socket_addrs(
    src: IpAddr,
    dst: IpAddr,
    data: &mut &[u8],
) -> Result<(SocketAddr, SocketAddr), Error> {
    let src_port = u16::from_be_bytes(take(data)?);
    let dst_port = u16::from_be_bytes(take(data)?);
    Ok((
        SocketAddr::new(src, src_port),
        SocketAddr::new(dst, dst_port),
    ))
}

/// Checks that `tlvs` is a sequence of whole type-length-value entries, and ignores them: none of
/// the registered types changes where a connection comes from. (A CRC32C entry is not verified.)
fn skip_tlvs(mut tlvs: &[u8]) -> Result<(), Error> {
    while !tlvs.is_empty() {
        let [_kind, hi, lo] = take(&mut tlvs)?;
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        tlvs = tlvs.get(len..).ok_or(Error::Malformed)?;
    }
    Ok(())
}

/// Takes the first `N` bytes off `data`.
fn take<const N: usize>(data: &mut &[u8]) -> Result<[u8; N], Error> {
    let (head, rest) = data.split_first_chunk::<N>().ok_or(Error::Malformed)?;
    *data = rest;
    Ok(*head)
}

/// Reads a PROXY protocol header from the start of `reader`.
///
/// Returns the addresses it carries (see [`Parsed::Complete`]) and the bytes that arrived after
/// it in the same reads. Those belong to the stream: handle them before anything read later, and
/// never drop them.
///
/// Reads never ask for more than the header can still need ([`V1_MAX_LEN`] bytes in all until a
/// version 2 header's length is known, then exactly up to its end), so at most
/// [`MAX_HEADER_LEN`] bytes are read, and a header that trickles in segment by segment leaves
/// everything after it in the reader. There is no timer here: bound the call with
/// [`net::timeout`](crate::net::timeout), or a peer that sends half a header holds it forever.
///
/// # Examples
///
/// ```
/// use futures_lite::io::Cursor;
/// use portcullis::proxy_protocol::read_header;
///
/// # futures_lite::future::block_on(async {
/// let mut balancer = Cursor::new(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nhello".to_vec());
/// let (addresses, rest) = read_header(&mut balancer).await?;
/// assert_eq!(addresses.map(|(source, _)| source), Some("192.0.2.1:56324".parse().unwrap()));
/// assert_eq!(rest, b"hello"); // the stream's first bytes, read along with the header
/// # Ok::<(), portcullis::proxy_protocol::ReadError>(()) }).unwrap();
/// ```
pub async fn read_header<R>(
    reader: &mut R,
) -> Result<(Option<(SocketAddr, SocketAddr)>, Vec<u8>), ReadError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    // `buf[..filled]` holds what was read; the rest is room for the next read, zeroed once when
    // it is added rather than once per read.
    let mut buf = Vec::new();
    let mut filled = 0;
    loop {
        match parse(&buf[..filled]).map_err(ReadError::Header)? {
            Parsed::Complete {
                header_len,
                addresses,
            } => {
                buf.truncate(filled);
                return Ok((addresses, buf.split_off(header_len)));
            }
            Parsed::Incomplete => {}
        }
        let limit = read_limit(&buf[..filled]);
        debug_assert!(
            limit > filled,
            "an incomplete header always has room to grow"
        );
        if buf.len() < limit {
            buf.resize(limit, 0);
        }
        match reader.read(&mut buf[filled..limit]).await {
            Ok(0) => return Err(ReadError::Eof { received: filled }),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// How many bytes an incomplete header may occupy at most, as far as `buf` tells.
fn read_limit(buf: &[u8]) -> usize {
    match buf.get(14..V2_FIXED_LEN) {
        Some(&[hi, lo]) if buf.starts_with(SIGNATURE) => {
            V2_FIXED_LEN + usize::from(u16::from_be_bytes([hi, lo]))
        }
        // A version 1 line, or a version 2 header whose length has not arrived: either fits in
        // a version 1 line's bound, and the version 2 fixed part is shorter than that.
        _ => V1_MAX_LEN,
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_lite::future::block_on;
    use futures_lite::io::Cursor;

    use super::*;
    use crate::testio::Trickle;

    /// What one byte string should parse to.
    #[derive(Debug, Clone, Copy)]
    enum Want {
        /// A whole header (the whole input) carrying these addresses.
        Proxy(&'static str, &'static str),
        /// A whole header (the whole input) saying to use the real endpoints.
        Real,
        Incomplete,
        Fail(Error),
    }

    fn expected(input: &[u8], want: Want) -> Result<Parsed, Error> {
        let addr = |text: &str| text.parse::<SocketAddr>().expect("test address");
        match want {
            Want::Proxy(src, dst) => Ok(Parsed::Complete {
                header_len: input.len(),
                addresses: Some((addr(src), addr(dst))),
            }),
            Want::Real => Ok(Parsed::Complete {
                header_len: input.len(),
                addresses: None,
            }),
            Want::Incomplete => Ok(Parsed::Incomplete),
            Want::Fail(e) => Err(e),
        }
    }

    use Error::*;
    use Want::*;

    const V1_CASES: &[(&[u8], Want)] = &[
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            Proxy("192.168.0.1:56324", "192.168.0.11:443"),
        ),
        (
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            Proxy("255.255.255.255:65535", "255.255.255.255:65535"),
        ),
        (
            b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
            Proxy("0.0.0.0:0", "0.0.0.0:0"),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n",
            Proxy("[2001:db8::1]:56324", "[2001:db8::2]:443"),
        ),
        (
            b"PROXY TCP6 2001:DB8::1 2001:DB8::2 56324 443\r\n",
            Proxy("[2001:db8::1]:56324", "[2001:db8::2]:443"),
        ),
        // The longest TCP6 line, 104 bytes.
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
              ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            Proxy(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            ),
        ),
        // An IPv4-mapped address, as this module writes it and as HAProxy does.
        (
            b"PROXY TCP6 ::ffff:c000:201 ::1 1 2\r\n",
            Proxy("[::ffff:192.0.2.1]:1", "[::1]:2"),
        ),
        (
            b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
            Proxy("[::ffff:192.0.2.1]:1", "[::1]:2"),
        ),
        (b"PROXY UNKNOWN\r\n", Real),
        (b"PROXY UNKNOWN 192.0.2.1 192.0.2.2 1 2\r\n", Real),
        (b"PROXY UNKNOWN whatever \x01\xff follows\r\n", Real),
        // The spec's worst case: exactly 107 bytes.
        (
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
              ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            Real,
        ),
        // Not yet at the end of the line.
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443", Incomplete),
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r",
            Incomplete,
        ),
        // One byte over the limit, with or without the CRLF yet.
        (
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
              ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 655350\r\n",
            Fail(TooLong),
        ),
        (
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
              ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 655350",
            Fail(TooLong),
        ),
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \
              and a long tail that never ends its line before the limit of the spec",
            Fail(TooLong),
        ),
        // Line endings.
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\n2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n", Fail(Malformed)),
        (b"PROXY UNKNOWN\n", Fail(Malformed)),
        (b"PROXY \r\n", Fail(Malformed)),
        // Ports.
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 http 2\r\n", Fail(Malformed)),
        // Fields: missing, extra, or not separated by exactly one space.
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", Fail(Malformed)),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4\r\n", Fail(Malformed)),
        // Protocols.
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY UNKNOWNX\r\n", Fail(Malformed)),
        // Addresses.
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.03.4 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP4 ::1 ::2 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP6 [::1] [::2] 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP6 1:2:3:4:5:6:7 ::2 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP6 1::2::3 ::2 1 2\r\n", Fail(Malformed)),
        (b"PROXY TCP6 ::ffff:1.2.03.4 ::2 1 2\r\n", Fail(Malformed)),
    ];

    /// A version 2 header with the given command, family and declared length before `body`.
    fn v2(version_command: u8, family: u8, len: u16, body: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&[version_command, family]);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// 127.0.0.1:8080 to 10.0.0.2:80.
    const IPV4: &[u8] = b"\x7f\x00\x00\x01\x0a\x00\x00\x02\x1f\x90\x00\x50";

    /// [2001:db8::1]:56324 to [2001:db8::2]:443.
    const IPV6: &[u8] = b"\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01\
                          \x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x02\
                          \xdc\x04\x01\xbb";

    /// ALPN "h2", a NOOP, and an AWS VPC endpoint ID: 5 + 3 + 10 bytes.
    const TLVS: &[u8] = b"\x01\x00\x02h2\x04\x00\x00\xea\x00\x07\x01vpce-1";

    fn unix() -> Vec<u8> {
        let path = |p: &[u8]| {
            let mut a = p.to_vec();
            a.resize(108, 0);
            a
        };
        [path(b"/run/client.sock"), path(b"/run/server.sock")].concat()
    }

    /// IPv4 addresses and a NOOP TLV filling the largest accepted length.
    fn largest() -> Vec<u8> {
        [IPV4, b"\x04\x0f\xf1", &[0; 4081]].concat()
    }

    fn v2_cases() -> Vec<(Vec<u8>, Want)> {
        let with_tlvs = [IPV4, TLVS].concat();
        vec![
            (
                v2(0x21, 0x11, 12, IPV4),
                Proxy("127.0.0.1:8080", "10.0.0.2:80"),
            ),
            (
                v2(0x21, 0x21, 36, IPV6),
                Proxy("[2001:db8::1]:56324", "[2001:db8::2]:443"),
            ),
            (
                v2(0x21, 0x11, 30, &with_tlvs),
                Proxy("127.0.0.1:8080", "10.0.0.2:80"),
            ),
            (
                v2(0x21, 0x11, 4096, &largest()),
                Proxy("127.0.0.1:8080", "10.0.0.2:80"),
            ),
            (v2(0x20, 0x00, 0, b""), Real),
            // LOCAL must skip whatever its length covers, and ignore its family.
            (v2(0x20, 0x11, 12, IPV4), Real),
            (v2(0x20, 0xff, 3, b"abc"), Real),
            (v2(0x21, 0x00, 0, b""), Real),
            (v2(0x21, 0x00, 4, b"junk"), Real),
            // UDP and UNIX fall back to the real endpoints.
            (v2(0x21, 0x12, 12, IPV4), Real),
            (v2(0x21, 0x22, 36, IPV6), Real),
            (v2(0x21, 0x31, 216, &unix()), Real),
            (v2(0x21, 0x32, 216, &unix()), Real),
            // Not all there yet.
            (v2(0x21, 0x11, 12, &IPV4[..11]), Incomplete),
            (v2(0x21, 0x11, 4096, IPV4), Incomplete),
            // Version and command.
            (v2(0x11, 0x11, 12, IPV4), Fail(UnsupportedVersion)),
            (v2(0x31, 0x11, 12, IPV4), Fail(UnsupportedVersion)),
            (v2(0x01, 0x11, 12, IPV4), Fail(UnsupportedVersion)),
            (v2(0x22, 0x11, 12, IPV4), Fail(UnsupportedCommand)),
            (v2(0x2f, 0x11, 12, IPV4), Fail(UnsupportedCommand)),
            // Family and protocol bytes the spec does not define.
            (v2(0x21, 0x41, 12, IPV4), Fail(Malformed)),
            (v2(0x21, 0x13, 12, IPV4), Fail(Malformed)),
            (v2(0x21, 0x10, 12, IPV4), Fail(Malformed)),
            (v2(0x21, 0x01, 12, IPV4), Fail(Malformed)),
            // Lengths: too short for the addresses, or over the limit.
            (v2(0x21, 0x11, 11, &IPV4[..11]), Fail(Malformed)),
            (v2(0x21, 0x21, 12, IPV4), Fail(Malformed)),
            (v2(0x21, 0x31, 215, &unix()[..215]), Fail(Malformed)),
            (v2(0x21, 0x11, 4097, IPV4), Fail(TooLong)),
            (v2(0x21, 0x11, 0xffff, IPV4), Fail(TooLong)),
            (v2(0x20, 0x00, 4097, b""), Fail(TooLong)),
            // TLVs that run past the declared length.
            (
                v2(0x21, 0x11, 14, &[IPV4, b"\x01\x00"].concat()),
                Fail(Malformed),
            ),
            (
                v2(0x21, 0x11, 17, &[IPV4, b"\x01\x00\x03h2"].concat()),
                Fail(Malformed),
            ),
            (v2(0x21, 0x11, 29, &with_tlvs[..29]), Fail(Malformed)),
        ]
    }

    fn all_cases() -> Vec<(Vec<u8>, Want)> {
        let v1 = V1_CASES.iter().map(|(input, want)| (input.to_vec(), *want));
        v1.chain(v2_cases()).collect()
    }

    #[test]
    fn version_1_headers() {
        for (input, want) in V1_CASES {
            let got = parse(input);
            let want = expected(input, *want);
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn version_2_headers() {
        for (input, want) in v2_cases() {
            assert_eq!(parse(&input), expected(&input, want), "{input:x?}");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_header_is_incomplete() {
        let mut checked = 0;
        for (input, want) in all_cases() {
            if let Proxy(..) | Real = want {
                for n in 0..input.len() {
                    let got = parse(&input[..n]);
                    assert_eq!(got, Ok(Parsed::Incomplete), "{:x?}", &input[..n]);
                }
                checked += 1;
            }
        }
        assert!(checked > 20);
    }

    #[test]
    fn a_prefix_of_a_bad_header_is_incomplete_or_the_same_error() {
        for (input, want) in all_cases() {
            if let Fail(e) = want {
                for n in 0..input.len() {
                    let got = parse(&input[..n]);
                    assert!(
                        got == Ok(Parsed::Incomplete) || got == Err(e),
                        "{got:?} for {:x?}",
                        &input[..n]
                    );
                }
            }
        }
    }

    #[test]
    fn bytes_after_a_header_are_not_part_of_it() {
        for (input, want) in all_cases() {
            if let Proxy(..) | Real = want {
                let stream = [&input[..], b"GET / HTTP/1.1\r\n\r\n"].concat();
                assert_eq!(parse(&stream), expected(&input, want), "{input:x?}");
            }
        }
    }

    /// Another protocol's first bytes, and how many of them it takes to refuse it.
    const OTHER_PROTOCOLS: &[(&[u8], usize)] = &[
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1),
        (b"POST / HTTP/1.1\r\n", 2),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 3),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 1),
        (b"SSH-2.0-OpenSSH_9.6\r\n", 1),
        (b"*1\r\n$4\r\nPING\r\n", 1),
        (b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", 1),
        (b"PROXYTCP4 192.0.2.1 192.0.2.2 1 2\r\n", 6),
        (b"\r\n\r\nGET / HTTP/1.1\r\n", 5),
        (b"\r\n\r\n\0\r\nQUIT\r\n", 12),
    ];

    #[test]
    fn another_protocol_is_refused_as_soon_as_it_differs() {
        for &(input, at) in OTHER_PROTOCOLS {
            for n in 0..at {
                assert_eq!(parse(&input[..n]), Ok(Parsed::Incomplete), "{input:x?}");
            }
            assert_eq!(parse(&input[..at]), Err(NotProxyProtocol), "{input:x?}");
            assert_eq!(parse(input), Err(NotProxyProtocol), "{input:x?}");
        }
    }

    #[test]
    fn a_wrong_signature_byte_is_refused_when_it_arrives() {
        let valid = v2(0x21, 0x11, 12, IPV4);
        for i in 0..SIGNATURE.len() {
            let mut input = valid.clone();
            input[i] ^= 0xff;
            assert_eq!(parse(&input[..i + 1]), Err(NotProxyProtocol), "byte {i}");
            assert_eq!(parse(&input), Err(NotProxyProtocol), "byte {i}");
        }
    }

    #[test]
    fn a_bad_fixed_part_is_refused_before_the_addresses_arrive() {
        let cases: &[(u8, u8, u16, Error)] = &[
            (0x11, 0x11, 12, UnsupportedVersion),
            (0x23, 0x11, 12, UnsupportedCommand),
            (0x21, 0x44, 12, Malformed),
            (0x21, 0x21, 12, Malformed),
            (0x21, 0x11, 5000, TooLong),
        ];
        for &(version_command, family, len, error) in cases {
            assert_eq!(parse(&v2(version_command, family, len, b"")), Err(error));
        }
    }

    const PAIRS: &[(&str, &str)] = &[
        ("192.168.0.1:56324", "192.168.0.11:443"),
        ("0.0.0.0:0", "255.255.255.255:65535"),
        ("[2001:db8::1]:1", "[2001:db8::2]:2"),
        ("[::]:0", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        ("[::1]:80", "[::ffff:10.0.0.1]:8080"),
        ("[fe80::1]:5000", "[::ffff:0.0.0.0]:1"),
        // Mixed families: the IPv4 side comes back IPv4-mapped.
        ("10.0.0.1:5000", "[2001:db8::1]:443"),
        ("[2001:db8::1]:443", "10.0.0.1:5000"),
        ("0.0.0.0:0", "[::]:0"),
    ];

    #[test]
    fn encode_then_parse_gives_back_the_addresses() {
        let as_v6 = |a: SocketAddr| SocketAddr::new(IpAddr::V6(mapped(a.ip())), a.port());
        for &(src, dst) in PAIRS {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let want = if src.is_ipv4() == dst.is_ipv4() {
                (src, dst)
            } else {
                (as_v6(src), as_v6(dst))
            };
            for version in [Version::V1, Version::V2] {
                let header = encode(version, src, dst);
                assert_eq!(
                    parse(&header),
                    Ok(Parsed::Complete {
                        header_len: header.len(),
                        addresses: Some(want),
                    }),
                    "{version:?} {src} {dst}: {header:x?}"
                );
                assert!(header.len() <= V1_MAX_LEN);
            }
        }
    }

    #[test]
    fn encode_writes_the_exact_bytes() {
        let v4 = |text: &str| text.parse::<SocketAddr>().unwrap();
        let cases: &[(Version, &str, &str, &[u8])] = &[
            (
                Version::V1,
                "127.0.0.1:8080",
                "10.0.0.2:80",
                b"PROXY TCP4 127.0.0.1 10.0.0.2 8080 80\r\n",
            ),
            (
                Version::V1,
                "[2001:db8::1]:56324",
                "[2001:db8::2]:443",
                b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n",
            ),
            // Hex groups, not `::ffff:192.0.2.1`: the grammar allows nothing else.
            (
                Version::V1,
                "192.0.2.1:1",
                "[::1]:2",
                b"PROXY TCP6 ::ffff:c000:201 ::1 1 2\r\n",
            ),
            (
                Version::V1,
                "[::ffff:0.0.0.0]:1",
                "[::1]:2",
                b"PROXY TCP6 ::ffff:0:0 ::1 1 2\r\n",
            ),
            (
                Version::V2,
                "127.0.0.1:8080",
                "10.0.0.2:80",
                b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\
                  \x7f\x00\x00\x01\x0a\x00\x00\x02\x1f\x90\x00\x50",
            ),
            (
                Version::V2,
                "[2001:db8::1]:56324",
                "[2001:db8::2]:443",
                b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24\
                  \x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01\
                  \x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x02\
                  \xdc\x04\x01\xbb",
            ),
        ];
        for &(version, src, dst, want) in cases {
            let got = encode(version, v4(src), v4(dst));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&got));
        }
        assert_eq!(encode_local_v2(), b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00");
    }

    #[test]
    fn errors_read_as_sentences() {
        assert_eq!(NotProxyProtocol.to_string(), "not a PROXY protocol header");
        assert_eq!(
            ReadError::Eof { received: 3 }.to_string(),
            "closed after 3 bytes of a PROXY protocol header"
        );
        assert_eq!(
            ReadError::Header(TooLong).to_string(),
            "PROXY protocol header longer than the limit"
        );
    }

    /// `prefix`, then `fill` forever, as fast as asked; counts the bytes handed out.
    struct Endless {
        prefix: Vec<u8>,
        fill: u8,
        taken: usize,
    }

    impl AsyncRead for Endless {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            for byte in buf.iter_mut() {
                *byte = *self.prefix.get(self.taken).unwrap_or(&self.fill);
                self.taken += 1;
            }
            Poll::Ready(Ok(buf.len()))
        }
    }

    /// The addresses parse finds in a complete header.
    fn addresses_of(header: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
        match parse(header) {
            Ok(Parsed::Complete { addresses, .. }) => addresses,
            other => panic!("not a complete header: {other:?}"),
        }
    }

    /// What [`read_header`] returns on success: the addresses, and the stream bytes read.
    type Header = (Option<(SocketAddr, SocketAddr)>, Vec<u8>);

    /// Outcome of a read, comparable without `io::Error`.
    fn outcome(got: Result<Header, ReadError>) -> Result<Header, String> {
        got.map_err(|e| match e {
            ReadError::Io(e) => panic!("unexpected I/O error {e}"),
            e => e.to_string(),
        })
    }

    #[test]
    fn read_header_one_byte_at_a_time_leaves_the_stream_in_the_reader() {
        for (input, want) in all_cases() {
            let mut reader = Trickle::new(&[&input[..], b"\x81\x05hello"].concat());
            let got = block_on(read_header(&mut reader));
            let want = match expected(&input, want) {
                Ok(Parsed::Complete { addresses, .. }) => Ok((addresses, Vec::new())),
                Ok(Parsed::Incomplete) => continue,
                Err(e) => Err(ReadError::Header(e).to_string()),
            };
            assert_eq!(outcome(got), want, "{input:x?}");
            if want.is_ok() {
                assert_eq!(&reader.data[reader.at..], b"\x81\x05hello", "{input:x?}");
            }
        }
    }

    #[test]
    fn read_header_keeps_the_stream_bytes_it_read() {
        for (input, want) in all_cases() {
            if let Proxy(..) | Real = want {
                let stream: Vec<u8> = (0..300).map(|i| i as u8).collect();
                let mut reader = Cursor::new([&input[..], &stream].concat());
                let (addresses, mut rest) = block_on(read_header(&mut reader)).expect("header");
                assert_eq!(addresses, addresses_of(&input));
                assert!(input.len() + rest.len() <= V1_MAX_LEN.max(input.len()));
                block_on(reader.read_to_end(&mut rest)).expect("rest");
                assert_eq!(rest, stream, "{input:x?}");
            }
        }
    }

    #[test]
    fn read_header_never_reads_past_its_bound() {
        let mut line = Endless {
            prefix: b"PROXY UNKNOWN ".to_vec(),
            fill: b'x',
            taken: 0,
        };
        let got = block_on(read_header(&mut line));
        assert!(matches!(got, Err(ReadError::Header(TooLong))), "{got:?}");
        assert!(line.taken <= V1_MAX_LEN, "read {} bytes", line.taken);

        let mut balancer = Endless {
            prefix: v2(0x21, 0x11, 4096, &largest()),
            fill: 0,
            taken: 0,
        };
        let got = block_on(read_header(&mut balancer));
        assert!(matches!(got, Ok((Some(_), _))), "{got:?}");
        assert!(
            balancer.taken <= MAX_HEADER_LEN,
            "read {} bytes",
            balancer.taken
        );
    }

    #[test]
    fn read_header_refuses_a_plain_client_after_its_first_byte() {
        let mut client = Trickle::new(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let got = block_on(read_header(&mut client));
        assert!(
            matches!(got, Err(ReadError::Header(NotProxyProtocol))),
            "{got:?}"
        );
        assert_eq!(client.at, 1);
    }

    #[test]
    fn read_header_reports_a_close_mid_header() {
        let cases: &[(&[u8], usize)] = &[
            (b"", 0),
            (b"PROXY TCP4 192.0.2", 18),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f", 17),
        ];
        for &(input, received) in cases {
            let got = block_on(read_header(&mut Cursor::new(input.to_vec())));
            assert!(
                matches!(got, Err(ReadError::Eof { received: r }) if r == received),
                "{got:?} for {input:x?}"
            );
        }
    }

    #[test]
    fn read_header_retries_an_interrupted_read() {
        struct InterruptedOnce(bool, Cursor<Vec<u8>>);

        impl AsyncRead for InterruptedOnce {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<io::Result<usize>> {
                if !self.0 {
                    self.0 = true;
                    return Poll::Ready(Err(io::ErrorKind::Interrupted.into()));
                }
                Pin::new(&mut self.1).poll_read(cx, buf)
            }
        }

        let mut reader = InterruptedOnce(false, Cursor::new(encode_local_v2()));
        let got = block_on(read_header(&mut reader));
        assert!(
            matches!(got, Ok((None, ref rest)) if rest.is_empty()),
            "{got:?}"
        );
    }
}
