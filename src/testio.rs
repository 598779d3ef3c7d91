//! Readers for tests of incremental parsers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::AsyncRead;

/// Hands out one byte per read, and says "not yet" before each one, so every byte arrives in
/// its own poll as from a peer that sends one byte per segment.
pub(crate) struct Trickle {
    /// Everything it will hand out.
    pub(crate) data: Vec<u8>,
    /// How many bytes it has handed out.
    pub(crate) at: usize,
    ready: bool,
}

impl Trickle {
    pub(crate) fn new(data: &[u8]) -> Self {
        Trickle {
            data: data.to_vec(),
            at: 0,
            ready: false,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        let Some(&byte) = self.data.get(self.at) else {
            return Poll::Ready(Ok(0));
        };
        buf[0] = byte;
        self.at += 1;
        Poll::Ready(Ok(1))
    }
}
