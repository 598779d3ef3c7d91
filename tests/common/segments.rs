//! A peer that sends a stream in segments, for the tests and fuzz targets of the incremental
//! parsers (`tests/props.rs`, `fuzz/`, which includes this file by path).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::AsyncRead;

/// Sends `data` in segments of the sizes in `sizes` (cycled; 0 is a "not yet" before the next
/// segment), and counts what was taken, so a test can check that a reader stayed within its
/// bound and left the rest of the stream where it was.
pub struct Segments {
    pub data: Vec<u8>,
    pub at: usize,
    sizes: Vec<usize>,
    next: usize,
}

impl Segments {
    pub fn new(data: &[u8], sizes: impl IntoIterator<Item = usize>) -> Self {
        let mut sizes: Vec<usize> = sizes.into_iter().collect();
        // A peer that only ever says "not yet" would never end: at least one read delivers.
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
