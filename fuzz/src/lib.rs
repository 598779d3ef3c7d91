//! What the fuzz targets share: a peer that sends a stream in segments chosen by the input.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::AsyncRead;

/// Sends `data` in segments of the sizes in `sizes` (cycled; 0 is a "not yet" before the next
/// segment), and counts what was taken, so a target can check that a reader stayed within its
/// bound and left the rest of the stream where it was.
pub struct Segments {
    pub data: Vec<u8>,
    pub at: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl Segments {
    pub fn new(data: &[u8], sizes: &[u8]) -> Self {
        let mut sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s)).collect();
        if sizes.iter().all(|&s| s == 0) {
            sizes.push(1);
        }
        Segments {
            data: data.to_vec(),
            at: 0,
            sizes,
            next: 0,
        }
    }

    /// Splits a fuzz input into segment sizes (its first bytes, as many as the first says, up
    /// to 8) and the stream (the rest).
    pub fn from_input(input: &[u8]) -> Self {
        let Some((&n, rest)) = input.split_first() else {
            return Segments::new(&[], &[]);
        };
        let n = usize::from(n % 8).min(rest.len());
        let (sizes, data) = rest.split_at(n);
        Segments::new(data, sizes)
    }

    /// What is still in the "socket".
    pub fn unread(&self) -> &[u8] {
        &self.data[self.at..]
    }
}

impl AsyncRead for Segments {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let size = self.sizes[self.next % self.sizes.len()];
        self.next += 1;
        if size == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = size.min(buf.len()).min(self.data.len() - self.at);
        let at = self.at;
        buf[..n].copy_from_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(n))
    }
}

/// The offset just past the first `\r\n\r\n` in `bytes`.
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}
