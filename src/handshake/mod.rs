//! The HTTP/1.1 WebSocket upgrade (RFC 6455 §4), as pure steps the WebSocket flow strings
//! together: reading a head, checking the client's request, building the backend's request,
//! judging the backend's answer, and refusing with a clear status.
//!
//! Nothing here owns a socket, a timer or a runtime: [`read_head`] is generic over
//! `AsyncRead`, and the caller bounds it with [`net::timeout`](crate::net::timeout). So the same
//! steps run on smol and under turmoil, and everything else is tested byte string by byte
//! string.
//!
//! The flow, with the answer at each step:
//!
//! | step | call | on failure |
//! |---|---|---|
//! | read the request head | [`read_head`] (cap `max_request_head_bytes`) | [`HeadError::TooLarge`] → [`Refusal::HeadTooLarge`] (431); EOF/I/O → close; timeout → [`Refusal::RequestTimeout`] (408) |
//! | check it | [`parse_request`] | its [`Refusal`]; [`Incoming::PlainGet`] → health path `200`, else [`Refusal::NotUpgrade`] |
//! | route, police | (the flow) | [`Refusal::NoRoute`], [`Refusal::OriginNotAllowed`] |
//! | build the backend's head | [`forward`] with the route's [`ForwardOptions`] | its [`Refusal`] |
//! | connect, write [`Forwarded::head`] then the client's [`Head::rest`] | (the flow) | [`Refusal::BadGateway`] / [`Refusal::GatewayTimeout`] |
//! | read the response head | [`read_head`] | any [`HeadError`] → 502; timeout → 504 |
//! | judge it | [`Forwarded::check_response`] | [`BadResponse`] → 502; [`Response::Refused`] → pass the backend's response through |
//! | on [`Response::Accepted`] | write the backend's head bytes, then its `rest`, to the client; relay | |
//!
//! # Examples
//!
//! ```no_run
//! use std::net::IpAddr;
//!
//! use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
//! use portcullis::handshake::{
//!     forward, parse_request, read_head, response, write_refusal, ForwardOptions, HeadError,
//!     Incoming, Refusal, Response,
//! };
//!
//! /// Upgrades `client` through `backend`; returns the bytes each side already sent into the
//! /// tunnel, for the relay, or `None` when the client was answered and should be closed.
//! async fn upgrade<C, B>(
//!     client: &mut C,
//!     backend: &mut B,
//!     ip: IpAddr,
//!     options: &ForwardOptions,
//! ) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>>
//! where
//!     C: AsyncRead + AsyncWrite + Unpin,
//!     B: AsyncRead + AsyncWrite + Unpin,
//! {
//!     let head = match read_head(client, 8192).await {
//!         Ok(head) => head,
//!         Err(HeadError::TooLarge) => {
//!             write_refusal(client, Refusal::HeadTooLarge).await?;
//!             return Ok(None);
//!         }
//!         Err(_) => return Ok(None),
//!     };
//!     let request = match parse_request(&head.bytes) {
//!         Ok(Incoming::Upgrade(request)) => request,
//!         Ok(Incoming::PlainGet(r)) if r.path() == "/health" => {
//!             client.write_all(&response(200, "ok", &[])).await?;
//!             return Ok(None);
//!         }
//!         Ok(Incoming::PlainGet(_)) => {
//!             write_refusal(client, Refusal::NotUpgrade).await?;
//!             return Ok(None);
//!         }
//!         Err(refusal) => {
//!             write_refusal(client, refusal).await?;
//!             return Ok(None);
//!         }
//!     };
//!     let sent = match forward(&request, request.target(), "10.0.0.5:9000", ip, options) {
//!         Ok(sent) => sent,
//!         Err(refusal) => {
//!             write_refusal(client, refusal).await?;
//!             return Ok(None);
//!         }
//!     };
//!     backend.write_all(&sent.head).await?;
//!     backend.write_all(&head.rest).await?;
//!     let answer = match read_head(backend, 8192).await {
//!         Ok(answer) => answer,
//!         Err(_) => {
//!             write_refusal(client, Refusal::BadGateway).await?;
//!             return Ok(None);
//!         }
//!     };
//!     match sent.check_response(&answer.bytes) {
//!         Ok(Response::Accepted) => {
//!             client.write_all(&answer.bytes).await?;
//!             Ok(Some((Vec::new(), answer.rest)))
//!         }
//!         Ok(Response::Refused { .. }) => {
//!             // The backend's own answer; a real flow also copies the rest of its body
//!             // (`content_length`) before closing.
//!             client.write_all(&answer.bytes).await?;
//!             client.write_all(&answer.rest).await?;
//!             Ok(None)
//!         }
//!         Err(bad) => {
//!             write_refusal(client, bad.into()).await?;
//!             Ok(None)
//!         }
//!     }
//! }
//! ```

mod backend;
mod base64;
mod forward;
mod head;
mod refusal;
mod request;
mod sha1;

pub use backend::{chunked_body_len, BadResponse, Response};
pub use forward::{forward, ForwardOptions, Forwarded};
pub use head::{read_head, Head, HeadError};
pub use refusal::{reason, response, write_refusal, Refusal};
pub use request::{parse_request, Incoming, Request, MAX_HEADERS};

/// Appended to the client's key before hashing (RFC 6455 §1.3): a value no non-WebSocket server
/// would produce by accident.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
///
/// # Examples
///
/// ```
/// // The example of RFC 6455 §1.3.
/// assert_eq!(
///     portcullis::handshake::accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
///     "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
/// );
/// ```
pub fn accept_key(key: &str) -> String {
    let mut input = Vec::with_capacity(key.len() + GUID.len());
    input.extend_from_slice(key.as_bytes());
    input.extend_from_slice(GUID.as_bytes());
    base64::encode(&sha1::sha1(&input))
}

/// `value` without leading and trailing spaces and tabs (HTTP's optional whitespace).
fn trim(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// The non-empty elements of a comma-separated header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

/// Whether any of `values` lists `token` (ASCII case-insensitive), as `Connection: keep-alive,
/// Upgrade` lists `upgrade`.
fn has_token<'a>(values: impl IntoIterator<Item = &'a [u8]>, token: &str) -> bool {
    values
        .into_iter()
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether `name: value` can be written as one header line: the name a non-empty token
/// (RFC 9110 §5.1), the value free of CR, LF and NUL, so that no line can be split or emptied.
fn is_field(name: &[u8], value: &[u8]) -> bool {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    !name.is_empty() && name.iter().all(tchar) && !value.iter().any(|b| b"\r\n\0".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_6455_accept_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn token_lists() {
        let cases: &[(&[&[u8]], &str, bool)] = &[
            (&[b"Upgrade"], "upgrade", true),
            (&[b"keep-alive, Upgrade"], "upgrade", true),
            (&[b"keep-alive,upgrade"], "upgrade", true),
            (&[b"keep-alive", b" UPGRADE "], "upgrade", true),
            (&[b",,upgrade,,"], "upgrade", true),
            (&[b"upgrade-insecure-requests"], "upgrade", false),
            (&[b"keep-alive"], "upgrade", false),
            (&[b""], "upgrade", false),
            (&[], "upgrade", false),
        ];
        for (values, token, want) in cases {
            assert_eq!(
                has_token(values.iter().copied(), token),
                *want,
                "{values:?}"
            );
        }
    }

    #[test]
    fn trimming() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"   ", b""),
            (b" \ta b\t ", b"a b"),
            (b"x", b"x"),
        ];
        for (input, want) in cases {
            assert_eq!(trim(input), *want, "{input:?}");
        }
    }
}
