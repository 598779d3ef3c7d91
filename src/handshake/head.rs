//! Reading an HTTP head incrementally: as many reads as it takes, up to a byte cap.
//!
//! A head may arrive in any number of segments, down to one byte each, so a single read is never
//! enough. Whatever arrives after the blank line belongs to the tunnel (a client's first frames
//! pipelined behind its request, a backend's greeting right behind its 101) and is handed back
//! rather than dropped. There is no timer here: the caller bounds the whole read with
//! [`net::timeout`](crate::net::timeout), so a slow peer cannot hold a handshake open forever.

use std::fmt;
use std::io;

use futures_lite::{AsyncRead, AsyncReadExt};

/// The first read's size. A browser's upgrade request is 0.5–2 KiB, so one read usually takes the
/// whole head, while a connection that has not sent anything yet holds only this much.
const FIRST_READ: usize = 2048;

/// The blank line that ends an HTTP head.
const END: &[u8] = b"\r\n\r\n";

/// An HTTP head as read by [`read_head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The head, from the first byte up to and including the blank line (`\r\n\r\n`).
    pub bytes: Vec<u8>,
    /// Bytes that arrived in the same reads after the head. They belong to the tunnel: write them
    /// to the other side right after the head (or hand them to
    /// [`Relay::pending`](crate::Relay::pending)); never drop them.
    pub rest: Vec<u8>,
}

/// Why [`read_head`] found no head.
///
/// For a client's request, [`TooLarge`](HeadError::TooLarge) is answered with
/// [`Refusal::HeadTooLarge`](super::Refusal::HeadTooLarge) (431); the others leave no one to
/// answer. For a backend's response, each of them means 502 for the client.
#[derive(Debug)]
pub enum HeadError {
    /// The cap was reached before the blank line.
    TooLarge,
    /// The peer closed its side before the blank line; `received` bytes of a head had arrived
    /// (0 for a connection that sent nothing, such as a TCP health probe).
    Eof {
        /// How many bytes arrived before the close.
        received: usize,
    },
    /// Reading failed.
    Io(io::Error),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => f.write_str("HTTP head larger than the limit"),
            HeadError::Eof { received: 0 } => f.write_str("closed before sending an HTTP head"),
            HeadError::Eof { received } => {
                write!(f, "closed after {received} bytes of an HTTP head")
            }
            HeadError::Io(e) => write!(f, "reading the HTTP head failed: {e}"),
        }
    }
}

impl std::error::Error for HeadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HeadError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Reads from `reader` until the blank line that ends an HTTP head, reading no more than `max`
/// bytes in all.
///
/// The head (blank line included) may be at most `max` bytes long; the default for requests is
/// [`DEFAULT_MAX_REQUEST_HEAD_BYTES`](crate::config::DEFAULT_MAX_REQUEST_HEAD_BYTES). Bytes read
/// beyond the head are returned in [`Head::rest`]. Only `\r\n\r\n` ends a head: a head that uses
/// bare `\n` line endings never ends, and runs into the cap or the caller's timeout.
///
/// The search for the end resumes where the previous read stopped, so a head that trickles in
/// one byte per read costs linear time, not quadratic.
///
/// # Examples
///
/// ```
/// use futures_lite::io::Cursor;
/// use portcullis::handshake::read_head;
///
/// # futures_lite::future::block_on(async {
/// let mut client = Cursor::new(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\x81\x00".to_vec());
/// let head = read_head(&mut client, 8192).await?;
/// assert_eq!(head.bytes, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
/// assert_eq!(head.rest, b"\x81\x00"); // a frame sent right behind the head
/// # Ok::<(), portcullis::handshake::HeadError>(()) }).unwrap();
/// ```
pub async fn read_head<R>(reader: &mut R, max: usize) -> Result<Head, HeadError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    // `buf[..filled]` holds what was read; the rest is room for the next reads, zeroed once when
    // it is added rather than once per read, which a head sent byte by byte would make costly.
    let mut buf = Vec::new();
    let mut filled = 0;
    loop {
        if filled >= max {
            return Err(HeadError::TooLarge);
        }
        if filled == buf.len() {
            // Double the room each time, but never read past the cap: what lies beyond it stays
            // in the socket for the relay.
            let grow = filled.max(FIRST_READ).min(max - filled);
            buf.resize(filled + grow, 0);
        }
        let n = match reader.read(&mut buf[filled..]).await {
            Ok(0) => return Err(HeadError::Eof { received: filled }),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HeadError::Io(e)),
        };
        // The end may straddle the previous read: look back three bytes.
        let from = filled.saturating_sub(END.len() - 1);
        filled += n;
        if let Some(end) = find_end(&buf[..filled], from) {
            buf.truncate(filled);
            let rest = buf.split_off(end);
            buf.shrink_to_fit();
            return Ok(Head { bytes: buf, rest });
        }
    }
}

/// The offset just past the first `\r\n\r\n` at or after `from`.
fn find_end(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .windows(END.len())
        .position(|w| w == END)
        .map(|at| from + at + END.len())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_lite::future::block_on;
    use futures_lite::io::Cursor;

    use super::*;
    use crate::testio::Trickle;

    /// Fails once with `Interrupted`, then reads from the inner cursor.
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

    /// Outcome of one case, comparable without `io::Error`.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Head(&'static [u8], &'static [u8]),
        TooLarge,
        Eof(usize),
    }

    fn outcome(r: Result<Head, HeadError>) -> Result<(Vec<u8>, Vec<u8>), Outcome> {
        match r {
            Ok(h) => Ok((h.bytes, h.rest)),
            Err(HeadError::TooLarge) => Err(Outcome::TooLarge),
            Err(HeadError::Eof { received }) => Err(Outcome::Eof(received)),
            Err(HeadError::Io(e)) => panic!("unexpected I/O error {e}"),
        }
    }

    const CASES: &[(&[u8], usize, Outcome)] = &[
        (
            b"GET / HTTP/1.1\r\n\r\n",
            8192,
            Outcome::Head(b"GET / HTTP/1.1\r\n\r\n", b""),
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nframe",
            8192,
            Outcome::Head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"frame"),
        ),
        // A second head behind the first is tunnel data, not another request.
        (
            b"A\r\n\r\nB\r\n\r\n",
            8192,
            Outcome::Head(b"A\r\n\r\n", b"B\r\n\r\n"),
        ),
        // Exactly at the cap is allowed; one byte over is not.
        (
            b"0123456\r\n\r\n",
            11,
            Outcome::Head(b"0123456\r\n\r\n", b""),
        ),
        (b"01234567\r\n\r\n", 11, Outcome::TooLarge),
        (b"", 0, Outcome::TooLarge),
        (b"", 8192, Outcome::Eof(0)),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", 8192, Outcome::Eof(25)),
        // Bare LF endings do not end a head.
        (b"GET / HTTP/1.1\n\n", 8192, Outcome::Eof(16)),
        (b"GET / HTTP/1.1\r\n\r", 8192, Outcome::Eof(17)),
    ];

    fn expected(case: &Outcome) -> Result<(Vec<u8>, Vec<u8>), Outcome> {
        match case {
            Outcome::Head(h, r) => Ok((h.to_vec(), r.to_vec())),
            Outcome::TooLarge => Err(Outcome::TooLarge),
            Outcome::Eof(n) => Err(Outcome::Eof(*n)),
        }
    }

    #[test]
    fn whole_input_at_once() {
        for (input, max, want) in CASES {
            let got = block_on(read_head(&mut Cursor::new(input.to_vec()), *max));
            assert_eq!(
                outcome(got),
                expected(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn one_byte_per_poll() {
        for (input, max, want) in CASES {
            let got = block_on(read_head(&mut Trickle::new(input), *max));
            // Read one byte at a time, nothing beyond the head has been taken yet: the rest is
            // still in the reader, which is exactly where the relay will find it.
            let want = expected(want).map(|(head, _)| (head, Vec::new()));
            assert_eq!(outcome(got), want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn bytes_after_a_trickled_head_stay_in_the_reader() {
        let mut reader = Trickle::new(b"GET / HTTP/1.1\r\n\r\n\x81\x05hello");
        let head = block_on(read_head(&mut reader, 8192)).expect("head");
        assert_eq!(head.bytes, b"GET / HTTP/1.1\r\n\r\n");
        let mut tail = Vec::new();
        block_on(reader.read_to_end(&mut tail)).expect("rest");
        assert_eq!(
            head.rest.iter().chain(&tail).copied().collect::<Vec<_>>(),
            b"\x81\x05hello"
        );
    }

    #[test]
    fn a_large_head_in_one_segment_keeps_everything_after_it() {
        let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 5000));
        input.extend_from_slice(b"\r\n\r\n");
        let head_len = input.len();
        input.extend_from_slice(b"after");
        let head = block_on(read_head(&mut Cursor::new(input.clone()), 8192)).expect("head");
        assert_eq!(head.bytes, &input[..head_len]);
        assert_eq!(head.rest, b"after");
    }

    #[test]
    fn an_interrupted_read_is_retried() {
        let mut reader = InterruptedOnce(false, Cursor::new(b"GET / HTTP/1.1\r\n\r\n".to_vec()));
        let head = block_on(read_head(&mut reader, 8192)).expect("head");
        assert_eq!(head.bytes, b"GET / HTTP/1.1\r\n\r\n");
    }
}
